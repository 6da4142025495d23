"""`cbh deid SRC DST`: de-identify every DICOM/PNG/JPEG under a folder, in parallel.

- Outputs are named by pseudonyms only (`DST/<patient pseudonym>/<image pseudonym>.dcm`,
  `DST/raster/<image pseudonym>.png`) and written atomically (temporary file, then rename).
- A process pool de-identifies the files, one file per task, so memory stays that of a few
  files whatever the corpus size.
- Each output's audit (attribute, path, action; no values) is written beside the run state in
  `DST/.cbh-deid/audit/` and gathered into `DST/deid-audit.jsonl`. A rerun skips outputs whose
  audit names the same settings and key (resume after a crash) and rewrites nothing else:
  same names, same bytes. One run at a time writes a destination (a lock in `DST/.cbh-deid`);
  it first removes the temporary files a killed run left, so no partial file survives.
- Inputs that cannot be de-identified with certainty are copied, untouched, into the
  quarantine folder on the identified side (default: `DST` + `-quarantine`, beside DST, never
  inside it) with `quarantine.csv` giving each one's reason code and sentence.
- `DST/deid-report.json` counts what happened and names no source path; the source-to-output
  link is written only to `--link FILE`.
"""

from __future__ import annotations

import csv
import ctypes
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from pydicom.dataset import Dataset

from pipelines.deid import core as D
from pipelines.errors import CbhError
from pipelines.imaging import scan as S
from pipelines.locks import Busy, exclusive_lock

T = TypeVar("T")
STATE = ".cbh-deid"
REPORT, AUDIT = "deid-report.json", "deid-audit.jsonl"


class FolderError(CbhError, ValueError):
    """The folders given to `cbh deid` cannot be used as they are (one sentence naming the folder)."""


@dataclass
class Outcome:
    source: str
    output: str | None = None        # relative to DST
    code: str | None = None          # quarantine reason code
    reason: str | None = None
    verified: bool = False           # OCR read the cleaned pixels
    method: str | None = None        # how the pixels were cleaned
    resumed: bool = False            # already done by an earlier run with the same settings
    device: str | None = None        # what OCR verification counts as one device (name step)


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _short(name: str, limit: int = 200) -> str:
    """`name` cut to at most `limit` UTF-8 bytes, its suffix kept."""
    if len(name.encode()) <= limit:
        return name
    suffix = Path(name).suffix
    if len(suffix.encode()) > 16:                  # not a file type's suffix: cut like the rest
        suffix = ""
    stem = name[: len(name) - len(suffix)].encode()[: limit - len(suffix.encode())].decode(errors="ignore")
    return stem + suffix


