"""The search configuration and the hyperparameter space of ``leukemia_tf.tune``.

:class:`SearchConfig` holds what only a search needs (the tuner, the
objective, the output directory, and one flag per searchable hyperparameter);
everything else is the base :class:`~leukemia_tf.training.config.TrainConfig`
that every trial starts from (its flags are shared with ``leukemia_tf.train``).

A searchable hyperparameter is a ``TrainConfig`` field; its search flag sets
its space (the hyperparameter takes the field's name, so the best values are
a ``TrainConfig`` again):

* ``--X_range=LO,HI``: a continuous range (log-uniform for the learning rate
  and the weight decay); one value fixes it.
* ``--X_choices=A,B,C`` (and ``--backbones``, ``--heads``, ``--image_sizes``):
  a discrete choice; one value fixes it.
* Setting the training flag itself (``--learning_rate=1e-3``) fixes it too;
  giving both the training flag and its search flag is an error.
* An empty search flag fixes the hyperparameter at its training flag's value.

``--backbones`` also takes family names (``efficientnetv2``, ``convnext``,
``vit``, ``cnn``, ...), which stand for every backbone of the family that is
not marked slow in the registry.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence

from absl import flags

from leukemia_tf.training.config import ConfigError, TrainConfig, define_dataclass_flags

#: TrainConfig flags that ``tune`` does not take: each trial gets its own
#: model_dir under --tune_dir, --resume replaces --overwrite, and --objective
#: sets every trial's --monitor; the probes on stored features
#: (``--from_embeddings``, ``--probe``, ``--knn_k``) are for ``train`` only.
SKIPPED_TRAIN_FLAGS = (
    "model_dir",
    "overwrite",
    "monitor",
    "from_embeddings",
    "probe",
    "knn_k",
)

#: Objectives (per-epoch validation metrics of the training engine) and their direction.
OBJECTIVES = {
    "val_macro_f1": "max",
    "val_accuracy": "max",
    "val_balanced_accuracy": "max",
    "val_loss": "min",
}
TUNERS = ("hyperband", "bayesian", "random")

#: Trials of random and Bayesian searches when --max_trials=0.
DEFAULT_MAX_TRIALS = 20


def _field(default, help: str, choices: Sequence[str] | None = None):
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": tuple(choices or ())}
    )


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """How one search flag maps onto one ``TrainConfig`` field.

    Attributes:
      flag: the search flag (a :class:`SearchConfig` field).
      field: the ``TrainConfig`` field it searches (also the hyperparameter name).
      kind: ``"range"`` (``LO,HI`` floats) or ``"choice"`` (a list).
      log: sample a range log-uniformly.
    """

    flag: str
    field: str
    kind: str
    log: bool = False


PARAMS = (
    ParamSpec("backbones", "backbone", "choice"),
    ParamSpec("heads", "head", "choice"),
    ParamSpec("image_sizes", "image_size", "choice"),
    ParamSpec("dropout_range", "dropout", "range"),
    ParamSpec("hidden_units_choices", "hidden_units", "choice"),
    ParamSpec("learning_rate_range", "learning_rate", "range", log=True),
    ParamSpec("weight_decay_range", "weight_decay", "range", log=True),
    ParamSpec("label_smoothing_range", "label_smoothing", "range"),
    ParamSpec("augment_magnitude_range", "augment_magnitude", "range"),
    ParamSpec("mixup_alpha_choices", "mixup_alpha", "choice"),
    ParamSpec("cutmix_alpha_choices", "cutmix_alpha", "choice"),
    ParamSpec("freeze_epochs_choices", "freeze_epochs", "choice"),
)
PARAMS_BY_FLAG = {p.flag: p for p in PARAMS}
PARAMS_BY_FIELD = {p.field: p for p in PARAMS}


@dataclasses.dataclass
class SearchConfig:
    """What a hyperparameter search needs beyond the base training config."""

    # ------------------------------------------------------------- the search
    tune_dir: str = _field(
        "",
        "Output directory of the search: trials, TensorBoard logs, results table, best flagfile. "
        "Must be empty or new, unless --resume.",
    )
    resume: bool = _field(
        False,
        "Continue the interrupted or finished search in --tune_dir (with the same flags; "
        "--max_trials, --max_consecutive_failed_trials, --max_retries_per_trial, --retrain_best "
        "and --export_dir may change).",
    )
    tuner: str = _field(
        "hyperband",
        "hyperband: successive halving over epoch budgets up to --epochs; bayesian: Gaussian-"
        "process Bayesian optimisation; random: random search.",
        choices=TUNERS,
    )
    objective: str = _field(
        "val_macro_f1",
        "Validation metric to optimise (read after every epoch; val_loss is minimised, the "
        "others maximised). Also every trial's --monitor.",
        choices=tuple(OBJECTIVES),
    )
    max_trials: int = _field(
        0,
        "Trials to run. 0: hyperband runs its full schedule (set by --epochs, "
        f"--hyperband_factor, --hyperband_iterations), random and bayesian run "
        f"{DEFAULT_MAX_TRIALS}. For hyperband a positive value caps the schedule.",
    )
    hyperband_factor: int = _field(
        3, "Hyperband: keep 1/factor of the trials in each round (and factor x the epochs)."
    )
    hyperband_iterations: int = _field(1, "Hyperband: times to run the whole schedule.")
    max_consecutive_failed_trials: int = _field(
        5, "Stop the search after this many failed trials in a row."
    )
    max_retries_per_trial: int = _field(
        0,
        "Retries of a trial that crashed for an unexpected reason (NaN loss, out of memory and "
        "invalid combinations are never retried).",
    )
    search_seed: int = _field(1, "Seed of the tuner's sampling of hyperparameters (>= 1).")
    cv_folds: int = _field(
        0,
        "Cross-validated search: K >= 2 splits the recipe's --train_split + --val_split once into "
        "K folds grouped by patient (else slide) and stratified by label (--tune_dir/folds.json, "
        "seed --seed, as leukemia_tf.crossval), trains every trial once per fold and scores it "
        "by the mean over folds of the objective (the spread goes in the results table). "
        "0: off, one training and validation split.",
    )
    retrain_best: bool = _field(
        False,
        "After the search, retrain the best trial's configuration on training + validation data "
        "for its best number of epochs (into --tune_dir/retrain) and export it.",
    )
    export_dir: str = _field(
        "", "Export directory of --retrain_best (TF Serving base path); empty: --tune_dir/export."
    )

    # ------------------------------------------------------ the search space
    backbones: str = _field(
        "",
        "Backbones to search: registry names and/or families (efficientnet, efficientnetv2, "
        "convnext, vit, mobilenetv3, cnn: every non-slow member). Empty: fixed at --backbone.",
    )
    heads: str = _field(
        "auto",
        "Heads to search: flat, hierarchical. auto: both with --label_mode=taxonomy, flat "
        "otherwise (hierarchical needs taxonomy labels).",
    )
    image_sizes: str = _field("", "Image sizes to search, e.g. 224,260. Empty: --image_size.")
    dropout_range: str = _field("0.0,0.5", "Dropout range LO,HI (one value fixes it).")
    hidden_units_choices: str = _field(
        "0,256", "Hidden widths of the head to search (0: no hidden layer)."
    )
    learning_rate_range: str = _field(
        "1e-4,3e-3", "Peak learning rate range LO,HI, sampled log-uniformly."
    )
    weight_decay_range: str = _field(
        "1e-3,1e-1", "AdamW weight decay range LO,HI, sampled log-uniformly (linearly if LO=0)."
    )
    label_smoothing_range: str = _field("0.0,0.2", "Label smoothing range LO,HI.")
    augment_magnitude_range: str = _field("0.0,0.8", "Augmentation magnitude range LO,HI.")
    mixup_alpha_choices: str = _field("0,0.2,0.4", "MixUp alphas to search (0: off).")
    cutmix_alpha_choices: str = _field("0,1.0", "CutMix alphas to search (0: off).")
    freeze_epochs_choices: str = _field(
        "",
        "Frozen-backbone epochs to search (useful with --weights=imagenet). Empty: "
        "--freeze_epochs.",
    )

    # ------------------------------------------------------------------- I/O
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_flags(cls, flag_values: flags.FlagValues = flags.FLAGS) -> SearchConfig:
        """Reads the search flags; a training flag set explicitly fixes its hyperparameter.

        Raises:
          ConfigError: a hyperparameter is both set (``--learning_rate``) and
            searched (``--learning_rate_range``).
        """
        values = {name: flag_values[name].value for name in cls.field_names()}
        for spec in PARAMS:
            train_flag = flag_values[spec.field]
            if not train_flag.present:
                continue
            if flag_values[spec.flag].present:
                raise ConfigError(
                    f"--{spec.field}={train_flag.value} fixes {spec.field}, and "
                    f"--{spec.flag}={flag_values[spec.flag].value} searches it: give one of them"
                )
            values[spec.flag] = str(train_flag.value)
        return cls(**values)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Declares one absl flag per :class:`SearchConfig` field (idempotent)."""
    define_dataclass_flags(SearchConfig, flag_values)


