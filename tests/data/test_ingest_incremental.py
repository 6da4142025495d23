"""Ingest is incremental and crash-safe: a scan is de-identified once for its bytes, patient,
settings and key; the store is never deleted to be rebuilt; the manifest is the commit."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from flows import stages
from pipelines.config import load_params
from pipelines.data.ingest import read_annotations
from pipelines.data.synth import synth_cohort
from tests.conftest import TEST_KEY
from tests.integration.workspace import _cbh_env, make_workspace


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path)
    monkeypatch.setenv("CBH_DEID_KEY", TEST_KEY)
    return ws


def _files(ws):
    """Every file of the de-identified store: (inode, mtime, sha256) by path."""
    store = ws / "data" / "deid"
    return {str(p.relative_to(ws)): (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in store.rglob("*") if p.is_file()}


def _scans(cohort):
    return len({r["image"] for r in read_annotations(cohort)})


def _manifest_files(ws):
    table = pq.read_table(ws / "data" / "manifest.parquet").to_pylist()
    return {r[c] for r in table for c in ("deid_path", "mask_path", "head_mask_path") if r[c]}


def test_a_second_cohort_is_the_only_one_deidentified(workspace, small_cohort, tmp_path):
    params = load_params(workspace / "params.yaml")
    stages.add_cohort(params, workspace, small_cohort)
    first = stages.ingest(params, workspace)
    n1 = _scans(small_cohort)
    assert first["scans"] == {"deidentified": n1, "reused": 0, "files_removed": 0}
    before = _files(workspace)

    other = tmp_path / "site-b"
    synth_cohort(other, 4, 77, ("boreal",), png_fraction=0.3)
    stages.add_cohort(params, workspace, other)
    second = stages.ingest(params, workspace)
    assert second["scans"]["deidentified"] == _scans(other)           # only the new cohort's files
    assert second["scans"]["reused"] == n1
    after = _files(workspace)
    # the first cohort's files were not touched: same inode, time and bytes (the audit is rewritten)
    assert {k: v for k, v in after.items() if k in before and not k.endswith("deid-audit.jsonl")} == \
        {k: v for k, v in before.items() if not k.endswith("deid-audit.jsonl")}
    assert second["deidentified"] == first["deidentified"] + len(read_annotations(other)) - \
        (second["quarantined"] - first["quarantined"])
    assert set(after) == _manifest_files(workspace) | {"data/deid/deid-audit.jsonl"}   # nothing unused left

    manifest = (workspace / "data" / "manifest.parquet").read_bytes()
    third = stages.ingest(params, workspace)                          # nothing new: nothing done
    assert third["scans"]["deidentified"] == 0 and third["scans"]["reused"] == n1 + _scans(other)
    assert (workspace / "data" / "manifest.parquet").read_bytes() == manifest


def test_a_reexport_with_a_changed_scan_redoes_that_scan_alone(workspace, cohort_copy):
    import pydicom

    params = load_params(workspace / "params.yaml")
    stages.add_cohort(params, workspace, cohort_copy)
    stages.ingest(params, workspace)
    old = pq.read_table(workspace / "data" / "manifest.parquet").to_pylist()

    rows = read_annotations(cohort_copy)
    row = next(r for r in rows if r["image"].endswith(".dcm"))
    ds = pydicom.dcmread(cohort_copy / row["image"])
    arr = ds.pixel_array.copy()
    arr[arr.shape[0] // 2, arr.shape[1] // 2] ^= 1                    # one pixel of the scan corrected
    ds.PixelData = arr.tobytes()
    ds.save_as(cohort_copy / row["image"])
    stages.add_cohort(params, workspace, cohort_copy)                  # the same annotations: replaced
    assert len([p for p in (workspace / "data" / "incoming").iterdir()]) == 1
    out = stages.ingest(params, workspace)
    assert out["scans"]["deidentified"] == 1 and out["scans"]["reused"] == _scans(cohort_copy) - 1
    new = pq.read_table(workspace / "data" / "manifest.parquet").to_pylist()
    changed = [(a["deid_path"], b["deid_path"]) for a, b in zip(old, new, strict=True) if a != b]
    assert len(changed) == 1 and changed[0][0] != changed[0][1]        # a new file, under a new name
    assert not (workspace / changed[0][0]).exists() and (workspace / changed[0][1]).is_file()
    assert [a["image_id"] for a in old] == [b["image_id"] for b in new]

    # a replacement cut short between its two renames: the copy goes back, its rows stay
    (copy,) = (workspace / "data" / "incoming").iterdir()
    copy.rename(copy.with_name(copy.name + ".replaced"))
    again = stages.ingest(params, workspace)
    assert again["scans"]["deidentified"] == 0 and copy.is_dir()
    assert pq.read_table(workspace / "data" / "manifest.parquet").to_pylist() == new


@pytest.mark.heavy         # three ingests of one cohort (about 25 s): make test-heavy, in .ci/run
def test_new_settings_or_a_new_key_redo_every_scan(workspace, small_cohort, monkeypatch):
    from tests.integration.workspace import set_params

    params = load_params(workspace / "params.yaml")
    stages.add_cohort(params, workspace, small_cohort)
    stages.ingest(params, workspace)
    set_params(workspace, {"deid.ocr_vocabulary": ["aurora"]})      # a steward's allowed on-screen word
    out = stages.ingest(load_params(workspace / "params.yaml"), workspace)
    assert out["scans"]["reused"] == 0 and out["scans"]["deidentified"] == _scans(small_cohort)
    monkeypatch.setenv("CBH_DEID_KEY", TEST_KEY[::-1])
    out = stages.ingest(load_params(workspace / "params.yaml"), workspace)
    assert out["scans"]["reused"] == 0
    # the files of the old key are gone once the manifest of the new one is written
    assert set(_files(workspace)) == _manifest_files(workspace) | {"data/deid/deid-audit.jsonl"}


@pytest.mark.heavy         # an ingest killed and run again (about 45 s): make test-heavy, in .ci/run
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_mid_ingest_leaves_the_previous_manifest_valid_and_the_rerun_resumes(workspace, small_cohort,
                                                                                   tmp_path):
    params = load_params(workspace / "params.yaml")
    stages.add_cohort(params, workspace, small_cohort)
    stages.ingest(params, workspace)
    manifest = workspace / "data" / "manifest.parquet"
    committed = manifest.read_bytes()
    referenced = {k: v[2] for k, v in _files(workspace).items() if k in _manifest_files(workspace)}

    big = tmp_path / "site-c"
    synth_cohort(big, 30, 91, ("aurora", "cirrus"), png_fraction=0.1)
    cache = workspace / params.paths.ingest_cache
    done_before = len(list(cache.glob("*/*.json")))
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ingest", str(big)], cwd=workspace,
                            env=_cbh_env(workspace, None), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list(cache.glob("*/*.json"))) < done_before + 3:       # a few of the new scans are done
        assert proc.poll() is None and time.monotonic() < deadline, "ingest ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)                               # the command and its workers
    assert proc.wait(timeout=30) == -signal.SIGKILL

    assert manifest.read_bytes() == committed                          # the previous commit, whole
    table = pq.read_table(manifest).to_pylist()                        # and readable
    assert table and all((workspace / r["deid_path"]).is_file() for r in table)
    now = _files(workspace)
    assert {k: now[k][2] for k in referenced} == referenced            # every file it names, unchanged

    out = stages.ingest(params, workspace)                             # the rerun resumes
    total = _scans(small_cohort) + _scans(big)
    assert out["scans"]["reused"] >= _scans(small_cohort) + 3 and out["scans"]["deidentified"] < _scans(big)
    assert out["scans"]["reused"] + out["scans"]["deidentified"] == total
    assert not [p for p in (workspace / "data" / "deid").rglob(".tmp-*")]   # a killed write left nothing
    assert set(_files(workspace)) == _manifest_files(workspace) | {"data/deid/deid-audit.jsonl"}
    shutil.rmtree(big)


def test_an_added_sidecar_releases_its_png(workspace, cohort_copy):
    """A PNG's pixel spacing is in its sidecar: the cache knows the pair, so a PNG held for a
    missing sidecar is de-identified once the re-export brings it."""
    params = load_params(workspace / "params.yaml")
    row = next(r for r in read_annotations(cohort_copy) if r["image"].endswith(".png"))
    sidecar = (cohort_copy / row["image"]).with_suffix(".json")
    kept = sidecar.read_bytes()
    sidecar.unlink()
    stages.add_cohort(params, workspace, cohort_copy)
    first = stages.ingest(params, workspace)
    assert first["reasons"].get("no_pixel_spacing") == 1
    sidecar.write_bytes(kept)
    stages.add_cohort(params, workspace, cohort_copy)
    again = stages.ingest(params, workspace)
    assert "no_pixel_spacing" not in again["reasons"] and again["scans"]["deidentified"] == 1
    assert again["deidentified"] == first["deidentified"] + 1
