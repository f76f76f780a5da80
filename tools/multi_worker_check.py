r"""Checks multi-worker training on one machine: two workers on loopback.

Run from the repository root (CPU only; 4-9 minutes on 2 busy cores)::

  python tools/multi_worker_check.py
  python tools/multi_worker_check.py --data_dir=~/tensorflow_datasets --report=/tmp/mw.json

It starts worker processes on 127.0.0.1 (free ports) with ``TF_CONFIG`` and
``--strategy=multi_worker`` (``MultiWorkerMirroredStrategy``), one CPU replica
each, and checks:

(a) **Same result as one process.** The multi-worker run ends with the same
    per-epoch losses, validation metrics and weights as a single-process run
    (``--strategy=default``) with the same global batch. For that both must
    train on the same examples at every step. The synthetic training split is
    one TFRecord file, fewer files than workers, so the input is sharded by
    example (``AutoShardPolicy.DATA``-like: worker ``w`` keeps examples
    ``w, w + n, w + 2n, ...``, see ``leukemia_tf/data/pipeline.py``). With
    ``--shuffle_buffer=1`` (no example shuffle) and ``--deterministic``, the
    per-replica batch ``k`` of worker ``w`` is examples ``{B*k + w + n*j}``
    (``B`` the global batch, ``j < B/n``), and the union over the workers is
    examples ``B*k ... B*k + B - 1``: exactly the single process's batch ``k``.
    A ViT backbone (LayerNorm, no BatchNorm, whose per-replica batch
    statistics legitimately differ), no augmentation and no dropout leave
    only float summation order as a difference. Tolerances: losses to 1e-4
    relative; weights: AdamW moves a weight by up to about the learning rate
    per step whatever its gradient's size, so summation noise in a near-zero
    gradient can flip an update: the largest difference must stay below the
    sum of the steps' learning rates, and the mean below 2e-5.

    Validation runs on 100 examples: 12.5 per-replica batches of 8, so the
    padded last batch and a whole batch of padding are exercised, and the
    validation metrics must match too.

(b) **A killed worker lets the job resume.** A fresh two-worker run of 2
    epochs (``--resume_backbone``, a small CNN: nothing is compared exactly
    here): worker 1 kills itself (SIGKILL) right after epoch 1's backup;
    this tool, acting as the cluster manager, then kills the chief, which is
    in epoch 2 by then, and restarts both. The restarted run must train
    epoch 2 only (restoring the chief's backup in ``model_dir/backup`` on
    every worker), and end with the chief's files in ``model_dir``
    (``history.csv`` with both epochs, ``best.keras``, ``last.keras``,
    ``train_summary.json``, ...), no ``backup/`` and no non-chief scratch dir
    (``model_dir/.workers``).

Exit status 0 when every check passes; a JSON report goes to ``--report``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

_REPO = Path(__file__).resolve().parents[1]

_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "TFDS data_dir holding (or to receive) leukemia_synthetic; empty: in work_dir."
)
_WORK_DIR = flags.DEFINE_string("work_dir", "", "Scratch folder; empty: a new temporary folder.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Worker processes.")
_BACKBONE = flags.DEFINE_string(
    "backbone", "vit_tiny_patch16", "Backbone; keep one without BatchNorm for check (a)."
)
_RESUME_BACKBONE = flags.DEFINE_string(
    "resume_backbone",
    "cnn_tiny",
    "Backbone of check (b), which needs no exact comparison: a small graph traces faster.",
)
_STEPS = flags.DEFINE_integer("steps_per_epoch", 3, "Training steps per epoch.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Global batch size.")
_TIMEOUT = flags.DEFINE_integer("timeout", 600, "Seconds each phase may take.")
_REPORT = flags.DEFINE_string("report", "", "Write the JSON report here.")
_KEEP = flags.DEFINE_bool("keep", False, "Keep work_dir.")
_CHECKS = flags.DEFINE_list("checks", ["same_result", "resume"], "Checks to run.")
_WORKER_SPEC = flags.DEFINE_string("worker_spec", "", "(internal) run one worker from this JSON.")

#: Files a finished run leaves in model_dir (the chief's).
CHIEF_FILES = (
    "best.keras",
    "last.keras",
    "config.json",
    "flags.txt",
    "labels.txt",
    "history.csv",
    "train_summary.json",
    "logs",
)


# ------------------------------------------------------------------ a worker
def _run_worker(spec_path: str) -> None:
    """Runs one training process as the JSON spec says (called in the child)."""
    spec = json.loads(Path(spec_path).read_text())
    import numpy as np
    import tensorflow as tf

    # Two cores are shared by every process of the check: one thread per op.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    from leukemia_tf.training import config as config_lib
    from leukemia_tf.training import train_lib

    seen_path = Path(spec["seen"])

    def record(epoch: int, logs: dict) -> None:
        seen = json.loads(seen_path.read_text()) if seen_path.exists() else []
        seen_path.write_text(json.dumps([*seen, epoch]))
        if spec.get("kill_after_epoch") == epoch:
            # A hard kill: no exception handler, no cleanup, like a lost machine.
            os.kill(os.getpid(), signal.SIGKILL)

    config = config_lib.TrainConfig(**spec["config"])
    train_lib.train(config, callbacks=[record])
    if spec.get("weights"):
        import keras

        model = keras.models.load_model(os.path.join(config.model_dir, "last.keras"))
        np.save(spec["weights"], np.concatenate([w.ravel() for w in model.get_weights()]))


# ------------------------------------------------------------------ the check
def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _config(data_dir: str, model_dir: str, strategy: str, backbone: str = "") -> dict:
    return dict(
        datasets="leukemia_synthetic",
        data_dir=data_dir,
        backbone=backbone or _BACKBONE.value,
        image_size=32,
        batch_size=_BATCH.value,
        epochs=2,
        steps_per_epoch=_STEPS.value,
        precision="float32",
        strategy=strategy,
        verbose=0,
        augment=False,
        dropout=0.0,
        deterministic=True,
        shuffle_buffer=1,  # see (a) in the module docstring
        # 100 examples = 12.5 per-replica batches of 8: a padded partial batch
        # and, with 2 workers, a whole batch of padding (even batch counts).
        val_split="validation[:100]",
        model_dir=model_dir,
    )


class _Cluster:
    """Worker processes of one run (or one single process)."""

    def __init__(self, work: Path, name: str, config: dict, workers: int, **spec_extra):
        self.work, self.name = work, name
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.seen = [work / f"{name}_seen_{i}.json" for i in range(max(workers, 1))]
        ports = _free_ports(workers) if workers else []
        for i in range(max(workers, 1)):
            env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="1")
            env["PYTHONPATH"] = os.pathsep.join([str(_REPO), env.get("PYTHONPATH", "")])
            if workers:
                env["TF_CONFIG"] = json.dumps(
                    {
                        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                        "task": {"type": "worker", "index": i},
                    }
                )
            spec = {"config": config, "seen": str(self.seen[i])}
            for key, value in spec_extra.items():
                spec[key] = value(i) if callable(value) else value
            spec_path = work / f"{name}_spec_{i}.json"
            spec_path.write_text(json.dumps(spec))
            log = work / f"{name}_worker_{i}.log"
            self.logs.append(log)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, f"--worker_spec={spec_path}"],
                    env=env,
                    cwd=str(_REPO),
                    stdout=log.open("w"),
                    stderr=subprocess.STDOUT,
                )
            )

    def seen_epochs(self, i: int) -> list[int]:
        return json.loads(self.seen[i].read_text()) if self.seen[i].exists() else []

    def tail(self, i: int, n: int = 3000) -> str:
        return self.logs[i].read_text()[-n:]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def wait(self, timeout: float) -> list[int]:
        deadline = time.time() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(
                f"{self.name}: workers still running after {timeout:.0f} s (a hang?)\n"
                + "\n".join(f"--- worker {i}:\n{self.tail(i)}" for i in range(len(self.procs)))
            ) from None
        return [p.returncode for p in self.procs]

    def check_ok(self, timeout: float) -> None:
        codes = self.wait(timeout)
        for i, code in enumerate(codes):
            if code != 0:
                raise RuntimeError(f"{self.name}: worker {i} exited with {code}:\n{self.tail(i)}")


def _history(model_dir: Path) -> list[dict]:
    import csv

    with (model_dir / "history.csv").open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _lr_sum(model_dir: Path) -> float:
    """The sum of the learning rates of every step (the bound on a flipped weight)."""
    from leukemia_tf import rundir
    from leukemia_tf.training import schedules

    config = rundir.read_config(model_dir)
    steps = config.steps_per_epoch * config.epochs
    schedule = schedules.TwoStageWarmupCosine(
        peak_lr=config.learning_rate,
        total_steps=steps,
        warmup_steps=int(config.warmup_epochs * config.steps_per_epoch),
        min_ratio=config.min_lr_ratio,
        stage1_steps=config.steps_per_epoch * config.freeze_epochs,
        stage2_factor=config.finetune_lr_factor,
    )
    return float(sum(float(schedule(step)) for step in range(steps)))


def _ensure_data(data_dir: str) -> None:
    import tensorflow_datasets as tfds

    import tfds_builders  # noqa: F401  (registers the builders)
    from leukemia_tf.data.build_data_lib import build

    if not tfds.builder("leukemia_synthetic", data_dir=data_dir).is_prepared():
        print(f"Building leukemia_synthetic into {data_dir} ...", flush=True)
        build("leukemia_synthetic", data_dir=data_dir)


def check_same_result(work: Path, data_dir: str, workers: int, timeout: float) -> dict:
    """Check (a): the multi-worker run equals a single-process run with the same global batch."""
    import numpy as np

    t0 = time.time()
    single = _Cluster(
        work,
        "single",
        _config(data_dir, str(work / "single"), "default"),
        0,
        weights=str(work / "single_w.npy"),
    )
    single.check_ok(timeout)
    t1 = time.time()
    multi = _Cluster(
        work,
        "multi",
        _config(data_dir, str(work / "multi"), "multi_worker"),
        workers,
        weights=lambda i: str(work / "multi_w.npy") if i == 0 else "",
    )
    multi.check_ok(timeout)
    t2 = time.time()

    summary = json.loads((work / "multi" / "train_summary.json").read_text())
    # tf.distribute.MultiWorkerMirroredStrategy is CollectiveAllReduceStrategy's alias.
    if summary["num_replicas"] != workers or summary["strategy"] not in (
        "MultiWorkerMirroredStrategy",
        "CollectiveAllReduceStrategy",
    ):
        raise AssertionError(f"multi-worker run: unexpected strategy in summary: {summary}")
    h_single, h_multi = _history(work / "single"), _history(work / "multi")
    report = {"single_s": t1 - t0, "multi_s": t2 - t1, "epochs": []}
    for a, b in zip(h_single, h_multi, strict=True):
        row = {k: (a[k], b[k]) for k in ("loss", "val_loss", "val_accuracy")}
        report["epochs"].append(row)
        for key in ("loss", "val_loss"):
            if not np.isclose(a[key], b[key], rtol=1e-4, atol=0):
                raise AssertionError(f"epoch {int(a['epoch'])}: {key} single {a[key]} != {b[key]}")
        # Argmax ties may flip under float noise: allow one example in a thousand.
        if abs(a["val_accuracy"] - b["val_accuracy"]) > 1e-3:
            raise AssertionError(f"epoch {int(a['epoch'])}: val_accuracy {row['val_accuracy']}")
    w_single, w_multi = np.load(work / "single_w.npy"), np.load(work / "multi_w.npy")
    diff = np.abs(w_single - w_multi)
    bound = _lr_sum(work / "single")
    report.update(
        weights=int(w_single.size),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        max_bound=bound,
    )
    if not (diff.max() < bound and diff.mean() < 2e-5):
        raise AssertionError(
            f"weights differ: max {diff.max():.3g} (bound {bound:.3g}), mean {diff.mean():.3g} "
            "(bound 2e-5)"
        )
    # The chief's files are in place and no scratch is left.
    for name in CHIEF_FILES:
        if not (work / "multi" / name).exists():
            raise AssertionError(f"multi-worker run: {name} missing from model_dir")
    for name in ("backup", ".workers"):
        if (work / "multi" / name).exists():
            raise AssertionError(f"multi-worker run: {name} left in model_dir")
    return report


def check_resume(work: Path, data_dir: str, workers: int, timeout: float) -> dict:
    """Check (b): kill worker 1 after epoch 1, kill the chief, restart: epoch 2 only."""
    model_dir = work / "resume"
    config = _config(data_dir, str(model_dir), "multi_worker", _RESUME_BACKBONE.value)
    t0 = time.time()
    killed = _Cluster(
        work,
        "killed",
        config,
        workers,
        kill_after_epoch=lambda i: 0 if i == 1 else None,
    )
    deadline = time.time() + timeout
    # Cluster manager: when worker 1 is gone and the chief has finished epoch 1
    # (backup written, callbacks run), kill the chief, which is in epoch 2.
    while time.time() < deadline:
        if killed.procs[1].poll() is not None and 0 in killed.seen_epochs(0):
            break
        if killed.procs[0].poll() is not None:
            break
        time.sleep(0.5)
    else:
        killed.kill()
        raise RuntimeError("killed run: worker 1 did not die after epoch 1\n" + killed.tail(1))
    if killed.procs[1].returncode != -signal.SIGKILL:
        raise RuntimeError(
            f"worker 1 exited with {killed.procs[1].returncode}, not SIGKILL:\n{killed.tail(1)}"
        )
    chief_alive = killed.procs[0].poll() is None
    killed.kill()
    if (model_dir / "train_summary.json").exists():
        raise AssertionError("the killed run finished anyway")
    if not (model_dir / "backup").is_dir():
        raise AssertionError("the killed run left no backup in model_dir/backup")
    t1 = time.time()
    resumed = _Cluster(work, "resumed", config, workers)
    resumed.check_ok(timeout)
    t2 = time.time()
    seen = [resumed.seen_epochs(i) for i in range(workers)]
    if any(s != [1] for s in seen):
        raise AssertionError(f"the restarted workers trained epochs {seen}, expected [1] each")
    epochs = [int(row["epoch"]) for row in _history(model_dir)]
    if epochs != [0, 1]:
        raise AssertionError(f"history.csv holds epochs {epochs}, expected [0, 1]")
    for name in CHIEF_FILES:
        if not (model_dir / name).exists():
            raise AssertionError(f"resumed run: {name} missing from model_dir")
    left = sorted(p.name for p in model_dir.iterdir() if p.name not in CHIEF_FILES)
    if left:
        raise AssertionError(f"resumed run left {left} in model_dir (scratch or backup)")
    return {
        "killed_s": t1 - t0,
        "resumed_s": t2 - t1,
        "chief_alive_when_killed": chief_alive,
        "resumed_epochs": seen,
    }


def run_check(
    data_dir: str,
    work_dir: str,
    workers: int = 2,
    timeout: float = 600,
    checks: tuple[str, ...] = ("same_result", "resume"),
) -> dict:
    """Runs checks (a) ``same_result`` and (b) ``resume``; raises on the first failure.

    Args:
      data_dir: TFDS data_dir with (or to receive) ``leukemia_synthetic``;
        empty: ``work_dir/tfds``.
      work_dir: scratch folder for the runs and their logs.
      workers: worker processes (>= 2).
      timeout: seconds each phase may take before it counts as a hang.
      checks: which checks to run.

    Returns:
      The report: timings, per-epoch metrics, weight differences.
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or str(work / "tfds")
    _ensure_data(data_dir)
    report = {
        "workers": workers,
        "backbone": _BACKBONE.value,
        "resume_backbone": _RESUME_BACKBONE.value,
    }
    unknown = set(checks) - {"same_result", "resume"}
    if unknown:
        raise ValueError(f"--checks: unknown {sorted(unknown)}; choose same_result, resume")
    if "same_result" in checks:
        report["same_result"] = check_same_result(work, data_dir, workers, timeout)
        print("(a) multi-worker == single process:", json.dumps(report["same_result"]), flush=True)
    if "resume" in checks:
        report["resume"] = check_resume(work, data_dir, workers, timeout)
        print("(b) killed worker, restart resumes:", json.dumps(report["resume"]), flush=True)
    return report


def main(argv) -> None:
    del argv
    if _WORKER_SPEC.value:
        _run_worker(_WORKER_SPEC.value)
        return
    if _WORKERS.value < 2:
        raise app.UsageError(f"--workers={_WORKERS.value}: use at least 2")
    if _BATCH.value % _WORKERS.value:
        raise app.UsageError(f"--batch_size={_BATCH.value} must divide by --workers")
    work_dir = _WORK_DIR.value or tempfile.mkdtemp(prefix="multi_worker_check_")
    data_dir = os.path.expanduser(_DATA_DIR.value) if _DATA_DIR.value else ""
    report = run_check(data_dir, work_dir, _WORKERS.value, _TIMEOUT.value, tuple(_CHECKS.value))
    if _REPORT.value:
        Path(_REPORT.value).write_text(json.dumps(report, indent=2) + "\n")
    if not _KEEP.value and not _WORK_DIR.value:
        import shutil

        shutil.rmtree(work_dir, ignore_errors=True)
    print("All multi-worker checks passed.")


if __name__ == "__main__":
    app.run(main)
