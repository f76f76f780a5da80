"""Grouped, stratified k-fold assignments, the fold file, and fold splits.

Cross-validation (:mod:`leukemia_tf.crossval`) pools the labelled examples of
one or more splits (by default the recipe's ``train_split`` and
``val_split``; the test split is never touched) and assigns them to ``K``
folds, ``R`` times:

* **Key**: every example is named by ``source::file_name`` (:func:`example_key`),
  which the builders keep unique; a repeated key is refused (its examples
  could not be told apart by the fold filter).
* **Group**: the patient where the example carries one, else the slide, else
  the example itself (:func:`example_group`). Whole groups go to one fold, so
  no patient (or slide) is ever in a fold's training and validation part.
* **Stratified by label**: scikit-learn's ``StratifiedGroupKFold`` with
  ``shuffle=True`` and ``random_state=seed + r`` for repeat ``r``, over the
  examples sorted by key: the assignment depends only on keys, labels,
  groups and the seed (never on reading order).

The result is written as JSON (``folds.json``, :func:`write_fold_file`). A
**fold split** is a split expression that names a part of one fold:
``<path of folds.json>#<fold>/train`` (every pooled example outside the fold)
or ``.../validation`` (the fold itself, the out-of-fold examples). Wherever
the package reads a split (training, evaluation, trust fitting), a fold split
reads the pooled TFDS split recorded in the file and keeps exactly the keys of
that part (:func:`resolve_split`; the filter is applied by
:func:`leukemia_tf.data.pipeline.load_split` and counted by
``pipeline.class_counts``). So a fold's run directory is an ordinary run:
``train --flagfile=DIR/fold_0/flags.txt`` resumes it and ``evaluate
--model_dir=DIR/fold_0 --split=DIR/folds.json#0/validation`` scores its
out-of-fold predictions.

Folds are numbered over all repeats: fold ``i`` is fold ``i % K`` of repeat
``i // K``.

This module imports neither TensorFlow nor scikit-learn at import time (the
flag checks of the binaries use it); scikit-learn is imported by
:func:`assign_folds` only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from leukemia_tf.cli import UserError

#: The fold file's name in a cross-validation directory.
FOLDS_FILE = "folds.json"
#: Version of the fold file's layout.
FOLD_FILE_VERSION = 1
#: The two parts of a fold.
PARTS = ("train", "validation")

_FOLD_SPLIT_RE = re.compile(r"^(?P<file>.+)#(?P<fold>\d+)/(?P<part>train|validation)$")
_KEY_SEPARATOR = "::"


class FoldError(UserError, ValueError):
    """A fold assignment cannot be made or read; the message names the problem (exit 2)."""


# --------------------------------------------------------------- keys, groups
def example_key(source: str, file_name: str) -> str:
    """The stable key of an example: ``source::file_name``."""
    return f"{source}{_KEY_SEPARATOR}{file_name}"


def example_group(key: str, patient_id: str, slide_id: str) -> str:
    """The example's group: ``patient:<id>``, else ``slide:<id>``, else ``example:<key>``."""
    if patient_id:
        return f"patient:{patient_id}"
    if slide_id:
        return f"slide:{slide_id}"
    return f"example:{key}"


def group_kind(group: str) -> str:
    """``"patient"``, ``"slide"`` or ``"example"``: what :func:`example_group` grouped by."""
    return group.split(":", 1)[0]


