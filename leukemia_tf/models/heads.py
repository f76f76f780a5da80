"""Classification heads, hierarchical probabilities and the losses.

Two heads sit on the pooled backbone features:

* :class:`FlatHead`: one softmax over a flat list of classes (the taxonomy
  leaves or a data set's native labels). The baseline.
* :class:`HierarchicalHead`: one set of logits per taxonomy level. Within a
  level the softmax runs over each group of siblings only, so a level's
  output is ``log P(node | parent)`` (:func:`level_log_probs`); a leaf's
  probability is the product of the conditionals along its path
  (:func:`leaf_probabilities`) and every node's marginal is the sum of its
  children's (:func:`node_probabilities`): decisions are consistent at every
  level by construction.

Logits and losses are float32 under every mixed-precision policy: the last
Dense layer of each head computes in float32, and the functions here cast.

Targets of the hierarchical loss are either level encodings (int ``[B, L]``,
``-1`` = the label stops above this level, from ``Taxonomy.encode``) or soft
per-level targets (a dict ``{"level_k": [B, n_k]}``, e.g. after MixUp). A
soft target row is *not* renormalised: its sum is the weight of that level
for that example, so a row of zeros masks the level and a MixUp pair where
only one side reaches a level counts that level with the side's mixing
weight (the loss of a mixed example is exactly the mixture of the two
examples' losses; see :func:`hierarchical_loss`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from leukemia_tf.taxonomy import ROOT, Taxonomy


def level_key(level: int) -> str:
    """Output name of a taxonomy level: ``"level_0"``, ``"level_1"``, ..."""
    return f"level_{level}"


# ------------------------------------------------------------ taxonomy config


def taxonomy_to_tree(taxonomy: Taxonomy) -> dict:
    """The nested ``{node: {child: ...}}`` mapping that rebuilds ``taxonomy``.

    Used to store a taxonomy in a layer config (plain JSON). Node order is
    preserved, so the rebuilt taxonomy has the same level indices.
    """

    def subtree(name: str) -> dict:
        return {child: subtree(child) for child in taxonomy.children(name)}

    return subtree(ROOT)


def _as_taxonomy(taxonomy: Taxonomy | Mapping) -> Taxonomy:
    if isinstance(taxonomy, Taxonomy):
        return taxonomy
    if isinstance(taxonomy, Mapping):
        return Taxonomy(taxonomy, source="<head config>")
    raise TypeError(f"expected a Taxonomy or a tree mapping, got {type(taxonomy).__name__}")


# --------------------------------------------------------------------- heads


@keras.saving.register_keras_serializable(package="leukemia_tf")
class FlatHead(keras.layers.Layer):
    """Dropout (+ optional hidden layer) + Dense logits over ``num_classes``.

    Args:
      num_classes: number of classes (>= 2).
      dropout: dropout rate on the features (and on the hidden layer).
      hidden_units: width of an optional hidden Dense+GELU layer; 0 = none.

    Call returns float32 logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int, dropout: float = 0.0, hidden_units: int = 0, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"FlatHead: num_classes must be >= 2, got {num_classes}")
        _check_dropout(dropout)
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        self.hidden_units = int(hidden_units)
        self._trunk = _Trunk(self.dropout, self.hidden_units, dtype=self.dtype_policy)
        # float32 whatever the policy: softmax and the loss need the range.
        self.logits = keras.layers.Dense(self.num_classes, dtype="float32", name="logits")

    def build(self, input_shape):
        self._trunk.build(input_shape)
        self.logits.build(self._trunk.compute_output_shape(input_shape))

    def call(self, features, training=None):
        return self.logits(self._trunk(features, training=training))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes, dropout=self.dropout, hidden_units=self.hidden_units
        )
        return config


