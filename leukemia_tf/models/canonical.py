"""Canonical framing: every image framed around its white cell before the backbone.

Laboratories frame single-cell images differently. PBC's crops are 360 px
fields with the white cell in the middle third and red cells around it; other
sets' crops are tight boxes in which the cell fills the frame (BCCD, Raabin-WBC
crops), and their microscopes magnify differently. A model trained on one
framing reads the size of the cell in pixels as a feature (a lymphocyte that
fills the frame looks like a monocyte), and scale augmentation teaches it only
the range of framings it was shown.

:class:`CellCrop` removes the framing instead of learning it: it finds the
stained nucleus near the centre of each image and crops a square around it
whose side is a fixed multiple of the nucleus's extent, resized back to the
input size, so every cell arrives at the model at about the same scale,
whatever the crop, magnification or camera of its laboratory. It is a layer
of the classifier (``--cell_crop``: the last before the backbone, after
``--erase_marks`` and ``--white_balance``), so training, evaluation,
prediction and the exported SavedModel all see the same framing, and it runs
after the augmentation (a zoomed training image is re-framed like any other).

How the nucleus is found, per image, with nothing learnt:

1. Nuclear dye: the red channel's optical density ``OD = -log(I / I0)``
   against the image's own white ``I0`` (the ``white_percentile`` percentile
   of the red channel: the glass between the cells), so it does not depend on
   the lamp, exposure or white balance. The basic dyes that colour nuclei
   absorb red light; the glass and the eosin-stained red cells hardly do.
2. Nucleus: pixels whose nuclear amount exceeds ``threshold`` times the
   image's ``peak_percentile`` percentile of it (a fraction of the image's own
   darkest nucleus, so a paler stain finds the same pixels), weighted by a
   Gaussian centre prior (single-cell sets centre the cell; the prior keeps a
   neighbour cut at the border from pulling the box).
3. Box: the weighted centroid, and a half-side of ``margin`` times the
   radius of a disc with the mask's spread (``sqrt(2 E[r^2])``): the whole
   cell with a rim of its surroundings. The side is clamped to
   ``[min_side, max_side]`` of the image side. A box smaller than the image
   is moved to lie inside it (a crop); a larger one is placed around the
   whole image (a zoom out: a cell that fills a tight crop is shrunk to the
   same framing, on a margin of its own glass colour). An image with no
   nucleus (too few mask pixels) keeps its whole frame.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from leukemia_tf.models.augment import crop_and_resize

#: Name of the :class:`CellCrop` layer of a classifier built with ``cell_crop``.
CELL_CROP_NAME = "cell_crop"


def _percentile(values, q: float):
    """``q`` percentile (0-100) of ``values`` ``[B, N]`` along its last axis: ``[B]``."""
    n = int(values.shape[-1])
    index = int(round((n - 1) * q / 100.0))
    return tf.sort(values, axis=-1)[:, index]


def _white(images, white_percentile: float):
    """Each channel's ``white_percentile`` percentile (the glass): ``[B, 3]``, >= 1."""
    batch, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
    flat = tf.reshape(images, [batch, height * width, 3])
    white = tf.stack([_percentile(flat[..., c], white_percentile) for c in range(3)], axis=-1)
    return tf.maximum(white, 1.0)


def optical_density(images, white):
    """``-log(I / I0)`` per channel against ``white`` ``[B, 3]``: ``[B, H, W, 3]``, >= 0."""
    ratio = (tf.cast(images, tf.float32) + 1.0) / (white[:, None, None, :] + 1.0)
    return -tf.math.log(tf.clip_by_value(ratio, 1e-3, 1.0))


def nuclear_amount(images, white_percentile: float = 98.0):
    """How much nuclear dye each pixel holds: float32 ``[B, H, W]``, >= 0.

    The red channel's optical density minus the blue channel's, against each
    image's own white (the ``white_percentile`` percentile of each channel):
    the basic dyes of a Romanowsky stain (azure B, methylene blue) that colour
    nuclei absorb red light much more than blue, while the glass and the
    eosin-stained red cells pass most of the red, and neutral dark ink (a
    black scale bar or label) absorbs both alike. Measured on PBC and BCCD
    crops, its pixels above half the image's peak are the nucleus (2-7 % of a
    PBC field, 10-30 % of a tight BCCD crop) where the total OD also takes in
    the red cells of the paler stain.
    """
    images = tf.cast(images, tf.float32)
    od = optical_density(images, _white(images, white_percentile))
    return tf.maximum(od[..., 0] - od[..., 2], 0.0)


