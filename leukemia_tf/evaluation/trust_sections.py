"""Knowing when not to answer: the trust sections of an evaluation's ``metrics.json``.

Every image's trust scores (:mod:`leukemia_tf.models.trust`: the logit
scores always, the feature scores when the run's trust statistics are
fitted) are computed from the outputs of the evaluation's one pass over the
images (:func:`leukemia_tf.trust_lib.scores_of`, the ops that ``predict``
and serving run) and scored here with the pure-NumPy metrics of
:mod:`leukemia_tf.evaluation.selective`, :mod:`~leukemia_tf.evaluation.hierarchy`
and :mod:`~leukemia_tf.evaluation.ood`:

* :func:`selective_section` (``selective``): per score the risk-coverage
  summary (AURC, excess AURC, risk and accuracy at 80/90/95 % coverage,
  full-coverage risk); the fitted referral (score, threshold, fraction
  referred here, risk among the accepted against the full-coverage risk);
  slide- and patient-level referral (a group is referred when more than the
  fitted ``max_referred_fraction`` of its cells are); the score with the
  lowest AURC.
* :func:`hierarchy_section` (``hierarchy``): with a taxonomy, mistake
  severity (mean LCA height of the errors), hierarchical distance@1/@3 and
  hierarchical precision / recall / F1 of the argmax class; always, the
  back-off (:func:`trust.backoff_tree`: a one-level tree of the classes
  without a taxonomy) with the fitted thresholds' ``predicted_node`` and the
  accuracy-specificity curve (thresholds fitted on the run's validation
  split per target accuracy, applied to the evaluated images).
* :func:`ood_section` (``ood``, with ``--ood_images``): per score, how well
  it separates the evaluated images (in-distribution) from the given
  out-of-distribution images (AUROC, FPR at 95 % TPR) and the fraction the
  fitted referral flags.

Sections return plain dicts; their prose (conventions, caveats) is worded in
:mod:`leukemia_tf.evaluation.report`.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import logging

from leukemia_tf import rundir, trust_lib
from leukemia_tf.evaluation import external, hierarchy, selective
from leukemia_tf.evaluation import ood as ood_lib
from leukemia_tf.evaluation import report as report_lib
from leukemia_tf.evaluation.predictions import EvaluatedSplit, SplitPredictions
from leukemia_tf.models import trust
from leukemia_tf.serving import predict_lib

#: Target coverages of the selective summaries.
COVERAGES = selective.DEFAULT_COVERAGES
#: ``k`` of the hierarchical distance@k.
DISTANCE_AT = (1, 3)
#: Group levels of the referral: (key, id feature), as the slide and patient sections.
GROUP_LEVELS = (("slide", "slide_id"), ("patient", "patient_id"))


# ------------------------------------------------------------ validation
@dataclasses.dataclass(frozen=True)
class ValidationPass:
    """The model over the run's validation split, read once for every section that needs it.

    Attributes:
      split: the validation split's name.
      predictions: its outputs (with the pooled features when the run's
        trust statistics are fitted), or ``None`` when it could not be read.
      error: why it could not be read, else ``None``.
      is_evaluated: the evaluated split is the validation split itself (its
        pass is reused).
    """

    split: str
    predictions: SplitPredictions | None
    error: Exception | None = None
    is_evaluated: bool = False


# ------------------------------------------------------------------ scores
def needs_features(trained: rundir.TrainedModel) -> bool:
    """Whether the model must be run with its pooled features (trust statistics fitted)."""
    return trained.trust is not None


def scores_of(trained: rundir.TrainedModel, outputs: dict[str, np.ndarray]) -> dict:
    """Every trust output of the model's ``outputs`` (:func:`trust_lib.scores_of`), numpy."""
    return trust_lib.scores_of(outputs, trained, trained.trust)


def _score_names(scores: dict) -> list[str]:
    return [name for name in trust.SCORES if name in scores]


