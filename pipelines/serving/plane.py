"""The plane-quality gate: may a frame be diagnosed at all?

A diagnosis needs the transcerebellar plane: a fetal head, and inside it a cerebellum and a
cisterna magna that the segmenter is sure of and whose sizes fit the head and the GA. A
frame that fails any rule is `not_assessable`, with one short sentence saying why, and no
probability or measurement is reported for it (a transthalamic HC18 frame once got
`hypoplasia` at 0.92 from a "cerebellum" drawn outside the head). Pure functions: the
evidence comes from `Predictor.predict_frames` and the head localiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipelines import biometry
from pipelines.imaging.preprocess import Skull

NOT_ASSESSABLE = "not_assessable"

# The gestational ages a diagnosis is given for: those of the data contract's training rows
# (validate.ga_min/ga_max) and of the INTERGROWTH-21st curves the model is conditioned on. A
# missing, infinite or implausible GA is never read as a number (NaN once became `normal`).
GA_RANGE = (14.0, 42.0)


def ga_problem(ga_weeks: float) -> str:
    """Why a frame's GA cannot be used ('' when it can)."""
    if not math.isfinite(ga_weeks):
        return "no gestational age given"
    if not GA_RANGE[0] <= ga_weeks <= GA_RANGE[1]:
        return f"gestational age {ga_weeks:g} weeks outside {GA_RANGE[0]:g}-{GA_RANGE[1]:g} weeks"
    return ""

# Mean soft probability of a structure's class over the pixels kept for it. Three classes
# make 1/3 chance; a trained segmenter sits near 1 inside a structure and 0.5 on its border,
# so a real cerebellum or cisterna of a few hundred crop pixels averages well above 0.8. Below
# 0.6 the network is closer to guessing than to seeing the structure.
MIN_STRUCTURE_CONFIDENCE = 0.6

# TCD z-score for the GA (INTERGROWTH-21st, Rodriguez-Sibaja 2021): hypoplasia lies below
# -1.645 and the severe forms reach about -4; beyond +-5 the number is a wrong structure, a
# wrong scale or a wrong GA, not a finding.
MAX_ABS_TCD_Z = 5.0

# TCD over HC, independent of the GA (which may be wrong). INTERGROWTH-21st medians give
# 0.118 (21 weeks) to 0.182 (40 weeks); the extremes of a TCD within +-5 SD over an HC within
# +-5 SD, at any GA of 14-40 weeks, give 0.077 (19-20 weeks) to 0.294 (40 weeks). Rounded
# outwards: outside [0.075, 0.30] the "cerebellum" cannot belong to this head.
TCD_HC_RATIO = (0.075, 0.30)

# Where the cerebellum lies: its centroid's distance from the head's centre along the
# occipito-frontal axis, in units of the long semi-axis. The cerebellum fills the posterior
# fossa, beyond the inner third of that axis (0.51-0.71 on unseen synthetic scans); the
# thalami of a transthalamic plane, which a segmenter can take for it, lie near the centre.
MIN_CEREBELLUM_POSITION = 0.35


def cerebellum_position(labels: np.ndarray, crop_size: int, long_semi_axis_px: float) -> float:
    """The cerebellum's (label 1) centroid from the crop's centre along its horizontal axis (the
    head's long axis), over the long semi-axis in crop pixels; NaN without a cerebellum."""
    xs = np.nonzero(labels == 1)[1]
    if xs.size == 0:
        return math.nan
    return float(abs(xs.mean() - (crop_size / 2.0 - 0.5)) / long_semi_axis_px)


# The crop cut around the classical skull fit versus the learned head, when both exist: the
# localiser's HC error is ~3 mm (1.5 %) on real HC18, so a centre more than a quarter of the
# learned long semi-axis away, or a long semi-axis off by more than 25 %, means the crop (and
# the head prior placed in it) is not this head.
MAX_CENTRE_SHIFT = 0.25
MAX_SIZE_RATIO = 1.25


