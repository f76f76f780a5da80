"""Tests of leukemia_tf.data.images and of the builders' bad-file policy.

Every image here is generated in ``tmp_path``. The pixels a model will see are
checked the way TFDS decodes them (``tfds.features.Image``), not only with PIL.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import bad_image_bytes
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, ImageFile

from leukemia_tf.data import build_data_lib as build_data
from leukemia_tf.data import images
from tfds_builders import common

_EXIF_ORIENTATION = 0x0112


def _tfds_decode(encoded: bytes) -> np.ndarray:
    """Decodes ``encoded`` exactly as the builders' ``image`` feature will."""
    feature = tfds.features.Image(shape=(None, None, 3), dtype=np.uint8)
    decoded = feature.decode_example(tf.constant(encoded)).numpy()
    assert decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[-1] == 3
    return decoded


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _blocks(rows: int, cols: int, size: int = 8) -> np.ndarray:
    """An image of ``rows x cols`` flat, distinct, saturated colour blocks."""
    palette = np.array(
        [
            [255, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [255, 255, 0],
            [255, 0, 255],
            [0, 255, 255],
            [0, 0, 0],
            [255, 255, 255],
        ],
        np.uint8,
    )
    grid = palette[np.arange(rows * cols) % len(palette)].reshape(rows, cols, 3)
    return np.repeat(np.repeat(grid, size, axis=0), size, axis=1)


def _png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    h, w, _ = array.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bit, truecolour
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _tiff16_rgb(array: np.ndarray) -> bytes:
    """An uncompressed little-endian 16-bit-per-channel RGB TIFF (PIL cannot write one)."""
    h, w, _ = array.shape
    data = array.astype("<u2").tobytes()
    bits_offset, data_offset = 8, 14
    ifd_offset = data_offset + len(data)
    short, long_ = 3, 4
    tags = [
        (256, short, 1, w),  # ImageWidth
        (257, short, 1, h),  # ImageLength
        (258, short, 3, bits_offset),  # BitsPerSample -> 16,16,16
        (259, short, 1, 1),  # no compression
        (262, short, 1, 2),  # RGB
        (273, long_, 1, data_offset),  # StripOffsets
        (277, short, 1, 3),  # SamplesPerPixel
        (278, short, 1, h),  # RowsPerStrip
        (279, long_, 1, len(data)),  # StripByteCounts
        (284, short, 1, 1),  # chunky
    ]
    entries = b"".join(
        struct.pack("<HHII", tag, kind, count, value)
        if kind == long_ or count > 1
        else struct.pack("<HHIHH", tag, kind, count, value, 0)
        for tag, kind, count, value in tags
    )
    ifd = struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + struct.pack("<HHH", 16, 16, 16) + data + ifd


# --------------------------------------------------------------------------
# Files stored as they are


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp")])
def test_plain_rgb_file_is_stored_byte_identical(tmp_path, fmt, ext):
    path = tmp_path / f"cell.{ext}"
    Image.fromarray(_noise(20, 24)).save(path, format=fmt)
    encoded, image_format = images.read_image(path)
    assert encoded == path.read_bytes()
    assert image_format == fmt.lower()
    assert _tfds_decode(encoded).shape == (20, 24, 3)


def test_jpeg_with_orientation_1_is_stored_byte_identical(tmp_path):
    path = tmp_path / "upright.jpg"
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = 1
    Image.fromarray(_noise(16, 32)).save(path, exif=exif)
    encoded, image_format = images.read_image(path)
    assert (encoded, image_format) == (path.read_bytes(), "jpeg")


# --------------------------------------------------------------------------
# Files converted to 8-bit RGB


def test_cmyk_jpeg_keeps_its_colours(tmp_path):
    path = tmp_path / "cmyk.jpg"
    # C=0, M=100%, Y=100%, K=0 is pure red; PIL writes Adobe-style CMYK.
    Image.new("CMYK", (24, 16), (0, 255, 255, 0)).save(path, quality=95)
    encoded, image_format = images.read_image(path)
    assert image_format == "png"
    pixels = _tfds_decode(encoded)
    assert pixels.shape == (16, 24, 3)
    np.testing.assert_allclose(pixels.reshape(-1, 3).mean(axis=0), [255, 0, 0], atol=6)


def test_16bit_grayscale_png_and_tiff_are_scaled_to_8_bits(tmp_path):
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(4, 16)
    expected = np.round(ramp / 65535 * 255).astype(np.uint8)
    for ext in ("png", "tiff"):
        path = tmp_path / f"gray16.{ext}"
        Image.fromarray(ramp).save(path)  # mode I;16
        encoded, image_format = images.read_image(path)
        assert image_format == "png"
        pixels = _tfds_decode(encoded)
        np.testing.assert_array_equal(pixels, np.repeat(expected[..., None], 3, axis=-1))


@pytest.mark.parametrize("ext, writer", [("png", _png16_rgb), ("tiff", _tiff16_rgb)])
def test_16bit_rgb_is_scaled_to_8_bits(tmp_path, ext, writer):
    array = np.zeros((4, 16, 3), np.uint16)
    array[..., 0] = np.linspace(0, 65535, 16).round().astype(np.uint16)
    array[..., 1] = 65535
    array[..., 2] = 257 * 100  # exactly 100 in 8 bits
    path = tmp_path / f"rgb16.{ext}"
    path.write_bytes(writer(array))
    encoded, _ = images.read_image(path)
    pixels = _tfds_decode(encoded)
    # Dropping the low byte and rounding v/65535*255 differ by at most 1.
    np.testing.assert_allclose(pixels, np.round(array / 65535 * 255), atol=1)


def test_grayscale_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "gray.jpg"
    gray = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (16, 1))
    Image.fromarray(gray, mode="L").save(path, quality=100)
    encoded, image_format = images.read_image(path)
    assert image_format == "png"
    pixels = _tfds_decode(encoded)
    assert pixels.shape == (16, 32, 3)
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    np.testing.assert_allclose(pixels[..., 0], gray, atol=3)


