"""Helpers shared by the benchmark modules: sizes, thread pinning, timing and extra_info.

Everything a report needs is written into `benchmark.extra_info`, so `python -m benchmarks.report` can
build its tables from the saved JSON alone (see `benchmarks/report.py` for the keys it reads).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.artifacts import formats
from toolkit.artifacts.formats import LogitTolerance

ROOT = Path(__file__).resolve().parents[1]
# A reduced-precision format (fp16, int8) must pick eager's class for at least this share of the
# benchmark's images before it is timed (measured on real CIFAR-10: fp16 99.96 %, int8 98.2 %).
REDUCED_AGREEMENT = 0.95
# An untrained model's classes say nothing (a random ResNet-18 gives every image the same class, a random
# speednet's logits differ by less than int8's rounding), so its fp16 and int8 files are held to eager's
# logits instead: largest difference at most this share of eager's largest |logit| (measured: int8 1.6 %).
REDUCED_LOGIT_SHARE = 0.10

# "all" threads: every core of this machine unless TOOLKIT_BENCH_THREADS says otherwise. Torch
# formats and ONNX Runtime are pinned to the same count so that their rows compare like with like.
THREADS_ALL = int(os.environ.get("TOOLKIT_BENCH_THREADS") or os.cpu_count() or 1)


def resolve_threads(setting: int | str) -> int | None:
    """A thread setting of a parametrized case -> an explicit count (None: the runtime's default)."""
    if setting == "all":
        return THREADS_ALL
    if setting == "default":
        return None
    return int(setting)


def real_data_dir() -> Path | None:
    """The shared real CIFAR-10 image folder (`DIR/train/<class>/*.jpg`), or None when absent.

    `TOOLKIT_BENCH_DATA` points elsewhere; relative paths are taken from the repository root.
    """
    path = Path(os.environ.get("TOOLKIT_BENCH_DATA", "data/cifar10-jpg"))
    path = path if path.is_absolute() else ROOT / path
    return path if (path / "train").is_dir() else None


def shown(path: Path) -> str:
    """A path as results files record it: relative to the repository when inside it (no machine paths)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Scale:
    """How big each benchmark is. `full` when timings are recorded, tiny when they are not."""

    full: bool
    seconds: float  # timing budget of one latency benchmark (s), warm-up not included
    matmul_seconds: float  # duration of the matmul throughput probe (s)
    epoch_images: int  # images in one measured training epoch
    epoch_rounds: int  # measured epochs per epoch benchmark
    launch_steps: int  # optimizer steps of each `accelerate launch` run
    launch_log_every: int  # steps per images/s window in metrics.jsonl
    export_rounds: int  # exports timed per format
    verify_images: int  # images `toolkit verify` runs through every format
    verify_rounds: int
    serving_concurrency: tuple[int, ...]  # `toolkit loadtest` levels of the single-image serving rows
    serving_rounds: int  # measured windows per level and server, alternating with the no-op floor's
    serving_seconds: float  # one measured window (s), after serving_warmup_s
    serving_warmup_s: float
    train_batch_cap: int | None  # largest batch of a train_step row (None: the row's own batch)


FULL = Scale(full=True, seconds=1.0, matmul_seconds=0.5, epoch_images=10_000, epoch_rounds=2,
             launch_steps=240, launch_log_every=40, export_rounds=3, verify_images=10_000, verify_rounds=3,
             serving_concurrency=(1, 8, 32, 128), serving_rounds=3, serving_seconds=1.0,
             serving_warmup_s=0.5, train_batch_cap=None)
TINY = Scale(full=False, seconds=0.0, matmul_seconds=0.02, epoch_images=128, epoch_rounds=1,
             launch_steps=4, launch_log_every=2, export_rounds=1, verify_images=200, verify_rounds=1,
             serving_concurrency=(1, 8), serving_rounds=1, serving_seconds=0.3,
             serving_warmup_s=0.1, train_batch_cap=8)


@contextlib.contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Torch's intra-op thread count set to `threads` for the block (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def calibrate(fn: Callable[[], Any], budget_s: float, min_rounds: int = 5, max_rounds: int = 2000,
              min_round_s: float = 2e-3) -> tuple[int, int, int]:
    """(rounds, iterations per round, warm-up rounds) so that timing takes about `budget_s`.

    A call shorter than `min_round_s` is repeated within a round (pytest-benchmark divides by the
    iterations), so that timer resolution and loop overhead stay negligible at batch 1.
    """
    fn()  # first call: lazy initialization, allocator growth
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    iterations = max(1, math.ceil(min_round_s / once))
    per_round = once * iterations
    rounds = int(min(max(budget_s / per_round, min_rounds), max_rounds))
    warmup = max(1, min(rounds // 10, math.ceil(0.2 / per_round)))
    return rounds, iterations, warmup


def interleaved_medians(a: Callable[[], Any], b: Callable[[], Any], seconds: float, number: int,
                        min_rounds: int = 5) -> tuple[float, float]:
    """Median seconds per call of `a` and of `b`, timed in alternating rounds of `number` calls each.

    Two rows of a benchmark run are timed minutes apart, and a shared VM's speed drifts by more than the
    difference between two callables that share most of their work; alternating puts the drift on both.
    """
    times: tuple[list[float], list[float]] = ([], [])
    deadline = time.perf_counter() + seconds
    while len(times[0]) < min_rounds or time.perf_counter() < deadline:
        for fn, out in ((a, times[0]), (b, times[1])):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            out.append((time.perf_counter() - start) / number)
    return statistics.median(times[0]), statistics.median(times[1])


def time_call(benchmark, fn: Callable[[], Any], scale: Scale, min_rounds: int = 5) -> Any:
    """Benchmark `fn` (no arguments) within the scale's budget, at least `min_rounds` timed rounds;
    disabled: one plain call."""
    if benchmark.disabled:
        return benchmark.pedantic(fn)
    rounds, iterations, warmup = calibrate(fn, scale.seconds, min_rounds=min_rounds)
    benchmark.extra_info.update(rounds=rounds, iterations=iterations, warmup_rounds=warmup)
    return benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=warmup)


def median_seconds(benchmark) -> float | None:
    """The measured median of one call in seconds (None when benchmarking is disabled)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else float(stats.stats.median)


def record_throughput(benchmark, images: int, seconds: float | None, flops_per_image: int,
                      peak_gflops: float | None) -> None:
    """Images/s, achieved GFLOP/s and their share of the measured matmul peak, into extra_info.

    `seconds` is the time for `images` images (None: disabled, nothing to record).
    """
    if seconds is None or seconds <= 0:
        return
    images_per_s = images / seconds
    gflops = images_per_s * flops_per_image / 1e9
    benchmark.extra_info.update(images_per_s=images_per_s, achieved_gflops=gflops)
    if peak_gflops:
        benchmark.extra_info.update(matmul_peak_gflops=peak_gflops, share_of_matmul_peak=gflops / peak_gflops)


def steady_images_per_s(records: list[dict[str, Any]]) -> tuple[float, int]:
    """Median images/s of the step windows after the first (warm-up), and how many windows that is."""
    windows = [r["images_per_s"] for r in records if r.get("kind") == "step" and "images_per_s" in r]
    steady = windows[1:] or windows
    if not steady:
        raise AssertionError("metrics.jsonl holds no step record with images_per_s")
    return statistics.median(steady), len(steady)


def check_against_eager(fmt: str, logits: np.ndarray, reference: np.ndarray, gpu: bool = False,
                        trained: bool = True) -> None:
    """A fast wrong answer is not a result: fail unless `logits` match eager's `reference` as the format's
    registry policy expects. fp32 formats: every logit within the verify tolerance (within 1e-2 on a GPU,
    whose convolutions may use TF32); fp16 and int8: the same class for `REDUCED_AGREEMENT` of the images
    of a trained model, logits within `REDUCED_LOGIT_SHARE` of eager's scale for an untrained one."""
    tolerance = formats.get(fmt).tolerance
    if isinstance(tolerance, LogitTolerance):
        atol, rtol = (1e-2, 1e-2) if gpu else (tolerance.atol, tolerance.rtol)
        np.testing.assert_allclose(logits, reference, atol=atol, rtol=rtol,
                                   err_msg=f"{fmt} logits differ from eager's: not timing a wrong answer")
        return
    if not trained:
        worst, scale = float(np.abs(logits - reference).max()), float(np.abs(reference).max())
        assert worst <= REDUCED_LOGIT_SHARE * scale, \
            f"{fmt} logits differ from eager's by up to {worst:.3g} (eager's largest |logit|: {scale:.3g}): " \
            "not timing a wrong answer"
        return
    agreement = float((logits.argmax(axis=1) == reference.argmax(axis=1)).mean())
    assert agreement >= REDUCED_AGREEMENT, \
        f"{fmt} picks eager's class for {100 * agreement:.1f} % of {len(logits)} images: not timing a wrong answer"
