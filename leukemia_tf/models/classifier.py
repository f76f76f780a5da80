"""The classifier: pixels -> backbone -> flat or hierarchical head.

A Keras functional model, so it saves to ``.keras``, reloads without code
beyond this package (the custom layers are registered serializable), and runs
under any ``tf.distribute`` strategy. Augmentation is *not* inside it: the
training step applies :func:`leukemia_tf.models.build_augmenter` before the
model, so evaluation, inference and export see the plain model. The
exceptions are the input layers (:func:`input_layers`), deterministic and
the same in every use of the model (training, evaluation, prediction, the
SavedModel): ``erase_marks``
(:class:`~leukemia_tf.models.mark_augment.EraseMarks`: burned-in marks
erased), ``white_balance``, ``stain_norm`` and ``cell_crop``
(:mod:`leukemia_tf.models.canonical`: each image's white made neutral, its
stain scaled to a reference strength, the image framed around its cell).
"""

from __future__ import annotations

import keras

from leukemia_tf.models import canonical
from leukemia_tf.models.heads import FlatHead, HierarchicalHead
from leukemia_tf.models.knn import KNNHead
from leukemia_tf.models.mark_augment import EraseMarks
from leukemia_tf.models.registry import build_backbone, get_backbone_spec
from leukemia_tf.taxonomy import Taxonomy

HEADS = ("flat", "hierarchical")

#: Name of the classifier's input.
INPUT_NAME = "pixels"

#: Name of the :class:`EraseMarks` layer of a classifier built with ``erase_marks``.
ERASE_MARKS_NAME = "erase_marks"


