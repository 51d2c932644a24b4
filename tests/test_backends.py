"""toolkit.backends: one interface over every runtime, and its input and file validation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from tests._fixtures import Export, edit_onnx, exported  # noqa: F401 - `exported` is a fixture
from toolkit.backends import ArtifactMetadata, Backend, default_providers, load_backend
from toolkit.data import MEAN, STD, make_synthetic, normalize
from toolkit.errors import ArtifactError, InputError

FILES = {"eager": "model.safetensors", "torchscript": "model.ts", "pt2": "model.pt2", "onnxruntime": "model.onnx"}


@pytest.fixture(scope="module")
def backends(exported: Export) -> dict[str, Backend]:
    return {name: load_backend(exported.dir / file) for name, file in FILES.items()}


@pytest.mark.parametrize("n", [1, 7, 64])
def test_every_backend_gives_the_eager_logits_at_any_batch_size(backends: dict[str, Backend], n: int) -> None:
    x = np.random.default_rng(n).standard_normal((n, 3, 32, 32)).astype(np.float32)
    reference = backends["eager"].predict_logits(x)
    assert reference.shape == (n, 10) and reference.dtype == np.float32
    for name, backend in backends.items():
        assert backend.name == name
        logits = backend.predict_logits(x)
        assert logits.shape == (n, 10) and logits.dtype == np.float32, name
        np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4, err_msg=name)


def test_torch_tensors_and_numpy_arrays_give_the_same_logits(backends: dict[str, Backend]) -> None:
    x = torch.randn(5, 3, 32, 32)
    for backend in backends.values():
        np.testing.assert_array_equal(backend.predict_logits(x), backend.predict_logits(x.numpy()))


def test_metadata_normalization_is_the_training_normalization() -> None:
    images = make_synthetic(10, 10)[1].images
    meta = ArtifactMetadata([f"c{i}" for i in range(10)], list(MEAN), list(STD))
    np.testing.assert_allclose(meta.normalize(images), normalize(images).numpy(), atol=1e-6)
    other = ArtifactMetadata(meta.class_names, [0.4, 0.5, 0.6], [0.2, 0.3, 0.4]).normalize(images)
    assert not np.allclose(other, normalize(images).numpy(), atol=1e-3)


def test_a_run_or_export_folder_loads_as_eager(exported: Export) -> None:
    for folder in (exported.run, exported.dir):
        backend = load_backend(folder)
        assert backend.name == "eager" and backend.path == folder / "model.safetensors"


_GOOD = np.zeros((2, 3, 32, 32), dtype=np.float32)
_NAN, _INF = _GOOD.copy(), _GOOD.copy()
_NAN[1, 2, 3, 4] = np.nan
_INF[0, 0, 0, 0] = -np.inf


@pytest.mark.parametrize("batch, fragments", [
    (_GOOD[0], ["rank-4", "rank 3", "3×32×32"]),
    (_GOOD[None], ["rank-4", "rank 5"]),
    (np.zeros((2, 1, 32, 32), np.float32), ["expected 3 channels", "got 1", "2×1×32×32"]),
    (np.zeros((2, 3, 28, 32), np.float32), ["expected 32×32", "got 28×32"]),
    (_GOOD.astype(np.float64), ["float32", "float64"]),
    (np.zeros((2, 3, 32, 32), np.uint8), ["float32", "uint8"]),
    (torch.zeros(2, 3, 32, 32, dtype=torch.float16), ["float32", "float16"]),
    (_NAN, ["NaN or inf", "index 1"]),
    (_INF, ["NaN or inf", "index 0"]),
    (np.zeros((0, 3, 32, 32), np.float32), ["empty batch", "0×3×32×32"]),
    (_GOOD.tolist(), ["numpy array or torch tensor", "list"]),
], ids=["rank3", "rank5", "channels", "size", "float64", "uint8", "float16", "nan", "inf", "empty", "list"])
def test_bad_batches_are_rejected_by_every_backend(backends: dict[str, Backend], batch, fragments: list[str]) -> None:
    for name, backend in backends.items():
        with pytest.raises(InputError) as info:
            backend.predict_logits(batch)
        message = str(info.value)
        assert "\n" not in message and str(backend.path) in message, message
        for fragment in fragments:
            assert fragment in message, f"{name}: {fragment!r} not in {message!r}"


@pytest.mark.parametrize("suffix", [".onnx", ".ts", ".pt2", ".safetensors"])
def test_missing_truncated_and_non_model_files(exported: Export, tmp_path: Path, suffix: str) -> None:
    name = next(f for f in FILES.values() if f.endswith(suffix))
    data = (exported.dir / name).read_bytes()
    cases = {"missing": None, "truncated": data[: len(data) // 2], "text": b"not a model at all\n"}
    for case, content in cases.items():
        path = tmp_path / f"{case}{suffix}"
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ArtifactError) as info:
            load_backend(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, f"{case}: {message}"
        if case == "missing":
            assert "no such file" in message


def test_unsupported_suffix(tmp_path: Path) -> None:
    (tmp_path / "model.tflite").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"model\.tflite: unsupported artifact type '\.tflite'"):
        load_backend(tmp_path / "model.tflite")


def test_onnx_with_another_input_shape_is_refused(exported: Export, tmp_path: Path) -> None:
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["logits"])], "other",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 64, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 64, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, load_backend(exported.dir / "model.onnx").metadata.to_strings())
    onnx.save_model(model, str(tmp_path / "other.onnx"))
    with pytest.raises(ArtifactError) as info:
        load_backend(tmp_path / "other.onnx")
    assert "other.onnx" in str(info.value) and "[N, 3, 32, 32]" in str(info.value) and "64, 64]" in str(info.value)


def test_onnx_without_toolkit_metadata_is_refused(exported: Export, tmp_path: Path) -> None:
    path = tmp_path / "bare.onnx"
    shutil.copy(exported.dir / "model.onnx", path)
    edit_onnx(path, lambda m: m.ClearField("metadata_props"))
    with pytest.raises(ArtifactError, match="no toolkit metadata"):
        load_backend(path)


def test_onnx_runtime_threads_and_providers(exported: Export, monkeypatch) -> None:
    import onnxruntime

    backend = load_backend(exported.dir / "model.onnx", threads=1, providers=["CPUExecutionProvider"])
    assert backend.providers == ["CPUExecutionProvider"]
    assert backend.session.get_session_options().intra_op_num_threads == 1
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert default_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
