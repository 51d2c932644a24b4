"""Inference latency and throughput of every runtime on the trained TutorialNet, side by side.

What: `Backend.predict_logits(batch)` of `toolkit.artifacts.backends` (the same call `toolkit predict` and
`toolkit verify` make) for eager PyTorch (.safetensors), TorchScript (.ts), torch.export (.pt2) and
ONNX Runtime (.onnx), at batch 1, 64 and 1024. The timed call includes the backend's input
validation and the numpy <-> tensor hand-over, as a client sees it.

Threads: torch formats at 1 and at all cores (`torch.set_num_threads`, process-wide); ONNX Runtime
with its default session options (intra-op threads chosen by ORT: one per physical core) and with
`intra_op_num_threads` pinned to 1 and to all cores. "all" is the machine's core count, or
`TOOLKIT_BENCH_THREADS`. Rows are compared with eager at the same batch and thread count (ORT's
default with eager at all cores).

Inputs: 1024 normalized images of the held-out split the model did not train on (real CIFAR-10
when present, else synthetic). Before timing, each runtime's logits are checked against eager's
(|Δ| <= 1e-4 + 1e-4·|eager|): a fast wrong answer is not a result.

Rounds: calibrated to about 1 s of timing per case after a warm-up, calls shorter than 2 ms
repeated within a round; pytest-benchmark's median is the latency per batch.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.common import (THREADS_ALL, Scale, median_seconds, pinned_threads, record_throughput, resolve_threads,
                               time_call)
from toolkit.artifacts import formats
from toolkit.artifacts.backends import Backend, load_backend

BATCHES = (1, 64, 1024)
# Every format of the registry; ONNX Runtime also with its own default thread pool.
CASES = [(f.name, t) for f in formats.FORMATS
         for t in (("default", 1, "all") if f.runtime == "onnxruntime" else (1, "all"))]

_loaded: dict[tuple[str, str, int | None], Backend] = {}


def _backend(export_dir, name: str, threads: int | None) -> Backend:
    """One loaded backend per (format, ORT thread option) for the session.

    Torch formats share one instance across thread counts: their threads are torch's process-wide
    setting, pinned around each measurement instead.
    """
    fmt = formats.get(name)
    key = (str(export_dir), name, threads if fmt.runtime == "onnxruntime" else None)
    if key not in _loaded:
        _loaded[key] = load_backend(export_dir / fmt.file, threads=key[2])
    return _loaded[key]


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("backend,threads", CASES, ids=[f"{b}-t{t}" for b, t in CASES])
def test_inference(benchmark, trained, inputs, scale: Scale, matmul_peak, flops_per_image: int,
                   backend: str, threads: int | str, batch: int) -> None:
    count = resolve_threads(threads)
    runtime = _backend(trained.export, backend, count)
    x = np.ascontiguousarray(inputs.images[:batch])
    # ORT's default intra-op pool has one thread per physical core; torch formats always pinned.
    torch_threads = count if count is not None else THREADS_ALL
    with pinned_threads(torch_threads):
        logits = runtime.predict_logits(x)
        reference = inputs.eager_logits[:batch]
        np.testing.assert_allclose(logits, reference, atol=formats.LOGIT_ATOL, rtol=formats.LOGIT_RTOL,
                                   err_msg=f"{backend} logits differ from eager's: not timing a wrong answer")
        benchmark.group = f"inference batch {batch}"
        benchmark.extra_info.update(
            kind="inference", backend=backend, batch=batch, threads=threads if count is None else count,
            thread_setting=("ORT default session options" if count is None else
                            "onnxruntime intra_op_num_threads" if runtime.format.runtime == "onnxruntime"
                            else "torch.set_num_threads"),
            torch_threads=torch_threads, file=runtime.format.file, data=inputs.source,
            max_abs_diff_vs_eager=float(np.abs(logits - reference).max()), flops_per_image=flops_per_image)
        time_call(benchmark, lambda: runtime.predict_logits(x), scale)
    median = median_seconds(benchmark)  # seconds per batch; None when benchmarking is disabled
    if median is not None:
        record_throughput(benchmark, batch, median, flops_per_image, matmul_peak(torch_threads))
