"""`toolkit serve`: ONNX models behind the Open Inference Protocol (KServe v2 REST), as Triton speaks it.

    toolkit serve exports/main                      # every ONNX format: main-onnx, main-onnx-fp16, main-onnx-int8
    toolkit serve exports/main model.onnx --port 0  # plus a loose file, named by its stem; port 0: any free port

Routes (`docs/deployment.md`, "Serving"):
- `GET /v2/health/live`, `/v2/health/ready` (ready once every model has loaded, passed its manifest hash check
  and run its warm-up batches; not ready while draining), `/v2` (server metadata), `/v2/models` (the names;
  also Triton's `POST /v2/repository/index`),
  `/v2/models/{m}[/versions/1]`, `.../ready`, `.../config` (Triton's model configuration);
- `POST /v2/models/{m}[/versions/1]/infer`: JSON tensors or the binary tensor extension (`serving.protocol`);
- `POST /v1/models/{m}/classify?top_k=K`: image files (the raw body as one file, or multipart/form-data with
  one part per file) -> labels and top-k probabilities, through the same batcher;
- `GET /metrics`: Prometheus (`serving.metrics`).

Requests are checked one by one and merged by each model's `serving.batcher.Batcher`. Limits: more than
`--max-queue` requests waiting for a model -> 503 with Retry-After; no result within `--timeout-ms` -> 504;
a body over `--max-request-bytes` -> 413. Every error answer is `{"error": "one line"}`.

On SIGTERM or SIGINT the server drains: ready turns 503, new infer and classify requests get 503 (and their
connection is closed), the requests already accepted are answered (queued ones at once, without waiting out
the queue delay), and the process exits 0 once none is left, or after `--shutdown-timeout` seconds at the
latest. A second signal exits at once.

Security: it listens on 127.0.0.1 unless `--host` says otherwise; with `--api-key` every route but the health
probes needs `Authorization: Bearer KEY`. Request data is only ever held in memory, never written to or
looked up as a path. torch is never imported (onnxruntime, numpy, PIL, starlette, uvicorn, prometheus-client).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.apps.predict import Prediction, softmax, top_classes
from toolkit.apps.serving import protocol
from toolkit.apps.serving.batcher import Batcher
from toolkit.apps.serving.config import ServeConfig
from toolkit.apps.serving.metrics import CONTENT_TYPE, UNKNOWN_MODEL, Metrics
from toolkit.apps.serving.protocol import HTTPError
from toolkit.artifacts import formats
from toolkit.artifacts.backends import Backend, load_backend, validate_batch
from toolkit.core.errors import ConfigError, DataError, InputError, ToolkitError
from toolkit.core.images import CHANNELS, HEIGHT, WIDTH, decode_image

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
except ModuleNotFoundError as exc:  # the serve extra is optional
    raise ConfigError(f"toolkit serve needs {exc.name}, which is not installed: pip install 'cifar-toolkit[serve]'"
                      ) from None

ONNX_FORMATS = tuple(f for f in formats.FORMATS if f.runtime == "onnxruntime")
PLATFORM = "onnxruntime_onnx"  # Triton's name for the platform
_KINDS = {"cpu": "KIND_CPU", "cuda": "KIND_GPU", "tensorrt": "KIND_GPU"}  # Triton's instance kinds
_DRAIN_POLL_S = 0.1  # uvicorn checks for the end of the drain on its own tick, every 0.1 s
_LOOPBACK = ("localhost",)
# the infer routes' paths, as Starlette's `{model}` and `{version}` match them (one path segment each)
_INFER_PATH = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


@dataclass
class ServedModel:
    name: str
    path: Path
    backends: list[Backend]
    batcher: Batcher
    max_batch: int

    @property
    def backend(self) -> Backend:
        return self.backends[0]

    @property
    def classes(self) -> list[str]:
        return self.backend.classes


def model_files(paths: Sequence[Path]) -> dict[str, Path]:
    """{model name: .onnx file}: every ONNX format of an export folder as `<folder>-<format>`, a file by its stem."""
    found: dict[str, Path] = {}
    for path in paths:
        if path.is_dir():
            files = {f"{path.resolve().name}-{fmt.name}": path / fmt.file for fmt in ONNX_FORMATS
                     if (path / fmt.file).is_file()}
            if not files:
                raise ConfigError(f"{path}: no ONNX model in this folder (expected one of "
                                  f"{', '.join(f.file for f in ONNX_FORMATS)}; `toolkit export` writes them)")
        elif path.suffix.lower() == ".onnx":
            if not path.is_file():
                raise ConfigError(f"{path}: no such file")
            files = {path.stem: path}
        else:
            raise ConfigError(f"{path}: expected an export folder or an .onnx file")
        for name, file in files.items():
            if name in found:
                raise ConfigError(f"two models would be named {name!r} ({found[name]} and {file}); "
                                  "serve files of one name from differently named folders")
            found[name] = file
    return found


def load_models(config: ServeConfig, executor: ThreadPoolExecutor, metrics: Metrics,
                log: Callable[[str], None]) -> dict[str, ServedModel]:
    """Every model loaded (`--instances` sessions each, hash-checked against its manifest) and warmed up."""
    models = {}
    # One session alone takes ONNX Runtime's default (a thread per core); several share the cores, since each
    # would otherwise start a thread per core and they would run batches side by side on too many threads.
    threads = config.threads
    if threads is None and config.instances > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // config.instances)
    for name, path in model_files(config.paths).items():
        backends = [load_backend(path, threads, config.provider, max_batch=None, check_hash=config.check_hash)
                    for _ in range(config.instances)]
        max_batch = min(config.max_batch_size, backends[0].batch_size or config.max_batch_size)
        batcher = Batcher(name, backends, executor, metrics.model(name), max_batch, config.max_queue_delay_ms / 1000,
                          config.max_queue)
        batcher.warm_up((CHANNELS, HEIGHT, WIDTH))
        models[name] = ServedModel(name, path, backends, batcher, max_batch)
        log(f"model {name}: {path} on {backends[0].provider}, {len(backends[0].classes)} classes, "
            f"{batcher.first_image_s * 1e3:.2f} ms for 1 image")
    return models


@dataclass
class ServerState:
    """What the routes share: the models, the limits, and whether the server is draining."""

    config: ServeConfig
    models: dict[str, ServedModel]
    metrics: Metrics
    log: Callable[[str], None] = print
    in_flight: int = 0
    draining: bool = False
    ready: bool = False
    _key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._key = None if self.config.api_key is None else f"Bearer {self.config.api_key}".encode()
        self.metrics.in_flight = lambda: self.in_flight  # read at scrape time

    def model(self, name: str, version: str | None = None) -> ServedModel:
        if name not in self.models:
            raise HTTPError(404, f"unknown model {name!r}; served: {', '.join(self.models)}")
        if version is not None and version != protocol.VERSION:
            raise HTTPError(404, f"model {name!r} has no version {version!r}; its only version is "
                                 f"{protocol.VERSION}")
        return self.models[name]

    def authorize(self, request: Request) -> None:
        if self._key is not None and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), self._key):
            raise HTTPError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' (--api-key)")

    @property
    def deadline_s(self) -> float | None:
        return None if not self.config.timeout_ms else self.config.timeout_ms / 1000


def _error(exc: HTTPError) -> Response:
    return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes, and with 415 when
    compressed (not supported: a small compressed body could expand far past the limit)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise HTTPError(415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        # answered before the body is read; uvicorn discards the rest of it, and the connection stays usable
        # (closing it instead would reset the client while it still sends, and lose the answer)
        raise HTTPError(413, f"request body of {declared} bytes exceeds the limit of {limit} (--max-request-bytes)")
    chunks, size = [], 0
    while True:  # ASGI messages read directly: Request.stream(), an async generator, costs microseconds more
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body exceeds the limit of {limit} bytes (--max-request-bytes)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def build_app(state: ServerState) -> Callable[[dict, Callable, Callable], Awaitable[None]]:
    """The ASGI application: the routes above over `state`, in Starlette, but for infer requests.

    An infer request (nearly every request) goes straight to its endpoint, past Starlette's router and
    middleware, which cost about 25 µs a request on the 2-core machine (a no-op endpoint answered 14,000
    requests/s through them and 20,000-22,000 without, at concurrency 32). Any other method on an infer path, and
    every other route, goes through Starlette, so 404, 405 and the rest answer as before."""
    metrics = state.metrics

    def simple(handler: Callable[[Request], Any]) -> Callable[[Request], Awaitable[Response]]:
        """A metadata route: authorization, then the handler's JSON (or its HTTPError)."""
        async def endpoint(request: Request) -> Response:
            try:
                state.authorize(request)
                result = handler(request)
                return result if isinstance(result, Response) else JSONResponse(result)
            except HTTPError as exc:
                return _error(exc)
        return endpoint

    def inference(handler: Callable[[Request, ServedModel, float | None], Awaitable[Response]]
                  ) -> Callable[[Request], Awaitable[Response]]:
        """An infer or classify route: drain and auth checks, the in-flight count, metrics, errors as one line."""
        async def endpoint(request: Request) -> Response:
            start = time.perf_counter()
            name = request.path_params["model"]
            label = name if name in state.models else UNKNOWN_MODEL
            state.in_flight += 1
            try:
                if state.draining:
                    raise HTTPError(503, "the server is shutting down", {"connection": "close"})
                state.authorize(request)
                model = state.model(name, request.path_params.get("version"))
                deadline = None if state.deadline_s is None else start + state.deadline_s
                response = await handler(request, model, deadline)
            except HTTPError as exc:
                response = _error(exc)
            except ClientDisconnect:  # the client left mid-body: nobody to answer
                response = Response(status_code=499)
            except ToolkitError as exc:  # InputError: values the model overflows on; else the model's own failure
                status = 400 if isinstance(exc, InputError) else 500
                response = _error(HTTPError(status, _without_path(exc, state.models[name])))
            finally:
                state.in_flight -= 1
            metrics.model(label).answered(response.status_code, time.perf_counter() - start)
            return response
        return endpoint

    async def infer(request: Request, model: ServedModel, deadline: float | None) -> Response:
        body = await read_body(request, state.config.max_request_bytes)
        parsed = protocol.parse_infer(body, request.headers.get(protocol.HEADER_LENGTH), model.backend.metadata,
                                      model.max_batch, model.backend.batch_size)
        images = _checked(parsed.images, model)
        logits = await model.batcher.infer(images, deadline)
        content, headers = protocol.infer_response(model.name, parsed, logits)
        return Response(content, headers=headers)

    async def classify(request: Request, model: ServedModel, deadline: float | None) -> Response:
        k = _top_k(request.query_params.get("top_k", "1"), len(model.classes))
        body = await read_body(request, state.config.max_request_bytes)
        files = protocol.image_files(body, request.headers.get("content-type", ""))
        if len(files) > model.max_batch:
            raise HTTPError(400, f"{len(files)} images exceed this model's max_batch_size {model.max_batch} "
                                 "(--max-batch-size)")
        pixels = await asyncio.to_thread(_decode, files)  # PIL decoding may take milliseconds for large files
        images = _checked(model.backend.metadata.normalize(pixels), model)
        probabilities = softmax((await model.batcher.infer(images, deadline)).astype(np.float64))
        predictions = []
        for (file, _), p in zip(files, probabilities):
            top = top_classes(p, model.classes, k)
            predictions.append(Prediction(file, top[0][0], top[0][1], top).to_json())
        return JSONResponse({"model_name": model.name, "predictions": predictions})

    def ready(_: Request) -> Response:
        return Response(status_code=200 if state.ready and not state.draining else 503)

    def model_ready(request: Request) -> Response:
        state.model(request.path_params["model"], request.path_params.get("version"))
        return ready(request)

    def model_metadata(request: Request) -> dict[str, Any]:
        model = state.model(request.path_params["model"], request.path_params.get("version"))
        return protocol.model_metadata(model.name, len(model.classes), PLATFORM)

    def model_config(request: Request) -> dict[str, Any]:
        model = state.model(request.path_params["model"], request.path_params.get("version"))
        return protocol.model_config(model.name, len(model.classes), PLATFORM, model.max_batch,
                                     model.batcher.delay_s, model.batcher.instances, _KINDS[model.backend.provider])

    def models(_: Request) -> dict[str, Any]:
        return {"models": [{"name": m.name, "version": protocol.VERSION, "state": "READY" if state.ready else
                            "UNAVAILABLE", "platform": PLATFORM, "max_batch_size": m.max_batch}
                           for m in state.models.values()]}

    def prometheus(_: Request) -> Response:
        return Response(metrics.exposition(), headers={"content-type": CONTENT_TYPE})

    prefixes = ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")
    model_routes = []
    for prefix in prefixes:
        model_routes += [Route(prefix, simple(model_metadata)), Route(f"{prefix}/ready", simple(model_ready)),
                         Route(f"{prefix}/config", simple(model_config))]
    infer_endpoint = inference(infer)
    routes = [
        *(Route(f"{prefix}/infer", infer_endpoint, methods=["POST"]) for prefix in prefixes),
        Route("/v2/health/live", lambda _: Response(status_code=200)),
        Route("/v2/health/ready", ready),
        Route("/v2", simple(lambda _: protocol.server_metadata())),
        Route("/v2/models", simple(models)),
        Route("/v2/repository/index", simple(lambda request: models(request)["models"]), methods=["POST"]),
        *model_routes,
        Route("/v1/models/{model}/classify", inference(classify), methods=["POST"]),
        Route("/metrics", simple(prometheus)),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> Iterator[None]:
        for model in state.models.values():
            await model.batcher.calibrate()
            state.log(f"model {model.name}: requests of up to {model.batcher.inline_images} images run on the event "
                      f"loop, merged per loop turn (a thread hop takes {model.batcher.hop_s * 1e3:.3f} ms)")
        state.ready = True
        yield

    async def no_route(request: Request, exc: StarletteHTTPException) -> Response:
        """Starlette's own 404 and 405 (no such route, wrong method) as one JSON line, like every other error."""
        return _error(HTTPError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                                dict(exc.headers or {})))

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={StarletteHTTPException: no_route})

    async def asgi(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                scope["path_params"] = {k: v for k, v in match.groupdict().items() if v is not None}
                response = await infer_endpoint(Request(scope, receive))
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return asgi


def _without_path(exc: ToolkitError, model: ServedModel) -> str:
    """The error as a client should see it: the model's name where the message names the server's file."""
    return str(exc).replace(str(model.path), f"model '{model.name}'")


def _checked(images: np.ndarray, model: ServedModel) -> np.ndarray:
    """`validate_batch` of the model (non-finite values, ...) as a 400 for this request alone."""
    try:
        return validate_batch(images, "input 'images'", model.backend.batch_size, model.max_batch)
    except InputError as exc:
        raise HTTPError(400, str(exc)) from None


def _top_k(text: str, classes: int) -> int:
    if not text.isdigit() or not 1 <= int(text) <= classes:
        raise HTTPError(400, f"top_k must be an integer 1..{classes}, got {text!r}")
    return int(text)


def _decode(files: list[tuple[str, bytes]]) -> np.ndarray:
    try:
        return np.stack([decode_image(data, source=f"image {name}") for name, data in files])
    except DataError as exc:
        raise HTTPError(400, str(exc)) from None


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain described above: on SIGTERM or SIGINT it keeps listening, answers
    new requests 503 and stops once no request is in flight (or at the shutdown timeout); then uvicorn's
    own shutdown closes the idle connections. Exits normally (status 0) rather than re-raising the signal."""

    def __init__(self, config: uvicorn.Config, state: ServerState, log: Callable[[str], None]) -> None:
        super().__init__(config)
        self.state = state
        self.log = log
        self.drain_deadline: float | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def on_signal(self, sig: int, _frame: object) -> None:
        if self.state.draining:  # a second signal: stop now, without waiting for the requests in flight
            self.should_exit = self.force_exit = True
            return
        self.state.draining = True
        self.drain_deadline = time.monotonic() + self.state.config.shutdown_timeout
        # The rest on the loop's own turn: a signal handler may run between any two bytecodes of the loop,
        # even inside a print() (which is not reentrant).
        asyncio.get_running_loop().call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        self.log(f"{signal.Signals(sig).name}: draining ({self.state.in_flight} requests in flight, "
                 f"at most {self.state.config.shutdown_timeout:g} s)")
        # queued requests run now rather than wait out --max-queue-delay-ms for batch-mates that will not come
        for model in self.state.models.values():
            model.batcher.flush()

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            remaining = self.drain_deadline - time.monotonic()
            if self.state.in_flight == 0 or remaining <= 0:
                self.config.timeout_graceful_shutdown = max(remaining, _DRAIN_POLL_S)
                self.should_exit = True
        return await super().on_tick(counter)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in _LOOPBACK


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.listen(2048)  # connections waiting to be accepted; uvicorn's default backlog
    return sock


def serve(config: ServeConfig, log: Callable[[str], None] = print) -> None:
    """Load, warm up, listen and serve until SIGTERM/SIGINT, then drain (see the module docstring)."""
    def say(line: str) -> None:
        log(line)
        sys.stdout.flush()

    metrics = Metrics(config.max_batch_size)
    models_count = len(model_files(config.paths))
    with ThreadPoolExecutor(max_workers=models_count * config.instances, thread_name_prefix="model") as executor:
        models = load_models(config, executor, metrics, say)
        state = ServerState(config, models, metrics, say)
        sock = _bind(config.host, config.port)
        url = _url(config.host, sock.getsockname()[1])
        if not _is_loopback(config.host) and config.api_key is None:
            say(f"warning: listening on {config.host} without --api-key: anyone who can reach it can use it")
        # proxy_headers off: nothing here reads the client's address, and rewriting it costs every request
        uv_config = uvicorn.Config(build_app(state), log_level="warning", access_log=False, lifespan="on",
                                   proxy_headers=False, timeout_graceful_shutdown=config.shutdown_timeout)
        server = DrainingServer(uv_config, state, say)
        say(f"models: {', '.join(models)}")
        say(f"listening on {url} (OIP: {url}/v2/models/{{model}}/infer; metrics: {url}/metrics)")
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
    if server.force_exit:
        say("stopped without draining (second signal)")
    else:
        say("drained: stopped")
