"""The serving baselines' request parsing (benchmarks/serving_baselines.py): a baseline that accepted a malformed
request would be measuring less work than a real server does."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from benchmarks.serving_baselines import BadRequest, InferRequest, infer_response, parse_infer


def binary_request(images: np.ndarray, datatype: str = "FP32", size: int | None = None,
                   cut: int = 0) -> tuple[bytes, str]:
    raw = images.tobytes()
    head = json.dumps({"inputs": [{"name": "images", "shape": list(images.shape), "datatype": datatype,
                                   "parameters": {"binary_data_size": len(raw) if size is None else size}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    body = head + raw
    return body[:len(body) - cut], str(len(head))


def test_binary_and_json_requests_parse_to_the_same_images() -> None:
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    parsed = parse_infer(*binary_request(images))
    assert parsed.binary_output and parsed.images.dtype == np.float32
    np.testing.assert_array_equal(parsed.images, images)
    pixels = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(1, 32, 32, 3)
    body = json.dumps({"inputs": [{"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8",
                                   "data": pixels.ravel().tolist()}]}).encode()
    parsed = parse_infer(body, None)
    assert not parsed.binary_output
    np.testing.assert_array_equal(parsed.images, pixels)


@pytest.mark.parametrize("case,fragment", [
    ("truncated", "body ends after"),
    ("size", "binary_data_size 100"),
    ("datatype", "datatype 'FP16'"),
    ("shape", "input shape [1, 32, 32, 3]"),
    ("header", "Inference-Header-Content-Length"),
    ("json", "not valid JSON"),
    ("count", "holds 3 values"),
])
def test_malformed_requests_are_400(case: str, fragment: str) -> None:
    images = np.zeros((1, 3, 32, 32), np.float32)
    body, length = {
        "truncated": binary_request(images, cut=1),
        "size": binary_request(images, size=100),
        "datatype": binary_request(images.astype(np.float16), datatype="FP16"),
        "shape": binary_request(np.zeros((1, 32, 32, 3), np.float32)),
        "header": (binary_request(images)[0], "999999"),
        "json": (b"{not json", None),
        "count": (json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                          "data": [0, 1, 2]}]}).encode(), None),
    }[case]
    with pytest.raises(BadRequest, match=re.escape(fragment)) as info:
        parse_infer(body, length)
    assert info.value.status == 400


def test_binary_response_carries_the_logits_after_its_header() -> None:
    logits = np.arange(20, dtype=np.float32).reshape(2, 10)
    response = infer_response("m", logits, InferRequest(np.zeros((2, 3, 32, 32), np.float32), True, "7"))
    length = int(response.headers["inference-header-content-length"])
    head = json.loads(response.body[:length])
    assert head["id"] == "7" and head["outputs"][0]["shape"] == [2, 10]
    np.testing.assert_array_equal(np.frombuffer(response.body[length:], "<f4").reshape(2, 10), logits)
