"""leukemia_folder's metadata: the label map, the metadata CSV and the folder scan.

Reads and validates what a user puts in ``manual_dir`` (see README.md next to
this file): the class folders, the optional ``metadata.csv`` (labels, patient
and slide ids, splits) and ``label_map.yaml`` (native label -> taxonomy node).
Every inconsistency raises :class:`MetadataError` naming the file, and the
rows or paths at fault.
"""

from __future__ import annotations

import csv
import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import tensorflow_datasets as tfds
import yaml
from absl import logging

from leukemia_tf import taxonomy as taxonomy_lib
from leukemia_tf.data import images, splits
from tfds_builders import common

METADATA_CSV = "metadata.csv"
LABEL_MAP = "label_map.yaml"
CSV_COLUMNS = ("path", "label", "patient_id", "slide_id", "split")
#: Metadata keys this builder writes into ``info.metadata``.
METADATA_LABEL_MAP = "label_map"
METADATA_SPLIT_SOURCE = "split_source"

#: How many offending paths or rows an error message lists before "... and N more".
_LIST_LIMIT = 20

#: What to put in ``manual_dir`` (the builder's ``MANUAL_DOWNLOAD_INSTRUCTIONS``).
INSTRUCTIONS = f"""
Put your images in `manual_dir`, one folder per class, with a `{LABEL_MAP}` mapping
each class (native label) to a node of the leukemia_tf taxonomy (configs/taxonomy.yaml),
e.g. `AML: AML`, `healthy: normal`, `artefact: null`. The class folders may sit directly
in `manual_dir` or in a single folder inside it. Optionally add `{METADATA_CSV}` with the
columns `path,label,patient_id,slide_id` (and `split`), `path` relative to the folder that
holds the CSV: it then lists every image and is authoritative for its label and ids.
See tfds_builders/leukemia_folder/README.md.
"""


class MetadataError(ValueError):
    """``metadata.csv`` or ``label_map.yaml`` is inconsistent with the files or the taxonomy."""


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = len(items) - _LIST_LIMIT
    return shown + (f" ... and {more} more" if more > 0 else "")


# ------------------------------------------------------------------ scanning
@dataclasses.dataclass
class Scan:
    """What the scan found under ``manual_dir``.

    Attributes:
      root: the folder holding the class folders (``manual_dir`` or its wrapper).
      records: one per image, ``label`` the native class name.
      official_split: ``file_name -> split`` from the CSV's ``split`` column, else None.
      csv_path: the metadata CSV, if there is one.
    """

    root: Path
    records: list[common.Record]
    official_split: dict[str, str] | None = None
    csv_path: Path | None = None


def _visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name != "__MACOSX"


def find_root(manual_dir: Path) -> Path:
    """``manual_dir``, or the single folder inside it when that is all there is.

    A wrapper folder is descended into only when ``manual_dir`` holds nothing
    but that folder, and the folder does not itself hold images (then it is
    a class folder).

    Args:
      manual_dir: the user's folder.

    Returns:
      The folder that holds the class folders (and the CSV / label map).
    """
    entries = [p for p in sorted(manual_dir.iterdir()) if _visible(p)]
    if len(entries) == 1 and entries[0].is_dir():
        inner = entries[0]
        has_images = any(images.is_image_file(p) and p.is_file() for p in inner.iterdir())
        if not has_images:
            return inner
    return manual_dir


def _normalise_csv_path(raw: str) -> str | None:
    """A CSV ``path`` as a clean relative POSIX path, or None if it escapes the root."""
    text = raw.strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    path = PurePosixPath(text)
    if not text or path.is_absolute() or ".." in path.parts:
        return None
    return str(path)


def _class_folder_of(file_name: str) -> str:
    """The class folder a file sits in (its first path component), or "" at the root."""
    parts = PurePosixPath(file_name).parts
    return parts[0] if len(parts) > 1 else ""


