import pytest
import torch

from toolkit.core.errors import ConfigError
from toolkit.training.models import MODELS, TutorialNet, build_model, count_parameters


def test_tutorial_net_matches_the_tutorial():
    net = TutorialNet()
    assert count_parameters(net) == 62_006
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(6, 3, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, 400), (120,), (84, 120), (84,), (10, 84), (10,)]
    assert net(torch.zeros(7, 3, 32, 32)).shape == (7, 10)


def test_registry_builds_by_name_and_rejects_unknown():
    assert "tutorial" in MODELS
    assert isinstance(build_model("tutorial", 10), TutorialNet)
    assert build_model("tutorial", 3)(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ConfigError, match="--model: unknown model 'resnet'"):
        build_model("resnet")
