"""Data tests: the Great Expectations manifest suite on tiny synthetic manifests."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.validate import (
    MANIFEST_COLUMNS,
    ValidateParams,
    ValidationReport,
    validate_manifest,
)

PARAMS = ValidateParams(min_per_class=3)
N_ROWS = 8


def _manifest(n: int = N_ROWS) -> pd.DataFrame:
    """A clean manifest: n frames, half normal and half hypoplasia."""
    i = np.arange(n)
    return pd.DataFrame(
        {
            "image_id": [f"img{k:04d}" for k in i],
            "patient_pseudo": [f"pat{k // 2:03d}" for k in i],
            "exam_date": [dt.date(2020, 1, 1) + dt.timedelta(days=int(k)) for k in i],
            "ga_weeks": 20.0 + i * 0.5,
            "label": ["normal" if k % 2 else "hypoplasia" for k in i],
            "tcd_mm": [20.0 + k if k % 3 else None for k in i],
            "cm_mm": [5.0 if k % 4 else None for k in i],
            "site": ["A" if k % 2 else None for k in i],
            "annotator": [f"staff{k % 3}" if k % 2 else None for k in i],
            "frame": np.zeros(n, dtype="int32"),
            "deid_path": [f"deid/img{k:04d}.dcm" for k in i],
            "mask_path": [f"masks/img{k:04d}.png" if k % 2 else None for k in i],
            "rows": np.full(n, 256, dtype="int32"),
            "cols": np.full(n, 320, dtype="int32"),
            "spacing_row_mm": np.full(n, 0.2),
            "spacing_col_mm": np.full(n, 0.2),
            "modality": ["US"] * n,
            "photometric": ["MONOCHROME2"] * n,
            "source_format": ["dicom" if k % 2 else "png" for k in i],
            "pixel_sha256": [f"{k:064x}" for k in i],
            "cohort": ["synthetic"] * n,
            "source_row": i.astype("int64") + 1,
        }
    )


def _write(df: pd.DataFrame, path: Path) -> Path:
    """Write with the manifest's Arrow types (date32, int32) as ingest does."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.set_column(
        table.schema.get_field_index("exam_date"),
        "exam_date",
        pa.array(df["exam_date"], type=pa.date32()),
    )
    pq.write_table(table, path)
    return path


def _failed(report: ValidationReport) -> dict[tuple[str, str | None], object]:
    return {(r.expectation, r.column): r for r in report.results if not r.success}


