"""The training-only random transforms: masks move with the image; intensity changes stay in range."""

import pytest
import torch

from models.augment import _random_curve, random_affine, random_intensity


def _batch(b: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 1, 64, 64, generator=g)
    x[:, :, :8] = 0.0                                   # black outside the sector
    return x


def test_affine_moves_masks_with_the_image():
    img = torch.zeros(4, 1, 32, 32)
    img[:, :, 10:20, 12:18] = 1.0
    masks = (img > 0.5).long()
    out, m = random_affine(img, masks, torch.Generator().manual_seed(1))
    assert m.dtype == masks.dtype and set(m.unique().tolist()) <= {0, 1}
    agree = ((out > 0.5).long() == m).float().mean()
    assert agree > 0.97                                  # same warp for both (interpolation aside)


@pytest.mark.parametrize("augment", ["basic", "scanner"])
def test_intensity_is_in_range_and_seeded(augment):
    x = _batch()
    a = random_intensity(x, torch.Generator().manual_seed(3), augment)
    b = random_intensity(x, torch.Generator().manual_seed(3), augment)
    c = random_intensity(x, torch.Generator().manual_seed(4), augment)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.5


def test_scanner_curve_is_monotonic_keeps_black_and_bends():
    v = torch.linspace(0, 1.5, 301).view(1, 1, 1, 301).expand(32, 1, 1, 301).contiguous()
    m = _random_curve(v, torch.Generator().manual_seed(5))
    assert bool((m.diff(dim=-1) >= -1e-6).all())        # order of grey levels kept
    assert torch.allclose(m[..., 0], torch.zeros(32, 1, 1)) and torch.allclose(m[..., 200], torch.ones(32, 1, 1))
    assert torch.equal(m[..., 201:], v[..., 201:])      # above the 99th percentile: unchanged
    assert float((m - v).abs().amax(dim=(1, 2, 3)).max()) > 0.05   # it does bend the curve


def test_scanner_differs_from_basic_and_unknown_is_refused():
    x = _batch()
    assert not torch.equal(random_intensity(x, torch.Generator().manual_seed(3), "basic"),
                           random_intensity(x, torch.Generator().manual_seed(3), "scanner"))
    with pytest.raises(ValueError, match="choose among basic, scanner"):
        random_intensity(x, augment="strong")


def test_config_accepts_exactly_the_augmentations_there_are():
    """pipelines.config keeps its own copy (it must not import torch): the two agree."""
    from models.augment import AUGMENTS
    from pipelines.config import AUGMENTS as CHECKED

    assert CHECKED == AUGMENTS
