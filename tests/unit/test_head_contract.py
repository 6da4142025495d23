"""The data contract's head metrics: one filled ellipse per image, its circumference in pixels."""

from __future__ import annotations

import math

import cv2
import numpy as np

from pipelines import biometry
from pipelines.contract.rows import head_stats


def _save(tmp_path, mask, name="m.png"):
    path = tmp_path / name
    cv2.imwrite(str(path), mask)
    return path


def test_a_filled_ellipse_passes_with_its_circumference(tmp_path):
    mask = np.zeros((400, 500), np.uint8)
    cv2.ellipse(mask, ((250.0, 200.0), (300.0, 220.0), 25.0), 1, -1)
    s = head_stats(_save(tmp_path, mask))
    assert s["components"] == 1 and s["iou"] > 0.98
    assert math.isclose(s["perimeter_px"], biometry.ellipse_perimeter(150.0, 110.0), rel_tol=0.01)


def test_an_unfilled_outline_or_a_stray_stroke_fails(tmp_path):
    ring = np.zeros((400, 500), np.uint8)
    cv2.ellipse(ring, ((250.0, 200.0), (300.0, 220.0), 25.0), 1, 2)
    assert head_stats(_save(tmp_path, ring, "ring.png"))["iou"] < 0.5
    stray = np.zeros((400, 500), np.uint8)
    cv2.ellipse(stray, ((250.0, 200.0), (300.0, 220.0), 25.0), 1, -1)
    cv2.line(stray, (10, 10), (60, 380), 1, 3)
    assert head_stats(_save(tmp_path, stray, "stray.png"))["components"] == 2
    assert head_stats(tmp_path / "missing.png") == {}
