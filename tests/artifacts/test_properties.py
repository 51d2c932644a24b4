"""Property-based tests (hypothesis) of the inference interface and `toolkit predict`.

Whatever goes in (any rank, shape, dtype, NaN/inf anywhere, empty or oversized batches, arbitrary bytes
as image files, valid images of any size and mode), the result is either right (finite float32 N×10
logits equal to the eager model's; labels with probabilities) or a clear `ToolkitError` naming the
expected and the actual value: never another exception, a hang or a silently wrong answer.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.helpers import CLASSES, FILES, Export, assert_like_eager, run_cli
from toolkit.artifacts.backends import Backend, load_backend
from toolkit.core.errors import ArtifactError, ConfigError, DataError, InputError
from toolkit.apps.predict import predict_images

MAX_BATCH = 8  # small, so that batches above the bound stay cheap
PROPERTY = settings(max_examples=40, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = ["float32"] * 6 + ["uint8", "int64", "float16", "float64", "bool"]


@pytest.fixture(scope="module")
def backends(exported: Export) -> dict[str, Backend]:
    return {name: load_backend(exported.dir / file, max_batch=MAX_BATCH) for name, file in FILES.items()}


# --- The inference interface -------------------------------------------------------------------------------

@st.composite
def batches(draw: st.DrawFn) -> np.ndarray | torch.Tensor:
    """Any numpy array or torch tensor, biased towards the model's input so that many examples reach the
    runtimes: two thirds have the N×3×32×32 shape (N from 0 to MAX_BATCH + 3), the rest any rank from 0
    to 6 and any shape with at most 20,000 elements; dtypes, NaN/inf and views vary independently."""
    if draw(st.sampled_from([True, True, False])):
        shape = [draw(st.integers(0, MAX_BATCH + 3)), 3, 32, 32]
    else:
        rank = draw(st.integers(0, 6))
        shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 31, 32, 33]) | st.integers(0, 40),
                              min_size=rank, max_size=rank))
        while math.prod(shape) > 20_000:
            shape[shape.index(max(shape))] //= 2
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1.0, 1.0, 3.0, 0.01]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = np.asarray(rng.standard_normal(shape) * scale).astype(dtype)  # rank 0: a 0-d array
    if x.size and x.dtype.kind == "f":
        for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):  # NaN/inf at random positions
            x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    kind = draw(st.sampled_from(["numpy", "numpy", "torch", "view"]))
    if kind == "torch":
        return torch.from_numpy(x)
    if kind == "view" and x.ndim >= 1 and x.shape[0] >= 1:  # a read-only broadcast view of the first item
        return np.broadcast_to(x[:1], x.shape)
    return x


def _is_valid(x: np.ndarray | torch.Tensor) -> bool:
    array = np.asarray(x)
    return (array.ndim == 4 and 1 <= array.shape[0] <= MAX_BATCH and array.shape[1:] == (3, 32, 32)
            and array.dtype == np.float32 and bool(np.isfinite(array).all()))


def _expected_fragment(x: np.ndarray | torch.Tensor) -> str:
    """What the InputError for an invalid batch must say: the first check it fails, with the actual value."""
    shape = tuple(x.shape)
    dtype = str(x.dtype).removeprefix("torch.")
    if len(shape) != 4:
        return f"expected a rank-4 N×3×32×32 float32 batch, got rank {len(shape)}"
    if shape[0] == 0:
        return "empty batch"
    if shape[1] != 3:
        return f"expected 3 channels (N×3×32×32 float32), got {shape[1]}"
    if shape[2:] != (32, 32):
        return f"expected 32×32 images (N×3×32×32 float32), got {shape[2]}×{shape[3]}"
    if shape[0] > MAX_BATCH:
        return f"batch of {shape[0]} images exceeds the limit of {MAX_BATCH}"
    if dtype != "float32":
        return f"expected dtype float32 (normalized pixels), got {dtype}"
    return "batch holds NaN or inf values"


@settings(PROPERTY, max_examples=60)
@given(x=batches())
def test_every_backend_returns_the_eager_logits_or_a_clear_input_error(backends: dict[str, Backend], x) -> None:
    if _is_valid(x):
        reference = backends["eager"].predict_logits(x)
        for name, backend in backends.items():
            assert_like_eager(name, backend.predict_logits(x), reference)
        return
    fragment = _expected_fragment(x)
    for name, backend in backends.items():
        with pytest.raises(InputError) as info:  # any other exception fails the test
            backend.predict_logits(x)
        message = str(info.value)
        assert message.startswith(f"{backend.path}: ") and "\n" not in message, message
        assert fragment in message, f"{name}: {fragment!r} not in {message!r}"


@PROPERTY
@given(n=st.integers(1, MAX_BATCH), seed=st.integers(0, 2**32 - 1), scale=st.floats(0.0, 5.0),
       as_tensor=st.booleans())
def test_valid_batches_give_the_eager_logits_on_every_backend(backends: dict[str, Backend], n: int, seed: int,
                                                              scale: float, as_tensor: bool) -> None:
    x = (np.random.default_rng(seed).standard_normal((n, 3, 32, 32)) * scale).astype(np.float32)
    reference = backends["eager"].predict_logits(x)
    for name, backend in backends.items():
        assert_like_eager(name, backend.predict_logits(torch.from_numpy(x) if as_tensor else x), reference)


@PROPERTY
@given(scale=st.sampled_from([1e3, 1e10, 1e20, 1e30, 3e38]), seed=st.integers(0, 2**32 - 1),
       n=st.integers(1, MAX_BATCH))
def test_huge_finite_values_give_finite_logits_or_a_clear_error(backends: dict[str, Backend], scale: float,
                                                                 seed: int, n: int) -> None:
    """Finite inputs far outside normalized pixels (±3) can overflow a model: that must not be NaN logits."""
    x = np.clip(np.random.default_rng(seed).standard_normal((n, 3, 32, 32)) * scale, -3e38, 3e38).astype(np.float32)
    for name, backend in backends.items():
        try:
            logits = backend.predict_logits(x)
        except InputError as exc:
            assert "non-finite logits" in str(exc) and "normalized pixels" in str(exc), str(exc)
        else:
            assert logits.shape == (n, 10) and logits.dtype == np.float32 and np.isfinite(logits).all(), name


@settings(PROPERTY, max_examples=20)
@given(value=st.none() | st.integers() | st.floats() | st.text(max_size=5) | st.binary(max_size=5)
       | st.lists(st.floats(width=32), max_size=4) | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
def test_anything_that_is_not_an_array_is_an_input_error(backends: dict[str, Backend], value) -> None:
    for backend in backends.values():
        with pytest.raises(InputError, match="expected a N×3×32×32 float32 numpy array or torch tensor, got"):
            backend.predict_logits(value)


@st.composite
def damaged(draw: st.DrawFn, original: bytes) -> bytes:
    data = bytearray(original)
    if draw(st.booleans()):
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 20))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(PROPERTY, max_examples=20)
@given(data=st.data(), name=st.sampled_from(["model.ts", "model.pt2", "model.onnx", "model.fp16.onnx",
                                             "model.int8.onnx"]))
def test_a_damaged_model_file_loads_or_is_an_artifact_error(exported: Export, workdir: Path, data, name: str) -> None:
    """Truncated or byte-flipped files: a clear ArtifactError, or (bytes that do not matter, such as padding or a
    weight) a backend whose logits are still finite N×10 or a clear error."""
    path = workdir / f"damaged{Path(name).suffix}"
    path.write_bytes(data.draw(damaged((exported.dir / name).read_bytes())))
    try:
        backend = load_backend(path, check_hash=False)  # no manifest: the file's own checks are under test
    except ArtifactError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), str(exc)
        return
    try:
        logits = backend.predict_logits(np.zeros((2, 3, 32, 32), np.float32))
    except ArtifactError as exc:  # e.g. a weight turned into NaN
        assert "non-finite logits" in str(exc), str(exc)
    else:
        assert logits.shape == (2, 10) and logits.dtype == np.float32 and np.isfinite(logits).all()


# --- toolkit predict -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("properties")


def _valid_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    """Random bytes, random bytes behind an image format's magic number, or a valid PNG with bytes changed or cut."""
    kind = draw(st.sampled_from(["random", "magic", "mutated", "truncated"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "magic":
        magic = draw(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00",
                                      b"RIFF\x00\x00\x00\x00WEBP", b"P6\n"]))
        return magic + draw(st.binary(max_size=2048))
    data = bytearray(_valid_png(draw(st.integers(0, 1000))))
    if kind == "truncated":
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def _check_predictions(predictions, files: list[Path]) -> None:
    assert [p.image for p in predictions] == [str(f) for f in files]
    for p in predictions:
        assert p.label in CLASSES and 0.0 <= p.probability <= 1.0
        assert [c for c, _ in p.top] and all(c in CLASSES for c, _ in p.top)
        assert abs(sum(q for _, q in p.top) - 1.0) < 1e-5  # top_k=10: every class


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # PIL warns about some corrupt headers, then fails
@settings(PROPERTY, max_examples=60)
@given(data=garbage(), suffix=st.sampled_from([".png", ".jpg"]))
def test_predict_on_arbitrary_bytes_labels_or_names_the_file(exported: Export, workdir: Path, data: bytes,
                                                             suffix: str) -> None:
    path = workdir / f"garbage{suffix}"
    path.write_bytes(data)
    try:
        predictions = predict_images(exported.dir / "model.onnx", [path], top_k=10)
    except DataError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert "not a readable image" in message or "cannot read image" in message, message
    else:  # a mutated PNG can still decode (a changed pixel byte): then it is labelled like any image
        _check_predictions(predictions, [path])


# (mode, format) pairs PIL can write; P and 1 come from converting RGB.
_MODES = [("RGB", "PNG"), ("RGB", "JPEG"), ("L", "PNG"), ("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("P", "GIF"),
          ("LA", "PNG"), ("1", "PNG"), ("I;16", "PNG"), ("CMYK", "JPEG"), ("RGB", "BMP"), ("RGB", "TIFF"),
          ("F", "TIFF"), ("RGBA", "WEBP")]


@st.composite
def pictures(draw: st.DrawFn) -> tuple[bytes, str]:
    mode, fmt = draw(st.sampled_from(_MODES))
    width, height = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    rgb = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    if mode in ("RGBA", "CMYK", "L", "LA", "1", "F"):
        image = image.convert(mode)
    elif mode == "P":
        image = image.convert("P", palette=Image.ADAPTIVE)
    elif mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)  # 16-bit grayscale
        assert image.mode == "I;16"
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue(), {"JPEG": ".jpg", "TIFF": ".tif"}.get(fmt, f".{fmt.lower()}")


@settings(PROPERTY, max_examples=30)
@given(images=st.lists(pictures(), min_size=1, max_size=3))
def test_predict_labels_any_valid_image(exported: Export, workdir: Path, images: list[tuple[bytes, str]]) -> None:
    files = []
    for i, (data, suffix) in enumerate(images):
        files.append(workdir / f"picture{i}{suffix}")
        files[-1].write_bytes(data)
    _check_predictions(predict_images(exported.dir / "model.onnx", files, top_k=10), files)


def test_predict_with_no_images_or_too_many(exported: Export, workdir: Path) -> None:
    with pytest.raises(ConfigError, match="no images given"):
        predict_images(exported.dir / "model.onnx", [])
    path = workdir / "one.png"
    path.write_bytes(_valid_png(0))
    with pytest.raises(InputError, match=f"{MAX_BATCH + 1} images exceed the limit of {MAX_BATCH} per call"):
        predict_images(exported.dir / "model.onnx", [path] * (MAX_BATCH + 1), max_batch=MAX_BATCH)
    assert len(predict_images(exported.dir / "model.onnx", [path] * MAX_BATCH, max_batch=MAX_BATCH)) == MAX_BATCH


def test_cli_predict_on_garbage_is_one_line_without_traceback(exported: Export, workdir: Path) -> None:
    garbage_file = workdir / "garbage.png"
    garbage_file.write_bytes(bytes(range(256)) * 4)
    proc = run_cli("predict", str(exported.dir / "model.onnx"), str(garbage_file))
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.strip().splitlines() == [f"toolkit predict: error: {garbage_file}: not a readable image "
                                                "(unknown or truncated image format)"], proc.stderr
