"""Tests of the SavedModel export, its signatures, warmup file and serving clients.

Tiny cnn_tiny models at 32 px (fixtures in conftest.py). The flat model is
exported through the command line (``python -m leukemia_tf.export``), the
hierarchical and the mixed_bfloat16 ones through the library.
"""

from __future__ import annotations

import base64
import dataclasses
import http.server
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from leukemia_tf import rundir
from leukemia_tf.data import preprocessing
from leukemia_tf.serving import export_lib, signatures, warmup

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


def _encode(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def _test_images() -> list[bytes]:
    """Every format and resize branch: JPEG at size and large, PNG, BMP, GIF."""
    rng = np.random.default_rng(7)

    def smooth(h, w):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 200 / w, yy * 200 / h, (xx + yy) * 100 / (h + w) + 60], -1)
        return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)

    return [
        _encode(smooth(32, 32), "JPEG"),
        _encode(smooth(120, 160), "JPEG"),  # DCT-downscaled decode, then pad
        _encode(smooth(20, 30), "PNG"),  # upscale and pad
        _encode(smooth(32, 32), "BMP"),
        _encode(smooth(40, 24), "GIF"),
    ]


def _keras_expected(model_dir: str, images: list[bytes], temperature: float = 1.0) -> dict:
    """What the Keras model (float32 rebuild) predicts for ``images``."""
    trained = rundir.load_trained_model(model_dir)
    pixels = np.stack(
        [preprocessing.decode_and_resize(b, trained.image_size).numpy() for b in images]
    )
    outputs = trained.outputs(pixels)
    expected = {
        "pixels": pixels,
        "probabilities": trained.label_space.probabilities(outputs, temperature).numpy(),
        "class_names": trained.class_names,
    }
    if trained.label_space.head == "hierarchical":
        expected["levels"] = {
            k: v.numpy() for k, v in trained.label_space.level_probabilities(outputs).items()
        }
        expected["taxonomy"] = trained.taxonomy
    return expected


def _assert_names_match_argmax(names, probabilities, class_names):
    """class_names is the argmax, wherever the top two are not a numerical tie."""
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    got = np.array([n.decode() if isinstance(n, bytes) else n for n in names])
    want = np.array(class_names)[probabilities.argmax(axis=1)]
    np.testing.assert_array_equal(got[clear], want[clear])


@dataclasses.dataclass(frozen=True)
class Export:
    model_dir: str
    export_dir: Path
    path: Path


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory, train_tiny_model) -> str:
    return train_tiny_model(
        tmp_path_factory.mktemp("bf16_model") / "run", precision="mixed_bfloat16"
    )


@pytest.fixture(scope="module")
def exports(
    tmp_path_factory, trained_flat_model_dir, trained_hierarchical_model_dir, bf16_model_dir
) -> dict[str, Export]:
    root = tmp_path_factory.mktemp("exports")
    out = {}
    # The flat model through the command line: the entry point is under test too.
    flat_dir = root / "flat"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "leukemia_tf.export",
            f"--model_dir={trained_flat_model_dir}",
            f"--export_dir={flat_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Exported version 1" in run.stdout and "tensorflow_model_server" in run.stdout
    out["flat"] = Export(trained_flat_model_dir, flat_dir, flat_dir / "1")
    for name, model_dir in (
        ("hierarchical", trained_hierarchical_model_dir),
        ("bf16", bf16_model_dir),
    ):
        result = export_lib.export_model(model_dir, root / name)
        assert result.version == 1 and result.max_abs_difference < 1e-4
        out[name] = Export(model_dir, root / name, Path(result.path))
    return out


@pytest.fixture(scope="module")
def loaded(exports) -> dict:
    return {name: tf.saved_model.load(str(e.path)) for name, e in exports.items()}


