"""De-identification of real third-party ultrasound DICOM (pydicom's test files, pydicom-data,
deid-data): identifiers gone from every output byte, pixels inside the regions untouched, one
test per transfer syntax and photometric interpretation, one per quarantine reason.

Sources and licences: pydicom (MIT) and pydicom-data (MIT, https://github.com/pydicom/pydicom-data),
deid-data (MIT, https://github.com/pydicom/deid-data), installed as test dependencies
(pyproject.toml, extra `dev`); nothing is copied into this repository.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydicom.data import get_testdata_file

from pipelines.deid import core as D
from pipelines.deid import profile as P
from pipelines.deid.folder import deid_folder
from pipelines.deid.ocr import OcrSettings, residual_text
from pipelines.imaging import scan as S
from pipelines.imaging.scan import parse_da

DEID_DATA = Path(__import__("deid_data").__file__).parent / "data"
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
               "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
               "StudyID", "OtherPatientIDs", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
               "FrameOfReferenceUID", "MediaStorageSOPInstanceUID", "StudyDate", "SeriesDate", "ContentDate",
               "AcquisitionDate", "RequestingPhysician", "IssuerOfPatientID", "PatientAddress", "InstanceCreatorUID")


def real(name: str) -> Path:
    for folder in ("ultrasounds", "humans"):
        if (DEID_DATA / folder / name).is_file():
            return DEID_DATA / folder / name
    return Path(get_testdata_file(name))


def identifying_values(ds: pydicom.Dataset) -> set[str]:
    """Values of the identifying attributes, at every depth, and every text value of a private tag."""
    out: set[str] = set()
    for el in ds.iterall():
        if el.VR == "SQ" or el.value in (None, ""):
            continue
        values = el.value if isinstance(el.value, pydicom.multival.MultiValue) else [el.value]
        for v in values:
            text = str(v).strip()
            if el.keyword in IDENTIFYING:
                out |= {text, *text.split("^")}
            elif el.tag.is_private and isinstance(v, str) and sum(c.isalpha() for c in text) >= 4:
                out.add(text)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        out.add(str(meta.MediaStorageSOPInstanceUID))
    return {v for v in out if len(v) >= 4 and not v.isdigit() or len(v) >= 6}


def leaked(values: set[str], raw: bytes, source: Path | None = None) -> list[str]:
    """The values found as whole tokens of the bytes (a name part "MARY" inside "PRIMARY" is not one).
    With the `source` of a DICOM output, a token inside the output's Pixel Data is image content,
    not a leak, only where the source's own uncleaned pixels, laid out as written, hold the same
    bytes at that place (an 8-bit gradient can spell "abcd"); anything written into the pixels counts."""
    if not values:
        return []
    pattern = re.compile(rb"(?<![A-Za-z0-9])(" + b"|".join(re.escape(v.encode()) for v in sorted(values))
                         + rb")(?![A-Za-z0-9])")
    start, stored = len(raw), b""
    if source is not None:
        pixels = pydicom.dcmread(io.BytesIO(raw)).PixelData
        assert raw.endswith(pixels), "Pixel Data is written last"
        start, stored = len(raw) - len(pixels), pixels_as_written(source)
    found = set()
    for m in pattern.finditer(raw):
        at = m.start(1) - start
        if at < 0 or stored[at:at + len(m.group(1))] != m.group(1):
            found.add(m.group(1).decode(errors="replace"))
    return sorted(found)


def pixels_as_written(path: Path) -> bytes:
    """The input's pixels before cleaning, in the layout and colour model its output is written in."""
    arr, _ = D.frames_for_cleaning(S.read_dicom(path))
    return (np.moveaxis(arr, -1, 1) if arr.ndim == 4 and D.is_planar(arr) else arr).tobytes()


def deidentify(ds: pydicom.Dataset, tmp_path: Path, pseudo, settings: D.Settings | None = None,
               patient: str | None = None) -> tuple[pydicom.Dataset, bytes]:
    out, _ = D.Deidentifier(pseudo, settings).dicom(ds, patient or str(ds.get("PatientID") or "anonymous-source"))
    path = tmp_path / "out.dcm"
    with path.open("wb") as fh:
        D.write_dicom(fh, out)                                 # as cbh deid and ingest write it
    return pydicom.dcmread(path), path.read_bytes()