@keras.saving.register_keras_serializable(package="leukemia_tf")
class HierarchicalHead(keras.layers.Layer):
    """One Dense of logits per taxonomy level.

    Args:
      taxonomy: the label tree (a :class:`Taxonomy`, or its nested tree
        mapping as stored in the config).
      dropout: dropout rate on the features (and on the hidden layer).
      hidden_units: width of an optional shared hidden Dense+GELU layer.

    Call returns ``{"level_k": [B, len(taxonomy.levels[k])]}`` float32
    logits. Only differences within a sibling group matter: see
    :func:`level_log_probs`.
    """

    def __init__(
        self,
        taxonomy: Taxonomy | Mapping,
        dropout: float = 0.0,
        hidden_units: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_dropout(dropout)
        self.taxonomy = _as_taxonomy(taxonomy)
        self.dropout = float(dropout)
        self.hidden_units = int(hidden_units)
        self._trunk = _Trunk(self.dropout, self.hidden_units, dtype=self.dtype_policy)
        self.level_layers = [
            keras.layers.Dense(len(nodes), dtype="float32", name=level_key(level))
            for level, nodes in enumerate(self.taxonomy.levels)
        ]

    def build(self, input_shape):
        self._trunk.build(input_shape)
        trunk_shape = self._trunk.compute_output_shape(input_shape)
        for layer in self.level_layers:
            layer.build(trunk_shape)

    def call(self, features, training=None):
        x = self._trunk(features, training=training)
        return {level_key(i): layer(x) for i, layer in enumerate(self.level_layers)}

    def compute_output_shape(self, input_shape):
        return {
            level_key(i): (input_shape[0], len(nodes))
            for i, nodes in enumerate(self.taxonomy.levels)
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            taxonomy=taxonomy_to_tree(self.taxonomy),
            dropout=self.dropout,
            hidden_units=self.hidden_units,
        )
        return config


class _Trunk(keras.layers.Layer):
    """Dropout, then optionally Dense+GELU+Dropout (shared by both heads)."""

    def __init__(self, dropout: float, hidden_units: int, **kwargs):
        super().__init__(**kwargs)
        self.drop_in = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.hidden = None
        if hidden_units > 0:
            self.hidden = keras.layers.Dense(
                hidden_units, activation="gelu", dtype=self.dtype_policy, name="hidden"
            )
            self.drop_hidden = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape):
        if self.hidden is not None:
            self.hidden.build(input_shape)

    def call(self, x, training=None):
        x = self.drop_in(x, training=training)
        if self.hidden is not None:
            x = self.drop_hidden(self.hidden(x), training=training)
        return x

    def compute_output_shape(self, input_shape):
        if self.hidden is None:
            return tuple(input_shape)
        return (*input_shape[:-1], self.hidden.units)


def _check_dropout(dropout) -> None:
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


# ------------------------------------------------ hierarchical probabilities


def _sibling_groups(taxonomy: Taxonomy, level: int) -> tuple[np.ndarray, int]:
    """(parent index per node of ``level``, number of parent slots)."""
    parents = taxonomy.level_parents(level).astype(np.int32)
    num_groups = 1 if level == 0 else len(taxonomy.levels[level - 1])
    return parents, num_groups


def _level_logits(level_logits: Mapping, taxonomy: Taxonomy, level: int) -> tf.Tensor:
    key = level_key(level)
    if key not in level_logits:
        raise ValueError(
            f"missing '{key}' in the level logits (got {sorted(level_logits)}); the taxonomy "
            f"has {taxonomy.num_levels} levels"
        )
    logits = tf.cast(level_logits[key], tf.float32)
    expected = len(taxonomy.levels[level])
    if logits.shape[-1] is not None and logits.shape[-1] != expected:
        raise ValueError(
            f"'{key}' has {logits.shape[-1]} logits, the taxonomy has {expected} nodes at "
            f"level {level}"
        )
    return logits


def _group_logsumexp(logits: tf.Tensor, parents: np.ndarray, num_groups: int) -> tf.Tensor:
    """Per node, logsumexp of the logits of its sibling group (itself included).

    ``logits`` is ``[B, n]``; segment ops reduce over the leading axis, so the
    node axis is moved first.
    """
    by_node = tf.transpose(logits)  # [n, B]
    # Subtract each group's max first (stable logsumexp).
    group_max = tf.math.unsorted_segment_max(by_node, parents, num_groups)  # [G, B]
    node_max = tf.gather(group_max, parents)  # [n, B]
    group_sum = tf.math.unsorted_segment_sum(tf.exp(by_node - node_max), parents, num_groups)
    node_lse = tf.math.log(tf.gather(group_sum, parents)) + node_max
    return tf.transpose(node_lse)  # [B, n]


def level_log_probs(level_logits: Mapping, taxonomy: Taxonomy) -> dict[str, tf.Tensor]:
    """``log P(node | parent)`` for every node of every level.

    Args:
      level_logits: ``{"level_k": [B, n_k]}`` (the :class:`HierarchicalHead`
        output).
      taxonomy: the head's taxonomy.

    Returns:
      ``{"level_k": [B, n_k]}`` float32: a log-softmax over each sibling group.
    """
    out = {}
    for level in range(taxonomy.num_levels):
        logits = _level_logits(level_logits, taxonomy, level)
        parents, num_groups = _sibling_groups(taxonomy, level)
        out[level_key(level)] = logits - _group_logsumexp(logits, parents, num_groups)
    return out


