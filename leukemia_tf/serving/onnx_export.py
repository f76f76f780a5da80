"""ONNX export and inference: a ``.onnx`` for ONNX Runtime (PCs, servers, other languages).

``export_onnx`` writes::

  export_dir/<version>/
    model.onnx      the graph of :mod:`leukemia_tf.serving.portable` (input
                    ``pixels`` uint8 [N, S, S, 3] RGB, numeric outputs),
                    converted by tf2onnx, with the metadata below embedded as
                    the model property (``metadata_props``) "leukemia_tf" (JSON)
    labels.txt      class names, one per line (``class_ids`` indexes it)
    export.json     the same metadata, readable: input contract, output
                    names, class names, taxonomy levels, back-off nodes,
                    opset, converter versions, what it was checked against
    taxonomy.yaml   the label tree (models trained on the taxonomy)
    config.json     the training configuration

Only standard ONNX operators are used (the default domain and ``ai.onnx.ml``),
at opset :data:`DEFAULT_OPSET` unless told otherwise, so the file runs on
any ONNX Runtime that reads that opset (1.10 or newer for opset 15) and
needs no TensorFlow. The outputs have the SavedModel's and the ``.tflite``'s
dtypes: ``probabilities`` and the scores float32, ``class_ids`` int64, the
``level_k_ids`` and ``predicted_node_id`` int32, ``referred`` /
``out_of_distribution`` bool. The image decode stays outside the graph (see
:data:`leukemia_tf.serving.portable.INPUT_CONTRACT`). The file is float32;
there is no quantized variant (use the LiteRT export for that).

The converter and the runtime are optional (``pip install 'leukemia_tf[onnx]'``:
tf2onnx, onnx, onnxruntime) and imported only when used. tf2onnx 1.17 runs
with TensorFlow 2.21 and NumPy 2 as it is for this graph: the NumPy-2 patch
Keras applies before its own ONNX export (``keras/src/export/tf2onnx_lib``)
only matters to the external-data format of models over 2 GB, which is not
used here.

:class:`OnnxModel` runs a ``.onnx`` with ONNX Runtime and returns the named
outputs ``predict`` writes (:func:`leukemia_tf.serving.portable.with_names`),
with the interface of :class:`leukemia_tf.serving.litert.LiteRTModel`.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
from collections.abc import Sequence

import numpy as np

from leukemia_tf import rundir
from leukemia_tf.serving import portable

#: The exported file's name inside the version folder.
MODEL_FILE = "model.onnx"

#: Key of the metadata entry in the model's ``metadata_props``.
METADATA_KEY = "leukemia_tf"

#: The opset written by default: tf2onnx's preferred one, read by ONNX Runtime 1.10+.
DEFAULT_OPSET = 15

#: The operator domains a converted graph may use (anything else needs a custom runtime).
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")

INSTALL_HINT = "pip install 'leukemia_tf[onnx]'"


class OnnxError(RuntimeError):
    """The model cannot be converted, or the ``.onnx`` does not reproduce it."""


# ---------------------------------------------------------------- imports
def _converter():
    """``tf2onnx`` and ``onnx``, or an ImportError saying how to install them."""
    try:
        import onnx
        import tf2onnx
    except ImportError as e:
        raise ImportError(
            f"the ONNX export needs tf2onnx and onnx, which are not installed ({e}): {INSTALL_HINT}"
        ) from e
    return tf2onnx, onnx


def _runtime():
    """``onnxruntime``, or an ImportError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(
            f"running an ONNX model needs onnxruntime, which is not installed ({e}): {INSTALL_HINT}"
        ) from e
    return onnxruntime


def supported_opsets() -> list[int]:
    """The opsets the installed tf2onnx writes."""
    tf2onnx, _ = _converter()
    return sorted(tf2onnx.constants.OPSET_TO_IR_VERSION)


def check_opset(opset: int) -> int:
    """``opset`` if the installed tf2onnx writes it, else a ValueError naming the range."""
    opsets = supported_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in opsets:
        raise ValueError(f"--opset={opset!r}: must be an integer from {opsets[0]} to {opsets[-1]}")
    return opset


# -------------------------------------------------------------- conversion
def convert(trained: rundir.TrainedModel, *, temperature: float = 1.0, opset: int = DEFAULT_OPSET):
    """The ONNX ``ModelProto`` of ``trained`` (no metadata; see :func:`export_onnx`).

    Args:
      trained: the loaded model (float32).
      temperature: divides the logits of ``probabilities``.
      opset: the ONNX opset (:func:`check_opset`).

    Raises:
      ValueError: a bad ``opset``.
      OnnxError: tf2onnx cannot convert an op, or the result is not a valid model.
    """
    tf2onnx, onnx = _converter()
    check_opset(opset)
    module, function = portable.numeric_function(trained, temperature)
    input_signature = list(function.structured_input_signature[0])
    what = f"{trained.config.backbone}/{trained.config.head}: ONNX conversion (opset {opset})"
    # tf2onnx logs every optimizer pass at INFO; its errors still show.
    logger = std_logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(max(level, std_logging.WARNING))
    try:
        proto, _ = tf2onnx.convert.from_function(
            module.serve, input_signature=input_signature, opset=opset
        )
    except Exception as e:  # noqa: BLE001 - tf2onnx raises plain exceptions of every kind
        raise OnnxError(f"{what} failed: {e}") from e
    finally:
        logger.setLevel(level)
    # tf2onnx leaves an op it cannot convert in the graph under its TF name (it
    # converts "on error, continue"); the checker refuses an unknown op there.
    foreign = sorted(
        {f"{n.domain}:{n.op_type}" for n in proto.graph.node if n.domain not in STANDARD_DOMAINS}
    )
    if foreign:
        raise OnnxError(f"{what}: ops outside the standard ONNX domains: {', '.join(foreign)}")
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001 - onnx.checker.ValidationError and friends
        raise OnnxError(f"{what} produced an invalid model: {e}") from e
    return proto


