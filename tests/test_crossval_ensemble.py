"""Fold ensembles: the fold models of a cross-validation averaged as one model (crossval --ensemble)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import one_error_line, run_module, tiny_train_config

from leukemia_tf.data import folds as folds_lib

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------- the layer
def _random_classifiers(head: str, taxonomy, count: int = 2):
    import keras

    from leukemia_tf.models import classifier

    models = []
    for seed in range(count):
        keras.utils.set_random_seed(seed)
        models.append(
            classifier.build_classifier(
                backbone="cnn_tiny",
                head=head,
                num_classes=4 if head == "flat" else None,
                taxonomy=taxonomy,
                image_size=32,
            )
        )
    return models


@pytest.mark.parametrize("head", ["flat", "hierarchical"])
def test_ensemble_outputs_are_the_mean_probabilities_and_reload(tmp_path, head):
    import keras

    from leukemia_tf.models import ensemble, trust
    from leukemia_tf.models.label_space import LabelSpace
    from leukemia_tf.taxonomy import Taxonomy

    taxonomy = Taxonomy.load() if head == "hierarchical" else None
    names = ["a", "b", "c", "d"] if head == "flat" else list(taxonomy.leaves)
    space = LabelSpace(names, head, taxonomy)
    models = _random_classifiers(head, taxonomy)
    pixels = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    singles = [model(pixels, training=False) for model in models]
    model = ensemble.build_ensemble(models, head, names, taxonomy)
    outputs = model(pixels, training=False)
    assert sorted(outputs) == sorted(singles[0])

    want = np.mean([space.probabilities(o).numpy() for o in singles], axis=0)
    np.testing.assert_allclose(space.probabilities(outputs).numpy(), want, atol=1e-5)
    if head == "hierarchical":  # every level's node marginals, not only the classes
        levels = space.level_probabilities(outputs)
        for key, got in levels.items():
            mean = np.mean([space.level_probabilities(o)[key].numpy() for o in singles], axis=0)
            np.testing.assert_allclose(got.numpy(), mean, atol=1e-5)
    # The energy is the fold models' mean energy, not a constant.
    energies = [trust.logit_scores(o, space)["energy"].numpy() for o in singles]
    np.testing.assert_allclose(
        trust.logit_scores(outputs, space)["energy"].numpy(), np.mean(energies, 0), atol=1e-4
    )
    # A temperature is a power of the mean probabilities, renormalised.
    if head == "flat":
        scaled = want**0.5 / (want**0.5).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(space.probabilities(outputs, 2.0).numpy(), scaled, atol=1e-5)
    with pytest.raises(ValueError, match="fold ensemble has no single feature space"):
        trust.with_features(model)

    if head == "hierarchical":  # its config round trip (the taxonomy as JSON) is enough
        layer = ensemble.ensemble_layer(model)
        config = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
        again = keras.saving.deserialize_keras_object(config)(singles)
        for key in outputs:
            np.testing.assert_allclose(again[key].numpy(), outputs[key].numpy(), atol=1e-6)
        return
    path = str(tmp_path / "ensemble.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert ensemble.is_ensemble(reloaded)
    assert [m.name for m in ensemble.member_models(reloaded)] == ["fold_0", "fold_1"]
    again = reloaded(pixels, training=False)
    for key in outputs:
        np.testing.assert_allclose(again[key].numpy(), outputs[key].numpy(), atol=1e-6)


def test_probabilities_that_underflow_stay_finite():
    from leukemia_tf.models import ensemble
    from leukemia_tf.models.label_space import LabelSpace
    from leukemia_tf.taxonomy import Taxonomy

    taxonomy = Taxonomy.load()
    layer = ensemble.MeanProbability("hierarchical", list(taxonomy.leaves), taxonomy)
    # A top-level node with probability 0 in every model: its children's group is all zeros.
    outputs = [
        {
            f"level_{k}": tf.constant(np.where(np.arange(len(nodes)) == 0, 0.0, -1e4)[None])
            for k, nodes in enumerate(taxonomy.levels)
        }
        for _ in range(2)
    ]
    combined = layer(outputs)
    assert all(np.isfinite(v.numpy()).all() for v in combined.values())
    space = LabelSpace(list(taxonomy.leaves), "hierarchical", taxonomy)
    probs = space.probabilities(combined).numpy()
    assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def cv_dir(tmp_path_factory, synthetic_data_dir) -> str:
    """A 2-fold cross-validation of the tiny recipe (cnn_tiny, 32 px), both folds trained."""
    from leukemia_tf import crossval_lib
    from leukemia_tf.training import train_lib

    root = tmp_path_factory.mktemp("cv_ensemble")
    config = tiny_train_config(synthetic_data_dir, root / "cv", steps_per_epoch=2, verbose=0)
    crossval_lib.prepare_folds(config, num_folds=2)
    for fold in (0, 1):  # as crossval_lib.run, without the trust statistics (unused here)
        train_lib.train(crossval_lib.fold_config(config, config.model_dir, fold), fit_trust=False)
    return config.model_dir


def _mean_of_folds(folds, pixels: np.ndarray) -> np.ndarray:
    """The mean of the fold models' probabilities on ``pixels``."""
    return np.mean([t.probabilities(t.outputs(pixels)) for t in folds], axis=0)


