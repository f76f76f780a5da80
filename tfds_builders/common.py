"""What every leukemia_tf TFDS builder shares.

Features (the same for every builder, so sets can be mixed):
``image`` (encoded as stored, native size, 8-bit RGB after decoding),
``label`` (the set's native ``ClassLabel``), ``patient_id`` and ``slide_id``
(empty string when unknown), ``source`` (the data set name) and
``file_name`` (path relative to the data set's anchor folder).

Builders find their folders by *anchors* below ``manual_dir`` (users unpack
archives with and without wrapper folders), split deterministically without
letting a patient or slide cross splits, and report bad image files by path
(see :class:`leukemia_tf.data.images.BadFileCollector`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from leukemia_tf.data import images, splits

#: Seed of every builder's split assignment. Part of the data set's identity:
#: changing it changes the splits, so it is fixed and versioned with the builder.
SPLIT_SEED = 20261125


@dataclasses.dataclass(frozen=True)
class Record:
    """One image to emit: where it is and what is known about it."""

    path: Path
    label: str | int  # native label name, or -1 for unlabelled
    file_name: str  # relative to the anchor; also the example key
    patient_id: str = ""
    slide_id: str = ""
    extra: Mapping[str, object] = dataclasses.field(default_factory=dict)


def cell_features(
    label_names: Sequence[str], extra: Mapping[str, tfds.features.FeatureConnector] | None = None
) -> tfds.features.FeaturesDict:
    """The common feature dict (plus builder-specific ``extra`` features)."""
    features = {
        "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=list(label_names)),
        "patient_id": tfds.features.Text(),
        "slide_id": tfds.features.Text(),
        "source": tfds.features.Text(),
        "file_name": tfds.features.Text(),
    }
    features.update(extra or {})
    return tfds.features.FeaturesDict(features)


class ManualDirError(FileNotFoundError):
    """``manual_dir`` is missing or does not hold the expected folders."""


def require_manual_dir(
    manual_dir: os.PathLike | str | None, dataset: str, instructions: str
) -> Path:
    """Returns ``manual_dir`` as a Path, or raises a message saying what to put there."""
    if manual_dir is None or not Path(manual_dir).is_dir():
        raise ManualDirError(
            f"{dataset}: manual_dir {str(manual_dir)!r} does not exist. {instructions.strip()}"
        )
    return Path(manual_dir)


def walk_dirs(root: Path) -> Iterator[Path]:
    """Every directory under ``root`` (inclusive), sorted, skipping hidden and ``__MACOSX``."""
    yield root
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for d in dirnames:
            yield Path(dirpath) / d


def find_anchor_dirs(
    manual_dir: Path,
    predicate: Callable[[Path], bool],
    dataset: str,
    what: str,
    instructions: str,
) -> list[Path]:
    """All directories under ``manual_dir`` for which ``predicate`` holds.

    Raises:
      ManualDirError: none found; the message says what was looked for.
    """
    found = [d for d in walk_dirs(manual_dir) if predicate(d)]
    if not found:
        raise ManualDirError(
            f"{dataset}: found no {what} under manual_dir {str(manual_dir)!r}. "
            f"{instructions.strip()}"
        )
    return found


def find_single_anchor_dir(
    manual_dir: Path,
    predicate: Callable[[Path], bool],
    dataset: str,
    what: str,
    instructions: str,
) -> Path:
    """The one directory under ``manual_dir`` for which ``predicate`` holds.

    Raises:
      ManualDirError: none found, or several (two copies of the data set).
    """
    found = find_anchor_dirs(manual_dir, predicate, dataset, what, instructions)
    if len(found) > 1:
        raise ManualDirError(
            f"{dataset}: found {len(found)} copies of the {what} under {manual_dir}: "
            f"{[str(d) for d in found]}; keep one copy of the data set there."
        )
    return found[0]


def subdir_names(directory: Path) -> set[str]:
    try:
        return {p.name for p in directory.iterdir() if p.is_dir()}
    except OSError:
        return set()


def list_images(directory: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``directory`` (sorted; hidden and ``._*`` files skipped)."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in directory.glob(pattern) if p.is_file() and images.is_image_file(p))


def assign_splits(
    records: Sequence[Record],
    fractions: Mapping[str, float] = splits.DEFAULT_FRACTIONS,
    seed: int = SPLIT_SEED,
    group_fn: Callable[[Record], str] | None = None,
) -> dict[str, list[Record]]:
    """Stratified, deterministic split; a patient or slide never crosses splits.

    Args:
      records: the examples.
      fractions: split -> fraction.
      seed: split seed.
      group_fn: the group of a record; default: ``patient_id``, else
        ``slide_id``, else the record alone.
    """
    if group_fn is None:

        def group_fn(r: Record) -> str:
            return (
                f"patient:{r.patient_id}"
                if r.patient_id
                else (f"slide:{r.slide_id}" if r.slide_id else "")
            )

    keys = [r.file_name for r in records]
    assignment = splits.grouped_stratified_split(
        keys,
        [str(r.label) for r in records],
        [group_fn(r) for r in records],
        fractions=fractions,
        seed=seed,
    )
    out: dict[str, list[Record]] = {name: [] for name in fractions}
    for r in records:
        out[assignment[r.file_name]].append(r)
    return out


def split_generators(
    by_split: Mapping[str, Sequence[Record]],
    generate: Callable[..., Iterator[tuple[str, dict]]],
    dataset: str,
    skip_bad_files: bool = False,
) -> dict[str, Iterator[tuple[str, dict]]]:
    """The ``_split_generators`` result: one generator per split, sharing one bad-file report.

    TFDS runs the split generators one after the other, in this order, so the
    last one raises (or logs) the list of bad files of *every* split: a build
    with bad files in several splits names all of them, not only the first
    split's.

    Args:
      by_split: split name -> records.
      generate: the builder's ``_generate_examples``; called as
        ``generate(records, collector=..., finish=...)``.
      dataset: name used in messages.
      skip_bad_files: skip bad files instead of failing.
    """
    collector = images.BadFileCollector(dataset, skip_bad_files, logger=logging.warning)
    last = list(by_split)[-1] if by_split else None
    return {
        name: generate(records, collector=collector, finish=name == last)
        for name, records in by_split.items()
    }


def generate_examples(
    records: Iterable[Record],
    dataset: str,
    skip_bad_files: bool = False,
    collector: images.BadFileCollector | None = None,
    finish: bool = True,
) -> Iterator[tuple[str, dict]]:
    """Yields ``(key, example)`` for TFDS; bad files fail the build (all named) or are skipped.

    Every record's image is fully decoded once here (see
    :func:`leukemia_tf.data.images.read_image`).

    Args:
      records: the split's records.
      dataset: name used in messages.
      skip_bad_files: skip bad files instead of failing (when no collector is given).
      collector: a report shared by several splits (see :func:`split_generators`).
      finish: raise / log the report after this split.
    """
    if collector is None:
        collector = images.BadFileCollector(dataset, skip_bad_files, logger=logging.warning)

    def encode(record: Record) -> bytes:
        encoded, _ = images.read_image(record.path)
        return encoded

    for record, encoded in collector.map(encode, records, finish=finish):
        example = {
            "image": encoded,
            "label": record.label,
            "patient_id": record.patient_id,
            "slide_id": record.slide_id,
            "source": dataset,
            "file_name": record.file_name,
        }
        example.update(record.extra)
        yield record.file_name, example
