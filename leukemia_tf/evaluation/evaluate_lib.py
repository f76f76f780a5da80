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
  predictions per class;
* knowing when not to answer (:mod:`leukemia_tf.evaluation.trust_sections`):
  the trust scores' risk-coverage summaries and the fitted referral
  (``selective``), mistake severity and back-off (``hierarchy``) and, with
  ``ood_images``, how well each score separates out-of-distribution images
  (``ood``). The validation split is read once, for the temperature and the
  back-off curve.

Decisions (accuracy, confusion matrices, aggregation) use the probabilities
as trained (temperature 1): the model that was selected on validation. The
temperature changes calibration figures; for a hierarchical head it can also
change a few argmax decisions, and how many is reported.

Labelled image files from outside the model's data sets (a folder of label
folders, or a CSV file) are evaluated by :func:`evaluate_images`: they are
read and decided as ``python -m leukemia_tf.predict`` does
(:mod:`leukemia_tf.evaluation.external`), turned into the same
``EvaluatedSplit`` and scored by the same sections, plus an ``external``
section (labels, label map, dropped images, classes absent, the scores
restricted to the classes present, what was scored at which taxonomy level).

Structure: :func:`evaluate` checks its arguments once into an
:class:`EvalOptions` and loads the model (the one check of ``model_dir``);
:func:`_evaluate` then runs the model over the split once
(:mod:`leukemia_tf.evaluation.predictions`: :func:`check_split`,
``predict_split``, ``EvaluatedSplit``) and builds ``metrics.json`` from one
function per section (:mod:`leukemia_tf.evaluation.sections` for the scores,
:mod:`leukemia_tf.evaluation.figure_sections` for the figures and
explanations) before ``_write`` writes it and the report. The prose of the
report, caveats included, is worded in :mod:`leukemia_tf.evaluation.report`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

from leukemia_tf import rundir
from leukemia_tf.data import folds, names, pipeline
from leukemia_tf.evaluation import explain as explain_lib
from leukemia_tf.evaluation import external, figure_sections, sections, trust_sections
from leukemia_tf.evaluation import figures as figures_lib
from leukemia_tf.evaluation import report as report_lib
from leukemia_tf.evaluation.predictions import (
    EvaluatedSplit,
    UnlabelledSplitError,
    check_split,
    predict_split,
)
from leukemia_tf.serving import predict_lib

# What callers reach through this module: the entry point and its options,
# the split check and its error (defined in predictions), and, for the tests of
# the explanations, that section and the figures module it draws with.
__all__ = [
    "EvalOptions",
    "UnlabelledSplitError",
    "_explanations",
    "check_split",
    "evaluate",
    "evaluate_images",
    "figures_lib",
]

#: Files an evaluation writes into its output directory.
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"

#: Default number of explained examples per (class, correct / wrong).
DEFAULT_EXPLAIN_SAMPLES = 3

#: The explanation section under its earlier name (tests call it through this module).
_explanations = figure_sections.explanations_section


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
      ood_images: ``--ood_images``, a folder, glob or CSV of images the model
        should refuse (the ``ood`` section), or ``None``.
      read_threads: threads reading image files (``--images``, ``--ood_images``).

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
    ood_images: str | None = None
    read_threads: int = 8

    def __post_init__(self):
        if self.bootstrap < 0:
            raise ValueError(f"--bootstrap={self.bootstrap} must be >= 0")
        if self.explain_samples < 0:
            raise ValueError(f"--explain_samples={self.explain_samples} must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.ood_images is not None and not str(self.ood_images).strip():
            raise ValueError("--ood_images is empty: give a folder, a glob or a CSV file")


def _check_data(
    trained: rundir.TrainedModel, options: EvalOptions
) -> tuple[list[names.DataSpec], str | None, dict[str, int]]:
    """The model's data sets, the data directory and the split's sizes, checked.

    Raises:
      ValueError: see :func:`check_split`; or data whose classes differ from the model's.
    """
    config = trained.config
    data_dir = options.data_dir or config.data_dir or None
    specs = names.parse_datasets(config.datasets)
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
    specs: list[names.DataSpec],
    data_dir: str | None,
    sizes: dict[str, int],
) -> EvaluatedSplit:
    """Runs the model over the split, keeping a sample of examples to explain."""
    sampler = explain_lib.ExampleSampler(
        len(trained.class_names), options.explain_samples, seed=options.seed
    )
    predictions = predict_split(
        trained,
        specs,
        options.split,
        data_dir,
        options.batch_size,
        sampler,
        features=trust_sections.needs_features(trained),
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
    model_dir: str | os.PathLike,
    split: str,
    which: str = "best",
    tta: bool = False,
    ood_images: str | None = None,
) -> str:
    """``model_dir/eval_<split>`` (``_<which>`` added for another checkpoint, ``_tta`` with TTA,
    ``_ood_<name>`` with ``--ood_images``, :func:`trust_sections.ood_name`). A fold split
    (:mod:`leukemia_tf.data.folds`) is named ``fold<k>_<part>``.

    A string: ``model_dir`` may be a URL (``gs://``), which pathlib mangles.
    """
    return _out_dir(
        model_dir,
        f"eval_{figure_sections.safe_name(folds.short_name(split))}",
        which,
        tta,
        ood_images=ood_images,
    )


