"""`workbench bench app`: how long each view of the app takes to open on a results folder of 1,200 runs.

The folder is made from a real one (default: results/) by copying its comparisons under new names until it holds
`runs` run manifests (each copy keeps its lm-eval outputs and per-sample files). Every view is timed with Streamlit's
AppTest (the script run a browser would trigger, without the browser), opened as a link opens it
(`?view=<view>`): the first open in a fresh process (every file parsed: what a researcher waits for after starting
the app), and reopenings in the same process (parsed files cached by mtime). Each such process then scans the folder
with `workbench.catalog` alone, parse cache cleared (the peer: the floor any reader pays). Rounds are interleaved:
every view once, then every view again, `reps` times, so a slow moment of the machine spreads over all views.

The acceptance (issue 28): on 1,200 runs the Leaderboard and every other view open in <= 3 s (`budget_s`), measured
on a quiet machine. The record keeps, per view, the median first open, reopen and scan and whether the first open is
within budget; `first_open_s`/`reopen_s`/`catalog_scan_s` at the top are the Leaderboard's (the default view).
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

from ..errors import WorkbenchError
from ..eval.harness import git_state, machine_info, results_root
from ..io import atomic_write_json

APP = Path(__file__).resolve().parents[2] / "app" / "app.py"
VIEWS = ("Leaderboard", "Per-task charts", "Pairwise", "Examples", "Sweeps", "Routing", "Playground", "Run",
         "Benchmarks")
BUDGET_S = 3.0
MAX_RUNS = 100_000  # run manifests in the timed folder
MAX_REPS = 50

_OPEN = r"""
import json, os, sys, time
t0 = time.perf_counter()
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=600)
at.query_params["view"] = sys.argv[3]
t1 = time.perf_counter()
at.run()
cold = time.perf_counter() - t1
assert not at.exception, [e.value for e in at.exception]
assert at.sidebar.radio(key="view").value == sys.argv[3]
warm = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter(); at.run(); warm.append(time.perf_counter() - t)
from workbench import catalog
scan = []
for _ in range(int(sys.argv[2])):
    catalog._PARSED.clear()
    t = time.perf_counter(); cat = catalog.scan(os.environ["WORKBENCH_RESULTS"]); scan.append(time.perf_counter() - t)
print(json.dumps({"view": sys.argv[3], "import_s": t1 - t0, "cold_s": cold, "warm_s": warm, "scan_cold_s": scan,
                  "runs": len(cat.runs), "files": cat.files,
                  "rows": len(at.dataframe[0].value) if at.dataframe else 0,
                  "elements": {"charts": len(at.get("vega_lite_chart")), "tables": len(at.dataframe),
                               "info": len(at.info), "warnings": len(at.warning), "errors": len(at.error)}}))
"""


def make_folder(src: Path, dst: Path, runs: int) -> int:
    """Copy `src` to `dst`, then its comparisons under new names until `dst` holds at least `runs` manifests."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".jobs"))
    have = len(list(dst.rglob("run_*.json")))
    comps = [p for p in sorted((src / "compare").glob("*")) if (p / "leaderboard.json").is_file()]
    if not comps:
        raise WorkbenchError(f"{src} has no comparison to copy")
    if have < runs and not any(any(c.rglob("run_*.json")) for c in comps):
        raise WorkbenchError(f"the comparisons of {src} hold no run manifest: copying them never reaches {runs} runs")
    i = 0
    while have < runs:
        c = comps[i % len(comps)]
        shutil.copytree(c, dst / "compare" / f"{c.name}-copy{i}")
        have += len(list(c.rglob("run_*.json")))
        i += 1
    return have


