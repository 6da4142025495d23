"""The crops cut around the learned head (pipelines/imaging/crops.py with a HeadLocaliser):
the learned skull is used where the localiser finds the head, fit_skull where it refuses.

The network here is a double that answers with a given head mask, so the geometry (square
grid, ellipse fit, crop) is what is tested, not a network's training."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn

from pipelines.data.synth_render import STYLES, head_mask, make_anatomy, render
from pipelines.imaging.crops import prepare
from pipelines.imaging.head import HeadLocaliser, to_square

SIZE, MARGIN, HEAD_GRID = 64, 1.15, 96


class MaskNet(nn.Module):
    """Logits +/-20 from a fixed mask on the square grid, whatever the input."""

    def __init__(self, mask: np.ndarray | None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        grid = np.zeros((HEAD_GRID, HEAD_GRID), np.float32) if mask is None else to_square(mask, HEAD_GRID)[0]
        self.register_buffer("logits", torch.from_numpy(np.where(grid >= 0.5, 20.0, -20.0).astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], 1, HEAD_GRID, HEAD_GRID) + 0 * self.w


def _case(tmp_path):
    rng = np.random.default_rng(4)
    an = make_anatomy(24.0, 24.0, 5.5, 0.78)
    img, labels, pl, _ = render(an, STYLES["aurora"], rng)
    cv2.imwrite(str(tmp_path / "scan.png"), img)
    (tmp_path / "scan.json").write_text(json.dumps({"pixel_spacing_mm": [pl.spacing, pl.spacing]}))
    cv2.imwrite(str(tmp_path / "mask.png"), labels)
    row = {"image_id": "x", "split": "train", "deid_path": "scan.png", "frame": 0, "spacing_row_mm": pl.spacing,
           "spacing_col_mm": pl.spacing, "mask_path": "mask.png", "label": "normal"}
    return an, pl, head_mask(an, pl, img.shape[:2]), pd.DataFrame([row])


def test_crops_follow_the_learned_head(tmp_path):
    an, pl, head, rows = _case(tmp_path)
    loc = HeadLocaliser(MaskNet(head.astype(np.float32)), HEAD_GRID, tta=False, method="moments", level=0.5)
    learned = prepare(rows, tmp_path, SIZE, MARGIN, localiser=loc)
    assert list(learned.frame["frame_source"]) == ["learned"]
    # the crop's scale and axis ratio are the true head's (outer skull ellipse), to grid precision
    assert math.isclose(learned.mm_per_px[0], 2 * an.a * MARGIN / SIZE, rel_tol=0.02)
    assert math.isclose(learned.axis_ratio[0], an.b / an.a, rel_tol=0.02)
    # the annotated cerebellum lands in the crop, as with fit_skull
    assert (learned.labels[0] == 1).sum() > 20

    classical = prepare(rows, tmp_path, SIZE, MARGIN)
    assert list(classical.frame["frame_source"]) == ["classical"]
    assert not math.isclose(classical.mm_per_px[0], learned.mm_per_px[0], rel_tol=1e-6)


def test_a_refusing_localiser_falls_back_to_fit_skull(tmp_path):
    _, _, _, rows = _case(tmp_path)
    loc = HeadLocaliser(MaskNet(None), HEAD_GRID, tta=False)            # finds no head anywhere
    out = prepare(rows, tmp_path, SIZE, MARGIN, localiser=loc)
    assert list(out.frame["frame_source"]) == ["classical"]
    ref = prepare(rows, tmp_path, SIZE, MARGIN)
    np.testing.assert_array_equal(out.images, ref.images)
