"""What a results folder holds, read once: the app's and the CLI's one view of `results/`.

Every `*.json` under the folder is parsed once per (path, mtime, size) and classified by its content, not by
its name: lm-eval run manifests, comparisons (leaderboard + cells), sweep records, benchmark records, routing
traces, merge-count curves, checks. A file that does not parse, is too large or nested too deeply
(`cells.load_json`), a record with keys missing and a JSON file the workbench did not write are listed as warnings
(path: problem) and skipped: a results folder never breaks a reader. A comparison's cells are read by
`cells.comparison_cells`, as the jobs read them: only cells its plan.json expects, with the expected key, count;
the others are warnings too. Runs are identified by their manifests (pool, model, method, parameters, commit,
settings), never by splitting folder names.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import cells as cell_records
from .errors import WorkbenchError

# path -> ((inode, mtime, ctime, size), parsed JSON or the error): re-reading a folder parses only what changed
_PARSED: dict[str, tuple[tuple[int, int, int, int], Any]] = {}
_CACHE_LIMIT = 50_000

RUN_KEYS = ("run_id", "model_name", "scores")


@dataclass
class Catalog:
    root: Path
    runs: list[dict[str, Any]] = field(default_factory=list)  # lm-eval run manifests (+ "_path")
    comparisons: dict[str, dict[str, Any]] = field(default_factory=dict)  # folder name -> leaderboard (+ "_dir")
    sweeps: list[dict[str, Any]] = field(default_factory=list)
    benches: list[dict[str, Any]] = field(default_factory=list)
    traces: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    cells: dict[str, cell_records.ComparisonCells] = field(default_factory=dict)  # comparison name -> its cells
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (path relative to root, problem)
    files: int = 0

    def rel(self, p: str | Path) -> str:
        try:
            return Path(p).relative_to(self.root).as_posix()
        except ValueError:
            return Path(p).as_posix()


def load_json(path: Path) -> Any:
    """`cells.load_json` for a folder anyone may write into: a regular file only (a FIFO, socket or device named
    `*.json` is a ValueError, opened without blocking and never read: `io.read_regular_file`), at most
    `cells.MAX_JSON_BYTES`, nested at most `cells.MAX_JSON_DEPTH` deep. Raises ValueError (why, one line) or OSError."""
    return cell_records.load_json(path, max_bytes=cell_records.MAX_JSON_BYTES, max_depth=cell_records.MAX_JSON_DEPTH)


def _parse(path: Path) -> Any:
    """The file's JSON (cached by inode, mtime, ctime and size: a rewrite that restores the mtime still changes the
    ctime), or a ValueError saying why not (not a regular file, not JSON, over
    `cells.MAX_JSON_BYTES`: not read, nested deeper than `cells.MAX_JSON_DEPTH`: `load_json`)."""
    st = path.stat()
    key = str(path)
    hit = _PARSED.get(key)
    stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
    if hit and hit[0] == stamp:
        return hit[1]
    try:
        value: Any = load_json(path)
    except ValueError as e:
        value = e
    if len(_PARSED) > _CACHE_LIMIT:
        _PARSED.clear()
    _PARSED[key] = (stamp, value)
    return value


def _kind(d: Any, path: Path, rel: Path | None = None) -> str | None:
    """What a parsed record is, from its keys (None: not the workbench's). `rel`: its path under the results root."""
    if not isinstance(d, dict):
        return None
    if all(k in d for k in RUN_KEYS):
        return "run"
    if "results" in d and ("configs" in d or "config" in d):
        return "lm-eval-results"  # lm-eval's own output, read through its run manifest
    if {"rows", "skipped", "source"} <= d.keys():
        return "plan"  # before the leaderboard test: a plan also has rows, tasks and a reference
    if {"rows", "tasks", "reference"} <= d.keys() and isinstance(d["rows"], list):
        return "leaderboard"
    if {"key", "row", "task", "values"} <= d.keys():
        return "cell"
    if {"key", "row", "method"} <= d.keys():
        return "build"
    if {"recipe", "points"} <= d.keys() and isinstance(d["points"], list):
        return "sweep"  # a sweep still running has no `best` yet
    if "benchmark" in d:
        return "bench"
    if {"tokens", "experts", "usage", "choices"} <= d.keys():
        return "trace"
    if {"points", "name", "pool"} <= d.keys():
        return "curve"
    if rel is not None and rel.parts[:1] == ("checks",):
        return "check"  # free-form records of one-off checks (timings, pool checks)
    return None


def trace_problem(d: dict[str, Any]) -> str | None:
    """Why a trace record cannot be drawn (None: it can): layers x experts usage, tokens x layers x experts choices."""
    try:
        n_e, n_l, n_t = len(d["experts"]), len(d["layers"]), len(d["tokens"])
        if not n_e or not n_l or not n_t:
            return "trace: empty experts, layers or tokens"
        if len(d["usage"]) != n_l or any(len(u) != n_e for u in d["usage"]):
            return "trace: usage is not layers x experts"
        if len(d["choices"]) != n_t or any(len(c) != n_l or any(len(x) != n_e for x in c) for c in d["choices"]):
            return "trace: choices is not tokens x layers x experts"
        if not all(isinstance(v, (int, float)) for u in d["usage"] for v in u):
            return "trace: usage holds non-numbers"
    except (KeyError, TypeError):
        return "trace: missing or malformed layers/usage/choices"
    return None


def board_problem(d: dict[str, Any]) -> str | None:
    """Why a leaderboard.json cannot be shown as it is (None: it can): rows a list of objects, each with a name
    (text, unique) and a method (text); tasks a list of names; reference a name; eval, skipped objects and cells a
    text where present. A malformed one is read as unreadable: the comparison is rebuilt from plan.json and cells."""
    rows, tasks = d.get("rows"), d.get("tasks")
    if not isinstance(rows, list):
        return "rows is not a list"
    names = set()
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            return f"rows[{i}] is not an object"
        if not isinstance(r.get("name"), str) or not r["name"]:
            return f"rows[{i}] has no name"
        if not isinstance(r.get("method"), str):
            return f"rows[{i}] ({r['name'][:40]!r}) has no method"
        if r["name"] in names:
            return f"row {r['name'][:40]!r} is listed twice"
        names.add(r["name"])
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        return "tasks is not a list of task names"
    if not isinstance(d.get("reference"), str):
        return "reference is not a row name"
    for k, kind, what in (("eval", dict, "an object"), ("skipped", dict, "an object"), ("cells", str, "text"),
                          ("pool", str, "text"), ("name", str, "text")):
        if d.get(k) is not None and not isinstance(d[k], kind):
            return f"{k} is not {what}"
    return None


def _partial(d: Any, path: Path) -> str | None:
    """A record that is named like one of ours but lacks what readers need."""
    if isinstance(d, dict) and path.name.startswith("run_"):
        missing = [k for k in RUN_KEYS if k not in d]
        return f"partial run manifest: missing {', '.join(missing)}"
    if isinstance(d, dict) and path.name == "leaderboard.json":
        return "partial leaderboard: missing rows/tasks/reference"
    return None


def scan(root: str | Path) -> Catalog:
    """Read every JSON record under `root` (parsed files are cached by mtime: a re-scan reads only changes)."""
    root = Path(root)
    cat = Catalog(root=root)
    if not root.exists():
        return cat
    if not root.is_dir():
        raise WorkbenchError(f"results folder {root} is not a folder")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # staging folders of live writers
        paths += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".json") and not f.startswith(".")]
    cat.files = len(paths)
    bad_boards: dict[Path, str] = {}  # folder -> why its leaderboard.json does not count
    plans: dict[Path, dict[str, Any]] = {}  # folder -> its plan.json
    for p in paths:
        try:
            d = _parse(p)
        except OSError as e:  # removed between the walk and the read
            cat.warnings.append((cat.rel(p), f"unreadable: {e.strerror or e}"))
            continue
        if isinstance(d, ValueError):
            cat.warnings.append((cat.rel(p), str(d)))
            if p.name == "leaderboard.json":
                bad_boards[p.parent] = str(d)
            continue
        rel = p.relative_to(root)
        kind = _kind(d, p, rel)
        if kind == "plan" and p.name == "plan.json":
            plans[p.parent] = d
        if kind is None:
            cat.warnings.append((cat.rel(p), _partial(d, p) or "not a workbench record (foreign JSON)"))
            if p.name == "leaderboard.json":
                bad_boards[p.parent] = _partial(d, p) or "not a leaderboard"
        elif kind == "run":
            if not isinstance(d["scores"], dict):
                cat.warnings.append((cat.rel(p), "run manifest: scores is not a table"))
                continue
            cat.runs.append(d | {"_path": str(p)})
        elif kind == "leaderboard":
            if problem := board_problem(d):
                why = f"malformed leaderboard: {problem}"
                cat.warnings.append((cat.rel(p), why))
                if p.name == "leaderboard.json":
                    bad_boards[p.parent] = why
                continue
            name = _comparison_name(rel.parent)
            if name in cat.comparisons:
                cat.warnings.append((cat.rel(p), f"a second leaderboard named {name!r}: skipped"))
                continue
            cat.comparisons[name] = d | {"_dir": str(p.parent)}
        elif kind == "sweep":
            cat.sweeps.append(d | {"_path": str(p)})
        elif kind == "bench":
            cat.benches.append(d | {"_path": str(p)})
        elif kind == "trace":
            if problem := trace_problem(d):
                cat.warnings.append((cat.rel(p), problem))
                continue
            cat.traces.append(d | {"_path": str(p)})
        elif kind == "curve":
            cat.curves.append(d | {"_path": str(p)})
        elif kind == "check":
            cat.checks.append(d | {"_path": str(p)})
    cat.runs.sort(key=lambda r: r.get("run_id", ""))
    for folder, why in bad_boards.items():
        name = _comparison_name(folder.relative_to(root))
        plan = plans.get(folder)
        if name in cat.comparisons or plan is None or not _plan_shape(plan):
            continue
        cat.comparisons[name] = _board_of_plan(plan) | {
            "_dir": str(folder), "rebuilt": f"leaderboard.json unreadable ({why}): rebuilt from plan.json and its cells"}
        cat.warnings.append((cat.rel(folder), cat.comparisons[name]["rebuilt"]))
    warned = {w for w, _ in cat.warnings}
    for name, board in cat.comparisons.items():
        got = cat.cells[name] = cell_records.comparison_cells(Path(board["_dir"]), board, _load)
        if board.get("rebuilt"):
            board["cells"] = f"{len(got.cells)}/{got.planned}"
        if got.note:
            cat.warnings.append((cat.rel(board["_dir"]), got.note))
        for p, why in got.skipped:
            if cat.rel(p) not in warned:  # a file the walk could not read is listed once
                cat.warnings.append((cat.rel(p), f"cell not counted: {why}"))
    return cat


