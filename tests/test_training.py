"""Tests of the training engine, its config and the recipes in configs/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_train_config

from leukemia_tf.training import config as config_lib

REPO = Path(__file__).resolve().parents[1]
# base_* flagfiles hold the lines that several recipes share; they are not recipes (no
# model_dir), so they are checked on their own below. The tune_* flagfiles take the search
# flags too; tests/test_tuning.py parses them.
BASES = sorted((REPO / "configs").glob("base_*.flags"))
CONFIGS = sorted(
    p for p in (REPO / "configs").glob("*.flags") if not p.name.startswith(("tune", "base_"))
)


def _flag_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.startswith("-")]


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_flagfile_parses_and_validates(path, monkeypatch):
    # absl opens a nested --flagfile=configs/base_*.flags relative to the working directory.
    monkeypatch.chdir(REPO)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must start with a comment giving its command"
    assert f"configs/{path.name}" in path.read_text(), (
        f"{path.name} must show the command running it"
    )
    cfg = config_lib.parse_flagfile(path)
    cfg.validate()


@pytest.mark.parametrize("path", BASES, ids=lambda p: p.name)
def test_base_flagfiles_are_shared_lines_not_recipes(path, monkeypatch):
    monkeypatch.chdir(REPO)
    include = f"--flagfile=configs/{path.name}"
    assert path.read_text().startswith("#") and include in path.read_text(), (
        f"{path.name} must start with a comment showing how a recipe includes it"
    )
    lines = _flag_lines(path)
    # Every line is a known flag with a valid value, but the base alone is no recipe: no output
    # directory (a run of it would share one) and no nested include.
    config_lib.parse_flagfile(path)
    assert not [line for line in lines if line.startswith(("--model_dir", "--flagfile"))]
    users = [p for p in CONFIGS if include in _flag_lines(p)]
    assert users, f"no recipe includes {path.name}"
    for user in users:
        own = _flag_lines(user)
        # First, so that the recipe's own lines override the base.
        assert own[0] == include, f"{user.name}: put {include} before its own flags"
        repeated = sorted(set(own) & set(lines))
        assert not repeated, f"{user.name} repeats lines of {path.name}: {repeated}"


def test_bad_values_name_the_flag():
    with pytest.raises(config_lib.ConfigError, match="--head=hierarchical needs --label_mode"):
        config_lib.TrainConfig(model_dir="x", head="hierarchical").validate()
    with pytest.raises(config_lib.ConfigError, match=r"--image_size=8: must be in \[16, 1024\]"):
        config_lib.TrainConfig(model_dir="x", image_size=8).validate()
    with pytest.raises(
        config_lib.ConfigError, match="--precision='fp8' is not allowed; choose one"
    ):
        config_lib.TrainConfig(model_dir="x", precision="fp8").validate()
    with pytest.raises(config_lib.ConfigError, match="--weights='/nope.h5': no such file"):
        config_lib.TrainConfig(model_dir="x", weights="/nope.h5").validate()
    with pytest.raises(config_lib.ConfigError, match="label_mode=taxonomy"):
        config_lib.TrainConfig(model_dir="x", datasets="pbc,all_taleqani").validate()
    with pytest.raises(config_lib.ConfigError, match="--freeze_epochs=5"):
        config_lib.TrainConfig(model_dir="x", epochs=5, freeze_epochs=5).validate()


def test_enum_flag_error_lists_allowed_values(tmp_path):
    flagfile = tmp_path / "bad.flags"
    flagfile.write_text("--strategy=horovod\n")
    with pytest.raises(
        Exception,
        match=r"--strategy=horovod: value should be one of <auto\|default\|mirrored\|multi_worker\|tpu>",
    ):
        config_lib.parse_flagfile(flagfile)


def test_flagfile_round_trip(tmp_path):
    cfg = config_lib.TrainConfig(
        model_dir=str(tmp_path / "m"), epochs=3, augment=False, mixup_alpha=0.4
    )
    from leukemia_tf import rundir

    rundir.write_config(str(tmp_path / "m"), cfg)
    again = config_lib.parse_flagfile(tmp_path / "m" / "flags.txt")
    assert again == cfg
    assert rundir.read_config(tmp_path / "m") == cfg


# -------------------------------------------------------------- training
@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    from leukemia_tf.data import build_data_lib as build_data

    data_dir = tmp_path_factory.mktemp("tfds")
    build_data.build("leukemia_synthetic", data_dir=str(data_dir))
    return str(data_dir)


def _cfg(tmp_path, data_dir, **overrides) -> config_lib.TrainConfig:
    values = dict(backbone="cnn_small", epochs=2)
    values.update(overrides)
    return tiny_train_config(data_dir, tmp_path / "model", **values)


@pytest.fixture(autouse=True)
def _float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_smoke_run_writes_everything(tmp_path, synthetic_dir):
    from leukemia_tf.training import train_lib

    cfg = _cfg(
        tmp_path,
        synthetic_dir,
        label_mode="taxonomy",
        head="hierarchical",
        mixup_alpha=0.2,
        cutmix_alpha=0.2,
        ema=True,
        class_weighting="balanced",
        freeze_epochs=1,
        steps_per_execution=2,
    )
    result = train_lib.train(cfg)
    model_dir = Path(cfg.model_dir)
    for name in (
        "best.keras",
        "last.keras",
        "config.json",
        "flags.txt",
        "history.csv",
        "labels.txt",
    ):
        assert (model_dir / name).is_file(), name
    summary = json.loads((model_dir / "train_summary.json").read_text())
    assert summary["steps_per_epoch"] == 3
    assert len(result.history) == 2
    assert set(result.best_metrics) >= {"val_accuracy", "val_macro_f1", "val_loss"}
    assert not (model_dir / "backup").exists()
    assert list((model_dir / "logs" / "train").iterdir()), "no TensorBoard events"
    # A finished run is not overwritten silently.
    with pytest.raises(config_lib.ConfigError, match="holds a finished run"):
        train_lib.train(cfg)
    reloaded = keras.models.load_model(model_dir / "best.keras")
    out = reloaded(np.zeros((2, 32, 32, 3), np.float32))
    assert set(out) == {f"level_{k}" for k in range(4)}

    from leukemia_tf import rundir

    trained = rundir.load_trained_model(model_dir)
    assert trained.class_names == (model_dir / "labels.txt").read_text().split()
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    probs = trained.probabilities(trained.outputs(images))
    assert probs.shape == (5, len(trained.class_names))
    # The classes are an antichain of taxonomy nodes: their marginals sum to <= 1.
    assert np.all(probs.sum(-1) <= 1 + 1e-5) and np.all(probs >= 0)
    expected = trained.label_space.probabilities(reloaded(images.astype(np.float32)))
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)


def test_ema_weights_are_saved_without_validation(tmp_path, synthetic_dir, monkeypatch):
    """With --ema, best/last.keras hold the EMA weights also when there is no validation split."""
    from leukemia_tf.training import ema, train_lib

    events = []
    swap = ema.swap
    save = keras.Model.save

    def logged_swap(optimizer, *args):
        events.append("swap")
        swap(optimizer, *args)

    def logged_save(self, path, *args, **kwargs):
        events.append(f"save {Path(path).name}")
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(ema, "swap", logged_swap)
    monkeypatch.setattr(keras.Model, "save", logged_save)
    train_lib.train(_cfg(tmp_path, synthetic_dir, val_split="", ema=True, epochs=2))
    saves = [i for i, e in enumerate(events) if e.startswith("save")]
    assert saves, events
    # Every save happens while the EMA weights are swapped in (an odd number of swaps before it).
    for i in saves:
        assert events[:i].count("swap") % 2 == 1, events
    assert events.count("swap") == 4, events  # swapped in and back once per epoch


def test_batchnorm_statistics_are_averaged_with_the_weights():
    """--ema averages BatchNorm's moving statistics too, and swaps them in with the weights."""
    from leukemia_tf.training import ema

    inputs = keras.Input((3,))
    bn = keras.layers.BatchNormalization()
    model = keras.Model(inputs, bn(keras.layers.Dense(3)(inputs)))
    optimizer = keras.optimizers.AdamW(use_ema=True, ema_momentum=0.5)
    optimizer.build(model.trainable_variables)
    pairs = ema.batchnorm_pairs(model)
    assert [var.path for var, _ in pairs] == [bn.moving_mean.path, bn.moving_variance.path]
    live = [np.full(3, v, np.float32) for v in (4.0, 8.0, 2.0)]
    for step, value in enumerate(live):
        bn.moving_mean.assign(value)
        bn.moving_variance.assign(value + 1)
        ema.update_batchnorm(pairs, tf.constant(0.0 if step == 0 else 0.5))
    # 4 (copied), then 0.5 * 4 + 0.5 * 8 = 6, then 0.5 * 6 + 0.5 * 2 = 4.
    np.testing.assert_allclose(pairs[0][1].numpy(), np.full(3, 4.0))
    np.testing.assert_allclose(pairs[1][1].numpy(), np.full(3, 5.0))
    bn.moving_mean.assign(np.full(3, 7.0, np.float32))
    ema.swap(optimizer, pairs)
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.full(3, 4.0))
    np.testing.assert_allclose(bn.moving_variance.numpy(), np.full(3, 5.0))
    np.testing.assert_allclose(pairs[0][1].numpy(), np.full(3, 7.0))
    ema.swap(optimizer, pairs)
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.full(3, 7.0))


