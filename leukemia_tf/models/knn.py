"""A k-nearest-neighbour classifier head over stored training features.

:class:`KNNHead` takes the place of :class:`~leukemia_tf.models.heads.FlatHead`
in a classifier (same name ``"head"``, same input: the pooled backbone
features, same output: float32 logits ``[B, C]``), so a k-NN probe joined to
its backbone saves, loads and exports like any other classifier of the
package. Its "weights" are the bank: the L2-normalised training features and
their one-hot labels, stored as non-trainable variables.

Prediction: the cosine similarity of the normalised features to every bank
row; the ``k`` most similar rows vote for their class with weight
``exp((s - 1) / temperature)`` (the weighting of Wu et al. 2018 and DINO's
k-NN evaluation; ``s - 1 <= 0`` keeps it finite); the votes, divided by their
sum, are the class probabilities. The logits are their logarithms (floored
at ``log(1e-7)``), so the softmax the rest of the package applies gives the
probabilities back.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

#: Temperature of the similarity weighting (DINO's k-NN evaluation uses 0.07).
DEFAULT_TEMPERATURE = 0.07

#: Smallest probability whose logarithm is a logit (a class without votes).
_FLOOR = 1e-7


@keras.saving.register_keras_serializable(package="leukemia_tf")
class KNNHead(keras.layers.Layer):
    """Similarity-weighted k-NN votes over a bank of training features, as logits.

    Args:
      num_classes: number of classes (>= 2).
      k: neighbours that vote (1 <= k <= bank_size).
      bank_size: rows of the bank (training examples).
      temperature: the votes weigh ``exp((similarity - 1) / temperature)``.

    The bank is zeros until :meth:`set_bank` fills it (or weights are loaded).
    Call returns float32 logits ``[B, num_classes]``; their softmax is the
    normalised votes.
    """

    def __init__(
        self,
        num_classes: int,
        k: int,
        bank_size: int,
        temperature: float = DEFAULT_TEMPERATURE,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"KNNHead: num_classes must be >= 2, got {num_classes}")
        if int(bank_size) < 1:
            raise ValueError(f"KNNHead: bank_size must be >= 1, got {bank_size}")
        if isinstance(k, bool) or not 1 <= int(k) <= int(bank_size):
            raise ValueError(
                f"--knn_k={k}: must be in [1, {bank_size}] (the number of training features)"
            )
        if not float(temperature) > 0:
            raise ValueError(f"KNNHead: temperature must be > 0, got {temperature}")
        self.num_classes = int(num_classes)
        self.k = int(k)
        self.bank_size = int(bank_size)
        self.temperature = float(temperature)

    def build(self, input_shape):
        dim = int(input_shape[-1])
        self.bank = self.add_weight(
            name="bank", shape=(self.bank_size, dim), initializer="zeros", trainable=False
        )
        self.bank_labels = self.add_weight(
            name="bank_labels",
            shape=(self.bank_size, self.num_classes),
            initializer="zeros",
            trainable=False,
        )

    def set_bank(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Fills the bank: ``features [bank_size, D]`` (normalised here) and class indices."""
        features = np.asarray(features, np.float32)
        labels = np.asarray(labels, np.int64)
        if features.shape != tuple(self.bank.shape):
            raise ValueError(
                f"KNNHead: the bank takes features of shape {tuple(self.bank.shape)}, got "
                f"{features.shape}"
            )
        if (
            labels.shape != (self.bank_size,)
            or labels.min() < 0
            or labels.max() >= self.num_classes
        ):
            raise ValueError(
                f"KNNHead: expected {self.bank_size} labels in [0, {self.num_classes}), got shape "
                f"{labels.shape}"
            )
        norms = np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        self.bank.assign(features / norms)
        self.bank_labels.assign(np.eye(self.num_classes, dtype=np.float32)[labels])

    def probabilities(self, features) -> tf.Tensor:
        """``[B, C]`` normalised votes of the ``k`` most similar bank rows."""
        normed = tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1)
        similarity = tf.matmul(normed, tf.convert_to_tensor(self.bank), transpose_b=True)
        top = tf.math.top_k(similarity, k=self.k)
        weights = tf.exp((top.values - 1.0) / self.temperature)  # [B, k], in (0, 1]
        labels = tf.gather(tf.convert_to_tensor(self.bank_labels), top.indices)  # [B, k, C]
        votes = tf.reduce_sum(weights[..., None] * labels, axis=1)
        return votes / tf.maximum(tf.reduce_sum(votes, axis=-1, keepdims=True), 1e-30)

    def call(self, features, training=None):
        return tf.math.log(tf.maximum(self.probabilities(features), _FLOOR))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            k=self.k,
            bank_size=self.bank_size,
            temperature=self.temperature,
        )
        return config
