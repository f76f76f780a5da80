r"""Input-pipeline benchmark on the real JPEGs in ../shared/data (images per second).

Run from the repository root::

  python tools/bench_input.py                      # all sections, 5 runs
  python tools/bench_input.py --sections=throughput --runs=7 --output=/tmp/bench.json

Sections (figures and the machine they came from are in BENCHMARKS.md):

``throughput``: per data set (all_taleqani: 224x224 JPEGs; pbc: ~360x363
  JPEGs), image size 224, batch 64, all methods interleaved within each run
  (the order rotates from run to run) and reported as medians:

  (a) this package: ``leukemia_tf.data.pipeline.load_split`` in its training
      configuration (file and example shuffle, in-memory cache, drop
      remainder) over all splits of the built TFDS set: the first epoch
      (reads, decodes, resizes, fills the cache) and the following cached
      epochs;
  (b) the baseline a user would write: the plain
      ``keras.utils.image_dataset_from_directory(folder, image_size=(224,
      224), batch_size=64)`` call on the same files, with no cache or
      prefetch added;
  (c) the limit: ``tf.data`` over the file list with a parallel
      ``read_file + decode_jpeg + tf.image.resize`` (plain bilinear, to
      224x224) and nothing else but the batching (and a prefetch) needed to
      consume it at the same granularity;
  (c2) the same as (c) with this package's ``decode_and_resize`` instead of
      decode_jpeg + plain resize: the decode and resize work of (a) alone;
  (a') the pipeline in its evaluation configuration with ``cache=False`` (no
      shuffle buffer, no cache): an epoch without the cost of keeping every
      decoded image in memory, which the training configuration pays in its
      first epoch (the cache, and a shuffle buffer larger than the data set).
      The minor page faults per image show where that cost goes.

  Ratios are computed within each run (so they compare methods under the
  same load) and their medians reported.

``fused``: the fused (DCT-downscaled) JPEG decode against the full decode:
  throughput of a parallel tf.data map over the encoded bytes in memory and
  the pixel difference, on real JPEGs at small target sizes (where the fused
  path applies to them) and on 1440x1080 mosaics of real PBC cells (like a
  smear field) at 224.

``resize``: resize methods against a Lanczos reference (PIL), mean absolute
  error in grey levels, and the cost of each per image.
"""

from __future__ import annotations

import glob
import io
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from absl import app, flags, logging

_REPO = Path(__file__).resolve().parents[1]

