"""`cbh synth`: a synthetic cohort exported the way a hospital would export it.

Patients (the mothers) have one to three exams of one pregnancy; each exam gives one
transcerebellar image as a DICOM file with identifiers in the header (standard tags,
private tags, nested sequences) and burned into the pixels, or, for a share of exams, a
PNG screenshot of the ultrasound region with a sidecar SCAN.json. Everything is
deterministic given the seed. The truth (label, TCD, CM, HC, label and head masks) is exact by
construction.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import functools
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from pipelines import biometry
from pipelines.data.synth_render import STYLES, Sector, Style, burn_banner, head_mask, make_anatomy, render

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SITES = {"aurora": "site-north", "boreal": "site-east", "cirrus": "site-south", "delta": "site-west",
         "ember": "site-central", "fjord": "site-coast"}
FIRST = ["Jane", "Maria", "Aisha", "Li", "Olga", "Fatima", "Sofia", "Chloe", "Amara", "Ingrid",
         "Priya", "Yuki", "Elena", "Nadia", "Grace", "Leila", "Hana", "Rosa", "Mei", "Zara"]
LAST = ["Doe", "Garcia", "Okafor", "Nguyen", "Ivanova", "Haddad", "Rossi", "Martin", "Mensah",
        "Larsen", "Sharma", "Tanaka", "Popescu", "Kowalski", "Murphy", "Karimi", "Sato", "Silva"]
HOSPITALS = ["St Elsewhere General Hospital", "Mercy Womens Clinic", "Northfield University Hospital"]
DOCTORS = ["Hartley^Gregory", "Quinn^Michaela", "Kildare^James", "Bailey^Miranda"]
CSV_COLUMNS = ["image", "frame", "patient_id", "exam_date", "ga_weeks", "label", "tcd_mm",
               "cm_mm", "mask", "hc_mm", "head_mask", "annotator", "site", "comments"]


@dataclass(frozen=True)
class Exam:
    patient: int
    index: int
    name: str          # DICOM PN, Last^First
    patient_id: str
    birth_date: dt.date
    exam_time: dt.datetime
    ga_weeks: float
    tcd_z: float
    cm_z: float
    label: str
    style: Style
    as_png: bool
    hospital: str
    doctor: str


def plan_exams(patients: int, seed: int, styles: tuple[str, ...], hypoplasia_fraction: float,
               ga_range: tuple[float, float], max_exams: int, png_fraction: float) -> list[Exam]:
    """Draw patients, pregnancies and exams (the truth of the cohort)."""
    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        raise ValueError(f"unknown style(s) {unknown}; choose among {sorted(STYLES)}")
    rng = np.random.default_rng(seed)
    exams: list[Exam] = []
    for p in range(patients):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        pid = f"MRN{rng.integers(10**6, 10**7)}"
        hypo = rng.random() < hypoplasia_fraction
        if hypo:
            tcd_z = rng.uniform(-4.5, -2.2)
            cm_z = rng.uniform(2.0, 3.5) if rng.random() < 0.4 else rng.normal(0.3, 0.8)
        else:
            tcd_z = rng.uniform(-1.6, -1.0) if rng.random() < 0.1 else max(rng.normal(0, 0.8), -1.2)
            cm_z = rng.normal(0, 0.8)
        style = STYLES[styles[int(rng.integers(len(styles)))]]
        start = dt.datetime(2016, 1, 1) + dt.timedelta(days=int(rng.integers(0, 9 * 365)),
                                                        minutes=int(rng.integers(8 * 60, 17 * 60)))
        ga0 = rng.uniform(ga_range[0], ga_range[1] - 2)
        birth = (start - dt.timedelta(days=int(rng.uniform(18, 43) * 365.25))).date()
        n = int(rng.integers(1, max_exams + 1))
        hospital, doctor = HOSPITALS[int(rng.integers(len(HOSPITALS)))], DOCTORS[int(rng.integers(len(DOCTORS)))]
        days = 0
        for k in range(n):
            ga = ga0 + days / 7.0
            if ga > ga_range[1]:
                break
            exams.append(Exam(p, k, f"{last}^{first}", pid, birth, start + dt.timedelta(days=days),
                              round(float(ga), 1), float(tcd_z + rng.normal(0, 0.15)),
                              float(cm_z + rng.normal(0, 0.15)), "hypoplasia" if hypo else "normal",
                              style, bool(rng.random() < png_fraction), hospital, doctor))
            days += int(rng.integers(14, 56))
    return exams


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=[str(seed), *map(str, parts)])


def _region(sec: Sector, spacing_mm: float) -> Dataset:
    x0, y0, x1, y1 = sec.bbox()
    r = Dataset()
    r.RegionSpatialFormat = 1
    r.RegionDataType = 1
    r.RegionFlags = 0
    r.RegionLocationMinX0, r.RegionLocationMinY0 = x0, y0
    r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x1, y1
    r.PhysicalUnitsXDirection = 3
    r.PhysicalUnitsYDirection = 3
    r.PhysicalDeltaX = spacing_mm / 10.0
    r.PhysicalDeltaY = spacing_mm / 10.0
    r.ReferencePixelX0 = int(sec.apex_x)
    r.ReferencePixelY0 = int(sec.apex_y)
    return r


def build_dicom(ex: Exam, pixels: np.ndarray, sec: Sector, spacing_mm: float, seed: int) -> Dataset:
    """A US Image Storage instance with identifiers where real exports leave them."""
    st = ex.style
    study_uid = _uid(seed, ex.patient, ex.index, "study")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = _uid(seed, ex.patient, ex.index, "sop")
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta.ImplementationVersionName = "CBH_SYNTH_1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = US_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = _uid(seed, ex.patient, ex.index, "series")
    ds.FrameOfReferenceUID = _uid(seed, ex.patient, ex.index, "for")
    date, time = ex.exam_time.strftime("%Y%m%d"), ex.exam_time.strftime("%H%M%S")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AcquisitionDateTime = date + time
    ds.AccessionNumber = f"ACC{ex.patient:05d}{ex.index}{ex.exam_time:%y}"
    ds.Modality = "US"
    ds.Manufacturer = st.manufacturer
    ds.ManufacturerModelName = st.model
    ds.DeviceSerialNumber = f"SN-{sum(map(ord, st.name)) * 37:05d}"
    ds.SoftwareVersions = "4.2.1"
    ds.StationName = f"US-ROOM-{ex.patient % 4 + 1}"
    ds.InstitutionName = ex.hospital
    ds.InstitutionAddress = "12 Harbour Road, Springfield"
    ds.ReferringPhysicianName = ex.doctor
    ds.PerformingPhysicianName = DOCTORS[(ex.patient + 1) % len(DOCTORS)]
    ds.OperatorsName = "Sonographer^Sam"
    ds.StudyDescription = "OB anomaly scan"
    ds.SeriesDescription = "Fetal head TCP"
    ds.ImageComments = f"{ex.name.replace('^', ' ')} GA {ex.ga_weeks}w"
    ds.StudyID = f"S{ex.patient:05d}{ex.index}"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.PatientName = ex.name
    ds.PatientID = ex.patient_id
    ds.PatientBirthDate = ex.birth_date.strftime("%Y%m%d")
    ds.PatientSex = "F"
    ds.PatientAge = f"{(ex.exam_time.date() - ex.birth_date).days // 365:03d}Y"
    other = Dataset()
    other.PatientID = ex.patient_id.replace("MRN", "NHS")
    other.IssuerOfPatientID = ex.hospital
    ds.OtherPatientIDsSequence = Sequence([other])
    req = Dataset()
    req.AccessionNumber = ds.AccessionNumber
    req.RequestedProcedureID = f"RP{ex.patient:05d}"
    req.RequestingPhysician = ex.doctor
    ds.RequestAttributesSequence = Sequence([req])
    block = ds.private_block(0x0011, "CBH SYNTH VENDOR", create=True)
    block.add_new(0x01, "LO", ex.name.replace("^", " "))
    block.add_new(0x02, "LO", f"{ex.patient_id} {ex.hospital}")
    ds.BurnedInAnnotation = "YES"
    ds.SequenceOfUltrasoundRegions = Sequence([_region(sec, spacing_mm)])
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    syntax = getattr(pydicom.uid, st.transfer_syntax)
    if syntax == pydicom.uid.RLELossless:
        # keep the seeded UID: pydicom's default gives a compressed copy a new random one
        ds.compress(syntax, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _png_crop(sec: Sector, *planes: np.ndarray) -> list[np.ndarray]:
    x0, y0, x1, y1 = sec.bbox()
    x0, y0 = max(x0, 0), max(y0, 0)
    return [p[y0:y1 + 1, x0:x1 + 1] for p in planes]


def _write_exam(out: Path, ex: Exam, seed: int) -> dict[str, str]:
    """Render one exam, write its scan and masks under `out`, return its annotations row.
    Its random stream is seeded by (seed, patient, exam), so exams can be written in any order."""
    rng = np.random.default_rng([seed, ex.patient, ex.index])
    tcd = float(biometry.tcd_from_z(ex.tcd_z, ex.ga_weeks))
    cm = float(biometry.cm_from_z(ex.cm_z, ex.ga_weeks))
    an = make_anatomy(ex.ga_weeks, tcd, cm, float(np.clip(rng.normal(0.78, 0.03), 0.7, 0.86)))
    img, labels, pl, sec = render(an, ex.style, rng)
    head = head_mask(an, pl, img.shape[:2])
    stem = f"{ex.patient:04d}_{ex.index}"
    if ex.as_png:
        img, labels, head = _png_crop(sec, img, labels, head)
        rel = f"scans/{stem}.png"
        cv2.imwrite(str(out / rel), img)
        (out / f"scans/{stem}.json").write_text(json.dumps({"pixel_spacing_mm": [pl.spacing, pl.spacing]}))
    else:
        lines = [ex.name.replace("^", ", "), f"ID {ex.patient_id}",
                 ex.exam_time.strftime("%d/%m/%Y %H:%M"), ex.hospital[:24]]
        shown = burn_banner(img, lines, ex.style, sec)
        rel = f"scans/{stem}.dcm"
        build_dicom(ex, shown, sec, pl.spacing, seed).save_as(out / rel, enforce_file_format=True)
    mask_rel = f"masks/{stem}_mask.png"
    cv2.imwrite(str(out / mask_rel), labels)
    head_rel = f"masks/{stem}_head.png"
    cv2.imwrite(str(out / head_rel), head)
    give_pid = ex.as_png or rng.random() < 0.7
    return {
        "image": rel, "frame": 0, "patient_id": ex.patient_id if give_pid else "",
        "exam_date": ex.exam_time.date().isoformat(), "ga_weeks": f"{ex.ga_weeks:.1f}",
        "label": ex.label, "tcd_mm": f"{an.tcd:.2f}", "cm_mm": f"{an.cm:.2f}",
        "mask": mask_rel, "hc_mm": f"{biometry.ellipse_perimeter(an.a, an.b):.2f}", "head_mask": head_rel,
        "annotator": "sonographer-" + "ABC"[ex.patient % 3],
        "site": SITES[ex.style.name],
        "comments": f"Referred by Dr {ex.doctor.split('^')[0]} for {ex.name.split('^')[1]}",
    }


def synth_cohort(out: Path, patients: int, seed: int, styles: tuple[str, ...],
                 hypoplasia_fraction: float = 0.35, ga_range: tuple[float, float] = (16.0, 36.0),
                 max_exams: int = 3, png_fraction: float = 0.1, progress=None, workers: int = 1) -> dict[str, int]:
    """Write a cohort (CONTRACT.md section 1) to `out`; returns counts. `workers` > 1 renders
    in that many processes (the files are the same: each exam has its own random stream)."""
    exams = plan_exams(patients, seed, styles, hypoplasia_fraction, ga_range, max_exams, png_fraction)
    (out / "scans").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    write = functools.partial(_write_exam, out, seed=seed)
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(exams) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(min(workers, len(exams))))
            written = pool.map(write, exams, chunksize=4)
        else:
            written = map(write, exams)
        rows = []
        for row in written:
            rows.append(row)
            if progress:
                progress(len(rows), len(exams))
    with (out / "annotations.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    n_hypo = len({r["image"].split("/")[1][:4] for r in rows if r["label"] == "hypoplasia"})
    return {"patients": len({e.patient for e in exams}), "images": len(rows),
            "hypoplasia_patients": n_hypo, "png": sum(e.as_png for e in exams)}



def example_png(seed: int = 0, ga_weeks: float = 24.0) -> tuple[bytes, float]:
    """One synthetic transcerebellar PNG (no banner, no patient) and its pixel spacing in mm.

    The registered model's input example: never a training image, which would put a
    patient's scan inside every copy of the model.
    """
    rng = np.random.default_rng(seed)
    an = make_anatomy(ga_weeks, float(biometry.tcd_from_z(0.0, ga_weeks)),
                      float(biometry.cm_from_z(0.0, ga_weeks)), 0.78)
    img, labels, pl, sec = render(an, STYLES["aurora"], rng)
    img, = _png_crop(sec, img)
    ok, buf = cv2.imencode(".png", img)
    assert ok, "PNG encoding failed"
    return buf.tobytes(), float(pl.spacing)
