"""The training loop: one ``strategy.run`` loop that runs under every tf.distribute strategy.

Why not ``Model.fit``: under ``MultiWorkerMirroredStrategy`` Keras 3's ``fit``
fails (keras-team/keras#20585), while a ``strategy.run`` step over the same
Keras model and optimizer works. One loop for every strategy is better than
two, so the package owns the loop, in parts with one job each:

* :mod:`~leukemia_tf.training.inputs`: the input functions (per-replica
  training batches, padded validation batches);
* :mod:`~leukemia_tf.training.steps`: the optimizer, the training step
  (augmentation on the accelerator, MixUp/CutMix, class weights, clipping
  across replicas, EMA) and the validation pass;
* :mod:`~leukemia_tf.training.run_state`: progress, the backup checkpoint, the
  best and last models, history and TensorBoard;
* :mod:`leukemia_tf.rundir`: the run directory's files, written whole or not
  at all, and its lock;
* this module: the set-up and the epoch loop, with a hook after every epoch
  that may stop the run (the tuner's epoch budget).

A killed run resumes from its last checkpoint when started again with the same
``model_dir`` and the same flags. A run stops at the first non-finite loss,
metric or weight without saving it. SIGTERM (what a preempted cloud VM or
Colab sends) ends the run at the next step with a checkpoint to resume from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import threading
import time
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from leukemia_tf import rundir
from leukemia_tf.data import build_data_lib as build_lib
from leukemia_tf.data import pipeline
from leukemia_tf.models import acquisition, augment, classifier
from leukemia_tf.models.label_space import LabelSpace
from leukemia_tf.training import config as config_lib
from leukemia_tf.training import distribute, ema, inputs, model_factory, run_state, steps
from leukemia_tf.training.config import ConfigError, TrainConfig

#: ``hook(epoch, logs)``, called after every epoch's checkpoint. A hook that
#: returns True stops the run there, unfinished and resumable (no summary is
#: written): the tuner stops a trial at its epoch budget this way.
EpochHook = Callable[[int, dict], bool | None]


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns (and writes to ``model_dir/train_summary.json``)."""

    model_dir: str
    best_model_path: str
    best_epoch: int
    best_metrics: dict
    history: list
    class_names: list
    wall_time_s: float
    #: False when a hook stopped the run before its last epoch (resumable).
    finished: bool = True


class NonFiniteError(FloatingPointError):
    """The loss, a validation metric or a weight became NaN or infinite."""


class Preempted(RuntimeError):
    """The run received SIGTERM and stopped with a checkpoint to resume from."""


#: Settings that may differ when a run resumes: where things are, and how
#: much is printed. Any other difference from the saved config is refused
#: unless ``--override_flags`` is given.
_RESUMABLE_FIELDS = ("model_dir", "data_dir", "overwrite", "override_flags", "verbose", "cache")

#: The settings that decide how many collective steps a run takes: every
#: worker of a multi-worker run must agree on them, or the run would hang.
_LOCKSTEP_FIELDS = (
    "datasets",
    "train_split",
    "val_split",
    "batch_size",
    "epochs",
    "steps_per_epoch",
    "steps_per_execution",
    "freeze_epochs",
    "early_stopping_patience",
    "monitor",
    "backbone",
    "head",
    "image_size",
)


def _run_fingerprint(config: TrainConfig) -> int:
    text = json.dumps({k: getattr(config, k) for k in _LOCKSTEP_FIELDS}, sort_keys=True)
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 4096


def _check_resume_config(model_dir: str, config: TrainConfig) -> None:
    """Refuses to resume a run with other flags than it was started with (unless overridden)."""
    if not tf.io.gfile.exists(rundir.join(model_dir, rundir.CONFIG_FILE)):
        return
    saved = rundir.read_config(model_dir).to_dict()
    ours = config.to_dict()
    changed = [
        f"--{k}={ours[k]!r} (was {saved.get(k)!r})"
        for k in ours
        if k not in _RESUMABLE_FIELDS and saved.get(k, ours[k]) != ours[k]
    ]
    if not changed:
        return
    if not config.override_flags:
        raise ConfigError(
            f"--model_dir={config.model_dir!r} holds an unfinished run started with other flags: "
            + ", ".join(changed)
            + ". Resume it with its own flags (--flagfile="
            + rundir.join(model_dir, rundir.FLAGS_FILE)
            + "), add --override_flags to resume with these, or --overwrite to start afresh"
        )
    print("Resuming with changed flags (--override_flags): " + ", ".join(changed))


