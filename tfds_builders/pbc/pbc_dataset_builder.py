"""PBC: peripheral blood cells of healthy donors (Acevedo et al., 2020)."""

from __future__ import annotations

import re
from pathlib import Path

import tensorflow_datasets as tfds

from tfds_builders import common

_NAMES = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)
_HOMEPAGE = "https://data.mendeley.com/datasets/snkd93bnjr/1"
_DOWNLOAD_URL = (
    "https://data.mendeley.com/public-files/datasets/snkd93bnjr/files/"
    "2fc38728-2ae7-4a62-a857-032af82334c3/file_downloaded"
)

#: File-name prefixes of the published archive (all 17,092 names follow
#: ``<PREFIX>_<digits>.jpg``). In ``ig/``: IG unspecified immature granulocyte,
#: MMY metamyelocyte, MY myelocyte, PMY promyelocyte; in ``neutrophil/``: BNE
#: band, SNE segmented, NEUTROPHIL unspecified.
SUBTYPES = ("BA", "EO", "ERB", "IG", "MMY", "MY", "PMY", "LY", "MO", "BNE", "SNE")
SUBTYPES += ("NEUTROPHIL", "PLATELET")
_NAME_RE = re.compile(rf"({'|'.join(SUBTYPES)})_(\d+)\.jpe?g", re.IGNORECASE)

_INSTRUCTIONS = f"""
Download `PBC_dataset_normal_DIB.zip` from Mendeley Data
({_HOMEPAGE}, DOI 10.17632/snkd93bnjr.1, licence CC BY 4.0), for example with
  curl -L -o PBC_dataset_normal_DIB.zip {_DOWNLOAD_URL}
and unzip it into `manual_dir` (unzip an inner zip too if Mendeley wrapped it in
another one). The builder looks for the folder holding the eight class folders
{", ".join(_NAMES)} (normally `PBC_dataset_normal_DIB/`) at any depth below
`manual_dir`.
"""


def file_subtype(file_name: str) -> str:
    """The cell subtype coded in a PBC file name's prefix.

    Args:
      file_name: base name such as ``"MMY_123.jpg"``.

    Returns:
      The upper-case prefix (``"BA"``, ``"MMY"``, ``"SNE"``, ...), or ``""``
      when the name does not follow the published grammar
      ``<PREFIX>_<digits>.jpg``.
    """
    match = _NAME_RE.fullmatch(file_name)
    return match.group(1).upper() if match else ""


class Builder(common.CellImageBuilder):
    """Single-cell images of normal peripheral blood (CellaVision DM96), 8 classes."""

    LABEL_NAMES = _NAMES
    HOMEPAGE = _HOMEPAGE
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        # The finer cell type of `ig` (IG, MMY, MY, PMY) and `neutrophil`
        # (BNE, SNE, NEUTROPHIL) images, from the file name.
        return {"subtype": tfds.features.Text()}

    def _split_records(self, manual_dir: Path) -> dict[str, list[common.Record]]:
        root = self._find_single_anchor(
            manual_dir,
            lambda d: set(_NAMES) <= common.subdir_names(d),
            f"folder holding the class folders {list(_NAMES)}",
        )
        # Image ids repeat across classes (e.g. MO_497408 and EO_497408), so the
        # key keeps the class folder.
        records = common.class_folder_records(
            root, _NAMES, extra=lambda p: {"subtype": file_subtype(p.name)}
        )
        self._require_images(records, root)
        # Healthy donors, no patient ids published: image-level splits only.
        return common.assign_splits(records)
