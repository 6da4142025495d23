"""Rendering of a synthetic transcerebellar plane: anatomy in millimetres, ultrasound physics.

The head is modelled in its own frame (millimetres, x along the occipito-frontal axis with
the occiput at +x, y transverse). Echogenicity is evaluated on a polar (beam) grid so that
depth attenuation, acoustic shadowing behind the skull and speckle correlated along and
across beams come out naturally; the polar image is then scan-converted to the screen.
Label masks are evaluated exactly on the screen grid from the same geometry, so the masks
and the measurements in mm agree with the pixels by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from pipelines import biometry

SKULL_MM = 2.5         # skull thickness


@dataclass(frozen=True)
class Style:
    """How one vendor's scanner renders and exports (image size, grain, gain, syntax)."""

    name: str
    width: int
    height: int
    half_angle_deg: float
    grain_axial: float      # speckle correlation length along the beam, polar samples
    grain_lateral: float    # across beams
    gain_db: float
    dynamic_range_db: float
    rgb: bool
    banner: str             # "top-left" | "top-split" | "top-right"
    transfer_syntax: str    # pydicom UID name
    manufacturer: str
    model: str


STYLES: dict[str, Style] = {
    "aurora": Style("aurora", 800, 600, 40.0, 1.6, 2.2, 0.0, 42.0, False, "top-left",
                    "ExplicitVRLittleEndian", "Aurora Medical", "AuroVue 7"),
    "boreal": Style("boreal", 1024, 768, 42.0, 2.2, 3.0, 3.0, 48.0, True, "top-split",
                    "RLELossless", "Boreal Imaging", "BX-900"),
    "cirrus": Style("cirrus", 960, 720, 38.0, 1.2, 1.8, -2.0, 38.0, False, "top-right",
                    "DeflatedExplicitVRLittleEndian", "Cirrus Sonics", "C-Scan Pro"),
    # a scanner outside the others' range in grain, gain and dynamic range (coarser lateral
    # grain, darker, softer log compression): not in the default mix, kept for external
    # validation (`cbh synth --style delta`, then split.test_site: site-west)
    "delta": Style("delta", 800, 600, 40.0, 2.6, 3.4, -4.0, 60.0, False, "top-left",
                   "ExplicitVRLittleEndian", "Delta Echo", "DE-Port 3"),
    # a fifth scanner, outside all four in the other directions: the finest axial and the
    # coarsest lateral grain, the brightest gain, the softest log compression; not in the
    # default mix, kept for a second external validation (`--style ember`, site-central)
    "ember": Style("ember", 1024, 768, 45.0, 1.0, 3.6, 5.0, 70.0, True, "top-split",
                   "ExplicitVRLittleEndian", "Ember Diagnostics", "EM-5"),
    # a sixth, fixed before any model saw it, to test on a wide dynamic range what was tuned on
    # `ember` (`segment.augment: floor`): between delta and ember in dynamic range, moderate
    # gain and grain (`--style fjord`, site-coast)
    "fjord": Style("fjord", 960, 720, 41.0, 1.8, 2.6, 2.0, 62.0, False, "top-right",
                   "ExplicitVRLittleEndian", "Fjord Medical", "FM-60"),
}


@dataclass(frozen=True)
class Anatomy:
    """One fetal head in millimetres."""

    ga_weeks: float
    a: float         # outer semi-axis along the occipito-frontal axis
    b: float         # outer semi-axis transverse
    tcd: float       # transverse cerebellar diameter
    cm: float        # cisterna magna depth

    @property
    def a_in(self) -> float:
        return self.a - SKULL_MM

    @property
    def b_in(self) -> float:
        return self.b - SKULL_MM

    @property
    def vermis_back(self) -> float:
        return self.a_in - self.cm

    @property
    def vermis_ax(self) -> float:
        return 0.2 * self.tcd

    @property
    def cereb_x(self) -> float:
        return self.vermis_back - self.vermis_ax

    @property
    def hemi_ax(self) -> float:
        return 0.19 * self.tcd

    @property
    def cm_half_width(self) -> float:
        return 0.16 * self.tcd


