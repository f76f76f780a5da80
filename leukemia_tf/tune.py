r"""Searches hyperparameters and architectures: ``python -m leukemia_tf.tune --flagfile=...``.

Every training flag of ``leukemia_tf.train`` (less ``--model_dir``,
``--overwrite`` and ``--monitor``) sets the base configuration of every
trial; the search flags (``--helpfull`` lists them) set the tuner, the
objective, ``--tune_dir`` and the search space. A training flag given
explicitly (``--learning_rate=1e-3``) fixes that hyperparameter; its search
flag (``--learning_rate_range=1e-4,3e-3``) searches it. ``--epochs`` is the
length of one full trial (Hyperband's maximum budget). See
:mod:`leukemia_tf.tuning.tune_lib` for what ``--tune_dir`` holds.

``--cv_folds=K`` cross-validates every trial: the recipe's training and
validation splits are divided once into K folds grouped by patient (else
slide) and stratified by label (``--tune_dir/folds.json``, as
``leukemia_tf.crossval`` makes them), each trial trains K fold models and is
scored by the mean over folds of ``--objective``; the results table adds the
standard deviation and the per-fold values.

Examples::

  python -m leukemia_tf.tune --flagfile=configs/tune_smoke.flags
  python -m leukemia_tf.tune --flagfile=configs/tune.flags
  # a small set: score every trial by 5-fold cross-validation instead of one split
  python -m leukemia_tf.tune --flagfile=configs/tune.flags --cv_folds=5 --tune_dir=runs/tune_cv
  # continue an interrupted search, then retrain the best on train+validation and export it:
  python -m leukemia_tf.tune --flagfile=runs/tune/flags.txt --resume --retrain_best
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from leukemia_tf import cli
from leukemia_tf.tuning import search_space

search_space.define_all_flags()


def main(argv: Sequence[str]) -> None:
    cli.check_no_args(argv)
    base = search_space.base_config_from_flags(flags.FLAGS)
    search = search_space.SearchConfig.from_flags(flags.FLAGS)
    search_space.check_search(search, base)  # ConfigError: exit 2, one line

    from leukemia_tf.data import names  # imports TensorFlow

    # Before --tune_dir is touched: a typo in a data set or split name fails now,
    # not in the first trial.
    names.check_datasets(
        base.datasets,
        {"train_split": base.train_split, "val_split": base.val_split},
        base.data_dir or None,
    )

    from leukemia_tf.tuning import tune_lib  # heavy imports after flag parsing

    try:
        result = tune_lib.run_search(base, search)
    except tune_lib.SearchError as e:
        # The trials ran and kept failing: not a usage error (status 1), no traceback.
        raise cli.UserError(str(e), exit_code=1) from e
    if result.role == "worker":
        print("Worker finished: the chief writes the results.")
        return
    print(tune_lib.summary_text(result, search))


if __name__ == "__main__":
    cli.run(main)
