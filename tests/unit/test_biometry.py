"""Reference curves (golden values with a tolerance) and measurements from masks."""

import math

import numpy as np
import pytest

from pipelines import biometry as B


def test_tcd_curve_golden_values():
    # mu = -13.10907 + 20.8941 sqrt(GA/10) + 0.5035914 (GA/10)^3, Rodriguez-Sibaja 2021
    mu, sigma = B.tcd_mu_sigma(np.array([20.0, 30.0]))
    assert mu == pytest.approx([20.4684, 36.6775], abs=1e-3)
    assert sigma == pytest.approx([0.87229, 1.82302], abs=1e-4)


def test_centiles_at_the_median_and_the_5th():
    mu, sigma = B.tcd_mu_sigma(25.0)
    assert B.tcd_centile(mu, 25.0) == pytest.approx(50.0, abs=1e-9)
    assert B.tcd_centile(mu + B.Z_5TH * sigma, 25.0) == pytest.approx(5.0, abs=1e-6)
    cm = B.cm_from_z(0.0, 22.0)
    assert B.cm_centile(cm, 22.0) == pytest.approx(50.0, abs=1e-9)
    assert 3.0 < cm < 8.0          # cisterna magna is a few mm mid-gestation


def test_outside_ga_range_is_nan_not_extrapolated():
    assert np.isnan(B.tcd_zscore(30.0, 41.0))
    assert np.isnan(B.cm_centile(5.0, 14.0))
    assert np.isfinite(B.tcd_zscore(30.0, 40.0))


def test_vectorised_over_arrays():
    z = B.tcd_zscore(np.array([15.0, 20.0, 40.0]), np.array([18.0, 20.0, 33.0]))
    assert z.shape == (3,)


def test_mask_measurement_in_mm():
    labels = np.zeros((100, 100), np.uint8)
    labels[40:50, 20:80] = 1          # cerebellum: 60 px wide transversely (x), 10 px deep
    labels[50:58, 45:55] = 2          # cisterna magna: 8 px deep along the OF axis (y)
    tcd, cm = B.measure_mask(labels, 0.25)
    assert tcd == pytest.approx(15.0)
    assert cm == pytest.approx(2.0)
    # rotating the anatomy does not change the measurement (PCA axis)
    tcd_r, _ = B.measure_mask(np.rot90(labels).copy(), 0.25)
    assert tcd_r == pytest.approx(15.0)


def test_soft_measurement_finds_the_border_between_pixel_centres():
    """An ellipse of known width, its class probabilities the share of each pixel it covers
    (the smooth output a segmenter gives at a border): counted in whole pixels the width is off
    by up to a pixel, from the probabilities at a quarter of a pixel it is off by much less.
    Stray blobs the anatomical prior dropped are not measured."""
    rng = np.random.default_rng(3)
    size, sub, hard, soft = 64, 8, [], []
    fine = (np.arange(size * sub) + 0.5) / sub - 0.5           # sub-pixel sample positions, pixel units
    for a in rng.uniform(12.0, 20.0, 16):
        b, cx, cy = a / 2, 31.5 + rng.uniform(-1, 1), 28.5 + rng.uniform(-1, 1)
        inside = ((fine[None, :] - cx) / a) ** 2 + ((fine[:, None] - cy) / b) ** 2 <= 1
        cover = inside.reshape(size, sub, size, sub).mean(axis=(1, 3))
        prob = np.stack([1 - cover, cover, np.zeros_like(cover)])
        labels = (cover > 0.5).astype(np.uint8)
        hard.append(abs(B.measure_mask(labels, 1.0)[0] - 2 * a))
        soft.append(abs(B.measure_soft(prob, labels, 1.0)[0] - 2 * a))
    assert np.mean(soft) < 0.2 and max(soft) < 0.4, soft
    assert np.mean(hard) > 2 * np.mean(soft), (hard, soft)
    # a blob the prior dropped (absent from the labels) stays out of the measurement
    before = B.measure_soft(prob, labels, 1.0)
    prob[1, 50:54, 2:6], prob[0, 50:54, 2:6] = 1.0, 0.0
    assert B.measure_soft(prob, labels, 1.0)[0] == pytest.approx(before[0])


