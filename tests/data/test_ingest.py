"""Ingest: every row processed or quarantined with its reason; nothing identifying out."""

import datetime as dt
import shutil

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.data.ingest import (
    MANIFEST_SCHEMA,
    CohortError,
    cohort_name,
    ingest_cohort,
    read_annotations,
    upsert,
)
from pipelines.deid.folder import ProcessPool

KEEP = ("image", "frame", "ga_weeks", "label", "tcd_mm", "cm_mm", "mask", "annotator", "site")


def _ingest(cohort, ws, pseudo, today=None, workers=1):
    return ingest_cohort(cohort, ws, "data/deid", pseudo, KEEP, today or dt.date(2026, 1, 1),
                         runner=ProcessPool(workers))


def _rewrite_csv(cohort, edit):
    path = cohort / "annotations.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def test_no_annotations_csv_is_one_clear_error(tmp_path):
    (tmp_path / "scans").mkdir()
    with pytest.raises(CohortError, match="annotations.csv not found"):
        read_annotations(tmp_path)


def test_bad_rows_are_quarantined_and_the_rest_processed(cohort_copy, tmp_path, pseudo):
    """Unreadable rows stop at ingest; readable rows with a defect the contract judges carry
    their ingest-time check (made before the date shift) and are quarantined by the contract."""
    from pipelines.contract.validate import ValidateParams, validate_manifest
    from tests.conftest import ROOT

    rows = read_annotations(cohort_copy)
    dicoms = [i for i, r in enumerate(rows) if r["image"].endswith(".dcm")]
    corrupt, missing, future, mismatch, no_mask, bad_date = dicoms[:6]
    (cohort_copy / rows[corrupt]["image"]).write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 64)
    (cohort_copy / rows[no_mask]["mask"]).unlink()

    def edit(lines):
        out = list(lines)
        for idx, old, new in ((missing, rows[missing]["image"], "scans/not-there.dcm"),
                              (future, rows[future]["exam_date"], "2030-01-01"),
                              (bad_date, rows[bad_date]["exam_date"], "2019-02-30")):
            out[idx + 1] = out[idx + 1].replace(old, new, 1)
        fields = out[mismatch + 1].split(",")
        fields[2] = "SOMEONE-ELSE"                         # patient_id column
        out[mismatch + 1] = ",".join(fields)
        return out

    _rewrite_csv(cohort_copy, edit)
    ws = tmp_path / "ws"
    res = _ingest(cohort_copy, ws, pseudo, workers=2)                     # held files cross the pool
    assert len(res.manifest) + len(res.quarantine) == len(rows)           # nothing dropped
    by_row = {q["source_row"]: q["reason_code"] for q in res.quarantine}
    # an invalid date cannot be shifted: it stops at ingest, the contract never sees it
    assert by_row == {corrupt + 1: "unreadable_dicom", missing + 1: "file_not_found", bad_date + 1: "bad_exam_date"}
    assert "2019-02-30" not in str(res.quarantine)
    assert all(q["reason"] and q["cohort"] == cohort_name(cohort_copy) for q in res.quarantine)
    checks = {m["source_row"]: (m["exam_date_check"], m["patient_check"], m["mask_status"]) for m in res.manifest}
    assert checks[future + 1] == ("future", "ok", "ok") and checks[mismatch + 1] == ("ok", "mismatch", "ok")
    assert checks[no_mask + 1] == ("ok", "ok", "missing")
    assert sum(c == ("ok", "ok", "ok") for c in checks.values()) == len(res.manifest) - 3

    upsert(ws / "manifest.parquet", res.manifest, MANIFEST_SCHEMA, ("image_id",))
    shutil.copytree(ROOT / "expectations", tmp_path / "gx", ignore=shutil.ignore_patterns("uncommitted"))
    report = validate_manifest(ws / "manifest.parquet", tmp_path / "gx", ValidateParams(min_per_class=2),
                               workspace=ws)
    contract = {q["source_row"]: q["reason_code"] for q in report.quarantined}
    assert contract == {future + 1: "annotations.expect_column_values_to_be_in_set.exam_date_check",
                        mismatch + 1: "annotations.expect_column_values_to_be_in_set.patient_check",
                        no_mask + 1: "masks.expect_column_values_to_be_in_set.mask_status"}
    assert report.success


