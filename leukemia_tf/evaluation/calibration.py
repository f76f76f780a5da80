"""Calibration: expected calibration error, reliability bins, temperature scaling.

ECE binning (stated in every report): the confidence of a prediction is its
maximum class probability; confidences fall into ``n_bins`` (default 15)
equal-width bins ``(b/n, (b+1)/n]`` (a confidence of exactly 0 goes into the
first); ECE is the example-weighted mean of ``|accuracy - mean confidence|``
over the bins (Guo et al., 2017, "On Calibration of Modern Neural Networks").

Temperature scaling divides every logit by one scalar ``T`` (every level's
logits for a hierarchical head) and is fitted on the validation split by
minimising the negative log-likelihood of the true class. For a softmax the
NLL is convex in ``1/T``, and a hierarchical model's NLL is a sum of such
terms, so a coarse grid over ``log T`` followed by golden-section refinement
finds the minimum reliably, without a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

#: Default number of equal-width confidence bins.
DEFAULT_BINS = 15

#: Temperatures searched (a trained network is rarely off by more than 10x).
T_RANGE = (0.05, 20.0)

#: Probability floor inside the log of the NLL.
_EPS = 1e-12


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = DEFAULT_BINS) -> dict:
    """Per-bin counts, accuracy and mean confidence of the max-probability predictions.

    Args:
      probs: ``[N, C]`` class probabilities.
      y_true: int ``[N]`` true classes.
      n_bins: equal-width bins over [0, 1].

    Returns:
      ``{"edges": [n_bins + 1], "count": [n_bins], "accuracy": [n_bins],
      "confidence": [n_bins]}`` (``None`` accuracy/confidence in empty bins).
    """
    probs = np.asarray(probs, np.float64)
    y_true = np.asarray(y_true, np.int64)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    # Right-closed bins (b/n, (b+1)/n]; 0 joins the first bin.
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    correct_sum = np.bincount(index, weights=correct, minlength=n_bins)
    confidence_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.tolist(),
        "accuracy": [float(a / k) if k else None for a, k in zip(correct_sum, count, strict=True)],
        "confidence": [
            float(s / k) if k else None for s, k in zip(confidence_sum, count, strict=True)
        ],
    }


def expected_calibration_error(
    probs: np.ndarray, y_true: np.ndarray, n_bins: int = DEFAULT_BINS
) -> float:
    """ECE of the max-probability predictions (see the module docstring for the binning)."""
    bins = reliability_bins(probs, y_true, n_bins)
    n = sum(bins["count"])
    if n == 0:
        return float("nan")
    return float(
        sum(
            k * abs(a - c)
            for k, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)
            if k
        )
        / n
    )


def negative_log_likelihood(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Mean ``-log p(true class)`` (probabilities floored at 1e-12)."""
    probs = np.asarray(probs, np.float64)
    y_true = np.asarray(y_true, np.int64)
    picked = probs[np.arange(len(y_true)), y_true]
    return float(-np.mean(np.log(np.maximum(picked, _EPS))))


def fit_temperature(
    nll: Callable[[float], float],
    t_range: tuple[float, float] = T_RANGE,
    grid_points: int = 41,
    tolerance: float = 1e-4,
) -> float:
    """The temperature that minimises ``nll(T)``.

    A grid over ``log T`` brackets the minimum, then golden-section search
    narrows the bracket to ``tolerance`` in ``log T``.

    Args:
      nll: the validation NLL as a function of the temperature.
      t_range: the searched temperatures ``(low, high)``.
      grid_points: points of the initial grid.
      tolerance: width of the final bracket in ``log T``.

    Returns:
      The fitted temperature (within ``t_range``).
    """
    low, high = (math.log(t) for t in t_range)
    grid = np.linspace(low, high, grid_points)
    values = [nll(math.exp(x)) for x in grid]
    if not np.isfinite(values).any():
        raise ValueError("the NLL is not finite at any temperature")
    best = int(np.nanargmin(values))
    a = grid[max(best - 1, 0)]
    b = grid[min(best + 1, grid_points - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(math.exp(c)), nll(math.exp(d))
    while b - a > tolerance:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(math.exp(d))
    candidate = (a + b) / 2
    # Never return something worse than the best grid point.
    if nll(math.exp(candidate)) > values[best]:
        candidate = grid[best]
    return float(math.exp(candidate))
