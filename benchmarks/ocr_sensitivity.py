"""How much the OCR check catches: identifier-like text planted in cleaned frames, and how
often it flags frames that are clean.

    .venv/bin/python benchmarks/ocr_sensitivity.py [--engine ppocr|tesseract] [--patients 8] [--plants 4] [--seed 5]
    .venv/bin/python benchmarks/ocr_sensitivity.py --false-alarms 400 [--engine ppocr|tesseract]

`--engine`: the OCR engine to measure (default: params.yaml's deid.ocr_engine).

`--false-alarms N`: instead, a clean synthetic cohort of N patients of all five styles through
`cbh deid`'s code (2 processes) with every image read (`ocr_sample: 1.0`); every file
quarantined for residual text is a false alarm (the cohort carries no text inside its images).

The frames: the real ultrasound files of the throughput benchmark (one copy each) and a small
synthetic cohort of all five scanner styles, de-identified by `cbh deid`'s own code (the
project's params.yaml settings plus the LOGIQ 700 template), first frame of each output. Each
cleaned frame is read once as it is (a flag there is a false alarm: the file would be
quarantined although clean), then `--plants` times with one string planted at a random place
inside its imaged area: a date, a time, a name, an ID, an accession number or an institution,
in OpenCV's Hershey font at four heights and three grey levels. A plant counts as caught when
`pipelines.deid.ocr.residual_text`, with the project's settings, reports any word for that frame (the
production rule: it quarantines the file). Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import deid_throughput as T  # noqa: E402

from pipelines.config import load_params  # noqa: E402
from pipelines.data.synth import synth_cohort  # noqa: E402
from pipelines.data.synth_render import STYLES  # noqa: E402
from pipelines.deid import core as D  # noqa: E402
from pipelines.deid.folder import deid_folder  # noqa: E402
from pipelines.deid.ocr import ENGINES, OcrSettings, residual_text, shown_grey, version  # noqa: E402

TEXTS = ["12/03/2024", "2024-03-12", "14:32:07", "SMITH^JOHN", "Jane Doe", "ID 4829173", "MRN 00418823",
         "ACC 99812", "St Mary Hospital", "DOB 1990-04-02"]
SCALES = {0.4: "9 px", 0.5: "11 px", 0.7: "15 px", 1.0: "22 px"}       # cap height in the Hershey simplex font
LEVELS = (150, 200, 255)


def cleaned_frames(tmp: Path, patients: int) -> list[tuple[str, np.ndarray]]:
    """First frame (as OCR sees it) of every output of `cbh deid` over the real files and a
    synthetic cohort of every style."""
    src = tmp / "src"
    src.mkdir()
    for name in T.SOURCES:
        ds = pydicom.dcmread(T.source(name))
        ds.PatientID = "OCRBENCH"
        ds.save_as(src / name)
    synth_cohort(tmp / "synth", patients, 11, tuple(STYLES), png_fraction=0.0)
    for scan in (tmp / "synth" / "scans").iterdir():
        scan.rename(src / scan.name)
    params = load_params(ROOT / "params.yaml")
    base = D.Settings.from_params(params.deid)
    # cleaned and verified by Tesseract, which passes all 25: every engine is measured on the same frames
    settings = D.Settings(base.options, base.templates + D.parse_templates([T.LOGIQ]), base.ocr_sample,
                          dataclasses.replace(base.ocr, engine="tesseract"))
    rep = deid_folder(src, tmp / "out", D.Pseudonymizer(b"ocr-sensitivity", 365), settings=settings, workers=2)
    print(f"cbh deid: {rep['inputs']} inputs, {rep['deidentified']} de-identified, {rep['quarantined']} "
          f"quarantined {rep['reasons'] or ''}")
    frames = []
    for path in sorted((tmp / "out").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        arr, photometric = D.frames_for_cleaning(ds)
        # as OCR sees it: grey, 8-bit (pipelines.deid.ocr rescales 16-bit to the displayed range)
        frames.append((str(ds.get("ManufacturerModelName", "")) or "?", shown_grey(D.display(arr[0], photometric, ds))))
    # in an order that does not depend on the outputs' names (the synthetic UIDs are new every run),
    # so that the same seed plants the same strings in the same frames
    return sorted(frames, key=lambda f: hashlib.sha256(f[1].tobytes()).hexdigest())


def plant(frame: np.ndarray, text: str, scale: float, level: int, rng: random.Random) -> np.ndarray | None:
    """The frame with `text` drawn inside its imaged (non-blank) area, None if it does not fit."""
    ys, xs = np.nonzero(frame)
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    if ys.size == 0 or xs.max() - xs.min() - w < 4 or ys.max() - ys.min() - h < 4:
        return None
    x, y = rng.randint(int(xs.min()), int(xs.max()) - w), rng.randint(int(ys.min()) + h, int(ys.max()))
    out = frame.copy()
    cv2.putText(out, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, level, 1, cv2.LINE_AA)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=8, help="synthetic patients (all five styles)")
    ap.add_argument("--plants", type=int, default=4, help="planted strings per frame and height")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--false-alarms", type=int, metavar="N", help="false alarms on N clean synthetic patients")
    ap.add_argument("--engine", choices=ENGINES, help="OCR engine (default: params.yaml deid.ocr_engine)")
    a = ap.parse_args()
    settings = D.Settings.from_params(load_params(ROOT / "params.yaml").deid).ocr
    if a.engine:
        settings = dataclasses.replace(settings, engine=a.engine)
    print(f"OCR engine: {settings.engine} ({version()})")
    if a.false_alarms:
        return false_alarms(a.false_alarms, settings)
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory(prefix="cbh-ocr-sens-") as tmp:
        frames = cleaned_frames(Path(tmp), a.patients)
    t0 = time.perf_counter()
    alarms = [model for model, f in frames if residual_text([f], settings)]
    caught: dict[tuple[float, int], list[bool]] = defaultdict(list)
    for _, frame in frames:
        for scale in SCALES:
            for _ in range(a.plants):
                level = rng.choice(LEVELS)
                planted = plant(frame, rng.choice(TEXTS), scale, level, rng)
                if planted is not None:
                    caught[(scale, level)].append(bool(residual_text([planted], settings)))
    print(f"{len(frames)} cleaned frames; false alarms on clean frames: {len(alarms)} "
          f"({', '.join(sorted(set(alarms))) or 'none'}); {time.perf_counter() - t0:.0f} s of OCR")
    print("planted identifiers caught (frames flagged / planted), by text height and grey level:")
    print("height  " + "".join(f"{'level ' + str(lv):>14}" for lv in LEVELS) + f"{'all':>14}")
    for scale, height in SCALES.items():
        cells = [caught[(scale, lv)] for lv in LEVELS]
        row = [f"{sum(c)}/{len(c)}" for c in cells] + [f"{sum(map(sum, cells))}/{sum(map(len, cells))}"]
        print(f"{height:>6}  " + "".join(f"{r:>14}" for r in row))
    everything = [v for c in caught.values() for v in c]
    print(f"all: {sum(everything)}/{len(everything)} caught ({sum(everything) / max(len(everything), 1):.0%})")


def false_alarms(patients: int, ocr: OcrSettings) -> None:
    params = load_params(ROOT / "params.yaml")
    settings = dataclasses.replace(D.Settings.from_params(params.deid), ocr_sample=1.0, ocr=ocr)
    with tempfile.TemporaryDirectory(prefix="cbh-ocr-fa-") as tmp:
        tmp = Path(tmp)
        synth_cohort(tmp / "c", patients, params.synth.seed, tuple(sorted(STYLES)))
        t0 = time.perf_counter()
        rep = deid_folder(tmp / "c" / "scans", tmp / "dst", D.Pseudonymizer(b"benchmark-key-not-a-secret-0123", 365),
                          settings=settings, workers=2)
    held = rep["reasons"].get("residual_text", 0)
    print(f"{rep['inputs']} clean scans, {rep['ocr_verified']} read by OCR; false alarms (residual_text): "
          f"{held} ({held / max(rep['inputs'], 1):.2%}); all holds {rep['reasons']}; "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
