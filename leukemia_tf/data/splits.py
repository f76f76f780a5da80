"""Deterministic, stratified, grouped train / validation / test splits.

A group (a patient, a slide, a set of overlapping fields) is never divided
between splits. Groups are assigned split by split so that each split's
class mix stays close to the whole set's, and the result depends only on the
keys, labels, groups and the seed: never on file-system order, hash
randomisation or the number of processes.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.7, "validation": 0.15, "test": 0.15}


def _stable_hash(*parts: str) -> int:
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def grouped_stratified_split(
    keys: Sequence[str],
    labels: Sequence[str | int],
    groups: Sequence[str] | None = None,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> dict[str, str]:
    """Assigns each key to a split.

    Args:
      keys: unique example keys (e.g. relative file paths).
      labels: the label of each example (for stratification).
      groups: the group of each example; examples of one group land in one
        split. ``None`` or an empty string makes an example its own group.
      fractions: split name -> fraction of examples (normalised to sum 1).
      seed: changes the assignment; the same seed gives the same result.

    Returns:
      ``{key: split_name}``.

    Raises:
      ValueError: lengths differ, keys repeat, or fractions are invalid.
    """
    n = len(keys)
    if len(labels) != n or (groups is not None and len(groups) != n):
        raise ValueError("keys, labels and groups must have the same length")
    if len(set(keys)) != n:
        dupes = [k for k, c in Counter(keys).items() if c > 1][:5]
        raise ValueError(f"keys must be unique; repeated: {dupes}")
    names = list(fractions)
    weights = np.array([float(fractions[s]) for s in names])
    if not names or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"invalid split fractions {dict(fractions)}")
    weights = weights / weights.sum()

    # Group -> its examples' labels. Ungrouped examples are their own group.
    group_of = [
        (f"group:{groups[i]}" if groups is not None and groups[i] else f"key:{keys[i]}")
        for i in range(n)
    ]
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(group_of):
        members[g].append(i)

    classes = sorted({str(label) for label in labels})
    class_index = {c: j for j, c in enumerate(classes)}
    totals = np.zeros(len(classes))
    group_counts: dict[str, np.ndarray] = {}
    for g, idx in members.items():
        counts = np.zeros(len(classes))
        for i in idx:
            counts[class_index[str(labels[i])]] += 1
        group_counts[g] = counts
        totals += counts
    targets = weights[:, None] * totals[None, :]  # [splits, classes]

    # Big groups first (they are the hard ones to place), ties broken by a
    # seeded hash so that order on disk never matters.
    order = sorted(members, key=lambda g: (-group_counts[g].sum(), _stable_hash(str(seed), g)))
    filled = np.zeros_like(targets)
    assignment: dict[str, int] = {}
    for g in order:
        counts = group_counts[g]
        # Deficit of each split in this group's classes, relative to target.
        need = ((targets - filled) * (counts > 0)).sum(axis=1) / np.maximum(
            (targets * (counts > 0)).sum(axis=1), 1e-9
        )
        # Prefer the split with the largest relative deficit; tie-break by hash.
        tie = np.array([_stable_hash(str(seed), g, s) % 1000 / 1e6 for s in names])
        best = int(np.argmax(need + tie))
        assignment[g] = best
        filled[best] += counts
    return {keys[i]: names[assignment[group_of[i]]] for i in range(n)}


def check_no_group_leak(split_of: Mapping[str, str], group_of_key: Mapping[str, str]) -> None:
    """Raises ``ValueError`` if a non-empty group appears in more than one split."""
    seen: dict[str, str] = {}
    for key, split in split_of.items():
        group = group_of_key.get(key, "")
        if not group:
            continue
        if seen.setdefault(group, split) != split:
            raise ValueError(f"group '{group}' appears in splits '{seen[group]}' and '{split}'")
