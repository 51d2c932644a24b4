import argparse
import json

import pytest

from tests.helpers import assert_clean_error, cli
from toolkit.apps.cli import build_parser
from toolkit.training.config import (RECIPES, RESUME_LENGTH, RESUME_MAY_CHANGE, TrainConfig, build_train_config,
                                     leaf_fields, read_config_file, resume_differences, train_config_from_dict)
from toolkit.core.errors import ConfigError


def test_seed_recipe_is_the_tutorial():
    cfg = build_train_config({"recipe": "seed"})
    assert (cfg.batch_size, cfg.optim.lr, cfg.optim.momentum, cfg.epochs) == (4, 0.001, 0.9, 2)
    assert not cfg.data.augment and cfg.optim.schedule == "none" and not cfg.optim.nesterov
    assert cfg.optim.weight_decay == 0 and cfg.optim.label_smoothing == 0


def test_flags_override_recipe_values():
    fast = build_train_config({})
    assert fast.recipe == "fast" and fast.batch_size == RECIPES["fast"]["batch_size"]
    cfg = build_train_config({"recipe": "fast", "batch_size": 7, "augment": False})
    assert cfg.batch_size == 7 and not cfg.data.augment
    assert cfg.optim.schedule == RECIPES["fast"]["schedule"]


@pytest.mark.parametrize("values, flag", [
    ({"lr": 0}, "--lr"),
    ({"batch_size": 0}, "--batch-size"),
    ({"val_fraction": 1.0}, "--val-fraction"),
    ({"momentum": 1.5}, "--momentum"),
    ({"schedule": "step"}, "--schedule"),
    ({"mixed_precision": "fp8"}, "--mixed-precision"),
    ({"epochs": 0}, "--epochs"),
    ({"keep_checkpoints": 0}, "--keep-checkpoints"),
    ({"recipe": "slow"}, "--recipe"),
    ({"data": "mnist"}, "--data"),
    ({"crop_padding": 17}, "--crop-padding"),
    ({"lr_end": 1.5}, "--lr-end"),
    ({"lr_start": -0.1}, "--lr-start"),
    ({"norm_lr_scale": 0}, "--norm-lr-scale"),
    ({"lookahead_every": -1}, "--lookahead-every"),
    ({"lookahead_decay": 1.0}, "--lookahead-decay"),
    ({"whiten_images": -5}, "--whiten-images"),
    ({"tta": "mirror"}, "--tta"),
    ({"mixed_precision": "auto8"}, "--mixed-precision"),
])
def test_invalid_values_name_the_flag(values, flag):
    with pytest.raises(ConfigError, match=flag):
        build_train_config(values)


def test_the_speednet_recipe_is_airbench94s_in_this_trainers_terms():
    cfg = build_train_config({"recipe": "speednet"})
    assert (cfg.model, cfg.batch_size, cfg.tta, cfg.channels_last, cfg.mixed_precision) == \
        ("speednet", 1024, "flip-translate", True, "auto")
    optim = cfg.optim
    # airbench: lr 11.5 per 1024 summed images over 1 + 1/(1 - momentum) steps of momentum; we average the loss.
    assert optim.lr == pytest.approx(11.5 / (1 + 1 / (1 - optim.momentum)), rel=1e-3)
    assert optim.weight_decay == pytest.approx(0.0153 * 1024 / (1024 * (1 + 1 / (1 - 0.85))), rel=3e-3)
    assert (optim.decoupled_weight_decay, optim.norm_lr_scale, optim.lookahead_every) == (True, 64.0, 5)


def test_config_round_trips_through_json_dict():
    cfg = build_train_config({"recipe": "seed", "lr": 0.02, "data": "synthetic", "augment": True})
    assert train_config_from_dict(cfg.to_dict()) == cfg


def test_every_config_field_is_a_train_flag():
    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    flags = {opt for action in train._actions for opt in action.option_strings}
    for _, f in leaf_fields():
        assert "--" + f.name.replace("_", "-") in flags
        assert f.metadata.get("help"), f"{f.name} has no help text"
    args = parser.parse_args(["train", "--lr", "0.5", "--no-augment", "--data", "synthetic"])
    assert (args.lr, args.augment, args.data) == (0.5, False, "synthetic")
    assert not hasattr(args, "batch_size")  # not given: left to the recipe
    assert isinstance(TrainConfig(), TrainConfig)


