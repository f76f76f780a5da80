"""Grouped k-fold cross-validation: the folds, one training run per fold, the combined report.

The library side of ``python -m leukemia_tf.crossval``. A cross-validation
directory ``DIR`` holds

* ``folds.json``: the assignment of every pooled example to a fold
  (:mod:`leukemia_tf.data.folds`: grouped by patient, else slide, else
  example; stratified by label; deterministic from ``--seed``), the recipe it
  was made for (the resolved training config without its paths) and the
  counts per fold, class and group. A second run into ``DIR`` with another
  recipe, ``--folds``, ``--repeats`` or pooled split is refused.
* ``fold_<i>/``: fold ``i``'s ordinary training run (fold ``i % K`` of repeat
  ``i // K``). Its ``--train_split`` and ``--val_split`` are fold splits
  (``DIR/folds.json#<i>/train`` and ``.../validation``), so it resumes with
  ``train --flagfile=DIR/fold_<i>/flags.txt`` and its out-of-fold examples
  are scored by ``evaluate --model_dir=DIR/fold_<i> --split=DIR/folds.json#<i>/validation``.
  A fold directory holding a run of another recipe is refused.
* after the aggregation: ``fold_<i>/oof_predictions.npz`` (the fold model's
  class probabilities on its validation part, reused while newer than
  ``best.keras``), ``crossval_metrics.json``, ``crossval_report.md`` and
  ``crossval_folds.png``.

The aggregation combines whatever folds have finished (``train_summary.json``)
and names the others. Metrics: per fold (accuracy, balanced accuracy,
macro-F1, macro ROC-AUC: ``metrics.headline_metrics`` on the fold's
validation part, the ``best`` checkpoint at temperature 1), their mean and
sample standard deviation; the pooled out-of-fold predictions of each repeat
(every pooled example predicted once, by the one model that did not train on
it) with percentile-bootstrap intervals resampling the folds' groups
(patients, else slides, else examples: ``metrics.bootstrap_ci`` with
``clusters``); and slide and patient level (mean probability and majority
vote, :func:`leukemia_tf.evaluation.aggregate.aggregate`) where the data
carry those ids. Pooled scores of models trained on different folds are
somewhat optimistic or pessimistic in ways a single held-out split is not
(the models differ); the per-fold spread is the honest measure of
variability, and the report says so.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import math
import os

import numpy as np
import tensorflow as tf

from leukemia_tf import rundir
from leukemia_tf.data import folds as folds_lib
from leukemia_tf.data import names, pipeline
from leukemia_tf.data.folds import FoldError
from leukemia_tf.evaluation import aggregate as aggregate_lib
from leukemia_tf.evaluation import metrics as metrics_lib
from leukemia_tf.training.config import TrainConfig

#: Files of the combined report in the cross-validation directory.
METRICS_FILE = "crossval_metrics.json"
REPORT_FILE = "crossval_report.md"
FIGURE_FILE = "crossval_folds.png"
#: A fold's out-of-fold predictions (in its run directory).
OOF_FILE = "oof_predictions.npz"

#: Config fields that are not part of the recipe: paths and console settings
#: (as for a resumed training run).
NOT_RECIPE = ("model_dir", "data_dir", "overwrite", "override_flags", "verbose", "cache")

#: The per-fold metrics, in report order.
FOLD_METRICS = metrics_lib.HEADLINE


# ------------------------------------------------------------------ layout
def folds_path(cv_dir: str) -> str:
    """``DIR/folds.json``, absolute for a local ``DIR`` (fold splits name it from anywhere)."""
    cv_dir = rundir.expand(cv_dir)
    if not rundir.is_remote(cv_dir):
        cv_dir = os.path.abspath(cv_dir)
    return rundir.join(cv_dir, folds_lib.FOLDS_FILE)


def fold_dir(cv_dir: str, fold: int) -> str:
    """Fold ``fold``'s run directory, ``DIR/fold_<fold>``."""
    return rundir.join(rundir.expand(cv_dir), f"fold_{fold}")


def recipe_of(config: TrainConfig) -> dict:
    """The config without its paths and console settings (:data:`NOT_RECIPE`)."""
    return {k: v for k, v in config.to_dict().items() if k not in NOT_RECIPE}


