"""Selective classification: how good are the answers a model chooses to give?

A classifier that may refer an example to a human instead of answering is
scored by the risk (error rate) of the examples it accepts against the
fraction it accepts (the coverage), Geifman & El-Yaniv, "Selective
classification for deep neural networks", NeurIPS 2017.

Conventions (stated in every report):

* ``confidence`` is a float ``[N]``, higher = more trustworthy (e.g. the
  maximum class probability). An example is **accepted** when
  ``confidence >= threshold``; examples with equal confidence are accepted or
  referred together, so every quantity here is invariant to the order of
  ties.
* ``correct`` is a bool ``[N]``: whether the model's answer is right.
* Coverage is the accepted fraction, risk the error rate of the accepted
  examples (``None`` when nothing is accepted), accuracy ``1 - risk``.
* A fitted threshold of ``None`` means "refer everything".

Group level (slide, patient): a group is referred when more than a given
fraction of its cells is referred; an accepted group is decided by the mean
probabilities of its accepted cells.

Pure NumPy (no TensorFlow); every value returned is a plain Python number,
list or dict, ready for JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Target coverages reported by default.
DEFAULT_COVERAGES = (0.8, 0.9, 0.95)

#: At most this many points of the risk-coverage curve go into a summary.
MAX_CURVE_POINTS = 200


# ----------------------------------------------------------------- helpers
def _inputs(correct, confidence) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``correct`` (bool) and ``confidence`` (float64) arrays."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct)
    if confidence.ndim != 1 or len(confidence) == 0:
        raise ValueError(f"confidence must be a non-empty 1-D array, got shape {confidence.shape}")
    if correct.shape != confidence.shape:
        raise ValueError(
            f"correct and confidence must have the same length, got shapes {correct.shape} and "
            f"{confidence.shape}"
        )
    if correct.dtype != bool:
        if not np.isin(correct, (0, 1)).all():
            raise ValueError(f"correct must be boolean (or 0/1), got values {np.unique(correct)}")
        correct = correct.astype(bool)
    bad = ~np.isfinite(confidence)
    if bad.any():
        raise ValueError(
            f"confidence has {int(bad.sum())} non-finite value(s) of {len(confidence)} "
            f"(first: {confidence[bad][0]})"
        )
    return correct, confidence


def _blocks(correct: np.ndarray, confidence: np.ndarray):
    """The curve's points, one per distinct confidence value, highest first.

    Returns:
      ``(thresholds, n_accepted, n_errors)``: float, int and int arrays; at
      ``thresholds[j]`` the ``n_accepted[j]`` examples with ``confidence >=
      thresholds[j]`` are accepted, ``n_errors[j]`` of them wrong.
    """
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence = confidence[order]
    cumulative_errors = np.cumsum(~correct[order])
    last_of_block = np.r_[sorted_confidence[1:] != sorted_confidence[:-1], True]
    return (
        sorted_confidence[last_of_block],
        np.flatnonzero(last_of_block) + 1,
        cumulative_errors[last_of_block],
    )


def _point(threshold, n_accepted: int, n_errors: int, n: int) -> dict:
    risk = n_errors / n_accepted if n_accepted else None
    return {
        "threshold": None if threshold is None else float(threshold),
        "coverage": n_accepted / n,
        "risk": risk,
        "accuracy": None if risk is None else 1.0 - risk,
        "n_accepted": int(n_accepted),
    }


def _check_coverage(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def _coverage_index(n_accepted: np.ndarray, n: int, target: float) -> int:
    """Index of the highest threshold whose coverage is ``>= target``."""
    return int(np.flatnonzero(n_accepted / n >= target)[0])


# ----------------------------------------------------------------- curves
def risk_coverage(correct, confidence) -> dict:
    """The risk-coverage curve: one point per distinct confidence value.

    Args:
      correct: bool ``[N]``, whether each answer is right.
      confidence: float ``[N]``, higher = more trustworthy.

    Returns:
      ``{"coverage", "risk", "threshold"}``: lists of equal length, from the
      highest threshold (lowest coverage) down to the lowest (coverage 1).
      Tied examples are accepted together.

    Raises:
      ValueError: empty or mismatched inputs, non-finite confidence.
    """
    correct, confidence = _inputs(correct, confidence)
    thresholds, n_accepted, n_errors = _blocks(correct, confidence)
    n = len(correct)
    return {
        "coverage": (n_accepted / n).tolist(),
        "risk": (n_errors / n_accepted).tolist(),
        "threshold": thresholds.tolist(),
    }


def aurc(correct, confidence) -> float:
    """Area under the risk-coverage curve (lower is better).

    The mean over the examples, sorted by confidence descending, of the risk
    of the first ``i`` examples; examples tied in confidence all get the risk
    of the whole tied block, so the value does not depend on the order of
    ties.

    Args:
      correct: bool ``[N]``.
      confidence: float ``[N]``, higher = more trustworthy.

    Returns:
      The AURC, a float in ``[0, 1]``.

    Raises:
      ValueError: empty or mismatched inputs, non-finite confidence.
    """
    correct, confidence = _inputs(correct, confidence)
    _, n_accepted, n_errors = _blocks(correct, confidence)
    block_sizes = np.diff(n_accepted, prepend=0)
    return float((block_sizes * n_errors / n_accepted).sum() / len(correct))


def _oracle_aurc(n: int, n_errors: int) -> float:
    """AURC of the ordering that puts every correct example first."""
    i = np.arange(1, n + 1)
    return float((np.maximum(i - (n - n_errors), 0) / i).mean())


def excess_aurc(correct, confidence) -> float:
    """AURC minus that of an oracle ordering (all correct examples first).

    The oracle has the same error rate, so this isolates the quality of the
    ranking from the accuracy (0 for a perfect ranking).

    Args:
      correct: bool ``[N]``.
      confidence: float ``[N]``, higher = more trustworthy.

    Returns:
      The excess AURC (``>= 0`` up to rounding).

    Raises:
      ValueError: empty or mismatched inputs, non-finite confidence.
    """
    correct, confidence = _inputs(correct, confidence)
    return aurc(correct, confidence) - _oracle_aurc(len(correct), int((~correct).sum()))


def at_coverage(correct, confidence, coverages: Sequence[float] = DEFAULT_COVERAGES) -> dict:
    """Risk and accuracy at target coverages.

    For each target, the smallest set of top-confidence examples whose
    coverage is at least the target (tied examples included together, so the
    coverage reached may exceed the target).

    Args:
      correct: bool ``[N]``.
      confidence: float ``[N]``, higher = more trustworthy.
      coverages: target coverages, each in ``(0, 1]``.

    Returns:
      ``{"<target>": {"threshold", "coverage", "risk", "accuracy",
      "n_accepted"}}``, keyed like ``"0.9"``.

    Raises:
      ValueError: a coverage outside ``(0, 1]``; empty or mismatched inputs,
        non-finite confidence.
    """
    correct, confidence = _inputs(correct, confidence)
    targets = [_check_coverage(c, "coverages") for c in coverages]
    thresholds, n_accepted, n_errors = _blocks(correct, confidence)
    n = len(correct)
    out = {}
    for target in targets:
        j = _coverage_index(n_accepted, n, target)
        out[f"{target:g}"] = _point(thresholds[j], n_accepted[j], n_errors[j], n)
    return out


def fit_threshold(
    correct,
    confidence,
    *,
    target_coverage: float | None = None,
    max_risk: float | None = None,
) -> dict:
    """Fits the acceptance threshold for a target coverage or a maximum risk.

    Args:
      correct: bool ``[N]`` on the fitting split (validation).
      confidence: float ``[N]``, higher = more trustworthy.
      target_coverage: in ``(0, 1]``: the highest threshold whose coverage
        is at least this (the most selective such rule).
      max_risk: in ``[0, 1)``: the lowest threshold whose accepted risk is at
        most this (the largest such coverage). When no threshold achieves
        it, the threshold is ``None`` ("refer everything", coverage 0).

    Returns:
      ``{"threshold", "coverage", "risk", "n", "target", "target_value"}``;
      ``threshold`` a float or ``None``, ``risk`` ``None`` when nothing is
      accepted, ``target`` ``"coverage"`` or ``"risk"``.

    Raises:
      ValueError: both or neither of ``target_coverage`` / ``max_risk``; a
        value out of range (the message names ``--target_coverage`` or
        ``--max_risk``); empty or mismatched inputs, non-finite confidence.
    """
    if (target_coverage is None) == (max_risk is None):
        raise ValueError(
            "give exactly one of --target_coverage and --max_risk, got "
            f"--target_coverage={target_coverage!r} and --max_risk={max_risk!r}"
        )
    if target_coverage is not None:
        target_coverage = _check_coverage(target_coverage, "--target_coverage")
    else:
        try:
            max_risk = float(max_risk)
        except (TypeError, ValueError):
            raise ValueError(f"--max_risk must be a number in [0, 1), got {max_risk!r}") from None
        if not 0.0 <= max_risk < 1.0:
            raise ValueError(f"--max_risk must be in [0, 1), got {max_risk}")
    correct, confidence = _inputs(correct, confidence)
    thresholds, n_accepted, n_errors = _blocks(correct, confidence)
    n = len(correct)
    if target_coverage is not None:
        j = _coverage_index(n_accepted, n, target_coverage)
        point = _point(thresholds[j], n_accepted[j], n_errors[j], n)
        target, value = "coverage", target_coverage
    else:
        ok = np.flatnonzero(n_errors / n_accepted <= max_risk)
        if len(ok):
            j = int(ok[-1])
            point = _point(thresholds[j], n_accepted[j], n_errors[j], n)
        else:
            point = _point(None, 0, 0, n)
        target, value = "risk", max_risk
    return {
        "threshold": point["threshold"],
        "coverage": point["coverage"],
        "risk": point["risk"],
        "n": n,
        "target": target,
        "target_value": value,
    }


def accept(confidence, threshold: float | None) -> np.ndarray:
    """Bool ``[N]``: ``confidence >= threshold`` (``threshold`` ``None``: all False)."""
    confidence = np.asarray(confidence, np.float64)
    if threshold is None:
        return np.zeros(confidence.shape, bool)
    return confidence >= float(threshold)


def summary(
    correct,
    confidence,
    threshold: float | None = None,
    coverages: Sequence[float] = DEFAULT_COVERAGES,
) -> dict:
    """Everything selective about one split, for ``metrics.json``.

    Args:
      correct: bool ``[N]``.
      confidence: float ``[N]``, higher = more trustworthy.
      threshold: a fitted acceptance threshold to score, or ``None`` for none
        (to score a fitted "refer everything", read its coverage 0 from
        :func:`fit_threshold`).
      coverages: target coverages for :func:`at_coverage`.

    Returns:
      ``{"n", "risk", "accuracy", "aurc", "excess_aurc", "at_coverage",
      "curve"}`` (``risk``/``accuracy`` at full coverage; ``curve`` the
      risk-coverage curve down-sampled to at most :data:`MAX_CURVE_POINTS`
      points, always with both ends), plus ``"at_threshold": {"threshold",
      "coverage", "risk", "accuracy", "n_accepted"}`` when a threshold is
      given.

    Raises:
      ValueError: as :func:`at_coverage`; a non-finite threshold.
    """
    correct, confidence = _inputs(correct, confidence)
    n = len(correct)
    risk = float((~correct).mean())
    curve = risk_coverage(correct, confidence)
    points = len(curve["coverage"])
    if points > MAX_CURVE_POINTS:
        keep = np.unique(np.round(np.linspace(0, points - 1, MAX_CURVE_POINTS)).astype(int))
        curve = {key: [values[i] for i in keep] for key, values in curve.items()}
    out = {
        "n": n,
        "risk": risk,
        "accuracy": 1.0 - risk,
        "aurc": aurc(correct, confidence),
        "excess_aurc": excess_aurc(correct, confidence),
        "at_coverage": at_coverage(correct, confidence, coverages),
        "curve": curve,
    }
    if threshold is not None:
        threshold = float(threshold)
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        accepted = accept(confidence, threshold)
        out["at_threshold"] = _point(
            threshold, int(accepted.sum()), int((accepted & ~correct).sum()), n
        )
    return out


# ------------------------------------------------------------- group level
def _check_fraction(max_referred_fraction) -> float:
    try:
        value = float(max_referred_fraction)
    except (TypeError, ValueError):
        raise ValueError(
            f"max_referred_fraction must be a number in [0, 1), got {max_referred_fraction!r}"
        ) from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"max_referred_fraction must be in [0, 1), got {value}")
    return value


def _groups(group_ids, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct ids and each cell's group index."""
    ids = list(group_ids)
    if not ids:
        raise ValueError("group_ids is empty")
    bad = [g for g in ids if not isinstance(g, str) or not g]
    if bad:
        raise ValueError(
            f"group_ids must be non-empty strings, got {len(bad)} bad value(s) (first: {bad[0]!r})"
        )
    if n is not None and len(ids) != n:
        raise ValueError(f"group_ids has {len(ids)} entries for {n} cells")
    return np.unique(np.asarray(ids, dtype=object).astype(str), return_inverse=True)


