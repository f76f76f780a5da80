"""Runs a backbone once over every split of the data sets into a feature store.

The features are those of the classifier the probe will be joined to: the
classifier is built by :func:`leukemia_tf.models.build_classifier` (float32)
and the store keeps the input of its ``head`` layer, the pooled backbone
features (what :func:`leukemia_tf.models.trust.with_features` returns), for
images read by ``pipeline.load_split(training=False)``: the package's own
decode and resize, no augmentation, no cache. The backbone's weights are
stored beside them (``backbone.weights.h5``), so a randomly initialised
backbone is joined to its head with exactly the weights that were embedded.

The store is written into a temporary directory beside ``output`` and renamed
into place at the end, so ``output`` is either a complete store or untouched.
See :mod:`leukemia_tf.embedding.store` for the layout.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from leukemia_tf.data import build_data_lib, names, pipeline
from leukemia_tf.embedding import store as store_lib
from leukemia_tf.embedding.store import StoreError
from leukemia_tf.models import classifier, registry
from leukemia_tf.taxonomy import Taxonomy
from leukemia_tf.training import model_factory


@dataclasses.dataclass
class EmbedConfig:
    """What ``python -m leukemia_tf.embed`` takes (field names are the flag names)."""

    backbone: str
    output: str
    weights: str = "none"
    #: 0: the backbone's default image size.
    image_size: int = 0
    datasets: str = "leukemia_synthetic"
    label_mode: str = "native"
    taxonomy: str = ""
    data_dir: str = ""
    batch_size: int = 64
    #: Comma-separated splits; empty: every split all the data sets have.
    splits: str = ""
    #: Keep only the first N examples of each split (smoke runs); 0: all.
    max_examples_per_split: int = 0
    erase_marks: bool = False
    white_balance: bool = False
    stain_norm: bool = False
    cell_crop: bool = False
    seed: int = 0
    overwrite: bool = False


def resolve(config: EmbedConfig) -> EmbedConfig:
    """Checks every value that needs no data and returns the config with defaults filled.

    Raises:
      StoreError: naming the flag: a bad value, or ``output`` holds a store
        (or anything else) and ``overwrite`` is off.
    """
    try:
        spec = registry.get_backbone_spec(config.backbone)
    except ValueError as e:
        raise StoreError(f"--backbone={config.backbone!r}: {e}") from None
    image_size = config.image_size or spec.default_image_size
    if image_size < spec.min_image_size or image_size % spec.image_size_multiple:
        raise StoreError(
            f"--image_size={image_size}: backbone {spec.name!r} takes sizes >= "
            f"{spec.min_image_size} that are multiples of {spec.image_size_multiple}"
        )
    if config.label_mode not in pipeline.LABEL_MODES:
        raise StoreError(
            f"--label_mode={config.label_mode!r}: choose one of {', '.join(pipeline.LABEL_MODES)}"
        )
    if "," in config.datasets and config.label_mode != "taxonomy":
        raise StoreError(
            f"--datasets={config.datasets!r} mixes several data sets: set --label_mode=taxonomy "
            "so that their labels share one label space"
        )
    if config.weights not in ("none", "imagenet") and not os.path.exists(
        os.path.expanduser(config.weights)
    ):
        raise StoreError(
            f"--weights={config.weights!r}: no such file; use 'imagenet', 'none' or a weights file"
        )
    if config.batch_size < 1:
        raise StoreError(f"--batch_size={config.batch_size}: must be >= 1")
    if config.max_examples_per_split < 0:
        raise StoreError(f"--max_examples_per_split={config.max_examples_per_split}: must be >= 0")
    output = config.output
    if not output:
        raise StoreError("--output: a directory for the feature store is required")
    if "://" in output:
        raise StoreError(f"--output={output!r}: feature stores are local directories")
    path = os.path.expanduser(output)
    if os.path.exists(path) and not config.overwrite:
        if store_lib.is_complete(path):
            raise StoreError(
                f"--output={output!r} holds a feature store; choose another directory or pass "
                "--overwrite to replace it"
            )
        if not os.path.isdir(path) or os.listdir(path):
            raise StoreError(
                f"--output={output!r} exists and is not an empty directory; choose another or "
                "pass --overwrite to replace it"
            )
    return dataclasses.replace(config, image_size=image_size)


def _versions() -> dict:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "keras_hub": version("keras-hub"),
        "leukemia_tf": version("leukemia_tf"),
    }


def _common_splits(specs, data_dir: str | None, wanted: str) -> tuple[list[str], dict]:
    """The splits to embed: ``wanted`` (checked), else every split all the sets have."""
    available = {
        spec.name: list(names.get_builder(spec.name, data_dir).info.splits.keys()) for spec in specs
    }
    if wanted.strip():
        splits = [s.strip() for s in wanted.split(",") if s.strip()]
        for split in splits:
            for name, have in available.items():
                if split not in have:
                    raise StoreError(
                        f"--splits={wanted!r}: data set {name!r} has no split {split!r}; it has "
                        f"{', '.join(have)}"
                    )
        return splits, {}
    first = available[specs[0].name]
    common = [s for s in first if all(s in have for have in available.values())]
    order = {"train": 0, "validation": 1, "test": 2}
    common.sort(key=lambda s: (order.get(s, 3), s))
    skipped = {
        name: [s for s in have if s not in common]
        for name, have in available.items()
        if any(s not in common for s in have)
    }
    if not common:
        raise StoreError(
            f"--datasets: the data sets share no split ({available}); name them with --splits"
        )
    return common, skipped


def _embed_split(
    forward, specs, split: str, config: EmbedConfig, taxonomy
) -> tuple[store_lib.SplitFeatures, float]:
    """The features, labels and ids of one split; and the seconds the pass took."""
    data_dir = config.data_dir or None
    # Examples per data set (after null-mapped labels are dropped): the
    # evaluation pipeline concatenates the sets in order.
    per_set = [
        int(pipeline.class_counts([s], split, data_dir, config.label_mode, taxonomy).sum())
        for s in specs
    ]
    ds = pipeline.load_split(
        specs,
        split,
        data_dir=data_dir,
        image_size=config.image_size,
        batch_size=config.batch_size,
        training=False,
        label_mode=config.label_mode,
        taxonomy=taxonomy,
        cache=False,
        deterministic=True,
    )
    limit = config.max_examples_per_split or None
    columns: dict[str, list] = {k: [] for k in ("features", "label", "levels")}
    columns.update({k: [] for k in store_lib.STRING_FEATURES})
    seen = 0
    start = time.perf_counter()
    for batch in ds.as_numpy_iterator():
        columns["features"].append(forward(batch["image"]).numpy().astype(np.float32))
        for key in ("label", "levels", *store_lib.STRING_FEATURES):
            if key in batch:
                columns[key].append(batch[key])
        seen += len(batch["label"])
        if limit is not None and seen >= limit:
            break
    seconds = time.perf_counter() - start
    if not columns["label"]:
        raise StoreError(f"split {split!r} of --datasets={config.datasets!r} yielded no examples")
    count = seen if limit is None else min(seen, limit)

    def cat(key):
        return np.concatenate(columns[key])[:count]

    if limit is None and count != sum(per_set):
        raise RuntimeError(
            f"split {split!r}: the pipeline yielded {count} examples, the data sets count "
            f"{sum(per_set)}"
        )
    dataset = np.repeat(np.arange(len(specs), dtype=np.int32), per_set)[:count]
    data = store_lib.SplitFeatures(
        features=cat("features"),
        label=cat("label").astype(np.int32),
        levels=cat("levels").astype(np.int32) if columns["levels"] else None,
        dataset=dataset,
        **{k: np.array([v.decode("utf-8") for v in cat(k)]) for k in store_lib.STRING_FEATURES},
    )
    if not np.isfinite(data.features).all():
        raise RuntimeError(
            f"split {split!r}: the backbone produced non-finite features for "
            f"{int((~np.isfinite(data.features)).any(axis=1).sum())} images"
        )
    return data, seconds


def embed(config: EmbedConfig, log=print) -> dict:
    """Embeds every split of ``config.datasets`` and writes the store to ``config.output``.

    Args:
      config: what to embed, and where (see :class:`EmbedConfig`).
      log: called with a line of progress per split.

    Returns:
      The store's metadata (what ``embedding.json`` holds).

    Raises:
      StoreError: a bad value or a refused ``output`` (see :func:`resolve`), an
        unknown split.
      names.UnknownDatasetError, names.DatasetNotBuiltError: bad data sets.
      ValueError: a backbone that cannot be built as asked (weights that do
        not fit, ...).
    """
    start = time.time()
    config = resolve(config)
    data_dir = config.data_dir or None
    specs = pipeline.parse_datasets(config.datasets)
    names.check_datasets(specs, {}, data_dir)
    build_data_lib.prepare_generated(specs, data_dir)
    splits, skipped = _common_splits(specs, data_dir, config.splits)
    taxonomy = Taxonomy.load(config.taxonomy or None) if config.label_mode == "taxonomy" else None
    class_names = pipeline.dataset_class_names(specs, data_dir, config.label_mode, taxonomy)
    for name, rest in skipped.items():
        log(f"Note: {name}'s splits {rest} are not in every data set: not embedded")

    with model_factory.float32_policy():
        keras.utils.set_random_seed(config.seed)
        model = classifier.build_classifier(
            backbone=config.backbone,
            head="flat",
            num_classes=max(2, len(class_names)),
            image_size=config.image_size,
            weights=config.weights,
            dropout=0.0,
            erase_marks=config.erase_marks,
            white_balance=config.white_balance,
            stain_norm=config.stain_norm,
            cell_crop=config.cell_crop,
        )
    extractor = keras.Model(model.input, model.get_layer("head").input, name="features")
    backbone = classifier.get_backbone(model)
    fingerprint = store_lib.weights_fingerprint(
        backbone.get_weights(), [v.path for v in backbone.weights]
    )
    feature_dim = int(extractor.output.shape[-1])
    size = config.image_size

    # One trace for every split and batch size.
    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
    def forward(images):
        return extractor(tf.cast(images, tf.float32), training=False)

    output = os.path.abspath(os.path.expanduser(config.output))
    parent, name = os.path.split(output.rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        split_meta, images, embed_seconds = {}, 0, 0.0
        for split in splits:
            data, seconds = _embed_split(forward, specs, split, config, taxonomy)
            shards = store_lib.write_split(tmp, split, data)
            split_meta[split] = {
                "count": len(data),
                "class_counts": np.bincount(data.label, minlength=len(class_names)).tolist(),
                "per_dataset": np.bincount(data.dataset, minlength=len(specs)).tolist(),
                "shards": shards,
                "seconds": round(seconds, 3),
            }
            images += len(data)
            embed_seconds += seconds
            log(
                f"{split}: {len(data)} images, {feature_dim} features each, {seconds:.1f} s "
                f"({len(data) / max(seconds, 1e-9):.1f} images/s)"
            )
        backbone.save_weights(os.path.join(tmp, store_lib.BACKBONE_FILE))
        weights_path = None
        if config.weights not in ("none", "imagenet"):
            weights_path = os.path.abspath(os.path.expanduser(config.weights))
        meta = {
            "format": store_lib.FORMAT_VERSION,
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "backbone": {
                "name": config.backbone,
                "weights": config.weights,
                "weights_path": weights_path,
                "sha256": fingerprint,
                "image_size": config.image_size,
                "feature_dim": feature_dim,
                "erase_marks": config.erase_marks,
                "white_balance": config.white_balance,
                "stain_norm": config.stain_norm,
                "cell_crop": config.cell_crop,
                "seed": config.seed,
                "precision": "float32",
                "file": store_lib.BACKBONE_FILE,
            },
            "versions": _versions(),
            "datasets": ",".join(s.name for s in specs),
            "data_dir": config.data_dir,
            "label_mode": config.label_mode,
            "taxonomy": None
            if taxonomy is None
            else {"file": config.taxonomy, "source": str(taxonomy.source)},
            "class_names": class_names,
            "splits": split_meta,
            "skipped_splits": skipped,
            "max_examples_per_split": config.max_examples_per_split,
            "batch_size": config.batch_size,
            "images": images,
            "embed_seconds": round(embed_seconds, 3),
            "images_per_second": round(images / max(embed_seconds, 1e-9), 2),
            "total_seconds": round(time.time() - start, 3),
        }
        store_lib.write_meta(tmp, meta)  # last: the store is complete
        _move_into_place(tmp, output, config.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _move_into_place(tmp: str, output: str, overwrite: bool) -> None:
    """Renames the finished store ``tmp`` to ``output`` (replacing it with ``overwrite``)."""
    if os.path.exists(output):
        if os.path.isdir(output) and not os.listdir(output):
            os.rmdir(output)
        elif not overwrite:
            raise StoreError(f"--output={output!r} appeared while embedding; not replaced")
        else:
            old = f"{tmp}.old"
            os.rename(output, old)
            os.rename(tmp, output)
            if os.path.isdir(old):
                shutil.rmtree(old)
            else:
                os.remove(old)
            return
    os.rename(tmp, output)
