r"""The package's training loop against Keras ``Model.fit``: images/s on the same model and data.

The package trains with its own ``strategy.run`` loop (``train(config,
callbacks)`` in :mod:`leukemia_tf.training.train_lib`) because
``Model.fit`` fails under ``MultiWorkerMirroredStrategy``. This tool measures
what the loop costs or saves against ``fit`` where ``fit`` does work, per
strategy, in ONE process:

* ``loop``: ``train(config, callbacks=[timer])``; the timer reads each
  epoch's ``epoch_time_s`` (the epoch's training steps only: validation and
  the EMA swap are off, and the checkpoint and model saving come after it).
* ``fit``: the same model (``model_factory.build_model`` on the same config),
  compiled with the same optimizer (AdamW, the loop's warm-up + cosine
  schedule, weight decay without norms and biases, gradient clipping at the
  recipe's norm: with several replicas the loop clips the all-reduced
  gradient and Keras each replica's, the same arithmetic per step), the
  same loss (softmax cross-entropy of the flat head on one-hot targets, the
  same label smoothing), the same ``steps_per_execution`` and XLA setting,
  and fed by the loop's own training input function
  (``train_input_fn`` through ``distribute_datasets_from_function``: the same
  shards, per-replica batches, cache and shuffle). A Keras callback times
  each epoch.

Both get the same global batch, precision, strategy and augmentation: the
loop's on-device augmenter (flips, 90-degree rotations, resized crop, colour
jitter at the recipe's magnitude), which the ``fit`` model applies as its
first layer on the float32 pixels, as the loop's step does. What ``fit`` has
no plain counterpart for is switched off in BOTH: the EMA of the weights
(the loop swaps the averages in inside its timed epoch), MixUp/CutMix, class
weights and validation. The head is flat and the labels native.

Steps per execution: 1 by default, in both. With more, Keras 3.15's ``fit``
fails under the two-device ``MirroredStrategy`` on this model, with and
without augmentation ("You must feed a value for placeholder tensor
'.../while/cond/Placeholder_1'", from the ``tf.while_loop`` that runs several
steps per call; the error of keras-team/keras#19246), whether it is given
the loop's ``distribute_datasets_from_function`` input or a plain
``tf.data.Dataset``. Under the default strategy ``fit`` runs with any
``--steps_per_execution``; a method that fails is reported in the table
with its error instead of a figure.

Strategies: ``default`` (one device) and ``mirrored`` (``MirroredStrategy``
over two logical CPU devices: the CPU is split before TensorFlow
initialises, so both strategies run in that configuration; the two logical
devices share the same cores and thread pools). Each run measures every
(strategy, method) pair once, alternating which method goes first, so that
machine noise hits both. The first epoch of every measurement (tracing,
compilation, filling the input cache) is not timed; images/s is the median
of the later epochs. Reported: the median over runs of images/s and of the
within-run ratio loop / fit, with its range.

A CPU benchmark: GPUs are hidden unless ``CUDA_VISIBLE_DEVICES`` is set.
The data: the built-in synthetic set ``leukemia_synthetic`` (built into
``--data_dir`` on first use), so the tool runs anywhere; the figures are
about the training step, not about accuracy.

Run from the repository root (recipes include ``configs/base_*.flags`` by a
path relative to the working directory)::

  python tools/bench_loop_vs_fit.py --strategies=default,mirrored --epochs=4 \
      --image_size=64 --batch_size=32 --steps_per_epoch=20 --runs=3
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from absl import app, flags, logging

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

_RECIPE = flags.DEFINE_string(
    "recipe",
    "configs/cpu_pbc.flags",
    "Recipe whose model and optimizer settings both methods use (cnn_small from scratch); "
    "its data set, head and size are replaced as described in the module docstring.",
)
_STRATEGIES = flags.DEFINE_list(
    "strategies", ["default", "mirrored"], "default and/or mirrored (two logical CPU devices)."
)
_EPOCHS = flags.DEFINE_integer(
    "epochs", 4, "Epochs per measurement; the first is not timed.", lower_bound=2
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Input side in pixels.", lower_bound=16)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 32, "Global batch (split over the replicas).", lower_bound=2
)
_STEPS_PER_EPOCH = flags.DEFINE_integer("steps_per_epoch", 20, "Steps per epoch.", lower_bound=1)
_RUNS = flags.DEFINE_integer(
    "runs", 3, "Runs; each measures every (strategy, method) once.", lower_bound=1
)
_STEPS_PER_EXECUTION = flags.DEFINE_integer(
    "steps_per_execution",
    1,
    "Training steps per call of the compiled function, in both methods (must divide "
    "--steps_per_epoch). 1 by default: with more, Keras 3.15's fit fails under the two-device "
    "MirroredStrategy (see the module docstring).",
    lower_bound=1,
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "TFDS data_dir for leukemia_synthetic (default: TFDS's)."
)

METHODS = ("loop", "fit")
#: Logical CPU devices of the mirrored strategy.
MIRRORED_DEVICES = 2


def _split_cpu() -> None:
    """Two logical CPU devices, before anything initialises the TensorFlow runtime."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * MIRRORED_DEVICES
    )