def make_anatomy(ga_weeks: float, tcd_mm: float, cm_mm: float, ci: float) -> Anatomy:
    """Head axes from the INTERGROWTH-21st head circumference at this GA."""
    hc = float(biometry.hc_mean_mm(ga_weeks))
    a = hc / biometry.ellipse_perimeter(1.0, ci)
    return Anatomy(ga_weeks, a, a * ci, tcd_mm, cm_mm)


def _ell(x: NDArray, y: NDArray, cx: float, cy: float, ax: float, ay: float) -> NDArray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2


def labels_mm(an: Anatomy, x: NDArray, y: NDArray) -> NDArray[np.uint8]:
    """0 background, 1 cerebellum (hemispheres + vermis), 2 cisterna magna."""
    q = an.tcd / 4.0
    hemis = (_ell(x, y, an.cereb_x, q, an.hemi_ax, q) <= 1) | (
        _ell(x, y, an.cereb_x, -q, an.hemi_ax, q) <= 1)
    vermis = _ell(x, y, an.cereb_x, 0.0, an.vermis_ax, 0.11 * an.tcd) <= 1
    cereb = hemis | vermis
    inside = _ell(x, y, 0.0, 0.0, an.a_in, an.b_in) <= 1
    cm = inside & (x >= an.vermis_back) & (np.abs(y) <= an.cm_half_width) & ~cereb
    out = np.zeros(x.shape, np.uint8)
    out[cereb] = 1
    out[cm] = 2
    return out


def echogenicity(an: Anatomy, x: NDArray, y: NDArray, texture: NDArray) -> tuple[NDArray, NDArray]:
    """Mean backscatter amplitude of each point and a skull indicator (for shadowing)."""
    r_out = _ell(x, y, 0.0, 0.0, an.a, an.b)
    r_in = _ell(x, y, 0.0, 0.0, an.a_in, an.b_in)
    skull = (r_out <= 1) & (r_in > 1)
    brain = r_in <= 1
    t = np.full(x.shape, 0.004, np.float32)                      # amniotic fluid
    t[brain] = 0.15 * texture[brain]                               # parenchyma
    # midline echo (falx), frontal half, interrupted by the cavum septi pellucidi
    falx = brain & (np.abs(y) < 0.7) & (x < an.cereb_x - 0.3 * an.tcd)
    t[falx] = 0.55
    csp = brain & (x > -0.45 * an.a) & (x < -0.3 * an.a) & (np.abs(y) < 0.06 * an.b)
    t[csp] = 0.03
    for side in (-1.0, 1.0):                                      # thalami, hypoechoic
        th = brain & (_ell(x, y, -0.1 * an.a, side * 0.17 * an.b, 0.15 * an.a, 0.12 * an.b) <= 1)
        t[th] = 0.08 * texture[th]
    lab = labels_mm(an, x, y)
    q = an.tcd / 4.0
    for side in (-1.0, 1.0):                                      # hemispheres: dark, bright rim
        e = _ell(x, y, an.cereb_x, side * q, an.hemi_ax, q)
        t[e <= 1] = 0.05
        t[(e <= 1) & (e > 0.72)] = 0.38
    vermis = _ell(x, y, an.cereb_x, 0.0, an.vermis_ax, 0.11 * an.tcd) <= 1
    t[vermis] = 0.6
    t[lab == 2] = 0.008                                           # cisterna magna, anechoic
    t[skull] = 1.0
    return t, skull.astype(np.float32)


@dataclass(frozen=True)
class Placement:
    """Where the head lies on the screen."""

    spacing: float        # mm per pixel (isotropic)
    cx: float             # head centre, pixels
    cy: float
    theta: float          # angle of the occipital direction (+x head) on screen, radians


