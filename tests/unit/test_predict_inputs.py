"""`cbh predict` and `cbh commission` read a cohort's annotations.csv: a row they cannot use is
one sentence naming the file and the row, not a traceback."""

from __future__ import annotations

import csv

import pytest

from pipelines.serving.predict import PredictInputError, prediction_inputs
from tests.conftest import write_cine


def _cohort(tmp_path, ga: str):
    with (tmp_path / "annotations.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "patient_id", "exam_date", "ga_weeks", "label"])
        w.writeheader()
        w.writerow({"image": "scans/a.png", "patient_id": "P1", "exam_date": "2024-01-02", "ga_weeks": "22.5",
                    "label": "normal"})
        w.writerow({"image": "scans/b.png", "patient_id": "P2", "exam_date": "2024-01-03", "ga_weeks": ga,
                    "label": "normal"})
    return tmp_path


def test_cohort_rows_become_items(tmp_path):
    items = prediction_inputs(_cohort(tmp_path, "30"), None, False)
    assert [(name, frame, ga) for _, name, frame, ga, _ in items] == [("scans/a.png", 0, 22.5),
                                                                        ("scans/b.png", 0, 30.0)]


@pytest.mark.parametrize("ga", ["", "about 30"])
def test_a_row_without_a_numeric_ga_is_one_sentence(tmp_path, ga):
    with pytest.raises(PredictInputError, match=r"annotations.csv: data row 2: .*ga_weeks"):
        prediction_inputs(_cohort(tmp_path, ga), None, False)


def test_ga_comes_from_the_dicom_header_when_not_given(small_cohort, tmp_path):
    """Without --ga-weeks a plain folder's DICOM takes StudyDate - LastMenstrualDate (shifted
    together by de-identification, so the interval survives); a PNG or a header without the
    dates gets no GA, which `predict_items` refuses in the file's row."""
    import math
    import shutil

    import pydicom

    from pipelines.serving.predict import header_ga_weeks, prediction_inputs

    folder = tmp_path / "today"
    folder.mkdir()
    src = sorted((small_cohort / "scans").glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    ds.StudyDate, ds.LastMenstrualDate = "20260301", "20250920"        # 162 days: 23.14 weeks
    ds.save_as(folder / "with_lmp.dcm")
    shutil.copy(src, folder / "without.dcm")
    shutil.copy(sorted((small_cohort / "scans").glob("*.png"))[0], folder / "a.png")
    assert header_ga_weeks(folder / "with_lmp.dcm") == pytest.approx(162 / 7)
    got = {name: ga for _, name, _, ga, _ in prediction_inputs(folder, None, False)}
    assert got["with_lmp.dcm"] == pytest.approx(162 / 7)
    assert math.isnan(got["without.dcm"]) and math.isnan(got["a.png"])
    assert all(ga == 21.0 for _, _, _, ga, _ in prediction_inputs(folder, 21.0, False))   # given: it wins


def test_a_cine_is_read_frame_by_frame_at_the_stride(small_cohort, tmp_path):
    from pipelines.serving.predict import prediction_inputs

    folder = tmp_path / "cine"
    folder.mkdir()
    write_cine(sorted((small_cohort / "scans").glob("*.dcm"))[0], folder / "cine.dcm", 5)
    assert [fr for _, _, fr, _, _ in prediction_inputs(folder, 20.0, False)] == [0, 1, 2, 3, 4]
    assert [fr for _, _, fr, _, _ in prediction_inputs(folder, 20.0, False, frame_stride=2)] == [0, 2, 4]


def test_exam_rows_pool_the_usable_frames_of_one_study(small_cohort, tmp_path):
    """Frames of one study (two files here) make one exam: the mean probability of its usable
    frames at the threshold, the measurements of its best frame (highest plane quality); an
    exam with none usable is not_assessable; the study's UID is never written."""
    import math

    from pipelines.serving.predict import exam_rows

    dicoms = sorted((small_cohort / "scans").glob("*.dcm"))
    uid = "1.2.826.0.1.3680043.8.498.999"
    write_cine(dicoms[0], tmp_path / "a.dcm", 2, study=uid)
    write_cine(dicoms[1], tmp_path / "b.dcm", 1, study=uid)
    write_cine(dicoms[2], tmp_path / "c.dcm", 1, study=uid + ".1")
    items = [(tmp_path / "a.dcm", "a.dcm", 0, 22.0, None), (tmp_path / "a.dcm", "a.dcm", 1, 22.0, None),
             (tmp_path / "b.dcm", "b.dcm", 0, 22.0, None), (tmp_path / "c.dcm", "c.dcm", 0, 22.0, None)]

    def row(p, tcd, ok=True, quality=math.nan):
        return {"_assessable": ok, "_quality": quality,
                "prediction": ("hypoplasia" if p >= 0.35 else "normal") if ok else "not_assessable",
                "hypoplasia_probability": p,
                "tcd_mm": tcd, "cm_mm": 5.0, "hc_mm": 200.0, "ga_weeks": 22.0}

    rows = [row(0.2, 20.0, quality=0.81), row(0.6, 22.0, quality=0.93), row(math.nan, math.nan, ok=False, quality=0.99),
            row(math.nan, math.nan, ok=False)]
    exams = exam_rows(items, rows, 0.35, "models:/m/1")
    assert [(e["exam"], e["images"], e["frames"], e["frames_used"]) for e in exams] == [
        ("exam-1", "a.dcm;b.dcm", 3, 2), ("exam-2", "c.dcm", 1, 0)]
    assert exams[0]["hypoplasia_probability"] == pytest.approx(0.4) and exams[0]["prediction"] == "hypoplasia"
    assert (exams[0]["best_image"], exams[0]["best_frame"], exams[0]["_best"]) == ("a.dcm", 1, 1)
    assert exams[0]["tcd_mm"] == pytest.approx(22.0) and exams[0]["plane_quality"] == pytest.approx(0.93)
    rows[1]["_quality"] = 0.5                                        # the other frame is now the better plane
    assert exam_rows(items, rows, 0.35, "m")[0]["tcd_mm"] == pytest.approx(20.0)
    assert exams[1]["best_image"] == "" and math.isnan(exams[1]["tcd_mm"])
    assert exams[1]["prediction"] == "not_assessable" and math.isnan(exams[1]["hypoplasia_probability"])
    assert uid not in str(exams)


def test_a_cine_frame_is_decoded_alone_and_is_the_frame_asked_for(small_cohort, tmp_path):
    """Reading frame k decodes frame k only (the parsed file is kept for the next frame), and
    gives what decoding the whole cine gives at k; a frame past the end is one sentence."""
    import numpy as np
    import pydicom

    from pipelines.imaging import scan as S

    ds = pydicom.dcmread(sorted((small_cohort / "scans").glob("*.dcm"))[0])
    base = ds.pixel_array.astype(np.int16)
    frames = np.stack([np.clip(base + 20 * k, 0, 255) for k in range(4)]).astype(np.uint8)
    if ds.get("SamplesPerPixel", 1) == 3:
        ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.PixelData, ds.NumberOfFrames = np.ascontiguousarray(frames).tobytes(), 4
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    cine = tmp_path / "cine.dcm"
    ds.save_as(cine, enforce_file_format=True)
    whole = S.read_scan(cine).frames
    for k in (2, 0, 3):
        assert np.array_equal(S.read_scan(cine, frame=k).frames[0], whole[k])
    assert not np.array_equal(whole[0], whole[3])
    with pytest.raises(S.ScanError, match="frame 4 does not exist"):
        S.read_scan(cine, frame=4)


def test_dicom_out_seg_and_sr_hold_the_best_frames_labels_and_the_exam_row(small_cohort, tmp_path):
    """`cbh predict --dicom-out`'s writer: per exam, a SEG whose segments read back (highdicom)
    equal the best frame's labels on the source grid, and an SR whose measurements and finding
    equal the exam row; both in the source's study. A PNG exam and an exam with no usable frame
    get nothing, a cine's frame an SR and no SEG, each with its note."""
    import math

    import numpy as np
    import pydicom

    from pipelines.imaging.preprocess import load_frame, prepare_frame, unwarp
    from pipelines.imaging.scan import pixel_spacing_mm, read_dicom, sidecar_spacing_mm
    from pipelines.serving.dicom_out import read_back
    from pipelines.serving.predict import exam_rows, write_dicom_results

    dicoms = sorted((small_cohort / "scans").glob("*.dcm"))
    png = sorted((small_cohort / "scans").glob("*.png"))[0]
    cine = tmp_path / "cine.dcm"
    write_cine(dicoms[1], cine, 3, study="1.2.826.0.1.3680043.8.498.77")
    ds = pydicom.dcmread(cine)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"   # US multi-frame
    ds.save_as(cine)
    items = [(dicoms[0], "a.dcm", 0, 22.0, None), (png, "b.png", 0, 22.0, None), (cine, "cine.dcm", 2, 22.0, None),
             (dicoms[2], "c.dcm", 0, 22.0, None)]

    def row(path, frame, ok=True):
        grey, valid = load_frame(path, frame)
        spacing = sidecar_spacing_mm(path) if path.suffix == ".png" else pixel_spacing_mm(read_dicom(path, True))
        _img, crop = prepare_frame(grey, valid, spacing, 96, 1.15)
        labels = np.zeros((96, 96), np.uint8)
        labels[40:56, 30:66], labels[60:66, 40:56] = 1, 2
        return {"_assessable": ok, "_quality": 0.9, "prediction": "hypoplasia" if ok else "not_assessable",
                "hypoplasia_probability": 0.8 if ok else math.nan, "tcd_mm": 18.5, "tcd_centile": 1.5,
                "cm_mm": 4.0, "cm_centile": 40.0, "hc_mm": 190.0, "hc_centile": math.nan, "ga_weeks": 22.0,
                "_labels": labels, "_crop": crop, "_shape": grey.shape}

    rows = [row(p, f, ok=k != 3) for k, (p, _n, f, _g, _m) in enumerate(items)]
    exams = exam_rows(items, rows, 0.5, "models:/m/3")
    written, notes = write_dicom_results(exams, items, rows, tmp_path / "pacs", "models:/m/3")
    assert written == 2 and sorted(p.name for p in (tmp_path / "pacs").iterdir()) == ["exam-1", "exam-3"]
    assert notes == ["exam-2: scored on PNG/JPEG, no DICOM study to return to",
                     "exam-3: no SEG for a frame of a cine without patient coordinates (the SR names the frame)",
                     "exam-4: no assessable frame, nothing to report"]
    labels, values, finding = read_back(tmp_path / "pacs/exam-1/seg.dcm", tmp_path / "pacs/exam-1/sr.dcm")
    want = unwarp(rows[0]["_labels"], rows[0]["_crop"], rows[0]["_shape"])
    assert np.array_equal(labels, want) and (labels == 1).sum() > 100 and (labels == 2).sum() > 20
    assert values == {"11863-8": 18.5, "125012:11863-8": 1.5, "11860-4": 4.0, "125012:11860-4": 40.0,
                      "11984-2": 190.0, "122157": 0.8, "18185-9": 22.0}        # HC without a centile: none
    assert finding == "hypoplasia"
    src = pydicom.dcmread(dicoms[0], stop_before_pixels=True)
    for name in ("seg.dcm", "sr.dcm"):
        out = pydicom.dcmread(tmp_path / "pacs/exam-1" / name)
        assert (out.StudyInstanceUID, out.PatientID) == (src.StudyInstanceUID, src.PatientID)
    sr = pydicom.dcmread(tmp_path / "pacs/exam-3/sr.dcm")
    assert not (tmp_path / "pacs/exam-3/seg.dcm").exists()
    assert {int(e.value) for e in sr.iterall() if e.keyword == "ReferencedFrameNumber"} == {3}   # frame 2, 1-based
    # a de-identified source: the results carry its shifted study date, never the real day they were made
    deid = tmp_path / "deid.dcm"
    ds = pydicom.dcmread(dicoms[0])
    ds.PatientIdentityRemoved, ds.StudyDate, ds.StudyTime = "YES", "20190304", "101500"
    ds.save_as(deid)
    write_dicom_results(exams[:1], [(deid, *items[0][1:])], rows[:1], tmp_path / "deid-out", "models:/m/3")
    for name in ("seg.dcm", "sr.dcm"):
        out = pydicom.dcmread(tmp_path / "deid-out/exam-1" / name)
        dates = {str(e.value) for e in out.iterall() if e.VR in ("DA", "DT") and e.value}
        assert dates <= {"20190304", "20190304101500"} and out.PatientIdentityRemoved == "YES", dates
    # written again, the same objects (a PACS replaces rather than duplicates them)
    first = pydicom.dcmread(tmp_path / "pacs/exam-1/sr.dcm").SOPInstanceUID
    write_dicom_results(exams, items, rows, tmp_path / "again", "models:/m/3")
    assert pydicom.dcmread(tmp_path / "again/exam-1/sr.dcm").SOPInstanceUID == first
    # another model version or threshold never reuses them
    write_dicom_results(exams, items, rows, tmp_path / "v4", "models:/m/4")
    write_dicom_results(exams, items, rows, tmp_path / "thr", "models:/m/3", 0.25)
    assert len({first, pydicom.dcmread(tmp_path / "v4/exam-1/sr.dcm").SOPInstanceUID,
                pydicom.dcmread(tmp_path / "thr/exam-1/sr.dcm").SOPInstanceUID}) == 3
