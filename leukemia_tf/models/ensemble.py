"""Fold ensembles: K classifiers averaged into one model of the same outputs.

:func:`build_ensemble` joins the fold models of a cross-validation
(:mod:`leukemia_tf.crossval_lib`) into one functional Keras model: the input
``"pixels"`` goes to every fold model and :class:`MeanProbability` combines
their outputs into the output dict of a single classifier (``{"logits"}`` for
a flat head, ``{"level_k"}`` for a hierarchical one). Everything downstream
(``LabelSpace.probabilities``, the trust scores, temperature scaling, the
serving signatures) reads it as it reads one model's outputs.

How the outputs are averaged: **the mean of the fold models' probabilities**
(not of their logits).

* Flat head: the ensemble's ``logits`` are ``log(mean_k softmax(logits_k)) + b``,
  so their softmax is exactly the mean of the fold models' class
  probabilities.
* Hierarchical head: every taxonomy node's marginal probability is averaged
  over the folds (marginals of a tree stay consistent under averaging: a
  parent's is still the sum of its children's), and ``level_k`` holds
  ``log(mean marginal of the node) - log(mean marginal of its parent)``, the
  log of the averaged conditional; the sibling softmax of the head then gives
  back exactly the averaged marginals at every level.
* ``b`` (added to every logit of a flat head, to the top level of a
  hierarchical one) changes no probability (a softmax ignores a shift shared
  by a whole sibling group) but makes the ``energy`` trust score
  (``-logsumexp`` of the class logits) the mean of the fold models' energies,
  instead of a constant 0.

Probabilities are floored at :data:`PROBABILITY_FLOOR` before the logarithm,
so a probability that underflowed to 0 in every fold gives a very negative
but finite logit (no ``-inf``, no ``NaN`` in a sibling group whose parent has
probability 0); the change is below 1e-29.

Temperature scaling divides these logits like any others: the calibrated
ensemble is the mean probabilities raised to the power ``1/T`` and
renormalised (per sibling group for a hierarchical head).

An ensemble has no single penultimate feature space (each fold model has
its own), so it carries no trust statistics (``trust.with_features`` refuses
it): its trust outputs are the logit scores (max probability, margin,
energy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from leukemia_tf.models import heads, trust
from leukemia_tf.models.classifier import INPUT_NAME
from leukemia_tf.models.label_space import LabelSpace
from leukemia_tf.taxonomy import Taxonomy

#: How the fold models are combined (recorded in ``ensemble.json`` and the reports).
AVERAGING = "mean of the fold models' class probabilities (hierarchical: of every node's marginal)"

#: The ensemble's :class:`MeanProbability` layer.
LAYER_NAME = "fold_mean"
#: Name of the ensemble model.
MODEL_NAME = "fold_ensemble"

#: Probabilities are floored here before their logarithm (see the module docstring).
PROBABILITY_FLOOR = 1e-30


def fold_model_name(fold: int) -> str:
    """The name of fold ``fold``'s model inside the ensemble."""
    return f"fold_{fold}"


