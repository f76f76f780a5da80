"""Pure image maps: the one decode-and-resize of training, evaluation and serving.

:func:`decode_and_resize` turns the encoded bytes of one image (JPEG, PNG,
BMP or GIF, any size) into a ``uint8 [S, S, 3]`` tensor. The input pipeline
calls it, and the serving signature calls :func:`decode_and_resize_checked`,
the same decode and resize after the checks that the data set builders make
on every file (:mod:`leukemia_tf.data.images`), so a served model sees
exactly the pixels it was trained and evaluated on, and refuses the files
that a build refuses, with the same reasons.

Resize policy (measured in ``BENCHMARKS.md``, "Input pipeline"):

* Nearly square images are centre-cropped to a square, every other image
  keeps its aspect ratio. Single-cell crops are square or nearly (Taleqani
  224x224, PBC 363x360, AML-Cytomorphology 400x400, C-NMC 450x450): an
  image whose long side exceeds its short side by at most 1/16 loses at
  most 3 % at each edge, which is background around a centred cell, and a
  crop is cheaper than padding (no mean colour, no concatenation). Any
  longer image (a 4:3 smear field, ALL-IDB1) has its long side scaled to
  ``S`` and its short side padded, centred, with the image's own mean
  colour: stretching would change cell morphology (nucleus shape and the
  nucleus-to-cytoplasm ratio are diagnostic), and differently for every
  source's aspect ratio; a crop would cut cells off the field. The mean
  colour is close to the smear background, which covers most of a field,
  so the pad is not an out-of-distribution black frame.
* Downscaling by 2x or more uses area averaging
  (``tf.image.resize(method="area")``, a box filter, so it is antialiased):
  on the real PBC and AML-Cytomorphology images it is closer to a Lanczos
  reference than antialiased bilinear (a triangle filter, which blurs
  more) at 34-43 % of its cost. Below a 2x reduction, plain bilinear
  sampling is as close to the reference (PBC 363x360 to 224: 0.38 grey
  levels of mean difference against area's 0.40) and cheaper; beyond it,
  bilinear aliases (1.8x the error at 3.2x). Upscaling (a source smaller
  than ``S``) is bilinear too; antialiased bicubic is closest but costs
  3-4x. An image already at the fitted size is not resampled. Measured in
  ``BENCHMARKS.md``, "Input pipeline" (version 2 of this policy; version 1
  padded every non-square image and used area for every reduction).
* Fused JPEG decode: a JPEG whose long side is at least ``2 * S`` is decoded
  with libjpeg's DCT-domain downscaling (``decode_jpeg(ratio=2|4|8)``, the
  largest ratio that keeps the decoded long side >= ``2 * S``), then resized
  the same way. It saves 29-42 % of the CPU time per image on the real
  images (2.2x the throughput on 1440x1080 fields) and stays within a grey
  level on average of the full decode (99th percentile of the difference
  <= 8 grey levels); the 2x margin keeps the DCT scaling's own artefacts
  small (with no margin: 1.5-4x the difference for a few % more saving).
  The output geometry is computed from the original size, so both paths
  give the same shape and placement.
* JPEGs are decoded with ``dct_method="INTEGER_ACCURATE"`` so the pixels do
  not depend on the platform's libjpeg default; the result is rounded to
  uint8 so the input pipeline caches it compactly.

Every function here is deterministic and works eagerly and inside a graph.
"""

from __future__ import annotations

import tensorflow as tf

from leukemia_tf.data import images

#: Bumped whenever decode_and_resize's output changes (it names file caches).
PREPROCESSING_VERSION = 2

#: libjpeg IDCT used for every JPEG (explicit: the default is platform-specific).
JPEG_DCT_METHOD = "INTEGER_ACCURATE"

#: DCT-domain downscaling factors libjpeg supports in ``tf.io.decode_jpeg``.
JPEG_RATIOS = (1, 2, 4, 8)

#: A JPEG is DCT-downscaled only while its decoded long side stays >= this
#: many times the target size.
JPEG_RATIO_MARGIN = 2

#: An image whose long side exceeds its short side by at most 1/16 of the
#: short side is centre-cropped to a square (at most 3 % cut at each edge).
CROP_MAX_EXCESS = 16


