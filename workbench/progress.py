"""Progress bars (rich) for long loops: training, merging, evaluation."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, progress: Progress, task_id):
        self._p, self._id = progress, task_id

    def update(self, advance: int = 1, **fields: Any) -> None:
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self._p.update(self._id, advance=advance, info=info)


@contextmanager
def progress_bar(desc: str, total: int):
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        transient=False, disable=False, refresh_per_second=2, console=None)
    # Off a terminal (CI logs), rich prints only the final state of the bar.
    progress.console.file = sys.stderr
    with progress:
        yield _Bar(progress, progress.add_task(desc, total=total, info=""))
