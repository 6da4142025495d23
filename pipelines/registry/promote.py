"""Champion/challenger promotion through a gate, with an audit trail.

The decision is recorded on the challenger's model version (tags `promotion.decision`,
`promotion.reason`), on its MLflow run (`promotion/decision-*.json`) and appended to a
JSON-lines audit trail whose records are hash-chained (each names the SHA-256 of the line
before it), so an edited or deleted record shows. Aliases are moved under a file lock so
two promotions at once cannot interleave.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.config import PromoteParams
from pipelines.errors import CbhError
from pipelines.locks import exclusive_lock


class PromotionError(CbhError, RuntimeError):
    """Nothing to promote or roll back."""


@dataclass(frozen=True)
class Decision:
    time: str
    user: str
    action: str                 # promote | rollback
    decision: str               # promoted | rejected | rolled-back
    reason: str
    challenger: str | None
    previous_champion: str | None
    champion: str | None
    metrics: dict[str, float]
    thresholds: dict[str, float]
    model: str = ""
    champion_metrics: dict[str, float] | None = None
    prev: str = ""              # SHA-256 of the previous line of the trail ("" for the first)


def aliased_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def version_metrics(client: MlflowClient, mv) -> dict[str, float]:
    return dict(client.get_run(mv.run_id).data.metrics) if mv is not None else {}


def gate(challenger: dict[str, float], champion: dict[str, float] | None, p: PromoteParams,
         same_test_set: bool, data_validation: str = "passed") -> tuple[bool, str]:
    """The promotion rule; returns (passed, reason)."""
    auc, sens = challenger.get("test_auc", float("nan")), challenger.get("test_sensitivity", float("nan"))
    if p.require_valid_data and data_validation != "passed":
        return False, f"the training data did not pass the data contract (validation: {data_validation})"
    if not auc >= p.min_auc:
        return False, f"test AUC {auc:.3f} is below the floor {p.min_auc:.3f}"
    if champion is None:
        # the first champion: discrimination must pass its floor (an untrained model does not);
        # the operating point's sensitivity is reported, and gated from the next promotion on
        return True, f"no champion yet; AUC {auc:.3f} passes the floor (sensitivity {sens:.3f})"
    if not sens >= p.min_sensitivity:
        return False, f"test sensitivity {sens:.3f} is below the floor {p.min_sensitivity:.3f}"
    ece = challenger.get("test_ece", float("nan"))
    if not ece <= p.max_ece:
        return False, f"test calibration error {ece:.3f} is above the bound {p.max_ece:.3f}"
    if not same_test_set:
        return False, "champion was evaluated on another frozen test set; re-evaluate before comparing"
    ref = champion.get("test_auc", float("nan"))
    if auc < ref - p.auc_margin:
        return False, f"test AUC {auc:.3f} is more than {p.auc_margin} below the champion's {ref:.3f}"
    return True, f"test AUC {auc:.3f} vs champion {ref:.3f} (margin {p.auc_margin}); sensitivity {sens:.3f}"


def _last_line_hash(audit: Path) -> str:
    if not audit.is_file():
        return ""
    lines = [ln for ln in audit.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return hashlib.sha256(lines[-1].encode()).hexdigest() if lines else ""


def append_record(audit: Path, d: Decision) -> Decision:
    audit.parent.mkdir(parents=True, exist_ok=True)
    d = Decision(**{**asdict(d), "prev": _last_line_hash(audit)})
    with audit.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(asdict(d), sort_keys=True) + "\n")
    return d


def verify_trail(audit: Path) -> list[int]:
    """Line numbers (1-based) whose hash link to the line before is broken."""
    if not audit.is_file():
        return []
    lines = [ln for ln in audit.read_text(encoding="utf-8").splitlines() if ln.strip()]
    broken, prev = [], ""
    for i, line in enumerate(lines, 1):
        try:
            ok = json.loads(line).get("prev", "") == prev
        except json.JSONDecodeError:
            ok = False
        if not ok:
            broken.append(i)
        prev = hashlib.sha256(line.encode()).hexdigest()
    return broken


Reevaluate = Callable[[str], dict[str, float]]


def promote(name: str, p: PromoteParams, audit: Path, current_test_md5: str | None = None,
            reevaluate: Reevaluate | None = None) -> Decision:
    """Compare challenger with champion; move `champion` only if the gate passes.

    Both must have been evaluated on the same frozen test set version. If the champion was
    evaluated on another one and the challenger on the workspace's current one
    (`current_test_md5`), `reevaluate(version)` scores the champion on it first.
    """
    client = MlflowClient()
    with exclusive_lock(audit.with_suffix(".lock")):
        chal = aliased_version(client, name, "challenger")
        if chal is None:
            raise PromotionError(f"registered model {name!r} has no 'challenger' version: run cbh train first")
        champ = aliased_version(client, name, "champion")
        m_chal = version_metrics(client, chal)
        m_champ = version_metrics(client, champ) if champ else None
        note = ""
        if champ is not None and champ.version == chal.version:
            passed, reason = False, "challenger is already the champion"
        else:
            chal_test = chal.tags.get("data.frozen_test_md5")
            same = champ is None or chal_test == champ.tags.get("data.frozen_test_md5")
            if not same and reevaluate is not None and chal_test and chal_test == current_test_md5:
                m_champ = reevaluate(champ.version)
                same, note = True, f"; champion re-evaluated on frozen test set {chal_test[:8]}"
            passed, reason = gate(m_chal, m_champ, p, same, chal.tags.get("data.validation", "missing"))
            reason += note
        thresholds = {"min_auc": p.min_auc, "min_sensitivity": p.min_sensitivity, "auc_margin": p.auc_margin,
                      "max_ece": p.max_ece, "require_valid_data": float(p.require_valid_data)}
        return decide(client, name, chal, champ, passed, reason, m_chal, m_champ, thresholds, audit)


def decide(client: MlflowClient, name: str, chal, champ, passed: bool, reason: str, m_chal: dict[str, float],
           m_champ: dict[str, float] | None, thresholds: dict[str, float], audit: Path) -> Decision:
    """One gate decision made visible: tags on the challenger, the `champion` alias moved if it
    passed, a record in the audit trail and a copy on the challenger's run. The caller holds
    the trail's lock. Every registered model's gate (diagnosis, head) ends here."""
    decision = "promoted" if passed else "rejected"
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    user = getpass.getuser()
    for key, value in (("promotion.decision", decision), ("promotion.reason", reason),
                       ("promotion.time", now), ("promotion.user", user)):
        client.set_model_version_tag(name, chal.version, key, value)
    if passed:
        client.set_registered_model_alias(name, "champion", chal.version)
    d = Decision(now, user, "promote", decision, reason, chal.version, champ.version if champ else None,
                 chal.version if passed else (champ.version if champ else None),
                 {k: v for k, v in m_chal.items() if k.startswith("test_")}, thresholds,
                 name, {k: v for k, v in (m_champ or {}).items() if k.startswith("test_")} or None)
    d = append_record(audit, d)
    seq = len(history(audit))                 # the record's line in the trail: unique per decision
    client.log_text(chal.run_id, json.dumps(asdict(d), indent=2, sort_keys=True),
                    f"promotion/decision-{seq:05d}.json")
    return d


def history(audit: Path) -> list[dict]:
    if not audit.is_file():
        return []
    return [json.loads(line) for line in audit.read_text(encoding="utf-8").splitlines() if line.strip()]


def champion_stack(name: str, records: list[dict]) -> list[str]:
    """The model's champions as the trail has them, oldest first, the current last: a promotion
    pushes its champion, a rollback pops the one it rolled back. So each rollback steps one
    further back (a rollback's own `previous_champion` is the version it left, never a target)."""
    stack: list[str] = []
    for rec in records:
        # one trail holds every registered model's decisions: version numbers are per model
        if rec.get("model", name) != name:
            continue
        if rec["decision"] == "promoted":
            if not stack and rec.get("previous_champion") is not None:
                stack.append(str(rec["previous_champion"]))      # a trail begun under an earlier champion
            stack.append(str(rec["champion"]))
        elif rec["decision"] == "rolled-back" and stack and stack[-1] == str(rec["previous_champion"]):
            stack.pop()
    return stack


def rollback(name: str, audit: Path) -> Decision:
    """Restore the champion that preceded the current one in the champion history: one step back
    per call."""
    client = MlflowClient()
    with exclusive_lock(audit.with_suffix(".lock")):
        champ = aliased_version(client, name, "champion")
        if champ is None:
            raise PromotionError(f"registered model {name!r} has no champion to roll back")
        stack = champion_stack(name, history(audit))
        previous = stack[-2] if len(stack) >= 2 and stack[-1] == str(champ.version) else None
        if previous is None:
            raise PromotionError(f"the audit trail records no champion before version {champ.version}")
        client.set_registered_model_alias(name, "champion", previous)
        d = Decision(dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), getpass.getuser(),
                     "rollback", "rolled-back", f"champion {champ.version} rolled back to {previous}",
                     None, champ.version, previous, {}, {}, name)
        d = append_record(audit, d)
        client.set_model_version_tag(name, champ.version, "promotion.decision", "rolled-back")
        client.set_model_version_tag(name, champ.version, "promotion.reason", d.reason)
        return d