def define_all_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The flags of ``leukemia_tf.tune``: the training flags (less model_dir,
    overwrite and monitor) and the search flags."""
    from leukemia_tf.training import config as config_lib

    config_lib.define_flags(flag_values, skip=SKIPPED_TRAIN_FLAGS)
    define_flags(flag_values)


def base_config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> TrainConfig:
    """The base training config of every trial (``model_dir`` is set per trial)."""
    values = {
        name: flag_values[name].value
        for name in TrainConfig.field_names()
        if name not in SKIPPED_TRAIN_FLAGS
    }
    return TrainConfig(**values)


def parse_flagfile(path: str, extra_args: Sequence[str] = ()) -> tuple[TrainConfig, SearchConfig]:
    """Parses a ``tune`` flagfile (plus overrides) without touching ``FLAGS``.

    Returns:
      ``(base TrainConfig, SearchConfig)``.
    """
    flag_values = flags.FlagValues()
    define_all_flags(flag_values)
    flag_values(["prog", f"--flagfile={path}", *extra_args])
    return base_config_from_flags(flag_values), SearchConfig.from_flags(flag_values)


# ------------------------------------------------------------------ resolution
@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """One resolved dimension of the search space.

    Attributes:
      name: the ``TrainConfig`` field (and the KerasTuner hyperparameter name).
      kind: ``"fixed"``, ``"choice"`` or ``"range"``.
      values: the fixed value (one element), the choices, or ``(lo, hi)``.
      log: log-uniform sampling of a range.
    """

    name: str
    kind: str
    values: tuple
    log: bool = False

    def declare(self, hp) -> object:
        """Declares this dimension in a ``keras_tuner.HyperParameters``; returns its value."""
        if self.kind == "fixed":
            return hp.Fixed(self.name, self.values[0])
        if self.kind == "choice":
            return hp.Choice(self.name, list(self.values))
        lo, hi = self.values
        return hp.Float(self.name, lo, hi, sampling="log" if self.log else "linear")

    def flag_value(self) -> str:
        """This dimension written as its search flag's value (``LO,HI``, ``A,B,C`` or ``V``)."""
        return ",".join(str(v) for v in self.values)

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.name} = {self.values[0]}"
        if self.kind == "choice":
            return f"{self.name} in {{{', '.join(str(v) for v in self.values)}}}"
        lo, hi = self.values
        return f"{self.name} in [{lo:g}, {hi:g}]" + (" (log)" if self.log else "")


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _convert(spec: ParamSpec, raw: str, kind: type):
    try:
        if kind is int:
            number = float(raw)
            if not number.is_integer():
                raise ValueError(raw)
            return int(number)
        return float(raw) if kind is float else raw
    except ValueError:
        raise ConfigError(
            f"--{spec.flag}: {raw!r} is not a valid {kind.__name__} value for {spec.field}"
        ) from None


