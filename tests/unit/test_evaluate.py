"""Evaluation helpers: operating point, overlap, calibration."""

import numpy as np
import pytest

from pipelines.evaluation.metrics import (
    binary_metrics,
    dice_per_image,
    expected_calibration_error,
    margin_threshold,
    mean_abs_error,
    mean_error,
    operating_threshold,
    subgroup_metrics,
)


def test_operating_threshold_reaches_the_target_on_its_own_data():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(40), np.zeros(60)].astype(int)
    p = np.r_[rng.beta(5, 2, 40), rng.beta(2, 5, 60)]
    thr = operating_threshold(y, p, 0.95)
    assert binary_metrics(y, p, thr)["sensitivity"] >= 0.95
    assert operating_threshold(np.zeros(5, int), np.linspace(0, 1, 5), 0.95) == 0.5


def test_margin_threshold_sits_in_the_middle_of_the_gap_and_keeps_validation_calls():
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(30), np.zeros(70)].astype(int)
    # a confident model: positives near 1, negatives near 0, a wide gap between them
    p = 1 / (1 + np.exp(-np.r_[rng.normal(7, 0.5, 30), rng.normal(-6, 0.5, 70)]))
    upper, thr = operating_threshold(y, p, 0.95), margin_threshold(y, p, 0.95)
    assert upper > 0.99 and 0.1 < thr < 0.9                  # the middle, not the positives' edge
    assert abs(np.log(thr / (1 - thr)) - 0.5) < 1.0          # about halfway between -6 and +7 (logit 0.5)
    got, sensitivity_only = binary_metrics(y, p, thr), binary_metrics(y, p, upper)
    assert got["sensitivity"] == 1.0 and got["specificity"] == sensitivity_only["specificity"] == 1.0
    # overlapping classes: no gap, the sensitivity rule's threshold
    p_overlap = np.r_[rng.beta(5, 2, 30), rng.beta(2, 5, 70)]
    assert margin_threshold(y, p_overlap, 0.95) == operating_threshold(y, p_overlap, 0.95)
    # no negatives: the same
    assert margin_threshold(np.ones(5, int), p[:5], 0.95) == operating_threshold(np.ones(5, int), p[:5], 0.95)


def test_dice_per_image():
    a = np.zeros((2, 4, 4), np.uint8)
    b = np.zeros((2, 4, 4), np.uint8)
    a[0, :2] = 1
    b[0, :1] = 1
    d = dice_per_image(a, b, 1)
    assert d[0] == pytest.approx(2 * 4 / (8 + 4)) and np.isnan(d[1])


def test_calibration_error_of_a_calibrated_and_a_bad_model():
    rng = np.random.default_rng(1)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.02
    assert expected_calibration_error(y, np.full_like(p, 0.99)) > 0.4


def test_subgroups_report_each_value():
    y = np.array([0, 1, 0, 1])
    p = np.array([0.1, 0.9, 0.2, 0.8])
    rows = subgroup_metrics(y, p, 0.5, {"site": np.array(["a", "a", "b", "b"])})
    assert [(r["value"], r["n"], r["auc"]) for r in rows] == [("a", 2, 1.0), ("b", 2, 1.0)]


def test_subgroups_average_per_image_values_where_known():
    """Dice and TCD error per site: NaN (no annotated mask) is left out, `_mae_mm` keys average
    absolute values, others keep the sign (a bias)."""
    y, p = np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])
    error = np.array([1.0, -3.0, np.nan, np.nan])
    rows = subgroup_metrics(y, p, 0.5, {"site": np.array(["a", "a", "b", "b"])},
                            {"dice_cerebellum": np.array([0.8, np.nan, 0.6, 0.7]),
                             "tcd_mae_mm": error, "tcd_bias_mm": error})
    a, b = rows
    assert (a["dice_cerebellum"], a["tcd_mae_mm"], a["tcd_bias_mm"]) == (0.8, 2.0, -1.0)
    assert b["dice_cerebellum"] == pytest.approx(0.65) and np.isnan(b["tcd_mae_mm"])


def test_bias_keeps_the_sign_the_absolute_error_drops():
    truth = np.array([40.0, 42.0, 44.0, np.nan])
    wide = truth + np.array([1.0, 2.0, 3.0, 0.0])
    assert mean_error(wide, truth) == pytest.approx(2.0) and mean_error(truth - 1.5, truth) == pytest.approx(-1.5)
    mixed = truth + np.array([2.0, -2.0, 0.0, 0.0])
    assert mean_error(mixed, truth) == pytest.approx(0.0) and mean_abs_error(mixed, truth) == pytest.approx(4 / 3)
    assert np.isnan(mean_error(np.array([np.nan]), np.array([1.0])))


def test_rank_auc_is_sklearns_auc_ties_included():
    """The bootstrap's AUC (ranks) equals roc_auc_score, on tied and untied scores alike."""
    from sklearn.metrics import roc_auc_score

    from pipelines.evaluation import metrics as ev

    rng = np.random.default_rng(3)
    for n, levels in ((40, None), (200, 5), (7, 2)):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        p = rng.random(n) if levels is None else rng.integers(0, levels, n) / levels
        assert ev.rank_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert ev.rank_auc(np.array([0, 1, 0, 1]), np.array([0.9, 0.1, 0.8, 0.2])) == 0.0


