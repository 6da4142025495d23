"""The plane-quality gate: every refusal rule, and a good transcerebellar frame passes."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from pipelines import biometry
from pipelines.imaging.preprocess import Skull
from pipelines.serving import plane
from pipelines.serving.plane import PlaneEvidence, assess, structure_confidence

HEAD = Skull(60.0, 50.0, 34.0, 27.0, 0.1)          # HC ~ 192 mm: a 22-week head


def _good() -> PlaneEvidence:
    tcd = float(biometry.tcd_mu_sigma(22.0)[0])
    return PlaneEvidence(head_found=True, hc_mm=192.0, ga_weeks=22.0, tcd_mm=tcd, cm_mm=5.0,
                         cerebellum_confidence=0.95, cisterna_confidence=0.9, outside=False,
                         crop_skull=HEAD, crop_from_classical=True, learned_skull=HEAD)


def test_a_transcerebellar_frame_is_assessable():
    assert assess(_good()) == (True, "")


def test_hypoplasia_is_not_refused_as_implausible():
    """A TCD at z -4 (severe hypoplasia) is a finding, not a wrong picture."""
    e = _good()
    tcd = float(biometry.tcd_from_z(-4.0, 22.0))
    assert assess(replace(e, tcd_mm=tcd)) == (True, "")


@pytest.mark.parametrize("change, words", [
    ({"head_found": False, "head_reason": "low confidence (0.41)"}, "no fetal head found (low confidence"),
    ({"learned_skull": Skull(90.0, 50.0, 34.0, 27.0, 0.1)}, "disagree (centres 30 mm apart)"),
    ({"learned_skull": Skull(60.0, 50.0, 24.0, 20.0, 0.1)}, "head sizes differ"),
    ({"tcd_mm": math.nan}, "no cerebellum found"),
    ({"outside": True}, "outside the skull"),
    ({"cm_mm": math.nan}, "no cisterna magna found"),
    ({"cerebellum_confidence": 0.45}, "cerebellum not segmented with confidence (0.45)"),
    ({"cisterna_confidence": math.nan}, "cisterna magna not segmented with confidence"),
    ({"tcd_mm": 45.0}, "implausible at 22.0 weeks"),
    ({"tcd_mm": 12.0, "ga_weeks": 41.0}, "implausible for a head of HC 192 mm"),     # GA outside the standard
    ({"cerebellum_position": 0.1}, "not in the posterior fossa"),                   # thalami, not cerebellum
    ({"ga_weeks": math.nan}, "no gestational age given"),                               # never read as normal
    ({"ga_weeks": math.inf}, "no gestational age given"),
    ({"ga_weeks": -5.0}, "gestational age -5 weeks outside 14-42 weeks"),
    ({"ga_weeks": 10.0}, "gestational age 10 weeks outside 14-42 weeks"),
])
def test_each_refusal_has_its_reason(change, words):
    ok, reason = assess(replace(_good(), **change))
    assert not ok and words in reason, reason


def test_the_heads_are_compared_only_when_the_crop_came_from_the_classical_fit():
    far = Skull(90.0, 50.0, 34.0, 27.0, 0.1)
    assert assess(replace(_good(), learned_skull=far, crop_from_classical=False))[0]
    assert assess(replace(_good(), learned_skull=None))[0]             # no localiser: nothing to compare


def test_the_ratio_band_holds_every_plausible_tcd_and_hc_at_every_ga():
    """The TCD/HC band is the GA-free envelope of TCD and HC within +-5 SD over 14-40 weeks."""
    ga = np.linspace(14, 40, 261)
    mt, st = biometry.tcd_mu_sigma(ga)
    mh, sh = biometry.hc_mu_sigma(ga)
    lo, hi = plane.TCD_HC_RATIO
    assert lo <= ((mt - 5 * st) / (mh + 5 * sh)).min() and ((mt + 5 * st) / (mh - 5 * sh)).max() <= hi
    assert lo <= (mt / mh).min() and (mt / mh).max() <= hi


def test_structure_confidence_is_the_mean_probability_over_each_structure():
    prob = np.zeros((3, 4, 4), np.float32)
    prob[0] = 1.0
    labels = np.zeros((4, 4), np.uint8)
    labels[0, :2] = 1
    prob[:, 0, :2] = [[0.2], [0.7], [0.1]]
    cer, cis = structure_confidence(prob, labels)
    assert cer == pytest.approx(0.7) and math.isnan(cis)


def test_the_cerebellum_position_is_measured_along_the_long_axis():
    labels = np.zeros((64, 64), np.uint8)
    labels[30:34, 50:54] = 1                       # centroid x 51.5: 20 px from the centre 31.5
    assert plane.cerebellum_position(labels, 64, 25.0) == pytest.approx(0.8)
    assert math.isnan(plane.cerebellum_position(np.zeros((64, 64), np.uint8), 64, 25.0))
    assert assess(replace(_good(), cerebellum_position=0.6)) == (True, "")
