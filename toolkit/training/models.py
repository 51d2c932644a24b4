"""Model registry: the built-in models by name, and the user's own as `package.module:factory`.

Every model maps N×3×32×32 float32 images, normalized as `toolkit.core.images` describes, to N×classes
logits. The built-ins:

- `tutorial` (default): the network of the PyTorch CIFAR-10 tutorial, exactly (62,006 parameters);
- `resnet18`: ResNet-18 built for 32×32 inputs, as CIFAR ResNets are: a 3×3 stem and no max-pool
  (11.2 M parameters);
- `speednet`: the architecture of airbench94 (Keller Jordan's CIFAR-10 speed runs): a 2×2 first
  convolution meant for patch whitening, with frozen weights; three groups of conv, max-pool, BatchNorm,
  GELU, conv, BatchNorm, GELU; BatchNorm scales frozen at 1 with fast-moving running statistics; a
  final max-pool and a linear head scaled by 1/9 (2.0 M parameters).

A user's model is a callable `factory(num_classes) -> nn.Module` named `package.module:factory`. Naming
it imports its module, which runs code: `build_model` does so only when asked to (`import_code`), that
is when the name comes from the user, never when it is read from a file alone.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core.errors import ConfigError, first_line

IMAGE_SHAPE = (3, 32, 32)  # what every model takes, per image
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class TutorialNet(nn.Module):
    """conv(3,6,5) pool conv(6,16,5) pool fc(400,120) fc(120,84) fc(84,10), ReLU: 62,006 parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and a shortcut (a 1×1 projection when the shape changes)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 images: 3×3 stem, stages of 2 blocks at 64, 128, 256, 512 channels (32, 16, 8, 4
    pixels), global average pool, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        stages, channels = [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [BasicBlock(channels, width, stride), BasicBlock(width, width, 1)]
            channels = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm with its scale fixed at 1 (only the bias trains) and running statistics that follow recent
    batches closely (PyTorch momentum 0.4: 40 % of each new batch's statistics)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class IdentityInitConv(nn.Conv2d):
    """3×3 'same' convolution without bias whose first `in_channels` filters start as the identity (Dirac):
    at initialization each group passes its input through, so a deep stack trains from the first step."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__(channels_in, channels_out, 3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            nn.init.dirac_(self.weight[:self.in_channels])


class ConvGroup(nn.Module):
    """conv, 2×2 max-pool, BatchNorm, GELU, conv, BatchNorm, GELU: halves the resolution."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.conv1 = IdentityInitConv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = FrozenScaleBatchNorm(channels_out)
        self.conv2 = IdentityInitConv(channels_out, channels_out)
        self.norm2 = FrozenScaleBatchNorm(channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.pool(self.conv1(x))))
        return F.gelu(self.norm2(self.conv2(x)))


class SpeedNet(nn.Module):
    """airbench94's network: whitening conv (2×2, 24 filters, frozen weights, trained bias), conv groups of
    64, 256 and 256 channels (31 -> 15 -> 7 -> 3 pixels), 3×3 max-pool, linear head without bias, × 1/9."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256)) -> None:
        super().__init__()
        kernel = 2
        # Twice the patch dimension (3 channels × 2 × 2): the whitening filters and their negatives.
        whiten_width = 2 * IMAGE_SHAPE[0] * kernel ** 2
        self.whiten = nn.Conv2d(IMAGE_SHAPE[0], whiten_width, kernel, bias=True)
        self.whiten.weight.requires_grad_(False)
        groups, channels = [], whiten_width
        for width in widths:
            groups.append(ConvGroup(channels, width))
            channels = width
        self.groups = nn.Sequential(*groups)
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(channels, num_classes, bias=False)
        self.logit_scale = 1 / 9  # keeps the first logits small: the head sees unnormalized max-pooled activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        return self.head(torch.flatten(self.pool(x), 1)) * self.logit_scale


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "tutorial": TutorialNet,
    "resnet18": ResNet18,
    "speednet": SpeedNet,
}


def is_user_model(name: str) -> bool:
    """Whether `name` names a user's factory (`package.module:factory`) rather than a built-in."""
    return ":" in name


def _import_factory(name: str) -> Callable[[int], nn.Module]:
    if not _FACTORY.match(name):
        raise ConfigError(f"--model {name}: not a factory reference; write package.module:function")
    module_name, attribute = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's module is reported as one line
        raise ConfigError(f"--model {name}: cannot import {module_name} ({first_line(exc)})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"--model {name}: {module_name} has no callable {attribute!r}")
    return factory


def build_model(name: str, num_classes: int = 10, *, import_code: bool = False) -> nn.Module:
    """A fresh model by registered name, or from the user's factory when `import_code` allows importing it;
    checked to map a batch of images to N×`num_classes` logits."""
    if name in MODELS:
        factory = MODELS[name]
    elif not is_user_model(name):
        raise ConfigError(f"--model: unknown model {name!r}; choose from {sorted(MODELS)}, or name your own as "
                          "package.module:factory")
    elif not import_code:
        raise ConfigError(f"model {name!r} is user code (package.module:factory), imported only when you name it: "
                          f"pass --model {name} if you trust it")
    else:
        factory = _import_factory(name)
    try:
        model = factory(num_classes)
    except Exception as exc:  # noqa: BLE001 - the user's factory failing is bad input, not a crash of ours
        raise ConfigError(f"--model {name}: the factory failed ({first_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {name}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    check_output(model, name, num_classes)
    return model


def check_output(model: nn.Module, name: str, num_classes: int) -> None:
    """Refuse a model whose output for a batch of 2 images is not 2×`num_classes` (one line naming both)."""
    was_training = model.training
    model.eval()  # no BatchNorm statistics change from this probe
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *IMAGE_SHAPE))
    except Exception as exc:  # noqa: BLE001 - a model that cannot take images is bad input
        raise ConfigError(f"--model {name}: fails on a 2×{'×'.join(map(str, IMAGE_SHAPE))} batch "
                          f"({first_line(exc)})") from None
    finally:
        model.train(was_training)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, num_classes):
        raise ConfigError(f"--model {name}: output {shape} for a batch of 2 images; expected (2, {num_classes}), "
                          "N × classes logits")


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The model's first 2-D convolution in module order, and its name; a `ConfigError` when it has none."""
    found = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None:
        raise ConfigError("--whiten-images: the model has no Conv2d layer to initialize")
    return found


