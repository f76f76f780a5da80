"""The Taleqani-hospital ALL image set (Aria, Ghaderzadeh et al., 2021)."""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from tfds_builders import common

_NAMES = ("Benign", "Early", "Pre", "Pro")
_HOMEPAGE = "https://www.kaggle.com/datasets/mehradaria/leukemia"

_INSTRUCTIONS = f"""
Download the "Acute Lymphoblastic Leukemia (ALL) image dataset" from Kaggle
({_HOMEPAGE}, DOI 10.34740/KAGGLE/DSV/2175623; accept the authors' terms)
and unpack `archive.zip` into `manual_dir`. The builder looks for the folder
`Original/` (config `original`) or `Segmented/` (config `segmented`) holding
the four class folders {", ".join(_NAMES)}, at any depth below `manual_dir`.
"""


class Builder(tfds.core.GeneratorBasedBuilder):
    """Peripheral-blood smear images: benign (hematogones) and three B-ALL subtypes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="original", description="The original images."),
        tfds.core.BuilderConfig(
            name="segmented",
            description="The authors' HSV-thresholded copies with the background removed.",
        ),
    ]

    def __init__(self, *, skip_bad_files: bool = False, **kwargs):
        self._skip_bad_files = skip_bad_files
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=common.cell_features(_NAMES),
            supervised_keys=("image", "label"),
            homepage=_HOMEPAGE,
        )

    def _anchor(self, manual_dir: Path) -> Path:
        folder = "Original" if self.builder_config.name == "original" else "Segmented"
        return common.find_single_anchor_dir(
            manual_dir,
            lambda d: d.name == folder and set(_NAMES) <= common.subdir_names(d),
            self.name,
            f"'{folder}/' folder with the class folders {list(_NAMES)}",
            _INSTRUCTIONS,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = common.require_manual_dir(dl_manager.manual_dir, self.name, _INSTRUCTIONS)
        root = self._anchor(manual_dir)
        records = [
            common.Record(path=p, label=name, file_name=f"{name}/{p.name}")
            for name in _NAMES
            for p in common.list_images(root / name)
        ]
        # No patient ids in this release (89 patients): image-level splits only.
        by_split = common.assign_splits(records)
        return common.split_generators(
            by_split, self._generate_examples, self.name, self._skip_bad_files
        )

    def _generate_examples(self, records, collector=None, finish=True):
        yield from common.generate_examples(
            records, self.name, self._skip_bad_files, collector=collector, finish=finish
        )
