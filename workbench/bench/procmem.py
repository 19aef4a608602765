"""Wall time and peak memory of a command, sampled from /proc over its whole process tree.

Peak *anonymous* memory (RssAnon) is the number that matters: file-backed pages of
memory-mapped safetensors (RssFile) inflate plain RSS but are reclaimable.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                children = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
                todo += [int(c) for c in children]
        except OSError:
            continue
    return out


def _rss(pid: int) -> tuple[int, int]:
    anon = file = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1])
            elif line.startswith("RssFile:"):
                file = int(line.split()[1])
    except OSError:
        pass
    return anon, file


def measure(cmd: list[str], env: dict[str, str] | None = None, interval: float = 0.05,
            log_path: Path | None = None) -> dict[str, float]:
    """Run `cmd`; return wall seconds and peak RssAnon / RssFile in MB (summed over the tree)."""
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    peak_anon = peak_file = 0
    while proc.poll() is None:
        anon = file = 0
        for p in _tree(proc.pid):
            a, f = _rss(p)
            anon, file = anon + a, file + f
        peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file)
        time.sleep(interval)
    wall = time.perf_counter() - t0
    if log_path:
        log.close()
    if proc.returncode != 0:
        tail = Path(log_path).read_text()[-800:] if log_path else ""
        raise RuntimeError(f"benchmark command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return {"wall_s": round(wall, 2), "peak_rss_anon_mb": round(peak_anon / 1024, 1),
            "peak_rss_file_mb": round(peak_file / 1024, 1)}
