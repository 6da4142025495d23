"""The data contract: for each expectation, a crafted cohort holding exactly that defect is
reported with the right severity and row; a clean cohort passes everything; critical row
failures are quarantined, critical dataset failures fail the run; Data Docs and the steward
summary render offline."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.contract.validate import (
    MANIFEST_COLUMNS,
    ValidateParams,
    ValidationReport,
    validate_manifest,
    validate_split,
)
from pipelines.data.ingest import MANIFEST_SCHEMA, ingest_cohort
from pipelines.data.split import assign_splits
from pipelines.deid.core import Pseudonymizer, Settings
from pipelines.deid.ocr import OcrSettings
from tests.conftest import ROOT, TEST_KEY

PARAMS = ValidateParams(min_per_class=3)
KEEP = ("image", "frame", "ga_weeks", "label", "tcd_mm", "cm_mm", "mask", "annotator", "site")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A real cohort (30 patients, three vendor styles), ingested: workspace and manifest."""
    from pipelines.data.synth import synth_cohort

    tmp = tmp_path_factory.mktemp("contract")
    synth_cohort(tmp / "export", 30, 17, ("aurora", "boreal", "cirrus"), png_fraction=0.2)
    ws = tmp / "ws"
    # the contract is under test here, not the OCR check: Tesseract verifies the PNGs (all read) and
    # the sampled scans about ten times faster than PP-OCR (tests/unit/test_deid.py tests both)
    settings = Settings(ocr=OcrSettings(engine="tesseract"))
    res = ingest_cohort(tmp / "export", ws, "data/deid", Pseudonymizer(TEST_KEY.encode()), KEEP, dt.date(2026, 1, 1),
                        settings=settings)
    assert not res.quarantine
    return ws, pd.DataFrame(res.manifest)


def _gx(tmp: Path) -> Path:
    """A copy of the project's Great Expectations project (never the committed one)."""
    dest = tmp / "expectations"
    if not dest.exists():
        shutil.copytree(ROOT / "expectations", dest, ignore=shutil.ignore_patterns("uncommitted"))
    return dest


def _run(ws: Path, df: pd.DataFrame, tmp: Path, params: ValidateParams = PARAMS) -> ValidationReport:
    """Write the crafted manifest as ingest would (its Arrow schema) and validate it."""
    path = tmp / "manifest.parquet"
    table = pa.Table.from_pandas(df, preserve_index=False)
    if set(df.columns) == set(MANIFEST_SCHEMA.names):
        table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    pq.write_table(table, path)
    return validate_manifest(path, _gx(tmp), params, workspace=ws, cache_path=tmp / "mask-stats.parquet")


def _result(report: ValidationReport, suite: str, expectation: str, column: str | None):
    found = [r for r in report.results if (r.suite, r.expectation, r.column) == (suite, expectation, column)]
    assert len(found) == 1, (suite, expectation, column)
    return found[0]


# --- row-level defects: one crafted row each, all in one cohort ------------------------------

def _mask(ws: Path, row: pd.Series) -> np.ndarray:
    return cv2.imread(str(ws / row["mask_path"]), cv2.IMREAD_UNCHANGED)


def _save_mask(ws: Path, df: pd.DataFrame, i: int, mask: np.ndarray, name: str) -> None:
    rel = f"data/deid/crafted/{name}.png"
    (ws / rel).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(ws / rel), mask)
    df.loc[i, "mask_path"] = rel


def _no_mask(df: pd.DataFrame, i: int) -> None:
    df.loc[i, ["mask_path", "mask_status"]] = [None, "none"]


def _set(col: str, value):
    def f(ws, df, i):
        df.loc[i, col] = value
    return f


def _tcd_implausible(ws, df, i):
    _no_mask(df, i)                            # the mask would disagree too: isolate the z-score rule
    df.loc[i, "tcd_mm"] = 4.0


def _frame_small(ws, df, i):
    _no_mask(df, i)
    df.loc[i, "rows"] = 64


def _frame_wide(ws, df, i):
    _no_mask(df, i)
    df.loc[i, "cols"] = 5000


