"""The one typed training configuration, built from flags and validated once.

Every field carries its flag's help text (``help``) and, for enumerations, the
allowed values (``choices``). :func:`define_flags` declares one absl flag per
field, so ``train.py`` and ``tune.py`` share them; :meth:`TrainConfig.from_flags`
reads them back, :meth:`TrainConfig.validate` checks every value (an error
names the flag and the allowed values), and :meth:`TrainConfig.to_flagfile`
gives the flags that reproduce it (:func:`leukemia_tf.rundir.write_config`
writes both into every run directory).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

from absl import flags

from leukemia_tf.cli import UserError, closest_first

#: The file a finished training run leaves in its model_dir.
FINISHED_MARKER = "train_summary.json"


def _field(default, help: str, choices: Sequence[str] | None = None, **kwargs):
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": tuple(choices or ())}, **kwargs
    )


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the flag (binaries: exit 2)."""


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs. Field names are the flag names."""

    # ----------------------------------------------------------------- data
    datasets: str = _field(
        "leukemia_synthetic",
        "Comma-separated TFDS data sets to train on, each optionally with a sampling weight: "
        "'all_taleqani/original:1,pbc:2'.",
    )
    data_dir: str = _field("", "TFDS data directory (local path or gs://). Empty: TFDS default.")
    label_mode: str = _field(
        "native",
        "'native': the data set's own labels (one data set only). 'taxonomy': labels mapped "
        "onto the taxonomy tree (required for several data sets and the hierarchical head).",
        choices=("native", "taxonomy"),
    )
    taxonomy: str = _field("", "Taxonomy YAML file. Empty: the bundled configs/taxonomy.yaml.")
    train_split: str = _field(
        "train", "Split to train on (TFDS split syntax, e.g. 'train+validation')."
    )
    val_split: str = _field("validation", "Split to validate on each epoch; empty: no validation.")
    image_size: int = _field(64, "Square input size in pixels (images are resized to it).")
    cache: str = _field(
        "memory",
        "Cache decoded, resized images: 'memory', 'none', or a file path prefix.",
    )
    shuffle_buffer: int = _field(4096, "Shuffle buffer size (examples).")
    deterministic: bool = _field(False, "Deterministic input order and ops (slower).")
    seed: int = _field(0, "Random seed (weights, shuffling, augmentation).")

    # ---------------------------------------------------------------- model
    backbone: str = _field("cnn_small", "Backbone name (see leukemia_tf.models.list_backbones()).")
    weights: str = _field(
        "none",
        "'imagenet' (published weights, needs internet), 'none' (random init) or a PATH to a "
        "weights file for the backbone (DINOv2 / DinoBloom: also a preset directory written by "
        "leukemia_tf.convert_backbone).",
    )
    head: str = _field(
        "flat",
        "'flat': one softmax over the classes. 'hierarchical': one softmax per taxonomy level "
        "(needs label_mode=taxonomy).",
        choices=("flat", "hierarchical"),
    )
    dropout: float = _field(0.2, "Dropout before the classifier.")
    hidden_units: int = _field(0, "Width of a hidden dense layer in the head; 0: none.")
    level_weights: str = _field(
        "",
        "Comma-separated loss weight of each taxonomy level for the hierarchical head; empty: 1 each.",
    )
    bn_momentum: float = _field(
        0.0,
        "Override BatchNorm momentum (0.9 suits from-scratch training on small sets); 0: keep the "
        "backbone's own.",
    )
    drop_path_rate: float = _field(0.0, "Stochastic depth rate where the backbone supports it.")
    erase_marks: bool = _field(
        False,
        "Erase burned-in marks (scale bars, text) inside the model, as its first layer: "
        "training, evaluation, prediction and the export all see them filled with background.",
    )
    white_balance: bool = _field(
        False,
        "Scale each image's channels so that its own white (the glass, 98th percentile) is 255, "
        "inside the model (after --erase_marks): the lamp and camera of a laboratory cancel out.",
    )
    stain_norm: bool = _field(
        False,
        "Scale each image's stain (optical density against its own white) so that its nuclei "
        "are as dark as a reference, inside the model (after --white_balance): a paler or "
        "darker stain of another laboratory reaches the backbone at the same strength.",
    )
    cell_crop: bool = _field(
        False,
        "Crop each image to a square around its stained nucleus inside the model (the last "
        "layer before the backbone): every laboratory's crop, magnification and camera reach "
        "the backbone at the same framing. For single-cell images, not smear fields.",
    )

    # --------------------------------------------------------- augmentation
    augment: bool = _field(True, "Augment training images on the accelerator.")
    augment_magnitude: float = _field(
        0.5,
        "Strength of the colour / geometry augmentation in [0, 1]; 0: flips and rotations only.",
    )
    crop_scale_min: float = _field(
        0.5, "Smallest area fraction of the random resized crop (1: no crop)."
    )
    acquisition_shifts: str = _field(
        "",
        "Comma-separated augmentations that model another laboratory's acquisition "
        "(stain, scale, blur, illumination, gamma, noise, jpeg; 'all'); empty: none.",
    )
    shift_magnitude: float = _field(0.5, "Strength of --acquisition_shifts in [0, 1]; 0: off.")
    shift_probability: float = _field(
        1.0,
        "Share of the training images --acquisition_shifts are applied to (each drawn "
        "independently); the others are seen as they are.",
    )
    mixup_alpha: float = _field(0.0, "MixUp Beta(alpha, alpha); 0: off.")
    cutmix_alpha: float = _field(0.0, "CutMix Beta(alpha, alpha); 0: off.")
    augment_marks: bool = _field(
        False,
        "Draw random synthetic marks (label boxes, scale bars, red text) at a corner of half "
        "the training images, labels unchanged, so the model learns to ignore marks.",
    )

    # ------------------------------------------------------------- training
    epochs: int = _field(10, "Number of epochs (including the frozen-backbone epochs).")
    steps_per_epoch: int = _field(
        0, "Training steps per epoch; 0: one pass over the training split."
    )
    batch_size: int = _field(
        32,
        "GLOBAL batch size: the sum over all replicas and workers. Each replica gets "
        "batch_size / num_replicas; the learning rate is not rescaled.",
    )
    learning_rate: float = _field(1e-3, "Peak learning rate (AdamW).")
    weight_decay: float = _field(0.05, "AdamW decoupled weight decay.")
    warmup_epochs: float = _field(1.0, "Linear warm-up length in epochs.")
    min_lr_ratio: float = _field(
        0.01, "Final learning rate of the cosine decay, as a fraction of the peak."
    )
    label_smoothing: float = _field(0.1, "Label smoothing.")
    clipnorm: float = _field(1.0, "Clip the global gradient norm to this; 0: no clipping.")
    ema: bool = _field(
        False,
        "Keep an exponential moving average of the weights and of BatchNorm's moving "
        "statistics, and validate / save it.",
    )
    ema_momentum: float = _field(0.999, "EMA momentum.")
    class_weighting: str = _field(
        "none",
        "'none', or 'balanced': weight each example's loss by n / (k * count of its class).",
        choices=("none", "balanced"),
    )
    freeze_epochs: int = _field(
        0,
        "Two-stage fine-tuning: train with the backbone frozen (BatchNorm in inference mode) for "
        "this many epochs, then unfreeze at learning_rate * finetune_lr_factor.",
    )
    finetune_lr_factor: float = _field(0.1, "Learning-rate factor of the unfrozen stage.")
    monitor: str = _field(
        "val_macro_f1",
        "Validation metric for the best checkpoint and early stopping.",
        choices=("val_macro_f1", "val_accuracy", "val_balanced_accuracy", "val_loss"),
    )
    early_stopping_patience: int = _field(
        0, "Stop after this many epochs without improvement of --monitor; 0: never."
    )

    # ------------------------------------------------- probes on features
    from_embeddings: str = _field(
        "",
        "A feature store written by leukemia_tf.embed: fit only the head on its stored "
        "features (seconds), then join it to the stored backbone. Backbone, weights, image "
        "size, data sets, label mode, taxonomy, erase_marks, white_balance, stain_norm, cell_crop and "
        "data_dir default to the store's; a different value is refused. Empty: ordinary "
        "training on images.",
    )
    probe: str = _field(
        "linear",
        "With --from_embeddings: 'linear' (the --head with --hidden_units=0), 'mlp' (the "
        "--head with --hidden_units > 0) or 'knn' (k nearest training features by cosine "
        "similarity, similarity-weighted votes; flat head only).",
        choices=("linear", "mlp", "knn"),
    )
    knn_k: int = _field(20, "Neighbours that vote in --probe=knn.")

    # --------------------------------------------------------- performance
    precision: str = _field(
        "auto",
        "Mixed-precision policy. auto: mixed_float16 on GPU, mixed_bfloat16 on TPU, float32 on CPU.",
        choices=("auto", "float32", "mixed_float16", "mixed_bfloat16"),
    )
    strategy: str = _field(
        "auto",
        "tf.distribute strategy. auto: tpu if --tpu is set, mirrored with several GPUs, else "
        "default. multi_worker reads the cluster from TF_CONFIG.",
        choices=("auto", "default", "mirrored", "multi_worker", "tpu"),
    )
    tpu: str = _field("", "TPU name or 'local' (Colab) for --strategy=tpu.")
    steps_per_execution: int = _field(1, "Training steps run inside one tf.function call.")
    xla: bool = _field(False, "Compile the training step with XLA (jit_compile).")

    # ------------------------------------------------------------- outputs
    model_dir: str = _field(
        "", "Output directory: checkpoints, logs, the resolved config, the model."
    )
    overwrite: bool = _field(
        False,
        "Start afresh in model_dir: delete its previous run (a finished run is otherwise "
        "refused, and an unfinished one resumed).",
    )
    override_flags: bool = _field(
        False,
        "Resume an unfinished run in model_dir with flags that differ from the ones it was "
        "started with (otherwise refused, naming the differences).",
    )
    verbose: int = _field(1, "0: quiet, 1: progress bar per epoch, 2: one line per epoch.")

    # ----------------------------------------------------------------- I/O
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_flags(cls, flag_values: flags.FlagValues = flags.FLAGS) -> TrainConfig:
        return cls(**{name: flag_values[name].value for name in cls.field_names()})

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> TrainConfig:
        unknown = set(values) - set(cls.field_names())
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_flagfile(self) -> str:
        """The flags (one per line) that reproduce this config."""
        lines = []
        for name in self.field_names():
            value = getattr(self, name)
            if isinstance(value, bool):
                lines.append(f"--{name}" if value else f"--no{name}")
            else:
                lines.append(f"--{name}={value}")
        return "\n".join(lines) + "\n"

    # ----------------------------------------------------------- validation
    def parsed_level_weights(self) -> list[float] | None:
        if not self.level_weights.strip():
            return None
        try:
            return [float(x) for x in self.level_weights.split(",")]
        except ValueError:
            raise ConfigError(
                f"--level_weights={self.level_weights!r}: expected comma-separated numbers"
            ) from None

    def level_weights_for(self, taxonomy) -> list[float] | None:
        """:meth:`parsed_level_weights`, checked against the depth of ``taxonomy`` (or None)."""
        level_weights = self.parsed_level_weights()
        if level_weights is not None and taxonomy is not None:
            if len(level_weights) != taxonomy.num_levels:
                raise ConfigError(
                    f"--level_weights={self.level_weights!r}: give {taxonomy.num_levels} "
                    "values, one per taxonomy level"
                )
        return level_weights

    def validate(self) -> TrainConfig:
        """Checks every value; raises :class:`ConfigError` naming the flag. Returns self."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(
                    f"--{f.name}={value!r} is not allowed; choose one of {', '.join(choices)}"
                )

        def check(condition: bool, name: str, what: str) -> None:
            if not condition:
                raise ConfigError(f"--{name}={getattr(self, name)!r}: {what}")

        check(bool(self.datasets.strip()), "datasets", "give at least one data set")
        check(bool(self.model_dir.strip()), "model_dir", "an output directory is required")
        check(16 <= self.image_size <= 1024, "image_size", "must be in [16, 1024]")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.steps_per_epoch >= 0, "steps_per_epoch", "must be >= 0")
        check(self.learning_rate > 0, "learning_rate", "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        check(self.clipnorm >= 0, "clipnorm", "must be >= 0")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check(self.hidden_units >= 0, "hidden_units", "must be >= 0")
        check(0 <= self.bn_momentum < 1, "bn_momentum", "must be in [0, 1) (0: keep)")
        check(0 <= self.drop_path_rate < 1, "drop_path_rate", "must be in [0, 1)")
        check(0 <= self.augment_magnitude <= 1, "augment_magnitude", "must be in [0, 1]")
        check(0 < self.crop_scale_min <= 1, "crop_scale_min", "must be in (0, 1]")
        check(0 <= self.shift_magnitude <= 1, "shift_magnitude", "must be in [0, 1]")
        check(0 <= self.shift_probability <= 1, "shift_probability", "must be in [0, 1]")
        check(
            self.augment or not self.augment_marks,
            "augment_marks",
            "draws marks as part of the augmentation: it needs --augment",
        )
        from leukemia_tf.models import acquisition

        try:
            shifts = acquisition.parse_shifts(self.acquisition_shifts)
        except ValueError as e:
            shifts = ()
            check(False, "acquisition_shifts", str(e))
        check(
            not (self.xla and "jpeg" in shifts),
            "acquisition_shifts",
            "'jpeg' has no XLA kernel: drop it or --xla",
        )
        check(self.mixup_alpha >= 0, "mixup_alpha", "must be >= 0")
        check(self.cutmix_alpha >= 0, "cutmix_alpha", "must be >= 0")
        check(0 < self.ema_momentum < 1, "ema_momentum", "must be in (0, 1)")
        check(0 <= self.freeze_epochs < self.epochs, "freeze_epochs", "must be in [0, epochs)")
        check(0 < self.finetune_lr_factor <= 1, "finetune_lr_factor", "must be in (0, 1]")
        check(self.early_stopping_patience >= 0, "early_stopping_patience", "must be >= 0")
        check(self.steps_per_execution >= 1, "steps_per_execution", "must be >= 1")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1")
        check(self.verbose in (0, 1, 2), "verbose", "must be 0, 1 or 2")
        if self.head == "hierarchical" and self.label_mode != "taxonomy":
            raise ConfigError(
                "--head=hierarchical needs --label_mode=taxonomy (the levels come from the taxonomy)"
            )
        if "," in self.datasets and self.label_mode != "taxonomy":
            raise ConfigError(
                f"--datasets={self.datasets!r} mixes several data sets: set --label_mode=taxonomy "
                "so that their labels share one label space"
            )
        self._check_probe()
        if self.strategy == "tpu" and not self.tpu:
            raise ConfigError("--strategy=tpu needs --tpu=local (Colab) or --tpu=NAME")
        if self.tpu and self.strategy not in ("auto", "tpu"):
            raise ConfigError(
                f"--tpu={self.tpu!r} with --strategy={self.strategy}: use --strategy=tpu (or auto) "
                "to train on a TPU, or drop --tpu"
            )
        if self.weights not in ("imagenet", "none") and not Path(self.weights).exists():
            raise ConfigError(
                f"--weights={self.weights!r}: no such file; use 'imagenet', 'none' or a weights file"
            )
        if self.cache not in ("memory", "none") and not self.cache.strip():
            raise ConfigError("--cache: use 'memory', 'none' or a file path prefix")
        self._check_backbone()
        self.parsed_level_weights()
        check_tpu_config(self)
        return self

    def _check_probe(self) -> None:
        if self.knn_k < 1:
            raise ConfigError(f"--knn_k={self.knn_k}: must be >= 1")
        if not self.from_embeddings:
            if self.probe != "linear":
                raise ConfigError(
                    f"--probe={self.probe} fits a head on stored features: it needs "
                    "--from_embeddings=DIR (a store written by python -m leukemia_tf.embed)"
                )
            return
        if self.probe == "mlp" and self.hidden_units < 1:
            raise ConfigError(
                "--probe=mlp is the head with a hidden layer: set --hidden_units (e.g. 256)"
            )
        if self.probe == "linear" and self.hidden_units:
            raise ConfigError(
                f"--probe=linear has no hidden layer, but --hidden_units={self.hidden_units}: "
                "use --probe=mlp, or --hidden_units=0"
            )
        if self.probe == "knn" and self.head != "flat":
            raise ConfigError(
                f"--probe=knn votes over the classes: use --head=flat (not --head={self.head})"
            )

    def _check_backbone(self) -> None:
        # Imported here: the registry imports Keras, which this module avoids at import.
        from leukemia_tf.models import registry

        names = registry.list_backbones()
        if self.backbone not in names:
            raise ConfigError(
                f"--backbone={self.backbone!r} is not a backbone; choose one of (closest first): "
                + ", ".join(closest_first(self.backbone, names))
            )


def check_model_dir(config: TrainConfig) -> None:
    """Refuses a ``model_dir`` holding a finished run unless ``--overwrite``; creates nothing.

    Called before anything is built or written, so that a refused run leaves
    no trace (the training engine checks again when it prepares the folder).

    Raises:
      ConfigError: ``model_dir`` holds ``train_summary.json`` and ``overwrite`` is off.
    """
    if config.overwrite:
        return
    model_dir = config.model_dir
    if _is_url(model_dir):
        import tensorflow as tf  # only for remote paths: keep this module light

        finished = tf.io.gfile.exists(f"{model_dir.rstrip('/')}/{FINISHED_MARKER}")
    else:
        finished = (Path(model_dir).expanduser() / FINISHED_MARKER).exists()
    if finished:
        raise ConfigError(
            f"--model_dir={model_dir!r} holds a finished run ({FINISHED_MARKER}); choose another "
            "directory or pass --overwrite to start afresh"
        )


def _is_url(path: str) -> bool:
    return "://" in path


def targets_tpu(config: TrainConfig) -> bool:
    """True when ``config`` trains on a TPU (``--strategy=tpu``, or ``auto`` with ``--tpu``)."""
    return config.strategy == "tpu" or (config.strategy == "auto" and bool(config.tpu))


def check_tpu_config(config: TrainConfig, strategy_or_num_replicas=None) -> list[str]:
    """Fails early on what a TPU run cannot take; returns warnings on what is slow.

    A Cloud TPU (``--tpu=NAME``: a TPU node, reached over the network) runs the
    input pipeline, the checkpoint writes and the summaries on its own hosts,
    which cannot read or write this machine's disk: ``data_dir``, ``model_dir``
    and a file ``--cache`` must be ``gs://`` paths there. On a TPU VM
    (``--tpu=local``: Colab's TPU runtime, or ``gcloud ... tpus tpu-vm ssh``)
    the TPU hangs off the machine that runs Python, so local paths work.

    Checked here (``ConfigError`` naming the flag): the paths above; a
    precision a TPU cannot run (``mixed_float16``: TPUs compute in bfloat16);
    and, given the strategy or its replica count, a global batch that does not
    split into equal, static per-core batches. Every other shape is static by
    construction (training batches drop their remainder, validation batches
    are padded, images have one size).

    Args:
      config: the training configuration. Nothing is checked unless it
        targets a TPU (:func:`targets_tpu`).
      strategy_or_num_replicas: the ``TPUStrategy`` or its number of replicas
        (TPU cores), for the batch checks; ``None`` skips them (the count is
        known once the TPU is connected).

    Returns:
      Warnings about settings that run but waste the TPU (the caller logs them).

    Raises:
      ConfigError: a setting a TPU cannot take.
    """
    if not targets_tpu(config):
        return []
    remote = config.tpu != "local"
    if remote:
        for name in ("data_dir", "model_dir"):
            value = getattr(config, name)
            if not value.startswith("gs://"):
                raise ConfigError(
                    f"--{name}={value!r}: a Cloud TPU (--tpu={config.tpu}) reads its input and "
                    "writes its checkpoints from its own hosts, which cannot see this machine's "
                    "disk; use a gs://BUCKET/... path (or run on a TPU VM with --tpu=local, where "
                    "local paths work)"
                )
        if config.cache not in ("memory", "none") and not config.cache.startswith("gs://"):
            raise ConfigError(
                f"--cache={config.cache!r}: a Cloud TPU's hosts cannot write this machine's disk; "
                "use --cache=memory, --cache=none or a gs:// prefix"
            )
    if config.precision == "mixed_float16":
        raise ConfigError(
            "--precision=mixed_float16: TPUs compute in bfloat16; use --precision=mixed_bfloat16 "
            "(or auto, which picks it on a TPU)"
        )
    if "jpeg" in config.acquisition_shifts.split(",") or config.acquisition_shifts == "all":
        raise ConfigError(
            f"--acquisition_shifts={config.acquisition_shifts!r}: the 'jpeg' shift has no XLA "
            "kernel, and a TPU compiles every step with XLA; leave 'jpeg' out on a TPU"
        )
    warnings = []
    if strategy_or_num_replicas is not None:
        replicas = int(
            getattr(strategy_or_num_replicas, "num_replicas_in_sync", strategy_or_num_replicas)
        )
        if config.batch_size % replicas:
            raise ConfigError(
                f"--batch_size={config.batch_size} (global) does not split over the {replicas} "
                "TPU cores: every core needs the same, static batch; use a multiple of "
                f"{replicas}"
            )
        per_core = config.batch_size // replicas
        if per_core % 8:
            warnings.append(
                f"--batch_size={config.batch_size} gives {per_core} examples per TPU core; a "
                "multiple of 8 (ideally 64-128) per core keeps the TPU's matrix units busy"
            )
    if config.steps_per_execution == 1:
        warnings.append(
            "--steps_per_execution=1: the host launches every TPU step; 16-128 steps per call "
            "cut that overhead"
        )
    if config.xla:
        warnings.append("--xla is implied on a TPU (XLA compiles every step); the flag is ignored")
    return warnings


def define_dataclass_flags(
    cls: type, flag_values: flags.FlagValues = flags.FLAGS, skip: Sequence[str] = ()
) -> None:
    """Declares one absl flag per field of the config dataclass ``cls`` (idempotent).

    Each field carries its help (and enum choices) in its metadata; the flag
    type follows the field's annotation (bool, int, float, else string).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in flag_values:
            continue
        kind = hints[f.name]
        help_text = f.metadata["help"]
        if f.metadata["choices"]:
            flags.DEFINE_enum(
                f.name, f.default, list(f.metadata["choices"]), help_text, flag_values=flag_values
            )
        elif kind is bool:
            flags.DEFINE_bool(f.name, f.default, help_text, flag_values=flag_values)
        elif kind is int:
            flags.DEFINE_integer(f.name, f.default, help_text, flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(f.name, f.default, help_text, flag_values=flag_values)
        else:
            flags.DEFINE_string(f.name, f.default, help_text, flag_values=flag_values)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, skip: Sequence[str] = ()) -> None:
    """Declares one absl flag per :class:`TrainConfig` field (idempotent)."""
    define_dataclass_flags(TrainConfig, flag_values, skip)


def parse_flagfile(path: str | os.PathLike, extra_args: Sequence[str] = ()) -> TrainConfig:
    """Parses a flagfile (plus overrides) into a validated-ready config, without touching FLAGS."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    flag_values(["prog", f"--flagfile={path}", *extra_args])
    return TrainConfig.from_flags(flag_values)
