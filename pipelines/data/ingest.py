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

from pipelines.deid import core as D
from pipelines.deid.folder import ProcessPool, Runner, device_step, worker_for, write_atomic
from pipelines.errors import CbhError
from pipelines.imaging import scan as S

REQUIRED = ("image", "exam_date", "ga_weeks")
REAL_EXAM = "_real_exam"     # a manifest row's real exam date and patient, in memory until ranked
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
    # the fetal head (HC18-style cohorts): a filled 0/1 mask and the sonographer's circumference
    ("head_mask_path", pa.string()), ("head_mask_status", pa.string()),   # status as mask_status
    ("hc_mm", pa.float64()),
    # which fifth of the data store's patients, ordered by real first exam date, the patient
    # falls in (1: the earliest fifth), taken on the identified side: the temporal split needs
    # the order, which a date shifted per patient by up to a year scrambles. A fifth and not a
    # rank: a rank by day would count the days since collection began and give the shift away
    ("first_exam_period", pa.int32()),
])
QUARANTINE_SCHEMA = pa.schema([
    ("cohort", pa.string()), ("source_row", pa.int64()), ("image", pa.string()),
    ("reason_code", pa.string()), ("reason", pa.string()),
])


class CohortError(CbhError):
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


# the values a mask may hold: a label mask its classes, a head mask 0/1 or 0/255. Anything else
# (a screenshot given as a mask: pixels that may show names and dates) is never written to the
# de-identified store; size and anatomy are the data contract's to judge
MASK_VALUES = {"mask": ({0, 1, 2},), "head_mask": ({0, 1}, {0, 255})}


def _read_mask(path: Path, column: str) -> tuple[np.ndarray | None, str]:
    """The mask and its status (`unexpected_values` when it holds more than a mask's values)."""
    if not path.is_file():
        return None, "missing"
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        return None, "undecodable"
    if mask.ndim != 2:
        return None, "not_single_channel"
    values = set(np.unique(mask).tolist())
    if not any(values <= allowed for allowed in MASK_VALUES[column]):
        return None, "unexpected_values"
    return mask, "ok"


def _inside(cohort: Path, rel: str, column: str) -> Path:
    """`rel` resolved under the cohort; a path leaving it (`..`, absolute, a link out) is
    quarantined rather than read, as for the image."""
    path = (cohort / rel).resolve()
    if cohort.resolve() not in path.parents:
        raise RowError(f"bad_{column}_path", f"{column} path points outside the cohort")
    return path


def _optional_mask(cohort: Path, row: dict[str, str], column: str) -> tuple[np.ndarray | None, str]:
    """The mask a row names in `column` and its status (`none` when the column is empty)."""
    rel = (row.get(column) or "").strip()
    return _read_mask(_inside(cohort, rel, column), column) if rel else (None, "none")


@dataclass
class _Scan:
    """A de-identified source file, shared by all rows that reference its frames. It holds no
    pixels: a worker process decoded, cleaned, verified and wrote the file, and sent back the
    per-frame size and pixel hash."""

    stem: str
    raw_patient: str                          # PatientID of the header ("" for PNG/JPEG)
    frames: list[tuple[int, int, str]]        # (rows, cols, sha256 of the cleaned pixels) per frame
    spacing: tuple[float, float]
    photometric: str
    fmt: str
    verified: bool                            # OCR read the cleaned pixels
    written: str | None = None                # output path relative to the workspace
    audit: dict[str, Any] | None = None


def ingest_file(item: tuple[str, str, str, str, bool | None], init: tuple) -> _Scan | D.DeidError:
    """One scan in a worker process: read, clean, verify, and write it de-identified under
    `root/deid_dir/<patient pseudonym>/` (atomically) when a patient ID is known."""

    path, csv_pid, root, deid_dir, first = item
    deid = worker_for(init).deid
    try:
        return _ingest_file(Path(path), csv_pid, Path(root), deid_dir, first, deid, write_atomic)
    except S.ScanError as exc:
        return exc
    except OSError as exc:
        return D.DeidError("unreadable_file", f"cannot be read ({exc.strerror or type(exc).__name__})")


