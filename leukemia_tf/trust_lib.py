"""Fits a run's trust statistics: ``python -m leukemia_tf.fit_trust --model_dir=RUN``.

Training fits them at its end; this refits them (another selection score,
coverage, risk or back-off accuracy) without retraining. See
:mod:`leukemia_tf.models.trust` for what the scores and decisions are.

* Feature statistics (Mahalanobis class means and tied precision, the k-NN
  bank): on the training split (``--fit_split``, default the run's
  ``train_split``), without augmentation.
* The referral threshold of ``--selection_score`` for ``--target_coverage``
  (default 0.9) or ``--max_risk``, and the per-level back-off thresholds for
  ``--backoff_accuracy``: on the validation split (``--calibration_split``,
  default the run's ``val_split``). A run without one gets the feature
  statistics only (no ``referred``, no ``predicted_node``) unless a split is
  named.
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import tensorflow as tf

from leukemia_tf import rundir
from leukemia_tf.data import names
from leukemia_tf.evaluation import hierarchy, selective
from leukemia_tf.evaluation import predictions as predictions_lib
from leukemia_tf.models import trust

DEFAULT_TARGET_COVERAGE = 0.9
DEFAULT_BACKOFF_ACCURACY = 0.95
DEFAULT_MAX_REFERRED_FRACTION = 0.5
DEFAULT_SELECTION_SCORE = "max_probability"
DEFAULT_OOD_SCORE = "mahalanobis"
DEFAULT_OOD_ACCEPTANCE = 0.99


def check_options(
    target_coverage: float | None,
    max_risk: float | None,
    backoff_accuracy: float,
    max_referred_fraction: float,
    selection_score: str,
    ood_score: str = DEFAULT_OOD_SCORE,
    ood_acceptance: float = DEFAULT_OOD_ACCEPTANCE,
) -> None:
    """Every option check that needs no model (flag names in the messages).

    Raises:
      ValueError: a value out of range, or both ``target_coverage`` and ``max_risk``.
    """
    if target_coverage is not None and max_risk is not None:
        raise ValueError(
            f"--target_coverage={target_coverage} and --max_risk={max_risk}: give one of the two"
        )
    if target_coverage is not None and not 0.0 < float(target_coverage) <= 1.0:
        raise ValueError(f"--target_coverage={target_coverage}: must be in (0, 1]")
    if max_risk is not None and not 0.0 <= float(max_risk) < 1.0:
        raise ValueError(f"--max_risk={max_risk}: must be in [0, 1)")
    if not 0.0 < float(backoff_accuracy) < 1.0:
        raise ValueError(f"--backoff_accuracy={backoff_accuracy}: must be in (0, 1)")
    if not 0.0 <= float(max_referred_fraction) < 1.0:
        raise ValueError(f"--max_referred_fraction={max_referred_fraction}: must be in [0, 1)")
    trust.check_score(selection_score)
    if ood_score:
        trust.check_score(ood_score, "--ood_score")
    if not 0.0 < float(ood_acceptance) <= 1.0:
        raise ValueError(f"--ood_acceptance={ood_acceptance}: must be in (0, 1]")


def scores_of(
    outputs: dict[str, np.ndarray],
    trained: rundir.TrainedModel,
    stats: trust.TrustStatistics | None,
    batch_size: int = 1024,
) -> dict[str, np.ndarray]:
    """:func:`trust.trust_outputs` of numpy outputs, in batches (numpy out)."""
    count = len(next(iter(outputs.values())))
    chunks: list[dict] = []
    for start in range(0, count, batch_size):
        batch = {k: tf.constant(v[start : start + batch_size]) for k, v in outputs.items()}
        chunks.append(
            {
                k: v.numpy()
                for k, v in trust.trust_outputs(batch, trained.label_space, stats).items()
            }
        )
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def level_probabilities_of(
    outputs: dict[str, np.ndarray], trained: rundir.TrainedModel
) -> list[np.ndarray]:
    """:func:`trust.level_probabilities` of numpy outputs (numpy out)."""
    logits = {k: tf.constant(v) for k, v in trained.label_space.own_outputs(outputs).items()}
    return [p.numpy() for p in trust.level_probabilities(logits, trained.label_space)]


def true_levels_of(labels: np.ndarray, levels: np.ndarray | None, trained) -> np.ndarray:
    """``[N, L]`` true node index per level of :func:`trust.backoff_tree` (-1 below the label)."""
    if trained.label_space.taxonomy is None:
        return np.asarray(labels, np.int64)[:, None]
    if levels is None:
        tree = trained.label_space.taxonomy
        return np.stack([tree.encode(trained.class_names[int(y)]) for y in labels])
    return np.asarray(levels, np.int64)


def confidence(scores: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The score oriented so that higher means more trustworthy."""
    value = np.asarray(scores[name], np.float64)
    return value if trust.HIGHER_IS_TRUST[name] else -value


