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

from collections.abc import Sequence

from absl import app, flags

from leukemia_tf.data.build import build

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


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    builder = build(
        _DATASET.value,
        data_dir=_DATA_DIR.value,
        manual_dir=_MANUAL_DIR.value,
        skip_bad_files=_SKIP_BAD_FILES.value,
        overwrite=_OVERWRITE.value,
    )
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(f"{builder.info.full_name} -> {builder.data_dir}\n  splits: {splits}")


if __name__ == "__main__":
    flags.mark_flag_as_required("dataset")
    app.run(main)
