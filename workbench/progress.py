"""Progress bars (rich) for long loops: training, merging, evaluation; and hooks that let a job follow them.

Every `progress_bar` also reports to the watchers registered with `watch` (in any thread of the process): a
background job (`workbench.jobs`) records the step it is in (training steps, merge tensors, ...) for the app."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# A watcher gets one dict per change of a bar: desc, done, total, info (the fields of its last update, as text),
# started (time.time() of the bar's start) and finished (True once, as the bar's block ends).
Watcher = Callable[[dict[str, Any]], None]
_WATCHERS: list[Watcher] = []
_WATCHERS_LOCK = threading.Lock()


@contextmanager
def watch(fn: Watcher):
    """Call `fn` with every progress bar's state while the block runs (a watcher that raises is dropped)."""
    with _WATCHERS_LOCK:
        _WATCHERS.append(fn)
    try:
        yield fn
    finally:
        with _WATCHERS_LOCK:
            if fn in _WATCHERS:
                _WATCHERS.remove(fn)


def _notify(state: dict[str, Any]) -> None:
    with _WATCHERS_LOCK:
        watchers = list(_WATCHERS)
    for fn in watchers:
        try:
            fn(dict(state))
        except Exception:  # noqa: BLE001 - a broken watcher must not stop a build: it is dropped
            with _WATCHERS_LOCK:
                if fn in _WATCHERS:
                    _WATCHERS.remove(fn)


class _Bar:
    def __init__(self, progress: Progress, task_id, desc: str, total: int):
        self._p, self._id = progress, task_id
        self.state = {"desc": desc, "done": 0, "total": total, "info": "", "started": time.time(), "finished": False}

    def update(self, advance: int = 1, **fields: Any) -> None:
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self._p.update(self._id, advance=advance, info=info)
        self.state["done"] += advance
        self.state["info"] = info
        _notify(self.state)


@contextmanager
def progress_bar(desc: str, total: int):
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        transient=False, disable=False, refresh_per_second=2, console=None)
    # Off a terminal (CI logs), rich prints only the final state of the bar.
    progress.console.file = sys.stderr
    with progress:
        bar = _Bar(progress, progress.add_task(desc, total=total, info=""), desc, total)
        _notify(bar.state)
        try:
            yield bar
        finally:
            bar.state["finished"] = True
            _notify(bar.state)
