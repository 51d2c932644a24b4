"""The device paths of training, on every device there is: the CPU, where CI runs every line, and a CUDA GPU
where there is one (those cases are marked `gpu`). Checked: batches cut on the device equal the CPU's, the
steady-state step reads nothing back to the host (on CUDA, where torch can tell, no synchronizing call at
all), resumes are bit-exact with --deterministic (fp16 ones, GPU only, keep their loss scale), and --compile
with gradient accumulation (CUDA graphs on a GPU) trains to the weights of the uncompiled run."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from tests.helpers import DEVICE_NAMES, DEVICES, TINY, assert_ok, device_env, devices, load_json, on_device, run_cli, \
    weights
from toolkit.training.accelerator import PRECISIONS_ON
from toolkit.training.checkpoint import SCALER_FILE, list_checkpoints
from toolkit.training.config import DataConfig, OptimConfig, TrainConfig
from toolkit.training.data import load_splits, make_loader, make_synthetic
from toolkit.training.metrics import MetricLogger, read_metrics
from toolkit.training.models import build_model
from toolkit.training.optim import build_optimizer
from toolkit.training.signals import GracefulStop
from toolkit.training.train import StepFlags, build_loop, train_one_epoch, train_step, warm_up


@pytest.mark.parametrize("device", DEVICES)
def test_batches_cut_on_the_device_equal_the_cpu_batches(device: str) -> None:
    split, _ = make_synthetic(300, 1)
    cpu = make_loader(split, 64, shuffle=True, augment=True, seed=3)
    there = make_loader(split, 64, shuffle=True, augment=True, seed=3, device=device)
    for loader in (cpu, there):
        loader.sampler.set_epoch(2)
        loader.dataset.set_epoch(2)
    batches = list(zip(cpu, there, strict=True))
    assert len(batches) == 5
    for (xc, yc), (xd, yd) in batches:
        assert xd.device.type == device
        assert torch.equal(xc, xd.cpu()) and torch.equal(yc, yd.cpu())


@contextlib.contextmanager
def _host_syncs_raise(device: str) -> Iterator[None]:
    """On CUDA, any synchronizing call in the block raises ("error" sync-debug mode); the CPU has no such mode."""
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device,precision", [on_device(d, p) for d in DEVICE_NAMES for p in PRECISIONS_ON[d]])
def test_the_steady_state_step_never_waits_for_the_device(fresh_accelerate, tmp_path, device: str,
                                                          precision: str) -> None:
    """Data, step, skip check, flags and loss bookkeeping run with no host read until the flags are read."""
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision)
    model = build_model("tutorial", 10)
    optimizer = build_optimizer(model, OptimConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4))
    batch = 256 if device == "cuda" else 32
    split, _ = make_synthetic(8 * batch, 1)
    loader = make_loader(split, batch, shuffle=True, augment=True, device=accelerator.device)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    logger = MetricLogger(accelerator, tmp_path / "metrics.jsonl", None, 0, 10_000, 1, 10_000, True)
    flags = StepFlags(accelerator.device, 0)
    batches = iter(loader)
    images, labels = next(batches)
    train_step(model, images, labels, optimizer, nn.CrossEntropyLoss(), accelerator)  # warm-up: lazy init syncs
    torch.get_device_module(device).synchronize()
    steps = 0
    with _host_syncs_raise(device):
        for steps, (images, labels) in enumerate(batches, 1):
            loss = train_step(model, images, labels, optimizer, nn.CrossEntropyLoss(), accelerator)
            flags.record(loss, steps % 8)
            logger.batch(loss, torch.isfinite(loss), len(labels))
    assert steps == 7
    assert flags.read(accelerator, False, 8) == ([], False)
    mean_loss = logger.epoch_loss()  # of the 7 logged batches: near ln(10) for 10 classes at the start
    assert logger.images == 7 * batch and 0 < mean_loss < 2 * math.log(10), mean_loss


def _train(run, device: str, *args: str):
    return run_cli("train", *TINY, "--epochs", "2", "--batch-size", "32", "--lr", "0.1", "--augment",
                   "--checkpoint-every", "5", "--keep-checkpoints", "10", "--output-dir", str(run), *args,
                   env=device_env(device))


@pytest.mark.parametrize("device,precision", [on_device(d, p) for d in DEVICE_NAMES for p in ("no", "fp16")
                                              if p in PRECISIONS_ON[d]])
def test_resume_is_bit_exact_with_deterministic(tmp_path, device: str, precision: str) -> None:
    common = ["--deterministic", "--mixed-precision", precision]
    full = tmp_path / "full"
    assert_ok(_train(full, device, *common))
    assert load_json(full / "config.json")["runtime"]["device"].startswith(device)
    checkpoint = list_checkpoints(full / "checkpoints")[1]  # step 10 of 13 in epoch 1
    assert (checkpoint / SCALER_FILE).is_file() == (precision == "fp16")  # the loss scale travels with it
    fork = tmp_path / "fork"
    assert_ok(_train(fork, device, *common, "--resume", str(checkpoint)))
    a, b = weights(full / "model.safetensors"), weights(fork / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), precision


@pytest.mark.parametrize("accum", [1, 2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_a_cuda_graph_step_begins_with_each_optimizer_step(fresh_accelerate, tmp_path, monkeypatch, device: str,
                                                           accum: int) -> None:
    """With CUDA graphs (--compile on a GPU) a new graph step may overwrite the previous one's outputs, the
    gradients autograd keeps as .grad among them: one begins with the first micro-batch of every optimizer
    step, never inside an accumulation window. The forward stays uncompiled here: what is checked is where
    the epoch loop begins graph steps (the test below trains with real CUDA graphs on a GPU)."""
    cfg = TrainConfig(epochs=1, batch_size=50, log_every=1000, quiet=True,
                      data=DataConfig(data="synthetic", synthetic_train_size=400, val_fraction=0),
                      optim=OptimConfig(grad_accum_steps=accum))
    accelerator = Accelerator(cpu=device == "cpu", gradient_accumulation_steps=accum)
    loop = build_loop(cfg, accelerator, tmp_path, load_splits(cfg.data))
    loop.compile_mode = "reduce-overhead"  # what build_loop chooses with --compile on a GPU
    begun: list[int] = []  # micro-batches (of the epoch) that began a graph step
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: begun.append(loop.state.batches_done))
    logger = MetricLogger(accelerator, tmp_path / "metrics.jsonl", None, 0, loop.total_steps, 1, 1000, True)
    train_one_epoch(loop, logger, GracefulStop())
    # 8 micro-batches; with accum 3 the last optimizer step, at the end of the epoch, has 2
    assert loop.state.batches_done == 8 and loop.state.global_step == math.ceil(8 / accum)
    assert begun == list(range(0, 8, accum))


@pytest.mark.parametrize("device", DEVICES)
def test_the_compile_warm_up_leaves_weights_statistics_rng_and_optimizer_as_they_were(fresh_accelerate, tmp_path,
                                                                                      device: str) -> None:
    """The warm-up runs training-mode passes (BatchNorm statistics move, dropout draws from the RNG) and
    computes gradients; the run must continue as if it had not happened. The forward stays uncompiled here:
    what is checked is what the warm-up restores (the slow test below compiles for real)."""
    cfg = TrainConfig(model="speednet", epochs=1, batch_size=32, log_every=1000, quiet=True, channels_last=True,
                      data=DataConfig(data="synthetic", synthetic_train_size=100, val_fraction=0))
    accelerator = Accelerator(cpu=device == "cpu")
    loop = build_loop(cfg, accelerator, tmp_path, load_splits(cfg.data))
    loop.compile_mode = "reduce-overhead" if device == "cuda" else "default"
    before = {k: v.clone() for k, v in loop.model.state_dict().items()}
    optimizer = {id(p): v["momentum_buffer"].clone() for p, v in loop.optimizer.optimizer.state.items()}
    rng = torch.get_rng_state()
    assert warm_up(loop) > 0
    after = loop.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any("running_mean" in k for k in before)  # the statistics a training-mode forward moves
    assert all(p.grad is None for p in loop.model.parameters())
    assert all(torch.equal(optimizer[id(p)], v["momentum_buffer"]) for p, v in loop.optimizer.optimizer.state.items())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("device", devices(pytest.mark.slow))  # the CPU compiles for about a minute
def test_compile_with_gradient_accumulation_trains_like_the_uncompiled_run(tmp_path, device: str) -> None:
    args = [*TINY, "--epochs", "2", "--batch-size", "50", "--grad-accum-steps", "2", "--lr", "0.1", "--augment"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert_ok(run_cli("train", *args, "--output-dir", str(eager), env=device_env(device)))
    assert_ok(run_cli("train", *args, "--compile", "--output-dir", str(compiled), env=device_env(device), timeout=900))
    runtime = load_json(compiled / "config.json")["runtime"]
    assert runtime["device"].startswith(device)
    assert [r["step"] for r in read_metrics(compiled) if r["kind"] == "compile"] == [0]  # warmed up before step 1
    assert runtime["compile_mode"] == ("reduce-overhead" if device == "cuda" else "default")
    a, b = weights(eager / "model.safetensors"), weights(compiled / "model.safetensors")
    # A micro-batch's gradients lost or overwritten move these weights by 1e-3 to 3e-2 within the first epoch
    # (simulated on the CPU); compiled and eager kernels, which round differently, differed by under 1e-8 there.
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3, msg=lambda m, k=k: f"{k}: {m}")
