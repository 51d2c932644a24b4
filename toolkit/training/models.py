"""Model registry. `TutorialNet` is exactly the network of the PyTorch CIFAR-10 tutorial.

Adding a model is one entry in `MODELS`: a name mapped to a constructor taking `num_classes`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core.errors import ConfigError


class TutorialNet(nn.Module):
    """conv(3,6,5) pool conv(6,16,5) pool fc(400,120) fc(120,84) fc(84,10), ReLU: 62,006 parameters.

    Input: N×3×32×32 float32 normalized to [-1, 1]. Output: N×num_classes logits.
    """

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


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "tutorial": TutorialNet,
}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Instantiate a registered model by name."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ConfigError(f"--model: unknown model {name!r}; choose from {sorted(MODELS)}") from None
    return factory(num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
