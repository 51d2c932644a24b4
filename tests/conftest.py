"""Shared helpers: run the real CLI in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tiny synthetic data: 400 training images (no hold-out) and 100 test images.
TINY = ["--data", "synthetic", "--synthetic-train-size", "400", "--synthetic-test-size", "100",
        "--val-fraction", "0", "--log-every", "1", "--threads", "1"]


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m toolkit ARGS` from the repository root; never raises on a non-zero exit."""
    return subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch_cmd(config: str, *args: str) -> list[str]:
    """`accelerate launch --config_file launch/CONFIG -m toolkit ARGS` on a free port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / config),
            "--main_process_port", str(free_port()), "-m", "toolkit", *args]


def accelerate_launch(config: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(accelerate_launch_cmd(config, *args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


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


@pytest.fixture
def cache_env(tmp_path: Path) -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(tmp_path / "cache")}
