"""Slide- and patient-level predictions from cell predictions.

A hematologist reads a smear, not a single cell: the cells of one slide (or
one patient) are pooled into one prediction, two ways:

* **mean probability**: the class with the highest mean probability over the
  group's cells;
* **majority vote**: the class predicted (argmax) for the most cells; a tie
  between classes is broken by the higher mean probability (then by the
  lower class index).

Used by ``leukemia_tf.evaluate`` (with labels, to score the groups) and
``leukemia_tf.predict`` (without).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from leukemia_tf.evaluation import metrics as metrics_lib

#: The aggregation methods and the key of each one's predictions.
METHODS = {"mean_probability": "mean_prediction", "majority_vote": "majority_prediction"}


def aggregate(
    group_ids: Sequence[str],
    probs: np.ndarray,
    labels: np.ndarray | None = None,
) -> dict:
    """Pools cell probabilities into one prediction per group (slide or patient).

    Args:
      group_ids: ``[N]`` the group (slide or patient id) of each cell; each
        must be a non-empty string (filter unknown ids out first).
      probs: float ``[N, C]`` class probabilities of each cell.
      labels: optional int ``[N]`` true class of each cell; the cells of one
        group must share it.

    Returns:
      A dict over the groups in sorted id order: ``group_ids`` (list of str),
      ``n_cells`` int ``[G]``, ``mean_probs`` float ``[G, C]``,
      ``mean_prediction`` int ``[G]`` (argmax of ``mean_probs``),
      ``vote_counts`` int ``[G, C]`` (cells predicted as each class),
      ``majority_prediction`` int ``[G]``; with ``labels`` also ``label``
      int ``[G]`` and ``metrics``: ``{"mean_probability": {...},
      "majority_vote": {...}}``, each with ``accuracy``,
      ``balanced_accuracy`` and ``macro_f1`` over the groups.

    Raises:
      ValueError: mismatched lengths, an empty group id (naming the cell
        index), or a group whose cells carry different labels (naming the
        group and its labels).
    """
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {probs.shape}")
    ids = np.asarray([str(g) for g in group_ids], dtype=object)
    if len(ids) != len(probs):
        raise ValueError(f"{len(ids)} group ids for {len(probs)} rows of probabilities")
    if len(ids) == 0:
        raise ValueError("no cells to aggregate")
    empty = np.flatnonzero(ids == "")
    if len(empty):
        raise ValueError(
            f"{len(empty)} cell(s) have an empty group id (first: index {int(empty[0])}); "
            "leave cells without an id out of the aggregation"
        )
    num_classes = probs.shape[1]
    names, inverse = np.unique(ids.astype(str), return_inverse=True)
    num_groups = len(names)
    n_cells = np.bincount(inverse, minlength=num_groups)
    sums = np.zeros((num_groups, num_classes))
    np.add.at(sums, inverse, probs)
    mean_probs = sums / n_cells[:, None]
    votes = np.zeros((num_groups, num_classes), np.int64)
    np.add.at(votes, (inverse, probs.argmax(axis=1)), 1)
    # Ties in the vote go to the higher mean probability: mask the non-tied
    # classes out and take the argmax of the mean (first index on a full tie).
    tied = votes == votes.max(axis=1, keepdims=True)
    majority = np.where(tied, mean_probs, -np.inf).argmax(axis=1)
    out = {
        "group_ids": [str(n) for n in names],
        "n_cells": n_cells,
        "mean_probs": mean_probs,
        "mean_prediction": mean_probs.argmax(axis=1),
        "vote_counts": votes,
        "majority_prediction": majority,
    }
    if labels is None:
        return out
    labels = np.asarray(labels, np.int64)
    if labels.shape != (len(ids),):
        raise ValueError(f"labels must be [{len(ids)}], got shape {labels.shape}")
    group_label = np.zeros(num_groups, np.int64)
    for g in range(num_groups):
        found = np.unique(labels[inverse == g])
        if len(found) > 1:
            raise ValueError(
                f"group '{names[g]}' has cells with different labels {found.tolist()}: a slide "
                "or patient must carry one diagnosis to be scored as a group"
            )
        group_label[g] = found[0]
    out["label"] = group_label
    out["metrics"] = {
        method: metrics_lib.headline_from_confusion(
            metrics_lib.confusion_counts(group_label, out[key], num_classes)
        )
        for method, key in METHODS.items()
    }
    return out
