"""Setting up Hugging Face Accelerate for a run: which device, which process group, which run folder.

Topology (processes, machines, GPUs) comes from the launcher (`accelerate launch`, torchrun, MPI),
never from the config; this module only checks that the launcher started what was asked for.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list

from toolkit.core.errors import ConfigError, LaunchError, first_line
from toolkit.training.config import TrainConfig
from toolkit.training.runs import default_run_name

# Environment variables through which launchers announce the world size they started
# (torchrun / accelerate's multi-process launcher, then MPI flavours).
_LAUNCHER_WORLD_SIZE = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


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
