"""Tests of scaling out: TPU config checks, static input shapes, XLA, remote model_dirs,
and multi-worker training (two worker processes on loopback; marked slow).

Nothing here needs a GPU or a TPU: what a TPU run depends on is checked on the CPU
(the config checks, the input functions' static shapes and dtypes, an XLA-compiled
training step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_train_config

from leukemia_tf import rundir
from leukemia_tf.training import config as config_lib
from leukemia_tf.training import distribute
from leukemia_tf.training.config import ConfigError, TrainConfig, check_tpu_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


# ---------------------------------------------------------------- TPU checks
def _tpu_cfg(**overrides) -> TrainConfig:
    values = dict(
        strategy="tpu",
        tpu="my-tpu",
        data_dir="gs://bucket/tensorflow_datasets",
        model_dir="gs://bucket/runs/x",
        batch_size=128,
        steps_per_execution=32,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("name", ["data_dir", "model_dir"])
@pytest.mark.parametrize("value", ["", "/home/me/tensorflow_datasets", "runs/x"])
def test_cloud_tpu_needs_gcs_paths(name, value):
    cfg = _tpu_cfg(**{name: value})
    with pytest.raises(ConfigError, match=rf"--{name}='{value}': a Cloud TPU .* gs://"):
        check_tpu_config(cfg)
    # validate() runs the same checks, before any TPU is contacted.
    with pytest.raises(ConfigError, match=rf"--{name}="):
        cfg.validate()


def test_cloud_tpu_refuses_a_local_cache_file():
    with pytest.raises(ConfigError, match="--cache='/tmp/cache/': a Cloud TPU"):
        check_tpu_config(_tpu_cfg(cache="/tmp/cache/"))
    assert check_tpu_config(_tpu_cfg(cache="gs://bucket/cache/"), 8) == []
    assert check_tpu_config(_tpu_cfg(cache="none"), 8) == []


def test_tpu_vm_takes_local_paths():
    cfg = _tpu_cfg(
        tpu="local",
        data_dir="/content/tensorflow_datasets",
        model_dir="/content/runs/x",
        cache="/content/cache/",
    )
    assert check_tpu_config(cfg, 8) == []
    cfg.validate()
    # strategy=auto with --tpu also means a TPU run.
    with pytest.raises(ConfigError, match="--data_dir="):
        _tpu_cfg(strategy="auto", data_dir="/local").validate()


def test_tpu_refuses_float16():
    with pytest.raises(ConfigError, match="--precision=mixed_float16: TPUs compute in bfloat16"):
        check_tpu_config(_tpu_cfg(precision="mixed_float16"))
    assert check_tpu_config(_tpu_cfg(precision="mixed_bfloat16"), 8) == []
    assert check_tpu_config(_tpu_cfg(precision="auto"), 8) == []


def test_tpu_batch_must_split_into_equal_static_core_batches():
    with pytest.raises(ConfigError, match=r"--batch_size=60 \(global\) does not split over the 8"):
        check_tpu_config(_tpu_cfg(batch_size=60), 8)
    # A strategy object works too (anything with num_replicas_in_sync).
    with pytest.raises(ConfigError, match="over the 8 TPU cores"):
        check_tpu_config(_tpu_cfg(batch_size=60), SimpleNamespace(num_replicas_in_sync=8))
    assert check_tpu_config(_tpu_cfg(batch_size=64), SimpleNamespace(num_replicas_in_sync=8)) == []
    # Without the replica count (before the TPU is connected) this is not checked.
    assert check_tpu_config(_tpu_cfg(batch_size=60)) == []


def test_tpu_warnings_for_slow_settings():
    warnings = check_tpu_config(_tpu_cfg(batch_size=32, steps_per_execution=1, xla=True), 8)
    assert len(warnings) == 3
    assert "4 examples per TPU core" in warnings[0]
    assert "--steps_per_execution=1" in warnings[1]
    assert "--xla is implied" in warnings[2]


def test_no_tpu_checks_off_tpu():
    cfg = TrainConfig(model_dir="runs/x", data_dir="/local", precision="mixed_float16")
    assert not config_lib.targets_tpu(cfg)
    assert check_tpu_config(cfg, 3) == []
    cfg.validate()


def test_tpu_flag_needs_tpu_strategy():
    with pytest.raises(ConfigError, match="--tpu='local' with --strategy=mirrored"):
        TrainConfig(model_dir="x", strategy="mirrored", tpu="local").validate()
    with pytest.raises(ConfigError, match="--strategy=tpu needs --tpu"):
        TrainConfig(model_dir="x", strategy="tpu").validate()


def test_recipe_runs_on_tpu_with_only_strategy_flags(monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe includes configs/base_finetune.flags, cwd-relative
    recipe = REPO / "configs" / "finetune_efficientnetv2_b0_hierarchical.flags"
    cfg = config_lib.parse_flagfile(recipe, ["--strategy=tpu", "--tpu=local"])
    cfg.validate()
    assert check_tpu_config(cfg, 8) == []  # batch 64 = 8 per core, 16 steps per call
    with pytest.raises(ConfigError, match="--data_dir"):
        config_lib.parse_flagfile(recipe, ["--strategy=tpu", "--tpu=my-tpu"]).validate()
    remote = config_lib.parse_flagfile(
        recipe,
        [
            "--strategy=tpu",
            "--tpu=my-tpu",
            "--data_dir=gs://b/tensorflow_datasets",
            "--model_dir=gs://b/runs/r",
        ],
    )
    remote.validate()
    assert check_tpu_config(remote, 8) == []
    # On a 32-core slice the recipe's batch is small: a warning, not an error.
    assert "2 examples per TPU core" in check_tpu_config(remote, 32)[0]


# ---------------------------------------------------------- input functions
def _specs():
    from leukemia_tf.data import pipeline

    return pipeline.parse_datasets("leukemia_synthetic")


def test_train_input_has_static_shapes_and_no_strings(synthetic_data_dir):
    from leukemia_tf.taxonomy import Taxonomy
    from leukemia_tf.training import inputs

    cfg = TrainConfig(
        data_dir=synthetic_data_dir,
        image_size=32,
        batch_size=16,
        model_dir="x",
        label_mode="taxonomy",
        cache="none",
    )
    # As on a TPU v2-8: one input pipeline feeding 8 cores.
    ctx = tf.distribute.InputContext(
        num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=8
    )
    taxonomy = Taxonomy.load()
    ds_uint8 = inputs.train_input_fn(cfg, _specs(), synthetic_data_dir, taxonomy)(ctx)
    ds_bf16 = inputs.train_input_fn(cfg, _specs(), synthetic_data_dir, taxonomy, tf.bfloat16)(ctx)
    for ds, dtype in ((ds_uint8, tf.uint8), (ds_bf16, tf.bfloat16)):
        spec = ds.element_spec
        assert set(spec) == {"image", "label", "levels"}, "strings must not reach the step"
        assert all(s.shape.is_fully_defined() for s in spec.values()), spec
        assert spec["image"].shape == (2, 32, 32, 3)  # 16 / 8 replicas, drop_remainder
        assert spec["image"].dtype == dtype
        assert spec["levels"].shape == (2, taxonomy.num_levels)
    # bfloat16 (a TPU takes no uint8) carries every grey level exactly.
    levels = tf.range(256, dtype=tf.int32)
    np.testing.assert_array_equal(
        tf.cast(tf.cast(tf.cast(levels, tf.uint8), tf.bfloat16), tf.int32), levels
    )


@pytest.mark.parametrize(
    "pipelines,replicas", [(1, 3), (2, 4)], ids=["1host-3replicas", "2workers-2replicas-each"]
)
def test_eval_input_pads_to_equal_full_batches(synthetic_data_dir, pipelines, replicas):
    """Every replica gets as many full batches; each example is seen once in all."""
    from leukemia_tf.data import pipeline
    from leukemia_tf.training import inputs

    num, per_replica = 13, 2
    cfg = TrainConfig(
        data_dir=synthetic_data_dir,
        image_size=32,
        batch_size=per_replica * replicas,
        val_split=f"validation[:{num}]",
        model_dir="x",
    )
    fn = inputs.eval_input_fn(cfg, _specs(), synthetic_data_dir, None, num)
    per_pipeline = []
    for pid in range(pipelines):
        ctx = tf.distribute.InputContext(
            num_input_pipelines=pipelines, input_pipeline_id=pid, num_replicas_in_sync=replicas
        )
        ds = fn(ctx)
        spec = ds.element_spec
        assert all(s.shape.is_fully_defined() for s in spec.values()), spec
        assert spec["image"].shape[0] == per_replica
        per_pipeline.append(list(ds.as_numpy_iterator()))
    counts = {len(b) for b in per_pipeline}
    assert len(counts) == 1, f"pipelines hold different numbers of batches: {counts}"
    # 13 examples = 7 batches of 2, padded to a multiple of the replicas.
    total = -(-7 // replicas) * replicas
    assert counts.pop() * pipelines == total
    batches = [b for per in per_pipeline for b in per]
    valid = np.concatenate([b["valid"] for b in batches]).astype(bool)
    labels = np.concatenate([b["label"] for b in batches])[valid]
    images = np.concatenate([b["image"] for b in batches])[valid]
    reference = next(
        pipeline.load_split(
            _specs(),
            f"validation[:{num}]",
            data_dir=synthetic_data_dir,
            image_size=32,
            batch_size=num,
            training=False,
            deterministic=True,
        ).as_numpy_iterator()
    )

    # Each example of the split exactly once (in any order).
    def rows(images, labels):
        return sorted(zip(labels.tolist(), (im.tobytes() for im in images), strict=True))

    assert rows(images, labels) == rows(reference["image"], reference["label"])
    padding = np.concatenate([b["image"] for b in batches])[~valid]
    assert padding.shape[0] == total * per_replica - num and not padding.any()


# ------------------------------------------------------------------- training
def test_xla_compiles_the_whole_train_step_on_cpu(tmp_path, synthetic_data_dir):
    """--xla: the step with augmentation, MixUp/CutMix, a hierarchical head, class
    weights and EMA compiles with jit_compile=True (what a TPU compiles too)."""
    from leukemia_tf.training import train_lib

    cfg = tiny_train_config(
        synthetic_data_dir,
        tmp_path / "xla",
        steps_per_epoch=2,
        xla=True,
        label_mode="taxonomy",
        head="hierarchical",
        mixup_alpha=0.2,
        cutmix_alpha=0.2,
        class_weighting="balanced",
        ema=True,
        val_split="",  # evaluation is not compiled with XLA; skip it
    )
    result = train_lib.train(cfg)
    assert np.isfinite(result.history[0]["loss"])


@pytest.mark.slow
def test_xla_under_mirrored_strategy(tmp_path, synthetic_data_dir):
    """--xla with two replicas (two logical CPUs): compiled per replica, synced outside XLA."""
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from leukemia_tf.training import config as config_lib, inputs, train_lib
        cfg = config_lib.TrainConfig(
            datasets="leukemia_synthetic", data_dir={synthetic_data_dir!r}, backbone="cnn_tiny",
            image_size=32, batch_size=16, epochs=1, steps_per_epoch=2, precision="float32",
            strategy="mirrored", verbose=0, xla=True, mixup_alpha=0.2, ema=True,
            val_split="validation[:20]", model_dir=sys.argv[1])
        result = train_lib.train(cfg)
        assert np.isfinite(result.history[0]["loss"]), result.history
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["num_replicas"] == 2


def test_remote_model_dir_writes_and_resumes(synthetic_data_dir):
    """model_dir through tf.io.gfile (TF's in-memory ram:// stands in for gs://)."""
    from leukemia_tf.training import train_lib

    model_dir = f"ram://leukemia_tf_test/{uuid.uuid4().hex}/run"
    cfg = tiny_train_config(
        synthetic_data_dir,
        model_dir,
        epochs=2,
        steps_per_epoch=2,
        val_split="validation[:30]",
    )

    class Killed(Exception):
        pass

    def kill(epoch, logs):
        raise Killed()

    with pytest.raises(Killed):
        train_lib.train(cfg, callbacks=[kill])
    assert tf.io.gfile.exists(f"{model_dir}/backup/checkpoint")
    seen = []
    result = train_lib.train(cfg, callbacks=[lambda epoch, logs: seen.append(epoch)])
    assert seen == [1]
    assert [row["epoch"] for row in result.history] == [0, 1]
    names = set(tf.io.gfile.listdir(model_dir))
    assert {"best.keras", "last.keras", "history.csv", "train_summary.json", "logs"} <= names
    assert "backup" not in names
    assert rundir.read_config(model_dir) == cfg
    labels = tf.io.gfile.GFile(f"{model_dir}/labels.txt").read().split()
    assert labels == result.class_names
    assert keras.models.load_model(f"{model_dir}/best.keras") is not None


# ---------------------------------------------------------- multi-worker bits
def test_remove_worker_dir_cleans_scratch_space(tmp_path):
    model_dir = str(tmp_path)
    scratch = [tmp_path / rundir.WORKERS_DIR / f"worker_{i}" for i in (1, 2)]
    for path in scratch:
        (path / "backup").mkdir(parents=True)
        (path / "backup" / "ckpt-1.index").write_text("x")
    distribute.remove_worker_dir(model_dir, model_dir)  # the chief: nothing to do
    assert all(p.exists() for p in scratch)
    distribute.remove_worker_dir(model_dir, str(scratch[0]))
    assert not scratch[0].exists() and scratch[1].exists()
    distribute.remove_worker_dir(model_dir, str(scratch[1]))
    assert not (tmp_path / rundir.WORKERS_DIR).exists()


class _TwoWorkers:
    """Stands in for a 2-replica strategy whose other worker holds ``other``."""

    num_replicas_in_sync = 2

    def __init__(self, epoch: int, fingerprint: int):
        self.other = tf.constant([epoch, epoch**2, fingerprint, fingerprint**2], tf.float64)

    def run(self, fn):
        return fn()

    def reduce(self, op, value, axis):
        return value + self.other


def test_workers_must_agree_on_epoch_and_flags():
    distribute.check_workers_agree(_TwoWorkers(3, 17), 3, 17)
    with pytest.raises(RuntimeError, match="resume from different epochs.*shared disk"):
        distribute.check_workers_agree(_TwoWorkers(0, 17), 3, 17)
    with pytest.raises(RuntimeError, match="different training flags"):
        distribute.check_workers_agree(_TwoWorkers(3, 18), 3, 17)
    distribute.check_workers_agree(tf.distribute.get_strategy(), 5, 99)  # one replica


@pytest.mark.slow
def test_two_workers_match_one_process_and_resume_after_a_kill(tmp_path, synthetic_data_dir):
    """tools/multi_worker_check.py: 2 workers on loopback (see its docstring)."""
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "multi_worker_check.py"),
            f"--data_dir={synthetic_data_dir}",
            f"--work_dir={tmp_path / 'work'}",
            f"--report={report}",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(report.read_text())
    same = result["same_result"]
    assert same["max_abs_diff"] < same["max_bound"] and same["mean_abs_diff"] < 2e-5
    assert len(same["epochs"]) == 2
    assert result["resume"]["resumed_epochs"] == [[1], [1]]


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path, synthetic_data_dir):
    """tools/bench_gpu.py --smoke: the benchmark's code path, on the CPU, in about a minute."""
    output = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "bench_gpu.py"),
            "--smoke",
            "--devices=cpu",
            f"--data_dir={synthetic_data_dir}",
            f"--work_dir={tmp_path / 'work'}",
            f"--output={output}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(output.read_text())
    assert {(r["input"], r["device"]) for r in results} == {("pipeline", "cpu"), ("memory", "cpu")}
    assert all(r["images_per_s"] > 0 for r in results)
    assert "| cnn_tiny | cpu | float32 |" in proc.stdout


