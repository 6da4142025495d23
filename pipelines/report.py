"""`cbh compare`: a reviewer report of MLflow runs side by side (one HTML file + Markdown)."""

from __future__ import annotations

import html
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from pipelines.tracking import EXPERIMENT

KEY_METRICS = ("test_auc", "test_auc_ci_low", "test_auc_ci_high", "test_sensitivity", "test_specificity",
               "test_balanced_accuracy", "test_brier", "test_dice_cerebellum", "test_dice_cisterna",
               "test_tcd_mae_mm", "test_cm_mae_mm", "test_biometry_rule_auc")
KEY_TAGS = ("model.kind", "git.commit", "git.dirty", "data.dataset_md5", "data.frozen_test_md5")


def _runs(run_ids: list[str]) -> list:
    client = MlflowClient()
    if run_ids:
        return [client.get_run(r) for r in run_ids]
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        raise FileNotFoundError("no MLflow experiment yet: train a model first")
    latest: dict[str, object] = {}      # the latest run of each model: the ablation table
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=200):
        latest.setdefault(run.data.tags.get("model.kind", run.info.run_id), run)
    return list(latest.values())


def compare_runs(run_ids: list[str], out: Path) -> tuple[Path, Path]:
    runs = _runs(run_ids)
    if not runs:
        raise FileNotFoundError("no runs to compare")
    heads = [f"{r.data.tags.get('mlflow.runName', '')} {r.info.run_id[:8]}" for r in runs]
    rows: list[tuple[str, list[str]]] = []
    for m in KEY_METRICS:
        rows.append((m, [f"{r.data.metrics[m]:.3f}" if m in r.data.metrics else "-" for r in runs]))
    for t in KEY_TAGS:
        short = t.startswith(("git.commit", "data."))        # hashes: the first 12 characters identify
        rows.append((t, [str(r.data.tags.get(t, "-"))[: 12 if short else None] for r in runs]))
    keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    for k in differing:
        rows.append((f"param {k}", [str(r.data.params.get(k, "-")) for r in runs]))
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Run comparison", "", "| | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    md += [f"| {name} | " + " | ".join(vals) + " |" for name, vals in rows]
    md += ["", f"Parameters identical across runs: {len(keys) - len(differing)}; differing: {len(differing)}."]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
    body = "".join("<tr><th>" + html.escape(n) + "</th>" + "".join(f"<td>{html.escape(v)}</td>" for v in vals)
                   + "</tr>" for n, vals in rows)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>cbh run comparison</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}"
            "</style></head><body><h1>Run comparison</h1><p>Test metrics on the frozen test set; "
            "rows below the metrics show lineage and the parameters that differ.</p>"
            f"<table><tr><th></th>{cells}</tr>{body}</table></body></html>")
    (out / "compare.html").write_text(page)
    return out / "compare.html", out / "compare.md"
