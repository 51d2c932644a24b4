"""End-to-end runs of the real `toolkit train` CLI on tiny synthetic data."""

import json

import pytest
import torch

from tests.helpers import TINY, accelerate_launch, assert_clean_error, assert_ok, load_json, run_cli, weights
from toolkit.training.checkpoint import list_checkpoints, verify_checkpoint
from toolkit.training.metrics import read_metrics
from toolkit.training.optim import LRSchedule


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


def test_bf16_on_cpu_trains_and_is_recorded(tmp_path):
    run = tmp_path / "run"
    assert_ok(run_cli("train", *TINY, "--epochs", "1", "--batch-size", "50", "--lr", "0.1",
                      "--mixed-precision", "bf16", "--output-dir", str(run)))
    assert load_json(run / "config.json")["runtime"]["mixed_precision"] == "bf16"
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


def test_two_processes_match_one_process_with_double_batch(tmp_path):
    """2 ranks × batch B end with the weights of 1 rank × batch 2B over the same data order."""
    common = [*TINY, "--epochs", "2", "--lr", "0.1", "--augment", "--schedule", "cosine",
              "--eval-batch-size", "16"]
    two, one = tmp_path / "two", tmp_path / "one"
    proc = accelerate_launch("cpu-2proc.yaml", "train", *common, "--batch-size", "20", "--output-dir", str(two))
    assert_ok(proc)
    config = load_json(two / "config.json")["runtime"]
    assert config["num_processes"] == 2 and config["global_batch_size"] == 40
    assert config["steps_per_epoch"] == 10
    # Every rank wrote its RNG state into the final checkpoint: both trained to the end.
    final = list_checkpoints(two / "checkpoints")[-1]
    assert sorted(p.name for p in final.glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    # The gathered evaluation counts each of the 100 test images exactly once (7 batches of 16 per rank).
    assert load_json(two / "eval.json")["n"] == 100
    assert_ok(run_cli("train", *common, "--batch-size", "40", "--output-dir", str(one)))
    a, b = weights(two / "model.safetensors"), weights(one / "model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst


def test_lr_schedules():
    one = LRSchedule("onecycle", total_steps=100, warmup_fraction=0.2)
    assert one(0) == pytest.approx(1 / 25) and one(20) == pytest.approx(1.0) and one(100) == pytest.approx(0.0)
    assert one(60) == pytest.approx(0.5)
    cos = LRSchedule("cosine", total_steps=100, warmup_fraction=0.0)
    assert cos(0) == pytest.approx(1.0) and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    assert LRSchedule("none", 100, 0.2)(37) == 1.0


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
    assert result == {**load_json(run / "eval.json"), "loss": pytest.approx(result["loss"])}
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
