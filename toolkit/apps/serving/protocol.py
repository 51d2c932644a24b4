"""Open Inference Protocol (KServe v2) messages: infer requests in, logits out, model metadata and config.

Pure functions over bytes and numpy: no HTTP server here, so every rule is one place and one error.
A request is checked whole before it reaches the batcher; every problem is an `HTTPError` with a status
and one line naming it, answered to that request alone.

Inputs: one tensor named `images`, either
- `FP32` N×3×32×32, normalized as the model expects, or
- `UINT8` N×32×32×3 pixels (height, width, RGB), normalized here with the model's own mean/std
  (`ArtifactMetadata.normalize`, as `toolkit predict` does).
Its data comes as JSON (`data`: flat or nested numbers) or as the binary tensor extension: the request
body is the JSON header of `Inference-Header-Content-Length` bytes followed by the raw little-endian
tensor, announced by the input's `parameters.binary_data_size`. The output, `logits` (FP32 N×classes),
is returned in binary when the request asks (`outputs[].parameters.binary_data`, or the request's
`parameters.binary_data_output`), else as JSON numbers.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit import __version__
from toolkit.artifacts.metadata import INPUT_NAME, OUTPUT_NAME, ArtifactMetadata
from toolkit.core.images import CHANNELS, HEIGHT, WIDTH

HEADER_LENGTH = "inference-header-content-length"  # the binary tensor extension's header (HTTP: any case)
BINARY_CONTENT_TYPE = "application/octet-stream"
SERVER_NAME = "toolkit"
VERSION = "1"  # every model has one version
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
# datatype -> (numpy dtype, the shape of one image)
DATATYPES: dict[str, tuple[np.dtype, tuple[int, int, int]]] = {
    "FP32": (np.dtype("<f4"), (CHANNELS, HEIGHT, WIDTH)),
    "UINT8": (np.dtype("u1"), (HEIGHT, WIDTH, CHANNELS)),
}


class HTTPError(Exception):
    """An answer other than success: its status, one line, and extra headers (Retry-After, ...)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())  # one line, whatever a library's message held
        self.headers = headers or {}


def bad_request(message: str) -> HTTPError:
    return HTTPError(400, message)


@dataclass(frozen=True)
class InferRequest:
    """A checked infer request: its images as the model takes them (float32 N×3×32×32) and how to answer."""

    id: str | None
    images: np.ndarray
    binary_output: bool


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise bad_request(f"malformed JSON in the {what}: {exc}") from None


def _shape(value: Any, datatype: str, max_batch: int, fixed_batch: int | None) -> tuple[int, ...]:
    image = DATATYPES[datatype][1]
    expected = f"[N, {', '.join(map(str, image))}]"
    if not (isinstance(value, list) and all(type(d) is int for d in value)):
        raise bad_request(f"input '{INPUT_NAME}': shape must be a list of integers, got {value!r}")
    if len(value) != 4 or tuple(value[1:]) != image:
        raise bad_request(f"input '{INPUT_NAME}': {datatype} shape must be {expected}, got {value}")
    if value[0] < 1:
        raise bad_request(f"input '{INPUT_NAME}': batch size must be >= 1, got {value[0]}")
    if value[0] > max_batch:
        raise bad_request(f"input '{INPUT_NAME}': batch of {value[0]} images exceeds this model's "
                          f"max_batch_size {max_batch} (--max-batch-size)")
    if fixed_batch is not None and value[0] != fixed_batch:
        raise bad_request(f"input '{INPUT_NAME}': this model takes batches of exactly {fixed_batch} images, "
                          f"got {value[0]}")
    return tuple(value)