def cell_boxes(
    images,
    *,
    white_percentile: float = 98.0,
    peak_percentile: float = 99.5,
    threshold: float = 0.5,
    prior_sigma: float = 0.35,
    margin: float = 2.0,
    min_side: float = 0.3,
    max_side: float = 2.0,
    min_pixels: float = 0.002,
):
    """The crop box of each image: ``(top, left, side)``, each ``[B]``, as fractions.

    See the module docstring for the method; ``min_pixels`` is the smallest
    nucleus (fraction of the image's pixels) that moves the box.
    """
    images = tf.cast(images, tf.float32)
    height, width = int(images.shape[1]), int(images.shape[2])
    amount = nuclear_amount(images, white_percentile)  # [B, H, W]
    batch = tf.shape(amount)[0]
    peak = _percentile(tf.reshape(amount, [batch, height * width]), peak_percentile)
    mask = tf.cast(amount > threshold * peak[:, None, None], tf.float32)
    mask *= tf.cast(peak > 0.05, tf.float32)[:, None, None]  # an unstained image: no nucleus
    ys = (tf.range(height, dtype=tf.float32) + 0.5) / height
    xs = (tf.range(width, dtype=tf.float32) + 0.5) / width
    yy, xx = ys[:, None], xs[None, :]
    prior = tf.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / (2.0 * prior_sigma**2))
    weight = mask * prior[None]
    total = tf.reduce_sum(weight, axis=[1, 2])
    safe = tf.maximum(total, 1e-6)
    cy = tf.reduce_sum(weight * yy[None], axis=[1, 2]) / safe
    cx = tf.reduce_sum(weight * xx[None], axis=[1, 2]) / safe
    r2 = (
        tf.reduce_sum(weight * ((yy[None] - cy[:, None, None]) ** 2), axis=[1, 2])
        + tf.reduce_sum(weight * ((xx[None] - cx[:, None, None]) ** 2), axis=[1, 2])
    ) / safe
    radius = tf.sqrt(2.0 * r2)
    side = tf.clip_by_value(2.0 * margin * radius, min_side, max_side)
    found = tf.reduce_sum(mask, axis=[1, 2]) >= min_pixels * height * width
    side = tf.where(found, side, tf.ones_like(side))
    cy = tf.where(found, cy, 0.5 * tf.ones_like(cy))
    cx = tf.where(found, cx, 0.5 * tf.ones_like(cx))
    # A box inside the image when it is smaller (a crop), around the whole
    # image when it is larger (a zoom out): never part image, part padding on
    # one side only because the cell sits off-centre.
    low, high = tf.minimum(0.0, 1.0 - side), tf.maximum(0.0, 1.0 - side)
    top = tf.clip_by_value(cy - side / 2.0, low, high)
    left = tf.clip_by_value(cx - side / 2.0, low, high)
    return top, left, side


def _inside(start, side, size: int):
    """``[B, size]`` weight in [0, 1] of each output sample lying inside the source image."""
    centres = (tf.range(size, dtype=tf.float32) + 0.5) / size
    u = start[:, None] + centres[None, :] * side[:, None]  # source position, fraction
    # 1 from half a source pixel inside the edge, 0 from half a pixel outside
    return tf.clip_by_value(tf.minimum(u, 1.0 - u) * size + 0.5, 0.0, 1.0)


def frame(images, top, left, side, white_percentile: float = 98.0):
    """Resamples each image's square box to the full size; outside the image: the glass.

    The glass is the image's own white (each channel's ``white_percentile``
    percentile), so a zoomed-out cell sits on its own background, not on a
    smear of the edge pixels.
    """
    images = tf.cast(images, tf.float32)
    height, width = int(images.shape[1]), int(images.shape[2])
    resampled = crop_and_resize(images, top, left, side, side)
    glass = _white(images, white_percentile)
    inside = (
        _inside(top, side, height)[:, :, None, None] * _inside(left, side, width)[:, None, :, None]
    )
    return inside * resampled + (1.0 - inside) * glass[:, None, None, :]


@keras.saving.register_keras_serializable(package="leukemia_tf")
class CellCrop(keras.layers.Layer):
    """Frames each image as a square around its white cell (see the module docstring).

    Input and output: float32 ``[B, S, S, 3]`` in [0, 255]; the arguments are
    those of :func:`cell_boxes`. Deterministic, no weights, the same in
    training and inference.
    """

    def __init__(
        self,
        margin: float = 2.0,
        threshold: float = 0.5,
        prior_sigma: float = 0.35,
        min_side: float = 0.3,
        max_side: float = 2.0,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.margin = float(margin)
        self.threshold = float(threshold)
        self.prior_sigma = float(prior_sigma)
        self.min_side = float(min_side)
        self.max_side = float(max_side)

    def boxes(self, images):
        """``(top, left, side)`` of each image's crop, fractions of the side."""
        return cell_boxes(
            images,
            margin=self.margin,
            threshold=self.threshold,
            prior_sigma=self.prior_sigma,
            min_side=self.min_side,
            max_side=self.max_side,
        )

    def call(self, images):
        images = tf.cast(images, tf.float32)
        top, left, side = self.boxes(images)
        return frame(images, top, left, side)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            margin=self.margin,
            threshold=self.threshold,
            prior_sigma=self.prior_sigma,
            min_side=self.min_side,
            max_side=self.max_side,
        )
        return config


def boxes_numpy(images: np.ndarray, **kwargs) -> np.ndarray:
    """:func:`cell_boxes` for a numpy batch: ``[N, 3]`` (top, left, side)."""
    top, left, side = cell_boxes(tf.constant(images, tf.float32), **kwargs)
    return np.stack([top.numpy(), left.numpy(), side.numpy()], axis=-1)


