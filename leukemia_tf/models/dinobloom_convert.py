"""Converts DinoBloom (or DINOv2) PyTorch checkpoints to keras-hub preset directories.

The output directory (``config.json``, ``model.weights.h5``, ``metadata.json``
of keras-hub's ``DINOV2Backbone.save_to_preset``, plus ``conversion.json``
naming the source) is what ``--weights=DIR`` of the ``dinobloom_*`` and
``dinov2_*`` backbones loads, offline, at any image size.

Inputs, read without PyTorch:

* timm-format safetensors (e.g. Hugging Face
  ``1aurent/vit_small_patch14_224.dinobloom``), read with
  ``safetensors.numpy``;
* the DINOv2 repository's ``.pth`` / ``.pt`` files (``torch.save`` zip
  archives), read by a restricted unpickler that builds nothing but numpy
  arrays and dicts: it accepts only ``collections.OrderedDict``, PyTorch's
  tensor and parameter rebuild functions and its storage types, and refuses
  any other global (no code from the file runs). A training checkpoint's
  ``teacher`` weights are used (DinoBloom's release); its ``dino_head`` and
  ``ibot_head`` (self-supervised projection heads) and a ``backbone.`` prefix
  are dropped.

Both formats name the tensors alike: ``cls_token``, ``pos_embed``,
``patch_embed.proj.{weight,bias}``, ``blocks.{i}.norm1.*``,
``blocks.{i}.attn.qkv.*`` (fused, rows q, k, v), ``blocks.{i}.attn.proj.*``,
``blocks.{i}.ls1.gamma``, ``blocks.{i}.norm2.*``, ``blocks.{i}.mlp.fc{1,2}.*``,
``blocks.{i}.ls2.gamma``, ``norm.*``; the DINOv2 format adds ``mask_token``
(optional here; zeros when absent). Every expected tensor must be there with
the shape of the chosen size and nothing else may be: the first that is
missing, mis-shaped or unexpected is named in one ``ValueError``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np

from leukemia_tf.models import dinov2

#: Size letter -> how messages name the architecture.
ARCHITECTURES = {"s": "ViT-S/14", "b": "ViT-B/14", "l": "ViT-L/14"}
#: Prefixes of a DINOv2 training checkpoint's self-supervised heads (not the backbone).
HEAD_PREFIXES = ("dino_head.", "ibot_head.")
#: Written next to the keras-hub preset files.
CONVERSION_FILE = "conversion.json"


# -------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """The backbone tensors of a checkpoint, by their (timm / DINOv2) names.

    Args:
      path: a ``.safetensors`` file or a ``torch.save`` zip archive
        (``.pth``, ``.pt``, ``.bin``).

    Returns:
      ``{name: float32 array}`` with the heads and ``backbone.`` prefix of a
      training checkpoint removed.

    Raises:
      FileNotFoundError: no such file.
      ValueError: an unreadable file, a legacy (pre-zip) ``torch.save`` file,
        or a pickle that wants anything but tensors and dicts.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            raw = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"checkpoint {path}: not a readable safetensors file ({e})") from e
    elif zipfile.is_zipfile(path):
        raw = _state_dict(read_torch_zip(path), path)
    else:
        raise ValueError(
            f"checkpoint {path}: neither a .safetensors file nor a torch.save zip archive "
            "(a legacy torch.save file?). Re-save it with PyTorch >= 1.6 or convert it to "
            "safetensors (safetensors.torch.save_file(state_dict, 'model.safetensors'))"
        )
    return _backbone_tensors(raw)