@dataclass(frozen=True)
class PlaneEvidence:
    """What the gate looks at for one frame (mm, weeks; NaN where not measured)."""

    head_found: bool
    head_reason: str = ""
    hc_mm: float = math.nan
    ga_weeks: float = math.nan
    tcd_mm: float = math.nan
    cm_mm: float = math.nan
    cerebellum_confidence: float = math.nan
    cisterna_confidence: float = math.nan
    outside: bool = False                      # the segmenter put cerebellum outside the skull
    crop_skull: Skull | None = None            # the skull the crop was cut around
    crop_from_classical: bool = True           # that skull came from preprocess.fit_skull
    learned_skull: Skull | None = None         # the head localiser's, when one ran and found it
    cerebellum_position: float = math.nan      # cerebellum_position(): 0 the head's centre, 1 its pole


def heads_disagree(crop: Skull, learned: Skull) -> str:
    """Why the crop's skull is not the learned head ('' when they agree)."""
    shift = math.hypot(crop.cx - learned.cx, crop.cy - learned.cy)
    if shift > MAX_CENTRE_SHIFT * learned.a:
        return f"the skull fit and the head localiser disagree (centres {shift:.0f} mm apart)"
    ratio = crop.a / max(learned.a, 1e-9)
    if not 1.0 / MAX_SIZE_RATIO <= ratio <= MAX_SIZE_RATIO:
        return f"the skull fit and the head localiser disagree (head sizes differ by a factor {ratio:.2f})"
    return ""


def assess(e: PlaneEvidence) -> tuple[bool, str]:
    """(assessable, reason): the first rule a frame fails, in the order a sonographer checks."""
    if why := ga_problem(e.ga_weeks):
        return False, why
    if not e.head_found:
        return False, "no fetal head found" + (f" ({e.head_reason})" if e.head_reason else "")
    if e.crop_from_classical and e.crop_skull is not None and e.learned_skull is not None:
        why = heads_disagree(e.crop_skull, e.learned_skull)
        if why:
            return False, why
    if not math.isfinite(e.tcd_mm):
        return False, "no cerebellum found in the head: not a transcerebellar plane"
    if e.outside:
        return False, "cerebellum segmented outside the skull"
    if e.cerebellum_position < MIN_CEREBELLUM_POSITION:               # NaN passes: no position measured
        return False, (f"cerebellum at {e.cerebellum_position:.2f} of the head's half-length from its centre, "
                       "not in the posterior fossa: not a transcerebellar plane")
    if not math.isfinite(e.cm_mm):
        return False, "no cisterna magna found: not a transcerebellar plane"
    for name, conf in (("cerebellum", e.cerebellum_confidence), ("cisterna magna", e.cisterna_confidence)):
        if not conf >= MIN_STRUCTURE_CONFIDENCE:            # NaN fails too
            return False, f"{name} not segmented with confidence ({conf:.2f})"
    z = float(biometry.tcd_zscore(e.tcd_mm, e.ga_weeks))
    if math.isfinite(z) and abs(z) > MAX_ABS_TCD_Z:
        return False, f"TCD {e.tcd_mm:.1f} mm implausible at {e.ga_weeks:.1f} weeks (z {z:+.1f})"
    if math.isfinite(e.hc_mm) and e.hc_mm > 0:
        ratio = e.tcd_mm / e.hc_mm
        if not TCD_HC_RATIO[0] <= ratio <= TCD_HC_RATIO[1]:
            return False, f"TCD {e.tcd_mm:.1f} mm implausible for a head of HC {e.hc_mm:.0f} mm"
    return True, ""


def structure_confidence(prob: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean class probability (C, S, S) over the pixels labelled cerebellum, cisterna magna; NaN if none."""
    out = []
    for cls in (1, 2):
        m = labels == cls
        out.append(float(prob[cls][m].mean()) if m.any() else math.nan)
    return out[0], out[1]
