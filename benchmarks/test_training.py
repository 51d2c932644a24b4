"""Training throughput: the step, a whole epoch, 1 vs 2 processes, and time-to-accuracy.

- `test_train_step[model-batch-layout-precision]`: one `toolkit.training.train.train_step` (forward, fp32 loss,
  backward, SGD step) on an in-memory batch, fp32 vs bf16 autocast, per built-in model (random
  initialization, seed 0), in contiguous (NCHW) and channels_last memory format (model and batch converted
  with `.to(memory_format=...)` / `.contiguous(memory_format=...)` before the step), all cores
  (`torch.set_num_threads`). Rows (benchmarks/model_rows.py): the tutorial at batch 4 (its own) and the fast
  recipe's batch (`RECIPES["fast"]`, 128), channels_last at 128 only, rounds calibrated to about 1 s;
  speednet and ResNet-18 at 128 in both layouts, 3 timed steps after one warm-up step.
- `test_epoch[path-precision]`: one pass over the same `epoch_images` training images (10,000 of the
  real CIFAR-10 split when present, else synthetic; evenly spaced over the classes) at the fast
  recipe's batch size, every batch through `train_step`, with the model, optimizer and loader
  prepared by Accelerate:
    fast      the toolkit's in-memory loader (`toolkit.training.data.make_loader`, decoded once);
    fast-aug  the same with the fast recipe's vectorized random crop + flip;
    pil       the tutorial's way: `torchvision.datasets.ImageFolder` + `ToTensor` +
              `Normalize((0.5,)*3, (0.5,)*3)`, `DataLoader(shuffle=True, num_workers=2)`, every
              image decoded with PIL on every epoch (worker start-up included, as the tutorial
              pays it every epoch). Without real data it reads a synthetic PNG folder.
  Two measured epochs per case, after a few warm-up steps.
- `test_launch[1proc|2proc]`: the real CLI under `accelerate launch` (`launch/single.yaml` vs
  `launch/cpu-2proc.yaml`), `--recipe fast`, the same global batch B = the fast recipe's (B × 1
  process × all cores vs B/2 × 2 processes × 1 thread each), `--max-steps 240`; images/s is the
  median of the trainer's own `metrics.jsonl` windows (40 steps each) after the first; the
  benchmark's time is the whole launch, start-up included.
- `test_time_to_accuracy[fast|seed|speednet]`: `toolkit train --recipe fast` (its own epochs), `--recipe
  seed` (the tutorial: 2 epochs at batch 4) and `--recipe speednet` shortened to SPEEDNET_BENCH_EPOCHS
  epochs (its schedule fitted to them; the full recipe takes about 20 minutes on 2 cores, more than the
  whole `make bench` may) on the shared real data, all cores; the validation accuracy after each epoch
  against the training seconds so far, and the final evaluation (with the recipe's test-time
  augmentation). Skipped without the real data.

FLOPs of training: 3 × forward per image (benchmarks/flops.py); shares are of the fp32 matmul peak
at the same thread count (this CPU has no bf16 matrix units, so fp32 is the fair yardstick).
With benchmarking disabled every case runs once on tiny synthetic data.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.common import (ROOT, THREADS_ALL, Scale, median_seconds, pinned_threads, real_data_dir,
                               record_throughput, steady_images_per_s, time_call)
from benchmarks.flops import TRAINING_FACTOR
from benchmarks.model_rows import MEMORY_FORMATS, MODEL_ROWS, TRAINED_MODEL
from toolkit.training.config import RECIPES, DataConfig, OptimConfig
from toolkit.training.data import Split, load_splits, make_loader, make_synthetic, normalize, write_imagefolder
from toolkit.training.metrics import read_metrics
from toolkit.training.models import build_model
from toolkit.training.optim import build_optimizer
from toolkit.training.train import train_step

PRECISIONS = {"fp32": "no", "bf16": "bf16"}  # benchmark id -> --mixed-precision
EPOCH_BATCH = int(RECIPES["fast"].get("batch_size", 64))  # the tutorial's loader is measured at the same size
TUTORIAL_WORKERS = 2  # the tutorial's DataLoader(num_workers=2)
ACCURACY_THRESHOLDS = (0.40, 0.50, 0.55, 0.60, 0.65, 0.70, 0.80, 0.85, 0.90)
SPEEDNET_BENCH_EPOCHS = 2
RECIPE_BENCH_ARGS = {"fast": [], "seed": [], "speednet": ["--epochs", str(SPEEDNET_BENCH_EPOCHS)]}


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def accelerator_for():
    """precision -> a fresh single-process Accelerator, set up as the trainer sets up its own
    (`cpu=True` without a GPU, autocast for bf16).

    Accelerate keeps one process-wide state that refuses a second mixed-precision setting, so it
    is reset before each build and after the test.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    def build(precision: str) -> Accelerator:
        reset()
        return Accelerator(cpu=not torch.accelerator.is_available(), mixed_precision=PRECISIONS[precision])

    yield build
    reset()


