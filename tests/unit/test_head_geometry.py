"""Geometry of the learned head localiser: square padding, ellipse from a mask or a low-res
probability map (isotropic and anisotropic spacing), Ramanujan's HC, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.biometry import ellipse_perimeter
from pipelines.imaging.head import (
    HeadLocaliser,
    HeadQuality,
    SquareMap,
    crop_square,
    ellipse_from_mask,
    hc_mm,
    judge,
    to_square,
)

SHAPE = (540, 800)


def _inside(x_px: np.ndarray, y_px: np.ndarray, ell: tuple, spacing: tuple[float, float]) -> np.ndarray:
    cx, cy, a, b, ang = ell
    sr, sc = spacing
    dx, dy = x_px * sc - cx, y_px * sr - cy
    u = dx * math.cos(ang) + dy * math.sin(ang)
    v = -dx * math.sin(ang) + dy * math.cos(ang)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def source_mask(ell: tuple, spacing: tuple[float, float]) -> np.ndarray:
    ys, xs = np.mgrid[0:SHAPE[0], 0:SHAPE[1]].astype(np.float64)
    return _inside(xs, ys, ell, spacing).astype(np.float32)


def grid_prob(ell: tuple, spacing: tuple[float, float], size: int) -> tuple[np.ndarray, SquareMap]:
    """The ellipse's area fraction per grid pixel (4x4 supersampled): a perfect soft prediction."""
    _, sq = to_square(np.zeros(SHAPE, np.float32), size)
    sub = (np.arange(4) + 0.5) / 4 - 0.5
    acc = np.zeros((size, size))
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    for dv in sub:
        for du in sub:
            x, y = sq.grid_to_source(u + du, v + dv)
            acc += _inside(x, y, ell, spacing)
    return (acc / 16).astype(np.float32), sq


CASES = [  # (cx, cy, a, b, angle) mm, spacing (row, col) mm
    ((40.0, 27.0, 30.0, 22.0, 0.3), (0.1, 0.1)),
    ((35.0, 30.0, 18.0, 14.0, -1.1), (0.12, 0.12)),
    ((50.0, 40.0, 40.0, 33.0, 1.4), (0.15, 0.1)),
    ((30.0, 20.0, 25.0, 15.0, 0.7), (0.08, 0.06)),
    ((60.0, 40.0, 45.0, 36.0, -0.4), (0.15, 0.15)),
]


def _check(e, ell: tuple) -> None:
    cx, cy, a, b, ang = ell
    assert e is not None
    assert abs(hc_mm(e.a, e.b) - hc_mm(a, b)) / hc_mm(a, b) < 0.005
    assert abs(e.a - a) / a < 0.01 and abs(e.b - b) / b < 0.01
    assert math.hypot(e.cx - cx, e.cy - cy) < 0.01 * a
    d = (e.angle - ang) % math.pi
    assert min(d, math.pi - d) < math.radians(2.0)
    assert -math.pi / 2 < e.angle <= math.pi / 2
    assert e.iou > 0.95 and e.inside > 0.95


# moments need the whole ellipse in the frame; cases 2 and 3 are cut by the image's edge
METHOD_CASES = ([("contour", c) for c in CASES] + [("robust", c) for c in CASES]
                + [("moments", CASES[i]) for i in (0, 1, 4)])


@pytest.mark.parametrize(("method", "case"), METHOD_CASES)
def test_ellipse_from_source_mask(method, case) -> None:
    ell, spacing = case
    _check(ellipse_from_mask(source_mask(ell, spacing), spacing, method=method), ell)


@pytest.mark.parametrize("size", [128, 160])
@pytest.mark.parametrize(("method", "case"), METHOD_CASES)
def test_ellipse_from_low_res_probability(method, case, size) -> None:
    ell, spacing = case
    prob, sq = grid_prob(ell, spacing, size)
    _check(ellipse_from_mask(prob, spacing, sq, method=method), ell)


def test_robust_fit_ignores_a_leak_past_the_skull() -> None:
    """A prediction that spills past a faint stretch of skull: the plain contour and moments
    fits grow with the spill, the trimmed fit keeps the head's own outline (HC within 0.5 %)."""
    ell, spacing = CASES[0]
    leaky = np.maximum(source_mask(ell, spacing), source_mask((68.0, 33.0, 9.0, 6.0, 0.0), spacing))
    true = hc_mm(ell[2], ell[3])
    errors = {m: abs(hc_mm((e := ellipse_from_mask(leaky, spacing, method=m)).a, e.b) - true) / true
              for m in ("contour", "moments", "robust")}
    assert errors["robust"] < 0.005
    assert errors["contour"] > 0.02 and errors["moments"] > 0.02


