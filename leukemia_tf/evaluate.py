r"""Evaluates a trained model: ``python -m leukemia_tf.evaluate --model_dir=... [--split=test]``.

Writes ``metrics.json``, ``report.md`` and PNG figures into
``<model_dir>/eval_<split>`` (or ``--out_dir``), and stores the temperature
fitted on the validation split in ``<model_dir>/calibration.json``. See
:func:`leukemia_tf.evaluation.evaluate_lib.evaluate`.

External images: ``--images=FOLDER_OR_CSV`` (instead of ``--split``)
evaluates labelled image files that no split of the model contains: a folder
whose sub-folders are the labels (``FOLDER/<label>/*.jpg``), or a CSV file
with a path column and a label column (``--path_column``, ``--label_column``;
``--slide_column`` / ``--patient_column`` add the slide and patient
sections). The files are read and decided exactly as ``leukemia_tf.predict``
does. Labels must be the model's class names (taxonomy models: any taxonomy
node, e.g. ``normal`` or a leaf), matched case-insensitively when
unambiguous; ``--label_map=FILE`` (JSON or YAML, ``{"their label": "class",
"junk": null}``) renames them, and a label mapped to null is left out and
counted. The report (``<model_dir>/eval_images_<name>``) adds the scores
restricted to the classes present in the labels, the classes absent, and
``predictions.csv`` (every image's label and prediction). See
:func:`leukemia_tf.evaluation.evaluate_lib.evaluate_images`.

Trust: the report's "Knowing when not to answer" section scores every trust
score of :mod:`leukemia_tf.models.trust` (risk-coverage, AURC), the fitted
referral and back-off; ``--ood_images=FOLDER_OR_GLOB_OR_CSV`` adds how well
each score separates images the model should refuse (report in
``..._ood_<name>``).

Examples::

  python -m leukemia_tf.evaluate --model_dir=runs/quickstart --split=test
  python -m leukemia_tf.evaluate --model_dir=runs/pbc --images=smears/bccd \
      --label_map=bccd_labels.yaml
  python -m leukemia_tf.evaluate --model_dir=runs/pbc --split=test --ood_images=smears/junk
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
    "split",
    "test",
    "Split to evaluate (TFDS split syntax, e.g. 'test' or 'test[:50%]'). Not with --images.",
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory. Default: the one the model was trained with."
)
_OUT_DIR = flags.DEFINE_string(
    "out_dir",
    None,
    "Where to write the report. Default: <model_dir>/eval_<split> (with --images: "
    "<model_dir>/eval_images_<folder or CSV name>; with --ood_images, _ood_<name> added).",
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
_IMAGES = flags.DEFINE_string(
    "images",
    None,
    "Evaluate labelled image files instead of a split: a folder of label folders "
    "(FOLDER/<label>/*.jpg) or a CSV file with a path and a label column. The report goes to "
    "eval_images_<folder or CSV name>.",
)
_LABEL_MAP = flags.DEFINE_string(
    "label_map",
    None,
    'With --images: JSON or YAML file {"their label": "model class or taxonomy node", '
    '"junk": null}; a label mapped to null is left out and counted.',
)
_LABEL_COLUMN = flags.DEFINE_string(
    "label_column", "label", "With a CSV --images: the column of the labels."
)
_PATH_COLUMN = flags.DEFINE_string(
    "path_column", "path", "With a CSV --images: the column of image paths."
)
_SLIDE_COLUMN = flags.DEFINE_string(
    "slide_column",
    "slide_id",
    "With a CSV --images: slide id column (slide-level section). Used when present; an "
    "explicitly given column must exist.",
)
_PATIENT_COLUMN = flags.DEFINE_string(
    "patient_column",
    "patient_id",
    "With a CSV --images: patient id column (patient-level section). Used when present; an "
    "explicitly given column must exist.",
)
_READ_THREADS = flags.DEFINE_integer(
    "read_threads", 8, "With --images: threads reading image files.", lower_bound=1
)

#: Flags that only mean something with --images.
_IMAGE_FLAGS = (
    _LABEL_MAP,
    _LABEL_COLUMN,
    _PATH_COLUMN,
    _SLIDE_COLUMN,
    _PATIENT_COLUMN,
    _READ_THREADS,
)
_ADAPT_BN = flags.DEFINE_string(
    "adapt_bn",
    "",
    "Test-time adaptation (AdaBN): evaluate a copy of the model whose BatchNorm statistics are "
    "re-estimated on unlabelled target images: 'inputs' (the --images themselves, labels unused) "
    "or a folder/CSV of target images; empty: off. The run directory is not modified; the "
    "report goes to a folder ending in _adabn and records the adaptation.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the bootstrap and of the explained examples.")
_OOD_IMAGES = flags.DEFINE_string(
    "ood_images",
    None,
    "Out-of-distribution images (a folder, glob or CSV, read as leukemia_tf.predict reads "
    "them) that the model should refuse: the report adds, per trust score, how well it "
    "separates them from the evaluated images (AUROC, FPR at 95% TPR) and the fraction the "
    "fitted referral flags. With --split or --images; the report goes to a folder ending in "
    "_ood_<name>.",
)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _present(flag: flags.FlagHolder) -> bool:
    """Whether ``flag`` was given on the command line."""
    return bool(flags.FLAGS[flag.name].present)


def _explicit(flag: flags.FlagHolder) -> str | None:
    """The flag's value if given on the command line, else None (auto-detect)."""
    return flag.value if _present(flag) else None