def _training_modules():
    """``(module with train(config, callbacks), module with the input functions)``.

    The loop lives in ``train_lib`` and ``inputs``; code before the loop was
    split into parts (commit 7ec5d72 and older) had both in ``engine``, so the
    same tool measures a tree before and after that change.
    """
    try:
        from leukemia_tf.training import inputs, train_lib
    except ImportError:
        from leukemia_tf.training import engine

        return engine, engine
    return train_lib, inputs


def _train_fn():
    return _training_modules()[0].train


def bench_config(strategy: str, model_dir: str):
    """The recipe with what both methods share set, for one strategy."""
    from leukemia_tf.training import config as config_lib

    steps_per_epoch = _STEPS_PER_EPOCH.value
    recipe = config_lib.parse_flagfile(_RECIPE.value)
    config = dataclasses.replace(
        recipe,
        datasets="leukemia_synthetic",
        data_dir=_DATA_DIR.value,
        label_mode="native",
        head="flat",
        image_size=_IMAGE_SIZE.value,
        batch_size=_BATCH_SIZE.value,
        epochs=_EPOCHS.value,
        steps_per_epoch=steps_per_epoch,
        steps_per_execution=_STEPS_PER_EXECUTION.value,
        freeze_epochs=0,
        ema=False,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        class_weighting="none",
        val_split="",
        early_stopping_patience=0,
        strategy=strategy,
        model_dir=model_dir,
        overwrite=True,
        verbose=0,
    )
    return config.validate()


def measure_loop(config) -> list[float]:
    """Seconds of every epoch of ``train(config)``."""
    times: list[float] = []
    _train_fn()(config, callbacks=[lambda epoch, logs: times.append(logs["epoch_time_s"])])
    return times


def measure_fit(config) -> list[float]:
    """Seconds of every epoch of ``Model.fit`` on the same model, data and optimizer."""
    import keras
    import tensorflow as tf

    from leukemia_tf.data import pipeline
    from leukemia_tf.models import augment
    from leukemia_tf.models.label_space import LabelSpace
    from leukemia_tf.training import distribute, model_factory, schedules

    keras.utils.set_random_seed(config.seed)
    strategy = distribute.make_strategy(config.strategy, config.tpu)
    distribute.set_precision(distribute.resolve_precision(config.precision, strategy))
    taxonomy = model_factory.taxonomy_for(config)
    specs = pipeline.parse_datasets(config.datasets)
    data_dir = config.data_dir or None
    space = LabelSpace(
        pipeline.dataset_class_names(specs, data_dir, config.label_mode, taxonomy),
        config.head,
        taxonomy,
    )
    inputs = _training_modules()[1]
    image_dtype = inputs.input_image_dtype(strategy)
    loop_input = inputs.train_input_fn(config, specs, data_dir, taxonomy, image_dtype)

    def input_fn(ctx):
        # The loop's batches; the one-hot targets are what its step makes of the labels.
        return loop_input(ctx).map(
            lambda b: (b["image"], tf.one_hot(b["label"], space.num_classes)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    dataset = strategy.distribute_datasets_from_function(input_fn)
    steps_per_epoch = config.steps_per_epoch
    with strategy.scope():
        model = model_factory.build_model(config, space.num_classes, taxonomy)
        images = keras.Input((config.image_size, config.image_size, 3), dtype=image_dtype.name)
        pixels = keras.ops.cast(images, "float32")
        if config.augment:
            augmenter = augment.build_augmenter(
                config.image_size,
                magnitude=config.augment_magnitude,
                crop_scale=(config.crop_scale_min, 1.0),
                seed=config.seed,
            )
            pixels = augmenter(pixels)  # the identity unless fit's training=True
        wrapped = keras.Model(images, model(pixels)["logits"])
        optimizer = keras.optimizers.AdamW(
            learning_rate=schedules.TwoStageWarmupCosine(
                peak_lr=config.learning_rate,
                total_steps=steps_per_epoch * config.epochs,
                warmup_steps=int(config.warmup_epochs * steps_per_epoch),
                min_ratio=config.min_lr_ratio,
                stage1_steps=0,
                stage2_factor=config.finetune_lr_factor,
            ),
            weight_decay=config.weight_decay,
            global_clipnorm=config.clipnorm or None,
        )
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        wrapped.compile(
            optimizer=optimizer,
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=config.label_smoothing
            ),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            steps_per_execution=config.steps_per_execution,
            jit_compile=config.xla,
        )

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self._start)

    timer = EpochTimer()
    wrapped.fit(
        dataset,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=[timer],
        shuffle=False,  # the input function shuffles, as for the loop
        verbose=0,
    )
    return timer.times


