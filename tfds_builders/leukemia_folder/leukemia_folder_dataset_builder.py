"""leukemia_folder: your own images (a hospital's slides, images from the ASH Image Bank).

Layout of ``manual_dir`` (or of the single folder inside it)::

  <root>/
    label_map.yaml        native label -> taxonomy node (or null); see README.md
    metadata.csv          optional: path,label,patient_id,slide_id[,split]
    <class A>/ *.png ...  one folder per class (sub-folders inside are fine)
    <class B>/ ...

Class names are taken from the class folders and the CSV at build time
(sorted). TFDS stores them with the data set, so loading needs nothing but
the name: ``tfds.load("leukemia_folder/<config>", data_dir=...)``. The
label map is validated against ``configs/taxonomy.yaml`` and stored in the
data set's metadata (see :func:`label_map_from_info`). The layout is read
and validated in :mod:`tfds_builders.leukemia_folder.metadata`.

Several private sets are kept apart by config name: any name that is not a
predefined config creates one on the fly, e.g.
``tfds.builder("leukemia_folder/my_hospital", data_dir=...)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import tensorflow_datasets as tfds
from absl import logging

from tfds_builders import common
from tfds_builders.leukemia_folder import metadata

# Re-exported: README.md shows `label_map_from_info` imported from here.
from tfds_builders.leukemia_folder.metadata import label_map_from_info  # noqa: F401

_CONFIG_NAME = re.compile(r"^[A-Za-z0-9][\w\-.]*$")


# ------------------------------------------------------------------ builder
class Builder(common.CellImageBuilder):
    """Your own blood-cell images, one folder per class, with an optional metadata CSV."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = metadata.INSTRUCTIONS
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name="default",
            description="A user image set; name your own config to keep several sets apart.",
        )
    ]

    def __init__(
        self,
        *,
        skip_bad_files: bool = False,
        class_names: Sequence[str] | None = None,
        **kwargs,
    ):
        """Creates the builder.

        Args:
          skip_bad_files: skip unreadable images (reported) instead of failing.
          class_names: fix the label names and their order (e.g. to share label
            indices with another set); may include classes without images.
            Default: the sorted names found at build time.
          **kwargs: for ``tfds.core.DatasetBuilder`` (``data_dir``, ``config``, ...).
        """
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if not class_names or len(set(class_names)) != len(class_names):
                raise ValueError(f"class_names must be non-empty and unique, got {class_names}")
        self._class_names = class_names
        try:
            super().__init__(skip_bad_files=skip_bad_files, **kwargs)
        except ValueError as e:
            if class_names is not None and "ClassLabel names" in str(e):
                raise ValueError(
                    f"leukemia_folder: class_names={class_names} differ from the classes of the "
                    f"set already built in data_dir ({e}); rebuild with --overwrite or another "
                    "config name."
                ) from e
            raise

    def _create_builder_config(self, builder_config, version):
        # Any name that is not predefined becomes a config of its own, so that
        # users keep several private sets apart: leukemia_folder/<name>.
        if isinstance(builder_config, str):
            name, _, requested = builder_config.partition(":")
            if name not in self.builder_configs:
                if not _CONFIG_NAME.match(name):
                    raise ValueError(
                        f"leukemia_folder: invalid config name {name!r}: use letters, digits, "
                        "'_', '-' and '.', starting with a letter or digit."
                    )
                builder_config = tfds.core.BuilderConfig(
                    name=name, description=f"The user image set '{name}'."
                )
                version = version or requested or None
        return super()._create_builder_config(builder_config, version)

    def _info(self) -> tfds.core.DatasetInfo:
        # Without class_names the names are set at build time (_split_records)
        # and restored by TFDS from the stored dataset info on load.
        label = (
            tfds.features.ClassLabel(names=self._class_names)
            if self._class_names
            else tfds.features.ClassLabel()
        )
        return self.dataset_info_from_configs(
            features=common.cell_features([], extra={"label": label}),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    @property
    def source_name(self) -> str:
        # The config too, so that two private sets stay apart when mixed.
        return f"{self.name}/{self.builder_config.name}"

    def _split_records(self, manual_dir: Path) -> dict[str, list[common.Record]]:
        result = metadata.scan(manual_dir, self.source_name)
        found = sorted({str(r.label) for r in result.records})
        if self._class_names:
            unknown = [c for c in found if c not in self._class_names]
            if unknown:
                raise metadata.MetadataError(
                    f"{self.source_name}: labels {unknown} found under {result.root} are not in "
                    f"class_names={self._class_names}"
                )
            class_names = list(self._class_names)
        else:
            class_names = found
        label_map = metadata.load_label_map(result.root, class_names, self.source_name)
        self._set_class_names(class_names)
        self.info.metadata[metadata.METADATA_LABEL_MAP] = label_map
        self.info.metadata[metadata.METADATA_SPLIT_SOURCE] = (
            f"{metadata.METADATA_CSV} split column"
            if result.official_split is not None
            else "grouped (patient_id, else slide_id, else image) stratified split"
        )
        by_split = metadata.assign(result)
        empty = [split for split, records in by_split.items() if not records]
        if empty and result.official_split is None:
            owner = metadata.slide_owners(result.records, str(result.root))
            groups = len({metadata.group_key(r, owner) or r.file_name for r in result.records})
            raise metadata.MetadataError(
                f"{self.source_name}: too few images under {result.root} for train / "
                f"validation / test: {len(result.records)} image(s) in {groups} group(s) "
                f"(patients, slides or single images) leave split(s) {empty} empty. Add "
                f"images or patients, or give {metadata.METADATA_CSV} a 'split' column."
            )
        # A CSV's own splits may leave one out on purpose (e.g. a test-only set).
        return {split: records for split, records in by_split.items() if records}

    def _set_class_names(self, class_names: list[str]) -> None:
        label = self.info.features["label"]
        if label.num_classes is not None and label.names != class_names:
            # A rebuild (overwrite) of a set whose classes changed: TFDS restored
            # the previous build's names from data_dir into this builder. The
            # constructor is the public way to reset a ClassLabel's names.
            logging.warning(
                "%s: classes changed from %s to %s", self.source_name, label.names, class_names
            )
            label.__init__(names=class_names)
        elif label.num_classes is None:
            label.names = class_names
