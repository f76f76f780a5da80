"""Ablation of the acquisition-shift options: train variants, score in and out of the lab.

Each variant is one training run of a recipe with some flags added; each is
scored on the recipe's test split (``evaluate --split=test``) and on a folder
of another laboratory's labelled images (``evaluate --images``), as trained
and, with ``--adapt_bn``, as an AdaBN-adapted copy (``--adapt_bn=inputs``).
Runs and reports already finished are reused, so the tool can be re-run to
add variants. Prints a markdown table (and writes it to ``OUT/table.md``).

  python tools/shift_benchmark.py --out=runs/shift_ablation \\
      --flagfile=configs/cpu_pbc.flags --common="--image_size=112 --epochs=10" \\
      --images=../shared/data/external/bccd --adapt_bn \\
      --variant="none=" --variant="shifts=--acquisition_shifts=all" \\
      --variant="shifts_gn=--acquisition_shifts=all --backbone=cnn_small_gn"

The external folder is a test set: read its numbers, never choose options by them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time


def _run(args: list[str], log: str) -> float:
    start = time.time()
    with open(log, "a") as out:
        out.write("$ " + shlex.join(args) + "\n")
        out.flush()
        code = subprocess.call(args, stdout=out, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"failed ({code}): {shlex.join(args)}; see {log}")
    return time.time() - start


def _metrics(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _external_row(metrics: dict) -> dict:
    ext = metrics["external"]
    row = {
        "as_predicted": metrics["cell"]["accuracy"],
        "balanced": metrics["cell"]["balanced_accuracy"],
    }
    restricted = ext.get("restricted_to_present") or {}
    row["restricted"] = restricted.get("accuracy")
    levels = metrics.get("levels") or {}
    row["levels"] = levels
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of the runs and the table")
    parser.add_argument("--flagfile", required=True, help="the recipe")
    parser.add_argument("--common", default="", help="flags added to every variant")
    parser.add_argument("--variant", action="append", required=True, help="NAME=FLAGS")
    parser.add_argument("--images", required=True, help="labelled external image folder/CSV")
    parser.add_argument("--label_map", default="", help="label map for --images")
    parser.add_argument("--adapt_bn", action="store_true", help="also score AdaBN copies")
    parser.add_argument("--data_dir", default="", help="TFDS data directory")
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    py = [sys.executable, "-m"]
    data_dir = [f"--data_dir={args.data_dir}"] if args.data_dir else []
    rows = []
    for spec in args.variant:
        name, _, extra = spec.partition("=")
        run = os.path.join(args.out, name)
        log = os.path.join(args.out, f"{name}.log")
        train_s = None
        if not os.path.exists(os.path.join(run, "train_summary.json")):
            train_s = _run(
                py
                + ["leukemia_tf.train", f"--flagfile={args.flagfile}", f"--model_dir={run}"]
                + data_dir
                + shlex.split(args.common)
                + shlex.split(extra),
                log,
            )
        evaluate = (
            py
            + [
                "leukemia_tf.evaluate",
                f"--model_dir={run}",
                f"--bootstrap={args.bootstrap}",
                "--explain_samples=0",
            ]
            + data_dir
        )
        test_dir = os.path.join(run, "eval_test")
        if not os.path.exists(os.path.join(test_dir, "metrics.json")):
            _run(evaluate + ["--split=test"], log)
        test = _metrics(os.path.join(test_dir, "metrics.json"))["cell"]
        ext_args = [f"--images={args.images}"]
        if args.label_map:
            ext_args.append(f"--label_map={args.label_map}")
        scored = {}
        for adapted in [False, True] if args.adapt_bn else [False]:
            out = os.path.join(args.out, f"{name}_ext{'_adabn' if adapted else ''}")
            if not os.path.exists(os.path.join(out, "metrics.json")):
                extra_eval = ["--adapt_bn=inputs"] if adapted else []
                _run(evaluate + ext_args + [f"--out_dir={out}"] + extra_eval, log)
            scored[adapted] = _external_row(_metrics(os.path.join(out, "metrics.json")))
        summary = _metrics(os.path.join(run, "train_summary.json"))
        rows.append((name, extra, summary, train_s, test, scored))

    lines = [
        "| variant | flags | train s | test acc | ext acc | ext restricted | ext balanced "
        "| AdaBN ext acc | AdaBN restricted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f} %"

    for name, extra, summary, train_s, test, scored in rows:
        plain = scored[False]
        adabn = scored.get(True, {})
        seconds = summary.get("wall_time_s", train_s)
        lines.append(
            f"| {name} | `{extra or '(recipe)'}` | "
            f"{'n/a' if seconds is None else round(seconds)} | {pct(test['accuracy'])} | "
            f"{pct(plain['as_predicted'])} | {pct(plain['restricted'])} | "
            f"{pct(plain['balanced'])} | {pct(adabn.get('as_predicted'))} | "
            f"{pct(adabn.get('restricted'))} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
