"""Exports a trained model as a SavedModel that TF Serving loads.

Layout (TF Serving's: one integer folder per version under the base path)::

  export_dir/
    <version>/
      saved_model.pb, variables/        the float32 graph, signatures below
      fingerprint.pb
      assets/labels.txt                  class names, one per line (class_ids index it)
      assets/taxonomy.yaml               the label tree (models trained on the taxonomy)
      assets/config.json                 the training configuration
      assets/export.json                 what was exported: source, temperature, signatures,
                                         adapted_batchnorm (AdaBN, when --adapt_bn was given)
      assets.extra/tf_serving_warmup_requests

The graph is always float32: ``rundir.load_trained_model(float32=True)``
rebuilds the model under the float32 policy, also for a model trained in
``mixed_float16`` / ``mixed_bfloat16``, so a CPU server (or a GPU without
bf16) serves it at full precision. Signatures: see
:mod:`leukemia_tf.serving.signatures`.

With ``adapt_bn`` (AdaBN, :mod:`leukemia_tf.models.adapt`), the export is a
copy of the model whose BatchNorm statistics were re-estimated on unlabelled
target-domain images (another lab's smears), recorded as such in
``assets/export.json`` under ``adapted_batchnorm``: ``{images, count, layers,
date, ...}`` (``null`` for a plain export). The run directory is not changed.

A version is written to a hidden temporary folder and renamed into place only
when complete, so a TF Serving instance that polls ``export_dir`` never loads
a half-written version.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from leukemia_tf import rundir
from leukemia_tf.models import trust as trust_lib
from leukemia_tf.serving import signatures, warmup

#: Format of ``assets/export.json`` (bump on an incompatible change).
EXPORT_FORMAT_VERSION = 1

LABELS_ASSET = "labels.txt"
TAXONOMY_ASSET = "taxonomy.yaml"
CONFIG_ASSET = "config.json"
METADATA_ASSET = "export.json"

#: Largest probability difference tolerated between the export and the Keras model.
VERIFY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The export could not be written, or does not reproduce the Keras model."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where an export went and what it holds."""

    path: str  # export_dir/<version>
    version: int
    temperature: float
    signatures: dict[str, list[str]]  # name -> output keys
    warmup_records: int
    max_abs_difference: float | None  # export vs Keras model on the warmup images
    adapted_batchnorm: dict | None = None  # the AdaBN record of export.json, if adapted


def existing_versions(export_dir: str | os.PathLike) -> list[int]:
    """The integer version folders already in ``export_dir`` (sorted)."""
    export_dir = os.fspath(export_dir)
    if not tf.io.gfile.isdir(export_dir):
        return []
    versions = []
    for name in tf.io.gfile.listdir(export_dir):
        name = name.rstrip("/")
        if name.isdigit() and tf.io.gfile.isdir(os.path.join(export_dir, name)):
            versions.append(int(name))
    return sorted(versions)


def next_version(export_dir: str | os.PathLike) -> int:
    """One more than the largest version in ``export_dir`` (1 for a new folder)."""
    versions = existing_versions(export_dir)
    return versions[-1] + 1 if versions else 1


def write_assets(trained: rundir.TrainedModel, directory: str, metadata: dict) -> dict[str, str]:
    """Writes the label, taxonomy, config and metadata files into ``directory``.

    Local or remote (``gs://``). Returns ``{name: path}``.
    """
    files = {LABELS_ASSET: os.path.join(directory, LABELS_ASSET)}
    with tf.io.gfile.GFile(files[LABELS_ASSET], "w") as f:
        f.write("\n".join(trained.class_names) + "\n")
    if trained.taxonomy is not None:
        files[TAXONOMY_ASSET] = os.path.join(directory, TAXONOMY_ASSET)
        tf.io.gfile.copy(trained.taxonomy.source, files[TAXONOMY_ASSET], overwrite=True)
    files[CONFIG_ASSET] = os.path.join(directory, CONFIG_ASSET)
    with tf.io.gfile.GFile(files[CONFIG_ASSET], "w") as f:
        f.write(json.dumps(trained.config.to_dict(), indent=2) + "\n")
    files[METADATA_ASSET] = os.path.join(directory, METADATA_ASSET)
    with tf.io.gfile.GFile(files[METADATA_ASSET], "w") as f:
        f.write(json.dumps(metadata, indent=2) + "\n")
    return files


