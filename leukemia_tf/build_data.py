r"""Builds a data set into TFDS shards: ``python -m leukemia_tf.build_data``.

The package's own build command over ``builder.download_and_prepare``: it
works in a fresh virtual environment (the ``tfds build`` command line imports
Apache Beam at start-up, which this package does not depend on).

Examples::

  # The built-in synthetic set (no download):
  python -m leukemia_tf.build_data --dataset=leukemia_synthetic --data_dir=~/tensorflow_datasets

  # A public set downloaded by hand:
  python -m leukemia_tf.build_data --dataset=pbc --manual_dir=~/downloads/pbc \
      --data_dir=~/tensorflow_datasets

  # Your own images, one folder per class (see tfds_builders/leukemia_folder/README.md):
  python -m leukemia_tf.build_data --dataset=leukemia_folder --manual_dir=~/my_slides
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags

from leukemia_tf import cli

_DATASET = flags.DEFINE_string(
    "dataset",
    None,
    "Builder name, optionally with config and version, e.g. 'pbc' or 'all_idb/idb2'.",
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Where TFDS writes the shards (local path or gs://). Default: TFDS's default."
)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Folder holding the data set's download, for sets downloaded by hand."
)
_SKIP_BAD_FILES = flags.DEFINE_bool(
    "skip_bad_files",
    False,
    "Skip unreadable image files (they are reported with their count and paths) instead of "
    "failing the build with the list of them.",
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild even if the data set already exists.")


def _check_manual_download(name: str, data_dir: str | None, manual_dir: str | None) -> None:
    """Refuses to start a build that needs a download by hand when none is at hand.

    Checked before TFDS creates ``data_dir`` and announces a build it cannot do.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if manual_dir is not None or builder.is_prepared():
        return
    if not getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        return
    root = data_dir or tfds.core.constants.DATA_DIR
    default = os.path.join(os.path.expanduser(root), "downloads", "manual")
    if "://" in root or (os.path.isdir(default) and os.listdir(default)):
        return
    raise cli.UserError(
        f"--dataset={name!r} is downloaded by hand: pass --manual_dir=<folder holding your "
        f"download> (or put it in {default}); tfds_builders/{builder.name}/README.md says where to get it"
    )


def main(argv: Sequence[str]) -> None:
    cli.check_no_args(argv)
    manual_dir = _MANUAL_DIR.value
    if manual_dir is not None and not os.path.isdir(os.path.expanduser(manual_dir)):
        raise cli.UserError(f"--manual_dir={manual_dir!r} is not a folder")

    # Imported after flag parsing: TensorFlow loads with the console settings.
    from leukemia_tf.data import names  # imports TensorFlow
    from leukemia_tf.data.build_data_lib import build

    names.check_dataset_name(_DATASET.value)
    _check_manual_download(_DATASET.value, _DATA_DIR.value, manual_dir)
    try:
        builder = build(
            _DATASET.value,
            data_dir=_DATA_DIR.value,
            manual_dir=manual_dir,
            skip_bad_files=_SKIP_BAD_FILES.value,
            overwrite=_OVERWRITE.value,
        )
    except (FileNotFoundError, ValueError) as e:
        # A missing or incomplete download, or unreadable images: the message says which.
        raise cli.UserError(str(e)) from e
    except AssertionError as e:
        # TFDS asserts on an empty default manual folder; anything else is a bug.
        if "Manual directory" not in str(e):
            raise
        raise cli.UserError(str(e)) from e
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(f"{builder.info.full_name} -> {builder.data_dir}\n  splits: {splits}")


if __name__ == "__main__":
    # Only here: other modules import this one and parse flags of their own.
    flags.mark_flag_as_required("dataset")
    cli.run(main)
