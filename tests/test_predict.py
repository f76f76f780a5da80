"""Tests of batch prediction (``leukemia_tf.predict``): cell CSV, errors, slide CSV."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import bad_image_bytes
import numpy as np
import pytest
from PIL import Image

from leukemia_tf import rundir
from leukemia_tf.data import images as images_lib
from leukemia_tf.data import preprocessing
from leukemia_tf.serving import predict_lib

GOOD = ("a.png", "b.jpg", "sub/c.bmp", "sub/d16.tif", "e_rgba.png", "f.jpg")
BAD = {
    "empty.png": "empty file",
    "truncated.jpg": "corrupt or truncated",
    "sub/fake.jpg": "not a recognised image format",
}


def _pixels(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 250 / w, yy * 250 / h, np.full((h, w), 30.0 * seed)], -1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Six readable images (PNG, JPEG, BMP, 16-bit TIFF, RGBA), three unreadable, one non-image."""
    root = tmp_path_factory.mktemp("predict_images") / "cells"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(_pixels(30, 40, 1)).save(root / "a.png")
    Image.fromarray(_pixels(64, 64, 2)).save(root / "b.jpg", quality=92)
    Image.fromarray(_pixels(20, 20, 3)).save(root / "sub" / "c.bmp")
    gray16 = (_pixels(36, 28, 4)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(root / "sub" / "d16.tif")
    rgba = np.concatenate([_pixels(32, 32, 5), np.full((32, 32, 1), 200, np.uint8)], -1)
    Image.fromarray(rgba).save(root / "e_rgba.png")
    Image.fromarray(_pixels(90, 120, 6)).save(root / "f.jpg")
    (root / "empty.png").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.fromarray(_pixels(64, 64, 7)).save(jpeg, format="JPEG")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[:400])
    (root / "sub" / "fake.jpg").write_text("this is not an image")
    (root / "notes.txt").write_text("not an image extension: ignored in a folder input")
    return root


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _expected_probabilities(model_dir, paths, tta=False) -> tuple[np.ndarray, list[str]]:
    """The Keras model on the files, read and resized as the input pipeline does."""
    trained = rundir.load_trained_model(model_dir, tta=tta)
    pixels = np.stack(
        [
            preprocessing.decode_and_resize(images_lib.read_image(p)[0], trained.image_size).numpy()
            for p in paths
        ]
    )
    return trained.probabilities(trained.outputs(pixels)), trained.class_names


def test_folder_predictions_and_errors(trained_flat_model_dir, image_folder, tmp_path):
    output = tmp_path / "out" / "predictions.csv"
    result = predict_lib.predict(
        trained_flat_model_dir, str(image_folder), output, batch_size=2, verbose=0
    )
    assert (result.num_images, result.num_predicted, result.num_failed) == (9, 6, 3)
    assert result.group_files == {}

    rows = _read_csv(output)
    good = sorted(str(image_folder / name) for name in GOOD)
    assert [r["file"] for r in rows] == good
    probs, class_names = _expected_probabilities(trained_flat_model_dir, good)
    assert list(rows[0]) == [
        "file",
        "predicted_class",
        "probability",
        *(f"prob_{c}" for c in class_names),
        # The trust outputs (leukemia_tf.models.trust), fitted at the end of training.
        "max_probability",
        "margin",
        "energy",
        "mahalanobis",
        "knn_distance",
        "out_of_distribution",
        "referred",
        "predicted_node",
    ]
    got = np.array([[float(r[f"prob_{c}"]) for c in class_names] for r in rows])
    np.testing.assert_allclose(got, probs, atol=2e-6)
    for row, p in zip(rows, probs, strict=True):
        top = int(np.argmax(p))
        assert float(row["probability"]) == pytest.approx(p[top], abs=2e-6)
        if np.sort(p)[-1] - np.sort(p)[-2] > 1e-4:
            assert row["predicted_class"] == class_names[top]

    errors = _read_csv(result.errors_file)
    assert result.errors_file == str(output.parent / "predictions_errors.csv")
    assert {r["file"]: r["error"] for r in errors}.keys() == {str(image_folder / n) for n in BAD}
    for row in errors:
        name = Path(row["file"]).relative_to(image_folder).as_posix()
        assert BAD[name] in row["error"], row
    assert "FAILED: 3 image(s)" in predict_lib.summary(result)


