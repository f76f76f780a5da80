"""The tf.data input pipeline: TFDS shards -> decoded, resized uint8 batches.

Per data set of a mixture::

  tfds as_dataset (image bytes undecoded: SkipDecoding; files shuffled when training)
    -> labels: native, or mapped onto the taxonomy (null-mapped labels filtered out)
    -> decode + resize to uint8 [S, S, 3]   (preprocessing.decode_and_resize, parallel)
    -> cache (memory, or a file prefix)
    -> shuffle + repeat                       (training only)

then the data sets are mixed (training: ``sample_from_datasets`` with the spec
weights; evaluation: concatenated in order), batched (``drop_remainder`` when
training, so shapes are static) and prefetched. No augmentation happens here:
it runs on the accelerator, inside the model step.

Every element is a dict ``{"image": uint8 [S,S,3], "label": int32,
["levels": int32 [L],] "patient_id", "slide_id", "source", "file_name":
string}``; every map is a pure dict -> dict function.

Distribution: pass the ``tf.distribute.InputContext`` that
``strategy.distribute_datasets_from_function`` hands to its function. Each
input pipeline then reads its own share of the TFDS files (when a split has
at least as many files as pipelines) or else of the examples (every pipeline
reads everything and keeps every n-th example: correct, but more I/O), and
batches with the per-replica batch size. tf.data's auto-sharding is switched
off in that case (the data are already sharded). Without an input context the
auto-shard policy is ``DATA``: a dataset passed to
``strategy.experimental_distribute_dataset`` is sharded by example, which is
always correct (``FILE`` fails or skews when a split has fewer files than
workers, as small medical sets do).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from leukemia_tf.cli import UserError, close_matches, closest_first
from leukemia_tf.data import preprocessing
from leukemia_tf.data.registry import register_builders
from leukemia_tf.taxonomy import NOT_APPLICABLE, Taxonomy

#: The string features every builder yields and every batch carries.
STRING_FEATURES = ("patient_id", "slide_id", "source", "file_name")

LABEL_MODES = ("native", "taxonomy")

#: Default per-data-set shuffle buffer, in examples (~600 MB at 224 px).
DEFAULT_SHUFFLE_BUFFER = 4096

#: Seed used when ``deterministic=True`` and no seed is given.
DEFAULT_SEED = 0

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


def _as_specs(specs: Sequence[DataSpec] | str) -> list[DataSpec]:
    if isinstance(specs, str):
        return parse_datasets(specs)
    specs = [DataSpec(s) if isinstance(s, str) else s for s in specs]
    if not specs:
        raise ValueError("no data sets given")
    return specs


def _spec_string(specs: Sequence[DataSpec]) -> str:
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
    """Base split names of a TFDS split expression (``"train[:10%]+validation"``)."""
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
        specs = _as_specs(specs)
    except ValueError as e:
        raise UnknownDatasetError(str(e)) from None
    shown = shown if shown is not None else _spec_string(specs)
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


def _native_names(builder: tfds.core.DatasetBuilder) -> list[str]:
    return list(builder.info.features["label"].names)


def _load_taxonomy(taxonomy: Taxonomy | str | os.PathLike | None) -> Taxonomy:
    if isinstance(taxonomy, Taxonomy):
        return taxonomy
    return Taxonomy.load(taxonomy)


def _taxonomy_key(spec: DataSpec, taxonomy: Taxonomy) -> str:
    """The taxonomy mapping used for ``spec``: ``name/config`` if mapped, else the builder name."""
    if spec.unversioned_name in taxonomy.datasets:
        return spec.unversioned_name
    return spec.builder_name


def _check_label_mode(label_mode: str) -> None:
    if label_mode not in LABEL_MODES:
        raise ValueError(f"--label_mode={label_mode!r} is not one of {LABEL_MODES}")


@dataclasses.dataclass(frozen=True)
class _Labels:
    """Class names of a mixture, and each data set's native-index lookup tables."""

    names: list[str]
    # Per spec: native label index -> class index (-1: excluded).
    tables: list[np.ndarray]
    # Per spec (taxonomy mode): native label index -> level encoding.
    levels: list[np.ndarray] | None