# ----------------------------------------------------------------- assignment
def assign_folds(
    keys: Sequence[str],
    labels: Sequence[int],
    groups: Sequence[str],
    num_folds: int,
    repeats: int = 1,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    flag: str = "folds",
) -> dict:
    """Assigns whole groups to ``num_folds`` folds, stratified by label, ``repeats`` times.

    Args:
      keys: unique example keys (:func:`example_key`).
      labels: the class index of each example.
      groups: the group of each example (:func:`example_group`).
      num_folds: ``K`` >= 2.
      repeats: ``R`` >= 1 independent assignments (seeds ``seed + r``).
      seed: the shuffle seed of repeat 0.
      class_names: names of the class indices, for messages and counts.
      flag: the flag that set ``num_folds``, named in the messages (``folds``
        for ``crossval``, ``cv_folds`` for ``tune``).

    Returns:
      ``{"keys": sorted keys, "labels", "groups" (aligned with keys),
      "assignment": R lists of the fold (in ``[0, K)``) of each key}``.

    Raises:
      FoldError: ``K`` < 2, ``R`` < 1, repeated keys, or a class with fewer
        groups than folds (naming the class, its group count and ``K``).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if num_folds < 2:
        raise FoldError(f"--{flag}={num_folds}: need at least 2 folds")
    if repeats < 1:
        raise FoldError(f"--repeats={repeats}: need at least 1 repeat")
    n = len(keys)
    if len(labels) != n or len(groups) != n:
        raise ValueError("keys, labels and groups must have the same length")
    repeated = [k for k, c in Counter(keys).items() if c > 1]
    if repeated:
        raise FoldError(
            f"{len(repeated)} example key(s) (source::file_name) occur more than once, e.g. "
            f"{repeated[0]!r}: the folds cannot tell those examples apart"
        )
    order = np.argsort(np.asarray(keys, dtype=object).astype(str), kind="stable")
    keys = [str(keys[i]) for i in order]
    labels = np.asarray(labels, np.int64)[order]
    groups = [str(groups[i]) for i in order]
    names = list(class_names) if class_names is not None else None

    def name(c: int) -> str:
        return names[c] if names is not None else str(c)

    per_class: dict[int, set] = {}
    for label, group in zip(labels.tolist(), groups, strict=True):
        per_class.setdefault(label, set()).add(group)
    for label, members in sorted(per_class.items()):
        if len(members) < num_folds:
            kinds = sorted({group_kind(g) for g in members})
            raise FoldError(
                f"--{flag}={num_folds} is larger than the {len(members)} group(s) "
                f"({'/'.join(kinds)}) of class {name(label)!r}: every fold needs one; use "
                f"--{flag}={max(2, min(len(m) for m in per_class.values()))} or fewer"
            )
    _, group_index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    assignment = []
    for r in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed + r)
        fold_of = np.full(n, -1, np.int64)
        for k, (_, held_out) in enumerate(splitter.split(np.zeros(n), labels, group_index)):
            fold_of[held_out] = k
        assignment.append(fold_of.tolist())
    return {"keys": keys, "labels": labels.tolist(), "groups": groups, "assignment": assignment}


def fold_counts(folds: dict, num_classes: int) -> list[dict]:
    """Per fold (numbered over repeats): repeat, examples, groups and examples per class."""
    labels = np.asarray(folds["labels"], np.int64)
    groups = np.asarray(folds["groups"], dtype=object)
    out = []
    k = folds["num_folds"]
    for r, fold_of in enumerate(folds["assignment"]):
        fold_of = np.asarray(fold_of)
        for j in range(k):
            held = fold_of == j
            out.append(
                {
                    "fold": r * k + j,
                    "repeat": r,
                    "n_examples": int(held.sum()),
                    "n_groups": int(len(set(groups[held].tolist()))),
                    "class_counts": np.bincount(labels[held], minlength=num_classes).tolist(),
                }
            )
    return out


# ------------------------------------------------------------------ the file
def recipe_fingerprint(recipe: dict) -> str:
    """sha1 of the recipe (a config dict without its paths), key order ignored."""
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _read_text(path: str) -> str:
    if "://" in path:
        import tensorflow as tf

        with tf.io.gfile.GFile(path) as f:
            return f.read()
    with open(os.path.expanduser(path)) as f:
        return f.read()


def write_fold_file(path: str, data: dict) -> None:
    """Writes ``data`` as JSON, whole or not at all (``rundir.write_text``)."""
    from leukemia_tf import rundir

    rundir.write_text(path, json.dumps(data, indent=1) + "\n")
    _load.cache_clear()
    _resolve.cache_clear()


def read_fold_file(path: str) -> dict:
    """The fold file at ``path`` (cached per process).

    Raises:
      FoldError: missing, unreadable, or another layout version.
    """
    return _load(os.fspath(path))


@functools.lru_cache(maxsize=8)
def _load(path: str) -> dict:
    try:
        data = json.loads(_read_text(path))
    except FileNotFoundError:
        raise FoldError(
            f"fold file {path!r} not found (python -m leukemia_tf.crossval writes it)"
        ) from None
    except (OSError, ValueError) as e:
        raise FoldError(f"fold file {path!r} cannot be read: {e}") from None
    if data.get("version") != FOLD_FILE_VERSION:
        raise FoldError(
            f"fold file {path!r} has layout version {data.get('version')!r}, this package reads "
            f"{FOLD_FILE_VERSION}"
        )
    return data


# --------------------------------------------------------------- fold splits
def fold_split(path: str, fold: int, part: str) -> str:
    """The split expression of ``part`` (``"train"`` or ``"validation"``) of fold ``fold``."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    return f"{path}#{int(fold)}/{part}"


def is_fold_split(split: str) -> bool:
    """Whether ``split`` is a fold split (:func:`fold_split`)."""
    return bool(_FOLD_SPLIT_RE.match(split.strip()))


def short_name(split: str) -> str:
    """``fold<k>_<part>`` for a fold split (report folder names), else ``split``."""
    match = _FOLD_SPLIT_RE.match(split.strip())
    return f"fold{match['fold']}_{match['part']}" if match else split


@dataclasses.dataclass(frozen=True)
class ResolvedSplit:
    """A split as TFDS reads it, and the keys to keep (``None``: every example).

    Attributes:
      split: the TFDS split expression read.
      keys: the example keys to keep, or ``None``.
      cache_name: names the kept examples in cache file names (split, fold,
        part and a digest of the keys), so two folds never share a cache.
      datasets: the ``--datasets`` the fold file was made for (``None``
        without a fold file).
    """

    split: str
    keys: frozenset | None = None
    cache_name: str = ""
    datasets: str | None = None


def resolve_split(split: str) -> ResolvedSplit:
    """A split expression, or a fold split resolved into its TFDS split and keys.

    Raises:
      FoldError: a fold split whose file is missing or whose fold does not exist.
    """
    match = _FOLD_SPLIT_RE.match(split.strip())
    if not match:
        return ResolvedSplit(split=split, cache_name=split)
    return _resolve(match["file"], int(match["fold"]), match["part"])


@functools.lru_cache(maxsize=64)
def _resolve(path: str, fold: int, part: str) -> ResolvedSplit:
    data = read_fold_file(path)
    k, repeats = data["num_folds"], data["repeats"]
    if fold >= k * repeats:
        raise FoldError(
            f"fold split {path}#{fold}/{part}: the fold file has {k * repeats} folds "
            f"({repeats} repeat(s) of {k}), numbered 0 to {k * repeats - 1}"
        )
    fold_of = np.asarray(data["assignment"][fold // k])
    held = fold_of == fold % k
    keep = held if part == "validation" else ~held
    keys = frozenset(np.asarray(data["keys"], dtype=object)[keep].tolist())
    digest = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:10]
    return ResolvedSplit(
        split=data["split"],
        keys=keys,
        cache_name=f"{data['split']}_fold{fold}{part}_{digest}",
        datasets=data["datasets"],
    )
