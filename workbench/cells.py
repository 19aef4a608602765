"""Comparison cell records, read one way by everyone: the jobs (is a cell done?), the leaderboard, the catalog and
the app. And JSON read with bounds: a results folder is data, so one huge or deeply nested file is a warning,
never an exception out of a reader.

A cell `<comparison>/cells/<row>/<task>.json` counts only when its (row, task) is planned, its `row` and `task`
fields name the place it lies, its `key` is the one the plan expects for that cell (the row's model, the task's
data and configuration, the eval settings: `comparison.cell_key`), its per-example values are well formed (one finite
number per doc id; a perplexity-like cell's `weights` one non-negative number per value; `higher_is_better`,
`aggregate`, `score`, `n` of their types: `eval.metrics` describes the fields) and its `run` (the lm-eval manifest
behind it) lies inside the comparison's folder. Everything else under cells/ is
listed as skipped with the reason, never shown.

The jobs know the expected keys from the live plan; a reader of a results folder finds them in
`<comparison>/plan.json` (`cells`: row -> task -> key, null for an artifact row whose build was not recorded
when the plan was written: no cell of it is accepted). A plan.json from an older version records no keys: its
cells are checked for place, plan and shape only, and the comparison says so (`key_checked` False).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .eval.metrics import AGGREGATES, CORPUS

MAX_JSON_BYTES = 32 * 2**20  # a record of the workbench is KBs; the largest lm-eval result is well under 1 MB
MAX_JSON_DEPTH = 64  # the workbench's records nest about 7 deep

OLD_PLAN = "cells not key-checked (plan.json from an older version)"
NO_PLAN = "cells not key-checked (no readable plan.json)"

ANY_KEY = object()  # a planned cell of an old plan.json: any key is accepted


def json_depth(value: Any) -> int:
    """How deep lists and objects nest in a parsed value (0 for a scalar), without recursion."""
    best, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            items = v.values()
        elif isinstance(v, list):
            items = v
        else:
            continue
        best = max(best, d)
        stack.extend((c, d + 1) for c in items if isinstance(c, (dict, list)))
    return best


def load_json(path: str | Path, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The file's JSON; raises ValueError (why, in one line) when it is not a regular file (a FIFO, socket or device:
    opened without blocking and never read), too large (a file over `max_bytes` is not read past its cap), nested
    too deeply, not UTF-8 or not JSON, and OSError when it cannot be read."""
    from .io import read_regular_file

    return parse_json(read_regular_file(Path(path), max_bytes), max_depth)