@dataclasses.dataclass(frozen=True)
class PreparedExport:
    """A checked export destination and the loaded model (:func:`prepare_export`)."""

    model_dir: str
    export_dir: str
    version: int
    final: str  # export_dir/<version>
    trained: rundir.TrainedModel
    temperature: float
    adapted_batchnorm: dict | None

    def staging(self) -> str:
        """A new hidden folder beside ``final`` (not an integer name: TF Serving ignores it)."""
        path = os.path.join(
            self.export_dir,
            f".tmp-{self.version}-{os.getpid()}-{datetime.datetime.now():%H%M%S%f}",
        )
        tf.io.gfile.makedirs(path)
        return path

    def commit(self, staging: str) -> None:
        """Renames the complete ``staging`` folder into place."""
        tf.io.gfile.rename(staging, self.final, overwrite=False)

    @staticmethod
    def abandon(staging: str) -> None:
        """Removes an incomplete ``staging`` folder."""
        if tf.io.gfile.exists(staging):
            tf.io.gfile.rmtree(staging)


def prepare_export(
    model_dir: str | os.PathLike,
    export_dir: str | os.PathLike,
    *,
    version: int | None = None,
    which: str = "best",
    apply_temperature: bool = False,
    adapt_bn: str | None = None,
    adapt_batch_size: int = 64,
    before_load: Callable[[], None] | None = None,
) -> PreparedExport:
    """Checks the destination and the flags, loads the model (adapted with ``adapt_bn``).

    Everything a bad flag can fail on fails here, before the slow part;
    ``before_load`` runs after these checks, before the model is loaded. See
    :func:`export_model` for the arguments and the errors.
    """
    model_dir = rundir.check_model_dir(model_dir)
    export_dir = os.fspath(export_dir)
    if not rundir.is_remote(export_dir):
        export_dir = os.path.abspath(os.path.expanduser(export_dir))
    if version is None:
        version = next_version(export_dir)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"--version={version!r}: must be a positive integer (TF Serving's layout)")
    final = os.path.join(export_dir, str(version))
    if tf.io.gfile.exists(final):
        raise FileExistsError(
            f"{final} already exists: choose another --version, or leave --version out to "
            f"write version {next_version(export_dir)}"
        )
    if apply_temperature:
        rundir.check_calibration(model_dir)
    adapt_bn = (adapt_bn or "").strip()
    if adapt_bn:
        from leukemia_tf.serving import predict_lib

        if adapt_bn == predict_lib.ADAPT_INPUTS:
            raise ValueError(
                f"--adapt_bn={adapt_bn}: an export has no inputs to adapt on; give a folder, "
                "glob or CSV of target-domain images"
            )
        adapt_paths = [i.path for i in predict_lib.collect_inputs(adapt_bn)[0] if not i.error]
    if before_load is not None:
        before_load()

    trained = rundir.load_trained_model(model_dir, which=which, float32=True)
    adapted_batchnorm = None
    if adapt_bn:
        from leukemia_tf.models import adapt

        # Everything after this (the graph, the verification) uses the adapted copy.
        trained, adapted_batchnorm = adapt.adapt_trained(
            trained, adapt_paths, batch_size=adapt_batch_size, source=adapt_bn
        )
    tf.io.gfile.makedirs(export_dir)
    return PreparedExport(
        model_dir=model_dir,
        export_dir=export_dir,
        version=version,
        final=final,
        trained=trained,
        temperature=trained.temperature if apply_temperature else 1.0,
        adapted_batchnorm=adapted_batchnorm,
    )


