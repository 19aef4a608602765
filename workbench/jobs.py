"""Jobs: the library code behind `workbench compare`, `workbench demo` and `workbench eval matrix`, shared by the
CLI, the app and Ray workers.

A comparison runs as cells. Build cells (one per artifact row) build each artifact once, cached by the hash
of its inputs (`recipes.build`, locked per key: two workers never build or delete the same folder), after
the recipe's validation sweep when it has one. Eval cells (row, task) evaluate with lm-eval, write the
usual lm-eval outputs and run manifests under `<results>/compare/<name>/lm-eval/`, then the cell record
`cells/<row>/<task>.json`: written atomically, last, and keyed by everything the result depends on. A rerun
skips every cell whose record has its key, so a run killed at any point (SIGKILL included) loses at most the
cell in flight, and the leaderboard is made from the plan and the cell records alone, never by scanning
outputs that a killed run may have left behind.

Executors: `local` (this process, one model loaded at a time) and `ray` (build cells, then one task per row
evaluating that row's cells, with declared CPUs/GPUs; `ray.init()` locally or `--address` of a cluster,
whose workers must see the same results folder, pools and cache, e.g. a shared filesystem).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .comparison import Comparison, Row, cell_key, comparison_dir, default_results_dir, parse_comparison
from .errors import WorkbenchError
from .faults import fault_point
from .io import atomic_write_json, atomic_write_text, file_lock, lock_for, sha256_json

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- plan


@dataclass
class Plan:
    comparison: Comparison
    out: Path  # <results>/compare/<name>
    results_dir: Path
    device: str = "cpu"  # part of every cell's key

    @property
    def builds(self) -> list[Row]:
        return [r for r in self.comparison.active_rows if r.kind == "artifact"]

    @property
    def evals(self) -> list[tuple[Row, str]]:
        return [(r, t) for r in self.comparison.active_rows for t in r.tasks]

    @property
    def skipped(self) -> list[Row]:
        return [r for r in self.comparison.rows if r.skip is not None]

    def build_path(self, row: Row) -> Path:
        return self.out / "builds" / f"{row.name}.json"

    def cell_path(self, row: Row, task: str) -> Path:
        return self.out / "cells" / row.name / f"{task}.json"


def make_plan(comparison: Comparison, results_dir: Path | None = None, device: str = "cpu") -> Plan:
    results_dir = Path(results_dir or default_results_dir())
    return Plan(comparison, comparison_dir(results_dir, comparison.spec.name), results_dir, device)


def _read(path: Path) -> dict[str, Any] | None:
    """A build or cell record (a JSON object, read with the size and depth bounds of `cells.load_json`), or None."""
    from .cells import read_record

    return read_record(path)


def build_key(row: Row) -> str:
    return sha256_json(row.identity())[:16]


def row_key_body(row: Row) -> dict[str, Any]:
    """What the row's build key hashes, spelled out (recorded with the build, so that `--dry-run` can name what
    changed): the recipe's key body, and the sweep grid of a swept row."""
    body = dict(row.recipe.key_body) if row.recipe is not None else row.identity()
    if row.sweep and row.recipe is not None and row.recipe.recipe.sweep:
        body["sweep"] = row.recipe.recipe.sweep.model_dump(mode="json")
    return body


def changed_inputs(old: Any, new: Any, prefix: str = "", depth: int = 3) -> list[str]:
    """The paths (a.b.c) where two key bodies differ, down to `depth` levels."""
    if isinstance(old, dict) and isinstance(new, dict) and depth > 0:
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += changed_inputs(old.get(k), new.get(k), f"{prefix}{k}.", depth - 1)
        return out
    return [prefix.rstrip(".") or "(all)"] if old != new else []


def why_rebuild(plan: Plan, row: Row) -> str:
    """For a build to do: what changed since the recorded build (its key body against this one), or why it runs."""
    rec = _read(plan.build_path(row))
    if rec is None:
        return "never built"
    if rec.get("key") == build_key(row):
        return "its artifact left the cache"
    old = rec.get("key_body")
    if not isinstance(old, dict):
        return "key changed; its record predates recorded key inputs"
    from .eval.record import scrub

    diff = changed_inputs(old, scrub(row_key_body(row)))
    return f"changed: {', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}" if diff else "the key changed"


def _artifact_folder(rec: dict[str, Any]) -> Path:
    from .io import artifacts_dir

    return artifacts_dir() / Path(rec["artifact"]).name


def build_record(plan: Plan, row: Row) -> dict[str, Any] | None:
    """The row's build record when it is current (its artifact may since have left the cache)."""
    rec = _read(plan.build_path(row))
    return rec if rec and rec.get("key") == build_key(row) else None


