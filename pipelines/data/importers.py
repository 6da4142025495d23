"""`cbh import FORMAT SRC COHORT`: annotations from other tools into the cohort format of
CONTRACT.md section 1, so they go through de-identification, the data contract and DVC like any
hospital export.

`hc18`: the HC18 challenge layout (van den Heuvel et al., PLoS ONE 2018; CC BY 4.0): PNG images
`NNN_HC.png`, the expert's head outline drawn as a thin ellipse in `NNN_HC_Annotation.png`, and a
CSV with each image's pixel size and head circumference. Each outline becomes a filled head mask
(0/1); the pixel size becomes the image's SCAN.json. HC18 carries no gestational age and no
date: GA is estimated from the expert's HC on the INTERGROWTH-21st median, extrapolated below
14 weeks (column `ga_source` says which) and the exam date is the one given (`--exam-date`), the same for every image.
Nothing is silently dropped: an image without outline, size or readable pixels is listed with
its reason in `COHORT/import-report.json`.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from pipelines import biometry
from pipelines.errors import CbhError

FORMATS = ("hc18",)
HC18_COLUMNS = ("image", "frame", "patient_id", "exam_date", "ga_weeks", "ga_source", "hc_mm", "head_mask",
                "annotator", "site")
MIN_OUTLINE_POINTS = 20        # fewer drawn pixels than this is not an outline
# HC18 holds first-trimester heads (HC from about 45 mm): below the standard's 14 weeks the median's
# equation is extrapolated, and the row says so (ga_source: hc_median_extrapolated)
GA_ESTIMATE_RANGE = (10.0, 42.0)


class ImportFormatError(CbhError):
    """The source folder cannot be imported as a whole (no table, unknown columns, cohort exists)."""


@dataclass(frozen=True)
class Outline:
    """A head outline's ellipse in pixels: centre, semi-axes (a >= b) and angle of a (radians)."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float

    def perimeter_px(self) -> float:
        return biometry.ellipse_perimeter(self.a, self.b)

    def filled(self, shape: tuple[int, int]) -> NDArray[np.uint8]:
        """The head: the ellipse and everything inside it, 1 on 0."""
        mask = np.zeros(shape, np.uint8)
        cv2.ellipse(mask, ((self.cx, self.cy), (2 * self.a, 2 * self.b), math.degrees(self.angle)), 1, -1,
                    lineType=cv2.LINE_8)
        return mask


