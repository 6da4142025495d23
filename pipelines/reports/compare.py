"""`cbh compare`: the reviewer report of MLflow runs side by side.

One self-contained HTML file (figures inline as data URIs, inline CSS, no script, no network)
and a Markdown twin, both from the jinja2 templates in `templates/`: metrics with their
intervals, only the parameters that differ, ROC curves overlaid, reliability diagrams,
confusion matrices, subgroup metrics, data and code versions, and the promotion history.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from pipelines.evaluation import figures as plots
from pipelines.registry.tracking import EXPERIMENT
from pipelines.reports.tables import Table, render

# (label, metric, interval low, interval high): 95% intervals resampling patients
METRICS = (("AUC", "test_auc", "test_auc_ci_low", "test_auc_ci_high"),
           ("Sensitivity", "test_sensitivity", "test_sensitivity_ci_low", "test_sensitivity_ci_high"),
           ("Specificity", "test_specificity", "test_specificity_ci_low", "test_specificity_ci_high"),
           ("Balanced accuracy", "test_balanced_accuracy", None, None), ("Accuracy", "test_accuracy", None, None),
           ("Brier score", "test_brier", None, None), ("Calibration error (ECE)", "test_ece", None, None),
           ("Dice cerebellum", "test_dice_cerebellum", None, None),
           ("Dice cisterna magna", "test_dice_cisterna", None, None),
           ("TCD abs. error (mm)", "test_tcd_mae_mm", None, None), ("CM abs. error (mm)", "test_cm_mae_mm", None, None),
           ("Cerebellum outside the skull (share, cleared)", "test_cerebellum_outside_head", None, None),
           ("Biometry rule AUC (same masks)", "test_biometry_rule_auc", None, None),
           ("Operating threshold", "val_threshold", None, None), ("Test images", "test_n", None, None),
           ("Test patients (the bootstrap's unit)", "test_patients", None, None))
# the fetal-head localiser's test figures (its own test subjects: pipelines/training/head.py)
HEAD_METRICS = (("Dice", "test_dice_mean", 3), ("HC abs. error, mean (mm)", "test_hc_mae_mean", 2),
                ("HC abs. error, median (mm)", "test_hc_mae_median", 2),
                ("HC abs. error, 90th pct. (mm)", "test_hc_mae_p90", 2), ("HC bias (mm)", "test_hc_bias_mean", 2),
                ("Frames refused (share)", "test_refused_share", 3), ("Test frames", "test_n", 0),
                ("Training time (s)", "train_seconds", 0))
LINEAGE = (("model", "model.kind"), ("git commit", "git.commit"), ("git dirty", "git.dirty"),
           ("dataset md5", "data.dataset_md5"), ("frozen test md5", "data.frozen_test_md5"),
           ("de-identified data (DVC)", "data.deid_md5"), ("data in dvc.lock", "data.dataset_in_dvc"),
           ("data contract", "data.validation"), ("torch", "pkg.torch"), ("mlflow", "pkg.mlflow"))


def _runs(run_ids: list[str]) -> list[Run]:
    client = MlflowClient()
    if run_ids:
        return [client.get_run(r) for r in run_ids]
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        raise FileNotFoundError("no MLflow experiment yet: train a model first")
    latest: dict[str, Run] = {}      # the latest run of each model: the ablation table
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=500):
        latest.setdefault(run.data.tags.get("model.kind", run.info.run_id), run)
    return list(latest.values())


def _artifact(run_id: str, path: str) -> str | None:
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")
    except Exception:  # boundary: an older run without this artifact
        return None


def _table(run_id: str, name: str) -> pd.DataFrame | None:
    from pipelines.registry.paired import run_table

    return run_table(run_id, name)


def _label(run: Run) -> str:
    return f"{run.data.tags.get('mlflow.runName', 'run')} {run.info.run_id[:8]}"


def _figures(runs: list[Run]) -> dict[str, str]:
    """ROC overlaid, reliability overlaid, one confusion matrix per run (base64 PNGs)."""
    rocs, rels, out = [], [], {}
    for run in runs:
        if (roc := _table(run.info.run_id, "roc")) is not None:
            rocs.append((f"{_label(run)} (AUC {run.data.metrics.get('test_auc', float('nan')):.3f})", roc))
        if (rel := _table(run.info.run_id, "reliability")) is not None and len(rel):
            rels.append((_label(run), rel))
    out["roc"] = plots.png_base64(plots.roc_figure(rocs, "ROC, frozen test set"))
    out["reliability"] = plots.png_base64(plots.reliability_figure(rels, "Reliability, frozen test set"))
    for run in runs:
        if (pred := _table(run.info.run_id, "test_predictions")) is not None:
            out[f"confusion {_label(run)}"] = plots.png_base64(plots.confusion_figure(pred, _label(run)))
    return out


def _metric_rows(runs: list[Run]) -> list[tuple[str, list[str]]]:
    rows = []
    for label, key, lo, hi in METRICS:
        cells = []
        for run in runs:
            m = run.data.metrics
            if key not in m:
                cells.append("-")
            elif key in ("test_n", "test_patients"):
                cells.append(f"{m[key]:.0f}")
            elif lo and lo in m and hi in m:
                # a run evaluated before intervals were drawn over patients says so
                unit = "" if "test_patients" in m else " (images)"
                cells.append(f"{m[key]:.3f} [{m[lo]:.3f}-{m[hi]:.3f}]{unit}")
            else:
                cells.append(f"{m[key]:.3f}")
        rows.append((label, cells))
    return rows


def _subgroups(runs: list[Run]) -> Table:
    head = ["run", "group", "value", "n", "positives", "AUC", "sensitivity", "specificity", "Dice cerebellum",
            "Dice cisterna", "TCD error (mm)"]
    body = []
    for run in runs:
        raw = _artifact(run.info.run_id, "summary.json")
        for g in (json.loads(raw).get("subgroups", []) if raw else []):   # runs before Dice per subgroup: "-"
            body.append([_label(run), g["group"], str(g["value"]), str(g["n"]), str(g["n_positive"])]
                        + [("-" if v is None or v != v else f"{v:.3f}") for v in (
                            g.get("auc"), g.get("sensitivity"), g.get("specificity"), g.get("dice_cerebellum"),
                            g.get("dice_cisterna"), g.get("tcd_mae_mm"))])
    return Table(head, body)


def _history(audit: Path | None, limit: int = 20) -> Table:
    from pipelines.registry.promote import history

    head = ["time (UTC)", "model", "action", "decision", "challenger", "champion after", "reason", "user"]
    recs = history(audit)[-limit:] if audit else []
    # a commission record names the version it set a site's threshold on, and moves no alias; a
    # record without a model name is the diagnosis model's (the trail held only it at first); a
    # decision still pending or abandoned says so
    def decision(r: dict) -> str:
        return r["decision"] + ("" if r.get("status", "final") in ("final", "confirmed") else f" ({r['status']})")

    return Table(head, [[r["time"], r.get("model") or ("-" if r["action"] == "repair" else "cerebellar-hypoplasia"),
                         r["action"], decision(r),
                         str(r["challenger"] or "-"), str(r["champion"] or "-"), r["reason"], r["user"]]
                        for r in reversed(recs)])


def _head_runs(model_name: str = "fetal-head") -> Table:
    """The fetal-head localiser: its latest run and its champion's (one column when the same), with
    the ellipse settings chosen on validation and the gate's decision."""
    from pipelines.registry.head import EXPERIMENT as HEAD_EXPERIMENT

    client = MlflowClient()
    exp = mlflow.get_experiment_by_name(HEAD_EXPERIMENT)
    if exp is None:
        return Table(["", "none"], [])
    runs: list[tuple[str, Run]] = []
    latest = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    if latest:
        runs.append(("latest", latest[0]))
    try:
        champ = client.get_model_version_by_alias(model_name, "champion")
        if not runs or champ.run_id != runs[0][1].info.run_id:
            runs.append((f"champion (v{champ.version})", client.get_run(champ.run_id)))
        else:
            runs[0] = (f"latest = champion (v{champ.version})", runs[0][1])
    except Exception:  # boundary: no champion yet (MlflowException)
        pass
    rows = [[label, *(f"{r.data.metrics[key]:.{digits}f}" if key in r.data.metrics else "-" for _, r in runs)]
            for label, key, digits in HEAD_METRICS]
    for label, tag in (("Ellipse fit, flip, threshold, crop pass", None), ("Gate", "promotion.reason")):
        cells = []
        for _, r in runs:
            t = r.data.tags
            cells.append(f"{t.get('head.method', '-')}, tta={t.get('head.tta', '-')}, {t.get('head.level', '-')}, "
                         f"refine={t.get('head.refine', '-')}"
                         if tag is None else _gate_reason(client, model_name, r.info.run_id))
        rows.append([label, *cells])
    return Table(["", *(f"{label} {r.info.run_id[:8]}" for label, r in runs)], rows)


