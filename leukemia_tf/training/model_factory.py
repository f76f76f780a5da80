"""The model and taxonomy a :class:`TrainConfig` describes (one mapping for train, load, tune)."""

from __future__ import annotations

import keras

from leukemia_tf.models import classifier
from leukemia_tf.taxonomy import Taxonomy
from leukemia_tf.training.config import TrainConfig


def taxonomy_for(config: TrainConfig) -> Taxonomy | None:
    """The taxonomy a run uses: for taxonomy labels or a hierarchical head, else None."""
    if config.label_mode == "taxonomy" or config.head == "hierarchical":
        return Taxonomy.load(config.taxonomy or None)
    return None


def build_model(
    config: TrainConfig, num_classes: int, taxonomy: Taxonomy | None, weights: str | None = None
) -> keras.Model:
    """``build_classifier`` with the config's model fields.

    Args:
      config: the run's configuration.
      num_classes: number of classes (used by the flat head).
      taxonomy: from :func:`taxonomy_for`.
      weights: overrides ``config.weights`` (e.g. ``"none"`` before copying trained weights).
    """
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
    )
