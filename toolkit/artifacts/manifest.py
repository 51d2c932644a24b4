"""manifest.json: the record of an export folder, written last (a folder with a manifest is complete).

It lists every file with its format, size and sha256, the input spec, class names, normalization,
the source run (its weights' hash and data config, so `toolkit verify` can reload the same split)
and the versions used. This module is its only reader and writer. Reading checks that every listed
file is a plain name inside the folder with its format's suffix, so a manifest cannot point a loader
elsewhere. Torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.artifacts import formats
from toolkit.core.errors import ArtifactError, first_line
from toolkit.core.files import is_plain_name, write_json_atomic

MANIFEST = "manifest.json"


@dataclass
class FileEntry:
    """One file of the export: its format, size, hash and what its writer reported (method, opset, ...)."""

    format: str
    size: int | None = None  # bytes
    sha256: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"format": self.format, **self.details}
        out.update({k: v for k, v in (("size", self.size), ("sha256", self.sha256)) if v is not None})
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileEntry:
        details = {k: v for k, v in d.items() if k not in ("format", "size", "sha256")}
        return cls(d.get("format"), d.get("size"), d.get("sha256"), details)


@dataclass
class SourceInfo:
    """The run the export came from."""

    run: str  # absolute path of the run folder
    weights: str  # absolute path of the exported weights
    checkpoint: str | None  # the checkpoint's folder name, or None for the final weights
    sha256: str  # of the weights
    model: str  # registered model name
    trained_mixed_precision: str | None
    data: dict[str, Any]  # the run's DataConfig fields


@dataclass
class Manifest:
    toolkit_version: str
    created: str  # ISO 8601, UTC
    source: SourceInfo
    precision: str
    input: dict[str, Any]
    output: dict[str, Any]
    class_names: list[str]
    mean: list[float]
    std: list[float]
    opset: int | None
    files: dict[str, FileEntry]
    versions: dict[str, str]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["files"] = {name: entry.to_json() for name, entry in self.files.items()}
        return out

    def write(self, export_dir: Path) -> None:
        write_json_atomic(Path(export_dir) / MANIFEST, self.to_json())

    @classmethod
    def from_json(cls, raw: Any, source: Path) -> Manifest:
        """A manifest from its JSON, checked: every file it lists is a plain file name (no absolute path,
        no `..`, no separator) with the suffix of its format and a well-formed sha256. `source` names the
        file in errors."""
        if not isinstance(raw, dict) or not isinstance(raw.get("files"), dict) or "class_names" not in raw:
            raise ArtifactError(f"{source}: not a toolkit manifest (no files / class_names)")
        classes = raw["class_names"]
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise ArtifactError(f"{source}: class_names is not a list of names")
        for name, entry in raw["files"].items():
            _check_entry(source, name, entry)
        try:
            return cls(**{**raw, "source": SourceInfo(**raw["source"]),
                          "files": {n: FileEntry.from_json(e) for n, e in raw["files"].items()}})
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{source}: not a toolkit manifest ({first_line(exc)})") from None

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """A manifest file by path (an export folder's, or the copy `toolkit run` keeps in the run folder)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{path}: unreadable manifest ({first_line(exc)})") from None
        return cls.from_json(raw, Path(path))

    @classmethod
    def read(cls, export_dir: Path) -> Manifest:
        """The manifest of an export folder; no file it lists may be a symbolic link leading out of the folder."""
        export_dir = Path(export_dir)
        path = export_dir / MANIFEST
        if not export_dir.is_dir():
            raise ArtifactError(f"{export_dir}: no such export folder")
        if not path.is_file():
            raise ArtifactError(f"{export_dir}: not an export folder (no {MANIFEST}; was the export interrupted?)")
        manifest = cls.load(path)
        for name in manifest.files:
            file = export_dir / name
            if file.is_symlink() and file.resolve().parent != export_dir.resolve():
                raise ArtifactError(f"{path}: files entry {name!r}: a symbolic link to {file.resolve()}, outside "
                                    "the export folder")
        return manifest


def _check_entry(manifest_path: Path, name: str, entry: Any) -> None:
    where = f"{manifest_path}: files entry {name!r}"
    if not is_plain_name(name):
        raise ArtifactError(f"{where}: not a plain file name inside the export folder (absolute path, '..' or a "
                            "folder separator)")
    if not isinstance(entry, dict):
        raise ArtifactError(f"{where}: not a JSON object")
    fmt = formats.BY_NAME.get(entry.get("format"))  # unknown formats are listed but never loaded
    if fmt is not None and Path(name).suffix.lower() != fmt.suffix:
        raise ArtifactError(f"{where}: format {fmt.name!r} needs a {fmt.suffix} file")
    sha = entry.get("sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise ArtifactError(f"{where}: sha256 {str(sha)[:80]!r} is not 64 hex digits")


def listed(artifact: Path) -> FileEntry | None:
    """The entry for `artifact` in the manifest.json beside it; None without a manifest or without an entry."""
    artifact = Path(artifact)
    if not (artifact.parent / MANIFEST).is_file():
        return None
    return Manifest.read(artifact.parent).files.get(artifact.name)


def hash_mismatch(artifact: Path, data: bytes | None = None) -> str | None:
    """Why `artifact` differs from what the manifest beside it recorded, or None if it matches.

    `data` is the file's content as the caller read it, so that the bytes checked are the bytes it goes
    on to load; without it the file is read here. An artifact without a manifest beside it (or one the
    manifest does not list) is not checked: `check_bytes` is what refuses such a program.
    """
    artifact = Path(artifact)
    entry = listed(artifact)
    if entry is None:
        return None
    if data is None:
        if not artifact.is_file():
            raise ArtifactError(f"{artifact}: no such file")
        try:
            data = artifact.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"{artifact}: cannot read ({exc.strerror or exc})") from None
    return _mismatch(artifact, entry, data)


def check_bytes(artifact: Path, data: bytes, fmt: formats.Format) -> None:
    """Refuse `data`, the content just read from `artifact`, unless the manifest.json beside it vouches for it.

    A file the manifest lists must have its recorded sha256. A program (`Format.program`: .ts, .pt2)
    must be listed, since it runs code while loading and nothing else says where it came from; a data
    file (.onnx, .safetensors) without an entry is accepted. Each refusal is one `ArtifactError` that
    says `--no-hash-check` (`check_hash=False`) loads the file anyway.
    """
    override = "pass --no-hash-check (check_hash=False) to load it anyway"
    entry = listed(artifact)
    if entry is None:
        if fmt.program:
            raise ArtifactError(f"{artifact}: no {MANIFEST} entry to check it against, and a {fmt.name} file is a "
                                f"program that runs code while loading; {override}")
        return
    if problem := _mismatch(artifact, entry, data):
        raise ArtifactError(f"{problem}; {override}")


def _mismatch(artifact: Path, entry: FileEntry, data: bytes) -> str | None:
    if not entry.sha256:
        return f"{artifact}: {MANIFEST} lists it without a sha256"
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.sha256:
        return (f"{artifact}: sha256 {actual[:12]}… differs from {MANIFEST} ({entry.sha256[:12]}…): "
                "the file changed after export")
    return None
