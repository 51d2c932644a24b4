"""`toolkit run` end to end on tiny synthetic data: every file, valid pictures, a report that matches its JSON."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (accelerate_launch, assert_clean_error, assert_ok, assert_png, cli, expected_numbers,
                           parse_report, run_cli, run_commands)
from toolkit.core.files import sha256_file
from toolkit.training.config import build_train_config
from toolkit.core.errors import VerificationError

# 360 training / 40 validation / 100 test images, 2 epochs of 12 steps.
RUN_ARGS = ["--data", "synthetic", "--synthetic-train-size", "400", "--synthetic-test-size", "100",
            "--val-fraction", "0.1", "--epochs", "2", "--batch-size", "32", "--lr", "0.1", "--threads", "1",
            "--log-every", "4"]
PICTURES = ("training.png", "confusion.png", "per_class.png", "predictions.png")
RUN_FILES = ("config.json", "metrics.jsonl", "model.safetensors", "eval.json", "verify.json", "export_manifest.json",
             "report.md", "plots/predictions.npz", *(f"plots/{p}" for p in PICTURES))
EXPORT_FILES = ("manifest.json", "model.safetensors", "model.ts", "model.onnx", "model.fp16.onnx", "model.int8.onnx",
                "model.pt2")


@dataclass(frozen=True)
class Done:
    run: Path
    export: Path
    proc: subprocess.CompletedProcess


@functools.cache
def _run_once(base: Path) -> Done:
    run, export = base / "runs" / "tiny", base / "exports" / "tiny"
    return Done(run, export, run_cli("run", *RUN_ARGS, "--output-dir", str(run), "--export-dir", str(export)))


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Done:
    result = _run_once(tmp_path_factory.getbasetemp())
    assert_ok(result.proc)
    return result


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_run_writes_every_file(done):
    for name in RUN_FILES:
        assert (done.run / name).is_file(), name
    assert sorted(p.name for p in done.export.iterdir()) == sorted(EXPORT_FILES)  # nothing else in the export
    assert _json(done.run / "verify.json")["passed"] is True
    for picture in PICTURES:
        assert_png(done.run / "plots" / picture)


def test_run_says_where_everything_landed(done):
    out = done.proc.stdout
    assert "Accuracy of the network on the 100 test images" in out  # training's evaluation
    assert "verify: all formats match the eager model" in out
    for line in (f"run folder    {done.run}", f"exports       {done.export}",
                 f"verification  {done.run / 'verify.json'} (passed)", f"report        {done.run / 'report.md'}"):
        assert line in out, out[-2000:]


def test_output_to_a_pipe_has_no_progress_bar_control_characters(done):
    for stream in (done.proc.stdout, done.proc.stderr):
        assert "\r" not in stream and "\x1b[" not in stream
    assert "epoch 2/2 step 24/24 loss" in done.proc.stdout  # the plain per-interval log instead


def test_report_numbers_equal_the_json_they_came_from(done):
    text = (done.run / "report.md").read_text()
    manifest = _json(done.export / "manifest.json")
    assert parse_report(text) == expected_numbers(_json(done.run / "eval.json"), _json(done.run / "verify.json"),
                                                  manifest)
    for name, row in parse_report(text)["formats"].items():  # the hashes are those of the files on disk
        assert sha256_file(done.export / row["file"]).startswith(row["sha256"]), name
    # Training's eval.json and verification's eager row come from the same weights and images.
    assert _json(done.run / "verify.json")["formats"]["eager"]["accuracy"] == _json(done.run / "eval.json")["accuracy"]


def test_report_reproduces_the_command_line(done):
    commands = run_commands((done.run / "report.md").read_text())
    assert commands[0][:2] == ["toolkit", "run"]
    assert commands[0][commands[0].index("--export-dir") + 1] == str(done.export)
    saved = _json(done.run / "config.json")
    saved.pop("runtime")
    expected = build_train_config({"data": "synthetic", "synthetic_train_size": 400, "synthetic_test_size": 100,
                                   "val_fraction": 0.1, "epochs": 2, "batch_size": 32, "lr": 0.1, "threads": 1,
                                   "log_every": 4, "output_dir": str(done.run)})
    assert saved == expected.to_dict()


def test_toolkit_report_rebuilds_it_from_the_run_folder(done, tmp_path, capsys):
    # A copy, moved away from the export folder: the report must need nothing but the run's files.
    copy = tmp_path / "tiny"
    shutil.copytree(done.run, copy)
    (copy / "report.md").unlink()
    for picture in PICTURES:
        (copy / "plots" / picture).unlink()
    assert_ok(cli(capsys, "report", copy))
    assert (copy / "report.md").read_text() == (done.run / "report.md").read_text().replace(
        f"# Run `{done.run.name}`", f"# Run `{copy.name}`")
    for picture in PICTURES:
        assert_png(copy / "plots" / picture)


def test_an_export_folder_of_another_run_is_refused_before_training(done, tmp_path, capsys):
    proc = cli(capsys, "run", *RUN_ARGS, "--output-dir", tmp_path / "other", "--export-dir", done.export)
    assert_clean_error(proc, "--export-dir", "not an export of this run")
    assert not (tmp_path / "other").exists()


def test_a_failed_verification_still_writes_the_report(done, tmp_path, monkeypatch, capsys):
    """Training (and its hold on the run folder) is replaced by a copy of the finished run; the ONNX runtime's
    logits are shifted."""
    from toolkit.apps import pipeline
    from toolkit.artifacts.onnx_runtime import OnnxRuntimeBackend
    from toolkit.training.evaluate import EvalResult
    from toolkit.training.runs import RunRecord
    from toolkit.training.train import TrainResult

    run = tmp_path / "tiny"
    shutil.copytree(done.run, run, ignore=shutil.ignore_patterns("report.md", "verify.json", "plots"))
    finished = TrainResult(run, RunRecord.read(run), EvalResult.read(run / "eval.json"))
    monkeypatch.setattr(pipeline, "open_run", lambda cfg, command: contextlib.nullcontext())
    monkeypatch.setattr(pipeline, "train", lambda cfg, session: finished)
    shifted = OnnxRuntimeBackend._run
    monkeypatch.setattr(OnnxRuntimeBackend, "_run", lambda self, batch: shifted(self, batch) + 0.5)
    with pytest.raises(VerificationError, match="onnx"):
        pipeline.run_pipeline(build_train_config({"data": "synthetic", "synthetic_train_size": 400,
                                         "synthetic_test_size": 100, "val_fraction": 0.1, "threads": 1}),
                     tmp_path / "export", ["onnx"])
    assert "verification FAILED" in capsys.readouterr().out
    assert _json(run / "verify.json")["passed"] is False
    text = (run / "report.md").read_text()
    assert "**FAILED**: onnx differ(s) from the eager model" in text
    assert parse_report(text)["formats"]["onnx"]["result"] == "**FAIL**"


@pytest.mark.slow
def test_two_processes_export_and_report_once(tmp_path):
    run, export = tmp_path / "run", tmp_path / "export"
    proc = accelerate_launch("cpu-2proc.yaml", "run", *RUN_ARGS, "--output-dir", str(run), "--export-dir", str(export))
    assert_ok(proc)
    assert proc.stdout.count("toolkit run: done") == 1
    assert _json(run / "config.json")["runtime"]["num_processes"] == 2
    assert _json(run / "verify.json")["passed"] is True
    assert run_commands((run / "report.md").read_text())[0][:9] == [
        "accelerate", "launch", "--config_file", "launch/cpu-2proc.yaml", "--num_processes", "2", "-m", "toolkit", "run"]