def _gate_reason(client: MlflowClient, model_name: str, run_id: str) -> str:
    for mv in client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'"):
        return f"{mv.tags.get('promotion.decision', '-')}: {mv.tags.get('promotion.reason', '-')}"
    return "-"


def _paired(runs: list[Run], frozen: Path | None, n_boot: int, seed: int) -> Table:
    """Each run against the first on the images both scored of the same frozen test set: the AUC
    difference with its interval and p-value from a bootstrap over patients
    (`pipelines.registry.paired`; images are the unit where the frozen test table is another
    version, and the row says so)."""
    from pipelines.registry.paired import paired, patients_of, run_table

    head = ["run", "against", "images", "unit", "AUC difference [95% interval]", "p (two-sided)"]
    if len(runs) < 2:
        return Table(head, [])
    ref = runs[0]
    ref_pred = run_table(ref.info.run_id, "test_predictions")
    test_md5 = ref.data.tags.get("data.frozen_test_md5")
    patients = patients_of(frozen, test_md5)
    rows = []
    for run in runs[1:]:
        cells = [_label(run), _label(ref)]
        other = run_table(run.info.run_id, "test_predictions")
        if not test_md5 or run.data.tags.get("data.frozen_test_md5") != test_md5 or ref_pred is None \
                or other is None:
            rows.append(cells + ["-", "-", "not comparable: another frozen test set, or no test predictions", "-"])
            continue
        r = paired(ref_pred, other, patients, n_boot, seed)
        rows.append(cells + [str(r.images), f"{r.units} patients" if r.unit == "patients" else "images",
                             r.interval(),
                             "-" if r.p_value != r.p_value else
                             f"< {r.p_value:.3g}" if r.p_value * r.n_boot <= 1 else f"{r.p_value:.3f}"])
    return Table(head, rows)


