"""Export a trained run to deployable files, fp32 and eval mode, with a manifest.

exports/<name>/
  model.ts           TorchScript (`torch.jit.script`; traced only if scripting fails)
  model.onnx         ONNX, one self-contained file, input `images` N×3×32×32 float32, output `logits`,
                     dynamic batch; the torch.export-based (dynamo) exporter, the TorchScript-based one
                     only as a recorded fallback
  model.pt2          torch.export ExportedProgram, dynamic batch
  model.safetensors  the eager fp32 weights, so the folder is self-contained for `toolkit verify`
  manifest.json      written last: every file's format, size and sha256, the input spec, class names,
                     normalization, the source run, its weights' hash and data config, versions, opset

Class names and normalization are also inside each artifact (`toolkit.backends.ArtifactMetadata`),
so a client holding one file and its runtime can preprocess and label correctly.

The folder is written under a temporary name and renamed into place at the end, so an interrupted
export leaves no half-written folder or manifest behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import platform
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from toolkit import __version__
from toolkit.backends import (CHANNELS, HEIGHT, INPUT_LAYOUT, INPUT_NAME, METADATA_FILE, OUTPUT_NAME, WIDTH,
                              ArtifactMetadata)
from toolkit.checkpoint import sha256_file, verify_checkpoint
from toolkit.errors import ArtifactError, CheckpointError, ConfigError, first_line

FILES = {"torchscript": "model.ts", "onnx": "model.onnx", "pt2": "model.pt2"}
FORMATS = tuple(FILES)
EAGER_FILE = "model.safetensors"
MANIFEST = "manifest.json"
ONNX_OPSET = 18
_EXAMPLE_BATCH = 2  # torch.export specializes sizes 0 and 1, so the example batch must be larger


@dataclass
class Source:
    """The weights to export and where they came from."""

    run_dir: Path
    weights: Path
    checkpoint: str | None
    model: nn.Module
    model_name: str
    classes: list[str]
    config: dict[str, Any]


def parse_formats(text: str) -> list[str]:
    """`torchscript,onnx,pt2` -> a list of known format names (order kept, duplicates dropped)."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in FILES]
    if unknown or not names:
        raise ConfigError(f"--formats: unknown format(s) {unknown or [text]}; choose from {','.join(FORMATS)}")
    return names


def load_source(run_dir: Path, checkpoint: str | Path | None = None) -> Source:
    """The run's final weights, or those of one of its checkpoints, as an fp32 eval-mode model."""
    from toolkit.runs import CHECKPOINTS, MODEL, load_model, read_config, rebuild_model

    config = read_config(run_dir)
    if checkpoint is None:
        trained = load_model(run_dir / MODEL)
        return Source(run_dir, run_dir / MODEL, None, trained.model, trained.model_name, trained.classes, config)
    folder = Path(checkpoint)
    if not folder.exists() and (run_dir / CHECKPOINTS / folder).exists():
        folder = run_dir / CHECKPOINTS / folder  # `--checkpoint step_12` names one of the run's own
    verify_checkpoint(folder)
    try:
        name, classes = config["model"], list(config["runtime"]["data"]["classes"])
    except (KeyError, TypeError):
        raise CheckpointError(f"{run_dir}/config.json: no model name or class names to rebuild the checkpoint's model") from None
    model = rebuild_model(name, classes, load_file(folder / "model.safetensors"), f"checkpoint {folder}")
    return Source(run_dir, folder / "model.safetensors", folder.name, model, name, classes, config)


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


def write_onnx(model: nn.Module, path: Path, metadata: ArtifactMetadata) -> dict[str, Any]:
    """ONNX via the torch.export-based exporter (TorchScript-based only if it fails), weights inline.

    The model proto is saved by `onnx.save_model` with external data off, so the result is one file,
    then checked with `onnx.checker.check_model(full_check=True)` (which also runs shape inference).
    """
    import onnx

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
    onnx.helper.set_model_props(proto, metadata.to_strings())
    onnx.save_model(proto, str(path), save_as_external_data=False)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ArtifactError(f"{path}: exported ONNX model fails onnx.checker: {first_line(exc)}") from None
    info["opset"] = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return info