def _trust_lines(result: dict) -> list[str]:
    """AURC of the selection score and its risk at 90% coverage; AUROC per OOD score."""
    selective = result.get("selective")
    if not selective:
        return []
    referral = selective["referral"]
    name = referral["score"] if referral.get("available") else selective["best_score"]
    row = selective["scores"].get(name) or {}
    lines = []
    if "aurc" in row:
        at90 = row["at_coverage"].get("0.9") or {}
        lines.append(
            f"  {name}: AURC {_fmt(row['aurc'])}, risk {_fmt(at90.get('risk'))} at 90% coverage "
            f"vs {_fmt(row['risk'])} at full coverage"
            + (
                f"; referral refers {referral['fraction_referred']:.1%}"
                if referral.get("available")
                else ""
            )
        )
    if not selective["trust_fitted"]:
        lines.append(
            f"  no trust statistics: fit them with {selective['fit_command']}"
            if selective["fit_command"]
            else "  no trust statistics (a fold ensemble: the logit scores only)"
        )
    ood = result.get("ood")
    if ood:
        lines.append(
            f"  OOD {ood['source']}: {ood['n_scored']} of {ood['n_images']} images "
            f"({ood['n_unreadable']} unreadable)"
        )
        for score, entry in ood["scores"].items():
            if "auroc" in entry:
                lines.append(
                    f"    {score}: AUROC {_fmt(entry['auroc'])}, FPR at 95% TPR "
                    f"{_fmt(entry['fpr_at_95_tpr'])}"
                )
        if ood.get("n_referred") is not None:
            lines.append(
                f"    referral refers {ood['fraction_referred']:.1%} of them "
                f"(evaluated images: {ood['id_fraction_referred']:.1%})"
            )
        for warning in ood["warnings"]:
            lines.append(f"  warning: {warning}")
    return lines


