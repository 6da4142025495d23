"""De-identification: keyed pseudonyms, date shifts, PS3.15 Table E.1-1 with options, clean pixels."""

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipelines.deid import core as D
from pipelines.deid import profile as P
from pipelines.imaging import scan as S

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def test_pseudonyms_are_keyed_and_consistent(pseudo):
    other = D.Pseudonymizer(b"another key", 365)
    assert pseudo.patient("MRN123") == pseudo.patient("MRN123 ")
    assert pseudo.patient("MRN123") != pseudo.patient("MRN124")
    assert pseudo.patient("MRN123") != other.patient("MRN123")
    uid = pseudo.uid("1.2.840.1234.5")
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid == pseudo.uid("1.2.840.1234.5")


def test_date_shift_is_per_patient_and_keeps_intervals(pseudo):
    a, b = dt.date(2020, 1, 1), dt.date(2020, 3, 1)
    shift = pseudo.shift_days("MRN1")
    assert abs(shift) <= 365
    assert pseudo.shift_date(b, "MRN1") - pseudo.shift_date(a, "MRN1") == b - a
    shifts = {pseudo.shift_days(f"MRN{i}") for i in range(20)}
    assert len(shifts) > 10                       # patients get different offsets


def test_missing_key_is_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.delenv("CBH_DEID_KEY", raising=False)
    with pytest.raises(D.MissingKeyError, match="CBH_DEID_KEY is not set"):
        D.load_key("CBH_DEID_KEY", tmp_path / "deid.key")
    key = D.load_key("CBH_DEID_KEY", tmp_path / "deid.key", create=True)
    assert len(key) >= 32 and (tmp_path / "deid.key").stat().st_mode & 0o777 == 0o600


def test_a_guessable_key_or_a_readable_key_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CBH_DEID_KEY", "a")
    with pytest.raises(D.WeakKeyError, match="CBH_DEID_KEY: the pseudonymisation key has 1 characters"):
        D.load_key("CBH_DEID_KEY", None)
    monkeypatch.delenv("CBH_DEID_KEY")
    key_file = tmp_path / "deid.key"
    D.load_key("CBH_DEID_KEY", key_file, create=True)
    key_file.chmod(0o644)
    with pytest.raises(D.WeakKeyError, match="mode 0644 lets others read"):
        D.load_key("CBH_DEID_KEY", key_file)


def _identifiers(ds: pydicom.Dataset) -> list[str]:
    values = [str(ds.PatientName).replace("^", " "), str(ds.PatientName).split("^")[0], ds.PatientID,
              ds.PatientBirthDate, ds.AccessionNumber, ds.InstitutionName, ds.StudyDate,
              str(ds.ReferringPhysicianName).split("^")[0], ds.OtherPatientIDsSequence[0].PatientID,
              ds.RequestAttributesSequence[0].RequestedProcedureID, ds.InstitutionAddress, ds.StudyID]
    return [v for v in values if v]