@pytest.mark.parametrize("ext", ["png", "tiff"])
def test_rgba_is_composited_on_white(tmp_path, ext):
    rgba = np.zeros((8, 12, 4), np.uint8)
    rgba[:, :4] = [255, 0, 0, 255]  # opaque red
    rgba[:, 4:8] = [0, 0, 0, 0]  # fully transparent
    rgba[:, 8:] = [0, 0, 0, 128]  # half-transparent black
    path = tmp_path / f"rgba.{ext}"
    Image.fromarray(rgba, mode="RGBA").save(path)
    encoded, image_format = images.read_image(path)
    assert image_format == "png"
    pixels = _tfds_decode(encoded)
    np.testing.assert_array_equal(pixels[:, :4], np.broadcast_to([255, 0, 0], (8, 4, 3)))
    np.testing.assert_array_equal(pixels[:, 4:8], np.full((8, 4, 3), 255))
    np.testing.assert_allclose(pixels[:, 8:], np.full((8, 4, 3), 127), atol=1)


def test_opaque_rgba_tiff_keeps_exact_rgb(tmp_path):
    # AML-Cytomorphology_LMU publishes RGBA TIFFs with an opaque alpha channel.
    rgb = _noise(16, 16, seed=3)
    path = tmp_path / "MYO_0001.tiff"
    Image.fromarray(np.dstack([rgb, np.full((16, 16), 255, np.uint8)]), "RGBA").save(path)
    np.testing.assert_array_equal(_tfds_decode(images.read_image(path)[0]), rgb)


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_png_keeps_its_colours(tmp_path, transparent):
    blocks = _blocks(2, 3)
    palette_image = Image.fromarray(blocks).quantize(colors=8)
    path = tmp_path / "palette.png"
    expected = blocks.copy()
    if transparent:
        # The palette entry of the cyan block (row 1, col 2) becomes
        # transparent: composited on white, that block turns white.
        palette_image.save(path, transparency=palette_image.getpixel((20, 12)))
        expected[8:16, 16:24] = 255
    else:
        palette_image.save(path)
    assert Image.open(path).mode == "P"
    encoded, image_format = images.read_image(path)
    assert image_format == "png"
    np.testing.assert_array_equal(_tfds_decode(encoded), expected)


@pytest.mark.parametrize(
    "orientation, rot90_k",
    [
        (6, -1),  # stored 0th row is the visual right side: rotate 90 degrees clockwise
        (8, 1),  # stored 0th row is the visual left side: rotate 90 degrees anticlockwise
        (3, 2),  # upside down
    ],
)
def test_exif_rotated_jpeg_is_turned_upright(tmp_path, orientation, rot90_k):
    stored = _blocks(2, 4)  # 16 high, 32 wide, distinct colour blocks
    path = tmp_path / f"rotated_{orientation}.jpg"
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = orientation
    Image.fromarray(stored).save(path, exif=exif, quality=100, subsampling=0)
    encoded, image_format = images.read_image(path)
    assert image_format == "png"
    pixels = _tfds_decode(encoded)
    expected = np.rot90(stored, k=rot90_k)
    assert pixels.shape == expected.shape
    # Compare block centres (JPEG blurs the block edges).
    centres = pixels[4::8, 4::8].astype(int)
    np.testing.assert_allclose(centres, expected[4::8, 4::8], atol=12)
    if orientation == 6:
        # The stored top-left block (red) is at the visual top right.
        np.testing.assert_allclose(pixels[4, -4], [255, 0, 0], atol=12)


