"""Mistake severity, hierarchical precision/recall and hierarchical back-off.

Conventions (stated in every report):

* **Heights.** A virtual root sits above the top taxonomy level. A node's
  height is ``num_levels - 1 - depth`` (a node of the bottom level: 0, a
  top-level node: ``num_levels - 1``) and the root's is ``num_levels``.
  A leaf above the bottom level keeps its depth's height, as if padded down
  to the bottom level. The severity of a mistake is the height of the lowest
  common ancestor (LCA) of the true and the predicted class (Bertinetto et
  al., "Making better mistakes", CVPR 2020); a correct answer has height 0.
* **Hierarchical precision/recall** (Kiritchenko et al. 2006): each node is
  replaced by itself plus its ancestors (not the root), and the sets are
  micro-averaged over examples; "no answer" (``""``) is the empty set.
* **Back-off** ("hedging your bets", Deng et al. CVPR 2012): the greedy
  top-down walk of :func:`leukemia_tf.evaluation.levels.greedy_walk` stops at
  the first level whose chosen node's probability is below that level's
  threshold, and answers the deepest node accepted (``""``: nothing, the
  example is referred). An answer is correct when it is the true node or
  one of its ancestors. Its specificity is the normalised information gain
  ``1 - log(#classes at or below the node) / log(#classes)``.

Pure NumPy (no TensorFlow); the values returned are plain Python numbers,
lists and dicts, ready for JSON (histogram keys are strings).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from leukemia_tf.evaluation.levels import greedy_walk
from leukemia_tf.taxonomy import NOT_APPLICABLE, ROOT, Taxonomy

#: Target accuracies of the default accuracy-specificity curve.
DEFAULT_ACCURACIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def _check_node(taxonomy: Taxonomy, name, what: str) -> str:
    if not isinstance(name, str) or name not in taxonomy.nodes:
        raise ValueError(f"{what}: {name!r} is not a node of the taxonomy {taxonomy!r}")
    return name


def _check_classes(taxonomy: Taxonomy, class_names: Sequence[str]) -> list[str]:
    class_names = list(class_names)
    if not class_names:
        raise ValueError("class_names is empty")
    for name in class_names:
        _check_node(taxonomy, name, "class_names")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names has duplicates: {class_names}")
    return class_names


# ------------------------------------------------------------------ heights
def height(taxonomy: Taxonomy, node: str) -> int:
    """``num_levels - 1 - depth(node)``; the root (:data:`ROOT`) has ``num_levels``.

    Raises:
      ValueError: ``node`` is not in the taxonomy.
    """
    if node == ROOT:
        return taxonomy.num_levels
    return taxonomy.num_levels - 1 - taxonomy.depth(_check_node(taxonomy, node, "node"))


def lca(taxonomy: Taxonomy, a: str, b: str) -> str:
    """The lowest common ancestor of ``a`` and ``b`` (inclusive); :data:`ROOT` when none.

    Raises:
      ValueError: ``a`` or ``b`` is not in the taxonomy.
    """
    path_a = taxonomy.path(_check_node(taxonomy, a, "a"))
    path_b = taxonomy.path(_check_node(taxonomy, b, "b"))
    common = ROOT
    for x, y in zip(path_a, path_b, strict=False):
        if x != y:
            break
        common = x
    return common


def lca_height(taxonomy: Taxonomy, a: str, b: str) -> int:
    """Height of the LCA of ``a`` and ``b``; 0 when ``a == b`` (no mistake).

    Raises:
      ValueError: ``a`` or ``b`` is not in the taxonomy.
    """
    if a == b:
        _check_node(taxonomy, a, "a")
        return 0
    return height(taxonomy, lca(taxonomy, a, b))


def _height_matrix(taxonomy: Taxonomy, class_names: Sequence[str]) -> np.ndarray:
    """``[C, C]`` LCA heights between classes (0 on the diagonal)."""
    return np.array([[lca_height(taxonomy, a, b) for b in class_names] for a in class_names])


def _labels(values, num_classes: int, what: str) -> np.ndarray:
    values = np.asarray(values, np.int64)
    if values.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {values.shape}")
    if len(values) and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"{what} must be in [0, {num_classes}), got {np.unique(values).tolist()}")
    return values


def mistake_severity(taxonomy: Taxonomy, class_names: Sequence[str], y_true, y_pred) -> dict:
    """How far off the model's mistakes are in the tree.

    Args:
      taxonomy: the tree.
      class_names: the ``C`` classes (taxonomy nodes).
      y_true: int ``[N]`` true class indices.
      y_pred: int ``[N]`` predicted class indices.

    Returns:
      ``{"n", "n_errors", "mean_lca_height", "histogram"}`` over the errors
      only (``y_true != y_pred``): ``mean_lca_height`` ``None`` without
      errors, ``histogram`` ``{"<height>": count}`` for every height from 1
      to ``num_levels``.

    Raises:
      ValueError: unknown class names, indices out of range, length mismatch.
    """
    class_names = _check_classes(taxonomy, class_names)
    y_true = _labels(y_true, len(class_names), "y_true")
    y_pred = _labels(y_pred, len(class_names), "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} and {len(y_pred)}")
    errors = y_true != y_pred
    heights = _height_matrix(taxonomy, class_names)[y_true[errors], y_pred[errors]]
    counts = np.bincount(heights, minlength=taxonomy.num_levels + 1)
    return {
        "n": len(y_true),
        "n_errors": int(errors.sum()),
        "mean_lca_height": float(heights.mean()) if len(heights) else None,
        "histogram": {str(h): int(counts[h]) for h in range(1, taxonomy.num_levels + 1)},
    }


def hierarchical_distance_at_k(
    taxonomy: Taxonomy, class_names: Sequence[str], y_true, probs, k: int
) -> float:
    """Average hierarchical distance@k (Bertinetto et al., CVPR 2020).

    The mean over examples of the mean LCA height between the true class and
    each of the ``k`` most probable classes (ties in probability broken by
    class order); a correct class contributes 0.

    Args:
      taxonomy: the tree.
      class_names: the ``C`` classes (taxonomy nodes).
      y_true: int ``[N]`` true class indices.
      probs: float ``[N, C]`` class probabilities.
      k: how many top classes, ``>= 1``; clipped to ``C``.

    Returns:
      The distance, a float.

    Raises:
      ValueError: ``k < 1``, no examples, mismatched shapes, unknown classes.
    """
    class_names = _check_classes(taxonomy, class_names)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    y_true = _labels(y_true, len(class_names), "y_true")
    probs = np.asarray(probs, np.float64)
    if len(y_true) == 0 or probs.shape != (len(y_true), len(class_names)):
        raise ValueError(
            f"probs must be [N, {len(class_names)}] with N = {len(y_true)} > 0, got {probs.shape}"
        )
    k = min(int(k), len(class_names))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    heights = _height_matrix(taxonomy, class_names)[y_true[:, None], top]
    return float(heights.mean())


# ------------------------------------------------- hierarchical P / R / F1
def _augmented(taxonomy: Taxonomy, node: str, what: str, allow_empty: bool) -> set[str]:
    if node == "" and allow_empty:
        return set()
    return set(taxonomy.path(_check_node(taxonomy, node, what)))


def hierarchical_prf(taxonomy: Taxonomy, true_nodes, pred_nodes) -> dict:
    """Kiritchenko's micro-averaged hierarchical precision, recall and F1.

    Args:
      taxonomy: the tree.
      true_nodes: ``[N]`` true node names.
      pred_nodes: ``[N]`` answered node names; ``""`` for no answer (an
        empty set: it lowers recall, not precision).

    Returns:
      ``{"precision", "recall", "f1"}``: ``precision`` ``None`` when nothing
      was answered, ``f1`` ``None`` when precision is.

    Raises:
      ValueError: a name not in the taxonomy (``""`` is allowed only in
        ``pred_nodes``), length mismatch, no examples.
    """
    true_nodes, pred_nodes = list(true_nodes), list(pred_nodes)
    if not true_nodes or len(true_nodes) != len(pred_nodes):
        raise ValueError(
            f"true_nodes and pred_nodes must be non-empty and of equal length, got "
            f"{len(true_nodes)} and {len(pred_nodes)}"
        )
    overlap = n_true = n_pred = 0
    for t, p in zip(true_nodes, pred_nodes, strict=True):
        true_set = _augmented(taxonomy, t, "true_nodes", allow_empty=False)
        pred_set = _augmented(taxonomy, p, "pred_nodes", allow_empty=True)
        overlap += len(true_set & pred_set)
        n_true += len(true_set)
        n_pred += len(pred_set)
    precision = overlap / n_pred if n_pred else None
    recall = overlap / n_true
    if precision is None:
        f1 = None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


# ----------------------------------------------------------------- back-off
def _check_level_probs(level_probs, taxonomy: Taxonomy, what: str) -> list[np.ndarray]:
    level_probs = [np.asarray(p, np.float64) for p in level_probs]
    if len(level_probs) != taxonomy.num_levels:
        raise ValueError(
            f"{what} has {len(level_probs)} levels, the taxonomy {taxonomy.num_levels}"
        )
    n = len(level_probs[0])
    for level, (probs, nodes) in enumerate(zip(level_probs, taxonomy.levels, strict=True)):
        if probs.shape != (n, len(nodes)):
            raise ValueError(
                f"{what}[{level}] must be [{n}, {len(nodes)}], got shape {probs.shape}"
            )
    return level_probs


def _chosen_probability(probs: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """The probability of each example's chosen node (NaN where none was chosen)."""
    picked = np.take_along_axis(probs, np.maximum(nodes, 0)[:, None], axis=1)[:, 0]
    return np.where(nodes >= 0, picked, np.nan)


