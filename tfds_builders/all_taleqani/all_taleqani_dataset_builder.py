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


class Builder(common.CellImageBuilder):
    """Peripheral-blood smear images: benign (hematogones) and three B-ALL subtypes."""

    LABEL_NAMES = _NAMES
    HOMEPAGE = _HOMEPAGE
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="original", description="The original images."),
        tfds.core.BuilderConfig(
            name="segmented",
            description="The authors' HSV-thresholded copies with the background removed.",
        ),
    ]

    def _split_records(self, manual_dir: Path) -> dict[str, list[common.Record]]:
        folder = "Original" if self.builder_config.name == "original" else "Segmented"
        root = self._find_single_anchor(
            manual_dir,
            lambda d: d.name == folder and set(_NAMES) <= common.subdir_names(d),
            f"'{folder}/' folder with the class folders {list(_NAMES)}",
        )
        # No patient ids in this release (89 patients): image-level splits only.
        return common.assign_splits(common.class_folder_records(root, _NAMES))
