"""Notifications for the people who schedule retraining: a failed flow run, a rejected promotion.

Every event is appended to `.cbh/notifications.jsonl` in the workspace (time, event, one
sentence, a few named fields such as the run or the model version; never a patient value), and
posted as JSON to `CBH_NOTIFY_URL` when that is set (a Slack-, Teams- or Mattermost-style
incoming webhook: `{"text": ...}` plus the fields). A webhook that fails never fails the run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LOG = Path(".cbh") / "notifications.jsonl"


def notify(root: Path, event: str, text: str, **fields: Any) -> dict[str, Any]:
    record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "event": event,
              "text": text, **{k: str(v) for k, v in fields.items()}}
    path = root / LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
    url = os.environ.get("CBH_NOTIFY_URL", "").strip()
    if url:
        req = urllib.request.Request(url, json.dumps(record).encode(), {"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=5).close()
        except OSError as exc:          # the run's outcome stands; the log file still has the event
            log.warning("notification to CBH_NOTIFY_URL failed (%s); it is in %s", type(exc).__name__, path)
    return record


def on_flow_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect state hook of the retrain flow: a failed run notifies. The error's own text stays
    in the flow run's logs: it may name files of the identified side (a cohort folder), and a
    webhook leaves the hospital."""
    root = Path(str((flow_run.parameters or {}).get("workspace", "."))).resolve()
    notify(root, "flow-failed", f"{flow.name} run {flow_run.name} ended {state.name}; the reason is in the "
           "flow run's logs (Prefect UI)", flow_run_id=flow_run.id)