def _decoded(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


# --------------------------------------------------------------- selective
def selective_section(ev: EvaluatedSplit, scores: dict) -> dict:
    """The ``selective`` section (see the module docstring).

    Args:
      ev: the evaluated images (class level).
      scores: :func:`scores_of` their outputs.

    Returns:
      ``{"convention", "n", "accuracy", "trust_fitted", "scores": {name:
      {"higher_is_trust", **selective.summary}}, "best_score", "referral",
      "slide", "patient"}``; a score whose values are not finite gets
      ``{"error"}`` instead of its summary.
    """
    trained = ev.trained
    correct = np.asarray(ev.y_pred) == np.asarray(ev.y_true)
    per_score: dict[str, dict] = {}
    for name in _score_names(scores):
        row: dict = {"higher_is_trust": trust.HIGHER_IS_TRUST[name]}
        try:
            row.update(
                selective.summary(correct, trust_lib.confidence(scores, name), None, COVERAGES)
            )
        except ValueError as e:
            row["error"] = str(e)
        per_score[name] = row
    ranked = {k: v for k, v in per_score.items() if "aurc" in v}
    referral, referred = _referral(trained, correct, scores)
    groups = _group_referral(ev, referred, referral)
    return {
        "convention": report_lib.SELECTIVE_CONVENTION,
        "n": int(len(correct)),
        "accuracy": float(correct.mean()),
        "trust_fitted": trained.trust is not None,
        # None for an ensemble, which has no trust statistics to fit.
        "fit_command": None
        if trained.trust is not None or trained.ensemble is not None
        else trust.fit_command(trained.model_dir),
        "scores": per_score,
        "best_score": min(ranked, key=lambda k: ranked[k]["aurc"]) if ranked else None,
        "referral": referral,
        **groups,
    }


def _referral(
    trained: rundir.TrainedModel, correct: np.ndarray, scores: dict
) -> tuple[dict, np.ndarray | None]:
    """The fitted referral on these images, and which ones it refers (``None`` when unfitted)."""
    stats = trained.trust
    if stats is None:
        return {
            "available": False,
            "reason": no_trust_note(trained),
        }, None
    selection = stats.selection
    if selection is None or trust.REFERRED not in scores:
        return {
            "available": False,
            "reason": report_lib.referral_not_fitted(trust.fit_command(trained.model_dir)),
        }, None
    referred = np.asarray(scores[trust.REFERRED], bool)
    accepted = ~referred
    n = len(correct)
    full_risk = float((~correct).mean())
    risk = float((~correct[accepted]).mean()) if accepted.any() else None
    return {
        "available": True,
        "score": selection["score"],
        "higher_is_trust": bool(
            selection.get("higher_is_trust", trust.HIGHER_IS_TRUST[selection["score"]])
        ),
        "threshold": selection["threshold"],
        "rule": report_lib.referral_rule(selection),
        "target": selection.get("target"),
        "target_value": selection.get("value"),
        "fitted_on": selection.get("split"),
        "n_fit": selection.get("n"),
        "fitted_coverage": selection.get("coverage"),
        "fitted_risk": selection.get("risk"),
        "max_referred_fraction": selection.get("max_referred_fraction"),
        "n": int(n),
        "n_referred": int(referred.sum()),
        "fraction_referred": float(referred.mean()),
        "coverage": float(accepted.mean()),
        "risk_accepted": risk,
        "accuracy_accepted": None if risk is None else 1.0 - risk,
        "full_coverage_risk": full_risk,
        "risk_ratio": None if risk is None or full_risk == 0 else risk / full_risk,
    }, referred


def _group_referral(ev: EvaluatedSplit, referred: np.ndarray | None, referral: dict) -> dict:
    """``{"slide": ..., "patient": ...}``: :func:`selective.group_selective` where ids exist."""
    out = {}
    for key, feature in GROUP_LEVELS:
        ids = np.asarray(getattr(ev.predictions, feature), dtype=object)
        has = ids != ""
        if not has.any():
            out[key] = {"available": False, "reason": report_lib.no_group_ids(feature)}
        elif referred is None:
            out[key] = {"available": False, "reason": referral["reason"]}
        else:
            try:
                section = selective.group_selective(
                    [str(i) for i in ids[has]],
                    ev.y_true[has],
                    ev.probs[has],
                    referred[has],
                    referral["max_referred_fraction"],
                )
            except ValueError as e:  # e.g. cell-type labels: one slide holds several classes
                out[key] = {"available": False, "reason": str(e)}
                continue
            out[key] = {
                "available": True,
                "n_cells_without_id": int((~has).sum()),
                **section,
            }
    return out


# --------------------------------------------------------------- hierarchy
def hierarchy_section(ev: EvaluatedSplit, scores: dict, validation: ValidationPass) -> dict:
    """The ``hierarchy`` section (see the module docstring)."""
    trained = ev.trained
    names = trained.class_names
    taxonomy = trained.taxonomy
    true_nodes = [names[int(y)] for y in ev.y_true]
    section: dict = {
        "convention": report_lib.HIERARCHY_CONVENTION,
        "taxonomy": None if taxonomy is None else taxonomy.source,
        "mistake_severity": None,
        "hierarchical_distance": None,
        "hierarchical_prf": None,
    }
    if taxonomy is None:
        section["reason"] = report_lib.NO_TAXONOMY
    else:
        try:
            section["mistake_severity"] = hierarchy.mistake_severity(
                taxonomy, names, ev.y_true, ev.y_pred
            )
            section["hierarchical_distance"] = {
                f"at_{k}": hierarchy.hierarchical_distance_at_k(
                    taxonomy, names, ev.y_true, ev.probs, k
                )
                for k in DISTANCE_AT
            }
            section["hierarchical_prf"] = hierarchy.hierarchical_prf(
                taxonomy, true_nodes, [names[int(y)] for y in ev.y_pred]
            )
        except ValueError as e:
            section["reason"] = str(e)
    tree = trust.backoff_tree(trained.label_space)
    section["backoff"] = _backoff(trained, tree, true_nodes, scores)
    section["accuracy_specificity"] = _curve(ev, tree, true_nodes, validation)
    return section


def _backoff(trained: rundir.TrainedModel, tree, true_nodes: list[str], scores: dict) -> dict:
    """The fitted back-off's ``predicted_node`` on these images (:func:`hierarchy.backoff_summary`)."""
    out: dict = {
        "tree": "taxonomy" if trained.label_space.taxonomy is not None else "classes",
        "levels": [list(level) for level in tree.levels],
        "fitted": None,
        "summary": None,
    }
    stats = trained.trust
    if stats is None or stats.backoff is None or trust.PREDICTED_NODE not in scores:
        out["reason"] = (
            no_trust_note(trained)
            if stats is None
            else report_lib.referral_not_fitted(trust.fit_command(trained.model_dir))
        )
        return out
    backoff = stats.backoff
    out["fitted"] = {
        "accuracy": backoff.get("accuracy"),
        "thresholds": backoff.get("thresholds"),
        "fitted_on": backoff.get("split"),
        "n_fit": backoff.get("n"),
    }
    answered = _decoded(scores[trust.PREDICTED_NODE])
    out["summary"] = hierarchy.backoff_summary(tree, trained.class_names, true_nodes, answered)
    return out


def _curve(ev: EvaluatedSplit, tree, true_nodes: list[str], validation: ValidationPass) -> dict:
    """Back-off thresholds fitted on validation per target accuracy, scored on these images."""
    trained = ev.trained
    out: dict = {"fitted_on": validation.split, "fitted_on_evaluated": validation.is_evaluated}
    if validation.predictions is None:
        out.update(
            curve=None,
            reason=report_lib.curve_without_validation(validation.split, validation.error),
        )
        return out
    val = validation.predictions
    try:
        curve = hierarchy.accuracy_specificity_curve(
            trust_lib.level_probabilities_of(val.outputs, trained),
            trust_lib.true_levels_of(val.labels, val.levels, trained),
            trust_lib.level_probabilities_of(ev.predictions.outputs, trained),
            true_nodes,
            tree,
            trained.class_names,
        )
    except ValueError as e:
        out.update(curve=None, reason=str(e))
        return out
    out.update(n_fit=len(val), curve=curve)
    if validation.is_evaluated:
        out["note"] = report_lib.curve_on_validation(validation.split)
    return out


# --------------------------------------------------------------------- OOD
@dataclasses.dataclass(frozen=True)
class OodImages:
    """``--ood_images``: the files, read as ``predict`` reads them, and their trust scores.

    Attributes:
      given: the flag's value (folder, glob or CSV).
      items: every image found.
      index: ``[N]`` indices into ``items`` of the images read.
      scores: :func:`scores_of` the images read.
      failures: ``{item index: reason}`` of the images that could not be read.
    """

    given: str
    items: list[predict_lib.InputImage]
    index: np.ndarray
    scores: dict
    failures: dict[int, str]

    @property
    def name(self) -> str:
        return ood_name(self.given)


def ood_name(images: str) -> str:
    """A short name of ``--ood_images``: the folder's name, the CSV's stem, a glob's folder.

    ``smears/bccd`` -> ``bccd``; ``smears/bccd/*.jpg`` -> ``bccd``; ``list.csv`` -> ``list``.
    """
    parts = os.path.normpath(os.path.abspath(os.path.expanduser(images))).split(os.sep)
    kept = []
    for part in parts:
        if glob.has_magic(part):
            break
        kept.append(part)
    base = kept[-1] if kept else "images"
    if base.lower().endswith(".csv"):
        base = base[: -len(".csv")]
    return base or "images"


def collect_ood(images: str) -> list[predict_lib.InputImage]:
    """The files of ``--ood_images`` (:func:`predict_lib.collect_inputs`), before any is read.

    Raises:
      FileNotFoundError, ValueError: as ``collect_inputs`` (nothing there), naming the flag.
    """
    try:
        items, _ = predict_lib.collect_inputs(images)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"--ood_images={images!r}: {e}") from None
    return items


