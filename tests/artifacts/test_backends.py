"""toolkit.artifacts.backends: one interface over every runtime, and its input and file validation."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import FILES, Export, assert_like_eager, edit_onnx, rewrite_zip
from toolkit.artifacts import backends as backends_module
from toolkit.artifacts.backends import Backend, load_backend
from toolkit.artifacts.metadata import ArtifactMetadata
from toolkit.core.images import MEAN, STD
from toolkit.training.data import make_synthetic, normalize
from toolkit.core.errors import ArtifactError, ConfigError, InputError


@pytest.fixture(scope="module")
def backends(exported: Export) -> dict[str, Backend]:
    return {name: load_backend(exported.dir / file) for name, file in FILES.items()}


@pytest.mark.parametrize("n", [1, 7, 64])
def test_every_backend_gives_the_eager_logits_at_any_batch_size(backends: dict[str, Backend], n: int) -> None:
    x = np.random.default_rng(n).standard_normal((n, 3, 32, 32)).astype(np.float32)
    reference = backends["eager"].predict_logits(x)
    assert reference.shape == (n, 10) and reference.dtype == np.float32
    for name, backend in backends.items():
        assert backend.name == name and backend.provider == "cpu"
        assert_like_eager(name, backend.predict_logits(x), reference)


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
            load_backend(path, check_hash=False)  # a .ts/.pt2 without a manifest entry is refused before reading
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
    # The IR version of our own export: onnx's newest default may be beyond what an admitted onnxruntime reads.
    ir_version = onnx.load(str(exported.dir / "model.onnx")).ir_version
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=ir_version)
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


def test_onnx_runtime_threads_and_providers(exported: Export) -> None:
    for provider in ("auto", "cpu"):  # auto: the CPU, since this onnxruntime build has no CUDA
        backend = load_backend(exported.dir / "model.onnx", threads=2, provider=provider)
        assert backend.providers == ["CPUExecutionProvider"] and backend.provider == "cpu"
        assert backend.session.get_session_options().intra_op_num_threads == 2  # ORT's own intra-op threads
    default = load_backend(exported.dir / "model.onnx").session.get_session_options()
    assert default.intra_op_num_threads == 0  # ONNX Runtime's own choice
    assert default.graph_optimization_level.name == "ORT_ENABLE_ALL"


def test_large_batches_run_in_slices_and_give_the_same_logits(exported: Export, monkeypatch) -> None:
    from toolkit.artifacts import onnx_runtime

    x = np.random.default_rng(3).standard_normal((11, 3, 32, 32)).astype(np.float32)
    whole = load_backend(exported.dir / "model.onnx").predict_logits(x)
    monkeypatch.setattr(onnx_runtime, "SLICE", 4)  # 11 images: slices of 4, 4 and 3
    for threads in (None, 1, 2):
        backend = load_backend(exported.dir / "model.onnx", threads=threads)
        calls: list[int] = []
        real = backend.session.run
        backend.session.run = lambda names, feed: calls.append(len(feed["images"])) or real(names, feed)
        np.testing.assert_allclose(backend.predict_logits(x), whole, atol=1e-5, rtol=1e-5)
        assert calls == [4, 4, 3]  # one after another
        calls.clear()
        backend.predict_logits(x[:4])  # at most one slice: one call
        assert calls == [4]


def test_an_onnx_model_with_the_wrong_number_of_classes_is_an_artifact_error(exported: Export, tmp_path: Path,
                                                                               monkeypatch) -> None:
    """5 logits per image where the metadata names 10 classes: one line, whole batch or slices, any threads."""
    from toolkit.artifacts import onnx_runtime

    weights = numpy_helper.from_array(np.zeros((3 * 32 * 32, 5), np.float32), "weights")
    shape = numpy_helper.from_array(np.array([-1, 3 * 32 * 32], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["images", "shape"], ["flat"]),
                               helper.make_node("MatMul", ["flat", "weights"], ["logits"])], "five",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], [weights, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    helper.set_model_props(model, load_backend(exported.dir / "model.onnx").metadata.to_strings())
    onnx.save_model(model, str(tmp_path / "five.onnx"))
    monkeypatch.setattr(onnx_runtime, "SLICE", 4)
    x = np.zeros((9, 3, 32, 32), np.float32)
    for threads, expected in ((None, r"\(4, 5\) for 4 images; expected \(4, 10\)"),
                              (2, r"\(4, 5\) for 4 images; expected \(4, 10\)")):
        with pytest.raises(ArtifactError, match=r"five\.onnx: the model returned logits of shape " + expected):
            load_backend(tmp_path / "five.onnx", threads=threads).predict_logits(x)


def test_io_binding_runs_the_same_model_on_the_device(exported: Export) -> None:
    """`bind` (device "cpu" here, "cuda" on a GPU): the batch is checked once, copied once, and every `run()`
    leaves the logits on the device until `logits()` copies them out and checks them."""
    backend = load_backend(exported.dir / "model.onnx", threads=1, provider="cpu")
    x = np.random.default_rng(4).standard_normal((5, 3, 32, 32)).astype(np.float32)
    bound = backend.bind(x)
    assert len(bound) == 5
    bound.run()
    np.testing.assert_array_equal(bound.logits(), backend.predict_logits(x))
    bad = x.copy()
    bad[2, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN or inf values in 1 image"):
        backend.bind(bad)
    with pytest.raises(InputError, match="expected dtype float32"):
        backend.bind(x.astype(np.float64))


@pytest.mark.parametrize("available, choice, expected", [
    (["CPUExecutionProvider"], "auto", "cpu"),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "auto", "cuda"),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "auto", "cuda"),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "tensorrt", "tensorrt"),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu", "cpu"),
])
def test_provider_choice(available: list[str], choice: str, expected: str) -> None:
    """`auto` is CUDA when the build has it (TensorRT only on request: it builds engines on first use)."""
    from toolkit.artifacts.onnx_runtime import resolve_provider

    assert resolve_provider(choice, available) == expected


def test_a_missing_provider_is_one_line_naming_the_build_and_the_fix(exported: Export, monkeypatch) -> None:
    from importlib import metadata

    for choice, name in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        with pytest.raises(ConfigError) as info:
            load_backend(exported.dir / "model.onnx", provider=choice)
        message = str(info.value)
        assert "\n" not in message and f"--provider {choice}" in message and f"has no {name}" in message
        assert "onnxruntime 1." in message and "pip install 'cifar-toolkit[gpu]'" in message
    # Both builds installed: they share the `onnxruntime` module, and the message says so.
    real = metadata.version
    monkeypatch.setattr(metadata, "version",
                        lambda name: "1.31.1" if name == "onnxruntime-gpu" else real(name))
    with pytest.raises(ConfigError, match=r"onnxruntime 1\.\d+\.\d+ and onnxruntime-gpu 1\.31\.1 are both installed "
                                          r"and shadow each other .* pip uninstall -y onnxruntime onnxruntime-gpu"):
        load_backend(exported.dir / "model.onnx", provider="cuda")
    with pytest.raises(ConfigError, match="--provider: expected one of auto, cpu, cuda, tensorrt, got 'gpu'"):
        load_backend(exported.dir / "model.onnx", provider="gpu")
    with pytest.raises(ConfigError, match=r"model\.ts is a torchscript file, which runs on the CPU with torch"):
        load_backend(exported.dir / "model.ts", provider="cuda")


def test_a_provider_that_cannot_start_is_an_error_not_a_silent_fall_back(exported: Export, monkeypatch) -> None:
    """A GPU build whose CUDA libraries are missing lists the provider but runs on the CPU: refused, one line."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: None, raising=False)
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):  # onnxruntime's own note, before ours
        with pytest.raises(ConfigError) as info:
            load_backend(exported.dir / "model.onnx", provider="cuda")
    message = str(info.value)
    assert "could not start CUDAExecutionProvider" in message and "fell back to CPUExecutionProvider" in message
    assert "\n" not in message


