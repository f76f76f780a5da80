"""leukemia_synthetic: a SYNTHETIC blood-smear set, generated offline from a seed.

It exists so that a new user can run the whole pipeline (build, train,
evaluate, predict at cell and slide level, export) with no download. The
cells are drawn caricatures (see :mod:`tfds_builders.leukemia_synthetic.cells`);
a model's accuracy on them says nothing about real leukemia images. Never use
this set to claim accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from pathlib import PurePosixPath

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import common
from tfds_builders.leukemia_synthetic import cells

#: Native class names (each a diagnosis; mapped in configs/taxonomy.yaml).
CLASS_NAMES = ("normal", "reactive", "ALL", "AML", "CLL", "CML")


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """What to generate.

    Attributes:
      image_size: height and width of every image, in pixels.
      patients_per_class: patients of each diagnosis (one diagnosis per patient).
      max_slides_per_patient: each patient has 1 to this many slides.
      cells_per_slide: inclusive range of the number of cells on a slide.
      seed: the generator's seed; the same config gives the same bytes.
    """

    image_size: int = 64
    patients_per_class: int = 7
    max_slides_per_patient: int = 2
    cells_per_slide: tuple[int, int] = (24, 40)
    seed: int = 20260101

    def __post_init__(self):
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"{self.name}: image_size must be in [16, 512], got {self.image_size}")
        if self.patients_per_class < 3:
            # Fewer patients than splits would leave a class out of a split.
            raise ValueError(
                f"{self.name}: patients_per_class must be >= 3 (one per split), "
                f"got {self.patients_per_class}"
            )
        low, high = self.cells_per_slide
        if not 1 <= low <= high or self.max_slides_per_patient < 1:
            raise ValueError(
                f"{self.name}: need 1 <= cells_per_slide[0] <= cells_per_slide[1] and "
                f"max_slides_per_patient >= 1, got {self.cells_per_slide}, "
                f"{self.max_slides_per_patient}"
            )


@dataclasses.dataclass(frozen=True)
class PlannedCell:
    """One image to draw: who it belongs to and the seed of its own drawing."""

    diagnosis: str
    patient_id: str
    slide_id: str
    file_name: str
    cell_type: str
    style: cells.SlideStyle
    seed: tuple[int, ...]


def plan(config: SyntheticConfig) -> list[PlannedCell]:
    """Lists every image of ``config`` (cheap: nothing is drawn).

    Patients, slides, each slide's style and each cell's type are decided here
    from seeded generators keyed by (class, patient, slide, cell), so every
    image is reproducible on its own, in any order.

    Args:
      config: the builder config.

    Returns:
      The planned cells, in a fixed order.
    """
    out: list[PlannedCell] = []
    for class_index, diagnosis in enumerate(CLASS_NAMES):
        for patient in range(config.patients_per_class):
            patient_rng = np.random.default_rng([config.seed, class_index, patient])
            patient_id = f"SYN-{diagnosis}-P{patient + 1:02d}"
            patient_style = cells.SlideStyle.sample(patient_rng)
            num_slides = int(patient_rng.integers(1, config.max_slides_per_patient + 1))
            for slide in range(num_slides):
                slide_rng = np.random.default_rng([config.seed, class_index, patient, slide + 1])
                slide_id = f"{patient_id}-S{slide + 1}"
                style = cells.SlideStyle.sample(slide_rng, around=patient_style)
                low, high = config.cells_per_slide
                for index in range(int(slide_rng.integers(low, high + 1))):
                    cell_type = cells.pick_cell_type(diagnosis, slide_rng)
                    out.append(
                        PlannedCell(
                            diagnosis=diagnosis,
                            patient_id=patient_id,
                            slide_id=slide_id,
                            # The drawn cell type rides in the name: ground truth
                            # for inspection, without a feature other sets lack.
                            file_name=str(
                                PurePosixPath(diagnosis, slide_id, f"{index:03d}_{cell_type}.png")
                            ),
                            cell_type=cell_type,
                            style=style,
                            seed=(config.seed, class_index, patient, slide + 1, index + 1),
                        )
                    )
    return out


def draw(cell: PlannedCell, image_size: int) -> np.ndarray:
    """Draws a planned cell: ``[image_size, image_size, 3]`` uint8."""
    return cells.draw_cell(
        cell.cell_type, np.random.default_rng(list(cell.seed)), cell.style, image_size
    )


def _record(cell: PlannedCell) -> common.Record:
    # Generated, not read: the record's path is the virtual file name.
    return common.Record(
        path=PurePosixPath(cell.file_name),  # type: ignore[arg-type]
        label=cell.diagnosis,
        file_name=cell.file_name,
        patient_id=cell.patient_id,
        slide_id=cell.slide_id,
    )


def split_plan(cells_: Iterable[PlannedCell]) -> dict[str, list[PlannedCell]]:
    """Grouped by patient, stratified by diagnosis, deterministic (``common.assign_splits``)."""
    by_name = {c.file_name: c for c in cells_}
    by_split = common.assign_splits([_record(c) for c in by_name.values()])
    return {split: [by_name[r.file_name] for r in recs] for split, recs in by_split.items()}


class Builder(common.CellImageBuilder):
    """SYNTHETIC blood-smear cells of six diagnoses, drawn offline; never for accuracy claims."""

    LABEL_NAMES = CLASS_NAMES
    # No MANUAL_DOWNLOAD_INSTRUCTIONS: generated, nothing to download, no manual_dir.
    # `skip_bad_files` is accepted for a uniform builder interface; generated
    # images are never bad.
    BUILDER_CONFIGS = [
        SyntheticConfig(
            name="default",
            description="64x64 px, 6 classes x 7 patients, 1-2 slides each, 24-40 cells a slide.",
        ),
        SyntheticConfig(
            name="px128",
            image_size=128,
            description="The same patients, slides and cells drawn at 128x128 px.",
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"

    @functools.cached_property
    def _planned(self) -> dict[str, PlannedCell]:
        """This config's cells by file name (the record's key)."""
        return {c.file_name: c for c in plan(self.builder_config)}

    def _split_records(self, manual_dir: None) -> dict[str, list[common.Record]]:
        del manual_dir  # Generated: nothing to download.
        return {
            split: [_record(c) for c in planned]
            for split, planned in split_plan(self._planned.values()).items()
        }

    def _encode(self, record: common.Record) -> bytes:
        return cells.encode_png(
            draw(self._planned[record.file_name], self.builder_config.image_size)
        )
