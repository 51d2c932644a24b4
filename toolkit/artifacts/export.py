"""Export a trained run to deployable files, fp32 and eval mode, with a manifest.

exports/<name>/
  model.ts           TorchScript (`torch.jit.script`; traced only if scripting fails)
  model.onnx         ONNX, one self-contained file, input `images` N×3×32×32 float32, output `logits`,
                     dynamic batch; the torch.export-based (dynamo) exporter, the TorchScript-based one
                     only as a recorded fallback
  model.fp16.onnx    model.onnx with fp16 weights and compute; fp32 `images` in, fp32 `logits` out
  model.int8.onnx    model.onnx quantized statically to int8 (QDQ, per-channel weights), calibrated
                     on `CALIBRATION_IMAGES` training images drawn with `CALIBRATION_SEED`, in
                     batches of `CALIBRATION_BATCH`
  model.pt2          torch.export ExportedProgram, dynamic batch
  model.safetensors  the eager fp32 weights, so the folder is self-contained for `toolkit verify`
  manifest.json      written last (toolkit.artifacts.manifest)

Class names and normalization are also inside each artifact (`toolkit.artifacts.metadata`),
so a client holding one file and its runtime can preprocess and label correctly.

The folder is written under a temporary name and renamed into place at the end, so an interrupted
export leaves no half-written folder or manifest behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import io
import json
import logging
import os
import platform
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata as distributions
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
import torch
from safetensors.torch import load_file
from torch import nn

from toolkit import __version__
from toolkit.artifacts import formats
from toolkit.artifacts.backends import ONNXRUNTIME_INSTALL
from toolkit.artifacts.manifest import MANIFEST, FileEntry, Manifest, SourceInfo
from toolkit.artifacts.metadata import INPUT_LAYOUT, INPUT_NAME, METADATA_FILE, OUTPUT_NAME, ArtifactMetadata
from toolkit.artifacts.onnx_passes import fold_batch_norms
from toolkit.core.errors import ArtifactError, ConfigError, DataError, ToolkitError, first_line
from toolkit.core.files import sha256_file
from toolkit.core.images import CHANNELS, HEIGHT, MEAN, STD, WIDTH
from toolkit.training.checkpoint import verify_checkpoint
from toolkit.training.data import load_splits
from toolkit.training.runs import CHECKPOINTS, MODEL, RunRecord, load_model, rebuild_model, save_model

ONNX_OPSET = 18
_EXAMPLE_BATCH = 2  # torch.export specializes sizes 0 and 1, so the example batch must be larger
# int8 calibration: this many images of the run's training split (never its held-out images), drawn
# with this seed, so that an export is reproducible. 512 gave the same accuracy as 1,024 and 256
# (within 0.2 pp on 5,000 held-out images); MinMax ranges, since Entropy and Percentile did no better.
CALIBRATION_IMAGES = 512
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 64  # images per calibration batch; every batch has this size (fewer images: one batch of all)
# The operators quantized to int8: those ONNX Runtime runs as int8 kernels (Conv, Gemm, MatMul) and those that
# only move or select values, or add them (their int8 form loses nothing beyond the ranges' rounding). Mul is
# left out: quantizing the product of two activations (GELU exported as x·Φ(x), Φ by Erf) cost speednet 21 pp
# of prediction agreement with eager on 5,000 real held-out images (77 % instead of 98 %, its one-tap
# convolutions kept fp32 in both); in fp32 it is one cheap elementwise op between the int8 convolutions.
INT8_OPERATORS = ("Conv", "Gemm", "MatMul", "Add", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool",
                  "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Pad", "Resize")
# A Conv/Gemm whose per-channel int8 weights are further than this from its fp32 weights (relative Frobenius
# error) stays fp32. The error is about (channel max / rms) / 440: ordinary filters quantize to 0.4-0.8 %
# (a Gaussian 3×3×64 filter 0.77 %; ResNet-18 after 60 steps on CIFAR-10 0.40-0.81 %), filters that are one
# large tap plus small learned weights (speednet's identity-initialized convolutions, max/rms 24-48) to
# 1.6-6.9 % after 60 steps on CIFAR-10. Quantizing those cost speednet 33 pp of prediction agreement with
# eager on 5,000 real held-out images (65 % instead of 98 %, Mul kept fp32 in both). 1 % sits between the
# two groups.
INT8_MAX_WEIGHT_ERROR = 0.01
_SCRATCH_ONNX = ".model.fp32.onnx"  # fp32 ONNX for derived formats when model.onnx itself is not exported


@dataclass
class Source:
    """The weights to export and where they came from."""

    run_dir: Path
    weights: Path
    checkpoint: str | None
    model: nn.Module
    model_name: str
    classes: list[str]
    record: RunRecord


def load_source(run_dir: Path, checkpoint: str | Path | None = None, model: str | None = None) -> Source:
    """The run's final weights, or those of one of its checkpoints, as an fp32 eval-mode model; `model` is the
    model the user names (`--model`), needed for a user's model (`toolkit.training.runs.rebuild_model`)."""
    record = RunRecord.read(run_dir)
    if checkpoint is None:
        trained = load_model(run_dir / MODEL, model=model)
        return Source(run_dir, run_dir / MODEL, None, trained.model, trained.model_name, trained.classes, record)
    folder = Path(checkpoint)
    if not folder.exists() and (run_dir / CHECKPOINTS / folder).exists():
        folder = run_dir / CHECKPOINTS / folder  # `--checkpoint step_12` names one of the run's own
    verify_checkpoint(folder)
    name, classes = record.config.model, record.info.data.classes
    module = rebuild_model(name, classes, load_file(folder / MODEL), f"checkpoint {folder}", model)
    return Source(run_dir, folder / MODEL, folder.name, module, name, classes, record)


