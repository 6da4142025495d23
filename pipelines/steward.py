"""The one-page steward summary of a data-contract run (HTML and Markdown).

It leads with the verdict, then counts per severity, then the quarantined rows with their
reason, then every failed expectation. Rows are named by cohort, source row (the line in
the hospital's annotations.csv, counted from the first data row) and image_id pseudonym;
no value from the data is ever shown. The HTML has no script and no remote resource.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from pipelines.tables import html_table, md_table
from pipelines.validate import CRITICAL, DATASET, ROW, WARNING, ValidationReport


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
    counts_head = ["severity", "scope", "expectations", "failed", "failing rows"]
    counts = _counts(report)
    q_head = ["cohort", "source row", "image_id", "reason code", "reason"]
    q_rows = [[str(q["cohort"]), str(q["source_row"]), str(q["image"]), q["reason_code"], q["reason"]]
              for q in report.quarantined]
    f_head = ["severity", "scope", "suite", "expectation", "column", "rows", "examples", "risk"]
    f_rows = [[r.severity, r.scope, r.suite, r.expectation, r.column or "-", str(r.unexpected_count),
               ", ".join(r.unexpected_examples) or "-", r.risk] for r in report.results if not r.success]
    extra = {name: (list(map(str, t.columns)), [[_fmt(v) for v in row] for row in t.itertuples(index=False)])
             for name, t in report.tables.items()}
    docs = report.data_docs_index

    md = [f"# {title}", "", f"**Verdict: {report.verdict()}**", "",
          f"{report.rows_checked} rows checked; {len(report.quarantined)} quarantined.", "",
          "## Expectations by severity", ""] + md_table(counts_head, counts)
    md += ["", "## Quarantined rows", ""] + (md_table(q_head, q_rows) if q_rows else ["None."])
    md += ["", "## Failed expectations", ""] + (md_table(f_head, f_rows) if f_rows else ["None."])
    for name, (head, rows) in extra.items():
        md += ["", f"## {name.capitalize()}", ""] + md_table(head, rows)
    md += ["", f"Data Docs: `{docs}`" if docs else ""]
    md_path = out_dir / "summary.md"
    md_path.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")

    colour = "#1b7f3b" if ok and not report.quarantined else ("#8a5a00" if ok else "#b3261e")
    sections = [f"<h2>Expectations by severity</h2>{html_table(counts_head, counts)}",
                "<h2>Quarantined rows</h2>" + (html_table(q_head, q_rows) if q_rows else "<p>None.</p>"),
                "<h2>Failed expectations</h2>" + (html_table(f_head, f_rows) if f_rows else "<p>None.</p>")]
    sections += [f"<h2>{html.escape(name.capitalize())}</h2>{html_table(head, rows)}"
                 for name, (head, rows) in extra.items()]
    link = f"<p>Data Docs: <a href='{html.escape(docs.as_uri())}'>{html.escape(str(docs))}</a></p>" if docs else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}}
.verdict{{font-size:1.4em;font-weight:700;color:#fff;background:{colour};padding:.6em 1em;border-radius:6px}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;
font-size:14px;vertical-align:top}}th{{background:#f2f2f2}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="verdict" id="verdict">{html.escape(report.verdict())}</p>
<p>{report.rows_checked} rows checked; {len(report.quarantined)} quarantined. Rows are named by cohort, source row
in the cohort's annotations.csv and image_id pseudonym only.</p>
{''.join(sections)}
{link}
</body></html>
"""
    html_path = out_dir / "summary.html"
    html_path.write_text(page, encoding="utf-8")
    return html_path, md_path


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.3f}"
    return str(v)


def quarantine_frame(report: ValidationReport) -> pd.DataFrame:
    """The contract's quarantine rows in the ingest quarantine table's columns."""
    cols = ["cohort", "source_row", "image", "reason_code", "reason"]
    return pd.DataFrame(report.quarantined, columns=cols)
