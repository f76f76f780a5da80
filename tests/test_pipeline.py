"""Tests of the input pipeline (leukemia_tf.data.pipeline and .preprocessing).

The data sets are built once per session by the ``pipeline_data`` fixture
(tests/conftest.py): all_taleqani/original and /segmented from generated
JPEG+PNG files, and a second builder with other class names.
"""

from __future__ import annotations

import collections
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from leukemia_tf.data import names, pipeline, preprocessing
from leukemia_tf.taxonomy import Taxonomy

ORIGINAL = "all_taleqani/original"
SEGMENTED = "all_taleqani/segmented"
CELLS = "pipeline_test_cells"
TALEQANI_NAMES = ["Benign", "Early", "Pre", "Pro"]
TALEQANI_NODES = {"Benign": "reactive", "Early": "early_pre_b", "Pre": "pre_b", "Pro": "pro_b"}


def _encode(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colour field with blobs and mild noise (JPEG-friendly, not constant)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack(
        [
            128 + 90 * np.sin(6 * xx + 2 * yy),
            128 + 90 * np.cos(5 * yy - 3 * xx),
            128 + 60 * np.sin(9 * (xx + yy)),
        ],
        -1,
    )
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


def _taxonomy_with_cells() -> Taxonomy:
    taxonomy = Taxonomy.load()
    taxonomy.add_dataset_mapping(CELLS, {"hem": "normal", "all": "ALL"})
    return taxonomy


def _collect(ds: tf.data.Dataset, max_batches: int | None = None) -> dict[str, np.ndarray]:
    parts = collections.defaultdict(list)
    for i, batch in enumerate(ds.as_numpy_iterator()):
        if max_batches is not None and i >= max_batches:
            break
        for key, value in batch.items():
            parts[key].append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}


def _native_label(file_name: bytes) -> str:
    return file_name.decode().split("/")[0]


