"""Every built-in model and a user's own model through train → export → verify → predict, as a user runs them,
on tiny synthetic data."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from tests.helpers import assert_clean_error, assert_ok, load_json, run_cli

DATA = ["--data", "synthetic", "--synthetic-train-size", "200", "--synthetic-test-size", "50", "--val-fraction", "0",
        "--epochs", "1", "--batch-size", "25", "--lr", "0.05", "--threads", "2", "--quiet"]

# A user's model as a user writes one: a module with a factory taking the number of classes.
USER_MODULE = '''
"""My own CIFAR model."""
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4))
        self.head = nn.Linear(8 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def make(num_classes: int) -> nn.Module:
    return Small(num_classes)


class Moody(Small):
    """Takes a branch by the data: TorchScript can script it, torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return super().forward(x)
        return -super().forward(x)


def moody(num_classes: int) -> nn.Module:
    return Moody(num_classes)
'''
USER_MODEL = "mymodels:make"


@pytest.fixture
def user_code(tmp_path: Path) -> dict[str, str]:
    """USER_MODULE as mymodels.py in a folder, and the environment that puts it on the path."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "mymodels.py").write_text(textwrap.dedent(USER_MODULE))
    return {"PYTHONPATH": str(code)}


def _image(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def _label(proc) -> str:
    assert_ok(proc)
    return json.loads(proc.stdout)[0]["class"]


# Every built-in through every format. speednet trains 4 epochs here: after 1 epoch on these 200 images its logits
# lie within about 0.05 of each other (median top-2 margin 0.012), where int8's few-percent logit error flips 3 of
# the 50 test predictions, so whether it passes the int8 policy (one image either way) is luck; after 4 epochs
# its margins are like a real run's and int8 agrees with eager on every image.
EPOCHS = {"resnet18": [], "speednet": ["--epochs", "4"]}


@pytest.mark.parametrize("model", sorted(EPOCHS))
def test_a_builtin_model_runs_end_to_end(tmp_path: Path, model: str) -> None:
    run, export = tmp_path / "run", tmp_path / "export"
    assert_ok(run_cli("run", "--model", model, *DATA, *EPOCHS[model], "--output-dir", str(run),
                      "--export-dir", str(export), timeout=900))
    assert load_json(run / "config.json")["model"] == model
    assert load_json(run / "verify.json")["passed"] is True
    assert load_json(export / "manifest.json")["source"]["model"] == model
    fp32 = onnx.load(str(export / "model.onnx"))
    assert {p.key: json.loads(p.value) for p in fp32.metadata_props}["model"] == model
    assert "BatchNormalization" not in {n.op_type for n in fp32.graph.node}  # folded into the convolutions
    for file in ("model.fp16.onnx", "model.int8.onnx"):  # fp32 in and out, whatever the precision inside
        graph = onnx.load(str(export / file)).graph
        assert [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)] == [onnx.TensorProto.FLOAT] * 2
    image = _image(tmp_path / "one.png")
    labels = {name: _label(run_cli("predict", str(export / name), str(image), "--json"))
              for name in ("model.onnx", "model.safetensors")}
    assert labels["model.onnx"] == labels["model.safetensors"]


def test_a_users_own_model_runs_end_to_end_and_its_code_is_imported_only_when_named(tmp_path: Path,
                                                                                     user_code: dict[str, str]) -> None:
    env = user_code
    run, export = tmp_path / "run", tmp_path / "export"

    assert_ok(run_cli("train", "--model", USER_MODEL, *DATA, "--output-dir", str(run), env=env))
    assert load_json(run / "config.json")["model"] == USER_MODEL

    named = f"pass --model {USER_MODEL} if you trust it"
    assert_clean_error(run_cli("export", "--run", str(run), "--out", str(export), env=env), named)
    assert not export.exists()
    assert_ok(run_cli("export", "--run", str(run), "--out", str(export), "--model", USER_MODEL, env=env))
    props = {p.key: json.loads(p.value) for p in onnx.load(str(export / "model.onnx")).metadata_props}
    assert props["model"] == USER_MODEL

    assert_clean_error(run_cli("verify", str(export), env=env), named)
    assert_ok(run_cli("verify", str(export), "--model", USER_MODEL, env=env))
    assert_clean_error(run_cli("evaluate", "--run", str(run), "--model", "tutorial", env=env),
                       f"--model tutorial: {run / 'model.safetensors'} holds weights of model '{USER_MODEL}'")

    image = _image(tmp_path / "one.png")
    onnx_label = _label(run_cli("predict", str(export / "model.onnx"), str(image), "--json"))  # no code needed
    assert_clean_error(run_cli("predict", str(export / "model.safetensors"), str(image), env=env), named)
    eager = run_cli("predict", str(export / "model.safetensors"), str(image), "--json", "--model", USER_MODEL, env=env)
    assert _label(eager) == onnx_label


def test_a_format_the_model_cannot_be_exported_to_is_one_line_naming_it(tmp_path: Path,
                                                                         user_code: dict[str, str]) -> None:
    run, model = tmp_path / "run", "mymodels:moody"
    assert_ok(run_cli("train", "--model", model, *DATA, "--max-steps", "1", "--output-dir", str(run), env=user_code))
    proc = run_cli("export", "--run", str(run), "--out", str(tmp_path / "export"), "--model", model,
                   "--formats", "torchscript,pt2", env=user_code)
    assert_clean_error(proc, f"pt2: cannot be made from model '{model}' (", "leave it out with --formats")
    assert not (tmp_path / "export").exists()
    assert_ok(run_cli("export", "--run", str(run), "--out", str(tmp_path / "export"), "--model", model,
                      "--formats", "torchscript", env=user_code))
