"""The data contract, with Great Expectations 1.x: four suites, severities, row quarantine.

Suites (one per table, JSON under `expectations/gx/expectations/`, versioned in git):

- `scan_manifest`: the de-identified scans (modality, spacing, frame size, photometric
  interpretation, unique SOP instance and pixel content, no identifier column at all);
- `annotations`: label, GA, TCD plausible for GA (INTERGROWTH-21st z), CM depth, exam
  date (checked at ingest, before the shift), patient identity header vs CSV, one row per
  image and frame;
- `masks`: the file decodes, same size as the frame, classes in {0,1,2}, both structures,
  one connected cerebellum, cisterna magna behind it along the occipito-frontal axis,
  mask-derived TCD within a tolerance of `tcd_mm`;
- `split`: no patient in two splits, both classes in every split, the frozen test set
  unchanged, GA and site mix of each split against train (reported).

Row metrics GX cannot compute are columns made by pipelines/contract/rows.py. Each expectation's
`meta` names its `severity` (critical | warning) and `scope` (row | dataset). A failed
critical *row* expectation quarantines exactly the failing rows; the run still passes if
the dataset-level gates hold on the rest (cases per class). A failed critical *dataset*
expectation fails the run: the flow stops before training. Data Docs render without
network (GX plugins under `expectations/gx/plugins/`); `write_summary` gives stewards a
one-page verdict.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse
from urllib.request import url2pathname

import pandas as pd

from pipelines.config import ValidateSection
from pipelines.contract import rows as contract

SPLIT_SUITE = "split"
DATASOURCE_NAME = "cbh_manifest"
OFFLINE_DOCS_MODULE = "cbh_data_docs"        # expectations/gx/plugins/cbh_data_docs.py
LABELS = ("normal", "hypoplasia")
PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")
MAX_EXAMPLES = 5
# the diagnosis expectations skip head-only rows (HC18: a head annotated, no structures); a row
# with both (a synthetic scan, a fully annotated frame) is held to every expectation
HEAD_ONLY_EXCLUDED = 'head_mask_status != "ok" or mask_status != "none"'
CRITICAL, WARNING = "critical", "warning"
ROW, DATASET = "row", "dataset"

# The reviewed de-identified schema (`annotator` is a keyed staff pseudonym). The column
# check is an allow-list on purpose: a deny-list of identifier names (patient_name,
# PatientID, birth_date, accession, institution...) always misses a spelling, while any
# column outside this list has not been reviewed for PHI. It is written out here, not
# imported from pipelines.data.ingest, because it is the contract ingest is checked against:
# adding a column means a steward review and an edit here.
MANIFEST_COLUMNS = (
    "image_id", "patient_pseudo", "exam_date", "ga_weeks", "label", "tcd_mm", "cm_mm", "site",
    "annotator", "frame", "deid_path", "mask_path", "rows", "cols", "spacing_row_mm", "spacing_col_mm",
    "modality", "photometric", "source_format", "pixel_sha256", "cohort", "source_row",
    "exam_date_check", "patient_check", "mask_status", "head_mask_path", "head_mask_status", "hc_mm",
    "first_exam_period",
)


# Thresholds of the suites: the `validate:` section of params.yaml, one class for both.
ValidateParams = ValidateSection


@dataclass(frozen=True)
class ExpectationResult:
    """Outcome of one expectation; examples are image_id pseudonyms only, at most 5."""

    suite: str
    expectation: str
    column: str | None
    severity: str                     # critical | warning
    success: bool
    unexpected_count: int
    unexpected_examples: list[str]
    scope: str = DATASET              # row | dataset
    risk: str = ""
    failed_ids: tuple[str, ...] = field(default=(), repr=False)   # every failing image_id (quarantine)

    @property
    def code(self) -> str:
        """The reason code of a quarantined row: suite, expectation and column."""
        return f"{self.suite}.{self.expectation}" + (f".{self.column}" if self.column else "")


@dataclass(frozen=True)
class ValidationReport:
    """All expectation outcomes of one run, the rows it quarantined, and where Data Docs are."""

    success: bool                     # False iff a critical dataset-level expectation failed
    results: list[ExpectationResult]
    data_docs_index: Path | None
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    rows_checked: int = 0
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)   # extra tables for the summary
    seconds: dict[str, float] = field(default_factory=dict)          # row_metrics, great_expectations, data_docs

    def to_json(self) -> dict[str, Any]:
        """The `cbh validate --json` document."""
        keys = ("suite", "expectation", "column", "severity", "success", "unexpected_count", "unexpected_examples")
        return {"success": self.success,
                "results": [{k: v for k, v in asdict(r).items() if k in keys} for r in self.results]}

    def failures_table(self) -> str:
        """A short fixed-width text table of the failed expectations."""
        failed = [r for r in self.results if not r.success]
        if not failed:
            return "All expectations passed."
        header = ("severity", "scope", "suite", "expectation", "column", "rows", "examples")
        rows = [header] + [(r.severity, r.scope, r.suite, r.expectation, r.column or "-", str(r.unexpected_count),
                            ", ".join(r.unexpected_examples) or "-") for r in failed]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def verdict(self) -> str:
        crit = [r for r in self.results if not r.success and r.severity == CRITICAL and r.scope == DATASET]
        warn = [r for r in self.results if not r.success and r.severity == WARNING]
        if crit:
            return f"NOT FIT FOR TRAINING: {len(crit)} critical failure(s) of the whole dataset"
        if self.quarantined:
            return (f"FIT FOR TRAINING after quarantine: {len(self.quarantined)} of {self.rows_checked} rows "
                    f"quarantined, {len(warn)} warning(s)")
        return f"FIT FOR TRAINING: every critical expectation passed, {len(warn)} warning(s)"


def _exp(cls: type, severity: str, scope: str, risk: str, **kwargs: Any) -> Any:
    return cls(severity=severity, meta={"severity": severity, "scope": scope, "risk": risk}, **kwargs)


def manifest_suites(params: ValidateParams) -> dict[str, list[Any]]:
    """The `scan_manifest`, `annotations` and `masks` suites over the manifest + row metrics."""
    import great_expectations.expectations as gxe

    def between(col: str, lo: float | None, hi: float | None, risk: str, sev: str = CRITICAL,
                scope: str = ROW) -> Any:
        return _exp(gxe.ExpectColumnValuesToBeBetween, sev, scope, risk, column=col, min_value=lo, max_value=hi)

    def in_set(col: str, values: list[Any], risk: str, sev: str = CRITICAL, scope: str = ROW) -> Any:
        return _exp(gxe.ExpectColumnValuesToBeInSet, sev, scope, risk, column=col, value_set=values)

    def not_null(col: str, risk: str, scope: str = ROW) -> Any:
        return _exp(gxe.ExpectColumnValuesToNotBeNull, CRITICAL, scope, risk, column=col)

    sp_lo, sp_hi, f_lo, f_hi = params.spacing_min_mm, params.spacing_max_mm, params.frame_min_px, params.frame_max_px
    tol = params.tcd_mask_tolerance_mm
    scan = [
        _exp(gxe.ExpectTableColumnsToMatchSet, CRITICAL, DATASET,
             "PHI: an unreviewed column (patient_name, PatientID, birth_date...); schema drift",
             column_set=[*MANIFEST_COLUMNS, *contract.DERIVED], exact_match=True),
        not_null("image_id", "rows that cannot be traced, joined or split", DATASET),
        in_set("modality", ["US"], "non-ultrasound image in an ultrasound model"),
        not_null("spacing_row_mm", "mm measurements (TCD, CM) meaningless without spacing"),
        not_null("spacing_col_mm", "mm measurements (TCD, CM) meaningless without spacing"),
        between("spacing_row_mm", sp_lo, sp_hi, "spacing in cm or a wrong DICOM tag: every mm measure scaled wrong"),
        between("spacing_col_mm", sp_lo, sp_hi, "spacing in cm or a wrong DICOM tag: every mm measure scaled wrong"),
        between("rows", f_lo, f_hi, "a thumbnail or a stitched export, not a scanner frame"),
        between("cols", f_lo, f_hi, "a thumbnail or a stitched export, not a scanner frame"),
        in_set("photometric", list(PHOTOMETRIC), "pixels decoded in a colour model the pipeline cannot read"),
        _exp(gxe.ExpectColumnValuesToBeUnique, CRITICAL, ROW,
             "the same SOP instance and frame twice: counted twice, may leak across splits", column="image_id"),
        _exp(gxe.ExpectColumnValuesToBeUnique, WARNING, ROW,
             "same pixels twice (re-export, copy): weighs double, may leak across splits", column="pixel_sha256"),
        not_null("deid_path", "row points at no de-identified image"),
    ]
    annotations = [
        # a head-only row (HC18: a head, no structures) is not diagnosis training data: it needs no label
        _exp(gxe.ExpectColumnValuesToNotBeNull, CRITICAL, ROW, "unlabelled rows in labelled training data",
             column="label", row_condition=HEAD_ONLY_EXCLUDED, condition_parser="pandas"),
        in_set("label", list(LABELS), "misspelt or unknown class silently treated as a third label"),
        _exp(gxe.ExpectColumnDistinctValuesToContainSet, CRITICAL, DATASET,
             "a class absent: the classifier cannot learn or be evaluated", column="label", value_set=list(LABELS)),
        not_null("ga_weeks", "biometry z-scores and GA-conditioned model inputs undefined"),
        _exp(gxe.ExpectColumnValuesToBeBetween, CRITICAL, ROW, "GA typo or unit error (days, months)",
             column="ga_weeks", min_value=params.ga_min, max_value=params.ga_max,
             row_condition=HEAD_ONLY_EXCLUDED, condition_parser="pandas"),
        between("tcd_z", -params.tcd_max_abs_z, params.tcd_max_abs_z,
                "TCD implausible for GA on the INTERGROWTH-21st curve: measurement or GA error"),
        between("cm_mm", 0.0, params.cm_max_mm, "implausible cisterna magna depth (unit error, typo)"),
        in_set("exam_date_check", ["ok"], "exam date in the future (checked before the date shift)"),
        not_null("exam_date", "no exam date: the temporal split cannot place the row"),
        in_set("patient_check", ["ok"], "patient_id in the CSV differs from the DICOM header: wrong patient"),
        not_null("patient_pseudo", "patient-level split impossible: same fetus in train and test"),
        _exp(gxe.ExpectCompoundColumnsToBeUnique, CRITICAL, ROW,
             "two annotation rows for one image frame: conflicting labels", column_list=["deid_path", "frame"]),
    ]
    masks = [
        in_set("mask_status", ["ok", "none"], "the annotated mask is missing, cannot be decoded or holds "
               "values other than its classes (never copied)"),
        in_set("mask_decodes", [True], "the de-identified mask is gone or unreadable: its checks would pass empty"),
        _exp(gxe.ExpectColumnPairValuesToBeEqual, CRITICAL, ROW, "mask and frame differ in size: wrong pairing",
             column_A="mask_rows", column_B="rows", ignore_row_if="either_value_is_missing"),
        _exp(gxe.ExpectColumnPairValuesToBeEqual, CRITICAL, ROW, "mask and frame differ in size: wrong pairing",
             column_A="mask_cols", column_B="cols", ignore_row_if="either_value_is_missing"),
        between("mask_max_value", 0, 2, "labels outside {0 background, 1 cerebellum, 2 cisterna magna}"),
        between("mask_cerebellum_px", 1, None, "no cerebellum drawn: the shape branch sees nothing"),
        between("mask_cisterna_px", 1, None, "no cisterna magna drawn: CM depth undefined"),
        between("mask_cerebellum_components", 1, 1, "cerebellum in pieces: stray strokes distort TCD"),
        in_set("mask_cm_posterior", [True], "cisterna magna beside the cerebellum, not behind it: swapped labels"),
        between("mask_tcd_diff_mm", -tol, tol, f"mask TCD and annotated TCD differ by more than {tol} mm"),
    ]
    heads = [
        in_set("head_mask_status", ["ok", "none"], "the head mask is missing, cannot be decoded or is not "
               "binary (never copied)"),
        between("hc_mm", 40.0, 400.0, "HC implausible for a fetal head (unit error, typo)"),
        between("head_mask_components", 1, 1, "the head mask is not one closed shape: stray strokes move the frame"),
        between("head_mask_ellipse_iou", params.head_min_ellipse_iou, 1.0,
                "the head mask is not a filled ellipse (an unfilled outline, a stray stroke): the head model "
                "would learn the wrong border"),
        between("head_mask_hc_diff_mm", -params.hc_mask_tolerance_mm, params.hc_mask_tolerance_mm,
                f"the head mask's circumference and the annotated HC differ by more than "
                f"{params.hc_mask_tolerance_mm} mm: wrong mask, wrong spacing or a typo"),
    ]
    return {"scan_manifest": scan, "annotations": annotations, "masks": masks, "heads": heads}


def split_suite(params: ValidateParams) -> list[Any]:
    """The `split` suite over labelled dataset rows with split metrics (contract.split_metrics)."""
    import great_expectations.expectations as gxe

    return [
        _exp(gxe.ExpectColumnValuesToBeBetween, CRITICAL, DATASET,
             "a patient in two splits: leakage, optimistic test metrics", column="patient_split_count",
             min_value=1, max_value=1),
        _exp(gxe.ExpectColumnValuesToBeInSet, CRITICAL, DATASET, "the frozen test set changed: results "
             "no longer comparable across versions", column="frozen_test_ok", value_set=[True]),
        _exp(gxe.ExpectColumnValuesToBeBetween, CRITICAL, DATASET,
             "a split holds one class only: AUC and the operating point undefined", column="split_classes",
             min_value=2, max_value=2),
        _exp(gxe.ExpectColumnValuesToBeBetween, WARNING, DATASET,
             "GA distribution of a split far from train's: metrics not comparable", column="split_ga_ks",
             min_value=0.0, max_value=params.max_ga_ks),
        _exp(gxe.ExpectColumnValuesToBeBetween, WARNING, DATASET,
             "site mix of a split far from train's: a site effect may pass for the model's", column="split_site_shift",
             min_value=0.0, max_value=params.max_site_shift),
    ]


def validate_manifest(manifest_path: Path, gx_root: Path, params: ValidateParams, workspace: Path | None = None,
                      cache_path: Path | None = None,
                      progress: Callable[[int, int], None] | None = None) -> ValidationReport:
    """Run `scan_manifest`, `annotations` and `masks` on the manifest; quarantine the rows that
    fail a critical row expectation; gate the rest (cases per class); build offline Data Docs.

    `workspace` resolves `mask_path` (no mask statistics without it); `cache_path` keeps
    mask statistics by content hash between runs; `progress(done, 4)` follows the four steps.
    """
    step = progress or (lambda done, total: None)
    if not manifest_path.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest_path}")
    t0 = time.perf_counter()
    manifest = pd.read_parquet(manifest_path)
    df = contract.row_metrics(manifest, workspace, contract.MaskStatsCache(cache_path))
    t1 = time.perf_counter()
    step(1, 4)
    context = _file_context(gx_root)
    results = _run(context, "manifest", df, manifest_suites(params))
    t2 = time.perf_counter()
    step(2, 4)
    failed_rows: dict[str, ExpectationResult] = {}
    for r in results:
        if r.scope == ROW and r.severity == CRITICAL and not r.success:
            for image_id in r.failed_ids:
                failed_rows.setdefault(image_id, r)          # the first failed rule names the reason
    by_id = df.set_index("image_id", drop=False) if "image_id" in df else pd.DataFrame()
    quarantined = []
    for image_id, r in failed_rows.items():
        row = by_id.loc[image_id]
        row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
        quarantined.append({"cohort": row.get("cohort"), "source_row": int(row.get("source_row") or 0),
                            "image": image_id, "reason_code": r.code, "reason": r.risk})
    kept = df[~df["image_id"].isin(failed_rows)] if "image_id" in df else df
    results.append(_label_count_gate(kept, params))
    t3 = time.perf_counter()
    step(3, 4)
    index = _build_offline_docs(context)
    step(4, 4)
    success = not any(r.severity == CRITICAL and r.scope == DATASET and not r.success for r in results)
    quarantined.sort(key=lambda q: (str(q["cohort"]), q["source_row"]))
    seconds = {"row_metrics": t1 - t0, "great_expectations": t2 - t1, "quarantine": t3 - t2,
               "data_docs": time.perf_counter() - t3}
    return ValidationReport(success, results, index, quarantined, len(df), seconds=seconds)


def validate_split(dataset: pd.DataFrame, frozen: pd.DataFrame | None, gx_root: Path,
                   params: ValidateParams) -> ValidationReport:
    """Run the `split` suite on a split dataset; the per-split summary rides along for stewards."""
    rows, summary = contract.split_metrics(dataset, frozen)
    per = summary.set_index("split")
    rows["split_classes"] = rows["split"].map(per["classes"]).astype("int64")
    rows["split_ga_ks"] = rows["split"].map(per["ga_ks_vs_train"]).astype(float)
    rows["split_site_shift"] = rows["split"].map(per["site_shift_vs_train"]).astype(float)
    context = _file_context(gx_root)
    results = _run(context, "split", rows, {SPLIT_SUITE: split_suite(params)})
    index = _build_offline_docs(context)
    success = not any(r.severity == CRITICAL and not r.success for r in results)
    return ValidationReport(success, results, index, [], len(rows), {"splits": summary})


def _run(context: Any, asset: str, df: pd.DataFrame, suites: dict[str, list[Any]]) -> list[ExpectationResult]:
    """One checkpoint per table, one validation definition per suite; results in suite order."""
    import great_expectations as gx

    batch = _whole_dataframe_batch(context, asset)
    definitions = []
    for name, expectations in suites.items():
        suite = gx.ExpectationSuite(name=name, expectations=expectations)
        _keep_expectation_ids(context, suite)
        suite = context.suites.add_or_update(suite)
        definitions.append(context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)))
    checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
        name=asset, validation_definitions=definitions, actions=[],
        # failed rows are named by their image_id pseudonym, never by position or value
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["image_id"],
                       "return_unexpected_index_query": False}))
    run = checkpoint.run(batch_parameters={"dataframe": df})
    out = []
    for name, suite_result in zip(suites, run.run_results.values(), strict=True):
        out.extend(_to_result(name, evr) for evr in suite_result.results)
    return out


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


def _whole_dataframe_batch(context: Any, asset_name: str) -> Any:
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
        asset = source.get_asset(asset_name)
    except LookupError:
        asset = source.add_dataframe_asset(name=asset_name)
    try:
        return asset.get_batch_definition("whole_table")
    except KeyError:
        return asset.add_batch_definition_whole_dataframe("whole_table")


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


def _to_result(suite: str, evr: Any) -> ExpectationResult:
    """Map one GX ExpectationValidationResult to an ExpectationResult."""
    config = evr.expectation_config
    result = evr.result or {}
    meta = config.meta or {}
    mismatched = (result.get("details") or {}).get("mismatched") or {}
    if "unexpected_count" in result:
        count = int(result["unexpected_count"])
    elif "missing_count" in result:
        count = int(result["missing_count"])
    else:  # table-level column set: number of unexpected plus missing columns
        count = sum(len(v) for v in mismatched.values())
    ids = _image_ids(result)
    column = config.kwargs.get("column") or (
        "+".join(config.kwargs["column_list"]) if config.kwargs.get("column_list") else
        (f"{config.kwargs['column_A']}={config.kwargs['column_B']}" if config.kwargs.get("column_A") else None))
    return ExpectationResult(suite=suite, expectation=config.type, column=column,
                             severity=str(meta.get("severity", CRITICAL)), success=bool(evr.success),
                             unexpected_count=count, unexpected_examples=list(ids[:MAX_EXAMPLES]),
                             scope=str(meta.get("scope", DATASET)), risk=str(meta.get("risk", "")),
                             failed_ids=tuple(ids))


def _image_ids(result: dict[str, Any]) -> list[str]:
    """Distinct image_id pseudonyms of the failed rows, in order; nothing else ever."""
    rows = result.get("unexpected_index_list") or result.get("partial_unexpected_index_list") or []
    ids: list[str] = []
    seen: set[str] = set()
    for row in rows:
        # each row also carries the failing column's value: keep only the pseudonym
        image_id = row.get("image_id") if isinstance(row, dict) else None
        if isinstance(image_id, str) and image_id not in seen:
            seen.add(image_id)
            ids.append(image_id)
    return ids


def _label_count_gate(df: pd.DataFrame, params: ValidateParams) -> ExpectationResult:
    """Dataset gate (no standard GX expectation): each label has >= min_per_class rows left
    after quarantine."""
    counts = df["label"].value_counts() if "label" in df.columns else pd.Series(dtype=int)
    short = [label for label in LABELS if int(counts.get(label, 0)) < params.min_per_class]
    return ExpectationResult(
        suite="dataset_gates", expectation="expect_each_label_to_have_at_least_min_per_class_rows",
        column="label", severity=CRITICAL, success=not short, unexpected_count=len(short),
        unexpected_examples=[], scope=DATASET,
        risk=f"fewer than {params.min_per_class} usable cases of a class: too few to train and evaluate")


def _build_offline_docs(context: Any) -> Path | None:
    """Build Data Docs and return the local index.html.

    The pages load nothing from the network by GX's own configuration: the `local_site` of
    great_expectations.yml renders through the views of `plugins/cbh_data_docs.py`, whose
    templates (`plugins/custom_data_docs/views/`) link no CDN, run no script and style the
    pages from the local `data_docs_custom_styles.css`.
    """
    site = (context.variables.data_docs_sites or {}).get("local_site") or {}
    if (site.get("site_index_builder") or {}).get("module_name") != OFFLINE_DOCS_MODULE:
        # GX's default site would write pages that fetch Bootstrap, jQuery and a logo from the web
        raise ValueError(f"{context.root_directory}/great_expectations.yml: data_docs_sites.local_site "
                         f"does not render through {OFFLINE_DOCS_MODULE} (the offline Data Docs)")
    urls = context.build_data_docs(site_names=["local_site"])
    url = urls.get("local_site")
    return Path(url2pathname(urlparse(url).path)) if url else None
