"""AdaBN: re-estimates a model's BatchNorm statistics on unlabelled target images.

A BatchNorm network normalises every image with the mean and variance its
training images had at each layer (the moving statistics). Images from
another laboratory (other stain, camera, focus) have other statistics, and
the network, normalising them with the wrong ones, falls furthest of all
architectures on them. AdaBN (Li et al., 2016, "Revisiting Batch
Normalization For Practical Domain Adaptation") replaces each BatchNorm
layer's moving mean and variance by those of its inputs on the target
domain, with every other weight kept: no labels are needed, and much of the
loss is recovered.

:func:`adapt_batchnorm` returns an adapted **copy**; the given model is never
changed. The statistics are exact, computed layer by layer in network order:
for the k-th BatchNorm layer (in the order of the forward pass), the model runs
in inference mode (``training=False``: Dropout, stochastic depth and every
other layer behave as at prediction time) with the k-1 layers before it
already adapted, and the layer's moving mean and (biased) variance become the
mean and variance of its inputs over **all** target images (per channel, over
the batch and the spatial positions; batches are combined exactly, so the
result does not depend on the batch size). The forward pass stops at the
layer being estimated, so adapting K layers costs about K/2 forward passes
over the target images. After adaptation, each layer's moving statistics are
the statistics of the inputs it receives from the adapted model on the target
images, which is what the model then normalises with.

Nothing else changes: the weights of every layer, BatchNorm's gamma and beta
included, are bit-identical to the input model's. A model without BatchNorm
(e.g. the ``*_gn`` backbones, ConvNeXt, ViT) is returned as it is, with
:attr:`AdaptResult.adapted` False.

:func:`adapt_from_files` reads and resizes image files exactly as
``leukemia_tf.predict`` does before adapting.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from leukemia_tf.models.registry import iter_layers


@dataclasses.dataclass(frozen=True)
class AdaptResult:
    """An adapted model and what was done to it.

    Attributes:
      model: the adapted copy; the input model itself when ``adapted`` is False.
      adapted: True when at least one BatchNorm layer was re-estimated.
      num_layers: BatchNorm layers re-estimated.
      num_images: target images the statistics were computed on.
      source: where the images came from (a folder, CSV, glob or a description).
      date: when the adaptation was done (UTC, ISO 8601).
      num_failed: target files that could not be read (:func:`adapt_from_files`).
      note: a one-line human-readable account.
    """

    model: keras.Model
    adapted: bool
    num_layers: int
    num_images: int
    source: str
    date: str
    num_failed: int = 0
    note: str = ""

    def metadata(self) -> dict:
        """``{"images", "count", "layers", "date", ...}``: the record an export or report keeps."""
        return {
            "images": self.source,
            "count": self.num_images,
            "layers": self.num_layers,
            "date": self.date,
            "adapted": self.adapted,
            "failed": self.num_failed,
            "method": "AdaBN: exact per-layer target statistics, layer by layer, inference mode",
            "note": self.note,
        }


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer of ``model`` (nested models included)."""
    found, seen = [], set()
    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and id(layer) not in seen:
            seen.add(id(layer))
            found.append(layer)
    return found


def copy_model(model: keras.Model) -> keras.Model:
    """An independent copy of ``model``: new layers, new variables, the same weights.

    Functional and Sequential models (every classifier of this package) are
    cloned layer by layer (``keras.models.clone_model``).
    """
    try:
        clone = keras.models.clone_model(model)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"cannot copy model '{model.name}' (a Functional or Sequential model is needed): {e}"
        ) from e
    clone.set_weights(model.get_weights())
    return clone


class _Stop(Exception):
    """Raised by the layer being estimated: nothing after it is needed."""

    def __init__(self, message: str = "statistics recorded"):
        super().__init__(message)


