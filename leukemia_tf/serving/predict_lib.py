"""Batch inference on image files: ``predictions.csv`` per cell, and per slide.

Inputs (``--images``):

* a folder: every image file below it (recursively; extensions
  ``images.IMAGE_EXTENSIONS``), sorted;
* a glob (``'smears/**/*.png'``, recursive ``**`` allowed): every file it matches;
* a CSV file (``*.csv``): one row per image, its path in ``--path_column``
  (default ``path``, as in the ``leukemia_folder`` builder's ``metadata.csv``;
  relative paths are relative to the CSV's folder). A ``slide_id`` /
  ``patient_id`` column (``--slide_column`` / ``--patient_column``) adds a
  slide / patient level CSV.

Each file is read the way the data set builders read it
(:func:`leukemia_tf.data.images.read_image`: odd formats such as TIFF, CMYK,
16-bit or RGBA are converted to 8-bit RGB) and decoded and resized by
:func:`leukemia_tf.data.preprocessing.decode_and_resize`, exactly the pixels
the model was trained and evaluated on. The predictions come from
:func:`leukemia_tf.serving.signatures.postprocess`, the same code as the
exported SavedModel's outputs.

Outputs, next to ``--output`` (default ``predictions.csv``):

* ``predictions.csv``: ``file``, the group columns, ``predicted_class``,
  ``probability`` (of the predicted class), ``prob_<class>`` for every class,
  and for a hierarchical model ``level_<k>_decision`` and
  ``level_<k>_probability`` per taxonomy level (the top-down greedy decision;
  empty below the level where it reaches a leaf);
* ``predictions_errors.csv``: every file that could not be read, with the
  reason (header only when none failed); each is also logged to stderr. A
  file a data set build would refuse is refused here with the same reason,
  e.g. a JPEG cut short behind an end-of-image marker, or an image over
  ``images.MAX_IMAGE_PIXELS`` by its header (never decoded);
* ``predictions_slides.csv`` / ``predictions_patients.csv``: per group,
  ``n_cells``, ``n_failed``, the majority vote and the mean-probability
  prediction (:func:`leukemia_tf.evaluation.aggregate.aggregate`).

One unreadable file never stops the rest; the result (and the command's exit
status) says how many failed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import glob
import os
import sys
from collections.abc import Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from leukemia_tf import rundir
from leukemia_tf.data import images as images_lib
from leukemia_tf.data import preprocessing
from leukemia_tf.models import trust as trust_lib
from leukemia_tf.serving import portable, signatures

DEFAULT_PATH_COLUMN = "path"
DEFAULT_SLIDE_COLUMN = "slide_id"
DEFAULT_PATIENT_COLUMN = "patient_id"
DEFAULT_LABEL_COLUMN = "label"

#: ``--adapt_bn`` value: adapt the BatchNorm statistics on the images being predicted.
ADAPT_INPUTS = "inputs"

#: Files read ahead of the model, per reader thread.
_READ_AHEAD_PER_THREAD = 4


@dataclasses.dataclass(frozen=True)
class InputImage:
    """One image to predict: its path and its group ids (e.g. ``{"slide_id": "s1"}``)."""

    path: str
    groups: dict[str, str] = dataclasses.field(default_factory=dict)
    error: str | None = None  # set when the input itself is unusable (e.g. an empty CSV cell)
    label: str | None = None  # the CSV's label column, when one was asked for (evaluation)


@dataclasses.dataclass(frozen=True)
class PredictResult:
    """What :func:`predict` wrote and how many files failed."""

    output: str
    errors_file: str
    group_files: dict[str, str]  # group column -> CSV path
    num_images: int
    num_predicted: int
    num_failed: int
    failures: list[tuple[str, str]]  # (path, reason)
    #: ``--adapt_bn``: what was adapted (:meth:`AdaptResult.metadata`), else None.
    adaptation: dict | None = None
    adaptation_file: str | None = None
    #: Images referred to a human (``referred`` column); None without a fitted threshold.
    num_referred: int | None = None
    #: Why there are no feature scores, referral or back-off (no trust statistics), else None.
    trust_note: str | None = None


# ------------------------------------------------------------------- inputs
def _has_glob_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _resolve_group_column(
    columns: Sequence[str], requested: str | None, default: str, flag: str, csv_path: str
) -> str | None:
    if requested is None:
        return default if default in columns else None
    if requested not in columns:
        raise ValueError(
            f"--{flag}={requested!r}: no such column in {csv_path} (columns: {', '.join(columns)})"
        )
    return requested


def read_csv_inputs(
    csv_path: str | os.PathLike,
    path_column: str = DEFAULT_PATH_COLUMN,
    slide_column: str | None = None,
    patient_column: str | None = None,
    label_column: str | None = None,
) -> tuple[list[InputImage], list[str]]:
    """The images listed in a CSV file.

    Args:
      csv_path: the CSV (UTF-8, header row).
      path_column: column holding each image's path; a relative path is
        relative to the CSV's folder.
      slide_column: slide id column; ``None``: ``slide_id`` if present.
      patient_column: patient id column; ``None``: ``patient_id`` if present.
      label_column: column of each image's label (evaluation), read into
        ``InputImage.label``; ``None``: no labels.

    Returns:
      ``(images, group_columns)``: the rows in file order (a row with an
      empty path is kept with its ``error`` set), and the group columns found.

    Raises:
      ValueError: the path or label column, or an explicitly requested group
        column, is missing.
    """
    csv_path = os.fspath(csv_path)
    base = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if path_column not in columns:
            raise ValueError(
                f"{csv_path}: no {path_column!r} column with the image paths (columns: "
                f"{', '.join(columns) or 'none'}); name it with --path_column"
            )
        if label_column is not None and label_column not in columns:
            raise ValueError(
                f"{csv_path}: no {label_column!r} column with the labels (columns: "
                f"{', '.join(columns) or 'none'}); name it with --label_column"
            )
        group_columns = [
            c
            for c in (
                _resolve_group_column(
                    columns, slide_column, DEFAULT_SLIDE_COLUMN, "slide_column", csv_path
                ),
                _resolve_group_column(
                    columns, patient_column, DEFAULT_PATIENT_COLUMN, "patient_column", csv_path
                ),
            )
            if c is not None
        ]
        out = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            raw = row.get(path_column, "")
            groups = {c: row.get(c, "") for c in group_columns}
            label = None if label_column is None else row.get(label_column, "")
            if not raw:
                out.append(
                    InputImage(
                        f"{csv_path}:{line}",
                        groups,
                        error=f"empty {path_column!r} in line {line}",
                        label=label,
                    )
                )
                continue
            path = os.path.expanduser(raw)
            out.append(
                InputImage(
                    path if os.path.isabs(path) else os.path.join(base, path), groups, label=label
                )
            )
    return out, group_columns


def collect_inputs(
    images: str,
    path_column: str = DEFAULT_PATH_COLUMN,
    slide_column: str | None = None,
    patient_column: str | None = None,
) -> tuple[list[InputImage], list[str]]:
    """Resolves ``--images`` (folder, glob or CSV) into a list of images.

    Args:
      images: a folder, a glob, a single image file, or a ``.csv`` file.
      path_column: see :func:`read_csv_inputs`.
      slide_column: see :func:`read_csv_inputs`; only for a CSV input.
      patient_column: see :func:`read_csv_inputs`; only for a CSV input.

    Returns:
      ``(images, group_columns)``.

    Raises:
      FileNotFoundError: nothing to predict at ``images``.
      ValueError: a group column requested for a folder or glob input.
    """
    if not images:
        raise ValueError("--images is empty: give a folder, a glob or a CSV file")
    expanded = os.path.expanduser(images)
    if expanded.lower().endswith(".csv") and os.path.isfile(expanded):
        found, group_columns = read_csv_inputs(expanded, path_column, slide_column, patient_column)
    else:
        for flag, value in (("slide_column", slide_column), ("patient_column", patient_column)):
            if value is not None:
                raise ValueError(
                    f"--{flag}={value!r} needs a CSV input (--images=list.csv with that column); "
                    f"--images={images!r} is a folder or glob"
                )
        group_columns = []
        if os.path.isdir(expanded):
            paths = images_lib.image_files_under(expanded)
        elif os.path.isfile(expanded):
            paths = [expanded]
        elif _has_glob_magic(expanded):
            paths = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        else:
            raise FileNotFoundError(f"--images={images!r}: no such file or folder")
        found = [InputImage(p) for p in paths]
    if not found:
        raise FileNotFoundError(f"--images={images!r}: no image files found")
    return found, group_columns


# ---------------------------------------------------------------- inference
def _read(item: InputImage) -> tuple[bytes | None, str | None]:
    if item.error:
        return None, item.error
    try:
        return images_lib.read_image(item.path)[0], None
    except images_lib.BadImageError as e:
        return None, e.reason


def _read_ahead(
    items: Sequence[InputImage], threads: int
) -> Iterator[tuple[int, bytes | None, str | None]]:
    """``(index, bytes or None, error or None)`` in input order, read by a thread pool.

    At most ``threads * _READ_AHEAD_PER_THREAD`` files are held in memory.
    """
    window = max(1, threads * _READ_AHEAD_PER_THREAD)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        pending: collections.deque = collections.deque()
        for index, item in enumerate(items):
            pending.append((index, pool.submit(_read, item)))
            if len(pending) >= window:
                i, future = pending.popleft()
                yield (i, *future.result())
        while pending:
            i, future = pending.popleft()
            yield (i, *future.result())


def decoded_batches(
    items: Sequence[InputImage],
    image_size: int,
    batch_size: int,
    read_threads: int,
    failures: dict[int, str],
) -> Iterator[tuple[np.ndarray, tf.Tensor]]:
    """The images of ``items``, read, decoded and resized, in batches in input order.

    The one reading of image files for the model (``predict`` and the
    evaluation of labelled image folders): each file is read by
    :func:`leukemia_tf.data.images.read_image` and decoded and resized by
    :func:`leukemia_tf.data.preprocessing.decode_and_resize`.

    Args:
      items: the images.
      image_size: the model's input size.
      batch_size: images per batch.
      read_threads: threads reading (and validating) files.
      failures: filled with ``{index: reason}`` of every image that could not
        be read or decoded (each is also logged); complete once the iterator
        is exhausted.

    Yields:
      ``(indices, pixels)``: int64 ``[B]`` indices into ``items`` and
      ``uint8 [B, S, S, 3]`` pixels.
    """

    def readable() -> Iterator[tuple[int, bytes]]:
        for index, data, error in _read_ahead(items, read_threads):
            if error is not None:
                failures[index] = error
                logging.error("cannot read %s: %s", items[index].path, error)
                continue
            yield index, data

    ds = tf.data.Dataset.from_generator(
        readable,
        output_signature=(tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string)),
    )
    ds = ds.map(
        lambda i, b: (i, preprocessing.decode_and_resize(b, image_size)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    # A file PIL reads but TensorFlow cannot decode is rare; it must still be
    # reported, not kill the run: it goes missing here and is listed below.
    ds = ds.ignore_errors(log_warning=False).batch(batch_size).prefetch(2)

    def undecodable(i: int) -> None:
        failures[i] = "TensorFlow cannot decode this image"
        logging.error("cannot decode %s: %s", items[i].path, failures[i])

    seen: set[int] = set()
    checked = 0  # every index below this one is decoded or failed
    for indices, pixels in ds:
        indices = indices.numpy()
        seen.update(int(i) for i in indices)
        last = int(indices[-1]) + 1
        for i in range(checked, last):
            if i not in seen and i not in failures:
                undecodable(i)
        checked = last
        yield indices, pixels
    for i in range(checked, len(items)):
        if i not in seen and i not in failures:
            undecodable(i)


def read_pixels(
    items: Sequence[InputImage], image_size: int, *, read_threads: int = 8, batch_size: int = 64
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The images of ``items`` read, decoded and resized exactly as :func:`predict` does.

    Args:
      items: the images (:func:`collect_inputs`).
      image_size: the side S of the model's input.
      read_threads: threads reading files.
      batch_size: images decoded per step.

    Returns:
      ``(pixels, failures)``: uint8 ``[N, S, S, 3]`` of the readable images in
      input order, and ``(path, reason)`` of the others.
    """
    failures: dict[int, str] = {}
    chunks = [
        pixels.numpy()
        for _, pixels in decoded_batches(items, image_size, batch_size, read_threads, failures)
    ]
    pixels = (
        np.concatenate(chunks) if chunks else np.zeros((0, image_size, image_size, 3), np.uint8)
    )
    return pixels, [(items[i].path, failures[i]) for i in sorted(failures)]


