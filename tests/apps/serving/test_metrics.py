"""The server's metrics: plain counts on the event loop, exposed as Prometheus families when scraped."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from toolkit.apps.serving.metrics import Histogram, Metrics


def test_a_value_on_a_bucket_bound_counts_in_that_bucket_and_buckets_are_cumulative() -> None:
    h = Histogram((1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 2.0, 7.0):
        h.observe(value)
    assert h.cumulative() == [("1.0", 2), ("2.0", 4), ("+Inf", 5)]
    assert h.sum == 12.0


def test_exposition_has_every_family_per_model_and_reads_in_flight_when_scraped() -> None:
    in_flight = [0]
    metrics = Metrics(max_batch=6, in_flight=lambda: in_flight[0])
    a = metrics.model("a")
    a.answered(200, 0.002)
    a.answered(200, 0.001)
    a.answered(400, 0.0001)
    a.executed(5, 0.0003)
    a.executed(3, 0.0004, executions=4)  # a failed merged batch rerun request by request
    a.queue_seconds.observe(0.0)
    metrics.model("b")
    in_flight[0] = 2
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.exposition().decode())
               for s in family.samples}
    assert samples[("toolkit_requests_total", (("model", "a"), ("status", "200")))] == 2
    assert samples[("toolkit_requests_total", (("model", "a"), ("status", "400")))] == 1
    assert samples[("toolkit_inference_count_total", (("model", "a"),))] == 8
    assert samples[("toolkit_inference_exec_count_total", (("model", "a"),))] == 5
    assert samples[("toolkit_inference_count_total", (("model", "b"),))] == 0
    assert samples[("toolkit_batch_size_bucket", (("le", "4.0"), ("model", "a")))] == 1  # buckets 1, 2, 4, 6
    assert samples[("toolkit_batch_size_bucket", (("le", "6.0"), ("model", "a")))] == 2
    assert samples[("toolkit_request_seconds_count", (("model", "a"),))] == 3
    assert samples[("toolkit_queue_seconds_count", (("model", "a"),))] == 1
    assert samples[("toolkit_compute_seconds_sum", (("model", "a"),))] == 0.0007
    assert samples[("toolkit_in_flight", ())] == 2
