"""The feature store: what ``leukemia_tf.embed`` writes and ``train --from_embeddings`` reads.

A store is a local directory::

  DIR/embedding.json                        what was embedded, how, when (written last)
  DIR/backbone.weights.h5                   the backbone's weights as embedded
  DIR/<split>-00000-of-0000N.npz            per split, numpy shards of at most
                                            EXAMPLES_PER_SHARD examples

Every shard holds ``features`` float32 ``[n, D]`` (the pooled backbone
features: the head's input), ``label`` int32 ``[n]`` (an index into the
store's ``class_names``), ``levels`` int32 ``[n, L]`` (taxonomy label mode
only: ``Taxonomy.encode`` of the label, -1 below its depth), ``dataset``
int32 ``[n]`` (the position of the example's data set in ``datasets``) and
the string ids ``patient_id``, ``slide_id``, ``file_name``, ``source``
(fixed-width unicode, no pickle). The examples are in the input pipeline's
order (``pipeline.load_split(training=False)``): the data sets one after the
other, each in its TFDS order.

``embedding.json`` fingerprints the backbone (registry name, the weights
spec, the sha256 of its weights as embedded, image size, feature dimension,
the input layers (``erase_marks``, ``white_balance``, ``stain_norm``, ``cell_crop``), the Keras / TensorFlow / keras-hub versions), and records the
data sets, label mode, taxonomy, class names, per split the count, class
counts and shard files, and the time taken. A store without it is
incomplete and refused.

This module reads and writes the files (numpy and JSON only: no TensorFlow),
so that a binary can check a store before it imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from leukemia_tf.cli import UserError

#: The metadata file, written last: a store without it is incomplete.
STORE_FILE = "embedding.json"
#: The backbone's weights as embedded (``backbone.save_weights``).
BACKBONE_FILE = "backbone.weights.h5"
#: Version of the layout above.
FORMAT_VERSION = 1
#: Examples per ``.npz`` shard.
EXAMPLES_PER_SHARD = 8192
#: The string ids of every example.
STRING_FEATURES = ("patient_id", "slide_id", "file_name", "source")


class StoreError(UserError, ValueError):
    """A feature store that is missing, incomplete, or does not fit the run (exit 2)."""


@dataclasses.dataclass
class SplitFeatures:
    """The stored features, labels and ids of one split (or a sum of splits)."""

    features: np.ndarray
    label: np.ndarray
    levels: np.ndarray | None
    dataset: np.ndarray
    patient_id: np.ndarray
    slide_id: np.ndarray
    file_name: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by its shard key (``levels`` only when present)."""
        out = {
            "features": self.features,
            "label": self.label,
            "dataset": self.dataset,
            **{key: getattr(self, key) for key in STRING_FEATURES},
        }
        if self.levels is not None:
            out["levels"] = self.levels
        return out

    @classmethod
    def concatenate(cls, parts: Sequence[SplitFeatures]) -> SplitFeatures:
        """The examples of ``parts``, one after the other."""
        if len(parts) == 1:
            return parts[0]
        levels = None if parts[0].levels is None else np.concatenate([p.levels for p in parts])
        return cls(
            features=np.concatenate([p.features for p in parts]),
            label=np.concatenate([p.label for p in parts]),
            levels=levels,
            dataset=np.concatenate([p.dataset for p in parts]),
            **{key: np.concatenate([getattr(p, key) for p in parts]) for key in STRING_FEATURES},
        )


def shard_name(split: str, index: int, count: int) -> str:
    """``<split>-00000-of-00003.npz``."""
    return f"{split}-{index:05d}-of-{count:05d}.npz"


