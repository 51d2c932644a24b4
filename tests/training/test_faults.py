"""Fault injection: training killed at random steps resumes to bit-identical weights.

The short form runs in `make test`; `pytest -m slow tests/training/test_faults.py` runs more kills,
including kills while a checkpoint is being written, and prints a report.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, TINY, assert_clean_error, assert_ok, run_cli, weights
from toolkit.training.checkpoint import list_checkpoints
from toolkit.training.signals import GracefulStop
from toolkit.core.errors import Interrupted

# 2,000 images at batch 8: 250 steps per epoch, 2 epochs; a checkpoint every 7 steps.
ARGS = [*TINY, "--synthetic-train-size", "2000", "--epochs", "2", "--batch-size", "8", "--lr", "0.05",
        "--augment", "--schedule", "onecycle", "--checkpoint-every", "7", "--keep-checkpoints", "3"]


def _start(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "toolkit", "train", *ARGS, "--output-dir", str(run), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(l)["step"] for l in lines if l.endswith("}")), default=0)
    except (OSError, ValueError):
        return 0


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.002)
    return False


def _kill_and_resume(tmp_path: Path, kills: int, seed: int, during_checkpoint: int = 0) -> dict:
    """Kill `kills` times at seeded random steps (plus `during_checkpoint` times while a checkpoint's
    temporary folder exists), resuming each time; return counts and the final weights."""
    rng = random.Random(seed)
    run = tmp_path / "killed"
    report = {"kills": 0, "kills_during_checkpoint": 0, "partial_checkpoints_seen": 0, "resumes": 0}
    plan = sorted(rng.sample(range(5, 480), kills)) + [None] * during_checkpoint
    for target in plan:
        proc = _start(run, "--resume", "latest")
        if target is None:
            hit = _wait_for(proc, lambda: any((run / "checkpoints").glob(".step_*.tmp")))
        else:
            hit = _wait_for(proc, lambda: _last_step(run) >= target)
        if hit:
            proc.send_signal(signal.SIGKILL)
            report["kills" if target is not None else "kills_during_checkpoint"] += 1
        proc.communicate(timeout=120)
        report["partial_checkpoints_seen"] += len(list((run / "checkpoints").glob(".step_*.tmp")))
        report["resumes"] += 1
    proc = _start(run, "--resume", "latest")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    report["weights"] = weights(run / "model.safetensors")
    return report


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("ref") / "run"
    assert_ok(run_cli("train", *ARGS, "--output-dir", str(run)))
    return weights(run / "model.safetensors")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max().item()}"


def test_sigkill_at_random_steps_resumes_bit_exact(tmp_path, reference):
    report = _kill_and_resume(tmp_path, kills=2, seed=1, during_checkpoint=1)
    assert report["kills"] == 2
    _assert_same(reference, report["weights"])


@pytest.mark.slow
def test_sigkill_many_times_resumes_bit_exact(tmp_path, reference):
    report = _kill_and_resume(tmp_path, kills=8, seed=7, during_checkpoint=4)
    _assert_same(reference, report["weights"])
    print("\nfault-injection report:", {k: v for k, v in report.items() if k != "weights"})


def test_sigterm_checkpoints_and_exits_with_distinct_code(tmp_path, reference):
    run = tmp_path / "run"
    proc = _start(run)
    assert _wait_for(proc, lambda: _last_step(run) >= 30)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == Interrupted.exit_code, err[-2000:]
    assert "stopped by signal after step" in err and "Traceback" not in err
    stopped_at = int(err.split("stopped by signal after step ")[1].split(";")[0])
    assert list_checkpoints(run / "checkpoints")[-1].name == f"step_{stopped_at}"
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["step"], status["exit_code"]) == ("interrupted", stopped_at, 75)
    assert status["holder"]["pid"] == proc.pid and "--resume latest" in status["message"]
    assert_ok(run_cli("train", *ARGS, "--output-dir", str(run), "--resume", "latest"))
    _assert_same(reference, weights(run / "model.safetensors"))


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, reference):
    run = tmp_path / "run"
    proc = _start(run)
    assert _wait_for(proc, lambda: len(list_checkpoints(run / "checkpoints")) >= 2 and _last_step(run) >= 60)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    newest = list_checkpoints(run / "checkpoints")[-1]
    data = (newest / "optimizer.pt").read_bytes()
    (newest / "optimizer.pt").write_bytes(data[: len(data) // 2])  # truncated
    resumed = run_cli("train", *ARGS, "--output-dir", str(run), "--resume", "latest")
    assert_ok(resumed)
    assert f"skipping checkpoint {newest}: optimizer.pt is corrupt" in resumed.stdout
    _assert_same(reference, weights(run / "model.safetensors"))


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    proc = run_cli("train", *TINY, "--epochs", "1", "--batch-size", "32", "--lr", "1e5",
                   "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 4 and "non-finite loss at step" in proc.stderr and "Traceback" not in proc.stderr
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("diverged", 4)
    # --log-every 1 reads the step flags after every step: the run stops at the step that diverged.
    assert status["message"].startswith(f"non-finite loss at step {status['step']} ")
    proc = run_cli("train", *TINY, "--epochs", "1", "--batch-size", "32", "--lr", "1e5", "--on-nan", "skip",
                   "--max-nan-skips", "2", "--output-dir", str(tmp_path / "run2"))
    assert proc.returncode == 4 and "--max-nan-skips 2 exhausted" in proc.stderr
    assert proc.stdout.count("batch skipped") == 2


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_cli("train", *TINY, "--epochs", "1", "--output-dir", str(blocker / "run"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"--output-dir {blocker / 'run'}: cannot create" in proc.stderr


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    """A kill while a metrics record is appended leaves a torn last line: --resume latest drops it, naming it."""
    run = tmp_path / "run"
    args = [*TINY, "--batch-size", "100", "--output-dir", str(run)]  # 4 steps per epoch
    assert_ok(run_cli("train", *args, "--epochs", "1"))
    metrics = run / "metrics.jsonl"
    assert len(metrics.read_text().splitlines()) == 5  # 4 step records and 1 epoch record
    with open(metrics, "a") as f:
        f.write('{"kind": "step", "step": 5, "epoch": 2, "lo')
    proc = run_cli("train", *args, "--epochs", "2", "--resume", "latest")
    assert_ok(proc)
    assert f"warning: {metrics} line 6 is not a complete JSON record" in proc.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 9))


def test_disk_full_during_checkpoint_keeps_earlier_checkpoints(tmp_path):
    """Cap file size below a checkpoint's model file (like a full disk): a clear error, nothing lost."""
    import resource

    run = tmp_path / "run"
    assert_ok(run_cli("train", *TINY, "--epochs", "1", "--batch-size", "50", "--output-dir", str(run)))
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # bytes; model.safetensors is ~250 kB

    proc = subprocess.run([sys.executable, "-m", "toolkit", "train", *TINY, "--epochs", "2", "--batch-size", "50",
                           "--resume", "latest", "--output-dir", str(run)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, preexec_fn=limit_file_size)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot write checkpoint" in proc.stderr and "earlier checkpoints are untouched" in proc.stderr
    after = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    assert after == before  # no partial folder left, the good checkpoint intact


def test_overwrite_replaces_only_run_files(tmp_path):
    run = tmp_path / "run"
    assert_ok(run_cli("train", *TINY, "--epochs", "1", "--batch-size", "50", "--output-dir", str(run)))
    (run / "notes.txt").write_text("mine")
    old_steps = [p.name for p in list_checkpoints(run / "checkpoints")]
    assert_ok(run_cli("train", *TINY, "--epochs", "1", "--batch-size", "100", "--output-dir", str(run), "--overwrite"))
    assert (run / "notes.txt").read_text() == "mine"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_4"] != old_steps
    assert json.loads((run / "config.json").read_text())["batch_size"] == 100


def test_killed_rank_ends_the_job_and_it_resumes(tmp_path):
    """SIGKILL one of two ranks: the launcher exits non-zero promptly; --resume latest finishes the run."""
    import psutil

    from tests.helpers import CPU_LAUNCH_ENV, accelerate_launch_cmd

    run = tmp_path / "run"
    cmd = accelerate_launch_cmd("cpu-2proc.yaml", "train", *ARGS, "--output-dir", str(run), "--resume", "latest")
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **CPU_LAUNCH_ENV})
    assert _wait_for(launcher, lambda: _last_step(run) >= 40, timeout=180)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "toolkit" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert time.monotonic() - killed_at < 60  # no hang waiting for the dead rank
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **CPU_LAUNCH_ENV})
    assert_ok(proc)
    assert "resumed from" in proc.stdout
    assert json.loads((run / "eval.json").read_text())["n"] == 100


