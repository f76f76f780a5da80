"""LiteRT (TFLite) export and inference: a ``.tflite`` for microscopes and phones.

``python -m leukemia_tf.export --format=litert [--quantize=...]`` writes::

  export_dir/<version>/
    model.tflite    the graph of :mod:`leukemia_tf.serving.portable` (input
                    ``pixels`` uint8 [N, S, S, 3] RGB, numeric outputs), with
                    the metadata below embedded under the name "leukemia_tf"
    labels.txt      class names, one per line (``class_ids`` indexes it)
    export.json     the same metadata, readable: input contract, output
                    names, class names, taxonomy levels, back-off nodes,
                    quantization, what it was checked against
    taxonomy.yaml   the label tree (models trained on the taxonomy)
    config.json     the training configuration

Only TFLite builtin ops are used (no TF Select / Flex delegate), so the file
runs on the plain LiteRT runtime. The image decode stays outside the graph,
as on a device: the camera or the app decodes and resizes (see
:data:`leukemia_tf.serving.portable.INPUT_CONTRACT`).

Quantization (``--quantize``):

* ``none``: float32, the reference.
* ``float16``: float16 weights (half the size), computed in float32 on CPUs.
* ``dynamic``: int8 weights, activations quantized on the fly (dynamic range).
* ``int8``: int8 weights and activations, calibrated on a representative
  sample of the training split drawn through the package's own pipeline
  (:func:`calibration_images`); the uint8 input and float32 outputs stay as
  they are. The trust-score ops (distances to the fitted feature statistics,
  :data:`leukemia_tf.models.trust.FEATURE_SCORES_SCOPE`) are kept in float:
  8-bit activations do not preserve those distances.

:class:`LiteRTModel` runs a ``.tflite`` with the LiteRT interpreter
(``ai_edge_litert`` when installed, else ``tf.lite``) and returns the named
outputs ``predict`` writes (:func:`leukemia_tf.serving.portable.with_names`).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from leukemia_tf import rundir
from leukemia_tf.models import trust as trust_lib
from leukemia_tf.serving import portable

QUANTIZATIONS = ("none", "float16", "dynamic", "int8")

#: The exported file's name inside the version folder.
MODEL_FILE = "model.tflite"

#: Name of the metadata entry embedded in the ``.tflite`` flatbuffer.
METADATA_NAME = "leukemia_tf"

#: The one signature of every exported ``.tflite``.
SIGNATURE = "serving_default"

#: Training images the int8 calibration runs.
DEFAULT_CALIBRATION_IMAGES = 200

#: Largest probability difference tolerated between a float32 ``.tflite`` and the Keras model.
FLOAT_TOLERANCE = portable.FLOAT_TOLERANCE


class LiteRTError(RuntimeError):
    """The model cannot be converted, or the ``.tflite`` does not reproduce it."""


def check_quantize(quantize: str) -> str:
    """``quantize`` if it is one of :data:`QUANTIZATIONS`, else a ValueError naming it."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"--quantize={quantize!r}: must be one of {', '.join(QUANTIZATIONS)}")
    return quantize