# The GE LOGIQ 700 frames of US1_* have no regions: the site's template keeps the image area,
# below the banner (institution, date), above the typed label ("LYMPH NODE") and the indices,
# between the colour bars.
LOGIQ_KEEP = (48, 105, 592, 345)


def template_for(ds: pydicom.Dataset, box: tuple[int, int, int, int]) -> D.Settings:
    return D.Settings(templates=D.parse_templates([{
        "manufacturer": str(ds.get("Manufacturer", "")), "model": str(ds.get("ManufacturerModelName", "")),
        "rows": ds.Rows, "columns": ds.Columns, "keep": [list(box)]}]))


def as_jpeg_ls(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(real("GREYSCALE_IMAGE.dcm"))
    ds.compress(pydicom.uid.JPEGLSLossless)
    path = tmp_path / "jpegls.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def as_16_bit(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(real("GREYSCALE_IMAGE.dcm"))
    ds.PixelData = (ds.pixel_array.astype(np.uint16) * 257).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    path = tmp_path / "mono16.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# (file, transfer syntax, photometric interpretation of the input)
CASES = [
    ("examples_ybr_color.dcm", pydicom.uid.JPEGBaseline8Bit, "YBR_FULL_422"),       # 30 frames
    ("US1_J2KR.dcm", pydicom.uid.JPEG2000Lossless, "YBR_RCT"),
    ("US1_J2KI.dcm", pydicom.uid.JPEG2000, "YBR_ICT"),
    ("OBXXXX1A_rle.dcm", pydicom.uid.RLELossless, "PALETTE COLOR"),
    ("OBXXXX1A_expb_2frame.dcm", pydicom.uid.ExplicitVRBigEndian, "PALETTE COLOR"),
    ("gdcm-US-ALOKA-16.dcm", pydicom.uid.ImplicitVRLittleEndian, "PALETTE COLOR"),  # 16-bit palette
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", pydicom.uid.JPEGLosslessSV1, "MONOCHROME2"),
    ("GREYSCALE_IMAGE.dcm", pydicom.uid.ExplicitVRLittleEndian, "MONOCHROME2"),
    ("RGB_IMAGE.dcm", pydicom.uid.ExplicitVRLittleEndian, "RGB"),
    ("ultrasound-multiframe.dcm", pydicom.uid.ExplicitVRLittleEndian, "RGB"),       # 30 frames
    ("jpeg-ls", pydicom.uid.JPEGLSLossless, "MONOCHROME2"),
    ("mono16", pydicom.uid.ExplicitVRLittleEndian, "MONOCHROME2"),
]


@pytest.mark.parametrize("name,syntax,photometric", CASES, ids=[c[0] for c in CASES])
def test_real_ultrasound_per_syntax_and_photometric(name, syntax, photometric, pseudo, tmp_path):
    path = {"jpeg-ls": as_jpeg_ls, "mono16": as_16_bit}[name](tmp_path) if name in ("jpeg-ls", "mono16") \
        else real(name)
    ds = S.read_dicom(path)                       # as the platform reads it (large values deferred)
    assert ds.file_meta.TransferSyntaxUID == syntax and ds.PhotometricInterpretation == photometric
    boxes = S.regions(ds)
    # without calibrated regions the site's device template says where the image is
    settings = None if boxes else template_for(ds, LOGIQ_KEEP)
    back, raw = deidentify(ds, tmp_path, pseudo, settings)          # its pixels still unread
    decoded, _ = S.frames_rgb_or_grey(ds)
    assert leaked(identifying_values(ds), raw, path) == [], f"{name}: identifying values in the output"
    assert not any(el.tag.is_private for el in back.iterall())
    assert not any((el.tag.group & 0xFF00) in (0x5000, 0x6000) for el in back)     # no overlays, curves
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian   # written losslessly
    assert back.PatientIdentityRemoved == "YES" and back.BurnedInAnnotation == "NO"
    # the colour model is kept (a palette stays a palette, YBR stays YBR), uncompressed
    assert back.PhotometricInterpretation == {"YBR_FULL_422": "YBR_FULL", "YBR_RCT": "RGB", "YBR_ICT": "RGB"}.get(
        photometric, photometric)
    if ds.get("SamplesPerPixel") == 3 and syntax in D.NATIVE_SYNTAXES:    # colour planes stay as stored
        assert back.PlanarConfiguration == ds.get("PlanarConfiguration", 0)
    out, _ = S.frames_rgb_or_grey(back)                                  # what a screen shows of each
    assert out.shape == decoded.shape and out.dtype == decoded.dtype
    keep = S.region_mask(decoded.shape[1:3], boxes or [LOGIQ_KEEP])
    assert np.array_equal(out[:, keep], decoded[:, keep])                # inside the regions: untouched
    assert not out[:, ~keep].any()                                       # outside: blank
    assert S.pixel_spacing_mm(back) == S.pixel_spacing_mm(ds)
    if syntax in (pydicom.uid.JPEGBaseline8Bit, pydicom.uid.JPEG2000):
        assert back.LossyImageCompression == "01"                        # the lossy history is kept


def test_pixel_data_written_straight_is_what_pydicom_writes(pseudo, tmp_path):
    """write_dicom writes the header through pydicom and the pixel bytes after it: the file is
    byte for byte what pydicom's own writer makes (odd-length pixel data padded alike)."""
    import io

    for name in ("ultrasound-multiframe.dcm", "OBXXXX1A_rle.dcm", "gdcm-US-ALOKA-16.dcm"):
        ds = pydicom.dcmread(real(name))
        out, _ = D.Deidentifier(pseudo).dicom(ds, "patient")
        ours, theirs = io.BytesIO(), io.BytesIO()
        D.write_dicom(ours, out)
        out.save_as(theirs, enforce_file_format=True)
        assert ours.getvalue() == theirs.getvalue(), name
    odd = pydicom.dcmread(real("GREYSCALE_IMAGE.dcm"))
    out, _ = D.Deidentifier(pseudo).dicom(odd, "patient")
    out.Rows, out.Columns, out.PixelData = 1, 3, b"\x01\x02\x03"
    ours, theirs = io.BytesIO(), io.BytesIO()
    D.write_dicom(ours, out)
    out.save_as(theirs, enforce_file_format=True)
    assert ours.getvalue() == theirs.getvalue() and ours.getvalue().endswith(b"\x01\x02\x03\x00")


def test_bits_above_bits_stored_are_cleared(pseudo, tmp_path):
    """12 bits stored in 16: whatever the 4 unused high bits carry (an embedded overlay can draw
    text there) is not copied; the stored bits are."""
    ds = pydicom.dcmread(real("GREYSCALE_IMAGE.dcm"))
    values = ds.pixel_array.astype(np.uint16) * 16                      # 12-bit values
    ds.PixelData = (values | np.uint16(0xA000)).tobytes()              # garbage in bits 13 and 15
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    back, _ = deidentify(ds, tmp_path, pseudo)
    raw = np.frombuffer(back.PixelData, "<u2").reshape(values.shape)
    keep = S.region_mask(values.shape, S.regions(ds))
    assert back.BitsStored == 12 and not (raw & 0xF000).any()
    assert np.array_equal(raw[keep], values[keep])


def test_uids_consistent_within_a_study_and_stable_across_runs(pseudo, tmp_path):
    ds = pydicom.dcmread(real("RGB_IMAGE.dcm"))
    second = pydicom.dcmread(real("RGB_IMAGE.dcm"))
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".2"
    a, raw_a = deidentify(ds, tmp_path, pseudo)
    b, _ = deidentify(second, tmp_path, pseudo)
    assert a.StudyInstanceUID == b.StudyInstanceUID != ds.StudyInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID
    again, raw_again = deidentify(pydicom.dcmread(real("RGB_IMAGE.dcm")), tmp_path, pseudo)
    assert raw_again == raw_a                                            # same input, same bytes
    other, _ = deidentify(ds, tmp_path, D.Pseudonymizer(b"another key", 365))
    assert other.StudyInstanceUID != a.StudyInstanceUID                  # unlinkable without the key


def test_date_intervals_within_a_patient_survive(pseudo, tmp_path):
    first = pydicom.dcmread(real("GREYSCALE_IMAGE.dcm"))
    later = pydicom.dcmread(real("GREYSCALE_IMAGE.dcm"))
    later.StudyDate = "20200315"
    first.StudyDate = "20200101"
    a, _ = deidentify(first, tmp_path, pseudo)
    b, _ = deidentify(later, tmp_path, pseudo)
    assert a.StudyDate != first.StudyDate
    assert (parse_da(b.StudyDate) - parse_da(a.StudyDate)).days == 74


def quarantine_corpus(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder with one input per quarantine reason, and good files; name -> expected reason."""
    src = tmp_path / "export"
    src.mkdir()
    expect = {}
    for name in ("RGB_IMAGE.dcm", "ultrasound-multiframe.dcm", "OBXXXX1A.dcm"):
        shutil.copy(real(name), src / name)
        expect[name] = ""
    (src / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"not a dataset" * 8)
    expect["garbage.dcm"] = "unreadable_dicom"
    shutil.copy(real("ctbrain1.dcm"), src / "ct.dcm")
    expect["ct.dcm"] = "not_ultrasound"
    shutil.copy(real("examples_rgb_color.dcm"), src / "noregions.dcm")
    expect["noregions.dcm"] = "no_pixel_template"
    lie = pydicom.dcmread(real("GREYSCALE_IMAGE.dcm"))       # says NO, yet its banner reads "DOB: ..."
    del lie.SequenceOfUltrasoundRegions
    lie.BurnedInAnnotation = "NO"
    lie.save_as(src / "lie.dcm")
    expect["lie.dcm"] = "residual_text"
    shutil.copy(real("JPGLosslessP14SV1_1s_1f_8b.dcm"), src / "nopid.dcm")
    expect["nopid.dcm"] = "missing_patient_id"
    shutil.copy(real("OBXXXX1A_rle.dcm"), src / "same-instance.dcm")    # the SOP instance of OBXXXX1A.dcm
    expect["same-instance.dcm"] = "duplicate_instance"
    broken = pydicom.dcmread(real("RGB_IMAGE.dcm"))
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = broken.SOPInstanceUID + ".9"
    broken.PixelData = broken.PixelData[:1000]
    broken.save_as(src / "truncated.dcm")
    expect["truncated.dcm"] = "undecodable_pixels"
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    expect["broken.png"] = "unreadable_image"
    return src, expect


def test_every_input_is_accounted_for_one_reason_each(pseudo, tmp_path):
    src, expect = quarantine_corpus(tmp_path)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    dst, held, link = tmp_path / "deid", tmp_path / "held", tmp_path / "identified" / "link.csv"
    rep = deid_folder(src, dst, pseudo, link, workers=2, quarantine=held)
    assert rep["inputs"] == len(expect) == rep["deidentified"] + rep["quarantined"]
    rows = {r["source"]: r for r in csv.DictReader((held / "quarantine.csv").open())}
    assert {k: v["reason_code"] for k, v in rows.items()} == {k: v for k, v in expect.items() if v}
    assert rep["reasons"] == {v: list(expect.values()).count(v) for v in set(expect.values()) if v}
    for r in rows.values():                                 # a copy of the untouched original is held
        assert (held / "files" / r["copy"]).read_bytes() == before[r["source"]] and r["reason"]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before          # originals never modified
    report = (dst / "deid-report.json").read_text()
    assert str(src) not in report and "RGB_IMAGE" not in report and json.loads(report)["ocr_verified"] >= 1
    assert len(list(csv.DictReader(link.open()))) == rep["deidentified"] == 3
    audit = [json.loads(line) for line in (dst / "deid-audit.jsonl").read_text().splitlines()]
    assert len(audit) == 3 and all(a["actions"] for a in audit)
    values = set().union(*(identifying_values(pydicom.dcmread(src / name))
                           for name in ("RGB_IMAGE.dcm", "ultrasound-multiframe.dcm", "OBXXXX1A.dcm")))
    source_of = {Path(r["output"]): Path(r["source"]) for r in csv.DictReader(link.open())}
    for out in dst.rglob("*"):
        if out.is_file():
            assert leaked(values, out.read_bytes(), source_of.get(out)) == [], f"identifying values in {out.name}"


@pytest.mark.heavy         # three runs over the real corpus (about 40 s): make test-heavy, in .ci/run
def test_rerun_is_idempotent_and_resumes_after_a_crash(pseudo, tmp_path):
    src, _ = quarantine_corpus(tmp_path)
    dst = tmp_path / "deid"
    first = deid_folder(src, dst, pseudo, workers=2)
    files = {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*.dcm")}
    # a crash after one output: its audit record never landed and another output is gone
    victims = sorted(dst.rglob("*.dcm"))[:2]
    victims[0].unlink()
    (dst / ".cbh-deid" / "audit" / (str(victims[1].relative_to(dst)).replace("/", "__") + ".json")).unlink()
    again = deid_folder(src, dst, pseudo, workers=1)
    assert again["resumed"] == first["deidentified"] - 2
    same = ("inputs", "deidentified", "quarantined", "reasons", "pixels")   # the report covers all outputs
    assert {k: again[k] for k in same} == {k: first[k] for k in same}
    assert {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*.dcm")} == files   # same names, same bytes
    assert not list(dst.rglob(".tmp-*"))


def test_raster_metadata_is_stripped_and_banner_template_applied(pseudo, tmp_path):
    src = tmp_path / "export"
    src.mkdir()
    img = np.zeros((200, 300, 3), np.uint8)
    img[60:, :] = np.random.default_rng(0).integers(0, 120, (140, 300, 3), dtype=np.uint8)
    info = PngInfo()
    info.add_text("Comment", "Patient Jane Lowbridge MRN0042")
    Image.fromarray(img).save(src / "a.png", pnginfo=info)
    exif = Image.Exif()
    exif[0x013B] = "Jane Lowbridge"                                       # Artist
    Image.fromarray(img).save(src / "b.jpg", exif=exif.tobytes(), quality=95)
    assert b"Lowbridge" in (src / "a.png").read_bytes() and b"Lowbridge" in (src / "b.jpg").read_bytes()
    settings = D.Settings(templates=D.parse_templates([{"raster": True, "rows": 200, "columns": 300,
                                                        "keep": [[0, 60, 299, 199]]}]))
    rep = deid_folder(src, tmp_path / "deid", pseudo, settings=settings)
    assert rep["deidentified"] == 2 and rep["pixels"] == {"template": 2} and rep["ocr_verified"] >= 1
    for out in (tmp_path / "deid" / "raster").glob("*.png"):
        assert b"Lowbridge" not in out.read_bytes() and b"MRN" not in out.read_bytes()
        pixels = np.asarray(Image.open(out))
        assert not pixels[:60].any()


def test_synthetic_banners_and_header_identifiers_are_gone(small_cohort, pseudo, tmp_path):
    """OCR reads the planted banner on the export and none of it on the de-identified scans."""
    rep = deid_folder(small_cohort / "scans", tmp_path / "deid", pseudo, workers=2)
    assert rep["quarantined"] == 0 and rep["ocr_verified"] >= 3              # each vendor style read once
    rows = list(csv.DictReader((small_cohort / "annotations.csv").open()))
    settings = OcrSettings()
    for path in sorted((small_cohort / "scans").glob("*.dcm"))[:4]:
        ds = pydicom.dcmread(path)
        planted = {str(ds.PatientName).split("^")[0], str(ds.InstitutionName).split()[0], ds.PatientID}
        before = " ".join(residual_text(S.frames_rgb_or_grey(ds)[0][0], settings))
        assert any(p in before for p in planted), f"OCR should read the banner of {path.name}: {before}"
    outputs = sorted((tmp_path / "deid").rglob("*.dcm"))
    assert len(outputs) == sum(r["image"].endswith(".dcm") for r in rows)
    identifiers = set()
    for path in sorted((small_cohort / "scans").glob("*.dcm")):
        identifiers |= identifying_values(pydicom.dcmread(path))
    for out in outputs:
        ds = pydicom.dcmread(out)
        assert residual_text(ds.pixel_array, settings) == []
        raw = out.read_bytes()
        assert leaked(identifiers, raw) == []


def test_ocr_allows_calibration_marks_and_flags_identifiers():
    s = OcrSettings()
    # "Saq": the label "Sag" of pydicom's RGB_IMAGE.dcm, its descender cut by the crop, read at 82
    for ok in ("10", "4.5cm", "100°", "L12-5", "6C1", "TIS0.4", "20dB/DR60", "65bpm", "Cist", "MHz", "Saq", "L1VER",
               # PP-OCR's reads of on-screen labels of real Philips and Siemens frames (ocr_sensitivity.py)
               "WF384Hz", "SIEMEN!", "Gener:", "*Ren", "P'Med", "4.0cm-", "PLow", "2D--1009", "MB-Cm", "+AscAo",
               "PageT3", "75bpr", "MCmOn", "MBCmOn"):
        assert s.is_allowed(ok), ok
    for bad in ("08/29/1951", "8:48:26", "MRN8109163", "CLEVELAND", "Lowbridge", "00047431395", "Sam", "Oliver",
                "O'Brien", "Jane!", "ACC99812", "4829173", "Hospital", "D0E", "4829-173", "ACC-99812",
                "MRN-12-345678", "JaneDoe", "JohnSMITH", "McDonald", "JOHNSmith", "MRNAbc123456"):
        assert not s.is_allowed(bad), bad


def test_ocr_missing_is_one_clear_error(monkeypatch, pseudo, tmp_path):
    monkeypatch.setattr(D, "ocr_available", lambda engine: False)
    (tmp_path / "src").mkdir()
    with pytest.raises(D.OcrUnavailable, match="make setup"):
        deid_folder(tmp_path / "src", tmp_path / "dst", pseudo)


def test_quarantine_inside_destination_is_refused(pseudo, tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ValueError, match="identified-side"):
        deid_folder(tmp_path / "src", tmp_path / "dst", pseudo, quarantine=tmp_path / "dst" / "q")
    with pytest.raises(ValueError, match="identified-side"):
        deid_folder(tmp_path / "src", tmp_path / "dst", pseudo, tmp_path / "dst" / "link.csv")


@pytest.mark.heavy         # every file read twice by PP-OCR (about 2 minutes): make test-heavy, in .ci/run
def test_blank_text_cleans_real_files_without_regions_and_verifies_them(pseudo, tmp_path):
    """`deid.no_template: blank-text`: real ultrasound with its regions removed (so no region,
    no template, BurnedInAnnotation not NO) is quarantined by default; with blank-text the text
    OCR finds is blanked, the file is read again and written, its method recorded in the header
    and the audit. The imaged area keeps nearly all of its pixels."""
    names = ("RGB_IMAGE.dcm", "GREYSCALE_IMAGE.dcm", "ultrasound-multiframe.dcm", "OBXXXX1A.dcm")
    src = tmp_path / "export"
    src.mkdir()
    for name in names:
        ds = pydicom.dcmread(real(name))
        del ds.SequenceOfUltrasoundRegions
        if "BurnedInAnnotation" in ds:
            del ds.BurnedInAnnotation
        ds.save_as(src / name)
    parked = deid_folder(src, tmp_path / "parked", pseudo)
    assert parked["reasons"] == {"no_pixel_template": len(names)}

    settings = D.Settings(no_template=D.BLANK_TEXT)
    rep = deid_folder(src, tmp_path / "out", pseudo, settings=settings, quarantine=tmp_path / "held")
    assert rep["deidentified"] >= 3 and rep["ocr_verified"] == rep["deidentified"], rep   # at least 3 of 4
    deid = D.Deidentifier(pseudo, settings)
    for out in (tmp_path / "out").rglob("*.dcm"):
        ds = pydicom.dcmread(out)
        assert ds.DeidentificationMethod == P.METHOD_BLANK_TEXT and ds.get("BurnedInAnnotation", "") != "NO"
        arr, photometric = D.frames_for_cleaning(ds)
        assert residual_text([D.display(f, photometric, ds) for f in (arr[0], arr[-1])], deid.settings.ocr) == []
    audit = [json.loads(line) for line in (tmp_path / "out" / "deid-audit.jsonl").read_text().splitlines()]
    assert all({"path": "PixelData", "tag": "(7FE0,0010)", "action": "C:pixels-blank-text"} in a["actions"]
               for a in audit)

    grey = pydicom.dcmread(real("GREYSCALE_IMAGE.dcm"))       # its banner reads "DOB: ..."
    before = grey.pixel_array.copy()
    del grey.SequenceOfUltrasoundRegions
    cleaned = deid.clean_dicom(grey)
    assert cleaned.method == D.BLANK_TEXT and cleaned.verified
    assert residual_text([before], deid.settings.ocr) and not residual_text([cleaned.frames[0]], deid.settings.ocr)
    changed = (cleaned.frames[0] != before).mean()
    assert 0 < changed < 0.1                                    # the text's boxes, not the image
