"""DINOv2 and DinoBloom backbones: self-supervised ViT-S/B/L with 14-pixel patches.

``dinov2_small``, ``dinov2_base`` and ``dinov2_large`` are the DINOv2 models
(Oquab et al. 2023, trained on LVD-142M natural images); ``weights="imagenet"``
(the registry's word for "the published weights") loads keras-hub's
``dinov2_small`` / ``dinov2_base`` / ``dinov2_large`` presets (downloaded from
Kaggle on first use).

``dinobloom_s``, ``dinobloom_b`` and ``dinobloom_l`` are the same
architectures with the weights of DinoBloom (Koch et al., MICCAI 2024: DINOv2
fine-tuned on 380k white-blood-cell images of 13 data sets, at 224 pixels).
Nothing downloads them: convert the published checkpoint once with
``python -m leukemia_tf.convert_backbone`` (see
:mod:`leukemia_tf.models.dinobloom_convert`) and pass the output directory as
``weights`` (``--weights=DIR``). A keras-hub preset directory of the right size
works for the ``dinov2_*`` names too.

Every model maps float32 RGB pixels in [0, 255] ``[B, S, S, 3]`` to ``[B, D]``:
pixels / 255, normalised with the ImageNet mean (0.485, 0.456, 0.406) and
std (0.229, 0.224, 0.225) as in DINOv2 and DinoBloom; 14-pixel patches, so S
must be a multiple of 14 (default 224, DinoBloom's training resolution). The
pooled feature is the class token after the final LayerNorm: what the DINOv2
``torch.hub`` models return and what DinoBloom's feature extraction and
linear probes use. The patch tokens are not pooled into it.

Position embeddings: the backbone is built with its position-embedding grid
equal to the input grid (S / 14), so keras-hub never resizes them when a model
is loaded or saved. A checkpoint's grid of another size (DinoBloom: 16 x 16;
the DINOv2 presets: 37 x 37) is resized once, when the weights are loaded, the
way the DINOv2 repository does it (:func:`interpolate_position_embedding`:
PyTorch's bicubic with ``scale_factor=(S/14 + 0.1) / M``, no antialiasing),
not with keras-hub's TensorFlow bicubic (another kernel, another result).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import keras
import numpy as np

try:
    from keras_hub.src.models.dinov2.dinov2_backbone import DINOV2Backbone
except ImportError:  # keras-hub without DINOv2: the other backbones still work
    DINOV2Backbone = None

from leukemia_tf.models.backbones import ClassTokenPooling
from leukemia_tf.models.registry import register_backbone

#: Patch side in pixels of every DINOv2 / DinoBloom model.
PATCH_SIZE = 14
#: DinoBloom's training resolution and the registry default.
DEFAULT_IMAGE_SIZE = 224
#: ImageNet statistics on [0, 1] pixels (DINOv2's and DinoBloom's transforms).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The DINOv2 repository's ``interpolate_offset`` (see :func:`interpolate_position_embedding`).
INTERPOLATE_OFFSET = 0.1

#: Architectures by size letter (DINOv2's ViT-S/14, ViT-B/14, ViT-L/14; GELU MLPs).
SIZES = {
    "s": dict(hidden_dim=384, num_layers=12, num_heads=6, intermediate_dim=1536),
    "b": dict(hidden_dim=768, num_layers=12, num_heads=12, intermediate_dim=3072),
    "l": dict(hidden_dim=1024, num_layers=24, num_heads=16, intermediate_dim=4096),
}

#: Registry name -> (size letter, keras-hub preset or None when nothing is downloadable).
MODELS = {
    "dinov2_small": ("s", "dinov2_small"),
    "dinov2_base": ("b", "dinov2_base"),
    "dinov2_large": ("l", "dinov2_large"),
    "dinobloom_s": ("s", None),
    "dinobloom_b": ("b", None),
    "dinobloom_l": ("l", None),
}


def size_config(size: str) -> dict:
    """The architecture of size ``"s"``, ``"b"`` or ``"l"`` (a copy of :data:`SIZES`)."""
    try:
        return dict(SIZES[size])
    except KeyError:
        raise ValueError(f"unknown DINOv2 size {size!r}; known: {', '.join(SIZES)}") from None


# ------------------------------------------------------ position embeddings


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with PyTorch's ``A = -0.75``."""
    t = np.abs(t)
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