def _verify(
    path: str, trained: rundir.TrainedModel, images: Sequence[bytes], temperature: float
) -> float:
    """Reloads the export and compares it with the Keras model on ``images``.

    Returns:
      The largest absolute probability difference.

    Raises:
      ExportError: the difference exceeds :data:`VERIFY_TOLERANCE`.
    """
    from leukemia_tf.data import preprocessing

    loaded = tf.saved_model.load(path)
    served = loaded.signatures[signatures.SERVING_DEFAULT](
        image_bytes=tf.constant(list(images), tf.string)
    )
    pixels = np.stack(
        [preprocessing.decode_and_resize(b, trained.image_size).numpy() for b in images]
    )
    outputs = {
        k: tf.constant(v)
        for k, v in trained.outputs(pixels, features=trained.trust is not None).items()
    }
    expected = trained.label_space.probabilities(outputs, temperature).numpy()
    difference = float(np.max(np.abs(served[signatures.PROBABILITIES].numpy() - expected)))
    if not difference <= VERIFY_TOLERANCE:
        raise ExportError(
            f"the export in {path} disagrees with the Keras model by {difference:.2e} "
            f"(tolerance {VERIFY_TOLERANCE:g}) on the warmup images"
        )
    scores = trust_lib.trust_outputs(outputs, trained.label_space, trained.trust)
    for name in trust_lib.SCORES:
        if name not in scores:
            continue
        got, want = served[name].numpy(), scores[name].numpy()
        # A distance near 0 (a square root) moves more than the probabilities do.
        atol = VERIFY_TOLERANCE if name in trust_lib.LOGIT_SCORES else 1e-3
        if not np.allclose(got, want, rtol=1e-3, atol=atol):
            raise ExportError(
                f"the export in {path} disagrees with the Keras model on the trust score "
                f"{name!r} by up to {float(np.max(np.abs(got - want))):.3g} on the warmup images"
            )
    return difference


def _trust_metadata(stats: trust_lib.TrustStatistics | None) -> dict | None:
    """What ``assets/export.json`` says of the trust outputs."""
    if stats is None:
        return None
    return {
        "scores": {
            name: "higher is more trustworthy" if up else "lower is more trustworthy"
            for name, up in trust_lib.HIGHER_IS_TRUST.items()
        },
        "scores_temperature": 1.0,
        "fitted": stats.record.get("fitted"),
        "features": stats.record.get("features"),
        "knn_k": stats.knn_k,
        "selection": stats.selection,
        "backoff": stats.backoff,
    }


