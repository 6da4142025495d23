"""De-identification of ultrasound DICOM and PNG/JPEG scans.

Headers are rebuilt from an allow-list (an attribute not listed here never reaches the
output, whatever vendor or private tag it came in), identifiers that must stay linkable are
replaced by keyed pseudonyms (HMAC-SHA256 with the secret key), dates are shifted by a
per-patient offset derived from the key so intervals between a patient's exams survive,
and pixels outside the calibrated ultrasound regions are blanked (burned-in banners).
What was done is recorded in the output as PS3.15 asks (PatientIdentityRemoved,
DeidentificationMethod and its CID 7050 codes, LongitudinalTemporalInformationModified).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

PROFILE = "DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile"
METHOD = "PS3.15 E.1 Basic Profile + options (CID 7050 codes); cbh"  # LO: <= 64 chars
OPTIONS = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113101", "Clean Pixel Data Option"),
    ("113105", "Clean Descriptors Option"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113109", "Retain Device Identity Option"),
)
# Copied unchanged: what describes the pixels, the modality and the device (Retain Device
# Identity). Everything else is dropped unless handled explicitly below.
KEEP = (
    "SOPClassUID", "Modality", "Manufacturer", "ManufacturerModelName", "SoftwareVersions",
    "SamplesPerPixel", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "NumberOfFrames", "FrameTime", "PixelSpacing", "ImageType",
)
REGION_KEEP = (
    "RegionSpatialFormat", "RegionDataType", "RegionFlags", "RegionLocationMinX0",
    "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1",
    "PhysicalUnitsXDirection", "PhysicalUnitsYDirection", "PhysicalDeltaX", "PhysicalDeltaY",
    "ReferencePixelX0", "ReferencePixelY0",
)
UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")


def profile_record() -> dict[str, object]:
    """The profile and options applied, as every de-identification report states them."""
    return {"profile": PROFILE, "options": [m for _, m in OPTIONS[1:]], "codes": [c for c, _ in OPTIONS]}


def decode_raster(data: bytes) -> np.ndarray | None:
    """PNG/JPEG bytes as pixels (grey, or RGB in that order), None if they do not decode."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is not None and img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2RGB)
    return img