def test_judge_accepts_a_head_and_maps_to_skull() -> None:
    ell, spacing = CASES[0]
    prob, sq = grid_prob(ell, spacing, 128)
    fit = judge(ellipse_from_mask(prob, spacing, sq), HeadQuality())
    assert fit.found and fit.reason == "" and fit.skull is not None
    assert fit.skull.a >= fit.skull.b
    assert abs(fit.hc_mm - hc_mm(ell[2], ell[3])) / hc_mm(ell[2], ell[3]) < 0.005


def test_square_mapping_round_trip() -> None:
    grey = np.zeros(SHAPE, np.float32)
    grey[100:110, 700:710] = 1.0
    sq_img, sq = to_square(grey, 160)
    assert sq_img.shape == (160, 160) and sq.side == 800 and sq.top == 130 and sq.left == 0
    v, u = np.unravel_index(np.argmax(sq_img), sq_img.shape)
    x, y = sq.grid_to_source(np.array(float(u)), np.array(float(v)))
    assert abs(x - 704.5) < 5 and abs(y - 104.5) < 5


def test_hc_is_ramanujan() -> None:
    assert hc_mm(10.0, 10.0) == pytest.approx(2 * math.pi * 10.0)
    assert hc_mm(40.0, 30.0) == pytest.approx(ellipse_perimeter(40.0, 30.0), rel=1e-4)


def test_empty_mask_is_refused() -> None:
    fit = judge(ellipse_from_mask(np.zeros(SHAPE, np.float32), (0.1, 0.1)), HeadQuality())
    assert not fit.found and fit.skull is None and fit.hc_mm is None and fit.reason


def test_noise_mask_is_refused() -> None:
    noise = (np.random.default_rng(0).random((160, 160)) < 0.5).astype(np.float32)
    _, sq = to_square(np.zeros(SHAPE, np.float32), 160)
    for method in ("contour", "moments", "robust"):
        fit = judge(ellipse_from_mask(noise, (0.1, 0.1), sq, method=method), HeadQuality())
        assert not fit.found and fit.hc_mm is None and fit.reason


def test_implausible_size_is_refused() -> None:
    ell, spacing = (40.0, 27.0, 4.0, 3.0, 0.0), (0.1, 0.1)
    fit = judge(ellipse_from_mask(source_mask(ell, spacing), spacing), HeadQuality())
    assert not fit.found and "size" in fit.reason


def test_ellipse_from_a_crop_around_the_head() -> None:
    """A refining crop's grid (the frame at negative offsets, partly outside it) maps back to
    the source frame exactly, as the whole-frame square does."""
    ell, spacing = (20.0, 16.0, 15.0, 12.0, 0.5), (0.1, 0.1)      # a head near the frame's corner
    frame = source_mask(ell, spacing)
    cx, cy, side = ell[0] / spacing[1], ell[1] / spacing[0], 2 * ell[2] / spacing[1] / 0.6
    crop, sq = crop_square(frame, cx, cy, side, 160)
    assert sq.top > 0 and sq.left > 0              # the crop reaches past the frame's top and left
    for method in ("contour", "moments"):
        _check(ellipse_from_mask(crop, spacing, sq, method=method), ell)
    # the crop sees the head at more detail than the whole frame's square
    assert sq.side < max(frame.shape)


class BrightNet(nn.Module):
    """A 'network' that calls bright pixels head: the right answer on any crop of a frame
    with a bright filled ellipse, so a second pass can be checked against the first."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) * 40 + 0 * self.w


@pytest.mark.parametrize("case", [CASES[1], ((40.0, 27.0, 12.0, 9.0, 0.3), (0.1, 0.1))])
def test_refining_pass_maps_back_to_the_source_frame(case) -> None:
    ell, spacing = case
    frame = source_mask(ell, spacing)
    true = hc_mm(ell[2], ell[3])
    errors = {}
    for refine in (False, True):
        loc = HeadLocaliser(BrightNet(), 48, tta=False, method="moments", level=0.5, refine=refine)
        probs, squares = loc.probabilities([frame])
        fit = loc.fit(probs[0], squares[0], spacing)
        assert fit.found
        errors[refine] = abs(fit.hc_mm - true) / true
        # the prediction maps back onto the source frame, whichever grid it came from
        pred = loc.source_mask(probs[0], squares[0])
        assert 2 * (pred & (frame > 0)).sum() / (pred.sum() + (frame > 0).sum()) > 0.97
        assert (squares[0].side < max(frame.shape)) == refine
    assert max(errors.values()) < 0.005
