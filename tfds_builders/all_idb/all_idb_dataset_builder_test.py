"""Tests of the all_idb builder on its dummy data."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets import testing

from tfds_builders import common
from tfds_builders.all_idb import all_idb_dataset_builder as idb

_DUMMY = Path(__file__).resolve().parent / "dummy_data"
_GROUPS = {"idb1": idb.IDB1_GROUPS, "idb2": idb.IDB2_GROUPS}


class AllIdb1Test(testing.DatasetBuilderTestCase):
    DATASET_CLASS = idb.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["idb1"]
    SPLITS = {"train": 10, "validation": 5, "test": 5}


class AllIdb2Test(testing.DatasetBuilderTestCase):
    DATASET_CLASS = idb.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["idb2"]
    SPLITS = {"train": 11, "validation": 3, "test": 2}


def _number(record):
    return int(Path(record.file_name).stem[2:5])


def _assert_groups_in_one_split(by_split, config):
    """Every known group's members share a split; returns the groups seen with 2+ members."""
    split_of = {_number(r): s for s, records in by_split.items() for r in records}
    seen = []
    for group, members in _GROUPS[config].items():
        present = [m for m in members if m in split_of]
        assert len({split_of[m] for m in present}) <= 1, (group, {m: split_of[m] for m in present})
        if len(present) > 1:
            seen.append(group)
    idb.check_groups_in_one_split(by_split)
    return seen


@pytest.mark.parametrize("config", ["idb1", "idb2"])
def test_dummy_groups_stay_in_one_split(config):
    by_split = common.assign_splits(idb.collect_records(_DUMMY, config))
    seen = _assert_groups_in_one_split(by_split, config)
    # Non-vacuous: the dummy data holds several multi-image groups.
    assert len(seen) >= {"idb1": 4, "idb2": 1}[config]


def _full_tree(root):
    """Every file name of the real ALL-IDB (empty files: only names are read here)."""
    im = root / "ALL_IDB1" / "im"
    img = root / "ALL-IDB2" / "img"
    im.mkdir(parents=True)
    img.mkdir(parents=True)
    for n in range(1, 109):
        label = 1 if n <= 33 or 48 <= n <= 63 else 0
        (im / f"Im{n:03d}_{label}.jpg").touch()
    for n in range(1, 261):
        (img / f"Im{n:03d}_{int(n <= 130)}.tif").touch()
    return root


@pytest.mark.parametrize("config, counts", [("idb1", (59, 49)), ("idb2", (130, 130))])
def test_full_size_groups_never_cross_splits(tmp_path, config, counts):
    records = idb.collect_records(_full_tree(tmp_path), config)
    assert (sum(r.label == "0" for r in records), sum(r.label == "1" for r in records)) == counts
    for seed in range(25):
        by_split = common.assign_splits(records, seed=seed)
        assert all(by_split.values()), f"seed {seed}: an empty split"
        assert set(_assert_groups_in_one_split(by_split, config)) == set(_GROUPS[config])


def test_group_ids():
    assert idb.group_id("idb1", 9) == "idb1_overlap_1"
    assert idb.group_id("idb1", 44) == "idb1_overlap_6"
    assert idb.group_id("idb1", 108) == idb.group_id("idb1", 93) == "idb1_duplicate_1"
    assert idb.group_id("idb1", 1) == "idb1_Im001"
    assert idb.group_id("idb2", 222) == idb.group_id("idb2", 260) == "idb2_repeat_1"
    assert idb.group_id("idb2", 9) == "idb2_Im009"  # IDB1 groups do not apply to IDB2 numbers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10\t12\n20\t5\n\n", [[10, 12], [20, 5]]),
        ("\n3 4\r\n\n30  20\r\n", [[3, 4], [30, 20]]),
        ("12.0\t7\n", [[12, 7]]),
        ("", []),
        ("\n \n", []),
    ],
)
def test_parse_xyc(tmp_path, text, expected):
    path = tmp_path / "Im001_1.xyc"
    path.write_bytes(text.encode())
    centers = idb.parse_xyc(path)
    assert centers.dtype == np.int32 and centers.shape == (len(expected), 2)
    np.testing.assert_array_equal(centers, np.asarray(expected).reshape(-1, 2))


@pytest.mark.parametrize("line", ["12 abc", "1 2 3", "12.5 3", "7"])
def test_parse_xyc_names_file_and_line(tmp_path, line):
    path = tmp_path / "Im001_1.xyc"
    path.write_text(f"1\t2\n{line}\n")
    with pytest.raises(ValueError, match=r"Im001_1\.xyc:2: expected two integers"):
        idb.parse_xyc(path)


