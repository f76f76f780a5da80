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
* after ``--ensemble``: ``ensemble/``, the finished fold models (of one
  repeat, or all) averaged as one model: the **mean of their class
  probabilities** (:mod:`leukemia_tf.models.ensemble`), in a run directory
  that ``evaluate``, ``predict`` and ``export`` take like any other
  (``ensemble.json`` records the folds, the folds left out and the
  averaging); and ``ensemble_metrics.json`` / ``ensemble_report.md``, each
  fold model and the ensemble scored on the test split
  (``metrics.headline_metrics``, temperature 1).

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
carry those ids; for a model over taxonomy nodes, every level's scores
(:func:`leukemia_tf.evaluation.levels.evaluate_levels`: the top-down greedy
walk and the per-level argmax, on the pooled predictions; the walk's
accuracy per level and fold, with mean and sd). Pooled scores of models trained on different folds are
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

from leukemia_tf import rundir, trust_lib
from leukemia_tf.data import folds as folds_lib
from leukemia_tf.data import names, pipeline
from leukemia_tf.data.folds import FoldError
from leukemia_tf.evaluation import aggregate as aggregate_lib
from leukemia_tf.evaluation import levels as levels_lib
from leukemia_tf.evaluation import metrics as metrics_lib
from leukemia_tf.taxonomy import Taxonomy
from leukemia_tf.training import model_factory
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


def read_folds(cv_dir: str) -> dict:
    """``DIR/folds.json`` of a cross-validation directory.

    Raises:
      FoldError: there is none (naming the command that makes it).
    """
    path = folds_path(cv_dir)
    if not tf.io.gfile.exists(path):
        raise FoldError(
            f"--model_dir={cv_dir!r} holds no {folds_lib.FOLDS_FILE}: run python -m "
            "leukemia_tf.crossval --flagfile=RECIPE --folds=K --model_dir=... first"
        )
    return folds_lib.read_fold_file(path)


def finished_folds(cv_dir: str, candidates) -> tuple[list[int], list[int]]:
    """``(finished, unfinished)``: the folds of ``candidates`` with and without ``train_summary.json``."""
    candidates = list(candidates)
    finished = [i for i in candidates if rundir.is_finished(fold_dir(cv_dir, i))]
    return finished, [i for i in candidates if i not in finished]


def check_fold_dirs(cv_dir: str, data: dict, folds: list[int]) -> None:
    """:func:`check_fold_dir` of each of ``folds`` against the recipe of ``folds.json``."""
    base = TrainConfig(**{**data["recipe"], "model_dir": rundir.expand(cv_dir)})
    for i in folds:
        check_fold_dir(fold_config(base, cv_dir, i))


def _fold_names(folds) -> str:
    return ", ".join(f"fold_{i}" for i in folds)


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


def _level_arrays(trained, predicted) -> dict:
    """``levels`` ``[N, L]`` and ``level_probs_<k>`` ``[N, n_k]`` of a taxonomy model, else {}.

    The node marginals are :func:`trust_lib.level_probabilities_of`'s (as in
    ``evaluate``'s per-level section): the hierarchical head's marginals, or
    the summed class probabilities under each node for a flat head.
    """
    if trained.taxonomy is None or predicted.levels is None:
        return {}
    out = {"levels": np.asarray(predicted.levels, np.int64)}
    for k, p in enumerate(trust_lib.level_probabilities_of(predicted.outputs, trained)):
        out[f"level_probs_{k}"] = np.asarray(p, np.float32)
    return out