def node_probabilities(level_logits: Mapping, taxonomy: Taxonomy) -> dict[str, tf.Tensor]:
    """Marginal ``P(node)`` for every node: the product of the conditionals on its path.

    Consistent by construction: a parent's marginal equals the sum of its
    children's, and each level with every branch reaching it sums to 1.

    Returns:
      ``{"level_k": [B, n_k]}`` float32.
    """
    log_probs = level_log_probs(level_logits, taxonomy)
    out: dict[str, tf.Tensor] = {}
    parent_log = None
    for level in range(taxonomy.num_levels):
        key = level_key(level)
        log_marginal = log_probs[key]
        if parent_log is not None:
            log_marginal += tf.gather(parent_log, taxonomy.level_parents(level), axis=1)
        out[key] = tf.exp(log_marginal)
        parent_log = log_marginal
    return out


def leaf_probabilities(level_logits: Mapping, taxonomy: Taxonomy) -> tf.Tensor:
    """``P(leaf)`` for every leaf of the taxonomy (leaves at any depth).

    Returns:
      ``[B, len(taxonomy.leaves)]`` float32, rows summing to 1, in the order of
      ``taxonomy.leaves``.
    """
    log_probs = level_log_probs(level_logits, taxonomy)
    paths = taxonomy.leaf_paths_matrix()  # [n_leaves, L], -1 below a leaf
    total = 0.0
    for level in range(taxonomy.num_levels):
        index = paths[:, level]
        mask = tf.constant(index >= 0, tf.float32)
        gathered = tf.gather(log_probs[level_key(level)], np.maximum(index, 0), axis=1)
        total += gathered * mask
    return tf.exp(total)


def greedy_path(level_probs: Sequence[tf.Tensor], taxonomy: Taxonomy) -> list[tf.Tensor]:
    """The top-down greedy walk: at each level the most probable child of the node chosen above.

    Args:
      level_probs: per level, ``[B, n_k]`` node probabilities (marginals, or
        anything whose argmax within a sibling group picks the same child).
      taxonomy: the tree whose levels they are.

    Returns:
      One ``int32 [B]`` tensor per level: the index of the chosen node among
      the level's nodes, or ``-1`` below a leaf (no child to choose).
    """
    chosen = []
    previous = None
    for level, probs in enumerate(level_probs):
        if previous is None:
            allowed = tf.ones_like(probs, tf.bool)
        else:
            parents = tf.constant(taxonomy.level_parents(level), tf.int32)
            allowed = tf.equal(parents[None, :], previous[:, None])
        masked = tf.where(allowed, probs, tf.fill(tf.shape(probs), -1.0))
        index = tf.argmax(masked, axis=-1, output_type=tf.int32)
        index = tf.where(tf.reduce_any(allowed, axis=-1), index, -1)
        chosen.append(index)
        previous = index
    return chosen


# ----------------------------------------------------------------- targets


def level_targets_to_soft(level_targets, taxonomy: Taxonomy) -> dict[str, tf.Tensor]:
    """Level encodings ``[B, L]`` (``-1`` = not applicable) -> one-hot per level.

    A ``-1`` becomes a row of zeros, which masks that level in
    :func:`hierarchical_loss`. Soft targets are what :func:`mixup` and
    :func:`cutmix` mix.

    Returns:
      ``{"level_k": [B, n_k]}`` float32.
    """
    level_targets = tf.convert_to_tensor(level_targets)
    if not level_targets.dtype.is_integer:
        raise ValueError(
            f"level targets must be integer level encodings, got dtype {level_targets.dtype.name}"
        )
    if level_targets.shape.rank != 2 or (
        level_targets.shape[-1] is not None and level_targets.shape[-1] != taxonomy.num_levels
    ):
        raise ValueError(
            f"level targets must have shape [batch, {taxonomy.num_levels}] (one index per "
            f"taxonomy level), got {level_targets.shape}"
        )
    return {
        level_key(level): tf.one_hot(level_targets[:, level], len(nodes), dtype=tf.float32)
        for level, nodes in enumerate(taxonomy.levels)
    }


def _smooth_within_groups(
    target: tf.Tensor, parents: np.ndarray, num_groups: int, label_smoothing: float
) -> tf.Tensor:
    """Label smoothing inside each sibling group; keeps every group's mass."""
    by_node = tf.transpose(target)  # [n, B]
    group_mass = tf.math.unsorted_segment_sum(by_node, parents, num_groups)  # [G, B]
    group_size = np.bincount(parents, minlength=num_groups).astype(np.float32)
    spread = tf.gather(group_mass, parents) / group_size[parents][:, None]
    return tf.transpose((1.0 - label_smoothing) * by_node + label_smoothing * spread)


