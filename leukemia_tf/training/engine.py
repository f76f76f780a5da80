"""The training engine: one custom loop that runs under every tf.distribute strategy.

Why not ``Model.fit``: under ``MultiWorkerMirroredStrategy`` Keras 3's ``fit``
fails (keras-team/keras#20585), while a ``strategy.run`` step over the same
Keras model and optimizer works. One loop for every strategy is better than
two, so this module owns the loop and does what ``fit`` and its callbacks
would: augmentation on the accelerator inside the step, mixed precision with
loss scaling, ``steps_per_execution``, optional XLA, AdamW with warm-up and
cosine decay, EMA weights, class weighting, two-stage fine-tuning, best and
last checkpoints, backup-and-restore of a killed run
(``tf.train.CheckpointManager``), TensorBoard and CSV logs, early stopping and
a stop on NaN that names the step.

Scaling out (README "Scaling out"):

* Every strategy gets its input through ``distribute_datasets_from_function``:
  training batches are per replica (``batch_size / num_replicas``), sharded
  per worker (:func:`train_input_fn`), repeated forever with
  ``drop_remainder``, so every worker runs the same number of steps and every
  shape is static. Validation batches are padded and spread evenly
  (:func:`eval_input_fn`), so no collective op waits for a worker that ran
  out of data. String features never enter the step (XLA and TPUs take none);
  a TPU gets bfloat16 images (it takes no uint8).
* Multi-worker: only the chief writes ``model_dir`` (config, logs, history,
  models). Saving is collective, so the other workers save too, into a
  scratch dir (``model_dir/.workers/<task>``) emptied after every save and
  deleted at the end. Every worker restores the chief's backup, and the
  workers check at start that they resume from the same epoch with the same
  step-determining flags (a mismatch would hang the collectives).
* ``model_dir`` may be a ``gs://`` URL: every file goes through
  ``tf.io.gfile``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from sklearn import metrics as skm

from leukemia_tf.data import pipeline
from leukemia_tf.models import augment, classifier
from leukemia_tf.models.label_space import LabelSpace
from leukemia_tf.taxonomy import Taxonomy
from leukemia_tf.training import distribute, model_factory, schedules
from leukemia_tf.training.config import ConfigError, TrainConfig

#: Files a training run writes into model_dir.
BEST_MODEL = "best.keras"
LAST_MODEL = "last.keras"
SUMMARY = "train_summary.json"
HISTORY_CSV = "history.csv"
BACKUP_DIR = "backup"
#: Scratch space of the non-chief workers of a multi-worker run (deleted).
WORKERS_DIR = distribute.WORKERS_DIR

#: The batch features the model step uses. The string features (patient_id,
#: file_name, ...) never enter the step: a TPU and XLA take no strings.
MODEL_FEATURES = ("image", "label", "levels")
#: Added to validation batches: 1 for a real example, 0 for padding.
VALID = "valid"

EpochCallback = Callable[[int, dict], None]


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


# ------------------------------------------------------------------------- metrics
def classification_metrics(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> dict:
    """Accuracy, balanced accuracy and macro-F1 of argmax predictions."""
    if len(labels) == 0:
        return {
            "accuracy": float("nan"),
            "balanced_accuracy": float("nan"),
            "macro_f1": float("nan"),
        }
    pred = probs.argmax(axis=-1)
    present = np.unique(labels)
    return {
        "accuracy": float(skm.accuracy_score(labels, pred)),
        # Over the classes present in this split: absent classes have no recall.
        "balanced_accuracy": float(np.mean([np.mean(pred[labels == c] == c) for c in present])),
        "macro_f1": float(
            skm.f1_score(
                labels, pred, labels=list(range(num_classes)), average="macro", zero_division=0
            )
            if len(present) == num_classes
            else skm.f1_score(labels, pred, labels=present, average="macro", zero_division=0)
        ),
    }


# --------------------------------------------------------------------------- helpers
def _swap_ema_weights(optimizer, batchnorm_ema: Sequence = ()) -> None:
    """Swaps the model's variables with their EMA copies (in place).

    The optimizer's EMA covers the trainable variables; ``batchnorm_ema``
    holds ``(moving statistic, its average)`` pairs (:func:`_batchnorm_ema`).
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    pairs = list(
        zip(inner._trainable_variables, inner._model_variables_moving_average, strict=True)
    )
    for var, average in pairs + list(batchnorm_ema):
        current = tf.identity(var.value)
        var.assign(average.value)
        average.assign(current)


