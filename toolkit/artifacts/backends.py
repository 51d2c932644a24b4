"""One inference interface over every runtime: eager PyTorch, TorchScript, torch.export, ONNX Runtime.

`load_backend(path)` finds the file's format in the registry (`toolkit.artifacts.formats`), loads it
with that format's runtime and returns a `Backend` whose `predict_logits(batch)` takes an
N×3×32×32 float32 normalized batch (numpy or torch) and returns N×classes float32 logits as a numpy
array. Verification, `toolkit predict` and the benchmarks all go through it. The runtimes live in
`torch_runtime` and `onnx_runtime`; a runtime's module is imported only when a file needs it, so
serving an ONNX model never imports torch.

Every backend validates its input itself (type, rank, channels, size, dtype, finite values, non-empty,
at most `max_batch` images) and raises `InputError` naming the expected and the actual value, so a bad
batch never reaches a runtime whose own answer would be NaN logits, an empty result, a page of C++ or a
guard assertion. It checks the output too: N×classes, and finite (finite inputs so large that the model
overflows are an `InputError`, not NaN logits). Batches run `CHUNK` images at a time, so memory stays
bounded.

The checks cost about 3 µs per call for one ordinary image (a C-contiguous float32 numpy array of the
right shape, finite): attribute comparisons, one dot product for "every value finite" (NaN or ±inf
exactly when a value is) and one `isfinite` of the logits, against 40-50 µs of ONNX Runtime for one
image (benchmarks/test_inference.py::test_session measures both in alternating rounds).
Anything else takes the general path that converts, checks everything and names the first problem.

Providers: `provider` (`toolkit predict/verify --provider`) chooses where ONNX Runtime runs: `auto`,
`cpu`, `cuda` or `tensorrt` (`toolkit.artifacts.onnx_runtime`). Torch formats run on the CPU.

Which files are safe to load
----------------------------
(docs/security.md says the same at more length, with what was found in torch's loaders.)

- `.safetensors` (eager weights, checkpoint weights): data only, a JSON header and raw tensor bytes.
  Safe to load from anywhere; the worst a bad file can do is fail to load or give wrong answers. The
  weights name their model: a user's `package.module:factory` is imported (its code run) only when the
  caller names it too (`model=`, `--model`), never on the file's word alone.
- `.onnx`: a graph of standard ONNX operators, run by ONNX Runtime. It cannot run arbitrary code,
  but it is not inert data either: a malicious graph can still exhaust memory or CPU (huge
  shapes, enormous initializers, loops). The toolkit refuses ONNX files that reference external
  data files, so a model can only read its own bytes.
- `.ts` (TorchScript) and `.pt2` (torch.export) are programs. TorchScript runs its own code, even
  at load time (`__setstate__`); `torch.export.load` unpickles parts of the archive without
  restrictions, evaluates symbolic-shape strings with `sympy.sympify` (Python `eval`), executes
  the archive's guard code and loads AOTInductor native libraries. Load them only from sources you
  trust, or after checking their sha256 against a `manifest.json` you trust. `load_backend` reads
  the file once and, unless `check_hash=False` (`toolkit predict --no-hash-check`), refuses a program
  that no manifest beside it lists, or any file whose sha256 differs from its entry; then, on the same
  bytes, the archive checks (`archive_checks`) refuse archives that are not what their suffix says or
  that hold pickled objects, compiled code, guard code, `__setstate__`, two entries of one name or
  anything else a toolkit export does not contain. Those checks narrow the attack surface; they are
  not a sandbox.
- Checkpoints: `model.safetensors` is data; the optimizer, scheduler, GradScaler and RNG `.pt` files
  are read with `torch.load(weights_only=True)` (no arbitrary unpickling), and only files that
  `state.json` lists, each loaded from the bytes whose sha256 was checked against it.
"""

from __future__ import annotations

