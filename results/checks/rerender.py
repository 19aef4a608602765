"""Re-render a committed comparison's leaderboard (json, csv, md, svg) in the current format from its own cells.

    .venv/bin/python results/checks/rerender.py own-pool merge-count merge-count-old

For comparisons whose leaderboards were written before the per-group Δ/p and Holm-corrected columns and whose rows
cannot be recomputed here at once (their keys changed since, or their pool is a walkthrough's): nothing is
evaluated again. The cells counted are those `workbench.catalog` counts (the one checked reader: each cell's key
against the folder's plan.json, rows in the plan), so the numbers are the committed cells' own; only the
derived columns (paired tests per group, Holm) are recomputed. The leaderboard records `rerendered` (the commit
and when) beside the comparison's original `eval` and `cells`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from workbench import catalog  # noqa: E402
from workbench.eval.harness import git_state  # noqa: E402
from workbench.eval.leaderboard import leaderboard_chart, leaderboard_frame, leaderboard_markdown  # noqa: E402
from workbench.io import atomic_write_json, atomic_write_text  # noqa: E402


def rerender(name: str, results: Path = ROOT / "results") -> dict:
    cat = catalog.scan(results)
    if name not in cat.comparisons:
        raise SystemExit(f"no comparison {name!r} under {results}/compare")
    old = cat.comparisons[name]
    src = catalog.comparison_source(cat, name)
    board = src.board(src.reference)
    board.pop("source", None)
    keep = {k: old[k] for k in ("name", "pool", "eval", "complete", "cells", "skipped") if k in old}
    state = git_state()
    board = board | keep | {"rerendered": {"commit": state["commit"], "dirty": state["dirty"],
                                           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                           "by": "results/checks/rerender.py (cells unchanged)"}}
    out = Path(old["_dir"])
    ev = board.get("eval") or {}
    title = (f"{name}: pool {board.get('pool')}, {ev.get('split', 'test')} split, "
             f"{'limit ' + str(ev['limit']) if ev.get('limit') else 'all examples'} per task")
    atomic_write_json(out / "leaderboard.json", board)
    atomic_write_text(out / "leaderboard.csv", leaderboard_frame(board, arrows=True).to_csv(index=False,
                                                                                          float_format="%.6g"))
    atomic_write_text(out / "leaderboard.md", leaderboard_markdown(board, title))
    leaderboard_chart(board, title).save(str(out / "leaderboard.svg"))
    return board


if __name__ == "__main__":
    for n in sys.argv[1:]:
        b = rerender(n)
        print(f"{n}: {len(b['rows'])} rows, cells {b.get('cells')}, rerendered at {b['rerendered']['commit'][:10]}")
