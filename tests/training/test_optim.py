"""Parameter groups, the LR schedule's shape and Lookahead weights."""

import pytest
import torch
from torch import nn

from toolkit.training.config import OptimConfig
from toolkit.training.models import SpeedNet
from toolkit.training.optim import Lookahead, LRSchedule, build_optimizer, param_groups


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))


def test_normalization_parameters_get_their_own_lr_and_frozen_ones_none():
    model = SpeedNet()
    groups = param_groups(model, OptimConfig(lr=0.5, norm_lr_scale=64.0))
    rest, norm = groups  # the base group first: its LR is the one logged
    assert norm["lr"] == 32.0 and rest["lr"] == 0.5
    # Only the BatchNorm biases train (their scales are frozen), and the frozen whitening weights are in no group.
    biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in norm["params"]} == biases
    grouped = {id(p) for g in groups for p in g["params"]}
    assert id(model.whiten.weight) not in grouped and id(model.whiten.bias) in grouped
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


def test_decoupled_weight_decay_shrinks_every_group_by_the_same_fraction_per_step():
    model = _net()
    cfg = OptimConfig(lr=0.2, momentum=0.0, weight_decay=0.01, decoupled_weight_decay=True, norm_lr_scale=10.0)
    optimizer = build_optimizer(model, cfg)
    before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # decay alone
    optimizer.step()
    after = [p for g in optimizer.param_groups for p in g["params"]]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b * (1 - 0.01))
    coupled = param_groups(model, OptimConfig(lr=0.2, weight_decay=0.01, norm_lr_scale=10.0))
    assert [g["weight_decay"] for g in coupled] == [0.01, 0.01]  # L2: the decay then scales with each group's LR


def test_the_schedule_runs_from_lr_start_through_the_peak_to_lr_end():
    schedule = LRSchedule("onecycle", 100, 0.25, start=0.2, end=0.07)
    assert schedule(0) == pytest.approx(0.2) and schedule(25) == pytest.approx(1.0)
    assert schedule(100) == pytest.approx(0.07) and schedule(62) == pytest.approx(0.07 + 0.93 * (1 - 37 / 75))
    cosine = LRSchedule("cosine", 100, 0.0, end=0.1)
    assert cosine(0) == pytest.approx(1.0) and cosine(50) == pytest.approx(0.55) and cosine(100) == pytest.approx(0.1)


def test_lookahead_pulls_the_weights_to_a_ramped_average_and_ends_on_it():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    lookahead = Lookahead(model, every=2, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)  # the optimizer moved the weights
    lookahead.step(1, 4)  # not a blend step: nothing happens
    assert torch.equal(model.weight, torch.ones(1, 2))
    lookahead.step(2, 4)  # keeps 0.9² · (2/4)³ of the copy
    kept = 0.81 * 0.125
    torch.testing.assert_close(model.weight, torch.full((1, 2), 1 - kept))
    torch.testing.assert_close(lookahead.state_dict()["weight"], model.weight)
    with torch.no_grad():
        model.weight.fill_(5.0)
    lookahead.step(3, 4)
    lookahead.step(4, 4)  # the last step: blend (keeping 0.81 of the copy), and the weights end on the copy
    expected = 0.81 * (1 - kept) + 0.19 * 5.0
    torch.testing.assert_close(model.weight, torch.full((1, 2), expected))


def test_lookahead_state_round_trips_and_refuses_another_models():
    model = _net()
    lookahead = Lookahead(model, every=5, decay=0.95)
    other = Lookahead(_net(), every=5, decay=0.95)
    other.load_state_dict(lookahead.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.copy, lookahead.copy))
    assert "1.running_mean" in lookahead.state_dict()  # BatchNorm statistics are averaged too
    with pytest.raises(ValueError, match="Lookahead copy holds"):
        Lookahead(nn.Linear(2, 2), 5, 0.95).load_state_dict(lookahead.state_dict())