def _remote_loads(html: str) -> list[str]:
    tags = re.findall(r"<(?:link|script|img)\b[^>]*>", html, flags=re.IGNORECASE | re.DOTALL)
    return [t for t in tags if re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", t)]


def test_clean_manifest_passes_and_docs_are_offline(tmp_path: Path) -> None:
    manifest = _write(_manifest(), tmp_path / "manifest.parquet")
    report = validate_manifest(manifest, tmp_path / "expectations", PARAMS)

    assert report.success, report.failures_table()
    assert report.failures_table() == "All expectations passed."
    doc = report.to_json()
    assert set(doc) == {"success", "results"} and doc["success"] is True
    keys = {
        "suite",
        "expectation",
        "column",
        "severity",
        "success",
        "unexpected_count",
        "unexpected_examples",
    }
    assert all(set(r) == keys for r in doc["results"])
    assert {r["severity"] for r in doc["results"]} == {"critical", "warning"}
    assert {r["suite"] for r in doc["results"]} == {"scan_manifest", "dataset_gates"}
    json.dumps(doc)  # serialisable as is

    assert report.data_docs_index is not None and report.data_docs_index.is_file()
    site = report.data_docs_index.parent
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 3  # index, suite, one validation run
    for page in pages:
        assert _remote_loads(page.read_text(encoding="utf-8")) == [], page
    index = report.data_docs_index.read_text(encoding="utf-8")
    assert "Validation runs" in index and "<td>passed</td>" in index  # static, no JS needed
    assert (tmp_path / "expectations" / "gx" / "expectations" / "scan_manifest.json").is_file()


def test_bad_manifest_fails_with_critical_results_and_pseudonym_examples(tmp_path: Path) -> None:
    df = _manifest()
    df.loc[1, "image_id"] = "img0000"  # duplicate of row 0
    df.loc[3, "ga_weeks"] = 50.0
    df.loc[5, "pixel_sha256"] = df.loc[4, "pixel_sha256"]  # duplicate pixels: warning only
    df["patient_name"] = "DOE^JANE"
    manifest = _write(df, tmp_path / "manifest.parquet")
    gx_root = tmp_path / "expectations"

    # The clean run first: the second run on the same gx_root must reuse the GX project.
    assert validate_manifest(
        _write(_manifest(), tmp_path / "clean.parquet"), gx_root, PARAMS
    ).success
    report = validate_manifest(manifest, gx_root, PARAMS)

    assert not report.success
    failed = _failed(report)
    assert set(failed) == {
        ("expect_column_values_to_be_unique", "image_id"),
        ("expect_column_values_to_be_between", "ga_weeks"),
        ("expect_table_columns_to_match_set", None),
        ("expect_column_values_to_be_unique", "pixel_sha256"),
    }
    dup = failed[("expect_column_values_to_be_unique", "image_id")]
    assert dup.severity == "critical" and dup.unexpected_count == 2
    assert dup.unexpected_examples == ["img0000"]
    ga = failed[("expect_column_values_to_be_between", "ga_weeks")]
    assert ga.severity == "critical" and ga.unexpected_examples == ["img0003"]
    cols = failed[("expect_table_columns_to_match_set", None)]
    assert cols.severity == "critical" and cols.unexpected_count == 1
    assert cols.unexpected_examples == []
    assert failed[("expect_column_values_to_be_unique", "pixel_sha256")].severity == "warning"

    ids = set(df["image_id"])
    for result in report.results:
        assert len(result.unexpected_examples) <= 5
        assert set(result.unexpected_examples) <= ids
    text = json.dumps(report.to_json())
    assert "DOE^JANE" not in text and "50.0" not in text
    table = report.failures_table()
    assert "ga_weeks" in table and "img0003" in table and "DOE" not in table
    for page in report.data_docs_index.parent.rglob("*.html"):
        assert _remote_loads(page.read_text(encoding="utf-8")) == [], page
    index = report.data_docs_index.read_text(encoding="utf-8")
    assert index.count("<td>failed</td>") == 1 and index.count("<td>passed</td>") == 1


def test_rerun_keeps_versioned_suite_stable(tmp_path: Path) -> None:
    manifest = _write(_manifest(), tmp_path / "manifest.parquet")
    gx_dir = tmp_path / "expectations" / "gx"
    validate_manifest(manifest, tmp_path / "expectations", PARAMS)
    versioned = [
        "expectations/scan_manifest.json",
        "great_expectations.yml",
        "validation_definitions/scan_manifest.json",
        "checkpoints/scan_manifest.json",
    ]
    before = {name: (gx_dir / name).read_text() for name in versioned}
    report = validate_manifest(manifest, tmp_path / "expectations", PARAMS)
    assert report.success
    assert {name: (gx_dir / name).read_text() for name in versioned} == before


def test_class_gate_and_tcd_z(tmp_path: Path) -> None:
    manifest = _write(_manifest(), tmp_path / "manifest.parquet")

    def tcd_z(tcd_mm: np.ndarray, ga_weeks: np.ndarray) -> np.ndarray:
        return np.where(tcd_mm > 26.0, 9.0, 0.0) * np.where(np.isnan(tcd_mm), np.nan, 1.0)

    report = validate_manifest(manifest, tmp_path / "gx", ValidateParams(), tcd_z=tcd_z)
    failed = _failed(report)
    assert set(failed) == {
        ("expect_each_label_to_have_at_least_min_per_class_rows", "label"),
        ("expect_column_values_to_be_between", "tcd_z"),
    }
    gate = failed[("expect_each_label_to_have_at_least_min_per_class_rows", "label")]
    assert gate.suite == "dataset_gates" and gate.severity == "critical"
    assert gate.unexpected_count == 2  # both classes have 4 < 10 rows
    z = failed[("expect_column_values_to_be_between", "tcd_z")]
    assert z.severity == "critical" and z.unexpected_examples == ["img0007"]
    assert not report.success


def test_missing_manifest_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.parquet"):
        validate_manifest(tmp_path / "absent.parquet", tmp_path / "gx", PARAMS)


def test_allow_list_matches_the_ingest_manifest_schema() -> None:
    """The contract and the producer must agree; a new ingest column needs a PHI review."""
    from pipelines.ingest import MANIFEST_SCHEMA

    assert set(MANIFEST_COLUMNS) == set(MANIFEST_SCHEMA.names)
