"""`workbench bench app`: how long the app takes to open on a results folder of at least 200 runs.

The folder is made from a real one (default: results/) by copying its comparisons under new names until it
holds `runs` run manifests (each copy keeps its lm-eval outputs and per-sample files). Timed with Streamlit's
AppTest (the script run a browser would trigger, without the browser): the first open in a fresh process (every
file parsed) and reopenings in the same process (parsed files cached by mtime), interleaved with a scan of the
folder by `workbench.catalog` alone (the peer: the floor any reader pays), repeated.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..eval.harness import git_state, machine_info, results_root
from ..io import atomic_write_json

APP = Path(__file__).resolve().parents[2] / "app" / "app.py"

_OPEN = r"""
import json, sys, time
t0 = time.perf_counter()
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=300)
t1 = time.perf_counter()
at.run()
cold = time.perf_counter() - t1
assert not at.exception, [e.value for e in at.exception]
warm = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter(); at.run(); warm.append(time.perf_counter() - t)
from workbench import catalog
import os
scan = []
for _ in range(int(sys.argv[2])):
    catalog._PARSED.clear()
    t = time.perf_counter(); cat = catalog.scan(os.environ["WORKBENCH_RESULTS"]); scan.append(time.perf_counter() - t)
print(json.dumps({"import_s": t1 - t0, "cold_s": cold, "warm_s": warm, "scan_cold_s": scan, "runs": len(cat.runs),
                  "files": cat.files, "rows": len(at.dataframe[0].value) if at.dataframe else 0}))
"""


def make_folder(src: Path, dst: Path, runs: int) -> int:
    """Copy `src` to `dst`, then its comparisons under new names until `dst` holds at least `runs` manifests."""
    shutil.copytree(src, dst)
    have = len(list(dst.rglob("run_*.json")))
    comps = [p for p in sorted((src / "compare").glob("*")) if (p / "leaderboard.json").is_file()]
    if not comps:
        raise SystemExit(f"{src} has no comparison to copy")
    i = 0
    while have < runs:
        c = comps[i % len(comps)]
        shutil.copytree(c, dst / "compare" / f"{c.name}-copy{i}")
        have += len(list(c.rglob("run_*.json")))
        i += 1
    return have


def run(src: Path | None = None, runs: int = 200, reps: int = 3, out_file: Path | None = None, log=print) -> dict[str, Any]:
    import os

    src = Path(src or results_root())
    with tempfile.TemporaryDirectory(prefix="wb-app-bench-") as tmp:
        folder = Path(tmp) / "results"
        n = make_folder(src, folder, runs)
        log(f"{n} run manifests in {sum(1 for _ in folder.rglob('*.json'))} JSON files")
        env = {**os.environ, "WORKBENCH_RESULTS": str(folder)}
        samples = []
        for r in range(reps):  # each a fresh process: nothing parsed yet
            out = subprocess.run([sys.executable, "-c", _OPEN, str(APP), "3"], env=env, capture_output=True, text=True,
                                 check=False)
            if out.returncode:
                raise SystemExit(f"app run failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
            samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
            log(f"round {r + 1}: first open {samples[-1]['cold_s']:.2f}s, reopen {min(samples[-1]['warm_s']):.2f}s, "
                f"catalog scan alone {min(samples[-1]['scan_cold_s']):.3f}s")
    cold = statistics.median(s["cold_s"] for s in samples)
    warm = statistics.median(min(s["warm_s"]) for s in samples)
    scan = statistics.median(min(s["scan_cold_s"]) for s in samples)
    rec = {"benchmark": "app-open", "runs": samples[0]["runs"], "files": samples[0]["files"],
           "leaderboard_rows": samples[0]["rows"], "reps": reps,
           "first_open_s": round(cold, 3), "reopen_s": round(warm, 3), "catalog_scan_s": round(scan, 4),
           "first_open_x_scan": round(cold / scan, 1) if scan else None,
           "reopen_over_first_open": round(warm / cold, 3), "budget_s": 3.0, "within_budget": cold <= 3.0,
           "samples": samples, "note": "AppTest script run of the default view (Leaderboard); python and streamlit "
                                       "imports excluded (import_s in samples)",
           "machine": machine_info("cpu"), "git": git_state(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(out_file or results_root() / "bench" / "app-open.json", rec)
    return rec