def group_referral(group_ids, referred, max_referred_fraction: float) -> dict:
    """Which groups (slides, patients) are referred, from their cells' referrals.

    A group is referred when the fraction of its cells that are referred is
    greater than ``max_referred_fraction``, or when all its cells are.

    Args:
      group_ids: ``[N]`` non-empty string id of each cell's group.
      referred: bool ``[N]``, whether each cell is referred.
      max_referred_fraction: in ``[0, 1)``; 0 refers a group as soon as one
        of its cells is referred.

    Returns:
      ``{"n_groups", "n_referred", "coverage", "max_referred_fraction",
      "groups": [{"id", "n_cells", "n_referred_cells", "referred"}]}``,
      groups in sorted id order.

    Raises:
      ValueError: a bad fraction, empty or non-string ids, length mismatch.
    """
    fraction = _check_fraction(max_referred_fraction)
    referred = np.asarray(referred, bool)
    if referred.ndim != 1:
        raise ValueError(f"referred must be 1-D, got shape {referred.shape}")
    names, inverse = _groups(group_ids, len(referred))
    n_cells = np.bincount(inverse, minlength=len(names))
    n_referred_cells = np.bincount(inverse, weights=referred, minlength=len(names)).astype(int)
    group_referred = (n_referred_cells / n_cells > fraction) | (n_referred_cells == n_cells)
    return {
        "n_groups": len(names),
        "n_referred": int(group_referred.sum()),
        "coverage": float(1.0 - group_referred.mean()),
        "max_referred_fraction": fraction,
        "groups": [
            {
                "id": str(name),
                "n_cells": int(n_cells[g]),
                "n_referred_cells": int(n_referred_cells[g]),
                "referred": bool(group_referred[g]),
            }
            for g, name in enumerate(names)
        ],
    }