def fit(
    model_dir: str | os.PathLike,
    *,
    which: str = "best",
    fit_split: str | None = None,
    calibration_split: str | None = None,
    target_coverage: float | None = None,
    max_risk: float | None = None,
    selection_score: str = DEFAULT_SELECTION_SCORE,
    ood_score: str = DEFAULT_OOD_SCORE,
    ood_acceptance: float = DEFAULT_OOD_ACCEPTANCE,
    backoff_accuracy: float = DEFAULT_BACKOFF_ACCURACY,
    max_referred_fraction: float = DEFAULT_MAX_REFERRED_FRACTION,
    knn_k: int = trust.DEFAULT_KNN_K,
    max_bank: int = trust.DEFAULT_MAX_BANK,
    data_dir: str | None = None,
    batch_size: int = 64,
) -> trust.TrustStatistics:
    """Fits and stores the trust statistics of a run (see the module docstring).

    Args:
      model_dir: the training run.
      which: ``"best"`` or ``"last"``: the model file they are fitted for.
      fit_split: split for the feature statistics; default the run's train split.
      calibration_split: split for the thresholds; default the run's
        validation split; ``""`` (and no validation split): no thresholds.
      target_coverage: fraction of the calibration images to accept (default
        0.9 when ``max_risk`` is not given).
      max_risk: largest error rate allowed among the accepted images instead.
      selection_score: the score that decides referral (:data:`trust.SCORES`).
      ood_score: the out-of-distribution gate: an image whose score is beyond
        what ``ood_acceptance`` of the calibration images reach is referred
        whatever its probabilities (``""``: no gate). The selection threshold
        is then fitted on the images the gate accepts, so that the two
        together meet ``target_coverage``.
      ood_acceptance: the fraction of calibration images the gate accepts.
      backoff_accuracy: the accuracy each back-off level must reach.
      max_referred_fraction: a slide or patient is referred when more than
        this fraction of its cells is.
      knn_k: neighbour of the k-NN distance.
      max_bank: at most this many training features kept for it.
      data_dir: TFDS data directory; default the run's.
      batch_size: inference batch size.

    Returns:
      The statistics (also written to ``trust.json`` and ``trust_features.npz``).

    Raises:
      ValueError: a bad option (naming the flag), a split the data lack, or a fold
        ensemble (it has no single feature space).
      FileNotFoundError: no such run or model file.
    """
    check_options(
        target_coverage, max_risk, backoff_accuracy, max_referred_fraction, selection_score
    )
    if target_coverage is None and max_risk is None:
        target_coverage = DEFAULT_TARGET_COVERAGE
    model_dir = rundir.check_model_dir(model_dir)
    # Not the stored statistics: they may be stale (a resumed run), and are being replaced.
    trained = rundir.load_trained_model(model_dir, which=which, float32=True, trust=False)
    if trained.ensemble is not None:
        raise ValueError(f"{model_dir}: {trust.ENSEMBLE_HAS_NO_FEATURES}")
    config = trained.config
    data_dir = data_dir or config.data_dir or None
    specs = names.parse_datasets(config.datasets)
    fit_split = fit_split or config.train_split
    calibration_split = config.val_split if calibration_split is None else calibration_split
    predictions_lib.check_split(specs, fit_split, data_dir)
    if calibration_split:
        predictions_lib.check_split(specs, calibration_split, data_dir)

    fitted = predictions_lib.predict_split(
        trained, specs, fit_split, data_dir, batch_size, features=True
    )
    calibration = None
    if calibration_split:
        calibration = predictions_lib.predict_split(
            trained, specs, calibration_split, data_dir, batch_size, features=True
        )
    return fit_from_predictions(
        model_dir,
        trained,
        fitted,
        calibration,
        which=which,
        fit_split=fit_split,
        calibration_split=calibration_split,
        target_coverage=target_coverage,
        max_risk=max_risk,
        selection_score=selection_score,
        ood_score=ood_score,
        ood_acceptance=ood_acceptance,
        backoff_accuracy=backoff_accuracy,
        max_referred_fraction=max_referred_fraction,
        knn_k=knn_k,
        max_bank=max_bank,
        record={"data_dir": data_dir},
    )


