"""C-NMC 2019: B-ALL blasts versus normal B-lymphoid cells (ISBI 2019 challenge; TCIA)."""

from __future__ import annotations

import csv
import dataclasses
import functools
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from leukemia_tf.data import images
from tfds_builders import common

_NAMES = ("all", "hem")
_HOMEPAGE = "https://www.cancerimagingarchive.net/collection/c-nmc-2019/"
_FOLDS = ("fold_0", "fold_1", "fold_2")
_PRELIM = "C-NMC_test_prelim_phase_data"
_FINAL = "C-NMC_test_final_phase_data"
_LABELS_CSV = f"{_PRELIM}_labels.csv"
_CSV_COLUMNS = ("Patient_ID", "new_names", "labels")
#: The prelim CSV's `labels` column: 1 = ALL (cancer), 0 = HEM (normal).
_CSV_LABELS = {"1": "all", "0": "hem"}
#: ``UID_<P>_<N>_<C>_all.bmp`` / ``UID_H<S>_<N>_<C>_hem.bmp`` (CodaLab overview):
#: subject, microscopic image N of that subject, cell C within image N.
_UID_RE = re.compile(r"^UID_(H?)(\d+)_(\d+)_(\d+)_(all|hem)\.bmp$", re.IGNORECASE)
#: Value of the `fold` feature outside the training folds.
NO_FOLD = -1

_INSTRUCTIONS = f"""
Download the TCIA collection "C-NMC-2019" ({_HOMEPAGE}; the package
`PKG - C-NMC 2019.zip` through IBM Aspera; CC BY 3.0) and unpack it into
`manual_dir`. The Kaggle mirror `andrewmvd/leukemia-classification`
(`C-NMC_Leukemia/...`) works as well. The builder looks, at any depth below
`manual_dir`, for: the folder holding `fold_0/`, `fold_1/`, `fold_2/` (each with
`all/` and `hem/`), the file `{_LABELS_CSV}`, and the folders `{_PRELIM}/` and
`{_FINAL}/` holding the `*.bmp` images. All of them are required.
"""


@dataclasses.dataclass(frozen=True)
class UidName:
    """What a C-NMC ``UID_...`` file name says about its cell."""

    patient_id: str  # "<P>" for an ALL subject, "H<S>" for a healthy one
    slide_id: str  # "<patient_id>_<N>": the microscopic image the cell was cut from
    label: str  # "all" or "hem"


def parse_uid_name(name: str) -> UidName:
    """Parses a C-NMC cell file name.

    ALL subject ``57`` and healthy subject ``H57`` are different people, so the
    ``H`` stays part of the patient id.

    Args:
      name: a base name such as ``UID_H49_35_1_hem.bmp`` (case-insensitive).

    Returns:
      The cell's patient id, slide id and label.

    Raises:
      ValueError: the name does not follow the grammar, or its ``H`` prefix
        and class suffix disagree.
    """
    match = _UID_RE.match(name)
    if match is None:
        raise ValueError(
            f"file name {name!r} does not match the C-NMC grammar "
            "UID_<P>_<N>_<C>_all.bmp / UID_H<S>_<N>_<C>_hem.bmp"
        )
    healthy, subject, image_number, _, label = match.groups()
    label = label.lower()
    if bool(healthy) != (label == "hem"):
        raise ValueError(
            f"file name {name!r}: the 'H' (healthy subject) prefix and the '_{label}' "
            "suffix disagree"
        )
    patient_id = f"H{int(subject)}" if healthy else str(int(subject))
    return UidName(patient_id, f"{patient_id}_{int(image_number)}", label)


def _find_one(manual_dir: Path, predicate: Callable[[Path], bool], dataset: str, what: str) -> Path:
    """The single directory under ``manual_dir`` for which ``predicate`` holds."""
    return common.find_single_anchor_dir(manual_dir, predicate, dataset, what, _INSTRUCTIONS)


def _has_bmp(directory: Path) -> bool:
    return any(p.suffix.lower() == ".bmp" and p.is_file() for p in directory.iterdir())


