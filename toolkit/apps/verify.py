"""Prove that every exported artifact behaves like the eager model, over a whole split.

All formats, eager included, run through `toolkit.artifacts.backends`, each preprocessing the split's uint8
images with the normalization embedded in its own file (so wrong metadata shows up as wrong logits,
as it would for a client). Per format: max |Δlogit| against eager, argmax agreement (overall and per
class), accuracy and per-class accuracy. Each format is held to its registry policy
(`toolkit.artifacts.formats.Format.tolerance`). An fp32 format fails when

- any logit is outside `atol' + rtol·|eager logit|`, where atol' is the larger of atol and
  `NOISE_FACTOR` times the model's own fp32 rounding noise (eager fp32 against eager float64 on the
  first `NOISE_IMAGES` images; the reasoning is in `toolkit.artifacts.formats`), or atol itself when
  `--atol/--rtol` are given, or
- its prediction differs from eager's on an image where eager's top-2 margin exceeds that tolerance
  (a flip there is not rounding noise), or
- its predictions agree with eager's on fewer than `MIN_FP32_AGREEMENT` (99.9 %) of the images
  (at least one differing image is always allowed);

a reduced-precision format (fp16, int8), whose logits differ from eager's by design, fails when its
accuracy differs from eager's by more than the allowed percentage points overall or for any class.
Any format fails when

- its class names differ from the manifest's, or
- its sha256 differs from manifest.json (it changed after export). The hash is checked before the
  file is loaded: a changed .ts or .pt2 file is a program of unknown origin and is not loaded at all
  (its row reads nan); a changed .onnx or .safetensors file (data) is still run and its numbers reported.

`provider` chooses where ONNX Runtime runs the .onnx files (`--provider`); the torch formats, eager
included, run on the CPU. Each row records the provider it ran on.

Verification only reads the export folder; nothing is written there unless `--json-out` points there.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.artifacts import formats
from toolkit.artifacts.backends import DEFAULT_PROVIDER, Backend, load_backend
from toolkit.artifacts.formats import MIN_FP32_AGREEMENT, NOISE_IMAGES, AccuracyTolerance, LogitTolerance
from toolkit.artifacts.manifest import MANIFEST, Manifest, hash_mismatch
from toolkit.artifacts.torch_runtime import TorchBackend
from toolkit.core.errors import ConfigError, DataError, VerificationError
from toolkit.core.files import write_json_atomic
from toolkit.core.images import tta_logits
from toolkit.training.config import DataConfig
from toolkit.training.data import Split, load_held_out
from toolkit.training.evaluate import EvalResult

DEFAULT_ATOL = formats.LOGIT_ATOL
DEFAULT_RTOL = formats.LOGIT_RTOL
_BATCH = 500  # images per predict_logits call


@dataclass
class FormatResult:
    """One artifact compared with the eager model on every image of the split."""

    name: str
    file: str
    max_abs_diff: float
    agreement: float  # fraction of images whose argmax equals eager's
    accuracy: float
    per_class: dict[str, float]
    worst_sample: int  # index in the split of the image furthest outside (or nearest to) the logit tolerance
    hash_ok: bool | None  # None: the manifest lists no hash for this file
    failures: list[str] = field(default_factory=list)
    per_class_agreement: dict[str, float] = field(default_factory=dict)  # by true class
    tolerance: str = ""  # the policy it was held to, in words
    provider: str | None = None  # where it ran (None: not loaded)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def loaded(self) -> bool:
        """False for a program that was refused before loading (its numbers are nan)."""
        return self.max_abs_diff == self.max_abs_diff

    def to_json(self) -> dict[str, Any]:
        def number(x: float) -> float | None:  # nan (a file that was not run) is null in JSON
            return None if x != x else x

        return {"file": self.file, "passed": self.passed, "tolerance": self.tolerance, "provider": self.provider,
                "max_abs_logit_diff": number(self.max_abs_diff), "agreement": number(self.agreement),
                "per_class_agreement": {c: number(a) for c, a in self.per_class_agreement.items()},
                "accuracy": number(self.accuracy), "per_class": {c: number(a) for c, a in self.per_class.items()},
                "worst_sample": self.worst_sample, "sha256_matches_manifest": self.hash_ok,
                "failures": self.failures}

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> FormatResult:
        def number(x: float | None) -> float:
            return float("nan") if x is None else x

        return cls(name, d["file"], number(d["max_abs_logit_diff"]), number(d["agreement"]), number(d["accuracy"]),
                   {c: number(a) for c, a in (d["per_class"] or {}).items()}, d["worst_sample"],
                   d["sha256_matches_manifest"], list(d["failures"]),
                   {c: number(a) for c, a in (d.get("per_class_agreement") or {}).items()},  # absent before fp16/int8
                   d.get("tolerance", ""), d.get("provider"))


@dataclass
class VerifyReport:
    export_dir: Path
    split: str
    n: int
    classes: list[str]
    atol: float
    rtol: float
    results: list[FormatResult]
    note: str | None = None
    provider: str = DEFAULT_PROVIDER  # `--provider`: where ONNX Runtime was asked to run
    tta: str = "none"  # `--tta`: every format's logits averaged over these views (toolkit.core.images.TTA_VIEWS)
    fp32_noise: float | None = None  # the model's measured fp32 noise; None: `--atol/--rtol` given, not scaled

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def logit_tolerance(self) -> LogitTolerance:
        """What the fp32 formats were held to."""
        return LogitTolerance(self.atol, self.rtol, self.fp32_noise)

    def to_json(self) -> dict[str, Any]:
        return {"export_dir": str(self.export_dir), "split": self.split, "n": self.n, "classes": self.classes,
                "atol": self.atol, "rtol": self.rtol, "fp32_noise": self.fp32_noise,
                "effective_atol": self.logit_tolerance.effective_atol, "provider": self.provider,
                "passed": self.passed, "note": self.note, "tta": self.tta,
                "formats": {r.name: r.to_json() for r in self.results}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VerifyReport:
        return cls(Path(d["export_dir"]), d["split"], d["n"], list(d["classes"]), d["atol"], d["rtol"],
                   [FormatResult.from_json(name, r) for name, r in d["formats"].items()], d.get("note"),
                   d.get("provider", DEFAULT_PROVIDER), d.get("tta", "none"),
                   d.get("fp32_noise"))  # absent before the scaled rule

    def write(self, path: Path) -> None:
        """verify.json (or `--json-out`): `to_json()`, indented, written atomically."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> VerifyReport:
        return cls.from_json(json.loads(Path(path).read_text()))

    def format(self) -> str:
        """The terminal table: one row per format, overall and per-class accuracy side by side."""
        short = [c[:6] for c in self.classes]
        header = (f"{'format':<12s} {'max|Δlogit|':>11s} {'agree %':>8s} {'acc %':>6s} "
                  + " ".join(f"{s:>6s}" for s in short) + "  result")
        views = "" if self.tta == "none" else f", test-time augmentation {self.tta}"
        lines = [f"verify {self.export_dir}: {self.split} split, {self.n} images, ONNX Runtime provider {self.provider}"
                 + views,
                 f"  fp32 formats: {self.logit_tolerance.describe()}"]
        lines += [f"  {r.name}: {r.tolerance} (reduced precision)" for r in self.results if formats.by_accuracy(r.name)]
        if self.note:
            lines.append(f"note: {self.note}")
        lines.append(header)
        for r in self.results:
            lines.append(f"{r.name:<12s} {r.max_abs_diff:>11.2e} {100 * r.agreement:>8.2f} {100 * r.accuracy:>6.1f} "
                         + " ".join(f"{100 * a:>6.1f}" for a in r.per_class.values())
                         + ("  ok" if r.passed else "  FAIL"))
            if r.per_class_agreement and formats.by_accuracy(r.name):  # per-class agreement under its accuracies
                lines.append(f"{'  agree %':<12s} {'':>11s} {'':>8s} {'':>6s} "
                             + " ".join(f"{100 * a:>6.1f}" for a in r.per_class_agreement.values()))
        for r in self.results:
            lines += [f"FAIL {r.name} ({r.file}): {reason}" for reason in r.failures]
        lines.append("verify: " + ("all formats match the eager model" if self.passed else "FAILED"))
        return "\n".join(lines)