def pooled_split(config: TrainConfig, cv_splits: str = "") -> str:
    """The split the folds divide: ``cv_splits``, else the recipe's train + validation splits."""
    if cv_splits.strip():
        return cv_splits.strip()
    return "+".join(s for s in (config.train_split, config.val_split) if s.strip())


def fold_config(config: TrainConfig, cv_dir: str, fold: int) -> TrainConfig:
    """The training config of fold ``fold``: the recipe on the fold's two parts, in ``fold_<i>``."""
    path = folds_path(cv_dir)
    return dataclasses.replace(
        config,
        model_dir=fold_dir(cv_dir, fold),
        train_split=folds_lib.fold_split(path, fold, "train"),
        val_split=folds_lib.fold_split(path, fold, "validation"),
    )


def _differences(ours: dict, theirs: dict) -> list[str]:
    return [
        f"--{k}={ours.get(k)!r} (there: {theirs.get(k)!r})"
        for k in sorted(set(ours) | set(theirs))
        if k not in NOT_RECIPE and ours.get(k) != theirs.get(k)
    ]


# ------------------------------------------------------------------- folds
def prepare_folds(
    config: TrainConfig,
    num_folds: int,
    repeats: int = 1,
    cv_splits: str = "",
    flag: str = "folds",
) -> dict:
    """Reads ``DIR/folds.json``, or assigns the folds and writes it (``DIR`` = ``config.model_dir``).

    ``flag`` is the flag that set ``num_folds``, named in the messages
    (``cv_folds`` for a cross-validated search).

    Raises:
      FoldError: an existing fold file made for another recipe, fold count,
        repeat count or pooled split (listing the differences); unlabelled
        examples in the pooled split; too few groups in a class for the folds.
    """
    path = folds_path(config.model_dir)
    split = pooled_split(config, cv_splits)
    recipe = recipe_of(config)
    wanted = {"split": split, "num_folds": num_folds, "repeats": repeats}
    if tf.io.gfile.exists(path):
        data = folds_lib.read_fold_file(path)
        changed = _differences(recipe, data["recipe"]) + [
            f"{name}={value!r} (there: {data[name]!r})"
            for name, value in wanted.items()
            if data[name] != value
        ]
        if changed:
            raise FoldError(
                f"{path} was made for another cross-validation: {', '.join(changed)}; use "
                "another --model_dir (or the recipe and flags it was made with)"
            )
        return data

    from leukemia_tf.data import build_data_lib
    from leukemia_tf.training import model_factory

    specs = names.parse_datasets(config.datasets)
    data_dir = config.data_dir or None
    build_data_lib.prepare_generated(specs, data_dir)
    taxonomy = model_factory.taxonomy_for(config)
    class_names = pipeline.dataset_class_names(specs, data_dir, config.label_mode, taxonomy)
    meta = pipeline.read_metadata(specs, split, data_dir, config.label_mode, taxonomy)
    unlabelled = int((meta["label"] < 0).sum())
    if unlabelled:
        raise FoldError(
            f"split {split!r} of --datasets={config.datasets!r} holds {unlabelled} of "
            f"{len(meta['label'])} examples without a label: cross-validation needs labelled "
            "examples (choose labelled splits with --cv_splits)"
        )
    if not len(meta["label"]):
        raise FoldError(f"split {split!r} of --datasets={config.datasets!r} has no examples")
    groups = [
        folds_lib.example_group(k, p, s)
        for k, p, s in zip(meta["key"], meta["patient_id"], meta["slide_id"], strict=True)
    ]
    assigned = folds_lib.assign_folds(
        meta["key"].tolist(),
        meta["label"].tolist(),
        groups,
        num_folds,
        repeats,
        seed=config.seed,
        class_names=class_names,
        flag=flag,
    )
    kinds = {}
    for group in set(groups):
        kinds[folds_lib.group_kind(group)] = kinds.get(folds_lib.group_kind(group), 0) + 1
    data = {
        "version": folds_lib.FOLD_FILE_VERSION,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "recipe": recipe,
        "recipe_sha1": folds_lib.recipe_fingerprint(recipe),
        "datasets": config.datasets,
        **wanted,
        "seed": config.seed,
        "method": "sklearn StratifiedGroupKFold(shuffle=True, random_state=seed + repeat)",
        "class_names": class_names,
        "n_examples": len(groups),
        "n_groups": kinds,
        **assigned,
    }
    data["counts"] = folds_lib.fold_counts(data, len(class_names))
    tf.io.gfile.makedirs(
        os.path.dirname(path) if not rundir.is_remote(path) else path.rsplit("/", 1)[0]
    )
    folds_lib.write_fold_file(path, data)
    return data


