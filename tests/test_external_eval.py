"""Tests of ``evaluate --images``: labelled image folders and CSV files from outside
the model's data sets, scored with the split report's sections (tiny trained models)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukemia_tf.evaluation import external
from leukemia_tf.serving import predict_lib

REPO = Path(__file__).resolve().parents[1]

#: The labelled folder: {sub-folder (label): images}. The label map below renames
#: them onto the synthetic model's classes (normal, reactive, ALL, AML, CLL, CML).
FOLDER = {"neutro": 3, "Blast": 3, "junk": 2}
LABEL_MAP = {"neutro": "normal", "blast": "ALL", "junk": None}


def _pixels(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 250 / w, yy * 250 / h, np.full((h, w), 20.0 * (seed % 12))], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _write_images(folder: Path, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"cell{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(_pixels(32 + 4 * i, 40, seed + i)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("external") / "smears"
    for k, (label, n) in enumerate(FOLDER.items()):
        _write_images(root / label, n, seed=10 * k)
    return root


def _copy(model_dir: str, tmp_path: Path) -> Path:
    # The session fixtures are shared: never write into them.
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    return target


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_map(path: Path, mapping: dict) -> Path:
    path.write_text(json.dumps(mapping))
    return path


def _same_decisions(model_dir, images: str, report_dir: Path, tmp_path: Path) -> None:
    """``predict`` on the same images decides as the evaluation did, image by image."""
    output = tmp_path / "predict" / "predictions.csv"
    predict_lib.predict(model_dir, images, output, verbose=0)
    predicted = {r["file"]: r for r in _read_csv(output)}
    evaluated = _read_csv(report_dir / external.PREDICTIONS_FILE)
    assert evaluated
    for row in evaluated:
        other = predicted[row["file"]]
        assert row["predicted_class"] == other["predicted_class"], row["file"]
        assert row["probability"] == other["probability"]


# ------------------------------------------------------- hand-checked scores
def test_restricted_scores_hand_checked():
    # Classes a, b, c, d; the labels hold a and b only.
    probs = np.array(
        [
            [0.50, 0.10, 0.30, 0.10],  # true a: a (restricted a)
            [0.20, 0.10, 0.60, 0.10],  # true a: c (restricted a)
            [0.10, 0.30, 0.20, 0.40],  # true b: d (restricted b)
            [0.50, 0.40, 0.05, 0.05],  # true b: a (restricted a)
        ]
    )
    ev = types.SimpleNamespace(
        y_true=np.array([0, 0, 1, 1]),
        probs=probs,
        y_pred=probs.argmax(axis=1),
        class_names=["a", "b", "c", "d"],
    )
    assert external.restricted_decisions(probs, [0, 1]).tolist() == [0, 0, 1, 0]
    scores = external.restricted_scores(ev, None, n_resamples=50, seed=0)
    assert scores["classes"] == ["a", "b"]
    assert scores["accuracy"] == pytest.approx(0.75)
    assert scores["balanced_accuracy"] == pytest.approx((2 / 2 + 1 / 2) / 2)
    # F1 a: tp 2, fp 1, fn 0 -> 4/5; F1 b: tp 1, fp 0, fn 1 -> 2/3.
    assert scores["macro_f1"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert scores["n_changed"] == 2
    assert {"accuracy", "balanced_accuracy", "macro_f1"} <= set(scores["ci"])
    assert "macro_roc_auc" not in scores["ci"]


def test_labels_resolve_by_name_map_and_case():
    targets = external.Targets(["normal", "ALL", "AML"], "class", ["normal", "ALL", "AML"])
    assert external.resolve_labels(["Normal", "all", "ALL"], targets, None, "x") == {
        "Normal": "normal",
        "all": "ALL",
        "ALL": "ALL",
    }
    mapped = external.resolve_labels(
        ["neutro", "NEUTRO", "junk", "AML"], targets, {"neutro": "normal", "junk": None}, "x"
    )
    assert mapped == {"neutro": "normal", "NEUTRO": "normal", "junk": None, "AML": "AML"}
    ambiguous = external.Targets(["ab", "AB"], "class", ["ab", "AB"])
    with pytest.raises(external.LabelError, match="label 'Ab' of --images='x' is not a class"):
        external.resolve_labels(["Ab"], ambiguous, None, "x")


# ------------------------------------------------------------- end to end
def test_folder_with_label_map_end_to_end(trained_flat_model_dir, labelled_folder, tmp_path):
    from leukemia_tf.evaluation import evaluate_lib

    model_dir = _copy(trained_flat_model_dir, tmp_path)
    label_map = _write_map(tmp_path / "map.json", LABEL_MAP)
    result = evaluate_lib.evaluate_images(
        model_dir, str(labelled_folder), label_map=str(label_map), bootstrap=20, explain_samples=1
    )
    out_dir = model_dir / "eval_images_smears"
    assert Path(result["report_path"]) == out_dir / "report.md"
    on_disk = json.loads((out_dir / "metrics.json").read_text())
    ext = on_disk["external"]
    assert ext["source"] == str(labelled_folder) and ext["kind"] == "folder"
    assert ext["label_map"] == LABEL_MAP and ext["label_map_file"] == str(label_map)
    assert ext["labels"] == {
        "Blast": {"n": 3, "target": "ALL", "class": "ALL"},
        "junk": {"n": 2, "target": None, "class": None},
        "neutro": {"n": 3, "target": "normal", "class": "normal"},
    }
    assert (ext["n_images"], ext["n_evaluated"], ext["n_dropped"]) == (8, 6, 2)
    assert ext["dropped"] == {"junk": 2}
    assert ext["scored"]["headline"] == "class level"
    classes = on_disk["model"]["class_names"]
    assert sorted(ext["classes_absent"]) == sorted(set(classes) - {"normal", "ALL"})
    assert on_disk["cell"]["classes_absent"] == ext["classes_absent"]
    assert on_disk["data"]["n_examples"] == 6 and on_disk["data"]["n_excluded"] == 2
    assert on_disk["calibration"]["fitted_on"] == "validation"

    # Both scores recomputed from the per-image table.
    rows = _read_csv(out_dir / external.PREDICTIONS_FILE)
    assert len(rows) == 6 and {r["label"] for r in rows} == {"neutro", "Blast"}
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    truth = np.array([classes.index(r["target"]) for r in rows])
    present = sorted(set(truth.tolist()))
    restricted = np.array(present)[probs[:, present].argmax(axis=1)]
    assert [classes[c] for c in restricted] == [r["predicted_present"] for r in rows]
    assert ext["restricted_to_present"]["accuracy"] == pytest.approx((restricted == truth).mean())
    as_predicted = np.array([classes.index(r["predicted_class"]) for r in rows])
    assert ext["as_predicted"]["accuracy"] == pytest.approx((as_predicted == truth).mean())
    assert on_disk["cell"]["accuracy"] == pytest.approx((as_predicted == truth).mean())
    # A decision right over every class is right over the present ones.
    assert ext["restricted_to_present"]["accuracy"] >= ext["as_predicted"]["accuracy"]

    for path in on_disk["figures"].values():
        assert (out_dir / path).is_file()
    report = (out_dir / "report.md").read_text()
    for text in ("## Images", "Restricted", "*dropped (null)*", "## Headline (cell level)"):
        assert text in report, text
    assert any("2 images are not evaluated" in c for c in on_disk["caveats"])
    assert not (model_dir / "eval_test").exists()  # the split reports are left alone

    _same_decisions(trained_flat_model_dir, str(labelled_folder), out_dir, tmp_path)


def test_label_errors_name_the_problem(trained_flat_model_dir, labelled_folder, tmp_path):
    from leukemia_tf.evaluation import evaluate_lib

    out_dir = tmp_path / "report"
    with pytest.raises(external.LabelError) as caught:
        evaluate_lib.evaluate_images(trained_flat_model_dir, str(labelled_folder), out_dir=out_dir)
    message = str(caught.value)
    assert "labels 'Blast', 'junk', 'neutro'" in message
    assert str(labelled_folder) in message and "known: normal, reactive, ALL" in message
    assert "--label_map" in message and "\n" not in message

    wrong = _write_map(tmp_path / "wrong.json", {**LABEL_MAP, "neutro": "neutrophil"})
    with pytest.raises(external.LabelError, match=f"--label_map='{wrong}' maps 'neutro' to"):
        evaluate_lib.evaluate_images(
            trained_flat_model_dir, str(labelled_folder), label_map=str(wrong), out_dir=out_dir
        )
    partial = _write_map(tmp_path / "partial.json", {"neutro": "normal", "Blast": "ALL"})
    with pytest.raises(external.LabelError, match="label 'junk' of .* nor in --label_map"):
        evaluate_lib.evaluate_images(
            trained_flat_model_dir, str(labelled_folder), label_map=str(partial), out_dir=out_dir
        )
    loose = tmp_path / "loose"
    _write_images(loose, 1, seed=1)
    with pytest.raises(ValueError, match="directly in the folder"):
        evaluate_lib.evaluate_images(trained_flat_model_dir, str(loose), out_dir=out_dir)
    with pytest.raises(FileNotFoundError, match="no such folder or CSV file"):
        evaluate_lib.evaluate_images(trained_flat_model_dir, str(tmp_path / "nowhere"))
    assert not out_dir.exists()


def test_csv_with_slides_and_coarse_taxonomy_labels(trained_hierarchical_model_dir, tmp_path):
    from leukemia_tf.evaluation import evaluate_lib

    model_dir = _copy(trained_hierarchical_model_dir, tmp_path)
    # One label per slide: two classes, a node below a class (pre_b, under ALL)
    # and a node above the classes (leukemia, level 0).
    slides = {"s1": ("normal", 3), "s2": ("ALL", 3), "s3": ("leukemia", 2), "s4": ("pre_b", 2)}
    listing = tmp_path / "cells.csv"
    with open(listing, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "slide_id", "diagnosis"])
        for k, (slide, (label, n)) in enumerate(slides.items()):
            for path in _write_images(tmp_path / "cells" / slide, n, seed=5 * k):
                writer.writerow([path.relative_to(tmp_path).as_posix(), slide, label])
        writer.writerow(["cells/s1/cell0.jpg", "s1", ""])  # no label: left out, counted
    result = evaluate_lib.evaluate_images(
        model_dir, str(listing), label_column="diagnosis", bootstrap=20, explain_samples=0
    )
    out_dir = Path(result["out_dir"])
    assert out_dir == model_dir / "eval_images_cells"
    on_disk = json.loads((out_dir / "metrics.json").read_text())
    ext = on_disk["external"]
    assert ext["kind"] == "csv" and ext["label_column"] == "diagnosis"
    assert ext["targets"] == "taxonomy nodes of the model"
    assert (ext["n_images"], ext["n_unlabelled"], ext["n_evaluated"]) == (11, 1, 10)
    scored = ext["scored"]
    assert scored["headline"] == "taxonomy level 0"
    assert scored["class_level"] == {
        "n": 8,
        "targets": ["ALL", "normal", "pre_b"],
        "what": scored["class_level"]["what"],
    }
    assert scored["coarser_than_classes"]["targets"] == ["leukemia"]
    assert {label: e["class"] for label, e in ext["labels"].items()} == {
        "ALL": "ALL",
        "leukemia": None,
        "normal": "normal",
        "pre_b": "ALL",
    }
    head = scored["headline_scores"]
    levels = on_disk["levels"]["levels"]
    assert head["n"] == levels[0]["n"] == 10  # every image at level 0
    assert head["accuracy"] == levels[0]["greedy"]["accuracy"]
    assert levels[3]["n"] == 2  # pre_b reaches level 3
    # Class level: normal (3) and ALL (3 + 2 below it).
    counts = on_disk["data"]["class_counts"]
    assert counts["normal"] == 3 and counts["ALL"] == 5 and sum(counts.values()) == 8

    slide = on_disk["slide"]
    assert slide["available"] and slide["labelled"], slide.get("reason")
    assert {g["id"] for g in slide["groups"]} == {"s1", "s2", "s4"}
    assert "confusion_slide" in on_disk["figures"]
    assert on_disk["patient"]["available"] is False
    report = (out_dir / "report.md").read_text()
    assert "## Slide level" in report and "### Taxonomy level 0" in report

    _same_decisions(trained_hierarchical_model_dir, str(listing), out_dir, tmp_path)


def test_command_line(trained_flat_model_dir, labelled_folder, tmp_path):
    # A subprocess: leukemia_tf.evaluate defines absl flags that clash with
    # those of other binaries the tests import.
    model_dir = _copy(trained_flat_model_dir, tmp_path)
    label_map = tmp_path / "map.yaml"
    label_map.write_text("neutro: normal\nblast: ALL\njunk: null\n")
    command = [sys.executable, "-m", "leukemia_tf.evaluate", f"--model_dir={model_dir}"]
    both = subprocess.run(
        [*command, f"--images={labelled_folder}", "--split=test"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert both.returncode == 2
    assert "error: --images=" in both.stderr and "mutually exclusive" in both.stderr
    run = subprocess.run(
        [
            *command,
            f"--images={labelled_folder}",
            f"--label_map={label_map}",
            "--bootstrap=10",
            "--explain_samples=0",
            "--batch_size=4",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "6 of 8 images (2 dropped, 0 unreadable)" in run.stdout
    assert "restricted to the 2 classes present" in run.stdout
    assert f"Report: {model_dir / 'eval_images_smears' / 'report.md'}" in run.stdout


def test_adapt_bn_evaluates_an_adapted_copy_like_predict(
    trained_flat_model_dir, labelled_folder, tmp_path
):
    from leukemia_tf.evaluation import evaluate_lib

    model_dir = _copy(trained_flat_model_dir, tmp_path)
    label_map = _write_map(tmp_path / "map.json", LABEL_MAP)
    calibration = (
        (model_dir / "calibration.json").read_bytes()
        if (model_dir / "calibration.json").exists()
        else None
    )
    result = evaluate_lib.evaluate_images(
        model_dir,
        str(labelled_folder),
        label_map=str(label_map),
        bootstrap=0,
        explain_samples=0,
        adapt_bn="inputs",
    )
    out_dir = model_dir / "eval_images_smears_adabn"
    assert Path(result["report_path"]) == out_dir / "report.md"
    record = json.loads((out_dir / "metrics.json").read_text())["model"]["adapted_batchnorm"]
    assert record["adapted"] and record["count"] == 6 and record["layers"] > 0
    # The run's temperature is the trained model's: an adapted copy never rewrites it.
    after = (
        (model_dir / "calibration.json").read_bytes()
        if (model_dir / "calibration.json").exists()
        else None
    )
    assert after == calibration
    # predict adapting on the same six images decides the same way, image by image.
    kept = tmp_path / "kept"
    for row in _read_csv(out_dir / external.PREDICTIONS_FILE):
        target = kept / Path(row["file"]).parent.name / Path(row["file"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(row["file"], target)
    output = tmp_path / "predict" / "predictions.csv"
    predict_lib.predict(model_dir, str(kept), output, verbose=0, adapt_bn="inputs")

    def key(path):
        return Path(path).parent.name, Path(path).name

    predicted = {key(r["file"]): r for r in _read_csv(output)}
    evaluated = _read_csv(out_dir / external.PREDICTIONS_FILE)
    assert len(predicted) == len(evaluated) == 6
    for row in evaluated:
        other = predicted[key(row["file"])]
        assert row["predicted_class"] == other["predicted_class"]
        assert float(row["probability"]) == pytest.approx(float(other["probability"]), abs=1e-5)
    with pytest.raises(ValueError, match="--adapt_bn=inputs: a split"):
        evaluate_lib.evaluate(model_dir, split="test", adapt_bn="inputs")


def test_shipped_bccd_label_map_names_taxonomy_nodes():
    from leukemia_tf.taxonomy import Taxonomy

    mapping = external.read_label_map(
        Path(__file__).resolve().parents[1] / "configs" / "bccd_healthy.yaml"
    )
    assert set(mapping) == {"basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"}
    assert set(mapping.values()) == {"normal"} and "normal" in Taxonomy.load().nodes
