"""The gate against a real MLflow registry (a throwaway SQLite store): tags on the
challenger, the audit trail, and re-scoring a champion evaluated on another test set."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow import MlflowClient

from pipelines.config import PromoteParams
from pipelines.registry.promote import history, promote, verify_trail

P = PromoteParams(min_auc=0.75, min_sensitivity=0.8, auc_margin=0.02, max_ece=0.15, require_valid_data=True,
                  model_name="m")


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("gate", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("gate")
    client = MlflowClient()
    client.create_registered_model("m")

    def version(metrics: dict[str, float], test_md5: str, validation: str = "passed") -> str:
        with mlflow.start_run() as run:
            mlflow.log_metrics(metrics)
            mlflow.log_text("weights", "model/weights.txt")
        mv = client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id,
                                         tags={"data.frozen_test_md5": test_md5, "data.validation": validation})
        client.set_registered_model_alias("m", "challenger", mv.version)
        return mv.version

    yield client, version
    mlflow.set_tracking_uri("")


def test_champion_on_another_test_set_is_rescored(registry, tmp_path):
    client, version = registry
    audit = tmp_path / "audit.jsonl"
    good = {"test_auc": 0.90, "test_sensitivity": 0.9, "test_ece": 0.05}
    v1 = version({**good, "test_auc": 0.97}, "old-test-set")
    assert promote("m", P, audit).decision == "promoted"
    v2 = version(good, "new-test-set")

    refused = promote("m", P, audit)                       # nobody can re-score the champion: refuse
    assert refused.decision == "rejected" and "another frozen test set" in refused.reason

    scored = []
    rescored = promote("m", P, audit, current_test_md5="new-test-set",
                       reevaluate=lambda v: scored.append(v) or {"test_auc": 0.86})
    assert scored == [v1]
    assert rescored.decision == "promoted" and "re-evaluated" in rescored.reason
    assert rescored.champion_metrics == {"test_auc": 0.86}
    assert client.get_model_version_by_alias("m", "champion").version == v2
    tags = client.get_model_version("m", v2).tags
    assert tags["promotion.decision"] == "promoted" and "re-evaluated" in tags["promotion.reason"]
    assert [r["decision"] for r in history(audit)] == ["promoted", "rejected", "promoted"]
    assert verify_trail(audit) == []
    logged = client.list_artifacts(client.get_model_version("m", v2).run_id, "promotion")
    assert len(logged) == 2                                 # both decisions about v2, on its run
    record = json.loads(mlflow.artifacts.load_text(
        f"runs:/{client.get_model_version('m', v2).run_id}/{logged[-1].path}"))
    assert record["thresholds"]["max_ece"] == 0.15


def test_data_that_failed_the_contract_is_never_promoted(registry, tmp_path):
    client, version = registry
    version({"test_auc": 0.99, "test_sensitivity": 1.0, "test_ece": 0.01}, "t", validation="failed")
    d = promote("m", P, tmp_path / "audit.jsonl")
    assert d.decision == "rejected" and "data contract" in d.reason
    from mlflow.exceptions import MlflowException
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("m", "champion")


def test_rollback_steps_back_through_the_champion_history(registry, tmp_path):
    """Each rollback goes one champion further back; it never flips back to the version it just
    left, and past the first champion it refuses."""
    from pipelines.registry.promote import PromotionError, rollback

    client, version = registry
    audit = tmp_path / "audit" / "promotions.jsonl"
    for auc in (0.95, 0.96, 0.97):                           # champions 1, 2, 3
        version({"test_auc": auc, "test_sensitivity": 0.9, "test_ece": 0.05}, "t1")
        promote("m", P, audit)
    assert str(client.get_model_version_by_alias("m", "champion").version) == "3"
    assert str(rollback("m", audit).champion) == "2"
    assert str(rollback("m", audit).champion) == "1"
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    with pytest.raises(PromotionError, match="no champion before version 1"):
        rollback("m", audit)
    # a new promotion after the rollbacks: rolling it back returns to 1, not to 3
    version({"test_auc": 0.98, "test_sensitivity": 0.9, "test_ece": 0.05}, "t1")
    promote("m", P, audit)
    assert str(rollback("m", audit).champion) == "1"


def test_rollback_reads_only_its_own_models_records(registry, tmp_path):
    """One trail holds every model's decisions; version numbers are per model, so a head-model
    record naming the same version must not choose the diagnosis model's previous champion."""
    from pipelines.registry.promote import Decision, append_record, rollback

    client, version = registry
    audit = tmp_path / "audit" / "promotions.jsonl"
    good = {"test_auc": 0.95, "test_sensitivity": 0.9, "test_ece": 0.05}
    version(good, "t1")
    promote("m", P, audit)                                   # m: champion 1
    version({**good, "test_auc": 0.96}, "t1")
    promote("m", P, audit)                                   # m: champion 2, previous 1
    champion = client.get_model_version_by_alias("m", "champion").version   # as decide() records versions
    append_record(audit, Decision("t", "u", "promote", "promoted", "head", champion, 7, champion, {}, {}, "fetal-head"))
    d = rollback("m", audit)
    assert str(d.champion) == "1" and str(client.get_model_version_by_alias("m", "champion").version) == "1"
