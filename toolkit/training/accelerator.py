"""Setting up Hugging Face Accelerate for a run: which device, which precision, which process group,
which run folder.

Topology (processes, machines, GPUs) comes from the launcher (`accelerate launch`, torchrun, MPI),
never from the config; this module is the one place that reads what the launcher announced, only
to check that it started what was asked for and that the GPUs it needs exist.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list

from toolkit.core.errors import ConfigError, LaunchError, first_line
from toolkit.training.config import PRECISIONS, TrainConfig
from toolkit.training.runs import RunSession, default_run_name

# Environment variables through which launchers announce the world size they started
# (torchrun / accelerate's multi-process launcher, then MPI flavours).
_LAUNCHER_WORLD_SIZE = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# Where `accelerate launch --mixed_precision` and the accelerate config file put their precision
# (Accelerate reads it only when `Accelerator(mixed_precision=None)`).
LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"
# The mixed precisions each device type trains in: fp16 needs a GPU (Accelerate would train in fp32 on the CPU).
PRECISIONS_ON = {"cpu": ("no", "bf16"), "cuda": PRECISIONS}


@dataclass(frozen=True)
class Precision:
    """The autocast precision a run uses and who chose it."""

    value: str  # no, bf16 or fp16
    source: str  # "config" (--mixed-precision or --config), "launcher" (ACCELERATE_MIXED_PRECISION) or "default"
    overridden: str | None = None  # the launcher's different choice that the config overrode

    def origin(self) -> str:
        """How a user would name the setting that chose a precision other than the default, for messages."""
        if self.source == "config":
            return f"--mixed-precision {self.value}"
        return (f"{LAUNCHER_PRECISION}={self.value} (set by accelerate launch --mixed_precision, its config file, "
                "or by hand)")


def native_bf16(cpu: bool) -> bool:
    """Whether the run's device computes bf16 natively: a CUDA GPU that supports it, or a CPU with AVX-512 BF16 or
    AMX tiles. Elsewhere oneDNN emulates bf16 convolutions, slower than fp32."""
    if not cpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(requested: str | None, environ: Mapping[str, str] = os.environ,
                      cpu: bool | None = None) -> Precision:
    """The config's precision when it names one (`auto`: bf16 where `native_bf16`, else fp32), else the
    launcher's, else fp32 ("no"). `cpu`: whether the run is on the CPU (default: `wants_cpu()`)."""
    if requested == "auto":
        requested = "bf16" if native_bf16(wants_cpu() if cpu is None else cpu) else "no"
    launcher = environ.get(LAUNCHER_PRECISION, "").strip().lower() or None
    if launcher is not None and launcher not in PRECISIONS:
        raise ConfigError(f"{LAUNCHER_PRECISION}={launcher}: the toolkit trains in {', '.join(PRECISIONS)}; "
                          "pass accelerate launch --mixed_precision with one of them, or --mixed-precision")
    if requested is not None:
        return Precision(requested, "config", launcher if launcher not in (None, requested) else None)
    if launcher is not None:
        return Precision(launcher, "launcher")
    return Precision("no", "default")


def check_gpu_topology(local_processes: int, machines: int, visible_gpus: int,
                       cuda_visible_devices: str | None) -> None:
    """Refuse, before any process group exists, a launch that needs GPUs this machine does not show.

    `local_processes` is what the launcher started on this machine (one GPU each), `visible_gpus`
    what CUDA sees; CUDA drops every device listed after the first missing one in CUDA_VISIBLE_DEVICES
    (which `accelerate launch` sets from gpu_ids).
    """
    named = [d for d in (cuda_visible_devices or "").split(",") if d.strip()]
    if len(named) > visible_gpus:
        raise LaunchError(f"CUDA_VISIBLE_DEVICES={cuda_visible_devices} (accelerate launch's gpu_ids) names "
                          f"{len(named)} GPUs but only {visible_gpus} of them exist on this machine: name existing "
                          "GPUs (nvidia-smi -L lists them) or use gpu_ids: all")
    if local_processes > visible_gpus:
        raise LaunchError(f"{local_processes} processes per machine were launched, one per GPU, but {visible_gpus} "
                          f"GPU(s) are visible: pass accelerate launch --num_processes {visible_gpus * machines} "
                          "(or set num_processes in the launch config), or ACCELERATE_USE_CPU=1 to train on the CPU")


def _check_gpus_before_launch() -> None:
    """`check_gpu_topology` with what torchrun announced (LOCAL_WORLD_SIZE per machine) and what CUDA sees."""
    if not torch.cuda.is_available():
        return  # no CUDA GPU: training goes to the CPU (wants_cpu)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    machines = max(int(os.environ.get("WORLD_SIZE", str(local))) // max(local, 1), 1)
    check_gpu_topology(local, machines, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))


def wants_cpu() -> bool:
    """Run on the CPU: asked for (ACCELERATE_USE_CPU, as `accelerate launch --cpu` sets it) or no accelerator."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or \
        not torch.accelerator.is_available()


def build_accelerator(cfg: TrainConfig) -> tuple[Accelerator, Path]:
    """The run's Accelerator (after checking the process count) and its run folder, the same on every process."""
    use_cpu = wants_cpu()
    if cfg.deterministic:
        # Before any CUDA work: cuBLAS reads its workspace setting when it starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    precision = resolve_precision(cfg.mixed_precision)
    if use_cpu and precision.value not in PRECISIONS_ON["cpu"]:
        # Accelerate would silently train in fp32 on CPU.
        raise ConfigError(f"{precision.origin()}: fp16 needs a GPU and this run is on the CPU; use bf16 on CPU")
    if not use_cpu:
        _check_gpus_before_launch()
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
        accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision.value,
                                  gradient_accumulation_steps=cfg.optim.grad_accum_steps,
                                  log_with=trackers, project_dir=name[0])
    except (ValueError, ImportError) as exc:
        if not trackers:
            raise
        raise ConfigError(f"--log-with {cfg.log_with}: {first_line(exc)}") from None
    if precision.overridden:
        accelerator.print(f"note: mixed precision {precision.value} from --mixed-precision (or --config) overrides "
                          f"the launcher's {precision.overridden} ({LAUNCHER_PRECISION})")
    return accelerator, Path(name[0])


@contextmanager
def open_run(cfg: TrainConfig, command: str) -> Iterator[RunSession]:
    """The Accelerator and run folder of one command (`toolkit train`, `toolkit run`), the folder locked
    by the main process and its fate recorded in status.json (`RunSession`)."""
    accelerator, run_dir = build_accelerator(cfg)
    with RunSession(accelerator, run_dir, command) as session:
        yield session
