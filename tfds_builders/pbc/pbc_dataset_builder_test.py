"""Tests of the pbc builder on its dummy data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets import testing

from tfds_builders import common
from tfds_builders.pbc import pbc_dataset_builder

_DUMMY = Path(__file__).parent / "dummy_data"
_ANCHOR = _DUMMY / "PBC_dataset_normal_DIB" / "PBC_dataset_normal_DIB"


class PbcTest(testing.DatasetBuilderTestCase):
    DATASET_CLASS = pbc_dataset_builder.Builder
    # 32 images, 4 per class (the `._*` and `__MACOSX` files are not images).
    SPLITS = {"train": 16, "validation": 8, "test": 8}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("BA_100102.jpg", "BA"),
        ("MMY_104101.jpg", "MMY"),
        ("MY_117021.jpg", "MY"),
        ("PMY_210300.jpg", "PMY"),
        ("NEUTROPHIL_123011.jpg", "NEUTROPHIL"),
        ("PLATELET_1.JPG", "PLATELET"),
        ("sne_1.jpeg", "SNE"),
        ("XX_100102.jpg", ""),  # unknown prefix
        ("BA_100102 (1).jpg", ""),  # a copy made by a file manager
        ("BA-100102.jpg", ""),
        ("BA_.jpg", ""),
        ("BA_12.png", ""),
    ],
)
def test_file_subtype(name, expected):
    assert pbc_dataset_builder.file_subtype(name) == expected


def _build(manual_dir: Path, data_dir: Path) -> tfds.core.DatasetBuilder:
    builder = pbc_dataset_builder.Builder(data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def test_examples_match_files_on_disk(tmp_path):
    builder = _build(_DUMMY, tmp_path)
    label_names = builder.info.features["label"].names
    seen = []
    for split in ("train", "validation", "test"):
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            file_name = ex["file_name"].decode()
            seen.append((file_name, label_names[ex["label"]]))
            assert ex["subtype"].decode() == file_name.split("/")[1].split("_")[0]
            assert ex["source"] == b"pbc"
            assert ex["patient_id"] == b"" and ex["slide_id"] == b""
            assert ex["image"].ndim == 3 and ex["image"].shape[-1] == 3
    on_disk = [
        (f"{p.parent.name}/{p.name}", p.parent.name) for p in sorted(_ANCHOR.glob("*/[!.]*.jpg"))
    ]
    assert len(on_disk) == 32
    assert sorted(seen) == sorted(on_disk)


def test_missing_class_folders_error_names_what_and_where(tmp_path):
    manual = tmp_path / "manual"
    (manual / "PBC_dataset_normal_DIB" / "basophil").mkdir(parents=True)
    with pytest.raises(common.ManualDirError) as info:
        _build(manual, tmp_path / "data")
    message = str(info.value)
    assert str(manual) in message
    assert "neutrophil" in message and "data.mendeley.com" in message


def test_two_copies_are_an_error(tmp_path):
    manual = tmp_path / "manual"
    shutil.copytree(_ANCHOR, manual / "a" / "PBC_dataset_normal_DIB")
    shutil.copytree(_ANCHOR, manual / "b" / "PBC_dataset_normal_DIB")
    with pytest.raises(common.ManualDirError, match="found 2 copies of the folder"):
        _build(manual, tmp_path / "data")


def test_empty_class_folders_are_an_error(tmp_path):
    manual = tmp_path / "manual"
    for name in pbc_dataset_builder._NAMES:
        (manual / name).mkdir(parents=True)
    (manual / "basophil" / "notes.txt").write_text("not an image")
    with pytest.raises(common.ManualDirError, match="no image files"):
        _build(manual, tmp_path / "data")


if __name__ == "__main__":
    testing.test_main()
