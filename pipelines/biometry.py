"""Fetal biometry: INTERGROWTH-21st reference curves and measurements from masks.

References (GA in weeks, z = (x - mu) / sigma):
- TCD, 14-40 weeks: Rodriguez-Sibaja et al., Ultrasound Obstet Gynecol 2021.
- Cisterna magna, 15-36 weeks, natural-log scale: Napolitano et al., UOG 2020.
- Head circumference, 14-40 weeks: Papageorghiou et al., Ultrasound Obstet Gynecol 2014
  (the fetal standard; also used by the synthetic generator).
Outside a curve's GA range the functions return NaN rather than extrapolate.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import ndtr

TCD_GA_RANGE = (14.0, 40.0)
CM_GA_RANGE = (15.0, 36.0)
HC_GA_RANGE = (14.0, 40.0)
Z_5TH = -1.6448536269514722


def _ga(ga_weeks: ArrayLike, lo: float, hi: float) -> NDArray[np.float64]:
    ga = np.asarray(ga_weeks, dtype=np.float64)
    return np.where((ga >= lo) & (ga <= hi), ga, np.nan)


def tcd_mu_sigma(ga_weeks: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Mean and SD of the TCD (mm) at a GA (weeks)."""
    g = _ga(ga_weeks, *TCD_GA_RANGE) / 10.0
    mu = -13.10907 + 20.8941 * np.sqrt(g) + 0.5035914 * g**3
    sigma = 0.4719837 + 0.0500382 * g**3
    return mu, sigma


def cm_log_mu_sigma(ga_weeks: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Mean and SD of ln(cisterna magna depth in mm) at a GA (weeks)."""
    ga = _ga(ga_weeks, *CM_GA_RANGE)
    mu = 2.098095 - 239.0659 * ga**-2.0 - 1.547e-7 * ga**3
    sigma = 0.2297936 + 8.1872 * ga**-2.0
    return mu, sigma


def tcd_zscore(tcd_mm: ArrayLike, ga_weeks: ArrayLike) -> NDArray[np.float64]:
    mu, sigma = tcd_mu_sigma(ga_weeks)
    return (np.asarray(tcd_mm, dtype=np.float64) - mu) / sigma


def tcd_centile(tcd_mm: ArrayLike, ga_weeks: ArrayLike) -> NDArray[np.float64]:
    return 100.0 * ndtr(tcd_zscore(tcd_mm, ga_weeks))


def cm_zscore(cm_mm: ArrayLike, ga_weeks: ArrayLike) -> NDArray[np.float64]:
    mu, sigma = cm_log_mu_sigma(ga_weeks)
    cm = np.asarray(cm_mm, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.log(np.where(cm > 0, cm, np.nan)) - mu) / sigma


def cm_centile(cm_mm: ArrayLike, ga_weeks: ArrayLike) -> NDArray[np.float64]:
    return 100.0 * ndtr(cm_zscore(cm_mm, ga_weeks))


def tcd_from_z(z: ArrayLike, ga_weeks: ArrayLike) -> NDArray[np.float64]:
    mu, sigma = tcd_mu_sigma(ga_weeks)
    return mu + np.asarray(z, dtype=np.float64) * sigma


def cm_from_z(z: ArrayLike, ga_weeks: ArrayLike) -> NDArray[np.float64]:
    mu, sigma = cm_log_mu_sigma(ga_weeks)
    return np.exp(mu + np.asarray(z, dtype=np.float64) * sigma)


def hc_mean_mm(ga_weeks: ArrayLike) -> NDArray[np.float64]:
    """INTERGROWTH-21st fetal head circumference, median (mm)."""
    ga = np.asarray(ga_weeks, dtype=np.float64)
    return -28.2849 + 1.69267 * ga**2 - 0.397485 * ga**2 * np.log(ga)


def hc_mu_sigma(ga_weeks: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Mean and SD of the head circumference (mm) at a GA (weeks), NaN outside 14-40 weeks."""
    ga = _ga(ga_weeks, *HC_GA_RANGE)
    ln = np.log(ga)
    mu = -28.2849 + 1.69267 * ga**2 - 0.397485 * ga**2 * ln
    sigma = 1.98735 + 0.0136772 * ga**3 - 0.00726264 * ga**3 * ln + 0.000976253 * ga**3 * ln**2
    return mu, sigma


def hc_zscore(hc_mm: ArrayLike, ga_weeks: ArrayLike) -> NDArray[np.float64]:
    mu, sigma = hc_mu_sigma(ga_weeks)
    return (np.asarray(hc_mm, dtype=np.float64) - mu) / sigma


def hc_centile(hc_mm: ArrayLike, ga_weeks: ArrayLike) -> NDArray[np.float64]:
    return 100.0 * ndtr(hc_zscore(hc_mm, ga_weeks))


def ga_from_hc(hc_mm: ArrayLike, ga_range: tuple[float, float] = HC_GA_RANGE) -> NDArray[np.float64]:
    """The GA (weeks) at which `hc_mm` is the INTERGROWTH-21st median, NaN outside `ga_range`
    (default the standard's 14-40 weeks; a wider range extrapolates the median's equation).
    An estimate for images that come without a GA, never a substitute for a dated one."""
    grid = np.linspace(*ga_range, 2601)
    median = hc_mean_mm(grid)                      # increasing over the range
    hc = np.asarray(hc_mm, dtype=np.float64)
    inside = (hc >= median[0]) & (hc <= median[-1])
    return np.where(inside, np.interp(hc, median, grid), np.nan)


def ellipse_perimeter(a: float, b: float) -> float:
    """Ramanujan's approximation of an ellipse's perimeter from its semi-axes."""
    return math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))