#: Name of the :class:`WhiteBalance` layer of a classifier built with ``white_balance``.
WHITE_BALANCE_NAME = "white_balance"


def white_balance(images, white_percentile: float = 98.0):
    """Scales each channel so that the image's own white (the glass) is 255.

    The white of a channel is its ``white_percentile`` percentile: the lamp,
    exposure and camera white balance of a laboratory become one neutral
    white, and the colours of the cells are read against it.
    """
    images = tf.cast(images, tf.float32)
    gain = 255.0 / _white(images, white_percentile)
    return tf.clip_by_value(images * gain[:, None, None, :], 0.0, 255.0)


#: Name of the :class:`StainNormalize` layer of a classifier built with ``stain_norm``.
STAIN_NORM_NAME = "stain_norm"

#: The nuclear peak (:func:`stain_peak`) every image is scaled to: the median
#: over 200 PBC images (25 per class, May-Grunwald-Giemsa, 112 px) was 0.87,
#: so those stay nearly as they are.
REFERENCE_PEAK = 0.87


def stain_peak(images, white_percentile: float = 98.0, peak_percentile: float = 99.5):
    """How strongly each image is stained: the ``peak_percentile`` of its nuclear amount, ``[B]``."""
    amount = nuclear_amount(images, white_percentile)
    batch, height, width = tf.shape(amount)[0], amount.shape[1], amount.shape[2]
    return _percentile(tf.reshape(amount, [batch, height * width]), peak_percentile)


def stain_normalize(
    images,
    reference: float = REFERENCE_PEAK,
    max_gain: float = 4.0,
    white_percentile: float = 98.0,
):
    """Scales each image's stain to the same strength; its white and hues are kept.

    The optical density against the image's own white is multiplied by
    ``reference / stain_peak`` (clipped to ``[1 / max_gain, max_gain]``) and
    turned back into intensities against that white: a paler or shorter
    stain (another laboratory's dye batch, staining time or thinner smear)
    reaches the model as dark as the reference, every dye by the same factor,
    and the glass stays as it was.
    """
    images = tf.cast(images, tf.float32)
    white = _white(images, white_percentile)
    od = optical_density(images, white)
    amount = tf.maximum(od[..., 0] - od[..., 2], 0.0)  # nuclear_amount, this white
    batch, height, width = tf.shape(amount)[0], amount.shape[1], amount.shape[2]
    peak = _percentile(tf.reshape(amount, [batch, height * width]), 99.5)
    gain = tf.clip_by_value(reference / tf.maximum(peak, 1e-3), 1.0 / max_gain, max_gain)
    out = (white[:, None, None, :] + 1.0) * tf.exp(-od * gain[:, None, None, None]) - 1.0
    # Pixels brighter than the white (clipped to OD 0 above) keep their value.
    out = tf.where(images > white[:, None, None, :], images, out)
    return tf.clip_by_value(out, 0.0, 255.0)


@keras.saving.register_keras_serializable(package="leukemia_tf")
class StainNormalize(keras.layers.Layer):
    """:func:`stain_normalize` as a layer (``--stain_norm``): float32 ``[B, S, S, 3]``."""

    def __init__(self, reference: float = REFERENCE_PEAK, max_gain: float = 4.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.reference = float(reference)
        self.max_gain = float(max_gain)

    def call(self, images):
        return stain_normalize(images, self.reference, self.max_gain)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(reference=self.reference, max_gain=self.max_gain)
        return config


@keras.saving.register_keras_serializable(package="leukemia_tf")
class WhiteBalance(keras.layers.Layer):
    """:func:`white_balance` as a layer (``--white_balance``): float32 ``[B, S, S, 3]``."""

    def __init__(self, white_percentile: float = 98.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.white_percentile = float(white_percentile)

    def call(self, images):
        return white_balance(images, self.white_percentile)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(white_percentile=self.white_percentile)
        return config


def uncrop(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Maps ``[N, S, S]`` drawn on each image's framing, put back on the image's own frame.

    ``boxes``: ``[N, 3]`` (top, left, side) from :func:`boxes_numpy`; the map
    is resampled through the inverse box (0 where the image lay outside the
    crop; the padding of a zoomed-out frame is dropped).
    """
    maps = tf.constant(np.asarray(maps, np.float32))[..., None]
    boxes = tf.constant(np.asarray(boxes, np.float32))
    top, left, side = boxes[:, 0], boxes[:, 1], boxes[:, 2]
    inv_side = 1.0 / side
    inv_top, inv_left = -top * inv_side, -left * inv_side
    height, width = int(maps.shape[1]), int(maps.shape[2])
    resampled = crop_and_resize(maps, inv_top, inv_left, inv_side, inv_side)
    inside = (
        _inside(inv_top, inv_side, height)[:, :, None, None]
        * _inside(inv_left, inv_side, width)[:, None, :, None]
    )
    return (inside * resampled).numpy()[..., 0]