def predict_ood(
    trained: rundir.TrainedModel,
    images: str,
    items: list[predict_lib.InputImage],
    batch_size: int,
    read_threads: int = 8,
) -> OodImages:
    """Reads and scores ``--ood_images`` (:func:`external.predict_unlabelled`).

    Raises:
      ValueError: none of the images could be read (naming the flag and an example).
    """
    index, outputs, failures = external.predict_unlabelled(
        trained, items, batch_size, read_threads, features=needs_features(trained)
    )
    if not len(index):
        first = items[0].path if items else images
        raise ValueError(
            f"--ood_images={images!r}: none of the {len(items)} images could be read (e.g. "
            f"{first}: {failures.get(0, 'unreadable')})"
        )
    return OodImages(
        given=images,
        items=items,
        index=index,
        scores=scores_of(trained, outputs),
        failures=failures,
    )


def class_name_folders(
    items: Sequence[predict_lib.InputImage], class_names: Sequence[str]
) -> list[dict]:
    """Folders of the OOD images named like one of the model's classes (case-insensitive).

    Returns:
      ``[{"folder", "class", "n_images"}]``: each folder name (a path
      component above an image) that equals a class name, with how many
      images lie below it.
    """
    by_name = {name.casefold(): name for name in class_names}
    counts: dict[tuple[str, str], int] = {}
    for item in items:
        for part in Path(os.path.abspath(item.path)).parent.parts:
            name = by_name.get(part.casefold())
            if name is not None:
                counts[(part, name)] = counts.get((part, name), 0) + 1
    return [
        {"folder": folder, "class": name, "n_images": n}
        for (folder, name), n in sorted(counts.items())
    ]


