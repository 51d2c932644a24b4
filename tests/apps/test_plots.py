"""Unit tests of the plot functions on small fake data: each writes a valid PNG of a sensible size."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from tests.helpers import assert_png
from toolkit.apps import plots

CLASSES = [f"class{i}" for i in range(10)]


def _metrics(with_val: bool) -> list[dict]:
    steps = [{"kind": "step", "step": s, "epoch": 1 + (s > 5), "loss": 2.3 / s, "lr": 0.1 * (1 - s / 10),
              "images_per_s": 1000.0, "train_seconds": 0.1 * s} for s in range(1, 11)]
    epochs = [{"kind": "epoch", "epoch": e, "step": 5 * e, "train_loss": 1.0 / e, "train_seconds": 0.5 * e,
               "val_accuracy": 0.4 * e if with_val else None, "val_loss": 1.2 / e if with_val else None}
              for e in (1, 2)]
    return steps[:5] + epochs[:1] + steps[5:] + epochs[1:]


@pytest.mark.parametrize("with_val", [True, False])
def test_training_curves(tmp_path, with_val):
    path = plots.plot_training_curves(_metrics(with_val), tmp_path / "curves.png", final=("test", 0.75))
    assert path == tmp_path / "curves.png"
    assert_png(path)


def test_training_curves_without_any_metrics(tmp_path):
    assert_png(plots.plot_training_curves([], tmp_path / "empty.png"))


@pytest.mark.parametrize("formats", [["eager"], ["eager", "torchscript", "pt2", "onnx"]])
def test_per_class_accuracy(tmp_path, formats):
    per_format = {f: {c: i / 10 for i, c in enumerate(CLASSES)} for f in formats}
    assert_png(plots.plot_per_class_accuracy(CLASSES, per_format, tmp_path / "nested" / "bars.png"))


@pytest.mark.parametrize("k", [3, 10])
def test_confusion(tmp_path, k):
    confusion = np.random.default_rng(0).integers(0, 50, size=(k, k)).tolist()
    assert_png(plots.plot_confusion(confusion, CLASSES[:k], tmp_path / "confusion.png"))


def _red_pixels(image: Image.Image) -> int:
    """Pixels close to the colour that marks mistakes."""
    red = np.array(Image.new("RGB", (1, 1), plots.MISTAKE_COLOR)).reshape(3).astype(int)
    return int((np.abs(np.asarray(image).astype(int) - red).sum(axis=2) < 30).sum())


@pytest.mark.parametrize("n", [32, 5])
def test_image_grid_marks_mistakes(tmp_path, n):
    images = np.full((n, 3, 32, 32), 128, dtype=np.uint8)  # gray, so any red comes from the marking
    labels = np.arange(n) % 10
    right = assert_png(plots.plot_image_grid(images, labels.tolist(), labels.tolist(), CLASSES, tmp_path / "ok.png"),
                       height=(150, 2000))
    wrong = labels.copy()
    wrong[0] = (wrong[0] + 1) % 10
    marked = assert_png(plots.plot_image_grid(images, labels.tolist(), wrong.tolist(), CLASSES, tmp_path / "bad.png"),
                        height=(150, 2000))
    assert _red_pixels(right) == 0
    assert _red_pixels(marked) > 100  # a thick red frame and a red title