import importlib
import math
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toolkit.artifacts import formats, manifest
from toolkit.artifacts.formats import Format
from toolkit.artifacts.metadata import INPUT_SPEC, ArtifactMetadata
from toolkit.core.errors import ArtifactError, ConfigError, InputError
from toolkit.core.images import CHANNELS, HEIGHT, WIDTH

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_BATCH = 65536  # images per `predict_logits` call (`toolkit predict --max-batch`)
CHUNK = 1024  # images per runtime call inside `predict_logits`, so memory stays bounded
# Non-finite logits for an input no larger than this (far beyond normalized pixels, ±3, and even raw
# 0..255 pixels) mean a broken model, not an overflowing input.
_PLAUSIBLE_INPUT = 1e4
# The module that loads each runtime's files (`Format.runtime`); each has `load(path, fmt, data, threads, provider)`,
# `data` being the file's bytes as `load_backend` read and checked them.
RUNTIMES = {"torch": "toolkit.artifacts.torch_runtime", "onnxruntime": "toolkit.artifacts.onnx_runtime"}
# `--provider` choices: where ONNX Runtime runs (`auto`: the best one this machine and build have).
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
DEFAULT_PROVIDER = "auto"
# ONNX Runtime comes as one of two pip builds that must not be installed together (pyproject's extras).
ONNXRUNTIME_INSTALL = ("pip install 'cifar-toolkit[cpu]' for the CPU build, or 'cifar-toolkit[gpu]' for CUDA and "
                       "TensorRT (never both)")
_INSTALL = {"onnxruntime": ONNXRUNTIME_INSTALL, "torch": "pip install cifar-toolkit"}
_FLOAT32 = np.dtype(np.float32)  # native byte order; numpy's float32 arrays share this one instance
_IMAGE_SHAPE = (CHANNELS, HEIGHT, WIDTH)
_PIXELS = CHANNELS * HEIGHT * WIDTH
# x · (2^-12, ...) is NaN or ±inf exactly when some value of x is: 3072 × the largest float32 × 2^-12 is
# still finite, so it never overflows, and np.vdot raises no floating-point warnings for inf - inf.
_WEIGHTS = np.full(_PIXELS, 2.0 ** -12, np.float32)


def _all_finite(x: np.ndarray) -> bool:
    """True if every value of the N×3×32×32 float32 array is finite."""
    if len(x) == 1:  # 1.3 µs, where the interface's cost shows: one image takes ONNX Runtime 38 µs
        return math.isfinite(np.vdot(x, _WEIGHTS))
    return all(np.isfinite(x[i:i + CHUNK]).all() for i in range(0, len(x), CHUNK))  # bounded temporaries


def validate_batch(batch: torch.Tensor | np.ndarray, source: str | Path, batch_size: int | None = None,
                   max_batch: int | None = None) -> np.ndarray:
    """Check a model input and return it as a C-contiguous float32 numpy array (no copy when possible).

    Every problem is an `InputError` naming the expected and the actual value; nothing else escapes,
    whatever the argument (any type, rank, shape, dtype, device, layout).
    """
    # The common case, checked in about 1.5 µs: exactly the array the runtimes take (a rank-4 shape ending
    # in 3×32×32, native float32, C order, finite), returned as it is.
    if (type(batch) is np.ndarray and batch.shape[1:] == _IMAGE_SHAPE and batch.dtype is _FLOAT32
            and 0 < len(batch) and (max_batch is None or len(batch) <= max_batch)
            and (batch_size is None or len(batch) == batch_size) and batch.flags.c_contiguous and _all_finite(batch)):
        return batch
    return _validate(batch, source, batch_size, max_batch)


