"""The training and evaluation steps: what runs on every replica, and the functions around them.

:class:`TrainStep` is one replica's forward and backward pass (augmentation on
the accelerator, MixUp/CutMix, class weights, the label space's loss), the
cross-replica update (gradient clipping of the all-reduced gradient, the
optimizer, the EMA of the BatchNorm statistics), and the ``tf.function`` that
runs ``steps_per_execution`` of them per host call, with optional XLA.
:func:`build_optimizer` makes AdamW with warm-up and cosine decay (and loss
scaling for float16); :class:`Evaluator` runs the validation split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from leukemia_tf.evaluation import metrics
from leukemia_tf.models import augment
from leukemia_tf.models.label_space import LabelSpace
from leukemia_tf.training import ema, schedules
from leukemia_tf.training.config import TrainConfig
from leukemia_tf.training.inputs import VALID


def build_optimizer(
    config: TrainConfig, steps_per_epoch: int, precision: str, num_replicas: int
) -> tuple[keras.optimizers.Optimizer, schedules.TwoStageWarmupCosine, bool]:
    """AdamW with warm-up and cosine decay, as ``config`` says (call under the strategy's scope).

    Returns:
      ``(optimizer, schedule, clip_in_step)``: ``clip_in_step`` is True when the
      step clips the all-reduced gradient itself (:func:`clip_across_replicas`).
    """
    schedule = schedules.TwoStageWarmupCosine(
        peak_lr=config.learning_rate,
        total_steps=steps_per_epoch * config.epochs,
        warmup_steps=int(config.warmup_epochs * steps_per_epoch),
        min_ratio=config.min_lr_ratio,
        stage1_steps=steps_per_epoch * config.freeze_epochs,
        stage2_factor=config.finetune_lr_factor,
    )
    # Keras clips gradients before it all-reduces them across replicas,
    # i.e. each replica's partial gradient separately; with several
    # replicas the step clips the all-reduced gradient itself instead.
    clip_in_step = bool(config.clipnorm) and num_replicas > 1
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
    return optimizer, schedule, clip_in_step


def clip_across_replicas(grads, clipnorm: float, optimizer, num_replicas: int) -> list:
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


@dataclasses.dataclass
class TrainStep:
    """One training step on every replica, and the function that runs several per call.

    A step's statistics are ``[sum of per-example losses, correct, examples]``
    summed over the replicas.
    """

    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    space: LabelSpace
    config: TrainConfig
    class_weights: tf.Tensor
    level_weights: Sequence[float] | None
    augmenter: Callable | None = None
    clip_in_step: bool = False
    batchnorm_ema: Sequence = ()
    #: Draws the MixUp/CutMix seeds (with --mixup_alpha or --cutmix_alpha).
    mix_seed: keras.random.SeedGenerator | None = None

    def gradients(self, batch: dict):
        """Augmentation, forward and backward pass of one replica: no cross-replica sync."""
        config, space, model = self.config, self.space, self.model
        labels = tf.cast(batch["label"], tf.int32)
        images = tf.cast(batch["image"], tf.float32)
        targets = space.targets(batch)
        weights = tf.gather(self.class_weights, labels)
        if self.augmenter is not None:
            images = self.augmenter(images, training=True)
        mixup, cutmix = config.mixup_alpha, config.cutmix_alpha
        if mixup > 0 or cutmix > 0:
            # Seeds from a checkpointed generator: a resumed run draws what an
            # uninterrupted one would.
            seed = tf.cast(self.mix_seed.next(), tf.int32)
            fold = tf.random.experimental.stateless_fold_in
            use_cutmix = (
                tf.random.stateless_uniform([], fold(seed, 0)) < 0.5
                if mixup > 0 and cutmix > 0
                else tf.constant(cutmix > 0)
            )
            images, targets = tf.cond(
                use_cutmix,
                lambda: augment.cutmix(images, targets, cutmix or 1.0, seed=fold(seed, 1)),
                lambda: augment.mixup(images, targets, mixup or 1.0, seed=fold(seed, 2)),
            )
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            per_example = space.loss(targets, outputs, config.label_smoothing, self.level_weights)
            loss = tf.nn.compute_average_loss(
                per_example * weights, global_batch_size=config.batch_size
            )
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        probs = space.probabilities(outputs)
        correct = tf.reduce_sum(
            tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), labels), tf.float32)
        )
        stats = tf.stack(
            [tf.reduce_sum(per_example), correct, tf.cast(tf.shape(labels)[0], tf.float32)]
        )
        return grads, stats

    def apply(self, grads) -> None:
        """The cross-replica part: gradient clipping and the all-reduced update."""
        optimizer = self.optimizer
        if self.clip_in_step:
            grads = clip_across_replicas(
                grads, self.config.clipnorm, optimizer, self.strategy.num_replicas_in_sync
            )
        # As Keras' EMA of the weights: the first step copies, later ones average.
        first_step = tf.equal(optimizer.iterations, 0)
        optimizer.apply_gradients(zip(grads, self.model.trainable_variables, strict=True))
        if self.batchnorm_ema:
            momentum = tf.where(first_step, 0.0, self.config.ema_momentum)
            ema.update_batchnorm(self.batchnorm_ema, momentum)

    def step(self, batch: dict) -> tf.Tensor:
        grads, stats = self.gradients(batch)
        self.apply(grads)
        return stats

    def function(self) -> Callable[[object, int], tf.Tensor]:
        """``fn(iterator, num_steps) -> summed statistics``; make a new one when the
        trainable variables change (a traced function keeps the old list)."""
        strategy, num_replicas = self.strategy, self.strategy.num_replicas_in_sync
        # A TPU compiles everything with XLA already: --xla is for GPUs and CPUs.
        if not self.config.xla or isinstance(strategy, tf.distribute.TPUStrategy):
            step = self.step
        elif num_replicas == 1:
            step = tf.function(self.step, jit_compile=True)  # the update is compiled too
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
                    compiled[device] = tf.function(self.gradients, jit_compile=True)
                grads, stats = compiled[device](batch)
                self.apply(grads)
                return stats

        @tf.function
        def several(iterator, num_steps):
            totals = tf.zeros([3])
            for _ in tf.range(num_steps):
                out = strategy.run(step, args=(next(iterator),))
                totals += strategy.reduce(tf.distribute.ReduceOp.SUM, out, axis=None)
            return totals

        @tf.function
        def one(iterator):
            out = strategy.run(step, args=(next(iterator),))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, out, axis=None)

        def train_fn(iterator, num_steps: int) -> tf.Tensor:
            # A single step runs without the while loop around it, as Model.fit
            # does with steps_per_execution=1.
            if num_steps == 1:
                return one(iterator)
            return several(iterator, tf.constant(num_steps, tf.int32))

        return train_fn


class Evaluator:
    """Validation: the model's probabilities, labels and losses over a padded, distributed split."""

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        model: keras.Model,
        space: LabelSpace,
        level_weights: Sequence[float] | None,
    ):
        self.num_classes = space.num_classes

        @tf.function
        def eval_fn(batch):
            def replica(b):
                outputs = model(tf.cast(b["image"], tf.float32), training=False)
                probs = space.probabilities(outputs)
                loss = space.loss(space.targets(b), outputs, 0.0, level_weights)
                return probs, tf.cast(b["label"], tf.int32), loss, b[VALID]

            out = strategy.run(replica, args=(batch,))
            return tuple(strategy.gather(x, axis=0) for x in out)

        self._eval_fn = eval_fn

    def __call__(self, dataset, num_examples: int, split: str) -> dict:
        """``val_*`` metrics and ``val_loss`` over ``dataset`` (``num_examples`` real examples)."""
        probs, labels, losses = [], [], []
        for batch in dataset:
            p, y, loss, valid = (x.numpy() for x in self._eval_fn(batch))
            keep = valid.astype(bool)  # drop the padding
            probs.append(p[keep])
            labels.append(y[keep])
            losses.append(loss[keep])
        probs_np, labels_np = np.concatenate(probs), np.concatenate(labels)
        if len(labels_np) != num_examples:
            raise RuntimeError(
                f"validation saw {len(labels_np)} examples of --val_split={split!r}, "
                f"expected {num_examples}"
            )
        out = metrics.decision_metrics(labels_np, probs_np.argmax(axis=-1), self.num_classes)
        out["loss"] = float(np.mean(np.concatenate(losses)))
        return {f"val_{k}": v for k, v in out.items()}