def test_gif_becomes_rgb_png(tmp_path):
    path = tmp_path / "cell.gif"
    Image.fromarray(_blocks(2, 2)).save(path)
    encoded, image_format = images.read_image(path)
    assert image_format == "png"
    np.testing.assert_array_equal(_tfds_decode(encoded), _blocks(2, 2))


# --------------------------------------------------------------------------
# Bad files


def _jpeg_bytes(h: int = 64, w: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise(h, w)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


_JPEG, _PNG = _jpeg_bytes(), _png_bytes()
_BAD_FILES = {
    "empty.jpg": (b"", "empty file"),
    "text.jpg": (b"this is not an image\n", "not a recognised image format"),
    "truncated.jpg": (_JPEG[: len(_JPEG) // 2], "truncated"),
    "truncated.png": (_PNG[: len(_PNG) // 2], "truncated"),
    "header_only.jpg": (_JPEG[:200], "truncated"),
}


@pytest.mark.parametrize("name", sorted(_BAD_FILES))
def test_bad_file_raises_naming_path_and_reason(tmp_path, name):
    content, reason = _BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(images.BadImageError) as info:
        images.read_image(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert reason in info.value.reason


def test_missing_file_raises_bad_image_error(tmp_path):
    with pytest.raises(images.BadImageError, match="cannot read file"):
        images.read_image(tmp_path / "gone.jpg")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("BA_1.jpg", True),
        ("BA_1.JPG", True),
        ("x.jpeg", True),
        ("x.tiff", True),
        ("x.TIF", True),
        ("x.png", True),
        ("x.bmp", True),
        ("._BA_1.jpg", False),  # macOS AppleDouble
        (".DS_Store", False),
        ("Thumbs.db", False),
        ("annotations.dat", False),
        ("labels.csv", False),
    ],
)
def test_is_image_file(name, expected):
    assert images.is_image_file(Path("some") / name) is expected


def test_collector_fails_naming_every_bad_file(tmp_path):
    paths = []
    for name in ["good_a.jpg", "empty.jpg", "good_b.jpg", "text.jpg"]:
        path = tmp_path / name
        path.write_bytes(_jpeg_bytes(16, 16) if name.startswith("good") else _BAD_FILES[name][0])
        paths.append(path)
    collector = images.BadFileCollector("demo")
    results = []
    with pytest.raises(ValueError) as info:
        for path, _ in collector.map(images.read_image, paths):
            results.append(path.name)
    assert results == ["good_a.jpg", "good_b.jpg"]
    message = str(info.value)
    assert "demo: 2 bad file(s)" in message and "skip_bad_files" in message
    assert str(tmp_path / "empty.jpg") in message and str(tmp_path / "text.jpg") in message


def test_collector_skips_and_reports(tmp_path):
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    good.write_bytes(_jpeg_bytes(16, 16))
    bad.write_bytes(b"")
    messages = []
    collector = images.BadFileCollector("demo", skip_bad_files=True, logger=messages.append)
    kept = [p for p, _ in collector.map(images.read_image, [bad, good])]
    assert kept == [good]
    assert [str(e.path) for e in collector.bad] == [str(bad)]
    assert any("skipped 1 bad file(s)" in m and str(bad) in m for m in messages)


# --------------------------------------------------------------------------
# The policy inside a real build (all_taleqani on a generated manual_dir)

_CLASSES = ("Benign", "Early", "Pre", "Pro")
# Bad files; with the fixed split seed Early-005 and Pre-005 land in `train`,
# Benign-005 and Pro-005 in `test` (asserted below).
_BAD_IN_TRAIN = {"Early/WBC-Early-005.jpg": b"hello", "Pre/WBC-Pre-005.jpg": "truncated"}
_BAD_IN_TEST = {"Benign/WBC-Benign-005.jpg": b"", "Pro/WBC-Pro-005.jpg": "truncated"}


def _taleqani_manual_dir(tmp_path: Path, bad: dict[str, object]) -> tuple[Path, Path]:
    root = tmp_path / "manual" / "archive" / "Original"
    for c in _CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(1, 5):
            Image.fromarray(_noise(16, 16, seed=i)).save(root / c / f"WBC-{c}-{i:03d}.jpg")
        # The fifth image of each class is good unless it is listed as bad.
        Image.fromarray(_noise(16, 16, seed=9)).save(root / c / f"WBC-{c}-005.jpg")
    for relative, content in bad.items():
        if content == "truncated":
            content = _jpeg_bytes()[:300]
        (root / relative).write_bytes(content)
    return tmp_path / "manual", root


def _split_of_bad_files(root: Path, bad: dict[str, object]) -> set[str]:
    records = [
        common.Record(path=p, label=c, file_name=f"{c}/{p.name}")
        for c in _CLASSES
        for p in common.list_images(root / c)
    ]
    return {
        split
        for split, recs in common.assign_splits(records).items()
        for r in recs
        if r.file_name in bad
    }


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(_BAD_IN_TRAIN, id="bad_files_in_one_split"),
        pytest.param({**_BAD_IN_TRAIN, **_BAD_IN_TEST}, id="bad_files_in_several_splits"),
    ],
)
def test_build_fails_naming_every_bad_file(tmp_path, bad):
    manual_dir, root = _taleqani_manual_dir(tmp_path, bad)
    expected_splits = {"train"} if bad is _BAD_IN_TRAIN else {"train", "test"}
    assert _split_of_bad_files(root, bad) == expected_splits  # the test's premise
    with pytest.raises(ValueError) as info:
        build_data.build("all_taleqani/original", str(tmp_path / "data"), str(manual_dir))
    message = str(info.value)
    assert "skip_bad_files" in message
    missing = [relative for relative in bad if str(root / relative) not in message]
    assert not missing, f"bad files not named in the error: {missing}\n{message}"
    assert f"{len(bad)} bad file(s)" in message


def test_build_with_skip_bad_files_keeps_only_good_images(tmp_path, caplog):
    bad = {**_BAD_IN_TRAIN, **_BAD_IN_TEST}
    manual_dir, root = _taleqani_manual_dir(tmp_path, bad)
    with caplog.at_level(logging.WARNING):
        builder = build_data.build(
            "all_taleqani/original", str(tmp_path / "data"), str(manual_dir), skip_bad_files=True
        )
    names = []
    for split in ("train", "validation", "test"):
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            names.append(ex["file_name"].decode())
            assert ex["image"].shape == (16, 16, 3)
    good = sorted(f"{c}/{p.name}" for c in _CLASSES for p in (root / c).iterdir())
    good = [n for n in good if n not in bad]
    assert sorted(names) == good and len(good) == 16
    logged = caplog.text
    for relative in bad:
        assert str(root / relative) in logged


# --------------------------------------------------------------------------
# JPEGs cut short behind an end-of-image marker, and images too large to decode

_CUT_SHORT_REASON = "premature end of data segment"


@pytest.mark.parametrize(
    "progressive, scan",
    [(False, 0), (True, 0), (True, -1)],
    ids=["baseline", "progressive_first_scan", "progressive_last_scan"],
)
def test_jpeg_cut_short_with_end_marker_is_refused(tmp_path, progressive, scan):
    data = bad_image_bytes.jpeg(96, 80, progressive=progressive)
    path = tmp_path / "cut.jpg"
    path.write_bytes(bad_image_bytes.jpeg_cut_short(data, scan))
    with pytest.raises(images.BadImageError) as info:
        images.read_image(path)
    assert info.value.path == str(path)
    assert _CUT_SHORT_REASON in info.value.reason and "corrupt" in info.value.reason


def test_complete_jpeg_with_data_after_its_end_marker_is_kept(tmp_path):
    # Bytes after EOI (some cameras append them) do not change the pixels.
    data = bad_image_bytes.jpeg(40, 48)
    path = tmp_path / "tail.jpg"
    path.write_bytes(data + b"\x00trailing bytes")
    encoded, image_format = images.read_image(path)
    assert image_format == "jpeg" and encoded == path.read_bytes()


@pytest.mark.parametrize(
    "name, content, claimed",
    [
        ("huge.jpg", bad_image_bytes.jpeg_claiming(65000, 65000), "65000 x 65000"),
        ("huge.png", bad_image_bytes.png_claiming(30000, 30000), "30000 x 30000"),
        ("wide.jpg", bad_image_bytes.jpeg_claiming(60000, 1000), "60000 x 1000"),
    ],
    ids=["jpeg_65000", "png_30000", "jpeg_60000x1000"],
)
def test_too_large_image_is_refused_before_decoding(tmp_path, monkeypatch, name, content, claimed):
    path = tmp_path / name
    path.write_bytes(content)

    def no_decode(self):
        raise AssertionError("read_image decoded an image it must refuse from its header")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(images.BadImageError) as info:
        images.read_image(path)
    reason = info.value.reason
    assert reason.startswith("image too large") and claimed in reason
    assert f"{images.MAX_IMAGE_PIXELS} pixels" in reason


def test_small_jpeg_claiming_a_large_size_under_the_limit_is_cut_short(tmp_path):
    # Under the pixel limit the header is believed, and the missing data is
    # what gives the file away.
    path = tmp_path / "claims_2000.jpg"
    path.write_bytes(bad_image_bytes.jpeg_claiming(2000, 1500))
    with pytest.raises(images.BadImageError, match=_CUT_SHORT_REASON):
        images.read_image(path)


def test_header_size_reads_jpeg_png_gif_bmp_without_decoding(tmp_path):
    pixels = _noise(30, 50)
    for fmt in ("JPEG", "PNG", "GIF", "BMP"):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        assert images.header_size(buffer.getvalue()) == (50, 30), fmt
    assert images.header_size(bad_image_bytes.png_claiming(30000, 20000)) == (30000, 20000)
    assert images.header_size(bad_image_bytes.jpeg_claiming(65000, 100)) == (65000, 100)
    assert images.header_size(b"not an image") is None


def test_builder_lists_cut_short_and_too_large_files_with_their_reason(tmp_path):
    files = {
        "good.jpg": bad_image_bytes.jpeg(32, 32),
        "cut.jpg": bad_image_bytes.jpeg_cut_short(),
        "huge.jpg": bad_image_bytes.jpeg_claiming(65000, 65000),
        "huge.png": bad_image_bytes.png_claiming(30000, 30000),
    }
    records = []
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        records.append(common.Record(path=tmp_path / name, label=0, file_name=name))
    with pytest.raises(ValueError) as info:
        list(common.generate_examples(records, "demo"))
    lines = str(info.value).splitlines()
    assert "demo: 3 bad file(s)" in lines[0]
    expected = {
        "cut.jpg": _CUT_SHORT_REASON,
        "huge.jpg": "image too large: 65000 x 65000",
        "huge.png": "image too large: 30000 x 30000",
    }
    for name, reason in expected.items():
        assert any(str(tmp_path / name) in line and reason in line for line in lines), name
    assert not any(str(tmp_path / "good.jpg") in line for line in lines)


# --------------------------------------------------------------------------
# No real image is refused (the shared data folder, when present)

_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_REAL_SETS = ("pbc", "all_taleqani", "aml_cytomorphology_lmu", "external")
_REAL_SAMPLE = 60  # per set: evenly spread over the sorted file list


def _real_sample(name: str) -> list[Path]:
    root = _SHARED_DATA / name
    if not root.is_dir():
        pytest.skip(f"real images not available: {root} is absent")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and images.is_image_file(p))
    if not paths:
        pytest.skip(f"real images not available: no image files under {root}")
    step = max(1, len(paths) // _REAL_SAMPLE)
    return paths[::step][:_REAL_SAMPLE]


@pytest.mark.parametrize("name", _REAL_SETS)
def test_no_real_image_is_refused(name):
    """Neither the builders' read_image nor the serving signature's checks refuse a real image."""
    from leukemia_tf.data import preprocessing

    checked = tf.function(
        lambda encoded: preprocessing.decode_and_resize_checked(encoded, 224)[1],
        input_signature=[tf.TensorSpec([], tf.string)],
    )
    refused = []
    for path in _real_sample(name):
        try:
            images.read_image(path)
        except images.BadImageError as e:
            refused.append(f"read_image: {e}")
        problem = checked(path.read_bytes()).numpy().decode()
        if problem:
            refused.append(f"serving: {path}: {problem}")
    assert not refused, "\n".join(refused)


def test_image_files_under_follows_folder_links_once(tmp_path):
    data = tmp_path / "data" / "erythroblast"
    data.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "a.png")
    (data / "notes.txt").write_text("not an image")
    view = tmp_path / "view"
    view.mkdir()
    (view / "erythroblast").symlink_to(data, target_is_directory=True)
    (view / "loop").symlink_to(view, target_is_directory=True)  # a cycle ends
    assert images.image_files_under(view) == [str(view / "erythroblast" / "a.png")]