def export_model(
    model_dir: str | os.PathLike,
    export_dir: str | os.PathLike,
    *,
    version: int | None = None,
    which: str = "best",
    apply_temperature: bool = False,
    model_name: str = "leukemia",
    warmup_images: str | Sequence[str] | None = None,
    write_warmup: bool = True,
    verify: bool = True,
    adapt_bn: str | None = None,
    adapt_batch_size: int = 64,
) -> ExportResult:
    """Exports ``model_dir``'s model to ``export_dir/<version>/``.

    Args:
      model_dir: a finished training run (``leukemia_tf.train``'s output; local
        or ``gs://``).
      export_dir: TF Serving's model base path (local or ``gs://``).
      version: the version folder; default: one more than the largest there.
      which: ``"best"``, ``"last"`` or a ``.keras`` file.
      apply_temperature: divide the logits by the temperature stored in
        ``model_dir/calibration.json`` (by ``leukemia_tf.evaluate``).
      model_name: TF Serving ``--model_name`` put into the warmup requests.
      warmup_images: a glob, folder or file list of real images for the
        warmup requests; default: the model's validation split if its data are
        at hand, else generated images only.
      write_warmup: write ``assets.extra/tf_serving_warmup_requests``.
      verify: reload the export and check it reproduces the Keras model's
        probabilities on the warmup images (the adapted model's, with ``adapt_bn``).
      adapt_bn: a folder, glob or CSV of unlabelled target-domain images:
        export a copy whose BatchNorm statistics are re-estimated on them
        (AdaBN; the images are read as ``leukemia_tf.predict`` reads them),
        recorded in ``assets/export.json``. None or ``""``: the model as trained.
      adapt_batch_size: images per forward pass of the adaptation.

    Returns:
      An :class:`ExportResult`.

    Raises:
      FileNotFoundError: ``model_dir`` is not a trained model, or
        ``apply_temperature`` without a stored temperature.
      FileExistsError: ``export_dir/<version>`` exists.
      ValueError: a bad ``version``.
      ExportError: the reloaded export does not match the Keras model.
    """
    prepared = prepare_export(
        model_dir,
        export_dir,
        version=version,
        which=which,
        apply_temperature=apply_temperature,
        adapt_bn=adapt_bn,
        adapt_batch_size=adapt_batch_size,
        # Fail before the slow part.
        before_load=warmup.check_available if write_warmup else None,
    )
    model_dir, version = prepared.model_dir, prepared.version
    trained, temperature = prepared.trained, prepared.temperature
    adapted_batchnorm = prepared.adapted_batchnorm
    # Real images for the warmup requests and the check of the reloaded export.
    if warmup_images:
        real = warmup.read_image_files(warmup_images)
    elif write_warmup or verify:
        real = warmup.dataset_images(trained.config)
    else:
        real = []

    output_keys = signatures.output_keys(trained.label_space, trained.trust)
    if trained.ensemble is not None:
        logging.warning("%s: %s", model_dir, trust_lib.ENSEMBLE_HAS_NO_FEATURES)
    elif trained.trust is None:
        logging.warning(
            "%s has no trust statistics for %s: the export returns the logit scores only (no "
            "mahalanobis, knn_distance, referred, predicted_node); fit them first with %s",
            model_dir,
            which,
            trust_lib.fit_command(model_dir),
        )
    metadata = {
        "format_version": EXPORT_FORMAT_VERSION,
        "model_name": model_name,
        "version": version,
        "source_model_dir": model_dir,
        "checkpoint": which,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "dtype": "float32",
        "trained_precision": trained.config.precision,
        "backbone": trained.config.backbone,
        "head": trained.config.head,
        # A fold ensemble's record (its ensemble.json: folds, averaging), else None.
        "ensemble": trained.ensemble,
        "image_size": trained.image_size,
        "class_names": trained.class_names,
        "taxonomy_levels": [list(level) for level in trained.taxonomy.levels]
        if trained.taxonomy is not None and trained.config.head == "hierarchical"
        else None,
        "adapted_batchnorm": adapted_batchnorm,
        "trust": _trust_metadata(trained.trust),
        "temperature": temperature,
        "temperature_applied": bool(apply_temperature),
        "stored_temperature": trained.temperature,
        "preprocessing": "leukemia_tf.data.preprocessing.decode_and_resize "
        "(aspect kept, padded with the mean colour)",
        "signatures": {
            signatures.SERVING_DEFAULT: {
                "inputs": {signatures.IMAGE_BYTES: "string [N] encoded JPEG/PNG/BMP/GIF"},
                "outputs": output_keys,
            },
            signatures.PREDICT_PIXELS: {
                "inputs": {signatures.PIXELS: "float32 [N, H, W, 3] RGB 0-255"},
                "outputs": output_keys,
            },
        },
    }

    staging_version = prepared.staging()
    try:
        with tempfile.TemporaryDirectory(prefix="leukemia_export_assets_") as staging:
            module = signatures.ServingModule(
                trained.model,
                trained.label_space,
                trained.image_size,
                temperature,
                assets=write_assets(trained, staging, metadata),
                trust=trained.trust,
            )
            tf.saved_model.save(
                module,
                staging_version,
                signatures=module.signatures,
                # Serving needs no gradients; skipping them keeps the graph lean.
                options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
            )
        records = 0
        if write_warmup:
            requests = warmup.build_requests(trained.image_size, real, model_name=model_name)
            warmup.write_warmup_file(staging_version, requests)
            records = len(requests)
        difference = None
        if verify:
            check_images = list(real) + warmup.coverage_images(trained.image_size)
            difference = _verify(staging_version, trained, check_images, temperature)
        prepared.commit(staging_version)
    except BaseException:
        prepared.abandon(staging_version)
        raise
    logging.info("exported %s (%s) to %s", model_dir, which, prepared.final)
    return ExportResult(
        path=prepared.final,
        version=version,
        temperature=temperature,
        signatures={name: output_keys for name in signatures.SIGNATURES},
        warmup_records=records,
        max_abs_difference=difference,
        adapted_batchnorm=adapted_batchnorm,
    )
