"""Tests of the cross-validated search (``leukemia_tf.tune --cv_folds=K``).

One tiny random search (cnn_tiny, 32 px, 1 epoch of 2 steps, K=2) on the
synthetic set of tests/conftest.py: interrupted in the first trial's second
fold, then resumed to the end of that trial and a second one. The
checks are about mechanics (the score is the mean of the folds, the folds are
assigned once, no example leaks from a fold's training to its validation
part, the table and the best trial), never about accuracy.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_TRAIN, TUNE_FIXED, one_error_line, run_module

from leukemia_tf.data import folds as folds_lib
from leukemia_tf.training.config import ConfigError, TrainConfig
from leukemia_tf.tuning import search_space

REPO = Path(__file__).resolve().parents[1]
K = 2
TINY = {**TINY_TRAIN, "epochs": 1, "steps_per_epoch": 2}


@dataclasses.dataclass
class CvSearch:
    base: TrainConfig
    search: search_space.SearchConfig
    folds_before: bytes
    folds_mtime: int
    interrupted: list  # (trial_id, epoch, cv_fold) at the interruption
    oracle_trials: dict  # trial_id -> (status, score, best_step), as KerasTuner saved them
    result: object


@pytest.fixture(scope="module")
def cv_search(tmp_path_factory, synthetic_data_dir) -> CvSearch:
    """A K-fold random search: interrupted (Ctrl-C) after fold 1's epoch of the
    first trial, then resumed with --max_trials=2."""
    from leukemia_tf.tuning import tune_lib

    tune_dir = tmp_path_factory.mktemp("tune_cv") / "search"
    base = TrainConfig(data_dir=synthetic_data_dir, **TINY)
    search = search_space.SearchConfig(
        tune_dir=str(tune_dir), tuner="random", max_trials=1, cv_folds=K, **TUNE_FIXED
    )
    interrupted = []

    def interrupt(trial_id: str, epoch: int, logs: dict) -> None:
        if logs["cv_fold"] == 1:
            interrupted.append((trial_id, epoch, logs["cv_fold"]))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune_lib.run_search(base, search, epoch_callbacks=[interrupt])
    folds_file = tune_dir / "folds.json"
    before, mtime = folds_file.read_bytes(), folds_file.stat().st_mtime_ns
    result = tune_lib.run_search(base, dataclasses.replace(search, resume=True, max_trials=2))
    oracle = {}
    for path in (tune_dir / "keras_tuner").glob("trial_*/trial.json"):
        trial = json.loads(path.read_text())
        oracle[trial["trial_id"]] = (
            trial["status"],
            trial["score"],
            trial["best_step"],
        )
    return CvSearch(base, search, before, mtime, interrupted, oracle, result)


def _fold_dir(tune_dir, trial_id: str, fold: int) -> Path:
    return Path(tune_dir, "trials", trial_id, f"fold_{fold}")


def _best_of_history(path: Path, objective: str) -> float:
    """The fold's objective at its best epoch, from its history.csv."""
    with open(path / "history.csv") as f:
        return max(float(row[objective]) for row in csv.DictReader(f))


def test_trial_score_is_the_mean_of_its_folds(cv_search):
    result = cv_search.result
    objective = cv_search.search.objective
    assert len(result.rows) == 2 and all(r.status == "COMPLETED" for r in result.rows)
    for row in result.rows:
        # Recomputed independently from each fold run's own files.
        from_history = [
            _best_of_history(_fold_dir(result.tune_dir, row.trial_id, i), objective)
            for i in range(K)
        ]
        assert row.fold_values == pytest.approx(from_history)
        # The engine's own record of each fold's best epoch (every fold that
        # finished: the interrupted one stopped before its summary).
        for i in range(K):
            summary = _fold_dir(result.tune_dir, row.trial_id, i) / "train_summary.json"
            if row.trial_id == "1" or i == 0:
                best = json.loads(summary.read_text())["best_metrics"][objective]
                assert row.fold_values[i] == pytest.approx(best)
        # KerasTuner's own score of the trial (what the oracle optimises) is their mean.
        status, score, best_step = cv_search.oracle_trials[row.trial_id]
        assert status == "COMPLETED"
        assert score == pytest.approx(statistics.mean(from_history))
        assert row.score == pytest.approx(score)
        assert row.score_sd == pytest.approx(statistics.stdev(from_history))
        assert best_step == row.best_epoch == 0
        # The trial's record says the same.
        info = json.loads(
            Path(result.tune_dir, "trials", row.trial_id, "trial_info.json").read_text()
        )
        assert info["cv"]["folds"] == K
        assert info["cv"]["values"] == pytest.approx(from_history)
        assert info["cv"]["mean"] == pytest.approx(score)
    scores = [r.score for r in result.rows]
    assert scores == sorted(scores, reverse=True)