# ------------------------------------------------------------------- layout
def test_layout_and_assets(exports):
    flat, hier = exports["flat"], exports["hierarchical"]
    for export in exports.values():
        assert sorted(os.listdir(export.export_dir)) == ["1"], "temporary folder left behind"
        for name in ("saved_model.pb", "variables", "assets/labels.txt", "assets/config.json"):
            assert (export.path / name).exists(), name
        assert (export.path / warmup.WARMUP_RELPATH).is_file()
        labels = (export.path / "assets" / "labels.txt").read_text().splitlines()
        assert labels == (Path(export.model_dir) / "labels.txt").read_text().splitlines()
        config = json.loads((export.path / "assets" / "config.json").read_text())
        assert config == json.loads((Path(export.model_dir) / "config.json").read_text())
    meta = json.loads((hier.path / "assets" / "export.json").read_text())
    assert meta["dtype"] == "float32" and meta["temperature"] == 1.0
    assert meta["temperature_applied"] is False
    assert meta["taxonomy_levels"][0] == ["normal", "reactive", "leukemia"]
    taxonomy = rundir.load_trained_model(hier.model_dir).taxonomy
    assert (hier.path / "assets" / "taxonomy.yaml").read_text() == Path(taxonomy.source).read_text()
    # A flat model on native labels has no taxonomy to ship.
    assert not (flat.path / "assets" / "taxonomy.yaml").exists()
    assert (
        json.loads((exports["bf16"].path / "assets" / "export.json").read_text())[
            "trained_precision"
        ]
        == "mixed_bfloat16"
    )


_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    # Neither Keras nor leukemia_tf may be needed to load and run the export:
    # make importing them fail (TensorFlow itself copes without Keras).
    for blocked in ("keras", "tf_keras", "leukemia_tf"):
        sys.modules[blocked] = None
    import numpy as np
    import tensorflow as tf

    args = json.loads(sys.argv[1])
    images = [open(p, "rb").read() for p in args["images"]]
    pixels = np.load(args["pixels"])
    for name, path in args["exports"].items():
        model = tf.saved_model.load(path)
        out = {}
        served = model.signatures["serving_default"](image_bytes=tf.constant(images))
        out.update({"bytes/" + k: v.numpy() for k, v in served.items()})
        served = model.signatures["predict_pixels"](pixels=tf.constant(pixels))
        out.update({"pixels/" + k: v.numpy() for k, v in served.items()})
        np.savez(args["out"] + "/" + name + ".npz",
                 **{k: v.astype(str) if v.dtype == object else v for k, v in out.items()})
    print(json.dumps({m: sys.modules[m] is not None for m in ("leukemia_tf", "keras")}))
    """
)


def test_parity_in_a_fresh_process(exports, tmp_path):
    """The exports, loaded where Keras and leukemia_tf cannot be imported, match the Keras models."""
    images = _test_images()
    paths = []
    for i, data in enumerate(images):
        paths.append(str(tmp_path / f"image{i}"))
        Path(paths[-1]).write_bytes(data)
    expected = {name: _keras_expected(e.model_dir, images) for name, e in exports.items()}
    np.save(tmp_path / "pixels.npy", expected["flat"]["pixels"].astype(np.float32))
    args = {
        "images": paths,
        "pixels": str(tmp_path / "pixels.npy"),
        "exports": {name: str(e.path) for name, e in exports.items()},
        "out": str(tmp_path),
    }
    run = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, json.dumps(args)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    imported = json.loads(run.stdout.strip().splitlines()[-1])
    assert imported == {"leukemia_tf": False, "keras": False}, imported

    for name, want in expected.items():
        got = dict(np.load(tmp_path / f"{name}.npz"))
        for prefix in ("bytes/", "pixels/"):
            probs = got[prefix + "probabilities"]
            assert probs.dtype == np.float32 and probs.shape == want["probabilities"].shape
            np.testing.assert_allclose(probs, want["probabilities"], atol=TOLERANCE, err_msg=name)
            np.testing.assert_array_equal(got[prefix + "class_ids"], probs.argmax(axis=1))
            _assert_names_match_argmax(got[prefix + "class_names"], probs, want["class_names"])
        if "levels" in want:
            for key, level_probs in want["levels"].items():
                np.testing.assert_allclose(
                    got[f"bytes/{key}_probabilities"], level_probs, atol=TOLERANCE
                )


def _greedy(level_probs: dict, taxonomy) -> list[list[str]]:
    """Reference top-down decision, written with the Taxonomy's tree queries."""
    from leukemia_tf.taxonomy import ROOT

    decisions = []
    for row in range(len(level_probs["level_0"])):
        node, path = ROOT, []
        for level in range(taxonomy.num_levels):
            children = taxonomy.children(node)
            if not children:
                path.append("")
                continue
            probs = level_probs[f"level_{level}"][row]
            node = max(children, key=lambda c: probs[taxonomy.level_index(c)])
            path.append(node)
        decisions.append(path)
    return decisions


