"""Reading back what a training run wrote into its ``model_dir``.

A model_dir holds ``config.json`` (the resolved :class:`TrainConfig`),
``labels.txt`` (the class names, one per line), ``best.keras`` and
``last.keras``, and, after ``leukemia_tf.evaluate``, ``calibration.json``
(``{"temperature": T}`` fitted on the validation split).

The model_dir may be local or remote (``gs://``; TF's ``ram://`` in the
tests): everything here reads and writes it through ``tf.io.gfile`` and joins
paths as strings (:func:`join`), never with pathlib, which mangles URLs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from leukemia_tf.models.label_space import LabelSpace
from leukemia_tf.taxonomy import Taxonomy
from leukemia_tf.training import model_factory
from leukemia_tf.training.config import TrainConfig

CALIBRATION_FILE = "calibration.json"
LABELS_FILE = "labels.txt"


@dataclasses.dataclass
class TrainedModel:
    """A trained model with everything needed to read its predictions."""

    model_dir: str  # local path or URL (gs://)
    config: TrainConfig
    model: keras.Model
    label_space: LabelSpace
    taxonomy: Taxonomy | None
    temperature: float
    #: Test-time augmentation: average the logits over the 8 symmetries of the
    #: square (:func:`d4_views`). A blood cell has no orientation, so every
    #: view is as valid as the original; it costs 8x the inference time.
    tta: bool = False

    @property
    def class_names(self) -> list[str]:
        return self.label_space.class_names

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def outputs(self, images, batch_size: int = 64) -> dict:
        """The model's raw outputs (numpy dict) for uint8/float ``[N, S, S, 3]`` images."""
        images = np.asarray(images)
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = tf.cast(images[start : start + batch_size], tf.float32)
            chunks.append({k: v.numpy() for k, v in self.forward(batch).items()})
        if not chunks:
            raise ValueError("no images given")
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def forward(self, pixels: tf.Tensor) -> dict:
        """The model's outputs for float ``[B, S, S, 3]`` pixels (0-255), with TTA if set.

        With :attr:`tta`, every output (the flat logits, or each level's
        logits) is the mean over the 8 views of the same batch, run as one
        ``[8B, S, S, 3]`` batch.
        """
        if not self.tta:
            return self.model(pixels, training=False)
        views = d4_views(pixels)
        batch = tf.shape(pixels)[0]
        outputs = self.model(tf.concat(views, axis=0), training=False)
        return {
            k: tf.reduce_mean(
                tf.reshape(v, tf.concat([[len(views), batch], tf.shape(v)[1:]], 0)), 0
            )
            for k, v in outputs.items()
        }

    def probabilities(self, outputs: dict, calibrated: bool = False) -> np.ndarray:
        """Class probabilities ``[N, C]`` from :meth:`outputs` (optionally temperature-scaled)."""
        temperature = self.temperature if calibrated else 1.0
        return self.label_space.probabilities(outputs, temperature).numpy()


def d4_views(images: tf.Tensor) -> list[tf.Tensor]:
    """The 8 symmetries of the square (4 rotations, each also mirrored) of ``[B, S, S, C]``."""
    views = []
    for flipped in (images, tf.reverse(images, axis=[2])):
        for k in range(4):
            views.append(tf.image.rot90(flipped, k=k))
    return views


# ------------------------------------------------------- paths (local or remote)
def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL such as ``gs://bucket/run`` (or TF's in-process ``ram://``)."""
    return "://" in os.fspath(path)


def join(model_dir: str | os.PathLike, *names: str) -> str:
    """``model_dir/name``: a plain string join for a URL, which pathlib would mangle."""
    model_dir = os.fspath(model_dir)
    if is_remote(model_dir):
        return "/".join([model_dir.rstrip("/"), *names])
    return os.path.join(model_dir, *names)


def basename(path: str | os.PathLike) -> str:
    """The last component of a local path or a URL (``gs://b/runs/x/`` -> ``x``)."""
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def check_model_dir(model_dir: str | os.PathLike) -> str:
    """``model_dir`` as a string (``~`` expanded when local), if it exists.

    Local or remote (``gs://``): read through ``tf.io.gfile``.

    Raises:
      FileNotFoundError: naming ``--model_dir=...`` when it does not exist.
    """
    given = os.fspath(model_dir)
    path = given if is_remote(given) else os.path.expanduser(given)
    if not tf.io.gfile.isdir(path):
        raise FileNotFoundError(f"--model_dir={given!r} does not exist")
    return path