def backoff(
    level_probs: Sequence[np.ndarray], taxonomy: Taxonomy, thresholds: Sequence[float | None]
) -> tuple[np.ndarray, list[str]]:
    """Greedy top-down walk that stops where it is not confident enough.

    At level 0 the most probable node, below it the most probable child of
    the node chosen above (:func:`~leukemia_tf.evaluation.levels.greedy_walk`);
    the walk stops at the first level whose chosen node's probability (in
    ``level_probs``, normally the node marginals) is below
    ``thresholds[level]``, or where it has reached a leaf.

    Args:
      level_probs: per level, ``[N, n_k]`` node probabilities.
      taxonomy: the tree.
      thresholds: one per level: a probability, or ``None`` (never answer at
        that level, hence nor below it).

    Returns:
      ``(decisions, answers)``: int ``[N, L]`` accepted node index per level
      (:data:`~leukemia_tf.taxonomy.NOT_APPLICABLE` below the stop), and the
      deepest accepted node's name per example (``""`` when even level 0 is
      refused).

    Raises:
      ValueError: shapes that do not match the taxonomy, a thresholds list
        of the wrong length or with a non-finite value.
    """
    level_probs = _check_level_probs(level_probs, taxonomy, "level_probs")
    thresholds = _check_thresholds(thresholds, taxonomy)
    walk = greedy_walk(level_probs, taxonomy)
    n = len(level_probs[0])
    decisions = np.full((n, taxonomy.num_levels), NOT_APPLICABLE, np.int64)
    active = np.ones(n, bool)
    for level, threshold in enumerate(thresholds):
        nodes = walk[:, level]
        if threshold is None:
            active[:] = False
        else:
            with np.errstate(invalid="ignore"):
                active &= (nodes >= 0) & (
                    _chosen_probability(level_probs[level], nodes) >= threshold
                )
        decisions[active, level] = nodes[active]
    answers = []
    for row in decisions:
        depth = int((row != NOT_APPLICABLE).sum())
        answers.append(taxonomy.levels[depth - 1][row[depth - 1]] if depth else "")
    return decisions, answers