def _images_under(root: Path) -> dict[str, Path]:
    """Every visible image file below ``root``: ``relative posix path -> path``."""
    out = {}
    for directory in common.walk_dirs(root):
        for p in common.list_images(directory):
            out[p.relative_to(root).as_posix()] = p
    return out


def _scan_folders(root: Path, dataset: str) -> list[common.Record]:
    loose = [p.name for p in common.list_images(root)]
    if loose:
        raise MetadataError(
            f"{dataset}: {len(loose)} image(s) directly in {root} ({_listing(loose)}) have no "
            f"class folder. Move them into one folder per class, or list them in a "
            f"{METADATA_CSV} with their labels."
        )
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p)):
        found = common.list_images(folder, recursive=True)
        found = [
            p for p in found if all(_visible(Path(part)) for part in p.relative_to(root).parts)
        ]
        if not found:
            logging.warning("%s: folder %s holds no images; ignored.", dataset, folder)
            continue
        records.extend(
            common.Record(path=p, label=folder.name, file_name=p.relative_to(root).as_posix())
            for p in found
        )
    if not records:
        raise common.ManualDirError(
            f"{dataset}: found no class folders with images under {root}. {INSTRUCTIONS.strip()}"
        )
    return records


def _read_csv(csv_path: Path, root: Path, dataset: str) -> Scan:
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = list(reader)
    if "path" not in columns:
        raise MetadataError(
            f"{csv_path}: needs a 'path' column (columns found: {columns}); expected "
            f"{', '.join(CSV_COLUMNS)} (label, patient_id, slide_id and split are optional)."
        )
    unknown = [c for c in columns if c not in CSV_COLUMNS]
    if unknown:
        logging.info("%s: ignoring columns %s of %s", dataset, unknown, csv_path)

    def cell(row: Mapping[str, str | None], column: str) -> str:
        for key, value in row.items():
            if key is not None and key.strip() == column:
                return (value or "").strip()
        return ""

    on_disk = _images_under(root)
    class_folders = _folder_names(root)
    records, bad_paths, duplicates, no_label, missing = [], [], [], [], []
    seen: set[str] = set()
    disagree: list[str] = []
    official: dict[str, str] = {}
    bad_split: list[str] = []
    has_split = "split" in columns
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        raw = cell(row, "path")
        file_name = _normalise_csv_path(raw)
        if file_name is None:
            bad_paths.append(f"line {line}: {raw!r}")
            continue
        if file_name in seen:
            duplicates.append(f"line {line}: {file_name}")
            continue
        seen.add(file_name)
        path = root / file_name
        if not path.is_file():
            missing.append(file_name)
            continue
        folder = _class_folder_of(file_name)
        label = cell(row, "label") or folder
        if not label:
            no_label.append(f"line {line}: {file_name}")
            continue
        if folder and folder != label and folder in class_folders:
            disagree.append(f"{file_name} (CSV: {label})")
        if has_split:
            split = cell(row, "split")
            if split not in splits.SPLITS:
                bad_split.append(f"line {line}: {split!r}")
            official[file_name] = split
        records.append(
            common.Record(
                path=path,
                label=label,
                file_name=file_name,
                patient_id=cell(row, "patient_id"),
                slide_id=cell(row, "slide_id"),
            )
        )
    not_listed = sorted(set(on_disk) - seen)
    problems = []
    if bad_paths:
        problems.append(
            f"{len(bad_paths)} path(s) are absolute or leave the folder: {_listing(bad_paths)}"
        )
    if duplicates:
        problems.append(f"{len(duplicates)} path(s) are listed twice: {_listing(duplicates)}")
    if missing:
        problems.append(
            f"{len(missing)} row(s) name a file that does not exist under {root}: "
            f"{_listing(missing)}"
        )
    if not_listed:
        problems.append(
            f"{len(not_listed)} image file(s) under {root} are not listed in the CSV: "
            f"{_listing(not_listed)}"
        )
    if no_label:
        problems.append(
            f"{len(no_label)} row(s) have no label and are not in a class folder: "
            f"{_listing(no_label)}"
        )
    if bad_split:
        problems.append(
            f"{len(bad_split)} row(s) have a split other than {', '.join(splits.SPLITS)}: "
            f"{_listing(bad_split)}"
        )
    if problems:
        raise MetadataError(
            f"{dataset}: {csv_path} does not match the files (the CSV must list every image "
            "exactly once):\n  - " + "\n  - ".join(problems)
        )
    if not records:
        raise MetadataError(f"{dataset}: {csv_path} lists no images.")
    if disagree:
        logging.warning(
            "%s: %d file(s) sit in a class folder other than their CSV label; the CSV wins: %s",
            dataset,
            len(disagree),
            _listing(disagree),
        )
    return Scan(
        root=root,
        records=records,
        official_split=official if has_split else None,
        csv_path=csv_path,
    )


