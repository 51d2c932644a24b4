"""One inference interface over every runtime: eager PyTorch, TorchScript, torch.export, ONNX Runtime.

`load_backend(path)` picks the runtime from the file suffix and returns a `Backend` whose
`predict_logits(batch)` takes an N×3×32×32 float32 normalized batch (numpy or torch) and returns
N×classes float32 logits as a numpy array. This module is the only place that knows how each format
is loaded and run; verification, `toolkit predict` and the benchmarks all go through it.

Every backend validates its input itself (type, rank, channels, size, dtype, finite values, non-empty,
at most `max_batch` images) and raises `InputError` naming the expected and the actual value, so a bad
batch never reaches a runtime whose own answer would be NaN logits, an empty result, a page of C++ or a
guard assertion. It checks the output too: N×classes, and finite (finite inputs so large that the model
overflows are an `InputError`, not NaN logits). Batches run `CHUNK` images at a time, so memory stays
bounded.

Each artifact carries its own `ArtifactMetadata` (class names, normalization): ONNX in
`metadata_props`, TorchScript and torch.export in the extra file `metadata.json`. The eager model's
comes from its safetensors header and the training normalization.

Which files are safe to load
----------------------------
(docs/security.md says the same at more length, with what was found in torch's loaders.)

- `.safetensors` (eager weights, checkpoint weights): data only, a JSON header and raw tensor bytes.
  Safe to load from anywhere; the worst a bad file can do is fail to load or give wrong answers.
- `.onnx`: a graph of standard ONNX operators, run by ONNX Runtime. It cannot run arbitrary code,
  but it is not inert data either: a malicious graph can still exhaust memory or CPU (huge
  shapes, enormous initializers, loops). The toolkit refuses ONNX files that reference external
  data files, so a model can only read its own bytes.
- `.ts` (TorchScript) and `.pt2` (torch.export) are programs. TorchScript runs its own code, even
  at load time (`__setstate__`); `torch.export.load` unpickles parts of the archive without
  restrictions, evaluates symbolic-shape strings with `sympy.sympify` (Python `eval`), executes
  the archive's guard code and loads AOTInductor native libraries. Load them only from sources you
  trust, or after checking their sha256 against a `manifest.json` you trust. `toolkit predict` and
  `toolkit verify` check the hash against the manifest beside the file before loading it, and
  before calling torch's loaders this module refuses archives that are not what their suffix says
  or that hold pickled objects, compiled code, guard code or anything a toolkit export does not
  contain. That check narrows the attack surface; it is not a sandbox.
- Checkpoints: `model.safetensors` is data; the optimizer, scheduler and RNG `.pt` files are read
  with `torch.load(weights_only=True)` (no arbitrary unpickling), after their sha256 is checked
  against `state.json`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
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
DEFAULT_MAX_BATCH = 65536  # images per `predict_logits` call (`toolkit predict --max-batch`)
CHUNK = 1024  # images per runtime call inside `predict_logits`, so memory stays bounded
# Non-finite logits for an input no larger than this (far beyond normalized pixels, ±3, and even raw
# 0..255 pixels) mean a broken model, not an overflowing input.
_PLAUSIBLE_INPUT = 1e4


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


def validate_batch(batch: torch.Tensor | np.ndarray, source: str | Path, batch_size: int | None = None,
                   max_batch: int | None = None) -> np.ndarray:
    """Check a model input and return it as a C-contiguous float32 numpy array (no copy when possible).

    Every problem is an `InputError` naming the expected and the actual value; nothing else escapes,
    whatever the argument (any type, rank, shape, dtype, device, layout).
    """
    expected = f"N×{CHANNELS}×{HEIGHT}×{WIDTH} float32"
    if isinstance(batch, torch.Tensor):
        if batch.is_nested or batch.layout != torch.strided:
            raise InputError(f"{source}: expected a dense {expected} tensor, got a "
                             f"{'nested' if batch.is_nested else str(batch.layout).removeprefix('torch.')} tensor")
        dtype = str(batch.dtype).removeprefix("torch.")
        is_float32 = batch.dtype == torch.float32
    elif isinstance(batch, np.ndarray) and not isinstance(batch, np.ma.MaskedArray):
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
    if isinstance(batch, torch.Tensor):
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

    name: str  # the runtime: eager, torchscript, pt2, onnxruntime
    batch_size: int | None = None  # a fixed batch size the artifact demands (None: dynamic)
    max_batch: int | None = DEFAULT_MAX_BATCH  # most images per `predict_logits` call (None: no limit)

    def __init__(self, path: Path, metadata: ArtifactMetadata) -> None:
        self.path = path
        self.metadata = metadata

    @property
    def classes(self) -> list[str]:
        return self.metadata.class_names

    def predict_logits(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """N×3×32×32 float32 normalized images -> N×classes float32 logits, all finite.

        At most `max_batch` images per call; the runtime sees them `CHUNK` at a time. A bad batch, or one
        whose values are so large that the model overflows, is an `InputError`; a model whose output is
        not N×classes is an `ArtifactError`.
        """
        x = validate_batch(batch, self.path, self.batch_size, self.max_batch)
        step = len(x) if self.batch_size is not None else CHUNK
        return np.concatenate([self._checked_run(x[i:i + step], i) for i in range(0, len(x), step)])

    def _checked_run(self, x: np.ndarray, offset: int) -> np.ndarray:
        logits = np.asarray(self._run(x))
        if logits.shape != (len(x), len(self.classes)):
            raise ArtifactError(f"{self.path}: the model returned logits of shape {logits.shape} for {len(x)} images; "
                                f"expected ({len(x)}, {len(self.classes)})")
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


class _TorchBackend(Backend):
    """Any callable torch module; inference mode, CPU."""

    def __init__(self, path: Path, metadata: ArtifactMetadata, module) -> None:
        super().__init__(path, metadata)
        self.module = module

    def _run(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch if batch.flags.writeable else batch.copy())  # torch wants writable memory
        with torch.inference_mode():
            return self.module(x).float().numpy()


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


def load_backend(path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None,
                 max_batch: int | None = DEFAULT_MAX_BATCH) -> Backend:
    """Load a model artifact by path: .ts, .pt2, .onnx, or eager weights (.safetensors, a run or export folder).

    `threads` sets the runtime's intra-op threads (for torch formats: torch's process-wide setting).
    `providers` are ONNX Runtime execution providers; by default CUDA when available, else CPU.
    `max_batch` bounds the images per `predict_logits` call (None: no bound).

    .ts and .pt2 files are programs: see "Which files are safe to load" above. Their archive is
    checked before torch's loader sees it; checking its sha256 against a manifest is the caller's job
    (`toolkit.export.hash_mismatch`), as `toolkit predict` and `toolkit verify` do.
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
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ConfigError(f"--max-batch: must be an integer >= 1, got {max_batch!r}")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads: must be >= 1, got {threads}")
        if kind != "onnxruntime":
            torch.set_num_threads(threads)
    if kind == "onnxruntime":
        backend = _load_onnx(path, threads, providers)
    elif kind == "eager":
        backend = _load_eager(path)
    elif kind == "torchscript":
        backend = _load_torchscript(path)
    else:
        backend = _load_exported_program(path)
    backend.max_batch = max_batch
    return backend


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


