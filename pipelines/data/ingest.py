"""Ingest a hospital export (CONTRACT.md section 1) into the de-identified data store.

Every data row of annotations.csv ends up either as a manifest row (de-identified scan,
mask, pseudonymous patient, shifted exam date) or as a quarantine row with a reason code;
nothing is dropped silently. Re-ingesting the same cohort reproduces the same rows.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.deid import core as D
from pipelines.deid.folder import ProcessPool, Runner, Worker, atomic_target, device_step, worker_for, write_atomic
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
    # (output, ScanCache key) of scans written whose every row was quarantined
    unused: list[tuple[str, str]] = field(default_factory=list)
    scans_processed: int = 0                           # de-identified in this run
    scans_reused: int = 0                              # taken from the ScanCache

    def extend(self, other: IngestResult) -> None:
        self.manifest.extend(other.manifest)
        self.quarantine.extend(other.quarantine)
        self.audit.extend(other.audit)
        self.unused.extend(other.unused)
        self.ocr_verified += other.ocr_verified
        self.scans_processed += other.scans_processed
        self.scans_reused += other.scans_reused

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
    if mask.dtype == np.uint8:                   # a histogram: ten times np.unique's speed
        values = set(np.flatnonzero(np.bincount(mask.ravel(), minlength=256)).tolist())
    else:
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
    key: str = ""                             # ScanCache.key: source digest, patient ID, settings, key
    device: str | None = None                 # which device template OCR verified (None: none)

    def record(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> _Scan:
        rec = dict(rec)
        rec["frames"] = [tuple(f) for f in rec["frames"]]
        rec["spacing"] = tuple(rec["spacing"])
        return cls(**rec)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks (a cine may be hundreds of megabytes)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def source_digest(path: Path) -> str:
    """What a scan's de-identification reads: its bytes, and for a PNG/JPEG its sidecar (the
    pixel spacing), so that an added or corrected sidecar is read again."""
    digest = file_digest(path)
    sidecar = path.with_suffix(".json")
    if path.suffix.lower() in S.RASTER_SUFFIXES and sidecar.is_file():
        digest = hashlib.sha256(f"{digest}:{file_digest(sidecar)}".encode()).hexdigest()
    return digest


# outcomes that depend on the moment, not on the scan: never remembered
TRANSIENT = {"unreadable_file"}


class ScanCache:
    """What ingest has already de-identified: one JSON record per source scan, named by a digest
    of its bytes, the patient ID its annotations give it, and the settings and key it was
    de-identified with (the worker's fingerprint), so a scan is de-identified again only when
    one of those changes. A record holds the header's PatientID: the cache is identified data,
    kept beside the raw export and never pushed. A record written as each scan finishes lets an
    interrupted ingest resume where it stopped."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.touched: set[str] = set()

    @staticmethod
    def key(fingerprint: str, digest: str, csv_pid: str) -> str:
        return hashlib.sha256(json.dumps([fingerprint, digest, csv_pid]).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str, workspace: Path) -> _Scan | D.DeidError | None:
        """The earlier outcome for this key, or None when there is none or its output is gone."""
        rec = self.record(key)
        if rec is None:
            return None
        if "error" in rec:
            return D.DeidError(rec["error"], rec["message"])
        try:
            scan = _Scan.from_record(rec)
        except (TypeError, KeyError):
            return None                              # a record from another version of this code
        if scan.written and not (workspace / scan.written).is_file():
            return None
        return scan

    def put(self, key: str, outcome: _Scan | S.ScanError) -> None:
        self.remember(key, outcome.record() if isinstance(outcome, _Scan)
                      else {"error": outcome.code, "message": str(outcome)})

    def record(self, key: str) -> dict[str, Any] | None:
        """The raw record under `key` (None when there is none)."""
        self.touched.add(key)
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None

    def remember(self, key: str, rec: dict[str, Any]) -> None:
        self.touched.add(key)
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, mode=0o700)         # identified data: its owner only
        write_atomic(self._path(key), json.dumps(rec, sort_keys=True).encode())

    def forget_output(self, key: str) -> None:
        """The scan's file was removed (no row used it): written again if a row ever needs it."""
        rec = self.record(key)
        if rec is not None and "error" not in rec:
            rec["written"] = rec["audit"] = None
            self.remember(key, rec)

    def prune(self) -> int:
        """Remove the records of scans no cohort named in this run; how many were removed."""
        gone = 0
        for path in self.folder.glob("*/*.json") if self.folder.is_dir() else ():
            if path.stem not in self.touched:
                path.unlink(missing_ok=True)
                gone += 1
        return gone


