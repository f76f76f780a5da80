"""The scored sections of an evaluation's ``metrics.json``, one function each.

Every section reads the options and the evaluated split
(:class:`~leukemia_tf.evaluation.predictions.EvaluatedSplit`) and returns
its part of ``metrics.json``:

* :func:`cell_section`: cell-level scores with bootstrap intervals
  (resampling whole patients, else slides, else cells);
* :func:`calibration_section`: the temperature (fitted on the validation
  split and stored with the model when safe, else the stored one) and ECE /
  NLL before and after; the validation split is read once
  (:func:`validation_pass`) for it and for the back-off curve of
  :mod:`leukemia_tf.evaluation.trust_sections`;
* :func:`levels_section`: scores per taxonomy level;
* :func:`group_sections`: slide and patient level (mean probability and
  majority vote) wherever the split carries those ids;
* :func:`model_section`, :func:`data_section`: what was evaluated;
* :func:`marks_section`: per class, the evaluated images with a detected
  burned-in mark and the accuracy with and without one (a shortcut shows as
  a gap); reported inside the ``explanations`` section, with
  :func:`heat_section`, the share of the explanation heat on marks and border.

The drawn sections (figures, explanations) are in
:mod:`leukemia_tf.evaluation.figure_sections`; the order in which sections
run, and the writing of the report, in :mod:`leukemia_tf.evaluation.evaluate_lib`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from leukemia_tf import rundir
from leukemia_tf.evaluation import aggregate as aggregate_lib
from leukemia_tf.evaluation import calibration as calibration_lib
from leukemia_tf.evaluation import levels as levels_lib
from leukemia_tf.evaluation import metrics as metrics_lib
from leukemia_tf.evaluation import report as report_lib
from leukemia_tf.evaluation import trust_sections
from leukemia_tf.evaluation.predictions import (
    EvaluatedSplit,
    SplitPredictions,
    check_split,
    flag_split_names,
    predict_split,
)
from leukemia_tf.evaluation.trust_sections import ValidationPass
from leukemia_tf.models.heads import level_key

if TYPE_CHECKING:
    # Annotations only: evaluate_lib builds the options and imports this module.
    from leukemia_tf.evaluation.evaluate_lib import EvalOptions

#: Group levels scored when the split carries their ids: (key, feature).
GROUP_LEVELS = (("slide", "slide_id"), ("patient", "patient_id"))


# ---------------------------------------------------------------- cell level
def bootstrap_units(predictions: SplitPredictions) -> tuple[np.ndarray | None, str]:
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


def cell_section(options: EvalOptions, ev: EvaluatedSplit) -> dict:
    """Cell-level scores (:func:`metrics.classification_metrics`) with bootstrap intervals.

    Returns:
      The ``cell`` section; ``cell["ci"]["unit"]`` says what was resampled.
    """
    cell = metrics_lib.classification_metrics(ev.y_true, ev.y_pred, ev.probs, ev.class_names)
    units, unit_text = bootstrap_units(ev.predictions)
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
    # Only the logits become tensors (not the pooled features kept for the trust scores).
    outputs = {
        k: tf.constant(v) for k, v in trained.label_space.own_outputs(predictions.outputs).items()
    }
    labels = predictions.labels

    def nll(temperature: float) -> float:
        probs = trained.label_space.probabilities(outputs, temperature).numpy()
        return calibration_lib.negative_log_likelihood(probs, labels)

    temperature = calibration_lib.fit_temperature(nll)
    return temperature, nll(1.0), nll(temperature)


def validation_pass(options: EvalOptions, ev: EvaluatedSplit) -> ValidationPass:
    """The model over the run's validation split, once: the temperature fit and the back-off curve.

    The evaluated split's own pass is reused when it is the validation split;
    the pooled features are kept when the run's trust statistics are fitted.
    Never raises: a split that cannot be read is returned with its error.
    """
    trained = ev.trained
    val_split = trained.config.val_split or "validation"
    if val_split == options.split:
        return ValidationPass(val_split, ev.predictions, is_evaluated=True)
    try:
        check_split(ev.specs, val_split, ev.data_dir)
        predictions = predict_split(
            trained,
            ev.specs,
            val_split,
            ev.data_dir,
            options.batch_size,
            features=trust_sections.needs_features(trained),
        )
    except (ValueError, FileNotFoundError) as e:
        return ValidationPass(val_split, None, e)
    return ValidationPass(val_split, predictions)


def _temperature(
    options: EvalOptions, ev: EvaluatedSplit, validation: ValidationPass | None = None
) -> tuple[float, dict, list[str]]:
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
    if validation is None:
        validation = validation_pass(options, ev)
    val_split = validation.split
    if validation.predictions is None:
        return (
            trained.temperature,
            fields,
            [report_lib.temperature_unusable(val_split, validation.error)],
        )
    validation = validation.predictions

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
    if flag_split_names(val_split)[0] in flag_split_names(trained.config.train_split):
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


def calibration_section(
    options: EvalOptions, ev: EvaluatedSplit, validation: ValidationPass | None = None
) -> tuple[dict, list[str]]:
    """ECE, NLL and reliability bins before and after temperature scaling.

    Args:
      options: the evaluation's options.
      ev: the evaluated split.
      validation: :func:`validation_pass`, when the caller has read it
        already (it is read here otherwise, if the temperature is fitted).

    Returns:
      ``(section, notes)``: the ``calibration`` section and notes for the caveats.
    """
    temperature, fields, notes = _temperature(options, ev, validation)
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
def levels_section(ev: EvaluatedSplit) -> dict | None:
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


def group_sections(options: EvalOptions, ev: EvaluatedSplit) -> dict[str, dict]:
    """``{"slide": ..., "patient": ...}``: :func:`_group_section` of each :data:`GROUP_LEVELS`."""
    return {key: _group_section(options, ev, key, feature) for key, feature in GROUP_LEVELS}


# ------------------------------------------------------- model and data
def model_section(options: EvalOptions, trained: rundir.TrainedModel) -> dict:
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
        # A fold ensemble's record (ensemble.json), None for one model.
        "ensemble": trained.ensemble,
    }


def data_section(options: EvalOptions, ev: EvaluatedSplit) -> dict:
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


def _ratio(num, den):
    return float(num) / float(den) if den else None


def marks_section(mark_counts: np.ndarray, class_names: Sequence[str]) -> dict:
    """Evaluated images with a detected burned-in mark, and accuracy with / without one.

    Args:
      mark_counts: ``[C, 2, 2]`` counts by true class, has mark, correct
        (``ExampleSampler.mark_counts``).
      class_names: the ``C`` class names.

    Returns:
      ``per_class``: ``name``, ``n``, ``n_with_mark``, ``share_with_mark``,
      ``accuracy_with_mark``, ``accuracy_without_mark`` (None where no image);
      and the same over all classes in ``all``.
    """
    counts = np.asarray(mark_counts, np.int64)

    def row(name, c):
        with_mark, without = c[1], c[0]
        n = int(c.sum())
        return {
            "name": name,
            "n": n,
            "n_with_mark": int(with_mark.sum()),
            "share_with_mark": _ratio(with_mark.sum(), n),
            "accuracy_with_mark": _ratio(with_mark[1], with_mark.sum()),
            "accuracy_without_mark": _ratio(without[1], without.sum()),
        }

    return {
        "per_class": [row(name, counts[i]) for i, name in enumerate(class_names)],
        "all": row("all", counts.sum(axis=0)),
    }


#: A class's heat on marks above this multiple of the marks' area gets a caveat.
MARK_HEAT_RATIO = 2.0


def heat_section(per_class: dict[str, dict[str, list]], class_names: Sequence[str]) -> dict:
    """Share of the explanation heat on detected marks and on the border band, per class.

    Args:
      per_class: class name -> lists ``on_marks``, ``on_border``, ``mark_area``,
        ``has_mark`` over its explained images (``explain.heat_on_marks``).
      class_names: the classes, in order.

    Returns:
      ``per_class`` rows (``name``, ``n_explained``, ``n_with_mark``,
      ``heat_on_marks``, ``heat_on_border``, ``mark_area``: means over the
      explained images), ``heat_on_marks`` / ``heat_on_border`` (class ->
      mean) and ``shortcut_classes``: the classes whose heat on marks exceeds
      :data:`MARK_HEAT_RATIO` times the marks' share of the image area.
    """
    rows, shortcut = [], []
    for name in class_names:
        values = per_class.get(name)
        if not values or not values["on_marks"]:
            continue
        row = {
            "name": name,
            "n_explained": len(values["on_marks"]),
            "n_with_mark": int(np.sum(values["has_mark"])),
            "heat_on_marks": float(np.mean(values["on_marks"])),
            "heat_on_border": float(np.mean(values["on_border"])),
            "mark_area": float(np.mean(values["mark_area"])),
        }
        rows.append(row)
        if row["n_with_mark"] and row["heat_on_marks"] > MARK_HEAT_RATIO * row["mark_area"]:
            shortcut.append(name)
    return {
        "per_class": rows,
        "heat_on_marks": {row["name"]: row["heat_on_marks"] for row in rows},
        "heat_on_border": {row["name"]: row["heat_on_border"] for row in rows},
        "border_fraction": 0.1,
        "shortcut_classes": shortcut,
    }
