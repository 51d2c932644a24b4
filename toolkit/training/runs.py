"""The run folder: its layout, the run record (config.json), final weights, and start-up checks.

runs/<name>/
  config.json        the TrainConfig, plus "runtime": the `RunInfo` of what the run really had
  metrics.jsonl      one JSON object per line (toolkit.training.metrics)
  checkpoints/       step_<global step>/ (toolkit.training.checkpoint)
  model.safetensors  final weights; metadata holds the model name and class names to rebuild it
  eval.json          final evaluation (toolkit.training.evaluate.EvalResult)
  status.json, .lock how the latest start ended; who writes the folder now (toolkit.training.status)

This module is the only reader and writer of config.json and model.safetensors: other modules get
typed records (`RunRecord`, `TrainedModel`), never the JSON. `RunSession` is what a command holds
while it owns the folder.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from toolkit import __version__
from toolkit.core.errors import (CheckpointError, ConfigError, DivergenceError, Interrupted, ToolkitError, exit_code,
                                 first_line)
from toolkit.core.files import write_json_atomic
from toolkit.training.checkpoint import STATE_FILE, find_latest, list_checkpoints, safetensors_state, verify_checkpoint
from toolkit.training.config import TrainConfig, resume_differences, train_config_from_dict
from toolkit.training.models import build_model
from toolkit.training.status import STATUS_FILE, Holder, RunLock, RunStatus, now

CONFIG = "config.json"
METRICS = "metrics.jsonl"
MODEL = "model.safetensors"
EVAL = "eval.json"
CHECKPOINTS = "checkpoints"


def default_run_name() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def versions() -> dict[str, str]:
    return {"toolkit": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version()}


@dataclass
class DataInfo:
    """The data a run really trained and was evaluated on."""

    source: str  # "cifar10:DIR", "imagefolder:DIR" or "synthetic"
    classes: list[str]
    train: int  # images in the training split (after the validation hold-out)
    val: int  # images held out for validation
    eval_split: str  # the split the final evaluation used: "test", or "val" when the source has none
    eval_note: str | None  # why eval_split is not "test", if it is not


@dataclass
class ResumeInfo:
    """One start of a run from a checkpoint: an entry of config.json's `runtime.resumes`, oldest first."""

    step: int  # the checkpoint's optimizer step, where this start continued
    checkpoint: str  # the checkpoint folder
    checkpoint_epochs: int | None  # --epochs of the run that wrote the checkpoint (None: not recorded)
    epochs: int  # --epochs from here on
    checkpoint_total_steps: int  # length of the checkpoint's LR schedule, in optimizer steps
    total_steps: int  # optimizer steps of the run from here on (--epochs, capped by --max-steps)
    schedule_rebuilt: bool  # the LR schedule was rebuilt over total_steps (optim.fit_schedule): the lengths differ


@dataclass
class RunInfo:
    """What a run really had, as opposed to what its config asked for: config.json's "runtime"."""

    num_processes: int
    distributed_type: str
    mixed_precision: str  # the precision Accelerate used: no, bf16 or fp16
    device: str  # the main process's device, e.g. "cpu" or "cuda:0"
    torch_threads: int  # intra-op threads per process
    global_batch_size: int  # images per optimizer step over all processes
    steps_per_epoch: int  # optimizer steps
    total_steps: int  # optimizer steps of the whole run (--epochs, capped by --max-steps)
    data: DataInfo
    versions: dict[str, str]
    compile_mode: str | None = None  # torch.compile mode of the training forward (--compile); None: not compiled
    # Who chose mixed_precision: "config" (--mixed-precision or --config), "launcher"
    # (ACCELERATE_MIXED_PRECISION: accelerate launch --mixed_precision or its config file) or "default";
    # "unrecorded" in config.json files written before it was recorded.
    mixed_precision_source: str = "unrecorded"
    # Every start from a checkpoint that led here, oldest first (--resume); empty for a run trained in one go.
    resumes: list[ResumeInfo] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunInfo:
        return cls(**{**d, "data": DataInfo(**d["data"]), "resumes": [ResumeInfo(**r) for r in d.get("resumes", [])]})


