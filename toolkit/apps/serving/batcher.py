"""Dynamic batching of one model's requests, adapted to what the model costs.

Each request arrives already checked (`protocol.parse_infer`, `backends.validate_batch`), so a batch can
only fail as a whole for the model's own reasons; a batch that fails on its input (logits that overflow)
is rerun request by request, so a bad request never fails its batch-mates.

Two ways to run a request:
- **inline**, on the event loop, when nothing is queued, a session is idle, no queue delay is set (a delay
  asks for batches) and the model's estimated time for the request (timed at start-up, then kept up to date
  by every execution, so it follows the machine's load) is below the cost of handing work to a thread and
  back (measured at start-up, `calibrate`). For a cheap model (the tutorial net: about 40 µs an image) a thread hop costs more than
  the model, and batching at low load only adds that hop (a plain batcher served 59 % of the HTTP floor's
  requests/s where inline calls served 76 %, on 2 cores).
- **batched**, otherwise: requests queue, and whenever a session (`--instances`) is idle the queue's head is
  merged, whole requests only, up to `max_batch` images, and run on a worker thread (ONNX Runtime releases
  the GIL, so the loop keeps reading requests meanwhile). With `delay_s` > 0 a batch that is not full waits
  until its oldest request is `delay_s` old; with 0 (the default) nothing ever waits while a session is idle:
  batches form only from what queued while the sessions were busy, so batching costs nothing at low load.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from toolkit.apps.serving.metrics import ModelMetrics
from toolkit.apps.serving.protocol import HTTPError
from toolkit.artifacts.backends import Backend
from toolkit.core.errors import InputError

RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait
_TIMINGS = 20  # model calls timed per batch size at start-up; the median is kept
# Weight of each model execution in the running estimate of the model's time (about the last 20 count): the
# estimate follows the machine's load rather than trusting the start-up timing alone.
_LEARN = 0.05


class Overloaded(HTTPError):
    def __init__(self, message: str) -> None:
        super().__init__(503, message, {"retry-after": str(RETRY_AFTER_S)})


@dataclass
class _Item:
    images: np.ndarray
    future: asyncio.Future
    queued_at: float  # time.perf_counter()


@dataclass
class _Outcome:
    """What a worker thread returns for one batch: per request, logits or the error; and its compute time."""

    results: list[np.ndarray | Exception]
    seconds: float
    executions: int = 1  # model executions it took (one per request after a failed merged batch)


class Batcher:
    """One model's queue, its sessions (one per `--instances`) and the decision how to run each request."""

    def __init__(self, model: str, backends: Sequence[Backend], executor: Executor, metrics: ModelMetrics,
                 max_batch: int, delay_s: float, max_queue: int) -> None:
        self.model = model
        self.idle = list(backends)
        self.instances = len(backends)
        self.executor = executor
        self.metrics = metrics
        self.max_batch = max_batch
        self.delay_s = delay_s
        self.max_queue = max_queue
        self.queue: deque[_Item] = deque()
        self.queued_images = 0
        self._timer: asyncio.TimerHandle | None = None
        self.flushing = False  # set by `flush`: batches no longer wait for the queue delay
        # seconds for one image and for each further image (`warm_up`), and for a thread hop (`calibrate`)
        self.first_image_s = self.per_image_s = 0.0
        self.hop_s = 0.0

    def warm_up(self, image_shape: tuple[int, ...]) -> None:
        """Run every session at batch 1 and at `max_batch` (ONNX Runtime sizes its buffers on first use of a
        shape), and time the model at both sizes for the inline decision."""
        timings = {}
        for images in sorted({1, self.max_batch}):
            x = np.zeros((images, *image_shape), np.float32)
            for backend in self.idle:
                backend.predict_logits(x)
            runs = []
            for _ in range(_TIMINGS if images == 1 else max(3, _TIMINGS // 4)):
                start = time.perf_counter()
                self.idle[0].predict_logits(x)
                runs.append(time.perf_counter() - start)
            timings[images] = statistics.median(runs)
        self.first_image_s = timings[1]
        if self.max_batch > 1:
            self.per_image_s = max(0.0, (timings[self.max_batch] - timings[1]) / (self.max_batch - 1))

    async def calibrate(self) -> None:
        """Measure a round trip through the worker threads on the idle loop (median of a few)."""
        loop = asyncio.get_running_loop()
        runs = []
        for _ in range(_TIMINGS):
            start = time.perf_counter()
            await loop.run_in_executor(self.executor, time.perf_counter)
            runs.append(time.perf_counter() - start)
        self.hop_s = statistics.median(runs)

    @property
    def inline_images(self) -> int:
        """The most images a request may hold to run inline (0: every request goes through the queue)."""
        if self.delay_s > 0 or self.first_image_s > self.hop_s:
            return 0
        if self.per_image_s == 0:
            return self.max_batch
        return min(self.max_batch, 1 + int((self.hop_s - self.first_image_s) / self.per_image_s))

    def estimate_s(self, images: int) -> float:
        """The model's time for `images` images: timed at start-up, then updated by every execution (`_observe`)."""
        return self.first_image_s + self.per_image_s * (images - 1)

    def _observe(self, images: int, seconds: float) -> None:
        """Fold one execution's time into the estimate: batch 1 into the first image, larger ones into the rest."""
        if images == 1:
            self.first_image_s += _LEARN * (seconds - self.first_image_s)
        else:
            self.per_image_s += _LEARN * (max(0.0, (seconds - self.first_image_s) / (images - 1)) - self.per_image_s)
        self.metrics.executed(images, seconds)

    async def infer(self, images: np.ndarray, deadline: float | None) -> np.ndarray:
        """Logits for a checked N×3×32×32 float32 batch (N <= max_batch), by `deadline` (perf_counter seconds)."""
        if not self.queue and self.idle and self.delay_s == 0 and self.estimate_s(len(images)) <= self.hop_s:
            return self._inline(images)
        if len(self.queue) >= self.max_queue:
            raise Overloaded(f"model '{self.model}': {len(self.queue)} requests queued (--max-queue "
                             f"{self.max_queue}); retry later")
        item = _Item(images, asyncio.get_running_loop().create_future(), time.perf_counter())
        self.queue.append(item)
        self.queued_images += len(images)
        self._pump()
        if deadline is None:
            return await item.future
        try:
            return await asyncio.wait_for(item.future, max(0.0, deadline - time.perf_counter()))
        except TimeoutError:  # wait_for cancelled the future: a batch not yet formed skips it
            raise HTTPError(504, f"model '{self.model}': no result within --timeout-ms") from None

    def _inline(self, images: np.ndarray) -> np.ndarray:
        backend = self.idle.pop()
        try:
            start = time.perf_counter()
            logits = backend.predict_logits(images)
            self.metrics.queue_seconds.observe(0.0)
            self._observe(len(images), time.perf_counter() - start)
            return logits
        finally:
            self.idle.append(backend)

    def _pump(self) -> None:
        """Start batches while a session is idle and requests wait."""
        while self.idle and self.queue:
            while self.queue and self.queue[0].future.done():  # timed out or abandoned before its batch
                self.queued_images -= len(self.queue.popleft().images)
            if not self.queue:
                return
            if self.delay_s > 0 and not self.flushing and self.queued_images < self.max_batch:
                due = self.queue[0].queued_at + self.delay_s
                if time.perf_counter() < due:
                    if self._timer is None:
                        loop = asyncio.get_running_loop()
                        self._timer = loop.call_at(loop.time() + due - time.perf_counter(), self._on_timer)
                    return
            batch, images = [], 0
            while self.queue and images + len(self.queue[0].images) <= self.max_batch:
                item = self.queue.popleft()
                self.queued_images -= len(item.images)
                if not item.future.done():
                    batch.append(item)
                    images += len(item.images)
            if batch:
                self._start(batch)

    def flush(self) -> None:
        """Start what waits now and never wait for the queue delay again: no more requests will come (drain)."""
        self.flushing = True
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _start(self, batch: list[_Item]) -> None:
        backend = self.idle.pop()
        now = time.perf_counter()
        for item in batch:
            self.metrics.queue_seconds.observe(now - item.queued_at)
        inputs = [item.images for item in batch]
        running = asyncio.get_running_loop().run_in_executor(self.executor, _compute, backend, inputs)
        running.add_done_callback(lambda done: self._finish(backend, batch, done))

    def _finish(self, backend: Backend, batch: list[_Item], done: asyncio.Future) -> None:
        self.idle.append(backend)
        try:
            outcome: _Outcome = done.result()
        except Exception as exc:  # noqa: BLE001 - the model's own failure: every request of the batch gets it
            outcome = _Outcome([exc] * len(batch), 0.0)
        else:
            images = sum(len(item.images) for item in batch)
            if outcome.executions == 1:
                self._observe(images, outcome.seconds)
            else:  # a failed merged batch and its reruns: no clean timing
                self.metrics.executed(images, outcome.seconds, outcome.executions)
        for item, result in zip(batch, outcome.results):
            if item.future.done():  # timed out while it ran
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        self._pump()


def _compute(backend: Backend, inputs: list[np.ndarray]) -> _Outcome:
    """On a worker thread: one model execution for the whole batch, its logits split back per request.

    If the merged batch fails on its input (`InputError`: values so large the model overflows), each request
    runs alone, so only the one that caused it gets the error."""
    start = time.perf_counter()
    x = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
    try:
        logits = backend.predict_logits(x)
    except InputError as exc:
        if len(inputs) == 1:
            return _Outcome([exc], time.perf_counter() - start)
        results: list[np.ndarray | Exception] = []
        for images in inputs:
            try:
                results.append(backend.predict_logits(images))
            except InputError as one:
                results.append(one)
        return _Outcome(results, time.perf_counter() - start, executions=1 + len(inputs))
    seconds = time.perf_counter() - start
    if len(inputs) == 1:
        return _Outcome([logits], seconds)
    splits = np.cumsum([len(images) for images in inputs])[:-1]
    return _Outcome(list(np.split(logits, splits)), seconds)
