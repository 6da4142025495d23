"""Progress of long work, for the people watching it: a rich progress bar on a terminal, a plain
log line every tenth of the way (and at the end) otherwise, so CI logs and Prefect logs stay short.

Pipelines take a `progress(done, total)` callback and never draw anything themselves.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Callback = Callable[[int, int], None]


def progress(label: str, interactive: bool | None = None) -> Callback:
    """A callback drawing `label`'s progress; `interactive` defaults to whether stderr is a terminal."""
    if interactive if interactive is not None else sys.stderr.isatty():
        return _bar(label)
    return _lines(label)


def _bar(label: str) -> Callback:
    state: dict[str, object] = {}

    def show(done: int, total: int) -> None:
        if "bar" not in state:
            bar = Progress(TextColumn(f"  {label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           console=Console(stderr=True), transient=False)
            state["bar"], state["task"] = bar, bar.add_task(label, total=total)
            bar.start()
        bar = state["bar"]
        assert isinstance(bar, Progress)
        bar.update(state["task"], completed=done, total=total)   # type: ignore[arg-type]
        if done >= total:
            bar.stop()
            state.clear()

    return show


def _lines(label: str) -> Callback:
    start, shown = time.monotonic(), {"tenth": 0}

    def show(done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth > shown["tenth"] or done >= total:
            shown["tenth"] = tenth
            print(f"  {label}: {done}/{total} ({time.monotonic() - start:.0f}s)", file=sys.stderr, flush=True)

    return show
