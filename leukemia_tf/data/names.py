"""Data set names: the ``--datasets`` grammar, and checks that data sets, configs and splits exist.

Everything here reads only names and TFDS metadata, never an example, so a
typo fails in seconds, before a run creates anything (the binaries call
:func:`check_datasets` and :func:`check_dataset_name` first). Reading the
data is :mod:`leukemia_tf.data.pipeline`'s job; it resolves its data sets
through :func:`get_builder` here.

An unknown name fails with :class:`UnknownDatasetError` naming the closest
valid ones (TFDS's own error lists all ~500 registered names); a data set
that is not built fails with :class:`DatasetNotBuiltError` giving the exact
build command.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence

import tensorflow_datasets as tfds

from leukemia_tf.cli import UserError, close_matches, closest_first
from leukemia_tf.data.registry import register_builders

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


class DatasetNotBuiltError(UserError, FileNotFoundError):
    """A data set's TFDS shards are not in ``data_dir``; the message gives the build command."""


class UnknownDatasetError(UserError, ValueError):
    """A data set, config or split name that does not exist; the message gives the close ones."""


# ----------------------------------------------------------------- data specs
@dataclasses.dataclass(frozen=True)
class DataSpec:
    """One source data set of a mixture.

    Attributes:
      name: TFDS name with config (and optionally version), e.g. ``"pbc"``,
        ``"all_taleqani/original"``, ``"leukemia_synthetic"``.
      weight: sampling weight in the training mixture (> 0).
    """

    name: str
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"DataSpec name must be a non-empty string, got {self.name!r}")
        weight = float(self.weight)
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"DataSpec {self.name!r}: weight must be > 0, got {self.weight!r}")

    @property
    def builder_name(self) -> str:
        """The TFDS builder name without config or version (``"all_taleqani"``)."""
        return self.name.split(":")[0].split("/")[0]

    @property
    def unversioned_name(self) -> str:
        """``name/config`` without the version (``"all_taleqani/original"``)."""
        return self.name.split(":")[0]


def parse_datasets(spec: str) -> list[DataSpec]:
    """Parses ``"all_taleqani/original:1,pbc:2"`` into data specs.

    Items are comma-separated ``name[/config][:version][:weight]``; the weight
    defaults to 1. A trailing ``:X.Y.Z`` is read as a TFDS version, any other
    trailing ``:X`` as the weight.

    Args:
      spec: the ``--datasets`` flag value.

    Returns:
      One :class:`DataSpec` per item, in order.

    Raises:
      ValueError: empty spec or item, a weight that is not a positive number,
        or a data set named twice.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"--datasets is empty ({spec!r}); expected e.g. 'all_taleqani/original:1,pbc:2'"
        )
    out: list[DataSpec] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"--datasets={spec!r}: empty item (stray comma?)")
        parts = item.split(":")
        weight = 1.0
        if len(parts) > 1 and not _VERSION_RE.match(parts[-1]):
            try:
                weight = float(parts[-1])
            except ValueError:
                raise ValueError(
                    f"--datasets={spec!r}: weight {parts[-1]!r} of {item!r} is not a number "
                    "(expected name[/config][:version][:weight])"
                ) from None
            parts = parts[:-1]
        name = ":".join(parts).strip()
        if not name or any(not p for p in parts):
            raise ValueError(f"--datasets={spec!r}: malformed item {item!r}")
        try:
            out.append(DataSpec(name, weight))
        except ValueError as e:
            raise ValueError(f"--datasets={spec!r}: {e}") from None
    names = [s.name for s in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"--datasets={spec!r}: {duplicates} named more than once")
    return out


def as_specs(specs: Sequence[DataSpec] | str) -> list[DataSpec]:
    """Data specs from specs, bare names or a ``--datasets`` string.

    Args:
      specs: :class:`DataSpec` objects or names (weight 1), or a ``--datasets`` string.

    Returns:
      One :class:`DataSpec` per data set, in order.

    Raises:
      ValueError: no data set, or a malformed ``--datasets`` string.
    """
    if isinstance(specs, str):
        return parse_datasets(specs)
    specs = [DataSpec(s) if isinstance(s, str) else s for s in specs]
    if not specs:
        raise ValueError("no data sets given")
    return specs


def spec_string(specs: Sequence[DataSpec]) -> str:
    """The ``--datasets`` string of ``specs`` (``"pbc:1,all_taleqani/original:2"``), for messages."""
    return ",".join(f"{s.name}:{s.weight:g}" for s in specs)


# ------------------------------------------------------------------- builders
def _data_dir(data_dir: str | os.PathLike | None) -> str | None:
    if data_dir is None:
        return None
    data_dir = os.fspath(data_dir)
    return data_dir if "://" in data_dir else os.path.expanduser(data_dir)


def get_builder(name: str, data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder of ``name`` in ``data_dir``.

    Args:
      name: TFDS name (``name[/config][:version]``).
      data_dir: TFDS data directory (local path or ``gs://``); ``None`` = TFDS's default.

    Returns:
      A ``tfds.core.DatasetBuilder`` whose data exist.

    Raises:
      ValueError: unknown data set or config.
      DatasetNotBuiltError: the data set is not built there; the message gives
        the exact build command.
    """
    known = register_builders()  # registers the project's builders with TFDS

    data_dir = _data_dir(data_dir)
    _check_name(name, known)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise _unknown_dataset(name, known) from None
    if not builder.is_prepared():
        raise _not_built(name, builder, data_dir)
    return builder


