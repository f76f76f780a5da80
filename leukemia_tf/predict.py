r"""Batch inference on image files: ``python -m leukemia_tf.predict``.

Writes ``predictions.csv`` (one row per image: predicted class, the
probability of every class and, for a hierarchical model, the decision at
each taxonomy level), ``predictions_errors.csv`` (files that could not be
read, with the reason) and, for a CSV input with a ``slide_id`` /
``patient_id`` column, ``predictions_slides.csv`` / ``predictions_patients.csv``
(majority vote and mean probability per group). See
:mod:`leukemia_tf.serving.predict_lib`.

Exit status: 0 when every image was predicted, 1 when some could not be read
(their predictions are missing, the others are written), 2 on bad usage.

Examples::

  python -m leukemia_tf.predict --model_dir=runs/quickstart --images=smears/patient7/
  python -m leukemia_tf.predict --model_dir=runs/quickstart --images='smears/**/*.jpg'
  python -m leukemia_tf.predict --model_dir=runs/quickstart --images=cells.csv \
      --slide_column=slide_id --output=out/predictions.csv
  # A LiteRT export (python -m leukemia_tf.export --format=litert), as on a device:
  python -m leukemia_tf.predict --model=litert/1/model.tflite --images=smears/patient7/
  # Another lab's smears: BatchNorm statistics re-estimated on them first (AdaBN).
  python -m leukemia_tf.predict --model_dir=runs/quickstart --images=lab2/ --adapt_bn=inputs
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from leukemia_tf import cli

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Training run whose model predicts.")
_MODEL = flags.DEFINE_string(
    "model",
    None,
    "Instead of --model_dir: a portable model file written by leukemia_tf.export "
    "(--format=litert: model.tflite, run by the LiteRT interpreter; --format=onnx: "
    "model.onnx, run by ONNX Runtime); the same CSV columns.",
)
_IMAGES = flags.DEFINE_string(
    "images",
    None,
    "A folder (searched recursively), a glob ('smears/**/*.png') or a CSV file with a "
    "column of image paths (relative to the CSV's folder).",
)
_OUTPUT = flags.DEFINE_string(
    "output",
    "predictions.csv",
    "Cell-level CSV; <stem>_errors.csv, <stem>_slides.csv and <stem>_patients.csv go next to it.",
)
_WHICH = flags.DEFINE_string(
    "which", "best", "Checkpoint: 'best', 'last' or a path to a .keras file."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per model call.", lower_bound=1)
_APPLY_TEMPERATURE = flags.DEFINE_bool(
    "apply_temperature",
    False,
    "Divide the logits by the temperature fitted by leukemia_tf.evaluate (model_dir/calibration.json).",
)
_TTA = flags.DEFINE_bool(
    "tta",
    False,
    "Test-time augmentation: average the logits over the 8 rotations and mirrorings of each "
    "image (8x the inference time). The export serves the single view.",
)
_ADAPT_BN = flags.DEFINE_string(
    "adapt_bn",
    "",
    "AdaBN: re-estimate the BatchNorm statistics on unlabelled target-domain images before "
    "predicting (images from another lab: other stain, camera, focus). '' (off), 'inputs' "
    "(the very images being predicted, transductively) or a folder, glob or CSV of target "
    "images. Predicts with an adapted copy; the run directory is not changed. "
    "<stem>_adaptation.json records it. No effect on a model without BatchNorm.",
)
_PATH_COLUMN = flags.DEFINE_string("path_column", "path", "CSV input: the column of image paths.")
_SLIDE_COLUMN = flags.DEFINE_string(
    "slide_column",
    "slide_id",
    "CSV input: slide id column; with it, <stem>_slides.csv pools the cells of each slide. "
    "Used when present; an explicitly given column must exist.",
)
_PATIENT_COLUMN = flags.DEFINE_string(
    "patient_column",
    "patient_id",
    "CSV input: patient id column for <stem>_patients.csv. Used when present; an explicitly "
    "given column must exist.",
)
_READ_THREADS = flags.DEFINE_integer(
    "read_threads", 8, "Threads reading image files.", lower_bound=1
)
_VERBOSE = flags.DEFINE_integer("verbose", 1, "1: progress bar; 0: quiet.")

flags.mark_flags_as_required(["images"])
flags.mark_flags_as_mutual_exclusive(["model_dir", "model"], required=True)


def _explicit(flag: flags.FlagHolder) -> str | None:
    """The flag's value if given on the command line, else None (auto-detect)."""
    return flag.value if flags.FLAGS[flag.name].present else None


def main(argv: Sequence[str]) -> int:
    cli.check_no_args(argv)
    from leukemia_tf.serving import predict_lib  # heavy imports after flag parsing

    try:
        result = predict_lib.predict(
            _MODEL_DIR.value,
            _IMAGES.value,
            _OUTPUT.value,
            which=_WHICH.value,
            batch_size=_BATCH_SIZE.value,
            apply_temperature=_APPLY_TEMPERATURE.value,
            path_column=_PATH_COLUMN.value,
            slide_column=_explicit(_SLIDE_COLUMN),
            patient_column=_explicit(_PATIENT_COLUMN),
            read_threads=_READ_THREADS.value,
            verbose=_VERBOSE.value,
            tta=_TTA.value,
            adapt_bn=_ADAPT_BN.value,
            model=_MODEL.value,
        )
    except (FileNotFoundError, ValueError) as e:
        raise cli.UserError(str(e)) from e
    predict_lib.print_summary(result)
    return 1 if result.num_failed else 0


if __name__ == "__main__":
    cli.run(main)
