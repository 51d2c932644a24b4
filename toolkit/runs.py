"""The run folder: its layout, and reading a finished run back.

runs/<name>/
  config.json        the TrainConfig, plus what the run really had (processes, precision, device, versions)
  metrics.jsonl      one JSON object per line: {"kind": "step"|"epoch", ...}
  checkpoints/       step_<global step>/ (see toolkit.checkpoint)
  model.safetensors  final weights; metadata holds the model name and class names to rebuild it
  eval.json          final evaluation (toolkit.evaluate.EvalResult.to_json)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from toolkit import __version__
from toolkit.errors import CheckpointError, first_line
from toolkit.models import build_model

CONFIG = "config.json"
METRICS = "metrics.jsonl"
MODEL = "model.safetensors"
EVAL = "eval.json"
CHECKPOINTS = "checkpoints"


def default_run_name() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def versions() -> dict[str, str]:
    import accelerate

    return {"toolkit": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version()}


def save_model(model: nn.Module, path: Path, model_name: str, classes: list[str]) -> None:
    """Final weights with what is needed to rebuild the module (written atomically)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(model.state_dict(), tmp, metadata={"model": model_name, "classes": json.dumps(classes)})
    os.replace(tmp, path)


@dataclass
class TrainedModel:
    model: nn.Module
    model_name: str
    classes: list[str]
    path: Path


def load_model(path: Path) -> TrainedModel:
    """Rebuild an eval-mode fp32 model from a `model.safetensors` written by `save_model`."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(path)
        name, classes = meta["model"], json.loads(meta["classes"])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a toolkit model file ({type(exc).__name__}: {exc})") from None
    return TrainedModel(rebuild_model(name, classes, state, str(path)), name, classes, path)


def rebuild_model(name: str, classes: list[str], state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """A registered model with `state` loaded, fp32 and in eval mode; `source` names the weights in errors.

    Mixed-precision runs keep fp32 master weights; `.float()` also covers any half-precision state.
    """
    model = build_model(name, len(classes))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: weights do not fit model {name!r}: {first_line(exc)}") from None
    return model.float().eval()


def remove_run_files(run_dir: Path) -> None:
    """Delete what a training run wrote into `run_dir` (for --overwrite), leaving anything else."""
    for name in (CONFIG, METRICS, MODEL, EVAL):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)


def read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG
    if not path.is_file():
        raise CheckpointError(f"--run {run_dir}: not a run folder (no {CONFIG})")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends JSON lines to metrics.jsonl (main process only); on resume, drops lines past the resumed step."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