def _unknown_dataset(name: str, own_builders: Sequence[str]) -> UnknownDatasetError:
    # TFDS's own error lists all ~500 registered names: give the few that look alike.
    builder_name = name.split(":")[0].split("/")[0]
    known = sorted(set(tfds.list_builders(with_community_datasets=False)) | set(own_builders))
    close = close_matches(builder_name, known)
    hint = f"closest: {', '.join(close)}; " if close else ""
    return UnknownDatasetError(
        f"unknown data set {name!r}; {hint}this package's builders: {', '.join(own_builders)} "
        "(any registered TFDS data set name also works)"
    )


def _check_name(name: str, own_builders: Sequence[str]) -> None:
    """Raises :class:`UnknownDatasetError` for an unknown builder or config of ``name``."""
    unversioned = name.split(":")[0]
    builder_name, _, config = unversioned.partition("/")
    try:
        cls = tfds.builder_cls(builder_name)
    except tfds.core.registered.DatasetNotFoundError:
        raise _unknown_dataset(name, own_builders) from None
    configs = [c.name for c in (getattr(cls, "BUILDER_CONFIGS", None) or [])]
    if config and configs and config not in configs:
        raise UnknownDatasetError(
            f"unknown data set {name!r}: {builder_name} has no config {config!r}; choose one of "
            f"(closest first): {', '.join(f'{builder_name}/{c}' for c in closest_first(config, configs))}"
        )


def check_dataset_name(name: str) -> None:
    """Raises :class:`UnknownDatasetError` (with the closest names) unless ``name`` is registered.

    Checks the builder and its config (``name[/config][:version]``); reads no data.
    """
    known = register_builders()  # registers the project's builders with TFDS

    _check_name(name, known)


def _not_built(name: str, builder, data_dir: str | None) -> DatasetNotBuiltError:
    where = data_dir if data_dir is not None else tfds.core.constants.DATA_DIR
    command = f"python -m leukemia_tf.build_data --dataset={name}"
    if data_dir is not None:
        command += f" --data_dir={data_dir}"
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        command += " --manual_dir=<folder holding your download>"
    return DatasetNotBuiltError(
        f"data set {name!r} is not built in {where} (looked for {builder.data_dir}). "
        f"Build it first:\n  {command}"
    )


def split_names(split: str) -> list[str]:
    """Base split names of a TFDS split expression (``"train[:10%]+validation"``).

    A fold split (``DIR/folds.json#0/train``, :mod:`leukemia_tf.data.folds`)
    gives the names of the pooled split its fold file records.

    Raises:
      ValueError: not a split expression, or a fold split whose file cannot be read.
    """
    from leukemia_tf.data import folds

    if folds.is_fold_split(split):
        try:
            split = folds.resolve_split(split).split
        except folds.FoldError as e:
            raise ValueError(str(e)) from None
    names = [part.split("[")[0].strip() for part in split.split("+")]
    if not split.strip() or not all(names):
        raise ValueError(f"{split!r} is not a TFDS split expression (e.g. 'train')")
    return names


def check_datasets(
    specs: Sequence[DataSpec] | str,
    splits: dict[str, str],
    data_dir: str | os.PathLike | None = None,
) -> None:
    """Checks data set, config and split names before a run creates anything.

    Reads only the TFDS metadata. A data set that needs a manual download and
    is not built fails here (with its build command); one that TFDS generates
    (``leukemia_synthetic``) may be unbuilt: its splits are checked when it is
    read, after the training engine has built it.

    Args:
      specs: data specs, or a ``--datasets`` string.
      splits: ``{flag name: split expression}``, e.g. ``{"train_split":
        "train", "val_split": "validation"}``; empty expressions are skipped.
      data_dir: TFDS data directory.

    Raises:
      UnknownDatasetError: an unknown data set, config or split; the message
        names the flag, the value and the valid (or closest) names.
      DatasetNotBuiltError: a manually downloaded data set is not built.
    """
    known = register_builders()  # registers the project's builders with TFDS

    shown = specs if isinstance(specs, str) else None  # the flag value as the user typed it
    try:
        specs = as_specs(specs)
    except ValueError as e:
        raise UnknownDatasetError(str(e)) from None
    shown = shown if shown is not None else spec_string(specs)
    data_dir = _data_dir(data_dir)
    for spec in specs:
        try:
            _check_name(spec.name, known)
        except UnknownDatasetError as e:
            raise UnknownDatasetError(f"--datasets={shown!r}: {e}") from None
        builder = tfds.builder(spec.name, data_dir=data_dir)
        if not builder.is_prepared():
            if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
                raise _not_built(spec.name, builder, data_dir)
            continue
        available = list(builder.info.splits.keys())
        for flag, split in splits.items():
            if not split.strip():
                continue
            try:
                names = split_names(split)
            except ValueError as e:
                raise UnknownDatasetError(f"--{flag}: {e}") from None
            for name in names:
                if name not in available:
                    raise UnknownDatasetError(
                        f"--{flag}={split!r}: data set {spec.name!r} has no split {name!r}; "
                        f"choose one of (closest first): {', '.join(closest_first(name, available))}"
                    )
