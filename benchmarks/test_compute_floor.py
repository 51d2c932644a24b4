"""The compute floor: TutorialNet's FLOPs per image, and this machine's measured matmul throughput.

What: `torch.mm` of two 1024×1024 fp32 matrices (2·1024³ FLOPs per product) at 1 thread and at all
cores, for about 0.5 s each (tiny when benchmarking is disabled). Its GFLOP/s is the yardstick for
every other result's `share_of_matmul_peak` (achieved GFLOP/s = images/s × FLOPs per image, forward
for inference, 3 × forward for training).

`test_onnxruntime_matmul[precision]`: where int8 pays off. One ONNX MatMul, 256×1024 activations times
1024×1024 weights, in ONNX Runtime on the CPU at 1 thread, fp32 and quantized to int8 exactly as
`toolkit export` quantizes model.int8.onnx (`toolkit.artifacts.export.write_onnx_int8`: static QDQ,
symmetric int8, per-channel weights). Wide layers like this one run on int8 dot-product instructions
(AVX-512 VNNI, AMX); TutorialNet's layers (3 -> 6 -> 16 channels) are too thin for that (docs/deployment.md: "fp16 and
int8 exports").

Also unit tests of the analytic FLOP count (benchmarks/flops.py) against the known layer shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from benchmarks.common import THREADS_ALL, Scale, median_seconds, pinned_threads, time_call
from benchmarks.flops import TRAINING_FACTOR, forward_flops, layer_flops, tutorialnet_flops
from toolkit.training.models import build_model

# Per image: conv1 3->6, 5×5, output 6×28×28; conv2 6->16, 5×5, output 16×10×10; fc 400->120->84->10.
EXPECTED = {
    "conv1": 2 * 3 * 5 * 5 * 6 * 28 * 28,  # 705,600
    "conv2": 2 * 6 * 5 * 5 * 16 * 10 * 10,  # 480,000
    "fc1": 2 * 400 * 120,  # 96,000
    "fc2": 2 * 120 * 84,  # 20,160
    "fc3": 2 * 84 * 10,  # 1,680
}


def test_tutorialnet_flops_match_the_layer_shapes() -> None:
    rows = layer_flops(build_model("tutorial", 10))
    assert [r.name for r in rows] == list(EXPECTED)
    assert {r.name: r.flops for r in rows} == EXPECTED
    assert [r.output_shape for r in rows] == [(6, 28, 28), (16, 10, 10), (120,), (84,), (10,)]
    assert tutorialnet_flops() == sum(EXPECTED.values()) == 1_303_440
    assert TRAINING_FACTOR == 3


def test_flops_scale_with_classes_and_grouped_convolutions() -> None:
    from torch import nn

    assert forward_flops(build_model("tutorial", 100)) - tutorialnet_flops() == 2 * 84 * 90
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    assert forward_flops(grouped, (4, 6, 6)) == 2 * 2 * 3 * 3 * 8 * 6 * 6 + 2 * 288 * 5


@pytest.mark.parametrize("threads", [1, "all"], ids=["t1", "tall"])
def test_matmul_peak(benchmark, scale: Scale, threads: int | str) -> None:
    import torch

    count = THREADS_ALL if threads == "all" else int(threads)
    n = 1024 if scale.full else 128
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    benchmark.group = "compute floor"
    benchmark.extra_info.update(kind="matmul", label=f"torch.mm {n}×{n} fp32", threads=count, n=n,
                                flops_per_call=2 * n ** 3)
    with pinned_threads(count):
        time_call(benchmark, lambda: torch.mm(a, b, out=out), scale)
    median = median_seconds(benchmark)
    if median is not None:
        benchmark.extra_info["gflops"] = 2 * n ** 3 / median / 1e9


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_onnxruntime_matmul(benchmark, scale: Scale, tmp_path: Path, precision: str) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from toolkit.artifacts.export import write_onnx_int8
    from toolkit.artifacts.metadata import INPUT_NAME, OUTPUT_NAME, ArtifactMetadata
    from toolkit.core.images import MEAN, STD

    rows, n = (256, 1024) if scale.full else (16, 64)
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array((rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32), "weights")
    graph = helper.make_graph([helper.make_node("MatMul", [INPUT_NAME, "weights"], [OUTPUT_NAME])], "matmul",
                              [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["rows", n])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["rows", n])], [weights])
    path = tmp_path / "matmul.onnx"
    # IR version 10, as toolkit export writes: onnx 1.23 would default to 14, which ONNX Runtime 1.30 refuses.
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    x = rng.standard_normal((rows, n)).astype(np.float32)
    if precision == "int8":
        metadata = ArtifactMetadata(["x"], list(MEAN), list(STD))
        write_onnx_int8(path, tmp_path / "matmul.int8.onnx", metadata, x, {"images": rows})
        path = tmp_path / "matmul.int8.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    benchmark.group = "compute floor"
    benchmark.extra_info.update(kind="matmul", label=f"onnxruntime MatMul {rows}×{n}·{n}×{n} {precision}", threads=1,
                                precision=precision, flops_per_call=2 * rows * n * n)
    time_call(benchmark, lambda: session.run(None, {INPUT_NAME: x}), scale)
    median = median_seconds(benchmark)
    if median is not None:
        benchmark.extra_info["gflops"] = 2 * rows * n * n / median / 1e9