def _comparison_name(rel_folder: Path) -> str:
    """A comparison is named by its folder under the root (compare/demo -> demo; elsewhere its full path)."""
    return rel_folder.name if rel_folder.parent == Path("compare") else rel_folder.as_posix()


def _plan_shape(plan: dict[str, Any]) -> bool:
    """A plan.json a leaderboard can be rebuilt from: rows (each with a name), tasks (names) and a reference."""
    rows, tasks = plan.get("rows"), plan.get("tasks")
    return (isinstance(rows, list) and all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in rows)
            and isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)
            and isinstance(plan.get("reference"), str))


def _board_of_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """What the catalog keeps of a leaderboard (rows, tasks, reference, eval, pool, skipped), from its plan.json: the
    numbers come from the cells, read by `cells.comparison_cells` as always."""
    rows = [{"name": r["name"], "method": str(r.get("method") or "?"), "expert_task": r.get("expert_task")}
            for r in plan["rows"]]
    return {"name": plan.get("name"), "pool": plan.get("pool"), "tasks": list(plan["tasks"]),
            "reference": plan["reference"], "rows": rows, "eval": plan.get("eval") if isinstance(
                plan.get("eval"), dict) else {}, "skipped": plan.get("skipped") if isinstance(
                plan.get("skipped"), dict) else {}}


