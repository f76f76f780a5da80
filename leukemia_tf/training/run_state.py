"""What a training run keeps between epochs, and where it keeps it.

:class:`RunState` owns the run's progress (epoch, best value and epoch, epochs
without improvement, a preempted epoch's step and running totals), the backup
checkpoint a killed run resumes from, the best and last models, the history
and the TensorBoard logs. It writes each of them whole or not at all
(:mod:`leukemia_tf.rundir`), and in an order that loses nothing: the models,
then the epoch's history row, then the checkpoint that marks the epoch done.
A run killed in between resumes after the previous epoch and writes the row
again.

Under multi-worker training every worker saves (saving is collective), but
only the chief's files are kept: the others write into a scratch dir that is
emptied after every save.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from leukemia_tf import rundir
from leukemia_tf.training import distribute

_PROGRESS_KEYS = ("epoch", "step_in_epoch")


def peek_progress(model_dir: str) -> tuple[int, int]:
    """``(finished epochs, steps of the unfinished epoch)`` in ``model_dir``'s backup, or zeros.

    Read from the checkpoint file without building the model, so the input
    pipeline can skip the batches already trained on before anything else.
    """
    latest = tf.train.latest_checkpoint(rundir.join(model_dir, rundir.BACKUP_DIR))
    if not latest:
        return 0, 0
    # A reader of the file itself: tf.train.list_variables asks first whether the
    # path is a folder, which TF's ram:// answers yes for a checkpoint prefix.
    reader = tf.compat.v1.train.NewCheckpointReader(latest)
    out = []
    for key in _PROGRESS_KEYS:
        name = f"{key}/.ATTRIBUTES/VARIABLE_VALUE"
        out.append(int(reader.get_tensor(name)) if reader.has_tensor(name) else 0)
    return out[0], out[1]


def better(monitor: str, value: float, best: float) -> bool:
    """True when ``value`` of ``monitor`` improves on ``best`` (NaN never does)."""
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value < best if monitor == "val_loss" else value > best


def nonfinite_weights(model: keras.Model) -> list[str]:
    """The paths of the model's variables that hold a NaN or an infinity."""
    return [
        v.path
        for v in model.variables
        if tf.as_dtype(v.dtype).is_floating and not bool(tf.reduce_all(tf.math.is_finite(v.value)))
    ]


