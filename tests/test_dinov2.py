"""DINOv2 / DinoBloom backbones and the checkpoint converter: tiny ViTs, offline, numpy references."""

from __future__ import annotations

import collections
import json
import math
import pickle
import subprocess
import sys
import types
import zipfile

import keras
import numpy as np
import pytest
from safetensors.numpy import save_file

from leukemia_tf.models import build_backbone, dinov2, get_backbone_spec, list_backbones
from leukemia_tf.models import dinobloom_convert as convert

#: A tiny ViT: 2 blocks, width 48, 3 heads of 16, MLP 96; patch 14.
TINY = dict(hidden_dim=48, num_layers=2, num_heads=3, intermediate_dim=96)
#: The tiny checkpoint's position grid: 2 x 2 patches (28 pixels).
GRID = 2
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture
def tiny(monkeypatch):
    """Size "s" is the tiny ViT for this test (registry names and the converter read SIZES)."""
    monkeypatch.setitem(dinov2.SIZES, "s", dict(TINY))


def _checkpoint(seed=0, grid=GRID, mask_token=True) -> dict[str, np.ndarray]:
    """Random tensors with the published names and shapes; nothing is 0 or 1 by accident."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in convert.expected_shapes(TINY, grid).items():
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            value = 1.0 + 0.2 * rng.normal(size=shape)
        elif name.endswith("gamma"):  # layer scale: far from the 1.0 default
            value = rng.uniform(0.2, 0.8, size=shape)
        else:
            value = 0.3 * rng.normal(size=shape)
        out[name] = value.astype(np.float32)
    if mask_token:
        out["mask_token"] = rng.normal(size=(1, TINY["hidden_dim"])).astype(np.float32)
    return out


def _pixels(size, batch=2, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)


def _convert(tmp_path, tensors, name="ckpt") -> str:
    source = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(source))
    return str(convert.convert_checkpoint(source, "s", tmp_path / name))


# ------------------------------------------------------ numpy references


def _ref_resize(grid: np.ndarray, n: int, offset: float = 0.1, a: float = -0.75) -> np.ndarray:
    """PyTorch's bicubic (align_corners=False, clamped taps) written tap by tap: [M, M, C] -> [n, n, C]."""
    m = grid.shape[0]
    scale = m / (n + offset)

    def taps(o):
        x = (o + 0.5) * scale - 0.5
        i = math.floor(x)
        t = x - i
        # PyTorch's get_cubic_upsample_coefficients.
        w = [
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        ]
        return [min(max(i + k, 0), m - 1) for k in (-1, 0, 1, 2)], w

    out = np.zeros((n, n, grid.shape[2]))
    for r in range(n):
        rows, wr = taps(r)
        for c in range(n):
            cols, wc = taps(c)
            for ri, rw in zip(rows, wr, strict=True):
                for ci, cw in zip(cols, wc, strict=True):
                    out[r, c] += rw * cw * grid[ri, ci]
    return out


def _ref_position(pos: np.ndarray, n: int, **kwargs) -> np.ndarray:
    m = int(round((pos.shape[1] - 1) ** 0.5))
    if m == n:
        return pos[0]
    grid = pos[0, 1:].reshape(m, m, -1).astype(np.float64)
    return np.concatenate([pos[0, :1], _ref_resize(grid, n, **kwargs).reshape(n * n, -1)])


def _layer_norm(x, w, b, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf)


def _reference(t, pixels, *, qkv_order=(0, 1, 2), layer_scale=True, position=None):
    """The DINOv2 forward pass in numpy (float64): class token after the final LayerNorm."""
    d, h, p = TINY["hidden_dim"], TINY["num_heads"], 14
    hd = d // h
    x = (pixels.astype(np.float64) / 255.0 - MEAN) / STD
    b, s = x.shape[0], x.shape[1]
    g = s // p
    # Conv with stride = kernel = 14 as reshape + matmul; weight [D, 3, 14, 14].
    patches = x.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(b, g * g, 3 * p * p)
    tokens = patches @ t["patch_embed.proj.weight"].reshape(d, -1).T + t["patch_embed.proj.bias"]
    cls = np.broadcast_to(t["cls_token"][0], (b, 1, d))
    z = np.concatenate([cls, tokens], 1)
    z = z + (_ref_position(t["pos_embed"], g) if position is None else position)
    for i in range(TINY["num_layers"]):
        k = f"blocks.{i}."
        y = _layer_norm(z, t[k + "norm1.weight"], t[k + "norm1.bias"])
        qkv = y @ t[k + "attn.qkv.weight"].T + t[k + "attn.qkv.bias"]
        qkv = qkv.reshape(b, -1, 3, h, hd).transpose(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
        q, kk, v = (qkv[j] for j in qkv_order)
        logits = q @ kk.transpose(0, 1, 3, 2) / math.sqrt(hd)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True)
        o = (att @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
        o = o @ t[k + "attn.proj.weight"].T + t[k + "attn.proj.bias"]
        z = z + (t[k + "ls1.gamma"] if layer_scale else 1.0) * o
        y = _layer_norm(z, t[k + "norm2.weight"], t[k + "norm2.bias"])
        y = y @ t[k + "mlp.fc1.weight"].T + t[k + "mlp.fc1.bias"]
        y = 0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)))  # exact GELU
        y = y @ t[k + "mlp.fc2.weight"].T + t[k + "mlp.fc2.bias"]
        z = z + (t[k + "ls2.gamma"] if layer_scale else 1.0) * y
    return _layer_norm(z, t["norm.weight"], t["norm.bias"])[:, 0]


