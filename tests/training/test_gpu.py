"""The training path on a CUDA GPU (marked `gpu`, skipped without one): the same code as on the CPU,
checked where only a GPU can tell: batches cut on the device equal the CPU's, the steady-state step
never waits for the device, resumes are bit-exact with --deterministic, fp16 resumes keep their loss
scale, and --compile (CUDA graphs) trains."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from tests.helpers import TINY, assert_ok, load_json, run_cli, weights
from toolkit.training.checkpoint import SCALER_FILE, list_checkpoints
from toolkit.training.config import OptimConfig
from toolkit.training.data import make_loader, make_synthetic
from toolkit.training.metrics import MetricLogger
from toolkit.training.models import build_model
from toolkit.training.optim import build_optimizer
from toolkit.training.train import StepFlags, train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

# On the GPU: the same tiny synthetic run as the CPU tests, but not forced onto the CPU.
GPU_TINY = [a for a in TINY if a not in ("--threads", "1")]


def test_batches_cut_on_the_gpu_equal_the_cpu_batches() -> None:
    split, _ = make_synthetic(300, 1)
    cpu = make_loader(split, 64, shuffle=True, augment=True, seed=3)
    gpu = make_loader(split, 64, shuffle=True, augment=True, seed=3, device="cuda")
    for loader in (cpu, gpu):
        loader.sampler.set_epoch(2)
        loader.dataset.set_epoch(2)
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.device.type == "cuda"
        assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_the_steady_state_step_never_waits_for_the_gpu(fresh_accelerate, tmp_path, precision: str) -> None:
    """torch raises on any synchronizing CUDA call in "error" sync-debug mode: data, step, skip check,
    flags and loss bookkeeping must get through without one."""
    accelerator = Accelerator(mixed_precision=precision)
    model = build_model("tutorial", 10)
    optimizer = build_optimizer(model, OptimConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4))
    split, _ = make_synthetic(2048, 1)
    loader = make_loader(split, 256, shuffle=True, augment=True, device=accelerator.device)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    logger = MetricLogger(accelerator, tmp_path / "metrics.jsonl", None, 0, 10_000, 1, 10_000, True)
    flags = StepFlags(accelerator.device, 0)
    batches = iter(loader)
    images, labels = next(batches)
    train_step(model, images, labels, optimizer, nn.CrossEntropyLoss(), accelerator)  # warm-up: lazy init syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, (images, labels) in enumerate(batches):
            loss = train_step(model, images, labels, optimizer, nn.CrossEntropyLoss(), accelerator)
            flags.record(loss, step % 8)
            logger.batch(loss, torch.isfinite(loss), len(labels))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert flags.read(accelerator, False, 8) == ([], False)


def _train(run, *args: str):
    return run_cli("train", *GPU_TINY, "--epochs", "2", "--batch-size", "32", "--lr", "0.1", "--augment",
                   "--checkpoint-every", "5", "--keep-checkpoints", "10", "--output-dir", str(run), *args)


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_resume_is_bit_exact_with_deterministic(tmp_path, precision: str) -> None:
    common = ["--deterministic", "--mixed-precision", precision]
    full = tmp_path / "full"
    assert_ok(_train(full, *common))
    assert load_json(full / "config.json")["runtime"]["device"].startswith("cuda")
    checkpoint = list_checkpoints(full / "checkpoints")[1]  # mid-epoch
    if precision == "fp16":
        assert (checkpoint / SCALER_FILE).is_file()  # the loss scale travels with the checkpoint
    fork = tmp_path / "fork"
    assert_ok(_train(fork, *common, "--resume", str(checkpoint)))
    a, b = weights(full / "model.safetensors"), weights(fork / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), precision


def test_compile_with_cuda_graphs_trains(tmp_path) -> None:
    run = tmp_path / "run"
    assert_ok(run_cli("train", *GPU_TINY, "--epochs", "2", "--batch-size", "50", "--lr", "0.1", "--compile",
                      "--output-dir", str(run), timeout=900))
    config = load_json(run / "config.json")
    assert config["runtime"]["compile_mode"] == "reduce-overhead"
    assert load_json(run / "eval.json")["accuracy"] > 0.5