def test_resume_checks_every_field_that_changes_what_the_steps_mean():
    """The fields a resumed run must share with its checkpoint: every field not listed as free to change. A new
    field is checked until it is listed in RESUME_MAY_CHANGE."""
    names = [f.name for _, f in leaf_fields()]
    assert set(RESUME_MAY_CHANGE) | set(RESUME_LENGTH) <= set(names)
    flat = build_train_config({}).flat()
    checked = {n for n in names if resume_differences(flat, {**flat, n: "changed"})}
    assert checked == {"model", "batch_size", "mixed_precision", "whiten_images", "seed", "data", "data_dir",
                       "val_fraction", "augment", "crop_padding", "synthetic_train_size", "synthetic_test_size",
                       "optimizer", "muon_lr", "muon_momentum", "lr", "momentum", "nesterov", "weight_decay",
                       "decoupled_weight_decay", "norm_lr_scale", "schedule",
                       "warmup_fraction", "lr_start", "lr_end", "lookahead_every", "lookahead_decay",
                       "label_smoothing", "grad_accum_steps"}
    assert checked.isdisjoint(RESUME_MAY_CHANGE + RESUME_LENGTH)
    # One entry per differing field, in declaration order, as the flags are written; the length is not one.
    changed = {**flat, "batch_size": 64, "augment": False, "mixed_precision": None, "epochs": 9}
    assert resume_differences({**flat, "mixed_precision": "bf16"}, changed) == [
        "--batch-size 64 (checkpoint: 128)", "--mixed-precision unset (checkpoint: bf16)",
        "--no-augment (checkpoint: --augment)"]


def test_config_file_precedence_is_default_recipe_file_flag(tmp_path):
    """Flat or grouped keys; the file's recipe supplies what the file does not say; flags win over the file."""
    path = tmp_path / "exp.yaml"
    path.write_text("recipe: fast\nlr: 1e-3\nbatch_size: 64\noptim:\n  momentum: 0.8\ndata: synthetic\n")
    values = read_config_file(path)
    assert values == {"recipe": "fast", "lr": 0.001, "batch_size": 64, "momentum": 0.8, "data": "synthetic"}
    cfg = build_train_config(values, {"batch_size": 32})
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.batch_size, cfg.data.data) == (0.001, 0.8, 32, "synthetic")
    assert cfg.epochs == RECIPES["fast"]["epochs"] and cfg.optim.weight_decay == RECIPES["fast"]["weight_decay"]
    assert build_train_config(values, {"recipe": "seed"}).optim.weight_decay == 0.0  # flag recipe, file values


def test_a_runs_config_json_is_accepted_as_it_is(tmp_path):
    """`runtime` is what the run had, and `resume`/`overwrite` act on one folder: all three are ignored."""
    cfg = build_train_config({"recipe": "seed", "lr": 5e-05, "data": "synthetic", "mixed_precision": "bf16",
                              "output_dir": "runs/x", "resume": "latest"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg.to_dict(), "overwrite": True, "runtime": {"num_processes": 2}}))
    repeated = build_train_config(read_config_file(path), {"output_dir": "runs/y"})
    assert repeated == build_train_config({**cfg.flat(), "resume": None, "output_dir": "runs/y"})


@pytest.mark.parametrize("text, fragments", [
    ("lrr: 0.1\n", ["unknown key 'lrr'"]),
    ("optim:\n  batch_size: 4\n", ["unknown key 'optim.batch_size'"]),
    ("optim: 0.1\n", ["key 'optim' must be a mapping"]),
    ("batch_size: many\n", ["key 'batch_size' must be int", "'many'"]),
    ("augment: 1\n", ["key 'augment' must be bool"]),
    ("epochs: 2.5\n", ["key 'epochs' must be int"]),
    ("lr: [0.1]\n", ["key 'lr' must be float"]),
    ("[1, 2]\n", ["expected a mapping of config keys, got list"]),
    ("lr: [0.1\n", ["not valid YAML"]),
])
def test_bad_config_files_name_the_key(tmp_path, capsys, text, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert_clean_error(cli(capsys, "train", "--config", path), f"--config {path}", *fragments)


def test_missing_or_malformed_json_config_files_are_one_line_errors(tmp_path, capsys):
    assert_clean_error(cli(capsys, "train", "--config", tmp_path / "nope.yaml"), "nope.yaml: cannot read")
    (tmp_path / "c.json").write_text("{'lr': 0.1}")
    assert_clean_error(cli(capsys, "run", "--config", tmp_path / "c.json"), "c.json: not valid JSON")
    (tmp_path / "c.json").write_text('{"lr": -1}')
    assert_clean_error(cli(capsys, "train", "--config", tmp_path / "c.json"), "--lr: must be > 0")
