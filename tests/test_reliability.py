"""No run loses or corrupts its results: non-finite values, two runs, kills, SIGTERM, resumes.

Kills are injected at named points with :func:`leukemia_tf.rundir.fault_point`
(``LEUKEMIA_TF_FAULT``) in a subprocess, never by timing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_train_config

from leukemia_tf import rundir
from leukemia_tf.training import run_state, steps, train_lib
from leukemia_tf.training.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _cfg(data_dir, model_dir, **overrides):
    return tiny_train_config(data_dir, model_dir, **{"epochs": 2, **overrides})


def _all_finite(path: Path) -> bool:
    model = keras.models.load_model(path)
    return all(np.isfinite(np.asarray(w)).all() for w in model.get_weights())


def _weights(path: Path) -> list[np.ndarray]:
    return [np.asarray(w) for w in keras.models.load_model(path).get_weights()]


# ------------------------------------------------------------------ non-finite
def test_nan_in_first_epoch_saves_nothing_and_the_hint_works(tmp_path, synthetic_data_dir):
    model_dir = tmp_path / "run"
    cfg = _cfg(synthetic_data_dir, model_dir, learning_rate=1e12, clipnorm=0.0, steps_per_epoch=5)
    with pytest.raises(train_lib.NonFiniteError, match=r"at step \d+") as error:
        train_lib.train(cfg)
    message = str(error.value)
    assert "--overwrite" in message and "flags.txt" in message
    for name in ("best.keras", "last.keras", "history.csv", "train_summary.json"):
        assert not (model_dir / name).exists(), name
    assert not tf.train.latest_checkpoint(str(model_dir / "backup"))
    # The suggested restart (afresh, with a sane rate) works.
    again = _cfg(synthetic_data_dir, model_dir, learning_rate=1e-3, overwrite=True)
    result = train_lib.train(again)
    assert len(result.history) == 2 and _all_finite(model_dir / "best.keras")


def test_nan_after_a_good_epoch_keeps_the_good_state(tmp_path, synthetic_data_dir, monkeypatch):
    model_dir = tmp_path / "run"
    real_end_epoch = run_state.RunState.end_epoch

    def end_epoch_then_poison(self, epoch, logs, steps_per_epoch):
        real_end_epoch(self, epoch, logs, steps_per_epoch)
        if epoch == 0:  # after epoch 1's checkpoint: the weights go bad
            for var in self.checkpoint.model.trainable_variables:
                var.assign(tf.fill(var.shape, float("nan")))

    monkeypatch.setattr(run_state.RunState, "end_epoch", end_epoch_then_poison)
    cfg = _cfg(synthetic_data_dir, model_dir, epochs=3)
    with pytest.raises(train_lib.NonFiniteError) as error:
        train_lib.train(cfg)
    message = str(error.value)
    assert "after epoch 1" in message and "--override_flags" in message
    assert _all_finite(model_dir / "best.keras") and _all_finite(model_dir / "last.keras")
    assert [r["epoch"] for r in rundir.read_history(str(model_dir))] == [0]
    monkeypatch.undo()
    # The suggested restart: the same run, a changed rate, --override_flags; it resumes.
    with pytest.raises(ConfigError, match="--learning_rate"):
        train_lib.train(_cfg(synthetic_data_dir, model_dir, epochs=3, learning_rate=1e-4))
    result = train_lib.train(
        _cfg(synthetic_data_dir, model_dir, epochs=3, learning_rate=1e-4, override_flags=True)
    )
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    assert all(np.isfinite(r["loss"]) for r in result.history)
    assert json.loads((model_dir / "config.json").read_text())["learning_rate"] == 1e-4


def test_nan_validation_metric_stops_before_saving(tmp_path, synthetic_data_dir, monkeypatch):
    real_call = steps.Evaluator.__call__

    def nan_loss(self, *args, **kwargs):
        return {**real_call(self, *args, **kwargs), "val_loss": float("nan")}

    monkeypatch.setattr(steps.Evaluator, "__call__", nan_loss)
    model_dir = tmp_path / "run"
    with pytest.raises(train_lib.NonFiniteError, match="val_loss=nan"):
        train_lib.train(_cfg(synthetic_data_dir, model_dir))
    assert not (model_dir / "best.keras").exists()
    assert not (model_dir / "last.keras").exists()


# ------------------------------------------------------------------------ lock
def test_second_run_in_the_same_model_dir_is_refused(tmp_path, synthetic_data_dir):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "since": "now", "token": "x"}
        (model_dir / ".lock").write_text(json.dumps(lock))
        with pytest.raises(rundir.RunLockedError, match=f"pid {holder.pid} on this host"):
            train_lib.train(_cfg(synthetic_data_dir, model_dir))
        assert json.loads((model_dir / ".lock").read_text())["pid"] == holder.pid
        assert sorted(p.name for p in model_dir.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale, taken over, and released at the end.
    result = train_lib.train(_cfg(synthetic_data_dir, model_dir, epochs=1))
    assert len(result.history) == 1
    assert not (model_dir / ".lock").exists()


def test_lock_names_a_holder_on_another_host(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    lock = {"pid": 1, "host": "elsewhere", "since": "then", "token": "x"}
    (model_dir / ".lock").write_text(json.dumps(lock))
    with pytest.raises(rundir.RunLockedError, match="pid 1 on elsewhere") as error:
        rundir.RunLock(str(model_dir)).acquire()
    assert "delete" in str(error.value)


def test_failed_start_leaves_no_empty_model_dir(tmp_path, synthetic_data_dir):
    model_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="--batch_size"):
        train_lib.train(_cfg(synthetic_data_dir, model_dir, batch_size=100_000, steps_per_epoch=0))
    assert not model_dir.exists()


# ------------------------------------------------------------- kills, SIGTERM
def _train_process(model_dir: Path, data_dir: str, fault: str | None, *extra: str):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop(rundir.FAULT_ENV, None)
    if fault:
        env[rundir.FAULT_ENV] = fault
    args = [
        sys.executable,
        "-m",
        "leukemia_tf.train",
        f"--flagfile={REPO / 'configs' / 'smoke.flags'}",
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        "--epochs=2",
        "--steps_per_epoch=3",
        "--deterministic",
        "--verbose=0",
        *extra,
    ]
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_kill_while_saving_leaves_the_previous_file(tmp_path, synthetic_data_dir):
    model_dir = tmp_path / "run"
    # SIGKILL between writing last.keras's temporary file and renaming it, in epoch 2.
    killed = _train_process(model_dir, synthetic_data_dir, "save:last.keras@2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    # Epoch 1's last.keras is whole; epoch 2's never replaced it.
    assert _all_finite(model_dir / "last.keras")
    assert [r["epoch"] for r in rundir.read_history(str(model_dir))] == [0]
    assert any(p.name.startswith(".last.tmp") for p in model_dir.iterdir())
    done = _train_process(model_dir, synthetic_data_dir, None)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["epoch"] for r in rundir.read_history(str(model_dir))] == [0, 1]
    assert not any(".tmp" in p.name for p in model_dir.iterdir())
    assert (model_dir / "train_summary.json").exists()


def test_sigterm_checkpoints_mid_epoch_and_resumes_to_the_same_weights(
    tmp_path, synthetic_data_dir
):
    reference = _train_process(tmp_path / "reference", synthetic_data_dir, None)
    assert reference.returncode == 0, reference.stderr[-2000:]
    model_dir = tmp_path / "run"
    # SIGTERM after the 4th training call: epoch 2, step 1 of 3.
    stopped = _train_process(model_dir, synthetic_data_dir, "step@4:TERM")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "SIGTERM" in stopped.stderr and "Resume with" in stopped.stderr
    assert run_state.peek_progress(str(model_dir)) == (1, 1)
    resumed = _train_process(model_dir, synthetic_data_dir, None)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    history = rundir.read_history(str(model_dir))
    assert [r["epoch"] for r in history] == [0, 1]
    expected = _weights(tmp_path / "reference" / "last.keras")
    for got, want in zip(_weights(model_dir / "last.keras"), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    want_rows = rundir.read_history(str(tmp_path / "reference"))
    np.testing.assert_allclose(
        [r["loss"] for r in history], [r["loss"] for r in want_rows], rtol=1e-5
    )