@dataclass
class RunRecord:
    """config.json: the config a run was started with and what it really had."""

    config: TrainConfig
    info: RunInfo

    def to_json(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "runtime": self.info.to_json()}

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> RunRecord:
        """The inverse of `to_json`; ValueError, KeyError or TypeError when `saved` is not a run record."""
        return cls(train_config_from_dict(saved), RunInfo.from_json(saved["runtime"]))

    def write(self, run_dir: Path) -> None:
        write_json_atomic(run_dir / CONFIG, self.to_json())

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord:
        path = Path(run_dir) / CONFIG
        if not path.is_file():
            raise CheckpointError(f"--run {run_dir}: not a run folder (no {CONFIG})")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: unreadable ({first_line(exc)})") from None


def save_model(model: nn.Module, path: Path, model_name: str, classes: list[str]) -> None:
    """Final weights with what is needed to rebuild the module (written atomically)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(safetensors_state(model.state_dict()), tmp, metadata={"model": model_name, "classes": json.dumps(classes)})
    os.replace(tmp, path)


@dataclass
class TrainedModel:
    model: nn.Module
    model_name: str
    classes: list[str]
    path: Path


def load_model(path: Path, data: bytes | None = None, model: str | None = None) -> TrainedModel:
    """Rebuild an eval-mode fp32 model from a `model.safetensors` written by `save_model`.

    `data`: the file's bytes when the caller already read (and hash-checked) them; otherwise the file is
    read here, once. `model`: the model the user names for this command (`--model`), see `rebuild_model`.
    """
    if data is None:
        if not path.is_file():
            raise CheckpointError(f"{path}: no such model file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        name, classes = _model_header(data)
        state = load_safetensors(data)
    except (SafetensorError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a toolkit model file ({first_line(exc)})") from None
    return TrainedModel(rebuild_model(name, classes, state, str(path), model), name, classes, path)


def _model_header(data: bytes) -> tuple[str, list[str]]:
    """(model name, class names) from the metadata of a safetensors file's header (an 8-byte little-endian
    length, then that many bytes of JSON whose `__metadata__` maps strings to strings)."""
    size = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + size])["__metadata__"]
    name, classes = meta["model"], json.loads(meta["classes"])
    if not isinstance(name, str) or not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ValueError("its model name and class names are not strings")
    return name, classes


def rebuild_model(name: str, classes: list[str], state: dict[str, torch.Tensor], source: str,
                  model: str | None = None) -> nn.Module:
    """The model `name` with `state` loaded, fp32 and in eval mode; `source` names the weights in errors.

    `model` is the model the user names for this command (`--model`), if any: it must be the weights' own,
    and a user's factory (`package.module:factory`) is imported only when the user names it: a file alone
    never makes the toolkit run code. Mixed-precision runs keep fp32 master weights; `.float()` also covers
    any half-precision state.
    """
    if model is not None and model != name:
        raise ConfigError(f"--model {model}: {source} holds weights of model {name!r}")
    built = build_model(name, len(classes), import_code=model == name)
    try:
        built.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: weights do not fit model {name!r}: {first_line(exc)}") from None
    return built.float().eval()


def remove_run_files(run_dir: Path) -> None:
    """Delete what a training run wrote into `run_dir` (for --overwrite), leaving anything else."""
    for name in (CONFIG, METRICS, MODEL, EVAL, STATUS_FILE):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)


@dataclass
class ResumePoint:
    """The checkpoint a run continues from, and what is known of the run that wrote it."""

    path: Path
    state: dict[str, Any]  # its state.json: the training position (TrainState's fields) and more
    record: RunRecord | None  # the run that wrote it (see `read_resume_point`); None: not known

    @property
    def step(self) -> int:
        return self.state["global_step"]

    def history(self) -> list[ResumeInfo]:
        """The resumes that led to the checkpoint, oldest first. (A run folder's config.json, read for older
        checkpoints, may also list later resumes, from later checkpoints.)"""
        return [r for r in self.record.info.resumes if r.step <= self.step] if self.record else []


def read_resume_point(path: Path, warn: Callable[[str], None]) -> ResumePoint:
    """A verified checkpoint and the run that wrote it: the record in its state.json, or, for checkpoints written
    before state.json held one, the config.json of the run folder holding it (`warn`ed when that is missing or
    unreadable: the run then resumes unchecked)."""
    state = json.loads((path / STATE_FILE).read_text())  # verified by the caller
    if "run" in state:
        try:
            return ResumePoint(path, state, RunRecord.from_json(state["run"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path}: unreadable run record in {STATE_FILE} ({first_line(exc)})") \
                from None
    beside = path.parent.parent / CONFIG
    try:
        return ResumePoint(path, state, RunRecord.from_json(json.loads(beside.read_text())))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = f"no {beside}" if isinstance(exc, FileNotFoundError) else f"{beside} is unreadable ({first_line(exc)})"
        warn(f"warning: checkpoint {path} does not record its run's config and {reason}: this run's config is not "
             "checked against the checkpoint's")
        return ResumePoint(path, state, None)


def check_resume(cfg: TrainConfig, precision: str, point: ResumePoint) -> None:
    """Refuse, in one line, a resume that ends before its checkpoint, or whose config would change what the
    checkpoint's steps mean (every field but `config.RESUME_MAY_CHANGE` and the length, `config.RESUME_LENGTH`);
    `precision` is the mixed precision this run uses."""
    epoch, batches = point.state["epoch"], point.state["batches_done"]
    begun = epoch + (1 if batches else 0)  # epochs the checkpoint has started
    where = f"checkpoint {point.path} (step {point.step}, {'in' if batches else 'end of'} epoch {begun})"
    if cfg.epochs < begun:
        raise ConfigError(f"--resume: --epochs {cfg.epochs} ends before {where}: pass --epochs {begun} or more")
    if cfg.max_steps is not None and cfg.max_steps < point.step:
        raise ConfigError(f"--resume: --max-steps {cfg.max_steps} ends before {where}: pass --max-steps "
                          f"{point.step} or more, or none")
    if point.record is None:
        return
    saved = {**point.record.config.flat(), "mixed_precision": point.record.info.mixed_precision}
    differences = resume_differences(saved, {**cfg.flat(), "mixed_precision": precision})
    if differences:
        repeat = point.path.parent.parent / CONFIG
        hint = f" (--config {repeat} repeats them)" if repeat.is_file() else ""
        raise ConfigError(f"--resume: this run's config differs from that of {where}: "
                          f"{', '.join(differences)}; resume with the checkpoint's values{hint}, or start a new run "
                          "in another --output-dir")


def check_resume_data(point: ResumePoint, data: DataInfo) -> None:
    """Refuse a resume whose data are not the checkpoint's run's though the config is (image files added, removed or
    renamed): its data position (epoch, batches done) would land on other images."""
    if point.record is None:
        return
    saved = point.record.info.data
    differences = [f"{what} {now} (checkpoint: {then})" for what, now, then in [
        ("training images", data.train, saved.train), ("validation images", data.val, saved.val),
        ("classes", data.classes, saved.classes)] if now != then]
    if differences:
        raise CheckpointError(f"--resume: the data differ from checkpoint {point.path}'s run: {', '.join(differences)}"
                              "; resume with the checkpoint's data, or start a new run in another --output-dir")


def prepare_run_folder(cfg: TrainConfig, run_dir: Path, accelerator: Accelerator) -> ResumePoint | None:
    """Create the run folder and return the checkpoint to resume from, if any, checked against this run's config
    (`check_resume`).

    Refuses to train over an existing run by accident: that takes `--resume` or `--overwrite`.
    """
    resume_from = None
    if cfg.resume == "latest":
        # Restart loops call `--resume latest` blindly: with no checkpoint yet, start from step 0.
        if list_checkpoints(run_dir / CHECKPOINTS):
            resume_from, skipped = find_latest(run_dir / CHECKPOINTS)
            for line in skipped:
                accelerator.print(f"warning: skipping {line}")
        else:
            accelerator.print(f"--resume latest: no checkpoint in {run_dir / CHECKPOINTS}: starting from step 0")
    elif cfg.resume:
        path = Path(cfg.resume)
        if (path / CHECKPOINTS).is_dir() and not (path / STATE_FILE).exists():
            resume_from, _ = find_latest(path / CHECKPOINTS)  # a run folder: its newest good checkpoint
        else:
            verify_checkpoint(path)
            resume_from = path
    elif (run_dir / CONFIG).exists() or list_checkpoints(run_dir / CHECKPOINTS):
        if not cfg.overwrite:
            raise CheckpointError(f"--output-dir {run_dir} already holds a run: pass --resume latest to continue it, "
                                  "--overwrite to replace it, or choose another --output-dir")
        if accelerator.is_main_process:
            remove_run_files(run_dir)  # only the files a run writes, never the rest of the folder
    start = None
    if resume_from is not None:
        start = read_resume_point(resume_from, accelerator.print)
        check_resume(cfg, accelerator.mixed_precision, start)
    if accelerator.is_main_process:
        try:
            (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"--output-dir {run_dir}: cannot create ({exc.strerror})") from None
    accelerator.wait_for_everyone()
    return start


class RunSession:
    """A command's hold on its run folder (`toolkit train`, `toolkit run`), entered by every process.

    On entry the main process locks the folder (`status.RunLock`) and tells the others, through a
    broadcast, whether it could: no process writes into a folder another run owns. Once the run has
    claimed the folder (`claim`, after the start-up checks of `prepare_run_folder`) the main process
    records in status.json that it is running, and on every way out how it ended: done, interrupted,
    diverged or failed, with the exit code `toolkit` ends with. Refused starts (a folder holding
    another run, a bad --resume) leave the folder's status.json alone.
    """

    def __init__(self, accelerator: Accelerator, run_dir: Path, command: str) -> None:
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.holder = Holder.this_process(command)
        self._lock: RunLock | None = None
        self._claimed = False
        self._step: Callable[[], int] | None = None

    def __enter__(self) -> RunSession:
        refusal: list[str | None] = [None]
        if self.accelerator.is_main_process:
            try:
                self._lock, warning = RunLock.acquire(self.run_dir, self.holder)
                if warning:
                    self.accelerator.print(warning)
            except CheckpointError as exc:
                refusal[0] = str(exc)
        broadcast_object_list(refusal)
        if refusal[0] is not None:
            raise CheckpointError(refusal[0])
        return self

    def claim(self) -> None:
        """The folder is this run's now (new, resumed or overwritten): status.json says running."""
        self._claimed = True
        self._record("running", None, "started")

    def follow(self, step: Callable[[], int]) -> None:
        """Where the run stands (its optimizer step), read when status.json is written."""
        self._step = step

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self._claimed:
                self._record(*_outcome(exc))
            if isinstance(exc, (Interrupted, DivergenceError)):
                # Every process raises these together (all read the same step flags). The others wait
                # until status.json is written: once one process exits, the launcher stops the rest.
                self.accelerator.wait_for_everyone()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _record(self, state: str, code: int | None, message: str) -> None:
        if self.accelerator.is_main_process:
            step = self._step() if self._step else None
            RunStatus(state, step, code, message, now(), self.holder).write(self.run_dir)


def _outcome(exc: BaseException | None) -> tuple[str, int, str]:
    """(state, exit code, message) of a command that ended with `exc` (None: success)."""
    if exc is None:
        return "done", 0, "finished"
    state = "interrupted" if isinstance(exc, Interrupted) else "diverged" if isinstance(exc, DivergenceError) \
        else "failed"
    return state, exit_code(exc), str(exc) if isinstance(exc, ToolkitError) else first_line(exc)
