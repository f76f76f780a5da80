"""Fits a head on stored features and writes an ordinary run directory.

``python -m leukemia_tf.train --from_embeddings=DIR [--probe=linear|mlp|knn]``
(or :func:`leukemia_tf.training.train_lib.train` with ``config.from_embeddings``)
lands here. The classifier is built as for any run
(:func:`leukemia_tf.training.model_factory.build_model`, float32) with the
store's backbone weights (``DIR/backbone.weights.h5``, checked against the
store's sha256); only its ``head`` layer is fitted, on the stored features
in memory:

* ``linear``: the run's ``--head`` (flat or hierarchical) with
  ``--hidden_units=0``; ``mlp``: the same head with ``--hidden_units`` > 0.
  The loss, label smoothing, level weights, class weighting, AdamW with
  warm-up and cosine decay, gradient clipping, ``--epochs``,
  ``--steps_per_epoch``, ``--batch_size``, ``--monitor`` (the best epoch, on the
  validation split) and ``--early_stopping_patience`` are those of ordinary
  training; a mixture's weights weigh each data set's examples in the loss
  (ordinary training samples by them).
* ``knn``: a :class:`~leukemia_tf.models.knn.KNNHead` whose bank is the
  training features; nothing is trained (one history row, on validation).

Flags that act on images or on the backbone (augmentation, MixUp / CutMix,
acquisition shifts, marks drawn, ``--freeze_epochs``, ``--ema``,
``--bn_momentum``, ``--drop_path_rate``) have no effect: the features were
computed once, without augmentation, by the frozen backbone. The summary lists
those that were set (``not_applied``).

The run directory holds what an ordinary run's does (``config.json``,
``flags.txt``, ``labels.txt``, ``best.keras`` and ``last.keras``, the full
image classifier, ``history.csv``, ``train_summary.json`` and the trust
statistics, fitted on the stored features) but no ``backup/`` or ``logs/``:
a probe takes seconds, so an unfinished one starts afresh. ``config.json``
keeps ``from_embeddings`` and the summary the store's fingerprint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Collection

import keras
import numpy as np
import tensorflow as tf

from leukemia_tf import rundir
from leukemia_tf.embedding import store as store_lib
from leukemia_tf.embedding.store import FeatureStore, SplitFeatures, StoreError
from leukemia_tf.evaluation import metrics
from leukemia_tf.models import classifier
from leukemia_tf.models import trust as trust_model
from leukemia_tf.models.label_space import LabelSpace
from leukemia_tf.training import config as config_lib
from leukemia_tf.training import model_factory, run_state, steps
from leukemia_tf.training.config import ConfigError, TrainConfig

#: The TrainConfig fields a feature store fixes; a probe run that does not
#: give them takes the store's values.
STORE_FIELDS = (
    "backbone",
    "weights",
    "image_size",
    "datasets",
    "label_mode",
    "taxonomy",
    "erase_marks",
    "white_balance",
    "stain_norm",
    "cell_crop",
    "data_dir",
)

#: Fields that act on images or the backbone, which a probe never runs.
NOT_APPLIED = (
    "augment_magnitude",
    "crop_scale_min",
    "acquisition_shifts",
    "mixup_alpha",
    "cutmix_alpha",
    "augment_marks",
    "freeze_epochs",
    "ema",
    "bn_momentum",
    "drop_path_rate",
    "cache",
    "xla",
)

#: Features per forward pass of the head when validating or fitting trust.
_EVAL_BATCH = 4096


def store_values(store: FeatureStore) -> dict:
    """The :data:`STORE_FIELDS` values a store was embedded with."""
    backbone = store.backbone
    return {
        "backbone": backbone["name"],
        "weights": backbone["weights"],
        "image_size": int(backbone["image_size"]),
        "datasets": store.meta["datasets"],
        "label_mode": store.meta["label_mode"],
        "taxonomy": (store.meta.get("taxonomy") or {}).get("file", ""),
        "erase_marks": bool(backbone["erase_marks"]),
        # stores written before these layers existed had neither
        "white_balance": bool(backbone.get("white_balance", False)),
        "stain_norm": bool(backbone.get("stain_norm", False)),
        "cell_crop": bool(backbone.get("cell_crop", False)),
        "data_dir": store.meta.get("data_dir", ""),
    }


def resolve_config(config: TrainConfig, given: Collection[str]) -> TrainConfig:
    """``config`` with every :data:`STORE_FIELDS` field not in ``given`` set to the store's.

    Args:
      config: from the flags; ``config.from_embeddings`` names the store.
      given: the flags set on the command line or in a flagfile.

    Raises:
      StoreError: the store is missing or incomplete.
    """
    if not config.from_embeddings:
        return config
    store = store_lib.open_store(config.from_embeddings)
    values = store_values(store)
    return dataclasses.replace(config, **{k: v for k, v in values.items() if k not in given})


def _same_path(a: str, b: str) -> bool:
    def norm(p: str) -> str:
        return os.path.abspath(os.path.expanduser(p))

    return a == b or (bool(a) and bool(b) and norm(a) == norm(b))


def check_config(config: TrainConfig) -> FeatureStore:
    """Opens the store of ``config.from_embeddings`` and refuses one that does not fit.

    Every field of :data:`STORE_FIELDS` but ``data_dir`` must equal the
    store's (data sets: the names, in order; mixture weights may be given),
    the splits must be stored ones, and ``--knn_k`` at most the training
    split's size.

    Raises:
      StoreError: naming every mismatch, with the store's value.
    """
    store = store_lib.open_store(config.from_embeddings)
    stored = store_values(store)
    ours = config.to_dict()
    mismatches = []
    for name in STORE_FIELDS:
        if name == "data_dir":
            continue
        mine, theirs = ours[name], stored[name]
        if name == "datasets":
            same = store_lib.dataset_names(mine) == store_lib.dataset_names(theirs)
        elif name in ("weights", "taxonomy"):
            same = _same_path(mine, theirs) or (
                name == "weights" and _same_path(mine, store.backbone.get("weights_path") or "")
            )
        else:
            same = mine == theirs
        if not same:
            mismatches.append(f"--{name}={mine!r} (the store: {theirs!r})")
    if mismatches:
        raise StoreError(
            f"--from_embeddings={config.from_embeddings!r} was embedded with other settings than "
            f"this run asks for: {', '.join(mismatches)}. Leave these flags out to take the "
            "store's values, or embed again with python -m leukemia_tf.embed"
        )
    store.check_split(config.train_split, "train_split")
    if config.val_split:
        store.check_split(config.val_split, "val_split")
    if config.probe == "knn":
        size = sum(store.count(p) for p in store_lib.split_parts(config.train_split, ""))
        if config.knn_k > size:
            raise StoreError(
                f"--knn_k={config.knn_k}: larger than the {size} stored training features "
                f"of --train_split={config.train_split!r}"
            )
    return store


def _not_applied(config: TrainConfig) -> list[str]:
    defaults = TrainConfig()
    return [
        f"--{name}={getattr(config, name)!r}"
        for name in NOT_APPLIED
        if getattr(config, name) != getattr(defaults, name)
    ]


def _example_weights(config: TrainConfig, train: SplitFeatures, num_classes: int) -> np.ndarray:
    """Per-example loss weights: class weighting times the mixture's data set weights."""
    counts = np.bincount(train.label, minlength=num_classes).astype(np.float64)
    n = len(train)
    if config.class_weighting == "balanced":
        with np.errstate(divide="ignore"):
            per_class = np.where(counts > 0, n / (len(counts) * counts), 0.0)
    else:
        per_class = np.ones(num_classes)
    weights = per_class[train.label]
    specs = _specs(config)
    spec_weights = np.array([s.weight for s in specs], np.float64)
    if not np.allclose(spec_weights, spec_weights[0]):
        # Ordinary training samples data set i with probability w_i / W: the
        # same expected loss weighs each of its n_i examples (w_i / W) / (n_i / n).
        per_set = np.bincount(train.dataset, minlength=len(specs)).astype(np.float64)
        share = spec_weights / spec_weights.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.where(per_set > 0, share / (per_set / n), 0.0)
        weights = weights * factor[train.dataset]
    return weights.astype(np.float32)


