"""The anatomical prior on predicted masks: one blob per structure, no cerebellum outside the skull."""

import cv2
import numpy as np
import pytest
import torch

from pipelines.imaging.preprocess import head_mask, prepare_frame, warp
from pipelines.serving.inference import largest_components


def _head(shape=(420, 560), centre=(300.0, 200.0), axes=(150.0, 110.0), angle=25.0):
    """A grey frame with a bright skull ring around a mid-grey brain on dark fluid, and the
    filled ellipse as a label image."""
    grey = np.full(shape, 0.05, np.float32)
    c, ax = (int(centre[0]), int(centre[1])), (int(axes[0]), int(axes[1]))
    cv2.ellipse(grey, c, ax, angle, 0, 360, 0.45, -1)
    cv2.ellipse(grey, c, ax, angle, 0, 360, 0.95, 6)
    filled = np.zeros(shape, np.uint8)
    cv2.ellipse(filled, c, ax, angle, 0, 360, 1, -1)
    return grey, filled


def test_head_mask_is_the_fitted_skull_in_crop_coordinates():
    grey, filled = _head()
    size, margin = 128, 1.15
    _, crop = prepare_frame(grey, np.ones(grey.shape, bool), (0.2, 0.2), size, margin)
    assert crop.axis_ratio == pytest.approx(110 / 150, abs=0.03)
    truth = warp(filled, crop, nearest=True) > 0            # the drawn head, carried into the crop
    head = head_mask(size, margin, crop.axis_ratio, scale=1.0)
    # same place and orientation: the drawn head lies inside, and the fit (smoothed at 2 mm,
    # so a few per cent wide of the skull's outer edge) is not much larger
    assert (truth & head).sum() >= 0.995 * truth.sum()
    assert head.sum() < 1.2 * truth.sum()
    assert np.argwhere(head).mean(0) == pytest.approx(np.argwhere(truth).mean(0), abs=1.0)
    # the tolerance widens it a little, never the other way
    wider = head_mask(size, margin, crop.axis_ratio)
    assert wider.sum() > head.sum() and not (head & ~wider).any()


def test_head_mask_geometry_and_unknown_ratio():
    size, margin = 128, 1.15
    head = head_mask(size, margin, 0.5, scale=1.0)
    semi = size / (2 * margin)                              # 55.7 px along the long (horizontal) axis
    row = head[64]
    assert row.sum() == pytest.approx(2 * semi, abs=2)
    assert head[:, 64].sum() == pytest.approx(semi, abs=2)  # half as tall: the ratio
    assert not head[0, 0] and head[64, 64]
    assert head_mask(size, margin, float("nan")).all()     # crops packed without a ratio: no clipping


def test_cerebellum_outside_the_head_is_dropped_and_the_one_inside_kept():
    size, margin, ratio = 128, 1.15, 0.8
    head = head_mask(size, margin, ratio, scale=1.0)
    labels = np.zeros((size, size), np.uint8)
    labels[50:78, 14:24] = 1                                # the cerebellum, inside, by the occiput
    labels[110:128, 20:110] = 1                             # a larger false blob below the skull
    labels[60:68, 8:14] = 2                                 # cisterna magna against the bone
    labels[62:66, 0:8] = 2                                  # ...crossing the fitted ellipse: kept
    out = largest_components(labels, head)
    assert (out[50:78, 14:24] == 1).all()                   # without the prior the outside blob wins
    assert not (out[110:, :] == 1).any()
    assert (largest_components(labels)[110:128, 20:110] == 1).all()
    assert (out[62:66, 0:8] == 2).all()


def test_a_cerebellum_running_out_through_the_skull_is_cut_at_the_skull():
    size, margin, ratio = 128, 1.15, 0.8
    head = head_mask(size, margin, ratio)
    labels = np.zeros((size, size), np.uint8)
    labels[44:84, 14:26] = 1
    labels[84:128, 14:22] = 1                               # the leak: downwards, out of the head
    out = largest_components(labels, head)
    cut = out == 1
    assert cut[44:84, 14:26].all()
    assert not (cut & ~head).any()
    assert cut.sum() < (labels == 1).sum()


def test_prepared_crops_keep_the_axis_ratio(tmp_path):
    import pandas as pd

    from pipelines.imaging.crops import Prepared

    n = 3
    data = Prepared(pd.DataFrame({"image_id": ["a", "b", "c"], "split": ["train", "val", "test"]}),
                    np.zeros((n, 1, 8, 8), np.float32), np.zeros((n, 8, 8), np.uint8),
                    np.array([0.5, 0.6, 0.7]), np.array([0.8, 0.75, 0.9]))
    data.save(tmp_path / "new")
    assert Prepared.load(tmp_path / "new").axis_ratio == pytest.approx([0.8, 0.75, 0.9])
    # a pack from before the ratio was kept still loads: the prior then has no head to clip to
    data.save(tmp_path / "old")
    arrays = dict(np.load(tmp_path / "old" / "arrays.npz"))
    del arrays["axis_ratio"]
    np.savez(tmp_path / "old" / "arrays.npz", **arrays)
    assert np.isnan(Prepared.load(tmp_path / "old").axis_ratio).all()


class _Painted(torch.nn.Module):
    """A stand-in segmenter whose output is fixed label maps (logits), to test what the
    Predictor does with a network's output, not the network."""

    def __init__(self, labels: np.ndarray) -> None:
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), 3).permute(0, 3, 1, 2).float() * 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


def test_the_predictor_reports_which_crops_left_the_skull():
    from pipelines.serving.inference import ModelConfig, Predictor

    size, margin = 64, 1.15
    inside, leaving = np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8)
    inside[24:40, 6:14] = 1
    leaving[24:40, 6:14] = 1
    leaving[40:64, 8:12] = 1                               # runs out below the skull
    cfg = ModelConfig("asc", 8, (4, 8), size, margin, 0.5)
    pred = Predictor(_Painted(np.stack([inside, leaving])), torch.nn.Identity(), cfg)
    images = np.zeros((2, 1, size, size), np.float32)
    labels, outside = pred.segment_qc(images, np.array([0.8, 0.8]))
    assert outside.tolist() == [False, True]
    assert (labels[0] == inside).all() and labels[1].sum() < leaving.sum()
    assert np.array_equal(pred.segment(images, np.array([0.8, 0.8])), labels)
    # without the ratios there is no head to leave: nothing cleared, nothing reported
    raw, none = pred.segment_qc(images)
    assert not none.any() and np.array_equal(raw[1], leaving)


def test_cbh_predicts_path_applies_the_prior_with_each_frames_own_skull():
    """predict_frames (behind `cbh predict` and the served model) places the head from the
    skull it fitted on each frame."""
    from models.networks import make_classifier
    from pipelines.serving.inference import ModelConfig, Predictor

    grey, _ = _head()
    size, margin = 64, 1.15
    leaving = np.zeros((size, size), np.uint8)
    leaving[24:40, 6:14] = 1
    leaving[40:64, 8:12] = 1
    cfg = ModelConfig("biometry-rule", 8, (4, 8), size, margin, 0.5)
    pred = Predictor(_Painted(leaving[None]), make_classifier("biometry-rule", 8), cfg)
    (row,) = pred.predict_frames([(grey, np.ones(grey.shape, bool), (0.2, 0.2), 24.0)])
    head = head_mask(size, margin, row["_crop"].axis_ratio)
    assert not ((row["_labels"] == 1) & ~head).any()
    assert (row["_labels"][24:40, 6:14] == 1).all()