@pytest.fixture
def batchnorm_ema(monkeypatch) -> dict:
    """``["pairs"]``: the (statistic, average) pairs of the latest ``engine.train`` with --ema."""
    from leukemia_tf.training import ema

    captured = {}
    make = ema.batchnorm_pairs

    def capture(model):
        captured["pairs"] = make(model)
        return captured["pairs"]

    monkeypatch.setattr(ema, "batchnorm_pairs", capture)
    return captured


def test_ema_run_saves_averaged_batchnorm_statistics(tmp_path, synthetic_dir, batchnorm_ema):
    """The saved EMA model holds the averaged statistics, which a checkpoint carries too."""
    from leukemia_tf.training import train_lib

    cfg = _cfg(tmp_path, synthetic_dir, val_split="", ema=True, ema_momentum=0.9, epochs=1)
    train_lib.train(cfg)
    pairs = batchnorm_ema["pairs"]
    assert pairs and all(var.dtype == avg.dtype for var, avg in pairs)
    saved = keras.models.load_model(Path(cfg.model_dir) / "last.keras")
    saved_stats = {v.path: v.numpy() for v in saved.non_trainable_variables}
    for var, average in pairs:
        # Saved: the average; left in the live model: the live statistic; not the same.
        np.testing.assert_allclose(saved_stats[var.path], average.numpy(), rtol=1e-6)
        assert not np.allclose(var.numpy(), average.numpy())