def test_synthetic_export_leaves_no_identifier(small_cohort, pseudo, tmp_path):
    src = small_cohort / "scans" / sorted(p.name for p in (small_cohort / "scans").glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    assert ds.BurnedInAnnotation == "YES" and "SequenceOfUltrasoundRegions" in ds
    clean, audit = D.Deidentifier(pseudo).dicom(ds, ds.PatientID)
    out = tmp_path / "out.dcm"
    clean.save_as(out, enforce_file_format=True)
    raw = out.read_bytes()
    for ident in _identifiers(ds):
        assert ident.encode() not in raw, f"identifier {ident!r} leaked"
    for value in (ds.PatientID, str(ds.PatientName), ds.AccessionNumber):
        assert value not in str(audit)                                  # the audit names actions, not values
    back = pydicom.dcmread(out)
    assert back.PatientIdentityRemoved == "YES" and back.BurnedInAnnotation == "NO"
    assert back.LongitudinalTemporalInformationModified == "MODIFIED"
    assert [c.CodeValue for c in back.DeidentificationMethodCodeSequence] == \
        ["113100", "113101", "113105", "113107", "113109"]
    assert not any(el.tag.is_private for el in back.iterall())
    assert back.StudyInstanceUID != ds.StudyInstanceUID and back.PatientID == pseudo.patient(ds.PatientID)
    assert back.PatientName == back.PatientID                           # one pseudonym per patient
    assert back.AccessionNumber == back.RequestAttributesSequence[0].AccessionNumber != ds.AccessionNumber
    assert "RequestedProcedureID" not in back.RequestAttributesSequence[0]   # nested: the table applies
    assert back.Manufacturer == ds.Manufacturer and back.StationName == ds.StationName  # Retain Device Identity
    shift = pseudo.shift_days(ds.PatientID)
    assert S.parse_da(back.StudyDate) - S.parse_da(ds.StudyDate) == dt.timedelta(days=shift)
    assert back.AcquisitionDateTime[8:] == ds.AcquisitionDateTime[8:]  # time of day kept, date shifted
    # the banner lies above the ultrasound region: burned-in text is there before, blank after
    y0 = int(ds.SequenceOfUltrasoundRegions[0].RegionLocationMinY0)
    assert ds.pixel_array[:y0].max() > 0
    assert back.pixel_array[:y0].max() == 0
    # inside the region the image is untouched (lossless)
    assert np.array_equal(back.pixel_array[y0 + 5:], ds.pixel_array[y0 + 5:])


def test_writing_the_cleaned_pixels_warns_nothing(small_cohort, pseudo, caplog):
    """The cleaned pixels go into Pixel Data as a view of their array; pydicom's value check
    would log a warning for every file (it was seen once per `cbh ingest`)."""
    import warnings

    src = sorted((small_cohort / "scans").glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING", logger="pydicom"):
        warnings.simplefilter("always")
        clean, _ = D.Deidentifier(pseudo).dicom(ds, ds.PatientID)
    assert isinstance(clean.PixelData, memoryview)
    assert not [str(w.message) for w in caught] and not caplog.records


def test_profile_follows_table_and_options():
    basic = P.build_profile(())
    assert len(P.table()) == 621
    station, serial, study_date = 0x00081010, 0x00181000, 0x00080020
    assert basic.actions[station] == "X/Z/D" and basic.actions[study_date] == "Z"
    chosen = P.build_profile(D.DEFAULT_OPTIONS)
    assert chosen.actions[station] == "K" and chosen.actions[serial] == "K"        # Retain Device Identity
    assert chosen.actions[study_date] == "C"                                        # modified dates
    assert chosen.actions[0x00081030] == "C"                                        # study description: clean
    assert chosen.actions[0x00181200] == "C"     # Date of Last Calibration: C (dates) beats K (device)
    assert basic.temporal == "REMOVED" and chosen.temporal == "MODIFIED"
    with pytest.raises(P.OptionError, match="unknown option"):
        P.build_profile(("retain_safe_private",))
    with pytest.raises(P.OptionError, match="exclude each other"):
        P.build_profile(("retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"))


def test_basic_profile_alone_removes_dates_and_device(small_cohort, pseudo):
    ds = pydicom.dcmread(sorted((small_cohort / "scans").glob("*.dcm"))[0])
    clean, _ = D.Deidentifier(pseudo, D.Settings(options=("clean_pixel_data",))).dicom(ds, ds.PatientID)
    assert not clean.StudyDate and "StudyDate" in clean and "AcquisitionDate" not in clean
    assert "StationName" not in clean
    assert clean.LongitudinalTemporalInformationModified == "REMOVED"
    assert [c.CodeValue for c in clean.DeidentificationMethodCodeSequence] == ["113100", "113101"]


def test_ultrasound_without_regions_needs_a_template(pseudo):
    ds = pydicom.dcmread(PYDICOM_FILES / "examples_rgb_color.dcm")
    with pytest.raises(D.DeidError) as err:
        D.Deidentifier(pseudo).clean_dicom(ds)
    assert err.value.code == "no_pixel_template"
    def template(keep):
        return D.parse_templates([{"manufacturer": ds.Manufacturer, "model": ds.get("ManufacturerModelName", ""),
                                   "rows": ds.Rows, "columns": ds.Columns, "keep": [keep]}])

    # a template that keeps the device's own text (a code column, a clock, "LYMPH NODE"): OCR reads it
    with pytest.raises(D.DeidError) as err:
        D.Deidentifier(pseudo, D.Settings(templates=template([10, 20, 200, 200]))).clean_dicom(ds)
    assert err.value.code == "residual_text"
    cleaned = D.Deidentifier(pseudo, D.Settings(templates=template([30, 60, 200, 150]))).clean_dicom(ds)
    assert cleaned.method == "template" and cleaned.frames[0, :60].max() == 0
    assert np.array_equal(cleaned.frames[0, 60:151, 30:201], ds.pixel_array[60:151, 30:201])


def test_unreadable_file(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"garbage" * 10)
    with pytest.raises(S.ScanError) as err:
        S.read_dicom(bad)
    assert err.value.code == "unreadable_dicom"


def test_header_pass_edge_cases(pseudo):
    """Unlisted attributes go, listed sequences follow the table, empty identifiers stay empty,
    overlays and pixel-module attributes inside sequences go, and the audit has no value."""
    ds = pydicom.Dataset()
    ds.PatientID, ds.AccessionNumber, ds.HeartRate, ds.ImageType = "MRN77", "", 142, ["ORIGINAL", "PRIMARY"]
    ds.add_new(0x60000010, "US", 480)                                    # overlay rows
    region = pydicom.Dataset()
    region.RegionLocationMinX0, region.BurnedInAnnotation, region.ContrastBolusAgent = 3, "YES", "Iodine Jones"
    ds.SequenceOfUltrasoundRegions = pydicom.Sequence([region])
    ref = pydicom.Dataset()
    ref.ReferencedSOPInstanceUID = "1.2.3.4"
    ds.ReferencedImageSequence = pydicom.Sequence([ref])                 # X/Z/U* in the table: removed
    header = P.HeaderPass(P.build_profile(D.DEFAULT_OPTIONS), pseudo, "MRN77")
    out = header.run(ds)
    assert "HeartRate" not in out and "ReferencedImageSequence" not in out and 0x60000010 not in out
    assert out.ImageType == ["ORIGINAL", "PRIMARY"] and out.AccessionNumber in ("", None)
    assert out.PatientID == pseudo.patient("MRN77")
    item = out.SequenceOfUltrasoundRegions[0]
    assert item.RegionLocationMinX0 == 3 and "BurnedInAnnotation" not in item and "ContrastBolusAgent" not in item
    actions = {a["path"]: a["action"] for a in header.audit}
    assert actions["HeartRate"] == "X:unlisted" and actions["OverlayRows"] == "X:overlay-or-curve"
    assert actions["SequenceOfUltrasoundRegions[0].ContrastBolusAgent"].startswith("X")
    assert "MRN77" not in str(header.audit) and "Jones" not in str(header.audit)


def test_clean_pixels_blanks_exactly_outside_the_regions():
    """The band-by-band slicing equals the plain mask (every frame, grey and colour, boxes that
    overlap, touch the edges or reach past them), and the fill is the given colour."""
    rng = np.random.default_rng(3)
    for boxes in ([(10, 5, 40, 30)], [(0, 0, 63, 47)], [(5, 5, 20, 20), (15, 10, 50, 40), (60, 0, 90, 10)],
                  [(-3, 40, 10, 70)], []):
        for shape, fill in (((3, 48, 64), 7), ((2, 48, 64, 3), (0, 128, 128))):
            arr = rng.integers(1, 250, shape, dtype=np.uint8)
            keep = S.region_mask(shape[1:3], boxes)
            out = D.clean_pixels(arr, boxes, fill=fill)
            expected = np.where(keep.reshape(1, *keep.shape, *([1] * (arr.ndim - 3))), arr,
                                np.asarray(fill, np.uint8))
            assert np.array_equal(out, expected), (boxes, shape)
            assert not np.array_equal(arr, out) or keep.all()          # a copy unless inplace
        # planar colour: cleaned in place through the (frames, rows, cols, 3) view of its planes
        planes = rng.integers(1, 250, (2, 3, 48, 64), dtype=np.uint8)
        view, before = np.moveaxis(planes, 1, -1), np.moveaxis(planes, 1, -1).copy()
        assert D.is_planar(view) and not D.is_planar(before)
        D.clean_pixels(view, boxes, inplace=True, fill=(0, 128, 128))
        keep = S.region_mask((48, 64), boxes)
        assert np.array_equal(np.moveaxis(planes, 1, -1), np.where(keep[None, ..., None], before,
                                                                   np.array([0, 128, 128], np.uint8)))


def test_ocr_comes_from_pip_and_runs_without_tesseract_on_the_path(small_cohort, tmp_path):
    """Both engines come from pip with their models: PP-OCR (rapidocr-onnxruntime's models on
    onnxruntime) and Tesseract (tesserocr's bundled libtesseract, the pip English model). A process
    with no `tesseract` on its PATH, torch loaded first (its own OpenMP runtime), reads the words
    with each, and `cbh deid` there de-identifies and verifies a folder."""
    import os
    import subprocess
    import sys

    script = """
import json, cv2, numpy as np
import torch  # noqa: F401  (first: the engine must not depend on which OpenMP runtime is loaded)
from pipelines.deid import ocr
img = np.zeros((120, 520), np.uint8)
cv2.putText(img, "DOE JANE 12/03/2020", (10, 70), cv2.FONT_HERSHEY_SIMPLEX, 1.2, 255, 2)
print(json.dumps([ocr.engine("tesseract"), ocr.shown_words(img),
                  ocr.residual_text(img, ocr.OcrSettings(engine="tesseract")),
                  ocr.engine("ppocr"), ocr.residual_text(img, ocr.OcrSettings(engine="ppocr"))]))
"""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PATH=str(Path(sys.executable).parent), CBH_DEID_KEY="test-key-not-a-secret-0123456789abcdef")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root,
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    engine, words, residual, pp_engine, pp_residual = json.loads(res.stdout.strip().splitlines()[-1])
    assert engine.startswith("tesserocr 5.")
    assert {"DOE", "JANE", "12/03/2020"} <= {w for w, conf in words if conf >= 80}
    assert residual == ["DOE", "JANE", "12/03/2020"]
    assert pp_engine.startswith("rapidocr-onnxruntime 1.4.4 onnxruntime ")
    assert len(pp_residual) == 3 and {"JANE", "12/03/2020"} <= set(pp_residual)    # DOE read as D0E

    src = tmp_path / "src"
    src.mkdir()
    for dcm in sorted((small_cohort / "scans").glob("*.dcm"))[:3]:
        shutil.copy(dcm, src / dcm.name)
    res = subprocess.run([sys.executable, "-m", "flows.cli", "deid", str(src), str(tmp_path / "dst")],
                         capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "dst" / "deid-report.json").read_text())
    assert report["deidentified"] == 3 and report["ocr_verified"] >= 1


