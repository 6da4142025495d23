"""Evaluation: discrimination with a bootstrap interval, the operating point chosen on the
validation set, calibration, segmentation overlap and biometry error."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.special import ndtri
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score


def operating_threshold(y: NDArray, p: NDArray, sensitivity_target: float) -> float:
    """Threshold meant to reach the sensitivity target, chosen on validation data.

    With a handful of validation positives the empirical quantile of their scores is a noisy
    order statistic, so the more conservative (lower) of it and a normal approximation of
    the positives' logits at the same quantile is taken: sensitivity is the priority.
    0.5 if there are no positives.
    """
    pos = p[y == 1]
    return _class_edge(pos, sensitivity_target, positives=True) if pos.size else 0.5


def _class_edge(scores: NDArray, target: float, positives: bool) -> float:
    """The score that `target` of one class's scores stay on their side of (at or above it for
    positives, at or below for negatives): the more conservative (nearer the other class) of
    the empirical order statistic and a normal approximation of the logits (from 3 scores)."""
    ordered = np.sort(scores)[::-1] if positives else np.sort(scores)
    k = int(np.ceil(target * ordered.size)) - 1
    empirical = float(ordered[min(max(k, 0), ordered.size - 1)])
    if ordered.size < 3:
        return empirical
    logit = _logit(ordered)
    z = float(ndtri(target))
    if positives:
        return min(empirical, _sigmoid(logit.mean() - z * logit.std(ddof=1)))
    return max(empirical, _sigmoid(logit.mean() + z * logit.std(ddof=1)))


def _logit(p: NDArray | float) -> NDArray:
    q = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    return np.log(q / (1 - q))


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def margin_threshold(y: NDArray, p: NDArray, sensitivity_target: float) -> float:
    """The `operating_threshold` moved down to the middle (on the logit scale) of the gap between
    the classes on validation, where there is one.

    The gap runs from the negatives' score that `sensitivity_target` of them stay below (the
    higher of the empirical and the normal-logit quantile, mirroring `operating_threshold`) up
    to the positives' threshold. Inside it the validation split cannot tell thresholds apart,
    and a confident model's positives sit near 1, so the sensitivity quantile alone lands at the
    gap's top edge: a scanner whose positives score a little lower then loses them. The middle
    keeps at least the validation sensitivity, keeps the validation specificity near the same
    target (negatives above their quantile may cross it), and leaves both classes the same
    room. Without negatives, or with overlapping classes, it is `operating_threshold`.
    """
    upper = operating_threshold(y, p, sensitivity_target)
    neg = p[y == 0]
    if neg.size == 0 or not (y == 1).any():
        return upper
    lower = _class_edge(neg, sensitivity_target, positives=False)
    if lower >= upper:
        return upper
    return _sigmoid(float(_logit(lower) + _logit(upper)) / 2)


OPERATING_POINTS = {"sensitivity": operating_threshold, "margin": margin_threshold}


def auc(y: NDArray, p: NDArray) -> float:
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def rank_auc(y: NDArray, p: NDArray) -> float:
    """The AUC as the Mann-Whitney statistic of the scores' ranks (ties count half), equal to
    `roc_auc_score` on 0/1 labels with both classes present, without its input checks: a
    bootstrap computes thousands, and those checks were most of its time."""
    pos = np.asarray(y) == 1
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    return float((rankdata(p)[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_ci(y: NDArray, p: NDArray, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of the AUC resampling images (too narrow when patients
    have several images: `patient_bootstrap` is the one reported)."""
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) == 2:
            stats.append(rank_auc(y[idx], p[idx]))
    if not stats:
        return float("nan"), float("nan")
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


MIN_PATIENTS_PER_CLASS = 2


def _patient_groups(patients: NDArray) -> tuple[NDArray[np.intp], list[NDArray[np.intp]]]:
    """Each row's patient index and each patient's rows, patients numbered in the order they
    first appear: the draw then follows the rows' order (key-free: the dataset's rows are ordered
    by pixel digest), not the sorted names, which change with the pseudonymisation key."""
    _, first, inverse = np.unique(np.asarray(patients).astype(str), return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.intp)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    index = rank[inverse.reshape(-1)]
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(len(first) + 1))
    return index, [order[bounds[k]:bounds[k + 1]] for k in range(len(first))]


