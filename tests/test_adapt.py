"""AdaBN (leukemia_tf.models.adapt): tiny models, CPU, exact statistics."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from leukemia_tf.models import adapt, build_classifier
from leukemia_tf.models.classifier import get_backbone

EPS = 1e-3  # the tiny model's BatchNorm epsilon


def _tiny_model(seed: int = 0) -> keras.Model:
    """conv -> BN -> ReLU -> Dropout -> noise -> conv -> BN -> pool -> dense, random weights."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="pixels")
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(epsilon=EPS, name="b1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.GaussianNoise(1.0, name="noise")(x)
    x = keras.layers.Conv2D(5, 3, padding="same", name="c2")(x)
    x = keras.layers.BatchNormalization(epsilon=EPS, name="b2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, name="dense")(x)
    model = keras.Model(inputs, outputs, name="tiny")
    # Non-trivial gamma, beta, moving statistics and biases (not the initialisers').
    rng = np.random.default_rng(seed)
    model.set_weights(
        [w + rng.uniform(0.1, 0.5, w.shape).astype(w.dtype) for w in model.get_weights()]
    )
    return model


def _images(n: int, size: int = 8, seed: int = 1, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(100 + shift, 40, (n, size, size, 3)), 0, 255).astype(np.float32)


def _by_path(model: keras.Model) -> dict[str, np.ndarray]:
    return {w.path: np.array(w.numpy()) for w in model.weights}


def _conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A 'same' 3x3 convolution in numpy (stride 1, zero padding)."""
    k = kernel.shape[0] // 2
    padded = np.pad(x, ((0, 0), (k, k), (k, k), (0, 0)))
    h, w = x.shape[1:3]
    out = np.zeros((*x.shape[:3], kernel.shape[-1]), np.float64)
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            out += padded[:, i : i + h, j : j + w, :] @ kernel[i, j]
    return out + bias


def test_moving_statistics_equal_a_numpy_reference():
    model = _tiny_model()
    images = _images(37)
    result = adapt.adapt_batchnorm(model, images, batch_size=5, source="test images")
    assert (result.adapted, result.num_layers, result.num_images) == (True, 2, 37)
    assert result.source == "test images" and "2 layer(s)" in result.note

    # The reference, in numpy (float64) from the source weights: b1 sees the
    # first convolution's outputs; b2 the second's, after b1 normalised with
    # its adapted statistics and Dropout and noise as at inference (identity).
    w = {layer.name: [np.float64(v) for v in layer.get_weights()] for layer in model.layers}
    c1 = _conv(images.astype(np.float64), *w["c1"])
    mean1, var1 = c1.mean(axis=(0, 1, 2)), c1.var(axis=(0, 1, 2))
    gamma1, beta1 = w["b1"][:2]
    h = np.maximum(0.0, (c1 - mean1) / np.sqrt(var1 + EPS) * gamma1 + beta1)
    c2 = _conv(h, *w["c2"])
    mean2, var2 = c2.mean(axis=(0, 1, 2)), c2.var(axis=(0, 1, 2))

    got = {layer.name: layer for layer in result.model.layers}
    np.testing.assert_allclose(got["b1"].moving_mean.numpy(), mean1, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got["b1"].moving_variance.numpy(), var1, rtol=1e-5)
    np.testing.assert_allclose(got["b2"].moving_mean.numpy(), mean2, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got["b2"].moving_variance.numpy(), var2, rtol=1e-5)
    # Not the source's statistics.
    assert not np.allclose(model.get_layer("b2").moving_mean.numpy(), mean2, atol=1e-2)


def test_batch_size_does_not_change_the_statistics():
    model = _tiny_model()
    images = _images(23)
    one = adapt.adapt_batchnorm(model, images, batch_size=1).model
    whole = adapt.adapt_batchnorm(model, images, batch_size=64).model
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(7)
    streamed = adapt.adapt_batchnorm(model, dataset).model
    for other in (whole, streamed):
        for a, b in zip(one.get_weights(), other.get_weights(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_only_batchnorm_statistics_change_and_the_input_is_not_mutated():
    model = build_classifier(backbone="cnn_tiny", head="flat", num_classes=3, image_size=32)
    # Dropout, stochastic depth and the head must stay in inference mode.
    before = _by_path(model)
    images = _images(20, size=32, shift=40.0)
    result = adapt.adapt_batchnorm(model, images, batch_size=8)
    assert result.model is not model
    n_bn = len(adapt.batchnorm_layers(model))
    assert result.adapted and result.num_layers == n_bn > 5 and result.num_images == 20

    # The input model: every weight bit-identical, no hook left behind.
    after = _by_path(model)
    assert before.keys() == after.keys()
    for path, value in before.items():
        assert np.array_equal(value, after[path]), path
    for layer in adapt.batchnorm_layers(model) + adapt.batchnorm_layers(result.model):
        assert "call" not in vars(layer), layer.name

    # The copy: only the moving statistics moved; each one did.
    adapted = _by_path(result.model)
    assert adapted.keys() == before.keys()
    statistics = [p for p in before if p.endswith(("moving_mean", "moving_variance"))]
    assert len(statistics) == 2 * n_bn
    for path, value in before.items():
        if path in statistics:
            assert not np.allclose(value, adapted[path]), path
        else:
            assert np.array_equal(value, adapted[path]), path

    # A fixed point: in inference mode, the adapted model feeds each BatchNorm
    # inputs whose statistics over the target images are its moving statistics.
    backbone = get_backbone(result.model)
    for layer in adapt.batchnorm_layers(backbone):
        probe = keras.Model(backbone.input, layer.input)
        x = probe.predict(images, verbose=0).astype(np.float64)
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-4, atol=1e-4)
    # And the adapted copy predicts differently from the source model.
    assert not np.allclose(
        model(images, training=False)["logits"], result.model(images, training=False)["logits"]
    )


def test_a_model_without_batchnorm_is_returned_unchanged():
    model = build_classifier(backbone="cnn_tiny_gn", head="flat", num_classes=3, image_size=32)
    before = model.get_weights()
    result = adapt.adapt_batchnorm(model, _images(4, size=32))
    assert result.model is model
    assert (result.adapted, result.num_layers, result.num_images) == (False, 0, 0)
    assert "no BatchNorm" in result.note and result.metadata()["adapted"] is False
    for a, b in zip(before, model.get_weights(), strict=True):
        assert np.array_equal(a, b)


def test_bad_inputs_are_named():
    model = _tiny_model()
    with pytest.raises(ValueError, match="non-empty"):
        adapt.adapt_batchnorm(model, np.zeros((0, 8, 8, 3)))
    with pytest.raises(ValueError, match="batch_size"):
        adapt.adapt_batchnorm(model, _images(2), batch_size=0)