def _format(value: float) -> str:
    return f"{value:.6f}"


def predict(
    model_dir: str | os.PathLike | None,
    images: str,
    output: str | os.PathLike = "predictions.csv",
    *,
    which: str = "best",
    batch_size: int = 64,
    apply_temperature: bool = False,
    path_column: str = DEFAULT_PATH_COLUMN,
    slide_column: str | None = None,
    patient_column: str | None = None,
    read_threads: int = 8,
    verbose: int = 1,
    tta: bool = False,
    adapt_bn: str = "",
    model: str | os.PathLike | None = None,
) -> PredictResult:
    """Predicts every image of ``images`` and writes the CSV files.

    Args:
      model_dir: a training run's output directory (local or ``gs://``); None
        with ``model``.
      model: instead of a run, a portable model file exported by this package
        (``.tflite``, :func:`leukemia_tf.serving.portable.load`). The same
        images give the same CSV columns; ``which``, ``apply_temperature``,
        ``tta`` and ``adapt_bn`` were fixed at export and are refused here.
      images: a folder, a glob or a CSV file (see the module docstring).
      output: the cell-level CSV; the errors and group CSVs go next to it
        (``<stem>_errors.csv``, ``<stem>_slides.csv``, ``<stem>_patients.csv``).
      which: ``"best"``, ``"last"`` or a ``.keras`` file.
      batch_size: images per model call.
      tta: test-time augmentation (mean logits over the 8 rotations and
        mirrorings; ``TrainedModel.tta``).
      apply_temperature: divide the logits by the temperature stored in
        ``model_dir/calibration.json``.
      path_column: CSV input: the column with the image paths.
      slide_column: CSV input: slide id column (``None``: ``slide_id`` if present).
      patient_column: CSV input: patient id column (``None``: ``patient_id`` if present).
      read_threads: threads reading (and validating) files.
      verbose: 1 shows a progress bar on stdout, 0 is quiet.
      adapt_bn: AdaBN (:mod:`leukemia_tf.models.adapt`): ``""`` (off),
        ``"inputs"`` (re-estimate the BatchNorm statistics on the very images
        being predicted, transductively) or a folder, glob or CSV of
        unlabelled target-domain images (read as the inputs are). The
        predictions then come from an adapted copy of the model (the run
        directory is not touched); ``<stem>_adaptation.json`` records it.

    Returns:
      A :class:`PredictResult` (``num_failed`` files are listed in ``errors_file``).

    Raises:
      FileNotFoundError: no model, no images, or ``apply_temperature``
        without a stored temperature.
      ValueError: a bad flag value or CSV (the message names it).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch_size={batch_size!r}: must be a positive integer")
    if (model_dir is None) == (model is None):
        raise ValueError("give exactly one of --model_dir (a training run) and --model (a file)")
    items, group_columns = collect_inputs(images, path_column, slide_column, patient_column)
    adapt_bn = (adapt_bn or "").strip()
    if adapt_bn == ADAPT_INPUTS:
        adapt_paths, adapt_source = [i.path for i in items if not i.error], f"inputs ({images})"
    elif adapt_bn:
        found, _ = collect_inputs(adapt_bn, path_column)  # fail before loading the model
        adapt_paths, adapt_source = [i.path for i in found if not i.error], adapt_bn
    if model is not None:
        fixed = {
            "which": which != "best",
            "apply_temperature": apply_temperature,
            "tta": tta,
            "adapt_bn": bool(adapt_bn),
        }
        for flag, given in fixed.items():
            if given:
                raise ValueError(
                    f"--{flag} applies to a training run (--model_dir); --model={model} was "
                    "exported with it fixed (its export.json says how)"
                )
        portable_model = portable.load(model)
        meta = portable_model.metadata
        image_size = portable_model.image_size
        table = _Table(
            class_names=list(meta["class_names"]),
            levels=[list(level) for level in meta.get("taxonomy_levels") or ()],
            trust_keys=list(meta["trust_outputs"]),
            selection=meta.get("selection"),
        )
        trust_note = None
        if not set(trust_lib.FEATURE_SCORES) & set(table.trust_keys):
            trust_note = (
                "this model was exported without trust statistics: no mahalanobis/knn_distance "
                "scores, no referral, no predicted_node"
            )

        def predict_batch(pixels):
            return portable_model(pixels.numpy())

        adaptation = None

    else:
        predict_batch, table, image_size, adaptation, trust_note = _run_model(
            model_dir,
            which=which,
            batch_size=batch_size,
            apply_temperature=apply_temperature,
            read_threads=read_threads,
            tta=tta,
            adapt_bn=adapt_bn,
            adapt_paths=adapt_paths if adapt_bn else None,
            adapt_source=adapt_source if adapt_bn else None,
        )
    failures: dict[int, str] = {}
    progress = keras.utils.Progbar(
        len(items), verbose=verbose, unit_name="image", stateful_metrics=["failed"]
    )
    done: dict[int, dict[str, np.ndarray]] = {}
    for indices, pixels in decoded_batches(items, image_size, batch_size, read_threads, failures):
        outputs = predict_batch(pixels)
        for row, index in enumerate(indices):
            done[int(index)] = {k: v[row] for k, v in outputs.items()}
        if verbose:
            progress.update(
                len(done) + len(failures), values=[("failed", len(failures))], finalize=False
            )
    if verbose:
        progress.update(len(items), values=[("failed", len(failures))], finalize=True)

    output = os.path.abspath(os.path.expanduser(os.fspath(output)))
    os.makedirs(os.path.dirname(output), exist_ok=True)
    stem = os.path.splitext(output)[0]
    _write_cells(output, items, done, group_columns, table)
    errors_file = f"{stem}_errors.csv"
    _write_errors(errors_file, items, failures, group_columns)
    group_files = {}
    for column in group_columns:
        name = {DEFAULT_SLIDE_COLUMN: "slides", DEFAULT_PATIENT_COLUMN: "patients"}.get(
            column, column
        )
        path = f"{stem}_{name}.csv"
        if _write_groups(path, column, items, done, failures, table.class_names, table.selection):
            group_files[column] = path
    adaptation_file = f"{stem}_adaptation.json"
    if adaptation is not None:
        rundir.write_json(adaptation_file, {"adapted_batchnorm": adaptation})
    else:
        # A record left by an earlier adapted run must not describe these predictions.
        if os.path.exists(adaptation_file):
            os.remove(adaptation_file)
        adaptation_file = None
    failed = sorted(failures)
    referred = None
    if table.selection is not None:
        referred = sum(bool(out[trust_lib.REFERRED]) for out in done.values())
    return PredictResult(
        output=output,
        errors_file=errors_file,
        group_files=group_files,
        num_images=len(items),
        num_predicted=len(done),
        num_failed=len(failed),
        failures=[(items[i].path, failures[i]) for i in failed],
        adaptation=adaptation,
        adaptation_file=adaptation_file,
        num_referred=referred,
        trust_note=trust_note,
    )


@dataclasses.dataclass(frozen=True)
class _Table:
    """What the CSV writers need to know of a model's outputs."""

    class_names: list[str]
    levels: list[list[str]]  # taxonomy levels of a hierarchical head, else []
    trust_keys: list[str]  # trust_lib.output_keys of the model
    selection: dict | None  # the fitted referral (trust statistics), or None