@dataclass(frozen=True)
class Sector:
    apex_x: float
    apex_y: float
    r_max: float
    half_angle: float     # radians

    def bbox(self) -> tuple[int, int, int, int]:
        """x0, y0, x1, y1 of the sector (inclusive), the DICOM ultrasound region."""
        dx = self.r_max * math.sin(self.half_angle)
        return (int(math.floor(self.apex_x - dx)), int(self.apex_y),
                int(math.ceil(self.apex_x + dx)), int(math.ceil(self.apex_y + self.r_max)))


def sector_for(style: Style) -> Sector:
    apex_y = round(0.085 * style.height)
    return Sector(style.width / 2.0, float(apex_y), style.height - apex_y - 6.0,
                  math.radians(style.half_angle_deg))


def _to_head(px: NDArray, py: NDArray, pl: Placement) -> tuple[NDArray, NDArray]:
    dx, dy = (px - pl.cx) * pl.spacing, (py - pl.cy) * pl.spacing
    c, s = math.cos(pl.theta), math.sin(pl.theta)
    return dx * c + dy * s, -dx * s + dy * c


def head_fits(an: Anatomy, pl: Placement, sec: Sector, margin_px: float = 8.0) -> bool:
    t = np.linspace(0, 2 * math.pi, 90, endpoint=False)
    hx, hy = an.a * np.cos(t), an.b * np.sin(t)
    c, s = math.cos(pl.theta), math.sin(pl.theta)
    px = pl.cx + (hx * c - hy * s) / pl.spacing
    py = pl.cy + (hx * s + hy * c) / pl.spacing
    r = np.hypot(px - sec.apex_x, py - sec.apex_y)
    phi = np.arctan2(px - sec.apex_x, py - sec.apex_y)
    ok_r = (r > 0.12 * sec.r_max) & (r < sec.r_max - margin_px)
    ok_phi = np.abs(phi) < sec.half_angle - margin_px / np.maximum(r, 1.0)
    return bool(np.all(ok_r & ok_phi))


def place_head(an: Anatomy, sec: Sector, rng: np.random.Generator) -> Placement:
    """Probe zoom, rotation and translation such that the whole skull is in the sector."""
    for _ in range(200):
        fill = rng.uniform(0.52, 0.7)
        spacing = float(np.clip(2 * an.a / (fill * sec.r_max), 0.1, 0.3))
        theta = rng.uniform(-0.5, 0.5) + (math.pi if rng.random() < 0.5 else 0.0)
        depth = sec.r_max * rng.uniform(0.5, 0.6)
        lateral = rng.uniform(-0.06, 0.06) * sec.r_max
        pl = Placement(spacing, sec.apex_x + lateral, sec.apex_y + depth, theta)
        if head_fits(an, pl, sec):
            return pl
    raise RuntimeError(f"cannot fit a {an.ga_weeks:.1f}-week head into the sector")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sy: float, sx: float) -> NDArray:
    n = rng.standard_normal(shape).astype(np.float32)
    return cv2.GaussianBlur(n, (0, 0), sigmaX=sx, sigmaY=sy)


