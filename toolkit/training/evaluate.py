"""Overall and per-class accuracy with a confusion matrix, exact across processes.

Predictions are gathered with `accelerator.gather_for_metrics`, which drops the samples Accelerate
duplicated to even out the last batch, so the counts equal the split size on any process count.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from toolkit.core.files import write_json_atomic
from toolkit.core.images import tta_logits
from toolkit.training.accelerator import wants_cpu
from toolkit.training.data import load_held_out, make_loader
from toolkit.training.runs import MODEL, RunRecord, load_model


@dataclass
class EvalResult:
    """`confusion[t, p]` counts images of true class t predicted as p."""

    confusion: torch.Tensor
    classes: list[str]
    split: str = "test"
    loss: float | None = None
    tta: str = "none"  # the test-time augmentation the logits were averaged over (toolkit.core.images.TTA_VIEWS)
    seconds: float | None = None  # wall time of the evaluation, all views included (a time-to-accuracy counts it)

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(self.confusion.diagonal().sum()) / max(self.n, 1)

    @property
    def per_class(self) -> dict[str, float]:
        totals = self.confusion.sum(dim=1).clamp(min=1)
        return {c: float(v) for c, v in zip(self.classes, self.confusion.diagonal() / totals)}

    def to_json(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "n": self.n,
            "accuracy": self.accuracy,
            "per_class": self.per_class,
            "classes": self.classes,
            "confusion": self.confusion.tolist(),
            "loss": self.loss,
            "tta": self.tta,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EvalResult:
        """The inverse of `to_json` (the derived fields are recomputed from the confusion matrix)."""
        return cls(torch.tensor(d["confusion"], dtype=torch.long), list(d["classes"]), d["split"], d.get("loss"),
                   d.get("tta", "none"), d.get("seconds"))

    @classmethod
    def read(cls, path: Path) -> EvalResult:
        return cls.from_json(json.loads(Path(path).read_text()))

    def write(self, path: Path) -> None:
        """eval.json (or `--json-out`): `to_json()`, indented, written atomically."""
        write_json_atomic(path, self.to_json())

    def format(self) -> str:
        """The tutorial's report, plus the confusion matrix."""
        views = "" if self.tta == "none" else f" (test-time augmentation: {self.tta})"
        lines = [f"Accuracy of the network on the {self.n} {self.split} images: {100 * self.accuracy:.1f} %{views}"]
        width = max(len(c) for c in self.classes)
        lines += [f"Accuracy for class: {c:<{width}s} is {100 * a:.1f} %" for c, a in self.per_class.items()]
        lines.append("Confusion matrix (rows: true class, columns: predicted):")
        short = [c[:6] for c in self.classes]
        lines.append(" " * (width + 1) + " ".join(f"{s:>6s}" for s in short))
        for c, row in zip(self.classes, self.confusion.tolist()):
            lines.append(f"{c:<{width}s} " + " ".join(f"{v:>6d}" for v in row))
        return "\n".join(lines)


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator: Accelerator, classes: list[str],
             split: str = "test", tta: str = "none") -> EvalResult:
    """Run `model` over a prepared `loader`, averaging its logits over the views of `tta` (`tta_logits`); every
    process returns the same, exact totals."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    num_classes = len(classes)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=accelerator.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for images, labels in loader:
        with accelerator.autocast():
            logits = tta_logits(model, images, tta)
        losses = nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        preds, labels, losses = accelerator.gather_for_metrics((logits.argmax(dim=1), labels, losses))
        # Counted by comparison rather than bincount or scatter: exact and deterministic on every device
        # (--deterministic refuses some of those kernels on CUDA), and a batch × classes² matrix is small.
        cells = torch.arange(num_classes * num_classes, device=confusion.device)
        confusion += ((labels * num_classes + preds)[:, None] == cells).sum(dim=0)
        loss_sum += losses.double().sum()
    model.train(was_training)
    confusion = confusion.view(num_classes, num_classes).cpu()  # waits for the device: the clock stops after it
    n = int(confusion.sum())
    return EvalResult(confusion, classes, split, float(loss_sum) / n if n else None, tta,
                      time.perf_counter() - start)


def evaluate_run(run_dir: Path, data_overrides: dict[str, Any], split: str = "test",
                 json_out: Path | None = None, model: str | None = None, tta: str | None = None) -> EvalResult:
    """`toolkit evaluate`: the run's final weights on a split of its data (or of `data_overrides`); `model` is
    the model the user names (`--model`), needed for a user's model (`toolkit.training.runs.rebuild_model`);
    `tta` the test-time augmentation (default: the run's `--tta`)."""
    cfg = RunRecord.read(run_dir).config
    trained = load_model(run_dir / MODEL, model=model)
    held, note = load_held_out(dataclasses.replace(cfg.data, **data_overrides), trained.classes, split)
    accelerator = Accelerator(cpu=wants_cpu())
    model, loader = accelerator.prepare(trained.model, make_loader(held, cfg.eval_batch_size, shuffle=False))
    if note:
        accelerator.print(f"note: {note}")
    result = evaluate(model, loader, accelerator, trained.classes, held.name, cfg.tta if tta is None else tta)
    accelerator.print(result.format())
    if json_out is not None and accelerator.is_main_process:
        result.write(json_out)
    return result
