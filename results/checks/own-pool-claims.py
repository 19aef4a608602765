"""Paired tests behind docs/own-pool.md's comparisons, from the committed cells of results/compare/own-pool
(nothing is run), Holm-corrected over the page's claims. Usage: python results/checks/own-pool-claims.py"""
import json
import subprocess
from pathlib import Path

from workbench.eval import stats
from workbench.eval.leaderboard import pair_cells, paired_values

ROOT = Path(__file__).resolve().parents[2]
CELLS = ROOT / "results" / "compare" / "own-pool" / "cells"
ACCURACY = ["shout", "parity"]  # exact_match and acc: pooled, exact McNemar
CLAIMS = [("twin", "base", ACCURACY), ("twin", "phatgoose", ACCURACY), ("phatgoose", "mole", ACCURACY),
          ("phatgoose", "base", ["notes"]), ("notes", "base", ["notes"]), ("phatgoose", "notes", ["notes"])]


def cell(row, task):
    return json.loads((CELLS / row / f"{task}.json").read_text())


tests = []
for a, b, tasks in CLAIMS:
    if tasks == ["notes"]:  # word perplexity, lower is better: paired sign-flip test over documents
        t = pair_cells(cell(a, "notes"), cell(b, "notes"))
        tests.append({"a": a, "b": b, "tasks": tasks, "metric": t["metric"], "value_a": t["a"], "value_b": t["b"],
                      "n": t["n"], "test": t["test"], "p_value": t["p_value"], "a_better": t["gain"] > 0})
        continue
    xa, xb = [], []
    for task in tasks:
        x, y = paired_values(cell(a, task), cell(b, task))
        xa += x
        xb += y
    t = stats.compare(xa, xb)
    tests.append({"a": a, "b": b, "tasks": tasks, "metric": "exact_match/acc", "value_a": t["mean_a"],
                  "value_b": t["mean_b"], "n": t["n"], "test": t["test"], "p_value": t["p_value"],
                  "a_better": t["diff"] > 0})
order = sorted(range(len(tests)), key=lambda i: tests[i]["p_value"])
running = 0.0
for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(tests) - rank) * tests[i]["p_value"]))
    tests[i]["p_holm"] = running
    tests[i]["verdict"] = ("a better" if tests[i]["a_better"] else "b better") if running < 0.05 else "tie"
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
print(json.dumps({"commit": commit, "source": "results/compare/own-pool/cells", "correction": "Holm over these claims",
                  "claims": tests}, indent=1))
