"""End to end on the built-in synthetic set: build, train, evaluate, export, reload, predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import tensorflow as tf
from conftest import tiny_train_config
from PIL import Image

from leukemia_tf.data import build_data_lib as build_lib
from leukemia_tf.evaluation import evaluate_lib
from leukemia_tf.serving import export_lib, predict_lib
from leukemia_tf.training import train_lib


def test_build_train_evaluate_export_reload_predict(tmp_path):
    data_dir = str(tmp_path / "tfds")
    builder = build_lib.build("leukemia_synthetic", data_dir=data_dir)
    assert builder.info.splits["train"].num_examples > 0

    model_dir = tmp_path / "model"
    config = tiny_train_config(
        data_dir,
        model_dir,
        label_mode="taxonomy",
        head="hierarchical",
        batch_size=32,
        epochs=2,
        steps_per_epoch=6,
    )
    result = train_lib.train(config)
    assert (model_dir / "best.keras").is_file()

    evaluate_lib.evaluate(model_dir, split="test", bootstrap=20, explain_samples=0)
    assert (model_dir / "eval_test" / "report.md").is_file()
    saved = json.loads((model_dir / "eval_test" / "metrics.json").read_text())
    assert saved["cell"]["n"] == builder.info.splits["test"].num_examples
    assert 0.0 <= saved["cell"]["accuracy"] <= 1.0
    assert saved["slide"]["available"] and saved["patient"]["available"]
    assert (model_dir / "calibration.json").is_file()

    exported = export_lib.export_model(model_dir, tmp_path / "export")
    loaded = tf.saved_model.load(exported.path)
    serve = loaded.signatures["serving_default"]

    # A few test images, written as files the way a user would have them.
    images_dir = tmp_path / "cells"
    images_dir.mkdir()
    ds = builder.as_dataset(split="test").take(4)
    for i, example in enumerate(ds):
        Image.fromarray(example["image"].numpy()).save(images_dir / f"cell_{i}.png")
    files = sorted(images_dir.glob("*.png"))
    out = serve(image_bytes=tf.constant([f.read_bytes() for f in files]))
    probs = out["probabilities"].numpy()
    assert probs.shape == (4, len(result.class_names))

    predictions = tmp_path / "predictions.csv"
    predict_lib.predict(model_dir, str(images_dir), output=predictions, verbose=0)
    with predictions.open() as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file"])
    assert len(rows) == 4
    served = [n.decode() for n in out["class_names"].numpy()]
    # The exported graph and the Python predictor agree on every image.
    for row, name, p in zip(rows, served, probs, strict=True):
        assert Path(row["file"]).name.startswith("cell_")
        assert row["predicted_class"] == name
        assert np.isclose(
            p.max(), max(float(row[f"prob_{c}"]) for c in result.class_names), atol=1e-4
        )