# ------------------------------------------------------------------- notebooks
def _train_flags(source: str) -> list[str]:
    """The flags of the ``python -m leukemia_tf.train`` command in a cell (with ``\\`` lines)."""
    lines = source.split("python -m leukemia_tf.train", 1)[1].splitlines()
    command = []
    for line in lines:
        command.append(line.rstrip("\\").strip())
        if not line.rstrip().endswith("\\"):
            break
    flags_ = " ".join(command).replace('"', "").split()
    # Shell variables stand for paths and data sets the notebook fills in.
    values = {"$DATASETS": "all_taleqani/original:1,pbc:1", "$DATA_DIR": "/content/tfds"}
    values["$MODEL_DIR"] = "/content/runs/r"
    out = []
    for flag in flags_:
        for var, value in values.items():
            flag = flag.replace(var, value)
        out.append(flag.replace("configs/", str(REPO / "configs") + "/"))
    return out


@pytest.mark.parametrize("name", ["colab_tpu.ipynb", "colab_gpu.ipynb"])
def test_colab_notebooks_are_valid_and_run_the_recipe(name, monkeypatch):
    monkeypatch.chdir(REPO)  # as the notebooks' `cd "$SRC"`: recipes include configs/base_*
    nb = json.loads((REPO / "tools" / name).read_text())
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 4
    ids = [cell["id"] for cell in nb["cells"]]
    assert len(set(ids)) == len(ids)
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    text = "\n".join(code)
    # Every command it runs exists.
    for module in ("train", "evaluate", "export", "build_data"):
        assert f"python -m leukemia_tf.{module}" in text
        assert (REPO / "leukemia_tf" / f"{module}.py").is_file()
    train = next(c for c in code if "python -m leukemia_tf.train" in c)
    flags_ = _train_flags(train)
    recipe = next(f.split("=", 1)[1] for f in flags_ if f.startswith("--flagfile="))
    assert Path(recipe).is_file(), recipe
    cfg = config_lib.parse_flagfile(recipe, [f for f in flags_ if not f.startswith("--flagfile")])
    cfg.validate()
    if name == "colab_tpu.ipynb":
        assert (cfg.strategy, cfg.tpu) == ("tpu", "local")
        assert check_tpu_config(cfg, 8) == []
        # The TPU build of TensorFlow, and this package without its `tensorflow` requirement.
        assert "tensorflow-tpu==" in text and "--no-deps" in text
    else:
        assert "bench_gpu.py" in text and (REPO / "tools" / "bench_gpu.py").is_file()
