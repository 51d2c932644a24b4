"""The ONNX Runtime behind `Backend`: .onnx files (fp32, fp16, int8) on the CPU, CUDA or TensorRT.

Torch-free and onnx-free: serving a model imports only onnxruntime and numpy (`toolkit predict`
starts in a fraction of torch's import time). The file's bytes are read once (by `load_backend`, which
checks their sha256), checked (`onnx_checks.check_self_contained`) and handed to ONNX Runtime, so the
bytes checked are the bytes run.

Providers (`--provider`): `cpu`, `cuda`, `tensorrt`, or `auto` (CUDA when this onnxruntime build has
it, else the CPU; TensorRT only on request, since it builds an engine per input shape on first use).
A GPU provider keeps the CPU provider behind it for any node it lacks; CUDA runs fp32 in fp32 (TF32
off). A provider the build lacks, or one that fails to start (missing CUDA libraries), is a one-line
`ConfigError` naming the installed build and the fix, never a silent fall-back; so is an error of the
library itself. A file that is not a model ONNX Runtime can run is an `ArtifactError` instead
(`_session_error` tells the two apart).

CPU tuning (measured with `python -m benchmarks.ort_settings`; docs/deployment.md, "ONNX Runtime on the CPU"):
- graph optimization level ORT_ENABLE_ALL (the default, stated explicitly): constant folding, Conv+ReLU
  and Gemm+ReLU fusion, and the NCHWc layout (convolutions in channel blocks that fit AVX-512).
- on the CPU provider a batch larger than `SLICE` images runs as slices of `SLICE`, one after another,
  each with the session's intra-op threads (`--threads`, else ORT's default of one per core): a slice's
  activations stay in the CPU caches, a whole batch's do not.
- the memory arena stays on: without it batch 1024 takes twice as long (every run re-allocates).

IO binding (`OnnxRuntimeBackend.bind`): a validated batch copied once onto the provider's device with
its output buffer there too, so throughput can be measured without host transfers; the same code runs
on the CPU (device "cpu"), which is how it is tested without a GPU.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import build_and_package_info  # already imported by onnxruntime itself

from toolkit.artifacts.backends import Backend, validate_batch
from toolkit.artifacts.formats import Format
from toolkit.artifacts.metadata import INPUT_NAME, OUTPUT_NAME, ArtifactMetadata
from toolkit.artifacts.onnx_checks import check_self_contained
from toolkit.core.errors import ArtifactError, ConfigError, ToolkitError, first_line
from toolkit.core.images import CHANNELS, HEIGHT, WIDTH

# --provider choice -> ONNX Runtime's name, and the providers tried in order (fall-backs for nodes a GPU lacks).
EXECUTION_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                       "tensorrt": "TensorrtExecutionProvider"}
_CHAINS = {"cpu": ("cpu",), "cuda": ("cuda", "cpu"), "tensorrt": ("tensorrt", "cuda", "cpu")}
# fp32 files compute in fp32 on CUDA too: ONNX Runtime would otherwise use TF32 (10-bit mantissa) for
# convolutions and matrix products on Ampere and later, and verify's fp32 logit tolerance (1e-4) is finer.
_OPTIONS: dict[str, dict[str, str]] = {"cuda": {"use_tf32": "0"}}
_DEVICES = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "cuda"}  # where IO binding keeps tensors
# What ONNX Runtime raises (pybind11 classes named after its status codes) for bytes that are not a model it can
# run: not a protobuf, no graph, an invalid graph, opset or IR version, an operator it lacks, a type or shape error,
# a kernel whose attributes it refuses. Anything else (EPFail, RuntimeException, EngineError, a plain
# RuntimeError from a provider's library, MemoryError) is the runtime's own failure.
_NOT_A_MODEL = frozenset({"InvalidProtobuf", "InvalidArgument", "InvalidGraph", "NoModel", "NotImplemented", "Fail"})
_BUILDS = ("onnxruntime", "onnxruntime-gpu")  # pip distributions that both install the `onnxruntime` module
# Images per ONNX Runtime call on the CPU: the activations of a slice of 64 stay in the caches (conv1's
# output alone is 1.2 MB for 64 images, more in the blocked NCHWc layout, and 19 MB for 1024).
SLICE = 64


def resolve_provider(choice: str, available: Sequence[str]) -> str:
    """The provider a `--provider` choice (one of `backends.PROVIDERS`) runs on, given ONNX Runtime's
    available providers."""
    if choice == "auto":
        return "cuda" if EXECUTION_PROVIDERS["cuda"] in available else "cpu"
    if EXECUTION_PROVIDERS[choice] not in available:
        raise ConfigError(f"--provider {choice}: {_build()} has no {EXECUTION_PROVIDERS[choice]} "
                          f"(available: {', '.join(available)}); {_gpu_fix()}")
    return choice


def _build() -> str:
    """The installed onnxruntime build, as its pip distribution says: `onnxruntime-gpu 1.31.1`."""
    name = getattr(build_and_package_info, "package_name", "onnxruntime")
    return f"this onnxruntime build ({name} {ort.__version__})"


def _gpu_fix() -> str:
    from importlib import metadata  # reason: 45 ms of start-up, needed only to explain a missing provider

    installed = []
    for name in _BUILDS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            installed.append(f"{name} {metadata.version(name)}")
    if len(installed) > 1:
        return (f"{' and '.join(installed)} are both installed and shadow each other (one `onnxruntime` module, "
                "the last installed wins): pip uninstall -y onnxruntime onnxruntime-gpu, then pip install "
                "'cifar-toolkit[gpu]'")
    return ("the CUDA and TensorRT providers come with the GPU build, installed instead of the CPU one: "
            "pip uninstall -y onnxruntime && pip install 'cifar-toolkit[gpu]' (README: GPU)")


class OnnxRuntimeBackend(Backend):
    def __init__(self, path: Path, fmt: Format, metadata: ArtifactMetadata, session: ort.InferenceSession,
                 batch_size: int | None, provider: str, threads: int | None) -> None:
        super().__init__(path, fmt, metadata)
        self.session = session
        self.batch_size = batch_size
        self._provider = provider
        self._slices = provider == "cpu" and batch_size is None  # see SLICE; GPUs take the batch whole
        self._outputs = [OUTPUT_NAME]

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def providers(self) -> list[str]:
        """ONNX Runtime's providers for this session, in priority order."""
        return self.session.get_providers()

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if not self._slices or len(batch) <= SLICE:
            return self.session.run(self._outputs, {INPUT_NAME: batch})[0]
        parts = [self.session.run(self._outputs, {INPUT_NAME: batch[start:start + SLICE]})[0]
                 for start in range(0, len(batch), SLICE)]
        for start, part in zip(range(0, len(batch), SLICE), parts):  # a wrong shape is named, not a numpy error
            rows = min(SLICE, len(batch) - start)
            if np.shape(part) != (rows, len(self.classes)):
                raise self.shape_error(np.shape(part), rows)
        return np.concatenate(parts)

    def bind(self, batch: np.ndarray) -> BoundBatch:
        """`batch` validated once and copied to the provider's device, with its output buffer there too."""
        return BoundBatch(self, validate_batch(batch, self.path, self.batch_size, self.max_batch))