WRITERS: dict[str, Callable[[nn.Module, Path, ArtifactMetadata], dict[str, Any]]] = {
    "torchscript": write_torchscript,
    "onnx": write_onnx,
    "pt2": write_pt2,
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


def export_run(run_dir: Path, out: Path | None = None, formats: Sequence[str] = FORMATS,
               checkpoint: str | Path | None = None, overwrite: bool = False,
               log: Callable[[str], None] = print) -> Path:
    """`toolkit export`: write the chosen formats, the eager weights and the manifest; return the folder."""
    from toolkit.data import MEAN, STD
    from toolkit.runs import save_model

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else default_export_dir(run_dir)
    _check_destination(out, overwrite)
    source = load_source(run_dir, checkpoint)
    metadata = ArtifactMetadata(source.classes, list(MEAN), list(STD))

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files: dict[str, dict[str, Any]] = {}
        notes: list[str] = []
        for fmt in formats:
            held_back: list[str] = []
            with _collect_warnings(held_back):
                info = WRITERS[fmt](source.model, tmp / FILES[fmt], metadata)
            if "note" in info:
                held_back.append(info.pop("note"))
            for line in held_back:
                log(f"export: note: {fmt}: {line}")
                notes.append(f"{fmt}: {line}")
            files[FILES[fmt]] = {"format": fmt, **info}
        save_model(source.model, tmp / EAGER_FILE, source.model_name, source.classes)
        files[EAGER_FILE] = {"format": "eager"}
        for name, entry in files.items():
            entry.update(size=(tmp / name).stat().st_size, sha256=sha256_file(tmp / name))
            log(f"export: wrote {out / name} ({entry['format']}, {entry['size'] / 1024:.0f} KiB)")
        manifest = _manifest(source, metadata, files, notes)
        _write_json_atomic(tmp / MANIFEST, manifest)  # last: a folder with a manifest is complete
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


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _manifest(source: Source, metadata: ArtifactMetadata, files: dict[str, dict[str, Any]],
              notes: list[str]) -> dict[str, Any]:
    import onnx
    import onnxruntime

    runtime = source.config.get("runtime", {})
    return {
        "toolkit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "run": str(source.run_dir.resolve()),
            "weights": str(source.weights.resolve()),
            "checkpoint": source.checkpoint,
            "sha256": sha256_file(source.weights),
            "model": source.model_name,
            "trained_mixed_precision": runtime.get("mixed_precision", source.config.get("mixed_precision")),
            # The run's data config, so `toolkit verify` can reload the same split without the run folder.
            "data": source.config.get("data", {}),
        },
        "precision": "fp32",
        "input": {"name": INPUT_NAME, "shape": ["N", CHANNELS, HEIGHT, WIDTH], "dtype": "float32",
                  "layout": INPUT_LAYOUT,
                  "preprocessing": "RGB, resized to 32×32, pixels scaled to [0, 1], then (x - mean) / std per channel"},
        "output": {"name": OUTPUT_NAME, "shape": ["N", len(source.classes)], "dtype": "float32"},
        "class_names": metadata.class_names,
        "mean": metadata.mean,
        "std": metadata.std,
        "opset": files.get(FILES["onnx"], {}).get("opset"),
        "files": files,
        "versions": {"toolkit": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "notes": notes,
    }


def read_manifest(export_dir: Path) -> dict[str, Any]:
    """manifest.json of an export folder, checked: every file it lists is a plain file name directly in
    the folder (no absolute path, no `..`, no separator, no symbolic link leading elsewhere), with the
    suffix of its format and a well-formed sha256."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST
    if not export_dir.is_dir():
        raise ArtifactError(f"{export_dir}: no such export folder")
    if not path.is_file():
        raise ArtifactError(f"{export_dir}: not an export folder (no {MANIFEST}; was the export interrupted?)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({first_line(exc)})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "class_names" not in manifest:
        raise ArtifactError(f"{path}: not a toolkit manifest (no files / class_names)")
    classes = manifest["class_names"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise ArtifactError(f"{path}: class_names is not a list of names")
    for name, entry in manifest["files"].items():
        _check_manifest_entry(export_dir, path, name, entry)
    return manifest


_FORMAT_SUFFIX = {"torchscript": ".ts", "onnx": ".onnx", "pt2": ".pt2", "eager": ".safetensors"}


def is_plain_name(name: str) -> bool:
    """A file name with no folder part: not empty, `.`, `..`, absolute, or holding a separator or NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
            and Path(name).name == name and not Path(name).is_absolute())


def _check_manifest_entry(export_dir: Path, manifest_path: Path, name: str, entry: Any) -> None:
    where = f"{manifest_path}: files entry {name!r}"
    if not is_plain_name(name):
        raise ArtifactError(f"{where}: not a plain file name inside the export folder (absolute path, '..' or a "
                            "folder separator)")
    if not isinstance(entry, dict):
        raise ArtifactError(f"{where}: not a JSON object")
    suffix = _FORMAT_SUFFIX.get(entry.get("format"))  # unknown formats are listed but never loaded
    if suffix is not None and Path(name).suffix.lower() != suffix:
        raise ArtifactError(f"{where}: format {entry['format']!r} needs a {suffix} file")
    sha = entry.get("sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise ArtifactError(f"{where}: sha256 {str(sha)[:80]!r} is not 64 hex digits")
    file = export_dir / name
    if file.is_symlink() and file.resolve().parent != export_dir.resolve():
        raise ArtifactError(f"{where}: a symbolic link to {file.resolve()}, outside the export folder")


def manifest_sha256(artifact: Path) -> str | None:
    """The sha256 that the manifest.json beside `artifact` records for it, or None (no manifest, or not listed)."""
    artifact = Path(artifact)
    if not (artifact.parent / MANIFEST).is_file():
        return None
    entry = read_manifest(artifact.parent)["files"].get(artifact.name)
    return None if entry is None else entry.get("sha256", "")


def hash_mismatch(artifact: Path) -> str | None:
    """Why `artifact` differs from what the manifest beside it recorded, or None if it matches.

    An artifact without a manifest beside it (or one the manifest does not list) is not checked.
    Call it before loading a .ts or .pt2 file: those are programs (see `toolkit.backends`).
    """
    artifact = Path(artifact)
    expected = manifest_sha256(artifact)
    if expected is None:
        return None
    if not artifact.is_file():
        raise ArtifactError(f"{artifact}: no such file")
    if not expected:
        return f"{artifact}: {MANIFEST} lists it without a sha256"
    try:
        actual = sha256_file(artifact)
    except OSError as exc:
        raise ArtifactError(f"{artifact}: cannot read ({exc.strerror or exc})") from None
    if actual != expected:
        return (f"{artifact}: sha256 {actual[:12]}… differs from {MANIFEST} ({expected[:12]}…): "
                "the file changed after export")
    return None