@contextlib.contextmanager
def _archive_errors(path: Path, what: str) -> Iterator[None]:
    """Whatever a damaged or crafted archive makes zipfile, json or torch raise becomes one ArtifactError."""
    try:
        yield
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, RecursionError, ...
        raise ArtifactError(f"{path}: not a loadable {what} file ({first_line(exc)})") from None


def _zip_entries(path: Path, what: str) -> tuple[zipfile.ZipFile, str, list[str]]:
    """Open a .ts/.pt2 archive: (zip, its root folder, entry names below the root)."""
    # A quick check gives "not a ... file" rather than a miniz error.
    if not zipfile.is_zipfile(path):
        raise ArtifactError(f"{path}: not a {what} file (not a zip archive; truncated or a different format?)")
    with _archive_errors(path, what):
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        archive.close()
        raise ArtifactError(f"{path}: not a {what} file (its entries are not all in one folder: {sorted(roots)[:5]})")
    root = roots.pop()
    return archive, root, [name[len(root) + 1:] for name in names]


def _refuse(path: Path, what: str, reason: str) -> ArtifactError:
    return ArtifactError(f"{path}: refusing to load this {what} file: {reason}")


def _check_torchscript_archive(path: Path) -> None:
    """A TorchScript archive as `torch.jit.save` writes it, and no TorchScript code that runs at load time.

    `torch.jit.load` reads data.pkl/constants.pkl with torch's own restricted unpickler (an unknown
    class is an error, not an import), so a renamed pickle cannot run Python; but a scripted class's
    `__setstate__` runs while loading. A toolkit export never has one.
    """
    what = "TorchScript"
    archive, root, entries = _zip_entries(path, what)
    with archive, _archive_errors(path, what):
        required = ["data.pkl", "constants.pkl", "version"]
        missing = [e for e in required if e not in entries]
        if missing or not any(e.startswith("code/") for e in entries):
            hint = " (it looks like a torch.export .pt2 archive)" if "archive_format" in entries else \
                   " (a torch.save checkpoint or another zip?)"
            raise ArtifactError(f"{path}: not a TorchScript file: no {', '.join(missing) or 'code/'} inside{hint}")
        for entry in entries:
            if entry.startswith("code/") and entry.endswith(".py"):
                if re.search(rb"\bdef __setstate__\b", archive.read(f"{root}/{entry}")):
                    raise _refuse(path, what, f"{entry} defines __setstate__, code that would run while loading")


