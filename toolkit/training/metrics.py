"""Training metrics: metrics.jsonl, and the logger that sends every record to its three sinks.

metrics.jsonl holds one JSON object per line:
  {"kind": "step", "step", "epoch", "loss", "lr", "images_per_s", "train_seconds"}   every --log-every steps
  {"kind": "epoch", "epoch", "step", "train_loss", "train_seconds", "val_accuracy", "val_loss"}
  {"kind": "compile", "step", "seconds"}   with --compile: the warm-up that compiled the step, before the clock
`train_seconds` counts time spent in training steps only (not evaluation, not checkpoint writes, not the
--compile warm-up).
A run killed while appending a record can leave its last line torn: readers drop a line that is not a
complete JSON object, with a warning naming the file and line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from toolkit.core.files import write_text_atomic
from toolkit.training.progress import Progress
from toolkit.training.runs import METRICS


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def parse_records(path: Path, warn: Callable[[str], None] = _warn) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, oldest first; a line that is not a JSON object (torn by a kill
    mid-write) is dropped and `warn`ed about, naming the file and the line."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            warn(f"warning: {path} line {number} is not a complete JSON record (torn by a kill mid-write?): dropped")
    return records


class MetricsFile:
    """Appends records to metrics.jsonl; on resume, first drops the lines past the resumed step (and torn lines),
    rewriting the file atomically."""

    def __init__(self, path: Path, resume_step: int | None, warn: Callable[[str], None] = _warn) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [r for r in parse_records(path, warn) if r.get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path, warn: Callable[[str], None] = _warn) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, oldest first (none when there is no file); torn lines are dropped
    with a warning (`parse_records`)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return parse_records(path, warn)


class MetricLogger:
    """Sends each record to metrics.jsonl (main process), Accelerate's trackers and the progress display,
    and owns the logging window: the loss and image count since the last step record.

    Losses are summed on the device and read only when a record is written, so logging adds no
    host-device synchronization between log points.
    """

    def __init__(self, accelerator: Accelerator, path: Path, resume_step: int | None, initial_step: int,
                 total_steps: int, epochs: int, log_every: int, quiet: bool, train_seconds: float = 0.0) -> None:
        self.accelerator = accelerator
        self.file = MetricsFile(path, resume_step, accelerator.print) if accelerator.is_main_process else None
        self.progress = Progress(total_steps, initial_step, accelerator.is_main_process, quiet, log_every)
        self.total_steps, self.epochs, self.log_every = total_steps, epochs, log_every
        # [loss sum, finite batches] of this process, on the device: since the last step record, and this epoch
        self.window = torch.zeros(2, device=accelerator.device)
        self.epoch_totals = torch.zeros(2, device=accelerator.device)
        self._window_start(train_seconds)

    def _window_start(self, train_seconds: float) -> None:
        self.window.zero_()
        self.images = 0  # images trained on in the window, over all processes
        self.start = train_seconds  # the run's training seconds when the window began

    def batch(self, loss: torch.Tensor, finite: torch.Tensor | bool, images: int) -> None:
        """Count one micro-batch: its loss (left out when not finite) and its images on every process."""
        finite = torch.as_tensor(finite, device=loss.device)
        counted = torch.stack([torch.where(finite, loss.detach().float(), 0.0), finite.float()])
        self.window += counted
        self.epoch_totals += counted
        self.images += images * self.accelerator.num_processes

    def epoch_loss(self) -> float:
        """Mean loss of this process's finite batches since the last call (one read per epoch)."""
        total, batches = self.epoch_totals.tolist()
        self.epoch_totals.zero_()
        return total / max(batches, 1)

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` gets a step record: every `log_every` steps and the last."""
        return step % self.log_every == 0 or step == self.total_steps

    def step(self, step: int, epoch: int, lr: float, train_seconds: float) -> None:
        """After optimizer step `step`: write a step record when one is due.

        `train_seconds` is the run's training time so far (data and steps, not evaluation or checkpoint
        writes), so images/s is the training throughput even across an epoch's end.
        """
        if not self.due(step):
            return
        mean_loss = self.accelerator.reduce(self.window[0] / self.window[1].clamp(min=1), "mean").item()
        images_per_s = self.images / max(train_seconds - self.start, 1e-9)
        record = {"kind": "step", "step": step, "epoch": epoch, "loss": mean_loss, "lr": lr,
                  "images_per_s": images_per_s, "train_seconds": round(train_seconds, 3)}
        self._write(record, step, ("loss", "lr", "images_per_s"))
        self.progress.step(step, epoch, self.epochs, mean_loss, lr, images_per_s)
        self._window_start(train_seconds)

    def epoch(self, record: dict[str, Any]) -> None:
        """An end-of-epoch record (see the module docstring), plus a line for people."""
        self._write(record, record["step"], [k for k, v in record.items() if isinstance(v, float)])
        val = record.get("val_accuracy")
        self.progress.write(f"epoch {record['epoch']}/{self.epochs}: train loss {record['train_loss']:.4f}"
                            + (f", val accuracy {100 * val:.1f} %" if val is not None else "")
                            + f", {record['train_seconds']:.1f} s training")

    def compiled(self, step: int, seconds: float) -> None:
        """The --compile warm-up's record (see the module docstring), plus a line for people."""
        self._write({"kind": "compile", "step": step, "seconds": round(seconds, 3)}, step, [])
        self.progress.write(f"compiled the training step in {seconds:.1f} s (not counted as training time)")

    def _write(self, record: dict[str, Any], step: int, tracked) -> None:
        if self.file is not None:
            self.file.write(record)
        self.accelerator.log({k: record[k] for k in tracked}, step=step)

    def note(self, line: str) -> None:
        """A line for people (warnings), without breaking the progress bar."""
        self.progress.write(line)

    def close(self) -> None:
        self.progress.close()
