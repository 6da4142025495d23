"""The learned head localiser: a network predicts the fetal head (inside the skull's outer
border) over the whole frame, padded to a square at low resolution; an ellipse fitted to
the prediction's largest component gives the skull (`Skull`, millimetres, source image
coordinates: x right, y down) and the head circumference. A quality check refuses frames
where no head-like ellipse is found, so no number comes from a failed fit."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from models.head import HEAD_FEATURES, make_head_net
from pipelines.imaging.preprocess import Skull


@dataclass(frozen=True)
class SquareMap:
    """Where a frame of `shape` (rows, cols) lies in its zero-padded square of `side` source
    pixels, resampled to `size` grid pixels."""

    shape: tuple[int, int]
    side: int
    top: int
    left: int
    size: int

    def grid_to_source(self, u: NDArray, v: NDArray, grid: int | None = None) -> tuple[NDArray, NDArray]:
        """Source pixel (x, y) of points (u, v) on a `grid`-pixel square (default `size`);
        pixel centres are aligned as cv2.resize aligns them."""
        k = self.side / float(grid or self.size)
        return (u + 0.5) * k - 0.5 - self.left, (v + 0.5) * k - 0.5 - self.top


def _square(grey: NDArray[np.floating], side: int, top: int, left: int,
            size: int) -> tuple[NDArray[np.float32], SquareMap]:
    """A zero square of `side` source pixels holding the frame with its corner at (top, left)
    (negative: the square starts inside the frame), area-resampled to size x size."""
    h, w = grey.shape
    canvas = np.zeros((side, side), np.float32)
    r0, r1, c0, c1 = max(0, -top), min(h, side - top), max(0, -left), min(w, side - left)
    if r0 < r1 and c0 < c1:
        canvas[r0 + top:r1 + top, c0 + left:c1 + left] = grey[r0:r1, c0:c1]
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA), SquareMap((h, w), side, top, left, size)


def to_square(grey: NDArray[np.floating], size: int) -> tuple[NDArray[np.float32], SquareMap]:
    """The frame centred in a zero-padded square (aspect ratio kept), area-resampled to size x size."""
    h, w = grey.shape
    side = max(h, w)
    return _square(grey, side, (side - h) // 2, (side - w) // 2, size)


# the share of a refining crop's side the head's long axis spans: the crop is cut from the
# source frame around the first pass's ellipse, so a big head is seen at up to twice the
# detail of the whole-frame pass (training draws crops around this, pipelines/training/head.py)
REFINE_FILL = 0.6


def crop_square(grey: NDArray[np.floating], cx: float, cy: float, side: float,
                size: int) -> tuple[NDArray[np.float32], SquareMap]:
    """A square of `side` source pixels centred on source pixel (cx, cy), zeros beyond the frame,
    area-resampled to size x size, and where the frame lies in it (offsets may be negative)."""
    side_px = max(int(round(side)), 1)
    x0, y0 = int(round(cx - side_px / 2)), int(round(cy - side_px / 2))
    return _square(grey, side_px, -y0, -x0, size)


def hc_mm(a: float, b: float) -> float:
    """Ellipse perimeter from semi-axes, Ramanujan's second approximation (as HC18 uses).
    biometry.ellipse_perimeter is Ramanujan's first; the two differ by < 0.01 % on heads."""
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


@dataclass(frozen=True)
class HeadEllipse:
    """An ellipse fitted to a predicted head, in mm (source coordinates), with how well the
    prediction supports it: IoU of the component with the ellipse, mean probability on the
    component, and the share of the ellipse's area that lies inside the image."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float
    iou: float
    confidence: float
    inside: float

    @property
    def skull(self) -> Skull:
        return Skull(self.cx, self.cy, self.a, self.b, self.angle)


@dataclass(frozen=True)
class HeadQuality:
    """Thresholds below which a frame is 'head not found'."""

    min_iou: float = 0.90
    min_confidence: float = 0.70
    min_a_mm: float = 8.0
    max_a_mm: float = 70.0
    min_ratio: float = 0.45
    min_inside: float = 0.60


@dataclass(frozen=True)
class HeadFit:
    """The localiser's answer for one frame: a skull and HC only when `found`."""

    skull: Skull | None
    hc_mm: float | None
    quality: float
    found: bool
    reason: str