def _load(path: Path) -> Any:
    """`_parse` for `cells.comparison_cells`: the JSON, or raises ValueError/OSError."""
    d = _parse(path)
    if isinstance(d, ValueError):
        raise ValueError(str(d))
    return d


# ----------------------------------------------------------------------------- runs


def run_identity(run: dict[str, Any]) -> dict[str, Any]:
    """What a run measured, from its manifest: pool, model, method, parameters, commit and eval settings."""
    git = run.get("git") or {}
    commit = (git.get("commit") or "")[:7] + ("+dirty" if git.get("dirty") else "")
    return {"pool": run.get("pool"), "model": run.get("model_name"), "method": run.get("method"),
            "params": run.get("params") or {}, "commit": commit or "?", "split": run.get("split", "test"),
            "limit": run.get("limit"), "batch_size": run.get("batch_size"), "run_id": run.get("run_id"),
            "device": (run.get("machine") or {}).get("device")}


def setting_label(run: dict[str, Any]) -> str:
    """What a run measured, to tell runs of one model apart: commit, split, example limit, and for a built model
    its method and a hash of its parameters (two comparisons' rows of one name may be different models)."""
    from .io import sha256_json

    i = run_identity(run)
    label = f"{i['commit']} · {i['split']} · {'limit ' + str(i['limit']) if i['limit'] else 'all examples'}"
    key = run.get("artifact_key") or ((run.get("model_info") or {}).get("key"))
    if i["params"] or key:
        label += f" · {i['method']} {key or sha256_json(i['params'])[:8]}"
    return label


