"""Burned-in marks (scale bars, text, arrows, rulers): detection in TensorFlow ops.

Many microscope images carry a mark the camera software drew into the pixels:
a scale bar with its length as text ("200 pix", "10 µm"), in black on a white
box or in red, usually in a corner. Where the share of images with a mark, or
its style, differs between classes, a model can learn the mark instead of the
cell (a shortcut). :func:`detect_marks` finds such marks so that they can be
erased (``leukemia_tf.models.mark_augment.EraseMarks``) and so that the heat
of an explanation map on them can be measured.

A mark is drawn in colours a stained smear never has, with edges no optics
blur:

* **ink**: a pixel that is dark grey/black (brightest channel below
  ``dark_max``, channels within ``grey_chroma`` of each other: stained nuclei
  are dark *purple*, never grey), saturated red (red above green by
  ``red_excess`` and above blue by ``red_over_blue``) or saturated green, and that sits on a sharp edge (the luminance
  in its 3x3 neighbourhood spans more than ``edge_min``: drawn strokes jump
  from ink to white within a pixel, out-of-focus debris does not);
* **text-like spread**: ink pixels in at least ``spread_border`` distinct
  columns within a ``window``-pixel wide band of 5 rows (or the same with
  rows and columns swapped): letters and bars spread along a line, a dust
  speck does not. Away from the border band (outer ``border`` of each side)
  a mark is sought only where ``spread_interior`` is above 0 (then it is the
  spread needed there): the default 0 looks in the border band only, since
  the dark granules of basophils (PBC) are as black, sharp and spread as
  text;
* **region**: the ink within ``reach`` pixels of such text-like ink (here
  with the looser ``weak_*`` thresholds, which catch the anti-aliased rims,
  the faint ends of a bar and red drawn over a bluish cell, which turns
  magenta), plus the
  near-white pixels (a label box) within ``box_reach`` pixels of it, dilated
  by one pixel.

Every window is given for a 224-pixel side and scaled with the image's
shorter side. All ops are convolutions, poolings and element-wise ops on a
float32 ``[B, H, W, 3]`` batch, so the detector runs inside a Keras model,
under XLA and in an exported SavedModel.

The thresholds were set on the Taleqani ALL images: they flag the scale bars
of that set (black text on a white box, red text, large black "200 pix"
bars) and leave the cells, red cells and background of it and of the PBC
images alone; see ``tools/count_marks.py``. A model sees its images resized
(112-160 px for the CPU recipes), where thin strokes blur into grey: the dark
and edge thresholds are loose enough for that. Measured on 12 images per
Taleqani class (every 40th), 80 PBC and 70 BCCD images, resized: every
Taleqani class flagged at 100 % at 224 and 144 px (92-100 % at 112 px, 83-100 %
at 96 px), PBC 0-2 %, BCCD 0 %.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

#: The side, in pixels, that the window sizes of :class:`MarkParams` refer to.
REFERENCE_SIDE = 224


@dataclasses.dataclass(frozen=True)
class MarkParams:
    """Thresholds of :func:`detect_marks` (colours in [0, 255], sizes at a 224-pixel side)."""

    dark_max: float = 140.0
    grey_chroma: float = 45.0
    red_excess: float = 60.0
    red_min: float = 100.0
    red_over_blue: float = 20.0
    red_green_max: float = 255.0
    green_excess: float = 60.0
    edge_min: float = 30.0
    window: int = 31
    spread_border: int = 6
    spread_interior: int = 0
    border: float = 0.2
    reach: int = 12
    weak_dark_max: float = 150.0
    weak_grey_chroma: float = 60.0
    weak_red_excess: float = 35.0
    weak_red_over_blue: float = -15.0
    weak_red_green_max: float = 110.0
    weak_edge_min: float = 20.0
    box_reach: int = 4
    white_min: float = 240.0


DEFAULT_PARAMS = MarkParams()


def _scaled(pixels: int, side: int, minimum: int = 1) -> int:
    return max(minimum, int(round(pixels * side / REFERENCE_SIDE)))


def _dilate(mask: tf.Tensor, radius: int) -> tf.Tensor:
    """Max over a ``(2 radius + 1)`` square of a float ``[B, H, W, 1]`` mask."""
    if radius <= 0:
        return mask
    size = 2 * radius + 1
    return tf.nn.max_pool2d(mask, ksize=(size, size), strides=1, padding="SAME")


def _box_sum(x: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Sum over a ``height x width`` window (zero outside the image) of ``[B, H, W, C]``."""
    channels = x.shape[-1]
    if height > 1:
        x = tf.nn.depthwise_conv2d(
            x, tf.ones((height, 1, channels, 1), x.dtype), (1, 1, 1, 1), "SAME"
        )
    if width > 1:
        x = tf.nn.depthwise_conv2d(
            x, tf.ones((1, width, channels, 1), x.dtype), (1, 1, 1, 1), "SAME"
        )
    return x