def build_done(plan: Plan, row: Row) -> dict[str, Any] | None:
    """The row's build record when it is current and its artifact is in the cache (loadable)."""
    from .artifacts import ARTIFACT_FILE

    rec = build_record(plan, row)
    return rec if rec and (_artifact_folder(rec) / ARTIFACT_FILE).is_file() else None


def needs_build(plan: Plan, row: Row) -> bool:
    """No current build record, or its artifact left the cache while some of the row's cells still need it."""
    if build_record(plan, row) is None:
        return True
    return build_done(plan, row) is None and any(cell_done(plan, row, t) is None for t in row.tasks)


def model_key(plan: Plan, row: Row) -> dict[str, Any] | None:
    """What determines the row's model: its identity, or for a built row the artifact key its build chose
    (None while a sweep row is not built: its model is not known yet)."""
    if row.kind != "artifact":
        return row.identity()
    rec = build_record(plan, row)
    return {"artifact": rec["model_key"]} if rec else None


def expected_key(plan: Plan, row: Row, task: str) -> str | None:
    """The key the plan expects of the (row, task) cell (None while the row's model is not known: not built)."""
    mk = model_key(plan, row)
    return None if mk is None else cell_key(plan.comparison, mk, task, plan.device)


def cell_done(plan: Plan, row: Row, task: str) -> dict[str, Any] | None:
    """The (row, task) cell record when it counts (`cells.read_cell`: the plan's key, its place, its shape, a run
    path inside the comparison's folder), else None."""
    from .cells import read_cell

    key = expected_key(plan, row, task)
    if key is None:
        return None
    rec, _ = read_cell(plan.out, row.name, task, key)
    return rec


def describe(plan: Plan) -> list[str]:
    """The plan as lines (`--dry-run`): each build and eval cell with its state, and the skipped rows."""
    c = plan.comparison
    lines = [f"comparison {c.spec.name}: pool {c.pool.name}, {len(c.active_rows)} rows x {len(c.tasks)} tasks, "
             f"split {c.spec.eval.split}, limit {c.spec.eval.limit or 'all'}; reference row {c.reference}"]
    for r in plan.skipped:
        lines.append(f"  skip  {r.name}: {r.skip}")
    for r in plan.builds:
        state = f"todo ({why_rebuild(plan, r)})" if needs_build(plan, r) else "done"
        sweep = f", validation sweep of {len(_sweep_points(r))} points" if r.sweep else ""
        lines.append(f"  build {r.name} ({r.method}{sweep}): {state}")
    done = sum(1 for r, t in plan.evals if cell_done(plan, r, t))
    lines.append(f"  eval  {len(plan.evals)} cells ({done} done, {len(plan.evals) - done} to run)")
    for r in c.active_rows:
        todo = [t for t in r.tasks if not cell_done(plan, r, t)]
        lines.append(f"    {r.name}: {len(r.tasks) - len(todo)}/{len(r.tasks)} done")
    return lines


def _sweep_points(row: Row) -> list[dict[str, Any]]:
    from .recipes import sweep_points

    return sweep_points(row.recipe.recipe.sweep) if row.sweep else []


# ----------------------------------------------------------------------------- cells


def run_build(plan: Plan, row: Row, *, device: str = "cpu", log: Log = print) -> dict[str, Any]:
    """Build the row's artifact (after its validation sweep) unless a current build record says it is done."""
    from .artifacts import artifact_ref, read_artifact_meta
    from .eval.record import scrub
    from .recipes import build, check_expert_files, run_sweep

    if not needs_build(plan, row):
        return build_record(plan, row)
    resolved, selection = row.recipe, None
    check_expert_files(resolved.experts)
    if row.sweep:
        resolved, selection = run_sweep(resolved, device=device, results_dir=plan.out, log=log)
    t0 = time.perf_counter()
    artifact = build(resolved, device=device, log=log)
    meta = read_artifact_meta(artifact)
    rec = {"key": build_key(row), "row": row.name, "method": row.method, "artifact": artifact_ref(artifact),
           "model_key": resolved.key, "key_body": scrub(row_key_body(row)),
           "params": resolved.params.model_dump(mode="json", by_alias=True),
           "selection": selection, "build_s": round(time.perf_counter() - t0, 2),
           "report": {k: meta[k] for k in resolved.method.report if meta.get(k) is not None}}
    atomic_write_json(plan.build_path(row), rec)
    return rec