def test_intervals_resample_patients_not_images():
    """Ten images per patient are one patient's evidence, not ten: resampling images would
    narrow the AUC interval as if the test set were ten times larger. Sensitivity and
    specificity get their own intervals, around their point estimates."""
    from pipelines.evaluation import metrics as ev

    rng = np.random.default_rng(3)
    n_pat, per = 30, 10
    y_pat = np.arange(n_pat) % 2
    score_pat = y_pat * 0.6 + rng.normal(0, 0.45, n_pat)            # one score per patient, repeated
    y, p = np.repeat(y_pat, per), np.repeat(score_pat, per)
    patients = np.repeat([f"p{i}" for i in range(n_pat)], per)
    got = ev.patient_bootstrap(y, p, patients, 0.3, 500, seed=1)
    image_lo, image_hi = ev.auc_ci(y, p, 500, seed=1)
    lo, hi = got["auc"]
    assert lo <= ev.auc(y, p) <= hi
    assert (hi - lo) > 2.0 * (image_hi - image_lo)                     # sqrt(10) wider, give or take
    sens, spec = ev.sensitivity_specificity(y, p, 0.3)
    assert got["sensitivity"][0] <= sens <= got["sensitivity"][1] and got["sensitivity"][1] > got["sensitivity"][0]
    assert got["specificity"][0] <= spec <= got["specificity"][1]
    assert ev.patient_bootstrap(y, p, patients, 0.3, 500, seed=1) == got       # seeded: the same numbers


def test_patient_draws_do_not_depend_on_what_patients_are_called():
    """Pseudonyms change with the key; the rows' order does not (it follows pixel digests). The
    same rows under other names, sorting in another order, give the same intervals."""
    from pipelines.evaluation import metrics as ev

    rng = np.random.default_rng(8)
    n_pat, per = 40, 2
    y = np.repeat(np.arange(n_pat) % 2, per)
    p_ref = y * 0.5 + rng.normal(0, 0.4, len(y))
    p_other = y * 0.6 + rng.normal(0, 0.4, len(y))
    names = np.repeat([f"a{i:02d}" for i in range(n_pat)], per)
    renamed = np.repeat([f"z{(n_pat - i) * 7 % 97:02d}" for i in range(n_pat)], per)     # another sort order
    assert list(np.unique(renamed, return_index=True)[1]) != list(np.unique(names, return_index=True)[1])
    assert ev.patient_bootstrap(y, p_ref, names, 0.3, 300, seed=4) == ev.patient_bootstrap(y, p_ref, renamed, 0.3,
                                                                                          300, seed=4)
    assert ev.paired_auc_difference(y, p_ref, p_other, names, 300, seed=4) == ev.paired_auc_difference(
        y, p_ref, p_other, renamed, 300, seed=4)


def test_paired_difference_keeps_the_pairing_and_the_patients():
    """The same images under two models: a model against itself differs by exactly 0 (p = 1); a
    clearly better one differs with an interval above 0; patients, not images, are drawn."""
    from pipelines.evaluation import metrics as ev

    rng = np.random.default_rng(5)
    n_pat, per = 60, 3
    y = np.repeat(np.arange(n_pat) % 2, per)
    patients = np.repeat(np.arange(n_pat), per)
    weak = y * 0.3 + rng.normal(0, 0.5, len(y))
    strong = y * 1.5 + rng.normal(0, 0.5, len(y))
    same = ev.paired_auc_difference(y, weak, weak, patients, 300, seed=2)
    assert same["difference"] == 0 and same["ci_low"] == same["ci_high"] == 0 and same["p_value"] == 1.0
    better = ev.paired_auc_difference(y, weak, strong, patients, 300, seed=2)
    assert better["difference"] == pytest.approx(ev.auc(y, strong) - ev.auc(y, weak))
    assert 0 < better["ci_low"] < better["difference"] < better["ci_high"] and better["p_value"] < 0.01
    worse = ev.paired_auc_difference(y, strong, weak, patients, 300, seed=2)
    assert worse["ci_high"] < 0 and worse["difference"] == pytest.approx(-better["difference"])
    # patients are the unit: with each patient's images identical, treating images as patients
    # would narrow the interval as if there were three times as many
    w_pat, s_pat = np.repeat(weak[::per], per), np.repeat(strong[::per], per)
    by_patient = ev.paired_auc_difference(y, w_pat, s_pat, patients, 300, seed=2)
    by_image = ev.paired_auc_difference(y, w_pat, s_pat, np.arange(len(y)), 300, seed=2)
    assert (by_patient["ci_high"] - by_patient["ci_low"]) > 1.3 * (by_image["ci_high"] - by_image["ci_low"])
    # one patient per class: nothing to resample, so no interval and no p-value (never p = 0)
    tiny = ev.paired_auc_difference(np.array([0, 0, 1, 1]), np.array([.1, .2, .3, .4]), np.array([.4, .3, .2, .1]),
                                    np.array([0, 0, 1, 1]), 100, seed=0)
    assert np.isnan(tiny["ci_low"]) and np.isnan(tiny["p_value"]) and tiny["n_boot"] == 0
    assert all(np.isnan(v) for pair in ev.patient_bootstrap(np.array([0, 1]), np.array([.2, .8]), np.array([0, 1]),
                                                            0.5, 100, seed=0).values() for v in pair)
