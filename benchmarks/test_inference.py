"""Inference latency and throughput of every runtime on each built-in model, side by side.

What: `Backend.predict_logits(batch)` of `toolkit.artifacts.backends` (the same call `toolkit predict` and
`toolkit verify` make) for every format of the registry: eager PyTorch (.safetensors), TorchScript
(.ts), torch.export (.pt2) and ONNX Runtime (.onnx, and its fp16 and int8 variants). The timed call
includes the backend's input and output checks and the numpy <-> tensor hand-over, as a client sees it.

Models and rows (benchmarks/model_rows.py): the trained TutorialNet at batch 1, 64 and 1024, every format,
every thread setting below; speednet and ResNet-18, untrained (random initialization, seed 0), at batch 1
and 64, without pt2 and without ONNX Runtime's default-threads row, at least 3 timed rounds (not 5): they cost
180× and 850× the tutorial's FLOPs per image, and one ResNet-18 batch of 64 takes most of a second on 2 cores.

`test_session` times the raw `onnxruntime.InferenceSession.run` of the tutorial's fp32 session at batch 1,
without the interface around it (row `onnx-session`): the report states the interface's overhead as
`predict_logits` / `session.run` - 1 (target: at most 10 %).

Threads: torch formats at 1 and at all cores (`torch.set_num_threads`, process-wide); ONNX Runtime
with its default session options (intra-op threads chosen by ORT: one per physical core) and with
an explicit count, 1 and all cores (the backend then runs single-threaded sessions over slices of the
batch on that many threads; `toolkit.artifacts.onnx_runtime`). "all" is the machine's core count, or
`TOOLKIT_BENCH_THREADS`. Rows are compared with eager of the same model at the same batch and thread
count (ORT's default with eager at all cores).

Provider: ONNX Runtime rows run on `--provider` (default `cpu`; `pytest benchmarks --provider cuda`
runs them on the GPU, named `onnx-cuda`, ...). benchmarks/test_gpu.py has the GPU rows proper.

Inputs: 1024 normalized images of the held-out split the tutorial did not train on (real CIFAR-10
when present, else synthetic). Before a runtime is timed, its logits on the model's check images (all 1024
for the tutorial, the first 64 for the untrained models) are checked against eager's
(`benchmarks.common.check_against_eager`: the verify tolerance for fp32 formats; for fp16 and int8 the same
class for 95 % of the images of the trained model, logits within 10 % of eager's scale for untrained ones):
a fast wrong answer is not a result.

Rounds: calibrated to about 1 s of timing per case after a warm-up (at least the model's minimum), calls
shorter than 2 ms repeated within a round; pytest-benchmark's median is the latency per batch.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.common import (THREADS_ALL, Scale, check_against_eager, interleaved_medians, median_seconds,
                               pinned_threads, record_throughput, resolve_threads, time_call)
from benchmarks.conftest import ModelExport
from benchmarks.model_rows import MODEL_ROWS, TRAINED_MODEL
from toolkit.artifacts import formats
from toolkit.artifacts.backends import Backend, load_backend
from toolkit.artifacts.metadata import INPUT_NAME, OUTPUT_NAME
from toolkit.core.errors import ConfigError

# (model, format, thread setting, batch) of every row, model by model.
CASES = [(m, *case) for m, rows in MODEL_ROWS.items() for case in rows.inference_cases()]
ORT_THREADS = MODEL_ROWS[TRAINED_MODEL].ort_threads

_loaded: dict[tuple[str, str, int | None, str], Backend] = {}
_checked: dict[int, float] = {}  # id() of each loaded backend whose logits matched eager's -> largest |difference|


def _backend(export_dir, name: str, threads: int | None, provider: str) -> Backend:
    """One loaded backend per (format, thread option, provider) for the session.

    Torch formats share one instance across thread counts: their threads are torch's process-wide
    setting, pinned around each measurement instead.
    """
    fmt = formats.get(name)
    onnx = fmt.runtime == "onnxruntime"
    key = (str(export_dir), name, threads if onnx else None, provider if onnx else "cpu")
    if key not in _loaded:
        try:
            _loaded[key] = load_backend(export_dir / fmt.file, threads=key[2], provider=key[3])
        except ConfigError as exc:  # --provider names one this onnxruntime build or machine lacks
            pytest.skip(str(exc))
    return _loaded[key]


def _row_name(backend: Backend) -> str:
    """The format, suffixed with the provider when not the CPU: `onnx-int8`, `onnx-cuda`."""
    return backend.name if backend.provider == "cpu" else f"{backend.name}-{backend.provider}"


def _describe(benchmark, backend: Backend, threads: int | str, count: int | None, torch_threads: int, batch: int,
              source: str, flops_per_image: int, model: ModelExport) -> None:
    benchmark.group = f"inference {model.model} batch {batch}"
    benchmark.extra_info.update(
        kind="inference", model=model.model, weights=model.weights, backend=_row_name(backend), batch=batch,
        threads=threads if count is None else count,
        thread_setting=("ORT default session options" if count is None else
                        "single-threaded ORT sessions over batch slices on N threads"
                        if backend.format.runtime == "onnxruntime" else "torch.set_num_threads"),
        provider=backend.provider, precision=backend.format.precision, torch_threads=torch_threads,
        file=backend.format.file, data=source, flops_per_image=flops_per_image)


@pytest.mark.parametrize("model,backend,threads,batch", CASES, ids=[f"{m}-{b}-t{t}-b{n}" for m, b, t, n in CASES])
def test_inference(benchmark, model_export, inputs, scale: Scale, matmul_peak, model_flops, provider: str,
                   model: str, backend: str, threads: int | str, batch: int) -> None:
    exported = model_export(model)
    flops_per_image = model_flops(model)
    count = resolve_threads(threads)
    runtime = _backend(exported.export, backend, count, provider)
    x = np.ascontiguousarray(inputs.images[:batch])
    # ORT's default intra-op pool has one thread per physical core; torch formats always pinned.
    torch_threads = count if count is not None else THREADS_ALL
    with pinned_threads(torch_threads):
        _describe(benchmark, runtime, threads, count, torch_threads, batch, inputs.source, flops_per_image, exported)
        if id(runtime) not in _checked:  # once per loaded runtime, whatever the batch of the row
            logits = runtime.predict_logits(inputs.images[:len(exported.eager_logits)])
            check_against_eager(backend, logits, exported.eager_logits, gpu=runtime.provider != "cpu",
                                trained=exported.trained)
            _checked[id(runtime)] = float(np.abs(logits - exported.eager_logits).max())
        benchmark.extra_info["max_abs_diff_vs_eager"] = _checked[id(runtime)]
        time_call(benchmark, lambda: runtime.predict_logits(x), scale, min_rounds=MODEL_ROWS[model].min_rounds)
    median = median_seconds(benchmark)  # seconds per batch; None when benchmarking is disabled
    if median is not None:
        record_throughput(benchmark, batch, median, flops_per_image, matmul_peak(torch_threads))


@pytest.mark.parametrize("threads", ORT_THREADS, ids=lambda t: f"t{t}")
def test_session(benchmark, model_export, inputs, scale: Scale, matmul_peak, flops_per_image: int, provider: str,
                 threads: int | str) -> None:
    """The raw `InferenceSession.run` of the session behind the `onnx` rows, batch 1: the interface's cost.

    The row is the raw call's latency. The interface's overhead is measured apart from the rows: raw
    call and `predict_logits` in alternating rounds of 200 calls (`interleaved_medians`), because two
    rows measured minutes apart on a shared VM differ by more than the 5 µs being measured.
    """
    count = resolve_threads(threads)
    exported = model_export(TRAINED_MODEL)
    runtime = _backend(exported.export, formats.ONNX.name, count, provider)
    session, x = runtime.session, np.ascontiguousarray(inputs.images[:1])
    np.testing.assert_array_equal(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0], runtime.predict_logits(x))
    _describe(benchmark, runtime, threads, count, count or THREADS_ALL, 1, inputs.source, flops_per_image, exported)
    benchmark.extra_info.update(backend=f"{_row_name(runtime)}-session", timed="InferenceSession.run, no checks")
    time_call(benchmark, lambda: session.run([OUTPUT_NAME], {INPUT_NAME: x}), scale)
    median = median_seconds(benchmark)
    if median is not None:
        record_throughput(benchmark, 1, median, flops_per_image, matmul_peak(count or THREADS_ALL))
        raw, wrapped = interleaved_medians(lambda: session.run([OUTPUT_NAME], {INPUT_NAME: x}),
                                           lambda: runtime.predict_logits(x), seconds=2 * scale.seconds, number=200)
        benchmark.extra_info.update(interleaved_session_ms=raw * 1e3, interleaved_predict_logits_ms=wrapped * 1e3,
                                    interface_overhead=wrapped / raw - 1)