def ood_section(ev: EvaluatedSplit, id_scores: dict, ood: OodImages) -> tuple[dict, list[str]]:
    """The ``ood`` section and its caveats.

    Args:
      ev: the evaluated images: the in-distribution set.
      id_scores: :func:`scores_of` them.
      ood: the ``--ood_images``.

    Returns:
      ``(section, caveats)``: ``section`` ``{"source", "name", "n_images",
      "n_scored", "n_unreadable", "unreadable", "n_id", "convention",
      "scores": {name: ood.table row}, "best_score", "selection_score",
      "class_name_folders", "warnings"}``; a warning (logged) and a caveat
      for every folder named like a class of the model.
    """
    trained = ev.trained
    stats = trained.trust
    selection = stats.selection if stats is not None else None
    names, skipped = [], {}
    for name in _score_names(id_scores):
        if name not in ood.scores:
            continue
        values = [np.asarray(id_scores[name], np.float64), np.asarray(ood.scores[name], np.float64)]
        bad = [int((~np.isfinite(v)).sum()) for v in values]
        if any(bad):
            skipped[name] = report_lib.ood_score_not_finite(name, *bad)
            continue
        names.append(name)
    thresholds = None
    if selection is not None and selection["score"] in names:
        thresholds = {selection["score"]: selection["threshold"]}
        gate = selection.get("ood_score")
        if gate in names and gate != selection["score"]:
            thresholds[gate] = selection.get("ood_threshold")
    table = (
        ood_lib.table(
            {n: id_scores[n] for n in names},
            {n: ood.scores[n] for n in names},
            {n: trust.HIGHER_IS_TRUST[n] for n in names},
            thresholds,
        )
        if names
        else {}
    )
    for name, reason in skipped.items():
        table[name] = {"higher_is_id": trust.HIGHER_IS_TRUST[name], "error": reason}
    folders = class_name_folders(ood.items, trained.class_names)
    warnings = [
        report_lib.ood_looks_like_class(f["folder"], f["class"], f["n_images"]) for f in folders
    ]
    for text in warnings:
        logging.warning("%s", text)
    failures = sorted(ood.failures.items())
    caveats = list(warnings)
    if failures:
        caveats.append(report_lib.ood_unreadable(len(failures), len(ood.items)))
    scored = {k: v for k, v in table.items() if "auroc" in v}
    section = {
        "source": ood.given,
        "name": ood.name,
        "convention": report_lib.OOD_CONVENTION,
        "n_images": len(ood.items),
        "n_scored": int(len(ood.index)),
        "n_unreadable": len(failures),
        "unreadable": [[ood.items[i].path, reason] for i, reason in failures],
        "n_id": int(len(ev.y_true)),
        "scores": table,
        "best_score": ood_lib.best_score(scored) if scored else None,
        "selection_score": None if selection is None else selection["score"],
        "n_referred": int(np.asarray(ood.scores[trust.REFERRED], bool).sum())
        if trust.REFERRED in ood.scores
        else None,
        "fraction_referred": float(np.asarray(ood.scores[trust.REFERRED], bool).mean())
        if trust.REFERRED in ood.scores
        else None,
        "id_fraction_referred": float(np.asarray(id_scores[trust.REFERRED], bool).mean())
        if trust.REFERRED in id_scores
        else None,
        "class_name_folders": folders,
        "warnings": warnings,
    }
    if stats is None:
        section["note"] = no_trust_note(trained)
    return section, caveats


# ----------------------------------------------------------------- caveats
def no_trust_note(trained: rundir.TrainedModel) -> str:
    """Why a model has no trust statistics: never fitted (naming the command), or an ensemble."""
    return report_lib.no_trust(
        None if trained.ensemble is not None else trust.fit_command(trained.model_dir)
    )


def caveats(trained: rundir.TrainedModel, tta: bool, adapted: bool) -> list[str]:
    """The caveats of the trust sections (an unfitted run names the fit command)."""
    if trained.trust is None:
        return [no_trust_note(trained)]
    out = []
    if tta or adapted:
        out.append(report_lib.trust_fitted_single_view(tta, adapted))
    return out
