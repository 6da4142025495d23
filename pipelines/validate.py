"""Data-quality gate over the de-identified scan manifest, with Great Expectations 1.x.

`validate_manifest` reads the manifest Parquet, runs the `scan_manifest` suite through a
file-mode GX context (the suite JSON under `gx/expectations/` is the versioned data
contract), adds the dataset-level gates GX has no standard expectation for, builds Data
Docs and rewrites them to render without network. Severity lives in each expectation's
`meta["severity"]`; only critical failures make the report fail.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd

SUITE_NAME = "scan_manifest"
DATASOURCE_NAME = "cbh_manifest"
ASSET_NAME = "scan_manifest"
BATCH_DEFINITION_NAME = "whole_manifest"
LABELS = ("normal", "hypoplasia")
MAX_EXAMPLES = 5
CRITICAL, WARNING = "critical", "warning"

# The reviewed de-identified schema (`annotator` is a keyed staff pseudonym). The column
# check is an allow-list on purpose: a deny-list of identifier names (patient_name,
# PatientID, birth_date, accession, institution...) always misses a spelling, while any
# column outside this list has not been reviewed for PHI. It is written out here, not
# imported from pipelines.ingest, because it is the contract ingest is checked against:
# adding a column means a steward review and an edit here.
MANIFEST_COLUMNS = (
    "image_id",
    "patient_pseudo",
    "exam_date",
    "ga_weeks",
    "label",
    "tcd_mm",
    "cm_mm",
    "site",
    "annotator",
    "frame",
    "deid_path",
    "mask_path",
    "rows",
    "cols",
    "spacing_row_mm",
    "spacing_col_mm",
    "modality",
    "photometric",
    "source_format",
    "pixel_sha256",
    "cohort",
    "source_row",
)
TCD_Z_COLUMN = "tcd_z"

TcdZ = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ValidateParams:
    """Thresholds of the manifest suite (the `validate:` section of params.yaml)."""

    min_per_class: int = 10  # dataset-level gate: minimum rows per label
    ga_min: float = 14.0
    ga_max: float = 42.0
    spacing_min_mm: float = 0.05
    spacing_max_mm: float = 0.5
    cm_max_mm: float = 25.0
    tcd_max_abs_z: float = 5.0


@dataclass(frozen=True)
class ExpectationResult:
    """Outcome of one expectation; examples are image_id pseudonyms only, at most 5."""

    suite: str
    expectation: str
    column: str | None
    severity: str  # 'critical' | 'warning'
    success: bool
    unexpected_count: int
    unexpected_examples: list[str]


@dataclass(frozen=True)
class ValidationReport:
    """All expectation outcomes of one run and where its Data Docs are."""

    success: bool  # False iff any critical expectation failed
    results: list[ExpectationResult]
    data_docs_index: Path | None

    def to_json(self) -> dict[str, Any]:
        """The `cbh validate --json` document."""
        return {"success": self.success, "results": [asdict(r) for r in self.results]}

    def failures_table(self) -> str:
        """A short fixed-width text table of the failed expectations."""
        failed = [r for r in self.results if not r.success]
        if not failed:
            return "All expectations passed."
        header = ("severity", "suite", "expectation", "column", "unexpected", "examples")
        rows = [header] + [
            (
                r.severity,
                r.suite,
                r.expectation,
                r.column or "-",
                str(r.unexpected_count),
                ", ".join(r.unexpected_examples) or "-",
            )
            for r in failed
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def validate_manifest(
    manifest_path: Path, gx_root: Path, params: ValidateParams, tcd_z: TcdZ | None = None
) -> ValidationReport:
    """Validate the manifest with the `scan_manifest` suite and build offline Data Docs.

    `gx_root` holds the file-mode GX project (`gx_root/gx/`). `tcd_z(tcd_mm, ga_weeks)`,
    when given, adds a `tcd_z` column whose magnitude is checked.
    """
    df = _load_manifest(manifest_path, tcd_z)
    context = _file_context(gx_root)
    suite_result = _run_checkpoint(context, df, build_expectations(params, tcd_z is not None))
    results = [_to_result(evr) for evr in suite_result.results]
    results.append(_label_count_gate(df, params))
    index = _build_offline_docs(context)
    success = not any(r.severity == CRITICAL and not r.success for r in results)
    return ValidationReport(success=success, results=results, data_docs_index=index)


def build_expectations(params: ValidateParams, with_tcd_z: bool) -> list[Any]:
    """The `scan_manifest` suite; each expectation's meta names its severity and the risk."""
    import great_expectations.expectations as gxe

    def exp(cls: type, severity: str, risk: str, **kwargs: Any) -> Any:
        return cls(severity=severity, meta={"severity": severity, "risk": risk}, **kwargs)

    def not_null(column: str, risk: str) -> Any:
        return exp(gxe.ExpectColumnValuesToNotBeNull, CRITICAL, risk, column=column)

    def between(column: str, lo: float, hi: float, risk: str) -> Any:
        return exp(
            gxe.ExpectColumnValuesToBeBetween,
            CRITICAL,
            risk,
            column=column,
            min_value=lo,
            max_value=hi,
        )

    columns = [*MANIFEST_COLUMNS, *([TCD_Z_COLUMN] if with_tcd_z else [])]
    sp_lo, sp_hi = params.spacing_min_mm, params.spacing_max_mm
    suite = [
        exp(
            gxe.ExpectTableColumnsToMatchSet,
            CRITICAL,
            "PHI: an unreviewed column (patient_name, PatientID, birth_date...); schema drift",
            column_set=columns,
            exact_match=True,
        ),
        not_null("image_id", "rows that cannot be traced, joined or split"),
        exp(
            gxe.ExpectColumnValuesToBeUnique,
            CRITICAL,
            "one frame counted twice: leakage between splits, inflated metrics",
            column="image_id",
        ),
        not_null("patient_pseudo", "patient-level split impossible: same fetus in train and test"),
        not_null("ga_weeks", "biometry z-scores and GA-conditioned model inputs undefined"),
        between(
            "ga_weeks",
            params.ga_min,
            params.ga_max,
            "GA typo or unit error (days, months) outside the reference range",
        ),
        not_null("deid_path", "row points at no de-identified image"),
        not_null("modality", "unknown modality"),
        exp(
            gxe.ExpectColumnValuesToBeInSet,
            CRITICAL,
            "non-ultrasound image in an ultrasound model",
            column="modality",
            value_set=["US"],
        ),
        not_null("label", "unlabelled rows in labelled training data"),
        exp(
            gxe.ExpectColumnValuesToBeInSet,
            CRITICAL,
            "misspelt or unknown class silently treated as a third label",
            column="label",
            value_set=list(LABELS),
        ),
        exp(
            gxe.ExpectColumnDistinctValuesToContainSet,
            CRITICAL,
            "a class absent: classifier cannot learn or be evaluated",
            column="label",
            value_set=list(LABELS),
        ),
        # Null spacing would pass the range checks below; ingest must quarantine it instead.
        not_null("spacing_row_mm", "mm measurements (TCD, CM) meaningless without spacing"),
        not_null("spacing_col_mm", "mm measurements (TCD, CM) meaningless without spacing"),
        between(
            "spacing_row_mm",
            sp_lo,
            sp_hi,
            "spacing in cm or a wrong DICOM tag: every mm measure scaled wrong",
        ),
        between(
            "spacing_col_mm",
            sp_lo,
            sp_hi,
            "spacing in cm or a wrong DICOM tag: every mm measure scaled wrong",
        ),
        between(
            "cm_mm", 0.0, params.cm_max_mm, "implausible cisterna magna depth (unit error, typo)"
        ),
        exp(
            gxe.ExpectColumnValuesToBeUnique,
            WARNING,
            "same pixels twice (re-export, copy): weighs double, may leak across splits",
            column="pixel_sha256",
        ),
    ]
    if with_tcd_z:
        bound = params.tcd_max_abs_z
        suite.append(
            between(TCD_Z_COLUMN, -bound, bound, "implausible TCD for GA: measurement or GA error")
        )
    return suite


