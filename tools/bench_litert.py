r"""Portable exports measured: file size, latency, throughput and accuracy per format.

For each training run, exports the SavedModel (the baseline), the LiteRT file
in every ``--quantize`` mode and, when the toolchain is installed, ONNX; then,
on this machine and in the same process:

* file size;
* single-image latency (batch 1, median and p95 of ``--latency_runs`` calls
  after warm-up) and throughput (images/s at batch ``--batch_size``), on the
  same uint8 pixels for every format (the SavedModel through its
  ``predict_pixels`` signature, LiteRT through its interpreter with
  ``--threads`` threads, ONNX through ONNX Runtime);
* with ``--accuracy`` (the run's data at hand): test-split accuracy of each,
  its 95 % bootstrap interval, the paired difference to the float32
  SavedModel with its interval (the same images resampled for both), and the
  top-1 agreement with it.

Example (the figures of BENCHMARKS.md)::

  python tools/bench_litert.py --run=pbc=runs/cpu_pbc --run=tal=runs/cpu_all_taleqani \
      --accuracy --output=litert_bench.json
  python tools/bench_litert.py --run=effv2b0=runs/effv2b0_random --output=effv2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

MODES = ("none", "float16", "dynamic", "int8")


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


def _timings(run, pixels: np.ndarray, latency_runs: int, batch_size: int) -> dict:
    """Latency (batch 1) and throughput (batch ``batch_size``) of ``run(pixels)``."""
    one = pixels[:1]
    for _ in range(5):
        run(one)
    times = []
    for _ in range(latency_runs):
        start = time.perf_counter()
        run(one)
        times.append(time.perf_counter() - start)
    batch = np.resize(pixels, (batch_size, *pixels.shape[1:]))
    run(batch)
    start, images = time.perf_counter(), 0
    while images < 8 * batch_size or time.perf_counter() - start < 5.0:
        run(batch)
        images += batch_size
    elapsed = time.perf_counter() - start
    return {
        "latency_ms_median": 1000 * statistics.median(times),
        "latency_ms_p95": 1000 * float(np.percentile(times, 95)),
        "images_per_s": images / elapsed,
    }


def _probabilities(run, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate(
        [run(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    )


def _accuracy(labels, probs, reference, rng_seed: int = 0, resamples: int = 2000) -> dict:
    """Accuracy, its bootstrap interval and the paired difference to ``reference``."""
    correct = probs.argmax(-1) == labels
    base = reference.argmax(-1) == labels
    rng = np.random.default_rng(rng_seed)
    index = rng.integers(0, len(labels), size=(resamples, len(labels)))
    acc = correct[index].mean(1)
    diff = acc - base[index].mean(1)
    return {
        "accuracy": float(correct.mean()),
        "accuracy_ci95": [float(x) for x in np.percentile(acc, [2.5, 97.5])],
        "difference": float(correct.mean() - base.mean()),
        "difference_ci95": [float(x) for x in np.percentile(diff, [2.5, 97.5])],
        "top1_agreement": float(np.mean(probs.argmax(-1) == reference.argmax(-1))),
        "max_abs_probability_difference": float(np.max(np.abs(probs - reference))),
    }


def _test_split(trained, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    from leukemia_tf.data import pipeline

    config = trained.config
    ds = pipeline.load_split(
        config.datasets,
        "test",
        data_dir=config.data_dir or None,
        image_size=trained.image_size,
        batch_size=64,
        training=False,
        label_mode=config.label_mode,
        taxonomy=trained.taxonomy,
        cache=False,
        deterministic=True,
    )
    images, labels = [], []
    for batch in ds.as_numpy_iterator():
        images.append(batch["image"])
        labels.append(batch["label"])
    pixels, labels = np.concatenate(images), np.concatenate(labels)
    return (pixels[:limit], labels[:limit]) if limit else (pixels, labels)


def bench_run(name: str, model_dir: str, args, work: str) -> dict:
    import tensorflow as tf

    from leukemia_tf import rundir
    from leukemia_tf.serving import export_lib, litert, signatures

    trained = rundir.load_trained_model(model_dir)
    out: dict = {"run": name, "backbone": trained.config.backbone, "formats": {}}
    if args.accuracy:
        pixels, labels = _test_split(trained, args.limit)
    else:
        from leukemia_tf.serving import warmup

        pixels = np.stack(
            [
                tf.image.resize(tf.io.decode_image(b, channels=3), [trained.image_size] * 2)
                .numpy()
                .astype(np.uint8)
                for b in warmup.coverage_images(trained.image_size)
            ]
        )
        labels = None
    out["images"] = int(len(pixels))

    start = time.perf_counter()
    saved = export_lib.export_model(
        model_dir, os.path.join(work, name, "saved_model"), write_warmup=False, verify=False
    )
    export_s = time.perf_counter() - start
    served = tf.saved_model.load(saved.path).signatures[signatures.PREDICT_PIXELS]

    def run_saved(x):
        return served(pixels=tf.constant(x, tf.float32))[signatures.PROBABILITIES].numpy()

    runners = {"saved_model": (run_saved, _size(saved.path), export_s)}
    for mode in MODES:
        start = time.perf_counter()
        result = litert.export_litert(
            model_dir,
            os.path.join(work, name, f"litert_{mode}"),
            quantize=mode,
            calibration_images_count=args.calibration_images,
        )
        model = litert.LiteRTModel(result.file, num_threads=args.threads)
        runners[f"litert_{mode}"] = (
            lambda x, m=model: m.numeric(x)[signatures.PROBABILITIES],
            result.size_bytes,
            time.perf_counter() - start,
        )
    try:
        from leukemia_tf.serving import onnx_export

        start = time.perf_counter()
        result = onnx_export.export_onnx(model_dir, os.path.join(work, name, "onnx"))
        model = onnx_export.OnnxModel(result.file, num_threads=args.threads)
        runners["onnx"] = (
            lambda x, m=model: m.numeric(x)[signatures.PROBABILITIES],
            result.size_bytes,
            time.perf_counter() - start,
        )
    except ImportError as e:
        out["onnx"] = f"not measured: {e}"

    reference = _probabilities(run_saved, pixels) if labels is not None else None
    for key, (run, size, export_time) in runners.items():
        row = {"size_bytes": int(size), "export_s": export_time}
        row.update(_timings(run, pixels, args.latency_runs, args.batch_size))
        if labels is not None:
            row.update(_accuracy(labels, _probabilities(run, pixels), reference))
        out["formats"][key] = row
        print(name, key, json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=MODEL_DIR")
    parser.add_argument("--accuracy", action="store_true", help="score the test split")
    parser.add_argument("--limit", type=int, default=None, help="test images at most")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--latency_runs", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--calibration_images", type=int, default=200)
    parser.add_argument("--output", default="litert_bench.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_litert_") as work:
        for spec in args.run:
            name, _, model_dir = spec.partition("=")
            results.append(bench_run(name, model_dir, args, work))
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
