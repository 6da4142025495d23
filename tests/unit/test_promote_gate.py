"""The promotion rule and the audit trail's hash chain (the registry side is in
tests/integration/test_flow.py)."""

import json

from pipelines.config import PromoteParams
from pipelines.registry.audit import Trail
from pipelines.registry.paired import Paired
from pipelines.registry.promote import Decision, append_record, gate, verify_trail

P = PromoteParams(min_auc=0.75, min_sensitivity=0.8, auc_margin=0.02, max_ece=0.15, require_valid_data=True,
                  model_name="m")
KEY = b"k" * 32
GOOD = {"test_auc": 0.96, "test_sensitivity": 0.9, "test_ece": 0.05}


def test_untrained_model_is_refused_even_as_first_champion():
    ok, reason = gate({"test_auc": 0.5, "test_sensitivity": 1.0}, None, P, True)
    assert not ok and "below the floor" in reason


def test_first_champion_needs_every_floor_and_valid_data():
    assert gate(GOOD, None, P, True)[0]
    ok, reason = gate({**GOOD, "test_sensitivity": 0.7}, None, P, True)
    assert not ok and "sensitivity 0.700 is below the floor" in reason
    ok, reason = gate({**GOOD, "test_ece": 0.3}, None, P, True)
    assert not ok and "calibration" in reason
    ok, reason = gate(GOOD, None, P, True, data_validation="failed")
    assert not ok and "data contract" in reason


def _paired(low: float, high: float) -> Paired:
    return Paired(images=80, unit="patients", units=40, difference=(low + high) / 2, ci_low=low, ci_high=high,
                  p_value=0.4, n_boot=500)


def test_against_a_champion_the_gate_reads_the_lower_bound_of_the_paired_difference():
    """Non-inferiority: a challenger whose point AUC is above the champion's but whose paired
    interval reaches below -margin is refused; one a little below, with a tight interval, passes."""
    champ = {"test_auc": 0.95}
    ok, reason = gate({**GOOD, "test_auc": 0.96}, champ, P, True, paired=_paired(-0.08, 0.10))
    assert not ok and "lower bound is below the non-inferiority margin -0.02" in reason and "40 patients" in reason
    ok, reason = gate({**GOOD, "test_auc": 0.94}, champ, P, True, paired=_paired(-0.015, -0.005))
    assert ok and "non-inferior" in reason
    nan = float("nan")                   # too few patients for an interval: the point AUC must match
    ok, reason = gate({**GOOD, "test_auc": 0.94}, champ, P, True, paired=_paired(nan, nan))
    assert not ok and "point estimates: no interval over patients" in reason
    assert gate({**GOOD, "test_auc": 0.95}, champ, P, True, paired=_paired(nan, nan))[0]
    by_image = Paired(images=80, unit="images", units=80, difference=0.0, ci_low=-0.01, ci_high=0.01,
                      p_value=0.9, n_boot=500)      # images as the unit: too narrow to decide on
    ok, reason = gate({**GOOD, "test_auc": 0.94}, champ, P, True, paired=by_image)
    assert not ok and "images were the only unit" in reason


def test_challenger_against_champion():
    champ = {"test_auc": 0.95}
    assert gate({**GOOD, "test_auc": 0.95}, champ, P, True)[0]
    ok, reason = gate({**GOOD, "test_auc": 0.94}, champ, P, True)              # no interval: must match
    assert not ok and "point estimates: no paired test predictions" in reason
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
