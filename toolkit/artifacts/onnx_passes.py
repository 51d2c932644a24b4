"""Graph passes over an exported fp32 ONNX model, run before it is saved as model.onnx.

`fold_batch_norms` removes every inference-mode BatchNormalization whose input comes from a Conv,
directly or through MaxPool, by folding its per-channel affine map y = s·x + b (s = γ/√(var + ε),
b = β − mean·s) into the Conv's weights and bias. Through a MaxPool it folds only where every s is
positive: max(s·x + b) = s·max(x) + b holds for s > 0 only (a negative scale turns the max into a min;
a zero scale is folded by no exporter either, so it is left as it is). The folded graph computes the
same function up to float rounding, runs one operator fewer per BatchNorm, and gives the int8
quantizer a Conv whose output range is the BatchNorm's (no QDQ pair around a separate affine op).

Torch-free: numpy and onnx only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

# BatchNormalization's epsilon when the attribute is absent (ONNX operator default).
_ONNX_BN_EPSILON = 1e-5


@dataclass(frozen=True)
class _Fold:
    """A BatchNorm to fold: the Conv it folds into, any MaxPool in between, and its affine map."""

    conv: onnx.NodeProto
    pool: onnx.NodeProto | None
    norm: onnx.NodeProto
    scale: np.ndarray  # s, per output channel of the Conv
    shift: np.ndarray  # b, per output channel


def _attribute(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _affine(norm: onnx.NodeProto, constants: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, b) of an inference-mode BatchNormalization with constant parameters, in float64; None otherwise."""
    if len(norm.output) != 1 or _attribute(norm, "training_mode", 0) or not all(i in constants for i in norm.input[1:5]):
        return None
    gamma, beta, mean, var = (constants[i].astype(np.float64) for i in norm.input[1:5])
    scale = gamma / np.sqrt(var + float(_attribute(norm, "epsilon", _ONNX_BN_EPSILON)))
    return scale, beta - mean * scale


def _candidates(graph: onnx.GraphProto) -> list[_Fold]:
    """The BatchNorms that can be folded, each with the Conv (and MaxPool) feeding it."""
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}

    def only_feeds_next(node: onnx.NodeProto) -> bool:  # its one output is read by one node, not a graph output
        return len(node.output) == 1 and consumers.get(node.output[0], 0) == 1 and node.output[0] not in outputs

    folds = []
    for norm in (n for n in graph.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")):
        affine = _affine(norm, constants)
        previous = producer.get(norm.input[0])
        if affine is None or previous is None:
            continue
        pool = previous if previous.op_type == "MaxPool" else None
        conv = producer.get(pool.input[0]) if pool is not None else previous
        if conv is None or conv.op_type != "Conv" or conv.input[1] not in constants \
                or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in constants):
            continue
        chain = [conv] if pool is None else [conv, pool]
        if not all(only_feeds_next(n) for n in chain):  # another reader would see the folded values
            continue
        if pool is not None and not (affine[0] > 0).all():  # max commutes with a positive scale only
            continue
        folds.append(_Fold(conv, pool, norm, *affine))
    return folds


def fold_batch_norms(model: onnx.ModelProto) -> int:
    """Fold BatchNorms into the Convs before them (`Conv -> BN`, `Conv -> MaxPool -> BN` with positive scales),
    in place; return how many were folded. Graphs without such a pattern are left unchanged."""
    graph = model.graph
    folds = _candidates(graph)
    if not folds:
        return 0
    initializers = {t.name: t for t in graph.initializer}
    removed, replaced = set(), set()  # the folded BatchNorms' outputs; initializers that may now be unread
    for i, fold in enumerate(folds):
        weight = numpy_helper.to_array(initializers[fold.conv.input[1]])
        has_bias = len(fold.conv.input) > 2 and fold.conv.input[2]
        bias = numpy_helper.to_array(initializers[fold.conv.input[2]]) if has_bias else np.zeros(weight.shape[0])
        scale = fold.scale.reshape(-1, *([1] * (weight.ndim - 1)))
        # New initializer names: the old ones may be read elsewhere (a shared weight keeps its values there).
        names = (f"{fold.conv.name or 'conv'}.bn_folded_weight_{i}", f"{fold.conv.name or 'conv'}.bn_folded_bias_{i}")
        graph.initializer.extend([
            numpy_helper.from_array((weight.astype(np.float64) * scale).astype(weight.dtype), names[0]),
            numpy_helper.from_array((bias.astype(np.float64) * fold.scale + fold.shift).astype(weight.dtype), names[1])])
        replaced.update([*fold.conv.input[1:], *fold.norm.input[1:]])
        del fold.conv.input[1:]
        fold.conv.input.extend(names)
        # The BatchNorm's output now comes from the last node of the chain; the BatchNorm goes.
        (fold.pool or fold.conv).output[0] = fold.norm.output[0]
        removed.add(fold.norm.output[0])
    kept = [n for n in graph.node if not (n.op_type == "BatchNormalization" and n.output[0] in removed)]
    graph.ClearField("node")
    graph.node.extend(kept)
    _drop_unused(graph, replaced)
    return len(folds)


def _drop_unused(graph: onnx.GraphProto, replaced: set[str]) -> None:
    """Remove the `replaced` initializers (the folded BatchNorms' parameters, the Convs' old weights and biases)
    that nothing reads any more, and the value_info of tensors that no longer exist."""
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output} \
        | {i.name for i in graph.input}
    kept = [t for t in graph.initializer if t.name in read or t.name not in replaced]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    # The value_info of a tensor that no longer exists (a BatchNorm's old input) is dropped with it.
    produced = {out for node in graph.node for out in node.output}
    infos = [v for v in graph.value_info if v.name in produced]
    graph.ClearField("value_info")
    graph.value_info.extend(infos)