def _folder_names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir() and _visible(p)}


def scan(manual_dir: Path, dataset: str = "leukemia_folder") -> Scan:
    """Finds the images, their labels and ids under ``manual_dir``.

    Args:
      manual_dir: the user's folder.
      dataset: name used in messages.

    Returns:
      The scan.

    Raises:
      ManualDirError: no images found.
      MetadataError: the CSV and the files disagree, or images have no label.
    """
    root = find_root(manual_dir)
    csv_path = root / METADATA_CSV
    if csv_path.is_file():
        result = _read_csv(csv_path, root, dataset)
    else:
        result = Scan(root=root, records=_scan_folders(root, dataset))
    _check_groups(result, dataset)
    return result


# ------------------------------------------------------------------ grouping
def slide_owners(records: Sequence[common.Record], where: str) -> dict[str, str]:
    """``slide_id -> patient_id`` for slides with a known patient; a slide has one patient."""
    owners: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.slide_id and r.patient_id:
            owners[r.slide_id].add(r.patient_id)
    shared = {s: sorted(p) for s, p in owners.items() if len(p) > 1}
    if shared:
        listed = [f"{s} (patients {', '.join(p)})" for s, p in sorted(shared.items())]
        raise MetadataError(
            f"{where}: slide_id must be unique across patients, but {len(shared)} slide id(s) "
            f"belong to several patients: {_listing(listed)}. Make slide ids unique "
            "(e.g. '<patient>-<slide>')."
        )
    return {s: next(iter(p)) for s, p in owners.items()}


def group_key(record: common.Record, slide_owner: Mapping[str, str]) -> str:
    """The split group: the patient, else the slide's patient, else the slide, else none."""
    patient = record.patient_id or slide_owner.get(record.slide_id, "")
    if patient:
        return f"patient:{patient}"
    return f"slide:{record.slide_id}" if record.slide_id else ""


def _check_groups(result: Scan, dataset: str) -> None:
    where = f"{dataset}: {result.csv_path or result.root}"
    owner = slide_owners(result.records, where)
    if result.official_split is None:
        return
    split_of_group: dict[str, set[str]] = defaultdict(set)
    for r in result.records:
        key = group_key(r, owner)
        if key:
            split_of_group[key].add(result.official_split[r.file_name])
    leaks = sorted(f"{g} in {sorted(s)}" for g, s in split_of_group.items() if len(s) > 1)
    if leaks:
        raise MetadataError(
            f"{where}: the 'split' column puts {len(leaks)} patient(s)/slide(s) in more than "
            f"one split: {_listing(leaks)}. Keep each patient and slide in one split."
        )


def assign(result: Scan) -> dict[str, list[common.Record]]:
    """The CSV's own splits, else grouped (patient, else slide, else image) stratified splits."""
    if result.official_split is not None:
        out: dict[str, list[common.Record]] = {s: [] for s in splits.SPLITS}
        for r in result.records:
            out[result.official_split[r.file_name]].append(r)
        return out
    owner = slide_owners(result.records, str(result.root))
    return common.assign_splits(result.records, group_fn=lambda r: group_key(r, owner))