def _expand_backbones(names: list[str]) -> list[str]:
    from leukemia_tf.models import registry

    out: list[str] = []
    known = registry.list_backbones()
    for name in names:
        if name in registry.FAMILIES:
            members = [
                b for b in registry.list_backbones(name) if not registry.get_backbone_spec(b).slow
            ]
            out.extend(members)
        elif name in known:
            out.append(name)
        else:
            raise ConfigError(
                f"--backbones: unknown backbone or family {name!r}; families: "
                f"{', '.join(registry.FAMILIES)}; backbones: {', '.join(known)}"
            )
    return list(dict.fromkeys(out))  # unique, in order


def resolve_space(search: SearchConfig, base: TrainConfig) -> list[Hyperparameter]:
    """Turns the search flags into the list of hyperparameters of the search.

    Args:
      search: the search flags.
      base: the base training config (gives the fixed values of empty flags).

    Returns:
      One :class:`Hyperparameter` per entry of :data:`PARAMS`.

    Raises:
      ConfigError: a malformed value; the message names the flag.
    """
    field_types = typing.get_type_hints(TrainConfig)
    space = []
    for spec in PARAMS:
        text = getattr(search, spec.flag).strip()
        kind = field_types[spec.field]
        if spec.flag == "heads" and text == "auto":
            heads = ("flat", "hierarchical") if base.label_mode == "taxonomy" else ("flat",)
            text = ",".join(heads)
        items = _split(text)
        if not items:
            space.append(Hyperparameter(spec.field, "fixed", (getattr(base, spec.field),)))
            continue
        if spec.flag == "backbones":
            values = _expand_backbones(items)
        elif spec.flag == "heads":
            bad = [h for h in items if h not in ("flat", "hierarchical")]
            if bad:
                raise ConfigError(f"--heads: unknown head(s) {bad}; use flat and/or hierarchical")
            values = list(dict.fromkeys(items))
        else:
            values = list(dict.fromkeys(_convert(spec, item, kind) for item in items))
        if spec.kind == "range" and len(values) == 2:
            lo, hi = values
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
                raise ConfigError(
                    f"--{spec.flag}={text!r}: give LO,HI with LO < HI (or one value to fix it)"
                )
            log = spec.log and lo > 0
            space.append(Hyperparameter(spec.field, "range", (lo, hi), log=log))
        elif spec.kind == "range" and len(values) != 1:
            raise ConfigError(f"--{spec.flag}={text!r}: give LO,HI (a range) or one value (fixed)")
        elif len(values) == 1:
            space.append(Hyperparameter(spec.field, "fixed", (values[0],)))
        else:
            space.append(Hyperparameter(spec.field, "choice", tuple(values)))
    return space


