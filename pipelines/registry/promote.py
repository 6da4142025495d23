"""Champion/challenger promotion through a gate, with an audit trail.

The decision is recorded on the challenger's model version (tags `promotion.decision`,
`promotion.reason`), on its MLflow run (`promotion/decision-*.json`) and in the audit trail
(`pipelines/registry/audit.py`: keyed hash chain, fsync, head anchored in the registry). A
decision that moves the `champion` alias is recorded as pending before the alias moves and
confirmed after, so no champion change can go unrecorded; everything happens under the trail's
file lock so two promotions at once cannot interleave.
"""

from __future__ import annotations

import getpass
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.config import PromoteParams
from pipelines.errors import CbhError
from pipelines.locks import exclusive_lock
from pipelines.registry.audit import ABANDONED, CONFIRMED, PENDING, AuditError, Trail, decisions, now
from pipelines.registry.paired import Paired


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
    phase: str = ""             # pending | confirmed | abandoned; "" for a one-step record
    confirms: str = ""          # a confirmation's (or abandonment's) pending record id
    id: str = ""                # set when written
    prev: str = ""              # keyed hash of the previous line of the trail ("" for the first)


def aliased_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def version_metrics(client: MlflowClient, mv) -> dict[str, float]:
    return dict(client.get_run(mv.run_id).data.metrics) if mv is not None else {}


def gate(challenger: dict[str, float], champion: dict[str, float] | None, p: PromoteParams,
         same_test_set: bool, data_validation: str = "passed", paired: Paired | None = None) -> tuple[bool, str]:
    """The promotion rule; returns (passed, reason). Every challenger, the first champion too,
    must pass every floor (valid data, AUC, sensitivity, calibration). Against a champion it is
    a non-inferiority test: the lower bound of the paired AUC difference (challenger minus
    champion on the same patients, `paired`) must not fall below -auc_margin. Without such an
    interval (runs logged before predictions were, a frozen test table of another version, too
    few patients) the challenger's point AUC must at least match the champion's, and the
    reason says why."""
    auc, sens = challenger.get("test_auc", float("nan")), challenger.get("test_sensitivity", float("nan"))
    if p.require_valid_data and data_validation != "passed":
        return False, f"the training data did not pass the data contract (validation: {data_validation})"
    if not auc >= p.min_auc:
        return False, f"test AUC {auc:.3f} is below the floor {p.min_auc:.3f}"
    if not sens >= p.min_sensitivity:
        return False, f"test sensitivity {sens:.3f} is below the floor {p.min_sensitivity:.3f}"
    ece = challenger.get("test_ece", float("nan"))
    if not ece <= p.max_ece:
        return False, f"test calibration error {ece:.3f} is above the bound {p.max_ece:.3f}"
    if champion is None:
        return True, f"no champion yet; AUC {auc:.3f}, sensitivity {sens:.3f} and calibration {ece:.3f} pass " \
                     "every floor"
    if not same_test_set:
        return False, "champion was evaluated on another frozen test set; re-evaluate before comparing"
    ref = champion.get("test_auc", float("nan"))
    if paired is not None and paired.unit == "patients" and paired.ci_low == paired.ci_low:
        basis = f"AUC difference to the champion {paired.interval()} over {paired.units} patients"
        if paired.ci_low < -p.auc_margin:
            return False, f"{basis}: its lower bound is below the non-inferiority margin -{p.auc_margin}"
        return True, f"{basis}: non-inferior (margin {p.auc_margin}); sensitivity {sens:.3f}"
    # no interval over patients (runs without logged predictions, a test table of another version,
    # too few patients of a class): non-inferiority cannot be shown, so the challenger must match
    why = "no paired test predictions" if paired is None else \
        "no interval over patients" + (" (images were the only unit)" if paired.unit != "patients" else "")
    if not auc >= ref:
        return False, f"test AUC {auc:.3f} is below the champion's {ref:.3f} (point estimates: {why})"
    return True, f"test AUC {auc:.3f} vs champion {ref:.3f} (point estimates: {why}); sensitivity {sens:.3f}"


def append_record(trail: Trail, d: Decision) -> tuple[Decision, str, int]:
    """Write one record (the caller holds the trail's lock); the record as written (its `prev`
    and `id` filled), its keyed hash and its line number."""
    mac, line_no, rid = trail.append(asdict(d))
    return Decision(**{**asdict(d), "prev": trail.records()[-1]["prev"], "id": rid}), mac, line_no


