"""Tests of the leukemia_synthetic builder (a tiny config; the default one's plan)."""

import collections
import hashlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.linear_model import LogisticRegression
from tensorflow_datasets import testing

from leukemia_tf import taxonomy
from tfds_builders.leukemia_synthetic import cells
from tfds_builders.leukemia_synthetic import leukemia_synthetic_dataset_builder as synthetic

# 3 patients per class: one per split. Small images, few cells: builds in a second.
_TINY = synthetic.SyntheticConfig(
    name="tiny", image_size=32, patients_per_class=3, cells_per_slide=(2, 3)
)


class LeukemiaSyntheticTest(testing.DatasetBuilderTestCase):
    DATASET_CLASS = synthetic.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = [_TINY]
    SPLITS = {"train": 21, "validation": 20, "test": 18}


def _default_config() -> synthetic.SyntheticConfig:
    return synthetic.Builder.builder_configs["default"]


def test_default_plan_size_groups_and_splits():
    cells_ = synthetic.plan(_default_config())
    assert 1500 <= len(cells_) <= 2500
    assert len({c.file_name for c in cells_}) == len(cells_)
    # One diagnosis per patient; 1-2 slides per patient; slides belong to one patient.
    diagnosis_of, slides_of, patient_of_slide = {}, collections.defaultdict(set), {}
    for c in cells_:
        assert diagnosis_of.setdefault(c.patient_id, c.diagnosis) == c.diagnosis
        slides_of[c.patient_id].add(c.slide_id)
        assert patient_of_slide.setdefault(c.slide_id, c.patient_id) == c.patient_id
    assert {len(s) for s in slides_of.values()} <= {1, 2}
    assert collections.Counter(diagnosis_of.values()) == {n: 7 for n in synthetic.CLASS_NAMES}

    by_split = synthetic.split_plan(cells_)
    assert sum(len(v) for v in by_split.values()) == len(cells_)
    split_of_patient, split_of_slide = {}, {}
    for split, members in by_split.items():
        assert {c.diagnosis for c in members} == set(synthetic.CLASS_NAMES), split
        for c in members:
            assert split_of_patient.setdefault(c.patient_id, split) == split, c.patient_id
            assert split_of_slide.setdefault(c.slide_id, split) == split, c.slide_id


def test_class_names_are_mapped_in_the_taxonomy():
    mapping = taxonomy.Taxonomy.load().dataset_mapping("leukemia_synthetic")
    assert set(mapping) == set(synthetic.CLASS_NAMES)
    assert set(cells.CLASS_MIX) == set(synthetic.CLASS_NAMES)


def test_drawing_is_a_pure_function_of_the_seed():
    planned = synthetic.plan(_default_config())[::400]
    first = [synthetic.draw(c, 64) for c in planned]
    again = [synthetic.draw(c, 64) for c in reversed(planned)][::-1]
    for a, b in zip(first, again, strict=True):
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[1])
    # The plan itself is reproducible too.
    assert synthetic.plan(_default_config()) == synthetic.plan(_default_config())


def _shard_digests(builder: tfds.core.DatasetBuilder) -> dict[str, str]:
    root = Path(builder.data_dir)
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.tfrecord*"))
    }


def test_two_builds_give_identical_bytes(tmp_path):
    digests = []
    for run in ("a", "b"):
        builder = synthetic.Builder(config=_TINY, data_dir=tmp_path / run)
        builder.download_and_prepare()
        digests.append(_shard_digests(builder))
    assert digests[0] and digests[0] == digests[1]


def test_build_needs_no_manual_dir_and_loads_with_ids(tmp_path):
    builder = synthetic.Builder(config=_TINY, data_dir=tmp_path)
    builder.download_and_prepare()  # no DownloadConfig, no manual_dir
    names = builder.info.features["label"].names
    assert names == list(synthetic.CLASS_NAMES)
    examples = list(tfds.as_numpy(builder.as_dataset(split="validation")))
    assert examples
    for ex in examples:
        assert ex["image"].shape == (32, 32, 3)
        patient = ex["patient_id"].decode()
        assert patient.startswith(f"SYN-{names[ex['label']]}-P")
        assert ex["slide_id"].decode().startswith(patient + "-S")
        assert ex["source"] == b"leukemia_synthetic"


def test_config_validation():
    with pytest.raises(ValueError, match="patients_per_class"):
        synthetic.SyntheticConfig(name="bad", patients_per_class=2)
    with pytest.raises(ValueError, match="image_size"):
        synthetic.SyntheticConfig(name="bad", image_size=8)
    with pytest.raises(ValueError, match="unknown cell type"):
        cells.draw_cell("megakaryocyte", np.random.default_rng(0), cells.SlideStyle())


def test_classes_are_learnable_but_not_trivial():
    """A linear model on colour histograms, tested on unseen patients, beats chance
    clearly but is far from perfect (no class-wide shortcut such as a background colour)."""
    per_patient = collections.defaultdict(list)
    for c in synthetic.plan(_default_config()):
        if len(per_patient[c.patient_id]) < 8:
            per_patient[c.patient_id].append(c)
    chosen = [c for group in per_patient.values() for c in group]

    def histogram(image: np.ndarray) -> np.ndarray:
        q = (image // 64).reshape(-1, 3).astype(np.int64)
        return np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64) / len(q)

    x = np.stack([histogram(synthetic.draw(c, 32)) for c in chosen])
    y = np.array([synthetic.CLASS_NAMES.index(c.diagnosis) for c in chosen])
    train = np.array([int(c.patient_id[-2:]) <= 4 for c in chosen])
    model = LogisticRegression(max_iter=3000, C=100).fit(x[train], y[train])
    accuracy = model.score(x[~train], y[~train])
    assert 0.35 < accuracy < 0.95, accuracy  # chance: 1/6


if __name__ == "__main__":
    testing.test_main()