def _batchnorm_ema(model: keras.Model) -> list[tuple]:
    """``(moving statistic, average)`` pairs for every BatchNormalization layer of ``model``.

    Keras' optimizer EMA averages the trainable variables only, so the EMA
    weights would be evaluated with the moving mean and variance of the
    live weights, which follow the last few dozen batches (momentum 0.9-0.99)
    and move with every update. Averaging the statistics with the same
    momentum as the weights, as timm's ``ModelEmaV2`` does with every buffer,
    gives the EMA weights statistics of the same time span. Call under the
    strategy's scope; the averages start at the statistics' current values.
    """
    pairs = []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.built:
            for var in (layer.moving_mean, layer.moving_variance):
                average = keras.Variable(
                    tf.identity(var.value),
                    trainable=False,
                    name=f"{var.name}_ema",
                    aggregation="mean",
                )
                pairs.append((var, average))
    return pairs


def _update_batchnorm_ema(pairs: Sequence, momentum: tf.Tensor) -> None:
    """One EMA update of every ``(statistic, average)`` pair (in a replica context)."""
    for var, average in pairs:
        average.assign(momentum * average + (1.0 - momentum) * tf.cast(var.value, average.dtype))


def _clip_across_replicas(grads, clipnorm: float, optimizer, num_replicas: int) -> list:
    """Clips the all-reduced gradient by its global norm, inside a replica.

    The optimizer all-reduces (sums) the gradients it is given, so the
    clipped sum is handed back divided by the number of replicas. Under a
    loss-scale optimizer the norm is taken of the unscaled gradient.
    """
    # Dense tensors: IndexedSlices (embedding gradients) do not divide, and
    # clip_by_global_norm would densify them anyway.
    present = [i for i, g in enumerate(grads) if g is not None]
    dense = [tf.convert_to_tensor(grads[i]) for i in present]
    context = tf.distribute.get_replica_context()
    dense = context.all_reduce(tf.distribute.ReduceOp.SUM, dense)
    scale = getattr(optimizer, "dynamic_scale", None)
    if scale is not None:
        scale = tf.cast(scale, tf.float32)
        dense = [g / scale for g in dense]
    dense, _ = tf.clip_by_global_norm(dense, clipnorm)
    if scale is not None:
        dense = [g * scale for g in dense]
    out = list(grads)
    for i, g in zip(present, dense, strict=True):
        out[i] = g / num_replicas
    return out


def _join(*parts: str) -> str:
    # Plain string joins: model_dir may be a gs:// URL, which pathlib mangles.
    return os.path.join(*parts)


def _remove(path: str) -> None:
    """Deletes a file or directory tree (local or gs://) if it exists."""
    if not tf.io.gfile.exists(path):
        return
    if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
    else:
        tf.io.gfile.remove(path)


def _write_text(path: str, text: str) -> None:
    # Remove first: some file systems (TF's ram://) append on "w".
    _remove(path)
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)


def _model_dir(config: TrainConfig) -> str:
    model_dir = config.model_dir
    return model_dir if "://" in model_dir else os.path.expanduser(model_dir)


def _prepare_model_dir(config: TrainConfig, chief: bool) -> str:
    model_dir = _model_dir(config)
    finished = tf.io.gfile.exists(_join(model_dir, SUMMARY))
    if finished and not config.overwrite:
        raise ConfigError(
            f"--model_dir={config.model_dir!r} holds a finished run ({SUMMARY}); choose another "
            "directory or pass --overwrite to start afresh"
        )
    if chief and config.overwrite:
        for name in (BEST_MODEL, LAST_MODEL, SUMMARY, HISTORY_CSV, BACKUP_DIR, WORKERS_DIR, "logs"):
            _remove(_join(model_dir, name))
    if chief:
        tf.io.gfile.makedirs(model_dir)
    return model_dir


