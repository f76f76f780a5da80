"""KerasTuner glue: a HyperModel over the training config and a Tuner that trains
every trial with the package's own training engine.

Why a ``Tuner`` subclass with its own ``run_trial`` (KerasTuner's documented
route for custom training loops) rather than ``HyperModel.fit``: the engine
(:func:`leukemia_tf.training.train_lib.train`) is a ``strategy.run`` loop, not
``Model.fit``; it builds the model, the input pipeline, the augmentation, the
precision policy and the strategy from a ``TrainConfig``, so a trial is just
``train_lib.train(trial_config)``.

Hyperband's epoch budgets are real: every trial of a search trains on the
same learning-rate schedule (``--epochs`` long) and is stopped after the
``tuner/epochs`` epochs Hyperband gives it. A trial of a later round starts
from a copy of the run it continues (``tuner/trial_id``): the engine resumes
from that run's last checkpoint (``backup/``, with optimizer and schedule
state) at ``tuner/initial_epoch``, exactly as if it had never stopped.

Every epoch's validation metrics are returned to the oracle (as a Keras
``History``): it scores the trial by the best epoch of the objective and
records that epoch as the trial's ``best_step``.

Cross-validated search (``--cv_folds=K``): a trial trains one run per fold
(``<trial>/fold_<i>``, on the fold splits of ``--tune_dir/folds.json``) and
returns the list of the K fold histories, KerasTuner's own form for several
executions of one trial: the oracle scores the trial by the mean over folds
of each fold's best-epoch objective, and its ``best_step`` is the mean of the
folds' best epochs (rounded down). A Hyperband continuation continues every
fold's run; each fold stops early (``--early_stopping_patience``) on its own.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import math
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence

import keras
import keras_tuner
import tensorflow as tf

from leukemia_tf import rundir
from leukemia_tf.training import model_factory
from leukemia_tf.training.config import ConfigError, TrainConfig
from leukemia_tf.tuning import search_space

#: Subdirectories of --tune_dir.
TRIALS_DIR = "trials"  # one training model_dir per trial (the TensorBoard logdir)
PROJECT_NAME = "keras_tuner"  # KerasTuner's own state (oracle, trial.json files)
#: Written into every trial's model_dir: who ran it, how it ended and why.
TRIAL_INFO = "trial_info.json"

#: Per-epoch keys of the engine's history.csv reported to the oracle.
_NOT_METRICS = ("epoch", "lr", "epoch_time_s")

#: Run directory of fold ``i`` of a cross-validated trial: ``<trial>/fold_<i>``.
FOLD_DIR = "fold_{}"

#: ``callback(trial_id, epoch, logs)`` after each epoch of each trial (tests
#: use it to interrupt a search); in a cross-validated search ``logs`` also
#: holds ``cv_fold``, the fold being trained.
TrialEpochCallback = Callable[[str, int, dict], None]

#: TensorBoard HParams metrics: (tag, run group under the trial's logs/, display name).
HPARAMS_METRICS = (
    ("macro_f1", "validation", "val_macro_f1"),
    ("accuracy", "validation", "val_accuracy"),
    ("balanced_accuracy", "validation", "val_balanced_accuracy"),
    ("loss", "validation", "val_loss"),
    ("loss", "train", "train_loss"),
    ("accuracy", "train", "train_accuracy"),
)


# --------------------------------------------------------------------- memory
def _gradient_registry() -> dict | None:
    from tensorflow.python.framework import ops  # private: see release_trial_memory

    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    return registry if isinstance(registry, dict) else None


def gradient_registry_snapshot() -> frozenset:
    """Names in TensorFlow's global gradient registry (see :func:`release_trial_memory`)."""
    registry = _gradient_registry()
    return frozenset(registry) if registry is not None else frozenset()


def release_trial_memory(snapshot: frozenset) -> None:
    """Frees what a finished trial left behind, so memory does not grow trial after trial.

    ``keras.backend.clear_session()`` and ``gc.collect()`` are not enough:
    every trace of a training step registers a gradient function for each
    ``tf.custom_gradient`` it calls (``ReplicaContext.all_reduce`` inside
    Keras's optimizer is one) in TensorFlow's global gradient registry, which
    is never pruned, and that function keeps the whole traced graph alive
    (measured: +45 MB of RSS per tiny cnn_tiny trial, far more for real
    backbones). The entries a trial added are dropped here: they are only
    used while that trial's graphs are traced.

    Args:
      snapshot: :func:`gradient_registry_snapshot` taken before the trial.
    """
    registry = _gradient_registry()
    if registry is not None:
        for name in [n for n in registry if n not in snapshot]:
            if name.startswith("CustomGradient-"):
                del registry[name]
    keras.backend.clear_session()
    gc.collect()
    _malloc_trim()


