"""Choosing the tf.distribute strategy and the mixed-precision policy.

Nothing home-made: every case is a stock ``tf.distribute`` strategy, and the
same training step (``strategy.run``) runs under all of them.

* ``multi_worker``: ``MultiWorkerMirroredStrategy`` over the cluster in
  ``TF_CONFIG``. The chief (task ``chief``, else ``worker`` 0) writes
  ``model_dir``; the others write into scratch dirs (:func:`worker_dir`).
  ``model_dir`` must be one directory that every worker reads (``gs://`` or
  a shared disk): every worker restores the chief's backup on a restart.
* ``tpu``: ``TPUStrategy`` through ``TPUClusterResolver``; ``--tpu=local`` on
  a TPU VM (Colab's TPU runtime), ``--tpu=NAME`` for a Cloud TPU reached over
  the network, which needs ``gs://`` paths (:func:`check_tpu_config`).
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf
from absl import logging

from leukemia_tf.rundir import WORKERS_DIR
from leukemia_tf.training.config import check_tpu_config, targets_tpu

__all__ = [
    "check_tpu_config",
    "check_workers_agree",
    "is_chief",
    "make_strategy",
    "num_workers",
    "remove_worker_dir",
    "resolve_precision",
    "set_precision",
    "targets_tpu",
    "worker_dir",
]


def _num_gpus() -> int:
    return len(tf.config.list_physical_devices("GPU"))


def make_strategy(name: str = "auto", tpu: str = "") -> tf.distribute.Strategy:
    """Returns the strategy ``name`` asks for.

    Args:
      name: ``auto`` (tpu if ``tpu`` is set, mirrored with several GPUs, else
        default), ``default``, ``mirrored``, ``multi_worker`` (cluster from
        ``TF_CONFIG``) or ``tpu``.
      tpu: TPU name, or ``local`` for a Colab / TPU-VM runtime.
    """
    if name == "auto":
        name = "tpu" if tpu else ("mirrored" if _num_gpus() > 1 else "default")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "--strategy=multi_worker needs the TF_CONFIG environment variable "
                "(cluster and task); see README 'Scaling out'"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        if not tpu:
            raise ValueError("--strategy=tpu needs --tpu=local or --tpu=NAME")
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu="" if tpu == "local" else tpu
        )
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"--strategy={name!r}: choose auto, default, mirrored, multi_worker or tpu")


def resolve_precision(precision: str, strategy: tf.distribute.Strategy) -> str:
    """Maps ``auto`` to float16 on GPU, bfloat16 on TPU, float32 on CPU."""
    if precision != "auto":
        return precision
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "mixed_bfloat16"
    if _num_gpus() > 0:
        return "mixed_float16"
    return "float32"


def set_precision(policy: str) -> None:
    keras.mixed_precision.set_global_policy(policy)
    logging.info("mixed-precision policy: %s", policy)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes checkpoints, logs and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None:
        return True
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    if "chief" in cluster:
        return task_type == "chief"
    return task_type == "worker" and task_id == 0


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Machines (chief and workers) taking part in a multi-worker run; 1 otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return 1
    spec = resolver.cluster_spec()
    return max(1, sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs))


def worker_dir(model_dir: str, strategy: tf.distribute.Strategy) -> str:
    """Where this worker writes: ``model_dir`` on the chief, a scratch dir elsewhere.

    Under multi-worker training every worker must take part in saving (the
    values are gathered collectively), but only the chief's files are kept:
    a non-chief worker writes into ``model_dir/.workers/<task>_<id>``, which
    the training loop empties after every save and deletes at the end
    (:func:`remove_worker_dir`), as Keras's own multi-worker callbacks do.
    """
    if is_chief(strategy):
        return model_dir
    resolver = strategy.cluster_resolver
    return os.path.join(model_dir, WORKERS_DIR, f"{resolver.task_type}_{resolver.task_id}")


def remove_worker_dir(model_dir: str, write_dir: str) -> None:
    """Deletes a non-chief worker's scratch dir, and ``.workers`` once it is empty."""
    if write_dir == model_dir:
        return
    try:
        if tf.io.gfile.exists(write_dir):
            tf.io.gfile.rmtree(write_dir)
        parent = os.path.join(model_dir, WORKERS_DIR)
        if tf.io.gfile.exists(parent) and not tf.io.gfile.listdir(parent):
            tf.io.gfile.rmtree(parent)
    except tf.errors.NotFoundError:
        pass  # another worker removed it first


def check_workers_agree(strategy: tf.distribute.Strategy, epoch: int, fingerprint: int) -> None:
    """Fails on every worker unless all resume at ``epoch`` with the same ``fingerprint``.

    Workers that disagree would run different numbers of collective steps and
    hang. Each replica contributes ``x`` and ``x**2``; all values are equal
    exactly when ``n * sum(x**2) == sum(x)**2`` (the all-reduced sums are the
    same on every worker, so every worker reaches the same verdict).

    Args:
      strategy: the multi-worker strategy.
      epoch: the epoch this worker resumes after (0: a fresh start).
      fingerprint: a small integer hash of the settings that decide the
        number of steps (batch size, epochs, steps per epoch, ...).

    Raises:
      RuntimeError: the workers disagree; the message says what to check.
    """
    local = tf.constant([epoch, epoch**2, fingerprint, fingerprint**2], tf.float64)

    @tf.function
    def total():
        per_replica = strategy.run(lambda: tf.identity(local))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    s_epoch, s_epoch2, s_fp, s_fp2 = (float(x) for x in total().numpy())
    n = strategy.num_replicas_in_sync
    if abs(n * s_fp2 - s_fp**2) > 1e-6 * max(1.0, s_fp**2):
        raise RuntimeError(
            "the workers of this multi-worker run were started with different training flags "
            "(batch size, epochs, steps, data sets, ...): give every worker the same flags"
        )
    if abs(n * s_epoch2 - s_epoch**2) > 1e-6 * max(1.0, s_epoch**2):
        raise RuntimeError(
            f"the workers of this multi-worker run would resume from different epochs (this "
            f"worker: after epoch {epoch}; mean over the replicas: {s_epoch / n:g}). Every "
            "worker restores the chief's backup in --model_dir/backup: --model_dir must be one "
            "directory that every worker can read (gs:// or a shared disk)"
        )