def _prepare_data() -> None:
    """Builds leukemia_synthetic once, outside every timed run."""
    import tensorflow_datasets as tfds

    import tfds_builders  # noqa: F401  (registers the builders)
    from leukemia_tf.data import build_data_lib as build_lib

    data_dir = _DATA_DIR.value or None
    if not tfds.builder("leukemia_synthetic", data_dir=data_dir).is_prepared():
        print("Building leukemia_synthetic (first use) ...", flush=True)
        build_lib.build("leukemia_synthetic", data_dir=data_dir)


def _fmt_range(values: list[float], digits: int = 2) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = set(_STRATEGIES.value) - {"default", "mirrored"}
    if unknown or not _STRATEGIES.value:
        raise app.UsageError(f"--strategies: choose from default, mirrored (got {unknown})")
    if _BATCH_SIZE.value % MIRRORED_DEVICES and "mirrored" in _STRATEGIES.value:
        raise app.UsageError(f"--batch_size must be divisible by {MIRRORED_DEVICES}")
    if _STEPS_PER_EPOCH.value % _STEPS_PER_EXECUTION.value:
        # fit runs whole executions: a partial last one would time differently from the loop's.
        raise app.UsageError("--steps_per_execution must divide --steps_per_epoch")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # a CPU benchmark, also on a GPU machine
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.set_verbosity(logging.WARNING)
    if "mirrored" in _STRATEGIES.value:
        _split_cpu()

    import keras
    import tensorflow as tf

    _prepare_data()
    images_per_epoch = _BATCH_SIZE.value * _STEPS_PER_EPOCH.value
    # rates[strategy][method]: one median images/s per run; None where the method failed.
    rates = {s: {m: [] for m in METHODS} for s in _STRATEGIES.value}
    errors: dict[tuple[str, str], str] = {}
    measure = {"loop": measure_loop, "fit": measure_fit}
    with tempfile.TemporaryDirectory(prefix="bench_loop_vs_fit_") as tmp:
        for run in range(_RUNS.value):
            for k, strategy in enumerate(_STRATEGIES.value):
                # Alternate which method goes first, across runs and strategies.
                order = METHODS if (run + k) % 2 == 0 else METHODS[::-1]
                for method in order:
                    config = bench_config(strategy, os.path.join(tmp, f"{run}_{strategy}_{method}"))
                    try:
                        times = measure[method](config)
                    except Exception as e:  # noqa: BLE001 - report it in the table, measure the rest
                        traceback.print_exc()
                        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                        lines = [line.replace("|", "/") for line in lines] or ["(no message)"]
                        # TensorFlow's graph errors put the cause on their "(0) ..." line.
                        cause = next((line for line in lines if line.startswith("(0)")), lines[0])
                        errors[(strategy, method)] = f"{type(e).__name__}: {cause[:160]}"
                        rates[strategy][method].append(None)
                        print(
                            f"run {run + 1} {strategy} {method}: FAILED {errors[(strategy, method)]}"
                        )
                        continue
                    finally:
                        keras.backend.clear_session()  # each measurement builds its own model
                    steady = statistics.median(times[1:])
                    rates[strategy][method].append(images_per_epoch / steady)
                    print(
                        f"run {run + 1} {strategy} {method}: epochs "
                        + ", ".join(f"{t:.2f}" for t in times)
                        + f" s -> {images_per_epoch / steady:.1f} img/s",
                        flush=True,
                    )

    config = bench_config(_STRATEGIES.value[0], "unused")
    print()
    print(
        f"Recipe `{_RECIPE.value}` on leukemia_synthetic: {config.backbone}, flat head, "
        f"{config.image_size} px, global batch {config.batch_size}, {config.precision}, "
        f"{config.steps_per_epoch} steps/epoch, steps_per_execution {config.steps_per_execution}, "
        f"augmentation {'on in both' if config.augment else 'off in both'}, "
        "EMA/MixUp/class weights/validation off in both; "
        f"{_RUNS.value} run(s) x {_EPOCHS.value} epochs, first epoch not timed. "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs."
    )
    print()
    print("| strategy | replicas | loop img/s | fit img/s | loop / fit [min, max] |")
    print("|---|---|---|---|---|")
    for strategy in _STRATEGIES.value:
        replicas = MIRRORED_DEVICES if strategy == "mirrored" else 1
        loop, fit = rates[strategy]["loop"], rates[strategy]["fit"]
        ratios = [a / b for a, b in zip(loop, fit, strict=True) if a and b]
        cells = []
        for method, values in (("loop", loop), ("fit", fit)):
            ok = [v for v in values if v]
            cells.append(_fmt_range(ok, 1) if ok else f"failed ({errors[(strategy, method)]})")
        ratio = _fmt_range(ratios) if ratios else "n/a"
        print(f"| {strategy} | {replicas} | {cells[0]} | {cells[1]} | {ratio} |")


if __name__ == "__main__":
    app.run(main)