def check_fold_dir(config: TrainConfig) -> None:
    """Refuses a fold directory holding a run of another recipe.

    Raises:
      FoldError: ``config.model_dir`` has a ``config.json`` that differs from
        ``config`` beyond paths and console settings (listing the differences).
    """
    if not tf.io.gfile.exists(rundir.join(config.model_dir, rundir.CONFIG_FILE)):
        return
    theirs = rundir.read_config(config.model_dir).to_dict()
    changed = _differences(config.to_dict(), theirs)
    if changed:
        raise FoldError(
            f"{config.model_dir} holds a run of another recipe or fold: {', '.join(changed)}; "
            "use another --model_dir for this cross-validation"
        )


def num_total_folds(data: dict) -> int:
    return int(data["num_folds"]) * int(data["repeats"])


def run(
    config: TrainConfig,
    num_folds: int,
    repeats: int = 1,
    cv_splits: str = "",
    fold: int | None = None,
) -> list[int]:
    """Assigns the folds (or reads them) and trains every fold, or only ``fold``.

    A finished fold is skipped (unless ``config.overwrite``); an unfinished one
    resumes. Returns the folds trained or found finished.

    Raises:
      FoldError: see :func:`prepare_folds` and :func:`check_fold_dir`; a
        ``fold`` out of range.
    """
    from leukemia_tf.training import train_lib

    data = prepare_folds(config, num_folds, repeats, cv_splits)
    total = num_total_folds(data)
    if fold is not None and not 0 <= fold < total:
        raise FoldError(f"--fold={fold}: the folds are numbered 0 to {total - 1}")
    todo = [fold] if fold is not None else list(range(total))
    configs = [fold_config(config, config.model_dir, i) for i in todo]
    for cfg in configs:  # all refusals before any training
        check_fold_dir(cfg)
    for i, cfg in zip(todo, configs, strict=True):
        if rundir.is_finished(cfg.model_dir) and not config.overwrite:
            print(f"fold {i}: finished already ({cfg.model_dir})")
            continue
        print(f"fold {i} of {total} (repeat {i // num_folds}): training into {cfg.model_dir}")
        train_lib.train(cfg)
    return todo


