"""Reading image files robustly for the data set builders.

Every builder stores each image "as stored" when TensorFlow can decode the
bytes to exactly what the file shows (8-bit RGB JPEG, PNG and BMP). Any other
file (TIFF, CMYK JPEG, 16-bit PNG/TIFF, grayscale, palette, RGBA, an
EXIF-rotated photo) is converted to 8-bit RGB and re-encoded losslessly as
PNG. A file that cannot be read at all (empty, truncated, not an image)
raises :class:`BadImageError` naming the path and the reason, so that a
build can report every bad file at once instead of dying on the first one.

Two kinds of bad file that a decoder alone lets through are refused too, with
the same reasons as the serving signature
(:func:`leukemia_tf.data.preprocessing.decode_and_resize_checked`):

* too large: more than :data:`MAX_IMAGE_PIXELS` pixels by the file's header,
  refused before any pixel is decoded (a few hundred bytes can claim
  65000 x 65000 and make a decoder allocate gigabytes);
* a JPEG cut short behind an end-of-image marker: libjpeg (in Pillow and in
  TensorFlow alike) only warns "Corrupt JPEG data: premature end of data
  segment" and fills the missing part with grey. See :func:`jpeg_is_cut_short`.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must fail, never be padded with grey. (Pillow reads the
# flag from ImageFile; it is False by default, this keeps it so.)
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: The largest image read, in pixels (width x height): 50 megapixels, e.g.
#: 8660 x 5773. Ten times the largest microscope field among the supported
#: sets (ALL-IDB1, 2592 x 1944), and far below Pillow's decompression-bomb
#: limits (``Image.MAX_IMAGE_PIXELS``: a warning above 89 Mpx, an error above
#: 179 Mpx) and TensorFlow's JPEG decoder's (2**29 bytes of output, 179 Mpx
#: RGB). Checked on the header before decoding, here and in the serving
#: signature, so every path refuses the same files with the same reason.
MAX_IMAGE_PIXELS = 50_000_000

#: The reason given for a JPEG whose compressed data stops short of its last
#: block (libjpeg's own warning, which it does not treat as an error).
JPEG_CUT_SHORT = (
    "corrupt JPEG data: premature end of data segment (the compressed data stops "
    "before the last block: the file was cut short)"
)

#: JPEG start-of-frame markers (SOF0-3, 5-7, 9-11, 13-15): they carry the size.
JPEG_SOF_MARKERS = frozenset(
    (*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0))
)

_JPEG_EOI = b"\xff\xd9"

#: Inserted before a JPEG's end marker by :func:`jpeg_is_cut_short`. Mixed
#: bits, never all 0 or all 1: past the end of the data libjpeg feeds zero
#: bits to the block it was decoding and leaves the later blocks zero, and it
#: reads an all-ones (invalid) code as zero too, so such padding could decode
#: like the missing data. No 0xFF byte: it would start a marker and end the data.
JPEG_PROBE_PADDING = bytes((i * 151 + 89) % 255 for i in range(256))

#: File extensions the builders consider images (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif")

# Formats whose bytes `tf.io.decode_image` reads as-is (GIF excluded: it
# decodes to 4-D frames).
_TF_NATIVE_FORMATS = {"JPEG", "PNG", "BMP"}
_EXIF_ORIENTATION = 0x0112

T = TypeVar("T")


class BadImageError(ValueError):
    """An image file that cannot be turned into an 8-bit RGB image."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a visible file with an image extension (skips ``._*`` and dot files)."""
    name = os.path.basename(str(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def image_files_under(folder: str | os.PathLike) -> list[str]:
    """Every image file below ``folder`` (recursive, :func:`is_image_file`), sorted.

    Links to folders are followed (a data set assembled from links to class
    folders), each real folder read once, so a link cycle ends.
    """
    found, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found += [os.path.join(root, name) for name in names if is_image_file(name)]
    return sorted(found)


def too_large_reason(width: int, height: int) -> str:
    """The reason given for an image over :data:`MAX_IMAGE_PIXELS` (same text in serving)."""
    return (
        f"image too large: {width} x {height} = {width * height} pixels, over the limit "
        f"of {MAX_IMAGE_PIXELS} pixels"
    )


def _jpeg_header_size(raw: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG's start-of-frame segment, walking the markers."""
    i = 2
    while i + 4 <= len(raw):
        if raw[i] != 0xFF:
            return None  # not at a marker: malformed, the decoder will say so
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in JPEG_SOF_MARKERS:
            if i + 9 > len(raw):
                return None
            height, width = struct.unpack(">HH", raw[i + 5 : i + 9])
            return width, height
        if marker in (0xDA, 0xD9):  # scan data or end of image before any frame
            return None
        i += 2 + int.from_bytes(raw[i + 2 : i + 4], "big")
    return None


def header_size(raw: bytes) -> tuple[int, int] | None:
    """``(width, height)`` that an image file's header claims, without decoding it.

    Reads JPEG (its start-of-frame segment), PNG (IHDR), GIF (logical screen)
    and BMP (info header); the serving signature reads the same fields in
    the graph (:func:`leukemia_tf.data.preprocessing.header_size`).

    Args:
      raw: the file's bytes.

    Returns:
      ``(width, height)``, or ``None`` for another format or a header too
      short to hold the size.
    """
    if raw[:3] == b"\xff\xd8\xff":
        return _jpeg_header_size(raw)
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR" and len(raw) >= 24:
        return struct.unpack(">II", raw[16:24])
    if raw[:4] == b"GIF8" and len(raw) >= 10:
        return struct.unpack("<HH", raw[6:10])
    if raw[:2] == b"BM" and len(raw) >= 26:
        if struct.unpack("<I", raw[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
            return struct.unpack("<HH", raw[18:22])
        width, height = struct.unpack("<ii", raw[18:26])
        return abs(width), abs(height)  # a negative height is a top-down bitmap
    return None


def jpeg_probe(raw: bytes) -> bytes:
    """``raw`` with :data:`JPEG_PROBE_PADDING` inserted before its final end-of-image marker."""
    body = raw[:-2] if raw.endswith(_JPEG_EOI) else raw
    return body + JPEG_PROBE_PADDING + _JPEG_EOI


def jpeg_is_cut_short(raw: bytes, decoded: Image.Image) -> bool:
    """Whether a JPEG's compressed data stops before its last block.

    libjpeg decodes such a file without an error: at the end-of-image marker
    it warns "premature end of data segment" and decodes the rest from zero
    bits, and neither Pillow nor TensorFlow reports the warning. So the check
    decodes the file a second time with :data:`JPEG_PROBE_PADDING` before
    the marker: a complete file's decoder has read its last block before the
    padding, so the pixels cannot change (libjpeg skips the padding as
    extraneous bytes); a file cut short decodes the padding as its missing
    data, so the pixels change. The serving signature does the same in the
    graph. Cost: one more decode of the same file.

    Args:
      raw: the JPEG file's bytes.
      decoded: ``raw`` opened and loaded by Pillow (the pixels to compare).

    Returns:
      True when the file was cut short.
    """
    with Image.open(io.BytesIO(jpeg_probe(raw))) as probe:
        if probe.mode != decoded.mode:
            return True
        probe.load()
        return probe.tobytes() != decoded.tobytes()


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB (16-bit scaled, alpha dropped on white)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image).astype(np.float64)
        # 16-bit data may use the full 16-bit range or fewer bits; scale by the
        # container's range, which keeps relative intensities as stored.
        maximum = 65535.0 if array.max() > 255 or mode.startswith("I;16") else 255.0
        array = np.clip(np.round(array / maximum * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        maximum = 1.0 if array.max() <= 1.0 else 255.0
        array = np.clip(np.round(array / maximum * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB" or image.getbands() == ("R", "G", "B"):
        return image.convert("RGB")
    # CMYK (PIL applies the Adobe inversion for JPEG), L, 1, P, YCbCr, LAB, ...
    return image.convert("RGB")


def read_image(path: str | os.PathLike) -> tuple[bytes, str]:
    """Reads one image file for storage in a TFDS ``Image`` feature.

    Args:
      path: image file.

    Returns:
      ``(encoded_bytes, format)``: the file's own bytes with their format
      (``"jpeg"``, ``"png"`` or ``"bmp"``) when TensorFlow decodes them to the
      right 8-bit RGB pixels, else a lossless PNG re-encode (``"png"``).

    Raises:
      BadImageError: the file is empty, truncated, too large (more than
        :data:`MAX_IMAGE_PIXELS` pixels, refused from its header before
        decoding) or not an image.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BadImageError(path, f"cannot read file ({e.strerror or e})") from e
    if not raw:
        raise BadImageError(path, "empty file (0 bytes)")
    # Read the size from the header first: Pillow's own decompression-bomb
    # check would refuse the largest files at open time with another message.
    size = header_size(raw)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise BadImageError(path, too_large_reason(*size))
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image_format = image.format
            mode = image.mode
            # Formats whose size header_size does not read (TIFF, ...): the
            # size Pillow parsed, still before decoding.
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise BadImageError(path, too_large_reason(image.width, image.height))
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            # load() decodes every pixel: this is what catches truncation.
            image.load()
            if image_format == "JPEG" and jpeg_is_cut_short(raw, image):
                raise BadImageError(path, JPEG_CUT_SHORT)
            if (
                image_format in _TF_NATIVE_FORMATS
                and mode == "RGB"
                and orientation in (1, None)
                and not getattr(image, "is_animated", False)
                and not (image_format == "PNG" and image.info.get("transparency") is not None)
            ):
                return raw, image_format.lower()
            converted = _to_rgb8(ImageOps.exif_transpose(image))
    except BadImageError:
        raise
    except UnidentifiedImageError as e:
        raise BadImageError(path, "not a recognised image format") from e
    except Image.DecompressionBombError as e:
        # Only for a format whose header header_size does not read.
        raise BadImageError(
            path, f"image too large ({e}); the limit is {MAX_IMAGE_PIXELS} pixels"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(path, f"corrupt or truncated image ({e})") from e
    buffer = io.BytesIO()
    converted.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


class BadFileCollector:
    """Runs a per-file function over many files and gathers every failure.

    A build either fails naming every bad file, or (``skip_bad_files=True``)
    skips them and reports the count and paths. Nothing is skipped silently.

    Args:
      dataset: name used in messages.
      skip_bad_files: skip bad files instead of failing at the end.
      logger: called with a message for each skipped file and a summary.
    """

    def __init__(
        self,
        dataset: str,
        skip_bad_files: bool = False,
        logger: Callable[[str], None] | None = None,
    ):
        self.dataset = dataset
        self.skip_bad_files = skip_bad_files
        self.bad: list[BadImageError] = []
        self._logger = logger or (lambda message: None)

    def map(
        self, fn: Callable[[T], object], items: Iterable[T], finish: bool = True
    ) -> Iterator[tuple[T, object]]:
        """Yields ``(item, fn(item))`` for each item whose ``fn`` did not raise BadImageError.

        Args:
          fn: the per-item function.
          items: the items.
          finish: after the last item, call :meth:`finish` (raise a
            ``ValueError`` listing every bad file seen so far by this
            collector when ``skip_bad_files`` is off). Pass False for all but
            the last of several passes that share the collector.
        """
        for item in items:
            try:
                result = fn(item)
            except BadImageError as e:
                self.bad.append(e)
                if self.skip_bad_files:
                    self._logger(f"{self.dataset}: skipping bad image {e}")
                continue
            yield item, result
        if finish:
            self.finish()

    def finish(self) -> None:
        if not self.bad:
            return
        listing = "\n".join(f"  {e}" for e in self.bad)
        if self.skip_bad_files:
            self._logger(f"{self.dataset}: skipped {len(self.bad)} bad file(s):\n{listing}")
            return
        raise ValueError(
            f"{self.dataset}: {len(self.bad)} bad file(s); fix or remove them, or "
            f"build with skip_bad_files=True (--skip_bad_files) to skip them:\n{listing}"
        )