# ------------------------------------------------------------ parse_datasets
def test_parse_datasets_names_weights_and_versions():
    specs = pipeline.parse_datasets("all_taleqani/original:1, pbc:2.5,aml_cytomorphology_lmu")
    assert specs == [
        pipeline.DataSpec("all_taleqani/original", 1.0),
        pipeline.DataSpec("pbc", 2.5),
        pipeline.DataSpec("aml_cytomorphology_lmu", 1.0),
    ]
    versioned = pipeline.parse_datasets("pbc:1.0.0,all_taleqani/original:1.0.0:3")
    assert versioned == [
        pipeline.DataSpec("pbc:1.0.0", 1.0),
        pipeline.DataSpec("all_taleqani/original:1.0.0", 3.0),
    ]
    assert versioned[1].builder_name == "all_taleqani"
    assert versioned[1].unversioned_name == "all_taleqani/original"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("pbc,,all_idb", "empty item"),
        ("pbc:heavy", "'heavy'"),
        ("pbc:0", "weight must be > 0"),
        ("pbc:-1", "weight must be > 0"),
        ("pbc:nan", "weight must be > 0"),
        ("pbc:1,pbc:2", "more than once"),
        (":2", "malformed"),
    ],
)
def test_parse_datasets_rejects_bad_syntax(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        pipeline.parse_datasets(spec)
    assert "--datasets" in str(info.value)


# --------------------------------------------------------- decode_and_resize
_IMAGE_CASES = [
    # (height, width, format, image_size)
    (40, 40, "PNG", 40),  # already at size: identity
    (30, 60, "PNG", 32),  # wide: downscale + pad rows
    (60, 30, "JPEG", 32),  # tall JPEG: downscale + pad columns
    (10, 14, "PNG", 32),  # upscale
    (363, 360, "JPEG", 224),  # PBC-like
    (512, 384, "JPEG", 64),  # fused DCT-downscaled decode (ratio 4)
    (33, 47, "BMP", 24),
]


@pytest.mark.parametrize("height, width, fmt, size", _IMAGE_CASES)
def test_decode_and_resize_eager_and_in_tf_data_agree(height, width, fmt, size):
    encoded = tf.constant(_encode(_texture(height, width), fmt))
    eager = preprocessing.decode_and_resize(encoded, size)
    in_data = next(
        iter(
            tf.data.Dataset.from_tensors(encoded).map(
                lambda e: preprocessing.decode_and_resize(e, size)
            )
        )
    )
    assert eager.dtype == tf.uint8 and eager.shape == (size, size, 3)
    np.testing.assert_array_equal(eager.numpy(), in_data.numpy())
    # Deterministic.
    np.testing.assert_array_equal(eager.numpy(), preprocessing.decode_and_resize(encoded, size))


def test_decode_and_resize_is_identity_at_size_for_lossless_input():
    pixels = _texture(40, 40, seed=3)
    out = preprocessing.decode_and_resize(_encode(pixels, "PNG"), 40).numpy()
    np.testing.assert_array_equal(out, pixels)


def test_decode_and_resize_keeps_aspect_ratio_and_pads_with_mean_colour():
    pixels = _texture(30, 60, seed=1)
    out = preprocessing.decode_and_resize(_encode(pixels, "PNG"), 20).numpy()
    # 30x60 -> 10x20, centred: rows 5..14 hold the image, the rest is the fill.
    content = out[5:15]
    fill = np.floor(content.reshape(-1, 3).astype(np.float64).mean(0) + 0.5)
    for band in (out[:5], out[15:]):
        np.testing.assert_array_equal(band, np.broadcast_to(fill, band.shape))
    # A 3x reduction is area-averaged: each output pixel is the mean of a
    # 3x3 block of the source.
    expected = pixels.astype(np.float64).reshape(10, 3, 20, 3, 3).mean((1, 3))
    np.testing.assert_allclose(content, np.floor(expected + 0.5), atol=1)


def test_decode_and_resize_uses_bilinear_below_a_2x_reduction():
    pixels = _texture(30, 60, seed=1)
    out = preprocessing.decode_and_resize(_encode(pixels, "PNG"), 40).numpy()
    # 30x60 -> 20x40 (1.5x): plain bilinear sampling, not the area average.
    bilinear = tf.image.resize(pixels, [20, 40], method="bilinear").numpy()
    area = tf.image.resize(pixels, [20, 40], method="area").numpy()
    np.testing.assert_array_equal(out[10:30], np.floor(bilinear + 0.5).astype(np.uint8))
    assert np.abs(np.floor(area + 0.5) - out[10:30]).max() > 1  # tells them apart


@pytest.mark.parametrize(
    "height, width, fused", [(363, 360, False), (360, 382, False), (1530, 1440, True)]
)
def test_decode_and_resize_centre_crops_nearly_square_images(height, width, fused):
    pixels = _texture(height, width, seed=4)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    np.testing.assert_array_equal(preprocessing.crop_box(height, width), [top, left, side, side])
    encoded = _encode(pixels, "PNG" if not fused else "JPEG")
    size = 100  # the JPEG is decoded at 1/4 scale (383x360), then cropped
    out = preprocessing.decode_and_resize(encoded, size).numpy().astype(np.int32)
    decoded = tf.io.decode_image(encoded, channels=3).numpy()
    crop = decoded[top : top + side, left : left + side]
    expected = np.floor(tf.image.resize(crop, [size, size], method="area").numpy() + 0.5)
    diff = np.abs(out - expected)
    if fused:  # DCT-downscaled decode: close, not equal
        assert (
            preprocessing.JPEG_RATIOS[int(preprocessing.jpeg_ratio_index(height, width, size))] == 4
        )
        assert diff.mean() < 1.0, diff.mean()
        assert np.percentile(diff, 99) <= 6, np.percentile(diff, 99)
    else:
        np.testing.assert_array_equal(diff, 0)


def test_decode_and_resize_pads_beyond_the_crop_tolerance():
    # 360x384: the long side exceeds the short by 24 > 360 / 16: kept whole and padded.
    np.testing.assert_array_equal(preprocessing.crop_box(360, 384), [0, 0, 360, 384])
    out = preprocessing.decode_and_resize(_encode(_texture(360, 384, seed=2), "PNG"), 48).numpy()
    # 360x384 -> 45x48: 1 row of fill on top, 2 at the bottom.
    assert (out[0] == out[0, 0]).all() and (out[-1] == out[-1, 0]).all()
    assert not (out[1] == out[1, 0]).all()


def test_decode_and_resize_grayscale_rgba_and_gif_give_rgb():
    gray = _texture(20, 20)[..., 0]
    out = preprocessing.decode_and_resize(_encode(gray, "PNG"), 20).numpy()
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))
    rgba = np.concatenate([_texture(20, 20), np.full((20, 20, 1), 255, np.uint8)], -1)
    out = preprocessing.decode_and_resize(_encode(rgba, "PNG"), 20).numpy()
    np.testing.assert_array_equal(out, rgba[..., :3])
    gif = _encode(_texture(20, 20), "GIF")
    assert preprocessing.decode_and_resize(gif, 16).shape == (16, 16, 3)