def _state_dict(obj, path: Path) -> dict:
    if isinstance(obj, dict):
        for key in ("teacher", "model", "state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        return obj
    raise ValueError(f"checkpoint {path}: holds a {type(obj).__name__}, not a dict of tensors")


def _backbone_tensors(raw: dict) -> dict[str, np.ndarray]:
    tensors = {
        str(k): v
        for k, v in raw.items()
        if isinstance(v, np.ndarray) and not str(k).startswith(HEAD_PREFIXES)
    }
    if tensors and all(k.startswith("backbone.") for k in tensors):
        tensors = {k[len("backbone.") :]: v for k, v in tensors.items()}
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


class _StorageType:
    """Stands for ``torch.FloatStorage`` etc.: only the element type matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


#: torch storage type -> numpy dtype (little endian; "bfloat16" is widened by hand).
_STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2`` on numpy: a strided view, copied, bounds checked."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError("a tensor without a storage")
    try:
        offset = int(storage_offset)
        size = tuple(int(n) for n in size)
        stride = tuple(int(s) for s in stride)
    except (TypeError, ValueError):
        raise pickle.UnpicklingError("a tensor with a malformed size or stride") from None
    if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
        raise pickle.UnpicklingError(f"a tensor with size {size}, stride {stride}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise pickle.UnpicklingError(
            f"a tensor of size {size} reads past its storage of {storage.size} elements"
        )
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, *_unused):
    """``torch._utils._rebuild_parameter``: a parameter is its data here."""
    return data


_TORCH_FUNCTIONS = {
    "_rebuild_tensor_v2": _rebuild_tensor,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
}


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.save`` archive's ``data.pkl`` into dicts of numpy arrays only."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._byteorder = byteorder
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in _TORCH_FUNCTIONS:
            return _TORCH_FUNCTIONS[name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refused to load '{module}.{name}' (only tensors and dicts are read from a .pth file)"
        )

    def persistent_load(self, pid):
        # torch.save: ('storage', storage type, key, location, number of elements).
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type, numel)
        return self._storages[key]

    def _read_storage(self, key: str, storage_type: _StorageType, numel: int) -> np.ndarray:
        try:
            data = self._archive.read(f"{self._prefix}data/{key}")
        except KeyError:
            raise pickle.UnpicklingError(f"storage '{key}' is not in the archive") from None
        bfloat16 = storage_type.dtype == "bfloat16"
        dtype = np.dtype("<u2" if bfloat16 else storage_type.dtype)
        if self._byteorder == "big":
            dtype = dtype.newbyteorder(">")
        if len(data) < numel * dtype.itemsize:
            raise pickle.UnpicklingError(f"storage '{key}' is shorter than {numel} elements")
        array = np.frombuffer(data, dtype, count=numel)
        if bfloat16:
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(dtype.newbyteorder("="), copy=False)


def read_torch_zip(path: str | Path):
    """Unpickles a ``torch.save`` zip archive without PyTorch (tensors -> numpy arrays).

    Raises:
      ValueError: the archive has no single ``data.pkl``, or its pickle wants a
        global other than ``OrderedDict``, a tensor or parameter rebuild, or a
        storage type (the message says to convert to safetensors).
    """
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(
                f"checkpoint {path}: expected one data.pkl in the torch.save archive, "
                f"found {len(pickles)}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()
        with archive.open(pickles[0]) as f:
            try:
                return _TensorUnpickler(f, archive, prefix, byteorder).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
                raise ValueError(
                    f"checkpoint {path}: {e}. Convert it to safetensors with PyTorch "
                    "(safetensors.torch.save_file(state_dict, 'model.safetensors')) and convert "
                    "that file"
                ) from e


# ------------------------------------------------------------- checking


def expected_shapes(config: dict, grid: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a checkpoint of architecture ``config``, in checking order.

    Args:
      config: ``hidden_dim``, ``num_layers``, ``num_heads``, ``intermediate_dim``.
      grid: side of the position-embedding patch grid (DinoBloom: 16).
    """
    d, m, p = config["hidden_dim"], config["intermediate_dim"], dinov2.PATCH_SIZE
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + grid * grid, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(config["num_layers"]):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (d,),
                b + "norm1.bias": (d,),
                b + "attn.qkv.weight": (3 * d, d),
                b + "attn.qkv.bias": (3 * d,),
                b + "attn.proj.weight": (d, d),
                b + "attn.proj.bias": (d,),
                b + "ls1.gamma": (d,),
                b + "norm2.weight": (d,),
                b + "norm2.bias": (d,),
                b + "mlp.fc1.weight": (m, d),
                b + "mlp.fc1.bias": (m,),
                b + "mlp.fc2.weight": (d, m),
                b + "mlp.fc2.bias": (d,),
                b + "ls2.gamma": (d,),
            }
        )
    shapes["norm.weight"] = (d,)
    shapes["norm.bias"] = (d,)
    return shapes