def model_settings(cat: Catalog, pool: str | None = None) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """model_name -> setting label -> its runs, newest first. A model's runs at one setting together cover its
    tasks (a comparison evaluates one task per run); settings are listed newest first."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in cat.runs:
        if pool is None or r.get("pool") == pool:
            out.setdefault(r["model_name"], {}).setdefault(setting_label(r), []).append(r)
    res = {}
    for m in sorted(out):
        by = {k: sorted(v, key=lambda r: r.get("run_id", ""), reverse=True) for k, v in out[m].items()}
        res[m] = dict(sorted(by.items(), key=lambda kv: kv[1][0].get("run_id", ""), reverse=True))
    return res


def setting_extent(runs: list[dict[str, Any]]) -> tuple[int, bool, float]:
    """How complete a setting's runs are: (tasks they scored, on the test split, examples per task: its limit, a
    whole split counting as unbounded)."""
    tasks = {t for r in runs for t, m in (r.get("scores") or {}).items() if isinstance(m, dict)}
    limit = runs[0].get("limit") if runs else None
    per_task = float(limit) if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit else math.inf
    return len(tasks), (runs[0].get("split", "test") if runs else "test") == "test", per_task


def default_setting(settings: dict[str, list[dict[str, Any]]]) -> str:
    """The setting a row shows unless the user picks another: the most complete one (`setting_extent`: the most tasks,
    then the test split, then the most examples per task), the newest among equals. A partial run (one task of six,
    a limit of 2) is never shown by default over a complete one, so a pair reads the same in every source that has
    the complete runs."""
    labels = list(settings)  # newest first
    return max(labels, key=lambda k: (*setting_extent(settings[k]), -labels.index(k)))


def display_name(run: dict[str, Any]) -> str:
    """A run's row name: its model (a folder-path model shows as the run's name after the pool prefix)."""
    m = str(run.get("model", ""))
    pool = run.get("pool")
    name = run["model_name"]
    if "/" not in m and m:
        return m
    return name[len(pool) + 2:] if pool and name.startswith(f"{pool}__") else name


def comparison_cells(cat: Catalog, name: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(row, task) -> cell record of a comparison: the cells its plan.json expects, with the expected keys
    (`cells.comparison_cells`, read by `scan`); the files under cells/ that do not count are in `cat.warnings`."""
    if name not in cat.cells:
        board = cat.comparisons[name]
        cat.cells[name] = cell_records.comparison_cells(Path(board["_dir"]), board, _load)
    return cat.cells[name].cells


# ----------------------------------------------------------------------------- one source of rows x tasks