def fold_predictions(fold_run: str, batch_size: int = 64) -> dict:
    """The fold model's probabilities on its validation part (computed, or reused).

    ``fold_run/oof_predictions.npz`` is reused while it is newer than
    ``best.keras`` (and, for a taxonomy model, holds the per-level arrays).
    Returns ``{"key", "label", "probs", "patient_id", "slide_id"}``, plus
    ``levels`` and ``level_probs_<k>`` for a model over taxonomy nodes
    (:func:`_level_arrays`).
    """
    path = rundir.join(fold_run, OOF_FILE)
    best = rundir.join(fold_run, rundir.BEST_MODEL)
    if tf.io.gfile.exists(path) and (
        tf.io.gfile.stat(path).mtime_nsec >= tf.io.gfile.stat(best).mtime_nsec
    ):
        cached = _read_npz(path)
        needs_levels = model_factory.taxonomy_for(rundir.read_config(fold_run)) is not None
        if "levels" in cached or not needs_levels:
            return cached
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
        **_level_arrays(trained, predicted),
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


def _level_scores(predicted: dict, taxonomy: Taxonomy, class_names, hierarchical: bool):
    """:func:`levels.evaluate_levels` of (pooled) fold predictions; None without level arrays."""
    if taxonomy is None or "levels" not in predicted:
        return None
    level_probs = [predicted[f"level_probs_{k}"] for k in range(taxonomy.num_levels)]
    probs = np.asarray(predicted["probs"], np.float64)
    section = levels_lib.evaluate_levels(
        level_probs,
        predicted["levels"],
        probs.argmax(axis=1),
        class_names,
        taxonomy,
        check_marginal_sums=hierarchical,
    )
    for entry in section["levels"]:  # the confusion matrices and per-node tables stay in evaluate
        for rule in ("greedy", "marginal_argmax"):
            if rule in entry:
                entry[rule] = {m: entry[rule][m] for m in ("n", *FOLD_METRICS)}
    return section


def _level_accuracies(section: dict | None) -> list:
    """Greedy-walk accuracy per level of a :func:`_level_scores` section (None: skipped)."""
    if section is None:
        return []
    return [e["greedy"]["accuracy"] if "greedy" in e else None for e in section["levels"]]


def _level_summary(rows: list[dict], num_levels: int) -> list[dict]:
    """Mean and sd over ``rows`` (folds) of each level's ``level_accuracy``."""
    return [_mean_sd([row["level_accuracy"][k] for row in rows]) for k in range(num_levels)]


def _concat(fold_runs: list[dict]) -> dict:
    """The fold predictions of one repeat as one set (level arrays only if every fold has them)."""
    names = [k for k in fold_runs[0] if all(k in f for f in fold_runs)]
    return {k: np.concatenate([f[k] for f in fold_runs]) for k in names}


def _pooled(
    fold_runs: list[dict], data: dict, bootstrap: int, seed: int, levels: dict | None = None
) -> dict:
    """Metrics of the pooled out-of-fold predictions of one repeat.

    ``levels``: ``{"taxonomy", "hierarchical"}`` of a model over taxonomy
    nodes (adds the per-level scores), else None.
    """
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
    if levels:
        out["levels"] = _level_scores(_concat(fold_runs), class_names=data["class_names"], **levels)
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
    data = read_folds(cv_dir)
    k, total = int(data["num_folds"]), num_total_folds(data)
    runs = [fold_dir(cv_dir, i) for i in range(total)]
    finished, unfinished = finished_folds(cv_dir, range(total))
    if not finished:
        raise FoldError(
            f"--aggregate: no fold of {cv_dir} has finished yet (no train_summary.json in "
            f"{_fold_names(unfinished)}); train them first"
        )
    check_fold_dirs(cv_dir, data, finished)
    num_classes = len(data["class_names"])
    config = rundir.read_config(runs[finished[0]])
    taxonomy = model_factory.taxonomy_for(config)
    levels = (
        {"taxonomy": taxonomy, "hierarchical": config.head == "hierarchical"} if taxonomy else None
    )
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
        if levels:
            section = _level_scores(predicted, class_names=data["class_names"], **levels)
            per_fold[-1]["level_accuracy"] = _level_accuracies(section)
    summary = {m: _mean_sd([row[m] for row in per_fold]) for m in FOLD_METRICS}
    if levels:
        summary["level_accuracy"] = _level_summary(per_fold, taxonomy.num_levels)
    repeats = []
    for r in range(int(data["repeats"])):
        members = [i for i in range(r * k, (r + 1) * k) if i in predictions]
        if not members:
            continue
        pooled = _pooled([predictions[i] for i in members], data, bootstrap, seed, levels)
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


