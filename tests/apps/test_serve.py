"""toolkit serve: the Open Inference Protocol through Triton's own client, bit-exact logits, bad requests, limits,
metrics, graceful drain and a short soak. Every server listens on 127.0.0.1 on a free port (--port 0)."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.http as triton
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.helpers import FILES, ROOT, Export, assert_clean_error, cli
from toolkit.apps.predict import load
from toolkit.artifacts.backends import load_backend

ONNX = ("onnx", "onnx-fp16", "onnx-int8")
START_TIMEOUT_S = 120  # loading and warming up three models on a busy 2-core machine
REQUEST_TIMEOUT_S = 60  # per HTTP request of a test: a bound, never a measurement


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    lines: list[str]  # its stdout so far

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def output(self) -> str:
        return "\n".join(self.lines)


@contextmanager
def serving(*args: str) -> Iterator[Server]:
    """`toolkit serve ARGS --port 0` in a subprocess; yields once it prints its URL; SIGTERM and a clean exit after."""
    process = subprocess.Popen([sys.executable, "-m", "toolkit", "serve", *args, "--port", "0"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("listening on "):
                started.set()
        started.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    try:
        started.wait(START_TIMEOUT_S)
        url = next((m.group(1) for line in lines if (m := re.match(r"listening on (http://\S+)", line))), None)
        assert url, "the server did not start:\n" + "\n".join(lines)
        yield Server(process, url, lines)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def request(server: Server, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, lower-cased headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def binary_infer_body(x: np.ndarray, datatype: str = "FP32", request_id: str | None = None) -> tuple[bytes, dict]:
    """A binary-extension infer request for `x`, as tritonclient writes one."""
    header = {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": datatype,
                          "parameters": {"binary_data_size": x.nbytes}}],
              "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    if request_id is not None:
        header["id"] = request_id
    text = json.dumps(header).encode()
    return text + x.tobytes(), {"Inference-Header-Content-Length": str(len(text)),
                                "Content-Type": "application/octet-stream"}


def binary_logits(headers: dict[str, str], body: bytes) -> tuple[dict, np.ndarray]:
    """The JSON header and the logits of a binary infer response."""
    length = int(headers["inference-header-content-length"])
    header = json.loads(body[:length])
    shape = header["outputs"][0]["shape"]
    return header, np.frombuffer(body[length:], np.float32).reshape(shape)


def metric(server: Server, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when it has none yet)."""
    _, _, body = request(server, "GET", "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def images_batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def server(exported: Export) -> Iterator[Server]:
    """The export folder's three ONNX models on the CPU, one thread each (so logits can match in-process ones)."""
    with serving(str(exported.dir), "--provider", "cpu", "--threads", "1", "--max-request-bytes", "2000000") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.address, network_timeout=REQUEST_TIMEOUT_S)


def model_name(exported: Export, fmt: str) -> str:
    return f"{exported.dir.name}-{fmt}"


def test_start_up_names_every_onnx_format_and_the_url(server: Server, exported: Export) -> None:
    names = [model_name(exported, f) for f in ONNX]
    assert f"models: {', '.join(names)}" in server.output()
    assert server.url.startswith("http://127.0.0.1:") and server.port > 0


