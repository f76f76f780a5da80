"""Per-level evaluation of models whose classes are taxonomy nodes.

At level ``k`` the true node is the label's ancestor at that level (the
``levels`` feature of the input pipeline); only examples whose label reaches
level ``k`` are scored there. Two decision rules give the predicted node:

* **top-down greedy walk** (the decision this package reports first): at
  level 0 the most probable node; at each level below, the most probable
  *child of the node chosen above*; the walk stops at a leaf (then
  :data:`~leukemia_tf.evaluation.metrics.NO_DECISION` below, which counts as
  wrong for an example whose label goes deeper). It is path-consistent by
  construction and mirrors how a hematologist decides.
* **per-level argmax of the marginals**: the most probable node among all
  nodes of the level. With product-along-path probabilities the marginals
  are consistent (a parent's equals the sum of its children's), but their
  per-level argmaxes need not form a path: a parent with two middling
  children can lose at its children's level to a lone child of a rival
  parent. The fraction of examples whose per-level argmaxes do form a path
  is reported as the consistency check.

For a hierarchical head the marginals are ``LabelSpace.level_probabilities``;
for a flat head over taxonomy nodes they are the sums of the class
probabilities under each node.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from leukemia_tf.evaluation import metrics as metrics_lib
from leukemia_tf.taxonomy import NOT_APPLICABLE, Taxonomy

NO_DECISION = metrics_lib.NO_DECISION


def flat_level_probabilities(
    probs: np.ndarray, class_names: Sequence[str], taxonomy: Taxonomy
) -> list[np.ndarray]:
    """Per-level node marginals ``[N, n_k]`` of a flat head over taxonomy nodes.

    A node's probability is the summed probability of the classes at or
    below it.
    """
    probs = np.asarray(probs, np.float64)
    return [probs @ matrix for matrix in taxonomy.level_membership(class_names)]


def greedy_walk(level_probs: Sequence[np.ndarray], taxonomy: Taxonomy) -> np.ndarray:
    """Top-down decisions ``[N, L]``: the most probable child of the node chosen above.

    Args:
      level_probs: per level, ``[N, n_k]`` node marginals (or conditionals).
      taxonomy: the tree.

    Returns:
      int ``[N, L]`` node index per level; ``NO_DECISION`` once the walk has
      reached a leaf (or a node whose children all have zero probability).
    """
    n = len(level_probs[0])
    out = np.full((n, taxonomy.num_levels), NO_DECISION, np.int64)
    chosen = None
    for level, probs in enumerate(level_probs):
        probs = np.asarray(probs, np.float64)
        if chosen is None:
            allowed = np.ones(probs.shape, bool)
        else:
            parents = taxonomy.level_parents(level)
            allowed = (parents[None, :] == chosen[:, None]) & (chosen[:, None] >= 0)
        masked = np.where(allowed & (probs > 0), probs, -np.inf)
        decision = masked.argmax(axis=1)
        chosen = np.where(np.isfinite(masked.max(axis=1)), decision, NO_DECISION)
        out[:, level] = chosen
    return out


def argmax_per_level(level_probs: Sequence[np.ndarray]) -> np.ndarray:
    """``[N, L]``: the most probable node of each level, independently."""
    return np.stack([np.asarray(p).argmax(axis=1) for p in level_probs], axis=1)


def path_consistency(decisions: np.ndarray, true_levels: np.ndarray, taxonomy: Taxonomy) -> dict:
    """How often the decided nodes form a path, over the levels each label reaches.

    An example is consistent when, at every level ``k >= 1`` its label
    reaches and where a decision was made, the decided node's parent is the
    node decided at ``k - 1``.

    Returns:
      ``{"fraction", "n_checked", "n_inconsistent"}``; ``fraction`` is
      ``None`` when no label reaches level 1.
    """
    reached = true_levels >= 0
    checked = (
        reached[:, 1:].any(axis=1) if taxonomy.num_levels > 1 else np.zeros(len(reached), bool)
    )
    ok = np.ones(len(decisions), bool)
    for level in range(1, taxonomy.num_levels):
        parents = taxonomy.level_parents(level)
        here = decisions[:, level]
        test = reached[:, level] & (here >= 0)
        parent_of = np.where(here >= 0, parents[np.maximum(here, 0)], NO_DECISION)
        ok &= ~test | (parent_of == decisions[:, level - 1])
    n_checked = int(checked.sum())
    return {
        "fraction": float(ok[checked].mean()) if n_checked else None,
        "n_checked": n_checked,
        "n_inconsistent": int((~ok & checked).sum()),
    }


def class_agrees_with_walk(
    class_pred: np.ndarray, walk: np.ndarray, class_names: Sequence[str], taxonomy: Taxonomy
) -> float:
    """Fraction of examples whose class decision lies on the greedy walk's path."""
    encodings = np.stack([taxonomy.encode(name) for name in class_names])
    agree = []
    for i, c in enumerate(class_pred):
        code = encodings[c]
        depth = int((code != NOT_APPLICABLE).sum())
        agree.append(bool(np.array_equal(walk[i, :depth], code[:depth])))
    return float(np.mean(agree)) if agree else float("nan")


