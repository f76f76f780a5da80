"""The Markdown report of an evaluation, and all of its prose.

Written for a clinical reader first: what was evaluated on which data, the
headline figures with 95% confidence intervals, sensitivity and specificity
per class, where the model errs (confusion matrices), whether its
probabilities can be taken at face value (calibration), and the caveats that
limit what the numbers mean. Every figure is a PNG next to the report.

:func:`render` writes the report from the ``metrics.json`` contents. The
sentences ``metrics.json`` itself carries (caveats, calibration notes, what a
decision rule or a bootstrap unit is) are worded here too, by the functions
under "Text of metrics.json", so that all report text lives in one module;
the sections (``sections``, ``figure_sections``) and ``evaluate_lib`` decide
which apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

#: Group tables list at most this many slides / patients (all are in metrics.json).
MAX_GROUP_ROWS = 50

#: Classes with fewer evaluated examples than this get the imprecision caveat.
SMALL_SUPPORT = 30

#: First word of the synthetic-data caveat, which the report also shows as a banner.
SYNTHETIC = "SYNTHETIC"


# ------------------------------------------------------ text of metrics.json
def tta_description(tta: bool) -> str:
    """``model.test_time_augmentation``: the views averaged, or none."""
    return "D4 (8 views, mean logits)" if tta else "none"


def decisions(hierarchical: bool) -> str:
    """``decisions``: the rule that turns probabilities into the scored class."""
    return "argmax of the class probabilities at temperature 1" + (
        " (hierarchical head: the marginal probability of each class node, the "
        "product of the per-level conditionals along its path)"
        if hierarchical
        else ""
    )


def resampled_groups(name: str, n_groups: int, n_single: int = 0) -> str:
    """A bootstrap unit of whole groups: ``"patients (12 patients)"``.

    Args:
      name: the group, singular (``"patient"``, ``"slide"``).
      n_groups: how many there are.
      n_single: cells without a group id, resampled one by one.
    """
    text = f"{name}s ({n_groups} {name}s"
    return text + (f"; {n_single} cells without a {name} id resampled singly)" if n_single else ")")


def resampled_cells(n_cells: int) -> str:
    """The bootstrap unit when the split identifies no patients or slides."""
    return f"cells ({n_cells} cells; the split carries no patient or slide ids)"


def no_group_ids(feature: str) -> str:
    """Why a slide or patient section is unavailable."""
    return f"the split carries no {feature}"


def level_marginals(hierarchical: bool) -> str:
    """``levels.marginals``: where the per-level node probabilities come from."""
    if hierarchical:
        return "LabelSpace.level_probabilities (product of the per-level conditionals)"
    return "sums of the flat head's class probabilities under each node"


def calibration_binning(n_bins: int) -> str:
    """``calibration.binning``: the bins of the ECE and the reliability diagram."""
    return (
        f"{n_bins} equal-width bins (b/{n_bins}, (b+1)/{n_bins}] on the maximum class probability"
    )


def temperature_not_refitted(temperature: float) -> str:
    """Note: the evaluation used the stored temperature."""
    return f"temperature not refitted; using the stored T={temperature:.4g}"


def temperature_unusable(val_split: str, error: Exception) -> str:
    """Note: no temperature fitted, the validation split could not be read."""
    return f"temperature not fitted: validation split {val_split!r} unusable ({error})"


def temperature_at_edge(temperature: float, low: float, high: float) -> str:
    """Note: the fitted temperature hit the searched range ``[low, high]``."""
    return (
        f"the fitted temperature T={temperature:.3g} sits at the edge of the searched "
        f"range [{low}, {high}]: the model's confidence is far off (an undertrained "
        "model, or a validation split unlike the training data)"
    )


def temperature_fitted_on_evaluated(split: str) -> str:
    """Note: the temperature was fitted on the split being evaluated."""
    return (
        f"the temperature was fitted on the evaluated split {split!r} itself: its "
        "calibrated figures are optimistic"
    )


def temperature_fitted_on_training(val_split: str, train_split: str) -> str:
    """Note: the temperature was fitted on data the model was trained on (not stored)."""
    return (
        f"the temperature was fitted on {val_split!r}, which the model was trained on "
        f"(--train_split={train_split!r}): it is reported but not "
        "stored, and the calibrated figures mean little; fit it on held-out data"
    )


#: Note: a temperature fitted with test-time augmentation is not stored.
TEMPERATURE_TTA_NOT_STORED = (
    "temperature fitted on the test-time-augmented outputs is reported but not "
    "stored (calibration.json belongs to the single-view model that export serves)"
)


def temperature_checkpoint_not_stored(which: str) -> str:
    """Note: a temperature fitted for a checkpoint other than ``best`` is not stored."""
    return (
        f"temperature fitted for the '{which}' checkpoint is reported but not stored "
        "(calibration.json belongs to the best checkpoint, which export serves)"
    )


#: ``explanations.note`` when explanations are switched off.
EXPLANATIONS_OFF = "explanations switched off (explain_samples=0)"


def no_explainer(error: Exception) -> str:
    """``explanations.note`` when the backbone has no explanation method."""
    return f"no explanation method for this backbone: {error}"


def coarse_explanations(grid: Sequence[int], image_size: int) -> str:
    """``explanations.note`` when the explained feature map is tiny."""
    return (
        f"the explained map is only {grid[0]}x{grid[1]} at this image "
        f"size ({image_size} px): the heat maps are coarse"
    )


def explanation_what(method: str) -> str:
    """``explanations.what``: what the maps of ``method`` show."""
    if method == "Grad-CAM":
        return "Grad-CAM of the predicted class"
    return "Attention rollout of the class token (class-agnostic)"


def explanations_stopped(note: str, error: Exception) -> str:
    """``explanations.note`` after a failure part way (``note``: the note so far)."""
    return (note + "; " if note else "") + f"explanations stopped: {type(error).__name__}: {error}"


def heat_on_marks_caveat(row: dict) -> str:
    """A caveat for a class whose explanation heat lies on burned-in marks (``heat`` row)."""
    return (
        f"Explanations of {row['name']}: {_pct(row['heat_on_marks'])} of the heat lies on "
        f"burned-in marks (scale bars, text) that cover {_pct(row['mark_area'])} of the image "
        f"({row['n_with_mark']} of {row['n_explained']} explained images carry one): the model "
        "may read the mark instead of the cell (a shortcut). Retrain with --erase_marks or "
        "--augment_marks and compare."
    )


def _marks_lines(explanations: dict) -> list[str]:
    """The report's tables of burned-in marks: evaluated images with one, and heat on them."""
    lines = []
    marks = explanations.get("marks")
    if marks and marks["all"]["n"]:
        lines += [
            "Burned-in marks (scale bars, text) detected in the evaluated images, and the "
            "accuracy with and without one (a gap hints at a shortcut):",
            "",
        ]
        lines += _table(
            ["Class", "Images", "With mark", "Accuracy with mark", "Accuracy without"],
            [
                [
                    row["name"],
                    str(row["n"]),
                    f"{row['n_with_mark']} ({_pct(row['share_with_mark'])})",
                    _pct(row["accuracy_with_mark"]),
                    _pct(row["accuracy_without_mark"]),
                ]
                for row in marks["per_class"] + [marks["all"]]
            ],
        )
        lines.append("")
    heat = explanations.get("heat")
    if heat and heat["per_class"]:
        band = _pct(heat["border_fraction"])
        lines += [
            f"Share of the explanation heat on detected marks and on the border band (outer "
            f"{band} of each side), mean over the explained images:",
            "",
        ]
        lines += _table(
            ["Class", "Explained", "With mark", "Heat on marks", "Mark area", "Heat on border"],
            [
                [
                    row["name"],
                    str(row["n_explained"]),
                    str(row["n_with_mark"]),
                    _pct(row["heat_on_marks"]),
                    _pct(row["mark_area"]),
                    _pct(row["heat_on_border"]),
                ]
                for row in heat["per_class"]
            ],
        )
        lines.append("")
    return lines


