"""The ONNX Runtime behind `Backend`: .onnx files, on the CPU or a GPU execution provider. Torch-free."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from toolkit.artifacts.backends import Backend
from toolkit.artifacts.formats import Format
from toolkit.artifacts.metadata import INPUT_NAME, OUTPUT_NAME, ArtifactMetadata
from toolkit.core.errors import ArtifactError, first_line
from toolkit.core.images import CHANNELS, HEIGHT, WIDTH


class OnnxRuntimeBackend(Backend):
    def __init__(self, path: Path, fmt: Format, metadata: ArtifactMetadata, session: ort.InferenceSession,
                 batch_size: int | None) -> None:
        super().__init__(path, fmt, metadata)
        self.session = session
        self.batch_size = batch_size

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build and machine have it, else CPU."""
    available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


def _check_self_contained(path: Path) -> None:
    """Refuse an ONNX file whose tensors live in external files: a toolkit export is one file, and a
    name inside the model should not make the runtime read other files."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and onnx's own errors
        raise ArtifactError(f"{path}: not a loadable ONNX model ({first_line(exc)})") from None

    def tensors(graph):
        yield from graph.initializer
        yield from (s.values for s in graph.sparse_initializer)
        for node in graph.node:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    for tensor in tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise ArtifactError(f"{path}: tensor {tensor.name!r} is stored in an external file {location!r}; "
                                "only self-contained ONNX files (as `toolkit export` writes) are loaded")


def load(path: Path, fmt: Format, threads: int | None, providers: Sequence[str] | None) -> Backend:
    _check_self_contained(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=list(providers or default_providers()))
    except Exception as exc:  # onnxruntime's pybind errors (Fail, InvalidProtobuf, ...) share no base class
        raise ArtifactError(f"{path}: not a loadable ONNX model ({first_line(exc)})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    actual = ", ".join(f"{i.name} {i.shape} {i.type}" for i in inputs)
    # Batch may be symbolic (a string) or fixed; channels and size must match what preprocessing makes.
    ok = (len(inputs) == 1 and inputs[0].name == INPUT_NAME and inputs[0].type == "tensor(float)"
          and len(inputs[0].shape) == 4 and list(inputs[0].shape[1:]) == [CHANNELS, HEIGHT, WIDTH])
    if not ok:
        raise ArtifactError(f"{path}: expected one input '{INPUT_NAME}' [N, {CHANNELS}, {HEIGHT}, {WIDTH}] "
                            f"tensor(float), the model has {actual or 'none'}")
    if OUTPUT_NAME not in [o.name for o in outputs]:
        raise ArtifactError(f"{path}: no output named '{OUTPUT_NAME}' (outputs: {[o.name for o in outputs]})")
    batch = inputs[0].shape[0]
    try:
        props = session.get_modelmeta().custom_metadata_map
    except UnicodeDecodeError as exc:  # onnxruntime 1.30 decodes damaged metadata strings eagerly
        raise ArtifactError(f"{path}: unreadable model metadata ({first_line(exc)})") from None
    metadata = ArtifactMetadata.from_strings(props, path)
    return OnnxRuntimeBackend(path, fmt, metadata, session, batch if isinstance(batch, int) else None)