@dataclass
class Source:
    """The rows x tasks a leaderboard, chart or pairwise view reads: a comparison, or a set of lm-eval runs.

    `cells[(row, task)]` is a cell record (`metrics.cell_fields`: metric, higher_is_better, aggregate, score and the
    per-example `values` with their `doc_ids`, `weights` for perplexity-like metrics; a comparison's also `run`);
    `runs[(row, task)]` is that manifest, for per-sample answers."""

    kind: str  # comparison | runs
    name: str
    rows: list[dict[str, Any]]
    cells: dict[tuple[str, str], dict[str, Any]]
    tasks: list[str]
    reference: str
    runs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    shown: dict[str, str] = field(default_factory=dict)  # row -> which run/settings it shows
    skipped: list[tuple[str, str]] = field(default_factory=list)  # cells that do not count: (path, why)
    planned: int | None = None  # cells a comparison's plan expects (None: loose runs)
    recorded: str | None = None  # the cell count its leaderboard.json states ("90/90"), when it has one

    def facts(self, name: str) -> dict[str, Any]:
        """What row `name` is made of: tasks it scored, examples (the sum of its cells' n), and the commits, limits
        and splits of the lm-eval runs behind its cells (`dirty`: one was run from a tree with uncommitted changes)."""
        from .eval.metrics import view

        tasks, examples = [], 0
        for t in self.tasks:
            c = self.cells.get((name, t))
            if c is None:
                continue
            tasks.append(t)
            try:
                examples += int(view(c).n or 0)
            except (TypeError, ValueError, AttributeError):
                pass
        runs = [self.runs[(name, t)] for t in tasks if (name, t) in self.runs]
        ids = [run_identity(r) for r in runs]
        return {"tasks": tasks, "examples": examples, "commits": sorted({i["commit"] for i in ids}),
                "dirty": any((r.get("git") or {}).get("dirty") for r in runs),
                "limits": sorted({str(i["limit"]) if i["limit"] else "all" for i in ids}),
                "splits": sorted({str(i["split"]) for i in ids})}

    def pooled(self, a: str, b: str, level: float = 0.95) -> dict[str, Any] | None:
        """The paired test of rows a and b pooled over every example both scored on the accuracy-like (0/1),
        higher-is-better tasks both scored with one metric (`stats.pooled_test`: McNemar, and a `level` bootstrap
        interval for the difference a − b); `tasks` the tasks pooled and `left_out` the others (other metrics cannot
        be pooled with them). None when they share no such example."""
        from .eval import stats
        from .eval.leaderboard import pair_cells, paired_values

        xs: list[float] = []
        ys: list[float] = []
        used, left = [], []
        for t in self.tasks:
            ca, cb = self.cells.get((a, t)), self.cells.get((b, t))
            if not ca or not cb:
                continue
            try:
                got = pair_cells(ca, cb)
            except (TypeError, ValueError, AttributeError):
                got = None
            if got is None or got["kind"] != "accuracy" or not got["higher_is_better"]:
                left.append(t)
                continue
            x, y = paired_values(ca, cb)
            xs += x
            ys += y
            used.append(t)
        if not xs:
            return None
        return stats.pooled_test(xs, ys, level) | {"tasks": used, "left_out": left}

    def examples(self, task: str, rows: list[str] | None = None) -> list[dict[str, Any]]:
        """Every example of `task` with each row's answer and score: doc_id, question, target, and per row
        `<row>` (its per-example value from its cell: what the leaderboard counts) and `<row> answer` (the response
        in its lm-eval per-sample output, None when not kept). Rows whose run kept no samples still give their values;
        question and target come from the first row that kept samples. Sorted by doc_id."""
        from .eval import metrics
        from .eval.record import read_samples
        from .eval.results import run_filter

        names = rows if rows is not None else [r["name"] for r in self.rows]
        docs: dict[Any, dict[str, Any]] = {}
        for n in names:
            cell = self.cells.get((n, task))
            if not cell:
                continue
            for d, v in zip(cell.get("doc_ids") or [], cell.get("values") or []):
                docs.setdefault(d, {"doc_id": d, "question": None, "target": None})[n] = v
            run = self.runs.get((n, task))
            if run is None:
                continue
            try:
                samples = [x for x in read_samples(run) if isinstance(x, dict) and x.get("task") == task]
            except (OSError, ValueError, KeyError, EOFError, zlib.error, RecursionError, MemoryError, WorkbenchError):
                continue
            for x in metrics.filter_rows(samples, run_filter(run, task, _run_results(run) or {}, samples)):
                if x.get("doc_id") not in docs:
                    continue
                rec = docs[x["doc_id"]]
                rec[f"{n} answer"] = x.get("response")
                for k in ("question", "target"):
                    if rec[k] is None and x.get(k) is not None:
                        rec[k] = x[k]
        try:
            return sorted(docs.values(), key=lambda r: r["doc_id"])
        except TypeError:  # doc ids of mixed types
            return list(docs.values())

    def board(self, reference: str | None = None) -> dict[str, Any]:
        from .eval.leaderboard import build_leaderboard

        ref = reference if reference in {r["name"] for r in self.rows} else self.reference
        return build_leaderboard(self.rows, self.cells, self.tasks, ref) | {"source": self.kind, "name": self.name}

    def pairwise(self, a: str, b: str) -> list[dict[str, Any]]:
        """Per task both rows scored with the same metric: `leaderboard.pair_cells` on the shared examples (n, a, b,
        diff a − b in the metric's units, gain (+ = a better), p_value, test; metric, higher_is_better and kind: the
        exact McNemar test for 0/1 metrics, a paired bootstrap over examples for continuous ones and over documents
        for perplexity-like ones). Tasks without per-example values on either side are left out."""
        from .eval.leaderboard import pair_cells

        out = []
        for t in self.tasks:
            ca, cb = self.cells.get((a, t)), self.cells.get((b, t))
            if not ca or not cb:
                continue
            try:
                got = pair_cells(ca, cb)
            except (TypeError, ValueError, AttributeError):  # a malformed cell: no test, never a broken view
                got = None
            if got is not None:
                out.append({"task": t, **got})
        return out

    def disagreements(self, a: str, b: str, task: str) -> list[dict[str, Any]]:
        """The examples of `task` where rows a and b score differently: prompt, target and both answers."""
        from .eval.results import paired_samples

        ra, rb = self.runs.get((a, task)), self.runs.get((b, task))
        if ra is None or rb is None:
            return []
        try:
            df = paired_samples(ra, rb, task)
        except (OSError, ValueError, KeyError, EOFError, zlib.error, RecursionError, MemoryError, WorkbenchError) as e:
            raise WorkbenchError(f"per-sample outputs of {a!r} or {b!r} on {task} unreadable: {e}") from None
        return df[df.value_a != df.value_b].to_dict("records")