def _both_classes(y: NDArray, inverse: NDArray) -> bool:
    """At least MIN_PATIENTS_PER_CLASS patients with a positive and as many with a negative
    image: below that a bootstrap over patients has nothing to vary and would print a
    zero-width interval (or p = 0) that looks like certainty."""
    pos = len(np.unique(inverse[np.asarray(y) == 1]))
    neg = len(np.unique(inverse[np.asarray(y) == 0]))
    return pos >= MIN_PATIENTS_PER_CLASS and neg >= MIN_PATIENTS_PER_CLASS


def patient_bootstrap(y: NDArray, p: NDArray, patients: NDArray, threshold: float, n_boot: int,
                      seed: int) -> dict[str, tuple[float, float]]:
    """95% percentile bootstrap intervals of the AUC, and of sensitivity and specificity at
    `threshold`, resampling patients with all their images: images of one patient are not
    independent (the same anatomy, several exams), and resampling images treats them as if they
    were, which narrows every interval. Keys: auc, sensitivity, specificity."""
    inverse, members = _patient_groups(patients)
    n_patients = len(members)
    if not _both_classes(y, inverse):
        return {key: (float("nan"), float("nan")) for key in ("auc", "sensitivity", "specificity")}
    called = p >= threshold
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"auc": [], "sensitivity": [], "specificity": []}
    for _ in range(n_boot if n_patients else 0):
        idx = np.concatenate([members[k] for k in rng.integers(0, n_patients, n_patients)])
        yy, pos = y[idx], y[idx] == 1
        if pos.any() and (~pos).any():
            draws["auc"].append(rank_auc(yy, p[idx]))
        if pos.any():
            draws["sensitivity"].append(float(called[idx][pos].mean()))
        if (~pos).any():
            draws["specificity"].append(float(1.0 - called[idx][~pos].mean()))
    out = {}
    for key, values in draws.items():
        lo, hi = np.percentile(values, [2.5, 97.5]) if values else (float("nan"), float("nan"))
        out[key] = (float(lo), float(hi))
    return out


def paired_auc_difference(y: NDArray, p_ref: NDArray, p_other: NDArray, patients: NDArray, n_boot: int,
                          seed: int) -> dict[str, float]:
    """AUC(other) - AUC(ref) on the same images, with a 95% percentile interval and a two-sided
    bootstrap p-value from resampling patients (both models scored on each draw, so the
    correlation between them is kept). Keys: difference, ci_low, ci_high, p_value (at least
    1/n_boot: a finite bootstrap cannot say less), n_boot (draws used). Fewer than two patients
    of either class: NaN interval and p."""
    inverse, members = _patient_groups(patients)
    n_patients = len(members)
    rng = np.random.default_rng(seed)
    diffs = []
    if not _both_classes(y, inverse):
        n_boot = 0                               # nothing to resample: no interval, no p-value
    for _ in range(n_boot if n_patients else 0):
        idx = np.concatenate([members[k] for k in rng.integers(0, n_patients, n_patients)])
        if len(np.unique(y[idx])) == 2:
            diffs.append(rank_auc(y[idx], p_other[idx]) - rank_auc(y[idx], p_ref[idx]))
    point = auc(y, p_other) - auc(y, p_ref)
    if not diffs:
        return {"difference": point, "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan"),
                "n_boot": 0.0}
    d = np.asarray(diffs)
    lo, hi = np.percentile(d, [2.5, 97.5])
    p_value = min(1.0, max(1.0 / len(d), 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0)))))
    return {"difference": point, "ci_low": float(lo), "ci_high": float(hi), "p_value": p_value,
            "n_boot": float(len(d))}


def sensitivity_specificity(y: NDArray, p: NDArray, threshold: float) -> tuple[float, float]:
    """At `threshold` (a score at or above it is called hypoplasia); NaN for a class absent."""
    pred = p >= threshold
    tp, tn = int(np.sum(pred & (y == 1))), int(np.sum(~pred & (y == 0)))
    pos, neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    return (tp / pos if pos else float("nan")), (tn / neg if neg else float("nan"))