class BoundBatch:
    """One batch held on the session's device (ONNX Runtime IO binding): `run()` computes the logits
    there without host copies; `logits()` copies them out and checks them like `predict_logits`."""

    def __init__(self, backend: OnnxRuntimeBackend, x: np.ndarray) -> None:
        device = _DEVICES[backend.provider]
        self._backend, self._x = backend, x
        self._binding = backend.session.io_binding()
        self._input = ort.OrtValue.ortvalue_from_numpy(x, device, 0)
        self._output = ort.OrtValue.ortvalue_from_shape_and_type([len(x), len(backend.classes)], np.float32,
                                                                 device, 0)
        self._binding.bind_ortvalue_input(INPUT_NAME, self._input)
        self._binding.bind_ortvalue_output(OUTPUT_NAME, self._output)

    def __len__(self) -> int:
        return len(self._x)

    def run(self) -> None:
        """One inference on the device; returns when the output is complete."""
        self._backend.session.run_with_iobinding(self._binding)

    def logits(self) -> np.ndarray:
        """The last `run()`'s logits, copied to the host and checked (shape, finite values)."""
        return self._backend.check_logits(self._binding.copy_outputs_to_cpu()[0], self._x, 0)


def _session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def _start_gpu_libraries() -> None:
    """Make CUDA and cuDNN from the nvidia-* pip packages loadable (ONNX Runtime >= 1.21; torch does this
    for itself, but serving does not import torch). Its notes go to stderr, never into --json output."""
    with contextlib.redirect_stdout(sys.stderr):
        ort.preload_dlls()


