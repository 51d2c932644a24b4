"""`python -m benchmarks.report` on a small hand-written pytest-benchmark JSON: table numbers, --json rows,
the PNG chart, the default (newest) file, clean errors, and rows grouped by model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, assert_clean_error, assert_ok
from benchmarks.report import (BenchReportError, bench_report, load_other_rows, load_rows, load_serving_rows,
                               newest_results, plot, render_markdown)


def report_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m benchmarks.report ARGS` from the repository root, as `make bench` runs it."""
    return subprocess.run([sys.executable, "-m", "benchmarks.report", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _bench(name: str, median_s: float, **extra) -> dict:
    """One benchmark entry as pytest-benchmark writes it (only the fields the report reads, plus a few)."""
    return {"group": None, "name": name, "fullname": f"benchmarks/x.py::{name}", "params": {}, "param": None,
            "extra_info": extra, "options": {"timer": "perf_counter"},
            "stats": {"min": median_s * 0.9, "max": median_s * 1.2, "mean": median_s, "stddev": 0.0,
                      "rounds": 5, "median": median_s, "iqr": 0.0, "q1": median_s, "q3": median_s,
                      "iqr_outliers": 0, "stddev_outliers": 0, "outliers": "0;0", "ld15iqr": median_s,
                      "hd15iqr": median_s, "ops": 1 / median_s, "total": 5 * median_s, "iterations": 1}}


def _inference(backend: str, batch: int, threads, median_s: float, **extra) -> dict:
    return _bench(f"test_inference[{extra.get('model', '')}{backend}-t{threads}-b{batch}]", median_s,
                  kind="inference", backend=backend, batch=batch, threads=threads, **extra)


RESULTS = {
    "machine_info": {"machine": "x86_64", "python_version": "3.11.7",
                     "cpu": {"brand_raw": "Test CPU @ 2.50GHz", "count": 2},
                     "toolkit_bench": {"versions": {"torch": "2.x", "onnxruntime": "1.x"}, "threads_all": 2}},
    "commit_info": {"id": "0123456789abcdef"},
    "datetime": "2026-01-02T03:04:05.000000+00:00",
    "version": "5.3.0",
    "benchmarks": [
        _inference("onnx", 1, 1, 0.00005),  # out of order on purpose: the report sorts
        _inference("eager", 1, 1, 0.0004),
        _inference("eager", 1, 2, 0.0005),
        _inference("onnx", 1, "default", 0.00008),
        _inference("eager", 1024, 1, 0.100),
        _inference("onnx", 1024, 1, 0.040),
        _bench("test_epoch[fast-fp32]", 2.0, kind="epoch", label="epoch fast fp32 batch 64", path="fast",
               precision="fp32", images=10000, images_per_s=5000.0, share_of_matmul_peak=0.25, threads=2),
        _bench("test_epoch[pil-fp32]", 8.0, kind="epoch", label="epoch pil fp32 batch 64", path="pil",
               precision="fp32", images=10000, images_per_s=1250.0, share_of_matmul_peak=0.0625, threads=2),
        _bench("test_time_to_accuracy[fast]", 90.0, kind="time_to_accuracy", label="toolkit train --recipe fast",
               recipe="fast", epochs=3, batch=64, train_seconds=30.0, final_val_accuracy=0.66,
               curve=[[1, 10.0, 0.45], [2, 20.0, 0.58], [3, 30.0, 0.66]], time_to_accuracy={"0.50": 20.0}),
        _bench("test_time_to_accuracy[seed]", 60.0, kind="time_to_accuracy", label="toolkit train --recipe seed",
               recipe="seed", epochs=2, batch=4, train_seconds=50.0, final_val_accuracy=0.55,
               curve=[[1, 25.0, 0.47], [2, 50.0, 0.55]], time_to_accuracy={"0.50": 50.0}),
        _bench("test_export[onnx]", 1.5, kind="export", label="export onnx", file="model.onnx", bytes=256000),
        # A benchmark without the suite's extra_info is ignored.
        _bench("test_something_else", 0.01),
    ],
}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    path = tmp_path / "20260102-030405.json"
    path.write_text(json.dumps(RESULTS))
    return path


def test_rows_and_speedups(results: Path) -> None:
    rows = load_rows([results])
    assert [(r["backend"], r["batch"], r["threads"]) for r in rows] == [
        ("eager", 1, 1), ("eager", 1, 2), ("onnx", 1, 1), ("onnx", 1, "default"),
        ("eager", 1024, 1), ("onnx", 1024, 1)]
    by = {(r["backend"], r["batch"], r["threads"]): r for r in rows}
    assert all(set(r) == {"model", "backend", "batch", "threads", "median_ms", "images_per_s", "speedup_vs_eager",
                          "weights"} for r in rows)
    assert {(r["model"], r["weights"]) for r in rows} == {("tutorial", None)}  # rows that name no model
    assert by[("eager", 1, 1)]["speedup_vs_eager"] == pytest.approx(1.0)
    assert by[("onnx", 1, 1)]["median_ms"] == pytest.approx(0.05)
    assert by[("onnx", 1, 1)]["images_per_s"] == pytest.approx(20000)
    assert by[("onnx", 1, 1)]["speedup_vs_eager"] == pytest.approx(8.0)  # 0.4 ms / 0.05 ms, same threads
    # ORT's default threads are compared with eager at the most threads (2): 0.5 / 0.08.
    assert by[("onnx", 1, "default")]["speedup_vs_eager"] == pytest.approx(6.25)
    assert by[("onnx", 1024, 1)]["images_per_s"] == pytest.approx(25600)
    assert by[("onnx", 1024, 1)]["speedup_vs_eager"] == pytest.approx(2.5)


def test_markdown_tables_and_targets(results: Path) -> None:
    text = render_markdown(load_rows([results]), load_other_rows([results]), "Test CPU")
    lines = text.splitlines()
    assert lines[0] == "Machine: Test CPU"
    assert "| backend | threads | batch | median ms / batch | images/s | speed-up vs eager |" in lines
    assert "| onnx | 1 | 1 | 0.05 | 20,000 | 8.00× |" in lines
    assert "| onnx | default | 1 | 0.08 | 12,500 | 6.25× |" in lines
    assert "| eager | 1 | 1024 | 100 | 10,240 | 1.00× |" in lines
    assert "| onnx | 1 | 1024 | 40 | 25,600 | 2.50× |" in lines
    # Second table: training, time-to-accuracy and export rows, in the suite's order.
    assert any(l.startswith("| epoch fast fp32 batch 64 | 2 | 2 | 5,000 | 25.0 % |") for l in lines)
    assert any(l.startswith("| epoch pil fp32 batch 64 | 2 | 8 | 1,250 | 6.2 % |") for l in lines)
    assert any(l.startswith("| export onnx | – | 1.5 | – | – | model.onnx, 250 KiB") for l in lines)
    assert "final val acc 66.0 % after 30 s training (3 epochs, batch 64); 50 % at 20 s" in text
    assert "test_something_else" not in text
    # Targets: every comparable row must meet a target for it to count as met.
    assert "- ONNX Runtime batch-1 latency vs eager ≥ 6×: 8.00× (threads 1), 6.25× (threads default) — **met**" in text
    assert "- ONNX Runtime batch-1024 throughput vs eager ≥ 3×: 2.50× (threads 1) — **not met**" in text
    assert "images/s, same batch) ≥ 5×: 4.00× (fp32) — **not met**" in text
    assert "seed recipe's final val accuracy (55.0 %): recipe fast 20 s, recipe seed 50 s of training" in text


def test_cli_json_rows_and_png(results: Path, tmp_path: Path) -> None:
    png = tmp_path / "chart.png"
    proc = report_cli(str(results), "--json", "--png", str(png))
    assert_ok(proc)
    rows = json.loads(proc.stdout)
    assert rows[2] == {"model": "tutorial", "backend": "onnx", "batch": 1, "threads": 1,
                       "median_ms": pytest.approx(0.05), "images_per_s": pytest.approx(20000),
                       "speedup_vs_eager": pytest.approx(8.0), "weights": None}
    assert [r["speedup_vs_eager"] for r in rows] == pytest.approx([1.0, 1.0, 8.0, 6.25, 1.0, 2.5])
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
        assert im.size[0] > 300 and im.size[1] > 100


def test_markdown_default_writes_the_chart_beside_the_file(results: Path) -> None:
    printed: list[str] = []
    bench_report([results], out=printed.append, log=lambda line: None)
    assert "| onnx | 1 | 1 | 0.05 | 20,000 | 8.00× |" in printed[0]
    assert printed[0].startswith("Machine: Test CPU @ 2.50GHz; 2 logical CPUs; torch 2.x, onnxruntime 1.x")
    assert results.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_default_is_the_newest_results_file(tmp_path: Path, results: Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    old, new = folder / "old.json", folder / "new.json"
    old.write_text(json.dumps({**RESULTS, "benchmarks": RESULTS["benchmarks"][:2]}))
    new.write_text(results.read_text())
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert newest_results(folder) == new
    rows = bench_report([], as_json=True, results_dir=folder, out=lambda s: None, log=lambda s: None)
    assert len(rows) == 6
    with pytest.raises(BenchReportError, match="no benchmark results in"):
        newest_results(tmp_path / "empty")


def test_several_files_name_their_rows(results: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**RESULTS, "benchmarks": RESULTS["benchmarks"][:2]}))
    rows = load_rows([results, other])
    assert len(rows) == 8 and {r["file"] for r in rows} == {str(results), str(other)}
    assert rows[-1]["speedup_vs_eager"] == pytest.approx(8.0)  # within its own file


def test_missing_and_unreadable_files_are_clean_errors(tmp_path: Path) -> None:
    assert_clean_error(report_cli("missing.json"), "missing.json", "no such file")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_clean_error(report_cli(str(bad)), "bad.json", "not a readable JSON file")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"something": 1}))
    with pytest.raises(BenchReportError, match="not a pytest-benchmark results file"):
        load_rows([other])
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**RESULTS, "benchmarks": [_bench("test_x", 0.1)]}))
    with pytest.raises(BenchReportError, match="no benchmark of this suite"):
        bench_report([empty], out=lambda s: None)