class EpochData:
    """The same training images twice: an in-memory `Split` and a folder of image files."""

    def __init__(self, split: Split, folder: Path, index: torch.Tensor | None, source: str) -> None:
        self.split = split
        self.folder = folder  # ImageFolder root: <folder>/<class>/<image>
        self.index = index  # ImageFolder sample indices matching the split's images (None: all)
        self.source = source


@pytest.fixture(scope="session")
def epoch_data(scale: Scale, tmp_path_factory: pytest.TempPathFactory) -> EpochData:
    real = real_data_dir() if scale.full else None
    if real is not None:
        full = load_splits(DataConfig(data="imagefolder", data_dir=str(real), val_fraction=0.0)).train
        index = torch.linspace(0, len(full) - 1, scale.epoch_images).round().long()  # every class, evenly
        return EpochData(full.subset("train", index), real / "train", index,
                         f"real CIFAR-10 ({len(index)} of {len(full)} training images)")
    split, _ = make_synthetic(scale.epoch_images, 1)
    folder = tmp_path_factory.mktemp("bench-imagefolder")
    write_imagefolder(split, folder)
    return EpochData(split, folder, None, f"synthetic ({len(split)} images; PNG folder for the PIL loader)")


def _model_and_optimizer(accelerator, lr: float = 0.01, name: str = TRAINED_MODEL,
                         memory_format: torch.memory_format = torch.contiguous_format):
    torch.manual_seed(0)
    model = build_model(name, 10).to(memory_format=memory_format)
    optimizer = build_optimizer(model, OptimConfig(lr=lr, momentum=0.9))  # the trainer's fused SGD
    return accelerator.prepare(model, optimizer)


def _tutorial_loader(data: EpochData, batch: int):
    """The PyTorch CIFAR-10 tutorial's input pipeline, unchanged except for the batch size."""
    import torchvision.transforms as transforms
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    dataset = ImageFolder(str(data.folder), transform=transform)
    if data.index is not None:
        # Same images as the in-memory split: both list classes and files in sorted order.
        assert [dataset.targets[i] for i in data.index.tolist()] == data.split.labels.tolist()
        dataset = Subset(dataset, data.index.tolist())
    assert len(dataset) == len(data.split)
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=TUTORIAL_WORKERS)


def _epoch(model, loader, optimizer, loss_fn, accelerator) -> int:
    """One pass over `loader`, every batch through the trainer's `train_step`; returns images seen."""
    model.train()
    seen = 0
    for images, labels in loader:
        train_step(model, images, labels, optimizer, loss_fn, accelerator)
        seen += len(labels)
    return seen


# ---------------------------------------------------------------------------------------------
# Training step and epoch


