"""Test-time augmentation (D4: 4 rotations x mirroring) in evaluate and predict; calibration caveats."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from leukemia_tf import rundir
from leukemia_tf.evaluation import evaluate_lib


def _numpy_views(images: np.ndarray) -> list[np.ndarray]:
    out = []
    for flipped in (images, images[:, :, ::-1]):
        for k in range(4):
            out.append(np.rot90(flipped, k=k, axes=(1, 2)))
    return out


def test_d4_views_are_the_eight_symmetries():
    image = np.arange(2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1)
    views = [v.numpy() for v in rundir.d4_views(image)]
    assert len(views) == 8
    # All 8 are different (the image has no symmetry) and they are the D4 group.
    assert len({v.tobytes() for v in views}) == 8
    expected = {v.tobytes() for v in _numpy_views(image)}
    assert {v.tobytes() for v in views} == expected


@pytest.mark.parametrize("fixture", ["trained_flat_model_dir", "trained_hierarchical_model_dir"])
def test_tta_forward_is_the_mean_of_the_views(request, fixture):
    model_dir = request.getfixturevalue(fixture)
    plain = rundir.load_trained_model(model_dir)
    tta = rundir.load_trained_model(model_dir, tta=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    got = tta.outputs(images)
    views = [plain.outputs(np.ascontiguousarray(v)) for v in _numpy_views(images)]
    assert set(got) == set(views[0])
    for key in got:
        expected = np.mean([v[key] for v in views], axis=0)
        np.testing.assert_allclose(got[key], expected, rtol=1e-4, atol=1e-4)
    # Not a no-op: the single view differs from the mean on random pixels.
    single = plain.outputs(images)
    assert any(not np.allclose(single[k], got[k], atol=1e-4) for k in got)


def test_evaluate_with_tta_writes_its_own_report(tmp_path, trained_flat_model_dir):
    model_dir = str(tmp_path / "run")
    shutil.copytree(trained_flat_model_dir, model_dir)
    calibration = os.path.join(model_dir, rundir.CALIBRATION_FILE)
    if os.path.exists(calibration):
        os.remove(calibration)
    result = evaluate_lib.evaluate(
        model_dir, split="test", bootstrap=0, explain_samples=0, tta=True
    )
    assert result["out_dir"].endswith("eval_test_tta")
    metrics = json.loads(open(os.path.join(model_dir, "eval_test_tta", "metrics.json")).read())
    assert metrics["model"]["test_time_augmentation"].startswith("D4")
    # The temperature of the TTA outputs is not stored over the served model's.
    assert not os.path.exists(calibration)
    assert "Test-time augmentation" in open(result["report_path"]).read()


def test_temperature_fitted_on_training_data_is_not_stored(tmp_path, trained_flat_model_dir):
    """A model trained on train+validation: its 'validation' temperature would be meaningless."""
    model_dir = tmp_path / "run"
    shutil.copytree(trained_flat_model_dir, model_dir)
    (model_dir / rundir.CALIBRATION_FILE).unlink(missing_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    config["train_split"] = "train+validation"
    (model_dir / "config.json").write_text(json.dumps(config))
    result = evaluate_lib.evaluate(str(model_dir), split="test", bootstrap=0, explain_samples=0)
    assert not (model_dir / rundir.CALIBRATION_FILE).exists()
    assert any("which the model was trained on" in note for note in result["caveats"])
