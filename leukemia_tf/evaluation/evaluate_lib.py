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

from leukemia_tf.data import pipeline
from leukemia_tf.evaluation import aggregate as aggregate_lib
from leukemia_tf.evaluation import calibration as calibration_lib
from leukemia_tf.evaluation import explain as explain_lib
from leukemia_tf.evaluation import figures as figures_lib
from leukemia_tf.evaluation import levels as levels_lib
from leukemia_tf.evaluation import metrics as metrics_lib
from leukemia_tf.evaluation import report as report_lib
from leukemia_tf.models.heads import level_key
from leukemia_tf.training import artifacts

#: Files an evaluation writes into its output directory.
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"

#: Default number of explained examples per (class, correct / wrong).
DEFAULT_EXPLAIN_SAMPLES = 3

#: Group levels scored when the split carries their ids: (key, feature).
GROUP_LEVELS = (("slide", "slide_id"), ("patient", "patient_id"))


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
    trained: artifacts.TrainedModel,
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


# -------------------------------------------------------------- calibration
def _fit_temperature(
    trained: artifacts.TrainedModel, predictions: SplitPredictions
) -> tuple[float, float, float]:
    """Fits T on ``predictions``; returns ``(T, nll at T=1, nll at T)``."""
    outputs = {k: tf.constant(v) for k, v in predictions.outputs.items()}
    labels = predictions.labels

    def nll(temperature: float) -> float:
        probs = trained.label_space.probabilities(outputs, temperature).numpy()
        return calibration_lib.negative_log_likelihood(probs, labels)

    temperature = calibration_lib.fit_temperature(nll)
    return temperature, nll(1.0), nll(temperature)


def _calibration_section(
    trained: artifacts.TrainedModel,
    specs: Sequence[pipeline.DataSpec],
    split: str,
    data_dir: str | None,
    batch_size: int,
    evaluated: SplitPredictions,
    which: str,
    fit: bool,
    notes: list[str],
) -> tuple[dict, float]:
    """Fits (and stores) the temperature and measures calibration on ``evaluated``."""
    val_split = trained.config.val_split or "validation"
    temperature = trained.temperature
    section: dict = {
        "binning": (
            f"{calibration_lib.DEFAULT_BINS} equal-width bins (b/{calibration_lib.DEFAULT_BINS}, "
            f"(b+1)/{calibration_lib.DEFAULT_BINS}] on the maximum class probability"
        ),
        "fitted_on": None,
        "stored": False,
    }
    if fit:
        try:
            check_split(specs, val_split, data_dir)
            validation = (
                evaluated
                if val_split == split
                else predict_split(trained, specs, val_split, data_dir, batch_size)
            )
        except (ValueError, FileNotFoundError) as e:
            notes.append(f"temperature not fitted: validation split {val_split!r} unusable ({e})")
        else:
            temperature, nll_before, nll_after = _fit_temperature(trained, validation)
            low, high = calibration_lib.T_RANGE
            if not low * 1.01 < temperature < high / 1.01:
                notes.append(
                    f"the fitted temperature T={temperature:.3g} sits at the edge of the searched "
                    f"range [{low}, {high}]: the model's confidence is far off (an undertrained "
                    "model, or a validation split unlike the training data)"
                )
            section.update(
                fitted_on=val_split,
                n_fit=len(validation),
                validation_nll_before=nll_before,
                validation_nll_after=nll_after,
            )
            if val_split == split:
                notes.append(
                    f"the temperature was fitted on the evaluated split {split!r} itself: its "
                    "calibrated figures are optimistic"
                )
            if _split_names(val_split)[0] in _split_names(trained.config.train_split):
                notes.append(
                    f"the temperature was fitted on {val_split!r}, which the model was trained on "
                    f"(--train_split={trained.config.train_split!r}): it is reported but not "
                    "stored, and the calibrated figures mean little; fit it on held-out data"
                )
            elif trained.tta:
                notes.append(
                    "temperature fitted on the test-time-augmented outputs is reported but not "
                    "stored (calibration.json belongs to the single-view model that export serves)"
                )
            elif which == "best":
                artifacts.write_temperature(
                    trained.model_dir,
                    temperature,
                    fitted_on=val_split,
                    n=len(validation),
                    nll_before=nll_before,
                    nll_after=nll_after,
                    checkpoint=which,
                )
                section["stored"] = True
            else:
                notes.append(
                    f"temperature fitted for the '{which}' checkpoint is reported but not stored "
                    "(calibration.json belongs to the best checkpoint, which export serves)"
                )
    else:
        notes.append(f"temperature not refitted; using the stored T={temperature:.4g}")
    section["temperature"] = float(temperature)

    labels = evaluated.labels
    raw = trained.label_space.probabilities(evaluated.outputs, 1.0).numpy()
    scaled = trained.label_space.probabilities(evaluated.outputs, temperature).numpy()
    section.update(
        ece_before=calibration_lib.expected_calibration_error(raw, labels),
        ece_after=calibration_lib.expected_calibration_error(scaled, labels),
        nll_before=calibration_lib.negative_log_likelihood(raw, labels),
        nll_after=calibration_lib.negative_log_likelihood(scaled, labels),
        reliability_before=calibration_lib.reliability_bins(raw, labels),
        reliability_after=calibration_lib.reliability_bins(scaled, labels),
        decisions_changed=int((raw.argmax(axis=1) != scaled.argmax(axis=1)).sum()),
    )
    return section, float(temperature)


