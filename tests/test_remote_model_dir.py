"""Reading a trained run back from a remote model_dir (evaluate, export, predict).

TF's in-process ``ram://`` file system stands in for ``gs://``: both go
through ``tf.io.gfile`` only, and both are URLs that pathlib would mangle. The
tiny session-trained model of conftest.py is copied there (tests never write
into the session fixtures themselves).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from leukemia_tf import rundir
from leukemia_tf.data import preprocessing


def _copy_to_ram(local_dir: str) -> str:
    """Copies a local model_dir into a fresh ``ram://`` folder (with tf.io.gfile)."""
    remote = f"ram://remote_model_dir_{uuid.uuid4().hex[:8]}/run"
    for folder, _, files in os.walk(local_dir):
        relative = os.path.relpath(folder, local_dir)
        target = remote if relative == "." else f"{remote}/{relative.replace(os.sep, '/')}"
        tf.io.gfile.makedirs(target)
        for name in files:
            tf.io.gfile.copy(os.path.join(folder, name), f"{target}/{name}")
    return remote


@pytest.fixture
def ram_model_dir(trained_flat_model_dir) -> str:
    """A fresh ``ram://`` copy of the flat model_dir (tests may write into it)."""
    return _copy_to_ram(trained_flat_model_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """Three small PNG files, and their pixels as the model sees them (32 px)."""
    folder = tmp_path_factory.mktemp("remote_images")
    rng = np.random.default_rng(3)
    pixels = []
    for i, (h, w) in enumerate([(32, 32), (20, 28), (40, 36)]):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"cell{i}.png")
        data = (folder / f"cell{i}.png").read_bytes()
        pixels.append(preprocessing.decode_and_resize(data, 32).numpy())
    return folder, np.stack(pixels)


def test_path_helpers(tmp_path):
    assert rundir.is_remote("gs://bucket/run") and not rundir.is_remote(tmp_path)
    assert rundir.join("gs://bucket/run/", "eval_test", "report.md") == (
        "gs://bucket/run/eval_test/report.md"
    )
    assert rundir.join(tmp_path, "x") == str(tmp_path / "x")
    assert rundir.basename("gs://bucket/runs/quick/") == "quick"
    assert rundir.calibration_path("gs://b/run") == "gs://b/run/calibration.json"
    assert rundir.check_model_dir(tmp_path) == str(tmp_path)


def test_temperature_and_copy_tree_replace_files(tmp_path):
    remote = f"ram://remote_calibration_{uuid.uuid4().hex[:8]}"
    tf.io.gfile.makedirs(remote)
    assert rundir.read_temperature(remote) == 1.0
    rundir.write_temperature(remote, 2.5)
    rundir.write_temperature(remote, 1.5)  # ram:// would append on a plain "w"
    assert rundir.read_temperature(remote) == 1.5
    assert rundir.check_calibration(remote) == f"{remote}/calibration.json"

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")
    for _ in range(2):  # the second copy replaces the files, never appends
        copied = rundir.copy_tree(tmp_path, f"{remote}/tree")
    assert sorted(copied) == [f"{remote}/tree/a.txt", f"{remote}/tree/sub/b.txt"]
    assert rundir.read_text(f"{remote}/tree/sub/b.txt") == "b"
    back = tmp_path / "back"
    rundir.copy_tree(f"{remote}/tree", back)
    assert (back / "a.txt").read_text() == "a" and (back / "sub" / "b.txt").read_text() == "b"


def test_load_trained_model(trained_flat_model_dir, ram_model_dir, images):
    local = rundir.load_trained_model(trained_flat_model_dir)
    remote = rundir.load_trained_model(ram_model_dir)
    assert remote.model_dir == ram_model_dir  # not mangled into "ram:/..."
    assert remote.class_names == local.class_names
    assert remote.config == local.config and remote.temperature == 1.0
    _, pixels = images
    np.testing.assert_allclose(
        remote.probabilities(remote.outputs(pixels)),
        local.probabilities(local.outputs(pixels)),
        atol=1e-6,
    )
    last = rundir.load_trained_model(ram_model_dir, which=f"{ram_model_dir}/last.keras")
    assert last.class_names == local.class_names