# (model, batch, memory format) of every train_step row, each at every precision.
STEP_CASES = [(m, batch, layout) for m, rows in MODEL_ROWS.items() for batch, layout in rows.train]


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("model,batch,layout", STEP_CASES, ids=[f"{m}-b{b}-{l}" for m, b, l in STEP_CASES])
def test_train_step(benchmark, accelerator_for, scale: Scale, matmul_peak, model_flops, model: str, batch: int,
                    layout: str, precision: str) -> None:
    accelerator = accelerator_for(precision)
    memory_format = MEMORY_FORMATS[layout]
    model_net, optimizer = _model_and_optimizer(accelerator, name=model, memory_format=memory_format)
    batch = min(batch, scale.train_batch_cap or batch)
    split, _ = make_synthetic(max(batch, 10), 1)
    images = normalize(split.images[:batch]).contiguous(memory_format=memory_format)
    labels = split.labels[:batch]
    assert images.is_contiguous(memory_format=memory_format)
    loss_fn = nn.CrossEntropyLoss()
    flops = TRAINING_FACTOR * model_flops(model)
    rounds = MODEL_ROWS[model].train_rounds
    benchmark.group = f"training step {model}"
    benchmark.extra_info.update(kind="train_step", model=model, label=f"train_step {precision} {layout} batch {batch}",
                                precision=precision, memory_format=layout, batch=batch, threads=THREADS_ALL,
                                flops_per_image=flops)

    def step() -> torch.Tensor:
        return train_step(model_net, images, labels, optimizer, loss_fn, accelerator)

    with pinned_threads(THREADS_ALL):
        model_net.train()
        if rounds is None or benchmark.disabled:
            loss = time_call(benchmark, step, scale)
        else:  # a heavy model: a few whole steps, the first one (kernel creation, allocator growth) untimed
            benchmark.extra_info.update(rounds=rounds, iterations=1, warmup_rounds=1)
            loss = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss).item()
    median = median_seconds(benchmark)
    if median is not None:
        record_throughput(benchmark, batch, median, flops, matmul_peak(THREADS_ALL))


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("path", ["fast", "fast-aug", "pil"])
def test_epoch(benchmark, accelerator_for, epoch_data: EpochData, scale: Scale, matmul_peak,
               flops_per_image: int, path: str, precision: str) -> None:
    accelerator = accelerator_for(precision)
    model, optimizer = _model_and_optimizer(accelerator)
    if path == "pil":
        loader = _tutorial_loader(epoch_data, EPOCH_BATCH)
    else:
        loader = make_loader(epoch_data.split, EPOCH_BATCH, shuffle=True, augment=path == "fast-aug")
    loader = accelerator.prepare(loader)
    loss_fn = nn.CrossEntropyLoss()
    n = len(epoch_data.split)
    benchmark.group = "training epoch"
    benchmark.extra_info.update(
        kind="epoch", model=TRAINED_MODEL, label=f"epoch {path} {precision} batch {EPOCH_BATCH}", path=path,
        precision=precision, batch=EPOCH_BATCH, threads=THREADS_ALL, images=n, data=epoch_data.source,
        loader=("ImageFolder+ToTensor+Normalize, DataLoader num_workers=2" if path == "pil" else
                "toolkit.training.data.make_loader (in memory)" + (", crop+flip" if path == "fast-aug" else "")),
        flops_per_image=TRAINING_FACTOR * flops_per_image)
    with pinned_threads(THREADS_ALL):
        # Warm-up steps on one batch: oneDNN kernel creation and allocator growth are not an epoch's cost.
        images, labels = next(iter(make_loader(epoch_data.split, EPOCH_BATCH, shuffle=False)))
        for _ in range(3):
            train_step(model, images, labels, optimizer, loss_fn, accelerator)
        rounds = scale.epoch_rounds  # (disabled: one plain call)
        seen = benchmark.pedantic(_epoch, args=(model, loader, optimizer, loss_fn, accelerator), rounds=rounds)
    assert seen == n
    median = median_seconds(benchmark)
    if median is not None:
        benchmark.extra_info["rounds"] = rounds
        record_throughput(benchmark, n, median, TRAINING_FACTOR * flops_per_image, matmul_peak(THREADS_ALL))


# ---------------------------------------------------------------------------------------------
# The real CLI: 1 vs 2 processes, and time-to-accuracy


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, args: list[str], threads: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / config),
           "--main_process_port", str(_free_port()), "-m", "toolkit", "train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads), "ACCELERATE_USE_CPU": "1"})
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                    f"stderr:\n{proc.stderr[-3000:]}", pytrace=False)
    return proc


def _cli_data_args(scale: Scale, train_images: int) -> list[str]:
    """Real data in full mode when present; else synthetic with `train_images` training images."""
    real = real_data_dir() if scale.full else None
    if real is not None:
        return ["--data", "imagefolder", "--data-dir", str(real)]
    return ["--data", "synthetic", "--synthetic-train-size", str(train_images), "--synthetic-test-size", "100",
            "--val-fraction", "0"]


