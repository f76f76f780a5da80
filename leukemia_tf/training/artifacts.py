"""Reading back what a training run wrote into its ``model_dir``.

A model_dir holds ``config.json`` (the resolved :class:`TrainConfig`),
``labels.txt`` (the class names, one per line), ``best.keras`` and
``last.keras``, and, after ``leukemia_tf.evaluate``, ``calibration.json``
(``{"temperature": T}`` fitted on the validation split).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

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

    model_dir: Path
    config: TrainConfig
    model: keras.Model
    label_space: LabelSpace
    taxonomy: Taxonomy | None
    temperature: float

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
            chunks.append({k: v.numpy() for k, v in self.model(batch, training=False).items()})
        if not chunks:
            raise ValueError("no images given")
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def probabilities(self, outputs: dict, calibrated: bool = False) -> np.ndarray:
        """Class probabilities ``[N, C]`` from :meth:`outputs` (optionally temperature-scaled)."""
        temperature = self.temperature if calibrated else 1.0
        return self.label_space.probabilities(outputs, temperature).numpy()


def read_temperature(model_dir: str | os.PathLike) -> float:
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return 1.0
    return float(json.loads(path.read_text())["temperature"])


def write_temperature(model_dir: str | os.PathLike, temperature: float, **extra) -> None:
    path = Path(model_dir) / CALIBRATION_FILE
    path.write_text(json.dumps({"temperature": float(temperature), **extra}, indent=2) + "\n")


def load_trained_model(
    model_dir: str | os.PathLike, which: str = "best", float32: bool = True
) -> TrainedModel:
    """Loads a trained model from ``model_dir``.

    Args:
      model_dir: the training run's output directory.
      which: ``"best"`` or ``"last"``, or a path to a ``.keras`` file.
      float32: rebuild the model under the float32 policy (whatever precision
        it was trained in) and copy the weights: what evaluation and export use.

    Raises:
      FileNotFoundError: ``model_dir`` is not a finished or checkpointed run.
    """
    model_dir = Path(os.path.expanduser(str(model_dir)))
    config = TrainConfig.load(model_dir)
    path = Path(which) if which.endswith(".keras") else model_dir / f"{which}.keras"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: train first (python -m leukemia_tf.train --model_dir={model_dir})"
        )
    labels_path = model_dir / LABELS_FILE
    if not labels_path.is_file():
        raise FileNotFoundError(f"{labels_path} not found: is {model_dir} a leukemia_tf model_dir?")
    class_names = [line for line in labels_path.read_text().splitlines() if line]
    taxonomy = model_factory.taxonomy_for(config)
    loaded = keras.models.load_model(path)
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
    )