def _to_mm(centre: NDArray, axes: NDArray, rot: NDArray, px_scale: float, offset: tuple[float, float],
           spacing: tuple[float, float]) -> tuple[float, float, float, float, float]:
    """Map an ellipse (centre, semi-axes, rotation matrix) from canvas pixels to millimetres
    exactly: anisotropic spacing shears it, so its axes come from an SVD, not a rescale."""
    sr, sc = spacing
    s = np.diag([sc, sr])
    cx, cy = (centre + 0.5) * px_scale - 0.5 - np.asarray(offset)
    u, sv, _ = np.linalg.svd(s @ rot @ np.diag(axes) * px_scale)
    angle = math.atan2(u[1, 0], u[0, 0])
    angle = angle - math.pi if angle > math.pi / 2 else angle + math.pi if angle <= -math.pi / 2 else angle
    return float(cx * sc), float(cy * sr), float(sv[0]), float(sv[1]), angle


def _radial_offsets(pts: NDArray, ellipse: tuple) -> NDArray[np.float64]:
    """Signed distance of each point from `ellipse` (cv2.fitEllipse's form) along the ray from
    its centre, in pixels: positive outside. Close to the geometric distance for head shapes."""
    (ex, ey), (ew, eh), ang = ellipse
    t = math.radians(ang)
    d = pts - np.array([ex, ey])
    u = d[:, 0] * math.cos(t) + d[:, 1] * math.sin(t)
    v = -d[:, 0] * math.sin(t) + d[:, 1] * math.cos(t)
    r = np.hypot(u, v)
    rho = np.hypot(u / max(ew / 2, 1e-9), v / max(eh / 2, 1e-9))
    return r * (1.0 - 1.0 / np.maximum(rho, 1e-9))


def trimmed_ellipse(pts: NDArray, rounds: int = 4, k: float = 3.0, floor_px: float = 1.0,
                    keep_min: float = 0.6) -> tuple | None:
    """cv2.fitEllipse refitted `rounds` times on the points within max(`floor_px`, `k` robust SDs
    (1.4826 MAD)) of the previous fit, or None when no ellipse fits. Stops when fewer than
    `keep_min` of the points would remain: an outline that far from an ellipse is not trimmed
    into one (the quality check then sees the plain fit)."""
    p = pts.astype(np.float64)
    try:
        fit = cv2.fitEllipse(p.astype(np.float32))
    except cv2.error:
        return None
    for _ in range(rounds):
        off = _radial_offsets(p, fit)
        med = float(np.median(off))
        spread = max(floor_px, k * 1.4826 * float(np.median(np.abs(off - med))))
        keep = np.abs(off - med) <= spread
        if keep.all() or keep.sum() < max(keep_min * len(pts), 20):
            break
        p = p[keep]
        fit = cv2.fitEllipse(p.astype(np.float32))
    return fit