def _example(num: int = _EXAMPLE_BATCH) -> torch.Tensor:
    return torch.zeros(num, CHANNELS, HEIGHT, WIDTH)


def _batch_dim() -> dict[int, Any]:
    return {0: torch.export.Dim("batch", min=1)}


def write_torchscript(model: nn.Module, path: Path, metadata: ArtifactMetadata) -> dict[str, Any]:
    """Script the model (trace it if scripting fails) and save it with `metadata.json` inside."""
    info: dict[str, Any] = {"method": "script"}
    try:
        module = torch.jit.script(model)
    except Exception as exc:  # scripting rejects many Python constructs; tracing is the documented fallback
        info = {"method": "trace", "note": f"torch.jit.script failed ({first_line(exc)}); traced instead"}
        module = torch.jit.trace(model, _example())
    module.save(str(path), _extra_files={METADATA_FILE: json.dumps(metadata.to_strings())})
    return info


def write_pt2(model: nn.Module, path: Path, metadata: ArtifactMetadata) -> dict[str, Any]:
    """torch.export with a dynamic batch dimension, saved with `metadata.json` inside."""
    program = torch.export.export(model, (_example(),), dynamic_shapes=(_batch_dim(),))
    torch.export.save(program, path, extra_files={METADATA_FILE: json.dumps(metadata.to_strings())})
    return {"method": "torch.export.export", "dynamic_batch": True}


