"""Input functions of the training loop, for ``strategy.distribute_datasets_from_function``.

* Training batches are per replica (``batch_size / num_replicas``), sharded
  per worker, repeated forever with ``drop_remainder``, so every worker runs
  the same number of steps and every shape is static (:func:`train_input_fn`).
* Validation batches are padded and spread evenly (:func:`eval_input_fn`), so
  no collective op waits for a worker that ran out of data.
* String features never enter the step (XLA and TPUs take none); a TPU gets
  bfloat16 images (it takes no uint8).
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from leukemia_tf.data import pipeline
from leukemia_tf.taxonomy import Taxonomy
from leukemia_tf.training.config import TrainConfig

#: The batch features the model step uses. The string features (patient_id,
#: file_name, ...) never enter the step: a TPU and XLA take no strings.
MODEL_FEATURES = ("image", "label", "levels")
#: Added to validation batches: 1 for a real example, 0 for padding.
VALID = "valid"


def cache_arg(config: TrainConfig) -> bool | str:
    return {"memory": True, "none": False}.get(config.cache, config.cache)


def _features_fn(image_dtype: tf.DType) -> Callable[[dict], dict]:
    def fn(batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if k in MODEL_FEATURES}
        if image_dtype != out["image"].dtype:
            out["image"] = tf.cast(out["image"], image_dtype)
        return out

    return fn


def input_image_dtype(strategy: tf.distribute.Strategy) -> tf.DType:
    """``uint8`` (4x less to copy than float32), but ``bfloat16`` for a TPU.

    TPUs take no uint8 input; bfloat16 holds every integer 0-255 exactly
    (8 significant bits) at half the bytes of float32.
    """
    return tf.bfloat16 if isinstance(strategy, tf.distribute.TPUStrategy) else tf.uint8


def train_input_fn(
    config: TrainConfig,
    specs,
    data_dir: str | None,
    taxonomy: Taxonomy | None,
    image_dtype: tf.DType = tf.uint8,
    skip_steps: int = 0,
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """The training input function for ``strategy.distribute_datasets_from_function``.

    Each input pipeline (one per worker or TPU host) reads its shard of the
    training split (by file when the split has at least as many files as
    pipelines, else by example: see :mod:`leukemia_tf.data.pipeline`) and
    yields per-replica batches of ``batch_size / num_replicas`` examples,
    forever, with ``drop_remainder``: every shape is static (TPU, XLA) and
    every worker can run the same number of steps per epoch.

    Args:
      config: the training configuration.
      specs: the parsed ``--datasets``.
      data_dir: the TFDS data directory (``None``: TFDS's default).
      taxonomy: the taxonomy (taxonomy label mode), else ``None``.
      image_dtype: dtype of the images handed to the step
        (:func:`input_image_dtype`).
      skip_steps: training steps already taken (a resumed run): their batches
        are skipped, so the run sees the batches an uninterrupted run would.

    Returns:
      ``fn(input_context) -> tf.data.Dataset`` of dicts with :data:`MODEL_FEATURES`.
    """

    def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        ds = pipeline.load_split(
            specs,
            config.train_split,
            data_dir=data_dir,
            image_size=config.image_size,
            batch_size=config.batch_size,  # load_split divides it per replica
            training=True,
            label_mode=config.label_mode,
            taxonomy=taxonomy,
            cache=cache_arg(config),
            shuffle_buffer=config.shuffle_buffer,
            seed=config.seed,
            deterministic=config.deterministic,
            input_context=ctx,
        )
        if skip_steps:
            # Each step takes one batch per replica that this pipeline feeds.
            ds = ds.skip(skip_steps * ctx.num_replicas_in_sync // ctx.num_input_pipelines)
        return ds.map(_features_fn(image_dtype), num_parallel_calls=tf.data.AUTOTUNE)

    return fn


def eval_input_fn(
    config: TrainConfig,
    specs,
    data_dir: str | None,
    taxonomy: Taxonomy | None,
    num_examples: int,
    image_dtype: tf.DType = tf.uint8,
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """The validation input function: full, padded batches, as many on every replica.

    An evaluation loop with collective ops (``strategy.gather``, and the
    multi-worker iterator's end-of-data check) hangs or retraces when input
    pipelines hold different numbers of batches or a last partial batch, and
    a TPU needs static shapes. So every pipeline reads the WHOLE validation
    split in a fixed order (no sharding by file, which could be uneven),
    pads it with masked examples (``valid`` = 0) to a whole number of global
    batches, and keeps every ``num_input_pipelines``-th per-replica batch:
    each replica then gets the same number of full batches, and the examples
    are evaluated exactly once in all. Reading the split once per worker costs
    some I/O; validation splits are small.

    Args:
      config: the training configuration.
      specs: the parsed ``--datasets``.
      data_dir: the TFDS data directory.
      taxonomy: the taxonomy (taxonomy label mode), else ``None``.
      num_examples: examples in the validation split (after dropping those
        whose label maps to null), as :func:`pipeline.class_counts` counts them.
      image_dtype: dtype of the images handed to the step
        (:func:`input_image_dtype`).

    Returns:
      ``fn(input_context) -> tf.data.Dataset`` of dicts with
      :data:`MODEL_FEATURES` and :data:`VALID`.
    """

    def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        batch = ctx.get_per_replica_batch_size(config.batch_size)
        pipelines, pipeline_id = ctx.num_input_pipelines, ctx.input_pipeline_id
        cache = cache_arg(config)
        if isinstance(cache, str) and pipelines > 1:
            # Every worker reads the whole split: one cache file each.
            cache = f"{cache}pipeline{pipeline_id}of{pipelines}_"
        ds = pipeline.load_split(
            specs,
            config.val_split,
            data_dir=data_dir,
            image_size=config.image_size,
            batch_size=batch,
            training=False,
            label_mode=config.label_mode,
            taxonomy=taxonomy,
            cache=cache,
            # Sharding by batch below needs the same order in every pipeline.
            deterministic=config.deterministic or pipelines > 1,
        )
        ds = ds.map(_features_fn(image_dtype))
        spec = ds.element_spec
        num_batches = -(-num_examples // batch)
        replicas = ctx.num_replicas_in_sync
        total = -(-num_batches // replicas) * replicas

        def pad(features: dict) -> dict:
            n = tf.shape(features["label"])[0]
            out = {}
            for key, value in features.items():
                paddings = [[0, batch - n]] + [[0, 0]] * (value.shape.rank - 1)
                out[key] = tf.ensure_shape(tf.pad(value, paddings), [batch, *spec[key].shape[1:]])
            out[VALID] = tf.ensure_shape(tf.sequence_mask(n, batch, dtype=tf.int32), [batch])
            return out

        filler = {key: tf.zeros([batch, *s.shape[1:]], s.dtype) for key, s in spec.items()} | {
            VALID: tf.zeros([batch], tf.int32)
        }
        ds = ds.map(pad).concatenate(
            tf.data.Dataset.from_tensors(filler).repeat(total - num_batches)
        )
        # `take` guards the count; `shard` gives each pipeline every n-th batch.
        ds = ds.take(total).shard(pipelines, pipeline_id)
        return ds.prefetch(tf.data.AUTOTUNE)

    return fn
