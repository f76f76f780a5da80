"""Visual explanations: Grad-CAM for CNN backbones, attention rollout for ViTs.

* **Grad-CAM** (Selvaraju et al., 2017) on the backbone's last convolutional
  feature map, found as the input of the backbone's global pooling layer
  (every CNN backbone of the registry ends in ``GlobalAveragePooling2D``:
  the keras.applications EfficientNet / EfficientNetV2 / ConvNeXt /
  MobileNetV3 with ``pooling="avg"``, and the ``cnn_*`` ResNets). The
  explained score is the predicted class's logit (flat head) or the log of
  its marginal probability (hierarchical head: the sum of the log
  conditionals along its path, the hierarchical analogue of a logit).
* **Attention rollout** (Abnar & Zuidema, 2020) for keras-hub ``ViTBackbone``:
  the attention of each encoder block is averaged over heads, mixed with the
  identity for the residual path (``0.5 A + 0.5 I``, rows renormalised) and
  multiplied through the blocks; the class token's row over the patches is
  the map. The blocks are re-run here with ``return_attention_scores=True``,
  and the result is checked against the backbone's own output, so a change
  in keras-hub's block layout is detected and reported instead of drawn.

Both give a ``[N, S, S]`` map in [0, 1] per image (bilinear upsampling of
the feature or patch grid). A backbone that is neither is reported as
unsupported; explanations never stop an evaluation. A classifier with an
``EraseMarks`` first layer is explained on the erased images it classifies.

Burned-in marks: :class:`ExampleSampler` also counts, per true class, the
offered images with a detected mark (:mod:`leukemia_tf.data.marks`) and how
many of them were classified correctly, so that a shortcut on scale bars
shows as an accuracy gap; :func:`heat_on_marks` measures the share of a
map's heat on the marks and on the border band.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from leukemia_tf.data import marks as marks_lib
from leukemia_tf.models import canonical
from leukemia_tf.models import classifier as classifier_lib
from leukemia_tf.models import ensemble as ensemble_lib
from leukemia_tf.models.label_space import LabelSpace


class ExplanationUnavailable(ValueError):
    """The model's backbone has no supported explanation method."""


def _find_vit(backbone: keras.Model) -> keras.Model | None:
    for layer in backbone.layers:
        if isinstance(layer, keras.Model):
            names = {sub.name for sub in layer.layers}
            if {"vit_patching_and_embedding", "vit_encoder"} <= names:
                return layer
    return None


def _find_global_pool(backbone: keras.Model) -> keras.layers.Layer | None:
    pools = [
        layer
        for layer in backbone.layers
        if isinstance(layer, keras.layers.GlobalAveragePooling2D | keras.layers.GlobalMaxPooling2D)
    ]
    return pools[-1] if pools else None


def _normalise(maps: tf.Tensor, image_size: int) -> np.ndarray:
    """``[N, h, w]`` non-negative maps -> ``[N, S, S]`` in [0, 1] (each divided by its max)."""
    maps = tf.image.resize(maps[..., None], (image_size, image_size), method="bilinear")[..., 0]
    peak = tf.reduce_max(maps, axis=[1, 2], keepdims=True)
    maps = tf.math.divide_no_nan(maps, peak)
    return maps.numpy().clip(0.0, 1.0)


def _model_pixels(images, layers) -> tf.Tensor:
    """float32 ``images`` as the backbone sees them (after the model's input layers)."""
    pixels = tf.cast(images, tf.float32)
    for layer in layers:
        pixels = layer(pixels)
    return pixels


def _to_input_frame(maps: np.ndarray, images, layers) -> np.ndarray:
    """Maps drawn on what the backbone saw, on the frame of ``images``.

    A model with a :class:`~leukemia_tf.models.canonical.CellCrop` explains
    its crop of each image; its map is put back where the crop lies (0
    outside), so overlays, heat on marks and heat on the border all refer to
    the image as given.
    """
    pixels = tf.cast(images, tf.float32)
    for layer in layers:
        if isinstance(layer, canonical.CellCrop):
            top, left, side = layer.boxes(pixels)
            boxes = np.stack([top.numpy(), left.numpy(), side.numpy()], axis=-1)
            return canonical.uncrop(maps, boxes)
        pixels = layer(pixels)
    return maps


#: Pixels by which detected marks are grown before measuring heat on them
#: (as much as ``EraseMarks`` grows them before filling).
MARK_DILATION = 2

#: Width of the border band of :func:`heat_on_marks`, as a fraction of each side.
BORDER_FRACTION = 0.1


def mark_masks(images: np.ndarray) -> np.ndarray:
    """bool ``[N, H, W]``: detected burned-in marks of ``images``, grown by :data:`MARK_DILATION`."""
    masks = marks_lib.detect_marks(tf.cast(images, tf.float32))
    return marks_lib._dilate(masks, MARK_DILATION).numpy()[..., 0] > 0


