"""An exclusive lock between processes on one machine (or a shared filesystem with flock)."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class Busy(RuntimeError):
    """Another process holds the lock and the caller chose not to wait."""


@contextmanager
def exclusive_lock(lock_path: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` (created if absent); waits for the holder, or
    raises Busy at once when `wait` is False. The kernel releases it when the holder dies."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as exc:
            raise Busy(f"{lock_path}: held by another process") from exc
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