def _resolve_labels(
    specs: Sequence[DataSpec],
    builders: Sequence[tfds.core.DatasetBuilder],
    label_mode: str,
    taxonomy: Taxonomy | str | os.PathLike | None,
) -> _Labels:
    _check_label_mode(label_mode)
    natives = [_native_names(b) for b in builders]
    if label_mode == "native":
        if any(n != natives[0] for n in natives[1:]):
            raise ValueError(
                f"--label_mode=native needs one data set (or sets with identical class names), "
                f"but --datasets={_spec_string(specs)} mixes different classes: "
                + "; ".join(f"{s.name}: {n}" for s, n in zip(specs, natives, strict=True))
                + ". Use --label_mode=taxonomy to map them onto the label taxonomy."
            )
        tables = [np.arange(len(n), dtype=np.int32) for n in natives]
        return _Labels(names=list(natives[0]), tables=tables, levels=None)

    tax = _load_taxonomy(taxonomy)
    mapped = [tax.map_labels(_taxonomy_key(s, tax), n) for s, n in zip(specs, natives, strict=True)]
    used = {node for nodes in mapped for node in nodes if node is not None}
    if not used:
        raise ValueError(
            f"--datasets={_spec_string(specs)}: every native label maps to null in {tax.source}"
        )
    names = [node for node in tax.nodes if node in used]
    index = {node: i for i, node in enumerate(names)}
    tables, levels = [], []
    for nodes in mapped:
        tables.append(np.array([index[n] if n else -1 for n in nodes], np.int32))
        levels.append(
            np.stack(
                [
                    tax.encode(n) if n else np.full(tax.num_levels, NOT_APPLICABLE, np.int32)
                    for n in nodes
                ]
            ).astype(np.int32)
        )
    return _Labels(names=names, tables=tables, levels=levels)


def dataset_class_names(
    specs: Sequence[DataSpec] | str,
    data_dir: str | os.PathLike | None = None,
    label_mode: str = "native",
    taxonomy: Taxonomy | str | os.PathLike | None = None,
) -> list[str]:
    """The class names that ``label`` indexes, for a set or mixture.

    Args:
      specs: data specs, or a ``--datasets`` string.
      data_dir: TFDS data directory.
      label_mode: ``"native"``: the data set's own ``ClassLabel`` names (one
        data set, or several with identical names); ``"taxonomy"``: the
        taxonomy nodes the sets' labels map onto, in ``Taxonomy.nodes``
        order, without null-mapped labels.
      taxonomy: a :class:`Taxonomy` or a path to one (default: the bundled file).

    Returns:
      Class names; ``label`` values index this list.
    """
    specs = _as_specs(specs)
    builders = [get_builder(s.name, data_dir) for s in specs]
    return _resolve_labels(specs, builders, label_mode, taxonomy).names


def class_counts(
    specs: Sequence[DataSpec] | str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    label_mode: str = "native",
    taxonomy: Taxonomy | str | os.PathLike | None = None,
) -> np.ndarray:
    """Examples per class of :func:`dataset_class_names`, summed over the data sets.

    Only the label feature is parsed (no image decoding), so this is fast. The
    counts are raw: mixture weights are not applied. Null-mapped labels
    (taxonomy mode) are not counted, as :func:`load_split` filters them out.

    Args:
      specs: data specs, or a ``--datasets`` string.
      split: TFDS split (``"train"``, ``"train[:10%]"``, ...).
      data_dir: TFDS data directory.
      label_mode: see :func:`dataset_class_names`.
      taxonomy: see :func:`dataset_class_names`.

    Returns:
      int64 ``[num_classes]``.
    """
    specs = _as_specs(specs)
    builders = [get_builder(s.name, data_dir) for s in specs]
    labels = _resolve_labels(specs, builders, label_mode, taxonomy)
    counts = np.zeros(len(labels.names), np.int64)
    for spec, builder, table in zip(specs, builders, labels.tables, strict=True):
        ds = _as_dataset(
            spec,
            builder,
            split,
            decoders=tfds.decode.PartialDecoding({"label": True}),
            read_config=tfds.ReadConfig(try_autocache=False),
        )
        native = np.zeros(len(table), np.int64)
        for batch in ds.batch(8192).as_numpy_iterator():
            native += np.bincount(batch["label"], minlength=len(table))
        keep = table >= 0
        np.add.at(counts, table[keep], native[keep])
    return counts