def _open(view: str, folder: Path, reopen: int, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _OPEN, str(APP), str(reopen), view], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        raise WorkbenchError(f"opening {view} on {folder} failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(runs: int, reps: int, reopen: int, views: list[str]) -> None:
    if not (isinstance(runs, int) and 1 <= runs <= MAX_RUNS):
        raise WorkbenchError(f"runs must be an integer in [1, {MAX_RUNS}], got {runs!r}")
    if not (isinstance(reps, int) and 1 <= reps <= MAX_REPS):
        raise WorkbenchError(f"reps must be an integer in [1, {MAX_REPS}], got {reps!r}")
    if not (isinstance(reopen, int) and 1 <= reopen <= MAX_REPS):
        raise WorkbenchError(f"reopen must be an integer in [1, {MAX_REPS}], got {reopen!r}")
    bad = [v for v in views if v not in VIEWS]
    if bad or not views:
        raise WorkbenchError(f"unknown view(s) {bad or views!r}: {', '.join(VIEWS)}")


def run(src: Path | None = None, runs: int = 1200, reps: int = 3, out_file: Path | None = None, log=print,
        views: list[str] | tuple[str, ...] = VIEWS, reopen: int = 3) -> dict[str, Any]:
    """Build a folder of `runs` run manifests from `src`, time the first open of every one of `views` in a fresh
    process and `reopen` reopenings, `reps` interleaved rounds; write and return the record."""
    import os

    views = list(views)
    _check(runs, reps, reopen, views)
    src = Path(src or results_root())
    if not (src / "compare").is_dir():
        raise WorkbenchError(f"{src} has no compare/ folder: pass --src, a results folder with a comparison")
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in views}
    with tempfile.TemporaryDirectory(prefix="wb-app-bench-") as tmp:
        folder = Path(tmp) / "results"
        n = make_folder(src, folder, runs)
        log(f"{n} run manifests in {sum(1 for _ in folder.rglob('*.json'))} JSON files")
        env = {**os.environ, "WORKBENCH_RESULTS": str(folder)}
        for r in range(reps):  # each open a fresh process: nothing parsed yet; views interleaved round by round
            for v in views:
                s = _open(v, folder, reopen, env)
                samples[v].append(s)
                log(f"round {r + 1} {v}: first open {s['cold_s']:.2f}s, reopen {min(s['warm_s']):.2f}s, "
                    f"catalog scan alone {min(s['scan_cold_s']):.3f}s")
    per_view = {}
    for v, ss in samples.items():
        cold = statistics.median(s["cold_s"] for s in ss)
        warm = statistics.median(min(s["warm_s"]) for s in ss)
        scan = statistics.median(min(s["scan_cold_s"]) for s in ss)
        per_view[v] = {"first_open_s": round(cold, 3), "first_open_max_s": round(max(s["cold_s"] for s in ss), 3),
                       "reopen_s": round(warm, 3), "catalog_scan_s": round(scan, 4),
                       "first_open_x_scan": round(cold / scan, 1) if scan else None,
                       "within_budget": cold <= BUDGET_S, "elements": ss[0]["elements"]}
    first = samples[views[0]][0]
    lead = per_view.get("Leaderboard") or per_view[views[0]]
    rec = {"benchmark": "app-open", "runs": first["runs"], "files": first["files"],
           "leaderboard_rows": samples["Leaderboard"][0]["rows"] if "Leaderboard" in samples else None,
           "reps": reps, "reopen": reopen, "budget_s": BUDGET_S, "views": per_view,
           "first_open_s": lead["first_open_s"], "reopen_s": lead["reopen_s"],
           "catalog_scan_s": lead["catalog_scan_s"], "within_budget": all(p["within_budget"] for p in per_view.values()),
           "over_budget": [v for v, p in per_view.items() if not p["within_budget"]],
           "slowest_view": max(per_view, key=lambda v: per_view[v]["first_open_s"]),
           "samples": samples,
           "note": "AppTest script run of each view opened by its URL (?view=...), first open in a fresh process "
                   "(median over reps), reopen in the same process (best of `reopen`, median over reps); python and "
                   "streamlit imports excluded (import_s in samples); the Playground's pool and Routing's live "
                   "tracing load on a click, not on open",
           "machine": machine_info("cpu"), "git": git_state(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(out_file or results_root() / "bench" / "app-open.json", rec)
    for v, p in per_view.items():
        log(f"{v}: first open {p['first_open_s']:.2f}s ({'within' if p['within_budget'] else 'OVER'} "
            f"{BUDGET_S:.0f}s), reopen {p['reopen_s']:.2f}s")
    return rec
