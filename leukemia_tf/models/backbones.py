"""The published backbones: keras.applications CNNs and keras-hub ViTs.

Each builder returns a ``keras.Model`` named by its registry name that maps
float32 RGB pixels in [0, 255] to pooled features. The keras.applications
models normalise their own inputs (``include_preprocessing=True``, or the
built-in Rescaling+Normalization stem of EfficientNet V1); the ViTs get a
Rescaling layer to [-1, 1], the normalisation of the keras-hub ImageNet presets
(mean 0.5, std 0.5 on [0, 1] inputs).

``weights="imagenet"`` downloads the published weights on first use (Keras
caches them under ``~/.keras``); these are the only code paths that need the
network, and everything around them is tested offline.
"""

from __future__ import annotations

import functools

import keras
import numpy as np

from leukemia_tf.models.registry import register_backbone

# ------------------------------------------------------------ keras.applications

_APPS = keras.applications

# name -> (constructor, default image size, slow)
_EFFICIENTNET = {
    "efficientnet_b0": (_APPS.EfficientNetB0, 224, False),
    "efficientnet_b1": (_APPS.EfficientNetB1, 240, False),
    "efficientnet_b2": (_APPS.EfficientNetB2, 260, False),
    "efficientnet_b3": (_APPS.EfficientNetB3, 300, False),
    "efficientnet_b4": (_APPS.EfficientNetB4, 380, True),
    "efficientnet_b5": (_APPS.EfficientNetB5, 456, True),
    "efficientnet_b6": (_APPS.EfficientNetB6, 528, True),
    "efficientnet_b7": (_APPS.EfficientNetB7, 600, True),
}
_EFFICIENTNETV2 = {
    "efficientnetv2_b0": (_APPS.EfficientNetV2B0, 224, False),
    "efficientnetv2_b1": (_APPS.EfficientNetV2B1, 240, False),
    "efficientnetv2_b2": (_APPS.EfficientNetV2B2, 260, False),
    "efficientnetv2_b3": (_APPS.EfficientNetV2B3, 300, False),
    "efficientnetv2_s": (_APPS.EfficientNetV2S, 384, False),
    "efficientnetv2_m": (_APPS.EfficientNetV2M, 480, True),
    "efficientnetv2_l": (_APPS.EfficientNetV2L, 480, True),
}
_CONVNEXT = {
    "convnext_tiny": (_APPS.ConvNeXtTiny, 224, False),
    "convnext_small": (_APPS.ConvNeXtSmall, 224, False),
    "convnext_base": (_APPS.ConvNeXtBase, 224, True),
    "convnext_large": (_APPS.ConvNeXtLarge, 224, True),
}
_MOBILENETV3 = {
    "mobilenetv3_small": (_APPS.MobileNetV3Small, 224, False),
    "mobilenetv3_large": (_APPS.MobileNetV3Large, 224, False),
}

# keras.applications EfficientNets build their stochastic-depth Dropout layers
# with rate 0.2 * block_index / num_blocks; they are rescaled to our rate.
_KERAS_EFFICIENTNET_DROP_CONNECT = 0.2


def _application(constructor, *, image_size: int, weights: str, **kwargs) -> keras.Model:
    try:
        return constructor(
            include_top=False,
            weights="imagenet" if weights == "imagenet" else None,
            input_shape=(image_size, image_size, 3),
            pooling="avg",
            **kwargs,
        )
    except Exception as e:
        if weights != "imagenet":
            raise
        raise RuntimeError(
            f"could not load the ImageNet weights of {constructor.__name__} ({e}). They are "
            "downloaded from the internet on first use and cached under ~/.keras/models; "
            "offline, copy them there or pass a local weights file instead"
        ) from e


def _is_drop_path(layer: keras.layers.Layer) -> bool:
    # Stochastic depth in keras.applications and in cnn.py: per-sample Dropout.
    return isinstance(layer, keras.layers.Dropout) and tuple(layer.noise_shape or ()) == (
        None,
        1,
        1,
        1,
    )


def _build_efficientnet(
    name: str, constructor, *, image_size: int, weights: str, drop_path_rate: float, **kwargs
) -> keras.Model:
    model = _application(constructor, image_size=image_size, weights=weights, **kwargs)
    scale = drop_path_rate / _KERAS_EFFICIENTNET_DROP_CONNECT
    for layer in model.layers:
        if _is_drop_path(layer):
            # Dropout reads `rate` at call time and writes it in get_config.
            layer.rate = float(layer.rate) * scale
    # The download file name derives from the default model name: rename after.
    model.name = name
    return model


def _build_convnext(
    name: str, constructor, *, image_size: int, weights: str, drop_path_rate: float
) -> keras.Model:
    model = _application(
        constructor, image_size=image_size, weights=weights, include_preprocessing=True, name=name
    )
    if drop_path_rate > 0:
        model = _convnext_with_drop_path(model, drop_path_rate)
    return model


