"""Tests of the LiteRT export (``export --format=litert``) and ``predict --model=FILE``.

Tiny cnn_tiny models at 32 px (fixtures in conftest.py), trained on the
built-in synthetic set; the "real" images are that set's own images (its
validation split), written to a folder as a user's files would be.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from leukemia_tf import rundir
from leukemia_tf.data import preprocessing
from leukemia_tf.models import trust as trust_lib
from leukemia_tf.serving import export_lib, litert, portable, predict_lib, signatures, warmup

#: Largest probability difference between the float32 .tflite and the SavedModel.
FLOAT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def data_images(trained_flat_model_dir, tmp_path_factory) -> Path:
    """A folder of 24 images of the synthetic set's validation split (JPEG files)."""
    trained = rundir.load_trained_model(trained_flat_model_dir)
    root = tmp_path_factory.mktemp("litert_images") / "cells"
    root.mkdir()
    images = warmup.dataset_images(trained.config, limit=24)
    assert len(images) == 24
    for i, data in enumerate(images):
        (root / f"cell_{i:02d}.jpg").write_bytes(data)
    return root


def _pixels(folder: Path, image_size: int) -> np.ndarray:
    return np.stack(
        [
            preprocessing.decode_and_resize(p.read_bytes(), image_size).numpy()
            for p in sorted(folder.iterdir())
        ]
    )


def _export(model_dir, tmp_path, **kwargs) -> litert.LiteRTResult:
    return litert.export_litert(model_dir, tmp_path / "litert", **kwargs)


def _saved_model_outputs(model_dir, tmp_path, pixels) -> dict[str, np.ndarray]:
    """The exported SavedModel's ``predict_pixels`` outputs for ``pixels``."""
    result = export_lib.export_model(
        model_dir, tmp_path / "serving", write_warmup=False, verify=False
    )
    served = tf.saved_model.load(result.path).signatures[signatures.PREDICT_PIXELS](
        pixels=tf.constant(pixels, tf.float32)
    )
    return {k: v.numpy() for k, v in served.items()}