def _prepare_model_dir(config: TrainConfig, chief: bool) -> str:
    config_lib.check_model_dir(config)  # a finished run without --overwrite
    model_dir = rundir.expand(config.model_dir)
    if not chief:
        return model_dir
    rundir.remove_partial_writes(model_dir)
    if config.overwrite:
        for name in rundir.RUN_OUTPUTS:
            rundir.remove(rundir.join(model_dir, name))
    elif run_state.peek_progress(model_dir) != (0, 0):
        _check_resume_config(model_dir, config)
    return model_dir


class _SigtermWatcher:
    """Turns SIGTERM into a flag the loop checks between steps (main thread only)."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self) -> _SigtermWatcher:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class _Data:
    """The data side of a run: label space, class weights, sizes, distributed datasets."""

    class_names: list
    space: LabelSpace
    level_weights: list | None
    class_weights: tf.Tensor
    num_train: int
    num_val: int
    steps_per_epoch: int
    train_ds: object
    val_ds: object


def _prepare_data(config, strategy, chief: bool, skip_steps) -> _Data:
    taxonomy = model_factory.taxonomy_for(config)
    specs = pipeline.parse_datasets(config.datasets)
    data_dir = config.data_dir or None
    if chief:
        build_lib.prepare_generated(specs, data_dir)
    class_names = pipeline.dataset_class_names(specs, data_dir, config.label_mode, taxonomy)
    level_weights = config.level_weights_for(taxonomy)

    def count(split: str) -> np.ndarray:
        return pipeline.class_counts(specs, split, data_dir, config.label_mode, taxonomy)

    counts = count(config.train_split)
    num_train = int(counts.sum())
    if num_train < config.batch_size:
        raise ConfigError(
            f"--batch_size={config.batch_size} is larger than the training split "
            f"({num_train} examples)"
        )
    steps_per_epoch = config.steps_per_epoch or max(num_train // config.batch_size, 1)
    if config.class_weighting == "balanced":
        with np.errstate(divide="ignore"):
            weights = np.where(counts > 0, num_train / (len(counts) * counts), 0.0)
    else:
        weights = np.ones(len(counts))
    dtype = inputs.input_image_dtype(strategy)
    epoch, step = skip_steps
    train_ds = strategy.distribute_datasets_from_function(
        inputs.train_input_fn(
            config, specs, data_dir, taxonomy, dtype, epoch * steps_per_epoch + step
        )
    )
    val_ds, num_val = None, 0
    if config.val_split:
        num_val = int(count(config.val_split).sum())
        if num_val == 0:
            raise ConfigError(f"--val_split={config.val_split!r} is empty")
        val_ds = strategy.distribute_datasets_from_function(
            inputs.eval_input_fn(config, specs, data_dir, taxonomy, num_val, dtype)
        )
    return _Data(
        class_names=class_names,
        space=LabelSpace(class_names, config.head, taxonomy),
        level_weights=level_weights,
        class_weights=tf.constant(weights, tf.float32),
        num_train=num_train,
        num_val=num_val,
        steps_per_epoch=steps_per_epoch,
        train_ds=train_ds,
        val_ds=val_ds,
    )


def _nonfinite_hint(config: TrainConfig, model_dir: str, state: run_state.RunState) -> str:
    done = int(state.epoch.numpy())
    lower = f"--learning_rate={config.learning_rate / 10:g}"
    if done:
        return (
            f"Nothing non-finite was saved; the last good checkpoint is after epoch {done}. "
            f"Resume from it with a lower rate: python -m leukemia_tf.train --flagfile="
            f"{rundir.join(model_dir, rundir.FLAGS_FILE)} {lower} --override_flags"
        )
    return (
        "No epoch finished, so nothing was saved. Start afresh with a lower rate: python -m "
        f"leukemia_tf.train --flagfile={rundir.join(model_dir, rundir.FLAGS_FILE)} {lower} "
        "--overwrite"
    )


def train(
    config: TrainConfig, callbacks: Sequence[EpochHook] = (), fit_trust: bool = True
) -> TrainResult:
    """Trains a model as ``config`` says and writes everything into ``config.model_dir``.

    A run that was killed resumes from its last checkpoint when started again
    with the same ``model_dir``.

    Args:
      config: the training configuration (validated here).
      callbacks: hooks called as ``hook(epoch, logs)`` after each epoch's
        checkpoint; one that returns True stops the run there, resumable
        (:data:`EpochHook`).
      fit_trust: when the run finishes, fit its trust statistics
        (:func:`leukemia_tf.trust_lib.fit` with the defaults: feature
        statistics on the train split, referral and back-off thresholds on
        the validation split), as ``python -m leukemia_tf.fit_trust`` would.
        The tuner's trials skip it.

    Returns:
      A :class:`TrainResult`.

    Raises:
      ConfigError: a bad setting, or ``model_dir`` is finished, locked by
        another process, or holds a run started with other flags.
      NonFiniteError: the loss, a validation metric or a weight became non-finite.
      Preempted: SIGTERM; a checkpoint to resume from was written.
    """
    if config.from_embeddings:
        # A probe on stored features: the head alone, in seconds, in memory.
        from leukemia_tf.embedding import probe_lib

        if callbacks:
            raise ConfigError("--from_embeddings: epoch hooks are not supported by the probes")
        return probe_lib.train_probe(config, fit_trust=fit_trust)
    config.validate()
    start_time = time.time()
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    strategy = distribute.make_strategy(config.strategy, config.tpu)
    if isinstance(strategy, tf.distribute.TPUStrategy):
        for warning in distribute.check_tpu_config(config, strategy):
            logging.warning("TPU: %s", warning)
            print(f"Warning (TPU): {warning}")
    if config.batch_size % strategy.num_replicas_in_sync:
        raise ConfigError(
            f"--batch_size={config.batch_size} is the global batch: it must be divisible by the "
            f"{strategy.num_replicas_in_sync} replicas of {type(strategy).__name__}"
        )
    precision = distribute.resolve_precision(config.precision, strategy)
    distribute.set_precision(precision)
    chief = distribute.is_chief(strategy)
    model_dir = rundir.expand(config.model_dir)
    new_dir = not tf.io.gfile.exists(model_dir)
    lock = rundir.RunLock(model_dir) if chief else None
    if lock is not None:
        lock.acquire()
    try:
        with _SigtermWatcher() as sigterm:
            result = _train(config, strategy, precision, chief, sigterm, callbacks, start_time)
        if chief and fit_trust and result.finished:
            _fit_trust(result.model_dir)
        return result
    except BaseException:
        if lock is not None and new_dir:
            lock.release()
            # A run that failed before writing anything leaves no empty model_dir behind.
            if not tf.io.gfile.listdir(model_dir):
                rundir.remove(model_dir)
        raise
    finally:
        if lock is not None:
            lock.release()


def _fit_trust(model_dir: str) -> None:
    """The trust statistics of a finished run (printed; the run stays usable without them)."""
    from leukemia_tf import trust_lib

    stats = trust_lib.fit(model_dir)
    print(trust_lib.summary(model_dir, stats))


@dataclasses.dataclass
class _Parts:
    """What the loop drives: the model and its optimizer, the step, validation, the run state."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    schedule: Callable
    batchnorm_ema: list
    step: steps.TrainStep
    evaluate: steps.Evaluator
    state: run_state.RunState