def test_ensemble_scores_and_serves_like_any_run(cv_dir, synthetic_data_dir, tmp_path):
    from leukemia_tf import crossval_lib, rundir
    from leukemia_tf.evaluation import evaluate_lib
    from leukemia_tf.serving import export_lib, predict_lib

    result = crossval_lib.ensemble(cv_dir, batch_size=32)
    target = Path(cv_dir, "ensemble")
    assert result["folds"] == [0, 1] and not result["not_finished_left_out"]
    assert result["held_out"] and result["max_abs_difference_from_mean"] < 1e-5
    assert [row["fold"] for row in result["per_fold"]] == [0, 1]
    assert result["single_models"]["accuracy"]["n"] == 2
    saved = json.loads(Path(cv_dir, "ensemble_metrics.json").read_text())
    assert saved["ensemble"]["macro_f1"] == pytest.approx(result["ensemble"]["macro_f1"])
    report = Path(cv_dir, "ensemble_report.md").read_text()
    assert "mean of the fold models' class probabilities" in report
    assert "| **ensemble** |" in report and "| fold_1 |" in report
    record = json.loads((target / "ensemble.json").read_text())
    assert record["kind"] == "fold_ensemble" and record["folds"] == [0, 1]
    assert set(record["fold_models"]) == {"fold_0", "fold_1"}

    # A run directory: the ensemble's probabilities are the mean of the folds' on any image.
    trained = rundir.load_trained_model(str(target))
    assert trained.ensemble["folds"] == [0, 1] and trained.trust is None
    assert trained.config.train_split == "train+validation"
    assert trained.config.model_dir == str(target)
    folds = [
        rundir.load_trained_model(crossval_lib.fold_dir(cv_dir, i), trust=False) for i in (0, 1)
    ]
    pixels = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    np.testing.assert_allclose(
        trained.probabilities(trained.outputs(pixels)), _mean_of_folds(folds, pixels), atol=1e-5
    )

    # evaluate: the same score as the ensemble's row; the temperature fitted on a split the
    # fold models trained on is not stored.
    evaluated = evaluate_lib.evaluate(str(target), "test", bootstrap=0, explain_samples=1)
    assert evaluated["cell"]["accuracy"] == pytest.approx(result["ensemble"]["accuracy"])
    assert evaluated["model"]["ensemble"]["folds"] == [0, 1]
    assert evaluated["calibration"]["stored"] is False
    assert evaluated["explanations"]["method"] is None
    assert "fold ensemble" in evaluated["explanations"]["note"]
    assert not evaluated["selective"]["trust_fitted"]
    assert evaluated["selective"]["fit_command"] is None
    eval_report = Path(evaluated["report_path"]).read_text()
    assert "Fold ensemble" in eval_report and "fit_trust" not in eval_report

    # predict
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i, image in enumerate(pixels[:3]):
        Image.fromarray(image).save(images / f"cell_{i}.png")
    output = tmp_path / "predictions.csv"
    predicted = predict_lib.predict(str(target), str(images), output, verbose=0)
    assert predicted.num_predicted == 3
    header = output.read_text().splitlines()[0]
    assert "energy" in header and "mahalanobis" not in header

    # export, then reload the SavedModel: one prediction equals the Keras ensemble's.
    exported = export_lib.export_model(
        str(target), tmp_path / "export", write_warmup=False, verify=False
    )
    meta = json.loads(Path(exported.path, "assets", "export.json").read_text())
    assert meta["ensemble"]["folds"] == [0, 1]
    served = tf.saved_model.load(exported.path).signatures["predict_pixels"](
        pixels=tf.constant(pixels[:1], tf.float32)
    )
    np.testing.assert_allclose(
        served["probabilities"].numpy(),
        trained.probabilities(trained.outputs(pixels[:1])),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        served["probabilities"].numpy(), _mean_of_folds(folds, pixels[:1]), atol=1e-5
    )
    # LiteRT: the float32 file of the whole ensemble passes the export's own check against the
    # Keras model and gives the mean of the folds' probabilities.
    from leukemia_tf.serving import litert

    lite = litert.export_litert(str(target), tmp_path / "litert")
    assert lite.check["max_abs_difference"] <= 1e-4
    np.testing.assert_allclose(
        litert.LiteRTModel(lite.file)(pixels)["probabilities"],
        _mean_of_folds(folds, pixels),
        atol=1e-4,
    )

    # fit_trust refuses an ensemble in one sentence, and writes nothing.
    from leukemia_tf import trust_lib

    with pytest.raises(ValueError, match="no single feature space"):
        trust_lib.fit(str(target))
    assert not (target / "trust.json").exists()