def group_selective(group_ids, y_true, probs, referred, max_referred_fraction: float) -> dict:
    """Group-level selective classification from cell probabilities and referrals.

    An accepted group (see :func:`group_referral`) is predicted as the argmax
    of the mean probabilities of its accepted cells; at full coverage every
    group is predicted from the mean of all its cells.

    Args:
      group_ids: ``[N]`` non-empty string group id of each cell.
      y_true: int ``[N]`` each cell's class; all cells of a group share it.
      probs: float ``[N, C]`` class probabilities.
      referred: bool ``[N]``, whether each cell is referred.
      max_referred_fraction: in ``[0, 1)``.

    Returns:
      ``{"n_groups", "n_referred", "coverage", "max_referred_fraction",
      "full_coverage_accuracy", "accuracy", "risk", "groups"}``: ``accuracy``
      and ``risk`` over the accepted groups (``None`` if none); ``groups``
      rows ``{"id", "n_cells", "n_referred_cells", "referred", "prediction",
      "prediction_all_cells", "label"}`` (``prediction`` ``None`` for a
      referred group).

    Raises:
      ValueError: a bad fraction or ids, mismatched shapes, a group whose
        cells disagree on the class.
    """
    y_true = np.asarray(y_true, np.int64)
    probs = np.asarray(probs, np.float64)
    referred = np.asarray(referred, bool)
    if probs.ndim != 2 or probs.shape[0] != len(y_true) or referred.shape != y_true.shape:
        raise ValueError(
            f"y_true [N], probs [N, C] and referred [N] must agree, got shapes {y_true.shape}, "
            f"{probs.shape} and {referred.shape}"
        )
    out = group_referral(group_ids, referred, max_referred_fraction)
    names, inverse = _groups(group_ids, len(y_true))
    n_correct_full = 0
    n_accepted = n_correct = 0
    for g, row in enumerate(out["groups"]):
        cells = inverse == g
        labels = np.unique(y_true[cells])
        if len(labels) != 1:
            raise ValueError(
                f"y_true: the cells of group {names[g]!r} have different classes {labels.tolist()}"
            )
        label = int(labels[0])
        full = int(probs[cells].mean(axis=0).argmax())
        n_correct_full += full == label
        prediction = None
        if not row["referred"]:
            prediction = int(probs[cells & ~referred].mean(axis=0).argmax())
            n_accepted += 1
            n_correct += prediction == label
        row.update(prediction=prediction, prediction_all_cells=full, label=label)
    accuracy = n_correct / n_accepted if n_accepted else None
    groups = out.pop("groups")
    out.update(
        full_coverage_accuracy=n_correct_full / len(names),
        accuracy=accuracy,
        risk=None if accuracy is None else 1.0 - accuracy,
        groups=groups,
    )
    return out
