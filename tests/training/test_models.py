import sys
import textwrap

import pytest
import torch
from torch import nn

from toolkit.core.errors import ConfigError
from toolkit.training.models import MODELS, ResNet18, SpeedNet, TutorialNet, build_model, count_parameters, init_whitening


def test_tutorial_net_matches_the_tutorial():
    net = TutorialNet()
    assert count_parameters(net) == 62_006
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(6, 3, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, 400), (120,), (84, 120), (84,), (10, 84), (10,)]
    assert net(torch.zeros(7, 3, 32, 32)).shape == (7, 10)


@pytest.mark.parametrize("name, cls, parameters", [("tutorial", TutorialNet, 62_006), ("resnet18", ResNet18, 11_173_962),
                                                   ("speednet", SpeedNet, 1_972_792)])
def test_every_builtin_maps_images_to_class_logits(name, cls, parameters):
    model = build_model(name, 7)
    assert isinstance(model, cls) and count_parameters(model) == parameters - (10 - 7) * _head_inputs(model)
    assert model.training  # the shape probe leaves the model as it found it
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 7)


def _head_inputs(model) -> int:
    """Parameters per class of the model's last layer (weights and bias)."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.in_features + (last.bias is not None)


def test_the_resnet_is_the_cifar_variant():
    net = ResNet18()
    assert tuple(net.stem[0].weight.shape) == (64, 3, 3, 3)  # 3×3 stem, stride 1
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())


def test_the_speed_net_freezes_its_whitening_weights_and_batchnorm_scales_and_starts_groups_as_identity():
    net = SpeedNet()
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    assert "whiten.weight" in frozen and "whiten.bias" not in frozen
    assert all(name.endswith("weight") and ".norm" in name for name in frozen - {"whiten.weight"})
    conv = net.groups[1].conv2  # 256 -> 256: every filter starts as the identity
    x = torch.randn(1, 256, 7, 7)
    assert torch.allclose(conv(x), x)
    assert sum(p.numel() for p in net.parameters()) == 1_972_792


def test_the_shape_probe_changes_no_batchnorm_statistics():
    model = build_model("resnet18")
    assert float(model.stem[1].running_mean.abs().sum()) == 0.0 and int(model.stem[1].num_batches_tracked) == 0


def test_an_unknown_name_is_refused_naming_the_choices():
    assert set(MODELS) == {"tutorial", "resnet18", "speednet"}
    with pytest.raises(ConfigError, match=r"--model: unknown model 'resnet'; choose from \['resnet18', 'speednet', "
                                          r"'tutorial'\], or name your own as package.module:factory"):
        build_model("resnet")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module `mymodels` on sys.path with a good factory and bad ones; removed from sys.modules afterwards."""
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        from torch import nn

        def make(num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))

        def not_a_module(num_classes):
            return "a string"

        def wrong_shape(num_classes):
            return nn.Flatten()

        def broken(num_classes):
            raise RuntimeError("out of ideas")

        VALUE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mymodels"
    sys.modules.pop("mymodels", None)


def test_a_user_factory_builds_when_the_user_names_it(user_module):
    model = build_model("mymodels:make", 4, import_code=True)
    assert model(torch.zeros(5, 3, 32, 32)).shape == (5, 4)


def test_a_user_factory_named_by_a_file_is_not_imported(user_module):
    with pytest.raises(ConfigError, match=r"model 'mymodels:make' is user code .* pass --model mymodels:make"):
        build_model("mymodels:make", 4)
    assert "mymodels" not in sys.modules


@pytest.mark.parametrize("name, message", [
    ("no_such_module_here:make", "--model no_such_module_here:make: cannot import no_such_module_here "
                                 "(ModuleNotFoundError: No module named 'no_such_module_here')"),
    ("mymodels:absent", "--model mymodels:absent: mymodels has no callable 'absent'"),
    ("mymodels:VALUE", "--model mymodels:VALUE: mymodels has no callable 'VALUE'"),
    ("mymodels:not_a_module", "--model mymodels:not_a_module: the factory returned str, not a torch.nn.Module"),
    ("mymodels:wrong_shape", "--model mymodels:wrong_shape: output (2, 3072) for a batch of 2 images; expected (2, 10)"),
    ("mymodels:broken", "--model mymodels:broken: the factory failed (RuntimeError: out of ideas)"),
    ("my models:make", "--model my models:make: not a factory reference; write package.module:function"),
])
def test_a_bad_user_factory_is_one_line_naming_the_problem(user_module, name, message):
    with pytest.raises(ConfigError) as caught:
        build_model(name, 10, import_code=True)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def _correlated_images(n: int = 64) -> torch.Tensor:
    """Images whose channels and neighbouring pixels are strongly correlated, as photographs are."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, 1, 33, 33, generator=g)
    smooth = (base[:, :, :-1, :-1] + base[:, :, 1:, 1:]) / 2
    return smooth * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 0.1 * torch.randn(n, 3, 32, 32, generator=g)


def test_whitening_init_decorrelates_the_first_layers_outputs():
    model, images = SpeedNet(), _correlated_images()
    init_whitening(model, images, eps=1e-12)  # the default 5e-4 damps the faintest components on purpose
    out = nn.functional.conv2d(images.double(), model.whiten.weight.double())
    first, second = out[:, :12], out[:, 12:]
    flat = first.permute(1, 0, 2, 3).reshape(12, -1)
    covariance = flat @ flat.T / flat.shape[1]
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.float64), atol=2e-3, rtol=0)
    assert torch.equal(second, -first)  # the negatives: both signs survive the GELU
    assert not model.whiten.weight.requires_grad  # still frozen


def test_whitening_fills_a_layer_with_fewer_filters_with_the_leading_components():
    model = TutorialNet()  # conv1: 6 filters of 3×5×5 = 75 values
    init_whitening(model, _correlated_images())
    assert model.conv1.weight.shape == (6, 3, 5, 5) and torch.isfinite(model.conv1.weight).all()


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), "the model has no Conv2d layer"),
    (nn.Sequential(nn.Conv2d(3, 13, 2)), r"first convolution \(0: 3->13, 2×2, groups 1\) cannot hold"),
])
def test_whitening_refuses_a_model_whose_first_layer_cannot_hold_it(model, message):
    with pytest.raises(ConfigError, match=message):
        init_whitening(model, _correlated_images(4))