def check_image_size(image_size: int) -> int:
    """Returns ``image_size`` or raises ``ValueError`` naming the bad value."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def fit_size(height: tf.Tensor, width: tf.Tensor, image_size: int) -> tf.Tensor:
    """The ``[h, w]`` an image of ``height x width`` is resized to before padding.

    The long side becomes ``image_size``; the short side keeps the aspect
    ratio (rounded half up, at least 1).

    Args:
      height: int scalar, the source height.
      width: int scalar, the source width.
      image_size: the target square side ``S``.

    Returns:
      int32 ``[2]``.
    """
    hw = tf.cast(tf.stack([height, width]), tf.int64)
    longest = tf.maximum(tf.reduce_max(hw), 1)
    # Integer arithmetic: the same sizes on every platform, no float rounding.
    fitted = tf.maximum((hw * image_size + longest // 2) // longest, 1)
    return tf.cast(fitted, tf.int32)


def jpeg_ratio_index(height: tf.Tensor, width: tf.Tensor, image_size: int) -> tf.Tensor:
    """Index into :data:`JPEG_RATIOS` of the DCT downscaling used for a JPEG.

    The largest ratio whose decoded long side stays >= ``JPEG_RATIO_MARGIN * S``.

    Args:
      height: int scalar, the JPEG's height.
      width: int scalar, the JPEG's width.
      image_size: the target square side ``S``.

    Returns:
      int32 scalar.
    """
    longest = tf.cast(tf.maximum(height, width), tf.int64)
    needed = JPEG_RATIO_MARGIN * image_size
    # libjpeg rounds a scaled side up: ceil(n / r) >= m  iff  n > (m - 1) * r.
    # The thresholds increase with the ratio, so the index is how many pass.
    thresholds = tf.constant([(needed - 1) * r for r in JPEG_RATIOS[1:]], tf.int64)
    return tf.reduce_sum(tf.cast(longest > thresholds, tf.int32))


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes one encoded image (JPEG, PNG, BMP, first GIF frame) at full size.

    Args:
      encoded: scalar ``tf.string``.

    Returns:
      ``uint8 [H, W, 3]``.
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: _decode_jpeg(encoded),
        lambda: tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False),
    )


def _decode_jpeg(encoded: tf.Tensor, ratio: int = 1) -> tf.Tensor:
    # `ratio` is an op attribute: one static decode op per ratio.
    return tf.io.decode_jpeg(encoded, channels=3, ratio=ratio, dct_method=JPEG_DCT_METHOD)


def _jpeg_probe(encoded: tf.Tensor) -> tf.Tensor:
    """:func:`leukemia_tf.data.images.jpeg_probe` in the graph: padding before the final EOI."""
    eoi = b"\xff\xd9"
    ends_with_eoi = tf.equal(tf.strings.substr(encoded, -2, 2), eoi)
    body = tf.where(
        ends_with_eoi, tf.strings.substr(encoded, 0, tf.strings.length(encoded) - 2), encoded
    )
    return tf.strings.join([body, images.JPEG_PROBE_PADDING, eoi])


def _decode_scaled(
    encoded: tf.Tensor, image_size: int, check_cut_short: bool = False
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Decodes with DCT downscaling when the image is large.

    Returns ``(image, source [h, w], cut_short)``; ``cut_short`` is a bool
    scalar, always False unless ``check_cut_short`` (JPEG only: see
    :func:`leukemia_tf.data.images.jpeg_is_cut_short`; it costs a second decode
    at the same scale).
    """

    def jpeg() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        source_hw = tf.image.extract_jpeg_shape(encoded)[:2]
        index = jpeg_ratio_index(source_hw[0], source_hw[1], image_size)

        def branch(ratio: int) -> tuple[tf.Tensor, tf.Tensor]:
            image = _decode_jpeg(encoded, ratio)
            if not check_cut_short:
                return image, tf.constant(False)
            # Same header, so the same shape: the pixels compare directly.
            probe = _decode_jpeg(_jpeg_probe(encoded), ratio)
            return image, tf.logical_not(tf.reduce_all(tf.equal(image, probe)))

        image, cut_short = tf.switch_case(index, [lambda r=r: branch(r) for r in JPEG_RATIOS])
        return image, source_hw, cut_short

    def other() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
        return image, tf.shape(image)[:2], tf.constant(False)

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def header_size(encoded: tf.Tensor) -> tf.Tensor:
    """``int64 [2]`` ``[width, height]`` that an encoded image's header claims.

    The graph version of :func:`leukemia_tf.data.images.header_size`: JPEG
    through ``tf.image.extract_jpeg_shape`` (which reads the header only),
    PNG (IHDR), GIF (logical screen) and BMP (info header) from their bytes.
    Nothing is decoded.

    Args:
      encoded: scalar ``tf.string``.

    Returns:
      ``[width, height]``; ``[0, 0]`` for another format.

    Raises:
      tf.errors.InvalidArgumentError: (at run time) a JPEG whose header
        cannot be parsed.
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    # The first 32 bytes as integers (zero-padded: a short file reads zeros).
    head = tf.strings.substr(tf.strings.join([encoded, b"\0" * 32]), 0, 32)
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)

    def big_endian(offset: int, size: int) -> tf.Tensor:
        return sum(b[offset + k] * 256 ** (size - 1 - k) for k in range(size))

    def little_endian(offset: int, size: int) -> tf.Tensor:
        return sum(b[offset + k] * 256**k for k in range(size))

    def signed32(offset: int) -> tf.Tensor:
        value = little_endian(offset, 4)
        return tf.abs(tf.where(value >= 2**31, value - 2**32, value))

    def starts_with(magic: bytes) -> tf.Tensor:
        return tf.equal(tf.strings.substr(encoded, 0, len(magic)), magic)

    png = tf.logical_and(
        starts_with(b"\x89PNG\r\n\x1a\n"), tf.equal(tf.strings.substr(encoded, 12, 4), b"IHDR")
    )
    bmp = tf.logical_and(starts_with(b"BM"), tf.strings.length(encoded) >= 26)
    bmp_core = tf.equal(little_endian(14, 4), 12)  # OS/2 header: 16-bit sizes
    size = tf.zeros([2], tf.int64)
    size = tf.where(png, tf.stack([big_endian(16, 4), big_endian(20, 4)]), size)
    size = tf.where(
        tf.logical_and(starts_with(b"GIF8"), tf.strings.length(encoded) >= 10),
        tf.stack([little_endian(6, 2), little_endian(8, 2)]),
        size,
    )
    size = tf.where(
        bmp,
        tf.where(
            bmp_core,
            tf.stack([little_endian(18, 2), little_endian(20, 2)]),
            tf.stack([signed32(18), signed32(22)]),
        ),
        size,
    )
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.cast(tf.image.extract_jpeg_shape(encoded)[1::-1], tf.int64),
        lambda: size,
    )


def too_large_reason(size: tf.Tensor) -> tf.Tensor:
    """:func:`leukemia_tf.data.images.too_large_reason` in the graph, or ``""`` within the limit.

    Args:
      size: ``int64 [2]``, ``[width, height]`` (:func:`header_size`).

    Returns:
      A ``tf.string`` scalar.
    """
    # uint64: a PNG's sizes are 32-bit each, so their product can pass int64's range.
    size = tf.cast(size, tf.uint64)
    width, height = size[0], size[1]
    pixels = width * height
    message = tf.strings.join(
        [
            "image too large: ",
            tf.strings.as_string(width),
            " x ",
            tf.strings.as_string(height),
            " = ",
            tf.strings.as_string(pixels),
            f" pixels, over the limit of {images.MAX_IMAGE_PIXELS} pixels",
        ]
    )
    return tf.where(pixels > images.MAX_IMAGE_PIXELS, message, "")


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    # Area and bilinear resizing give convex combinations of the input, so
    # the values stay in [0, 255]: rounding half up needs no clipping.
    return tf.cast(image + 0.5, tf.uint8)


def _pad_to_square(fitted: tf.Tensor, target: tf.Tensor, image_size: int) -> tf.Tensor:
    """Centres ``fitted`` (``target`` = its [h, w]) on an S x S canvas of its mean colour."""
    # The mean colour: an area resize to 1x1 averages every pixel, and is far
    # cheaper than reduce_mean over the two outer axes.
    fill = _to_uint8(tf.image.resize(fitted, [1, 1], method="area"))
    top = (image_size - target[0]) // 2
    left = (image_size - target[1]) // 2
    bottom = image_size - target[0] - top
    right = image_size - target[1] - left
    # Bands of the fill colour, concatenated: broadcasting a [3] colour
    # (tf.where, or pad-and-add) costs more than the resize itself.
    out = tf.concat(
        [tf.tile(fill, [top, target[1], 1]), fitted, tf.tile(fill, [bottom, target[1], 1])],
        axis=0,
    )
    return tf.concat(
        [tf.tile(fill, [image_size, left, 1]), out, tf.tile(fill, [image_size, right, 1])],
        axis=1,
    )


def crop_box(height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """The centre crop ``[top, left, side_h, side_w]`` applied before resizing.

    A nearly square image (long side at most ``1 + 1/CROP_MAX_EXCESS`` times
    the short side) is cropped, centred, to a square of its short side; any
    other image is kept whole (``[0, 0, height, width]``).

    Args:
      height: int scalar, the image height.
      width: int scalar, the image width.

    Returns:
      int32 ``[4]``.
    """
    hw = tf.cast(tf.stack([height, width]), tf.int32)
    return _centre_box(hw, _near_square(hw))


def _near_square(hw: tf.Tensor) -> tf.Tensor:
    """Whether an image of int32 ``[h, w]`` is centre-cropped (see :func:`crop_box`)."""
    short = tf.reduce_min(hw)
    return (tf.reduce_max(hw) - short) * CROP_MAX_EXCESS <= short


def _centre_box(hw: tf.Tensor, crop: tf.Tensor) -> tf.Tensor:
    """``[top, left, side_h, side_w]``: the centred square of ``hw``'s short side if ``crop``."""
    short = tf.reduce_min(hw)
    side = tf.where(crop, tf.stack([short, short]), hw)
    return tf.concat([(hw - side) // 2, side], axis=0)


def _fit_and_pad(image: tf.Tensor, source_hw: tf.Tensor, image_size: int) -> tf.Tensor:
    """Crops, resizes and pads a decoded image (of an original ``source_hw``) to S x S."""
    # The crop is decided on the original size and taken on the decoded
    # image, which is smaller after a DCT-downscaled decode.
    source_hw = tf.cast(source_hw, tf.int32)
    crop = _near_square(source_hw)
    source_box = _centre_box(source_hw, crop)
    box = _centre_box(tf.shape(image)[:2], crop)
    image = image[box[0] : box[0] + box[2], box[1] : box[1] + box[3]]
    target = fit_size(source_box[2], source_box[3], image_size)
    # 0: already at the fitted size; 1: shrink by 2x or more (area);
    # 2: grow, or shrink by less than 2x (bilinear). tf.data runs
    # conditionals as dataflow: every node of an untaken branch is still
    # visited, so the branches are kept small and the padding is its own
    # conditional.
    shape = box[2:]
    unchanged = tf.reduce_all(tf.equal(shape, target))
    area = tf.reduce_any(shape >= 2 * target)
    index = tf.where(unchanged, 0, tf.where(area, 1, 2))
    fitted = tf.switch_case(
        index,
        [
            lambda: tf.identity(image),
            lambda: _to_uint8(tf.image.resize(image, target, method="area")),
            lambda: _to_uint8(tf.image.resize(image, target, method="bilinear")),
        ],
    )
    square = tf.reduce_all(tf.equal(target, image_size))
    return tf.cond(
        square, lambda: tf.identity(fitted), lambda: _pad_to_square(fitted, target, image_size)
    )


def resize_and_pad(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resizes ``uint8 [H, W, 3]`` to ``uint8 [S, S, 3]``: centre crop or aspect kept and pad.

    See the module docstring for the policy. An image already ``S x S`` is
    returned unchanged.

    Args:
      image: ``uint8 [H, W, 3]``.
      image_size: the target square side ``S``.

    Returns:
      ``uint8 [S, S, 3]``.
    """
    image_size = check_image_size(image_size)
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise ValueError(f"resize_and_pad expects a uint8 image, got {image.dtype.name}")
    out = _fit_and_pad(image, tf.shape(image)[:2], image_size)
    return tf.ensure_shape(out, [image_size, image_size, 3])


def decode_and_resize(encoded: tf.Tensor, image_size: int, *, fused: bool = True) -> tf.Tensor:
    """Decodes encoded image bytes and resizes them to ``uint8 [S, S, 3]``.

    The single decode-and-resize of training, evaluation and the serving
    signature. See the module docstring for the resize policy.

    Args:
      encoded: scalar ``tf.string``: JPEG, PNG, BMP or GIF bytes, any size.
      image_size: the target square side ``S``.
      fused: decode large JPEGs with DCT-domain downscaling (the default
        everywhere). ``False`` decodes at full size first; it exists to
        measure and test the fused path against.

    Returns:
      ``uint8 [S, S, 3]``.
    """
    image_size = check_image_size(image_size)
    encoded = tf.convert_to_tensor(encoded, tf.string)
    if fused:
        image, source_hw, _ = _decode_scaled(encoded, image_size)
    else:
        image = decode_image(encoded)
        source_hw = tf.shape(image)[:2]
    out = _fit_and_pad(image, source_hw, image_size)
    return tf.ensure_shape(out, [image_size, image_size, 3])


def decode_and_resize_checked(encoded: tf.Tensor, image_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """:func:`decode_and_resize` for bytes from outside (serving), after the builders' checks.

    An image over :data:`leukemia_tf.data.images.MAX_IMAGE_PIXELS` by its
    header is refused without being decoded, and a JPEG cut short behind an
    end-of-image marker is refused after decoding (a second decode of the
    same JPEG, see :func:`leukemia_tf.data.images.jpeg_is_cut_short`). A refused
    image comes back as zeros with the reason; bytes that cannot be decoded
    at all still fail with the decoder's error.

    libjpeg prints its first warning of each decode to stderr, and the probe
    decode of every good JPEG has one: "Corrupt JPEG data: 256 extraneous
    bytes before marker 0xd9" (the padding it skipped; the number is the
    padding's length or a few bytes less). That line is expected and says
    nothing about the request; a cut-short JPEG prints "premature end of data
    segment" and is refused.

    Args:
      encoded: scalar ``tf.string``: JPEG, PNG, BMP or GIF bytes.
      image_size: the target square side ``S``.

    Returns:
      ``(image, problem)``: ``uint8 [S, S, 3]`` and a ``tf.string`` scalar,
      ``""`` for a good image, else the reason (the text of
      :func:`leukemia_tf.data.images.too_large_reason` or
      :data:`leukemia_tf.data.images.JPEG_CUT_SHORT`).
    """
    image_size = check_image_size(image_size)
    encoded = tf.convert_to_tensor(encoded, tf.string)
    blank = tf.zeros([image_size, image_size, 3], tf.uint8)
    too_large = too_large_reason(header_size(encoded))

    def decode() -> tuple[tf.Tensor, tf.Tensor]:
        image, source_hw, cut_short = _decode_scaled(encoded, image_size, check_cut_short=True)
        out = _fit_and_pad(image, source_hw, image_size)
        return out, tf.where(cut_short, images.JPEG_CUT_SHORT, "")

    out, problem = tf.cond(tf.equal(too_large, ""), decode, lambda: (blank, too_large))
    return tf.ensure_shape(out, [image_size, image_size, 3]), problem


def decode_example(example: dict, image_size: int, *, fused: bool = True) -> dict:
    """Dict map: replaces ``example["image"]`` (encoded bytes) by its decoded, resized pixels.

    Args:
      example: a dict with a scalar ``tf.string`` ``"image"``.
      image_size: the target square side.
      fused: see :func:`decode_and_resize`.

    Returns:
      A new dict; every other key passes through unchanged.
    """
    out = dict(example)
    out["image"] = decode_and_resize(example["image"], image_size, fused=fused)
    return out
