"""Flows and commands that must refuse, each in its own throwaway workspace (no shared
training run): a missing key, a cohort without annotations, a critical contract failure, a
destination inside its source. Apart from test_flow.py so that `make test` can run them beside it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.workspace import TINY_PARAMS, set_params
from tests.integration.workspace import cbh as _cbh
from tests.integration.workspace import make_workspace as _workspace


def test_missing_key_outside_the_demo(tmp_path):
    ws = _workspace(tmp_path)
    env = dict(os.environ, CBH_WORKSPACE=str(ws))
    env.pop("CBH_DEID_KEY", None)
    env.pop("CBH_DEMO", None)
    from pipelines.data.synth import synth_cohort
    synth_cohort(tmp_path / "c", 2, 1, ("aurora",))
    res = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", str(tmp_path / "c")], cwd=ws, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 3                     # something needed is missing
    assert "CBH_DEID_KEY is not set" in res.stderr and "Traceback" not in res.stderr


def test_cohort_without_annotations(tmp_path):
    ws = _workspace(tmp_path)
    (tmp_path / "empty").mkdir()
    res = _cbh(ws, "ingest", str(tmp_path / "empty"))
    assert res.returncode == 1 and "annotations.csv not found" in res.stderr
    assert res.stderr.count("\n") == 1                                  # one sentence


@pytest.mark.heavy         # the retrain flow up to its contract (about 80 s): make test-heavy, in .ci/run
def test_critical_contract_failure_stops_before_training(tmp_path):
    from pipelines.data.synth import synth_cohort

    ws = _workspace(tmp_path)
    cohort = tmp_path / "export"
    synth_cohort(cohort, 8, 3, ("aurora",))
    lines = (cohort / "annotations.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    for fields in rows:
        fields[header.index("label")] = "normal"          # a class absent: a dataset-level critical failure
    (cohort / "annotations.csv").write_text("\n".join([lines[0], *(",".join(f) for f in rows)]) + "\n")
    set_params(ws, TINY_PARAMS)
    res = _cbh(ws, "retrain", "--cohort", str(cohort))
    assert res.returncode == 1
    assert "critical failure" in res.stderr and "training stopped" in res.stderr
    assert "expect_column_distinct_values_to_contain_set" in res.stderr     # the reason, on stderr
    assert not (ws / "data" / "dataset.parquet").exists()
    assert not (ws / "data" / "model").exists()
    import json
    report = json.loads((ws / "data" / "validation.json").read_text())
    failed = [r for r in report["results"] if not r["success"]]
    assert any(r["column"] == "label" and r["severity"] == "critical" for r in failed)
    assert "NOT FIT FOR TRAINING" in (ws / "data" / "contract" / "summary.md").read_text()
    events = [json.loads(line) for line in (ws / ".cbh" / "notifications.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["flow-failed"] and events[0]["flow_run_id"]
    assert "cbh-retrain" in events[0]["text"] and "critical" not in events[0]["text"]   # the reason stays in Prefect
    out = tmp_path / "contract.json"
    val = _cbh(ws, "validate", "--json", str(out))
    assert val.returncode == 1 and "critical failure" in val.stderr
    assert "NOT FIT FOR TRAINING" in val.stdout and "expect_column_distinct_values_to_contain_set" in val.stdout
    doc = json.loads(out.read_text())
    assert doc["success"] is False and doc == report


def test_deid_into_its_own_source_is_one_sentence(tmp_path):
    ws = _workspace(tmp_path)
    (tmp_path / "src").mkdir()
    res = _cbh(ws, "deid", str(tmp_path / "src"), str(tmp_path / "src" / "out"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"cbh deid: {tmp_path / 'src' / 'out'}: the destination must not be inside the " \
                                 f"source folder {tmp_path / 'src'}"
