"""Tests of the leukemia_folder builder: dummy data, folder-only and CSV input, errors, reload."""

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets import testing

from leukemia_tf.data import build_data_lib as build_data
from tfds_builders import common
from tfds_builders.leukemia_folder import leukemia_folder_dataset_builder as folder
from tfds_builders.leukemia_folder import metadata


class LeukemiaFolderTest(testing.DatasetBuilderTestCase):
    """dummy_data/: 4 classes x 3 patients x 2 images, a metadata.csv and a label_map.yaml."""

    DATASET_CLASS = folder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["default"]
    SPLITS = {"train": 8, "validation": 8, "test": 8}


# ------------------------------------------------------------------ helpers
def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _make_folders(root: Path, classes: dict[str, int], label_map: str | None = None) -> Path:
    seed = 0
    for name, count in classes.items():
        for i in range(count):
            seed += 1
            _png(root / name / f"img_{i:02d}.png", seed)
    if label_map is not None:
        (root / metadata.LABEL_MAP).write_text(label_map)
    return root


def _write_csv(root: Path, rows: list[dict], columns=("path", "label", "patient_id", "slide_id")):
    with (root / metadata.METADATA_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def _build(manual_dir: Path, data_dir: Path, config: str = "default", **kwargs):
    builder = tfds.builder(f"leukemia_folder/{config}", data_dir=data_dir, **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def _examples(builder) -> dict[str, list[dict]]:
    return {
        split: list(tfds.as_numpy(builder.as_dataset(split=split))) for split in builder.info.splits
    }


_MAP = "blasts: AML\nnormal: normal\nsmudge: null\n"


# --------------------------------------------------------------------- tests
def test_folder_only_input_labels_and_image_splits(tmp_path):
    manual = _make_folders(tmp_path / "in", {"normal": 10, "blasts": 10, "smudge": 4}, _MAP)
    builder = _build(manual, tmp_path / "data")
    assert builder.info.features["label"].names == ["blasts", "normal", "smudge"]  # sorted
    examples = _examples(builder)
    names = builder.info.features["label"].names
    seen = {}
    for split, exs in examples.items():
        for ex in exs:
            file_name = ex["file_name"].decode()
            assert file_name.split("/")[0] == names[ex["label"]]
            assert ex["patient_id"] == b"" and ex["slide_id"] == b""
            seen[file_name] = split
    assert len(seen) == 24  # every image exactly once
    assert {len(v) for v in examples.values()} != {0}
    assert builder.info.metadata[metadata.METADATA_LABEL_MAP] == {
        "blasts": "AML",
        "normal": "normal",
        "smudge": None,
    }


def test_single_wrapper_folder_and_nested_class_subfolders(tmp_path):
    manual = tmp_path / "in"
    _make_folders(manual / "export_2024", {"AML": 3, "normal": 3})
    _png(manual / "export_2024" / "AML" / "patient7" / "x.png", 99)
    result = metadata.scan(manual)
    assert result.root == manual / "export_2024"
    assert "AML/patient7/x.png" in {r.file_name for r in result.records}
    # No label_map.yaml: the class names are taxonomy nodes, so they map to themselves.
    assert metadata.load_label_map(result.root, ["AML", "normal"], "t") == {
        "AML": "AML",
        "normal": "normal",
    }


def test_images_outside_class_folders_without_csv_fail(tmp_path):
    manual = _make_folders(tmp_path, {"AML": 2, "normal": 2})
    _png(tmp_path / "stray.png", 5)
    with pytest.raises(metadata.MetadataError, match=r"stray\.png.*class folder"):
        metadata.scan(manual)


def test_missing_manual_dir_says_what_to_put_there(tmp_path):
    # TFDS itself refuses a missing or empty manual_dir, quoting our instructions.
    with pytest.raises((AssertionError, common.ManualDirError), match="one folder per class"):
        _build(tmp_path / "nope", tmp_path / "data")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(common.ManualDirError, match="found no class folders with images"):
        _build(tmp_path / "empty", tmp_path / "data")


def test_csv_mismatch_lists_missing_and_unlisted_files(tmp_path):
    manual = _make_folders(tmp_path, {"AML": 3, "normal": 2}, "AML: AML\nnormal: normal\n")
    rows = [
        {"path": "AML/img_00.png", "label": "AML", "patient_id": "p1"},
        {"path": "AML/img_01.png", "label": "AML", "patient_id": "p1"},
        {"path": "AML/gone.png", "label": "AML", "patient_id": "p2"},
        {"path": "normal/img_00.png", "label": "normal", "patient_id": "p3"},
    ]
    _write_csv(manual, rows)
    with pytest.raises(metadata.MetadataError) as error:
        metadata.scan(manual)
    message = str(error.value)
    assert "metadata.csv" in message
    assert "1 row(s) name a file that does not exist" in message and "AML/gone.png" in message
    assert "2 image file(s)" in message
    assert "AML/img_02.png" in message and "normal/img_01.png" in message


def test_csv_is_authoritative_for_labels_and_ids(tmp_path):
    manual = _make_folders(tmp_path, {"AML": 2, "normal": 2})
    _write_csv(
        manual,
        [
            {"path": "AML/img_00.png", "label": "AML", "patient_id": "p1", "slide_id": "s1"},
            # Filed under AML/ by mistake; the CSV's label wins.
            {"path": "./AML/img_01.png", "label": "normal", "patient_id": "p2", "slide_id": ""},
            {"path": "normal\\img_00.png", "label": "", "patient_id": "", "slide_id": "s1"},
            {"path": "normal/img_01.png", "label": "normal", "patient_id": "p3"},
        ],
    )
    result = metadata.scan(manual)
    by_name = {r.file_name: r for r in result.records}
    assert by_name["AML/img_01.png"].label == "normal"
    assert by_name["normal/img_00.png"].label == "normal"  # empty label: its folder
    assert by_name["normal/img_00.png"].slide_id == "s1"
    # The slide's patient groups the row that has only a slide id.
    splits = metadata.assign(result)
    split_of = {r.file_name: s for s, recs in splits.items() for r in recs}
    assert split_of["normal/img_00.png"] == split_of["AML/img_00.png"]


def test_csv_errors_name_rows(tmp_path):
    manual = _make_folders(tmp_path, {"AML": 2})
    _write_csv(manual, [{"path": "AML/img_00.png"}, {"path": "../AML/img_01.png"}])
    with pytest.raises(metadata.MetadataError, match=r"line 3: '\.\./AML/img_01\.png'"):
        metadata.scan(manual)
    _write_csv(manual, [{"file": "AML/img_00.png"}], columns=("file", "label"))
    with pytest.raises(metadata.MetadataError, match="needs a 'path' column"):
        metadata.scan(manual)


def test_slide_shared_by_two_patients_fails(tmp_path):
    manual = _make_folders(tmp_path, {"AML": 2})
    _write_csv(
        manual,
        [
            {"path": "AML/img_00.png", "patient_id": "p1", "slide_id": "slide1"},
            {"path": "AML/img_01.png", "patient_id": "p2", "slide_id": "slide1"},
        ],
    )
    with pytest.raises(metadata.MetadataError, match=r"slide1 \(patients p1, p2\)"):
        metadata.scan(manual)


def test_unknown_taxonomy_node_fails_at_build_time(tmp_path):
    manual = _make_folders(tmp_path / "in", {"blasts": 3, "normal": 3})
    (manual / metadata.LABEL_MAP).write_text("blasts: acute_myeloid\nnormal: normal\n")
    with pytest.raises(
        metadata.MetadataError, match=r"label_map\.yaml.*unknown node 'acute_myeloid'"
    ):
        _build(manual, tmp_path / "data")


def test_unmapped_label_and_missing_label_map_fail(tmp_path):
    manual = _make_folders(tmp_path, {"blasts": 1, "normal": 1})
    with pytest.raises(
        metadata.MetadataError, match=r"(?s)label_map\.yaml not found.*blasts: <node"
    ):
        metadata.load_label_map(manual, ["blasts", "normal"], "t")
    (manual / metadata.LABEL_MAP).write_text("normal: normal\n")
    with pytest.raises(metadata.MetadataError, match=r"\['blasts'\] are not mapped"):
        metadata.load_label_map(manual, ["blasts", "normal"], "t")
    (manual / metadata.LABEL_MAP).write_text("- blasts\n- normal\n")
    with pytest.raises(metadata.MetadataError, match="expected a mapping"):
        metadata.load_label_map(manual, ["blasts", "normal"], "t")


def test_reload_restores_class_names_and_label_map(tmp_path):
    manual = _make_folders(tmp_path / "in", {"normal": 4, "blasts": 4, "smudge": 3}, _MAP)
    data_dir = tmp_path / "data"
    built = _build(manual, data_dir, config="my_hospital")
    assert built.info.full_name == "leukemia_folder/my_hospital/1.0.0"
    expected = ["blasts", "normal", "smudge"]
    # Plain tfds.load: nothing but the name and data_dir.
    ds, info = tfds.load(
        "leukemia_folder/my_hospital", data_dir=data_dir, split="train", with_info=True
    )
    assert info.features["label"].names == expected
    assert metadata.label_map_from_info(info) == {
        "blasts": "AML",
        "normal": "normal",
        "smudge": None,
    }
    assert len(list(ds)) == info.splits["train"].num_examples
    # A fresh code builder, and a builder from the directory alone, agree.
    fresh = folder.Builder(config="my_hospital", data_dir=data_dir)
    assert fresh.info.features["label"].names == expected
    assert metadata.label_map_from_info(fresh.info)["blasts"] == "AML"
    from_dir = tfds.builder_from_directory(built.data_dir)
    assert from_dir.info.features["label"].names == expected
    # Sets built by other builders have no stored map.
    other = tfds.core.DatasetInfo(builder=built, metadata=tfds.core.MetadataDict())
    assert metadata.label_map_from_info(other, required=False) is None
    with pytest.raises(metadata.MetadataError, match="no 'label_map'"):
        metadata.label_map_from_info(other)


def test_configs_keep_sets_apart_and_names_are_checked(tmp_path):
    data_dir = tmp_path / "data"
    a = _build(_make_folders(tmp_path / "a", {"AML": 3, "CLL": 3}), data_dir, config="site_a")
    b = _build(_make_folders(tmp_path / "b", {"normal": 3, "ALL": 3}), data_dir, config="site_b")
    assert a.info.features["label"].names == ["AML", "CLL"]
    assert b.info.features["label"].names == ["ALL", "normal"]
    assert Path(a.data_dir) != Path(b.data_dir)
    source = next(iter(tfds.as_numpy(b.as_dataset(split="train"))))["source"]
    assert source == b"leukemia_folder/site_b"
    with pytest.raises(ValueError, match="invalid config name"):
        folder.Builder(config="-bad", data_dir=data_dir)


def test_no_patient_in_two_splits_and_every_class_everywhere(tmp_path):
    manual = tmp_path / "in"
    rows = []
    for label in ("AML", "CLL", "normal"):
        for patient in range(6):
            for image in range(patient % 3 + 1):
                path = f"{label}/{label}_p{patient}_{image}.png"
                _png(manual / path, len(rows))
                rows.append(
                    {
                        "path": path,
                        "label": label,
                        "patient_id": f"{label}-p{patient}",
                        "slide_id": f"{label}-p{patient}-s{image % 2}",
                    }
                )
    _write_csv(manual, rows)
    builder = _build(manual, tmp_path / "data")
    split_of_patient, split_of_slide = {}, {}
    for split, exs in _examples(builder).items():
        assert {int(ex["label"]) for ex in exs} == {0, 1, 2}, split
        for ex in exs:
            assert split_of_patient.setdefault(ex["patient_id"], split) == split
            assert split_of_slide.setdefault(ex["slide_id"], split) == split
    assert len(split_of_patient) == 18


def test_csv_split_column_is_used_and_checked(tmp_path):
    manual = _make_folders(tmp_path / "in", {"AML": 3, "normal": 3})
    rows = [
        {"path": f"{c}/img_{i:02d}.png", "patient_id": f"{c}{i}", "split": s}
        for c in ("AML", "normal")
        for i, s in enumerate(("train", "validation", "test"))
    ]
    _write_csv(manual, rows, columns=("path", "patient_id", "split"))
    builder = _build(manual, tmp_path / "data")
    assert "split column" in builder.info.metadata[metadata.METADATA_SPLIT_SOURCE]
    for split, exs in _examples(builder).items():
        want = {
            f"{c}/img_{i:02d}.png"
            for c in ("AML", "normal")
            for i in range(3)
            if ("train", "validation", "test")[i] == split
        }
        assert {ex["file_name"].decode() for ex in exs} == want

    rows[0]["split"] = "val"
    _write_csv(manual, rows, columns=("path", "patient_id", "split"))
    with pytest.raises(
        metadata.MetadataError, match=r"split other than train, validation, test.*'val'"
    ):
        metadata.scan(manual)
    rows[0]["split"] = "train"
    rows[1]["patient_id"] = "AML0"  # same patient in train and validation
    _write_csv(manual, rows, columns=("path", "patient_id", "split"))
    with pytest.raises(metadata.MetadataError, match=r"patient:AML0 in \['train', 'validation'\]"):
        metadata.scan(manual)


def test_rebuild_after_classes_changed(tmp_path):
    manual = _make_folders(tmp_path / "in", {"AML": 3, "normal": 3})
    data_dir = tmp_path / "data"
    _build(manual, data_dir)
    _make_folders(manual, {"CLL": 3})
    builder = tfds.builder("leukemia_folder", data_dir=data_dir)  # restores the old names
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(manual), download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD
        )
    )
    assert tfds.builder("leukemia_folder", data_dir=data_dir).info.features["label"].names == [
        "AML",
        "CLL",
        "normal",
    ]