def _load_row(plan: Plan, row: Row, device: str):
    from .eval.harness import load_model_spec

    if row.kind != "artifact":
        return load_model_spec(row.expert or "base", plan.comparison.pool, device)
    from .artifacts import load_artifact
    from .io import artifacts_dir

    rec = build_done(plan, row)
    if rec is None:
        raise WorkbenchError(f"row {row.name!r} is not built yet (its build cell runs first)")
    loaded = load_artifact(artifacts_dir() / Path(rec["artifact"]).name,
                           device=device)
    loaded.name = row.name
    loaded.info.update(method=row.method, artifact=rec["artifact"])
    return loaded


def run_row(plan: Plan, row: Row, *, device: str = "cpu", log: Log = print,
            on_cell: Callable[[Row, str, dict | None], None] | None = None) -> list[dict[str, Any]]:
    """Evaluate the row's cells that are not done (the model is loaded once, only if one is missing); returns the
    records written. `on_cell(row, task, None)` as a cell starts, `on_cell(row, task, record)` once written."""
    from .cells import read_record
    from .eval import run_eval
    from .eval.metrics import cell_fields, filter_rows, primary_filter, primary_metric
    from .eval.metrics import describe as describe_cell
    from .eval.record import read_samples

    c = plan.comparison
    spec = c.spec.eval
    mk = model_key(plan, row)
    if mk is None:
        raise WorkbenchError(f"row {row.name!r} is not built yet (its build cell runs first)")
    if row.kind == "expert" and any(cell_done(plan, row, t) is None for t in row.tasks):
        from .recipes import check_expert_files

        check_expert_files([c.pool.expert(row.expert)])  # the key trusts the manifest's hashes: check the files
    loaded, out = None, []
    for task in row.tasks:
        if cell_done(plan, row, task):
            continue
        if on_cell:
            on_cell(row, task, None)  # starting
        if loaded is None:
            loaded = _load_row(plan, row, device)
        t0 = time.perf_counter()
        lm_dir = plan.out / "lm-eval"
        build = build_done(plan, row) if row.kind == "artifact" else None
        extra = {"comparison": c.spec.name, "row": row.name}
        if build:
            extra |= {"params": build["params"], "artifact_key": build["model_key"],
                      "selected_on_validation": build["selection"]}
        m = run_eval(loaded.name if row.kind == "artifact" else (row.expert or "base"), [c.task_ref(task)], pool=c.pool,
                     limit=spec.limit, batch_size=spec.batch_size, split=spec.split, device=device,
                     apply_chat_template=spec.apply_chat_template,
                     results_dir=lm_dir, loaded=loaded, extra=extra)
        run_path = lm_dir / Path(m["results_file"]).parent.name / f"run_{m['run_id']}.json"
        samples = sorted((s for s in read_samples(run_path) if s["task"] == task), key=lambda s: s["doc_id"])
        # the task's primary metric and its direction, as lm-eval reports them (its results JSON, beside the run), of
        # its one filter (the manifest's `filters`: the first of its filter_list; its scores are of that filter)
        results = read_record(lm_dir.parent / m["results_file"])
        flt = (m.get("filters") or {}).get(task) or primary_filter(task, results, [s.get("filter") for s in samples])
        samples = filter_rows(samples, flt)
        scores = m["scores"].get(task) or {}
        metric = primary_metric(task, results, list(samples[0]["metrics"]) if samples else None, scores)
        if metric is None:
            raise WorkbenchError(f"{row.name} x {task}: lm-eval reported no metric for the task")
        fields = cell_fields(samples, metric, scores.get(metric.name), flt)
        fault_point("eval")
        rec = {"key": cell_key(c, mk, task, plan.device), "row": row.name, "task": task, **fields,
               "run": Path(run_path).relative_to(plan.out).as_posix(), "eval_s": round(time.perf_counter() - t0, 2)}
        atomic_write_json(plan.cell_path(row, task), rec)
        out.append(rec)
        if on_cell:
            on_cell(row, task, rec)
        else:
            log(f"{row.name} x {task}: {describe_cell(fields)} ({rec['eval_s']:.0f}s)")
    return out


# ----------------------------------------------------------------------------- executors


@dataclass
class Progress:
    """Counts for the whole job; the CLI draws them with rich, the app with its own widgets.

    `total`/`done` count cells (builds and evaluations); `reused` of them were already recorded when the run
    started. `cost_total`/`cost_done` weigh the work still to do by its expected seconds (`expected_costs`), so a
    bar drawn from them moves with time, not with cell counts (a build can cost a hundred evaluations)."""

    total: int
    done: int = 0
    current: str = ""
    events: list[str] = field(default_factory=list)
    reused: int = 0
    cost_total: float = 0.0
    cost_done: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @property
    def eta_s(self) -> float | None:
        """Seconds left: the expected cost of what remains, scaled by how long the finished work took against its
        expectation (None before anything finished)."""
        if self.cost_done <= 0:
            return None
        rate = (time.monotonic() - self.started) / self.cost_done
        return max(0.0, (self.cost_total - self.cost_done) * rate)