def test_killed_run_resumes_and_finishes(tmp_path, synthetic_dir, batchnorm_ema, monkeypatch):
    from leukemia_tf.training import train_lib

    cfg = _cfg(tmp_path, synthetic_dir, epochs=3, ema=True)

    class Killed(Exception):
        pass

    def kill_after_second_epoch(epoch, logs):
        if epoch == 1:
            raise Killed()

    with pytest.raises(Killed):
        train_lib.train(cfg, callbacks=[kill_after_second_epoch])
    backup = Path(cfg.model_dir) / "backup"
    assert backup.is_dir()
    assert not (Path(cfg.model_dir) / "train_summary.json").exists()
    # The BatchNorm averages are checkpointed, and restored on resume.
    checkpoint = tf.train.latest_checkpoint(str(backup))
    saved = {
        name: tf.train.load_variable(checkpoint, name)
        for name, _ in tf.train.list_variables(checkpoint)
        if name.startswith("batchnorm_ema/")
    }
    assert saved

    restored = []
    real_restore = tf.train.Checkpoint.restore

    def restore_and_record(self, path, *args, **kwargs):
        # The averages right after the restore (training moves them on).
        status = real_restore(self, path, *args, **kwargs)
        restored.extend(avg.numpy().copy() for _, avg in batchnorm_ema["pairs"])
        return status

    monkeypatch.setattr(tf.train.Checkpoint, "restore", restore_and_record)
    seen = []
    result = train_lib.train(cfg, callbacks=[lambda epoch, logs: seen.append(epoch)])
    assert seen == [2], "the resumed run must start after the last completed epoch"
    assert [row["epoch"] for row in result.history] == [0, 1, 2]
    values = sorted(v.tobytes() for v in restored)
    assert values == sorted(np.asarray(v, np.float32).tobytes() for v in saved.values())