# ---------------------------------------------------------------- groups
def _clusters(predictions: SplitPredictions) -> tuple[np.ndarray | None, str]:
    """Bootstrap units of the cells: patients, else slides, else the cells themselves."""
    for name, ids in (("patient", predictions.patient_id), ("slide", predictions.slide_id)):
        if (ids != "").any():
            # A cell without an id is its own unit.
            units = np.array([i if i else f"\x00cell{k}" for k, i in enumerate(ids)], dtype=object)
            missing = int((ids == "").sum())
            text = f"{name}s ({len(set(ids[ids != '']))} {name}s"
            text += f"; {missing} cells without a {name} id resampled singly)" if missing else ")"
            return units, text
    return None, f"cells ({len(predictions)} cells; the split carries no patient or slide ids)"


def _group_section(
    key: str,
    feature: str,
    predictions: SplitPredictions,
    probs: np.ndarray,
    class_names: Sequence[str],
    bootstrap: int,
    seed: int,
) -> dict:
    ids = getattr(predictions, feature)
    has = ids != ""
    if not has.any():
        return {"available": False, "reason": f"the split carries no {feature}"}
    section: dict = {
        "available": True,
        "n_cells_without_id": int((~has).sum()),
        "labelled": True,
    }
    try:
        result = aggregate_lib.aggregate(ids[has], probs[has], predictions.labels[has])
    except ValueError as e:
        # E.g. cell-type labels: one patient's cells carry several labels.
        result = aggregate_lib.aggregate(ids[has], probs[has])
        section["labelled"] = False
        section["reason"] = str(e)
    section["n_groups"] = len(result["group_ids"])
    section["groups"] = [
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
    if "label" not in result:
        return section
    # Slides of one patient are resampled together.
    clusters = None
    unit = key + "s"
    if feature == "slide_id":
        patient_of = {}
        for s, p in zip(ids[has], predictions.patient_id[has], strict=True):
            patient_of.setdefault(s, set()).add(p)
        if all(len(v) == 1 and "" not in v for v in patient_of.values()):
            clusters = np.array([next(iter(patient_of[g])) for g in result["group_ids"]])
            unit = f"patients ({len(set(clusters))} patients)"
    section["methods"] = {}
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
            n_resamples=bootstrap,
            seed=seed,
        )
        scored["ci"]["unit"] = unit
        section["methods"][method] = scored
    return section