def comparison_source(cat: Catalog, name: str) -> Source:
    board = cat.comparisons[name]
    folder = Path(board["_dir"])
    cells = comparison_cells(cat, name)
    rows = [{"name": r["name"], "method": r["method"], "expert_task": r.get("expert_task")} for r in board["rows"]]
    runs = {}
    for key, cell in cells.items():
        if cell.get("run"):  # inside the comparison's folder: `cells.cell_problem` refused any other
            p = folder / cell["run"]
            try:
                d = _parse(p)
            except OSError:
                continue
            if isinstance(d, dict) and _kind(d, p) == "run":
                runs[key] = d | {"_path": str(p)}
    ev = board.get("eval") or {}
    setting = f"{ev.get('split', 'test')} · {'limit ' + str(ev['limit']) if ev.get('limit') else 'all examples'}"
    got = cat.cells.get(name)
    recorded = board.get("cells") if isinstance(board.get("cells"), str) and not board.get("rebuilt") else None
    return Source("comparison", name, rows, cells, list(board["tasks"]), board["reference"], runs,
                  {r["name"]: setting for r in rows},
                  skipped=[(cat.rel(p), why) for p, why in (got.skipped if got else [])],
                  planned=got.planned if got else None, recorded=recorded)


def _run_results(run: dict[str, Any]) -> dict[str, Any] | None:
    """A run's lm-eval results JSON (`results_<run_id>.json` beside its manifest), through the parse cache: the
    metric list and directions of its tasks. None when absent or unreadable."""
    if not run.get("_path") or not run.get("run_id"):
        return None
    p = Path(run["_path"]).with_name(f"results_{run['run_id']}.json")
    try:
        d = _parse(p)
    except OSError:
        return None
    return d if isinstance(d, dict) else None