def _build(config, strategy, precision, data: _Data, model_dir, write_dir, chief) -> _Parts:
    space = data.space
    with strategy.scope():
        model = model_factory.build_model(config, space.num_classes, space.taxonomy)
        augmenter = (
            augment.build_augmenter(
                config.image_size,
                magnitude=config.augment_magnitude,
                crop_scale=(config.crop_scale_min, 1.0),
                shifts=acquisition.parse_shifts(config.acquisition_shifts),
                shift_magnitude=config.shift_magnitude,
                shift_probability=config.shift_probability,
                marks=config.augment_marks,
                seed=config.seed,
            )
            if config.augment
            else None
        )
        optimizer, schedule, clip_in_step = steps.build_optimizer(
            config, data.steps_per_epoch, precision, strategy.num_replicas_in_sync
        )
        # Build the optimizer's slots for every weight now, so that unfreezing
        # the backbone later finds them (and a checkpoint always has them).
        optimizer.build(model.trainable_variables)
        batchnorm_ema = ema.batchnorm_pairs(model) if config.ema else []
        mixing = config.mixup_alpha > 0 or config.cutmix_alpha > 0
        mix_seed = keras.random.SeedGenerator(config.seed) if mixing else None
        state = run_state.RunState(
            model_dir,
            write_dir,
            chief,
            config.monitor,
            model=model,
            optimizer=optimizer,
            batchnorm_ema=[average for _, average in batchnorm_ema],
            # The random state of augmentation, dropout and mixing: a resumed
            # run draws the numbers an uninterrupted run would.
            rng=_seed_states(model, augmenter, mix_seed),
        )
    step = steps.TrainStep(
        strategy,
        model,
        optimizer,
        space,
        config,
        data.class_weights,
        data.level_weights,
        augmenter=augmenter,
        clip_in_step=clip_in_step,
        batchnorm_ema=batchnorm_ema,
        mix_seed=mix_seed,
    )
    evaluate = steps.Evaluator(strategy, model, space, data.level_weights)
    return _Parts(model, optimizer, schedule, batchnorm_ema, step, evaluate, state)


