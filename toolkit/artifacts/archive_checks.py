"""Checks on TorchScript (.ts) and torch.export (.pt2) archives, made before torch's loaders see them.

Both formats are programs. `torch.jit.load` runs a scripted class's `__setstate__` while loading;
`torch.export.load` unpickles parts of the archive without restrictions, evaluates symbolic-shape
strings with `sympy.sympify` (Python `eval`), and `.module()` executes the archive's guard code
(docs/security.md has what was found). A toolkit export needs none of that, so these checks accept
only the entries and contents such an export has. They narrow the attack surface; they are not a
sandbox, and they read torch's private archive layouts, which change between releases: they are
trusted only on the torch versions the project declares and tests (`check_torch_version`).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import json
import pickletools
import re
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.version import Version

from toolkit.core.errors import ArtifactError, first_line

DISTRIBUTION = "cifar-toolkit"


@functools.cache
def supported_torch() -> str:
    """The torch versions these checks were written and tested for: the project's declared torch
    requirement (pyproject.toml, read back from the installed package's metadata), e.g. `>=2.11,<2.15`."""
    try:
        requirements = [Requirement(r) for r in metadata.requires(DISTRIBUTION) or []]
    except metadata.PackageNotFoundError:
        return ""
    return next((str(r.specifier) for r in requirements if r.name == "torch" and r.marker is None), "")


def check_torch_version(path: Path, what: str) -> None:
    """Refuse to judge an archive with a torch these checks were not written for: a layout they do not
    know could hide what they look for, and a wrong verdict is worse than none."""
    spec = supported_torch()
    if not spec:
        raise _refuse(path, what, f"the installed {DISTRIBUTION} package declares no torch version range "
                                  "(reinstall it with pip)")
    version = Version(torch.__version__)
    if not Requirement(f"torch{spec}").specifier.contains(Version(version.base_version), prereleases=True):
        raise _refuse(path, what, f"its archive checks are written for torch{spec} and this is torch "
                                  f"{torch.__version__}; load the .onnx or .safetensors file instead (data, not code)")


@contextlib.contextmanager
def _archive_errors(path: Path, what: str) -> Iterator[None]:
    """Whatever a damaged or crafted archive makes zipfile, json or torch raise becomes one ArtifactError."""
    try:
        yield
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, RecursionError, ...
        raise ArtifactError(f"{path}: not a loadable {what} file ({first_line(exc)})") from None


def _zip_entries(path: Path, what: str, data: bytes) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
    """Open a .ts/.pt2 archive, `data` read from `path`: (zip, each entry by its name below the root folder).

    Entries are read through their `ZipInfo`, never looked up by name, and an archive with two entries
    of one name is refused: zip readers differ on which of them the name means (Python's zipfile takes
    the last; torch's reader finds one by binary search and compares names ignoring case, so
    `code/x.py` and `CODE/x.py` are one name to it too).
    """
    # A quick check gives "not a ... file" rather than a miniz error.
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise ArtifactError(f"{path}: not a {what} file (not a zip archive; truncated or a different format?)")
    with _archive_errors(path, what):
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    seen: dict[str, str] = {}  # lower-cased name -> the first entry's name
    for info in infos:
        if (first := seen.get(info.filename.lower())) is not None:
            archive.close()
            raise _refuse(path, what, f"it holds two entries named {first!r} (zip readers differ on which one "
                                      "that name means)" if first == info.filename else
                                      f"its entries {first!r} and {info.filename!r} are one name to torch's reader, "
                                      "which ignores case")
        seen[info.filename.lower()] = info.filename
    roots = {info.filename.split("/", 1)[0] for info in infos}
    if len(roots) != 1 or any("/" not in info.filename for info in infos):
        archive.close()
        raise ArtifactError(f"{path}: not a {what} file (its entries are not all in one folder: {sorted(roots)[:5]})")
    root = roots.pop()
    return archive, {info.filename[len(root) + 1:]: info for info in infos}


def _refuse(path: Path, what: str, reason: str) -> ArtifactError:
    return ArtifactError(f"{path}: refusing to load this {what} file: {reason}")


# What the pickles inside a TorchScript archive may name: the archive's own TorchScript classes
# (`__torch__.*`, compiled from its code/ folder, not imported) and torch's tensor rebuilders.
# Checked here rather than trusted to torch: whether `torch.jit.load`'s unpickler refuses other names
# has changed between releases.
_TS_GLOBAL = re.compile(r"__torch__(\.\w+)* \w+|collections OrderedDict|torch \w+Storage"
                        r"|torch\._utils _rebuild_(tensor|tensor_v2|qtensor|sparse_tensor|parameter)"
                        r"|torch\.jit\._pickle (build_\w+|restore_type_tag)")
_PICKLE_IMPORTS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"}


def _check_pickle(path: Path, what: str, entry: str, data: bytes) -> None:
    """Refuse a pickle that imports anything a `torch.jit.save` pickle does not (it would run on loading)."""
    for op, arg, _ in pickletools.genops(data):
        if op.name not in _PICKLE_IMPORTS:
            continue
        # torch writes protocol-2 GLOBALs only; the other ways to reach a Python object are refused outright.
        if op.name != "GLOBAL" or not _TS_GLOBAL.fullmatch(str(arg)):
            name = str(arg).replace(" ", ".") if arg is not None else op.name
            raise _refuse(path, what, f"{entry} refers to {name}, which a TorchScript file's pickles never do "
                                      "(it would run Python while loading)")


def _check_code(path: Path, what: str, entry: str, source: bytes) -> None:
    """Refuse TorchScript code that defines or names `__setstate__`, which torch.jit.load would run.

    The code is parsed as Python, whose syntax the code `torch.jit.save` writes follows, so no spacing,
    tab or line continuation hides a definition; code Python cannot parse is refused, and so is the name
    anywhere else (a string or comment as Python reads it), since TorchScript's own lexer is not Python's.
    A toolkit export never mentions `__setstate__`.
    """
    try:
        tree = ast.parse(source, filename=entry)
    except (SyntaxError, ValueError) as exc:  # ValueError: null bytes, on Pythons before 3.12
        raise _refuse(path, what, f"{entry} is not code as torch.jit.save writes it ({first_line(exc)})") from None
    for node in ast.walk(tree):
        if "__setstate__" in (getattr(node, "name", None), getattr(node, "id", None), getattr(node, "attr", None)):
            verb = "defines" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else "refers to"
            raise _refuse(path, what, f"{entry} {verb} __setstate__ (line {node.lineno}), code that would run "
                                      "while loading")
    if b"__setstate__" in source:
        raise _refuse(path, what, f"{entry} mentions __setstate__ in a string or comment, which TorchScript's "
                                  "parser might read as code that would run while loading")


def check_torchscript_archive(path: Path, data: bytes) -> None:
    """`data`, the content of `path`: a TorchScript archive as `torch.jit.save` writes it, and no code that
    runs at load time.

    Its pickles (data.pkl, constants.pkl, the debug pickles beside the code) may only rebuild tensors
    and the archive's own TorchScript classes; and a scripted class's `__setstate__`, which would run
    while loading, is refused. A toolkit export has neither.
    """
    what = "TorchScript"
    check_torch_version(path, what)
    archive, entries = _zip_entries(path, what, data)
    with archive, _archive_errors(path, what):
        # torch.jit.load finds entries by name ignoring case, so `CODE/x.PY` is code to it too.
        lowered = {entry.lower() for entry in entries}
        missing = [e for e in ("data.pkl", "constants.pkl") if e not in lowered]
        # torch writes `.data/version` instead of `version` once an operator in the model (GELU, for one) needs
        # a newer file format version, and reads either.
        if not {"version", ".data/version"} & lowered:
            missing.append("version")
        if missing or not any(e.startswith("code/") for e in lowered):
            hint = " (it looks like a torch.export .pt2 archive)" if "archive_format" in lowered else \
                   " (a torch.save checkpoint or another zip?)"
            raise ArtifactError(f"{path}: not a TorchScript file: no {', '.join(missing) or 'code/'} inside{hint}")
        for entry, info in entries.items():
            name = entry.lower()
            if name.endswith((".pkl", ".debug_pkl")):
                _check_pickle(path, what, entry, archive.read(info))
            if name.startswith("code/") and name.endswith(".py"):
                _check_code(path, what, entry, archive.read(info))


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


def check_pt2_archive(path: Path, data: bytes) -> None:
    """Refuse `data`, the content of the .pt2 file `path`, if it would make `torch.export.load` or `.module()`
    run code of the file's choosing.

    torch.export.load (torch 2.x) unpickles `use_pickle` weights and constants with
    `torch.load(weights_only=False)`, custom and opaque objects with `pickle.loads`, and its sample
    inputs with a `weights_only=False` fallback; loads AOTInductor shared libraries; evaluates
    symbolic-shape strings with `sympy.sympify`; and `ExportedProgram.module()` executes the guard
    code stored in the program. A toolkit export needs none of that, so only the entries a plain
    program has are accepted, tensors stored as raw bytes, sample inputs that load with
    `weights_only=True`, sympy-printed integer expressions, ATen operators and no guard code.
    """
    what = "torch.export (.pt2)"
    check_torch_version(path, what)
    archive, entries = _zip_entries(path, what, data)
    with archive, _archive_errors(path, what):
        def read(entry: str) -> bytes:
            return archive.read(entries[entry])

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
