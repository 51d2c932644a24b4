"""Training with Hugging Face Accelerate: `train(config)` reads top to bottom.

The same code runs on CPU, one GPU, or N processes under `accelerate launch`: Accelerate shards
the data (`prepare`), averages gradients (`backward`), gathers predictions exactly
(`gather_for_metrics`) and picks the process that writes (`is_main_process`). Nothing here reads
a rank or world size by hand.

The steady-state step never waits for the device. On a GPU a step of this small net takes well
under a millisecond, so a host read per step (`loss.item()`, `bool(flag)`) would cost more than
the step itself. Instead:

- the training data lives on the device (`make_loader(device=...)`) and batches are cut and
  augmented there;
- losses are summed on the device and read only when a metrics record is written (`MetricLogger`);
- a step whose gradients are not finite changes no weights, decided on the device: the fused SGD
  kernel skips the update when told `found_inf`, as GradScaler does for fp16 (`train_step`). A
  non-finite loss on any process gives non-finite gradients on every process after the gradient
  all-reduce, so all processes skip the same steps without talking to each other;
- what the host must act on (a non-finite loss: stop or count a skip; a stop signal: checkpoint and
  exit) is recorded on the device per step and read every `CHECK_EVERY` steps, before every
  checkpoint and at every epoch end, with one all-reduce so that every process takes the same branch
  (`StepFlags`). A stop signal is therefore honoured within `CHECK_EVERY` steps.
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
from toolkit.training.data import Split, Splits, load_splits, make_loader, normalize
from toolkit.training.evaluate import EvalResult, evaluate
from toolkit.training.metrics import MetricLogger
from toolkit.training.models import build_model, init_whitening
from toolkit.training.optim import Lookahead, build_optimizer, build_scheduler, fit_schedule
from toolkit.training.runs import CHECKPOINTS, EVAL, METRICS, MODEL, DataInfo, ResumeInfo, ResumePoint, RunInfo, \
    RunRecord, RunSession, check_resume_data, prepare_run_folder, save_model, versions
from toolkit.training.signals import GracefulStop


@dataclass
class TrainResult:
    """What `train` returns: the run folder, its record (config.json) and the final evaluation."""

    run_dir: Path
    record: RunRecord
    evaluation: EvalResult


CHECK_EVERY = 16  # optimizer steps between host reads of the step flags (see StepFlags)


@dataclass
class Loop:
    """Everything a training step needs, built once by `train` and passed to `train_one_epoch`."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: nn.Module  # prepared by Accelerate; evaluated, checkpointed and saved
    forward: nn.Module  # what the training step calls: `model`, or `torch.compile(model)` with --compile
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    loss_fn: nn.Module
    train_dl: torch.utils.data.DataLoader
    run_dir: Path
    total_steps: int
    compile_mode: str | None  # torch.compile mode, None without --compile
    lookahead: Lookahead | None  # with --lookahead-every
    state: TrainState = field(default_factory=TrainState)
    record: RunRecord | None = None  # config.json's record, once written; every checkpoint carries it

    @property
    def done(self) -> bool:
        return self.state.global_step >= self.total_steps

    def checkpoint(self) -> None:
        save_checkpoint(self.accelerator, self.run_dir / CHECKPOINTS, self.state, self.model, self.optimizer,
                        self.scheduler, self.cfg.keep_checkpoints, self.record.to_json() if self.record else None,
                        self.lookahead)


class StepFlags:
    """What the host learns about recent steps, read every `CHECK_EVERY` steps instead of after each one.

    `bad[i]` is 1 on the device where optimizer step `first + i + 1` had a non-finite loss on this
    process; the last slot carries this process's stop request into the read. A read is one
    all-reduce (sum) of the vector, so every process sees the same steps and the same stop request.
    """

    def __init__(self, device: torch.device, first: int) -> None:
        self.flags = torch.zeros(CHECK_EVERY + 1, device=device)
        self.first = first  # global step before slot 0

    def record(self, loss: torch.Tensor, global_step: int) -> None:
        """Mark the step under way (the one after `global_step`) if `loss` is not finite; no host read."""
        slot = self.flags[global_step - self.first: global_step - self.first + 1]
        torch.maximum(slot, (~torch.isfinite(loss)).float().reshape(1), out=slot)

    def due(self, global_step: int) -> bool:
        return global_step - self.first >= CHECK_EVERY

    def read(self, accelerator: Accelerator, stop_requested: bool, global_step: int) -> tuple[list[int], bool]:
        """(the steps up to `global_step` whose loss was not finite on some process, whether some process
        was asked to stop); then start a new window after `global_step`."""
        self.flags[-1] = float(stop_requested)
        flags = accelerator.reduce(self.flags, "sum").tolist()  # the only host-device sync of the window
        bad = [self.first + i + 1 for i, v in enumerate(flags[:-1]) if v > 0]
        self.flags.zero_()
        self.first = global_step
        return bad, flags[-1] > 0


