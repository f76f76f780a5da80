"""Labelled image files from outside the model's data sets, as an evaluated split.

The reading side of ``python -m leukemia_tf.evaluate --images=FOLDER_OR_CSV``:

* :func:`read_labelled_images`: a folder whose sub-folders are the labels
  (``FOLDER/<label>/**/*.jpg``), or a CSV file with a path and a label column
  (read by :func:`leukemia_tf.serving.predict_lib.read_csv_inputs`, with its
  path, slide and patient columns);
* :func:`resolve_labels`: each label onto a class of the model (native
  labels) or a taxonomy node (taxonomy labels; a node at any level), through
  an optional label map (``{"their label": "class or node", "junk": null}``);
* :func:`predict_images`: the model over the files, read, decoded and resized
  by :func:`leukemia_tf.serving.predict_lib.decoded_batches`, the reading of
  ``python -m leukemia_tf.predict``, and decided by
  :func:`leukemia_tf.serving.signatures.postprocess`, its decision: the same
  images get the same decisions through both commands.

The result is an :class:`~leukemia_tf.evaluation.predictions.EvaluatedSplit`
like a TFDS split's, so the report's sections score it unchanged
(:func:`leukemia_tf.evaluation.evaluate_lib.evaluate_images`). For a taxonomy
model a label coarser than the model's classes (e.g. ``leukemia``) names no
class: such images are scored at the taxonomy levels their label reaches
only, and the class-level sections score the images whose label is a class or
lies below one.

:func:`restricted_scores` scores the decisions restricted to the classes
present in the labels (the argmax over those classes only) beside the
decisions as predicted.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf
import yaml

from leukemia_tf import rundir
from leukemia_tf.data import images as images_lib
from leukemia_tf.data import names
from leukemia_tf.evaluation import explain as explain_lib
from leukemia_tf.evaluation import metrics as metrics_lib
from leukemia_tf.evaluation.predictions import EvaluatedSplit, SplitPredictions
from leukemia_tf.serving import predict_lib, signatures

#: File of the per-image decisions in the report folder.
PREDICTIONS_FILE = "predictions.csv"


class LabelError(ValueError):
    """A label of the images, or an entry of the label map, names nothing the model knows."""


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """Where the labelled images are and how to read their labels (the binary's flags).

    Attributes:
      images: a folder of label folders, or a ``.csv`` file.
      label_map: a JSON or YAML file ``{their label: class or node, or null}``.
      label_column: CSV input: the label column.
      path_column: CSV input: the image path column.
      slide_column: CSV input: slide id column (``None``: ``slide_id`` if present).
      patient_column: CSV input: patient id column (``None``: ``patient_id`` if present).
      read_threads: threads reading image files.
    """

    images: str
    label_map: str | None = None
    label_column: str = predict_lib.DEFAULT_LABEL_COLUMN
    path_column: str = predict_lib.DEFAULT_PATH_COLUMN
    slide_column: str | None = None
    patient_column: str | None = None
    read_threads: int = 8

    @property
    def path(self) -> str:
        """``images``, absolute."""
        return os.path.abspath(os.path.expanduser(self.images))

    @property
    def is_csv(self) -> bool:
        return self.path.lower().endswith(".csv") and os.path.isfile(self.path)

    @property
    def name(self) -> str:
        """The folder's name or the CSV file's stem (``bccd``)."""
        base = os.path.basename(self.path.rstrip(os.sep))
        return os.path.splitext(base)[0] if self.is_csv else base


# ------------------------------------------------------------------- inputs
def read_labelled_images(source: ImageSource) -> tuple[list[predict_lib.InputImage], list[str]]:
    """The images of ``source`` with their labels (``InputImage.label``).

    Returns:
      ``(images, group_columns)``: in folder order (sorted paths) or CSV row
      order; a CSV row without a label has ``label == ""``.

    Raises:
      FileNotFoundError: no such folder or CSV file, or no image files in it.
      ValueError: a folder with image files outside a label folder, group
        columns asked for a folder, or a CSV without the named columns.
    """
    given = source.images
    path = source.path
    if source.is_csv:
        items, group_columns = predict_lib.read_csv_inputs(
            path,
            source.path_column,
            source.slide_column,
            source.patient_column,
            label_column=source.label_column,
        )
    elif os.path.isdir(path):
        for flag, value in (
            ("slide_column", source.slide_column),
            ("patient_column", source.patient_column),
        ):
            if value is not None:
                raise ValueError(
                    f"--{flag}={value!r} needs a CSV input (--images=list.csv with that column); "
                    f"--images={given!r} is a folder"
                )
        group_columns = []
        items = []
        loose = []
        for file in images_lib.image_files_under(path):
            parts = os.path.relpath(file, path).split(os.sep)
            if len(parts) < 2:
                loose.append(file)
            else:
                items.append(predict_lib.InputImage(file, label=parts[0]))
        if loose:
            raise ValueError(
                f"--images={given!r}: {len(loose)} image file(s) directly in the folder (e.g. "
                f"{loose[0]}); a labelled folder holds one sub-folder per label "
                "(FOLDER/<label>/<image>), or give a CSV file with a label column"
            )
    else:
        raise FileNotFoundError(f"--images={given!r}: no such folder or CSV file")
    if not items:
        raise FileNotFoundError(f"--images={given!r}: no image files found")
    return items, group_columns


def read_label_map(path: str | os.PathLike) -> dict[str, str | None]:
    """``{their label: class or node, or None}`` from a JSON or YAML file.

    Raises:
      FileNotFoundError: no such file.
      LabelError: not a JSON / YAML object of strings (or nulls), naming the file.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--label_map={path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise LabelError(f"--label_map={path!r}: not valid JSON or YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise LabelError(
            f"--label_map={path!r}: expected an object {{'their label': 'class', 'junk': null}}, "
            f"got {type(data).__name__}"
        )
    out: dict[str, str | None] = {}
    for key, value in data.items():
        if value is not None and not isinstance(value, str | int):
            raise LabelError(
                f"--label_map={path!r}: {key!r} maps to {value!r}; give a class name or null"
            )
        out[str(key)] = None if value is None else str(value)
    return out


# ------------------------------------------------------------------- labels
@dataclasses.dataclass(frozen=True)
class Targets:
    """What the labels can name: the model's classes, or every node of its taxonomy.

    Attributes:
      names: the names a label may take.
      kind: ``"class"`` or ``"taxonomy node"`` (for messages).
      class_names: the model's classes.
      taxonomy: the model's taxonomy (taxonomy labels), else ``None``.
    """

    names: list[str]
    kind: str
    class_names: list[str]
    taxonomy: object | None = None

    @classmethod
    def of(cls, trained: rundir.TrainedModel) -> Targets:
        if trained.taxonomy is not None and trained.config.label_mode == "taxonomy":
            return cls(
                list(trained.taxonomy.nodes), "taxonomy node", trained.class_names, trained.taxonomy
            )
        return cls(list(trained.class_names), "class", trained.class_names)

    def match(self, name: str) -> str | None:
        """``name`` as one of :attr:`names`: exact, else the one case-insensitive match."""
        return _match(name, self.names)

    def class_index(self, target: str) -> int:
        """The model's class for a target: itself, the class above it (taxonomy), or -1.

        -1: a taxonomy node coarser than the model's classes (or beside them),
        scored at the taxonomy levels only.
        """
        if self.taxonomy is None:
            return self.class_names.index(target)
        path = self.taxonomy.path(target)
        for node in reversed(path):  # the deepest class on the path
            if node in self.class_names:
                return self.class_names.index(node)
        return -1

    def levels(self, target: str) -> np.ndarray | None:
        """The target's level encoding (taxonomy labels), else ``None``."""
        return None if self.taxonomy is None else self.taxonomy.encode(target)

    def depth(self, target: str) -> int | None:
        return None if self.taxonomy is None else self.taxonomy.depth(target)


def _match(name: str, choices: Sequence[str]) -> str | None:
    if name in choices:
        return name
    folded = [c for c in choices if c.casefold() == name.casefold()]
    return folded[0] if len(folded) == 1 else None


def resolve_labels(
    labels: Sequence[str],
    targets: Targets,
    label_map: Mapping[str, str | None] | None,
    source: str,
    map_path: str | None = None,
) -> dict[str, str | None]:
    """Each distinct label onto a target (a class or node), or ``None`` (dropped).

    A label in ``label_map`` (exactly, else case-insensitively) takes its
    entry; any other label must be a target's name itself (exactly, else the
    one case-insensitive match).

    Args:
      labels: the labels of the images (duplicates allowed).
      targets: what labels may name (:meth:`Targets.of`).
      label_map: ``{their label: target or None}``, or ``None``.
      source: the folder or CSV, for messages.
      map_path: the label map's file, for messages.

    Returns:
      ``{label: target name, or None for a label mapped to null}``.

    Raises:
      LabelError: a label map entry names no target (naming the map file), or
        labels that are neither mapped nor a target (naming them, the source
        and the targets).
    """
    label_map = dict(label_map or {})
    known = ", ".join(targets.names)
    for their, target in label_map.items():
        if target is not None and targets.match(target) is None:
            raise LabelError(
                f"--label_map={map_path!r} maps {their!r} to {target!r}, which is not a "
                f"{targets.kind} of the model (known: {known})"
            )
    out: dict[str, str | None] = {}
    unknown = []
    for label in dict.fromkeys(labels):
        key = _match(label, list(label_map))
        if key is not None:
            target = label_map[key]
            out[label] = None if target is None else targets.match(target)
            continue
        matched = targets.match(label)
        if matched is None:
            unknown.append(label)
        out[label] = matched
    if unknown:
        where = f" nor in --label_map={map_path!r}" if map_path else ""
        listed = ", ".join(repr(u) for u in unknown)
        raise LabelError(
            f"label{'s' if len(unknown) > 1 else ''} {listed} of --images={source!r} "
            f"{'are' if len(unknown) > 1 else 'is'} not a {targets.kind} of the model{where} "
            f"(known: {known}); map {'them' if len(unknown) > 1 else 'it'} with "
            '--label_map=FILE ({"their label": "class"}, or null to leave it out)'
        )
    return out


# ----------------------------------------------------------------- the set
@dataclasses.dataclass(frozen=True)
class LabelledImages:
    """The images of a source with their labels resolved (before any is read).

    Attributes:
      source: where they came from.
      items: the images whose label names a target (in input order).
      targets: per item, its target (class or node).
      group_columns: the CSV's slide / patient columns.
      resolved: ``{label: target or None}``.
      label_map: the map used (``{}`` without one).
      counts: images per label (all of them, dropped ones too).
      dropped: images per label mapped to null.
      n_unlabelled: CSV rows without a label (left out).
    """

    source: ImageSource
    items: list[predict_lib.InputImage]
    targets: list[str]
    group_columns: list[str]
    resolved: dict[str, str | None]
    label_map: dict[str, str | None]
    counts: dict[str, int]
    dropped: dict[str, int]
    n_unlabelled: int

    @property
    def n_images(self) -> int:
        return sum(self.counts.values()) + self.n_unlabelled


def labelled_images(source: ImageSource, targets: Targets) -> LabelledImages:
    """Reads ``source`` and resolves its labels (:func:`read_labelled_images`, :func:`resolve_labels`).

    Raises:
      FileNotFoundError, ValueError: see those functions; also a set whose
        every label is dropped.
    """
    items, group_columns = read_labelled_images(source)
    label_map = read_label_map(source.label_map) if source.label_map else {}
    labelled = [item for item in items if item.label]
    resolved = resolve_labels(
        [item.label for item in labelled],
        targets,
        label_map,
        source.images,
        source.label_map,
    )
    counts = dict(collections.Counter(item.label for item in labelled))
    kept = [item for item in labelled if resolved[item.label] is not None]
    if not kept:
        raise LabelError(
            f"--images={source.images!r}: no image left to evaluate (labels "
            f"{sorted(counts)} all mapped to null, or no labels)"
        )
    return LabelledImages(
        source=source,
        items=kept,
        targets=[resolved[item.label] for item in kept],
        group_columns=group_columns,
        resolved=resolved,
        label_map=label_map,
        counts=counts,
        dropped={label: n for label, n in counts.items() if resolved[label] is None},
        n_unlabelled=len(items) - len(labelled),
    )


@dataclasses.dataclass(frozen=True)
class ImagePredictions:
    """The model over a :class:`LabelledImages`: the evaluated images and what was decided.

    Attributes:
      images: the labelled images.
      index: ``[N]`` indices into ``images.items`` of the images read (in order).
      class_labels: ``[N]`` each image's class (-1: a node coarser than the classes).
      outputs: the model's raw outputs ``{key: [N, ...]}``.
      probs: ``[N, C]`` class probabilities at temperature 1 (``postprocess``).
      y_pred: ``[N]`` decisions, ``postprocess``'s ``class_ids`` (``predict``'s).
      levels: ``[N, L]`` level encodings of the labels (taxonomy labels), else ``None``.
      failures: ``{item index: reason}`` of the images that could not be read.
    """

    images: LabelledImages
    index: np.ndarray
    class_labels: np.ndarray
    outputs: dict[str, np.ndarray]
    probs: np.ndarray
    y_pred: np.ndarray
    levels: np.ndarray | None
    failures: dict[int, str]


def predict_images(
    trained: rundir.TrainedModel,
    images: LabelledImages,
    targets: Targets,
    batch_size: int,
    sampler: explain_lib.ExampleSampler | None = None,
    features: bool = False,
) -> ImagePredictions:
    """Runs the model over the images as ``predict`` does, keeping outputs and decisions.

    Images whose label names a class are offered to ``sampler``. With
    ``features`` the outputs keep the pooled backbone features (``"features"``,
    for the trust scores).

    Raises:
      ValueError: no image could be read.
    """
    label_space = trained.label_space
    size = trained.image_size
    class_of = {t: targets.class_index(t) for t in set(images.targets)}

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
    def forward(pixels):
        outputs = trained.forward(tf.cast(pixels, tf.float32), features=features)
        return outputs, signatures.postprocess(outputs, label_space)

    failures: dict[int, str] = {}
    chunks: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for indices, pixels in predict_lib.decoded_batches(
        images.items, size, batch_size, images.source.read_threads, failures
    ):
        outputs, named = forward(pixels)
        probs = named[signatures.PROBABILITIES].numpy()
        y_pred = named[signatures.CLASS_IDS].numpy()
        labels = np.array([class_of[images.targets[i]] for i in indices], np.int64)
        chunks["index"].append(indices)
        chunks["labels"].append(labels)
        chunks["probs"].append(probs)
        chunks["y_pred"].append(y_pred)
        for key, value in outputs.items():
            chunks[f"out/{key}"].append(value.numpy())
        if sampler is not None:
            has = labels >= 0
            files = np.array([images.items[i].path for i in indices], dtype=object)
            sampler.offer(pixels.numpy()[has], labels[has], y_pred[has], probs[has], files[has])
    if not chunks:
        raise ValueError(
            f"--images={images.source.images!r}: none of the {len(images.items)} images could be "
            f"read (e.g. {images.items[0].path}: {failures.get(0, 'unreadable')})"
        )
    index = np.concatenate(chunks["index"]).astype(np.int64)
    return ImagePredictions(
        images=images,
        index=index,
        class_labels=np.concatenate(chunks["labels"]),
        outputs={
            key.removeprefix("out/"): np.concatenate(value)
            for key, value in chunks.items()
            if key.startswith("out/")
        },
        probs=np.concatenate(chunks["probs"]),
        y_pred=np.concatenate(chunks["y_pred"]).astype(np.int64),
        levels=None
        if targets.taxonomy is None
        else np.stack([targets.levels(images.targets[i]) for i in index]).astype(np.int64),
        failures=failures,
    )


def predict_unlabelled(
    trained: rundir.TrainedModel,
    items: Sequence[predict_lib.InputImage],
    batch_size: int,
    read_threads: int = 8,
    features: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[int, str]]:
    """The model's raw outputs for unlabelled files, read exactly as ``predict`` reads them.

    (:func:`predict_lib.decoded_batches`; ``evaluate --ood_images``.)

    Returns:
      ``(index, outputs, failures)``: ``[N]`` indices into ``items`` of the
      images read, their outputs ``{key: [N, ...]}`` (with ``"features"``
      when asked) and ``{item index: reason}`` of every image that could not
      be read (empty ``index`` and ``outputs`` when none could).
    """
    size = trained.image_size

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
    def forward(pixels):
        return trained.forward(tf.cast(pixels, tf.float32), features=features)

    failures: dict[int, str] = {}
    chunks: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for indices, pixels in predict_lib.decoded_batches(
        items, size, batch_size, read_threads, failures
    ):
        chunks["index"].append(np.asarray(indices, np.int64))
        for key, value in forward(pixels).items():
            chunks[key].append(value.numpy())
    if not chunks:
        return np.zeros([0], np.int64), {}, failures
    index = np.concatenate(chunks.pop("index"))
    return index, {k: np.concatenate(v) for k, v in chunks.items()}, failures


def evaluated_split(
    trained: rundir.TrainedModel,
    predicted: ImagePredictions,
    sampler: explain_lib.ExampleSampler,
    class_level: bool = True,
) -> EvaluatedSplit:
    """The images as an :class:`EvaluatedSplit` for the report's sections.

    Args:
      trained: the model.
      predicted: :func:`predict_images`' result.
      sampler: the explained examples.
      class_level: only the images whose label is a class (or lies below
        one): what the class-level sections score. ``False``: every image
        (labels -1 where a node is coarser than the classes): what the
        taxonomy levels score.
    """
    keep = predicted.class_labels >= 0 if class_level else np.ones(len(predicted.index), bool)
    items = predicted.images.items
    rows = predicted.index[keep]

    def group(column: str) -> np.ndarray:
        return np.array([items[i].groups.get(column, "") for i in rows], dtype=object)

    source = predicted.images.source
    columns = dict(
        zip(
            (predict_lib.DEFAULT_SLIDE_COLUMN, predict_lib.DEFAULT_PATIENT_COLUMN),
            (source.slide_column, source.patient_column),
            strict=True,
        )
    )
    found = predicted.images.group_columns

    def ids(feature: str) -> np.ndarray:
        # The CSV's column for the feature: the one named, else the default name.
        column = columns[feature] or feature
        return group(column) if column in found else np.full(len(rows), "", dtype=object)

    split = SplitPredictions(
        outputs={k: v[keep] for k, v in predicted.outputs.items()},
        labels=predicted.class_labels[keep],
        levels=None if predicted.levels is None else predicted.levels[keep],
        patient_id=ids(predict_lib.DEFAULT_PATIENT_COLUMN),
        slide_id=ids(predict_lib.DEFAULT_SLIDE_COLUMN),
        source=np.full(len(rows), source.path, dtype=object),
        file_name=np.array([items[i].path for i in rows], dtype=object),
    )
    config = trained.config
    return EvaluatedSplit(
        trained=trained,
        # The model's own data: the validation split the temperature is fitted on.
        specs=names.parse_datasets(config.datasets),
        data_dir=config.data_dir or None,
        sizes={source.path: predicted.images.n_images},
        predictions=split,
        probs=predicted.probs[keep],
        y_pred=predicted.y_pred[keep],
        sampler=sampler,
    )


# ------------------------------------------------------------------ scores
def restricted_decisions(probs: np.ndarray, present: Sequence[int]) -> np.ndarray:
    """``[N]`` the argmax of ``probs`` over the ``present`` classes only (class indices)."""
    present = np.asarray(sorted(present), np.int64)
    return present[np.asarray(probs)[:, present].argmax(axis=1)]


def restricted_scores(
    ev: EvaluatedSplit, clusters: np.ndarray | None, n_resamples: int, seed: int
) -> dict:
    """Scores of the decisions restricted to the classes present, beside those as predicted.

    Returns:
      ``{"classes", "rule", "accuracy", "balanced_accuracy", "macro_f1",
      "n_changed", "ci"}``: ``n_changed`` decisions differ from the argmax
      over every class.
    """
    present = sorted(int(c) for c in np.unique(ev.y_true))
    y_restricted = restricted_decisions(ev.probs, present)
    num_classes = len(ev.class_names)
    scores = metrics_lib.decision_metrics(ev.y_true, y_restricted, num_classes)
    ci = metrics_lib.bootstrap_ci(
        ev.y_true,
        y_restricted,
        None,
        num_classes,
        clusters=clusters,
        n_resamples=n_resamples,
        seed=seed,
    )
    ci.pop("macro_roc_auc", None)
    return {
        "classes": [ev.class_names[c] for c in present],
        "rule": "argmax of the class probabilities over the classes present in the labels only",
        **scores,
        "n_changed": int((y_restricted != ev.y_pred).sum()),
        "ci": ci,
    }


def write_predictions(
    path: str,
    predicted: ImagePredictions,
    class_names: Sequence[str],
    present: Sequence[int],
) -> None:
    """``predictions.csv`` of the report folder: one row per image read.

    Columns: ``file``, the group columns, ``label`` (as given), ``target``
    (the class or node it maps to), ``predicted_class`` (``predict``'s
    decision), ``probability``, ``predicted_present`` (the argmax over the
    present classes) and ``prob_<class>``.
    """
    images = predicted.images
    restricted = restricted_decisions(predicted.probs, present)
    with rundir.open_whole(path, newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "file",
                *images.group_columns,
                "label",
                "target",
                "predicted_class",
                "probability",
                "predicted_present",
                *(f"prob_{name}" for name in class_names),
            ]
        )
        for row, i in enumerate(predicted.index):
            item = images.items[i]
            probs = predicted.probs[row]
            decision = int(predicted.y_pred[row])
            writer.writerow(
                [
                    item.path,
                    *(item.groups.get(c, "") for c in images.group_columns),
                    item.label,
                    images.targets[i],
                    class_names[decision],
                    f"{probs[decision]:.6f}",
                    class_names[int(restricted[row])],
                    *(f"{p:.6f}" for p in probs),
                ]
            )


def headline_level(predicted: ImagePredictions, targets: Targets) -> int | None:
    """The taxonomy level every label reaches, when some label is coarser than the classes.

    ``None`` when every label names a class (or lies below one): the class
    level is the score that counts.
    """
    if predicted.levels is None or (predicted.class_labels >= 0).all():
        return None
    return int(min(targets.depth(t) for t in set(predicted.images.targets)))


def external_section(
    predicted: ImagePredictions,
    targets: Targets,
    ev: EvaluatedSplit,
    cell: dict,
    restricted: dict,
    levels: dict | None,
) -> dict:
    """The ``external`` section of ``metrics.json``: source, labels, what was scored where.

    Args:
      predicted: :func:`predict_images`' result.
      targets: what the labels name.
      ev: the class-level evaluated split.
      cell: its ``cell`` section.
      restricted: :func:`restricted_scores`.
      levels: the ``levels`` section (all images), or ``None``.
    """
    images = predicted.images
    source = images.source
    failures = sorted(predicted.failures.items())
    as_predicted = {key: cell[key] for key in metrics_lib.HEADLINE}
    class_labels = sorted({images.targets[i] for i in predicted.index[predicted.class_labels >= 0]})
    coarse = sorted({images.targets[i] for i in predicted.index[predicted.class_labels < 0]})
    scored: dict = {
        "class_level": {
            "n": len(ev.y_true),
            "targets": class_labels,
            "what": "cell, calibration, slide and patient sections, figures and explanations",
        },
    }
    level = headline_level(predicted, targets)
    if levels is not None:
        scored["levels"] = [{"level": e["level"], "n": e["n"]} for e in levels["levels"]]
    if coarse:
        scored["coarser_than_classes"] = {
            "n": int((predicted.class_labels < 0).sum()),
            "targets": coarse,
            "what": "scored at the taxonomy levels their label reaches only",
        }
    if level is None:
        scored["headline"] = "class level"
    else:
        entry = levels["levels"][level]
        scored["headline"] = f"taxonomy level {level}"
        scored["headline_scores"] = {
            "level": level,
            "n": entry["n"],
            "nodes": entry["nodes"],
            **{key: entry["greedy"][key] for key in metrics_lib.HEADLINE},
        }
    return {
        "source": source.path,
        "kind": "csv" if source.is_csv else "folder",
        "label_column": source.label_column if source.is_csv else None,
        "label_map_file": os.path.abspath(os.path.expanduser(source.label_map))
        if source.label_map
        else None,
        "label_map": images.label_map,
        "targets": f"{targets.kind}s of the model",
        "labels": {
            label: {
                "n": n,
                "target": images.resolved[label],
                "class": _class_name(targets, images.resolved[label]),
            }
            for label, n in sorted(images.counts.items())
        },
        "n_images": images.n_images,
        "n_unlabelled": images.n_unlabelled,
        "n_dropped": int(sum(images.dropped.values())),
        "dropped": dict(sorted(images.dropped.items())),
        "n_unreadable": len(failures),
        "unreadable": [[images.items[i].path, reason] for i, reason in failures],
        "n_evaluated": len(predicted.index),
        "classes_absent": cell["classes_absent"],
        "as_predicted": as_predicted,
        "restricted_to_present": restricted,
        "scored": scored,
        "predictions_file": PREDICTIONS_FILE,
    }


def _class_name(targets: Targets, target: str | None) -> str | None:
    """The model class a target counts as at class level (``None``: dropped, or coarser)."""
    if target is None:
        return None
    index = targets.class_index(target)
    return targets.class_names[index] if index >= 0 else None
