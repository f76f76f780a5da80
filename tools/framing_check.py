"""How much a model's decisions depend on how tightly its cells are framed, in its own lab.

Another laboratory frames its single-cell crops differently (PBC: a 360 px
field with the cell in the middle third; BCCD, Raabin-WBC: a tight box that
the cell fills). This check needs no other laboratory's images: it takes the
model's own test split at full resolution, keeps the central ``f`` of each
image's side for every ``--fractions`` f (1: the image as stored; 0.4: the cell
fills the frame), resizes that to the model's input size as ``predict`` does,
and counts the correct decisions per class. A model that reads the cell and not
its size in pixels keeps its accuracy as f shrinks (``--cell_crop``).

  python tools/framing_check.py --model_dir=runs/pbc_a --model_dir=runs/pbc_b \\
      --split=test --fractions=1,0.6,0.4 --data_dir=~/tensorflow_datasets

Prints a markdown table: accuracy per model and fraction, and per class.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def centre_crop(image, fraction: float):
    """The central square of ``fraction`` of the shorter side of a decoded ``[H, W, 3]`` image."""
    import tensorflow as tf

    shape = tf.shape(image)
    side = tf.cast(tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) * fraction, tf.int32)
    top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
    return image[top : top + side, left : left + side]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", action="append", required=True, help="a run (repeat)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--fractions", default="1,0.6,0.4")
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)

    import tensorflow_datasets as tfds

    from leukemia_tf import rundir
    from leukemia_tf.data import names as names_lib
    from leukemia_tf.data import preprocessing

    fractions = [float(f) for f in args.fractions.split(",")]
    rows = []
    for model_dir in args.model_dir:
        trained = rundir.load_trained_model(model_dir, trust=False)
        config = rundir.read_config(model_dir)
        size = trained.image_size
        names = trained.label_space.class_names
        if "," in config.datasets or ":" in config.datasets or config.label_mode != "native":
            sys.exit(f"{model_dir}: this check reads one data set with its native labels")
        builder = names_lib.get_builder(config.datasets, args.data_dir or config.data_dir or None)
        ds = builder.as_dataset(split=args.split, decoders={"image": tfds.decode.SkipDecoding()})
        encoded, labels = [], []
        for example in ds:
            encoded.append(example["image"])
            labels.append(int(example["label"]))
        labels = np.asarray(labels)
        for fraction in fractions:
            images = np.stack(
                [
                    preprocessing.resize_and_pad(
                        centre_crop(preprocessing.decode_image(e), fraction), size
                    ).numpy()
                    for e in encoded
                ]
            )
            probs = trained.probabilities(trained.outputs(images, batch_size=args.batch_size))
            pred = probs.argmax(axis=1)
            per_class = {
                names[c]: float(np.mean(pred[labels == c] == c))
                for c in range(len(names))
                if np.any(labels == c)
            }
            rows.append((model_dir, fraction, float(np.mean(pred == labels)), per_class))
    classes = list(rows[0][3])
    print("| model | framing (central fraction kept) | accuracy | " + " | ".join(classes) + " |")
    print("|---|---|---|" + "---|" * len(classes))
    for model_dir, fraction, accuracy, per_class in rows:
        print(
            f"| {os.path.basename(model_dir.rstrip('/'))} | {fraction:g} | {100 * accuracy:.1f} % | "
            + " | ".join(f"{100 * per_class[c]:.0f}" for c in classes)
            + " |"
        )


if __name__ == "__main__":
    main()