# ---------------------------------------------------------- predictions
def _write_npz(path: str, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    tmp = rundir.join(
        path.rsplit("/", 1)[0] if rundir.is_remote(path) else os.path.dirname(path),
        f".{rundir.basename(path)}.tmp{os.getpid()}",
    )
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def _read_npz(path: str) -> dict:
    with tf.io.gfile.GFile(path, "rb") as f:
        with np.load(io.BytesIO(f.read()), allow_pickle=False) as loaded:
            return {k: loaded[k] for k in loaded.files}


def fold_predictions(fold_run: str, batch_size: int = 64) -> dict:
    """The fold model's probabilities on its validation part (computed, or reused).

    ``fold_run/oof_predictions.npz`` is reused while it is newer than
    ``best.keras``. Returns ``{"key", "label", "probs", "patient_id", "slide_id"}``.
    """
    path = rundir.join(fold_run, OOF_FILE)
    best = rundir.join(fold_run, rundir.BEST_MODEL)
    if tf.io.gfile.exists(path) and (
        tf.io.gfile.stat(path).mtime_nsec >= tf.io.gfile.stat(best).mtime_nsec
    ):
        return _read_npz(path)
    from leukemia_tf.evaluation.predictions import predict_split

    trained = rundir.load_trained_model(fold_run, trust=False)
    config = trained.config
    specs = names.parse_datasets(config.datasets)
    predicted = predict_split(trained, specs, config.val_split, config.data_dir or None, batch_size)
    probs = trained.label_space.probabilities(predicted.outputs, 1.0).numpy()
    keys = np.array(
        [
            folds_lib.example_key(s, f)
            for s, f in zip(predicted.source, predicted.file_name, strict=True)
        ]
    )
    out = {
        "key": keys.astype(str),
        "label": predicted.labels,
        "probs": probs.astype(np.float32),
        "patient_id": predicted.patient_id.astype(str),
        "slide_id": predicted.slide_id.astype(str),
    }
    _write_npz(path, out)
    return out


# ------------------------------------------------------------- aggregation
def _finite(value):
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(float(value)) else None
    return value


def _mean_sd(values: list[float]) -> dict:
    values = np.array([v for v in values if v is not None and np.isfinite(v)], np.float64)
    return {
        "mean": float(values.mean()) if len(values) else None,
        "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
        "n": int(len(values)),
    }


def _group_level(ids: np.ndarray, probs, labels, num_classes: int) -> dict | None:
    """Slide or patient level of pooled predictions (None without ids)."""
    known = ids != ""
    if not known.any():
        return None
    try:
        pooled = aggregate_lib.aggregate(ids[known], probs[known], labels[known])
    except ValueError as e:
        return {"n_groups": int(len(set(ids[known].tolist()))), "note": str(e)}
    return {
        "n_groups": len(pooled["group_ids"]),
        "n_cells": int(known.sum()),
        "methods": pooled["metrics"],
    }


def _pooled(fold_runs: list[dict], data: dict, bootstrap: int, seed: int) -> dict:
    """Metrics of the pooled out-of-fold predictions of one repeat."""
    num_classes = len(data["class_names"])
    group_of = dict(zip(data["keys"], data["groups"], strict=True))
    key = np.concatenate([f["key"] for f in fold_runs])
    labels = np.concatenate([f["label"] for f in fold_runs]).astype(np.int64)
    probs = np.concatenate([f["probs"] for f in fold_runs]).astype(np.float64)
    groups = np.array([group_of.get(k, f"example:{k}") for k in key.tolist()], dtype=object)
    predicted = probs.argmax(axis=1)
    out = {
        "n_examples": int(len(labels)),
        "n_groups": int(len(set(groups.tolist()))),
        "metrics": metrics_lib.headline_metrics(labels, predicted, probs, num_classes),
        "ci": metrics_lib.bootstrap_ci(
            labels,
            predicted,
            probs,
            num_classes,
            clusters=groups.astype(str),
            n_resamples=bootstrap,
            seed=seed,
        ),
        "per_class_recall": {
            name: (float((predicted[labels == c] == c).mean()) if (labels == c).any() else None)
            for c, name in enumerate(data["class_names"])
        },
    }
    for level, feature in (("slide", "slide_id"), ("patient", "patient_id")):
        ids = np.concatenate([f[feature] for f in fold_runs]).astype(object)
        out[level] = _group_level(ids, probs, labels, num_classes)
    return out


def aggregate(cv_dir: str, bootstrap: int = 1000, batch_size: int = 64, seed: int = 0) -> dict:
    """Combines the finished folds of ``cv_dir`` into the report, the metrics and the figure.

    Returns:
      The contents of ``crossval_metrics.json``, plus ``report_path``,
      ``metrics_path`` and ``figure_path``.

    Raises:
      FoldError: no ``folds.json`` in ``cv_dir``, no finished fold, or a fold
        directory holding a run of another recipe.
    """
    path = folds_path(cv_dir)
    if not tf.io.gfile.exists(path):
        raise FoldError(
            f"--model_dir={cv_dir!r} holds no {folds_lib.FOLDS_FILE}: run python -m "
            "leukemia_tf.crossval --flagfile=RECIPE --folds=K --model_dir=... first"
        )
    data = folds_lib.read_fold_file(path)
    k, total = int(data["num_folds"]), num_total_folds(data)
    runs = [fold_dir(cv_dir, i) for i in range(total)]
    finished = [i for i in range(total) if rundir.is_finished(runs[i])]
    unfinished = [i for i in range(total) if i not in finished]
    if not finished:
        raise FoldError(
            f"--aggregate: no fold of {cv_dir} has finished yet (no train_summary.json in "
            f"{', '.join(f'fold_{i}' for i in unfinished)}); train them first"
        )
    base = TrainConfig(**{**data["recipe"], "model_dir": rundir.expand(cv_dir)})
    for i in finished:
        expected = fold_config(base, cv_dir, i)
        check_fold_dir(expected)
    num_classes = len(data["class_names"])
    predictions, per_fold = {}, []
    for i in finished:
        predicted = fold_predictions(runs[i], batch_size)
        predictions[i] = predicted
        labels = predicted["label"].astype(np.int64)
        probs = predicted["probs"].astype(np.float64)
        row = metrics_lib.headline_metrics(labels, probs.argmax(axis=1), probs, num_classes)
        per_fold.append(
            {
                "fold": i,
                "repeat": i // k,
                "n_examples": int(len(labels)),
                "n_groups": data["counts"][i]["n_groups"],
                **row,
            }
        )
    summary = {m: _mean_sd([row[m] for row in per_fold]) for m in FOLD_METRICS}
    repeats = []
    for r in range(int(data["repeats"])):
        members = [i for i in range(r * k, (r + 1) * k) if i in predictions]
        if not members:
            continue
        pooled = _pooled([predictions[i] for i in members], data, bootstrap, seed)
        pooled.update(
            repeat=r,
            folds=members,
            complete=len(members) == k,
            n_expected=int(len(data["keys"])),
        )
        repeats.append(pooled)
    kinds = data["n_groups"]
    unit = next((kind for kind in ("patient", "slide") if kinds.get(kind)), "example")
    result = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "cv_dir": rundir.expand(cv_dir),
        "datasets": data["datasets"],
        "split": data["split"],
        "num_folds": k,
        "repeats": int(data["repeats"]),
        "seed": data["seed"],
        "method": data["method"],
        "class_names": data["class_names"],
        "n_examples": data["n_examples"],
        "n_groups": kinds,
        "grouping": unit,
        "finished": finished,
        "unfinished": unfinished,
        "per_fold": per_fold,
        "summary": summary,
        "pooled": repeats,
        "bootstrap": {"n_resamples": bootstrap, "seed": seed, "unit": "the folds' groups"},
        "checkpoint": "best.keras of each fold, temperature 1",
        "evaluate_fold": (
            f"python -m leukemia_tf.evaluate --model_dir={runs[finished[0]]} "
            f"--split={folds_lib.fold_split(path, finished[0], 'validation')}"
        ),
    }
    result = _finite(result)
    target = rundir.expand(cv_dir)
    figure_path = rundir.join(target, FIGURE_FILE)
    _figure(result, figure_path)
    metrics_path = rundir.join(target, METRICS_FILE)
    rundir.write_text(metrics_path, json.dumps(result, indent=2) + "\n")
    report_path = rundir.join(target, REPORT_FILE)
    rundir.write_text(report_path, render(result))
    return {
        **result,
        "metrics_path": metrics_path,
        "report_path": report_path,
        "figure_path": figure_path,
    }


