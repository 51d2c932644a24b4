"""One inference interface over every runtime: eager PyTorch, TorchScript, torch.export, ONNX Runtime.

`load_backend(path)` picks the runtime from the file suffix and returns a `Backend` whose
`predict_logits(batch)` takes an N×3×32×32 float32 normalized batch (numpy or torch) and returns
N×classes float32 logits as a numpy array. This module is the only place that knows how each format
is loaded and run; verification, `toolkit predict` and the benchmarks all go through it.

Every backend validates its input itself (rank, channels, size, dtype, finite values, non-empty) and
raises `InputError` naming the expected and the actual value, so a bad batch never reaches a runtime
whose own error would be a page of C++ or a guard assertion.

Each artifact carries its own `ArtifactMetadata` (class names, normalization): ONNX in
`metadata_props`, TorchScript and torch.export in the extra file `metadata.json`. The eager model's
comes from its safetensors header and the training normalization.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit import __version__
from toolkit.errors import ArtifactError, CheckpointError, ConfigError, InputError, first_line

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
CHANNELS, HEIGHT, WIDTH = 3, 32, 32
INPUT_LAYOUT = "NCHW"
METADATA_FILE = "metadata.json"  # extra file inside .ts / .pt2 archives
METADATA_KEYS = ("class_names", "mean", "std", "input_layout", "toolkit_version")

SUFFIXES = {".ts": "torchscript", ".pt2": "pt2", ".onnx": "onnxruntime", ".safetensors": "eager"}


@dataclass(frozen=True)
class ArtifactMetadata:
    """What a client needs besides the model: labels and the preprocessing that training used."""

    class_names: list[str]
    mean: list[float]
    std: list[float]
    input_layout: str = INPUT_LAYOUT
    toolkit_version: str = __version__

    def to_strings(self) -> dict[str, str]:
        """The same key -> JSON-string mapping for ONNX `metadata_props` and `metadata.json`."""
        return {k: json.dumps(getattr(self, k)) for k in METADATA_KEYS}

    @classmethod
    def from_strings(cls, props: dict[str, str], source: Path) -> ArtifactMetadata:
        missing = [k for k in METADATA_KEYS if k not in props]
        if missing:
            raise ArtifactError(f"{source}: no toolkit metadata {missing} (was it written by `toolkit export`?)")
        try:
            values = {k: json.loads(props[k]) for k in METADATA_KEYS}
            meta = cls(**values)
            ok = (isinstance(meta.class_names, list) and all(isinstance(c, str) for c in meta.class_names)
                  and len(meta.mean) == CHANNELS and len(meta.std) == CHANNELS
                  and all(float(s) > 0 for s in meta.std))
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"{source}: unreadable toolkit metadata ({exc})") from None
        if not ok:
            raise ArtifactError(f"{source}: invalid toolkit metadata: class_names must be a list of names, "
                                f"mean and std {CHANNELS} numbers each (std > 0); got {values}")
        if meta.input_layout != INPUT_LAYOUT:
            raise ArtifactError(f"{source}: input_layout {meta.input_layout!r}, expected {INPUT_LAYOUT!r}")
        return meta

    def normalize(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 N×3×H×W pixels -> float32 (x/255 - mean) / std, exactly as training preprocessed."""
        x = np.asarray(images, dtype=np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, CHANNELS, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, CHANNELS, 1, 1)
        return (x - mean) / std