def tree_files(src: Path, each_folder_once: bool = True) -> list[Path]:
    """Every regular file under `src`, through symlinked sub-folders too (a site's export often
    links its days in), sorted and spelled through `src` (relative_to(src) works). A folder that
    is its own ancestor (a link loop) is never entered again; with `each_folder_once` a folder
    reached by a second path adds nothing either (de-identification needs each scan once; a copy
    of an export needs every path its annotations may name)."""
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []

    def walk(folder: Path, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            st = os.stat(folder)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return                    # an unreadable folder holds nothing we can use (as os.walk)
        key = (st.st_dev, st.st_ino)
        if key in ancestors or (each_folder_once and key in seen):
            return
        seen.add(key)
        for entry in entries:
            path = folder / entry.name
            try:
                if entry.is_dir(follow_symlinks=True):
                    walk(path, ancestors | {key})
                elif entry.is_file(follow_symlinks=True):
                    found.append(path)
            except OSError:
                continue              # a broken link: nothing to read
    walk(Path(src), frozenset())
    return sorted(found)


def discover(src: Path) -> list[Path]:
    """Every scan under `src` (PNG/JPEG by suffix, DICOM by content), as `tree_files` walks it."""
    return [p for p in tree_files(src) if p.suffix.lower() in S.RASTER_SUFFIXES or is_dicom(p)]


@contextmanager
def atomic_target(path: Path, durable: bool = False) -> Iterator[str]:
    """A temporary file (`.tmp-*`) beside `path`, renamed to `path` when the block succeeds and
    removed when it fails: a crash leaves no partial file under the final name (what a SIGKILL
    leaves, the next run's `_remove_partial` removes). `durable`: the file and the rename are
    flushed to disk before returning (for a commit point such as a manifest, which a power loss
    must not leave empty)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | Dataset, durable: bool = False) -> None:
    """Write bytes, or a dataset as a DICOM file, atomically (`atomic_target`)."""
    with atomic_target(path, durable) as tmp, open(tmp, "wb") as fh:
        if isinstance(data, Dataset):
            D.write_dicom(fh, data)
        else:
            fh.write(data)


def audit_path(dst: Path, output: str) -> Path:
    """Where one output's audit record (and resume fingerprint) lives until gathered."""
    return dst / STATE / "audit" / (output.replace("/", "__") + ".json")


def raster_size(path: Path) -> tuple[int, int]:
    """(rows, cols) of a PNG/JPEG from its header alone (ScanError 'too_many_pixels' past the limit)."""
    try:
        size = S.raster_size(path)
    except OSError as exc:
        raise D.DeidError("unreadable_image", "PNG/JPEG cannot be decoded") from exc
    if size is None:
        raise D.DeidError("unreadable_image", "PNG/JPEG cannot be decoded")
    return size[1], size[0]


@functools.cache
def code_version() -> str:
    """What de-identifies, as a digest: this package's code and tables, the scan reader, and the
    versions of pydicom and of both OCR engines and their models."""
    import pydicom

    from pipelines.deid import ocr

    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for path in sorted([*here.rglob("*.py"), *here.glob("ps315/*"), here.parent / "imaging" / "scan.py"]):
        if path.is_file():
            h.update(path.relative_to(here.parent).as_posix().encode() + b"\0" + path.read_bytes())
    h.update(f"pydicom {pydicom.__version__}; {ocr.version()}".encode())
    return h.hexdigest()[:16]


class Worker:
    """What one process holds: the de-identifier (its OCR memory of devices) and the destination."""

    def __init__(self, dst: Path, key: bytes, max_shift_days: int, settings: D.Settings) -> None:
        self.dst = dst
        self.deid = D.Deidentifier(D.Pseudonymizer(key, max_shift_days), settings)
        pseudo = self.deid.pseudo
        # names the settings, the key (not recoverable from it) and the code: an output made with
        # other ones is stale (a fixed leak in the profile must reach every stored file)
        self.fingerprint = hashlib.sha256(json.dumps(
            [self.deid.record(), [t.__dict__ for t in settings.templates], pseudo.patient("fingerprint"),
             settings.limits.__dict__, settings.ocr.__dict__, max_shift_days, code_version()],
            sort_keys=True, default=str).encode()).hexdigest()[:32]

    def audit_path(self, output: str) -> Path:
        return audit_path(self.dst, output)

    def done(self, output: str, source: str) -> Outcome | None:
        """The outcome of an earlier run with the same settings and key, if its output is there."""
        try:
            rec = json.loads(self.audit_path(output).read_text())
        except (OSError, ValueError):
            return None
        if rec.get("fingerprint") != self.fingerprint or not (self.dst / output).is_file():
            return None
        return Outcome(source, output, verified=bool(rec.get("ocr_verified")), method=rec.get("pixels"), resumed=True)

    def finish(self, output: str, data: bytes | Dataset, actions: list[dict], cleaned: D.Cleaned,
               src: str) -> Outcome:
        write_atomic(self.dst / output, data)
        rec = {"output": output, "fingerprint": self.fingerprint, "pixels": cleaned.method,
               "ocr_verified": cleaned.verified, "actions": actions}
        write_atomic(self.audit_path(output), json.dumps(rec, sort_keys=True).encode())
        return Outcome(src, output, verified=cleaned.verified, method=cleaned.method)

    def name(self, path: Path) -> Outcome:
        """The output this input will have (from its header or bytes), or why it has none."""
        return self._guard(path, self._name)

    def _name(self, path: Path) -> Outcome:
        pseudo = self.deid.pseudo
        if path.suffix.lower() in S.RASTER_SUFFIXES:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            return Outcome(str(path), f"raster/{pseudo.image('raster:' + digest)}.png",
                           device=self.deid.raster_device(*raster_size(path)))
        ds = S.read_dicom(path, header_only=True)
        return Outcome(str(path), self._dicom_output(ds)[1], device=self.deid.device(ds))

    def _dicom_output(self, ds) -> tuple[str, str]:
        """(raw patient ID, output name): `<patient pseudonym>/<pseudonym of the SOP instance>.dcm`."""
        raw_patient = str(ds.get("PatientID", "") or "").strip()
        if not raw_patient:
            raise D.DeidError("missing_patient_id", "no PatientID to derive the patient's pseudonym from")
        pseudo = self.deid.pseudo
        return raw_patient, f"{pseudo.patient(raw_patient)}/{pseudo.image('dicom:' + str(ds.SOPInstanceUID))}.dcm"

    def device(self, path: Path) -> str | None:
        """What OCR counts as this file's device (from its header), None if that cannot be read."""
        try:
            if path.suffix.lower() in S.RASTER_SUFFIXES:
                return self.deid.raster_device(*raster_size(path))
            return self.deid.device(S.read_dicom(path, header_only=True))
        except (S.ScanError, OSError, ValueError):
            return None

    def run(self, path: Path, first: bool | None = None) -> Outcome:
        """De-identify one file; `first`: it is the first of its device in the corpus (OCR reads it)."""
        fn = self._raster if path.suffix.lower() in S.RASTER_SUFFIXES else self._dicom
        return self._guard(path, lambda p: fn(p, first))

    def _guard(self, path: Path, fn: Callable[[Path], Outcome]) -> Outcome:
        try:
            return fn(path)
        except S.ScanError as exc:
            return Outcome(str(path), code=exc.code, reason=str(exc))
        except OSError as exc:
            return Outcome(str(path), code="unreadable_file", reason=f"cannot be read ({exc.strerror or exc})")
        except D.OcrUnavailable:
            raise
        except Exception as exc:  # boundary: one bad file never stops the corpus; it is quarantined
            return Outcome(str(path), code="unexpected_error",
                           reason=f"de-identification failed ({type(exc).__name__}); kept for review")

    def _dicom(self, path: Path, first: bool | None) -> Outcome:
        ds = S.read_dicom(path)
        raw_patient, output = self._dicom_output(ds)
        if (earlier := self.done(output, str(path))) is not None:
            return earlier
        cleaned = self.deid.clean_dicom(ds, first)
        out, actions = self.deid.dicom(ds, raw_patient, cleaned)
        return self.finish(output, out, actions, cleaned, str(path))

    def _raster(self, path: Path, first: bool | None) -> Outcome:
        data = path.read_bytes()
        img = S.decode_raster(data)
        if img is None:
            raise D.DeidError("unreadable_image", "PNG/JPEG cannot be decoded")
        digest = hashlib.sha256(data).hexdigest()
        output = f"raster/{self.deid.pseudo.image('raster:' + digest)}.png"
        if (earlier := self.done(output, str(path))) is not None:
            return earlier
        cleaned = self.deid.clean_raster(img, digest, first)
        png, actions = self.deid.raster_png(cleaned)
        return self.finish(output, png, actions, cleaned, str(path))


Init = tuple  # (dst, key, max_shift_days, settings): what every worker process is built from
_WORKER: tuple[Init, Worker] | None = None


def worker_for(init: Init) -> Worker:
    """This process's Worker for these settings (built once per process: pool or Dask worker)."""
    global _WORKER
    if _WORKER is None or _WORKER[0] != init:
        if multiprocessing.parent_process() is not None:
            _reuse_freed_memory()
        S.configure(init[3].limits)           # the parent's params.yaml limits, in this process too
        _WORKER = (init, Worker(*init))
    return _WORKER[1]


def _reuse_freed_memory() -> None:
    """In a worker process (not the main one, which may train afterwards): glibc serves the large
    buffers of one file from memory freed by the last file, instead of fresh pages from the
    kernel (a cine's tens of MB cost a page fault per 4 KiB, about a third of its time). Memory
    stays bounded by the largest file's buffers."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 512 << 20)
    except (OSError, AttributeError):
        pass                                          # not glibc: the default allocator, a little slower


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3           # glibc's mallopt parameters


def name_step(path: Path, init: Init) -> Outcome:
    """Step: the output name of a file (headers only)."""
    return worker_for(init).name(path)


def run_step(item: tuple[Path, bool], init: Init) -> Outcome:
    """Step: de-identify one file (OCR reads it when the flag says it is its device's first)."""
    return worker_for(init).run(*item)


def device_step(path: Path, init: Init) -> str | None:
    """Step: the device a file comes from (which decides what OCR reads)."""
    return worker_for(init).device(path)


Step = Callable[[object, Init], object]      # a module-level function, so a pool or Dask can pickle it
Runner = Callable[[Init, Callable[[Callable], T]], T]   # runner(init, body): body(pmap), pmap(step, items)


def apply_batch(step: Step, items: list, init: Init) -> list:
    """One step over a batch of files in this process (what a Dask task runs)."""
    return [step(item, init) for item in items]


@dataclass(frozen=True)
class ProcessPool:
    """The default runner: a pool of `workers` processes on this machine (1: in this process).
    Another runner (flows/executors.py, on Dask) is handed in by the caller; this module never imports it."""

    workers: int = 1
    name: str = "processes"

    def __call__(self, init: Init, body: Callable[[Callable], T]) -> T:
        workers = self.workers if self.workers > 0 else (os.cpu_count() or 1)
        if workers <= 1:
            return body(lambda step, items: (step(p, init) for p in items))
        with ProcessPoolExecutor(workers) as pool:
            return body(lambda step, items: pool.map(step, items, [init] * len(items), chunksize=4))


def process(files: list[Path], pmap: Callable, progress: Callable[[int, int], None] | None = None) -> list[Outcome]:
    """Name every file (headers only), hold the second file of one SOP instance, de-identify the rest.
    Naming first means two inputs of one instance never race for one output, and the first file of
    each device in sorted order is the one OCR reads, whichever process gets it."""
    results: list[Outcome] = []
    todo, seen, devices = [], set(), set()
    for named in pmap(name_step, files):
        if named.output is None:
            results.append(named)
        elif named.output in seen:
            results.append(Outcome(named.source, code="duplicate_instance",
                                   reason="same SOP Instance UID (or raster bytes) as an earlier input, "
                                          "which was kept"))
        else:
            seen.add(named.output)
            todo.append((Path(named.source), named.device not in devices))
            devices.add(named.device)
    if progress:
        progress(len(results), len(files))
    for res in pmap(run_step, todo):
        results.append(res)
        if progress:
            progress(len(results), len(files))
    return results


def default_quarantine(dst: Path) -> Path:
    return dst.parent / f"{dst.name}-quarantine"


def deid_folder(src: Path, dst: Path, pseudo: D.Pseudonymizer, link: Path | None = None,
                progress: Callable[[int, int], None] | None = None, settings: D.Settings | None = None,
                workers: int = 1, quarantine: Path | None = None, runner: Runner | None = None) -> dict:
    """De-identify every scan under `src` into `dst`; returns the report (also DST/deid-report.json)."""
    settings = settings or D.Settings()
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source folder not found")
    for what, path, want_dir in (("destination", dst, True), ("quarantine folder", quarantine, True),
                                 ("link file", link, False)):
        if path is not None and path.exists() and path.is_dir() != want_dir:
            raise FolderError(f"{path}: the {what} is {'a file' if want_dir else 'a folder'}; "
                              f"give {'a folder' if want_dir else 'a file name'}")
    dst_r = dst.resolve()
    quarantine = quarantine or default_quarantine(dst)
    for name, path in (("link file", link), ("quarantine folder", quarantine)):
        if path is not None and (dst_r == path.resolve() or dst_r in path.resolve().parents):
            raise FolderError(f"{path}: the {name} is identified-side and must not be inside {dst}")
    if src.resolve() == dst_r or src.resolve() in dst_r.parents:
        raise FolderError(f"{dst}: the destination must not be inside the source folder {src}")
    if "clean_pixel_data" in settings.options and not D.ocr_available(settings.ocr.engine):
        raise D.OcrUnavailable(D.ocr_missing(settings.ocr.engine))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(dst / STATE / "run.lock", wait=False):
            _remove_partial(dst, quarantine)
            return _deid_folder(src, dst, pseudo, link, progress, settings, quarantine,
                                runner or ProcessPool(workers))
    except Busy as exc:
        raise FolderError(f"{dst}: another `cbh deid` is writing to this folder; "
                          "run again when it has finished") from exc


def _remove_partial(*folders: Path) -> None:
    """The temporary files of a run killed mid-write (its outputs are redone on resume). Only
    called under the destination's lock, so no live run owns them."""
    for folder in folders:
        if folder.is_dir():
            for tmp in folder.rglob(".tmp-*"):
                if tmp.is_file():
                    tmp.unlink()


def _deid_folder(src: Path, dst: Path, pseudo: D.Pseudonymizer, link: Path | None,
                 progress: Callable[[int, int], None] | None, settings: D.Settings,
                 quarantine: Path, runner: Runner) -> dict:
    files = discover(src)
    init = (dst, pseudo.key, pseudo.max_shift_days, settings)
    results = runner(init, lambda pmap: process(files, pmap, progress))
    done = [r for r in results if r.output is not None]
    held = [r for r in results if r.code is not None]
    _gather_audit(dst, {r.output for r in done if r.output})
    _write_quarantine(quarantine, held, src)
    report = {"inputs": len(files), "deidentified": len(done), "quarantined": len(held),
              "reasons": dict(sorted(Counter(r.code for r in held).items())),
              "ocr_verified": sum(r.verified for r in done),
              "resumed": sum(r.resumed for r in done),
              "pixels": dict(sorted(Counter(r.method for r in done if r.method).items())),
              **D.Deidentifier(pseudo, settings).record(),
              "workers": getattr(runner, "workers", 0) or (os.cpu_count() or 1),
              "executor": getattr(runner, "name", type(runner).__name__)}
    write_atomic(dst / REPORT, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    if link is not None:
        link.parent.mkdir(parents=True, exist_ok=True)
        with link.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["source", "output"])
            w.writerows((r.source, str(dst / r.output)) for r in done if r.output)
    return report


def _gather_audit(dst: Path, outputs: set[str]) -> None:
    lines = []
    for out in sorted(outputs):
        rec = json.loads(audit_path(dst, out).read_text())
        rec.pop("fingerprint", None)
        lines.append(json.dumps(rec, sort_keys=True))
    write_atomic(dst / AUDIT, ("\n".join(lines) + ("\n" if lines else "")).encode())


def _write_quarantine(folder: Path, held: list[Outcome], src: Path) -> None:
    """Copies of the held inputs (originals untouched) and why; identified side only."""
    if not held:
        return
    files = folder / "files"
    files.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in sorted(held, key=lambda r: r.source):
        source = Path(r.source)
        # names are cut to stay within the file system's 255 bytes (the digest keeps them apart)
        copy = files / f"{hashlib.sha256(r.source.encode()).hexdigest()[:12]}_{_short(source.name)}"
        if source.is_file() and not copy.exists():
            with atomic_target(copy) as tmp:           # a killed copy never passes for the original
                shutil.copy2(source, tmp)
        rows.append((os.path.relpath(source, src), r.code, r.reason, copy.name))
    with (folder / "quarantine.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["source", "reason_code", "reason", "copy"])
        w.writerows(rows)
