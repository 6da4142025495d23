"""Deterministic preprocessing shared by training, evaluation and inference.

Each frame is turned into a skull-aligned crop: the skull ellipse is fitted, the image is
rotated so that the occipito-frontal (long) axis is horizontal, and a square around the
head is resampled to `size` pixels in physical (mm) space, so anisotropic spacing is
handled and the crop's mm-per-pixel is known. This is the "anatomical frame" in which the
networks see the cerebellum relative to the head, and in which TCD is a vertical extent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from pipelines.errors import CbhError
from pipelines.imaging.scan import ScanError, read_scan


class PreprocessError(CbhError, ValueError):
    """A frame cannot be brought into the anatomical frame (no skull found...)."""


@dataclass(frozen=True)
class Skull:
    """Fitted skull ellipse in physical (mm) image coordinates."""

    cx: float
    cy: float
    a: float          # semi-axis along the occipito-frontal axis, mm
    b: float          # transverse semi-axis, mm
    angle: float      # direction of the long axis in image (x right, y down), radians


@dataclass(frozen=True)
class Crop:
    skull: Skull
    side_mm: float
    size: int
    spacing: tuple[float, float]   # source (row, col) mm

    @property
    def mm_per_px(self) -> float:
        return self.side_mm / self.size

    @property
    def axis_ratio(self) -> float:
        """The skull's transverse over its occipito-frontal axis: with the margin, all a crop
        needs to know where the head lies in it (`head_mask`)."""
        return self.skull.b / self.skull.a

    def matrix(self) -> NDArray[np.float64]:
        """2x3 affine mapping crop pixel (u, v) to source pixel (x, y)."""
        k = self.mm_per_px
        c, s = math.cos(self.skull.angle), math.sin(self.skull.angle)
        half = self.size / 2.0 - 0.5
        sr, sc = self.spacing
        rot = np.array([[c * k, -s * k], [s * k, c * k]])
        centre = np.array([self.skull.cx, self.skull.cy]) - rot @ np.array([half, half])
        scale = np.diag([1.0 / sc, 1.0 / sr])
        return np.hstack([scale @ rot, (scale @ centre)[:, None]])


def load_frame(path: Path, frame: int) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """A grey frame and the mask of where ultrasound data lies (the regions, else everywhere)."""
    try:
        scan = read_scan(path, frame=frame)
    except ScanError as exc:
        raise PreprocessError(str(exc)) from exc
    return scan.frames[0], scan.valid


MAX_HEAD_SEMI_AXIS_MM = 70.0   # an occipito-frontal diameter of 140 mm: above any fetal head at term
MIN_HEAD_SEMI_AXIS_MM = 8.0
FILL_GOOD = 0.97               # a component filling its fitted ellipse this well is an ellipse


def _ellipse_mm(cnt: NDArray, f: int, spacing: tuple[float, float]) -> tuple:
    """The ellipse fitted to a contour of the downsampled frame, in millimetres."""
    sr, sc = spacing
    outer = cnt.reshape(-1, 2).astype(np.float64)
    pts = np.stack([(outer[:, 0] + 0.5) * f * sc, (outer[:, 1] + 0.5) * f * sr], 1).astype(np.float32)
    return cv2.fitEllipse(pts)


def _plausible(ellipse: tuple) -> bool:
    (_, _), (w, h), _ = ellipse
    long_axis, short_axis = max(w, h) / 2.0, min(w, h) / 2.0
    return (0.45 < short_axis / max(long_axis, 1e-6) <= 1.0
            and MIN_HEAD_SEMI_AXIS_MM <= long_axis <= MAX_HEAD_SEMI_AXIS_MM)


# the narrowest side a frame may have: a strip or a thumbnail is not an ultrasound frame (the
# data contract's scanner frames start at 128 px)
MIN_FRAME_PX = 32


def fit_skull(grey: NDArray[np.float32], valid: NDArray[np.bool_], spacing: tuple[float, float]) -> Skull:
    """Fit the head: the large echogenic ellipse (skull and brain) surrounded by darker tissue
    and fluid.

    The frame is smoothed at ~2 mm and thresholded (Otsu within the ultrasound region); each
    large component is filled, and the one an ellipse fits best (filled area close to the
    ellipse's area, weighted by its size) is taken; the ellipse is fitted to its outer contour,
    so structures inside the head cannot bias it. Only a head-sized ellipse counts (long
    semi-axis 8-70 mm, axis ratio above 0.45).

    A bright scanner shows the tissue around the head in grey: at Otsu's level it merges with
    the head into one blob (the head and the fan's apex, or the whole fan), which no ellipse
    fits well. So where the best component fills its ellipse by less than FILL_GOOD, the
    levels above are tried (Otsu's level among the brighter pixels, twice), where the tissue
    drops out and the skull stays; a component there is taken if it fills its ellipse by at
    least FILL_GOOD and better than the first one did.
    """
    sr, sc = spacing
    if min(grey.shape) < MIN_FRAME_PX:
        raise PreprocessError(f"a {grey.shape[1]}x{grey.shape[0]} frame is too small to hold a fetal head "
                              f"(at least {MIN_FRAME_PX} pixels a side)")
    f = max(1, int(math.ceil(max(grey.shape) / 320)))
    small = cv2.resize(np.where(valid, grey, 0).astype(np.float32),
                       (grey.shape[1] // f, grey.shape[0] // f), interpolation=cv2.INTER_AREA)
    vs = cv2.resize(valid.astype(np.uint8), (small.shape[1], small.shape[0]),
                    interpolation=cv2.INTER_NEAREST) > 0
    px_mm = min(sr, sc) * f
    blur = cv2.GaussianBlur(small, (0, 0), max(2.0 / px_mm, 1.0))
    values = blur[vs]
    if values.size < 100 or float(values.max()) <= 0:
        raise PreprocessError("no ultrasound content to fit a skull to")
    scaled = np.clip(blur / float(values.max()) * 255, 0, 255).astype(np.uint8)
    k = max(3, int(round(3.0 / px_mm)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    imaged = scaled[vs]
    chosen: tuple[float, tuple] | None = None        # (fill, ellipse in mm)
    found_shape = False
    for level in range(3):                           # Otsu's level, then the levels above it
        if imaged.size < 100:
            break
        thr, _ = cv2.threshold(imaged[:, None], 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        binary = cv2.morphologyEx(((scaled > thr) & vs).astype(np.uint8), cv2.MORPH_OPEN, kernel)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        best: tuple[float, float, tuple] | None = None
        for area, cnt in sorted(((cv2.contourArea(c), c) for c in contours), key=lambda ac: ac[0], reverse=True)[:4]:
            if len(cnt) < 20:
                continue
            found_shape = True
            ell = cv2.fitEllipse(cnt.astype(np.float32))
            fill = area / max(math.pi * ell[1][0] * ell[1][1] / 4.0, 1e-6)
            score = area * max(0.0, 1.0 - abs(1.0 - fill)) ** 2
            ellipse = _ellipse_mm(cnt, f, spacing)
            if _plausible(ellipse) and (best is None or score > best[0]):
                best = (score, fill, ellipse)
        if level == 0:
            chosen = best[1:] if best is not None else None
            if chosen is not None and chosen[0] >= FILL_GOOD:
                break
        elif best is not None and best[1] >= FILL_GOOD and (chosen is None or best[1] > chosen[0]):
            chosen = best[1:]
            break
        imaged = imaged[imaged > thr]
    if chosen is None:
        raise PreprocessError("fitted skull ellipse is implausible" if found_shape else "no skull-like structure found")
    (cx, cy), (w, h), ang = chosen[1]
    long_axis, short_axis = max(w, h) / 2.0, min(w, h) / 2.0
    angle = math.radians(ang if w >= h else ang + 90.0)
    return Skull(float(cx), float(cy), float(long_axis), float(short_axis), angle)


def make_crop(skull: Skull, spacing: tuple[float, float], size: int, margin: float) -> Crop:
    return Crop(skull, 2.0 * skull.a * margin, size, spacing)


def warp(image: NDArray, crop: Crop, nearest: bool = False) -> NDArray:
    """Resample a source image (or label mask) into the crop."""
    flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(image, crop.matrix(), (crop.size, crop.size), flags=flags,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def unwarp(labels: NDArray, crop: Crop, shape: tuple[int, int]) -> NDArray:
    """Map a crop label mask back onto the source frame."""
    return cv2.warpAffine(labels, crop.matrix(), (shape[1], shape[0]), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def frame_labels(labels: NDArray, crop: Crop, shape: tuple[int, int]) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """A crop's labels on the source frame, and the crop's footprint there (where the crop
    saw the frame); labels are 0 outside it."""
    footprint = unwarp(np.ones((crop.size, crop.size), np.uint8), crop, shape) > 0
    return np.where(footprint, unwarp(labels, crop, shape), 0).astype(np.uint8), footprint


# How far beyond the fitted skull ellipse (a multiple of its axes) a cerebellum may reach: the
# ellipse follows the skull's outer edge, give or take the fit. On the 300-patient synthetic
# cohort (507 annotated crops, three sites) the annotated cerebellum crosses 1.04 in 8 crops,
# by a few pixels that change no TCD by more than 0.04 mm; at 1.00 it crosses in 36, one of
# them by enough to change its TCD by 0.99 mm.
HEAD_TOLERANCE = 1.04


def head_mask(size: int, margin: float, axis_ratio: float, scale: float = HEAD_TOLERANCE) -> NDArray[np.bool_]:
    """Where the head lies in a crop: inside the fitted skull ellipse (centred, long axis
    horizontal, semi-axes size / (2 margin) and axis_ratio times that), its axes scaled by
    `scale`. An unknown ratio (NaN: a crop prepared before the ratio was kept) is the whole crop."""
    if not np.isfinite(axis_ratio):
        return np.ones((size, size), bool)
    centre, a = size / 2.0 - 0.5, scale * size / (2.0 * margin)
    v, u = np.ogrid[0:size, 0:size]
    return ((u - centre) / a) ** 2 + ((v - centre) / (a * axis_ratio)) ** 2 <= 1.0


def normalise_intensity(crop: NDArray[np.float32]) -> NDArray[np.float32]:
    """Robust per-crop intensity scaling: the 1st and 99th percentiles of the imaged pixels
    map to 0 and 1. Vendors differ in gain, dynamic range and log compression; this removes
    the global part of that difference for every model, in training and at inference alike."""
    imaged = crop[crop > 0]
    if imaged.size < 100:
        return crop
    lo, hi = np.percentile(imaged, [1.0, 99.0])
    return np.clip((crop - lo) / max(float(hi - lo), 1e-3), 0.0, 1.0).astype(np.float32)


def prepare_frame(grey: NDArray[np.float32], valid: NDArray[np.bool_], spacing: tuple[float, float],
                  size: int, margin: float, skull: Skull | None = None) -> tuple[NDArray[np.float32], Crop]:
    """The crop the networks see, and its geometry (the deterministic transform, defined once
    and shared by training, evaluation and inference), cut around `skull` (the learned head's)
    or, without one, around fit_skull's."""
    crop = make_crop(skull if skull is not None else fit_skull(grey, valid, spacing), spacing, size, margin)
    return normalise_intensity(warp(np.where(valid, grey, 0).astype(np.float32), crop)), crop
