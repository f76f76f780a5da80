"""Classification metrics with per-class detail and bootstrap confidence intervals.

Conventions (stated in every report):

* A prediction is a class index, or :data:`NO_DECISION` (-1) where a decision
  rule stopped above the level being scored (the top-down walk of a
  hierarchical model); it counts as wrong.
* Macro averages (balanced accuracy = mean recall, macro-F1, macro ROC-AUC)
  run over the classes **present in the evaluated labels**. A class absent
  from the split has no recall and no ROC curve; it is listed as absent, and
  predictions into it still count as false positives of the other classes'
  precision.
* ROC-AUC is one-vs-rest per class, on that class's probability.

Accuracy, balanced accuracy and macro-F1 are defined once, on confusion
counts (:func:`headline_from_confusion`; :func:`decision_metrics` from labels
and predictions): the point estimates, the bootstrap replicates (thousands in
a second or two), the slide and patient aggregates and the training loop's
validation figures all use it. The per-class table uses scikit-learn, and
ROC-AUC is scikit-learn's for the point estimate and a rank formula in NumPy
for the replicates; the tests check these against scikit-learn.

Importing this module is light (NumPy and scikit-learn's metrics, no
TensorFlow or matplotlib), so the training loop can use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sklearn.metrics as skm

#: A decision rule made no decision at this level (counts as wrong).
NO_DECISION = -1

#: Headline metrics that get bootstrap confidence intervals.
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc")


def _check(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> None:
    if y_true.ndim != 1 or y_pred.shape != y_true.shape:
        raise ValueError(
            f"labels and predictions must be 1-D of the same length, got {y_true.shape} and "
            f"{y_pred.shape}"
        )
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {np.unique(y_true)}")
    if len(y_pred) and (y_pred.min() < NO_DECISION or y_pred.max() >= num_classes):
        raise ValueError(f"predictions must be in [-1, {num_classes}), got {np.unique(y_pred)}")


def _optional(value: float) -> float | None:
    value = float(value)
    return None if not np.isfinite(value) else value


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray | None,
    class_names: Sequence[str],
) -> dict:
    """Accuracy, balanced accuracy, macro-F1, ROC-AUC and a per-class table.

    Args:
      y_true: int ``[N]`` true class indices.
      y_pred: int ``[N]`` predicted class indices (``NO_DECISION`` allowed).
      probs: float ``[N, C]`` per-class scores for ROC-AUC, or ``None``.
      class_names: the ``C`` class names.

    Returns:
      A JSON-ready dict: ``n``, ``accuracy``, ``balanced_accuracy``,
      ``macro_f1``, ``macro_roc_auc`` (``None`` where undefined),
      ``per_class`` (one dict per class: ``name``, ``support``,
      ``n_predicted``, ``precision``, ``recall``, ``specificity``, ``f1``,
      ``roc_auc``; ``None`` where undefined), ``confusion_matrix`` (counts,
      rows = true, columns = predicted), ``no_decision`` (per true class, only
      when some prediction is ``NO_DECISION``), ``classes_present``,
      ``classes_absent`` and ``notes``.
    """
    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    num_classes = len(class_names)
    _check(y_true, y_pred, num_classes)
    if probs is not None:
        probs = np.asarray(probs, np.float64)
        if probs.shape != (len(y_true), num_classes):
            raise ValueError(f"probs must be [{len(y_true)}, {num_classes}], got {probs.shape}")
    n = len(y_true)
    if n == 0:
        raise ValueError("no examples to score")
    labels = list(range(num_classes))
    present = sorted(int(c) for c in np.unique(y_true))
    notes = []

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    # [C, 2, 2]: [[tn, fp], [fn, tp]] of each class against the rest.
    one_vs_rest = skm.multilabel_confusion_matrix(y_true, y_pred, labels=labels)
    n_predicted = np.array([(y_pred == c).sum() for c in labels])

    roc_auc = np.full(num_classes, np.nan)
    if probs is not None:
        for c in labels:
            positives = int(support[c])
            if 0 < positives < n:
                roc_auc[c] = skm.roc_auc_score(y_true == c, probs[:, c])
        undefined = [class_names[c] for c in present if not np.isfinite(roc_auc[c])]
        if undefined:
            notes.append(
                f"ROC-AUC undefined for {undefined}: every evaluated example is of that class"
            )

    per_class = []
    for c in labels:
        tn, fp = one_vs_rest[c, 0]
        per_class.append(
            {
                "name": class_names[c],
                "support": int(support[c]),
                "n_predicted": int(n_predicted[c]),
                "precision": float(precision[c]) if n_predicted[c] else None,
                "recall": float(recall[c]) if support[c] else None,
                "specificity": float(tn / (tn + fp)) if tn + fp else None,
                "f1": float(f1[c]) if support[c] else None,
                "roc_auc": _optional(roc_auc[c]),
            }
        )
    absent = [class_names[c] for c in labels if c not in present]
    if absent:
        notes.append(
            f"classes absent from the evaluated labels: {absent}; they have no recall, F1 or "
            f"ROC-AUC, and macro averages run over the {len(present)} present classes"
        )
    headline = decision_metrics(y_true, y_pred, num_classes)
    out = {
        "n": n,
        "accuracy": headline["accuracy"],
        "balanced_accuracy": headline["balanced_accuracy"],
        "macro_f1": headline["macro_f1"],
        "macro_roc_auc": _optional(np.nanmean(roc_auc[present]))
        if probs is not None and np.isfinite(roc_auc[present]).any()
        else None,
        "per_class": per_class,
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes_present": [class_names[c] for c in present],
        "classes_absent": absent,
        "notes": notes,
    }
    if (y_pred == NO_DECISION).any():
        out["no_decision"] = [int(((y_true == c) & (y_pred == NO_DECISION)).sum()) for c in labels]
    return out


# ------------------------------------------------------------- fast replicates
def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C + 1]`` counts: rows true class, columns predicted, the last ``NO_DECISION``."""
    y_pred = np.where(y_pred < 0, num_classes, y_pred)
    flat = np.bincount(
        y_true * (num_classes + 1) + y_pred, minlength=num_classes * (num_classes + 1)
    )
    return flat.reshape(num_classes, num_classes + 1)