def test_hierarchical_level_decisions(exports, loaded):
    images = _test_images()
    want = _keras_expected(exports["hierarchical"].model_dir, images)
    got = loaded["hierarchical"].signatures["serving_default"](image_bytes=tf.constant(images))
    taxonomy = want["taxonomy"]
    names = [
        [n.decode() for n in got[signatures.level_names_key(k)].numpy()]
        for k in range(taxonomy.num_levels)
    ]
    assert [list(row) for row in zip(*names, strict=True)] == _greedy(want["levels"], taxonomy)
    for k in range(taxonomy.num_levels):
        level = got[signatures.level_probabilities_key(k)].numpy()
        assert level.shape == (len(images), len(taxonomy.levels[k]))


def test_exported_graph_is_float32(exports):
    """No bfloat16/float16 tensor anywhere in the graph of the mixed-precision model."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString(
        (exports["bf16"].path / "saved_model.pb").read_bytes()
    )
    text = str(proto.meta_graphs[0].graph_def)
    assert "DT_FLOAT" in text
    assert "DT_BFLOAT16" not in text and "DT_HALF" not in text


def test_saved_model_cli_lists_signatures(exports):
    cli = shutil.which("saved_model_cli") or str(Path(sys.executable).parent / "saved_model_cli")
    run = subprocess.run(
        [cli, "show", "--all", "--dir", str(exports["hierarchical"].path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout

    def signature_block(name: str) -> str:
        match = re.search(rf"signature_def\['{name}'\]:(.*?)Method name is", text, re.S)
        assert match, f"{name} not listed"
        return match.group(1)

    def tensor(block: str, kind: str, name: str) -> tuple[str, str]:
        match = re.search(
            rf"{kind}\['{name}'\] tensor_info:\s*dtype: (\w+)\s*shape: (\([^)]*\))", block
        )
        assert match, f"{kind} {name} missing"
        return match.group(1), match.group(2)

    default, pixels = signature_block("serving_default"), signature_block("predict_pixels")
    assert tensor(default, "inputs", "image_bytes") == ("DT_STRING", "(-1)")
    assert tensor(pixels, "inputs", "pixels") == ("DT_FLOAT", "(-1, -1, -1, 3)")
    level_sizes = (3, 2, 5, 3)  # nodes per level of configs/taxonomy.yaml
    for block in (default, pixels):
        assert tensor(block, "outputs", "probabilities") == ("DT_FLOAT", "(-1, 6)")
        assert tensor(block, "outputs", "class_ids") == ("DT_INT64", "(-1)")
        assert tensor(block, "outputs", "class_names") == ("DT_STRING", "(-1)")
        for k, size in enumerate(level_sizes):
            assert tensor(block, "outputs", f"level_{k}_probabilities") == (
                "DT_FLOAT",
                f"(-1, {size})",
            )
            assert tensor(block, "outputs", f"level_{k}_names") == ("DT_STRING", "(-1)")


def _read_warmup_records(version_dir) -> list:
    """The warmup file's records, read as TF Serving does: a TFRecord file of PredictionLog."""
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(os.fspath(version_dir), warmup.WARMUP_RELPATH)
    return [
        prediction_log_pb2.PredictionLog.FromString(raw)
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator()
    ]


def _replay(model, records) -> list[dict]:
    """Runs PredictionLog records through a loaded SavedModel, as TF Serving's warmup does."""
    results = []
    for log in records:
        request = log.predict_log.request
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        # An empty signature name means serving_default to TF Serving.
        name = request.model_spec.signature_name or signatures.SERVING_DEFAULT
        results.append(_run_signature(model, name, inputs))
    return results


