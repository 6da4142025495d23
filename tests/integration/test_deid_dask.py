"""Scale-out by configuration only: `cbh deid --executor dask` (Prefect tasks on a Dask
LocalCluster of two worker processes, prefect-dask) writes exactly what the process pool does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import deid as D

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not D.ocr_available(), reason="tesseract missing: run `make ocr`")


def _deid(src: Path, dst: Path, tmp: Path, *extra: str) -> dict:
    env = {**os.environ, "CBH_DEID_KEY": "test-key-not-a-secret", "PREFECT_HOME": str(tmp / "prefect")}
    res = subprocess.run([sys.executable, "-m", "flows.cli", "deid", str(src), str(dst), *extra], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((dst / "deid-report.json").read_text())


def test_dask_executor_gives_the_same_outputs(small_cohort, tmp_path):
    pool = _deid(small_cohort / "scans", tmp_path / "pool", tmp_path, "--workers", "2")
    dask = _deid(small_cohort / "scans", tmp_path / "dask", tmp_path, "--executor", "dask", "--workers", "2")
    assert pool["executor"] == "processes" and dask["executor"] == "dask"
    same = ("inputs", "deidentified", "quarantined", "reasons", "ocr_verified", "pixels")  # OCR choice too
    assert {k: pool[k] for k in same} == {k: dask[k] for k in same}
    files = sorted(p.relative_to(tmp_path / "pool") for p in (tmp_path / "pool").rglob("*")
                   if p.is_file() and p.name != "deid-report.json")
    assert files and files == sorted(p.relative_to(tmp_path / "dask") for p in (tmp_path / "dask").rglob("*")
                                     if p.is_file() and p.name != "deid-report.json")
    for rel in files:
        assert (tmp_path / "pool" / rel).read_bytes() == (tmp_path / "dask" / rel).read_bytes(), rel
