"""TF Serving warmup requests: ``assets.extra/tf_serving_warmup_requests``.

TF Serving replays the records of this file (a TFRecord file of
``tensorflow.serving.PredictionLog`` protos) when it loads a model version,
before the version receives traffic, so the first real request does not pay
for graph initialisation. The decode path of ``serving_default`` has several
branches (JPEG at the model's size, JPEG decoded with DCT downscaling, PNG,
BMP, and the resize / pad cases), and conditional branches are initialised
lazily, so the requests written here cover every one of them:

1. a batch of real images from the model's data (``--warmup_images`` files,
   or the model's validation split when its TFDS data are at hand);
2. a batch of generated images that covers every decode branch;
3. a ``predict_pixels`` request at the model's size and at another size.

The protos come from the ``tensorflow-serving-api`` package.
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from absl import logging
from PIL import Image

from leukemia_tf.data import images as images_lib
from leukemia_tf.serving import signatures

#: Where TF Serving looks for the warmup file, relative to the version folder.
WARMUP_RELPATH = os.path.join("assets.extra", "tf_serving_warmup_requests")

#: Real images put into the first warmup request.
DEFAULT_REAL_IMAGES = 4


def check_available() -> None:
    """Raises ``ImportError`` (saying what to install) without ``tensorflow-serving-api``."""
    _serving_apis()


def _serving_apis():
    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "writing TF Serving warmup requests needs the 'tensorflow-serving-api' package: "
            "pip install tensorflow-serving-api (or export with --nowarmup)"
        ) from e
    return model_pb2, predict_pb2, prediction_log_pb2


def _encode(pixels: np.ndarray, image_format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format, **kwargs)
    return buffer.getvalue()


def _cell_like(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth pinkish field with a dark round blob: compresses like a smear."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx, r = height / 2, width / 2, min(height, width) / 3
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    background = np.array([228, 200, 210], np.float32)
    nucleus = np.array([90, 60, 140], np.float32)
    pixels = np.where(inside[..., None], nucleus, background)
    pixels = pixels + rng.normal(0, 6, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def coverage_images(image_size: int) -> list[bytes]:
    """Generated encoded images that take every decode-and-resize branch.

    Args:
      image_size: the model's input side ``S``.

    Returns:
      JPEG at ``S x S`` (no resampling), JPEG at ``4S x 3S`` (DCT-downscaled
      decode, then area resize and pad), a small non-square PNG (bilinear
      upscale and pad) and a BMP at ``S x S``.
    """
    size = image_size
    return [
        _encode(_cell_like(size, size, 0), "JPEG", quality=90),
        _encode(_cell_like(3 * size, 4 * size, 1), "JPEG", quality=90),
        _encode(_cell_like(max(1, size // 2), max(2, (3 * size) // 4), 2), "PNG"),
        _encode(_cell_like(size, size, 3), "BMP"),
    ]


def read_image_files(pattern: str | Sequence[str], limit: int = DEFAULT_REAL_IMAGES) -> list[bytes]:
    """Encoded bytes of up to ``limit`` image files (as ``predict`` reads them).

    Args:
      pattern: a glob, a folder, or a list of files.
      limit: how many images to keep.

    Returns:
      The files' bytes, converted like the data set builders do
      (``images.read_image``).

    Raises:
      FileNotFoundError: nothing matches ``pattern``.
      images.BadImageError: a matched file is not a readable image.
    """
    if isinstance(pattern, str):
        if os.path.isdir(pattern):
            paths = images_lib.image_files_under(pattern)
        else:
            paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    else:
        paths = list(pattern)
    if not paths:
        raise FileNotFoundError(f"--warmup_images={pattern!r}: no image files found")
    return [images_lib.read_image(p)[0] for p in paths[:limit]]


def dataset_images(config, limit: int = DEFAULT_REAL_IMAGES) -> list[bytes]:
    """Up to ``limit`` encoded images of the model's own data, or ``[]``.

    Reads the first data set of ``config.datasets`` (its validation split,
    else test, else train) without decoding. Returns ``[]`` (and logs why)
    when the data are not available where the model was trained, which is
    normal on a serving machine.

    Args:
      config: the model's :class:`~leukemia_tf.training.config.TrainConfig`.
      limit: how many images.
    """
    try:
        import tensorflow_datasets as tfds

        from leukemia_tf.data import pipeline

        spec = pipeline.parse_datasets(config.datasets)[0]
        builder = pipeline.get_builder(spec.name, config.data_dir or None)
        splits = [s for s in (config.val_split, "validation", "test", "train") if s]
        split = next(s for s in splits if s in builder.info.splits)
        ds = builder.as_dataset(
            split=split,
            decoders={"image": tfds.decode.SkipDecoding()},
            shuffle_files=False,
            read_config=tfds.ReadConfig(try_autocache=False),
        )
        return [bytes(example["image"].numpy()) for example in ds.take(limit)]
    except Exception as e:  # noqa: BLE001 - any failure only means "use generated images"
        logging.info("warmup: no images from the model's data (%s); using generated ones", e)
        return []


def build_requests(
    image_size: int,
    real_images: Sequence[bytes] = (),
    model_name: str = "leukemia",
) -> list:
    """The warmup ``PredictionLog`` records (see the module docstring).

    Args:
      image_size: the model's input side ``S``.
      real_images: encoded images for the first request (may be empty).
      model_name: ``model_spec.name`` of the requests (TF Serving's
        ``--model_name``).

    Returns:
      ``tensorflow.serving.PredictionLog`` protos.
    """
    model_pb2, predict_pb2, prediction_log_pb2 = _serving_apis()

    def record(signature: str, name: str, value) -> object:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
        )
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        return prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        )

    def strings(batch: Sequence[bytes]) -> np.ndarray:
        return np.array(list(batch), dtype=object)

    requests = []
    if real_images:
        requests.append(
            record(signatures.SERVING_DEFAULT, signatures.IMAGE_BYTES, strings(real_images))
        )
    requests.append(
        record(
            signatures.SERVING_DEFAULT, signatures.IMAGE_BYTES, strings(coverage_images(image_size))
        )
    )
    at_size = _cell_like(image_size, image_size, 4).astype(np.float32)[None]
    other_size = _cell_like(image_size + 8, image_size // 2 + 1, 5).astype(np.float32)[None]
    requests.append(record(signatures.PREDICT_PIXELS, signatures.PIXELS, at_size))
    requests.append(record(signatures.PREDICT_PIXELS, signatures.PIXELS, other_size))
    return requests


def write_warmup_file(version_dir: str | os.PathLike, requests: Sequence) -> str:
    """Writes ``requests`` to ``<version_dir>/assets.extra/tf_serving_warmup_requests``.

    Args:
      version_dir: the SavedModel folder (``export_dir/<version>``).
      requests: ``PredictionLog`` protos.

    Returns:
      The file's path.
    """
    path = os.path.join(os.fspath(version_dir), WARMUP_RELPATH)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for request in requests:
            writer.write(request.SerializeToString())
    return path
