"""toolkit.training.checkpoint in one process: round trip, completeness, corruption, rotation."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from tests.helpers import swap_after_first_hash
from toolkit.core.errors import CheckpointError
from toolkit.core.files import sha256_file
from toolkit.training.checkpoint import (STATE_FILE, TrainState, find_latest, list_checkpoints, load_checkpoint,
                                         save_checkpoint, verify_checkpoint)
from toolkit.training.models import build_model
from toolkit.training.optim import LRSchedule


def _parts(accelerator: Accelerator, seed: int):
    torch.manual_seed(seed)
    model = build_model("tutorial", 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, LRSchedule("onecycle", 10, 0.2))
    return model, optimizer, scheduler


def _train_a_step(model, optimizer, scheduler) -> None:
    loss = model(torch.randn(4, 3, 32, 32)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def test_a_checkpoint_restores_model_optimizer_schedule_rng_and_position(accelerator, tmp_path: Path) -> None:
    model, optimizer, scheduler = _parts(accelerator, seed=0)
    _train_a_step(model, optimizer, scheduler)
    state = TrainState(epoch=1, batches_done=3, global_step=7, train_seconds=1.5, nan_skips=1)
    path = save_checkpoint(accelerator, tmp_path, state, model, optimizer, scheduler, keep=2)
    assert path == tmp_path / "step_7" and (path / STATE_FILE).is_file()
    expected_draws = (torch.rand(3), np.random.rand(), random.random())

    other, other_opt, other_sched = _parts(accelerator, seed=1)  # different weights, fresh optimizer
    torch.manual_seed(123)
    restored = load_checkpoint(accelerator, path, other, other_opt, other_sched)
    assert restored == state
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert other_opt.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert other_sched.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"] == 1
    draws = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]


def test_verify_names_what_is_wrong(accelerator, tmp_path: Path) -> None:
    model, optimizer, scheduler = _parts(accelerator, seed=0)
    path = save_checkpoint(accelerator, tmp_path, TrainState(global_step=1), model, optimizer, scheduler, keep=2)
    assert set(verify_checkpoint(path)["files"]) == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_0.pt"}

    with pytest.raises(CheckpointError, match="no such folder"):
        verify_checkpoint(tmp_path / "step_99")
    broken = Path(shutil.copytree(path, tmp_path / "broken"))
    (broken / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="optimizer.pt is corrupt"):
        verify_checkpoint(broken)
    (broken / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="missing optimizer.pt"):
        verify_checkpoint(broken)
    record = json.loads((broken / STATE_FILE).read_text())
    record["files"] = {"../model.safetensors": "0" * 64}
    (broken / STATE_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="not a file of this folder"):
        verify_checkpoint(broken)
    (broken / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        verify_checkpoint(broken)


def test_listing_rotation_and_the_newest_good_checkpoint(accelerator, tmp_path: Path) -> None:
    model, optimizer, scheduler = _parts(accelerator, seed=0)
    for step in (2, 10, 9):
        save_checkpoint(accelerator, tmp_path, TrainState(global_step=step), model, optimizer, scheduler, keep=2)
    (tmp_path / ".step_11.tmp").mkdir()  # an interrupted write
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_9", "step_10"]  # numeric order, newest 2 kept
    (tmp_path / "step_10" / "model.safetensors").write_bytes(b"garbage")
    latest, skipped = find_latest(tmp_path)
    assert latest.name == "step_9" and len(skipped) == 1 and "step_10" in skipped[0] and "corrupt" in skipped[0]
    (tmp_path / "step_9" / "scheduler.pt").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_latest(tmp_path)
    assert list_checkpoints(tmp_path / "missing") == []


def test_a_checkpoint_from_another_model_is_refused(accelerator, tmp_path: Path) -> None:
    model, optimizer, scheduler = _parts(accelerator, seed=0)
    path = save_checkpoint(accelerator, tmp_path, TrainState(global_step=1), model, optimizer, scheduler, keep=1)
    small = accelerator.prepare(build_model("tutorial", 3))
    small_opt = accelerator.prepare(torch.optim.SGD(small.parameters(), lr=0.1))
    small_sched = torch.optim.lr_scheduler.LambdaLR(small_opt.optimizer, LRSchedule("none", 1, 0.0))
    with pytest.raises(CheckpointError, match="does not fit this model/optimizer"):
        load_checkpoint(accelerator, path, small, small_opt, small_sched)


def _drop_from_state(path: Path, name: str) -> None:
    record = json.loads((path / STATE_FILE).read_text())
    del record["files"][name]
    (path / STATE_FILE).write_text(json.dumps(record))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_0.pt"])
def test_a_file_that_state_json_does_not_list_is_not_loaded(accelerator, tmp_path: Path, name: str) -> None:
    """state.json vouches for the files by their sha256: one it does not list is refused, though the folder holds it."""
    model, optimizer, scheduler = _parts(accelerator, seed=0)
    path = save_checkpoint(accelerator, tmp_path, TrainState(global_step=1), model, optimizer, scheduler, keep=1)
    _drop_from_state(path, name)
    assert (path / name).is_file() and name not in verify_checkpoint(path)["files"]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(accelerator, path, *_parts(accelerator, seed=1))
    assert str(info.value) == (f"checkpoint {path}: {name} is not listed in {STATE_FILE}, so nothing vouches for it; "
                               "refusing to load it")


def test_a_scaler_file_loads_only_if_state_json_lists_it(accelerator, tmp_path: Path) -> None:
    """An fp16 run resumes with the loss scale of its checkpoint's scaler.pt; a scaler.pt that state.json does not
    list (here: put into a checkpoint written without one) is refused, not loaded."""
    model, optimizer, scheduler = _parts(accelerator, seed=0)
    path = save_checkpoint(accelerator, tmp_path, TrainState(global_step=1), model, optimizer, scheduler, keep=1)
    torch.save(torch.amp.GradScaler("cpu", init_scale=4.0).state_dict(), path / "scaler.pt")
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(accelerator, path, *_parts(accelerator, seed=1))
    assert str(info.value) == (f"checkpoint {path}: scaler.pt is not listed in {STATE_FILE}, so nothing vouches for "
                               "it; refusing to load it")
    assert accelerator.scaler.get_scale() == 2.0 ** 16
    record = json.loads((path / STATE_FILE).read_text())
    record["files"]["scaler.pt"] = sha256_file(path / "scaler.pt")
    (path / STATE_FILE).write_text(json.dumps(record))
    load_checkpoint(accelerator, path, *_parts(accelerator, seed=1))
    assert accelerator.scaler.get_scale() == 4.0


def test_a_file_changed_after_its_hash_was_checked_is_not_loaded(accelerator, tmp_path: Path, monkeypatch) -> None:
    """model.safetensors is replaced by other valid weights right after its sha256 was computed: the load refuses
    them instead of loading what was never checked."""
    model, optimizer, scheduler = _parts(accelerator, seed=0)
    path = save_checkpoint(accelerator, tmp_path, TrainState(global_step=1), model, optimizer, scheduler, keep=1)
    save_file(build_model("tutorial", 10).state_dict(), tmp_path / "other.safetensors")
    other = (tmp_path / "other.safetensors").read_bytes()
    target, target_opt, target_sched = _parts(accelerator, seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with monkeypatch.context() as patch:
        # The first file hashed: state.json lists model.safetensors first.
        swaps = swap_after_first_hash(patch, path / "model.safetensors", other)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(accelerator, path, target, target_opt, target_sched)
    assert swaps == [path / "model.safetensors"]
    assert str(info.value) == f"checkpoint {path}: model.safetensors is corrupt (sha256 mismatch)"
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
