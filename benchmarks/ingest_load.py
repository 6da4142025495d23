"""Ingest load: a synthetic cohort of N scans through the flow's ingest stage with 1, 2 and 4
workers (deid.workers); prints scans/s and the speed-up over one worker, in one run.

    .venv/bin/python benchmarks/ingest_load.py [--scans 2000] [--workers 1 2 4] [--executor processes]

Each run starts from an empty workspace data store (the stage rebuilds `data/deid` whole), with
the same cohort, key and settings; the manifests of all runs must be identical.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--executor", default="processes", choices=("processes", "dask"))
    a = ap.parse_args()

    from flows import stages
    from pipelines.config import load_params, replace
    from pipelines.data.synth import synth_cohort

    os.environ.setdefault("CBH_DEID_KEY", "benchmark-key-not-a-secret-0123456789")
    with tempfile.TemporaryDirectory(prefix="cbh-ingest-load-") as tmp:
        tmp = Path(tmp)
        os.environ["PREFECT_HOME"] = str(tmp / "prefect")
        t0 = time.perf_counter()
        counts = synth_cohort(tmp / "cohort", max(1, round(a.scans / 1.7)), 20250601, ("aurora", "boreal", "cirrus"))
        print(f"cohort: {counts['images']} scans of {counts['patients']} patients "
              f"(synthesised in {time.perf_counter() - t0:.0f} s); {os.cpu_count()} CPUs")
        base, digests = None, set()
        for w in a.workers:
            ws = tmp / f"ws{w}"
            params = replace(load_params(ROOT / "params.yaml"),
                             [f"deid.workers={w}", f"deid.executor={a.executor}"])
            stages.add_cohort(params, ws, tmp / "cohort")
            t0 = time.perf_counter()
            rep = stages.ingest(params, ws)
            seconds = time.perf_counter() - t0
            rate = rep["inputs"] / seconds
            base = base or rate
            digests.add(hashlib.sha256((ws / params.paths.manifest).read_bytes()).hexdigest())
            print(f"{w} worker(s): {rep['inputs']} rows ({rep['deidentified']} de-identified, "
                  f"{rep['quarantined']} held {rep['reasons'] or ''}, {rep['ocr_verified']} read by OCR) "
                  f"in {seconds:.1f} s = "
                  f"{rate:.1f} scans/s, speed-up {rate / base:.2f}")
            shutil.rmtree(ws)
        print("manifests identical across worker counts:", len(digests) == 1)


if __name__ == "__main__":
    main()
