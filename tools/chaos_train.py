r"""Fault injection: kills a small training run at random points and checks it recovers exactly.

Each trial trains a small recipe into a fresh ``model_dir`` and kills it one to
three times before letting it finish. A kill is one of

* ``SIGKILL`` at a named point (``LEUKEMIA_TF_FAULT``, see
  :func:`leukemia_tf.rundir.fault_point`): between writing and renaming
  ``best.keras``, ``last.keras``, ``history.csv`` or ``config.json``, before the
  backup checkpoint, or after a training call;
* ``SIGTERM`` after a training call (what a preempted VM sends);
* ``SIGKILL`` or ``SIGTERM`` from outside after a random delay (any point at all).

After each trial the tool checks that the finished run has one history row
per epoch, that ``best.keras`` and ``last.keras`` load, and that the final
weights and every epoch's training loss equal those of an uninterrupted run
of the same recipe (``--deterministic``) within float tolerance. A kill that
lands after the run has already finished is not counted.

Example (a few minutes on a 2-core CPU)::

  python tools/chaos_train.py --trials=6 --data_dir=/tmp/tfds
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]

_TRIALS = flags.DEFINE_integer("trials", 6, "Trials (each kills a run 1-3 times).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random kill plan.")
_RECIPE = flags.DEFINE_string("recipe", str(REPO / "configs" / "smoke.flags"), "Flagfile.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Epochs of the small run.")
_STEPS = flags.DEFINE_integer("steps_per_epoch", 4, "Steps per epoch of the small run.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir (the synthetic set is built there).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where the runs go (default: a temporary folder).")

_SAVE_POINTS = ("save:best.keras", "save:last.keras", "save:history.csv", "save:config.json")


def _command(model_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "leukemia_tf.train",
        f"--flagfile={_RECIPE.value}",
        f"--model_dir={model_dir}",
        f"--epochs={_EPOCHS.value}",
        f"--steps_per_epoch={_STEPS.value}",
        "--deterministic",
        "--verbose=0",
        *([f"--data_dir={_DATA_DIR.value}"] if _DATA_DIR.value else []),
    ]


def _env(fault: str | None) -> dict:
    from leukemia_tf import rundir

    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop(rundir.FAULT_ENV, None)
    if fault:
        env[rundir.FAULT_ENV] = fault
    return env


def _run(model_dir: Path, fault: str | None = None, kill_after: tuple | None = None):
    """Runs the recipe; returns ``(return code, seconds, stderr tail)``."""
    start = time.time()
    proc = subprocess.Popen(
        _command(model_dir),
        env=_env(fault),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if kill_after is not None:
        delay, sig = kill_after
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
    _, err = proc.communicate(timeout=900)
    return proc.returncode, time.time() - start, err[-1500:]


def _plan(rng: random.Random, total_calls: int, seconds: float) -> tuple[str, str | None, tuple]:
    """One kill: ``(description, fault spec or None, (delay, signal) or None)``."""
    kind = rng.choice(["save", "checkpoint", "step-kill", "step-term", "timer-kill", "timer-term"])
    epochs = _EPOCHS.value
    if kind == "save":
        point = rng.choice(_SAVE_POINTS)
        nth = rng.randint(1, 1 if point == "save:config.json" else epochs)
        return f"SIGKILL in {point}@{nth}", f"{point}@{nth}", None
    if kind == "checkpoint":
        nth = rng.randint(1, epochs)
        return f"SIGKILL before checkpoint {nth}", f"checkpoint@{nth}", None
    if kind.startswith("step"):
        nth = rng.randint(1, total_calls)
        sig = "KILL" if kind == "step-kill" else "TERM"
        return f"SIG{sig} after training call {nth}", f"step@{nth}:{sig}", None
    sig = signal.SIGKILL if kind == "timer-kill" else signal.SIGTERM
    delay = rng.uniform(0.3, 1.0) * seconds
    return f"{sig.name} from outside after {delay:.1f} s", None, (delay, sig)


def _check(model_dir: Path, reference: Path) -> list[str]:
    """What is wrong with a finished run, compared with the uninterrupted one."""
    import keras
    import numpy as np

    import leukemia_tf.models.classifier  # noqa: F401  (registers the custom layers)
    import leukemia_tf.models.heads  # noqa: F401
    from leukemia_tf import rundir

    problems = []
    history = rundir.read_history(str(model_dir))
    want = rundir.read_history(str(reference))
    if [r["epoch"] for r in history] != list(range(_EPOCHS.value)):
        problems.append(f"history rows {[r['epoch'] for r in history]}")
    elif not np.allclose([r["loss"] for r in history], [r["loss"] for r in want], rtol=1e-5):
        problems.append("per-epoch losses differ from the uninterrupted run")
    weights = {}
    for name in ("best.keras", "last.keras"):
        try:
            weights[name] = keras.models.load_model(model_dir / name).get_weights()
        except Exception as e:  # noqa: BLE001  (report any load failure)
            problems.append(f"{name} does not load: {type(e).__name__}")
    if "last.keras" in weights:
        expected = keras.models.load_model(reference / "last.keras").get_weights()
        worst = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(weights["last.keras"], expected, strict=True)
        )
        if worst > 1e-5:
            problems.append(f"final weights differ by up to {worst:.2g}")
    if not (model_dir / rundir.SUMMARY).exists():
        problems.append("no train_summary.json")
    return problems


def main(argv) -> None:
    del argv
    rng = random.Random(_SEED.value)
    work = Path(_WORKDIR.value or tempfile.mkdtemp(prefix="chaos_train_"))
    work.mkdir(parents=True, exist_ok=True)
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    code, seconds, err = _run(reference)
    if code != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{err}")
    print(f"uninterrupted run: {seconds:.1f} s")
    # Training calls per run: ceil(steps / steps_per_execution) per epoch; the
    # smoke recipe runs one step per call.
    total_calls = _EPOCHS.value * _STEPS.value
    tried = survived = not_reached = 0
    rows = []
    for trial in range(_TRIALS.value):
        model_dir = work / f"trial_{trial}"
        shutil.rmtree(model_dir, ignore_errors=True)
        events, code = [], None
        for _ in range(rng.randint(1, 3)):
            what, fault, timer = _plan(rng, total_calls, seconds)
            code, _, err = _run(model_dir, fault, timer)
            if code == 0:
                not_reached += 1
                events.append(f"{what}: finished first")
                break
            tried += 1
            events.append(f"{what}: exit {code}")
        from leukemia_tf import rundir

        # The last kill landed: restart once, to the end, unless it landed after the
        # summary was written (the run had finished; a restart would be refused).
        if code != 0 and not rundir.is_finished(str(model_dir)):
            code, _, err = _run(model_dir)
        elif code != 0:
            code = 0
        problems = [f"restart exit {code}: {err[-300:]}"] if code else _check(model_dir, reference)
        kills = sum(1 for e in events if "finished first" not in e)
        if not problems:
            survived += kills
        rows.append((trial, "; ".join(events), "ok" if not problems else "; ".join(problems)))
        print(f"trial {trial}: {rows[-1][1]} -> {rows[-1][2]}", flush=True)
    print("\n| trial | kills | result |\n|---|---|---|")
    for trial, events, result in rows:
        print(f"| {trial} | {events} | {result} |")
    print(
        f"\nkills survived / kills tried: {survived} / {tried} ({not_reached} landed after the "
        f"run had finished, not counted); recipe {Path(_RECIPE.value).name}, "
        f"{_EPOCHS.value} epochs x {_STEPS.value} steps"
    )


if __name__ == "__main__":
    app.run(main)
