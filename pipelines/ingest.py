"""Ingest a hospital export (CONTRACT.md section 1) into the de-identified data store.

Every data row of annotations.csv ends up either as a manifest row (de-identified scan,
mask, pseudonymous patient, shifted exam date) or as a quarantine row with a reason code;
nothing is dropped silently. Re-ingesting the same cohort reproduces the same rows.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import deid as D

REQUIRED = ("image", "exam_date", "ga_weeks")
LABELS = ("normal", "hypoplasia")

MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("patient_pseudo", pa.string()), ("exam_date", pa.date32()),
    ("ga_weeks", pa.float64()), ("label", pa.string()), ("tcd_mm", pa.float64()),
    ("cm_mm", pa.float64()), ("site", pa.string()), ("annotator", pa.string()),
    ("frame", pa.int32()), ("deid_path", pa.string()), ("mask_path", pa.string()),
    ("rows", pa.int32()), ("cols", pa.int32()), ("spacing_row_mm", pa.float64()),
    ("spacing_col_mm", pa.float64()), ("modality", pa.string()), ("photometric", pa.string()),
    ("source_format", pa.string()), ("pixel_sha256", pa.string()), ("cohort", pa.string()),
    ("source_row", pa.int64()),
    # checks made at ingest, on the identified side, for the data contract to judge:
    ("exam_date_check", pa.string()),   # ok | future (before the shift: a shifted date cannot tell)
    ("patient_check", pa.string()),     # ok | mismatch (CSV patient_id vs DICOM PatientID)
    ("mask_status", pa.string()),       # ok | none | missing | undecodable | not_single_channel
])
QUARANTINE_SCHEMA = pa.schema([
    ("cohort", pa.string()), ("source_row", pa.int64()), ("image", pa.string()),
    ("reason_code", pa.string()), ("reason", pa.string()),
])


class CohortError(Exception):
    """The cohort as a whole cannot be read (no annotations.csv, missing columns)."""


class RowError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class IngestResult:
    manifest: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)   # per output: actions, no values
    ocr_verified: int = 0

    @property
    def reasons(self) -> dict[str, int]:
        return dict(Counter(q["reason_code"] for q in self.quarantine))


def cohort_name(cohort: Path) -> str:
    """A content-derived name for a cohort (the folder name may itself identify someone)."""
    return "cohort-" + hashlib.sha256((cohort / "annotations.csv").read_bytes()).hexdigest()[:12]


def read_annotations(cohort: Path) -> list[dict[str, str]]:
    path = cohort / "annotations.csv"
    if not cohort.is_dir():
        raise CohortError(f"{cohort}: cohort folder not found")
    if not path.is_file():
        raise CohortError(f"{path}: annotations.csv not found; a cohort needs one row per labelled image")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise CohortError(f"{path}: required column(s) missing: {', '.join(missing)}")
        return [dict(r) for r in reader]


def _float(row: dict[str, str], name: str, lo: float, hi: float) -> float | None:
    raw = (row.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise RowError(f"bad_{name}", f"{name} is not a number") from None
    if not lo <= value <= hi:
        raise RowError(f"bad_{name}", f"{name} = {value} is outside {lo}-{hi}")
    return value


def _exam_date(row: dict[str, str], today: dt.date) -> tuple[dt.date, str]:
    """The exam date and its check (`ok` or `future`); an unreadable date cannot be shifted,
    so that row is quarantined here."""
    try:
        date = dt.date.fromisoformat((row.get("exam_date") or "").strip())
    except ValueError:
        raise RowError("bad_exam_date", "exam_date is not a YYYY-MM-DD date") from None
    return date, ("future" if date > today else "ok")


def _read_mask(path: Path) -> tuple[np.ndarray | None, str]:
    """The mask and its status; size, classes and anatomy are the data contract's to judge."""
    if not path.is_file():
        return None, "missing"
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        return None, "undecodable"
    if mask.ndim != 2:
        return None, "not_single_channel"
    return mask, "ok"


@dataclass
class _Scan:
    """A de-identified source file, shared by all rows that reference its frames."""

    stem: str
    raw_patient: str
    frames: np.ndarray
    spacing: tuple[float, float]
    photometric: str
    fmt: str
    cleaned: D.Cleaned
    written: Path | None = None
    dataset: Any = None


