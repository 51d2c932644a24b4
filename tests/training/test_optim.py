"""Parameter groups, Muon, the LR schedule's shape and Lookahead weights."""

import dataclasses

import pytest
import torch
from torch import nn

from toolkit.training.config import OptimConfig
from toolkit.training.models import SpeedNet
from toolkit.training.optim import Lookahead, LRSchedule, build_optimizer, orthogonalize, param_groups


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


def _muon_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 3))


def _grads(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(16, 3, 8, 8, generator=generator)).square().mean()
    model.zero_grad()
    loss.backward()


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (256, 2304)])
def test_orthogonalize_keeps_the_singular_vectors_and_moves_the_singular_values_near_one(shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 5, shape[1])
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    rotated = u.T @ orthogonalize(matrix).float() @ vh.T  # diagonal when the singular vectors are kept
    values = rotated.diagonal()
    assert values.min() > 0.3 and values.max() < 1.5  # a spread of 10× (and more) narrowed to under 5×
    off = rotated - torch.diag(values)
    assert off.abs().max() < 0.1 * values.abs().max()


def test_muon_groups_the_convolution_filters_apart_and_leaves_the_rest_to_sgd():
    model = SpeedNet()
    groups = param_groups(model, OptimConfig(optimizer="muon", lr=0.5, norm_lr_scale=64.0, muon_lr=0.2,
                                             weight_decay=0.01, decoupled_weight_decay=True))
    rest, norm, filters = groups
    convs = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad}
    assert {id(p) for p in filters["params"]} == convs and filters["orthogonalize"]
    assert filters["lr"] == 0.2 and filters["weight_decay"] == 0.0
    assert id(model.head.weight) in {id(p) for p in rest["params"]} and rest["lr"] == 0.5 and norm["lr"] == 32.0
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each exactly once


def test_muon_steps_the_other_groups_exactly_as_sgd():
    cfg = OptimConfig(optimizer="muon", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ours, reference = _muon_net(), _muon_net()
    reference.load_state_dict(ours.state_dict())
    optimizer = build_optimizer(ours, cfg)
    sgd = build_optimizer(reference, dataclasses.replace(cfg, optimizer="sgd"))
    _grads(ours), _grads(reference)  # one step: after it the filters differ, and so do the next gradients
    optimizer.step(), sgd.step()
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        if a.dim() < 4:
            assert torch.equal(a, b), name
    assert not torch.equal(ours[0].weight, reference[0].weight)  # the filters took Muon's step instead


def test_a_muon_step_is_the_same_whatever_the_filters_scale():
    """A filter bank followed by BatchNorm computes the same function at any scale; Muon's step (its norm held at
    √out, its update orthogonalized) must not depend on the scale either. (One step: the momentum buffer holds raw
    gradients, which do scale.)"""
    cfg = OptimConfig(optimizer="muon", muon_lr=0.1, muon_momentum=0.6, nesterov=True)
    small, large = _muon_net(), _muon_net()
    large.load_state_dict(small.state_dict())
    with torch.no_grad():
        large[0].weight.mul_(7.0)
    optimizers = [build_optimizer(m, cfg) for m in (small, large)]
    for model, optimizer in zip((small, large), optimizers):
        _grads(model)
        optimizer.step()
    torch.testing.assert_close(small[0].weight, large[0].weight, rtol=2e-2, atol=2e-3)
    assert float(small[0].weight.detach().norm()) == pytest.approx(8 ** 0.5, rel=0.1)  # near √out


def test_muon_skips_the_whole_step_on_the_device_when_told_found_inf():
    model = _muon_net()
    optimizer = build_optimizer(model, OptimConfig(optimizer="muon", lr=0.1, momentum=0.9))
    _grads(model)
    optimizer.step()
    before = ([p.detach().clone() for p in model.parameters()],
              [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()])
    _grads(model, seed=1)
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
    assert all(torch.equal(a, optimizer.state[p]["momentum_buffer"]) for a, p in zip(before[1], model.parameters()))
