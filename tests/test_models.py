"""Backbone registry and classifier: tiny shapes, CPU, no downloads."""

from __future__ import annotations

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from leukemia_tf.models import backbones as backbones_lib
from leukemia_tf.models import (
    build_backbone,
    build_classifier,
    flat_loss,
    get_backbone,
    get_backbone_spec,
    hierarchical_loss,
    list_backbones,
    set_backbone_trainable,
)
from leukemia_tf.models.registry import iter_layers
from leukemia_tf.taxonomy import Taxonomy

SIZE = 32  # the smallest input every registered backbone accepts


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return Taxonomy.load()


@pytest.fixture
def bfloat16_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _pixels(batch=2, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.uniform(0, 255, (batch, size, size, 3)), tf.float32)


# ------------------------------------------------------------------ registry

EXPECTED = [
    *[f"efficientnet_b{i}" for i in range(8)],
    *[f"efficientnetv2_b{i}" for i in range(4)],
    "efficientnetv2_s",
    "efficientnetv2_m",
    "efficientnetv2_l",
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "convnext_large",
    "vit_tiny_patch16",
    "vit_small_patch16",
    "vit_base_patch16",
    "mobilenetv3_small",
    "mobilenetv3_large",
    "cnn_tiny",
    "cnn_small",
]


