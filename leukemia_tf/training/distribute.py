"""Choosing the tf.distribute strategy and the mixed-precision policy.

Nothing home-made: every case is a stock ``tf.distribute`` strategy, and the
same training step (``strategy.run``) runs under all of them.
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf
from absl import logging


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


def worker_dir(model_dir: str, strategy: tf.distribute.Strategy) -> str:
    """Where this worker writes: ``model_dir`` on the chief, a scratch dir elsewhere.

    Under multi-worker training every worker must take part in saving (the
    values are gathered collectively), but only the chief's files are kept.
    """
    if is_chief(strategy):
        return model_dir
    resolver = strategy.cluster_resolver
    return os.path.join(model_dir, ".workers", f"{resolver.task_type}_{resolver.task_id}")
