"""toolkit.training.status: status.json, and the run folder's lock held by a real second process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from toolkit.core.errors import CheckpointError
from toolkit.training.status import LOCK_FILE, Holder, RunLock, RunStatus, describe_status, lock_is_held, status_field


def test_status_round_trips_and_reads_as_lines_and_fields(tmp_path: Path) -> None:
    holder = Holder("toolkit run", 123, "node7", "2026-01-01T00:00:00+00:00")
    status = RunStatus("diverged", 40, 4, "non-finite loss at step 41", "2026-01-01T00:05:00+00:00", holder)
    status.write(tmp_path)
    assert RunStatus.read(tmp_path) == status
    assert describe_status(tmp_path).splitlines() == [
        f"{tmp_path}: diverged at step 40 (exit code 4), 2026-01-01T00:05:00+00:00", "  non-finite loss at step 41",
        "  toolkit run, pid 123 on node7 since 2026-01-01T00:00:00+00:00"]
    assert (status_field(tmp_path, "state"), status_field(tmp_path, "exit_code")) == ("diverged", "4")
    assert not list(tmp_path.glob(".status.json.tmp*"))  # written through a temporary file


def test_a_missing_or_unreadable_status_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no status.json"):
        RunStatus.read(tmp_path)
    (tmp_path / "status.json").write_text(json.dumps({"state": "done"}))
    with pytest.raises(CheckpointError, match="status.json: unreadable"):
        RunStatus.read(tmp_path)


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    holder = Holder("toolkit train", 0, socket.gethostname(), "2026-01-01T00:00:00+00:00")
    code = ("import os, sys, time; from pathlib import Path; from toolkit.training.status import Holder, RunLock;"
            "RunLock.acquire(Path(sys.argv[1]), Holder('toolkit train', os.getpid(), 'node1', 'then'));"
            "print('locked', flush=True); time.sleep(600)")
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        assert lock_is_held(tmp_path) is True
        with pytest.raises(CheckpointError, match=f"is in use by toolkit train, pid {other.pid} on node1 since then"):
            RunLock.acquire(tmp_path, holder)
    finally:
        other.kill()
        other.wait()
    assert lock_is_held(tmp_path) is False  # the kernel released it with its holder
    lock, warning = RunLock.acquire(tmp_path, holder)
    assert warning is None and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == 0
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == "" and lock_is_held(tmp_path) is False
