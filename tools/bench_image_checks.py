r"""CPU ms per image of the input checks (JPEG cut short, oversized header) on real JPEGs.

Compares, on the same files, the decode without and with the checks, for the
Python path (Pillow: the builders and ``predict`` through
``images.read_image``) and the serving path (``decode_and_resize`` against
``decode_and_resize_checked``). Interleaved repeats; the minimum of each, as
wall and CPU time (the machine may be shared).

Example::

  python tools/bench_image_checks.py --images='../shared/data/pbc/**/*.jpg'
"""

from __future__ import annotations

import glob
import io
import time

from absl import app, flags

_IMAGES = flags.DEFINE_string("images", None, "Glob of JPEG files (recursive).", required=True)
_COUNT = flags.DEFINE_integer("count", 200, "Files taken, spread evenly over the glob.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Interleaved repeats; the minimum is reported.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Serving input size.")


def main(argv) -> None:
    del argv
    import tensorflow as tf
    from PIL import Image

    from leukemia_tf.data import images, preprocessing

    files = sorted(glob.glob(_IMAGES.value, recursive=True))
    if not files:
        raise SystemExit(f"--images={_IMAGES.value!r} matches no file")
    files = files[:: max(1, len(files) // _COUNT.value)][: _COUNT.value]
    data = [open(f, "rb").read() for f in files]
    size, spec = _SIZE.value, [tf.TensorSpec([], tf.string)]
    plain = tf.function(
        lambda e: preprocessing.decode_and_resize(e, size), input_signature=spec, autograph=False
    )
    checked = tf.function(
        lambda e: preprocessing.decode_and_resize_checked(e, size),
        input_signature=spec,
        autograph=False,
    )

    def pil_load(d):
        with Image.open(io.BytesIO(d)) as im:
            im.load()

    def pil_check(d):
        with Image.open(io.BytesIO(d)) as im:
            im.load()
            assert not images.jpeg_is_cut_short(d, im)

    def tf_checked(d):
        _, problem = checked(d)
        assert problem.numpy() == b""

    methods = {
        "Pillow decode (no check)": pil_load,
        "Pillow decode + cut-short probe": pil_check,
        "serving decode_and_resize": lambda d: plain(d).numpy(),
        "serving decode_and_resize_checked": tf_checked,
    }
    for fn in methods.values():
        for d in data[:5]:
            fn(d)
    best = {k: [float("inf"), float("inf")] for k in methods}
    for _ in range(_REPEATS.value):
        for name, fn in methods.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for d in data:
                fn(d)
            best[name][0] = min(best[name][0], (time.perf_counter() - wall) / len(data) * 1e3)
            best[name][1] = min(best[name][1], (time.process_time() - cpu) / len(data) * 1e3)
    print(f"{len(data)} files of {_IMAGES.value}, best of {_REPEATS.value}:")
    print("| method | wall ms/image | CPU ms/image |\n|---|---|---|")
    for name, (wall, cpu) in best.items():
        print(f"| {name} | {wall:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    app.run(main)