def _malloc_trim() -> None:
    """Hands freed heap memory back to the OS (glibc), so RSS reflects what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def rss_mb() -> float | None:
    """Resident memory of this process in MiB (None where psutil is missing)."""
    try:
        import psutil  # installed with tensorflow-datasets
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


# ----------------------------------------------------------- fold scores
def best_epoch(values: Sequence[float], direction: str) -> int:
    """The first epoch with the best objective value, as KerasTuner picks it.

    KerasTuner's rule (``Objective.better_than`` from epoch 0 on): an epoch
    replaces the best so far only when strictly better, so ties go to the
    earlier epoch and a NaN never replaces a number.
    """
    best = 0
    for epoch, value in enumerate(values):
        if (direction == "max" and value > values[best]) or (
            direction == "min" and value < values[best]
        ):
            best = epoch
    return best


def fold_summary(fold_histories: Sequence[Sequence[dict]], objective: str) -> dict:
    """The per-fold scores of a cross-validated trial from its folds' history rows.

    Args:
      fold_histories: per fold, its ``history.csv`` rows within the trial's budget.
      objective: the objective's name.

    Returns:
      ``{"values": each fold's objective at its best epoch, "best_epochs":
      those epochs (0-based), "mean", "sd" (sample standard deviation, None
      for one fold), "metrics": each metric averaged over the folds' best
      epochs}`` (what KerasTuner's oracle is given); folds without a row are
      left out.
    """
    direction = search_space.OBJECTIVES[objective]
    values, epochs, best_rows = [], [], []
    for rows in fold_histories:
        if not rows:
            continue
        epoch = best_epoch([r.get(objective, math.nan) for r in rows], direction)
        values.append(float(rows[epoch].get(objective, math.nan)))
        epochs.append(int(rows[epoch]["epoch"]))
        best_rows.append(rows[epoch])
    n = len(values)
    mean = math.fsum(values) / n if n else None
    sd = (
        math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
        if n > 1 and mean is not None
        else None
    )
    keys = [k for k in (best_rows[0] if best_rows else {}) if k not in _NOT_METRICS]
    metrics = {
        k: math.fsum(r[k] for r in best_rows) / n for k in keys if all(k in r for r in best_rows)
    }
    return {"values": values, "best_epochs": epochs, "mean": mean, "sd": sd, "metrics": metrics}


# ----------------------------------------------------------------- files
def _copy_run(src: str, dst: str) -> None:
    """Copies a training run's model_dir (local or gs://) to a new one, atomically.

    The source's trial bookkeeping, its HParams session summary (the event
    files directly in ``logs/``) and its lock stay behind: the copy is a new trial.
    """
    tmp = dst.rstrip("/") + ".copying"
    rundir.remove(tmp)

    def skip(parts: list[str], name: str) -> bool:
        return parts == [rundir.LOGS_DIR] or (not parts and name in (TRIAL_INFO, rundir.LOCK_FILE))

    rundir.copy_tree(src, tmp, skip=skip)
    # Left by an earlier attempt of this trial that failed before training.
    rundir.remove(dst)
    tf.io.gfile.rename(tmp, dst, overwrite=True)


def failure_reason(error: BaseException) -> str | None:
    """A one-line reason for a trial failure the search should record and go past.

    Returns None for unexpected errors (KerasTuner then retries the trial up to
    --max_retries_per_trial times and records the traceback).
    """
    first_line = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, FloatingPointError):
        return f"NaN loss: {first_line}"
    if isinstance(error, (tf.errors.ResourceExhaustedError, MemoryError)):
        return f"out of memory: {first_line or type(error).__name__}"
    if isinstance(error, (ConfigError, ValueError)):
        return f"invalid configuration: {first_line}"
    return None


# ------------------------------------------------------------- hypermodel
class LeukemiaHyperModel(keras_tuner.HyperModel):
    """The search space over :class:`TrainConfig`, as a KerasTuner ``HyperModel``.

    ``build(hp)`` returns the Keras classifier of a configuration (built by
    the same ``build_classifier`` the engine uses); the tuner itself trains
    through the engine, which builds that model from :meth:`trial_config`.

    Args:
      base: the base training config of every trial.
      space: the resolved hyperparameters (:func:`search_space.resolve_space`).
      objective: the search objective (every trial's ``monitor``).
    """

    def __init__(
        self,
        base: TrainConfig,
        space: Sequence[search_space.Hyperparameter],
        objective: str,
    ):
        super().__init__(name="leukemia_tf")
        self.base = base
        self.space = list(space)
        self.objective = objective

    def declare_hyperparameters(self, hp: keras_tuner.HyperParameters) -> None:
        for param in self.space:
            param.declare(hp)

    def trial_config(self, values: Mapping[str, object], model_dir: str) -> TrainConfig:
        """The training config of the hyperparameter ``values`` (not validated)."""
        return search_space.trial_config(self.base, values, model_dir, self.objective)

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        from leukemia_tf.data import pipeline
        from leukemia_tf.models.label_space import LabelSpace

        self.declare_hyperparameters(hp)
        config = self.trial_config(hp.values, model_dir="unused")
        search_space.check_combination(config)
        taxonomy = model_factory.taxonomy_for(config)
        specs = pipeline.parse_datasets(config.datasets)
        class_names = pipeline.dataset_class_names(
            specs, config.data_dir or None, config.label_mode, taxonomy
        )
        labels = LabelSpace(class_names, config.head, taxonomy)
        return model_factory.build_model(config, labels.num_classes, taxonomy)


def hparams_domains(space: Sequence[search_space.Hyperparameter]) -> list:
    """TensorBoard ``HParam`` objects (with their domains) of the search space."""
    from tensorboard.plugins.hparams import api as hparams_api

    out = []
    for param in space:
        if param.kind == "range":
            domain = hparams_api.RealInterval(float(param.values[0]), float(param.values[1]))
        else:
            domain = hparams_api.Discrete(list(param.values))
        out.append(hparams_api.HParam(param.name, domain))
    return out


def write_hparams_config(logdir: str, space: Sequence[search_space.Hyperparameter]) -> None:
    """Writes the HParams experiment summary (hyperparameters and metrics) into ``logdir``."""
    from tensorboard.plugins.hparams import api as hparams_api

    metrics = [
        hparams_api.Metric(tag, group=group, display_name=name)
        for tag, group, name in HPARAMS_METRICS
    ]
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        hparams_api.hparams_config(hparams=hparams_domains(space), metrics=metrics)
    writer.close()


# ------------------------------------------------------------------ tuner
class EngineTuner(keras_tuner.Tuner):
    """A KerasTuner ``Tuner`` whose trials are runs of the training engine.

    Args:
      oracle: a KerasTuner oracle (Hyperband, Bayesian optimisation, random).
      hypermodel: the :class:`LeukemiaHyperModel`.
      trials_dir: where every trial's model_dir goes (``<tune_dir>/trials``).
      epoch_callbacks: ``callback(trial_id, epoch, logs)`` after every epoch.
      cv_folds: 0, or K >= 2 for a cross-validated search (every trial trains
        K fold runs; see the module docstring).
      folds_dir: the directory of the search's ``folds.json`` (``--tune_dir``;
        needed with ``cv_folds``).
      **kwargs: ``keras_tuner.Tuner`` arguments (``directory``, ``project_name``).
    """

    def __init__(
        self,
        oracle: keras_tuner.Oracle,
        hypermodel: LeukemiaHyperModel,
        *,
        trials_dir: str,
        epoch_callbacks: Sequence[TrialEpochCallback] = (),
        cv_folds: int = 0,
        folds_dir: str | None = None,
        **kwargs,
    ):
        if cv_folds and not folds_dir:
            raise ValueError("cv_folds needs folds_dir (the directory of folds.json)")
        self.trials_dir = trials_dir
        self.epoch_callbacks = list(epoch_callbacks)
        self.cv_folds = int(cv_folds)
        self.folds_dir = folds_dir
        # KerasTuner's own `overwrite` would delete a previous search silently:
        # run_search refuses or resumes explicitly instead.
        super().__init__(oracle=oracle, hypermodel=hypermodel, overwrite=False, **kwargs)

    def _populate_initial_space(self) -> None:
        # The base class builds the model repeatedly to discover conditional
        # hyperparameters; this space has none, and building an EfficientNet
        # just to list the space would be slow.
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def trial_dir(self, trial_id: str) -> str:
        """The model_dir of a trial (the folder of its fold runs when cross-validated)."""
        return os.path.join(self.trials_dir, str(trial_id))

    def fold_config(self, config: TrainConfig, fold: int) -> TrainConfig:
        """Fold ``fold``'s run of a trial: its config on the fold's two parts, in ``fold_<i>``."""
        from leukemia_tf import crossval_lib

        return dataclasses.replace(
            crossval_lib.fold_config(config, self.folds_dir, fold),
            model_dir=os.path.join(config.model_dir, FOLD_DIR.format(fold)),
        )

    # ------------------------------------------------------------- one trial
    def run_trial(
        self, trial, *args, **kwargs
    ) -> keras.callbacks.History | list[keras.callbacks.History]:
        """Trains one trial with the engine; returns its per-epoch metrics.

        A cross-validated trial trains its folds one after another and
        returns their histories (KerasTuner averages their best-epoch values).

        Raises:
          keras_tuner.errors.FailedTrialError: an invalid combination, a NaN
            loss or out of memory (recorded as failed, never retried).
        """
        values = dict(trial.hyperparameters.values)
        model_dir = self.trial_dir(trial.trial_id)
        config = self.hypermodel.trial_config(values, model_dir)
        target = int(values.get("tuner/epochs", config.epochs))
        past = values.get("tuner/trial_id")
        info = {
            "trial_id": trial.trial_id,
            "status": "interrupted",
            "reason": "",
            "tuner_id": self.tuner_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "continued_from": past,
            "initial_epoch": int(values.get("tuner/initial_epoch", 0)),
            "target_epochs": target,
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        start = time.time()
        snapshot = gradient_registry_snapshot()
        policy = keras.mixed_precision.global_policy()
        try:
            try:
                search_space.check_combination(config)
            except (ConfigError, ValueError) as e:
                raise keras_tuner.errors.FailedTrialError(f"invalid configuration: {e}") from e
            if not self.cv_folds:
                history = self._train(trial, config, target, past, info)
            else:
                history = self._train_folds(trial, config, target, past, info)
            info["status"] = "completed"
            return history
        except keras_tuner.errors.FailedTrialError as e:
            info.update(status="failed", reason=str(e))
            raise
        except Exception as e:
            reason = failure_reason(e)
            info.update(status="failed", reason=reason or f"{type(e).__name__}: {e}")
            if reason is not None:
                raise keras_tuner.errors.FailedTrialError(reason) from e
            raise
        finally:
            # The engine sets the global precision policy for its run.
            keras.mixed_precision.set_global_policy(policy)
            release_trial_memory(snapshot)
            info["wall_time_s"] = round(time.time() - start, 2)
            rss = rss_mb()
            info["rss_mb"] = None if rss is None else round(rss, 1)
            tf.io.gfile.makedirs(model_dir)
            rundir.write_json(os.path.join(model_dir, TRIAL_INFO), info)
            if info["status"] == "failed":
                print(f"Trial {trial.trial_id} failed: {info['reason']}")

    def _train_folds(
        self, trial, config: TrainConfig, target: int, past: str | None, info: dict
    ) -> list[keras.callbacks.History]:
        """Trains the trial's fold runs; records the per-fold scores in ``info``."""
        histories, fold_rows = [], []
        for fold in range(self.cv_folds):
            snapshot = gradient_registry_snapshot()
            try:
                history = self._train(
                    trial,
                    self.fold_config(config, fold),
                    target,
                    None if past is None else os.path.join(past, FOLD_DIR.format(fold)),
                    info,
                    fold=fold,
                )
            finally:
                # Between folds as between trials (run_trial releases after the last).
                if fold + 1 < self.cv_folds:
                    release_trial_memory(snapshot)
            histories.append(history)
            fold_rows.append(info.pop("epochs_trained"))
        summary = fold_summary(self._fold_histories(config, target), self.oracle.objective.name)
        info["epochs_trained"] = max(fold_rows)
        info["cv"] = {
            "folds": self.cv_folds,
            "values": summary["values"],
            "best_epochs": summary["best_epochs"],
            "mean": summary["mean"],
            "sd": summary["sd"],
        }
        return histories

    def _fold_histories(self, config: TrainConfig, target: int) -> list[list[dict]]:
        return [
            rundir.read_history(os.path.join(config.model_dir, FOLD_DIR.format(i)), target)
            for i in range(self.cv_folds)
        ]

    def _train(
        self,
        trial,
        config: TrainConfig,
        target: int,
        past: str | None,
        info: dict,
        fold: int | None = None,
    ) -> keras.callbacks.History:
        """Trains (or continues, or reads) one run: the trial's, or one fold's of it.

        ``past`` is the Hyperband trial this one continues, as a path under
        ``trials/`` (``<id>`` or ``<id>/fold_<i>``).
        """
        from leukemia_tf.training import train_lib

        model_dir = config.model_dir
        if past is not None and not tf.io.gfile.exists(os.path.join(model_dir, "config.json")):
            # A later Hyperband round: continue the earlier trial's run.
            _copy_run(os.path.join(self.trials_dir, past), model_dir)
        tf.io.gfile.makedirs(model_dir)
        trial_dir = self.trial_dir(trial.trial_id)
        rundir.write_json(os.path.join(trial_dir, TRIAL_INFO), info)
        self._write_hparams(trial, model_dir)

        finished = rundir.is_finished(model_dir)
        if not finished and len(rundir.read_history(model_dir)) < target:
            stop_early = target < config.epochs

            def on_epoch_end(epoch: int, logs: dict) -> bool:
                for callback in self.epoch_callbacks:
                    callback(
                        trial.trial_id, epoch, logs if fold is None else {**logs, "cv_fold": fold}
                    )
                self.on_epoch_end(trial, None, epoch, logs=logs)
                # The trial's Hyperband budget: pause the run there, resumable.
                return stop_early and epoch + 1 >= target

            train_lib.train(config, callbacks=[on_epoch_end], fit_trust=False)

        rows = [r for r in rundir.read_history(model_dir) if r["epoch"] < target]
        where = "" if fold is None else f" of fold {fold}"
        if not rows:
            raise RuntimeError(f"trial {trial.trial_id}: no epoch{where} finished in {model_dir}")
        objective = self.oracle.objective.name
        if all(math.isnan(r.get(objective, float("nan"))) for r in rows):
            raise keras_tuner.errors.FailedTrialError(
                f"the objective {objective} is NaN in every epoch{where}"
            )
        info["epochs_trained"] = len(rows)
        history = keras.callbacks.History()
        # Index i of every list is epoch i: the oracle's best_step is the epoch.
        history.history = {
            key: [row[key] for row in rows] for key in rows[0] if key not in _NOT_METRICS
        }
        return history

    def _write_hparams(self, trial, model_dir: str) -> None:
        from tensorboard.plugins.hparams import api as hparams_api

        logdir = os.path.join(model_dir, "logs")
        if tf.io.gfile.glob(os.path.join(logdir, "events.out.tfevents.*")):
            return  # a retried or resumed trial: its session is already there
        space = self.hypermodel.space
        values = trial.hyperparameters.values
        hparams = {
            hp: values[param.name]
            for hp, param in zip(hparams_domains(space), space, strict=True)
            if param.name in values
        }
        writer = tf.summary.create_file_writer(logdir)
        with writer.as_default():
            hparams_api.hparams(hparams, trial_id=str(trial.trial_id))
        writer.close()

    # ------------------------------------------------------------- models
    def load_model(self, trial) -> keras.Model:
        """The best checkpoint (``best.keras``) of a trial."""
        return rundir.load_keras(
            rundir.join(self.trial_dir(trial.trial_id), rundir.BEST_MODEL), compile=False
        )

    def save_model(self, trial_id, model, step=0) -> None:
        # The engine saves best.keras and last.keras itself.
        pass


def make_oracle(search: search_space.SearchConfig, epochs: int) -> keras_tuner.Oracle:
    """The oracle of ``--tuner`` with the objective, budget and failure limits.

    Args:
      search: the search flags.
      epochs: epochs of one full trial (Hyperband's ``max_epochs``).
    """
    objective = keras_tuner.Objective(
        search.objective, direction=search_space.OBJECTIVES[search.objective]
    )
    common = dict(
        objective=objective,
        seed=search.search_seed,
        max_retries_per_trial=search.max_retries_per_trial,
        max_consecutive_failed_trials=search.max_consecutive_failed_trials,
    )
    if search.tuner == "hyperband":
        oracle = keras_tuner.oracles.HyperbandOracle(
            max_epochs=epochs,
            factor=search.hyperband_factor,
            hyperband_iterations=search.hyperband_iterations,
            **common,
        )
        if search.max_trials:
            oracle.max_trials = search.max_trials
        return oracle
    max_trials = search.max_trials or search_space.DEFAULT_MAX_TRIALS
    if search.tuner == "bayesian":
        return keras_tuner.oracles.BayesianOptimizationOracle(max_trials=max_trials, **common)
    return keras_tuner.oracles.RandomSearchOracle(max_trials=max_trials, **common)
