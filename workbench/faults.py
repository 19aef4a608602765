"""Crash injection for the kill tests: `WORKBENCH_FAULT=site[:n]` kills this process with SIGKILL the n-th time
(default 1st) it reaches `fault_point(site)`. Unset (always, outside those tests) it costs one dict lookup.

Sites: `build` (an artifact fully staged, not yet renamed into place), `eval` (a cell's lm-eval outputs
written, its cell record not yet), `write` (any atomic write: temp file synced, not yet renamed),
`leaderboard` (between the leaderboard's files), `upcycle_checkpoint` (an MoE training checkpoint written).
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

_hits: Counter[str] = Counter()


def fault_point(site: str) -> None:
    spec = os.environ.get("WORKBENCH_FAULT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != site:
        return
    _hits[site] += 1
    if _hits[site] == int(n or 1):
        sys.stderr.write(f"WORKBENCH_FAULT: killed at {site} #{_hits[site]}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
