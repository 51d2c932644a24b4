"""toolkit.training.runs: the run record, final weights, and what start-up does to a run folder."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from toolkit.core.errors import CheckpointError, ConfigError, DataError, Interrupted
from toolkit.training.checkpoint import STATE_FILE
from toolkit.training.config import build_train_config
from toolkit.training.models import build_model
from toolkit.training.runs import (CONFIG, DataInfo, ResumeInfo, RunInfo, RunRecord, RunSession, check_resume_data,
                                   load_model, prepare_run_folder, read_resume_point, rebuild_model, remove_run_files,
                                   save_model)
from toolkit.training.status import RunStatus

CLASSES = [f"c{i}" for i in range(10)]


def _record(run: Path) -> RunRecord:
    info = RunInfo(num_processes=2, distributed_type="MULTI_GPU", mixed_precision="bf16", device="cuda:0",
                   torch_threads=4, global_batch_size=256, steps_per_epoch=176, total_steps=2640, compile_mode=None,
                   data=DataInfo("imagefolder:data", CLASSES, 45000, 5000, "val", "no test split"),
                   versions={"torch": "2.x"},
                   resumes=[ResumeInfo(step=1320, checkpoint=f"{run}/checkpoints/step_1320", checkpoint_epochs=10,
                                       epochs=15, checkpoint_total_steps=1760, total_steps=2640,
                                       schedule_rebuilt=True)])
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


def _checkpoint(run: Path, step: int, epoch: int, batches_done: int, record: RunRecord | None) -> Path:
    """A checkpoint folder whose state.json holds the position and, when given, the run's record (no weights: only
    start-up reads it here)."""
    path = run / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True)
    state = {"epoch": epoch, "batches_done": batches_done, "global_step": step, "train_seconds": 1.0, "nan_skips": 0,
             "num_processes": 1, "files": {}}
    (path / STATE_FILE).write_text(json.dumps({**state, **({"run": record.to_json()} if record else {})}))
    return path


def _written_by(run: Path, precision: str = "no", **values) -> RunRecord:
    """The record of a run at batch 32, lr 0.1, 2 epochs (`values` override), with 400 training images."""
    info = RunInfo(num_processes=1, distributed_type="NO", mixed_precision=precision, device="cpu", torch_threads=1,
                   global_batch_size=32, steps_per_epoch=13, total_steps=26,
                   data=DataInfo("synthetic", CLASSES, 400, 0, "test", None), versions={})
    return RunRecord(build_train_config({"output_dir": str(run), "batch_size": 32, "lr": 0.1, "epochs": 2,
                                         **values}), info)


def _resume(run: Path, **values) -> dict:
    return {"output_dir": str(run), "resume": "latest", "batch_size": 32, "lr": 0.1, "epochs": 2, **values}


def test_resume_checks_the_config_against_the_record_in_the_checkpoint(accelerator, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpt = _checkpoint(run, 26, 2, 0, _written_by(run))
    # The length and how the run is executed, logged and checkpointed may change.
    allowed = _resume(run, epochs=4, max_steps=40, threads=3, log_every=7, checkpoint_every=5, compile=True,
                      eval_batch_size=50, on_nan="skip", recipe="gpu", quiet=True, keep_checkpoints=9)
    start = prepare_run_folder(build_train_config(allowed), run, accelerator)
    assert (start.path, start.step, start.record) == (ckpt, 26, _written_by(run))
    where = f"checkpoint {ckpt} (step 26, end of epoch 2)"
    refusals = [
        (_resume(run, batch_size=64, lr=0.2), f"--resume: this run's config differs from that of {where}: "
         "--batch-size 64 (checkpoint: 32), --lr 0.2 (checkpoint: 0.1); resume with the checkpoint's values, "
         "or start a new run in another --output-dir"),
        (_resume(run, augment=False, seed=1, schedule="cosine"),
         "--seed 1 (checkpoint: 0), --no-augment (checkpoint: --augment), --schedule cosine (checkpoint: onecycle)"),
        (_resume(run, epochs=1), f"--resume: --epochs 1 ends before {where}: pass --epochs 2 or more"),
        (_resume(run, max_steps=25), f"--resume: --max-steps 25 ends before {where}: pass --max-steps 26 or more"),
    ]
    for values, message in refusals:
        with pytest.raises(ConfigError) as refused:
            prepare_run_folder(build_train_config(values), run, accelerator)
        assert message in str(refused.value)
    # The precision compared is the one the run uses (the launcher's when --mixed-precision is not given).
    shutil.rmtree(ckpt)
    ckpt = _checkpoint(run, 30, 2, 4, _written_by(run, precision="bf16"))
    with pytest.raises(ConfigError, match=r"\(step 30, in epoch 3\): --mixed-precision no \(checkpoint: bf16\);"):
        prepare_run_folder(build_train_config(_resume(run, epochs=3)), run, accelerator)
    with pytest.raises(ConfigError, match="--epochs 2 ends before .* in epoch 3.: pass --epochs 3 or more"):
        prepare_run_folder(build_train_config(_resume(run, mixed_precision="bf16")), run, accelerator)


def test_older_checkpoints_are_checked_against_the_config_json_beside_them(accelerator, tmp_path: Path,
                                                                           capsys) -> None:
    """A checkpoint written before state.json held the run's record: the run folder's config.json stands in for it;
    with neither, the run resumes with a warning that nothing was checked."""
    run = tmp_path / "run"
    ckpt = _checkpoint(run, 26, 2, 0, None)
    _written_by(run).write(run)
    hint = f"(--config {run / CONFIG} repeats them)"
    with pytest.raises(ConfigError, match=r"--batch-size 64 \(checkpoint: 32\); .*" + re.escape(hint)):
        prepare_run_folder(build_train_config(_resume(run, batch_size=64)), run, accelerator)
    assert prepare_run_folder(build_train_config(_resume(run)), run, accelerator).record == _written_by(run)
    (run / CONFIG).unlink()
    capsys.readouterr()
    start = prepare_run_folder(build_train_config(_resume(run, batch_size=64)), run, accelerator)
    assert (start.path, start.record) == (ckpt, None)
    assert capsys.readouterr().out.splitlines() == [
        f"warning: checkpoint {ckpt} does not record its run's config and no {run / CONFIG}: this run's config is "
        "not checked against the checkpoint's"]


def test_resume_refuses_data_that_differ_from_the_checkpoints_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    start = read_resume_point(_checkpoint(run, 26, 2, 0, _written_by(run)), print)
    check_resume_data(start, DataInfo("synthetic", CLASSES, 400, 0, "test", None))
    with pytest.raises(CheckpointError, match=r"the data differ from checkpoint .*'s run: training images 410 "
                                              r"\(checkpoint: 400\); resume with the checkpoint's data"):
        check_resume_data(start, DataInfo("synthetic", CLASSES, 410, 0, "test", None))
    with pytest.raises(CheckpointError, match=re.escape(f"classes {CLASSES[::-1]} (checkpoint: {CLASSES})")):
        check_resume_data(start, DataInfo("synthetic", CLASSES[::-1], 400, 0, "test", None))