def _accuracy_failures(name: str, result: FormatResult, eager: EvalResult, tolerance: AccuracyTolerance) -> list[str]:
    """Why `result`'s accuracy is further from eager's than `tolerance` allows (empty: within it).

    The allowance is never finer than one image: on a split of 100 images (10 per class) one changed
    prediction moves accuracy by 1 pp and its class's by 10 pp, so that much is always allowed.
    """
    slack = 1e-4  # pp: per-class accuracies are float32 quotients; a difference exactly at the limit passes
    failures = []
    diff = 100 * (result.accuracy - eager.accuracy)  # percentage points
    allowed = max(tolerance.overall_pp, 100 / max(eager.n, 1))
    if abs(diff) > allowed + slack:
        failures.append(f"accuracy {100 * result.accuracy:.2f} % differs from eager's {100 * eager.accuracy:.2f} % by "
                        f"{diff:+.2f} pp, more than the {allowed:g} pp allowed for {name}")
    sizes = dict(zip(eager.classes, eager.confusion.sum(dim=1).tolist()))
    per_class = {c: 100 * (a - eager.per_class[c]) for c, a in result.per_class.items()}
    allowed = {c: max(tolerance.per_class_pp, 100 / max(sizes[c], 1)) for c in per_class}
    outside = [c for c, d in per_class.items() if abs(d) > allowed[c] + slack]
    if outside:
        worst = max(outside, key=lambda c: abs(per_class[c]) - allowed[c])
        failures.append(f"per-class accuracy differs from eager's by more than allowed for {name} in {len(outside)} "
                        f"class(es); worst {worst}: {100 * result.per_class[worst]:.1f} % vs "
                        f"{100 * eager.per_class[worst]:.1f} % ({per_class[worst]:+.1f} pp, {allowed[worst]:g} pp "
                        "allowed)")
    return failures


