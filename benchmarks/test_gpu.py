"""Benchmarks on a CUDA GPU (those cases are marked `gpu`), and the same cases on the CPU as checks of the
same code paths: there only the smallest batch, run once with timings off (`make test`, so CI runs every
line) or timed at tiny size (`python -m benchmarks.gpu_check --quick`); at full size (`make bench`) the CPU
cases skip, the CPU's figures being test_inference.py's and test_training.py's.

- `test_gpu_onnxruntime[device-provider-format-batch-io]`: ONNX Runtime through
  `toolkit.artifacts.backends.load_backend(provider=...)` (the same code as `--provider cuda|tensorrt`; on
  the CPU, `cpu`), for every ONNX format of the registry (fp32, fp16, int8), batch 1, 64 and 1024. io `host`:
  `predict_logits` with host numpy in and out, as `toolkit predict` uses it; io `device`: IO binding
  (`OnnxRuntimeBackend.bind`), input and output kept on the device, so the time is the device's alone.
  Outputs checked against eager on the CPU first. Skipped, with the reason, when this onnxruntime build
  lacks the provider or it cannot start (install: README "GPU").
- `test_gpu_train_step[device-precision-batch]`: `toolkit.training.train.train_step` on the device, fp32 vs
  bf16 and (GPU only) fp16 with loss scaling, batch 64 and 1024, data already on the device; every round
  ends with the device's `synchronize()` so the time is the device's, not the launch queue's.
- `test_gpu_torch[device-format-batch]`: the eager model and the TorchScript file moved to the device
  (`toolkit.artifacts.backends` runs torch formats on the CPU by design, so these load the same files
  directly), fp32, host batch copied in and logits copied out, as a server would.

Rounds are calibrated to about 1 s per case, as on the CPU.
"""

from __future__ import annotations

import functools
import platform

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.common import THREADS_ALL, Scale, check_against_eager, median_seconds, record_throughput, time_call
from benchmarks.flops import TRAINING_FACTOR
from tests.helpers import DEVICE_NAMES, on_device
from toolkit.artifacts import formats
from toolkit.artifacts.backends import Backend, load_backend
from toolkit.core.errors import ConfigError
from toolkit.training.accelerator import PRECISIONS_ON


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()


def _batches(device: str, batches: tuple[int, ...]) -> tuple[int, ...]:
    """Every batch on the GPU; on the CPU, whose cases check code paths rather than give figures, the smallest."""
    return batches if device == "cuda" else batches[:1]


_ORT_PROVIDERS = {"cpu": ("cpu",), "cuda": ("cuda", "tensorrt")}  # where ONNX Runtime runs on each device
_ORT_CASES = [on_device(device, provider, f.name, batch, io) for device in DEVICE_NAMES
              for provider in _ORT_PROVIDERS[device] for f in formats.FORMATS if f.runtime == "onnxruntime"
              for batch in _batches(device, (1, 64, 1024)) for io in ("host", "device")]
_ort_backends: dict[tuple[str, str], Backend] = {}


def _ort_backend(export_dir, provider: str, fmt: str) -> Backend:
    """One backend per (provider, format) for the session; skip when this machine cannot run the provider."""
    if (provider, fmt) not in _ort_backends:
        try:
            _ort_backends[provider, fmt] = load_backend(export_dir / formats.get(fmt).file, provider=provider)
        except ConfigError as exc:  # no such provider in this onnxruntime build, or it failed to start
            pytest.skip(str(exc))
    return _ort_backends[provider, fmt]