def test_health_and_metadata_through_tritonclient(client: triton.InferenceServerClient, exported: Export) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data", "model_configuration"]
    name = model_name(exported, "onnx")
    assert client.is_model_ready(name) and client.is_model_ready(name, "1")
    metadata = client.get_model_metadata(name, "1")
    assert metadata["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    config = client.get_model_config(name)
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [3, 32, 32]
    assert config["output"][0]["dims"] == [10]
    assert [m["name"] for m in client.get_model_repository_index()] == [model_name(exported, f) for f in ONNX]
    assert not client.is_model_ready(name, "2")
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")


def test_models_route_lists_every_model(server: Server, exported: Export) -> None:
    status, _, body = request(server, "GET", "/v2/models")
    assert status == 200
    assert [m["name"] for m in json.loads(body)["models"]] == [model_name(exported, f) for f in ONNX]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("fmt", ONNX)
def test_infer_logits_equal_predict_logits_bit_for_bit(client: triton.InferenceServerClient, exported: Export,
                                                       fmt: str, binary: bool) -> None:
    x = images_batch(7, seed=len(fmt))
    expected = load_backend(exported.dir / FILES[fmt], threads=1, provider="cpu").predict_logits(x)
    tensor = triton.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = client.infer(model_name(exported, fmt), [tensor], request_id="r1",
                          outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
    assert result.get_response()["id"] == "r1"
    np.testing.assert_array_equal(result.as_numpy("logits"), expected)


def test_uint8_pixels_are_normalized_by_the_model_metadata(client: triton.InferenceServerClient,
                                                           exported: Export) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    backend = load_backend(exported.dir / "model.onnx", threads=1, provider="cpu")
    expected = backend.predict_logits(backend.metadata.normalize(pixels.transpose(0, 3, 1, 2)))
    tensor = triton.InferInput("images", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = client.infer(model_name(exported, "onnx"), [tensor], model_version="1")
    np.testing.assert_array_equal(result.as_numpy("logits"), expected)


@pytest.fixture(scope="module")
def png_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("png")
    paths = []
    for i in range(3):
        pixels = np.random.default_rng(10 + i).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        paths.append(root / f"image{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_classify_route_labels_image_files_as_predict_does(server: Server, exported: Export,
                                                          png_files: list[Path]) -> None:
    expected = load(exported.dir / "model.onnx", threads=1, provider="cpu").predict(png_files, top_k=3)
    body, content_type = _multipart([(p.name, p.read_bytes()) for p in png_files])
    status, _, answer = request(server, "POST", f"/v1/models/{model_name(exported, 'onnx')}/classify?top_k=3", body,
                                {"Content-Type": content_type})
    assert status == 200, answer
    predictions = json.loads(answer)["predictions"]
    assert [p["image"] for p in predictions] == [p.name for p in png_files]
    assert [(p["class"], p["probability"]) for p in predictions] == [(e.label, e.probability) for e in expected]
    assert [[(t["class"], t["probability"]) for t in p["top_k"]] for p in predictions] == [e.top for e in expected]
    # a raw body is one image
    status, _, answer = request(server, "POST", f"/v1/models/{model_name(exported, 'onnx')}/classify",
                                png_files[0].read_bytes(), {"Content-Type": "image/png"})
    assert status == 200 and json.loads(answer)["predictions"][0]["class"] == expected[0].label


def _bad_cases(model: str) -> list[tuple[str, str, bytes, dict[str, str], int, str]]:
    """(case, path, body, headers, status, words of the error) for each bad request of the reliability list."""
    infer = f"/v2/models/{model}/infer"
    good, headers = binary_infer_body(images_batch(2))
    length = int(headers["Inference-Header-Content-Length"])
    nan = images_batch(2)
    nan[1, 0, 3, 3] = np.nan
    nan_body, nan_headers = binary_infer_body(nan)
    json_input = {"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}

    def as_json(**changes: object) -> bytes:
        return json.dumps({"inputs": [{**json_input, **changes}]}).encode()

    return [
        ("malformed-json", infer, b'{"inputs": [', {}, 400, "malformed JSON"),
        ("not-an-object", infer, b"[1, 2]", {}, 400, "JSON object"),
        ("wrong-datatype", infer, as_json(datatype="FP64"), {}, 400, "datatype must be one of FP32, UINT8"),
        ("wrong-shape", infer, as_json(shape=[1, 3, 28, 28]), {}, 400, "shape must be [N, 3, 32, 32]"),
        ("wrong-value-count", infer, as_json(data=[0.0] * 3000), {}, 400, "needs 3072 values"),
        ("strings-as-data", infer, as_json(data=["a"] * 3072), {}, 400, "data must be numbers"),
        ("unknown-input", infer, as_json(name="pixels"), {}, 400, "unknown input 'pixels'"),
        ("too-many-images", infer, as_json(shape=[65, 3, 32, 32]), {}, 400, "max_batch_size 64"),
        ("wrong-byte-count", infer, good.replace(b'"binary_data_size": 24576', b'"binary_data_size": 24572'),
         headers, 400, "does not match FP32 shape"),
        ("truncated-binary-body", infer, good[:-100], headers, 400, "truncated binary body"),
        ("header-longer-than-body", infer, good[:length - 5], headers, 400, "truncated body"),
        ("body-over-the-limit", infer, b"0" * 2_000_001, {}, 413, "exceeds the limit of 2000000"),
        ("unknown-model", "/v2/models/nope/infer", good, headers, 404, "unknown model 'nope'"),
        ("unknown-version", f"/v2/models/{model}/versions/7/infer", good, headers, 404, "no version '7'"),
        ("nan-input", infer, nan_body, nan_headers, 400, "NaN or inf"),
        ("non-image-file", f"/v1/models/{model}/classify", b"%PDF-1.4 not an image", {}, 400, "not a readable image"),
        ("bad-top-k", f"/v1/models/{model}/classify?top_k=11", b"", {}, 400, "top_k must be an integer 1..10"),
        ("compressed-body", infer, good, {**headers, "Content-Encoding": "gzip"}, 415, "Content-Encoding 'gzip'"),
        ("no-such-route", "/v2/nothing", b"", {}, 404, "Not Found: POST /v2/nothing"),
        ("wrong-method", "/v2/health/live", b"", {}, 405, "Method Not Allowed"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases("m"))), ids=[c[0] for c in _bad_cases("m")])
def test_bad_request_gets_its_own_one_line_4xx_and_the_server_keeps_serving(server: Server, exported: Export,
                                                                             case: int) -> None:
    name = model_name(exported, "onnx")
    _, path, body, headers, expected_status, words = _bad_cases(name)[case]
    status, _, answer = request(server, "POST", path, body, headers)
    assert status == expected_status, answer
    error = json.loads(answer)["error"]
    assert words in error and "\n" not in error, error
    x = images_batch(1)
    body, headers = binary_infer_body(x)
    status, response_headers, answer = request(server, "POST", f"/v2/models/{name}/infer", body, headers)
    assert status == 200
    expected = load_backend(exported.dir / "model.onnx", threads=1, provider="cpu").predict_logits(x)
    np.testing.assert_array_equal(binary_logits(response_headers, answer)[1], expected)


def test_infer_paths_answer_as_routes_do(server: Server, exported: Export) -> None:
    """Infer requests skip Starlette's router: the versioned path still infers, and other methods or longer
    paths still get Starlette's one-line 405 and 404."""
    name = model_name(exported, "onnx")
    x = images_batch(3, seed=5)
    body, headers = binary_infer_body(x)
    status, response_headers, answer = request(server, "POST", f"/v2/models/{name}/versions/1/infer", body, headers)
    assert status == 200
    expected = load_backend(exported.dir / "model.onnx", threads=1, provider="cpu").predict_logits(x)
    np.testing.assert_array_equal(binary_logits(response_headers, answer)[1], expected)
    for method, path, expected_status, words in (
            ("GET", f"/v2/models/{name}/infer", 405, "Method Not Allowed: GET"),
            ("POST", f"/v2/models/{name}/infer/more", 404, "Not Found: POST"),
            ("POST", f"/v2/models/{name}/versions/1/2/infer", 404, "Not Found: POST")):
        status, _, answer = request(server, method, path, body if method == "POST" else None, headers)
        assert status == expected_status and words in json.loads(answer)["error"], (path, answer)


def test_a_chunked_body_is_cut_off_at_the_limit(server: Server, exported: Export) -> None:
    """Without a Content-Length the limit applies while the body streams in."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("POST", f"/v2/models/{model_name(exported, 'onnx')}/infer",
                           body=(b"0" * 65536 for _ in range(40)), encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413 and "exceeds the limit of 2000000" in json.loads(response.read())["error"]
    finally:
        connection.close()


def test_metrics_count_requests_images_and_executions(server: Server, exported: Export) -> None:
    name = model_name(exported, "onnx-int8")
    before = {m: metric(server, m, model=name) for m in ("toolkit_inference_count_total",
                                                         "toolkit_inference_exec_count_total")}
    ok_before = metric(server, "toolkit_requests_total", model=name, status="200")
    bad_before = metric(server, "toolkit_requests_total", model=name, status="400")
    for seed in range(3):
        body, headers = binary_infer_body(images_batch(2, seed))
        assert request(server, "POST", f"/v2/models/{name}/infer", body, headers)[0] == 200
    assert request(server, "POST", f"/v2/models/{name}/infer", b"{", {})[0] == 400
    assert metric(server, "toolkit_requests_total", model=name, status="200") - ok_before == 3
    assert metric(server, "toolkit_requests_total", model=name, status="400") - bad_before == 1
    assert metric(server, "toolkit_inference_count_total", model=name) - before["toolkit_inference_count_total"] == 6
    executions = metric(server, "toolkit_inference_exec_count_total", model=name) - \
        before["toolkit_inference_exec_count_total"]
    assert 1 <= executions <= 3  # one request per execution, or several merged
    for histogram in ("toolkit_request_seconds_count", "toolkit_queue_seconds_count", "toolkit_compute_seconds_count",
                      "toolkit_batch_size_count"):
        assert metric(server, histogram, model=name) >= 3, histogram
    assert metric(server, "toolkit_in_flight") == 0


@pytest.fixture(scope="module")
def batching_server(exported: Export) -> Iterator[Server]:
    """Batches of exactly 3 images: with a 60 s queue delay a batch starts only when full. Two sessions."""
    with serving(str(exported.dir / "model.onnx"), "--threads", "1", "--max-batch-size", "3",
                 "--max-queue-delay-ms", "60000", "--instances", "2") as s:
        yield s


def _together(server: Server, inputs: list[np.ndarray]) -> list[tuple[int, dict[str, str], bytes]]:
    with ThreadPoolExecutor(len(inputs)) as pool:
        return list(pool.map(lambda x: request(server, "POST", "/v2/models/model/infer", *binary_infer_body(x)),
                             inputs))


def test_requests_are_merged_into_one_execution_and_split_back(batching_server: Server, exported: Export) -> None:
    config = json.loads(request(batching_server, "GET", "/v2/models/model/config")[2])
    assert config["max_batch_size"] == 3 and config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 60_000_000}
    inputs = [images_batch(1, seed=20), images_batch(2, seed=21)]
    images_before = metric(batching_server, "toolkit_inference_count_total", model="model")
    executions_before = metric(batching_server, "toolkit_inference_exec_count_total", model="model")
    backend = load_backend(exported.dir / "model.onnx", threads=1, provider="cpu")
    for x, (status, headers, body) in zip(inputs, _together(batching_server, inputs)):
        assert status == 200
        np.testing.assert_allclose(binary_logits(headers, body)[1], backend.predict_logits(x), rtol=1e-6, atol=1e-6)
    assert metric(batching_server, "toolkit_inference_count_total", model="model") - images_before == 3
    assert metric(batching_server, "toolkit_inference_exec_count_total", model="model") - executions_before == 1


def test_a_request_that_fails_its_batch_fails_alone(batching_server: Server, exported: Export) -> None:
    """Values finite but so large that the model overflows pass the request checks and fail the merged batch;
    the batch is rerun request by request, so only that request gets the 400."""
    huge = np.full((1, 3, 32, 32), 3e38, np.float32)
    inputs = [images_batch(1, seed=30), huge, images_batch(1, seed=31)]
    backend = load_backend(exported.dir / "model.onnx", threads=1, provider="cpu")
    answers = _together(batching_server, inputs)
    for i in (0, 2):
        status, headers, body = answers[i]
        assert status == 200
        np.testing.assert_array_equal(binary_logits(headers, body)[1], backend.predict_logits(inputs[i]))
    status, _, body = answers[1]
    error = json.loads(body)["error"]
    assert status == 400 and "too large for the model" in error and "model 'model'" in error
    assert str(exported.dir) not in error  # the server's files stay its own


def test_start_up_errors_are_one_line(exported: Export, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(exported.dir, copy)
    with open(copy / "model.int8.onnx", "ab") as f:  # no longer the bytes the manifest lists
        f.write(b"\0")
    assert_clean_error(cli(capsys, "serve", copy, "--port", "0"), "model.int8.onnx", "sha256")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(cli(capsys, "serve", empty), "no ONNX model in this folder")
    assert_clean_error(cli(capsys, "serve", exported.dir, "--max-batch-size", "0"), "--max-batch-size: must be >= 1")
    assert_clean_error(cli(capsys, "serve", exported.dir, exported.dir), "two models would be named")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_clean_error(cli(capsys, "serve", exported.dir / "model.onnx", "--port", port, "--threads", "1"),
                           f"--port {port}: cannot listen there")


def test_serving_never_imports_torch(exported: Export) -> None:
    code = f"""
import sys
from toolkit.apps.serve import load_models
from toolkit.apps.serving.config import ServeConfig
from toolkit.apps.serving.metrics import Metrics
from concurrent.futures import ThreadPoolExecutor
with ThreadPoolExecutor(1) as pool:
    load_models(ServeConfig([{str(exported.dir)!r}], threads=1), pool, Metrics(64), lambda line: None)
heavy = sorted(m for m in ("torch", "onnx", "torchvision", "accelerate", "matplotlib") if m in sys.modules)
assert not heavy, heavy
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_command_line_starts_without_the_serve_extra() -> None:
    """`toolkit --help` and every other command import neither starlette nor uvicorn nor prometheus-client."""
    code = ("import sys, toolkit.apps.cli as cli; cli.build_parser(); "
            "assert not {'starlette', 'uvicorn', 'prometheus_client'} & set(sys.modules), sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_limits_queue_full_503_timeout_504_and_api_key(exported: Export) -> None:
    """A queue delay longer than the timeout holds every request in the queue: two fill it (--max-queue 2), the
    third gets 503 with Retry-After, and the two get 504 at --timeout-ms."""
    with serving(str(exported.dir / "model.onnx"), "--threads", "1", "--max-queue-delay-ms", "60000",
                 "--max-queue", "2", "--timeout-ms", "3000", "--api-key", "s3cret") as server:
        key = {"Authorization": "Bearer s3cret"}
        assert request(server, "GET", "/v2/health/live")[0] == 200  # probes need no key
        assert request(server, "GET", "/v2/health/ready")[0] == 200
        status, _, answer = request(server, "GET", "/v2/models")
        assert status == 401 and "API key" in json.loads(answer)["error"]
        assert request(server, "GET", "/v2/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(server, "GET", "/v2/models", headers=key)[0] == 200
        body, headers = binary_infer_body(images_batch(1))
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(request, server, "POST", "/v2/models/model/infer", body, {**headers, **key})
                    for _ in range(2)]
            deadline = time.monotonic() + 30
            while metric_with_key(server, key) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            status, response_headers, answer = request(server, "POST", "/v2/models/model/infer", body,
                                                       {**headers, **key})
            assert status == 503 and response_headers["retry-after"] == "1", answer
            assert "--max-queue 2" in json.loads(answer)["error"]
            for future in held:
                status, _, answer = future.result()
                assert status == 504 and "--timeout-ms" in json.loads(answer)["error"]


def metric_with_key(server: Server, key: dict[str, str]) -> float:
    _, _, body = request(server, "GET", "/metrics", headers=key)
    return next(s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
                if s.name == "toolkit_in_flight")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_drain_answers_accepted_requests_refuses_new_ones_and_exits_0(exported: Export, sig: signal.Signals) -> None:
    """When the signal comes, six requests wait in the queue (batches of 7, a 10-minute queue delay) and a seventh
    is still sending its body. The queued six are answered at once with their logits; while the seventh is
    unfinished the server is not ready and new requests get 503; once it has sent its body it is answered too,
    and the server exits 0. Nothing here depends on timing: every wait is for a state, bounded."""
    backend = load_backend(exported.dir / "model.onnx", threads=1, provider="cpu")
    with serving(str(exported.dir / "model.onnx"), "--threads", "1", "--max-batch-size", "7",
                 "--max-queue-delay-ms", "600000", "--shutdown-timeout", "120") as server:
        inputs = [images_batch(1, seed) for seed in range(7)]
        slow_body, slow_headers = binary_infer_body(inputs[6])
        slow = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
        slow.putrequest("POST", "/v2/models/model/infer")
        for k, v in {**slow_headers, "Content-Length": str(len(slow_body))}.items():
            slow.putheader(k, v)
        slow.endheaders()
        slow.send(slow_body[:1000])
        with ThreadPoolExecutor(6) as pool:
            held = [pool.submit(request, server, "POST", "/v2/models/model/infer", *binary_infer_body(x))
                    for x in inputs[:6]]
            deadline = time.monotonic() + 60
            while metric(server, "toolkit_in_flight") < 7 and time.monotonic() < deadline:
                time.sleep(0.02)
            server.process.send_signal(sig)
            for x, future in zip(inputs, held):
                status, headers, answer = future.result()
                assert status == 200
                np.testing.assert_array_equal(binary_logits(headers, answer)[1], backend.predict_logits(x))
        assert request(server, "GET", "/v2/health/ready")[0] == 503
        assert request(server, "GET", "/v2/health/live")[0] == 200
        status, headers, answer = request(server, "POST", "/v2/models/model/infer", *binary_infer_body(inputs[0]))
        assert status == 503 and "shutting down" in json.loads(answer)["error"] and headers["connection"] == "close"
        slow.send(slow_body[1000:])
        response = slow.getresponse()
        assert response.status == 200
        header, logits = binary_logits({k.lower(): v for k, v in response.getheaders()}, response.read())
        np.testing.assert_array_equal(logits, backend.predict_logits(inputs[6]))
        slow.close()
        assert server.process.wait(60) == 0
        assert any("draining (7 requests in flight" in line for line in server.lines), server.output()


def _soak(exported: Export, requests_total: int, concurrency: int) -> None:
    """`requests_total` requests from `concurrency` keep-alive clients: 5 % malformed (400), 1 % clients that
    disconnect mid-body, the rest single-image binary requests answered with their own logits, exactly once
    (the id echoed). No 5xx but 503/504; the server's RSS after warm-up grows at most 10 %."""
    pool_images = images_batch(64, seed=99)
    expected = load_backend(exported.dir / "model.onnx", threads=1, provider="cpu").predict_logits(pool_images)
    with serving(str(exported.dir / "model.onnx"), "--threads", "1") as server:
        process = psutil.Process(server.process.pid)
        statuses: Counter[int] = Counter()
        answered: Counter[str] = Counter()
        lock = threading.Lock()
        deadline = time.monotonic() + 600  # a bound, never an assertion on speed

        def client(worker: int, indices: range) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
            for i in indices:
                if time.monotonic() > deadline:
                    break
                if i % 100 == 37:  # a client that disconnects mid-request: headers and half the body, then gone
                    body, headers = binary_infer_body(pool_images[:1])
                    raw = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
                    raw.putrequest("POST", "/v2/models/model/infer")
                    for k, v in {**headers, "Content-Length": str(len(body))}.items():
                        raw.putheader(k, v)
                    raw.endheaders()
                    raw.send(body[: len(body) // 2])
                    raw.close()
                    continue
                if i % 20 == 3:
                    body, headers, rid = b'{"inputs": [{"name": "images", "shape": [1, 3, 32', {}, None
                else:
                    rid = f"{worker}-{i}"
                    body, headers = binary_infer_body(pool_images[i % 64: i % 64 + 1], request_id=rid)
                connection.request("POST", "/v2/models/model/infer", body=body, headers=headers)
                response = connection.getresponse()
                answer = response.read()
                with lock:
                    statuses[response.status] += 1
                if rid is None:
                    assert response.status == 400, answer
                    continue
                if response.status in (503, 504):
                    continue
                assert response.status == 200, answer
                header, logits = binary_logits({k.lower(): v for k, v in response.getheaders()}, answer)
                assert header["id"] == rid
                np.testing.assert_allclose(logits[0], expected[i % 64], rtol=1e-5, atol=1e-5)
                with lock:
                    answered[rid] += 1
            connection.close()

        share = requests_total // concurrency
        warm = max(share // 10, 1)
        with ThreadPoolExecutor(concurrency) as pool:  # warm-up: a tenth of the requests
            list(pool.map(lambda w: client(w, range(w * share, w * share + warm)), range(concurrency)))
        rss_warm = process.memory_info().rss
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda w: client(w, range(w * share + warm, (w + 1) * share)), range(concurrency)))
        rss_end = process.memory_info().rss
        assert time.monotonic() <= deadline, "the soak did not finish within its time bound"
        assert set(statuses) <= {200, 400, 503, 504}, statuses
        assert all(count == 1 for count in answered.values())
        sent = [i for w in range(concurrency) for i in range(w * share, (w + 1) * share) if i % 100 != 37]
        malformed = sum(1 for i in sent if i % 20 == 3)
        assert statuses[400] == malformed, statuses
        assert statuses[200] == len(answered) and statuses[200] + statuses[503] + statuses[504] == len(sent) - malformed
        assert rss_end <= 1.10 * rss_warm, (rss_warm, rss_end)
        assert request(server, "GET", "/v2/health/ready")[0] == 200


def test_soak_short(exported: Export) -> None:
    _soak(exported, requests_total=2000, concurrency=16)


@pytest.mark.slow
def test_soak_long(exported: Export) -> None:
    _soak(exported, requests_total=20000, concurrency=64)
