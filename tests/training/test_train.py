"""End-to-end runs of the real `toolkit train` CLI on tiny synthetic data."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import (ROOT, TINY, accelerate_launch, accelerate_launch_cmd, assert_clean_error, assert_ok,
                           free_port, load_json, run_cli, weights)
from toolkit.training.checkpoint import list_checkpoints, verify_checkpoint
from toolkit.training.metrics import read_metrics
from toolkit.training.config import build_train_config
from toolkit.training.models import build_model
from toolkit.training.optim import LRSchedule, build_optimizer, build_scheduler, fit_schedule


def test_single_process_run_writes_the_run_folder(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", *TINY, "--epochs", "2", "--batch-size", "32", "--lr", "0.1",
                   "--checkpoint-every", "5", "--keep-checkpoints", "2", "--output-dir", str(run))
    assert_ok(proc)
    assert "Accuracy for class: class0 is" in proc.stdout
    config = load_json(run / "config.json")
    assert config["runtime"]["num_processes"] == 1 and config["runtime"]["mixed_precision"] == "no"
    assert config["batch_size"] == 32 and config["recipe"] == "fast"
    assert config["runtime"]["steps_per_epoch"] == 13  # ceil(400 / 32)
    evaluation = load_json(run / "eval.json")
    assert evaluation["n"] == 100 and set(evaluation["per_class"]) == {f"class{i}" for i in range(10)}
    assert evaluation["accuracy"] > 0.5  # the synthetic classes are learnable in 26 steps
    assert sum(map(sum, evaluation["confusion"])) == 100
    steps = [m for m in read_metrics(run) if m["kind"] == "step"]
    assert [m["step"] for m in steps] == list(range(1, 27))
    assert {"loss", "lr", "images_per_s", "epoch"} <= set(steps[0])
    epochs = [m for m in read_metrics(run) if m["kind"] == "epoch"]
    assert [m["epoch"] for m in epochs] == [1, 2]
    kept = list_checkpoints(run / "checkpoints")
    assert [p.name for p in kept] == ["step_25", "step_26"]  # keep-last-2 of 5, 10, 13, 15, 20, 25, 26
    assert verify_checkpoint(kept[-1])["epoch"] == 2
    assert (run / "model.safetensors").exists()
    status = load_json(run / "status.json")
    assert (status["state"], status["step"], status["exit_code"]) == ("done", 26, 0)
    assert status["holder"]["command"] == "toolkit train" and (run / ".lock").read_text() == ""  # released
    shown = run_cli("status", str(run))
    assert_ok(shown)
    assert shown.stdout.startswith(f"{run}: done at step 26 (exit code 0)")


def test_bf16_on_cpu_trains_and_is_recorded(tmp_path):
    run = tmp_path / "run"
    assert_ok(run_cli("train", *TINY, "--epochs", "1", "--batch-size", "50", "--lr", "0.1",
                      "--mixed-precision", "bf16", "--output-dir", str(run)))
    runtime = load_json(run / "config.json")["runtime"]
    assert (runtime["mixed_precision"], runtime["mixed_precision_source"]) == ("bf16", "config")
    assert all(t.dtype == torch.float32 for t in weights(run / "model.safetensors").values())


def test_resume_is_bit_exact_across_an_epoch_boundary(tmp_path):
    """Fork from checkpoints before and after the epoch boundary; both must end bit-identical."""
    common = [*TINY, "--epochs", "2", "--batch-size", "32", "--lr", "0.1", "--augment", "--schedule", "onecycle",
              "--checkpoint-every", "5", "--keep-checkpoints", "10"]
    full = tmp_path / "full"
    assert_ok(run_cli("train", *common, "--output-dir", str(full)))
    reference = weights(full / "model.safetensors")
    for step in ("step_10", "step_15"):  # epoch 1 has 13 steps
        fork = tmp_path / f"from_{step}"
        proc = run_cli("train", *common, "--resume", str(full / "checkpoints" / step), "--output-dir", str(fork))
        assert_ok(proc)
        assert f"resumed from {full / 'checkpoints' / step}" in proc.stdout
        resumed = weights(fork / "model.safetensors")
        assert all(torch.equal(reference[k], resumed[k]) for k in reference), step
    # --resume latest continues a run in place.
    proc = run_cli("train", *common, "--epochs", "3", "--resume", "latest", "--output-dir", str(full))
    assert_ok(proc)
    assert "resumed from" in proc.stdout and "step_26" in proc.stdout


# Every trainer feature airbench's recipe uses, on a model with BatchNorm and a whitening layer.
SPEED_FEATURES = [*TINY, "--model", "speednet", "--epochs", "2", "--batch-size", "50", "--lr", "0.2", "--momentum",
                  "0.85", "--nesterov", "--weight-decay", "0.002", "--decoupled-weight-decay", "--norm-lr-scale", "16",
                  "--schedule", "onecycle", "--lr-start", "0.2", "--lr-end", "0.07", "--lookahead-every", "3",
                  "--whiten-images", "200", "--channels-last", "--augment", "--crop-padding", "2",
                  "--label-smoothing", "0.2", "--tta", "flip-translate", "--checkpoint-every", "5",
                  "--keep-checkpoints", "10"]


def test_the_speednet_features_train_resume_bit_exactly_and_evaluate_with_tta(tmp_path):
    full = tmp_path / "full"
    assert_ok(run_cli("train", *SPEED_FEATURES, "--output-dir", str(full)))
    reference = weights(full / "model.safetensors")
    first = build_model("speednet")
    assert not torch.equal(reference["whiten.weight"], first.state_dict()["whiten.weight"])  # whitened, then frozen
    checkpoint = full / "checkpoints" / "step_10"  # mid-epoch 2 (8 steps per epoch), between Lookahead blends
    assert "lookahead.safetensors" in verify_checkpoint(checkpoint)["files"]
    fork = tmp_path / "fork"
    assert_ok(run_cli("train", *SPEED_FEATURES, "--resume", str(checkpoint), "--output-dir", str(fork)))
    resumed = weights(fork / "model.safetensors")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    evaluation = load_json(full / "eval.json")
    assert evaluation["tta"] == "flip-translate" and evaluation["accuracy"] > 0.5
    # `toolkit evaluate` uses the run's --tta unless told otherwise, and says which.
    plain = run_cli("evaluate", "--run", str(full), "--tta", "none", "--json-out", str(tmp_path / "plain.json"))
    again = run_cli("evaluate", "--run", str(full), "--json-out", str(tmp_path / "again.json"))
    assert_ok(plain)
    assert_ok(again)
    headline = [next(line for line in p.stdout.splitlines() if line.startswith("Accuracy of the network"))
                for p in (plain, again)]
    assert headline[0].endswith(" %") and headline[1].endswith("(test-time augmentation: flip-translate)")
    assert load_json(tmp_path / "plain.json")["tta"] == "none"
    assert load_json(tmp_path / "again.json")["confusion"] == evaluation["confusion"]


def test_muon_trains_and_resumes_bit_exactly(tmp_path):
    common = [*TINY, "--model", "speednet", "--optimizer", "muon", "--muon-lr", "0.2", "--epochs", "2",
              "--batch-size", "50", "--lr", "0.2", "--momentum", "0.85", "--nesterov", "--schedule", "onecycle",
              "--warmup-fraction", "0", "--checkpoint-every", "5", "--keep-checkpoints", "10"]
    full = tmp_path / "full"
    assert_ok(run_cli("train", *common, "--output-dir", str(full)))
    reference = weights(full / "model.safetensors")
    fork = tmp_path / "fork"
    assert_ok(run_cli("train", *common, "--resume", str(full / "checkpoints" / "step_10"), "--output-dir", str(fork)))
    resumed = weights(fork / "model.safetensors")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    # Muon holds every trained filter bank at norm √out; the step after the last rescale moves it only a little.
    for name, tensor in reference.items():
        if tensor.dim() == 4 and not name.startswith("whiten"):
            assert float(tensor.norm()) == pytest.approx(tensor.size(0) ** 0.5, rel=0.1), name
    evaluation = load_json(full / "eval.json")
    assert evaluation["accuracy"] > 0.5 and evaluation["seconds"] > 0


def test_lookahead_state_left_out_of_a_checkpoint_is_refused_on_resume(tmp_path):
    run = tmp_path / "run"
    common = [*TINY, "--epochs", "1", "--batch-size", "50", "--lr", "0.1", "--lookahead-every", "2",
              "--checkpoint-every", "4", "--keep-checkpoints", "5"]
    assert_ok(run_cli("train", *common, "--output-dir", str(run)))
    checkpoint = run / "checkpoints" / "step_4"
    state = load_json(checkpoint / "state.json")
    del state["files"]["lookahead.safetensors"]
    (checkpoint / "state.json").write_text(json.dumps(state))
    proc = run_cli("train", *common, "--resume", str(checkpoint), "--output-dir", str(tmp_path / "fork"))
    assert_clean_error(proc, "lookahead.safetensors is not listed in state.json")


ONECYCLE = [*TINY, "--batch-size", "32", "--lr", "0.1", "--schedule", "onecycle", "--warmup-fraction", "0.2"]


def test_resume_with_more_epochs_rebuilds_the_schedule_over_the_new_length(tmp_path):
    """`--epochs 2`, then `--epochs 4 --resume latest`: steps 27-52 follow a onecycle schedule over 52 steps (the
    checkpoint's schedule over 26 would leave them at LR 0), and config.json records the resume."""
    run = tmp_path / "run"
    assert_ok(run_cli("train", *ONECYCLE, "--epochs", "2", "--output-dir", str(run)))
    proc = run_cli("train", *ONECYCLE, "--epochs", "4", "--resume", "latest", "--output-dir", str(run))
    assert_ok(proc)
    lrs = {m["step"]: m["lr"] for m in read_metrics(run) if m["kind"] == "step"}
    assert list(lrs) == list(range(1, 53))
    assert min(lrs[s] for s in range(27, 52)) > 0.0
    first, longer = LRSchedule("onecycle", 26, 0.2), LRSchedule("onecycle", 52, 0.2)
    assert [lrs[s] for s in range(1, 27)] == pytest.approx([0.1 * first(s) for s in range(1, 27)])
    assert [lrs[s] for s in range(27, 53)] == pytest.approx([0.1 * longer(s) for s in range(27, 53)])
    assert "LR schedule rebuilt over 52 steps (the checkpoint's ran over 26)" in proc.stdout
    config = load_json(run / "config.json")
    assert config["epochs"] == 4 and config["runtime"]["total_steps"] == 52
    assert config["runtime"]["resumes"] == [{
        "step": 26, "checkpoint": str(run / "checkpoints" / "step_26"), "checkpoint_epochs": 2, "epochs": 4,
        "checkpoint_total_steps": 26, "total_steps": 52, "schedule_rebuilt": True}]
    # The newest checkpoint carries the run's record, resumes included: a later resume reads its history there.
    final = verify_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    assert final["run"]["epochs"] == 4 and final["run"]["runtime"]["resumes"] == config["runtime"]["resumes"]


def test_resume_refuses_a_config_that_changes_what_the_steps_mean(tmp_path):
    """A changed --batch-size (or --lr, ...) would mix two runs: refused in one line naming both values, and a
    length that ends before the checkpoint is refused too; the run folder is left as it was."""
    run = tmp_path / "run"
    assert_ok(run_cli("train", *ONECYCLE, "--epochs", "2", "--output-dir", str(run)))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    resume = ["--resume", "latest", "--output-dir", str(run)]
    ckpt = run / "checkpoints" / "step_26"
    assert_clean_error(run_cli("train", *ONECYCLE, "--epochs", "4", "--batch-size", "64", "--lr", "0.2", *resume),
                       f"--resume: this run's config differs from that of checkpoint {ckpt} (step 26, end of epoch 2): "
                       "--batch-size 64 (checkpoint: 32), --lr 0.2 (checkpoint: 0.1); resume with the checkpoint's "
                       f"values (--config {run / 'config.json'} repeats them)")
    assert_clean_error(run_cli("train", *ONECYCLE, "--epochs", "1", *resume),
                       f"--resume: --epochs 1 ends before checkpoint {ckpt} (step 26, end of epoch 2): "
                       "pass --epochs 2 or more")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# 2 ranks × batch 20 against 1 rank × batch 40, and the same 2 ranks as two one-process "machines".
PARALLEL = [*TINY, "--epochs", "2", "--lr", "0.1", "--augment", "--schedule", "cosine", "--eval-batch-size", "16"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """A run of 2 processes on one machine (launch/cpu-2proc.yaml), batch 20 each."""
    two = tmp_path_factory.mktemp("two") / "run"
    assert_ok(accelerate_launch("cpu-2proc.yaml", "train", *PARALLEL, "--batch-size", "20", "--output-dir", str(two)))
    return two


def _max_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a / "model.safetensors"), weights(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_two_processes_match_one_process_with_double_batch(tmp_path, two_processes):
    """2 ranks × batch B end with the weights of 1 rank × batch 2B over the same data order."""
    two, one = two_processes, tmp_path / "one"
    config = load_json(two / "config.json")["runtime"]
    assert config["num_processes"] == 2 and config["global_batch_size"] == 40
    assert config["steps_per_epoch"] == 10
    # Every rank wrote its RNG state into the final checkpoint: both trained to the end.
    final = list_checkpoints(two / "checkpoints")[-1]
    assert sorted(p.name for p in final.glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    # The gathered evaluation counts each of the 100 test images exactly once (7 batches of 16 per rank).
    assert load_json(two / "eval.json")["n"] == 100
    assert_ok(run_cli("train", *PARALLEL, "--batch-size", "40", "--output-dir", str(one)))
    worst = _max_difference(two, one)
    assert worst < 1e-5, worst


def test_two_machines_match_two_processes_on_one(tmp_path, two_processes):
    """launch/multi-node.yaml for real: two `accelerate launch` "machines" on this host, one CPU process each,
    sharing a run folder as machines share a file system, end where the 2-process run on one machine does."""
    run, port = tmp_path / "run", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}  # the CPU, even on a GPU host
    machines = [subprocess.Popen(accelerate_launch_cmd(
        "multi-node.yaml", "train", *PARALLEL, "--batch-size", "20", "--output-dir", str(run), port=port,
        launch=["--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
                "--main_process_ip", "127.0.0.1"]), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for rank in (0, 1)]
    for machine in machines:
        _, err = machine.communicate(timeout=300)
        assert machine.returncode == 0, err[-3000:]
    assert load_json(run / "config.json")["runtime"]["num_processes"] == 2
    assert load_json(run / "status.json")["state"] == "done"
    worst = _max_difference(two_processes, run)
    assert worst < 1e-5, worst


def test_config_file_repeats_a_run(tmp_path):
    """`--config runs/X/config.json --output-dir runs/Y` trains run X again; flags override the file."""
    first, again = tmp_path / "first", tmp_path / "again"
    assert_ok(run_cli("train", *TINY, "--epochs", "1", "--batch-size", "50", "--lr", "0.05", "--augment",
                      "--output-dir", str(first)))
    assert_ok(run_cli("train", "--config", str(first / "config.json"), "--output-dir", str(again)))
    a, b = load_json(first / "config.json"), load_json(again / "config.json")
    assert {**a, "output_dir": None, "runtime": None} == {**b, "output_dir": None, "runtime": None}
    assert _max_difference(first, again) == 0.0  # bit-identical on CPU
    # Without --output-dir the file's own folder is named, and it already holds run X: nothing is touched.
    assert_clean_error(run_cli("train", "--config", str(first / "config.json")), f"--output-dir {first} already holds")


def test_lr_schedules():
    one = LRSchedule("onecycle", total_steps=100, warmup_fraction=0.2)
    assert one(0) == pytest.approx(1 / 25) and one(20) == pytest.approx(1.0) and one(100) == pytest.approx(0.0)
    assert one(60) == pytest.approx(0.5)
    cos = LRSchedule("cosine", total_steps=100, warmup_fraction=0.0)
    assert cos(0) == pytest.approx(1.0) and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    assert LRSchedule("none", 100, 0.2)(37) == 1.0


def test_fit_schedule_continues_a_restored_schedule_over_a_new_length():
    """A LambdaLR restored from a checkpoint runs the checkpoint's schedule; fit_schedule moves it to the new length
    at the same step, and with the same length changes nothing."""
    cfg = build_train_config({"schedule": "onecycle", "lr": 0.1, "warmup_fraction": 0.2}).optim

    def restored(total_steps: int):
        """A scheduler for `total_steps`, loaded from one that made 10 of 20 steps."""
        saved = build_scheduler(build_optimizer(build_model("tutorial", 10), cfg), cfg, total_steps=20)
        for _ in range(10):
            saved.optimizer.step()
            saved.step()
        scheduler = build_scheduler(build_optimizer(build_model("tutorial", 10), cfg), cfg, total_steps)
        scheduler.load_state_dict(saved.state_dict())
        return scheduler

    old, new = LRSchedule("onecycle", 20, 0.2), LRSchedule("onecycle", 40, 0.2)
    longer = restored(40)
    assert longer.get_last_lr() == pytest.approx([0.1 * old(10)])  # the checkpoint's schedule
    assert fit_schedule(longer, cfg, 40) == 20
    assert longer.get_last_lr() == pytest.approx([0.1 * new(10)]) and new(10) != pytest.approx(old(10))
    assert longer.optimizer.param_groups[0]["lr"] == longer.get_last_lr()[0]
    longer.step()
    assert longer.get_last_lr() == pytest.approx([0.1 * new(11)])
    same = restored(20)
    lr = same.get_last_lr()
    assert fit_schedule(same, cfg, 20) == 20 and same.get_last_lr() == lr and lr[0] > 0  # bit-identical


@pytest.mark.parametrize("args, fragments", [
    (["--mixed-precision", "fp16"], ["--mixed-precision fp16", "bf16"]),
    (["--data", "imagefolder", "--data-dir", "/nonexistent/ds"], ["/nonexistent/ds", "no such folder"]),
    (["--lr", "-1"], ["--lr", "must be > 0"]),
    (["--expect-processes", "2"], ["world size mismatch", "2 processes", "sees 1"]),
    (["--resume", "/nonexistent/ckpt"], ["/nonexistent/ckpt", "no such folder"]),
])
def test_bad_input_is_one_clear_line(tmp_path, args, fragments):
    proc = run_cli("train", *TINY, "--epochs", "1", "--output-dir", str(tmp_path / "run"), *args)
    assert_clean_error(proc, *fragments)


def test_existing_run_and_bad_checkpoints_are_never_overwritten(tmp_path):
    run = tmp_path / "run"
    assert_ok(run_cli("train", *TINY, "--epochs", "1", "--batch-size", "100", "--output-dir", str(run)))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert_clean_error(run_cli("train", *TINY, "--epochs", "1", "--output-dir", str(run)), "already holds a run")
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    assert_clean_error(run_cli("train", *TINY, "--resume", str(not_a_checkpoint), "--output-dir", str(tmp_path / "x")),
                       "not a complete checkpoint")
    # A corrupt newest checkpoint: --resume latest falls back to nothing older here, so it fails clearly.
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    proc = run_cli("train", *TINY, "--epochs", "2", "--resume", "latest", "--output-dir", str(run))
    assert_clean_error(proc, "model.safetensors is corrupt")
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    changed = {p for p in before if before[p] != after.get(p)}
    assert changed == {ckpt / "model.safetensors"}  # only what the test itself damaged


def test_evaluate_command_reports_per_class_and_json(tmp_path):
    run = tmp_path / "run"
    assert_ok(run_cli("train", *TINY, "--epochs", "1", "--batch-size", "40", "--output-dir", str(run)))
    out = tmp_path / "eval.json"
    proc = run_cli("evaluate", "--run", str(run), "--json-out", str(out))
    assert_ok(proc)
    assert "Accuracy of the network on the 100 test images" in proc.stdout
    result = json.loads(out.read_text())
    # The same evaluation as training's final one, but for its wall time.
    assert result == {**load_json(run / "eval.json"), "loss": pytest.approx(result["loss"]),
                      "seconds": result["seconds"]}
    assert_clean_error(run_cli("evaluate", "--run", str(tmp_path / "nope")), "not a run folder")
    assert_clean_error(run_cli("evaluate", "--run", str(run), "--split", "val"), "validation split is empty")


def test_log_with_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert_ok(run_cli("train", *TINY, "--epochs", "1", "--batch-size", "50", "--lr", "0.1",
                      "--log-with", "tensorboard", "--output-dir", str(run)))
    assert list(run.rglob("events.out.tfevents.*"))
    assert_clean_error(run_cli("train", *TINY, "--log-with", "nosuch", "--output-dir", str(tmp_path / "x")),
                       "--log-with nosuch", "Unsupported logging capability")
