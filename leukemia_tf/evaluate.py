r"""Evaluates a trained model: ``python -m leukemia_tf.evaluate --model_dir=... [--split=test]``.

Writes ``metrics.json``, ``report.md`` and PNG figures into
``<model_dir>/eval_<split>`` (or ``--out_dir``), and stores the temperature
fitted on the validation split in ``<model_dir>/calibration.json``. See
:func:`leukemia_tf.evaluation.evaluate_lib.evaluate`.

Example::

  python -m leukemia_tf.evaluate --model_dir=runs/quickstart --split=test
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags

from leukemia_tf import cli

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Training run to evaluate (leukemia_tf.train's --model_dir)."
)
_SPLIT = flags.DEFINE_string(
    "split", "test", "Split to evaluate (TFDS split syntax, e.g. 'test' or 'test[:50%]')."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory. Default: the one the model was trained with."
)
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Where to write the report. Default: <model_dir>/eval_<split>."
)
_BOOTSTRAP = flags.DEFINE_integer(
    "bootstrap",
    1000,
    "Bootstrap resamples for the 95% confidence intervals (0: none).",
    lower_bound=0,
)
_WHICH = flags.DEFINE_enum("which", "best", ["best", "last"], "Checkpoint to evaluate.")
_EXPLAIN_SAMPLES = flags.DEFINE_integer(
    "explain_samples",
    3,
    "Grad-CAM / attention maps drawn per class for correct and for wrong predictions (0: none).",
    lower_bound=0,
)
_TTA = flags.DEFINE_bool(
    "tta",
    False,
    "Test-time augmentation: average the logits over the 8 rotations and mirrorings of each "
    "cell (8x the inference time). The report goes to eval_<split>_tta.",
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Inference batch size.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap and of the explained examples.")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main(argv: Sequence[str]) -> None:
    cli.check_no_args(argv)
    given = _MODEL_DIR.value
    # A local typo fails in a second, before TensorFlow is imported. Any other
    # model_dir (gs://) is checked once, by evaluate, before data or model are read.
    if "://" not in given and not os.path.isdir(os.path.expanduser(given)):
        raise cli.UserError(f"--model_dir={given!r} does not exist")

    from leukemia_tf.evaluation import evaluate_lib

    try:
        result = evaluate_lib.evaluate(
            given,
            split=_SPLIT.value,
            data_dir=_DATA_DIR.value,
            out_dir=_OUT_DIR.value,
            bootstrap=_BOOTSTRAP.value,
            seed=_SEED.value,
            explain_samples=_EXPLAIN_SAMPLES.value,
            batch_size=_BATCH_SIZE.value,
            which=_WHICH.value,
            tta=_TTA.value,
        )
    except (FileNotFoundError, ValueError) as e:
        raise cli.UserError(str(e)) from e
    cell, cal = result["cell"], result["calibration"]
    lines = [
        f"{result['data']['datasets']} [{result['data']['split']}]: "
        f"{result['data']['n_examples']} cells",
        f"  accuracy {_fmt(cell['accuracy'])}  balanced accuracy "
        f"{_fmt(cell['balanced_accuracy'])}  macro-F1 {_fmt(cell['macro_f1'])}  "
        f"macro ROC-AUC {_fmt(cell['macro_roc_auc'])}",
        f"  temperature {cal['temperature']:.4g}: ECE {_fmt(cal['ece_before'])} -> "
        f"{_fmt(cal['ece_after'])}",
    ]
    for key in ("slide", "patient"):
        section = result[key]
        if section.get("methods"):
            scored = section["methods"]["mean_probability"]
            lines.append(
                f"  {key} level ({section['n_groups']}): accuracy {_fmt(scored['accuracy'])} "
                f"(mean probability), "
                f"{_fmt(section['methods']['majority_vote']['accuracy'])} (majority vote)"
            )
    lines.append(f"Report: {result['report_path']}")
    print("\n".join(lines))


if __name__ == "__main__":
    flags.mark_flag_as_required("model_dir")
    cli.run(main)
