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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .comparison import Comparison, Row, cell_key, cell_key_body, comparison_dir, default_results_dir, parse_comparison
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
    lines = [(f"comparison {c.spec.name}: pool {c.pool.name}, {len(c.active_rows)} rows x {len(c.tasks)} tasks, "
              f"split {c.spec.eval.split}, limit {c.spec.eval.limit or 'all'}; reference row {c.reference}")]
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
        line = f"    {r.name}: {len(r.tasks) - len(todo)}/{len(r.tasks)} done"
        why: dict[str, list[str]] = {}  # reason -> its tasks, in the row's order
        for t in todo:
            why.setdefault(why_cell(plan, r, t), []).append(t)
        if why:
            line += "; to run: " + "; ".join(
                f"{', '.join(ts[:4])}{f' +{len(ts) - 4}' if len(ts) > 4 else ''} ({reason})" for reason, ts in why.items())
        lines.append(line)
    return lines


def why_cell(plan: Plan, row: Row, task: str) -> str:
    """For a cell to run: why its recorded cell does not count. Never run; its row not built; or which key input
    differs from the recorded cell's: its recorded `key_inputs` against this plan's (`comparison.cell_key_body`), or
    for a cell written before they were recorded, what its lm-eval run manifest says (eval settings, data, device,
    the artifact's key, lm-eval's version); else the reason `cells.read_cell` gives (malformed, misplaced ...)."""
    from .cells import read_cell

    key = expected_key(plan, row, task)
    if key is None:
        return "its row is not built yet"
    path = plan.cell_path(row, task)
    if not path.exists():
        return "never run"
    rec = _read(path)
    if rec is None:
        return "its record is unreadable"
    if rec.get("key") == key:
        _, problem = read_cell(plan.out, row.name, task, key)
        return problem or "recorded"
    new = cell_key_body(plan.comparison, model_key(plan, row), task, plan.device)
    old = rec.get("key_inputs")
    if isinstance(old, dict):
        diff = changed_inputs(old, new)
    else:
        diff = _changed_since_run(plan, row, rec, new)
    if not diff:
        return "the key changed (the row's model, the task's configuration or lm-eval: not recorded with the cell)"
    return f"changed: {', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}"


