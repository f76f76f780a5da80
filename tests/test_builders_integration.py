"""Builds all_taleqani, pbc and aml_cytomorphology_lmu from the real images in ../shared/data.

Each data set is built once per test session (module-scoped fixtures) into a
temporary ``data_dir`` with ``leukemia_tf.data.build_data_lib.build`` and read back
once; the tests then check the result against a walk of the folder on disk:
every image arrives exactly once with its folder's label, stored bytes are
the file's bytes (or a lossless RGB re-encode), the splits are disjoint and
stratified, and every image decodes to ``uint8 [H, W, 3]``.

Skipped, with the reason, where ``<repo>/../shared/data/<name>`` is absent.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from leukemia_tf.data import build_data_lib as build_data
from leukemia_tf.data import images

pytestmark = pytest.mark.integration

_SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
_SPLITS = ("train", "validation", "test")
_FRACTIONS = {"train": 0.70, "validation": 0.15, "test": 0.15}
# Tolerances of the stratification checks (absolute, on fractions).
_SPLIT_SIZE_TOLERANCE = 0.02
_CLASS_SHARE_TOLERANCE = 0.03


@dataclasses.dataclass
class Built:
    """One data set built from ../shared/data and read back."""

    dataset: str
    anchor: Path  # the folder holding the class folders
    label_names: list[str]
    # split -> [(file_name, label name)]
    examples: dict[str, list[tuple[str, str]]]
    extras: dict[str, dict[str, str]]  # file_name -> builder-specific text features
    problems: list[str]  # per-image failures found while reading back
    build_seconds: float
    read_seconds: float


def _build_and_read(tmp_path_factory, name: str, dataset: str, anchor: str, extras=()) -> Built:
    manual_dir = (_SHARED_DATA / name).resolve()
    if not manual_dir.is_dir():
        pytest.skip(
            f"real images for {name!r} not found at {manual_dir} "
            "(the shared data folder is not part of the repository)"
        )
    data_dir = tmp_path_factory.mktemp(f"data_{name}")
    start = time.perf_counter()
    builder = build_data.build(dataset, data_dir=str(data_dir), manual_dir=str(manual_dir))
    build_seconds = time.perf_counter() - start

    start = time.perf_counter()
    label_names = builder.info.features["label"].names
    anchor_dir = manual_dir / anchor
    examples: dict[str, list[tuple[str, str]]] = {}
    extra_values: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    for split in _SPLITS:
        ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        # Decode with the file's own channel count (not the feature's forced
        # 3) so that a stored grayscale or RGBA image would show up.
        ds = ds.map(
            lambda ex: {
                **ex,
                "decoded_shape": tf.shape(tf.io.decode_image(ex["image"], expand_animations=False)),
            },
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        examples[split] = []
        for ex in tfds.as_numpy(ds):
            file_name = ex["file_name"].decode()
            examples[split].append((file_name, label_names[ex["label"]]))
            extra_values[file_name] = {k: ex[k].decode() for k in extras}
            height, width, channels = ex["decoded_shape"]
            if channels != 3 or height < 1 or width < 1:
                problems.append(f"{file_name}: decoded shape {ex['decoded_shape']}")
            if ex["source"].decode() != dataset.split("/")[0]:
                problems.append(f"{file_name}: source {ex['source']!r}")
            if ex["patient_id"] or ex["slide_id"]:
                problems.append(f"{file_name}: unexpected patient/slide id")
            # Stored as the file's bytes, or as a lossless PNG re-encode.
            stored = ex["image"]
            if stored != (anchor_dir / file_name).read_bytes() and not stored.startswith(
                b"\x89PNG"
            ):
                problems.append(f"{file_name}: stored bytes are neither the file nor a PNG")
    read_seconds = time.perf_counter() - start
    print(
        f"\n{dataset}: built {sum(map(len, examples.values()))} examples in "
        f"{build_seconds:.1f} s, read back in {read_seconds:.1f} s"
    )
    return Built(
        dataset=dataset,
        anchor=anchor_dir,
        label_names=label_names,
        examples=examples,
        extras=extra_values,
        problems=problems,
        build_seconds=build_seconds,
        read_seconds=read_seconds,
    )


@pytest.fixture(scope="module")
def all_taleqani(tmp_path_factory) -> Built:
    return _build_and_read(tmp_path_factory, "all_taleqani", "all_taleqani/original", "Original")


@pytest.fixture(scope="module")
def pbc(tmp_path_factory) -> Built:
    return _build_and_read(
        tmp_path_factory, "pbc", "pbc", "PBC_dataset_normal_DIB", extras=("subtype",)
    )


@pytest.fixture(scope="module")
def aml_cytomorphology_lmu(tmp_path_factory) -> Built:
    return _build_and_read(
        tmp_path_factory,
        "aml_cytomorphology_lmu",
        "aml_cytomorphology_lmu",
        ".",
        extras=("reannotation_1", "reannotation_2"),
    )


_DATASETS = ["all_taleqani", "pbc", "aml_cytomorphology_lmu"]


@pytest.fixture(params=_DATASETS)
def built(request) -> Built:
    return request.getfixturevalue(request.param)


def _on_disk(built: Built) -> collections.Counter:
    """(file_name, label) of every image file in a class folder, by walking the disk."""
    found = collections.Counter()
    for label in built.label_names:
        class_dir = built.anchor / label
        if not class_dir.is_dir():
            continue
        for path in class_dir.iterdir():
            if path.is_file() and images.is_image_file(path):
                found[(f"{label}/{path.name}", label)] += 1
    return found


def test_every_image_arrives_exactly_once_with_its_label(built):
    on_disk = _on_disk(built)
    assert on_disk, f"no images found under {built.anchor}"
    arrived = collections.Counter(item for split in _SPLITS for item in built.examples[split])
    repeated = [item for item, count in arrived.items() if count > 1]
    assert not repeated, f"examples emitted more than once: {repeated[:10]}"
    missing = on_disk - arrived
    unexpected = arrived - on_disk
    assert not missing, f"{len(missing)} images on disk never arrived, e.g. {list(missing)[:10]}"
    assert not unexpected, f"{len(unexpected)} examples not on disk, e.g. {list(unexpected)[:10]}"


def test_images_decode_to_rgb_and_are_stored_faithfully(built):
    assert not built.problems, "\n".join(built.problems[:20])


def test_splits_are_disjoint(built):
    names = {split: {f for f, _ in built.examples[split]} for split in _SPLITS}
    for i, a in enumerate(_SPLITS):
        for b in _SPLITS[i + 1 :]:
            assert not names[a] & names[b], f"{a} and {b} share {sorted(names[a] & names[b])[:5]}"


def test_splits_are_stratified(built):
    total = sum(len(built.examples[s]) for s in _SPLITS)
    overall = collections.Counter(label for s in _SPLITS for _, label in built.examples[s])
    for split in _SPLITS:
        size = len(built.examples[split])
        assert abs(size / total - _FRACTIONS[split]) <= _SPLIT_SIZE_TOLERANCE, (
            f"{split}: {size} of {total} examples"
        )
        counts = collections.Counter(label for _, label in built.examples[split])
        for label, n in overall.items():
            assert counts[label] > 0, f"class {label} missing from {split}"
            share, expected = counts[label] / size, n / total
            assert abs(share - expected) <= _CLASS_SHARE_TOLERANCE, (
                f"{split}: class {label} is {share:.3f} of the split, {expected:.3f} overall"
            )


def test_pbc_subtype_is_the_file_name_prefix(pbc):
    for file_name, values in pbc.extras.items():
        base = file_name.split("/", 1)[1]
        # Every name of the published archive follows <PREFIX>_<digits>.jpg.
        assert values["subtype"] and base.startswith(values["subtype"] + "_"), (file_name, values)


def test_aml_labels_are_the_15_codes_and_reannotations_empty_without_annotations(
    aml_cytomorphology_lmu,
):
    built = aml_cytomorphology_lmu
    assert len(built.label_names) == 15 and "MYO" in built.label_names
    has_annotations = any(built.anchor.rglob("annotations.dat"))
    if has_annotations:
        pytest.skip("this copy of the data has annotations.dat; checked in the builder tests")
    assert all(v == {"reannotation_1": "", "reannotation_2": ""} for v in built.extras.values())