def _render_levels(section: dict | None) -> list[str]:
    """The per-level table of one repeat's pooled predictions (none without a taxonomy)."""
    if not section:
        return []
    lines = [
        "",
        "Per taxonomy level (top-down greedy walk; in brackets the per-level argmax of the "
        "node marginals):",
        "",
        "| level | nodes | examples | " + " | ".join(_NAMES[m] for m in FOLD_METRICS) + " |",
        "|" + "---|" * (3 + len(FOLD_METRICS)),
    ]
    for entry in section["levels"]:
        head = f"| {entry['level']} | {len(entry['nodes'])} | {entry['n']} | "
        if "skipped" in entry:
            lines.append(head + " | ".join("n/a" for _ in FOLD_METRICS) + " |")
            continue
        greedy, argmax = entry["greedy"], entry["marginal_argmax"]
        lines.append(
            head + " | ".join(f"{_fmt(greedy[m])} ({_fmt(argmax[m])})" for m in FOLD_METRICS) + " |"
        )
    consistency = section["consistency"]["marginal_argmax"]
    if isinstance(consistency, dict) and consistency.get("fraction") is not None:
        lines += [
            "",
            f"Per-level argmaxes that form a path: {_fmt(consistency['fraction'])} of the examples.",
        ]
    return lines


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
    if "level_accuracy" in summary:
        lines += [
            "",
            "Taxonomy levels, accuracy of the top-down greedy walk per fold: "
            + "; ".join(
                f"level {k} "
                + (
                    f"{_fmt(stats['mean'])} ± {_fmt(stats['sd'])}"
                    if stats["mean"] is not None
                    else "n/a (no label reaches it)"
                )
                for k, stats in enumerate(summary["level_accuracy"])
            )
            + ".",
        ]
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
        lines += _render_levels(pooled.get("levels"))
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


# ---------------------------------------------------------------- ensemble
#: The fold ensemble's run directory, and its report (in the cross-validation directory).
ENSEMBLE_DIR = "ensemble"
ENSEMBLE_METRICS_FILE = "ensemble_metrics.json"
ENSEMBLE_REPORT_FILE = "ensemble_report.md"


def ensemble_dir(cv_dir: str) -> str:
    """The fold ensemble's run directory, ``DIR/ensemble``."""
    return rundir.join(rundir.expand(cv_dir), ENSEMBLE_DIR)


def ensemble_candidates(data: dict, repeat: int | None) -> list[int]:
    """The folds an ensemble of ``repeat`` (None: every repeat) draws on.

    Raises:
      FoldError: ``repeat`` out of range.
    """
    k, repeats = int(data["num_folds"]), int(data["repeats"])
    if repeat is None:
        return list(range(k * repeats))
    if not 0 <= repeat < repeats:
        raise FoldError(
            f"--repeat={repeat}: the repeats are numbered 0 to {repeats - 1} (or give 'all')"
        )
    return list(range(repeat * k, (repeat + 1) * k))


def _check_compatible(cv_dir: str, folds: list[int]) -> None:
    """Refuses folds whose input size, classes, label mode, head or taxonomy differ from the first's.

    Read from each fold's ``config.json`` and ``labels.txt`` (nothing is loaded).

    Raises:
      FoldError: naming the first fold that differs and how.
    """
    from leukemia_tf.models import heads
    from leukemia_tf.training import model_factory

    def traits(fold: int) -> dict:
        run = fold_dir(cv_dir, fold)
        config = rundir.read_config(run)
        taxonomy = model_factory.taxonomy_for(config)
        return {
            "input size": config.image_size,
            "classes (labels.txt)": rundir.read_labels(run),
            "label mode": config.label_mode,
            "head": config.head,
            "taxonomy": None if taxonomy is None else heads.taxonomy_to_tree(taxonomy),
        }

    first = traits(folds[0])
    for fold in folds[1:]:
        theirs = traits(fold)
        for what, value in first.items():
            if theirs[what] == value:
                continue
            if what == "taxonomy":
                detail = f"its taxonomy differs from fold_{folds[0]}'s"
            else:
                detail = f"its {what} is {theirs[what]!r}, fold_{folds[0]}'s {value!r}"
            raise FoldError(
                f"fold_{fold} cannot join the ensemble: {detail}; the folds of an ensemble must "
                "share input size, classes, label mode, head and taxonomy"
            )


