"""Tests of the evaluation's trust sections: ``selective``, ``hierarchy`` and ``ood``
(``python -m leukemia_tf.evaluate [--ood_images=...]``), on the tiny trained runs of
conftest.py (their trust statistics are fitted at the end of training)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukemia_tf.evaluation import trust_sections
from leukemia_tf.models import trust
from leukemia_tf.serving import predict_lib

REPO = Path(__file__).resolve().parents[1]

FIT_COMMAND = "python -m leukemia_tf.fit_trust --model_dir="


def _copy(model_dir: str, tmp_path: Path) -> Path:
    # The session fixtures are shared: never write into them.
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    return target


def _write_images(folder: Path, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.{'png' if i % 2 else 'jpg'}"
        pixels = rng.integers(0, 256, size=(24 + 4 * i, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _metrics(out_dir: Path) -> dict:
    return json.loads((out_dir / "metrics.json").read_text())


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


@pytest.fixture(scope="module")
def ood_folder(tmp_path_factory) -> Path:
    """4 noise images under junk/, 2 under normal/ (a class of the synthetic model), 1 broken."""
    root = tmp_path_factory.mktemp("ood") / "strangers"
    _write_images(root / "junk", 4, seed=1)
    _write_images(root / "Normal", 2, seed=2)
    (root / "junk" / "broken.png").write_bytes(b"this is not a png")
    return root


# ------------------------------------------------------------------- units
def test_ood_name_and_class_folders(tmp_path):
    assert trust_sections.ood_name("smears/bccd") == "bccd"
    assert trust_sections.ood_name("smears/bccd/") == "bccd"
    assert trust_sections.ood_name("smears/bccd/*.jpg") == "bccd"
    assert trust_sections.ood_name("smears/*/x/*.jpg") == "smears"
    assert trust_sections.ood_name("lists/junk.csv") == "junk"
    items = [
        predict_lib.InputImage(str(tmp_path / "a" / "LYMPHOCYTE" / "x.png")),
        predict_lib.InputImage(str(tmp_path / "a" / "lymphocyte" / "y.png")),
        predict_lib.InputImage(str(tmp_path / "lymphocyte.png")),  # a file name, not a folder
        predict_lib.InputImage(str(tmp_path / "b" / "z.png")),
    ]
    found = trust_sections.class_name_folders(items, ["lymphocyte", "b"])
    assert {(f["folder"], f["class"], f["n_images"]) for f in found} == {
        ("LYMPHOCYTE", "lymphocyte", 1),
        ("lymphocyte", "lymphocyte", 1),
        ("b", "b", 1),
    }


# ------------------------------------------------------------ end to end
def test_split_report_flat(trained_flat_model_dir, tmp_path):
    from leukemia_tf.evaluation import evaluate_lib

    model_dir = _copy(trained_flat_model_dir, tmp_path)
    result = evaluate_lib.evaluate(model_dir, split="test", bootstrap=0, explain_samples=0)
    out_dir = model_dir / "eval_test"
    on_disk = _metrics(out_dir)
    assert on_disk["selective"]["n"] == result["selective"]["n"]
    for key in ("selective", "hierarchy", "ood"):
        assert key in on_disk
    assert on_disk["ood"] is None

    selective = on_disk["selective"]
    cell_accuracy = on_disk["cell"]["accuracy"]
    assert selective["trust_fitted"] and selective["fit_command"] is None
    assert selective["n"] == on_disk["data"]["n_examples"]
    assert selective["accuracy"] == pytest.approx(cell_accuracy)
    assert list(selective["scores"]) == list(trust.SCORES)
    for name, row in selective["scores"].items():
        assert row["higher_is_trust"] == trust.HIGHER_IS_TRUST[name]
        # Full coverage: every cell answered, the cell accuracy.
        assert row["accuracy"] == pytest.approx(cell_accuracy)
        assert row["risk"] == pytest.approx(1 - cell_accuracy)
        assert row["curve"]["coverage"][-1] == pytest.approx(1.0)
        assert row["curve"]["risk"][-1] == pytest.approx(1 - cell_accuracy)
        assert set(row["at_coverage"]) == {"0.8", "0.9", "0.95"}
        for target, point in row["at_coverage"].items():
            assert point["coverage"] >= float(target) - 1e-9
        assert 0.0 <= row["aurc"] <= 1.0 and row["excess_aurc"] >= -1e-9
    aurcs = {k: v["aurc"] for k, v in selective["scores"].items()}
    assert selective["best_score"] == min(aurcs, key=aurcs.get)

    referral = selective["referral"]
    assert referral["available"] and referral["fitted_on"] == "validation"
    assert referral["score"] == "max_probability" and referral["target"] == "coverage"
    assert referral["n"] == selective["n"]
    assert referral["fraction_referred"] == pytest.approx(referral["n_referred"] / referral["n"])
    assert referral["coverage"] == pytest.approx(1 - referral["fraction_referred"])
    assert referral["full_coverage_risk"] == pytest.approx(1 - cell_accuracy)
    if referral["risk_ratio"] is not None:
        assert referral["risk_ratio"] == pytest.approx(
            referral["risk_accepted"] / referral["full_coverage_risk"]
        )
    # The synthetic set has slide and patient ids.
    for key in ("slide", "patient"):
        group = selective[key]
        assert group["available"], group.get("reason")
        assert group["n_groups"] == on_disk["data"][f"n_{key}s"]
        assert group["max_referred_fraction"] == referral["max_referred_fraction"]
        assert group["full_coverage_accuracy"] == pytest.approx(
            on_disk[key]["methods"]["mean_probability"]["accuracy"]
        )

    hierarchy = on_disk["hierarchy"]
    assert hierarchy["taxonomy"] is None and hierarchy["mistake_severity"] is None
    backoff = hierarchy["backoff"]
    assert backoff["tree"] == "classes" and backoff["levels"] == [on_disk["model"]["class_names"]]
    summary = backoff["summary"]
    assert summary["n"] == selective["n"]
    assert summary["n_answered"] + summary["abstained"] == summary["n"]
    curve = hierarchy["accuracy_specificity"]
    assert curve["fitted_on"] == "validation" and not curve["fitted_on_evaluated"]
    assert curve["curve"] and all(p["n"] == selective["n"] for p in curve["curve"])

    _assert_png(out_dir / on_disk["figures"]["risk_coverage"])
    report = (out_dir / "report.md").read_text()
    for text in (
        "## Knowing when not to answer",
        "### Referral",
        "### Mistakes and back-off",
        "Accuracy-specificity curve",
        "](risk_coverage.png)",
        f"Lowest AURC: **{selective['best_score']}**",
    ):
        assert text in report, text
    assert "### Out-of-distribution images" not in report


def test_validation_split_with_ood_images(trained_flat_model_dir, tmp_path, ood_folder, caplog):
    from leukemia_tf.evaluation import evaluate_lib

    model_dir = _copy(trained_flat_model_dir, tmp_path)
    caplog.set_level(logging.WARNING)
    evaluate_lib.evaluate(
        model_dir,
        split="validation",
        bootstrap=0,
        explain_samples=0,
        ood_images=str(ood_folder),
    )
    out_dir = model_dir / f"eval_validation_ood_{ood_folder.name}"
    on_disk = _metrics(out_dir)
    stats = trust.load(str(model_dir))

    # On the split it was fitted on, the referral refers about 1 - the target coverage.
    referral = on_disk["selective"]["referral"]
    assert referral["target_value"] == pytest.approx(0.9)
    n = referral["n"]
    assert referral["fraction_referred"] == pytest.approx(1 - 0.9, abs=2.0 / n + 1e-9)
    assert referral["coverage"] == pytest.approx(stats.selection["coverage"], abs=1.0 / n + 1e-9)
    curve = on_disk["hierarchy"]["accuracy_specificity"]
    assert curve["fitted_on_evaluated"] and "optimistic" in curve["note"]

    ood = on_disk["ood"]
    assert ood["source"] == str(ood_folder)
    assert ood["n_images"] == 7  # 4 + 2 readable, 1 broken
    assert ood["n_unreadable"] == 1 and ood["unreadable"][0][0].endswith("broken.png")
    assert ood["n_scored"] == 6
    assert set(ood["scores"]) == set(trust.SCORES)
    for row in ood["scores"].values():
        assert 0.0 <= row["auroc"] <= 1.0
        assert 0.0 <= row["fpr_at_95_tpr"] <= 1.0
        assert row["n_ood"] == 6 and row["n_id"] == on_disk["data"]["n_examples"]
    selected = ood["scores"][ood["selection_score"]]
    assert 0.0 <= selected["flagged_ood"] <= 1.0
    # The selection score alone flags part of what the referral refers; the
    # out-of-distribution gate refers the rest.
    assert selected["flagged_id"] <= referral["fraction_referred"] + 1e-9
    assert ood["id_fraction_referred"] == pytest.approx(referral["fraction_referred"])
    gate = ood["scores"][stats.selection["ood_score"]]
    assert 0.0 <= gate["flagged_ood"] <= 1.0
    assert ood["best_score"] in ood["scores"]
    # normal/ is a class of the model: warned, not refused.
    assert [(f["folder"], f["class"]) for f in ood["class_name_folders"]] == [("Normal", "normal")]
    assert any("'normal'" in w and "not out-of-distribution" in w for w in ood["warnings"])
    assert any("'Normal/'" in c for c in on_disk["caveats"])
    assert any("not out-of-distribution" in r.getMessage() for r in caplog.records)
    assert any("could not be read" in c for c in on_disk["caveats"])
    report = (out_dir / "report.md").read_text()
    assert "### Out-of-distribution images" in report and "broken.png" in report


def test_hierarchical_mistakes_and_backoff(trained_hierarchical_model_dir, tmp_path):
    from leukemia_tf.evaluation import evaluate_lib

    model_dir = _copy(trained_hierarchical_model_dir, tmp_path)
    out_dir = tmp_path / "report"
    evaluate_lib.evaluate(model_dir, split="test", out_dir=out_dir, bootstrap=0, explain_samples=0)
    on_disk = _metrics(out_dir)
    hierarchy = on_disk["hierarchy"]
    assert hierarchy["taxonomy"] is not None
    severity = hierarchy["mistake_severity"]
    n_errors = round((1 - on_disk["cell"]["accuracy"]) * on_disk["data"]["n_examples"])
    assert severity["n_errors"] == n_errors
    assert sum(severity["histogram"].values()) == n_errors
    if n_errors:
        assert 1.0 <= severity["mean_lca_height"] <= len(hierarchy["backoff"]["levels"])
    distance = hierarchy["hierarchical_distance"]
    assert set(distance) == {"at_1", "at_3"} and distance["at_1"] >= 0
    assert set(hierarchy["hierarchical_prf"]) == {"precision", "recall", "f1"}
    backoff = hierarchy["backoff"]
    assert backoff["tree"] == "taxonomy" and len(backoff["levels"]) == 4
    assert len(backoff["summary"]["answered_at_level"]) == 4
    assert len(backoff["fitted"]["thresholds"]) == 4
    assert hierarchy["accuracy_specificity"]["curve"]
    report = (out_dir / "report.md").read_text()
    assert "Mean LCA height of the errors" in report and "Answered to level 3" in report


def test_old_run_without_trust_gets_the_fit_command(trained_flat_model_dir, tmp_path):
    from leukemia_tf.evaluation import evaluate_lib

    model_dir = _copy(trained_flat_model_dir, tmp_path)
    for name in (trust.TRUST_FILE, trust.FEATURES_FILE):
        (model_dir / name).unlink()
    images = tmp_path / "labelled"
    _write_images(images / "normal", 3, seed=3)
    _write_images(images / "AML", 3, seed=4)
    evaluate_lib.evaluate_images(
        model_dir, str(images), bootstrap=0, explain_samples=0, fit_temperature=False
    )
    out_dir = model_dir / "eval_images_labelled"
    on_disk = _metrics(out_dir)
    selective = on_disk["selective"]
    assert not selective["trust_fitted"]
    assert list(selective["scores"]) == list(trust.LOGIT_SCORES)
    assert selective["accuracy"] == pytest.approx(on_disk["cell"]["accuracy"])
    for row in selective["scores"].values():
        assert row["accuracy"] == pytest.approx(on_disk["cell"]["accuracy"])
    assert not selective["referral"]["available"]
    command = f"{FIT_COMMAND}{model_dir}"
    assert selective["fit_command"] == command
    assert any(command in c for c in on_disk["caveats"])
    assert on_disk["hierarchy"]["backoff"]["summary"] is None
    # The curve needs no fitted statistics: thresholds fitted on validation here.
    assert on_disk["hierarchy"]["accuracy_specificity"]["curve"]
    assert command in (out_dir / "report.md").read_text()


def test_command_line_ood(trained_flat_model_dir, tmp_path, ood_folder):
    # A subprocess: leukemia_tf.evaluate defines absl flags that clash with other binaries'.
    model_dir = _copy(trained_flat_model_dir, tmp_path)
    images = tmp_path / "labelled"
    _write_images(images / "CLL", 3, seed=5)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "leukemia_tf.evaluate",
            f"--model_dir={model_dir}",
            f"--images={images}",
            f"--ood_images={ood_folder}/junk/*",
            "--bootstrap=0",
            "--explain_samples=0",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "max_probability: AURC" in run.stdout and "at 90% coverage" in run.stdout
    for name in trust.SCORES:
        assert f"    {name}: AUROC" in run.stdout, name
    out_dir = model_dir / "eval_images_labelled_ood_junk"
    ood = _metrics(out_dir)["ood"]
    assert ood["n_images"] == 5 and ood["n_unreadable"] == 1  # the glob takes broken.png too
    assert ood["class_name_folders"] == []