def test_ocr_reads_bright_text_laid_over_speckle(tmp_path):
    """Legible white text over a synthetic head: Tesseract reading the frame as the first read
    does (inverted, one polarity) loses it in the speckle; the second read, of the bright marks
    alone, finds it. The head without text stays clean (a false alarm would quarantine a clean
    scan). PP-OCR reads the same frames."""
    import cv2

    from pipelines.data.synth import synth_cohort
    from pipelines.deid import ocr

    synth_cohort(tmp_path, 2, 3, ("cirrus",), png_fraction=0.0)
    grey = ocr.shown_grey(S.frames_rgb_or_grey(pydicom.dcmread(tmp_path / "scans" / "0000_0.dcm"))[0][0])
    h, w = grey.shape
    head = grey[int(0.4 * h):int(0.85 * h), int(0.3 * w):int(0.7 * w)].copy()     # speckle, no banner
    settings, pp = ocr.OcrSettings(engine="tesseract"), ocr.OcrSettings(engine="ppocr")
    assert ocr.residual_text([head], settings) == [] and ocr.residual_text([head], pp) == []
    lost_in_speckle = 0
    for x, y in ((10, 60), (40, 120), (20, 200), (60, 250), (5, 160)):
        img = head.copy()
        cv2.putText(img, "Jane Doe 14:32", (x, y), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 255, 1, cv2.LINE_AA)
        assert {"Jane", "Doe", "14:32"} & set(ocr.residual_text([img], settings)), (x, y)
        assert any(t in w for w in ocr.residual_text([img], pp) for t in ("Jane", "Doe", "14:32")), (x, y)
        shown = [word for word, conf in ocr.shown_words(img) if conf >= settings.min_confidence
                 and sum(ch.isalnum() for ch in word) >= settings.min_chars and not settings.is_allowed(word)]
        lost_in_speckle += not shown
    assert lost_in_speckle >= 3          # why the bright marks are read at all
    assert ocr.bright_marks(np.full((50, 50), 120, np.uint8)) is None          # nothing bright: no second read