def compare(name: str, file: str, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray,
            classes: list[str], atol: float, rtol: float, hash_ok: bool | None = None,
            accuracy: AccuracyTolerance | None = None, fp32_noise: float | None = None) -> FormatResult:
    """Score `logits` against the eager `reference` logits and the true `labels` (numpy, same order).

    By default the logits must lie within `LogitTolerance(atol, rtol, fp32_noise)` and the predictions agree
    with eager's on `MIN_FP32_AGREEMENT` of the images; with `accuracy` (reduced-precision formats) the overall
    and per-class accuracy must lie within its percentage points of eager's instead.
    """
    tolerance = LogitTolerance(atol, rtol, fp32_noise)
    atol = tolerance.effective_atol
    k = len(classes)
    diff = np.abs(logits.astype(np.float64) - reference)
    excess = diff - (atol + rtol * np.abs(reference))  # > 0: outside tolerance
    per_sample = excess.max(axis=1)
    worst = int(per_sample.argmax())
    pred, ref_pred = logits.argmax(axis=1), reference.argmax(axis=1)
    top2 = np.sort(reference, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    confident_flip = (pred != ref_pred) & (margin > atol + rtol * np.abs(top2[:, 1]))

    failures = []
    if hash_ok is False:
        failures.append("sha256 differs from manifest.json: the file changed after export")
    outside = int((per_sample > 0).sum()) if accuracy is None else 0
    if outside:
        failures.append(f"max |Δlogit| {diff.max():.3g} exceeds the tolerance on {outside} of {len(labels)} images; "
                        f"worst sample {worst} (|Δlogit| {diff[worst].max():.3g}, true {classes[labels[worst]]}): eager predicts "
                        f"{classes[ref_pred[worst]]}, {name} {classes[pred[worst]]}")
    if confident_flip.any() and accuracy is None:
        flips = np.flatnonzero(confident_flip)
        i = int(flips[margin[flips].argmax()])
        failures.append(f"{len(flips)} prediction(s) differ from eager where eager's top-2 margin exceeds the "
                        f"tolerance; worst sample {i} (margin {margin[i]:.3g}): eager predicts "
                        f"{classes[ref_pred[i]]}, {name} {classes[pred[i]]}")

    def scores(predictions: np.ndarray) -> EvalResult:
        return EvalResult(torch.bincount(torch.from_numpy(labels * k + predictions), minlength=k * k).view(k, k),
                          classes)

    same = pred == ref_pred
    # At most 0.1 % of the predictions may differ, and never fewer than one (the finest step a split can measure,
    # as for accuracy): on 5,000 images 5 near-tie flips, on 100 images one.
    allowed_flips = max(1, int((1 - MIN_FP32_AGREEMENT) * len(labels) + 1e-9))
    if accuracy is None and int((~same).sum()) > allowed_flips:
        failures.append(f"predictions agree with eager's on {100 * same.mean():.2f} % of the images "
                        f"({int((~same).sum())} differ, {allowed_flips} allowed): an fp32 format must agree on "
                        f"{100 * MIN_FP32_AGREEMENT:g} %")
    agreement = {c: float(same[labels == i].mean()) if (labels == i).any() else float("nan")
                 for i, c in enumerate(classes)}
    own = scores(pred)
    result = FormatResult(name, file, float(diff.max()), float(same.mean()), own.accuracy, own.per_class, worst,
                          hash_ok, failures, agreement,
                          (accuracy or tolerance).describe())
    if accuracy is not None:
        result.failures += _accuracy_failures(name, result, scores(ref_pred), accuracy)
    return result


def run_backend(backend: Backend, images: torch.Tensor, batch_size: int = _BATCH, tta: str = "none") -> np.ndarray:
    """Logits for uint8 N×3×32×32 `images`, preprocessed with the backend's own metadata, averaged over the views
    of `tta` (the same views `toolkit evaluate --tta` classifies)."""
    batch_size = min(batch_size, backend.max_batch or batch_size)
    return np.concatenate([tta_logits(backend.predict_logits, backend.metadata.normalize(images[i:i + batch_size]),
                                      tta) for i in range(0, len(images), batch_size)])


def load_verification_split(manifest: Manifest, data_overrides: dict[str, Any],
                            split: str) -> tuple[Split, str | None]:
    """The split of the data the exported run was trained on (as recorded in the manifest), with overrides."""
    recorded = manifest.source.data or {}
    if not recorded.get("data") and "data" not in data_overrides:
        raise DataError(f"{MANIFEST} records no data config for the source run; pass --data (and --data-dir)")
    known = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = DataConfig(**{k: v for k, v in {**recorded, **data_overrides}.items() if k in known})
    return load_held_out(cfg, manifest.class_names, split)


def verify_export(export_dir: Path, data_overrides: dict[str, Any] | None = None, split: str = "test",
                  atol: float | None = None, rtol: float | None = None, threads: int | None = None,
                  provider: str = DEFAULT_PROVIDER, model: str | None = None, tta: str = "none") -> VerifyReport:
    """Run the eager model and every artifact listed in the export's manifest over a split; compare.

    `atol`/`rtol` (`--atol/--rtol`): a fixed fp32 logit bound; when neither is given, the bound scales with the
    model's measured fp32 noise (`toolkit.artifacts.formats`). `provider` chooses where ONNX Runtime runs the
    .onnx files; torch formats run on the CPU. With `tta`, every format, eager included, classifies each image from
    the same test-time-augmentation views.
    """
    scaled = atol is None and rtol is None
    atol, rtol = DEFAULT_ATOL if atol is None else atol, DEFAULT_RTOL if rtol is None else rtol
    if atol < 0 or rtol < 0:
        raise ConfigError(f"--atol/--rtol: must be >= 0, got {atol:g} and {rtol:g}")
    export_dir = Path(export_dir)
    manifest = Manifest.read(export_dir)
    held, note = load_verification_split(manifest, data_overrides or {}, split)
    classes = manifest.class_names
    labels = held.labels.numpy()

    # Eager first: it is the reference every other row is compared with. Unknown formats are not loaded.
    listed = sorted((n for n, e in manifest.files.items() if e.format in formats.EXPORTABLE),
                    key=lambda n: formats.order(manifest.files[n].format))
    reference: np.ndarray | None = None
    noise: float | None = None
    results = []
    for name in [formats.EAGER.file, *listed]:
        entry = manifest.files.get(name)
        has_hash = entry is not None and entry.sha256 is not None
        # The hash first: a .ts or .pt2 file is a program, and one that changed after export is not run.
        problem = hash_mismatch(export_dir / name) if has_hash else None
        hash_ok = problem is None if has_hash else None
        fmt = formats.get(entry.format) if entry is not None else formats.EAGER
        if problem and fmt.program:
            results.append(_not_loaded(entry.format, name, classes, problem))
            continue
        # A program's hash is checked again on the very bytes loaded; a changed data file is run all the same.
        backend = load_backend(export_dir / name, threads=threads,
                               provider=provider if fmt.runtime == "onnxruntime" else "cpu", check_hash=fmt.program,
                               model=model)
        logits = run_backend(backend, held.images, tta=tta)
        if reference is None:
            reference = logits.astype(np.float64)
            noise = fp32_noise(backend, held.images[:NOISE_IMAGES], tta) if scaled else None
        accuracy = fmt.tolerance if fmt.by_accuracy else None
        result = compare(backend.name, name, logits, reference, labels, classes, atol, rtol, hash_ok, accuracy,
                         noise)
        result.provider = backend.provider
        if backend.classes != classes:
            result.failures.append(f"class names in the file {backend.classes} differ from manifest.json's {classes}")
        results.append(result)
    return VerifyReport(export_dir, held.name, len(held), classes, atol, rtol, results, note, provider, tta, noise)


def fp32_noise(eager: Backend, images: torch.Tensor, tta: str = "none") -> float:
    """The eager model's own fp32 rounding error: max |its fp32 logits − the same model's float64 logits| for uint8
    `images`, both from the same fp32 normalized input and the same `tta` views."""
    if not isinstance(eager, TorchBackend):
        raise VerificationError(f"{eager.path}: the eager reference must be a torch model, got {eager.name}")
    exact = copy.deepcopy(eager.module).double()
    normalized = eager.metadata.normalize(images)
    with torch.inference_mode():
        logits64 = tta_logits(lambda x: exact(torch.from_numpy(np.ascontiguousarray(x)).double()).numpy(),
                              normalized, tta)
    logits = tta_logits(eager.predict_logits, normalized, tta)
    return float(np.abs(logits.astype(np.float64) - logits64).max())


def _not_loaded(row: str, file: str, classes: list[str], problem: str) -> FormatResult:
    nan = float("nan")
    return FormatResult(row, file, nan, nan, nan, {c: nan for c in classes}, -1, False,
                        [f"sha256 differs from manifest.json: not loaded, since a changed {row} file is a program "
                         f"of unknown origin ({problem})"])


def verify_and_report(export_dir: Path, data_overrides: dict[str, Any] | None = None, split: str = "test",
                      atol: float | None = None, rtol: float | None = None, json_out: Path | None = None,
                      threads: int | None = None, log: Callable[[str], None] = print,
                      provider: str = DEFAULT_PROVIDER, model: str | None = None, tta: str = "none") -> VerifyReport:
    """`toolkit verify`: print the table, write the JSON, then raise `VerificationError` if a format failed."""
    export_dir = Path(export_dir)
    if json_out is not None and json_out.resolve().parent == export_dir.resolve() \
            and json_out.name in {MANIFEST, *(f.file for f in formats.FORMATS)}:
        raise ConfigError(f"--json-out {json_out}: would overwrite an artifact of the export being verified")
    report = verify_export(export_dir, data_overrides, split, atol, rtol, threads, provider, model, tta)
    log(report.format())
    if json_out is not None:
        report.write(json_out)
    if not report.passed:
        failed = [r for r in report.results if not r.passed]
        raise VerificationError(f"{', '.join(r.name for r in failed)} differ(s) from the eager model "
                                f"(table above); {failed[0].name}: {'; '.join(failed[0].failures)}")
    return report
