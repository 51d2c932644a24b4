"""Which rows `make bench` measures for each built-in model (`toolkit.training.models.MODELS`).

Forward FLOPs per image (benchmarks/flops.py, a multiply-accumulate = 2): tutorial 1.30 M, speednet 236 M (180×),
resnet18 1,111 M (850×). On 2 cores one ResNet-18 batch of 64 takes about a second to infer and a training step
of 128 images several seconds, so the heavy models get fewer rows, never none: every format but pt2 (the
slowest torch format on the tutorial), at batch 1 (latency) and 64 (throughput), 1 and all threads, ONNX Runtime
without its default session options; the training step at the fast recipe's batch only, in both memory formats,
with a few timed steps instead of a second's worth. benchmarks/README.md has the resulting `make bench` time.

The tutorial's rows are the suite's trained model (`conftest.trained`); the others are untrained, random
initialization with seed 0 (`toolkit train --max-steps 1 --lr 1e-9` writes the run folder that `toolkit export`
reads): speed does not depend on the weights, and training them to a useful accuracy would take hours here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.artifacts import formats
from toolkit.core.errors import ConfigError
from toolkit.training.config import RECIPES
from toolkit.training.models import MODELS

# The training step's memory formats: the model's parameters and the input batch both converted to it.
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
TRAINED_MODEL = "tutorial"  # the model of the suite's trained run (conftest.trained: `toolkit train` defaults)
TRAIN_BATCH = int(RECIPES["fast"].get("batch_size", 64))  # the fast recipe's batch (128): every model's row


@dataclass(frozen=True)
class ModelRows:
    """The benchmark rows of one model. Thread settings: an int, "all" (every core) or "default" (ORT's own)."""

    model: str  # a name of toolkit.training.models.MODELS
    trained: bool  # True: the suite's trained run; False: random initialization, seed 0
    formats: tuple[str, ...]  # inference formats (toolkit.artifacts.formats names)
    batches: tuple[int, ...]  # inference batch sizes
    torch_threads: tuple[int | str, ...]  # thread settings of the torch formats
    ort_threads: tuple[int | str, ...]  # thread settings of the ONNX Runtime formats
    min_rounds: int  # fewest timed rounds of an inference row, however long one call takes
    check_images: int  # images each runtime's logits are compared with eager's on before timing
    train: tuple[tuple[int, str], ...]  # (batch, memory format) of the train_step rows, each at fp32 and bf16
    train_rounds: int | None  # timed training steps after one warm-up step; None: rounds for Scale.seconds

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"ModelRows.model: unknown model {self.model!r}; choose from {sorted(MODELS)}")
        if self.trained and self.model != TRAINED_MODEL:
            raise ConfigError(f"ModelRows.trained: the suite trains {TRAINED_MODEL!r} only, not {self.model!r}")
        unknown = [f for f in self.formats if f not in formats.BY_NAME]
        if unknown:
            raise ConfigError(f"ModelRows.formats: unknown formats {unknown}; choose from {list(formats.BY_NAME)}")
        layouts = [m for _, m in self.train if m not in MEMORY_FORMATS]
        if layouts:
            raise ConfigError(f"ModelRows.train: unknown memory formats {layouts}; choose from {list(MEMORY_FORMATS)}")
        if self.min_rounds < 1 or self.check_images < 1 or (self.train_rounds is not None and self.train_rounds < 1):
            raise ConfigError("ModelRows: min_rounds, check_images and train_rounds must be >= 1")

    def inference_cases(self) -> list[tuple[str, int | str, int]]:
        """(format, thread setting, batch) of every inference row, in registry order."""
        return [(f, t, b) for f in self.formats
                for t in (self.ort_threads if formats.get(f).runtime == "onnxruntime" else self.torch_threads)
                for b in self.batches]


_HEAVY = dict(trained=False, formats=tuple(f.name for f in formats.FORMATS if f.name != "pt2"), batches=(1, 64),
              torch_threads=(1, "all"), ort_threads=(1, "all"), min_rounds=3, check_images=64,
              train=((TRAIN_BATCH, "contiguous"), (TRAIN_BATCH, "channels_last")), train_rounds=3)

MODEL_ROWS: dict[str, ModelRows] = {r.model: r for r in (
    ModelRows("tutorial", trained=True, formats=tuple(f.name for f in formats.FORMATS), batches=(1, 64, 1024),
              torch_threads=(1, "all"), ort_threads=("default", 1, "all"), min_rounds=5, check_images=1024,
              train=((4, "contiguous"), (TRAIN_BATCH, "contiguous"), (TRAIN_BATCH, "channels_last")),
              train_rounds=None),
    ModelRows("speednet", **_HEAVY),
    ModelRows("resnet18", **_HEAVY),
)}