def caveats(
    notes: Sequence[str],
    *,
    synthetic: bool,
    patient_ids: bool,
    cell: dict,
    explanation_method: str | None,
    n_excluded: int,
) -> list[str]:
    """The caveats of an evaluation, most important first.

    Args:
      notes: notes of the evaluation so far (calibration), kept in order.
      synthetic: the data include the synthetic set.
      patient_ids: the split identifies patients.
      cell: the cell-level scores (:func:`metrics.classification_metrics`).
      explanation_method: the method of the explanation maps, or ``None``.
      n_excluded: examples of the split whose labels map to null.

    Returns:
      One sentence or short paragraph per caveat.
    """
    out = list(notes)
    if synthetic:
        out.insert(
            0,
            f"{SYNTHETIC} data: leukemia_synthetic images are generated caricatures of cells. "
            "These figures test the pipeline and say nothing about performance on real blood "
            "smears.",
        )
    if not patient_ids:
        out.append(
            "No patient ids in this split: the data set was split by image (or by slide), not "
            "by patient, so cells of one patient may be in both the training and the evaluated "
            "split. That leaks patient-specific appearance and usually inflates every figure "
            "here; confidence intervals resample cells as if independent, which makes them too "
            "narrow."
        )
    if cell["classes_absent"]:
        out.append(
            f"Classes absent from this split: {', '.join(cell['classes_absent'])}. The model's "
            "performance on them is unmeasured."
        )
    small = [p["name"] for p in cell["per_class"] if 0 < p["support"] < SMALL_SUPPORT]
    if small:
        out.append(
            f"Fewer than {SMALL_SUPPORT} examples of {', '.join(small)}: their per-class figures "
            "are imprecise (see the confidence intervals of the headline figures)."
        )
    out.append(
        "Cell-level figures count cells; a diagnosis is made per patient. Cells of one patient "
        "are correlated, which the patient-level bootstrap accounts for only where patient ids "
        "exist."
    )
    if explanation_method:
        out.append(
            f"{explanation_method} maps show where the model's evidence lies, not why; they "
            "are for spotting shortcuts (background, staining, borders), not for diagnosis."
        )
    if n_excluded:
        out.append(
            f"{n_excluded} examples of the split are not evaluated: their "
            "labels map to null in the taxonomy (excluded on purpose, e.g. smudge cells)."
        )
    return out