def main(argv: Sequence[str]) -> None:
    cli.check_no_args(argv)
    given = _MODEL_DIR.value
    # A local typo fails in a second, before TensorFlow is imported. Any other
    # model_dir (gs://) is checked once, by evaluate, before data or model are read.
    if "://" not in given and not os.path.isdir(os.path.expanduser(given)):
        raise cli.UserError(f"--model_dir={given!r} does not exist")

    images = _IMAGES.value
    if images is not None:
        if _present(_SPLIT):
            raise cli.UserError(
                f"--images={images!r} and --split={_SPLIT.value!r} are mutually exclusive: "
                "evaluate either labelled image files or a split of the model's data sets"
            )
        if not os.path.exists(os.path.expanduser(images)):
            raise cli.UserError(f"--images={images!r}: no such folder or CSV file")
    else:
        given_image_flags = [f"--{f.name}" for f in _IMAGE_FLAGS if _present(f)]
        if given_image_flags:
            raise cli.UserError(
                f"{', '.join(given_image_flags)} only apply to --images=FOLDER_OR_CSV"
            )

    from leukemia_tf.evaluation import evaluate_lib

    common = dict(
        data_dir=_DATA_DIR.value,
        out_dir=_OUT_DIR.value,
        bootstrap=_BOOTSTRAP.value,
        seed=_SEED.value,
        explain_samples=_EXPLAIN_SAMPLES.value,
        batch_size=_BATCH_SIZE.value,
        which=_WHICH.value,
        tta=_TTA.value,
        adapt_bn=_ADAPT_BN.value.strip(),
        ood_images=_OOD_IMAGES.value,
    )
    try:
        if images is None:
            result = evaluate_lib.evaluate(given, split=_SPLIT.value, **common)
        else:
            result = evaluate_lib.evaluate_images(
                given,
                images,
                label_map=_LABEL_MAP.value,
                label_column=_LABEL_COLUMN.value,
                path_column=_PATH_COLUMN.value,
                slide_column=_explicit(_SLIDE_COLUMN),
                patient_column=_explicit(_PATIENT_COLUMN),
                read_threads=_READ_THREADS.value,
                **common,
            )
    except (FileNotFoundError, ValueError) as e:
        raise cli.UserError(str(e)) from e
    cell, cal = result["cell"], result["calibration"]
    external = result.get("external")
    if external:
        head = (
            f"{external['source']}: {external['n_evaluated']} of {external['n_images']} images "
            f"({external['n_dropped']} dropped, {external['n_unreadable']} unreadable)"
        )
    else:
        head = (
            f"{result['data']['datasets']} [{result['data']['split']}]: "
            f"{result['data']['n_examples']} cells"
        )
    lines = [
        head,
        f"  accuracy {_fmt(cell['accuracy'])}  balanced accuracy "
        f"{_fmt(cell['balanced_accuracy'])}  macro-F1 {_fmt(cell['macro_f1'])}  "
        f"macro ROC-AUC {_fmt(cell['macro_roc_auc'])}",
        f"  temperature {cal['temperature']:.4g}: ECE {_fmt(cal['ece_before'])} -> "
        f"{_fmt(cal['ece_after'])}",
    ]
    if external:
        restricted = external["restricted_to_present"]
        lines.append(
            f"  restricted to the {len(restricted['classes'])} classes present: accuracy "
            f"{_fmt(restricted['accuracy'])}  balanced accuracy "
            f"{_fmt(restricted['balanced_accuracy'])}  macro-F1 {_fmt(restricted['macro_f1'])}"
        )
        if external["classes_absent"]:
            lines.append(f"  classes absent: {', '.join(external['classes_absent'])}")
        head = external["scored"].get("headline_scores")
        if head:
            lines.append(
                f"  score that counts: {external['scored']['headline']} ({head['n']} images): "
                f"accuracy {_fmt(head['accuracy'])}  balanced accuracy "
                f"{_fmt(head['balanced_accuracy'])}"
            )
    for key in ("slide", "patient"):
        section = result[key]
        if section.get("methods"):
            scored = section["methods"]["mean_probability"]
            lines.append(
                f"  {key} level ({section['n_groups']}): accuracy {_fmt(scored['accuracy'])} "
                f"(mean probability), "
                f"{_fmt(section['methods']['majority_vote']['accuracy'])} (majority vote)"
            )
    lines += _trust_lines(result)
    lines.append(f"Report: {result['report_path']}")
    print("\n".join(lines))


if __name__ == "__main__":
    flags.mark_flag_as_required("model_dir")
    cli.run(main)