def test_empty_mask_gives_nan():
    assert all(math.isnan(v) for v in B.measure_mask(np.zeros((10, 10), np.uint8), 0.2))


def test_ramanujan_perimeter_of_a_circle():
    assert B.ellipse_perimeter(10, 10) == pytest.approx(2 * math.pi * 10)



# Published centile tables, not our formulas: TCD from Rodriguez-Sibaja et al., UOG 2021
# (INTERGROWTH-21st fetal cerebellar growth), cisterna magna from Napolitano et al., UOG 2020,
# as transcribed in the LSHTM gigs project (data-raw/tables/ig_fet/ig_fet_{tcd,cm}fga_centiles.txt).
# GA (weeks) -> (P05, P50, P95) in mm.
TCD_TABLE = {14: (12.00, 13.00, 13.99), 20: (19.04, 20.47, 21.90), 24: (24.31, 26.22, 28.13),
             28: (30.33, 32.91, 35.48), 32: (37.31, 40.77, 44.23), 36: (45.43, 50.03, 54.63),
             40: (54.88, 60.91, 66.94)}
CM_TABLE = {15: (1.82, 2.82, 4.36), 20: (2.97, 4.48, 6.76), 25: (3.72, 5.55, 8.27),
            30: (4.20, 6.22, 9.22), 36: (4.56, 6.73, 9.92)}
Z95 = 1.6448536269514722


@pytest.mark.parametrize("ga", sorted(TCD_TABLE))
def test_tcd_matches_the_published_intergrowth_table(ga):
    p05, p50, p95 = TCD_TABLE[ga]
    got = B.tcd_from_z(np.array([-Z95, 0.0, Z95]), ga)
    assert got == pytest.approx([p05, p50, p95], abs=0.02)           # the table's rounding is 0.01 mm
    assert B.tcd_centile(p05, ga) == pytest.approx(5.0, abs=0.3)


@pytest.mark.parametrize("ga", sorted(CM_TABLE))
def test_cisterna_magna_matches_the_published_intergrowth_table(ga):
    p05, p50, p95 = CM_TABLE[ga]
    got = B.cm_from_z(np.array([-Z95, 0.0, Z95]), ga)
    assert got == pytest.approx([p05, p50, p95], abs=0.02)
    assert B.cm_centile(p95, ga) == pytest.approx(95.0, abs=0.5)


def test_rule_is_below_the_published_5th_centile():
    # 5th centile at 24 weeks is 24.31 mm in the table
    assert B.is_hypoplasia_by_rule(24.2, 24.0) and not B.is_hypoplasia_by_rule(24.4, 24.0)
    assert np.isnan(B.tcd_zscore(20.0, 13.0)) and np.isnan(B.cm_zscore(5.0, 37.0))


def test_hc_standard_matches_intergrowth_tables():
    """The published equation (Papageorghiou et al. 2014) evaluated by hand: median 172.5 mm at
    20 weeks, 278.4 mm at 30 weeks (the charts' 50th centiles); the 3rd centile sits at z = -1.88."""
    mu, sigma = B.hc_mu_sigma(np.array([20.0, 30.0]))
    np.testing.assert_allclose(mu, [172.5, 278.4], atol=0.3)
    np.testing.assert_allclose(B.hc_centile(mu, [20.0, 30.0]), 50.0, atol=1e-9)
    np.testing.assert_allclose(B.hc_centile(mu - 1.880794 * sigma, [20.0, 30.0]), 3.0, atol=0.01)


def test_hc_outside_its_ga_range_is_nan_not_extrapolated():
    assert np.isnan(B.hc_zscore(100.0, 13.9)) and np.isnan(B.hc_centile(400.0, 40.5))
    assert np.isfinite(B.hc_centile(100.0, 14.0))


def test_ga_from_hc_inverts_the_median():
    ga = np.array([15.0, 22.5, 38.0])
    np.testing.assert_allclose(B.ga_from_hc(B.hc_mean_mm(ga)), ga, atol=0.01)
    assert np.isnan(B.ga_from_hc(40.0))
