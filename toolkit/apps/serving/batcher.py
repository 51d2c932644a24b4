"""Dynamic batching of one model's requests, adapted to what the model costs.

Each request arrives already checked (`protocol.parse_infer`, `backends.validate_batch`), so a batch can
only fail as a whole for the model's own reasons; a batch that fails on its input (logits that overflow)
is rerun request by request, so a bad request never fails its batch-mates.

Two ways to run a request, chosen by its size against the model's cost, timed once at start-up
(`warm_up`: the model at 1 and at `max_batch` images; `calibrate`: a round trip through a worker thread):
- **on the event loop, merged per loop turn**, when the request's images take the model less time than
  handing them to a thread and back, and no queue delay is set (a delay asks for batches). The requests that
  reach the batcher in one turn of the event loop (those whose bodies arrived together) run as one model
  execution at the end of that turn (`loop.call_soon`): no thread hop, no wait (the next turn starts at once),
  and under load the merged batch costs the model far less than its requests one by one. For a cheap model
  (the tutorial net: 30-40 µs an image on one thread) a thread hop costs more than the model: a plain
  batcher served 59 % of the HTTP floor's requests/s where one inline call per request served 76 %, on 2 cores.
- **queued for a worker thread**, otherwise: whenever a session (`--instances`) is idle the queue's head is
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
    """What `_compute` returns for one batch: per request, logits or the error; and its compute time."""

    results: list[np.ndarray | Exception]
    seconds: float
    executions: int = 1  # model executions it took (one per request after a failed merged batch; 0: it failed)


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
        self.turn_open = False  # a request reached the batcher in this loop turn (`_end_turn` is due)
        self.turn: list[_Item] = []  # requests to run on the loop at the end of this turn
        self.turn_images = 0
        # seconds for one image and for each further image (`warm_up`), and for a thread hop (`calibrate`)
        self.first_image_s = self.per_image_s = 0.0
        self.hop_s = 0.0

    def warm_up(self, image_shape: tuple[int, ...]) -> None:
        """Run every session at batch 1 and at `max_batch` (ONNX Runtime sizes its buffers on first use of a
        shape), and time the model at both sizes for the choice between the loop and a thread."""
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
        """The most images a request may hold to run on the event loop (0: every request goes to a thread)."""
        if self.delay_s > 0 or self.first_image_s > self.hop_s:
            return 0
        if self.per_image_s == 0:
            return self.max_batch
        return min(self.max_batch, 1 + int((self.hop_s - self.first_image_s) / self.per_image_s))

    async def infer(self, images: np.ndarray, deadline: float | None) -> np.ndarray:
        """Logits for a checked N×3×32×32 float32 batch (N <= max_batch), by `deadline` (perf_counter seconds)."""
        loop = asyncio.get_running_loop()
        on_loop = len(images) <= self.inline_images
        if on_loop and not self.turn_open:
            # the turn's first request runs at once; those after it in the same turn, merged at its end
            self.turn_open = True
            loop.call_soon(self._end_turn)
            if self.idle:
                return self._run_now(images)
        item = _Item(images, loop.create_future(), time.perf_counter())
        if on_loop:
            if self.turn_images + len(images) > self.max_batch:
                self._run_turn()  # full: run what this turn holds now, and gather again
            self.turn.append(item)
            self.turn_images += len(images)
            return await item.future  # answered at the end of this turn: no deadline can pass meanwhile
        if len(self.queue) >= self.max_queue:
            raise Overloaded(f"model '{self.model}': {len(self.queue)} requests queued (--max-queue "
                             f"{self.max_queue}); retry later")
        self._enqueue([item])
        if deadline is None:
            return await item.future
        try:
            return await asyncio.wait_for(item.future, max(0.0, deadline - time.perf_counter()))
        except TimeoutError:  # wait_for cancelled the future: a batch not yet formed skips it
            raise HTTPError(504, f"model '{self.model}': no result within --timeout-ms") from None

    def _enqueue(self, items: list[_Item]) -> None:
        self.queue.extend(items)
        self.queued_images += sum(len(item.images) for item in items)
        self._pump()

    def _run_now(self, images: np.ndarray) -> np.ndarray:
        """One request on the loop, at once (no future, no wait)."""
        self.metrics.queue_seconds.observe(0.0)
        outcome = self._on_loop([images])
        self._count(outcome, len(images))
        if isinstance(outcome.results[0], Exception):
            raise outcome.results[0]
        return outcome.results[0]

    def _end_turn(self) -> None:
        self.turn_open = False
        self._run_turn()

    def _run_turn(self) -> None:
        """Run the requests gathered in this loop turn as one execution on the loop, or queue them for a thread
        when every session is busy."""
        batch, self.turn, self.turn_images = self.turn, [], 0
        if not batch:
            return
        if not self.idle:
            self._enqueue(batch)
            return
        self._waited(batch)
        self._answer(batch, self._on_loop([item.images for item in batch]))

    def _on_loop(self, inputs: list[np.ndarray]) -> _Outcome:
        backend = self.idle.pop()
        outcome = _compute(backend, inputs)
        self.idle.append(backend)
        return outcome

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

    def _waited(self, batch: list[_Item]) -> None:
        """The requests of `batch` stop waiting now."""
        now = time.perf_counter()
        for item in batch:
            self.metrics.queue_seconds.observe(now - item.queued_at)

    def _start(self, batch: list[_Item]) -> None:
        self._waited(batch)
        backend = self.idle.pop()
        inputs = [item.images for item in batch]
        running = asyncio.get_running_loop().run_in_executor(self.executor, _compute, backend, inputs)
        running.add_done_callback(lambda done: self._finish(backend, batch, done.result()))

    def _finish(self, backend: Backend, batch: list[_Item], outcome: _Outcome) -> None:
        self.idle.append(backend)
        self._answer(batch, outcome)
        self._pump()

    def _count(self, outcome: _Outcome, images: int) -> None:
        if outcome.executions:
            self.metrics.executed(images, outcome.seconds, outcome.executions)

    def _answer(self, batch: list[_Item], outcome: _Outcome) -> None:
        """Count the execution(s) and hand each request its logits or its error."""
        self._count(outcome, sum(len(item.images) for item in batch))
        for item, result in zip(batch, outcome.results):
            if item.future.done():  # timed out while it ran
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)


def _compute(backend: Backend, inputs: list[np.ndarray]) -> _Outcome:
    """On the loop or a worker thread: one model execution for the whole batch, its logits split back per
    request; never raises.

    If the merged batch fails on its input (`InputError`: values so large the model overflows), each request
    runs alone, so only the one that caused it gets the error. Any other failure is the model's own: every
    request of the batch gets it."""
    start = time.perf_counter()
    x = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
    try:
        logits = backend.predict_logits(x)
    except Exception as exc:  # noqa: BLE001 - answered to each request, never lost on the loop or a thread
        if not isinstance(exc, InputError):
            return _Outcome([exc] * len(inputs), time.perf_counter() - start, executions=0)
        if len(inputs) == 1:
            return _Outcome([exc], time.perf_counter() - start)
        results: list[np.ndarray | Exception] = []
        for images in inputs:
            try:
                results.append(backend.predict_logits(images))
            except Exception as one:  # noqa: BLE001 - this request's own error
                results.append(one)
        return _Outcome(results, time.perf_counter() - start, executions=1 + len(inputs))
    seconds = time.perf_counter() - start
    if len(inputs) == 1:
        return _Outcome([logits], seconds)
    splits = np.cumsum([len(images) for images in inputs])[:-1]
    return _Outcome(list(np.split(logits, splits)), seconds)
