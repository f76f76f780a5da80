#!/usr/bin/env python3
r"""Classifies images with a leukemia_tf model served by TF Serving's REST API.

Standard library only (urllib): copy this file anywhere. Start the server
with the export (``python -m leukemia_tf.export``)::

  tensorflow_model_server --port=8500 --rest_api_port=8501 \
      --model_name=leukemia --model_base_path=/abs/path/to/export_dir

then::

  python tools/serving_client_rest.py cell1.jpg cell2.png
  python tools/serving_client_rest.py --url=http://server:8501 --model=leukemia --json cell1.jpg

The request is TF Serving's row format, one instance per image, the encoded
file bytes in base64 under the ``serving_default`` signature's input::

  POST http://HOST:8501/v1/models/NAME[/versions/N]:predict
  {"signature_name": "serving_default",
   "instances": [{"image_bytes": {"b64": "<base64 of the file>"}}, ...]}

and the response holds one prediction per image: ``probabilities``,
``class_ids``, ``class_names`` (and ``level_k_probabilities`` /
``level_k_names`` for a hierarchical model).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

SIGNATURE = "serving_default"
INPUT = "image_bytes"


def build_request(images: Sequence[bytes], signature_name: str = SIGNATURE) -> dict:
    """The JSON body of a predict request for encoded images.

    Args:
      images: encoded image files (JPEG, PNG, BMP, GIF), any size.
      signature_name: the SavedModel signature to call.

    Returns:
      ``{"signature_name": ..., "instances": [{"image_bytes": {"b64": ...}}, ...]}``.
    """
    if not images:
        raise ValueError("no images to send")
    return {
        "signature_name": signature_name,
        "instances": [{INPUT: {"b64": base64.b64encode(bytes(b)).decode("ascii")}} for b in images],
    }


def predict_url(base_url: str, model: str, version: int | None = None) -> str:
    """``BASE/v1/models/MODEL[/versions/N]:predict``."""
    url = f"{base_url.rstrip('/')}/v1/models/{model}"
    if version is not None:
        url += f"/versions/{int(version)}"
    return url + ":predict"


def parse_response(body: dict) -> list[dict]:
    """The per-image predictions of a REST response (row or column format).

    Args:
      body: the decoded JSON response.

    Returns:
      One dict per image, output name -> value.

    Raises:
      RuntimeError: the server answered with an error.
    """
    if "error" in body:
        raise RuntimeError(f"TF Serving error: {body['error']}")
    if "predictions" in body:
        predictions = body["predictions"]
        # A signature with one output comes back as bare values.
        return [p if isinstance(p, dict) else {"output": p} for p in predictions]
    if "outputs" in body:  # column format ("inputs" requests)
        outputs = body["outputs"]
        count = len(next(iter(outputs.values())))
        return [{k: v[i] for k, v in outputs.items()} for i in range(count)]
    raise RuntimeError(f"unexpected response (no 'predictions' or 'outputs'): {str(body)[:200]}")


def predict(
    images: Sequence[bytes],
    url: str = "http://localhost:8501",
    model: str = "leukemia",
    version: int | None = None,
    signature_name: str = SIGNATURE,
    timeout: float = 30.0,
) -> list[dict]:
    """Sends encoded images to TF Serving and returns one prediction dict per image.

    Raises:
      RuntimeError: the server rejected the request (e.g. a corrupt image: the
        message names it) or could not be reached.
    """
    body = json.dumps(build_request(images, signature_name)).encode("utf-8")
    request = urllib.request.Request(
        predict_url(url, model, version),
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return parse_response(json.loads(response.read().decode("utf-8")))
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except json.JSONDecodeError:
            pass
        raise RuntimeError(f"HTTP {e.code} from {request.full_url}: {detail}") from None
    except urllib.error.URLError as e:
        raise RuntimeError(f"cannot reach {request.full_url}: {e.reason}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files to classify")
    parser.add_argument("--url", default="http://localhost:8501", help="TF Serving REST address")
    parser.add_argument("--model", default="leukemia", help="TF Serving --model_name")
    parser.add_argument("--version", type=int, default=None, help="model version (default: latest)")
    parser.add_argument("--signature", default=SIGNATURE, help="signature name")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds")
    parser.add_argument("--json", action="store_true", help="print the raw predictions as JSON")
    args = parser.parse_args(argv)
    try:
        data = [path.read_bytes() for path in args.images]
    except OSError as e:
        parser.error(f"cannot read {e.filename}: {e.strerror}")
    try:
        predictions = predict(
            data, args.url, args.model, args.version, args.signature, args.timeout
        )
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(predictions, indent=2))
        return 0
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
