"""Test-time augmentation views, shared by evaluation (torch) and export verification (numpy)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toolkit.core.errors import DataError
from toolkit.core.images import TTA_VIEWS, tta_logits


def _views(images, level):
    """Every view `tta_logits` classifies, in order, with its weight."""
    seen = []
    tta_logits(lambda view: seen.append(view) or view[:, :1, 0, 0] * 0, images, level)
    return seen


def test_flip_translate_views_are_mirrors_and_reflect_padded_one_pixel_shifts():
    images = torch.randn(2, 3, 32, 32)
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[:, :, 0:32, 0:32], padded[:, :, 2:34, 2:34]
    expected = [images, images.flip(-1), up_left, up_left.flip(-1), down_right, down_right.flip(-1)]
    views = _views(images, "flip-translate")
    assert len(views) == len(expected)
    assert all(torch.equal(v, e) for v, e in zip(views, expected))


@pytest.mark.parametrize("level", list(TTA_VIEWS))
def test_weights_sum_to_one_and_numpy_and_torch_see_the_same_views(level):
    assert sum(view[-1] for view in TTA_VIEWS[level]) == pytest.approx(1.0)
    images = torch.randn(3, 3, 32, 32)
    # A position-sensitive "model": any view mix-up changes its output.
    weights = torch.randn(3 * 32 * 32, 4)

    def linear(x):
        return (torch.as_tensor(x).reshape(len(x), -1) @ weights).numpy() if isinstance(x, np.ndarray) \
            else x.reshape(len(x), -1) @ weights

    with_torch = tta_logits(linear, images, level)
    with_numpy = tta_logits(linear, images.numpy(), level)
    np.testing.assert_allclose(with_numpy, with_torch.numpy(), rtol=1e-5, atol=1e-4)
    if level == "none":
        assert torch.equal(with_torch, linear(images))
    else:
        assert not torch.allclose(with_torch, linear(images))


def test_an_unknown_level_is_refused():
    with pytest.raises(DataError, match="--tta: unknown level 'mirror'"):
        tta_logits(lambda x: x, np.zeros((1, 3, 32, 32), np.float32), "mirror")
