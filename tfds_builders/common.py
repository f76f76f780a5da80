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

:class:`CellImageBuilder` is the base of every builder here: it carries the
version, the ``skip_bad_files`` argument, the features, the manual-dir check
and the split generation with one bad-file report for all splits, so that a
builder holds only what is specific to its layout.
"""

from __future__ import annotations

import abc
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


def class_folder_records(
    root: Path,
    names: Sequence[str],
    extra: Callable[[Path], Mapping[str, object]] | None = None,
) -> list[Record]:
    """One record per image in ``root/<name>/`` (not recursive), labelled by its folder.

    Args:
      root: the folder holding the class folders.
      names: the class folders, in the order the records should come in.
      extra: a path's builder-specific features, if any.

    Returns:
      The records; ``file_name`` is ``"<name>/<file>"``.
    """
    return [
        Record(
            path=p,
            label=name,
            file_name=f"{name}/{p.name}",
            extra=extra(p) if extra is not None else {},
        )
        for name in names
        for p in list_images(root / name)
    ]


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

    The split that TFDS finishes last raises (or logs) the list of bad files
    of *every* split: a build with bad files in several splits names all of
    them once, not only the first split's. Which split that is does not
    matter (TFDS runs them one after the other today, in this order).

    Args:
      by_split: split name -> records.
      generate: the builder's ``_generate_examples``; called as
        ``generate(records, collector=..., finish=False)``.
      dataset: name used in messages.
      skip_bad_files: skip bad files instead of failing.

    Returns:
      split name -> generator of ``(key, example)``.
    """
    collector = images.BadFileCollector(dataset, skip_bad_files, logger=logging.warning)
    pending = set(by_split)

    def run(name: str, records: Sequence[Record]) -> Iterator[tuple[str, dict]]:
        yield from generate(records, collector=collector, finish=False)
        pending.discard(name)
        if not pending:
            collector.finish()

    return {name: run(name, records) for name, records in by_split.items()}


def read_encoded(record: Record) -> bytes:
    """The image bytes to store for ``record``: its file, fully decoded once to check it.

    Raises:
      images.BadImageError: the file is not a readable image (names the path).
    """
    encoded, _ = images.read_image(record.path)
    return encoded


def generate_examples(
    records: Iterable[Record],
    dataset: str,
    skip_bad_files: bool = False,
    collector: images.BadFileCollector | None = None,
    finish: bool = True,
    encode: Callable[[Record], bytes] = read_encoded,
) -> Iterator[tuple[str, dict]]:
    """Yields ``(key, example)`` for TFDS; bad files fail the build (all named) or are skipped.

    Args:
      records: the split's records.
      dataset: name used in messages and the ``source`` feature.
      skip_bad_files: skip bad files instead of failing (when no collector is given).
      collector: a report shared by several splits (see :func:`split_generators`).
      finish: raise / log the report after this split.
      encode: the image bytes of a record; default :func:`read_encoded` (every
        image is fully decoded once, see
        :func:`leukemia_tf.data.images.read_image`). Raises
        ``images.BadImageError`` for a bad file.

    Yields:
      ``(file_name, example)``.
    """
    if collector is None:
        collector = images.BadFileCollector(dataset, skip_bad_files, logger=logging.warning)

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


class CellImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the leukemia_tf builders (registered with TFDS only through subclasses).

    A builder names its classes (``LABEL_NAMES``), its ``HOMEPAGE`` and its
    ``MANUAL_DOWNLOAD_INSTRUCTIONS``, adds its own features in
    :meth:`_extra_features`, and says which image goes to which split in
    :meth:`_split_records`. This class carries the rest:

    - ``VERSION`` 1.0.0 and its release note;
    - ``skip_bad_files``: skip unreadable images (reported) instead of failing;
    - ``_info``: the common features (:func:`cell_features`), supervised keys
      ``(image, label)``, and the README / CITATIONS.bib next to the builder;
    - the manual-dir check, with the builder's instructions in the message
      (skipped for a builder without ``MANUAL_DOWNLOAD_INSTRUCTIONS``);
    - the split generators, sharing one bad-file report across all splits
      (:func:`split_generators`), and the examples (:func:`generate_examples`,
      with the image bytes from :meth:`_encode`).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    #: Native class names, in label-index order.
    LABEL_NAMES: Sequence[str] = ()
    #: The data set's home page (None: TFDS's catalogue page).
    HOMEPAGE: str | None = None

    def __init__(self, *, skip_bad_files: bool = False, **kwargs):
        """Creates the builder.

        Args:
          skip_bad_files: skip unreadable images (reported by path, once, after
            the last split) instead of failing with the list of them.
          **kwargs: for ``tfds.core.DatasetBuilder`` (``data_dir``, ``config``, ...).
        """
        self._skip_bad_files = skip_bad_files
        super().__init__(**kwargs)

    @property
    def source_name(self) -> str:
        """The ``source`` feature of every example, also the name in bad-file reports."""
        return self.name

    def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        """The builder's features beyond the common ones (default: none)."""
        return {}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=cell_features(self.LABEL_NAMES, extra=self._extra_features()),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
        )

    def _find_single_anchor(
        self, manual_dir: Path, predicate: Callable[[Path], bool], what: str
    ) -> Path:
        """:func:`find_single_anchor_dir` with this builder's name and instructions."""
        return find_single_anchor_dir(
            manual_dir, predicate, self.name, what, self.MANUAL_DOWNLOAD_INSTRUCTIONS
        )

    def _require_images(self, records: Sequence[Record], root: Path) -> None:
        """Raises ``ManualDirError`` when the class folders under ``root`` hold no images."""
        if not records:
            raise ManualDirError(
                f"{self.name}: the class folders under {root} hold no image files. "
                f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}"
            )

    @abc.abstractmethod
    def _split_records(self, manual_dir: Path | None) -> Mapping[str, Sequence[Record]]:
        """The records of each split.

        Args:
          manual_dir: the checked ``manual_dir``; None for a builder without
            ``MANUAL_DOWNLOAD_INSTRUCTIONS`` (nothing to download).

        Returns:
          split name -> records, in the order TFDS should generate them.
        """

    def _encode(self, record: Record) -> bytes:
        """The image bytes to store for ``record`` (default: its file, checked)."""
        return read_encoded(record)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = None
        if self.MANUAL_DOWNLOAD_INSTRUCTIONS:
            manual_dir = require_manual_dir(
                dl_manager.manual_dir, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS
            )
        return split_generators(
            self._split_records(manual_dir),
            self._generate_examples,
            self.source_name,
            self._skip_bad_files,
        )

    def _generate_examples(
        self,
        records: Iterable[Record],
        collector: images.BadFileCollector | None = None,
        finish: bool = True,
    ) -> Iterator[tuple[str, dict]]:
        yield from generate_examples(
            records,
            self.source_name,
            self._skip_bad_files,
            collector=collector,
            finish=finish,
            encode=self._encode,
        )
