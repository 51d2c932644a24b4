"""report.md from hand-made run folders (no training): numbers, failures, missing parts, reproduce commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import assert_clean_error, assert_ok, assert_png, cli, expected_numbers, parse_report, run_commands
from toolkit.apps.cli import build_parser
from toolkit.apps.report import EXPORT_MANIFEST, build_report, read_run_files, render_markdown, save_predictions
from toolkit.apps.verify import FormatResult, VerifyReport
from toolkit.artifacts.formats import FORMATS
from toolkit.artifacts.manifest import FileEntry, Manifest, SourceInfo
from toolkit.core.images import MEAN, STD
from toolkit.training.config import build_train_config
from toolkit.training.evaluate import EvalResult
from toolkit.training.models import build_model
from toolkit.training.runs import DataInfo, RunInfo, RunRecord, save_model

CLASSES = [f"class{i}" for i in range(10)]


# ---------------------------------------------------------------------------------------------
# A hand-made run folder, written with the toolkit's own JSON classes


def make_run(root: Path, *, verified: bool = True, failing: bool = False, grid: bool = True, processes: int = 1,
             **flags) -> Path:
    run = root / "runs" / "fake"
    run.mkdir(parents=True)
    cfg = build_train_config({"data": "synthetic", "output_dir": str(run), "epochs": 2, "batch_size": 32, **flags})
    info = RunInfo(num_processes=processes, distributed_type="DistributedType.NO", mixed_precision="no",
                   device="cpu", torch_threads=1, global_batch_size=32 * processes, steps_per_epoch=3,
                   total_steps=6, compile_mode=None, versions={"toolkit": "0.1.0", "torch": torch.__version__},
                   data=DataInfo("synthetic", CLASSES, train=90, val=10, eval_split="test", eval_note=None))
    RunRecord(cfg, info).write(run)
    records = []
    for step in range(1, 7):
        records.append({"kind": "step", "step": step, "epoch": 1 + (step > 3), "loss": 2.3 - 0.2 * step,
                        "lr": 0.1, "images_per_s": 1000.0 + step, "train_seconds": 0.1 * step})
        if step % 3 == 0:
            records.append({"kind": "epoch", "epoch": step // 3, "step": step, "train_loss": 2.0 / step,
                            "train_seconds": 0.1 * step, "val_accuracy": 0.3 * step / 3, "val_loss": 1.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    confusion = torch.from_numpy(np.random.default_rng(0).integers(0, 9, size=(10, 10))) + 20 * torch.eye(10, dtype=torch.long)
    evaluation = EvalResult(confusion, CLASSES, "test", 0.8123)
    (run / "eval.json").write_text(json.dumps(evaluation.to_json()))
    save_model(build_model("tutorial", 10), run / "model.safetensors", "tutorial", CLASSES)
    if verified:
        results = [FormatResult(f.name, f.file, 1e-7 * i, 1.0 - 0.01 * i, evaluation.accuracy - 0.001 * i,
                                evaluation.per_class, 0, True) for i, f in enumerate(FORMATS)]
        if failing:
            results[-1].failures.append("max |Δlogit| 1 exceeds the tolerance on 3 of 300 images")
        report = VerifyReport(root / "exports" / "fake", "test", evaluation.n, CLASSES, 1e-4, 1e-4, results)
        report.write(run / "verify.json")
        files = {f.file: FileEntry(f.name, size=1000 * (i + 200), sha256=f"{i:x}" * 64) for i, f in enumerate(FORMATS)}
        source = SourceInfo(run=str(run), weights=str(run / "model.safetensors"), checkpoint=None, sha256="0" * 64,
                            model="tutorial", trained_mixed_precision="no", data={"data": "synthetic"})
        manifest = Manifest(toolkit_version="0.1.0", created="2026-01-02T03:04:05+00:00", source=source,
                            precision="fp32", input={}, output={}, class_names=CLASSES, mean=list(MEAN), std=list(STD),
                            opset=18, files=files, versions={}, notes=[])
        (run / EXPORT_MANIFEST).write_text(json.dumps(manifest.to_json()))
    if grid:
        rng = np.random.default_rng(1)
        labels = np.arange(12) % 10
        save_predictions(run, rng.integers(0, 256, size=(12, 3, 32, 32), dtype=np.uint8), labels, (labels + (labels == 3)) % 10)
    return run


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def markdown(run: Path) -> str:
    """report.md's text without drawing the pictures (drawing is what takes the time)."""
    pictures = {name: f"plots/{name}.png" for name in ("training", "confusion", "per_class", "predictions")}
    files = read_run_files(run)
    return render_markdown(files, pictures if files.predictions is not None else
                           {k: v for k, v in pictures.items() if k != "predictions"})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete fake run with its report and pictures built."""
    run = make_run(tmp_path_factory.mktemp("report"))
    build_report(run)
    return run


def test_report_numbers_equal_the_json(built):
    text = (built / "report.md").read_text()
    assert parse_report(text) == expected_numbers(_json(built / "eval.json"), _json(built / "verify.json"),
                                                  _json(built / "export_manifest.json"))
    exported = [f.name for f in FORMATS if f.name != "eager"]
    assert f"all {len(exported)} exported formats ({', '.join(exported)}) match the eager model" in text
    assert "62,006 parameters" in text  # the tutorial net, counted from the weights file
    assert "| 1 | 3 | 0.6667 | 1.5000 | 30.0 % | 0.3 |" in text  # the epoch table, from metrics.jsonl
    assert "1 mistake(s)" in text  # the grid: class3 predicted as class4
    for picture in ("training", "confusion", "per_class", "predictions"):
        assert f"](plots/{picture}.png)" in text
        assert_png(built / "plots" / f"{picture}.png", height=(150, 2000))


def test_toolkit_report_rebuilds_the_same_report(built, capsys):
    first = (built / "report.md").read_text()
    (built / "report.md").unlink()
    for png in (built / "plots").glob("*.png"):
        png.unlink()
    proc = cli(capsys, "report", built)
    assert_ok(proc)
    assert proc.stdout.strip() == f"report: {built / 'report.md'}"
    assert (built / "report.md").read_text() == first
    assert len(list((built / "plots").glob("*.png"))) == 4


def test_failed_verification_is_shown(tmp_path):
    text = markdown(make_run(tmp_path, failing=True))
    last = FORMATS[-1]  # the one make_run fails
    assert f"**FAILED**: {last.name} differ(s) from the eager model" in text
    assert parse_report(text)["formats"][last.name]["result"] == "**FAIL**"
    assert f"- **FAIL** {last.name} (`{last.file}`): max |Δlogit| 1 exceeds the tolerance" in text


def test_a_program_that_was_not_loaded_is_shown_without_numbers(tmp_path):
    """verify never loads a .pt2 whose hash differs from the manifest: its row has no numbers."""
    run = make_run(tmp_path)
    verify = _json(run / "verify.json")
    verify["passed"] = False
    verify["formats"]["pt2"].update(max_abs_logit_diff=None, agreement=None, accuracy=None, per_class=None,
                                    passed=False, failures=["sha256 differs from manifest.json: not loaded"])
    (run / "verify.json").write_text(json.dumps(verify))
    build_report(run)
    text = (run / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| pt2 |"))
    assert "not run" in row and "**FAIL**" in row
    assert "sha256 differs from manifest.json: not loaded" in text
    assert_png(run / "plots" / "per_class.png")


def test_a_run_without_export_or_grid_still_gets_a_report(tmp_path):
    run = make_run(tmp_path, verified=False, grid=False)
    text = build_report(run).read_text()
    assert parse_report(text) == expected_numbers(_json(run / "eval.json"), None, None)
    assert "not exported and verified" in text and "## Test images" not in text
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == ["confusion.png", "per_class.png", "training.png"]


@pytest.mark.parametrize("flags", [{}, {"recipe": "seed", "lr": 0.02, "augment": True, "mixed_precision": "bf16"},
                                   {"augment": False, "val_fraction": 0.0, "schedule": "cosine"}])
def test_reproduce_command_rebuilds_the_config(tmp_path, flags):
    run = make_run(tmp_path, **flags)
    commands = run_commands(markdown(run))
    assert [c[:2] for c in commands] == [["toolkit", "run"], ["toolkit", "train"], ["toolkit", "export"],
                                         ["toolkit", "verify"], ["toolkit", "predict"], ["toolkit", "report"]]
    saved = _json(run / "config.json")
    saved.pop("runtime")
    for argv in commands[:2]:
        args = vars(build_parser().parse_args(argv[1:]))
        values = {k: v for k, v in args.items() if k not in ("command", "func", "export_dir", "formats", "atol", "rtol")}
        assert build_train_config(values).to_dict() == saved
    assert build_parser().parse_args(commands[0][1:]).export_dir == tmp_path / "exports" / "fake"
    assert commands[3][-2:] == ["--json-out", str(run / "verify.json")]


def test_several_processes_are_reproduced_with_accelerate_launch(tmp_path):
    commands = run_commands(markdown(make_run(tmp_path, processes=2)))
    launch = ["accelerate", "launch", "--config_file", "launch/cpu-2proc.yaml", "--num_processes", "2", "-m", "toolkit"]
    assert commands[0][:9] == [*launch, "run"] and commands[1][:9] == [*launch, "train"]


def test_missing_and_unfinished_run_folders_are_one_line_errors(tmp_path, capsys):
    assert_clean_error(cli(capsys, "report", tmp_path / "nowhere"), "nowhere: no such run folder")
    run = make_run(tmp_path, verified=False)
    (run / "eval.json").unlink()
    assert_clean_error(cli(capsys, "report", run), "no eval.json", "--resume latest")
    (run / "config.json").unlink()
    assert_clean_error(cli(capsys, "report", run), "no config.json")