def _clear_ensemble_dir(target: str) -> None:
    """Removes an earlier ensemble (``ensemble.json`` there) or an empty folder.

    Raises:
      FoldError: ``target`` holds something else.
    """
    if not tf.io.gfile.isdir(target):
        return
    if tf.io.gfile.exists(rundir.join(target, rundir.ENSEMBLE_FILE)) or not tf.io.gfile.listdir(
        target
    ):
        rundir.remove(target)
        return
    raise FoldError(
        f"{target} exists and holds no {rundir.ENSEMBLE_FILE} (not a fold ensemble): move it "
        "away before building the ensemble"
    )


def build_ensemble(cv_dir: str, repeat: int | None = None) -> tuple[dict, list]:
    """Writes ``DIR/ensemble``: the finished fold models averaged as one run directory.

    The directory holds ``ensemble.json`` (what was averaged, how, which folds
    were left out), ``config.json`` (the folds' recipe, with the pooled split as
    ``train_split`` and the recipe's ``val_split``), ``labels.txt`` and
    ``best.keras`` (:func:`leukemia_tf.models.ensemble.build_ensemble`). An
    earlier ensemble there is replaced, its evaluations included, and its
    ``ensemble_report.md`` / ``ensemble_metrics.json`` removed.

    Args:
      cv_dir: the cross-validation directory.
      repeat: the repeat whose folds are averaged; None: every finished fold.

    Returns:
      ``(record, members)``: the contents of ``ensemble.json`` and the loaded
      fold models (``rundir.TrainedModel``, float32), in fold order.

    Raises:
      FoldError: no ``folds.json``, ``repeat`` out of range, no finished fold,
        folds that differ (input size, classes, label mode, head, taxonomy) or
        hold a run of another recipe, or a ``DIR/ensemble`` that is not an
        ensemble.
    """
    from leukemia_tf.models import ensemble as ensemble_lib
    from leukemia_tf.models import trust
    from leukemia_tf.training import model_factory

    data = read_folds(cv_dir)
    finished, unfinished = finished_folds(cv_dir, ensemble_candidates(data, repeat))
    which = "" if repeat is None else f" (repeat {repeat})"
    if not finished:
        raise FoldError(
            f"--ensemble: no fold of {cv_dir}{which} has finished yet (no train_summary.json "
            f"in {_fold_names(unfinished)}); train them first"
        )
    _check_compatible(cv_dir, finished)
    check_fold_dirs(cv_dir, data, finished)
    target = ensemble_dir(cv_dir)
    _clear_ensemble_dir(target)
    for name in (ENSEMBLE_METRICS_FILE, ENSEMBLE_REPORT_FILE):  # they describe the one replaced
        rundir.remove(rundir.join(rundir.expand(cv_dir), name))
    members = [rundir.load_trained_model(fold_dir(cv_dir, i), trust=False) for i in finished]
    first = members[0]
    with model_factory.float32_policy():
        try:
            model = ensemble_lib.build_ensemble(
                [m.model for m in members],
                first.config.head,
                first.class_names,
                first.taxonomy,
                names=[ensemble_lib.fold_model_name(i) for i in finished],
            )
        except ValueError as e:
            raise FoldError(f"the fold models cannot be averaged: {e}") from None
    config = dataclasses.replace(
        first.config,
        model_dir=target,
        train_split=data["split"],
        val_split=data["recipe"].get("val_split", ""),
    )
    record = {
        "kind": "fold_ensemble",
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "cv_dir": rundir.expand(cv_dir),
        "folds_file": folds_path(cv_dir),
        "recipe_sha1": data.get("recipe_sha1"),
        "repeat": "all" if repeat is None else repeat,
        "folds": finished,
        "not_finished_left_out": unfinished,
        "averaging": ensemble_lib.AVERAGING,
        "outputs": (
            "flat head: logits = log(mean probability) + a shift per image; hierarchical head: "
            "level_k = log(mean marginal of the node) - log(mean marginal of its parent), plus a "
            "shift per image on level_0. A softmax (per sibling group) of these gives the mean "
            "probabilities; the shift makes the energy score the mean of the fold models'"
        ),
        "checkpoint": "best.keras of each fold",
        "fold_models": {
            f"fold_{i}": {
                "path": rundir.join(fold_dir(cv_dir, i), rundir.BEST_MODEL),
                "sha256": trust.model_fingerprint(
                    rundir.join(fold_dir(cv_dir, i), rundir.BEST_MODEL)
                ),
            }
            for i in finished
        },
        "train_split": (
            f"{data['split']}: every example of it trained all fold models but the one it was "
            "held out from"
        ),
        "trust": trust.ENSEMBLE_HAS_NO_FEATURES,
    }
    tf.io.gfile.makedirs(target)
    # ensemble.json first: a folder cut short is still recognised (and replaced) next time.
    rundir.write_json(rundir.join(target, rundir.ENSEMBLE_FILE), record)
    rundir.write_json(rundir.join(target, rundir.CONFIG_FILE), config.to_dict())
    rundir.write_labels(target, first.class_names)
    rundir.save_keras(model, rundir.join(target, rundir.BEST_MODEL))
    return record, members