def external_caveats(section: dict, group_ids: bool) -> list[str]:
    """The caveats of an evaluation on image files (the ``external`` section).

    Args:
      section: the ``external`` section of ``metrics.json``.
      group_ids: the images carry slide or patient ids.
    """
    out = [
        "These images come from outside the model's data sets: other microscopes, stains, "
        "magnifications and crops, and labels defined by another team (mapped onto the "
        "model's classes"
        + (" by the label map" if section.get("label_map") else " by name")
        + "). Differences from the model's own test split measure that shift as much as the "
        "model."
    ]
    if not group_ids:
        out.append(
            "No patient or slide ids for these images: confidence intervals resample images as "
            "if independent, which makes them too narrow when several come from one patient "
            "or smear (give a CSV with slide_id / patient_id columns)."
        )
    if section["classes_absent"]:
        out.append(
            f"{len(section['classes_absent'])} of the model's classes are absent from the "
            "labels; the scores restricted to the classes present (argmax over those only) "
            "show what the model does when told which classes can occur."
        )
    if section["n_dropped"]:
        dropped = ", ".join(f"{k} ({v})" for k, v in section["dropped"].items())
        out.append(
            f"{section['n_dropped']} images are not evaluated: their labels map to null "
            f"({dropped})."
        )
    if section["n_unlabelled"]:
        out.append(f"{section['n_unlabelled']} rows without a label are not evaluated.")
    if section["n_unreadable"]:
        out.append(
            f"{section['n_unreadable']} image files could not be read and are not evaluated "
            "(listed in metrics.json)."
        )
    coarse = section["scored"].get("coarser_than_classes")
    if coarse:
        out.append(
            f"{coarse['n']} images are labelled with taxonomy nodes coarser than the model's "
            f"classes ({', '.join(coarse['targets'])}): they are scored at the taxonomy levels "
            f"their label reaches only; the score that counts is the "
            f"{section['scored']['headline']} score."
        )
    return out


# ------------------------------------------- knowing when not to answer
SELECTIVE_CONVENTION = (
    "confidence = the score oriented so that higher is more trustworthy; the images are "
    "accepted from the most confident down, ties together. Coverage: the fraction accepted; "
    "risk: the error rate (1 - accuracy of the argmax class) among the accepted. AURC: the "
    "area under the risk-coverage curve (lower is better); excess AURC: minus that of the "
    "best possible ordering with the same errors"
)
HIERARCHY_CONVENTION = (
    "mistake severity: the height of the lowest common ancestor (LCA) of the true and the "
    "predicted class above the bottom level (1: siblings; the virtual root: the number of "
    "levels), averaged over the errors; hierarchical distance@k: the mean LCA height of the "
    "k most probable classes (a correct class counts 0). Hierarchical precision / recall: "
    "each node with its ancestors, micro-averaged. Back-off: the top-down greedy walk stops "
    "at the first level whose node probability is below that level's threshold and answers "
    "the deepest node accepted (none: the image is referred); an answer is right when it is "
    "the true node or an ancestor of it; specificity 1 - log(#classes under the answer) / "
    "log(#classes) (a class: 1, no answer: 0)"
)
OOD_CONVENTION = (
    "the evaluated images are the in-distribution (ID) set and the --ood_images the "
    "out-of-distribution (OOD) set. AUROC: the chance that an OOD image is scored less "
    "trustworthy than an ID image (0.5: no separation, 1: perfect; ties count half). FPR at "
    "95% TPR: the fraction of OOD images still accepted at the threshold that accepts 95% of "
    "the ID images (lower is better). Flagged: the fraction the fitted referral threshold "
    "refers"
)
NO_TAXONOMY = "the run has no taxonomy (no mistake severity or hierarchical scores)"


def trust_not_fitted(command: str) -> str:
    """The run has no trust statistics: only the logit scores, no referral or back-off."""
    return (
        "No trust statistics for this model (trust.json: a run trained before they existed, or "
        "never fitted): only the logit scores (max_probability, margin, energy) are reported, "
        "without the feature scores (Mahalanobis, k-NN), the referral threshold or the fitted "
        f"back-off. Fit them with `{command}` and evaluate again."
    )


#: Why a fold ensemble (``crossval --ensemble``) has no trust statistics.
ENSEMBLE_WITHOUT_TRUST = (
    "A fold ensemble has no trust statistics (each fold model has its own feature space): only "
    "the logit scores (max_probability, margin, energy; the energy is the mean of the fold "
    "models') are reported, without the feature scores (Mahalanobis, k-NN), a referral "
    "threshold or a fitted back-off."
)


def no_trust(command: str | None) -> str:
    """:func:`trust_not_fitted` of ``command``, or :data:`ENSEMBLE_WITHOUT_TRUST` when None."""
    return ENSEMBLE_WITHOUT_TRUST if command is None else trust_not_fitted(command)


def referral_not_fitted(command: str) -> str:
    return (
        "the trust statistics were fitted without a calibration (validation) split, so no "
        f"referral threshold or back-off thresholds exist; refit with `{command} "
        "--calibration_split=SPLIT`"
    )


def referral_rule(selection: dict) -> str:
    """``refer when max_probability < 0.83`` (or: refer every image)."""
    threshold = selection["threshold"]
    if threshold is None:
        return "refer every image (the fitted risk target is out of reach)"
    higher = selection.get("higher_is_trust", True)
    rule = f"refer when {selection['score']} {'<' if higher else '>'} {threshold:.6g}"
    gate = selection.get("ood_score")
    if gate and selection.get("ood_threshold") is not None:
        from leukemia_tf.models.trust import HIGHER_IS_TRUST

        sign = "<" if HIGHER_IS_TRUST[gate] else ">"
        rule += (
            f" (uncertain) or when {gate} {sign} {selection['ood_threshold']:.6g} "
            f"(out of distribution: beyond {_pct(selection.get('ood_acceptance'))} of the "
            "validation images)"
        )
    return rule


