"""The two baselines of the serving benchmark, on the HTTP stack `toolkit serve` uses (Starlette + uvicorn).

`python -m benchmarks.serving_baselines noop [--classes 10] [--name noop] [--host 127.0.0.1] [--port 0]`
    parses each Open Inference Protocol v2 request exactly as a real server must (JSON tensors or the binary
    tensor extension, datatype, shape and byte count checked) and answers a zero output of the right shape
    without running a model: the HTTP floor, the most requests/s any server on this stack can reach.
`python -m benchmarks.serving_baselines naive MODEL.onnx [--threads N] [--name NAME] [--host ...] [--port 0]`
    parses the same way, then makes one ONNX Runtime call per request (`Backend.predict_logits`) inline on the
    event loop: no queue, no batching, no worker thread. The server a user would write in ten minutes.

Both print `serving on http://HOST:PORT` once the socket listens (with `--port 0`, the port the system chose)
and answer `GET /v2/health/ready`, `GET /v2/models/{name}` and `POST /v2/models/{name}/infer`. Inputs: "FP32"
N×3×32×32 (normalized) or "UINT8" N×32×32×3 pixels (normalized with the model's own mean and std). Errors are
a status and `{"error": "one line"}`. `serving_process` starts any such server as a subprocess for the tests
and benchmarks (benchmarks/test_serving.py, tests/apps/test_loadtest.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from toolkit.artifacts import formats
from toolkit.artifacts.backends import load_backend
from toolkit.artifacts.metadata import INPUT_NAME, OUTPUT_NAME
from toolkit.core.errors import ToolkitError
from toolkit.core.images import CHANNELS, HEIGHT, WIDTH, normalize

HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor extension's header (bytes of JSON first)
# datatype -> (numpy dtype, shape of one image): FP32 normalized NCHW, UINT8 pixels NHWC as images are stored.
DATATYPES = {"FP32": (np.dtype("<f4"), (CHANNELS, HEIGHT, WIDTH)), "UINT8": (np.dtype("u1"), (HEIGHT, WIDTH, CHANNELS))}
URL_PATTERN = re.compile(r"https?://[\w.\-\[\]:]+:\d+")  # the address a server prints when it listens


class BadRequest(Exception):
    """A request the server refuses with a status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InferRequest:
    """One parsed infer request: the images, and whether the output goes back as binary."""

    images: np.ndarray  # FP32 N×3×32×32 or UINT8 N×32×32×3, as sent
    binary_output: bool
    request_id: str | None


def _tensor_bytes(spec: dict[str, Any], body: bytes, offset: int, count: int, dtype: np.dtype) -> bytes:
    """The raw bytes of a binary input, checked against its declared size and the shape's."""
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if not isinstance(size, int) or size != count * dtype.itemsize:
        raise BadRequest(400, f"input {spec.get('name')!r}: binary_data_size {size!r}, expected "
                              f"{count * dtype.itemsize} bytes for its shape and datatype")
    if offset + size > len(body):
        raise BadRequest(400, f"input {spec.get('name')!r}: body ends after {len(body) - offset} of {size} "
                              "tensor bytes")
    return body[offset:offset + size]


def parse_infer(body: bytes, header_length: str | None) -> InferRequest:
    """An OIP v2 infer request (JSON, or JSON then raw tensor bytes when `header_length` is given) -> images."""
    try:
        json_end = len(body) if header_length is None else int(header_length)
        if not 0 < json_end <= len(body):
            raise ValueError
    except ValueError:
        raise BadRequest(400, f"{HEADER_LENGTH} {header_length!r} is not a length within the body") from None
    try:
        header = json.loads(body[:json_end])
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(400, f"request is not valid JSON ({exc})") from None
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(400, "request needs 'inputs' with exactly one tensor")
    spec = inputs[0]
    if spec.get("datatype") not in DATATYPES:
        raise BadRequest(400, f"input datatype {spec.get('datatype')!r}, expected one of {sorted(DATATYPES)}")
    dtype, image_shape = DATATYPES[spec["datatype"]]
    shape = spec.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and tuple(shape[1:]) == image_shape
            and isinstance(shape[0], int) and shape[0] > 0):
        raise BadRequest(400, f"input shape {shape!r}, expected [N, {', '.join(map(str, image_shape))}] for "
                              f"{spec['datatype']}")
    count = int(np.prod(shape))
    if "data" in spec:
        try:
            images = np.asarray(spec["data"], dtype=dtype)
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadRequest(400, f"input data is not {spec['datatype']} numbers ({exc})") from None
        if images.size != count:
            raise BadRequest(400, f"input data holds {images.size} values, shape {shape} needs {count}")
    else:
        images = np.frombuffer(_tensor_bytes(spec, body, json_end, count, dtype), dtype=dtype)
    outputs = header.get("outputs") or []
    binary = any(isinstance(o, dict) and (o.get("parameters") or {}).get("binary_data") for o in outputs) or \
        bool((header.get("parameters") or {}).get("binary_data_output"))
    return InferRequest(images.reshape(shape), binary, header.get("id"))


