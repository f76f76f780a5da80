r"""Is training input-bound? A recipe's images/s with the real input pipeline vs from memory.

Runs the package's own training loop (``leukemia_tf.training.train_lib.train``:
augmentation, model, loss, optimizer, EMA, everything the recipe sets) twice
per run, each in a fresh process, on the recipe given by ``--flagfile``:

* ``pipeline``: the real input pipeline (TFDS shards -> decode -> resize ->
  cache -> shuffle -> batch). Epoch 1 reads and decodes every image and fills
  the in-memory cache; the later epochs read from the cache.
* ``memory``: the same model fed one real batch repeated from host memory
  (no reading, decoding or shuffling): the step's own limit.

Validation is switched off (``--val_split=``) so an epoch's time is training
only. Reported: images/s of epoch 1 and the median of epochs 2..N of each
source, and ``pipeline / memory`` for both (the target: >= 0.95; on a
CPU the input pipeline and the model share the same cores, so whatever the
pipeline costs shows up directly). With ``--runs`` > 1 the two sources
alternate (the order rotates) and the medians of the within-run ratios are
reported.

Run from the repository root::

  python tools/bench_input_bound.py --recipe=configs/cpu_pbc.flags --data_dir=DATA --epochs=4
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

_REPO = Path(__file__).resolve().parents[1]

_FLAGFILE = flags.DEFINE_string("recipe", "configs/cpu_pbc.flags", "The recipe.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir (overrides the recipe's).")
_EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs per run (>= 2).", lower_bound=2)
_RUNS = flags.DEFINE_integer("runs", 1, "Runs of both sources.", lower_bound=1)
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Extra training flags, e.g. --set=--xla.")
_OUTPUT = flags.DEFINE_string("output", "", "Write the raw results (JSON) here.")
_CHILD = flags.DEFINE_string("child", "", "(internal) run one measurement from this JSON.")


def _run_child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import memory_input_fn

    from leukemia_tf.data import pipeline
    from leukemia_tf.training import inputs, model_factory, train_lib
    from leukemia_tf.training.config import parse_flagfile

    if spec["input"] == "memory":
        inputs.train_input_fn = memory_input_fn(inputs.train_input_fn)
    config = parse_flagfile(spec["flagfile"], spec["overrides"])
    result = train_lib.train(config)
    # The engine's epoch: --steps_per_epoch, or the training split // batch size.
    steps = config.steps_per_epoch
    if not steps:
        counts = pipeline.class_counts(
            pipeline.parse_datasets(config.datasets),
            config.train_split,
            config.data_dir or None,
            config.label_mode,
            model_factory.taxonomy_for(config),
        )
        steps = max(int(counts.sum()) // config.batch_size, 1)
    rates = [steps * config.batch_size / h["epoch_time_s"] for h in result.history]
    Path(spec["result"]).write_text(json.dumps({"rates": rates, "steps_per_epoch": steps}))


def _measure(work: Path, source: str, run: int) -> list[float]:
    """Images/s of each epoch of one training run."""
    name = f"{source}_{run}"
    overrides = [
        f"--epochs={_EPOCHS.value}",
        "--val_split=",
        "--early_stopping_patience=0",
        "--verbose=0",
        f"--model_dir={work / name}",
        "--overwrite",
        *([f"--data_dir={_DATA_DIR.value}"] if _DATA_DIR.value else []),
        *_OVERRIDES.value,
    ]
    spec = work / f"{name}.json"
    result = work / f"{name}.result.json"
    spec.write_text(
        json.dumps(
            {
                "flagfile": str(Path(_FLAGFILE.value).resolve()),
                "overrides": overrides,
                "input": source,
                "result": str(result),
            }
        )
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, f"--child={spec}"],
        env=env,
        capture_output=True,
        text=True,
        cwd=str(_REPO),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rates = json.loads(result.read_text())["rates"]
    print(f"  {name}: " + ", ".join(f"{r:.1f}" for r in rates) + " img/s", file=sys.stderr)
    return rates


def main(argv) -> None:
    del argv
    if _CHILD.value:
        _run_child(_CHILD.value)
        return
    work = Path(tempfile.mkdtemp(prefix="bench_input_bound_"))
    runs = []
    start = time.time()
    for run in range(_RUNS.value):
        order = ("pipeline", "memory") if run % 2 == 0 else ("memory", "pipeline")
        rates = {source: _measure(work, source, run) for source in order}
        first = rates["pipeline"][0] / rates["memory"][0]
        cached = statistics.median(rates["pipeline"][1:]) / statistics.median(rates["memory"][1:])
        runs.append({"rates": rates, "ratio_first": first, "ratio_cached": cached})
    report = {
        "recipe": _FLAGFILE.value,
        "overrides": _OVERRIDES.value,
        "epochs": _EPOCHS.value,
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor()}",
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": round(time.time() - start),
        "runs": runs,
    }
    med = {key: statistics.median(r[key] for r in runs) for key in ("ratio_first", "ratio_cached")}

    def rate(source, first):
        values = [
            r["rates"][source][0] if first else statistics.median(r["rates"][source][1:])
            for r in runs
        ]
        return statistics.median(values)

    lines = [
        f"Recipe `{_FLAGFILE.value}` {' '.join(_OVERRIDES.value)}, {_EPOCHS.value} epochs, "
        f"{_RUNS.value} run(s), no validation:",
        "",
        "| epochs | pipeline img/s | memory img/s | pipeline / memory |",
        "|---|---|---|---|",
        f"| 1 (decode + fill the cache) | {rate('pipeline', True):.1f} | "
        f"{rate('memory', True):.1f} | {med['ratio_first']:.3f} |",
        f"| 2-{_EPOCHS.value} (cached), median | {rate('pipeline', False):.1f} | "
        f"{rate('memory', False):.1f} | {med['ratio_cached']:.3f} |",
    ]
    text = "\n".join(lines)
    print(text)
    if _OUTPUT.value:
        Path(_OUTPUT.value).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
