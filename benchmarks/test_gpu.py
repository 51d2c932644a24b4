"""GPU benchmarks (marked `gpu`): skipped cleanly on a machine without CUDA.

- `test_gpu_onnxruntime[provider-format-batch-io]`: ONNX Runtime on the GPU through
  `toolkit.artifacts.backends.load_backend(provider=...)` (the same code as `--provider cuda|tensorrt`),
  for every ONNX format of the registry (fp32, fp16, int8), batch 1, 64 and 1024. io `host`:
  `predict_logits` with host numpy in and out, as `toolkit predict` uses it; io `device`: IO binding
  (`OnnxRuntimeBackend.bind`), input and output kept on the GPU, so the time is the GPU's alone.
  Outputs checked against eager on the CPU first. Skipped, with the reason, when this onnxruntime build
  lacks the provider or it cannot start (install: README "GPU").
- `test_gpu_train_step[precision-batch]`: `toolkit.training.train.train_step` on the GPU, fp32 vs bf16
  and fp16 (with loss scaling) autocast, batch 64 and 1024, data already on the device; every round ends with
  `torch.cuda.synchronize()` so the time is the GPU's, not the launch queue's.

- `test_gpu_torch[format-batch]`: the eager model and the TorchScript file moved to the GPU
  (`toolkit.artifacts.backends` runs torch formats on the CPU by design, so these load the same files
  directly), fp32, host batch copied in and logits copied out, as a server would.

Rounds are calibrated to about 1 s per case, as on the CPU.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.common import Scale, check_against_eager, median_seconds, record_throughput, time_call
from benchmarks.flops import TRAINING_FACTOR
from toolkit.artifacts import formats
from toolkit.artifacts.backends import Backend, load_backend
from toolkit.core.errors import ConfigError

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]


def _device_name() -> str:
    return torch.cuda.get_device_name(0)


_ORT_GPU = [(provider, f.name) for provider in ("cuda", "tensorrt") for f in formats.FORMATS
            if f.runtime == "onnxruntime"]
_ort_backends: dict[tuple[str, str], Backend] = {}


def _ort_backend(export_dir, provider: str, fmt: str) -> Backend:
    """One backend per (provider, format) for the session; skip when this machine cannot run the provider."""
    if (provider, fmt) not in _ort_backends:
        try:
            _ort_backends[provider, fmt] = load_backend(export_dir / formats.get(fmt).file, provider=provider)
        except ConfigError as exc:  # no such provider in this onnxruntime build, or it failed to start
            pytest.skip(str(exc))
    return _ort_backends[provider, fmt]


@pytest.mark.parametrize("io", ["host", "device"])
@pytest.mark.parametrize("batch", [1, 64, 1024], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("provider,fmt", _ORT_GPU, ids=[f"{p}-{f}" for p, f in _ORT_GPU])
def test_gpu_onnxruntime(benchmark, trained, inputs, scale: Scale, flops_per_image: int, provider: str, fmt: str,
                         batch: int, io: str) -> None:
    backend = _ort_backend(trained.export, provider, fmt)
    check_against_eager(fmt, backend.predict_logits(inputs.images), inputs.eager_logits, gpu=True)
    x = np.ascontiguousarray(inputs.images[:batch])
    bound = backend.bind(x)
    bound.run()
    np.testing.assert_allclose(bound.logits(), backend.predict_logits(x), atol=1e-3, rtol=1e-3)
    call = bound.run if io == "device" else functools.partial(backend.predict_logits, x)
    benchmark.group = f"gpu inference batch {batch}"
    benchmark.extra_info.update(kind="inference", backend=f"{fmt}-{provider}" + ("-device" if io == "device" else ""),
                                batch=batch, threads="gpu", device=_device_name(), provider=provider, io=io,
                                flops_per_image=flops_per_image)
    time_call(benchmark, call, scale)
    median = median_seconds(benchmark)
    if median is not None:
        record_throughput(benchmark, batch, median, flops_per_image, None)


@pytest.mark.parametrize("batch", [1, 64, 1024], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("fmt", ["eager", "torchscript"])
def test_gpu_torch(benchmark, trained, inputs, scale: Scale, flops_per_image: int, fmt: str, batch: int) -> None:
    from toolkit.training.runs import load_model

    if fmt == "eager":
        module = load_model(trained.export / "model.safetensors").model.cuda()
    else:
        module = torch.jit.load(str(trained.export / "model.ts"), map_location="cuda").eval()
    x = torch.from_numpy(np.ascontiguousarray(inputs.images[:batch]))

    def infer() -> np.ndarray:
        with torch.inference_mode():
            return module(x.cuda(non_blocking=False)).cpu().numpy()  # .cpu() synchronizes

    np.testing.assert_allclose(infer(), inputs.eager_logits[:batch], atol=1e-3, rtol=1e-3)
    benchmark.group = f"gpu inference batch {batch}"
    benchmark.extra_info.update(kind="inference", backend=f"{fmt}-cuda", batch=batch, threads="gpu",
                                device=_device_name(), flops_per_image=flops_per_image)
    time_call(benchmark, infer, scale)
    median = median_seconds(benchmark)
    if median is not None:
        record_throughput(benchmark, batch, median, flops_per_image, None)


@pytest.mark.parametrize("batch", [64, 1024], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_gpu_train_step(benchmark, scale: Scale, flops_per_image: int, precision: str, batch: int) -> None:
    from accelerate.state import AcceleratorState, GradientState

    from accelerate import Accelerator

    from toolkit.training.models import build_model
    from toolkit.training.config import OptimConfig
    from toolkit.training.optim import build_optimizer
    from toolkit.training.train import train_step

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        # fp16 gets Accelerate's dynamic loss scaling (GradScaler) inside backward/step.
        accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision)
        torch.manual_seed(0)
        model = build_model("tutorial", 10)
        optimizer = build_optimizer(model, OptimConfig(lr=0.01, momentum=0.9))  # the trainer's fused SGD
        model, optimizer = accelerator.prepare(model, optimizer)
        images = torch.randn(batch, 3, 32, 32, device=accelerator.device)
        labels = torch.randint(0, 10, (batch,), device=accelerator.device)
        loss_fn = nn.CrossEntropyLoss()

        def step() -> None:
            train_step(model, images, labels, optimizer, loss_fn, accelerator)
            torch.cuda.synchronize()

        benchmark.group = "gpu training step"
        benchmark.extra_info.update(kind="train_step", label=f"gpu train_step {precision} batch {batch}",
                                    precision=precision, batch=batch, threads="gpu", device=_device_name(),
                                    flops_per_image=TRAINING_FACTOR * flops_per_image)
        time_call(benchmark, step, scale)
        median = median_seconds(benchmark)
        if median is not None:
            record_throughput(benchmark, batch, median, TRAINING_FACTOR * flops_per_image, None)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