# Expected seconds on this project's 2-core CPU when no earlier run of a row recorded its time.
_BUILD_S = {"trains": 300.0, "merges": 30.0}
_EVAL_LOAD_S, _EVAL_PER_EXAMPLE_S = 5.0, 0.3


def expected_costs(plan: Plan) -> dict[str, float]:
    """Expected seconds of every build ('build:<row>') and evaluation cell ('eval:<row>:<task>'): the time an
    earlier run of the same row recorded (a build record's `build_s`, a cell's `eval_s`, whatever its key), else a
    default by kind (methods that train vs merges; examples x a per-example time)."""
    costs: dict[str, float] = {}
    for row in plan.builds:
        rec = _read(plan.build_path(row)) or {}
        if isinstance(rec.get("build_s"), (int, float)):
            costs[f"build:{row.name}"] = float(rec["build_s"])
            continue
        trains = hasattr(row.recipe.params, "steps") if row.recipe is not None else False
        points = len(_sweep_points(row)) if row.sweep else 0
        costs[f"build:{row.name}"] = _BUILD_S["trains" if trains else "merges"] * (1 + points)
    limit = plan.comparison.spec.eval.limit or 100
    for row, task in plan.evals:
        rec = _read(plan.cell_path(row, task)) or {}
        costs[f"eval:{row.name}:{task}"] = float(rec["eval_s"]) if isinstance(rec.get("eval_s"), (int, float)) \
            else _EVAL_LOAD_S + _EVAL_PER_EXAMPLE_S * limit
    return costs


def _local(plan: Plan, device: str, log: Log, tick: Callable[..., None]) -> None:
    for row in plan.builds:
        if needs_build(plan, row):
            tick(f"build {row.name}")
            run_build(plan, row, device=device, log=log)
            tick(None, item=f"build:{row.name}")
        else:
            tick(None)
    for row in plan.comparison.active_rows:
        for task in row.tasks:
            if cell_done(plan, row, task):
                tick(None)
        run_row(plan, row, device=device, log=log,
                on_cell=lambda r, t, rec: tick(f"{r.name} x {t}") if rec is None
                else tick(None, f"{r.name} x {t}", rec, item=f"eval:{r.name}:{t}"))