def _as_dataset(spec: DataSpec, builder, split: str, **kwargs) -> tf.data.Dataset:
    try:
        return builder.as_dataset(split=split, **kwargs)
    except ValueError as e:
        if "split" in str(e).lower():
            raise ValueError(f"data set {spec.name!r}: {e}") from None
        raise


# ---------------------------------------------------------------- dict maps
def label_map(table: np.ndarray, levels: np.ndarray | None = None):
    """Dict map: keeps the common features and maps the native label.

    Args:
      table: ``[num_native]`` int32, native index -> class index (-1: excluded).
      levels: ``[num_native, num_levels]`` int32 level encodings (taxonomy
        mode), or ``None`` for no ``levels`` key.

    Returns:
      A pure function ``example -> example`` with ``image`` passed through,
      ``label`` int32 (and ``levels``), and the string features.
    """
    table_t = tf.constant(table, tf.int32)
    levels_t = None if levels is None else tf.constant(levels, tf.int32)

    def fn(example: dict) -> dict:
        native = tf.cast(example["label"], tf.int32)
        out = {"image": example["image"], "label": tf.gather(table_t, native)}
        if levels_t is not None:
            out["levels"] = tf.gather(levels_t, native)
        for key in STRING_FEATURES:
            out[key] = example[key]
        return out

    return fn


def keep_labelled(example: dict) -> tf.Tensor:
    """Filter predicate: False for examples whose label maps to null (-1)."""
    return example["label"] >= 0


def _no_autograph(fn):
    # The maps have no Python control flow on tensors; skipping AutoGraph
    # avoids its conversion cost and warnings.
    return tf.autograph.experimental.do_not_convert(fn)


# ------------------------------------------------------------------ pipeline
def _cache_file(prefix: str, builder, split: str, image_size: int, key: str, shard: str) -> str:
    # Everything that changes the cached elements is in the name, so a stale
    # cache is never read back: data set version, split, size, labels, and
    # the preprocessing version.
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{builder.info.full_name}_{split}")
    return f"{prefix}{safe}_{image_size}px_{key}_pp{preprocessing.PREPROCESSING_VERSION}{shard}"


@dataclasses.dataclass(frozen=True)
class _SplitRead:
    """How :func:`load_split` reads every data set of its mixture (resolved arguments)."""

    split: str
    image_size: int
    training: bool
    label_mode: str
    cache: bool | str
    shuffle_buffer: int
    seed: int | None
    repeat: bool | int
    options: tf.data.Options
    input_context: tf.distribute.InputContext | None
    num_pipelines: int
    pipeline_id: int