# ---------------------------------------------------------------- report
_NAMES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro-F1",
    "macro_roc_auc": "macro ROC-AUC",
}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _figure(result: dict, path: str) -> None:
    """Per-fold values of each metric (dots), their mean and ± 1 sd (bar)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.6))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    for x, metric in enumerate(FOLD_METRICS):
        values = [row[metric] for row in result["per_fold"] if row[metric] is not None]
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
        ax.scatter(np.add(x, jitter), values, s=22, alpha=0.8, color="tab:blue", zorder=3)
        stats = result["summary"][metric]
        if stats["mean"] is not None:
            ax.errorbar(
                x + 0.3,
                stats["mean"],
                yerr=stats["sd"] or 0.0,
                fmt="o",
                color="black",
                capsize=4,
                zorder=4,
            )
    ax.set_xticks(range(len(FOLD_METRICS)), [_NAMES[m] for m in FOLD_METRICS])
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("score on the fold's validation part")
    ax.set_title(
        f"{result['num_folds']}-fold cross-validation x {result['repeats']}: "
        f"{len(result['finished'])} fold(s) (dots), mean ± sd (black)",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())


def render(result: dict) -> str:
    """``crossval_report.md`` from ``crossval_metrics.json``."""
    lines = [
        f"# Cross-validation: {result['datasets']}",
        "",
        f"{result['num_folds']} folds x {result['repeats']} repeat(s) over the split "
        f"`{result['split']}` ({result['n_examples']} examples), grouped by "
        f"{result['grouping']} ({', '.join(f'{v} {k} group(s)' for k, v in result['n_groups'].items())}),"
        f" stratified by label, seed {result['seed']} ({result['method']}). The test split is "
        "not part of the folds. Every fold model is its `best.keras`, at temperature 1.",
        "",
        f"Finished folds: {', '.join(map(str, result['finished']))}.",
    ]
    if result["unfinished"]:
        lines.append(
            f"**Not finished (left out)**: {', '.join(f'fold_{i}' for i in result['unfinished'])}."
        )
    lines += ["", "## Per fold", ""]
    header = "| fold | repeat | examples | groups | " + " | ".join(_NAMES[m] for m in FOLD_METRICS)
    lines += [header + " |", "|" + "---|" * (4 + len(FOLD_METRICS))]
    for row in result["per_fold"]:
        lines.append(
            f"| {row['fold']} | {row['repeat']} | {row['n_examples']} | {row['n_groups']} | "
            + " | ".join(_fmt(row[m]) for m in FOLD_METRICS)
            + " |"
        )
    summary = result["summary"]
    lines.append(
        "| **mean ± sd** | | | | "
        + " | ".join(f"{_fmt(summary[m]['mean'])} ± {_fmt(summary[m]['sd'])}" for m in FOLD_METRICS)
        + " |"
    )
    lines += ["", f"![per-fold spread]({FIGURE_FILE})", ""]
    for pooled in result["pooled"]:
        state = "" if pooled["complete"] else " (incomplete: some folds not finished)"
        lines += [
            f"## Pooled out-of-fold predictions, repeat {pooled['repeat']}{state}",
            "",
            f"{pooled['n_examples']} of {pooled['n_expected']} examples, {pooled['n_groups']} "
            f"groups; 95% percentile-bootstrap intervals resample whole groups "
            f"({pooled['ci']['n_resamples']} resamples).",
            "",
            "| metric | value | 95% CI |",
            "|---|---|---|",
        ]
        for m in FOLD_METRICS:
            ci = pooled["ci"].get(m) or {}
            lines.append(
                f"| {_NAMES[m]} | {_fmt(pooled['metrics'][m])} | "
                f"{_fmt(ci.get('low'))} – {_fmt(ci.get('high'))} |"
            )
        recall = pooled["per_class_recall"]
        lines += [
            "",
            "Recall per class: " + ", ".join(f"{c} {_fmt(v)}" for c, v in recall.items()) + ".",
        ]
        for level in ("slide", "patient"):
            section = pooled.get(level)
            if not section:
                continue
            if "methods" not in section:
                lines += ["", f"{level.title()} level: not scored ({section['note']})."]
                continue
            lines += ["", f"{level.title()} level ({section['n_groups']} {level}s):", ""]
            for method, scores in section["methods"].items():
                lines.append(
                    f"- {method.replace('_', ' ')}: accuracy {_fmt(scores['accuracy'])}, "
                    f"balanced accuracy {_fmt(scores['balanced_accuracy'])}, macro-F1 "
                    f"{_fmt(scores['macro_f1'])}"
                )
        lines.append("")
    lines += [
        "## Reading this",
        "",
        "- The mean ± sd over folds is the spread of a model trained this way on this much "
        "data; the pooled out-of-fold scores mix the predictions of different models.",
        "- A fold's full report (calibration, per level, explanations): "
        f"`{result['evaluate_fold']}`.",
    ]
    if any(s in result["datasets"] for s in ("leukemia_synthetic",)):
        lines.append("- Synthetic data: these numbers say nothing about real cells.")
    return "\n".join(lines) + "\n"