def test_warmup_file_parses_and_replays(exports, loaded):
    from tensorflow_serving.apis import prediction_log_pb2

    export = exports["hierarchical"]
    records = _read_warmup_records(export.path)
    assert all(isinstance(r, prediction_log_pb2.PredictionLog) for r in records)
    requests = [r.predict_log.request for r in records]
    assert [r.model_spec.signature_name for r in requests] == [
        "serving_default",
        "serving_default",
        "predict_pixels",
        "predict_pixels",
    ]
    assert all(r.model_spec.name == "leukemia" for r in requests)
    # The first request holds real images of the model's validation split.
    real = list(tf.make_ndarray(requests[0].inputs["image_bytes"]))
    assert len(real) == warmup.DEFAULT_REAL_IMAGES and all(
        tf.io.is_jpeg(b) or b[:4] == b"\x89PNG" for b in real
    )

    results = _replay(loaded["hierarchical"], records)
    assert [len(r["probabilities"]) for r in results] == [4, 4, 1, 1]
    want = _keras_expected(export.model_dir, real)
    np.testing.assert_allclose(results[0]["probabilities"], want["probabilities"], atol=TOLERANCE)


def test_corrupt_image_is_invalid_argument_naming_it(loaded):
    good = _test_images()
    jpeg = good[1]
    batch = [good[0], jpeg[: len(jpeg) // 2], b"definitely not an image", good[2], b""]
    serve = loaded["flat"].signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        serve(image_bytes=tf.constant(batch))
    message = str(info.value)
    assert "Invalid image in the request" in message
    assert f"image 1 of the batch ({len(jpeg) // 2} bytes): a corrupt or truncated JPEG" in message
    assert "image 2 of the batch (23 bytes): not a JPEG, PNG, BMP or GIF image" in message
    assert "image 4 of the batch (0 bytes): empty" in message
    assert "image 0 " not in message and "image 3 " not in message
    # The same signature still serves a good batch afterwards.
    assert serve(image_bytes=tf.constant(good))["probabilities"].shape == (len(good), 6)
    assert serve(image_bytes=tf.constant([], tf.string))["probabilities"].shape == (0, 6)


def test_predict_pixels_checks_range_and_resizes_like_bytes(loaded):
    model = loaded["flat"]
    pixels = model.signatures["predict_pixels"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"expects RGB values in \[0, 255\]"):
        pixels(pixels=tf.fill([1, 32, 32, 3], -0.5))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"expects RGB values in \[0, 255\]"):
        pixels(pixels=tf.fill([1, 32, 32, 3], float("nan")))
    # Any other size goes through the input pipeline's resize: the same
    # result as sending the same pixels as a PNG.
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(2, 45, 27, 3), dtype=np.uint8)
    from_pixels = pixels(pixels=tf.constant(image, tf.float32))["probabilities"].numpy()
    from_png = model.signatures["serving_default"](
        image_bytes=tf.constant([_encode(i, "PNG") for i in image])
    )["probabilities"].numpy()
    np.testing.assert_allclose(from_pixels, from_png, atol=1e-6)


