r"""Grouped k-fold cross-validation of a training recipe: ``python -m leukemia_tf.crossval``.

Splits the recipe's training and validation data (``--cv_splits`` to choose
other splits) into ``--folds`` folds, ``--repeats`` times, grouped by patient,
else slide, and stratified by label (``DIR/folds.json``), trains one ordinary
run per fold in ``DIR/fold_<i>/`` and writes the combined report
(``DIR/crossval_report.md``, ``crossval_metrics.json``, ``crossval_folds.png``).
``--ensemble`` averages the finished fold models into one model, ``DIR/ensemble``
(the mean of their probabilities; a run directory that ``evaluate``,
``predict`` and ``export`` take), and scores it next to each fold model on the
test split (``DIR/ensemble_report.md``, ``ensemble_metrics.json``).
See :mod:`leukemia_tf.crossval_lib`.

Examples::

  # every fold, one after another, then the report
  python -m leukemia_tf.crossval --flagfile=configs/cpu_pbc.flags --folds=5 --model_dir=runs/cv_pbc
  # spread over machines: one fold each (a shared --model_dir), then the report
  python -m leukemia_tf.crossval --flagfile=configs/cpu_pbc.flags --folds=5 --model_dir=runs/cv_pbc --fold=3
  python -m leukemia_tf.crossval --model_dir=runs/cv_pbc --aggregate
  # the finished fold models averaged as one model (runs/cv_pbc/ensemble), scored on the test split
  python -m leukemia_tf.crossval --model_dir=runs/cv_pbc --ensemble
  python -m leukemia_tf.evaluate --model_dir=runs/cv_pbc/ensemble --split=test
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from leukemia_tf import cli
from leukemia_tf.training import config as config_lib

config_lib.define_flags()

_FOLDS = flags.DEFINE_integer("folds", 5, "Number of folds K (>= 2).")
_REPEATS = flags.DEFINE_integer(
    "repeats", 1, "Independent fold assignments (seeds --seed + r); folds are numbered over them."
)
_FOLD = flags.DEFINE_integer(
    "fold", None, "Train only this fold (0 .. K*R-1), e.g. one per machine; then --aggregate."
)
_AGGREGATE = flags.DEFINE_bool(
    "aggregate",
    False,
    "Only combine the finished folds of --model_dir into the report (no training); names the "
    "unfinished ones.",
)
_ENSEMBLE = flags.DEFINE_bool(
    "ensemble",
    False,
    "Only build DIR/ensemble from the finished folds of --model_dir (no training): one model "
    "whose probabilities are the mean of the fold models' probabilities, an ordinary run "
    "directory for evaluate, predict and export; then score it and each fold model on "
    "--test_split (DIR/ensemble_report.md). Names the unfinished folds it leaves out.",
)
_REPEAT = flags.DEFINE_string(
    "repeat",
    "all",
    "--ensemble: the repeat whose folds are averaged (0 .. R-1), or 'all' (every finished fold).",
)
_TEST_SPLIT = flags.DEFINE_string(
    "test_split", "test", "--ensemble: the split the fold models and the ensemble are scored on."
)
_CV_SPLITS = flags.DEFINE_string(
    "cv_splits",
    "",
    "The split the folds divide (TFDS syntax). Empty: the recipe's --train_split + --val_split. "
    "Give e.g. 'train+validation+test' to pool all labelled data (nothing is then held out).",
)
_BOOTSTRAP = flags.DEFINE_integer(
    "bootstrap", 1000, "Bootstrap resamples of the pooled intervals (0: none).", lower_bound=0
)
_EVAL_BATCH_SIZE = flags.DEFINE_integer(
    "eval_batch_size", 64, "Batch size of the out-of-fold predictions.", lower_bound=1
)


def _print_result(result: dict) -> None:
    summary = result["summary"]
    lines = [
        f"{len(result['finished'])} of {result['num_folds'] * result['repeats']} folds finished"
        + (
            f"; not finished: {', '.join(f'fold_{i}' for i in result['unfinished'])}"
            if result["unfinished"]
            else ""
        ),
        "  per fold (mean ± sd): "
        + ", ".join(
            f"{m} {summary[m]['mean']:.4f} ± {summary[m]['sd'] or 0:.4f}"
            for m in ("accuracy", "balanced_accuracy", "macro_f1")
            if summary[m]["mean"] is not None
        ),
    ]
    for pooled in result["pooled"]:
        metrics = pooled["metrics"]
        lines.append(
            f"  pooled out-of-fold, repeat {pooled['repeat']} ({pooled['n_examples']} examples): "
            f"accuracy {metrics['accuracy']:.4f}, balanced accuracy "
            f"{metrics['balanced_accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"
        )
    lines.append(f"Report: {result['report_path']}")
    print("\n".join(lines))


def _parse_repeat(value: str) -> int | None:
    """``--repeat``: None for 'all', else the repeat's number."""
    value = value.strip().lower()
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise cli.UserError(
            f"--repeat={value!r}: give a repeat's number (0, 1, ...) or 'all'"
        ) from None


