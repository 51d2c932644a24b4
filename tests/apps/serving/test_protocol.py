"""The Open Inference Protocol's messages, parsed and written without a server: the forms a client may send."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.apps.serving.protocol import HTTPError, image_files, infer_response, parse_infer
from toolkit.artifacts.metadata import ArtifactMetadata

METADATA = ArtifactMetadata(class_names=[f"c{i}" for i in range(10)], mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])


def _json_request(data: object, datatype: str = "FP32", shape: list[int] | None = None, **extra: object) -> bytes:
    shape = shape or ([1, 3, 32, 32] if datatype == "FP32" else [1, 32, 32, 3])
    return json.dumps({"inputs": [{"name": "images", "datatype": datatype, "shape": shape, "data": data}],
                       **extra}).encode()


def test_json_data_may_be_flat_or_nested_and_gives_the_same_float32_values() -> None:
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    flat = parse_infer(_json_request(x.ravel().tolist(), shape=[2, 3, 32, 32]), None, METADATA, 64)
    nested = parse_infer(_json_request(x.tolist(), shape=[2, 3, 32, 32]), None, METADATA, 64)
    np.testing.assert_array_equal(flat.images, x)
    np.testing.assert_array_equal(nested.images, x)
    assert flat.images.dtype == np.float32 and flat.images.flags.c_contiguous


def test_uint8_pixels_height_width_channels_are_normalized_with_the_model_metadata() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    header = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [3, 32, 32, 3],
                                     "parameters": {"binary_data_size": pixels.nbytes}}]}).encode()
    parsed = parse_infer(header + pixels.tobytes(), str(len(header)), METADATA, 64)
    np.testing.assert_array_equal(parsed.images, METADATA.normalize(pixels.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize(("data", "words"), [
    ([300] + [0] * 3071, "must lie in 0..255"),
    ([0.5] * 3072, "UINT8 data must be integers"),
    ([[0] * 3071, [0]], "not a regular array"),
])
def test_uint8_json_values_outside_a_byte_are_refused(data: object, words: str) -> None:
    with pytest.raises(HTTPError, match=words) as info:
        parse_infer(_json_request(data, "UINT8"), None, METADATA, 64)
    assert info.value.status == 400


def test_fixed_batch_models_take_exactly_their_batch() -> None:
    with pytest.raises(HTTPError, match="batches of exactly 4 images, got 1"):
        parse_infer(_json_request([0.0] * 3072), None, METADATA, 64, fixed_batch=4)


@pytest.mark.parametrize(("extra", "binary"), [
    ({}, False),
    ({"parameters": {"binary_data_output": True}}, True),
    ({"outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}, True),
    ({"parameters": {"binary_data_output": True}, "outputs": [{"name": "logits",
                                                               "parameters": {"binary_data": False}}]}, False),
])
def test_the_output_is_binary_when_the_request_asks(extra: dict, binary: bool) -> None:
    request = parse_infer(_json_request([0.0] * 3072, **extra), None, METADATA, 64)
    logits = np.arange(10, dtype=np.float32).reshape(1, 10) / 3
    body, headers = infer_response("m", request, logits)
    if binary:
        length = int(headers["inference-header-content-length"])
        header = json.loads(body[:length])
        assert header["outputs"][0]["parameters"]["binary_data_size"] == 40
        np.testing.assert_array_equal(np.frombuffer(body[length:], np.float32).reshape(1, 10), logits)
    else:
        output = json.loads(body)["outputs"][0]
        assert output["shape"] == [1, 10] and np.array_equal(np.float32(output["data"]), logits.ravel())


@pytest.mark.parametrize(("extra", "words"), [
    ({"outputs": [{"name": "probs"}]}, "unknown output 'probs'"),
    ({"outputs": [{"name": "logits", "parameters": [1]}]}, "output 'logits': parameters must be a JSON object"),
    ({"outputs": {"name": "logits"}}, "'outputs' must be a list of objects"),
    ({"parameters": "binary"}, "'parameters' must be a JSON object"),
    ({"id": 7}, "'id' must be a string"),
])
def test_malformed_request_fields_are_named(extra: dict, words: str) -> None:
    with pytest.raises(HTTPError, match=re.escape(words)) as info:
        parse_infer(_json_request([0.0] * 3072, **extra), None, METADATA, 64)
    assert info.value.status == 400


def test_multipart_files_keep_their_names_and_bytes_a_raw_body_is_one_image() -> None:
    body = (b'--b\r\nContent-Disposition: form-data; name="a"; filename="../../etc/cat.png"\r\n\r\n\x89PNG1\r\n'
            b'--b\r\nContent-Disposition: form-data; name="second"\r\n\r\nJPEG2\r\n--b--\r\n')
    assert image_files(body, "multipart/form-data; boundary=b") == [("../../etc/cat.png", b"\x89PNG1"),
                                                                    ("second", b"JPEG2")]
    assert image_files(b"raw", "image/png") == [("[0]", b"raw")]


JSON = st.recursive(st.none() | st.booleans() | st.integers(-300, 300) | st.floats() | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                          max_size=4), max_leaves=12)


def _assert_checked_or_400(body: bytes, header: str | None) -> None:
    """An infer body parses into normalized N×3×32×32 float32 images, or is refused with a one-line 400."""
    try:
        parsed = parse_infer(body, header, METADATA, 64)
    except HTTPError as exc:
        assert exc.status == 400 and "\n" not in exc.message
    else:
        assert parsed.images.dtype == np.float32 and parsed.images.shape[1:] == (3, 32, 32)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300), header=st.none() | st.text(max_size=6))
def test_any_bytes_give_a_checked_request_or_one_line_400(body: bytes, header: str | None) -> None:
    _assert_checked_or_400(body, header)


@settings(max_examples=300, deadline=None)
@given(tensor=st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["images", "x"]) | JSON, "datatype": st.sampled_from(["FP32", "UINT8", "INT64"]) | JSON,
    "shape": st.sampled_from([[1, 3, 32, 32], [1, 32, 32, 3], [0, 3, 32, 32]]) | JSON,
    "data": JSON, "parameters": JSON}), request=st.dictionaries(st.sampled_from(["id", "parameters", "outputs"]), JSON))
def test_any_json_request_gives_a_checked_request_or_one_line_400(tensor: dict, request: dict) -> None:
    _assert_checked_or_400(json.dumps({"inputs": [tensor], **request}).encode(), None)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300) | st.builds(lambda a, b: b"--b\r\n" + a + b"\r\n\r\n" + b + b"\r\n--b--\r\n",
                                                  st.binary(max_size=80), st.binary(max_size=40)),
       content_type=st.sampled_from(["multipart/form-data; boundary=b", "multipart/form-data", "image/png"])
       | st.text(max_size=40))
def test_any_classify_body_gives_files_or_one_line_400(body: bytes, content_type: str) -> None:
    try:
        files = image_files(body, content_type)
    except HTTPError as exc:
        assert exc.status == 400 and "\n" not in exc.message
    else:
        assert files and all(isinstance(name, str) and isinstance(data, bytes) for name, data in files)
