"""AML-Cytomorphology_LMU: single leukocytes of AML patients and controls (Matek et al., 2019)."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from pathlib import Path

import tensorflow_datasets as tfds
from absl import logging

from tfds_builders import common

#: The 15 morphological classes (folder names and labels of ``annotations.dat``).
CLASS_CODES = (
    "BAS",  # basophil
    "EBO",  # erythroblast
    "EOS",  # eosinophil
    "KSC",  # smudge cell
    "LYA",  # lymphocyte (atypical)
    "LYT",  # lymphocyte (typical)
    "MMZ",  # metamyelocyte
    "MOB",  # monoblast
    "MON",  # monocyte
    "MYB",  # myelocyte
    "MYO",  # myeloblast
    "NGB",  # neutrophil (band)
    "NGS",  # neutrophil (segmented)
    "PMB",  # promyelocyte (bilobed)
    "PMO",  # promyelocyte
)
_HOMEPAGE = "https://www.cancerimagingarchive.net/collection/aml-cytomorphology_lmu/"
_ANNOTATIONS_URL = (
    "https://www.cancerimagingarchive.net/wp-content/uploads/"
    "AML-CYTOMORPHOLOGY_LMU-annotations-dat.zip"
)
ANNOTATIONS_FILE = "annotations.dat"
# What annotations.dat writes where an image was not re-annotated.
_NO_ANNOTATION = "nan"

_INSTRUCTIONS = f"""
Download the AML-Cytomorphology_LMU collection from The Cancer Imaging Archive
({_HOMEPAGE}, DOI 10.7937/tcia.2019.36f5o9ld, licence CC BY 3.0; the images
come through IBM Aspera as `PKG - AML-Cytomorphology_LMU.zip`, about 11 GB) and
unzip it into `manual_dir`. The builder looks for the folder holding the class
folders ({", ".join(CLASS_CODES)}; normally `AML-Cytomorphology/`) at any depth
below `manual_dir`; images may be the published `.tiff` files or re-encodes
(e.g. `.jpg`) with the same names. Optionally also unzip the re-annotation
file `{ANNOTATIONS_FILE}` ({_ANNOTATIONS_URL}) anywhere below `manual_dir` to
fill the `reannotation_1` and `reannotation_2` features.
"""


def _annotation_key(relative_path: str) -> str:
    """``"MYO/MYO_0001.tiff"`` -> ``"MYO/MYO_0001"``.

    Drops the extension (a ``.jpg`` re-encode matches its ``.tiff`` row) and
    keeps only the class folder and file name (so a row written relative to
    another root still matches).
    """
    parts = [p for p in relative_path.replace("\\", "/").split("/") if p]
    return posixpath.splitext("/".join(parts[-2:]))[0]


def read_annotations(path: Path) -> dict[str, tuple[str, str]]:
    """Reads TCIA's ``annotations.dat`` (``path label reannotation_1 reannotation_2``).

    Args:
      path: the ``annotations.dat`` file.

    Returns:
      ``{"<CLS>/<stem>": (reannotation_1, reannotation_2)}``, with ``""``
      where the file says ``nan`` (image not re-annotated).

    Raises:
      ValueError: a line does not have four fields; the message names the
        file and the line number.
    """
    out: dict[str, tuple[str, str]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 4:
                raise ValueError(
                    f"{path}:{number}: expected 4 space-separated fields "
                    f"(path label reannotation_1 reannotation_2), got {len(fields)}: {line!r}"
                )
            out[_annotation_key(fields[0])] = tuple(
                "" if v.lower() == _NO_ANNOTATION else v for v in fields[2:]
            )
    return out


class Builder(common.CellImageBuilder):
    """Expert-labelled single-cell images from peripheral-blood smears, 15 classes."""

    LABEL_NAMES = CLASS_CODES
    HOMEPAGE = _HOMEPAGE
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        # The TCIA re-annotations of 1,905 images (inter-/intra-rater
        # variability); "" where an image was not re-annotated or
        # annotations.dat was not given. May be "UNC" (unassignable).
        return {
            "reannotation_1": tfds.features.Text(),
            "reannotation_2": tfds.features.Text(),
        }

    def _annotations(self, manual_dir: Path) -> Mapping[str, tuple[str, str]]:
        found = sorted(
            p
            for p in manual_dir.rglob(ANNOTATIONS_FILE)
            if p.is_file() and "__MACOSX" not in p.parts
        )
        if not found:
            logging.info(
                "%s: no %s under %s; reannotation features are empty.",
                self.name,
                ANNOTATIONS_FILE,
                manual_dir,
            )
            return {}
        # Unzipping the side file twice is harmless; two different files are not.
        if len({p.read_bytes() for p in found}) > 1:
            raise common.ManualDirError(
                f"{self.name}: several different {ANNOTATIONS_FILE} files under {manual_dir}: "
                f"{[str(p) for p in found]}; keep one."
            )
        return read_annotations(found[0])

    def _split_records(self, manual_dir: Path) -> dict[str, list[common.Record]]:
        # Any folder with class-code sub-folders: a user may have only some
        # classes (e.g. a subset re-encoded as JPEG).
        root = self._find_single_anchor(
            manual_dir,
            lambda d: bool(set(CLASS_CODES) & common.subdir_names(d)),
            f"folder holding class folders named by the codes {list(CLASS_CODES)}",
        )
        annotations = self._annotations(manual_dir)
        records = []
        by_key: dict[str, Path] = {}
        for code in CLASS_CODES:
            if not (root / code).is_dir():
                continue
            for p in common.list_images(root / code):
                key = _annotation_key(f"{code}/{p.name}")
                # The same cell as .tiff and as a re-encode would be counted
                # twice and could land in two splits.
                if key in by_key:
                    raise common.ManualDirError(
                        f"{self.name}: {by_key[key]} and {p} are the same image in two "
                        "formats; keep one of them."
                    )
                by_key[key] = p
                reannotation_1, reannotation_2 = annotations.get(key, ("", ""))
                records.append(
                    common.Record(
                        path=p,
                        label=code,
                        file_name=f"{code}/{p.name}",
                        extra={"reannotation_1": reannotation_1, "reannotation_2": reannotation_2},
                    )
                )
        self._require_images(records, root)
        if annotations:
            matched = sum(_annotation_key(r.file_name) in annotations for r in records)
            logging.info(
                "%s: %d of %d images found in %s.",
                self.name,
                matched,
                len(records),
                ANNOTATIONS_FILE,
            )
        # annotations.dat has no patient or slide column: image-level splits only.
        return common.assign_splits(records)
