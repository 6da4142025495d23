"""Commissioning a new scanner: how many labelled local patients does its operating point need?

The threshold chosen on validation data from the training sites does not transfer to a new
scanner (too low on one held-out site, too high on another). This script takes the test
predictions of a held-out-site run (`benchmarks/gpu_train.py run PACK --predictions FILE`),
and for k = 5, 10, 20, 40 patients of that site draws k at random many times (seeded), chooses
the threshold on their images with the project's own rule (`pipelines.evaluation.metrics.
operating_threshold`, the sensitivity target of params.yaml), and measures sensitivity and
specificity on the site's other patients. Not a test: an analysis, run by hand.

    .venv/bin/python benchmarks/commission.py FILE [FILE ...] [--draws 500]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import load_params
from pipelines.evaluation.metrics import operating_threshold, sensitivity_specificity


def commission(table: pd.DataFrame, sizes: tuple[int, ...], draws: int, target: float, seed: int,
               lower_only: bool = False) -> list[dict]:
    """Per k: the local threshold's sensitivity and specificity on the site's other patients.
    `lower_only`: the local scans may only lower the trained threshold, never raise it."""
    y = (table["actual"] == "hypoplasia").to_numpy().astype(int)
    p = table["probability"].to_numpy()
    patients = table["patient_pseudo"].to_numpy()
    ids = np.unique(patients)
    trained = float(table["threshold"].iloc[0])
    sens, spec = sensitivity_specificity(y, p, trained)
    out = [{"k": 0, "n_draws": 1, "sens_median": sens, "sens_p5": sens, "spec_median": spec, "spec_p5": spec,
            "share_sens_ge_0.90": float(sens >= 0.90)}]
    rng = np.random.default_rng(seed)
    for k in sizes:
        s_list, c_list = [], []
        for _ in range(draws):
            chosen = np.isin(patients, rng.choice(ids, size=k, replace=False))
            if y[chosen].sum() == 0 or y[~chosen].sum() == 0 or (y[~chosen] == 0).sum() == 0:
                continue                     # no positive to set a sensitivity on: this draw cannot commission
            thr = operating_threshold(y[chosen], p[chosen], target)
            if lower_only:
                thr = min(thr, trained)
            s, c = sensitivity_specificity(y[~chosen], p[~chosen], thr)
            s_list.append(s)
            c_list.append(c)
        s_arr, c_arr = np.array(s_list), np.array(c_list)
        out.append({"k": k, "n_draws": len(s_arr), "sens_median": float(np.median(s_arr)),
                    "sens_p5": float(np.percentile(s_arr, 5)), "spec_median": float(np.median(c_arr)),
                    "spec_p5": float(np.percentile(c_arr, 5)), "share_sens_ge_0.90": float((s_arr >= 0.90).mean())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictions", type=Path, nargs="+")
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20, 40])
    a = ap.parse_args()
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    target = params.evaluate.sensitivity_target
    print(f"sensitivity target {target}; k = local patients labelled for commissioning (0: the validation "
          f"threshold as trained); medians and 5th percentiles over {a.draws} draws (split.seed {params.split.seed})")
    for path in a.predictions:
        table = pd.read_parquet(path)
        site = ", ".join(sorted(table["site"].dropna().unique()))
        n_pat = table["patient_pseudo"].nunique()
        print(f"\n{path.name}: {site}, {len(table)} images of {n_pat} patients, "
              f"{(table['actual'] == 'hypoplasia').sum()} with hypoplasia")
        for lower_only in (False, True):
            print("  local threshold" + (", never above the trained one:" if lower_only else " alone:"))
            print("     k  draws  sensitivity median (p5)  specificity median (p5)  share with sensitivity >= 0.90")
            for r in commission(table, tuple(a.sizes), a.draws, target, params.split.seed, lower_only):
                print(f"  {r['k']:4d} {r['n_draws']:6d}  {r['sens_median']:10.3f} ({r['sens_p5']:.3f})"
                      f"       {r['spec_median']:10.3f} ({r['spec_p5']:.3f})       {r['share_sens_ge_0.90']:.2f}")


if __name__ == "__main__":
    main()
