"""File helpers shared by checkpoints, exports and run records: hashes, fsync, atomic JSON, plain names."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, fsynced and renamed over
    `path` (then the folder fsynced, so the rename survives a power cut): a reader, or a process
    starting after a kill at any moment, sees the old file or the new one, never a partial one. On
    any failure the old file is left as it was and the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically (`write_text_atomic`): every JSON record a command
    writes (config.json, status.json, eval.json, verify.json, manifest.json) goes through here.

    `data` is serialized before anything is written, so data that is not JSON leaves no file behind."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def is_plain_name(name: object) -> bool:
    """A file name with no folder part: not empty, `.`, `..`, absolute, or holding a separator or NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
            and Path(name).name == name and not Path(name).is_absolute())
