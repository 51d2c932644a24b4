"""The run's pictures, as pure functions from plain data (lists, dicts, arrays) to PNG files.

Figures are built with `matplotlib.figure.Figure` directly rather than through `pyplot`: no GUI
backend is ever selected (headless servers, CI, `accelerate launch` workers) and no global figure
registry keeps figures alive, so nothing needs closing. Every figure has a fixed size and dpi, so
the PNGs have predictable pixel sizes (about 800-1500 px wide) whatever the data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
MISTAKE_COLOR = "#d62728"
CORRECT_COLOR = "#2ca02c"


def _margins(left: float, right: float, bottom: float, top: float, **spacing: float) -> dict[str, float]:
    """Fixed subplot margins (figure fractions). Constrained layout would fit them to the labels but
    costs as much as drawing the figure itself, and the figure sizes here are fixed anyway."""
    return {"left": left, "right": right, "bottom": bottom, "top": top, **spacing}


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_training_curves(metrics: Sequence[Mapping[str, Any]], path: Path,
                         final: tuple[str, float] | None = None) -> Path:
    """Loss and learning rate per logged step, validation accuracy per epoch (metrics.jsonl records).

    There is no training accuracy in the metrics, so the accuracy panel shows validation accuracy
    only; `final` = (split name, accuracy) adds the final evaluation as a dashed reference line.
    """
    steps = [m for m in metrics if m.get("kind") == "step"]
    epochs = [m for m in metrics if m.get("kind") == "epoch"]
    fig = Figure(figsize=(15, 4.5))
    loss_ax, lr_ax, acc_ax = fig.subplots(1, 3, gridspec_kw=_margins(0.05, 0.99, 0.12, 0.92, wspace=0.22))

    loss_ax.plot([m["step"] for m in steps], [m["loss"] for m in steps], label="train loss (logged steps)")
    loss_ax.plot([m["step"] for m in epochs], [m["train_loss"] for m in epochs], "o", label="train loss (epoch mean)")
    val_loss = [m for m in epochs if m.get("val_loss") is not None]
    if val_loss:
        loss_ax.plot([m["step"] for m in val_loss], [m["val_loss"] for m in val_loss], "s--", label="val loss")
    loss_ax.set(title="Loss", xlabel="optimizer step", ylabel="cross-entropy")
    loss_ax.legend(loc="upper right")

    lr_ax.plot([m["step"] for m in steps], [m["lr"] for m in steps])
    lr_ax.set(title="Learning rate", xlabel="optimizer step", ylabel="lr")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    val_acc = [m for m in epochs if m.get("val_accuracy") is not None]
    if val_acc:
        acc_ax.plot([m["epoch"] for m in val_acc], [100 * m["val_accuracy"] for m in val_acc], "o-",
                    label="val accuracy")
    else:
        _no_data(acc_ax, "no validation split (--val-fraction 0)")
    if final is not None:
        acc_ax.axhline(100 * final[1], linestyle="--", color="gray", label=f"{final[0]} accuracy (final weights)")
    acc_ax.set(title="Accuracy per epoch", xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100))
    acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if val_acc or final is not None:
        acc_ax.legend(loc="lower right")
    return _save(fig, path)


def plot_per_class_accuracy(classes: Sequence[str], per_format: Mapping[str, Mapping[str, float]],
                            path: Path) -> Path:
    """Grouped bars: for each class, one bar per format (eager first), accuracy in percent."""
    fig = Figure(figsize=(13, 4.5))
    ax = fig.subplots(gridspec_kw=_margins(0.06, 0.86, 0.14, 0.92))
    x = np.arange(len(classes))
    width = 0.8 / max(len(per_format), 1)
    for i, (name, accuracy) in enumerate(per_format.items()):
        ax.bar(x + (i - (len(per_format) - 1) / 2) * width, [100 * accuracy[c] for c in classes], width, label=name)
    ax.set_xticks(x, list(classes), rotation=30 if max(map(len, classes)) > 6 else 0)
    ax.set(title="Per-class accuracy by format", ylabel="accuracy (%)", ylim=(0, 105))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside the axes: bars reach 100 %
    return _save(fig, path)


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path,
                   title: str = "Confusion matrix") -> Path:
    """Heatmap of `confusion[true][predicted]` counts, each cell labelled with its count."""
    counts = np.asarray(confusion)
    fig = Figure(figsize=(8, 7))
    ax = fig.subplots(gridspec_kw=_margins(0.16, 0.98, 0.16, 0.94))
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8, label="images")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, list(classes), rotation=45, ha="right")
    ax.set_yticks(ticks, list(classes))
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    threshold = counts.max() / 2 if counts.size else 0
    for (t, p), n in np.ndenumerate(counts):
        ax.text(p, t, str(n), ha="center", va="center", fontsize=8, color="white" if n > threshold else "black")
    return _save(fig, path)


def plot_image_grid(images: np.ndarray, labels: Sequence[int], predictions: Sequence[int],
                    classes: Sequence[str], path: Path, columns: int = 8) -> Path:
    """The tutorial's `imshow` of a batch: uint8 N×3×H×W images titled true / predicted, mistakes in red."""
    images = np.asarray(images)
    rows = max(1, -(-len(images) // columns))
    height = 1.75 * rows + 0.6
    fig = Figure(figsize=(1.6 * columns, height))
    axes = np.atleast_1d(fig.subplots(rows, columns, gridspec_kw=_margins(
        0.01, 0.99, 0.01, 1 - 0.9 / height, wspace=0.08, hspace=0.5))).ravel()
    wrong = 0
    for i, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(images):
            ax.set_axis_off()
            continue
        ax.imshow(images[i].transpose(1, 2, 0), interpolation="nearest")
        true, pred = classes[labels[i]], classes[predictions[i]]
        ok = labels[i] == predictions[i]
        wrong += not ok
        color = CORRECT_COLOR if ok else MISTAKE_COLOR
        ax.set_title(f"{true}\n{'✓' if ok else '✗'} {pred}", fontsize=9, color="black" if ok else MISTAKE_COLOR)
        for spine in ax.spines.values():
            spine.set_color(color)
            spine.set_linewidth(1 if ok else 3)
    fig.suptitle(f"{len(images)} evaluation images (evenly spaced over the split): true class, then ✓/✗ predicted class "
                 f"({wrong} mistake{'s' if wrong != 1 else ''}, framed in red)")
    return _save(fig, path)
