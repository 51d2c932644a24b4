"""Helpers for the tests: run the real CLI as a user would, check its errors, edit model files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from toolkit.artifacts.formats import FORMATS, LogitTolerance
from toolkit.core.files import sha256_file

if TYPE_CHECKING:
    from _pytest.mark import ParameterSet  # what pytest.param returns

ROOT = Path(__file__).resolve().parents[1]

# Tiny synthetic data: 400 training images (no hold-out) and 100 test images.
TINY = ["--data", "synthetic", "--synthetic-train-size", "400", "--synthetic-test-size", "100",
        "--val-fraction", "0", "--log-every", "1", "--threads", "1"]
# The devices of the tests of the device paths (tests/training/test_gpu.py, benchmarks/test_gpu.py): always the
# CPU, so that CI runs every line of them, and the CUDA GPU where there is one (its cases marked `gpu`).
DEVICE_NAMES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
# The `exported` fixture's run: 500 synthetic images, 3 epochs, about 100 % test accuracy in a few seconds.
TRAIN_ARGS = ["--data", "synthetic", "--synthetic-train-size", "500", "--synthetic-test-size", "200",
              "--epochs", "3", "--batch-size", "16", "--lr", "0.05", "--threads", "1"]
CLASSES = [f"class{i}" for i in range(10)]
# Each format's file in an export folder.
FILES = {f.name: f.file for f in FORMATS}
# Formats whose logits must equal eager's within the verify tolerance (fp32); the others (fp16, int8) are
# held to eager's accuracy instead (`Format.tolerance`).
EXACT = {f.name for f in FORMATS if isinstance(f.tolerance, LogitTolerance)}


def assert_like_eager(name: str, logits: np.ndarray, reference: np.ndarray) -> None:
    """Logits of format `name` for the batch eager gave `reference` for: N×classes finite float32, and for fp32
    formats within the verify tolerance of eager's (fp16 and int8 differ by design; verify checks their accuracy)."""
    assert logits.dtype == np.float32 and logits.shape == reference.shape and np.isfinite(logits).all(), name
    if name in EXACT:
        np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4, err_msg=name)


@dataclass(frozen=True)
class Export:
    run: Path  # the trained run folder
    dir: Path  # its export folder (all formats); tests that modify files work on a copy
    log: str  # stdout + stderr of `toolkit export`


def on_device(device: str, *values: object, marks: Sequence[pytest.MarkDecorator] = ()) -> ParameterSet:
    """`pytest.param(device, *values)` with the id `device-value-...`, and marked `gpu` when `device` is cuda."""
    return pytest.param(device, *values, id="-".join(map(str, (device, *values))),
                        marks=[*marks, *([pytest.mark.gpu] if device == "cuda" else [])])


def devices(*cpu_marks: pytest.MarkDecorator) -> list[ParameterSet]:
    """A `device` parametrization over DEVICE_NAMES; `cpu_marks` (e.g. pytest.mark.slow) mark the CPU case only."""
    return [on_device(device, marks=cpu_marks if device == "cpu" else ()) for device in DEVICE_NAMES]


DEVICES = devices()


