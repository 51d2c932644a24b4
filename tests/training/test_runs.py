"""toolkit.training.runs: the run record, final weights, and what start-up does to a run folder."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from toolkit.core.errors import CheckpointError, DataError, Interrupted
from toolkit.training.config import build_train_config
from toolkit.training.models import build_model
from toolkit.training.runs import (CONFIG, DataInfo, RunInfo, RunRecord, RunSession, load_model, prepare_run_folder,
                                   rebuild_model, remove_run_files, save_model)
from toolkit.training.status import RunStatus

CLASSES = [f"c{i}" for i in range(10)]


def _record(run: Path) -> RunRecord:
    info = RunInfo(num_processes=2, distributed_type="MULTI_GPU", mixed_precision="bf16", device="cuda:0",
                   torch_threads=4, global_batch_size=256, steps_per_epoch=176, total_steps=2640, compile_mode=None,
                   data=DataInfo("imagefolder:data", CLASSES, 45000, 5000, "val", "no test split"),
                   versions={"torch": "2.x"})
    return RunRecord(build_train_config({"output_dir": str(run), "lr": 0.2}), info)


def test_the_run_record_round_trips_through_config_json(tmp_path: Path) -> None:
    record = _record(tmp_path)
    record.write(tmp_path)
    saved = json.loads((tmp_path / CONFIG).read_text())
    assert saved["optim"]["lr"] == 0.2 and saved["runtime"]["num_processes"] == 2
    assert saved["runtime"]["data"]["eval_split"] == "val"
    assert RunRecord.read(tmp_path) == record


def test_reading_a_folder_that_is_not_a_run_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a run folder"):
        RunRecord.read(tmp_path)
    (tmp_path / CONFIG).write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json: unreadable"):
        RunRecord.read(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({"lr": 0.1}))  # no "runtime"
    with pytest.raises(CheckpointError, match="config.json: unreadable"):
        RunRecord.read(tmp_path)


def test_final_weights_rebuild_the_model_with_its_classes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("tutorial", 10)
    save_model(model, tmp_path / "model.safetensors", "tutorial", CLASSES)
    trained = load_model(tmp_path / "model.safetensors")
    assert trained.classes == CLASSES and trained.model_name == "tutorial" and not trained.model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trained.model(x), model.eval()(x))
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed into place


def test_weights_that_are_not_a_toolkit_model_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such model file"):
        load_model(tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not a toolkit model file"):
        load_model(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="weights do not fit model 'tutorial'"):
        rebuild_model("tutorial", CLASSES, {"w": torch.zeros(2)}, "somewhere")


def test_start_up_refuses_an_existing_run_and_overwrite_removes_only_run_files(accelerator, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert prepare_run_folder(build_train_config({"output_dir": str(run)}), run, accelerator) is None
    assert (run / "checkpoints").is_dir()
    _record(run).write(run)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already holds a run"):
        prepare_run_folder(build_train_config({"output_dir": str(run)}), run, accelerator)
    prepare_run_folder(build_train_config({"output_dir": str(run), "overwrite": True}), run, accelerator)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "notes.txt"]
    # --resume latest with no checkpoint yet starts from step 0 (restart loops call it blindly).
    assert prepare_run_folder(build_train_config({"output_dir": str(run), "resume": "latest"}), run, accelerator) is None


@pytest.mark.parametrize("error, state, code, message", [
    (None, "done", 0, "finished"),
    (Interrupted("stopped by signal after step 3"), "interrupted", 75, "stopped by signal after step 3"),
    (DataError("--data-dir x: no such folder"), "failed", 2, "--data-dir x: no such folder"),
    (RuntimeError("a bug\nwith details"), "failed", 1, "RuntimeError: a bug"),
    (KeyboardInterrupt(), "failed", 130, "KeyboardInterrupt: no detail"),
])
def test_a_claimed_run_records_how_it_ended(accelerator, tmp_path: Path, error, state, code, message) -> None:
    raises = pytest.raises(type(error)) if error else contextlib.nullcontext()  # the error still propagates
    with raises, RunSession(accelerator, tmp_path, "toolkit train") as session:
        session.claim()
        assert RunStatus.read(tmp_path).state == "running"
        session.follow(lambda: 3)
        if error:
            raise error
    status = RunStatus.read(tmp_path)
    assert (status.state, status.exit_code, status.message, status.step) == (state, code, message, 3)


def test_a_start_refused_before_claiming_leaves_the_folder_alone(accelerator, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError), RunSession(accelerator, tmp_path, "toolkit train"):
        raise CheckpointError("--output-dir: already holds a run")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    with (RunSession(accelerator, tmp_path, "toolkit train"),  # the same folder twice at once: refused
          pytest.raises(CheckpointError, match=f"in use by toolkit train, pid {os.getpid()}")):
        RunSession(accelerator, tmp_path, "toolkit run").__enter__()


def test_remove_run_files_leaves_everything_else(tmp_path: Path) -> None:
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "eval.json", "status.json", "report.md"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoints" / "step_1").mkdir(parents=True)
    remove_run_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