def check_search(search: SearchConfig, base: TrainConfig) -> list[Hyperparameter]:
    """Validates the search flags against the base config; returns the space.

    Raises:
      ConfigError: naming the flag.
    """
    if not search.tune_dir.strip():
        raise ConfigError("--tune_dir: an output directory for the search is required")
    for name in ("tuner", "objective"):
        f = next(f for f in dataclasses.fields(SearchConfig) if f.name == name)
        if getattr(search, name) not in f.metadata["choices"]:
            raise ConfigError(
                f"--{name}={getattr(search, name)!r} is not allowed; choose one of "
                f"{', '.join(f.metadata['choices'])}"
            )
    if search.max_trials < 0:
        raise ConfigError(f"--max_trials={search.max_trials}: must be >= 0")
    if search.hyperband_factor < 2:
        raise ConfigError(f"--hyperband_factor={search.hyperband_factor}: must be >= 2")
    if search.hyperband_iterations < 1:
        raise ConfigError(f"--hyperband_iterations={search.hyperband_iterations}: must be >= 1")
    if search.max_consecutive_failed_trials < 1:
        raise ConfigError(
            f"--max_consecutive_failed_trials={search.max_consecutive_failed_trials}: must be >= 1"
        )
    if search.max_retries_per_trial < 0:
        raise ConfigError(f"--max_retries_per_trial={search.max_retries_per_trial}: must be >= 0")
    if search.search_seed < 1:
        # KerasTuner replaces a seed of 0 by a random one: not reproducible.
        raise ConfigError(f"--search_seed={search.search_seed}: must be >= 1")
    check_cv(search, base)
    if not base.val_split and not search.cv_folds:
        raise ConfigError(
            f"--val_split is empty: the objective {search.objective} is measured on a "
            "validation split (or give --cv_folds to measure it on cross-validation folds)"
        )
    space = resolve_space(search, base)
    # The base config must be valid on its own (a trial changes only the searched fields).
    dataclasses.replace(base, model_dir="trial", monitor=search.objective).validate()
    for hp in space:
        if hp.name == "freeze_epochs" and all(v >= base.epochs for v in hp.values):
            raise ConfigError(
                f"--freeze_epochs_choices / --freeze_epochs: every value is >= --epochs="
                f"{base.epochs}, so no trial could unfreeze the backbone"
            )
    return space


