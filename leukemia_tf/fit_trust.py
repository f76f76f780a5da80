r"""Fits (or refits) a run's trust statistics: ``python -m leukemia_tf.fit_trust --model_dir=RUN``.

Training fits them at its end with the defaults; run this to choose another
referral target or back-off accuracy, or for a run trained before trust
scores existed. ``predict``, ``evaluate`` and ``export`` read them from the
run directory (``trust.json``, ``trust_features.npz``). See
:mod:`leukemia_tf.trust_lib`.

Examples::

  python -m leukemia_tf.fit_trust --model_dir=runs/cpu_pbc
  python -m leukemia_tf.fit_trust --model_dir=runs/cpu_pbc --max_risk=0.01 \
      --selection_score=mahalanobis --backoff_accuracy=0.99
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags

from leukemia_tf import cli

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Training run (leukemia_tf.train's --model_dir)."
)
_WHICH = flags.DEFINE_enum("which", "best", ["best", "last"], "Model file to fit them for.")
_FIT_SPLIT = flags.DEFINE_string(
    "fit_split", None, "Split for the feature statistics. Default: the run's --train_split."
)
_CALIBRATION_SPLIT = flags.DEFINE_string(
    "calibration_split",
    None,
    "Split for the referral and back-off thresholds. Default: the run's --val_split; "
    "empty: none (feature statistics only).",
)
_TARGET_COVERAGE = flags.DEFINE_float(
    "target_coverage",
    None,
    "Fraction of images to answer, in (0, 1]: the referral threshold keeps this fraction of "
    "the calibration split. Default 0.9 unless --max_risk is given.",
)
_MAX_RISK = flags.DEFINE_float(
    "max_risk",
    None,
    "Largest error rate allowed among the answered images, in [0, 1): the threshold answers "
    "as many calibration images as this allows. Not with --target_coverage.",
)
_SELECTION_SCORE = flags.DEFINE_string(
    "selection_score",
    "max_probability",
    "Score that decides referral: max_probability, margin, energy, mahalanobis or knn_distance.",
)
_OOD_SCORE = flags.DEFINE_string(
    "ood_score",
    "mahalanobis",
    "Out-of-distribution gate: an image whose score is beyond what --ood_acceptance of the "
    "calibration images reach is referred whatever its probabilities (another laboratory's "
    "images, other cell types). One of the trust scores; empty: no gate.",
)
_OOD_ACCEPTANCE = flags.DEFINE_float(
    "ood_acceptance",
    0.99,
    "Fraction of the calibration split the out-of-distribution gate lets through, in (0, 1].",
)
_BACKOFF_ACCURACY = flags.DEFINE_float(
    "backoff_accuracy",
    0.95,
    "Accuracy each taxonomy level must reach on the calibration split for the back-off to "
    "answer at that level, in (0, 1).",
)
_MAX_REFERRED_FRACTION = flags.DEFINE_float(
    "max_referred_fraction",
    0.5,
    "A slide or patient is referred when more than this fraction of its cells is, in [0, 1).",
)
_KNN_K = flags.DEFINE_integer("knn_k", 10, "Neighbour of the k-NN distance.", lower_bound=1)
_MAX_BANK = flags.DEFINE_integer(
    "max_bank", 20000, "Training features kept for the k-NN distance.", lower_bound=1
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory. Default: the one the model was trained with."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Inference batch size.", lower_bound=1)


def main(argv: Sequence[str]) -> None:
    cli.check_no_args(argv)
    given = _MODEL_DIR.value
    if "://" not in given and not os.path.isdir(os.path.expanduser(given)):
        raise cli.UserError(f"--model_dir={given!r} does not exist")
    from leukemia_tf import trust_lib

    try:
        trust_lib.check_options(
            _TARGET_COVERAGE.value,
            _MAX_RISK.value,
            _BACKOFF_ACCURACY.value,
            _MAX_REFERRED_FRACTION.value,
            _SELECTION_SCORE.value,
            _OOD_SCORE.value,
            _OOD_ACCEPTANCE.value,
        )
        stats = trust_lib.fit(
            given,
            which=_WHICH.value,
            fit_split=_FIT_SPLIT.value,
            calibration_split=_CALIBRATION_SPLIT.value,
            target_coverage=_TARGET_COVERAGE.value,
            max_risk=_MAX_RISK.value,
            selection_score=_SELECTION_SCORE.value,
            ood_score=_OOD_SCORE.value,
            ood_acceptance=_OOD_ACCEPTANCE.value,
            backoff_accuracy=_BACKOFF_ACCURACY.value,
            max_referred_fraction=_MAX_REFERRED_FRACTION.value,
            knn_k=_KNN_K.value,
            max_bank=_MAX_BANK.value,
            data_dir=_DATA_DIR.value,
            batch_size=_BATCH_SIZE.value,
        )
    except (FileNotFoundError, ValueError) as e:
        raise cli.UserError(str(e)) from e
    print(trust_lib.summary(given, stats))


if __name__ == "__main__":
    flags.mark_flag_as_required("model_dir")
    cli.run(main)
