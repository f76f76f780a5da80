"""Runs a hyperparameter search (the library behind ``python -m leukemia_tf.tune``).

``--tune_dir`` after a search::

  tune_dir/
    tune_config.json     the resolved base config, search flags and space (checked by --resume)
    flags.txt            a flagfile of this search: --flagfile=tune_dir/flags.txt --resume continues it
    trials/              the TensorBoard logdir (HParams dashboard)
      <trial_id>/        the trial's training model_dir (history.csv, best.keras, logs/, ...)
        trial_info.json  who ran it, its status and failure reason, time, memory
      <trial_id>/fold_<i>/  with --cv_folds: fold i's training run (the trial dir holds
                            trial_info.json and these)
    folds.json           with --cv_folds: the fold assignment (written once, reused on --resume)
    keras_tuner/         KerasTuner's state (oracle.json, trial_<id>/trial.json)
    results.csv, results.md, best.flags, best_trial.json   (see results.py)
    retrain/, export/    with --retrain_best

Distributed search (KerasTuner's chief / worker mode): the same command with
``KERASTUNER_ORACLE_IP``, ``KERASTUNER_ORACLE_PORT`` and ``KERASTUNER_TUNER_ID``
(``chief`` for the oracle process, any other id for each worker) in the
environment. The chief checks and prepares ``--tune_dir``, serves the oracle
and writes the results; each worker waits for the chief's
``tune_config.json``, checks that its flags match it, and runs trials.
``--tune_dir`` must be shared by all of them (a network disk or ``gs://``):
a Hyperband trial may continue a run another worker trained.

Cross-validated search (``--cv_folds=K``): before anything else is written
into a new ``--tune_dir``, the recipe's ``--train_split`` + ``--val_split``
are assigned to K grouped, stratified folds by
:func:`leukemia_tf.crossval_lib.prepare_folds` (the same assignment as
``python -m leukemia_tf.crossval --folds=K``, seed ``--seed``) into
``--tune_dir/folds.json``; a resumed search and every distributed worker read
that file and never assign again. Every trial trains K fold runs and is
scored by the mean over folds (:mod:`leukemia_tf.tuning.tuner`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from collections.abc import Sequence

import tensorflow as tf

from leukemia_tf import rundir
from leukemia_tf.training.config import ConfigError, TrainConfig
from leukemia_tf.tuning import results as results_lib
from leukemia_tf.tuning import search_space
from leukemia_tf.tuning import tuner as tuner_lib

TUNE_CONFIG = "tune_config.json"
TUNE_FLAGS = results_lib.SEARCH_FLAGFILE
RETRAIN_DIR = "retrain"
EXPORT_DIR = "export"

#: Search flags that may change when a search is resumed.
RESUMABLE_CHANGES = (
    "tune_dir",  # a search folder may be moved
    "resume",
    "max_trials",
    "max_consecutive_failed_trials",
    "max_retries_per_trial",
    "retrain_best",
    "export_dir",
)
#: Seconds a worker waits for the chief to create the search.
WORKER_WAIT_S = 600


class TuneDirError(ConfigError):
    """--tune_dir cannot be used as asked (not empty without --resume, nothing to resume, ...)."""


class SearchError(RuntimeError):
    """The search stopped early (too many failed trials in a row)."""


@dataclasses.dataclass
class SearchResult:
    """What :func:`run_search` returns.

    Attributes:
      tune_dir: the search's output directory.
      role: ``"single"``, ``"chief"`` or ``"worker"`` (a worker gets no table).
      rows: the results table, best first.
      results_csv, results_md: the table files.
      best_flagfile: ``best.flags``, or None when no trial completed.
      retrain: the :class:`TrainResult` of ``--retrain_best``.
      export: the :class:`ExportResult` of ``--retrain_best``.
    """

    tune_dir: str
    role: str
    rows: list = dataclasses.field(default_factory=list)
    results_csv: str | None = None
    results_md: str | None = None
    best_flagfile: str | None = None
    retrain: object | None = None
    export: object | None = None

    @property
    def best(self) -> results_lib.TrialRow | None:
        return next((r for r in self.rows if r.score is not None), None)


def tuner_role() -> str:
    """``"single"``, or ``"chief"`` / ``"worker"`` in KerasTuner's distributed mode.

    Raises:
      ConfigError: ``KERASTUNER_ORACLE_IP`` is set without the other variables.
    """
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    missing = [v for v in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if v not in os.environ]
    if missing:
        raise ConfigError(
            f"KERASTUNER_ORACLE_IP is set (distributed tuning) but {', '.join(missing)} is not: "
            "set KERASTUNER_ORACLE_PORT, and KERASTUNER_TUNER_ID=chief for the oracle process or "
            "a unique id (tuner0, tuner1, ...) for each worker"
        )
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


# --------------------------------------------------------------- tune_dir
def _space_dicts(space: Sequence[search_space.Hyperparameter]) -> list[dict]:
    return [{"name": p.name, "kind": p.kind, "values": list(p.values), "log": p.log} for p in space]


def _describe_search(base: TrainConfig, search: search_space.SearchConfig, space) -> dict:
    return {
        "format": 1,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "base": base.to_dict(),
        "search": search.to_dict(),
        "space": _space_dicts(space),
    }


def _comparable(description: dict) -> dict:
    """The parts of a search description that a resumed search must not change.

    A search flag missing from an older description counts as its default
    (``--cv_folds`` came later: an older search was not cross-validated).
    """
    searched = {p.field for p in search_space.PARAMS}
    base = {k: v for k, v in description["base"].items() if k not in searched and k != "verbose"}
    search = {
        k: v
        for k, v in {**search_space.SearchConfig().to_dict(), **description["search"]}.items()
        if k not in RESUMABLE_CHANGES and k not in search_space.PARAMS_BY_FLAG
    }
    return {"base": base, "search": search, "space": description["space"]}


def _differences(saved: dict, current: dict) -> list[str]:
    out = []
    a, b = _comparable(saved), _comparable(current)
    for section in ("base", "search"):
        for key in sorted(set(a[section]) | set(b[section])):
            if a[section].get(key) != b[section].get(key):
                out.append(f"--{key}: was {a[section].get(key)!r}, now {b[section].get(key)!r}")
    old = {p["name"]: p for p in a["space"]}
    new = {p["name"]: p for p in b["space"]}
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            out.append(f"search space of {name}: was {old.get(name)}, now {new.get(name)}")
    return out


def _search_flagfile(
    base: TrainConfig,
    search: search_space.SearchConfig,
    space: Sequence[search_space.Hyperparameter],
) -> str:
    """A flagfile that reproduces this search.

    The searched training flags (``--learning_rate``, ...) are left out: their
    search flags carry the resolved space, fixed values included.
    """
    lines = []
    for name, value in base.to_dict().items():
        if name in search_space.PARAMS_BY_FIELD or name in search_space.SKIPPED_TRAIN_FLAGS:
            continue
        lines.append(_flag_line(name, value))
    resolved = {search_space.PARAMS_BY_FIELD[p.name].flag: p.flag_value() for p in space}
    for name, value in search.to_dict().items():
        if name in ("resume", "retrain_best"):
            continue
        lines.append(_flag_line(name, resolved.get(name, value)))
    return "\n".join(lines) + "\n"


def _flag_line(name: str, value) -> str:
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    return f"--{name}={value}"


def folds_recipe(base: TrainConfig, search: search_space.SearchConfig) -> TrainConfig:
    """The config the search's folds are made for (``crossval_lib.prepare_folds``).

    The base config in ``--tune_dir``, with the searched fields at their
    ``TrainConfig`` defaults: every trial sets those, so the recipe recorded in
    ``folds.json`` (and checked when the search resumes) is the same however
    the search flags fix or search them.
    """
    defaults = TrainConfig()
    return dataclasses.replace(
        base,
        model_dir=search.tune_dir,
        overwrite=False,
        **{p.field: getattr(defaults, p.field) for p in search_space.PARAMS},
    )


def prepare_cv_folds(base: TrainConfig, search: search_space.SearchConfig) -> dict | None:
    """Assigns the folds of ``--cv_folds`` into ``--tune_dir/folds.json``, or reads them.

    None without ``--cv_folds``. The folds divide the recipe's ``--train_split``
    + ``--val_split`` (``crossval``'s default ``--cv_splits``), grouped by
    patient, else slide, and stratified by label, with seed ``--seed``.

    Raises:
      FoldError: a class with fewer groups than ``--cv_folds`` (naming the
        flag, the class and its group count), unlabelled examples, or an
        existing ``folds.json`` made for another recipe.
    """
    if not search.cv_folds:
        return None
    from leukemia_tf import crossval_lib

    return crossval_lib.prepare_folds(
        folds_recipe(base, search), search.cv_folds, repeats=1, flag="cv_folds"
    )


def _is_empty_dir(path: str) -> bool:
    return not tf.io.gfile.exists(path) or not tf.io.gfile.listdir(path)


def prepare_tune_dir(base: TrainConfig, search: search_space.SearchConfig, space) -> None:
    """Refuses a non-empty --tune_dir without --resume; checks and records the search.

    With ``--cv_folds`` the folds are assigned first (:func:`prepare_cv_folds`):
    a search that cannot be cross-validated writes nothing.

    Raises:
      TuneDirError: --tune_dir holds something and --resume is not set; or
        --resume and --tune_dir holds no search, or a search with other flags.
      FoldError: see :func:`prepare_cv_folds`.
    """
    tune_dir = search.tune_dir
    config_path = os.path.join(tune_dir, TUNE_CONFIG)
    current = _describe_search(base, search, space)
    if search.resume:
        saved = rundir.read_json(config_path)
        if saved is None:
            raise TuneDirError(
                f"--resume: --tune_dir={tune_dir!r} holds no search to resume ({TUNE_CONFIG} not "
                "found); drop --resume to start a new search there"
            )
        diff = _differences(saved, current)
        if diff:
            raise TuneDirError(
                f"--resume: the search in --tune_dir={tune_dir!r} was started with other "
                "settings; resume it with its own flags (--flagfile="
                f"{os.path.join(tune_dir, TUNE_FLAGS)} --resume) or start a new --tune_dir. "
                "Differences:\n  " + "\n  ".join(diff)
            )
        print(f"Resuming the search in {tune_dir} (started {saved.get('created')}).")
        prepare_cv_folds(base, search)  # reads folds.json (or writes it, if it went missing)
        return
    if not _is_empty_dir(tune_dir):
        what = (
            f"the search started {rundir.read_json(config_path).get('created')}"
            if tf.io.gfile.exists(config_path)
            else f"{len(tf.io.gfile.listdir(tune_dir))} entries"
        )
        raise TuneDirError(
            f"--tune_dir={tune_dir!r} is not empty (it holds {what}). Pass --resume to continue "
            "that search, or choose a new or empty --tune_dir; nothing was changed"
        )
    prepare_cv_folds(base, search)
    tf.io.gfile.makedirs(tune_dir)
    with tf.io.gfile.GFile(os.path.join(tune_dir, TUNE_FLAGS), "w") as f:
        f.write(
            "# The flags of this search. Continue it (after an interruption, or with a larger "
            "--max_trials) with:\n"
            f"#   python -m leukemia_tf.tune --flagfile={os.path.join(tune_dir, TUNE_FLAGS)} "
            "--resume\n" + _search_flagfile(base, search, space)
        )
    trials_dir = os.path.join(tune_dir, tuner_lib.TRIALS_DIR)
    tf.io.gfile.makedirs(trials_dir)
    tuner_lib.write_hparams_config(trials_dir, space)
    # Written last: workers wait for it before they join the search.
    rundir.write_json(config_path, current)


def _wait_for_chief(
    base: TrainConfig, search: search_space.SearchConfig, space, timeout_s: float
) -> None:
    config_path = os.path.join(search.tune_dir, TUNE_CONFIG)
    deadline = time.time() + timeout_s
    while not tf.io.gfile.exists(config_path):
        if time.time() > deadline:
            raise TuneDirError(
                f"worker {os.environ.get('KERASTUNER_TUNER_ID')}: no search appeared in "
                f"--tune_dir={search.tune_dir!r} within {timeout_s:.0f} s; start the chief "
                "(KERASTUNER_TUNER_ID=chief) with the same --tune_dir, which must be shared"
            )
        time.sleep(1.0)
    diff = _differences(rundir.read_json(config_path), _describe_search(base, search, space))
    if diff:
        raise TuneDirError(
            f"worker {os.environ.get('KERASTUNER_TUNER_ID')}: its flags differ from the chief's "
            f"search in {search.tune_dir}:\n  " + "\n  ".join(diff)
        )
    # The chief wrote folds.json before tune_config.json: this only reads it.
    prepare_cv_folds(base, search)


# ----------------------------------------------------------------- search
def build_tuner(
    base: TrainConfig,
    search: search_space.SearchConfig,
    space: Sequence[search_space.Hyperparameter],
    epoch_callbacks: Sequence[tuner_lib.TrialEpochCallback] = (),
) -> tuner_lib.EngineTuner:
    """The KerasTuner tuner of a search (reloads its state when the project exists)."""
    hypermodel = tuner_lib.LeukemiaHyperModel(base, space, search.objective)
    oracle = tuner_lib.make_oracle(search, base.epochs)
    project = os.path.join(search.tune_dir, tuner_lib.PROJECT_NAME)
    tuner_file = os.path.join(project, f"{os.environ.get('KERASTUNER_TUNER_ID', 'tuner0')}.json")
    if (
        search.resume
        and tuner_role() != "worker"
        and tf.io.gfile.exists(os.path.join(project, "oracle.json"))
        and not tf.io.gfile.exists(tuner_file)
    ):
        # KerasTuner reloads its oracle only when it finds this process's own
        # tuner file: a search started distributed (chief.json) and resumed in
        # one process (tuner0.json), or the other way round, would start afresh.
        with tf.io.gfile.GFile(tuner_file, "w") as f:
            f.write("{}")
    return tuner_lib.EngineTuner(
        oracle,
        hypermodel,
        trials_dir=os.path.join(search.tune_dir, tuner_lib.TRIALS_DIR),
        epoch_callbacks=epoch_callbacks,
        cv_folds=search.cv_folds,
        folds_dir=search.tune_dir,
        directory=search.tune_dir,
        project_name=tuner_lib.PROJECT_NAME,
    )


def run_search(
    base: TrainConfig,
    search: search_space.SearchConfig,
    *,
    epoch_callbacks: Sequence[tuner_lib.TrialEpochCallback] = (),
    worker_wait_s: float = WORKER_WAIT_S,
) -> SearchResult:
    """Runs (or resumes) a search, writes its results and optionally retrains the best.

    Args:
      base: the base training config of every trial (its ``model_dir``,
        ``overwrite`` and ``monitor`` are set per trial).
      search: the search flags.
      epoch_callbacks: ``callback(trial_id, epoch, logs)`` after every epoch
        of every trial.
      worker_wait_s: how long a distributed worker waits for the chief.

    Returns:
      A :class:`SearchResult`.

    Raises:
      ConfigError: a bad flag (the message names it).
      TuneDirError: --tune_dir is not empty without --resume, or cannot be resumed.
      SearchError: --max_consecutive_failed_trials trials failed in a row (the
        results table is written first).
    """
    space = search_space.check_search(search, base)
    for warning in search_space.search_warnings(space, base):
        print(f"Warning: {warning}")
    role = tuner_role()
    if role == "worker":
        _wait_for_chief(base, search, space, worker_wait_s)
    else:
        prepare_tune_dir(base, search, space)
    print("Search space:\n  " + "\n  ".join(p.describe() for p in space))

    tuner = build_tuner(base, search, space, epoch_callbacks)
    stopped = None
    try:
        tuner.search(verbose=min(base.verbose, 1))
    except RuntimeError as e:
        if "consecutive failures" not in str(e):
            raise
        stopped = (
            f"the search stopped: {search.max_consecutive_failed_trials} trials failed in a row "
            f"(--max_consecutive_failed_trials). The last reason: "
            f"{results_lib._last_line(str(e)) or 'see results.md'}"
        )
    finally:
        if role != "worker":
            # KerasTuner's chief saves its oracle before it drops the last trial
            # from the ongoing ones: save again, or a resume would re-run it.
            tuner.save()
            result = write_results(tuner, search, space)
    if role == "worker":
        return SearchResult(tune_dir=search.tune_dir, role=role)
    if stopped:
        raise SearchError(
            f"{stopped}. Results so far: {result.results_md}. Fix the search space, then "
            "continue with --resume and a larger --max_consecutive_failed_trials"
        )
    result.role = role
    if search.retrain_best:
        result.retrain, result.export = retrain_best(search.tune_dir, search.export_dir or None)
    return result


def write_results(
    tuner: tuner_lib.EngineTuner,
    search: search_space.SearchConfig,
    space: Sequence[search_space.Hyperparameter],
) -> SearchResult:
    """Writes the results table and, if a trial completed, ``best.flags``."""
    rows = results_lib.collect_rows(
        tuner.oracle, tuner.trials_dir, search.objective, cv_folds=search.cv_folds
    )
    csv_path, md_path = results_lib.write_tables(rows, search.tune_dir, space, search)
    result = SearchResult(
        tune_dir=search.tune_dir,
        role="single",
        rows=rows,
        results_csv=csv_path,
        results_md=md_path,
    )
    if result.best is not None:
        result.best_flagfile = results_lib.write_best(
            result.best, search.tune_dir, tuner.trials_dir, search
        )
    return result


# ---------------------------------------------------------------- retrain
def retrain_config(tune_dir: str) -> TrainConfig:
    """The best trial's config for a final run on training + validation data.

    The run trains for the best trial's best number of epochs (its learning-
    rate schedule spans those epochs), with no validation split and no early
    stopping, into ``<tune_dir>/retrain``. Of a cross-validated search: on the
    pooled data the folds divided, for the mean of the folds' best epochs
    (KerasTuner's ``best_step``).

    Raises:
      FileNotFoundError: the search has no completed trial (no ``best_trial.json``).
    """
    best = rundir.read_json(os.path.join(tune_dir, results_lib.BEST_TRIAL))
    if best is None:
        raise FileNotFoundError(
            f"--retrain_best: {os.path.join(tune_dir, results_lib.BEST_TRIAL)} not found: the "
            "search has no completed trial yet"
        )
    # The trial's folder under this tune_dir (the search may have been moved).
    config = results_lib.trial_run_config(tune_dir, best["trial_id"])
    epochs = int(best["best_epoch"]) + 1
    splits = [s for s in (config.train_split, config.val_split) if s]
    return dataclasses.replace(
        config,
        train_split="+".join(splits),
        val_split="",
        epochs=epochs,
        freeze_epochs=min(config.freeze_epochs, epochs - 1),
        early_stopping_patience=0,
        model_dir=os.path.join(tune_dir, RETRAIN_DIR),
        overwrite=False,
    )


def retrain_best(tune_dir: str, export_dir: str | None = None):
    """Retrains the best configuration on training + validation data and exports it.

    A finished retraining in ``<tune_dir>/retrain`` is reused; an interrupted
    one resumes.

    Args:
      tune_dir: the search's output directory.
      export_dir: TF Serving base path; default ``<tune_dir>/export``.

    Returns:
      ``(TrainResult or None when reused, ExportResult)``.
    """
    from leukemia_tf import rundir
    from leukemia_tf.serving import export_lib
    from leukemia_tf.training import train_lib

    config = retrain_config(tune_dir)
    train_result = None
    if rundir.is_finished(config.model_dir):
        print(f"Reusing the finished retraining in {config.model_dir}.")
    else:
        print(
            f"Retraining the best configuration on {config.train_split} for {config.epochs} "
            f"epochs into {config.model_dir} ..."
        )
        train_result = train_lib.train(config)
    export_result = export_lib.export_model(
        config.model_dir,
        export_dir or os.path.join(tune_dir, EXPORT_DIR),
        which="last",  # no validation split: the final weights are the model
    )
    return train_result, export_result


def summary_text(result: SearchResult, search: search_space.SearchConfig) -> str:
    """What ``leukemia_tf.tune`` prints at the end."""
    lines = [f"\n{len(result.rows)} trials in {result.tune_dir}: {result.results_md}"]
    if search.cv_folds:
        lines.append(
            f"Cross-validated: every trial trained {search.cv_folds} fold models (grouped, "
            f"stratified folds in {os.path.join(result.tune_dir, results_lib.FOLDS_FILE)}) and is "
            f"scored by the mean over folds of {search.objective}."
        )
    best = result.best
    if best is None:
        lines.append("No trial completed: see the reasons in the table.")
    else:
        values = json.dumps(best.values, default=str)
        if best.fold_values:
            score = (
                f"{best.score:.4f} ± {best.score_sd or 0:.4f} (mean ± sd over "
                f"{len(best.fold_values)} folds: "
                + ", ".join(f"{v:.4f}" for v in best.fold_values)
                + ")"
            )
            where = f"mean best epoch {best.best_epoch + 1}"
        else:
            score, where = f"{best.score:.4f}", f"epoch {best.best_epoch + 1}"
        lines += [
            f"Best trial {best.trial_id}: {search.objective}={score} at {where}; {values}",
            "Next:",
            f"  tensorboard --logdir={os.path.join(result.tune_dir, tuner_lib.TRIALS_DIR)}"
            "   (HParams tab)",
            f"  python -m leukemia_tf.train --flagfile={result.best_flagfile}",
        ]
        if result.export is None:
            lines.append(
                f"  python -m leukemia_tf.tune --flagfile="
                f"{os.path.join(result.tune_dir, TUNE_FLAGS)} --resume --retrain_best"
            )
    if result.export is not None:
        lines.append(f"Retrained and exported: {result.export.path}")
    return "\n".join(lines)