@keras.saving.register_keras_serializable(package="leukemia_tf")
class MeanProbability(keras.layers.Layer):
    """The outputs of one classifier whose probabilities are the mean of K classifiers'.

    Args:
      head: ``"flat"`` or ``"hierarchical"``.
      class_names: the classes (for a hierarchical head: the taxonomy nodes
        the model predicts, used by the energy).
      taxonomy: the hierarchical head's tree (a :class:`Taxonomy` or its nested
        tree mapping, as stored in the config); None for a flat head.

    Call takes a list of K output dicts (``{"logits"}`` or ``{"level_k"}``) and
    returns one dict of the same keys: see the module docstring.
    """

    def __init__(
        self,
        head: str,
        class_names: Sequence[str],
        taxonomy: Taxonomy | Mapping | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if head not in ("flat", "hierarchical"):
            raise ValueError(f"head must be 'flat' or 'hierarchical', got {head!r}")
        self.head = head
        self.class_names = list(class_names)
        if head == "hierarchical":
            if taxonomy is None:
                raise ValueError("a hierarchical ensemble needs the taxonomy")
            if not isinstance(taxonomy, Taxonomy):
                taxonomy = Taxonomy(taxonomy, source="<ensemble config>")
            self.taxonomy = taxonomy
        else:
            self.taxonomy = None
        self._space = LabelSpace(self.class_names, head, self.taxonomy)

    def _energy(self, outputs: Mapping) -> tf.Tensor:
        """``[B]`` the energy trust score of one model's outputs (``trust.logit_scores``)."""
        return trust.logit_scores(dict(outputs), self._space)["energy"]

    def call(self, fold_outputs):
        fold_outputs = [
            {k: tf.cast(v, tf.float32) for k, v in outputs.items()} for outputs in fold_outputs
        ]
        if not fold_outputs:
            raise ValueError("an ensemble needs at least one model")
        mean_energy = tf.reduce_mean(tf.stack([self._energy(o) for o in fold_outputs]), axis=0)

        def log(p):
            return tf.math.log(tf.maximum(p, PROBABILITY_FLOOR))

        if self.head == "flat":
            probs = tf.reduce_mean(
                tf.stack([tf.nn.softmax(o["logits"], axis=-1) for o in fold_outputs]), axis=0
            )
            logits = log(probs)
            shift = -mean_energy - tf.reduce_logsumexp(logits, axis=-1)
            return {"logits": logits + shift[:, None]}
        taxonomy = self.taxonomy
        marginals = [heads.node_probabilities(o, taxonomy) for o in fold_outputs]
        log_marginal = {
            key: log(tf.reduce_mean(tf.stack([m[key] for m in marginals]), axis=0))
            for key in marginals[0]
        }
        out = {}
        for level in range(taxonomy.num_levels):
            key = heads.level_key(level)
            out[key] = log_marginal[key]
            if level:
                parents = taxonomy.level_parents(level)
                out[key] -= tf.gather(log_marginal[heads.level_key(level - 1)], parents, axis=1)
        # The joint logit of a class (the sum of its path's level logits) telescopes
        # to its log mean marginal.
        joint = tf.stack(
            [
                log_marginal[heads.level_key(taxonomy.depth(name))][:, taxonomy.level_index(name)]
                for name in self.class_names
            ],
            axis=-1,
        )
        shift = -mean_energy - tf.reduce_logsumexp(joint, axis=-1)
        out[heads.level_key(0)] += shift[:, None]
        return out

    def compute_output_spec(self, fold_outputs):
        first = fold_outputs[0]
        return {
            k: keras.KerasTensor(v.shape, dtype="float32", name=f"{self.name}_{k}")
            for k, v in first.items()
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            head=self.head,
            class_names=self.class_names,
            taxonomy=heads.taxonomy_to_tree(self.taxonomy) if self.taxonomy is not None else None,
        )
        return config


def build_ensemble(
    models: Sequence[keras.Model],
    head: str,
    class_names: Sequence[str],
    taxonomy: Taxonomy | None = None,
    names: Sequence[str] | None = None,
) -> keras.Model:
    """One model whose probabilities are the mean of ``models``' (see the module docstring).

    Args:
      models: float32 classifiers of the same input size and outputs.
      head: their head, ``"flat"`` or ``"hierarchical"``.
      class_names: their classes.
      taxonomy: their taxonomy (a hierarchical head).
      names: the name of each model inside the ensemble (unique); default
        ``fold_0``, ``fold_1``, ...

    Raises:
      ValueError: no models, or models of different input shapes or outputs.
    """
    if not models:
        raise ValueError("an ensemble needs at least one model")
    names = list(names) if names is not None else [fold_model_name(i) for i in range(len(models))]
    if len(set(names)) != len(models):
        raise ValueError(f"the models' names must be unique, got {names}")
    shape = tuple(models[0].input.shape[1:])
    keys = sorted(models[0].output)
    for name, model in zip(names, models, strict=True):
        if tuple(model.input.shape[1:]) != shape:
            raise ValueError(f"{name}: input shape {tuple(model.input.shape[1:])}, not {shape}")
        if sorted(model.output) != keys:
            raise ValueError(f"{name}: outputs {sorted(model.output)}, not {keys}")
        model.name = name
    pixels = keras.Input(shape, dtype="float32", name=INPUT_NAME)
    outputs = [model(pixels) for model in models]
    combined = MeanProbability(head, class_names, taxonomy, name=LAYER_NAME)(outputs)
    return keras.Model(pixels, combined, name=MODEL_NAME)


def ensemble_layer(model: keras.Model) -> MeanProbability | None:
    """The model's :class:`MeanProbability` layer: not None exactly for a fold ensemble."""
    for layer in model.layers:
        if isinstance(layer, MeanProbability):
            return layer
    return None


def is_ensemble(model: keras.Model) -> bool:
    """True for a model built by :func:`build_ensemble`."""
    return ensemble_layer(model) is not None


def member_models(model: keras.Model) -> list[keras.Model]:
    """The models an ensemble averages, in order."""
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def mean_probabilities(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of K ``[N, C]`` probability arrays (what the ensemble's probabilities equal)."""
    return np.mean(np.stack([np.asarray(p, np.float64) for p in probabilities]), axis=0)
