"""What the launcher asks for is what runs: precision from `accelerate launch`, GPU counts checked
before any process group, and the SLURM example in launch/slurm/ (run against stand-in commands)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import ROOT, TINY, accelerate_launch, assert_clean_error, assert_ok, load_json, run_cli
from toolkit.core.errors import ConfigError, LaunchError
from toolkit.training import accelerator as accelerator_module
from toolkit.training.accelerator import check_gpu_topology, resolve_precision
from toolkit.training.status import Holder, RunStatus

SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"


@pytest.mark.parametrize("requested, launcher, expected", [
    (None, None, ("no", "default", None)),
    (None, "bf16", ("bf16", "launcher", None)),
    (None, "NO", ("no", "launcher", None)),
    ("bf16", None, ("bf16", "config", None)),
    ("bf16", "bf16", ("bf16", "config", None)),
    ("no", "bf16", ("no", "config", "bf16")),  # the flag wins and says so
])
def test_precision_is_the_configs_else_the_launchers_else_fp32(requested, launcher, expected):
    environ = {"ACCELERATE_MIXED_PRECISION": launcher} if launcher else {}
    precision = resolve_precision(requested, environ)
    assert (precision.value, precision.source, precision.overridden) == expected


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "no")])
def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(monkeypatch, native, expected):
    seen = []
    monkeypatch.setattr(accelerator_module, "native_bf16", lambda cpu: seen.append(cpu) or native)
    precision = resolve_precision("auto", {}, cpu=True)
    assert (precision.value, precision.source, seen) == (expected, "config", [True])


def test_native_bf16_on_the_cpu_follows_its_instruction_sets(monkeypatch):
    for avx512_bf16, amx, expected in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert accelerator_module.native_bf16(cpu=True) is expected


def test_a_launcher_precision_the_toolkit_does_not_train_in_is_refused():
    with pytest.raises(ConfigError, match="ACCELERATE_MIXED_PRECISION=fp8"):
        resolve_precision(None, {"ACCELERATE_MIXED_PRECISION": "fp8"})


def test_precision_from_accelerate_launch_is_used_and_recorded(tmp_path):
    run = tmp_path / "run"
    proc = accelerate_launch("single.yaml", "train", *TINY, "--epochs", "1", "--batch-size", "100",
                             "--output-dir", str(run), launch=["--mixed_precision", "bf16"])
    assert_ok(proc)
    runtime = load_json(run / "config.json")["runtime"]
    assert (runtime["mixed_precision"], runtime["mixed_precision_source"]) == ("bf16", "launcher")
    assert load_json(run / "config.json")["mixed_precision"] is None  # the config asked for nothing


def test_the_flag_overrides_the_launcher_and_says_so_and_fp16_on_cpu_stays_an_error(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", *TINY, "--epochs", "1", "--batch-size", "100", "--mixed-precision", "no",
                   "--output-dir", str(run), env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert_ok(proc)
    assert "note: mixed precision no from --mixed-precision (or --config) overrides the launcher's bf16" in proc.stdout
    runtime = load_json(run / "config.json")["runtime"]
    assert (runtime["mixed_precision"], runtime["mixed_precision_source"]) == ("no", "config")
    proc = run_cli("train", *TINY, "--output-dir", str(tmp_path / "fp16"), env={"ACCELERATE_MIXED_PRECISION": "fp16",
                                                                             "ACCELERATE_USE_CPU": "1"})
    assert_clean_error(proc, "ACCELERATE_MIXED_PRECISION=fp16", "needs a GPU", "use bf16 on CPU")
    assert not (tmp_path / "fp16").exists()


def test_more_gpu_processes_than_gpus_is_one_line_saying_what_to_pass():
    shipped = yaml.safe_load((ROOT / "launch" / "multi-gpu.yaml").read_text())
    with pytest.raises(LaunchError) as caught:  # launch/multi-gpu.yaml as shipped, on a one-GPU machine
        check_gpu_topology(shipped["num_processes"], 1, visible_gpus=1, cuda_visible_devices=None)
    assert str(caught.value).startswith(f"{shipped['num_processes']} processes per machine were launched")
    assert "1 GPU(s) are visible: pass accelerate launch --num_processes 1" in str(caught.value)
    with pytest.raises(LaunchError, match="--num_processes 4 "):  # two machines with two GPUs each
        check_gpu_topology(8, 2, visible_gpus=2, cuda_visible_devices=None)
    with pytest.raises(LaunchError, match=r"CUDA_VISIBLE_DEVICES=0,1,5 .* names 3 GPUs but only 2"):
        check_gpu_topology(2, 1, visible_gpus=2, cuda_visible_devices="0,1,5")
    check_gpu_topology(2, 1, visible_gpus=2, cuda_visible_devices="0,1")
    check_gpu_topology(4, 2, visible_gpus=8, cuda_visible_devices=None)


# ---------------------------------------------------------------------------------------------
# launch/slurm/train.sbatch


def _directives() -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", SBATCH.read_text(), re.M))


def test_the_sbatch_example_asks_for_the_signal_and_the_requeue():
    directives = _directives()
    assert int(directives["nodes"]) >= 2 and directives["ntasks-per-node"] == "1" and "requeue" in directives
    signal, lead = directives["signal"].split("@")
    assert signal == "USR1"  # not B:USR1: the training processes must get it, not only the batch shell
    text = SBATCH.read_text()
    forwarded = re.search(r"^export PET_SIGNALS_TO_HANDLE=(\S+)", text, re.M)[1].split(",")
    assert "SIGUSR1" in forwarded and "SIGTERM" in forwarded
    shutdown = int(re.search(r"^export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=(\d+)", text, re.M)[1])
    assert 0 < shutdown < int(lead)  # the workers get to checkpoint before the time limit
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0


def _fake_cluster(tmp_path: Path) -> Path:
    """Stand-ins on PATH: `srun` runs its command once per node (SLURM_NODEID 0 and 1) and then plays a
    run that wrote $FAKE_STATUS (if set); `accelerate` records its arguments per node; `scontrol`
    names the nodes and records requeues; `python` is this interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": 'while [[ $1 == -* ]]; do shift; done\nfor node in 0 1; do SLURM_NODEID=$node "$@"; done\n'
                '[ -n "${FAKE_STATUS:-}" ] && cp "$FAKE_STATUS" "$RUN/status.json"\nexit 1\n',
        "accelerate": 'printf "%s\\n" "$@" > "$FAKE_LOG/accelerate.$SLURM_NODEID"\n',
        "scontrol": 'case $1 in show) echo node1; echo node2 ;; requeue) echo "$2" >> "$FAKE_LOG/requeued" ;; esac\n',
        "python": f'exec {shlex.quote(sys.executable)} "$@"\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("state, code, requeued", [("interrupted", 75, True), ("done", 0, False),
                                                   ("diverged", 4, False), (None, 1, False)])
