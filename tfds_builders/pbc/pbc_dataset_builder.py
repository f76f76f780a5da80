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


class Builder(tfds.core.GeneratorBasedBuilder):
    """Single-cell images of normal peripheral blood (CellaVision DM96), 8 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def __init__(self, *, skip_bad_files: bool = False, **kwargs):
        self._skip_bad_files = skip_bad_files
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=common.cell_features(
                _NAMES,
                # The finer cell type of `ig` (IG, MMY, MY, PMY) and
                # `neutrophil` (BNE, SNE, NEUTROPHIL) images, from the file name.
                extra={"subtype": tfds.features.Text()},
            ),
            supervised_keys=("image", "label"),
            homepage=_HOMEPAGE,
        )

    def _anchor(self, manual_dir: Path) -> Path:
        return common.find_single_anchor_dir(
            manual_dir,
            lambda d: set(_NAMES) <= common.subdir_names(d),
            self.name,
            f"folder holding the class folders {list(_NAMES)}",
            _INSTRUCTIONS,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = common.require_manual_dir(dl_manager.manual_dir, self.name, _INSTRUCTIONS)
        root = self._anchor(manual_dir)
        # Image ids repeat across classes (e.g. MO_497408 and EO_497408), so the
        # key keeps the class folder.
        records = [
            common.Record(
                path=p,
                label=name,
                file_name=f"{name}/{p.name}",
                extra={"subtype": file_subtype(p.name)},
            )
            for name in _NAMES
            for p in common.list_images(root / name)
        ]
        if not records:
            raise common.ManualDirError(
                f"{self.name}: the class folders under {root} hold no image files. "
                f"{_INSTRUCTIONS.strip()}"
            )
        # Healthy donors, no patient ids published: image-level splits only.
        by_split = common.assign_splits(records)
        return common.split_generators(
            by_split, self._generate_examples, self.name, self._skip_bad_files
        )

    def _generate_examples(self, records, collector=None, finish=True):
        yield from common.generate_examples(
            records, self.name, self._skip_bad_files, collector=collector, finish=finish
        )
