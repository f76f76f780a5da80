"""Which acquisition difference breaks a model, measured on its own laboratory's test images.

Each row applies one controlled change to every test image of the model's own
data set (at the model's input size, with the functions of
``leukemia_tf.models.acquisition``) and reports the accuracy and the class the
model then calls most often. No other laboratory's images are needed, so the
result can guide which invariance a recipe needs without looking at a test
set of another lab:

* ``stain xA``: every dye's optical density times A (a paler, A < 1, or darker stain);
* ``blur sN``: a Gaussian defocus of N pixels;
* ``low resolution /K``: down-sampled by K and back (a camera or objective with less detail);
* ``colour cast``: the channels scaled by (0.83, 0.93, 1.0), a bluer lamp or white balance;
* ``gamma G``: the camera's tone curve;
* ``framing F``: only the central F of each image's side, at full resolution (a tighter crop).

  python tools/shift_sensitivity.py --model_dir=runs/pbc_a --model_dir=runs/pbc_b \\
      --split=test --data_dir=~/tensorflow_datasets
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _changes(size: int):
    import tensorflow as tf

    from leukemia_tf.models import acquisition as acq

    def stain(factor):
        def apply(x):
            n = x.shape[0]
            return acq.stain_jitter(
                x, tf.fill([n, 2], factor), tf.zeros([n, 2]), tf.zeros([n, 2, 3])
            )

        return apply

    def blur(sigma):
        return lambda x: acq.gaussian_blur(x, tf.fill([x.shape[0]], sigma))

    def low_res(k):
        return lambda x: tf.image.resize(
            tf.image.resize(x, (size // k, size // k), antialias=True), (size, size)
        )

    def cast(x):
        gains = tf.tile(tf.constant([[0.83, 0.93, 1.0]]), [x.shape[0], 1])
        return acq.illumination(x, gains, tf.zeros([x.shape[0], 3]))

    def gamma(g):
        return lambda x: acq.gamma_curve(x, tf.fill([x.shape[0]], g))

    return [
        ("none", lambda x: x),
        ("stain x0.6", stain(0.6)),
        ("stain x0.4", stain(0.4)),
        ("stain x1.5", stain(1.5)),
        ("blur s1.5", blur(1.5)),
        ("blur s3", blur(3.0)),
        ("low resolution /3", low_res(3)),
        ("colour cast", cast),
        ("gamma 0.7", gamma(0.7)),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", action="append", required=True, help="a run (repeat)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--framings", default="0.6,0.4", help="central fractions kept")
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)

    import tensorflow as tf
    import tensorflow_datasets as tfds

    from leukemia_tf import rundir
    from leukemia_tf.data import names as names_lib
    from leukemia_tf.data import preprocessing

    table = {}
    columns = []
    for model_dir in args.model_dir:
        trained = rundir.load_trained_model(model_dir, trust=False)
        config = rundir.read_config(model_dir)
        if "," in config.datasets or ":" in config.datasets or config.label_mode != "native":
            sys.exit(f"{model_dir}: this check reads one data set with its native labels")
        size = trained.image_size
        names = trained.label_space.class_names
        builder = names_lib.get_builder(config.datasets, args.data_dir or config.data_dir or None)
        ds = builder.as_dataset(split=args.split, decoders={"image": tfds.decode.SkipDecoding()})
        encoded, labels = [], []
        for example in ds:
            encoded.append(example["image"])
            labels.append(int(example["label"]))
        labels = np.asarray(labels)
        images = tf.constant(
            np.stack([preprocessing.decode_and_resize(e, size).numpy() for e in encoded]),
            tf.float32,
        )

        def score(batch_images, names=names, labels=labels, trained=trained):
            probs = trained.probabilities(
                trained.outputs(np.asarray(batch_images), batch_size=args.batch_size)
            )
            pred = probs.argmax(axis=1)
            counts = np.bincount(pred, minlength=len(names))
            return f"{100 * np.mean(pred == labels):.1f} % ({names[counts.argmax()]})"

        name = os.path.basename(model_dir.rstrip("/"))
        columns.append(name)
        for change, apply in _changes(size):
            table.setdefault(change, {})[name] = score(apply(images))
        for fraction in [float(f) for f in args.framings.split(",") if f]:
            framed = np.stack(
                [
                    preprocessing.resize_and_pad(
                        _centre(preprocessing.decode_image(e), fraction), size
                    ).numpy()
                    for e in encoded
                ]
            ).astype(np.float32)
            table.setdefault(f"framing {fraction:g}", {})[name] = score(framed)
    print(
        "| change (every test image) | "
        + " | ".join(f"{c}: accuracy (most called)" for c in columns)
        + " |"
    )
    print("|---|" + "---|" * len(columns))
    for change, row in table.items():
        print(f"| {change} | " + " | ".join(row.get(c, "") for c in columns) + " |")


def _centre(image, fraction: float):
    """The central square of ``fraction`` of the shorter side of a decoded ``[H, W, 3]`` image."""
    import tensorflow as tf

    shape = tf.shape(image)
    side = tf.cast(tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) * fraction, tf.int32)
    top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
    return image[top : top + side, left : left + side]


if __name__ == "__main__":
    main()