class Ingestor:
    """Turns annotation rows into manifest or quarantine rows; writes de-identified files."""

    def __init__(self, cohort: Path, workspace: Path, deid_dir: str, pseudo: D.Pseudonymizer,
                 keep_columns: tuple[str, ...], today: dt.date, settings: D.Settings | None = None) -> None:
        self.cohort, self.workspace, self.deid_dir = cohort, workspace, deid_dir
        self.pseudo, self.keep, self.today = pseudo, keep_columns, today
        self.deid = D.Deidentifier(pseudo, settings)
        self.name = cohort_name(cohort)
        self._scans: dict[Path, _Scan | D.DeidError] = {}

    def _load(self, path: Path) -> _Scan:
        if path in self._scans:
            cached = self._scans[path]
            if isinstance(cached, D.DeidError):
                raise cached
            return cached
        try:
            scan = self._load_raster(path) if path.suffix.lower() in D.RASTER_SUFFIXES \
                else self._load_dicom(path)
        except D.DeidError as exc:
            self._scans[path] = exc
            raise
        self._scans[path] = scan
        return scan

    def _load_dicom(self, path: Path) -> _Scan:
        ds = D.read_dicom(path)
        spacing = D.pixel_spacing_mm(ds)
        if spacing is None:
            raise D.DeidError("no_pixel_spacing", "pixel spacing cannot be established "
                              "(no calibrated ultrasound region, no PixelSpacing)")
        header_pid = str(ds.get("PatientID", "") or "").strip()
        cleaned = self.deid.clean_dicom(ds)
        self.result.ocr_verified += cleaned.verified
        return _Scan(self.pseudo.image("dicom:" + str(ds.SOPInstanceUID)), header_pid, cleaned.frames,
                     spacing, cleaned.photometric, "dicom", cleaned, dataset=ds)

    def _load_raster(self, path: Path) -> _Scan:
        spacing = D.sidecar_spacing_mm(path)
        if spacing is None:
            raise D.DeidError("no_pixel_spacing", f"sidecar {path.with_suffix('.json').name} with "
                              "pixel_spacing_mm [row, col] is missing or invalid")
        data = path.read_bytes()
        img = D.decode_raster(data)
        if img is None:
            raise D.DeidError("unreadable_image", "image cannot be decoded")
        digest = hashlib.sha256(data).hexdigest()
        cleaned = self.deid.clean_raster(img, digest)
        self.result.ocr_verified += cleaned.verified
        return _Scan(self.pseudo.image("raster:" + digest), "", cleaned.frames, spacing,
                     cleaned.photometric, "png", cleaned)

    def process(self, n: int, row: dict[str, str]) -> None:
        """Process one data row (n is 1-based); the outcome lands in manifest or quarantine."""
        try:
            rec = self._row(row)
            rec["source_row"] = n
            self.result.manifest.append(rec)
        except (RowError, D.DeidError) as exc:
            self.result.quarantine.append({"cohort": self.name, "source_row": n,
                                           "image": (row.get("image") or "").strip(),
                                           "reason_code": exc.code, "reason": str(exc)})

    def run(self, rows: list[dict[str, str]], progress: Callable[[int, int], None] | None = None) -> IngestResult:
        self.result = IngestResult()
        for n, row in enumerate(rows, start=1):
            self.process(n, row)
            if progress:
                progress(n, len(rows))
        return self.result

    def _row(self, row: dict[str, str]) -> dict[str, Any]:
        rel = (row.get("image") or "").strip()
        if not rel:
            raise RowError("missing_image", "the image column is empty")
        path = (self.cohort / rel).resolve()
        if self.cohort.resolve() not in path.parents:
            raise RowError("bad_image_path", "image path points outside the cohort")
        if not path.is_file():
            raise RowError("file_not_found", "image file not found")
        csv_pid = (row.get("patient_id") or "").strip()
        scan = self._load(path)
        consistent = not (scan.raw_patient and csv_pid and scan.raw_patient != csv_pid)
        raw_patient = scan.raw_patient or csv_pid          # the header wins; the contract flags a mismatch
        if not raw_patient:
            raise RowError("missing_patient_id", "no patient_id in annotations.csv or in the header")
        exam, exam_check = _exam_date(row, self.today)
        # numbers are kept as given (plausibility is the data contract's); only unreadable ones stop here
        ga = _float(row, "ga_weeks", 0.0, 100.0)
        if ga is None:
            raise RowError("bad_ga_weeks", "ga_weeks is empty")
        label = (row.get("label") or "").strip().lower()
        if label and label not in LABELS:
            label = "invalid"              # the contract rejects it; the value itself may be free text
        frame_raw = (row.get("frame") or "").strip() or "0"
        frame = int(frame_raw) if frame_raw.isdigit() else -1
        if not 0 <= frame < scan.frames.shape[0]:
            raise RowError("bad_frame", f"frame is not an index below {scan.frames.shape[0]}")
        pixels = scan.frames[frame]
        mask_rel = (row.get("mask") or "").strip()
        mask, mask_status = _read_mask(self.cohort / mask_rel) if mask_rel else (None, "none")
        tcd, cm = _float(row, "tcd_mm", 0.0, 1000.0), _float(row, "cm_mm", 0.0, 1000.0)
        patient = self.pseudo.patient(raw_patient)
        out_dir = self.workspace / self.deid_dir / patient
        image_path = self._write_scan(scan, raw_patient, out_dir)
        image_id = self.pseudo.image(f"{scan.stem}#{frame}")
        mask_path = None
        if mask is not None:
            mask_path = out_dir / f"{image_id}_mask.png"
            cv2.imwrite(str(mask_path), mask)
        keep = set(self.keep)
        return {
            "image_id": image_id, "patient_pseudo": patient,
            "exam_date": self.pseudo.shift_date(exam, raw_patient), "ga_weeks": ga,
            "label": label or None, "tcd_mm": tcd, "cm_mm": cm,
            "site": (row.get("site") or "").strip() or None if "site" in keep else None,
            "annotator": self._staff(row.get("annotator")) if "annotator" in keep else None,
            "frame": frame, "deid_path": str(image_path.relative_to(self.workspace)),
            "mask_path": str(mask_path.relative_to(self.workspace)) if mask_path else None,
            "rows": int(pixels.shape[0]), "cols": int(pixels.shape[1]),
            "spacing_row_mm": scan.spacing[0], "spacing_col_mm": scan.spacing[1],
            "modality": "US", "photometric": scan.photometric, "source_format": scan.fmt,
            "pixel_sha256": hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest(),
            "cohort": self.name, "source_row": None,
            "exam_date_check": exam_check, "patient_check": "ok" if consistent else "mismatch",
            "mask_status": mask_status,
        }

    def _staff(self, raw: str | None) -> str | None:
        """Annotators are staff: kept linkable (inter-observer checks) but pseudonymous."""
        return self.pseudo.staff(raw) if raw and raw.strip() else None

    def _write_scan(self, scan: _Scan, raw_patient: str, out_dir: Path) -> Path:
        if scan.written is not None:
            return scan.written
        out_dir.mkdir(parents=True, exist_ok=True)
        if scan.fmt == "dicom":
            clean, actions = self.deid.dicom(scan.dataset, raw_patient, scan.cleaned)
            path = out_dir / f"{scan.stem}.dcm"
            clean.save_as(path, enforce_file_format=True)
        else:
            path = out_dir / f"{scan.stem}.png"
            img = scan.frames[0]
            cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img)
            actions = [{"path": "(raster metadata)", "tag": "-", "action": "X:not-copied"},
                       {"path": "pixels", "tag": "-", "action": f"C:pixels-{scan.cleaned.method}"}]
        self.result.audit.append({"output": str(path.relative_to(self.workspace)),
                                  "ocr_verified": scan.cleaned.verified, "actions": actions})
        scan.written, scan.dataset = path, None
        return path


