"""Session fixtures of the benchmark suite: sizes, thread pinning, the trained and exported model,
the inputs and eager reference logits, and the machine's measured matmul throughput.

Provider: `pytest benchmarks --provider auto|cpu|cuda|tensorrt` chooses where the ONNX Runtime rows of
test_inference.py run (default `cpu`, so that every row compares with eager on the same CPU).

Sizes: with timings recorded (`--benchmark-enable`, as `make bench` runs) the model is trained
for one epoch of `--recipe fast` on the shared real CIFAR-10 split when it is present (else on
synthetic data), and the benchmarks use their full sizes. With benchmarking disabled (`make test`)
every benchmark runs once on tiny synthetic inputs, so the suite cannot rot and stays cheap.
`TOOLKIT_BENCH_SIZE=tiny|full` overrides the choice.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch

import toolkit
from benchmarks.common import FULL, ROOT, THREADS_ALL, TINY, Scale, real_data_dir, shown
from benchmarks.flops import forward_flops, matmul_gflops, tutorialnet_flops
from benchmarks.model_rows import MODEL_ROWS
from toolkit.apps.verify import load_verification_split
from toolkit.artifacts import formats
from toolkit.artifacts.backends import PROVIDERS, load_backend
from toolkit.artifacts.export import CALIBRATION_IMAGES, export_run
from toolkit.artifacts.manifest import Manifest
from toolkit.core.memory import keep_freed_memory
from toolkit.training.data import normalize
from toolkit.training.models import build_model

# Measured as every toolkit command runs (its entry point calls this): big tensors reused, not faulted in again.
keep_freed_memory()

_SESSION: dict[str, Any] = {}  # facts learned during the session, for the results file's machine_info


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """Record library versions, the pinned thread count and the data into the results JSON."""
    machine_info["toolkit_bench"] = {
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "toolkit": toolkit.__version__},
        "onnxruntime_build": onnxruntime.capi.build_and_package_info.package_name,
        "threads_all": THREADS_ALL,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        **_SESSION,
    }


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--provider", choices=PROVIDERS, default="cpu",
                     help="where the ONNX Runtime inference rows run (default cpu)")


@pytest.fixture(scope="session")
def provider(pytestconfig: pytest.Config) -> str:
    """`--provider` for the ONNX Runtime rows; recorded with the session's machine info."""
    _SESSION["provider"] = pytestconfig.getoption("provider")
    return _SESSION["provider"]


def _benchmarks_enabled(config: pytest.Config) -> bool:
    # Same rule as pytest-benchmark's session: disabled when --benchmark-disable is in force
    # (pyproject's addopts) and --benchmark-enable is not given.
    return not (config.getoption("benchmark_disable", False) and not config.getoption("benchmark_enable", False))


@pytest.fixture(scope="session")
def scale(pytestconfig: pytest.Config) -> Scale:
    size = os.environ.get("TOOLKIT_BENCH_SIZE", "").lower()
    if size not in ("", "tiny", "full"):
        raise pytest.UsageError(f"TOOLKIT_BENCH_SIZE: expected tiny or full, got {size!r}")
    full = size == "full" or (size == "" and _benchmarks_enabled(pytestconfig))
    return FULL if full else TINY