# ------------------------------------------------------------- calibration
def calibration_images(
    trained: rundir.TrainedModel, count: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0
) -> np.ndarray:
    """A representative sample of the training split, as the model sees it.

    Drawn through :func:`leukemia_tf.data.pipeline.load_split` over the run's
    own data sets and training split (mixed by their weights, shuffled with
    ``seed``; no augmentation: the augmentation runs in the model at training
    time), decoded and resized like every other input.

    Returns:
      ``uint8 [count, S, S, 3]`` (fewer when the split is smaller).

    Raises:
      FileNotFoundError: the run's data are not at hand (the message names
        the data directory and how to build it).
    """
    from leukemia_tf.data import pipeline

    config = trained.config
    try:
        ds = pipeline.load_split(
            config.datasets,
            config.train_split,
            data_dir=config.data_dir or None,
            image_size=trained.image_size,
            batch_size=1,
            training=True,
            label_mode=config.label_mode,
            taxonomy=trained.taxonomy,
            cache=False,
            shuffle_buffer=1024,
            seed=seed,
            deterministic=True,
            repeat=False,
            drop_remainder=False,
        )
        images = [batch["image"][0] for batch in ds.take(count).as_numpy_iterator()]
    except Exception as e:  # noqa: BLE001 - any failure means "no calibration data"
        raise FileNotFoundError(
            f"--quantize=int8 calibrates on the run's training split "
            f"({config.datasets!r}, split {config.train_split!r}, data_dir "
            f"{config.data_dir or 'the TFDS default'!r}), which cannot be read here ({e}). Build "
            "the data set there (python -m leukemia_tf.build_data), or choose "
            "--quantize=none|float16|dynamic, which need no data"
        ) from e
    if not images:
        raise FileNotFoundError(
            f"--quantize=int8: the training split {config.train_split!r} of "
            f"{config.datasets!r} has no images to calibrate on"
        )
    return np.stack(images)


# -------------------------------------------------------------- conversion
def _float_node_names(float_model: bytes, scope: str, outputs: list[str]) -> list[str]:
    """Output tensor names of the ops under ``scope`` and of the named outputs."""
    interpreter = _interpreter(float_model)
    names = {d["name"] for d in interpreter.get_tensor_details() if f"{scope}/" in d["name"]}
    signature = interpreter.get_signature_runner()
    index_to_name = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    for key in outputs:
        names.add(index_to_name[signature.get_output_details()[key]["index"]])
    return sorted(names)


def convert(
    trained: rundir.TrainedModel,
    *,
    quantize: str = "none",
    temperature: float = 1.0,
    representative: np.ndarray | None = None,
) -> bytes:
    """The ``.tflite`` flatbuffer of ``trained`` (no metadata; see :func:`export_litert`).

    Args:
      trained: the loaded model (float32).
      quantize: one of :data:`QUANTIZATIONS`.
      temperature: divides the logits of ``probabilities``.
      representative: ``uint8 [N, S, S, 3]`` calibration images (``int8`` only).

    Raises:
      ValueError: a bad ``quantize``, or ``int8`` without images.
      LiteRTError: the graph has an op LiteRT's builtin set lacks.
    """
    check_quantize(quantize)
    if quantize == "int8" and (representative is None or not len(representative)):
        raise ValueError("--quantize=int8 needs calibration images")
    module, _ = portable.numeric_function(trained, temperature)
    with tempfile.TemporaryDirectory(prefix="leukemia_litert_") as saved:
        # Through a SavedModel of the frozen graph, TFLite's documented path: it
        # keeps the signature (input and output names) for every backbone;
        # from_concrete_functions drops it for some (EfficientNetV2) and falls
        # back to unnamed outputs.
        tf.saved_model.save(
            module,
            saved,
            signatures={SIGNATURE: module.serve},
            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
        )

        def converter() -> tf.lite.TFLiteConverter:
            c = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=[SIGNATURE])
            # Builtin ops only: the file must run without the Flex delegate.
            c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            return c

        return _convert_with(trained, converter, quantize, representative)


def _convert_with(
    trained: rundir.TrainedModel,
    converter: Callable[[], tf.lite.TFLiteConverter],
    quantize: str,
    representative: np.ndarray | None,
) -> bytes:
    try:
        if quantize == "int8":
            flatbuffer = _convert_int8(trained, converter, representative)
        else:
            c = converter()
            if quantize != "none":  # float16 or dynamic (int8 weights)
                c.optimizations = [tf.lite.Optimize.DEFAULT]
            if quantize == "float16":
                c.target_spec.supported_types = [tf.float16]
            flatbuffer = c.convert()
    except (tf.errors.OpError, RuntimeError) as e:  # the converter's op errors
        if isinstance(e, LiteRTError):
            raise
        raise LiteRTError(
            f"{trained.config.backbone}/{trained.config.head}: LiteRT conversion "
            f"({quantize}) failed: {e}"
        ) from e
    if list(_interpreter(flatbuffer).get_signature_list()) != [SIGNATURE]:
        raise LiteRTError(
            f"{trained.config.backbone}/{trained.config.head}: the converted model has no "
            f"'{SIGNATURE}' signature (its outputs would have no names)"
        )
    return flatbuffer