def test_tta_predictions(trained_flat_model_dir, image_folder, tmp_path):
    output = tmp_path / "tta.csv"
    predict_lib.predict(trained_flat_model_dir, str(image_folder), output, verbose=0, tta=True)
    rows = _read_csv(output)
    good = sorted(str(image_folder / name) for name in GOOD)
    probs, class_names = _expected_probabilities(trained_flat_model_dir, good, tta=True)
    got = np.array([[float(r[f"prob_{c}"]) for c in class_names] for r in rows])
    np.testing.assert_allclose(got, probs, atol=2e-6)
    single, _ = _expected_probabilities(trained_flat_model_dir, good)
    assert not np.allclose(got, single, atol=1e-4)


def test_csv_input_with_slides_hierarchical(trained_hierarchical_model_dir, image_folder, tmp_path):
    listing = tmp_path / "cells.csv"
    # Paths relative to the CSV; s2 has one readable and one unreadable cell;
    # one row has no slide id (kept per cell, left out of the slides).
    entries = [
        ("cells/a.png", "s1", "p1"),
        ("cells/b.jpg", "s1", "p1"),
        ("cells/sub/c.bmp", "s1", "p1"),
        ("cells/f.jpg", "s2", "p1"),
        ("cells/truncated.jpg", "s2", "p1"),
        ("cells/e_rgba.png", "s3", "p2"),
        ("cells/sub/d16.tif", "", "p2"),
        ("", "s3", "p2"),
    ]
    folder = tmp_path / "cells"
    folder.symlink_to(image_folder, target_is_directory=True)
    with open(listing, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "slide_id", "patient_id", "label"])
        writer.writerows([(*e, "ALL") for e in entries])

    result = predict_lib.predict(
        trained_hierarchical_model_dir, str(listing), tmp_path / "p.csv", verbose=0
    )
    assert (result.num_images, result.num_predicted, result.num_failed) == (8, 6, 2)
    assert set(result.group_files) == {"slide_id", "patient_id"}
    assert result.group_files["slide_id"] == str(tmp_path / "p_slides.csv")

    rows = _read_csv(tmp_path / "p.csv")
    trained = rundir.load_trained_model(trained_hierarchical_model_dir)
    taxonomy, classes = trained.taxonomy, trained.class_names
    assert [r["slide_id"] for r in rows] == ["s1", "s1", "s1", "s2", "s3", ""]
    for row in rows:
        chain = [row[f"level_{k}_decision"] for k in range(taxonomy.num_levels)]
        decided = [n for n in chain if n]
        assert decided and chain[: len(decided)] == decided, chain  # "" only below the decision
        assert tuple(decided) == taxonomy.path(decided[-1])  # each is a child of the one above
        assert not taxonomy.children(decided[-1])  # it stops at a leaf
        assert 0 < float(row[f"level_{len(decided) - 1}_probability"]) <= 1
    errors = {r["file"]: r for r in _read_csv(tmp_path / "p_errors.csv")}
    assert errors[str(folder / "truncated.jpg")]["slide_id"] == "s2"
    assert "empty 'path' in line 9" in errors[f"{listing}:9"]["error"]

    # The slide table, recomputed by hand from the cell table.
    slides = {r["slide_id"]: r for r in _read_csv(tmp_path / "p_slides.csv")}
    assert list(slides) == ["s1", "s2", "s3"]
    assert {s: int(r["n_failed"]) for s, r in slides.items()} == {"s1": 0, "s2": 1, "s3": 1}
    for slide, row in slides.items():
        cells = [r for r in rows if r["slide_id"] == slide]
        probs = np.array([[float(c[f"prob_{n}"]) for n in classes] for c in cells])
        assert int(row["n_cells"]) == len(cells)
        mean = probs.mean(axis=0)
        np.testing.assert_allclose([float(row[f"mean_prob_{n}"]) for n in classes], mean, atol=2e-6)
        votes = np.bincount(probs.argmax(axis=1), minlength=len(classes))
        assert [int(row[f"votes_{n}"]) for n in classes] == votes.tolist()
        tied = np.flatnonzero(votes == votes.max())
        assert row["majority_prediction"] == classes[tied[np.argmax(mean[tied])]]
        assert int(row["majority_votes"]) == votes.max()
        assert row["mean_prediction"] == classes[int(np.argmax(mean))]
    patients = {r["patient_id"]: r for r in _read_csv(tmp_path / "p_patients.csv")}
    assert {p: int(r["n_cells"]) for p, r in patients.items()} == {"p1": 4, "p2": 2}