def sidecar_spacing_mm(path: Path) -> tuple[float, float] | None:
    """(row, col) spacing in mm from the SCAN.json beside a PNG/JPEG; None if missing or invalid."""
    try:
        row, col = (float(v) for v in json.loads(path.with_suffix(".json").read_text())["pixel_spacing_mm"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (row, col) if row > 0 and col > 0 else None


class DeidError(Exception):
    """A scan cannot be de-identified safely; `code` is the quarantine reason code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class MissingKeyError(RuntimeError):
    """The pseudonymisation key is not available."""


def load_key(env_name: str, key_file: Path | None, create: bool = False) -> bytes:
    """The secret key: the environment variable, else the key file (created by the demo only)."""
    value = os.environ.get(env_name, "").strip()
    if value:
        return value.encode()
    if key_file is not None and key_file.is_file():
        return key_file.read_text(encoding="utf-8").strip().encode()
    if not create or key_file is None:
        raise MissingKeyError(
            f"{env_name} is not set: de-identification needs the secret pseudonymisation key "
            f"(export {env_name}=..., or run `make demo`, which creates {key_file} for the demo)")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    secret = hashlib.sha256(os.urandom(64)).hexdigest()
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    return secret.encode()


@dataclass(frozen=True)
class Pseudonymizer:
    """Keyed, consistent pseudonyms and date shifts; irreversible without the key."""

    key: bytes
    max_shift_days: int = 365

    def _mac(self, kind: str, value: str) -> str:
        return hmac.new(self.key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()

    def patient(self, raw_id: str) -> str:
        return "P" + self._mac("patient", raw_id.strip())[:16]

    def image(self, raw: str) -> str:
        return "I" + self._mac("image", raw)[:20]

    def staff(self, raw: str) -> str:
        return "A" + self._mac("staff", raw.strip())[:10]

    def uid(self, raw_uid: str) -> str:
        return "2.25." + str(int(self._mac("uid", raw_uid.strip())[:30], 16))

    def shift_days(self, raw_patient: str) -> int:
        span = 2 * self.max_shift_days + 1
        return int(self._mac("date-shift", raw_patient.strip())[:12], 16) % span - self.max_shift_days

    def shift_date(self, date: dt.date, raw_patient: str) -> dt.date:
        return date + dt.timedelta(days=self.shift_days(raw_patient))


def parse_da(value: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value).strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def regions(ds: Dataset) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1, inclusive) of the ultrasound regions."""
    out = []
    for r in ds.get("SequenceOfUltrasoundRegions", []):
        try:
            out.append((int(r.RegionLocationMinX0), int(r.RegionLocationMinY0),
                        int(r.RegionLocationMaxX1), int(r.RegionLocationMaxY1)))
        except AttributeError:
            continue
    return out


def pixel_spacing_mm(ds: Dataset) -> tuple[float, float] | None:
    """(row, col) spacing in mm from the ultrasound regions (cm, units code 3) or PixelSpacing."""
    for r in ds.get("SequenceOfUltrasoundRegions", []):
        if r.get("PhysicalUnitsXDirection") == 3 and r.get("PhysicalUnitsYDirection") == 3:
            dx, dy = float(r.get("PhysicalDeltaX", 0)), float(r.get("PhysicalDeltaY", 0))
            if dx > 0 and dy > 0:
                return abs(dy) * 10.0, abs(dx) * 10.0
    if "PixelSpacing" in ds:
        row, col = (float(v) for v in ds.PixelSpacing)
        if row > 0 and col > 0:
            return row, col
    return None


def frames_rgb_or_grey(ds: Dataset) -> tuple[np.ndarray, str]:
    """Decoded pixels as (frames, rows, cols[, 3]) and the photometric interpretation they are in."""
    try:
        arr = ds.pixel_array
    except Exception as exc:  # boundary: any codec failure becomes a quarantine reason
        raise DeidError("undecodable_pixels", f"pixel data cannot be decoded ({exc})") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut
        arr, photometric, spp = apply_color_lut(arr, ds), "RGB", 3
    elif photometric.startswith("YBR"):
        photometric = "RGB"  # pydicom 3's pixel_array converts YBR to RGB (as_rgb=True)
    if frames == 1:
        arr = arr[None]
    if spp == 3 and arr.ndim != 4:
        raise DeidError("bad_pixel_layout", f"unexpected pixel array shape {arr.shape}")
    return np.ascontiguousarray(arr), photometric


def region_mask(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Where ultrasound data lies: the union of the regions, or the whole frame if none."""
    if not boxes:
        return np.ones(shape, bool)
    keep = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        keep[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
    return keep


def clean_pixels(arr: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Blank everything outside the ultrasound regions (all frames)."""
    keep = region_mask(arr.shape[1:3], boxes)
    out = arr.copy()
    out[:, ~keep] = 0
    return out


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def clean_frames(ds: Dataset) -> tuple[np.ndarray, str]:
    """Decoded frames with everything outside the ultrasound regions blanked."""
    if str(ds.get("Modality", "")).upper() != "US":
        raise DeidError("not_ultrasound", f"modality {ds.get('Modality', '?')!r} is not US")
    boxes = regions(ds)
    if not boxes and str(ds.get("BurnedInAnnotation", "YES")).upper() != "NO":
        raise DeidError("uncleanable_pixels",
                        "no SequenceOfUltrasoundRegions and BurnedInAnnotation is not NO: "
                        "burned-in text cannot be located")
    arr, photometric = frames_rgb_or_grey(ds)
    return (clean_pixels(arr, boxes) if boxes else arr), photometric


def deidentify_dicom(ds: Dataset, raw_patient: str, pseudo: Pseudonymizer,
                     cleaned: tuple[np.ndarray, str] | None = None) -> Dataset:
    """A new dataset with only allow-listed attributes, pseudonyms, shifted dates, clean pixels."""
    arr, photometric = cleaned if cleaned is not None else clean_frames(ds)
    out = Dataset()
    for name in KEEP:
        if name in ds:
            setattr(out, name, ds.data_element(name).value)
    for name in UIDS:
        if name in ds:
            setattr(out, name, pseudo.uid(str(getattr(ds, name))))
    for name in DATES:
        date = parse_da(ds.get(name, ""))
        if date is not None:
            setattr(out, name, pseudo.shift_date(date, raw_patient).strftime("%Y%m%d"))
    items = []
    for r in ds.get("SequenceOfUltrasoundRegions", []):
        item = Dataset()
        for name in REGION_KEEP:
            if name in r:
                setattr(item, name, r.data_element(name).value)
        items.append(item)
    if items:
        out.SequenceOfUltrasoundRegions = Sequence(items)
    patient = pseudo.patient(raw_patient)
    out.PatientName, out.PatientID = patient, patient
    out.PatientBirthDate = out.PatientSex = ""
    out.AccessionNumber = out.StudyID = out.ReferringPhysicianName = ""
    out.StudyTime = ""
    out.PatientIdentityRemoved = "YES"
    out.LongitudinalTemporalInformationModified = "MODIFIED"
    out.BurnedInAnnotation = "NO"
    out.DeidentificationMethod = METHOD
    out.DeidentificationMethodCodeSequence = Sequence([_code(v, m) for v, m in OPTIONS])
    out.PhotometricInterpretation = photometric
    out.SamplesPerPixel = 3 if arr.ndim == 4 else 1
    if arr.ndim == 4:
        out.PlanarConfiguration = 0
    out.NumberOfFrames = arr.shape[0] if arr.shape[0] > 1 else None
    if out.NumberOfFrames is None:
        del out.NumberOfFrames
    bits = arr.dtype.itemsize * 8
    stored = min(int(ds.get("BitsStored", bits)), bits)
    out.BitsAllocated, out.BitsStored, out.HighBit = bits, stored, stored - 1
    out.PixelRepresentation = int(ds.get("PixelRepresentation", 0))
    out.Rows, out.Columns = arr.shape[1], arr.shape[2]
    out.PixelData = (arr[0] if arr.shape[0] == 1 else arr).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = out.SOPClassUID
    meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian   # lossless, uncompressed
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CBH_DEID_1"
    out.file_meta = meta
    return out


def read_dicom(path: Path) -> Dataset:
    """Read a DICOM file or raise DeidError('unreadable_dicom')."""
    try:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID  # noqa: B018 - a file without it is not an image instance
    except Exception as exc:  # boundary: record and quarantine
        raise DeidError("unreadable_dicom", f"not a readable DICOM image ({type(exc).__name__}: {exc})") from exc
    return ds