def fit_from_predictions(
    model_dir: str,
    trained: rundir.TrainedModel,
    fitted: predictions_lib.SplitPredictions,
    calibration: predictions_lib.SplitPredictions | None,
    *,
    which: str = "best",
    fit_split: str,
    calibration_split: str | None,
    target_coverage: float | None = None,
    max_risk: float | None = None,
    selection_score: str = DEFAULT_SELECTION_SCORE,
    ood_score: str = DEFAULT_OOD_SCORE,
    ood_acceptance: float = DEFAULT_OOD_ACCEPTANCE,
    backoff_accuracy: float = DEFAULT_BACKOFF_ACCURACY,
    max_referred_fraction: float = DEFAULT_MAX_REFERRED_FRACTION,
    knn_k: int = trust.DEFAULT_KNN_K,
    max_bank: int = trust.DEFAULT_MAX_BANK,
    record: dict | None = None,
) -> trust.TrustStatistics:
    """:func:`fit` from the model's outputs (with ``trust.FEATURES``) on the two splits.

    What :func:`fit` does once it has run the model; also used by the probes
    on stored features (:mod:`leukemia_tf.embedding.probe_lib`), which have
    the features at hand.

    Args:
      model_dir: the run directory the statistics are written into.
      trained: the loaded model (its label space and classes).
      fitted: outputs and labels of ``fit_split`` (features included).
      calibration: those of ``calibration_split``, or None (no thresholds).
      which: the model file (``"best"``, ``"last"``) they are fitted for.
      fit_split: the name of ``fitted``'s split (recorded).
      calibration_split: the name of ``calibration``'s split (recorded).
      record: more entries for ``trust.json``.
      Others: as for :func:`fit`.

    Returns:
      The statistics (also written to ``trust.json`` and ``trust_features.npz``).
    """
    check_options(
        target_coverage, max_risk, backoff_accuracy, max_referred_fraction, selection_score
    )
    if target_coverage is None and max_risk is None:
        target_coverage = DEFAULT_TARGET_COVERAGE
    config = trained.config
    stats = trust.fit_feature_statistics(
        fitted.outputs[trust.FEATURES],
        fitted.labels,
        trained.class_names,
        knn_k=knn_k,
        max_bank=max_bank,
        seed=config.seed,
    )
    model_path = rundir.join(model_dir, f"{which}.keras")
    stats.record = {
        "fitted": datetime.datetime.now().isoformat(timespec="seconds"),
        "model_file": f"{which}.keras",
        "model_sha256": trust.model_fingerprint(model_path),
        "temperature": 1.0,
        "features": {"split": fit_split, "n": len(fitted)},
        **(record or {}),
    }
    if calibration is not None:
        scores = scores_of(calibration.outputs, trained, stats)
        probs = trained.label_space.probabilities(calibration.outputs, 1.0).numpy()
        correct = probs.argmax(axis=1) == calibration.labels
        passed = np.ones(len(correct), bool)
        ood_threshold = None
        if ood_score:
            gate = selective.fit_threshold(
                np.ones(len(correct), bool),
                confidence(scores, ood_score),
                target_coverage=ood_acceptance,
            )
            passed = selective.accept(confidence(scores, ood_score), gate["threshold"])
            ood_threshold = gate["threshold"]
            if not trust.HIGHER_IS_TRUST[ood_score]:
                ood_threshold = -ood_threshold
        within = target_coverage
        if target_coverage is not None:
            within = min(1.0, target_coverage / max(passed.mean(), 1e-12))
        fitted_threshold = selective.fit_threshold(
            correct[passed],
            confidence(scores, selection_score)[passed],
            target_coverage=within,
            max_risk=max_risk,
        )
        threshold = fitted_threshold["threshold"]
        accepted = passed & selective.accept(confidence(scores, selection_score), threshold)
        if threshold is not None and not trust.HIGHER_IS_TRUST[selection_score]:
            threshold = -threshold
        stats.selection = {
            "score": selection_score,
            "higher_is_trust": trust.HIGHER_IS_TRUST[selection_score],
            "threshold": threshold,
            "target": "coverage" if target_coverage is not None else "risk",
            "value": float(target_coverage if target_coverage is not None else max_risk),
            "max_referred_fraction": float(max_referred_fraction),
            "split": calibration_split,
            "n": len(calibration),
            "ood_score": ood_score or None,
            "ood_threshold": ood_threshold,
            "ood_acceptance": float(ood_acceptance) if ood_score else None,
            "coverage": float(accepted.mean()),
            "risk": float(1.0 - correct[accepted].mean()) if accepted.any() else None,
        }
        tree = trust.backoff_tree(trained.label_space)
        level_probs = level_probabilities_of(calibration.outputs, trained)
        true_levels = true_levels_of(calibration.labels, calibration.levels, trained)
        thresholds = hierarchy.fit_backoff_thresholds(
            level_probs, true_levels, tree, backoff_accuracy
        )
        stats.backoff = {
            "accuracy": float(backoff_accuracy),
            "thresholds": thresholds,
            "tree": "taxonomy" if trained.label_space.taxonomy is not None else "classes",
            "levels": [list(level) for level in tree.levels],
            "split": calibration_split,
            "n": len(calibration),
        }
    trust.save(model_dir, stats)
    return stats


