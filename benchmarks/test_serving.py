"""Serving the benchmark model's `model.onnx` over HTTP: `toolkit loadtest` against three servers in alternating
rounds, and the model called in-process between them.

- `noop` (the floor): `python -m benchmarks.serving_baselines noop`, which parses each binary Open Inference
  Protocol request and answers zeros: the most requests/s Starlette + uvicorn reach here.
- `naive`: `python -m benchmarks.serving_baselines naive model.onnx --threads 1`, one ONNX Runtime call per
  request, inline on the event loop, no batching.
- `serve`: `python -m toolkit serve EXPORT_DIR --max-batch-size 64 --threads 1` with its other defaults (left out
  where this checkout has no `toolkit serve`).

The servers run as their own processes on 127.0.0.1, ONNX Runtime with one intra-op thread, and share the
machine's cores with the client (`toolkit.apps.loadtest.run_loadtest`: one asyncio loop, binary requests, the
same random normalized fp32 images in every request). At each concurrency level the three are measured in
alternating rounds (at full size three rounds each of a 0.5 s warm-up and 1 s measured), so that a shared
machine's drift, which over minutes exceeds the differences measured, falls on all alike; after each round the
model is timed in this process (`Backend.predict_logits` of the request's batch, one thread, while the servers
idle). Cases: single-image requests at concurrency 1, 8, 32 and 128, and 64-image requests from 4 clients.
The row's pytest-benchmark time is the whole sweep; the figures are in `extra_info["servers"]` (per server, one
`LevelResult` per round: requests/s, images/s, latency percentiles, errors, the server's average batch) and
`extra_info["in_process"]` (per round: images/s and the median call in ms), which `python -m benchmarks.report`
turns into its serving table: each server's share of the floor, `toolkit serve` against the naive server and
against the model in-process, all as medians of the rounds' ratios. Every round must end without errors: an
answer that is not a 200 with one output row per image fails the case. With benchmarking disabled every case
runs once, one round at concurrency 1 and 8 for 0.3 s.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import ROOT, Scale
from benchmarks.conftest import Trained
from benchmarks.serving_baselines import serving_process
from toolkit.apps.loadtest import LevelResult, LoadtestConfig, run_loadtest
from toolkit.artifacts import formats
from toolkit.artifacts.backends import Backend, load_backend

BATCH_CLIENTS = 4  # concurrency of the 64-image cases
SERVE_FLAGS = ("--max-batch-size", "64")  # a 64-image request fits one batch
# ONNX Runtime intra-op threads of both servers: one, as the client needs the other core. On 2 cores shared with
# other processes, the naive server with ORT's default (a thread per core) answered single-image requests at
# concurrency 1 at 470/s (p99 11 ms); with one thread, 1,556/s and 2,902/s in two later runs.
SERVER_THREADS = "1"
LOOPBACK = ("--host", "127.0.0.1", "--port", "0")
# server -> argv for (export folder, model name): every server names the model as `toolkit serve` does.
SERVERS: dict[str, Callable[[Path, str], list[str]]] = {
    "noop": lambda export, model: [sys.executable, "-m", "benchmarks.serving_baselines", "noop", "--name", model],
    "naive": lambda export, model: [sys.executable, "-m", "benchmarks.serving_baselines", "naive",
                                    str(export / formats.ONNX.file), "--threads", SERVER_THREADS],
    "serve": lambda export, model: [sys.executable, "-m", "toolkit", "serve", str(export), *SERVE_FLAGS,
                                    "--threads", SERVER_THREADS],
}
FLOOR = "noop"


@functools.cache
def serve_missing() -> str | None:
    """Why `toolkit serve` cannot run in this checkout (None: it can)."""
    proc = subprocess.run([sys.executable, "-m", "toolkit", "serve", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    return None if proc.returncode == 0 else f"`toolkit serve --help` exited {proc.returncode}: " + \
        (proc.stderr.strip().splitlines() or ["no output"])[-1]


def in_process(backend: Backend, images: np.ndarray, seconds: float) -> dict[str, float]:
    """`predict_logits(images)` called back to back for `seconds`: images/s and the median call (ms)."""
    calls = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        backend.predict_logits(images)
        calls.append(time.perf_counter() - t)
    return {"images_per_s": len(calls) * len(images) / sum(calls), "p50_ms": 1000 * statistics.median(calls)}


@pytest.mark.parametrize("batch", [1, 64], ids=lambda b: f"b{b}")
def test_serving(benchmark, trained: Trained, scale: Scale, batch: int) -> None:
    model = f"{trained.export.name}-{formats.ONNX.name}"
    names = [name for name in SERVERS if name != "serve" or not serve_missing()]
    levels = scale.serving_concurrency if batch == 1 else (BATCH_CLIENTS,)
    backend = load_backend(trained.export / formats.ONNX.file, threads=int(SERVER_THREADS), provider="cpu")
    images = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)
    backend.predict_logits(images)  # ONNX Runtime sizes its buffers on a shape's first run
    local: list[dict[str, float]] = []

    def sweep(urls: dict[str, str]) -> dict[str, list[LevelResult]]:
        measured: dict[str, list[LevelResult]] = {name: [] for name in urls}
        for concurrency in levels:  # at each level, rounds of every server in turn, then the model in-process
            for _ in range(scale.serving_rounds):
                for name, url in urls.items():
                    config = LoadtestConfig(url, model, (concurrency,), scale.serving_seconds,
                                            scale.serving_warmup_s, batch)
                    measured[name] += run_loadtest(config).levels
                local.append(in_process(backend, images, scale.serving_seconds))
        return measured

    argv = {name: [*SERVERS[name](trained.export, model), *LOOPBACK] for name in names}
    with contextlib.ExitStack() as running:
        urls = {name: running.enter_context(serving_process(argv[name], cwd=ROOT)).url for name in names}
        measured = benchmark.pedantic(sweep, args=(urls,), rounds=1, iterations=1)
    for name, results in measured.items():
        for level in results:
            assert level.ok > 0 and not level.errors, f"{name}, concurrency {level.concurrency}: {level}"
    benchmark.group = "serving"
    benchmark.extra_info.update(
        kind="serving", label=f"{batch} image(s) per request", batch=batch, body="binary", input_dtype="fp32",
        floor=FLOOR, rounds=scale.serving_rounds, duration_s=scale.serving_seconds,
        warmup_s=scale.serving_warmup_s,
        commands={name: " ".join(["python", *command[1:]]).replace(str(trained.export), "EXPORT_DIR")
                  for name, command in argv.items()},
        servers={name: [asdict(level) for level in results] for name, results in measured.items()},
        in_process=local)