def test_bad_arguments_name_the_problem(trained_flat_model_dir, image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="--images='/nope/cells': no such file or folder"):
        predict_lib.collect_inputs("/nope/cells")
    with pytest.raises(FileNotFoundError, match="no image files found"):
        predict_lib.collect_inputs(str(image_folder / "*.gif"))
    found, _ = predict_lib.collect_inputs(str(image_folder / "**" / "*.jpg"))
    assert sorted(Path(i.path).name for i in found) == [
        "b.jpg",
        "f.jpg",
        "fake.jpg",
        "truncated.jpg",
    ]
    with pytest.raises(ValueError, match="--slide_column='slide' needs a CSV input"):
        predict_lib.collect_inputs(str(image_folder), slide_column="slide")
    listing = tmp_path / "list.csv"
    listing.write_text("file,slide\nx.png,s1\n")
    with pytest.raises(ValueError, match=r"no 'path' column .*columns: file, slide.*--path_column"):
        predict_lib.collect_inputs(str(listing))
    with pytest.raises(ValueError, match="--slide_column='slide_id': no such column"):
        predict_lib.collect_inputs(str(listing), path_column="file", slide_column="slide_id")
    found, groups = predict_lib.collect_inputs(
        str(listing), path_column="file", slide_column="slide"
    )
    assert groups == ["slide"] and found[0].path == str(tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="calibration.json not found"):
        predict_lib.predict(trained_flat_model_dir, str(image_folder), apply_temperature=True)
    with pytest.raises(ValueError, match="--batch_size=0"):
        predict_lib.predict(trained_flat_model_dir, str(image_folder), batch_size=0)


def test_command_line_reports_failures_in_exit_status(
    trained_flat_model_dir, image_folder, tmp_path
):
    output = tmp_path / "cli" / "predictions.csv"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "leukemia_tf.predict",
            f"--model_dir={trained_flat_model_dir}",
            f"--images={image_folder}",
            f"--output={output}",
            "--batch_size=4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert "FAILED: 3 image(s) could not be read" in run.stderr
    assert str(image_folder / "truncated.jpg") in run.stderr
    assert "9/9" in run.stdout  # the progress bar reached the end
    assert (
        len(_read_csv(output)) == 6
        and len(_read_csv(tmp_path / "cli" / "predictions_errors.csv")) == 3
    )


def test_cut_short_and_too_large_images_are_listed_with_their_reason(
    trained_flat_model_dir, tmp_path
):
    folder = tmp_path / "cells"
    folder.mkdir()
    Image.fromarray(_pixels(48, 40, 1)).save(folder / "good.jpg", quality=92)
    bad = {
        "cut.jpg": (
            bad_image_bytes.jpeg_cut_short(bad_image_bytes.jpeg(96, 80)),
            images_lib.JPEG_CUT_SHORT,
        ),
        "huge.jpg": (
            bad_image_bytes.jpeg_claiming(65000, 65000),
            images_lib.too_large_reason(65000, 65000),
        ),
        "huge.png": (
            bad_image_bytes.png_claiming(30000, 30000),
            images_lib.too_large_reason(30000, 30000),
        ),
    }
    for name, (content, _) in bad.items():
        (folder / name).write_bytes(content)
    output = tmp_path / "out" / "predictions.csv"
    result = predict_lib.predict(trained_flat_model_dir, str(folder), output, verbose=0)
    assert (result.num_images, result.num_predicted, result.num_failed) == (4, 1, 3)
    assert [Path(r["file"]).name for r in _read_csv(output)] == ["good.jpg"]
    errors = {Path(r["file"]).name: r["error"] for r in _read_csv(result.errors_file)}
    assert errors == {name: reason for name, (_, reason) in bad.items()}
    assert sorted(Path(p).name for p, _ in result.failures) == sorted(bad)
    summary = predict_lib.summary(result)
    assert "FAILED: 3 image(s) could not be read" in summary
    assert str(folder / "huge.jpg") in summary


