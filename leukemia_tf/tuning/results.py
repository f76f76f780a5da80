"""The results of a search: a table of all trials and the best trial as a flagfile.

Files written into ``--tune_dir``:

* ``results.csv`` and ``results.md``: every trial, completed ones first and
  sorted by the objective, then failed / interrupted ones with their reason.
* ``best.flags``: the best trial's training config, a flagfile that
  ``python -m leukemia_tf.train`` takes unchanged (its ``--model_dir`` is
  ``<tune_dir>/best_model``).
* ``best_trial.json``: the best trial's id, objective value, best epoch and
  hyperparameters (read by ``--retrain_best``).
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
from leukemia_tf.tuning import search_space
from leukemia_tf.tuning import tuner as tuner_lib

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
BEST_FLAGS = "best.flags"
BEST_TRIAL = "best_trial.json"
BEST_MODEL_DIR = "best_model"
#: The search's own flagfile (written by tune_lib).
SEARCH_FLAGFILE = "flags.txt"

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


def _last_line(message: str | None) -> str:
    lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def collect_rows(oracle, trials_dir: str, objective: str) -> list[TrialRow]:
    """Every trial of ``oracle``, sorted: completed by the objective, then the rest.

    Args:
      oracle: the search's KerasTuner oracle (the chief's in a distributed search).
      trials_dir: ``<tune_dir>/trials``.
      objective: the objective's name.

    Returns:
      The table rows, best first.
    """
    rows = []
    for trial_id, trial in oracle.trials.items():
        model_dir = os.path.join(trials_dir, str(trial_id))
        info = rundir.read_json(os.path.join(model_dir, tuner_lib.TRIAL_INFO)) or {}
        target = info.get("target_epochs")
        history = [
            r for r in rundir.read_history(model_dir) if target is None or r["epoch"] < target
        ]
        status = str(trial.status)
        completed = status == COMPLETED
        score = float(trial.score) if completed and trial.score is not None else None
        best_epoch = int(trial.best_step) if completed and trial.best_step is not None else None
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
    return str(value)


def _columns(space: Sequence[search_space.Hyperparameter], objective: str) -> list[str]:
    return (
        ["rank", "trial_id", "status", objective, "best_epoch", "epochs_trained"]
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
    columns = _columns(space, objective)
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
        writer.writerow({k: "" if record.get(k) is None else record.get(k) for k in columns})
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
    config = rundir.read_config(trial_dir)
    model_dir = os.path.join(tune_dir, BEST_MODEL_DIR)
    config = dataclasses.replace(config, model_dir=model_dir, overwrite=False)
    path = os.path.join(tune_dir, BEST_FLAGS)
    header = (
        f"# Best trial {row.trial_id} of the {search.tuner} search in {tune_dir}: "
        f"{search.objective}={row.score:.4f} at epoch {row.best_epoch + 1} "
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
    with tf.io.gfile.GFile(os.path.join(tune_dir, BEST_TRIAL), "w") as f:
        f.write(json.dumps(best, indent=2) + "\n")
    return path
