r"""How the referral reacts to mild acquisition shifts of the run's own test images.

The out-of-distribution gate (``mahalanobis`` by default) refers every image
of another laboratory; this checks the other side: how many of the run's own
test images it refers once they are shifted a little (stain, scale, blur,
illumination, gamma, noise, JPEG: ``leukemia_tf.models.acquisition``), and
what the accuracy among the answered images becomes. Magnitude 0 is the
test split as it is.

  python tools/trust_shift_check.py --model_dir=runs/cpu_pbc --magnitudes=0,0.1,0.2,0.4
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import tensorflow as tf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--magnitudes", default="0,0.1,0.2,0.4")
    parser.add_argument("--shifts", default="all")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from leukemia_tf import rundir, trust_lib
    from leukemia_tf.data import names, pipeline
    from leukemia_tf.models import acquisition, trust

    trained = rundir.load_trained_model(args.model_dir)
    if trained.trust is None:
        raise SystemExit(f"error: no trust statistics: {trust.fit_command(args.model_dir)}")
    config = trained.config
    specs = names.parse_datasets(config.datasets)
    shifts = acquisition.parse_shifts(args.shifts)
    print(
        "| magnitude | accuracy (all) | referred | out of distribution | accuracy (answered) |\n"
        "|---|---|---|---|---|"
    )
    for magnitude in [float(m) for m in args.magnitudes.split(",")]:
        tf.random.set_seed(args.seed)
        layer = acquisition.AcquisitionShift(shifts, magnitude=magnitude, probability=1.0)
        ds = pipeline.load_split(
            specs,
            args.split,
            data_dir=args.data_dir or config.data_dir or None,
            image_size=config.image_size,
            batch_size=args.batch_size,
            training=False,
            label_mode=config.label_mode,
            taxonomy=trained.taxonomy,
            cache=False,
            deterministic=True,
        )
        correct, referred, unfamiliar = [], [], []
        for batch in ds:
            pixels = tf.cast(batch["image"], tf.float32)
            pixels = tf.clip_by_value(layer(pixels, training=True), 0.0, 255.0)
            outputs = {k: v.numpy() for k, v in trained.forward(pixels, features=True).items()}
            scores = trust_lib.scores_of(outputs, trained, trained.trust)
            probs = trained.label_space.probabilities(outputs).numpy()
            correct.append(probs.argmax(axis=1) == batch["label"].numpy())
            referred.append(scores[trust.REFERRED])
            unfamiliar.append(scores.get(trust.OUT_OF_DISTRIBUTION, np.zeros(len(probs), bool)))
        correct, referred, unfamiliar = map(np.concatenate, (correct, referred, unfamiliar))
        answered = ~referred
        accuracy = correct[answered].mean() if answered.any() else float("nan")
        print(
            f"| {magnitude:g} | {correct.mean():.1%} | {referred.mean():.1%} "
            f"| {unfamiliar.mean():.1%} | {accuracy:.1%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
