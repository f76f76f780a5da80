"""Tests of leukemia_tf.evaluation.explain: Grad-CAM, attention rollout, sampling."""

from __future__ import annotations

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from leukemia_tf.evaluation import explain
from leukemia_tf.models import classifier
from leukemia_tf.models.label_space import LabelSpace
from leukemia_tf.taxonomy import Taxonomy


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def test_gradcam_of_a_linear_head_is_the_class_activation_map():
    # With global average pooling and one Dense layer, the Grad-CAM weights are
    # the Dense kernel column / (h * w): Grad-CAM reduces to CAM (Zhou et al.).
    keras.utils.set_random_seed(0)
    model = classifier.build_classifier(
        backbone="cnn_tiny", head="flat", num_classes=3, image_size=64, dropout=0.0
    )
    space = LabelSpace(["a", "b", "c"], "flat", None)
    explainer = explain.make_explainer(model, space)
    assert isinstance(explainer, explain.GradCam)
    assert explainer.layer == "stage4_block1_out" and explainer.grid == (2, 2)

    images = _images(4, 64)
    classes = np.array([0, 1, 2, 1])
    maps = explainer(images, classes)
    assert maps.shape == (4, 64, 64) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1

    backbone = classifier.get_backbone(model)
    features = keras.Model(backbone.input, backbone.get_layer("stage4_block1_out").output)
    activations = features(tf.cast(images, tf.float32)).numpy()  # [4, 2, 2, 128]
    kernel = model.get_layer("head").logits.kernel.numpy()  # [128, 3]
    cam = np.maximum(np.einsum("nhwk,kn->nhw", activations, kernel[:, classes]), 0)
    expected = explain._normalise(tf.constant(cam, tf.float32), 64)
    np.testing.assert_allclose(maps, expected, atol=1e-5)


def test_gradcam_hierarchical_head():
    taxonomy = Taxonomy.load()
    keras.utils.set_random_seed(1)
    model = classifier.build_classifier(
        backbone="cnn_tiny", head="hierarchical", taxonomy=taxonomy, image_size=64, dropout=0.0
    )
    names = ["normal", "reactive", "ALL", "AML", "CLL", "CML"]
    explainer = explain.make_explainer(model, LabelSpace(names, "hierarchical", taxonomy))
    images = _images(3, 64, seed=1)
    first = explainer(images, np.array([0, 0, 0]))
    other = explainer(images, np.array([2, 4, 5]))
    assert first.shape == (3, 64, 64) and np.isfinite(first).all()
    assert 0 <= first.min() and first.max() <= 1
    # The explained score depends on the class: the maps are not all the same.
    assert not np.allclose(first, other)


def test_attention_rollout_for_vit():
    keras.utils.set_random_seed(2)
    model = classifier.build_classifier(
        backbone="vit_tiny_patch16", head="flat", num_classes=2, image_size=32, dropout=0.0
    )
    explainer = explain.make_explainer(model, LabelSpace(["a", "b"], "flat", None))
    assert isinstance(explainer, explain.AttentionRollout)
    assert explain.method_name(explainer) == "attention rollout"
    assert explainer.grid == (2, 2)
    maps = explainer(_images(2, 32, seed=2))  # also checks the re-run blocks match the ViT
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all()
    np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0, atol=1e-6)

    # If re-running the blocks stops matching the backbone (a keras-hub
    # change), the rollout refuses instead of drawing something wrong.
    broken = explain.make_explainer(model, LabelSpace(["a", "b"], "flat", None))

    def without_mlp(self, x):
        scores = []
        for block in self._encoder.encoder_layers:
            y = block.layer_norm_1(x)
            attended, attention = block.mha(y, y, return_attention_scores=True)
            scores.append(attention)
            x = x + attended
        return self._encoder.layer_norm(x), scores

    broken._blocks = types.MethodType(without_mlp, broken)
    with pytest.raises(explain.ExplanationUnavailable, match="keras-hub's ViT layout changed"):
        broken(_images(1, 32))


def _no_pooling_classifier() -> keras.Model:
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    backbone = keras.Model(inputs, keras.layers.Flatten()(x), name="odd_backbone")
    pixels = keras.Input((16, 16, 3), name="pixels")
    logits = keras.layers.Dense(2, name="head")(backbone(pixels))
    return keras.Model(pixels, {"logits": logits})


def test_unsupported_backbone_is_reported_not_raised(tmp_path):
    from leukemia_tf.evaluation import evaluate_lib

    model = _no_pooling_classifier()
    space = LabelSpace(["a", "b"], "flat", None)
    with pytest.raises(explain.ExplanationUnavailable, match="no global pooling"):
        explain.make_explainer(model, space)
    trained = types.SimpleNamespace(
        model=model, label_space=space, class_names=["a", "b"], image_size=16
    )
    sampler = explain.ExampleSampler(2, 2)
    section = evaluate_lib._explanations(trained, sampler, tmp_path)
    assert section["method"] is None and "no global pooling" in section["note"]


def test_failing_explanation_does_not_stop_the_evaluation(tmp_path, monkeypatch):
    from leukemia_tf.evaluation import evaluate_lib

    model = classifier.build_classifier(
        backbone="cnn_tiny", head="flat", num_classes=2, image_size=32
    )
    space = LabelSpace(["a", "b"], "flat", None)
    sampler = explain.ExampleSampler(2, 1)
    images = _images(2, 32)
    sampler.offer(images, np.array([0, 1]), np.array([0, 0]), np.full((2, 2), 0.5), ["x", "y"])

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(evaluate_lib.figures_lib, "explanation_figure", boom)
    trained = types.SimpleNamespace(
        model=model, label_space=space, class_names=["a", "b"], image_size=32
    )
    section = evaluate_lib._explanations(trained, sampler, tmp_path)
    assert section["method"] == "Grad-CAM"
    assert "explanations stopped: RuntimeError: disk full" in section["note"]


def test_example_sampler_is_a_uniform_reservoir():
    images = np.arange(10)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    y_true = np.zeros(10, int)
    y_pred = np.array([0] * 6 + [1] * 4)
    probs = np.tile([0.6, 0.4], (10, 1))
    names = np.array([f"cell{i}.png".encode() for i in range(10)])
    counts = np.zeros(10)
    trials = 3000
    for seed in range(trials):
        # Mark detection (a TF op per batch, tested elsewhere) would make this 100x slower.
        sampler = explain.ExampleSampler(2, 2, seed=seed, count_marks=False)
        # Two batches: the reservoir spans batches.
        sampler.offer(images[:5], y_true[:5], y_pred[:5], probs[:5], names[:5])
        sampler.offer(images[5:], y_true[5:], y_pred[5:], probs[5:], names[5:])
        correct, wrong = sampler.kept[(0, True)], sampler.kept[(0, False)]
        assert len(correct) == 2 and len(wrong) == 2 and sampler.kept[(1, True)] == []
        for item in correct + wrong:
            index = int(item["image"][0, 0, 0])
            assert item["file_name"] == f"cell{index}.png"
            assert item["pred"] == y_pred[index]
            counts[index] += 1
    # Each of the 6 correct cells is kept with probability 2/6, each wrong one 2/4.
    np.testing.assert_allclose(counts[:6] / trials, 2 / 6, atol=0.04)
    np.testing.assert_allclose(counts[6:] / trials, 2 / 4, atol=0.04)
    assert explain.ExampleSampler(2, 0).kept[(0, True)] == []