def test_nan_loss_stops_with_step(tmp_path, synthetic_dir):
    from leukemia_tf.training import train_lib

    cfg = _cfg(
        tmp_path, synthetic_dir, learning_rate=1e12, clipnorm=0.0, epochs=3, steps_per_epoch=5
    )
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        train_lib.train(cfg)


def test_mixed_bfloat16_on_cpu(tmp_path, synthetic_dir):
    from leukemia_tf.training import train_lib

    cfg = _cfg(tmp_path, synthetic_dir, precision="mixed_bfloat16", epochs=1, steps_per_epoch=2)
    result = train_lib.train(cfg)
    assert np.isfinite(result.history[0]["loss"])
    summary = json.loads((Path(cfg.model_dir) / "train_summary.json").read_text())
    assert summary["precision"] == "mixed_bfloat16"
    keras.mixed_precision.set_global_policy("float32")

    from leukemia_tf import rundir

    trained = rundir.load_trained_model(cfg.model_dir)
    assert all(w.dtype == "float32" for w in trained.model.weights)
    assert all(layer.compute_dtype == "float32" for layer in trained.model.layers)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    mixed = keras.models.load_model(Path(cfg.model_dir) / "best.keras")
    np.testing.assert_allclose(
        trained.outputs(images)["logits"],
        np.asarray(mixed(images.astype(np.float32))["logits"], np.float32),
        atol=0.1,  # bfloat16 has 8 bits of mantissa
    )


def test_two_replica_mirrored_matches_single_device(tmp_path, synthetic_dir):
    """Two logical CPU devices under MirroredStrategy give the same weights as one device.

    A ViT (LayerNorm, no BatchNorm) keeps the comparison exact: BatchNorm
    normalises with per-replica batch statistics, which legitimately differ.
    """
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from leukemia_tf.training import config as config_lib, ema, train_lib
        strategy = sys.argv[1]
        cfg = config_lib.TrainConfig(
            datasets="leukemia_synthetic", data_dir={synthetic_dir!r}, backbone="vit_tiny_patch16",
            image_size=32, batch_size=16, epochs=1, steps_per_epoch=3, precision="float32",
            strategy=strategy, verbose=0, augment=False, deterministic=True, dropout=0.0,
            val_split="", model_dir=sys.argv[2])
        train_lib.train(cfg, fit_trust=False)  # the trust fit is not what this compares
        import keras
        model = keras.models.load_model(sys.argv[2] + "/last.keras")
        np.save(sys.argv[2] + "/w.npy", np.concatenate([w.ravel() for w in model.get_weights()]))
        """
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    weights, losses = {}, {}
    for strategy in ("default", "mirrored"):
        out = tmp_path / strategy
        proc = subprocess.run(
            [sys.executable, "-c", script, strategy, str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights[strategy] = np.load(out / "w.npy")
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["num_replicas"] == (2 if strategy == "mirrored" else 1)
        losses[strategy] = summary["history"][0]["loss"]
    # Same examples, same loss: the global batch is split, not duplicated.
    assert losses["mirrored"] == pytest.approx(losses["default"], rel=1e-4)
    # AdamW moves a weight by up to ~lr per step whatever its gradient's size,
    # so float summation-order noise in near-zero gradients may flip a few
    # updates: bound the worst case by the three steps' learning rates, and
    # require the typical weight to agree far more closely.
    diff = np.abs(weights["mirrored"] - weights["default"])
    assert diff.max() < 2e-3
    assert diff.mean() < 2e-5