def run_cell(run: dict[str, Any], task: str, samples: list[dict[str, Any]],
             results: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """One task of a loose lm-eval run as a cell, as a comparison writes it (`metrics.cell_fields`): the task's
    primary metric and direction (`results.run_metric`: the metric_list of its lm-eval results JSON, else the first
    metric its samples or manifest name) of its one lm-eval filter (`results.run_filter`: the first of its
    filter_list), lm-eval's score of that filter, and the per-example values of `samples` of that filter (the run's
    rows of this task; none: the score alone, no error bar or paired test). None when the run scored no number."""
    from .eval import metrics
    from .eval.results import run_filter, run_metric

    scores = run["scores"].get(task)
    if not isinstance(scores, dict):
        return None
    try:
        rows = sorted(samples, key=lambda s: s.get("doc_id"))  # doc_id order, as a comparison's cells
    except TypeError:  # doc ids of mixed types: the file's order (pairs are matched by doc_id anyway)
        rows = list(samples)
    results = results if results is not None else (_run_results(run) or {})
    flt = run_filter(run, task, results, rows)
    rows = metrics.filter_rows(rows, flt)
    names = [m for m in (rows[0].get("metrics") or {})] if rows else None
    spec = run_metric(run, task, results, names)
    if spec is None:
        return None
    # lm-eval's score of that filter (a manifest written before `filters` was recorded may hold another filter's)
    score = (metrics.task_scores(results, task, flt) or {}).get(spec.name, scores.get(spec.name))
    fields = metrics.cell_fields(rows, spec, score, flt)
    if fields["score"] is None and not fields["values"]:
        return None  # nothing to show: no score and no per-example numbers
    return fields


def runs_source(cat: Catalog, pool: str | None = None, picks: dict[str, str] | None = None,
                reference: str | None = None, only: set[str] | None = None) -> Source:
    """One row per model of `pool` at one setting (`default_setting`, or the label `picks[model_name]` chose):
    per task, the newest run at that setting that scored it, as a cell of its primary metric (`run_cell`: any
    metric lm-eval reports, in its direction; perplexities with their per-document weights). Tasks: the suite's in
    its order, then every other task a run scored."""
    from .eval.record import read_samples
    from .tasks.suite import DOMAINS, TASKS

    rows, cells, runs, shown = [], {}, {}, {}
    for model_name, settings in model_settings(cat, pool).items():
        label = (picks or {}).get(model_name)
        label = label if label in settings else default_setting(settings)
        chosen = settings[label]
        name = display_name(chosen[0]) if pool else model_name
        if only is not None and name not in only:
            continue
        info = chosen[0].get("model_info") or {}
        rows.append({"name": name, "method": chosen[0].get("method") or "?",
                     "expert_task": (info.get("tags") or {}).get("task") if chosen[0].get("method") == "expert-lora"
                     else None})
        shown[name] = label + (f" (1 of {len(settings)} settings)" if len(settings) > 1 else "")
        for run in chosen:  # newest first: a task's newest run wins
            fresh = [t for t, m in run["scores"].items() if isinstance(m, dict) and (name, t) not in cells]
            if not fresh:
                continue
            try:
                samples = read_samples(run)
            except (OSError, ValueError, KeyError, EOFError, zlib.error, RecursionError, MemoryError, WorkbenchError):
                samples = []  # the scores stay; no error bars or paired tests for this run
            by_task: dict[str, list[dict[str, Any]]] = {}
            for smp in samples:
                if isinstance(smp, dict) and smp.get("task") in fresh and isinstance(smp.get("metrics"), dict):
                    by_task.setdefault(smp["task"], []).append(smp)
            results = _run_results(run) or {}
            for task in fresh:
                cell = run_cell(run, task, by_task.get(task, []), results)
                if cell is None:
                    continue
                cells[(name, task)] = cell
                runs[(name, task)] = run
    scored = {k[1] for k in cells}
    tasks = [t for t in [*TASKS, *DOMAINS] if t in scored]
    tasks += sorted(t for t in scored if t not in tasks)  # the user's own tasks, after the suite's
    names = [r["name"] for r in rows]
    ref = reference if reference in names else ("multitask" if "multitask" in names else names[0] if names else "")
    return Source("runs", pool or "all pools", rows, cells, tasks, ref, runs, shown)


def _differences(fa: dict[str, Any], fb: dict[str, Any]) -> list[str]:
    """What differs between one row's facts in two sources (`Source.facts`), as phrases."""
    out = []
    if set(fa["tasks"]) != set(fb["tasks"]):
        out.append(f"tasks ({len(fa['tasks'])} vs {len(fb['tasks'])})")
    if fa["examples"] != fb["examples"]:
        out.append(f"examples ({fa['examples']} vs {fb['examples']})")
    for k, what in (("limits", "limit"), ("splits", "split"), ("commits", "commit")):
        if fa[k] and fb[k] and fa[k] != fb[k]:
            out.append(f"{what} ({', '.join(fa[k])} vs {', '.join(fb[k])})")
    return out


def source_label(src: Source) -> str:
    return f"{src.kind if src.kind == 'comparison' else 'runs'}: {src.name}"


def other_readings(cat: Catalog, src: Source, a: str, b: str) -> list[dict[str, Any]]:
    """The same pair (rows a and b) in the other sources of the results folder that have both rows: each comparison
    (of the source's pool, for loose runs) and the loose runs of a comparison's pool. For each where the pooled test
    (`Source.pooled`) reads differently: its label, both pooled tests, and `why`: what differs in each row (tasks,
    examples, limit, split, commit: `Source.facts`), or that the same runs read differently."""
    here = src.pooled(a, b)
    others: list[Source] = []
    if src.kind == "runs":
        for name, board in sorted(cat.comparisons.items()):
            names = {r.get("name") for r in board.get("rows") or [] if isinstance(r, dict)}
            if {a, b} <= names and board.get("pool") == src.name:
                others.append(comparison_source(cat, name))
    else:
        pool = cat.comparisons[src.name].get("pool")
        if pool and any(r.get("pool") == pool for r in cat.runs):
            others.append(runs_source(cat, pool, only={a, b}))
    out = []
    for o in others:
        if not {a, b} <= {r["name"] for r in o.rows}:
            continue
        there = o.pooled(a, b)
        if here is None and there is None:
            continue
        same = (here is not None and there is not None and here["n"] == there["n"]
                and math.isclose(here["diff"], there["diff"], abs_tol=1e-12))
        if same:
            continue
        why = []
        for row in (a, b):
            d = _differences(src.facts(row), o.facts(row))
            if d:
                why.append(f"{row}: {', '.join(d)}")
        out.append({"source": source_label(o), "here": here, "there": there,
                    "why": why or ["the same tasks and settings: the runs behind the rows differ (rerun or rebuilt)"]})
    return out


# ----------------------------------------------------------------------------- benchmarks


RATIO_HINTS = ("_x_", "_vs_", "_over_", "speedup")
NOT_RATIOS = ("max_abs_diff", "abs_diff")


def _label(row: Any, i: int) -> str:
    """A list row's name: its short identifying fields (`projection=q_proj`, `rank=8 U=32`), else its index."""
    if isinstance(row, dict):
        ids = [f"{k}={v}" for k, v in row.items() if isinstance(v, (str, int)) and not isinstance(v, bool)
               and len(str(v)) < 24][:3]
        if ids:
            return " ".join(ids)
    return str(i)


def bench_ratios(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ratio a benchmark record reports against a peer measured in the same run: (name, value, target).

    Ratios are the numbers under a `ratios` or `x_base` table, or keys naming one (`a_x_b`, `a_vs_b`, `speedup`).
    Medians are kept beside the means they qualify; raw timings are not ratios."""
    out: list[dict[str, Any]] = []
    targets = rec.get("targets") if isinstance(rec.get("targets"), dict) else {}

    def walk(x: Any, path: list[str], table: bool) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, [*path, str(k)], table or k in ("ratios", "x_base"))
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, [*path, _label(v, i)], table)
        elif isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
            leaf = path[-1] if path else ""
            if ((table or any(h in leaf for h in RATIO_HINTS)) and not leaf.endswith("_s")
                    and not leaf.startswith(NOT_RATIOS)):
                parts = [p for p in path if p not in ("rows", "ratios")]
                out.append({"name": ".".join(parts), "group": " ".join(parts[:-1]) or rec.get("benchmark", ""),
                            "ratio": parts[-1], "value": float(x), "target": targets.get(leaf)})

    walk({k: v for k, v in rec.items() if k not in ("targets", "machine", "git", "_path")}, [], False)
    names = {r["name"] for r in out}  # a median beside its mean adds a bar, not information
    return [r for r in out if not (r["name"].endswith("_median") and r["name"][: -len("_median")] in names)]


def machine_line(rec: dict[str, Any]) -> str:
    m = rec.get("machine") or {}
    git = rec.get("git") or {}
    bits = [m.get("device"), f"{m.get('cpus')} CPUs" if m.get("cpus") else None, m.get("gpu"), m.get("torch"),
            f"commit {(git.get('commit') or '')[:7]}" if git.get("commit") else None, rec.get("date")]
    return ", ".join(str(b) for b in bits if b)


__all__ = ["Catalog", "Source", "bench_ratios", "comparison_cells", "comparison_source", "default_setting",
           "display_name", "machine_line", "model_settings", "other_readings", "run_cell", "run_identity",
           "runs_source", "scan", "setting_extent", "setting_label", "source_label"]
