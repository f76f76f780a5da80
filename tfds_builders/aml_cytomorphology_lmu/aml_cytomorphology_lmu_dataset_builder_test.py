"""Tests of the aml_cytomorphology_lmu builder on its dummy data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets import testing

from tfds_builders import common
from tfds_builders.aml_cytomorphology_lmu import aml_cytomorphology_lmu_dataset_builder as aml

_DUMMY = Path(__file__).parent / "dummy_data"
_PKG = _DUMMY / "PKG - AML-Cytomorphology_LMU"
_IMAGE_ROOT = _PKG / "AML-Cytomorphology"

# What dummy_data/.../annotations.dat says about the images on disk (rows are
# written with .tiff; BAS_0002 and MYO_0004 are .jpg on disk).
_REANNOTATED = {
    "BAS/BAS_0002.jpg": ("BAS", "BAS"),
    "MYO/MYO_0001.tiff": ("MYO", "UNC"),
    "MYO/MYO_0004.jpg": ("NGS", "MYO"),
    "NGS/NGS_0004.tiff": ("NGB", "NGS"),
}


class AmlCytomorphologyLmuTest(testing.DatasetBuilderTestCase):
    DATASET_CLASS = aml.Builder
    # 16 images: BAS 4, MYO 6, NGS 6 (TIFF and JPEG mixed).
    SPLITS = {"train": 10, "validation": 3, "test": 3}


def _build(manual_dir: Path, data_dir: Path) -> tfds.core.DatasetBuilder:
    builder = aml.Builder(data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def _examples(builder: tfds.core.DatasetBuilder) -> dict[str, dict]:
    out = {}
    for split in ("train", "validation", "test"):
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            out[ex["file_name"].decode()] = ex
    return out


def _on_disk(root: Path) -> list[str]:
    return sorted(f"{p.parent.name}/{p.name}" for p in root.glob("*/*") if p.is_file())


def test_tcia_layout_with_annotations(tmp_path):
    builder = _build(_DUMMY, tmp_path)
    assert builder.info.features["label"].names == list(aml.CLASS_CODES)
    examples = _examples(builder)
    assert sorted(examples) == _on_disk(_IMAGE_ROOT)
    for file_name, ex in examples.items():
        code = file_name.split("/")[0]
        assert aml.CLASS_CODES[ex["label"]] == code
        expected = _REANNOTATED.get(file_name, ("", ""))
        assert (ex["reannotation_1"].decode(), ex["reannotation_2"].decode()) == expected
        # RGBA TIFFs arrive as their exact RGB pixels; JPEGs as stored (TF's
        # and PIL's JPEG decoders differ by a few levels).
        with Image.open(_IMAGE_ROOT / file_name) as image:
            expected_pixels = np.asarray(image.convert("RGB"))
        if file_name.endswith(".tiff"):
            np.testing.assert_array_equal(ex["image"], expected_pixels)
        else:
            np.testing.assert_allclose(ex["image"], expected_pixels, atol=4)


def test_bare_class_folders_without_annotations(tmp_path):
    # Class folders straight in manual_dir (as in ../shared/data) and no
    # annotations.dat: every reannotation is empty.
    manual = tmp_path / "manual"
    for code_dir in _IMAGE_ROOT.iterdir():
        shutil.copytree(code_dir, manual / code_dir.name)
    examples = _examples(_build(manual, tmp_path / "data"))
    assert sorted(examples) == _on_disk(_IMAGE_ROOT)
    assert {(ex["reannotation_1"], ex["reannotation_2"]) for ex in examples.values()} == {
        (b"", b"")
    }


def test_read_annotations(tmp_path):
    path = tmp_path / "annotations.dat"
    path.write_text(
        "BAS/BAS_0026.tiff BAS BAS BAS\nEBO/EBO_0014.tiff EBO LYT EBO\n\nMYO/MYO_0001.tiff MYO nan nan\n"
    )
    assert aml.read_annotations(path) == {
        "BAS/BAS_0026": ("BAS", "BAS"),
        "EBO/EBO_0014": ("LYT", "EBO"),
        "MYO/MYO_0001": ("", ""),
    }
    path.write_text("BAS/BAS_0026.tiff BAS BAS BAS\nEBO/EBO_0014.tiff EBO LYT\n")
    with pytest.raises(ValueError, match=r"annotations\.dat:2: expected 4"):
        aml.read_annotations(path)


def test_same_image_in_two_formats_is_an_error(tmp_path):
    manual = tmp_path / "manual"
    shutil.copytree(_PKG, manual / "pkg")
    root = manual / "pkg" / "AML-Cytomorphology"
    Image.open(root / "MYO" / "MYO_0001.tiff").convert("RGB").save(root / "MYO" / "MYO_0001.jpg")
    with pytest.raises(common.ManualDirError, match="MYO_0001.jpg.*same image"):
        _build(manual, tmp_path / "data")


def test_two_different_annotation_files_are_an_error(tmp_path):
    manual = tmp_path / "manual"
    shutil.copytree(_PKG, manual / "pkg")
    (manual / "annotations.dat").write_text("BAS/BAS_0001.tiff BAS EOS EOS\n")
    with pytest.raises(common.ManualDirError, match="several different annotations.dat"):
        _build(manual, tmp_path / "data")


def test_no_class_folders_error_names_what_and_where(tmp_path):
    manual = tmp_path / "manual"
    (manual / "AML-Cytomorphology" / "not_a_class").mkdir(parents=True)
    (manual / "AML-Cytomorphology" / "not_a_class" / "x.tiff").write_bytes(b"")
    with pytest.raises(common.ManualDirError) as info:
        _build(manual, tmp_path / "data")
    message = str(info.value)
    assert str(manual) in message and "MYO" in message
    assert "cancerimagingarchive.net" in message


if __name__ == "__main__":
    testing.test_main()
