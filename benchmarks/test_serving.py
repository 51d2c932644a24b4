"""Serving the benchmark model's `model.onnx` over HTTP: `toolkit loadtest` against three servers, one after another.

- `noop`: `python -m benchmarks.serving_baselines noop`, which parses each binary Open Inference Protocol request
  and answers zeros: the HTTP floor of Starlette + uvicorn on this machine.
- `naive`: `python -m benchmarks.serving_baselines naive model.onnx`, one ONNX Runtime call per request, inline
  on the event loop, no batching.
- `serve`: `python -m toolkit serve EXPORT_DIR --max-batch-size 64` with its other defaults (skipped where this
  checkout has no `toolkit serve`).

Each server runs as its own process on 127.0.0.1, with ONNX Runtime's default threads, and shares the machine's
cores with the client (`toolkit.apps.loadtest.run_loadtest`: one asyncio loop, binary requests, the same random
normalized fp32 images in every request). Cases: single-image requests at concurrency 1, 8, 32 and 128, and
64-image requests from 4 clients; at full size a 1 s warm-up and 3 s measured per level (about 20 s per server
and case). The row's pytest-benchmark time is the whole sweep; the figures are in `extra_info["levels"]`
(`LevelResult` of each level: requests/s, images/s, latency percentiles, errors, the server's average batch),
which `python -m benchmarks.report` turns into its serving table, with each row's share of the no-op floor.
Every level must end without errors: an answer that is not a 200 with one output row per image fails the case.
With benchmarking disabled every case runs once, at concurrency 1 and 8 for 0.3 s.
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
from toolkit.apps.loadtest import LoadtestConfig, run_loadtest
from toolkit.artifacts import formats

BATCH_CLIENTS = 4  # concurrency of the 64-image cases
SERVE_FLAGS = ("--max-batch-size", "64")  # a 64-image request fits one batch
# server -> argv for (export folder, model name): every server names the model as `toolkit serve` does.
SERVERS: dict[str, Callable[[Path, str], list[str]]] = {
    "noop": lambda export, model: [sys.executable, "-m", "benchmarks.serving_baselines", "noop", "--name", model],
    "naive": lambda export, model: [sys.executable, "-m", "benchmarks.serving_baselines", "naive",
                                    str(export / formats.ONNX.file)],
    "serve": lambda export, model: [sys.executable, "-m", "toolkit", "serve", str(export), *SERVE_FLAGS],
}


@functools.cache
def serve_missing() -> str | None:
    """Why `toolkit serve` cannot run in this checkout (None: it can)."""
    proc = subprocess.run([sys.executable, "-m", "toolkit", "serve", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    return None if proc.returncode == 0 else f"`toolkit serve --help` exited {proc.returncode}: " + \
        (proc.stderr.strip().splitlines() or ["no output"])[-1]


@pytest.mark.parametrize("batch", [1, 64], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("server", SERVERS)
def test_serving(benchmark, trained: Trained, scale: Scale, server: str, batch: int) -> None:
    if server == "serve" and serve_missing():
        pytest.skip(f"no `toolkit serve` in this checkout ({serve_missing()})")
    model = f"{trained.export.name}-{formats.ONNX.name}"
    levels = scale.serving_concurrency if batch == 1 else (BATCH_CLIENTS,)
    argv = [*SERVERS[server](trained.export, model), "--host", "127.0.0.1", "--port", "0"]
    with serving_process(argv, cwd=ROOT) as served:
        config = LoadtestConfig(served.url, model, levels, scale.serving_seconds, scale.serving_warmup_s, batch)
        result = benchmark.pedantic(run_loadtest, args=(config,), rounds=1, iterations=1)
    for level in result.levels:
        assert level.ok > 0 and not level.errors, f"{server}, concurrency {level.concurrency}: {level}"
    benchmark.group = "serving"
    benchmark.extra_info.update(
        kind="serving", label=f"{server}, {batch} image(s) per request", server=server, batch=batch,
        body=result.body, input_dtype=result.input_dtype, duration_s=result.duration_s, warmup_s=result.warmup_s,
        command=" ".join(["python", *argv[1:]]).replace(str(trained.export), "EXPORT_DIR"),
        levels=[asdict(level) for level in result.levels])
