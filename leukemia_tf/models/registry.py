"""Backbone registry: a name -> a builder of a feature extractor.

Every registered backbone takes float32 RGB pixels in [0, 255] of shape
``[B, S, S, 3]`` and returns pooled features ``[B, D]``. It owns its input
normalisation, so nothing outside the model (the input pipeline, the serving
signature) needs to know which backbone is inside.

Register a builder with :func:`register_backbone` (timm's ``@register_model``
pattern); build one with :func:`build_backbone`. The builder receives the
already-validated keyword arguments ``image_size``, ``weights``
(``"imagenet"`` or ``"none"``; a file path is loaded here, after the build;
a directory is passed on to builders registered with ``weights_dir=True``),
and ``drop_path_rate``; :func:`build_backbone` applies ``bn_momentum`` and the
weights file afterwards, the same way for every family.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import keras

from leukemia_tf.cli import closest_first

#: Families of backbones (what users filter by in ``list_backbones``).
FAMILIES = ("efficientnet", "efficientnetv2", "convnext", "vit", "dinov2", "mobilenetv3", "cnn")

#: Modules whose import registers the built-in backbones.
_BUILTIN_MODULES = (
    "leukemia_tf.models.backbones",
    "leukemia_tf.models.dinov2",
    "leukemia_tf.models.cnn",
)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone.

    Attributes:
      name: registry name, e.g. ``"efficientnetv2_b0"``.
      family: one of :data:`FAMILIES`.
      default_image_size: the resolution the architecture was designed for.
      slow: True for backbones too large to build in the fast test suite.
      builder: ``builder(*, image_size, weights, drop_path_rate) -> keras.Model``.
      min_image_size: the smallest input side the architecture accepts.
      image_size_multiple: the input side must be a multiple of this (ViT
        patches), 1 otherwise.
      weights_dir: the builder also takes a directory as ``weights`` (a
        keras-hub preset directory, e.g. converted DinoBloom weights).
    """

    name: str
    family: str
    default_image_size: int
    slow: bool
    builder: Callable[..., keras.Model]
    min_image_size: int = 32
    image_size_multiple: int = 1
    weights_dir: bool = False


_REGISTRY: dict[str, BackboneSpec] = {}
_builtins_loaded = False


def register_backbone(
    name: str,
    *,
    family: str,
    default_image_size: int,
    slow: bool = False,
    min_image_size: int = 32,
    image_size_multiple: int = 1,
    weights_dir: bool = False,
) -> Callable[[Callable[..., keras.Model]], Callable[..., keras.Model]]:
    """Decorator: registers ``builder`` under ``name``.

    Args:
      name: unique registry name (lower case, as users type it in flags).
      family: one of :data:`FAMILIES`.
      default_image_size: the architecture's native input side in pixels.
      slow: mark backbones that are too big for the fast test suite.
      min_image_size: smallest accepted input side.
      image_size_multiple: the input side must be a multiple of this.
      weights_dir: the builder accepts a directory as ``weights`` and loads it
        itself (otherwise a directory is refused).

    Returns:
      A decorator that registers the builder and returns it unchanged.

    Raises:
      ValueError: ``name`` is already registered or ``family`` is unknown.
    """
    if family not in FAMILIES:
        raise ValueError(f"backbone '{name}': unknown family '{family}'; known: {FAMILIES}")

    def decorator(builder: Callable[..., keras.Model]) -> Callable[..., keras.Model]:
        if name in _REGISTRY:
            raise ValueError(f"backbone '{name}' is already registered")
        _REGISTRY[name] = BackboneSpec(
            name=name,
            family=family,
            default_image_size=int(default_image_size),
            slow=bool(slow),
            builder=builder,
            min_image_size=int(min_image_size),
            image_size_multiple=int(image_size_multiple),
            weights_dir=bool(weights_dir),
        )
        return builder

    return decorator


def _load_builtins() -> None:
    # Imported lazily: the backbone modules import this one to register.
    global _builtins_loaded
    if not _builtins_loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _builtins_loaded = True