def binary_metrics(y: NDArray, p: NDArray, threshold: float) -> dict[str, float]:
    pred = p >= threshold
    pos = int(np.sum(y == 1))
    sens, spec = sensitivity_specificity(y, p, threshold)
    return {"auc": auc(y, p), "sensitivity": sens, "specificity": spec,
            "accuracy": float(np.mean(pred == (y == 1))) if len(y) else float("nan"),
            "balanced_accuracy": (sens + spec) / 2, "brier": float(np.mean((p - y) ** 2)),
            "threshold": float(threshold), "n": float(len(y)), "n_positive": float(pos)}


def dice_per_image(pred: NDArray, truth: NDArray, cls: int) -> NDArray[np.float64]:
    """Dice of one class per image (N,H,W); NaN where the class is absent from both."""
    p, t = pred == cls, truth == cls
    inter = (p & t).sum(axis=(1, 2))
    total = p.sum(axis=(1, 2)) + t.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2 * inter / total, np.nan)


def mean_abs_error(a: NDArray, b: NDArray) -> float:
    d = np.abs(np.asarray(a, float) - np.asarray(b, float))
    return float(np.nanmean(d)) if np.any(np.isfinite(d)) else float("nan")


def mean_error(measured: NDArray, truth: NDArray) -> float:
    """Mean signed error (measured - truth), NaN-aware: the bias of a measurement."""
    d = np.asarray(measured, float) - np.asarray(truth, float)
    return float(np.nanmean(d)) if np.any(np.isfinite(d)) else float("nan")


GA_BANDS = ((0.0, 20.0, "<20w"), (20.0, 24.0, "20-24w"), (24.0, 28.0, "24-28w"), (28.0, 32.0, "28-32w"),
            (32.0, 99.0, ">=32w"))


def ga_band(ga_weeks: NDArray) -> NDArray:
    out = np.empty(len(ga_weeks), dtype=object)
    for lo, hi, name in GA_BANDS:
        out[(ga_weeks >= lo) & (ga_weeks < hi)] = name
    return out


def subgroup_metrics(y: NDArray, p: NDArray, threshold: float, groups: dict[str, NDArray],
                     per_image: dict[str, NDArray] | None = None) -> list[dict[str, object]]:
    """Metrics per subgroup (GA band, site...): a subgroup's AUC is NaN when it has one class.
    `per_image`: further per-image values (Dice, signed TCD error...), averaged over the
    subgroup's images where known; a key ending in `_mae_mm` averages the absolute values."""
    rows: list[dict[str, object]] = []
    for kind, values in groups.items():
        for value in sorted({str(v) for v in values}):
            idx = np.array([str(v) == value for v in values])
            m = binary_metrics(y[idx], p[idx], threshold)
            row = {"group": kind, "value": value, "n": int(idx.sum()), "n_positive": int(m["n_positive"]),
                   "auc": m["auc"], "sensitivity": m["sensitivity"], "specificity": m["specificity"]}
            for name, per in (per_image or {}).items():
                v = np.asarray(per, float)[idx]
                v = np.abs(v) if name.endswith("_mae_mm") else v
                row[name] = float(np.nanmean(v)) if np.any(np.isfinite(v)) else float("nan")
            rows.append(row)
    return rows


def reliability(y: NDArray, p: NDArray, bins: int = 10) -> tuple[NDArray, NDArray, NDArray]:
    """Mean predicted probability, observed frequency and count per probability bin."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    mean_p = np.array([p[which == b].mean() if np.any(which == b) else np.nan for b in range(bins)])
    freq = np.array([y[which == b].mean() if np.any(which == b) else np.nan for b in range(bins)])
    count = np.bincount(which, minlength=bins)
    return mean_p, freq, count


def expected_calibration_error(y: NDArray, p: NDArray, bins: int = 10) -> float:
    mean_p, freq, count = reliability(y, p, bins)
    ok = count > 0
    return float(np.sum(count[ok] * np.abs(mean_p[ok] - freq[ok])) / max(count.sum(), 1))