def test_unfinished_folds_are_left_out_and_named(cv_dir):
    from leukemia_tf import crossval_lib

    summary = Path(cv_dir, "fold_1", "train_summary.json")
    hidden = summary.with_name("train_summary.json.hidden")
    summary.rename(hidden)
    try:
        record, members = crossval_lib.build_ensemble(cv_dir)
        assert record["folds"] == [0] and record["not_finished_left_out"] == [1]
        assert len(members) == 1
        with pytest.raises(
            folds_lib.FoldError, match="--repeat=1: the repeats are numbered 0 to 0"
        ):
            crossval_lib.build_ensemble(cv_dir, repeat=1)
        Path(cv_dir, "fold_0", "train_summary.json").rename(
            Path(cv_dir, "fold_0", "train_summary.json.hidden")
        )
        try:
            with pytest.raises(folds_lib.FoldError, match=r"no fold .* fold_0, fold_1"):
                crossval_lib.build_ensemble(cv_dir, repeat=0)
        finally:
            Path(cv_dir, "fold_0", "train_summary.json.hidden").rename(
                Path(cv_dir, "fold_0", "train_summary.json")
            )
    finally:
        hidden.rename(summary)


def test_mismatched_folds_are_refused_naming_the_fold(cv_dir):
    from leukemia_tf import crossval_lib

    labels = Path(cv_dir, "fold_1", "labels.txt")
    original = labels.read_text()
    labels.write_text(original.replace(original.splitlines()[0], "renamed", 1))
    try:
        with pytest.raises(
            folds_lib.FoldError, match=r"fold_1 cannot join the ensemble: its classes"
        ):
            crossval_lib.build_ensemble(cv_dir)
    finally:
        labels.write_text(original)
    config = Path(cv_dir, "fold_1", "config.json")
    original = config.read_text()
    config.write_text(json.dumps({**json.loads(original), "image_size": 48}))
    try:
        with pytest.raises(
            folds_lib.FoldError, match=r"fold_1 cannot join the ensemble: its input size is 48"
        ):
            crossval_lib.build_ensemble(cv_dir)
    finally:
        config.write_text(original)
    # A DIR/ensemble that is not an ensemble is never deleted.
    stray = Path(cv_dir, "ensemble_stray")
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(folds_lib.FoldError, match="not a fold ensemble"):
        crossval_lib._clear_ensemble_dir(str(stray))
    assert (stray / "notes.txt").exists()


def test_no_finished_fold_is_a_one_line_error(tmp_path, synthetic_data_dir):
    from leukemia_tf import crossval_lib

    cv = tmp_path / "cv"
    config = tiny_train_config(synthetic_data_dir, cv, steps_per_epoch=2, verbose=0)
    crossval_lib.prepare_folds(config, 2)
    proc = run_module("leukemia_tf.crossval", f"--model_dir={cv}", "--ensemble", cwd=tmp_path)
    line = one_error_line(proc)
    assert line.startswith("error: --ensemble: no fold") and "fold_0, fold_1" in line, line
    assert not (cv / "ensemble").exists()