# ----------------------------------------------------------------- label map
def load_label_map(
    root: Path,
    class_names: Sequence[str],
    dataset: str,
    taxonomy: taxonomy_lib.Taxonomy | None = None,
) -> dict[str, str | None]:
    """Reads and validates ``label_map.yaml`` (native label -> taxonomy node or null).

    Without the file, class names that are all taxonomy nodes map to themselves.

    Args:
      root: folder holding ``label_map.yaml``.
      class_names: the data set's native labels; each must be mapped.
      dataset: the name registered in the taxonomy and used in messages.
      taxonomy: default: the bundled ``configs/taxonomy.yaml``. The mapping is
        registered in it under ``dataset``.

    Returns:
      ``{native label: node or None}`` for every class name, in their order.

    Raises:
      MetadataError: the file is missing (and the names are not nodes), not a
        mapping, maps to an unknown node, or leaves a label unmapped.
    """
    taxonomy = taxonomy or taxonomy_lib.Taxonomy.load()
    path = root / LABEL_MAP
    template = "\n".join(f"  {name}: <node or null>" for name in class_names)
    nodes = ", ".join(taxonomy.nodes)
    if not path.is_file():
        if all(name in taxonomy.nodes for name in class_names):
            logging.info(
                "%s: no %s; class names are taxonomy nodes, mapped to themselves.",
                dataset,
                LABEL_MAP,
            )
            return {name: name for name in class_names}
        raise MetadataError(
            f"{dataset}: {path} not found. Write it, mapping each class to a taxonomy node "
            f"({nodes}) or to null to exclude it:\n{template}"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise MetadataError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, Mapping):
        raise MetadataError(
            f"{path}: expected a mapping 'native label: taxonomy node', got "
            f"{type(raw).__name__}. Example:\n{template}"
        )
    mapping = {str(k): (None if v is None else str(v)) for k, v in raw.items()}
    try:
        taxonomy.add_dataset_mapping(dataset, mapping)
        taxonomy.map_labels(dataset, class_names)
    except taxonomy_lib.TaxonomyError as e:
        raise MetadataError(f"{path}: {e}") from e
    extra = sorted(set(mapping) - set(class_names))
    if extra:
        logging.warning("%s: %s maps labels that are not in the data: %s", dataset, path, extra)
    return {name: mapping[name] for name in class_names}


def label_map_from_info(
    info: tfds.core.DatasetInfo, required: bool = True
) -> dict[str, str | None] | None:
    """The native-label -> taxonomy-node map stored with a built leukemia_folder set.

    Use it to map the set into the taxonomy for training::

      builder = tfds.builder("leukemia_folder/my_hospital", data_dir=...)
      taxonomy.add_dataset_mapping("leukemia_folder/my_hospital",
                                   label_map_from_info(builder.info))

    Read the map through this function (or ``info.metadata["label_map"]``), not
    with ``"label_map" in info.metadata`` or ``.get``: for a loaded set TFDS
    reads ``metadata.json`` lazily, on item access only.

    Args:
      info: ``builder.info`` of a built set.
      required: raise if the set has no stored map; else return None.

    Returns:
      ``{native label: node or None}``, or None (``required=False``, no map).

    Raises:
      MetadataError: no map stored and ``required``.
    """
    try:
        mapping = info.metadata[METADATA_LABEL_MAP]
    except (KeyError, TypeError):
        if not required:
            return None
        raise MetadataError(
            f"{info.full_name}: no '{METADATA_LABEL_MAP}' in the data set's metadata; was it "
            "built by tfds_builders/leukemia_folder?"
        ) from None
    return {str(k): (None if v is None else str(v)) for k, v in mapping.items()}
