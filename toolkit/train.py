"""Training with Hugging Face Accelerate. `train(config)` reads top to bottom:

    accelerator -> run folder -> data -> model, optimizer -> prepare -> schedule -> resume
    -> for each epoch: train_one_epoch (logging, checkpoints) -> validate -> checkpoint
    -> final weights -> evaluate on the test split (or val) -> eval.json

The same code runs on CPU, one GPU, or N processes under `accelerate launch`: Accelerate shards
the data (`prepare`), averages gradients (`backward`), gathers predictions exactly
(`gather_for_metrics`) and picks the process that writes (`is_main_process`). Nothing here reads
a rank or world size by hand, except to check that the launcher started what was asked.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from toolkit.checkpoint import TrainState, find_latest, list_checkpoints, load_checkpoint, save_checkpoint, \
    verify_checkpoint
from toolkit.config import TrainConfig
from toolkit.data import load_splits, make_loader
from toolkit.errors import CheckpointError, ConfigError, DivergenceError, Interrupted, LaunchError, first_line
from toolkit.evaluate import evaluate
from toolkit.models import build_model
from toolkit.progress import Progress
from toolkit.signals import GracefulStop
from toolkit.runs import CHECKPOINTS, CONFIG, EVAL, METRICS, MODEL, MetricsLog, default_run_name, \
    remove_run_files, save_model, versions

# Environment variables through which launchers announce the world size they started
# (torchrun / accelerate's multi-process launcher, then MPI flavours).
_LAUNCHER_WORLD_SIZE = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class LRSchedule:
    """Learning-rate multiplier as a function of the optimizer step (picklable, for LambdaLR).

    onecycle: linear warm-up from 1/25 to 1, then linear decay to 0 at `total_steps`;
    cosine:   linear warm-up from 1/25 to 1, then cosine decay to 0; none: constant 1.
    """

    def __init__(self, kind: str, total_steps: int, warmup_fraction: float) -> None:
        self.kind = kind
        self.total_steps = max(total_steps, 1)
        self.warmup_steps = int(warmup_fraction * total_steps)

    def __call__(self, step: int) -> float:
        if self.kind == "none":
            return 1.0
        if step < self.warmup_steps:
            return 1 / 25 + (1 - 1 / 25) * step / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        if self.kind == "onecycle":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def wants_cpu() -> bool:
    """Run on the CPU: asked for (ACCELERATE_USE_CPU, as `accelerate launch --cpu` sets it) or no accelerator."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or \
        not torch.accelerator.is_available()


def build_accelerator(cfg: TrainConfig) -> tuple[Accelerator, Path]:
    """An Accelerator for this config and the run folder (the same on every process).

    Rejects fp16 on CPU and a launcher/world-size mismatch before any work is done.
    """
    use_cpu = wants_cpu()
    if cfg.mixed_precision == "fp16" and use_cpu:
        # Accelerate would silently train in fp32 on CPU.
        raise ConfigError("--mixed-precision fp16: needs a GPU and this run is on the CPU; use bf16 on CPU")
    # cpu=True on a machine without a GPU makes N launched processes join one gloo group; without
    # it, torchrun-style launches on CPU give N unconnected rank-0 runs. The timeout bounds how
    # long survivors wait in a collective when another process has died.
    state = PartialState(cpu=use_cpu, timeout=timedelta(seconds=cfg.dist_timeout))
    announced = next((int(os.environ[k]) for k in _LAUNCHER_WORLD_SIZE if os.environ.get(k)), 1)
    expected = cfg.expect_processes or announced
    if state.num_processes != expected:
        raise LaunchError(
            f"world size mismatch: {expected} processes were asked for "
            f"({'--expect-processes' if cfg.expect_processes else 'launcher environment'}) but Accelerate sees "
            f"{state.num_processes}. On CPU launch with launch/cpu-2proc.yaml (see launch/README.md)")
    name = [cfg.output_dir or str(Path("runs") / default_run_name())]
    broadcast_object_list(name)  # one timestamp for all processes
    trackers = [t.strip() for t in cfg.log_with.split(",") if t.strip()] if cfg.log_with else None
    try:
        accelerator = Accelerator(cpu=use_cpu, mixed_precision=cfg.mixed_precision,
                                  gradient_accumulation_steps=cfg.optim.grad_accum_steps,
                                  log_with=trackers, project_dir=name[0])
    except (ValueError, ImportError) as exc:
        if not trackers:
            raise
        raise ConfigError(f"--log-with {cfg.log_with}: {first_line(exc)}") from None
    return accelerator, Path(name[0])


def resolve_resume(cfg: TrainConfig, run_dir: Path, accelerator: Accelerator) -> Path | None:
    """The checkpoint to resume from, if any; refuses to train over an existing run by accident."""
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
        if (path / CHECKPOINTS).is_dir() and not (path / "state.json").exists():
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
    if accelerator.is_main_process:
        try:
            (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"--output-dir {run_dir}: cannot create ({exc.strerror})") from None
    accelerator.wait_for_everyone()
    return resume_from