def compare_runs(run_ids: list[str], out: Path, audit: Path | None = None, frozen: Path | None = None,
                 bootstrap: int = 500, seed: int = 0) -> tuple[Path, Path]:
    """Write compare.html and compare.md for the runs (the latest of each model if none); their
    paths. `frozen` (the workspace's frozen test table) lets the paired comparison resample
    patients; `bootstrap` draws with `seed` (params.yaml's evaluate.bootstrap, train.seed)."""
    runs = _runs(run_ids)
    if not runs:
        raise FileNotFoundError("no runs to compare")
    heads = [_label(r) for r in runs]
    lineage = [[name, *(str(r.data.tags.get(key, "-"))[:12] if "md5" in key or "commit" in key
                        else str(r.data.tags.get(key, "-")) for r in runs)] for name, key in LINEAGE]
    # model_uri names the run itself: it always differs and says nothing about the training
    keys = sorted({k for r in runs for k in r.data.params} - {"model_uri"})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    context = {
        "n_runs": len(runs),
        "same_test": len({r.data.tags.get("data.frozen_test_md5") for r in runs}) == 1,
        "metrics": Table(["metric", *heads], [[n, *v] for n, v in _metric_rows(runs)]),
        "lineage": Table(["", *heads], lineage),
        "params": Table(["parameter", *heads], [[k, *(str(r.data.params.get(k, "-")) for r in runs)]
                                                for k in differing]),
        "n_params": len(keys),
        "subgroups": _subgroups(runs),
        "paired": _paired(runs, frozen, bootstrap, seed),
        "history": _history(audit),
        "head": _head_runs(),
        "figures": _figures(runs),
    }
    out.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out / "compare.md", out / "compare.html"
    md_path.write_text(render("compare.md.j2", **context), encoding="utf-8")
    html_path.write_text(render("compare.html.j2", **context), encoding="utf-8")
    return html_path, md_path


def attach_to_run(run_id: str, *files: Path) -> None:
    """Log the report files to an MLflow run (under `report/`)."""
    client = MlflowClient()
    for f in files:
        client.log_artifact(run_id, str(f), "report")

