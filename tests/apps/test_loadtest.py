"""`toolkit loadtest` against the no-op baseline server (benchmarks/serving_baselines.py) on 127.0.0.1: the JSON
it writes, that its counts add up, the errors it counts when the server stops answering or dies, and the
one-line errors for a bad URL, a server that is down and an unknown model. Every run lasts a second or two."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from benchmarks.serving_baselines import Served, serving_process
from tests.helpers import ROOT, assert_clean_error, cli, free_port
from toolkit.apps.loadtest import (EXEC_COUNT, INFERENCE_COUNT, LoadtestConfig, LoadtestResult, parse_counts,
                                   run_loadtest)
from toolkit.core.errors import ConfigError

NOOP = [sys.executable, "-m", "benchmarks.serving_baselines", "noop", "--host", "127.0.0.1", "--port", "0"]


@pytest.fixture(scope="module")
def noop() -> Iterator[Served]:
    with serving_process(NOOP, cwd=ROOT) as served:
        yield served


def assert_counts_add_up(result: LoadtestResult) -> None:
    for level in result.levels:
        assert level.requests == level.ok + sum(level.errors.values()), level
        assert level.infer_per_s == pytest.approx(level.ok / level.seconds)
        assert level.images_per_s == pytest.approx(level.ok * result.batch / level.seconds)
        if level.ok:
            p = level.latency_ms
            assert 0 < p["p50"] <= p["p90"] <= p["p99"] <= p["max"], p


def test_sweep_writes_json(noop: Served, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "loadtest.json"
    proc = cli(capsys, "loadtest", noop.url, "--model", "noop", "--concurrency", "1,4", "--duration", "1",
               "--warmup", "0.2", "--json", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {k: data[k] for k in ("url", "model", "batch", "body", "input_dtype")} == \
        {"url": noop.url, "model": "noop", "batch": 1, "body": "binary", "input_dtype": "fp32"}
    assert [level["concurrency"] for level in data["levels"]] == [1, 4]
    for level in data["levels"]:
        assert set(level) == {"concurrency", "seconds", "requests", "ok", "errors", "infer_per_s", "images_per_s",
                              "latency_ms", "server_avg_batch", "client_cpu_us_per_request"}
        assert level["ok"] > 0 and level["errors"] == {} and level["requests"] == level["ok"]
        assert set(level["latency_ms"]) == {"p50", "p90", "p99", "mean", "max"}
        assert level["server_avg_batch"] is None  # the no-op server exports no /metrics
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "4"] and all(row[-1] == "none" for row in rows), proc.stdout


def test_json_uint8_batches(noop: Served) -> None:
    result = run_loadtest(LoadtestConfig(noop.url, "noop", concurrency=(2,), duration_s=1, warmup_s=0.2, batch=3,
                                         json_body=True, input_dtype="uint8"))
    level = result.levels[0]
    assert (result.body, result.input_dtype, level.errors) == ("json", "uint8", {})
    assert level.ok > 0 and level.images_per_s == pytest.approx(3 * level.infer_per_s)
    assert_counts_add_up(result)


def _after_start(action, delay: float):
    """A `log` callback that runs `action` `delay` seconds after the sweep's checks passed (its first line)."""
    timers: list[threading.Timer] = []

    def log(line: str) -> None:
        if not timers:
            timers.append(threading.Timer(delay, action))
            timers[0].start()

    return log, timers


def test_unanswered_requests_count_as_timeouts(noop: Served) -> None:
    """A server that stops answering (SIGSTOP) for 2 s: its requests end as `timeout` after 1 s each."""
    def pause() -> None:
        os.kill(noop.process.pid, signal.SIGSTOP)
        threading.Timer(2.0, os.kill, (noop.process.pid, signal.SIGCONT)).start()

    log, timers = _after_start(pause, 0.5)
    result = run_loadtest(LoadtestConfig(noop.url, "noop", concurrency=(2,), duration_s=3, warmup_s=0.2,
                                         timeout_s=1.0), log=log)
    timers[0].join()
    assert result.levels[0].errors.get("timeout", 0) >= 2, result.levels[0]
    assert_counts_add_up(result)


def test_server_dying_mid_run_counts_connection_errors() -> None:
    with serving_process(NOOP, cwd=ROOT) as served:
        log, timers = _after_start(served.process.kill, 0.5)
        result = run_loadtest(LoadtestConfig(served.url, "noop", concurrency=(3,), duration_s=1.5, warmup_s=0.1,
                                             timeout_s=2), log=log)
    level = result.levels[0]
    assert level.ok > 0 and level.errors.get("connection", 0) > 0, level
    assert_counts_add_up(result)


def test_parse_counts_reads_prometheus_text() -> None:
    registry = CollectorRegistry()
    images = Counter(INFERENCE_COUNT.removesuffix("_total"), "images", ["model"], registry=registry)
    runs = Counter(EXEC_COUNT.removesuffix("_total"), "executions", ["model"], registry=registry)
    images.labels("a-onnx").inc(96)
    runs.labels("a-onnx").inc(4)
    images.labels("b-onnx").inc(7)
    text = generate_latest(registry).decode()
    assert parse_counts(text, "a-onnx") == (96.0, 4.0)
    assert parse_counts(text, "b-onnx") is None  # no execution count: no average batch
    assert parse_counts(text, "c-onnx") is None


def test_server_down_is_one_line(capsys: pytest.CaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there any more
    assert_clean_error(cli(capsys, "loadtest", url, "--model", "m", "--duration", "1"), url, "cannot reach the server")


def test_unknown_model_is_one_line(noop: Served, capsys: pytest.CaptureFixture) -> None:
    assert_clean_error(cli(capsys, "loadtest", noop.url, "--model", "nope"), "model 'nope'", "404")


@pytest.mark.parametrize("args,fragment", [
    (["ftp://127.0.0.1:1", "--model", "m"], "URL 'ftp://127.0.0.1:1'"),
    (["http://127.0.0.1:70000", "--model", "m"], "the port"),
    (["http://127.0.0.1:1", "--model", "m", "--concurrency", "1,x"], "--concurrency '1,x'"),
    (["http://127.0.0.1:1", "--model", "m", "--concurrency", "0"], "--concurrency 0"),
    (["http://127.0.0.1:1", "--model", "m", "--batch", "0"], "--batch 0"),
    (["http://127.0.0.1:1", "--model", "m", "--input-dtype", "fp16"], "--input-dtype 'fp16'"),
    (["http://127.0.0.1:1", "--model", "m", "--duration", "0"], "--duration 0.0"),
])
def test_bad_flags_are_one_line(capsys: pytest.CaptureFixture, args: list[str], fragment: str) -> None:
    assert_clean_error(cli(capsys, "loadtest", *args), fragment)


def test_config_is_validated_in_the_library() -> None:
    with pytest.raises(ConfigError, match="--concurrency"):
        LoadtestConfig("http://127.0.0.1:1", "m", concurrency=())
