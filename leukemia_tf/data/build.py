"""Building a data set into TFDS shards (the library side of ``leukemia_tf.build_data``)."""

from __future__ import annotations

import os

from absl import logging

from leukemia_tf.data.registry import register_builders


def build(
    dataset: str,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    skip_bad_files: bool = False,
    overwrite: bool = False,
):
    """Builds ``dataset`` and returns its ``tfds.core.DatasetBuilder``.

    Args:
      dataset: builder name (``name[/config][:version]``).
      data_dir: TFDS data directory.
      manual_dir: folder with the user's download (manual-download sets).
      skip_bad_files: skip unreadable images instead of failing.
      overwrite: delete and rebuild an existing version.
    """
    import tensorflow_datasets as tfds

    known = register_builders()
    if manual_dir is not None:
        manual_dir = os.path.expanduser(manual_dir)
    if data_dir is not None and not data_dir.startswith("gs://"):
        data_dir = os.path.expanduser(data_dir)
    try:
        builder = tfds.builder(dataset, data_dir=data_dir, skip_bad_files=skip_bad_files)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"--dataset={dataset!r} is not a known builder; known: {', '.join(known)}"
        ) from e
    mode = (
        tfds.download.GenerateMode.FORCE_REDOWNLOAD
        if overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode)
    )
    logging.info("Built %s in %s", builder.info.full_name, builder.data_dir)
    return builder
