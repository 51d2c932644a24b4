"""The torch runtime behind `Backend`: eager weights (.safetensors), TorchScript (.ts), torch.export (.pt2).

All three run on the CPU in inference mode. .ts and .pt2 archives are checked (`archive_checks`) and
loaded from the same bytes, read once by `load_backend`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolkit.artifacts.archive_checks import check_pt2_archive, check_torchscript_archive
from toolkit.artifacts.backends import Backend
from toolkit.artifacts.formats import Format
from toolkit.artifacts.metadata import METADATA_FILE, ArtifactMetadata
from toolkit.core.errors import ArtifactError, CheckpointError, ConfigError, first_line
from toolkit.core.images import CHANNELS, HEIGHT, MEAN, STD, WIDTH
from toolkit.training.runs import load_model


class TorchBackend(Backend):
    """Any callable torch module; inference mode, CPU."""

    def __init__(self, path: Path, fmt: Format, metadata: ArtifactMetadata, module: nn.Module) -> None:
        super().__init__(path, fmt, metadata)
        self.module = module

    def _run(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch if batch.flags.writeable else batch.copy())  # torch wants writable memory
        with torch.inference_mode():
            return self.module(x).float().numpy()


def load(path: Path, fmt: Format, data: bytes, threads: int | None, provider: str, model: str | None = None) -> Backend:
    """A torch-format file as a `Backend`; `threads` is torch's process-wide intra-op setting. Torch formats
    run on the CPU here (`provider` auto or cpu).

    Every format is checked and loaded from `data`, the bytes `load_backend` read and hash-checked. Eager
    weights rebuild their model by name: `model` is the one the user names (see `load_backend`).
    """
    if provider not in ("auto", "cpu"):
        raise ConfigError(f"--provider {provider}: {path} is a {fmt.name} file, which runs on the CPU with torch; "
                          "--provider chooses where ONNX Runtime runs .onnx files")
    if threads is not None:
        torch.set_num_threads(threads)
    if fmt.name == "eager":
        metadata, module = _load_eager(path, data, model)
    else:
        metadata, module = {"torchscript": _load_torchscript, "pt2": _load_exported_program}[fmt.name](path, data)
    return TorchBackend(path, fmt, metadata, module)


def _load_eager(path: Path, data: bytes, model: str | None) -> tuple[ArtifactMetadata, nn.Module]:
    try:
        trained = load_model(path, data, model)
    except CheckpointError as exc:
        raise ArtifactError(str(exc)) from None
    # Eager weights carry no normalization: they are, by definition, the training preprocessing.
    return ArtifactMetadata(trained.classes, list(MEAN), list(STD), model=trained.model_name), trained.model


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


def _load_torchscript(path: Path, data: bytes) -> tuple[ArtifactMetadata, nn.Module]:
    check_torchscript_archive(path, data)
    extra = {METADATA_FILE: ""}
    try:
        with _quiet_torch_loading():
            module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - torch's errors for a bad archive share no base class
        raise ArtifactError(f"{path}: not a loadable TorchScript file ({first_line(exc)})") from None
    return ArtifactMetadata.from_json(extra[METADATA_FILE], path), module.eval()


def _load_exported_program(path: Path, data: bytes) -> tuple[ArtifactMetadata, nn.Module]:
    check_pt2_archive(path, data)
    extra = {METADATA_FILE: ""}
    try:
        with _quiet_torch_loading():
            program = torch.export.load(io.BytesIO(data), extra_files=extra)
            _check_program_input(program, path)
            module = program.module()
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 - the deserializer's errors (AssertionError, SpecViolationError, ...)
        raise ArtifactError(f"{path}: not a loadable torch.export program ({first_line(exc)})") from None
    return ArtifactMetadata.from_json(extra[METADATA_FILE], path), module


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
