"""The optimizer (SGD with momentum, as in the tutorial) and its learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from toolkit.training.config import OptimConfig


class LRSchedule:
    """Learning-rate multiplier as a function of the optimizer step (picklable, for LambdaLR).

    onecycle: linear warm-up from 1/25 to 1, then linear decay to 0 at `total_steps`;
    cosine:   linear warm-up from 1/25 to 1, then cosine decay to 0; none: constant 1.
    """

    def __init__(self, kind: str, total_steps: int, warmup_fraction: float) -> None:
        self.kind = kind
        self.total_steps = max(total_steps, 1)
        self.warmup_steps = int(warmup_fraction * total_steps)

    def __call__(self, step: int) -> float:
        if self.kind == "none":
            return 1.0
        if step < self.warmup_steps:
            return 1 / 25 + (1 - 1 / 25) * step / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        if self.kind == "onecycle":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """SGD, fused: one kernel per step on CPU and GPU, and able to skip a step on the device when told
    `found_inf` (see `toolkit.training.train.train_step`).

    The momentum buffers start as zeros rather than being created at the first step: the update is
    identical (0 · momentum + gradient = gradient), and a first step skipped on the device cannot
    leave them uninitialized (the fused kernel allocates them with `empty_like` before it skips).
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay, fused=True)
    if cfg.momentum:
        for p in model.parameters():
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """Stepped once per optimizer step, on the unwrapped optimizer: the LR is a function of the step
    alone (a scheduler passed through `accelerator.prepare` would step num_processes times per call)."""
    return LambdaLR(optimizer, LRSchedule(cfg.schedule, total_steps, cfg.warmup_fraction))


def fit_schedule(scheduler: LambdaLR, cfg: OptimConfig, total_steps: int) -> int:
    """After a resume: make `scheduler` follow `cfg`'s schedule over `total_steps` optimizer steps, from the step
    it stands at; return the length (optimizer steps) of the schedule the checkpoint held.

    A restored LambdaLR runs the checkpoint's schedule (its state holds the LRSchedule's fields): a run made longer
    with --epochs would reach LR 0 at the old end and stay there. The schedule is rebuilt as if the run had started
    with `total_steps`, and the current step's LR recomputed from it: with onecycle or cosine the LR moves from the
    old schedule's value to the new one's at this step (back up, when the run is longer; warm-up is a fraction of the
    new length). With the checkpoint's length nothing changes, to the bit.
    """
    before = scheduler.lr_lambdas[0].total_steps
    scheduler.lr_lambdas = [LRSchedule(cfg.schedule, total_steps, cfg.warmup_fraction) for _ in scheduler.lr_lambdas]
    scheduler.last_epoch -= 1
    scheduler.step()  # the LR of step `last_epoch` again, from the new schedule
    return before
