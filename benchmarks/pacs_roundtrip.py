"""Results back to PACS on the demo's frozen test set: `cbh predict --dicom-out`'s SEG and SR for
every exam, read back with highdicom and compared with what the model predicted.

    .venv/bin/python benchmarks/pacs_roundtrip.py            # in a workspace where `make demo` ran

Prints the exams, how many got a SEG and an SR, how many SEGs hold exactly the best frame's
predicted labels (on the source grid) and how many SRs hold exactly the exam row's TCD, CM, HC,
centiles, GA, probability and decision, and the seconds per exam spent writing them. Exit 1 on
any mismatch. The test set is de-identified: the check also counts objects with any date other
than their source's shifted study date.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.config import load_params  # noqa: E402
from pipelines.imaging.preprocess import frame_labels  # noqa: E402
from pipelines.registry import tracking  # noqa: E402
from pipelines.serving.dicom_out import read_back  # noqa: E402
from pipelines.serving.predict import exam_rows, load_model, predict_items, write_dicom_results  # noqa: E402

CODES = (("11863-8", "tcd_mm"), ("125012:11863-8", "tcd_centile"), ("11860-4", "cm_mm"),
         ("125012:11860-4", "cm_centile"), ("11984-2", "hc_mm"), ("125012:11984-2", "hc_centile"),
         ("18185-9", "ga_weeks"), ("122157", "hypoplasia_probability"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", type=Path, default=Path.cwd())
    ap.add_argument("--out", type=Path, help="where to write the objects (default: a temporary folder)")
    a = ap.parse_args()
    ws = a.workspace.resolve()
    params = load_params(ws / "params.yaml")
    os.chdir(ws)                      # the workspace's relative MLflow store, as `cbh` sees it
    tracking.setup(params.paths.mlflow_uri, ws / params.paths.mlflow_artifacts)
    test = set(pq.read_table(ws / "data/frozen_test.parquet").column("image_id").to_pylist())
    data = [r for r in pq.read_table(ws / "data/dataset.parquet").to_pylist() if r["image_id"] in test]
    # a PNG has no DICOM study to return to (and its spacing lives in the manifest, not a sidecar)
    png = [r for r in data if r["source_format"] != "dicom"]
    data = [r for r in data if r["source_format"] == "dicom"]
    items = [(ws / r["deid_path"], r["image_id"], int(r["frame"] or 0), float(r["ga_weeks"]), None) for r in data]
    model = load_model(f"models:/{params.promote.model_name}@champion")
    rows, errors = predict_items(items, model, None, assess=True)
    exams = exam_rows(items, rows, float(model.predictor.cfg.threshold), model.model_uri)
    out = a.out or Path(tempfile.mkdtemp(prefix="cbh-pacs-"))
    t0 = time.perf_counter()
    written, notes = write_dicom_results(exams, items, rows, out, model.model_uri)
    seconds = time.perf_counter() - t0
    seg_equal = sr_equal = foreign_dates = 0
    for exam in exams:
        folder = out / exam["exam"]
        if not (folder / "sr.dcm").exists():
            continue
        k = exam["_best"]
        seg = folder / "seg.dcm"
        labels, values, finding = read_back(seg if seg.exists() else None, folder / "sr.dcm")
        want, _ = frame_labels(rows[k]["_labels"], rows[k]["_crop"], rows[k]["_shape"])
        seg_equal += labels is not None and np.array_equal(labels, want)
        expected = {code: float(exam[col]) for code, col in CODES if math.isfinite(float(exam[col]))}
        sr_equal += (set(values) == set(expected) and all(math.isclose(values[c], v, rel_tol=1e-9, abs_tol=1e-12)
                                                          for c, v in expected.items())
                     and finding == exam["prediction"])
        source = pydicom.dcmread(items[k][0], stop_before_pixels=True)
        allowed = {str(source.StudyDate), str(source.StudyDate) + str(source.get("StudyTime", ""))}
        for f in (seg, folder / "sr.dcm"):
            if f.exists():
                obj = pydicom.dcmread(f)
                foreign_dates += any(str(e.value) not in allowed for e in obj.iterall() if e.VR in ("DA", "DT")
                                     and e.value)
    print(f"demo frozen test set: {len(items)} DICOM images ({len(png)} PNG left out), {errors} unreadable, "
          f"{len(exams)} exams")
    print(f"exams with SEG and SR: {written}; without: {len(exams) - written} "
          f"({sum('no assessable frame' in n for n in notes)} not assessable, "
          f"{sum('PNG/JPEG' in n for n in notes)} PNG/JPEG)")
    print(f"SEG equal to the predicted labels: {seg_equal} of {written}")
    print(f"SR equal to the exam row (measurements, centiles, GA, probability, finding): {sr_equal} of {written}")
    print(f"objects with a date other than the source's shifted study date: {foreign_dates}")
    print(f"writing: {seconds / max(written, 1):.2f} s per exam (SEG + SR), into {out}")
    return 0 if seg_equal == sr_equal == written and not foreign_dates else 1


if __name__ == "__main__":
    raise SystemExit(main())