# ---------------------------------------------------------- explanations
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _explanations(
    trained: artifacts.TrainedModel,
    sampler: explain_lib.ExampleSampler,
    out_dir: Path,
) -> dict:
    if sampler.per_cell == 0:
        return {
            "method": None,
            "note": "explanations switched off (explain_samples=0)",
            "files": [],
        }
    try:
        explainer = explain_lib.make_explainer(trained.model, trained.label_space)
    except Exception as e:  # noqa: BLE001  (unsupported backbone: report, never stop)
        return {
            "method": None,
            "note": f"no explanation method for this backbone: {e}",
            "files": [],
        }
    method = explain_lib.method_name(explainer)
    section = {
        "method": method,
        "layer": explainer.layer,
        "grid": list(explainer.grid),
        "files": [],
        "note": "",
    }
    if min(explainer.grid) <= 2:
        section["note"] = (
            f"the explained map is only {explainer.grid[0]}x{explainer.grid[1]} at this image "
            f"size ({trained.image_size} px): the heat maps are coarse"
        )
    what = (
        "Grad-CAM of the predicted class"
        if method == "Grad-CAM"
        else "Attention rollout of the class token (class-agnostic)"
    )
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
        section["note"] = (section["note"] + "; " if section["note"] else "") + (
            f"explanations stopped: {type(e).__name__}: {e}"
        )
    return section


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