def _train(config, strategy, precision, chief, sigterm, hooks, start_time) -> TrainResult:
    """The set-up, then the epoch loop (see :func:`train`)."""
    model_dir = _prepare_model_dir(config, chief)
    # Non-chief workers write into a scratch dir, emptied after every write.
    write_dir = distribute.worker_dir(model_dir, strategy)
    tf.io.gfile.makedirs(write_dir)
    data = _prepare_data(config, strategy, chief, run_state.peek_progress(model_dir))
    parts = _build(config, strategy, precision, data, model_dir, write_dir, chief)
    state, steps_per_epoch = parts.state, data.steps_per_epoch
    start_epoch = state.restore(config.overwrite)
    single_worker = distribute.num_workers(strategy) == 1
    if not single_worker:
        distribute.check_workers_agree(strategy, start_epoch, _run_fingerprint(config))
    if chief:
        rundir.write_config(model_dir, config)
        rundir.write_labels(model_dir, data.class_names)
    resume = rundir.join(model_dir, rundir.FLAGS_FILE)

    iterator = iter(data.train_ds)
    train_fn, stage, finished = None, None, True
    for epoch in range(start_epoch, config.epochs):
        if stage != (new_stage := 1 if epoch < config.freeze_epochs else 2):
            classifier.set_backbone_trainable(parts.model, new_stage == 2)
            train_fn, stage = parts.step.function(), new_stage  # trainable variables changed
        epoch_start = time.time()
        done = int(state.step_in_epoch.numpy()) if epoch == start_epoch else 0
        totals = state.totals.numpy() if done else np.zeros(3)
        progbar = _progress_bar(config, chief, epoch, stage, steps_per_epoch)
        while done < steps_per_epoch:
            n = min(config.steps_per_execution, steps_per_epoch - done)
            chunk = train_fn(iterator, n).numpy()
            done += n
            global_step = epoch * steps_per_epoch + done
            if not np.isfinite(chunk[0]):
                raise NonFiniteError(
                    f"training loss became {chunk[0]} at step {global_step} (epoch {epoch + 1}); "
                    f"lower --learning_rate (now {config.learning_rate}) or check the data. "
                    + _nonfinite_hint(config, model_dir, state)
                )
            totals += chunk
            if progbar is not None:
                progbar.update(
                    done, [("loss", totals[0] / totals[2]), ("accuracy", totals[1] / totals[2])]
                )
            rundir.fault_point("step")
            if sigterm.received and done < steps_per_epoch:
                if single_worker:  # saving is collective: other workers may not stop here
                    state.save_partial(epoch, done, totals, steps_per_epoch)
                raise Preempted(
                    f"SIGTERM received: stopped at step {global_step} (epoch {epoch + 1}, step "
                    f"{done} of {steps_per_epoch})"
                    + (
                        " with a checkpoint"
                        if single_worker
                        else f"; it resumes after epoch {epoch}"
                    )
                    + f". Resume with: python -m leukemia_tf.train --flagfile={resume}"
                )
        logs = {
            "epoch": epoch,
            "lr": float(parts.schedule(max(global_step - 1, 0))),
            "loss": float(totals[0] / totals[2]),
            "accuracy": float(totals[1] / totals[2]),
        }
        improved = _close_epoch(config, parts, data, epoch, logs, epoch_start, model_dir)
        if config.verbose and chief:
            print(
                f"epoch {epoch + 1}/{config.epochs}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in logs.items() if k != "epoch")
                + (" *" if improved else "")
            )
        if any([bool(hook(epoch, logs)) for hook in hooks]) and epoch + 1 < config.epochs:
            finished = False
            break
        if sigterm.received:
            raise Preempted(
                f"SIGTERM received: stopped after epoch {epoch + 1} with a checkpoint. Resume "
                f"with: python -m leukemia_tf.train --flagfile={resume}"
            )
        patience = config.early_stopping_patience
        if patience and int(state.waited.numpy()) >= patience:
            # Every worker computed the same validation metrics: all stop here.
            print(f"Early stopping: {config.monitor} did not improve for {patience} epochs.")
            break
    return _result(config, strategy, precision, data, state, finished, start_time)