def _specs(config: TrainConfig):
    from leukemia_tf.data.names import parse_datasets

    return parse_datasets(config.datasets)


def _index_stream(n: int, batch_size: int, seed: int):
    """Batches of indices: shuffled passes over ``n`` examples, one after the other."""
    rng = np.random.default_rng(seed)
    pending = np.zeros(0, np.int64)
    while True:
        while len(pending) < batch_size:
            pending = np.concatenate([pending, rng.permutation(n)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


class _Head:
    """The classifier's head as a model of the features (shares its weights)."""

    def __init__(self, model: keras.Model, dim: int, head: str):
        self.layer = model.get_layer("head")
        inputs = keras.Input((dim,), dtype="float32", name="features")
        outputs = self.layer(inputs)
        if head == "flat":
            outputs = {"logits": outputs}
        self.model = keras.Model(inputs, outputs, name="probe_head")

    def outputs(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """The head's outputs (numpy) for stored features, in large batches."""
        chunks = []
        for start in range(0, len(features), _EVAL_BATCH):
            batch = tf.constant(features[start : start + _EVAL_BATCH])
            chunks.append({k: v.numpy() for k, v in self.model(batch, training=False).items()})
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _validate(head: _Head, data: SplitFeatures, space: LabelSpace, level_weights) -> dict:
    """``val_*`` metrics and ``val_loss``, as the ordinary validation computes them."""
    outputs = head.outputs(data.features)
    probs = space.probabilities(outputs).numpy()
    batch = {"label": tf.constant(data.label, tf.int32)}
    if data.levels is not None:
        batch["levels"] = tf.constant(data.levels, tf.int32)
    loss = space.loss(space.targets(batch), outputs, 0.0, level_weights).numpy()
    out = metrics.decision_metrics(data.label, probs.argmax(axis=-1), space.num_classes)
    out["loss"] = float(np.mean(loss))
    return {f"val_{k}": v for k, v in out.items()}


def _monitored(config: TrainConfig, logs: dict) -> float:
    # As RunState.update_best: without validation, the training loss.
    if config.monitor in logs:
        return float(logs[config.monitor])
    return float(logs["loss"] if config.monitor == "val_loss" else -logs["loss"])


def _fit_gradient(
    config: TrainConfig,
    head: _Head,
    space: LabelSpace,
    train: SplitFeatures,
    val: SplitFeatures | None,
    level_weights,
    log,
) -> tuple[list[dict], int, list, list, int]:
    """The epoch loop of a linear or MLP probe.

    Returns:
      ``(history, best_epoch, best_weights, last_weights, steps_per_epoch)``.
    """
    from leukemia_tf.training import train_lib

    n = len(train)
    if n < config.batch_size:
        raise ConfigError(
            f"--batch_size={config.batch_size} is larger than the stored training split "
            f"({n} examples)"
        )
    steps_per_epoch = config.steps_per_epoch or max(n // config.batch_size, 1)
    optimizer, schedule, _ = steps.build_optimizer(
        dataclasses.replace(config, freeze_epochs=0, ema=False), steps_per_epoch, "float32", 1
    )
    variables = head.layer.trainable_variables
    optimizer.build(variables)
    weights = _example_weights(config, train, space.num_classes)
    levels = train.levels if train.levels is not None else np.zeros((n, 1), np.int64)
    smoothing = config.label_smoothing

    @tf.function(reduce_retracing=True)
    def step(features, label, level_targets, example_weights):
        targets = space.targets({"label": label, "levels": level_targets})
        with tf.GradientTape() as tape:
            outputs = head.model(features, training=True)
            per_example = space.loss(targets, outputs, smoothing, level_weights)
            loss = tf.reduce_sum(per_example * example_weights) / config.batch_size
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        probs = space.probabilities(outputs)
        correct = tf.reduce_sum(
            tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), label), tf.float32)
        )
        return tf.reduce_sum(per_example), correct

    batches = _index_stream(n, config.batch_size, config.seed)
    history: list[dict] = []
    best_value, best_epoch, waited = math.nan, 0, 0
    best_weights = [w.copy() for w in head.layer.get_weights()]
    global_step = 0
    for epoch in range(config.epochs):
        epoch_start = time.time()
        loss_sum = correct_sum = seen = 0.0
        for _ in range(steps_per_epoch):
            idx = next(batches)
            loss, correct = step(
                tf.constant(train.features[idx]),
                tf.constant(train.label[idx], tf.int32),
                tf.constant(levels[idx], tf.int32),
                tf.constant(weights[idx]),
            )
            loss_sum += float(loss)
            correct_sum += float(correct)
            seen += len(idx)
            global_step += 1
        logs = {
            "epoch": epoch,
            "lr": float(schedule(max(global_step - 1, 0))),
            "loss": loss_sum / seen,
            "accuracy": correct_sum / seen,
        }
        if val is not None:
            logs.update(_validate(head, val, space, level_weights))
        logs["epoch_time_s"] = time.time() - epoch_start
        bad = [f"{k}={v}" for k, v in logs.items() if not np.isfinite(v)]
        if bad:
            raise train_lib.NonFiniteError(
                f"epoch {epoch + 1} of the probe ended with non-finite values: {', '.join(bad)}; "
                f"lower --learning_rate (now {config.learning_rate})"
            )
        history.append(logs)
        value = _monitored(config, logs)
        improved = run_state.better(config.monitor, value, best_value)
        if improved:
            best_value, best_epoch, waited = value, epoch, 0
            best_weights = [w.copy() for w in head.layer.get_weights()]
        else:
            waited += 1
        if config.verbose:
            log(
                f"epoch {epoch + 1}/{config.epochs}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in logs.items() if k != "epoch")
                + (" *" if improved else "")
            )
        patience = config.early_stopping_patience
        if patience and waited >= patience:
            log(f"Early stopping: {config.monitor} did not improve for {patience} epochs.")
            break
    return history, best_epoch, best_weights, head.layer.get_weights(), steps_per_epoch


def _fit_knn(
    head: _Head, space: LabelSpace, train: SplitFeatures, val: SplitFeatures | None, level_weights
) -> list[dict]:
    """Fills the k-NN head's bank; one history row (training and validation scores)."""
    start = time.time()
    head.layer.set_bank(train.features, train.label)
    probs = space.probabilities(head.outputs(train.features)).numpy()
    picked = np.clip(probs[np.arange(len(train)), train.label], 1e-12, 1.0)
    logs = {
        "epoch": 0,
        "lr": 0.0,
        # On the bank itself: every example is its own nearest neighbour.
        "loss": float(-np.mean(np.log(picked))),
        "accuracy": float(np.mean(probs.argmax(axis=-1) == train.label)),
    }
    if val is not None:
        logs.update(_validate(head, val, space, level_weights))
    logs["epoch_time_s"] = time.time() - start
    return [logs]


def _prepare_model_dir(config: TrainConfig) -> str:
    config_lib.check_model_dir(config)
    model_dir = rundir.expand(config.model_dir)
    if not config.overwrite and run_state.peek_progress(model_dir) != (0, 0):
        raise ConfigError(
            f"--model_dir={config.model_dir!r} holds an unfinished training run (its backup/); "
            "choose another directory, or pass --overwrite to replace it with the probe"
        )
    rundir.remove_partial_writes(model_dir)
    for name in (
        *rundir.RUN_OUTPUTS,
        trust_model.TRUST_FILE,
        trust_model.FEATURES_FILE,
        rundir.CALIBRATION_FILE,
    ):
        rundir.remove(rundir.join(model_dir, name))
    return model_dir


def train_probe(config: TrainConfig, fit_trust: bool = True, log=print):
    """Fits the probe ``config`` describes on its feature store; writes a run directory.

    Args:
      config: a training config with ``from_embeddings`` (validated here).
      fit_trust: fit the trust statistics on the stored features (training
        split, and the validation split for the thresholds), as ordinary
        training does at its end.
      log: called with each line of progress.

    Returns:
      A :class:`leukemia_tf.training.train_lib.TrainResult`.

    Raises:
      ConfigError: a bad setting (naming the flag), a finished ``model_dir``
        without ``--overwrite``, or one locked by another process.
      StoreError: the store is missing, incomplete or does not fit ``config``.
      NonFiniteError: the loss or a validation metric became non-finite.
    """
    from leukemia_tf.training import train_lib

    if not config.from_embeddings:
        raise ConfigError("--from_embeddings: no feature store given")
    config.validate()
    store = check_config(config)
    start_time = time.time()
    model_dir = rundir.expand(config.model_dir)
    new_dir = not tf.io.gfile.exists(model_dir)
    config_lib.check_model_dir(config)  # a finished run without --overwrite
    lock = rundir.RunLock(model_dir)
    lock.acquire()
    try:
        _prepare_model_dir(config)
        result = _train(config, store, model_dir, start_time, log, train_lib)
        if fit_trust:
            _fit_trust(config, store, model_dir, log)
        return result
    except BaseException:
        lock.release()
        if new_dir and tf.io.gfile.exists(model_dir) and not tf.io.gfile.listdir(model_dir):
            rundir.remove(model_dir)
        raise
    finally:
        lock.release()


def _load_splits(config: TrainConfig, store: FeatureStore):
    train = store.load(config.train_split, "train_split")
    val = store.load(config.val_split, "val_split") if config.val_split else None
    if val is not None and len(val) == 0:
        raise ConfigError(f"--val_split={config.val_split!r} is empty in the feature store")
    return train, val


def _train(config: TrainConfig, store: FeatureStore, model_dir: str, start_time, log, train_lib):
    keras.utils.set_random_seed(config.seed)
    taxonomy = model_factory.taxonomy_for(config)
    class_names = store.class_names
    space = LabelSpace(class_names, config.head, taxonomy)
    level_weights = config.level_weights_for(taxonomy)
    train, val = _load_splits(config, store)
    if config.head == "hierarchical" and train.levels is None:
        raise StoreError(
            f"--head=hierarchical needs the taxonomy levels: the store {store.path} was embedded "
            "with --label_mode=native"
        )
    knn = config.probe == "knn"
    with model_factory.float32_policy():
        model = model_factory.build_model(
            config,
            len(class_names),
            taxonomy,
            weights=store.backbone_weights,
            knn_bank_size=len(train) if knn else 0,
        )
    backbone = classifier.get_backbone(model)
    digest = store_lib.weights_fingerprint(
        backbone.get_weights(), [v.path for v in backbone.weights]
    )
    if digest != store.backbone["sha256"]:
        raise StoreError(
            f"{store.backbone_weights} does not hold the weights that were embedded (sha256 "
            f"{digest[:12]}..., {store_lib.STORE_FILE} says {store.backbone['sha256'][:12]}...)"
        )
    head = _Head(model, int(store.backbone["feature_dim"]), config.head)
    log(
        f"Probe {config.probe} ({config.head} head) on {len(train)} stored features of "
        f"{config.train_split!r}"
        + (f", validating on {len(val)} of {config.val_split!r}" if val is not None else "")
        + f" ({store.path})"
    )
    if knn:
        history = _fit_knn(head, space, train, val, level_weights)
        best_epoch, steps_per_epoch = 0, 0
        best_weights = last_weights = head.layer.get_weights()
    else:
        history, best_epoch, best_weights, last_weights, steps_per_epoch = _fit_gradient(
            config, head, space, train, val, level_weights, log
        )
    tf.io.gfile.makedirs(model_dir)
    rundir.write_config(model_dir, config)
    rundir.write_labels(model_dir, class_names)
    head.layer.set_weights(last_weights)
    rundir.save_keras(model, rundir.join(model_dir, rundir.LAST_MODEL))
    head.layer.set_weights(best_weights)
    rundir.save_keras(model, rundir.join(model_dir, rundir.BEST_MODEL))
    rundir.write_history(model_dir, history)
    best_row = history[best_epoch]
    result = train_lib.TrainResult(
        model_dir=model_dir,
        best_model_path=rundir.join(model_dir, rundir.BEST_MODEL),
        best_epoch=best_epoch,
        best_metrics={k: v for k, v in best_row.items() if k.startswith("val_")},
        history=history,
        class_names=class_names,
        wall_time_s=time.time() - start_time,
    )
    summary = dataclasses.asdict(result)
    del summary["finished"]
    summary.update(
        precision="float32",
        strategy="none (stored features, in memory)",
        num_replicas=1,
        steps_per_epoch=steps_per_epoch,
        num_train_examples=len(train),
        from_embeddings={
            "dir": os.path.abspath(store.path),
            "embedding_json_sha256": store_lib.file_sha256(
                os.path.join(store.path, store_lib.STORE_FILE)
            ),
            "backbone": store.backbone,
            "created": store.meta.get("created"),
            "probe": config.probe,
            "knn_k": config.knn_k if knn else None,
            "hidden_units": config.hidden_units,
        },
        not_applied=_not_applied(config),
    )
    rundir.write_json(rundir.join(model_dir, rundir.SUMMARY), summary)
    return result


def _fit_trust(config: TrainConfig, store: FeatureStore, model_dir: str, log) -> None:
    """The trust statistics of the finished probe, from the stored features."""
    from leukemia_tf import trust_lib
    from leukemia_tf.evaluation.predictions import SplitPredictions

    trained = rundir.load_trained_model(model_dir, which="best", float32=True, trust=False)
    head = _Head(trained.model, int(store.backbone["feature_dim"]), config.head)
    train, val = _load_splits(config, store)

    def predictions(data: SplitFeatures) -> SplitPredictions:
        return SplitPredictions(
            outputs={**head.outputs(data.features), trust_model.FEATURES: data.features},
            labels=data.label,
            levels=data.levels,
            patient_id=data.patient_id,
            slide_id=data.slide_id,
            source=data.source,
            file_name=data.file_name,
        )

    stats = trust_lib.fit_from_predictions(
        model_dir,
        trained,
        predictions(train),
        predictions(val) if val is not None else None,
        fit_split=config.train_split,
        calibration_split=config.val_split or None,
        record={"data_dir": config.data_dir, "from_embeddings": os.path.abspath(store.path)},
    )
    log(trust_lib.summary(model_dir, stats))