def is_hypoplasia_by_rule(tcd_mm: ArrayLike, ga_weeks: ArrayLike) -> NDArray[np.bool_]:
    """The interpretable baseline: TCD below the 5th centile for GA."""
    return tcd_zscore(tcd_mm, ga_weeks) < Z_5TH


def extent_mm(mask: NDArray[np.bool_], direction_rad: float, spacing_mm: float) -> float:
    """Extent of a binary mask along a direction (angle in image x/y, radians), in mm.

    Counted in whole pixels (max - min of the projected pixel centres, plus one pixel), so a
    structure one pixel wide measures one pixel. NaN for an empty mask.
    """
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return float("nan")
    proj = xs * math.cos(direction_rad) + ys * math.sin(direction_rad)
    return float((proj.max() - proj.min() + 1.0) * spacing_mm)


def cerebellar_axis(labels: NDArray[np.integer]) -> float | None:
    """Direction (radians) of the cerebellum's long (transverse) axis by PCA, None if empty.

    The cerebellum is about twice as wide as it is deep, so its principal axis is the
    transverse one, and the occipito-frontal axis is perpendicular to it.
    """
    ys, xs = np.nonzero(labels == 1)
    if xs.size < 5:
        return None
    cov = np.cov(np.stack([xs, ys]).astype(np.float64))
    vals, vecs = np.linalg.eigh(cov)
    vx, vy = vecs[:, int(np.argmax(vals))]
    return math.atan2(vy, vx)


SUBPIXEL = 4        # measure_soft: the probabilities are upsampled this many times


def measure_soft(prob: NDArray[np.floating], labels: NDArray[np.integer], spacing_mm: float,
                 factor: int = SUBPIXEL) -> tuple[float, float]:
    """TCD and CM depth (mm) as `measure_mask` gives them, at 1/`factor` of a pixel: the class
    probabilities (C, S, S) upsampled bilinearly, each pixel of the finer grid labelled by the
    most probable class, and only next to (one pixel around) the structure `labels` kept, so
    blobs the anatomical prior dropped stay dropped.

    On a crop of 128 pixels a pixel is 0.7-0.8 mm, and a mask counted in whole pixels is off
    by up to a pixel (exact masks warped to the crop: TCD error 0.28 mm on average); the
    probabilities place each border between two pixel centres.
    """
    import cv2

    size = labels.shape[-1] * factor
    up = np.stack([cv2.resize(np.asarray(p, np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
                   for p in prob])
    best = up.argmax(0)
    fine = np.zeros((size, size), np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    for cls in (1, 2):
        near = cv2.dilate((labels == cls).astype(np.uint8), kernel)
        near = cv2.resize(near, (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
        fine[near & (best == cls)] = cls
    return measure_mask(fine, spacing_mm / factor)


def measure_mask(labels: NDArray[np.integer], spacing_mm: float,
                 of_axis_rad: float | None = None) -> tuple[float, float]:
    """TCD and CM depth (mm) from a label mask (1 cerebellum, 2 cisterna magna).

    TCD is the maximal width of the cerebellum perpendicular to the head's occipito-frontal
    axis; CM depth is the extent of the cisterna magna along that axis (from the back of
    the vermis to the inner occipital table). The axis defaults to the perpendicular of the
    cerebellum's own principal axis, so no skull fit is needed.
    """
    if of_axis_rad is None:
        transverse = cerebellar_axis(labels)
        if transverse is None:
            return float("nan"), float("nan")
        of_axis_rad = transverse - math.pi / 2
    tcd = extent_mm(labels == 1, of_axis_rad + math.pi / 2, spacing_mm)
    cm = extent_mm(labels == 2, of_axis_rad, spacing_mm)
    return tcd, cm
