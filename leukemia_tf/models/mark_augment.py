"""Burned-in marks in the model: erase them (:class:`EraseMarks`) or draw random ones.

* :class:`EraseMarks` is the classifier's first layer with ``--erase_marks``:
  it fills the pixels of detected marks (:func:`leukemia_tf.data.marks.detect_marks`,
  dilated) with the local background, so training, evaluation, prediction and
  the exported SavedModel all see the images without their scale bars. On an
  image without a detected mark it returns the input bit for bit.
* :class:`RandomMarks` (``--augment_marks``) draws synthetic marks (a white
  label box with dark text-like strokes, a dark bar, red strokes) at a random
  corner of a random share of the training images, labels unchanged, so that
  a model learns to ignore marks, including styles it has never seen. It is
  the identity unless called with ``training=True``, and at probability 0.

Both are written in XLA-friendly TensorFlow ops; :class:`RandomMarks` draws
from a Keras ``SeedGenerator`` like the layers of :mod:`leukemia_tf.models.augment`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from leukemia_tf.data import marks as marks_lib


@keras.saving.register_keras_serializable(package="leukemia_tf")
class EraseMarks(keras.layers.Layer):
    """Fills detected burned-in marks with the local background colour.

    The fill of a mark pixel is the mean of the unmarked pixels in a
    ``window`` x ``window`` square around it (scaled like the detector's
    windows), or of the whole image's unmarked pixels where that square holds
    none. Pixels outside the (dilated) mask are passed through unchanged, so an
    image without a mark is returned exactly.

    Args:
      dilation: pixels by which the detected mask is grown before filling.
      window: side of the averaging square at a 224-pixel image side.
    """

    def __init__(self, dilation: int = 2, window: int = 31, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.dilation = int(dilation)
        self.window = int(window)

    def mask(self, images):
        """The filled pixels: float32 ``[B, H, W, 1]`` in {0, 1}."""
        return marks_lib._dilate(marks_lib.detect_marks(images), self.dilation)

    def call(self, images):
        images = tf.cast(images, tf.float32)
        mask = self.mask(images)
        keep = 1.0 - mask
        side = min(int(images.shape[1]), int(images.shape[2]))
        window = marks_lib._scaled(self.window, side, 3) | 1
        local_sum = marks_lib._box_sum(images * keep, window, window)
        local_count = marks_lib._box_sum(keep, window, window)
        global_mean = tf.math.divide_no_nan(
            tf.reduce_sum(images * keep, axis=[1, 2], keepdims=True),
            tf.reduce_sum(keep, axis=[1, 2], keepdims=True),
        )
        fill = tf.where(local_count > 0.5, local_sum / tf.maximum(local_count, 1.0), global_mean)
        return tf.where(mask > 0, fill, images)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "dilation": self.dilation, "window": self.window}


def _corner_boxes(batch, height, width, seed_generator, min_size, max_size):
    """Random boxes ``[B]`` (top, left, h, w in pixels, float) touching a random corner zone."""
    size = keras.random.uniform((batch, 2), min_size, max_size, seed=seed_generator)
    box_h = tf.round(size[:, 0] * height * 0.5)
    box_w = tf.round(size[:, 1] * width)
    margin = keras.random.uniform((batch, 2), 0.0, 0.04, seed=seed_generator)
    corner = keras.random.randint((batch, 2), 0, 2, seed=seed_generator)
    corner = tf.cast(corner, tf.float32)
    top_gap = tf.round(margin[:, 0] * height)
    left_gap = tf.round(margin[:, 1] * width)
    top = corner[:, 0] * (height - box_h - top_gap) + (1.0 - corner[:, 0]) * top_gap
    left = corner[:, 1] * (width - box_w - left_gap) + (1.0 - corner[:, 1]) * left_gap
    return top, left, box_h, box_w


def _inside(top, left, box_h, box_w, height, width):
    """float ``[B, H, W, 1]``: 1 inside each image's box."""
    rows = tf.range(height, dtype=tf.float32)[None, :, None, None]
    cols = tf.range(width, dtype=tf.float32)[None, None, :, None]
    t, l_ = top[:, None, None, None], left[:, None, None, None]
    h, w = box_h[:, None, None, None], box_w[:, None, None, None]
    return tf.cast((rows >= t) & (rows < t + h) & (cols >= l_) & (cols < l_ + w), tf.float32)