def _print_ensemble(result: dict) -> None:
    single, combined = result["single_models"], result["ensemble"]
    metrics = ("accuracy", "balanced_accuracy", "macro_f1")
    lines = [
        f"Ensemble of {len(result['folds'])} fold models "
        f"({', '.join(f'fold_{i}' for i in result['folds'])}) in {result['ensemble_dir']}: "
        f"{result['averaging']}",
    ]
    if result["not_finished_left_out"]:
        lines.append(
            "  not finished (left out): "
            + ", ".join(f"fold_{i}" for i in result["not_finished_left_out"])
        )
    lines += [
        f"  on {result['split']!r} ({result['n_examples']} examples"
        + ("" if result["held_out"] else "; NOT held out: part of the folds' split")
        + ")",
        "  single models (mean ± sd): "
        + ", ".join(
            f"{m} {single[m]['mean']:.4f} ± {single[m]['sd'] or 0:.4f}"
            for m in metrics
            if single[m]["mean"] is not None
        ),
        "  ensemble: "
        + ", ".join(f"{m} {combined[m]:.4f}" for m in metrics if combined[m] is not None),
        f"Report: {result['report_path']}",
    ]
    print("\n".join(lines))


def main(argv: Sequence[str]) -> None:
    cli.check_no_args(argv)
    from leukemia_tf import crossval_lib  # heavy imports after flag parsing

    model_dir = flags.FLAGS.model_dir
    if _ENSEMBLE.value:
        if _AGGREGATE.value:
            raise cli.UserError("--ensemble and --aggregate: give one of them")
        if not model_dir:
            raise cli.UserError("--ensemble needs --model_dir (the cross-validation directory)")
        _print_ensemble(
            crossval_lib.ensemble(
                model_dir,
                _parse_repeat(_REPEAT.value),
                _TEST_SPLIT.value,
                _EVAL_BATCH_SIZE.value,
            )
        )
        return
    if _AGGREGATE.value:
        if not model_dir:
            raise cli.UserError("--aggregate needs --model_dir (the cross-validation directory)")
        _print_result(
            crossval_lib.aggregate(
                model_dir, _BOOTSTRAP.value, _EVAL_BATCH_SIZE.value, flags.FLAGS.seed
            )
        )
        return
    config = config_lib.TrainConfig.from_flags(flags.FLAGS)
    config.validate()
    if _FOLDS.value < 2:
        raise cli.UserError(f"--folds={_FOLDS.value}: need at least 2 folds")
    if _REPEATS.value < 1:
        raise cli.UserError(f"--repeats={_REPEATS.value}: need at least 1")
    from leukemia_tf.data import names

    names.check_datasets(
        config.datasets,
        {
            "train_split": config.train_split,
            "val_split": config.val_split,
            "cv_splits": _CV_SPLITS.value,
        },
        config.data_dir or None,
    )
    crossval_lib.run(config, _FOLDS.value, _REPEATS.value, _CV_SPLITS.value, _FOLD.value)
    if _FOLD.value is None:
        _print_result(
            crossval_lib.aggregate(
                config.model_dir, _BOOTSTRAP.value, _EVAL_BATCH_SIZE.value, config.seed
            )
        )
    else:
        print(
            f"Fold {_FOLD.value} done. Once the others have finished: python -m "
            f"leukemia_tf.crossval --model_dir={config.model_dir} --aggregate"
        )


if __name__ == "__main__":
    cli.run(main)
