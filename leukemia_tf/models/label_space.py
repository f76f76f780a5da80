"""The classes a trained model predicts, and how to read them off its outputs."""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from leukemia_tf.models import heads
from leukemia_tf.taxonomy import Taxonomy


class LabelSpaceError(ValueError):
    """The classes cannot be predicted consistently by the chosen head."""


class LabelSpace:
    """The classes a model predicts and how to read them off its outputs.

    For a flat head the classes are the softmax outputs. For a hierarchical
    head they are taxonomy nodes (an antichain: no class is an ancestor of
    another), and a class's probability is its node's marginal probability,
    the product of the conditional probabilities along its path.
    """

    def __init__(self, class_names: Sequence[str], head: str, taxonomy: Taxonomy | None):
        self.class_names = list(class_names)
        self.head = head
        self.taxonomy = taxonomy
        if head == "hierarchical":
            if taxonomy is None:
                raise ValueError("the hierarchical head needs a taxonomy")
            for a in self.class_names:
                for b in self.class_names:
                    if a != b and a in taxonomy.path(b):
                        raise LabelSpaceError(
                            f"classes '{a}' and '{b}' overlap ('{a}' is an ancestor of '{b}'): "
                            "map the data sets' labels so that no class contains another"
                        )
            self._where = [(taxonomy.depth(c), taxonomy.level_index(c)) for c in self.class_names]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @staticmethod
    def own_outputs(outputs: dict) -> dict:
        """The entries of a model's output dict that hold logits (``logits``, ``level_k``).

        Anything else the dict carries (the pooled features of
        :func:`leukemia_tf.models.trust.with_features`) is left out.
        """
        return {k: v for k, v in outputs.items() if k == "logits" or k.startswith("level_")}

    def probabilities(self, outputs: dict, temperature: float | tf.Tensor = 1.0) -> tf.Tensor:
        """``[B, num_classes]`` float32 class probabilities from the model's outputs.

        Args:
          outputs: the model's output dict (other entries, such as the pooled
            features, are ignored).
          temperature: divides every logit (calibration; 1 = as trained).
        """
        outputs = {
            k: tf.cast(v, tf.float32) / temperature for k, v in self.own_outputs(outputs).items()
        }
        if self.head == "flat":
            return tf.nn.softmax(outputs["logits"], axis=-1)
        marginals = heads.node_probabilities(outputs, self.taxonomy)
        columns = [marginals[heads.level_key(level)][:, index] for level, index in self._where]
        return tf.stack(columns, axis=-1)

    def targets(self, batch: dict) -> tf.Tensor | dict:
        """One-hot (flat) or per-level one-hot (hierarchical, zero rows below depth) targets."""
        if self.head == "flat":
            return tf.one_hot(batch["label"], self.num_classes, dtype=tf.float32)
        levels = batch["levels"]
        return {
            heads.level_key(k): tf.one_hot(levels[:, k], len(nodes), dtype=tf.float32)
            for k, nodes in enumerate(self.taxonomy.levels)
        }

    def loss(self, targets, outputs: dict, label_smoothing: float, level_weights=None) -> tf.Tensor:
        """Per-example float32 loss ``[B]``."""
        if self.head == "flat":
            return heads.flat_loss(targets, outputs["logits"], label_smoothing=label_smoothing)
        level_outputs = {k: v for k, v in outputs.items() if k.startswith("level_")}
        return heads.hierarchical_loss(
            targets,
            level_outputs,
            self.taxonomy,
            level_weights=level_weights,
            label_smoothing=label_smoothing,
        )

    def level_probabilities(self, outputs: dict, temperature: float | tf.Tensor = 1.0) -> dict:
        """Hierarchical head: marginal probability of every node, per level.

        Returns ``{"level_k": [B, len(taxonomy.levels[k])]}``; empty for a flat head.
        """
        if self.head == "flat":
            return {}
        outputs = {
            k: tf.cast(v, tf.float32) / temperature for k, v in self.own_outputs(outputs).items()
        }
        return heads.node_probabilities(outputs, self.taxonomy)
