"""De-identification: keyed pseudonyms, date shifts, allow-listed headers, clean pixels,
on synthetic exports and on real ultrasound DICOM shipped with pydicom."""

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipelines import deid as D

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


def _identifiers(ds: pydicom.Dataset) -> list[str]:
    values = [str(ds.PatientName).replace("^", " "), str(ds.PatientName).split("^")[0], ds.PatientID,
              ds.PatientBirthDate, ds.AccessionNumber, ds.InstitutionName, ds.StudyDate,
              str(ds.ReferringPhysicianName).split("^")[0], ds.StationName]
    return [v for v in values if v]


def test_synthetic_export_leaves_no_identifier(small_cohort, pseudo, tmp_path):
    src = small_cohort / "scans" / sorted(p.name for p in (small_cohort / "scans").glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    assert ds.BurnedInAnnotation == "YES" and "SequenceOfUltrasoundRegions" in ds
    clean = D.deidentify_dicom(ds, ds.PatientID, pseudo)
    out = tmp_path / "out.dcm"
    clean.save_as(out, enforce_file_format=True)
    raw = out.read_bytes()
    for ident in _identifiers(ds):
        assert ident.encode() not in raw, f"identifier {ident!r} leaked"
    back = pydicom.dcmread(out)
    assert back.PatientIdentityRemoved == "YES" and back.BurnedInAnnotation == "NO"
    assert back.LongitudinalTemporalInformationModified == "MODIFIED"
    assert {c.CodeValue for c in back.DeidentificationMethodCodeSequence} >= {"113100", "113101", "113107"}
    assert not any(el.tag.is_private for el in back.iterall())
    assert back.StudyInstanceUID != ds.StudyInstanceUID and back.PatientID == pseudo.patient(ds.PatientID)
    # the banner lies above the ultrasound region: burned-in text is there before, blank after
    y0 = int(ds.SequenceOfUltrasoundRegions[0].RegionLocationMinY0)
    assert ds.pixel_array[:y0].max() > 0
    assert back.pixel_array[:y0].max() == 0
    # inside the region the image is untouched (lossless)
    assert np.array_equal(back.pixel_array[y0 + 5:], ds.pixel_array[y0 + 5:])


@pytest.mark.parametrize("name", ["examples_palette.dcm", "examples_ybr_color.dcm"])
def test_real_ultrasound_dicom(name, pseudo, tmp_path):
    ds = pydicom.dcmread(PYDICOM_FILES / name)
    clean = D.deidentify_dicom(ds, str(ds.PatientID or "x"), pseudo)
    out = tmp_path / "out.dcm"
    clean.save_as(out, enforce_file_format=True)
    back = pydicom.dcmread(out)
    assert str(ds.PatientName).encode() not in out.read_bytes()
    assert back.PhotometricInterpretation == "RGB"          # palette / YBR written as RGB
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    frames = int(ds.get("NumberOfFrames", 1))
    assert back.pixel_array.shape[0 if frames > 1 else -1] == (frames if frames > 1 else 3)
    assert D.pixel_spacing_mm(back) == D.pixel_spacing_mm(ds)


def test_ultrasound_without_regions_is_refused(pseudo):
    ds = pydicom.dcmread(PYDICOM_FILES / "examples_rgb_color.dcm")
    with pytest.raises(D.DeidError) as err:
        D.deidentify_dicom(ds, "x", pseudo)
    assert err.value.code == "uncleanable_pixels"


def test_unreadable_file(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"garbage" * 10)
    with pytest.raises(D.DeidError) as err:
        D.read_dicom(bad)
    assert err.value.code == "unreadable_dicom"