def _run_model(
    model_dir,
    *,
    which,
    batch_size,
    apply_temperature,
    read_threads,
    tta,
    adapt_bn,
    adapt_paths,
    adapt_source,
):
    """The batch function, output table, input size, adaptation and trust note of a run."""
    model_dir = rundir.check_model_dir(model_dir)
    if apply_temperature:
        rundir.check_calibration(model_dir)
    trained = rundir.load_trained_model(model_dir, which=which, float32=True, tta=tta)
    adaptation = None
    if adapt_bn:
        from leukemia_tf.models import adapt

        trained, adaptation = adapt.adapt_trained(
            trained,
            adapt_paths,
            batch_size=batch_size,
            read_threads=read_threads,
            source=adapt_source,
        )
    temperature = trained.temperature if apply_temperature else 1.0
    label_space = trained.label_space
    image_size = trained.image_size

    stats = trained.trust
    trust_note = None
    if trained.ensemble is not None:
        trust_note = trust_lib.ENSEMBLE_HAS_NO_FEATURES
        logging.warning("%s", trust_note)
    elif stats is None:
        trust_note = (
            f"no trust statistics for this model: no mahalanobis/knn_distance scores, no "
            f"referral, no predicted_node; fit them with {trust_lib.fit_command(model_dir)}"
        )
        logging.warning("%s", trust_note)

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
    def forward(pixels):
        outputs = trained.forward(tf.cast(pixels, tf.float32), features=stats is not None)
        return signatures.postprocess(outputs, label_space, temperature, stats)

    def predict_batch(pixels):
        return {k: v.numpy() for k, v in forward(pixels).items()}

    table = _Table(
        class_names=list(trained.class_names),
        levels=[list(level) for level in trained.taxonomy.levels]
        if label_space.head == "hierarchical"
        else [],
        trust_keys=trust_lib.output_keys(stats),
        selection=stats.selection if stats is not None else None,
    )
    return predict_batch, table, image_size, adaptation, trust_note


