"""Tests of tfds_builders.common: one bad-file report across splits, the base class."""

from __future__ import annotations

from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from leukemia_tf.data import images
from tfds_builders import common


def _records(split: str, names: list[str]) -> list[common.Record]:
    return [common.Record(path=Path(n), label=0, file_name=f"{split}/{n}") for n in names]


def _encode(record: common.Record) -> bytes:
    if record.path.name.startswith("bad"):
        raise images.BadImageError(record.file_name, "unreadable")
    return b"image"


def _generate(records, collector=None, finish=True):
    return common.generate_examples(
        records, "demo", collector=collector, finish=finish, encode=_encode
    )


_BY_SPLIT = {
    "train": _records("train", ["a", "bad_1", "b"]),
    "validation": _records("validation", ["bad_2"]),
    "test": _records("test", ["c", "bad_3"]),
}


@pytest.mark.parametrize(
    "order", [["train", "validation", "test"], ["test", "train", "validation"]]
)
def test_the_split_finished_last_lists_the_bad_files_of_every_split(order):
    generators = common.split_generators(_BY_SPLIT, _generate, "demo")
    kept = [key for split in order[:2] for key, _ in generators[split]]
    assert len(kept) == sum({"train": 2, "validation": 0, "test": 1}[s] for s in order[:2])
    with pytest.raises(ValueError) as info:
        list(generators[order[2]])
    message = str(info.value)
    assert "demo: 3 bad file(s)" in message
    for name in ("train/bad_1", "validation/bad_2", "test/bad_3"):
        assert name in message


def test_skipping_logs_one_summary_after_the_last_split(monkeypatch):
    messages = []
    monkeypatch.setattr(common.logging, "warning", messages.append)
    generators = common.split_generators(_BY_SPLIT, _generate, "demo", skip_bad_files=True)
    kept = {split: [key for key, _ in gen] for split, gen in generators.items()}
    assert kept == {"train": ["train/a", "train/b"], "validation": [], "test": ["test/c"]}
    summaries = [m for m in messages if "skipped" in m]
    assert len(summaries) == 1 and "skipped 3 bad file(s)" in summaries[0]


def test_the_base_class_is_not_a_data_set():
    with pytest.raises(tfds.core.registered.DatasetNotFoundError):
        tfds.builder_cls(common.CellImageBuilder.name)
