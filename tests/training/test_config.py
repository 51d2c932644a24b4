import argparse

import pytest

from toolkit.apps.cli import build_parser
from toolkit.training.config import RECIPES, TrainConfig, build_train_config, leaf_fields, train_config_from_dict
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
])
def test_invalid_values_name_the_flag(values, flag):
    with pytest.raises(ConfigError, match=flag):
        build_train_config(values)


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
