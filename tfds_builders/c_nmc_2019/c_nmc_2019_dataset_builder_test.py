"""Tests of the c_nmc_2019 builder on its dummy data (TCIA package and Kaggle mirror)."""

import logging
import shutil
from pathlib import Path

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets import testing

from tfds_builders import common
from tfds_builders.c_nmc_2019 import c_nmc_2019_dataset_builder as cnmc

_DUMMY = Path(__file__).resolve().parent / "dummy_data"
_TCIA = _DUMMY / "tcia"
_KAGGLE = _DUMMY / "kaggle"
_SPLITS = {"train": 9, "validation": 4, "test": 3}


class CNmc2019TciaTest(testing.DatasetBuilderTestCase):
    """`PKG - C-NMC 2019/`: labels CSV inside the prelim folder."""

    DATASET_CLASS = cnmc.Builder
    EXAMPLE_DIR = str(_TCIA)
    SPLITS = _SPLITS


class CNmc2019KaggleTest(testing.DatasetBuilderTestCase):
    """`C-NMC_Leukemia/`: CSV next to the prelim folder, final folder double-nested."""

    DATASET_CLASS = cnmc.Builder
    EXAMPLE_DIR = str(_KAGGLE)
    SPLITS = _SPLITS


@pytest.mark.parametrize(
    "name, patient, slide, label",
    [
        ("UID_57_29_1_all.bmp", "57", "57_29", "all"),
        ("UID_H57_29_1_hem.bmp", "H57", "H57_29", "hem"),
        ("uid_h49_35_12_HEM.BMP", "H49", "H49_35", "hem"),
    ],
)
def test_parse_uid_name(name, patient, slide, label):
    assert cnmc.parse_uid_name(name) == cnmc.UidName(patient, slide, label)