def summary(model_dir: str, stats: trust.TrustStatistics) -> str:
    """What ``fit_trust`` (and the end of training) prints."""
    features = stats.record.get("features", {})
    lines = [
        f"Trust statistics of {model_dir} ({stats.record.get('model_file')}): feature "
        f"statistics on {features.get('n')} images of {features.get('split')!r} (dimension "
        f"{stats.dim}, k-NN bank {len(stats.bank)}, k={stats.knn_k})"
    ]
    selection = stats.selection
    if selection is None:
        lines.append(
            "  no calibration split: no referral threshold and no back-off (name one with "
            "--calibration_split)"
        )
    else:
        target = (
            f"coverage {selection['value']:g}"
            if selection["target"] == "coverage"
            else f"risk <= {selection['value']:g}"
        )
        threshold = selection["threshold"]
        risk = selection["risk"]
        lines.append(
            f"  referral: {selection['score']} "
            + (
                "refers every image (the risk target is out of reach)"
                if threshold is None
                else f"{'<' if selection['higher_is_trust'] else '>'} {threshold:.6g}"
            )
            + f" for {target} on {selection['split']!r}: coverage {selection['coverage']:.3f}, "
            f"risk {'n/a' if risk is None else f'{risk:.4f}'} ({selection['n']} images)"
        )
        backoff = stats.backoff
        shown = ", ".join(
            f"level {k}: {'never' if t is None else f'{t:.4g}'}"
            for k, t in enumerate(backoff["thresholds"])
        )
        if selection.get("ood_score"):
            lines.append(
                f"  out-of-distribution gate: {selection['ood_score']} "
                f"{'<' if trust.HIGHER_IS_TRUST[selection['ood_score']] else '>'} "
                f"{selection['ood_threshold']:.6g} also refers (accepts "
                f"{selection['ood_acceptance']:g} of {selection['split']!r})"
            )
        lines.append(
            f"  back-off for accuracy {backoff['accuracy']:g} ({backoff['tree']}): {shown}"
        )
    lines.append(f"  written: {rundir.join(model_dir, trust.TRUST_FILE)}")
    return "\n".join(lines)