def _split_predictions(trained, specs, split: str, data_dir, batch_size: int) -> dict:
    """``{"label", "probs"}`` (temperature 1) of a model over a split, plus its level arrays."""
    from leukemia_tf.evaluation.predictions import predict_split

    predicted = predict_split(trained, specs, split, data_dir, batch_size)
    probs = trained.label_space.probabilities(predicted.outputs, 1.0).numpy()
    return {
        "label": predicted.labels.astype(np.int64),
        "probs": probs.astype(np.float64),
        **_level_arrays(trained, predicted),
    }


def ensemble(
    cv_dir: str, repeat: int | None = None, split: str = "test", batch_size: int = 64
) -> dict:
    """Builds the fold ensemble (:func:`build_ensemble`) and scores it and each fold model on ``split``.

    Every finished fold model and the ensemble (reloaded from
    ``DIR/ensemble/best.keras``, as ``evaluate`` loads it) predict ``split``
    once, at temperature 1; the scores are ``metrics.headline_metrics``, as in
    the cross-validation report. Writes ``DIR/ensemble_metrics.json`` and
    ``DIR/ensemble_report.md``.

    Returns:
      The contents of ``ensemble_metrics.json``, plus ``report_path`` and
      ``metrics_path``.

    Raises:
      FoldError: see :func:`build_ensemble`; a split the data lack or without labels.
      RuntimeError: the saved ensemble does not reproduce the mean of the fold
        models' probabilities (a bug).
    """
    from leukemia_tf.evaluation.predictions import check_split

    data = read_folds(cv_dir)
    recipe = data["recipe"]
    specs = names.parse_datasets(recipe["datasets"])
    data_dir = None
    # The split first: a wrong one fails before anything is built.
    finished, _ = finished_folds(cv_dir, ensemble_candidates(data, repeat))
    if finished:
        # The data directory is not part of the recipe: the one the folds were trained with.
        data_dir = rundir.read_config(fold_dir(cv_dir, finished[0])).data_dir or None
        try:
            check_split(specs, split, data_dir)
        except ValueError as e:
            raise FoldError(f"--test_split={split!r}: {e}") from None
    record, members = build_ensemble(cv_dir, repeat)
    target = ensemble_dir(cv_dir)
    combined = rundir.load_trained_model(target, trust=False)
    num_classes = len(combined.class_names)
    levels = None
    if combined.taxonomy is not None:
        levels = {
            "taxonomy": combined.taxonomy,
            "hierarchical": combined.config.head == "hierarchical",
            "class_names": combined.class_names,
        }
    labels, per_fold, fold_probs = None, [], []
    for fold, member in zip(record["folds"], members, strict=True):
        predicted = _split_predictions(member, specs, split, data_dir, batch_size)
        probs = predicted["probs"]
        if labels is None:
            labels = predicted["label"]
        elif not np.array_equal(labels, predicted["label"]):
            raise RuntimeError(f"fold_{fold} read {split!r} in another order than the others")
        fold_probs.append(probs)
        row = metrics_lib.headline_metrics(labels, probs.argmax(axis=1), probs, num_classes)
        if levels:
            row["level_accuracy"] = _level_accuracies(_level_scores(predicted, **levels))
        per_fold.append({"fold": fold, "repeat": fold // int(data["num_folds"]), **row})
    predicted = _split_predictions(combined, specs, split, data_dir, batch_size)
    ens_probs = predicted["probs"]
    if not np.array_equal(labels, predicted["label"]):
        raise RuntimeError(f"the ensemble read {split!r} in another order than the fold models")
    difference = float(np.max(np.abs(ens_probs - np.mean(fold_probs, axis=0))))
    if not difference <= 1e-4:
        raise RuntimeError(
            f"the saved ensemble's probabilities differ from the mean of its fold models' by "
            f"{difference:.2e} on {split!r}"
        )
    ensemble_row = metrics_lib.headline_metrics(
        labels, ens_probs.argmax(axis=1), ens_probs, num_classes
    )
    summary = {m: _mean_sd([row[m] for row in per_fold]) for m in FOLD_METRICS}
    if levels:
        ensemble_row["level_accuracy"] = _level_accuracies(_level_scores(predicted, **levels))
        summary["level_accuracy"] = _level_summary(per_fold, combined.taxonomy.num_levels)
    held_out = not set(names.split_names(split)) & set(names.split_names(data["split"]))
    result = _finite(
        {
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "cv_dir": rundir.expand(cv_dir),
            "ensemble_dir": target,
            "datasets": recipe["datasets"],
            "split": split,
            "held_out": held_out,
            "pooled_split": data["split"],
            "n_examples": int(len(labels)),
            "class_names": combined.class_names,
            "repeat": record["repeat"],
            "folds": record["folds"],
            "not_finished_left_out": record["not_finished_left_out"],
            "averaging": record["averaging"],
            "checkpoint": "best.keras of each fold, temperature 1",
            "per_fold": per_fold,
            "single_models": summary,
            "ensemble": ensemble_row,
            "ensemble_minus_mean": {
                m: (
                    None
                    if summary[m]["mean"] is None or not np.isfinite(ensemble_row[m])
                    else ensemble_row[m] - summary[m]["mean"]
                )
                for m in FOLD_METRICS
            },
            "max_abs_difference_from_mean": difference,
            "evaluate_ensemble": (
                f"python -m leukemia_tf.evaluate --model_dir={target} --split={split}"
            ),
        }
    )
    metrics_path = rundir.join(rundir.expand(cv_dir), ENSEMBLE_METRICS_FILE)
    rundir.write_text(metrics_path, json.dumps(result, indent=2) + "\n")
    report_path = rundir.join(rundir.expand(cv_dir), ENSEMBLE_REPORT_FILE)
    rundir.write_text(report_path, render_ensemble(result))
    return {**result, "metrics_path": metrics_path, "report_path": report_path}


def _repeat_text(repeat) -> str:
    return "" if repeat == "all" else f", repeat {repeat}"


def render_ensemble(result: dict) -> str:
    """``ensemble_report.md`` from ``ensemble_metrics.json``."""
    folds = result["folds"]
    lines = [
        f"# Fold ensemble: {result['datasets']}",
        "",
        f"The {len(folds)} finished fold models of this cross-validation ({_fold_names(folds)}"
        f"{_repeat_text(result['repeat'])}) averaged as "
        f"one model in `{ENSEMBLE_DIR}/`: the **{result['averaging']}**. Every model is scored "
        f"on the split `{result['split']}` ({result['n_examples']} examples): each fold model's "
        "`best.keras` and the ensemble, at temperature 1.",
        "",
    ]
    if result["not_finished_left_out"]:
        lines += [
            f"**Not finished (left out)**: {_fold_names(result['not_finished_left_out'])}.",
            "",
        ]
    if not result["held_out"]:
        lines += [
            f"> **`{result['split']}` is part of the split the folds divide "
            f"(`{result['pooled_split']}`)**: every fold model but one trained on each of its "
            "examples, so these scores are not held-out scores.",
            "",
        ]
    header = "| model | " + " | ".join(_NAMES[m] for m in FOLD_METRICS) + " |"
    lines += [header, "|" + "---|" * (1 + len(FOLD_METRICS))]
    for row in result["per_fold"]:
        lines.append(
            f"| fold_{row['fold']} | " + " | ".join(_fmt(row[m]) for m in FOLD_METRICS) + " |"
        )
    single = result["single_models"]
    lines.append(
        "| **single models, mean ± sd** | "
        + " | ".join(f"{_fmt(single[m]['mean'])} ± {_fmt(single[m]['sd'])}" for m in FOLD_METRICS)
        + " |"
    )
    lines.append(
        "| **ensemble** | "
        + " | ".join(f"**{_fmt(result['ensemble'][m])}**" for m in FOLD_METRICS)
        + " |"
    )
    gain = result["ensemble_minus_mean"]
    lines += [
        "",
        "Ensemble minus the mean of the single models: "
        + ", ".join(
            f"{_NAMES[m]} {'n/a' if gain[m] is None else f'{gain[m]:+.3f}'}" for m in FOLD_METRICS
        )
        + ".",
        "",
    ]
    if "level_accuracy" in single:
        lines += [
            "Taxonomy levels, accuracy of the top-down greedy walk:",
            "",
            "| level | single models, mean ± sd | ensemble |",
            "|---|---|---|",
        ]
        for k, stats in enumerate(single["level_accuracy"]):
            value = result["ensemble"]["level_accuracy"][k]
            lines.append(
                f"| {k} | {_fmt(stats['mean'])} ± {_fmt(stats['sd'])} | {_fmt(value)} |"
                if value is not None
                else f"| {k} | n/a (no label reaches it) | n/a |"
            )
        lines.append("")
    lines += [
        "## Reading this",
        "",
        "- The ensemble's probabilities are the mean of the fold models' probabilities (on these "
        "images the saved model reproduces that mean to "
        f"{result['max_abs_difference_from_mean']:.1e}).",
        "- Each fold model trained on (K-1)/K of the pooled data; together they have seen all of "
        "it, so the ensemble has no held-out validation split: a temperature that `evaluate` fits "
        "on the recipe's validation split is reported as fitted on training data and not stored "
        "when that split is part of the folds.",
        "- `ensemble/` is an ordinary run directory: the full report (calibration, per level, "
        f"patients) is `{result['evaluate_ensemble']}`; `predict` and `export` take "
        f"`--model_dir={result['ensemble_dir']}`.",
        "- It has no trust statistics (each fold model has its own feature space): the logit "
        "scores (max probability, margin, energy: the mean of the fold models') only, no "
        "referral or back-off.",
    ]
    if "leukemia_synthetic" in result["datasets"]:
        lines.append("- Synthetic data: these numbers say nothing about real cells.")
    return "\n".join(lines) + "\n"