def test_class_names_fix_the_order_and_reject_unknown_labels(tmp_path):
    manual = _make_folders(tmp_path / "in", {"normal": 3, "AML": 3})
    builder = _build(manual, tmp_path / "d1", class_names=["normal", "AML", "CLL"])
    assert builder.info.features["label"].names == ["normal", "AML", "CLL"]
    with pytest.raises(metadata.MetadataError, match=r"labels \['normal'\].*not in class_names"):
        _build(manual, tmp_path / "d2", class_names=["AML"])


def test_too_few_images_for_three_splits_is_a_clear_error(tmp_path):
    manual = _make_folders(tmp_path / "in", {"AML": 1, "normal": 1})
    with pytest.raises(metadata.MetadataError, match=r"2 image\(s\) in 2 group\(s\).*empty"):
        _build(manual, tmp_path / "data")
    # A CSV's own split column may leave a split out (a test-only set).
    _write_csv(
        manual,
        [
            {"path": "AML/img_00.png", "split": "test"},
            {"path": "normal/img_00.png", "split": "test"},
        ],
        columns=("path", "split"),
    )
    builder = _build(manual, tmp_path / "data")
    assert list(builder.info.splits) == ["test"]


def test_build_command_builds_a_named_config(tmp_path):
    manual = _make_folders(tmp_path / "in", {"AML": 3, "normal": 3})
    builder = build_data.build(
        "leukemia_folder/ward_3", data_dir=str(tmp_path / "data"), manual_dir=str(manual)
    )
    assert builder.info.full_name == "leukemia_folder/ward_3/1.0.0"
    assert builder.info.splits.total_num_examples == 6


