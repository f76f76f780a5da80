"""Tests of leukemia_tf.evaluation: metrics and calibration against hand-computed
values, slide aggregation on a hand-built case, the per-level decision rules,
and the evaluate command end to end on tiny trained models."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sklearn.metrics as skm
import tensorflow_datasets as tfds
from PIL import Image

from leukemia_tf.evaluation import aggregate as aggregate_lib
from leukemia_tf.evaluation import calibration, levels
from leukemia_tf.evaluation import metrics as metrics_lib
from leukemia_tf.taxonomy import Taxonomy
from tfds_builders import common

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------- a hand-built set
# 6 examples, 3 classes. Predictions: 0 ok, 0->1, 1 ok, 1 ok, 2 ok, 2->0.
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.91, 0.05, 0.04],  # pred 0, correct, confidence 0.91
        [0.30, 0.62, 0.08],  # pred 1, wrong,   0.62
        [0.18, 0.72, 0.10],  # pred 1, correct, 0.72
        [0.10, 0.83, 0.07],  # pred 1, correct, 0.83
        [0.24, 0.24, 0.52],  # pred 2, correct, 0.52
        [0.43, 0.37, 0.20],  # pred 0, wrong,   0.43
    ]
)
Y_PRED = PROBS.argmax(axis=1)
NAMES = ["a", "b", "c"]


def test_hand_built_metrics():
    m = metrics_lib.classification_metrics(Y_TRUE, Y_PRED, PROBS, NAMES)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Recalls 1/2, 2/2, 1/2.
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    # Precisions 1/2, 2/3, 1/1 -> F1 0.5, 0.8, 2/3.
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    per = {p["name"]: p for p in m["per_class"]}
    assert [per[n]["precision"] for n in NAMES] == pytest.approx([0.5, 2 / 3, 1.0])
    assert [per[n]["recall"] for n in NAMES] == pytest.approx([0.5, 1.0, 0.5])
    assert [per[n]["f1"] for n in NAMES] == pytest.approx([0.5, 0.8, 2 / 3])
    # Specificity: a: 1 false positive (the 2->0) among 4 negatives; b: 1 (0->1); c: none.
    assert [per[n]["specificity"] for n in NAMES] == pytest.approx([0.75, 0.75, 1.0])
    assert [per[n]["support"] for n in NAMES] == [2, 2, 2]
    assert [per[n]["n_predicted"] for n in NAMES] == [2, 3, 1]
    # AUC of a: positives .91 and .30 against .18 .10 .24 .43 -> 7 of 8 pairs.
    assert [per[n]["roc_auc"] for n in NAMES] == pytest.approx([7 / 8, 1.0, 1.0])
    assert m["macro_roc_auc"] == pytest.approx((7 / 8 + 1 + 1) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["classes_absent"] == [] and "no_decision" not in m


def test_hand_built_calibration():
    # One example per bin with 15 bins: ECE = mean |correct - confidence|.
    expected = (0.09 + 0.62 + 0.28 + 0.17 + 0.48 + 0.43) / 6
    assert calibration.expected_calibration_error(PROBS, Y_TRUE) == pytest.approx(expected)
    # Two bins (0, .5] and (.5, 1]: {0.43: wrong} and 5 examples, 4 right, mean conf 0.72.
    two = (1 * 0.43 + 5 * abs(0.8 - 0.72)) / 6
    assert calibration.expected_calibration_error(PROBS, Y_TRUE, n_bins=2) == pytest.approx(two)
    bins = calibration.reliability_bins(PROBS, Y_TRUE, n_bins=2)
    assert bins["count"] == [1, 5]
    assert bins["accuracy"] == pytest.approx([0.0, 0.8])
    nll = -np.mean(np.log([0.91, 0.30, 0.72, 0.83, 0.52, 0.20]))
    assert calibration.negative_log_likelihood(PROBS, Y_TRUE) == pytest.approx(nll)
    # Bins are right-closed: a confidence of exactly 0.5 is in the first of two.
    assert calibration.reliability_bins(np.array([[0.5, 0.5]]), np.array([0]), 2)["count"] == [1, 0]


def test_absent_class_and_no_decision():
    y_true = np.array([0, 0, 1, 2, 2])
    y_pred = np.array([0, 3, 1, 2, metrics_lib.NO_DECISION])
    probs = np.full((5, 4), 0.25)
    m = metrics_lib.classification_metrics(y_true, y_pred, probs, ["a", "b", "c", "d"])
    assert m["classes_absent"] == ["d"]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)  # over a, b, c only
    d = m["per_class"][3]
    assert d["support"] == 0 and d["recall"] is None and d["roc_auc"] is None
    assert d["precision"] == 0.0  # the one "d" prediction was wrong
    assert m["no_decision"] == [0, 0, 1, 0]  # per true class: the undecided cell is a "c"
    assert any("absent" in note for note in m["notes"])
    # The fast path used by the bootstrap agrees.
    fast = metrics_lib.headline_metrics(y_true, y_pred, probs, 4)
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert fast[key] == pytest.approx(m[key])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_fast_replicate_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    for trial in range(5):
        n, c = 200, 5
        y_true = rng.integers(0, c - (trial % 2), n)  # some trials lack the last class
        probs = rng.dirichlet(np.ones(c), n).round(2)  # rounding makes ties
        y_pred = np.where(rng.random(n) < 0.5, y_true, probs.argmax(axis=1))
        slow = metrics_lib.classification_metrics(y_true, y_pred, probs, list("abcde"))
        fast = metrics_lib.headline_metrics(y_true, y_pred, probs, c)
        for key in metrics_lib.HEADLINE:
            assert fast[key] == pytest.approx(slow[key]), key
        # The one definition against scikit-learn's (macro averages over the present classes).
        present = np.unique(y_true)
        assert slow["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
        assert slow["balanced_accuracy"] == pytest.approx(
            skm.balanced_accuracy_score(y_true, y_pred)
        )
        assert slow["macro_f1"] == pytest.approx(
            skm.f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
        )
        for k in range(c):
            if 0 < (y_true == k).sum() < n:
                assert metrics_lib.fast_roc_auc(y_true == k, probs[:, k]) == pytest.approx(
                    skm.roc_auc_score(y_true == k, probs[:, k])
                )


def test_decision_metrics():
    m = metrics_lib.decision_metrics(Y_TRUE, Y_PRED, 3)
    assert m == {
        "accuracy": pytest.approx(4 / 6),
        "balanced_accuracy": pytest.approx((0.5 + 1 + 0.5) / 3),
        "macro_f1": pytest.approx((0.5 + 0.8 + 2 / 3) / 3),
    }
    # Class 2 absent: averages over classes 0 and 1; the prediction into 2 is a miss of 1.
    m = metrics_lib.decision_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 2]), 3)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 0.5) / 2)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    empty = metrics_lib.decision_metrics(np.zeros(0, int), np.zeros(0, int), 3)
    assert all(math.isnan(v) for v in empty.values()) and len(empty) == 3
    with pytest.raises(ValueError, match="labels must be in"):
        metrics_lib.decision_metrics(np.array([3]), np.array([0]), 3)


def test_metrics_module_is_light():
    # The training loop imports it: no TensorFlow, no matplotlib.
    code = (
        "import sys, leukemia_tf.evaluation.metrics; "
        "print(sorted({'tensorflow', 'matplotlib'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_bootstrap_resamples_clusters():
    # Patient p1: 10 cells all right; p2: 10 cells all wrong.
    y_true = np.zeros(20, int)
    y_pred = np.array([0] * 10 + [1] * 10)
    patients = np.array(["p1"] * 10 + ["p2"] * 10)
    by_patient = metrics_lib.bootstrap_ci(y_true, y_pred, None, 2, patients, 400, seed=1)
    by_cell = metrics_lib.bootstrap_ci(y_true, y_pred, None, 2, None, 400, seed=1)
    assert by_patient["n_units"] == 2 and by_cell["n_units"] == 20
    # Resampling 2 patients: accuracy is 0, 0.5 or 1; the 95% interval spans [0, 1].
    assert (by_patient["accuracy"]["low"], by_patient["accuracy"]["high"]) == (0.0, 1.0)
    # Resampling cells as if independent gives a much narrower interval.
    assert 0.2 < by_cell["accuracy"]["low"] < 0.5 < by_cell["accuracy"]["high"] < 0.8
    assert by_patient["macro_roc_auc"]["n_valid"] == 0  # no probabilities given
    again = metrics_lib.bootstrap_ci(y_true, y_pred, None, 2, None, 400, seed=1)
    assert again["accuracy"] == by_cell["accuracy"]
    perfect = metrics_lib.bootstrap_ci(y_true, y_true, None, 2, None, 50)
    assert (perfect["accuracy"]["low"], perfect["accuracy"]["high"]) == (1.0, 1.0)


def test_temperature_fit_recovers_known_temperature():
    from leukemia_tf.models.label_space import LabelSpace

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 4)).astype(np.float32)
    true_t = 2.5
    p = np.exp(logits / true_t)
    p /= p.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(4, p=row) for row in p])
    space = LabelSpace(list("abcd"), "flat", None)

    def nll(t):
        probs = space.probabilities({"logits": logits}, t).numpy()
        return calibration.negative_log_likelihood(probs, labels)

    fitted = calibration.fit_temperature(nll)
    assert fitted == pytest.approx(true_t, rel=0.1)
    assert nll(fitted) <= nll(1.0)
    # On a plain convex function the search is exact to its tolerance.
    assert calibration.fit_temperature(lambda t: (math.log(t) - math.log(3.0)) ** 2) == (
        pytest.approx(3.0, rel=1e-3)
    )


# ---------------------------------------------------------- aggregation
def test_aggregate_hand_built_slides():
    rows = {
        # s1: both cells class 0.
        "s1": [[0.9, 0.1, 0.0], [0.8, 0.2, 0.0]],
        # s2: a three-way tie in votes; mean probabilities 0.3, 0.4, 0.3 -> class 1.
        "s2": [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]],
        # s3: votes 2 for class 2 and 2 for class 0; mean 0.575 (0) vs 0.4125 (2) -> 0.
        "s3": [[0.4, 0.0, 0.6], [0.45, 0.0, 0.55], [0.55, 0.0, 0.45], [0.9, 0.05, 0.05]],
        # s4: vote says 0 (2 of 3), the mean says 1.
        "s4": [[0.34, 0.33, 0.33], [0.34, 0.33, 0.33], [0.0, 1.0, 0.0]],
    }
    truth = {"s1": 0, "s2": 1, "s3": 2, "s4": 1}
    # Interleave the cells so that grouping does not rely on order.
    cells = [(s, row) for s, group in rows.items() for row in group]
    order = np.random.default_rng(3).permutation(len(cells))
    ids = [cells[i][0] for i in order]
    probs = np.array([cells[i][1] for i in order])
    labels = np.array([truth[s] for s in ids])

    out = aggregate_lib.aggregate(ids, probs, labels)
    assert out["group_ids"] == ["s1", "s2", "s3", "s4"]
    assert out["n_cells"].tolist() == [2, 3, 4, 3]
    np.testing.assert_allclose(out["mean_probs"][1], [0.3, 0.4, 0.3])
    np.testing.assert_allclose(out["mean_probs"][2], [0.575, 0.0125, 0.4125])
    assert out["vote_counts"].tolist() == [[2, 0, 0], [1, 1, 1], [2, 0, 2], [2, 1, 0]]
    assert out["mean_prediction"].tolist() == [0, 1, 0, 1]
    assert out["majority_prediction"].tolist() == [0, 1, 0, 0]
    assert out["label"].tolist() == [0, 1, 2, 1]
    mean, vote = out["metrics"]["mean_probability"], out["metrics"]["majority_vote"]
    assert mean["accuracy"] == pytest.approx(3 / 4)
    assert vote["accuracy"] == pytest.approx(2 / 4)
    assert mean["balanced_accuracy"] == pytest.approx((1 + 1 + 0) / 3)
    assert vote["balanced_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert mean["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert vote["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)

    unlabelled = aggregate_lib.aggregate(ids, probs)
    assert "label" not in unlabelled and "metrics" not in unlabelled
    assert unlabelled["majority_prediction"].tolist() == [0, 1, 0, 0]


def test_aggregate_errors_name_the_problem():
    probs = np.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="group 'slide-7' has cells with different labels"):
        aggregate_lib.aggregate(["slide-7", "slide-7", "x"], probs, np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="empty group id .*index 1"):
        aggregate_lib.aggregate(["a", "", "b"], probs)
    with pytest.raises(ValueError, match="2 group ids for 3 rows"):
        aggregate_lib.aggregate(["a", "b"], probs)


# -------------------------------------------------------------- levels
TREE = Taxonomy({"A": {"A1": {}, "A2": {}}, "B": {"B1": {}}, "N": {}})


def test_greedy_walk_is_consistent_where_argmax_is_not():
    # P(A) = .6 split evenly over A1/A2 (.3 each); P(B1) = P(B) = .3; P(N) = .1.
    level0 = np.array([[0.6, 0.3, 0.1], [0.05, 0.05, 0.9]])
    level1 = np.array([[0.3, 0.3, 0.3 + 1e-3], [0.03, 0.02, 0.05]])
    walk = levels.greedy_walk([level0, level1], TREE)
    argmax = levels.argmax_per_level([level0, level1])
    assert walk.tolist() == [[0, 0], [2, levels.NO_DECISION]]  # A -> A1; N is a leaf: stop
    assert argmax.tolist() == [[0, 2], [2, 2]]  # A then B1: not a path
    true = np.array([[0, 0], [0, 1]])  # both labels reach level 1
    assert levels.path_consistency(walk, true, TREE)["fraction"] == 1.0
    argmax_check = levels.path_consistency(argmax, true, TREE)
    assert argmax_check["fraction"] == 0.0 and argmax_check["n_inconsistent"] == 2
    result = levels.evaluate_levels(
        [level0, level1], true, np.array([0, 0]), ["A1", "A2", "B1", "N"], TREE
    )
    assert result["levels"][1]["greedy"]["accuracy"] == 0.5  # A1 right; no decision counts wrong
    assert result["levels"][1]["greedy"]["no_decision"] == [0, 1, 0]
    assert result["levels"][1]["marginal_argmax"]["accuracy"] == 0.0
    # Row 0: P(B) = .3 but its only child B1 has .301 -> the check sees the gap.
    assert result["marginal_sum_max_error"] == pytest.approx(1e-3, abs=1e-9)


def test_flat_level_probabilities_sum_under_each_node():
    probs = np.array([[0.5, 0.2, 0.3]])
    level0, level1 = levels.flat_level_probabilities(probs, ["A1", "A2", "B"], TREE)
    np.testing.assert_allclose(level0, [[0.7, 0.3, 0.0]])  # A, B, N
    np.testing.assert_allclose(level1, [[0.5, 0.2, 0.0]])  # A1, A2, B1
    assert levels.greedy_walk([level0, level1], TREE).tolist() == [[0, 0]]
    # B chosen but B1 has no mass (the flat class stops at B): the walk stops.
    assert levels.greedy_walk(
        levels.flat_level_probabilities(np.array([[0.1, 0.1, 0.8]]), ["A1", "A2", "B"], TREE),
        TREE,
    ).tolist() == [[1, levels.NO_DECISION]]


# ------------------------------------------------------------ end to end
def _copy(model_dir: str, tmp_path: Path) -> Path:
    # The session fixtures are shared: never write into them.
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    return target


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100


TOP_KEYS = {
    "model",
    "data",
    "decisions",
    "cell",
    "calibration",
    "levels",
    "slide",
    "patient",
    "explanations",
    "figures",
    "caveats",
    "bootstrap",
}


def _check_common(
    result: dict, model_dir: Path, out_dir: Path, split_size: int, explained: bool = True
) -> dict:
    from leukemia_tf import rundir

    on_disk = json.loads((out_dir / "metrics.json").read_text())
    assert TOP_KEYS <= set(on_disk)
    assert on_disk["cell"]["accuracy"] == pytest.approx(result["cell"]["accuracy"])
    cell = on_disk["cell"]
    for key in metrics_lib.HEADLINE:
        assert key in cell and key in cell["ci"]
    assert cell["ci"]["n_resamples"] == 100
    assert cell["ci"]["unit"].startswith("patients")  # the synthetic set has patient ids
    assert np.sum(cell["confusion_matrix"]) == on_disk["data"]["n_examples"] == split_size
    assert len(cell["per_class"]) == len(on_disk["model"]["class_names"]) == 6
    low, high = cell["ci"]["accuracy"]["low"], cell["ci"]["accuracy"]["high"]
    assert low <= cell["accuracy"] <= high

    cal = on_disk["calibration"]
    assert cal["fitted_on"] == "validation" and cal["stored"]
    assert rundir.read_temperature(model_dir) == pytest.approx(cal["temperature"])
    assert cal["temperature"] != 1.0
    assert cal["validation_nll_after"] <= cal["validation_nll_before"] + 1e-9
    assert "15 equal-width bins" in cal["binning"]
    for key in ("ece_before", "ece_after", "nll_before", "nll_after"):
        assert cal[key] is not None and cal[key] >= 0

    for key in ("slide", "patient"):
        section = on_disk[key]
        assert section["available"] and section["labelled"], section.get("reason")
        assert section["n_groups"] == on_disk["data"][f"n_{key}s"] > 1
        assert sum(g["n_cells"] for g in section["groups"]) == split_size
        assert set(section["methods"]) == {"mean_probability", "majority_vote"}
    assert on_disk["slide"]["methods"]["majority_vote"]["ci"]["unit"].startswith("patients")

    if explained:
        assert on_disk["explanations"]["method"] == "Grad-CAM"
        assert on_disk["explanations"]["files"]
    else:
        assert on_disk["explanations"]["files"] == []
        assert "switched off" in on_disk["explanations"]["note"]
    for path in [*on_disk["figures"].values(), *on_disk["explanations"]["files"]]:
        _assert_png(out_dir / path)
    for name in ("confusion_matrix", "roc_curves", "reliability", "confusion_slide"):
        assert name in on_disk["figures"]
    assert any(c.startswith("SYNTHETIC") for c in on_disk["caveats"])

    report = (out_dir / "report.md").read_text()
    for heading in (
        "## What was evaluated",
        "## Headline (cell level)",
        "## Per class",
        "## Confusion matrix",
        "## Calibration",
        "## Slide level",
        "## Patient level",
        "## Explanations",
        "## Caveats",
        "95% CI",
        "leukemia_synthetic",
    ):
        assert heading in report, heading
    for path in on_disk["figures"].values():
        assert f"]({path})" in report
    return on_disk


@pytest.fixture(scope="module")
def test_split_size(synthetic_data_dir) -> int:
    import tfds_builders  # noqa: F401

    builder = tfds.builder("leukemia_synthetic", data_dir=synthetic_data_dir)
    return builder.info.splits["test"].num_examples


def test_evaluate_flat_end_to_end(trained_flat_model_dir, tmp_path, test_split_size):
    from leukemia_tf.evaluation import evaluate_lib

    model_dir = _copy(trained_flat_model_dir, tmp_path)
    result = evaluate_lib.evaluate(model_dir, split="test", bootstrap=100, explain_samples=1)
    out_dir = model_dir / "eval_test"
    assert Path(result["report_path"]) == out_dir / "report.md"
    on_disk = _check_common(result, model_dir, out_dir, test_split_size)
    assert on_disk["levels"] is None  # native labels: no taxonomy
    assert on_disk["model"]["head"] == "flat"
    assert "## Taxonomy levels" not in (out_dir / "report.md").read_text()


def test_evaluate_hierarchical_end_to_end(
    trained_hierarchical_model_dir, tmp_path, test_split_size
):
    from leukemia_tf.evaluation import evaluate_lib

    model_dir = _copy(trained_hierarchical_model_dir, tmp_path)
    out_dir = tmp_path / "report"
    # Grad-CAM of a hierarchical head is tested in test_explain.py.
    evaluate_lib.evaluate(
        model_dir, split="test", out_dir=out_dir, bootstrap=100, explain_samples=0
    )
    on_disk = _check_common(
        json.loads((out_dir / "metrics.json").read_text()),
        model_dir,
        out_dir,
        test_split_size,
        explained=False,
    )
    section = on_disk["levels"]
    assert section["decision_rule"] == "greedy"
    entries = section["levels"]
    assert [e["level"] for e in entries] == [0, 1, 2, 3]
    assert entries[0]["n"] == test_split_size  # every label reaches level 0
    assert 0 < entries[1]["n"] < test_split_size  # only the leukemias reach level 1
    assert "skipped" in entries[3]  # no synthetic label reaches the ALL subtypes
    for entry in entries[:3]:
        for rule in ("greedy", "marginal_argmax"):
            assert set(metrics_lib.HEADLINE) <= set(entry[rule])
    assert section["consistency"]["greedy"]["fraction"] == 1.0
    assert section["consistency"]["marginal_argmax"]["n_checked"] == entries[1]["n"]
    assert section["marginal_sum_max_error"] < 1e-5
    for k in range(3):
        _assert_png(out_dir / on_disk["figures"][f"confusion_level_{k}"])
    report = (out_dir / "report.md").read_text()
    assert "## Taxonomy levels" in report and "greedy walk" in report


def test_evaluate_errors(trained_flat_model_dir, tmp_path, synthetic_data_dir):
    from leukemia_tf.evaluation import evaluate_lib

    with pytest.raises(FileNotFoundError, match="--model_dir='.*nowhere' does not exist"):
        evaluate_lib.evaluate(tmp_path / "nowhere")
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        evaluate_lib.evaluate(not_a_run)
    with pytest.raises(ValueError, match=r"no split 'tset'; available: test, train, validation"):
        evaluate_lib.evaluate(trained_flat_model_dir, split="tset", out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_eval_options_are_checked_once(tmp_path):
    from leukemia_tf.evaluation import evaluate_lib

    options = evaluate_lib.EvalOptions(split="validation", bootstrap=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.split = "test"
    for bad, match in (
        ({"bootstrap": -1}, "--bootstrap=-1 must be >= 0"),
        ({"explain_samples": -2}, "--explain_samples=-2 must be >= 0"),
        ({"batch_size": 0}, "batch_size=0 must be >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            evaluate_lib.EvalOptions(**bad)
        # evaluate refuses them before reading the model.
        with pytest.raises(ValueError, match=match):
            evaluate_lib.evaluate(tmp_path / "nowhere", **bad)


class EvaluationTestUnlabelled(tfds.core.GeneratorBasedBuilder):
    """Two labelled splits and a test split without labels (label -1), like C-NMC's final phase."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=common.cell_features(["hem", "all"]))

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(name) for name in ("train", "test")}

    def _generate_examples(self, split: str):
        for i in range(4):
            yield (
                f"{split}{i}",
                {
                    "image": np.full((8, 8, 3), 40 * i, np.uint8),
                    "label": -1 if split == "test" else i % 2,
                    "patient_id": "",
                    "slide_id": "",
                    "source": "test",
                    "file_name": f"{split}{i}.png",
                },
            )


