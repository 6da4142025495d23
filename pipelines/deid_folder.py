"""`cbh deid SRC DST`: de-identify every DICOM/PNG/JPEG under a folder.

Outputs are named by pseudonyms only; the source-to-output link goes to a separate file
(--link), never into DST. The report counts what happened and names no source path.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Callable

import cv2

from pipelines import deid as D


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def deid_folder(src: Path, dst: Path, pseudo: D.Pseudonymizer, link: Path | None,
                progress: Callable[[int, int], None] | None = None) -> dict:
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source folder not found")
    if link is not None and dst.resolve() in link.resolve().parents:
        raise ValueError(f"{link}: the link file must not be written inside {dst}")
    files = sorted(p for p in src.rglob("*") if p.is_file() and (p.suffix.lower() in D.RASTER_SUFFIXES or _is_dicom(p)))
    dst.mkdir(parents=True, exist_ok=True)
    reasons: Counter[str] = Counter()
    links: list[tuple[str, str]] = []
    for i, path in enumerate(files, start=1):
        try:
            out = _one(path, dst, pseudo)
            links.append((str(path), str(out)))
        except D.DeidError as exc:
            reasons[exc.code] += 1
        if progress:
            progress(i, len(files))
    report = {"inputs": len(files), "deidentified": len(links), "quarantined": sum(reasons.values()),
              "reasons": dict(reasons), **D.profile_record(),
              "raster_note": "PNG/JPEG re-encoded from pixels only (no metadata); no region to clean"}
    (dst / "deid-report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    if link is not None:
        link.parent.mkdir(parents=True, exist_ok=True)
        with link.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["source", "output"])
            w.writerows(links)
    return report


def _one(path: Path, dst: Path, pseudo: D.Pseudonymizer) -> Path:
    if path.suffix.lower() in D.RASTER_SUFFIXES:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise D.DeidError("unreadable_image", "image cannot be decoded")
        out = dst / "raster" / f"{pseudo.image('raster:' + hashlib.sha256(path.read_bytes()).hexdigest())}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), img)
        return out
    ds = D.read_dicom(path)
    raw_patient = str(ds.get("PatientID", "") or "").strip()
    if not raw_patient:
        raise D.DeidError("missing_patient_id", "no PatientID to derive a pseudonym from")
    clean = D.deidentify_dicom(ds, raw_patient, pseudo)
    out = dst / clean.PatientID / f"{pseudo.image('dicom:' + str(ds.SOPInstanceUID))}.dcm"
    out.parent.mkdir(parents=True, exist_ok=True)
    clean.save_as(out, enforce_file_format=True)
    return out