def _convnext_with_drop_path(model: keras.Model, rate: float) -> keras.Model:
    """Rebuilds a keras.applications ConvNeXt with stochastic depth.

    The public ConvNeXt constructors fix ``drop_path_rate=0`` and then put an
    identity ``Activation`` where the residual branch would be dropped. Those
    layers are swapped for per-sample ``Dropout`` (stochastic depth) with the
    rate rising linearly over the blocks, as in the paper; no weights change.
    """
    config = model.get_config()
    identities = [
        layer_config
        for layer_config in config["layers"]
        if layer_config["class_name"] == "Activation"
        and layer_config["config"]["name"].endswith("_identity")
    ]
    rates = np.linspace(0.0, rate, len(identities))
    for layer_config, block_rate in zip(identities, rates, strict=True):
        old = layer_config["config"]
        layer_config["class_name"] = "Dropout"
        layer_config["module"] = "keras.layers"
        layer_config["registered_name"] = None
        layer_config["config"] = {
            "name": old["name"],
            "trainable": old.get("trainable", True),
            "dtype": old.get("dtype"),
            "rate": float(block_rate),
            "noise_shape": [None, 1, 1, 1],
            "seed": None,
        }
    rebuilt = keras.Model.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def _build_mobilenetv3(
    name: str, constructor, *, image_size: int, weights: str, drop_path_rate: float
) -> keras.Model:
    if drop_path_rate > 0:
        raise ValueError(
            f"backbone '{name}' has no stochastic depth in keras.applications; use drop_path_rate=0"
        )
    model = _application(
        constructor, image_size=image_size, weights=weights, include_preprocessing=True
    )
    model.name = name
    return model


def _register_applications():
    for name, (constructor, size, slow) in _EFFICIENTNET.items():
        register_backbone(name, family="efficientnet", default_image_size=size, slow=slow)(
            functools.partial(_build_efficientnet, name, constructor)
        )
    for name, (constructor, size, slow) in _EFFICIENTNETV2.items():
        register_backbone(name, family="efficientnetv2", default_image_size=size, slow=slow)(
            functools.partial(_build_efficientnet, name, constructor, include_preprocessing=True)
        )
    for name, (constructor, size, slow) in _CONVNEXT.items():
        register_backbone(name, family="convnext", default_image_size=size, slow=slow)(
            functools.partial(_build_convnext, name, constructor)
        )
    for name, (constructor, size, slow) in _MOBILENETV3.items():
        register_backbone(name, family="mobilenetv3", default_image_size=size, slow=slow)(
            functools.partial(_build_mobilenetv3, name, constructor)
        )


_register_applications()

# ------------------------------------------------------------------- keras-hub

#: ViT sizes (Dosovitskiy et al.; DeiT for tiny/small): hidden, layers, heads, mlp.
VIT_CONFIGS = {
    "vit_tiny_patch16": dict(hidden_dim=192, num_layers=12, num_heads=3, mlp_dim=768),
    "vit_small_patch16": dict(hidden_dim=384, num_layers=12, num_heads=6, mlp_dim=1536),
    "vit_base_patch16": dict(hidden_dim=768, num_layers=12, num_heads=12, mlp_dim=3072),
}
_VIT_PATCH = 16

#: ImageNet presets by registry name and native resolution. keras-hub
#: publishes ViT-B/L/H only; for tiny and small, keras-hub's Hugging Face
#: converter (``keras_hub/src/utils/transformers/convert_vit.py``) reads the
#: transformers-format ports of timm's AugReg ViT-Ti/16 and ViT-S/16
#: (ImageNet-21k pre-trained, ImageNet-1k fine-tuned; normalised with mean and
#: std 0.5 like the keras-hub presets).
VIT_IMAGENET_PRESETS = {
    "vit_tiny_patch16": {224: "hf://WinKawaks/vit-tiny-patch16-224"},
    "vit_small_patch16": {224: "hf://WinKawaks/vit-small-patch16-224"},
    "vit_base_patch16": {
        224: "vit_base_patch16_224_imagenet",
        384: "vit_base_patch16_384_imagenet",
    },
}


@keras.saving.register_keras_serializable(package="leukemia_tf")
class ClassTokenPooling(keras.layers.Layer):
    """``[B, 1 + N, D]`` token sequence -> ``[B, D]``: the class token.

    This is the pooling of keras-hub's ``ViTImageClassifier(pooling="token")``
    and of the ImageNet-trained presets.
    """

    def call(self, inputs):
        return inputs[:, 0, :]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