def test_manifest_holds_no_identifier(small_cohort, tmp_path, pseudo):
    import pydicom
    res = _ingest(small_cohort, tmp_path / "ws", pseudo)
    upsert(tmp_path / "m.parquet", res.manifest, MANIFEST_SCHEMA, ("image_id",))
    table_bytes = (tmp_path / "m.parquet").read_bytes()
    text = str(pq.read_table(tmp_path / "m.parquet").to_pylist())
    rows = read_annotations(small_cohort)
    for r in rows:
        if r["image"].endswith(".dcm"):
            ds = pydicom.dcmread(small_cohort / r["image"], stop_before_pixels=True)
            for ident in (ds.PatientID, str(ds.PatientName).split("^")[0], ds.InstitutionName, ds.AccessionNumber):
                assert ident not in text and ident.encode() not in table_bytes
        assert r["comments"].split()[-1] not in text                      # free text dropped
    shifted = {m["exam_date"].isoformat() for m in res.manifest}
    assert not shifted & {r["exam_date"] for r in rows}                   # all dates shifted


def test_reingest_changes_nothing(small_cohort, tmp_path, pseudo):
    ws = tmp_path / "ws"
    out = tmp_path / "manifest.parquet"
    upsert(out, _ingest(small_cohort, ws, pseudo).manifest, MANIFEST_SCHEMA, ("image_id",))
    first = out.read_bytes()
    files = sorted((p.relative_to(ws), p.read_bytes()) for p in ws.rglob("*") if p.is_file())
    upsert(out, _ingest(small_cohort, ws, pseudo).manifest, MANIFEST_SCHEMA, ("image_id",))
    assert out.read_bytes() == first
    assert sorted((p.relative_to(ws), p.read_bytes()) for p in ws.rglob("*") if p.is_file()) == files


def test_same_patient_same_pseudonym_across_exams(small_cohort, tmp_path, pseudo):
    res = _ingest(small_cohort, tmp_path / "ws", pseudo)
    rows = read_annotations(small_cohort)
    by_stem = {}
    for m in res.manifest:
        patient_number = rows[m["source_row"] - 1]["image"].split("/")[1][:4]
        by_stem.setdefault(patient_number, set()).add(m["patient_pseudo"])
    assert all(len(v) == 1 for v in by_stem.values())
    assert len({next(iter(v)) for v in by_stem.values()}) == len(by_stem)


def test_a_mask_that_is_no_mask_is_never_copied(cohort_copy, tmp_path, pseudo):
    """A screenshot given as a mask (grey values, text that may name the patient) is not
    written to the de-identified store: its row says so, and the data contract quarantines it."""
    rows = read_annotations(cohort_copy)
    n, row = next((n, r) for n, r in enumerate(rows, 1) if r["mask"])
    shot = np.zeros((200, 300), np.uint8)
    cv2.putText(shot, "DOE JANE 1980-02-03", (10, 100), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 200, 2)
    cv2.imwrite(str(cohort_copy / row["mask"]), shot)
    res = _ingest(cohort_copy, tmp_path / "ws", pseudo)
    m = next(m for m in res.manifest if m["source_row"] == n)
    assert m["mask_status"] == "unexpected_values" and m["mask_path"] is None
    written = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in (tmp_path / "ws" / "data/deid").rglob("*_mask-*.png")]
    assert len(written) == sum(1 for r in rows if r["mask"]) - 1
    assert all(set(np.unique(w).tolist()) <= {0, 1, 2} for w in written)


