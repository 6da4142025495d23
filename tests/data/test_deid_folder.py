"""`cbh deid SRC DST`: every file de-identified or counted as quarantined; the link apart."""

import csv

import pydicom
import pytest

from pipelines.deid.folder import deid_folder


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


@pytest.mark.heavy         # a run killed mid-write and run again (about 20 s): make test-heavy, in .ci/run
def test_a_killed_runs_partial_files_are_removed_on_rerun(small_cohort, tmp_path, pseudo):
    """What a SIGKILL mid-write leaves (a temporary output, audit record or quarantine copy) is
    gone after the rerun, and the outputs are those of a clean run."""
    dst, held = tmp_path / "out", tmp_path / "held"
    clean = deid_folder(small_cohort / "scans", tmp_path / "clean", pseudo, quarantine=tmp_path / "held0")
    partial = [dst / "Pabc" / ".tmp-x1.dcm", dst / ".cbh-deid" / "audit" / ".tmp-x2.json", held / "files" / ".tmp-x3"]
    for p in partial:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")
    rep = deid_folder(small_cohort / "scans", dst, pseudo, quarantine=held)
    assert not any(p.exists() for p in partial)
    assert rep["deidentified"] == clean["deidentified"] == len(list(dst.rglob("*.dcm"))) + len(list(dst.rglob("*.png")))
    assert sorted(p.relative_to(dst) for p in dst.rglob("*.dcm")) == \
        sorted(p.relative_to(tmp_path / "clean") for p in (tmp_path / "clean").rglob("*.dcm"))


def test_one_run_at_a_time_writes_a_destination(small_cohort, tmp_path, pseudo):
    from pipelines.deid.folder import FolderError
    from pipelines.locks import exclusive_lock

    dst = tmp_path / "out"
    with exclusive_lock(dst / ".cbh-deid" / "run.lock"):          # another run holds the destination
        with pytest.raises(FolderError, match="another `cbh deid` is writing"):
            deid_folder(small_cohort / "scans", dst, pseudo)
    assert not list(dst.rglob("*.dcm"))
    assert deid_folder(small_cohort / "scans", dst, pseudo)["deidentified"] > 0   # released: it runs
