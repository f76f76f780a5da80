#!/usr/bin/env python3
r"""Classifies images with a leukemia_tf model served by TF Serving's gRPC API.

Needs ``pip install tensorflow-serving-api`` (it brings ``grpcio`` and
TensorFlow). Start the server with the export (``python -m leukemia_tf.export``)::

  tensorflow_model_server --port=8500 --rest_api_port=8501 \
      --model_name=leukemia --model_base_path=/abs/path/to/export_dir

then::

  python tools/serving_client_grpc.py cell1.jpg cell2.png
  python tools/serving_client_grpc.py --target=server:8500 --model=leukemia cell1.jpg

One ``PredictRequest`` carries the whole batch: the encoded file bytes as a
``DT_STRING`` tensor ``[N]`` under the ``serving_default`` signature's input
``image_bytes``. gRPC is the faster path for large batches (no base64/JSON).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

SIGNATURE = "serving_default"
INPUT = "image_bytes"


def build_request(
    images: Sequence[bytes],
    model: str = "leukemia",
    signature_name: str = SIGNATURE,
    version: int | None = None,
):
    """A ``tensorflow.serving.PredictRequest`` for encoded images.

    Args:
      images: encoded image files (JPEG, PNG, BMP, GIF), any size.
      model: TF Serving ``--model_name``.
      signature_name: the SavedModel signature to call.
      version: a model version; ``None``: the latest.

    Returns:
      The request proto.
    """
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    if not images:
        raise ValueError("no images to send")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    request.inputs[INPUT].CopyFrom(
        tf.make_tensor_proto([bytes(b) for b in images], dtype=tf.string, shape=[len(images)])
    )
    return request


def parse_response(response) -> list[dict]:
    """One ``{output name: value}`` dict per image from a ``PredictResponse``."""
    import tensorflow as tf

    outputs = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
    count = len(next(iter(outputs.values())))
    rows = []
    for i in range(count):
        row = {}
        for key, value in outputs.items():
            item = value[i]
            row[key] = item.decode("utf-8") if isinstance(item, bytes) else item.tolist()
        rows.append(row)
    return rows


def predict(
    images: Sequence[bytes],
    target: str = "localhost:8500",
    model: str = "leukemia",
    version: int | None = None,
    signature_name: str = SIGNATURE,
    timeout: float = 30.0,
) -> list[dict]:
    """Sends encoded images to TF Serving over gRPC; one prediction dict per image.

    Raises:
      grpc.RpcError: the server rejected the request (``INVALID_ARGUMENT``
        with a message naming a corrupt image) or is unreachable.
    """
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = build_request(images, model, signature_name, version)
    # Room for large batches of full-size images (gRPC's default is 4 MiB).
    options = [
        ("grpc.max_send_message_length", 256 << 20),
        ("grpc.max_receive_message_length", 256 << 20),
    ]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return parse_response(stub.Predict(request, timeout=timeout))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files to classify")
    parser.add_argument("--target", default="localhost:8500", help="TF Serving gRPC host:port")
    parser.add_argument("--model", default="leukemia", help="TF Serving --model_name")
    parser.add_argument("--version", type=int, default=None, help="model version (default: latest)")
    parser.add_argument("--signature", default=SIGNATURE, help="signature name")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        data = [path.read_bytes() for path in args.images]
    except OSError as e:
        parser.error(f"cannot read {e.filename}: {e.strerror}")
    import grpc

    try:
        predictions = predict(
            data, args.target, args.model, args.version, args.signature, args.timeout
        )
    except grpc.RpcError as e:
        print(f"TF Serving error {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    for path, prediction in zip(args.images, predictions, strict=True):
        class_id = int(prediction["class_ids"])
        probability = prediction["probabilities"][class_id]
        level_keys = [k for k in prediction if k.startswith("level_") and k.endswith("_names")]
        level_keys.sort(key=lambda k: int(k.split("_")[1]))
        levels = [prediction[k] for k in level_keys if prediction[k]]
        path_text = f"  ({' > '.join(levels)})" if levels else ""
        print(f"{path}\t{prediction['class_names']}\t{probability:.3f}{path_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