def test_png_without_sidecar_is_quarantined(cohort_copy, tmp_path, pseudo):
    rows = read_annotations(cohort_copy)
    png = next(r for r in rows if r["image"].endswith(".png"))
    (cohort_copy / png["image"]).with_suffix(".json").unlink()
    res = _ingest(cohort_copy, tmp_path / "ws", pseudo)
    assert [q["reason_code"] for q in res.quarantine] == ["no_pixel_spacing"]
    shutil.rmtree(tmp_path / "ws")


def test_hc18_import_ingests_head_masks_and_hc(tmp_path, pseudo):
    """Real HC18 frames through `cbh import hc18`: PNG with sidecar spacing, no label, a head
    mask and the expert's HC per row; a head mask outside the cohort is quarantined, not read."""
    import cv2

    from pipelines.data.importers import import_hc18
    from tests.conftest import ROOT

    cohort = tmp_path / "hc18"
    import_hc18(ROOT / "tests" / "fixtures" / "hc18", cohort, dt.date(2025, 6, 1))
    (tmp_path / "outside.png").write_bytes((cohort / "masks" / "002_HC_head.png").read_bytes())
    _rewrite_csv(cohort, lambda lines: [lines[0], lines[1], lines[2],
                                        lines[3].replace("masks/631_2HC_head.png", "../outside.png")])
    ws = tmp_path / "ws"
    res = _ingest(cohort, ws, pseudo)
    assert [(q["source_row"], q["reason_code"]) for q in res.quarantine] == [(3, "bad_head_mask_path")]
    assert res.quarantine[0]["reason"] == "head_mask path points outside the cohort"
    assert len(res.manifest) == 2
    for m in res.manifest:
        assert m["label"] is None and m["mask_status"] == "none" and m["mask_path"] is None
        assert m["head_mask_status"] == "ok" and m["head_mask_path"].split("/")[-1].startswith(f"{m['image_id']}_head-")
        assert m["head_mask_path"].startswith(f"data/deid/{m['patient_pseudo']}/")
        head = cv2.imread(str(ws / m["head_mask_path"]), cv2.IMREAD_UNCHANGED)
        assert head.shape == (m["rows"], m["cols"]) and set(head.ravel().tolist()) == {0, 1}
    assert sorted(m["hc_mm"] for m in res.manifest) == [68.75, 71.91]
    table = upsert(ws / "manifest.parquet", res.manifest, MANIFEST_SCHEMA, ("image_id",))
    assert table.schema.field("hc_mm").type == "double" and "head_mask_status" in table.column_names


def test_a_spacing_outside_the_limits_is_quarantined_before_any_pixel_work(cohort_copy, tmp_path, pseudo):
    """A sidecar in the wrong unit (0.0001 mm per pixel: metres read as mm) would be measured in
    nonsense and resampled without bound: the scan's rows are held with `implausible_spacing`."""
    import json

    rows = read_annotations(cohort_copy)
    n, row = next((n, r) for n, r in enumerate(rows, 1) if r["image"].endswith(".png"))
    sidecar = (cohort_copy / row["image"]).with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "pixel_spacing_mm": [0.0001, 0.0001]}))
    res = _ingest(cohort_copy, tmp_path / "ws", pseudo)
    held = [q for q in res.quarantine if q["source_row"] == n]
    assert [q["reason_code"] for q in held] == ["implausible_spacing"]
    assert "0.0001 x 0.0001 mm lies outside" in held[0]["reason"]
    assert all(m["source_row"] != n for m in res.manifest)