def _session_error(path: Path, model: bytes, exc: Exception, choice: str, flag: str) -> ToolkitError:
    """The one-line error for a session that did not start, `exc` being what ONNX Runtime raised.

    Either the file is not a model ONNX Runtime can run (`ArtifactError`), or a provider or the library
    itself failed (`ConfigError`, naming the provider and quoting the library). A GPU provider's failure
    can look like a model's (a kernel that fails to start is a `Fail` either way), so after one the
    model is tried on the CPU alone: if it starts there, the GPU provider is what failed.
    """
    if choice != "cpu":
        try:
            ort.InferenceSession(model, _session_options(None), providers=[EXECUTION_PROVIDERS["cpu"]])
        except Exception as cpu_exc:  # noqa: BLE001 - as above
            exc = cpu_exc  # it does not start on the CPU either: judged by the CPU's error below
        else:
            return ConfigError(f"--provider {flag}: ONNX Runtime could not start {EXECUTION_PROVIDERS[choice]} for "
                               f"{path} ({first_line(exc)}); the model itself starts on the CPU (--provider cpu); "
                               f"are the CUDA and cuDNN libraries that {_build().removeprefix('this ')} needs "
                               "installed? see README: GPU")
    if type(exc).__name__ in _NOT_A_MODEL or isinstance(exc, UnicodeError):  # a name in the file is not UTF-8
        return ArtifactError(f"{path}: not a loadable ONNX model ({first_line(exc)})")
    return ConfigError(f"{path}: ONNX Runtime failed to start {EXECUTION_PROVIDERS['cpu']} ({first_line(exc)}): "
                       f"an error of {_build()}, not one it gives for invalid models")


def load(path: Path, fmt: Format, data: bytes, threads: int | None, provider: str,
         model: str | None = None) -> Backend:
    """An .onnx file as a `Backend`: `data`, its bytes as `load_backend` read and hash-checked them, checked
    to be self-contained and handed to ONNX Runtime. The file holds its whole graph: no model code is imported,
    whatever `model` names."""
    check_self_contained(path, data)
    choice = resolve_provider(provider, ort.get_available_providers())
    if choice != "cpu" and hasattr(ort, "preload_dlls"):
        _start_gpu_libraries()
    chain = [EXECUTION_PROVIDERS[p] for p in _CHAINS[choice]]
    with_options = [(EXECUTION_PROVIDERS[p], _OPTIONS.get(p, {})) for p in _CHAINS[choice]]
    try:
        # ONNX Runtime print()s its notes when a session fails with a ValueError or RuntimeError and it retries
        # on the CPU: they belong on stderr, not in `toolkit predict --json` output.
        with contextlib.redirect_stdout(sys.stderr):
            session = ort.InferenceSession(data, _session_options(threads if choice == "cpu" else None),
                                           providers=with_options)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's pybind errors (Fail, EPFail, ...) share no base class
        raise _session_error(path, data, exc, choice, provider) from None
    if session.get_providers()[0] != chain[0]:  # ORT falls back silently when a provider cannot start
        raise ConfigError(f"--provider {provider}: ONNX Runtime could not start {chain[0]} on this machine and fell "
                          f"back to {', '.join(session.get_providers())} (are the CUDA and cuDNN libraries that "
                          f"{_build().removeprefix('this ')} needs installed? see README: GPU)")
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
    return OnnxRuntimeBackend(path, fmt, metadata, session, batch if isinstance(batch, int) else None, choice, threads)
