"""Data-contract validation on a 10,000-image cohort: total time, and the share spent in the
row metrics (mask statistics, z-scores) versus Great Expectations and Data Docs.

Run by hand (not a test; timings on shared machines are noisy):
    .venv/bin/python benchmarks/validate_10k.py [--images 10000] [--patients 40]

A real synthetic cohort is rendered and ingested, then replicated to the requested size:
every replica gets its own image_id, pixel hash, source row and its own mask file (the mask
shifted by a few pixels, so its bytes and content hash differ and the cache cannot cheat).
The suites run twice on the same manifest: cold (no mask-statistics cache) and warm (the
cache from the cold run), each with Data Docs, as `cbh validate` does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.contract.validate import ValidateParams, validate_manifest
from pipelines.data.ingest import MANIFEST_SCHEMA, ingest_cohort
from pipelines.data.synth import synth_cohort
from pipelines.deid.core import Pseudonymizer

ROOT = Path(__file__).resolve().parents[1]
KEEP = ("image", "frame", "ga_weeks", "label", "tcd_mm", "cm_mm", "mask", "annotator", "site")


def build(tmp: Path, images: int, patients: int) -> tuple[Path, Path]:
    t0 = time.perf_counter()
    synth_cohort(tmp / "export", patients, 11, ("aurora", "boreal", "cirrus"), png_fraction=0.1)
    ws = tmp / "ws"
    res = ingest_cohort(tmp / "export", ws, "data/deid", Pseudonymizer(b"benchmark-key-0123456789"), KEEP,
                        dt.date(2026, 1, 1))
    base = pd.DataFrame(res.manifest)
    rows = []
    masks = {}
    digests: set[str] = set()
    for k in range(images):
        r = base.iloc[k % len(base)].to_dict()
        rep = k // len(base)
        r["image_id"] = f"I{k:020d}"
        r["pixel_sha256"] = hashlib.sha256(f"{r['pixel_sha256']}{rep}".encode()).hexdigest()
        r["source_row"] = k + 1
        r["deid_path"] = f"{r['deid_path']}#{rep}"          # one row per image and frame
        if isinstance(r["mask_path"], str):
            src = r["mask_path"]
            if src not in masks:
                masks[src] = cv2.imread(str(ws / src), cv2.IMREAD_UNCHANGED)
            rel = f"data/bench-masks/{k:05d}.png"
            (ws / rel).parent.mkdir(parents=True, exist_ok=True)
            # a new file with new content (the anatomy moved by whole pixels), so no cache hit
            moved = np.roll(np.roll(masks[src], rep % 13, axis=1), rep // 13, axis=0)
            cv2.imwrite(str(ws / rel), moved)
            digests.add(hashlib.sha256((ws / rel).read_bytes()).hexdigest())
            r["mask_path"] = rel
        rows.append(r)
    path = tmp / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), path)
    print(f"cohort: {len(base)} rendered images of {patients} patients replicated to {images} rows "
          f"with {sum(isinstance(r['mask_path'], str) for r in rows)} mask files of {len(digests)} distinct contents "
          f"({time.perf_counter() - t0:.0f} s to build)")
    return ws, path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--patients", type=int, default=40)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cbh-bench-validate-"))
    try:
        ws, manifest = build(tmp, a.images, a.patients)
        gx_root = tmp / "expectations"
        shutil.copytree(ROOT / "expectations", gx_root, ignore=shutil.ignore_patterns("uncommitted"))
        cache = tmp / "mask-stats.parquet"
        params = ValidateParams(min_per_class=10)
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            rep = validate_manifest(manifest, gx_root, params, workspace=ws, cache_path=cache)
            total = time.perf_counter() - t0
            s = rep.seconds
            gx = s["great_expectations"] + s["data_docs"]
            print(f"{label}: {total:.1f} s for {rep.rows_checked} rows ({rep.rows_checked / total:.0f} rows/s); "
                  f"row metrics {s['row_metrics']:.1f} s ({100 * s['row_metrics'] / total:.0f}%), "
                  f"Great Expectations {s['great_expectations']:.1f} s + Data Docs {s['data_docs']:.1f} s "
                  f"({100 * gx / total:.0f}%), quarantine {s['quarantine']:.2f} s; verdict: {rep.verdict()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