def _convert_int8(
    trained: rundir.TrainedModel,
    converter: Callable[[], tf.lite.TFLiteConverter],
    representative: np.ndarray,
) -> bytes:
    """Full-integer model; the trust feature scores stay float (see the module docstring)."""

    def dataset() -> Iterator[dict[str, np.ndarray]]:
        for image in representative:
            yield {portable.INPUT: image[None]}

    c = converter()
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = dataset
    if trained.trust is None:
        return c.convert()
    # The quantization debugger's selective quantization: every op of the
    # feature scores (and the two outputs) is left in float.
    keep_float = _float_node_names(
        converter().convert(), trust_lib.FEATURE_SCORES_SCOPE, list(trust_lib.FEATURE_SCORES)
    )
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=c,
        debug_dataset=lambda: ([image[None]] for image in representative[:1]),
        debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep_float),
    )
    return debugger.get_nondebug_quantized_model()


# ---------------------------------------------------------------- metadata
def embed_metadata(model: bytes, meta: dict) -> bytes:
    """``model`` with ``meta`` (JSON) embedded as the flatbuffer metadata :data:`METADATA_NAME`."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), np.uint8)
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(tree.buffers) - 1
    tree.metadata = [m for m in (tree.metadata or []) if _decode(m.name) != METADATA_NAME] + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def _decode(name) -> str:
    return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def read_metadata(model: bytes) -> dict | None:
    """The embedded :data:`METADATA_NAME` metadata of a ``.tflite``, or None."""
    from tensorflow.lite.tools import flatbuffer_utils

    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    for entry in tree.metadata or []:
        if _decode(entry.name) == METADATA_NAME:
            data = tree.buffers[entry.buffer].data
            return json.loads(bytes(np.asarray(data, np.uint8)).decode("utf-8"))
    return None


# -------------------------------------------------------------- inference
def _interpreter(model: bytes, num_threads: int | None = None):
    """A LiteRT interpreter: ``ai_edge_litert``'s when installed, else ``tf.lite``'s."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        with warnings.catch_warnings():
            # tf.lite.Interpreter warns that it moves to ai_edge_litert; it still works.
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(model_content=model, num_threads=num_threads)
    return Interpreter(model_content=model, num_threads=num_threads)


