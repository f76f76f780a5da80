"""Tests of the feature store (``leukemia_tf.embed``) and the probes fitted on it
(``leukemia_tf.train --from_embeddings``): cnn_tiny at 32 px on the synthetic set."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import tiny_train_config

from leukemia_tf import rundir
from leukemia_tf.data import pipeline
from leukemia_tf.embedding import embed_lib, probe_lib
from leukemia_tf.embedding import store as store_lib
from leukemia_tf.embedding.store import StoreError
from leukemia_tf.models import classifier, trust
from leukemia_tf.training import train_lib

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def _embed(data_dir: str, output, **overrides) -> dict:
    config = embed_lib.EmbedConfig(
        backbone="cnn_tiny",
        image_size=SIZE,
        data_dir=data_dir,
        output=str(output),
        batch_size=128,
        **overrides,
    )
    return embed_lib.embed(config, log=lambda line: None)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, synthetic_data_dir) -> str:
    path = tmp_path_factory.mktemp("embed") / "store"
    _embed(synthetic_data_dir, path)
    return str(path)


def _probe_config(store: str, model_dir, **overrides):
    """A probe config that takes every store field from the store (as the binary does)."""
    config = tiny_train_config("", model_dir, from_embeddings=store, **overrides)
    config = dataclasses.replace(config, steps_per_epoch=0, epochs=overrides.get("epochs", 3))
    return probe_lib.resolve_config(config, given=())


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory, store_dir) -> str:
    model_dir = tmp_path_factory.mktemp("linear") / "run"
    train_lib.train(_probe_config(store_dir, model_dir))
    return str(model_dir)


@pytest.fixture(scope="module")
def knn_run(tmp_path_factory, store_dir) -> str:
    model_dir = tmp_path_factory.mktemp("knn") / "run"
    train_lib.train(_probe_config(store_dir, model_dir, probe="knn", knn_k=7))
    return str(model_dir)


def _test_images(store: store_lib.FeatureStore, data_dir: str, count: int) -> np.ndarray:
    """The first ``count`` test images, read as the store read them."""
    ds = pipeline.load_split(
        "leukemia_synthetic",
        "test",
        data_dir=data_dir,
        image_size=SIZE,
        batch_size=count,
        training=False,
        cache=False,
        deterministic=True,
    )
    return next(iter(ds))["image"].numpy()


# ------------------------------------------------------------------- the store
def test_store_holds_every_example_once_with_its_label_and_ids(store_dir, synthetic_data_dir):
    store = store_lib.open_store(store_dir)
    meta = store.meta
    assert meta["backbone"]["name"] == "cnn_tiny" and meta["backbone"]["image_size"] == SIZE
    assert meta["backbone"]["feature_dim"] == 128 and len(meta["backbone"]["sha256"]) == 64
    assert meta["versions"]["keras"] and meta["versions"]["tensorflow"] == tf.__version__
    assert meta["label_mode"] == "native" and meta["datasets"] == "leukemia_synthetic"
    assert store.splits == ["train", "validation", "test"]
    assert meta["embed_seconds"] > 0 and meta["images"] == sum(map(store.count, store.splits))
    builder = tfds.builder("leukemia_synthetic", data_dir=synthetic_data_dir)
    assert store.class_names == builder.info.features["label"].names
    for split in store.splits:
        data = store.load(split)
        assert data.features.dtype == np.float32 and data.features.shape == (len(data), 128)
        assert np.isfinite(data.features).all() and data.levels is None
        assert len(data) == builder.info.splits[split].num_examples == store.count(split)
        expected = collections.Counter(
            (ex["file_name"].decode(), int(ex["label"]), ex["patient_id"].decode())
            for ex in tfds.as_numpy(
                builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
            )
        )
        stored = collections.Counter(
            zip(data.file_name, data.label.tolist(), data.patient_id, strict=True)
        )
        assert stored == expected  # every example once, with its label and ids
        assert len(set(data.file_name)) == len(data)
        assert (data.dataset == 0).all() and set(data.source) == {"leukemia_synthetic"}
        assert (
            meta["splits"][split]["class_counts"] == np.bincount(data.label, minlength=6).tolist()
        )


def test_an_existing_store_is_refused_without_overwrite(store_dir, synthetic_data_dir, tmp_path):
    before = store_lib.file_sha256(os.path.join(store_dir, store_lib.STORE_FILE))
    with pytest.raises(StoreError, match="holds a feature store; .* --overwrite"):
        _embed(synthetic_data_dir, store_dir)
    assert store_lib.file_sha256(os.path.join(store_dir, store_lib.STORE_FILE)) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="exists and is not an empty directory"):
        _embed(synthetic_data_dir, other)
    # Overwriting: a new store replaces the old one whole (only the test split, a few images).
    _embed(synthetic_data_dir, other, overwrite=True, splits="test", max_examples_per_split=20)
    assert sorted(os.listdir(other)) == [
        "backbone.weights.h5",
        "embedding.json",
        "test-00000-of-00001.npz",
    ]
    assert store_lib.open_store(other).count("test") == 20
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left
    with pytest.raises(StoreError, match="holds no embedding.json"):
        store_lib.open_store(tmp_path)


# -------------------------------------------------------------------- the probes
def test_linear_probe_is_an_ordinary_run_whose_model_is_backbone_plus_head(
    linear_run, store_dir, synthetic_data_dir
):
    for name in ("config.json", "flags.txt", "labels.txt", "best.keras", "last.keras"):
        assert os.path.exists(os.path.join(linear_run, name)), name
    for name in ("history.csv", "train_summary.json", "trust.json", "trust_features.npz"):
        assert os.path.exists(os.path.join(linear_run, name)), name
    config = rundir.read_config(linear_run)
    assert config.from_embeddings == store_dir and config.probe == "linear"
    assert (config.backbone, config.image_size, config.data_dir) == (
        "cnn_tiny",
        SIZE,
        synthetic_data_dir,
    )
    summary = json.loads(Path(linear_run, "train_summary.json").read_text())
    store = store_lib.open_store(store_dir)
    assert summary["from_embeddings"]["backbone"]["sha256"] == store.backbone["sha256"]
    assert len(rundir.read_history(linear_run)) == 3

    trained = rundir.load_trained_model(linear_run)  # with its trust statistics
    assert trained.trust is not None and trained.trust.record["from_embeddings"]
    images = _test_images(store, synthetic_data_dir, 48)
    outputs = trained.outputs(images, features=True)
    stored = store.load("test").features[:48]
    # The stored features are the joined model's pooled features on the same images ...
    np.testing.assert_allclose(outputs[trust.FEATURES], stored, rtol=1e-4, atol=1e-4)
    # ... and its logits on the images are its head's on the stored features.
    head = trained.model.get_layer("head")
    np.testing.assert_allclose(
        outputs["logits"], head(tf.constant(stored), training=False).numpy(), atol=1e-4
    )


def test_knn_probe_votes_over_the_training_features(knn_run, store_dir, synthetic_data_dir):
    store = store_lib.open_store(store_dir)
    trained = rundir.load_trained_model(knn_run)
    head = trained.model.get_layer("head")
    assert type(head).__name__ == "KNNHead" and head.k == 7
    assert head.bank_size == store.count("train")
    images = _test_images(store, synthetic_data_dir, 32)
    probs = trained.probabilities(trained.outputs(images))
    assert (probs >= 0).all() and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # The same votes by hand, from the stored features.
    train, test = store.load("train"), store.load("test").features[:32]

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    similarity = unit(test) @ unit(train.features).T
    expected = np.zeros_like(probs)
    for row, sims in enumerate(similarity):
        top = np.argsort(-sims)[:7]
        np.add.at(expected[row], train.label[top], np.exp((sims[top] - 1.0) / 0.07))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    assert len(rundir.read_history(knn_run)) == 1 and trained.trust is not None


def test_knn_probe_exports_a_saved_model_that_predicts_the_same(knn_run, tmp_path):
    from leukemia_tf.serving import export_lib

    result = export_lib.export_model(knn_run, tmp_path / "export", write_warmup=False)
    assert result.max_abs_difference is not None and result.max_abs_difference < 1e-4
    trained = rundir.load_trained_model(knn_run)
    pixels = np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3)).astype(np.float32)
    served = tf.saved_model.load(result.path).signatures["predict_pixels"](
        pixels=tf.constant(pixels)
    )
    np.testing.assert_allclose(
        served["probabilities"].numpy(),
        trained.probabilities(trained.outputs(pixels)),
        atol=1e-5,
    )


def test_hierarchical_mlp_probe_on_a_taxonomy_store(tmp_path, synthetic_data_dir):
    store = tmp_path / "taxonomy_store"
    meta = _embed(
        synthetic_data_dir,
        store,
        label_mode="taxonomy",
        splits="train,validation",
        max_examples_per_split=300,
        white_balance=True,
        cell_crop=True,
    )
    assert meta["taxonomy"] is not None
    assert meta["backbone"]["white_balance"] and meta["backbone"]["cell_crop"]
    assert store_lib.open_store(store).load("train").levels is not None
    config = _probe_config(
        str(store), tmp_path / "run", head="hierarchical", probe="mlp", hidden_units=16, epochs=2
    )
    assert config.label_mode == "taxonomy"
    assert config.white_balance and config.cell_crop  # the store's input layers
    train_lib.train(config, fit_trust=False)
    trained = rundir.load_trained_model(tmp_path / "run")
    layers = [layer.name for layer in classifier.input_layers(trained.model)]
    assert layers == ["white_balance", "cell_crop"]
    data = store_lib.open_store(store).load("validation")
    outputs = trained.model.get_layer("head")(tf.constant(data.features[:8]))
    marginals = trained.label_space.level_probabilities(outputs)
    assert np.allclose(marginals["level_0"].numpy().sum(axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------ refusals
def test_a_store_that_does_not_fit_the_flags_is_refused(store_dir, tmp_path):
    base = _probe_config(store_dir, tmp_path / "run")
    with pytest.raises(StoreError, match=r"--image_size=64 \(the store: 32\)"):
        probe_lib.check_config(dataclasses.replace(base, image_size=64))
    with pytest.raises(StoreError, match=r"--backbone='cnn_small' \(the store: 'cnn_tiny'\)"):
        probe_lib.check_config(dataclasses.replace(base, backbone="cnn_small"))
    with pytest.raises(StoreError, match="--label_mode='taxonomy'"):
        probe_lib.check_config(dataclasses.replace(base, label_mode="taxonomy"))
    with pytest.raises(StoreError, match="--datasets='all_taleqani/original'"):
        probe_lib.check_config(dataclasses.replace(base, datasets="all_taleqani/original"))
    with pytest.raises(StoreError, match="--weights='imagenet'"):
        probe_lib.check_config(dataclasses.replace(base, weights="imagenet"))
    with pytest.raises(StoreError, match="has no split 'trian'; it holds train, validation"):
        probe_lib.check_config(dataclasses.replace(base, train_split="trian"))
    with pytest.raises(StoreError, match="no slices"):
        probe_lib.check_config(dataclasses.replace(base, train_split="train[:10%]"))
    with pytest.raises(StoreError, match="--knn_k=5000: larger than the 1173"):
        probe_lib.check_config(dataclasses.replace(base, probe="knn", knn_k=5000))
    # A given flag is kept (and checked); one not given takes the store's value.
    kept = probe_lib.resolve_config(dataclasses.replace(base, image_size=64), {"image_size"})
    assert kept.image_size == 64 and kept.backbone == "cnn_tiny"
    assert not (tmp_path / "run").exists()


def test_probe_flags_are_checked(store_dir, tmp_path):
    from leukemia_tf.training.config import ConfigError

    base = _probe_config(store_dir, tmp_path / "run")
    with pytest.raises(ConfigError, match="--probe=mlp .* set --hidden_units"):
        dataclasses.replace(base, probe="mlp").validate()
    with pytest.raises(ConfigError, match="--probe=linear has no hidden layer"):
        dataclasses.replace(base, hidden_units=8).validate()
    with pytest.raises(ConfigError, match="--probe=knn votes over the classes: use --head=flat"):
        dataclasses.replace(
            base, probe="knn", head="hierarchical", label_mode="taxonomy"
        ).validate()
    with pytest.raises(ConfigError, match="--probe=knn fits a head on stored features"):
        dataclasses.replace(base, from_embeddings="", probe="knn").validate()


# ----------------------------------------------------------------------- CLI
def test_embed_and_train_from_embeddings_on_the_command_line(synthetic_data_dir, tmp_path):
    store, run = tmp_path / "store", tmp_path / "run"
    python = sys.executable
    script = (
        f"{python} -m leukemia_tf.embed --backbone=cnn_tiny --image_size={SIZE} "
        f"--data_dir={synthetic_data_dir} --output={store} --batch_size=128 "
        "--splits=train,validation --max_examples_per_split=200 && "
        f"{python} -m leukemia_tf.train --from_embeddings={store} --model_dir={run} "
        "--epochs=2 --verbose=2 && "
        f"{python} -m leukemia_tf.train --from_embeddings={store} --model_dir={tmp_path / 'x'} "
        "--image_size=48; echo status=$?"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert "Embedded 400 images" in proc.stdout, proc.stderr[-3000:]
    assert "Best epoch" in proc.stdout and rundir.is_finished(str(run)), proc.stderr[-3000:]
    assert "status=2" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--image_size=48 (the store: 32)" in errors[0]
    assert not (tmp_path / "x").exists()