def hierarchical_loss(
    level_targets,
    level_logits: Mapping,
    taxonomy: Taxonomy,
    level_weights: Sequence[float] | Mapping[str, float] | None = None,
    label_smoothing: float = 0.0,
) -> tf.Tensor:
    """Per-example hierarchical cross-entropy.

    For every level k: ``-sum_j t_kj * log P(j | parent(j))``, the
    cross-entropy of the sibling softmax, weighted by ``level_weights[k]`` and
    summed over levels. With one-hot targets that is the log-likelihood of
    the label's path. Levels below a label's depth (``-1``, or a zero soft row)
    contribute nothing.

    Args:
      level_targets: int ``[B, L]`` level encodings (``-1`` = masked), or soft
        targets ``{"level_k": [B, n_k]}``; a soft row's sum is the weight of that
        level for that example (not renormalised; see the module docstring).
      level_logits: ``{"level_k": [B, n_k]}`` from :class:`HierarchicalHead`.
      taxonomy: the head's taxonomy.
      level_weights: one weight per level (sequence, or dict by level key);
        default all 1.
      label_smoothing: epsilon, spread within each sibling group (a label
        never leaks probability to another branch of the tree).

    Returns:
      ``[B]`` float32 loss.
    """
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    weights = _level_weights(level_weights, taxonomy)
    if isinstance(level_targets, Mapping):
        targets = {k: tf.cast(v, tf.float32) for k, v in level_targets.items()}
    else:
        targets = level_targets_to_soft(level_targets, taxonomy)
    log_probs = level_log_probs(level_logits, taxonomy)
    loss = 0.0
    for level in range(taxonomy.num_levels):
        key = level_key(level)
        if key not in targets:
            raise ValueError(f"missing soft targets for '{key}' (got {sorted(targets)})")
        target = targets[key]
        if label_smoothing:
            parents, num_groups = _sibling_groups(taxonomy, level)
            target = _smooth_within_groups(target, parents, num_groups, float(label_smoothing))
        loss += weights[level] * -tf.reduce_sum(target * log_probs[key], axis=-1)
    return loss


def _level_weights(level_weights, taxonomy: Taxonomy) -> list[float]:
    if level_weights is None:
        return [1.0] * taxonomy.num_levels
    if isinstance(level_weights, Mapping):
        unknown = set(level_weights) - {level_key(i) for i in range(taxonomy.num_levels)}
        if unknown:
            raise ValueError(f"level_weights: unknown levels {sorted(unknown)}")
        weights = [float(level_weights.get(level_key(i), 1.0)) for i in range(taxonomy.num_levels)]
    else:
        weights = [float(w) for w in level_weights]
        if len(weights) != taxonomy.num_levels:
            raise ValueError(
                f"level_weights needs one weight per taxonomy level ({taxonomy.num_levels}), "
                f"got {len(weights)}"
            )
    if any(w < 0 for w in weights):
        raise ValueError(f"level_weights must be >= 0, got {weights}")
    return weights


def flat_loss(targets, logits, label_smoothing: float = 0.0) -> tf.Tensor:
    """Per-example softmax cross-entropy of a flat head.

    Args:
      targets: int class indices ``[B]`` (``-1`` = no label: zero loss), or
        soft targets ``[B, C]`` (rows summing to the example's weight, as
        produced by :func:`mixup`/:func:`cutmix`).
      logits: ``[B, C]``.
      label_smoothing: epsilon, spread uniformly over the classes.

    Returns:
      ``[B]`` float32 loss.
    """
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    logits = tf.cast(logits, tf.float32)
    targets = tf.convert_to_tensor(targets)
    num_classes = logits.shape[-1]
    if targets.dtype.is_integer:
        if targets.shape.rank != 1:
            raise ValueError(f"integer flat targets must have shape [batch], got {targets.shape}")
        targets = tf.one_hot(targets, num_classes, dtype=tf.float32)
    else:
        targets = tf.cast(targets, tf.float32)
        if targets.shape.rank != 2 or targets.shape[-1] != num_classes:
            raise ValueError(
                f"soft flat targets must have shape [batch, {num_classes}], got {targets.shape}"
            )
    if label_smoothing:
        # Keep each row's mass: a masked (all-zero) row stays masked.
        mass = tf.reduce_sum(targets, axis=-1, keepdims=True)
        targets = (1.0 - label_smoothing) * targets + label_smoothing * mass / num_classes
    return -tf.reduce_sum(targets * tf.nn.log_softmax(logits, axis=-1), axis=-1)