def verify_trail(trail: Trail) -> list[int]:
    """Line numbers (1-based) whose keyed link to the line before is broken."""
    return trail.verify()


Reevaluate = Callable[[str], dict[str, float]]
# (champion version, challenger version, champion re-evaluated here) -> the paired difference
PairedFn = Callable[[object, object, bool], "Paired | None"]


def promote(name: str, p: PromoteParams, trail: Trail, current_test_md5: str | None = None,
            reevaluate: Reevaluate | None = None, paired: PairedFn | None = None) -> Decision:
    """Compare challenger with champion; move `champion` only if the gate passes.

    Both must have been evaluated on the same frozen test set version. If the champion was
    evaluated on another one and the challenger on the workspace's current one
    (`current_test_md5`), `reevaluate(version)` scores the champion on it first. `paired` gives
    the challenger's AUC difference to the champion on the same patients, which the gate reads.
    """
    client = MlflowClient()
    with exclusive_lock(trail.lock):
        settle(client, trail, name)
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
            rescored = False
            if not same and reevaluate is not None and chal_test and chal_test == current_test_md5:
                m_champ = reevaluate(champ.version)
                same, rescored, note = True, True, f"; champion re-evaluated on frozen test set {chal_test[:8]}"
            difference = paired(champ, chal, rescored) if paired is not None and champ is not None and same else None
            passed, reason = gate(m_chal, m_champ, p, same, chal.tags.get("data.validation", "missing"), difference)
            reason += note
        thresholds = {"min_auc": p.min_auc, "min_sensitivity": p.min_sensitivity, "auc_margin": p.auc_margin,
                      "max_ece": p.max_ece, "require_valid_data": float(p.require_valid_data)}
        return decide(client, name, chal, champ, passed, reason, m_chal, m_champ, thresholds, trail)


def decide(client: MlflowClient, name: str, chal, champ, passed: bool, reason: str, m_chal: dict[str, float],
           m_champ: dict[str, float] | None, thresholds: dict[str, float], trail: Trail) -> Decision:
    """One gate decision made visible. The caller holds the trail's lock and has settled it.
    A pass: a pending record, the `champion` alias moved, a confirmation; a rejection: one
    record. Then tags on the challenger, a copy on its run and the trail's head on the
    registered model. Every registered model's gate (diagnosis, head) ends here."""
    decision = "promoted" if passed else "rejected"
    d = Decision(now(), getpass.getuser(), "promote", decision, reason, chal.version,
                 champ.version if champ else None, chal.version if passed else (champ.version if champ else None),
                 {k: v for k, v in m_chal.items() if k.startswith("test_")}, thresholds,
                 name, {k: v for k, v in (m_champ or {}).items() if k.startswith("test_")} or None,
                 phase=PENDING if passed else "")
    d, mac, line_no = append_record(trail, d)
    if passed:
        client.set_registered_model_alias(name, "champion", chal.version)
        mac, line_no = _close(trail, d, CONFIRMED, "the champion alias moved")
    _finish(client, trail, d, mac, line_no)
    return d


def _close(trail: Trail, pending: Decision, phase: str, note: str) -> tuple[str, int]:
    """The second record of a two-step decision: it names the pending record it settles."""
    closing = Decision(now(), getpass.getuser(), pending.action, pending.decision if phase == CONFIRMED else phase,
                       note, pending.challenger, pending.previous_champion,
                       pending.champion if phase == CONFIRMED else pending.previous_champion, {}, {}, pending.model,
                       phase=phase, confirms=pending.id)
    _, mac, line_no = append_record(trail, closing)
    return mac, line_no


def _finish(client: MlflowClient, trail: Trail, d: Decision, mac: str, line_no: int) -> None:
    """What follows a recorded decision: the version's tags, the decision on the challenger's run
    (promotions), and the trail's head on the registered model."""
    name = d.model
    if d.action == "rollback":
        client.set_model_version_tag(name, d.previous_champion, "promotion.decision", "rolled-back")
        client.set_model_version_tag(name, d.previous_champion, "promotion.reason", d.reason)
    else:
        for key, value in (("promotion.decision", d.decision), ("promotion.reason", d.reason),
                           ("promotion.time", d.time), ("promotion.user", d.user)):
            client.set_model_version_tag(name, d.challenger, key, value)
        run_id = client.get_model_version(name, d.challenger).run_id
        logged = {**asdict(d), "phase": CONFIRMED if d.phase == PENDING else d.phase}   # what took effect
        client.log_text(run_id, json.dumps(logged, indent=2, sort_keys=True),
                        f"promotion/decision-{line_no:05d}.json")   # the record's line: unique per decision
    trail.anchor(client, name, mac, line_no)