def _assert_same_outputs(got: dict, want: dict, atol: float) -> None:
    """Every output of ``want`` is in ``got`` with the same value (names exactly)."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key, value in want.items():
        if value.dtype == object or value.dtype.kind in "SUb":
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        elif key in (signatures.CLASS_IDS,):
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            # Distances move more than probabilities (a square root near 0).
            tolerance = atol if key not in trust_lib.FEATURE_SCORES else 1e-3
            np.testing.assert_allclose(got[key], value, rtol=1e-3, atol=tolerance, err_msg=key)


def test_float_litert_matches_the_saved_model(trained_flat_model_dir, data_images, tmp_path):
    result = _export(trained_flat_model_dir, tmp_path, version=3)
    assert result.path == str(tmp_path / "litert" / "3") and result.quantize == "none"
    assert result.check["max_abs_difference"] <= FLOAT_TOLERANCE
    folder = Path(result.path)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "export.json",
        "labels.txt",
        "model.tflite",
    ]
    model = litert.LiteRTModel(result.file)
    trained = rundir.load_trained_model(trained_flat_model_dir)
    assert (folder / "labels.txt").read_text().split() == trained.class_names
    assert model.class_names == trained.class_names and model.image_size == 32
    assert json.loads((folder / "export.json").read_text()) == model.metadata
    assert model.metadata["quantization"]["mode"] == "none"

    pixels = _pixels(data_images, model.image_size)
    want = _saved_model_outputs(trained_flat_model_dir, tmp_path, pixels)
    got = model(pixels)
    _assert_same_outputs(got, want, FLOAT_TOLERANCE)
    # The run has trust statistics: the trust outputs travel too.
    assert {"mahalanobis", "knn_distance", "referred", "predicted_node"} <= set(got)
    # Any batch size, including one image.
    one = model(pixels[:1])
    np.testing.assert_allclose(
        one[signatures.PROBABILITIES], got[signatures.PROBABILITIES][:1], atol=1e-6
    )


def test_hierarchical_litert_levels_match_the_saved_model(
    trained_hierarchical_model_dir, data_images, tmp_path
):
    result = _export(trained_hierarchical_model_dir, tmp_path)
    model = litert.LiteRTModel(result.file)
    levels = model.metadata["taxonomy_levels"]
    assert levels and model.metadata["outputs"][2:4] == ["level_0_probabilities", "level_0_ids"]
    assert (Path(result.path) / "taxonomy.yaml").is_file()
    pixels = _pixels(data_images, model.image_size)
    _assert_same_outputs(
        model(pixels),
        _saved_model_outputs(trained_hierarchical_model_dir, tmp_path, pixels),
        FLOAT_TOLERANCE,
    )


@pytest.mark.parametrize("model_format", ["litert", "onnx"])
def test_predict_writes_the_same_csv_from_the_portable_model(
    trained_flat_model_dir, data_images, tmp_path, model_format
):
    if model_format == "onnx":
        pytest.importorskip("tf2onnx")
        pytest.importorskip("onnxruntime")
        from leukemia_tf.serving import onnx_export

        result = onnx_export.export_onnx(trained_flat_model_dir, tmp_path / "onnx")
    else:
        result = _export(trained_flat_model_dir, tmp_path)
    keras_csv = predict_lib.predict(
        trained_flat_model_dir, str(data_images), tmp_path / "keras.csv", verbose=0
    )
    lite_csv = predict_lib.predict(
        None, str(data_images), tmp_path / "lite.csv", verbose=0, model=result.file
    )
    assert lite_csv.num_predicted == keras_csv.num_predicted == 24
    with open(keras_csv.output, newline="") as f:
        want = list(csv.DictReader(f))
    with open(lite_csv.output, newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == list(want[0])  # the same columns, in order
    selection = portable.load(result.file).metadata["selection"]

    def at_a_threshold(row) -> bool:
        """A score within float rounding of its referral threshold may fall either side."""
        return any(
            abs(float(row[selection[score]]) - selection[threshold])
            <= 1e-4 * max(1.0, abs(selection[threshold]))
            for score, threshold in (("score", "threshold"), ("ood_score", "ood_threshold"))
            if selection.get(score) and selection.get(threshold) is not None
        )

    flipped = 0
    for a, b in zip(got, want, strict=True):
        for column, value in b.items():
            try:
                expected = float(value)
            except ValueError:  # names, files, true/false
                if column in (trust_lib.REFERRED, trust_lib.OUT_OF_DISTRIBUTION) and (
                    a[column] != value
                ):
                    assert at_a_threshold(b), (column, b)
                    flipped += column == trust_lib.REFERRED
                    continue
                assert a[column] == value, column
            else:
                assert float(a[column]) == pytest.approx(expected, rel=1e-3, abs=1e-4), column
    assert abs(lite_csv.num_referred - keras_csv.num_referred) == flipped


def test_quantized_models_agree_on_the_top_class(trained_flat_model_dir, data_images, tmp_path):
    trained = rundir.load_trained_model(trained_flat_model_dir)
    pixels = _pixels(data_images, trained.image_size)
    reference = _export(trained_flat_model_dir, tmp_path)
    float_probs = litert.LiteRTModel(reference.file)(pixels)[signatures.PROBABILITIES]
    top2 = np.sort(float_probs, axis=-1)[:, -2:]
    # Images whose top class is not a near-tie (an 8-bit softmax resolves 1/256).
    clear = top2[:, 1] - top2[:, 0] > 0.02
    assert clear.sum() >= 8
    sizes = {}
    for mode, max_difference in (("float16", 1e-2), ("dynamic", 0.1), ("int8", 0.15)):
        result = _export(
            trained_flat_model_dir, tmp_path / mode, quantize=mode, calibration_images_count=32
        )
        sizes[mode] = result.size_bytes
        model = litert.LiteRTModel(result.file)
        probs = model(pixels)[signatures.PROBABILITIES]
        assert np.max(np.abs(probs - float_probs)) <= max_difference, mode
        agree = probs.argmax(-1) == float_probs.argmax(-1)
        assert agree[clear].mean() >= 0.9, (mode, agree[clear].mean())
        quantization = model.metadata["quantization"]
        assert quantization["mode"] == mode
        if mode == "int8":
            # Calibrated on the run's own training split, through the pipeline.
            assert quantization["calibration_images"] == 32
            assert quantization["calibration_split"] == "train"
            assert model.metadata["check"]["top1_agreement"] >= 0.5
    # Smaller than float32 (the trust statistics, float in every mode, weigh
    # much in a model this tiny).
    assert max(sizes.values()) < reference.size_bytes


def test_calibration_images_come_from_the_training_split(trained_flat_model_dir, tmp_path):
    trained = rundir.load_trained_model(trained_flat_model_dir)
    images = litert.calibration_images(trained, count=20, seed=1)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    again = litert.calibration_images(trained, count=20, seed=1)
    np.testing.assert_array_equal(images, again)  # deterministic from the seed
    assert len({im.tobytes() for im in images}) == 20
    moved = dataclasses.replace(
        trained, config=dataclasses.replace(trained.config, data_dir=str(tmp_path / "no"))
    )
    with pytest.raises(FileNotFoundError, match="calibrates on the run's training split"):
        litert.calibration_images(moved, count=4)


def test_metadata_round_trip_and_names():
    model = tf.lite.TFLiteConverter.from_concrete_functions(
        [
            tf.function(lambda x: {"y": x * 2.0}).get_concrete_function(
                tf.TensorSpec([None, 2], tf.float32)
            )
        ]
    ).convert()
    assert litert.read_metadata(model) is None
    meta = {"class_names": ["a", "b"], "nested": {"x": [1, 2]}}
    tagged = litert.embed_metadata(model, meta)
    assert litert.read_metadata(tagged) == meta
    # Embedding again replaces the entry rather than adding a second one.
    assert litert.read_metadata(litert.embed_metadata(tagged, {"v": 2})) == {"v": 2}
    named = portable.with_names(
        {
            "class_ids": np.array([1, 0]),
            "level_0_ids": np.array([0, -1], np.int32),
            trust_lib.PREDICTED_NODE_ID: np.array([-1, 2], np.int32),
        },
        {
            "class_names": ["a", "b"],
            "taxonomy_levels": [["n", "m"]],
            "backoff_nodes": ["n", "m", "a"],
        },
    )
    assert list(named["class_names"]) == [b"b", b"a"]
    assert list(named["level_0_names"]) == [b"n", b""]
    assert list(named["predicted_node"]) == [b"", b"a"]
    assert "level_0_ids" not in named and trust_lib.PREDICTED_NODE_ID not in named


def test_bad_input_is_named(trained_flat_model_dir, data_images, tmp_path):
    with pytest.raises(ValueError, match="--quantize='int4': must be one of"):
        _export(trained_flat_model_dir, tmp_path, quantize="int4")
    result = _export(trained_flat_model_dir, tmp_path, version=1)
    with pytest.raises(FileExistsError, match="already exists"):
        _export(trained_flat_model_dir, tmp_path, version=1)
    images = str(data_images)
    with pytest.raises(ValueError, match="--tta applies to a training run"):
        predict_lib.predict(None, images, tmp_path / "p.csv", model=result.file, tta=True)
    with pytest.raises(ValueError, match="exactly one of --model_dir"):
        predict_lib.predict(trained_flat_model_dir, images, tmp_path / "p.csv", model=result.file)
    with pytest.raises(ValueError, match="a portable model file"):
        predict_lib.predict(None, images, tmp_path / "p.csv", model=str(tmp_path / "m.h5"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        predict_lib.predict(None, images, tmp_path / "p.csv", model=str(tmp_path / "x.tflite"))
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer")
    with pytest.raises(ValueError, match="not a LiteRT"):
        litert.LiteRTModel(junk)
    bare = tmp_path / "bare.tflite"
    with open(result.file, "rb") as f:
        content = f.read()
    # The same graph without this package's metadata: no class names to write.
    from tensorflow.lite.tools import flatbuffer_utils

    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    tree.metadata = [m for m in tree.metadata if litert._decode(m.name) != litert.METADATA_NAME]
    bare.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(tree)))
    with pytest.raises(ValueError, match="without leukemia_tf metadata"):
        litert.LiteRTModel(bare)


def test_command_line(trained_flat_model_dir, data_images, tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", *args], capture_output=True, text=True, timeout=300
        )

    export = run(
        "leukemia_tf.export",
        f"--model_dir={trained_flat_model_dir}",
        f"--export_dir={tmp_path / 'lite'}",
        "--format=litert",
        "--quantize=dynamic",
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert "quantization dynamic" in export.stdout
    tflite = tmp_path / "lite" / "1" / "model.tflite"
    predict = run(
        "leukemia_tf.predict",
        f"--model={tflite}",
        f"--images={data_images}",
        f"--output={tmp_path / 'p.csv'}",
        "--verbose=0",
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert "Predicted 24 of 24" in predict.stdout
    wrong = run(
        "leukemia_tf.export",
        f"--model_dir={trained_flat_model_dir}",
        f"--export_dir={tmp_path / 'sm'}",
        "--quantize=int8",
    )
    assert wrong.returncode == 2 and "--quantize is an option of --format=litert" in wrong.stderr
    assert not (tmp_path / "sm").exists()