def calibration_path(model_dir: str | os.PathLike) -> str:
    """Where :func:`write_temperature` stores the fitted temperature."""
    return join(model_dir, CALIBRATION_FILE)


def check_calibration(model_dir: str | os.PathLike) -> str:
    """The calibration file's path, for ``--apply_temperature``.

    Raises:
      FileNotFoundError: no temperature fitted yet (``leukemia_tf.evaluate`` fits it).
    """
    path = calibration_path(model_dir)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"--apply_temperature: {path} not found; fit a temperature first "
            f"(python -m leukemia_tf.evaluate --model_dir={os.fspath(model_dir)}) or leave "
            "--apply_temperature out"
        )
    return path


def _remove(path: str) -> None:
    if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


def write_text(path: str, text: str) -> None:
    """Writes ``text`` to a local or remote file, replacing it."""
    _remove(path)  # TF's ram:// appends on "w"
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)


def read_text(path: str) -> str:
    with tf.io.gfile.GFile(path) as f:
        return f.read()


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies the files below ``src`` into ``dst`` (either local or remote).

    Files already in ``dst`` are replaced; others there are kept.

    Returns:
      The destination paths of the copied files.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    copied = []
    for folder, _, files in tf.io.gfile.walk(src):
        # walk() yields folders as ``src`` + the relative part.
        parts = [p for p in folder[len(src) :].replace(os.sep, "/").split("/") if p]
        target = join(dst, *parts)
        tf.io.gfile.makedirs(target)
        for name in files:
            out = join(target, name)
            _remove(out)  # TF's ram:// appends to an existing file
            tf.io.gfile.copy(join(folder, name), out, overwrite=True)
            copied.append(out)
    return copied


# ------------------------------------------------------------- reading back
def read_temperature(model_dir: str | os.PathLike) -> float:
    path = calibration_path(model_dir)
    if not tf.io.gfile.exists(path):
        return 1.0
    return float(json.loads(read_text(path))["temperature"])


def write_temperature(model_dir: str | os.PathLike, temperature: float, **extra) -> None:
    text = json.dumps({"temperature": float(temperature), **extra}, indent=2) + "\n"
    write_text(calibration_path(model_dir), text)


def _load_keras(path: str) -> keras.Model:
    if not is_remote(path):
        return keras.models.load_model(path)
    # Keras reads local files: fetch a remote one into a temporary folder first.
    with tempfile.TemporaryDirectory(prefix="leukemia_tf_model_") as tmp:
        local = os.path.join(tmp, basename(path))
        tf.io.gfile.copy(path, local, overwrite=True)
        return keras.models.load_model(local)


def load_trained_model(
    model_dir: str | os.PathLike, which: str = "best", float32: bool = True, tta: bool = False
) -> TrainedModel:
    """Loads a trained model from ``model_dir``.

    Args:
      model_dir: the training run's output directory (local or ``gs://``).
      which: ``"best"`` or ``"last"``, or a path to a ``.keras`` file.
      float32: rebuild the model under the float32 policy (whatever precision
        it was trained in) and copy the weights: what evaluation and export use.
      tta: predict with test-time augmentation (:attr:`TrainedModel.tta`).

    Raises:
      FileNotFoundError: ``model_dir`` is not a finished or checkpointed run.
    """
    model_dir = check_model_dir(model_dir)
    config = TrainConfig.load(model_dir)
    which = os.fspath(which)
    path = which if which.endswith(".keras") else join(model_dir, f"{which}.keras")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"{path} not found: train first (python -m leukemia_tf.train --model_dir={model_dir})"
        )
    labels_path = join(model_dir, LABELS_FILE)
    if not tf.io.gfile.exists(labels_path):
        raise FileNotFoundError(f"{labels_path} not found: is {model_dir} a leukemia_tf model_dir?")
    class_names = [line for line in read_text(labels_path).splitlines() if line]
    taxonomy = model_factory.taxonomy_for(config)
    loaded = _load_keras(path)
    model = loaded
    if float32:
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy("float32")
        try:
            model = model_factory.build_model(config, len(class_names), taxonomy, weights="none")
            model.set_weights(loaded.get_weights())
        finally:
            keras.mixed_precision.set_global_policy(previous)
    return TrainedModel(
        model_dir=model_dir,
        config=config,
        model=model,
        label_space=LabelSpace(class_names, config.head, taxonomy),
        taxonomy=taxonomy,
        temperature=read_temperature(model_dir),
        tta=tta,
    )