@pytest.mark.parametrize("processes", [1, 2], ids=lambda p: f"{p}proc")
def test_launch(benchmark, scale: Scale, matmul_peak, flops_per_image: int,
                tmp_path: Path, processes: int) -> None:
    global_batch = EPOCH_BATCH
    threads = max(1, THREADS_ALL // processes)  # processes × threads = all cores
    config = "single.yaml" if processes == 1 else "cpu-2proc.yaml"
    steps = scale.launch_steps
    data_args = _cli_data_args(scale, global_batch * (steps + 10))
    args = [*data_args, "--recipe", "fast",
            "--batch-size", str(global_batch // processes), "--max-steps", str(steps),
            "--log-every", str(scale.launch_log_every), "--threads", str(threads),
            "--expect-processes", str(processes), "--output-dir", str(tmp_path / "run")]
    benchmark.group = "training launch"
    benchmark.extra_info.update(kind="launch", model=TRAINED_MODEL,
                                label=f"accelerate launch {processes} process(es) × {threads} thread(s)",
                                processes=processes, threads=threads, batch=global_batch // processes,
                                global_batch=global_batch, steps=steps, launch_config=f"launch/{config}",
                                data=data_args[1], flops_per_image=TRAINING_FACTOR * flops_per_image)
    benchmark.pedantic(_launch, args=(config, args, threads), rounds=1, iterations=1)
    images_per_s, windows = steady_images_per_s(read_metrics(tmp_path / "run"))
    gflops = images_per_s * TRAINING_FACTOR * flops_per_image / 1e9
    peak = matmul_peak(THREADS_ALL) if benchmark.enabled else None
    benchmark.extra_info.update(images_per_s=images_per_s, windows=windows, achieved_gflops=gflops)
    if peak:
        benchmark.extra_info.update(matmul_peak_gflops=peak, share_of_matmul_peak=gflops / peak)


def time_to_accuracy(records: list[dict], thresholds=ACCURACY_THRESHOLDS) -> dict[str, float | None]:
    """Training seconds at the end of the first epoch whose val accuracy reached each threshold."""
    epochs = [r for r in records if r.get("kind") == "epoch" and r.get("val_accuracy") is not None]
    return {f"{t:.2f}": next((r["train_seconds"] for r in epochs if r["val_accuracy"] >= t), None)
            for t in thresholds}


def test_time_to_accuracy_helper() -> None:
    records = [{"kind": "step", "images_per_s": 1.0},
               {"kind": "epoch", "epoch": 1, "train_seconds": 10.0, "val_accuracy": 0.45},
               {"kind": "epoch", "epoch": 2, "train_seconds": 20.0, "val_accuracy": 0.58}]
    out = time_to_accuracy(records, (0.4, 0.5, 0.6))
    assert out == {"0.40": 10.0, "0.50": 20.0, "0.60": None}


@pytest.mark.parametrize("recipe", list(RECIPE_BENCH_ARGS))
def test_time_to_accuracy(benchmark, scale: Scale, tmp_path: Path, recipe: str) -> None:
    import json

    real = real_data_dir()
    if scale.full:
        if real is None:
            pytest.skip("time-to-accuracy needs the shared real CIFAR-10 split (set TOOLKIT_BENCH_DATA; "
                        "expected DIR/train/<class>/*.jpg)")
        args = ["--data", "imagefolder", "--data-dir", str(real), *RECIPE_BENCH_ARGS[recipe]]
        data = "real"
    else:  # tiny smoke run of the same code on synthetic data
        args = ["--data", "synthetic", "--synthetic-train-size", "300", "--synthetic-test-size", "50",
                "--val-fraction", "0.2", "--cache-dir", str(tmp_path / "cache"),
                "--epochs", "1" if recipe == "seed" else "2"]
        data = "synthetic"
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "toolkit", "train", "--recipe", recipe, *args, "--threads", str(THREADS_ALL),
           "--output-dir", str(run)]

    def train() -> None:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "OMP_NUM_THREADS": str(THREADS_ALL)})
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-3000:]}", pytrace=False)

    benchmark.group = "time to accuracy"
    start = time.perf_counter()
    benchmark.pedantic(train, rounds=1, iterations=1)
    wall = time.perf_counter() - start
    records = read_metrics(run)
    epochs = [r for r in records if r.get("kind") == "epoch"]
    assert epochs, "no epoch record in metrics.jsonl"
    final = json.loads((run / "eval.json").read_text())
    config = json.loads((run / "config.json").read_text())
    benchmark.extra_info.update(
        kind="time_to_accuracy", model=config.get("model", TRAINED_MODEL),
        label=" ".join(["toolkit train --recipe", recipe, *RECIPE_BENCH_ARGS[recipe]]), recipe=recipe, data=data,
        threads=THREADS_ALL, epochs=len(epochs), batch=config.get("batch_size"),
        train_seconds=epochs[-1]["train_seconds"], wall_seconds=wall,
        final_val_accuracy=epochs[-1]["val_accuracy"], eval_accuracy=final.get("accuracy"),
        eval_split=final.get("split"),
        curve=[[r["epoch"], r["train_seconds"], r["val_accuracy"]] for r in epochs],
        time_to_accuracy=time_to_accuracy(records))
    images = config.get("runtime", {}).get("data", {}).get("train")
    if images:
        benchmark.extra_info["images_per_s"] = images * len(epochs) / max(epochs[-1]["train_seconds"], 1e-9)