@pytest.mark.parametrize(
    "name",
    [
        "1.bmp",
        "UID_57_29_all.bmp",
        "UID_57_29_1_all.jpg",
        "UID_H57_29_1_all.bmp",
        "UID_5_1_1_hem.bmp",
    ],
)
def test_parse_uid_name_rejects(name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        cnmc.parse_uid_name(name)


def _examples(builder, split):
    return list(tfds.as_numpy(builder.as_dataset(split=split)))


def test_built_splits_share_no_patient(tmp_path):
    """No patient in two splits or two folds; ALL 57 and healthy H57 stay apart."""
    builder = cnmc.Builder(data_dir=str(tmp_path / "data"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(_TCIA))
    )
    patients = {}
    folds_of = {}
    for split in _SPLITS:
        for ex in _examples(builder, split):
            patient = ex["patient_id"].decode()
            if patient:
                patients.setdefault(patient, set()).add(split)
            if split == "train":
                folds_of.setdefault(patient, set()).add(int(ex["fold"]))
            else:
                assert ex["fold"] == -1
    leaked = {p: s for p, s in patients.items() if len(s) > 1}
    assert not leaked, f"patients in several splits: {leaked}"
    assert all(len(f) == 1 for f in folds_of.values()), folds_of
    # The dummy data holds ALL subject 57 (train) and healthy H57 (validation):
    # dropping the H would merge them and fail the check above.
    assert patients["57"] == {"train"} and patients["H57"] == {"validation"}
    assert {p for p, s in patients.items() if "validation" in s} == {"64", "H57", "H60"}

    by_name = {ex["file_name"].decode(): ex for ex in _examples(builder, "validation")}
    third = by_name["C-NMC_test_prelim_phase_data/3.bmp"]
    assert third["original_name"].decode() == "UID_H57_3_1_hem.bmp"
    assert third["slide_id"].decode() == "H57_3"
    assert builder.info.features["label"].int2str(third["label"]) == "hem"
    test = _examples(builder, "test")
    assert {int(ex["label"]) for ex in test} == {-1}
    assert {ex["original_name"].decode() for ex in test} == {""}
    assert {ex["patient_id"].decode() for ex in test} == {""}
    assert {ex["image"].shape for ex in test} == {(24, 24, 3)}


def _summary(by_split):
    return {
        (
            split,
            r.file_name,
            r.label,
            r.patient_id,
            r.slide_id,
            r.extra["fold"],
            r.extra["original_name"],
        )
        for split, records in by_split.items()
        for r in records
    }


def test_both_layouts_give_the_same_records():
    tcia = _summary(cnmc.collect_records(_TCIA))
    assert tcia == _summary(cnmc.collect_records(_KAGGLE))
    assert (
        "train",
        "fold_0/all/UID_11_10_2_all.bmp",
        "all",
        "11",
        "11_10",
        0,
        "UID_11_10_2_all.bmp",
    ) in tcia
    assert len(tcia) == sum(_SPLITS.values())


def _copy(tmp_path, layout=_TCIA):
    root = tmp_path / "manual"
    shutil.copytree(layout, root)
    return root


def _pkg(root):
    return root / "PKG - C-NMC 2019"


def test_misnamed_fold_file_fails_or_is_skipped(tmp_path, caplog):
    root = _copy(tmp_path)
    bad = _pkg(root) / "C-NMC_training_data/fold_1/all/IMG_0001.bmp"
    shutil.copy(_pkg(root) / "C-NMC_training_data/fold_1/all/UID_23_4_1_all.bmp", bad)
    with pytest.raises(ValueError, match=r"(?s)1 bad .*IMG_0001\.bmp.*does not match"):
        cnmc.collect_records(root)
    with caplog.at_level(logging.WARNING):
        by_split = cnmc.collect_records(root, skip_bad_files=True)
    assert len(by_split["train"]) == _SPLITS["train"]
    assert "skipped 1 bad" in caplog.text and "IMG_0001.bmp" in caplog.text


def test_cell_in_the_wrong_class_folder_fails(tmp_path):
    root = _copy(tmp_path)
    fold = _pkg(root) / "C-NMC_training_data/fold_2"
    shutil.move(fold / "hem/UID_H22_7_3_hem.bmp", fold / "all/UID_H22_7_3_hem.bmp")
    with pytest.raises(ValueError, match=r"UID_H22_7_3_hem\.bmp: a 'hem' cell .* 'all/' folder"):
        cnmc.collect_records(root)


def test_bad_csv_rows_are_named_with_their_line(tmp_path):
    root = _copy(tmp_path)
    prelim = _pkg(root) / "C-NMC_test_prelim_phase_data"
    csv_path = prelim / "C-NMC_test_prelim_phase_data_labels.csv"
    lines = csv_path.read_text().splitlines()
    lines[2] = lines[2].replace(",1", ",0")  # label contradicts the UID name
    lines.append("UID_70_1_1_all.bmp,9.bmp,1")  # no such image
    csv_path.write_text("\n".join(lines) + "\n")
    shutil.copy(prelim / "1.bmp", prelim / "5.bmp")  # image without a row
    with pytest.raises(ValueError, match="3 bad") as info:
        cnmc.collect_records(root)
    message = str(info.value)
    assert f"{csv_path}:3: labels says 'hem'" in message
    assert f"{csv_path}:6: lists '9.bmp'" in message
    assert "5.bmp: has no row" in message


def test_csv_without_the_expected_header_fails(tmp_path):
    root = _copy(tmp_path)
    csv_path = _pkg(root) / "C-NMC_test_prelim_phase_data/C-NMC_test_prelim_phase_data_labels.csv"
    csv_path.write_text("name,label\n1.bmp,1\n")
    with pytest.raises(ValueError, match=r"labels\.csv: missing column\(s\) \['Patient_ID'"):
        cnmc.collect_records(root)


@pytest.mark.parametrize(
    "remove, expected",
    [
        ("C-NMC_test_final_phase_data", "C-NMC_test_final_phase_data/' folder"),
        (
            "C-NMC_test_prelim_phase_data/C-NMC_test_prelim_phase_data_labels.csv",
            "file 'C-NMC_test_prelim_phase_data_labels.csv'",
        ),
        ("C-NMC_training_data/fold_2", r"fold_2/all is missing"),
    ],
)
def test_missing_parts_are_manual_dir_errors(tmp_path, remove, expected):
    root = _copy(tmp_path)
    target = _pkg(root) / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(common.ManualDirError, match=expected):
        cnmc.collect_records(root)


def test_two_copies_of_the_data_are_refused(tmp_path):
    root = _copy(tmp_path)
    shutil.copytree(_KAGGLE, root / "kaggle_copy")
    with pytest.raises(common.ManualDirError, match="found 2 copies of the 'fold_0/' folder"):
        cnmc.collect_records(root)


if __name__ == "__main__":
    testing.test_main()