def curve_without_validation(split: str, error) -> str:
    return (
        f"the validation split {split!r} could not be read ({error}), so no back-off "
        "thresholds could be fitted per target accuracy"
    )


def curve_on_validation(split: str) -> str:
    return (
        f"the evaluated split is the validation split {split!r} itself: the thresholds are "
        "fitted and scored on the same images, so the curve is optimistic"
    )


def trust_fitted_single_view(tta: bool, adapted: bool) -> str:
    what = " and ".join(
        x for x, on in (("test-time augmentation", tta), ("adapted BatchNorm", adapted)) if on
    )
    return (
        f"The trust statistics and thresholds were fitted on the model without {what}; the "
        "scores here are computed with it, so the fitted referral and back-off may not keep "
        "their target coverage and accuracy."
    )


def ood_looks_like_class(folder: str, class_name: str, n_images: int) -> str:
    return (
        f"--ood_images: {n_images} images under '{folder}/' look like the model's own class "
        f"'{class_name}': if they are, they are not out-of-distribution, and the OOD figures "
        "understate how well the scores separate unseen inputs."
    )


def ood_unreadable(n_unreadable: int, n_images: int) -> str:
    return (
        f"{n_unreadable} of the {n_images} --ood_images files could not be read and are not "
        "scored (listed in metrics.json under ood.unreadable)."
    )


def ood_score_not_finite(name: str, n_id: int, n_ood: int) -> str:
    return f"{name}: {n_id} ID and {n_ood} OOD scores are not finite"