def test_ppocr_reads_text_drawn_in_the_grey_of_the_tissue_under_it(tmp_path):
    """Grey-150 text over a head whose speckle averages about 150 has no edge for text detection
    to follow; it is a spike in the histogram, and the flat-level read (`flat_lines`) reads it.
    Lines come back where the text is; the head alone gives none."""
    import cv2

    from pipelines.data.synth import synth_cohort
    from pipelines.deid import ocr

    synth_cohort(tmp_path, 2, 3, ("cirrus",), png_fraction=0.0)
    grey = ocr.shown_grey(S.frames_rgb_or_grey(pydicom.dcmread(tmp_path / "scans" / "0000_0.dcm"))[0][0])
    h, w = grey.shape
    head = grey[int(0.4 * h):int(0.85 * h), int(0.3 * w):int(0.7 * w)].copy()
    level = int(np.median(head[head > 0]))
    assert ocr.flat_lines(head) == []
    img = head.copy()
    cv2.putText(img, "MRN 00418823", (20, 120), cv2.FONT_HERSHEY_SIMPLEX, 0.7, level, 1, cv2.LINE_AA)
    assert level in ocr.flat_levels(img)
    lines = ocr.flat_lines(img)
    assert any(x <= 24 <= x + lw and y <= 110 <= y + lh for _, (x, y, lw, lh) in lines), lines
    assert "00418823" in ocr.residual_text([img], ocr.OcrSettings(engine="ppocr"))
