"""The head localiser's training augmentation: the same geometry for frame and mask, and with
`floor` a black surround lifted to grey speckle on about half the batch (the mask untouched)."""

from __future__ import annotations

import pytest
import torch

from models.head import HEAD_AUGMENTS, HEAD_FLOOR_LEVELS, head_augment


def _frames() -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.zeros(64, 1, 48, 48)
    mask = torch.zeros(64, 1, 48, 48)
    image[:, :, 12:36, 12:36] = 0.6                  # a head in a black surround
    mask[:, :, 12:36, 12:36] = 1.0
    return image, mask


def test_floor_lifts_the_surround_on_about_half_the_batch() -> None:
    image, mask = _frames()
    basic_img, basic_msk = head_augment(image, mask, torch.Generator().manual_seed(3), augment="basic")
    floor_img, floor_msk = head_augment(image, mask, torch.Generator().manual_seed(3), augment="floor")
    assert torch.equal(basic_msk, floor_msk)         # the floor never moves the target
    corner = (slice(None), 0, slice(0, 6), slice(0, 6))

    def level(x: torch.Tensor) -> torch.Tensor:
        return x[corner].mean(dim=(1, 2))

    assert float(level(basic_img).max()) < 0.01      # basic: black stays black
    lifted = level(floor_img) > 0.02
    assert 16 <= int(lifted.sum()) <= 48
    # lifted to at most the top level (times the gain, gamma and speckle that follow)
    assert float(level(floor_img).max()) <= HEAD_FLOOR_LEVELS[1] * 1.25 * 1.5


def test_unknown_augment_is_refused() -> None:
    image, mask = _frames()
    with pytest.raises(ValueError, match="head augment"):
        head_augment(image, mask, augment="scanner")


def test_params_accept_exactly_the_head_augments() -> None:
    from typing import get_args

    from pipelines.config import HeadAugment

    assert get_args(HeadAugment) == HEAD_AUGMENTS


def test_fan_lifts_only_inside_a_probe_fan() -> None:
    """`fan`: the floor is raised below the apex (top centre) on about half the batch, while the
    top corners, outside any fan of half-angle <= 50 degrees, stay black."""
    image, mask = _frames()
    out, _ = head_augment(image, mask, torch.Generator().manual_seed(3), augment="fan")
    top_corners = torch.cat([out[:, 0, :4, :4], out[:, 0, :4, -4:]], dim=2).amax(dim=(1, 2))
    assert float(top_corners.max()) < 0.01
    below_apex = out[:, 0, 5:10, 22:26].mean(dim=(1, 2))      # under the apex, above the head
    lifted = below_apex > 0.02
    assert 16 <= int(lifted.sum()) <= 48
