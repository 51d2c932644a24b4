"""Session fixtures for the export/verify/predict tests: one tiny trained run, exported once.

Import the fixtures into a test module (`from tests._fixtures import exported`). A fixture imported
into several modules is registered once per module, so pytest would run a session-scoped fixture
once per module; the work is therefore cached per pytest base temp folder (one per session).
"""

from __future__ import annotations

import functools
import json
import subprocess
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

from tests.conftest import assert_ok, run_cli

# 500 synthetic images, 3 epochs: about 100 % test accuracy in a few seconds on one thread.
TRAIN_ARGS = ["--data", "synthetic", "--synthetic-train-size", "500", "--synthetic-test-size", "200",
              "--epochs", "3", "--batch-size", "16", "--lr", "0.05", "--threads", "1"]
CLASSES = [f"class{i}" for i in range(10)]
# Each backend's file in an export folder.
FILES = {"eager": "model.safetensors", "torchscript": "model.ts", "pt2": "model.pt2", "onnxruntime": "model.onnx"}


@dataclass(frozen=True)
class Export:
    run: Path  # the trained run folder
    dir: Path  # its export folder (all formats); tests that modify files work on a copy
    log: str  # stdout + stderr of `toolkit export`


@functools.cache
def _train_and_export(base: Path) -> Export:
    run, out = base / "export-run", base / "export"
    assert_ok(run_cli("train", *TRAIN_ARGS, "--output-dir", str(run), "--cache-dir", str(base / "cache")))
    proc = run_cli("export", "--run", str(run), "--out", str(out))
    assert_ok(proc)
    return Export(run, out, proc.stdout + proc.stderr)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Export:
    return _train_and_export(tmp_path_factory.getbasetemp())


def cli(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """`toolkit ARGS` in this process (no interpreter start-up), as a CompletedProcess for conftest's asserts."""
    from toolkit.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["toolkit", *args], rc, captured.out, captured.err)


def rehash(export_dir: Path, name: str) -> None:
    """Record a changed file's sha256 in the manifest, so that only its numerics can fail verification."""
    from toolkit.checkpoint import sha256_file

    path = export_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"][name]["sha256"] = sha256_file(export_dir / name)
    path.write_text(json.dumps(manifest))


def edit_onnx(path: Path, edit: Callable[[onnx.ModelProto], None]) -> None:
    """Load an ONNX file, let `edit(model_proto)` change it, save it back in one file."""
    model = onnx.load(str(path))
    edit(model)
    onnx.save_model(model, str(path), save_as_external_data=False)


def rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes | Callable[[bytes], bytes]] | None = None,
                add: dict[str, bytes] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """Copy the zip archive `src` (a .ts or .pt2) to `dst`, entry by entry, replacing (bytes, or a function of the
    old bytes), adding or dropping entries. Names are full archive paths (`model/data.pkl`)."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = zin.read(info.filename)
            new = replace.get(info.filename, data)
            zout.writestr(info.filename, new(data) if callable(new) else new)
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    return dst