def _json_tensor(data: Any, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """JSON numbers (flat or nested, row-major) -> an array of `shape`, refusing what is not a number of the type."""
    try:
        values = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise bad_request(f"input '{INPUT_NAME}': data is not a regular array of numbers ({exc})") from None
    kinds = "iu" if datatype == "UINT8" else "iuf"
    if values.dtype.kind not in kinds:
        what = "integers" if datatype == "UINT8" else "numbers"
        raise bad_request(f"input '{INPUT_NAME}': {datatype} data must be {what}, got {values.dtype.name} values")
    if values.size != math.prod(shape):
        raise bad_request(f"input '{INPUT_NAME}': shape {list(shape)} needs {math.prod(shape)} values, "
                          f"data holds {values.size}")
    if datatype == "UINT8" and values.size and (values.min() < 0 or values.max() > 255):
        raise bad_request(f"input '{INPUT_NAME}': UINT8 values must lie in 0..255, got {values.min()}..{values.max()}")
    return values.astype(DATATYPES[datatype][0]).reshape(shape)


def parse_infer(body: bytes, header_length: str | None, metadata: ArtifactMetadata, max_batch: int,
                fixed_batch: int | None = None) -> InferRequest:
    """An infer request's body (and its Inference-Header-Content-Length, if any) -> `InferRequest`.

    Non-finite values are left to `validate_batch`, which names them; everything else is checked here.
    """
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise bad_request(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if not 0 <= length <= len(body):
            raise bad_request(f"truncated body: Inference-Header-Content-Length is {length} but the body holds "
                              f"{len(body)} bytes")
        body, binary = body[:length], memoryview(body)[length:]
    request = _json(body, "request")
    if not isinstance(request, dict):
        raise bad_request(f"the request must be a JSON object, got {type(request).__name__}")
    inputs = request.get("inputs")
    if not (isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], dict)):
        raise bad_request(f"'inputs' must be a list of one tensor, '{INPUT_NAME}'")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise bad_request(f"unknown input {tensor.get('name')!r}; this model's input is '{INPUT_NAME}'")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise bad_request(f"input '{INPUT_NAME}': datatype must be one of {', '.join(DATATYPES)}, got {datatype!r}")
    shape = _shape(tensor.get("shape"), datatype, max_batch, fixed_batch)
    dtype = DATATYPES[datatype][0]
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request(f"input '{INPUT_NAME}': parameters must be a JSON object")
    size = parameters.get("binary_data_size")
    if size is not None:
        expected = math.prod(shape) * dtype.itemsize
        if type(size) is not int or size != expected:
            raise bad_request(f"input '{INPUT_NAME}': binary_data_size {size!r} does not match {datatype} shape "
                              f"{list(shape)} ({expected} bytes)")
        if len(binary) != size:
            raise bad_request(f"truncated binary body: input '{INPUT_NAME}' announces {size} bytes, the body holds "
                              f"{len(binary)} after the JSON header" if len(binary) < size else
                              f"{len(binary) - size} bytes after the tensor data that no input announces")
        array = np.frombuffer(binary, dtype=dtype).reshape(shape)
    else:
        if len(binary):
            raise bad_request(f"{len(binary)} binary bytes after the JSON header, but no input announces "
                              "binary_data_size")
        if "data" not in tensor:
            raise bad_request(f"input '{INPUT_NAME}': neither 'data' nor parameters.binary_data_size")
        array = _json_tensor(tensor["data"], datatype, shape)
    if datatype == "UINT8":
        images = metadata.normalize(array.transpose(0, 3, 1, 2))
    else:
        images = np.ascontiguousarray(array, dtype=np.float32)  # native byte order, a copy only off little-endian
    return InferRequest(_request_id(request), images, _binary_output(request))


def _request_id(request: dict) -> str | None:
    value = request.get("id")
    if value is not None and not isinstance(value, str):
        raise bad_request(f"'id' must be a string, got {type(value).__name__}")
    return value


def _binary_output(request: dict) -> bool:
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request("'parameters' must be a JSON object")
    binary = parameters.get("binary_data_output") is True
    outputs = request.get("outputs")
    if outputs is None:
        return binary
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise bad_request("'outputs' must be a list of objects")
    for output in outputs:
        if output.get("name") != OUTPUT_NAME:
            raise bad_request(f"unknown output {output.get('name')!r}; this model's output is '{OUTPUT_NAME}'")
        parameters = output.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise bad_request(f"output '{OUTPUT_NAME}': parameters must be a JSON object")
        binary = parameters.get("binary_data", binary) is True
    return binary


def infer_response(model: str, request: InferRequest, logits: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The response body and headers for `logits` (FP32 N×classes), in binary if the request asked."""
    output: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(logits.shape)}
    response: dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": [output]}
    if request.id is not None:
        response["id"] = request.id
    if not request.binary_output:
        # float32 -> Python float is exact, and json writes the shortest text that reads back to it: bit for bit
        output["data"] = logits.ravel().tolist()
        return json.dumps(response).encode(), {"content-type": "application/json"}
    data = np.ascontiguousarray(logits, dtype="<f4").tobytes()
    output["parameters"] = {"binary_data_size": len(data)}
    header = json.dumps(response).encode()
    return header + data, {"content-type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(header))}


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


def model_metadata(name: str, classes: int, platform: str) -> dict[str, Any]:
    return {"name": name, "versions": [VERSION], "platform": platform,
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, CHANNELS, HEIGHT, WIDTH]}],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, classes]}]}


def model_config(name: str, classes: int, platform: str, max_batch: int, delay_s: float, instances: int,
                 kind: str) -> dict[str, Any]:
    """Triton's model configuration (as `/v2/models/{m}/config` returns it), which Triton's tools read."""
    return {"name": name, "platform": platform, "backend": "onnxruntime", "max_batch_size": max_batch,
            "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
                       "dims": [CHANNELS, HEIGHT, WIDTH]}],
            "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [classes]}],
            "dynamic_batching": {"max_queue_delay_microseconds": round(delay_s * 1e6)},
            "instance_group": [{"count": instances, "kind": kind}]}


def image_files(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """The image files of a classify request: each part of a multipart/form-data body (named by its file
    name, else its field name), or the whole body as one image. Names are only echoed back, never opened."""
    if not content_type.lower().startswith("multipart/"):
        return [("[0]", bytes(body))]
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise bad_request("malformed multipart body (no boundary or no parts)")
    files = []
    for i, part in enumerate(message.iter_parts()):
        data = part.get_payload(decode=True)
        if data is None:
            raise bad_request(f"multipart part {i} holds no data")
        files.append((part.get_filename() or part.get_param("name", header="content-disposition") or f"[{i}]", data))
    if not files:
        raise bad_request("the multipart body holds no files")
    return files