def _save_onnx(proto: onnx.ModelProto, path: Path, metadata: ArtifactMetadata) -> int:
    """Save an ONNX model as one file with the toolkit metadata, check it, return its opset.

    External data is off, so the weights are inline; `onnx.checker.check_model(full_check=True)` also
    runs shape inference.
    """
    onnx.helper.set_model_props(proto, metadata.to_strings())
    onnx.save_model(proto, str(path), save_as_external_data=False)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ArtifactError(f"{path}: exported ONNX model fails onnx.checker: {first_line(exc)}") from None
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def write_onnx(model: nn.Module, path: Path, metadata: ArtifactMetadata) -> dict[str, Any]:
    """ONNX via the torch.export-based exporter (TorchScript-based only if it fails), weights inline, with the
    BatchNorms folded into the convolutions before them (`onnx_passes.fold_batch_norms`)."""
    info: dict[str, Any] = {"exporter": "dynamo"}
    try:
        program = torch.onnx.export(model, (_example(),), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamo=True, dynamic_shapes=(_batch_dim(),), opset_version=ONNX_OPSET,
                                    verbose=False)
        proto = program.model_proto
    except Exception as exc:  # the exporter can fail in many ways; the legacy one is the documented fallback
        info = {"exporter": "torchscript", "note": f"dynamo ONNX exporter failed ({first_line(exc)}); "
                                                   "used the deprecated TorchScript-based exporter"}
        buffer = io.BytesIO()
        torch.onnx.export(model, (_example(),), buffer, dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        proto = onnx.load_from_string(buffer.getvalue())
    folded = fold_batch_norms(proto)
    if folded:
        info["batch_norms_folded"] = folded
    info["opset"] = _save_onnx(proto, path, metadata)
    return info


@contextlib.contextmanager
def _onnxruntime_tools() -> Iterator[None]:
    """Run ONNX Runtime's converters quietly: their advice goes to the root logger and stdout. A missing
    onnxruntime is one line saying how to install it."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except ModuleNotFoundError as exc:
        if exc.name != "onnxruntime":
            raise
        raise ConfigError(f"fp16 and int8 ONNX files are made with onnxruntime, which is not installed: "
                          f"{ONNXRUNTIME_INSTALL}") from None
    finally:
        logging.disable(previous)


def _topologically_sorted(graph: onnx.GraphProto) -> None:
    """Order the nodes so that each comes after the producers of its inputs (the fp16 converter appends
    its input casts at the end, which ONNX Runtime accepts but the ONNX checker rightly refuses)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ArtifactError(f"graph {graph.name!r}: nodes form a cycle or read undefined values")
        for node in ready:
            available.update(node.output)
        ordered += ready
        pending = [n for n in pending if all(n is not r for r in ready)]
    graph.ClearField("node")
    graph.node.extend(ordered)


def write_onnx_fp16(onnx_fp32: Path, path: Path, metadata: ArtifactMetadata) -> dict[str, Any]:
    """The fp32 ONNX model with fp16 weights and compute, fp32 `images` in and `logits` out (casts at the
    boundary), by ONNX Runtime's converter."""
    with _onnxruntime_tools():
        from onnxruntime.transformers.float16 import convert_float_to_float16  # reason: export only, imports onnx helpers

        proto = convert_float_to_float16(onnx.load(str(onnx_fp32)), keep_io_types=True)
    _topologically_sorted(proto.graph)
    return {"derived_from": formats.ONNX.file, "converter": "onnxruntime.transformers.float16, fp32 input/output",
            "opset": _save_onnx(proto, path, metadata)}


def int8_weight_error(weight: np.ndarray) -> float:
    """Relative error ||W - Q(W)|| / ||W|| (Frobenius) of symmetric int8 per-output-channel quantization of a
    Conv or Gemm weight (output channels first), the quantizer's own scheme (scale = channel max / 127)."""
    rows = weight.reshape(weight.shape[0], -1).astype(np.float64)
    scale = np.abs(rows).max(axis=1, keepdims=True) / 127
    scale[scale == 0] = 1.0
    quantized = np.clip(np.round(rows / scale), -127, 127) * scale
    return float(np.linalg.norm(quantized - rows) / max(np.linalg.norm(rows), np.finfo(np.float64).tiny))


def _kept_in_fp32(model: onnx.ModelProto) -> dict[str, float]:
    """The Conv/Gemm nodes whose int8 weights would be further than `INT8_MAX_WEIGHT_ERROR` from their fp32
    weights, by name, with that error."""
    weights = {t.name: t for t in model.graph.initializer}
    errors = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and node.name and len(node.input) > 1 and node.input[1] in weights:
            weight = numpy_helper.to_array(weights[node.input[1]])
            if node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute):
                weight = weight.T  # Gemm's B is (in, out) unless transB: output channels first
            error = int8_weight_error(weight)
            if error > INT8_MAX_WEIGHT_ERROR:
                errors[node.name] = round(error, 4)
    return errors


def _calibration_batches(count: int) -> tuple[int, int]:
    """(batch size, images used): every calibration batch has the same size, so the images past the last full
    batch are left out. ONNX Runtime's calibrator collects statistics batch by batch; with one batch size every
    image weighs the same in them whichever way they are combined (a short last batch would count its few
    images like a full batch in per-batch averages)."""
    batch = min(CALIBRATION_BATCH, count)
    return batch, count - count % batch