def _mask_narrow(ws, df, i):
    m = _mask(ws, df.loc[i])
    _save_mask(ws, df, i, m[:, : m.shape[1] - 8], "narrow")      # the same height, 8 columns short


def _mask_missing(ws, df, i):
    df.loc[i, ["mask_path", "mask_status"]] = [None, "missing"]


def _mask_gone(ws, df, i):
    rel = "data/deid/crafted/truncated.png"
    (ws / rel).parent.mkdir(parents=True, exist_ok=True)
    (ws / rel).write_bytes((ws / df.loc[i, "mask_path"]).read_bytes()[:40])      # a truncated file
    df.loc[i, "mask_path"] = rel


def _mask_resized(ws, df, i):
    m = _mask(ws, df.loc[i])
    _save_mask(ws, df, i, cv2.resize(m, (m.shape[1] // 2, m.shape[0] // 2), interpolation=cv2.INTER_NEAREST),
               "resized")


def _mask_class_3(ws, df, i):
    m = _mask(ws, df.loc[i]).copy()
    m[0:3, 0:3] = 3
    _save_mask(ws, df, i, m, "class3")


def _mask_no_cisterna(ws, df, i):
    m = _mask(ws, df.loc[i]).copy()
    m[m == 2] = 0
    _save_mask(ws, df, i, m, "nocm")


def _mask_no_cerebellum(ws, df, i):
    m = _mask(ws, df.loc[i]).copy()
    m[m == 1] = 0
    _save_mask(ws, df, i, m, "nocb")


def _mask_two_pieces(ws, df, i):
    m = _mask(ws, df.loc[i]).copy()
    ys, xs = np.nonzero(m == 1)
    cy = int(ys.mean())
    m[cy - 1:cy + 2, 2:5] = 1                   # a stray stroke at the image's edge
    _save_mask(ws, df, i, m, "pieces")
    df.loc[i, "tcd_mm"] = np.nan               # the stroke changes the width: isolate the connectivity rule


def _mask_cm_beside(ws, df, i):
    import math

    from pipelines.biometry import cerebellar_axis
    m = _mask(ws, df.loc[i]).copy()
    cm = m == 2
    m[cm] = 0
    ys, xs = np.nonzero(m == 1)
    yc, xc = np.nonzero(cm)
    axis = cerebellar_axis(m)
    # move the cisterna magna beside the cerebellum: along its transverse axis, past its end
    reach = (np.ptp(xs) + np.ptp(ys)) / 2 + max(np.ptp(xc), np.ptp(yc)) + 5
    tx, ty = xs.mean() + reach * math.cos(axis), ys.mean() + reach * math.sin(axis)
    ny = np.clip(np.round(yc - yc.mean() + ty).astype(int), 0, m.shape[0] - 1)
    nx = np.clip(np.round(xc - xc.mean() + tx).astype(int), 0, m.shape[1] - 1)
    m[ny, nx] = 2
    _save_mask(ws, df, i, m, "beside")
    df.loc[i, "cm_mm"] = np.nan


def _tcd_off(ws, df, i):
    df.loc[i, "tcd_mm"] = float(df.loc[i, "tcd_mm"]) + 3.0


ROW_DEFECTS = [
    # (id, suite, expectation, column, severity, mutate)
    ("modality", "scan_manifest", "expect_column_values_to_be_in_set", "modality", "critical", _set("modality", "CT")),
    ("spacing-null", "scan_manifest", "expect_column_values_to_not_be_null", "spacing_row_mm", "critical",
     _set("spacing_row_mm", None)),
    ("spacing-cm", "scan_manifest", "expect_column_values_to_be_between", "spacing_col_mm", "critical",
     _set("spacing_col_mm", 1.5)),
    ("spacing-col-null", "scan_manifest", "expect_column_values_to_not_be_null", "spacing_col_mm", "critical",
     _set("spacing_col_mm", None)),
    ("spacing-row-tiny", "scan_manifest", "expect_column_values_to_be_between", "spacing_row_mm", "critical",
     _set("spacing_row_mm", 0.01)),
    ("frame-size", "scan_manifest", "expect_column_values_to_be_between", "rows", "critical", _frame_small),
    ("frame-too-wide", "scan_manifest", "expect_column_values_to_be_between", "cols", "critical", _frame_wide),
    ("photometric", "scan_manifest", "expect_column_values_to_be_in_set", "photometric", "critical",
     _set("photometric", "YBR_ICT")),
    ("pixels-twice", "scan_manifest", "expect_column_values_to_be_unique", "pixel_sha256", "warning", None),
    ("deid-path", "scan_manifest", "expect_column_values_to_not_be_null", "deid_path", "critical",
     _set("deid_path", None)),
    ("label-null", "annotations", "expect_column_values_to_not_be_null", "label", "critical", _set("label", None)),
    ("label-unknown", "annotations", "expect_column_values_to_be_in_set", "label", "critical",
     _set("label", "invalid")),
    ("ga-null", "annotations", "expect_column_values_to_not_be_null", "ga_weeks", "critical",
     _set("ga_weeks", None)),
    ("ga-range", "annotations", "expect_column_values_to_be_between", "ga_weeks", "critical", _set("ga_weeks", 43.0)),
    ("tcd-z", "annotations", "expect_column_values_to_be_between", "tcd_z", "critical", _tcd_implausible),
    ("cm-range", "annotations", "expect_column_values_to_be_between", "cm_mm", "critical", _set("cm_mm", 31.0)),
    ("exam-future", "annotations", "expect_column_values_to_be_in_set", "exam_date_check", "critical",
     _set("exam_date_check", "future")),
    ("exam-null", "annotations", "expect_column_values_to_not_be_null", "exam_date", "critical",
     _set("exam_date", None)),
    ("patient-mismatch", "annotations", "expect_column_values_to_be_in_set", "patient_check", "critical",
     _set("patient_check", "mismatch")),
    ("patient-null", "annotations", "expect_column_values_to_not_be_null", "patient_pseudo", "critical",
     _set("patient_pseudo", None)),
    ("two-rows-one-frame", "annotations", "expect_compound_columns_to_be_unique", "deid_path+frame", "critical", None),
    ("mask-missing", "masks", "expect_column_values_to_be_in_set", "mask_status", "critical", _mask_missing),
    ("mask-unreadable", "masks", "expect_column_values_to_be_in_set", "mask_decodes", "critical", _mask_gone),
    ("mask-size", "masks", "expect_column_pair_values_to_be_equal", "mask_rows=rows", "critical", _mask_resized),
    ("mask-width", "masks", "expect_column_pair_values_to_be_equal", "mask_cols=cols", "critical", _mask_narrow),
    ("mask-class", "masks", "expect_column_values_to_be_between", "mask_max_value", "critical", _mask_class_3),
    ("no-cerebellum", "masks", "expect_column_values_to_be_between", "mask_cerebellum_px", "critical",
     _mask_no_cerebellum),
    ("no-cisterna", "masks", "expect_column_values_to_be_between", "mask_cisterna_px", "critical", _mask_no_cisterna),
    ("cerebellum-pieces", "masks", "expect_column_values_to_be_between", "mask_cerebellum_components", "critical",
     _mask_two_pieces),
    ("cm-beside", "masks", "expect_column_values_to_be_in_set", "mask_cm_posterior", "critical", _mask_cm_beside),
    ("tcd-vs-mask", "masks", "expect_column_values_to_be_between", "mask_tcd_diff_mm", "critical", _tcd_off),
]


@pytest.fixture(scope="module")
def defects(clean, tmp_path_factory):
    """One cohort, one defect per row (rows with a mask and a TCD), validated once."""
    ws, manifest = clean
    tmp = tmp_path_factory.mktemp("defects")
    df = manifest.copy().reset_index(drop=True)
    candidates = [i for i in df.index if isinstance(df.loc[i, "mask_path"], str) and df.loc[i, "tcd_mm"] == df.loc[
        i, "tcd_mm"]]
    assert len(candidates) >= len(ROW_DEFECTS) + 3, "the cohort is too small for one defect per row"
    where: dict[str, set[str]] = {}
    it = iter(candidates)
    for name, *_rest, mutate in ROW_DEFECTS:
        i = next(it)
        if name == "pixels-twice":
            j = next(it)
            df.loc[j, "pixel_sha256"] = df.loc[i, "pixel_sha256"]
            where[name] = {df.loc[i, "image_id"], df.loc[j, "image_id"]}
            continue
        if name == "two-rows-one-frame":
            j = next(it)
            df.loc[j, ["deid_path", "frame"]] = df.loc[i, ["deid_path", "frame"]].to_list()
            where[name] = {df.loc[i, "image_id"], df.loc[j, "image_id"]}
            continue
        mutate(ws, df, i)
        where[name] = {df.loc[i, "image_id"]}
    report = _run(ws, df, tmp)
    return df, report, where


@pytest.mark.parametrize("defect", ROW_DEFECTS, ids=[d[0] for d in ROW_DEFECTS])
def test_each_row_defect_is_reported_on_its_row(defects, defect):
    df, report, where = defects
    name, suite, expectation, column, severity, _ = defect
    r = _result(report, suite, expectation, column)
    assert not r.success and r.severity == severity and r.scope == "row"
    crafted = set().union(*where.values())
    assert where[name] <= set(r.failed_ids) <= crafted          # its row, and no clean row
    assert set(r.unexpected_examples) <= set(r.failed_ids) and len(r.unexpected_examples) <= 5
    quarantined = {q["image"]: q for q in report.quarantined}
    if severity == "critical":
        for image_id in where[name]:
            q = quarantined[image_id]
            row = df[df["image_id"] == image_id].iloc[0]
            assert q["source_row"] == row["source_row"] and q["cohort"] == row["cohort"]
            assert q["reason_code"].startswith(f"{suite}.") and q["reason"]
    else:
        assert not where[name] & set(quarantined)                    # a warning quarantines nothing


def test_only_crafted_rows_are_quarantined_and_the_rest_passes(defects):
    df, report, where = defects
    critical = set().union(*(ids for (name, *_r), ids in zip(ROW_DEFECTS, where.values(), strict=True)
                             if _r[3] == "critical"))
    assert {q["image"] for q in report.quarantined} == critical
    assert report.success, report.failures_table()                # dataset gates hold on the rest
    assert report.verdict().startswith("FIT FOR TRAINING after quarantine")
    text = json.dumps(report.to_json())
    assert "DOE" not in text and "31.0" not in text                  # ids only, never values


def test_clean_cohort_passes_everything(clean, tmp_path):
    ws, manifest = clean
    report = _run(ws, manifest, tmp_path)
    failed = [r for r in report.results if not r.success]
    assert failed == [], report.failures_table()
    assert report.success and not report.quarantined
    doc = report.to_json()
    assert set(doc) == {"success", "results"}
    assert all(set(r) == {"suite", "expectation", "column", "severity", "success", "unexpected_count",
                          "unexpected_examples"} for r in doc["results"])
    assert {r["suite"] for r in doc["results"]} == {"scan_manifest", "annotations", "masks", "heads", "dataset_gates"}
    for suite in ("scan_manifest", "annotations", "masks", "heads"):
        assert (tmp_path / "expectations" / "gx" / "expectations" / f"{suite}.json").is_file()


# --- dataset-level defects: the run fails ----------------------------------------------------

def test_identifier_column_fails_the_run(clean, tmp_path):
    ws, manifest = clean
    df = manifest.copy()
    df["patient_name"] = "DOE^JANE"
    report = _run(ws, df, tmp_path)
    r = _result(report, "scan_manifest", "expect_table_columns_to_match_set", None)
    assert not r.success and r.severity == "critical" and r.scope == "dataset"
    assert not report.success and report.verdict().startswith("NOT FIT")
    assert "DOE" not in json.dumps(report.to_json())


def test_null_image_id_fails_the_run(clean, tmp_path):
    ws, manifest = clean
    df = manifest.copy()
    df.loc[0, "image_id"] = None
    report = _run(ws, df, tmp_path)
    r = _result(report, "scan_manifest", "expect_column_values_to_not_be_null", "image_id")
    assert not r.success and r.scope == "dataset" and not report.success


def test_duplicate_sop_instance_is_quarantined_both_times(clean, tmp_path):
    ws, manifest = clean
    df = pd.concat([manifest, manifest.iloc[[0]]], ignore_index=True)
    report = _run(ws, df, tmp_path)
    r = _result(report, "scan_manifest", "expect_column_values_to_be_unique", "image_id")
    assert not r.success and r.unexpected_count == 2 and set(r.failed_ids) == {manifest.loc[0, "image_id"]}


def test_one_class_only_fails_the_run(clean, tmp_path):
    ws, manifest = clean
    df = manifest.copy()
    df["label"] = "normal"
    df["tcd_mm"] = np.nan                    # hypoplasia TCDs would still be measured: keep one defect
    report = _run(ws, df, tmp_path)
    r = _result(report, "annotations", "expect_column_distinct_values_to_contain_set", "label")
    assert not r.success and r.scope == "dataset" and not report.success


def test_too_few_cases_left_after_quarantine_fail_the_gate(clean, tmp_path):
    ws, manifest = clean
    df = manifest.copy()
    hypo = df.index[df["label"] == "hypoplasia"]
    df.loc[hypo[2:], "ga_weeks"] = 50.0                    # quarantined: two hypoplasia rows remain
    report = _run(ws, df, tmp_path)
    gate = _result(report, "dataset_gates", "expect_each_label_to_have_at_least_min_per_class_rows", "label")
    assert not gate.success and gate.severity == "critical" and not report.success
    assert len(report.quarantined) == len(hypo) - 2


# --- the split suite ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split_clean(clean):
    _, manifest = clean
    # a seed whose validation draw keeps train's site mix: this small cohort's draw can miss one
    return assign_splits(manifest, None, 0.25, 0.3, 0)


def _split_result(report, expectation, column):
    return _result(report, "split", expectation, column)


def test_clean_split_passes(split_clean, tmp_path):
    dataset, frozen = split_clean
    report = validate_split(dataset, frozen, _gx(tmp_path), PARAMS)
    assert report.success and all(r.success for r in report.results), report.failures_table()
    splits = report.tables["splits"]
    assert list(splits["split"]) == ["train", "val", "test"] and (splits["classes"] == 2).all()
    assert {"ga_ks_vs_train", "site_shift_vs_train"} <= set(splits.columns)


def test_patient_in_two_splits_fails(split_clean, tmp_path):
    dataset, frozen = split_clean
    df = dataset.copy()
    multi = df[df["split"] == "train"].groupby("patient_pseudo").filter(lambda g: len(g) > 1)
    patient = multi["patient_pseudo"].iloc[0]
    df.loc[df.index[(df["patient_pseudo"] == patient)][0], "split"] = "val"
    report = validate_split(df, frozen, _gx(tmp_path), PARAMS)
    r = _split_result(report, "expect_column_values_to_be_between", "patient_split_count")
    assert not r.success and r.severity == "critical" and not report.success
    assert set(r.failed_ids) == set(df.loc[df["patient_pseudo"] == patient, "image_id"])


def test_frozen_test_set_that_changed_fails(split_clean, tmp_path):
    dataset, frozen = split_clean
    df = dataset.copy()
    moved = frozen["image_id"].iloc[0]
    patient = df.loc[df["image_id"] == moved, "patient_pseudo"].iloc[0]
    df.loc[df["patient_pseudo"] == patient, "split"] = "train"          # a test patient moved to train
    report = validate_split(df, frozen, _gx(tmp_path), PARAMS)
    r = _split_result(report, "expect_column_values_to_be_in_set", "frozen_test_ok")
    assert not r.success and moved in r.failed_ids and not report.success


def test_split_with_one_class_fails(split_clean, tmp_path):
    dataset, frozen = split_clean
    df = dataset.copy()
    df.loc[(df["split"] == "val") & (df["label"] == "hypoplasia"), "split"] = "excluded"
    report = validate_split(df, frozen, _gx(tmp_path), PARAMS)
    r = _split_result(report, "expect_column_values_to_be_between", "split_classes")
    assert not r.success and r.severity == "critical" and not report.success
    assert set(r.failed_ids) == set(df.loc[df["split"] == "val", "image_id"])


def test_distribution_shift_is_a_warning(split_clean, tmp_path):
    dataset, frozen = split_clean
    strict = replace(PARAMS, max_ga_ks=0.0, max_site_shift=0.0)
    report = validate_split(dataset, frozen, _gx(tmp_path), strict)
    for column in ("split_ga_ks", "split_site_shift"):
        r = _split_result(report, "expect_column_values_to_be_between", column)
        assert not r.success and r.severity == "warning"
    assert report.success                                              # reported, not blocking


# --- Data Docs and the steward summary ------------------------------------------------------

def _remote_loads(text: str) -> list[str]:
    tags = re.findall(r"<(?:link|script|img)\b[^>]*>", text, flags=re.IGNORECASE | re.DOTALL)
    return [t for t in tags if re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", t)]


def test_docs_and_summary_render_offline_in_chromium(defects, tmp_path):
    from pipelines.reports.steward import write_summary
    from tests.browser import open_page

    df, report, _ = defects
    html_path, md_path = write_summary(report, tmp_path / "summary", "Data contract")
    md = md_path.read_text()
    assert md.splitlines()[2].startswith("**Verdict: FIT FOR TRAINING after quarantine")
    assert "| critical | row |" in md
    for q in report.quarantined[:3]:
        assert f"| {q['source_row']} | {q['image']} | {q['reason_code']} |" in md
    site = report.data_docs_index.parent
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert _remote_loads(text) == [] and "<script" not in text.lower(), page
    with open_page(html_path) as (page, outside):
        verdict = page.locator("#verdict")
        assert verdict.is_visible() and "FIT FOR TRAINING after quarantine" in verdict.inner_text()
        assert page.get_by_text("Quarantined rows").is_visible()
    assert outside == []
    with open_page(report.data_docs_index) as (page, outside):
        assert page.get_by_text("Validation Results").is_visible()
        status = page.locator(".ge-run-status-failed").first           # cbh's run status, without JavaScript
        assert status.is_visible() and status.inner_text() == "failed"
        assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")  # local logo
    assert outside == []
    with open_page(next((site / "validations").rglob("*.html"))) as (page, outside):
        assert page.get_by_text("Unsuccessful Expectations").is_visible()
    assert outside == []


def test_rerun_keeps_versioned_suites_stable(clean, tmp_path):
    ws, manifest = clean
    _run(ws, manifest, tmp_path)
    gx_dir = tmp_path / "expectations" / "gx"
    versioned = sorted(p.relative_to(gx_dir) for p in gx_dir.rglob("*.json") if "uncommitted" not in p.parts)
    before = {p: (gx_dir / p).read_text() for p in versioned} | {"yml": (gx_dir / "great_expectations.yml").read_text()}
    _run(ws, manifest, tmp_path)
    after = {p: (gx_dir / p).read_text() for p in versioned} | {"yml": (gx_dir / "great_expectations.yml").read_text()}
    assert after == before


def test_committed_suites_are_what_the_code_and_params_make(clean, tmp_path):
    """The suite files in git are the contract: a change in code or params.yaml shows up there."""
    from flows.stages import validate_params
    from pipelines.config import load_params

    ws, manifest = clean
    _run(ws, manifest, tmp_path, validate_params(load_params(ROOT / "params.yaml")))
    dataset, frozen = assign_splits(manifest, None, 0.25, 0.3, 7)
    validate_split(dataset, frozen, _gx(tmp_path), validate_params(load_params(ROOT / "params.yaml")))
    for suite in ("scan_manifest", "annotations", "masks", "heads", "split"):
        made = json.loads((tmp_path / "expectations/gx/expectations" / f"{suite}.json").read_text())
        committed = json.loads((ROOT / "expectations/gx/expectations" / f"{suite}.json").read_text())
        assert made == committed, suite


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.parquet"):
        validate_manifest(tmp_path / "absent.parquet", tmp_path / "gx", PARAMS)


def test_allow_list_matches_the_ingest_manifest_schema():
    """The contract and the producer must agree; a new ingest column needs a PHI review."""
    assert set(MANIFEST_COLUMNS) == set(MANIFEST_SCHEMA.names)
