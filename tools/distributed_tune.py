r"""Runs a distributed KerasTuner search on this machine: a chief and two workers on loopback.

The chief (``KERASTUNER_TUNER_ID=chief``) serves the oracle on 127.0.0.1 at a
free port; each worker (``tuner0``, ``tuner1``) asks it for trials and trains
them. All three run the same ``python -m leukemia_tf.tune`` command with a
tiny random search on the synthetic set and share one ``--tune_dir``. The
tool waits for the search to finish, then checks that it completed and that
both workers ran trials (the ``tuner_id`` column of ``results.csv``).

Usage::

  python tools/distributed_tune.py [--data_dir=DIR] [--tune_dir=DIR] [--max_trials=6] [--cv_folds=2]

``--cv_folds=K`` runs a cross-validated search (every trial trains K fold runs).

Without ``--data_dir`` the synthetic set is built into a temporary folder
first. Exit status 0 when the check passes; the processes' logs are in
``<tune_dir>.logs/``.

On several machines, run the same command as here on each of them, with
``KERASTUNER_ORACLE_IP`` set to the chief's address and ``--tune_dir`` on a
disk all of them share (see README.md, "Hyperparameter search").
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The tiny search every process runs (only the environment differs).
SEARCH_FLAGS = (
    "--datasets=leukemia_synthetic",
    "--label_mode=native",
    "--backbones=cnn_tiny",
    "--image_sizes=32",
    "--batch_size=16",
    "--epochs=1",
    "--steps_per_epoch=2",
    "--precision=float32",
    "--strategy=default",
    "--verbose=0",
    "--tuner=random",
    "--hidden_units_choices=0",
    "--weight_decay_range=0.05",
    "--label_smoothing_range=0.1",
    "--augment_magnitude_range=0.3",
    "--mixup_alpha_choices=0",
    "--cutmix_alpha_choices=0",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="", help="TFDS data_dir with leukemia_synthetic.")
    parser.add_argument("--tune_dir", default="", help="Empty or new folder; default: a temp one.")
    parser.add_argument("--max_trials", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cv_folds", type=int, default=0, help="Cross-validated search: K.")
    parser.add_argument("--timeout_s", type=float, default=900)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="distributed_tune_"))
    data_dir = args.data_dir
    if not data_dir:
        data_dir = str(tmp / "tfds")
        print(f"Building the synthetic set into {data_dir} ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "leukemia_tf.build_data",
                "--dataset=leukemia_synthetic",
                f"--data_dir={data_dir}",
            ],
            cwd=REPO,
            check=True,
        )
    tune_dir = Path(args.tune_dir or tmp / "tune")
    logs = Path(f"{tune_dir}.logs")
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "leukemia_tf.tune",
        *SEARCH_FLAGS,
        f"--data_dir={data_dir}",
        f"--tune_dir={tune_dir}",
        f"--max_trials={args.max_trials}",
        f"--cv_folds={args.cv_folds}",
    ]
    ids = ["chief"] + [f"tuner{i}" for i in range(args.workers)]
    print(f"Oracle on 127.0.0.1:{port}; chief + {args.workers} workers; tune_dir {tune_dir}")
    start = time.time()
    procs = {}
    for tuner_id in ids:
        env = dict(
            os.environ,
            KERASTUNER_TUNER_ID=tuner_id,
            KERASTUNER_ORACLE_IP="127.0.0.1",
            KERASTUNER_ORACLE_PORT=str(port),
        )
        log = open(logs / f"{tuner_id}.log", "w")  # noqa: SIM115 - closed below
        procs[tuner_id] = (
            subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT),
            log,
        )
    failed = []
    try:
        for tuner_id, (proc, _log) in procs.items():
            remaining = max(args.timeout_s - (time.time() - start), 1)
            try:
                code = proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                failed.append(f"{tuner_id}: still running after {args.timeout_s:.0f} s")
                continue
            if code != 0:
                failed.append(f"{tuner_id}: exit status {code}")
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()  # only the processes this tool started
                proc.wait()
            log.close()
    elapsed = time.time() - start
    if failed:
        print("FAILED: " + "; ".join(failed))
        for tuner_id in ids:
            print(f"--- {tuner_id}.log (last lines) ---\n{_tail(logs / f'{tuner_id}.log')}")
        return 1

    with open(tune_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    by_worker = collections.Counter(r["tuner_id"] for r in rows if r["status"] == "COMPLETED")
    workers = sorted(w for w in by_worker if w != "chief")
    print(f"{len(rows)} trials in {elapsed:.0f} s; completed per worker: {dict(by_worker)}")
    print(f"trials run by workers: {', '.join(f'{w}={by_worker[w]}' for w in workers)}")
    expected = [f"tuner{i}" for i in range(args.workers)]
    oracle = json.loads((tune_dir / "keras_tuner" / "oracle.json").read_text())
    if oracle["ongoing_trials"]:
        print(f"FAILED: the chief's saved oracle still lists running trials: {oracle}")
        return 1
    if len(rows) != args.max_trials or workers != expected:
        print(
            f"FAILED: expected {args.max_trials} completed trials run by {expected}; "
            f"see {tune_dir / 'results.md'} and {logs}"
        )
        return 1
    if args.cv_folds:
        partial = [
            r["trial_id"]
            for r in rows
            if len([v for v in r.get("val_macro_f1_folds", "").split(";") if v]) != args.cv_folds
        ]
        if partial:
            print(f"FAILED: trials without {args.cv_folds} fold values: {partial}")
            return 1
    print(f"OK: the chief served the oracle, both workers ran trials. Results: {tune_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
