"""ALL-IDB: the acute lymphoblastic leukemia image database (Labati, Piuri, Scotti 2011)."""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from leukemia_tf.data import images, splits
from tfds_builders import common

_NAMES = ("0", "1")
_HOMEPAGE = "https://homes.di.unimi.it/scotti/all/"
#: ``ImXXX_Y``: image number XXX, Y = 1 (ALL patient / blasts present) or 0.
_STEM_RE = re.compile(r"^Im(\d+)_([01])$", re.IGNORECASE)

#: Images that show the same cells, from an on-disk analysis of ALL-IDB
#: (see LAYOUTS.md): overlapping re-shot fields of one smear and one
#: pixel-identical copy. Keyed by image number; each group stays in one split.
IDB1_GROUPS: Mapping[str, tuple[int, ...]] = {
    "idb1_overlap_1": (9, 10, 11),
    "idb1_overlap_2": (13, 14, 15),
    "idb1_overlap_3": (18, 19),
    "idb1_overlap_4": (20, 21, 22),
    "idb1_overlap_5": (36, 102, 103),
    "idb1_overlap_6": (38, 39, 44),
    "idb1_overlap_7": (78, 89),
    "idb1_overlap_8": (94, 95),
    "idb1_duplicate_1": (93, 108),  # Im108_0 is a pixel-identical copy of Im093_0
}
#: Five normal ALL-IDB2 crops repeat a cell of Im222-Im227 in Im256-Im260. The
#: pairing itself is not published, so all eleven form one group.
IDB2_GROUPS: Mapping[str, tuple[int, ...]] = {
    "idb2_repeat_1": (*range(222, 228), *range(256, 261)),
}

_CONFIG_LAYOUT = {
    # config -> (anchor folder, image subfolder, groups)
    "idb1": ("ALL_IDB1", "im", IDB1_GROUPS),
    "idb2": ("ALL_IDB2", "img", IDB2_GROUPS),
}

_INSTRUCTIONS = f"""
Request ALL-IDB from its authors through the form at {_HOMEPAGE}#download
(research use; the data set may not be redistributed) and unpack it into
`manual_dir`. The builder looks, at any depth below `manual_dir`, for
`ALL_IDB1/` (or `ALL-IDB1/`) holding `im/ImNNN_Y.jpg` and `xyc/ImNNN_Y.xyc`
(config `idb1`), and for `ALL_IDB2/` (or `ALL-IDB2/`) holding `img/ImNNN_Y.tif`
(config `idb2`).
"""


def group_id(config: str, number: int) -> str:
    """The split group of image ``ImNNN`` of ``config``: a known group, else the image itself.

    Args:
      config: ``"idb1"`` or ``"idb2"``.
      number: the image number NNN.

    Returns:
      e.g. ``"idb1_overlap_3"`` or ``"idb1_Im001"``.
    """
    for group, members in _CONFIG_LAYOUT[config][2].items():
        if number in members:
            return group
    return f"{config}_Im{number:03d}"