def device_env(device: str) -> dict[str, str]:
    """`run_cli(env=...)` that trains on `device`: ACCELERATE_USE_CPU=1 keeps a CPU run there where a GPU is visible."""
    return {"ACCELERATE_USE_CPU": "1"} if device == "cpu" else {}


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m toolkit ARGS` from the repository root; never raises on a non-zero exit."""
    return subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def cli(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """`toolkit ARGS` in this process (no interpreter start-up), as a CompletedProcess for the asserts below."""
    from toolkit.apps.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["toolkit", *args], rc, captured.out, captured.err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch_cmd(config: str, *args: str, launch: Sequence[str] = (), port: int | None = None) -> list[str]:
    """`accelerate launch --config_file launch/CONFIG LAUNCH -m toolkit ARGS` on `port` (default: a free one)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / config),
            "--main_process_port", str(port or free_port()), *launch, "-m", "toolkit", *args]


# Launched CPU processes: one thread each, and on the CPU even where a GPU is visible (two ranks on one
# GPU would make NCCL refuse the group).
CPU_LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}


def accelerate_launch(config: str, *args: str, launch: Sequence[str] = (), timeout: float = 300
                      ) -> subprocess.CompletedProcess:
    return subprocess.run(accelerate_launch_cmd(config, *args, launch=launch), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **CPU_LAUNCH_ENV})


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A non-zero exit with a one-line message containing every fragment, and no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    line = next((l for l in proc.stderr.splitlines() if "error:" in l), "")
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in error line {line!r}\nstderr:\n{proc.stderr[-2000:]}"


def load_json(path: Path):
    return json.loads(path.read_text())


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def rehash(export_dir: Path, name: str) -> None:
    """Record a changed file's sha256 in the manifest, so that only its numerics can fail verification."""
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


def assert_png(path: Path, width: tuple[int, int] = (600, 2000), height: tuple[int, int] = (300, 2000)) -> Image.Image:
    """`path` is a PNG that PIL decodes completely, with its size within the given bounds."""
    with Image.open(path) as image:
        assert image.format == "PNG", path
        image.load()  # decodes every pixel: a truncated file fails here
        assert width[0] <= image.width <= width[1] and height[0] <= image.height <= height[1], (path, image.size)
        return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Reading numbers back out of report.md (also used by test_pipeline)


def parse_report(text: str) -> dict:
    """The numbers report.md states, as the strings it printed them with."""
    overall = re.search(r"^Accuracy of the network on the (\d+) (\w+) images: ([\d.]+) %$", text, re.M)
    per_class = dict(re.findall(r"^Accuracy for class: (\S+)\s+is ([\d.]+) %$", text, re.M))
    rows = {m[0]: {"file": m[1], "size": m[2], "sha256": m[3], "max_diff": m[4], "agreement": m[5],
                   "accuracy": m[6], "result": m[7]}
            for m in re.findall(r"^\| ([\w-]+) \| `([^`]+)` \| (\S+ KiB|\?) \| `?(\w+|\?)`? \| (\S+) \| ([\d.]+) % \| "
                                r"([\d.]+) % \| (ok|\*\*FAIL\*\*) \|$", text, re.M)}
    return {"n": overall[1], "split": overall[2], "accuracy": overall[3], "per_class": per_class, "formats": rows}


def expected_numbers(evaluation: dict, verify: dict | None, manifest: dict | None) -> dict:
    """The same numbers formatted from the JSON they came from."""
    formats = {}
    for name, r in (verify or {"formats": {}})["formats"].items():
        entry = (manifest or {}).get("files", {}).get(r["file"], {})
        formats[name] = {"file": r["file"], "size": f"{entry['size'] / 1024:,.1f} KiB",
                         "sha256": entry["sha256"][:12], "max_diff": f"{r['max_abs_logit_diff']:.2e}",
                         "agreement": f"{100 * r['agreement']:.2f}", "accuracy": f"{100 * r['accuracy']:.1f}",
                         "result": "ok" if r["passed"] else "**FAIL**"}
    return {"n": str(evaluation["n"]), "split": evaluation["split"], "accuracy": f"{100 * evaluation['accuracy']:.1f}",
            "per_class": {c: f"{100 * a:.1f}" for c, a in evaluation["per_class"].items()}, "formats": formats}


def run_commands(text: str) -> list[list[str]]:
    """The shell commands of the Reproduce section, continuation lines joined, as argv lists."""
    block = text.split("## Reproduce", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.replace(" \\\n", " ").splitlines() if not line.startswith("#")]


def swap_after_first_hash(monkeypatch: pytest.MonkeyPatch, path: Path, replacement: bytes) -> list[Path]:
    """Make the next sha256 digest taken overwrite `path` with `replacement`, as if the file were swapped between
    its hash check and its load; returns the list of swapped paths, filled when that happens."""
    real = hashlib.sha256
    swaps: list[Path] = []

    class SwapAfterHashing:
        def __init__(self, *data: bytes) -> None:
            self._hash = real(*data)

        def update(self, data: bytes) -> None:
            self._hash.update(data)

        def hexdigest(self) -> str:
            if not swaps:
                path.write_bytes(replacement)
                swaps.append(path)
            return self._hash.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", SwapAfterHashing)
    return swaps
