"""Heads, hierarchical probabilities and losses on hand-computed cases."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from leukemia_tf.models import heads
from leukemia_tf.models.heads import (
    FlatHead,
    HierarchicalHead,
    flat_loss,
    hierarchical_loss,
    leaf_probabilities,
    level_log_probs,
    level_targets_to_soft,
    node_probabilities,
)
from leukemia_tf.taxonomy import Taxonomy

# A tiny tree with a leaf at level 0 and two sibling groups at level 1:
#   level 0: a, b, c          (c is a leaf)
#   level 1: a1, a2 | b1, b2, b3
TREE = {"a": {"a1": {}, "a2": {}}, "b": {"b1": {}, "b2": {}, "b3": {}}, "c": {}}


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return Taxonomy(TREE)


def _logits(level0, level1):
    return {
        "level_0": tf.constant([level0], tf.float32),
        "level_1": tf.constant([level1], tf.float32),
    }


def _softmax(values):
    e = np.exp(np.asarray(values, np.float64) - np.max(values))
    return e / e.sum()


# Hand-picked logits: level 0 [0, ln 2, 0] -> P(a, b, c) = [1/4, 1/2, 1/4];
# level 1 [ln 3, 0 | 0, ln 2, 0] -> P(a1|a) = 3/4, P(a2|a) = 1/4,
# P(b1|b) = 1/4, P(b2|b) = 1/2, P(b3|b) = 1/4.
LEVEL0 = [0.0, math.log(2.0), 0.0]
LEVEL1 = [math.log(3.0), 0.0, 0.0, math.log(2.0), 0.0]


def test_level_log_probs_is_softmax_within_sibling_groups(tax):
    log_probs = level_log_probs(_logits(LEVEL0, LEVEL1), tax)
    np.testing.assert_allclose(np.exp(log_probs["level_0"][0]), [0.25, 0.5, 0.25], rtol=1e-6)
    np.testing.assert_allclose(
        np.exp(log_probs["level_1"][0]), [0.75, 0.25, 0.25, 0.5, 0.25], rtol=1e-6
    )


def test_level_log_probs_is_stable_for_huge_logits(tax):
    log_probs = level_log_probs(_logits([1000.0, 0.0, -1000.0], [500.0, 0.0, 0.0, 0.0, 0.0]), tax)
    for value in log_probs.values():
        assert np.all(np.isfinite(value))
    np.testing.assert_allclose(np.exp(log_probs["level_1"][0, 2:]), [1 / 3] * 3, rtol=1e-6)


def test_leaf_probabilities_hand_computed(tax):
    # Leaves in taxonomy order: a1, a2, b1, b2, b3, c.
    assert tax.leaves == ("a1", "a2", "b1", "b2", "b3", "c")
    probs = leaf_probabilities(_logits(LEVEL0, LEVEL1), tax).numpy()[0]
    expected = [1 / 4 * 3 / 4, 1 / 4 * 1 / 4, 1 / 2 * 1 / 4, 1 / 2 * 1 / 2, 1 / 2 * 1 / 4, 1 / 4]
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)


def test_node_probabilities_hand_computed_and_consistent(tax):
    nodes = node_probabilities(_logits(LEVEL0, LEVEL1), tax)
    np.testing.assert_allclose(nodes["level_0"][0], [0.25, 0.5, 0.25], rtol=1e-6)
    np.testing.assert_allclose(
        nodes["level_1"][0], [3 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 8], rtol=1e-6
    )


def test_predictions_consistent_down_the_tree_on_random_logits(tax):
    rng = np.random.default_rng(0)
    logits = {
        "level_0": tf.constant(rng.normal(size=(64, 3)) * 3, tf.float32),
        "level_1": tf.constant(rng.normal(size=(64, 5)) * 3, tf.float32),
    }
    nodes = node_probabilities(logits, tax)
    leaves = leaf_probabilities(logits, tax).numpy()
    np.testing.assert_allclose(leaves.sum(axis=1), 1.0, rtol=1e-5)
    level0, level1 = nodes["level_0"].numpy(), nodes["level_1"].numpy()
    # Parent marginal = sum of its children's marginals.
    np.testing.assert_allclose(level1[:, :2].sum(1), level0[:, 0], rtol=1e-5)
    np.testing.assert_allclose(level1[:, 2:].sum(1), level0[:, 1], rtol=1e-5)
    # Leaf probabilities are the deepest node marginals.
    np.testing.assert_allclose(leaves[:, :5], level1, rtol=1e-5)
    np.testing.assert_allclose(leaves[:, 5], level0[:, 2], rtol=1e-5)
    # A leaf's probability never exceeds its parent's.
    best = leaves.argmax(1)
    parent = np.where(best < 2, 0, np.where(best < 5, 1, 2))
    assert np.all(leaves[np.arange(64), best] <= level0[np.arange(64), parent] + 1e-6)


def test_hierarchical_loss_hand_computed_and_masked(tax):
    logits = _logits(LEVEL0, LEVEL1)
    # b2: -log P(b) - log P(b2|b) = -log(1/2) - log(1/2)
    b2 = tax.encode("b2")
    loss = hierarchical_loss(b2[None], logits, tax).numpy()
    np.testing.assert_allclose(loss, [2 * math.log(2.0)], rtol=1e-6)
    # c stops at level 0: level 1 is masked (-1), only -log P(c) = log 4.
    c = tax.encode("c")
    assert list(c) == [2, -1]
    np.testing.assert_allclose(hierarchical_loss(c[None], logits, tax), [math.log(4.0)], rtol=1e-6)
    # "b" known only at level 0 (a data set that stops above the leaves).
    b = tax.encode("b")
    np.testing.assert_allclose(hierarchical_loss(b[None], logits, tax), [math.log(2.0)], rtol=1e-6)
    # Level weights: 0.5 * level 0 + 2 * level 1.
    weighted = hierarchical_loss(b2[None], logits, tax, level_weights=[0.5, 2.0])
    np.testing.assert_allclose(weighted, [2.5 * math.log(2.0)], rtol=1e-6)
    weighted = hierarchical_loss(b2[None], logits, tax, level_weights={"level_1": 0.0})
    np.testing.assert_allclose(weighted, [math.log(2.0)], rtol=1e-6)


def test_masked_levels_get_no_gradient(tax):
    logits = {
        "level_0": tf.Variable([[0.3, -0.2, 0.1]]),
        "level_1": tf.Variable([[0.5, 0.1, -0.4, 0.2, 0.0]]),
    }
    with tf.GradientTape() as tape:
        loss = hierarchical_loss(tax.encode("c")[None], logits, tax)
    grads = tape.gradient(loss, [logits["level_0"], logits["level_1"]])
    assert np.any(grads[0].numpy() != 0)
    assert grads[1] is None or np.all(grads[1].numpy() == 0)


def test_hierarchical_label_smoothing_stays_within_siblings(tax):
    logits = _logits(LEVEL0, LEVEL1)
    eps = 0.3
    loss = hierarchical_loss(tax.encode("a1")[None], logits, tax, label_smoothing=eps).numpy()
    p0 = np.array([0.25, 0.5, 0.25])
    p1_a = np.array([0.75, 0.25])  # siblings of a1 only
    t0 = (1 - eps) * np.eye(3)[0] + eps / 3
    t1 = (1 - eps) * np.eye(2)[0] + eps / 2
    expected = -(t0 * np.log(p0)).sum() - (t1 * np.log(p1_a)).sum()
    np.testing.assert_allclose(loss, [expected], rtol=1e-6)
    # A masked level stays masked under smoothing.
    loss_c = hierarchical_loss(tax.encode("c")[None], logits, tax, label_smoothing=eps).numpy()
    np.testing.assert_allclose(loss_c, [-(t0[[2, 1, 0]] * np.log(p0)).sum()], rtol=1e-6)


def test_soft_targets_equal_int_targets_and_mix_linearly(tax):
    logits = _logits(LEVEL0, LEVEL1)
    a1 = tax.encode("a1")[None]
    c = tax.encode("c")[None]
    soft_a1 = level_targets_to_soft(a1, tax)
    soft_c = level_targets_to_soft(c, tax)
    np.testing.assert_array_equal(soft_c["level_1"], [[0, 0, 0, 0, 0]])
    np.testing.assert_allclose(
        hierarchical_loss(soft_a1, logits, tax), hierarchical_loss(a1, logits, tax), rtol=1e-6
    )
    # A MixUp of a1 (reaches level 1) and c (stops at level 0) with lam = 0.3:
    # the loss is exactly the mixture of the two losses.
    lam = 0.3
    mixed = {k: lam * soft_a1[k] + (1 - lam) * soft_c[k] for k in soft_a1}
    expected = lam * hierarchical_loss(a1, logits, tax) + (1 - lam) * hierarchical_loss(
        c, logits, tax
    )
    np.testing.assert_allclose(hierarchical_loss(mixed, logits, tax), expected, rtol=1e-6)


def test_loss_and_targets_reject_bad_input(tax):
    logits = _logits(LEVEL0, LEVEL1)
    with pytest.raises(ValueError, match="one weight per taxonomy level"):
        hierarchical_loss(tax.encode("a1")[None], logits, tax, level_weights=[1.0])
    with pytest.raises(ValueError, match=r"shape \[batch, 2\]"):
        level_targets_to_soft(np.zeros((1, 3), np.int32), tax)
    with pytest.raises(ValueError, match="missing 'level_1'"):
        level_log_probs({"level_0": logits["level_0"]}, tax)
    with pytest.raises(ValueError, match="has 4 logits"):
        level_log_probs({"level_0": tf.zeros((1, 4)), "level_1": logits["level_1"]}, tax)


def test_flat_loss_hand_computed():
    logits = tf.constant([[0.0, math.log(3.0)], [0.0, 0.0]])
    np.testing.assert_allclose(flat_loss([1, 0], logits), [-math.log(0.75), math.log(2.0)], 1e-6)
    # -1 = no label; soft targets; smoothing keeps a masked row at zero.
    np.testing.assert_allclose(flat_loss([-1, 0], logits, 0.2), [0.0, math.log(2.0)], 1e-6)
    soft = tf.constant([[0.5, 0.5], [1.0, 0.0]])
    expected_0 = -0.5 * math.log(0.25) - 0.5 * math.log(0.75)
    np.testing.assert_allclose(flat_loss(soft, logits), [expected_0, math.log(2.0)], 1e-6)
    smoothed = flat_loss([1, 1], logits, 0.2).numpy()
    np.testing.assert_allclose(smoothed[0], -(0.1 * math.log(0.25) + 0.9 * math.log(0.75)), 1e-6)
    with pytest.raises(ValueError, match=r"shape \[batch, 2\]"):
        flat_loss(tf.zeros((2, 3)), logits)


def test_heads_output_float32_and_config_round_trip(tax):
    features = tf.random.normal((4, 8))
    flat = FlatHead(3, dropout=0.1, hidden_units=5)
    assert flat(features).shape == (4, 3)
    clone = FlatHead.from_config(flat.get_config())
    assert (clone.num_classes, clone.dropout, clone.hidden_units) == (3, 0.1, 5)

    head = HierarchicalHead(tax, dropout=0.0)
    out = head(features)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"level_0": (4, 3), "level_1": (4, 5)}
    config = head.get_config()
    assert config["taxonomy"] == TREE
    rebuilt = HierarchicalHead.from_config(config)
    assert rebuilt.taxonomy.levels == tax.levels
    assert rebuilt.taxonomy.leaves == tax.leaves
    # Round trip through keras serialization (what .keras files store).
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(head))
    assert isinstance(again, HierarchicalHead) and again.taxonomy.levels == tax.levels


def test_bundled_taxonomy_round_trips_through_tree():
    tax = Taxonomy.load()
    rebuilt = Taxonomy(heads.taxonomy_to_tree(tax))
    assert rebuilt.levels == tax.levels
    assert rebuilt.leaves == tax.leaves
    for level in range(tax.num_levels):
        np.testing.assert_array_equal(rebuilt.level_parents(level), tax.level_parents(level))


def test_heads_reject_bad_arguments(tax):
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        FlatHead(1)
    with pytest.raises(ValueError, match="dropout must be in"):
        HierarchicalHead(tax, dropout=1.5)


def test_leaf_probabilities_softmax_equivalence_single_level():
    # A one-level taxonomy: leaf probabilities are a plain softmax.
    flat_tax = Taxonomy({"x": {}, "y": {}, "z": {}})
    logits = {"level_0": tf.constant([[1.0, 2.0, 0.5]])}
    np.testing.assert_allclose(
        leaf_probabilities(logits, flat_tax)[0], _softmax([1.0, 2.0, 0.5]), rtol=1e-6
    )