_DATA_ROOT = flags.DEFINE_string(
    "data_root", str(_REPO / ".." / "shared" / "data"), "Folder with the real images."
)
_WORK_DIR = flags.DEFINE_string(
    "work_dir",
    os.path.join(tempfile.gettempdir(), "leukemia_tf_bench"),
    "Where the TFDS sets are built (reused when already built).",
)
_DATASETS = flags.DEFINE_list(
    "datasets", ["all_taleqani", "pbc"], "Data sets of the throughput section."
)
_SECTIONS = flags.DEFINE_list(
    "sections", ["throughput", "fused", "resize"], "Sections to run: throughput, fused, resize."
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image size of the throughput section.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size of the throughput section.")
_RUNS = flags.DEFINE_integer("runs", 5, "Interleaved runs per method (medians are reported).")
_CACHED_EPOCHS = flags.DEFINE_integer("cached_epochs", 3, "Cached epochs timed per run of (a).")
_JPEG_RATIO_MARGIN = flags.DEFINE_integer(
    "jpeg_ratio_margin",
    None,
    "Override preprocessing.JPEG_RATIO_MARGIN in the fused section (to compare margins).",
)
_OUTPUT = flags.DEFINE_string("output", None, "Write all figures to this JSON file.")

# name -> (TFDS name, folder under data_root, anchor folder holding the class folders)
_SETS = {
    "all_taleqani": ("all_taleqani/original", "all_taleqani", "all_taleqani/Original"),
    "pbc": ("pbc", "pbc", "pbc/PBC_dataset_normal_DIB"),
}
_ALL_SPLITS = "train+validation+test"


def _tf():
    import tensorflow as tf

    return tf


def _iterate(ds) -> int:
    """Consumes ``ds`` (batches) and returns the number of images seen."""
    count = 0
    for batch in ds:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        count += int(images.shape[0])
    return count


def _timed(fn: Callable[[], int]) -> float:
    """Images per second of ``fn()`` (which returns the image count)."""
    start = time.perf_counter()
    count = fn()
    return count / (time.perf_counter() - start)


def _files(anchor: Path) -> list[str]:
    return sorted(glob.glob(str(anchor / "*" / "*.jpg")))


def _build(name: str, data_root: Path, data_dir: str) -> None:
    from leukemia_tf.data import build_data_lib as build_data

    tfds_name, folder, _ = _SETS[name]
    start = time.perf_counter()
    build_data.build(tfds_name, data_dir=data_dir, manual_dir=str(data_root / folder))
    logging.info("%s ready in %.1f s", tfds_name, time.perf_counter() - start)


# ------------------------------------------------------------------ throughput
def _method_a(tfds_name: str, data_dir: str, size: int, batch: int, training: bool = True):
    from leukemia_tf.data import pipeline

    return pipeline.load_split(
        tfds_name,
        _ALL_SPLITS,
        data_dir=data_dir,
        image_size=size,
        batch_size=batch,
        training=training,
        repeat=False,
        # Training: cached; the streaming variant keeps nothing in memory.
        cache=training,
    )


def _method_b(anchor: Path, size: int, batch: int):
    import keras

    return keras.utils.image_dataset_from_directory(
        str(anchor), image_size=(size, size), batch_size=batch, verbose=False
    )


def _method_c(files: Sequence[str], size: int, batch: int, ours: bool):
    tf = _tf()
    from leukemia_tf.data import preprocessing

    def load(path):
        data = tf.io.read_file(path)
        if ours:
            return {"image": preprocessing.decode_and_resize(data, size)}
        image = tf.io.decode_jpeg(data, channels=3)
        return {"image": tf.image.resize(image, [size, size])}

    ds = tf.data.Dataset.from_tensor_slices(list(files))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _throughput_one(name: str, data_root: Path, data_dir: str) -> dict:
    """All methods on one data set, interleaved; see the module docstring."""
    size, batch, runs = _IMAGE_SIZE.value, _BATCH_SIZE.value, _RUNS.value
    tfds_name, _, anchor_rel = _SETS[name]
    anchor = data_root / anchor_rel
    files = _files(anchor)
    _build(name, data_root, data_dir)
    faults: dict[str, list[float]] = {"a_first": [], "a_stream": [], "c": []}

    def run_a() -> dict[str, float]:
        ds = _method_a(tfds_name, data_dir, size, batch)
        before = _minor_faults()
        start = time.perf_counter()
        count = _iterate(ds)
        first = count / (time.perf_counter() - start)
        faults["a_first"].append((_minor_faults() - before) / count)
        cached = [_timed(lambda: _iterate(ds)) for _ in range(_CACHED_EPOCHS.value)]
        return {"a_first": first, "a_cached": statistics.median(cached)}

    def run_a_stream() -> dict[str, float]:
        ds = _method_a(tfds_name, data_dir, size, batch, training=False)
        before = _minor_faults()
        start = time.perf_counter()
        count = _iterate(ds)
        speed = count / (time.perf_counter() - start)
        faults["a_stream"].append((_minor_faults() - before) / count)
        return {"a_stream": speed}

    def run_c() -> dict[str, float]:
        ds = _method_c(files, size, batch, ours=False)
        before = _minor_faults()
        start = time.perf_counter()
        count = _iterate(ds)
        speed = count / (time.perf_counter() - start)
        faults["c"].append((_minor_faults() - before) / count)
        return {"c": speed}

    methods: dict[str, Callable[[], dict[str, float]]] = {
        "a": run_a,
        "a_stream": run_a_stream,
        "b": lambda: {"b": _timed(lambda: _iterate(_method_b(anchor, size, batch)))},
        "c": run_c,
        "c2": lambda: {"c2": _timed(lambda: _iterate(_method_c(files, size, batch, ours=True)))},
    }
    # Warm-up (untimed): the OS file cache, graph tracing, lazy imports.
    for fn in methods.values():
        fn()
    for values in faults.values():
        values.clear()
    samples: dict[str, list[float]] = {
        k: [] for k in ("a_first", "a_cached", "a_stream", "b", "c", "c2")
    }
    order = list(methods)
    for run in range(runs):
        shift = run % len(order)
        for key in order[shift:] + order[:shift]:
            for k, v in methods[key]().items():
                samples[k].append(v)
        logging.info("%s run %d: %s", name, run, {k: round(v[-1]) for k, v in samples.items()})

    def per_run(num: str, den: str) -> list[float]:
        return [a / b for a, b in zip(samples[num], samples[den], strict=True)]

    ratios = {
        "a_first/c": per_run("a_first", "c"),
        "a_first/c2": per_run("a_first", "c2"),
        "a_stream/c": per_run("a_stream", "c"),
        "a_stream/c2": per_run("a_stream", "c2"),
        "a_cached/b": per_run("a_cached", "b"),
        "a_first/b": per_run("a_first", "b"),
    }
    return {
        "images": len(files),
        "samples": samples,
        "median": {k: statistics.median(v) for k, v in samples.items()},
        "ratio_median": {k: statistics.median(v) for k, v in ratios.items()},
        "ratio_min": {k: min(v) for k, v in ratios.items()},
        "ratio_max": {k: max(v) for k, v in ratios.items()},
        "minor_faults_per_image": {k: statistics.median(v) for k, v in faults.items()},
    }


def throughput(data_root: Path, data_dir: str, names: Sequence[str]) -> dict:
    return {name: _throughput_one(name, data_root, data_dir) for name in names}


# ----------------------------------------------------------------------- fused
def _mosaics(files: Sequence[str], count: int, quality: int = 95) -> list[bytes]:
    """1440x1080 JPEGs tiled from real 360x360 PBC cells (4 x 3), like a smear field."""
    from PIL import Image

    out = []
    for i in range(count):
        canvas = Image.new("RGB", (1440, 1080))
        for t in range(12):
            cell = (
                Image.open(files[(i * 12 + t) % len(files)]).convert("RGB").crop((0, 0, 360, 360))
            )
            canvas.paste(cell, ((t % 4) * 360, (t // 4) * 360))
        buffer = io.BytesIO()
        canvas.save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def fused(data_root: Path) -> list[dict]:
    tf = _tf()
    from leukemia_tf.data import preprocessing

    if _JPEG_RATIO_MARGIN.value is not None:
        preprocessing.JPEG_RATIO_MARGIN = _JPEG_RATIO_MARGIN.value

    pbc = sorted(glob.glob(str(data_root / "pbc" / "**" / "*.jpg"), recursive=True))
    aml = sorted(
        glob.glob(str(data_root / "aml_cytomorphology_lmu" / "**" / "*.jpg"), recursive=True)
    )
    cases = []
    if pbc:
        pbc_bytes = [Path(f).read_bytes() for f in pbc[:: max(1, len(pbc) // 600)]]
        cases += [("pbc 363x360", pbc_bytes, s) for s in (32, 64, 80)]
        cases.append(("pbc mosaic 1440x1080", _mosaics(pbc, 120), 224))
    if aml:
        aml_bytes = [Path(f).read_bytes() for f in aml[:: max(1, len(aml) // 600)]]
        cases += [("aml 400x400", aml_bytes, s) for s in (48, 64, 96)]

    results = []
    for label, encoded, size in cases:
        shape = tf.image.extract_jpeg_shape(encoded[0])
        ratio = preprocessing.JPEG_RATIOS[
            int(preprocessing.jpeg_ratio_index(shape[0], shape[1], size))
        ]

        def dataset(is_fused: bool, encoded=encoded, size=size):
            ds = tf.data.Dataset.from_tensor_slices(encoded)
            ds = ds.map(
                lambda e: {"image": preprocessing.decode_and_resize(e, size, fused=is_fused)},
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=False,
            )
            return ds.batch(64).prefetch(tf.data.AUTOTUNE)

        speeds = {True: [], False: []}
        cpu_ms = {True: [], False: []}
        for is_fused in (True, False):  # warm-up
            _iterate(dataset(is_fused))
        for run in range(_RUNS.value):
            for is_fused in (True, False) if run % 2 == 0 else (False, True):
                ds = dataset(is_fused)
                cpu_start, start = time.process_time(), time.perf_counter()
                count = _iterate(ds)
                speeds[is_fused].append(count / (time.perf_counter() - start))
                cpu_ms[is_fused].append((time.process_time() - cpu_start) / count * 1e3)
        diffs = []
        # A string signature: Python bytes arguments would retrace every call.
        signature = [tf.TensorSpec([], tf.string)]
        one_fused = tf.function(
            lambda e, s=size: preprocessing.decode_and_resize(e, s), input_signature=signature
        )
        one_full = tf.function(
            lambda e, s=size: preprocessing.decode_and_resize(e, s, fused=False),
            input_signature=signature,
        )
        for data in encoded:
            a = one_fused(tf.constant(data)).numpy().astype(np.int32)
            b = one_full(tf.constant(data)).numpy().astype(np.int32)
            diffs.append(np.abs(a - b).ravel())
        diff = np.concatenate(diffs)
        row = {
            "images": label,
            "count": len(encoded),
            "size": size,
            "ratio": ratio,
            "fused_per_s": statistics.median(speeds[True]),
            "full_per_s": statistics.median(speeds[False]),
            "speedup": statistics.median(
                [f / u for f, u in zip(speeds[True], speeds[False], strict=True)]
            ),
            "fused_cpu_ms": statistics.median(cpu_ms[True]),
            "full_cpu_ms": statistics.median(cpu_ms[False]),
            "mean_abs_diff": float(diff.mean()),
            "p99_abs_diff": float(np.percentile(diff, 99)),
            "max_abs_diff": int(diff.max()),
        }
        logging.info("fused: %s", row)
        results.append(row)
    return results


# ---------------------------------------------------------------------- resize
def _resize_cpu_ms(encoded: Sequence[bytes], size: int, kwargs: dict | None) -> float:
    """CPU ms per image of decode (+ resize with ``kwargs``), one thread."""
    tf = _tf()
    from leukemia_tf.data import preprocessing

    def fn(data):
        image = tf.io.decode_jpeg(data, channels=3, dct_method=preprocessing.JPEG_DCT_METHOD)
        if kwargs is not None:
            shape = tf.shape(image)
            target = preprocessing.fit_size(shape[0], shape[1], size)
            image = tf.image.resize(image, target, **kwargs)
        return {"image": image[:1, :1]}

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.autotune.enabled = False
    ds = tf.data.Dataset.from_tensor_slices(list(encoded)).map(fn).batch(64)
    ds = ds.with_options(options)
    start = time.process_time()
    count = _iterate(ds)
    return (time.process_time() - start) / count * 1e3


def resize(data_root: Path) -> list[dict]:
    tf = _tf()
    from PIL import Image

    from leukemia_tf.data import preprocessing

    sets = {
        "pbc 363x360": sorted(glob.glob(str(data_root / "pbc" / "**" / "*.jpg"), recursive=True)),
        "aml 400x400": sorted(
            glob.glob(str(data_root / "aml_cytomorphology_lmu" / "**" / "*.jpg"), recursive=True)
        ),
    }
    methods = {
        "area (this package)": dict(method="area"),
        "bilinear, antialias": dict(method="bilinear", antialias=True),
        "bicubic, antialias": dict(method="bicubic", antialias=True),
        "bilinear (plain)": dict(method="bilinear"),
    }
    results = []
    for label, files in sets.items():
        files = files[:: max(1, len(files) // 100)]
        if not files:
            continue
        for size in (224, 112):
            errors = {m: [] for m in methods}
            for f in files:
                pil = Image.open(f).convert("RGB")
                w, h = pil.size
                target = [int(v) for v in preprocessing.fit_size(h, w, size).numpy()]
                reference = np.asarray(
                    pil.resize((target[1], target[0]), Image.LANCZOS), np.float64
                )
                image = tf.io.decode_jpeg(
                    Path(f).read_bytes(), channels=3, dct_method="INTEGER_ACCURATE"
                )
                for m, kwargs in methods.items():
                    out = np.clip(
                        np.round(tf.image.resize(image, target, **kwargs).numpy()), 0, 255
                    )
                    errors[m].append(np.abs(out - reference).mean())
            # Cost: CPU time per image of decode + resize in a single-threaded
            # tf.data pipeline, minus that of the decode alone.
            encoded = [Path(f).read_bytes() for f in files]
            cpu = {m: [] for m in ("decode only", *methods)}
            for _ in range(max(3, _RUNS.value)):
                for m in cpu:
                    cpu[m].append(_resize_cpu_ms(encoded, size, methods.get(m)))
            decode_ms = statistics.median(cpu["decode only"])
            for m in methods:
                row = {
                    "images": label,
                    "size": size,
                    "method": m,
                    "mae_vs_lanczos": float(np.mean(errors[m])),
                    "ms_per_image": statistics.median(cpu[m]) - decode_ms,
                }
                logging.info("resize: %s", row)
                results.append(row)
    return results


# ------------------------------------------------------------------------ main
def _markdown(results: dict) -> str:
    lines = []
    if "throughput" in results:
        lines += [
            "Images per second (medians):",
            "",
            "| data set | images | (a) first epoch | (a) cached epochs | (a') first epoch, "
            "no cache | (b) keras baseline | (c) limit | (c2) limit, our resize |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in results["throughput"].items():
            m = r["median"]
            lines.append(
                f"| {name} | {r['images']} | {m['a_first']:.0f} | {m['a_cached']:.0f} | "
                f"{m['a_stream']:.0f} | {m['b']:.0f} | {m['c']:.0f} | {m['c2']:.0f} |"
            )
        lines += [
            "",
            "Ratios within each run: median [min, max]; minor page faults per image:",
            "",
            "| data set | (a) first / (c) | (a) first / (c2) | (a') / (c) | (a') / (c2) | "
            "(a) cached / (b) | faults (a) first | faults (a') | faults (c) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in results["throughput"].items():
            q, lo, hi = r["ratio_median"], r["ratio_min"], r["ratio_max"]
            f = r["minor_faults_per_image"]

            def cell(key, digits=2, q=q, lo=lo, hi=hi):
                return f"{q[key]:.{digits}f} [{lo[key]:.{digits}f}, {hi[key]:.{digits}f}]"

            lines.append(
                f"| {name} | {cell('a_first/c')} | {cell('a_first/c2')} | {cell('a_stream/c')} | "
                f"{cell('a_stream/c2')} | {cell('a_cached/b', 1)} | {f['a_first']:.1f} | "
                f"{f['a_stream']:.1f} | {f['c']:.1f} |"
            )
    if "fused" in results:
        lines += [
            "",
            "| images | n | size | DCT ratio | fused img/s | full img/s | speed-up | "
            "fused CPU ms/img | full CPU ms/img | mean abs diff | p99 | max |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["fused"]:
            lines.append(
                f"| {r['images']} | {r['count']} | {r['size']} | {r['ratio']} | "
                f"{r['fused_per_s']:.0f} | {r['full_per_s']:.0f} | {r['speedup']:.2f} | "
                f"{r['fused_cpu_ms']:.2f} | {r['full_cpu_ms']:.2f} | "
                f"{r['mean_abs_diff']:.2f} | {r['p99_abs_diff']:.0f} | {r['max_abs_diff']} |"
            )
    if "resize" in results:
        lines += [
            "",
            "| images | size | method | MAE vs Lanczos | resize CPU ms / image |",
            "|---|---|---|---|---|",
        ]
        for r in results["resize"]:
            lines.append(
                f"| {r['images']} | {r['size']} | {r['method']} | {r['mae_vs_lanczos']:.2f} | "
                f"{r['ms_per_image']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    data_root = Path(_DATA_ROOT.value).resolve()
    if not data_root.is_dir():
        raise app.UsageError(f"--data_root={_DATA_ROOT.value} does not exist")
    unknown = set(_DATASETS.value) - set(_SETS)
    if unknown:
        raise app.UsageError(f"--datasets: unknown {sorted(unknown)}; known: {list(_SETS)}")
    unknown = set(_SECTIONS.value) - {"throughput", "fused", "resize"}
    if unknown:
        raise app.UsageError(f"--sections: unknown {sorted(unknown)}")
    tf = _tf()
    data_dir = os.path.join(_WORK_DIR.value, "tfds")
    results: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "tensorflow": tf.__version__,
            "python": platform.python_version(),
        },
        "flags": {
            "image_size": _IMAGE_SIZE.value,
            "batch_size": _BATCH_SIZE.value,
            "runs": _RUNS.value,
            "cached_epochs": _CACHED_EPOCHS.value,
        },
    }
    names = [n for n in _DATASETS.value if (data_root / _SETS[n][2]).is_dir()]
    for missing in set(_DATASETS.value) - set(names):
        logging.warning("skipping %s: %s not found", missing, data_root / _SETS[missing][2])
    if "throughput" in _SECTIONS.value:
        results["throughput"] = throughput(data_root, data_dir, names)
    if "fused" in _SECTIONS.value:
        results["fused"] = fused(data_root)
    if "resize" in _SECTIONS.value:
        results["resize"] = resize(data_root)
    print(_markdown(results))
    if _OUTPUT.value:
        Path(_OUTPUT.value).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