def _load_manifest(manifest_path: Path, tcd_z: TcdZ | None) -> pd.DataFrame:
    """Read the manifest; add the `tcd_z` column when a z-score function is given."""
    if not manifest_path.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest_path}")
    df = pd.read_parquet(manifest_path)
    if tcd_z is not None:
        # A missing input column gives an all-NaN tcd_z; the schema expectation reports it.
        tcd = _float_column(df, "tcd_mm")
        ga = _float_column(df, "ga_weeks")
        df[TCD_Z_COLUMN] = np.asarray(tcd_z(tcd, ga), dtype=float)
    return df


def _float_column(df: pd.DataFrame, column: str) -> np.ndarray:
    if column not in df.columns:
        return np.full(len(df), np.nan)
    return pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _file_context(gx_root: Path) -> Any:
    """Open (or create) the file-mode GX project with progress bars off."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    gx_root.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="file", project_root_dir=gx_root)
    bars = context.variables.progress_bars  # a dict once reloaded from the yml
    globally = bars.get("globally") if isinstance(bars, dict) else getattr(bars, "globally", None)
    if globally is not False:
        # tqdm bars per metric batch flood CLI and Prefect logs.
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        context.variables.save()
    return context


def _run_checkpoint(context: Any, df: pd.DataFrame, expectations: list[Any]) -> Any:
    """Run the registered checkpoint on `df`; return its suite validation result."""
    checkpoint = _register_checkpoint(context, expectations)
    result = checkpoint.run(batch_parameters={"dataframe": df})
    return next(iter(result.run_results.values()))


def _register_checkpoint(context: Any, expectations: list[Any]) -> Any:
    """Add or update data source, suite, validation definition and checkpoint."""
    import great_expectations as gx

    batch_definition = _whole_dataframe_batch(context)
    suite = gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations)
    _keep_expectation_ids(context, suite)
    suite = context.suites.add_or_update(suite)
    validation = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=SUITE_NAME, data=batch_definition, suite=suite)
    )
    return context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=SUITE_NAME,
            validation_definitions=[validation],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")],
            # Failed rows are identified by their image_id pseudonym, never by position.
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": ["image_id"],
            },
        )
    )


def _whole_dataframe_batch(context: Any) -> Any:
    """Get-or-create the pandas data source, dataframe asset and whole-frame batch.

    Not `add_or_update_pandas(name)`: on a rerun it drops the asset and mints new ids,
    which rewrites great_expectations.yml and the validation definition (noise in git).
    """
    try:
        source = context.data_sources.get(DATASOURCE_NAME)
    except KeyError:
        source = context.data_sources.add_pandas(name=DATASOURCE_NAME)
    try:
        # `get_asset`, not `source.assets`: an asset loaded from the yml points at a stale
        # copy of its source with no context (MissingDataContextError at run time, GX
        # 1.24.1); get_asset re-binds it.
        asset = source.get_asset(ASSET_NAME)
    except LookupError:
        asset = source.add_dataframe_asset(name=ASSET_NAME)
    try:
        return asset.get_batch_definition(BATCH_DEFINITION_NAME)
    except KeyError:
        return asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION_NAME)


def _keep_expectation_ids(context: Any, suite: Any) -> None:
    """Give unchanged expectations their stored ids so the versioned suite JSON is stable.

    GX 1.24 `suites.add_or_update` means to do this, but compares expectations including
    their (still empty) ids, so every run would rewrite every id.
    """
    from great_expectations.exceptions import DataContextError

    try:
        stored = context.suites.get(name=suite.name).expectations
    except DataContextError:
        return

    def content(expectation: Any) -> dict[str, Any]:
        return {**expectation.configuration.to_json_dict(), "id": None}

    for expectation in suite.expectations:
        match = next((old for old in stored if content(old) == content(expectation)), None)
        if match is not None:
            expectation.id = match.id


def _to_result(evr: Any) -> ExpectationResult:
    """Map one GX ExpectationValidationResult to an ExpectationResult."""
    config = evr.expectation_config
    result = evr.result or {}
    mismatched = (result.get("details") or {}).get("mismatched") or {}
    if "unexpected_count" in result:
        count = int(result["unexpected_count"])
    elif "missing_count" in result:
        count = int(result["missing_count"])
    else:  # table-level column set: number of unexpected plus missing columns
        count = sum(len(v) for v in mismatched.values())
    return ExpectationResult(
        suite=SUITE_NAME,
        expectation=config.type,
        column=config.kwargs.get("column"),
        severity=str((config.meta or {}).get("severity", CRITICAL)),
        success=bool(evr.success),
        unexpected_count=count,
        unexpected_examples=_image_id_examples(result),
    )


def _image_id_examples(result: dict[str, Any]) -> list[str]:
    """Up to five distinct image_id pseudonyms of failed rows; nothing else ever."""
    rows = result.get("partial_unexpected_index_list") or result.get("unexpected_index_list")
    examples: list[str] = []
    for row in rows or []:
        # Each row also carries the failing column's value: keep only the pseudonym.
        image_id = row.get("image_id") if isinstance(row, dict) else None
        if isinstance(image_id, str) and image_id not in examples:
            examples.append(image_id)
        if len(examples) == MAX_EXAMPLES:
            break
    return examples


def _label_count_gate(df: pd.DataFrame, params: ValidateParams) -> ExpectationResult:
    """Dataset gate (no standard GX expectation): each label has >= min_per_class rows."""
    counts = df["label"].value_counts() if "label" in df.columns else pd.Series(dtype=int)
    short = [label for label in LABELS if int(counts.get(label, 0)) < params.min_per_class]
    return ExpectationResult(
        suite="dataset_gates",
        expectation="expect_each_label_to_have_at_least_min_per_class_rows",
        column="label",
        severity=CRITICAL,
        success=not short,
        unexpected_count=len(short),
        unexpected_examples=[],
    )


def _build_offline_docs(context: Any) -> Path | None:
    """Build Data Docs, make every page render offline, return the local index.html."""
    urls = context.build_data_docs()
    url = urls.get("local_site") or next(iter(urls.values()), None)
    if url is None:
        return None
    index = Path(url2pathname(urlparse(url).path))
    store = Path(context.root_directory) / "uncommitted" / "validations"
    _make_docs_offline(index.parent, store)
    return index


# Data Docs pages load Bootstrap, jQuery, Font Awesome and Vega from public CDNs, and embed
# a GX logo <img> whose URL carries this project's dataContextId. This workspace must work
# air-gapped and must not tell a third party when a steward opens a report, so every
# remote <link>, <script>, <img> and CSS url() is removed. The inline scripts go too: all
# of them drive the removed jQuery. A small inline stylesheet keeps the tables readable,
# and the index, whose tables are otherwise built by that JavaScript, gets a static list.
_OFFLINE_STYLE = """<style id="cbh-offline">
body{font-family:system-ui,sans-serif;margin:1rem 2rem;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #ccc;padding:.2rem .5rem;
text-align:left;vertical-align:top}thead th{background:#f2f2f2}
.modal,.sr-only,.ge-walkthrough-modal{display:none}.text-danger{color:#b3261e}
.text-success{color:#1b7f3b}.fa-check-circle::before,.fa-check::before{content:"\\2714"}
.fa-times::before,.fa-times-circle::before{content:"\\2718"}.fa-question-circle::before{content:"?"}
</style>"""
_REMOTE = [
    re.compile(r"<script\b[^>]*>.*?</script\s*>", re.IGNORECASE | re.DOTALL),
    re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']?(?:https?:)?//[^>]*>", re.IGNORECASE),
    re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//[^>]*>", re.IGNORECASE),
]
_REMOTE_CSS_URL = re.compile(r"url\(\s*[\"']?(?:https?:)?//[^)]*\)", re.IGNORECASE)


def _make_docs_offline(site_dir: Path, validations_store: Path) -> None:
    """Strip network loads from every Data Docs page; add a static run list to the index."""
    for page in site_dir.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        if 'id="cbh-offline"' in text:
            continue
        for pattern in _REMOTE:
            text = pattern.sub("", text)
        text = _REMOTE_CSS_URL.sub("none", text)
        text = text.replace("</head>", _OFFLINE_STYLE + "\n</head>", 1)
        if page == site_dir / "index.html":
            text = re.sub(
                r"(<body\b[^>]*>)",
                lambda m: m.group(1) + _static_index(site_dir, validations_store),
                text,
                count=1,
            )
        page.write_text(text, encoding="utf-8")


def _static_index(site_dir: Path, validations_store: Path) -> str:
    """HTML list of validation runs (newest first) and suites, without JavaScript."""
    runs = sorted((site_dir / "validations").rglob("*.html"), key=lambda p: p.parts[-2])
    rows = []
    for page in reversed(runs):
        rel = page.relative_to(site_dir / "validations")
        cells = (
            rel.parts[-2],
            rel.parts[0],
            _run_status(validations_store / rel.with_suffix(".json")),
        )
        tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
        href = html.escape(page.relative_to(site_dir).as_posix())
        rows.append(f'<tr>{tds}<td><a href="{href}">results</a></td></tr>')
    suites = [
        f'<li><a href="{html.escape(p.relative_to(site_dir).as_posix())}">{html.escape(p.stem)}</a>'
        for p in sorted((site_dir / "expectations").rglob("*.html"))
    ]
    head = "".join(f"<th>{h}</th>" for h in ("run time (UTC)", "suite", "status", "page"))
    return (
        f'<section class="cbh-offline-index"><h2>Validation runs</h2><table><thead><tr>{head}'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f"<h2>Expectation suites</h2><ul>{''.join(suites)}</ul></section>"
    )


def _run_status(stored: Path) -> str:
    """'failed' (a critical expectation failed), 'warnings' or 'passed', from the stored run.

    GX's own `success` is False on any failure; here warnings do not fail a run.
    """
    if not stored.is_file():
        return "?"
    failed = [r for r in json.loads(stored.read_text())["results"] if not r["success"]]
    meta = [(r.get("expectation_config") or {}).get("meta") or {} for r in failed]
    if any(m.get("severity", CRITICAL) == CRITICAL for m in meta):
        return "failed"
    return "warnings" if failed else "passed"