def _locate(manual_dir: Path, dataset: str) -> dict[str, Path]:
    """Finds the folds' parent, the prelim folder and CSV, and the final folder."""
    fold_0 = _find_one(
        manual_dir,
        lambda d: d.name == _FOLDS[0] and {"all", "hem"} <= common.subdir_names(d),
        dataset,
        "'fold_0/' folder with 'all/' and 'hem/' inside",
    )
    train_root = fold_0.parent
    for fold in _FOLDS:
        for name in _NAMES:
            if not (train_root / fold / name).is_dir():
                raise common.ManualDirError(
                    f"{dataset}: {train_root / fold / name} is missing: the training data "
                    f"needs {', '.join(_FOLDS)}, each with 'all/' and 'hem/'. "
                    f"{_INSTRUCTIONS.strip()}"
                )
    # The CSV sits inside the prelim folder (TCIA) or next to it (Kaggle).
    csv_dir = _find_one(
        manual_dir, lambda d: (d / _LABELS_CSV).is_file(), dataset, f"file '{_LABELS_CSV}'"
    )
    # `_has_bmp` skips the outer folder of a double-nested copy (`X/X/*.bmp`).
    prelim = _find_one(
        manual_dir,
        lambda d: d.name == _PRELIM and _has_bmp(d),
        dataset,
        f"'{_PRELIM}/' folder holding *.bmp images",
    )
    final = _find_one(
        manual_dir,
        lambda d: d.name == _FINAL and _has_bmp(d),
        dataset,
        f"'{_FINAL}/' folder holding *.bmp images (the unlabelled final-phase test set)",
    )
    return {"train": train_root, "csv": csv_dir / _LABELS_CSV, "prelim": prelim, "final": final}


def _fold_record(path: Path, fold: int, label: str) -> common.Record:
    try:
        uid = parse_uid_name(path.name)
    except ValueError as e:
        raise images.BadImageError(path, str(e)) from e
    if uid.label != label:
        raise images.BadImageError(
            path, f"a '{uid.label}' cell by its name, but it lies in the '{label}/' folder"
        )
    return common.Record(
        path=path,
        label=label,
        file_name=f"{_FOLDS[fold]}/{label}/{path.name}",
        patient_id=uid.patient_id,
        slide_id=uid.slide_id,
        extra={"fold": fold, "original_name": path.name},
    )


def _csv_record(
    csv_path: Path, line: int, row: Mapping[str, str], prelim: Path, on_disk: Mapping[str, Path]
) -> common.Record:
    where = f"{csv_path}:{line}"
    new_name = (row["new_names"] or "").strip()
    original = (row["Patient_ID"] or "").strip()
    path = on_disk.get(new_name)
    if path is None:
        raise images.BadImageError(where, f"lists {new_name!r}, which is not in {prelim}")
    try:
        uid = parse_uid_name(original)
    except ValueError as e:
        raise images.BadImageError(where, f"Patient_ID: {e}") from e
    label = _CSV_LABELS.get((row["labels"] or "").strip())
    if label is None:
        raise images.BadImageError(where, f"labels is {row['labels']!r}; expected 1 (ALL) or 0")
    if label != uid.label:
        raise images.BadImageError(
            where, f"labels says '{label}' but Patient_ID {original!r} says '{uid.label}'"
        )
    return common.Record(
        path=path,
        label=label,
        file_name=f"{_PRELIM}/{new_name}",
        patient_id=uid.patient_id,
        slide_id=uid.slide_id,
        extra={"fold": NO_FOLD, "original_name": original},
    )


def _raise(error: images.BadImageError) -> common.Record:
    raise error


