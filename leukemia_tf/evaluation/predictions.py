"""Reading a split and running the model over it: what every report section reads.

:func:`check_split` checks a split cheaply (the label feature only) before
anything is computed; :func:`predict_split` runs the model over it once, in
pipeline order, with the same decode-and-resize as training and serving
(``pipeline.load_split``). :class:`EvaluatedSplit` bundles the model, the
split and its outputs for the sections of :mod:`leukemia_tf.evaluation.sections`.

Both the evaluated split and, for the temperature, the validation split are
read through here, so the sections and the entry point
(:mod:`leukemia_tf.evaluation.evaluate_lib`) import this module and it
imports neither.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from leukemia_tf import rundir
from leukemia_tf.data import names, pipeline
from leukemia_tf.evaluation import explain as explain_lib


class UnlabelledSplitError(ValueError):
    """The split holds examples without labels (e.g. the C-NMC final-phase test set)."""


@dataclasses.dataclass
class SplitPredictions:
    """The model's outputs and the labels and ids of one split, in pipeline order."""

    outputs: dict[str, np.ndarray]
    labels: np.ndarray
    levels: np.ndarray | None
    patient_id: np.ndarray
    slide_id: np.ndarray
    source: np.ndarray
    file_name: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------ checks
def flag_split_names(split: str) -> list[str]:
    """Base split names of ``split`` (:func:`names.split_names`), worded for ``--split``.

    Args:
      split: a TFDS split expression (``"train[:10%]+validation"``).

    Returns:
      Its base split names (``["train", "validation"]``).

    Raises:
      ValueError: ``split`` is not a TFDS split expression.
    """
    try:
        return names.split_names(split)
    except ValueError:
        # The evaluation's own wording: the value is its --split flag, and 'test' the example.
        raise ValueError(
            f"--split={split!r} is not a TFDS split expression (e.g. 'test')"
        ) from None


def check_split(
    specs: Sequence[names.DataSpec], split: str, data_dir: str | None
) -> dict[str, int]:
    """Checks that ``split`` exists and is labelled in every data set of ``specs``.

    Only the label feature is read (no image decoding).

    Returns:
      ``{data set name: number of examples}``.

    Raises:
      ValueError: a split name the data set lacks (naming the available ones).
      UnlabelledSplitError: the split holds examples with label -1.
      names.DatasetNotBuiltError: a data set is not built in ``data_dir``.
    """
    sizes = {}
    for spec in specs:
        builder = names.get_builder(spec.name, data_dir)
        available = sorted(builder.info.splits.keys())
        for name in flag_split_names(split):
            if name not in available:
                raise ValueError(
                    f"--split={split!r}: data set {spec.name!r} has no split {name!r}; "
                    f"available: {', '.join(available)}"
                )
        resolved = pipeline.resolve_split(specs, split)
        if resolved.keys is not None:  # a fold split: count its keys only
            labels = pipeline.read_split_metadata(spec, builder, resolved)["label"]
            total, unlabelled = len(labels), int((labels < 0).sum())
        else:
            ds = builder.as_dataset(
                split=split,
                decoders=tfds.decode.PartialDecoding({"label": True}),
                read_config=tfds.ReadConfig(try_autocache=False),
            )
            total = unlabelled = 0
            for batch in ds.batch(8192).as_numpy_iterator():
                total += len(batch["label"])
                unlabelled += int((batch["label"] < 0).sum())
        if unlabelled:
            raise UnlabelledSplitError(
                f"--split={split!r} of data set {spec.name!r} holds {unlabelled} of {total} "
                "examples without a label (label -1; e.g. the C-NMC 2019 final-phase test set, "
                "released without labels), so it cannot be scored. Evaluate a labelled split "
                f"(available: {', '.join(available)}), or run python -m leukemia_tf.predict on "
                "these images."
            )
        if total == 0:
            raise ValueError(f"--split={split!r} of data set {spec.name!r} is empty")
        sizes[spec.name] = total
    return sizes


# --------------------------------------------------------------- prediction
def predict_split(
    trained: rundir.TrainedModel,
    specs: Sequence[names.DataSpec],
    split: str,
    data_dir: str | None,
    batch_size: int,
    sampler: explain_lib.ExampleSampler | None = None,
    features: bool = False,
) -> SplitPredictions:
    """Runs the model over one split (one deterministic pass, no cache).

    Args:
      trained: the loaded model.
      specs: the data sets (the model's training mixture).
      split: the TFDS split.
      data_dir: TFDS data directory.
      batch_size: inference batch size.
      sampler: offered every batch (images kept for explanations).
      features: also keep the pooled backbone features (``outputs["features"]``).

    Returns:
      The split's outputs, labels and ids.
    """
    config = trained.config
    ds = pipeline.load_split(
        specs,
        split,
        data_dir=data_dir,
        image_size=config.image_size,
        batch_size=batch_size,
        training=False,
        label_mode=config.label_mode,
        taxonomy=trained.taxonomy,
        cache=False,
        deterministic=True,
    )
    size = config.image_size

    # One trace for every batch size (the last batch is smaller).
    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
    def forward(images):
        return trained.forward(tf.cast(images, tf.float32), features=features)

    outputs: dict[str, list[np.ndarray]] = {}
    columns: dict[str, list[np.ndarray]] = {
        key: [] for key in ("label", "levels", *pipeline.STRING_FEATURES)
    }
    for batch in ds.as_numpy_iterator():
        out = {k: v.numpy() for k, v in forward(batch["image"]).items()}
        for key, value in out.items():
            outputs.setdefault(key, []).append(value)
        for key in columns:
            if key in batch:
                columns[key].append(batch[key])
        if sampler is not None:
            probs = trained.label_space.probabilities(out).numpy()
            sampler.offer(
                batch["image"], batch["label"], probs.argmax(axis=1), probs, batch["file_name"]
            )
    if not outputs:
        raise ValueError(f"--split={split!r} yielded no examples (all labels mapped to null?)")

    def strings(key: str) -> np.ndarray:
        return np.array([v.decode("utf-8") for v in np.concatenate(columns[key])], dtype=object)

    return SplitPredictions(
        outputs={k: np.concatenate(v) for k, v in outputs.items()},
        labels=np.concatenate(columns["label"]).astype(np.int64),
        levels=np.concatenate(columns["levels"]).astype(np.int64) if columns["levels"] else None,
        patient_id=strings("patient_id"),
        slide_id=strings("slide_id"),
        source=strings("source"),
        file_name=strings("file_name"),
    )


@dataclasses.dataclass(frozen=True)
class EvaluatedSplit:
    """The model, the evaluated split and the model's outputs on it: what every section reads.

    Attributes:
      trained: the loaded model.
      specs: the data sets (the model's training mixture).
      data_dir: the TFDS data directory read (the option's, else the model's).
      sizes: ``{data set name: examples in the split}`` (:func:`check_split`).
      predictions: the model's outputs, labels and ids on the split.
      probs: ``[N, C]`` class probabilities at temperature 1.
      y_pred: ``[N]`` decisions, the argmax of ``probs``.
      sampler: the examples kept for explanations.
    """

    trained: rundir.TrainedModel
    specs: list[names.DataSpec]
    data_dir: str | None
    sizes: dict[str, int]
    predictions: SplitPredictions
    probs: np.ndarray
    y_pred: np.ndarray
    sampler: explain_lib.ExampleSampler

    @property
    def y_true(self) -> np.ndarray:
        """``[N]`` true classes."""
        return self.predictions.labels

    @property
    def class_names(self) -> list[str]:
        """The model's ``C`` class names."""
        return self.trained.class_names
