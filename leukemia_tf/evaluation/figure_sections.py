"""The drawn sections of an evaluation: figures and explanation maps, as PNG files.

:func:`figures_section` draws the confusion matrices, ROC curves and
reliability diagram from the scored sections (and :func:`trust_figures` the
risk-coverage curves of the trust scores)
(:mod:`leukemia_tf.evaluation.sections`); :func:`explanations_section` draws
Grad-CAM or attention-rollout maps of the sampled examples. Both write into
a local folder and return the paths relative to it, as ``metrics.json``
and the report name them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from absl import logging

from leukemia_tf import rundir
from leukemia_tf.evaluation import explain as explain_lib
from leukemia_tf.evaluation import figures as figures_lib
from leukemia_tf.evaluation import report as report_lib
from leukemia_tf.evaluation import sections as sections_lib
from leukemia_tf.evaluation.predictions import EvaluatedSplit

if TYPE_CHECKING:
    # Annotations only: evaluate_lib builds the options and imports this module.
    from leukemia_tf.evaluation.evaluate_lib import EvalOptions


# ----------------------------------------------------------------- figures
def figures_section(
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


def trust_figures(options: EvalOptions, selective: dict, out_dir: Path) -> dict[str, str]:
    """The risk-coverage curves of every trust score (``risk_coverage.png``).

    Returns:
      ``{"risk_coverage": path relative to out_dir}``; empty when no score has a curve.
    """
    curves = {
        f"{name} (AURC {row['aurc']:.4f})": row["curve"]
        for name, row in selective["scores"].items()
        if "curve" in row
    }
    if not curves:
        return {}
    referral = selective.get("referral") or {}
    point = (
        (referral["coverage"], referral["risk_accepted"])
        if referral.get("available") and referral.get("risk_accepted") is not None
        else None
    )
    path = figures_lib.risk_coverage_figure(
        curves,
        out_dir / "risk_coverage.png",
        f"Risk-coverage curves, {options.split} (n={selective['n']})",
        full_risk=1.0 - selective["accuracy"],
        referral=point,
    )
    return {"risk_coverage": _relative(path, out_dir)}


def _relative(path: str | os.PathLike, out_dir: Path) -> str:
    """``path`` relative to ``out_dir``: the report and metrics.json name files so."""
    return str(Path(path).relative_to(out_dir))


# ---------------------------------------------------------- explanations
def safe_name(name: str) -> str:
    """``name`` (a class, split or checkpoint name) made safe as part of a file name.

    Args:
      name: any text, e.g. ``"test[:50%]"``.

    Returns:
      ``name`` with each run of characters outside ``[A-Za-z0-9_.-]`` as one ``_``, outer
      ``_`` stripped (``"x"`` if nothing is left).
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def explanations_section(
    trained: rundir.TrainedModel,
    sampler: explain_lib.ExampleSampler,
    out_dir: Path,
) -> dict:
    """Grad-CAM or attention-rollout figures of the sampled examples, one per true class.

    Never raises: an unsupported backbone or a failure part way is reported in ``note``.

    Returns:
      The ``explanations`` section: ``method``, ``files`` (relative to
      ``out_dir``), ``note``, ``marks`` (:func:`sections.marks_section`: the
      evaluated images with a burned-in mark, per class) and, with a method,
      ``layer``, ``grid``, ``what``, ``heat`` (:func:`sections.heat_section`)
      and ``caveats`` (a sentence per class whose heat lies on its marks).
    """
    marks = sections_lib.marks_section(sampler.mark_counts, trained.class_names)
    if sampler.per_cell == 0:
        return {"method": None, "note": report_lib.EXPLANATIONS_OFF, "files": [], "marks": marks}
    try:
        explainer = explain_lib.make_explainer(trained.model, trained.label_space)
    except Exception as e:  # noqa: BLE001  (unsupported backbone: report, never stop)
        return {"method": None, "note": report_lib.no_explainer(e), "files": [], "marks": marks}
    method = explain_lib.method_name(explainer)
    section = {
        "method": method,
        "layer": explainer.layer,
        "grid": list(explainer.grid),
        "files": [],
        "note": "",
        "marks": marks,
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
    heat: dict[str, dict[str, list]] = {}
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
                    fractions = explain_lib.heat_on_marks(images, np.stack(maps[label]))
                    cell = heat.setdefault(name, {key: [] for key in fractions})
                    for key, values in fractions.items():
                        cell[key] += list(values)
                else:
                    maps[label] = []
            path = folder / f"{safe_name(method.lower())}_{c:02d}_{safe_name(name)}.png"
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
    section["heat"] = sections_lib.heat_section(heat, names)
    section["caveats"] = [
        report_lib.heat_on_marks_caveat(row)
        for row in section["heat"]["per_class"]
        if row["name"] in section["heat"]["shortcut_classes"]
    ]
    return section
