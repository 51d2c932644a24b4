"""The format registry: every kind of model file the toolkit writes, loads, verifies and benchmarks.

One entry per format. Export, `load_backend`, verify, predict, the report, the benchmarks and the
tests all read this table; adding a format is one entry here plus its writer (`export.WRITERS`) and,
for a new runtime, its loader (`backends`). Torch-free.

Each entry also carries its verification policy (`Format.tolerance`): fp32 files must give the eager
model's logits within `LogitTolerance` (`toolkit verify --atol/--rtol`); reduced-precision files
(fp16, int8) cannot, by design, so they must give the eager model's accuracy within
`AccuracyTolerance`, overall and for every class.
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
class LogitTolerance:
    """Every logit within atol + rtol·|eager logit| (the defaults of `toolkit verify --atol/--rtol`)."""

    atol: float = LOGIT_ATOL
    rtol: float = LOGIT_RTOL

    def describe(self) -> str:
        return f"|Δlogit| <= {self.atol:g} + {self.rtol:g}·|eager|"


@dataclass(frozen=True)
class AccuracyTolerance:
    """Accuracy within `overall_pp` percentage points of eager's on the same images, and within
    `per_class_pp` for every class (|difference|, either direction); never less than one image, the
    finest step a split can measure (`toolkit.apps.verify`)."""

    overall_pp: float
    per_class_pp: float

    def describe(self) -> str:
        return (f"accuracy within {self.overall_pp:g} pp of eager, {self.per_class_pp:g} pp per class "
                "(at least one image)")


@dataclass(frozen=True)
class Format:
    """One kind of model file."""

    name: str  # used by --formats, verify rows, report tables, benchmark rows
    file: str  # its file name in an export folder
    runtime: str  # what runs it: "torch" or "onnxruntime"
    program: bool  # the file is code that can run while loading (see docs/security.md)
    exported: bool  # written by `toolkit export --formats` (the eager weights are always copied)
    precision: str = "fp32"  # of the weights and compute; input and output are fp32 for every format
    tolerance: LogitTolerance | AccuracyTolerance = LogitTolerance()  # what `toolkit verify` demands of it

    @property
    def suffix(self) -> str:
        return Path(self.file).suffix

    @property
    def by_accuracy(self) -> bool:
        """Verified by its accuracy (reduced precision), not by its logits."""
        return isinstance(self.tolerance, AccuracyTolerance)


# In display order: eager first, since every other format is compared with it.
FORMATS: tuple[Format, ...] = (
    Format("eager", "model.safetensors", runtime="torch", program=False, exported=False),
    Format("torchscript", "model.ts", runtime="torch", program=True, exported=True),
    Format("pt2", "model.pt2", runtime="torch", program=True, exported=True),
    Format("onnx", "model.onnx", runtime="onnxruntime", program=False, exported=True),
    # Derived from model.onnx. fp16: weights and compute in fp16 (on GPUs; ONNX Runtime's CPU provider
    # computes in fp32 from the fp16 weights), fp32 input and output. Measured on 5,000 held-out real
    # images (3-epoch model): 2 predictions changed, accuracy unchanged.
    Format("onnx-fp16", "model.fp16.onnx", runtime="onnxruntime", program=False, exported=True, precision="fp16",
           tolerance=AccuracyTolerance(overall_pp=0.2, per_class_pp=1.0)),
    # Static QDQ int8, per-channel weights, calibrated on training images (`export.write_onnx_int8`).
    # Measured on the same images over several calibration settings: within 0.25 pp of eager overall and
    # 1.6 pp per class, 98.2-98.7 % of predictions unchanged.
    Format("onnx-int8", "model.int8.onnx", runtime="onnxruntime", program=False, exported=True, precision="int8",
           tolerance=AccuracyTolerance(overall_pp=1.0, per_class_pp=3.0)),
)
BY_NAME = {f.name: f for f in FORMATS}
EAGER = BY_NAME["eager"]
EXPORTABLE = tuple(f.name for f in FORMATS if f.exported)  # `toolkit export`'s default --formats
ONNX = BY_NAME["onnx"]  # the fp32 ONNX file the reduced-precision ONNX files are derived from
SUFFIXES = tuple(dict.fromkeys(f.suffix for f in FORMATS))


def get(name: str) -> Format:
    """The registered format called `name`; an unknown name is an `ArtifactError` listing the known ones."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ArtifactError(f"unknown format {name!r}; known: {', '.join(BY_NAME)}") from None


def for_file(path: str | Path) -> Format:
    """The format of a model file: by its export file name, else by its suffix (a renamed or copied file;
    a renamed fp16 or int8 .onnx file is run all the same, under the name `onnx`)."""
    path = Path(path)
    for fmt in FORMATS:
        if path.name == fmt.file:
            return fmt
    for fmt in FORMATS:
        if path.suffix.lower() == fmt.suffix:
            return fmt
    raise ArtifactError(f"{path}: unsupported artifact type {path.suffix!r}; expected one of "
                        f"{', '.join(SUFFIXES)} or a run/export folder")


def by_accuracy(name: str) -> bool:
    """Whether the format called `name` is verified by accuracy; False for unknown names."""
    return name in BY_NAME and BY_NAME[name].by_accuracy


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