def test_unlabelled_split_is_refused(tmp_path):
    from leukemia_tf.data import pipeline
    from leukemia_tf.evaluation import evaluate_lib

    data_dir = str(tmp_path)
    tfds.builder("evaluation_test_unlabelled", data_dir=data_dir).download_and_prepare()
    specs = pipeline.parse_datasets("evaluation_test_unlabelled")
    assert evaluate_lib.check_split(specs, "train", data_dir) == {"evaluation_test_unlabelled": 4}
    with pytest.raises(evaluate_lib.UnlabelledSplitError, match="4 of 4 examples without a label"):
        evaluate_lib.check_split(specs, "test", data_dir)
    with pytest.raises(ValueError, match="has no split 'validation'; available: test, train"):
        evaluate_lib.check_split(specs, "train+validation", data_dir)


def test_command_line(trained_flat_model_dir, tmp_path):
    # A subprocess: leukemia_tf.evaluate defines absl flags that clash with
    # those of leukemia_tf.build_data, which other tests import.
    model_dir = _copy(trained_flat_model_dir, tmp_path)
    stored = model_dir / "calibration.json"
    before = stored.read_text() if stored.exists() else None
    command = [sys.executable, "-m", "leukemia_tf.evaluate", f"--model_dir={model_dir}"]
    # The validation split: its one pass also serves the temperature fit.
    run = subprocess.run(
        [*command, "--split=validation", "--bootstrap=20", "--explain_samples=0", "--which=last"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "balanced accuracy" in run.stdout and "slide level" in run.stdout
    report = model_dir / "eval_validation_last" / "report.md"
    assert f"Report: {report}" in run.stdout and report.is_file()
    assert "fitted on the evaluated split 'validation' itself" in report.read_text()
    # The last checkpoint's temperature is reported, not stored over the best one's.
    assert (stored.read_text() if stored.exists() else None) == before
    missing = subprocess.run(
        [sys.executable, "-m", "leukemia_tf.evaluate", f"--model_dir={tmp_path / 'nope'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert missing.returncode != 0
    assert f"--model_dir='{tmp_path / 'nope'}' does not exist" in missing.stderr