def write_onnx_int8(onnx_fp32: Path, path: Path, metadata: ArtifactMetadata, calibration: np.ndarray,
                    calibration_info: dict[str, Any]) -> dict[str, Any]:
    """Static int8 quantization of the fp32 ONNX model (BatchNorms already folded into its convolutions) in QDQ
    form (QuantizeLinear/DequantizeLinear pairs around each quantized operator, which ONNX Runtime's CPU provider
    fuses into int8 kernels): symmetric int8 weights per output channel, uint8 activations with a zero point
    (U8S8), MinMax ranges from `calibration` (normalized N×3×32×32 float32 images) in batches of one size.

    U8S8, not S8S8: x86 int8 dot products (AVX-512 VNNI `vpdpbusd`, AVX2 `vpmaddubsw`) multiply unsigned by
    signed bytes, and ONNX Runtime fuses uint8 QDQ convolutions into its fast kernels. Measured on ResNet-18
    (batch 64, one thread, 2-core Zen 4 with VNNI): S8S8 QDQ ran at fp32's speed (25 vs 26 images/s), U8S8 QDQ
    at 4× (104). An asymmetric uint8 range also spends all 256 levels on a ReLU's non-negative output. The
    cost: TensorRT reads only symmetric int8 QDQ, so this file is for ONNX Runtime.

    Two kinds of operator stay fp32 (see `INT8_OPERATORS` and `INT8_MAX_WEIGHT_ERROR`): products of two
    activations (Mul), and convolutions whose weights int8 cannot represent closely.
    """
    if len(calibration) == 0:
        raise DataError("onnx-int8 calibration needs at least one training image")
    batch, used = _calibration_batches(len(calibration))
    model = onnx.load(str(onnx_fp32))
    excluded = _kept_in_fp32(model)
    with _onnxruntime_tools():
        from onnxruntime.quantization import (  # reason: export only; imports onnx and the quantizer
            CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static)

        class Batches(CalibrationDataReader):
            def __init__(self) -> None:
                self._batches = iter(calibration[i:i + batch] for i in range(0, used, batch))

            def get_next(self) -> dict[str, np.ndarray] | None:
                batch_images = next(self._batches, None)
                return None if batch_images is None else {INPUT_NAME: batch_images}

        quantize_static(str(onnx_fp32), str(path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(INT8_OPERATORS),
                        nodes_to_exclude=list(excluded),
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return {"derived_from": formats.ONNX.file, "quantization": "static, QDQ", "weights": "int8 symmetric, per channel",
            "activations": "uint8 with zero point",
            "calibration": {**calibration_info, "images": used, "batch": batch, "method": "MinMax"},
            "quantized_operators": list(INT8_OPERATORS), "kept_fp32_by_weight_error": excluded,
            "opset": _save_onnx(onnx.load(str(path)), path, metadata)}


@dataclass
class ExportJob:
    """What the writers work from: the source model and its metadata, plus what the derived ONNX formats
    need (the fp32 ONNX file, calibration images), made on first use in the temporary export folder."""

    source: Source
    metadata: ArtifactMetadata
    folder: Path

    def onnx_fp32(self) -> Path:
        """model.onnx of this export (written first: formats are written in registry order), else a scratch
        copy that `export_run` removes before the manifest is written."""
        for name in (formats.ONNX.file, _SCRATCH_ONNX):
            if (self.folder / name).is_file():
                return self.folder / name
        write_onnx(self.source.model, self.folder / _SCRATCH_ONNX, self.metadata)
        return self.folder / _SCRATCH_ONNX

    def calibration(self) -> tuple[np.ndarray, dict[str, Any]]:
        """`CALIBRATION_IMAGES` images of the run's training split, normalized, and where they came from."""
        data = self.source.record.config.data
        try:
            train = load_splits(data).train
        except DataError as exc:
            raise DataError(f"onnx-int8 calibration needs the run's training images: {exc} (or export without "
                            f"it: --formats {','.join(n for n in formats.EXPORTABLE if n != 'onnx-int8')})") from None
        count = min(CALIBRATION_IMAGES, len(train))
        index = np.sort(np.random.default_rng(CALIBRATION_SEED).choice(len(train), count, replace=False))
        images = self.metadata.normalize(train.images.numpy()[index])
        return images, {"split": "train", "images": count, "seed": CALIBRATION_SEED,
                        "data": data.data if data.data == "synthetic" else f"{data.data}:{data.data_dir}"}


def _write_int8(job: ExportJob, path: Path) -> dict[str, Any]:
    images, info = job.calibration()
    return write_onnx_int8(job.onnx_fp32(), path, job.metadata, images, info)


# One writer per exportable format of the registry: (job, destination) -> details for the manifest.
WRITERS: dict[str, Callable[[ExportJob, Path], dict[str, Any]]] = {
    "torchscript": lambda job, path: write_torchscript(job.source.model, path, job.metadata),
    "onnx": lambda job, path: write_onnx(job.source.model, path, job.metadata),
    "onnx-fp16": lambda job, path: write_onnx_fp16(job.onnx_fp32(), path, job.metadata),
    "onnx-int8": _write_int8,
    "pt2": lambda job, path: write_pt2(job.source.model, path, job.metadata),
}


@contextlib.contextmanager
def _collect_warnings(lines: list[str]) -> Iterator[None]:
    """Hold back the warnings an export call emits (TorchScript emits one FutureWarning per scripted
    function) and keep one line per distinct message."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for message in dict.fromkeys(f"{w.category.__name__}: {str(w.message).strip().splitlines()[0]}" for w in caught):
        lines.append(message)


def default_export_dir(run_dir: Path) -> Path:
    """Where `toolkit export` and `toolkit run` put a run's export: exports/<run folder name>."""
    return Path("exports") / Path(run_dir).resolve().name


def export_run(run_dir: Path, out: Path | None = None, names: Sequence[str] = formats.EXPORTABLE,
               checkpoint: str | Path | None = None, overwrite: bool = False,
               log: Callable[[str], None] = print, model: str | None = None) -> Path:
    """`toolkit export`: write the chosen formats, the eager weights and the manifest; return the folder."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else default_export_dir(run_dir)
    _check_destination(out, overwrite)
    source = load_source(run_dir, checkpoint, model)
    metadata = ArtifactMetadata(source.classes, list(MEAN), list(STD), model=source.model_name)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    job = ExportJob(source, metadata, tmp)
    try:
        files: dict[str, FileEntry] = {}
        notes: list[str] = []
        for name in sorted(names, key=formats.order):  # registry order: model.onnx before what derives from it
            fmt = formats.get(name)
            held_back: list[str] = []
            with _collect_warnings(held_back):
                try:
                    details = WRITERS[name](job, tmp / fmt.file)
                except ToolkitError:
                    raise
                except Exception as exc:  # noqa: BLE001 - an exporter that cannot take this model is said in one line
                    raise ArtifactError(f"{name}: cannot be made from model {source.model_name!r} "
                                        f"({first_line(exc)}); leave it out with --formats") from None
            if "note" in details:
                held_back.append(details.pop("note"))
            for line in held_back:
                log(f"export: note: {name}: {line}")
                notes.append(f"{name}: {line}")
            files[fmt.file] = FileEntry(name, details={"precision": fmt.precision, **details})
        (tmp / _SCRATCH_ONNX).unlink(missing_ok=True)
        save_model(source.model, tmp / formats.EAGER.file, source.model_name, source.classes)
        files[formats.EAGER.file] = FileEntry(formats.EAGER.name, details={"precision": formats.EAGER.precision})
        for file, entry in files.items():
            entry.size, entry.sha256 = (tmp / file).stat().st_size, sha256_file(tmp / file)
            log(f"export: wrote {out / file} ({entry.format}, {entry.size / 1024:.0f} KiB)")
        _manifest(source, metadata, files, notes).write(tmp)  # last: a folder with a manifest is complete
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export folder: {out}")
    return out


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out}: already exists; pass --overwrite to replace it")
    # --overwrite replaces an earlier export, never an arbitrary folder (think `--out .`).
    if out.exists() and not (out.is_dir() and ((out / MANIFEST).is_file() or not any(out.iterdir()))):
        raise ConfigError(f"--out {out}: exists and is not an export folder (no {MANIFEST}); refusing to replace it")


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`; an existing `out` is moved aside first and deleted only afterwards."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _manifest(source: Source, metadata: ArtifactMetadata, files: dict[str, FileEntry], notes: list[str]) -> Manifest:
    onnx_entry = files.get(formats.get("onnx").file)
    return Manifest(
        toolkit_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        source=SourceInfo(
            run=str(source.run_dir.resolve()),
            weights=str(source.weights.resolve()),
            checkpoint=source.checkpoint,
            sha256=sha256_file(source.weights),
            model=source.model_name,
            trained_mixed_precision=source.record.info.mixed_precision,
            # The run's data config, so `toolkit verify` can reload the same split without the run folder.
            data=dataclasses.asdict(source.record.config.data)),
        precision="fp32",
        input={"name": INPUT_NAME, "shape": ["N", CHANNELS, HEIGHT, WIDTH], "dtype": "float32",
               "layout": INPUT_LAYOUT,
               "preprocessing": "RGB, resized to 32×32, pixels scaled to [0, 1], then (x - mean) / std per channel"},
        output={"name": OUTPUT_NAME, "shape": ["N", len(source.classes)], "dtype": "float32"},
        class_names=metadata.class_names,
        mean=metadata.mean,
        std=metadata.std,
        opset=onnx_entry.details.get("opset") if onnx_entry else None,
        files=files,
        versions={"toolkit": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                  "onnxruntime": _onnxruntime_version(), "python": platform.python_version()},
        notes=notes)


def _onnxruntime_version() -> str:
    """The installed ONNX Runtime build: `1.32.0`, or `1.31.1 (onnxruntime-gpu)`."""
    for name, label in (("onnxruntime", ""), ("onnxruntime-gpu", " (onnxruntime-gpu)")):
        with contextlib.suppress(distributions.PackageNotFoundError):
            return distributions.version(name) + label
    return "not installed"