def list_backbones(family: str | None = None) -> list[str]:
    """Names of the registered backbones, optionally of one family.

    Args:
      family: one of :data:`FAMILIES`, or None for all.

    Returns:
      Sorted registry names.
    """
    _load_builtins()
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown backbone family '{family}'; known: {', '.join(FAMILIES)}")
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of ``name``.

    Raises:
      ValueError: unknown name; the message lists every known name, the
        closest to ``name`` first (typos).
    """
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone '{name}'; known backbones (closest first): "
            + ", ".join(closest_first(str(name), list_backbones()))
        ) from None


def build_backbone(
    name: str,
    *,
    image_size: int,
    weights: str = "none",
    bn_momentum: float | None = None,
    drop_path_rate: float = 0.0,
) -> keras.Model:
    """Builds a registered backbone.

    Args:
      name: registry name (see :func:`list_backbones`).
      image_size: input side S in pixels (square inputs).
      weights: ``"imagenet"`` (published weights; needs internet the first
        time), ``"none"`` (random initialisation) or the path of a
        ``.weights.h5`` or ``.keras`` file holding this backbone's weights (a
        backbone saved on its own or a whole classifier built by
        :func:`leukemia_tf.models.build_classifier`); for backbones
        registered with ``weights_dir`` (DINOv2, DinoBloom) also a keras-hub
        preset directory, which the builder loads (any image size).
      bn_momentum: if set, the momentum of every BatchNormalization layer.
        ``keras.applications`` uses 0.99-0.999, which suits long ImageNet runs;
        from-scratch training on a few thousand images needs about 0.9 (at
        0.99 validation stayed at chance for ten epochs).
      drop_path_rate: stochastic-depth rate of the deepest block (linearly
        increasing with depth). 0 disables it in every backbone, including the
        EfficientNets whose ``keras.applications`` default is 0.2.

    Returns:
      A ``keras.Model`` named ``name``: float32 ``[B, S, S, 3]`` pixels in
      [0, 255] -> ``[B, D]`` features.

    Raises:
      ValueError: unknown name, bad image size, weights value or momentum;
        a weights file that does not fit the backbone.
      FileNotFoundError: ``weights`` names a path that does not exist.
    """
    spec = get_backbone_spec(name)
    image_size = _check_image_size(spec, image_size)
    if bn_momentum is not None and not 0.0 <= float(bn_momentum) < 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1), got {bn_momentum}")
    if not 0.0 <= float(drop_path_rate) < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    weights_path = None
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"weights must be 'imagenet', 'none' or a file path, got {weights!r}")
    weights = os.fspath(weights)
    if weights.lower() in ("none", ""):
        build_weights = "none"
    elif weights.lower() == "imagenet":
        build_weights = "imagenet"
    else:
        weights_path = Path(weights).expanduser()
        if weights_path.is_dir():
            if not spec.weights_dir:
                raise ValueError(
                    f"weights {weights_path} is a directory; backbone '{name}' takes a "
                    "'.weights.h5' or '.keras' file"
                )
            build_weights, weights_path = str(weights_path), None
        elif not weights_path.is_file():
            directory = " or of a keras-hub preset directory" if spec.weights_dir else ""
            raise FileNotFoundError(
                f"weights file not found: {weights_path} (weights must be 'imagenet', 'none' or "
                f"the path of a .weights.h5 or .keras file{directory})"
            )
        elif not (weights_path.name.endswith(".weights.h5") or weights_path.suffix == ".keras"):
            raise ValueError(
                f"weights file {weights_path}: unsupported format; use a Keras "
                "'.weights.h5' or '.keras' file"
            )
        else:
            build_weights = "none"

    model = spec.builder(
        image_size=image_size, weights=build_weights, drop_path_rate=float(drop_path_rate)
    )
    if weights_path is not None:
        load_backbone_weights(model, weights_path)
    if bn_momentum is not None:
        set_bn_momentum(model, float(bn_momentum))
    return model


def _check_image_size(spec: BackboneSpec, image_size) -> int:
    try:
        size = int(image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be an integer, got {image_size!r}") from None
    if size != image_size or size < spec.min_image_size:
        raise ValueError(
            f"backbone '{spec.name}': image_size must be an integer >= {spec.min_image_size}, "
            f"got {image_size!r}"
        )
    if size % spec.image_size_multiple:
        raise ValueError(
            f"backbone '{spec.name}': image_size must be a multiple of "
            f"{spec.image_size_multiple} (the patch size), got {size}"
        )
    return size


def iter_layers(model: keras.layers.Layer):
    """Yields every layer below ``model`` (depth first, nested models included)."""
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from iter_layers(layer)


def set_bn_momentum(model: keras.Model, momentum: float) -> int:
    """Sets the momentum of every BatchNormalization layer in ``model``.

    Keras 3 reads ``momentum`` when the layer is called and writes it in
    ``get_config``, so changing the attribute is enough and survives a save.

    Args:
      model: any Keras model (nested models are searched).
      momentum: the new moving-average momentum.

    Returns:
      The number of layers changed.
    """
    count = 0
    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum
            count += 1
    return count


def load_backbone_weights(model: keras.Model, path: str | os.PathLike) -> None:
    """Loads a weights file into a backbone, refusing anything that does not fit.

    Args:
      model: the backbone built by :func:`build_backbone` (random init).
      path: a ``.weights.h5`` file saved from the same backbone
        (``backbone.save_weights``), or a ``.keras`` file holding either that
        backbone or a model that contains it as a layer of the same name (a
        classifier of this package).

    Raises:
      ValueError: the file does not hold weights for this backbone at this
        image size; the message names the file and the backbone.
    """
    path = Path(path)
    what = f"weights file {path} does not fit backbone '{model.name}'"
    if path.suffix == ".keras":
        try:
            source = keras.saving.load_model(path, compile=False)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"could not read weights file {path}: {e}") from e
        candidates = [source] + list(iter_layers(source))
        match = [m for m in candidates if isinstance(m, keras.Model) and m.name == model.name]
        if not match:
            names = sorted({m.name for m in candidates if isinstance(m, keras.Model)})
            raise ValueError(f"{what}: it holds no model named '{model.name}' (found: {names})")
        _copy_weights(match[0], model, what)
        return
    # Keras raises on a missing or mis-shaped variable (after a partial load:
    # build_backbone then discards the model), but only warns when a whole
    # nested container is missing from the file ("... will retain their
    # freshly-initialized weights"): both are a mismatch here.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            # Its message lists every layer; keep the first lines.
            detail = "\n".join(str(e).strip().splitlines()[:3])
            raise ValueError(f"{what} (a different backbone or image size?): {detail}") from e
    partial = [str(w.message) for w in caught if "freshly-initialized" in str(w.message)]
    if partial:
        raise ValueError(f"{what}: some layers are not in the file: {partial[0]}")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _copy_weights(source: keras.Model, target: keras.Model, what: str) -> None:
    src, dst = source.weights, target.weights
    if len(src) != len(dst):
        raise ValueError(f"{what}: {len(src)} weight tensors in the file, {len(dst)} expected")
    for s, d in zip(src, dst, strict=True):
        if tuple(s.shape) != tuple(d.shape):
            raise ValueError(
                f"{what}: weight '{d.path}' has shape {tuple(d.shape)}, the file's "
                f"'{s.path}' has {tuple(s.shape)} (a different backbone or image size?)"
            )
    target.set_weights(source.get_weights())
