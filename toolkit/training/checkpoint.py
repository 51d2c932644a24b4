"""Checkpoints that are either complete or ignored.

Layout of `checkpoints/step_<global step>/`:
  model.safetensors   unwrapped model weights (main process)
  optimizer.pt        optimizer state dict, loaded with `weights_only=True` (main process)
  scheduler.pt        LR scheduler state dict (main process)
  scaler.pt           fp16 only: the GradScaler's loss scale and growth tracker (main process)
  lookahead.safetensors  with --lookahead-every: the Lookahead copy of the weights (main process)
  rng_<process>.pt    each process's torch / numpy / python RNG states
  state.json          written last: training position, the run's record (config.json: config and runtime) and
                      the sha256 of every file above

A checkpoint is written into a hidden temporary folder, fsynced, then renamed into place, so a
kill mid-write leaves only a `.tmp` folder that loading ignores. `state.json` is the completion
marker; its hashes are checked before anything is loaded, each file is loaded from the very bytes
whose hash was checked, and a file it does not list is never loaded. Rotation deletes old checkpoints
only after the new one is complete, and never the newest complete one.

Accelerate's own `save_state` is not used: it writes in place, and with a total limit deletes old
checkpoints before the new one is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from toolkit.core.errors import CheckpointError, first_line
from toolkit.core.files import fsync_path, sha256_file

STATE_FILE = "state.json"
SCALER_FILE = "scaler.pt"
LOOKAHEAD_FILE = "lookahead.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    """Where training stands: after `global_step` optimizer steps, `batches_done` micro-batches of `epoch`."""

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    train_seconds: float = 0.0  # wall-clock seconds spent in training steps so far (not eval, not I/O)
    nan_skips: int = 0  # batches skipped for a non-finite loss (--on-nan skip)


def safetensors_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as safetensors stores it: every tensor contiguous (channels-last weights are not)."""
    return {k: v.contiguous() for k, v in state.items()}


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, state: TrainState, model, optimizer,
                    scheduler, keep: int, run: dict[str, Any] | None = None, lookahead=None) -> Path:
    """Atomically write a checkpoint of every process's state; all processes must call this.

    `run` is the run's config.json record, kept in state.json so that a resume can check its config against the
    checkpoint's wherever the checkpoint is (toolkit.training.runs.check_resume)."""
    final = checkpoints_dir / f"step_{state.global_step}"
    tmp = checkpoints_dir / f".step_{state.global_step}.tmp"
    try:
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            save_file(safetensors_state(accelerator.unwrap_model(model).state_dict()), tmp / "model.safetensors")
            if lookahead is not None:
                save_file(safetensors_state(lookahead.state_dict()), tmp / LOOKAHEAD_FILE)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if accelerator.scaler is not None:  # fp16: a resumed run continues with the same loss scale
                torch.save(accelerator.scaler.state_dict(), tmp / SCALER_FILE)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
            for p in tmp.iterdir():
                fsync_path(p)
            record = {**asdict(state), "num_processes": accelerator.num_processes, "files": files,
                      **({"run": run} if run is not None else {})}
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=2))
            fsync_path(tmp / STATE_FILE)
            if final.exists():  # the same step written again after a resume: the new copy is complete
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(checkpoints_dir)
            _rotate(checkpoints_dir, keep)
    except (OSError, RuntimeError, SafetensorError) as exc:  # disk full, quota, unwritable (torch.save wraps OSError)
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise CheckpointError(f"cannot write checkpoint {final}: {reason}; earlier checkpoints are untouched") \
            from None
    accelerator.wait_for_everyone()
    return final


def _rotate(checkpoints_dir: Path, keep: int) -> None:
    complete = [p for p in list_checkpoints(checkpoints_dir) if (p / STATE_FILE).exists()]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """`step_*` folders, oldest first (temporary folders excluded)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints_dir.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Return the checkpoint's state record after checking every file it lists against its sha256."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such folder")
    marker = path / STATE_FILE
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {path}: not a complete checkpoint (no {STATE_FILE})")
    try:
        record = json.loads(marker.read_text())
        files = record["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable {STATE_FILE} ({exc})") from None
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint {path}: unreadable {STATE_FILE} (its files are not a name -> sha256 map)")
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} lists {name!r}, not a file of this folder")
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path}: missing {name}")
        _verified_bytes(path, record, name)
    return record


def _verified_bytes(path: Path, record: dict[str, Any], name: str) -> bytes:
    """The content of the checkpoint's file `name`, read once and checked against the sha256 that `state.json`
    (`record`) lists for it. Every file a load reads comes through here, so a file `state.json` does not list
    is refused, and the bytes checked are the bytes loaded: the file cannot change in between."""
    digest = record["files"].get(name)
    if digest is None:
        raise CheckpointError(f"checkpoint {path}: {name} is not listed in {STATE_FILE}, so nothing vouches for it; "
                              "refusing to load it")
    try:
        data = (path / name).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read {name} ({exc.strerror or exc})") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path}: {name} is corrupt (sha256 mismatch)")
    return data


def find_latest(checkpoints_dir: Path) -> tuple[Path, list[str]]:
    """Newest checkpoint that verifies, and a warning line for every newer one that did not."""
    skipped: list[str] = []
    for path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify_checkpoint(path)
            return path, skipped
        except CheckpointError as exc:
            skipped.append(str(exc))
    raise CheckpointError(f"--resume latest: no complete checkpoint under {checkpoints_dir}"
                          + (f" ({'; '.join(skipped)})" if skipped else ""))


def load_checkpoint(accelerator: Accelerator, path: Path, model, optimizer, scheduler, lookahead=None) -> TrainState:
    """Restore a verified checkpoint into the prepared model, optimizer and scheduler (and the Lookahead copy when
    the run has one), and the RNGs.

    Each file is loaded from the bytes whose sha256 was just checked against `state.json`; a file that
    `state.json` does not list is not loaded (see `_verified_bytes`).
    """
    record = verify_checkpoint(path)

    def tensors(name: str) -> Any:
        return torch.load(io.BytesIO(_verified_bytes(path, record, name)), weights_only=True)

    # The GradScaler's state: in fp16 checkpoints; a scaler.pt that state.json omits is refused, not skipped.
    load_scaler = accelerator.scaler is not None and (SCALER_FILE in record["files"] or (path / SCALER_FILE).exists())
    try:
        weights = load_safetensors(_verified_bytes(path, record, "model.safetensors"))
        accelerator.unwrap_model(model).load_state_dict(weights)
        optimizer.load_state_dict(tensors("optimizer.pt"))
        scheduler.load_state_dict(tensors("scheduler.pt"))
        if load_scaler:
            accelerator.scaler.load_state_dict(tensors(SCALER_FILE))
        if lookahead is not None:
            lookahead.load_state_dict(load_safetensors(_verified_bytes(path, record, LOOKAHEAD_FILE)))
    except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {first_line(exc)}") from None
    if record.get("num_processes") != accelerator.num_processes:
        raise CheckpointError(
            f"checkpoint {path} was written by {record.get('num_processes')} processes, this run has "
            f"{accelerator.num_processes}: resume with the same process count")
    rng = f"rng_{accelerator.process_index}.pt"
    try:
        _set_rng_state(tensors(rng))
    except (RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        # A resume with the wrong RNG state would silently diverge from the uninterrupted run.
        raise CheckpointError(f"checkpoint {path}: cannot restore the RNG state from {rng} "
                              f"({first_line(exc)})") from None
    return TrainState(**{k: record[k] for k in asdict(TrainState())})


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
