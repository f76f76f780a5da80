"""What the portable exports (LiteRT, ONNX) share: one numeric graph and its metadata.

A portable model runs where there is no TensorFlow: a microscope camera, a
phone, a small PC. Its runtimes have no string ops and no image decoders, so:

* the input is ``pixels``, ``uint8 [N, S, S, 3]`` RGB at the model's training
  size ``S``, already decoded and resized the way this package does it
  (:func:`leukemia_tf.data.preprocessing.decode_and_resize`: the aspect ratio
  kept, the image scaled to fit and padded with its mean colour). The values
  are the plain 0-255 colours: the normalisation is inside the graph.
* the outputs are :func:`leukemia_tf.serving.signatures.postprocess`'s with
  ``names=False``: ``probabilities``, ``class_ids`` (an index into the class
  names), per taxonomy level ``level_k_probabilities`` and ``level_k_ids``
  (hierarchical heads), the trust scores, ``referred`` /
  ``out_of_distribution`` and ``predicted_node_id`` (an index into
  ``backoff_nodes``) where the run has fitted them.
* the names travel as metadata (:func:`metadata`): the class names, the
  taxonomy levels, the back-off nodes, the input contract.

:func:`with_names` turns the numeric outputs back into the SavedModel's named
outputs, so ``predict`` writes the same CSV from either model.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from leukemia_tf import rundir
from leukemia_tf.models import trust as trust_lib
from leukemia_tf.serving import export_lib, signatures

#: The input name of every portable model.
INPUT = "pixels"

#: Format of the portable metadata (bump on an incompatible change).
FORMAT_VERSION = 1

INPUT_CONTRACT = (
    "uint8 [N, S, S, 3] RGB 0-255 at the training size S; decode and resize as "
    "leukemia_tf.data.preprocessing.decode_and_resize does (aspect ratio kept, scaled to "
    "fit, padded with the image's mean colour); no normalisation (it is in the graph)"
)


def numeric_function(
    trained: rundir.TrainedModel, temperature: float = 1.0
) -> tuple[tf.Module, tf.types.experimental.ConcreteFunction]:
    """The portable graph of ``trained``, its weights frozen into constants.

    Returns:
      ``(module, function)``: ``function`` takes ``pixels`` (see the module
      docstring) and returns the numeric outputs by name; ``module`` tracks it
      (the converters want a trackable object).
    """
    size = trained.image_size
    stats = trained.trust
    spec = tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT)

    @tf.function(input_signature=[spec])
    def serve(pixels):
        outputs = trained.forward(tf.cast(pixels, tf.float32), features=stats is not None)
        return signatures.postprocess(outputs, trained.label_space, temperature, stats, names=False)

    concrete = serve.get_concrete_function()
    keys = sorted(concrete.structured_outputs)
    # Constants, not variables: the LiteRT calibrator and ONNX have no variables.
    from tensorflow.python.framework import convert_to_constants

    frozen = convert_to_constants.convert_variables_to_constants_v2(concrete)
    module = tf.Module()
    # The frozen function returns its outputs flattened (sorted by name).
    module.serve = tf.function(
        lambda pixels: dict(zip(keys, frozen(pixels), strict=True)), input_signature=[spec]
    )
    return module, module.serve.get_concrete_function()


def output_keys(trained: rundir.TrainedModel) -> list[str]:
    """The names of the portable model's outputs."""
    return signatures.output_keys(trained.label_space, trained.trust, names=False)


def metadata(
    trained: rundir.TrainedModel,
    *,
    model_format: str,
    source_model_dir: str,
    checkpoint: str,
    temperature: float,
    apply_temperature: bool,
    adapted_batchnorm: dict | None = None,
    **extra,
) -> dict:
    """What a portable model needs beside its graph: names, input contract, provenance."""
    label_space = trained.label_space
    stats = trained.trust
    hierarchical = label_space.head == "hierarchical"
    selection = stats.selection if stats is not None else None
    return {
        "format_version": FORMAT_VERSION,
        "format": model_format,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_model_dir": source_model_dir,
        "checkpoint": checkpoint,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "backbone": trained.config.backbone,
        "head": trained.config.head,
        "image_size": trained.image_size,
        "input": {"name": INPUT, "contract": INPUT_CONTRACT},
        "outputs": output_keys(trained),
        "class_names": list(trained.class_names),
        "taxonomy_levels": [list(level) for level in trained.taxonomy.levels]
        if hierarchical
        else None,
        "backoff_nodes": trust_lib.backoff_node_names(trust_lib.backoff_tree(label_space))
        if stats is not None and stats.backoff is not None
        else None,
        "trust_outputs": trust_lib.output_keys(stats),
        "selection": selection,
        "temperature": temperature,
        "temperature_applied": bool(apply_temperature),
        "adapted_batchnorm": adapted_batchnorm,
        **extra,
    }