def parse_xyc(path: Path) -> np.ndarray:
    """Reads an ALL-IDB1 blast-centroid file.

    One centroid per line, ``x<TAB>y`` (column, row) in integer pixels; any
    whitespace separates, blank lines are skipped.

    Args:
      path: the ``.xyc`` file.

    Returns:
      ``int32`` array of shape ``[num_blasts, 2]`` (``[0, 2]`` for an empty file).

    Raises:
      images.BadImageError: unreadable file or a line that is not two integers;
        names the file and line.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise images.BadImageError(path, f"cannot read the centroid file ({e})") from e
    centers = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            values = []
        if len(values) != 2 or not all(v.is_integer() for v in values):
            raise images.BadImageError(
                f"{path}:{line_number}", f"expected two integers 'x y', got {line.strip()!r}"
            )
        centers.append([int(v) for v in values])
    return np.asarray(centers, dtype=np.int32).reshape(-1, 2)


def _anchor_name(directory: Path) -> str:
    return directory.name.upper().replace("-", "_")


def _locate(manual_dir: Path, config: str, dataset: str) -> Path:
    folder, subfolder, _ = _CONFIG_LAYOUT[config]
    what = f"'{folder}/' (or '{folder.replace('_', '-')}/') folder with '{subfolder}/' inside"
    anchors = common.find_anchor_dirs(
        manual_dir,
        lambda d: _anchor_name(d) == folder and subfolder in common.subdir_names(d),
        dataset,
        what,
        _INSTRUCTIONS,
    )
    if len(anchors) > 1:
        raise common.ManualDirError(
            f"{dataset}: several {what} under {manual_dir}: {[str(a) for a in anchors]}; "
            "keep one copy of the data set there."
        )
    return anchors[0]


def _record(config: str, path: Path, xyc_files: Mapping[str, Path]) -> common.Record:
    subfolder = _CONFIG_LAYOUT[config][1]
    match = _STEM_RE.match(path.stem)
    if match is None:
        raise images.BadImageError(
            path, f"file name does not match ImNNN_Y.<ext> (Y = 0 or 1) of ALL-IDB {config}"
        )
    number, label = int(match.group(1)), match.group(2)
    extra = {}
    if config == "idb1":
        xyc = xyc_files.get(path.stem.lower())
        centers = parse_xyc(xyc) if xyc is not None else np.zeros((0, 2), np.int32)
        if label == "0" and len(centers):
            # Healthy fields have no blasts; a centroid there contradicts the label.
            logging.warning("%s: ignoring %d centroid(s) of a '_0' image", xyc, len(centers))
            centers = np.zeros((0, 2), np.int32)
        extra["blast_centers"] = centers
    return common.Record(
        path=path,
        label=label,
        file_name=f"{subfolder}/{path.name}",
        slide_id=group_id(config, number),
        extra=extra,
    )


def collect_records(
    manual_dir: Path, config: str, dataset: str = "all_idb", skip_bad_files: bool = False
) -> list[common.Record]:
    """Every image of ``config`` found under ``manual_dir``.

    Args:
      manual_dir: the folder holding the user's download (any wrapper folders).
      config: ``"idb1"`` (full fields with blast centroids) or ``"idb2"`` (crops).
      dataset: name used in messages.
      skip_bad_files: skip (and report) misnamed images and unreadable centroid
        files instead of failing with the list of them.

    Returns:
      The records, with the split group in ``slide_id``; ``patient_id`` is empty.

    Raises:
      common.ManualDirError: the config's folder is missing.
      ValueError: bad names or centroid files (all listed) unless skipped, or
        two files for one image number.
    """
    root = _locate(Path(manual_dir), config, dataset)
    paths = common.list_images(root / _CONFIG_LAYOUT[config][1])
    # Repacks sometimes convert part of the set (e.g. some .tif to .jpg): one
    # image number must not arrive twice.
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in paths:
        match = _STEM_RE.match(p.stem)
        by_stem[str(int(match.group(1))) if match else p.stem.lower()].append(p)
    repeated = [[str(p) for p in ps] for ps in by_stem.values() if len(ps) > 1]
    if repeated:
        raise ValueError(
            f"{dataset}/{config}: several files for one image number; keep one of each: {repeated}"
        )
    xyc_dir = root / "xyc"
    xyc_files = (
        {p.stem.lower(): p for p in xyc_dir.iterdir() if p.suffix.lower() == ".xyc"}
        if config == "idb1" and xyc_dir.is_dir()
        else {}
    )
    collector = images.BadFileCollector(
        f"{dataset}/{config}", skip_bad_files, logger=logging.warning
    )
    make = functools.partial(_record, config, xyc_files=xyc_files)
    records = [record for _, record in collector.map(make, paths)]
    if config == "idb1":
        without = [
            r.file_name for r in records if r.label == "1" and not len(r.extra["blast_centers"])
        ]
        if without:
            logging.info("%s/idb1: %d '_1' image(s) without blast centroids", dataset, len(without))
    return records


def check_groups_in_one_split(by_split: Mapping[str, Sequence[common.Record]]) -> None:
    """Raises ``ValueError`` if the images of one group are in several splits."""
    split_of = {r.file_name: split for split, records in by_split.items() for r in records}
    group_of = {r.file_name: r.slide_id for records in by_split.values() for r in records}
    splits.check_no_group_leak(split_of, group_of)


class Builder(common.CellImageBuilder):
    """Blood-smear fields and single-cell crops of ALL patients and healthy subjects."""

    LABEL_NAMES = _NAMES
    HOMEPAGE = _HOMEPAGE
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name="idb1",
            description="ALL_IDB1: 108 full fields of view, with the blasts' centroids.",
        ),
        tfds.core.BuilderConfig(
            name="idb2",
            description="ALL_IDB2: 260 257x257 crops labelled by their centre cell.",
        ),
    ]

    def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        if self.builder_config.name != "idb1":
            return {}
        return {
            "blast_centers": tfds.features.Tensor(
                shape=(None, 2),
                dtype=np.int32,
                doc="(x, y) = (column, row) of each blast centroid, as in the .xyc file; "
                "empty for '_0' fields and fields without a centroid file.",
            )
        }

    def _split_records(self, manual_dir: Path) -> dict[str, list[common.Record]]:
        records = collect_records(
            manual_dir, self.builder_config.name, self.name, self._skip_bad_files
        )
        # No official splits and no patient ids: the group in `slide_id` keeps
        # overlapping fields and repeated cells together.
        by_split = common.assign_splits(records)
        check_groups_in_one_split(by_split)
        return by_split