def test_the_sbatch_example_requeues_exactly_when_the_run_was_interrupted(tmp_path, state, code, requeued):
    run, log = tmp_path / "run", tmp_path / "log"
    run.mkdir()
    log.mkdir()
    env = {**os.environ, "PATH": f"{_fake_cluster(tmp_path)}:{os.environ['PATH']}", "RUN": str(run),
           "FAKE_LOG": str(log), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]",
           "SLURM_GPUS_ON_NODE": "8"}
    # An earlier attempt was interrupted; this one writes `state` (None: it failed before the run started).
    since = "2026-01-01T00:00:00+00:00"
    RunStatus("interrupted", 7, 75, "stopped", since, Holder("toolkit train", 1, "node1", since)).write(run)
    if state:
        fake = tmp_path / "status.json"
        fake.write_text(json.dumps({**load_json(run / "status.json"), "state": state, "exit_code": code,
                                    "time": "2026-01-02T00:00:00+00:00"}))
        env["FAKE_STATUS"] = str(fake)
    proc = subprocess.run(["bash", str(SBATCH), "--data", "imagefolder", "--data-dir", "my data"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert (log / "requeued").exists() == requeued
    if requeued:
        assert (log / "requeued").read_text().split() == ["4242"]
    for node in (0, 1):
        assert (log / f"accelerate.{node}").read_text().splitlines() == [
            "launch", "--config_file", "launch/multi-node.yaml", "--num_machines", "2", "--num_processes", "16",
            "--machine_rank", str(node), "--main_process_ip", "node1", "--main_process_port", "29500",
            "-m", "toolkit", "train", "--output-dir", str(run), "--resume", "latest",
            "--data", "imagefolder", "--data-dir", "my data"]