def parse_json(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON from bytes, nested at most `max_depth` deep; ValueError (one line) otherwise."""
    if not data.strip():
        raise ValueError("not valid JSON (empty file)")
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid JSON (not UTF-8: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ValueError(f"nested too deeply (over {max_depth} levels)") from None
    if json_depth(value) > max_depth:
        raise ValueError(f"nested too deeply (over {max_depth} levels)")
    return value


def read_record(path: str | Path) -> dict[str, Any] | None:
    """A JSON object the workbench wrote (a build or cell record), or None when absent, unreadable or not an object."""
    try:
        value = load_json(path)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# ----------------------------------------------------------------------------- one cell


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return _number(v) and math.isfinite(v)


def cell_problem(rec: Any, row: str, task: str, key: Any, folder: Path) -> str | None:
    """Why the record at cells/<row>/<task>.json of the comparison in `folder` does not count (None: it does).
    `key`: the key the plan expects (None: the row's model is not known, so nothing counts; ANY_KEY: not checked)."""
    if not isinstance(rec, dict):
        return "not a cell record"
    missing = [k for k in ("key", "row", "task", "metric", "values", "doc_ids") if k not in rec]
    if missing:
        return f"not a cell record: missing {', '.join(missing)}"
    if rec["row"] != row or rec["task"] != task:
        return f"records row {rec['row']!r} x task {rec['task']!r} but lies at {row}/{task}.json"
    if key is None:
        return f"row {row!r} was not built when the plan was written: no key to check this cell against"
    if key is not ANY_KEY and rec["key"] != key:
        return (f"stale: key {str(rec['key'])[:16]!r}, the plan expects {str(key)[:16]!r} (another model, task data "
                f"or eval settings, e.g. another limit)")
    values, doc_ids = rec["values"], rec["doc_ids"]
    if not isinstance(rec["metric"], str) or not isinstance(values, list) or not isinstance(doc_ids, list):
        return "malformed cell: metric, values or doc_ids of the wrong type"
    if len(values) != len(doc_ids) or not all(_finite(v) for v in values) \
            or not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in doc_ids):
        return "malformed cell: values are not one finite number per doc id"
    for k in ("mean", "score"):
        if rec.get(k) is not None and not _number(rec[k]):
            return f"malformed cell: {k} is not a number"
    if "higher_is_better" in rec and not isinstance(rec["higher_is_better"], bool):
        return "malformed cell: higher_is_better is not true or false"
    if "n" in rec and (not isinstance(rec["n"], int) or isinstance(rec["n"], bool) or rec["n"] < 0):
        return "malformed cell: n is not a count"
    if "note" in rec and not isinstance(rec["note"], str):
        return "malformed cell: note is not text"
    agg = rec.get("aggregate")
    if "aggregate" in rec and agg not in AGGREGATES:
        return f"malformed cell: aggregate {str(agg)[:40]!r} is not one of {', '.join(AGGREGATES)}"
    weights = rec.get("weights")
    if "weights" in rec:
        if agg not in CORPUS:
            return "malformed cell: weights are for perplexity-like aggregates (perplexity, bits_per_byte) only"
        if not isinstance(weights, list) or len(weights) != len(values) \
                or not all(_finite(w) and w >= 0 for w in weights):
            return "malformed cell: weights are not one non-negative number per value"
    elif agg in CORPUS and values:
        return f"malformed cell: a {agg} cell's per-document values need their weights"
    run = rec.get("run")
    if run is not None:
        if not isinstance(run, str) or not run:
            return "malformed cell: run is not a path"
        base = Path(folder).resolve()
        try:
            (base / run).resolve().relative_to(base)
        except (ValueError, OSError):
            return f"its run path {run!r} escapes the comparison folder"
    return None


Loader = Callable[[Path], Any]  # path -> parsed JSON; raises ValueError or OSError


def cell_path(folder: Path, row: str, task: str) -> Path:
    return Path(folder) / "cells" / row / f"{task}.json"


def read_cell(folder: Path, row: str, task: str, key: Any, load: Loader = load_json
              ) -> tuple[dict[str, Any] | None, str | None]:
    """(the cell record, None) when cells/<row>/<task>.json of the comparison in `folder` counts for a plan that
    expects `key`; else (None, why). A cell that is not there is (None, 'missing')."""
    p = cell_path(folder, row, task)
    try:
        rec = load(p)
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as e:
        return None, str(e) if isinstance(e, ValueError) else f"unreadable: {e.strerror or e}"
    problem = cell_problem(rec, row, task, key, Path(folder))
    return (None, problem) if problem else (rec, None)


# ----------------------------------------------------------------------------- a comparison's cells, from its plan.json


def planned_keys(plan: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """(row, task) -> the key plan.json's `cells` expects (None: the row was not built when it was written)."""
    out: dict[tuple[str, str], Any] = {}
    for row, tasks in (plan.get("cells") or {}).items():
        if isinstance(tasks, dict):
            for task, key in tasks.items():
                out[(str(row), str(task))] = key if isinstance(key, str) else None
    return out


@dataclass
class ComparisonCells:
    """The cells of a comparison that count, the files under cells/ that do not (path, why), and whether keys
    were checked (False: the plan.json predates recorded keys, or there is none: `note` says which)."""

    cells: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    key_checked: bool = True
    note: str | None = None
    planned: int = 0


def comparison_cells(folder: str | Path, board: dict[str, Any] | None = None,
                     load: Loader = load_json) -> ComparisonCells:
    """Every cell record under `folder`/cells/, checked against `folder`/plan.json (see the module's doc). Without
    a readable plan.json the leaderboard's (`board`) rows x tasks are the plan, keys unchecked."""
    folder = Path(folder)
    out = ComparisonCells()
    plan: Any
    try:
        plan = load(folder / "plan.json")
    except (OSError, ValueError):
        plan = None
    if isinstance(plan, dict) and isinstance(plan.get("cells"), dict):
        expected = planned_keys(plan)
    else:
        src = plan if isinstance(plan, dict) and isinstance(plan.get("rows"), list) else (board or {})
        rows = [r.get("name") for r in src.get("rows") or [] if isinstance(r, dict)]
        tasks = src.get("tasks") if isinstance(src.get("tasks"), list) else []
        expected = {(str(r), str(t)): ANY_KEY for r in rows for t in tasks}
        out.key_checked = False
        out.note = OLD_PLAN if src is plan else NO_PLAN
    out.planned = len(expected)
    root = folder / "cells"
    files = sorted(p for p in root.rglob("*.json") if not any(part.startswith(".") for part in
                                                              p.relative_to(root).parts)) if root.is_dir() else []
    for p in files:
        rel = p.relative_to(root)
        if len(rel.parts) != 2:
            out.skipped.append((p, "not at cells/<row>/<task>.json"))
            continue
        row, task = rel.parts[0], p.stem
        if (row, task) not in expected:
            why = (f"task {task!r} is not planned for row {row!r}" if any(r == row for r, _ in expected)
                   else f"row {row!r} is not in the plan")
            out.skipped.append((p, why))
            continue
        rec, problem = read_cell(folder, row, task, expected[(row, task)], load)
        if rec is None:
            out.skipped.append((p, problem or "missing"))
        else:
            out.cells[(row, task)] = rec
    return out


__all__ = ["ANY_KEY", "ComparisonCells", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "cell_path", "cell_problem",
           "comparison_cells", "json_depth", "load_json", "parse_json", "planned_keys", "read_cell", "read_record"]