@keras.saving.register_keras_serializable(package="leukemia_tf")
class RandomMarks(keras.layers.Layer):
    """Draws a random synthetic burned-in mark on a random share of the images.

    Each chosen image gets one mark at a random corner: a label box of a
    random size (2-8 % of the height by 12-35 % of the width at the defaults)
    whose style is drawn per image from

    * a white box with dark "text": vertical strokes at a random pitch, like
      letters, over a dark baseline bar;
    * a dark scale bar (a thick horizontal line with end ticks) and no box;
    * red text-like strokes and bar, no box (the colour of some scale bars).

    Stroke pitch, thickness and ink colour are random, so the marks are
    never the same. Labels are unchanged. The identity with ``training``
    False or None, and at ``probability`` 0.

    Args:
      probability: share of the images that get a mark.
      min_size, max_size: range of the box's size as a fraction of the image
        width (and twice that of the height).
      seed: integer seed of the layer's random stream.
    """

    def __init__(
        self,
        probability: float = 0.5,
        min_size: float = 0.12,
        max_size: float = 0.35,
        seed: int | None = None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        if not 0.0 < min_size <= max_size <= 1.0:
            raise ValueError(f"need 0 < min_size <= max_size <= 1, got {min_size}, {max_size}")
        self.probability = float(probability)
        self.min_size = float(min_size)
        self.max_size = float(max_size)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training or self.probability == 0.0:
            return images
        images = tf.cast(images, tf.float32)
        height, width = int(images.shape[1]), int(images.shape[2])
        batch = tf.shape(images)[0]
        gen = self.seed_generator
        chosen = keras.random.uniform((batch,), 0.0, 1.0, seed=gen) < self.probability
        style = keras.random.randint((batch,), 0, 3, seed=gen)  # 0 box+text, 1 bar, 2 red
        top, left, box_h, box_w = _corner_boxes(
            batch, height, width, gen, self.min_size, self.max_size
        )
        box_h = tf.maximum(box_h, 4.0)
        box = _inside(top, left, box_h, box_w, height, width)
        rows = tf.range(height, dtype=tf.float32)[None, :, None, None]
        cols = tf.range(width, dtype=tf.float32)[None, None, :, None]
        t, l_ = top[:, None, None, None], left[:, None, None, None]
        h, w = box_h[:, None, None, None], box_w[:, None, None, None]
        # Text: vertical strokes at a random pitch (2-4 px) over the upper part
        # of the box, with gaps every few strokes (words).
        pitch = tf.cast(keras.random.randint((batch, 1, 1, 1), 2, 5, seed=gen), tf.float32)
        phase = tf.math.floormod(cols - l_, pitch)
        word = tf.math.floormod(tf.floor((cols - l_) / (3.0 * pitch)), 4.0) < 3.0
        text_rows = (rows >= t + 0.15 * h) & (rows < t + 0.6 * h)
        text_cols = (cols >= l_ + 0.1 * w) & (cols < l_ + 0.9 * w)
        text = text_rows & text_cols & (phase < 1.0) & word
        # Bar: a thick line in the lower part with ticks at both ends.
        thick = tf.maximum(1.0, tf.round(0.12 * h))
        bar_rows = (rows >= t + 0.75 * h - thick) & (rows < t + 0.75 * h)
        bar = bar_rows & text_cols
        ticks = (
            (rows >= t + 0.5 * h)
            & (rows < t + 0.85 * h)
            & ((tf.abs(cols - (l_ + 0.1 * w)) < 1.0) | (tf.abs(cols - (l_ + 0.9 * w - 1.0)) < 1.0))
        )
        ink = tf.cast(text | bar | ticks, tf.float32) * box
        dark = keras.random.uniform((batch, 1, 1, 1), 0.0, 60.0, seed=gen)
        red = tf.concat(
            [
                keras.random.uniform((batch, 1, 1, 1), 180.0, 255.0, seed=gen),
                keras.random.uniform((batch, 1, 1, 2), 0.0, 60.0, seed=gen),
            ],
            axis=-1,
        )
        style = tf.reshape(style, (-1, 1, 1, 1))
        ink_colour = tf.where(style == 2, red, tf.concat([dark, dark, dark], -1))
        white = tf.cast(style == 0, tf.float32) * box
        out = images * (1.0 - white) + 255.0 * white
        out = out * (1.0 - ink) + ink_colour * ink
        return tf.where(tf.reshape(chosen, (-1, 1, 1, 1)), out, images)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "probability": self.probability,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "seed": self.seed,
        }


def build_mark_augmenter(
    image_size: int, seed: int | None = None, probability: float = 0.5
) -> RandomMarks:
    """The ``--augment_marks`` layer for square ``image_size`` images (see :class:`RandomMarks`).

    Call it on the training batch before (or as the first step of) the
    training augmenter, with ``training=True``; its ``variables`` (the seed
    state) belong to the run's random state like the augmenter's.
    """
    del image_size  # the layer reads the size from its input; kept for a uniform signature
    return RandomMarks(probability=probability, seed=seed, name="mark_augmenter")