def ingest_cohort(cohort: Path, workspace: Path, deid_dir: str, pseudo: D.Pseudonymizer,
                  keep_columns: tuple[str, ...], today: dt.date | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  settings: D.Settings | None = None) -> IngestResult:
    """De-identify a cohort into `workspace/deid_dir`; returns manifest and quarantine rows."""
    rows = read_annotations(cohort)
    ing = Ingestor(cohort, workspace, deid_dir, pseudo, keep_columns, today or dt.date.today(), settings)
    return ing.run(rows, progress)


def upsert(path: Path, rows: list[dict[str, Any]], schema: pa.Schema, keys: tuple[str, ...]) -> pa.Table:
    """Merge rows into a Parquet table by key; the same rows again change nothing."""
    new = pa.Table.from_pylist(rows, schema=schema)
    if path.is_file():
        old = pq.read_table(path).cast(schema)
        seen = {tuple(r[k] for k in keys) for r in new.select(list(keys)).to_pylist()}
        keep = [tuple(r[k] for k in keys) not in seen for r in old.select(list(keys)).to_pylist()]
        new = pa.concat_tables([old.filter(pa.array(keep, pa.bool_())), new])
    new = new.sort_by([(k, "ascending") for k in keys])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(new, path)
    return new


def report(result: IngestResult, max_shift_days: int, settings: D.Settings | None = None) -> dict[str, Any]:
    """What was done, for the data steward and the IRB: counts, profile, options; no paths."""
    settings = settings or D.Settings()
    return {
        "inputs": len(result.manifest) + len(result.quarantine),
        "deidentified": len(result.manifest),
        "quarantined": len(result.quarantine),
        "reasons": result.reasons,
        "ocr_verified": result.ocr_verified,
        **D.profile_record(settings.options),
        "date_shift": f"per patient, keyed, within +/-{max_shift_days} days",
        "pseudonyms": "HMAC-SHA256 with the secret key",
    }