@pytest.fixture
def device(request: pytest.FixtureRequest, scale: Scale) -> str:
    """Where a case of test_gpu.py runs (parametrized indirectly with tests.helpers.on_device): a CUDA GPU, or
    the CPU, whose cases check the same code paths with timings off or at tiny size. At full size (`make bench`)
    the CPU's figures are test_inference.py's and test_training.py's, so its cases here skip."""
    if request.param == "cpu" and scale.full:
        pytest.skip("the CPU cases of test_gpu.py run at tiny size only: the CPU's figures are test_inference.py's "
                    "and test_training.py's")
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _pin_session_threads() -> None:
    """Every torch computation of the session runs on THREADS_ALL threads unless a benchmark pins
    another count for its own block (see `benchmarks.common.pinned_threads`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS_ALL)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def flops_per_image() -> int:
    """Forward FLOPs per image of TutorialNet (benchmarks/flops.py: conv + linear, MAC = 2)."""
    return tutorialnet_flops()


@pytest.fixture(scope="session")
def model_flops() -> Callable[[str], int]:
    """model name -> forward FLOPs per image (benchmarks/flops.py), counted once per model."""
    cache: dict[str, int] = {}

    def flops(model: str) -> int:
        if model not in cache:
            cache[model] = forward_flops(build_model(model, 10))
        return cache[model]

    return flops


@pytest.fixture(scope="session")
def matmul_peak(scale: Scale) -> Callable[[int], float]:
    """threads -> measured fp32 `torch.mm` GFLOP/s (1024×1024), measured once per thread count."""
    cache: dict[int, float] = {}

    def peak(threads: int) -> float:
        if threads not in cache:
            cache[threads] = matmul_gflops(threads, seconds=scale.matmul_seconds)
        return cache[threads]

    return peak


def run_toolkit(*args: str, threads: int = THREADS_ALL, env: dict[str, str] | None = None,
                timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m toolkit ARGS` from the repository root; fails the test with the output on error."""
    proc = subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})})
    if proc.returncode != 0:
        pytest.fail(f"toolkit {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                    f"stderr:\n{proc.stderr[-3000:]}", pytrace=False)
    return proc


@dataclass(frozen=True)
class Trained:
    """The benchmark model: a trained run, its export folder, and the data it came from."""

    run: Path
    export: Path
    data: str  # "real" (shared CIFAR-10 images) or "synthetic"
    data_args: list[str]  # `toolkit train` flags selecting that data (for further runs on it)
    verify_overrides: dict[str, Any] = field(default_factory=dict)  # data overrides for verify_export
    verify_split: str = "test"


@pytest.fixture(scope="session")
def trained(scale: Scale, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Train once (through the real CLI) and export every format once (through the library)."""
    base = tmp_path_factory.mktemp("bench-model")
    real = real_data_dir() if scale.full else None
    if real is not None:
        # Real data: one epoch of the fast recipe; 20 % held out so that verify runs on exactly
        # 10,000 images the model did not train on. The decoded split is cached in the user's cache.
        data_args = ["--data", "imagefolder", "--data-dir", str(real)]
        train_args = [*data_args, "--recipe", "fast", "--epochs", "1", "--val-fraction", "0.2"]
        overrides, split = {}, "val"
    else:
        test_size = scale.verify_images
        data_args = ["--data", "synthetic", "--synthetic-train-size", "2000" if scale.full else "300",
                     "--synthetic-test-size", str(test_size), "--cache-dir", str(base / "cache")]
        train_args = [*data_args, "--epochs", "3" if scale.full else "1", "--batch-size", "32", "--lr", "0.05",
                      "--val-fraction", "0"]
        overrides, split = {}, "test"
    run = base / "run"
    run_toolkit("train", *train_args, "--threads", str(THREADS_ALL), "--output-dir", str(run),
                "--log-every", "1000000")
    export = export_run(run, base / "export", log=lambda line: None)
    command = " ".join(train_args).replace(str(real), shown(real)) if real else " ".join(train_args)
    _SESSION["data"] = (f"real CIFAR-10 images ({shown(real)})" if real else "synthetic images") + \
        f", model trained with: toolkit train {command}"
    return Trained(run, export, "real" if real else "synthetic", data_args, overrides, split)


@dataclass(frozen=True)
class Inputs:
    """Normalized float32 images for inference (1024 of them) and the eager model's logits on them."""

    images: np.ndarray  # 1024×3×32×32 float32, normalized as in training
    eager_logits: np.ndarray  # 1024×classes float32
    source: str


MAX_BATCH = 1024


@pytest.fixture(scope="session")
def inputs(trained: Trained) -> Inputs:
    held, _ = load_verification_split(Manifest.read(trained.export), trained.verify_overrides, trained.verify_split)
    index = torch.arange(MAX_BATCH) % len(held)  # tiny splits are repeated up to the largest batch
    images = normalize(held.images[index]).numpy()
    eager = load_backend(trained.export)
    return Inputs(images, eager.predict_logits(images), f"{trained.data} {held.name} split")


UNTRAINED = "untrained: random initialization, seed 0"


@dataclass(frozen=True)
class ModelExport:
    """One model's export folder for the inference rows, and eager's logits on the first images of `inputs`."""

    model: str
    export: Path
    trained: bool
    weights: str  # what the rows measured, for the report: trained (the suite's run) or untrained
    eager_logits: np.ndarray  # benchmarks.model_rows.ModelRows.check_images × classes float32


@pytest.fixture(scope="session")
def model_export(trained: Trained, inputs: Inputs, tmp_path_factory: pytest.TempPathFactory
                 ) -> Callable[[str], ModelExport]:
    """model name -> its export, made on first use: the tutorial's is the suite's trained run; every other
    built-in model is exported untrained (see benchmarks/model_rows.py), only in the formats its rows time."""
    cache: dict[str, ModelExport] = {}

    def get(model: str) -> ModelExport:
        if model in cache:
            return cache[model]
        rows = MODEL_ROWS[model]
        if rows.trained:
            cache[model] = ModelExport(model, trained.export, True, "trained: the suite's run (see data)",
                                       inputs.eager_logits[:rows.check_images])
            return cache[model]
        base = tmp_path_factory.mktemp(f"bench-{model}")
        # `toolkit export` reads a run folder: one step at a learning rate too small to move the random
        # weights writes it (BatchNorm keeps running statistics of that one batch). The synthetic training
        # split is as large as the int8 calibration set, which export draws from it.
        run_toolkit("train", "--model", model, "--data", "synthetic", "--synthetic-train-size",
                    str(CALIBRATION_IMAGES), "--synthetic-test-size", "16", "--val-fraction", "0",
                    "--cache-dir", str(base / "cache"), "--batch-size", "8", "--max-steps", "1", "--lr", "1e-9",
                    "--seed", "0", "--threads", str(THREADS_ALL), "--output-dir", str(base / "run"),
                    "--log-every", "1000000")
        names = [f for f in rows.formats if formats.get(f).exported]
        export = export_run(base / "run", base / "export", names, log=lambda line: None)
        eager = load_backend(export / formats.EAGER.file).predict_logits(inputs.images[:rows.check_images])
        cache[model] = ModelExport(model, export, False, UNTRAINED, eager)
        return cache[model]

    return get
