"""`python -m benchmarks.ort_settings EXPORT_DIR`: which ONNX Runtime session settings make TutorialNet fast on
this CPU, as an interleaved A/B comparison (docs/deployment.md, "ONNX Runtime on the CPU", explains the
settings it compares).

What: one batch of held-out-like inputs (standard normal, fixed seed; speed does not depend on the values)
through each variant below, at one thread count and batch size. Every variant is timed once per round
and the rounds alternate between variants, so a machine whose speed drifts (other processes, frequency)
slows all variants alike; the table shows each variant's median over the rounds.

Variants (a session of the export's model.onnx unless named):
- `eager`: the eager model through `Backend.predict_logits`, torch pinned to the same thread count;
- `ORT defaults`: `InferenceSession.run` with only `intra_op_num_threads` set (what the toolkit did
  before), then the same with one setting changed: graph optimization `ORT_ENABLE_EXTENDED` (no NCHWc
  layout), memory arena off, intra-op spinning off, intra-op threads pinned to cores (affinity);
- `toolkit`: `load_backend(threads=N).predict_logits`: the same session options, a batch run as slices
  of `SLICE` images one after another, with other slice sizes, and for model.fp16.onnx / model.int8.onnx;
- `session.run under toolkit` (batch 1): the toolkit backend's own session called directly, without the
  interface's checks, so the difference to `toolkit` is the interface's cost.

The machine should be otherwise idle; the command, batch, threads and machine are printed with the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from toolkit.artifacts import formats, onnx_runtime
from toolkit.artifacts.backends import load_backend
from toolkit.artifacts.metadata import INPUT_NAME, OUTPUT_NAME


def _session(model: Path, threads: int, **changes: object) -> Callable[[np.ndarray], object]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = changes.get("level", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.enable_cpu_mem_arena = bool(changes.get("arena", True))
    for key, value in changes.get("config", {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})


def _toolkit(model: Path, threads: int, slice_size: int) -> Callable[[np.ndarray], object]:
    backend = load_backend(model, threads=threads, provider="cpu")

    def call(x: np.ndarray) -> object:
        onnx_runtime.SLICE = slice_size  # read at each call: lets one process compare slice sizes
        return backend.predict_logits(x)

    return call


def variants(export_dir: Path, threads: int, batch: int) -> dict[str, Callable[[np.ndarray], object]]:
    model = export_dir / formats.ONNX.file
    eager = load_backend(export_dir / formats.EAGER.file)
    out: dict[str, Callable[[np.ndarray], object]] = {
        "eager (torch)": eager.predict_logits,
        "ORT defaults (intra_op_num_threads only)": _session(model, threads),
        "  + ORT_ENABLE_EXTENDED (no NCHWc layout)": _session(model, threads,
                                                              level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
        "  + memory arena off": _session(model, threads, arena=False),
        "  + intra-op spinning off": _session(model, threads, config={"session.intra_op.allow_spinning": "0"}),
    }
    if threads > 1:  # ORT's extra intra-op threads (threads - 1 of them) pinned to logical CPUs 2, 3, ...
        pinned = ";".join(str(cpu) for cpu in range(2, threads + 1))
        out["  + intra-op threads pinned to cores"] = _session(
            model, threads, config={"session.intra_op_thread_affinities": pinned})
    for size in (onnx_runtime.SLICE, 32, 128, 256):
        out[f"toolkit: slices of {size}" + (" (default)" if size == onnx_runtime.SLICE else "")] = \
            _toolkit(model, threads, size)
    for fmt in ("onnx-fp16", "onnx-int8"):
        out[f"toolkit {fmt}: slices of {onnx_runtime.SLICE}"] = _toolkit(export_dir / formats.get(fmt).file, threads,
                                                                          onnx_runtime.SLICE)
    if batch == 1:
        session = load_backend(model, threads=threads, provider="cpu").session
        out["session.run under toolkit (no checks)"] = lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})
    return out


def measure(calls: dict[str, Callable[[np.ndarray], object]], x: np.ndarray, rounds: int,
            seconds_per_round: float) -> dict[str, float]:
    """Median seconds per call of each variant over `rounds` interleaved rounds."""
    per_call = {}
    for name, call in calls.items():  # warm-up, and how many calls fill one round's time
        call(x)
        start = time.perf_counter()
        call(x)
        per_call[name] = max(1, int(seconds_per_round / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            time.sleep(0.05)  # the previous variant's intra-op threads spin a while after each run: let them stop
            start = time.perf_counter()
            for _ in range(per_call[name]):
                call(x)
            samples[name].append((time.perf_counter() - start) / per_call[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ort_settings", description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="an export folder with every format")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.3, help="timing per variant per round (s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    medians = measure(variants(args.export_dir, args.threads, args.batch), x, args.rounds, args.seconds)
    eager, defaults = medians["eager (torch)"], medians["ORT defaults (intra_op_num_threads only)"]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"`python -m benchmarks.ort_settings {' '.join(sys.argv[1:] if argv is None else argv)}`: batch {args.batch}, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds, median per batch; {cpu}, "
          f"{os.cpu_count()} logical CPUs; onnxruntime {ort.__version__}, torch {torch.__version__}\n")
    print("| variant | ms / batch | images/s | × eager | × ORT defaults |\n|---|---|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {1e3 * seconds:.3g} | {args.batch / seconds:,.0f} | {eager / seconds:.2f}× | "
              f"{defaults / seconds:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
