"""Checks on ONNX files made before ONNX Runtime sees them, without importing the `onnx` package.

A toolkit export is one self-contained file. An ONNX tensor can instead name an external file
(`data_location: EXTERNAL`, `external_data: {location: ...}`) that ONNX Runtime would read from the
model's folder; `check_self_contained` refuses any such tensor, wherever it sits: initializers,
sparse initializers, constant attributes, subgraphs (If/Loop/Scan bodies), training graphs and
model-local functions.

Why not `onnx.load`: importing `onnx` costs about 75 ms and 15 MB (protobuf, its helpers), a fifth
of `toolkit predict`'s start-up budget (0.4 s). The check needs only a few fields, so it reads the
protobuf wire format directly: each message is a sequence of (field number, wire type, value), and
every field not on the path to a tensor is skipped by its length. Field numbers are those of
onnx/onnx.proto (IR version 10); the tests compare this walk with `onnx`'s own on crafted models.
Torch-free and onnx-free.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from toolkit.core.errors import ArtifactError

# Field numbers in onnx.proto. Only messages on the way to a TensorProto are entered.
_MODEL_GRAPH, _MODEL_TRAINING_INFO, _MODEL_FUNCTIONS = 7, 20, 25
_TRAINING_GRAPHS = (1, 2)  # TrainingInfoProto.initialization, .algorithm
_FUNCTION_NODE = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_TENSORS = (1, 2)  # SparseTensorProto.values, .indices
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # wire types; 3 and 4 (groups) never occur in ONNX
_MAX_DEPTH = 64  # nested subgraphs; deeper is refused rather than recursed into


class _Malformed(ValueError):
    """The bytes are not a well-formed protobuf message, or nest deeper than the walk follows."""


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("not a protobuf message: truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each field of the message in buf[start:end]; for a
    varint, start is its value and end its end."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("not a protobuf message: field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
            continue
        if wire == _LEN:
            length, pos = _varint(buf, pos, end)
            value_start, pos = pos, pos + length
        elif wire in (_I64, _I32):
            value_start, pos = pos, pos + (8 if wire == _I64 else 4)
        else:
            raise _Malformed(f"not a protobuf message: wire type {wire}")
        if pos > end:
            raise _Malformed("not a protobuf message: a field runs past the end of its message")
        yield number, wire, value_start, pos


def _children(buf: bytes, start: int, end: int, numbers: tuple[int, ...]) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of the length-delimited fields `numbers` of a message."""
    for number, wire, s, e in _fields(buf, start, end):
        if number in numbers and wire == _LEN:
            yield number, s, e


def _tensor(buf: bytes, start: int, end: int) -> tuple[str, str] | None:
    """(name, location) of a TensorProto stored externally, else None."""
    name, location, external = "?", "?", False
    for number, wire, s, e in _fields(buf, start, end):
        if number == _TENSOR_DATA_LOCATION and wire == _VARINT:
            external = s == _EXTERNAL
        elif number == _TENSOR_NAME and wire == _LEN:
            name = bytes(buf[s:e]).decode("utf-8", "replace")
        elif number == _TENSOR_EXTERNAL_DATA and wire == _LEN:
            entry = {k: bytes(buf[ks:ke]).decode("utf-8", "replace")
                     for k, ks, ke in _children(buf, s, e, (_ENTRY_KEY, _ENTRY_VALUE))}
            if entry.get(_ENTRY_KEY) == "location":
                location = entry.get(_ENTRY_VALUE, "?")
    return (name, location) if external else None


def _sparse(buf: bytes, start: int, end: int) -> Iterator[tuple[str, str]]:
    for _, s, e in _children(buf, start, end, _SPARSE_TENSORS):
        if found := _tensor(buf, s, e):
            yield found


def _nodes(buf: bytes, start: int, end: int, field: int, depth: int) -> Iterator[tuple[str, str]]:
    """External tensors in the attributes of the NodeProtos at `field` of a graph or function."""
    for _, ns, ne in _children(buf, start, end, (field,)):
        for _, s, e in _children(buf, ns, ne, (_NODE_ATTRIBUTE,)):
            for number, vs, ve in _children(buf, s, e, (_ATTR_TENSOR, _ATTR_TENSORS, _ATTR_GRAPH, _ATTR_GRAPHS,
                                                        _ATTR_SPARSE, _ATTR_SPARSES)):
                if number in (_ATTR_TENSOR, _ATTR_TENSORS):
                    if found := _tensor(buf, vs, ve):
                        yield found
                elif number in (_ATTR_SPARSE, _ATTR_SPARSES):
                    yield from _sparse(buf, vs, ve)
                else:
                    yield from _graph(buf, vs, ve, depth + 1)


def _graph(buf: bytes, start: int, end: int, depth: int) -> Iterator[tuple[str, str]]:
    if depth > _MAX_DEPTH:
        raise _Malformed(f"subgraphs nested more than {_MAX_DEPTH} deep")
    for number, s, e in _children(buf, start, end, (_GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER)):
        if number == _GRAPH_INITIALIZER:
            if found := _tensor(buf, s, e):
                yield found
        else:
            yield from _sparse(buf, s, e)
    yield from _nodes(buf, start, end, _GRAPH_NODE, depth)


def external_tensors(model: bytes) -> list[tuple[str, str]]:
    """(tensor name, external file) of every tensor of a serialized ModelProto kept outside the file.

    Raises `ValueError` when the bytes are not a well-formed protobuf message (or nest subgraphs deeper
    than `_MAX_DEPTH`).
    """
    found: list[tuple[str, str]] = []
    try:
        for number, s, e in _children(model, 0, len(model), (_MODEL_GRAPH, _MODEL_TRAINING_INFO, _MODEL_FUNCTIONS)):
            if number == _MODEL_GRAPH:
                found += _graph(model, s, e, 0)
            elif number == _MODEL_TRAINING_INFO:
                for _, gs, ge in _children(model, s, e, _TRAINING_GRAPHS):
                    found += _graph(model, gs, ge, 1)
            else:
                found += _nodes(model, s, e, _FUNCTION_NODE, 1)
    except _Malformed as exc:
        raise ValueError(str(exc)) from None
    return found


def check_self_contained(path: Path, model: bytes) -> None:
    """Refuse the ONNX file at `path` (its bytes: `model`) if any tensor lives in an external file, or if
    it is not a protobuf message at all."""
    try:
        external = external_tensors(model)
    except ValueError as exc:
        raise ArtifactError(f"{path}: not a loadable ONNX model ({exc})") from None
    if external:
        name, location = external[0]
        raise ArtifactError(f"{path}: tensor {name!r} is stored in an external file {location!r}; "
                            "only self-contained ONNX files (as `toolkit export` writes) are loaded")