def _read_history(path: str, upto_epoch: int) -> list[dict]:
    if not tf.io.gfile.exists(path):
        return []
    with tf.io.gfile.GFile(path) as f:
        rows = [
            {k: (float(v) if k != "epoch" else int(v)) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]
    return [r for r in rows if r["epoch"] < upto_epoch]


def _write_history(path: str, history: list[dict]) -> None:
    if not history:
        return
    keys = list(history[0])
    tmp = path + ".tmp"
    _remove(tmp)
    with tf.io.gfile.GFile(tmp, "w") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    tf.io.gfile.rename(tmp, path, overwrite=True)


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


def _better(monitor: str, value: float, best: float) -> bool:
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value < best if monitor == "val_loss" else value > best


def _prepare_generated_datasets(specs, data_dir: str | None) -> None:
    """Builds, like ``tfds.load`` would, data sets that need no manual download.

    Sets downloaded by hand are never built here: the input pipeline's error
    then says which ``build_data`` command to run.
    """
    import tensorflow_datasets as tfds

    from leukemia_tf.data import build as build_lib
    from leukemia_tf.data.registry import register_builders

    register_builders()

    for spec in specs:
        builder = tfds.builder(spec.name, data_dir=data_dir)
        if builder.is_prepared() or builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
            continue
        print(f"Building the data set {spec.name} into {builder.data_dir} (first use) ...")
        build_lib.build(spec.name, data_dir=data_dir)


# ---------------------------------------------------------------------------- input
def _cache_arg(config: TrainConfig) -> bool | str:
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
            cache=_cache_arg(config),
            shuffle_buffer=config.shuffle_buffer,
            seed=config.seed,
            deterministic=config.deterministic,
            input_context=ctx,
        )
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
        cache = _cache_arg(config)
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


