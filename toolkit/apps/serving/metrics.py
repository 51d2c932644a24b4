"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own.

`toolkit_inference_count_total / toolkit_inference_exec_count_total` is the average batch (images per
model execution), as Triton's nv_inference_count / nv_inference_exec_count.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: 50 µs (one small model call) to 10 s (a request held by --timeout-ms), about ×2.5 apart.
SECONDS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
UNKNOWN_MODEL = "unknown"  # the model label of requests for no served model (a client's name would grow the labels)


class Metrics:
    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("toolkit_requests", "Requests by model and HTTP status (infer and classify)",
                                ["model", "status"], registry=r)
        self.inferences = Counter("toolkit_inference_count", "Images inferred", ["model"], registry=r)
        self.executions = Counter("toolkit_inference_exec_count", "Model executions (batches)", ["model"], registry=r)
        self.request_seconds = Histogram("toolkit_request_seconds", "Request time in the server, seconds", ["model"],
                                         buckets=SECONDS, registry=r)
        self.queue_seconds = Histogram("toolkit_queue_seconds", "Time a request waited for its batch, seconds",
                                       ["model"], buckets=SECONDS, registry=r)
        self.compute_seconds = Histogram("toolkit_compute_seconds", "Model execution time per batch, seconds",
                                         ["model"], buckets=SECONDS, registry=r)
        sizes = sorted({2 ** i for i in range(max_batch.bit_length())} | {max_batch})
        self.batch_size = Histogram("toolkit_batch_size", "Images per model execution", ["model"],
                                    buckets=sizes, registry=r)
        self.in_flight = Gauge("toolkit_in_flight", "Infer and classify requests being answered", registry=r)

        self._models: dict[str, ModelMetrics] = {}

    def model(self, name: str) -> ModelMetrics:
        """The metrics of one model label, bound once (`labels()` costs microseconds on every request)."""
        if name not in self._models:
            self._models[name] = ModelMetrics(self, name)
        return self._models[name]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """One model's children of the metrics above."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._requests = metrics.requests
        self._statuses: dict[int, Counter] = {}
        self.model = model
        self.inferences = metrics.inferences.labels(model)
        self.executions = metrics.executions.labels(model)
        self.request_seconds = metrics.request_seconds.labels(model)
        self.queue_seconds = metrics.queue_seconds.labels(model)
        self.compute_seconds = metrics.compute_seconds.labels(model)
        self.batch_size = metrics.batch_size.labels(model)

    def answered(self, status: int, seconds: float) -> None:
        """One request answered with `status` after `seconds` in the server."""
        if status not in self._statuses:
            self._statuses[status] = self._requests.labels(self.model, str(status))
        self._statuses[status].inc()
        self.request_seconds.observe(seconds)

    def executed(self, images: int, seconds: float, executions: int = 1) -> None:
        """`executions` model executions (one batch, or its requests one by one) of `images` images in `seconds`."""
        self.inferences.inc(images)
        self.executions.inc(executions)
        self.compute_seconds.observe(seconds)
        self.batch_size.observe(images)