class LiteRTModel(portable.PortableModel):
    """A ``.tflite`` exported by :func:`export_litert`, run by the LiteRT interpreter."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"--model={self.path}: no such file")
        with open(self.path, "rb") as f:
            content = f.read()
        try:
            meta = read_metadata(content)
        except Exception as e:  # noqa: BLE001 - not a flatbuffer at all
            raise ValueError(f"--model={self.path}: not a LiteRT (.tflite) model ({e})") from e
        self._set_metadata(
            portable.checked_metadata(meta, self.path, kind=".tflite", model_format="litert")
        )
        self._interpreter = _interpreter(content, num_threads)
        self._runner = self._interpreter.get_signature_runner()

    def numeric(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The model's numeric outputs for ``uint8 [N, S, S, 3]`` pixels."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        return dict(self._runner(**{portable.INPUT: pixels}))


# ------------------------------------------------------------------ export
#: Where a LiteRT export went (``quantize`` set) and how it compares with the Keras model.
LiteRTResult = portable.PortableResult


#: The ``.tflite`` against the Keras model on ``uint8 [N, S, S, 3]`` pixels.
compare = portable.compare


def export_litert(
    model_dir: str | os.PathLike,
    export_dir: str | os.PathLike,
    *,
    version: int | None = None,
    which: str = "best",
    apply_temperature: bool = False,
    quantize: str = "none",
    calibration_images_count: int = DEFAULT_CALIBRATION_IMAGES,
    check_images: str | None = None,
    verify: bool = True,
    adapt_bn: str | None = None,
) -> LiteRTResult:
    """Exports ``model_dir``'s model as ``export_dir/<version>/model.tflite``.

    Args:
      model_dir: a finished training run.
      export_dir: the base folder; the files go into ``<version>/``.
      version: the version folder; default: one more than the largest there.
      which: ``"best"``, ``"last"`` or a ``.keras`` file.
      apply_temperature: divide the logits by the stored temperature.
      quantize: one of :data:`QUANTIZATIONS`.
      calibration_images_count: training images the ``int8`` calibration runs.
      check_images: a glob, folder or file list of real images for the check
        against the Keras model; default: the run's validation split when at
        hand (generated images are always added).
      verify: run that check. A float32 file must reproduce the Keras
        model's probabilities within :data:`FLOAT_TOLERANCE`; a quantized one
        is measured (recorded in ``export.json``), not held to it.
      adapt_bn: AdaBN images, as for the SavedModel export.

    Raises:
      FileNotFoundError, FileExistsError, ValueError: bad input (named).
      LiteRTError: conversion failed, or a float32 file disagrees.
    """
    from leukemia_tf.serving import export_lib

    check_quantize(quantize)
    if quantize == "int8" and calibration_images_count < 1:
        raise ValueError(
            f"--calibration_images={calibration_images_count}: int8 needs at least one image"
        )
    prepared = export_lib.prepare_export(
        model_dir,
        export_dir,
        version=version,
        which=which,
        apply_temperature=apply_temperature,
        adapt_bn=adapt_bn,
    )
    trained, temperature = prepared.trained, prepared.temperature
    representative = None
    if quantize == "int8":
        representative = calibration_images(trained, calibration_images_count)
    flatbuffer = convert(
        trained, quantize=quantize, temperature=temperature, representative=representative
    )
    portable.warn_without_trust(trained, prepared.model_dir, ".tflite")
    meta = portable.export_metadata(
        prepared,
        model_format="litert",
        which=which,
        apply_temperature=apply_temperature,
        quantization={
            "mode": quantize,
            "calibration_images": int(len(representative)) if representative is not None else 0,
            "calibration_split": trained.config.train_split if quantize == "int8" else None,
            "float_ops": f"the trust feature scores ({trust_lib.FEATURE_SCORES_SCOPE})"
            if quantize == "int8" and trained.trust is not None
            else None,
        },
    )
    check = None
    if verify:
        check = portable.verify(
            _BytesModel(flatbuffer),
            trained,
            temperature,
            check_images=check_images,
            strict=quantize == "none",
            error=LiteRTError,
            what="the float32 .tflite",
        )
        meta["check"] = {**check, "against": portable.CHECK_AGAINST}
    flatbuffer = embed_metadata(flatbuffer, meta)
    portable.write_version(prepared, MODEL_FILE, flatbuffer, meta)
    return LiteRTResult(
        path=prepared.final,
        file=os.path.join(prepared.final, MODEL_FILE),
        version=prepared.version,
        quantize=quantize,
        size_bytes=len(flatbuffer),
        temperature=temperature,
        check=check or {},
        adapted_batchnorm=prepared.adapted_batchnorm,
    )


class _BytesModel(LiteRTModel):
    """A :class:`LiteRTModel` over an in-memory flatbuffer without metadata (the check)."""

    def __init__(self, content: bytes):  # noqa: D107 - no file, no metadata
        self.path = "<memory>"
        self._interpreter = _interpreter(content)
        self._runner = self._interpreter.get_signature_runner()
