"""The model and taxonomy a :class:`TrainConfig` describes (one mapping for train, load, tune)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from leukemia_tf.models import classifier
from leukemia_tf.models.knn import KNNHead
from leukemia_tf.taxonomy import Taxonomy
from leukemia_tf.training.config import TrainConfig


@contextlib.contextmanager
def float32_policy() -> Iterator[None]:
    """Builds models under the float32 dtype policy; restores the previous policy after."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def taxonomy_for(config: TrainConfig) -> Taxonomy | None:
    """The taxonomy a run uses: for taxonomy labels or a hierarchical head, else None."""
    if config.label_mode == "taxonomy" or config.head == "hierarchical":
        return Taxonomy.load(config.taxonomy or None)
    return None


def is_knn_probe(config: TrainConfig) -> bool:
    """True for a run whose head is a k-NN probe over stored features (``--probe=knn``)."""
    return bool(config.from_embeddings) and config.probe == "knn"


def knn_bank_size(model: keras.Model) -> int:
    """The bank size of a classifier's k-NN head (:class:`KNNHead`), or 0 for any other head."""
    try:
        head = model.get_layer("head")
    except ValueError:
        return 0
    return head.bank_size if isinstance(head, KNNHead) else 0


def build_model(
    config: TrainConfig,
    num_classes: int,
    taxonomy: Taxonomy | None,
    weights: str | None = None,
    knn_bank_size: int = 0,
) -> keras.Model:
    """``build_classifier`` with the config's model fields.

    Args:
      config: the run's configuration.
      num_classes: number of classes (used by the flat head).
      taxonomy: from :func:`taxonomy_for`.
      weights: overrides ``config.weights`` (e.g. ``"none"`` before copying trained weights).
      knn_bank_size: the bank size of a k-NN probe's head (:func:`is_knn_probe`;
        the number of training features it was fitted on, :func:`knn_bank_size`
        of the saved model); ignored for other runs.

    Raises:
      ValueError: a k-NN probe without ``knn_bank_size``.
    """
    knn = is_knn_probe(config)
    if knn and knn_bank_size < 1:
        raise ValueError("a k-NN probe's model needs the size of its bank (knn_bank_size)")
    return classifier.build_classifier(
        backbone=config.backbone,
        head=config.head,
        num_classes=num_classes if config.head == "flat" else None,
        taxonomy=taxonomy,
        image_size=config.image_size,
        weights=config.weights if weights is None else weights,
        dropout=config.dropout,
        hidden_units=config.hidden_units,
        bn_momentum=config.bn_momentum or None,
        drop_path_rate=config.drop_path_rate,
        erase_marks=config.erase_marks,
        white_balance=config.white_balance,
        stain_norm=config.stain_norm,
        cell_crop=config.cell_crop,
        knn_k=config.knn_k if knn else 0,
        knn_bank_size=knn_bank_size if knn else 0,
    )