def _load_one(
    spec: DataSpec, builder, labels: _Labels, index: int, read: _SplitRead
) -> tf.data.Dataset:
    """One data set of a mixture: read, relabelled, decoded, cached, shuffled and repeated.

    Args:
      spec: the data set.
      builder: its prepared TFDS builder.
      labels: the mixture's label tables; ``index`` is ``spec``'s position in them.
      index: position of ``spec`` in the mixture.
      read: the resolved arguments of :func:`load_split`.

    Returns:
      Unbatched examples (see :func:`load_split`).
    """
    split, num_pipelines = read.split, read.num_pipelines
    table = labels.tables[index]
    levels = labels.levels[index] if labels.levels is not None else None
    try:
        num_files = len(builder.info.splits[split].file_instructions)
    except (KeyError, ValueError):
        num_files = 0  # as_dataset below raises the clear error
    # Shard by files when there are enough of them; else by examples.
    file_shard = num_pipelines > 1 and num_files >= num_pipelines
    example_shard = num_pipelines > 1 and not file_shard
    read_config = tfds.ReadConfig(
        shuffle_seed=read.seed,
        # The cache below holds decoded pixels; TFDS caching the encoded
        # bytes too would only cost memory.
        try_autocache=False,
        input_context=read.input_context if file_shard else None,
        # Example sharding needs the same order in every pipeline.
        num_parallel_calls_for_decode=1 if example_shard else None,
        options=read.options,
    )
    ds = _as_dataset(
        spec,
        builder,
        split,
        decoders={"image": tfds.decode.SkipDecoding()},
        # Example-level sharding needs the same file order on every worker.
        shuffle_files=read.training and not example_shard,
        read_config=read_config,
    )
    if example_shard:
        logging.warning(
            "%s[%s]: %d file(s) for %d input pipelines: sharding by example "
            "(each pipeline reads all files).",
            spec.name,
            split,
            num_files,
            num_pipelines,
        )
        ds = ds.shard(num_pipelines, read.pipeline_id)

    image_size = read.image_size
    relabel = label_map(table, levels)
    if (table < 0).any():
        ds = ds.map(_no_autograph(relabel), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.filter(_no_autograph(keep_labelled))
        prepare = _no_autograph(lambda ex: preprocessing.decode_example(ex, image_size))
    else:
        # One fused map: a cheap relabel plus the decode.
        prepare = _no_autograph(
            lambda ex, relabel=relabel: preprocessing.decode_example(relabel(ex), image_size)
        )
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)

    if read.cache is not False:
        if isinstance(read.cache, str):
            key = read.label_mode
            if labels.levels is not None:
                digest = hashlib.sha1(repr((labels.names, table.tolist())).encode())
                key += "-" + digest.hexdigest()[:8]
            shard = f"_shard{read.pipeline_id}of{num_pipelines}" if num_pipelines > 1 else ""
            filename = _cache_file(read.cache, builder, split, image_size, key, shard)
            parent = os.path.dirname(filename)
            if parent:
                tf.io.gfile.makedirs(parent)
            ds = ds.cache(filename)
        else:
            ds = ds.cache()
    if read.training:
        ds = ds.shuffle(read.shuffle_buffer, seed=read.seed, reshuffle_each_iteration=True)
    if read.repeat is True:
        ds = ds.repeat()
    elif read.repeat is not False and read.repeat > 1:
        ds = ds.repeat(read.repeat)
    return ds