def _ingest_file(path: Path, csv_pid: str, root: Path, deid_dir: str, first: bool | None,
                 deid: D.Deidentifier, write: Callable[[Path, Any], None]) -> _Scan:
    pseudo = deid.pseudo
    if path.suffix.lower() in S.RASTER_SUFFIXES:
        spacing = S.sidecar_spacing_mm(path)
        if spacing is None:
            raise D.DeidError("no_pixel_spacing", f"sidecar {path.with_suffix('.json').name} with "
                              "pixel_spacing_mm [row, col] is missing or invalid")
        S.check_spacing(spacing)                   # out of range: quarantined before any pixel work
        data = path.read_bytes()
        img = S.decode_raster(data)
        if img is None:
            raise D.DeidError("unreadable_image", "image cannot be decoded")
        digest = hashlib.sha256(data).hexdigest()
        cleaned = deid.clean_raster(img, digest, first)
        stem, header_pid, fmt, ds = pseudo.image("raster:" + digest), "", "png", None
    else:
        ds = S.read_dicom(path)
        spacing = S.pixel_spacing_mm(ds)
        if spacing is None:
            raise D.DeidError("no_pixel_spacing", "pixel spacing cannot be established "
                              "(no calibrated ultrasound region, no PixelSpacing)")
        S.check_spacing(spacing)
        cleaned = deid.clean_dicom(ds, first)
        stem, header_pid, fmt = pseudo.image("dicom:" + str(ds.SOPInstanceUID)), \
            str(ds.get("PatientID", "") or "").strip(), "dicom"
    frames = [(int(f.shape[0]), int(f.shape[1]), hashlib.sha256(np.ascontiguousarray(f).tobytes()).hexdigest())
              for f in cleaned.frames]
    scan = _Scan(stem, header_pid, frames, spacing, cleaned.photometric, fmt, cleaned.verified)
    raw_patient = header_pid or csv_pid            # the header wins; the contract flags a mismatch
    if not raw_patient:
        return scan                                # every row of it will be quarantined: nothing written
    out = root / deid_dir / pseudo.patient(raw_patient) / f"{stem}.{'dcm' if fmt == 'dicom' else 'png'}"
    if ds is not None:
        clean, actions = deid.dicom(ds, raw_patient, cleaned)
        write(out, clean)
    else:
        png, actions = deid.raster_png(cleaned)
        write(out, png)
    scan.written = str(out.relative_to(root))
    scan.audit = {"output": scan.written, "ocr_verified": cleaned.verified, "actions": actions}
    return scan


class Ingestor:
    """Turns annotation rows into manifest or quarantine rows. The scans are de-identified first,
    in parallel (`runner`: the same engine as `cbh deid`), then the rows are judged
    one by one against what the workers sent back."""

    def __init__(self, cohort: Path, workspace: Path, deid_dir: str, pseudo: D.Pseudonymizer,
                 keep_columns: tuple[str, ...], today: dt.date, settings: D.Settings | None = None,
                 runner: Runner | None = None) -> None:
        self.cohort, self.workspace, self.deid_dir = cohort, workspace, deid_dir
        self.pseudo, self.keep, self.today = pseudo, keep_columns, today
        self.settings = settings or D.Settings()
        self.runner = runner or ProcessPool(1)
        self.name = cohort_name(cohort)
        self._scans: dict[Path, _Scan | D.DeidError] = {}

    def _init(self) -> tuple:
        return (self.workspace / self.deid_dir, self.pseudo.key, self.pseudo.max_shift_days, self.settings)

    def _files(self, rows: list[dict[str, str]]) -> list[tuple[Path, str]]:
        """Each scan file the rows name (once, in row order) with the first row's patient_id."""
        out: dict[Path, str] = {}
        for row in rows:
            rel = (row.get("image") or "").strip()
            path = (self.cohort / rel).resolve()
            if rel and self.cohort.resolve() in path.parents and path.is_file():
                if not out.get(path):
                    out[path] = (row.get("patient_id") or "").strip()
        return list(out.items())

    def load_all(self, rows: list[dict[str, str]], progress: Callable[[int, int], None] | None = None) -> None:
        """De-identify every scan the rows name, in parallel; OCR reads the first of each device."""
        files = self._files(rows)
        root = str(self.workspace)

        def body(pmap: Callable) -> list:
            devices = list(pmap(device_step, [p for p, _ in files]))
            seen: set[str] = set()
            items = []
            for (path, pid), device in zip(files, devices, strict=True):
                first = None if device is None else device not in seen
                seen.add(device or "")
                items.append((str(path), pid, root, self.deid_dir, first))
            out = []
            for i, res in enumerate(pmap(ingest_file, items), start=1):
                out.append(res)
                if progress:
                    progress(i, len(items))
            return out

        results = self.runner(self._init(), body) if files else []
        for (path, _), res in zip(files, results, strict=True):
            self._scans[path] = res

    def _load(self, path: Path) -> _Scan:
        cached = self._scans.get(path)
        if cached is None:                   # not named by the first pass (cannot happen for a listed row)
            raise D.DeidError("unreadable_file", "scan was not de-identified")
        if isinstance(cached, S.ScanError):
            raise cached
        return cached

    def process(self, n: int, row: dict[str, str]) -> None:
        """Process one data row (n is 1-based); the outcome lands in manifest or quarantine."""
        try:
            rec = self._row(row)
            rec["source_row"] = n
            self.result.manifest.append(rec)
        except (RowError, S.ScanError) as exc:
            self.result.quarantine.append({"cohort": self.name, "source_row": n,
                                           "image": (row.get("image") or "").strip(),
                                           "reason_code": exc.code, "reason": str(exc)})

    def run(self, rows: list[dict[str, str]], progress: Callable[[int, int], None] | None = None) -> IngestResult:
        self.result = IngestResult()
        self.load_all(rows, progress)
        for n, row in enumerate(rows, start=1):
            self.process(n, row)
        used = {rec["deid_path"] for rec in self.result.manifest}
        for scan in self._scans.values():
            if isinstance(scan, _Scan) and scan.written:
                if scan.written in used:
                    self.result.audit.append(scan.audit)
                    self.result.ocr_verified += scan.verified
                else:                    # every row of it was quarantined: it leaves no file behind
                    (self.workspace / scan.written).unlink(missing_ok=True)
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
        if not 0 <= frame < len(scan.frames):
            raise RowError("bad_frame", f"frame is not an index below {len(scan.frames)}")
        rows_px, cols_px, pixel_sha = scan.frames[frame]
        mask, mask_status = _optional_mask(self.cohort, row, "mask")
        head, head_status = _optional_mask(self.cohort, row, "head_mask")
        tcd, cm = _float(row, "tcd_mm", 0.0, 1000.0), _float(row, "cm_mm", 0.0, 1000.0)
        hc = _float(row, "hc_mm", 0.0, 1000.0)
        patient = self.pseudo.patient(raw_patient)
        out_dir = self.workspace / self.deid_dir / patient
        self._written(scan, path, csv_pid)
        image_id = self.pseudo.image(f"{scan.stem}#{frame}")
        written: dict[str, Path] = {}
        for suffix, m in (("mask", mask), ("head", head)):
            if m is not None:
                # re-encoded from the pixels: a source PNG's text chunks (names, dates) stay behind
                written[suffix] = out_dir / f"{image_id}_{suffix}.png"
                cv2.imwrite(str(written[suffix]), m)
        mask_path, head_path = written.get("mask"), written.get("head")
        keep = set(self.keep)
        return {
            "image_id": image_id, "patient_pseudo": patient,
            "exam_date": self.pseudo.shift_date(exam, raw_patient), "ga_weeks": ga,
            "label": label or None, "tcd_mm": tcd, "cm_mm": cm,
            "site": (row.get("site") or "").strip() or None if "site" in keep else None,
            "annotator": self._staff(row.get("annotator")) if "annotator" in keep else None,
            "frame": frame, "deid_path": scan.written,
            "mask_path": str(mask_path.relative_to(self.workspace)) if mask_path else None,
            "rows": rows_px, "cols": cols_px,
            "spacing_row_mm": scan.spacing[0], "spacing_col_mm": scan.spacing[1],
            "modality": "US", "photometric": scan.photometric, "source_format": scan.fmt,
            "pixel_sha256": pixel_sha,
            "cohort": self.name, "source_row": None,
            "exam_date_check": exam_check, "patient_check": "ok" if consistent else "mismatch",
            "mask_status": mask_status,
            "head_mask_path": str(head_path.relative_to(self.workspace)) if head_path else None,
            "head_mask_status": head_status, "hc_mm": hc,
            REAL_EXAM: (exam, patient),      # for rank_first_exams; never written
        }

    def _staff(self, raw: str | None) -> str | None:
        """Annotators are staff: kept linkable (inter-observer checks) but pseudonymous."""
        return self.pseudo.staff(raw) if raw and raw.strip() else None

    def _written(self, scan: _Scan, path: Path, csv_pid: str) -> Path:
        """The de-identified file; a scan whose first row had no patient ID is written now, in
        this process, with this row's."""
        if scan.written is None:
            done = _ingest_file(path, csv_pid, self.workspace, self.deid_dir, None,
                                worker_for(self._init()).deid, write_atomic)
            scan.written, scan.audit = done.written, done.audit
        return self.workspace / str(scan.written)