def _prelim_makers(csv_path: Path, prelim: Path) -> list[Callable[[], common.Record]]:
    """One record maker per CSV row, plus a failing one per unlisted or repeated image."""
    on_disk = {p.name: p for p in common.list_images(prelim)}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{csv_path}: missing column(s) {missing}; found {reader.fieldnames}, "
                f"expected the header {','.join(_CSV_COLUMNS)}"
            )
        rows = list(reader)
    makers: list[Callable[[], common.Record]] = []
    listed: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        new_name = (row["new_names"] or "").strip()
        if new_name in listed:
            makers.append(
                functools.partial(
                    _raise,
                    images.BadImageError(
                        f"{csv_path}:{line}",
                        f"{new_name!r} is listed again (line {listed[new_name]})",
                    ),
                )
            )
            continue
        listed[new_name] = line
        makers.append(functools.partial(_csv_record, csv_path, line, row, prelim, on_disk))
    for name, path in on_disk.items():
        if name not in listed:
            makers.append(
                functools.partial(
                    _raise, images.BadImageError(path, f"has no row in {csv_path}, so no label")
                )
            )
    return makers


def collect_records(
    manual_dir: Path, dataset: str = "c_nmc_2019", skip_bad_files: bool = False
) -> dict[str, list[common.Record]]:
    """The official splits' records, found under ``manual_dir``.

    Args:
      manual_dir: the folder holding the user's download (any wrapper folders).
      dataset: name used in messages.
      skip_bad_files: skip (and report) misnamed files and unusable CSV rows
        instead of failing with the list of them.

    Returns:
      ``{"train": ..., "validation": ..., "test": ...}``: the three folds, the
      labelled preliminary-phase set and the unlabelled final-phase set.

    Raises:
      common.ManualDirError: a required folder or file is missing.
      ValueError: misnamed files or bad CSV rows (all listed), unless skipped.
    """
    where = _locate(Path(manual_dir), dataset)
    makers: list[Callable[[], common.Record]] = [
        functools.partial(_fold_record, path, fold, label)
        for fold, fold_name in enumerate(_FOLDS)
        for label in _NAMES
        for path in common.list_images(where["train"] / fold_name / label)
    ]
    makers += _prelim_makers(where["csv"], where["prelim"])
    collector = images.BadFileCollector(dataset, skip_bad_files, logger=logging.warning)
    by_split: dict[str, list[common.Record]] = {"train": [], "validation": [], "test": []}
    for _, record in collector.map(lambda make: make(), makers):
        split = "train" if record.extra["fold"] != NO_FOLD else "validation"
        by_split[split].append(record)
    # The final phase was released without labels or subject ids.
    by_split["test"] = [
        common.Record(
            path=path,
            label=-1,
            file_name=f"{_FINAL}/{path.name}",
            extra={"fold": NO_FOLD, "original_name": ""},
        )
        for path in common.list_images(where["final"])
    ]
    _warn_on_leaks(by_split, dataset)
    return by_split


def patient_leaks(by_split: Mapping[str, Sequence[common.Record]]) -> dict[str, set[str]]:
    """Patients found in more than one split or training fold: ``{patient: {places}}``."""
    places: dict[str, set[str]] = defaultdict(set)
    for split, records in by_split.items():
        for r in records:
            if r.patient_id:
                fold = r.extra.get("fold", NO_FOLD)
                places[r.patient_id].add(f"{split}/fold_{fold}" if fold != NO_FOLD else split)
    return {p: s for p, s in places.items() if len(s) > 1}


def _warn_on_leaks(by_split: Mapping[str, Sequence[common.Record]], dataset: str) -> None:
    # The splits are the official ones and are kept as published; a leak is
    # reported, not repaired.
    leaks = patient_leaks(by_split)
    if leaks:
        logging.warning(
            "%s: %d patient(s) appear in more than one split or fold: %s",
            dataset,
            len(leaks),
            dict(sorted(leaks.items())[:10]),
        )


class Builder(common.CellImageBuilder):
    """Segmented single cells: B-ALL blasts ("all") and normal B-lymphoid cells ("hem")."""

    LABEL_NAMES = _NAMES
    HOMEPAGE = _HOMEPAGE
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {
            "fold": tfds.features.Scalar(
                dtype=np.int32,
                doc="Official training fold 0-2; -1 outside the train split.",
            ),
            "original_name": tfds.features.Text(
                doc="The cell's UID_... file name; '' in the test split (not released)."
            ),
        }

    def _split_records(self, manual_dir: Path) -> dict[str, list[common.Record]]:
        # The official splits, as published.
        return collect_records(manual_dir, self.name, self._skip_bad_files)
