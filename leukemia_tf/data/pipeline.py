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

Data set names (``DataSpec``, ``parse_datasets``, ``get_builder`` and the
checks of data set, config and split names, which read no examples) live in
:mod:`leukemia_tf.data.names`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from leukemia_tf.data import folds as folds_lib
from leukemia_tf.data import preprocessing
from leukemia_tf.data.names import DataSpec, as_specs, get_builder, spec_string
from leukemia_tf.data.names import parse_datasets as parse_datasets  # re-exported: callers' name
from leukemia_tf.taxonomy import NOT_APPLICABLE, Taxonomy

#: The string features every builder yields and every batch carries.
STRING_FEATURES = ("patient_id", "slide_id", "source", "file_name")

LABEL_MODES = ("native", "taxonomy")

#: Default per-data-set shuffle buffer, in examples (~600 MB at 224 px).
DEFAULT_SHUFFLE_BUFFER = 4096

#: Seed used when ``deterministic=True`` and no seed is given.
DEFAULT_SEED = 0


# --------------------------------------------------------------------- labels
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
                f"but --datasets={spec_string(specs)} mixes different classes: "
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
            f"--datasets={spec_string(specs)}: every native label maps to null in {tax.source}"
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
    specs = as_specs(specs)
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
      split: TFDS split (``"train"``, ``"train[:10%]"``, ...) or a fold split
        (only its keys are counted).
      data_dir: TFDS data directory.
      label_mode: see :func:`dataset_class_names`.
      taxonomy: see :func:`dataset_class_names`.

    Returns:
      int64 ``[num_classes]``.
    """
    specs = as_specs(specs)
    builders = [get_builder(s.name, data_dir) for s in specs]
    labels = _resolve_labels(specs, builders, label_mode, taxonomy)
    counts = np.zeros(len(labels.names), np.int64)
    resolved = resolve_split(specs, split)
    for spec, builder, table in zip(specs, builders, labels.tables, strict=True):
        if resolved.keys is not None:
            meta = read_split_metadata(spec, builder, resolved)
            native = np.bincount(meta["label"], minlength=len(table))
        else:
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


def resolve_split(specs: Sequence[DataSpec], split: str) -> folds_lib.ResolvedSplit:
    """``split``, or a fold split (:mod:`leukemia_tf.data.folds`) resolved and checked.

    Raises:
      folds_lib.FoldError: the fold file is missing, or was made for other data sets.
    """
    resolved = folds_lib.resolve_split(split)
    if resolved.datasets is not None:
        made_for = sorted(s.name for s in as_specs(resolved.datasets))
        if made_for != sorted(s.name for s in specs):
            raise folds_lib.FoldError(
                f"split {split!r}: the fold file was made for --datasets={resolved.datasets!r}, "
                f"not {spec_string(specs)!r}"
            )
    return resolved


def read_split_metadata(spec: DataSpec, builder, resolved: folds_lib.ResolvedSplit) -> dict:
    """Native labels and string features of a split, without images (kept keys only)."""
    ds = _as_dataset(
        spec,
        builder,
        resolved.split,
        decoders=tfds.decode.PartialDecoding(
            {"label": True, **{key: True for key in STRING_FEATURES}}
        ),
        read_config=tfds.ReadConfig(try_autocache=False),
    )
    columns: dict[str, list] = {key: [] for key in ("label", *STRING_FEATURES)}
    for batch in ds.batch(8192).as_numpy_iterator():
        for key, values in columns.items():
            values.extend(batch[key].tolist())
    out = {"label": np.asarray(columns["label"], np.int64)}
    for key in STRING_FEATURES:
        out[key] = np.array([v.decode("utf-8") for v in columns[key]], dtype=object)
    out["key"] = np.array(
        [folds_lib.example_key(s, f) for s, f in zip(out["source"], out["file_name"], strict=True)],
        dtype=object,
    )
    if resolved.keys is not None:
        keep = np.array([k in resolved.keys for k in out["key"]], bool)
        out = {key: values[keep] for key, values in out.items()}
    return out


def read_metadata(
    specs: Sequence[DataSpec] | str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    label_mode: str = "native",
    taxonomy: Taxonomy | str | os.PathLike | None = None,
) -> dict:
    """Every example's class, key and ids, in one pass without image decoding.

    Args:
      specs, split, data_dir, label_mode, taxonomy: as for :func:`class_counts`.

    Returns:
      ``{"label": int64 [N] (index into dataset_class_names), "native_label":
      int64 [N] (-1: unlabelled), "key", "patient_id", "slide_id", "source",
      "file_name": object [N]}``, data sets in order; examples whose label maps
      to null are left out (as :func:`load_split` leaves them out), unlabelled
      ones (native label -1) are kept with label -1.
    """
    specs = as_specs(specs)
    builders = [get_builder(s.name, data_dir) for s in specs]
    labels = _resolve_labels(specs, builders, label_mode, taxonomy)
    resolved = resolve_split(specs, split)
    parts = []
    for spec, builder, table in zip(specs, builders, labels.tables, strict=True):
        meta = read_split_metadata(spec, builder, resolved)
        native = meta.pop("label")
        mapped = np.where(native >= 0, table[np.maximum(native, 0)], -1) if len(native) else native
        keep = (native < 0) | (mapped >= 0)
        meta = {key: values[keep] for key, values in meta.items()}
        meta.update(label=mapped[keep].astype(np.int64), native_label=native[keep])
        parts.append(meta)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def key_filter(keys: frozenset):
    """Filter predicate: True for examples whose ``source::file_name`` is in ``keys``.

    One ``tf.lookup.StaticHashTable`` lookup per example (before decoding).
    """
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(sorted(keys), tf.string), tf.ones([len(keys)], tf.int32)
        ),
        default_value=0,
    )

    def fn(example: dict) -> tf.Tensor:
        key = tf.strings.join([example["source"], example["file_name"]], separator="::")
        return table.lookup(key) > 0

    return fn


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
    #: Fold splits: the TFDS split read, the keys kept and the cache name.
    resolved: folds_lib.ResolvedSplit | None = None


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
    keys, cache_name = None, split
    if read.resolved is not None:
        split, keys, cache_name = read.resolved.split, read.resolved.keys, read.resolved.cache_name
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
    if keys is not None:
        ds = ds.filter(_no_autograph(key_filter(keys)))

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
            filename = _cache_file(read.cache, builder, cache_name, image_size, key, shard)
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
      split: TFDS split, e.g. ``"train"``, ``"validation"``, ``"train[:10%]"``,
        or a fold split (``DIR/folds.json#0/validation``: the pooled split of
        the fold file, keeping exactly that part's keys; see
        :mod:`leukemia_tf.data.folds`).
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
    specs = as_specs(specs)
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
    resolved = resolve_split(specs, split)

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
        resolved=resolved if resolved.keys is not None else None,
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