def _sessions_fail_on(monkeypatch, provider: str, error: Exception) -> None:
    """From now on an ONNX Runtime session whose providers include `provider` fails with `error`, the others start
    as usual: a provider whose library fails, on a machine and build that have it."""
    import onnxruntime

    real = onnxruntime.InferenceSession

    def session(model, options=None, providers=None, **kwargs):
        if provider in [p[0] if isinstance(p, tuple) else p for p in providers or []]:
            raise error
        return real(model, options, providers=providers, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    if provider != "CPUExecutionProvider":
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [provider, "CPUExecutionProvider"])
        monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: None, raising=False)


def test_a_provider_or_library_failure_is_not_called_an_invalid_model(exported: Export, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """What ONNX Runtime says when the file is no model it can run, when a GPU provider fails (here a CUDA error,
    which ONNX Runtime raises as a Fail like a model's error) and when the library itself fails on the CPU: three
    different one-line errors, each quoting ONNX Runtime."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

    bad = tmp_path / "bad.onnx"
    shutil.copy(exported.dir / "model.onnx", bad)
    edit_onnx(bad, lambda m: setattr(m.graph.node[0], "op_type", "NoSuchOperator"))
    with pytest.raises(ArtifactError) as info:
        load_backend(bad)
    assert str(info.value).startswith(f"{bad}: not a loadable ONNX model (InvalidGraph: ")
    assert "NoSuchOperator" in str(info.value)

    cuda = "[ONNXRuntimeError] : 1 : FAIL : CUDA failure 100: no CUDA-capable device is detected ; GPU=0"
    with monkeypatch.context() as patch:
        _sessions_fail_on(patch, "CUDAExecutionProvider", Fail(cuda))
        with pytest.raises(ConfigError) as info:
            load_backend(exported.dir / "model.onnx", provider="cuda")
        message = str(info.value)
        assert message.startswith(f"--provider cuda: ONNX Runtime could not start CUDAExecutionProvider for "
                                  f"{exported.dir / 'model.onnx'} (Fail: {cuda}); the model itself starts on the CPU "
                                  "(--provider cpu)") and "\n" not in message, message
        with pytest.raises(ArtifactError, match=r"bad\.onnx: not a loadable ONNX model \(InvalidGraph: "):
            load_backend(bad, provider="cuda")  # fails on the CPU too: the model, whatever CUDA said

    broken = "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: bad_alloc"
    with monkeypatch.context() as patch:
        _sessions_fail_on(patch, "CPUExecutionProvider", RuntimeException(broken))
        with pytest.raises(ConfigError) as info:
            load_backend(exported.dir / "model.onnx", provider="cpu")
    assert str(info.value).startswith(f"{exported.dir / 'model.onnx'}: ONNX Runtime failed to start "
                                      f"CPUExecutionProvider (RuntimeException: {broken}): an error of this "
                                      "onnxruntime build (onnxruntime 1.")


def test_a_model_whose_names_are_not_utf8_is_an_invalid_model_and_prints_nothing(exported: Export, tmp_path: Path,
                                                                                    capsys) -> None:
    """ONNX Runtime fails on such a file with a UnicodeDecodeError (a ValueError), retries on the CPU and print()s
    that it did: an invalid model all the same, and stdout (`toolkit predict --json`) stays clean."""
    data = (exported.dir / "model.onnx").read_bytes()
    at = data.index(b"images") + 1  # the input's name, first mentioned by the first node
    path = tmp_path / "names.onnx"
    path.write_bytes(data[:at] + b"\xff" + data[at + 1:])
    capsys.readouterr()
    with pytest.raises(ArtifactError) as info:
        load_backend(path)
    assert str(info.value).startswith(f"{path}: not a loadable ONNX model (UnicodeDecodeError: ")
    assert capsys.readouterr().out == ""


def test_without_onnxruntime_an_onnx_file_is_one_line_saying_what_to_install(exported: Export, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails as if not installed
    monkeypatch.delitem(sys.modules, "toolkit.artifacts.onnx_runtime", raising=False)
    with pytest.raises(ConfigError) as info:
        load_backend(exported.dir / "model.int8.onnx")
    assert str(info.value) == (f"{exported.dir / 'model.int8.onnx'}: onnx-int8 files run on onnxruntime, which is not "
                               "installed: pip install 'cifar-toolkit[cpu]' for the CPU build, or 'cifar-toolkit[gpu]' "
                               "for CUDA and TensorRT (never both)")


def test_max_batch_bounds_each_call_and_large_batches_run_in_chunks(exported: Export, backends: dict[str, Backend],
                                                                     monkeypatch) -> None:
    x = np.random.default_rng(0).standard_normal((7, 3, 32, 32)).astype(np.float32)
    reference = backends["eager"].predict_logits(x)
    monkeypatch.setattr(backends_module, "CHUNK", 3)  # 7 images: runtime calls of 3, 3 and 1
    for name, file in FILES.items():
        backend = load_backend(exported.dir / file, max_batch=7)
        assert backend.max_batch == 7
        assert_like_eager(name, backend.predict_logits(x), reference)
        with pytest.raises(InputError) as info:
            backend.predict_logits(np.concatenate([x, x[:1]]))
        assert "batch of 8 images exceeds the limit of 7" in str(info.value) and "--max-batch" in str(info.value)
    assert load_backend(exported.dir / "model.onnx", max_batch=None).predict_logits(x).shape == (7, 10)
    assert load_backend(exported.dir / "model.onnx").max_batch == backends_module.DEFAULT_MAX_BATCH
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="--max-batch: must be an integer >= 1"):
            load_backend(exported.dir / "model.onnx", max_batch=bad)


def test_any_tensor_or_array_is_checked_before_conversion(backends: dict[str, Backend]) -> None:
    """dtypes numpy cannot hold (bfloat16), sparse/meta/nested tensors and masked arrays are InputErrors, not
    crashes; float32 in the other byte order and read-only arrays are accepted."""
    good = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    reference = backends["eager"].predict_logits(good)
    rejected = {
        "bfloat16": (torch.zeros(2, 3, 32, 32, dtype=torch.bfloat16), "got bfloat16"),
        "complex": (torch.zeros(2, 3, 32, 32, dtype=torch.complex64), "got complex64"),
        "sparse": (torch.zeros(2, 3, 32, 32).to_sparse(), "sparse_coo"),
        "meta": (torch.zeros(2, 3, 32, 32, device="meta"), "meta device"),
        "nested": (torch.nested.nested_tensor([torch.zeros(3, 32, 32)] * 2, layout=torch.jagged), "nested"),
        "masked": (np.ma.masked_array(good), "MaskedArray"),
        "object": (good.astype(object), "got object"),
    }
    swapped = good.astype(">f4")
    readonly = good.copy()
    readonly.flags.writeable = False
    for name, backend in backends.items():
        for case, (batch, fragment) in rejected.items():
            with pytest.raises(InputError, match=fragment):
                backend.predict_logits(batch)
        for batch in (swapped, readonly, torch.from_numpy(good).requires_grad_(), np.asfortranarray(good)):
            assert_like_eager(name, backend.predict_logits(batch), reference)


def test_inputs_that_overflow_the_model_are_an_error_not_nan_logits(backends: dict[str, Backend]) -> None:
    x = np.zeros((3, 3, 32, 32), np.float32)
    x[1] = 3e38  # finite, but the first layer overflows to inf and the logits become NaN
    for name, backend in backends.items():
        if backend.format.precision == "int8":  # quantizing saturates the input to the calibrated range
            assert np.isfinite(backend.predict_logits(x)).all(), name
            continue
        with pytest.raises(InputError) as info:
            backend.predict_logits(x)
        message = str(info.value)
        assert "non-finite logits for 1 image(s), first at index 1" in message and "3e+38" in message, name


def test_a_model_that_gives_nan_for_ordinary_inputs_is_an_artifact_error(exported: Export, tmp_path: Path) -> None:
    def nan_bias(model) -> None:
        bias = next(t for t in model.graph.initializer if t.name == "fc3.bias")
        values = numpy_helper.to_array(bias).copy()
        values[3] = np.nan
        bias.CopyFrom(numpy_helper.from_array(values, bias.name))

    path = tmp_path / "nan.onnx"
    shutil.copy(exported.dir / "model.onnx", path)
    edit_onnx(path, nan_bias)
    with pytest.raises(ArtifactError, match=r"nan\.onnx: the model gives non-finite logits for 2 image\(s\), first at "
                                            r"index 0, whose values are ordinary"):
        load_backend(path).predict_logits(np.zeros((2, 3, 32, 32), np.float32))


def test_a_model_that_returns_the_wrong_shape_is_an_artifact_error(backends: dict[str, Backend]) -> None:
    class Broken(Backend):
        def _run(self, batch: np.ndarray) -> np.ndarray:
            return np.zeros((len(batch), 3), np.float32)

    broken = Broken(Path("broken.onnx"), backends["onnx"].format, backends["eager"].metadata)
    with pytest.raises(ArtifactError, match=r"broken\.onnx: the model returned logits of shape \(2, 3\) for 2 images; "
                                            r"expected \(2, 10\)"):
        broken.predict_logits(np.zeros((2, 3, 32, 32), np.float32))


# --- Files that are not what their suffix says, or that would run code while loading -------------------------

class _Payload:
    """Unpickling this creates `marker` (`io.open(marker, "w")`): a harmless stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _torch_save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _edit_json(edit):
    def apply(raw: bytes) -> bytes:
        value = json.loads(raw)
        edit(value)
        return json.dumps(value).encode()
    return apply


def _pickled_weight(marker: Path):
    def edit(config) -> None:
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True  # torch.export.load: torch.load(weights_only=False) of data/weights/weight_0
    return {"model/data/weights/model_weights_config.json": _edit_json(edit),
            "model/data/weights/weight_0": _torch_save(_Payload(marker))}


def _sympy_expression(marker: Path):
    def edit(text: bytes) -> bytes:  # sympy.sympify evaluates the string as Python
        symbol = "Symbol('s77', positive=True, integer=True)"
        assert symbol.encode() in text
        return text.replace(symbol.encode(), f"open('{marker}', 'w') and {symbol}".encode(), 1)
    return {"model/models/model.json": edit}


def _guard_code(marker: Path):
    def edit(program) -> None:  # ExportedProgram.module() exec()s each guard
        program["guards_code"] = [f"open('{marker}', 'w') is not None"]
    return {"model/models/model.json": _edit_json(edit)}


def _os_target(marker: Path):
    def edit(program) -> None:
        program["graph_module"]["graph"]["nodes"][-1]["target"] = "torch.serialization.os.system"
    return {"model/models/model.json": _edit_json(edit)}


def _setstate(definition: bytes):
    """A `__setstate__` method added to the model's class, its `def` line written as `definition`."""
    def craft(marker: Path):
        def edit(code: bytes) -> bytes:  # TorchScript runs __setstate__ while loading
            return code + b"\n  " + definition + b"(self, state: Tuple[int]) -> None:\n    pass\n"
        return {"model/code/__torch__/toolkit/training/models.py": edit}
    return craft


# (case, source file, suffix to write, how: replace / add / whole file, fragments of the error)
_CRAFTED = [
    ("ts-data-pkl", "model.ts", ".ts", lambda m: {"model/data.pkl": pickle.dumps(_Payload(m), protocol=2)},
     ["refusing to load this TorchScript file", "data.pkl refers to io.open"]),
    ("ts-constants-pkl", "model.ts", ".ts", lambda m: {"model/constants.pkl": pickle.dumps((_Payload(m),), protocol=2)},
     ["refusing to load this TorchScript file", "constants.pkl refers to io.open"]),
    ("ts-stack-global", "model.ts", ".ts", lambda m: {"model/data.pkl": pickle.dumps(_Payload(m), protocol=4)},
     ["refusing to load this TorchScript file", "data.pkl refers to STACK_GLOBAL"]),
    ("ts-setstate", "model.ts", ".ts", _setstate(b"def __setstate__"),
     ["refusing to load this TorchScript file", "models.py defines __setstate__ (line "]),
    ("ts-setstate-two-spaces", "model.ts", ".ts", _setstate(b"def  __setstate__"),
     ["refusing to load this TorchScript file", "models.py defines __setstate__ (line "]),
    ("ts-setstate-tab", "model.ts", ".ts", _setstate(b"def\t__setstate__"),
     ["refusing to load this TorchScript file", "models.py defines __setstate__ (line "]),
    ("ts-setstate-continued", "model.ts", ".ts", _setstate(b"def \\\n    __setstate__"),
     ["refusing to load this TorchScript file", "models.py defines __setstate__ (line "]),
    ("ts-setstate-called", "model.ts", ".ts", _setstate(b"def f(self, x: int) -> None:\n    self.__setstate__(x)\n  def g"),
     ["refusing to load this TorchScript file", "models.py refers to __setstate__ (line "]),
    ("ts-setstate-string", "model.ts", ".ts", _setstate(b"# def __setstate__\n  def g"),
     ["refusing to load this TorchScript file", "models.py mentions __setstate__ in a string or comment"]),
    ("ts-code-not-python", "model.ts", ".ts", _setstate(b"def f(self) -> None: {{\n  def g"),
     ["refusing to load this TorchScript file", "models.py is not code as torch.jit.save writes it (SyntaxError"]),
    ("torch-save-as-ts", None, ".ts", lambda m: _torch_save({"x": _Payload(m)}),
     ["not a TorchScript file", "no constants.pkl", "torch.save"]),
    ("pt2-as-ts", "model.pt2", ".ts", None, ["not a TorchScript file", "looks like a torch.export .pt2"]),
    ("onnx-as-ts", "model.onnx", ".ts", None, ["not a TorchScript file (not a zip archive"]),
    ("ts-as-pt2", "model.ts", ".pt2", None, ["not a torch.export (.pt2) file", "looks like a TorchScript file"]),
    ("onnx-as-pt2", "model.onnx", ".pt2", None, ["not a torch.export (.pt2) file (not a zip archive"]),
    ("torch-save-as-pt2", None, ".pt2", lambda m: _torch_save({"x": _Payload(m)}),
     ["not a torch.export (.pt2) file", "no archive_format"]),
    ("pt2-sample-inputs", "model.pt2", ".pt2",
     lambda m: {"model/data/sample_inputs/model.pt": _torch_save(((_Payload(m),), {}))},
     ["refusing to load", "data/sample_inputs/model.pt does not load as plain tensors"]),
    ("pt2-pickled-weight", "model.pt2", ".pt2", _pickled_weight, ["refusing to load", "'conv1.weight'", "(pickled)"]),
    ("pt2-opaque-object", "model.pt2", ".pt2",
     lambda m: {"+model/data/constants/opaque_obj_0": pickle.dumps(_Payload(m))},
     ["refusing to load", "unexpected entry 'data/constants/opaque_obj_0'"]),
    ("pt2-aoti", "model.pt2", ".pt2", lambda m: {"+model/data/aotinductor/model/model.so": b"\x7fELF"},
     ["refusing to load", "AOTInductor compiled native code"]),
    ("pt2-sympy", "model.pt2", ".pt2", _sympy_expression, ["refusing to load", "symbolic expression", "open("]),
    ("pt2-guards", "model.pt2", ".pt2", _guard_code, ["refusing to load", "guard code"]),
    ("pt2-target", "model.pt2", ".pt2", _os_target, ["refusing to load", "'torch.serialization.os.system'"]),
]


@pytest.mark.parametrize("case, source, suffix, craft, fragments", _CRAFTED, ids=[c[0] for c in _CRAFTED])
def test_crafted_archives_are_refused_without_running_their_payload(exported: Export, tmp_path: Path, case: str,
                                                                   source: str | None, suffix: str, craft,
                                                                   fragments: list[str]) -> None:
    """Each payload would create `marker` if unpickled or evaluated. Plain torch.export.load (torch 2.14) does run
    the sample-inputs, pickled-weight, opaque-object and sympy payloads, and `.module()` the guard code; whether
    torch.jit.load refuses the pickles depends on the torch release, so the archive check refuses them first.
    Loading must be a one-line ArtifactError and the marker must not exist."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / f"{case}{suffix}"
    recipe = craft(marker) if craft else None
    if isinstance(recipe, bytes):
        path.write_bytes(recipe)
    elif recipe is None:
        shutil.copy(exported.dir / source, path)
    else:
        add = {k[1:]: v for k, v in recipe.items() if k.startswith("+")}
        replace = {k: v for k, v in recipe.items() if not k.startswith("+")}
        rewrite_zip(exported.dir / source, path, replace=replace, add=add)
    with pytest.raises(ArtifactError) as info:
        load_backend(path, check_hash=False)  # no manifest: what is refused here is the archive itself
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not marker.exists(), f"{case}: the payload ran"


def _with_entry_first(src: Path, dst: Path, name: str, content: bytes) -> Path:
    """`src` copied to `dst` with an extra entry `name` holding `content` written first: where `name` is one of
    `src`'s entries (or that name in other letter case), the archive then holds it twice, the crafted one first."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name", which is the point
        zout.writestr(name, content)
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
    return dst


@pytest.mark.parametrize("source, name, crafted, fragment", [
    ("model.ts", "model/data.pkl", lambda m: pickle.dumps(_Payload(m), protocol=2),
     "it holds two entries named 'model/data.pkl' (zip readers differ on which one that name means)"),
    ("model.ts", "model/DATA.pkl", lambda m: pickle.dumps(_Payload(m), protocol=2),
     "its entries 'model/DATA.pkl' and 'model/data.pkl' are one name to torch's reader, which ignores case"),
    ("model.pt2", "model/data/sample_inputs/model.pt", lambda m: _torch_save(((_Payload(m),), {})),
     "it holds two entries named 'model/data/sample_inputs/model.pt' (zip readers differ on which one that name "
     "means)"),
], ids=["ts-same-name", "ts-other-case", "pt2-same-name"])
def test_an_archive_with_two_entries_of_one_name_is_refused(exported: Export, tmp_path: Path, source: str,
                                                           name: str, crafted, fragment: str) -> None:
    """Python's zipfile reads the last of two same-named entries and torch's reader may read the first (and takes
    names in any letter case for one): the checks would vouch for one entry and torch load the other."""
    marker = tmp_path / "payload-ran"
    path = _with_entry_first(exported.dir / source, tmp_path / f"twice{Path(source).suffix}", name, crafted(marker))
    with pytest.raises(ArtifactError) as info:
        load_backend(path, check_hash=False)
    what = "TorchScript" if source.endswith(".ts") else "torch.export (.pt2)"
    assert str(info.value) == f"{path}: refusing to load this {what} file: {fragment}"
    assert not marker.exists()


def test_code_in_other_letter_case_is_checked_as_code(exported: Export, tmp_path: Path) -> None:
    """torch.jit.load finds `code/...py` under `CODE/...PY` too: those entries are checked like any code."""
    def rename(name: str) -> str:
        return name.replace("model/code/", "model/CODE/").removesuffix(".py") + ".PY" if name.endswith(".py") else \
            name.replace("model/code/", "model/CODE/")

    path = tmp_path / "cased.ts"
    with zipfile.ZipFile(exported.dir / "model.ts") as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "model/code/__torch__/toolkit/training/models.py":
                data += b"\n  def __setstate__(self, state: Tuple[int]) -> None:\n    pass\n"
            zout.writestr(rename(info.filename), data)
        zout.writestr("model/code/unused.py", b"")  # something under code/ in lower case, as the old check wanted
    with pytest.raises(ArtifactError) as info:
        load_backend(path, check_hash=False)
    assert str(info.value).startswith(f"{path}: refusing to load this TorchScript file: CODE/__torch__/toolkit/"
                                      "training/models.PY defines __setstate__")


def test_an_untouched_rewrite_still_loads(exported: Export, tmp_path: Path) -> None:
    """The crafted cases above differ from a loadable file only by their payload."""
    for name in ("model.ts", "model.pt2"):
        backend = load_backend(rewrite_zip(exported.dir / name, tmp_path / name), check_hash=False)
        assert backend.predict_logits(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 10)


def test_onnx_with_external_data_is_refused(exported: Export, tmp_path: Path) -> None:
    def external(model) -> None:
        weight = model.graph.initializer[0]
        weight.ClearField("raw_data")
        weight.data_location = onnx.TensorProto.EXTERNAL
        weight.external_data.add(key="location", value="../../secret.bin")

    path = tmp_path / "external.onnx"
    shutil.copy(exported.dir / "model.onnx", path)
    edit_onnx(path, external)
    with pytest.raises(ArtifactError, match=r"stored in an external file '\.\./\.\./secret\.bin'; only self-contained"):
        load_backend(path)
