r"""Embed once, probe many: what a feature store costs and what probes on it score.

Embeds a data set with a frozen backbone (``leukemia_tf.embed``), then fits a
linear and a k-NN probe on the stored features (``leukemia_tf.train
--from_embeddings``), and prints (and writes, ``--output_json``) the wall time
of the embedding and its images per second, the wall time of each probe fit,
and each probe's test accuracy and balanced accuracy.

The test scores are computed from the **stored test features**: the probe
run's ``best.keras`` is loaded (``rundir.load_trained_model``) and its head
applied to the stored features of the test split, which is what the joined
model computes on the test images (``tests/test_embed.py`` checks that the
two agree); ``leukemia_tf.evaluate`` on the run gives the full report.

Examples::

  # The benchmark (a GPU helps: DINOv2-S at 224 px over all PBC images):
  python tools/bench_embed.py --datasets=pbc --data_dir=DATA
  python tools/bench_embed.py --datasets=all_taleqani/original --data_dir=DATA

  # A smoke run on a CPU: the first 64 images of each split.
  python tools/bench_embed.py --datasets=all_taleqani/original --data_dir=DATA \
      --max_examples_per_split=64
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_BACKBONE = flags.DEFINE_string("backbone", "dinov2_small", "Backbone to embed with.")
_WEIGHTS = flags.DEFINE_string("weights", "none", "Its weights: none, imagenet or a PATH.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image size in pixels.")
_DATASETS = flags.DEFINE_string("datasets", "pbc", "Data sets (a --datasets value).")
_LABEL_MODE = flags.DEFINE_enum("label_mode", "native", ["native", "taxonomy"], "Label mode.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data directory.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Inference batch size of the embedding.")
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples_per_split", 0, "Embed only the first N images of each split (smoke); 0: all."
)
_EPOCHS = flags.DEFINE_integer("epochs", 20, "Epochs of the linear probe.")
_PROBE_BATCH = flags.DEFINE_integer("probe_batch_size", 64, "Batch size of the linear probe.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Learning rate of the linear probe.")
_KNN_K = flags.DEFINE_integer("knn_k", 20, "Neighbours of the k-NN probe.")
_WORK_DIR = flags.DEFINE_string(
    "work_dir", "", "Where the store and the probe runs go; empty: a temporary folder, deleted."
)
_OUTPUT_JSON = flags.DEFINE_string("output_json", "", "Also write the results here.")


def _test_scores(model_dir: str, store, split: str = "test") -> dict | None:
    """Accuracy and balanced accuracy of the run's best model on the stored ``split`` features."""
    import tensorflow as tf

    from leukemia_tf import rundir
    from leukemia_tf.evaluation import metrics

    if split not in store.splits:
        return None
    data = store.load(split)
    trained = rundir.load_trained_model(model_dir, trust=False)
    head = trained.model.get_layer("head")
    outputs = head(tf.constant(data.features), training=False)
    if not isinstance(outputs, dict):
        outputs = {"logits": outputs}
    probs = trained.label_space.probabilities(outputs).numpy()
    scores = metrics.decision_metrics(
        data.label, probs.argmax(axis=-1), trained.label_space.num_classes
    )
    return {
        "split": split,
        "n": len(data),
        "accuracy": float(scores["accuracy"]),
        "balanced_accuracy": float(scores["balanced_accuracy"]),
        "macro_f1": float(scores["macro_f1"]),
        "computed_from": "stored test features through the run's best.keras head",
    }


def _probe(store_dir: str, model_dir: str, **fields) -> dict:
    from leukemia_tf.embedding import probe_lib, store
    from leukemia_tf.training import train_lib
    from leukemia_tf.training.config import TrainConfig

    config = TrainConfig(
        from_embeddings=store_dir,
        model_dir=model_dir,
        batch_size=_PROBE_BATCH.value,
        learning_rate=_LEARNING_RATE.value,
        precision="float32",
        strategy="default",
        verbose=0,
        **fields,
    )
    config = probe_lib.resolve_config(config, given=())
    start = time.perf_counter()
    result = train_lib.train(config, fit_trust=False)
    seconds = time.perf_counter() - start
    return {
        "probe": config.probe,
        "fit_seconds": round(seconds, 3),
        "best_epoch": result.best_epoch + 1,
        "epochs_run": len(result.history),
        "validation": result.best_metrics,
        "test": _test_scores(model_dir, store.open_store(store_dir)),
    }


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    from leukemia_tf.embedding import embed_lib

    work = _WORK_DIR.value or tempfile.mkdtemp(prefix="bench_embed_")
    os.makedirs(work, exist_ok=True)
    store_dir = os.path.join(work, "store")
    try:
        start = time.perf_counter()
        meta = embed_lib.embed(
            embed_lib.EmbedConfig(
                backbone=_BACKBONE.value,
                weights=_WEIGHTS.value,
                image_size=_IMAGE_SIZE.value,
                datasets=_DATASETS.value,
                label_mode=_LABEL_MODE.value,
                data_dir=_DATA_DIR.value,
                batch_size=_BATCH_SIZE.value,
                max_examples_per_split=_MAX_EXAMPLES.value,
                output=store_dir,
                overwrite=True,
            )
        )
        embed_wall = time.perf_counter() - start
        probes = [
            _probe(store_dir, os.path.join(work, "linear"), probe="linear", epochs=_EPOCHS.value),
            _probe(store_dir, os.path.join(work, "knn"), probe="knn", knn_k=_KNN_K.value),
        ]
    finally:
        if not _WORK_DIR.value:
            shutil.rmtree(work, ignore_errors=True)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
        "backbone": meta["backbone"],
        "datasets": meta["datasets"],
        "label_mode": meta["label_mode"],
        "max_examples_per_split": _MAX_EXAMPLES.value,
        "images_per_split": {k: v["count"] for k, v in meta["splits"].items()},
        "embedding": {
            "wall_seconds": round(embed_wall, 3),
            "forward_seconds": meta["embed_seconds"],
            "images": meta["images"],
            "images_per_second": meta["images_per_second"],
            "note": "wall: everything (data checks, backbone build, writing); forward: the "
            "passes over the splits (decode, resize and backbone); images/s on the forward time",
        },
        "probes": probes,
        "settings": {
            "linear": {
                "epochs": _EPOCHS.value,
                "batch_size": _PROBE_BATCH.value,
                "learning_rate": _LEARNING_RATE.value,
            },
            "knn": {"k": _KNN_K.value},
            **({"work_dir": work} if _WORK_DIR.value else {}),
        },
    }
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if _OUTPUT_JSON.value:
        Path(_OUTPUT_JSON.value).write_text(text + "\n")


if __name__ == "__main__":
    app.run(main)