def heat_on_marks(images: np.ndarray, heat: np.ndarray) -> dict[str, np.ndarray]:
    """Share of each map's heat on the images' marks and on the border band.

    Args:
      images: ``[N, S, S, 3]`` the explained images (as given to the model).
      heat: ``[N, S, S]`` their maps.

    Returns:
      :func:`leukemia_tf.data.marks.heat_fractions` (``on_marks``,
      ``on_border``, ``mark_area``) plus ``has_mark`` (bool ``[N]``).
    """
    masks = mark_masks(images)
    out = marks_lib.heat_fractions(heat, masks, BORDER_FRACTION)
    out["has_mark"] = masks.any(axis=(1, 2))
    return out


@dataclasses.dataclass
class GradCam:
    """Grad-CAM of a classifier built by ``build_classifier`` with a CNN backbone.

    Attributes:
      layer: the name of the explained feature map's layer (its input: the
        map that the global pooling averages).
      grid: the feature map's ``(h, w)``.
    """

    model: keras.Model
    label_space: LabelSpace
    layer: str = ""
    grid: tuple[int, int] = (0, 0)

    def __post_init__(self):
        backbone = classifier_lib.get_backbone(self.model)
        pool = _find_global_pool(backbone)
        if pool is None:
            raise ExplanationUnavailable(
                f"backbone '{backbone.name}' has no global pooling layer to take the last "
                "feature map from"
            )
        feature_map = pool.input
        if len(feature_map.shape) != 4:
            raise ExplanationUnavailable(
                f"backbone '{backbone.name}': the input of '{pool.name}' is not a [B, H, W, C] map"
            )
        # Name the layer that produces the map (the pooling layer's input).
        history = getattr(feature_map, "_keras_history", None)
        producer = getattr(history, "operation", None)
        self.layer = getattr(producer, "name", None) or f"input of {pool.name}"
        self.grid = (int(feature_map.shape[1]), int(feature_map.shape[2]))
        self._features = keras.Model(backbone.input, [feature_map, backbone.output])
        self._head = self.model.get_layer("head")
        self._image_size = int(self.model.input.shape[1])
        self._inputs = classifier_lib.input_layers(self.model)

    def __call__(self, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Heat maps ``[N, S, S]`` in [0, 1] of ``classes`` for uint8/float ``images``."""
        pixels = _model_pixels(images, self._inputs)
        classes = tf.constant(np.asarray(classes, np.int32))
        with tf.GradientTape() as tape:
            feature_map, features = self._features(pixels, training=False)
            tape.watch(feature_map)
            outputs = self._head(features, training=False)
            if not isinstance(outputs, dict):
                outputs = {"logits": outputs}
            if self.label_space.head == "flat":
                scores = outputs["logits"]
            else:
                probs = self.label_space.probabilities(outputs)
                scores = tf.math.log(tf.maximum(probs, 1e-12))
            # Each image's score depends on its own map only (inference mode),
            # so one gradient of the sum gives every image's gradient.
            score = tf.reduce_sum(tf.gather(scores, classes, axis=1, batch_dims=1))
        grads = tape.gradient(score, feature_map)
        weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1))
        return _to_input_frame(_normalise(cam, self._image_size), images, self._inputs)


@dataclasses.dataclass
class AttentionRollout:
    """Attention rollout of a classifier whose backbone wraps a keras-hub ``ViTBackbone``."""

    model: keras.Model
    grid: tuple[int, int] = (0, 0)
    layer: str = ""

    def __post_init__(self):
        backbone = classifier_lib.get_backbone(self.model)
        vit = _find_vit(backbone)
        if vit is None:
            raise ExplanationUnavailable(f"backbone '{backbone.name}' holds no ViTBackbone")
        try:
            # The tensor that feeds the ViT inside the backbone (after its
            # normalisation); Keras keeps it on the layer's inbound node.
            vit_input = vit._inbound_nodes[0].input_tensors[0]
        except (AttributeError, IndexError) as e:
            raise ExplanationUnavailable(f"cannot locate the input of '{vit.name}': {e}") from e
        self._pre = keras.Model(backbone.input, vit_input)
        self._vit = vit
        self._embed = vit.get_layer("vit_patching_and_embedding")
        self._encoder = vit.get_layer("vit_encoder")
        self.layer = vit.name
        size = int(self.model.input.shape[1])
        patch = vit.patch_size
        patch = patch[0] if isinstance(patch, tuple | list) else int(patch)
        self.grid = (size // patch, size // patch)
        self._image_size = size
        self._checked = False
        self._inputs = classifier_lib.input_layers(self.model)

    def _blocks(self, x: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        encoder = self._encoder
        scores = []
        for block in encoder.encoder_layers:
            y = block.layer_norm_1(x)
            attended, attention = block.mha(y, y, return_attention_scores=True)
            scores.append(attention)
            x = x + attended
            x = x + block.mlp(block.layer_norm_2(x))
        return encoder.layer_norm(x), scores

    def __call__(self, images: np.ndarray, classes: np.ndarray | None = None) -> np.ndarray:
        """Rollout maps ``[N, S, S]`` in [0, 1] (class-agnostic: ``classes`` is ignored)."""
        pixels = _model_pixels(images, self._inputs)
        pre = self._pre(pixels, training=False)
        tokens, scores = self._blocks(self._embed(pre))
        if not self._checked:
            reference = self._vit(pre, training=False)
            error = float(tf.reduce_max(tf.abs(tokens - reference)))
            if not error <= 1e-3 * (1.0 + float(tf.reduce_max(tf.abs(reference)))):
                raise ExplanationUnavailable(
                    f"the re-run ViT blocks differ from '{self._vit.name}' by {error:.3g}: "
                    "keras-hub's ViT layout changed; attention rollout needs updating"
                )
            self._checked = True
        num_tokens = int(scores[0].shape[-1])
        identity = tf.eye(num_tokens, batch_shape=[tf.shape(pixels)[0]])
        rollout = identity
        for attention in scores:
            mixed = 0.5 * tf.reduce_mean(attention, axis=1) + 0.5 * identity
            mixed /= tf.reduce_sum(mixed, axis=-1, keepdims=True)
            rollout = tf.matmul(mixed, rollout)
        h, w = self.grid
        if num_tokens != h * w + 1:
            raise ExplanationUnavailable(
                f"{num_tokens} tokens for a {h}x{w} patch grid plus a class token"
            )
        maps = tf.reshape(rollout[:, 0, 1:], [-1, h, w])
        return _to_input_frame(_normalise(maps, self._image_size), images, self._inputs)


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def make_explainer(model: keras.Model, label_space: LabelSpace) -> GradCam | AttentionRollout:
    """The explanation method that fits ``model``'s backbone.

    Raises:
      ExplanationUnavailable: neither a ViT nor a CNN with global pooling, or a
        fold ensemble.
    """
    if ensemble_lib.is_ensemble(model):
        raise ExplanationUnavailable(
            "a fold ensemble averages several backbones; explain a fold model instead "
            "(evaluate its run directory)"
        )
    backbone = classifier_lib.get_backbone(model)
    if _find_vit(backbone) is not None:
        return AttentionRollout(model)
    return GradCam(model, label_space)


def method_name(explainer: GradCam | AttentionRollout) -> str:
    return "attention rollout" if isinstance(explainer, AttentionRollout) else "Grad-CAM"


class ExampleSampler:
    """Keeps a uniform random sample of correct and wrong predictions per true class.

    Reservoir sampling over the batches of one pass, so only the kept images
    stay in memory.

    Args:
      num_classes: classes of the labels.
      per_cell: images kept per (true class, correct/wrong).
      seed: NumPy seed.
    """

    def __init__(self, num_classes: int, per_cell: int, seed: int = 0, count_marks: bool = True):
        self.count_marks = bool(count_marks)
        #: ``[class, has mark, correct]``: offered images per true class, with or
        #: without a detected mark, classified wrongly or correctly.
        self.mark_counts = np.zeros((num_classes, 2, 2), np.int64)
        self.per_cell = max(int(per_cell), 0)
        self._rng = np.random.default_rng(seed)
        self._seen = np.zeros((num_classes, 2), np.int64)
        self.kept: dict[tuple[int, bool], list[dict]] = {
            (c, ok): [] for c in range(num_classes) for ok in (True, False)
        }

    def offer(
        self,
        images: np.ndarray,
        y_true: np.ndarray,
        y_pred: np.ndarray,
        probs: np.ndarray,
        file_names: np.ndarray,
    ) -> None:
        """Considers every example of one batch (and counts its marks)."""
        if self.count_marks and len(y_true):
            found = marks_lib.has_mark(marks_lib.detect_marks(tf.cast(images, tf.float32)))
            found = found.numpy().astype(np.int64)
            correct = (np.asarray(y_pred) == np.asarray(y_true)).astype(np.int64)
            np.add.at(self.mark_counts, (np.asarray(y_true, np.int64), found, correct), 1)
        if self.per_cell == 0:
            return
        for i in range(len(y_true)):
            key = (int(y_true[i]), bool(y_pred[i] == y_true[i]))
            seen = self._seen[key[0], int(key[1])]
            self._seen[key[0], int(key[1])] += 1
            slot = seen if seen < self.per_cell else int(self._rng.integers(0, seen + 1))
            if slot >= self.per_cell:
                continue
            item = {
                "image": np.array(images[i]),
                "true": int(y_true[i]),
                "pred": int(y_pred[i]),
                "prob": float(probs[i, y_pred[i]]),
                "file_name": _text(file_names[i]),
            }
            kept = self.kept[key]
            if slot < len(kept):
                kept[slot] = item
            else:
                kept.append(item)
