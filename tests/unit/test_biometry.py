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


def test_empty_mask_gives_nan():
    assert all(math.isnan(v) for v in B.measure_mask(np.zeros((10, 10), np.uint8), 0.2))


def test_ramanujan_perimeter_of_a_circle():
    assert B.ellipse_perimeter(10, 10) == pytest.approx(2 * math.pi * 10)

