"""toolkit.training.metrics: one record reaches all three sinks; windows and epoch means skip non-finite losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from toolkit.training.metrics import MetricLogger, MetricsFile, read_metrics


def test_step_records_every_log_every_steps_and_at_the_end(accelerator, tmp_path: Path, capsys) -> None:
    logger = MetricLogger(accelerator, tmp_path / "metrics.jsonl", None, 0, total_steps=5, epochs=1, log_every=2,
                          quiet=True)
    losses = [1.0, 3.0, float("nan"), 5.0, 2.0]
    for step, loss in enumerate(losses, start=1):
        logger.batch(torch.tensor(loss), math.isfinite(loss), images=8)
        logger.step(step, epoch=1, lr=0.1, train_seconds=0.5 * step)  # 8 images per 0.5 s
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 5]
    assert [r["loss"] for r in records] == pytest.approx([2.0, 5.0, 2.0])  # the NaN batch is left out
    assert all(r["kind"] == "step" and r["lr"] == 0.1 for r in records)
    assert [r["images_per_s"] for r in records] == pytest.approx([16.0, 16.0, 16.0])  # from training seconds
    assert records[1]["train_seconds"] == 2.0
    assert logger.epoch_loss() == pytest.approx((1 + 3 + 5 + 2) / 4)
    assert logger.epoch_loss() == 0.0  # read once per epoch, then reset
    logger.epoch({"kind": "epoch", "epoch": 1, "step": 5, "train_loss": 2.75, "train_seconds": 2.5,
                  "val_accuracy": 0.5, "val_loss": 1.0})
    assert read_metrics(tmp_path)[-1]["val_accuracy"] == 0.5
    out = capsys.readouterr().out
    assert "step 4/5 loss 5.0000" in out and "epoch 1/1: train loss 2.7500, val accuracy 50.0 %" in out


def test_resume_drops_the_records_after_the_resumed_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"kind": "step", "step": s}) + "\n" for s in range(1, 7)))
    MetricsFile(path, resume_step=4).write({"kind": "step", "step": 5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert read_metrics(tmp_path / "missing") == []


def test_a_torn_line_is_dropped_with_a_warning_naming_file_and_line(tmp_path: Path, capsys) -> None:
    """A kill while a record is appended leaves a torn last line: readers and resumes drop it and say so."""
    path = tmp_path / "metrics.jsonl"
    good = [{"kind": "step", "step": s, "loss": 1.5} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"kind": "step", "step": 4, "lo')
    assert read_metrics(tmp_path) == good
    warning = f"warning: {path} line 4 is not a complete JSON record (torn by a kill mid-write?): dropped"
    assert capsys.readouterr().err.splitlines() == [warning]
    warnings: list[str] = []
    MetricsFile(path, resume_step=3, warn=warnings.append).write({"kind": "step", "step": 4})
    assert warnings == [warning]
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in [*good, {"kind": "step", "step": 4}])
    assert read_metrics(tmp_path) == [*good, {"kind": "step", "step": 4}] and capsys.readouterr().err == ""