def _changed_since_run(plan: Plan, row: Row, rec: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The key inputs (as `cell_key_body` names them) that differ between a cell recorded without `key_inputs` and
    `new`, as far as its lm-eval run manifest (and results JSON) recorded them; [] when none can be told."""
    run_ref = rec.get("run")
    if not isinstance(run_ref, str):
        return []
    base = plan.out.resolve()
    run_path = (base / run_ref).resolve()
    if base not in run_path.parents:
        return []
    run = _read(run_path)
    if run is None:
        return []
    spec, out = plan.comparison.spec.eval, []
    for k, now in spec.model_dump(mode="json").items():
        if k in run or k == "apply_chat_template":
            then = bool(run.get(k)) if k == "apply_chat_template" else run.get(k)
            if then != now:
                out.append(f"eval.{k}")
    data, task = run.get("data_sha256"), rec.get("task")
    if isinstance(data, dict) and isinstance(task, str) and task in data and data[task] != new["data"]:
        out.append("data")
    device = (run.get("machine") or {}).get("device") if isinstance(run.get("machine"), dict) else None
    if isinstance(device, str) and device.split(":")[0] != new["device"]:
        out.append("device")
    model = new.get("model") or {}
    if row.kind == "artifact" and run.get("artifact_key") is not None and run.get("artifact_key") != model.get("artifact"):
        out.append("model.artifact")
    results_file = run.get("results_file")
    if isinstance(results_file, str):
        results = _read(base / results_file) if (base / results_file).resolve().is_relative_to(base) else None
        version = (results or {}).get("lm_eval_version")
        if isinstance(version, str) and version != new["lm_eval"]:
            out.append("lm_eval")
    return out



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
        rec = {"key": cell_key(c, mk, task, plan.device), "key_inputs": cell_key_body(c, mk, task, plan.device),
               "row": row.name, "task": task, **fields,
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
    from .eval.charts import curve_chart

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


# ----------------------------------------------------------------------------- background jobs (the app)
#
# A background job runs one comparison in a thread of this process or (the app's) in a process of its own, and
# keeps its state on disk, under `<results>/.jobs/<comparison>/` (dotted: the catalog's scan skips it):
#   request.json  what to run (the comparison document or file, the results folder, the device)
#   status.json   status (starting | running | done | failed | stopped | interrupted), pid, cell counts, the cell
#                 in flight with its expected seconds, the step inside it (a progress bar: training steps, merged
#                 tensors, ...), events, error and traceback; rewritten atomically as the job moves
#   log.txt       the job's log lines; output.txt (process jobs) its stdout and stderr
#   board.json    the leaderboard of the cells finished so far
#   lock          held (flock) by the job while it runs, and removed as it ends; a lock that nobody holds under a
#                 status still "running" is a job that died (killed, the machine restarted): the next listing
#                 marks it interrupted and removes the lock.
# So a job survives a restart of the app (a process job goes on running; either kind is listed from disk), and a
# stop ends the job's process (SIGTERM, then SIGKILL after `STOP_WAIT_S`) and removes its lock.

JOBS_FOLDER = ".jobs"
LIVE = ("starting", "running")
STOP_WAIT_S = 30.0
_STATUS_EVERY_S = 0.5  # status.json is rewritten at most this often for progress-bar steps (always for cells)
_MAX_EVENTS = 200
_MAX_STEPS = 50  # finished progress-bar steps kept in status.json


class JobStopped(BaseException):
    """Raised inside a job asked to stop (SIGTERM in a process job, the stop flag in a thread job); a BaseException
    so that no `except Exception` on the way swallows it."""


def jobs_dir(results_dir: Path | str | None = None) -> Path:
    return Path(results_dir or default_results_dir()) / JOBS_FOLDER


def job_folder(results_dir: Path | str | None, name: str) -> Path:
    return jobs_dir(results_dir) / name


def _one_line(e: BaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return first if isinstance(e, WorkbenchError) else f"{type(e).__name__}: {first}"


def _cost_key(current: str) -> str | None:
    """'build ROW' -> 'build:ROW', 'ROW x TASK' -> 'eval:ROW:TASK' (row names have no spaces)."""
    if current.startswith("build "):
        return f"build:{current[len('build '):]}"
    row, sep, task = current.partition(" x ")
    return f"eval:{row}:{task}" if sep else None


# -- the job's lock: flock on <folder>/lock, whose text is the holder's pid

def _take_lock(folder: Path, name: str) -> int:
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lock"
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            st = read_job(folder) or {}
            p = st.get("progress") or {}
            raise WorkbenchError(f"comparison {name!r} is already running (pid {st.get('pid')}, {p.get('done', 0)}/"
                                 f"{p.get('total', 0)} cells): stop it, or give the new one another name") from None
        try:  # a lister may have removed the file between our open and our flock: lock the file that is there
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise WorkbenchError(f"could not take the lock of job {name!r} ({path})")


def _write_pid(fd: int, pid: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid}\n".encode(), 0)


def _held(folder: Path) -> bool:
    """Whether a live job holds the folder's lock (the kernel drops a flock when its holder dies, even by SIGKILL)."""
    import fcntl

    try:
        fd = os.open(folder / "lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _release(fd: int, folder: Path) -> None:
    (folder / "lock").unlink(missing_ok=True)  # removed while still held: nobody sees a free lock file
    os.close(fd)


def _pid_alive(pid: Any) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# -- the job's records

class _Recorder:
    """Writes a running job's status.json, log.txt and board.json."""

    def __init__(self, folder: Path, name: str, mode: str, stop: threading.Event | None = None):
        self.folder, self.stop = folder, stop
        self.plan: Plan | None = None
        self.costs: dict[str, float] = {}
        self.status: dict[str, Any] = {"name": name, "status": "running", "mode": mode, "pid": os.getpid(),
                                       "started": time.time(), "updated": time.time(), "finished": None,
                                       "progress": {"total": 0, "done": 0, "reused": 0, "current": "", "events": []},
                                       "cell": None, "step": None, "steps": [], "error": None, "traceback": None}
        prior = read_job(folder) or {}
        if isinstance(prior.get("started"), (int, float)):
            self.status["started"] = prior["started"]
        self._last = 0.0
        self._lock = threading.Lock()
        self._log = open(folder / "log.txt", "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed by finish
        self.write(force=True)

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise JobStopped()

    def log(self, msg: Any) -> None:
        for line in str(msg).splitlines() or [""]:
            self._log.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        self._check_stop()

    def progress(self, state: Progress) -> None:
        old = self.status["progress"]
        if state.current and state.current != old.get("current"):  # a cell started
            key = _cost_key(state.current)
            self.status["cell"] = {"name": state.current, "started": time.time(),
                                   "expected_s": self.costs.get(key) if key else None}
            self.status["step"] = None
        self.status["progress"] = {"total": state.total, "done": state.done, "reused": state.reused,
                                   "current": state.current, "cost_total": round(state.cost_total, 2),
                                   "cost_done": round(state.cost_done, 2),
                                   "eta_s": None if state.eta_s is None else round(state.eta_s, 1),
                                   "events": state.events[-_MAX_EVENTS:]}
        if state.done != old.get("done") and state.events and " x " in state.events[-1]:
            self.write_board()
        self.write(force=True)
        self._check_stop()

    def step(self, bar: dict[str, Any]) -> None:
        self.status["step"] = {k: bar.get(k) for k in ("desc", "done", "total", "info", "started", "finished")}
        if bar.get("finished"):  # the steps done so far, in the cell they belong to
            self.status["steps"] = [*self.status["steps"], {
                "cell": self.status["progress"].get("current"), "desc": bar.get("desc"), "done": bar.get("done"),
                "total": bar.get("total"), "seconds": round(time.time() - (bar.get("started") or time.time()), 2),
            }][-_MAX_STEPS:]
        self.write(force=bool(bar.get("finished")) or not bar.get("done"))
        self._check_stop()

    def write_board(self) -> None:
        if self.plan is None:
            return
        try:
            atomic_write_json(self.folder / "board.json", leaderboard_of(self.plan))
        except Exception as e:  # noqa: BLE001 - the partial board is a view: the job goes on without it
            self.log(f"partial leaderboard not written: {_one_line(e)}")

    def write(self, force: bool = False) -> None:
        now = time.time()
        with self._lock:
            if not force and now - self._last < _STATUS_EVERY_S:
                return
            self._last = now
            self.status["updated"] = now
            atomic_write_json(self.folder / "status.json", self.status)

    def finish(self, status: str, error: str | None = None, tb: str | None = None) -> None:
        self.status.update(status=status, error=error, traceback=tb, finished=time.time())
        if status != "done":
            self.status["step"] = None
        self.write_board()
        if error:
            self.log(f"{status}: {error}")
        self.write(force=True)
        self._log.close()


def _run_job(rec: _Recorder, c: Comparison, results_dir: Path | None, device: str) -> dict[str, Any]:
    from .progress import watch

    rec.plan = make_plan(c, results_dir, device)
    try:
        rec.costs = expected_costs(rec.plan)
    except Exception as e:  # noqa: BLE001 - no expected times: the app shows elapsed times only
        rec.log(f"no expected times: {_one_line(e)}")
    me = threading.get_ident()
    # the progress bars of this job's thread only (a thread job shares its process with the app and other jobs)
    with watch(lambda bar: rec.step(bar) if threading.get_ident() == me else None):
        return run_comparison(c, results_dir=results_dir, device=device, log=rec.log, progress=rec.progress)


def job_main(folder: str | Path | None = None) -> None:
    """A process job's entry point (`start_background(..., process=True)` starts it): run the request in `folder`,
    holding the lock the parent passed down (fd $WORKBENCH_JOB_LOCK_FD); SIGTERM stops it cleanly."""
    import json
    import signal
    import sys
    import traceback

    folder = Path(folder or sys.argv[1])
    fd = int(os.environ.pop("WORKBENCH_JOB_LOCK_FD"))

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up below runs to its end
        raise JobStopped()

    signal.signal(signal.SIGTERM, on_term)
    req = json.loads((folder / "request.json").read_text())
    rec = _Recorder(folder, req["name"], "process")
    code = 0
    try:
        if req["is_path"]:
            c = parse_comparison(Path(req["comparison"]))
        else:
            c = parse_comparison(req["comparison"], "<app>", folder=Path(req["folder"]) if req.get("folder") else None)
        _run_job(rec, c, Path(req["results_dir"]), req["device"])
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rec.finish("done")
    except JobStopped:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rec.finish("stopped", "stopped on request; its finished cells are kept: launch it again to resume")
        code = 143
    except BaseException as e:  # noqa: BLE001 - recorded in one line and with its traceback
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rec.finish("failed", _one_line(e), traceback.format_exc())
        code = 1
    finally:
        _release(fd, folder)
    sys.exit(code)


def read_job(folder: Path) -> dict[str, Any] | None:
    """A job's status.json as written (None: absent or unreadable)."""
    from .cells import read_record

    return read_record(Path(folder) / "status.json")


def job_status(folder: Path) -> dict[str, Any] | None:
    """A job's status, checked: a job recorded as live whose lock nobody holds died without finishing (killed, the
    machine restarted): it is marked `interrupted` and its lock removed. Adds `folder` and `elapsed_s`."""
    folder = Path(folder)
    st = read_job(folder)
    if st is None:
        return None
    if st.get("status") in LIVE and not _held(folder):
        st = read_job(folder) or st  # the job may have finished between the two reads: its last status counts
        if st.get("status") in LIVE:
            pid = st.get("pid")
            if not _pid_alive(pid) or st.get("mode") != "process" or not (folder / "lock").exists():
                st.update(status="interrupted", finished=time.time(), step=None,
                          error="its process ended without finishing (killed, or the machine restarted); its "
                                "finished cells are kept: launch it again to resume")
                atomic_write_json(folder / "status.json", st)
                (folder / "lock").unlink(missing_ok=True)
    elif st.get("status") not in LIVE and (folder / "lock").exists() and not _held(folder):
        (folder / "lock").unlink(missing_ok=True)  # left by a job that died after writing its last status
    end = st.get("finished") if isinstance(st.get("finished"), (int, float)) else time.time()
    start = st.get("started") if isinstance(st.get("started"), (int, float)) else end
    return st | {"folder": str(folder), "elapsed_s": round(end - start, 1)}


def list_jobs(results_dir: Path | str | None = None) -> list[dict[str, Any]]:
    """Every job recorded under the results folder (live or ended, started by this process or another one, before
    a restart or after), newest first; see `job_status`."""
    root = jobs_dir(results_dir)
    out = []
    for f in sorted(root.iterdir()) if root.is_dir() else []:
        if f.is_dir() and not f.name.startswith("."):
            st = job_status(f)
            if st is not None:
                out.append(st)
    return sorted(out, key=lambda s: -(s.get("started") or 0))


def job_log(folder: Path, lines: int = 40) -> list[str]:
    """The last `lines` lines of a job's log (and, for a process job that failed to start, of its output)."""
    out = []
    for name in ("log.txt", "output.txt"):
        p = Path(folder) / name
        if p.is_file():
            with open(p, "rb") as f:
                f.seek(max(0, p.stat().st_size - 64 * lines * 4))
                text = f.read().decode("utf-8", "replace").replace("\r", "\n")
            got = [ln for ln in text.splitlines() if ln.strip()][-lines:]
            out.append((name, got))
    return [ln for name, got in out for ln in ([f"--- {name}"] + got if len(out) > 1 else got)]


def job_board(folder: Path) -> dict[str, Any] | None:
    """The leaderboard of a job's finished cells (board.json), or None."""
    from .cells import read_record

    return read_record(Path(folder) / "board.json")


@dataclass
class BackgroundRun:
    """A job started by this process: its folder on disk holds its state (`job_status`); for a thread job its
    thread, for a process job its process and the thread that waits for it."""

    name: str
    source: str
    folder: Path
    mode: str = "thread"  # thread | process
    status: str = "running"
    error: str | None = None  # a failed run's one line
    traceback: str | None = None  # and its whole traceback, for whoever has to fix it
    started: float = field(default_factory=time.time)
    finished: float | None = None
    thread: Any = None
    proc: Any = None
    stop_flag: threading.Event = field(default_factory=threading.Event)

    def _sync(self, ended: bool = False) -> dict[str, Any]:
        """This object's fields from the job's status (`job_status`; with `ended`, its process has exited: read as
        it is, and a status still live is this object's `interrupted`, the disk left to the next listing)."""
        st = (read_job(self.folder) if ended else job_status(self.folder)) or {}
        if st.get("status") and st["status"] not in LIVE:
            self.status, self.error, self.traceback = st["status"], st.get("error"), st.get("traceback")
            self.finished = st.get("finished") or time.time()
        elif ended:
            code = self.proc.returncode if self.proc is not None else None
            self.status, self.finished = "interrupted", time.time()
            self.error = f"its process ended without finishing (exit code {code})"
        return st

    def as_dict(self) -> dict[str, Any]:
        st = self._sync()
        p = st.get("progress") or {}
        return st | {"name": self.name, "source": self.source, "status": st.get("status", self.status),
                     "error": st.get("error", self.error), "traceback": st.get("traceback", self.traceback),
                     "done": p.get("done", 0), "total": p.get("total", 0), "current": p.get("current", ""),
                     "log": job_log(self.folder, 50)}


_RUNS: dict[str, BackgroundRun] = {}
_RUNS_LOCK = threading.Lock()


def start_background(comparison: dict[str, Any] | str | Path, *, results_dir: Path | None = None,
                     device: str = "cpu", folder: Path | None = None, process: bool = False) -> BackgroundRun:
    """Validate a comparison (a bad one raises its one-line RecipeError here, before any work) and run it as a job
    (see above): in a thread of this process, or with `process` in a process of its own (what the app does: it
    survives the app, and `stop_job` ends it at once). One job per comparison name and results folder at a time:
    starting a live one is refused. `folder`: where a mapping's `recipe:` entries may live (besides merges/), e.g.
    the recipe file's folder for `recipe_comparison`'s documents."""
    import subprocess
    import sys
    import traceback

    c = parse_comparison(comparison) if not isinstance(comparison, dict) else \
        parse_comparison(comparison, "<app>", folder=folder)
    name = c.spec.name
    results_dir = Path(results_dir or default_results_dir()).expanduser().resolve()
    where = job_folder(results_dir, name)
    fd = _take_lock(where, name)
    try:
        for old in ("log.txt", "output.txt", "board.json"):
            (where / old).unlink(missing_ok=True)
        source = str(comparison if not isinstance(comparison, dict) else "<app>")
        atomic_write_json(where / "request.json", {
            "name": name, "is_path": not isinstance(comparison, dict),
            "comparison": comparison if isinstance(comparison, dict) else str(Path(comparison).resolve()),
            "folder": str(Path(folder).resolve()) if folder else None, "results_dir": str(results_dir),
            "device": device, "source": source})
        atomic_write_json(where / "status.json", {
            "name": name, "status": "starting", "mode": "process" if process else "thread", "pid": None,
            "started": time.time(), "finished": None, "source": source,
            "progress": {"total": 0, "done": 0, "reused": 0, "current": "", "events": []}})
    except BaseException:
        _release(fd, where)
        raise
    run = BackgroundRun(name=name, source=source, folder=where, mode="process" if process else "thread")
    with _RUNS_LOCK:
        _RUNS[str(where)] = run
    if process:
        root = str(Path(__file__).resolve().parent.parent)  # the checkout, for a workbench not pip-installed
        env = {**os.environ, "WORKBENCH_JOB_LOCK_FD": str(fd),
               "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        try:
            with open(where / "output.txt", "wb") as out:
                run.proc = subprocess.Popen(
                    [sys.executable, "-c", "from workbench.jobs import job_main; job_main()", str(where)],
                    env=env, pass_fds=(fd,), start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL)
            _write_pid(fd, run.proc.pid)
        except BaseException:
            _release(fd, where)
            raise
        os.close(fd)  # the child holds the lock now (the same open file, passed down)

        def wait() -> None:
            run.proc.wait()
            run._sync(ended=True)

        run.thread = threading.Thread(target=wait, name=f"job-{name}", daemon=True)
        run.thread.start()
        return run

    _write_pid(fd, os.getpid())
    rec = _Recorder(where, name, "thread", run.stop_flag)

    def target() -> None:
        try:
            _run_job(rec, c, results_dir, device)
            rec.finish("done")
        except JobStopped:
            rec.finish("stopped", "stopped on request; its finished cells are kept: launch it again to resume")
        except BaseException as e:  # noqa: BLE001 - a failed run shows its one line (and keeps its traceback)
            rec.finish("failed", _one_line(e), traceback.format_exc())
        finally:
            _release(fd, where)
            run._sync()

    run.thread = threading.Thread(target=target, name=f"compare-{name}", daemon=True)
    run.thread.start()
    return run


def stop_job(name: str, results_dir: Path | str | None = None, *, wait_s: float = STOP_WAIT_S) -> dict[str, Any]:
    """Stop a live job and return its status once it has ended: a process job gets SIGTERM (it records `stopped`
    and removes its lock), then SIGKILL if it is still there after `wait_s`; a thread job stops at its next step
    (cell, progress bar or log line). Its finished cells are kept. A job that is not live is a one-line error."""
    import contextlib
    import signal
    import subprocess

    results_dir = Path(results_dir or default_results_dir()).expanduser().resolve()
    where = job_folder(results_dir, name)
    st = job_status(where)
    if st is None or st.get("status") not in LIVE:
        raise WorkbenchError(f"job {name!r} is not running ({(st or {}).get('status', 'no such job')})")
    run = _RUNS.get(str(where))
    if st.get("mode") != "process":
        if run is None or run.thread is None:
            raise WorkbenchError(f"job {name!r} runs in another process's thread: stop it there")
        run.stop_flag.set()
        run.thread.join(wait_s)
        if run.thread.is_alive():
            raise WorkbenchError(f"job {name!r} did not reach a step where it can stop within {wait_s:.0f} s")
        return job_status(where) or {}
    pid = st.get("pid")
    if not isinstance(pid, int):
        try:
            pid = int((where / "lock").read_text().strip())
        except (OSError, ValueError):
            raise WorkbenchError(f"job {name!r}: no process id recorded") from None

    def gone(deadline: float) -> bool:
        while time.time() < deadline:
            if run is not None and run.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):  # still running
                    run.proc.wait(0.1)
            if not _pid_alive(pid) and not _held(where):
                return True
            time.sleep(0.05)
        return False

    for sig, wait in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise WorkbenchError(f"job {name!r}: not allowed to signal its process {pid}") from None
        if gone(time.time() + wait):
            break
    if run is not None and run.thread is not None:
        run.thread.join(5)
    st = job_status(where) or {}  # a job killed before it could record its end is marked interrupted here
    if st.get("status") == "interrupted":
        st.update(status="stopped", error="stopped on request (killed: it did not end within "
                                          f"{wait_s:.0f} s of SIGTERM); its finished cells are kept")
        atomic_write_json(where / "status.json", {k: v for k, v in st.items() if k not in ("folder", "elapsed_s")})
    return st


def background_runs() -> list[BackgroundRun]:
    """The jobs started by this process (`list_jobs` lists every job of a results folder, from disk)."""
    return sorted(_RUNS.values(), key=lambda r: -r.started)
def comparison_document(pool: str, method: str, parameters: dict[str, Any], *, experts: list[str] | None = None,
                        tasks: list[str] | None = None, limit: int | None = 20, name: str | None = None,
                        reference: str | None = None, output: dict[str, Any] | None = None) -> dict[str, Any]:
    """A one-method comparison (base, the experts, the multitask row where the pool has one, and the method) as
    a document `parse_comparison` validates: what the app's "build one" form launches. `output`: the method row's
    output ({kind: lora, rank: 16} or {kind: model}; None: the method's default)."""
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
    if output is not None:
        row["output"] = dict(output)
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




# ----------------------------------------------------------------------------- the app's run form and cost preview

def method_form(method: str) -> list[dict[str, Any]]:
    """The parameters a form shows for `method`: its schema's fields (`methods.base.param_fields`), each with
    `default` (where the form starts) and `implied` (what the method uses when the parameter is left out: send a
    value only when it differs from `implied`), narrowed by the method's own `form_fields` (e.g. the task-arithmetic
    family drops what its mergekit method ignores)."""
    from .methods import METHODS
    from .methods.base import param_fields

    return METHODS.get(method).form_fields([f | {"implied": f["default"]} for f in param_fields(method)])


def output_kinds(method: str, experts: list[Any]) -> list[str]:
    """What `method` can write from `experts` (pool Expert objects): 'lora' (in adapter space: the merged task
    vector re-factored as a LoRA by truncated SVD, megabytes) and/or 'model' (a full model folder: the base's size)."""
    from .methods import METHODS

    cls = METHODS.get(method)
    kinds = [k for k in ("lora", "model") if k in cls.outputs]
    if "lora" in kinds and any(e.kind == "full" for e in experts) and not cls.lora_from_full:
        kinds.remove("lora")
    return kinds


def lora_rank(experts: list[Any]) -> int:
    """The sum of the LoRA experts' ranks (at most MAX_RANK): the rank that holds plain task arithmetic exactly."""
    import json

    from .methods.base import MAX_RANK

    total = 0
    for e in experts:
        if e.kind == "lora":
            try:
                total += int(json.loads((Path(e.path) / "adapter_config.json").read_text()).get("r", 8))
            except (OSError, ValueError, TypeError):
                total += 8
    return max(1, min(total, MAX_RANK))


def task_choices() -> list[str]:
    """What a form offers as tasks: the suite's groups (held_in, held_out), then its tasks and domain corpora."""
    from .tasks.suite import DOMAINS, TASKS

    return ["held_in", "held_out", *TASKS, *DOMAINS]


_MAX_PAST = 5000  # records read for a cost preview


def past_times(results_dir: Path) -> dict[str, Any]:
    """What earlier comparisons under `results_dir` recorded: seconds per evaluated example (the cells' `eval_s` over
    their `n`, pooled) and build seconds by method (the build records' `build_s`)."""
    from .cells import read_record

    root = Path(results_dir) / "compare"
    secs = n = cells = 0
    builds: dict[str, list[float]] = {}
    paths = sorted(root.glob("*/cells/*/*.json"))[:_MAX_PAST] if root.is_dir() else []
    for p in paths:
        rec = read_record(p) or {}
        if isinstance(rec.get("eval_s"), (int, float)) and isinstance(rec.get("n"), int) and rec["n"] > 0:
            secs, n, cells = secs + float(rec["eval_s"]), n + rec["n"], cells + 1
    for p in sorted(root.glob("*/builds/*.json"))[:_MAX_PAST] if root.is_dir() else []:
        rec = read_record(p) or {}
        if isinstance(rec.get("build_s"), (int, float)) and isinstance(rec.get("method"), str):
            builds.setdefault(rec["method"], []).append(float(rec["build_s"]))
    return {"per_example_s": secs / n if n else None, "cells": cells,
            "build_s": {m: sorted(v)[len(v) // 2] for m, v in builds.items()}, "builds": sum(map(len, builds.values()))}


def _examples(task: str, limit: int | None, split: str) -> int | None:
    from .tasks.suite import DOMAIN_SIZES, DOMAINS, TASKS, _split_size

    if task in TASKS:
        size = _split_size(task, split)
    elif task in DOMAINS:
        size = DOMAIN_SIZES[split]
    else:
        return limit
    return size if limit is None else min(limit, size)


def estimate(plan: Plan) -> dict[str, Any]:
    """A launch's cost before it starts: its cells (builds and evaluations) and how many are still to run, the
    examples those evaluations read, and the expected seconds from past runs (`past_times` under the plan's results
    folder; a row's own earlier records first). `seconds` is None and `basis` says "no past runs" when nothing
    recorded says; `unknown` names the cells no past run covers (left out of `seconds`)."""
    c = plan.comparison
    spec = c.spec.eval
    builds = [r for r in plan.builds if needs_build(plan, r)]
    evals = [(r, t) for r, t in plan.evals if not cell_done(plan, r, t)]
    counts = {t: _examples(t, spec.limit, spec.split) for t in c.tasks}
    examples = sum(counts[t] or 0 for _, t in evals)
    past = past_times(plan.results_dir)
    secs, known, unknown = 0.0, 0, []
    for r in builds:
        rec = _read(plan.build_path(r)) or {}
        s = rec.get("build_s") if isinstance(rec.get("build_s"), (int, float)) else past["build_s"].get(r.method)
        if s is None:
            unknown.append(f"build {r.name}")
        else:
            secs, known = secs + s, known + 1
    for r, t in evals:
        rec = _read(plan.cell_path(r, t)) or {}
        if isinstance(rec.get("eval_s"), (int, float)):
            secs, known = secs + rec["eval_s"], known + 1
        elif past["per_example_s"] is not None and counts.get(t):
            secs, known = secs + past["per_example_s"] * counts[t], known + 1
        else:
            unknown.append(f"{r.name} x {t}")
    if past["cells"] or past["builds"]:
        rate = f"{1000 * past['per_example_s']:.0f} ms per example" if past["per_example_s"] is not None else "no cells"
        basis = f"from {past['cells']} past cells ({rate}) and {past['builds']} past builds"
    else:
        basis = "no past runs"
    return {"cells": len(plan.builds) + len(plan.evals), "todo": len(builds) + len(evals), "builds": len(builds),
            "evals": len(evals), "examples": examples, "examples_per_task": counts,
            "seconds": round(secs, 1) if known else None, "unknown": unknown, "basis": basis}
