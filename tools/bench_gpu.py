r"""Training throughput on one GPU against the CPU, and whether the input pipeline keeps up.

Run from the repository root on a machine with a GPU::

  python tools/bench_gpu.py                                   # the full table (~15-30 min)
  python tools/bench_gpu.py --datasets=pbc --data_dir=~/tensorflow_datasets
  python tools/bench_gpu.py --smoke                           # seconds, on a CPU

Every figure is images per second of the package's own training loop
(``leukemia_tf.training.train_lib.train``: augmentation, model, loss, AdamW,
everything a real run does, with ``--strategy=default``), measured over the
second of two epochs of ``--steps`` steps (the first absorbs tracing, XLA or
cuDNN autotuning and the shuffle-buffer fill). Each run is a fresh process:

* ``device``: ``gpu`` (the first GPU) or ``cpu`` (``CUDA_VISIBLE_DEVICES=""``);
* ``precision``: ``float32`` or ``mixed_float16`` (GPU only: a CPU has no fast
  float16, and the package's ``--precision=auto`` picks float32 there);
* ``input``: ``pipeline``, the real input pipeline (TFDS shards -> decode ->
  resize -> shuffle -> batch; the data set's first pass, so every image is
  decoded on the fly: the cached later epochs are at least as fast), or
  ``memory``, one batch of the same pipeline repeated from host memory (no
  reading or decoding), the step's own limit. ``pipeline / memory`` near 1
  means the input pipeline keeps up with the accelerator; well below 1, the
  accelerator waits for data.

The table (Markdown) goes to stdout and, with ``--output``, the raw results as
JSON. The GPU speed-up is against the CPU's float32 ``memory`` figure of the
same backbone. The default data set is the offline ``leukemia_synthetic``
(64 px PNGs: cheaper to decode than real 360 px JPEGs); pass
``--datasets=pbc --data_dir=...`` for a real set.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

_REPO = Path(__file__).resolve().parents[1]

_BACKBONES = flags.DEFINE_list(
    "backbones", ["efficientnetv2_b0", "convnext_tiny", "vit_small_patch16"], "Backbones."
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input size in pixels.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 40, "Steps per timed epoch on the GPU.")
_CPU_STEPS = flags.DEFINE_integer("cpu_steps", 4, "Steps per timed epoch on the CPU (slow).")
_PRECISIONS = flags.DEFINE_list(
    "precisions", ["float32", "mixed_float16"], "Precisions on the GPU (the CPU runs float32)."
)
_DEVICES = flags.DEFINE_list("devices", ["gpu", "cpu"], "Devices: gpu, cpu.")
_INPUTS = flags.DEFINE_list("inputs", ["pipeline", "memory"], "Inputs: pipeline, memory.")
_DATASETS = flags.DEFINE_string("datasets", "leukemia_synthetic", "Training data (--datasets).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "TFDS data_dir; empty: a folder in work_dir (leukemia_synthetic is built)."
)
_XLA = flags.DEFINE_bool("xla", False, "Compile the training step with XLA (--xla).")
_WORK_DIR = flags.DEFINE_string("work_dir", "", "Scratch folder; empty: a temporary one.")
_OUTPUT = flags.DEFINE_string("output", "", "Write the raw results (JSON) here.")
_TIMEOUT = flags.DEFINE_integer("timeout", 1800, "Seconds one run may take.")
_SMOKE = flags.DEFINE_bool(
    "smoke", False, "Tiny settings that finish in a minute on a CPU (cnn_tiny, 32 px, batch 8)."
)
_CHILD = flags.DEFINE_string("child", "", "(internal) run one measurement from this JSON.")


# ------------------------------------------------------------------- one run
def _run_child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import tensorflow as tf

    from leukemia_tf.training import inputs, train_lib
    from leukemia_tf.training.config import TrainConfig

    if spec["input"] == "memory":
        from bench_common import memory_input_fn

        inputs.train_input_fn = memory_input_fn(inputs.train_input_fn)
    config = TrainConfig(**spec["config"])
    result = train_lib.train(config)
    seconds = result.history[-1]["epoch_time_s"]
    gpus = tf.config.list_physical_devices("GPU")
    details = tf.config.experimental.get_device_details(gpus[0]) if gpus else {}
    out = {
        "images_per_s": config.steps_per_epoch * config.batch_size / seconds,
        "epoch_s": seconds,
        "first_epoch_s": result.history[0]["epoch_time_s"],
        "gpu": details.get("device_name", ""),
        "tensorflow": tf.__version__,
    }
    Path(spec["result"]).write_text(json.dumps(out))


def _measure(work: Path, data_dir: str, backbone: str, device: str, precision: str, source: str):
    name = f"{backbone}_{device}_{precision}_{source}"
    steps = _STEPS.value if device == "gpu" else _CPU_STEPS.value
    config = dict(
        datasets=_DATASETS.value,
        data_dir=data_dir,
        label_mode="native" if "," not in _DATASETS.value else "taxonomy",
        backbone=backbone,
        weights="none",
        image_size=_IMAGE_SIZE.value,
        batch_size=_BATCH.value,
        epochs=2,
        steps_per_epoch=steps,
        val_split="",
        precision=precision,
        strategy="default",
        xla=_XLA.value,
        cache="memory",
        verbose=0,
        model_dir=str(work / name),
        overwrite=True,
    )
    spec = work / f"{name}.json"
    result = work / f"{name}.result.json"
    spec.write_text(json.dumps({"config": config, "input": source, "result": str(result)}))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO), env.get("PYTHONPATH", "")])
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, f"--child={spec}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT.value,
        cwd=str(_REPO),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out.update(
        backbone=backbone,
        device=device,
        precision=precision,
        input=source,
        steps=steps,
        wall_s=time.time() - start,
    )
    print(
        f"  {name}: {out['images_per_s']:.1f} img/s ({out['wall_s']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return out


# ------------------------------------------------------------------- the table
def markdown_table(results: list[dict]) -> str:
    """One row per backbone, device and precision; images per second."""
    index = {(r["backbone"], r["device"], r["precision"], r["input"]): r for r in results}
    lines = [
        "| backbone | device | precision | pipeline img/s | memory img/s | pipeline / memory "
        "| speed-up vs CPU float32 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    rows = sorted({(r["backbone"], r["device"], r["precision"]) for r in results})
    for backbone, device, precision in rows:
        pipe = index.get((backbone, device, precision, "pipeline"))
        mem = index.get((backbone, device, precision, "memory"))
        cpu = index.get((backbone, "cpu", "float32", "memory")) or index.get(
            (backbone, "cpu", "float32", "pipeline")
        )
        best = mem or pipe

        def fmt(r):
            return f"{r['images_per_s']:.1f}" if r else "-"

        ratio = f"{pipe['images_per_s'] / mem['images_per_s']:.2f}" if pipe and mem else "-"
        speedup = (
            f"{best['images_per_s'] / cpu['images_per_s']:.1f}x"
            if device == "gpu" and cpu and best
            else "-"
        )
        lines.append(
            f"| {backbone} | {device} | {precision} | {fmt(pipe)} | {fmt(mem)} | {ratio} "
            f"| {speedup} |"
        )
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ensure_data(data_dir: str) -> None:
    import tensorflow_datasets as tfds

    import tfds_builders  # noqa: F401  (registers the builders)
    from leukemia_tf.data.build_data_lib import build

    if _DATASETS.value != "leukemia_synthetic":
        return  # the engine's error says how to build any other set
    if not tfds.builder("leukemia_synthetic", data_dir=data_dir).is_prepared():
        print(f"Building leukemia_synthetic into {data_dir} ...", file=sys.stderr, flush=True)
        build("leukemia_synthetic", data_dir=data_dir)


def run_bench(work_dir: str, data_dir: str) -> list[dict]:
    """Runs every (backbone, device, precision, input) measurement; returns the results."""
    import tensorflow as tf

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or str(work / "tfds")
    _ensure_data(data_dir)
    devices = list(_DEVICES.value)
    if "gpu" in devices and not tf.config.list_physical_devices("GPU"):
        print("No GPU found: measuring the CPU only.", file=sys.stderr)
        devices.remove("gpu")
    results = []
    for backbone in _BACKBONES.value:
        for device in devices:
            precisions = _PRECISIONS.value if device == "gpu" else ["float32"]
            for precision in precisions:
                for source in _INPUTS.value:
                    results.append(_measure(work, data_dir, backbone, device, precision, source))
    return results


def main(argv) -> None:
    del argv
    if _CHILD.value:
        _run_child(_CHILD.value)
        return
    if _SMOKE.value:
        flags.FLAGS.backbones = ["cnn_tiny"]
        flags.FLAGS.image_size = 32
        flags.FLAGS.batch_size = 8
        flags.FLAGS.steps = 3
        flags.FLAGS.cpu_steps = 3
    work_dir = _WORK_DIR.value or tempfile.mkdtemp(prefix="bench_gpu_")
    data_dir = os.path.expanduser(_DATA_DIR.value) if _DATA_DIR.value else ""
    results = run_bench(work_dir, data_dir)
    gpu = next((r["gpu"] for r in results if r["gpu"]), "none")
    print(
        f"\nTraining throughput (images/s), {_DATASETS.value}, {_IMAGE_SIZE.value} px, "
        f"batch {_BATCH.value}, xla={_XLA.value}; GPU: {gpu}; CPU: {_cpu_name()} "
        f"x{os.cpu_count()}; TensorFlow {results[0]['tensorflow'] if results else '?'}; "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print(markdown_table(results))
    if _OUTPUT.value:
        Path(_OUTPUT.value).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