def default_images_out_dir(
    model_dir: str | os.PathLike,
    images: str,
    which: str = "best",
    tta: bool = False,
    adapted: bool = False,
    ood_images: str | None = None,
) -> str:
    """``model_dir/eval_images_<folder name or CSV stem>`` (suffixes as :func:`default_out_dir`).

    Apart from the split reports (``eval_<split>``), whose folders it does not overwrite.
    """
    name = external.ImageSource(images).name
    return _out_dir(
        model_dir,
        f"eval_images_{figure_sections.safe_name(name)}",
        which,
        tta,
        adapted,
        ood_images,
    )


def _out_dir(
    model_dir: str | os.PathLike,
    name: str,
    which: str,
    tta: bool,
    adapted: bool = False,
    ood_images: str | None = None,
) -> str:
    if which != "best":
        stem = rundir.basename(which)
        name += f"_{figure_sections.safe_name(stem.removesuffix('.keras'))}"
    if tta:
        name += "_tta"
    if adapted:
        name += "_adabn"
    if ood_images:
        name += f"_ood_{figure_sections.safe_name(trust_sections.ood_name(ood_images))}"
    return rundir.join(model_dir, name)


def _adapt(
    trained: rundir.TrainedModel, adapt_bn: str, inputs: list[str] | None, options: EvalOptions
) -> tuple[rundir.TrainedModel, dict | None]:
    """AdaBN (:mod:`leukemia_tf.models.adapt`): an adapted copy of the model, and its record.

    ``adapt_bn``: ``""`` (off), ``"inputs"`` (the evaluated image files
    themselves, without their labels) or a folder, glob or CSV of unlabelled
    target images.
    """
    if not adapt_bn:
        return trained, None
    from leukemia_tf.models import adapt

    if adapt_bn == ADAPT_INPUTS:
        if inputs is None:
            raise ValueError(
                f"--adapt_bn={ADAPT_INPUTS}: a split is evaluated from TFDS, not from image "
                "files; give a folder or CSV of target images (or evaluate --images)"
            )
        images, source = inputs, "inputs (the evaluated images, without their labels)"
    else:
        images, source = adapt_bn, adapt_bn
    return adapt.adapt_trained(trained, images, batch_size=options.batch_size, source=source)


#: ``--adapt_bn`` value: adapt on the evaluated images themselves.
ADAPT_INPUTS = "inputs"


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
    adapt_bn: str = "",
    ood_images: str | None = None,
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
      adapt_bn: AdaBN target images (see :func:`_adapt`); ``""``: off.
      ood_images: a folder, glob or CSV of out-of-distribution images, read
        as ``predict`` reads them: the ``ood`` section scores how well each
        trust score separates them from the split. The report goes to
        ``eval_<split>_ood_<name>`` by default.

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
        ood_images=ood_images,
    )
    # Inputs first: a wrong --ood_images fails before the model is read.
    ood_items = trust_sections.collect_ood(ood_images) if ood_images else None
    # The one check of model_dir on the way through evaluation (check_model_dir, local or gs://).
    trained = rundir.load_trained_model(model_dir, which=options.which, tta=options.tta)
    trained, adaptation = _adapt(trained, adapt_bn, None, options)
    if adaptation is not None:
        # The run's temperature belongs to the trained model: never refit or
        # overwrite it from an adapted copy.
        options = dataclasses.replace(options, fit_temperature=False)
    target = (
        os.fspath(out_dir)
        if out_dir
        else _out_dir(
            trained.model_dir,
            f"eval_{figure_sections.safe_name(folds.short_name(options.split))}",
            options.which,
            options.tta,
            adaptation is not None,
            options.ood_images,
        )
    )
    return _run_into(
        target, lambda local: _evaluate(trained, options, local, start, adaptation, ood_items)
    )


