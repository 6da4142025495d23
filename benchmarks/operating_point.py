"""Which rule sets the operating threshold: the workspace's trained model scored on its
validation split, each rule of `metrics.OPERATING_POINTS` choosing a threshold there, and the
sensitivity and specificity each threshold gives on the frozen test split (95% intervals,
patients resampled).

Run in a workspace where the train stage has run (`make demo`, or a held-out-site workspace of
docs/results.md):

    .venv/bin/python benchmarks/operating_point.py          # the model in data/model

The test split is scored here: use it where the question is which rule transfers to a scanner
never seen in training (split.test_site), the comparison the rule is chosen by. Prints one
JSON line per rule and a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.stages import _prepared, _quiet_lightning
from pipelines.config import load_params
from pipelines.evaluation import metrics as ev
from pipelines.serving.inference import Predictor
from pipelines.training.train import split_scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value")
    a = p.parse_args()
    root = Path(".")
    params = load_params(root / "params.yaml", a.sets)
    _quiet_lightning()
    data = _prepared(params, root)
    predictor = Predictor.load(root / params.paths.model_dir)
    y_val, p_val = split_scores(predictor, data, "val")
    y_te, p_te = split_scores(predictor, data, "test")
    patients = data.frame["patient_pseudo"].to_numpy()[data.subset("test")]
    target = params.evaluate.sensitivity_target
    rows = []
    for rule, choose in ev.OPERATING_POINTS.items():
        thr = choose(y_val, p_val, target)
        val_sens, val_spec = ev.sensitivity_specificity(y_val, p_val, thr)
        sens, spec = ev.sensitivity_specificity(y_te, p_te, thr)
        ci = ev.patient_bootstrap(y_te, p_te, patients, thr, params.evaluate.bootstrap, params.train.seed)
        row = {"rule": rule, "model": predictor.cfg.model, "threshold": round(thr, 4),
               "val_sensitivity": round(val_sens, 3), "val_specificity": round(val_spec, 3),
               "test_sensitivity": round(sens, 3), "test_specificity": round(spec, 3),
               "test_sensitivity_ci": [round(v, 3) for v in ci["sensitivity"]],
               "test_specificity_ci": [round(v, 3) for v in ci["specificity"]],
               "test_auc": round(ev.auc(y_te, p_te), 4), "val_images": int(y_val.size), "test_images": int(y_te.size)}
        rows.append(row)
        print(json.dumps(row))
    print("\n| rule | threshold | validation sens / spec | test sensitivity [95%] | test specificity [95%] |")
    print("|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["test_sensitivity_ci"]
        slo, shi = r["test_specificity_ci"]
        print(f"| `{r['rule']}` | {r['threshold']:.3f} | {r['val_sensitivity']:.2f} / {r['val_specificity']:.2f} | "
              f"{r['test_sensitivity']:.2f} [{lo:.2f}-{hi:.2f}] | {r['test_specificity']:.2f} [{slo:.2f}-{shi:.2f}] |")
    print(f"\n{predictor.cfg.model}: test AUC {rows[0]['test_auc']:.3f} on {rows[0]['test_images']} images; "
          f"validation {rows[0]['val_images']} images, sensitivity target {target}")


if __name__ == "__main__":
    main()