def _close_epoch(config, parts: _Parts, data: _Data, epoch, logs, epoch_start, model_dir) -> bool:
    """Validation, the finite check, best/last models, history and checkpoint; True if best.

    Validation and the saved models use the EMA weights (also without validation).
    """
    if config.ema:
        ema.swap(parts.optimizer, parts.batchnorm_ema)
    if data.val_ds is not None:
        logs.update(parts.evaluate(data.val_ds, data.num_val, config.val_split))
    logs["epoch_time_s"] = time.time() - epoch_start
    _check_finite(logs, parts.model, epoch, config, model_dir, parts.state)
    improved = parts.state.update_best(epoch, logs)
    if improved:
        parts.state.save_model(parts.model, rundir.BEST_MODEL)
    parts.state.save_model(parts.model, rundir.LAST_MODEL)
    if config.ema:
        ema.swap(parts.optimizer, parts.batchnorm_ema)
    parts.state.end_epoch(epoch, logs, data.steps_per_epoch)
    return improved


def _result(config, strategy, precision, data: _Data, state, finished, start_time) -> TrainResult:
    """The run's result; a finished run's summary is written (and its backup deleted)."""
    best_epoch = int(state.best_epoch.numpy())
    best_row = next((r for r in state.history if r["epoch"] == best_epoch), {})
    result = TrainResult(
        model_dir=state.model_dir,
        best_model_path=rundir.join(state.model_dir, rundir.BEST_MODEL),
        best_epoch=best_epoch,
        best_metrics={k: v for k, v in best_row.items() if k.startswith("val_")},
        history=state.history,
        class_names=data.class_names,
        wall_time_s=time.time() - start_time,
        finished=finished,
    )
    if finished:
        summary = dataclasses.asdict(result)
        del summary["finished"]
        summary.update(
            precision=precision,
            strategy=type(strategy).__name__,
            num_replicas=strategy.num_replicas_in_sync,
            steps_per_epoch=data.steps_per_epoch,
            num_train_examples=data.num_train,
        )
        state.finish(summary)
    return result


def _seed_states(model, augmenter, mix_seed) -> list:
    """The state variables of every Keras seed generator of the run (tf.train.Checkpoint
    does not see them through the layers)."""
    variables = list(model.variables)
    if augmenter is not None:
        variables += augmenter.variables
    if mix_seed is not None:
        variables.append(mix_seed.state)
    return [v for v in variables if v.path.endswith("seed_generator_state")]


def _progress_bar(config, chief: bool, epoch: int, stage: int, steps_per_epoch: int):
    if config.verbose != 1 or not chief:
        return None
    print(f"Epoch {epoch + 1}/{config.epochs}" + (" (backbone frozen)" if stage == 1 else ""))
    return keras.utils.Progbar(steps_per_epoch, stateful_metrics=["loss", "accuracy"])


def _check_finite(logs, model, epoch: int, config, model_dir: str, state) -> None:
    """Raises :class:`NonFiniteError` before a non-finite epoch is saved or called good."""
    bad = [f"{k}={v}" for k, v in logs.items() if not np.isfinite(v)]
    weights = run_state.nonfinite_weights(model)
    if weights:
        bad.append(f"{len(weights)} weights (first: {weights[0]})")
    if bad:
        raise NonFiniteError(
            f"epoch {epoch + 1} ended with non-finite values: {', '.join(bad)}; it was not "
            f"saved. Lower --learning_rate (now {config.learning_rate}) or check the data. "
            + _nonfinite_hint(config, model_dir, state)
        )