def _validate(batch: torch.Tensor | np.ndarray, source: str | Path, batch_size: int | None,
              max_batch: int | None) -> np.ndarray:
    """`validate_batch` for any argument: every check in order, the first failure named."""
    expected = INPUT_SPEC
    torch = sys.modules.get("torch")  # a torch tensor implies torch is imported; never import it here
    if torch is not None and isinstance(batch, torch.Tensor):
        if batch.is_nested or batch.layout != torch.strided:
            raise InputError(f"{source}: expected a dense {expected} tensor, got a "
                             f"{'nested' if batch.is_nested else str(batch.layout).removeprefix('torch.')} tensor")
        dtype = str(batch.dtype).removeprefix("torch.")
        is_float32 = batch.dtype == torch.float32
    # numpy.ma is imported only if a masked array can exist (importing it costs 13 ms of start-up)
    elif isinstance(batch, np.ndarray) and not ("numpy.ma" in sys.modules and isinstance(batch, np.ma.MaskedArray)):
        dtype = str(batch.dtype)
        # float32 in the other byte order is still float32 (converted below)
        is_float32 = batch.dtype.kind == "f" and batch.dtype.itemsize == 4
    else:
        kind = type(batch).__name__ if type(batch).__module__ == "builtins" else \
            f"{type(batch).__module__.split('.')[0]}.{type(batch).__name__}"
        raise InputError(f"{source}: expected a {expected} numpy array or torch tensor, got {kind}")
    dims = tuple(int(d) for d in batch.shape)
    shape = "×".join(map(str, dims)) or "scalar"
    if len(dims) != 4:
        raise InputError(f"{source}: expected a rank-4 {expected} batch, got rank {len(dims)} ({shape})")
    if dims[0] == 0:
        raise InputError(f"{source}: empty batch ({shape}); expected at least one image")
    if dims[1] != CHANNELS:
        raise InputError(f"{source}: expected {CHANNELS} channels ({expected}), got {dims[1]} ({shape})")
    if dims[2:] != (HEIGHT, WIDTH):
        raise InputError(f"{source}: expected {HEIGHT}×{WIDTH} images ({expected}), "
                         f"got {dims[2]}×{dims[3]} ({shape})")
    if batch_size is not None and dims[0] != batch_size:
        raise InputError(f"{source}: the model has a fixed batch size of {batch_size}, got {dims[0]} ({shape})")
    if max_batch is not None and dims[0] > max_batch:
        raise InputError(f"{source}: batch of {dims[0]} images exceeds the limit of {max_batch} per call "
                         f"(max_batch / --max-batch)")
    if not is_float32:
        raise InputError(f"{source}: expected dtype float32 (normalized pixels), got {dtype}")
    if torch is not None and isinstance(batch, torch.Tensor):
        if batch.device.type == "meta":
            raise InputError(f"{source}: expected a tensor with data, got one on the meta device")
        batch = batch.detach().cpu().resolve_conj().resolve_neg().numpy()
    x = np.ascontiguousarray(batch, dtype=np.float32)
    bad, first = 0, -1
    for start in range(0, len(x), CHUNK):  # chunked: the temporary boolean array stays small
        finite = np.isfinite(x[start:start + CHUNK]).reshape(-1, CHANNELS * HEIGHT * WIDTH).all(axis=1)
        if not finite.all():
            bad += int((~finite).sum())
            first = first if first >= 0 else start + int(np.flatnonzero(~finite)[0])
    if bad:
        raise InputError(f"{source}: batch holds NaN or inf values in {bad} image(s), first at index {first}")
    return x