def test_reduced_precision_and_session_rows(tmp_path: Path) -> None:
    """fp16/int8 rows get their own target lines; the raw-session row gives the interface's overhead at batch 1."""
    data = {**RESULTS, "benchmarks": [
        _inference("eager", 1, 1, 0.0004), _inference("eager", 1024, 1, 0.100),
        _inference("onnx", 1, 1, 0.000042), _inference("onnx-session", 1, 1, 0.00004),
        _inference("onnx-int8", 1, 1, 0.00005), _inference("onnx-int8", 1024, 1, 0.030),
        _inference("onnx-int8-cuda-device", 1024, "gpu", 0.001)]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    rows = load_rows([path])
    assert [r["backend"] for r in rows if r["batch"] == 1] == ["eager", "onnx", "onnx-session", "onnx-int8"]
    text = render_markdown(rows, load_other_rows([path]))
    assert "- ONNX Runtime batch-1 latency vs eager ≥ 6×: 9.52× (threads 1) — **met**" in text
    assert "  - for comparison, onnx-int8: 8.00× (threads 1)" in text
    assert "  - for comparison, onnx-int8: 3.33× (threads 1)" in text  # batch 1024, no onnx row: no target line
    assert ("- ONNX Runtime interface overhead at batch 1 (`predict_logits` vs `InferenceSession.run`) ≤ 10 %: "
            "5.0 % (threads 1) — **met**") in text
    assert "| onnx-int8-cuda-device | gpu | 1024 | 1 | 1,024,000 | 100.00× |" in text
    plot(rows, tmp_path / "chart.png")


def test_interface_overhead_measured_in_alternating_rounds_wins(tmp_path: Path) -> None:
    """A raw-session row that carries the alternating-rounds measurement decides the overhead target."""
    session = _inference("onnx-session", 1, 1, 0.00004)
    session["extra_info"].update(interleaved_session_ms=0.040, interleaved_predict_logits_ms=0.0436,
                                 interface_overhead=0.09)
    data = {**RESULTS, "benchmarks": [_inference("eager", 1, 1, 0.0004), _inference("onnx", 1, 1, 0.00005), session]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    rows, other = load_rows([path]), load_other_rows([path])
    assert [r["backend"] for r in rows] == ["eager", "onnx", "onnx-session"]  # the row itself stays
    text = render_markdown(rows, other)
    assert ("- ONNX Runtime interface overhead at batch 1 (`predict_logits` vs `InferenceSession.run`) ≤ 10 %: "
            "9.0 % (threads 1) — **met**") in text  # not the rows' 25 %
    assert "43.6 µs vs 40.0 µs raw (+9.0 %), alternating rounds" in text


def _serving(batch: int, rounds: dict[str, list[tuple[int, float, float | None]]],
             in_process: list[tuple[float, float]] | None = None) -> dict:
    """A serving benchmark as benchmarks/test_serving.py records it: per server, (concurrency, requests/s, server
    batch) per round; and (images/s, median call ms) of the model in-process after each round."""
    def level(c: int, rate: float, avg: float | None) -> dict:
        return {"concurrency": c, "infer_per_s": rate, "images_per_s": rate * batch, "server_avg_batch": avg,
                "latency_ms": {"p50": 1000 * c / rate, "p90": None, "p99": 3000 * c / rate, "mean": None, "max": None},
                "errors": {"503": 2} if avg else {}}

    return _bench(f"test_serving[b{batch}]", 20.0, kind="serving", batch=batch, floor="noop",
                  servers={name: [level(*r) for r in levels] for name, levels in rounds.items()},
                  **({} if in_process is None else
                     {"in_process": [{"images_per_s": rate, "p50_ms": ms} for rate, ms in in_process]}))


def test_serving_table_shares_and_targets(tmp_path: Path) -> None:
    data = {**RESULTS, "benchmarks": [
        # concurrency 1, then three rounds at 32: shares of the floor 0.9, 1.0, 0.8 for serve, 0.8 for naive
        _serving(1, {"noop": [(1, 5000.0, None), (32, 8000.0, None), (32, 6000.0, None), (32, 10000.0, None)],
                     "naive": [(1, 3600.0, None), (32, 6400.0, None), (32, 4800.0, None), (32, 8000.0, None)],
                     "serve": [(1, 3000.0, 1.0), (32, 7200.0, 2.5), (32, 6000.0, 2.0), (32, 8000.0, 3.0)]},
                 in_process=[(20000.0, 0.05), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)]),
        # two rounds: serve 25,600 and 32,000 images/s against 64,000 and 51,200 in-process: 40 % and 62.5 %
        _serving(64, {"noop": [(4, 1000.0, None), (4, 1000.0, None)], "naive": [(4, 400.0, None), (4, 250.0, None)],
                      "serve": [(4, 400.0, None), (4, 500.0, None)]},
                 in_process=[(64000.0, 1.0), (51200.0, 1.25)])]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    rows = load_serving_rows([path])
    assert [(r["server"], r["batch"], r["concurrency"]) for r in rows] == [
        ("naive", 1, 1), ("serve", 1, 1), ("naive", 1, 32), ("serve", 1, 32), ("naive", 64, 4), ("serve", 64, 4)]
    by = {(r["server"], r["batch"], r["concurrency"]): r for r in rows}
    assert by[("serve", 1, 32)]["rounds"] == 3 and by[("serve", 1, 32)]["share_of_floor"] == pytest.approx(0.9)
    assert by[("serve", 1, 32)]["vs_naive"] == pytest.approx(1.125)  # 7200/6400, 6000/4800, 8000/8000
    assert by[("naive", 64, 4)]["share_of_floor"] == pytest.approx((0.4 + 0.25) / 2)
    assert by[("naive", 64, 4)]["vs_naive"] is None
    assert load_other_rows([path]) == []  # serving rows only in their own table
    text = render_markdown([], [], serving=rows)
    assert "| serve | 1 | 32 | 7,200 | 7,200 | 4.44 | 13.3 | 8,000 | 90.0 % | 1.12× | 2.5 | 503: 6 |" in text  # medians
    assert "| naive | 64 | 4 | 325 | 20,800 | 13 | 39 | 1,000 | 32.5 % | – | – | none |" in text
    assert ("- toolkit serve, single-image requests, concurrency 32: ≥ 70 % of the no-op server's requests/s: "
            "90.0 % — **met**") in text
    assert ("- toolkit serve, single-image requests: ≥ the naive inline server's requests/s at every concurrency "
            "(median of the rounds' ratios): 0.83× (concurrency 1), 1.12× (concurrency 32) — **not met**") in text
    assert by[("serve", 64, 4)]["share_of_in_process"] == pytest.approx((0.4 + 0.625) / 2)
    assert ("- toolkit serve, 64-image requests from 4 clients: ≥ 50 % of the model's images/s in-process at that "
            "batch (same threads, alternating rounds): 51.2 % — **met**") in text
    # concurrency 1: a p50 of 1000 * 1 / 3000 = 0.333 ms against a 0.05 ms call in-process
    assert by[("serve", 1, 1)]["added_p50_ms"] == pytest.approx(1000 / 3000 - 0.05)
    assert "- toolkit serve, concurrency 1: adds ≤ 1 ms p50 over the in-process call: +0.28 ms — **met**" in text


def test_a_serving_result_of_an_older_format_is_one_clear_error(tmp_path: Path) -> None:
    old = {**RESULTS, "benchmarks": [_bench("test_serving[serve-b1]", 20.0, kind="serving", server="serve", batch=1,
                                            levels=[], floor_levels=[])]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    with pytest.raises(BenchReportError, match="lacks batch/floor/servers"):
        load_serving_rows([path])


def _step(model: str, precision: str, layout: str, batch: int, images_per_s: float) -> dict:
    return _bench(f"test_train_step[{model}-b{batch}-{layout}-{precision}]", batch / images_per_s, kind="train_step",
                  model=model, label=f"train_step {precision} {layout} batch {batch}", precision=precision,
                  memory_format=layout, batch=batch, threads=2, images_per_s=images_per_s)


PER_MODEL = {**RESULTS, "benchmarks": [
    _bench("test_matmul_peak[t1]", 0.026, kind="matmul", label="torch.mm 1024×1024 fp32", threads=1, gflops=82.0),
    _inference("eager", 1, 1, 0.0004, model="tutorial", weights="trained"),
    _inference("onnx", 1, 1, 0.00005, model="tutorial", weights="trained"),
    _inference("eager", 1, 2, 0.020, model="resnet18", weights="untrained: random initialization, seed 0"),
    _inference("eager", 1, 1, 0.030, model="resnet18", weights="untrained: random initialization, seed 0"),
    _inference("onnx", 1, 1, 0.015, model="resnet18", weights="untrained: random initialization, seed 0"),
    _inference("onnx", 64, 2, 0.5, model="resnet18", weights="untrained: random initialization, seed 0"),
    _inference("eager", 64, 2, 1.0, model="resnet18", weights="untrained: random initialization, seed 0"),
    _step("tutorial", "fp32", "contiguous", 128, 10000.0),
    _step("tutorial", "fp32", "channels_last", 128, 9000.0),
    _step("resnet18", "fp32", "contiguous", 128, 20.0),
    _step("resnet18", "bf16", "channels_last", 128, 30.0),
    _step("resnet18", "fp32", "channels_last", 128, 25.0),
]}


@pytest.fixture
def per_model(tmp_path: Path) -> Path:
    path = tmp_path / "per-model.json"
    path.write_text(json.dumps(PER_MODEL))
    return path


def test_rows_are_grouped_and_compared_within_their_model(per_model: Path) -> None:
    rows = load_rows([per_model])
    assert [(r["model"], r["backend"], r["batch"], r["threads"]) for r in rows] == [
        ("tutorial", "eager", 1, 1), ("tutorial", "onnx", 1, 1),
        ("resnet18", "eager", 1, 1), ("resnet18", "eager", 1, 2), ("resnet18", "onnx", 1, 1),
        ("resnet18", "eager", 64, 2), ("resnet18", "onnx", 64, 2)]
    by = {(r["model"], r["backend"], r["batch"], r["threads"]): r for r in rows}
    assert by[("tutorial", "onnx", 1, 1)]["speedup_vs_eager"] == pytest.approx(8.0)  # 0.4 ms / 0.05 ms
    assert by[("resnet18", "onnx", 1, 1)]["speedup_vs_eager"] == pytest.approx(2.0)  # 30 ms / 15 ms, not tutorial's
    assert by[("resnet18", "onnx", 64, 2)]["speedup_vs_eager"] == pytest.approx(2.0)
    other = load_other_rows([per_model])
    assert [(r["model"], r["kind"]) for r in other][:3] == [(None, "matmul"), ("tutorial", "train_step"),
                                                          ("tutorial", "train_step")]
    assert {r["model"] for r in other if r["kind"] == "train_step"} == {"tutorial", "resnet18"}


def test_markdown_has_a_section_per_model(per_model: Path) -> None:
    text = render_markdown(load_rows([per_model]), load_other_rows([per_model]), "Test CPU")
    lines = text.splitlines()
    headings = [l for l in lines if l.startswith("## ")]
    assert headings == ["## The machine", "## Model `tutorial`", "## Model `resnet18`"]
    tutorial, resnet = lines.index("## Model `tutorial`"), lines.index("## Model `resnet18`")
    assert tutorial < lines.index("| onnx | 1 | 1 | 0.05 | 20,000 | 8.00× |") < resnet
    assert resnet < lines.index("| onnx | 1 | 1 | 15 | 66.7 | 2.00× |")
    assert lines.index("Inference weights: untrained: random initialization, seed 0.") > resnet
    assert lines.index("Inference weights: trained.") < resnet
    assert any(l.startswith("| torch.mm 1024×1024 fp32 | 1 |") for l in lines[:tutorial])
    assert resnet < next(i for i, l in enumerate(lines) if l.startswith("| train_step bf16 channels_last batch 128 |"))
    # One summary line per model: training images/s per precision and memory format, "–" where not measured.
    assert "| model | batch | fp32 contiguous | fp32 channels_last | bf16 channels_last |" in lines  # sorted
    assert "| tutorial | 128 | 10,000 | 9,000 | – |" in lines
    assert "| resnet18 | 128 | 20 | 25 | 30 |" in lines
    # The targets are the tutorial's: resnet18's 2× does not enter them.
    assert "- ONNX Runtime batch-1 latency vs eager ≥ 6×: 8.00× (threads 1) — **met**" in text


def test_chart_has_a_panel_row_per_model(per_model: Path, tmp_path: Path) -> None:
    png = plot(load_rows([per_model]), tmp_path / "models.png")
    from PIL import Image

    with Image.open(png) as im:
        width, height = im.size
    single = plot([r for r in load_rows([per_model]) if r["model"] == "resnet18"], tmp_path / "resnet18.png")
    with Image.open(single) as im:
        assert im.size[0] == width and im.size[1] < height  # the same batch columns, one panel row fewer
