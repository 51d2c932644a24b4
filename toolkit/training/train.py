"""Training with Hugging Face Accelerate: `train(config)` reads top to bottom.

The same code runs on CPU, one GPU, or N processes under `accelerate launch`: Accelerate shards
the data (`prepare`), averages gradients (`backward`), gathers predictions exactly
(`gather_for_metrics`) and picks the process that writes (`is_main_process`). Nothing here reads
a rank or world size by hand.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from toolkit.core.errors import DivergenceError, Interrupted
from toolkit.training.accelerator import open_run, resolve_precision
from toolkit.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from toolkit.training.config import TrainConfig
from toolkit.training.data import Splits, load_splits, make_loader
from toolkit.training.evaluate import EvalResult, evaluate
from toolkit.training.metrics import MetricLogger
from toolkit.training.models import build_model
from toolkit.training.optim import build_optimizer, build_scheduler
from toolkit.training.runs import CHECKPOINTS, EVAL, METRICS, MODEL, DataInfo, RunInfo, RunRecord, RunSession, \
    prepare_run_folder, save_model, versions
from toolkit.training.signals import GracefulStop


@dataclass
class TrainResult:
    """What `train` returns: the run folder, its record (config.json) and the final evaluation."""

    run_dir: Path
    record: RunRecord
    evaluation: EvalResult


@dataclass
class Loop:
    """Everything a training step needs, built once by `train` and passed to `train_one_epoch`."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    loss_fn: nn.Module
    train_dl: torch.utils.data.DataLoader
    run_dir: Path
    total_steps: int
    state: TrainState = field(default_factory=TrainState)

    @property
    def done(self) -> bool:
        return self.state.global_step >= self.total_steps

    def checkpoint(self) -> None:
        save_checkpoint(self.accelerator, self.run_dir / CHECKPOINTS, self.state, self.model, self.optimizer,
                        self.scheduler, self.cfg.keep_checkpoints)


def train(cfg: TrainConfig, session: RunSession | None = None) -> TrainResult:
    """Train, checkpoint and evaluate one run:

        accelerator, locked run folder -> run folder checks -> status.json -> data -> model, optimizer,
        loaders (prepared), schedule -> resume -> config.json -> for each epoch: train_one_epoch (logging,
        checkpoints) -> validate -> checkpoint -> final weights -> evaluate on the test split (or val) -> eval.json

    `session` is the caller's hold on the run folder when training is part of a longer command (`toolkit run`).
    """
    if session is None:
        with open_run(cfg, "toolkit train") as opened:
            return train(cfg, opened)
    accelerator, run_dir = session.accelerator, session.run_dir
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    resume_from = prepare_run_folder(cfg, run_dir, accelerator)
    session.claim()
    splits = load_splits(cfg.data)
    eval_split, eval_note = splits.held_out("test")
    loop = build_loop(cfg, accelerator, run_dir, splits)
    session.follow(lambda: loop.state.global_step)
    eval_dl = accelerator.prepare(make_loader(eval_split, cfg.eval_batch_size, shuffle=False))
    val_dl = accelerator.prepare(make_loader(splits.val, cfg.eval_batch_size, shuffle=False)) if len(splits.val) else None
    if resume_from is not None:
        loop.state = load_checkpoint(accelerator, resume_from, loop.model, loop.optimizer, loop.scheduler)
        accelerator.print(f"resumed from {resume_from} at step {loop.state.global_step} "
                          f"(epoch {loop.state.epoch + 1}, batch {loop.state.batches_done})")
    record = RunRecord(cfg, run_info(loop, splits, eval_split.name, eval_note))
    if accelerator.is_main_process:
        record.write(run_dir)
    _announce(loop, record, len(eval_split))
    logger = MetricLogger(accelerator, run_dir / METRICS, loop.state.global_step if cfg.resume else None,
                          loop.state.global_step, loop.total_steps, cfg.epochs, cfg.log_every, cfg.quiet)
    with GracefulStop() as stop:
        while loop.state.epoch < cfg.epochs and not loop.done:
            train_one_epoch(loop, logger, stop)
            if loop.done and loop.state.batches_done < len(loop.train_dl):
                loop.checkpoint()  # stopped mid-epoch by --max-steps
                break
            _end_epoch(loop, logger, val_dl, splits.train.classes)
    logger.close()
    return TrainResult(run_dir, record, _finish(loop, eval_dl, splits.train.classes, eval_split.name))