def ink_pixels(
    images: tf.Tensor, params: MarkParams = DEFAULT_PARAMS, weak: bool = False
) -> tf.Tensor:
    """Pixels of drawn ink: synthetic colour on a sharp edge, float ``[B, H, W, 1]`` in {0, 1}.

    ``weak=True`` uses the looser ``weak_*`` thresholds (for growing a found mark).
    """
    if weak:
        params = dataclasses.replace(
            params,
            dark_max=params.weak_dark_max,
            grey_chroma=params.weak_grey_chroma,
            red_excess=params.weak_red_excess,
            red_over_blue=params.weak_red_over_blue,
            red_green_max=params.weak_red_green_max,
            green_excess=params.weak_red_excess,
            edge_min=params.weak_edge_min,
        )
    x = tf.cast(images, tf.float32)
    r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
    brightest = tf.reduce_max(x, axis=-1, keepdims=True)
    darkest = tf.reduce_min(x, axis=-1, keepdims=True)
    dark = (brightest < params.dark_max) & (brightest - darkest < params.grey_chroma)
    red = (
        (r - g > params.red_excess)
        & (r - b > params.red_over_blue)
        & (r > params.red_min)
        & (g < params.red_green_max)
    )
    green = g - tf.maximum(r, b) > params.green_excess
    luminance = tf.reduce_mean(x, axis=-1, keepdims=True)
    local_max = tf.nn.max_pool2d(luminance, 3, 1, "SAME")
    local_min = -tf.nn.max_pool2d(-luminance, 3, 1, "SAME")
    sharp = local_max - local_min > params.edge_min
    return tf.cast((dark | red | green) & sharp, tf.float32)


def detect_marks(images: tf.Tensor, params: MarkParams = DEFAULT_PARAMS) -> tf.Tensor:
    """The pixels of burned-in marks.

    Args:
      images: ``[B, H, W, 3]`` in [0, 255] (any real or integer dtype), with
        static ``H`` and ``W``.
      params: thresholds (see the module docstring).

    Returns:
      float32 ``[B, H, W, 1]``: 1 on mark pixels, 0 elsewhere. An image
      without a mark gives all zeros.
    """
    height, width = int(images.shape[1]), int(images.shape[2])
    side = min(height, width)
    ink = ink_pixels(images, params)
    window = _scaled(params.window, side, 3)
    band = _scaled(5, side, 1)
    # Distinct ink columns within a 5-row x `window`-column band (and rows x columns).
    columns = tf.nn.max_pool2d(ink, (band, 1), 1, "SAME")
    rows = tf.nn.max_pool2d(ink, (1, band), 1, "SAME")
    spread = tf.maximum(_box_sum(columns, 1, window), _box_sum(rows, window, 1))
    edge_rows = tf.range(height, dtype=tf.float32)
    edge_cols = tf.range(width, dtype=tf.float32)
    near_row = tf.minimum(edge_rows, height - 1 - edge_rows) < params.border * height
    near_col = tf.minimum(edge_cols, width - 1 - edge_cols) < params.border * width
    in_border = near_row[:, None] | near_col[None, :]  # [H, W]
    interior = (
        float(_scaled(params.spread_interior, side, 3))
        if params.spread_interior > 0
        else float(window + 1)  # more than a window holds: never
    )
    need = tf.where(in_border, float(_scaled(params.spread_border, side, 2)), interior)
    need = need[None, :, :, None]
    seed = ink * tf.cast(spread >= need, tf.float32)
    weak_ink = ink_pixels(images, params, weak=True)
    core = tf.maximum(seed, weak_ink * _dilate(seed, _scaled(params.reach, side)))
    white = tf.cast(tf.reduce_min(tf.cast(images, tf.float32), -1, keepdims=True), tf.float32)
    box = tf.cast(white >= params.white_min, tf.float32) * _dilate(
        core, _scaled(params.box_reach, side)
    )
    return _dilate(tf.maximum(core, box), 1)


