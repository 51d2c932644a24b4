"""A run's fate and its one writer: `runs/NAME/status.json` and `runs/NAME/.lock`. No torch here,
so that `toolkit status` answers at once.

status.json  how the run's latest start ended: running, done, interrupted (exit 75, resume it),
             diverged (4) or failed (any other code), with the optimizer step, a message, the exit
             code the process meant and when. The main process writes it atomically on every exit
             path. Launchers replace a process's exit code with their own (`accelerate launch` and
             torchrun exit 1 for any failure), so wrappers read this file instead.
.lock        `flock`ed by the main process for the whole command; while held it names the holder
             (pid, host, since), so a second writer fails naming it. The kernel releases the lock
             when its holder dies, so a killed run never blocks the next one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.core.errors import CheckpointError, first_line
from toolkit.core.files import write_json_atomic

STATUS_FILE = "status.json"
LOCK_FILE = ".lock"
STATES = ("running", "done", "interrupted", "diverged", "failed")
# A second process seeing the lock held retries this long (seconds): `toolkit status` holds it
# for microseconds while checking whether the writer is alive.
_LOCK_PATIENCE_S = 1.0
# errno values of file systems without working locks (some NFS, Lustre without -o flock).
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def now() -> str:
    """Local time with its UTC offset, to the second."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class Holder:
    """The process that owns a run folder."""

    command: str  # "toolkit train" or "toolkit run"
    pid: int
    host: str
    since: str  # when it took the lock

    @classmethod
    def this_process(cls, command: str) -> Holder:
        return cls(command, os.getpid(), socket.gethostname(), now())

    def describe(self) -> str:
        return f"{self.command}, pid {self.pid} on {self.host} since {self.since}"


@dataclass
class RunStatus:
    """status.json."""

    state: str  # one of STATES
    step: int | None  # optimizer steps done; None until the run has loaded its data and checkpoint
    exit_code: int | None  # what the process meant to exit with; None while running
    message: str
    time: str  # when this status was written
    holder: Holder

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunStatus:
        return cls(**{**d, "holder": Holder(**d["holder"])})

    def write(self, run_dir: Path) -> None:
        write_json_atomic(run_dir / STATUS_FILE, self.to_json())

    @classmethod
    def read(cls, run_dir: Path) -> RunStatus:
        path = Path(run_dir) / STATUS_FILE
        if not path.is_file():
            raise CheckpointError(f"{run_dir}: no {STATUS_FILE} (not a run folder, or no run has started in it)")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: unreadable ({first_line(exc)})") from None


class RunLock:
    """An exclusive `flock` on `run_dir/.lock`, naming its holder inside the file while held.

    The file is never deleted: removing a lock file lets two processes lock two different files.
    """

    def __init__(self, fd: int | None) -> None:
        self._fd = fd  # None: the file system cannot lock

    @classmethod
    def acquire(cls, run_dir: Path, holder: Holder) -> tuple[RunLock, str | None]:
        """Lock `run_dir` (creating it) or raise `CheckpointError` naming the holder.

        Returns the lock and a warning when the file system cannot lock (the run goes on unguarded).
        """
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CheckpointError(f"--output-dir {run_dir}: cannot create ({exc.strerror})") from None
        deadline = time.monotonic() + _LOCK_PATIENCE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                owner = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                if exc.errno in _NO_LOCKS:
                    return cls(None), (f"warning: cannot lock {run_dir / LOCK_FILE} ({exc.strerror}): "
                                       "a second run into this folder will not be refused")
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise CheckpointError(f"--output-dir {run_dir}: cannot lock {LOCK_FILE} ({exc.strerror})") from None
                raise CheckpointError(f"--output-dir {run_dir} is in use by {_describe_owner(owner)}: wait for it "
                                      "to end (SIGTERM stops it after a checkpoint), or choose another --output-dir"
                                      ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(dataclasses.asdict(holder)).encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise CheckpointError(f"--output-dir {run_dir}: cannot write {LOCK_FILE} ({exc.strerror})") from None
        return cls(fd), None

    def release(self) -> None:
        """Unlock; the file is emptied first, so an empty .lock means "nobody"."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None


def _describe_owner(text: str) -> str:
    try:
        return Holder(**json.loads(text)).describe()
    except (ValueError, TypeError):
        return "another process (it has not named itself yet)"


def lock_is_held(run_dir: Path) -> bool | None:
    """Whether a live process holds `run_dir/.lock`; None when this file system cannot tell."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as exc:
        return True if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
    finally:
        os.close(fd)  # also drops the shared lock, if it was taken


def describe_status(run_dir: Path) -> str:
    """`toolkit status RUN`: the run's state in a few lines, checking that a "running" run is alive."""
    status = RunStatus.read(run_dir)
    where = "" if status.step is None else f" at step {status.step}"
    code = "" if status.exit_code is None else f" (exit code {status.exit_code})"
    lines = [f"{run_dir}: {status.state}{where}{code}, {status.time}", f"  {status.message}",
             f"  {status.holder.describe()}"]
    if status.state == "running" and lock_is_held(run_dir) is False:
        lines.append(f"  but no process holds {run_dir / LOCK_FILE}: the run was killed (SIGKILL, out of memory, "
                     "node failure) before it could record its end; --resume latest continues it")
    return "\n".join(lines)


def status_field(run_dir: Path, name: str) -> str:
    """One field of status.json as a shell reads it: strings as they are, anything else as JSON."""
    value = RunStatus.read(run_dir).to_json()[name]
    return value if isinstance(value, str) else json.dumps(value)
