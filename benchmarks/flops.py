"""Analytic floating-point operation counts, and the matmul throughput they are compared with.

Counting convention (the usual one for "FLOPs" of a network):
- a multiply-accumulate is 2 FLOPs;
- Conv2d: 2 · (Cin / groups) · Kh · Kw · Cout · Hout · Wout per image;
- Linear: 2 · in_features · out_features per image (per row of the input);
- biases, ReLU, max-pooling, flatten and the loss are NOT counted: for TutorialNet they add
  about 20 k operations per image against 1.30 M, i.e. under 2 %.

Training is counted as 3 × forward (the forward pass, plus the backward pass's gradients with
respect to activations and to weights, each about as costly as the forward), the usual estimate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

TRAINING_FACTOR = 3  # forward + backward (activation gradients + weight gradients)


@dataclass(frozen=True)
class LayerFlops:
    """One counted layer: its qualified name, kind, output shape (without batch) and FLOPs per image."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    flops: int


def layer_flops(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> list[LayerFlops]:
    """FLOPs per image of every Conv2d and Linear layer, in execution order.

    The formulas are analytic; one forward pass on a single zero image (under no_grad) is only used
    to learn each layer's output size, so any model built from these layers is handled.
    """
    rows: list[LayerFlops] = []
    names = {module: name for name, module in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        out = tuple(output.shape[1:])
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_output = 2 * (module.in_channels // module.groups) * kh * kw  # MACs per output value × 2
            flops = per_output * out[0] * out[1] * out[2]
            rows.append(LayerFlops(names[module], "conv2d", out, flops))
        elif isinstance(module, nn.Linear):
            rows_per_image = int(torch.tensor(out[:-1]).prod().item()) if len(out) > 1 else 1
            rows.append(LayerFlops(names[module], "linear", out,
                                   2 * module.in_features * module.out_features * rows_per_image))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return rows


def forward_flops(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> int:
    """Forward FLOPs per image (conv + linear layers only, see the module docstring)."""
    return sum(r.flops for r in layer_flops(model, input_shape))


def tutorialnet_flops() -> int:
    """Forward FLOPs per image of the toolkit's TutorialNet (1,303,440)."""
    from toolkit.training.models import build_model

    return forward_flops(build_model("tutorial", 10))


def matmul_gflops(threads: int, seconds: float = 0.5, n: int = 1024) -> float:
    """Measured fp32 matrix-multiply throughput (GFLOP/s) of `torch.mm` on n×n matrices at `threads`.

    2·n³ FLOPs per product; runs for about `seconds` after two warm-up products, and restores the
    previous torch thread count. This is the practical peak this machine reaches on dense fp32 work,
    the yardstick for each benchmark's `share_of_matmul_peak`.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        out = torch.empty(n, n)
        for _ in range(2):
            torch.mm(a, b, out=out)
        count, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        return 2 * n ** 3 * count / elapsed / 1e9
    finally:
        torch.set_num_threads(previous)