def infer_response(model: str, logits: np.ndarray, request: InferRequest) -> Response:
    """The OIP response: the logits as JSON numbers, or as raw little-endian bytes after the JSON header."""
    output: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(logits.shape)}
    header: dict[str, Any] = {"model_name": model, "outputs": [output]}
    if request.request_id is not None:
        header["id"] = request.request_id
    if not request.binary_output:
        output["data"] = logits.ravel().tolist()
        return JSONResponse(header)
    raw = np.ascontiguousarray(logits, dtype="<f4").tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps(header).encode()
    return Response(head + raw, media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(head))})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def build_app(model: str, classes: int, compute: Callable[[np.ndarray], np.ndarray]) -> Starlette:
    """A Starlette app serving one model whose `compute(images)` maps a parsed input batch to N×classes logits."""
    metadata = {"name": model, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, CHANNELS, HEIGHT, WIDTH]}],
                "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, classes]}]}

    async def ready(request: Request) -> Response:
        return Response(status_code=200)

    async def model_metadata(request: Request) -> Response:
        if request.path_params["model"] != model:
            return _error(404, f"unknown model {request.path_params['model']!r}; this server has {model!r}")
        return JSONResponse(metadata)

    async def infer(request: Request) -> Response:
        if request.path_params["model"] != model:
            return _error(404, f"unknown model {request.path_params['model']!r}; this server has {model!r}")
        try:
            parsed = parse_infer(await request.body(), request.headers.get(HEADER_LENGTH))
            logits = compute(parsed.images)
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        except ToolkitError as exc:  # the backend's InputError: NaN values and the like
            return _error(400, str(exc))
        return infer_response(model, logits, parsed)

    return Starlette(routes=[Route("/v2/health/ready", ready), Route("/v2/health/live", ready),
                             Route("/v2/models/{model}", model_metadata),
                             Route("/v2/models/{model}/infer", infer, methods=["POST"])])


def noop_compute(classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """Zero logits of the right shape: the request is parsed, no model runs."""
    return lambda images: np.zeros((len(images), classes), np.float32)


def naive_compute(path: Path, threads: int | None) -> tuple[str, int, Callable[[np.ndarray], np.ndarray]]:
    """(model name, classes, compute) for one ONNX file: one `predict_logits` call per request, inline."""
    backend = load_backend(path, threads=threads, provider="cpu")
    mean, std = backend.metadata.mean, backend.metadata.std

    def compute(images: np.ndarray) -> np.ndarray:
        if images.dtype == np.uint8:  # N×32×32×3 pixels -> N×3×32×32 normalized as in training
            images = normalize(images.transpose(0, 3, 1, 2), mean, std)
        return backend.predict_logits(images)

    name = f"{path.resolve().parent.name}-{formats.for_file(path).name}"  # as `toolkit serve` names its models
    return name, len(backend.classes), compute


def serve(app: Starlette, host: str, port: int) -> None:
    """Listen on host:port (0: any free port), print the URL, serve until SIGINT/SIGTERM.

    The socket listens before the URL is printed, so a client that reads the URL can connect at once.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    shown_host = f"[{host}]" if ":" in host else host
    print(f"serving on http://{shown_host}:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", backlog=2048)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving_baselines", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    noop = sub.add_parser("noop", help="parse each request, answer zeros (the HTTP floor)")
    noop.add_argument("--classes", type=int, default=10, help="width of the zero output (default 10)")
    noop.add_argument("--name", default="noop", help="model name in the routes (default noop)")
    naive = sub.add_parser("naive", help="one ONNX Runtime call per request, inline, no batching")
    naive.add_argument("model", type=Path, metavar="MODEL.onnx")
    naive.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    naive.add_argument("--name", default=None, help="model name (default: <folder>-<format>, as toolkit serve)")
    for p in (noop, naive):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    args = parser.parse_args(argv)
    try:
        if args.kind == "noop":
            name, classes, compute = args.name, args.classes, noop_compute(args.classes)
        else:
            name, classes, compute = naive_compute(args.model, args.threads)
            name = args.name or name
        serve(build_app(name, classes, compute), args.host, args.port)
    except (ToolkitError, OSError) as exc:
        print(f"serving_baselines {args.kind}: error: {exc}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------
# Starting a server as a subprocess (tests and benchmarks)


@dataclass(frozen=True)
class Served:
    url: str  # http://host:port, as the server printed it
    process: subprocess.Popen


@contextlib.contextmanager
def serving_process(argv: Sequence[str], timeout: float = 120, env: dict[str, str] | None = None,
                    cwd: Path | None = None) -> Iterator[Served]:
    """Run `argv` (a server that prints its `http://host:port` and answers /v2/health/ready) and yield it once
    ready; SIGTERM it afterwards (SIGKILL after 10 s). Raises RuntimeError with the server's output if it exits or
    is not ready within `timeout` seconds."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env={**os.environ, **(env or {})})
    lines: deque[str] = deque(maxlen=200)  # the server's last lines, for the error message if it fails
    urls: list[str] = []  # the first URL it printed
    found = threading.Event()
    reader = threading.Thread(target=_read_lines, args=(proc, lines, urls, found), daemon=True)
    reader.start()
    try:
        yield Served(_wait_ready(proc, lines, urls, found, time.monotonic() + timeout), proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=5)


def _read_lines(proc: subprocess.Popen, lines: deque[str], urls: list[str], found: threading.Event) -> None:
    for line in proc.stdout:  # ends when the process closes its stdout
        lines.append(line)
        if not urls and (match := URL_PATTERN.search(line)):
            urls.append(match.group(0))
            found.set()


def _wait_ready(proc: subprocess.Popen, lines: deque[str], urls: list[str], found: threading.Event,
                deadline: float) -> str:
    def failure(why: str) -> RuntimeError:
        return RuntimeError(f"{' '.join(proc.args)}: {why}\n{''.join(lines)[-3000:]}")

    while not found.wait(0.05):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise failure(f"exited {proc.returncode}" if proc.returncode is not None else "printed no URL in time")
    url = urls[0]
    while True:  # the server may print its URL before its models are loaded: wait for ready
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5) as resp:
                if resp.status == 200:
                    return url
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise failure(f"exited {proc.returncode}" if proc.returncode is not None else "not ready in time")
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