def vit_imagenet_preset(name: str, image_size: int) -> str:
    """The keras-hub preset that holds ImageNet weights for ``name``.

    The preset of the nearest native resolution at or above ``image_size``
    (the largest otherwise); other sizes get interpolated position embeddings.

    Raises:
      ValueError: keras-hub publishes no ImageNet weights for this size of ViT.
    """
    presets = VIT_IMAGENET_PRESETS.get(name)
    if not presets:
        import keras_hub

        available = ", ".join(sorted(keras_hub.models.ViTBackbone.presets))
        raise ValueError(
            f"no ImageNet weights are known for '{name}' (keras-hub ViT presets: {available}). "
            "Use weights='none' (from scratch), a local weights file, or 'vit_base_patch16'"
        )
    native = sorted(presets)
    chosen = next((s for s in native if s >= image_size), native[-1])
    return presets[chosen]


def transfer_vit_weights(source: keras.Model, target: keras.Model) -> None:
    """Copies a ViTBackbone's weights into one built for another image size.

    Every weight is copied as is except the position embeddings, whose patch
    grid is resized bicubically (the class-token position is kept), the usual
    way to fine-tune a ViT at a new resolution.

    Args:
      source: a keras-hub ``ViTBackbone`` (e.g. an ImageNet preset).
      target: a ``ViTBackbone`` with the same config but another image size.

    Raises:
      ValueError: the two backbones differ in anything but the image size.
    """
    import tensorflow as tf

    if len(source.weights) != len(target.weights):
        raise ValueError(
            f"ViT weight transfer: {len(source.weights)} source weights, "
            f"{len(target.weights)} target weights"
        )
    for s, t in zip(source.weights, target.weights, strict=True):
        value = keras.ops.convert_to_numpy(s.value).astype(np.float32)
        if tuple(s.shape) != tuple(t.shape):
            if "position_embedding" not in t.path:
                raise ValueError(
                    f"ViT weight transfer: '{t.path}' has shape {tuple(t.shape)}, "
                    f"source '{s.path}' has {tuple(s.shape)}"
                )
            value = _resize_position_embedding(value, int(t.shape[0]), tf)
        t.assign(value)


def _resize_position_embedding(value: np.ndarray, target_positions: int, tf) -> np.ndarray:
    dim = value.shape[-1]
    source_grid = int(round((value.shape[0] - 1) ** 0.5))
    target_grid = int(round((target_positions - 1) ** 0.5))
    if source_grid**2 + 1 != value.shape[0] or target_grid**2 + 1 != target_positions:
        raise ValueError(
            f"ViT weight transfer: position embeddings of {value.shape[0]} and "
            f"{target_positions} positions are not 1 + a square grid"
        )
    grid = value[1:].reshape(1, source_grid, source_grid, dim)
    resized = tf.image.resize(grid, (target_grid, target_grid), method="bicubic").numpy()
    return np.concatenate([value[:1], resized.reshape(target_grid**2, dim)], axis=0)


def _vit_backbone(name: str, *, image_size: int, weights: str, drop_path_rate: float):
    import keras_hub

    if drop_path_rate > 0:
        raise ValueError(
            f"backbone '{name}': keras-hub's ViTBackbone has no stochastic depth; "
            "use drop_path_rate=0"
        )
    image_shape = (image_size, image_size, 3)
    if weights != "imagenet":
        return keras_hub.models.ViTBackbone(
            image_shape=image_shape, patch_size=_VIT_PATCH, **VIT_CONFIGS[name], name=f"{name}_vit"
        )
    preset = vit_imagenet_preset(name, image_size)
    try:
        source = keras_hub.models.ViTBackbone.from_preset(preset)
    except Exception as e:
        raise RuntimeError(
            f"could not load the keras-hub preset '{preset}' for '{name}' ({e}). Presets are "
            "downloaded from Kaggle on first use and cached under ~/.cache/kagglehub; offline, "
            "pass a local weights file instead"
        ) from e
    if tuple(source.image_shape) == image_shape:
        return source
    config = source.get_config()
    for key in ("dtype", "name", "trainable"):
        config.pop(key, None)
    config["image_shape"] = image_shape
    target = keras_hub.models.ViTBackbone(**config, name=f"{name}_vit")
    transfer_vit_weights(source, target)
    return target


def _build_vit(name: str, *, image_size: int, weights: str, drop_path_rate: float) -> keras.Model:
    vit = _vit_backbone(name, image_size=image_size, weights=weights, drop_path_rate=drop_path_rate)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    # [0, 255] -> [-1, 1]: the presets' normalisation (mean 0.5, std 0.5).
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    x = vit(x)
    x = ClassTokenPooling(name="class_token")(x)
    return keras.Model(inputs, x, name=name)


for _name in VIT_CONFIGS:
    register_backbone(
        _name,
        family="vit",
        default_image_size=224,
        slow=_name == "vit_base_patch16",
        image_size_multiple=_VIT_PATCH,
    )(functools.partial(_build_vit, _name))