def _worker_env() -> dict[str, str]:
    keep = ("WORKBENCH_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "XDG_CACHE_HOME", "TRITON_")
    return {k: v for k, v in os.environ.items() if k.startswith(keep)}


def _ray_setup(payload: dict[str, Any], cwd: str, env: dict[str, str]) -> Plan:
    os.environ.update(env)
    if Path(cwd).is_dir():
        os.chdir(cwd)
    # the pool as the comparison names it, resolved as the driver resolves it (same working folder and
    # $WORKBENCH_POOLS): rows, keys and records are then the driver's
    c = parse_comparison(payload["spec"], payload["source"], folder=Path(payload["folder"]),
                         recipe_bodies=payload["recipe_bodies"])
    return make_plan(c, Path(payload["results_dir"]), payload["device"])


def _ray_build(payload, row_name, cwd, env, device):
    plan = _ray_setup(payload, cwd, env)
    return run_build(plan, plan.comparison.row(row_name), device=device, log=lambda m: None)


def _ray_row(payload, row_name, cwd, env, device):
    plan = _ray_setup(payload, cwd, env)
    return run_row(plan, plan.comparison.row(row_name), device=device, log=lambda m: None)


def _ray(plan: Plan, device: str, log: Log, tick, address: str | None, cpus: float, gpus: float) -> None:
    import ray

    payload = {**plan.comparison.to_payload(), "results_dir": str(plan.results_dir.resolve()), "device": plan.device}
    cwd, env = os.getcwd(), _worker_env()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": env} if env else None)
    try:
        opts = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": 0}
        build_fn, row_fn = ray.remote(**opts)(_ray_build), ray.remote(**opts)(_ray_row)
        pending = {}
        for row in plan.builds:
            if not needs_build(plan, row):
                tick(None)
            else:
                pending[build_fn.remote(payload, row.name, cwd, env, device)] = row
        _drain(ray, pending, lambda row, rec: tick(None, f"build {row.name}", item=f"build:{row.name}"))
        pending = {}
        for row in plan.comparison.active_rows:
            for task in row.tasks:
                if cell_done(plan, row, task):
                    tick(None)
            if any(not cell_done(plan, row, t) for t in row.tasks):
                pending[row_fn.remote(payload, row.name, cwd, env, device)] = row
        _drain(ray, pending, lambda row, recs: [tick(None, f"{row.name} x {r['task']}", r, item=f"eval:{row.name}:{r['task']}")
                                                for r in recs])
    finally:
        if started:
            ray.shutdown()


def _drain(ray, pending: dict, done_fn) -> None:
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            row = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
                raise WorkbenchError(f"row {row.name!r} failed on a Ray worker: {str(cause).splitlines()[0]}") from None
            done_fn(row, result)


def run_comparison(comparison: Comparison, *, results_dir: Path | None = None, executor: str = "local",
                   device: str = "cpu", address: str | None = None, cpus: float = 1, gpus: float = 0,
                   log: Log = print, progress: Callable[[Progress], None] | None = None) -> dict[str, Any]:
    """Run every cell not done yet and write the leaderboard; returns it (see `eval.leaderboard`)."""
    if executor not in ("local", "ray"):
        raise WorkbenchError(f"unknown executor {executor!r}: local or ray")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise WorkbenchError("the ray executor needs Ray: pip install -e '.[ray]'") from None
    plan = make_plan(comparison, results_dir, device)
    for r in plan.skipped:
        log(f"skip {r.name}: {r.skip}")
    state = Progress(total=len(plan.builds) + len(plan.evals))
    # one run of a comparison at a time (its Ray workers write its cells under the driver's lock)
    with file_lock(lock_for(plan.out), waiting=lambda: log(f"waiting for another run of {plan.out} to finish")):
        for p in clean_leftovers(plan.out):
            log(f"removed {p.relative_to(plan.out)}: left by an interrupted run")
        atomic_write_json(plan.out / "plan.json", plan_record(plan))
        costs = expected_costs(plan)
        todo = {f"build:{r.name}" for r in plan.builds if needs_build(plan, r)}
        todo |= {f"eval:{r.name}:{t}" for r, t in plan.evals if not cell_done(plan, r, t)}
        state.reused = state.total - len(todo)
        state.cost_total = sum(costs[k] for k in todo)
        state.started = time.monotonic()

        def tick(current: str | None, event: str | None = None, rec: dict | None = None, item: str | None = None):
            if current is not None:  # a cell started
                state.current = current
            else:
                state.done += 1
                if item in todo:
                    state.cost_done += costs[item]
            if event:
                score = f": {100 * rec['score']:.1f}" if rec and rec.get("score") is not None else ""
                state.events.append(event + score)
            if progress:
                progress(state)

        if progress:
            progress(state)
        if executor == "local":
            _local(plan, device, log, tick)
        else:
            _ray(plan, device, log, tick, address, cpus, gpus)
        return write_leaderboard(plan)


def clean_leftovers(out: Path) -> list[Path]:
    """What a killed run of this comparison left behind (call with its lock held: no writer is live): temp files of
    atomic writes, and lm-eval outputs whose run manifest (written last) never landed. Nothing reads them."""
    import shutil

    from .eval.record import run_files

    gone = []
    if not out.is_dir():
        return gone
    for p in sorted(out.rglob(".*")):
        if p.is_file() and (p.name.endswith(".tmp") or ".partial" in p.name):
            p.unlink(missing_ok=True)
            gone.append(p)
        elif p.is_dir() and p.name.startswith((".staging-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    for folder in sorted((out / "lm-eval").glob("*")) if (out / "lm-eval").is_dir() else []:
        ids = {f.name[len("results_"):-len(".json")] for f in folder.glob("results_*.json")}
        ids |= {f.name[len("samples_"):-len(".jsonl.gz")] for f in folder.glob("samples_*.jsonl.gz")}
        for run_id in sorted(ids):
            if not (folder / f"run_{run_id}.json").is_file():
                for f in run_files(folder, run_id):
                    if f.is_file():
                        f.unlink()
                        gone.append(f)
    return gone


def plan_record(plan: Plan) -> dict[str, Any]:
    """plan.json: the comparison's rows, tasks and settings, and `cells`: row -> task -> the key its cell must have
    (null for an artifact row not built yet), so a reader of the folder alone (the app's catalog) counts exactly
    the cells the leaderboard counts (`cells.comparison_cells`)."""
    c = plan.comparison
    return {"name": c.spec.name, "source": Path(c.source).as_posix() if not Path(c.source).is_absolute()
            else Path(c.source).name, "pool": c.pool.name, "tasks": c.tasks, "reference": c.reference,
            "eval": c.spec.eval.model_dump(mode="json"), "rows": board_rows(c),
            "skipped": {r.name: r.skip for r in plan.skipped}, "device": plan.device.split(":")[0],
            "cells": {r.name: {t: expected_key(plan, r, t) for t in r.tasks} for r in c.active_rows}}


def collect_cells(plan: Plan) -> dict[tuple[str, str], dict[str, Any]]:
    """(row, task) -> record of every planned cell that counts (`cell_done`)."""
    return {(r.name, t): rec for r, t in plan.evals if (rec := cell_done(plan, r, t))}


def board_rows(c: Comparison) -> list[dict[str, Any]]:
    """The leaderboard's rows in plan order: name, method, and a single-task expert's own task (the normalized
    score's denominator)."""
    return [{"name": r.name, "method": r.method, "expert_task": r.info.get("task") if r.method == "expert-lora" else None}
            for r in c.active_rows]


def leaderboard_of(plan: Plan, cells: dict[tuple[str, str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The leaderboard of the plan from its current cell records, computed and returned: nothing is written."""
    from .eval.leaderboard import build_leaderboard

    c = plan.comparison
    cells = collect_cells(plan) if cells is None else cells
    board = build_leaderboard(board_rows(c), cells, c.tasks, c.reference)
    return board | {"name": c.spec.name, "pool": c.pool.name, "eval": c.spec.eval.model_dump(mode="json"),
                    "complete": len(cells) == len(plan.evals), "cells": f"{len(cells)}/{len(plan.evals)}",
                    "skipped": {r.name: r.skip for r in plan.skipped}}


def write_leaderboard(plan: Plan) -> dict[str, Any]:
    """leaderboard.json, .csv, .md and .svg under the comparison's folder, from the plan and its cell records."""
    from .eval.leaderboard import leaderboard_chart, leaderboard_frame, leaderboard_markdown

    c = plan.comparison
    board = leaderboard_of(plan)
    title = (f"{c.spec.name}: pool {c.pool.name}, {c.spec.eval.split} split, "
             f"{'limit ' + str(c.spec.eval.limit) if c.spec.eval.limit else 'all examples'} per task")
    # plan.json again: the keys of rows built since the run began are known now (the app checks cells against it)
    atomic_write_json(plan.out / "plan.json", plan_record(plan))
    atomic_write_json(plan.out / "leaderboard.json", board)
    fault_point("leaderboard")
    # the CSV's task columns carry each metric's direction (↑ higher is better, ↓ lower) and Δ's sign (+ = better)
    atomic_write_text(plan.out / "leaderboard.csv", leaderboard_frame(board, arrows=True).to_csv(index=False,
                                                                                                float_format="%.6g"))
    atomic_write_text(plan.out / "leaderboard.md", leaderboard_markdown(board, title))
    try:
        svg = plan.out / "leaderboard.svg"
        tmp = svg.with_name(".leaderboard.partial.svg")
        leaderboard_chart(board, title).save(str(tmp))
        tmp.replace(svg)
    except Exception as e:  # noqa: BLE001 - the plot is a view of the table: a missing renderer loses only it
        board["plot_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    curves = training_curves(plan)
    if curves:
        try:
            write_training_chart(curves, f"{c.spec.name}: training loss per step of the rows that train",
                                 plan.out / "training.svg")
        except Exception as e:  # noqa: BLE001 - as above: the curves stay in builds/*.json
            board["plot_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if "plot_error" in board:  # found after leaderboard.json was written: the record keeps it too
        atomic_write_json(plan.out / "leaderboard.json", board)
    return board


def training_curves(plan: Plan) -> dict[str, list[float]]:
    """Row -> the loss curve its method reported while building (build records' `report.loss_curve`)."""
    out = {}
    for row in plan.comparison.active_rows:
        rec = build_record(plan, row) if row.kind == "artifact" else None
        curve = ((rec or {}).get("report") or {}).get("loss_curve")
        if curve:
            out[row.name] = curve
    return out


def write_training_chart(curves: dict[str, list[float]], title: str, path: Path) -> None:
    from .eval.charts import loss_curves_chart

    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    loss_curves_chart(curves, title, series="row", y_title="training loss").save(str(tmp))
    tmp.replace(path)


def merge_count_curve(plan: Plan) -> dict[str, Any]:
    """Score vs number of merged experts: for each artifact row, its method, its expert count and its mean over
    its accuracy-like tasks (± the combined standard error); written as curve.json and curve.svg beside the
    leaderboard. A task is accuracy-like as the leaderboard decides (0/1 per example, higher is better, one metric
    over every row's cell); tasks of other metrics (a perplexity's per-document log-likelihoods, a per-example f1)
    are never averaged in: the curve names them in `left_out` (task -> metric) and `note`."""
    import math

    from .eval import metrics
    from .eval.leaderboard import _kind as task_kind  # the leaderboard's own rule: one kind per task for every row
    from .eval.leaderboard import curve_chart

    cells = collect_cells(plan)
    views: dict[tuple[str, str], metrics.CellView] = {}
    for key, c in cells.items():
        try:
            views[key] = metrics.view(c)
        except (TypeError, ValueError, AttributeError):  # unreadable: as if missing
            continue
    by_task: dict[str, list[metrics.CellView]] = {}
    for (_, t), v in views.items():
        by_task.setdefault(t, []).append(v)
    accuracy, left_out = set(), {}
    for t, vs in by_task.items():
        one = len({(v.metric, v.aggregate, v.higher_is_better) for v in vs}) == 1
        if one and vs[0].higher_is_better and task_kind(vs) == "accuracy":
            accuracy.add(t)
        else:
            left_out[t] = ", ".join(sorted({v.metric for v in vs}))
    points = []
    for row in plan.comparison.active_rows:
        if row.kind != "artifact":
            continue
        if any((row.name, t) not in views for t in row.tasks):
            continue
        tasks = [t for t in row.tasks if t in accuracy]
        got = [views[(row.name, t)] for t in tasks]
        means = [v.value for v in got]
        if not got or not all(math.isfinite(m) for m in means):
            continue
        ses = [v.stderr for v in got]
        points.append({"row": row.name, "method": row.method, "experts": len(row.recipe.experts),
                       "tasks": tasks, "mean": sum(means) / len(means),
                       "stderr": sum(x * x for x in ses) ** 0.5 / len(ses),  # NaN (n < 2) propagates
                       "per_task": dict(zip(tasks, means))})
    curve = {"name": plan.comparison.spec.name, "pool": plan.comparison.pool.name,
             "eval": plan.comparison.spec.eval.model_dump(mode="json"), "points": points}
    if left_out:
        curve["left_out"] = left_out
        curve["note"] = ("mean over the accuracy-like tasks only; left out (not accuracy-like): "
                         + ", ".join(f"{t} ({m})" for t, m in left_out.items()))
    atomic_write_json(plan.out / "curve.json", curve)
    if points:
        svg = plan.out / "curve.svg"
        tmp = svg.with_name(".curve.partial.svg")
        curve_chart(curve).save(str(tmp))
        tmp.replace(svg)
    return curve


# ----------------------------------------------------------------------------- eval matrix


def eval_matrix(pool_spec: str, tasks: list[str], *, models: list[str] | None = None, batch_size: int = 16,
                device: str = "cpu", force: bool = False, results_dir: Path | None = None,
                log: Log = print) -> list[dict[str, Any]]:
    """Every expert (and the base) of a pool on every task; models whose results cover the tasks are skipped."""
    from .eval import run_eval
    from .eval.harness import resolve_tasks
    from .eval.results import collect_scores
    from .pool import Pool

    p = Pool.open(pool_spec)
    task_list = resolve_tasks(tasks)
    names = models or ["base", *p.names()]
    lm_dir = Path(results_dir or default_results_dir()) / "lm-eval"
    done = collect_scores(lm_dir, pool=p.name)
    out = []
    for i, name in enumerate(names, 1):
        have = set(done[done.model == name].task) if not done.empty else set()
        if not force and set(task_list) <= have:
            log(f"[{i}/{len(names)}] skip {name}: results exist")
            continue
        if name != "base" and name in p and not p.expert(name).files_present():
            log(f"[{i}/{len(names)}] skip {name}: its files are not on disk (`workbench pool verify {p.name}`)")
            continue
        log(f"[{i}/{len(names)}] evaluating {name} on {len(task_list)} tasks")
        out.append(run_eval(name, task_list, pool=p, batch_size=batch_size, device=device, results_dir=lm_dir))
    return out


__all__ = ["Plan", "Progress", "collect_cells", "describe", "eval_matrix", "expected_costs", "leaderboard_of", "make_plan", "run_build",
           "run_comparison", "run_row", "write_leaderboard"]


# ----------------------------------------------------------------------------- background runs (the app)


@dataclass
class BackgroundRun:
    """A comparison running in a thread of this process: its progress, log and outcome, for a UI to poll."""

    name: str
    source: str
    status: str = "running"  # running | done | failed
    progress: Progress | None = None
    log: list[str] = field(default_factory=list)
    error: str | None = None  # a failed run's one line
    traceback: str | None = None  # and its whole traceback, for whoever has to fix it
    board: dict[str, Any] | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    thread: Any = None

    def as_dict(self) -> dict[str, Any]:
        p = self.progress
        return {"name": self.name, "source": self.source, "status": self.status, "error": self.error,
                "traceback": self.traceback,
                "done": p.done if p else 0, "total": p.total if p else 0, "current": p.current if p else "",
                "log": self.log[-50:], "elapsed_s": round((self.finished or time.time()) - self.started, 1)}


_RUNS: dict[str, BackgroundRun] = {}
_RUNS_LOCK = threading.Lock()


def comparison_document(pool: str, method: str, parameters: dict[str, Any], *, experts: list[str] | None = None,
                        tasks: list[str] | None = None, limit: int | None = 20, name: str | None = None,
                        reference: str | None = None) -> dict[str, Any]:
    """A one-method comparison (base, the experts, the multitask row where the pool has one, and the method) as
    a document `parse_comparison` validates: what the app's "build one" form launches."""
    import re

    from .pool import Pool

    p = Pool.open(pool)
    entries: list[Any] = ["base"]
    entries += list(experts or [])
    if "multitask" in p:
        entries.append("multitask")
    row = {"name": method.replace("_", "-"), "method": method, "parameters": parameters}
    if experts is not None:  # an empty selection is refused in one line, never "the whole pool"
        row["experts"] = list(experts)
    entries.append(row)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name or f"{p.name}-{method}")[:100]
    doc = {"name": stem, "pool": pool, "entries": entries, "tasks": tasks or ["held_in"],
           "eval": {"limit": limit, "batch_size": 32, "split": "test"}}
    if reference or "multitask" in p:
        doc["reference"] = reference or "multitask"
    return doc


def recipe_comparison(path: str | Path, *, limit: int | None = 20, tasks: list[str] | None = None) -> Path | dict[str, Any]:
    """A comparison file as it is; a single recipe (merge, routing, ...) as a comparison of the base against it
    (`recipe-<stem>`, on `tasks` (default: the recipe's eval tasks, else held-in) with `limit` examples each)."""
    path = Path(path)
    from .recipes import _load_yaml

    data = _load_yaml(path)
    if isinstance(data, dict) and "entries" in data:
        return path
    if not isinstance(data, dict) or "method" not in data:
        raise WorkbenchError(f"{path.name}: neither a comparison (entries) nor a recipe (method)")
    want = tasks or ((data.get("eval") or {}).get("tasks") if isinstance(data.get("eval"), dict) else None) \
        or ["held_in"]
    return {"name": f"recipe-{path.stem}", "pool": data.get("pool", "demo"),
            "entries": ["base", {"name": path.stem, "recipe": str(path.resolve())}], "tasks": list(want),
            "eval": {"limit": limit, "batch_size": 32, "split": "test"}, "reference": "base"}


def start_background(comparison: dict[str, Any] | str | Path, *, results_dir: Path | None = None,
                     device: str = "cpu", folder: Path | None = None) -> BackgroundRun:
    """Validate a comparison (a bad one raises its one-line RecipeError here, before any work) and run it in a
    thread. One run per comparison name at a time in this process: starting a running one is refused (another
    process running it waits on the comparison's lock). `folder`: where a mapping's `recipe:` entries may live
    (besides merges/), e.g. the recipe file's folder for `recipe_comparison`'s documents."""

    c = parse_comparison(comparison) if not isinstance(comparison, dict) else \
        parse_comparison(comparison, "<app>", folder=folder)
    name = c.spec.name
    run = BackgroundRun(name=name, source=str(comparison if not isinstance(comparison, dict) else "<app>"))
    with _RUNS_LOCK:
        live = _RUNS.get(name)
        if live is not None and live.status == "running":
            raise WorkbenchError(f"comparison {name!r} is already running here ({live.as_dict()['done']}/"
                                 f"{live.as_dict()['total']} cells): wait for it, or give the new one another name")
        _RUNS[name] = run

    def progress(state: Progress) -> None:
        run.progress = state

    def log(msg: Any) -> None:
        run.log.append(str(msg))

    def target() -> None:
        try:
            run.board = run_comparison(c, results_dir=results_dir, device=device, log=log, progress=progress)
            run.status = "done"
        except Exception as e:  # noqa: BLE001 - a failed run shows its one line (and keeps its traceback); the app goes on
            import traceback

            run.traceback = traceback.format_exc()
            run.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}" \
                if not isinstance(e, WorkbenchError) else str(e).splitlines()[0]
            run.status = "failed"
        finally:
            run.finished = time.time()

    run.progress = Progress(total=0)
    run.thread = threading.Thread(target=target, name=f"compare-{name}", daemon=True)
    run.thread.start()
    return run


def background_runs() -> list[BackgroundRun]:
    return sorted(_RUNS.values(), key=lambda r: -r.started)
