"""The results of a search: a table of all trials and the best trial as a flagfile.

Files written into ``--tune_dir``:

* ``results.csv`` and ``results.md``: every trial, completed ones first and
  sorted by the objective, then failed / interrupted ones with their reason.
* ``best.flags``: the best trial's training config, a flagfile that
  ``python -m leukemia_tf.train`` takes unchanged (its ``--model_dir`` is
  ``<tune_dir>/best_model``).
* ``best_trial.json``: the best trial's id, objective value, best epoch and
  hyperparameters (read by ``--retrain_best``).

A cross-validated search (``--cv_folds=K``) adds two columns after the
objective: ``<objective>_sd``, the sample standard deviation of the folds'
values, and ``<objective>_folds``, the K per-fold values (each fold's
objective at its own best epoch; ``;``-separated in the CSV). The objective
column is their mean (the oracle's score), ``best_epoch`` the mean of the
folds' best epochs, and the other metric columns are means over the folds'
best epochs.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Sequence

import tensorflow as tf

from leukemia_tf import rundir
from leukemia_tf.data import folds as folds_lib
from leukemia_tf.training.config import TrainConfig
from leukemia_tf.tuning import search_space
from leukemia_tf.tuning import tuner as tuner_lib

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
BEST_FLAGS = "best.flags"
BEST_TRIAL = "best_trial.json"
BEST_MODEL_DIR = "best_model"
#: The search's own flagfile (written by tune_lib).
SEARCH_FLAGFILE = "flags.txt"
#: The fold assignment of a cross-validated search (in --tune_dir).
FOLDS_FILE = folds_lib.FOLDS_FILE

#: The engine's per-epoch validation metrics, in table order.
VAL_METRICS = ("val_macro_f1", "val_balanced_accuracy", "val_accuracy", "val_loss")

COMPLETED = "COMPLETED"


@dataclasses.dataclass
class TrialRow:
    """One trial of the results table.

    Attributes:
      trial_id: KerasTuner's trial id (also the folder under ``trials/``).
      status: KerasTuner's status: COMPLETED, FAILED, INVALID, RUNNING (or
        interrupted while running).
      score: the objective at the best epoch (completed trials).
      best_epoch: 0-based epoch of the best objective value (completed trials).
      epochs_trained: epochs in the trial's history (including the epochs of
        the Hyperband trial it continues).
      values: hyperparameter values by ``TrainConfig`` field name.
      metrics: the engine's metrics at the best epoch.
      continued_from: the Hyperband trial this one continues, if any.
      tuner_id: the KerasTuner worker that ran it.
      wall_time_s: seconds the trial took (this trial's epochs only).
      reason: why it failed / is not finished.
      fold_values: cross-validated search: each fold's objective at its best
        epoch (the folds that have one); ``score`` is their mean. None otherwise.
      fold_best_epochs: the folds' best epochs (0-based), aligned with ``fold_values``.
      score_sd: the sample standard deviation of ``fold_values``.
    """

    trial_id: str
    status: str
    score: float | None
    best_epoch: int | None
    epochs_trained: int
    values: dict
    metrics: dict
    continued_from: str | None
    tuner_id: str
    wall_time_s: float | None
    reason: str
    fold_values: list | None = None
    fold_best_epochs: list | None = None
    score_sd: float | None = None


def _last_line(message: str | None) -> str:
    lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def collect_rows(oracle, trials_dir: str, objective: str, cv_folds: int = 0) -> list[TrialRow]:
    """Every trial of ``oracle``, sorted: completed by the objective, then the rest.

    Args:
      oracle: the search's KerasTuner oracle (the chief's in a distributed search).
      trials_dir: ``<tune_dir>/trials``.
      objective: the objective's name.
      cv_folds: K of a cross-validated search (0: none): the per-fold values
        and metrics are read from the trials' fold runs.

    Returns:
      The table rows, best first.
    """
    rows = []
    for trial_id, trial in oracle.trials.items():
        model_dir = os.path.join(trials_dir, str(trial_id))
        info = rundir.read_json(os.path.join(model_dir, tuner_lib.TRIAL_INFO)) or {}
        target = info.get("target_epochs")
        status = str(trial.status)
        completed = status == COMPLETED
        score = float(trial.score) if completed and trial.score is not None else None
        best_epoch = int(trial.best_step) if completed and trial.best_step is not None else None
        folds = None
        if cv_folds:
            fold_histories = [
                rundir.read_history(os.path.join(model_dir, tuner_lib.FOLD_DIR.format(i)), target)
                for i in range(cv_folds)
            ]
            folds = tuner_lib.fold_summary(fold_histories, objective)
            history = max(fold_histories, key=len)
            metrics = folds["metrics"] if completed else {}
        else:
            history = rundir.read_history(model_dir, target)
            metrics = next((r for r in history if r["epoch"] == best_epoch), {})
        reason = ""
        if not completed:
            reason = info.get("reason") or _last_line(trial.message)
            if not reason and status == "RUNNING":
                reason = "running, or interrupted (resume with --resume)"
            if not reason and score is None and info.get("status") == "completed":
                reason = f"the objective {objective} was NaN"
        rows.append(
            TrialRow(
                trial_id=str(trial_id),
                status=status,
                score=score,
                best_epoch=best_epoch,
                epochs_trained=len(history),
                values={k: v for k, v in trial.hyperparameters.values.items() if "/" not in k},
                metrics=metrics,
                continued_from=info.get("continued_from"),
                tuner_id=str(info.get("tuner_id", "")),
                wall_time_s=info.get("wall_time_s"),
                reason=reason,
                fold_values=None if folds is None else folds["values"],
                fold_best_epochs=None if folds is None else folds["best_epochs"],
                score_sd=None if folds is None else folds["sd"],
            )
        )
    sign = -1.0 if search_space.OBJECTIVES[objective] == "max" else 1.0
    done = sorted(
        (r for r in rows if r.score is not None and not math.isnan(r.score)),
        key=lambda r: (sign * r.score, r.trial_id),
    )
    rest = sorted((r for r in rows if r not in done), key=lambda r: r.trial_id)
    return done + rest


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "; ".join(_format(v) for v in value)
    return str(value)


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(str(v) for v in value)
    return value


def _columns(
    space: Sequence[search_space.Hyperparameter], objective: str, cv_folds: int = 0
) -> list[str]:
    spread = [f"{objective}_sd", f"{objective}_folds"] if cv_folds else []
    return (
        ["rank", "trial_id", "status", objective, *spread, "best_epoch", "epochs_trained"]
        + [p.name for p in space]
        + [m for m in VAL_METRICS if m != objective]
        + ["continued_from", "tuner_id", "wall_time_s", "reason"]
    )


def _record(row: TrialRow, rank: int | None, objective: str) -> dict:
    record = {
        "rank": rank,
        "trial_id": row.trial_id,
        "status": row.status,
        objective: row.score,
        # 1-based, as the engine prints epochs.
        "best_epoch": None if row.best_epoch is None else row.best_epoch + 1,
        "epochs_trained": row.epochs_trained,
        "continued_from": row.continued_from,
        "tuner_id": row.tuner_id,
        "wall_time_s": row.wall_time_s,
        "reason": row.reason,
        f"{objective}_sd": row.score_sd,
        f"{objective}_folds": row.fold_values,
    }
    record.update(row.values)
    for metric in VAL_METRICS:
        if metric != objective:
            record[metric] = row.metrics.get(metric)
    return record


def write_tables(
    rows: Sequence[TrialRow],
    tune_dir: str,
    space: Sequence[search_space.Hyperparameter],
    search: search_space.SearchConfig,
) -> tuple[str, str]:
    """Writes ``results.csv`` (every column) and ``results.md`` (the searched ones).

    Returns:
      The paths of the CSV and the Markdown file.
    """
    objective = search.objective
    columns = _columns(space, objective, search.cv_folds)
    records = []
    rank = 0
    for row in rows:
        ranked = row.score is not None
        rank += ranked
        records.append(_record(row, rank if ranked else None, objective))

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({k: _csv_value(record.get(k)) for k in columns})
    csv_path = os.path.join(tune_dir, RESULTS_CSV)
    with tf.io.gfile.GFile(csv_path, "w") as f:
        f.write(text.getvalue())

    # Markdown: hyperparameters fixed for the whole search go above the table.
    fixed = [p for p in space if p.kind == "fixed"]
    searched = {p.name for p in space if p.kind != "fixed"}
    md_columns = [c for c in columns if c not in {p.name for p in fixed}]
    direction = search_space.OBJECTIVES[objective]
    completed = sum(r.score is not None for r in rows)
    lines = [
        f"# Search results: {search.tuner}, objective {objective} ({direction})",
        "",
        f"{len(rows)} trials: {completed} completed, {len(rows) - completed} failed or "
        "unfinished. Completed trials are sorted by the objective (its value at the trial's "
        "best epoch); the others follow with their reason.",
        "",
        "Searched: "
        + (
            "; ".join(p.describe() for p in space if p.name in searched)
            if searched
            else "(nothing: every hyperparameter is fixed)"
        )
        + ".",
        "",
        "Fixed: " + "; ".join(p.describe() for p in fixed) + "." if fixed else "Fixed: none.",
        "",
    ]
    if search.cv_folds:
        lines += [
            f"Cross-validated: every trial trained {search.cv_folds} fold models on the grouped, "
            f"stratified folds of {FOLDS_FILE} (patients, else slides, never split). "
            f"{objective} is the mean over folds of each fold's value at its best epoch, "
            f"{objective}_sd their sample standard deviation and {objective}_folds the "
            "per-fold values; best_epoch is the mean of the folds' best epochs (rounded down) "
            "and the other metrics are means over the folds' best epochs.",
            "",
        ]
    lines += [
        "| " + " | ".join(md_columns) + " |",
        "|" + "---|" * len(md_columns),
    ]
    for record in records:
        cells = []
        for column in md_columns:
            cell = _format(record.get(column))
            if column == "reason" and len(cell) > 160:
                cell = cell[:157] + "..."
            cells.append(cell.replace("|", "\\|").replace("\n", " "))
        lines.append("| " + " | ".join(cells) + " |")
    md_path = os.path.join(tune_dir, RESULTS_MD)
    with tf.io.gfile.GFile(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def trial_run_config(tune_dir: str, trial_id: str) -> TrainConfig:
    """The training config of a trial, with the recipe's own splits.

    A cross-validated trial has no run of its own: its config is fold 0's with
    the ``--train_split`` and ``--val_split`` the folds divide (from
    ``<tune_dir>/folds.json``) instead of fold splits.
    """
    trial_dir = os.path.join(tune_dir, tuner_lib.TRIALS_DIR, str(trial_id))
    if tf.io.gfile.exists(os.path.join(trial_dir, rundir.CONFIG_FILE)):
        return rundir.read_config(trial_dir)
    fold_run = os.path.join(trial_dir, tuner_lib.FOLD_DIR.format(0))
    if not tf.io.gfile.exists(os.path.join(fold_run, rundir.CONFIG_FILE)):
        return rundir.read_config(trial_dir)  # raises, naming the trial's folder
    recipe = folds_lib.read_fold_file(os.path.join(tune_dir, FOLDS_FILE))["recipe"]
    return dataclasses.replace(
        rundir.read_config(fold_run),
        model_dir=trial_dir,
        train_split=recipe["train_split"],
        val_split=recipe["val_split"],
    )


def write_best(
    row: TrialRow, tune_dir: str, trials_dir: str, search: search_space.SearchConfig
) -> str:
    """Writes the best trial as ``best.flags`` (for ``leukemia_tf.train``) and ``best_trial.json``.

    Args:
      row: the best completed trial.
      tune_dir: the search's output directory.
      trials_dir: ``<tune_dir>/trials``.
      search: the search flags.

    Returns:
      The path of ``best.flags``.
    """
    trial_dir = os.path.join(trials_dir, row.trial_id)
    config = trial_run_config(tune_dir, row.trial_id)
    model_dir = os.path.join(tune_dir, BEST_MODEL_DIR)
    config = dataclasses.replace(config, model_dir=model_dir, overwrite=False)
    path = os.path.join(tune_dir, BEST_FLAGS)
    if row.fold_values:
        score = (
            f"{search.objective}={row.score:.4f} ± {row.score_sd or 0:.4f} (mean ± sd over "
            f"{len(row.fold_values)} cross-validation folds) at mean best epoch "
            f"{row.best_epoch + 1}"
        )
    else:
        score = f"{search.objective}={row.score:.4f} at epoch {row.best_epoch + 1}"
    header = (
        f"# Best trial {row.trial_id} of the {search.tuner} search in {tune_dir}: {score} "
        f"(of {row.epochs_trained} trained; the schedule spans --epochs={config.epochs}).\n"
        "# Train this configuration:\n"
        f"#   python -m leukemia_tf.train --flagfile={path}\n"
        "# Retrain it on training + validation data for its best number of epochs and export it:\n"
        f"#   python -m leukemia_tf.tune --flagfile={os.path.join(tune_dir, SEARCH_FLAGFILE)} "
        "--resume --retrain_best\n"
    )
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(header + config.to_flagfile())
    best = {
        "trial_id": row.trial_id,
        "trial_dir": trial_dir,
        "objective": search.objective,
        "value": row.score,
        "best_epoch": row.best_epoch,
        "epochs_trained": row.epochs_trained,
        "hyperparameters": row.values,
        "flagfile": path,
    }
    if row.fold_values is not None:
        best["cv"] = {
            "folds": search.cv_folds,
            "values": row.fold_values,
            "best_epochs": row.fold_best_epochs,
            "sd": row.score_sd,
        }
    with tf.io.gfile.GFile(os.path.join(tune_dir, BEST_TRIAL), "w") as f:
        f.write(json.dumps(best, indent=2) + "\n")
    return path
