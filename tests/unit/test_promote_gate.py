"""The promotion rule itself (the registry side is in tests/integration/test_flow.py)."""

from pipelines.config import PromoteParams
from pipelines.promote import gate

P = PromoteParams(min_auc=0.75, min_sensitivity=0.8, auc_margin=0.02, model_name="m")


def test_untrained_model_is_refused_even_as_first_champion():
    ok, reason = gate({"test_auc": 0.5, "test_sensitivity": 1.0}, None, P, True)
    assert not ok and "below the floor" in reason


def test_first_champion_needs_the_auc_floor_only():
    assert gate({"test_auc": 0.9, "test_sensitivity": 0.7}, None, P, True)[0]


def test_challenger_against_champion():
    champ = {"test_auc": 0.95}
    assert gate({"test_auc": 0.94, "test_sensitivity": 0.9}, champ, P, True)[0]
    assert not gate({"test_auc": 0.92, "test_sensitivity": 0.9}, champ, P, True)[0]      # beyond margin
    assert not gate({"test_auc": 0.96, "test_sensitivity": 0.7}, champ, P, True)[0]      # sensitivity floor
    assert not gate({"test_auc": 0.96, "test_sensitivity": 0.9}, champ, P, False)[0]     # other test set
