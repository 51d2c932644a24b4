"""`toolkit loadtest URL --model M`: a concurrency sweep against an Open Inference Protocol v2 server.

In the style of Triton's perf_analyzer: for each concurrency level C, C clients each keep one request in
flight on their own keep-alive connection (a new request as soon as the last answer is complete), for a
warm-up and then a measured window. Each level reports requests/s, images/s, the p50/p90/p99 latency of
the successful requests (send to last byte), the errors by status, and, when the server exports
`toolkit_inference_count_total` and `toolkit_inference_exec_count_total` at `/metrics` (as `toolkit
serve` does), the server's average batch over the window: images run / model executions.

The requests are binary (the tensor extension: JSON header then raw little-endian bytes, logits asked back
as binary) unless `json_body`; FP32 normalized N×3×32×32 or UINT8 N×32×32×3 pixels, random with a fixed
seed, the same bytes for every request. Every answer with status 200 is checked to carry N rows of output;
one that does not counts as an error (`bad-response`).

The client shares the CPU with the server when both run on one machine, so it is built to be cheap: one
asyncio event loop, one `asyncio.Protocol` per connection, the request bytes prepared once and a minimal
HTTP/1.1 response parser (status, Content-Length). Measured against a no-op endpoint on a 2-core machine it
spent about 40-50 µs of CPU per request, where one thread per client with `http.client` spent 120-250 µs.
It needs answers with a Content-Length, as every OIP server sends them.

Bounded: each level ends after its warm-up and duration; a request unanswered after `timeout_s` counts as
a `timeout` and its connection is replaced; a refused connection counts as a `connection` error and is
retried after 50 ms; clients still waiting when a level ends get at most `timeout_s` more.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import re
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from toolkit.core.errors import ConfigError, ToolkitError
from toolkit.core.images import CHANNELS, HEIGHT, WIDTH

HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor extension: bytes of JSON before the tensors
DEFAULT_CONCURRENCY = (1, 8, 32, 128)
MAX_CONCURRENCY = 4096  # connections per level; beyond this the client, not the server, is measured
MAX_BATCH = 4096  # images per request: a body of at most 48 MiB (fp32), built once and kept in memory
PERCENTILES = (50, 90, 99)
RECONNECT_S = 0.05  # pause after a refused or failed connection (s), so a dead server is not spun on
WATCHDOG_S = 0.25  # how often unanswered requests are checked against the timeout (s)
# Counters of `toolkit serve`'s /metrics: images run, and model executions (their ratio is the average batch).
INFERENCE_COUNT = "toolkit_inference_count_total"
EXEC_COUNT = "toolkit_inference_exec_count_total"


class LoadtestError(ToolkitError):
    """The server cannot be reached, does not serve the model, or refuses the requests this test would send."""


@dataclass(frozen=True)
class InputType:
    """A datatype the requests can carry: its OIP name, the shape of one image, and how random images are drawn."""

    datatype: str
    image_shape: tuple[int, ...]
    draw: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]  # (generator, shape) -> little-endian array

    def batch(self, n: int) -> np.ndarray:
        """n random images of this type, the same for every run (seed 0)."""
        return self.draw(np.random.default_rng(0), (n, *self.image_shape))


INPUT_TYPES = {
    # normalized pixels: standard normal values, clipped to the ±3 that normalization gives
    "fp32": InputType("FP32", (CHANNELS, HEIGHT, WIDTH),
                      lambda rng, shape: np.clip(rng.standard_normal(shape, dtype=np.float32), -3, 3).astype("<f4")),
    "uint8": InputType("UINT8", (HEIGHT, WIDTH, CHANNELS),
                       lambda rng, shape: rng.integers(0, 256, shape, dtype=np.uint8)),
}


@dataclass(frozen=True)
class LoadtestConfig:
    url: str  # the server's base URL: http://host:port, or with a path prefix behind a proxy
    model: str
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY  # clients in flight, one level after another
    duration_s: float = 5.0  # measured window per level (s)
    warmup_s: float = 1.0  # requests run but not counted before each window (s)
    batch: int = 1  # images per request
    json_body: bool = False  # JSON tensors instead of the binary tensor extension
    input_dtype: str = "fp32"  # a key of INPUT_TYPES
    timeout_s: float = 30.0  # one request's limit (s); also the most a level waits for answers after its window

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"URL {self.url!r}: expected http://HOST:PORT (or https://...)")
        try:
            _ = parts.port  # urlsplit checks the port only when asked
        except ValueError:
            raise ConfigError(f"URL {self.url!r}: the port is not a number from 0 to 65535") from None
        if not self.model:
            raise ConfigError("--model: give the name of a model the server serves")
        if not self.concurrency or any(not 1 <= c <= MAX_CONCURRENCY for c in self.concurrency):
            raise ConfigError(f"--concurrency {','.join(map(str, self.concurrency))}: expected levels from 1 to "
                              f"{MAX_CONCURRENCY}")
        for flag, value in (("--duration", self.duration_s), ("--timeout", self.timeout_s)):
            if not 0 < value < math.inf:
                raise ConfigError(f"{flag} {value!r}: expected a positive number of seconds")
        if not 0 <= self.warmup_s < math.inf:
            raise ConfigError(f"--warmup {self.warmup_s!r}: expected seconds ≥ 0")
        if not 1 <= self.batch <= MAX_BATCH:
            raise ConfigError(f"--batch {self.batch}: expected 1 to {MAX_BATCH} images per request")
        if self.input_dtype not in INPUT_TYPES:
            raise ConfigError(f"--input-dtype {self.input_dtype!r}: expected one of {', '.join(INPUT_TYPES)}")


def parse_concurrency(text: str) -> tuple[int, ...]:
    """`1,8,32` -> (1, 8, 32); anything else is a ConfigError naming the flag."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--concurrency {text!r}: expected comma-separated integers, like 1,8,32,128") from None


