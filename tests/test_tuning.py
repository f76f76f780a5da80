"""Tests of the hyperparameter search (leukemia_tf.tune / leukemia_tf.tuning).

The searches run tiny trials (cnn_tiny, 32 px, 2 steps per epoch) on the
synthetic set of tests/conftest.py; they check the mechanics (Hyperband
budgets and continuation, failures, refusal, resume, outputs), never accuracy.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from conftest import TINY_TRAIN, TUNE_FIXED

from leukemia_tf import rundir
from leukemia_tf.training.config import ConfigError, TrainConfig
from leukemia_tf.tuning import search_space

REPO = Path(__file__).resolve().parents[1]
TUNE_CONFIGS = sorted((REPO / "configs").glob("tune*.flags"))

TINY = {**TINY_TRAIN, "epochs": 2, "steps_per_epoch": 2}


def _values(space) -> dict:
    return {p.name: (p.kind, p.values) for p in space}


# ------------------------------------------------------------------ flags
def _parse(args: list[str]) -> tuple[TrainConfig, search_space.SearchConfig]:
    flag_values = flags.FlagValues()
    search_space.define_all_flags(flag_values)
    flag_values(["prog", *args])
    return search_space.base_config_from_flags(flag_values), search_space.SearchConfig.from_flags(
        flag_values
    )


def test_train_flag_fixes_and_search_flag_searches():
    base, search = _parse(["--tune_dir=x", "--learning_rate=5e-4", "--label_mode=taxonomy"])
    space = _values(search_space.check_search(search, base))
    assert space["learning_rate"] == ("fixed", (5e-4,))
    assert space["dropout"] == ("range", (0.0, 0.5))  # the default range
    assert space["head"] == ("choice", ("flat", "hierarchical"))  # auto with taxonomy labels
    assert space["backbone"] == ("fixed", ("cnn_small",))  # empty --backbones: --backbone

    base, search = _parse(["--tune_dir=x", "--learning_rate_range=1e-4,1e-2", "--backbones=cnn"])
    space = search_space.check_search(search, base)
    lr = next(p for p in space if p.name == "learning_rate")
    assert (lr.kind, lr.values, lr.log) == ("range", (1e-4, 1e-2), True)
    assert _values(space)["backbone"] == (
        "choice",
        ("cnn_medium", "cnn_medium_gn", "cnn_small", "cnn_small_gn", "cnn_tiny", "cnn_tiny_gn"),
    )
    assert _values(space)["head"] == ("fixed", ("flat",))  # auto with native labels

    with pytest.raises(ConfigError, match="--learning_rate=0.001 fixes .* give one of them"):
        _parse(["--tune_dir=x", "--learning_rate=1e-3", "--learning_rate_range=1e-4,1e-2"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dropout_range=0.5,0.1"], "--dropout_range='0.5,0.1': give LO,HI with LO < HI"),
        (["--dropout_range=0.1,0.2,0.3"], "give LO,HI .* or one value"),
        (["--backbones=resnet9000"], "unknown backbone or family 'resnet9000'"),
        (["--image_sizes=32,abc"], "--image_sizes: 'abc' is not a valid int"),
        (["--heads=flat,tree"], "unknown head"),
        (["--search_seed=0"], "--search_seed=0"),
        (["--val_split="], "--val_split is empty"),
        (["--freeze_epochs_choices=10", "--epochs=3"], "no trial could unfreeze"),
        ([], "--tune_dir: an output directory"),
    ],
)
def test_bad_search_flags_name_the_flag(args, message):
    base, search = _parse(args if args == [] else ["--tune_dir=x", *args])
    if not args:
        search = dataclasses.replace(search, tune_dir="")
    with pytest.raises(ConfigError, match=message):
        search_space.check_search(search, base)


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_tune_flagfiles_parse_and_validate(path):
    text = path.read_text()
    assert text.startswith("#") and f"configs/{path.name}" in text
    base, search = search_space.parse_flagfile(str(path))
    space = search_space.check_search(search, base)
    assert any(p.kind != "fixed" for p in space)


def test_invalid_combinations_are_detected():
    base = TrainConfig(model_dir="m", label_mode="native", head="hierarchical")
    with pytest.raises(ConfigError, match="--head=hierarchical needs --label_mode=taxonomy"):
        search_space.check_combination(base)
    vit = TrainConfig(model_dir="m", backbone="vit_tiny_patch16", image_size=40)
    with pytest.raises(ConfigError, match="multiple of 16"):
        search_space.check_combination(vit)


# --------------------------------------------------------- Hyperband search
@dataclasses.dataclass
class Search:
    base: TrainConfig
    search: search_space.SearchConfig
    interrupted_history: list
    refused: str
    result: object


@pytest.fixture(scope="module")
def hyperband_search(tmp_path_factory, synthetic_data_dir) -> Search:
    """Hyperband with --epochs=2, factor 2: five trials, one continuing another.

    Interrupted (KeyboardInterrupt, as Ctrl-C) after the first epoch of trial
    3, refused once without --resume, then resumed to the end.
    """
    from leukemia_tf.tuning import tune_lib

    tune_dir = str(tmp_path_factory.mktemp("tune") / "hyperband")
    base = TrainConfig(data_dir=synthetic_data_dir, **TINY)
    search = search_space.SearchConfig(
        tune_dir=tune_dir, tuner="hyperband", hyperband_factor=2, **TUNE_FIXED
    )

    def interrupt(trial_id: str, epoch: int, logs: dict) -> None:
        if int(trial_id) == 3 and epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune_lib.run_search(base, search, epoch_callbacks=[interrupt])
    interrupted = rundir.read_history(os.path.join(tune_dir, "trials", "0003"))
    with pytest.raises(tune_lib.TuneDirError) as refused:
        tune_lib.run_search(base, search)
    result = tune_lib.run_search(base, dataclasses.replace(search, resume=True))
    return Search(base, search, interrupted, str(refused.value), result)


def _info(tune_dir: str, trial_id: str) -> dict:
    return json.loads((Path(tune_dir) / "trials" / trial_id / "trial_info.json").read_text())


def test_search_runs_hyperband_budgets_and_continues_trials(hyperband_search):
    result = hyperband_search.result
    rows = {r.trial_id: r for r in result.rows}
    assert sorted(rows) == ["0000", "0001", "0002", "0003", "0004"]
    assert all(r.status == "COMPLETED" for r in rows.values())
    # Round 0 of bracket 1 trains 1 epoch; its best continues to epoch 2 in trial 0002.
    assert rows["0000"].epochs_trained == rows["0001"].epochs_trained == 1
    past = rows["0002"].continued_from
    assert past in ("0000", "0001") and rows["0002"].epochs_trained == 2
    assert rows["0002"].values == rows[past].values
    tune_dir = result.tune_dir
    continued = _info(tune_dir, "0002")
    assert (continued["initial_epoch"], continued["target_epochs"]) == (1, 2)
    # The continuation resumed the same run: epoch 0 is the past trial's own.

    first = rundir.read_history(os.path.join(tune_dir, "trials", past))[0]
    again = rundir.read_history(os.path.join(tune_dir, "trials", "0002"))[0]
    assert again == first
    # Every trial's schedule spans --epochs; the stopped ones keep their backup to continue.
    assert (
        json.loads((Path(tune_dir) / "trials" / "0000" / "config.json").read_text())["epochs"] == 2
    )
    # Sorted by the objective, best first.
    scores = [r.score for r in result.rows]
    assert scores == sorted(scores, reverse=True)


def test_search_writes_tables_tensorboard_and_best_flagfile(hyperband_search):
    result = hyperband_search.result
    tune_dir = Path(result.tune_dir)
    with open(tune_dir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table] == [r.trial_id for r in result.rows]
    assert table[0]["rank"] == "1" and float(table[0]["val_macro_f1"]) == pytest.approx(
        result.best.score
    )
    assert {"learning_rate", "dropout", "backbone", "val_loss", "reason"} <= set(table[0])
    md = (tune_dir / "results.md").read_text()
    assert "| rank | trial_id | status | val_macro_f1 |" in md
    assert "learning_rate in [0.0001, 0.003] (log)" in md and "backbone = cnn_tiny" in md
    # TensorBoard: the HParams experiment at the logdir root, a session per trial.
    events = list((tune_dir / "trials").glob("events.out.tfevents.*"))
    assert events, "no HParams experiment summary"
    assert list((tune_dir / "trials" / "0004" / "logs").glob("events.out.tfevents.*"))
    assert list((tune_dir / "trials" / "0004" / "logs" / "validation").glob("events.*"))
    # The best trial as a flagfile of leukemia_tf.train's flags.
    best = result.best
    from leukemia_tf.training import config as config_lib

    parsed = config_lib.parse_flagfile(result.best_flagfile)
    assert parsed.learning_rate == pytest.approx(best.values["learning_rate"])
    assert parsed.dropout == pytest.approx(best.values["dropout"])
    assert parsed.monitor == "val_macro_f1" and parsed.model_dir == str(tune_dir / "best_model")
    parsed.validate()
    best_json = json.loads((tune_dir / "best_trial.json").read_text())
    assert best_json["trial_id"] == best.trial_id


def test_best_flagfile_trains(hyperband_search, tmp_path):
    from leukemia_tf.training import config as config_lib
    from leukemia_tf.training import train_lib

    parsed = config_lib.parse_flagfile(
        hyperband_search.result.best_flagfile, [f"--model_dir={tmp_path / 'run'}"]
    )
    out = train_lib.train(parsed)
    assert len(out.history) == parsed.epochs
    assert (tmp_path / "run" / "best.keras").exists()


def test_second_run_without_resume_is_refused(hyperband_search):
    message = hyperband_search.refused
    assert "is not empty" in message and "--resume" in message and "nothing was changed" in message


def test_interrupted_search_resumes(hyperband_search):
    # Killed after trial 3's first epoch; resumed, the trial continued its run.
    assert len(hyperband_search.interrupted_history) == 1
    tune_dir = hyperband_search.result.tune_dir

    history = rundir.read_history(os.path.join(tune_dir, "trials", "0003"))
    assert [r["epoch"] for r in history] == [0, 1]
    assert history[0] == hyperband_search.interrupted_history[0]
    assert _info(tune_dir, "0003")["status"] == "completed"
    # One HParams session per trial, also for the resumed and the continued one.
    for trial_id in ("0002", "0003"):
        sessions = list((Path(tune_dir) / "trials" / trial_id / "logs").glob("events.*"))
        assert len(sessions) == 1, trial_id
    # The search's own flagfile resumes it (same space): parse and compare.
    base, search = search_space.parse_flagfile(
        os.path.join(tune_dir, "flags.txt"), ["--resume", "--max_trials=9"]
    )
    from leukemia_tf.tuning import tune_lib

    tune_lib.prepare_tune_dir(base, search, search_space.check_search(search, base))  # no raise
    other = dataclasses.replace(search, learning_rate_range="1e-2")
    with pytest.raises(tune_lib.TuneDirError, match="search space of learning_rate"):
        tune_lib.prepare_tune_dir(base, other, search_space.check_search(other, base))


def test_memory_does_not_grow_from_trial_to_trial(hyperband_search):
    """RSS after each trial (6 trial runs in one process, clear_session + gc +
    the gradient-registry release between trials). Without the release the
    step graphs of every trial stay alive: +45 MB per trial here."""
    tune_dir = hyperband_search.result.tune_dir
    rss = [_info(tune_dir, f"000{i}")["rss_mb"] for i in range(5)]
    # From the second trial (after one-time imports and caches) to the last.
    assert rss[-1] - rss[1] < 75, f"RSS after each trial (MiB): {rss}"


# ------------------------------------------------------------------ failures
def test_failed_trials_are_recorded_and_the_search_goes_on(tmp_path, synthetic_data_dir):
    """A NaN loss (learning rate 1e12) and an invalid combination (a
    hierarchical head with native labels) both fail; the search runs on."""
    from leukemia_tf.tuning import tune_lib

    base = TrainConfig(data_dir=synthetic_data_dir, **TINY)
    search = search_space.SearchConfig(
        tune_dir=str(tmp_path / "t"),
        tuner="random",
        max_trials=3,
        heads="flat,hierarchical",
        learning_rate_range="1e12",
        dropout_range="0.1",
        **TUNE_FIXED,
    )
    result = tune_lib.run_search(base, search)
    # Only two combinations exist: the oracle stops after both ran and failed.
    assert [r.status for r in result.rows] == ["FAILED", "FAILED"]
    reasons = sorted(r.reason for r in result.rows)
    assert reasons[0].startswith("NaN loss: training loss became nan")
    assert reasons[1].startswith("invalid configuration: --head=hierarchical needs")
    assert result.best is None and result.best_flagfile is None
    md = Path(result.results_md).read_text()
    assert "NaN loss" in md and "invalid configuration" in md
    assert not (tmp_path / "t" / "best.flags").exists()


def test_too_many_consecutive_failures_stop_with_the_table_written(tmp_path, synthetic_data_dir):
    from leukemia_tf.tuning import tune_lib

    base = TrainConfig(data_dir=synthetic_data_dir, **TINY)
    search = search_space.SearchConfig(
        tune_dir=str(tmp_path / "t"),
        tuner="random",
        max_trials=5,
        heads="hierarchical",  # invalid with native labels: fails before training
        max_consecutive_failed_trials=2,
        **TUNE_FIXED,
    )
    with pytest.raises(tune_lib.SearchError, match="2 trials failed in a row"):
        tune_lib.run_search(base, search)
    table = (tmp_path / "t" / "results.md").read_text()
    assert table.count("invalid configuration") == 2


# ------------------------------------------------------------------ the rest
def test_hypermodel_builds_the_trial_model(synthetic_data_dir):
    import keras_tuner

    from leukemia_tf.tuning import tuner

    base = TrainConfig(data_dir=synthetic_data_dir, **TINY)
    search = search_space.SearchConfig(tune_dir="x", hidden_units_choices="0,32")
    hypermodel = tuner.LeukemiaHyperModel(
        base, search_space.check_search(search, base), "val_macro_f1"
    )
    hp = keras_tuner.HyperParameters()
    model = hypermodel.build(hp)
    assert set(hp.values) == {p.field for p in search_space.PARAMS}
    outputs = model(np.zeros([2, 32, 32, 3], np.float32))
    assert tuple(outputs["logits"].shape) == (2, 6)  # the synthetic set's 6 classes


def test_resume_needs_a_search(tmp_path, synthetic_data_dir):
    from leukemia_tf.tuning import tune_lib

    base = TrainConfig(data_dir=synthetic_data_dir, **TINY)
    search = search_space.SearchConfig(tune_dir=str(tmp_path / "none"), resume=True)
    with pytest.raises(tune_lib.TuneDirError, match="holds no search to resume"):
        tune_lib.prepare_tune_dir(base, search, search_space.check_search(search, base))


def test_cli_refuses_a_non_empty_tune_dir(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "leukemia_tf.tune",
            "--flagfile=configs/tune_smoke.flags",
            f"--tune_dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "is not empty" in proc.stderr and "--resume" in proc.stderr
    assert os.listdir(tmp_path) == ["old.txt"]


def test_retrain_best_on_train_and_validation_and_export(hyperband_search, tmp_path):
    from leukemia_tf.tuning import tune_lib

    tune_dir = hyperband_search.result.tune_dir
    config = tune_lib.retrain_config(tune_dir)
    assert config.train_split == "train+validation" and config.val_split == ""
    assert config.epochs == hyperband_search.result.best.best_epoch + 1
    train_result, export = tune_lib.retrain_best(tune_dir, str(tmp_path / "export"))
    assert train_result is not None and len(train_result.history) == config.epochs
    assert Path(export.path, "saved_model.pb").exists()


@pytest.mark.slow
def test_distributed_search_with_a_chief_and_two_workers(tmp_path, synthetic_data_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "tools/distributed_tune.py",
            f"--data_dir={synthetic_data_dir}",
            f"--tune_dir={tmp_path / 'tune'}",
            "--max_trials=4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trials run by workers: tuner0" in proc.stdout