# ---------------------------------------------------------------------------- train
def train(config: TrainConfig, callbacks: Sequence[EpochCallback] = ()) -> TrainResult:
    """Trains a model as ``config`` says and writes everything into ``config.model_dir``.

    A run that was killed resumes from its last completed epoch when started
    again with the same ``model_dir``.

    Args:
      config: the training configuration (validated here).
      callbacks: called as ``callback(epoch, logs)`` after each epoch's
        checkpoint (tests use this to simulate a killed run).

    Returns:
      A :class:`TrainResult`.
    """
    config.validate()
    start_time = time.time()
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    strategy = distribute.make_strategy(config.strategy, config.tpu)
    on_tpu = isinstance(strategy, tf.distribute.TPUStrategy)
    if on_tpu:
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
    num_workers = distribute.num_workers(strategy)
    model_dir = _prepare_model_dir(config, chief)
    # Non-chief workers write into a scratch dir, emptied after every write.
    write_dir = distribute.worker_dir(model_dir, strategy)
    tf.io.gfile.makedirs(write_dir)

    taxonomy = model_factory.taxonomy_for(config)
    specs = pipeline.parse_datasets(config.datasets)
    data_dir = config.data_dir or None
    if chief:
        _prepare_generated_datasets(specs, data_dir)
    class_names = pipeline.dataset_class_names(specs, data_dir, config.label_mode, taxonomy)
    space = LabelSpace(class_names, config.head, taxonomy)
    level_weights = config.parsed_level_weights()
    if (
        level_weights is not None
        and taxonomy is not None
        and len(level_weights) != taxonomy.num_levels
    ):
        raise ConfigError(
            f"--level_weights={config.level_weights!r}: give {taxonomy.num_levels} values, one per "
            "taxonomy level"
        )

    counts = pipeline.class_counts(specs, config.train_split, data_dir, config.label_mode, taxonomy)
    num_train = int(counts.sum())
    global_batch = config.batch_size
    if num_train < global_batch:
        raise ConfigError(
            f"--batch_size={global_batch} is larger than the training split ({num_train} examples)"
        )
    steps_per_epoch = config.steps_per_epoch or max(num_train // global_batch, 1)
    if config.class_weighting == "balanced":
        with np.errstate(divide="ignore"):
            class_weights = np.where(counts > 0, num_train / (len(counts) * counts), 0.0)
    else:
        class_weights = np.ones(len(counts))
    class_weights = tf.constant(class_weights, tf.float32)

    train_ds = strategy.distribute_datasets_from_function(
        train_input_fn(config, specs, data_dir, taxonomy, input_image_dtype(strategy))
    )
    val_ds = None
    if config.val_split:
        num_val = int(
            pipeline.class_counts(
                specs, config.val_split, data_dir, config.label_mode, taxonomy
            ).sum()
        )
        if num_val == 0:
            raise ValueError(f"--val_split={config.val_split!r} is empty")
        val_ds = strategy.distribute_datasets_from_function(
            eval_input_fn(config, specs, data_dir, taxonomy, num_val, input_image_dtype(strategy))
        )

    total_steps = steps_per_epoch * config.epochs
    stage1_steps = steps_per_epoch * config.freeze_epochs
    with strategy.scope():
        model = model_factory.build_model(config, space.num_classes, taxonomy)
        augmenter = (
            augment.build_augmenter(
                config.image_size,
                magnitude=config.augment_magnitude,
                crop_scale=(config.crop_scale_min, 1.0),
                seed=config.seed,
            )
            if config.augment
            else None
        )
        schedule = schedules.TwoStageWarmupCosine(
            peak_lr=config.learning_rate,
            total_steps=total_steps,
            warmup_steps=int(config.warmup_epochs * steps_per_epoch),
            min_ratio=config.min_lr_ratio,
            stage1_steps=stage1_steps,
            stage2_factor=config.finetune_lr_factor,
        )
        # Keras clips gradients before it all-reduces them across replicas,
        # i.e. each replica's partial gradient separately; with several
        # replicas the step clips the all-reduced gradient itself instead.
        clip_in_step = bool(config.clipnorm) and strategy.num_replicas_in_sync > 1
        optimizer = keras.optimizers.AdamW(
            learning_rate=schedule,
            weight_decay=config.weight_decay,
            global_clipnorm=None if clip_in_step else (config.clipnorm or None),
            use_ema=config.ema,
            ema_momentum=config.ema_momentum,
        )
        # Normalisation parameters and biases are not decayed.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        if precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        # Build the optimizer's slots for every weight now, so that unfreezing
        # the backbone later finds them (and a checkpoint always has them).
        optimizer.build(model.trainable_variables)
        batchnorm_ema = _batchnorm_ema(model) if config.ema else []
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        best_var = tf.Variable(float("nan"), dtype=tf.float64, trainable=False, name="best")
        best_epoch_var = tf.Variable(-1, dtype=tf.int64, trainable=False, name="best_epoch")
        waited_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="waited")

    checkpoint = tf.train.Checkpoint(
        model=model,
        optimizer=optimizer,
        epoch=epoch_var,
        best=best_var,
        best_epoch=best_epoch_var,
        waited=waited_var,
        batchnorm_ema=[average for _, average in batchnorm_ema],
    )
    # Saving is collective under MultiWorkerMirroredStrategy: every worker
    # saves, the non-chief ones into their scratch dir. Every worker restores
    # from the chief's backup (model_dir must be shared: gs:// or a network
    # disk), so a restarted cluster resumes from one state, as Keras's
    # BackupAndRestore does.
    manager = tf.train.CheckpointManager(checkpoint, _join(write_dir, BACKUP_DIR), max_to_keep=1)
    latest = None if config.overwrite else tf.train.latest_checkpoint(_join(model_dir, BACKUP_DIR))
    if latest:
        checkpoint.restore(latest).expect_partial()
        logging.info("Resuming from %s (epoch %d)", latest, int(epoch_var.numpy()))
        if chief:
            print(f"Resuming the run in {model_dir} after epoch {int(epoch_var.numpy())}.")
    start_epoch = int(epoch_var.numpy())
    if num_workers > 1:
        distribute.check_workers_agree(strategy, start_epoch, _run_fingerprint(config))
    if chief:
        config.save(model_dir)
        _write_text(_join(model_dir, "labels.txt"), "\n".join(class_names) + "\n")

    # ------------------------------------------------------------- the step
    num_replicas = strategy.num_replicas_in_sync
    mix_alpha = (config.mixup_alpha, config.cutmix_alpha)

    def gradients_fn(batch):
        """Augmentation, forward and backward pass of one replica: no cross-replica sync."""
        labels = tf.cast(batch["label"], tf.int32)
        images = tf.cast(batch["image"], tf.float32)
        targets = space.targets(batch)
        weights = tf.gather(class_weights, labels)
        if augmenter is not None:
            images = augmenter(images, training=True)
        if mix_alpha[0] > 0 or mix_alpha[1] > 0:
            use_cutmix = (
                tf.random.uniform([]) < 0.5
                if mix_alpha[0] > 0 and mix_alpha[1] > 0
                else tf.constant(mix_alpha[1] > 0)
            )
            images, targets = tf.cond(
                use_cutmix,
                lambda: augment.cutmix(images, targets, mix_alpha[1] or 1.0),
                lambda: augment.mixup(images, targets, mix_alpha[0] or 1.0),
            )
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            per_example = space.loss(targets, outputs, config.label_smoothing, level_weights)
            loss = tf.nn.compute_average_loss(per_example * weights, global_batch_size=global_batch)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        probs = space.probabilities(outputs)
        correct = tf.reduce_sum(
            tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), labels), tf.float32)
        )
        stats = tf.stack(
            [tf.reduce_sum(per_example), correct, tf.cast(tf.shape(labels)[0], tf.float32)]
        )
        return grads, stats

    def apply_fn(grads) -> None:
        """The cross-replica part: gradient clipping and the all-reduced update."""
        trainable = model.trainable_variables
        if clip_in_step:
            grads = _clip_across_replicas(grads, config.clipnorm, optimizer, num_replicas)
        # As Keras' EMA of the weights: the first step copies, later ones average.
        first_step = tf.equal(optimizer.iterations, 0)
        optimizer.apply_gradients(zip(grads, trainable, strict=True))
        if batchnorm_ema:
            momentum = tf.where(first_step, 0.0, config.ema_momentum)
            _update_batchnorm_ema(batchnorm_ema, momentum)

    def step_fn(batch):
        grads, stats = gradients_fn(batch)
        apply_fn(grads)
        return stats

    def make_train_fn():
        # A TPU compiles everything with XLA already: --xla is for GPUs and CPUs.
        if not config.xla or on_tpu:
            step = step_fn
        elif num_replicas == 1:
            step = tf.function(step_fn, jit_compile=True)  # the update is compiled too
        else:
            # Several replicas: a synchronisation point (the gradient all-reduce)
            # cannot sit inside a function nested in strategy.run, so only the
            # per-replica part is compiled; and each replica device gets its own
            # compiled function, as a shared trace would reach the other
            # replicas' variables across devices, which XLA refuses.
            compiled = {}

            def step(batch):
                device = str(tf.distribute.get_replica_context().devices)
                if device not in compiled:
                    compiled[device] = tf.function(gradients_fn, jit_compile=True)
                grads, stats = compiled[device](batch)
                apply_fn(grads)
                return stats

        @tf.function
        def train_fn(iterator, num_steps):
            totals = tf.zeros([3])
            for _ in tf.range(num_steps):
                out = strategy.run(step, args=(next(iterator),))
                totals += strategy.reduce(tf.distribute.ReduceOp.SUM, out, axis=None)
            return totals

        return train_fn

    @tf.function
    def eval_fn(batch):
        def replica(b):
            outputs = model(tf.cast(b["image"], tf.float32), training=False)
            probs = space.probabilities(outputs)
            loss = space.loss(space.targets(b), outputs, 0.0, level_weights)
            return probs, tf.cast(b["label"], tf.int32), loss, b[VALID]

        out = strategy.run(replica, args=(batch,))
        return tuple(strategy.gather(x, axis=0) for x in out)

    def evaluate() -> dict:
        probs, labels, losses = [], [], []
        for batch in val_ds:
            p, y, loss, valid = (x.numpy() for x in eval_fn(batch))
            keep = valid.astype(bool)  # drop the padding
            probs.append(p[keep])
            labels.append(y[keep])
            losses.append(loss[keep])
        probs_np, labels_np = np.concatenate(probs), np.concatenate(labels)
        if len(labels_np) != num_val:
            raise RuntimeError(
                f"validation saw {len(labels_np)} examples of --val_split={config.val_split!r}, "
                f"expected {num_val}"
            )
        out = classification_metrics(labels_np, probs_np, space.num_classes)
        out["loss"] = float(np.mean(np.concatenate(losses)))
        return {f"val_{k}": v for k, v in out.items()}

    def save_model(name: str) -> None:
        # Every worker saves (reading mirrored values may be collective); a
        # non-chief worker's copy is deleted at once.
        path = _join(write_dir, name)
        tf.io.gfile.makedirs(write_dir)  # a chief's --overwrite may have removed it
        model.save(path)
        if not chief:
            _remove(path)

    # ------------------------------------------------------------- the loop
    history = _read_history(_join(model_dir, HISTORY_CSV), start_epoch) if chief else []
    writers = (
        {
            "train": tf.summary.create_file_writer(_join(model_dir, "logs", "train")),
            "validation": tf.summary.create_file_writer(_join(model_dir, "logs", "validation")),
        }
        if chief
        else None
    )
    iterator = iter(train_ds)
    train_fn = None
    stage = None
    global_step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, config.epochs):
        new_stage = 1 if epoch < config.freeze_epochs else 2
        if new_stage != stage:
            classifier.set_backbone_trainable(model, new_stage == 2)
            train_fn = make_train_fn()  # trainable variables changed: retrace
            stage = new_stage
        epoch_start = time.time()
        progbar = (
            keras.utils.Progbar(steps_per_epoch, stateful_metrics=["loss", "accuracy"])
            if config.verbose == 1 and chief
            else None
        )
        if progbar is not None:
            print(
                f"Epoch {epoch + 1}/{config.epochs}" + (" (backbone frozen)" if stage == 1 else "")
            )
        totals = np.zeros(3)
        done = 0
        while done < steps_per_epoch:
            n = min(config.steps_per_execution, steps_per_epoch - done)
            chunk = train_fn(iterator, tf.constant(n, tf.int32)).numpy()
            totals += chunk
            done += n
            global_step += n
            if not np.isfinite(chunk[0]):
                raise FloatingPointError(
                    f"training loss became {chunk[0]} at step {global_step} (epoch {epoch + 1}); "
                    f"lower --learning_rate (now {config.learning_rate}) or check the data. "
                    f"The last good checkpoint is in {_join(model_dir, BACKUP_DIR)}"
                )
            if progbar is not None:
                progbar.update(
                    done, [("loss", totals[0] / totals[2]), ("accuracy", totals[1] / totals[2])]
                )
        logs = {
            "epoch": epoch,
            "lr": float(schedule(max(global_step - 1, 0))),
            "loss": float(totals[0] / totals[2]),
            "accuracy": float(totals[1] / totals[2]),
        }
        # Validation and the saved models use the EMA weights (also without validation).
        if config.ema:
            _swap_ema_weights(optimizer, batchnorm_ema)
        if val_ds is not None:
            logs.update(evaluate())
        logs["epoch_time_s"] = time.time() - epoch_start
        value = logs.get(
            config.monitor, -logs["loss"] if config.monitor != "val_loss" else logs["loss"]
        )
        improved = _better(config.monitor, float(value), float(best_var.numpy()))
        if improved:
            best_var.assign(float(value))
            best_epoch_var.assign(epoch)
            waited_var.assign(0)
            save_model(BEST_MODEL)
        else:
            waited_var.assign_add(1)
        save_model(LAST_MODEL)
        if config.ema:
            _swap_ema_weights(optimizer, batchnorm_ema)
        epoch_var.assign(epoch + 1)
        manager.save(checkpoint_number=epoch + 1)
        if not chief:
            _remove(_join(write_dir, BACKUP_DIR))
        if chief:
            history.append(logs)
            _write_history(_join(model_dir, HISTORY_CSV), history)
            for key, val in logs.items():
                if key == "epoch":
                    continue
                split = "validation" if key.startswith("val_") else "train"
                with writers[split].as_default(step=epoch + 1):
                    tf.summary.scalar(key.removeprefix("val_"), val)
        if config.verbose and chief:
            print(
                f"epoch {epoch + 1}/{config.epochs}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in logs.items() if k != "epoch")
                + (" *" if improved else "")
            )
        for callback in callbacks:
            callback(epoch, logs)
        if (
            config.early_stopping_patience
            and int(waited_var.numpy()) >= config.early_stopping_patience
        ):
            # Every worker computed the same validation metrics: all stop here.
            print(
                f"Early stopping: {config.monitor} did not improve for "
                f"{config.early_stopping_patience} epochs."
            )
            break

    best_epoch = int(best_epoch_var.numpy())
    best_row = next((r for r in history if r["epoch"] == best_epoch), {})
    result = TrainResult(
        model_dir=model_dir,
        best_model_path=_join(model_dir, BEST_MODEL),
        best_epoch=best_epoch,
        best_metrics={k: v for k, v in best_row.items() if k.startswith("val_")},
        history=history,
        class_names=class_names,
        wall_time_s=time.time() - start_time,
    )
    if chief:
        summary = dataclasses.asdict(result)
        summary.update(
            precision=precision,
            strategy=type(strategy).__name__,
            num_replicas=num_replicas,
            steps_per_epoch=steps_per_epoch,
            num_train_examples=num_train,
        )
        _write_text(_join(model_dir, SUMMARY), json.dumps(summary, indent=2) + "\n")
        _remove(_join(model_dir, BACKUP_DIR))
    else:
        distribute.remove_worker_dir(model_dir, write_dir)
    return result
