"""Shared pytest fixtures. Keep additions self-contained and clearly named.

Input-pipeline fixtures (``pipeline_*``): tiny TFDS data sets built once per
test session into a temporary ``data_dir``:

* ``all_taleqani/original`` and ``all_taleqani/segmented``, built by the real
  builder from generated images (JPEG, every third one PNG; several sizes,
  some non-square). Segmented file names start with ``seg-`` so that the two
  configs can be told apart in a mixture.
* ``pipeline_test_cells``: a second, independent builder defined here, with
  other class names (``hem``, ``all``), PNG images, and patient ids.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tfds_builders import common

#: Images per class of the generated all_taleqani configs.
PIPELINE_TALEQANI_PER_CLASS = {"original": 6, "segmented": 5}
#: Image sizes (width, height) cycled through by the generated files.
_PIPELINE_SIZES = ((40, 40), (48, 36), (30, 44), (64, 64))


class PipelineTestCells(tfds.core.GeneratorBasedBuilder):
    """A tiny two-class PNG set with other class names than all_taleqani (tests only)."""

    VERSION = tfds.core.Version("1.0.0")
    SPLIT_SIZES = {"train": 10, "test": 6}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=common.cell_features(["hem", "all"]))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in self.SPLIT_SIZES.items()}

    def _generate_examples(self, split: str, n: int):
        rng = np.random.default_rng(len(split))
        for i in range(n):
            h, w = _PIPELINE_SIZES[i % len(_PIPELINE_SIZES)][::-1]
            image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            key = f"{split}-{i:03d}"
            yield (
                key,
                {
                    "image": image,  # encoded as PNG by tfds.features.Image
                    "label": i % 2,
                    "patient_id": f"p{i // 2}",
                    "slide_id": f"s{i}",
                    "source": "pipeline_test_cells",
                    "file_name": f"{key}.png",
                },
            )


def _write_taleqani_tree(root: Path, folder: str, per_class: int, prefix: str) -> None:
    rng = np.random.default_rng(len(folder))  # deterministic per folder
    for c, name in enumerate(("Benign", "Early", "Pre", "Pro")):
        directory = root / folder / name
        directory.mkdir(parents=True)
        for i in range(per_class):
            w, h = _PIPELINE_SIZES[i % len(_PIPELINE_SIZES)]
            # A smooth class-tinted field plus noise: JPEG-friendly, distinct per class.
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([xx * 3 + c * 40, yy * 3, (xx + yy) * 2 + 60], -1)
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            ext = "png" if i % 3 == 2 else "jpg"
            Image.fromarray(pixels).save(directory / f"{prefix}WBC-{name}-{i:03d}.{ext}")


@dataclasses.dataclass(frozen=True)
class PipelineData:
    """Where the pipeline test data sets are built."""

    data_dir: str
    empty_data_dir: str  # an existing directory with nothing built in it
    # Images per class of the generated all_taleqani configs.
    taleqani_per_class: dict = dataclasses.field(
        default_factory=lambda: dict(PIPELINE_TALEQANI_PER_CLASS)
    )
    # Examples per split of pipeline_test_cells.
    cells_split_sizes: dict = dataclasses.field(
        default_factory=lambda: dict(PipelineTestCells.SPLIT_SIZES)
    )


@pytest.fixture(scope="session")
def pipeline_data(tmp_path_factory) -> PipelineData:
    """Builds all_taleqani/{original,segmented} and pipeline_test_cells once per session."""
    from leukemia_tf.data import build_data_lib as build_data

    manual = tmp_path_factory.mktemp("pipeline_manual") / "archive"
    _write_taleqani_tree(manual, "Original", PIPELINE_TALEQANI_PER_CLASS["original"], "")
    _write_taleqani_tree(manual, "Segmented", PIPELINE_TALEQANI_PER_CLASS["segmented"], "seg-")
    data_dir = str(tmp_path_factory.mktemp("pipeline_tfds"))
    for config in ("original", "segmented"):
        build_data.build(f"all_taleqani/{config}", data_dir=data_dir, manual_dir=str(manual.parent))
    tfds.builder("pipeline_test_cells", data_dir=data_dir).download_and_prepare()
    empty = str(tmp_path_factory.mktemp("pipeline_empty_tfds"))
    return PipelineData(data_dir=data_dir, empty_data_dir=empty)


# --------------------------------------------------------------------------
# Trained-model fixtures (``synthetic_data_dir``, ``trained_*_model_dir``):
# the built-in synthetic set, built once per session, and tiny models trained
# on it for a few steps (cnn_tiny at 32 px, seconds each). For tests that need
# a finished model_dir (export, predict, evaluate); never for accuracy claims.
# Tests must not write into these model_dirs (copy them first).


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> str:
    """A TFDS data_dir holding the built ``leukemia_synthetic`` set (~15 s, once)."""
    from leukemia_tf.data.build_data_lib import build

    data_dir = str(tmp_path_factory.mktemp("synthetic_tfds"))
    build("leukemia_synthetic", data_dir=data_dir)
    return data_dir


#: The smallest training run of the tests (cnn_tiny, 32 px, 3 steps, CPU,
#: float32): each test overrides only what it is about.
TINY_TRAIN = dict(
    datasets="leukemia_synthetic",
    backbone="cnn_tiny",
    image_size=32,
    batch_size=16,
    epochs=1,
    steps_per_epoch=3,
    precision="float32",
    strategy="default",
    verbose=0,
)


#: Search-space flags that fix everything a tuning test does not search.
TUNE_FIXED = dict(
    hidden_units_choices="0",
    weight_decay_range="0.05",
    label_smoothing_range="0.1",
    augment_magnitude_range="0.3",
    mixup_alpha_choices="0",
    cutmix_alpha_choices="0",
)

REPO = Path(__file__).resolve().parents[1]


def run_module(
    module: str, *args: str, cwd: str | os.PathLike | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -m module args`` in a subprocess (absl parses flags once per
    process), with the repository importable from any working directory
    (default: the repository)."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a user error: exit status 2 and nothing else on stderr."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def tiny_train_config(data_dir: str, model_dir, **overrides):
    """A ``TrainConfig`` of :data:`TINY_TRAIN` on ``data_dir``, with ``overrides``."""
    from leukemia_tf.training.config import TrainConfig

    return TrainConfig(
        **{**TINY_TRAIN, "data_dir": data_dir, "model_dir": str(model_dir), **overrides}
    )


def _train_tiny_model(model_dir: Path, data_dir: str, **overrides) -> str:
    import keras

    from leukemia_tf.training import train_lib

    try:
        train_lib.train(tiny_train_config(data_dir, model_dir, **overrides))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return str(model_dir)


@pytest.fixture(scope="session")
def trained_flat_model_dir(tmp_path_factory, synthetic_data_dir) -> str:
    """model_dir of a flat cnn_tiny model (native labels, 6 classes, float32)."""
    return _train_tiny_model(tmp_path_factory.mktemp("flat_model") / "run", synthetic_data_dir)


@pytest.fixture(scope="session")
def trained_hierarchical_model_dir(tmp_path_factory, synthetic_data_dir) -> str:
    """model_dir of a hierarchical cnn_tiny model (taxonomy labels, float32)."""
    return _train_tiny_model(
        tmp_path_factory.mktemp("hierarchical_model") / "run",
        synthetic_data_dir,
        label_mode="taxonomy",
        head="hierarchical",
    )


@pytest.fixture(scope="session")
def train_tiny_model(synthetic_data_dir):
    """Trains one more tiny model: ``train_tiny_model(model_dir, **TrainConfig overrides)``."""
    return lambda model_dir, **overrides: _train_tiny_model(
        Path(model_dir), synthetic_data_dir, **overrides
    )