def build_classifier(
    *,
    backbone: str,
    head: str,
    num_classes: int | None = None,
    taxonomy: Taxonomy | None = None,
    image_size: int,
    weights: str = "none",
    dropout: float = 0.2,
    hidden_units: int = 0,
    bn_momentum: float | None = None,
    drop_path_rate: float = 0.0,
    erase_marks: bool = False,
    white_balance: bool = False,
    stain_norm: bool = False,
    cell_crop: bool = False,
    knn_k: int = 0,
    knn_bank_size: int = 0,
    name: str | None = None,
) -> keras.Model:
    """Builds a classifier.

    Args:
      backbone: registry name (see ``list_backbones``).
      head: ``"flat"`` or ``"hierarchical"``.
      num_classes: classes of a flat head; default ``len(taxonomy.leaves)``.
      taxonomy: the label tree; required for a hierarchical head.
      image_size: input side S in pixels.
      weights: ``"imagenet"``, ``"none"`` or a weights file (see
        ``build_backbone``).
      dropout: dropout rate in the head.
      hidden_units: width of an optional hidden layer in the head; 0 = none.
      bn_momentum: BatchNorm momentum override for the backbone.
      drop_path_rate: stochastic depth of the backbone.
      erase_marks: put an :class:`EraseMarks` layer (burned-in scale bars and
        text filled with the background) before the backbone.
      white_balance: then a :class:`~leukemia_tf.models.canonical.WhiteBalance`
        layer (each image's own white becomes 255).
      stain_norm: then a :class:`~leukemia_tf.models.canonical.StainNormalize`
        layer (each image's stain scaled to a reference strength).
      cell_crop: then a :class:`~leukemia_tf.models.canonical.CellCrop` layer
        (each image cropped to a square around its nucleus), the last before
        the backbone.
      knn_k: with ``knn_bank_size``, the flat head is a
        :class:`~leukemia_tf.models.knn.KNNHead` (a k-NN probe fitted on
        stored features, ``leukemia_tf.train --from_embeddings --probe=knn``)
        whose ``knn_k`` nearest bank rows vote; ``dropout`` and
        ``hidden_units`` are then unused.
      knn_bank_size: rows of that head's bank; 0: the ordinary head.
      name: model name; default ``"<backbone>_<head>"``.

    Returns:
      A functional ``keras.Model``: input ``"pixels"`` float32 ``[B, S, S, 3]``
      in [0, 255] (uint8 is accepted and cast); outputs ``{"logits": [B, C]}``
      (flat) or ``{"level_0": [B, n_0], ...}`` (hierarchical), all float32.

    Raises:
      ValueError: bad head, missing taxonomy or class count, and everything
        ``build_backbone`` rejects.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head == "hierarchical" and taxonomy is None:
        raise ValueError("a hierarchical head needs a taxonomy")
    if head == "flat":
        if num_classes is None:
            if taxonomy is None:
                raise ValueError("a flat head needs num_classes or a taxonomy (its leaves)")
            num_classes = len(taxonomy.leaves)
        if knn_bank_size:
            head_layer = KNNHead(num_classes, knn_k, knn_bank_size, name="head")
        else:
            head_layer = FlatHead(num_classes, dropout, hidden_units, name="head")
    elif knn_bank_size:
        raise ValueError("a k-NN head is flat: it votes over the classes (use head='flat')")
    else:
        head_layer = HierarchicalHead(taxonomy, dropout, hidden_units, name="head")
    get_backbone_spec(backbone)  # fail on an unknown name before any build
    features_model = build_backbone(
        backbone,
        image_size=image_size,
        weights=weights,
        bn_momentum=bn_momentum,
        drop_path_rate=drop_path_rate,
    )
    # float32 input: the backbone normalises in float32 before any cast to the
    # compute dtype, and a uint8 batch is cast by the functional model.
    pixels = keras.Input((image_size, image_size, 3), dtype="float32", name=INPUT_NAME)
    x = EraseMarks(name=ERASE_MARKS_NAME)(pixels) if erase_marks else pixels
    if white_balance:
        x = canonical.WhiteBalance(name=canonical.WHITE_BALANCE_NAME)(x)
    if stain_norm:
        x = canonical.StainNormalize(name=canonical.STAIN_NORM_NAME)(x)
    if cell_crop:
        x = canonical.CellCrop(name=canonical.CELL_CROP_NAME)(x)
    features = features_model(x)
    outputs = head_layer(features)
    if head == "flat":
        outputs = {"logits": outputs}
    return keras.Model(pixels, outputs, name=name or f"{backbone}_{head}")


def get_backbone(model: keras.Model) -> keras.Model:
    """The backbone sub-model of a classifier built by :func:`build_classifier`."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(
            f"model '{model.name}' is not a classifier of this package: expected one nested "
            f"backbone model, found {[layer.name for layer in nested]}"
        )
    return nested[0]


def input_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers between the classifier's input and its backbone, in order.

    :class:`EraseMarks`, :class:`~leukemia_tf.models.canonical.WhiteBalance`,
    :class:`~leukemia_tf.models.canonical.StainNormalize` and
    :class:`~leukemia_tf.models.canonical.CellCrop`, those the model has:
    applied to an image, they give the pixels the backbone sees.
    """
    kinds = (EraseMarks, canonical.WhiteBalance, canonical.StainNormalize, canonical.CellCrop)
    return [layer for layer in model.layers if isinstance(layer, kinds)]


def get_erase_marks(model: keras.Model) -> keras.layers.Layer | None:
    """The classifier's :class:`EraseMarks` layer, or None when it has none."""
    for layer in model.layers:
        if isinstance(layer, EraseMarks):
            return layer
    return None


def set_backbone_trainable(model: keras.Model, trainable: bool) -> None:
    """Freezes or unfreezes the backbone (two-stage fine-tuning).

    A frozen backbone gets no gradient updates and its BatchNorm layers run
    in inference mode (Keras 3: a BatchNormalization layer with
    ``trainable=False`` uses its moving statistics even when called with
    ``training=True``, and does not update them). The head stays trainable.

    After a change, rebuild the optimizer's variable list (or the compiled
    train step): ``model.trainable_variables`` changes.

    Args:
      model: a classifier from :func:`build_classifier`.
      trainable: False to freeze, True to unfreeze.
    """
    get_backbone(model).trainable = bool(trainable)