@pytest.mark.parametrize("device,provider,fmt,batch,io", _ORT_CASES, indirect=["device"])
def test_gpu_onnxruntime(benchmark, trained, inputs, scale: Scale, flops_per_image: int, device: str, provider: str,
                         fmt: str, batch: int, io: str) -> None:
    backend = _ort_backend(trained.export, provider, fmt)
    check_against_eager(fmt, backend.predict_logits(inputs.images), inputs.eager_logits, gpu=device == "cuda")
    x = np.ascontiguousarray(inputs.images[:batch])
    bound = backend.bind(x)
    bound.run()
    np.testing.assert_allclose(bound.logits(), backend.predict_logits(x), atol=1e-3, rtol=1e-3)
    call = bound.run if io == "device" else functools.partial(backend.predict_logits, x)
    benchmark.group = f"{device} inference batch {batch}"
    suffix = "" if device == "cpu" else f"-{provider}"  # the CPU's rows are named as test_inference.py names them
    benchmark.extra_info.update(kind="inference", backend=f"{fmt}{suffix}" + ("-device" if io == "device" else ""),
                                batch=batch, threads="gpu" if device == "cuda" else "default",
                                device=_device_name(device), provider=provider, io=io, flops_per_image=flops_per_image)
    time_call(benchmark, call, scale)
    median = median_seconds(benchmark)
    if median is not None:
        record_throughput(benchmark, batch, median, flops_per_image, None)


@pytest.mark.parametrize("device,fmt,batch", [on_device(device, fmt, batch) for device in DEVICE_NAMES
                                              for fmt in ("eager", "torchscript")
                                              for batch in _batches(device, (1, 64, 1024))], indirect=["device"])
def test_gpu_torch(benchmark, trained, inputs, scale: Scale, flops_per_image: int, device: str, fmt: str,
                   batch: int) -> None:
    from toolkit.training.runs import load_model

    if fmt == "eager":
        module = load_model(trained.export / "model.safetensors").model.to(device)
    else:
        module = torch.jit.load(str(trained.export / "model.ts"), map_location=device).eval()
    x = torch.from_numpy(np.ascontiguousarray(inputs.images[:batch]))

    def infer() -> np.ndarray:
        with torch.inference_mode():
            return module(x.to(device)).cpu().numpy()  # .cpu() waits for the device

    np.testing.assert_allclose(infer(), inputs.eager_logits[:batch], atol=1e-3, rtol=1e-3)
    benchmark.group = f"{device} inference batch {batch}"
    benchmark.extra_info.update(kind="inference", backend=fmt if device == "cpu" else f"{fmt}-cuda", batch=batch,
                                threads="gpu" if device == "cuda" else THREADS_ALL, device=_device_name(device),
                                flops_per_image=flops_per_image)
    time_call(benchmark, infer, scale)
    median = median_seconds(benchmark)
    if median is not None:
        record_throughput(benchmark, batch, median, flops_per_image, None)


@pytest.mark.parametrize("device,precision,batch", [on_device(device, precision, batch) for device in DEVICE_NAMES
                                                    for precision in PRECISIONS_ON[device]
                                                    for batch in _batches(device, (64, 1024))], indirect=["device"])
def test_gpu_train_step(benchmark, scale: Scale, flops_per_image: int, device: str, precision: str,
                        batch: int) -> None:
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
        accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision)
        torch.manual_seed(0)
        model = build_model("tutorial", 10)
        optimizer = build_optimizer(model, OptimConfig(lr=0.01, momentum=0.9))  # the trainer's fused SGD
        model, optimizer = accelerator.prepare(model, optimizer)
        images = torch.randn(batch, 3, 32, 32, device=accelerator.device)
        labels = torch.randint(0, 10, (batch,), device=accelerator.device)
        loss_fn = nn.CrossEntropyLoss()
        synchronize = torch.get_device_module(device).synchronize

        def step() -> None:
            train_step(model, images, labels, optimizer, loss_fn, accelerator)
            synchronize()

        shown = "fp32" if precision == "no" else precision
        benchmark.group = f"{device} training step"
        benchmark.extra_info.update(kind="train_step", label=f"{device} train_step {shown} batch {batch}",
                                    precision=shown, batch=batch, threads="gpu" if device == "cuda" else THREADS_ALL,
                                    device=_device_name(device), flops_per_image=TRAINING_FACTOR * flops_per_image)
        time_call(benchmark, step, scale)
        median = median_seconds(benchmark)
        if median is not None:
            record_throughput(benchmark, batch, median, TRAINING_FACTOR * flops_per_image, None)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
