r"""Converts a DinoBloom / DINOv2 checkpoint for ``--weights=DIR``: ``python -m leukemia_tf.convert_backbone``.

Reads a timm-format ``.safetensors`` file or a DINOv2-repository ``.pth``
(without PyTorch; see :mod:`leukemia_tf.models.dinobloom_convert`) and writes
a keras-hub preset directory that the ``dinobloom_*`` (and ``dinov2_*``)
backbones load offline, at any image size that is a multiple of 14.

Examples::

  python -m leukemia_tf.convert_backbone --size=s \
      --checkpoint=vit_small_patch14_224.dinobloom.safetensors --output=weights/dinobloom_s
  python -m leukemia_tf.train --backbone=dinobloom_s --weights=weights/dinobloom_s ...
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from leukemia_tf import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "The checkpoint: timm-format .safetensors (e.g. Hugging Face "
    "1aurent/vit_small_patch14_224.dinobloom) or the DINOv2 repository's .pth (DinoBloom's "
    "release; only tensors are read from it).",
)
_SIZE = flags.DEFINE_enum(
    "size", None, ["s", "b", "l"], "Architecture: ViT-S/14 (s), ViT-B/14 (b) or ViT-L/14 (l)."
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Directory to write (new or empty): pass it as --weights to training."
)

_BACKBONES = {"s": "dinobloom_s", "b": "dinobloom_b", "l": "dinobloom_l"}


def main(argv: Sequence[str]) -> None:
    cli.check_no_args(argv)
    from leukemia_tf.models import dinobloom_convert

    try:
        output = dinobloom_convert.convert_checkpoint(_CHECKPOINT.value, _SIZE.value, _OUTPUT.value)
    except (FileNotFoundError, ValueError) as e:
        raise cli.UserError(f"--checkpoint={_CHECKPOINT.value!r}: {e}") from e
    print(
        f"wrote {output} ({dinobloom_convert.ARCHITECTURES[_SIZE.value]}); use it with "
        f"--backbone={_BACKBONES[_SIZE.value]} --weights={output}"
    )


if __name__ == "__main__":
    for _name in ("checkpoint", "size", "output"):
        flags.mark_flag_as_required(_name)
    cli.run(main)