def _bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """``[n_out, n_in]`` weights of PyTorch's 1-D bicubic resize (``align_corners=False``).

    Output ``o`` samples the input at ``(o + 0.5) * scale - 0.5``; the four taps
    around it are clamped to the edge (PyTorch reads border pixels again).
    """
    matrix = np.zeros((n_out, n_in), np.float64)
    for o in range(n_out):
        x = (o + 0.5) * scale - 0.5
        base = int(np.floor(x))
        frac = x - base
        for k in (-1, 0, 1, 2):
            matrix[o, min(max(base + k, 0), n_in - 1)] += _cubic(np.float64(frac - k))
    return matrix


def interpolate_position_embedding(
    position_embedding: np.ndarray, grid: int, *, offset: float = INTERPOLATE_OFFSET
) -> np.ndarray:
    """Resizes ``[1, 1 + M*M, D]`` position embeddings to ``[1, 1 + grid*grid, D]``.

    The class-token position is kept; the M x M patch grid is resized as the
    DINOv2 repository's ``interpolate_pos_encoding`` does:
    ``F.interpolate(mode="bicubic", scale_factor=(grid + offset) / M,
    antialias=False)``, i.e. bicubic with ``A = -0.75``, half-pixel centres,
    edge-clamped taps, and source coordinates ``(o + 0.5) * M / (grid + offset)
    - 0.5``. ``offset=0`` gives the plain ``size=(grid, grid)`` resize of
    Hugging Face's port. The same grid is returned unchanged.

    Raises:
      ValueError: the input is not 1 + a square number of positions.
    """
    value = np.asarray(position_embedding, np.float32)
    if value.ndim != 3 or value.shape[0] != 1:
        raise ValueError(f"position embedding must be [1, 1 + M*M, D], got {value.shape}")
    m = int(round((value.shape[1] - 1) ** 0.5))
    if m * m + 1 != value.shape[1]:
        raise ValueError(
            f"position embedding of {value.shape[1]} positions is not 1 + a square grid"
        )
    if m == grid:
        return value.copy()
    weights = _bicubic_matrix(m, grid, m / (grid + offset))
    patches = value[0, 1:].reshape(m, m, -1).astype(np.float64)
    resized = np.einsum("ai,bj,ijc->abc", weights, weights, patches)
    resized = resized.reshape(grid * grid, -1).astype(np.float32)
    return np.concatenate([value[:, :1], resized[None]], axis=1)


# ----------------------------------------------------------------- backbone


def _save_all_variables(layer: keras.layers.Layer, store) -> None:
    keras.layers.Layer.save_own_variables(layer, store)


def _load_all_variables(layer: keras.layers.Layer, store) -> None:
    keras.layers.Layer.load_own_variables(layer, store)


def _require_keras_hub() -> None:
    """A clear error where the installed keras-hub has no (tested) DINOv2."""
    if DINOV2Backbone is None:
        import keras_hub

        raise ImportError(
            f"the DINOv2/DinoBloom backbones need keras-hub with DINOV2Backbone (tested: "
            f"0.32); installed: {keras_hub.__version__}. pip install -U keras-hub"
        )