def evaluate_levels(
    level_probs: Sequence[np.ndarray],
    true_levels: np.ndarray,
    class_pred: np.ndarray,
    class_names: Sequence[str],
    taxonomy: Taxonomy,
    check_marginal_sums: bool = True,
) -> dict:
    """Metrics at every taxonomy level under both decision rules, plus the checks.

    Args:
      level_probs: per level ``[N, n_k]`` node marginals.
      true_levels: int ``[N, L]`` level encodings of the labels (-1 below depth).
      class_pred: int ``[N]`` the class-level decisions.
      class_names: the model's classes (taxonomy nodes).
      taxonomy: the tree.
      check_marginal_sums: measure how far a parent's marginal is from the
        sum of its children's (hierarchical head: should be ~0; a flat head
        over nodes with children, e.g. a class "ALL" without its subtypes,
        is not expected to satisfy it).

    Returns:
      ``{"decision_rule", "levels": [per level: {"level", "nodes", "n",
      "greedy": metrics, "marginal_argmax": metrics} or a "skipped" reason],
      "consistency": {"greedy": ..., "marginal_argmax": ...},
      "class_agrees_with_greedy", "marginal_sum_max_error"}``.
    """
    true_levels = np.asarray(true_levels, np.int64)
    walk = greedy_walk(level_probs, taxonomy)
    argmax = argmax_per_level(level_probs)
    levels = []
    for level, nodes in enumerate(taxonomy.levels):
        mask = true_levels[:, level] >= 0
        entry: dict = {"level": level, "nodes": list(nodes), "n": int(mask.sum())}
        if not mask.any():
            entry["skipped"] = f"no evaluated label reaches level {level}"
        else:
            y = true_levels[mask, level]
            probs = np.asarray(level_probs[level])[mask]
            entry["greedy"] = metrics_lib.classification_metrics(y, walk[mask, level], probs, nodes)
            entry["marginal_argmax"] = metrics_lib.classification_metrics(
                y, argmax[mask, level], probs, nodes
            )
        levels.append(entry)
    # A parent's marginal should equal the sum of its children's.
    worst = 0.0 if check_marginal_sums else None
    for level in range(1, taxonomy.num_levels if check_marginal_sums else 1):
        parents = taxonomy.level_parents(level)
        child = np.asarray(level_probs[level], np.float64)
        parent = np.asarray(level_probs[level - 1], np.float64)
        sums = np.zeros_like(parent)
        np.add.at(sums.T, parents, child.T)
        has_children = np.bincount(parents, minlength=parent.shape[1]) > 0
        if has_children.any():
            worst = max(worst, float(np.abs(sums - parent)[:, has_children].max()))
    return {
        "decision_rule": "greedy",
        "levels": levels,
        "consistency": {
            "greedy": path_consistency(walk, true_levels, taxonomy),
            "marginal_argmax": path_consistency(argmax, true_levels, taxonomy),
        },
        "class_agrees_with_greedy": class_agrees_with_walk(class_pred, walk, class_names, taxonomy),
        "marginal_sum_max_error": worst,
    }
