"""Grouped k-fold cross-validation: fold assignment, the fold filter, the runs and the report."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import one_error_line, run_module, tiny_train_config

from leukemia_tf.data import folds as folds_lib

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------ assignment
def _synthetic_metadata(seed: int = 0):
    """120 examples: 3 classes x 6 patients (one class each) x 1-2 slides x a few cells."""
    rng = np.random.default_rng(seed)
    keys, labels, groups = [], [], []
    for c in range(3):
        for p in range(6):
            for cell in range(int(rng.integers(4, 10))):
                keys.append(f"src::c{c}_p{p}_{cell}.png")
                labels.append(c)
                groups.append(f"patient:c{c}p{p}")
    return keys, labels, groups


def test_folds_group_whole_patients_and_cover_every_example_once_per_repeat():
    keys, labels, groups = _synthetic_metadata()
    data = folds_lib.assign_folds(keys, labels, groups, num_folds=3, repeats=2, seed=7)
    assert sorted(keys) == data["keys"]
    group_of = dict(zip(keys, groups, strict=True))
    label_of = dict(zip(keys, labels, strict=True))
    for fold_of in data["assignment"]:
        # Every example has exactly one fold: out-of-fold exactly once per repeat.
        assert len(fold_of) == len(keys) and set(fold_of) == {0, 1, 2}
        folds_of_group = defaultdict(set)
        for key, fold in zip(data["keys"], fold_of, strict=True):
            folds_of_group[group_of[key]].add(fold)
        assert all(len(f) == 1 for f in folds_of_group.values()), "a patient in two folds"
        # Stratified: each fold holds 2 of each class's 6 patients.
        for fold in range(3):
            members = {group_of[k] for k, f in zip(data["keys"], fold_of, strict=True) if f == fold}
            per_class = np.bincount(
                [label_of[next(iter(k for k in keys if group_of[k] == g))] for g in members],
                minlength=3,
            )
            assert per_class.tolist() == [2, 2, 2]
    assert data["assignment"][0] != data["assignment"][1], "repeats must differ"
    again = folds_lib.assign_folds(keys[::-1], labels[::-1], groups[::-1], 3, 2, seed=7)
    assert again == data, "the assignment must not depend on reading order"
    other = folds_lib.assign_folds(keys, labels, groups, 3, 1, seed=8)
    assert other["assignment"][0] != data["assignment"][0]


def test_more_folds_than_groups_in_a_class_is_refused():
    keys, labels, groups = _synthetic_metadata()
    with pytest.raises(folds_lib.FoldError, match=r"--folds=7 is larger than the 6 group"):
        folds_lib.assign_folds(keys, labels, groups, num_folds=7)
    with pytest.raises(folds_lib.FoldError, match="occur more than once"):
        folds_lib.assign_folds(keys + keys[:1], labels + labels[:1], groups + groups[:1], 2)


def test_fold_split_syntax():
    split = folds_lib.fold_split("/x/folds.json", 3, "validation")
    assert split == "/x/folds.json#3/validation" and folds_lib.is_fold_split(split)
    assert not folds_lib.is_fold_split("train+validation")
    assert folds_lib.resolve_split("train[:10%]").keys is None
    assert folds_lib.short_name(split) == "fold3_validation"
    from leukemia_tf.evaluation import evaluate_lib

    out = evaluate_lib.default_out_dir("/runs/cv/fold_3", split)
    assert out == "/runs/cv/fold_3/eval_fold3_validation"


# ------------------------------------------------------- pipeline filter
def test_the_pipeline_filter_keeps_exactly_the_keys_of_the_fold(tmp_path, pipeline_data):
    from leukemia_tf.data import names, pipeline

    meta = pipeline.read_metadata("pipeline_test_cells", "train", pipeline_data.data_dir)
    keys = meta["key"].tolist()
    assert len(keys) == 10 and len(set(keys)) == 10
    fold_of = [i % 2 for i in range(len(keys))]
    path = str(tmp_path / "folds.json")
    folds_lib.write_fold_file(
        path,
        {
            "version": 1,
            "datasets": "pipeline_test_cells",
            "split": "train",
            "num_folds": 2,
            "repeats": 1,
            "keys": keys,
            "assignment": [fold_of],
        },
    )
    for part in ("train", "validation"):
        split = folds_lib.fold_split(path, 1, part)
        wanted = {
            k for k, f in zip(keys, fold_of, strict=True) if (f == 1) == (part == "validation")
        }
        ds = pipeline.load_split(
            "pipeline_test_cells",
            split,
            data_dir=pipeline_data.data_dir,
            image_size=16,
            batch_size=4,
            training=False,
            cache=str(tmp_path / "cache" / "c_"),
        )
        got = [
            folds_lib.example_key(s.decode(), f.decode())
            for batch in ds.as_numpy_iterator()
            for s, f in zip(batch["source"], batch["file_name"], strict=True)
        ]
        assert sorted(got) == sorted(wanted)
        counts = pipeline.class_counts("pipeline_test_cells", split, pipeline_data.data_dir)
        assert counts.sum() == len(wanted)
        assert names.split_names(split) == ["train"]
    # Each part has its own cache file.
    caches = [p.name for p in (tmp_path / "cache").iterdir()]
    assert any("_fold1train_" in c for c in caches), caches
    assert any("_fold1validation_" in c for c in caches), caches
    with pytest.raises(folds_lib.FoldError, match="made for --datasets='pipeline_test_cells'"):
        pipeline.class_counts(
            "all_taleqani/original", folds_lib.fold_split(path, 0, "train"), pipeline_data.data_dir
        )


# ----------------------------------------------------------- end to end
def _cv_config(tmp_path, data_dir, **overrides):
    return tiny_train_config(data_dir, tmp_path / "cv", steps_per_epoch=2, verbose=0, **overrides)


def test_two_fold_crossval_end_to_end(tmp_path, synthetic_data_dir):
    from leukemia_tf import crossval_lib, rundir
    from leukemia_tf.data import pipeline

    config = _cv_config(tmp_path, synthetic_data_dir)
    crossval_lib.run(config, num_folds=2, fold=0)
    cv_dir = config.model_dir
    data = json.loads(Path(cv_dir, "folds.json").read_text())
    assert data["n_groups"] == {"patient": len({g for g in data["groups"]})}
    # Only fold 0: the report names fold 1 as unfinished.
    result = crossval_lib.aggregate(cv_dir, bootstrap=20)
    assert result["finished"] == [0] and result["unfinished"] == [1]
    assert "fold_1" in Path(result["report_path"]).read_text()

    crossval_lib.run(config, num_folds=2)  # fold 0 is skipped, fold 1 trained
    result = crossval_lib.aggregate(cv_dir, bootstrap=20)
    assert result["finished"] == [0, 1] and not result["unfinished"]
    for name in ("crossval_report.md", "crossval_metrics.json", "crossval_folds.png"):
        assert Path(cv_dir, name).stat().st_size > 0
    n_pool = int(
        pipeline.class_counts("leukemia_synthetic", "train+validation", synthetic_data_dir).sum()
    )
    pooled = result["pooled"][0]
    assert pooled["complete"] and pooled["n_examples"] == n_pool == data["n_examples"]
    assert pooled["patient"]["n_groups"] == len(set(data["groups"]))
    oof_keys = np.concatenate(
        [np.load(Path(cv_dir, f"fold_{i}", "oof_predictions.npz"))["key"] for i in (0, 1)]
    )
    assert len(set(oof_keys.tolist())) == len(oof_keys) == n_pool, "each example once"
    summary = result["summary"]["accuracy"]
    assert summary["n"] == 2 and summary["sd"] is not None
    # The fold run is an ordinary run with fold splits.
    fold_config = rundir.read_config(crossval_lib.fold_dir(cv_dir, 1))
    assert fold_config.val_split.endswith("folds.json#1/validation")

    # A fold directory from another recipe is refused, and so is folds.json.
    other = crossval_lib.fold_config(config, cv_dir, 1)
    with pytest.raises(folds_lib.FoldError, match="another cross-validation.*--learning_rate"):
        crossval_lib.run(
            tiny_train_config(
                synthetic_data_dir, cv_dir, steps_per_epoch=2, learning_rate=0.5, verbose=0
            ),
            num_folds=2,
        )
    Path(other.model_dir, "config.json").write_text(
        json.dumps({**other.to_dict(), "backbone": "cnn_small"})
    )
    with pytest.raises(folds_lib.FoldError, match="another recipe or fold: --backbone"):
        crossval_lib.aggregate(cv_dir, bootstrap=0)


def test_taxonomy_folds_are_scored_per_level(tmp_path, synthetic_data_dir):
    from leukemia_tf import crossval_lib
    from leukemia_tf.evaluation import levels as levels_lib
    from leukemia_tf.taxonomy import Taxonomy

    config = _cv_config(tmp_path, synthetic_data_dir, label_mode="taxonomy", head="hierarchical")
    crossval_lib.run(config, num_folds=2)
    cv_dir = config.model_dir
    result = crossval_lib.aggregate(cv_dir, bootstrap=0)
    taxonomy = Taxonomy.load()
    oof = [dict(np.load(Path(cv_dir, f"fold_{i}", "oof_predictions.npz"))) for i in (0, 1)]
    levels = np.concatenate([f["levels"] for f in oof])
    assert levels.shape[1] == taxonomy.num_levels
    # The level marginals are the hierarchical head's: each level sums to one.
    level_0 = np.concatenate([f["level_probs_0"] for f in oof])
    np.testing.assert_allclose(level_0.sum(axis=1), 1.0, atol=1e-4)
    section = result["pooled"][0]["levels"]
    walk = levels_lib.greedy_walk(
        [np.concatenate([f[f"level_probs_{k}"] for f in oof]) for k in range(taxonomy.num_levels)],
        taxonomy,
    )
    for k, entry in enumerate(section["levels"]):
        reached = levels[:, k] >= 0
        if not reached.any():
            assert "skipped" in entry
            continue
        want = float((walk[reached, k] == levels[reached, k]).mean())
        assert entry["n"] == int(reached.sum())
        assert entry["greedy"]["accuracy"] == pytest.approx(want)
    per_fold = [row["level_accuracy"] for row in result["per_fold"]]
    assert len(per_fold) == 2 and all(len(row) == taxonomy.num_levels for row in per_fold)
    mean_0 = result["summary"]["level_accuracy"][0]["mean"]
    assert mean_0 == pytest.approx(np.mean([row[0] for row in per_fold]))
    report = Path(result["report_path"]).read_text()
    assert "Per taxonomy level" in report and "Taxonomy levels, accuracy" in report

    # An out-of-fold cache without the level arrays (an older one) is recomputed.
    cache = Path(cv_dir, "fold_0", "oof_predictions.npz")
    np.savez(cache, **{k: v for k, v in oof[0].items() if not k.startswith("level")})
    again = crossval_lib.aggregate(cv_dir, bootstrap=0)
    assert "levels" in np.load(cache)
    assert again["pooled"][0]["levels"]["levels"] == section["levels"]

    # The fold ensemble's report scores every level too, for each fold model and the ensemble.
    scored = crossval_lib.ensemble(cv_dir, split="test")
    rows = [row["level_accuracy"] for row in scored["per_fold"]]
    ensemble_levels = scored["ensemble"]["level_accuracy"]
    assert len(ensemble_levels) == taxonomy.num_levels and ensemble_levels[0] is not None
    assert 0.0 <= ensemble_levels[0] <= 1.0
    single = scored["single_models"]["level_accuracy"][0]["mean"]
    assert single == pytest.approx(np.mean([row[0] for row in rows]))
    assert "Taxonomy levels, accuracy" in Path(scored["report_path"]).read_text()


def test_user_errors_are_one_line(tmp_path, synthetic_data_dir):
    # --aggregate with no finished fold, then more folds than a class has patients.
    cv_dir = tmp_path / "cv"
    config = _cv_config(tmp_path, synthetic_data_dir)
    from leukemia_tf import crossval_lib

    crossval_lib.prepare_folds(config, 2)
    proc = run_module("leukemia_tf.crossval", f"--model_dir={cv_dir}", "--aggregate", cwd=tmp_path)
    line = one_error_line(proc)
    assert line.startswith("error: --aggregate: no fold") and "fold_0, fold_1" in line, line
    with pytest.raises(folds_lib.FoldError, match=r"--folds=50 is larger than the \d+ group"):
        crossval_lib.prepare_folds(_cv_config(tmp_path / "b", synthetic_data_dir), 50)
