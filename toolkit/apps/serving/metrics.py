"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own.

`toolkit_inference_count_total / toolkit_inference_exec_count_total` is the average batch (images per
model execution), as Triton's nv_inference_count / nv_inference_exec_count.

Every update happens on the server's event loop (request handlers, and the batcher's callbacks, which run there
even for batches computed on a worker thread), and so does every scrape. The counts are therefore plain Python
numbers without locks, turned into Prometheus families only when scraped (`_Collector`): about 0.3 µs an update,
where prometheus-client's own metrics, which lock for every thread, took 1-2 µs, 7 to 11 times per request.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

# Seconds: 50 µs (one small model call) to 10 s (a request held by --timeout-ms), about ×2.5 apart.
SECONDS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
UNKNOWN_MODEL = "unknown"  # the model label of requests for no served model (a client's name would grow the labels)


class Histogram:
    """Counts per bucket (upper bounds `buckets`, then +Inf) and the sum of the observed values."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1  # the first bucket whose bound is >= value
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count of values <= le) per bucket, as Prometheus exposes them."""
        out, total = [], 0
        for bound, count in zip([*map(floatToGoString, self.buckets), "+Inf"], self.counts):
            total += count
            out.append((bound, total))
        return out


class ModelMetrics:
    """One model label's counts."""

    def __init__(self, batch_buckets: Sequence[int]) -> None:
        self.statuses: dict[int, int] = {}  # HTTP status -> requests answered with it
        self.inferences = 0  # images run
        self.executions = 0  # model executions
        self.request_seconds = Histogram(SECONDS)
        self.queue_seconds = Histogram(SECONDS)
        self.compute_seconds = Histogram(SECONDS)
        self.batch_size = Histogram(batch_buckets)

    def answered(self, status: int, seconds: float) -> None:
        """One request answered with `status` after `seconds` in the server."""
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.request_seconds.observe(seconds)

    def executed(self, images: int, seconds: float, executions: int = 1) -> None:
        """`executions` model executions (one batch, or its requests one by one) of `images` images in `seconds`."""
        self.inferences += images
        self.executions += executions
        self.compute_seconds.observe(seconds)
        self.batch_size.observe(images)


# name -> (help, ModelMetrics attribute) of the histograms
_HISTOGRAMS = {
    "toolkit_request_seconds": ("Request time in the server, seconds", "request_seconds"),
    "toolkit_queue_seconds": ("Time a request waited for its batch, seconds", "queue_seconds"),
    "toolkit_compute_seconds": ("Model execution time per batch, seconds", "compute_seconds"),
    "toolkit_batch_size": ("Images per model execution", "batch_size"),
}


class Metrics:
    """Every model label's `ModelMetrics`, and the in-flight gauge read from `in_flight` at scrape time."""

    def __init__(self, max_batch: int, in_flight: Callable[[], int] = lambda: 0) -> None:
        self.batch_buckets = sorted({2 ** i for i in range(max_batch.bit_length())} | {max_batch})
        self.in_flight = in_flight
        self._models: dict[str, ModelMetrics] = {}
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))

    def model(self, name: str) -> ModelMetrics:
        if name not in self._models:
            self._models[name] = ModelMetrics(self.batch_buckets)
        return self._models[name]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    """The Prometheus families of a `Metrics`, built when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        models = self.metrics._models.items()
        requests = CounterMetricFamily("toolkit_requests", "Requests by model and HTTP status (infer and classify)",
                                       labels=["model", "status"])
        inferences = CounterMetricFamily("toolkit_inference_count", "Images inferred", labels=["model"])
        executions = CounterMetricFamily("toolkit_inference_exec_count", "Model executions (batches)",
                                         labels=["model"])
        for name, m in models:
            for status, count in sorted(m.statuses.items()):
                requests.add_metric([name, str(status)], count)
            inferences.add_metric([name], m.inferences)
            executions.add_metric([name], m.executions)
        yield from (requests, inferences, executions)
        for family, (help_text, attribute) in _HISTOGRAMS.items():
            histogram = HistogramMetricFamily(family, help_text, labels=["model"])
            for name, m in models:
                h: Histogram = getattr(m, attribute)
                histogram.add_metric([name], h.cumulative(), h.sum)
            yield histogram
        yield GaugeMetricFamily("toolkit_in_flight", "Infer and classify requests being answered",
                                value=self.metrics.in_flight())
