"""Exponential moving averages of the weights and of the BatchNorm statistics.

Keras' optimizer keeps the EMA of the trainable variables (``use_ema``); this
module adds the BatchNorm moving statistics, which the optimizer does not
average, and swaps both in and out around validation and saving.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf


def batchnorm_pairs(model: keras.Model) -> list[tuple]:
    """``(moving statistic, average)`` pairs for every BatchNormalization layer of ``model``.

    Keras' optimizer EMA averages the trainable variables only, so the EMA
    weights would be evaluated with the moving mean and variance of the
    live weights, which follow the last few dozen batches (momentum 0.9-0.99)
    and move with every update. Averaging the statistics with the same
    momentum as the weights, as timm's ``ModelEmaV2`` does with every buffer,
    gives the EMA weights statistics of the same time span. Call under the
    strategy's scope; the averages start at the statistics' current values.
    """
    pairs = []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.built:
            for var in (layer.moving_mean, layer.moving_variance):
                average = keras.Variable(
                    tf.identity(var.value),
                    trainable=False,
                    name=f"{var.name}_ema",
                    aggregation="mean",
                )
                pairs.append((var, average))
    return pairs


def update_batchnorm(pairs: Sequence, momentum: tf.Tensor) -> None:
    """One EMA update of every ``(statistic, average)`` pair (in a replica context)."""
    for var, average in pairs:
        average.assign(momentum * average + (1.0 - momentum) * tf.cast(var.value, average.dtype))


def swap(optimizer, batchnorm: Sequence = ()) -> None:
    """Swaps the model's variables with their EMA copies (in place).

    The optimizer's EMA covers the trainable variables; ``batchnorm`` holds
    ``(moving statistic, its average)`` pairs (:func:`batchnorm_pairs`).
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    pairs = list(
        zip(inner._trainable_variables, inner._model_variables_moving_average, strict=True)
    )
    for var, average in pairs + list(batchnorm):
        current = tf.identity(var.value)
        var.assign(average.value)
        average.assign(current)
