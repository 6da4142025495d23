"""The promotion rule and the audit trail's hash chain (the registry side is in
tests/integration/test_flow.py)."""

import json

from pipelines.config import PromoteParams
from pipelines.registry.audit import Trail
from pipelines.registry.promote import Decision, append_record, gate, verify_trail

P = PromoteParams(min_auc=0.75, min_sensitivity=0.8, auc_margin=0.02, max_ece=0.15, require_valid_data=True,
                  model_name="m")
KEY = b"k" * 32
GOOD = {"test_auc": 0.96, "test_sensitivity": 0.9, "test_ece": 0.05}


def test_untrained_model_is_refused_even_as_first_champion():
    ok, reason = gate({"test_auc": 0.5, "test_sensitivity": 1.0}, None, P, True)
    assert not ok and "below the floor" in reason


def test_first_champion_needs_the_auc_floor_and_valid_data():
    assert gate({"test_auc": 0.9, "test_sensitivity": 0.7}, None, P, True)[0]
    ok, reason = gate({"test_auc": 0.9, "test_sensitivity": 0.9}, None, P, True, data_validation="failed")
    assert not ok and "data contract" in reason


def test_challenger_against_champion():
    champ = {"test_auc": 0.95}
    assert gate({**GOOD, "test_auc": 0.94}, champ, P, True)[0]
    assert not gate({**GOOD, "test_auc": 0.92}, champ, P, True)[0]              # beyond the margin
    assert not gate({**GOOD, "test_sensitivity": 0.7}, champ, P, True)[0]       # sensitivity floor
    ok, reason = gate({**GOOD, "test_ece": 0.3}, champ, P, True)                 # calibration bound
    assert not ok and "calibration" in reason
    assert not gate(GOOD, champ, P, False)[0]                                     # another test set
    assert not gate(GOOD, champ, P, True, data_validation="missing")[0]


def test_audit_trail_is_hash_chained(tmp_path):
    trail = Trail(tmp_path / "promotions.jsonl", KEY)
    for i in range(3):
        append_record(trail, Decision("t", "u", "promote", "promoted", "r", str(i + 1), None, str(i + 1), {}, {}, "m"))
    assert verify_trail(trail) == []
    lines = trail.path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["decision"] = "rejected"                       # someone rewrites history
    lines[1] = json.dumps(edited, sort_keys=True)
    trail.path.write_text("\n".join(lines) + "\n")
    assert verify_trail(trail) == [3]                     # the next record no longer links
    trail.path.write_text("\n".join([lines[0], lines[2]]) + "\n")    # a record deleted
    assert verify_trail(trail) == [2]
