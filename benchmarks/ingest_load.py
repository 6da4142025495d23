"""Ingest load: a synthetic cohort of N scans through the flow's ingest stage with 1, 2 and 4
workers (deid.workers); prints scans/s and the speed-up over one worker, in one run.

    .venv/bin/python benchmarks/ingest_load.py [--scans 2000] [--workers 1 2 4] [--executor processes]
    .venv/bin/python benchmarks/ingest_load.py --incremental [--scans 600]

Each run starts from an empty workspace data store, with the same cohort, key and settings; the
manifests of all runs must be identical. `--incremental` measures what adding a second cohort
(a tenth of the first) costs once the first is in the store, against ingesting both into an
empty store (what every ingest cost when the store was rebuilt whole), and checks that both
ways give the same manifest.
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
    ap.add_argument("--incremental", action="store_true", help="the cost of adding a cohort to a store")
    a = ap.parse_args()
    if a.incremental:
        return incremental(a.scans)

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


def incremental(scans: int) -> None:
    from flows import stages
    from pipelines.config import load_params
    from pipelines.data.synth import synth_cohort

    os.environ.setdefault("CBH_DEID_KEY", "benchmark-key-not-a-secret-0123456789")
    params = load_params(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory(prefix="cbh-ingest-incremental-") as tmp:
        tmp = Path(tmp)
        os.environ["PREFECT_HOME"] = str(tmp / "prefect")
        first = synth_cohort(tmp / "first", max(1, round(scans / 1.7)), 20250601, ("aurora", "boreal", "cirrus"))
        second = synth_cohort(tmp / "second", max(1, round(scans / 17)), 20250602, ("aurora", "boreal", "cirrus"))
        print(f"cohorts: {first['images']} + {second['images']} scans; {os.cpu_count()} CPUs, "
              f"deid.workers={params.deid.workers}")

        def timed(ws: Path) -> tuple[float, dict]:
            t0 = time.perf_counter()
            rep = stages.ingest(params, ws)
            return time.perf_counter() - t0, rep

        ws = tmp / "store"
        stages.add_cohort(params, ws, tmp / "first")
        seconds, rep = timed(ws)
        print(f"first cohort into an empty store: {seconds:.1f} s ({rep['scans']})")
        stages.add_cohort(params, ws, tmp / "second")
        added, rep = timed(ws)
        print(f"second cohort added: {added:.1f} s ({rep['scans']})")
        fresh = tmp / "fresh"
        for name in ("first", "second"):
            stages.add_cohort(params, fresh, tmp / name)
        whole, rep_whole = timed(fresh)
        print(f"both cohorts into an empty store (the baseline): {whole:.1f} s ({rep_whole['scans']})")
        print(f"adding the second cohort costs {added / whole:.2f}x the baseline ({whole / added:.1f}x faster)")
        same = (ws / params.paths.manifest).read_bytes() == (fresh / params.paths.manifest).read_bytes()
        print("manifest of the incremental store identical to the baseline's:", same)


if __name__ == "__main__":
    main()