def ingest_file(item: tuple[str, str, str, str, bool | None, str], init: tuple) -> _Scan | D.DeidError:
    """One scan in a worker process: read, clean, verify, and write it de-identified under
    `root/deid_dir/<patient pseudonym>/` (atomically) when a patient ID is known."""

    path, csv_pid, root, deid_dir, first, key = item
    deid = worker_for(init).deid
    try:
        return _ingest_file(Path(path), csv_pid, Path(root), deid_dir, first, deid, write_atomic, key)
    except S.ScanError as exc:
        return exc
    except OSError as exc:
        return D.DeidError("unreadable_file", f"cannot be read ({exc.strerror or type(exc).__name__})")


def _ingest_file(path: Path, csv_pid: str, root: Path, deid_dir: str, first: bool | None,
                 deid: D.Deidentifier, write: Callable[[Path, Any], None], key: str) -> _Scan:
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
    scan = _Scan(stem, header_pid, frames, spacing, cleaned.photometric, fmt, cleaned.verified, key=key)
    raw_patient = header_pid or csv_pid            # the header wins; the contract flags a mismatch
    if not raw_patient:
        return scan                                # every row of it will be quarantined: nothing written
    # named by content and settings too: a changed scan or setting writes a new file beside the
    # old one, which the previous manifest keeps until the new one replaces it
    out = root / deid_dir / pseudo.patient(raw_patient) / f"{stem}-{key[:12]}.{'dcm' if fmt == 'dicom' else 'png'}"
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
    one by one against what the workers sent back. With a `cache`, a scan de-identified before
    with the same bytes, patient ID, settings and key is taken from it, not done again."""

    def __init__(self, cohort: Path, workspace: Path, deid_dir: str, pseudo: D.Pseudonymizer,
                 keep_columns: tuple[str, ...], today: dt.date, settings: D.Settings | None = None,
                 runner: Runner | None = None, cache: ScanCache | None = None) -> None:
        self.cohort, self.workspace, self.deid_dir = cohort, workspace, deid_dir
        self.pseudo, self.keep, self.today = pseudo, keep_columns, today
        self.settings = settings or D.Settings()
        self.runner = runner or ProcessPool(1)
        self.cache = cache
        self.name = cohort_name(cohort)
        self._scans: dict[Path, _Scan | D.DeidError] = {}
        # this process's Worker, for the fingerprint and a scan written here (`_written`): its
        # own, not the process's (worker_for), which a pool forked from here would inherit and
        # so skip its own set-up
        self._worker = Worker(*self._init())

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
        """De-identify every scan the rows name that the cache does not hold, in parallel; OCR
        reads the first of each device (a device verified by a cached scan counts as read)."""
        fingerprint = self._worker.fingerprint
        todo: list[tuple[Path, str, str]] = []
        verified_devices: set[str] = set()
        self.reused = 0
        for path, pid in self._files(rows):
            try:
                key = ScanCache.key(fingerprint, source_digest(path), pid)
            except OSError as exc:
                self._scans[path] = D.DeidError("unreadable_file", f"cannot be read ({exc.strerror})")
                continue
            done = self.cache.get(key, self.workspace) if self.cache else None
            if done is None:
                todo.append((path, pid, key))
            else:
                self._scans[path] = done
                self.reused += 1
                if isinstance(done, _Scan) and done.device and done.verified:
                    verified_devices.add(done.device)
        root = str(self.workspace)

        def body(pmap: Callable) -> list:
            devices = list(pmap(device_step, [p for p, _, _ in todo]))
            seen = set(verified_devices)
            items = []
            for (path, pid, key), device in zip(todo, devices, strict=True):
                first = None if device is None else device not in seen
                seen.add(device or "")
                items.append((str(path), pid, root, self.deid_dir, first, key))
            out = []
            for i, ((_, _, key), device, res) in enumerate(zip(todo, devices, pmap(ingest_file, items), strict=True),
                                                       start=1):
                if isinstance(res, _Scan):
                    res.device = device
                if self.cache and not (isinstance(res, S.ScanError) and res.code in TRANSIENT):
                    self.cache.put(key, res)             # kept as it lands: a rerun resumes here
                out.append(res)
                if progress:
                    progress(i, len(items))
            return out

        results = self.runner(self._init(), body) if todo else []
        for (path, _, _), res in zip(todo, results, strict=True):
            self._scans[path] = res
        self.processed = len(results)

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
        """Judge every row. A scan every row of which was quarantined is listed in `unused`: its
        file is removed by the caller, once the new manifest has replaced the old one."""
        self.result = IngestResult()
        self.load_all(rows, progress)
        for n, row in enumerate(rows, start=1):
            self.process(n, row)
        self.result.scans_processed, self.result.scans_reused = self.processed, self.reused
        used = {rec["deid_path"] for rec in self.result.manifest}
        for scan in self._scans.values():
            if isinstance(scan, _Scan) and scan.written:
                if scan.written in used:
                    self.result.audit.append(scan.audit)
                    self.result.ocr_verified += scan.verified
                else:
                    self.result.unused.append((scan.written, scan.key))
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
        sources = {col: _inside(self.cohort, rel, col) if (rel := (row.get(col) or "").strip()) else None
                   for col in ("mask", "head_mask")}
        tcd, cm = _float(row, "tcd_mm", 0.0, 1000.0), _float(row, "cm_mm", 0.0, 1000.0)
        hc = _float(row, "hc_mm", 0.0, 1000.0)
        patient = self.pseudo.patient(raw_patient)
        out_dir = self.workspace / self.deid_dir / patient
        self._written(scan, path, csv_pid)
        image_id = self.pseudo.image(f"{scan.stem}#{frame}")
        mask_path, mask_status = self._mask(sources["mask"], "mask", out_dir / f"{image_id}_mask")
        head_path, head_status = self._mask(sources["head_mask"], "head_mask", out_dir / f"{image_id}_head")
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

    def _mask(self, source: Path | None, column: str, stem: Path) -> tuple[Path | None, str]:
        """The de-identified copy of a row's mask (`stem-<content>.png`) and the mask's status.
        Re-encoded from the pixels, so a source PNG's text chunks (names, dates) stay behind;
        named by content, as the scans, so a corrected mask never overwrites the one the
        previous manifest names. What a mask file held is remembered by its digest: an unchanged
        mask is not decoded again."""
        if source is None:
            return None, "none"
        if not source.is_file():
            return None, "missing"
        key = ScanCache.key(f"mask:{column}", file_digest(source), "")
        known = self.cache.record(key) if self.cache else None
        png = None
        if known is None:
            mask, state = _read_mask(source, column)
            png = cv2.imencode(".png", mask)[1].tobytes() if mask is not None else None
            known = {"status": state, "tag": hashlib.sha256(png).hexdigest()[:12] if png else None}
            if self.cache:
                self.cache.remember(key, known)
        if known["status"] != "ok":
            return None, known["status"]
        target = stem.with_name(f"{stem.name}-{known['tag']}.png")
        if not target.is_file():
            if png is None:
                png = cv2.imencode(".png", _read_mask(source, column)[0])[1].tobytes()
            write_atomic(target, png)
        return target, "ok"

    def _staff(self, raw: str | None) -> str | None:
        """Annotators are staff: kept linkable (inter-observer checks) but pseudonymous."""
        return self.pseudo.staff(raw) if raw and raw.strip() else None

    def _written(self, scan: _Scan, path: Path, csv_pid: str) -> Path:
        """The de-identified file; a scan whose first row had no patient ID is written now, in
        this process, with this row's."""
        if scan.written is None:
            done = _ingest_file(path, csv_pid, self.workspace, self.deid_dir, None,
                                self._worker.deid, write_atomic, scan.key)
            scan.written, scan.audit = done.written, done.audit
            if self.cache:
                self.cache.put(scan.key, scan)
        return self.workspace / str(scan.written)