def fit_outline(drawn: NDArray) -> Outline | None:
    """The ellipse of a drawn head: a thin outline or a filled ellipse (any non-zero pixel), or None
    when there is none. The ellipse is fitted to the outer border of the largest drawn shape, so
    both forms give the same head."""
    ink = ((drawn if drawn.ndim == 2 else drawn.max(axis=2)) > 0).astype(np.uint8)
    contours, _ = cv2.findContours(ink, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    border = max(contours, key=cv2.contourArea)
    if len(border) < MIN_OUTLINE_POINTS:
        return None
    (cx, cy), (w, h), ang = cv2.fitEllipse(border.reshape(-1, 2).astype(np.float32))
    a, b = max(w, h) / 2.0, min(w, h) / 2.0
    angle = math.radians(ang if w >= h else ang + 90.0)
    return Outline(float(cx), float(cy), float(a), float(b), angle)


def _table(src: Path) -> Path:
    tables = sorted(p for p in src.rglob("*.csv") if "pixel" in p.name.lower())
    if not tables:
        raise ImportFormatError(f"{src}: no HC18 table (a CSV named like pixel_size_and_hc.csv) found")
    return tables[0]


def _column(header: list[str], *words: str) -> str:
    for name in header:
        if all(w in name.lower() for w in words):
            return name
    raise ImportFormatError(f"HC18 table: no column with {' '.join(words)!r} among {header}")


def import_hc18(src: Path, cohort: Path, exam_date: dt.date) -> dict:
    """Write `cohort` from an HC18 folder; returns the import report (also COHORT/import-report.json)."""
    if not src.is_dir():
        raise ImportFormatError(f"{src}: source folder not found")
    if (cohort / "annotations.csv").exists():
        raise ImportFormatError(f"{cohort}: already holds a cohort (annotations.csv); choose a new folder")
    table = _table(src)
    with table.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    header = list(rows[0]) if rows else []
    c_file, c_px, c_hc = _column(header, "filename"), _column(header, "pixel"), _column(header, "circumference") \
        if any("circumference" in h.lower() for h in header) else _column(header, "hc")
    files = {p.name: p for p in src.rglob("*.png")}
    (cohort / "scans").mkdir(parents=True, exist_ok=True)
    (cohort / "masks").mkdir(parents=True, exist_ok=True)
    out, skipped = [], []
    for n, row in enumerate(rows, 1):
        name = (row.get(c_file) or "").strip()
        reason, record = _one(name, row, c_px, c_hc, files, cohort, exam_date)
        if reason:
            skipped.append({"row": n, "image": name, "reason": reason})
        else:
            out.append(record)
    with (cohort / "annotations.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=HC18_COLUMNS)
        w.writeheader()
        w.writerows(out)
    report = {"format": "hc18", "table": table.name, "rows": len(rows), "imported": len(out),
              "skipped": skipped, "exam_date": exam_date.isoformat(),
              "ga_source": "estimated from the expert's HC on the INTERGROWTH-21st median",
              "licence": "HC18: CC BY 4.0, van den Heuvel et al., PLoS ONE 13(8): e0200412, 2018"}
    (cohort / "import-report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _one(name: str, row: dict, c_px: str, c_hc: str, files: dict[str, Path], cohort: Path,
         exam_date: dt.date) -> tuple[str | None, dict]:
    """One table row: (reason it was skipped, None) or (None, its annotations.csv row)."""
    image = files.get(name)
    outline_file = files.get(name.replace(".png", "_Annotation.png"))
    try:
        spacing, hc = float(row[c_px]), float(row[c_hc])
    except (TypeError, ValueError):
        return f"pixel size {row.get(c_px)!r} or HC {row.get(c_hc)!r} is not a number", {}
    if image is None or outline_file is None:
        return "image or its _Annotation.png outline not found", {}
    if not spacing > 0 or not hc > 0:
        return f"pixel size {spacing} or HC {hc} is not positive", {}
    pixels = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
    drawn = cv2.imread(str(outline_file), cv2.IMREAD_UNCHANGED)
    if pixels is None or drawn is None:
        return "image or outline cannot be decoded", {}
    if drawn.shape[:2] != pixels.shape[:2]:
        return f"outline {drawn.shape[:2]} and image {pixels.shape[:2]} differ in size", {}
    outline = fit_outline(drawn)
    if outline is None:
        return "the outline holds no ellipse", {}
    # the drawing gives the head's shape and place; its size comes from the expert's HC (the drawn
    # border runs about a pixel outside the ellipse the HC was computed from: +0.8 mm on average)
    k = hc / (outline.perimeter_px() * spacing)
    if not 0.9 < k < 1.1:
        return f"the outline's circumference ({outline.perimeter_px() * spacing:.1f} mm) disagrees with the " \
               f"table's HC ({hc:.1f} mm) by more than 10%", {}
    outline = Outline(outline.cx, outline.cy, outline.a * k, outline.b * k, outline.angle)
    stem = Path(name).stem
    shutil.copyfile(image, cohort / "scans" / name)
    (cohort / "scans" / f"{stem}.json").write_text(json.dumps({"pixel_spacing_mm": [spacing, spacing]}) + "\n")
    cv2.imwrite(str(cohort / "masks" / f"{stem}_head.png"), outline.filled(pixels.shape[:2]))
    subject = re.match(r"\d+", stem)
    ga = float(biometry.ga_from_hc(hc, GA_ESTIMATE_RANGE))
    inside = biometry.HC_GA_RANGE[0] <= ga <= biometry.HC_GA_RANGE[1]
    return None, {"image": f"scans/{name}", "frame": 0, "patient_id": f"hc18-{subject.group(0) if subject else stem}",
                  "exam_date": exam_date.isoformat(), "ga_weeks": "" if math.isnan(ga) else round(ga, 2),
                  "ga_source": "hc_median" if inside else "hc_median_extrapolated", "hc_mm": hc,
                  "head_mask": f"masks/{stem}_head.png",
                  "annotator": "hc18-expert", "site": "hc18"}