def _check_thresholds(thresholds, taxonomy: Taxonomy) -> list[float | None]:
    thresholds = list(thresholds)
    if len(thresholds) != taxonomy.num_levels:
        raise ValueError(
            f"thresholds must have one entry per level ({taxonomy.num_levels}), got {thresholds}"
        )
    out = []
    for t in thresholds:
        if t is not None:
            t = float(t)
            if not np.isfinite(t):
                raise ValueError(f"thresholds must be finite or None, got {thresholds}")
        out.append(t)
    return out


def fit_backoff_thresholds(
    level_probs: Sequence[np.ndarray], true_levels, taxonomy: Taxonomy, accuracy: float
) -> list[float | None]:
    """Per-level back-off thresholds that reach a target accuracy on the fitting data.

    For each level ``k`` independently, on the examples whose true label
    reaches level ``k`` and whose (unthresholded) greedy walk reaches it:
    the lowest threshold such that the examples whose chosen node has
    probability ``>= threshold`` are right at least ``accuracy`` of the time
    (tied probabilities are accepted together). Levels are fitted
    independently, so the back-off's overall accuracy is not guaranteed to
    equal the target: it is a per-level guarantee on the fitting data.

    Args:
      level_probs: per level, ``[N, n_k]`` node probabilities (validation).
      true_levels: int ``[N, L]`` true node index per level (-1 below the
        label's depth).
      taxonomy: the tree.
      accuracy: target accuracy, in ``(0, 1)``.

    Returns:
      One threshold per level, ``None`` where no threshold reaches the
      target or no example is scored at the level.

    Raises:
      ValueError: ``accuracy`` outside ``(0, 1)`` (naming
        ``--backoff_accuracy``), mismatched shapes.
    """
    try:
        accuracy = float(accuracy)
    except (TypeError, ValueError):
        raise ValueError(
            f"--backoff_accuracy must be a number in (0, 1), got {accuracy!r}"
        ) from None
    if not 0.0 < accuracy < 1.0:
        raise ValueError(f"--backoff_accuracy must be in (0, 1), got {accuracy}")
    level_probs = _check_level_probs(level_probs, taxonomy, "level_probs")
    true_levels = np.asarray(true_levels, np.int64)
    n = len(level_probs[0])
    if true_levels.shape != (n, taxonomy.num_levels):
        raise ValueError(
            f"true_levels must be [{n}, {taxonomy.num_levels}], got shape {true_levels.shape}"
        )
    walk = greedy_walk(level_probs, taxonomy)
    out: list[float | None] = []
    for level in range(taxonomy.num_levels):
        nodes = walk[:, level]
        scored = (true_levels[:, level] >= 0) & (nodes >= 0)
        if not scored.any():
            out.append(None)
            continue
        confidence = _chosen_probability(level_probs[level], nodes)[scored]
        correct = nodes[scored] == true_levels[scored, level]
        order = np.argsort(-confidence, kind="stable")
        sorted_confidence = confidence[order]
        n_correct = np.cumsum(correct[order])
        last = np.r_[sorted_confidence[1:] != sorted_confidence[:-1], True]
        n_accepted = np.flatnonzero(last) + 1
        ok = np.flatnonzero(n_correct[last] / n_accepted >= accuracy)
        out.append(float(sorted_confidence[last][ok[-1]]) if len(ok) else None)
    return out


