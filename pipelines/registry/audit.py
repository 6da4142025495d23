"""The promotion audit trail: JSON lines on disk, each record chained to the one before it by a
keyed hash (HMAC-SHA256 under the trail's own secret, not the pseudonymisation key), written
with fsync, and anchored in the registry.

A decision that moves an alias is written twice: a `pending` record before the alias moves and a
`confirmed` record after, so a process killed in between leaves a record naming the change; the
next writer settles it against the registry (confirmed if the alias did move, `abandoned` if it
did not). After each decision the registered model carries the keyed hash of the trail's last
line (`audit.head`), so a trail whose last records were deleted no longer holds that hash and
`cbh promote --history` says so. Without the key nobody can re-chain an edited file: the key
comes from CBH_AUDIT_KEY, else from the workspace's key file (mode 600, created on first use).

A torn last line (a write cut short) never carried a decision (the alias moves only after its
record is on disk): the next append removes it and records that it did, with the fragment's
digest and length.
"""

from __future__ import annotations

import base64
import datetime as dt
import getpass
import hashlib
import hmac
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pipelines.deid.core import load_key
from pipelines.errors import CbhError

log = logging.getLogger("cbh")

KEY_ENV = "CBH_AUDIT_KEY"
CHAIN = "hmac-sha256"
HEAD_TAG, LENGTH_TAG, TRAIL_TAG = "audit.head", "audit.records", "audit.trail"
PENDING, CONFIRMED, ABANDONED = "pending", "confirmed", "abandoned"
MAX_FRAGMENT = 65536          # a torn record is one record: more than this was never one