def render(an: Anatomy, style: Style, rng: np.random.Generator,
           ) -> tuple[NDArray[np.uint8], NDArray[np.uint8], Placement, Sector]:
    """Grey image (H, W) uint8, label mask (H, W), placement and sector."""
    sec = sector_for(style)
    pl = place_head(an, sec, rng)
    n_r = int(sec.r_max)
    n_phi = int(2 * sec.half_angle * sec.r_max)
    r = np.arange(n_r, dtype=np.float32)[:, None]
    phi = np.linspace(-sec.half_angle, sec.half_angle, n_phi, dtype=np.float32)[None, :]
    px = sec.apex_x + r * np.sin(phi)
    py = sec.apex_y + r * np.cos(phi)
    hx, hy = _to_head(px, py, pl)
    tex_sigma = 3.0 / pl.spacing
    tex = _smooth_noise(rng, (n_r, n_phi), tex_sigma, tex_sigma)
    texture = np.exp(0.3 * tex / max(float(tex.std()), 1e-6))
    amp, skull = echogenicity(an, hx, hy, texture)
    # near field: maternal abdominal wall and uterus, bright band in the first ~12 mm
    wall = (r < 0.16 * n_r) & (amp < 0.1)
    amp = np.where(wall, 0.12 * texture, amp)
    # shadowing: every millimetre of skull crossed by the beam costs transmission
    crossed = np.cumsum(skull, axis=0) * pl.spacing / SKULL_MM
    trans = np.exp(-0.8 * np.concatenate([np.zeros((1, n_phi), np.float32), crossed[:-1]]))
    depth_mm = r * pl.spacing
    atten = np.exp(-0.004 * depth_mm)              # residual after time-gain compensation
    sp = rng.standard_normal((2, n_r, n_phi)).astype(np.float32)
    sp = [cv2.GaussianBlur(c, (0, 0), sigmaX=style.grain_lateral, sigmaY=style.grain_axial) for c in sp]
    speckle = np.hypot(sp[0], sp[1])
    speckle /= float(np.sqrt(np.mean(speckle**2)))
    inten = amp * trans * atten * speckle + 1e-4
    db = 20 * np.log10(inten) + style.gain_db
    top = 0.0
    grey = np.clip((db - (top - style.dynamic_range_db)) / style.dynamic_range_db, 0, 1)
    polar = (grey * 255).astype(np.float32)
    polar = cv2.GaussianBlur(polar, (0, 0), 0.7)
    # scan conversion
    h, w = style.height, style.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rr = np.hypot(xx - sec.apex_x, yy - sec.apex_y)
    pp = np.arctan2(xx - sec.apex_x, yy - sec.apex_y)
    map_x = (pp + sec.half_angle) / (2 * sec.half_angle) * (n_phi - 1)
    map_y = rr
    img = cv2.remap(polar, map_x.astype(np.float32), map_y.astype(np.float32),
                    interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    in_sector = (rr < n_r - 1) & (np.abs(pp) <= sec.half_angle)
    img = np.where(in_sector, img, 0).astype(np.uint8)
    lx, ly = _to_head(xx, yy, pl)
    labels = np.where(in_sector, labels_mm(an, lx, ly), 0).astype(np.uint8)
    return img, labels, pl, sec


def head_mask(an: Anatomy, pl: Placement, shape: tuple[int, int]) -> NDArray[np.uint8]:
    """The head as HC18 annotates it: the skull's outer ellipse filled, 1 on 0, on the screen grid."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    lx, ly = _to_head(xx, yy, pl)
    return (_ell(lx, ly, 0.0, 0.0, an.a, an.b) <= 1).astype(np.uint8)


def burn_banner(img: NDArray[np.uint8], lines: list[str], style: Style, sec: Sector) -> NDArray[np.uint8]:
    """Burn identifier text into the screen outside the ultrasound region, as scanners do."""
    out = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if style.rgb else img.copy()
    colour = (235, 220, 60) if style.rgb else 235
    h, w = img.shape[:2]
    scale = 0.45 * h / 600
    band = int(sec.apex_y) - 4
    step = max(int(band / 2), 12)
    positions: list[tuple[int, int]] = []
    for i in range(len(lines)):
        row = 4 + step * (i % 2 + 1) - 6
        if style.banner == "top-left":
            positions.append((8 + (i // 2) * int(w * 0.3), row))
        elif style.banner == "top-split":
            positions.append((8 if i < 2 else int(w * 0.62) + ((i - 2) // 2) * int(w * 0.2), row))
        else:
            positions.append((int(w * 0.38) + (i // 2) * int(w * 0.3), row))
    for text, (x, y) in zip(lines, positions, strict=True):
        cv2.putText(out, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    return out
