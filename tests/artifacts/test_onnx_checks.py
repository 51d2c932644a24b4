"""toolkit.artifacts.onnx_checks: the onnx-free walk over a model's protobuf finds every externally stored
tensor that `onnx`'s own parser finds, wherever it sits, and refuses bytes that are not a protobuf message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import Export
from toolkit.artifacts.onnx_checks import check_self_contained, external_tensors
from toolkit.core.errors import ArtifactError


def _tensor(name: str, external: bool) -> TensorProto:
    tensor = numpy_helper.from_array(np.ones((2, 2), np.float32), name)
    if external:
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="offset", value="0")
        tensor.external_data.add(key="location", value=f"{name}.bin")
    return tensor


def _sparse(name: str, external: bool) -> onnx.SparseTensorProto:
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), f"{name}_indices")
    return helper.make_sparse_tensor(_tensor(f"{name}_values", external), indices, [2, 2])


def _model(where: str) -> onnx.ModelProto:
    """A small model with one external tensor at `where` (or none: "nowhere")."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    initializers, sparse, nodes, functions = [], [], [], []
    initializers.append(_tensor("w", where == "initializer"))
    nodes.append(helper.make_node("Add", ["x", "w"], ["a"]))
    nodes.append(helper.make_node("Constant", [], ["c"], value=_tensor("const", where == "attribute")))
    if where == "sparse":
        sparse.append(_sparse("s", True))
    def branch(external: bool) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("Identity", ["inner"], ["out"])], "branch", [],
                                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 2])],
                                 [_tensor("inner", external)])

    def nested(inner: onnx.GraphProto) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("If", ["cond"], ["out"], then_branch=inner, else_branch=branch(False))],
                                 "nested", [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 2])])

    nodes.append(helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "cond_v")))
    then = nested(branch(True)) if where == "deep" else branch(where == "subgraph")
    nodes.append(helper.make_node("If", ["cond"], ["b"], then_branch=then, else_branch=branch(False)))
    nodes.append(helper.make_node("Sum", ["a", "c", "b"], ["y"]))
    if where == "function":
        body = helper.make_node("Constant", [], ["k"], value=_tensor("fconst", True))
        functions.append(helper.make_function("local", "F", [], ["k"], [body], [helper.make_opsetid("", 18)]))
    graph = helper.make_graph(nodes, "g", [x], [y], initializers, sparse_initializer=sparse)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)],
                              functions=functions)
    if where == "training":
        info = model.training_info.add()
        info.algorithm.CopyFrom(helper.make_graph([], "algorithm", [], [], [_tensor("t", True)]))
    return model


def _found_by_onnx(model: onnx.ModelProto) -> list[str]:
    """Names of externally stored tensors, by walking the parsed proto with onnx's own classes."""
    found = []

    def tensors_of_graph(graph: onnx.GraphProto):
        yield from graph.initializer
        for s in graph.sparse_initializer:
            yield from (s.values, s.indices)
        yield from tensors_of_nodes(graph.node)

    def tensors_of_nodes(nodes):
        for node in nodes:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
                for s in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
                    yield from (s.values, s.indices)
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors_of_graph(sub)

    for tensor in [*tensors_of_graph(model.graph), *tensors_of_nodes(n for f in model.functions for n in f.node),
                   *(t for info in model.training_info for g in (info.initialization, info.algorithm)
                     for t in tensors_of_graph(g))]:
        if tensor.data_location == TensorProto.EXTERNAL:
            found.append(tensor.name)
    return found


@pytest.mark.parametrize("where, name", [
    ("nowhere", None), ("initializer", "w"), ("sparse", "s_values"), ("attribute", "const"), ("subgraph", "inner"),
    ("deep", "inner"), ("function", "fconst"), ("training", "t")])
def test_the_walk_finds_what_onnx_finds(where: str, name: str | None) -> None:
    model = _model(where)
    by_onnx = _found_by_onnx(model)
    assert set(by_onnx) == ({name} if name else set())  # the crafted model holds what it should
    found = external_tensors(model.SerializeToString())
    assert sorted(found) == sorted((n, f"{n}.bin") for n in by_onnx)


def test_the_exported_models_are_self_contained(exported: Export) -> None:
    for file in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        assert external_tensors((exported.dir / file).read_bytes()) == []


@pytest.mark.parametrize("data, reason", [
    (b"not a model at all\n", "wire type 6"),
    (b"\x3a\xff\xff\xff\xff\x0f", "runs past the end"),  # graph field claiming 4 GB
    (b"\x08", "truncated or overlong varint"),
    (b"\x08" + b"\xff" * 11, "truncated or overlong varint"),
    (b"\x00\x00", "field number 0"),
], ids=["text", "length", "varint", "overlong", "field0"])
def test_bytes_that_are_not_a_protobuf_message(tmp_path: Path, data: bytes, reason: str) -> None:
    with pytest.raises(ArtifactError) as info:
        check_self_contained(tmp_path / "bad.onnx", data)
    assert str(info.value).startswith(f"{tmp_path / 'bad.onnx'}: not a loadable ONNX model (not a protobuf message: ")
    assert reason in str(info.value)


def _length_delimited(field: int, payload: bytes) -> bytes:
    def varint(n: int) -> bytes:
        out = b""
        while n >= 0x80:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])

    return varint(field << 3 | 2) + varint(len(payload)) + payload


def _nested_graphs(depth: int) -> bytes:
    """A ModelProto whose graph holds an If node holding a graph ... `depth` times (built on the wire: the
    protobuf library itself refuses to build messages nested this deep)."""
    graph = b""
    for _ in range(depth):  # GraphProto.node(1) -> NodeProto.attribute(5) -> AttributeProto.g(6) -> GraphProto
        graph = _length_delimited(1, _length_delimited(5, _length_delimited(6, graph)))
    return _length_delimited(7, graph)


def test_subgraphs_nested_too_deep_are_refused(tmp_path: Path) -> None:
    assert external_tensors(_nested_graphs(64)) == []
    with pytest.raises(ArtifactError, match="not a loadable ONNX model \\(subgraphs nested more than 64 deep\\)"):
        check_self_contained(tmp_path / "deep.onnx", _nested_graphs(66))