def has_mark(mask: tf.Tensor) -> tf.Tensor:
    """bool ``[B]``: whether each image's mask (``[B, H, W, 1]``) has a mark pixel."""
    return tf.reduce_max(mask, axis=[1, 2, 3]) > 0


def border_band(height: int, width: int, fraction: float = 0.1) -> np.ndarray:
    """bool ``[H, W]``: the outer ``fraction`` of each side (the border band)."""
    rows = np.arange(height)
    cols = np.arange(width)
    near_row = np.minimum(rows, height - 1 - rows) < fraction * height
    near_col = np.minimum(cols, width - 1 - cols) < fraction * width
    return near_row[:, None] | near_col[None, :]


def heat_fractions(
    heat: np.ndarray, marks: np.ndarray, border_fraction: float = 0.1
) -> dict[str, np.ndarray]:
    """The share of each map's heat on mark pixels and on the border band.

    Args:
      heat: ``[N, H, W]`` explanation maps; negative values count as 0.
      marks: ``[N, H, W]`` (or ``[N, H, W, 1]``) mark masks, non-zero on marks.
      border_fraction: width of the border band as a fraction of each side.

    Returns:
      ``on_marks``, ``on_border`` (``[N]`` in [0, 1]; 0 for a map without heat)
      and ``mark_area`` (``[N]``, the marks' share of the image area).
    """
    heat = np.clip(np.asarray(heat, np.float64), 0.0, None)
    marks = np.asarray(marks)
    if marks.ndim == 4:
        marks = marks[..., 0]
    marks = marks > 0
    if heat.shape != marks.shape:
        raise ValueError(f"heat {heat.shape} and marks {marks.shape} differ in shape")
    border = border_band(heat.shape[1], heat.shape[2], border_fraction)
    total = heat.sum(axis=(1, 2))
    safe = np.where(total > 0, total, 1.0)
    return {
        "on_marks": np.where(total > 0, (heat * marks).sum(axis=(1, 2)) / safe, 0.0),
        "on_border": np.where(total > 0, (heat * border).sum(axis=(1, 2)) / safe, 0.0),
        "mark_area": marks.mean(axis=(1, 2)),
    }


def _read_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def count_marks(
    image_files: Sequence[str | os.PathLike], params: MarkParams = DEFAULT_PARAMS
) -> list[bool]:
    """Whether each image file carries a detected mark (at its own size).

    Files are read 64 at a time; images of one size among them are detected together.

    Returns:
      One bool per file, in order.
    """
    flags = []
    for start in range(0, len(image_files), 64):
        chunk = [_read_rgb(os.fspath(path)) for path in image_files[start : start + 64]]
        found = [False] * len(chunk)
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(chunk):
            by_shape.setdefault(image.shape, []).append(i)
        for indices in by_shape.values():
            batch = tf.constant(np.stack([chunk[i] for i in indices]).astype(np.float32))
            for i, flag in zip(indices, has_mark(detect_marks(batch, params)).numpy(), strict=True):
                found[i] = bool(flag)
        flags += found
    return flags
