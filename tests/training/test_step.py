"""The training step without host reads: a non-finite step changes nothing, on the device; the step
flags are read in batches; --compile trains the same model."""

from __future__ import annotations

import math

import torch
from torch import nn

from tests.helpers import TINY, assert_ok, load_json, run_cli, weights
from toolkit.training.config import OptimConfig
from toolkit.training.models import build_model
from toolkit.training.optim import build_optimizer
from toolkit.training.train import CHECK_EVERY, StepFlags, train_step


def _state(model: nn.Module, optimizer) -> list[torch.Tensor]:
    """Every number the step may change: weights and momentum buffers."""
    inner = optimizer.optimizer
    return [t.detach().clone() for p in model.parameters() for t in (p, inner.state[p]["momentum_buffer"])]


def test_a_non_finite_step_changes_no_weight_and_no_momentum(accelerator) -> None:
    torch.manual_seed(0)
    model = build_model("tutorial", 10)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))
    model, optimizer = accelerator.prepare(model, optimizer)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    loss_fn = nn.CrossEntropyLoss()

    # The very first step skipped: the momentum buffers must stay zero, not uninitialized memory.
    before = _state(model, optimizer)
    loss = train_step(model, torch.full_like(images, float("nan")), labels, optimizer, loss_fn, accelerator)
    assert not torch.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, _state(model, optimizer)))

    train_step(model, images, labels, optimizer, loss_fn, accelerator)
    after_good = _state(model, optimizer)
    assert not all(torch.equal(a, b) for a, b in zip(before, after_good))  # a finite step does update
    train_step(model, images * float("inf"), labels, optimizer, loss_fn, accelerator)
    assert all(torch.equal(a, b) for a, b in zip(after_good, _state(model, optimizer)))


def test_the_skip_matches_a_plain_sgd_step_when_finite(accelerator) -> None:
    """Zero-initialized momentum and the fused kernel give exactly torch's plain SGD update."""
    torch.manual_seed(0)
    ours, reference = build_model("tutorial", 10), build_model("tutorial", 10)
    reference.load_state_dict(ours.state_dict())
    optimizer = build_optimizer(ours, OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ours, optimizer = accelerator.prepare(ours, optimizer)
    for seed in range(3):
        images, labels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed)), torch.arange(8)
        train_step(ours, images, labels, optimizer, nn.CrossEntropyLoss(), accelerator)
        nn.CrossEntropyLoss()(reference(images), labels).backward()
        plain.step()
        plain.zero_grad()
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_step_flags_name_the_bad_steps_and_carry_the_stop_request(accelerator) -> None:
    flags = StepFlags(accelerator.device, first=100)
    for step in range(100, 100 + CHECK_EVERY):
        flags.record(torch.tensor(float("nan") if step in (103, 110) else 1.0), step)
        flags.record(torch.tensor(2.0), step)  # a second micro-batch of the same step keeps the mark
        assert flags.due(step + 1) == (step + 1 == 100 + CHECK_EVERY)
    assert flags.read(accelerator, stop_requested=False, global_step=100 + CHECK_EVERY) == ([104, 111], False)
    flags.record(torch.tensor(math.inf), 100 + CHECK_EVERY)
    assert flags.read(accelerator, stop_requested=True, global_step=101 + CHECK_EVERY) == ([101 + CHECK_EVERY], True)


def test_compile_trains_the_same_model_on_the_cpu(tmp_path) -> None:
    """--compile (inductor's C++ backend here) gives the eager run's weights to float rounding, is recorded
    in config.json, and the weights it saves load without torch.compile's module prefix."""
    args = [*TINY, "--epochs", "1", "--batch-size", "50", "--lr", "0.05"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert_ok(run_cli("train", *args, "--output-dir", str(eager)))
    assert_ok(run_cli("train", *args, "--compile", "--output-dir", str(compiled), timeout=600))
    config = load_json(compiled / "config.json")
    assert config["compile"] is True and config["runtime"]["compile_mode"] == "default"
    a, b = weights(eager / "model.safetensors"), weights(compiled / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
