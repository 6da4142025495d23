"""A site's commissioned threshold: the Neyman-Pearson umbrella rule keeps its promise."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta as beta_dist

from pipelines.evaluation.metrics import operating_threshold
from pipelines.registry.commission import (
    CommissionError,
    check_site,
    clopper_pearson,
    commission,
    min_positives,
    one_image_per_patient,
    site_threshold,
    umbrella_threshold,
    violation_probability,
)


def test_positives_needed_follow_from_the_binomial():
    # k = 1 (below every positive) is safe when m^n <= 1 - confidence
    assert min_positives(0.90, 0.95) == 29                  # 0.9^29 = 0.047, 0.9^28 = 0.052
    assert 0.9 ** 29 <= 0.05 < 0.9 ** 28
    assert min_positives(0.95, 0.95) == 59
    assert min_positives(0.80, 0.90) == 11
    with pytest.raises(CommissionError, match="at least 29"):
        umbrella_threshold(np.linspace(0.5, 1, 28), 0.90, 0.95)


def test_the_rank_is_the_highest_with_the_stated_risk():
    scores = np.linspace(0.01, 0.99, 100)
    thr, k = umbrella_threshold(scores, 0.90, 0.95)
    assert thr == pytest.approx(np.sort(scores)[k - 1])
    assert violation_probability(100, k, 0.90) <= 0.05 < violation_probability(100, k + 1, 0.90)
    assert k == 5                                            # P(Bin(100, 0.1) < 5) = 0.024, < 6: 0.058
    # more positives, a higher rank: less conservative for the same guarantee
    assert umbrella_threshold(np.linspace(0, 1, 400), 0.90, 0.95)[1] > 4 * k


def _distribution(name: str, rng: np.random.Generator):
    if name == "beta":
        return (lambda n: rng.beta(5, 2, n)), (lambda t: beta_dist.cdf(t, 5, 2))
    # most hypoplasia scores high, a tail of low ones (a scanner the segmenter half-fails on)
    return ((lambda n: np.where(rng.random(n) < 0.85, rng.uniform(0.6, 1, n), rng.uniform(0, 0.6, n))),
            (lambda t: np.where(t < 0.6, 0.15 * t / 0.6, 0.15 + 0.85 * (t - 0.6) / 0.4)))


@pytest.mark.parametrize("dist", ["beta", "bimodal"])
def test_the_risk_is_the_stated_one_whatever_the_scores(dist):
    """100 hypoplasia patients' scores drawn 4000 times from a known distribution: the true
    sensitivity at the umbrella threshold falls under 0.90 as often as the binomial says
    (rank 5: 2.4%), whatever the distribution; the naive rule (the empirical 10th percentile)
    falls under it about half the time."""
    rng = np.random.default_rng(13)
    draw, cdf = _distribution(dist, rng)
    n, draws = 100, 4000
    under, naive_under = 0, 0
    for _ in range(draws):
        s = draw(n)
        thr, k = umbrella_threshold(s, 0.90, 0.95)
        under += 1 - cdf(thr) < 0.90
        naive_under += 1 - cdf(np.quantile(s, 0.10)) < 0.90
    stated = violation_probability(n, k, 0.90)
    assert k == 5 and stated <= 0.05
    assert abs(under / draws - stated) < 0.01                # sd of the rate over 4000 draws: 0.0024
    assert naive_under / draws > 0.3


def test_with_few_patients_the_validation_rule_breaks_the_promise_the_umbrella_refuses():
    """13 hypoplasia patients (what 40 patients of a site hold at this prevalence): the
    validation rule, aimed at 0.95, leaves sensitivity under 0.90 in over 10% of draws;
    the umbrella rule sets no threshold at all."""
    rng = np.random.default_rng(13)
    draw, cdf = _distribution("bimodal", rng)
    misses = sum(1 - cdf(operating_threshold(np.ones(13, int), draw(13), 0.95)) < 0.90 for _ in range(2000))
    assert misses / 2000 > 0.10
    with pytest.raises(CommissionError):
        umbrella_threshold(draw(13), 0.90, 0.95)


def test_clopper_pearson_matches_known_values():
    lo, hi = clopper_pearson(29, 29, 0.90)                   # one-sided 95% lower bound of 29/29: 0.05^(1/29)
    assert lo == pytest.approx(0.05 ** (1 / 29), abs=1e-9) and hi == 1.0
    lo, hi = clopper_pearson(0, 10, 0.95)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-9)
    lo, hi = clopper_pearson(5, 10, 0.95)
    assert lo == pytest.approx(0.1871, abs=1e-4) and hi == pytest.approx(0.8129, abs=1e-4)


def _cohort(n_pos: int, n_neg: int, seed: int = 0):
    """Two images per patient; hypoplasia patients score high, one image lower than the other."""
    rng = np.random.default_rng(seed)
    patients, y, p = [], [], []
    for i in range(n_pos + n_neg):
        pos = i < n_pos
        centre = rng.uniform(0.4, 0.95) if pos else rng.uniform(0.02, 0.5)
        for delta in (0.0, -0.05):
            patients.append(f"P{i}")
            y.append(int(pos))
            p.append(centre + delta)
    return np.array(patients, object), np.array(y), np.array(p)


def test_commission_counts_patients_and_draws_one_image_each():
    patients, y, p = _cohort(40, 60)
    r = commission(patients, y, p, 0.5, "site-west", 0.90, 0.95, seed=13)
    assert (r.images, r.patients, r.hypoplasia_patients, r.normal_patients) == (200, 100, 40, 60)
    drawn = one_image_per_patient(patients, y, p, 13)
    assert len(drawn) == 40                                  # patients, not images, are the units
    for key, score in zip(np.unique(patients[y == 1]), drawn, strict=True):   # one of that patient's images
        assert score in p[patients == key]
    assert np.array_equal(drawn, one_image_per_patient(patients, y, p, 13))
    assert not np.array_equal(drawn, one_image_per_patient(patients, y, p, 14))
    assert r.threshold == pytest.approx(np.sort(drawn)[r.rank - 1])
    assert r.rank == 1                                       # 40 patients: only the lowest is safe enough
    assert r.image_sensitivity >= 39 / 40                    # one image of a patient may lie under it
    worst = np.array([p[(patients == f"P{i}")].min() for i in range(40)])
    assert r.trained_patient_sensitivity == pytest.approx(np.mean(worst >= 0.5))
    tags = r.tags()
    assert site_threshold(tags, "site-west") == r.threshold               # exactly: not rounded up past it
    assert site_threshold(tags, "site-east") is None
    assert all(k.startswith("commission.site-west.") for k in tags)
    assert not any("P1" in v for v in tags.values())         # no patient key travels


def test_too_few_patients_or_no_normals_record_nothing():
    patients, y, p = _cohort(20, 30)
    r = commission(patients, y, p, 0.5, "site-north", 0.90, 0.95)
    assert r.threshold is None and "20 patients with hypoplasia" in r.reason and "at least 29" in r.reason
    assert r.tags()["commission.site-north.threshold"] == ""
    patients, y, p = _cohort(40, 0)
    assert "no normal patient" in commission(patients, y, p, 0.5, "site-north", 0.90, 0.95).reason


@pytest.mark.parametrize("bad", ["", "St Mary's Hospital", "../x", "a" * 65, "-lead"])
def test_a_site_is_a_plain_label(bad):
    with pytest.raises(CommissionError, match="label"):
        check_site(bad)
    assert check_site("site-west") == "site-west"


def test_excess_is_an_exact_one_sided_binomial_test():
    from pipelines.registry.commission import excess

    assert excess(39, 168, 0.05)                   # 23% against 5%: the ember site's drift signal
    assert not excess(12, 168, 0.05)               # 7%: within chance of 5% (p = 0.13)
    assert not excess(2, 100, 0.0)                 # a test set without the event: floored at 1%
    assert excess(6, 100, 0.0)                     # P(>= 6 | n = 100, 1%) = 0.0005
    assert not excess(5, 0, 0.05) and not excess(3, 10, float("nan"))


def test_segmentation_check_measures_the_tcd_against_the_sonographers():
    from pipelines.registry.commission import segmentation_check

    ref = np.array([40.0, 42.0, 38.0, 30.0, np.nan] * 4)
    pred = ref - 2.0
    pred[3] = np.nan                                # a mask the segmenter missed: no TCD
    out = segmentation_check(np.zeros(20, bool), 0.05, pred, ref, 1.0)
    assert out["tcd_images"] == 15 and out["tcd_mae_mm"] == pytest.approx(2.0) and out["tcd_bias_mm"] == -2.0
    assert out["biometry_ok"] is False and out["outside_excess"] is False and out["outside_share"] == 0.0
    assert segmentation_check(np.zeros(20, bool), 0.05, ref + 0.5, ref, 1.0)["biometry_ok"] is True
    assert segmentation_check(np.zeros(5, bool), 0.05, ref[:5] + 3, ref[:5], 1.0)["biometry_ok"] is None   # < 10
    r = commission(*_cohort(40, 60), 0.5, "site-west", 0.90, 0.95, out)
    assert r.tags()["commission.site-west.biometry_ok"] == "False"
    assert r.tags()["commission.site-west.tcd_mae_mm"] == "2"
