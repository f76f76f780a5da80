r"""Exports a trained model for TF Serving: ``python -m leukemia_tf.export``.

Writes a float32 SavedModel into ``--export_dir/<version>/`` (TF Serving's
layout) with two signatures, ``serving_default`` (encoded image bytes) and
``predict_pixels`` (float32 RGB pixels 0-255), the label names, taxonomy and
training config as assets, and TF Serving warmup requests. See
:mod:`leukemia_tf.serving.export_lib`.

Example::

  python -m leukemia_tf.export --model_dir=runs/quickstart --export_dir=/srv/models/leukemia
  tensorflow_model_server --port=8500 --rest_api_port=8501 \
      --model_name=leukemia --model_base_path=/srv/models/leukemia
  # For another lab: BatchNorm statistics re-estimated on its (unlabelled) images.
  python -m leukemia_tf.export --model_dir=runs/quickstart --export_dir=/srv/models/lab2 \
      --adapt_bn=lab2_smears/
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from leukemia_tf import cli

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Training run to export (leukemia_tf.train's --model_dir)."
)
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir",
    None,
    "TF Serving model base path (local or gs://); the SavedModel goes into <export_dir>/<version>/.",
)
_VERSION = flags.DEFINE_integer(
    "version", None, "Version folder to write; default: one more than the largest existing one."
)
_WHICH = flags.DEFINE_string(
    "which", "best", "Checkpoint: 'best', 'last' or a path to a .keras file."
)
_APPLY_TEMPERATURE = flags.DEFINE_bool(
    "apply_temperature",
    False,
    "Divide the logits by the temperature fitted by leukemia_tf.evaluate (model_dir/calibration.json).",
)
_MODEL_NAME = flags.DEFINE_string(
    "model_name", "leukemia", "Model name of the warmup requests (TF Serving's --model_name)."
)
_WARMUP_IMAGES = flags.DEFINE_string(
    "warmup_images",
    None,
    "Glob or folder of real images for the warmup requests; default: a few images of the "
    "model's validation split when its data are at hand (generated images are always added).",
)
_ADAPT_BN = flags.DEFINE_string(
    "adapt_bn",
    "",
    "AdaBN: a folder, glob or CSV of unlabelled target-domain images (another lab's smears); "
    "export a copy whose BatchNorm statistics are re-estimated on them, recorded as "
    "'adapted_batchnorm' in assets/export.json. The run directory is not changed. Empty: off.",
)
_WARMUP = flags.DEFINE_bool(
    "warmup", True, "Write assets.extra/tf_serving_warmup_requests (needs tensorflow-serving-api)."
)
_VERIFY = flags.DEFINE_bool(
    "verify", True, "Reload the export and check it reproduces the Keras model's probabilities."
)

flags.mark_flags_as_required(["model_dir", "export_dir"])


def main(argv: Sequence[str]) -> None:
    cli.check_no_args(argv)
    if _VERSION.value is not None and _VERSION.value < 1:
        raise cli.UserError(f"--version={_VERSION.value}: must be a positive integer")
    from leukemia_tf.serving import export_lib  # heavy imports after flag parsing

    try:
        result = export_lib.export_model(
            _MODEL_DIR.value,
            _EXPORT_DIR.value,
            version=_VERSION.value,
            which=_WHICH.value,
            apply_temperature=_APPLY_TEMPERATURE.value,
            model_name=_MODEL_NAME.value,
            warmup_images=_WARMUP_IMAGES.value,
            write_warmup=_WARMUP.value,
            verify=_VERIFY.value,
            adapt_bn=_ADAPT_BN.value,
        )
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        # Bad input: the message names the file or flag; no traceback needed.
        raise cli.UserError(f"export failed: {e}") from e
    base = result.path.rsplit("/", 1)[0]
    check = (
        f"checked against the Keras model: max |dp| = {result.max_abs_difference:.1e}"
        if result.max_abs_difference is not None
        else "not verified (--noverify)"
    )
    adapted = result.adapted_batchnorm
    if adapted is None:
        adaptation = ""
    elif adapted["adapted"]:
        adaptation = (
            f"  AdaBN: an ADAPTED copy, BatchNorm statistics of {adapted['layers']} layer(s) "
            f"re-estimated on {adapted['count']} image(s) of {adapted['images']}\n"
        )
    else:
        adaptation = f"  --adapt_bn: {adapted['note']}\n"
    print(
        f"\nExported version {result.version} to {result.path}\n"
        f"{adaptation}"
        f"  temperature {result.temperature:g}, {result.warmup_records} warmup requests, {check}\n"
        f"  signatures: {', '.join(result.signatures)}\n"
        "Inspect:\n"
        f"  saved_model_cli show --all --dir {result.path}\n"
        "Serve:\n"
        f"  tensorflow_model_server --port=8500 --rest_api_port=8501 "
        f"--model_name={_MODEL_NAME.value} --model_base_path={base}"
    )


if __name__ == "__main__":
    cli.run(main)