def test_evaluate(trained_flat_model_dir, ram_model_dir, tmp_path):
    from leukemia_tf.evaluation import evaluate_lib
    from leukemia_tf.evaluation import metrics as metrics_lib

    quick = dict(split="test", bootstrap=0, explain_samples=0)
    local_dir = tmp_path / "model"
    shutil.copytree(trained_flat_model_dir, local_dir)
    local = evaluate_lib.evaluate(local_dir, **quick)
    remote = evaluate_lib.evaluate(ram_model_dir, **quick)

    out_dir = f"{ram_model_dir}/eval_test"
    assert remote["out_dir"] == out_dir
    assert remote["report_path"] == f"{out_dir}/report.md"
    assert remote["metrics_path"] == f"{out_dir}/metrics.json"
    for name in ("report.md", "metrics.json", "confusion_matrix.png", "roc_curves.png"):
        assert tf.io.gfile.exists(f"{out_dir}/{name}"), name
    with tf.io.gfile.GFile(f"{out_dir}/confusion_matrix.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads(rundir.read_text(remote["metrics_path"]))
    assert on_disk["model"]["model_dir"] == ram_model_dir
    assert rundir.read_text(remote["report_path"]).startswith("# Evaluation report: run on")
    # The same model on the same data: the same figures and temperature.
    for key in metrics_lib.HEADLINE:
        want = local["cell"][key]
        assert remote["cell"][key] == (None if want is None else pytest.approx(want, abs=1e-6))
    assert remote["calibration"]["temperature"] == pytest.approx(
        local["calibration"]["temperature"], rel=1e-5
    )
    assert rundir.read_temperature(ram_model_dir) == pytest.approx(
        remote["calibration"]["temperature"]
    )


def test_export(trained_flat_model_dir, ram_model_dir, images, tmp_path):
    from leukemia_tf.serving import export_lib

    quick = dict(write_warmup=False, verify=False)
    with pytest.raises(FileNotFoundError, match=f"{ram_model_dir}/calibration.json not found"):
        export_lib.export_model(ram_model_dir, tmp_path / "export", apply_temperature=True, **quick)
    rundir.write_temperature(ram_model_dir, 2.5)
    result = export_lib.export_model(
        ram_model_dir, tmp_path / "export", apply_temperature=True, **quick
    )
    assert result.version == 1 and result.temperature == 2.5
    meta = json.loads(Path(result.path, "assets", "export.json").read_text())
    assert meta["source_model_dir"] == ram_model_dir
    _, pixels = images
    served = (
        tf.saved_model.load(result.path)
        .signatures["predict_pixels"](pixels=tf.constant(pixels, tf.float32))["probabilities"]
        .numpy()
    )
    local = rundir.load_trained_model(trained_flat_model_dir)
    logits = local.outputs(pixels)["logits"]
    np.testing.assert_allclose(served, tf.nn.softmax(logits / 2.5).numpy(), atol=1e-5)


def test_predict(trained_flat_model_dir, ram_model_dir, images, tmp_path):
    from leukemia_tf.serving import predict_lib

    folder, _ = images
    with pytest.raises(FileNotFoundError, match=f"{ram_model_dir}/calibration.json not found"):
        predict_lib.predict(ram_model_dir, str(folder), tmp_path / "x.csv", apply_temperature=True)
    tables = {}
    for name, model_dir in (("local", trained_flat_model_dir), ("remote", ram_model_dir)):
        output = tmp_path / name / "predictions.csv"
        result = predict_lib.predict(model_dir, str(folder), output, verbose=0)
        assert (result.num_predicted, result.num_failed) == (3, 0)
        with open(output, newline="") as f:
            tables[name] = list(csv.DictReader(f))
    assert [r["file"] for r in tables["remote"]] == [r["file"] for r in tables["local"]]
    columns = [c for c in tables["local"][0] if c.startswith("prob")]
    got, want = (
        np.array([[float(r[c]) for c in columns] for r in tables[name]])
        for name in ("remote", "local")
    )
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_missing_remote_model_dir(images, tmp_path):
    from leukemia_tf.evaluation import evaluate_lib
    from leukemia_tf.serving import export_lib, predict_lib

    missing = f"ram://remote_missing_{uuid.uuid4().hex[:8]}/nowhere"
    message = f"--model_dir='{missing}' does not exist"
    folder, _ = images
    calls = {
        "check_model_dir": lambda: rundir.check_model_dir(missing),
        "load_trained_model": lambda: rundir.load_trained_model(missing),
        "evaluate": lambda: evaluate_lib.evaluate(missing),
        "export": lambda: export_lib.export_model(missing, tmp_path / "export"),
        "predict": lambda: predict_lib.predict(missing, str(folder), tmp_path / "p.csv"),
    }
    for name, call in calls.items():
        with pytest.raises(FileNotFoundError) as raised:
            call()
        assert message in str(raised.value), name
    assert not (tmp_path / "export").exists()