def test_fused_jpeg_decode_matches_full_decode_closely():
    """The DCT-downscaled path: used for large JPEGs, and close to the full decode."""
    encoded = _encode(_texture(768, 576, seed=5), "JPEG", quality=92)
    for size, ratio in ((64, 4), (100, 2), (200, 1)):
        index = preprocessing.jpeg_ratio_index(768, 576, size)
        assert preprocessing.JPEG_RATIOS[int(index)] == ratio
        fused = preprocessing.decode_and_resize(encoded, size).numpy().astype(np.int32)
        full = preprocessing.decode_and_resize(encoded, size, fused=False).numpy().astype(np.int32)
        diff = np.abs(fused - full)
        if ratio == 1:
            np.testing.assert_array_equal(fused, full)
        else:
            assert diff.mean() < 1.0, (size, diff.mean())
            assert np.percentile(diff, 99) <= 6, (size, np.percentile(diff, 99))


def test_decode_and_resize_rejects_bad_size_and_bytes():
    with pytest.raises(ValueError, match="image_size"):
        preprocessing.decode_and_resize(_encode(_texture(8, 8), "PNG"), 0)
    with pytest.raises(tf.errors.InvalidArgumentError):
        preprocessing.decode_and_resize(tf.constant(b"not an image"), 16)


def test_decode_example_map_eager_and_in_tf_data():
    example = {
        "image": tf.constant(_encode(_texture(24, 36), "JPEG")),
        "label": tf.constant(2, tf.int32),
        "file_name": tf.constant("a.jpg"),
    }
    eager = preprocessing.decode_example(example, 16)
    in_data = next(
        iter(
            tf.data.Dataset.from_tensors(example).map(lambda e: preprocessing.decode_example(e, 16))
        )
    )
    assert set(eager) == set(example)
    np.testing.assert_array_equal(eager["image"], in_data["image"])
    assert int(in_data["label"]) == 2 and in_data["file_name"].numpy() == b"a.jpg"


def test_label_map_eager_and_in_tf_data():
    table = np.array([3, -1, 0], np.int32)
    levels = np.array([[1, 0, -1], [-1, -1, -1], [0, -1, -1]], np.int32)
    relabel = pipeline.label_map(table, levels)
    example = {
        "image": tf.constant(b"bytes"),
        "label": tf.constant(2, tf.int64),
        "patient_id": tf.constant("p"),
        "slide_id": tf.constant("s"),
        "source": tf.constant("x"),
        "file_name": tf.constant("f"),
        "subtype": tf.constant("builder-specific extra, dropped"),
    }
    eager = relabel(example)
    in_data = next(iter(tf.data.Dataset.from_tensors(example).map(relabel)))
    for out in (eager, in_data):
        assert set(out) == {"image", "label", "levels", *pipeline.STRING_FEATURES}
        assert out["label"].dtype == tf.int32 and int(out["label"]) == 0
        np.testing.assert_array_equal(out["levels"], [0, -1, -1])
    assert bool(pipeline.keep_labelled(eager))
    assert not bool(pipeline.keep_labelled({"label": tf.constant(-1)}))


