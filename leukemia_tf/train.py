r"""Trains a leukemia classifier: ``python -m leukemia_tf.train --flagfile=configs/X.flags``.

Every flag is a field of :class:`leukemia_tf.training.config.TrainConfig`
(``--helpfull`` lists them with their help). The resolved configuration and an
equivalent flagfile are written into ``--model_dir``; a killed run resumes
when started again with the same ``--model_dir``.

With ``--from_embeddings=DIR`` (a feature store written by
``python -m leukemia_tf.embed``) only the head is fitted, on the stored
features (``--probe=linear|mlp|knn``), into an ordinary run directory; flags
the store fixes (backbone, weights, image size, data sets, label mode,
taxonomy, erase_marks, data_dir) default to its values.

Example::

  python -m leukemia_tf.train --flagfile=configs/quickstart.flags
  python -m leukemia_tf.train --from_embeddings=stores/pbc --probe=knn --model_dir=runs/pbc_knn
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

from absl import flags

from leukemia_tf import cli
from leukemia_tf.training import config as config_lib

config_lib.define_flags()


def preflight(config: config_lib.TrainConfig) -> None:
    """Every check that can fail before training starts, in the order a user fixes them.

    Nothing is created on disk before these pass: flag values, a finished
    ``--model_dir`` without ``--overwrite``, then data set, config and split
    names (TFDS metadata only).

    Raises:
      cli.UserError: naming the flag, its value and the valid values.
    """
    config.validate()
    config_lib.check_model_dir(config)
    if config.from_embeddings:
        from leukemia_tf.embedding import probe_lib  # imports TensorFlow

        probe_lib.check_config(config)  # the store, instead of the data sets
        return
    from leukemia_tf.data import names  # imports TensorFlow

    names.check_datasets(
        config.datasets,
        {"train_split": config.train_split, "val_split": config.val_split},
        config.data_dir or None,
    )


def main(argv: Sequence[str]) -> None:
    cli.check_no_args(argv)
    config = config_lib.TrainConfig.from_flags(flags.FLAGS)
    if config.from_embeddings:
        from leukemia_tf.embedding import probe_lib

        # Backbone, weights, image size, data sets, ... not given: the store's.
        given = {name for name in config.field_names() if flags.FLAGS[name].present}
        config = probe_lib.resolve_config(config, given)
    preflight(config)

    from leukemia_tf.training import train_lib  # heavy imports after flag parsing

    try:
        result = train_lib.train(config)
    except train_lib.Preempted as e:
        # The status of a process ended by SIGTERM, after the resumable checkpoint.
        cli.fail(e, 128 + signal.SIGTERM)
    except train_lib.NonFiniteError as e:
        cli.fail(e, 1)  # the run failed; the message says how to restart it
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in result.best_metrics.items())
    print(
        f"\nBest epoch {result.best_epoch + 1}: {metrics or '(no validation split)'}\n"
        f"Best model: {result.best_model_path}  ({result.wall_time_s:.0f} s)\n"
        "Next:\n"
        f"  python -m leukemia_tf.evaluate --model_dir={result.model_dir} --split=test\n"
        f"  python -m leukemia_tf.export --model_dir={result.model_dir} "
        f"--export_dir={result.model_dir}/export"
    )


if __name__ == "__main__":
    cli.run(main)
