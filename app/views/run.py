"""Run: launch a recipe or a one-method comparison as a background job, see what it costs first, follow it (cells,
the step inside the cell in flight, its log, the leaderboard of its finished cells), stop it.

Jobs live on disk (`workbench.jobs`: `<results>/.jobs/<name>/`), each in a process of its own: they survive a
restart of the app, and a job whose process died is listed as interrupted (its lock removed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import streamlit as st

from views.common import ROOT, _pools
from workbench import catalog
from workbench.errors import WorkbenchError

_SHOWN_JOBS = 12  # newest jobs listed


def _recipes() -> list[Path]:
    return sorted((ROOT / "merges").glob("*.yaml"))


@st.cache_data(show_spinner=False, max_entries=64)
def _form(method: str) -> list[dict]:
    from workbench import jobs

    return jobs.method_form(method)


def _param_inputs(method: str) -> dict:
    """The method's own parameters (`jobs.method_form`: only those it reads, at its defaults); returns the values
    that differ from what the method uses when a parameter is left out."""
    values = {}
    for f in _form(method):
        label, key, d, implied = f["name"], f"run-p-{method}-{f['name']}", f["default"], f["implied"]
        lo, hi = f.get("minimum"), f.get("maximum")
        if f["type"] == "choice":
            v = st.selectbox(label, f["choices"], index=f["choices"].index(d) if d in f["choices"] else 0, key=key,
                             help=f["description"])
        elif f["type"] == "boolean" and not f["nullable"]:
            v = st.checkbox(label, value=bool(d), key=key, help=f["description"])
        elif f["type"] in ("number", "integer") and d is not None:
            num = f["type"] == "number"
            v = st.number_input(label, value=float(d) if num else int(d), step=0.05 if num else 1, key=key,
                                help=f["description"], format="%.4g" if num else "%d",
                                min_value=(float(lo) if num else int(lo)) if lo is not None else None,
                                max_value=(float(hi) if num else int(hi)) if hi is not None else None)
        else:
            raw = st.text_input(label, value="", placeholder=f"default: {d!r}", key=key, help=f["description"])
            if not raw.strip():
                continue
            import yaml

            try:
                v = yaml.safe_load(raw)
            except yaml.YAMLError:
                v = raw
        if v != implied:
            values[label] = v
    return values


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.0f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:,.0f} kB"


def _output_input(method: str, pool, experts: list[str]) -> dict | None:
    """The output kind where the method can write both (adapter-space LoRA or a full model), with their sizes."""
    from workbench import jobs

    chosen = [pool.expert(n) for n in experts if n in pool]
    kinds = jobs.output_kinds(method, chosen)
    if not chosen or len(kinds) < 2:
        return None
    shapes = pool.base.tensors.shapes
    full = 4 * sum(_numel(s) for s in shapes.values())
    rank = jobs.lora_rank(chosen)
    targets = {t for e in chosen for t in e.delta_names()}
    per_rank = 4 * sum(sum(shapes[t][-2:]) for t in targets if t in shapes and len(shapes[t]) == 2)
    labels = {"lora": "adapter space: a LoRA (truncated SVD of the merged task vector)",
              "model": f"a full model (about {_mb(full)})"}
    kind = st.radio("output", kinds, format_func=labels.get, key=f"run-output-{method}", horizontal=True,
                    help="where the merge is written: a LoRA over the base (small; served by the multi-LoRA engine) "
                         "or a whole model folder of the base's size")
    if kind != "lora":
        return {"kind": "model"}
    from workbench.methods.base import MAX_RANK

    r = st.number_input("LoRA rank", 1, MAX_RANK, rank, key=f"run-rank-{method}",
                        help=f"{rank} = the experts' ranks summed: plain task arithmetic exactly; trimming methods "
                             "are approximated (the artifact reports the SVD's error)")
    st.caption(f"LoRA of rank {int(r)}: about {_mb(per_rank * int(r))} (a full model: {_mb(full)})")
    return {"kind": "lora", "rank": int(r)}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@st.cache_data(show_spinner="estimating the cost", ttl=15, max_entries=32)
def _preview(doc_json: str, is_path: bool, results: str, folder: str | None) -> tuple[str, dict | str]:
    """("ok", jobs.estimate) of a launch, or ("error", its one line): the checks a launch runs, before it."""
    from workbench import jobs
    from workbench.comparison import parse_comparison

    try:
        src = json.loads(doc_json)
        c = parse_comparison(Path(src)) if is_path else \
            parse_comparison(src, "<app>", folder=Path(folder) if folder else None)
        return "ok", jobs.estimate(jobs.make_plan(c, Path(results)))
    except WorkbenchError as e:
        return "error", str(e).splitlines()[0]


def _show_preview(src, root: Path, folder: Path | None) -> bool:
    """The launch's cost (cells x examples, expected time from past runs), or the one line a launch would be refused
    with (False)."""
    is_path = not isinstance(src, dict)
    kind, est = _preview(json.dumps(str(src) if is_path else src, sort_keys=True), is_path, str(root),
                         str(folder) if folder else None)
    if kind == "error":
        st.warning(f"cannot launch: {est}")
        return False
    secs = est["seconds"]
    when = "no past runs to estimate the time from" if est["basis"] == "no past runs" else \
        (f"about {_duration(secs)} ({est['basis']})" if secs is not None else f"time unknown ({est['basis']})")
    missing = f"; not in the estimate: {', '.join(est['unknown'][:4])}{' ...' if len(est['unknown']) > 4 else ''}" \
        if est["unknown"] and secs is not None else ""
    st.info(f"cost: {est['todo']} of {est['cells']} cells to run ({est['builds']} builds, {est['evals']} evaluations "
            f"x {est['examples'] // max(est['evals'], 1) if est['evals'] else 0} examples = {est['examples']:,} "
            f"examples) · {when}{missing}")
    return True


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def _tasks_input(key: str, default: list[str]) -> list[str]:
    from workbench import jobs

    choices = jobs.task_choices()
    return st.multiselect("tasks (groups: held_in, held_out; or single tasks)", choices,
                          default=[t for t in default if t in choices] or ["held_in"], key=key)


def view_run(cat: catalog.Catalog) -> None:
    from workbench import jobs

    st.header("Run")
    root = Path(cat.root).expanduser()
    tab1, tab2 = st.tabs(["a recipe", "build one"])
    launch = None  # (document or file, folder of its recipe entries)
    with tab1:
        files = _recipes()
        if files:
            f = st.selectbox("recipe", files, format_func=lambda p: p.name, key="run-recipe")
            text = f.read_text()
            st.code(text, language="yaml")
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError:
                data = None
            is_comparison = isinstance(data, dict) and "entries" in data
            if is_comparison:
                st.caption("a comparison: its own tasks and examples per task")
                src = f
            else:
                own = (data or {}).get("eval", {}).get("tasks") if isinstance((data or {}).get("eval"), dict) else None
                rtasks = _tasks_input(f"run-recipe-tasks-{f.stem}", own or ["held_in"])
                rlimit = st.number_input("examples per task (0: all)", 0, 100_000, 20, key="run-recipe-limit")
                try:
                    src = jobs.recipe_comparison(f, limit=int(rlimit) or None, tasks=rtasks or None)
                except WorkbenchError as e:
                    st.error(str(e).splitlines()[0])
                    src = None
            if src is not None:
                folder = None if is_comparison else Path(f).resolve().parent
                _show_preview(src, root, folder)
                if st.button("launch", key="run-go-recipe"):
                    launch = (src, folder)
        else:
            st.info("No recipes under merges/.")
    with tab2:
        from workbench.methods import METHODS
        from workbench.pool import Pool

        pools = _pools()
        if pools:
            pool = st.selectbox("pool", pools, index=pools.index("demo") if "demo" in pools else 0, key="run-pool")
            method = st.selectbox("method", METHODS.names(), key="run-method",
                                  format_func=lambda m: f"{m}: {METHODS.get(m).description}"[:90])
            try:
                p = Pool.open(pool)
                names = [e.name for e in p.experts if e.kind in METHODS.get(method).expert_kinds
                         and e.name != "multitask" and not e.not_built()]  # unbuilt: not on disk (demo --full)
            except WorkbenchError as e:
                st.error(str(e))
                p, names = None, []
            experts = st.multiselect("experts", names, default=[n for n in names if not n.startswith("full-")][:6],
                                     key="run-experts")
            output = _output_input(method, p, experts) if p is not None else None
            with st.expander(f"{method} parameters (only those it reads, at its defaults)", expanded=True):
                params = _param_inputs(method)
            tasks = _tasks_input("run-tasks", ["held_in"])
            limit = st.number_input("examples per task (0: all)", 0, 100_000, 20, key="run-limit")
            try:
                doc = jobs.comparison_document(pool, method, params, experts=experts, tasks=tasks or None,
                                               limit=int(limit) or None, output=output)
            except WorkbenchError as e:
                st.error(str(e).splitlines()[0])
                doc = None
            if doc is not None:
                _show_preview(doc, root, None)
            if st.button("launch", key="run-go-build") and doc is not None:
                launch = (doc, None)
    if launch is not None:
        try:
            run = jobs.start_background(launch[0], results_dir=root, folder=launch[1], process=True)
            st.success(f"started {run.name}: it runs in its own process (pid {run.proc.pid}) and goes on if the app "
                       "stops")
        except WorkbenchError as e:
            st.error(str(e).splitlines()[0])
    _jobs_section(root)


def _jobs_section(root: Path) -> None:
    from workbench import jobs

    live = {j["name"] for j in jobs.list_jobs(root) if j["status"] in jobs.LIVE}
    st.session_state["run-live"] = sorted(live)
    # polled while a job is live (each poll reruns this part only); still otherwise
    st.fragment(_show_jobs, run_every=1.0 if live else None)(str(root))


def _show_jobs(root: str) -> None:
    from workbench import jobs

    listed = jobs.list_jobs(root)
    live = sorted(j["name"] for j in listed if j["status"] in jobs.LIVE)
    if live != st.session_state.get("run-live", []):  # a job ended or started elsewhere: redraw the page
        st.session_state["run-live"] = live
        st.rerun()
    if not listed:
        return
    st.subheader("jobs")
    st.caption(f"under {Path(root) / jobs.JOBS_FOLDER}: each in its own process, listed from disk (they outlive the "
               "app)")
    for d in listed[:_SHOWN_JOBS]:
        _show_job(d, root)


def _show_job(d: dict, root: str) -> None:
    from workbench import jobs

    name, status, p = d["name"], d["status"], d.get("progress") or {}
    done, total = p.get("done", 0), p.get("total", 0)
    with st.container(border=True):
        if status == "failed":
            st.error(f"{name}: {d.get('error')}")
            if d.get("traceback"):
                with st.expander(f"{name} traceback"):
                    st.code(d["traceback"], language=None)
        elif status == "done":
            st.success(f"{name}: done in {d['elapsed_s']:.0f} s; its leaderboard is in the Leaderboard view "
                       f"(comparison: {name})")
        elif status in ("stopped", "interrupted"):
            st.warning(f"{name}: {status} after {d['elapsed_s']:.0f} s, {done}/{total} cells: {d.get('error')}")
        else:
            eta = f" · about {_duration(p['eta_s'])} left" if p.get("eta_s") is not None else ""
            st.progress(done / total if total else 0.0,
                        text=f"{name}: {done}/{total} cells · {p.get('current') or status} · {d['elapsed_s']:.0f} s"
                             f"{eta}")
            _show_cell(d)
            if st.button("stop", key=f"run-stop-{name}", help="end the job's process now (its finished cells stay)"):
                try:
                    with st.spinner(f"stopping {name}"):
                        end = jobs.stop_job(name, root)
                    st.success(f"{name}: {end.get('status')} ({done}/{total} cells kept)")
                except WorkbenchError as e:
                    st.error(str(e).splitlines()[0])
        events = p.get("events") or []
        log = jobs.job_log(Path(d["folder"]), 40)
        if log or events:
            with st.expander(f"{name} log", expanded=status in jobs.LIVE):
                if events:
                    st.caption("finished: " + " · ".join(events[-8:]))
                steps = d.get("steps") or []
                if steps:
                    st.caption("steps: " + " · ".join(f"{s.get('cell')}: {s.get('desc')} {s.get('done')}/{s.get('total')} "
                                                      f"in {s.get('seconds', 0):.1f} s" for s in steps[-6:]))
                st.code("\n".join(log) or "(nothing logged yet)", language=None)
        board = jobs.job_board(Path(d["folder"]))
        if board and board.get("rows") and status != "done":
            with st.expander(f"{name} leaderboard of its finished cells ({board.get('cells')})"):
                from workbench.eval.leaderboard import leaderboard_frame

                try:
                    st.dataframe(leaderboard_frame(board), hide_index=True)
                except Exception as e:  # noqa: BLE001 - a board of another version: its one line
                    st.caption(f"not shown: {type(e).__name__}: {e}")


def _show_cell(d: dict) -> None:
    """The cell in flight (elapsed against its expected seconds) and the step inside it (a progress bar's state:
    training steps, merged tensors)."""
    cell, step = d.get("cell") or {}, d.get("step") or {}
    now = time.time()
    if cell.get("name"):
        spent = now - (cell.get("started") or now)
        exp = cell.get("expected_s")
        if exp:
            st.progress(min(spent / exp, 0.99), text=f"cell {cell['name']}: {spent:.0f} s of about {exp:.0f} s expected")
        else:
            st.caption(f"cell {cell['name']}: {spent:.0f} s")
    if step.get("desc") and not step.get("finished"):
        tot, dn = step.get("total") or 0, step.get("done") or 0
        st.progress(min(dn / tot, 1.0) if tot else 0.0,
                    text=f"{step['desc']}: {dn}/{tot} {step.get('info') or ''} · {now - (step.get('started') or now):.0f} s")