# What `torch.export.save` writes for one plain ExportedProgram, relative to the archive's root folder.
_PT2_ENTRY = re.compile(r"""(?x)
    archive_format | archive_version | byteorder | \.data/\w+
  | models/\w+\.json
  | data/weights/(\w+_weights_config\.json | weight_\d+)
  | data/constants/(\w+_constants_config\.json | tensor_\w+)
  | data/sample_inputs/\w+\.pt
  | extra/[^/]+""")
_PT2_PAYLOAD_PREFIX = {"data/weights/": "weight_", "data/constants/": "tensor_"}
# Python callables a graph node may target: ATen/prims operators and symbolic integer arithmetic.
_PT2_TARGET = re.compile(r"torch\.ops\.(aten|prims)\.\w+\.\w+|torch\.sym_\w+|math\.(ceil|floor|trunc|sqrt)"
                         r"|_operator\.(getitem|add|sub|mul|floordiv|truediv|mod|neg|pow"
                         r"|eq|ne|lt|le|gt|ge|and_|or_|not_)")
# `sympy.sympify` evaluates expression strings as Python: only sympy's printed form of integer
# expressions over size symbols may reach it.
_SYMPY_TOKEN = re.compile(r"\s+|'[A-Za-z_]\w*'|\d+(\.\d+)?([eE][+-]?\d+)?|[A-Za-z_]\w*|\*\*|[-+*/(),=]")
_SYMPY_NAMES = frozenset("""
    Symbol Integer Rational Float Add Mul Pow Max Min Mod Abs floor ceiling sqrt Eq Ne Lt Le Gt Ge
    StrictLessThan StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not Piecewise
    true false True False None oo Infinity NegativeInfinity NegativeOne One Zero Half
    BooleanTrue BooleanFalse integer positive negative nonnegative nonpositive real finite zero nonzero
    even odd rational commutative
    FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift
    PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat
    TruncToInt RoundToInt RoundDecimal ToFloat Identity
""".split())


def _safe_sympy(text: str) -> bool:
    if len(text) > 10_000:
        return False
    pos = 0
    while pos < len(text):
        match = _SYMPY_TOKEN.match(text, pos)
        if match is None:
            return False
        token = match.group()
        if (token[0].isalpha() or token[0] == "_") and token not in _SYMPY_NAMES \
                and not re.fullmatch(r"[a-z]+\d+", token):  # a size symbol by name (s0, u1, ...)
            return False
        pos = match.end()
    return True


