r"""CPU time per image of decode-and-resize variants (where the input's first epoch goes).

Single-threaded ``tf.data`` maps over JPEGs held in memory; median of
``--passes`` passes of process CPU time per image (so other jobs on the
machine change it little). Compares the plain limit (decode + bilinear
stretch, float32) with this package's ``decode_and_resize`` and cheaper
variants of it. Run from the repository root::

  python tools/bench_decode_variants.py --images='../shared/data/pbc/**/*.jpg' --size=224
"""

from __future__ import annotations

import glob
import statistics
import time

import tensorflow as tf
from absl import app, flags

from leukemia_tf.data import preprocessing as P

_IMAGES = flags.DEFINE_string("images", "../shared/data/pbc/**/*.jpg", "Glob of JPEG files.")
_LIMIT = flags.DEFINE_integer("limit", 600, "Images to use (the first N, sorted).")
_SIZE = flags.DEFINE_integer("size", 224, "Target size.")
_PASSES = flags.DEFINE_integer("passes", 3, "Timed passes (the median is reported).")


def variants(size: int) -> dict:
    def decode(e):
        return tf.io.decode_jpeg(e, channels=3, dct_method=P.JPEG_DCT_METHOD)

    def fitted(img):
        return P.fit_size(tf.shape(img)[0], tf.shape(img)[1], size)

    def pad_with(method):
        def fn(e):
            img = decode(e)
            target = fitted(img)
            out = P._to_uint8(tf.image.resize(img, target, method=method))
            return P._pad_to_square(out, target, size)

        return fn

    def crop_bilinear(e):
        img = decode(e)
        h, w = tf.shape(img)[0], tf.shape(img)[1]
        m = tf.minimum(h, w)
        top, left = (h - m) // 2, (w - m) // 2
        img = img[top : top + m, left : left + m]
        return P._to_uint8(tf.image.resize(img, [size, size], method="bilinear"))

    return {
        "decode only": decode,
        "(c) decode + bilinear stretch, float32": lambda e: tf.image.resize(
            tf.io.decode_jpeg(e, channels=3), [size, size]
        ),
        "decode_and_resize (this package)": lambda e: P.decode_and_resize(e, size),
        "decode_and_resize, fused=False": lambda e: P.decode_and_resize(e, size, fused=False),
        "decode + the package's crop/resize/pad": lambda e: P.resize_and_pad(decode(e), size),
        "area + round + pad": pad_with("area"),
        "bilinear + round + pad": pad_with("bilinear"),
        "centre crop + bilinear + round": crop_bilinear,
        "bilinear stretch + round": lambda e: P._to_uint8(
            tf.image.resize(decode(e), [size, size], method="bilinear")
        ),
    }


def main(argv) -> None:
    del argv
    files = sorted(glob.glob(_IMAGES.value, recursive=True))[: _LIMIT.value]
    if not files:
        raise app.UsageError(f"--images={_IMAGES.value!r} matches no file")
    blobs = [open(f, "rb").read() for f in files]
    source = tf.data.Dataset.from_tensor_slices(blobs)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    times: dict[str, list[float]] = {}
    for _ in range(_PASSES.value):
        for name, fn in variants(_SIZE.value).items():
            ds = source.map(fn, num_parallel_calls=1).with_options(options)
            for _ in ds.take(5):
                pass
            start = time.process_time()
            for _ in ds:
                pass
            times.setdefault(name, []).append((time.process_time() - start) / len(blobs) * 1e3)
    limit = statistics.median(times["(c) decode + bilinear stretch, float32"])
    print(f"{len(blobs)} images from {_IMAGES.value!r} to {_SIZE.value} px\n")
    print("| map | CPU ms / image | (c) / map |\n|---|---|---|")
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"| {name} | {ms:.2f} | {'' if name == 'decode only' else f'{limit / ms:.2f}'} |")


if __name__ == "__main__":
    app.run(main)