def validate_batch(batch: torch.Tensor | np.ndarray, source: str | Path,
                   batch_size: int | None = None) -> np.ndarray:
    """Check a model input and return it as a C-contiguous float32 numpy array (no copy when possible)."""
    expected = f"N×{CHANNELS}×{HEIGHT}×{WIDTH} float32"
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    elif not isinstance(batch, np.ndarray):
        raise InputError(f"{source}: expected a {expected} numpy array or torch tensor, got {type(batch).__name__}")
    shape = "×".join(map(str, batch.shape)) or "scalar"
    if batch.ndim != 4:
        raise InputError(f"{source}: expected a rank-4 {expected} batch, got rank {batch.ndim} ({shape})")
    if batch.shape[0] == 0:
        raise InputError(f"{source}: empty batch ({shape}); expected at least one image")
    if batch.shape[1] != CHANNELS:
        raise InputError(f"{source}: expected {CHANNELS} channels ({expected}), got {batch.shape[1]} ({shape})")
    if batch.shape[2:] != (HEIGHT, WIDTH):
        raise InputError(f"{source}: expected {HEIGHT}×{WIDTH} images ({expected}), "
                         f"got {batch.shape[2]}×{batch.shape[3]} ({shape})")
    if batch_size is not None and batch.shape[0] != batch_size:
        raise InputError(f"{source}: the model has a fixed batch size of {batch_size}, got {batch.shape[0]} ({shape})")
    if batch.dtype != np.float32:
        raise InputError(f"{source}: expected dtype float32 (normalized pixels), got {batch.dtype}")
    finite = np.isfinite(batch).reshape(len(batch), -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InputError(f"{source}: batch holds NaN or inf values in {len(bad)} image(s), first at index {bad[0]}")
    return np.ascontiguousarray(batch)


class Backend(ABC):
    """A loaded model artifact: `predict_logits` on a normalized float32 batch, plus its metadata."""

    name: str  # the runtime: eager, torchscript, pt2, onnxruntime
    batch_size: int | None = None  # a fixed batch size the artifact demands (None: dynamic)

    def __init__(self, path: Path, metadata: ArtifactMetadata) -> None:
        self.path = path
        self.metadata = metadata

    @property
    def classes(self) -> list[str]:
        return self.metadata.class_names

    def predict_logits(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """N×3×32×32 float32 normalized images -> N×classes float32 logits."""
        x = validate_batch(batch, self.path, self.batch_size)
        return np.asarray(self._run(x), dtype=np.float32)

    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """Run the runtime on an already validated batch."""


class _TorchBackend(Backend):
    """Any callable torch module; inference mode, CPU."""

    def __init__(self, path: Path, metadata: ArtifactMetadata, module) -> None:
        super().__init__(path, metadata)
        self.module = module

    def _run(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(torch.from_numpy(batch)).float().numpy()


class EagerBackend(_TorchBackend):
    name = "eager"


class TorchScriptBackend(_TorchBackend):
    name = "torchscript"


class ExportedProgramBackend(_TorchBackend):
    name = "pt2"


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path: Path, metadata: ArtifactMetadata, session, batch_size: int | None) -> None:
        super().__init__(path, metadata)
        self.session = session
        self.batch_size = batch_size

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def load_backend(path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None) -> Backend:
    """Load a model artifact by path: .ts, .pt2, .onnx, or eager weights (.safetensors, a run or export folder).

    `threads` sets the runtime's intra-op threads (for torch formats: torch's process-wide setting).
    `providers` are ONNX Runtime execution providers; by default CUDA when available, else CPU.
    """
    path = Path(path)
    if path.is_dir():  # a run folder or an export folder: both keep the eager weights as model.safetensors
        path = path / "model.safetensors"
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ArtifactError(f"{path}: unsupported artifact type {path.suffix!r}; expected one of "
                            f"{', '.join(SUFFIXES)} or a run/export folder")
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads: must be >= 1, got {threads}")
        if kind != "onnxruntime":
            torch.set_num_threads(threads)
    if kind == "onnxruntime":
        return _load_onnx(path, threads, providers)
    if kind == "eager":
        return _load_eager(path)
    if kind == "torchscript":
        return _load_torchscript(path)
    return _load_exported_program(path)


def _load_eager(path: Path) -> Backend:
    from toolkit.data import MEAN, STD
    from toolkit.runs import load_model

    try:
        trained = load_model(path)
    except CheckpointError as exc:
        raise ArtifactError(str(exc)) from None
    # Eager weights carry no normalization: they are, by definition, the training preprocessing.
    return EagerBackend(path, ArtifactMetadata(trained.classes, list(MEAN), list(STD)), trained.model)


@contextlib.contextmanager
def _quiet_torch_loading() -> Iterator[None]:
    """Silence what torch prints while loading: `torch.jit.load` FutureWarnings (one per call), and
    `torch.export.load`'s logged traceback when it retries a bad archive with its legacy reader."""
    logger = logging.getLogger("torch.export")
    previous = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
            yield
    finally:
        logger.disabled = previous


def _check_zip(path: Path, what: str) -> None:
    # .ts and .pt2 are zip archives: a quick check gives "not a ... file" rather than a miniz error.
    if not zipfile.is_zipfile(path):
        raise ArtifactError(f"{path}: not a {what} file (not a zip archive; truncated or a different format?)")


def _load_torchscript(path: Path) -> Backend:
    _check_zip(path, "TorchScript")
    extra = {METADATA_FILE: ""}
    try:
        with _quiet_torch_loading():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ArtifactError(f"{path}: not a loadable TorchScript file ({first_line(exc)})") from None
    return TorchScriptBackend(path, _metadata_from_json(extra[METADATA_FILE], path), module.eval())


def _load_exported_program(path: Path) -> Backend:
    _check_zip(path, "torch.export (.pt2)")
    extra = {METADATA_FILE: ""}
    try:
        with _quiet_torch_loading():
            program = torch.export.load(path, extra_files=extra)
    except (RuntimeError, ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{path}: not a loadable torch.export program ({first_line(exc)})") from None
    _check_program_input(program, path)
    return ExportedProgramBackend(path, _metadata_from_json(extra[METADATA_FILE], path), program.module())


def _check_program_input(program: torch.export.ExportedProgram, path: Path) -> None:
    """The program must take exactly one N×3×32×32 float32 input (the batch dimension may be symbolic)."""
    user_inputs = set(program.graph_signature.user_inputs)
    shapes = [node.meta.get("val") for node in program.graph.nodes
              if node.op == "placeholder" and node.name in user_inputs]
    ok = (len(shapes) == 1 and shapes[0] is not None and shapes[0].dim() == 4
          and shapes[0].dtype == torch.float32 and tuple(shapes[0].shape[1:]) == (CHANNELS, HEIGHT, WIDTH))
    if not ok:
        described = [f"{tuple(s.shape)} {s.dtype}" if s is not None else "unknown" for s in shapes]
        raise ArtifactError(f"{path}: expected one input N×{CHANNELS}×{HEIGHT}×{WIDTH} float32, "
                            f"the program takes {described}")


def _metadata_from_json(raw: bytes | str, path: Path) -> ArtifactMetadata:
    if not raw:
        raise ArtifactError(f"{path}: no {METADATA_FILE} inside (was it written by `toolkit export`?)")
    try:
        props = json.loads(raw)
    except ValueError as exc:
        raise ArtifactError(f"{path}: unreadable {METADATA_FILE} ({exc})") from None
    if not isinstance(props, dict):
        raise ArtifactError(f"{path}: {METADATA_FILE} is not a JSON object")
    return ArtifactMetadata.from_strings(props, path)


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build and machine have it, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


def _load_onnx(path: Path, threads: int | None, providers: Sequence[str] | None) -> Backend:
    import onnxruntime as ort

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
    metadata = ArtifactMetadata.from_strings(session.get_modelmeta().custom_metadata_map, path)
    return OnnxRuntimeBackend(path, metadata, session, batch if isinstance(batch, int) else None)
