"""toolkit.artifacts.onnx_passes: BatchNorm folding, checked on small hand-built graphs run by ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolkit.artifacts.onnx_passes import fold_batch_norms

ort = pytest.importorskip("onnxruntime")
CHANNELS = 4


def _graph(pool: bool, gamma: np.ndarray, extra_reader: bool = False, conv_bias: bool = True) -> onnx.ModelProto:
    """x (N×3×8×8) -> Conv(3->4, 3×3) [-> MaxPool 2×2] -> BatchNorm(gamma, random β, mean, var) -> y;
    `extra_reader` also makes the Conv's output a graph output."""
    g = np.random.default_rng(0)
    inits = [numpy_helper.from_array(g.standard_normal((CHANNELS, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(gamma.astype(np.float32), "gamma"),
             numpy_helper.from_array(g.standard_normal(CHANNELS).astype(np.float32), "beta"),
             numpy_helper.from_array(g.standard_normal(CHANNELS).astype(np.float32), "mean"),
             numpy_helper.from_array(g.uniform(0.1, 3.0, CHANNELS).astype(np.float32), "var")]
    if conv_bias:
        inits.append(numpy_helper.from_array(g.standard_normal(CHANNELS).astype(np.float32), "b"))
    nodes = [helper.make_node("Conv", ["x", "w", *(["b"] if conv_bias else [])], ["c"], name="conv", pads=[1, 1, 1, 1])]
    if pool:
        nodes.append(helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("BatchNormalization", ["p" if pool else "c", "gamma", "beta", "mean", "var"], ["y"],
                                  name="bn", epsilon=1e-3))
    side = 8 // 2 if pool else 8
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CHANNELS, side, side])]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", CHANNELS, 8, 8]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


POSITIVE = np.array([0.5, 1.0, 2.0, 3.0])


@pytest.mark.parametrize("pool", [False, True], ids=["conv-bn", "conv-maxpool-bn"])
@pytest.mark.parametrize("conv_bias", [True, False], ids=["bias", "no-bias"])
def test_batch_norm_after_a_conv_or_its_max_pool_is_folded_and_the_output_kept(pool: bool, conv_bias: bool) -> None:
    model = _graph(pool, POSITIVE, conv_bias=conv_bias)
    before = _run(model)
    assert fold_batch_norms(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert _ops(model) == (["Conv", "MaxPool"] if pool else ["Conv"])
    assert {t.name for t in model.graph.initializer}.isdisjoint({"gamma", "beta", "mean", "var", "w", "b"})
    np.testing.assert_allclose(_run(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gamma", [np.array([0.5, -1.0, 2.0, 3.0]), np.array([0.5, 0.0, 2.0, 3.0])],
                         ids=["negative", "zero"])
def test_a_non_positive_scale_is_not_folded_through_max_pool(gamma: np.ndarray) -> None:
    """max(s·x) = s·max(x) only for s > 0: with one channel's scale negative or zero the graph stays as it is;
    directly after a Conv any scale folds."""
    model = _graph(True, gamma)
    assert fold_batch_norms(model) == 0
    assert _ops(model) == ["Conv", "MaxPool", "BatchNormalization"]
    direct = _graph(False, gamma)
    before = _run(direct)
    assert fold_batch_norms(direct) == 1
    np.testing.assert_allclose(_run(direct), before, rtol=1e-5, atol=1e-5)


def test_a_conv_whose_output_is_read_elsewhere_is_not_changed() -> None:
    model = _graph(False, POSITIVE, extra_reader=True)
    assert fold_batch_norms(model) == 0
    assert "BatchNormalization" in _ops(model)