def _three_bad_files_in_three_splits(manual: Path) -> list[Path]:
    """AML and normal, 3 patients each (one per split); one corrupt image in each split."""
    _make_folders(manual, {"AML": 3, "normal": 3})
    rows = [
        {"path": f"{c}/img_{i:02d}.png", "patient_id": f"{c}{i}", "split": s}
        for c in ("AML", "normal")
        for i, s in enumerate(("train", "validation", "test"))
    ]
    _write_csv(manual, rows, columns=("path", "patient_id", "split"))
    bad = [manual / "AML" / "img_00.png", manual / "normal" / "img_01.png"]
    bad.append(manual / "AML" / "img_02.png")
    bad[0].write_bytes(b"")
    bad[1].write_bytes(b"not a png")
    bad[2].write_bytes(bad[2].read_bytes()[:40])  # truncated
    return bad


def test_bad_files_in_several_splits_are_reported_in_one_list(tmp_path):
    manual = tmp_path / "in"
    bad = _three_bad_files_in_three_splits(manual)
    with pytest.raises(ValueError) as info:
        _build(manual, tmp_path / "data")
    message = str(info.value)
    assert "leukemia_folder/default: 3 bad file(s)" in message
    missing = [str(p) for p in bad if str(p) not in message]
    assert not missing, f"bad files not named in the error: {missing}\n{message}"


def test_skip_bad_files_reports_every_split_once(tmp_path, caplog):
    manual = tmp_path / "in"
    bad = _three_bad_files_in_three_splits(manual)
    with caplog.at_level(logging.WARNING):
        builder = _build(manual, tmp_path / "data", skip_bad_files=True)
    assert builder.info.splits.total_num_examples == 3
    summaries = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(summaries) == 1, summaries
    assert "skipped 3 bad file(s)" in summaries[0]
    assert all(str(p) in summaries[0] for p in bad)


if __name__ == "__main__":
    testing.test_main()
