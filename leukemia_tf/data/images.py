"""Reading image files robustly for the data set builders.

Every builder stores each image "as stored" when TensorFlow can decode the
bytes to exactly what the file shows (8-bit RGB JPEG, PNG and BMP). Any other
file (TIFF, CMYK JPEG, 16-bit PNG/TIFF, grayscale, palette, RGBA, an
EXIF-rotated photo) is converted to 8-bit RGB and re-encoded losslessly as
PNG. A file that cannot be read at all (empty, truncated, not an image)
raises :class:`BadImageError` naming the path and the reason, so that a
build can report every bad file at once instead of dying on the first one.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A truncated file must fail, never be padded with grey.
Image.LOAD_TRUNCATED_IMAGES = False

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
      BadImageError: the file is empty, truncated or not an image.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BadImageError(path, f"cannot read file ({e.strerror or e})") from e
    if not raw:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image_format = image.format
            mode = image.mode
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            # load() decodes every pixel: this is what catches truncation.
            image.load()
            if (
                image_format in _TF_NATIVE_FORMATS
                and mode == "RGB"
                and orientation in (1, None)
                and not getattr(image, "is_animated", False)
                and not (image_format == "PNG" and image.info.get("transparency") is not None)
            ):
                return raw, image_format.lower()
            converted = _to_rgb8(ImageOps.exif_transpose(image))
    except UnidentifiedImageError as e:
        raise BadImageError(path, "not a recognised image format") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
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