def _tree_digest(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


#: Predictions of a model adapted twice, independently (see the test).
ADAPTED_ATOL = 1e-5


def test_adapt_bn_predicts_with_an_adapted_copy(trained_flat_model_dir, image_folder, tmp_path):
    from leukemia_tf.models import adapt

    run_before = _tree_digest(trained_flat_model_dir)
    good = sorted(str(image_folder / name) for name in GOOD)
    trained = rundir.load_trained_model(trained_flat_model_dir)

    def read(paths) -> np.ndarray:
        return np.stack(
            [
                preprocessing.decode_and_resize(images_lib.read_image(p)[0], 32).numpy()
                for p in paths
            ]
        )

    def expected(target_paths) -> np.ndarray:
        """The inputs' probabilities from the model adapted on ``target_paths``."""
        model = adapt.adapt_batchnorm(trained.model, read(target_paths)).model
        return trained.label_space.probabilities(model(read(good), training=False)).numpy()

    def got(path) -> np.ndarray:
        rows = _read_csv(path)
        assert [r["file"] for r in rows] == good
        return np.array([[float(r[f"prob_{c}"]) for c in trained.class_names] for r in rows])

    # Transductive: the statistics of the six readable inputs (the three bad ones left out).
    output = tmp_path / "inputs" / "predictions.csv"
    result = predict_lib.predict(
        trained_flat_model_dir, str(image_folder), output, verbose=0, adapt_bn="inputs"
    )
    n_bn = len(adapt.batchnorm_layers(trained.model))
    assert (result.num_predicted, result.num_failed) == (6, 3)
    assert result.adaptation["count"] == 6 and result.adaptation["layers"] == n_bn
    assert result.adaptation["images"] == f"inputs ({image_folder})"
    record = rundir.read_json(result.adaptation_file)["adapted_batchnorm"]
    assert record["count"] == 6 and record["date"]
    assert result.adaptation_file == str(output.parent / "predictions_adaptation.json")
    assert "from an ADAPTED copy of the model" in predict_lib.summary(result)
    adapted = got(output)
    # Two separate passes re-estimate the statistics (float32 sums in another
    # order): they agree to ~2e-6, beyond the CSV's 6 decimals, so allow 1e-5.
    np.testing.assert_allclose(adapted, expected(good), atol=ADAPTED_ATOL)
    plain, _ = _expected_probabilities(trained_flat_model_dir, good)
    assert not np.allclose(adapted, plain, atol=1e-4)

    # A folder of target images: two of them, copied elsewhere.
    target = tmp_path / "lab2"
    target.mkdir()
    for name in ("a.png", "f.jpg"):
        (target / name).write_bytes((image_folder / name).read_bytes())
    result = predict_lib.predict(
        trained_flat_model_dir, str(image_folder), output, verbose=0, adapt_bn=str(target)
    )
    assert result.adaptation["count"] == 2 and result.adaptation["images"] == str(target)
    np.testing.assert_allclose(
        got(output), expected([str(target / "a.png"), str(target / "f.jpg")]), atol=ADAPTED_ATOL
    )

    # Off again: the record of the earlier adapted run goes with it.
    result = predict_lib.predict(trained_flat_model_dir, str(image_folder), output, verbose=0)
    assert result.adaptation is None and result.adaptation_file is None
    assert not (output.parent / "predictions_adaptation.json").exists()
    assert "ADAPTED" not in predict_lib.summary(result)
    np.testing.assert_allclose(got(output), plain, atol=2e-6)

    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        predict_lib.predict(trained_flat_model_dir, str(image_folder), output, adapt_bn="/nope")
    assert _tree_digest(trained_flat_model_dir) == run_before