class _Moments:
    """Exact per-channel mean and biased variance of batches, combined (Chan et al.)."""

    def __init__(self):
        self.count = 0.0
        self.mean = None
        self.m2 = None

    def add(self, x: tf.Tensor, axis: Sequence[int]) -> None:
        rank = len(x.shape)
        channel_axes = [a % rank for a in axis]
        reduce = [a for a in range(rank) if a not in channel_axes]
        x = tf.cast(x, tf.float32)
        n = float(np.prod([x.shape[a] for a in reduce]))
        if n == 0:
            return
        mean = tf.reduce_mean(x, axis=reduce, keepdims=True)
        m2 = tf.reduce_sum(tf.square(x - mean), axis=reduce)
        mean = tf.squeeze(mean, axis=reduce).numpy().astype(np.float64)
        m2 = m2.numpy().astype(np.float64)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + np.square(delta) * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / self.count


def _axes(layer: keras.layers.BatchNormalization) -> list[int]:
    axis = layer.axis
    return list(axis) if isinstance(axis, (list, tuple)) else [int(axis)]


def _batches(images, batch_size: int) -> Iterable[tf.Tensor]:
    if isinstance(images, tf.data.Dataset):
        for batch in images:
            yield tf.cast(batch, tf.float32)
        return
    for start in range(0, len(images), batch_size):
        yield tf.cast(images[start : start + batch_size], tf.float32)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _unchanged(model: keras.Model, source: str) -> AdaptResult:
    note = f"model '{model.name}' has no BatchNorm layer: nothing adapted, model unchanged"
    logging.info("%s", note)
    return AdaptResult(model, False, 0, 0, source, _now(), note=note)


def adapt_batchnorm(
    model: keras.Model,
    images,
    *,
    batch_size: int = 64,
    source: str = "images",
    verbose: int = 0,
) -> AdaptResult:
    """Re-estimates every BatchNorm layer's moving statistics on ``images`` (AdaBN).

    Args:
      model: a Keras model (e.g. a classifier of this package; nested models
        are searched). Never modified.
      images: the unlabelled target images, ``[N, S, S, 3]`` pixels as the
        model takes them (this package: 0-255, uint8 or float), or a
        ``tf.data.Dataset`` of such batches (iterated once per layer).
      batch_size: images per forward pass (array input). The statistics are
        exact over all images whatever the batch size.
      source: where the images came from, for the record.
      verbose: 1 logs one line per adapted layer.

    Returns:
      An :class:`AdaptResult`: the adapted copy (or, without any BatchNorm
      layer, the input model itself), the number of layers and images.

    Raises:
      ValueError: no images, or a bad batch size.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
    if not isinstance(images, tf.data.Dataset):
        images = np.asarray(images)
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(
                f"adapt_batchnorm: expected a non-empty [N, H, W, C] image array, got shape "
                f"{images.shape}"
            )
    if not batchnorm_layers(model):
        return _unchanged(model, source)

    adapted = copy_model(model)
    layers = batchnorm_layers(adapted)
    state = {"calls": [], "target": None, "stop": False, "moments": None}

    def hook(layer, original):
        def call(inputs, training=None, mask=None):
            state["calls"].append(layer)
            if state["target"] is layer:
                state["moments"].add(inputs, _axes(layer))
                if state["stop"]:
                    raise _Stop()
            # Inference mode whatever the caller asked: moving statistics only.
            return original(inputs, training=False, mask=mask)

        return call

    for layer in layers:
        # An instance attribute shadows the class's call; removed below.
        layer.call = hook(layer, layer.call)
    try:
        # One forward pass on a batch gives the order the layers run in.
        first = next(iter(_batches(images, batch_size)))
        adapted(first, training=False)
        order = list(dict.fromkeys(state["calls"]))
        # A layer called twice (shared) must see the whole pass.
        state["stop"] = len(order) == len(state["calls"])
        num_images = 0
        for k, layer in enumerate(order):
            state["target"], state["moments"] = layer, _Moments()
            count = 0
            for batch in _batches(images, batch_size):
                count += int(batch.shape[0])
                try:
                    adapted(batch, training=False)
                except _Stop:
                    pass
            moments = state["moments"]
            if moments.mean is None:
                raise ValueError("adapt_batchnorm: no target images")
            layer.moving_mean.assign(moments.mean.astype(layer.moving_mean.dtype))
            layer.moving_variance.assign(moments.variance.astype(layer.moving_variance.dtype))
            num_images = count
            if verbose:
                logging.info("AdaBN %d/%d: %s on %d images", k + 1, len(order), layer.name, count)
    finally:
        for layer in layers:
            vars(layer).pop("call", None)
    unused = len(layers) - len(order)
    note = (
        f"BatchNorm statistics of {len(order)} layer(s) re-estimated on {num_images} "
        f"image(s) from {source}"
    )
    if unused:
        note += f" ({unused} BatchNorm layer(s) not on the forward path left as they were)"
    logging.info("%s", note)
    return AdaptResult(adapted, True, len(order), num_images, source, _now(), note=note)


def load_target_images(
    images: str | Sequence[str],
    image_size: int,
    *,
    path_column: str = "path",
    read_threads: int = 8,
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Reads and resizes target images exactly as ``leukemia_tf.predict`` does.

    Args:
      images: a folder, glob or CSV file (as ``predict --images``), or a list
        of image file paths.
      image_size: the model's input side.
      path_column: CSV input: the column of image paths.
      read_threads: threads reading files.

    Returns:
      ``(pixels, failures)``: uint8 ``[N, S, S, 3]`` of the readable images,
      and ``(path, reason)`` of those that could not be read.

    Raises:
      FileNotFoundError: nothing at ``images``.
      ValueError: no image could be read.
    """
    from leukemia_tf.serving import predict_lib  # the serving code reads files

    if isinstance(images, (str, os.PathLike)):
        items, _ = predict_lib.collect_inputs(os.fspath(images), path_column)
    else:
        items = [predict_lib.InputImage(os.fspath(p)) for p in images]
        if not items:
            raise ValueError("no target images given")
    pixels, failures = predict_lib.read_pixels(items, image_size, read_threads=read_threads)
    if not len(pixels):
        raise ValueError(
            f"none of the {len(items)} target image(s) could be read "
            f"(first: {failures[0][0]}: {failures[0][1]})"
        )
    return pixels, failures