class RunState:
    """The run's progress, backup checkpoint, best/last models, history and logs.

    Create it under the strategy's scope (its variables are mirrored).

    Args:
      model_dir: the run directory.
      write_dir: where this worker writes (``model_dir`` on the chief).
      chief: whether this worker keeps its files.
      monitor: the metric that decides the best epoch.
      trackables: what the checkpoint holds besides the progress (model,
        optimizer, EMA averages, the augmenter's random state).
    """

    def __init__(self, model_dir: str, write_dir: str, chief: bool, monitor: str, **trackables):
        self.model_dir, self.write_dir, self.chief, self.monitor = (
            model_dir,
            write_dir,
            chief,
            monitor,
        )
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.best = tf.Variable(float("nan"), dtype=tf.float64, trainable=False, name="best")
        self.best_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False, name="best_epoch")
        self.waited = tf.Variable(0, dtype=tf.int64, trainable=False, name="waited")
        # A preempted epoch: steps done and the running [loss sum, correct, count].
        self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
        self.totals = tf.Variable(np.zeros(3), dtype=tf.float64, trainable=False, name="totals")
        self.checkpoint = tf.train.Checkpoint(
            epoch=self.epoch,
            best=self.best,
            best_epoch=self.best_epoch,
            waited=self.waited,
            step_in_epoch=self.step_in_epoch,
            totals=self.totals,
            **trackables,
        )
        self._manager = tf.train.CheckpointManager(
            self.checkpoint, rundir.join(write_dir, rundir.BACKUP_DIR), max_to_keep=1
        )
        self.history: list[dict] = []
        self._writers: dict | None = None

    # ------------------------------------------------------------ resuming
    def restore(self, overwrite: bool) -> int:
        """Restores the chief's backup, if any (and not ``overwrite``); returns the start epoch.

        Every worker restores from the chief's backup (model_dir must be
        shared: gs:// or a network disk), so a restarted cluster resumes from
        one state, as Keras's BackupAndRestore does.
        """
        backup = rundir.join(self.model_dir, rundir.BACKUP_DIR)
        latest = None if overwrite else tf.train.latest_checkpoint(backup)
        if latest:
            self.checkpoint.restore(latest).expect_partial()
            if self.chief:
                where = f"after epoch {int(self.epoch.numpy())}"
                if int(self.step_in_epoch.numpy()):
                    where += f", step {int(self.step_in_epoch.numpy())} of the next"
                print(f"Resuming the run in {self.model_dir} {where}.")
        start = int(self.epoch.numpy())
        if self.chief:
            self.history = rundir.read_history(self.model_dir, upto_epoch=start)
        return start

    # -------------------------------------------------------------- saving
    def _save_checkpoint(self, number: int) -> None:
        rundir.fault_point("checkpoint")
        self._manager.save(checkpoint_number=number)
        if not self.chief:
            rundir.remove(rundir.join(self.write_dir, rundir.BACKUP_DIR))

    def save_model(self, model: keras.Model, name: str) -> None:
        # Every worker saves (reading mirrored values may be collective); a
        # non-chief worker's copy is deleted at once.
        path = rundir.join(self.write_dir, name)
        tf.io.gfile.makedirs(self.write_dir)
        rundir.save_keras(model, path)
        if not self.chief:
            rundir.remove(path)

    def update_best(self, epoch: int, logs: dict) -> bool:
        """Records ``epoch``'s monitored value; True when it is the best so far."""
        value = logs.get(
            self.monitor, -logs["loss"] if self.monitor != "val_loss" else logs["loss"]
        )
        improved = better(self.monitor, float(value), float(self.best.numpy()))
        if improved:
            self.best.assign(float(value))
            self.best_epoch.assign(epoch)
            self.waited.assign(0)
        else:
            self.waited.assign_add(1)
        return improved

    def end_epoch(self, epoch: int, logs: dict, steps_per_epoch: int) -> None:
        """Marks ``epoch`` done: its history row and logs, then the checkpoint."""
        self.epoch.assign(epoch + 1)
        self.step_in_epoch.assign(0)
        self.totals.assign(np.zeros(3))
        if self.chief:
            # The row goes first: a kill before the checkpoint resumes before
            # this epoch and writes the row again; never a checkpoint without it.
            self.history.append(logs)
            rundir.write_history(self.model_dir, self.history)
            self._log_scalars(epoch, logs)
        self._save_checkpoint((epoch + 1) * steps_per_epoch)

    def save_partial(self, epoch: int, step: int, totals: np.ndarray, steps_per_epoch: int) -> None:
        """A checkpoint in the middle of ``epoch`` (after ``step`` of its steps): preemption."""
        self.epoch.assign(epoch)
        self.step_in_epoch.assign(step)
        self.totals.assign(totals)
        self._save_checkpoint(epoch * steps_per_epoch + step)

    def _log_scalars(self, epoch: int, logs: dict) -> None:
        if self._writers is None:
            logs_dir = rundir.join(self.model_dir, rundir.LOGS_DIR)
            self._writers = {
                split: tf.summary.create_file_writer(rundir.join(logs_dir, split))
                for split in ("train", "validation")
            }
        for key, value in logs.items():
            if key == "epoch":
                continue
            split = "validation" if key.startswith("val_") else "train"
            with self._writers[split].as_default(step=epoch + 1):
                tf.summary.scalar(key.removeprefix("val_"), value)

    def finish(self, summary: dict) -> None:
        """Writes the summary (the run is finished) and deletes the backup."""
        if self.chief:
            rundir.write_json(rundir.join(self.model_dir, rundir.SUMMARY), summary)
            rundir.remove(rundir.join(self.model_dir, rundir.BACKUP_DIR))
        else:
            distribute.remove_worker_dir(self.model_dir, self.write_dir)