def train(cfg: TrainConfig) -> Path:
    """Train, checkpoint and evaluate one run; return its folder."""
    accelerator, run_dir = build_accelerator(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    resume_from = resolve_resume(cfg, run_dir, accelerator)

    splits = load_splits(cfg.data)
    classes = splits.train.classes
    eval_split, eval_note = splits.held_out("test")
    model = build_model(cfg.model, len(classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay)
    train_dl = make_loader(splits.train, cfg.batch_size, shuffle=True, augment=cfg.data.augment, seed=cfg.seed)
    eval_dl = make_loader(eval_split, cfg.eval_batch_size, shuffle=False)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    val_dl = accelerator.prepare(make_loader(splits.val, cfg.eval_batch_size, shuffle=False)) \
        if len(splits.val) else None

    steps_per_epoch = math.ceil(len(train_dl) / cfg.optim.grad_accum_steps)
    total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or math.inf)
    # Built on the unwrapped optimizer and stepped once per optimizer step (not prepared: Accelerate
    # would step it num_processes times per call), so the LR is a function of the step alone.
    scheduler = LambdaLR(optimizer.optimizer, LRSchedule(cfg.optim.schedule, total_steps, cfg.optim.warmup_fraction))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, model, optimizer, scheduler)
        accelerator.print(f"resumed from {resume_from} at step {state.global_step} "
                          f"(epoch {state.epoch + 1}, batch {state.batches_done})")
    metrics = MetricsLog(run_dir / METRICS, state.global_step if cfg.resume else None) \
        if accelerator.is_main_process else None
    if accelerator.is_main_process:
        _write_config(run_dir, cfg, accelerator, splits, eval_split.name, eval_note, steps_per_epoch, total_steps)
    accelerator.print(f"run {run_dir}: {len(splits.train)} train / {len(splits.val)} val / {len(eval_split)} "
                      f"{eval_split.name} images, {accelerator.num_processes} process(es) on {accelerator.device}, "
                      f"mixed precision {accelerator.mixed_precision}, {total_steps} steps")
    if eval_note:
        accelerator.print(f"note: {eval_note}")
    if cfg.log_with:
        accelerator.init_trackers(run_dir.name, config=_hparams(cfg))

    def checkpoint() -> None:
        save_checkpoint(accelerator, run_dir / CHECKPOINTS, state, model, optimizer, scheduler,
                        cfg.keep_checkpoints)

    progress = Progress(total_steps, state.global_step, accelerator.is_main_process, cfg.quiet, cfg.log_every)
    with GracefulStop() as stop:
        while state.epoch < cfg.epochs and state.global_step < total_steps:
            train_dl.set_epoch(state.epoch)  # data order and augmentation from (seed, epoch)
            train_dl.dataset.set_epoch(state.epoch)
            loader = accelerator.skip_first_batches(train_dl, state.batches_done) if state.batches_done else train_dl
            train_loss = train_one_epoch(model, loader, optimizer, scheduler, loss_fn, accelerator, state, cfg,
                                         total_steps, metrics, progress, stop, checkpoint)
            if state.global_step >= total_steps and state.batches_done < len(train_dl):
                checkpoint()  # stopped mid-epoch by --max-steps
                break
            val = evaluate(model, val_dl, accelerator, classes, "val") if val_dl else None
            record = {"kind": "epoch", "epoch": state.epoch + 1, "step": state.global_step, "train_loss": train_loss,
                      "train_seconds": round(state.train_seconds, 3),
                      "val_accuracy": val.accuracy if val else None, "val_loss": val.loss if val else None}
            if metrics:
                metrics.write(record)
            accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=state.global_step)
            progress.write(f"epoch {state.epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}"
                           + (f", val accuracy {100 * val.accuracy:.1f} %" if val else "")
                           + f", {state.train_seconds:.1f} s training")
            state.epoch, state.batches_done = state.epoch + 1, 0
            checkpoint()
    progress.close()

    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), run_dir / MODEL, cfg.model, classes)
    result = evaluate(model, eval_dl, accelerator, classes, eval_split.name)
    if accelerator.is_main_process:
        result.write(run_dir / EVAL)
    accelerator.print(result.format())
    accelerator.print(f"run folder: {run_dir}")
    accelerator.end_training()
    return run_dir


@dataclass
class StepResult:
    loss: torch.Tensor
    nonfinite: bool  # some process saw a non-finite loss; no process updated the weights
    stop: bool  # some process received SIGTERM/SIGINT