def headline_from_confusion(counts: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 from :func:`confusion_counts`.

    The one definition of these three figures in the package. Balanced
    accuracy is the mean recall over the classes with support (scikit-learn's
    ``balanced_accuracy_score``); macro-F1 is the mean F1 over the same
    classes (``f1_score(labels=<classes present>, average="macro")``; with
    every class present that is the F1 over all classes). A class without
    support has no recall; predictions into it still count against the
    true class's recall and F1. A ``NO_DECISION`` counts as wrong. With no
    examples every figure is NaN.

    Args:
      counts: ``[C, C + 1]`` counts from :func:`confusion_counts`.

    Returns:
      ``{"accuracy", "balanced_accuracy", "macro_f1"}``, floats.
    """
    num_classes = counts.shape[0]
    tp = np.diag(counts[:, :num_classes]).astype(np.float64)
    support = counts.sum(axis=1)
    predicted = counts[:, :num_classes].sum(axis=0)
    present = support > 0
    n = support.sum()
    fn = support - tp
    fp = predicted - tp
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    return {
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
    }


def decision_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 of decisions (:func:`headline_from_confusion`).

    Args:
      y_true: int ``[N]`` true classes in ``[0, num_classes)``.
      y_pred: int ``[N]`` predicted classes (``NO_DECISION`` allowed), e.g.
        the argmax of the class probabilities.
      num_classes: ``C``.

    Returns:
      ``{"accuracy", "balanced_accuracy", "macro_f1"}``, floats (NaN for no
      examples).

    Raises:
      ValueError: labels or predictions out of range, or of different shapes.
    """
    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    _check(y_true, y_pred, num_classes)
    return headline_from_confusion(confusion_counts(y_true, y_pred, num_classes))


def fast_roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Binary ROC-AUC (Mann-Whitney U with average ranks for ties); NaN if one class only.

    Equal to ``sklearn.metrics.roc_auc_score`` (which integrates the ROC
    curve: the same number).
    """
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based
    ranks = average_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def headline_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray | None, num_classes: int
) -> dict[str, float]:
    """The :data:`HEADLINE` metrics computed the fast way (NaN where undefined)."""
    out = headline_from_confusion(confusion_counts(y_true, y_pred, num_classes))
    if probs is None:
        out["macro_roc_auc"] = float("nan")
        return out
    aucs = [fast_roc_auc(y_true == c, probs[:, c]) for c in np.unique(y_true)]
    aucs = [a for a in aucs if np.isfinite(a)]
    out["macro_roc_auc"] = float(np.mean(aucs)) if aucs else float("nan")
    return out


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray | None,
    num_classes: int,
    clusters: Sequence[str] | np.ndarray | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Percentile bootstrap confidence intervals of the :data:`HEADLINE` metrics.

    Args:
      y_true: int ``[N]`` true classes.
      y_pred: int ``[N]`` predictions (``NO_DECISION`` allowed).
      probs: ``[N, C]`` scores for ROC-AUC, or ``None``.
      num_classes: ``C``.
      clusters: ``[N]`` cluster id of each example (e.g. the patient): whole
        clusters are resampled, as cells of one patient are not independent.
        ``None``: examples are resampled.
      n_resamples: bootstrap replicates; 0 disables the intervals.
      seed: NumPy seed of the resampling.
      confidence: the interval's coverage.

    Returns:
      ``{metric: {"low", "high", "n_valid"}}`` for each headline metric
      (``low``/``high`` ``None`` when no replicate defined the metric), plus
      ``n_resamples``, ``confidence``, ``method`` and ``n_units`` (clusters or
      examples resampled).
    """
    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    if clusters is None:
        groups = [np.array([i]) for i in range(len(y_true))]
    else:
        clusters = np.asarray(clusters)
        _, inverse = np.unique(clusters, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        boundaries = np.flatnonzero(np.diff(inverse[order])) + 1
        groups = np.split(order, boundaries)
    out: dict = {
        "n_resamples": int(n_resamples),
        "confidence": confidence,
        "method": "percentile",
        "n_units": len(groups),
    }
    if n_resamples <= 0:
        return out
    rng = np.random.default_rng(seed)
    values = {name: np.full(n_resamples, np.nan) for name in HEADLINE}
    singletons = clusters is None
    for r in range(n_resamples):
        chosen = rng.integers(0, len(groups), size=len(groups))
        index = chosen if singletons else np.concatenate([groups[g] for g in chosen])
        replicate = headline_metrics(
            y_true[index], y_pred[index], None if probs is None else probs[index], num_classes
        )
        for name in HEADLINE:
            values[name][r] = replicate[name]
    tail = 100 * (1 - confidence) / 2
    for name in HEADLINE:
        valid = values[name][np.isfinite(values[name])]
        if len(valid):
            low, high = np.percentile(valid, [tail, 100 - tail])
            out[name] = {"low": float(low), "high": float(high), "n_valid": int(len(valid))}
        else:
            out[name] = {"low": None, "high": None, "n_valid": 0}
    return out