def check_cv(search: SearchConfig, base: TrainConfig) -> None:
    """Checks ``--cv_folds`` and the splits it divides (no data is read).

    Raises:
      ConfigError: ``--cv_folds`` is 1 or negative; or a split of the recipe
        is already a fold split (the search assigns its own folds).
    """
    from leukemia_tf.data import folds as folds_lib

    if search.cv_folds == 0:
        return
    if search.cv_folds < 2:
        raise ConfigError(
            f"--cv_folds={search.cv_folds}: need at least 2 folds (0: no cross-validation)"
        )
    for name in ("train_split", "val_split"):
        split = getattr(base, name)
        if folds_lib.is_fold_split(split):
            raise ConfigError(
                f"--cv_folds={search.cv_folds} with --{name}={split!r}, a fold split: a "
                "cross-validated search assigns its own folds over --train_split + --val_split; "
                "give the splits to divide (e.g. --train_split=train --val_split=validation)"
            )
    if not base.train_split.strip():
        raise ConfigError(
            f"--cv_folds={search.cv_folds}: --train_split is empty; the folds divide "
            "--train_split + --val_split"
        )


def search_warnings(space: Sequence[Hyperparameter], base: TrainConfig) -> list[str]:
    """Parts of the space that will only produce failed trials (they run anyway)."""
    warnings = []
    heads = next((p.values for p in space if p.name == "head"), ())
    if "hierarchical" in heads and base.label_mode != "taxonomy":
        warnings.append(
            "--heads includes hierarchical, which needs --label_mode=taxonomy: those trials "
            "will fail as invalid configurations"
        )
    return warnings


def trial_config(
    base: TrainConfig, values: Mapping[str, object], model_dir: str, objective: str
) -> TrainConfig:
    """The training config of one trial: ``base`` with the trial's hyperparameter values.

    Args:
      base: the base training config.
      values: hyperparameter values by ``TrainConfig`` field name (other keys,
        e.g. KerasTuner's ``tuner/epochs``, are ignored).
      model_dir: the trial's output directory.
      objective: the search objective (becomes ``monitor``).

    Returns:
      A new (not yet validated) ``TrainConfig``.
    """
    types = typing.get_type_hints(TrainConfig)
    fields = set(TrainConfig.field_names())
    updates = {}
    for name, value in values.items():
        if name in fields:
            updates[name] = types[name](value) if types[name] in (int, float) else value
    return dataclasses.replace(
        base, **updates, model_dir=model_dir, monitor=objective, overwrite=False
    )


def check_combination(config: TrainConfig) -> None:
    """Raises :class:`ConfigError` when a trial's values do not go together.

    Checks everything :meth:`TrainConfig.validate` checks (a hierarchical head
    without taxonomy labels, frozen epochs >= epochs, ...) plus what the
    backbone needs of the image size (ViT: a multiple of the patch size).
    """
    config.validate()
    from leukemia_tf.models import registry

    spec = registry.get_backbone_spec(config.backbone)
    if config.image_size < spec.min_image_size or config.image_size % spec.image_size_multiple:
        raise ConfigError(
            f"--backbone={config.backbone} needs an image size >= {spec.min_image_size} that is "
            f"a multiple of {spec.image_size_multiple}; got --image_size={config.image_size}"
        )
