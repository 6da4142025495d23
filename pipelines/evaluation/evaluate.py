"""Evaluation of a trained model on the frozen test set: metrics at the model's own operating
point, per-subgroup metrics, the curve tables DVC plots and the reviewer report read, and the
figures drawn from those tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from pipelines import biometry
from pipelines.config import Params
from pipelines.evaluation import figures as plots
from pipelines.evaluation import metrics as ev
from pipelines.imaging.crops import Prepared
from pipelines.serving.inference import Predictor, context_features


@dataclass
class Evaluation:
    metrics: dict[str, float]
    subgroups: list[dict[str, Any]]
    figures: dict[str, Any]
    tables: dict[str, pd.DataFrame]     # roc, reliability, test_predictions: DVC plots and the report


def evaluate_models(predictor: Predictor, data: Prepared, params: Params) -> Evaluation:
    """Metrics at the model's own operating point (chosen on validation during training) on the
    frozen test set, overall and per subgroup (GA band, site), and the figures and curve
    tables reviewers look at."""
    pred_labels, outside, soft = predictor.segment_measure(data.images, data.axis_ratio, data.mm_per_px)
    context = context_features(data.frame["ga_weeks"].to_numpy(), data.mm_per_px)
    prob = predictor.probability(data.images, pred_labels, context)
    y = (data.frame["label"] == "hypoplasia").to_numpy().astype(int)
    va, te = data.subset("val"), data.subset("test")
    thr = predictor.cfg.threshold
    metrics: dict[str, Any] = {}
    for name, idx in (("val", va), ("test", te)):
        for k, v in ev.binary_metrics(y[idx], prob[idx], thr).items():
            metrics[f"{name}_{k}"] = v
    # intervals by patient (the unit the test set is drawn in); the image-level AUC interval is
    # kept beside it so a reviewer sees how much resampling images would have narrowed it
    intervals = ev.patient_bootstrap(y[te], prob[te], data.frame["patient_pseudo"].to_numpy()[te], thr,
                                     params.evaluate.bootstrap, params.train.seed)
    for key, (lo, hi) in intervals.items():
        metrics[f"test_{key}_ci_low"], metrics[f"test_{key}_ci_high"] = lo, hi
    metrics["test_auc_image_ci_low"], metrics["test_auc_image_ci_high"] = ev.auc_ci(
        y[te], prob[te], params.evaluate.bootstrap, params.train.seed)
    metrics["test_patients"] = float(len(set(data.frame["patient_pseudo"].to_numpy()[te].tolist())))
    has_mask = data.labels[te].reshape(len(te), -1).max(1) > 0 if len(te) else np.zeros(0, bool)
    t_idx = te[has_mask]
    # per test image (NaN: no annotated mask), for the overall figures and for each subgroup
    dice: dict[str, np.ndarray] = {}
    for cls, key in ((1, "dice_cerebellum"), (2, "dice_cisterna")):
        dice[key] = np.full(len(te), np.nan)
        dice[key][has_mask] = ev.dice_per_image(pred_labels[t_idx], data.labels[t_idx], cls)
        metrics[f"test_{key}"] = float(np.nanmean(dice[key][has_mask])) if has_mask.any() else float("nan")
    meas = soft[te].reshape(-1, 2)          # from the probabilities, at a quarter of a pixel (as cbh predict)
    metrics["test_tcd_mae_mm"] = ev.mean_abs_error(meas[:, 0], data.frame["tcd_mm"].to_numpy()[te])
    metrics["test_cm_mae_mm"] = ev.mean_abs_error(meas[:, 1], data.frame["cm_mm"].to_numpy()[te])
    # signed: a scanner whose masks come out too wide or too narrow shows as a bias, not noise
    metrics["test_tcd_bias_mm"] = ev.mean_error(meas[:, 0], data.frame["tcd_mm"].to_numpy()[te])
    rule = biometry.tcd_zscore(meas[:, 0], data.frame["ga_weeks"].to_numpy()[te])
    metrics["test_biometry_rule_auc"] = ev.auc(y[te], -np.nan_to_num(rule, nan=0.0))
    metrics["test_ece"] = ev.expected_calibration_error(y[te], prob[te])
    # share of images whose predicted cerebellum left the skull (cleared by the anatomical prior)
    metrics["test_cerebellum_outside_head"] = float(outside[te].mean()) if len(te) else float("nan")
    metrics["excluded_unfittable"] = float(len(data.failed))
    test = data.frame.iloc[te]
    groups = {"ga_band": ev.ga_band(test["ga_weeks"].to_numpy()), "site": test["site"].fillna("unknown").to_numpy()}
    tcd_error = meas[:, 0] - data.frame["tcd_mm"].to_numpy(dtype=float)[te]
    subgroups = ev.subgroup_metrics(y[te], prob[te], thr, groups,
                                    {**dice, "tcd_mae_mm": tcd_error, "tcd_bias_mm": tcd_error})
    title = params.train.model
    tables: dict[str, pd.DataFrame] = {}
    if len(set(y[te].tolist())) == 2:
        fpr, tpr, cut = roc_curve(y[te], prob[te])
        tables["roc"] = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(cut, 1.0)})
    else:
        tables["roc"] = pd.DataFrame({"fpr": [0.0, 1.0], "tpr": [0.0, 1.0], "threshold": [1.0, 0.0]})
    mean_p, freq, count = ev.reliability(y[te], prob[te])
    ok = count > 0
    tables["reliability"] = pd.DataFrame({"bin": np.flatnonzero(ok), "predicted": mean_p[ok], "observed": freq[ok],
                                          "count": count[ok]})
    label = np.array(["normal", "hypoplasia"])
    tables["test_predictions"] = pd.DataFrame({
        "image_id": test["image_id"].to_numpy(), "actual": label[y[te]],
        "predicted": label[(prob[te] >= thr).astype(int)], "probability": np.round(prob[te], 6)})
    figures = {"roc": plots.roc_figure([("", tables["roc"])], f"{title}: test ROC"),
               "reliability": plots.reliability_figure([("", tables["reliability"])], f"{title}: calibration"),
               "confusion": plots.confusion_figure(tables["test_predictions"], f"{title}: test"),
               "overlays": plots.overlays(data.images[te], pred_labels[te])}
    return Evaluation({k: float(v) for k, v in metrics.items()}, subgroups, figures, tables)