def test_built_idb1_carries_blast_centers_and_groups(tmp_path):
    builder = idb.Builder(config="idb1", data_dir=str(tmp_path / "data"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(_DUMMY))
    )
    examples = {
        ex["file_name"].decode(): ex
        for split in ("train", "validation", "test")
        for ex in tfds.as_numpy(builder.as_dataset(split=split))
    }
    assert len(examples) == 20
    np.testing.assert_array_equal(examples["im/Im001_1.jpg"]["blast_centers"], [[10, 12], [20, 5]])
    np.testing.assert_array_equal(examples["im/Im009_1.jpg"]["blast_centers"], [[3, 4], [30, 20]])
    # Empty file, no file, healthy field with an empty file, healthy field without one.
    for name in ("Im002_1", "Im003_1", "Im034_0", "Im064_0"):
        centers = examples[f"im/{name}.jpg"]["blast_centers"]
        assert centers.shape == (0, 2) and centers.dtype == np.int32, name
    assert examples["im/Im001_1.jpg"]["image"].shape == (32, 40, 3)
    assert examples["im/Im034_0.jpg"]["image"].shape == (36, 48, 3)
    assert examples["im/Im108_0.jpg"]["slide_id"].decode() == "idb1_duplicate_1"
    assert {ex["patient_id"].decode() for ex in examples.values()} == {""}
    label = builder.info.features["label"]
    assert label.names == ["0", "1"]
    assert label.int2str(examples["im/Im036_0.jpg"]["label"]) == "0"


def test_idb2_has_no_blast_centers_and_reads_tif_and_jpg(tmp_path):
    records = idb.collect_records(_DUMMY, "idb2")
    assert {Path(r.file_name).suffix for r in records} == {".tif", ".jpg"}
    assert all(r.extra == {} for r in records)
    builder = idb.Builder(config="idb2", data_dir=str(tmp_path))
    assert "blast_centers" not in builder.info.features
    assert "blast_centers" in idb.Builder(config="idb1", data_dir=str(tmp_path)).info.features


def test_centroids_of_a_healthy_field_are_dropped(tmp_path):
    root = tmp_path / "manual"
    shutil.copytree(_DUMMY, root)
    (root / "ALL_IDB1/xyc/Im035_0.xyc").write_text("5\t6\n")
    records = {r.file_name: r for r in idb.collect_records(root, "idb1")}
    assert records["im/Im035_0.jpg"].extra["blast_centers"].shape == (0, 2)


def test_bad_names_and_centroid_files_fail_or_are_skipped(tmp_path, caplog):
    root = tmp_path / "manual"
    shutil.copytree(_DUMMY, root)
    shutil.copy(root / "ALL_IDB1/im/Im001_1.jpg", root / "ALL_IDB1/im/photo.jpg")
    (root / "ALL_IDB1/xyc/Im010_1.xyc").write_text("7\t8\nseven eight\n")
    with pytest.raises(ValueError, match="2 bad") as info:
        idb.collect_records(root, "idb1")
    assert "photo.jpg: file name does not match ImNNN_Y" in str(info.value)
    assert "Im010_1.xyc:2: expected two integers" in str(info.value)
    with caplog.at_level(logging.WARNING):
        records = idb.collect_records(root, "idb1", skip_bad_files=True)
    assert len(records) == 19 and "im/Im010_1.jpg" not in {r.file_name for r in records}
    assert "skipped 2 bad" in caplog.text


def test_two_files_for_one_image_number_fail(tmp_path):
    root = tmp_path / "manual"
    shutil.copytree(_DUMMY, root)
    img = root / "downloads/ALL-IDB2/img"
    shutil.copy(img / "Im001_1.tif", img / "Im001_1.jpg")
    with pytest.raises(ValueError, match=r"several files for one image number.*Im001_1"):
        idb.collect_records(root, "idb2")


@pytest.mark.parametrize("config, folder", [("idb1", "ALL_IDB1"), ("idb2", "ALL_IDB2")])
def test_missing_folder_says_what_to_put_where(tmp_path, config, folder):
    (tmp_path / folder).mkdir()  # a folder without its `im/` / `img/` does not count
    with pytest.raises(common.ManualDirError, match=rf"found no '{folder}/'.*scotti/all"):
        idb.collect_records(tmp_path, config)


if __name__ == "__main__":
    testing.test_main()
