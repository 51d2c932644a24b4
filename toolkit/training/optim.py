"""The optimizer (SGD with momentum, as in the tutorial, or Muon for convolution filters), its parameter groups,
its learning-rate schedule, and Lookahead weights."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.sgd import sgd

from toolkit.training.config import OptimConfig


class LRSchedule:
    """Learning-rate multiplier as a function of the optimizer step (picklable, for LambdaLR).

    onecycle: linear warm-up from `start` to 1, then linear decay to `end` at `total_steps`;
    cosine:   linear warm-up from `start` to 1, then cosine decay to `end`; none: constant 1.
    """

    def __init__(self, kind: str, total_steps: int, warmup_fraction: float, start: float = 1 / 25,
                 end: float = 0.0) -> None:
        self.kind = kind
        self.total_steps = max(total_steps, 1)
        self.warmup_steps = int(warmup_fraction * total_steps)
        self.start, self.end = start, end

    def __call__(self, step: int) -> float:
        if self.kind == "none":
            return 1.0
        if step < self.warmup_steps:
            return self.start + (1 - self.start) * step / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        decay = 1.0 - progress if self.kind == "onecycle" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.end + (1.0 - self.end) * decay

    @classmethod
    def of(cls, cfg: OptimConfig, total_steps: int) -> LRSchedule:
        return cls(cfg.schedule, total_steps, cfg.warmup_fraction, cfg.lr_start, cfg.lr_end)


# Layers whose parameters are a normalization's scale and shift (`OptimConfig.norm_lr_scale`).
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """The trainable parameters in groups: all but the normalization layers' (at `lr`: the LR the logs show), then
    the normalization layers' (LR × `norm_lr_scale`), then, with `--optimizer muon`, the convolution filters (every
    trainable parameter of 4 or more dimensions, at `muon_lr`, marked `orthogonalize`).

    With `decoupled_weight_decay`, a group's decay coefficient is `weight_decay / its LR`: SGD multiplies it by the
    group's scheduled LR, so every weight shrinks by `weight_decay` × the schedule's multiplier per step, whatever
    its group's LR. Otherwise it is the L2 coefficient `weight_decay` for every group. Muon's filters take no decay:
    their norm is held fixed (`Muon`)."""
    norm = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    filters = [p for p in trainable if p.dim() >= 4] if cfg.optimizer == "muon" else []  # norms' are 1-D
    muon = {id(p) for p in filters}
    groups = []
    for params, lr in (([p for p in trainable if id(p) not in norm and id(p) not in muon], cfg.lr),
                       ([p for p in trainable if id(p) in norm], cfg.lr * cfg.norm_lr_scale)):
        if params:
            decay = cfg.weight_decay / lr if cfg.decoupled_weight_decay else cfg.weight_decay
            groups.append({"params": params, "lr": lr, "weight_decay": decay})
    if filters:
        groups.append({"params": filters, "lr": cfg.muon_lr, "momentum": cfg.muon_momentum, "weight_decay": 0.0,
                       "orthogonalize": True})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (or `Muon`, which steps its non-filter groups as SGD), fused: one kernel per step on CPU and GPU, and
    able to skip a step on the device when told `found_inf` (see `toolkit.training.train.train_step`).

    The momentum buffers start as zeros rather than being created at the first step: the update is
    identical (0 · momentum + gradient = gradient), and a first step skipped on the device cannot
    leave them uninitialized (the fused kernel allocates them with `empty_like` before it skips).
    """
    kind = Muon if cfg.optimizer == "muon" else torch.optim.SGD
    optimizer = kind(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                     weight_decay=cfg.weight_decay, fused=True)
    for group in optimizer.param_groups:
        if group["momentum"] or group.get("orthogonalize"):
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return optimizer


# Coefficients of the quintic Newton–Schulz iteration of Muon (Keller Jordan, 2024): x -> a·x + b·(x xᵀ)x +
# c·(x xᵀ)²x maps a singular value s to a·s + b·s³ + c·s⁵, chosen for the steepest rise from 0, so that 3
# iterations take every singular value of a normalized matrix into about [0.5, 1.5] (not exactly 1: that needs
# more iterations and trains no better).
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 3


