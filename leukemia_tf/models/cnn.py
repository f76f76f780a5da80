"""Compact ResNet-style backbones that train from scratch on a laptop CPU.

The published ImageNet architectures are built for 224+ px and millions of
images; on a few thousand cell images at 64-160 px on two CPU cores they are
slow per epoch, and their BatchNorm momentum (0.99+) lags behind short runs.
These networks are plain 3x3-convolution ResNets (basic blocks, BatchNorm +
ReLU, fused well by oneDNN on CPU and by XLA on accelerators) with the
"bag of tricks" details that help from-scratch training: a ResNet-D shortcut
(average pool + 1x1 conv), the last BatchNorm of each residual branch
initialised to zero (every block starts as the identity), and BatchNorm
momentum 0.9.
"""

from __future__ import annotations

import functools

import keras
import numpy as np

from leukemia_tf.models.registry import register_backbone

#: name -> (stem width, stage widths, blocks per stage). Every stage halves the
#: resolution, and so does the stem: the features are at S/32.
CNN_CONFIGS = {
    "cnn_tiny": (16, (16, 32, 64, 128), (1, 1, 1, 1)),
    "cnn_small": (32, (48, 96, 192, 384), (1, 1, 2, 1)),
    "cnn_medium": (32, (64, 128, 256, 512), (1, 2, 2, 1)),
}

#: From-scratch default. With keras.applications' 0.99 the moving statistics
#: (an average over ~100 steps) lag the fast-changing weights of a network trained
#: from scratch on a few thousand images, and validation, which normalises with
#: them, stayed at chance for ten epochs.
DEFAULT_BN_MOMENTUM = 0.9


def _conv_bn(x, filters, kernel, stride, name, *, act=True, zero_gamma=False):
    x = keras.layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(
        momentum=DEFAULT_BN_MOMENTUM,
        epsilon=1e-5,
        gamma_initializer="zeros" if zero_gamma else "ones",
        name=f"{name}_bn",
    )(x)
    if act:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def _basic_block(x, filters, stride, name, drop_rate):
    shortcut = x
    y = _conv_bn(x, filters, 3, stride, f"{name}_1")
    y = _conv_bn(y, filters, 3, 1, f"{name}_2", act=False, zero_gamma=True)
    if drop_rate > 0:
        # Stochastic depth: drop the residual branch of whole samples.
        y = keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        if stride != 1:
            shortcut = keras.layers.AveragePooling2D(stride, padding="same", name=f"{name}_pool")(
                shortcut
            )
        shortcut = _conv_bn(shortcut, filters, 1, 1, f"{name}_proj", act=False)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def build_cnn(
    name: str, *, image_size: int, weights: str = "none", drop_path_rate: float = 0.0
) -> keras.Model:
    """Builds one of :data:`CNN_CONFIGS`.

    Args:
      name: a key of :data:`CNN_CONFIGS`.
      image_size: input side in pixels.
      weights: only "none" (there are no published weights; a local file is
        loaded by ``build_backbone``).
      drop_path_rate: stochastic-depth rate of the last block.

    Returns:
      ``[B, S, S, 3]`` float32 pixels in [0, 255] -> ``[B, D]`` features.
    """
    if weights == "imagenet":
        raise ValueError(
            f"backbone '{name}' has no ImageNet weights (it is meant for training from "
            "scratch); use weights='none' or a local weights file"
        )
    stem, widths, depths = CNN_CONFIGS[name]
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    # [0, 255] -> [-1, 1]; the first BatchNorm takes care of the rest.
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    x = _conv_bn(x, stem, 3, 2, "stem")
    rates = iter(np.linspace(0.0, drop_path_rate, sum(depths)))
    for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        for block in range(depth):
            x = _basic_block(
                x,
                width,
                2 if block == 0 else 1,
                f"stage{stage + 1}_block{block + 1}",
                float(next(rates)),
            )
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name=name)


for _name in CNN_CONFIGS:
    register_backbone(_name, family="cnn", default_image_size=128)(
        functools.partial(build_cnn, _name)
    )