# ---------------------------------------------------------------- registry


def test_registry_lists_the_backbones_with_patch_14_sizes(tmp_path):
    names = ["dinobloom_b", "dinobloom_l", "dinobloom_s", "dinov2_base", "dinov2_large"]
    assert list_backbones("dinov2") == sorted(names + ["dinov2_small"])
    for name in list_backbones("dinov2"):
        spec = get_backbone_spec(name)
        assert (spec.default_image_size, spec.image_size_multiple, spec.weights_dir) == (
            224,
            14,
            True,
        )
    with pytest.raises(
        ValueError, match=r"'dinov2_small': image_size must be a multiple of 14.*230"
    ):
        build_backbone("dinov2_small", image_size=230)
    with pytest.raises(ValueError, match="convert_backbone"):
        build_backbone("dinobloom_s", image_size=224, weights="imagenet")
    with pytest.raises(ValueError, match="drop path"):
        build_backbone("dinov2_small", image_size=224, drop_path_rate=0.1)
    with pytest.raises(ValueError, match="is a directory; backbone 'cnn_tiny'"):
        build_backbone("cnn_tiny", image_size=32, weights=str(tmp_path))
    with pytest.raises(ValueError, match="not a keras-hub preset|could not load weights directory"):
        build_backbone("dinobloom_s", image_size=28, weights=str(tmp_path))


def test_sizes_match_the_published_parameter_counts():
    # keras-hub's preset metadata counts the 37 x 37 (518 px) position grid
    # twice (stored and interpolated copies) and the mask token.
    presets = dinov2.DINOV2Backbone.presets
    for name, (size, preset) in dinov2.MODELS.items():
        if preset is None:
            continue
        config = dinov2.SIZES[size]
        shapes = convert.expected_shapes(config, 37)
        count = sum(math.prod(s) for s in shapes.values())
        count += config["hidden_dim"] + math.prod(shapes["pos_embed"])
        assert count == presets[preset]["metadata"]["params"], name


def test_random_tiny_backbone_normalises_its_pixels(tiny):
    model = build_backbone("dinov2_small", image_size=28, weights="none")
    assert model.name == "dinov2_small"
    features = model(_pixels(28))
    assert features.shape == (2, TINY["hidden_dim"]) and features.dtype == "float32"
    normalize = model.get_layer("normalize")
    out = np.asarray(normalize(np.array([[MEAN * 255, (MEAN + STD) * 255]], np.float32)))
    np.testing.assert_allclose(out.reshape(2, 3), [[0, 0, 0], [1, 1, 1]], atol=1e-5)


def test_mixed_float16_policy(tiny):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_backbone("dinov2_small", image_size=28, weights="none")
        encoder = model.get_layer("dinov2_small_encoder")
        assert encoder.compute_dtype == "float16"
        assert all(w.dtype == "float32" for w in model.weights)
        assert np.all(np.isfinite(np.asarray(model(_pixels(28)), np.float32)))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_trained_position_embeddings_survive_save_and_reload(tiny, tmp_path):
    model = build_backbone("dinov2_small", image_size=42, weights="none")
    embedding = model.get_layer("dinov2_small_encoder").embeddings.interpolated_position_embeddings
    assert embedding.trainable
    # A change with a negative sum: keras-hub's own layer would drop it on save.
    embedding.assign(np.asarray(embedding) - 0.5)
    x = _pixels(42)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(np.asarray(reloaded(x)), np.asarray(model(x)))
    model.save_weights(tmp_path / "m.weights.h5")
    fresh = build_backbone("dinov2_small", image_size=42, weights=str(tmp_path / "m.weights.h5"))
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))