def train_step(model, images: torch.Tensor, labels: torch.Tensor, optimizer, loss_fn, accelerator: Accelerator,
               stop_requested: bool = False) -> StepResult:
    """Forward, a cross-process check, then backward and (on accumulation boundaries) an optimizer step.

    The check is one all-reduce of two flags, so every process takes the same branch: skipping a
    backward on one rank only would deadlock the gradient all-reduce of the others.
    """
    with accelerator.accumulate(model):
        logits = model(images)  # prepare() wrapped forward in autocast for bf16/fp16
        loss = loss_fn(logits.float(), labels)  # the loss in fp32 whatever the autocast dtype
        flags = torch.tensor([0.0 if torch.isfinite(loss) else 1.0, float(stop_requested)], device=accelerator.device)
        flags = accelerator.reduce(flags, "sum")
        nonfinite, stop = bool(flags[0] > 0), bool(flags[1] > 0)
        if nonfinite:
            optimizer.zero_grad(set_to_none=True)  # drop this batch and anything accumulated with it
        else:
            accelerator.backward(loss)
            optimizer.step()  # a no-op between accumulation boundaries
            optimizer.zero_grad(set_to_none=True)
    return StepResult(loss.detach(), nonfinite, stop)


def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, accelerator: Accelerator, state: TrainState,
                    cfg: TrainConfig, total_steps: int, metrics: MetricsLog | None, progress: Progress,
                    stop: GracefulStop, checkpoint) -> float:
    """One pass over `loader` (possibly resumed mid-epoch); returns the mean loss of this process's batches.

    Raises `DivergenceError` on a non-finite loss (unless skipping is allowed) and `Interrupted`
    after checkpointing when a stop signal arrived.
    """
    model.train()
    loss_sum, batches = 0.0, 0
    window_loss, window_batches, window_images, window_start = 0.0, 0, 0, time.perf_counter()
    for images, labels in loader:
        step_start = time.perf_counter()
        result = train_step(model, images, labels, optimizer, loss_fn, accelerator, stop.requested)
        state.batches_done += 1
        if result.nonfinite:
            where = f"step {state.global_step + 1} (epoch {state.epoch + 1}, batch {state.batches_done})"
            if cfg.on_nan == "stop" or state.nan_skips >= cfg.max_nan_skips:
                raise DivergenceError(f"non-finite loss at {where}; weights were not updated. "
                                      + ("Lower --lr, or pass --on-nan skip" if cfg.on_nan == "stop" else
                                         f"--max-nan-skips {cfg.max_nan_skips} exhausted"))
            state.nan_skips += 1
            progress.write(f"warning: non-finite loss at {where}: batch skipped ({state.nan_skips}/{cfg.max_nan_skips})")
        else:
            loss_value = result.loss.item()
            loss_sum, batches = loss_sum + loss_value, batches + 1
            window_loss, window_batches = window_loss + loss_value, window_batches + 1
        window_images += len(labels) * accelerator.num_processes
        state.train_seconds += time.perf_counter() - step_start
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        state.global_step += 1
        if state.global_step % cfg.log_every == 0 or state.global_step == total_steps:
            mean_loss = accelerator.reduce(
                torch.tensor(window_loss / max(window_batches, 1), device=accelerator.device), "mean").item()
            images_per_s = window_images / (time.perf_counter() - window_start)
            record = {"kind": "step", "step": state.global_step, "epoch": state.epoch + 1, "loss": mean_loss,
                      "lr": scheduler.get_last_lr()[0], "images_per_s": images_per_s,
                      "train_seconds": round(state.train_seconds, 3)}
            if metrics:
                metrics.write(record)
            accelerator.log({k: record[k] for k in ("loss", "lr", "images_per_s")}, step=state.global_step)
            progress.step(state.global_step, state.epoch + 1, cfg.epochs, mean_loss, scheduler.get_last_lr()[0],
                          images_per_s)
            window_loss, window_batches, window_images, window_start = 0.0, 0, 0, time.perf_counter()
        if result.stop:
            checkpoint()
            raise Interrupted(f"stopped by signal after step {state.global_step}; checkpoint written. "
                              f"Continue with: --resume latest --output-dir <this run>")
        if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
            checkpoint()
        if state.global_step >= total_steps:
            break
    return loss_sum / max(batches, 1)


def _hparams(cfg: TrainConfig) -> dict[str, int | float | str | bool]:
    """The config flattened to the scalar types every tracker accepts."""
    flat = {k: v for k, v in cfg.to_dict().items() if not isinstance(v, dict)}
    for group in ("data", "optim"):
        flat.update(cfg.to_dict()[group])
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def _write_config(run_dir: Path, cfg: TrainConfig, accelerator: Accelerator, splits, eval_split: str,
                  eval_note: str | None, steps_per_epoch: int, total_steps: int) -> None:
    runtime = {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "torch_threads": torch.get_num_threads(),
        "global_batch_size": cfg.batch_size * accelerator.num_processes * cfg.optim.grad_accum_steps,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "data": {"source": splits.source, "classes": splits.train.classes, "train": len(splits.train),
                 "val": len(splits.val), "eval_split": eval_split, "eval_note": eval_note},
        "versions": versions(),
    }
    (run_dir / CONFIG).write_text(json.dumps({**cfg.to_dict(), "runtime": runtime}, indent=2))
