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


def prepare_generated(specs, data_dir: str | None) -> None:
    """Builds, like ``tfds.load`` would, the data sets among ``specs`` that need no download.

    Sets downloaded by hand are never built here: the input pipeline's error
    then says which ``build_data`` command to run.

    Args:
      specs: the parsed ``--datasets`` (:func:`leukemia_tf.data.pipeline.parse_datasets`).
      data_dir: the TFDS data directory (``None``: TFDS's default).
    """
    import tensorflow_datasets as tfds

    register_builders()
    for spec in specs:
        builder = tfds.builder(spec.name, data_dir=data_dir)
        if builder.is_prepared() or builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
            continue
        print(f"Building the data set {spec.name} into {builder.data_dir} (first use) ...")
        build(spec.name, data_dir=data_dir)