def test_versions_and_temperature(tmp_path, trained_flat_model_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(trained_flat_model_dir, model_dir)
    export_dir = tmp_path / "export"
    quick = dict(write_warmup=False, verify=False)
    with pytest.raises(FileNotFoundError, match="calibration.json not found"):
        export_lib.export_model(model_dir, export_dir, apply_temperature=True, **quick)
    with pytest.raises(ValueError, match="--version=0"):
        export_lib.export_model(model_dir, export_dir, version=0, **quick)
    (export_dir / "7").mkdir(parents=True)
    (export_dir / "notes").mkdir()
    assert export_lib.next_version(export_dir) == 8
    with pytest.raises(FileExistsError, match="7 already exists.*version 8"):
        export_lib.export_model(model_dir, export_dir, version=7, **quick)

    rundir.write_temperature(model_dir, 2.5)
    result = export_lib.export_model(model_dir, export_dir, apply_temperature=True, **quick)
    assert result.version == 8 and result.temperature == 2.5
    meta = json.loads(Path(result.path, "assets", "export.json").read_text())
    assert meta["temperature"] == 2.5 and meta["temperature_applied"] is True
    images = _test_images()[:2]
    served = (
        tf.saved_model.load(result.path)
        .signatures["serving_default"](image_bytes=tf.constant(images))["probabilities"]
        .numpy()
    )
    trained = rundir.load_trained_model(model_dir)
    logits = trained.outputs(
        np.stack([preprocessing.decode_and_resize(b, 32).numpy() for b in images])
    )["logits"]
    np.testing.assert_allclose(served, tf.nn.softmax(logits / 2.5).numpy(), atol=TOLERANCE)
    assert not (Path(result.path) / "assets.extra").exists()


# ------------------------------------------------------------------ clients
def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_signature(model, signature: str, inputs: dict) -> dict:
    return {k: v.numpy() for k, v in model.signatures[signature](**inputs).items()}


def _rows(outputs: dict) -> list[dict]:
    """TF Serving's REST row format: one dict per instance, strings decoded."""
    count = len(next(iter(outputs.values())))
    return [
        {
            k: (v[i].decode() if isinstance(v[i], bytes) else v[i].tolist())
            for k, v in outputs.items()
        }
        for i in range(count)
    ]


def test_rest_request_fed_through_the_signature(loaded):
    rest = _load_tool("serving_client_rest")
    images = _test_images()
    body = rest.build_request(images)
    assert body["signature_name"] == "serving_default"
    assert body["instances"][1] == {"image_bytes": {"b64": base64.b64encode(images[1]).decode()}}
    assert (
        rest.predict_url("http://h:8501/", "leukemia") == "http://h:8501/v1/models/leukemia:predict"
    )
    assert (
        rest.predict_url("http://h:8501", "m", 3) == "http://h:8501/v1/models/m/versions/3:predict"
    )
    with pytest.raises(ValueError, match="no images"):
        rest.build_request([])

    # What TF Serving does with the JSON: base64-decode, batch, run the signature.
    decoded = json.loads(json.dumps(body))
    batch = [base64.b64decode(i["image_bytes"]["b64"]) for i in decoded["instances"]]
    model = loaded["hierarchical"]
    by_hand = _run_signature(model, decoded["signature_name"], {"image_bytes": tf.constant(batch)})
    direct = _run_signature(model, "serving_default", {"image_bytes": tf.constant(images)})
    for key in direct:
        np.testing.assert_array_equal(by_hand[key], direct[key])
    parsed = rest.parse_response(json.loads(json.dumps({"predictions": _rows(by_hand)})))
    assert [p["class_names"] for p in parsed] == [n.decode() for n in direct["class_names"]]
    with pytest.raises(RuntimeError, match="bad image"):
        rest.parse_response({"error": "bad image"})


def test_grpc_request_fed_through_the_signature(loaded):
    grpc_client = _load_tool("serving_client_grpc")
    images = _test_images()
    request = grpc_client.build_request(images, model="leukemia", version=4)
    assert request.model_spec.name == "leukemia" and request.model_spec.version.value == 4
    assert request.model_spec.signature_name == "serving_default"
    tensor = request.inputs["image_bytes"]
    assert tensor.dtype == tf.string.as_datatype_enum
    assert [d.size for d in tensor.tensor_shape.dim] == [len(images)]
    assert list(tensor.string_val) == images
    # The request replays through the export exactly like a warmup record.
    from tensorflow_serving.apis import prediction_log_pb2

    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
    replayed = _replay(loaded["flat"], [log])[0]
    direct = _run_signature(loaded["flat"], "serving_default", {"image_bytes": tf.constant(images)})
    np.testing.assert_array_equal(replayed["probabilities"], direct["probabilities"])


class _StandInServer:
    """A minimal stand-in for tensorflow_model_server (REST + gRPC predict) over a SavedModel.

    No TF Serving binary can be installed here; this runs the clients' real
    network code against TF Serving's request/response formats.
    """

    def __init__(self, model, name: str = "leukemia"):
        import grpc
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        self.model, self.name = model, name
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                if self.path != f"/v1/models/{outer.name}:predict":
                    return self._reply(404, {"error": f"no model at {self.path}"})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                instances = body["instances"]
                batch = {
                    k: [base64.b64decode(i[k]["b64"]) for i in instances] for k in instances[0]
                }
                try:
                    out = _run_signature(
                        outer.model, body.get("signature_name", "serving_default"), batch
                    )
                except tf.errors.InvalidArgumentError as e:
                    return self._reply(400, {"error": e.message})
                self._reply(200, {"predictions": _rows(out)})

            def _reply(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
            def Predict(self, request, context):
                inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
                try:
                    out = _run_signature(outer.model, request.model_spec.signature_name, inputs)
                except tf.errors.InvalidArgumentError as e:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
                response = predict_pb2.PredictResponse()
                for key, value in out.items():
                    response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
                return response

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.rest_url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), self.grpc)
        self.grpc_target = f"127.0.0.1:{self.grpc.add_insecure_port('127.0.0.1:0')}"
        self.grpc.start()

    def close(self):
        self.http.shutdown()
        self.grpc.stop(None)