def test_results_table_has_the_spread_and_the_fold_values(cv_search):
    from leukemia_tf.tuning import tune_lib

    result = cv_search.result
    objective = cv_search.search.objective
    with open(result.results_csv) as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table] == [r.trial_id for r in result.rows]
    columns = list(table[0])
    assert columns[3:6] == [objective, f"{objective}_sd", f"{objective}_folds"]
    for record, row in zip(table, result.rows, strict=True):
        values = [float(v) for v in record[f"{objective}_folds"].split(";")]
        assert values == pytest.approx(row.fold_values) and len(values) == K
        assert float(record[objective]) == pytest.approx(statistics.mean(values))
        assert float(record[f"{objective}_sd"]) == pytest.approx(statistics.stdev(values))
    md = Path(result.results_md).read_text()
    assert f"| {objective} | {objective}_sd | {objective}_folds |" in md
    assert "Cross-validated: every trial trained 2 fold models" in md
    summary = tune_lib.summary_text(result, cv_search.search)
    assert "Cross-validated" in summary and f"mean ± sd over {K} folds" in summary


def test_an_interrupted_trial_resumes_fold_by_fold(cv_search):
    assert cv_search.interrupted == [("0", 0, 1)]
    tune_dir = cv_search.result.tune_dir
    info = json.loads(Path(tune_dir, "trials", "0", "trial_info.json").read_text())
    assert info["status"] == "completed" and len(info["cv"]["values"]) == K
    for i in range(K):  # one epoch each: none was trained twice
        assert len((_fold_dir(tune_dir, "0", i) / "history.csv").read_text().splitlines()) == 2


def test_folds_are_assigned_once_and_reused_on_resume(cv_search, synthetic_data_dir):
    from leukemia_tf.data import pipeline

    tune_dir = Path(cv_search.result.tune_dir)
    folds_file = tune_dir / "folds.json"
    assert folds_file.read_bytes() == cv_search.folds_before
    assert folds_file.stat().st_mtime_ns == cv_search.folds_mtime, "folds.json was rewritten"
    data = json.loads(cv_search.folds_before)
    # crossval's default pool: the recipe's train + validation splits; seed --seed.
    assert (data["split"], data["num_folds"], data["repeats"]) == ("train+validation", K, 1)
    assert data["seed"] == cv_search.base.seed
    pooled = pipeline.class_counts("leukemia_synthetic", "train+validation", synthetic_data_dir)
    assert data["n_examples"] == int(pooled.sum())
    # Every fold run of both trials reads this one file.
    for trial_id in ("0", "1"):
        for i in range(K):
            config = json.loads((_fold_dir(tune_dir, trial_id, i) / "config.json").read_text())
            assert config["train_split"] == f"{folds_file}#{i}/train"
            assert config["val_split"] == f"{folds_file}#{i}/validation"


def test_each_fold_validates_on_its_own_held_out_groups(cv_search):
    tune_dir = Path(cv_search.result.tune_dir)
    data = json.loads((tune_dir / "folds.json").read_text())
    group_of = dict(zip(data["keys"], data["groups"], strict=True))
    validation_parts = []
    for i in range(K):
        config = json.loads((_fold_dir(tune_dir, "1", i) / "config.json").read_text())
        train = folds_lib.resolve_split(config["train_split"]).keys
        held = folds_lib.resolve_split(config["val_split"]).keys
        assert train and held and not train & held, f"fold {i}: an example in both parts"
        assert train | held == set(data["keys"])
        assert not {group_of[k] for k in train} & {group_of[k] for k in held}, (
            f"fold {i}: a patient in both parts"
        )
        validation_parts.append(held)
    # The validation parts partition the pool: every example is validated once.
    assert sum(len(p) for p in validation_parts) == len(set().union(*validation_parts))
    assert set().union(*validation_parts) == set(data["keys"])


def test_best_trial_trains_and_retrains_on_the_recipe_splits(cv_search):
    from leukemia_tf.training import config as config_lib
    from leukemia_tf.tuning import tune_lib

    result = cv_search.result
    parsed = config_lib.parse_flagfile(result.best_flagfile)
    assert (parsed.train_split, parsed.val_split) == ("train", "validation")
    assert parsed.learning_rate == pytest.approx(result.best.values["learning_rate"])
    assert "mean ± sd over 2 cross-validation folds" in Path(result.best_flagfile).read_text()
    best = json.loads(Path(result.tune_dir, "best_trial.json").read_text())
    assert best["cv"]["values"] == pytest.approx(result.best.fold_values)
    retrain = tune_lib.retrain_config(result.tune_dir)
    assert (retrain.train_split, retrain.val_split) == ("train+validation", "")
    assert retrain.epochs == result.best.best_epoch + 1


# ----------------------------------------------------------------- bad input
def _search(tmp_path, **overrides) -> search_space.SearchConfig:
    return search_space.SearchConfig(tune_dir=str(tmp_path / "t"), **{**TUNE_FIXED, **overrides})


