"""Out-of-distribution (OOD) detection scores: how well a score separates unseen inputs.

Conventions (stated in every report):

* Each score comes with ``higher_is_id``: whether a high score means
  in-distribution (ID). The maximum class probability is ``True``; a
  distance (Mahalanobis) or an energy is ``False``.
* OOD is the positive class of the AUROC; ties between an ID and an OOD
  score count one half.
* An example is **accepted** (treated as ID) at threshold ``t`` when
  ``score >= t`` if ``higher_is_id`` else ``score <= t``; otherwise it is
  **flagged**. A threshold of ``None`` flags everything.
* ``fpr_at_95_tpr`` (lower is better) is the standard OOD figure with ID as
  the "true positive" side: the threshold is the strictest one that still
  accepts at least 95 % of the ID examples (with ties, the fraction accepted
  may exceed 95 %), and the figure is the fraction of OOD examples accepted
  at it.

Pure NumPy (no TensorFlow); the values returned are plain Python numbers
and dicts, ready for JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from leukemia_tf.evaluation.metrics import fast_roc_auc

#: The ID acceptance rate of ``fpr_at_95_tpr``.
ID_TPR = 0.95


def _scores(values, which: str) -> np.ndarray:
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"{which} must be a non-empty 1-D array, got shape {values.shape}")
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(
            f"{which} has {int(bad.sum())} non-finite value(s) of {len(values)} "
            f"(first: {values[bad][0]})"
        )
    return values


def _id_oriented(scores: np.ndarray, higher_is_id: bool) -> np.ndarray:
    """Scores where higher means more in-distribution."""
    if not isinstance(higher_is_id, bool | np.bool_):
        raise ValueError(f"higher_is_id must be a bool, got {higher_is_id!r}")
    return scores if higher_is_id else -scores


def ood_metrics(id_scores, ood_scores, higher_is_id: bool) -> dict:
    """AUROC (OOD positive) and FPR at 95 % ID acceptance of one score.

    Args:
      id_scores: float ``[N_id]`` scores of in-distribution examples.
      ood_scores: float ``[N_ood]`` scores of out-of-distribution examples.
      higher_is_id: whether a high score means in-distribution.

    Returns:
      ``{"auroc", "fpr_at_95_tpr", "threshold_at_95_tpr", "n_id", "n_ood"}``:
      ``auroc`` for separating OOD (positive) from ID, ties counted half;
      ``fpr_at_95_tpr`` the fraction of OOD examples accepted at the
      strictest threshold (in the score's own units,
      ``threshold_at_95_tpr``) that accepts at least 95 % of the ID
      examples.

    Raises:
      ValueError: an empty set or non-finite scores (naming the set and how
        many).
    """
    id_scores = _scores(id_scores, "id_scores")
    ood_scores = _scores(ood_scores, "ood_scores")
    id_oriented = _id_oriented(id_scores, higher_is_id)
    ood_oriented = _id_oriented(ood_scores, higher_is_id)
    is_ood = np.r_[np.zeros(len(id_scores), bool), np.ones(len(ood_scores), bool)]
    auroc = fast_roc_auc(is_ood, -np.r_[id_oriented, ood_oriented])
    # The k-th highest ID score accepts at least k ID examples.
    k = max(1, math.ceil(ID_TPR * len(id_oriented) - 1e-9))
    threshold = np.sort(id_oriented)[::-1][k - 1]
    return {
        "auroc": float(auroc),
        "fpr_at_95_tpr": float((ood_oriented >= threshold).mean()),
        "threshold_at_95_tpr": float(threshold if higher_is_id else -threshold),
        "n_id": len(id_scores),
        "n_ood": len(ood_scores),
    }


def fraction_flagged(scores, threshold: float | None, higher_is_id: bool) -> float:
    """Fraction of examples a fitted threshold flags (rejects) as OOD.

    Args:
      scores: float ``[N]``.
      threshold: accepted means ``score >= threshold`` when ``higher_is_id``,
        ``score <= threshold`` otherwise; ``None`` flags everything.
      higher_is_id: whether a high score means in-distribution.

    Returns:
      The flagged fraction in ``[0, 1]``.

    Raises:
      ValueError: empty or non-finite scores, a non-finite threshold.
    """
    scores = _scores(scores, "scores")
    oriented = _id_oriented(scores, higher_is_id)
    if threshold is None:
        return 1.0
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite or None, got {threshold}")
    return float((oriented < (threshold if higher_is_id else -threshold)).mean())


def table(
    id_scores: Mapping[str, np.ndarray],
    ood_scores: Mapping[str, np.ndarray],
    directions: Mapping[str, bool],
    thresholds: Mapping[str, float | None] | None = None,
) -> dict[str, dict]:
    """:func:`ood_metrics` for several scores at once.

    Args:
      id_scores: ``{score name: ID scores}``.
      ood_scores: ``{score name: OOD scores}``, the same names.
      directions: ``{score name: higher_is_id}``, the same names.
      thresholds: optional ``{score name: fitted threshold or None}``; a
        name given gets ``threshold``, ``flagged_id`` and ``flagged_ood``
        (:func:`fraction_flagged` of each set).

    Returns:
      ``{score name: {"higher_is_id", "auroc", "fpr_at_95_tpr", ...}}`` in
      the order of ``id_scores``.

    Raises:
      ValueError: no scores, names that differ between the mappings, or as
        :func:`ood_metrics`.
    """
    names = list(id_scores)
    if not names:
        raise ValueError("id_scores is empty: no score to tabulate")
    for label, mapping in (("ood_scores", ood_scores), ("directions", directions)):
        if set(mapping) != set(names):
            raise ValueError(
                f"{label} names {sorted(mapping)} differ from id_scores names {sorted(names)}"
            )
    unknown = set(thresholds or {}) - set(names)
    if unknown:
        raise ValueError(f"thresholds names {sorted(unknown)} are not in id_scores {names}")
    out = {}
    for name in names:
        try:
            row = ood_metrics(id_scores[name], ood_scores[name], directions[name])
        except ValueError as e:
            raise ValueError(f"score {name!r}: {e}") from None
        row = {"higher_is_id": bool(directions[name]), **row}
        if thresholds is not None and name in thresholds:
            threshold = thresholds[name]
            row["threshold"] = None if threshold is None else float(threshold)
            row["flagged_id"] = fraction_flagged(id_scores[name], threshold, directions[name])
            row["flagged_ood"] = fraction_flagged(ood_scores[name], threshold, directions[name])
        out[name] = row
    return out


def best_score(results: Mapping[str, dict]) -> str:
    """The name of the score with the highest AUROC in a :func:`table` (first on ties).

    Raises:
      ValueError: an empty table.
    """
    if not results:
        raise ValueError("the OOD table is empty")
    return max(results, key=lambda name: results[name]["auroc"])
