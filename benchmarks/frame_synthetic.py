"""The anatomical frame on synthetic scans: the learned head localiser against `fit_skull`,
both against the generator's true head (the skull's outer ellipse), on a cohort of patients
the localiser never saw.

    .venv/bin/python benchmarks/frame_synthetic.py --head data/head/frame \\
        [--patients 40] [--seed 99] [--styles aurora boreal cirrus]

Prints, for each method: frames framed, centre error (mm), long and short semi-axis errors
(relative), angle error (degrees, modulo 180), HC error (mm), and ms per frame.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.data.synth import synth_cohort  # noqa: E402
from pipelines.imaging.head import HeadLocaliser, ellipse_from_mask, hc_mm  # noqa: E402
from pipelines.imaging.preprocess import PreprocessError, Skull, fit_skull  # noqa: E402
from pipelines.imaging.scan import read_scan  # noqa: E402


def errors(s: Skull, ref: Skull) -> tuple[float, float, float, float, float]:
    d_ang = abs(math.degrees(s.angle - ref.angle)) % 180.0
    return (math.hypot(s.cx - ref.cx, s.cy - ref.cy), s.a / ref.a - 1.0, s.b / ref.b - 1.0,
            min(d_ang, 180.0 - d_ang), hc_mm(s.a, s.b) - hc_mm(ref.a, ref.b))


def summary(label: str, errs: list, n: int, seconds: float) -> str:
    if not errs:
        return f"{label:<22} framed 0/{n}"
    e = np.asarray(errs)
    a = np.abs(e)
    p90 = np.percentile(a[:, 0], 90)
    return (f"{label:<22} framed {len(e):>3}/{n:<3}  centre {a[:, 0].mean():5.2f} mm (p90 {p90:5.2f})"
            f"  a {a[:, 1].mean() * 100:4.1f} %  b {a[:, 2].mean() * 100:4.1f} %  angle {a[:, 3].mean():4.1f} deg"
            f"  HC {a[:, 4].mean():5.2f} mm (bias {e[:, 4].mean():+5.2f})  {seconds * 1000 / max(n, 1):5.0f} ms/frame")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head", type=Path, required=True, help="a HeadLocaliser folder (head.pt + head.json)")
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--seed", type=int, default=99)
    ap.add_argument("--styles", nargs="+", default=["aurora", "boreal", "cirrus"])
    args = ap.parse_args()
    loc = HeadLocaliser.load(args.head)
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(tmp)
        synth_cohort(cohort, args.patients, args.seed, tuple(args.styles))
        import csv

        rows = list(csv.DictReader((cohort / "annotations.csv").open()))
        frames = []
        for r in rows:
            scan = read_scan(cohort / r["image"])
            head = cv2.imread(str(cohort / r["head_mask"]), cv2.IMREAD_UNCHANGED).astype(np.float32)
            ref = ellipse_from_mask(head, scan.spacing)
            frames.append((scan.frames[0], scan.valid, scan.spacing, ref.skull))
    n = len(frames)
    print(f"{n} frames of {args.patients} synthetic patients (seed {args.seed}, styles {' '.join(args.styles)})")
    start = time.perf_counter()
    fits = loc.locate_batch([f[0] for f in frames], [f[2] for f in frames])
    learned_s = time.perf_counter() - start
    learned = [errors(fit.skull, f[3]) for fit, f in zip(fits, frames, strict=True) if fit.found]
    start, classical = time.perf_counter(), []
    for grey, valid, spacing, ref in frames:
        try:
            classical.append(errors(fit_skull(grey, valid, spacing), ref))
        except PreprocessError:
            pass
    classical_s = time.perf_counter() - start
    print(summary("learned head", learned, n, learned_s))
    print(summary("fit_skull (classical)", classical, n, classical_s))


if __name__ == "__main__":
    main()
