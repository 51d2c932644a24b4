"""`make gpu-check OUT=DIR DATA_DIR=...`: what a reviewer runs on a lent GPU machine, in about 8 minutes.

The machine is offline and comes with torch, accelerate, onnx, onnxruntime, pytest and pytest-benchmark;
the toolkit is installed with `pip install --no-deps --no-build-isolation -e .`. Steps, each recorded
with the command that ran it:

1. `pytest -m gpu tests benchmarks`: the GPU tests (batches cut on the device equal the CPU's, no host
   sync in the steady-state step, bit-exact resumes with --deterministic, fp16 loss-scale resume,
   --compile with CUDA graphs) and the GPU benchmarks (train_step per precision; inference of every
   format on the GPU, ONNX Runtime's CUDA provider when installed). Timings in DIR/gpu-bench.json.
2. End-to-end training throughput from the epoch loop (data on the device, augmentation, step,
   logging, per-epoch validation and checkpoints excluded): `toolkit train --recipe fast` on the real
   data for a few epochs per precision (fp32, bf16, fp16) at batch 128 and 1024, plus --compile at
   batch 1024. images/s is the median of the trainer's own metrics.jsonl windows after the first epoch
   (warm-up, compilation).
3. Time to accuracy of the large-batch GPU recipe: `toolkit train --recipe gpu`, validation accuracy
   after every epoch against training seconds.
4. The speed net's recipe to accuracy, timed as airbench times it: `toolkit train --recipe speednet --compile`
   for SPEEDNET_SEEDS seeds; accuracy of the final evaluation (with its test-time augmentation), and the
   trainer's training seconds: data already on the device, the clock read after the device finished
   (each flag read waits for it, as CUDA events would), the compile warm-up excluded (its own record).

Writes DIR/gpu-check.json (every figure with its command) and DIR/gpu-check.md (the tables for the README).

`--quick` (`make gpu-check QUICK=1`) runs every stage small, on tiny synthetic data (640 images, a few
steps per run), in under a minute on a 2-core CPU: on a GPU a smoke run before the full check; without
one (or with ACCELERATE_USE_CPU=1) the same stages on the CPU, which is how CI tests this script. Step 1
is then `benchmarks/test_gpu.py`'s train_step cases of the device, timed at tiny size; step 2 one batch
size and the precisions the device trains in (--compile on a GPU only: on the CPU it compiles for about
a minute); step 3 two epochs; step 4 one seed of one epoch, uncompiled on the CPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit.training.accelerator import PRECISIONS_ON, wants_cpu
from toolkit.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT_EPOCHS = 2  # images/s from the second: the first compiles, allocates and warms caches
LOG_WINDOWS_PER_EPOCH = 4
TARGET_ACCURACY = 0.70
SPEEDNET_SEEDS = 3


@dataclass(frozen=True)
class Plan:
    """What the check runs on `device` (cpu or cuda): the full check, or `--quick`'s small version of it."""

    device: str
    quick: bool

    @property
    def synthetic_images(self) -> tuple[int, int]:
        """(train, test) synthetic images when no DATA_DIR is given; 10 % of train is held out for validation."""
        return (640, 100) if self.quick else (50_000, 500)

    @property
    def throughput_cases(self) -> list[tuple[str, int, bool]]:
        """(precision, batch, --compile) of step 2; --compile at the largest batch, on a GPU only."""
        batches = (64,) if self.quick else (128, 1024)
        return [(p, b, False) for b in batches for p in PRECISIONS_ON[self.device]] + \
            ([("no", batches[-1], True)] if self.device == "cuda" else [])

    @property
    def test_selection(self) -> list[str]:
        """Step 1's pytest selection: every `gpu` case, or with --quick the device's train_step benchmarks."""
        return ["benchmarks/test_gpu.py", "-k", f"test_gpu_train_step and {self.device}"] if self.quick else \
            ["-m", "gpu", "tests", "benchmarks"]

    @property
    def env(self) -> dict[str, str]:
        """The children's environment: on the CPU even where a GPU is visible; --quick benchmarks at tiny size."""
        return {**os.environ, **({"ACCELERATE_USE_CPU": "1"} if self.device == "cpu" else {}),
                **({"TOOLKIT_BENCH_SIZE": "tiny"} if self.quick else {})}