def write_split(
    directory: str, split: str, data: SplitFeatures, per_shard: int = EXAMPLES_PER_SHARD
) -> list[str]:
    """Writes ``data`` as the shards of ``split`` into ``directory``; returns their names."""
    arrays = data.arrays()
    count = max(1, -(-len(data) // per_shard))
    names = []
    for index in range(count):
        part = {k: v[index * per_shard : (index + 1) * per_shard] for k, v in arrays.items()}
        for key in STRING_FEATURES:
            part[key] = np.asarray(part[key], dtype=str)  # fixed-width unicode: no pickle
        name = shard_name(split, index, count)
        np.savez(os.path.join(directory, name), **part)
        names.append(name)
    return names


def weights_fingerprint(weights: Sequence[np.ndarray], paths: Sequence[str] = ()) -> str:
    """sha256 of a model's weights (their values, shapes, dtypes and paths, in order).

    Independent of the file format (an ``.h5`` file carries timestamps), so
    the same weights always give the same digest.
    """
    digest = hashlib.sha256()
    paths = list(paths) or [""] * len(weights)
    for path, value in zip(paths, weights, strict=True):
        value = np.ascontiguousarray(value)
        digest.update(f"{path}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def dataset_names(datasets: str) -> list[str]:
    """The data set names of a ``--datasets`` string, without mixture weights."""
    from leukemia_tf.data.names import parse_datasets

    return [spec.name for spec in parse_datasets(datasets)]


def split_parts(split: str, flag: str) -> list[str]:
    """The stored splits a probe's split flag sums (``train+validation``).

    Raises:
      StoreError: a slice (``train[:10%]``), which a store cannot serve.
    """
    parts = [p.strip() for p in split.split("+")]
    if not all(parts) or any("[" in p or "]" in p for p in parts):
        raise StoreError(
            f"--{flag}={split!r}: a feature store holds whole splits; use split names "
            "joined by '+' (e.g. 'train' or 'train+validation'), no slices"
        )
    return parts


@dataclasses.dataclass
class FeatureStore:
    """A complete store, opened (:func:`open_store`)."""

    path: str
    meta: dict

    @property
    def backbone(self) -> dict:
        return self.meta["backbone"]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def backbone_weights(self) -> str:
        return os.path.join(self.path, BACKBONE_FILE)

    def count(self, split: str) -> int:
        return int(self.meta["splits"][split]["count"])

    def check_split(self, split: str, flag: str) -> list[str]:
        """The stored splits of ``split`` (see :func:`split_parts`), each checked to exist."""
        parts = split_parts(split, flag)
        for part in parts:
            if part not in self.meta["splits"]:
                raise StoreError(
                    f"--{flag}={split!r}: the feature store {self.path} has no split {part!r}; "
                    f"it holds {', '.join(self.splits)}"
                )
        return parts

    def load(self, split: str, flag: str = "split") -> SplitFeatures:
        """The stored examples of ``split`` (``a+b``: both, in that order)."""
        return SplitFeatures.concatenate(
            [self._load_one(part) for part in self.check_split(split, flag)]
        )

    def _load_one(self, split: str) -> SplitFeatures:
        info = self.meta["splits"][split]
        shards = []
        for name in info["shards"]:
            path = os.path.join(self.path, name)
            if not os.path.isfile(path):
                raise StoreError(f"the feature store {self.path} lacks its shard {name}")
            with np.load(path, allow_pickle=False) as data:
                shards.append({k: data[k] for k in data.files})
        arrays = {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}
        out = SplitFeatures(
            features=arrays["features"].astype(np.float32, copy=False),
            label=arrays["label"].astype(np.int64),
            levels=arrays["levels"].astype(np.int64) if "levels" in arrays else None,
            dataset=arrays["dataset"].astype(np.int64),
            **{key: arrays[key].astype(object) for key in STRING_FEATURES},
        )
        if len(out) != int(info["count"]):
            raise StoreError(
                f"the feature store {self.path} holds {len(out)} examples of split {split!r}, "
                f"its {STORE_FILE} says {info['count']}"
            )
        return out


def open_store(path: str | os.PathLike, flag: str = "from_embeddings") -> FeatureStore:
    """Opens a complete store.

    Raises:
      StoreError: naming ``--<flag>``: no such directory, no ``embedding.json``
        (not a store, or a write cut short), another format version, or no
        backbone weights.
    """
    given = os.fspath(path)
    if "://" in given:
        raise StoreError(f"--{flag}={given!r}: feature stores are local directories")
    directory = os.path.expanduser(given)
    if not os.path.isdir(directory):
        raise StoreError(f"--{flag}={given!r} does not exist")
    meta_path = os.path.join(directory, STORE_FILE)
    if not os.path.isfile(meta_path):
        raise StoreError(
            f"--{flag}={given!r} holds no {STORE_FILE}: not a feature store written by "
            "python -m leukemia_tf.embed (or its write was cut short)"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_VERSION:
        raise StoreError(
            f"--{flag}={given!r}: store format {meta.get('format')!r}, this version reads "
            f"format {FORMAT_VERSION}; embed again"
        )
    if not os.path.isfile(os.path.join(directory, BACKBONE_FILE)):
        raise StoreError(f"--{flag}={given!r} lacks {BACKBONE_FILE}")
    return FeatureStore(path=directory, meta=meta)


def is_complete(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a store's ``embedding.json``."""
    return os.path.isfile(os.path.join(os.path.expanduser(os.fspath(path)), STORE_FILE))


def write_meta(directory: str, meta: dict) -> None:
    with open(os.path.join(directory, STORE_FILE), "w") as f:
        json.dump(meta, f, indent=2, default=str)
        f.write("\n")


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
