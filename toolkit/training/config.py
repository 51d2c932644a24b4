"""Typed, validated configuration for training, one dataclass per concern.

Every field carries its help text (and units) in `metadata["help"]`; `toolkit.apps.cli` builds the
command-line flags from these fields one-to-one (`batch_size` -> `--batch-size`), so the CLI and
the config cannot drift apart. `__post_init__` rejects bad values with a `ConfigError` naming the
flag. Precedence: field defaults < recipe (`RECIPES`) < a `--config` file (`read_config_file`) <
flags given on the command line.

Topology (number of processes, machines, GPUs) is not here: it belongs to the Accelerate launch
config (`launch/*.yaml`). `expect_processes` only states what the run must see, so that a
mis-launched job fails loudly instead of silently training on one process. `mixed_precision` left
unset means "what the launcher says" (toolkit.training.accelerator.resolve_precision).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.core.errors import ConfigError, first_line

DATA_SOURCES = ("cifar10", "imagefolder", "synthetic")
SCHEDULES = ("none", "onecycle", "cosine")
OPTIMIZERS = ("sgd", "muon")
PRECISIONS = ("no", "bf16", "fp16")
# --mixed-precision auto: bf16 where the device computes it natively (a GPU with bf16, a CPU with AVX-512 BF16 or
# AMX), else fp32 (toolkit.training.accelerator.resolve_precision).
PRECISION_CHOICES = (*PRECISIONS, "auto")
# Test-time augmentation: the views each image is classified from, their logits averaged
# (toolkit.core.images.tta_views).
TTA_LEVELS = ("none", "flip", "flip-translate")
ON_NAN = ("stop", "skip")
HELD_OUT_SPLITS = ("test", "val")  # what evaluate and verify can score; test falls back to val when absent


def _field(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


def flag_name(name: str) -> str:
    """The command-line flag of a config field: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{flag_name(name)}: {message}")