@dataclass
class LevelResult:
    """One concurrency level: answers completed within the measured window."""

    concurrency: int
    seconds: float  # the measured window (s)
    requests: int  # answered or failed within the window: ok + every error
    ok: int
    errors: dict[str, int]  # HTTP status, or connection / timeout / bad-response -> count
    infer_per_s: float  # successful requests per second
    images_per_s: float
    latency_ms: dict[str, float | None]  # p50, p90, p99, mean, max of the successful requests (ms)
    server_avg_batch: float | None  # images / model executions over the window, from /metrics; None: not exported
    client_cpu_us_per_request: float | None  # this process's CPU time over the window / requests (µs)


@dataclass
class LoadtestResult:
    url: str
    model: str
    batch: int
    body: str  # binary or json
    input_dtype: str
    duration_s: float
    warmup_s: float
    levels: list[LevelResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Target:
    """Where and what to send: connection details, the prepared request bytes, and what a good answer holds."""

    host: str
    port: int
    ssl: ssl.SSLContext | None
    request: bytes
    batch: int  # rows a good answer's output has


def _endpoint(config: LoadtestConfig) -> tuple[str, int, str, ssl.SSLContext | None]:
    parts = urlsplit(config.url)
    https = parts.scheme == "https"
    return parts.hostname, parts.port or (443 if https else 80), parts.path.rstrip("/"), \
        ssl.create_default_context() if https else None


def _infer_body(config: LoadtestConfig, input_name: str, output_name: str) -> tuple[bytes, dict[str, str]]:
    """The request body and its headers: binary (JSON header, then the raw tensor) or all JSON."""
    kind = INPUT_TYPES[config.input_dtype]
    images = kind.batch(config.batch)
    spec: dict[str, Any] = {"name": input_name, "shape": list(images.shape), "datatype": kind.datatype}
    output: dict[str, Any] = {"name": output_name}
    if config.json_body:
        spec["data"] = images.ravel().tolist()
        body = json.dumps({"inputs": [spec], "outputs": [output]}).encode()
        return body, {"Content-Type": "application/json"}
    raw = images.tobytes()
    spec["parameters"] = {"binary_data_size": len(raw)}
    output["parameters"] = {"binary_data": True}
    head = json.dumps({"inputs": [spec], "outputs": [output]}).encode()
    return head + raw, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def _output_rows(body: bytes, header_length: str | None) -> int | None:
    """The first dimension of the first output of an infer answer (None: not an OIP answer)."""
    try:
        head = json.loads(body if header_length is None else body[:int(header_length)])
        return int(head["outputs"][0]["shape"][0])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# Blocking HTTP for the few requests outside the sweep (metadata, the first infer, /metrics)


def _request(config: LoadtestConfig, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port, prefix, context = _endpoint(config)
    conn = (http.client.HTTPSConnection(host, port, timeout=config.timeout_s, context=context) if context else
            http.client.HTTPConnection(host, port, timeout=config.timeout_s))
    try:
        conn.request(method, prefix + path, body, headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    except (OSError, http.client.HTTPException) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise LoadtestError(f"{config.url}: cannot reach the server ({reason})") from None
    finally:
        conn.close()


def _error_text(body: bytes) -> str:
    """The server's one-line reason: OIP's {"error": ...}, else the body's first line."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip()
        return text.splitlines()[0][:200] if text else "no detail"


def model_io_names(config: LoadtestConfig) -> tuple[str, str]:
    """(input name, output name) from the model's metadata, `GET /v2/models/{model}`."""
    model_path = f"/v2/models/{quote(config.model, safe='')}"
    status, _, body = _request(config, "GET", model_path)
    if status != 200:
        raise LoadtestError(f"{config.url}: model {config.model!r}: {status} {_error_text(body)}")
    try:
        meta = json.loads(body)
        return str(meta["inputs"][0]["name"]), str(meta["outputs"][0]["name"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise LoadtestError(f"{config.url}{model_path}: not OIP model metadata (no inputs and outputs)") from None


def _first_infer(config: LoadtestConfig, path: str, body: bytes, headers: dict[str, str]) -> None:
    """One request before the sweep: a refusal (wrong datatype, too large) is one error, not a sweep of them."""
    status, answer_headers, answer = _request(config, "POST", path, body, headers)
    if status != 200:
        raise LoadtestError(f"{config.url}{path}: the server refuses the test's request: {status} "
                            f"{_error_text(answer)}")
    rows = _output_rows(answer, answer_headers.get(HEADER_LENGTH.lower()))
    if rows is None:
        raise LoadtestError(f"{config.url}{path}: the answer is not an OIP infer response (no output shape)")
    if rows != config.batch:
        raise LoadtestError(f"{config.url}{path}: the answer holds {rows} output rows for {config.batch} images")


_METRIC = re.compile(rf"^({INFERENCE_COUNT}|{EXEC_COUNT})\{{([^}}]*)\}}\s+(\S+)", re.M)


def server_counts(config: LoadtestConfig) -> tuple[float, float] | None:
    """(images run, model executions) of the model from the server's /metrics; None when it does not export them."""
    try:
        status, _, body = _request(config, "GET", "/metrics")
    except LoadtestError:
        return None
    return parse_counts(body.decode("utf-8", "replace"), config.model) if status == 200 else None


def parse_counts(text: str, model: str) -> tuple[float, float] | None:
    """(images run, model executions) of `model` in Prometheus text (summed over its other labels, if any)."""
    label = f'model="{model}"'
    totals = {INFERENCE_COUNT: 0.0, EXEC_COUNT: 0.0}
    seen = set()
    for name, labels, value in _METRIC.findall(text):
        if label in labels.split(","):
            totals[name] += float(value)
            seen.add(name)
    return (totals[INFERENCE_COUNT], totals[EXEC_COUNT]) if len(seen) == 2 else None


# ---------------------------------------------------------------------------------------------
# The sweep: one asyncio loop, one Protocol per connection


class _Level:
    """What the connections of one level share: the target, the phase, and what they measured."""

    def __init__(self, target: _Target, timeout_s: float) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.measuring = False  # answers are counted only within the window
        self.stopping = False  # no new request once set
        self.latencies: list[float] = []  # seconds, successful requests
        self.outcomes: Counter[str] = Counter()  # "200", "503", "timeout", ...
        self.connections: set[_Connection] = set()

    def record(self, outcome: str, latency: float | None = None) -> None:
        if self.measuring:
            self.outcomes[outcome] += 1
            if latency is not None:
                self.latencies.append(latency)


class _Connection(asyncio.Protocol):
    """One keep-alive connection with one request in flight, sent again as soon as its answer is complete."""

    def __init__(self, level: _Level, closed: asyncio.Future) -> None:
        self.level = level
        self.closed = closed
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.sent_at: float | None = None  # perf_counter of the request in flight; None: none in flight
        self.head: tuple[int, int, str | None, bool] | None = None  # (status, header end, header length, close)
        self.body_length = 0
        self.failure: str | None = None  # what ended the connection when a request was in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.level.connections.add(self)
        self._send()

    def _send(self) -> None:
        if self.level.stopping:
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.level.target.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.head is None and not self._parse_head():
            return
        status, start, header_length, close = self.head
        if len(self.buffer) < start + self.body_length:
            return
        latency = time.perf_counter() - self.sent_at
        body = bytes(self.buffer[start:start + self.body_length])
        del self.buffer[:start + self.body_length]
        self.head, self.sent_at = None, None
        if status != 200:
            self.level.record(str(status))
        elif _output_rows(body, header_length) != self.level.target.batch:
            self.level.record("bad-response")
        else:
            self.level.record("200", latency)
        if close:
            self.transport.close()
        else:
            self._send()

    def _parse_head(self) -> bool:
        """Status and headers once they are complete; an answer without Content-Length ends the connection."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            status = int(lines[0].split(" ", 2)[1])
            self.body_length = int(headers["content-length"])
        except (IndexError, KeyError, ValueError):
            self.fail("bad-response")
            return False
        self.head = (status, end + 4, headers.get(HEADER_LENGTH.lower()), headers.get("connection") == "close")
        return True

    def fail(self, outcome: str) -> None:
        """End the connection with the request in flight counted as `outcome`."""
        if self.sent_at is not None and self.failure is None:
            self.failure = outcome
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.level.connections.discard(self)
        if self.sent_at is not None:
            self.level.record(self.failure or "connection")
        if not self.closed.done():
            self.closed.set_result(None)


async def _client(level: _Level) -> None:
    """One client: a connection, replaced whenever the server or a timeout ends it, until the level stops."""
    loop = asyncio.get_running_loop()
    target = level.target
    while not level.stopping:
        closed = loop.create_future()
        try:
            await loop.create_connection(lambda: _Connection(level, closed), target.host, target.port, ssl=target.ssl)
        except OSError:
            level.record("connection")
            await asyncio.sleep(RECONNECT_S)
            continue
        await closed


async def _watchdog(level: _Level) -> None:
    """Abort connections whose request has waited longer than the timeout (counted as `timeout`)."""
    while True:
        await asyncio.sleep(WATCHDOG_S)
        late = time.perf_counter() - level.timeout_s
        for conn in list(level.connections):
            if conn.sent_at is not None and conn.sent_at < late:
                conn.fail("timeout")


def _percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def _run_level(config: LoadtestConfig, target: _Target, concurrency: int) -> LevelResult:
    level = _Level(target, config.timeout_s)
    clients = [asyncio.create_task(_client(level)) for _ in range(concurrency)]
    watchdog = asyncio.create_task(_watchdog(level))
    try:
        await asyncio.sleep(config.warmup_s)
        before = await asyncio.to_thread(server_counts, config)
        cpu, start = time.process_time(), time.perf_counter()
        level.measuring = True
        await asyncio.sleep(config.duration_s)
        level.measuring, level.stopping = False, True
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        after = await asyncio.to_thread(server_counts, config)
        await asyncio.wait(clients, timeout=config.timeout_s)  # answers in flight, then the connections close
    finally:
        level.stopping = True
        for conn in list(level.connections):
            conn.transport.abort()
        for task in (*clients, watchdog):
            task.cancel()
        await asyncio.gather(*clients, watchdog, return_exceptions=True)
    ok = level.outcomes.pop("200", 0)
    requests = ok + sum(level.outcomes.values())
    ordered = sorted(level.latencies)
    latency: dict[str, float | None] = {f"p{p}": _percentile(ordered, p) * 1e3 if ordered else None
                                        for p in PERCENTILES}
    latency.update(mean=sum(ordered) / len(ordered) * 1e3 if ordered else None,
                   max=ordered[-1] * 1e3 if ordered else None)
    batch = None
    if before and after and after[1] > before[1]:
        batch = (after[0] - before[0]) / (after[1] - before[1])
    return LevelResult(concurrency=concurrency, seconds=seconds, requests=requests, ok=ok,
                       errors=dict(sorted(level.outcomes.items())), infer_per_s=ok / seconds,
                       images_per_s=ok * config.batch / seconds, latency_ms=latency, server_avg_batch=batch,
                       client_cpu_us_per_request=cpu / requests * 1e6 if requests else None)


def run_loadtest(config: LoadtestConfig, log: Callable[[str], None] = lambda line: None) -> LoadtestResult:
    """Check that the server serves the model and accepts the request, then measure every level in turn.

    `log` gets a header line once the checks pass, the column names, and one row per level as it ends.
    """
    input_name, output_name = model_io_names(config)
    body, headers = _infer_body(config, input_name, output_name)
    host, port, prefix, context = _endpoint(config)
    path = f"{prefix}/v2/models/{quote(config.model, safe='')}/infer"
    _first_infer(config, path, body, headers)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 address goes in brackets
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": authority, **headers,
                                                 "Content-Length": str(len(body))}.items())
    target = _Target(host, port, context, f"POST {path} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body,
                     config.batch)
    log(f"{config.url} model {config.model}: {config.batch} image(s) per request, "
        f"{'JSON' if config.json_body else 'binary'} {INPUT_TYPES[config.input_dtype].datatype}, "
        f"{config.warmup_s:g} s warm-up + {config.duration_s:g} s per level")
    log("  ".join(_COLUMNS))
    result = LoadtestResult(config.url, config.model, config.batch, "json" if config.json_body else "binary",
                            config.input_dtype, config.duration_s, config.warmup_s)
    for concurrency in config.concurrency:
        level = asyncio.run(_run_level(config, target, concurrency))
        result.levels.append(level)
        log(format_level(level))
    return result


# ---------------------------------------------------------------------------------------------
# The command


_COLUMNS = ("concurrency", "infer/s", "images/s", "p50 ms", "p90 ms", "p99 ms", "server batch", "errors")


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def format_level(level: LevelResult) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in level.errors.items()) or "none"
    batch = "–" if level.server_avg_batch is None else f"{level.server_avg_batch:.2f}"
    cells = (str(level.concurrency), f"{level.infer_per_s:,.0f}", f"{level.images_per_s:,.0f}",
             _ms(level.latency_ms["p50"]), _ms(level.latency_ms["p90"]), _ms(level.latency_ms["p99"]), batch, errors)
    return "  ".join(c.rjust(len(h)) for c, h in zip(cells, _COLUMNS))


def loadtest_and_report(config: LoadtestConfig, json_path: Path | None = None,
                        out: Callable[[str], None] = print) -> LoadtestResult:
    """Run the sweep, printing a header and one row per level; write the results as JSON to `json_path`."""
    result = run_loadtest(config, log=out)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        out(f"results: {json_path}")
    return result