class AuditError(CbhError, RuntimeError):
    """The trail cannot be written or does not verify."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Trail:
    """One audit trail file and the key its chain is computed with."""

    path: Path
    key: bytes

    @classmethod
    def open(cls, path: Path, key_file: Path | None, create: bool = True) -> Trail:
        """The workspace's trail: key from CBH_AUDIT_KEY, else `key_file`. A key is created (mode
        600) only for a trail with no records yet and only when `create` (a writer): a trail whose
        key went missing is refused, never continued under a new one."""
        path = Path(path)
        has_key = bool(os.environ.get(KEY_ENV, "").strip()) or (key_file is not None and key_file.exists())
        if not has_key:
            records = len(cls(path, b"").lines())
            if records:
                raise AuditError(f"{path} holds {records} records but its key is missing: set {KEY_ENV} or "
                                 f"restore {key_file} (a new key could not verify them)")
            if not create:
                return cls(path, b"")           # nothing to verify, and reading creates nothing
            key = load_key(KEY_ENV, key_file, create=True, what="audit key")
            log.warning("created the audit trail's key %s (mode 600); keep it with the trail's backups, or "
                        "better outside the workspace (CBH_AUDIT_KEY)", key_file)
            return cls(path, key)
        return cls(path, load_key(KEY_ENV, key_file, create=False, what="audit key"))

    @property
    def lock(self) -> Path:
        return self.path.with_suffix(".lock")

    def mac(self, line: str) -> str:
        return hmac.new(self.key, line.encode("utf-8"), hashlib.sha256).hexdigest()

    def _link(self, line: str) -> str:
        """What the next record's `prev` must be: the keyed hash of `line`, or for a record written
        before the chain was keyed (no `chain` field), its plain SHA-256."""
        try:
            keyed = json.loads(line).get("chain") == CHAIN
        except (json.JSONDecodeError, AttributeError):
            keyed = True
        return self.mac(line) if keyed else hashlib.sha256(line.encode("utf-8")).hexdigest()

    def _read(self) -> tuple[list[str], bytes, bool]:
        """Complete lines, a torn tail (bytes of an unfinished record) and whether the file ends
        without a newline."""
        if not self.path.is_file():
            return [], b"", False
        raw = self.path.read_bytes()
        body, sep, tail = raw.rpartition(b"\n")
        if not sep:
            body, tail = b"", raw
        lines = [ln for ln in body.decode("utf-8", "replace").split("\n") if ln.strip()]
        unterminated = bool(tail)
        if tail.strip():
            try:
                json.loads(tail)
                lines.append(tail.decode("utf-8"))          # a whole record short of its newline
                tail = b""
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        else:
            tail = b""
        return lines, tail, unterminated

    def lines(self) -> list[str]:
        return self._read()[0]

    def records(self) -> list[dict]:
        out = []
        for line in self.lines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue                                  # an edited line: verify() names it
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def identity(self) -> str:
        """Names this trail in the registry: the keyed hash of its first line."""
        lines = self.lines()
        return self.mac(lines[0])[:16] if lines else ""

    def _write(self, text: str) -> None:
        new = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = text.encode("utf-8")
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            _fsync_dir(self.path.parent)

    def append(self, record: dict) -> tuple[str, int, str]:
        """Append one record (the caller holds `lock`); returns its keyed hash, line number and id
        (what a confirmation names)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines, torn, unterminated = self._read()
        if torn:
            size = self.path.stat().st_size
            with self.path.open("r+b") as fh:               # drop the fragment: it never carried a decision
                fh.truncate(size - len(torn))
                os.fsync(fh.fileno())
            note = {"time": now(), "user": getpass.getuser(), "action": "repair", "decision": "repaired",
                    "reason": f"removed a torn last line ({len(torn)} bytes, sha256 "
                              f"{hashlib.sha256(torn).hexdigest()[:16]}) left by an interrupted write",
                    "fragment": base64.b64encode(torn[:MAX_FRAGMENT]).decode(),   # kept for whoever asks
                    "model": "", "challenger": None, "previous_champion": None, "champion": None,
                    "metrics": {}, "thresholds": {}, "phase": "", "confirms": ""}
            lines = self._append_line(lines, note, newline_first=False)
            unterminated = False
        rid = uuid.uuid4().hex[:16]
        lines = self._append_line(lines, {**record, "id": rid}, newline_first=unterminated)
        return self.mac(lines[-1]), len(lines), rid

    def _append_line(self, lines: list[str], record: dict, newline_first: bool) -> list[str]:
        rec = {**record, "prev": self._link(lines[-1]) if lines else "", "chain": CHAIN}
        line = json.dumps(rec, sort_keys=True)
        self._write(("\n" if newline_first else "") + line + "\n")
        return [*lines, line]

    def verify(self) -> list[int]:
        """Line numbers (1-based) whose link to the line before is broken: an edited, inserted or
        deleted record, a record re-chained without the key, an unkeyed record after keyed ones."""
        broken, prev, keyed_seen = [], "", False
        for i, line in enumerate(self.lines(), 1):
            try:
                rec = json.loads(line)
                keyed = rec.get("chain") == CHAIN
                ok = rec.get("prev", "") == prev and (keyed or not keyed_seen)
            except (json.JSONDecodeError, AttributeError):
                keyed, ok = True, False
            keyed_seen = keyed_seen or keyed
            if not ok:
                broken.append(i)
            prev = self._link(line)
        return broken

    def anchor(self, client, model: str, mac: str, line_no: int) -> None:
        """Record the trail's head on the registered model (the caller holds `lock`)."""
        client.set_registered_model_tag(model, HEAD_TAG, mac)
        client.set_registered_model_tag(model, LENGTH_TAG, str(line_no))
        client.set_registered_model_tag(model, TRAIL_TAG, self.identity())

    def check_registry(self, client, models: Iterable[str]) -> list[str]:
        """For each registered model whose last decision a trail recorded: that decision's line
        must be in this trail. A cut tail, a deleted trail and a replaced trail (its first line
        rewritten, e.g. to drop the key) each fail; one sentence per model."""
        from mlflow.exceptions import MlflowException

        macs = {self.mac(line): i for i, line in enumerate(self.lines(), 1)} if self.key else {}
        ident = self.identity() if self.key else ""
        problems = []
        for model in sorted(set(models)):
            try:
                tags = client.get_registered_model(model).tags
            except MlflowException:
                continue                                  # not registered here
            head, n = tags.get(HEAD_TAG), tags.get(LENGTH_TAG, "?")
            if not head:
                continue
            if not macs:
                problems.append(f"{model}: the registry records its last decision as record {n} of a trail, but "
                                f"this trail is empty or missing (deleted, or kept in another workspace)")
            elif tags.get(TRAIL_TAG) != ident:
                problems.append(f"{model}: its last decision (record {n}) was recorded in another trail: this one "
                                f"was replaced or rewritten, or decisions were taken in another workspace")
            elif head not in macs:
                problems.append(f"{model}: the registry's last recorded decision (record {n}) is not in the trail: "
                                f"records were removed from its end, or the key changed")
        return problems

    def guard(self, client, models: Iterable[str]) -> None:
        """Before a writer appends (under the lock): a trail that fails `check_registry` is not
        written to, so a cut or replaced trail can never be re-anchored as if whole."""
        problems = self.check_registry(client, {*models, *(r.get("model") for r in self.records() if r.get("model"))})
        if problems:
            raise AuditError(f"{self.path}: " + "; ".join(problems) + ". Restore the trail from its backup; to "
                             "start a new trail knowingly, remove the registered model's audit.* tags")


def decisions(records: list[dict]) -> list[dict]:
    """One entry per decision, oldest first: a pending record carries its outcome in `status`
    (confirmed | abandoned | pending when nothing settled it yet); confirmation records are folded
    into it; a one-step record (rejected, commissioned, repaired, a trail's older records) has
    status `final`."""
    outcome = {r.get("confirms"): r.get("phase") for r in records if r.get("phase") in (CONFIRMED, ABANDONED)}
    # a field an edit removed reads as empty: `--history` shows the record and the chain check names it
    out = []
    for r in records:
        phase = r.get("phase") or ""
        if phase in (CONFIRMED, ABANDONED):
            continue
        status = "final"
        if phase == PENDING:
            status = outcome.get(r.get("id"), PENDING)
        out.append({**r, "status": status})
    return out


__all__ = ["ABANDONED", "AuditError", "CONFIRMED", "KEY_ENV", "PENDING", "Trail", "decisions", "now"]