def _run(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> tuple[int, float]:
    """Run `cmd` from the repository root, its output into `log`; (exit code, wall seconds)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                env=env).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - start


def _train(plan: Plan, out: Path, name: str, data: list[str], args: list[str], timeout: float) -> dict[str, Any]:
    run = out / "runs" / name
    cmd = [sys.executable, "-m", "toolkit", "train", *data, *args, "--quiet", "--output-dir", str(run), "--overwrite"]
    rc, wall = _run(cmd, out / f"{name}.log", timeout, plan.env)
    records = read_metrics(run) if rc == 0 else []
    return {"command": " ".join(["toolkit", *cmd[3:]]).replace(str(out), "OUT"), "exit_code": rc,
            "wall_s": round(wall, 1), "records": records,
            "config": json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else None}


def throughput(plan: Plan, out: Path, data: list[str], train_images: int) -> list[dict[str, Any]]:
    rows = []
    for precision, batch, compiled in plan.throughput_cases:
        name = f"throughput-{precision}-b{batch}" + ("-compile" if compiled else "")
        log_every = max(1, -(-train_images // batch) // LOG_WINDOWS_PER_EPOCH)
        args = ["--recipe", "fast", "--epochs", str(THROUGHPUT_EPOCHS), "--batch-size", str(batch),
                "--mixed-precision", precision, "--log-every", str(log_every)] + (["--compile"] if compiled else [])
        result = _train(plan, out, name, data, args, timeout=300)
        steps = [r for r in result.pop("records") if r["kind"] == "step" and r["epoch"] > 1]
        speed = statistics.median(r["images_per_s"] for r in steps) if steps else None
        rows.append({"precision": "fp32" if precision == "no" else precision, "batch": batch, "compile": compiled,
                     "images_per_s": speed, "step_ms": 1e3 * batch / speed if speed else None,
                     "windows": len(steps), **{k: result[k] for k in ("command", "exit_code", "wall_s")}})
        print(f"gpu-check: {name}: {_number(speed)} images/s (exit {result['exit_code']})", flush=True)
    return rows


def time_to_accuracy(plan: Plan, out: Path, data: list[str]) -> dict[str, Any]:
    epochs = ["--epochs", "2"] if plan.quick else []  # else the recipe's
    result = _train(plan, out, "recipe-gpu", data, ["--recipe", "gpu", "--log-every", "1000000", *epochs], timeout=600)
    epochs = [r for r in result.pop("records") if r["kind"] == "epoch"]
    reached = next((r for r in epochs if (r["val_accuracy"] or 0) >= TARGET_ACCURACY), None)
    final = epochs[-1] if epochs else None
    return {**{k: result[k] for k in ("command", "exit_code", "wall_s")},
            "epochs": len(epochs), "final_val_accuracy": final and final["val_accuracy"],
            "train_seconds": final and final["train_seconds"],
            "seconds_to_target": reached and reached["train_seconds"], "target": TARGET_ACCURACY,
            "curve": [[r["epoch"], r["train_seconds"], r["val_accuracy"]] for r in epochs]}


def speednet(plan: Plan, out: Path, data: list[str]) -> dict[str, Any]:
    """Step 4: the speednet recipe's accuracy and training seconds per seed, and their means."""
    extra = ["--epochs", "1"] + (["--compile"] if plan.device == "cuda" else []) if plan.quick else ["--compile"]
    runs = []
    for seed in range(1 if plan.quick else SPEEDNET_SEEDS):
        name = f"speednet-seed{seed}"
        result = _train(plan, out, name, data, ["--recipe", "speednet", "--seed", str(seed), "--log-every", "1000000",
                                                *extra], timeout=600)
        records = result.pop("records")
        epochs = [r for r in records if r["kind"] == "epoch"]
        compiled = next((r["seconds"] for r in records if r["kind"] == "compile"), None)
        evaluation = out / "runs" / name / "eval.json"
        accuracy = json.loads(evaluation.read_text())["accuracy"] if evaluation.is_file() else None
        runs.append({"seed": seed, "accuracy": accuracy, "train_seconds": epochs[-1]["train_seconds"] if epochs
                     else None, "compile_seconds": compiled, **{k: result[k] for k in ("command", "exit_code",
                                                                                        "wall_s")}})
        print(f"gpu-check: {name}: accuracy {accuracy}, {runs[-1]['train_seconds']} s (exit {result['exit_code']})",
              flush=True)
    done = [r for r in runs if r["exit_code"] == 0 and r["accuracy"] is not None]
    return {"runs": runs, "exit_code": max(r["exit_code"] for r in runs),
            "mean_accuracy": statistics.mean(r["accuracy"] for r in done) if done else None,
            "mean_train_seconds": statistics.mean(r["train_seconds"] for r in done) if done else None}


def gpu_tests(plan: Plan, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", *plan.test_selection, "-q", "-p", "no:cacheprovider",
           "--benchmark-enable", f"--benchmark-json={out / 'gpu-bench.json'}", "-rs"]
    rc, wall = _run(cmd, out / "gpu-tests.log", timeout=420, env=plan.env)
    tail = (out / "gpu-tests.log").read_text().strip().splitlines()[-1:] or [""]
    bench = []
    if (out / "gpu-bench.json").is_file():
        for b in json.loads((out / "gpu-bench.json").read_text())["benchmarks"]:
            info = b.get("extra_info", {})
            if info.get("kind") in ("inference", "train_step"):
                median = b["stats"]["median"]
                bench.append({"kind": info["kind"], "label": info.get("label") or info.get("backend"),
                              "backend": info.get("backend"), "batch": info.get("batch"),
                              "precision": info.get("precision"), "median_ms": 1e3 * median,
                              "images_per_s": info.get("batch", 0) / median if median else None})
    return {"command": shlex.join(["pytest", *plan.test_selection, "--benchmark-enable"]), "exit_code": rc,
            "wall_s": round(wall, 1),
            "summary": tail[0], "benchmarks": bench}


def _number(x: float | None, digits: int = 0) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown, from whatever stages have run."""
    env = report["environment"]
    where = "the CPU" if report["device"] == "cpu" else env["gpu"]
    lines = [f"GPU check{' (--quick)' if report['quick'] else ''} of {report['date']} on {where}: "
             f"{env['cpus']} CPU cores; torch {env['torch']} "
             f"(CUDA {env['cuda']}), onnxruntime {env['onnxruntime']} (providers: {', '.join(env['ort_providers'])}); "
             f"data: {report['data']}. Total {report['wall_s']:.0f} s.", ""]
    if tests := report["gpu_tests"]:
        lines += [f"`{tests['command']}`: {tests['summary']} (exit {tests['exit_code']}, {tests['wall_s']:.0f} s)", ""]
    if report["throughput"]:
        lines += [f"| `toolkit train --recipe fast`, epoch 2 of {THROUGHPUT_EPOCHS} | batch | images/s | ms per step |",
                  "|---|---|---|---|"]
        lines += [f"| {r['precision']}{' + --compile' if r['compile'] else ''} | {r['batch']} | "
                  f"{_number(r['images_per_s'])} | {_number(r['step_ms'], 3)} |" for r in report["throughput"]]
        lines.append("")
    if tta := report["time_to_accuracy"]:
        final = tta["final_val_accuracy"]
        lines += [f"`{tta['command']}`: {tta['epochs']} epochs, final validation accuracy "
                  f"{_number(100 * final if final is not None else None, 1)} % after {_number(tta['train_seconds'], 1)} s "
                  f"of training; {100 * tta['target']:.0f} % reached after {_number(tta['seconds_to_target'], 1)} s.", ""]
    if speed := report["speednet"]:
        lines += ["| `toolkit train --recipe speednet` | accuracy (with TTA) | training s | compile warm-up s |",
                  "|---|---|---|---|"]
        lines += [f"| seed {r['seed']} | {_number(100 * r['accuracy'] if r['accuracy'] is not None else None, 2)} % | "
                  f"{_number(r['train_seconds'], 2)} | {_number(r['compile_seconds'], 1)} |" for r in speed["runs"]]
        mean = speed["mean_accuracy"]
        lines += [f"| mean | {_number(100 * mean if mean is not None else None, 2)} % | "
                  f"{_number(speed['mean_train_seconds'], 2)} | |", ""]
    if tests and tests["benchmarks"]:
        lines += ["| benchmark | batch | median ms | images/s |", "|---|---|---|---|"]
        lines += [f"| {b['label']} | {b['batch']} | {b['median_ms']:.3f} | {_number(b['images_per_s'])} |"
                  for b in tests["benchmarks"]]
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    import onnxruntime

    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU",
            "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "onnxruntime": onnxruntime.__version__, "ort_providers": onnxruntime.get_available_providers(),
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu-check.md, gpu-check.json and logs")
    data_source = parser.add_mutually_exclusive_group()
    data_source.add_argument("--data-dir", type=Path, default=None,
                             help="CIFAR-10 image folders (train/<class>/...) or torchvision's cifar-10-batches-py; "
                                  "synthetic images when not given")
    data_source.add_argument("--quick", action="store_true",
                             help="every stage small, on tiny synthetic data, in under a minute; on the CPU where "
                                  "there is no GPU or ACCELERATE_USE_CPU=1")
    args = parser.parse_args(argv)
    device = "cpu" if wants_cpu() or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.quick:
        why = "ACCELERATE_USE_CPU asks for the CPU" if torch.cuda.is_available() else \
            "no CUDA GPU visible (torch.cuda.is_available() is False)"
        print(f"gpu-check: error: {why}; the full check measures a GPU (--quick runs its stages small, on the CPU "
              "too)", file=sys.stderr)
        return 2
    plan = Plan(device, args.quick)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.data_dir is None:
        train, test = plan.synthetic_images
        data = ["--data", "synthetic", "--synthetic-train-size", str(train), "--synthetic-test-size", str(test)]
        described, train_images = "synthetic (no DATA_DIR)", train - train // 10
    else:
        kind = "cifar10" if (args.data_dir / "cifar-10-batches-py").is_dir() else "imagefolder"
        data, described, train_images = ["--data", kind, "--data-dir", str(args.data_dir.resolve())], \
            f"{kind} {args.data_dir}", 45_000
    start = time.perf_counter()
    report: dict[str, Any] = {"date": _dt.date.today().isoformat(), "device": device, "quick": args.quick,
                              "environment": environment(), "data": described, "gpu_tests": {}, "throughput": [],
                              "time_to_accuracy": {}, "speednet": {}, "wall_s": 0.0}
    stages = (("gpu_tests", lambda: gpu_tests(plan, out)),  # first: it also decodes the data into the cache
              ("throughput", lambda: throughput(plan, out, data, train_images)),
              ("time_to_accuracy", lambda: time_to_accuracy(plan, out, data)),
              ("speednet", lambda: speednet(plan, out, data)))
    for key, stage in stages:
        report[key] = stage()
        report["wall_s"] = time.perf_counter() - start
        (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")  # after every stage: a
        (out / "gpu-check.md").write_text(markdown(report))  # stopped check still leaves what it measured
    print(markdown(report))
    failed = [step for step in ("gpu_tests", "time_to_accuracy", "speednet") if report[step]["exit_code"] != 0] + \
        [f"throughput {r['precision']} b{r['batch']}" for r in report["throughput"] if r["exit_code"] != 0]
    if failed:
        print(f"gpu-check: error: failed: {', '.join(failed)} (logs in {out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