def test_first_exam_period_keeps_the_real_order_the_shifted_dates_blur(small_cohort, tmp_path, pseudo):
    """Each patient's fifth of the real first-exam order (taken before the shift): it never
    decreases with the real date, the temporal test set is drawn from the latest fifth, and no
    real date (nor a day-by-day rank) leaves ingest."""
    import pandas as pd
    import pydicom

    from pipelines.data.split import assign_splits

    res = _ingest(small_cohort, tmp_path / "ws", pseudo)
    first: dict[str, dt.date] = {}
    for row in read_annotations(small_cohort):
        raw = row["patient_id"].strip() or str(pydicom.dcmread(small_cohort / row["image"],
                                                               stop_before_pixels=True).PatientID)
        day = dt.date.fromisoformat(row["exam_date"])
        first[pseudo.patient(raw)] = min(day, first.get(pseudo.patient(raw), day))
    manifest = pd.DataFrame(res.manifest)
    assert "_real_exam" not in manifest.columns and "first_exam_rank" not in manifest.columns
    period = manifest.groupby("patient_pseudo")["first_exam_period"].first()
    real_order = sorted(period.index, key=lambda p: first[p])
    assert list(period.loc[real_order]) == sorted(period) and set(period) == {1, 2, 3, 4, 5}
    assert period.value_counts().max() - period.value_counts().min() <= 1       # fifths of equal size
    shifted = manifest.groupby("patient_pseudo")["exam_date"].min()
    assert sorted(period.index, key=lambda p: shifted[p]) != real_order          # the shifted dates blur it
    dataset, frozen = assign_splits(manifest, None, 0.2, 0.3, 7)
    test = set(frozen["patient_pseudo"])
    assert len(test) == (period == 5).sum() and {int(period[p]) for p in test} == {5}   # 12 patients: 2 per fifth


def test_validation_patients_do_not_depend_on_the_key(small_cohort, tmp_path, pseudo):
    """Two workspaces ingesting the same cohort under different keys draw the same validation
    (and test) patients from the same seed: the draw runs in a key-free order."""
    import pandas as pd
    import pydicom

    from pipelines.data.split import assign_splits
    from pipelines.deid.core import Pseudonymizer

    raw_id = {}
    for row in read_annotations(small_cohort):
        raw_id[row["image"]] = row["patient_id"].strip() or str(pydicom.dcmread(
            small_cohort / row["image"], stop_before_pixels=True).PatientID)
    splits = []
    for n, p in enumerate((pseudo, Pseudonymizer(b"another-workspace-key-of-32-bytes!!", 365))):
        manifest = pd.DataFrame(_ingest(small_cohort, tmp_path / f"ws{n}", p).manifest)
        real = {p.patient(r): r for r in raw_id.values()}
        dataset, _ = assign_splits(manifest, None, 0.2, 0.3, 7)
        splits.append({s: sorted({real[q] for q in dataset.loc[dataset["split"] == s, "patient_pseudo"]})
                       for s in ("train", "val", "test")})
        splits[-1]["rows"] = dataset["pixel_sha256"].tolist()       # the order training reads them in
        assert splits[-1]["val"]
    assert splits[0] == splits[1]
    # the old order (sorted pseudonyms) would have differed between the keys: the test can fail
    names = sorted(raw_id.values())
    assert sorted(names, key=pseudo.patient) != sorted(names, key=Pseudonymizer(
        b"another-workspace-key-of-32-bytes!!", 365).patient)


def test_first_exams_on_one_day_are_ranked_without_the_key():
    """Ten patients first seen on the same day straddle the fifths: which fifth each gets
    follows its pixels' digest, so renaming the patients (another key) moves none of them."""
    from pipelines.data.ingest import REAL_EXAM, rank_first_exams

    def manifest(names):
        return [{REAL_EXAM: (dt.date(2025, 3, 1), names[i]), "pixel_sha256": f"{(i * 7) % 10:064d}",
                 "patient_pseudo": names[i]} for i in range(10)]

    one, other = [f"P{i}" for i in range(10)], [f"P{9 - i}x" for i in range(10)]
    got = [manifest(one), manifest(other)]
    for rows in got:
        rank_first_exams(rows)
    assert [r["first_exam_period"] for r in got[0]] == [r["first_exam_period"] for r in got[1]]
    assert sorted(r["first_exam_period"] for r in got[0]) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