# ---------------------------------------------------------------- metadata
def embed_metadata(proto, meta: dict):
    """``proto`` with ``meta`` (JSON) as its model property :data:`METADATA_KEY` (in place)."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    for key, value in [*kept, (METADATA_KEY, json.dumps(meta, sort_keys=True))]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto


def read_metadata(proto) -> dict | None:
    """The embedded :data:`METADATA_KEY` metadata of an ONNX ``ModelProto``, or None."""
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    return None


# -------------------------------------------------------------- inference
def _session(model: str | bytes, num_threads: int | None, providers: Sequence[str] | None):
    ort = _runtime()
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    return ort.InferenceSession(
        model, sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
    )


class OnnxModel(portable.PortableModel):
    """A ``.onnx`` exported by :func:`export_onnx`, run by ONNX Runtime.

    Args:
      path: the ``.onnx`` file.
      num_threads: ONNX Runtime's intra-op threads (default: its own choice).
      providers: ONNX Runtime execution providers (default: the CPU).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        num_threads: int | None = None,
        providers: Sequence[str] | None = None,
    ):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"--model={self.path}: no such file")
        try:
            session = _session(self.path, num_threads, providers)
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's errors derive from Exception only
            raise ValueError(f"--model={self.path}: not an ONNX model ({e})") from e
        raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self._set_metadata(
            portable.checked_metadata(
                json.loads(raw) if raw else None, self.path, kind=".onnx", model_format="onnx"
            )
        )
        self._attach(session)

    def _attach(self, session) -> None:
        self._session = session
        self._outputs = [o.name for o in session.get_outputs()]

    def numeric(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The model's numeric outputs for ``uint8 [N, S, S, 3]`` pixels."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        values = self._session.run(self._outputs, {portable.INPUT: pixels})
        return dict(zip(self._outputs, values, strict=True))


class _BytesModel(OnnxModel):
    """An :class:`OnnxModel` over an in-memory model without metadata (the check)."""

    def __init__(self, content: bytes):  # noqa: D107 - no file, no metadata
        self.path = "<memory>"
        self._attach(_session(content, None, None))


# ------------------------------------------------------------------ export
#: Where an ONNX export went (``opset`` set) and how it compares with the Keras model.
OnnxResult = portable.PortableResult


def export_onnx(
    model_dir: str | os.PathLike,
    export_dir: str | os.PathLike,
    *,
    version: int | None = None,
    which: str = "best",
    apply_temperature: bool = False,
    check_images: str | None = None,
    verify: bool = True,
    adapt_bn: str | None = None,
    opset: int = DEFAULT_OPSET,
) -> OnnxResult:
    """Exports ``model_dir``'s model as ``export_dir/<version>/model.onnx``.

    Args:
      model_dir: a finished training run.
      export_dir: the base folder; the files go into ``<version>/``.
      version: the version folder; default: one more than the largest there.
      which: ``"best"``, ``"last"`` or a ``.keras`` file.
      apply_temperature: divide the logits by the stored temperature.
      check_images: a glob, folder or file list of real images for the check
        against the Keras model; default: the run's validation split when at
        hand (generated images are always added).
      verify: run that check in ONNX Runtime: the file must reproduce the
        Keras model's probabilities within
        :data:`leukemia_tf.serving.portable.FLOAT_TOLERANCE`.
      adapt_bn: AdaBN images, as for the SavedModel export.
      opset: the ONNX opset (:func:`check_opset`).

    Raises:
      ImportError: tf2onnx / onnx (or, with ``verify``, onnxruntime) missing.
      FileNotFoundError, FileExistsError, ValueError: bad input (named).
      OnnxError: conversion failed, or the file disagrees.
    """
    from leukemia_tf.serving import export_lib

    tf2onnx, onnx = _converter()
    ort = _runtime() if verify else None
    check_opset(opset)
    prepared = export_lib.prepare_export(
        model_dir,
        export_dir,
        version=version,
        which=which,
        apply_temperature=apply_temperature,
        adapt_bn=adapt_bn,
    )
    trained, temperature = prepared.trained, prepared.temperature
    proto = convert(trained, temperature=temperature, opset=opset)
    portable.warn_without_trust(trained, prepared.model_dir, ".onnx")
    meta = portable.export_metadata(
        prepared,
        model_format="onnx",
        which=which,
        apply_temperature=apply_temperature,
        onnx={
            "opset": opset,
            "ir_version": int(proto.ir_version),
            "tf2onnx_version": tf2onnx.__version__,
            "onnx_version": onnx.__version__,
        },
    )
    check = None
    if verify:
        check = portable.verify(
            _BytesModel(proto.SerializeToString()),
            trained,
            temperature,
            check_images=check_images,
            error=OnnxError,
            what="the .onnx",
        )
        meta["check"] = {
            **check,
            "against": portable.CHECK_AGAINST,
            "onnxruntime_version": ort.__version__,
        }
    proto.model_version = prepared.version
    content = embed_metadata(proto, meta).SerializeToString()
    file = portable.write_version(prepared, MODEL_FILE, content, meta)
    return OnnxResult(
        path=prepared.final,
        file=file,
        version=prepared.version,
        opset=opset,
        size_bytes=len(content),
        temperature=temperature,
        check=check or {},
        adapted_batchnorm=prepared.adapted_batchnorm,
    )