_HEADLINE_NAMES = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy (mean sensitivity)",
    "macro_f1": "Macro-F1",
    "macro_roc_auc": "Macro ROC-AUC (one-vs-rest)",
}


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt(name: str, value) -> str:
    return _num(value) if "auc" in name else _pct(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def _headline_rows(scored: dict) -> list[list[str]]:
    ci = scored.get("ci", {})
    rows = []
    for key, label in _HEADLINE_NAMES.items():
        interval = ci.get(key) or {}
        low, high = interval.get("low"), interval.get("high")
        text = f"{_fmt(key, low)} – {_fmt(key, high)}" if low is not None else "n/a"
        rows.append([label, _fmt(key, scored.get(key)), text])
    return rows


def _per_class_rows(scored: dict) -> list[list[str]]:
    return [
        [
            p["name"],
            str(p["support"]),
            str(p["n_predicted"]),
            _pct(p["recall"]),
            _pct(p["specificity"]),
            _pct(p["precision"]),
            _pct(p["f1"]),
            _num(p["roc_auc"]),
        ]
        for p in scored["per_class"]
    ]


_PER_CLASS_HEADER = [
    "Class",
    "Support",
    "Predicted",
    "Sensitivity (recall)",
    "Specificity",
    "Precision (PPV)",
    "F1",
    "ROC-AUC",
]


def _confusion_rows(matrix: Sequence[Sequence[int]], names: Sequence[str]) -> list[list[str]]:
    return [[f"**{names[i]}**", *[str(v) for v in row]] for i, row in enumerate(matrix)]


def _image(lines: list[str], figures: dict, key: str, alt: str) -> None:
    if key in figures:
        lines += [f"![{alt}]({figures[key]})", ""]


def _basename(path: str) -> str:
    # Not pathlib: the model_dir may be a URL (gs://bucket/run).
    return path.rstrip("/").rsplit("/", 1)[-1]


def ensemble_description(record: dict) -> str:
    """One line on a fold ensemble (its ``ensemble.json``) for the reports."""
    folds = ", ".join(f"fold_{i}" for i in record.get("folds", []))
    return f"{len(record.get('folds', []))} fold models ({folds}); {record.get('averaging')}"


def render(result: dict) -> str:
    """The report's Markdown text from an evaluation result (``metrics.json``)."""
    model, data, cell = result["model"], result["data"], result["cell"]
    cal, figures = result["calibration"], result["figures"]
    names = model["class_names"]
    external = result.get("external")
    lines = [
        f"# Evaluation report: {_basename(model['model_dir'])} on "
        + (
            f"the images of `{external['source']}`"
            if external
            else f"`{data['datasets']}` [{data['split']}]"
        ),
        "",
    ]
    synthetic = [c for c in result["caveats"] if c.startswith(SYNTHETIC)]
    if synthetic:
        lines += [f"> **{synthetic[0]}**", ""]

    lines += ["## What was evaluated", ""]
    rows = [
        ["Model directory", f"`{model['model_dir']}`"],
        ["Checkpoint", model["checkpoint"]],
        ["Test-time augmentation", model.get("test_time_augmentation", "none")],
        ["Backbone / head", f"{model['backbone']} / {model['head']}"],
        *(
            [["Fold ensemble", ensemble_description(model["ensemble"])]]
            if model.get("ensemble")
            else []
        ),
        ["Input size", f"{model['image_size']} px"],
        ["Classes", ", ".join(names)],
        ["Labels", model["label_mode"] + (f" ({model['taxonomy']})" if model["taxonomy"] else "")],
        *(
            [["Images", f"`{external['source']}` ({external['kind']})"]]
            if external
            else [
                ["Data sets", f"`{data['datasets']}`"],
                ["Data directory", f"`{data['data_dir'] or 'TFDS default'}`"],
                ["Split", f"`{data['split']}`"],
            ]
        ),
        ["Cells evaluated", str(data["n_examples"])],
        ["Slides / patients", f"{data['n_slides']} / {data['n_patients']}"],
        ["Decisions", result["decisions"]],
        ["Created", result["created"]],
    ]
    lines += _table(["Item", "Value"], rows)

    if external:
        lines += _external_section(external)
    ci = cell["ci"]
    lines += [
        "## Headline (cell level)",
        "",
        *_table(["Metric", "Value", f"{int(100 * ci['confidence'])}% CI"], _headline_rows(cell)),
        f"Confidence intervals: {ci['method']} bootstrap, {ci['n_resamples']} resamples of "
        f"{ci['unit']}. Macro averages run over the {len(cell['classes_present'])} classes "
        "present in this split.",
        "",
    ]
    for note in cell["notes"]:
        lines += [f"- {note}"]
    if cell["notes"]:
        lines += [""]

    lines += ["## Per class", "", *_table(_PER_CLASS_HEADER, _per_class_rows(cell))]
    lines += [
        "Sensitivity: the share of a class's cells recognised as that class. Specificity: the "
        "share of the other cells not called that class. Precision: the share of cells called "
        "that class that really are. n/a: undefined (no such cells, or none predicted).",
        "",
    ]

    lines += ["## Confusion matrix", "", "Rows: true class; columns: predicted class.", ""]
    lines += _table(["true \\ predicted", *names], _confusion_rows(cell["confusion_matrix"], names))
    _image(lines, figures, "confusion_matrix", "confusion matrix")
    lines += ["## ROC curves", ""]
    _image(lines, figures, "roc_curves", "ROC curves")

    lines += ["## Calibration", ""]
    fitted = (
        f"fitted on the `{cal['fitted_on']}` split ({cal['n_fit']} cells) by minimising the "
        "negative log-likelihood"
        if cal.get("fitted_on")
        else "not refitted (the stored value)"
    )
    stored = " and stored in `calibration.json` next to the model" if cal.get("stored") else ""
    lines += [
        f"Temperature T = {cal['temperature']:.4g}, {fitted}{stored}. Calibrated probabilities "
        "divide every logit by T. ECE: expected calibration error, "
        f"{cal['binning']}; lower is better.",
        "",
        *_table(
            ["On this split", "Before (T = 1)", f"After (T = {cal['temperature']:.3g})"],
            [
                ["ECE", _num(cal["ece_before"]), _num(cal["ece_after"])],
                ["NLL", _num(cal["nll_before"]), _num(cal["nll_after"])],
            ],
        ),
    ]
    if cal.get("decisions_changed"):
        lines += [
            f"Scaling by T changes {cal['decisions_changed']} argmax decisions on this split "
            "(possible with a hierarchical head); the figures above use T = 1.",
            "",
        ]
    _image(lines, figures, "reliability", "reliability diagram")

    levels = result.get("levels")
    if levels:
        lines += _levels_section(levels, figures)
    for key in ("slide", "patient"):
        lines += _group_section(key, result[key], names, figures)

    if result.get("selective"):
        lines += _trust_section(result, names, figures)

    explanations = result["explanations"]
    lines += ["## Explanations", ""]
    if explanations.get("method"):
        lines += [
            f"{explanations['what']} on `{explanations['layer']}` "
            f"({explanations['grid'][0]}x{explanations['grid'][1]} map, upsampled), for up to "
            "a few randomly chosen correct and wrong predictions of each true class. Each pair "
            "shows the cell and the map over it (red: most evidence).",
            "",
        ]
    if explanations.get("note"):
        lines += [f"Note: {explanations['note']}", ""]
    lines += _marks_lines(explanations)
    for path in explanations.get("files", []):
        lines += [f"![{Path(path).stem}]({path})", ""]

    all_caveats = list(explanations.get("caveats", [])) + list(result["caveats"])
    lines += ["## Caveats", ""] + [f"- {c}" for c in all_caveats] + [""]
    lines += [
        "## Files",
        "",
        "- `metrics.json`: every number above, plus every slide and patient",
        *(
            [f"- `{external['predictions_file']}`: every image's label and prediction"]
            if external
            else []
        ),
        *[f"- `{path}`" for path in figures.values()],
        *[f"- `{path}`" for path in explanations.get("files", [])],
        "",
        f"Evaluation took {result['seconds']:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def _levels_section(levels: dict, figures: dict) -> list[str]:
    lines = [
        "## Taxonomy levels",
        "",
        "Each level is scored on the cells whose label reaches it. Decision rule: a top-down "
        "greedy walk (at each level the most probable child of the node chosen above), which is "
        "consistent down the tree by construction. The per-level argmax of the marginal "
        f"probabilities ({levels['marginals']}) is shown for comparison: it need not form a "
        "path.",
        "",
    ]
    rows = []
    for entry in levels["levels"]:
        if "greedy" not in entry:
            rows.append([str(entry["level"]), str(entry["n"]), "—", "—", "—", "—", "—"])
            continue
        greedy, argmax = entry["greedy"], entry["marginal_argmax"]
        rows.append(
            [
                str(entry["level"]),
                str(entry["n"]),
                _pct(greedy["accuracy"]),
                _pct(greedy["balanced_accuracy"]),
                _pct(greedy["macro_f1"]),
                _num(greedy["macro_roc_auc"]),
                _pct(argmax["accuracy"]),
            ]
        )
    lines += _table(
        [
            "Level",
            "Cells",
            "Accuracy",
            "Balanced accuracy",
            "Macro-F1",
            "Macro ROC-AUC",
            "Accuracy (marginal argmax)",
        ],
        rows,
    )
    consistency = levels["consistency"]
    lines += [
        "Consistency down the tree (share of cells whose decided nodes form a path over the "
        "levels their label reaches):",
        "",
        f"- greedy walk: {_pct(consistency['greedy']['fraction'])} "
        f"of {consistency['greedy']['n_checked']} cells",
        f"- per-level argmax of the marginals: {_pct(consistency['marginal_argmax']['fraction'])}"
        f" ({consistency['marginal_argmax']['n_inconsistent']} inconsistent)",
        f"- class decision lies on the greedy path: {_pct(levels['class_agrees_with_greedy'])}",
    ]
    if levels.get("marginal_sum_max_error") is not None:
        lines += [
            "- largest gap between a parent's probability and the sum of its children's: "
            f"{levels['marginal_sum_max_error']:.2e}"
        ]
    lines += [""]
    for entry in levels["levels"]:
        if "greedy" not in entry:
            lines += [f"Level {entry['level']}: {entry['skipped']}.", ""]
            continue
        k = entry["level"]
        scored = entry["greedy"]
        present = set(scored["classes_present"])
        rows = [r for r in _per_class_rows(scored) if r[0] in present or r[2] != "0"]
        lines += [f"### Level {k}: {', '.join(entry['nodes'])}", ""]
        lines += _table(_PER_CLASS_HEADER, rows)
        if scored.get("no_decision"):
            lines += [
                f"{sum(scored['no_decision'])} cells got no decision at this level (the walk "
                "stopped at a leaf above); they count as wrong.",
                "",
            ]
        _image(lines, figures, f"confusion_level_{k}", f"confusion matrix, level {k}")
    return lines


def _group_section(key: str, section: dict, names: Sequence[str], figures: dict) -> list[str]:
    title = key.capitalize()
    lines = [f"## {title} level", ""]
    if not section.get("available"):
        return lines + [f"Not available: {section['reason']}.", ""]
    lines += [
        f"{section['n_groups']} {key}s. Each {key}'s prediction pools its cells: **mean "
        "probability** (the class with the highest mean probability) and **majority vote** "
        "(the class most cells are assigned to; ties go to the higher mean probability).",
        "",
    ]
    if section.get("n_cells_without_id"):
        lines += [f"{section['n_cells_without_id']} cells without a {key} id are left out.", ""]
    if not section.get("labelled"):
        lines += [f"Not scored: {section['reason']}", ""]
    else:
        rows = []
        for method, scored in section["methods"].items():
            for label, value, interval in _headline_rows(scored):
                if method == "majority_vote" and "AUC" in label:
                    continue
                rows.append([method.replace("_", " "), label, value, interval])
        unit = section["methods"]["mean_probability"]["ci"]["unit"]
        lines += _table(["Method", "Metric", "Value", "95% CI"], rows)
        lines += [f"Confidence intervals resample {unit}.", ""]
        _image(lines, figures, f"confusion_{key}", f"confusion matrix, {key} level")
    groups = section["groups"]
    rows = [
        [
            g["id"],
            g["label"] or "?",
            str(g["n_cells"]),
            f"{g['mean_prediction']} ({_pct(g['mean_probability'])})",
            f"{g['majority_prediction']} ({g['votes']}/{g['n_cells']})",
            ""
            if g["label"] is None
            else ("yes" if g["mean_prediction"] == g["label"] else "**no**"),
        ]
        for g in groups[:MAX_GROUP_ROWS]
    ]
    lines += _table(
        [title, "True", "Cells", "Mean probability", "Majority vote", "Mean correct"], rows
    )
    if len(groups) > MAX_GROUP_ROWS:
        lines += [f"First {MAX_GROUP_ROWS} of {len(groups)} {key}s; all are in metrics.json.", ""]
    return lines


def _external_section(external: dict) -> list[str]:
    """``## Images``: the labels, what they map to, and the scores as predicted and restricted."""
    lines = ["## Images", ""]
    map_file = external.get("label_map_file")
    lines += [
        f"{external['n_evaluated']} of {external['n_images']} images of "
        f"`{external['source']}` evaluated; labels from "
        + (
            f"the `{external['label_column']}` column"
            if external["kind"] == "csv"
            else "the sub-folder names"
        )
        + (f", mapped by `{map_file}`" if map_file else ", matched to the model's names")
        + ".",
        "",
    ]
    rows = [
        [
            label,
            str(entry["n"]),
            entry["target"] or "*dropped (null)*",
            entry["class"] or ("—" if entry["target"] is None else "— (taxonomy levels only)"),
        ]
        for label, entry in external["labels"].items()
    ]
    lines += _table(
        ["Label", "Images", f"Maps to ({external['targets']})", "Class-level class"], rows
    )
    for key, text in (
        ("n_dropped", "mapped to null, not evaluated"),
        ("n_unlabelled", "without a label, not evaluated"),
        ("n_unreadable", "unreadable, not evaluated"),
    ):
        if external[key]:
            lines += [f"- {external[key]} image(s) {text}"]
    if external["classes_absent"]:
        lines += [
            f"- classes of the model absent from the labels: {', '.join(external['classes_absent'])}"
            " (no recall or F1 for them; macro averages run over the classes present)"
        ]
    scored = external["scored"]
    lines += [f"- the score that counts: **{scored['headline']}**", ""]

    restricted = external["restricted_to_present"]
    as_predicted = external["as_predicted"]
    rows = []
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        interval = restricted["ci"].get(key) or {}
        low, high = interval.get("low"), interval.get("high")
        rows.append(
            [
                _HEADLINE_NAMES[key],
                _pct(as_predicted[key]),
                _pct(restricted[key]),
                f"{_pct(low)} – {_pct(high)}" if low is not None else "n/a",
            ]
        )
    lines += [
        "### As predicted and restricted to the classes present",
        "",
        "As predicted: the argmax over all of the model's classes (the headline below). "
        f"Restricted: the argmax over the {len(restricted['classes'])} classes present in the "
        f"labels only ({', '.join(restricted['classes'])}); it changes "
        f"{restricted['n_changed']} decisions.",
        "",
        *_table(["Metric (class level)", "As predicted", "Restricted", "Restricted 95% CI"], rows),
    ]
    if "headline_scores" in scored:
        head = scored["headline_scores"]
        lines += [
            f"### {scored['headline'].capitalize()}",
            "",
            f"Some labels are coarser than the model's classes, so the score that counts is "
            f"the one at taxonomy level {head['level']} (greedy decisions over "
            f"{', '.join(head['nodes'])}; {head['n']} images). The class-level sections below "
            f"score the {scored['class_level']['n']} images whose label is a class or lies "
            "below one.",
            "",
            *_table(
                ["Metric", "Value"],
                [[_HEADLINE_NAMES[k], _fmt(k, head[k])] for k in _HEADLINE_NAMES],
            ),
        ]
    return lines


def _coverage_cells(summary: dict, key: str) -> list[str]:
    at = summary.get("at_coverage", {})
    return [_pct((at.get(f"{c:g}") or {}).get(key)) for c in (0.8, 0.9, 0.95)]


def _trust_section(result: dict, names: Sequence[str], figures: dict) -> list[str]:
    """``## Knowing when not to answer``: selective scores, referral, back-off, OOD."""
    selective, hierarchy, ood = result["selective"], result.get("hierarchy"), result.get("ood")
    lines = [
        "## Knowing when not to answer",
        "",
        f"Each image gets trust scores; {selective['convention']}.",
        "",
    ]
    if not selective["trust_fitted"]:
        lines += [f"> {no_trust(selective['fit_command'])}", ""]
    rows = []
    for name, row in selective["scores"].items():
        if "error" in row:
            rows.append([name, "higher" if row["higher_is_trust"] else "lower", row["error"]])
            continue
        rows.append(
            [
                f"**{name}**" if name == selective["best_score"] else name,
                "higher" if row["higher_is_trust"] else "lower",
                _num(row["aurc"], 4),
                _num(row["excess_aurc"], 4),
                *_coverage_cells(row, "accuracy"),
                _pct(row["accuracy"]),
            ]
        )
    lines += _table(
        [
            "Score",
            "Trusted when",
            "AURC",
            "Excess AURC",
            "Accuracy at 80%",
            "at 90%",
            "at 95%",
            "at 100% coverage",
        ],
        rows,
    )
    if selective["best_score"]:
        lines += [f"Lowest AURC: **{selective['best_score']}**.", ""]
    _image(lines, figures, "risk_coverage", "risk-coverage curves")

    referral = selective["referral"]
    lines += ["### Referral", ""]
    if not referral.get("available"):
        lines += [f"No referral: {referral['reason']}", ""]
    else:
        fitted = (
            f"coverage {_pct(referral['target_value'])}"
            if referral["target"] == "coverage"
            else f"risk at most {_pct(referral['target_value'])}"
        )
        ratio = referral["risk_ratio"]
        lines += [
            f"Fitted rule: {referral['rule']} (fitted on `{referral['fitted_on']}` for {fitted}). "
            f"On these images it refers {referral['n_referred']} of {referral['n']} "
            f"({_pct(referral['fraction_referred'])}); the risk among the accepted is "
            f"{_pct(referral['risk_accepted'])} against {_pct(referral['full_coverage_risk'])} "
            "at full coverage" + ("" if ratio is None else f" (ratio {ratio:.2f})") + ".",
            "",
        ]
    group_rows = []
    for key in ("slide", "patient"):
        group = selective.get(key) or {}
        if not group.get("available"):
            continue
        group_rows.append(
            [
                key,
                str(group["n_groups"]),
                f"{group['n_referred']} ({_pct(1 - group['coverage'])})",
                _pct(group["accuracy"]),
                _pct(group["full_coverage_accuracy"]),
            ]
        )
    if group_rows:
        lines += [
            f"A slide or patient is referred when more than "
            f"{_pct(referral['max_referred_fraction'])} of its cells are; an accepted one is "
            "decided by the mean probability of its accepted cells.",
            "",
            *_table(
                ["Level", "Groups", "Referred", "Accuracy (accepted)", "Accuracy (all, mean)"],
                group_rows,
            ),
        ]

    if hierarchy:
        lines += _hierarchy_lines(hierarchy)
    if ood:
        lines += _ood_lines(ood)
    return lines


def _hierarchy_lines(hierarchy: dict) -> list[str]:
    lines = ["### Mistakes and back-off", "", f"Conventions: {hierarchy['convention']}.", ""]
    severity = hierarchy.get("mistake_severity")
    if severity:
        distance = hierarchy["hierarchical_distance"]
        prf = hierarchy["hierarchical_prf"]
        histogram = ", ".join(f"height {h}: {n}" for h, n in severity["histogram"].items())
        lines += _table(
            ["Mistake severity", "Value"],
            [
                ["Errors", f"{severity['n_errors']} of {severity['n']}"],
                ["Mean LCA height of the errors", _num(severity["mean_lca_height"], 2)],
                ["Errors by LCA height", histogram or "none"],
                ["Hierarchical distance@1", _num(distance["at_1"], 3)],
                ["Hierarchical distance@3", _num(distance["at_3"], 3)],
                [
                    "Hierarchical precision / recall / F1",
                    " / ".join(_pct(prf[k]) for k in ("precision", "recall", "f1")),
                ],
            ],
        )
    elif hierarchy.get("reason"):
        lines += [f"No mistake severity: {hierarchy['reason']}.", ""]
    backoff = hierarchy["backoff"]
    tree = "the taxonomy" if backoff["tree"] == "taxonomy" else "the classes (one level)"
    summary = backoff.get("summary")
    if summary:
        fitted = backoff["fitted"]
        thresholds = ", ".join(
            f"level {k}: {'never' if t is None else f'{t:.4g}'}"
            for k, t in enumerate(fitted["thresholds"] or [])
        )
        lines += [
            f"Back-off over {tree}, thresholds fitted on `{fitted['fitted_on']}` for accuracy "
            f"{_pct(fitted['accuracy'])} per level ({thresholds}):",
            "",
            *_table(
                [
                    "Accuracy (answered)",
                    "Mean specificity",
                    "Abstained",
                    *[f"Answered to level {k}" for k in range(len(summary["answered_at_level"]))],
                ],
                [
                    [
                        _pct(summary["accuracy"]),
                        _num(summary["mean_specificity"]),
                        f"{summary['abstained']} ({_pct(summary['abstained_fraction'])})",
                        *[_pct(v) for v in summary["answered_at_level"]],
                    ]
                ],
            ),
        ]
    else:
        lines += [f"No fitted back-off: {backoff.get('reason')}", ""]
    curve = hierarchy["accuracy_specificity"]
    if curve.get("curve"):
        lines += [
            f"Accuracy-specificity curve over {tree}: thresholds fitted on `{curve['fitted_on']}` "
            f"({curve['n_fit']} images) for each target accuracy, applied to these images.",
            "",
        ]
        if curve.get("note"):
            lines += [f"Note: {curve['note']}.", ""]
        lines += _table(
            ["Target accuracy", "Accuracy (answered)", "Mean specificity", "Abstained"],
            [
                [
                    _pct(point["target_accuracy"]),
                    _pct(point["accuracy"]),
                    _num(point["mean_specificity"]),
                    _pct(point["abstained_fraction"]),
                ]
                for point in curve["curve"]
            ],
        )
    else:
        lines += [f"No accuracy-specificity curve: {curve.get('reason')}.", ""]
    return lines


def _ood_lines(ood: dict) -> list[str]:
    lines = [
        "### Out-of-distribution images",
        "",
        f"{ood['n_scored']} of the {ood['n_images']} images of `{ood['source']}` scored "
        f"({ood['n_unreadable']} unreadable) against the {ood['n_id']} evaluated images. "
        f"Conventions: {ood['convention']}.",
        "",
    ]
    for warning in ood.get("warnings", []):
        lines += [f"> **Warning:** {warning}", ""]
    if ood.get("note"):
        lines += [f"> {ood['note']}", ""]
    rows = []
    for name, row in ood["scores"].items():
        if "error" in row:
            rows.append([name, row["error"], "", ""])
            continue
        flagged = (
            f"{_pct(row['flagged_ood'])} (ID: {_pct(row['flagged_id'])})"
            if "flagged_ood" in row
            else ""
        )
        label = f"**{name}**" if name == ood["best_score"] else name
        rows.append([label, _num(row["auroc"]), _pct(row["fpr_at_95_tpr"]), flagged])
    lines += _table(["Score", "AUROC", "FPR at 95% TPR", "Flagged by the referral"], rows)
    if ood.get("n_referred") is not None:
        lines += [
            f"The fitted referral (uncertain or out of distribution) refers "
            f"{ood['n_referred']} of these {ood['n_scored']} images "
            f"({_pct(ood['fraction_referred'])}), against {_pct(ood['id_fraction_referred'])} "
            "of the evaluated images.",
            "",
        ]
    if ood.get("best_score"):
        lines += [f"Best separating score: **{ood['best_score']}**.", ""]
    if ood["unreadable"]:
        lines += ["Unreadable:", ""]
        lines += [f"- `{path}`: {reason}" for path, reason in ood["unreadable"][:MAX_GROUP_ROWS]]
        lines += [""]
    return lines