def build_loop(cfg: TrainConfig, accelerator: Accelerator, run_dir: Path, splits: Splits) -> Loop:
    """Model, optimizer and training loader, prepared; the LR schedule over the run's optimizer steps."""
    model = build_model(cfg.model, len(splits.train.classes))
    optimizer = build_optimizer(model, cfg.optim)
    train_dl = make_loader(splits.train, cfg.batch_size, shuffle=True, augment=cfg.data.augment, seed=cfg.seed)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    steps_per_epoch = math.ceil(len(train_dl) / cfg.optim.grad_accum_steps)
    total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or math.inf)
    scheduler = build_scheduler(optimizer.optimizer, cfg.optim, total_steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    return Loop(cfg, accelerator, model, optimizer, scheduler, loss_fn, train_dl, run_dir, total_steps)


def run_info(loop: Loop, splits: Splits, eval_split: str, eval_note: str | None) -> RunInfo:
    cfg, accelerator = loop.cfg, loop.accelerator
    return RunInfo(
        num_processes=accelerator.num_processes,
        distributed_type=str(accelerator.distributed_type),
        mixed_precision=accelerator.mixed_precision,
        mixed_precision_source=resolve_precision(cfg.mixed_precision).source,
        device=str(accelerator.device),
        torch_threads=torch.get_num_threads(),
        global_batch_size=cfg.batch_size * accelerator.num_processes * cfg.optim.grad_accum_steps,
        steps_per_epoch=math.ceil(len(loop.train_dl) / cfg.optim.grad_accum_steps),
        total_steps=loop.total_steps,
        data=DataInfo(splits.source, splits.train.classes, len(splits.train), len(splits.val), eval_split, eval_note),
        versions=versions())


def _announce(loop: Loop, record: RunRecord, eval_images: int) -> None:
    """One line on what is about to run, and the trackers' start (with the config as hyperparameters)."""
    info, accelerator = record.info, loop.accelerator
    accelerator.print(f"run {loop.run_dir}: {info.data.train} train / {info.data.val} val / {eval_images} "
                      f"{info.data.eval_split} images, {info.num_processes} process(es) on {accelerator.device}, "
                      f"mixed precision {info.mixed_precision} ({info.mixed_precision_source}), "
                      f"{info.total_steps} steps")
    if info.data.eval_note:
        accelerator.print(f"note: {info.data.eval_note}")
    if loop.cfg.log_with:  # trackers take scalars only
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in loop.cfg.flat().items()}
        accelerator.init_trackers(loop.run_dir.name, config=hparams)


def _end_epoch(loop: Loop, logger: MetricLogger, val_dl, classes: list[str]) -> None:
    """Validate, log the epoch, move to the next one and checkpoint."""
    state = loop.state
    val = evaluate(loop.model, val_dl, loop.accelerator, classes, "val") if val_dl else None
    logger.epoch({"kind": "epoch", "epoch": state.epoch + 1, "step": state.global_step,
                  "train_loss": logger.epoch_loss(), "train_seconds": round(state.train_seconds, 3),
                  "val_accuracy": val.accuracy if val else None, "val_loss": val.loss if val else None})
    state.epoch, state.batches_done = state.epoch + 1, 0
    loop.checkpoint()


def _finish(loop: Loop, eval_dl, classes: list[str], split: str) -> EvalResult:
    """Final fp32 weights, then the evaluation on the held-out split, written and printed."""
    accelerator = loop.accelerator
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(loop.model), loop.run_dir / MODEL, loop.cfg.model, classes)
    result = evaluate(loop.model, eval_dl, accelerator, classes, split)
    if accelerator.is_main_process:
        result.write(loop.run_dir / EVAL)
    accelerator.print(result.format())
    accelerator.print(f"run folder: {loop.run_dir}")
    # Every process reaches the end before any tears down the process group: a gloo process whose
    # peer is already gone can abort in its destructor.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


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


def train_one_epoch(loop: Loop, logger: MetricLogger, stop: GracefulStop) -> None:
    """One pass over the training loader, resumed mid-epoch when a checkpoint says so.

    Raises `DivergenceError` on a non-finite loss (unless skipping is allowed) and `Interrupted`
    after checkpointing when a stop signal arrived.
    """
    cfg, state, accelerator = loop.cfg, loop.state, loop.accelerator
    loop.train_dl.set_epoch(state.epoch)  # data order and augmentation from (seed, epoch)
    loop.train_dl.dataset.set_epoch(state.epoch)
    batches: Iterable = accelerator.skip_first_batches(loop.train_dl, state.batches_done) \
        if state.batches_done else loop.train_dl
    loop.model.train()
    for images, labels in batches:
        step_start = time.perf_counter()
        result = train_step(loop.model, images, labels, loop.optimizer, loop.loss_fn, accelerator, stop.requested)
        state.batches_done += 1
        if result.nonfinite:
            _skip_or_stop(loop, logger)
        logger.batch(result.loss, not result.nonfinite, len(labels))
        state.train_seconds += time.perf_counter() - step_start
        if not accelerator.sync_gradients:
            continue
        loop.scheduler.step()
        state.global_step += 1
        logger.step(state.global_step, state.epoch + 1, loop.scheduler.get_last_lr()[0], state.train_seconds)
        if result.stop:
            loop.checkpoint()
            raise Interrupted(f"stopped by signal after step {state.global_step}; checkpoint written. "
                              f"Continue with: --resume latest --output-dir <this run>")
        if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
            loop.checkpoint()
        if loop.done:
            break


def _skip_or_stop(loop: Loop, logger: MetricLogger) -> None:
    """A non-finite loss (no process updated the weights): stop naming the step, or skip the batch."""
    cfg, state = loop.cfg, loop.state
    where = f"step {state.global_step + 1} (epoch {state.epoch + 1}, batch {state.batches_done})"
    if cfg.on_nan == "stop" or state.nan_skips >= cfg.max_nan_skips:
        raise DivergenceError(f"non-finite loss at {where}; weights were not updated. "
                              + ("Lower --lr, or pass --on-nan skip" if cfg.on_nan == "stop" else
                                 f"--max-nan-skips {cfg.max_nan_skips} exhausted"))
    state.nan_skips += 1
    logger.note(f"warning: non-finite loss at {where}: batch skipped ({state.nan_skips}/{cfg.max_nan_skips})")