def orthogonalize(matrix: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """`matrix` (rows × columns) with its singular vectors kept and its singular values moved to about 1
    (U S Vᵀ -> U S' Vᵀ, S' in [0.5, 1.5]): the direction of a step without the few directions that dominate it.
    Computed in bf16 (the iteration is stable in it, and tensor cores and AMX/AVX-512 BF16 run it fastest)."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.bfloat16()
    x = x / (x.norm() + 1e-7)  # every singular value ≤ 1: inside the iteration's basin
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # the Gram matrix of the short side is the cheaper one
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked `orthogonalize`, SGD for the others, in one optimizer (one state, one schedule,
    one checkpoint).

    A Muon group's step, per filter bank W (out × in·kh·kw): momentum (Nesterov if asked) on the gradient, that
    update orthogonalized (`orthogonalize`), W rescaled to Frobenius norm √out, then W -= lr × the update. A filter
    bank followed by a normalization layer computes the same function at any scale, so fixing its norm leaves the
    LR alone to set the step's size relative to the weights (airbench94_muon's form; no weight decay is needed).
    The other groups step exactly as torch's SGD (its functional form, fused).

    `found_inf` (a device scalar, set before `step` as for fused SGD) skips the whole step on the device when it is
    non-zero: no weight or momentum changes, and no host read.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 fused: bool = True) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                                  "orthogonalize": False})
        self.fused = fused

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # no closure: one forward and backward per step
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            if not group["orthogonalize"]:
                sgd(params, [p.grad for p in params], buffers, fused=self.fused, found_inf=found_inf,
                    weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"], dampening=0.0,
                    nesterov=group["nesterov"], maximize=False)
                continue
            for p, buffer in zip(params, buffers):
                momentum = buffer * group["momentum"] + p.grad
                update = p.grad + group["momentum"] * momentum if group["nesterov"] else momentum
                weight = p * (p.size(0) ** 0.5 / p.norm())
                weight -= group["lr"] * orthogonalize(update.flatten(1)).view_as(p)
                if found_inf is not None:  # keep the old values where the gradients were not finite
                    momentum = torch.where(found_inf > 0, buffer, momentum)
                    weight = torch.where(found_inf > 0, p, weight)
                buffer.copy_(momentum)
                p.copy_(weight)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """Stepped once per optimizer step, on the unwrapped optimizer: the LR is a function of the step
    alone (a scheduler passed through `accelerator.prepare` would step num_processes times per call)."""
    return LambdaLR(optimizer, LRSchedule.of(cfg, total_steps))


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
    scheduler.lr_lambdas = [LRSchedule.of(cfg, total_steps) for _ in scheduler.lr_lambdas]
    scheduler.last_epoch -= 1
    scheduler.step()  # the LR of step `last_epoch` again, from the new schedule
    return before


class Lookahead:
    """A slow copy of the model's floating-point state (weights and BatchNorm statistics) that the weights are
    pulled back to (`OptimConfig.lookahead_every`, `lookahead_decay`; airbench's Lookahead-style EMA).

    Every `every` optimizer steps the copy moves towards the weights, keeping `decay^every · (step / total)^3`
    of itself, and the weights are set to the copy; at the last step the weights become the copy. The ramp keeps
    the copy out of the way early, when the weights move fast, and makes it an average late, when they jitter
    around a minimum. All on the device: no host reads.
    """

    def __init__(self, model: nn.Module, every: int, decay: float) -> None:
        self.every, self.decay = every, decay
        state = model.state_dict()
        self.names = [k for k, v in state.items() if v.is_floating_point()]
        self.current = [state[k] for k in self.names]  # the model's own tensors, updated in place
        self.copy = [v.detach().clone() for v in self.current]

    @torch.no_grad()
    def step(self, global_step: int, total_steps: int) -> None:
        """After optimizer step `global_step` of `total_steps`."""
        if global_step % self.every == 0:
            kept = self.decay ** self.every * min(global_step / total_steps, 1.0) ** 3
            torch._foreach_lerp_(self.copy, self.current, 1.0 - kept)
            torch._foreach_copy_(self.current, self.copy)
        if global_step >= total_steps:
            torch._foreach_copy_(self.current, self.copy)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.copy))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if sorted(state) != sorted(self.names):
            raise ValueError(f"Lookahead copy holds {sorted(state)}, the model {sorted(self.names)}")
        with torch.no_grad():
            torch._foreach_copy_(self.copy, [state[k] for k in self.names])