if DINOV2Backbone is not None:

    @keras.saving.register_keras_serializable(package="leukemia_tf")
    class DinoV2Encoder(DINOV2Backbone):
        """keras-hub's ``DINOV2Backbone`` whose position embeddings save and load verbatim.

        keras-hub 0.32 keeps two copies of the position embeddings: the trainable
        one used in the forward pass and a frozen one at the pre-training grid
        that it saves, re-interpolating the trained copy back only when the
        *signed sum* of its change is positive, and that it re-interpolates on
        every load. A fine-tuned position embedding was thus lost on reload about
        half the time. The models of this package are built with both grids
        equal (``position_embedding_shape`` = ``image_shape``) and this class
        saves and loads the embedding layer's variables as they are.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            embeddings = self.embeddings
            if tuple(embeddings.image_shape) != tuple(embeddings.position_embedding_shape):
                raise ValueError(
                    "DinoV2Encoder needs position_embedding_shape == image_shape, got "
                    f"{embeddings.position_embedding_shape} and {embeddings.image_shape}"
                )
            # Instance attributes win over the class's methods when Keras saves or loads.
            object.__setattr__(
                embeddings, "save_own_variables", functools.partial(_save_all_variables, embeddings)
            )
            object.__setattr__(
                embeddings, "load_own_variables", functools.partial(_load_all_variables, embeddings)
            )


def _encoder(config: dict, image_size: int, name: str) -> DinoV2Encoder:
    _require_keras_hub()
    return DinoV2Encoder(
        patch_size=PATCH_SIZE,
        **config,
        image_shape=(image_size, image_size, 3),
        position_embedding_shape=(image_size, image_size, 3),
        name=name,
    )


def _check_architecture(source: DINOV2Backbone, config: dict, what: str) -> None:
    found = {key: getattr(source, key) for key in config}
    found_patch = int(source.patch_size)
    problems = [f"{k}={found[k]} (expected {v})" for k, v in config.items() if found[k] != v]
    if found_patch != PATCH_SIZE:
        problems.append(f"patch_size={found_patch} (expected {PATCH_SIZE})")
    if source.num_register_tokens or source.use_swiglu_ffn:
        problems.append("register tokens or a SwiGLU MLP (not supported)")
    if problems:
        raise ValueError(f"{what} does not hold this architecture: " + ", ".join(problems))


def transfer_weights(source: DINOV2Backbone, target: DinoV2Encoder) -> None:
    """Copies a DINOv2 backbone's weights into ``target`` (same architecture, any size).

    The position embeddings are resized from the source's pre-training grid
    (``source.embeddings.position_embeddings``, never keras-hub's interpolated
    copy) with :func:`interpolate_position_embedding`; everything else is
    copied as is.

    Raises:
      ValueError: the two differ in anything but the image size.
    """
    grid = target.embeddings.image_shape[0] // PATCH_SIZE
    source_emb, target_emb = source.embeddings, target.embeddings
    position = interpolate_position_embedding(
        keras.ops.convert_to_numpy(source_emb.position_embeddings), grid
    )
    special = {
        id(target_emb.position_embeddings): position,
        id(target_emb.interpolated_position_embeddings): position,
    }
    skip = {id(source_emb.position_embeddings), id(source_emb.interpolated_position_embeddings)}
    source_rest = [w for w in source.weights if id(w) not in skip]
    target_rest = [w for w in target.weights if id(w) not in special]
    if len(source_rest) != len(target_rest):
        raise ValueError(
            f"DINOv2 weight transfer: {len(source_rest)} source weights, "
            f"{len(target_rest)} target weights"
        )
    for s, t in zip(source_rest, target_rest, strict=True):
        if tuple(s.shape) != tuple(t.shape):
            raise ValueError(
                f"DINOv2 weight transfer: '{t.path}' has shape {tuple(t.shape)}, "
                f"source '{s.path}' has {tuple(s.shape)}"
            )
        t.assign(keras.ops.convert_to_numpy(s.value))
    for variable in (target_emb.position_embeddings, target_emb.interpolated_position_embeddings):
        variable.assign(special[id(variable)])


def _load_preset(preset: str, what: str, error: type[Exception] = RuntimeError) -> DINOV2Backbone:
    _require_keras_hub()
    try:
        # keras-hub applies the global dtype policy (mixed precision) itself.
        return DINOV2Backbone.from_preset(preset)
    except Exception as e:
        raise error(f"could not load {what} ({e})") from e


def build_dinov2(
    name: str,
    *,
    image_size: int,
    weights: str,
    drop_path_rate: float = 0.0,
    config: dict | None = None,
) -> keras.Model:
    """Builds the registry model ``name`` (see the module docstring).

    Args:
      name: a key of :data:`MODELS`.
      image_size: input side S, a multiple of 14 (the registry checks it).
      weights: ``"none"`` (random initialisation, offline), ``"imagenet"``
        (the keras-hub preset; ``dinov2_*`` only) or a keras-hub preset
        directory (e.g. the output of ``leukemia_tf.convert_backbone``).
      drop_path_rate: must be 0 (see below).
      config: architecture override (tests build tiny models with it);
        default ``SIZES[MODELS[name][0]]``.

    Returns:
      ``keras.Model`` named ``name``: float32 ``[B, S, S, 3]`` in [0, 255] ->
      ``[B, D]`` class token after the final LayerNorm.

    Raises:
      ValueError: ``drop_path_rate > 0`` (keras-hub 0.32's DINOv2 drop path
        multiplies by ``(u + keep) / keep`` noise instead of dropping whole
        paths); ``weights="imagenet"`` for DinoBloom; a directory that holds
        another architecture.
        A directory that is not a keras-hub preset.
      RuntimeError: the keras-hub preset could not be downloaded or read.
    """
    size, preset = MODELS[name]
    config = dict(size_config(size) if config is None else config)
    if drop_path_rate > 0:
        raise ValueError(
            f"backbone '{name}': keras-hub's DINOv2 drop path does not drop paths (it scales "
            "by random noise); use drop_path_rate=0"
        )
    if weights == "imagenet" and preset is None:
        raise ValueError(
            f"backbone '{name}': the DinoBloom weights are not downloaded by this package. "
            "Download the checkpoint (e.g. the safetensors of Hugging Face "
            "'1aurent/vit_small_patch14_224.dinobloom' or the .pth of the DinoBloom "
            "release), convert it with 'python -m leukemia_tf.convert_backbone "
            "--checkpoint=FILE --size=s|b|l --output=DIR' and pass --weights=DIR"
        )
    source = None
    if weights == "imagenet":
        what = (
            f"the keras-hub preset '{preset}' for '{name}'; presets are downloaded from Kaggle "
            "on first use and cached under ~/.cache/kagglehub; offline, pass a local preset "
            "directory instead"
        )
        source = _load_preset(preset, what)
        _check_architecture(source, config, f"keras-hub preset '{preset}'")
    elif weights != "none":
        directory = Path(os.fspath(weights))
        source = _load_preset(
            str(directory),
            f"weights directory {directory} as a keras-hub preset (convert checkpoints with "
            "leukemia_tf.convert_backbone)",
            ValueError,
        )
        _check_architecture(source, config, f"weights directory {directory} (backbone '{name}')")
    target = _encoder(config, image_size, name=f"{name}_encoder")
    if source is not None:
        transfer_weights(source, target)

    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    mean = np.asarray(IMAGENET_MEAN) * 255.0
    std = np.asarray(IMAGENET_STD) * 255.0
    # (pixels / 255 - mean) / std in one step.
    x = keras.layers.Normalization(mean=mean, variance=std**2, name="normalize")(inputs)
    x = target({"images": x})
    x = ClassTokenPooling(name="class_token")(x)
    return keras.Model(inputs, x, name=name)


for _name, (_size, _preset) in MODELS.items():
    register_backbone(
        _name,
        family="dinov2",
        default_image_size=DEFAULT_IMAGE_SIZE,
        slow=_size != "s",
        min_image_size=2 * PATCH_SIZE,
        image_size_multiple=PATCH_SIZE,
        weights_dir=True,
    )(functools.partial(build_dinov2, _name))