def ellipse_from_mask(prob: NDArray[np.floating], spacing: tuple[float, float], square: SquareMap | None = None,
                      level: float = 0.5, method: str = "contour", up: int = 4) -> HeadEllipse | None:
    """The ellipse of the largest component of `prob` >= `level`, in mm, or None.

    `prob` is a probability map or mask on the source frame (square=None) or on the square
    grid of `square`; a grid map is bilinearly upsampled `up` times first, so the fit sees a
    sub-pixel boundary. `contour` fits the outer contour, leaving out points on the image's
    border (a head cut by the frame still gets its own ellipse, not the frame's edge); boundary
    pixel centres lie half a pixel inside the edge, hence the +0.5. `moments` takes the filled component's
    second moments, unbiased for a whole ellipse. `robust` is `contour` refitted without the
    contour points far from the ellipse (`trimmed_ellipse`): a prediction that leaks past a faint
    skull bulges out along part of its outline, which pulls a plain fit but not a trimmed one."""
    p = np.asarray(prob, np.float32)
    if square is not None:
        p = cv2.resize(p, (p.shape[1] * up, p.shape[0] * up), interpolation=cv2.INTER_LINEAR)
        px_scale, offset = square.side / float(p.shape[0]), (square.left, square.top)
        # the frame's extent on the grid, clipped to it (a crop may hold only part of the frame)
        y0, x0 = max(round(square.top / px_scale), 0), max(round(square.left / px_scale), 0)
        y1 = min(round((square.top + square.shape[0]) / px_scale), p.shape[0])
        x1 = min(round((square.left + square.shape[1]) / px_scale), p.shape[1])
    else:
        px_scale, offset, (y0, x0), (y1, x1) = 1.0, (0.0, 0.0), (0, 0), p.shape
    inside_img = np.zeros(p.shape, np.uint8)
    inside_img[y0:y1, x0:x1] = 1
    n, lab, stats, _ = cv2.connectedComponentsWithStats((p >= level).astype(np.uint8), connectivity=8)
    if n < 2:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    comp = (lab == k).astype(np.uint8)
    area = float(stats[k, cv2.CC_STAT_AREA])
    if area < 50:
        return None
    if method == "moments":
        m = cv2.moments(comp, binaryImage=True)
        centre = np.array([m["m10"], m["m01"]]) / m["m00"]
        cov = np.array([[m["mu20"], m["mu11"]], [m["mu11"], m["mu02"]]]) / m["m00"]
        lam, rot = np.linalg.eigh(cov)
        axes = 2.0 * np.sqrt(np.maximum(lam, 1e-9))
    else:
        cnts, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        pts = max(cnts, key=len).reshape(-1, 2)
        pts = pts[(pts[:, 0] > x0) & (pts[:, 1] > y0) & (pts[:, 0] < x1 - 1) & (pts[:, 1] < y1 - 1)]
        if len(pts) < 20:
            return None
        fitted = trimmed_ellipse(pts) if method == "robust" else cv2.fitEllipse(pts.astype(np.float32))
        if fitted is None:
            return None
        (ex, ey), (ew, eh), ang = fitted
        if not all(map(math.isfinite, (ex, ey, ew, eh))) or min(ew, eh) <= 0:
            return None
        centre, axes = np.array([ex, ey]), np.array([ew, eh]) / 2.0 + 0.5
        t = math.radians(ang)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    drawn = np.zeros(comp.shape, np.uint8)
    t_deg = math.degrees(math.atan2(rot[1, 0], rot[0, 0]))
    scale = 16  # cv2.ellipse's shift=4: sub-pixel drawing
    big = max(comp.shape) * 4
    if np.any(axes > big) or np.any(np.abs(centre) > big):
        return None
    cv2.ellipse(drawn, (int(round(centre[0] * scale)), int(round(centre[1] * scale))),
                (int(round((axes[0] - 0.5) * scale)), int(round((axes[1] - 0.5) * scale))), t_deg, 0, 360, 1, -1,
                cv2.LINE_8, 4)
    union = float(np.count_nonzero(drawn | comp))
    iou = float(np.count_nonzero(drawn & comp)) / max(union, 1.0)
    inside = float(np.count_nonzero(drawn & inside_img)) / max(math.pi * axes[0] * axes[1], 1.0)
    conf = float(p[comp > 0].mean())
    cx, cy, a, b, angle = _to_mm(centre, axes, rot, px_scale, offset, spacing)
    return HeadEllipse(cx, cy, a, b, angle, iou, conf, min(inside, 1.0))


def judge(ellipse: HeadEllipse | None, quality: HeadQuality) -> HeadFit:
    """A HeadFit: the skull and HC when every check passes, else a refusal with its reason."""
    if ellipse is None:
        return HeadFit(None, None, 0.0, False, "no head-shaped region predicted")
    score = ellipse.iou * ellipse.confidence
    checks = ((ellipse.iou >= quality.min_iou, f"prediction not elliptical (IoU {ellipse.iou:.2f})"),
              (ellipse.confidence >= quality.min_confidence, f"low confidence ({ellipse.confidence:.2f})"),
              (quality.min_a_mm <= ellipse.a <= quality.max_a_mm, f"implausible size (a={ellipse.a:.1f} mm)"),
              (ellipse.b / max(ellipse.a, 1e-9) >= quality.min_ratio, "implausible axis ratio"),
              (ellipse.inside >= quality.min_inside, "ellipse mostly outside the image"))
    for ok, reason in checks:
        if not ok:
            return HeadFit(None, None, score, False, reason)
    return HeadFit(ellipse.skull, hc_mm(ellipse.a, ellipse.b), score, True, "")