# ----------------------------------------------------------------- load_split
def test_evaluation_split_yields_every_example_once_with_right_labels(pipeline_data):
    ds = pipeline.load_split(
        ORIGINAL,
        "test",
        data_dir=pipeline_data.data_dir,
        image_size=32,
        batch_size=4,
        training=False,
    )
    spec = ds.element_spec
    assert spec["image"].shape.as_list() == [None, 32, 32, 3] and spec["image"].dtype == tf.uint8
    assert spec["label"].dtype == tf.int32 and spec["label"].shape.as_list() == [None]
    assert "levels" not in spec
    for key in pipeline.STRING_FEATURES:
        assert spec[key].dtype == tf.string
    data = _collect(ds)
    builder = pipeline.get_builder(ORIGINAL, pipeline_data.data_dir)
    num = builder.info.splits["test"].num_examples
    assert len(data["file_name"]) == num == len(set(data["file_name"]))  # remainder kept
    names = pipeline.dataset_class_names(ORIGINAL, pipeline_data.data_dir)
    assert names == TALEQANI_NAMES
    for file_name, label in zip(data["file_name"], data["label"], strict=True):
        assert names[label] == _native_label(file_name)
    assert set(data["source"]) == {b"all_taleqani"}
    # Both stored formats (JPEG and PNG) arrive decoded.
    assert {f.decode().rsplit(".", 1)[1] for f in data["file_name"]} <= {"jpg", "png"}


def test_training_split_has_static_shapes_repeats_and_reshuffles(pipeline_data):
    ds = pipeline.load_split(
        ORIGINAL,
        "train",
        data_dir=pipeline_data.data_dir,
        image_size=24,
        batch_size=5,
        training=True,
        seed=3,
    )
    assert ds.element_spec["image"].shape.as_list() == [5, 24, 24, 3]
    assert ds.element_spec["label"].shape.as_list() == [5]
    num = pipeline.get_builder(ORIGINAL, pipeline_data.data_dir).info.splits["train"].num_examples
    batches = 3 * num // 5 + 1  # more than the split holds: it repeats
    data = _collect(ds, max_batches=batches)
    assert len(data["file_name"]) == batches * 5
    epochs = [list(data["file_name"][i * num : (i + 1) * num]) for i in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1])  # each epoch sees every example once
    assert epochs[0] != epochs[1]  # ... in a new order


def test_repeat_count_and_bad_arguments(pipeline_data):
    kwargs = dict(data_dir=pipeline_data.data_dir, image_size=8, batch_size=4, training=False)
    num = pipeline.get_builder(ORIGINAL, pipeline_data.data_dir).info.splits["test"].num_examples
    twice = _collect(pipeline.load_split(ORIGINAL, "test", repeat=2, **kwargs))
    assert len(twice["file_name"]) == 2 * num
    for bad, message in (
        (dict(repeat=0), "repeat"),
        (dict(cache=1), "cache"),
        (dict(shuffle_buffer=0), "shuffle_buffer"),
    ):
        with pytest.raises(ValueError, match=message):
            pipeline.load_split(ORIGINAL, "test", **bad, **kwargs)
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.load_split(ORIGINAL, "test", **{**kwargs, "batch_size": 0})


def test_deterministic_order_is_reproducible(pipeline_data):
    def order(seed):
        ds = pipeline.load_split(
            [pipeline.DataSpec(ORIGINAL), pipeline.DataSpec(SEGMENTED, 2.0)],
            "train",
            data_dir=pipeline_data.data_dir,
            image_size=16,
            batch_size=4,
            training=True,
            seed=seed,
            deterministic=True,
            cache=False,
        )
        return list(_collect(ds, max_batches=8)["file_name"])

    first = order(7)
    assert first == order(7)
    assert first != order(8)