def load_split(
    specs: Sequence[DataSpec] | str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int,
    batch_size: int,
    training: bool,
    label_mode: str = "native",
    taxonomy: Taxonomy | str | os.PathLike | None = None,
    cache: bool | str = True,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    seed: int | None = None,
    deterministic: bool = False,
    drop_remainder: bool | None = None,
    repeat: bool | int | None = None,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """A batched ``tf.data.Dataset`` of one split of a data set or mixture.

    Args:
      specs: data specs, or a ``--datasets`` string (``"all_taleqani/original:1,pbc:2"``).
      split: TFDS split, e.g. ``"train"``, ``"validation"``, ``"train[:10%]"``.
      data_dir: TFDS data directory (local path or ``gs://``).
      image_size: the square side ``S`` of every image.
      batch_size: the global batch size (divided by the replicas in
        ``input_context``).
      training: shuffle (files and examples), repeat, drop the remainder and
        mix the data sets by weight; otherwise one pass in order with the
        remainder kept, data sets concatenated.
      label_mode: ``"native"`` or ``"taxonomy"`` (adds ``levels``; examples
        whose label maps to null are filtered out). See
        :func:`dataset_class_names`.
      taxonomy: a :class:`Taxonomy` or path (default: the bundled file).
      cache: cache the decoded uint8 images in memory (``True``), in files
        with this path prefix (a ``str``; local or ``gs://``), or not (``False``).
        The cache comes before the shuffle, so every epoch is reshuffled.
        It holds ``S * S * 3`` bytes per image (150 KB at 224 px: 2.6 GB for
        all 17k PBC images); use a file prefix when that does not fit in RAM.
      shuffle_buffer: examples in each data set's shuffle buffer (training).
      seed: seed of the file and example shuffles and of the mixture sampling.
      deterministic: a reproducible element order (``tf.data.Options.deterministic``
        and seeded shuffles; seed 0 when ``seed`` is None). Otherwise parallel
        stages may emit out of order, which is faster.
      drop_remainder: default: ``training`` (static batch shape).
      repeat: ``True`` forever, ``False`` once, or an int number of epochs;
        default: forever when ``training``, else once.
      input_context: from ``strategy.distribute_datasets_from_function``:
        shards the input and uses the per-replica batch size (see the module
        docstring for the sharding policy).

    Returns:
      Dict batches: ``image`` uint8 ``[B, S, S, 3]``, ``label`` int32 ``[B]``
      (an index into :func:`dataset_class_names`), ``levels`` int32
      ``[B, num_levels]`` (taxonomy mode: ``Taxonomy.encode`` of the mapped
      node, -1 below its depth), and ``patient_id``, ``slide_id``, ``source``,
      ``file_name`` string ``[B]``.
    """
    specs = _as_specs(specs)
    image_size = preprocessing.check_image_size(image_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer!r}")
    if cache is not True and cache is not False and not isinstance(cache, str):
        raise ValueError(f"cache must be True, False or a path prefix, got {cache!r}")
    if repeat is not None and not isinstance(repeat, bool):
        if not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be True, False or an epoch count >= 1, got {repeat!r}")
    if drop_remainder is None:
        drop_remainder = training
    if repeat is None:
        repeat = training
    if deterministic and seed is None:
        seed = DEFAULT_SEED

    builders = [get_builder(s.name, data_dir) for s in specs]
    labels = _resolve_labels(specs, builders, label_mode, taxonomy)

    num_pipelines, pipeline_id = 1, 0
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
        num_pipelines = input_context.num_input_pipelines
        pipeline_id = input_context.input_pipeline_id

    options = tf.data.Options()
    options.deterministic = deterministic
    options.autotune.enabled = True
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF
        if input_context is not None
        else tf.data.experimental.AutoShardPolicy.DATA
    )

    if input_context is not None and num_pipelines > 1:
        # Example-level sharding (below) needs the same order in every
        # pipeline: stop tf.data from parallelising TFDS's sequential parse
        # map, which would reorder it when `deterministic` is False.
        options.experimental_optimization.map_parallelization = False

    read = _SplitRead(
        split=split,
        image_size=image_size,
        training=training,
        label_mode=label_mode,
        cache=cache,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        repeat=repeat,
        options=options,
        input_context=input_context,
        num_pipelines=num_pipelines,
        pipeline_id=pipeline_id,
    )
    datasets = [
        _load_one(spec, builder, labels, i, read)
        for i, (spec, builder) in enumerate(zip(specs, builders, strict=True))
    ]

    if len(datasets) == 1:
        ds = datasets[0]
    elif training:
        total = sum(s.weight for s in specs)
        ds = tf.data.Dataset.sample_from_datasets(
            datasets,
            weights=[s.weight / total for s in specs],
            seed=seed,
            stop_on_empty_dataset=False,
        )
    else:
        ds = datasets[0]
        for other in datasets[1:]:
            ds = ds.concatenate(other)

    ds = ds.batch(
        batch_size,
        drop_remainder=drop_remainder,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(options)
