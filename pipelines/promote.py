"""Champion/challenger promotion through a gate, with an audit trail.

The decision is recorded on the challenger's model version (tags `promotion.decision`,
`promotion.reason`) and appended to a JSON-lines audit trail. Aliases are moved under a
file lock so two promotions at once cannot interleave.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.config import PromoteParams


class PromotionError(RuntimeError):
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


def _version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _metrics(client: MlflowClient, mv) -> dict[str, float]:
    return dict(client.get_run(mv.run_id).data.metrics) if mv is not None else {}


def gate(challenger: dict[str, float], champion: dict[str, float] | None, p: PromoteParams,
         same_test_set: bool) -> tuple[bool, str]:
    """The promotion rule; returns (passed, reason)."""
    auc, sens = challenger.get("test_auc", float("nan")), challenger.get("test_sensitivity", float("nan"))
    if not auc >= p.min_auc:
        return False, f"test AUC {auc:.3f} is below the floor {p.min_auc:.3f}"
    if champion is None:
        # the first champion: discrimination must pass its floor (an untrained model does not);
        # the operating point's sensitivity is reported, and gated from the next promotion on
        return True, f"no champion yet; AUC {auc:.3f} passes the floor (sensitivity {sens:.3f})"
    if not sens >= p.min_sensitivity:
        return False, f"test sensitivity {sens:.3f} is below the floor {p.min_sensitivity:.3f}"
    if not same_test_set:
        return False, "champion was evaluated on another frozen test set; re-evaluate before comparing"
    ref = champion.get("test_auc", float("nan"))
    if auc < ref - p.auc_margin:
        return False, f"test AUC {auc:.3f} is more than {p.auc_margin} below the champion's {ref:.3f}"
    return True, f"test AUC {auc:.3f} vs champion {ref:.3f} (margin {p.auc_margin}); sensitivity {sens:.3f}"


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _record(audit: Path, d: Decision) -> None:
    audit.parent.mkdir(parents=True, exist_ok=True)
    with audit.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(asdict(d), sort_keys=True) + "\n")


def promote(name: str, p: PromoteParams, audit: Path) -> Decision:
    """Compare challenger with champion; move `champion` only if the gate passes."""
    client = MlflowClient()
    with _locked(audit.with_suffix(".lock")):
        chal = _version(client, name, "challenger")
        if chal is None:
            raise PromotionError(f"registered model {name!r} has no 'challenger' version: run cbh train first")
        champ = _version(client, name, "champion")
        m_chal = _metrics(client, chal)
        if champ is not None and champ.version == chal.version:
            passed, reason = False, "challenger is already the champion"
        else:
            same = champ is None or (chal.tags.get("data.frozen_test_md5") == champ.tags.get("data.frozen_test_md5"))
            passed, reason = gate(m_chal, _metrics(client, champ) if champ else None, p, same)
        decision = "promoted" if passed else "rejected"
        client.set_model_version_tag(name, chal.version, "promotion.decision", decision)
        client.set_model_version_tag(name, chal.version, "promotion.reason", reason)
        if passed:
            client.set_registered_model_alias(name, "champion", chal.version)
        d = Decision(dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), getpass.getuser(),
                     "promote", decision, reason, chal.version, champ.version if champ else None,
                     chal.version if passed else (champ.version if champ else None),
                     {k: v for k, v in m_chal.items() if k.startswith("test_")},
                     {"min_auc": p.min_auc, "min_sensitivity": p.min_sensitivity, "auc_margin": p.auc_margin})
        _record(audit, d)
        return d


def history(audit: Path) -> list[dict]:
    if not audit.is_file():
        return []
    return [json.loads(line) for line in audit.read_text(encoding="utf-8").splitlines() if line.strip()]


def rollback(name: str, audit: Path) -> Decision:
    """Restore the champion that preceded the current one, as recorded in the trail."""
    client = MlflowClient()
    with _locked(audit.with_suffix(".lock")):
        champ = _version(client, name, "champion")
        if champ is None:
            raise PromotionError(f"registered model {name!r} has no champion to roll back")
        previous = None
        for rec in reversed(history(audit)):
            if rec["decision"] in ("promoted", "rolled-back") and rec["champion"] == champ.version:
                previous = rec["previous_champion"]
                break
        if previous is None:
            raise PromotionError(f"the audit trail records no champion before version {champ.version}")
        client.set_registered_model_alias(name, "champion", previous)
        d = Decision(dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), getpass.getuser(),
                     "rollback", "rolled-back", f"champion {champ.version} rolled back to {previous}",
                     None, champ.version, previous, {}, {})
        _record(audit, d)
        return d
