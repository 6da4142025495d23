"""The `head` stage end to end on the three real HC18 fixture frames, shrunk (32 px, 1 epoch):
import, ingest, train, evaluate, save, log, register `fetal-head`, gate, and serve the pyfunc."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil

import pandas as pd
import pytest

from flows import stages
from pipelines.config import load_params
from pipelines.data.importers import import_hc18
from tests.conftest import ROOT, TEST_KEY
from tests.integration.workspace import make_workspace, registry

TINY_HEAD = ["head.size=32", "head.max_epochs=1", "head.batch_size=2", "head.tta=false"]


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path)
    monkeypatch.chdir(ws)                                 # params.yaml's sqlite:///mlflow.db is relative
    monkeypatch.setenv("CBH_DEID_KEY", TEST_KEY)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return ws


@pytest.mark.heavy         # a head model trained and registered (about 35 s): make test-heavy, in .ci/run
def test_head_stage_trains_registers_and_gates(workspace, tmp_path) -> None:
    import mlflow
    import torch

    torch.set_num_threads(1)
    cohort = tmp_path / "hc18"
    import_hc18(ROOT / "tests" / "fixtures" / "hc18", cohort, dt.date(2025, 6, 1))
    params = load_params(workspace / "params.yaml", overrides=TINY_HEAD)
    stages.add_cohort(params, workspace, cohort)
    assert stages.ingest(params, workspace)["deidentified"] == 3
    # the data contract: head-only rows need no label, and the `heads` suite passes on real masks
    report = stages.validate(params, workspace)
    assert not report.quarantined, report.quarantined
    heads = [r for r in report.results if r.suite == "heads"]
    assert len(heads) == 5 and all(r.success for r in heads), [(r.expectation, r.column) for r in heads]

    out = stages.head(params, workspace)
    folder = workspace / params.paths.head
    assert {"head.pt", "head.json", "metrics.json", "split.json"} <= {p.name for p in folder.iterdir()}
    split = json.loads((folder / "split.json").read_text())
    assert split["seed"] == params.head.seed and sum(split["frames"].values()) == 3
    assert split["frames"]["test"] >= 1 and split["frames"]["train"] >= 1
    assert "test_dice_mean" in json.loads((folder / "metrics.json").read_text())

    client = registry(workspace)
    mv = client.get_model_version("fetal-head", out["version"])
    assert mv.tags["promotion.decision"] in ("promoted", "rejected") and mv.tags["promotion.reason"]
    assert str(client.get_model_version_by_alias("fetal-head", "challenger").version) == out["version"]
    trail = (workspace / params.paths.audit).read_text().splitlines()
    assert json.loads(trail[-1])["model"] == "fetal-head"
    assert "hc18" not in json.dumps(client.get_run(out["run_id"]).data.to_dictionary())   # no identifier logged

    # only a champion head travels inside the diagnosis model: a rejected one never does
    if mv.tags["promotion.decision"] == "rejected":
        assert stages.champion_head(params, tmp_path / "dl") == (None, None)
        client.set_registered_model_alias("fetal-head", "champion", out["version"])
    folder, version = stages.champion_head(params, tmp_path / "dl2")
    assert version == out["version"] and (folder / "head.json").is_file() and (folder / "head.pt").is_file()

    model = mlflow.pyfunc.load_model("models:/fetal-head/1")
    scan = cohort / "scans" / "010_HC.png"
    spacing = json.loads(scan.with_suffix(".json").read_text())["pixel_spacing_mm"][0]
    got = model.predict(pd.DataFrame({"image": [base64.b64encode(scan.read_bytes()).decode(), "not base64!"],
                                      "pixel_spacing_mm": [spacing, spacing]}))
    assert list(got.columns) == ["hc_mm", "head_found", "reason"] and len(got) == 2
    assert not got["head_found"].iloc[1] and got["reason"].iloc[1]


def test_head_stage_skips_without_head_annotations(workspace, small_cohort, tmp_path) -> None:
    import pandas as pd

    cohort = tmp_path / "no-heads"
    shutil.copytree(small_cohort, cohort)
    table = pd.read_csv(cohort / "annotations.csv", dtype=str, keep_default_na=False)
    table.drop(columns=["head_mask", "hc_mm"]).to_csv(cohort / "annotations.csv", index=False)
    params = load_params(workspace / "params.yaml", overrides=TINY_HEAD)
    stages.add_cohort(params, workspace, cohort)
    stages.ingest(params, workspace)
    # no head model anywhere: the crops are cut around fit_skull's skull, and the output says why
    assert stages.head(params, workspace) == {"skipped": "no head annotations", "frame": "classical"}
    out = workspace / params.paths.head
    assert sorted(p.name for p in out.iterdir()) == ["frame", "skipped.json"]
    assert json.loads((out / "frame" / "frame.json").read_text()) == {"source": "classical",
                                                                      "why": "no fetal-head champion"}
    assert stages.frame_head(params, workspace) is None


@pytest.mark.heavy         # an ingest of three real frames (about 30 s): make test-heavy, in .ci/run
def test_head_stage_names_the_cause_when_every_head_is_a_diagnosis_test_patient(workspace, tmp_path) -> None:
    """Head masks only on the diagnosis model's test patients: nothing may train the head, and
    the error says so (not a bare "too few patients")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cohort = tmp_path / "hc18"
    import_hc18(ROOT / "tests" / "fixtures" / "hc18", cohort, dt.date(2025, 6, 1))
    params = load_params(workspace / "params.yaml", overrides=TINY_HEAD)
    stages.add_cohort(params, workspace, cohort)
    stages.ingest(params, workspace)
    patients = sorted(set(pq.read_table(workspace / params.paths.manifest).column("patient_pseudo").to_pylist()))
    dataset = workspace / params.paths.dataset
    dataset.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"patient_pseudo": patients, "split": ["test"] * len(patients)}), dataset)
    with pytest.raises(stages.StageError, match=r"every patient with a head mask \(3\) is a test patient"):
        stages.head(params, workspace)
    assert not (workspace / params.paths.head / "head.pt").exists()
