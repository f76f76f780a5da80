"""Selective prediction, OOD scores, mistake severity and hierarchical back-off.

Small hand-checked cases; pure NumPy, no TensorFlow.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from leukemia_tf.evaluation import hierarchy, ood, selective
from leukemia_tf.taxonomy import NOT_APPLICABLE, ROOT, Taxonomy

TREE = {
    "normal": {"lymph": None, "neutro": None},
    "leukemia": {"acute": {"ALL": None, "AML": None}, "CLL": None},
}
CLASSES = ["lymph", "neutro", "ALL", "AML", "CLL"]


@pytest.fixture(scope="module")
def tax():
    return Taxonomy(TREE)


# --------------------------------------------------------------- selective
CORRECT = np.array([True, False, True, False])
CONF = np.array([0.9, 0.8, 0.8, 0.3])


def test_risk_coverage_by_hand():
    curve = selective.risk_coverage(CORRECT, CONF)
    assert curve["threshold"] == [0.9, 0.8, 0.3]
    assert curve["coverage"] == [0.25, 0.75, 1.0]
    assert curve["risk"] == pytest.approx([0.0, 1 / 3, 0.5])


def test_aurc_and_excess_by_hand():
    # Blocks: 1 example at risk 0, 2 tied at risk 1/3, 1 at risk 1/2.
    assert selective.aurc(CORRECT, CONF) == pytest.approx((0 + 2 / 3 + 0.5) / 4)
    # Oracle: risks 0, 0, 1/3, 1/2.
    assert selective.excess_aurc(CORRECT, CONF) == pytest.approx((2 / 3 + 0.5) / 4 - (5 / 6) / 4)


def _brute_aurc(correct, confidence):
    # Each example gets the risk of everything at least as confident as it.
    return np.mean([(~correct[confidence >= c]).mean() for c in confidence])


def test_aurc_ties_invariant_and_brute_force():
    rng = np.random.default_rng(0)
    correct = rng.random(60) < 0.7
    confidence = np.round(rng.random(60), 1)  # many ties
    value = selective.aurc(correct, confidence)
    assert value == pytest.approx(_brute_aurc(correct, confidence))
    for _ in range(5):
        p = rng.permutation(60)
        assert selective.aurc(correct[p], confidence[p]) == pytest.approx(value, abs=1e-12)


def test_oracle_ordering_has_zero_excess():
    correct = np.array([True] * 7 + [False] * 3)
    confidence = np.linspace(1.0, 0.1, 10)
    assert selective.excess_aurc(correct, confidence) == pytest.approx(0.0, abs=1e-12)
    # Reversed ranking is worse.
    assert selective.excess_aurc(correct, confidence[::-1]) > 0.1


def test_at_coverage_includes_ties():
    out = selective.at_coverage(CORRECT, CONF, coverages=(0.5, 0.25, 1.0))
    assert set(out) == {"0.5", "0.25", "1"}
    assert out["0.5"] == {
        "threshold": 0.8,
        "coverage": 0.75,
        "risk": pytest.approx(1 / 3),
        "accuracy": pytest.approx(2 / 3),
        "n_accepted": 3,
    }
    assert out["0.25"]["threshold"] == 0.9 and out["0.25"]["risk"] == 0.0
    assert out["1"]["coverage"] == 1.0 and out["1"]["risk"] == 0.5
    with pytest.raises(ValueError, match="coverages"):
        selective.at_coverage(CORRECT, CONF, coverages=(0.0,))


def test_fit_threshold_coverage_and_risk():
    fit = selective.fit_threshold(CORRECT, CONF, target_coverage=0.5)
    assert fit["threshold"] == 0.8 and fit["coverage"] == 0.75
    assert fit["risk"] == pytest.approx(1 / 3)
    assert fit["target"] == "coverage" and fit["target_value"] == 0.5 and fit["n"] == 4
    fit = selective.fit_threshold(CORRECT, CONF, max_risk=0.4)
    assert fit["threshold"] == 0.8 and fit["coverage"] == 0.75 and fit["target"] == "risk"
    fit = selective.fit_threshold(CORRECT, CONF, max_risk=0.0)
    assert fit["threshold"] == 0.9 and fit["coverage"] == 0.25 and fit["risk"] == 0.0
    # Non-monotone risk: the lowest threshold that satisfies it wins.
    fit = selective.fit_threshold(CORRECT, CONF, max_risk=0.5)
    assert fit["threshold"] == 0.3 and fit["coverage"] == 1.0
    # Unreachable: the most confident example is wrong.
    fit = selective.fit_threshold([False, True], [0.9, 0.1], max_risk=0.4)
    assert fit["threshold"] is None and fit["coverage"] == 0.0 and fit["risk"] is None
    assert not selective.accept([0.9, 0.1], fit["threshold"]).any()
    assert selective.accept([0.9, 0.1, 0.5], 0.5).tolist() == [True, False, True]
    json.dumps(fit)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"target_coverage": 0.0}, "--target_coverage"),
        ({"target_coverage": 1.5}, "--target_coverage"),
        ({"target_coverage": float("nan")}, "--target_coverage"),
        ({"max_risk": 1.0}, "--max_risk"),
        ({"max_risk": -0.1}, "--max_risk"),
        ({"target_coverage": 0.9, "max_risk": 0.1}, "--target_coverage"),
        ({}, "--max_risk"),
    ],
)
def test_fit_threshold_bad_values(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        selective.fit_threshold(CORRECT, CONF, **kwargs)


def test_fit_threshold_bad_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        selective.fit_threshold([], [], target_coverage=0.9)
    with pytest.raises(ValueError, match="same length"):
        selective.fit_threshold([True], [0.1, 0.2], target_coverage=0.9)
    with pytest.raises(ValueError, match="non-finite"):
        selective.fit_threshold([True, False], [0.1, np.nan], target_coverage=0.9)


def test_summary_is_json_ready_and_downsampled():
    rng = np.random.default_rng(1)
    correct = rng.random(1000) < 0.8
    confidence = rng.random(1000)
    out = selective.summary(correct, confidence, threshold=0.5)
    json.dumps(out)
    assert out["n"] == 1000 and out["accuracy"] == pytest.approx(correct.mean())
    assert len(out["curve"]["coverage"]) <= selective.MAX_CURVE_POINTS
    assert out["curve"]["coverage"][-1] == 1.0
    accepted = confidence >= 0.5
    assert out["at_threshold"]["coverage"] == pytest.approx(accepted.mean())
    assert out["at_threshold"]["risk"] == pytest.approx((~correct[accepted]).mean())
    assert set(out["at_coverage"]) == {"0.8", "0.9", "0.95"}
    assert "at_threshold" not in selective.summary(correct, confidence)


def test_group_referral_and_selective():
    ids = ["s1"] * 4 + ["s2"] * 2 + ["s3"] * 2
    referred = [True, False, False, False, True, True, False, False]
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    probs = [[0, 1], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.9, 0.1], [0.9, 0.1], [0.2, 0.8]]
    probs.append([0.4, 0.6])
    out = selective.group_referral(ids, referred, 0.25)
    assert [g["referred"] for g in out["groups"]] == [False, True, False]
    assert out["n_referred"] == 1 and out["coverage"] == pytest.approx(2 / 3)
    assert selective.group_referral(ids, referred, 0.2)["n_referred"] == 2
    assert selective.group_referral(ids, referred, 0.0)["n_referred"] == 2
    out = selective.group_selective(ids, y, probs, referred, 0.25)
    json.dumps(out)
    # s1: all cells average to class 1 (wrong), its accepted cells to class 0 (right).
    assert out["full_coverage_accuracy"] == pytest.approx(1 / 3)
    assert out["accuracy"] == 1.0 and out["risk"] == 0.0
    s1, s2, _ = out["groups"]
    assert (s1["prediction"], s1["prediction_all_cells"], s1["label"]) == (0, 1, 0)
    assert s1["n_cells"] == 4 and s1["n_referred_cells"] == 1
    assert s2["referred"] and s2["prediction"] is None
    everything = selective.group_selective(ids, y, probs, [True] * 8, 0.5)
    assert everything["coverage"] == 0.0 and everything["accuracy"] is None
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="max_referred_fraction"):
            selective.group_referral(ids, referred, bad)
    with pytest.raises(ValueError, match="'s2'"):
        selective.group_selective(ids, [0, 0, 0, 0, 1, 0, 1, 1], probs, referred, 0.25)
    with pytest.raises(ValueError, match="group_ids"):
        selective.group_referral(["s1", ""], [False, False], 0.1)


# --------------------------------------------------------------------- OOD
def test_ood_auroc_perfect_chance_and_ties():
    assert ood.ood_metrics([1, 2, 3], [-1, 0], True)["auroc"] == 1.0
    assert ood.ood_metrics([1, 2, 3], [1, 2, 3], True)["auroc"] == 0.5
    # Pairs (ID, OOD): (1, 1) tie = 1/2, the other three separated.
    assert ood.ood_metrics([1, 2], [1, 0], True)["auroc"] == pytest.approx(0.875)
    # A distance: high = OOD.
    assert ood.ood_metrics([1, 2, 3], [-1, 0], False)["auroc"] == 0.0


def test_fpr_at_95_tpr_and_direction_flip():
    id_scores = np.arange(1, 21, dtype=float)  # 95 % of 20 = 19 accepted: threshold 2
    ood_scores = np.array([1.5, 2.0, 2.5, 30.0, 0.0])
    out = ood.ood_metrics(id_scores, ood_scores, True)
    assert out["threshold_at_95_tpr"] == 2.0
    assert out["fpr_at_95_tpr"] == pytest.approx(3 / 5)
    assert (out["n_id"], out["n_ood"]) == (20, 5)
    flipped = ood.ood_metrics(-id_scores, -ood_scores, False)
    assert flipped["auroc"] == pytest.approx(out["auroc"])
    assert flipped["fpr_at_95_tpr"] == out["fpr_at_95_tpr"]
    assert flipped["threshold_at_95_tpr"] == -2.0
    assert ood.fraction_flagged(ood_scores, 2.0, True) == pytest.approx(2 / 5)
    assert ood.fraction_flagged(-ood_scores, -2.0, False) == pytest.approx(2 / 5)
    assert ood.fraction_flagged(ood_scores, None, True) == 1.0


def test_ood_bad_inputs():
    with pytest.raises(ValueError, match="ood_scores"):
        ood.ood_metrics([1.0], [], True)
    with pytest.raises(ValueError, match=r"id_scores has 2 non-finite"):
        ood.ood_metrics([1.0, np.nan, np.inf], [0.0], True)


def test_ood_table_and_best():
    id_s = {"msp": [0.9, 0.8, 0.95], "energy": [-5.0, -4.0, -6.0]}
    ood_s = {"msp": [0.85, 0.5], "energy": [-1.0, -2.0]}
    directions = {"msp": True, "energy": False}
    out = ood.table(id_s, ood_s, directions, thresholds={"msp": 0.82, "energy": None})
    json.dumps(out)
    assert out["energy"]["auroc"] == 1.0 and out["msp"]["auroc"] == pytest.approx(5 / 6)
    assert ood.best_score(out) == "energy"
    assert out["msp"]["flagged_id"] == pytest.approx(1 / 3)
    assert out["msp"]["flagged_ood"] == pytest.approx(1 / 2)
    assert out["energy"]["flagged_id"] == 1.0
    with pytest.raises(ValueError, match="directions"):
        ood.table(id_s, ood_s, {"msp": True})


# --------------------------------------------------------------- hierarchy
def test_heights_and_lca(tax):
    assert hierarchy.height(tax, "ALL") == 0
    assert hierarchy.height(tax, "CLL") == 1
    assert hierarchy.height(tax, "leukemia") == 2
    assert hierarchy.height(tax, ROOT) == 3
    assert hierarchy.lca(tax, "ALL", "AML") == "acute"
    assert hierarchy.lca(tax, "ALL", "CLL") == "leukemia"
    assert hierarchy.lca(tax, "ALL", "lymph") == ROOT
    assert hierarchy.lca(tax, "acute", "ALL") == "acute"
    assert hierarchy.lca_height(tax, "ALL", "AML") == 1
    assert hierarchy.lca_height(tax, "ALL", "CLL") == 2
    assert hierarchy.lca_height(tax, "lymph", "neutro") == 2
    assert hierarchy.lca_height(tax, "lymph", "AML") == 3
    assert hierarchy.lca_height(tax, "CLL", "CLL") == 0
    with pytest.raises(ValueError, match="'blast'"):
        hierarchy.lca(tax, "blast", "ALL")


def test_mistake_severity_and_distance_at_k(tax):
    c = {name: i for i, name in enumerate(CLASSES)}
    y_true = [c["ALL"], c["ALL"], c["lymph"], c["lymph"]]
    y_pred = [c["AML"], c["CLL"], c["ALL"], c["lymph"]]
    out = hierarchy.mistake_severity(tax, CLASSES, y_true, y_pred)
    assert out == {
        "n": 4,
        "n_errors": 3,
        "mean_lca_height": 2.0,
        "histogram": {"1": 1, "2": 1, "3": 1},
    }
    assert hierarchy.mistake_severity(tax, CLASSES, [0], [0])["mean_lca_height"] is None
    probs = [[0.1, 0.05, 0.5, 0.3, 0.05]]
    d = [
        hierarchy.hierarchical_distance_at_k(tax, CLASSES, [c["ALL"]], probs, k) for k in (1, 2, 3)
    ]
    assert d == pytest.approx([0.0, 0.5, 4 / 3])
    # k clipped to 5: heights 3, 3, 0, 1, 2.
    assert hierarchy.hierarchical_distance_at_k(
        tax, CLASSES, [c["ALL"]], probs, 10
    ) == pytest.approx(1.8)
    with pytest.raises(ValueError, match="k must"):
        hierarchy.hierarchical_distance_at_k(tax, CLASSES, [0], probs, 0)


def test_hierarchical_prf_by_hand(tax):
    out = hierarchy.hierarchical_prf(tax, ["ALL", "lymph", "CLL"], ["acute", "neutro", ""])
    # Overlaps 2 + 1 + 0 = 3; |pred| = 2 + 2 + 0 = 4; |true| = 3 + 2 + 2 = 7.
    assert out["precision"] == pytest.approx(0.75)
    assert out["recall"] == pytest.approx(3 / 7)
    assert out["f1"] == pytest.approx(6 / 11)
    assert hierarchy.hierarchical_prf(tax, ["ALL"], [""]) == {
        "precision": None,
        "recall": 0.0,
        "f1": None,
    }
    with pytest.raises(ValueError, match="'T-ALL'"):
        hierarchy.hierarchical_prf(tax, ["ALL"], ["T-ALL"])


def _level_probs():
    # Levels: [normal, leukemia], [lymph, neutro, acute, CLL], [ALL, AML].
    level0 = [[0.1, 0.9], [0.6, 0.4], [0.05, 0.95], [0.99, 0.01]]
    level1 = [
        [0.05, 0.05, 0.8, 0.1],
        [0.3, 0.3, 0.3, 0.1],
        [0.03, 0.02, 0.05, 0.9],
        [0.98, 0.01, 0.005, 0.005],
    ]
    level2 = [[0.5, 0.3], [0.2, 0.1], [0.03, 0.02], [0.003, 0.002]]
    return [np.array(level0), np.array(level1), np.array(level2)]


def test_backoff_stops_at_the_right_level(tax):
    decisions, answers = hierarchy.backoff(_level_probs(), tax, [0.7, 0.7, 0.7])
    # ALL at 0.5 refused -> acute; level 0 at 0.6 refused -> ""; CLL is a leaf; lymph.
    assert answers == ["acute", "", "CLL", "lymph"]
    assert decisions.tolist() == [[1, 2, -1], [-1, -1, -1], [1, 3, -1], [0, 0, -1]]
    _, answers = hierarchy.backoff(_level_probs(), tax, [0.0, 0.0, 0.0])
    assert answers == ["ALL", "lymph", "CLL", "lymph"]  # lymph: first of two tied children
    _, answers = hierarchy.backoff(_level_probs(), tax, [0.5, None, 0.0])
    assert answers == ["leukemia", "normal", "leukemia", "normal"]
    with pytest.raises(ValueError, match="one entry per level"):
        hierarchy.backoff(_level_probs(), tax, [0.5])


def test_fit_backoff_thresholds_reach_accuracy(tax):
    rng = np.random.default_rng(3)
    n = 300
    leaves = ["lymph", "neutro", "ALL", "AML", "CLL"]
    truth = rng.choice(leaves, n)
    true_levels = np.stack([tax.encode(t) for t in truth])
    # Noisy flat probabilities over the leaves, summed into node marginals.
    logits = rng.normal(size=(n, 5)) + 2.0 * np.eye(5)[[leaves.index(t) for t in truth]]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    from leukemia_tf.evaluation.levels import flat_level_probabilities, greedy_walk

    level_probs = flat_level_probabilities(probs, leaves, tax)
    walk = greedy_walk(level_probs, tax)
    for target in (0.6, 0.8, 0.9):
        thresholds = hierarchy.fit_backoff_thresholds(level_probs, true_levels, tax, target)
        for level, threshold in enumerate(thresholds):
            scored = (true_levels[:, level] >= 0) & (walk[:, level] >= 0)
            nodes = walk[scored, level]
            p = level_probs[level][scored][np.arange(scored.sum()), nodes]
            right = nodes == true_levels[scored, level]
            candidates = [t for t in np.unique(p) if right[p >= t].mean() >= target]
            if threshold is None:
                assert not candidates
            else:
                assert right[p >= threshold].mean() >= target
                assert threshold == min(candidates)  # the lowest such threshold
    for bad in (0.0, 1.0, 1.2):
        with pytest.raises(ValueError, match="--backoff_accuracy"):
            hierarchy.fit_backoff_thresholds(level_probs, true_levels, tax, bad)


def test_specificity(tax):
    assert hierarchy.specificity(tax, "", CLASSES) == 0.0
    assert hierarchy.specificity(tax, "ALL", CLASSES) == 1.0
    assert hierarchy.specificity(tax, "CLL", CLASSES) == 1.0
    assert hierarchy.specificity(tax, "acute", CLASSES) == pytest.approx(
        1 - math.log(2) / math.log(5)
    )
    assert hierarchy.specificity(tax, "leukemia", CLASSES) == pytest.approx(
        1 - math.log(3) / math.log(5)
    )


def test_backoff_summary(tax):
    out = hierarchy.backoff_summary(
        tax, CLASSES, ["ALL", "lymph", "CLL", "AML"], ["acute", "", "CLL", "ALL"]
    )
    json.dumps(out)
    assert out["n"] == 4 and out["abstained"] == 1 and out["n_answered"] == 3
    assert out["accuracy"] == pytest.approx(2 / 3)  # acute right, CLL right, ALL wrong
    spec_acute = 1 - math.log(2) / math.log(5)
    assert out["mean_specificity"] == pytest.approx((spec_acute + 0 + 1 + 1) / 4)
    assert out["answered_at_level"] == [0.75, 0.75, 0.25]
    assert out["stopped_at_level"] == [0.0, 0.5, 0.25]
    assert set(out["hierarchical"]) == {"precision", "recall", "f1"}


def test_flat_taxonomy_backoff_and_curve():
    tax = hierarchy.flat_taxonomy(["a", "b", "c"])
    assert tax.num_levels == 1 and tax.levels == (("a", "b", "c"),)
    # Max probabilities .9 (right), .8 (wrong), .7, .6 (right), .5 (wrong).
    probs = np.array(
        [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2]]
    )
    truth = ["a", "b", "b", "c", "b"]
    true_levels = np.array([[tax.level_index(t)] for t in truth])
    # Accuracy above each threshold: 1, 1/2, 2/3, 3/4, 3/5: the lowest reaching 0.7 is 0.6.
    assert hierarchy.fit_backoff_thresholds([probs], true_levels, tax, 0.7) == [0.6]
    assert hierarchy.fit_backoff_thresholds([probs], true_levels, tax, 0.8) == [0.9]
    decisions, answers = hierarchy.backoff([probs], tax, [0.6])
    assert answers == ["a", "a", "b", "c", ""]
    assert decisions[:, 0].tolist() == [0, 0, 1, 2, NOT_APPLICABLE]
    summary = hierarchy.backoff_summary(tax, ["a", "b", "c"], truth, answers)
    assert summary["accuracy"] == 0.75 and summary["mean_specificity"] == pytest.approx(0.8)
    curve = hierarchy.accuracy_specificity_curve(
        [probs], true_levels, [probs], truth, tax, ["a", "b", "c"], accuracies=(0.7, 0.99)
    )
    json.dumps(curve)
    assert [row["thresholds"] for row in curve] == [[0.6], [0.9]]
    assert curve[0]["accuracy"] == 0.75 and curve[1]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="duplicates"):
        hierarchy.flat_taxonomy(["a", "a"])