#: Tensors that may be absent (the DINOv2 format has it, timm's has not).
OPTIONAL_SHAPES = {"mask_token": lambda d: (1, d)}


def position_grid(tensors: dict[str, np.ndarray]) -> int:
    """The side of the checkpoint's position-embedding grid (16 when it cannot be read)."""
    pos = tensors.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        grid = int(round((pos.shape[1] - 1) ** 0.5))
        if grid >= 1 and grid * grid + 1 == pos.shape[1]:
            return grid
    return dinov2.DEFAULT_IMAGE_SIZE // dinov2.PATCH_SIZE


def check_tensors(tensors: dict[str, np.ndarray], size: str, config: dict | None = None) -> int:
    """Checks names and shapes against size ``size``; returns the position grid side.

    Raises:
      ValueError: naming the first missing or mis-shaped tensor (checking
        order: embeddings, blocks in order, final norm), else the first
        unexpected one (sorted by name), with expected and found shapes.
    """
    config = dinov2.size_config(size) if config is None else config
    grid = position_grid(tensors)
    expected = expected_shapes(config, grid)
    optional = {k: f(config["hidden_dim"]) for k, f in OPTIONAL_SHAPES.items()}
    what = (
        f"a {ARCHITECTURES.get(size, size)} checkpoint (--size={size}: width "
        f"{config['hidden_dim']}, {config['num_layers']} blocks, MLP {config['intermediate_dim']})"
    )
    for name, shape in {**expected, **{k: v for k, v in optional.items() if k in tensors}}.items():
        if name not in tensors:
            raise ValueError(f"missing tensor '{name}' (expected shape {shape}) for {what}")
        found = tuple(tensors[name].shape)
        if found != shape:
            raise ValueError(
                f"tensor '{name}' has shape {found}, expected {shape} for {what}; "
                "a checkpoint of another size?"
            )
    unexpected = sorted(set(tensors) - set(expected) - set(optional))
    if unexpected:
        name = unexpected[0]
        raise ValueError(
            f"unexpected tensor '{name}' (shape {tuple(tensors[name].shape)}) for {what}"
            + (f"; {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
        )
    return grid


# ----------------------------------------------------------- converting


def keras_assignments(backbone, tensors: dict[str, np.ndarray]) -> list[tuple[object, np.ndarray]]:
    """``(keras variable, value)`` for every weight of a keras-hub ``DINOV2Backbone``.

    The layout follows keras-hub's Hugging Face converter
    (``keras_hub/src/utils/transformers/convert_dinov2.py``): PyTorch linear
    weights ``[out, in]`` are transposed; the fused ``qkv`` rows are split
    into q, k, v and each reshaped to ``[D, heads, D / heads]``; the output
    projection becomes ``[heads, D / heads, D]``; the patch convolution
    ``[D, 3, 14, 14]`` becomes ``[14, 14, 3, D]``.
    """
    d, h = backbone.hidden_dim, backbone.num_heads
    emb = backbone.embeddings
    mask = tensors.get("mask_token", np.zeros((1, d), np.float32))
    out = [
        (emb.cls_token, tensors["cls_token"]),
        (emb.mask_token, mask),
        (emb.position_embeddings, tensors["pos_embed"]),
        (emb.interpolated_position_embeddings, tensors["pos_embed"]),
        (
            emb.patch_embeddings.projection.kernel,
            tensors["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        ),
        (emb.patch_embeddings.projection.bias, tensors["patch_embed.proj.bias"]),
    ]
    for i, layer in enumerate(backbone.encoder.layers):
        b = f"blocks.{i}."
        mha = layer.attention.attention
        qkv_w = tensors[b + "attn.qkv.weight"]
        qkv_b = tensors[b + "attn.qkv.bias"]
        for j, dense in enumerate((mha.query_dense, mha.key_dense, mha.value_dense)):
            rows = slice(j * d, (j + 1) * d)
            out.append((dense.kernel, qkv_w[rows].T.reshape(d, h, d // h)))
            out.append((dense.bias, qkv_b[rows].reshape(h, d // h)))
        out += [
            (mha.output_dense.kernel, tensors[b + "attn.proj.weight"].T.reshape(h, d // h, d)),
            (mha.output_dense.bias, tensors[b + "attn.proj.bias"]),
            (layer.norm1.gamma, tensors[b + "norm1.weight"]),
            (layer.norm1.beta, tensors[b + "norm1.bias"]),
            (layer.layer_scale1.lambda1, tensors[b + "ls1.gamma"]),
            (layer.norm2.gamma, tensors[b + "norm2.weight"]),
            (layer.norm2.beta, tensors[b + "norm2.bias"]),
            (layer.mlp.fc1.kernel, tensors[b + "mlp.fc1.weight"].T),
            (layer.mlp.fc1.bias, tensors[b + "mlp.fc1.bias"]),
            (layer.mlp.fc2.kernel, tensors[b + "mlp.fc2.weight"].T),
            (layer.mlp.fc2.bias, tensors[b + "mlp.fc2.bias"]),
            (layer.layer_scale2.lambda1, tensors[b + "ls2.gamma"]),
        ]
    out += [
        (backbone.layernorm.gamma, tensors["norm.weight"]),
        (backbone.layernorm.beta, tensors["norm.bias"]),
    ]
    return out


def to_keras(tensors: dict[str, np.ndarray], size: str, config: dict | None = None):
    """A keras-hub ``DINOV2Backbone`` holding a checked checkpoint's weights.

    It is built at the checkpoint's own resolution (position grid x 14 pixels,
    224 for DinoBloom), so its position embeddings are the checkpoint's.

    Raises:
      ValueError: see :func:`check_tensors`.
    """
    config = dinov2.size_config(size) if config is None else dict(config)
    grid = check_tensors(tensors, size, config)
    side = grid * dinov2.PATCH_SIZE
    dinov2._require_keras_hub()
    backbone = dinov2.DINOV2Backbone(
        patch_size=dinov2.PATCH_SIZE,
        **config,
        image_shape=(side, side, 3),
        position_embedding_shape=(side, side, 3),
        dtype="float32",
    )
    assignments = keras_assignments(backbone, tensors)
    if len({id(v) for v, _ in assignments}) != len(backbone.weights):
        raise AssertionError("the DINOv2 weight mapping does not cover every weight")
    for variable, value in assignments:
        variable.assign(np.asarray(value, np.float32))
    return backbone


def convert_checkpoint(
    checkpoint: str | Path, size: str, output: str | Path, *, config: dict | None = None
) -> Path:
    """Converts ``checkpoint`` into the keras-hub preset directory ``output``.

    Args:
      checkpoint: see :func:`read_checkpoint`.
      size: ``"s"``, ``"b"`` or ``"l"``.
      output: a new or empty directory.
      config: architecture override (tests); default ``dinov2.SIZES[size]``.

    Returns:
      ``output`` as a ``Path``.

    Raises:
      FileNotFoundError, ValueError: see :func:`read_checkpoint` and
        :func:`check_tensors`; ``output`` exists and is not an empty directory.
    """
    checkpoint, output = Path(checkpoint).expanduser(), Path(output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"output {output} exists and is not an empty directory")
    if config is None:
        dinov2.size_config(size)  # an unknown size fails before the file is read
    tensors = read_checkpoint(checkpoint)
    backbone = to_keras(tensors, size, config)
    output.mkdir(parents=True, exist_ok=True)
    backbone.save_to_preset(str(output))
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    (output / CONVERSION_FILE).write_text(
        json.dumps(
            {
                "checkpoint": checkpoint.name,
                "sha256": digest.hexdigest(),
                "size": size,
                "architecture": ARCHITECTURES.get(size, size),
                "tensors": len(tensors),
                "position_grid": int(backbone.image_shape[0]) // dinov2.PATCH_SIZE,
            },
            indent=2,
        )
        + "\n"
    )
    return output
