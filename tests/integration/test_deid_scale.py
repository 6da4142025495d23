"""De-identification at scale. Scale-out by configuration only: `cbh deid --executor dask` (Prefect tasks on a Dask
LocalCluster of two worker processes, prefect-dask) writes exactly what the process pool does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_KEY

ROOT = Path(__file__).resolve().parents[2]


def _deid(src: Path, dst: Path, tmp: Path, *extra: str) -> dict:
    env = {**os.environ, "CBH_DEID_KEY": TEST_KEY, "PREFECT_HOME": str(tmp / "prefect")}
    res = subprocess.run([sys.executable, "-m", "flows.cli", "deid", str(src), str(dst), *extra], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((dst / "deid-report.json").read_text())


@pytest.mark.slow          # a Dask LocalCluster of two workers beside the pool run (about a minute): make test-full
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


INGEST = """
import json, sys
from pathlib import Path
from pipelines.deid import core as D
from tests.conftest import TEST_KEY
from pipelines.data.ingest import ingest_cohort
from flows.executors import runner_for
cohort, ws, executor, workers = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
res = ingest_cohort(cohort, ws, "data/deid", D.Pseudonymizer(b"test-key-not-a-secret", 365),
                    ("image", "frame", "ga_weeks", "label", "site"), None, None, D.Settings(),
                    runner_for(executor, workers, ""))
print(json.dumps({"manifest": res.manifest, "quarantine": res.quarantine, "ocr": res.ocr_verified}, default=str))
"""


@pytest.mark.slow          # three ingests (about a minute): make test-full
def test_ingest_is_the_same_serial_in_a_pool_and_on_dask(small_cohort, tmp_path):
    """The cohort ingested in this process, by two pool workers and on a two-worker LocalCluster."""
    outs = {}
    for executor, workers in (("processes", 1), ("processes", 2), ("dask", 2)):
        ws = tmp_path / f"{executor}{workers}"
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
        res = subprocess.run([sys.executable, "-c", INGEST, str(small_cohort), str(ws), executor, str(workers)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        files = {p.relative_to(ws): p.read_bytes() for p in (ws / "data/deid").rglob("*") if p.is_file()}
        outs[(executor, workers)] = (json.loads(res.stdout.strip().splitlines()[-1]), files)
    (serial, serial_files), *others = outs.values()
    assert serial["manifest"] and serial_files
    for result, files in others:
        assert result == serial and files == serial_files


@pytest.mark.heavy         # a 45-file corpus de-identified twice (about 90 s): make test-heavy, in .ci/run
def test_killed_mid_run_the_rerun_completes_without_duplicates(tmp_path):
    """SIGKILL to `cbh deid` and its pool while it writes; the rerun resumes: every input is
    accounted for once, no output is duplicated or partial, and the bytes equal a clean run's."""
    import signal
    import time

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from deid_throughput import build_corpus

    build_corpus(tmp_path / "corpus", 45)
    env = {**os.environ, "CBH_DEID_KEY": TEST_KEY, "PREFECT_HOME": str(tmp_path / "prefect")}
    cmd = [sys.executable, "-m", "flows.cli", "deid", str(tmp_path / "corpus"), str(tmp_path / "out"), "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    audit = tmp_path / "out" / ".cbh-deid" / "audit"
    deadline = time.monotonic() + 300
    def finished() -> int:                  # a record being written is a hidden .tmp-*.json: not done yet
        return sum(not p.name.startswith(".") for p in audit.glob("*.json"))

    while time.monotonic() < deadline and finished() < 5 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = finished()
    assert 5 <= done_before < 45, "the kill should land mid-run"
    assert not (tmp_path / "out" / "deid-report.json").exists()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rep = json.loads((tmp_path / "out" / "deid-report.json").read_text())
    templated = rep["inputs"] - rep["reasons"].get("no_pixel_template", 0)   # US1_* need the site's template
    assert rep["inputs"] == 45 and rep["deidentified"] == templated and rep["resumed"] >= done_before
    outputs = [p for p in (tmp_path / "out").rglob("*.dcm")]
    assert len(outputs) == rep["deidentified"] and not list((tmp_path / "out").rglob(".tmp-*"))
    clean = subprocess.run([*cmd[:-4], str(tmp_path / "corpus"), str(tmp_path / "clean"), "--workers", "1"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    for out in outputs:
        rel = out.relative_to(tmp_path / "out")
        assert out.read_bytes() == (tmp_path / "clean" / rel).read_bytes(), rel
