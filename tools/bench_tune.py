r"""Benchmark: a CPU-budget Hyperband search versus the hand-written recipe, on the real mixed set.

Both train on the three real sets in ``../shared/data`` mixed in the taxonomy
(``all_taleqani/original:1,aml_cytomorphology_lmu:1,pbc:1``,
``--label_mode=taxonomy``) at the same image size, from scratch
(``--weights=none``), and are compared on the search objective (validation
macro-F1 at the best epoch):

* the baseline: the hand-written CPU recipe (``configs/cpu_all_taleqani.flags``
  by default) on the mixed set, one run of ``--epochs`` epochs;
* the search: ``leukemia_tf.tune`` with Hyperband (``max_epochs=--epochs``,
  ``--hyperband_factor``), the recipe as its base config, searching the
  backbone (``--backbones``), the head (flat / hierarchical), dropout,
  hidden width, learning rate, weight decay, label smoothing, augmentation
  magnitude and MixUp / CutMix. Its budget is stated as the number of trials
  and the total epochs trained (Hyperband continues runs, so each epoch is
  trained once), and in wall-clock time.

Run from the repository root (builds the data sets into ``--data_dir`` first
if needed; the defaults took about an hour on a 2-core CPU in our estimate,
scale with --epochs / --image_size)::

  python tools/bench_tune.py
  python tools/bench_tune.py --epochs=9 --image_size=96 --out=runs/bench_tune
  python tools/bench_tune.py --resume          # continue an interrupted search

Output: ``<out>/bench_tune.json`` and a Markdown snippet for BENCHMARKS.md
(printed and written to ``<out>/bench_tune.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"
MIXED = "all_taleqani/original:1,aml_cytomorphology_lmu:1,pbc:1"
#: (TFDS name, folder under ../shared/data) of each set of the mixture.
SETS = (
    ("all_taleqani/original", "all_taleqani"),
    ("aml_cytomorphology_lmu", "aml_cytomorphology_lmu"),
    ("pbc", "pbc"),
)


def build_sets(datasets: str, data_dir: str, shared: Path) -> None:
    """Builds the sets of ``datasets`` found in ``../shared/data`` unless already built."""
    import tensorflow_datasets as tfds

    import tfds_builders  # noqa: F401  (registers the builders)
    from leukemia_tf.data.build_data_lib import build

    for name, folder in SETS:
        if name not in datasets or tfds.builder(name, data_dir=data_dir).is_prepared():
            continue
        if not (shared / folder).is_dir():
            raise SystemExit(f"{shared / folder} not found: this benchmark needs the real images")
        print(f"Building {name} from {shared / folder} into {data_dir} ...", flush=True)
        build(name, data_dir=data_dir, manual_dir=str(shared / folder))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared_data", default=str(SHARED_DATA))
    parser.add_argument("--datasets", default=MIXED, help="the mixture (default: the real sets)")
    parser.add_argument("--steps_per_epoch", type=int, default=0, help="0: whole epochs")
    parser.add_argument("--data_dir", default="runs/bench_tfds")
    parser.add_argument("--out", default="runs/bench_tune")
    parser.add_argument("--baseline_flagfile", default="configs/cpu_all_taleqani.flags")
    parser.add_argument("--epochs", type=int, default=9, help="one full run / Hyperband max")
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--hyperband_factor", type=int, default=3)
    parser.add_argument("--backbones", default="cnn_small,cnn_medium")
    parser.add_argument("--max_trials", type=int, default=0, help="cap on trials; 0: none")
    parser.add_argument("--resume", action="store_true", help="continue the search in --out")
    parser.add_argument("--skip_baseline", action="store_true")
    args = parser.parse_args()

    build_sets(args.datasets, args.data_dir, Path(args.shared_data))

    from leukemia_tf import rundir
    from leukemia_tf.training import config as config_lib
    from leukemia_tf.training import train_lib
    from leukemia_tf.tuning import search_space, tune_lib

    out = Path(args.out)
    overrides = [
        f"--datasets={args.datasets}",
        f"--steps_per_epoch={args.steps_per_epoch}",
        "--label_mode=taxonomy",
        f"--data_dir={args.data_dir}",
        f"--image_size={args.image_size}",
        f"--epochs={args.epochs}",
        "--monitor=val_macro_f1",
        "--early_stopping_patience=0",
        "--verbose=2",
    ]
    recipe = config_lib.parse_flagfile(args.baseline_flagfile, overrides)
    report = {
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor()}",
        "data": args.datasets,
        "recipe": args.baseline_flagfile,
        "epochs": args.epochs,
        "image_size": args.image_size,
    }

    # ---------------------------------------------------------- baseline
    if not args.skip_baseline:
        baseline = dataclasses.replace(recipe, model_dir=str(out / "baseline"))
        start = time.time()
        done = out / "baseline" / rundir.SUMMARY
        result = (
            json.loads(done.read_text())
            if done.exists()
            else dataclasses.asdict(train_lib.train(baseline))
        )
        report["baseline"] = {
            "val_macro_f1": result["best_metrics"].get("val_macro_f1"),
            "best_epoch": result["best_epoch"] + 1,
            "wall_time_s": round(result.get("wall_time_s", time.time() - start)),
            "model_dir": baseline.model_dir,
        }

    # ------------------------------------------------------------ search
    search = search_space.SearchConfig(
        tune_dir=str(out / "search"),
        resume=args.resume,
        tuner="hyperband",
        hyperband_factor=args.hyperband_factor,
        objective="val_macro_f1",
        max_trials=args.max_trials,
        backbones=args.backbones,
        heads="flat,hierarchical",
        image_sizes=str(args.image_size),
        freeze_epochs_choices="0",
    )
    start = time.time()
    result = tune_lib.run_search(recipe, search)
    rows = result.rows
    epochs_trained = sum(
        r.epochs_trained
        - (
            next((p.epochs_trained for p in rows if p.trial_id == r.continued_from), 0)
            if r.continued_from
            else 0
        )
        for r in rows
    )
    best = result.best
    report["search"] = {
        "budget": (
            f"Hyperband max_epochs={args.epochs}, factor={args.hyperband_factor}: {len(rows)} "
            f"trials, {epochs_trained} epochs trained (= {epochs_trained / args.epochs:.1f} "
            "full runs)"
        ),
        "trials": len(rows),
        "failed": sum(r.score is None for r in rows),
        "epochs_trained": epochs_trained,
        "wall_time_s": round(time.time() - start),
        "best_trial": best.trial_id if best else None,
        "val_macro_f1": best.score if best else None,
        "best_epoch": best.best_epoch + 1 if best else None,
        "hyperparameters": best.values if best else None,
        "results": result.results_md,
        "best_flagfile": result.best_flagfile,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_tune.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    base_f1 = report.get("baseline", {}).get("val_macro_f1")
    lines = [
        "## Hyperparameter search vs the hand-written recipe (CPU)",
        "",
        f"Command: `python tools/bench_tune.py --epochs={args.epochs} "
        f"--image_size={args.image_size} --hyperband_factor={args.hyperband_factor} "
        f"--backbones={args.backbones}"
        + ("" if args.datasets == MIXED else f" --datasets={args.datasets}")
        + f"`. Machine: {report['machine']}. Data: `{args.datasets}` (taxonomy labels; "
        "objective on the validation split), from scratch.",
        "",
        "| run | budget | val macro-F1 (best epoch) | wall time |",
        "|---|---|---|---|",
    ]
    if "baseline" in report:
        b = report["baseline"]
        lines.append(
            f"| recipe `{args.baseline_flagfile}` | 1 run, {args.epochs} epochs | "
            f"{base_f1:.4f} (epoch {b['best_epoch']}) | {b['wall_time_s'] / 60:.0f} min |"
        )
    s = report["search"]
    if s["val_macro_f1"] is not None:
        lines.append(
            f"| Hyperband search | {s['budget']} | {s['val_macro_f1']:.4f} (trial "
            f"{s['best_trial']}, epoch {s['best_epoch']}) | {s['wall_time_s'] / 60:.0f} min |"
        )
        lines += ["", f"Best hyperparameters: `{json.dumps(s['hyperparameters'], default=str)}`."]
    text = "\n".join(lines) + "\n"
    (out / "bench_tune.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
