r"""Exports a trained model: ``python -m leukemia_tf.export``.

``--format=saved_model`` (default) writes a float32 SavedModel for TF Serving
into ``--export_dir/<version>/`` with two signatures, ``serving_default``
(encoded image bytes) and ``predict_pixels`` (float32 RGB pixels 0-255), the
label names, taxonomy and training config as assets, and TF Serving warmup
requests. See :mod:`leukemia_tf.serving.export_lib`.

``--format=litert`` writes ``--export_dir/<version>/model.tflite`` for
microscopes, phones and small PCs (input: RGB uint8 at the training size,
decoded outside the graph), optionally quantized (``--quantize``), with
``labels.txt`` and ``export.json`` beside it. See
:mod:`leukemia_tf.serving.litert`. ``--format=onnx`` writes the same graph as
``model.onnx`` (:mod:`leukemia_tf.serving.onnx_export`).

Example::

  python -m leukemia_tf.export --model_dir=runs/quickstart --export_dir=/srv/models/leukemia
  tensorflow_model_server --port=8500 --rest_api_port=8501 \
      --model_name=leukemia --model_base_path=/srv/models/leukemia
  # LiteRT for a device, int8 (calibrated on the run's training split):
  python -m leukemia_tf.export --model_dir=runs/quickstart --export_dir=litert/ \
      --format=litert --quantize=int8
  python -m leukemia_tf.predict --model=litert/1/model.tflite --images=smears/
  # For another lab: BatchNorm statistics re-estimated on its (unlabelled) images.
  python -m leukemia_tf.export --model_dir=runs/quickstart --export_dir=/srv/models/lab2 \
      --adapt_bn=lab2_smears/
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from leukemia_tf import cli

FORMATS = ("saved_model", "litert", "onnx")

_FORMAT = flags.DEFINE_enum(
    "format",
    "saved_model",
    FORMATS,
    "saved_model: TF Serving (image bytes in). litert: a .tflite for devices (uint8 RGB "
    "pixels at the training size in; builtin ops only). onnx: model.onnx, the same graph as "
    "litert, for ONNX Runtime (pip install 'leukemia_tf[onnx]').",
)
_OPSET = flags.DEFINE_integer(
    "opset", 15, "--format=onnx: the ONNX opset (15 runs on ONNX Runtime >= 1.10)."
)
_QUANTIZE = flags.DEFINE_enum(
    "quantize",
    "none",
    ["none", "float16", "dynamic", "int8"],
    "--format=litert: none (float32), float16 (weights), dynamic (int8 weights) or int8 "
    "(weights and activations, calibrated on --calibration_images of the training split).",
)
_CALIBRATION_IMAGES = flags.DEFINE_integer(
    "calibration_images",
    200,
    "--quantize=int8: training images (through the package's pipeline) the calibration runs.",
    lower_bound=1,
)
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
    "Glob or folder of real images for the warmup requests (litert: for the check against "
    "the Keras model); default: a few images of the model's validation split when its data "
    "are at hand (generated images are always added).",
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


def _check_format_flags() -> None:
    """Flags that only one format reads, given with the other, are an error."""
    owners = {"quantize": "litert", "calibration_images": "litert", "opset": "onnx"}
    for name, owner in owners.items():
        if flags.FLAGS[name].present and _FORMAT.value != owner:
            raise cli.UserError(
                f"--{name} is an option of --format={owner} (this is --format={_FORMAT.value})"
            )
    if _FORMAT.value != "saved_model":
        for name in ("model_name", "warmup"):
            if flags.FLAGS[name].present:
                raise cli.UserError(
                    f"--{name} is an option of --format=saved_model (TF Serving), not "
                    f"{_FORMAT.value}"
                )
    if flags.FLAGS["calibration_images"].present and _QUANTIZE.value != "int8":
        raise cli.UserError(
            f"--calibration_images needs --quantize=int8 (this is --quantize={_QUANTIZE.value})"
        )


def main(argv: Sequence[str]) -> None:
    cli.check_no_args(argv)
    if _VERSION.value is not None and _VERSION.value < 1:
        raise cli.UserError(f"--version={_VERSION.value}: must be a positive integer")
    _check_format_flags()
    if _FORMAT.value != "saved_model":
        _export_portable(_FORMAT.value)
        return
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
    print(
        f"\nExported version {result.version} to {result.path}\n"
        f"{_adaptation_line(result.adapted_batchnorm)}"
        f"  temperature {result.temperature:g}, {result.warmup_records} warmup requests, {check}\n"
        f"  signatures: {', '.join(result.signatures)}\n"
        "Inspect:\n"
        f"  saved_model_cli show --all --dir {result.path}\n"
        "Serve:\n"
        f"  tensorflow_model_server --port=8500 --rest_api_port=8501 "
        f"--model_name={_MODEL_NAME.value} --model_base_path={base}"
    )


def _adaptation_line(adapted: dict | None) -> str:
    if adapted is None:
        return ""
    if adapted["adapted"]:
        return (
            f"  AdaBN: an ADAPTED copy, BatchNorm statistics of {adapted['layers']} layer(s) "
            f"re-estimated on {adapted['count']} image(s) of {adapted['images']}\n"
        )
    return f"  --adapt_bn: {adapted['note']}\n"


def _export_portable(model_format: str) -> None:
    """``--format=litert`` or ``onnx``."""
    # Heavy imports after flag parsing.
    common = dict(
        version=_VERSION.value,
        which=_WHICH.value,
        apply_temperature=_APPLY_TEMPERATURE.value,
        check_images=_WARMUP_IMAGES.value,
        verify=_VERIFY.value,
        adapt_bn=_ADAPT_BN.value,
    )
    try:
        if model_format == "litert":
            from leukemia_tf.serving import litert

            result = litert.export_litert(
                _MODEL_DIR.value,
                _EXPORT_DIR.value,
                quantize=_QUANTIZE.value,
                calibration_images_count=_CALIBRATION_IMAGES.value,
                **common,
            )
            detail = f"quantization {result.quantize}"
        else:
            from leukemia_tf.serving import onnx_export

            result = onnx_export.export_onnx(
                _MODEL_DIR.value, _EXPORT_DIR.value, opset=_OPSET.value, **common
            )
            detail = f"opset {result.opset}"
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        raise cli.UserError(f"export failed: {e}") from e
    check = result.check
    checked = (
        f"checked against the Keras model on {check['images']} image(s): max |dp| = "
        f"{check['max_abs_difference']:.1e}, top-1 agreement {check['top1_agreement']:.1%}"
        if check
        else "not verified (--noverify)"
    )
    print(
        f"\nExported version {result.version} to {result.file} "
        f"({result.size_bytes / 2**20:.1f} MiB, {detail})\n"
        f"{_adaptation_line(result.adapted_batchnorm)}"
        f"  temperature {result.temperature:g}, {checked}\n"
        "  input: uint8 [N, S, S, 3] RGB at the training size, decoded outside the graph "
        "(export.json says how)\n"
        "Predict with it:\n"
        f"  python -m leukemia_tf.predict --model={result.file} --images=FOLDER"
    )


if __name__ == "__main__":
    cli.run(main)
