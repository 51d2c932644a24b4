"""The batcher's choice between the event loop and a worker thread, and how it merges requests, on a fake model
whose calls are recorded (the served ONNX models are in tests/apps/test_serve.py)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from toolkit.apps.serving.batcher import Batcher
from toolkit.apps.serving.metrics import Metrics
from toolkit.core.errors import InputError


class Recorder:
    """A model of 10 classes whose logits are each image's first pixel; it records the batch size of every call
    and refuses images whose first pixel is negative (as a real model's overflow is refused)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        if (x[:, 0, 0, 0] < 0).any():
            raise InputError("overflow")
        return np.repeat(x[:, :1, 0, 0], 10, axis=1)


def images(*firsts: float) -> np.ndarray:
    x = np.zeros((len(firsts), 3, 32, 32), np.float32)
    x[:, 0, 0, 0] = firsts
    return x


def batcher(model: Recorder, *, cheap: bool, max_batch: int = 8) -> tuple[Batcher, Metrics]:
    metrics = Metrics(max_batch)
    b = Batcher("m", [model], ThreadPoolExecutor(1), metrics.model("m"), max_batch, delay_s=0.0, max_queue=100)
    # as `warm_up` and `calibrate` would find: a model call far cheaper (or dearer) than a thread hop
    b.first_image_s, b.per_image_s, b.hop_s = (1e-5, 1e-6, 1e-4) if cheap else (1e-3, 1e-4, 1e-4)
    return b, metrics


def run_together(b: Batcher, requests: list[np.ndarray]) -> list[np.ndarray | BaseException]:
    """The requests reach the batcher in one turn of the event loop, in order."""
    async def main() -> list[np.ndarray | BaseException]:
        return await asyncio.gather(*(b.infer(x, None) for x in requests), return_exceptions=True)
    return asyncio.run(main())


def test_a_cheap_model_runs_the_first_request_of_a_turn_at_once_and_merges_the_rest() -> None:
    model = Recorder()
    b, metrics = batcher(model, cheap=True)
    assert b.inline_images == 8
    results = run_together(b, [images(1), images(2, 3), images(4), images(5)])
    assert model.calls == [1, 4]
    for result, firsts in zip(results, ([1], [2, 3], [4], [5])):
        assert isinstance(result, np.ndarray) and result[:, 0].tolist() == firsts and result.shape == (len(firsts), 10)
    counts = metrics.model("m")
    assert (counts.inferences, counts.executions) == (5, 2)


def test_a_turn_holding_more_than_max_batch_images_runs_in_several_batches() -> None:
    model = Recorder()
    b, _ = batcher(model, cheap=True, max_batch=3)
    results = run_together(b, [images(0)] + [images(i, i) for i in range(1, 5)])
    assert model.calls == [1, 2, 2, 2, 2]  # after the first: whole requests, at most 3 images a batch
    assert all(isinstance(r, np.ndarray) for r in results)


def test_one_bad_request_fails_alone_when_its_merged_batch_fails() -> None:
    model = Recorder()
    b, metrics = batcher(model, cheap=True)
    results = run_together(b, [images(1), images(2), images(-1), images(3)])
    assert isinstance(results[2], InputError)
    assert [r[0, 0] for i, r in enumerate(results) if i != 2] == [1, 2, 3]
    assert model.calls == [1, 3, 1, 1, 1]  # the merged batch of three failed, then each ran alone
    assert metrics.model("m").executions == 1 + 4


@pytest.mark.parametrize("cheap", [True, False], ids=["cheap", "costly"])
def test_requests_one_after_another_each_run_alone(cheap: bool) -> None:
    model = Recorder()
    b, _ = batcher(model, cheap=cheap)

    async def main() -> list[float]:
        return [float((await b.infer(images(i), None))[0, 0]) for i in range(3)]

    assert asyncio.run(main()) == [0, 1, 2]
    assert model.calls == [1, 1, 1]


def test_a_costly_model_runs_on_the_worker_thread_and_merges_what_queued_meanwhile() -> None:
    model = Recorder()
    b, metrics = batcher(model, cheap=False)
    assert b.inline_images == 0
    results = run_together(b, [images(1), images(2), images(3, 4)])
    assert model.calls == [1, 3]  # the first starts at once; the other two queue while it runs, then merge
    assert [r[:, 0].tolist() for r in results] == [[1], [2], [3, 4]]
    assert sum(metrics.model("m").queue_seconds.counts) == 3  # each request's wait for its batch, once