def adapt_from_files(
    model: keras.Model,
    images: str | Sequence[str],
    image_size: int,
    *,
    batch_size: int = 64,
    path_column: str = "path",
    read_threads: int = 8,
    verbose: int = 0,
    source: str | None = None,
) -> AdaptResult:
    """:func:`adapt_batchnorm` on image files, read as ``leukemia_tf.predict`` reads them.

    Args:
      model: the model to adapt (never modified).
      images: a folder, glob or CSV file of unlabelled target images, or a
        list of their paths.
      image_size: the model's input side (``TrainedModel.image_size``).
      batch_size: images per forward pass.
      path_column: CSV input: the column of image paths.
      read_threads: threads reading files.
      verbose: 1 logs one line per adapted layer.
      source: the images' description for the record; default: ``images``
        itself (a folder, glob or CSV) or the number of listed files.

    Returns:
      An :class:`AdaptResult`; unreadable files are skipped (logged, counted
      in ``num_failed``).

    Raises:
      FileNotFoundError: nothing at ``images``.
      ValueError: no image could be read.
    """
    if source is None:
        if isinstance(images, (str, os.PathLike)):
            source = os.fspath(images)
        else:
            source = f"{len(images)} listed file(s)"
    if not batchnorm_layers(model):  # nothing to adapt: do not read the images
        return _unchanged(model, source)
    pixels, failures = load_target_images(
        images, image_size, path_column=path_column, read_threads=read_threads
    )
    for path, reason in failures:
        logging.warning("AdaBN: cannot read %s: %s (left out)", path, reason)
    result = adapt_batchnorm(model, pixels, batch_size=batch_size, source=source, verbose=verbose)
    return dataclasses.replace(result, num_failed=len(failures))


def adapt_trained(trained, images, *, batch_size: int = 64, read_threads: int = 8, source=None):
    """:func:`adapt_from_files` on a loaded run (``rundir.TrainedModel``).

    Returns:
      ``(adapted TrainedModel, record)``: the run with its model replaced by
      the adapted copy, and :meth:`AdaptResult.metadata` for the outputs that
      must say so (predict's ``_adaptation.json``, ``metrics.json``, the export).
    """
    adapted = adapt_from_files(
        trained.model,
        images,
        trained.image_size,
        batch_size=batch_size,
        read_threads=read_threads,
        source=source,
    )
    return dataclasses.replace(trained, model=adapted.model), adapted.metadata()
