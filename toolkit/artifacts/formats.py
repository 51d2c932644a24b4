"""The format registry: every kind of model file the toolkit writes, loads, verifies and benchmarks.

One entry per format. Export, `load_backend`, verify, predict, the report, the benchmarks and the
tests all read this table; adding a format is one entry here plus its writer (`export.WRITERS`) and,
for a new runtime, its loader (`backends`). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.core.errors import ArtifactError, ConfigError

# fp32 exports must give the eager model's logits within LOGIT_ATOL + LOGIT_RTOL·|eager logit|
# (`toolkit verify --atol/--rtol`); float reordering between runtimes stays near 1e-6.
LOGIT_ATOL = 1e-4
LOGIT_RTOL = 1e-4

@dataclass(frozen=True)
class Format:
    """One kind of model file."""

    name: str  # used by --formats, verify rows, report tables, benchmark rows
    file: str  # its file name in an export folder
    runtime: str  # what runs it: "torch" or "onnxruntime"
    program: bool  # the file is code that can run while loading (see docs/security.md)
    exported: bool  # written by `toolkit export --formats` (the eager weights are always copied)

    @property
    def suffix(self) -> str:
        return Path(self.file).suffix


# In display order: eager first, since every other format is compared with it.
FORMATS: tuple[Format, ...] = (
    Format("eager", "model.safetensors", runtime="torch", program=False, exported=False),
    Format("torchscript", "model.ts", runtime="torch", program=True, exported=True),
    Format("pt2", "model.pt2", runtime="torch", program=True, exported=True),
    Format("onnx", "model.onnx", runtime="onnxruntime", program=False, exported=True),
)
BY_NAME = {f.name: f for f in FORMATS}
EAGER = BY_NAME["eager"]
EXPORTABLE = tuple(f.name for f in FORMATS if f.exported)  # `toolkit export`'s default --formats
SUFFIXES = tuple(dict.fromkeys(f.suffix for f in FORMATS))


def get(name: str) -> Format:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ArtifactError(f"unknown format {name!r}; known: {', '.join(BY_NAME)}") from None


def for_file(path: str | Path) -> Format:
    """The format of a model file: by its export file name, else by its suffix (a renamed or copied file)."""
    path = Path(path)
    for fmt in FORMATS:
        if path.name == fmt.file:
            return fmt
    for fmt in FORMATS:
        if path.suffix.lower() == fmt.suffix:
            return fmt
    raise ArtifactError(f"{path}: unsupported artifact type {path.suffix!r}; expected one of "
                        f"{', '.join(SUFFIXES)} or a run/export folder")


def order(name: str) -> int:
    """Display position of a format name (unknown names last)."""
    return next((i for i, f in enumerate(FORMATS) if f.name == name), len(FORMATS))


def parse_formats(text: str) -> list[str]:
    """`torchscript,onnx,pt2` -> a list of exportable format names (order kept, duplicates dropped)."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in EXPORTABLE]
    if unknown or not names:
        raise ConfigError(f"--formats: unknown format(s) {unknown or [text]}; choose from {','.join(EXPORTABLE)}")
    return names
