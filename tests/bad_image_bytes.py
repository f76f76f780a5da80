"""Hand-made bad image files shared by the image, predict and serving tests.

Each is a few hundred bytes to a few kB, built in memory (nothing is decoded
to make them, and the "too large" ones never allocate their claimed pixels):

* :func:`jpeg_cut_short`: a real JPEG cut at half of a scan's entropy-coded data,
  with an end-of-image marker (``FF D9``) appended. libjpeg decodes it
  without an error (it only warns "Corrupt JPEG data: premature end of data
  segment" and fills the rest with grey), so it used to be accepted.
* :func:`jpeg_claiming`: a small JPEG whose frame header (SOF0) claims
  another size, e.g. 65000 x 65000.
* :func:`png_claiming`: a PNG signature plus an IHDR chunk (valid CRC) that
  claims e.g. 30000 x 30000, one tiny IDAT and IEND.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

EOI = b"\xff\xd9"


def smooth_pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A gradient plus noise: compresses like a photo (several kB of entropy data)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 200 / w, yy * 200 / h, (xx + yy) * 100 / (h + w) + 60], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def jpeg(h: int = 64, w: int = 64, seed: int = 0, **save_options) -> bytes:
    """A valid baseline JPEG of ``smooth_pixels``."""
    buffer = io.BytesIO()
    Image.fromarray(smooth_pixels(h, w, seed)).save(
        buffer, format="JPEG", quality=90, **save_options
    )
    return buffer.getvalue()


def scan_spans(data: bytes) -> list[tuple[int, int]]:
    """``(start, end)`` of each scan's entropy-coded data (a progressive JPEG has several)."""
    spans = []
    i = 2
    while i < len(data) - 1:
        if data[i] != 0xFF:
            raise ValueError(f"no marker at offset {i}")
        marker = data[i + 1]
        if marker == 0xD9:
            break
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        i += 2 + length
        if marker == 0xDA:  # SOS: the entropy-coded data follows its header
            start = i
            # The data runs to the next marker: 0xFF followed by neither a
            # stuffed 0x00 nor a restart marker (D0-D7).
            while not (data[i] == 0xFF and data[i + 1] != 0 and not 0xD0 <= data[i + 1] <= 0xD7):
                i += 1
            spans.append((start, i))
    return spans


def jpeg_cut_short(data: bytes | None = None, scan: int = -1) -> bytes:
    """``data`` (default :func:`jpeg`) cut at half of a scan's entropy data, plus ``FF D9``.

    Args:
      data: a JPEG.
      scan: which scan to cut in (a baseline JPEG has one; the last by default).
    """
    data = jpeg() if data is None else data
    start, end = scan_spans(data)[scan]
    cut = start + (end - start) // 2
    # A cut right after an 0xFF byte would leave half a marker; move back one.
    if data[cut - 1] == 0xFF:
        cut -= 1
    return data[:cut] + EOI


def jpeg_claiming(width: int, height: int) -> bytes:
    """A 16 x 16 JPEG whose SOF0 header is rewritten to claim ``width x height``."""
    data = jpeg(16, 16)
    sof = data.index(b"\xff\xc0")
    # SOF0: FF C0, length (2), precision (1), height (2), width (2), ...
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` (8-bit RGB), with one tiny IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )
