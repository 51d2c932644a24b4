"""toolkit.core.files: atomic writes, and every JSON record a command writes goes through them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from toolkit.apps.verify import VerifyReport
from toolkit.core.files import write_json_atomic, write_text_atomic
from toolkit.training.config import build_train_config
from toolkit.training.evaluate import EvalResult
from toolkit.training.runs import CONFIG, DataInfo, RunInfo, RunRecord
from toolkit.training.status import STATUS_FILE, Holder, RunStatus, now

OLD = '{"old": true}\n'


def _fail_replace(src, dst) -> None:
    raise OSError(28, "No space left on device")


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "record.json"
    path.write_text(OLD)
    with pytest.raises(TypeError):  # not JSON: fails before anything is written
        write_json_atomic(path, {"value": object()})
    assert path.read_text() == OLD and os.listdir(tmp_path) == ["record.json"]
    with monkeypatch.context() as m:  # the new file is complete but cannot be renamed into place
        m.setattr(os, "replace", _fail_replace)
        with pytest.raises(OSError, match="No space left"):
            write_text_atomic(path, "new")
    assert path.read_text() == OLD and os.listdir(tmp_path) == ["record.json"]
    write_json_atomic(path, {"new": 1})
    assert json.loads(path.read_text()) == {"new": 1} and os.listdir(tmp_path) == ["record.json"]


def _record() -> RunRecord:
    info = RunInfo(num_processes=1, distributed_type="NO", mixed_precision="no", device="cpu", torch_threads=1,
                   global_batch_size=4, steps_per_epoch=10, total_steps=20,
                   data=DataInfo("synthetic", ["a", "b"], 40, 0, "test", None), versions={})
    return RunRecord(build_train_config({}), info)


# Each JSON record a run folder or export check gets, by file name: how it is written into a folder.
WRITERS: dict[str, Callable[[Path], None]] = {
    CONFIG: lambda folder: _record().write(folder),
    STATUS_FILE: lambda folder: RunStatus("done", 3, 0, "finished", now(), Holder.this_process("test")).write(folder),
    "eval.json": lambda folder: EvalResult(torch.eye(2, dtype=torch.long), ["a", "b"]).write(folder / "eval.json"),
    "verify.json": lambda folder: VerifyReport(Path("exports/x"), "test", 2, ["a", "b"], 1e-4, 1e-4, []).write(
        folder / "verify.json"),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_json_records_are_replaced_atomically(tmp_path: Path, monkeypatch, name: str) -> None:
    """A write that fails before the new file is in place (a kill, a full disk) leaves the old record whole."""
    (tmp_path / name).write_text(OLD)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", _fail_replace)
        with pytest.raises(OSError, match="No space left"):
            WRITERS[name](tmp_path)
    assert (tmp_path / name).read_text() == OLD and os.listdir(tmp_path) == [name]
    WRITERS[name](tmp_path)
    assert json.loads((tmp_path / name).read_text()) != json.loads(OLD) and os.listdir(tmp_path) == [name]
