"""The gate against a real MLflow registry (a throwaway SQLite store): tags on the
challenger, the audit trail, and re-scoring a champion evaluated on another test set."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow import MlflowClient

from pipelines.config import PromoteParams
from pipelines.registry.audit import Trail
from pipelines.registry.promote import history, promote, verify_trail

P = PromoteParams(min_auc=0.75, min_sensitivity=0.8, auc_margin=0.02, max_ece=0.15, require_valid_data=True,
                  model_name="m")
KEY = b"0123456789abcdef" * 2


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
    audit = Trail(tmp_path / "audit.jsonl", KEY)
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
    d = promote("m", P, Trail(tmp_path / "audit.jsonl", KEY))
    assert d.decision == "rejected" and "data contract" in d.reason
    from mlflow.exceptions import MlflowException
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("m", "champion")


def test_rollback_steps_back_through_the_champion_history(registry, tmp_path):
    """Each rollback goes one champion further back; it never flips back to the version it just
    left, and past the first champion it refuses."""
    from pipelines.registry.promote import PromotionError, rollback

    client, version = registry
    audit = Trail(tmp_path / "audit" / "promotions.jsonl", KEY)
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
    audit = Trail(tmp_path / "audit" / "promotions.jsonl", KEY)
    good = {"test_auc": 0.95, "test_sensitivity": 0.9, "test_ece": 0.05}
    version(good, "t1")
    promote("m", P, audit)                                   # m: champion 1
    version({**good, "test_auc": 0.96}, "t1")
    promote("m", P, audit)                                   # m: champion 2, previous 1
    champion = client.get_model_version_by_alias("m", "champion").version   # as decide() records versions
    append_record(audit, Decision("t", "u", "promote", "promoted", "head", champion, 7, champion, {}, {}, "fetal-head"))
    d = rollback("m", audit)
    assert str(d.champion) == "1" and str(client.get_model_version_by_alias("m", "champion").version) == "1"


KILLED_PROMOTION = """
import os, signal, sys
from pathlib import Path
from mlflow import MlflowClient
from pipelines.config import PromoteParams
from pipelines.registry.audit import Trail
from pipelines.registry.promote import promote

move = MlflowClient.set_registered_model_alias
def killed(self, name, alias, version):
    if sys.argv[2] == "after":
        move(self, name, alias, version)
    os.kill(os.getpid(), signal.SIGKILL)          # no cleanup, no finally: as a power cut would
MlflowClient.set_registered_model_alias = killed
promote("m", PromoteParams(min_auc=0.75, min_sensitivity=0.8, auc_margin=0.02, max_ece=0.15,
                           require_valid_data=True, model_name="m"), Trail(Path(sys.argv[1]), sys.argv[3].encode()))
