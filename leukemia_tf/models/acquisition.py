"""Augmentations that model what differs between laboratories.

A model trained on one laboratory's smears meets another laboratory's
stain batch, microscope, camera and crop: the same cells in other colours,
sharpness, noise, compression and magnification. Each layer here models one
of those differences, is the exact identity at magnitude 0, and runs on the
accelerator inside the training step (float32 ``[B, S, S, 3]`` in [0, 255];
XLA-compatible except :class:`RandomJpeg`, which the configuration refuses
under ``--xla``). The physical order of the effects is the order of
:data:`SHIFTS`: the specimen's stain, the optics (magnification, focus), the
illumination, the camera (white balance, gamma, noise, compression).

* ``stain``: Romanowsky stains (May-Grunwald-Giemsa, Wright, Giemsa) are two
  dyes, an acidic one (eosin: red cells, granules) and basic ones (azure B /
  methylene blue: nuclei, basophilic cytoplasm). By Beer-Lambert the optical
  density ``OD = -log(I / I0)`` of a pixel is a sum of the two dyes' colour
  vectors weighted by their amounts. The layer writes each pixel's OD in the
  basis of the two dye vectors (plus their cross product for what they do
  not explain), scales and shifts each dye's amount, and turns each dye's
  vector a little: the stain batch, staining time and dye hue of another
  laboratory. Unstained glass (OD 0) stays white. The reference vectors
  (:data:`ROMANOWSKY_OD`) were estimated with Macenko's method on PBC images
  (May-Grunwald-Giemsa); the H&E matrices of histopathology do not apply.
* ``illumination``: exposure, white balance (one gain per channel) and an
  uneven field (a linear ramp of the lamp's intensity across the image).
* ``gamma``: the camera's tone curve, ``255 (I / 255) ** gamma``.
* ``blur``: defocus and lower optical resolution, a Gaussian of random width
  (the two 1-D passes are band matrices applied with matrix products).
* ``noise``: sensor noise, Gaussian, of random strength per image.
* ``jpeg``: re-compression at a random quality (half the images).
* ``scale``: magnification and crop: single-cell crops of other sets are
  tighter or looser around the cell than the training crops; the image is
  zoomed around a point near its centre by a log-uniform factor.

:func:`shift_factors` gives every strength at a magnitude in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from leukemia_tf.models.augment import VALUE_RANGE, crop_and_resize

#: The shifts, in the order they are applied.
SHIFTS = ("stain", "scale", "blur", "illumination", "gamma", "noise", "jpeg")

#: Optical-density colour vectors (R, G, B; unit length) of the two dye
#: groups of a Romanowsky stain, estimated with Macenko's method (1st/99th
#: angle percentiles in the plane of the two main OD directions) on 60
#: random PBC images: the azure / methylene-blue (nuclear) and eosin vectors.
ROMANOWSKY_OD = np.array(
    [
        [0.318, 0.597, 0.736],  # azure B / methylene blue: nuclei
        [0.480, 0.856, 0.192],  # eosin Y: red cells, granules
    ],
    dtype=np.float32,
)

_OD_EPS = 1.0  # I0 = 256: OD = -log((I + 1) / 256), 0 for white.


def shift_factors(magnitude: float) -> dict[str, float]:
    """Strength of every shift at ``magnitude`` in [0, 1] (0: identity).

    Returns a dict:
      ``stain_amount``: each dye's amount is scaled by exp(U(-a, a));
      ``stain_shift``: and shifted by U(-b, b) OD units (on stained pixels);
      ``stain_hue``: each dye vector is moved by N(0, h) and renormalised;
      ``exposure``: the intensity is scaled by exp(U(-e, e));
      ``white_balance``: each channel by a further exp(U(-w, w));
      ``vignette``: a linear ramp of relative amplitude U(-v, v) across the image;
      ``gamma``: gamma = exp(U(-g, g));
      ``blur``: the Gaussian sigma is U(0, b) times the image side;
      ``noise``: the noise standard deviation is U(0, n) x 255;
      ``jpeg_quality``: the lowest JPEG quality (100 - 70 m);
      ``zoom_in`` / ``zoom_out``: zoom factors log-uniform in [1 / (1 + o), 1 + i];
      ``zoom_shift``: the zoom centre moves by up to this fraction of the side.
      At magnitude 0.5: dye amounts x[0.82, 1.22], exposure x[0.86, 1.16],
      white balance x[0.89, 1.13], gamma [0.82, 1.22], blur sigma up to 2 % of
      the side (3.2 px at 160 px: an objective or camera with 2-3 times less
      detail, or a crop up-sampled from a smaller field), noise up to 5 grey
      levels, JPEG quality 65-100, zoom x[0.89, 1.75].
    """
    m = float(magnitude)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"shift magnitude must be in [0, 1], got {magnitude}")
    return {
        "stain_amount": 0.4 * m,
        "stain_shift": 0.1 * m,
        "stain_hue": 0.1 * m,
        "exposure": 0.3 * m,
        "white_balance": 0.25 * m,
        "vignette": 0.2 * m,
        "gamma": 0.4 * m,
        "blur": 0.04 * m,
        "noise": 0.04 * m,
        "jpeg_quality": 100.0 - 70.0 * m,
        "zoom_in": 1.5 * m,
        "zoom_out": 0.25 * m,
        "zoom_shift": 0.1 * m,
    }


def parse_shifts(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"stain,blur"`` (or a list; ``"all"``; empty: none) -> the shifts in :data:`SHIFTS` order."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    else:
        items = [str(v).strip() for v in value]
    if items == ["all"]:
        return SHIFTS
    unknown = sorted(set(items) - set(SHIFTS))
    if unknown:
        raise ValueError(
            f"unknown acquisition shift(s) {', '.join(unknown)}; known: {', '.join(SHIFTS)}, all"
        )
    return tuple(s for s in SHIFTS if s in items)


# ------------------------------------------------------------ the operations
# Pure functions of the images and the random draws, so that tests can set
# the draws; the layers draw them.


def to_od(images):
    """Pixels in [0, 255] -> optical density, 0 for white, >= 0."""
    return -tf.math.log((images + _OD_EPS) / (VALUE_RANGE[1] + _OD_EPS))


def from_od(od):
    """Optical density -> pixels in [0, 255] (the inverse of :func:`to_od`)."""
    return tf.clip_by_value(
        tf.exp(-od) * (VALUE_RANGE[1] + _OD_EPS) - _OD_EPS, VALUE_RANGE[0], VALUE_RANGE[1]
    )


def _stain_basis(vectors):
    """``[..., 2, 3]`` dye vectors -> ``[..., 3, 3]`` basis (dyes + their cross product)."""
    vectors = vectors / tf.norm(vectors, axis=-1, keepdims=True)
    third = tf.linalg.cross(vectors[..., 0, :], vectors[..., 1, :])
    third = third / tf.norm(third, axis=-1, keepdims=True)
    return tf.concat([vectors, third[..., None, :]], axis=-2)


def stain_jitter(images, amount_scale, amount_shift, vector_noise):
    """Changes the amount and hue of the two Romanowsky dyes of each image.

    Args:
      images: float32 ``[B, H, W, 3]`` in [0, 255].
      amount_scale: ``[B, 2]`` factor on each dye's amount (1: unchanged).
      amount_shift: ``[B, 2]`` OD added to each dye's amount on stained
        pixels (weighted by how stained the pixel is, so glass stays white).
      vector_noise: ``[B, 2, 3]`` added to each dye's unit OD vector.

    Returns:
      ``[B, H, W, 3]``; the identity for scale 1, shift 0, noise 0 (up to
      float rounding).
    """
    reference = tf.constant(ROMANOWSKY_OD)
    basis = _stain_basis(reference)  # [3, 3], rows: dye vectors
    inverse = tf.linalg.inv(basis)
    od = to_od(images)
    amounts = tf.einsum("bhwc,cd->bhwd", od, inverse)  # od = amounts @ basis
    # How stained a pixel is: its total OD against a strongly stained pixel's.
    stained = tf.clip_by_value(tf.reduce_sum(od, axis=-1, keepdims=True) / 1.5, 0.0, 1.0)
    dyes = amounts[..., :2] * amount_scale[:, None, None, :] + (
        stained * amount_shift[:, None, None, :]
    )
    amounts = tf.concat([dyes, amounts[..., 2:]], axis=-1)
    new_vectors = reference[None] + vector_noise
    new_basis = _stain_basis(new_vectors)  # [B, 3, 3]
    new_od = tf.einsum("bhwd,bdc->bhwc", amounts, new_basis)
    return from_od(tf.maximum(new_od, 0.0))


def illumination(images, gains, ramp):
    """Exposure x white balance (``gains [B, 3]``) x an uneven field.

    ``ramp``: ``[B, 3]`` = (amplitude, direction cos, direction sin): the
    intensity is scaled by ``1 + amplitude * t`` where ``t`` in [-1, 1] runs
    across the image along the direction.
    """
    size_h, size_w = images.shape[1], images.shape[2]
    ys = tf.linspace(-1.0, 1.0, size_h)[None, :, None]
    xs = tf.linspace(-1.0, 1.0, size_w)[None, None, :]
    amplitude, cos, sin = (tf.reshape(ramp[:, i], [-1, 1, 1]) for i in range(3))
    field = 1.0 + amplitude * (cos * xs + sin * ys) / math.sqrt(2.0)  # [B, H, W]
    out = images * gains[:, None, None, :] * field[..., None]
    return tf.clip_by_value(out, *VALUE_RANGE)


def gamma_curve(images, gamma):
    """``255 (I / 255) ** gamma`` per image (``gamma [B]``); 0 and 255 stay."""
    scale = VALUE_RANGE[1]
    unit = tf.clip_by_value(images / scale, 0.0, 1.0)
    return scale * tf.pow(unit, gamma[:, None, None, None])


def _gaussian_matrix(sigma, size: int):
    """``[B, size, size]`` row-normalised Gaussian band matrices (edges replicated)."""
    grid = tf.range(size, dtype=tf.float32)
    distance = grid[:, None] - grid[None, :]  # [out, in]
    sigma = tf.maximum(sigma, 1e-3)[:, None, None]
    weights = tf.exp(-0.5 * tf.square(distance[None] / sigma))
    # A negligible sigma gives the identity matrix exactly.
    weights = tf.where(weights < 1e-12, 0.0, weights)
    return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)


def gaussian_blur(images, sigma):
    """Blurs each image with a Gaussian of ``sigma [B]`` pixels (0: unchanged).

    The normalisation is per output pixel, so a constant image stays constant
    and the border is not darkened.
    """
    rows = _gaussian_matrix(sigma, images.shape[1])
    cols = _gaussian_matrix(sigma, images.shape[2])
    out = tf.einsum("bih,bhwc->biwc", rows, images)
    out = tf.einsum("bjw,biwc->bijc", cols, out)
    # sigma == 0 exactly: return the input bit for bit.
    return tf.where(sigma[:, None, None, None] > 0, out, images)


def add_noise(images, noise):
    """Adds ``noise`` (``[B, H, W, 3]`` grey levels) and clips to [0, 255]."""
    return tf.clip_by_value(images + noise, *VALUE_RANGE)


def zoom(images, factor, centre):
    """Zooms each image by ``factor [B]`` (> 1: magnify) around ``centre [B, 2]``.

    ``centre`` is (row, column) as fractions of the side. Outside the image
    (``factor < 1``) the edge pixels are repeated.
    """
    side = 1.0 / factor
    top = centre[:, 0] - side / 2
    left = centre[:, 1] - side / 2
    out = crop_and_resize(images, top, left, side, side)
    same = tf.abs(factor - 1.0) < 1e-6
    return tf.where(same[:, None, None, None], images, out)


def jpeg(images, quality, apply):
    """Re-encodes the images with ``apply [B]`` True at ``quality [B]`` (int32)."""

    def one(args):
        image, q, on = args
        encoded = tf.image.adjust_jpeg_quality(tf.cast(tf.round(image), tf.uint8), q)
        return tf.where(on, tf.cast(encoded, tf.float32), image)

    return tf.map_fn(
        one,
        (images, quality, apply),
        fn_output_signature=tf.TensorSpec(images.shape[1:], tf.float32),
    )


# ----------------------------------------------------------------- the layer


@keras.saving.register_keras_serializable(package="leukemia_tf")
class AcquisitionShift(keras.layers.Layer):
    """Applies the chosen :data:`SHIFTS` with random strengths, per image.

    Args:
      shifts: names from :data:`SHIFTS` (any order; applied in that order).
      magnitude: strength in [0, 1] (:func:`shift_factors`); 0: identity.
      probability: the share of images that are shifted (each image drawn
        independently); the others pass unchanged, so the model keeps seeing
        its own laboratory's images as they are.
      seed: integer seed of the layer's random stream.

    Input and output: float32 ``[B, S, S, 3]`` in [0, 255]; the identity
    unless called with ``training=True``.
    """

    def __init__(
        self,
        shifts: Sequence[str] = SHIFTS,
        magnitude: float = 0.5,
        probability: float = 1.0,
        seed: int | None = None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not 0.0 <= float(probability) <= 1.0:
            raise ValueError(f"shift probability must be in [0, 1], got {probability}")
        self.probability = float(probability)
        self.shifts = parse_shifts(list(shifts))
        self.factors = shift_factors(magnitude)
        self.magnitude = float(magnitude)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _uniform(self, shape, bound):
        return keras.random.uniform(shape, -bound, bound, seed=self.seed_generator)

    def call(self, images, training=None):
        if not training or self.magnitude == 0.0 or not self.shifts or self.probability == 0.0:
            return images
        dtype = images.dtype
        images = tf.cast(images, tf.float32)
        original = images
        f = self.factors
        batch = tf.shape(images)[0]
        side = float(images.shape[1])
        for shift in self.shifts:
            if shift == "stain":
                images = stain_jitter(
                    images,
                    tf.exp(self._uniform((batch, 2), f["stain_amount"])),
                    self._uniform((batch, 2), f["stain_shift"]),
                    f["stain_hue"] * keras.random.normal((batch, 2, 3), seed=self.seed_generator),
                )
            elif shift == "scale":
                low, high = -math.log1p(f["zoom_out"]), math.log1p(f["zoom_in"])
                factor = tf.exp(keras.random.uniform((batch,), low, high, seed=self.seed_generator))
                centre = 0.5 + self._uniform((batch, 2), f["zoom_shift"])
                images = zoom(images, factor, centre)
            elif shift == "blur":
                sigma = keras.random.uniform(
                    (batch,), 0.0, f["blur"] * side, seed=self.seed_generator
                )
                images = gaussian_blur(images, sigma)
            elif shift == "illumination":
                exposure = self._uniform((batch, 1), f["exposure"])
                balance = self._uniform((batch, 3), f["white_balance"])
                angle = keras.random.uniform((batch,), 0.0, 2 * math.pi, seed=self.seed_generator)
                ramp = tf.stack(
                    [self._uniform((batch,), f["vignette"]), tf.cos(angle), tf.sin(angle)], axis=1
                )
                images = illumination(images, tf.exp(exposure + balance), ramp)
            elif shift == "gamma":
                images = gamma_curve(images, tf.exp(self._uniform((batch,), f["gamma"])))
            elif shift == "noise":
                std = keras.random.uniform(
                    (batch, 1, 1, 1), 0.0, f["noise"] * VALUE_RANGE[1], seed=self.seed_generator
                )
                noise = std * keras.random.normal(tf.shape(images), seed=self.seed_generator)
                images = add_noise(images, noise)
            elif shift == "jpeg":
                quality = keras.random.randint(
                    (batch,), int(round(f["jpeg_quality"])), 101, seed=self.seed_generator
                )
                apply = keras.random.uniform((batch,), seed=self.seed_generator) < 0.5
                images = jpeg(images, tf.cast(quality, tf.int32), apply)
        if self.probability < 1.0:
            chosen = keras.random.uniform((batch,), seed=self.seed_generator) < self.probability
            images = tf.where(chosen[:, None, None, None], images, original)
        return tf.cast(images, dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "shifts": list(self.shifts),
            "magnitude": self.magnitude,
            "probability": self.probability,
            "seed": self.seed,
        }