@torch.no_grad()
def init_whitening(model: nn.Module, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set the first convolution's filters to whiten its input patches (airbench's data-dependent init).

    `images` are normalized N×3×H×W training images. Every kh×kw patch is a vector of d = channels·kh·kw values;
    the filters become the eigenvectors of the patches' d×d covariance scaled by 1/sqrt(eigenvalue + eps), largest
    first, so the layer's outputs are decorrelated with unit variance. A layer with 2d filters gets the d filters and
    their negatives (after a GELU or ReLU both signs of each component survive); with d or fewer, the leading ones.
    Its bias, if any, is left as initialized."""
    name, conv = first_conv(model)
    channels, kh, kw = conv.weight.shape[1:]
    d = channels * kh * kw
    if conv.groups != 1 or channels != images.shape[1] or conv.out_channels not in (*range(1, d + 1), 2 * d):
        raise ConfigError(f"--whiten-images: the first convolution ({name}: {conv.in_channels}->{conv.out_channels}, "
                          f"{kh}×{kw}, groups {conv.groups}) cannot hold a whitening of {images.shape[1]}-channel "
                          f"patches: it needs groups 1 and at most {d} or exactly {2 * d} filters")
    patches = images.double().unfold(2, kh, 1).unfold(3, kw, 1)  # N×C×H'×W'×kh×kw
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, d)  # one row per patch, in the weight's C,kh,kw order
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    order = eigenvalues.argsort(descending=True)
    filters = (eigenvectors[:, order] / torch.sqrt(eigenvalues[order] + eps)).T.reshape(d, channels, kh, kw)
    if conv.out_channels == 2 * d:
        filters = torch.cat([filters, -filters])
    conv.weight.copy_(filters[:conv.out_channels].to(conv.weight.dtype))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