"""


@pytest.mark.parametrize("when", ["after", "before"])
def test_a_promotion_killed_around_the_alias_move_is_never_lost(registry, tmp_path, when):
    """SIGKILL right after (or right before) the champion alias moves: the trail names the change
    as pending, and the next writer settles it against the registry: confirmed if the alias
    moved, abandoned if not. A rollback then steps back from the champion the registry holds."""
    import os
    import subprocess
    import sys

    from pipelines.registry.promote import rollback

    client, version = registry
    trail = Trail(tmp_path / "audit" / "promotions.jsonl", KEY)
    good = {"test_auc": 0.95, "test_sensitivity": 0.9, "test_ece": 0.05}
    version(good, "t1")
    promote("m", P, trail)                                   # champion 1
    v2 = str(version({**good, "test_auc": 0.96}, "t1"))
    run = subprocess.run([sys.executable, "-c", KILLED_PROMOTION, str(trail.path), when, KEY.decode()],
                         env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    champion = str(client.get_model_version_by_alias("m", "champion").version)
    assert champion == (v2 if when == "after" else "1")
    last = history(trail)[-1]
    assert last["status"] == "pending" and str(last["champion"]) == v2 and last["decision"] == "promoted"
    assert verify_trail(trail) == []

    if when == "after":
        d = rollback("m", trail)                             # settles first: v2 was champion, so back to 1
        assert str(d.champion) == "1"
        assert [r["status"] for r in history(trail)] == ["confirmed"] * 3
        assert client.get_model_version("m", v2).tags["promotion.decision"] == "rolled-back"
    else:
        d = promote("m", P, trail)                           # settles (abandoned), then gates v2 again
        assert d.decision == "promoted" and str(client.get_model_version_by_alias("m", "champion").version) == v2
        assert [r["status"] for r in history(trail)] == ["confirmed", "abandoned", "confirmed"]
    assert verify_trail(trail) == []


def test_a_torn_last_line_is_removed_and_said(registry, tmp_path):
    """A write cut short leaves half a record; the next decision removes it, records that it did,
    and the chain stays whole (the old trail let it swallow the next record)."""
    client, version = registry
    trail = Trail(tmp_path / "audit.jsonl", KEY)
    good = {"test_auc": 0.95, "test_sensitivity": 0.9, "test_ece": 0.05}
    version(good, "t1")
    promote("m", P, trail)
    with trail.path.open("a") as fh:
        fh.write('{"action": "promote", "decision": "torn-')
    version({**good, "test_auc": 0.96}, "t1")
    assert promote("m", P, trail).decision == "promoted"
    recs = history(trail)
    assert [r["action"] for r in recs] == ["promote", "repair", "promote"]
    assert "torn last line (40 bytes" in recs[1]["reason"]
    import base64

    assert base64.b64decode(recs[1]["fragment"]) == b'{"action": "promote", "decision": "torn-'   # kept, not lost
    assert verify_trail(trail) == [] and "torn-" not in trail.path.read_text()


def test_an_edit_rechained_without_the_key_is_found(registry, tmp_path):
    """The chain is keyed: an edited record re-chained under another key breaks the chain; a trail
    downgraded to the unkeyed format (its `chain` fields dropped, re-linked with plain SHA-256)
    links, but no longer holds the head the registry anchored, and no writer appends to it."""
    import hashlib
    import hmac
    import json

    from pipelines.registry.audit import AuditError

    client, version = registry
    trail = Trail(tmp_path / "audit.jsonl", KEY)
    for auc in (0.95, 0.96, 0.97):
        version({"test_auc": auc, "test_sensitivity": 0.9, "test_ece": 0.05}, "t1")
        promote("m", P, trail)
    original = trail.path.read_text()

    def rewrite(link, keep_chain: bool) -> None:
        lines = original.splitlines()
        for i, line in enumerate(lines):
            rec = json.loads(line)
            if i == 0:
                rec["reason"] = "nothing to see"
            if not keep_chain:
                rec.pop("chain", None)
            rec["prev"] = link(lines[i - 1]) if i else ""
            lines[i] = json.dumps(rec, sort_keys=True)
        trail.path.write_text("\n".join(lines) + "\n")

    other = b"another key of thirty-two chars!"
    rewrite(lambda line: hmac.new(other, line.encode(), hashlib.sha256).hexdigest(), keep_chain=True)
    assert verify_trail(trail) != [] and verify_trail(Trail(trail.path, other)) == []
    rewrite(lambda line: hashlib.sha256(line.encode()).hexdigest(), keep_chain=False)
    assert verify_trail(trail) == []                         # an unkeyed chain links by itself...
    problems = trail.check_registry(client, ["m"])
    assert len(problems) == 1 and "another trail" in problems[0]      # ...but is not the anchored one
    version({"test_auc": 0.98, "test_sensitivity": 0.9, "test_ece": 0.05}, "t1")
    with pytest.raises(AuditError, match="Restore the trail"):
        promote("m", P, trail)


def test_a_deleted_last_record_fails_promote_history(registry, tmp_path, monkeypatch, capsys):
    """The registry keeps the trail's head: `cbh promote --history` passes on the whole trail and
    fails once its last record is gone (a chain check alone cannot see a cut tail)."""
    import shutil
    from pathlib import Path

    from flows import cli

    client, version = registry
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", ws / "params.yaml")
    monkeypatch.setenv("CBH_WORKSPACE", str(ws))
    monkeypatch.setenv("CBH_AUDIT_KEY", KEY.decode())
    trail = Trail(ws / "data" / "audit" / "promotions.jsonl", KEY)
    for auc in (0.95, 0.96):
        version({"test_auc": auc, "test_sensitivity": 0.9, "test_ece": 0.05}, "t1")
        promote("m", P, trail)
    assert cli.main(["promote", "--history"]) == 0
    assert "hash chain intact" in capsys.readouterr().out
    lines = trail.path.read_text().splitlines()
    trail.path.write_text("\n".join(lines[:-1]) + "\n")      # the last record deleted
    assert verify_trail(trail) == []                         # the chain alone still links
    assert cli.main(["promote", "--history"]) == 1
    assert "removed from its end" in capsys.readouterr().err
    from pipelines.registry.audit import AuditError

    version({"test_auc": 0.97, "test_sensitivity": 0.9, "test_ece": 0.05}, "t1")
    with pytest.raises(AuditError, match="removed from its end"):
        promote("m", P, trail)                               # never re-anchored on the cut trail


def test_every_record_reaches_the_disk(tmp_path, monkeypatch):
    """Each append is fsynced (and the new file's folder), before anything else happens."""
    import os

    from pipelines.registry.promote import Decision, append_record

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    trail = Trail(tmp_path / "a" / "trail.jsonl", KEY)
    append_record(trail, Decision("t", "u", "promote", "rejected", "r", "1", None, None, {}, {}, "m"))
    assert len(synced) == 2                                   # the file, then its new folder
    append_record(trail, Decision("t", "u", "promote", "rejected", "r", "2", None, None, {}, {}, "m"))
    assert len(synced) == 3


def test_a_deleted_trail_is_a_problem_not_a_note(registry, tmp_path):
    client, version = registry
    trail = Trail(tmp_path / "audit.jsonl", KEY)
    version({"test_auc": 0.95, "test_sensitivity": 0.9, "test_ece": 0.05}, "t1")
    promote("m", P, trail)
    assert trail.check_registry(client, ["m"]) == []
    trail.path.unlink()
    problems = trail.check_registry(client, ["m"])
    assert len(problems) == 1 and "empty or missing" in problems[0]


def test_a_trail_whose_key_is_missing_is_refused_and_reading_creates_none(tmp_path, monkeypatch):
    from pipelines.registry.audit import AuditError
    from pipelines.registry.promote import Decision, append_record

    monkeypatch.delenv("CBH_AUDIT_KEY", raising=False)
    key = tmp_path / ".cbh" / "audit.key"
    assert Trail.open(tmp_path / "trail.jsonl", key, create=False).key == b"" and not key.exists()
    trail = Trail.open(tmp_path / "trail.jsonl", key)
    assert key.exists() and oct(key.stat().st_mode & 0o777) == "0o600"
    append_record(trail, Decision("t", "u", "promote", "rejected", "r", "1", None, None, {}, {}, "m"))
    key.unlink()                                             # the key lost; the trail kept
    with pytest.raises(AuditError, match="holds 1 records but its key is missing"):
        Trail.open(tmp_path / "trail.jsonl", key)
    assert not key.exists()


def test_the_gate_pairs_the_logged_test_predictions_over_the_frozen_test_patients(registry, tmp_path):
    """Each run's logged test predictions, joined on the frozen test table's patients: a
    challenger as good as the champion is non-inferior over 20 patients; a worse one is refused
    on the lower bound of the difference, not on its point AUC alone."""
    import numpy as np
    import pandas as pd

    from pipelines.registry.lineage import md5_file
    from pipelines.registry.paired import paired_runs

    client, version = registry
    rng = np.random.default_rng(3)
    images = [f"I{k:03d}" for k in range(40)]
    frozen = tmp_path / "frozen_test.parquet"
    pd.DataFrame({"image_id": images, "patient_pseudo": [f"P{k // 2:02d}" for k in range(40)]}).to_parquet(frozen)
    md5 = md5_file(frozen)
    actual = np.array(["hypoplasia" if (k // 2) % 2 else "normal" for k in range(40)])

    def run_with(prob: np.ndarray, metrics: dict[str, float]) -> str:
        v = version(metrics, md5)
        run_id = client.get_model_version("m", v).run_id
        table = pd.DataFrame({"image_id": images, "actual": actual, "predicted": "normal", "probability": prob})
        client.log_text(run_id, table.to_csv(index=False), "evaluation/test_predictions.csv")
        return v

    good = {"test_auc": 0.95, "test_sensitivity": 0.9, "test_ece": 0.05}
    sick = actual == "hypoplasia"
    base = np.where(sick, 0.7, 0.3) + rng.normal(0, 0.2, 40)
    audit = Trail(tmp_path / "audit.jsonl", KEY)
    pairs = []

    def pair(champ, chal, rescored):
        pairs.append(rescored)
        return paired_runs(champ.run_id, chal.run_id, frozen, md5, 300, 7)

    run_with(base, good)
    assert promote("m", P, audit, paired=pair).decision == "promoted" and pairs == []     # no champion to pair
    run_with(base + rng.normal(0, 0.001, 40), good)
    same = promote("m", P, audit, paired=pair)
    assert same.decision == "promoted" and "non-inferior" in same.reason and "20 patients" in same.reason
    worse = run_with(np.where(sick, 0.5, 0.45) + rng.normal(0, 0.2, 40), {**good, "test_auc": 0.97})
    refused = promote("m", P, audit, paired=pair)
    assert refused.decision == "rejected" and "non-inferiority margin" in refused.reason, refused.reason
    assert client.get_model_version("m", worse).tags["promotion.decision"] == "rejected"