class Backend(ABC):
    """A loaded model artifact: `predict_logits` on a normalized float32 batch, plus its metadata."""

    batch_size: int | None = None  # a fixed batch size the artifact demands (None: dynamic)
    max_batch: int | None = DEFAULT_MAX_BATCH  # most images per `predict_logits` call (None: no limit)

    def __init__(self, path: Path, fmt: Format, metadata: ArtifactMetadata) -> None:
        self.path = path
        self.format = fmt
        self.metadata = metadata
        self._num_classes = len(metadata.class_names)  # for the fast output check
        # logits · weights is NaN or ±inf exactly when a logit is, and cannot overflow (see _WEIGHTS)
        self._logit_weights = np.full(self._num_classes, 2.0 ** -math.ceil(math.log2(max(self._num_classes, 2))),
                                      np.float32)

    @property
    def name(self) -> str:
        """The format's name (eager, torchscript, pt2, onnx): rows of verify and the benchmarks."""
        return self.format.name

    @property
    def classes(self) -> list[str]:
        return self.metadata.class_names

    @property
    def provider(self) -> str:
        """Where the model runs, as `--provider` names it (torch formats: always `cpu`)."""
        return "cpu"

    def predict_logits(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """N×3×32×32 float32 normalized images -> N×classes float32 logits, all finite.

        At most `max_batch` images per call; the runtime sees them `CHUNK` at a time. A bad batch, or one
        whose values are so large that the model overflows, is an `InputError`; a model whose output is
        not N×classes is an `ArtifactError`.
        """
        x = validate_batch(batch, self.path, self.batch_size, self.max_batch)
        step = len(x) if self.batch_size is not None else CHUNK
        if len(x) <= step:
            return self.check_logits(self._run(x), x, 0)
        return np.concatenate([self.check_logits(self._run(x[i:i + step]), x[i:i + step], i)
                               for i in range(0, len(x), step)])

    def check_logits(self, logits: np.ndarray, x: np.ndarray, offset: int) -> np.ndarray:
        """The runtime's output for the images `x` (starting at `offset` of the caller's batch), checked:
        N×classes float32, every value finite."""
        if (type(logits) is np.ndarray and logits.shape == (len(x), self._num_classes) and logits.dtype is _FLOAT32
                and (math.isfinite(np.vdot(logits, self._logit_weights)) if len(x) == 1 else np.isfinite(logits).all())):
            return logits  # the common case: one dot product for one image
        return self._check_logits(logits, x, offset)

    def shape_error(self, shape: tuple[int, ...], images: int) -> ArtifactError:
        """The error for a runtime output of the wrong shape for `images` images."""
        return ArtifactError(f"{self.path}: the model returned logits of shape {shape} for {images} images; "
                             f"expected ({images}, {len(self.classes)})")

    def _check_logits(self, logits: np.ndarray, x: np.ndarray, offset: int) -> np.ndarray:
        logits = np.asarray(logits)
        if logits.shape != (len(x), len(self.classes)):
            raise self.shape_error(logits.shape, len(x))
        logits = logits.astype(np.float32, copy=False)
        finite = np.isfinite(logits).all(axis=1)
        if not finite.all():
            i = int(np.flatnonzero(~finite)[0])
            largest = float(np.abs(x[i]).max())
            where = f"non-finite logits for {int((~finite).sum())} image(s), first at index {offset + i}"
            if largest <= _PLAUSIBLE_INPUT:  # an ordinary input: the model itself is broken (NaN weights, ...)
                raise ArtifactError(f"{self.path}: the model gives {where}, whose values are ordinary "
                                    f"(largest |value| {largest:.3g})")
            raise InputError(f"{self.path}: {where}, whose largest |value| is {largest:.3g}: too large for "
                             f"the model (normalized pixels lie within about ±3)")
        return logits

    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """Run the runtime on an already validated batch."""


def load_backend(path: str | Path, threads: int | None = None, provider: str = DEFAULT_PROVIDER,
                 max_batch: int | None = DEFAULT_MAX_BATCH, check_hash: bool = True,
                 model: str | None = None) -> Backend:
    """Load a model artifact by path: any registered format's file, or a run or export folder (eager weights).

    `threads` sets the threads the runtime may use (for torch formats: torch's process-wide setting).
    `provider` (one of `PROVIDERS`) chooses where ONNX Runtime runs: `auto` is CUDA when this build and
    machine have it, else the CPU. Torch formats run on the CPU, and accept only `auto` and `cpu`.
    `max_batch` bounds the images per `predict_logits` call (None: no bound). `model`: the model the user
    names (`--model`); eager weights of a user's model (`package.module:factory`) load only when it is named
    (`toolkit.training.runs.rebuild_model`), since naming it imports code.

    The file is read once; with `check_hash` (`toolkit predict --no-hash-check` turns it off) those
    bytes must match the sha256 of the manifest.json beside the file if it lists the file, and a .ts or
    .pt2 file, a program, must be listed (`manifest.check_bytes`). The archive checks and the runtime
    then see the same bytes, so the file cannot be swapped between the check and the load. .ts and .pt2
    files are programs: see "Which files are safe to load" above.
    """
    path = Path(path)
    if path.is_dir():  # a run folder or an export folder: both keep the eager weights
        path = path / formats.EAGER.file
    fmt = formats.for_file(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ConfigError(f"--max-batch: must be an integer >= 1, got {max_batch!r}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {threads}")
    if provider not in PROVIDERS:
        raise ConfigError(f"--provider: expected one of {', '.join(PROVIDERS)}, got {provider!r}")
    # Imported on first use: serving an ONNX model must not pay for importing torch, nor the reverse.
    try:
        runtime = importlib.import_module(RUNTIMES[fmt.runtime])
    except ModuleNotFoundError as exc:
        if exc.name != fmt.runtime:
            raise
        raise ConfigError(f"{path}: {fmt.name} files run on {fmt.runtime}, which is not installed: "
                          f"{_INSTALL[fmt.runtime]}") from None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if check_hash:
        manifest.check_bytes(path, data, fmt)
    backend = runtime.load(path, fmt, data, threads, provider, model)
    backend.max_batch = max_batch
    return backend
