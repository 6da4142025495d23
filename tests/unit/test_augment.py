"""The training-only random transforms: masks move with the image; intensity changes stay in range."""

import pytest
import torch

from models.augment import _noise_floor, _random_curve, random_affine, random_intensity


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


@pytest.mark.parametrize("augment", ["basic", "scanner", "floor"])
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


def test_noise_floor_lifts_black_to_textured_grey_on_half_the_batch():
    """`floor`: fluid that the training scanners show black (0) becomes speckled grey at the
    drawn level on about half the samples; the others pass unchanged; the order of the grey
    levels is kept on average (an affine lift plus texture)."""
    x = torch.zeros(64, 1, 32, 32)
    x[:, :, 16:] = 0.6                                   # tissue below, fluid (black) above
    out = _noise_floor(x, torch.Generator().manual_seed(7))
    lifted = out[:, :, :16].mean(dim=(1, 2, 3)) > 0.01
    assert 16 <= int(lifted.sum()) <= 48                 # about half the batch
    assert torch.equal(out[~lifted], x[~lifted])
    fluid, tissue = out[lifted][:, :, :16], out[lifted][:, :, 16:]
    assert 0.05 <= float(fluid.mean(dim=(1, 2, 3)).min()) and float(fluid.mean(dim=(1, 2, 3)).max()) <= 0.36
    assert float(fluid.std(dim=(2, 3)).min()) > 0.01     # textured, not a flat grey
    assert bool((tissue.mean(dim=(1, 2, 3)) > fluid.mean(dim=(1, 2, 3))).all())