def test_taxonomy_mode_labels_and_levels(pipeline_data):
    taxonomy = Taxonomy.load()
    names = pipeline.dataset_class_names(ORIGINAL, pipeline_data.data_dir, "taxonomy", taxonomy)
    assert names == ["reactive", "early_pre_b", "pre_b", "pro_b"]  # taxonomy order
    ds = pipeline.load_split(
        ORIGINAL,
        "train",
        data_dir=pipeline_data.data_dir,
        image_size=16,
        batch_size=4,
        training=False,
        label_mode="taxonomy",
    )
    assert ds.element_spec["levels"].shape.as_list() == [None, taxonomy.num_levels]
    data = _collect(ds)
    for file_name, label, levels in zip(
        data["file_name"], data["label"], data["levels"], strict=True
    ):
        node = TALEQANI_NODES[_native_label(file_name)]
        assert names[label] == node
        np.testing.assert_array_equal(levels, taxonomy.encode(node))
    # Benign -> reactive stops at level 0; the ALL subtypes reach the deepest level.
    np.testing.assert_array_equal(taxonomy.encode("reactive")[1:], [-1] * (taxonomy.num_levels - 1))


def test_null_mapped_labels_are_filtered_and_not_counted(pipeline_data):
    taxonomy = Taxonomy.load()
    taxonomy.add_dataset_mapping(
        "all_taleqani", {"Benign": None, "Early": "ALL", "Pre": "ALL", "Pro": "pro_b"}
    )
    args = (ORIGINAL, "train", pipeline_data.data_dir, "taxonomy", taxonomy)
    names = pipeline.dataset_class_names(ORIGINAL, pipeline_data.data_dir, "taxonomy", taxonomy)
    assert names == ["ALL", "pro_b"]
    counts = pipeline.class_counts(*args)
    data = _collect(
        pipeline.load_split(
            ORIGINAL,
            "train",
            data_dir=pipeline_data.data_dir,
            image_size=16,
            batch_size=3,
            training=False,
            label_mode="taxonomy",
            taxonomy=taxonomy,
        )
    )
    assert not any(_native_label(f) == "Benign" for f in data["file_name"])
    np.testing.assert_array_equal(np.bincount(data["label"], minlength=2), counts)
    native = pipeline.class_counts(ORIGINAL, "train", pipeline_data.data_dir)
    assert counts.tolist() == [native[1] + native[2], native[3]]
    np.testing.assert_array_equal(data["levels"][data["label"] == 0][:, 3], -1)


def test_class_counts_match_the_data(pipeline_data):
    counts = pipeline.class_counts(ORIGINAL, "train", pipeline_data.data_dir)
    assert counts.dtype == np.int64 and counts.shape == (4,)
    data = _collect(
        pipeline.load_split(
            ORIGINAL,
            "train",
            data_dir=pipeline_data.data_dir,
            image_size=8,
            batch_size=64,
            training=False,
        )
    )
    np.testing.assert_array_equal(np.bincount(data["label"], minlength=4), counts)
    all_counts = sum(
        pipeline.class_counts(ORIGINAL, split, pipeline_data.data_dir)
        for split in ("train", "validation", "test")
    )
    assert all_counts.tolist() == [pipeline_data.taleqani_per_class["original"]] * 4


def test_mixture_of_two_sets_samples_both_by_weight(pipeline_data):
    taxonomy = _taxonomy_with_cells()
    specs = pipeline.parse_datasets(f"{ORIGINAL}:1,{CELLS}:3")
    names = pipeline.dataset_class_names(specs, pipeline_data.data_dir, "taxonomy", taxonomy)
    assert names == ["normal", "reactive", "ALL", "early_pre_b", "pre_b", "pro_b"]
    ds = pipeline.load_split(
        specs,
        "train",
        data_dir=pipeline_data.data_dir,
        image_size=16,
        batch_size=20,
        training=True,
        label_mode="taxonomy",
        taxonomy=taxonomy,
        seed=1,
        deterministic=True,
    )
    assert ds.element_spec["image"].shape.as_list() == [20, 16, 16, 3]
    data = _collect(ds, max_batches=20)
    from_cells = data["source"] == b"pipeline_test_cells"
    assert 0.65 < from_cells.mean() < 0.85  # weight 3 of 4
    for source, label, levels in zip(data["source"], data["label"], data["levels"], strict=True):
        node = names[label]
        np.testing.assert_array_equal(levels, taxonomy.encode(node))
        cells_node = node in ("normal", "ALL")
        assert cells_node == (source == b"pipeline_test_cells")
    # Taxonomy-mode class counts sum over the sets.
    counts = pipeline.class_counts(specs, "train", pipeline_data.data_dir, "taxonomy", taxonomy)
    assert counts[names.index("normal")] == counts[names.index("ALL")] == 5
    assert counts.sum() == sum(
        pipeline.get_builder(s.name, pipeline_data.data_dir).info.splits["train"].num_examples
        for s in specs
    )


