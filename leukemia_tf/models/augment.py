"""Augmentation on the accelerator: image layers, MixUp and CutMix.

The training step calls the augmenter on each batch on the device, after the
CPU input pipeline has produced plain resized uint8/float32 pixels. Everything
here runs inside ``tf.function``, under ``tf.distribute`` strategies and under
XLA (``jit_compile=True``, hence TPU): no op without an XLA kernel is used
(``tf.image.crop_and_resize``, ``ImageProjectiveTransform`` and the gamma
sampler have none, so the crop and the Beta draw are written with
matrix products and normal/uniform draws).

Design decisions:

* A cell has no orientation: flips and rotations by multiples of 90 degrees
  (the eight symmetries of the square) change nothing a hematologist would
  see, and, unlike arbitrary rotations, need no interpolation or fill.
* Colour jitter is small: stains vary between labs, but a cell's colour is
  evidence. One ``magnitude`` in [0, 1] scales all colour factors
  (:func:`color_factors`); 0 is the exact identity.
* Keras' ``RandomSaturation`` is not used: its factor is on a scale where 0.5
  is the identity (0 is greyscale, 1 full saturation) and a single float ``f``
  samples in [0, f], so ``RandomSaturation(0.15)``, read as a +-15 % jitter,
  desaturates every image hard and pushes it far from the data; and with
  ``value_range=(0, 255)`` it clips the HSV saturation to [0, 255] instead of
  [0, 1], so raising the saturation produces negative pixels. :class:`RandomSaturation` here blends with the
  luminance instead.
* With ``training`` False or None the augmenter returns its input unchanged
  (evaluation, inference, export).
* Randomness: the layers draw from Keras ``SeedGenerator`` streams (stateless
  ops, so XLA-friendly). Under ``MirroredStrategy`` every replica holds a copy
  of the same stream, so replicas draw the same sequence of transforms for
  their (different) images; each image still gets a uniformly random
  transform. MixUp/CutMix take an explicit seed (see :func:`sample_beta`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

#: Pixel range of every image here.
VALUE_RANGE = (0.0, 255.0)

# ------------------------------------------------------------ colour factors


def color_factors(magnitude: float) -> dict[str, float]:
    """The colour-jitter strengths for a magnitude in [0, 1].

    Returns:
      ``brightness``: the additive shift is uniform in +-brightness * 255;
      ``contrast``: the contrast factor is uniform in [1 - c, 1 + c];
      ``saturation``: the saturation factor is uniform in [1 - s, 1 + s];
      ``hue``: the hue rotation is uniform in +-hue turns.
      At the default magnitude 0.5: +-12.75 grey levels, x[0.8, 1.2] contrast,
      x[0.75, 1.25] saturation and +-9 degrees of hue.
    """
    magnitude = _check_magnitude(magnitude)
    return {
        "brightness": 0.1 * magnitude,
        "contrast": 0.4 * magnitude,
        "saturation": 0.5 * magnitude,
        "hue": 0.05 * magnitude,
    }


def _check_magnitude(magnitude) -> float:
    magnitude = float(magnitude)
    if not 0.0 <= magnitude <= 1.0:
        raise ValueError(f"augmentation magnitude must be in [0, 1], got {magnitude}")
    return magnitude


# ------------------------------------------------------------ custom layers


def _batch_size(images):
    return keras.ops.shape(images)[0]


@keras.saving.register_keras_serializable(package="leukemia_tf")
class RandomRot90(keras.layers.Layer):
    """Rotates each square image by a random multiple of 90 degrees.

    With ``with_flips=True`` each image also gets mirrored at random: a uniform
    draw from the eight symmetries of the square (the dihedral group), which
    is what flips plus 90-degree rotations give, in one layer.

    Every symmetry is a transpose and/or reversals of the two axes, so the
    layer costs three per-image selections, whatever the draw; pixel values
    are moved, never interpolated.

    Args:
      with_flips: also mirror (all 8 symmetries instead of the 4 rotations).
      seed: integer seed of the layer's random stream.
    """

    def __init__(self, with_flips: bool = False, seed: int | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.with_flips = bool(with_flips)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if input_shape[1] is not None and input_shape[1] != input_shape[2]:
            raise ValueError(f"RandomRot90 needs square images, got shape {input_shape}")

    def call(self, images, training=None):
        if not training:
            return images
        shape = (_batch_size(images), 1, 1, 1)
        if self.with_flips:
            coins = [
                keras.random.randint(shape, 0, 2, seed=self.seed_generator) == 1 for _ in range(3)
            ]
            transpose, flip_rows, flip_cols = coins
        else:
            # np.rot90(x, k) (counter-clockwise): k=1 transpose + reverse rows,
            # k=2 reverse rows and columns, k=3 transpose + reverse columns.
            k = keras.random.randint(shape, 0, 4, seed=self.seed_generator)
            transpose = (k == 1) | (k == 3)
            flip_rows = (k == 1) | (k == 2)
            flip_cols = (k == 2) | (k == 3)
        images = tf.where(transpose, tf.transpose(images, [0, 2, 1, 3]), images)
        images = tf.where(flip_rows, tf.reverse(images, [1]), images)
        return tf.where(flip_cols, tf.reverse(images, [2]), images)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "with_flips": self.with_flips, "seed": self.seed}


def _interpolation_matrix(start, stop, out_size: int, in_size: int):
    """Bilinear weights ``[B, out, in]`` that resample ``[start, stop)`` of an axis.

    ``start``/``stop`` are ``[B]`` fractions of the input axis. Pixel centres
    are at ``(i + 0.5) / size``; samples outside the image take the edge value.
    """
    centres = (tf.range(out_size, dtype=tf.float32) + 0.5) / out_size  # [out]
    u = start[:, None] + centres[None, :] * (stop - start)[:, None]  # [B, out]
    position = tf.clip_by_value(u * in_size - 0.5, 0.0, in_size - 1.0)
    grid = tf.range(in_size, dtype=tf.float32)
    return tf.nn.relu(1.0 - tf.abs(position[:, :, None] - grid[None, None, :]))


def crop_and_resize(images, top, left, crop_h, crop_w):
    """Crops a box per image and resizes it bilinearly to the input size.

    Args:
      images: float32 ``[B, H, W, C]``.
      top, left, crop_h, crop_w: ``[B]`` box coordinates as fractions of the
        image height/width.

    Returns:
      float32 ``[B, H, W, C]``. Sampling uses half-pixel centres like
      ``tf.image.resize``; samples are taken from the whole image, so pixels
      just outside the box contribute at its border.
    """
    height, width = images.shape[1], images.shape[2]
    rows = _interpolation_matrix(top, top + crop_h, height, height)  # [B, H, H]
    cols = _interpolation_matrix(left, left + crop_w, width, width)  # [B, W, W]
    out = tf.einsum("bih,bhwc->biwc", rows, images)
    return tf.einsum("bjw,biwc->bijc", cols, out)


@keras.saving.register_keras_serializable(package="leukemia_tf")
class RandomResizedCrop(keras.layers.Layer):
    """Inception-style random resized crop, same output size as input.

    Each image gets a crop of ``area`` in ``scale`` (fraction of the image) and
    aspect ratio in ``ratio`` (log-uniform), at a uniform position, resized
    back bilinearly. The resize is two small matrix products per image
    (``[S, H] @ image @ [W, S]``), which runs under XLA and on TPU's matrix
    units (``tf.image.crop_and_resize`` has no XLA kernel).

    Args:
      scale: (min, max) area fraction, within (0, 1].
      ratio: (min, max) aspect ratio width / height.
      seed: integer seed.
    """

    def __init__(
        self,
        scale: Sequence[float] = (0.5, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        seed: int | None = None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.scale = _check_range("crop_scale", scale, 0.0, 1.0, allow_low=False)
        self.ratio = _check_range("crop ratio", ratio, 0.0, math.inf, allow_low=False)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        dtype = images.dtype
        images = tf.cast(images, tf.float32)
        batch = _batch_size(images)
        area = keras.random.uniform((batch,), *self.scale, seed=self.seed_generator)
        log_ratio = keras.random.uniform(
            (batch,), math.log(self.ratio[0]), math.log(self.ratio[1]), seed=self.seed_generator
        )
        ratio = tf.exp(log_ratio)
        crop_w = tf.minimum(tf.sqrt(area * ratio), 1.0)
        crop_h = tf.minimum(tf.sqrt(area / ratio), 1.0)
        top = keras.random.uniform((batch,), seed=self.seed_generator) * (1.0 - crop_h)
        left = keras.random.uniform((batch,), seed=self.seed_generator) * (1.0 - crop_w)
        return tf.cast(crop_and_resize(images, top, left, crop_h, crop_w), dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="leukemia_tf")
class RandomSaturation(keras.layers.Layer):
    """Scales the saturation by a factor uniform in [1 - factor, 1 + factor].

    Blends each pixel with its luminance (ITU-R 601 weights), as torchvision's
    ``adjust_saturation`` does: 0 would be greyscale, 1 the identity. Output
    clipped to [0, 255].

    Args:
      factor: maximum relative change of the saturation, in [0, 1].
      seed: integer seed.
    """

    def __init__(self, factor: float, seed: int | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        factor = float(factor)
        if not 0.0 <= factor <= 1.0:
            raise ValueError(f"RandomSaturation: factor must be in [0, 1], got {factor}")
        self.factor = factor
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        scale = keras.random.uniform(
            (_batch_size(images), 1, 1, 1),
            1.0 - self.factor,
            1.0 + self.factor,
            seed=self.seed_generator,
        )
        weights = tf.constant([0.299, 0.587, 0.114], images.dtype)
        gray = tf.reduce_sum(images * weights, axis=-1, keepdims=True)
        out = gray + tf.cast(scale, images.dtype) * (images - gray)
        return tf.clip_by_value(out, *VALUE_RANGE)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "factor": self.factor, "seed": self.seed}


def _check_range(what, value, low, high, *, allow_low=True):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a pair (min, max), got {value!r}") from None
    low_ok = lo >= low if allow_low else lo > low
    if not (low_ok and lo <= hi <= high):
        raise ValueError(f"{what} must satisfy {low} < min <= max <= {high}, got {value!r}")
    return (lo, hi)


def color_layers(magnitude: float, seed: int | None = None) -> list[keras.layers.Layer]:
    """The colour-jitter layers for ``magnitude`` (none at magnitude 0).

    Brightness and contrast are Keras' own layers (their factors mean what
    they say); saturation is :class:`RandomSaturation`; hue is Keras'
    ``RandomHue``, whose factor f draws a rotation of +-U(0, f)/2 turns.
    """
    factors = color_factors(magnitude)
    seeds = _sub_seeds(seed, 4)
    layers = []
    if factors["brightness"] > 0:
        layers.append(
            keras.layers.RandomBrightness(
                factors["brightness"],
                value_range=VALUE_RANGE,
                seed=seeds[0],
                dtype="float32",
                name="brightness",
            )
        )
    if factors["contrast"] > 0:
        layers.append(
            keras.layers.RandomContrast(
                factors["contrast"],
                value_range=VALUE_RANGE,
                seed=seeds[1],
                dtype="float32",
                name="contrast",
            )
        )
    if factors["saturation"] > 0:
        layers.append(RandomSaturation(factors["saturation"], seed=seeds[2], name="saturation"))
    if factors["hue"] > 0:
        layers.append(
            keras.layers.RandomHue(
                (0.0, 2.0 * factors["hue"]),
                value_range=VALUE_RANGE,
                seed=seeds[3],
                dtype="float32",
                name="hue",
            )
        )
    return layers


def _sub_seeds(seed: int | None, count: int) -> list[int | None]:
    # Distinct but reproducible streams per layer.
    if seed is None:
        return [None] * count
    return [int(seed) * 1000 + i for i in range(count)]


# ------------------------------------------------------------------ augmenter


@keras.saving.register_keras_serializable(package="leukemia_tf")
class Augmenter(keras.layers.Layer):
    """Flips, 90-degree rotations, random resized crop, colour jitter, acquisition shifts.

    Build it with :func:`build_augmenter`. Input and output: float32
    ``[B, S, S, 3]`` in [0, 255]. It augments only when called with
    ``training=True``; otherwise (False or None) it returns its input
    unchanged.
    """

    def __init__(
        self,
        image_size: int,
        magnitude: float = 0.5,
        flips: bool = True,
        rot90: bool = True,
        crop_scale: Sequence[float] = (0.5, 1.0),
        color: bool = True,
        shifts: Sequence[str] = (),
        shift_magnitude: float = 0.5,
        shift_probability: float = 1.0,
        marks: bool = False,
        seed: int | None = None,
        **kwargs,
    ):
        # Both import this module.
        from leukemia_tf.models import acquisition, mark_augment

        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.magnitude = _check_magnitude(magnitude)
        self.flips = bool(flips)
        self.rot90 = bool(rot90)
        self.crop_scale = _check_range("crop_scale", crop_scale, 0.0, 1.0, allow_low=False)
        self.color = bool(color)
        self.seed = seed
        seeds = _sub_seeds(seed, 4)
        self.stages: list[keras.layers.Layer] = []
        self.marks = bool(marks)
        if self.marks:
            # First, so that the symmetries and the crop move and scale the drawn marks too.
            self.stages.append(
                mark_augment.build_mark_augmenter(
                    self.image_size, seed=None if seed is None else int(seed) * 1000 + 8
                )
            )
        if self.rot90:
            # Rotations, plus mirror images if flips are on: one layer.
            self.stages.append(RandomRot90(with_flips=self.flips, seed=seeds[1], name="rot90"))
        elif self.flips:
            self.stages.append(
                keras.layers.RandomFlip(
                    "horizontal_and_vertical", seed=seeds[0], dtype="float32", name="flip"
                )
            )
        if self.crop_scale != (1.0, 1.0):
            self.stages.append(
                RandomResizedCrop(scale=self.crop_scale, seed=seeds[2], name="resized_crop")
            )
        if self.color:
            self.stages.extend(color_layers(self.magnitude, seed=seeds[3]))
        self.shifts = acquisition.parse_shifts(list(shifts))
        self.shift_magnitude = float(shift_magnitude)
        self.shift_probability = float(shift_probability)
        if self.shifts and self.shift_magnitude > 0 and self.shift_probability > 0:
            self.stages.append(
                acquisition.AcquisitionShift(
                    self.shifts,
                    self.shift_magnitude,
                    self.shift_probability,
                    seed=None if seed is None else int(seed) * 1000 + 7,
                    name="acquisition_shift",
                )
            )

    def build(self, input_shape):
        if tuple(input_shape[1:]) != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"Augmenter built for [batch, {self.image_size}, {self.image_size}, 3] images, "
                f"got {tuple(input_shape)}"
            )
        for stage in self.stages:
            stage.build(input_shape)

    def call(self, images, training=None):
        if not training:
            return images
        images = tf.cast(images, tf.float32)
        for stage in self.stages:
            images = stage(images, training=True)
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "magnitude": self.magnitude,
            "flips": self.flips,
            "rot90": self.rot90,
            "crop_scale": list(self.crop_scale),
            "color": self.color,
            "shifts": list(self.shifts),
            "shift_magnitude": self.shift_magnitude,
            "shift_probability": self.shift_probability,
            "marks": self.marks,
            "seed": self.seed,
        }


def build_augmenter(
    image_size: int,
    *,
    magnitude: float = 0.5,
    flips: bool = True,
    rot90: bool = True,
    crop_scale: Sequence[float] = (0.5, 1.0),
    color: bool = True,
    shifts: Sequence[str] = (),
    shift_magnitude: float = 0.5,
    shift_probability: float = 1.0,
    marks: bool = False,
    seed: int | None = None,
) -> keras.layers.Layer:
    """Builds the on-device augmentation layer.

    Args:
      image_size: side S of the square input images.
      magnitude: colour-jitter strength in [0, 1] (see :func:`color_factors`);
        0 turns the colour part off exactly.
      flips: random horizontal and vertical flips.
      rot90: random rotations by multiples of 90 degrees.
      crop_scale: (min, max) area fraction of the random resized crop;
        (1, 1) turns it off.
      color: colour jitter (brightness, contrast, saturation, hue).
      shifts: acquisition shifts between laboratories, applied after the
        rest (:data:`leukemia_tf.models.acquisition.SHIFTS`); empty: none.
      shift_magnitude: their strength in [0, 1]; 0 turns them off exactly.
      shift_probability: the share of images they are applied to.
      marks: first draw random burned-in marks (scale bars, text) on half of
        the images (:mod:`leukemia_tf.models.mark_augment`).
      seed: integer seed for reproducible augmentation.

    Returns:
      An :class:`Augmenter`: float32 ``[B, S, S, 3]`` in [0, 255] -> same; the
      identity unless called with ``training=True``.
    """
    return Augmenter(
        image_size,
        magnitude=magnitude,
        flips=flips,
        rot90=rot90,
        crop_scale=crop_scale,
        color=color,
        shifts=shifts,
        shift_magnitude=shift_magnitude,
        shift_probability=shift_probability,
        marks=marks,
        seed=seed,
        name="augmenter",
    )


# ---------------------------------------------------------- MixUp and CutMix

_GAMMA_CANDIDATES = 16


def _seed_tensor(seed) -> tf.Tensor:
    """A shape-[2] int32 seed for stateless ops (drawn at random if None)."""
    if seed is None:
        return tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
    if isinstance(seed, (int, np.integer)):
        return tf.constant([int(seed) % (2**31 - 1), 0], tf.int32)
    seed = tf.convert_to_tensor(seed)
    if seed.shape != (2,) or not seed.dtype.is_integer:
        raise ValueError(f"seed must be an int or an integer tensor of shape [2], got {seed!r}")
    return tf.cast(seed, tf.int32)


def _sample_gamma(alpha: float, n, seed: tf.Tensor) -> tf.Tensor:
    """Gamma(alpha, 1) samples ``[n]``, XLA-compatible.

    Marsaglia & Tsang (2000) with a fixed number of candidates per sample
    instead of a rejection loop (``tf.random.stateless_gamma`` has no XLA
    kernel). Each candidate is accepted with probability > 0.95, so 16 of them
    all fail with probability < 1e-20. For alpha < 1, Gamma(alpha) =
    Gamma(alpha + 1) * U^(1/alpha).
    """
    boosted = alpha < 1.0
    a = alpha + 1.0 if boosted else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    seeds = [tf.random.experimental.stateless_fold_in(seed, i) for i in range(3)]
    x = tf.random.stateless_normal([n, _GAMMA_CANDIDATES], seeds[0])
    u = tf.random.stateless_uniform([n, _GAMMA_CANDIDATES], seeds[1], minval=1e-12, maxval=1.0)
    v = (1.0 + c * x) ** 3
    safe_v = tf.maximum(v, 1e-12)
    accept = (v > 0) & (tf.math.log(u) < 0.5 * x**2 + d - d * safe_v + d * tf.math.log(safe_v))
    first = tf.argmax(tf.cast(accept, tf.int32), axis=1, output_type=tf.int32)
    chosen = tf.gather(safe_v, first, axis=1, batch_dims=1)
    gamma = d * tf.where(tf.reduce_any(accept, axis=1), chosen, 1.0)
    if boosted:
        u2 = tf.random.stateless_uniform([n], seeds[2], minval=1e-12, maxval=1.0)
        gamma *= u2 ** (1.0 / alpha)
    return gamma


def sample_beta(alpha: float, n, seed=None) -> tf.Tensor:
    """``[n]`` samples of Beta(alpha, alpha), XLA-compatible.

    Args:
      alpha: concentration > 0 (MixUp: 0.2-0.4 typical; CutMix: 1.0).
      n: number of samples (int or scalar tensor).
      seed: None (random), an int, or an int tensor of shape [2] (stateless;
        pass e.g. ``[run_seed, step]`` for reproducible runs and on TPU).
    """
    alpha = float(alpha)
    if not alpha > 0:
        raise ValueError(f"mixing alpha must be > 0, got {alpha}")
    seed = _seed_tensor(seed)
    g1 = _sample_gamma(alpha, n, tf.random.experimental.stateless_fold_in(seed, 101))
    g2 = _sample_gamma(alpha, n, tf.random.experimental.stateless_fold_in(seed, 202))
    return g1 / (g1 + g2)


def _mix_targets(targets, weight):
    """``weight * t + (1 - weight) * reversed(t)`` for a tensor or a dict of them."""

    def mix(t, name):
        t = tf.convert_to_tensor(t)
        if t.dtype.is_integer or t.shape.rank != 2:
            raise ValueError(
                f"mixup/cutmix need soft targets [batch, classes] (one-hot labels, or "
                f"level_targets_to_soft(...) per level); got {name} with shape {t.shape} "
                f"and dtype {t.dtype.name}"
            )
        t = tf.cast(t, tf.float32)
        w = weight[:, None]
        return w * t + (1.0 - w) * tf.reverse(t, [0])

    if isinstance(targets, Mapping):
        return {key: mix(value, f"targets['{key}']") for key, value in targets.items()}
    return mix(targets, "targets")


def mixup(images, targets, alpha: float = 0.2, seed=None):
    """MixUp (Zhang et al. 2018) with each example's partner in reversed batch order.

    Every example gets its own lambda ~ Beta(alpha, alpha); images and targets
    (every level of a dict, with the same lambda) are mixed with it. Soft
    targets are mixed as they are, never renormalised: for hierarchical
    targets a level that only one partner reaches keeps that partner's weight
    as the row's mass, so :func:`hierarchical_loss` counts it with that weight
    (see :mod:`leukemia_tf.models.heads`).

    Args:
      images: ``[B, H, W, C]`` float.
      targets: soft ``[B, n]`` or a dict of them.
      alpha: Beta concentration, > 0.
      seed: see :func:`sample_beta`.

    Returns:
      ``(mixed images, mixed targets)``: images in the input dtype, targets
      float32.
    """
    images = tf.convert_to_tensor(images)
    lam = sample_beta(alpha, tf.shape(images)[0], seed)
    w = tf.cast(lam[:, None, None, None], images.dtype)
    mixed = w * images + (1 - w) * tf.reverse(images, [0])
    return mixed, _mix_targets(targets, lam)


def cutmix(images, targets, alpha: float = 1.0, seed=None):
    """CutMix (Yun et al. 2019) with each example's partner in reversed batch order.

    Each example gets lambda ~ Beta(alpha, alpha) and a box of area
    ``1 - lambda`` at a uniform centre (clipped at the border) pasted from its
    partner; targets are mixed with the area actually kept (as in timm).
    Targets as in :func:`mixup`.

    Args:
      images: ``[B, H, W, C]``.
      targets: soft ``[B, n]`` or a dict of them.
      alpha: Beta concentration, > 0.
      seed: see :func:`sample_beta`.

    Returns:
      ``(images with pasted boxes, mixed targets)``.
    """
    images = tf.convert_to_tensor(images)
    seed = _seed_tensor(seed)
    batch = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    if height is None or width is None:
        height, width = tf.shape(images)[1], tf.shape(images)[2]
    lam = sample_beta(alpha, batch, tf.random.experimental.stateless_fold_in(seed, 1))
    centre = tf.random.stateless_uniform(
        [batch, 2], tf.random.experimental.stateless_fold_in(seed, 2)
    )
    side = tf.sqrt(1.0 - lam)
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    y0 = tf.round(tf.clip_by_value(centre[:, 0] - side / 2, 0.0, 1.0) * h)
    y1 = tf.round(tf.clip_by_value(centre[:, 0] + side / 2, 0.0, 1.0) * h)
    x0 = tf.round(tf.clip_by_value(centre[:, 1] - side / 2, 0.0, 1.0) * w)
    x1 = tf.round(tf.clip_by_value(centre[:, 1] + side / 2, 0.0, 1.0) * w)
    rows = tf.range(h)[None, :]
    cols = tf.range(w)[None, :]
    in_rows = (rows >= y0[:, None]) & (rows < y1[:, None])  # [B, H]
    in_cols = (cols >= x0[:, None]) & (cols < x1[:, None])  # [B, W]
    box = in_rows[:, :, None, None] & in_cols[:, None, :, None]  # [B, H, W, 1]
    pasted = tf.where(box, tf.reverse(images, [0]), images)
    kept = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return pasted, _mix_targets(targets, kept)
