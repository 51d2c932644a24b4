"""Serving the benchmark model's `model.onnx` over HTTP: `toolkit loadtest` against a server and, level by level in
alternation with it, the no-op floor.

- `noop` (the floor, measured in every case): `python -m benchmarks.serving_baselines noop`, which parses each
  binary Open Inference Protocol request and answers zeros: the most requests/s Starlette + uvicorn reach here.
- `naive`: `python -m benchmarks.serving_baselines naive model.onnx --threads 1`, one ONNX Runtime call per
  request, inline on the event loop, no batching.
- `serve`: `python -m toolkit serve EXPORT_DIR --max-batch-size 64 --threads 1` with its other defaults (skipped
  where this checkout has no `toolkit serve`).

Both servers of a case run as their own processes on 127.0.0.1, ONNX Runtime with one intra-op thread, and share
the machine's cores with the client (`toolkit.apps.loadtest.run_loadtest`: one asyncio loop, binary requests,
the same random normalized fp32 images in every request). At each concurrency level the floor and the server
are measured in alternating rounds (at full size three rounds each of a 0.5 s warm-up and 1 s measured), so
that a shared machine's drift, which over minutes exceeds the differences measured, falls on both alike; the
report takes the median over rounds, and a row's share of the floor is the median of the rounds' ratios.
Cases: single-image requests at concurrency 1, 8, 32 and 128, and 64-image requests from 4 clients. The row's
pytest-benchmark time is the whole sweep; the figures are in `extra_info["levels"]` and `["floor_levels"]`
(one `LevelResult` per round: requests/s, images/s, latency percentiles, errors, the server's average batch),
which `python -m benchmarks.report` turns into its serving table. Every round must end without errors: an
answer that is not a 200 with one output row per image fails the case. With benchmarking disabled every case
runs once, one round at concurrency 1 and 8 for 0.3 s.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest

from benchmarks.common import ROOT, Scale
from benchmarks.conftest import Trained
from benchmarks.serving_baselines import serving_process
from toolkit.apps.loadtest import LevelResult, LoadtestConfig, run_loadtest
from toolkit.artifacts import formats

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


@pytest.mark.parametrize("batch", [1, 64], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("server", [name for name in SERVERS if name != FLOOR])
def test_serving(benchmark, trained: Trained, scale: Scale, server: str, batch: int) -> None:
    if server == "serve" and serve_missing():
        pytest.skip(f"no `toolkit serve` in this checkout ({serve_missing()})")
    model = f"{trained.export.name}-{formats.ONNX.name}"
    levels = scale.serving_concurrency if batch == 1 else (BATCH_CLIENTS,)
    floor_argv, argv = ([*SERVERS[name](trained.export, model), *LOOPBACK] for name in (FLOOR, server))

    def sweep(floor_url: str, url: str) -> dict[str, list[LevelResult]]:
        measured: dict[str, list[LevelResult]] = {FLOOR: [], server: []}
        for concurrency in levels:  # at each level, rounds of the floor then the server
            for _ in range(scale.serving_rounds):
                for name, where in ((FLOOR, floor_url), (server, url)):
                    config = LoadtestConfig(where, model, (concurrency,), scale.serving_seconds,
                                            scale.serving_warmup_s, batch)
                    measured[name] += run_loadtest(config).levels
        return measured

    with serving_process(floor_argv, cwd=ROOT) as floor, serving_process(argv, cwd=ROOT) as served:
        measured = benchmark.pedantic(sweep, args=(floor.url, served.url), rounds=1, iterations=1)
    for name, results in measured.items():
        for level in results:
            assert level.ok > 0 and not level.errors, f"{name}, concurrency {level.concurrency}: {level}"
    benchmark.group = "serving"
    benchmark.extra_info.update(
        kind="serving", label=f"{server}, {batch} image(s) per request", server=server, batch=batch, body="binary",
        input_dtype="fp32", rounds=scale.serving_rounds, duration_s=scale.serving_seconds,
        warmup_s=scale.serving_warmup_s,
        command=" ".join(["python", *argv[1:]]).replace(str(trained.export), "EXPORT_DIR"),
        levels=[asdict(level) for level in measured[server]],
        floor_levels=[asdict(level) for level in measured[FLOOR]])