def test_registry_holds_the_documented_backbones():
    names = list_backbones()
    assert set(EXPECTED) <= set(names)
    assert names == sorted(names)
    assert list_backbones("vit") == ["vit_base_patch16", "vit_small_patch16", "vit_tiny_patch16"]
    assert get_backbone_spec("efficientnetv2_s").default_image_size == 384


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'") as info:
        build_backbone("resnet9000", image_size=SIZE)
    for name in ("efficientnetv2_b0", "convnext_tiny", "vit_small_patch16", "cnn_small"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_classifier(backbone="nope", head="flat", num_classes=2, image_size=SIZE)
    with pytest.raises(ValueError, match="unknown backbone family"):
        list_backbones("resnet")


def test_bad_build_arguments_are_named():
    with pytest.raises(ValueError, match="image_size must be an integer >= 32"):
        build_backbone("cnn_tiny", image_size=16)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_backbone("vit_tiny_patch16", image_size=40)
    with pytest.raises(ValueError, match="bn_momentum"):
        build_backbone("cnn_tiny", image_size=SIZE, bn_momentum=1.5)
    with pytest.raises(ValueError, match="stochastic depth"):
        build_backbone("vit_tiny_patch16", image_size=SIZE, drop_path_rate=0.1)
    with pytest.raises(ValueError, match="head must be one of"):
        build_classifier(backbone="cnn_tiny", head="tree", num_classes=2, image_size=SIZE)
    with pytest.raises(ValueError, match="needs a taxonomy"):
        build_classifier(backbone="cnn_tiny", head="hierarchical", image_size=SIZE)


def _backbone_params():
    for name in EXPECTED + ["cnn_medium"]:
        marks = [pytest.mark.slow] if get_backbone_spec(name).slow else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", _backbone_params())
def test_every_backbone_builds_and_trains_one_step(name):
    model = build_backbone(name, image_size=SIZE)
    assert model.name == name
    x = _pixels()
    with tf.GradientTape() as tape:
        features = model(x, training=True)
        loss = tf.reduce_mean(tf.square(features))
    assert features.shape.rank == 2 and features.shape[0] == 2
    assert features.dtype == tf.float32
    assert np.all(np.isfinite(features.numpy()))
    grads = tape.gradient(loss, model.trainable_weights)
    assert all(g is not None for g in grads), "a trainable weight got no gradient"
    keras.optimizers.SGD(0.01).apply_gradients(zip(grads, model.trainable_weights, strict=True))


def test_backbones_normalise_their_own_inputs():
    # The same image as uint8-valued floats and shifted by a constant must give
    # different features (no normalisation by a per-batch statistic), and the
    # input layer must accept [0, 255] floats without overflow.
    model = build_backbone("efficientnetv2_b0", image_size=SIZE)
    layer_types = {type(layer).__name__ for layer in iter_layers(model)}
    assert "Rescaling" in layer_types  # include_preprocessing=True
    vit = build_backbone("vit_tiny_patch16", image_size=SIZE)
    rescale = vit.get_layer("normalize")
    out = rescale(tf.constant([[0.0, 127.5, 255.0]])).numpy()
    np.testing.assert_allclose(out, [[-1.0, 0.0, 1.0]], atol=1e-6)


def test_bn_momentum_override_reaches_every_batchnorm_and_survives_config():
    model = build_backbone("efficientnet_b0", image_size=SIZE, bn_momentum=0.9)
    bns = [
        layer for layer in iter_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(bns) > 40
    assert {bn.momentum for bn in bns} == {0.9}
    assert {bn.get_config()["momentum"] for bn in bns} == {0.9}
    default = build_backbone("efficientnet_b0", image_size=SIZE)
    assert {
        layer.momentum
        for layer in iter_layers(default)
        if isinstance(layer, keras.layers.BatchNormalization)
    } == {0.99}


def _drop_rates(model):
    return [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]


def test_drop_path_rate_is_applied_per_family():
    # 0 disables the keras.applications EfficientNet default of 0.2.
    assert max(_drop_rates(build_backbone("efficientnetv2_b0", image_size=SIZE))) == 0.0
    rates = _drop_rates(build_backbone("efficientnetv2_b0", image_size=SIZE, drop_path_rate=0.1))
    assert 0.08 < max(rates) <= 0.1 and rates == sorted(rates)
    convnext = build_backbone("convnext_tiny", image_size=SIZE, drop_path_rate=0.2)
    rates = _drop_rates(convnext)
    assert len(rates) == 18  # one per ConvNeXt-T block
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert convnext(_pixels(), training=True).shape == (2, 768)
    cnn = build_backbone("cnn_small", image_size=SIZE, drop_path_rate=0.1)
    assert max(_drop_rates(cnn)) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["cnn_tiny_gn", "cnn_small_gn", "cnn_medium_gn"])
def test_groupnorm_cnn_variants_have_no_batchnorm(name):
    from leukemia_tf.models import cnn
    from leukemia_tf.models.registry import set_bn_momentum
    from leukemia_tf.training import ema

    model = build_backbone(name, image_size=SIZE, bn_momentum=0.5)  # a no-op here, not an error
    reference = build_backbone(name.removesuffix("_gn"), image_size=SIZE)
    layers = list(iter_layers(model))
    assert model.name == name and get_backbone_spec(name).family == "cnn"
    assert not [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    norms = [layer for layer in layers if isinstance(layer, keras.layers.GroupNormalization)]
    bns = [
        layer
        for layer in iter_layers(reference)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    # Same architecture, one GroupNorm per BatchNorm, same convolutions.
    assert len(norms) == len(bns)
    assert [w.shape for w in model.weights if "conv" in w.path] == [
        w.shape for w in reference.weights if "conv" in w.path
    ]
    for layer in norms:
        channels = layer.gamma.shape[0]
        assert layer.groups == min(32, channels // 4) and channels % layer.groups == 0
        assert layer.epsilon == 1e-5
        # Every residual branch starts as the identity; the other norms start at 1.
        expected = 0.0 if layer.name.endswith("_2_gn") else 1.0
        assert np.all(layer.gamma.numpy() == expected), layer.name
    assert set_bn_momentum(model, 0.9) == 0
    assert ema.batchnorm_pairs(model) == []
    x = _pixels(batch=3)
    train = model(x, training=True).numpy()
    assert train.shape == (3, reference.output_shape[-1])
    # No batch statistics: training and inference agree, and an image's
    # features do not depend on the other images of its batch.
    np.testing.assert_allclose(model(x, training=False).numpy(), train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model(x[:1], training=True).numpy(), train[:1], rtol=1e-5, atol=1e-5)
    assert cnn.gn_groups(48) == 12 and cnn.gn_groups(512) == 32


# ---------------------------------------------------------------- classifier


def _all_weights_get_gradient(model, loss_fn, x):
    # The zero-initialised last BatchNorm of each residual branch blocks the
    # gradient to that branch at step 0 (by design); take one step first.
    optimizer = keras.optimizers.SGD(0.1)
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_fn(model(x, training=True)))
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))
    missing = [
        w.path
        for w, g in zip(model.trainable_weights, grads, strict=True)
        if g is None or not np.any(g.numpy() != 0)
    ]
    assert not missing, f"no gradient reaches {missing}"
    assert np.isfinite(loss.numpy())


def test_flat_classifier_gradient_reaches_every_weight():
    model = build_classifier(
        backbone="cnn_tiny", head="flat", num_classes=3, image_size=SIZE, hidden_units=8
    )
    labels = tf.constant([0, 1, 2, 1])
    _all_weights_get_gradient(model, lambda out: flat_loss(labels, out["logits"]), _pixels(batch=4))


def test_hierarchical_classifier_gradient_reaches_every_weight(taxonomy):
    model = build_classifier(
        backbone="cnn_tiny", head="hierarchical", taxonomy=taxonomy, image_size=SIZE
    )
    # Labels reaching every level and every sibling group of the bundled tree.
    names = ["pre_b", "early_pre_b", "CLL", "normal", "reactive", "AML"]
    targets = np.stack([taxonomy.encode(n) for n in names])
    _all_weights_get_gradient(
        model,
        lambda out: hierarchical_loss(targets, out, taxonomy),
        _pixels(batch=len(names)),
    )


def test_classifier_outputs_and_uint8_input(taxonomy):
    flat = build_classifier(backbone="cnn_tiny", head="flat", taxonomy=taxonomy, image_size=SIZE)
    x = _pixels()
    out = flat(x)
    assert list(out) == ["logits"]
    assert out["logits"].shape == (2, len(taxonomy.leaves))
    out_uint8 = tf.function(lambda images: flat(images))(tf.cast(x, tf.uint8))
    np.testing.assert_allclose(
        out_uint8["logits"], flat(tf.floor(x))["logits"], rtol=1e-5, atol=1e-5
    )
    hier = build_classifier(
        backbone="cnn_tiny", head="hierarchical", taxonomy=taxonomy, image_size=SIZE
    )
    out = hier(x)
    assert sorted(out) == [f"level_{i}" for i in range(taxonomy.num_levels)]
    for level, nodes in enumerate(taxonomy.levels):
        assert out[f"level_{level}"].shape == (2, len(nodes))


@pytest.mark.parametrize("backbone", ["cnn_tiny", "vit_tiny_patch16", "efficientnet_b0"])
def test_mixed_bfloat16_outputs_and_loss_are_float32(bfloat16_policy, taxonomy, backbone):
    model = build_classifier(
        backbone=backbone, head="hierarchical", taxonomy=taxonomy, image_size=SIZE
    )
    assert get_backbone(model).compute_dtype == "bfloat16"
    out = model(_pixels(), training=True)
    assert {v.dtype for v in out.values()} == {tf.float32}
    targets = np.stack([taxonomy.encode("pre_b"), taxonomy.encode("normal")])
    assert hierarchical_loss(targets, out, taxonomy).dtype == tf.float32
    flat = build_classifier(backbone=backbone, head="flat", num_classes=3, image_size=SIZE)
    logits = flat(_pixels())["logits"]
    assert logits.dtype == tf.float32
    assert flat_loss([0, 1], logits).dtype == tf.float32


@pytest.mark.parametrize(
    "backbone,head,drop_path_rate",
    [
        ("cnn_tiny", "flat", 0.0),
        ("cnn_tiny", "hierarchical", 0.1),
        ("vit_tiny_patch16", "hierarchical", 0.0),
        ("efficientnet_b0", "flat", 0.1),
        # The ConvNeXt rebuilt with stochastic-depth layers must reload too.
        pytest.param("convnext_tiny", "flat", 0.1, marks=pytest.mark.slow),
    ],
)
def test_config_round_trip_and_keras_save_reload(
    tmp_path, taxonomy, backbone, head, drop_path_rate
):
    model = build_classifier(
        backbone=backbone,
        head=head,
        taxonomy=taxonomy,
        image_size=SIZE,
        dropout=0.3,
        hidden_units=4,
        bn_momentum=0.8,
        drop_path_rate=drop_path_rate,
    )
    x = _pixels()
    expected = model(x, training=False)

    clone = keras.Model.from_config(model.get_config())
    assert [w.shape for w in clone.weights] == [w.shape for w in model.weights]
    clone.set_weights(model.get_weights())
    for key in expected:
        np.testing.assert_allclose(clone(x)[key], expected[key], rtol=1e-5, atol=1e-5)

    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    got = reloaded(x, training=False)
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-5)
    head_layer = reloaded.get_layer("head")
    assert head_layer.dropout == 0.3 and head_layer.hidden_units == 4
    bns = [
        layer
        for layer in iter_layers(reloaded)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert all(bn.momentum == 0.8 for bn in bns)
    drop_rates = [
        layer.rate
        for layer in iter_layers(get_backbone(reloaded))
        if isinstance(layer, keras.layers.Dropout)
    ]
    assert max(drop_rates, default=0.0) == pytest.approx(drop_path_rate, abs=0.02)


def test_set_backbone_trainable_freezes_weights_and_batchnorm():
    model = build_classifier(backbone="cnn_tiny", head="flat", num_classes=3, image_size=SIZE)
    backbone = get_backbone(model)
    head_weights = len(model.get_layer("head").trainable_weights)
    x = _pixels(batch=4)

    set_backbone_trainable(model, False)
    assert len(model.trainable_weights) == head_weights
    moving = [w.numpy().copy() for w in backbone.non_trainable_weights]
    train_features = backbone(x, training=True)
    # Frozen BatchNorm runs in inference mode: same features, stats untouched.
    np.testing.assert_allclose(train_features, backbone(x, training=False), rtol=1e-5, atol=1e-5)
    for before, w in zip(moving, backbone.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(before, w.numpy())

    set_backbone_trainable(model, True)
    assert len(model.trainable_weights) > head_weights
    backbone(x, training=True)
    assert any(
        not np.array_equal(before, w.numpy())
        for before, w in zip(moving, backbone.non_trainable_weights, strict=True)
    )


# ------------------------------------------------------------------- weights


def test_weights_file_round_trip(tmp_path):
    source = build_backbone("cnn_tiny", image_size=SIZE)
    x = _pixels()
    path = tmp_path / "cnn_tiny.weights.h5"
    source.save_weights(path)
    loaded = build_backbone("cnn_tiny", image_size=SIZE, weights=str(path))
    np.testing.assert_allclose(loaded(x), source(x), rtol=1e-5, atol=1e-5)
    # Conv weights do not depend on the input size.
    assert build_backbone("cnn_tiny", image_size=64, weights=str(path)) is not None


def test_weights_from_a_saved_classifier(tmp_path, taxonomy):
    classifier = build_classifier(
        backbone="cnn_tiny", head="hierarchical", taxonomy=taxonomy, image_size=SIZE
    )
    path = tmp_path / "best.keras"
    classifier.save(path)
    # Fine-tune from a previous run: a flat head on the same backbone.
    fresh = build_classifier(
        backbone="cnn_tiny", head="flat", num_classes=2, image_size=SIZE, weights=str(path)
    )
    x = _pixels()
    np.testing.assert_allclose(
        get_backbone(fresh)(x), get_backbone(classifier)(x), rtol=1e-5, atol=1e-5
    )


def test_weights_mismatch_names_file_and_backbone(tmp_path):
    other = build_backbone("cnn_small", image_size=SIZE)
    path = tmp_path / "cnn_small.weights.h5"
    other.save_weights(path)
    with pytest.raises(ValueError, match=r"cnn_small\.weights\.h5.*backbone 'cnn_tiny'"):
        build_backbone("cnn_tiny", image_size=SIZE, weights=str(path))

    vit_path = tmp_path / "vit.weights.h5"
    build_backbone("vit_tiny_patch16", image_size=SIZE).save_weights(vit_path)
    with pytest.raises(ValueError, match="does not fit backbone 'vit_tiny_patch16'"):
        # Position embeddings of 5 (32 px) vs 17 (64 px) tokens.
        build_backbone("vit_tiny_patch16", image_size=64, weights=str(vit_path))

    keras_path = tmp_path / "other.keras"
    build_classifier(backbone="cnn_small", head="flat", num_classes=2, image_size=SIZE).save(
        keras_path
    )
    with pytest.raises(ValueError, match=r"other\.keras.*no model named 'cnn_tiny'"):
        build_backbone("cnn_tiny", image_size=SIZE, weights=str(keras_path))

    with pytest.raises(FileNotFoundError, match="missing.weights.h5"):
        build_backbone("cnn_tiny", image_size=SIZE, weights=str(tmp_path / "missing.weights.h5"))
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"0")
    with pytest.raises(ValueError, match=r"weights\.npz: unsupported format"):
        build_backbone("cnn_tiny", image_size=SIZE, weights=str(bad))


def test_imagenet_weights_are_requested_from_keras_applications():
    calls = {}

    def fake_constructor(**kwargs):
        calls.update(kwargs)
        return keras.applications.MobileNetV3Small(**{**kwargs, "weights": None})

    model = backbones_lib._build_mobilenetv3(
        "mobilenetv3_small", fake_constructor, image_size=64, weights="imagenet", drop_path_rate=0
    )
    assert calls["weights"] == "imagenet"
    assert calls["include_top"] is False and calls["pooling"] == "avg"
    assert calls["include_preprocessing"] is True
    assert calls["input_shape"] == (64, 64, 3)
    assert model.name == "mobilenetv3_small"

    def offline_constructor(**kwargs):
        raise OSError("name resolution failed")

    with pytest.raises(RuntimeError, match="ImageNet weights .*local weights file"):
        backbones_lib._application(offline_constructor, image_size=64, weights="imagenet")


def test_no_imagenet_weights_for_scratch_backbones():
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_backbone("cnn_tiny", image_size=SIZE, weights="imagenet")


# ----------------------------------------------------------------------- ViT


def test_vit_imagenet_presets_exist_in_keras_hub():
    known = set(keras_hub.models.ViTBackbone.presets)
    for presets in backbones_lib.VIT_IMAGENET_PRESETS.values():
        # keras-hub presets by name; Hugging Face ports through keras-hub's
        # transformers converter (the keras-hub loader for "hf://" handles).
        assert all(p in known or p.startswith("hf://") for p in presets.values())
    assert backbones_lib.vit_imagenet_preset("vit_base_patch16", 224).endswith("_224_imagenet")
    assert backbones_lib.vit_imagenet_preset("vit_base_patch16", 128).endswith("_224_imagenet")
    assert backbones_lib.vit_imagenet_preset("vit_base_patch16", 256).endswith("_384_imagenet")
    assert backbones_lib.vit_imagenet_preset("vit_small_patch16", 224) == (
        "hf://WinKawaks/vit-small-patch16-224"
    )
    with pytest.raises(ValueError, match="no ImageNet weights are known for 'vit_x'") as info:
        backbones_lib.vit_imagenet_preset("vit_x", 224)
    assert "vit_base_patch16_224_imagenet" in str(info.value)


def _small_vit(image_size):
    return keras_hub.models.ViTBackbone(
        image_shape=(image_size, image_size, 3),
        patch_size=16,
        num_layers=1,
        num_heads=3,
        hidden_dim=192,
        mlp_dim=768,
    )


def test_vit_weight_transfer_resizes_position_embeddings():
    source, target = _small_vit(32), _small_vit(64)
    pos = next(w for w in source.weights if "position_embedding" in w.path)
    grid = np.ones((5, 192), np.float32) * 0.5
    grid[0] = 7.0  # the class-token position must be kept as is
    pos.assign(grid)
    backbones_lib.transfer_vit_weights(source, target)
    for s, t in zip(source.weights, target.weights, strict=True):
        if "position_embedding" in t.path:
            assert tuple(t.shape) == (17, 192)
            np.testing.assert_allclose(t.numpy()[0], 7.0)
            np.testing.assert_allclose(t.numpy()[1:], 0.5, atol=1e-5)  # constant stays constant
        else:
            np.testing.assert_array_equal(s.numpy(), t.numpy())
    with pytest.raises(ValueError, match="ViT weight transfer"):
        backbones_lib.transfer_vit_weights(
            _small_vit(32),
            keras_hub.models.ViTBackbone(
                image_shape=(32, 32, 3),
                patch_size=16,
                num_layers=2,
                num_heads=3,
                hidden_dim=192,
                mlp_dim=768,
            ),
        )


def test_vit_imagenet_path_loads_preset_and_adapts_size(monkeypatch):
    # Everything but the download: a small "preset" at 32 px, used at 64 px.
    source = _small_vit(32)
    requested = []

    def fake_from_preset(preset, **kwargs):
        requested.append(preset)
        return source

    monkeypatch.setattr(keras_hub.models.ViTBackbone, "from_preset", fake_from_preset)
    monkeypatch.setitem(backbones_lib.VIT_IMAGENET_PRESETS, "vit_tiny_patch16", {32: "fake_32"})
    model = build_backbone("vit_tiny_patch16", image_size=64, weights="imagenet")
    assert requested == ["fake_32"]
    assert model(_pixels(size=64)).shape == (2, 192)
    vit = model.get_layer("vit_tiny_patch16_vit")
    assert tuple(vit.image_shape) == (64, 64, 3)
    kernel = [w for w in vit.weights if "position_embedding" not in w.path]
    expected = [w for w in source.weights if "position_embedding" not in w.path]
    for got, want in zip(kernel, expected, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    # Same size as the preset: used directly.
    model32 = build_backbone("vit_tiny_patch16", image_size=32, weights="imagenet")
    assert any(layer is source for layer in model32.layers)
