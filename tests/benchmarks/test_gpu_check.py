"""`python -m benchmarks.gpu_check --quick` on the CPU: every stage of the GPU check runs, small, and its report
files say what ran; the full check refuses to run without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.gpu_check import main
from tests.helpers import ROOT, assert_ok, load_json


def test_the_quick_check_runs_every_stage_on_the_cpu(tmp_path) -> None:
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert_ok(proc)
    report = load_json(out / "gpu-check.json")
    assert (report["device"], report["quick"]) == ("cpu", True)
    tests = report["gpu_tests"]
    assert tests["exit_code"] == 0 and tests["summary"].startswith("2 passed"), tests
    assert [b["label"] for b in tests["benchmarks"]] == ["cpu train_step fp32 batch 64", "cpu train_step bf16 batch 64"]
    assert all(b["images_per_s"] > 0 for b in tests["benchmarks"])
    rows = report["throughput"]
    assert [(r["precision"], r["batch"], r["compile"], r["exit_code"]) for r in rows] == \
        [("fp32", 64, False, 0), ("bf16", 64, False, 0)]
    assert all(r["images_per_s"] > 0 and r["windows"] >= 4 for r in rows), rows  # the second epoch's windows
    tta = report["time_to_accuracy"]
    assert tta["exit_code"] == 0 and tta["epochs"] == 2 and [e for e, _, _ in tta["curve"]] == [1, 2], tta
    speed = report["speednet"]
    assert speed["exit_code"] == 0 and [r["seed"] for r in speed["runs"]] == [0], speed
    assert 0 <= speed["mean_accuracy"] <= 1 and speed["mean_train_seconds"] > 0
    assert "--recipe speednet --seed 0" in speed["runs"][0]["command"]
    markdown = (out / "gpu-check.md").read_text()
    assert markdown.startswith("GPU check (--quick) of ") and " on the CPU: " in markdown
    assert "| fp32 | 64 |" in markdown and "| seed 0 | " in markdown and "| cpu train_step bf16 batch 64 | 64 |" in markdown
    assert markdown in proc.stdout
    assert str(tmp_path) not in (out / "gpu-check.json").read_text()  # commands name the folder OUT


def test_the_full_check_refuses_the_cpu(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert main(["--out", str(tmp_path / "check")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("gpu-check: error: ") and "the full check measures a GPU" in error
    assert len(error.splitlines()) == 1 and not (tmp_path / "check").exists()


def test_quick_takes_no_data_dir(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--quick", "--data-dir", str(tmp_path), "--out", str(tmp_path / "check")])
    assert exit_.value.code == 2 and "--data-dir" in capsys.readouterr().err
