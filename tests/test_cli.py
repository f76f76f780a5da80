"""The binaries' failure rule and console (leukemia_tf/cli.py).

A user error is ONE line ``error: <message>`` on stderr and exit status 2,
found before anything is written; a bug keeps its traceback. Binaries run in
subprocesses (absl parses flags once per process), from an empty working
directory, so that anything they create is seen.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import one_error_line, run_module

from leukemia_tf import cli
from leukemia_tf.training import config as config_lib

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.flags"


def _run(
    args: list[str], cwd: Path, module: str = "leukemia_tf.train"
) -> subprocess.CompletedProcess:
    return run_module(module, *args, cwd=cwd)


def _train(tmp_path: Path, *flags: str, data_dir: str) -> tuple[str, Path]:
    """Runs the quickstart recipe with ``flags``; returns its error line and its model_dir."""
    work = tmp_path / "cwd"
    work.mkdir()
    model_dir = tmp_path / "run"
    proc = _run(
        [f"--flagfile={QUICKSTART}", f"--model_dir={model_dir}", f"--data_dir={data_dir}", *flags],
        cwd=work,
    )
    line = one_error_line(proc)
    assert os.listdir(work) == [], "a refused run wrote into the working directory"
    return line, model_dir


# ------------------------------------------------------------ train: flags
def test_unknown_backbone_lists_the_backbones(tmp_path):
    line, model_dir = _train(tmp_path, "--backbone=resnet9000", data_dir=str(tmp_path / "tfds"))
    assert line.startswith("error: --backbone='resnet9000' is not a backbone; choose one of")
    for name in ("cnn_small", "efficientnetv2_b0", "convnext_tiny", "vit_small_patch16"):
        assert name in line
    assert not model_dir.exists() and not (tmp_path / "tfds").exists()


def test_backbone_typo_puts_the_closest_names_first():
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.TrainConfig(model_dir="x", backbone="efficientnetv2_b9").validate()
    choices = str(info.value).split("(closest first): ")[1].split(", ")
    assert choices[0].startswith("efficientnetv2_b") and "cnn_small" in choices[5:]


def test_unknown_data_set_names_a_handful_of_close_ones(tmp_path):
    line, model_dir = _train(
        tmp_path, "--datasets=leukmia_synthetic", data_dir=str(tmp_path / "tfds")
    )
    assert line.startswith("error: --datasets='leukmia_synthetic': unknown data set")
    assert "closest: leukemia_synthetic" in line
    assert "this package's builders: all_taleqani, pbc," in line
    assert len(line) < 500, "every TFDS name listed"  # today: 517 lines of them
    assert not model_dir.exists() and not (tmp_path / "tfds").exists()


def test_unknown_split_lists_the_splits(tmp_path, synthetic_data_dir):
    before = sorted(os.listdir(synthetic_data_dir))
    line, model_dir = _train(tmp_path, "--train_split=trian", data_dir=synthetic_data_dir)
    assert line == (
        "error: --train_split='trian': data set 'leukemia_synthetic' has no split 'trian'; "
        "choose one of (closest first): train, validation, test"
    )
    assert not model_dir.exists()
    assert sorted(os.listdir(synthetic_data_dir)) == before


def test_finished_model_dir_is_refused_before_anything_is_written(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "train_summary.json").write_text("{}\n")
    work = tmp_path / "cwd"
    work.mkdir()
    proc = _run(
        [f"--flagfile={QUICKSTART}", f"--model_dir={model_dir}", f"--data_dir={tmp_path / 'd'}"],
        cwd=work,
    )
    line = one_error_line(proc)
    assert line == (
        f"error: --model_dir='{model_dir}' holds a finished run (train_summary.json); choose "
        "another directory or pass --overwrite to start afresh"
    )
    assert os.listdir(model_dir) == ["train_summary.json"]
    assert os.listdir(work) == [] and not (tmp_path / "d").exists()


def test_flag_parsing_errors_take_the_same_form(tmp_path):
    proc = _run([f"--flagfile={QUICKSTART}", "--precision=fp8"], cwd=tmp_path)
    assert one_error_line(proc) == (
        "error: flag --precision=fp8: value should be one of "
        "<auto|float32|mixed_float16|mixed_bfloat16>"
    )
    proc = _run(["--model_dir=x", "stray"], cwd=tmp_path, module="leukemia_tf.evaluate")
    assert "unexpected arguments ['stray']" in one_error_line(proc)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------ the wrapper
_SCRIPT = textwrap.dedent(
    """
    from leukemia_tf import cli

    def main(argv):
        what = WHAT
        if what == "user":
            raise cli.UserError("--x='y': bad\\n  over two lines")
        if what == "partial":
            raise cli.UserError("3 files unreadable", exit_code=1)
        if what == "bug":
            raise RuntimeError("a real bug")
        return 0

    cli.run(main)
    """
)


def _run_script(what: str) -> subprocess.CompletedProcess:
    # --log_level=info: the wrapper then skips its quiet TensorFlow import (faster).
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT.replace("WHAT", repr(what)), "--log_level=info"],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "what, status, stderr",
    [
        ("user", 2, "error: --x='y': bad over two lines\n"),
        ("partial", 1, "error: 3 files unreadable\n"),
        ("ok", 0, ""),
    ],
)
def test_user_errors_are_one_line(tmp_path, what, status, stderr):
    proc = _run_script(what)
    assert (proc.returncode, proc.stderr) == (status, stderr)


def test_bugs_keep_their_traceback():
    proc = _run_script("bug")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: a real bug" in proc.stderr


def test_log_level_is_read_before_flags_are_parsed(tmp_path):
    flagfile = tmp_path / "a.flags"
    flagfile.write_text("--epochs=2\n--log_level=info\n")
    assert cli._requested_log_level(["prog"]) == "warning"
    assert cli._requested_log_level(["prog", f"--flagfile={flagfile}"]) == "info"
    assert cli._requested_log_level(["prog", f"--flagfile={flagfile}", "--log_level=error"]) == (
        "error"
    )
    assert cli._requested_log_level(["prog", "--log_level", "debug"]) == "debug"


def test_closest_first():
    assert cli.closest_first("trian", ["test", "train", "validation"]) == [
        "train",
        "test",
        "validation",
    ]
    assert cli.closest_first("zzz", ["b", "a"]) == ["b", "a"]
    assert cli.one_line("a\n  b\n\nc") == "a b c"