# ------------------------------------------------------------------ writers
def _write_cells(
    path: str,
    items: Sequence[InputImage],
    done: dict[int, dict[str, np.ndarray]],
    group_columns: Sequence[str],
    table: _Table,
) -> None:
    class_names = table.class_names
    levels = table.levels
    header = ["file", *group_columns, "predicted_class", "probability"]
    header += [f"prob_{name}" for name in class_names]
    for k in range(len(levels)):
        header += [f"level_{k}_decision", f"level_{k}_probability"]
    trust_keys = [k for k in table.trust_keys if k != trust_lib.PREDICTED_NODE_PROBABILITY]
    header += trust_keys
    with rundir.open_whole(path, newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for index in sorted(done):
            out = done[index]
            item = items[index]
            probs = out[signatures.PROBABILITIES]
            class_id = int(out[signatures.CLASS_IDS])
            row = [item.path, *(item.groups.get(c, "") for c in group_columns)]
            row += [class_names[class_id], _format(probs[class_id])]
            row += [_format(p) for p in probs]
            for k, nodes in enumerate(levels):
                decision = out[signatures.level_names_key(k)].decode("utf-8")
                level_probs = out[signatures.level_probabilities_key(k)]
                row += [decision, _format(level_probs[nodes.index(decision)]) if decision else ""]
            row += [_trust_cell(out[key]) for key in trust_keys]
            writer.writerow(row)


def _trust_cell(value) -> str:
    """A trust output as a CSV cell: a score, ``true``/``false``, or a node name."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.bool_ | bool):
        return "true" if value else "false"
    return _format(float(value))


def _write_errors(
    path: str, items: Sequence[InputImage], failures: dict[int, str], group_columns: Sequence[str]
) -> None:
    with rundir.open_whole(path, newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", *group_columns, "error"])
        for index in sorted(failures):
            item = items[index]
            writer.writerow(
                [item.path, *(item.groups.get(c, "") for c in group_columns), failures[index]]
            )


def _write_groups(
    path: str,
    column: str,
    items: Sequence[InputImage],
    done: dict[int, dict[str, np.ndarray]],
    failures: dict[int, str],
    class_names: Sequence[str],
    selection: dict | None = None,
) -> bool:
    """Writes the group-level CSV; returns False (and writes nothing) without any group id.

    With a fitted referral threshold, ``n_referred`` counts the group's
    referred cells and ``referred`` is true when more than the fitted
    ``max_referred_fraction`` of them are (or all).
    """
    from leukemia_tf.evaluation.aggregate import aggregate

    indices = [i for i in sorted(done) if items[i].groups.get(column)]
    no_id = len(done) - len(indices)
    if no_id:
        logging.warning(
            "%d predicted image(s) have no %s and are left out of %s", no_id, column, path
        )
    if not indices:
        logging.warning("no image has a %s: %s not written", column, path)
        return False
    probs = np.stack([done[i][signatures.PROBABILITIES] for i in indices])
    pooled = aggregate([items[i].groups[column] for i in indices], probs)
    failed_per_group = collections.Counter(
        items[i].groups.get(column, "") for i in failures if items[i].groups.get(column)
    )
    header = [column, "n_cells", "n_failed", "majority_prediction", "majority_votes"]
    header += ["mean_prediction", "mean_probability"]
    header += [f"mean_prob_{name}" for name in class_names]
    header += [f"votes_{name}" for name in class_names]
    referred_per_group: collections.Counter = collections.Counter()
    if selection is not None:
        header += ["n_referred", "referred"]
        referred_per_group = collections.Counter(
            items[i].groups[column] for i in indices if bool(done[i][trust_lib.REFERRED])
        )
    with rundir.open_whole(path, newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for g, group in enumerate(pooled["group_ids"]):
            majority = int(pooled["majority_prediction"][g])
            mean = int(pooled["mean_prediction"][g])
            votes = pooled["vote_counts"][g]
            mean_probs = pooled["mean_probs"][g]
            writer.writerow(
                [
                    group,
                    int(pooled["n_cells"][g]),
                    failed_per_group.get(group, 0),
                    class_names[majority],
                    int(votes[majority]),
                    class_names[mean],
                    _format(mean_probs[mean]),
                    *(_format(p) for p in mean_probs),
                    *(int(v) for v in votes),
                    *_group_referral(group, pooled["n_cells"][g], referred_per_group, selection),
                ]
            )
    return True


def _group_referral(group, n_cells, referred_per_group, selection) -> list:
    """``[n_referred, referred]`` cells of a group row (nothing without a selection)."""
    if selection is None:
        return []
    n_referred = referred_per_group.get(group, 0)
    fraction = n_referred / max(int(n_cells), 1)
    referred = n_referred == n_cells or fraction > selection["max_referred_fraction"]
    return [n_referred, "true" if referred else "false"]


def summary(result: PredictResult) -> str:
    """A human-readable summary of a :class:`PredictResult`."""
    lines = [
        f"Predicted {result.num_predicted} of {result.num_images} image(s): {result.output}",
    ]
    for column, path in result.group_files.items():
        lines.append(f"  per {column}: {path}")
    if result.num_referred is not None:
        lines.append(
            f"  referred to a human (column 'referred'): {result.num_referred} of "
            f"{result.num_predicted}"
        )
    if result.trust_note:
        lines.append(f"  {result.trust_note}")
    if result.adaptation is not None:
        a = result.adaptation
        if a["adapted"]:
            lines.append(
                f"  from an ADAPTED copy of the model: BatchNorm statistics of {a['layers']} "
                f"layer(s) re-estimated on {a['count']} image(s) of {a['images']} (AdaBN; "
                f"recorded in {result.adaptation_file})"
            )
        else:
            lines.append(f"  --adapt_bn: {a['note']}")
    if result.num_failed:
        lines.append(
            f"FAILED: {result.num_failed} image(s) could not be read, listed in {result.errors_file}:"
        )
        shown = result.failures[:20]
        lines += [f"  {path}: {reason}" for path, reason in shown]
        if result.num_failed > len(shown):
            lines.append(f"  ... and {result.num_failed - len(shown)} more")
    return "\n".join(lines)


def print_summary(result: PredictResult) -> None:
    """Prints :func:`summary` (failures to stderr)."""
    print(summary(result), file=sys.stderr if result.num_failed else sys.stdout)