def test_sigusr1_under_the_launcher_checkpoints_once_though_delivered_twice(tmp_path):
    """SLURM's `--signal=USR1@T` reaches every process of the job step, and torchrun's agent (told to handle
    SIGUSR1, as launch/slurm/train.sbatch does) forwards it again: one stop, one checkpoint, status.json says
    interrupted. The launcher exits non-zero (its exact code is the launcher's business: 1, or the signal's
    128 + 10, by release); status.json keeps the 75 the run meant."""
    import psutil

    from tests.helpers import accelerate_launch_cmd

    run = tmp_path / "run"
    launcher = subprocess.Popen(accelerate_launch_cmd("cpu-2proc.yaml", "train", *ARGS, "--output-dir", str(run)),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1",
                                     "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"})
    assert _wait_for(launcher, lambda: _last_step(run) >= 20, timeout=180)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "toolkit" in " ".join(p.cmdline())]
    assert len(workers) == 2
    for process in [launcher, *workers]:
        process.send_signal(signal.SIGUSR1)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("interrupted", 75), err[-3000:]
    final = list_checkpoints(run / "checkpoints")[-1]
    assert final.name == f"step_{status['step']}"
    assert sorted(p.name for p in final.glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]


def test_a_repeated_signal_within_a_moment_is_one_request():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # would exit at once if counted as a second request
        assert stop.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_one_writer_per_run_folder(tmp_path):
    """A second `toolkit train` or `toolkit run` into a folder in use fails at once naming the holder; a holder
    killed with SIGKILL leaves status.json saying running, `toolkit status` says it is gone, and its lock
    blocks nobody."""
    run, long = tmp_path / "run", ["--epochs", "100"]  # runs until killed
    first = _start(run, *long)
    assert _wait_for(first, lambda: _last_step(run) >= 5)
    for command in (["train"], ["run", "--export-dir", str(tmp_path / "export")]):
        proc = run_cli(*command, *ARGS, *long, "--output-dir", str(run), "--resume", "latest")
        assert_clean_error(proc, f"--output-dir {run} is in use by toolkit train, pid {first.pid} on "
                                 f"{socket.gethostname()} since 20")
    shown = run_cli("status", str(run))
    assert shown.stdout.startswith(f"{run}: running") and "no process holds" not in shown.stdout
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    shown = run_cli("status", str(run))
    assert shown.stdout.startswith(f"{run}: running") and f"no process holds {run / '.lock'}" in shown.stdout
    steps = _last_step(run)
    # The lock is free: this start gets as far as the run-folder checks, which refuse to train over the run.
    assert_clean_error(run_cli("train", *ARGS, "--output-dir", str(run)), "already holds a run")
    assert _last_step(run) == steps and json.loads((run / "status.json").read_text())["state"] == "running"


def test_unrestorable_rng_state_is_an_error_not_a_silent_divergence(tmp_path):
    """A checkpoint whose RNG file loads but cannot be applied: refuse to resume (Accelerate only logs this)."""
    import hashlib

    run = tmp_path / "run"
    assert_ok(run_cli("train", *TINY, "--epochs", "1", "--batch-size", "100", "--output-dir", str(run)))
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    torch.save({"torch": torch.zeros(3, dtype=torch.uint8)}, ckpt / "rng_0.pt")  # wrong size, no other keys
    state = json.loads((ckpt / "state.json").read_text())
    state["files"]["rng_0.pt"] = hashlib.sha256((ckpt / "rng_0.pt").read_bytes()).hexdigest()
    (ckpt / "state.json").write_text(json.dumps(state))
    proc = run_cli("train", *TINY, "--epochs", "2", "--batch-size", "100", "--resume", str(ckpt),
                   "--output-dir", str(tmp_path / "fork"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot restore the RNG state from rng_0.pt" in proc.stderr
    status = json.loads((tmp_path / "fork" / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("failed", 2) and "rng_0.pt" in status["message"]
