"""`cbh deid SRC DST`: every file de-identified or counted as quarantined; the link apart."""

import csv

import pydicom
import pytest

from pipelines.deid_folder import deid_folder


def test_folder_deid_report_and_link(small_cohort, tmp_path, pseudo):
    dst, link = tmp_path / "out", tmp_path / "private" / "link.csv"
    rep = deid_folder(small_cohort / "scans", dst, pseudo, link)
    n_inputs = len(list((small_cohort / "scans").glob("*.dcm"))) + len(list((small_cohort / "scans").glob("*.png")))
    assert rep["inputs"] == n_inputs and rep["deidentified"] + rep["quarantined"] == n_inputs
    report_text = (dst / "deid-report.json").read_text()
    assert str(small_cohort) not in report_text                      # no source paths in DST
    rows = list(csv.DictReader(link.open()))
    assert len(rows) == rep["deidentified"] and all(r["source"].startswith(str(small_cohort)) for r in rows)
    for out in dst.rglob("*.dcm"):
        ds = pydicom.dcmread(out)
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientID.startswith("P")


def test_link_inside_dst_is_refused(small_cohort, tmp_path, pseudo):
    with pytest.raises(ValueError, match="identified-side"):
        deid_folder(small_cohort / "scans", tmp_path / "out", pseudo, tmp_path / "out" / "link.csv")
