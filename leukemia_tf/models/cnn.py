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

The ``*_gn`` variants (``cnn_tiny_gn``, ``cnn_small_gn``, ``cnn_medium_gn``)
are the same networks (widths, depths, shortcuts, zero-initialised last gamma
of each residual branch) with GroupNorm (Wu & He, 2018) in place of every
BatchNorm. GroupNorm normalises each image by its own per-group statistics: it
keeps no batch statistics, so there is no train/test mismatch (small or
unrepresentative batches, moving averages lagging the weights) and no
lab-to-lab mismatch either. A BatchNorm network trained on one laboratory's
smears normalises another lab's images (other stain, camera, focus) with the
first lab's moving statistics, and falls furthest on them; GroupNorm adapts to
each image as it comes (BatchNorm models can instead be re-estimated on the
target images, :mod:`leukemia_tf.models.adapt`). The price is slower training
per step on CPU (no folding into the convolution) and the loss of BatchNorm's
regularising batch noise. Groups: :func:`gn_groups`.
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

#: Suffix of the GroupNorm variants' registry names.
GN_SUFFIX = "_gn"

#: Normalisation layers of the backbones: ``"bn"`` (BatchNorm) or ``"gn"`` (GroupNorm).
NORMS = ("bn", "gn")


def gn_groups(channels: int) -> int:
    """GroupNorm groups for ``channels``: ``min(32, channels // 4)``.

    Wu & He's default is 32 groups; the narrow early layers here (16-48
    channels) cannot have 32, so they get groups of 4 channels instead (at
    least 4 channels per group keeps the per-image statistics stable). Every
    width of :data:`CNN_CONFIGS` is a multiple of 4, and ``min(32, c // 4)``
    divides each of them.
    """
    groups = min(32, channels // 4)
    if groups < 1 or channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels cannot be split into {groups} groups")
    return groups


def _norm(x, norm, name, *, zero_gamma):
    gamma = "zeros" if zero_gamma else "ones"
    if norm == "gn":
        return keras.layers.GroupNormalization(
            groups=gn_groups(x.shape[-1]),
            epsilon=1e-5,
            gamma_initializer=gamma,
            name=f"{name}_gn",
        )(x)
    return keras.layers.BatchNormalization(
        momentum=DEFAULT_BN_MOMENTUM,
        epsilon=1e-5,
        gamma_initializer=gamma,
        name=f"{name}_bn",
    )(x)


def _conv_bn(x, filters, kernel, stride, name, *, norm="bn", act=True, zero_gamma=False):
    x = keras.layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = _norm(x, norm, name, zero_gamma=zero_gamma)
    if act:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def _basic_block(x, filters, stride, name, drop_rate, norm):
    shortcut = x
    y = _conv_bn(x, filters, 3, stride, f"{name}_1", norm=norm)
    y = _conv_bn(y, filters, 3, 1, f"{name}_2", norm=norm, act=False, zero_gamma=True)
    if drop_rate > 0:
        # Stochastic depth: drop the residual branch of whole samples.
        y = keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        if stride != 1:
            shortcut = keras.layers.AveragePooling2D(stride, padding="same", name=f"{name}_pool")(
                shortcut
            )
        shortcut = _conv_bn(shortcut, filters, 1, 1, f"{name}_proj", norm=norm, act=False)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def build_cnn(
    name: str,
    *,
    image_size: int,
    weights: str = "none",
    drop_path_rate: float = 0.0,
    norm: str | None = None,
) -> keras.Model:
    """Builds one of :data:`CNN_CONFIGS`.

    Args:
      name: a key of :data:`CNN_CONFIGS`, or one with :data:`GN_SUFFIX` (the
        model's name; its architecture is the key's without the suffix).
      image_size: input side in pixels.
      weights: only "none" (there are no published weights; a local file is
        loaded by ``build_backbone``).
      drop_path_rate: stochastic-depth rate of the last block.
      norm: ``"bn"`` (BatchNorm) or ``"gn"`` (GroupNorm, :func:`gn_groups`);
        default: ``"gn"`` for a name ending in :data:`GN_SUFFIX`, else ``"bn"``.

    Returns:
      ``[B, S, S, 3]`` float32 pixels in [0, 255] -> ``[B, D]`` features.
    """
    if weights == "imagenet":
        raise ValueError(
            f"backbone '{name}' has no ImageNet weights (it is meant for training from "
            "scratch); use weights='none' or a local weights file"
        )
    if norm is None:
        norm = "gn" if name.endswith(GN_SUFFIX) else "bn"
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    stem, widths, depths = CNN_CONFIGS[name.removesuffix(GN_SUFFIX)]
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    # [0, 255] -> [-1, 1]; the first normalisation layer takes care of the rest.
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    x = _conv_bn(x, stem, 3, 2, "stem", norm=norm)
    rates = iter(np.linspace(0.0, drop_path_rate, sum(depths)))
    for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        for block in range(depth):
            x = _basic_block(
                x,
                width,
                2 if block == 0 else 1,
                f"stage{stage + 1}_block{block + 1}",
                float(next(rates)),
                norm,
            )
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name=name)


for _name in CNN_CONFIGS:
    register_backbone(_name, family="cnn", default_image_size=128)(
        functools.partial(build_cnn, _name)
    )
    register_backbone(_name + GN_SUFFIX, family="cnn", default_image_size=128)(
        functools.partial(build_cnn, _name + GN_SUFFIX)
    )