# --------------------------------------------------------------- converter


def test_every_tensor_lands_where_it_belongs(tiny, tmp_path):
    t = _checkpoint()
    model = build_backbone("dinobloom_s", image_size=28, weights=_convert(tmp_path, t))
    encoder = model.get_layer("dinobloom_s_encoder")
    d, h = TINY["hidden_dim"], TINY["num_heads"]
    expected = {
        "embeddings/cls_token": t["cls_token"],
        "embeddings/mask_token": t["mask_token"],
        "embeddings/position_embeddings": t["pos_embed"],
        "embeddings/interpolated_position_embeddings": t["pos_embed"],
        "embeddings/patch_embeddings/projection/bias": t["patch_embed.proj.bias"],
        "layernorm/gamma": t["norm.weight"],
        "layernorm/beta": t["norm.bias"],
    }
    # Conv kernel [kh, kw, in, out] <- PyTorch [out, in, kh, kw].
    kernel = t["patch_embed.proj.weight"]
    expected["embeddings/patch_embeddings/projection/kernel"] = np.einsum("oiyx->yxio", kernel)
    for i in range(TINY["num_layers"]):
        k, e = f"blocks.{i}.", f"encoder/layers_{i}/"
        qkv_w, qkv_b = t[k + "attn.qkv.weight"], t[k + "attn.qkv.bias"]
        for j, part in enumerate(("query", "key", "value")):
            w = qkv_w[j * d : (j + 1) * d]  # rows of q, then k, then v
            # kernel[in, head, c] = W[head * 16 + c, in]
            expected[e + f"attention/attention/{part}/kernel"] = np.stack(
                [w[n * (d // h) : (n + 1) * (d // h)].T for n in range(h)], axis=1
            )
            expected[e + f"attention/attention/{part}/bias"] = qkv_b[j * d : (j + 1) * d].reshape(
                h, d // h
            )
        proj = t[k + "attn.proj.weight"]  # [out, in]; in = head * 16 + c
        expected[e + "attention/attention/attention_output/kernel"] = np.stack(
            [proj[:, n * (d // h) : (n + 1) * (d // h)].T for n in range(h)]
        )
        expected[e + "attention/attention/attention_output/bias"] = t[k + "attn.proj.bias"]
        for ours, theirs in (
            ("norm1/gamma", "norm1.weight"),
            ("norm1/beta", "norm1.bias"),
            ("norm2/gamma", "norm2.weight"),
            ("norm2/beta", "norm2.bias"),
            ("layer_scale1/lambda1", "ls1.gamma"),
            ("layer_scale2/lambda1", "ls2.gamma"),
            ("mlp/fc1/bias", "mlp.fc1.bias"),
            ("mlp/fc2/bias", "mlp.fc2.bias"),
        ):
            expected[e + ours] = t[k + theirs]
        expected[e + "mlp/fc1/kernel"] = t[k + "mlp.fc1.weight"].T
        expected[e + "mlp/fc2/kernel"] = t[k + "mlp.fc2.weight"].T
    prefix = encoder.name + "_"  # keras-hub prefixes its layer names with the model's
    found = {w.path.removeprefix(prefix): np.asarray(w) for w in encoder.weights}
    assert sorted(found) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(found[path], value, err_msg=path)
    info = json.loads((tmp_path / "ckpt" / convert.CONVERSION_FILE).read_text())
    assert (info["size"], info["position_grid"], info["tensors"]) == ("s", GRID, len(t))


@pytest.mark.parametrize("image_size", [28, 42, 56])
def test_features_match_the_numpy_reference(tiny, tmp_path, image_size):
    # 28: the checkpoint's own 2 x 2 grid; 42 and 56: resized position embeddings.
    t = _checkpoint(mask_token=False)  # timm format: no mask token
    model = build_backbone("dinobloom_s", image_size=image_size, weights=_convert(tmp_path, t))
    x = _pixels(image_size)
    np.testing.assert_allclose(np.asarray(model(x)), _reference(t, x), rtol=1e-4, atol=1e-4)


def test_the_reference_comparison_would_catch_mapping_errors(tiny, tmp_path):
    t = _checkpoint()
    x = _pixels(42)
    right = _reference(t, x)

    def far(other):
        # 50 x the tolerance above; the smallest error here (offset 0 instead
        # of 0.1 in the position resize) moves the features by about 0.013.
        return np.abs(other - right).max() > 5e-3

    assert far(_reference(t, x, qkv_order=(1, 0, 2)))  # q and k swapped
    assert far(_reference(t, x, qkv_order=(0, 2, 1)))  # k and v swapped
    assert far(_reference(t, x, layer_scale=False))
    assert far(_reference(t, x, position=_ref_position(t["pos_embed"], 3, offset=0.0)))
    keras_hub_resize = np.asarray(
        dinov2.DINOV2Backbone(
            patch_size=14, **TINY, image_shape=(42, 42, 3), position_embedding_shape=(28, 28, 3)
        ).embeddings._interpolate_position_embeddings(t["pos_embed"], 14, (28, 28), (42, 42))
    )[0]
    assert far(_reference(t, x, position=keras_hub_resize))
    # And a converted checkpoint with q and k swapped gives other features.
    swapped = dict(t)
    for i in range(TINY["num_layers"]):
        for key in (f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.qkv.bias"):
            q, k, v = np.split(t[key], 3)
            swapped[key] = np.concatenate([k, q, v])
    model = build_backbone("dinobloom_s", image_size=42, weights=_convert(tmp_path, swapped))
    assert far(np.asarray(model(x)))


def test_published_weights_path_and_architecture_check_offline(tiny, tmp_path, monkeypatch):
    # weights="imagenet" loads MODELS' keras-hub preset; a local one stands in for Kaggle.
    t = _checkpoint()
    directory = _convert(tmp_path, t)
    monkeypatch.setitem(dinov2.MODELS, "dinov2_small", ("s", directory))
    model = build_backbone("dinov2_small", image_size=42, weights="imagenet")
    x = _pixels(42)
    np.testing.assert_allclose(np.asarray(model(x)), _reference(t, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(
        ValueError, match=r"does not hold this architecture: hidden_dim=48 \(expected 768\)"
    ):
        build_backbone("dinobloom_b", image_size=28, weights=directory)


@pytest.mark.parametrize(("m", "n"), [(2, 3), (2, 4), (4, 3), (16, 8), (16, 20), (37, 16)])
def test_position_interpolation_matches_pytorch_bicubic(m, n):
    rng = np.random.default_rng(m * 100 + n)
    pos = rng.normal(size=(1, 1 + m * m, 5)).astype(np.float32)
    got = dinov2.interpolate_position_embedding(pos, n)
    assert got.shape == (1, 1 + n * n, 5)
    np.testing.assert_allclose(got[0], _ref_position(pos, n), rtol=1e-5, atol=1e-5)
    constant = np.full((1, 1 + m * m, 2), 3.0, np.float32)
    np.testing.assert_allclose(dinov2.interpolate_position_embedding(constant, n), 3.0, rtol=1e-6)
    np.testing.assert_array_equal(dinov2.interpolate_position_embedding(pos, m), pos)


def test_bad_checkpoints_get_one_error_naming_the_tensor(tiny, tmp_path):
    t = _checkpoint()
    wrong = dict(t, **{"blocks.1.attn.qkv.weight": np.zeros((192, 64), np.float32)})
    with pytest.raises(ValueError, match=r"'blocks.1.attn.qkv.weight' has shape \(192, 64\), "):
        convert.check_tensors(wrong, "s")
    with pytest.raises(ValueError, match=r"expected \(144, 48\)"):
        convert.check_tensors(wrong, "s")
    missing = {k: v for k, v in t.items() if k != "blocks.1.ls2.gamma"}
    with pytest.raises(
        ValueError, match=r"missing tensor 'blocks.1.ls2.gamma' \(expected shape \(48,\)"
    ):
        convert.check_tensors(missing, "s")
    extra = dict(t, register_tokens=np.zeros((1, 4, 48), np.float32))
    with pytest.raises(
        ValueError, match=r"unexpected tensor 'register_tokens' \(shape \(1, 4, 48\)"
    ):
        convert.check_tensors(extra, "s")
    # The real sizes: a ViT-S checkpoint given as --size=b fails on the first tensor.
    with pytest.raises(
        ValueError, match=r"'cls_token' has shape \(1, 1, 48\), expected \(1, 1, 768\)"
    ):
        convert.check_tensors(t, "b")
    # Nothing is written for a bad checkpoint.
    save_file(missing, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="blocks.1.ls2.gamma"):
        convert.convert_checkpoint(tmp_path / "bad.safetensors", "s", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ .pth files


def _fake_torch(monkeypatch):
    """Modules named like PyTorch's, so that pickle writes the globals torch.save writes."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while pickling")

    def _rebuild_parameter(*args):
        raise AssertionError("never called while pickling")

    for function in (_rebuild_tensor_v2, _rebuild_parameter):
        function.__module__, function.__qualname__ = "torch._utils", function.__name__
    torch.FloatStorage, torch._utils = FloatStorage, utils
    utils._rebuild_tensor_v2, utils._rebuild_parameter = _rebuild_tensor_v2, _rebuild_parameter
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _write_pth(path, state, monkeypatch, *, transpose=(), extra=None):
    """Writes ``state`` the way ``torch.save`` (zip format, pickle protocol 2) does.

    Tensors named in ``transpose`` are stored as transposed views of a
    storage (non-contiguous strides); every tensor is an ``nn.Parameter``.
    """
    torch = _fake_torch(monkeypatch)
    storages = {}

    class Storage:
        def __init__(self, key, data):
            self.key, self.data = key, data

    class Tensor:
        def __init__(self, storage, size, stride):
            self.args = (storage, 0, size, stride, False, collections.OrderedDict())

        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, self.args

    class Parameter:
        def __init__(self, data):
            self.data = data

        def __reduce__(self):
            return torch._utils._rebuild_parameter, (self.data, True, collections.OrderedDict())

    def tensor(name, value):
        key = str(len(storages))
        if name in transpose:  # keep value.T's memory, describe value with strides
            storages[key] = np.ascontiguousarray(value.T)
            rows, cols = value.shape
            return Parameter(Tensor(Storage(key, storages[key]), (rows, cols), (1, rows)))
        storages[key] = np.ascontiguousarray(value)
        strides = tuple(s // 4 for s in storages[key].strides)
        return Parameter(Tensor(Storage(key, storages[key]), value.shape, strides))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", torch.FloatStorage, obj.key, "cpu", obj.data.size)
            return None

    tensors = collections.OrderedDict((k, tensor(k, v)) for k, v in state["teacher"].items())
    with zipfile.ZipFile(path, "w") as archive:
        with archive.open("ckpt/data.pkl", "w") as f:
            Pickler(f, protocol=2).dump(extra if extra is not None else {"teacher": tensors})
        archive.writestr("ckpt/byteorder", "little")
        for key, data in storages.items():
            archive.writestr(f"ckpt/data/{key}", data.astype("<f4").tobytes())
        archive.writestr("ckpt/version", "3\n")


def test_pth_teacher_checkpoint_converts_like_safetensors(tiny, tmp_path, monkeypatch):
    t = _checkpoint()
    teacher = {f"backbone.{k}": v for k, v in t.items()}
    teacher["dino_head.mlp.0.weight"] = np.ones((8, 48), np.float32)
    teacher["ibot_head.last_layer.weight_g"] = np.ones((8, 1), np.float32)
    path = tmp_path / "teacher_checkpoint.pth"
    transposed = ("backbone.blocks.0.attn.qkv.weight", "backbone.blocks.1.mlp.fc2.weight")
    _write_pth(path, {"teacher": teacher}, monkeypatch, transpose=transposed)
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.delitem(sys.modules, "torch._utils")
    read = convert.read_checkpoint(path)
    assert sorted(read) == sorted(t)
    for name, value in t.items():
        np.testing.assert_array_equal(read[name], value, err_msg=name)
    out = convert.convert_checkpoint(path, "s", tmp_path / "from_pth")
    model = build_backbone("dinobloom_s", image_size=42, weights=str(out))
    x = _pixels(42)
    np.testing.assert_allclose(np.asarray(model(x)), _reference(t, x), rtol=1e-4, atol=1e-4)


def test_pth_with_other_globals_is_refused_without_running_them(tmp_path, monkeypatch):
    ran = []

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    _write_pth(path, {"teacher": {}}, monkeypatch, extra={"teacher": {"x": Evil()}})
    monkeypatch.setattr("builtins.print", lambda *a: ran.append(a))
    with pytest.raises(
        ValueError, match=r"refused to load '(__builtin__|builtins).print'.*safetensors"
    ):
        convert.read_checkpoint(path)
    assert not ran
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="legacy torch.save file"):
        convert.read_checkpoint(legacy)


def test_cli_reports_one_error_line(tmp_path):
    save_file(_checkpoint(), str(tmp_path / "tiny.safetensors"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "leukemia_tf.convert_backbone",
            f"--checkpoint={tmp_path / 'tiny.safetensors'}",
            "--size=s",
            f"--output={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: --checkpoint=") and "'cls_token' has shape" in lines[-1]
    assert not (tmp_path / "out").exists()