def test_evaluation_mixture_concatenates_and_native_mode_needs_same_classes(pipeline_data):
    # Two configs of one set share class names, so native labels are allowed.
    data = _collect(
        pipeline.load_split(
            f"{ORIGINAL},{SEGMENTED}",
            "test",
            data_dir=pipeline_data.data_dir,
            image_size=16,
            batch_size=4,
            training=False,
        )
    )
    segmented = np.array([f.split(b"/")[1].startswith(b"seg-") for f in data["file_name"]])
    assert segmented.any() and not segmented[: (~segmented).sum()].any()  # in spec order
    with pytest.raises(ValueError, match=r"--label_mode=native.*--datasets=all_taleqani/original"):
        pipeline.dataset_class_names(f"{ORIGINAL},{CELLS}", pipeline_data.data_dir, "native")
    with pytest.raises(ValueError, match="--label_mode='flat'"):
        pipeline.dataset_class_names(ORIGINAL, pipeline_data.data_dir, "flat")


def test_missing_and_unknown_data_sets_give_clear_errors(pipeline_data):
    with pytest.raises(names.DatasetNotBuiltError) as info:
        pipeline.load_split(
            ORIGINAL,
            "train",
            data_dir=pipeline_data.empty_data_dir,
            image_size=16,
            batch_size=2,
            training=True,
        )
    message = str(info.value)
    assert (
        f"python -m leukemia_tf.build_data --dataset={ORIGINAL} "
        f"--data_dir={pipeline_data.empty_data_dir} --manual_dir=" in message
    )
    with pytest.raises(ValueError, match="unknown data set 'no_such_set'.*all_taleqani"):
        pipeline.class_counts("no_such_set", "train", pipeline_data.data_dir)
    with pytest.raises(ValueError, match="all_taleqani/original.*Unknown split 'nope'"):
        pipeline.load_split(
            ORIGINAL,
            "nope",
            data_dir=pipeline_data.data_dir,
            image_size=8,
            batch_size=2,
            training=False,
        )


def test_png_data_set_and_file_cache(pipeline_data, tmp_path):
    prefix = str(tmp_path / "cache" / "px")
    kwargs = dict(
        data_dir=pipeline_data.data_dir,
        image_size=20,
        batch_size=4,
        training=False,
        label_mode="taxonomy",
        taxonomy=_taxonomy_with_cells(),
        cache=prefix,
    )
    first = _collect(pipeline.load_split(CELLS, "test", **kwargs))
    assert list((tmp_path / "cache").iterdir())  # cache files were written
    second = _collect(pipeline.load_split(CELLS, "test", **kwargs))
    assert len(first["file_name"]) == pipeline_data.cells_split_sizes["test"]
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    assert set(first["patient_id"]) == {b"p0", b"p1", b"p2"}


def test_input_context_shards_and_uses_the_per_replica_batch(pipeline_data):
    def read(context=None):
        return pipeline.load_split(
            ORIGINAL,
            "train",
            data_dir=pipeline_data.data_dir,
            image_size=8,
            batch_size=4,
            training=False,
            input_context=context,
        )

    shards = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline_id, num_replicas_in_sync=2
        )
        # One dataset per iterator. Peeking one batch and then reading the same in-memory
        # cached dataset to the end lost elements on a loaded 2-core machine (1 of 8 runs with
        # two CPU hogs beside it; 16 of 16 runs of this form passed): the dropped iterator can
        # still be filling the shared cache when the next one starts. The package itself never
        # peeks a dataset it goes on to read.
        batch = next(iter(read(context)))
        assert batch["image"].shape[0] == 2  # global 4 over 2 replicas
        shards.append(set(_collect(read(context))["file_name"]))
    everything = set(_collect(read())["file_name"])
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == everything
