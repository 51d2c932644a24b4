"""The format registry: every kind of model file the toolkit writes, loads, verifies and benchmarks.

One entry per format. Export, `load_backend`, verify, predict, the report, the benchmarks and the
tests all read this table; adding a format is one entry here plus its writer (`export.WRITERS`) and,
for a new runtime, its loader (`backends`). Torch-free.

Each entry also carries its verification policy (`Format.tolerance`): fp32 files must give the eager
model's logits within `LogitTolerance` and its predictions on at least `MIN_FP32_AGREEMENT` of the
images; reduced-precision files (fp16, int8) cannot, by design, so they must give the eager model's
accuracy within `AccuracyTolerance`, overall and for every class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.core.errors import ArtifactError, ConfigError

# The fp32 logit tolerance, and why it scales with the model.
#
# An fp32 export computes the same function as the eager model in a different order (other convolution
# algorithms, fused operators, other summation trees), so its logits differ by rounding, and that
# rounding error grows with the network: each layer adds its own and passes on (often amplifies) what
# it received. A fixed bound is therefore either loose for a small net or too tight for a deep one.
# The bound used instead is measured on the model itself: its own fp32 rounding noise is
#     noise = max |eager fp32 logit − eager float64 logit|
# over the first `NOISE_IMAGES` images of the verified split (float64 stands in for the exact result).
# Another correct fp32 implementation is off from the exact result by rounding of the same kind, so it
# is within noise + (its own error) of eager; allowing `NOISE_FACTOR` = 10 times the noise covers an
# implementation with up to 9 times eager's error (Winograd-type convolutions have a few times that of
# direct ones, and a maximum over a few hundred logits understates the split's) while a real fault (a
# wrong weight, operator or preprocessing step) moves logits by far more. Measured on 5,000 real images:
# resnet18 noise 5.8e-7, its model.onnx off by at most 3.3e-6 (5.8× the noise); speednet 7.4e-7 and
# 2.4e-6 (3.2×). Every logit must lie within
#     max(LOGIT_ATOL, NOISE_FACTOR · noise) + LOGIT_RTOL·|eager logit|,
# never less than the fixed floor of 1e-4 + 1e-4·|eager logit|, which is what a small net gets. On top of
# that, at least `MIN_FP32_AGREEMENT` (99.9 %) of the predictions must equal eager's (never fewer than one
# differing image allowed, the finest step a split can measure): a prediction may flip only at a near-tie,
# and near-ties are rare. `toolkit verify --atol/--rtol` replace the rule by a fixed
# bound atol + rtol·|eager logit| (no scaling); the agreement requirement stays.
LOGIT_ATOL = 1e-4
LOGIT_RTOL = 1e-4
NOISE_FACTOR = 10.0
NOISE_IMAGES = 32  # float64 runs of a deep net are slow on CPUs (ResNet-18: ~0.7 s per image on one core)
MIN_FP32_AGREEMENT = 0.999


@dataclass(frozen=True)
class LogitTolerance:
    """Every logit within atol' + rtol·|eager logit|, where atol' = max(atol, NOISE_FACTOR·fp32_noise) when the
    model's fp32 noise was measured (the default rule), else atol (`toolkit verify --atol/--rtol`)."""

    atol: float = LOGIT_ATOL
    rtol: float = LOGIT_RTOL
    fp32_noise: float | None = None  # max |eager fp32 − eager float64| logit; None: a fixed bound, not scaled

    @property
    def effective_atol(self) -> float:
        return self.atol if self.fp32_noise is None else max(self.atol, NOISE_FACTOR * self.fp32_noise)

    def describe(self) -> str:
        bound = f"|Δlogit| <= {self.effective_atol:.3g} + {self.rtol:g}·|eager|"
        if self.fp32_noise is not None:
            bound += (f" (max of {self.atol:g} and {NOISE_FACTOR:g}× the model's fp32 noise "
                      f"{self.fp32_noise:.2g})")
        return f"{bound}, predictions agree on >= {100 * MIN_FP32_AGREEMENT:g} %"


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
    # Static QDQ int8 (uint8 activations, int8 per-channel weights), calibrated on training images
    # (`export.write_onnx_int8`). Measured on 5,000 held-out real images (models trained briefly, about
    # 41-43 % accurate): resnet18 +0.02 pp overall, at most 1.4 pp per class, 97.7 % of predictions
    # unchanged; speednet +0.1 pp, 1.6 pp, 97.8 %.
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