def test_clients_round_trip_against_a_stand_in_server(loaded, tmp_path, capsys):
    import grpc

    rest = _load_tool("serving_client_rest")
    grpc_client = _load_tool("serving_client_grpc")
    images = _test_images()
    direct = _run_signature(
        loaded["hierarchical"], "serving_default", {"image_bytes": tf.constant(images)}
    )
    server = _StandInServer(loaded["hierarchical"])
    try:
        for predictions in (
            rest.predict(images, url=server.rest_url),
            grpc_client.predict(images, target=server.grpc_target),
        ):
            np.testing.assert_allclose(
                [p["probabilities"] for p in predictions], direct["probabilities"], atol=1e-6
            )
            assert [p["level_0_names"] for p in predictions] == [
                n.decode() for n in direct["level_0_names"]
            ]
        with pytest.raises(RuntimeError, match=r"(?s)HTTP 400 .*image 1 of the batch \(3 bytes\)"):
            rest.predict([images[0], b"bad"], url=server.rest_url)
        with pytest.raises(grpc.RpcError) as info:
            grpc_client.predict([images[0], b"bad"], target=server.grpc_target)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image 1 of the batch (3 bytes)" in info.value.details()
        # The command lines print one line per image.
        files = []
        for i, data in enumerate(images[:2]):
            files.append(tmp_path / f"cell{i}.png")
            files[-1].write_bytes(data)
        assert rest.main([*map(str, files), f"--url={server.rest_url}"]) == 0
        assert grpc_client.main([*map(str, files), f"--target={server.grpc_target}"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 4 and all(str(files[0]) in line for line in lines[::2])
    finally:
        server.close()


# --------------------------------------------------------------------------
# The signature refuses what the data set builders refuse, with the same reasons
# (a tiny untrained model: the checks are in the decode, not the model)


@pytest.fixture(scope="module")
def tiny_serving(tmp_path_factory):
    """``serving_default`` of a saved and reloaded ServingModule around a 2-class model."""
    import keras

    from leukemia_tf.models.label_space import LabelSpace

    size = 32
    inputs = keras.Input([size, size, 3])
    logits = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, {"logits": logits})
    module = signatures.ServingModule(model, LabelSpace(["a", "b"], "flat", None), size)
    path = tmp_path_factory.mktemp("tiny_serving") / "1"
    tf.saved_model.save(module, str(path), signatures=module.signatures)
    return tf.saved_model.load(str(path)).signatures["serving_default"]


def test_signature_refuses_cut_short_and_too_large_images_naming_them(tiny_serving):
    import bad_image_bytes

    from leukemia_tf.data import images

    good = _test_images()
    cut = bad_image_bytes.jpeg_cut_short(bad_image_bytes.jpeg(96, 80))
    huge_jpeg = bad_image_bytes.jpeg_claiming(65000, 65000)
    huge_png = bad_image_bytes.png_claiming(30000, 30000)
    batch = [good[0], cut, huge_jpeg, good[2], huge_png, b"not an image"]
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        tiny_serving(image_bytes=tf.constant(batch))
    message = str(info.value)
    assert f"image 1 of the batch ({len(cut)} bytes): {images.JPEG_CUT_SHORT}" in message
    assert (
        f"image 2 of the batch ({len(huge_jpeg)} bytes): "
        f"{images.too_large_reason(65000, 65000)}" in message
    )
    assert (
        f"image 4 of the batch ({len(huge_png)} bytes): "
        f"{images.too_large_reason(30000, 30000)}" in message
    )
    assert "image 5 of the batch (12 bytes): not a JPEG, PNG, BMP or GIF image" in message
    assert "image 0 " not in message and "image 3 " not in message
    # In index order, each once.
    positions = [message.index(f"image {i} of the batch") for i in (1, 2, 4, 5)]
    assert positions == sorted(positions)
    # Good images (every format and resize branch) still pass, with the pixels
    # of the input pipeline's decode.
    assert tiny_serving(image_bytes=tf.constant(good))["probabilities"].shape == (len(good), 2)
    for data in good:
        image, problem = preprocessing.decode_and_resize_checked(data, 32)
        assert problem.numpy() == b""
        np.testing.assert_array_equal(image, preprocessing.decode_and_resize(data, 32))


def test_signature_checks_size_from_the_header_of_every_format():
    from leukemia_tf.data import images

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    for image_format in ("JPEG", "PNG", "GIF", "BMP"):
        data = _encode(pixels, image_format)
        assert images.header_size(data) == (50, 30)
        np.testing.assert_array_equal(preprocessing.header_size(data), [50, 30])
    import bad_image_bytes

    for data, size in (
        (bad_image_bytes.jpeg_claiming(65000, 1000), [65000, 1000]),
        (bad_image_bytes.png_claiming(30000, 20000), [30000, 20000]),
        # The largest sizes a PNG can claim: the product needs 64 unsigned bits.
        (bad_image_bytes.png_claiming(2**32 - 1, 2**32 - 1), [2**32 - 1, 2**32 - 1]),
    ):
        header = preprocessing.header_size(data)
        np.testing.assert_array_equal(header, size)
        reason = preprocessing.too_large_reason(header).numpy().decode()
        assert reason == images.too_large_reason(*size)
    # At the limit itself: not too large.
    limit = preprocessing.too_large_reason(tf.constant([images.MAX_IMAGE_PIXELS, 1], tf.int64))
    assert limit.numpy() == b""
    np.testing.assert_array_equal(preprocessing.header_size(b"not an image"), [0, 0])


# -------------------------------------------------------------------- AdaBN
def _tree_digest(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def test_adapt_bn_exports_an_adapted_copy_recorded_as_such(tmp_path, trained_flat_model_dir):
    from leukemia_tf.models import adapt

    run_before = _tree_digest(trained_flat_model_dir)
    target = tmp_path / "lab2"
    target.mkdir()
    images = _test_images()
    for i, (data, ext) in enumerate(zip(images, ("jpg", "jpg", "png", "bmp", "gif"), strict=True)):
        (target / f"cell{i}.{ext}").write_bytes(data)
    (target / "broken.png").write_bytes(b"not an image")  # left out, logged
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "leukemia_tf.export",
            f"--model_dir={trained_flat_model_dir}",
            f"--export_dir={tmp_path / 'export'}",
            f"--adapt_bn={target}",
            "--nowarmup",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "AdaBN: an ADAPTED copy" in run.stdout and "on 5 image(s)" in run.stdout
    path = tmp_path / "export" / "1"
    record = json.loads((path / "assets" / "export.json").read_text())["adapted_batchnorm"]
    trained = rundir.load_trained_model(trained_flat_model_dir)
    n_bn = len(adapt.batchnorm_layers(trained.model))
    assert record["images"] == str(target) and record["date"]
    assert (record["count"], record["layers"], record["failed"]) == (5, n_bn, 1)

    # The served probabilities are the adapted model's, not the trained one's.
    served = (
        tf.saved_model.load(str(path))
        .signatures["serving_default"](image_bytes=tf.constant(images))["probabilities"]
        .numpy()
    )
    adapted = adapt.adapt_from_files(trained.model, str(target), trained.image_size).model
    pixels = np.stack([preprocessing.decode_and_resize(b, 32).numpy() for b in images])
    expected = trained.label_space.probabilities(adapted(pixels, training=False)).numpy()
    np.testing.assert_allclose(served, expected, atol=TOLERANCE)
    plain = _keras_expected(trained_flat_model_dir, images)["probabilities"]
    assert not np.allclose(served, plain, atol=1e-4)

    # A plain export says it is not adapted; 'inputs' means nothing to an export.
    quick = dict(write_warmup=False, verify=False)
    result = export_lib.export_model(trained_flat_model_dir, tmp_path / "export", **quick)
    assert result.adapted_batchnorm is None
    meta = json.loads(Path(result.path, "assets", "export.json").read_text())
    assert "adapted_batchnorm" in meta and meta["adapted_batchnorm"] is None
    with pytest.raises(ValueError, match="--adapt_bn=inputs: an export has no inputs"):
        export_lib.export_model(trained_flat_model_dir, tmp_path / "x", adapt_bn="inputs", **quick)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        export_lib.export_model(trained_flat_model_dir, tmp_path / "x", adapt_bn="/nope", **quick)
    assert _tree_digest(trained_flat_model_dir) == run_before