def train(cfg: TrainConfig, session: RunSession | None = None) -> TrainResult:
    """Train, checkpoint and evaluate one run:

        accelerator, locked run folder -> run folder checks (a resume's config against its checkpoint's) ->
        status.json -> data -> model, optimizer, loaders (prepared), schedule -> resume (the schedule fitted to this
        run's length) -> config.json -> for each epoch: train_one_epoch (logging, checkpoints) -> validate ->
        checkpoint -> final weights -> evaluate on the test split (or val) -> eval.json

    `session` is the caller's hold on the run folder when training is part of a longer command (`toolkit run`).
    """
    if session is None:
        with open_run(cfg, "toolkit train") as opened:
            return train(cfg, opened)
    accelerator, run_dir = session.accelerator, session.run_dir
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    start = prepare_run_folder(cfg, run_dir, accelerator)
    session.claim()
    splits = load_splits(cfg.data)
    eval_split, eval_note = splits.held_out("test")
    data = DataInfo(splits.source, splits.train.classes, len(splits.train), len(splits.val), eval_split.name,
                    eval_note)
    loop = build_loop(cfg, accelerator, run_dir, splits)
    session.follow(lambda: loop.state.global_step)
    eval_dl = accelerator.prepare(make_loader(eval_split, cfg.eval_batch_size, shuffle=False, device=accelerator.device))
    val_dl = accelerator.prepare(make_loader(splits.val, cfg.eval_batch_size, shuffle=False,
                                             device=accelerator.device)) if len(splits.val) else None
    resumes = _resume(loop, start, data) if start is not None else []
    record = loop.record = RunRecord(cfg, run_info(loop, data, resumes))
    if accelerator.is_main_process:
        record.write(run_dir)
    _announce(loop, record, len(eval_split))
    logger = MetricLogger(accelerator, run_dir / METRICS, loop.state.global_step if cfg.resume else None,
                          loop.state.global_step, loop.total_steps, cfg.epochs, cfg.log_every, cfg.quiet,
                          loop.state.train_seconds)
    if loop.compile_mode:
        logger.compiled(loop.state.global_step, warm_up(loop))
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
    """Model (its first layer whitened with --whiten-images, channels-last with --channels-last), optimizer and
    training loader (its images on the device), prepared; the LR schedule over the run's optimizer steps; the
    Lookahead copy; the compiled forward with --compile."""
    model = build_model(cfg.model, len(splits.train.classes), import_code=True)  # the user named it
    if cfg.whiten_images:
        init_whitening(model, _sample(splits.train, cfg.whiten_images, cfg.seed))
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format  # of the model and its batches
    if cfg.channels_last:
        model = model.to(memory_format=layout)
    optimizer = build_optimizer(model, cfg.optim)
    train_dl = make_loader(splits.train, cfg.batch_size, shuffle=True, augment=cfg.data.augment, seed=cfg.seed,
                           device=accelerator.device, crop_padding=cfg.data.crop_padding, memory_format=layout)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    steps_per_epoch = math.ceil(len(train_dl) / cfg.optim.grad_accum_steps)
    total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or math.inf)
    scheduler = build_scheduler(optimizer.optimizer, cfg.optim, total_steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    lookahead = Lookahead(accelerator.unwrap_model(model), cfg.optim.lookahead_every, cfg.optim.lookahead_decay) \
        if cfg.optim.lookahead_every else None
    # CUDA graphs replay a whole forward/backward with one launch: on a GPU this net is launch-bound.
    compile_mode = ("reduce-overhead" if accelerator.device.type == "cuda" else "default") if cfg.compile else None
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model
    return Loop(cfg, accelerator, model, forward, optimizer, scheduler, loss_fn, train_dl, run_dir, total_steps,
                compile_mode, lookahead)


def _sample(split: Split, n: int, seed: int) -> torch.Tensor:
    """`n` normalized images of `split` drawn by `seed` (the same on every process), for data-dependent init."""
    index = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    return normalize(split.images[index])


WARM_UP_PASSES = 3  # forward/backward passes that compile the step; CUDA graphs record on the third


def warm_up(loop: Loop) -> float:
    """With --compile: compile the training forward and backward before the clock starts (as airbench times its
    runs), on a full batch of training images; return the seconds it took.

    Only gradients are computed, and then dropped: the optimizer never steps. What a training-mode forward
    changes (BatchNorm statistics, the RNG state that dropout draws from) is restored, so the run continues
    exactly as it would have without the warm-up."""
    model, accelerator = loop.model, loop.accelerator
    start = time.perf_counter()
    saved = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    images, labels = loop.train_dl.dataset.first_batch(loop.cfg.batch_size)
    model.train()
    for _ in range(WARM_UP_PASSES):
        if loop.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        loss = loop.loss_fn(loop.forward(images).float(), labels)  # as train_step calls it: the same graph
        loss.backward()
        loop.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in accelerator.unwrap_model(model).state_dict().items():
            v.copy_(saved[k])
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state_all(rng[1])
    loss.item()  # waits for the device: the warm-up's time ends here
    return time.perf_counter() - start


def _resume(loop: Loop, start: ResumePoint, data: DataInfo) -> list[ResumeInfo]:
    """Restore the checkpoint into the loop and fit its LR schedule to this run's length (`fit_schedule`); return
    the resumes that led here, this one last."""
    check_resume_data(start, data)
    loop.state = load_checkpoint(loop.accelerator, start.path, loop.model, loop.optimizer, loop.scheduler,
                                 loop.lookahead)
    before = fit_schedule(loop.scheduler, loop.cfg.optim, loop.total_steps)
    resume = ResumeInfo(step=loop.state.global_step, checkpoint=str(start.path),
                        checkpoint_epochs=start.record.config.epochs if start.record else None, epochs=loop.cfg.epochs,
                        checkpoint_total_steps=before, total_steps=loop.total_steps,
                        schedule_rebuilt=before != loop.total_steps)
    loop.accelerator.print(
        f"resumed from {start.path} at step {loop.state.global_step} (epoch {loop.state.epoch + 1}, batch "
        f"{loop.state.batches_done})" + (f"; LR schedule rebuilt over {loop.total_steps} steps (the checkpoint's "
                                         f"ran over {before})" if resume.schedule_rebuilt else ""))
    return [*start.history(), resume]


def run_info(loop: Loop, data: DataInfo, resumes: list[ResumeInfo]) -> RunInfo:
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
        compile_mode=loop.compile_mode,
        data=data,
        versions=versions(),
        resumes=resumes)


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
    result = evaluate(loop.model, eval_dl, accelerator, classes, split, loop.cfg.tta)
    if accelerator.is_main_process:
        result.write(loop.run_dir / EVAL)
    accelerator.print(result.format())
    accelerator.print(f"run folder: {loop.run_dir}")
    # Every process reaches the end before any tears down the process group: a gloo process whose
    # peer is already gone can abort in its destructor.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer, loss_fn: nn.Module,
               accelerator: Accelerator) -> torch.Tensor:
    """Forward, backward and, on accumulation boundaries, an optimizer step; returns the loss, on the device.

    Nothing here reads a value back to the host. On a boundary, a step whose gradients are not all
    finite is skipped by the fused SGD kernel itself (`found_inf`): no weight, momentum or decay
    changes. With fp16, Accelerate's GradScaler makes that same check on the scaled gradients (and
    lowers the scale); otherwise it is made here. Gradients are identical on every process after
    the all-reduce, so every process skips the same steps.
    """
    with accelerator.accumulate(model):
        logits = model(images)  # prepare() wrapped forward in autocast for bf16/fp16
        loss = loss_fn(logits.float(), labels)  # the loss in fp32 whatever the autocast dtype
        accelerator.backward(loss)
        if accelerator.sync_gradients and accelerator.scaler is None:
            _skip_if_not_finite(optimizer.optimizer)
        optimizer.step()  # a no-op between accumulation boundaries
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _skip_if_not_finite(optimizer: torch.optim.Optimizer) -> None:
    """Tell the fused optimizer, on the device, whether any gradient is NaN or inf (it then skips the step)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    found_inf = torch.zeros((), device=grads[0].device)
    # GradScaler's own check (one fused kernel); "unscaling" by 1 leaves the gradients as they are.
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, torch.ones((), device=found_inf.device))
    optimizer.found_inf = found_inf


def train_one_epoch(loop: Loop, logger: MetricLogger, stop: GracefulStop) -> None:
    """One pass over the training loader, resumed mid-epoch when a checkpoint says so.

    Raises `DivergenceError` on a non-finite loss (unless skipping is allowed) and `Interrupted`
    after checkpointing when a stop signal arrived; both are acted on at the next flag check.
    """
    cfg, state, accelerator = loop.cfg, loop.state, loop.accelerator
    loop.train_dl.set_epoch(state.epoch)  # data order and augmentation from (seed, epoch)
    loop.train_dl.dataset.set_epoch(state.epoch)
    batches: Iterable = accelerator.skip_first_batches(loop.train_dl, state.batches_done) \
        if state.batches_done else loop.train_dl
    flags = StepFlags(accelerator.device, state.global_step)
    clock = time.perf_counter()  # training time (data and steps) runs from here; checkpoint writes pause it
    loop.model.train()
    starts_step = True  # the next micro-batch is the first of an optimizer step (of its accumulation window)
    for images, labels in batches:  # in the model's memory format (`make_loader`)
        if starts_step and loop.compile_mode == "reduce-overhead":
            # Once marked, CUDA graphs begin a new step only when marked again, and a new step may reuse the
            # memory of the previous step's outputs. Autograd keeps the gradients of a window's first micro-batch,
            # such an output, as .grad and adds the later micro-batches' to it: so a step begins with the first
            # micro-batch of an optimizer step, never inside its accumulation window.
            torch.compiler.cudagraph_mark_step_begin()
        loss = train_step(loop.forward, images, labels, loop.optimizer, loop.loss_fn, accelerator)
        starts_step = accelerator.sync_gradients
        flags.record(loss, state.global_step)
        logger.batch(loss, torch.isfinite(loss), len(labels))
        state.batches_done += 1
        if not accelerator.sync_gradients:
            continue
        loop.scheduler.step()
        state.global_step += 1
        if loop.lookahead:
            loop.lookahead.step(state.global_step, loop.total_steps)
        checkpoint_due = bool(cfg.checkpoint_every) and state.global_step % cfg.checkpoint_every == 0
        if not (flags.due(state.global_step) or checkpoint_due or logger.due(state.global_step) or loop.done
                or state.batches_done == len(loop.train_dl)):
            continue
        bad_steps, stop_requested = flags.read(accelerator, stop.requested, state.global_step)
        now = time.perf_counter()  # after the read: the device has finished every step so far
        state.train_seconds += now - clock
        _skip_or_stop(loop, bad_steps, logger)
        if checkpoint_due or stop_requested:
            loop.checkpoint()
            now = time.perf_counter()
        if stop_requested:
            raise Interrupted(f"stopped by signal after step {state.global_step}; checkpoint written. "
                              f"Continue with: --resume latest --output-dir <this run>")
        clock = now
        logger.step(state.global_step, state.epoch + 1, loop.scheduler.get_last_lr()[0], state.train_seconds)
        if loop.done:
            break


def _skip_or_stop(loop: Loop, bad_steps: list[int], logger: MetricLogger) -> None:
    """Steps with a non-finite loss (they changed no weights): stop naming the first, or count them as skipped."""
    cfg, state = loop.cfg, loop.state
    for step in bad_steps:
        where = f"step {step} (epoch {state.epoch + 1})"
        if cfg.on_nan == "stop" or state.nan_skips >= cfg.max_nan_skips:
            raise DivergenceError(f"non-finite loss at {where}; weights were not updated. "
                                  + ("Lower --lr, or pass --on-nan skip" if cfg.on_nan == "stop" else
                                     f"--max-nan-skips {cfg.max_nan_skips} exhausted"))
        state.nan_skips += 1
        logger.note(f"warning: non-finite loss at {where}: batch skipped ({state.nan_skips}/{cfg.max_nan_skips})")
