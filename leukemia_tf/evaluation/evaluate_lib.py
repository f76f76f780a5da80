"""Evaluates a trained model on one split: metrics.json, report.md and figures.

The library side of ``python -m leukemia_tf.evaluate``. One pass over the
split computes the model's outputs (the same decode-and-resize as training
and serving, via ``pipeline.load_split``); everything else is computed from
those outputs:

* cell-level metrics with bootstrap confidence intervals (resampling whole
  patients, else slides, else cells: whichever the data identify);
* calibration: a temperature fitted on the validation split (stored with the
  model in ``calibration.json`` when the ``best`` checkpoint is evaluated),
  and ECE / NLL before and after on the evaluated split;
* per taxonomy level (models over taxonomy nodes), with the path-consistency
  check;
* slide and patient level (mean probability and majority vote) wherever the
  split carries those ids;
* Grad-CAM or attention-rollout figures for a sample of correct and wrong
  predictions per class.

Decisions (accuracy, confusion matrices, aggregation) use the probabilities
as trained (temperature 1): the model that was selected on validation. The
temperature changes calibration figures; for a hierarchical head it can also
change a few argmax decisions, and how many is reported.

Structure: :func:`evaluate` checks its arguments once into an
:class:`EvalOptions` and loads the model (the one check of ``model_dir``);
:func:`_evaluate` then runs the model over the split once
(:class:`EvaluatedSplit`) and builds ``metrics.json`` from one function per
section (``_cell_section``, ``_calibration_section``, ``_levels_section``,
``_group_sections``, ``_figures``, ``_explanations``, ``_model_section``,
``_data_section``) before ``_write`` writes it and the report. The prose of
the report, caveats included, is worded in :mod:`leukemia_tf.evaluation.report`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from leukemia_tf import rundir
from leukemia_tf.data import pipeline
from leukemia_tf.evaluation import aggregate as aggregate_lib
from leukemia_tf.evaluation import calibration as calibration_lib
from leukemia_tf.evaluation import explain as explain_lib
from leukemia_tf.evaluation import figures as figures_lib
from leukemia_tf.evaluation import levels as levels_lib
from leukemia_tf.evaluation import metrics as metrics_lib
from leukemia_tf.evaluation import report as report_lib
from leukemia_tf.models.heads import level_key

#: Files an evaluation writes into its output directory.
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"

#: Default number of explained examples per (class, correct / wrong).
DEFAULT_EXPLAIN_SAMPLES = 3

#: Group levels scored when the split carries their ids: (key, feature).
GROUP_LEVELS = (("slide", "slide_id"), ("patient", "patient_id"))


class UnlabelledSplitError(ValueError):
    """The split holds examples without labels (e.g. the C-NMC final-phase test set)."""


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """How to evaluate: :func:`evaluate`'s arguments (the binary's flags), checked once.

    Where (``model_dir``, ``out_dir``) is not an option: the sections read the
    loaded model and write into a local folder.

    Attributes:
      split: the TFDS split to evaluate.
      data_dir: TFDS data directory; ``None``: the one the model was trained with.
      bootstrap: bootstrap replicates of the confidence intervals (0: none).
      seed: seed of the bootstrap and of the explained-example sample.
      explain_samples: explained examples per class and per correct / wrong.
      batch_size: inference batch size.
      which: checkpoint, ``"best"`` or ``"last"`` (or a ``.keras`` path).
      fit_temperature: fit the temperature on the validation split.
      tta: test-time augmentation (8 views).

    Raises:
      ValueError: ``bootstrap`` or ``explain_samples`` below 0, ``batch_size`` below 1.
    """

    split: str = "test"
    data_dir: str | None = None
    bootstrap: int = 1000
    seed: int = 0
    explain_samples: int = DEFAULT_EXPLAIN_SAMPLES
    batch_size: int = 64
    which: str = "best"
    fit_temperature: bool = True
    tta: bool = False

    def __post_init__(self):
        if self.bootstrap < 0:
            raise ValueError(f"--bootstrap={self.bootstrap} must be >= 0")
        if self.explain_samples < 0:
            raise ValueError(f"--explain_samples={self.explain_samples} must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")


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
def _split_names(split: str) -> list[str]:
    """Base split names of a TFDS split expression (``"train[:10%]+validation"``)."""
    names = [part.split("[")[0].strip() for part in split.split("+")]
    if not split.strip() or not all(names):
        raise ValueError(f"--split={split!r} is not a TFDS split expression (e.g. 'test')")
    return names


def check_split(
    specs: Sequence[pipeline.DataSpec], split: str, data_dir: str | None
) -> dict[str, int]:
    """Checks that ``split`` exists and is labelled in every data set of ``specs``.

    Only the label feature is read (no image decoding).

    Returns:
      ``{data set name: number of examples}``.

    Raises:
      ValueError: a split name the data set lacks (naming the available ones).
      UnlabelledSplitError: the split holds examples with label -1.
      pipeline.DatasetNotBuiltError: a data set is not built in ``data_dir``.
    """
    sizes = {}
    for spec in specs:
        builder = pipeline.get_builder(spec.name, data_dir)
        available = sorted(builder.info.splits.keys())
        for name in _split_names(split):
            if name not in available:
                raise ValueError(
                    f"--split={split!r}: data set {spec.name!r} has no split {name!r}; "
                    f"available: {', '.join(available)}"
                )
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
    specs: Sequence[pipeline.DataSpec],
    split: str,
    data_dir: str | None,
    batch_size: int,
    sampler: explain_lib.ExampleSampler | None = None,
) -> SplitPredictions:
    """Runs the model over one split (one deterministic pass, no cache).

    Args:
      trained: the loaded model.
      specs: the data sets (the model's training mixture).
      split: the TFDS split.
      data_dir: TFDS data directory.
      batch_size: inference batch size.
      sampler: offered every batch (images kept for explanations).

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
        return trained.forward(tf.cast(images, tf.float32))

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


# ------------------------------------------------------------ the evaluated
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
    specs: list[pipeline.DataSpec]
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


def _check_data(
    trained: rundir.TrainedModel, options: EvalOptions
) -> tuple[list[pipeline.DataSpec], str | None, dict[str, int]]:
    """The model's data sets, the data directory and the split's sizes, checked.

    Raises:
      ValueError: see :func:`check_split`; or data whose classes differ from the model's.
    """
    config = trained.config
    data_dir = options.data_dir or config.data_dir or None
    specs = pipeline.parse_datasets(config.datasets)
    sizes = check_split(specs, options.split, data_dir)
    data_classes = pipeline.dataset_class_names(
        specs, data_dir, config.label_mode, trained.taxonomy
    )
    class_names = trained.class_names
    if list(data_classes) != list(class_names):
        raise ValueError(
            f"the data ({config.datasets} in {data_dir or 'the TFDS default data_dir'}) have "
            f"classes {data_classes}, but the model in {trained.model_dir} predicts {class_names} "
            f"({rundir.join(trained.model_dir, rundir.LABELS_FILE)}): evaluate it on the "
            "data it was trained for"
        )
    return specs, data_dir, sizes


def _predictions(
    trained: rundir.TrainedModel,
    options: EvalOptions,
    specs: list[pipeline.DataSpec],
    data_dir: str | None,
    sizes: dict[str, int],
) -> EvaluatedSplit:
    """Runs the model over the split, keeping a sample of examples to explain."""
    sampler = explain_lib.ExampleSampler(
        len(trained.class_names), options.explain_samples, seed=options.seed
    )
    predictions = predict_split(
        trained, specs, options.split, data_dir, options.batch_size, sampler
    )
    probs = trained.label_space.probabilities(predictions.outputs, 1.0).numpy()
    return EvaluatedSplit(
        trained=trained,
        specs=specs,
        data_dir=data_dir,
        sizes=sizes,
        predictions=predictions,
        probs=probs,
        y_pred=probs.argmax(axis=1),
        sampler=sampler,
    )


# ---------------------------------------------------------------- cell level
def _clusters(predictions: SplitPredictions) -> tuple[np.ndarray | None, str]:
    """Bootstrap units of the cells: patients, else slides, else the cells themselves."""
    for name, ids in (("patient", predictions.patient_id), ("slide", predictions.slide_id)):
        if (ids != "").any():
            # A cell without an id is its own unit.
            units = np.array([i if i else f"\x00cell{k}" for k, i in enumerate(ids)], dtype=object)
            text = report_lib.resampled_groups(
                name, len(set(ids[ids != ""])), n_single=int((ids == "").sum())
            )
            return units, text
    return None, report_lib.resampled_cells(len(predictions))


def _cell_section(options: EvalOptions, ev: EvaluatedSplit) -> dict:
    """Cell-level scores (:func:`metrics.classification_metrics`) with bootstrap intervals.

    Returns:
      The ``cell`` section; ``cell["ci"]["unit"]`` says what was resampled.
    """
    cell = metrics_lib.classification_metrics(ev.y_true, ev.y_pred, ev.probs, ev.class_names)
    units, unit_text = _clusters(ev.predictions)
    cell["ci"] = metrics_lib.bootstrap_ci(
        ev.y_true,
        ev.y_pred,
        ev.probs,
        len(ev.class_names),
        clusters=units,
        n_resamples=options.bootstrap,
        seed=options.seed,
    )
    cell["ci"]["unit"] = unit_text
    return cell


# -------------------------------------------------------------- calibration
def _fit_temperature(
    trained: rundir.TrainedModel, predictions: SplitPredictions
) -> tuple[float, float, float]:
    """Fits T on ``predictions``; returns ``(T, nll at T=1, nll at T)``."""
    outputs = {k: tf.constant(v) for k, v in predictions.outputs.items()}
    labels = predictions.labels

    def nll(temperature: float) -> float:
        probs = trained.label_space.probabilities(outputs, temperature).numpy()
        return calibration_lib.negative_log_likelihood(probs, labels)

    temperature = calibration_lib.fit_temperature(nll)
    return temperature, nll(1.0), nll(temperature)


def _temperature(options: EvalOptions, ev: EvaluatedSplit) -> tuple[float, dict, list[str]]:
    """The temperature of the calibrated figures: fitted on the validation split, or stored.

    With ``options.fit_temperature`` it is fitted on the model's validation
    split and written to ``calibration.json`` when that is safe: the ``best``
    checkpoint, single view, held-out validation data. Otherwise (or when the
    validation split cannot be read) the stored temperature is used.

    Returns:
      ``(T, fields, notes)``: ``fields`` for the calibration section
      (``fitted_on``, ``stored``, and after a fit ``n_fit`` and the validation
      NLL before and after), ``notes`` for the caveats.
    """
    trained = ev.trained
    fields: dict = {"fitted_on": None, "stored": False}
    if not options.fit_temperature:
        return (
            trained.temperature,
            fields,
            [report_lib.temperature_not_refitted(trained.temperature)],
        )
    val_split = trained.config.val_split or "validation"
    try:
        check_split(ev.specs, val_split, ev.data_dir)
        validation = (
            ev.predictions
            if val_split == options.split
            else predict_split(trained, ev.specs, val_split, ev.data_dir, options.batch_size)
        )
    except (ValueError, FileNotFoundError) as e:
        return trained.temperature, fields, [report_lib.temperature_unusable(val_split, e)]

    notes = []
    temperature, nll_before, nll_after = _fit_temperature(trained, validation)
    low, high = calibration_lib.T_RANGE
    if not low * 1.01 < temperature < high / 1.01:
        notes.append(report_lib.temperature_at_edge(temperature, low, high))
    fields.update(
        fitted_on=val_split,
        n_fit=len(validation),
        validation_nll_before=nll_before,
        validation_nll_after=nll_after,
    )
    if val_split == options.split:
        notes.append(report_lib.temperature_fitted_on_evaluated(options.split))
    # Stored only where export serves it: the best checkpoint, single view, fitted on held-out data.
    if _split_names(val_split)[0] in _split_names(trained.config.train_split):
        notes.append(
            report_lib.temperature_fitted_on_training(val_split, trained.config.train_split)
        )
    elif trained.tta:
        notes.append(report_lib.TEMPERATURE_TTA_NOT_STORED)
    elif options.which == "best":
        rundir.write_temperature(
            trained.model_dir,
            temperature,
            fitted_on=val_split,
            n=len(validation),
            nll_before=nll_before,
            nll_after=nll_after,
            checkpoint=options.which,
        )
        fields["stored"] = True
    else:
        notes.append(report_lib.temperature_checkpoint_not_stored(options.which))
    return temperature, fields, notes


def _calibration_section(options: EvalOptions, ev: EvaluatedSplit) -> tuple[dict, list[str]]:
    """ECE, NLL and reliability bins before and after temperature scaling.

    Returns:
      ``(section, notes)``: the ``calibration`` section and notes for the caveats.
    """
    temperature, fields, notes = _temperature(options, ev)
    labels = ev.y_true
    raw = ev.probs
    scaled = ev.trained.label_space.probabilities(ev.predictions.outputs, temperature).numpy()
    section = {
        "binning": report_lib.calibration_binning(calibration_lib.DEFAULT_BINS),
        **fields,
        "temperature": float(temperature),
        "ece_before": calibration_lib.expected_calibration_error(raw, labels),
        "ece_after": calibration_lib.expected_calibration_error(scaled, labels),
        "nll_before": calibration_lib.negative_log_likelihood(raw, labels),
        "nll_after": calibration_lib.negative_log_likelihood(scaled, labels),
        "reliability_before": calibration_lib.reliability_bins(raw, labels),
        "reliability_after": calibration_lib.reliability_bins(scaled, labels),
        "decisions_changed": int((raw.argmax(axis=1) != scaled.argmax(axis=1)).sum()),
    }
    return section, notes


# ----------------------------------------------------------- taxonomy levels
def _levels_section(ev: EvaluatedSplit) -> dict | None:
    """Scores per taxonomy level (:func:`levels.evaluate_levels`); ``None`` without a taxonomy."""
    trained = ev.trained
    if trained.taxonomy is None or ev.predictions.levels is None:
        return None
    hierarchical = trained.config.head == "hierarchical"
    if hierarchical:
        level_probs_dict = trained.label_space.level_probabilities(ev.predictions.outputs)
        level_probs = [
            level_probs_dict[level_key(k)].numpy() for k in range(trained.taxonomy.num_levels)
        ]
    else:
        level_probs = levels_lib.flat_level_probabilities(
            ev.probs, ev.class_names, trained.taxonomy
        )
    section = levels_lib.evaluate_levels(
        level_probs,
        ev.predictions.levels,
        ev.y_pred,
        ev.class_names,
        trained.taxonomy,
        check_marginal_sums=hierarchical,
    )
    section["marginals"] = report_lib.level_marginals(hierarchical)
    return section


# ------------------------------------------------------ slides and patients
def _group_rows(result: dict, class_names: Sequence[str]) -> list[dict]:
    """One row per group of :func:`aggregate.aggregate`'s ``result``."""
    return [
        {
            "id": gid,
            "n_cells": int(result["n_cells"][g]),
            "label": class_names[int(result["label"][g])] if "label" in result else None,
            "mean_prediction": class_names[int(result["mean_prediction"][g])],
            "mean_probability": float(result["mean_probs"][g, result["mean_prediction"][g]]),
            "majority_prediction": class_names[int(result["majority_prediction"][g])],
            "votes": int(result["vote_counts"][g, result["majority_prediction"][g]]),
            "mean_probs": result["mean_probs"][g].tolist(),
            "vote_counts": result["vote_counts"][g].tolist(),
        }
        for g, gid in enumerate(result["group_ids"])
    ]


def _group_units(
    key: str, ids: np.ndarray, patient_ids: np.ndarray, group_ids: Sequence[str]
) -> tuple[np.ndarray | None, str]:
    """Bootstrap units of the groups: a slide's patient where every slide has one, else the group.

    Args:
      key: ``"slide"`` or ``"patient"``.
      ids: ``[N]`` the group id of each cell (cells with an id only).
      patient_ids: ``[N]`` the patient id of each cell.
      group_ids: the groups, in the aggregate's order.

    Returns:
      ``(clusters, unit)``: ``[G]`` cluster ids for :func:`metrics.bootstrap_ci`
      (``None``: resample groups) and the unit's description.
    """
    if key == "slide":
        # Slides of one patient are resampled together.
        patient_of: dict[str, set] = {}
        for s, p in zip(ids, patient_ids, strict=True):
            patient_of.setdefault(s, set()).add(p)
        if all(len(v) == 1 and "" not in v for v in patient_of.values()):
            clusters = np.array([next(iter(patient_of[g])) for g in group_ids])
            return clusters, report_lib.resampled_groups("patient", len(set(clusters)))
    return None, f"{key}s"


def _group_scores(
    options: EvalOptions,
    result: dict,
    class_names: Sequence[str],
    clusters: np.ndarray | None,
    unit: str,
) -> dict[str, dict]:
    """Scores and bootstrap intervals of each aggregation method (labelled groups)."""
    scores_of = {}
    for method, pred_key in aggregate_lib.METHODS.items():
        scores = result["mean_probs"] if method == "mean_probability" else None
        scored = metrics_lib.classification_metrics(
            result["label"], result[pred_key], scores, class_names
        )
        scored["ci"] = metrics_lib.bootstrap_ci(
            result["label"],
            result[pred_key],
            scores,
            len(class_names),
            clusters=clusters,
            n_resamples=options.bootstrap,
            seed=options.seed,
        )
        scored["ci"]["unit"] = unit
        scores_of[method] = scored
    return scores_of


def _group_section(options: EvalOptions, ev: EvaluatedSplit, key: str, feature: str) -> dict:
    """The slide or patient section: each group's pooled prediction and, if labelled, the scores.

    Args:
      options: the evaluation's options.
      ev: the evaluated split.
      key: ``"slide"`` or ``"patient"``.
      feature: the id feature (``"slide_id"``, ``"patient_id"``).

    Returns:
      ``{"available": False, "reason"}`` without ids; else ``available``,
      ``n_cells_without_id``, ``labelled`` (``reason`` when not),
      ``n_groups``, ``groups`` and, when labelled, ``methods``.
    """
    ids = getattr(ev.predictions, feature)
    has = ids != ""
    if not has.any():
        return {"available": False, "reason": report_lib.no_group_ids(feature)}
    section: dict = {
        "available": True,
        "n_cells_without_id": int((~has).sum()),
        "labelled": True,
    }
    try:
        result = aggregate_lib.aggregate(ids[has], ev.probs[has], ev.y_true[has])
    except ValueError as e:
        # E.g. cell-type labels: one patient's cells carry several labels.
        result = aggregate_lib.aggregate(ids[has], ev.probs[has])
        section["labelled"] = False
        section["reason"] = str(e)
    section["n_groups"] = len(result["group_ids"])
    section["groups"] = _group_rows(result, ev.class_names)
    if "label" in result:
        clusters, unit = _group_units(
            key, ids[has], ev.predictions.patient_id[has], result["group_ids"]
        )
        section["methods"] = _group_scores(options, result, ev.class_names, clusters, unit)
    return section


def _group_sections(options: EvalOptions, ev: EvaluatedSplit) -> dict[str, dict]:
    """``{"slide": ..., "patient": ...}``: :func:`_group_section` of each :data:`GROUP_LEVELS`."""
    return {key: _group_section(options, ev, key, feature) for key, feature in GROUP_LEVELS}


# ----------------------------------------------------------------- figures
def _figures(
    options: EvalOptions,
    ev: EvaluatedSplit,
    cell: dict,
    calibration: dict,
    levels: dict | None,
    groups: dict[str, dict],
    out_dir: Path,
) -> dict[str, str]:
    """Draws the confusion matrices, ROC curves and reliability diagram into ``out_dir``.

    Returns:
      ``{figure key: path relative to out_dir}``, in the report's order.
    """
    paths: dict[str, str] = {}

    def confusion(key: str, matrix, names, title: str, **kwargs) -> None:
        path = figures_lib.confusion_matrix_figure(
            matrix, names, out_dir / f"{key}.png", title=title, **kwargs
        )
        paths[key] = _relative(path, out_dir)

    split, names = options.split, ev.class_names
    confusion(
        "confusion_matrix",
        cell["confusion_matrix"],
        names,
        f"Cell level, {split} (n={len(ev.y_true)})",
    )
    paths["roc_curves"] = _relative(
        figures_lib.roc_figure(
            ev.y_true, ev.probs, names, out_dir / "roc_curves.png", f"ROC curves, {split}"
        ),
        out_dir,
    )
    before = f"before (T=1, ECE {calibration['ece_before']:.3f})"
    after = f"after (T={calibration['temperature']:.3g}, ECE {calibration['ece_after']:.3f})"
    paths["reliability"] = _relative(
        figures_lib.reliability_figure(
            {before: calibration["reliability_before"], after: calibration["reliability_after"]},
            out_dir / "reliability.png",
            f"Reliability diagram, {split}",
        ),
        out_dir,
    )
    for entry in levels["levels"] if levels is not None else []:
        if "greedy" in entry:
            k = entry["level"]
            confusion(
                f"confusion_level_{k}",
                entry["greedy"]["confusion_matrix"],
                entry["nodes"],
                f"Taxonomy level {k} (greedy decisions, n={entry['n']})",
                no_decision=entry["greedy"].get("no_decision"),
            )
    for key, section in groups.items():
        if section.get("methods"):
            confusion(
                f"confusion_{key}",
                section["methods"]["mean_probability"]["confusion_matrix"],
                names,
                f"{key.capitalize()} level, mean probability (n={section['n_groups']})",
            )
    return paths


def _relative(path: str | os.PathLike, out_dir: Path) -> str:
    return str(Path(path).relative_to(out_dir))


# ---------------------------------------------------------- explanations
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _explanations(
    trained: rundir.TrainedModel,
    sampler: explain_lib.ExampleSampler,
    out_dir: Path,
) -> dict:
    """Grad-CAM or attention-rollout figures of the sampled examples, one per true class.

    Never raises: an unsupported backbone or a failure part way is reported in ``note``.

    Returns:
      The ``explanations`` section: ``method``, ``files`` (relative to
      ``out_dir``), ``note`` and, with a method, ``layer``, ``grid``, ``what``.
    """
    if sampler.per_cell == 0:
        return {"method": None, "note": report_lib.EXPLANATIONS_OFF, "files": []}
    try:
        explainer = explain_lib.make_explainer(trained.model, trained.label_space)
    except Exception as e:  # noqa: BLE001  (unsupported backbone: report, never stop)
        return {"method": None, "note": report_lib.no_explainer(e), "files": []}
    method = explain_lib.method_name(explainer)
    section = {
        "method": method,
        "layer": explainer.layer,
        "grid": list(explainer.grid),
        "files": [],
        "note": "",
    }
    if min(explainer.grid) <= 2:
        section["note"] = report_lib.coarse_explanations(explainer.grid, trained.image_size)
    what = report_lib.explanation_what(method)
    section["what"] = what
    folder = out_dir / "explanations"
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("*.png"):  # from an earlier evaluation into the same folder
        stale.unlink()
    names = trained.class_names
    try:
        for c, name in enumerate(names):
            rows = {"correct": sampler.kept[(c, True)], "wrong": sampler.kept[(c, False)]}
            if not any(rows.values()):
                continue
            maps = {}
            for label, items in rows.items():
                if items:
                    images = np.stack([item["image"] for item in items])
                    preds = np.array([item["pred"] for item in items])
                    maps[label] = list(explainer(images, preds))
                else:
                    maps[label] = []
            path = folder / f"{_safe(method.lower())}_{c:02d}_{_safe(name)}.png"
            figures_lib.explanation_figure(
                rows,
                maps,
                names,
                path,
                title=f"{what}: true class {name}",
            )
            section["files"].append(str(path.relative_to(out_dir)))
    except Exception as e:  # noqa: BLE001  (an explanation must never stop an evaluation)
        logging.exception("explanations failed")
        section["note"] = report_lib.explanations_stopped(section["note"], e)
    return section


# ------------------------------------------------------- model and data
def _model_section(options: EvalOptions, trained: rundir.TrainedModel) -> dict:
    """The ``model`` section: which model and checkpoint, and how it was built."""
    config = trained.config
    return {
        "model_dir": str(trained.model_dir),
        "checkpoint": options.which,
        "test_time_augmentation": report_lib.tta_description(options.tta),
        "backbone": config.backbone,
        "head": config.head,
        "label_mode": config.label_mode,
        "image_size": config.image_size,
        "class_names": trained.class_names,
        "taxonomy": trained.taxonomy.source if trained.taxonomy is not None else None,
    }


def _data_section(options: EvalOptions, ev: EvaluatedSplit) -> dict:
    """The ``data`` section: the split, its size, classes, patients, slides and sources."""
    y_true, predictions = ev.y_true, ev.predictions
    n_in_split = int(sum(ev.sizes.values()))
    return {
        "datasets": ev.trained.config.datasets,
        "data_dir": ev.data_dir,
        "split": options.split,
        "n_examples": len(y_true),
        "n_in_split": n_in_split,
        "n_excluded": int(n_in_split - len(y_true)),
        "class_counts": {name: int((y_true == c).sum()) for c, name in enumerate(ev.class_names)},
        "n_classes_present": int(len(np.unique(y_true))),
        "n_patients": int(len(set(predictions.patient_id[predictions.patient_id != ""]))),
        "n_slides": int(len(set(predictions.slide_id[predictions.slide_id != ""]))),
        "sources": sorted(set(predictions.source.tolist())),
    }


# ------------------------------------------------------------------- JSON
def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _write(result: dict, out_dir: Path, start: float) -> dict:
    """Writes ``metrics.json`` and ``report.md`` into ``out_dir``.

    Returns:
      ``result`` as written (plus ``seconds``), with ``out_dir``,
      ``metrics_path`` and ``report_path`` added.
    """
    result["seconds"] = round(time.time() - start, 2)
    result = _jsonable(result)
    # Whole or not at all: a killed evaluation leaves no report that looks complete.
    metrics_path = out_dir / METRICS_FILE
    rundir.write_text(str(metrics_path), json.dumps(result, indent=2) + "\n")
    report_path = out_dir / REPORT_FILE
    rundir.write_text(str(report_path), report_lib.render(result))
    result.update(
        out_dir=str(out_dir), metrics_path=str(metrics_path), report_path=str(report_path)
    )
    return result


# ------------------------------------------------------------------- main
def default_out_dir(
    model_dir: str | os.PathLike, split: str, which: str = "best", tta: bool = False
) -> str:
    """``model_dir/eval_<split>`` (``_<which>`` added for another checkpoint, ``_tta`` with TTA).

    A string: ``model_dir`` may be a URL (``gs://``), which pathlib mangles.
    """
    name = f"eval_{_safe(split)}"
    if which != "best":
        stem = rundir.basename(which)
        name += f"_{_safe(stem.removesuffix('.keras'))}"
    if tta:
        name += "_tta"
    return rundir.join(model_dir, name)


def evaluate(
    model_dir: str | os.PathLike,
    split: str = "test",
    data_dir: str | None = None,
    out_dir: str | os.PathLike | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    explain_samples: int = DEFAULT_EXPLAIN_SAMPLES,
    batch_size: int = 64,
    which: str = "best",
    fit_temperature: bool = True,
    tta: bool = False,
) -> dict:
    """Evaluates a trained model on one split and writes the report.

    Args:
      model_dir: a finished training run's directory (local or ``gs://``).
      split: the TFDS split to evaluate (``"test"``, ``"validation"``, ``"test[:50%]"``).
      data_dir: TFDS data directory; default: the one the model was trained with.
      out_dir: where to write; default :func:`default_out_dir`. A remote one
        (``gs://``) is written into a local temporary folder first and then
        copied there.
      bootstrap: bootstrap replicates of the confidence intervals (0: none).
      seed: seed of the bootstrap and of the explained-example sample.
      explain_samples: explained examples per class and per correct / wrong
        (0: no explanations).
      batch_size: inference batch size.
      which: checkpoint, ``"best"`` or ``"last"`` (or a ``.keras`` path).
      fit_temperature: fit the temperature on the validation split (and store
        it when ``which == "best"``); otherwise use the stored one.
      tta: test-time augmentation, the mean logits of the 8 rotations and
        mirrorings of each image (``TrainedModel.tta``); the report goes to
        ``eval_<split>_tta`` by default and the temperature is not stored.

    Returns:
      The contents of ``metrics.json``, plus ``out_dir``, ``report_path`` and
      ``metrics_path``.

    Raises:
      FileNotFoundError: ``model_dir`` is missing or not a training run.
      ValueError: an option out of range, unknown split (the message lists the
        available ones), unlabelled split (:class:`UnlabelledSplitError`), or
        data whose classes differ from the model's.
    """
    start = time.time()
    options = EvalOptions(
        split=split,
        data_dir=data_dir,
        bootstrap=bootstrap,
        seed=seed,
        explain_samples=explain_samples,
        batch_size=batch_size,
        which=which,
        fit_temperature=fit_temperature,
        tta=tta,
    )
    # The one check of model_dir on the way through evaluation (check_model_dir, local or gs://).
    trained = rundir.load_trained_model(model_dir, which=options.which, tta=options.tta)
    target = (
        os.fspath(out_dir)
        if out_dir
        else default_out_dir(trained.model_dir, options.split, options.which, options.tta)
    )
    if not rundir.is_remote(target):
        return _evaluate(trained, options, Path(target), start)
    # matplotlib and the report writer write local files: stage them, then copy up.
    with tempfile.TemporaryDirectory(prefix="leukemia_tf_eval_") as staging:
        result = _evaluate(trained, options, Path(staging), start)
        explanations = rundir.join(target, "explanations")
        if os.path.isdir(os.path.join(staging, "explanations")) and tf.io.gfile.isdir(explanations):
            tf.io.gfile.rmtree(explanations)  # an earlier evaluation's maps
        rundir.copy_tree(staging, target)
    result.update(
        out_dir=target,
        metrics_path=rundir.join(target, METRICS_FILE),
        report_path=rundir.join(target, REPORT_FILE),
    )
    return result


def _evaluate(
    trained: rundir.TrainedModel, options: EvalOptions, out_dir: Path, start: float
) -> dict:
    """:func:`evaluate` of the loaded model into the local folder ``out_dir``.

    Each section of ``metrics.json`` comes from one function; the order is
    the order of their side effects (a temperature written, figures drawn).
    """
    specs, data_dir, sizes = _check_data(trained, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = _predictions(trained, options, specs, data_dir, sizes)
    cell = _cell_section(options, ev)
    calibration, notes = _calibration_section(options, ev)
    levels = _levels_section(ev)
    groups = _group_sections(options, ev)
    figures = _figures(options, ev, cell, calibration, levels, groups, out_dir)
    explanations = _explanations(trained, ev.sampler, out_dir)
    data = _data_section(options, ev)
    caveats = report_lib.caveats(
        notes,
        synthetic=any(s.builder_name == "leukemia_synthetic" for s in specs),
        patient_ids=bool((ev.predictions.patient_id != "").any()),
        cell=cell,
        explanation_method=explanations.get("method"),
        n_excluded=data["n_excluded"],
    )
    result = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": _model_section(options, trained),
        "data": data,
        "decisions": report_lib.decisions(trained.config.head == "hierarchical"),
        "cell": cell,
        "calibration": calibration,
        "levels": levels,
        "slide": groups["slide"],
        "patient": groups["patient"],
        "explanations": explanations,
        "figures": figures,
        "caveats": caveats,
        "bootstrap": {
            "n_resamples": options.bootstrap,
            "seed": options.seed,
            "unit": cell["ci"]["unit"],
        },
    }
    return _write(result, out_dir, start)
