r"""Trains a leukemia classifier: ``python -m leukemia_tf.train --flagfile=configs/X.flags``.

Every flag is a field of :class:`leukemia_tf.training.config.TrainConfig`
(``--helpfull`` lists them with their help). The resolved configuration and an
equivalent flagfile are written into ``--model_dir``; a killed run resumes
when started again with the same ``--model_dir``.

Example::

  python -m leukemia_tf.train --flagfile=configs/quickstart.flags
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from leukemia_tf.training import config as config_lib

config_lib.define_flags()


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_lib.TrainConfig.from_flags(flags.FLAGS)
    try:
        config.validate()
    except config_lib.ConfigError as e:
        raise app.UsageError(str(e)) from e

    from leukemia_tf.training import train_lib  # heavy imports after flag parsing

    result = train_lib.train(config)
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
    app.run(main)