def export_metadata(
    prepared: export_lib.PreparedExport,
    *,
    model_format: str,
    which: str,
    apply_temperature: bool,
    **extra,
) -> dict:
    """:func:`metadata` of a prepared export (its model, source, temperature, version)."""
    return metadata(
        prepared.trained,
        model_format=model_format,
        source_model_dir=prepared.model_dir,
        checkpoint=which,
        temperature=prepared.temperature,
        apply_temperature=apply_temperature,
        adapted_batchnorm=prepared.adapted_batchnorm,
        version=prepared.version,
        **extra,
    )


def _names(table: list[str], ids: np.ndarray) -> np.ndarray:
    """``table[i]`` as bytes for every id (``b""`` for -1), like the SavedModel's strings."""
    lookup = np.array([name.encode("utf-8") for name in table] + [b""], dtype=object)
    ids = np.asarray(ids).astype(np.int64)
    return lookup[np.where(ids < 0, len(table), ids)]


def with_names(outputs: Mapping[str, np.ndarray], meta: Mapping) -> dict[str, np.ndarray]:
    """The SavedModel's named outputs from a portable model's numeric ones.

    Adds ``class_names``, ``level_k_names`` and ``predicted_node`` (bytes, as
    the SavedModel returns them) from the ids and the metadata's tables, and
    drops the ids that only stood for them (``class_ids`` stays).
    """
    out = dict(outputs)
    out[signatures.CLASS_NAMES] = _names(meta["class_names"], out[signatures.CLASS_IDS])
    for level, nodes in enumerate(meta.get("taxonomy_levels") or ()):
        out[signatures.level_names_key(level)] = _names(
            nodes, out.pop(signatures.level_ids_key(level))
        )
    if trust_lib.PREDICTED_NODE_ID in out:
        out[trust_lib.PREDICTED_NODE] = _names(
            meta["backoff_nodes"], out.pop(trust_lib.PREDICTED_NODE_ID)
        )
    return out


# ------------------------------------------------- what the exports share
#: Largest probability difference tolerated between a float32 portable model and the Keras model.
FLOAT_TOLERANCE = 1e-4

#: What :func:`verify` compares a portable model with.
CHECK_AGAINST = "the Keras model (float32) on the same uint8 pixels"


def checked_metadata(meta: Mapping | None, path: str, *, kind: str, model_format: str) -> dict:
    """``meta`` read from the portable model ``path``, if this version of the package reads it.

    Args:
      meta: the embedded metadata, None where the file has none.
      path: the file (for the messages).
      kind: what the file is, e.g. ``".tflite"`` (for the messages).
      model_format: its ``--format`` (for the messages).

    Raises:
      ValueError: no metadata, or a format this version does not read.
    """
    if meta is None:
        raise ValueError(
            f"--model={path}: a {kind} without leukemia_tf metadata (class names, input "
            f"size); export it with python -m leukemia_tf.export --format={model_format}"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"--model={path}: metadata format {meta.get('format_version')!r}, this "
            f"version of leukemia_tf reads {FORMAT_VERSION}"
        )
    return dict(meta)


def warn_without_trust(trained: rundir.TrainedModel, model_dir: str, kind: str) -> None:
    """Logs that ``kind`` has the logit scores only when the run has no trust statistics."""
    if trained.ensemble is not None:
        logging.warning("%s: %s", model_dir, trust_lib.ENSEMBLE_HAS_NO_FEATURES)
    elif trained.trust is None:
        logging.warning(
            "%s has no trust statistics: the %s returns the logit scores only; fit them "
            "first with %s",
            model_dir,
            kind,
            trust_lib.fit_command(model_dir),
        )


def check_pixels(trained: rundir.TrainedModel, check_images: str | None = None) -> np.ndarray:
    """The images a portable model is checked on, ``uint8 [N, S, S, 3]``.

    ``check_images`` (a glob, folder or file list of real images), else the
    run's validation split when at hand; the generated coverage images are
    always added. Decoded and resized as the input contract says.
    """
    from leukemia_tf.data import preprocessing
    from leukemia_tf.serving import warmup

    encoded = (
        warmup.read_image_files(check_images)
        if check_images
        else warmup.dataset_images(trained.config)
    ) + warmup.coverage_images(trained.image_size)
    return np.stack(
        [preprocessing.decode_and_resize(b, trained.image_size).numpy() for b in encoded]
    )