def _run_into(target: str, run: Callable[[Path], dict]) -> dict:
    """``run(folder)`` into ``target``: directly when local, else staged and copied up.

    Returns:
      ``run``'s result, with ``out_dir``, ``metrics_path`` and ``report_path``
      naming ``target``.
    """
    if not rundir.is_remote(target):
        return run(Path(target))
    # matplotlib and the report writer write local files: stage them, then copy up.
    with tempfile.TemporaryDirectory(prefix="leukemia_tf_eval_") as staging:
        result = run(Path(staging))
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
    trained: rundir.TrainedModel,
    options: EvalOptions,
    out_dir: Path,
    start: float,
    adaptation: dict | None = None,
    ood_items: list[predict_lib.InputImage] | None = None,
) -> dict:
    """:func:`evaluate` of the loaded model into the local folder ``out_dir``.

    Each section of ``metrics.json`` comes from one function; the order is
    the order of their side effects (a temperature written, figures drawn).
    """
    specs, data_dir, sizes = _check_data(trained, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = _predictions(trained, options, specs, data_dir, sizes)
    common = _common_sections(options, ev, ev, ood_items, out_dir, adaptation)
    data = sections.data_section(options, ev)
    caveats = common.caveats(
        patient_ids=bool((ev.predictions.patient_id != "").any()), n_excluded=data["n_excluded"]
    )
    return _write(_metrics(options, adaptation, data, {}, common, caveats), out_dir, start)


@dataclasses.dataclass
class _Common:
    """The sections that evaluating a split and evaluating image files share."""

    ev: EvaluatedSplit
    cell: dict
    calibration: dict
    notes: list[str]
    levels: dict | None
    groups: dict
    figures: dict[str, str]
    trusted: dict
    trust_caveats: list[str]
    explanations: dict

    def caveats(self, *, patient_ids: bool, n_excluded: int) -> list[str]:
        """:func:`report.caveats` of these sections (the trust caveats not included)."""
        return report_lib.caveats(
            self.notes,
            synthetic=any(s.builder_name == "leukemia_synthetic" for s in self.ev.specs),
            patient_ids=patient_ids,
            cell=self.cell,
            explanation_method=self.explanations.get("method"),
            n_excluded=n_excluded,
        )


def _common_sections(
    options: EvalOptions,
    ev: EvaluatedSplit,
    levels_ev: EvaluatedSplit,
    ood_items: list[predict_lib.InputImage] | None,
    out_dir: Path,
    adaptation: dict | None,
) -> _Common:
    """Cell, calibration, levels (of ``levels_ev``), groups, figures, trust and explanations.

    One function each, called in the order of their side effects (a temperature
    written, figures drawn, explanations saved).
    """
    cell = sections.cell_section(options, ev)
    validation = sections.validation_pass(options, ev)
    calibration, notes = sections.calibration_section(options, ev, validation)
    levels = sections.levels_section(levels_ev)
    groups = sections.group_sections(options, ev)
    figures = figure_sections.figures_section(
        options, ev, cell, calibration, levels, groups, out_dir
    )
    trusted, trust_figures, trust_caveats = _trust(
        options, ev, validation, ood_items, out_dir, adaptation
    )
    figures.update(trust_figures)
    explanations = figure_sections.explanations_section(ev.trained, ev.sampler, out_dir)
    return _Common(
        ev, cell, calibration, notes, levels, groups, figures, trusted, trust_caveats, explanations
    )


def _trust(
    options: EvalOptions,
    ev: EvaluatedSplit,
    validation: trust_sections.ValidationPass,
    ood_items: list[predict_lib.InputImage] | None,
    out_dir: Path,
    adaptation: dict | None,
) -> tuple[dict, dict[str, str], list[str]]:
    """The trust sections (:mod:`leukemia_tf.evaluation.trust_sections`), figure and caveats.

    Returns:
      ``({"selective", "hierarchy", "ood"}, figures, caveats)``; ``ood`` is
      ``None`` without ``ood_items``.
    """
    trained = ev.trained
    scores = trust_sections.scores_of(trained, ev.predictions.outputs)
    selective = trust_sections.selective_section(ev, scores)
    hierarchy = trust_sections.hierarchy_section(ev, scores, validation)
    caveats = trust_sections.caveats(trained, options.tta, adaptation is not None)
    ood = None
    if ood_items is not None:
        images = trust_sections.predict_ood(
            trained, options.ood_images, ood_items, options.batch_size, options.read_threads
        )
        ood, more = trust_sections.ood_section(ev, scores, images)
        caveats += more
    figures = figure_sections.trust_figures(options, selective, out_dir)
    return {"selective": selective, "hierarchy": hierarchy, "ood": ood}, figures, caveats


def _metrics(
    options: EvalOptions,
    adaptation: dict | None,
    data: dict,
    extra: dict,
    common: _Common,
    caveats: list[str],
) -> dict:
    """The contents of ``metrics.json`` from its sections (``extra`` follows ``data``).

    The trust sections (``selective``, ``hierarchy``, ``ood``) follow the slide
    and patient sections. Caveats: those of the explanations (shortcuts on
    burned-in marks) first, then ``caveats``, then the trust caveats.
    """
    trained = common.ev.trained
    return {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": {**sections.model_section(options, trained), "adapted_batchnorm": adaptation},
        "data": data,
        **extra,
        "decisions": report_lib.decisions(trained.config.head == "hierarchical"),
        "cell": common.cell,
        "calibration": common.calibration,
        "levels": common.levels,
        "slide": common.groups["slide"],
        "patient": common.groups["patient"],
        **common.trusted,
        "explanations": common.explanations,
        "figures": common.figures,
        "caveats": common.explanations.get("caveats", []) + caveats + common.trust_caveats,
        "bootstrap": {
            "n_resamples": options.bootstrap,
            "seed": options.seed,
            "unit": common.cell["ci"]["unit"],
        },
    }


# ------------------------------------------------------------ image files
def evaluate_images(
    model_dir: str | os.PathLike,
    images: str,
    label_map: str | None = None,
    label_column: str = predict_lib.DEFAULT_LABEL_COLUMN,
    path_column: str = predict_lib.DEFAULT_PATH_COLUMN,
    slide_column: str | None = None,
    patient_column: str | None = None,
    data_dir: str | None = None,
    out_dir: str | os.PathLike | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    explain_samples: int = DEFAULT_EXPLAIN_SAMPLES,
    batch_size: int = 64,
    which: str = "best",
    fit_temperature: bool = True,
    tta: bool = False,
    read_threads: int = 8,
    adapt_bn: str = "",
    ood_images: str | None = None,
) -> dict:
    """Evaluates a trained model on labelled image files and writes the report.

    The images are read, decoded and decided as ``python -m
    leukemia_tf.predict`` does (:mod:`leukemia_tf.evaluation.external`), and
    scored by the sections of a split's report, plus an ``external`` section
    (source, labels, label map, dropped and unreadable images, the scores as
    predicted and restricted to the classes present, what was scored at
    which taxonomy level) and ``predictions.csv`` (one row per image).

    Args:
      model_dir: a finished training run's directory (local or ``gs://``).
      images: a folder of label folders (``FOLDER/<label>/*.jpg``) or a CSV file.
      label_map: JSON / YAML file ``{their label: class or node, or null}``.
      label_column: CSV input: the label column.
      path_column: CSV input: the image path column.
      slide_column: CSV input: slide id column (``None``: ``slide_id`` if present).
      patient_column: CSV input: patient id column (``None``: ``patient_id`` if present).
      data_dir: TFDS data directory of the model's validation split (the
        temperature fit); default: the one the model was trained with.
      out_dir: where to write; default :func:`default_images_out_dir`.
      bootstrap, seed, explain_samples, batch_size, which, fit_temperature,
        tta: as for :func:`evaluate`.
      read_threads: threads reading image files.
      adapt_bn: as for :func:`evaluate`.
      ood_images: as for :func:`evaluate`, against these images; the report
        goes to ``eval_images_<name>_ood_<ood name>`` by default.

    Returns:
      The contents of ``metrics.json``, plus ``out_dir``, ``report_path`` and
      ``metrics_path``.

    Raises:
      FileNotFoundError: ``model_dir`` is not a training run, or no images.
      ValueError: an option out of range, a bad CSV, or labels that name no
        class (:class:`external.LabelError`, naming the label, the source and
        the classes, or the label map file).
    """
    start = time.time()
    source = external.ImageSource(
        images,
        label_map=label_map,
        label_column=label_column,
        path_column=path_column,
        slide_column=slide_column,
        patient_column=patient_column,
        read_threads=read_threads,
    )
    options = EvalOptions(
        split=f"images:{source.name}",
        data_dir=data_dir,
        bootstrap=bootstrap,
        seed=seed,
        explain_samples=explain_samples,
        batch_size=batch_size,
        which=which,
        fit_temperature=fit_temperature,
        tta=tta,
        ood_images=ood_images,
        read_threads=read_threads,
    )
    # Inputs first: a wrong path fails before the model is read.
    external.read_labelled_images(source)
    ood_items = trust_sections.collect_ood(ood_images) if ood_images else None
    trained = rundir.load_trained_model(model_dir, which=options.which, tta=options.tta)
    targets = external.Targets.of(trained)
    labelled = external.labelled_images(source, targets)
    inputs = [item.path for item in labelled.items]
    trained, adaptation = _adapt(trained, adapt_bn, inputs, options)
    if adaptation is not None:
        options = dataclasses.replace(options, fit_temperature=False)  # as in evaluate()
    target = (
        os.fspath(out_dir)
        if out_dir
        else default_images_out_dir(
            trained.model_dir,
            images,
            options.which,
            options.tta,
            adaptation is not None,
            options.ood_images,
        )
    )
    return _run_into(
        target,
        lambda local: _evaluate_images(
            trained, options, targets, labelled, local, start, adaptation, ood_items
        ),
    )


def _evaluate_images(
    trained: rundir.TrainedModel,
    options: EvalOptions,
    targets: external.Targets,
    labelled: external.LabelledImages,
    out_dir: Path,
    start: float,
    adaptation: dict | None = None,
    ood_items: list[predict_lib.InputImage] | None = None,
) -> dict:
    """:func:`evaluate_images` of the loaded model into the local folder ``out_dir``."""
    sampler = explain_lib.ExampleSampler(
        len(trained.class_names), options.explain_samples, seed=options.seed
    )
    predicted = external.predict_images(
        trained,
        labelled,
        targets,
        options.batch_size,
        sampler,
        features=trust_sections.needs_features(trained),
    )
    ev = external.evaluated_split(trained, predicted, sampler)
    if not len(ev.y_true):
        raise ValueError(
            f"--images={labelled.source.images!r}: every label is coarser than the model's "
            f"classes ({', '.join(trained.class_names)}), so nothing can be scored at class "
            "level; label at least some images with a class (or a node below one)"
        )
    everything = (
        ev
        if (predicted.class_labels >= 0).all()
        else external.evaluated_split(trained, predicted, sampler, class_level=False)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    common = _common_sections(options, ev, everything, ood_items, out_dir, adaptation)
    units, _ = sections.bootstrap_units(ev.predictions)
    restricted = external.restricted_scores(ev, units, options.bootstrap, options.seed)
    present = sorted(int(c) for c in np.unique(ev.y_true))
    external.write_predictions(
        str(out_dir / external.PREDICTIONS_FILE), predicted, trained.class_names, present
    )
    section = external.external_section(
        predicted, targets, ev, common.cell, restricted, common.levels
    )
    data = sections.data_section(options, ev)
    data.update(datasets=section["source"], data_dir=None, sources=[section["source"]])
    data.update(n_in_split=section["n_images"], n_excluded=section["n_images"] - len(ev.y_true))
    ids = (ev.predictions.patient_id != "").any() or (ev.predictions.slide_id != "").any()
    # patient_ids=True: the split-leakage caveat is about TFDS splits.
    caveats = common.caveats(patient_ids=True, n_excluded=0)
    caveats += report_lib.external_caveats(section, group_ids=bool(ids))
    result = _metrics(options, adaptation, data, {"external": section}, common, caveats)
    return _write(result, out_dir, start)
