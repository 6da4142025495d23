"""The one-page steward summary of a data-contract run (HTML and Markdown).

It leads with the verdict, then counts per severity, then the quarantined rows with their
reason, then every failed expectation. Rows are named by cohort, source row (the line in
the hospital's annotations.csv, counted from the first data row) and image_id pseudonym;
no value from the data is ever shown. Both come from the jinja2 templates in `templates/`;
the HTML has no script and no remote resource.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipelines.contract.validate import CRITICAL, DATASET, ROW, WARNING, ValidationReport
from pipelines.reports.tables import Table, render


def _counts(report: ValidationReport) -> list[list[str]]:
    rows = []
    for severity in (CRITICAL, WARNING):
        for scope in (DATASET, ROW):
            chosen = [r for r in report.results if r.severity == severity and r.scope == scope]
            if chosen:
                failed = [r for r in chosen if not r.success]
                rows.append([severity, scope, str(len(chosen)), str(len(failed)),
                             str(sum(r.unexpected_count for r in failed))])
    return rows


def write_summary(report: ValidationReport, out_dir: Path, title: str) -> tuple[Path, Path]:
    """Write summary.html and summary.md into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = report.success
    docs = report.data_docs_index
    context = {
        "title": title,
        "verdict": report.verdict(),
        "colour": "#1b7f3b" if ok and not report.quarantined else ("#8a5a00" if ok else "#b3261e"),
        "rows_checked": report.rows_checked,
        "n_quarantined": len(report.quarantined),
        "counts": Table(["severity", "scope", "expectations", "failed", "failing rows"], _counts(report)),
        "quarantined": Table(["cohort", "source row", "image_id", "reason code", "reason"],
                             [[str(q["cohort"]), str(q["source_row"]), str(q["image"]), q["reason_code"], q["reason"]]
                              for q in report.quarantined]),
        "failed": Table(["severity", "scope", "suite", "expectation", "column", "rows", "examples", "risk"],
                        [[r.severity, r.scope, r.suite, r.expectation, r.column or "-", str(r.unexpected_count),
                          ", ".join(r.unexpected_examples) or "-", r.risk] for r in report.results if not r.success]),
        "extra": {name: Table(list(map(str, t.columns)), [[_fmt(v) for v in row] for row in t.itertuples(index=False)])
                  for name, t in report.tables.items()},
        "docs": str(docs) if docs else "",
        "docs_uri": docs.as_uri() if docs else "",
    }
    md_path, html_path = out_dir / "summary.md", out_dir / "summary.html"
    md_path.write_text(render("summary.md.j2", **context), encoding="utf-8")
    html_path.write_text(render("summary.html.j2", **context), encoding="utf-8")
    return html_path, md_path


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.3f}"
    return str(v)


def quarantine_frame(report: ValidationReport) -> pd.DataFrame:
    """The contract's quarantine rows in the ingest quarantine table's columns."""
    cols = ["cohort", "source_row", "image", "reason_code", "reason"]
    return pd.DataFrame(report.quarantined, columns=cols)