def compare(model, trained: rundir.TrainedModel, pixels: np.ndarray, temperature: float) -> dict:
    """A portable model (anything with ``numeric(pixels)``) against the Keras model.

    Returns:
      ``{"images", "max_abs_difference", "top1_agreement"}`` (probabilities).
    """
    outputs = {k: tf.constant(v) for k, v in trained.outputs(pixels).items()}
    expected = trained.label_space.probabilities(outputs, temperature).numpy()
    got = model.numeric(pixels)[signatures.PROBABILITIES]
    return {
        "images": int(len(pixels)),
        "max_abs_difference": float(np.max(np.abs(got - expected))),
        "top1_agreement": float(np.mean(got.argmax(-1) == expected.argmax(-1))),
    }


def verify(
    model,
    trained: rundir.TrainedModel,
    temperature: float,
    *,
    check_images: str | None = None,
    strict: bool = True,
    error: type[Exception] = RuntimeError,
    what: str = "the portable model",
) -> dict:
    """:func:`compare` on :func:`check_pixels`; ``strict``: within :data:`FLOAT_TOLERANCE`.

    Raises:
      error: ``strict`` and the probabilities differ by more than the tolerance.
    """
    check = compare(model, trained, check_pixels(trained, check_images), temperature)
    if strict and not check["max_abs_difference"] <= FLOAT_TOLERANCE:
        raise error(
            f"{what} disagrees with the Keras model by {check['max_abs_difference']:.2e} "
            f"(tolerance {FLOAT_TOLERANCE:g}) on {check['images']} image(s)"
        )
    return check


def write_version(
    prepared: export_lib.PreparedExport, file_name: str, content: bytes, meta: dict
) -> str:
    """Writes ``content`` as ``file_name`` and the assets into the version folder.

    ``prepared`` is :func:`leukemia_tf.serving.export_lib.prepare_export`'s; the
    files go to a staging folder renamed into place when complete. Returns
    the file's final path.
    """
    staging = prepared.staging()
    try:
        with tf.io.gfile.GFile(os.path.join(staging, file_name), "wb") as f:
            f.write(content)
        export_lib.write_assets(prepared.trained, staging, meta)
        prepared.commit(staging)
    except BaseException:
        prepared.abandon(staging)
        raise
    return os.path.join(prepared.final, file_name)


class PortableModel:
    """A portable model file exported by this package, ready to predict.

    Subclasses (``LiteRTModel``, ``OnnxModel``) read the file, call
    :meth:`_set_metadata` and implement :meth:`numeric`.

    Attributes:
      path: the file.
      metadata: its embedded metadata (:func:`metadata`).
      image_size: the input side S.
      class_names: the labels ``class_ids`` indexes.
    """

    path: str
    metadata: dict
    image_size: int
    class_names: list[str]

    def _set_metadata(self, meta: dict) -> None:
        self.metadata = meta
        self.image_size = int(meta["image_size"])
        self.class_names = list(meta["class_names"])

    def numeric(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The model's numeric outputs for ``uint8 [N, S, S, 3]`` pixels."""
        raise NotImplementedError

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The named outputs (as the SavedModel's) for ``uint8 [N, S, S, 3]`` pixels."""
        return with_names(self.numeric(pixels), self.metadata)


@dataclasses.dataclass(frozen=True)
class PortableResult:
    """Where a portable export went and how it compares with the Keras model."""

    path: str  # export_dir/<version>
    file: str  # .../model.tflite or model.onnx
    version: int
    size_bytes: int
    temperature: float
    check: dict  # max_abs_difference, top1_agreement, images; {} without the check
    adapted_batchnorm: dict | None = None
    quantize: str | None = None  # LiteRT
    opset: int | None = None  # ONNX


#: File suffix -> the module and class that run it.
RUNTIMES = {
    ".tflite": ("leukemia_tf.serving.litert", "LiteRTModel"),
    ".onnx": ("leukemia_tf.serving.onnx_export", "OnnxModel"),
}


def load(path: str | os.PathLike, num_threads: int | None = None):
    """A portable model file, ready to predict (``LiteRTModel``, ``OnnxModel``).

    Raises:
      FileNotFoundError: no such file.
      ValueError: an unknown suffix, or a file this package did not export.
    """
    import importlib

    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in RUNTIMES:
        raise ValueError(
            f"--model={path}: a portable model file ({', '.join(RUNTIMES)}); for a training "
            "run use --model_dir"
        )
    module, name = RUNTIMES[suffix]
    return getattr(importlib.import_module(module), name)(path, num_threads=num_threads)
