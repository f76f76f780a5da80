"""Tests of the ONNX export (:mod:`leukemia_tf.serving.onnx_export`).

Tiny cnn_tiny models at 32 px (fixtures in conftest.py), exported once per
module: the flat one with a stored temperature applied, the hierarchical one
as trained. Skipped where tf2onnx / onnx / onnxruntime are not installed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")
onnx = pytest.importorskip("onnx")

from leukemia_tf import rundir  # noqa: E402
from leukemia_tf.serving import export_lib, litert, onnx_export, portable  # noqa: E402

TEMPERATURE = 2.0


def _pixels(size: int, count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, trained_flat_model_dir, trained_hierarchical_model_dir) -> dict:
    """``{"flat", "hierarchical"}`` -> (model_dir, OnnxResult)."""
    root = tmp_path_factory.mktemp("onnx")
    flat = root / "flat_run"
    shutil.copytree(trained_flat_model_dir, flat)
    rundir.write_temperature(flat, TEMPERATURE)
    return {
        "flat": (
            str(flat),
            onnx_export.export_onnx(flat, root / "flat_export", apply_temperature=True),
        ),
        "hierarchical": (
            trained_hierarchical_model_dir,
            onnx_export.export_onnx(trained_hierarchical_model_dir, root / "hier_export"),
        ),
    }


@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
def test_onnx_reproduces_the_keras_model_and_the_portable_graph(exports, kind):
    model_dir, result = exports[kind]
    temperature = TEMPERATURE if kind == "flat" else 1.0
    assert result.version == 1 and result.opset == onnx_export.DEFAULT_OPSET
    assert result.temperature == temperature
    # The export's own check ran on the validation split and the coverage images.
    assert result.check["images"] > 0
    assert result.check["max_abs_difference"] <= portable.FLOAT_TOLERANCE

    model = onnx_export.OnnxModel(result.file)
    trained = rundir.load_trained_model(model_dir, float32=True)
    assert model.image_size == trained.image_size == 32
    assert model.class_names == trained.class_names
    # Any batch size, here 1 and 5.
    for count in (1, 5):
        pixels = _pixels(32, count, seed=count)
        check = portable.compare(model, trained, pixels, temperature)
        assert check["max_abs_difference"] <= portable.FLOAT_TOLERANCE
        assert check["top1_agreement"] == 1.0
        got = model.numeric(pixels)
        _, function = portable.numeric_function(trained, temperature)
        want = {k: v.numpy() for k, v in function(pixels).items()}
        assert sorted(got) == sorted(want) == sorted(model.metadata["outputs"])
        for key, value in want.items():
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            if value.dtype.kind == "f":
                np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-4, err_msg=key)
            else:  # ids and decisions: the same values
                np.testing.assert_array_equal(got[key], value, err_msg=key)
    if kind == "hierarchical":
        assert "level_0_ids" in got and model.metadata["taxonomy_levels"]


def test_metadata_round_trip_and_layout(exports):
    model_dir, result = exports["flat"]
    folder = Path(result.path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [onnx_export.MODEL_FILE, "labels.txt", "export.json", "config.json"]
    )
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp")]
    written = json.loads((folder / "export.json").read_text())
    proto = onnx.load(result.file)
    embedded = onnx_export.read_metadata(proto)
    assert embedded == written == onnx_export.OnnxModel(result.file).metadata
    assert proto.model_version == result.version
    assert written["format"] == "onnx" and written["format_version"] == portable.FORMAT_VERSION
    assert written["temperature"] == TEMPERATURE and written["temperature_applied"] is True
    assert written["onnx"]["opset"] == onnx_export.DEFAULT_OPSET
    assert written["check"]["max_abs_difference"] == result.check["max_abs_difference"]
    assert written["input"]["name"] == portable.INPUT
    assert (folder / "labels.txt").read_text().split() == written["class_names"]
    assert {i.name for i in proto.graph.input} == {portable.INPUT}
    assert {n.domain for n in proto.graph.node} <= set(onnx_export.STANDARD_DOMAINS)
    assert (Path(exports["hierarchical"][1].path) / "taxonomy.yaml").is_file()


def test_named_outputs_are_the_litert_ones(exports):
    model_dir, result = exports["hierarchical"]
    model = onnx_export.OnnxModel(result.file)
    trained = rundir.load_trained_model(model_dir, float32=True)
    tflite = litert._BytesModel(litert.convert(trained))
    tflite.metadata = model.metadata
    pixels = _pixels(32, 4, seed=7)
    got, want = model(pixels), tflite(pixels)
    assert sorted(got) == sorted(want)
    assert "class_names" in got and "level_0_names" in got
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        if value.dtype.kind == "f":
            np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-4, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_bad_destinations_and_flags_are_refused_before_converting(tmp_path, exports):
    model_dir, _ = exports["hierarchical"]
    export_dir = tmp_path / "export"
    for version in (0, "2", True):
        with pytest.raises(ValueError, match="--version="):
            onnx_export.export_onnx(model_dir, export_dir, version=version)
    (export_dir / "3").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="3 already exists.*version 4"):
        onnx_export.export_onnx(model_dir, export_dir, version=3)
    with pytest.raises(ValueError, match="--opset=99"):
        onnx_export.export_onnx(model_dir, export_dir, opset=99)
    assert sorted(p.name for p in export_dir.iterdir()) == ["3"]
    assert export_lib.next_version(export_dir) == 4


def test_model_files_without_metadata_are_refused(tmp_path, exports):
    with pytest.raises(FileNotFoundError, match="no such file"):
        onnx_export.OnnxModel(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError, match="not an ONNX model"):
        onnx_export.OnnxModel(garbage)
    proto = onnx.load(exports["flat"][1].file)
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ValueError, match="without leukemia_tf metadata.*--format=onnx"):
        onnx_export.OnnxModel(bare)
    stale = onnx_export.embed_metadata(proto, {"format_version": 0})
    onnx.save(stale, str(bare))
    with pytest.raises(ValueError, match="metadata format 0"):
        onnx_export.OnnxModel(bare)


@pytest.mark.parametrize("module", ["tf2onnx", "onnxruntime"])
def test_a_missing_toolchain_names_the_extra(monkeypatch, tmp_path, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'leukemia_tf\[onnx\]'"):
        if module == "tf2onnx":
            onnx_export.export_onnx(tmp_path / "run", tmp_path / "export")
        else:
            onnx_export.OnnxModel(__file__)
