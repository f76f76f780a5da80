"""Trust scores in the graph, their fitting and storage, and what predict/export return."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from leukemia_tf import rundir, trust_lib
from leukemia_tf.models import classifier, trust
from leukemia_tf.models.label_space import LabelSpace
from leukemia_tf.serving import export_lib, predict_lib, signatures
from leukemia_tf.taxonomy import Taxonomy

TREE = {
    "normal": {"lymph": None, "neutro": None},
    "leukemia": {"acute": {"ALL": None, "AML": None}, "CLL": None},
}


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _reference_mahalanobis(features, stats) -> np.ndarray:
    f = np.asarray(features, np.float64)
    precision = stats.precision.astype(np.float64)
    return np.stack(
        [np.einsum("nd,de,ne->n", f - mu, precision, f - mu) for mu in stats.class_means], 1
    ).min(axis=1)


def test_with_features_shares_the_weights_and_returns_the_pooled_features():
    model = classifier.build_classifier(
        backbone="cnn_tiny", head="flat", num_classes=3, image_size=32
    )
    x = _images(4)
    out = trust.with_features(model)(x, training=False)
    np.testing.assert_allclose(out["logits"], model(x, training=False)["logits"], atol=1e-6)
    backbone = classifier.get_backbone(model)
    np.testing.assert_allclose(out[trust.FEATURES], backbone(x, training=False), atol=1e-6)
    # The same variables: changing the model's weights changes the feature model.
    model.get_layer("head").weights[0].assign(tf.zeros_like(model.get_layer("head").weights[0]))
    out2 = trust.with_features(model)(x, training=False)
    np.testing.assert_allclose(out2["logits"], np.broadcast_to(out2["logits"][:1], (4, 3)))


def test_scores_match_numpy_references_flat():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 4)).astype("float32") * 3
    features = rng.normal(size=(50, 6)).astype("float32")
    labels = np.arange(50) % 4
    label_space = LabelSpace(["a", "b", "c", "d"], "flat", None)
    stats = trust.fit_feature_statistics(features, labels, label_space.class_names, knn_k=3)
    out = trust.trust_outputs(
        {"logits": tf.constant(logits), trust.FEATURES: tf.constant(features)}, label_space, stats
    )
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top2 = np.sort(probs, 1)[:, ::-1]
    np.testing.assert_allclose(out["max_probability"], top2[:, 0], rtol=1e-5)
    np.testing.assert_allclose(out["margin"], top2[:, 0] - top2[:, 1], atol=1e-6)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(1))
    np.testing.assert_allclose(out["energy"], -lse, rtol=1e-5)
    np.testing.assert_allclose(
        out["mahalanobis"], _reference_mahalanobis(features, stats), rtol=1e-3
    )
    normed = features / np.linalg.norm(features, axis=1, keepdims=True)
    kth = np.sort(normed @ stats.bank.T, axis=1)[:, -3]
    np.testing.assert_allclose(out["knn_distance"], np.sqrt(np.maximum(2 - 2 * kth, 0)), atol=1e-3)
    # Tied covariance: the precision is the inverse of the shrunk within-class covariance.
    centred = features - stats.class_means[labels]
    cov = centred.T.astype(np.float64) @ centred / (50 - 4)
    cov = 0.999 * cov + 0.001 * np.trace(cov) / 6 * np.eye(6)
    np.testing.assert_allclose(stats.precision, np.linalg.inv(cov), rtol=1e-3, atol=1e-4)
    # A training point's nearest neighbour is itself (distance 0, k=1).
    stats1 = trust.fit_feature_statistics(features, labels, label_space.class_names, knn_k=1)
    np.testing.assert_allclose(trust.feature_scores(features, stats1)["knn_distance"], 0, atol=2e-3)


def test_far_away_features_score_as_untrustworthy():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(200, 5)).astype("float32")
    labels = np.arange(200) % 2
    stats = trust.fit_feature_statistics(features, labels, ["a", "b"], knn_k=5)
    near = trust.feature_scores(features[:10], stats)
    far = trust.feature_scores(features[:10] * 0 + 25.0 * rng.normal(size=(10, 5)), stats)
    assert np.all(far["mahalanobis"].numpy() > near["mahalanobis"].numpy().max())


def test_hierarchical_energy_uses_the_joint_class_logits_and_backoff_stops():
    taxonomy = Taxonomy(TREE)
    label_space = LabelSpace(["lymph", "neutro", "ALL", "AML", "CLL"], "hierarchical", taxonomy)
    rng = np.random.default_rng(3)
    outputs = {
        f"level_{k}": tf.constant(rng.normal(size=(8, len(n))), tf.float32)
        for k, n in enumerate(taxonomy.levels)
    }
    scores = trust.logit_scores(outputs, label_space)
    joint = []
    for name in label_space.class_names:
        total = 0.0
        for node in taxonomy.path(name):
            total += outputs[f"level_{taxonomy.depth(node)}"].numpy()[:, taxonomy.level_index(node)]
        joint.append(total)
    joint = np.stack(joint, 1).astype(np.float64)
    np.testing.assert_allclose(scores["energy"], -np.log(np.exp(joint).sum(1)), rtol=1e-5)

    level_probs = trust.level_probabilities(outputs, label_space)
    # Threshold 0 at level 0, never at level 1: the answer is the top-level node.
    names, prob = trust.backoff_nodes(level_probs, taxonomy, [0.0, None, None])
    top = np.array(taxonomy.levels[0])[level_probs[0].numpy().argmax(1)]
    assert [n.decode() for n in names.numpy()] == list(top)
    np.testing.assert_allclose(prob, level_probs[0].numpy().max(1))
    # Level 0 refused (threshold above 1): no answer at all.
    names, prob = trust.backoff_nodes(level_probs, taxonomy, [1.5, 0.0, 0.0])
    assert set(names.numpy()) == {b""} and np.all(prob.numpy() == 0)
    # All open: the walk ends at a leaf or at the deepest level.
    names, _ = trust.backoff_nodes(level_probs, taxonomy, [0.0, 0.0, 0.0])
    for name in names.numpy():
        assert taxonomy.node(name.decode()).is_leaf


def test_flat_head_over_taxonomy_nodes_walks_summed_class_probabilities():
    taxonomy = Taxonomy(TREE)
    label_space = LabelSpace(["lymph", "neutro", "acute", "CLL"], "flat", taxonomy)
    logits = tf.constant([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 2.9]])
    level_probs = trust.level_probabilities({"logits": logits}, label_space)
    probs = tf.nn.softmax(logits).numpy()
    np.testing.assert_allclose(
        level_probs[0][:, taxonomy.level_index("leukemia")], probs[:, 2:].sum(1), rtol=1e-6
    )
    names, _ = trust.backoff_nodes(level_probs, taxonomy, [0.9, 0.9, None])
    # Image 0 is sure of lymph; image 1 of leukemia only (acute vs CLL is a coin toss).
    assert [n.decode() for n in names.numpy()] == ["lymph", "leukemia"]


def test_fit_feature_statistics_rejects_bad_input():
    features = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="--knn_k=9"):
        trust.fit_feature_statistics(features + np.eye(4, 3), np.arange(4) % 2, ["a", "b"], knn_k=9)
    with pytest.raises(ValueError, match="not finite"):
        bad = features.copy()
        bad[1, 1] = np.nan
        trust.fit_feature_statistics(bad, np.arange(4) % 2, ["a", "b"])
    with pytest.raises(ValueError, match="3 labels for 4"):
        trust.fit_feature_statistics(features, np.arange(3), ["a", "b", "c"])
    with pytest.raises(ValueError, match="--selection_score='entropy'"):
        trust.check_score("entropy")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_coverage=0.0), "--target_coverage=0.0"),
        (dict(target_coverage=1.5), "--target_coverage=1.5"),
        (dict(max_risk=1.0), "--max_risk=1.0"),
        (dict(target_coverage=0.9, max_risk=0.1), "give one of the two"),
        (dict(backoff_accuracy=1.0), "--backoff_accuracy=1.0"),
        (dict(max_referred_fraction=1.0), "--max_referred_fraction=1.0"),
        (dict(selection_score="nope"), "--selection_score='nope'"),
    ],
)
def test_fit_options_are_checked_before_anything_runs(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        trust_lib.fit(tmp_path / "no_such_run", **kwargs)


def test_training_fits_trust_and_refit_changes_the_referral(trained_flat_model_dir, tmp_path):
    run = tmp_path / "run"
    rundir.copy_tree(trained_flat_model_dir, run)
    record = json.loads((run / trust.TRUST_FILE).read_text())
    assert record["model_file"] == "best.keras"
    assert record["features"]["split"] == "train" and record["features"]["n"] > 0
    assert record["selection"]["score"] == "max_probability"
    assert record["selection"]["target"] == "coverage" and record["selection"]["value"] == 0.9
    assert record["selection"]["coverage"] >= 0.9
    # The out-of-distribution gate, fitted to let 99 % of the validation images through.
    assert record["selection"]["ood_score"] == "mahalanobis"
    assert record["selection"]["ood_acceptance"] == 0.99
    assert record["selection"]["ood_threshold"] > 0
    assert len(record["backoff"]["thresholds"]) == 1  # native labels: one level (the classes)
    trained = rundir.load_trained_model(run)
    assert trained.trust is not None and trained.trust.selection["threshold"] is not None

    stats = trust_lib.fit(run, max_risk=0.0, selection_score="mahalanobis", knn_k=2)
    assert stats.selection["target"] == "risk" and stats.selection["score"] == "mahalanobis"
    assert stats.selection["higher_is_trust"] is False
    reloaded = rundir.load_trained_model(run).trust
    assert reloaded.selection == json.loads(json.dumps(stats.selection))
    np.testing.assert_array_equal(reloaded.precision, stats.precision)
    assert reloaded.knn_k == 2

    # A model file changed after fitting: refused with the refit command.
    best = run / "best.keras"
    best.write_bytes(best.read_bytes() + b"\0")
    with pytest.raises(trust.TrustNotFittedError, match="python -m leukemia_tf.fit_trust"):
        trust.load(str(run), str(best))
    with pytest.raises(trust.TrustNotFittedError, match="python -m leukemia_tf.fit_trust"):
        rundir.load_trained_model(run)
    # Refitting (as the end of a resumed training does) replaces the stale statistics.
    trust_lib.fit(run)
    assert rundir.load_trained_model(run).trust is not None


def _folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_predict_writes_trust_columns_and_counts_referrals(
    trained_hierarchical_model_dir, tmp_path
):
    images = _folder(tmp_path / "cells", 5)
    out = tmp_path / "p.csv"
    result = predict_lib.predict(trained_hierarchical_model_dir, str(images), out, verbose=0)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    for key in (*trust.SCORES, trust.REFERRED, trust.PREDICTED_NODE):
        assert key in rows[0], key
    assert result.num_referred == sum(r[trust.REFERRED] == "true" for r in rows)
    assert "referred to a human" in predict_lib.summary(result)
    trained = rundir.load_trained_model(trained_hierarchical_model_dir)
    taxonomy = trained.taxonomy
    for row in rows:
        node = row[trust.PREDICTED_NODE]
        assert node == "" or node in taxonomy.nodes
        # The back-off answer is on the path of the greedy decision.
        if node:
            assert node in [row[f"level_{k}_decision"] for k in range(taxonomy.num_levels)]
        selection = trained.trust.selection
        referred = float(row[selection["score"]]) < selection["threshold"]
        assert (row[trust.REFERRED] == "true") == referred


def test_predict_without_trust_statistics_says_how_to_fit_them(trained_flat_model_dir, tmp_path):
    run = tmp_path / "old_run"
    rundir.copy_tree(trained_flat_model_dir, run)
    (run / trust.TRUST_FILE).unlink()
    images = _folder(tmp_path / "cells", 2)
    result = predict_lib.predict(str(run), str(images), tmp_path / "p.csv", verbose=0)
    assert result.num_referred is None
    assert f"python -m leukemia_tf.fit_trust --model_dir={run}" in predict_lib.summary(result)
    with open(tmp_path / "p.csv", newline="") as f:
        header = next(csv.reader(f))
    assert "max_probability" in header and "mahalanobis" not in header


def test_export_returns_trust_outputs_in_both_signatures(trained_flat_model_dir, tmp_path):
    result = export_lib.export_model(
        trained_flat_model_dir, tmp_path / "export", write_warmup=False
    )
    for key in (*trust.SCORES, trust.REFERRED, trust.PREDICTED_NODE):
        assert key in result.signatures[signatures.SERVING_DEFAULT], key
    loaded = tf.saved_model.load(result.path)
    trained = rundir.load_trained_model(trained_flat_model_dir)
    pixels = _images(3, trained.image_size, seed=9).round()
    by_pixels = loaded.signatures[signatures.PREDICT_PIXELS](pixels=tf.constant(pixels))
    encoded = [tf.io.encode_png(tf.cast(p, tf.uint8)).numpy() for p in pixels]
    by_bytes = loaded.signatures[signatures.SERVING_DEFAULT](image_bytes=tf.constant(encoded))
    outputs = {k: tf.constant(v) for k, v in trained.outputs(pixels, features=True).items()}
    expected = trust.trust_outputs(outputs, trained.label_space, trained.trust)
    for name in trust.SCORES:
        np.testing.assert_allclose(by_pixels[name], expected[name], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(by_bytes[name], expected[name], rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(by_bytes[trust.REFERRED], expected[trust.REFERRED])
    metadata = json.loads((Path(result.path) / "assets" / "export.json").read_text())
    assert metadata["trust"]["selection"]["score"] == "max_probability"


def test_fit_trust_command_line(trained_flat_model_dir, tmp_path):
    run = tmp_path / "run"
    rundir.copy_tree(trained_flat_model_dir, run)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "leukemia_tf.fit_trust",
            f"--model_dir={run}",
            "--target_coverage=0",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--target_coverage=0.0: must be in (0, 1]" in bad.stderr
    good = subprocess.run(
        [
            sys.executable,
            "-m",
            "leukemia_tf.fit_trust",
            f"--model_dir={run}",
            "--target_coverage=0.5",
            "--selection_score=knn_distance",
        ],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    assert "referral: knn_distance >" in good.stdout
    record = json.loads((run / trust.TRUST_FILE).read_text())
    assert record["selection"]["value"] == 0.5


def test_out_of_distribution_gate_refers_confident_but_unfamiliar_images():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(100, 4)).astype("float32")
    label_space = LabelSpace(["a", "b"], "flat", None)
    stats = trust.fit_feature_statistics(features, np.arange(100) % 2, label_space.class_names)
    stats.selection = {
        "score": "max_probability",
        "threshold": 0.6,
        "ood_score": "mahalanobis",
        "ood_threshold": 30.0,
    }
    logits = tf.constant([[5.0, 0.0], [0.1, 0.0], [5.0, 0.0]])
    batch = tf.constant(np.stack([features[0], features[1], features[2] + 40.0]))
    out = trust.trust_outputs({"logits": logits, trust.FEATURES: batch}, label_space, stats)
    # Sure and familiar: answered; unsure: referred; sure but far from every class: referred.
    assert out[trust.OUT_OF_DISTRIBUTION].numpy().tolist() == [False, False, True]
    assert out[trust.REFERRED].numpy().tolist() == [False, True, True]
    assert trust.output_keys(stats)[-2:] == [trust.OUT_OF_DISTRIBUTION, trust.REFERRED]