PERIODS = 5


def rank_first_exams(manifest: list[dict[str, Any]]) -> None:
    """Give every row its patient's `first_exam_period` (1-5) from the real exam dates the rows
    carry (`REAL_EXAM`), over all rows given, then drop those dates. Patients are ordered by
    their real first exam (equal days in the order of their cleaned pixels' digest, which no key
    changes, then of pseudonym) and cut into fifths of as equal size as their number allows."""
    first: dict[str, dt.date] = {}
    digest: dict[str, str] = {}
    for rec in manifest:
        if REAL_EXAM in rec:
            date, patient = rec[REAL_EXAM]
            first[patient] = min(date, first.get(patient, date))
            sha = rec.get("pixel_sha256") or ""
            digest[patient] = min(sha, digest.get(patient, sha))
    order = sorted(first, key=lambda p: (first[p], digest[p], p))
    period = {p: 1 + (k * PERIODS) // max(len(order), 1) for k, p in enumerate(order)}
    for rec in manifest:
        real = rec.pop(REAL_EXAM, None)
        if real is not None:
            rec["first_exam_period"] = period[real[1]]


def ingest_cohort(cohort: Path, workspace: Path, deid_dir: str, pseudo: D.Pseudonymizer,
                  keep_columns: tuple[str, ...], today: dt.date | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  settings: D.Settings | None = None, runner: Runner | None = None,
                  rank: bool = True, cache: ScanCache | None = None) -> IngestResult:
    """De-identify a cohort into `workspace/deid_dir`; returns manifest and quarantine rows.
    `rank`: place the patients' first exams within this cohort now (`rank_first_exams`); the
    caller that joins several cohorts passes False and places them together, and removes the
    `unused` files after its manifest is written (without a cache they are removed here)."""
    rows = read_annotations(cohort)
    ing = Ingestor(cohort, workspace, deid_dir, pseudo, keep_columns, today or dt.date.today(), settings,
                   runner, cache)
    result = ing.run(rows, progress)
    if rank:
        rank_first_exams(result.manifest)
    if cache is None:
        for rel, _ in result.unused:
            (workspace / rel).unlink(missing_ok=True)
    return result


def write_table(path: Path, rows: list[dict[str, Any]], schema: pa.Schema, keys: tuple[str, ...]) -> pa.Table:
    """Write rows as a Parquet table sorted by key, atomically and durably: a reader, or a crash,
    sees the old table or the new one, never a part."""
    table = pa.Table.from_pylist(rows, schema=schema).sort_by([(k, "ascending") for k in keys])
    with atomic_target(path, durable=True) as tmp:
        pq.write_table(table, tmp)
    return table


def upsert(path: Path, rows: list[dict[str, Any]], schema: pa.Schema, keys: tuple[str, ...]) -> pa.Table:
    """Merge rows into a Parquet table by key; the same rows again change nothing."""
    new = pa.Table.from_pylist(rows, schema=schema)
    if path.is_file():
        old = pq.read_table(path).cast(schema)
        seen = {tuple(r[k] for k in keys) for r in new.select(list(keys)).to_pylist()}
        keep = [tuple(r[k] for k in keys) not in seen for r in old.select(list(keys)).to_pylist()]
        new = pa.concat_tables([old.filter(pa.array(keep, pa.bool_())), new])
    return write_table(path, new.to_pylist(), schema, keys)


def collect_garbage(store: Path, workspace: Path, keep: set[str]) -> int:
    """Remove every file under the de-identified store that `keep` (paths relative to the
    workspace) does not name, and folders left empty: what an earlier manifest used, scans no
    row uses, temporary files a killed run left. Run only after the new manifest is written.
    Returns how many files were removed."""
    removed = 0
    for path in sorted(store.rglob("*"), reverse=True):
        if path.is_file() or path.is_symlink():
            if str(path.relative_to(workspace)) not in keep:
                path.unlink()
                removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed


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
        "no_template": settings.no_template,
        "date_shift": f"per patient, keyed, within +/-{max_shift_days} days",
        "pseudonyms": "HMAC-SHA256 with the secret key",
    }