def specificity(taxonomy: Taxonomy, node: str, class_names: Sequence[str]) -> float:
    """Normalised information gain of answering ``node``.

    ``1 - log(#classes at or below node) / log(#classes)``; ``""`` (no
    answer) is 0 and a class itself is 1 (also a class with other classes
    below it: answering it is a complete answer). With a single class every
    answer is 1.

    Args:
      taxonomy: the tree.
      node: the answered node, or ``""``.
      class_names: the classes (taxonomy nodes, possibly internal; a node's
        classes are those whose path contains it).

    Returns:
      A float in ``[0, 1]``.

    Raises:
      ValueError: an unknown node or class, or a node with no class below it.
    """
    class_names = _check_classes(taxonomy, class_names)
    if node == "":
        return 0.0
    _check_node(taxonomy, node, "node")
    if node in class_names:
        return 1.0
    below = sum(node in taxonomy.path(c) for c in class_names)
    if below == 0:
        raise ValueError(f"node: {node!r} has no class at or below it (classes: {class_names})")
    return 1.0 - math.log(below) / math.log(len(class_names))


def backoff_summary(
    taxonomy: Taxonomy, class_names: Sequence[str], true_nodes, answered_nodes
) -> dict:
    """Accuracy and specificity of back-off answers.

    Args:
      taxonomy: the tree.
      class_names: the model's classes (taxonomy nodes).
      true_nodes: ``[N]`` true node names.
      answered_nodes: ``[N]`` answered node names (``""``: no answer).

    Returns:
      ``{"n", "n_answered", "abstained", "abstained_fraction", "accuracy",
      "mean_specificity", "answered_at_level", "stopped_at_level",
      "hierarchical"}``: ``accuracy`` over the answered examples (an answer
      is right when it is the true node or an ancestor of it; ``None`` if
      none answered); ``mean_specificity`` over all examples (``""`` = 0);
      ``answered_at_level[k]`` the fraction whose answer reaches level ``k``,
      ``stopped_at_level[k]`` the fraction whose answer is a level-``k``
      node; ``hierarchical`` :func:`hierarchical_prf`.

    Raises:
      ValueError: unknown names, length mismatch, no examples.
    """
    class_names = _check_classes(taxonomy, class_names)
    true_nodes, answered_nodes = list(true_nodes), list(answered_nodes)
    hierarchical = hierarchical_prf(taxonomy, true_nodes, answered_nodes)
    n = len(true_nodes)
    answered = [a != "" for a in answered_nodes]
    right = [
        taxonomy.node(a).name in taxonomy.path(t)
        for t, a, ok in zip(true_nodes, answered_nodes, answered, strict=True)
        if ok
    ]
    cache: dict[str, float] = {}
    for a in answered_nodes:
        if a not in cache:
            cache[a] = specificity(taxonomy, a, class_names)
    depths = np.array([taxonomy.depth(a) if a else -1 for a in answered_nodes])
    stopped = [float((depths == k).mean()) for k in range(taxonomy.num_levels)]
    return {
        "n": n,
        "n_answered": len(right),
        "abstained": n - len(right),
        "abstained_fraction": (n - len(right)) / n,
        "accuracy": float(np.mean(right)) if right else None,
        "mean_specificity": float(np.mean([cache[a] for a in answered_nodes])),
        "answered_at_level": [float((depths >= k).mean()) for k in range(taxonomy.num_levels)],
        "stopped_at_level": stopped,
        "hierarchical": hierarchical,
    }


