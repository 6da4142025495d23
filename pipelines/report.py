"""`cbh compare`: the reviewer report of MLflow runs side by side.

One self-contained HTML file (figures inline as data URIs, no script, no network) and a
Markdown twin: metrics with their intervals, only the parameters that differ, ROC curves
overlaid, reliability diagrams, confusion matrices, subgroup metrics, data and code
versions, and the promotion history.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from pipelines.tables import html_table, md_table  # noqa: E402
from pipelines.tracking import EXPERIMENT  # noqa: E402

# (label, metric, interval low, interval high)
METRICS = (("AUC", "test_auc", "test_auc_ci_low", "test_auc_ci_high"),
           ("Sensitivity", "test_sensitivity", None, None), ("Specificity", "test_specificity", None, None),
           ("Balanced accuracy", "test_balanced_accuracy", None, None), ("Accuracy", "test_accuracy", None, None),
           ("Brier score", "test_brier", None, None), ("Calibration error (ECE)", "test_ece", None, None),
           ("Dice cerebellum", "test_dice_cerebellum", None, None),
           ("Dice cisterna magna", "test_dice_cisterna", None, None),
           ("TCD abs. error (mm)", "test_tcd_mae_mm", None, None), ("CM abs. error (mm)", "test_cm_mae_mm", None, None),
           ("Cerebellum outside the skull (share, cleared)", "test_cerebellum_outside_head", None, None),
           ("Biometry rule AUC (same masks)", "test_biometry_rule_auc", None, None),
           ("Operating threshold", "val_threshold", None, None), ("Test images", "test_n", None, None))
LINEAGE = (("model", "model.kind"), ("git commit", "git.commit"), ("git dirty", "git.dirty"),
           ("dataset md5", "data.dataset_md5"), ("frozen test md5", "data.frozen_test_md5"),
           ("de-identified data (DVC)", "data.deid_md5"), ("data in dvc.lock", "data.dataset_in_dvc"),
           ("data contract", "data.validation"), ("torch", "pkg.torch"), ("mlflow", "pkg.mlflow"))


def _runs(run_ids: list[str]) -> list:
    client = MlflowClient()
    if run_ids:
        return [client.get_run(r) for r in run_ids]
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        raise FileNotFoundError("no MLflow experiment yet: train a model first")
    latest: dict[str, object] = {}      # the latest run of each model: the ablation table
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=500):
        latest.setdefault(run.data.tags.get("model.kind", run.info.run_id), run)
    return list(latest.values())


def _artifact(run_id: str, path: str) -> str | None:
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")
    except Exception:  # boundary: an older run without this artifact
        return None


def _table(run_id: str, name: str) -> pd.DataFrame | None:
    text = _artifact(run_id, f"evaluation/{name}.csv")
    return pd.read_csv(io.StringIO(text)) if text else None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _label(run) -> str:
    return f"{run.data.tags.get('mlflow.runName', 'run')} {run.info.run_id[:8]}"


def _figures(runs: list) -> dict[str, str]:
    """ROC overlaid, reliability overlaid, one confusion matrix per run (base64 PNGs)."""
    out: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    for run in runs:
        roc = _table(run.info.run_id, "roc")
        if roc is not None:
            auc = run.data.metrics.get("test_auc", float("nan"))
            ax.plot(roc["fpr"], roc["tpr"], lw=2, label=f"{_label(run)} (AUC {auc:.3f})")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, frozen test set", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    out["roc"] = _png(fig)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    for run in runs:
        rel = _table(run.info.run_id, "reliability")
        if rel is not None and len(rel):
            ax.plot(rel["predicted"], rel["observed"], "o-", label=_label(run))
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title="Reliability, frozen test set",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    out["reliability"] = _png(fig)
    classes = ["normal", "hypoplasia"]
    for run in runs:
        pred = _table(run.info.run_id, "test_predictions")
        if pred is None:
            continue
        cm = np.array([[int(((pred["actual"] == a) & (pred["predicted"] == b)).sum()) for b in classes]
                       for a in classes])
        fig, ax = plt.subplots(figsize=(3.4, 3.0))
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=12,
                    color="white" if v > cm.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=classes, yticklabels=classes, xlabel="predicted",
               ylabel="truth", title=_label(run))
        fig.tight_layout()
        out[f"confusion {_label(run)}"] = _png(fig)
    return out


def _metric_rows(runs: list) -> list[tuple[str, list[str]]]:
    rows = []
    for label, key, lo, hi in METRICS:
        cells = []
        for run in runs:
            m = run.data.metrics
            if key not in m:
                cells.append("-")
            elif key == "test_n":
                cells.append(f"{m[key]:.0f}")
            elif lo and lo in m and hi in m:
                cells.append(f"{m[key]:.3f} [{m[lo]:.3f}-{m[hi]:.3f}]")
            else:
                cells.append(f"{m[key]:.3f}")
        rows.append((label, cells))
    return rows


def _subgroups(runs: list) -> tuple[list[str], list[list[str]]]:
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
    return head, body


def _history(audit: Path | None, limit: int = 20) -> tuple[list[str], list[list[str]]]:
    from pipelines.promote import history

    head = ["time (UTC)", "action", "decision", "challenger", "champion after", "reason", "user"]
    recs = history(audit)[-limit:] if audit else []
    # a commission record names the version it set a site's threshold on, and moves no alias
    return head, [[r["time"], r["action"], r["decision"], str(r["challenger"] or "-"), str(r["champion"] or "-"),
                   r["reason"], r["user"]] for r in reversed(recs)]


def compare_runs(run_ids: list[str], out: Path, audit: Path | None = None) -> tuple[Path, Path]:
    runs = _runs(run_ids)
    if not runs:
        raise FileNotFoundError("no runs to compare")
    heads = [_label(r) for r in runs]
    metrics = _metric_rows(runs)
    lineage = [(name, [str(r.data.tags.get(key, "-"))[:12] if "md5" in key or "commit" in key
                       else str(r.data.tags.get(key, "-")) for r in runs]) for name, key in LINEAGE]
    # model_uri names the run itself: it always differs and says nothing about the training
    keys = sorted({k for r in runs for k in r.data.params} - {"model_uri"})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    params = [(k, [str(r.data.params.get(k, "-")) for r in runs]) for k in differing]
    sub_head, sub_body = _subgroups(runs)
    hist_head, hist_body = _history(audit)
    figures = _figures(runs)
    out.mkdir(parents=True, exist_ok=True)
    same_test = len({r.data.tags.get("data.frozen_test_md5") for r in runs}) == 1

    md = ["# cbh run comparison", "",
          f"{len(runs)} runs. Test metrics on the frozen test set"
          + (" (the same version for every run)." if same_test else " (WARNING: not the same test set version)."),
          "", "## Metrics (95% bootstrap interval for the AUC)", ""]
    md += md_table(["metric", *heads], [[n, *v] for n, v in metrics])
    md += ["", "## Data and code", ""] + md_table(["", *heads], [[n, *v] for n, v in lineage])
    md += ["", f"## Parameters that differ ({len(differing)} of {len(keys)})", ""]
    md += md_table(["parameter", *heads], [[n, *v] for n, v in params]) if params else ["None: same parameters."]
    md += ["", "## Subgroups (frozen test set)", ""] + (md_table(sub_head, sub_body) if sub_body else ["None."])
    md += ["", "## Promotion history (latest first)", ""] + (md_table(hist_head, hist_body) if hist_body
                                                             else ["No promotion yet."])
    md += ["", "Figures (ROC overlaid, reliability, confusion matrices) are in compare.html."]
    md_path = out / "compare.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")

    imgs = "".join(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'>"
                   f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, b64 in figures.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cbh run comparison</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}}
table{{border-collapse:collapse;margin:0.5em 0 1.5em}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right;font-size:14px}}
th{{background:#f4f4f4}} td:first-child{{text-align:left;font-weight:600}}
table.wide td{{text-align:left;font-weight:normal}}
figure{{display:inline-block;margin:0.5em}} figcaption{{text-align:center;font-size:12px}}
.warn{{color:#a00;font-weight:600}}
</style></head><body>
<h1>cbh run comparison</h1>
<p>{len(runs)} runs; test metrics on the frozen test set{
        "" if same_test else " <span class='warn'>(not the same test set version: do not compare)</span>"}.
Research use only, not for clinical use.</p>
<h2 id="metrics">Metrics (95% bootstrap interval for the AUC)</h2>
{html_table(["metric", *heads], [[n, *v] for n, v in metrics], "metrics")}
<h2>Curves and confusion matrices</h2>
{imgs}
<h2>Data and code</h2>
{html_table(["", *heads], [[n, *v] for n, v in lineage])}
<h2>Parameters that differ ({len(differing)} of {len(keys)})</h2>
{html_table(["parameter", *heads], [[n, *v] for n, v in params]) if params else "<p>None: same parameters.</p>"}
<h2>Subgroups (frozen test set)</h2>
{html_table(sub_head, sub_body, "wide") if sub_body else "<p>None.</p>"}
<h2>Promotion history (latest first)</h2>
{html_table(hist_head, hist_body, "wide") if hist_body else "<p>No promotion yet.</p>"}
</body></html>
"""
    html_path = out / "compare.html"
    html_path.write_text(page, encoding="utf-8")
    return html_path, md_path


def attach_to_run(run_id: str, *files: Path) -> None:
    """Log the report files to an MLflow run (under `report/`)."""
    client = MlflowClient()
    for f in files:
        client.log_artifact(run_id, str(f), "report")

