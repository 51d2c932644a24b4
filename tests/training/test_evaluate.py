"""toolkit.training.evaluate: the confusion matrix, the scores derived from it, and its JSON."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.training.data import make_loader, make_synthetic
from toolkit.training.evaluate import EvalResult, evaluate

CLASSES = ["cat", "dog", "ship"]


def test_scores_come_from_the_confusion_matrix() -> None:
    confusion = torch.tensor([[8, 2, 0], [1, 4, 0], [0, 0, 0]])  # no ship images at all
    result = EvalResult(confusion, CLASSES, "val", 0.5)
    assert result.n == 15 and result.accuracy == pytest.approx(12 / 15)
    assert result.per_class == pytest.approx({"cat": 0.8, "dog": 0.8, "ship": 0.0})
    text = result.format()
    assert text.startswith("Accuracy of the network on the 15 val images: 80.0 %")
    assert "Accuracy for class: dog  is 80.0 %" in text and "dog       1      4      0" in text


def test_json_round_trip(tmp_path) -> None:
    result = EvalResult(torch.tensor([[3, 1], [0, 4]]), ["a", "b"], "test", 0.25)
    result.write(tmp_path / "eval.json")
    back = EvalResult.read(tmp_path / "eval.json")
    assert torch.equal(back.confusion, result.confusion) and back.to_json() == result.to_json()


class _Constant(nn.Module):
    """Predicts class `label` for every image (logit 1 for it, 0 for the others)."""

    def __init__(self, label: int, classes: int) -> None:
        super().__init__()
        self.label, self.classes = label, classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), self.classes) + self.dummy
        logits[:, self.label] = 1.0
        return logits


def test_evaluate_counts_every_image_once(accelerator) -> None:
    _, split = make_synthetic(10, 23)  # 23 images: the last batch of 10 is short
    model, loader = accelerator.prepare(_Constant(2, 10), make_loader(split, 10, shuffle=False))
    result = evaluate(model, loader, accelerator, split.classes, "test")
    assert result.n == 23 and result.confusion[:, 2].sum() == 23 and result.confusion.sum() == 23
    assert result.confusion.sum(dim=1).tolist() == torch.bincount(split.labels, minlength=10).tolist()
    logits = _Constant(2, 10)(torch.zeros(1, 3, 32, 32)).detach()
    wrong, right = (float(nn.functional.cross_entropy(logits, torch.tensor([c]))) for c in (0, 2))
    n_right = int((split.labels == 2).sum())
    assert result.loss == pytest.approx((wrong * (23 - n_right) + right * n_right) / 23)
    assert result.per_class["class2"] == 1.0