def _walk_json(value, key: str = ""):
    """Every (key, value) pair in a JSON document, depth first."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from _walk_json(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _walk_json(v, key)


def _check_pt2_archive(path: Path) -> None:
    """Refuse a .pt2 archive that would make `torch.export.load` or `.module()` run code of the file's choosing.

    torch.export.load (torch 2.x) unpickles `use_pickle` weights and constants with
    `torch.load(weights_only=False)`, custom and opaque objects with `pickle.loads`, and its sample
    inputs with a `weights_only=False` fallback; loads AOTInductor shared libraries; evaluates
    symbolic-shape strings with `sympy.sympify`; and `ExportedProgram.module()` executes the guard
    code stored in the program. A toolkit export needs none of that, so only the entries a plain
    program has are accepted, tensors stored as raw bytes, sample inputs that load with
    `weights_only=True`, sympy-printed integer expressions, ATen operators and no guard code.
    """
    what = "torch.export (.pt2)"
    archive, root, entries = _zip_entries(path, what)
    with archive, _archive_errors(path, what):
        def read(entry: str) -> bytes:
            return archive.read(f"{root}/{entry}")

        if "archive_format" not in entries or read("archive_format").strip() != b"pt2":
            hint = " (it looks like a TorchScript file)" if "code/" in {e[:5] for e in entries} else \
                   " (a torch.save checkpoint, an older torch.export format or another zip?)"
            raise ArtifactError(f"{path}: not a torch.export (.pt2) file: no archive_format 'pt2' inside{hint}")
        for entry in entries:
            if entry.startswith("data/aotinductor/"):
                raise _refuse(path, what, f"{entry}: AOTInductor compiled native code")
            if not _PT2_ENTRY.fullmatch(entry):
                raise _refuse(path, what, f"unexpected entry {entry!r} (a toolkit export holds one plain program: "
                                          "no pickled objects, no compiled code)")
        models = [e for e in entries if e.startswith("models/")]
        if not models:
            raise ArtifactError(f"{path}: not a torch.export (.pt2) file: no models/*.json inside")
        for entry in entries:
            if entry.endswith("_config.json"):
                folder = entry.rsplit("/", 1)[0] + "/"
                config = json.loads(read(entry)).get("config", {})
                for fqn, payload in config.items():
                    name = str(payload.get("path_name", ""))
                    if payload.get("use_pickle") or not re.fullmatch(_PT2_PAYLOAD_PREFIX[folder] + r"\w+", name):
                        raise _refuse(path, what, f"{entry}: {fqn!r} is stored as {name!r}"
                                                  f"{' (pickled)' if payload.get('use_pickle') else ''}, "
                                                  "not as raw tensor bytes")
            elif entry.startswith("data/sample_inputs/"):
                try:
                    torch.load(io.BytesIO(read(entry)), weights_only=True)
                except Exception as exc:  # noqa: BLE001 - any failure: torch would retry without restrictions
                    raise _refuse(path, what, f"{entry} does not load as plain tensors ({type(exc).__name__}); "
                                              "torch.export.load would retry it without restrictions") from None
        for entry in models:
            program = json.loads(read(entry))
            if program.get("guards_code"):
                raise _refuse(path, what, f"{entry}: holds guard code, Python that would run when the program "
                                          "is turned into a module")
            for key, value in _walk_json(program):
                if key == "expr_str" and not (isinstance(value, str) and _safe_sympy(value)):
                    raise _refuse(path, what, f"{entry}: symbolic expression {str(value)[:80]!r} is not a plain "
                                              "integer expression (torch would evaluate it as Python)")
                if key == "nodes" and isinstance(value, list):
                    for node in value:
                        target = node.get("target") if isinstance(node, dict) else None
                        if not (isinstance(target, str) and _PT2_TARGET.fullmatch(target)):
                            raise _refuse(path, what, f"{entry}: graph calls {str(target)[:80]!r}, not an ATen "
                                                      "operator")


def _load_torchscript(path: Path) -> Backend:
    _check_torchscript_archive(path)
    extra = {METADATA_FILE: ""}
    try:
        with _quiet_torch_loading():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - torch's errors for a bad archive share no base class
        raise ArtifactError(f"{path}: not a loadable TorchScript file ({first_line(exc)})") from None
    return TorchScriptBackend(path, _metadata_from_json(extra[METADATA_FILE], path), module.eval())


def _load_exported_program(path: Path) -> Backend:
    _check_pt2_archive(path)
    extra = {METADATA_FILE: ""}
    try:
        with _quiet_torch_loading():
            program = torch.export.load(path, extra_files=extra)
            _check_program_input(program, path)
            module = program.module()
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 - the deserializer's errors (AssertionError, SpecViolationError, ...)
        raise ArtifactError(f"{path}: not a loadable torch.export program ({first_line(exc)})") from None
    return ExportedProgramBackend(path, _metadata_from_json(extra[METADATA_FILE], path), module)


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


def _check_onnx_self_contained(path: Path) -> None:
    """Refuse an ONNX file whose tensors live in external files: a toolkit export is one file, and a
    name inside the model should not make the runtime read other files."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and onnx's own errors
        raise ArtifactError(f"{path}: not a loadable ONNX model ({first_line(exc)})") from None

    def tensors(graph):
        yield from graph.initializer
        yield from (s.values for s in graph.sparse_initializer)
        for node in graph.node:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    for tensor in tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise ArtifactError(f"{path}: tensor {tensor.name!r} is stored in an external file {location!r}; "
                                "only self-contained ONNX files (as `toolkit export` writes) are loaded")


def _load_onnx(path: Path, threads: int | None, providers: Sequence[str] | None) -> Backend:
    import onnxruntime as ort

    _check_onnx_self_contained(path)
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