def settle(client: MlflowClient, trail: Trail, model: str) -> list[str]:
    """What every writer does first, under the trail's lock: refuse a trail the registry says was
    cut or replaced (Trail.guard), then close every pending record that nothing confirmed (a
    process stopped between its record and its confirmation): confirmed if the registry's
    champion is the one it names, else abandoned. Returns one line per record settled."""
    trail.guard(client, [model])
    said = []
    for rec in decisions(trail.records()):
        if rec["status"] != PENDING:
            continue
        try:
            d = Decision(**{k: v for k, v in rec.items() if k in Decision.__dataclass_fields__})
        except TypeError:
            raise AuditError(f"{trail.path}: a pending record lacks fields ({rec.get('id', '?')}): the trail was "
                             f"edited; restore it from its backup") from None
        champ = aliased_version(client, d.model, "champion")
        if champ is not None and str(champ.version) == str(d.champion):
            mac, line_no = _close(trail, d, CONFIRMED, "confirmed when settling the trail: the champion alias "
                                  "had moved before the process that recorded it stopped")
            _finish(client, trail, d, mac, line_no)
            said.append(f"{d.model}: {d.action} to version {d.champion} (recorded {d.time}) confirmed")
        else:
            _close(trail, d, ABANDONED, f"abandoned when settling the trail: the champion alias did not move "
                                        f"(champion is {champ.version if champ else 'none'})")
            said.append(f"{d.model}: {d.action} to version {d.champion} (recorded {d.time}) did not take effect")
    return said


def history(audit: Path | Trail) -> list[dict]:
    """The trail's decisions, oldest first, each with its `status` (see audit.decisions); reading
    needs no key, checking does (`Trail.verify`)."""
    trail = audit if isinstance(audit, Trail) else Trail(Path(audit), b"")
    return decisions(trail.records())


def champion_stack(name: str, records: list[dict]) -> list[str]:
    """The model's champions as the trail has them, oldest first, the current last: a promotion
    pushes its champion, a rollback pops the one it rolled back. So each rollback steps one
    further back (a rollback's own `previous_champion` is the version it left, never a target).
    `records` are decisions (`history`): a pending or abandoned one changed nothing."""
    stack: list[str] = []
    for rec in records:
        # one trail holds every registered model's decisions: version numbers are per model
        if rec.get("model", name) != name or rec.get("status", "final") not in ("final", CONFIRMED):
            continue
        if rec["decision"] == "promoted":
            if not stack and rec.get("previous_champion") is not None:
                stack.append(str(rec["previous_champion"]))      # a trail begun under an earlier champion
            stack.append(str(rec["champion"]))
        elif rec["decision"] == "rolled-back" and stack and stack[-1] == str(rec["previous_champion"]):
            stack.pop()
    return stack


def rollback(name: str, trail: Trail) -> Decision:
    """Restore the champion that preceded the current one in the champion history: one step back
    per call. Recorded pending, then the alias moved, then confirmed."""
    client = MlflowClient()
    with exclusive_lock(trail.lock):
        settle(client, trail, name)
        champ = aliased_version(client, name, "champion")
        if champ is None:
            raise PromotionError(f"registered model {name!r} has no champion to roll back")
        stack = champion_stack(name, history(trail))
        previous = stack[-2] if len(stack) >= 2 and stack[-1] == str(champ.version) else None
        if previous is None:
            raise PromotionError(f"the audit trail records no champion before version {champ.version}")
        d = Decision(now(), getpass.getuser(), "rollback", "rolled-back",
                     f"champion {champ.version} rolled back to {previous}", None, champ.version, previous, {}, {},
                     name, phase=PENDING)
        d, _, _ = append_record(trail, d)
        client.set_registered_model_alias(name, "champion", previous)
        mac, line_no = _close(trail, d, CONFIRMED, "the champion alias moved")
        _finish(client, trail, d, mac, line_no)
        return d