# ------------------------------------------------------------------- main
def default_out_dir(
    model_dir: str | os.PathLike, split: str, which: str = "best", tta: bool = False
) -> str:
    """``model_dir/eval_<split>`` (``_<which>`` added for another checkpoint, ``_tta`` with TTA).

    A string: ``model_dir`` may be a URL (``gs://``), which pathlib mangles.
    """
    name = f"eval_{_safe(split)}"
    if which != "best":
        stem = artifacts.basename(which)
        name += f"_{_safe(stem.removesuffix('.keras'))}"
    if tta:
        name += "_tta"
    return artifacts.join(model_dir, name)


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
      ValueError: unknown split (the message lists the available ones),
        unlabelled split (:class:`UnlabelledSplitError`), or data whose
        classes differ from the model's.
    """
    start = time.time()
    model_dir = artifacts.check_model_dir(model_dir)
    if bootstrap < 0:
        raise ValueError(f"--bootstrap={bootstrap} must be >= 0")
    if explain_samples < 0:
        raise ValueError(f"--explain_samples={explain_samples} must be >= 0")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    target = os.fspath(out_dir) if out_dir else default_out_dir(model_dir, split, which, tta)
    options = dict(
        split=split,
        data_dir=data_dir,
        bootstrap=bootstrap,
        seed=seed,
        explain_samples=explain_samples,
        batch_size=batch_size,
        which=which,
        fit_temperature=fit_temperature,
        tta=tta,
        start=start,
    )
    if not artifacts.is_remote(target):
        return _evaluate(model_dir, Path(target), **options)
    # matplotlib and the report writer write local files: stage them, then copy up.
    with tempfile.TemporaryDirectory(prefix="leukemia_tf_eval_") as staging:
        result = _evaluate(model_dir, Path(staging), **options)
        explanations = artifacts.join(target, "explanations")
        if os.path.isdir(os.path.join(staging, "explanations")) and tf.io.gfile.isdir(explanations):
            tf.io.gfile.rmtree(explanations)  # an earlier evaluation's maps
        artifacts.copy_tree(staging, target)
    result.update(
        out_dir=target,
        metrics_path=artifacts.join(target, METRICS_FILE),
        report_path=artifacts.join(target, REPORT_FILE),
    )
    return result


def _evaluate(
    model_dir: str,
    out_dir: Path,
    *,
    split: str,
    data_dir: str | None,
    bootstrap: int,
    seed: int,
    explain_samples: int,
    batch_size: int,
    which: str,
    fit_temperature: bool,
    tta: bool,
    start: float,
) -> dict:
    """:func:`evaluate` into the local folder ``out_dir``."""
    trained = artifacts.load_trained_model(model_dir, which=which, tta=tta)
    config = trained.config
    data_dir = data_dir or config.data_dir or None
    specs = pipeline.parse_datasets(config.datasets)
    sizes = check_split(specs, split, data_dir)
    data_classes = pipeline.dataset_class_names(
        specs, data_dir, config.label_mode, trained.taxonomy
    )
    class_names = trained.class_names
    if list(data_classes) != list(class_names):
        raise ValueError(
            f"the data ({config.datasets} in {data_dir or 'the TFDS default data_dir'}) have "
            f"classes {data_classes}, but the model in {model_dir} predicts {class_names} "
            f"({artifacts.join(model_dir, artifacts.LABELS_FILE)}): evaluate it on the data it "
            "was trained for"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    num_classes = len(class_names)

    sampler = explain_lib.ExampleSampler(num_classes, explain_samples, seed=seed)
    predictions = predict_split(trained, specs, split, data_dir, batch_size, sampler)
    probs = trained.label_space.probabilities(predictions.outputs, 1.0).numpy()
    y_pred = probs.argmax(axis=1)
    y_true = predictions.labels
    notes: list[str] = []

    # ----------------------------------------------------------- cell level
    cell = metrics_lib.classification_metrics(y_true, y_pred, probs, class_names)
    units, unit_text = _clusters(predictions)
    cell["ci"] = metrics_lib.bootstrap_ci(
        y_true, y_pred, probs, num_classes, clusters=units, n_resamples=bootstrap, seed=seed
    )
    cell["ci"]["unit"] = unit_text

    calibration, temperature = _calibration_section(
        trained, specs, split, data_dir, batch_size, predictions, which, fit_temperature, notes
    )

    # ------------------------------------------------------ taxonomy levels
    level_section = None
    if trained.taxonomy is not None and predictions.levels is not None:
        if config.head == "hierarchical":
            level_probs_dict = trained.label_space.level_probabilities(predictions.outputs)
            level_probs = [
                level_probs_dict[level_key(k)].numpy() for k in range(trained.taxonomy.num_levels)
            ]
        else:
            level_probs = levels_lib.flat_level_probabilities(probs, class_names, trained.taxonomy)
        level_section = levels_lib.evaluate_levels(
            level_probs,
            predictions.levels,
            y_pred,
            class_names,
            trained.taxonomy,
            check_marginal_sums=config.head == "hierarchical",
        )
        level_section["marginals"] = (
            "LabelSpace.level_probabilities (product of the per-level conditionals)"
            if config.head == "hierarchical"
            else "sums of the flat head's class probabilities under each node"
        )

    # -------------------------------------------------- slides and patients
    groups = {
        key: _group_section(key, feature, predictions, probs, class_names, bootstrap, seed)
        for key, feature in GROUP_LEVELS
    }

    # -------------------------------------------------------------- figures
    figure_paths: dict[str, str] = {}

    def rel(path: str) -> str:
        return str(Path(path).relative_to(out_dir))

    figure_paths["confusion_matrix"] = rel(
        figures_lib.confusion_matrix_figure(
            cell["confusion_matrix"],
            class_names,
            out_dir / "confusion_matrix.png",
            title=f"Cell level, {split} (n={len(y_true)})",
        )
    )
    figure_paths["roc_curves"] = rel(
        figures_lib.roc_figure(
            y_true, probs, class_names, out_dir / "roc_curves.png", f"ROC curves, {split}"
        )
    )
    figure_paths["reliability"] = rel(
        figures_lib.reliability_figure(
            {
                f"before (T=1, ECE {calibration['ece_before']:.3f})": calibration[
                    "reliability_before"
                ],
                f"after (T={temperature:.3g}, ECE {calibration['ece_after']:.3f})": calibration[
                    "reliability_after"
                ],
            },
            out_dir / "reliability.png",
            f"Reliability diagram, {split}",
        )
    )
    if level_section is not None:
        for entry in level_section["levels"]:
            if "greedy" in entry:
                k = entry["level"]
                figure_paths[f"confusion_level_{k}"] = rel(
                    figures_lib.confusion_matrix_figure(
                        entry["greedy"]["confusion_matrix"],
                        entry["nodes"],
                        out_dir / f"confusion_level_{k}.png",
                        title=f"Taxonomy level {k} (greedy decisions, n={entry['n']})",
                        no_decision=entry["greedy"].get("no_decision"),
                    )
                )
    for key, section in groups.items():
        if section.get("methods"):
            scored = section["methods"]["mean_probability"]
            figure_paths[f"confusion_{key}"] = rel(
                figures_lib.confusion_matrix_figure(
                    scored["confusion_matrix"],
                    class_names,
                    out_dir / f"confusion_{key}.png",
                    title=f"{key.capitalize()} level, mean probability (n={section['n_groups']})",
                )
            )

    explanations = _explanations(trained, sampler, out_dir)

    # ------------------------------------------------------------- caveats
    caveats = list(notes)
    if any(s.builder_name == "leukemia_synthetic" for s in specs):
        caveats.insert(
            0,
            "SYNTHETIC data: leukemia_synthetic images are generated caricatures of cells. These "
            "figures test the pipeline and say nothing about performance on real blood smears.",
        )
    if not (predictions.patient_id != "").any():
        caveats.append(
            "No patient ids in this split: the data set was split by image (or by slide), not "
            "by patient, so cells of one patient may be in both the training and the evaluated "
            "split. That leaks patient-specific appearance and usually inflates every figure "
            "here; confidence intervals resample cells as if independent, which makes them too "
            "narrow."
        )
    if cell["classes_absent"]:
        caveats.append(
            f"Classes absent from this split: {', '.join(cell['classes_absent'])}. The model's "
            "performance on them is unmeasured."
        )
    small = [p["name"] for p in cell["per_class"] if 0 < p["support"] < 30]
    if small:
        caveats.append(
            f"Fewer than 30 examples of {', '.join(small)}: their per-class figures are "
            "imprecise (see the confidence intervals of the headline figures)."
        )
    caveats.append(
        "Cell-level figures count cells; a diagnosis is made per patient. Cells of one patient "
        "are correlated, which the patient-level bootstrap accounts for only where patient ids "
        "exist."
    )
    if explanations.get("method"):
        caveats.append(
            f"{explanations['method']} maps show where the model's evidence lies, not why; they "
            "are for spotting shortcuts (background, staining, borders), not for diagnosis."
        )

    present = np.unique(y_true)
    result = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": {
            "model_dir": str(model_dir),
            "checkpoint": which,
            "test_time_augmentation": "D4 (8 views, mean logits)" if tta else "none",
            "backbone": config.backbone,
            "head": config.head,
            "label_mode": config.label_mode,
            "image_size": config.image_size,
            "class_names": class_names,
            "taxonomy": trained.taxonomy.source if trained.taxonomy is not None else None,
        },
        "data": {
            "datasets": config.datasets,
            "data_dir": data_dir,
            "split": split,
            "n_examples": len(y_true),
            "n_in_split": int(sum(sizes.values())),
            "n_excluded": int(sum(sizes.values()) - len(y_true)),
            "class_counts": {name: int((y_true == c).sum()) for c, name in enumerate(class_names)},
            "n_classes_present": int(len(present)),
            "n_patients": int(len(set(predictions.patient_id[predictions.patient_id != ""]))),
            "n_slides": int(len(set(predictions.slide_id[predictions.slide_id != ""]))),
            "sources": sorted(set(predictions.source.tolist())),
        },
        "decisions": (
            "argmax of the class probabilities at temperature 1"
            + (
                " (hierarchical head: the marginal probability of each class node, the "
                "product of the per-level conditionals along its path)"
                if config.head == "hierarchical"
                else ""
            )
        ),
        "cell": cell,
        "calibration": calibration,
        "levels": level_section,
        "slide": groups["slide"],
        "patient": groups["patient"],
        "explanations": explanations,
        "figures": figure_paths,
        "caveats": caveats,
        "bootstrap": {"n_resamples": bootstrap, "seed": seed, "unit": unit_text},
    }
    if result["data"]["n_excluded"]:
        caveats.append(
            f"{result['data']['n_excluded']} examples of the split are not evaluated: their "
            "labels map to null in the taxonomy (excluded on purpose, e.g. smudge cells)."
        )
    result["seconds"] = round(time.time() - start, 2)
    result = _jsonable(result)
    metrics_path = out_dir / METRICS_FILE
    metrics_path.write_text(json.dumps(result, indent=2) + "\n")
    report_path = report_lib.write_report(result, out_dir / REPORT_FILE)
    result.update(
        out_dir=str(out_dir), metrics_path=str(metrics_path), report_path=str(report_path)
    )
    return result