@dataclass
class DataConfig:
    """Where images come from and how they are split and augmented."""

    data: str = _field("cifar10", "dataset source", choices=DATA_SOURCES)
    data_dir: str = _field(
        "data",
        "dataset folder: torchvision's CIFAR-10 files (cifar10) or train/<class>/* and optional "
        "test/<class>/* (imagefolder)",
    )
    cache_dir: str | None = _field(
        None, "where decoded uint8 splits are cached (default: $XDG_CACHE_HOME/cifar-toolkit)"
    )
    download: bool = _field(True, "download CIFAR-10 into --data-dir when it is missing")
    val_fraction: float = _field(
        0.1, "fraction of each training class held out (the last images of the class) for validation"
    )
    augment: bool = _field(False, "random crop (--crop-padding px zero padding) and horizontal flip on training batches")
    crop_padding: int = _field(4, "pixels of zero padding on each side before the random 32×32 crop (--augment): "
                                  "the largest shift, in pixels")
    synthetic_train_size: int = _field(2000, "images in the synthetic training split (before the val hold-out)")
    synthetic_test_size: int = _field(500, "images in the synthetic test split")

    def __post_init__(self) -> None:
        _check(self.data in DATA_SOURCES, "data", f"unknown source {self.data!r}; choose from {DATA_SOURCES}")
        _check(bool(self.data_dir), "data_dir", "must not be empty")
        _check(0.0 <= self.val_fraction < 1.0, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        _check(0 <= self.crop_padding <= 16, "crop_padding", f"must be in [0, 16] pixels, got {self.crop_padding}")
        _check(self.synthetic_train_size >= 10, "synthetic_train_size", f"must be >= 10, got {self.synthetic_train_size}")
        _check(self.synthetic_test_size >= 1, "synthetic_test_size", f"must be >= 1, got {self.synthetic_test_size}")


@dataclass
class OptimConfig:
    """SGD with momentum (or Muon for convolution filters), its learning-rate schedule and the loss."""

    optimizer: str = _field(
        "sgd", "sgd: SGD with momentum for every parameter; muon: Muon for convolution filters (their momentum "
        "update orthogonalized, each filter bank held at a fixed norm; --muon-lr, --muon-momentum), SGD for the rest",
        choices=OPTIMIZERS)
    muon_lr: float = _field(0.24, "peak learning rate of the Muon-trained filters (--optimizer muon): the spectral "
                                  "size of their step, independent of the loss's scale")
    muon_momentum: float = _field(0.6, "momentum of the Muon-trained filters (--optimizer muon)")
    lr: float = _field(0.001, "peak learning rate")
    momentum: float = _field(0.9, "SGD momentum")
    nesterov: bool = _field(False, "Nesterov momentum")
    weight_decay: float = _field(0.0, "L2 weight decay (with --decoupled-weight-decay: the fraction of each weight "
                                      "removed per optimizer step at the peak LR)")
    decoupled_weight_decay: bool = _field(
        False, "weight decay independent of each parameter group's LR: every weight shrinks by --weight-decay × "
        "the schedule's multiplier per step, also where --norm-lr-scale raises the LR")
    norm_lr_scale: float = _field(1.0, "LR multiplier for the parameters of normalization layers (BatchNorm, "
                                       "GroupNorm, LayerNorm, ...): airbench trains its BatchNorm biases at 64×")
    schedule: str = _field(
        "none",
        "learning-rate schedule over all optimizer steps: none (constant), onecycle (linear warm-up "
        "then linear decay to 0) or cosine (linear warm-up then cosine decay to 0)",
        choices=SCHEDULES,
    )
    warmup_fraction: float = _field(0.2, "fraction of optimizer steps spent warming up (onecycle, cosine)")
    lr_start: float = _field(0.04, "LR at the start of the warm-up, as a fraction of --lr (onecycle, cosine)")
    lr_end: float = _field(0.0, "LR at the last step, as a fraction of --lr (onecycle, cosine)")
    lookahead_every: int = _field(
        0, "Lookahead with an EMA: every K optimizer steps the weights (and BatchNorm statistics) are blended into a "
        "slow copy and reset to it; the last step ends on the copy (0: off)")
    lookahead_decay: float = _field(
        0.95, "per-step decay of the Lookahead copy at the end of the run (a blend every K steps keeps decay^K of "
        "the copy); it ramps up from 0 as (step / total steps)^3, so early training is not slowed")
    label_smoothing: float = _field(0.0, "cross-entropy label smoothing")
    grad_accum_steps: int = _field(1, "micro-batches accumulated per optimizer step")

    def __post_init__(self) -> None:
        _check(self.optimizer in OPTIMIZERS, "optimizer", f"unknown optimizer {self.optimizer!r}; choose from "
                                                          f"{OPTIMIZERS}")
        _check(self.muon_lr > 0, "muon_lr", f"must be > 0, got {self.muon_lr}")
        _check(0.0 <= self.muon_momentum < 1.0, "muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        _check(not self.nesterov or self.momentum > 0, "nesterov", "needs --momentum > 0")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.schedule in SCHEDULES, "schedule", f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}")
        _check(0.0 <= self.warmup_fraction < 1.0, "warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        _check(0.0 <= self.lr_start <= 1.0, "lr_start", f"must be in [0, 1], got {self.lr_start}")
        _check(0.0 <= self.lr_end <= 1.0, "lr_end", f"must be in [0, 1], got {self.lr_end}")
        _check(self.norm_lr_scale > 0, "norm_lr_scale", f"must be > 0, got {self.norm_lr_scale}")
        _check(self.lookahead_every >= 0, "lookahead_every", f"must be >= 0, got {self.lookahead_every}")
        _check(0.0 <= self.lookahead_decay < 1.0, "lookahead_decay", f"must be in [0, 1), got {self.lookahead_decay}")
        _check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        _check(self.grad_accum_steps >= 1, "grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")


@dataclass
class TrainConfig:
    """A training run: model, length, precision, run folder and checkpoints."""

    recipe: str = _field("fast", "named set of defaults: seed = the tutorial exactly, fast = tuned on a 2-core CPU, "
                                 "gpu = large batch for a GPU, resnet18, speednet and speednet-muon = for those models")
    model: str = _field("tutorial", "a built-in model (tutorial, resnet18, speednet) or your own as "
                                    "package.module:factory, a callable factory(num_classes) -> torch.nn.Module")
    epochs: int = _field(2, "passes over the training split; with --resume it may differ from the checkpoint's run "
                            "(but not end before the checkpoint): the LR schedule is then rebuilt over the new "
                            "length (see --resume)")
    batch_size: int = _field(4, "images per process per micro-batch (global batch = this x processes x accumulation)")
    eval_batch_size: int = _field(1000, "images per process per evaluation batch")
    mixed_precision: str | None = _field(
        None, "autocast precision: no (fp32), bf16 (CPU and GPU), fp16 (GPU only) or auto (bf16 where the device "
        "computes it natively: a GPU with bf16, a CPU with AVX-512 BF16 or AMX; else no); when not given, what the "
        "launcher says (accelerate launch --mixed_precision or its config file, ACCELERATE_MIXED_PRECISION), else no",
        choices=PRECISION_CHOICES)
    channels_last: bool = _field(False, "model weights and image batches in channels-last memory layout (NHWC): the "
                                        "layout oneDNN and cuDNN convolve fastest in bf16/fp16")
    whiten_images: int = _field(
        0, "initialize the model's first convolution from this many training images as a patch-whitening filter "
        "bank (the patch covariance's eigenvectors scaled by 1/sqrt(eigenvalue), and their negatives when the layer "
        "has twice as many filters as a patch has values); 0: the model's own init")
    tta: str = _field("none", "test-time augmentation of the final evaluation: none, flip (the image and its mirror) "
                              "or flip-translate (also shifted 1 px up-left and down-right, 6 views); logits averaged",
                      choices=TTA_LEVELS)
    seed: int = _field(0, "seed for initialization, data order and augmentation")
    compile: bool = _field(False, "torch.compile the model's training forward and backward (inductor; on CUDA also "
                                  "CUDA graphs, mode reduce-overhead); the first steps compile, about 10-60 s")
    deterministic: bool = _field(False, "deterministic kernels (torch.use_deterministic_algorithms, cuDNN without "
                                        "benchmarking): bit-exact resumes on a GPU, at some speed")
    output_dir: str | None = _field(None, "run folder (default runs/<timestamp>)")
    checkpoint_every: int = _field(0, "save a checkpoint every N optimizer steps (0: only at epoch ends)")
    keep_checkpoints: int = _field(2, "checkpoints kept in the run folder (the newest K)")
    overwrite: bool = _field(False, "replace the run already in --output-dir (its checkpoints, metrics and weights)")
    resume: str | None = _field(
        None, "'latest' (newest checkpoint in --output-dir; none yet: start from step 0) or a checkpoint or run "
        "folder. The config must be the checkpoint's, except --epochs and --max-steps and the flags that only change "
        "how the run is executed, logged and checkpointed (threads, logging, checkpoints, --compile, ...); anything "
        "else is refused naming each difference. A different length rebuilds the LR schedule as if the run had "
        "started with it and continues from the checkpoint's step: with onecycle or cosine the LR moves to the new "
        "schedule's value at that step (back up when the run is made longer); config.json's runtime.resumes records "
        "every resume")
    max_steps: int | None = _field(None, "stop after this many optimizer steps (for smoke runs)")
    log_every: int = _field(50, "write a metrics.jsonl line every N optimizer steps")
    threads: int | None = _field(None, "torch intra-op threads per process (default: torch's choice)")
    on_nan: str = _field("stop", "on a non-finite loss: stop the run (naming the step) or skip the batch", choices=ON_NAN)
    max_nan_skips: int = _field(10, "with --on-nan skip: stop after this many skipped batches")
    quiet: bool = _field(False, "plain log lines instead of a progress bar")
    log_with: str | None = _field(
        None, "also log metrics to these Accelerate trackers, comma-separated (tensorboard, wandb, mlflow, ...; "
        "each must be installed); metrics.jsonl is always written")
    dist_timeout: int = _field(600, "seconds a process waits for the others in a collective before failing")
    expect_processes: int | None = _field(
        None, "fail unless the launcher really started this many processes (default: what the launcher announced)"
    )
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        _check(self.recipe in RECIPES, "recipe", f"unknown recipe {self.recipe!r}; choose from {sorted(RECIPES)}")
        _check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _check(self.mixed_precision is None or self.mixed_precision in PRECISION_CHOICES, "mixed_precision",
               f"unknown precision {self.mixed_precision!r}; choose from {PRECISION_CHOICES}")
        _check(self.whiten_images >= 0, "whiten_images", f"must be >= 0, got {self.whiten_images}")
        _check(self.tta in TTA_LEVELS, "tta", f"unknown level {self.tta!r}; choose from {TTA_LEVELS}")
        _check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        _check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        _check(self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        _check(self.on_nan in ON_NAN, "on_nan", f"expected one of {ON_NAN}, got {self.on_nan!r}")
        _check(self.max_nan_skips >= 0, "max_nan_skips", f"must be >= 0, got {self.max_nan_skips}")
        _check(self.dist_timeout >= 1, "dist_timeout", f"must be >= 1, got {self.dist_timeout}")
        _check(self.expect_processes is None or self.expect_processes >= 1, "expect_processes",
               f"must be >= 1, got {self.expect_processes}")
        _check(self.resume is None or bool(self.resume), "resume", "must be 'latest' or a checkpoint folder")
        _check(not (self.overwrite and self.resume), "overwrite", "cannot be combined with --resume")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every field by its name, groups flattened (names are unique): the form the flags take."""
        return {f.name: getattr(getattr(self, group) if group else self, f.name) for group, f in leaf_fields()}


# Recipes override field defaults; flags override recipes.
RECIPES: dict[str, dict[str, Any]] = {
    # The PyTorch tutorial exactly: batch 4, SGD lr 0.001 momentum 0.9, 2 epochs, no augmentation,
    # constant learning rate.
    "seed": {},
    # Tuned on the shared CIFAR-10 training split (5,000 held out) on a 2-core CPU: over 70 % held out
    # within 120 s of training there; see README.
    "fast": {
        "epochs": 22,
        "batch_size": 128,
        "augment": True,
        "lr": 0.1,
        "nesterov": True,
        "weight_decay": 5e-4,
        "schedule": "onecycle",
        "label_smoothing": 0.1,
    },
}
# The large-batch recipe for GPUs: the fast recipe at a batch where a GPU is not launch-bound, the
# learning rate scaled with it (see README for the sweep).
RECIPES["gpu"] = {**RECIPES["fast"], "batch_size": 512, "lr": 0.2, "epochs": 40}
# ResNet-18 (`--model resnet18`): the fast recipe's optimizer at a batch of 256, the LR scaled with it, in bf16
# channels-last where the device has bf16, with mirror test-time augmentation; 11 M parameters need more epochs.
RECIPES["resnet18"] = {**RECIPES["fast"], "model": "resnet18", "batch_size": 256, "lr": 0.2, "epochs": 30,
                       "channels_last": True, "mixed_precision": "auto", "tta": "flip"}
# airbench94's training recipe (Keller Jordan, cifar10-airbench) for its network, `--model speednet`, in this
# trainer's terms. Its loss is summed over the batch, ours averaged: LR 11.5 / (1024 · (1 + 1 / (1 - 0.85))) per
# summed image is 1.5 per batch of 1024; its decoupled weight decay 0.0153 · 1024 / 7851 = 0.002 per step.
RECIPES["speednet"] = {
    "model": "speednet",
    "epochs": 10,
    "batch_size": 1024,
    "augment": True,
    "crop_padding": 2,  # airbench translates by up to 2 px
    "lr": 1.5,
    "momentum": 0.85,
    "nesterov": True,
    "weight_decay": 0.002,
    "decoupled_weight_decay": True,
    "norm_lr_scale": 64.0,
    "schedule": "onecycle",
    "warmup_fraction": 0.23,
    "lr_start": 0.2,
    "lr_end": 0.07,
    "label_smoothing": 0.2,
    "lookahead_every": 5,
    "lookahead_decay": 0.95,
    "whiten_images": 5000,
    "tta": "flip-translate",
    "channels_last": True,
    "mixed_precision": "auto",
}

# airbench94_muon's recipe (8 epochs instead of 10 at the same accuracy): Muon for the convolution filters (LR 0.24,
# momentum 0.6), SGD for the rest, batch 2000, the LR decaying linearly from its peak to 0, no Lookahead. Its SGD
# LRs are per summed image for a head scaled by 1/256; for speednet's 1/9 head (the step's effect on the logits
# goes with the scale squared) and an averaged loss they are 0.67 · (9 / 256)² · 2000 = 1.65 for the head (and the
# whitening bias) and 0.053 · 2000 = 106 = 1.65 × 64 for the BatchNorm biases; decay 2e-6 per image, 0.004 per step.
RECIPES["speednet-muon"] = {
    **RECIPES["speednet"],
    "epochs": 8,
    "batch_size": 2000,
    "optimizer": "muon",
    "muon_lr": 0.24,
    "muon_momentum": 0.6,
    "lr": 1.65,
    "weight_decay": 0.004,
    "warmup_fraction": 0.0,
    "lr_end": 0.0,
    "lookahead_every": 0,
}

_GROUPS = {"data": DataConfig, "optim": OptimConfig}

# --resume: a checkpoint is the middle of one run. Its weights, optimizer state, LR-schedule position and data
# position (epoch and batches done) mean something only under the config that wrote them, so a resumed run's config
# must equal the checkpoint's (toolkit.training.runs.check_resume), except in these fields, which change how the
# remaining steps are run, logged, checkpointed or checked, not what they compute:
RESUME_MAY_CHANGE = ("recipe", "eval_batch_size", "compile", "deterministic", "channels_last", "tta", "output_dir",
                     "checkpoint_every", "keep_checkpoints", "overwrite", "resume", "log_every", "threads", "on_nan",
                     "max_nan_skips", "quiet", "log_with", "dist_timeout", "expect_processes", "cache_dir", "download")
# ... and in the run's length, which may grow, or shrink down to the checkpoint's position: the LR schedule is then
# rebuilt over the new total (toolkit.training.optim.fit_schedule). Every other field must match; mixed_precision is
# compared as the precision the run really uses (the launcher's when the field is unset).
RESUME_LENGTH = ("epochs", "max_steps")


def leaf_fields() -> list[tuple[str | None, dataclasses.Field]]:
    """All configurable fields as (group or None, field), in declaration order. Names are unique."""
    out: list[tuple[str | None, dataclasses.Field]] = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in _GROUPS:
            out.extend((f.name, g) for g in dataclasses.fields(_GROUPS[f.name]))
        else:
            out.append((None, f))
    return out


def field_type(f: dataclasses.Field) -> tuple[str, bool]:
    """A config field's value type ("int", "float", "str" or "bool") and whether it may be None."""
    text = str(f.type)
    return text.replace(" | None", ""), text.endswith(" | None")


def build_train_config(*layers: dict[str, Any] | None) -> TrainConfig:
    """Build a config from layers of flat field values (`{"lr": 0.1, "data": "synthetic", ...}`), later
    layers winning: `build_train_config(file_values, flag_values)`.

    The recipe the merged values name (default `fast`) supplies defaults for fields no layer gives.
    """
    values = {k: v for layer in layers if layer for k, v in layer.items()}
    recipe = values.get("recipe", TrainConfig.recipe)
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe: unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
    merged = {**RECIPES[recipe], **values, "recipe": recipe}
    known = {f.name for _, f in leaf_fields()}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(f"unknown config keys: {unknown}")
    grouped: dict[str, dict[str, Any]] = {g: {} for g in _GROUPS}
    top: dict[str, Any] = {}
    for group, f in leaf_fields():
        if f.name in merged:
            (grouped[group] if group else top)[f.name] = merged[f.name]
    return TrainConfig(**top, **{g: cls(**grouped[g]) for g, cls in _GROUPS.items()})


def resume_differences(checkpoint: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """`--flag value (checkpoint: value)` for every field that must match on resume (see `RESUME_MAY_CHANGE`)
    and does not, in declaration order. Both are flat field values (`TrainConfig.flat`)."""
    return [_difference(f.name, run[f.name], checkpoint[f.name]) for _, f in leaf_fields()
            if f.name not in RESUME_MAY_CHANGE + RESUME_LENGTH and run[f.name] != checkpoint[f.name]]


def _difference(name: str, run: Any, checkpoint: Any) -> str:
    """`--batch-size 64 (checkpoint: 32)`; switches as their flags: `--no-augment (checkpoint: --augment)`."""
    if isinstance(run, bool):
        on, off = flag_name(name), "--no-" + flag_name(name)[2:]
        return f"{on if run else off} (checkpoint: {on if checkpoint else off})"
    run, checkpoint = ("unset" if v is None else v for v in (run, checkpoint))
    return f"{flag_name(name)} {run} (checkpoint: {checkpoint})"


def train_config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved by `TrainConfig.to_dict` (e.g. from a run's config.json)."""
    flat = {k: v for k, v in d.items() if k not in _GROUPS}
    for g in _GROUPS:
        flat.update(d.get(g, {}))
    known = {f.name for _, f in leaf_fields()}
    return build_train_config({k: v for k, v in flat.items() if k in known})


# Keys a config file may hold that are not taken from it: a run's config.json adds "runtime" (what
# the run had, toolkit.training.runs.RunRecord); `resume` and `overwrite` act on one run folder, so a
# file repeating a run must not continue or replace anything: they come from flags only.
FILE_IGNORED_KEYS = ("runtime", "resume", "overwrite")


def read_config_file(path: Path) -> dict[str, Any]:
    """Flat field values from a YAML or JSON file (`--config FILE`).

    Keys are field names, top-level (`lr: 0.1`) or grouped as config.json writes them
    (`optim: {lr: 0.1}`), so a run's own config.json is accepted as it is. Unknown keys and values of
    the wrong type are refused naming the key; `FILE_IGNORED_KEYS` are skipped.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read ({exc.strerror})") from None
    data = _parse_config_text(path, text)
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of config keys, got {type(data).__name__}")
    fields = {f.name: (group, f) for group, f in leaf_fields()}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in FILE_IGNORED_KEYS:
            continue
        grouped = key in _GROUPS and isinstance(value, dict)
        if key in _GROUPS and not grouped and key not in fields:
            raise ConfigError(f"--config {path}: key {key!r} must be a mapping, as in config.json")
        for name, v in (value.items() if grouped else [(key, value)]):
            where = f"{key}.{name}" if grouped else str(name)
            if name not in fields or (grouped and fields[name][0] != key):
                raise ConfigError(f"--config {path}: unknown key {where!r}; keys are the names in config.json "
                                  "(e.g. batch_size, optim.lr)")
            values[name] = _typed_value(path, where, fields[name][1], v)
    return values


def _parse_config_text(path: Path, text: str) -> Any:
    """JSON for `.json` files (PyYAML would read JSON's `5e-05` as a string), YAML otherwise."""
    if Path(path).suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"--config {path}: not valid JSON ({first_line(exc)})") from None
    import yaml  # reason: only --config reads YAML; `toolkit predict` starts without it

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({first_line(exc)})") from None


def _typed_value(path: Path, where: str, f: dataclasses.Field, value: Any) -> Any:
    """`value` if it has the field's type (ints accepted for floats), else a `ConfigError` naming the key."""
    base, optional = field_type(f)
    if value is None and optional:
        return None
    if base == "float" and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
        except ValueError:
            pass
    ok = {"bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}[base](value)
    if not ok:
        expected = base + (" or null" if optional else "")
        raise ConfigError(f"--config {path}: key {where!r} must be {expected}, got {value!r}")
    return float(value) if base == "float" else value