PERIODS = 5


def rank_first_exams(manifest: list[dict[str, Any]]) -> None:
    """Give every row its patient's `first_exam_period` (1-5) from the real exam dates the rows
    carry (`REAL_EXAM`), over all rows given, then drop those dates. Patients are ordered by
    their real first exam (equal days in pseudonym order, which is keyed) and cut into fifths of
    as equal size as their number allows."""
    first: dict[str, dt.date] = {}
    for rec in manifest:
        if REAL_EXAM in rec:
            date, patient = rec[REAL_EXAM]
            first[patient] = min(date, first.get(patient, date))
    order = sorted(first, key=lambda p: (first[p], p))
    period = {p: 1 + (k * PERIODS) // max(len(order), 1) for k, p in enumerate(order)}
    for rec in manifest:
        real = rec.pop(REAL_EXAM, None)
        if real is not None:
            rec["first_exam_period"] = period[real[1]]


def ingest_cohort(cohort: Path, workspace: Path, deid_dir: str, pseudo: D.Pseudonymizer,
                  keep_columns: tuple[str, ...], today: dt.date | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  settings: D.Settings | None = None, runner: Runner | None = None,
                  rank: bool = True) -> IngestResult:
    """De-identify a cohort into `workspace/deid_dir`; returns manifest and quarantine rows.
    `rank`: place the patients' first exams within this cohort now (`rank_first_exams`); the
    caller that joins several cohorts passes False and places them together."""
    rows = read_annotations(cohort)
    ing = Ingestor(cohort, workspace, deid_dir, pseudo, keep_columns, today or dt.date.today(), settings,
                   runner)
    result = ing.run(rows, progress)
    if rank:
        rank_first_exams(result.manifest)
    return result


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