class HeadLocaliser:
    """A trained head network with its input size, ellipse method and quality thresholds."""

    def __init__(self, net: nn.Module, size: int, quality: HeadQuality = HeadQuality(), tta: bool = True,
                 method: str = "moments", level: float = 0.6, batch_size: int = 16,
                 features: tuple[int, ...] = HEAD_FEATURES, refine: bool = False) -> None:
        self.net, self.size, self.quality, self.tta = net.eval(), size, quality, tta
        self.method, self.level, self.batch_size, self.features = method, level, batch_size, tuple(features)
        self.refine = refine

    def save(self, folder: Path) -> None:
        """The weights (`head.pt`) and everything needed to use them (`head.json`) in `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), folder / "head.pt")
        config = {"size": self.size, "features": list(self.features), "tta": self.tta, "method": self.method,
                  "level": self.level, "refine": self.refine, "quality": asdict(self.quality)}
        (folder / "head.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> HeadLocaliser:
        """A localiser saved by `save`."""
        config = json.loads((folder / "head.json").read_text())
        net = make_head_net(tuple(config["features"]))
        net.load_state_dict(torch.load(folder / "head.pt", map_location="cpu", weights_only=True))
        return cls(net, int(config["size"]), HeadQuality(**config["quality"]), bool(config["tta"]),
                   str(config["method"]), float(config["level"]), features=tuple(config["features"]),
                   refine=bool(config.get("refine", False)))    # saved before the option: one pass

    @torch.no_grad()
    def _run(self, inputs: Sequence[NDArray[np.float32]]) -> list[NDArray[np.float32]]:
        """The network's head probability on size x size inputs (mean over the horizontal flip with `tta`)."""
        dev = next(self.net.parameters()).device
        probs: list[NDArray[np.float32]] = []
        for i in range(0, len(inputs), self.batch_size):
            x = torch.from_numpy(np.stack(inputs[i:i + self.batch_size]))[:, None].to(dev)
            p = torch.sigmoid(self.net(x))
            if self.tta:
                p = (p + torch.sigmoid(self.net(x.flip(-1))).flip(-1)) / 2
            probs.extend(p[:, 0].float().cpu().numpy())
        return probs

    def probabilities(self, greys: Sequence[NDArray[np.floating]]) -> tuple[list[NDArray[np.float32]], list[SquareMap]]:
        """Head probability on each frame's square grid, and where the frame lies in it. With
        `refine`, a frame whose whole-frame pass shows a head is run again on a crop of the source
        frame around that head (REFINE_FILL), and the crop's map is the answer; a frame without one,
        or whose head already spans REFINE_FILL of it, keeps its first map."""
        squares = [to_square(g, self.size) for g in greys]
        probs, maps = self._run([s[0] for s in squares]), [s[1] for s in squares]
        if not self.refine:
            return probs, maps
        again: list[int] = []
        crops: list[tuple[NDArray[np.float32], SquareMap]] = []
        for i, (p, m, g) in enumerate(zip(probs, maps, greys, strict=True)):
            first = ellipse_from_mask(p, (1.0, 1.0), m, self.level, self.method)    # in source pixels
            side = 2 * first.a / REFINE_FILL if first is not None else math.inf
            if first is None or first.iou < self.quality.min_iou or side >= max(g.shape):
                continue                       # no head, or one the whole frame already shows as large
            again.append(i)
            crops.append(crop_square(g, first.cx, first.cy, side, self.size))
        for i, p, (_, m) in zip(again, self._run([c[0] for c in crops]), crops, strict=True):
            probs[i], maps[i] = p, m
        return probs, maps

    def fit(self, prob: NDArray[np.float32], square: SquareMap, spacing: tuple[float, float]) -> HeadFit:
        return judge(ellipse_from_mask(prob, spacing, square, self.level, self.method), self.quality)

    def locate_batch(self, greys: Sequence[NDArray[np.floating]],
                     spacings: Sequence[tuple[float, float]]) -> list[HeadFit]:
        """`locate` for many frames, the network run in batches."""
        probs, squares = self.probabilities(greys)
        return [self.fit(p, s, sp) for p, s, sp in zip(probs, squares, spacings, strict=True)]

    def locate(self, grey: NDArray[np.floating], spacing: tuple[float, float]) -> HeadFit:
        """The head in one frame (float32 HxW in [0, 1]; spacing (row, col) mm)."""
        return self.locate_batch([grey], [spacing])[0]

    def source_mask(self, prob: NDArray[np.float32], square: SquareMap) -> NDArray[np.bool_]:
        """The prediction on the source frame (bilinear from its grid, thresholded, largest
        component), for Dice."""
        k = square.side / float(prob.shape[0])
        to_grid = np.float64([[1 / k, 0, (square.left + 0.5) / k - 0.5], [0, 1 / k, (square.top + 0.5) / k - 0.5]])
        h, w = square.shape
        full = cv2.warpAffine(prob, to_grid, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0) >= self.level
        n, lab, stats, _ = cv2.connectedComponentsWithStats(full.astype(np.uint8), connectivity=8)
        return lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) if n > 1 else np.zeros(full.shape, bool)