def accuracy_specificity_curve(
    val_level_probs: Sequence[np.ndarray],
    val_true_levels,
    test_level_probs: Sequence[np.ndarray],
    test_true_nodes,
    taxonomy: Taxonomy,
    class_names: Sequence[str],
    accuracies: Sequence[float] = DEFAULT_ACCURACIES,
) -> list[dict]:
    """Back-off at several target accuracies: fitted on validation, scored on test.

    Args:
      val_level_probs: per level ``[N_val, n_k]`` node probabilities.
      val_true_levels: int ``[N_val, L]`` true level encodings.
      test_level_probs: per level ``[N_test, n_k]`` node probabilities.
      test_true_nodes: ``[N_test]`` true node names.
      taxonomy: the tree.
      class_names: the model's classes.
      accuracies: target accuracies, each in ``(0, 1)``.

    Returns:
      One dict per target: ``{"target_accuracy", "thresholds"}`` plus the
      test :func:`backoff_summary`.

    Raises:
      ValueError: as :func:`fit_backoff_thresholds`, :func:`backoff` and
        :func:`backoff_summary`.
    """
    curve = []
    for target in accuracies:
        thresholds = fit_backoff_thresholds(val_level_probs, val_true_levels, taxonomy, target)
        _, answers = backoff(test_level_probs, taxonomy, thresholds)
        curve.append(
            {
                "target_accuracy": float(target),
                "thresholds": thresholds,
                **backoff_summary(taxonomy, class_names, test_true_nodes, answers),
            }
        )
    return curve


def flat_taxonomy(class_names: Sequence[str]) -> Taxonomy:
    """A one-level taxonomy whose nodes are the classes.

    For runs without a taxonomy: back-off then means "answer the class or
    nothing", with the class probabilities as the only level.

    Raises:
      ValueError: no classes, empty or duplicate names.
    """
    class_names = [str(c) for c in class_names]
    if not class_names or any(not c for c in class_names):
        raise ValueError(f"class_names must be non-empty names, got {class_names}")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names has duplicates: {class_names}")
    return Taxonomy({name: None for name in class_names}, source="<flat taxonomy>")