@pytest.mark.parametrize(
    "cv_folds, base_overrides, message",
    [
        (1, {}, r"--cv_folds=1: need at least 2 folds \(0: no cross-validation\)"),
        (-3, {}, r"--cv_folds=-3: need at least 2 folds"),
        (2, {"train_split": "/x/folds.json#0/train"}, r"--cv_folds=2 with --train_split="),
        (2, {"val_split": "/x/folds.json#1/validation"}, r"--cv_folds=2 with --val_split="),
        (2, {"train_split": ""}, r"--cv_folds=2: --train_split is empty"),
        (0, {"val_split": ""}, r"--val_split is empty.*--cv_folds"),
    ],
)
def test_bad_cv_flags_name_the_flag(tmp_path, cv_folds, base_overrides, message):
    base = TrainConfig(**{**TINY, **base_overrides})
    with pytest.raises(ConfigError, match=message):
        search_space.check_search(_search(tmp_path, cv_folds=cv_folds), base)


def test_cv_without_a_validation_split_folds_the_training_split(tmp_path):
    base = TrainConfig(**{**TINY, "val_split": ""})
    search_space.check_search(_search(tmp_path, cv_folds=2), base)  # no raise
    from leukemia_tf import crossval_lib
    from leukemia_tf.tuning import tune_lib

    recipe = tune_lib.folds_recipe(base, _search(tmp_path, cv_folds=2))
    assert crossval_lib.pooled_split(recipe) == "train"


def test_more_folds_than_patients_is_refused_before_anything_is_written(
    tmp_path, synthetic_data_dir
):
    from leukemia_tf.tuning import tune_lib

    base = TrainConfig(data_dir=synthetic_data_dir, **TINY)
    search = _search(tmp_path, tuner="random", max_trials=1, cv_folds=500)
    with pytest.raises(folds_lib.FoldError, match=r"--cv_folds=500 is larger than the \d+ group"):
        tune_lib.run_search(base, search)
    assert not (tmp_path / "t").exists()


def test_resume_with_other_cv_folds_is_refused(cv_search):
    from leukemia_tf.tuning import tune_lib

    other = dataclasses.replace(cv_search.search, resume=True, cv_folds=3)
    space = search_space.check_search(other, cv_search.base)
    with pytest.raises(tune_lib.TuneDirError, match="--cv_folds: was 2, now 3"):
        tune_lib.prepare_tune_dir(cv_search.base, other, space)
    plain = dataclasses.replace(cv_search.search, resume=True, cv_folds=0)
    with pytest.raises(tune_lib.TuneDirError, match="--cv_folds: was 2, now 0"):
        tune_lib.prepare_tune_dir(cv_search.base, plain, space)


def test_an_older_search_without_cv_folds_still_resumes(tmp_path):
    from leukemia_tf.tuning import tune_lib

    base = TrainConfig(**TINY)
    search = _search(tmp_path)
    space = search_space.check_search(search, base)
    description = tune_lib._describe_search(base, search, space)
    del description["search"]["cv_folds"]
    assert not tune_lib._differences(description, tune_lib._describe_search(base, search, space))


def test_cli_error_is_one_line(tmp_path):
    proc = run_module(
        "leukemia_tf.tune",
        "--flagfile=configs/tune_smoke.flags",
        f"--tune_dir={tmp_path / 't'}",
        "--cv_folds=1",
    )
    line = one_error_line(proc)
    assert line == "error: --cv_folds=1: need at least 2 folds (0: no cross-validation)"
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- heavier
@pytest.mark.slow
def test_hyperband_continues_every_fold_run(tmp_path, synthetic_data_dir):
    """Hyperband (--epochs=2, factor 2): trial 2 continues the better of trials
    0 and 1 into its second epoch, fold by fold."""
    from leukemia_tf import rundir
    from leukemia_tf.tuning import tune_lib

    base = TrainConfig(data_dir=synthetic_data_dir, **{**TINY, "epochs": 2})
    search = _search(tmp_path, tuner="hyperband", hyperband_factor=2, max_trials=3, cv_folds=K)
    result = tune_lib.run_search(base, search)
    rows = {r.trial_id: r for r in result.rows}
    assert sorted(rows) == ["0", "1", "2"]  # KerasTuner pads ids to the digits of max_trials
    continued = rows["2"]
    past = continued.continued_from
    assert past in ("0", "1") and continued.epochs_trained == 2
    for i in range(K):
        first = rundir.read_history(str(_fold_dir(result.tune_dir, past, i)))
        again = rundir.read_history(str(_fold_dir(result.tune_dir, "2", i)))
        assert len(first) == 1 and len(again) == 2 and again[0] == first[0]
        assert continued.fold_values[i] == pytest.approx(
            _best_of_history(_fold_dir(result.tune_dir, "2", i), search.objective)
        )
    assert continued.score == pytest.approx(statistics.mean(continued.fold_values))


@pytest.mark.slow
def test_distributed_cross_validated_search(tmp_path, synthetic_data_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "tools/distributed_tune.py",
            f"--data_dir={synthetic_data_dir}",
            f"--tune_dir={tmp_path / 'tune'}",
            "--max_trials=2",
            f"--cv_folds={K}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: the chief served the oracle" in proc.stdout
