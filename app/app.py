"""Expert Workbench app: which combination is best, where, and why; run experiments; try prompts.

    streamlit run app/app.py                       # reads results/ (or $WORKBENCH_RESULTS)
    streamlit run app/app.py -- --results other/   # another results folder

Every number and chart comes from the library (workbench.catalog, workbench.eval.charts, workbench.jobs,
the serving engine): the app only lays them out, so it and the CLI never disagree.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run app/app.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from workbench import catalog
from workbench.errors import WorkbenchError
from workbench.eval import charts
from workbench.eval.leaderboard import short

VIEWS = ["Leaderboard", "Per-task charts", "Pairwise", "Sweeps", "Routing", "Playground", "Run", "Benchmarks"]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--results", default=None)
    a, _ = p.parse_known_args(sys.argv[1:])
    return a


def results_dir() -> Path:
    default = _args().results or os.environ.get("WORKBENCH_RESULTS") or "results"
    value = st.sidebar.text_input("results folder", value=default, key="results_dir",
                                  help="the folder the workbench writes (lm-eval runs, comparisons, sweeps, benchmarks)")
    return Path(value).expanduser()


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


# ----------------------------------------------------------------------------- sources


def pick_source(cat: catalog.Catalog, key: str) -> catalog.Source | None:
    """A comparison (its leaderboard and cells) or the lm-eval runs of one pool."""
    pools = sorted({r.get("pool") for r in cat.runs if r.get("pool")})
    options = [f"comparison: {n}" for n in sorted(cat.comparisons)] + [f"runs: {p}" for p in pools]
    if not options:
        st.info(f"No results in `{cat.root}` yet: run `workbench demo` or `workbench compare RECIPE`, "
                "or start one in the Run view.")
        return None
    choice = st.selectbox("source", options, key=f"{key}-source",
                          help="a comparison run by `workbench compare`, or every lm-eval run of a pool")
    kind, _, name = choice.partition(": ")
    if kind == "comparison":
        src = catalog.comparison_source(cat, name)
        ev = cat.comparisons[name].get("eval") or {}
        st.caption(f"comparison `{name}` · pool {cat.comparisons[name].get('pool')} · {ev.get('split', 'test')} split · "
                   f"{'limit ' + str(ev['limit']) if ev.get('limit') else 'all examples'} per task · cells "
                   f"{cat.comparisons[name].get('cells', '?')}")
        skipped = cat.comparisons[name].get("skipped") or {}
        if skipped:
            with st.expander(f"{len(skipped)} rows skipped: {', '.join(skipped)}"):
                for k, v in skipped.items():
                    st.caption(f"{k}: {v}")
        return src
    picks = dict(st.session_state.get(f"picks-{name}", {}))
    settings = catalog.model_settings(cat, name)
    multi = {m: s for m, s in settings.items() if len(s) > 1}
    if multi:
        with st.expander(f"{len(multi)} models have runs at several settings (commit, split, limit): "
                         "pick the one each row shows"):
            for m, by in multi.items():
                labels = list(by)
                i = labels.index(picks[m] if picks.get(m) in by else catalog.default_setting(by))
                picks[m] = st.selectbox(m, labels, index=i, key=f"pick-{name}-{m}",
                                        format_func=lambda lab, by=by: f"{lab} ({len(by[lab])} runs)")
        st.session_state[f"picks-{name}"] = picks
    return catalog.runs_source(cat, name, picks)


def pairwise_verdict(p: float, diff: float, metric: str, higher_is_better: bool = True) -> str:
    """Noise, A better or B better for A − B = `diff` in `metric`'s units, read in the metric's direction (a lower
    perplexity is better: `higher_is_better=False`); p ≥ 0.05 is noise. The catalog's pairwise rows say the
    direction (`leaderboard.pair_cells`); a row that does not compares per-example values where higher is better
    (0/1 scores, log-likelihoods)."""
    from workbench.eval.stats import verdict

    return verdict(p, diff, higher_is_better=higher_is_better)


def pairwise_frame(rows: list[dict], a: str, b: str):
    """Per task: both rows' scores and A − B in the task's units (% and points for accuracy-like metrics, else the
    metric as it is), the paired p and a verdict in the metric's direction."""
    import pandas as pd

    from workbench.eval.metrics import CORPUS, default_aggregate

    recs = []
    for r in rows:
        if "kind" in r:  # the row says what it compares
            pct, unit, hib = r["kind"] == "accuracy", r["metric"], bool(r.get("higher_is_better", True))
        else:  # per-example values: 0/1 (McNemar) or, for a perplexity task, the mean log-likelihood
            pct, hib = r.get("test") == "mcnemar", True
            unit = "mean log-likelihood" if default_aggregate(str(r.get("metric"))) in CORPUS else str(r.get("metric"))
        scale = 100 if pct else 1
        recs.append({"task": r["task"], "n": r["n"], "unit": "%" if pct else unit, f"{a} (A)": scale * r["a"],
                     f"{b} (B)": scale * r["b"], "A − B": scale * r["diff"], "p_value": r["p_value"],
                     "test": r["test"], "verdict": pairwise_verdict(r["p_value"], r["diff"], unit, hib)})
    return pd.DataFrame(recs)


# ----------------------------------------------------------------------------- views


def source_view(cat: catalog.Catalog, title: str, key: str, least: int = 1):
    """A view's header and source picker: (source, row names), or None with an empty state."""
    st.header(title)
    src = pick_source(cat, key)
    if src is None:
        return None
    names = [r["name"] for r in src.rows]
    if len(names) < least:
        st.info(f"This source has {len(names)} rows: {title} needs {least} (every entry skipped or nothing finished).")
        return None
    return src, names


def disagreement_columns(a: str, b: str, row: dict) -> dict[str, str]:
    """The disagreements table's column names for the task of `row` (a pairwise row): the answers, and each side's
    per-example value named by what it is: "ok" (1 right, 0 wrong) for an accuracy-like metric, the per-document
    log-likelihood for a perplexity-like one (the perplexity aggregates them over the corpus), else the metric."""
    kind = row.get("kind") or ("accuracy" if row.get("test") == "mcnemar" else
                               "corpus" if row.get("test") == "paired_bootstrap_corpus" else "continuous")
    what = {"accuracy": "ok", "corpus": "log-likelihood"}.get(kind, str(row.get("metric") or "value"))
    return {"response_a": f"{a} answer", "response_b": f"{b} answer", "value_a": f"{a} {what}",
            "value_b": f"{b} {what}"}


def disagreements_frame(diffs: list[dict], a: str, b: str, row: dict):
    """The examples where rows a and b score differently, columns named by `disagreement_columns`; the answer columns
    are left out when neither side has any (a perplexity task scores documents, it generates no answer)."""
    import pandas as pd

    df = pd.DataFrame(diffs)
    empty = [c for c in ("response_a", "response_b") if c in df.columns and df[c].isna().all()]
    if len(empty) == 2:
        df = df.drop(columns=empty)
    return df.rename(columns=disagreement_columns(a, b, row))


def leaderboard_table(board: dict, group: str = "all"):
    """The leaderboard frame of `board` as the app shows it: the task columns of `group` (all, held-in, held-out,
    other: every task outside the suite's held-in and held-out ones), short task names, p values as text; and the
    column configuration that labels each task's value column with its metric's direction (↑ higher is better,
    ↓ lower) and formats percent columns to 0.1 and other metrics to 4 significant digits."""
    from workbench.eval.leaderboard import leaderboard_frame, task_columns, task_info
    from workbench.tasks.suite import TASKS

    def group_of(t: str) -> str:
        return ("held-in" if TASKS[t].kind == "held_in" else "held-out") if t in TASKS else "other"

    df = leaderboard_frame(board)
    drop = [c for t in board["tasks"] if group not in ("all", group_of(t)) for c in task_columns(board, t).values()]
    if group == "other":  # the suite's group means say nothing about the other tasks
        drop += ["held_in %", "held_in se", "held_out %", "held_out se"]
    df = df.drop(columns=[c for c in drop if c in df.columns])
    names, config = {}, {}
    for t in board["tasks"]:
        i, cols = task_info(board, t), task_columns(board, t)
        for role, c in cols.items():
            if c not in df.columns:
                continue
            names[c] = c.replace(t, short(t), 1)
            if role == "value":
                unit = "%" if i["kind"] == "accuracy" else i["metric"]
                config[names[c]] = st.column_config.NumberColumn(
                    f"{names[c]} {'↑' if i['higher_is_better'] else '↓'}",
                    format="%.1f" if i["kind"] == "accuracy" else "%.4g",
                    help=f"{t}: {unit}, {'higher' if i['higher_is_better'] else 'lower'} is better")
            elif role == "delta":
                config[names[c]] = st.column_config.NumberColumn(
                    f"{names[c]} (+ better)", format="%+.1f" if i["kind"] == "accuracy" else "%+.4g",
                    help="the row's gain over the reference: + = better, whatever the metric's direction")
            elif role == "se":
                config[names[c]] = st.column_config.NumberColumn(format="%.1f" if i["kind"] == "accuracy" else "%.3g")
    df = df.rename(columns=names)
    for c in df.columns:
        if c in ("p (paired)", "p Holm") or c.endswith((" p", " p Holm")):
            df[c] = ["–" if math.isnan(p) else f"{p:.3g}" for p in df[c]]
        elif c not in config and df[c].dtype.kind == "f":
            config[c] = st.column_config.NumberColumn(format="%.1f")
    return df, config


def view_leaderboard(cat: catalog.Catalog) -> None:
    got = source_view(cat, "Leaderboard", "lb")
    if got is None:
        return
    src, names = got
    c1, c2, c3 = st.columns(3)
    ref = c1.selectbox("reference row (paired test)", names, index=names.index(src.reference)
                       if src.reference in names else 0, key=f"lb-ref-{src.kind}-{src.name}")
    methods = sorted({r["method"] for r in src.rows})
    chosen = c2.multiselect("methods", methods, default=methods, key=f"lb-methods-{src.kind}-{src.name}")
    group = c3.selectbox("task group", ["all", "held-in", "held-out", "other"], key="lb-group",
                         help="other: tasks outside the built-in suite's held-in and held-out ones (perplexity "
                              "corpora, your own tasks)")
    board = src.board(ref)
    df, config = leaderboard_table(board, group)
    df = df[df.method.isin(chosen)]
    df.insert(2, "shows", [src.shown.get(n, "") for n in df.model])
    st.dataframe(df, hide_index=True, width="stretch", column_config=config)
    from workbench.eval.leaderboard import legend

    st.caption(" ".join(legend(board)) + " Click a column to sort.")
    csv = df.rename(columns={c: cfg.get("label") or c for c, cfg in config.items() if isinstance(cfg, dict)})
    st.download_button("download CSV", csv.to_csv(index=False).encode(), file_name=f"leaderboard-{src.name}.csv",
                       mime="text/csv", key="lb-csv")


def view_charts(cat: catalog.Catalog) -> None:
    got = source_view(cat, "Per-task charts", "ch")
    if got is None:
        return
    src, names = got
    rows = st.multiselect("rows", names, default=names[: min(6, len(names))], key=f"ch-rows-{src.kind}-{src.name}")
    board = src.board()
    if rows:
        st.altair_chart(charts.task_bars(board, rows), width="stretch")
    ref_default = src.reference if src.reference in names else names[0]
    ref = st.selectbox("difference against", names, index=names.index(ref_default), key=f"ch-ref-{src.kind}-{src.name}",
                       help="base, multitask, the best expert or any method")
    st.altair_chart(charts.diff_heatmap(board, ref), width="stretch")


def view_pairwise(cat: catalog.Catalog) -> None:
    got = source_view(cat, "Pairwise", "pw", least=2)
    if got is None:
        return
    src, names = got
    c1, c2 = st.columns(2)
    a = c1.selectbox("A", names, index=0, key=f"pw-a-{src.kind}-{src.name}")
    b = c2.selectbox("B", names, index=names.index(src.reference) if src.reference in names and src.reference != a
                     else (1 if names[0] == a else 0), key=f"pw-b-{src.kind}-{src.name}")
    st.caption(f"A shows {src.shown.get(a, '?')}; B shows {src.shown.get(b, '?')}")
    rows = src.pairwise(a, b)
    if not rows:
        st.info(f"{a} and {b} share no scored examples.")
        return
    st.dataframe(pairwise_frame(rows, a, b), hide_index=True, width="stretch",
                 column_config={"A − B": st.column_config.NumberColumn(
                     "A − B", format="%+.4g", help="in the task's unit: points for accuracy-like metrics")})
    task = st.selectbox("examples where they disagree, task", [r["task"] for r in rows], key=f"pw-task-{src.name}")
    try:
        diffs = src.disagreements(a, b, task)
    except WorkbenchError as e:
        st.warning(str(e))
        return
    if not diffs:
        st.info("No per-sample disagreements (or no per-sample outputs were kept for one of the runs).")
        return
    row = next(r for r in rows if r["task"] == task)
    st.dataframe(disagreements_frame(diffs, a, b, row), hide_index=True, width="stretch")
    if row.get("kind") == "corpus":
        st.caption(f"{task}: each document's log-likelihood under each row (higher is better); {row['metric']} "
                   "aggregates them over the corpus (exp(−Σ log-likelihood / Σ weight) for a perplexity).")
    elif row.get("kind") not in (None, "accuracy"):
        st.caption(f"{task}: each example's {row['metric']} "
                   f"({'higher' if row.get('higher_is_better', True) else 'lower'} is better).")


def view_sweeps(cat: catalog.Catalog) -> None:
    st.header("Sweeps")
    if cat.curves:
        from workbench.eval.leaderboard import curve_chart

        st.subheader("Merge-count curves")
        cols = st.columns(min(len(cat.curves), 2))
        for i, curve in enumerate(sorted(cat.curves, key=lambda c: str(c.get("name")))):
            with cols[i % len(cols)]:
                st.altair_chart(curve_chart(curve), width="stretch")
                note = curve.get("note")
                st.caption(f"{cat.rel(curve['_path'])}: mean over the merged experts' own accuracy-like tasks, %"
                           + (f". {note[:1].upper()}{note[1:]}." if isinstance(note, str) and note else ""))
        st.subheader("Validation sweeps")
    if not cat.sweeps:
        st.info("No sweep records yet: a recipe with a `sweep:` grid (e.g. `workbench merge merges/ta-full.yaml --eval`) "
                "writes one under results/sweeps/.")
        return
    for rec in cat.sweeps:
        st.altair_chart(charts.sweep_chart(rec), width="stretch")
        best = rec.get("best") or {}
        score = best.get("score")
        chosen = (f"chosen {best.get('point')} (validation {100 * score:.1f}%)" if isinstance(score, (int, float))
                  else "no point chosen yet (the sweep is running or was interrupted)")
        st.caption(f"{cat.rel(rec['_path'])}: {chosen}, tasks {', '.join(map(str, rec.get('tasks') or []))}, "
                   f"limit {rec.get('limit')}")


@st.cache_resource(show_spinner="loading the routed model")
def _routed_model(folder: str):
    from workbench.artifacts import load_artifact

    return load_artifact(Path(folder))


@st.cache_data(show_spinner="tracing", max_entries=64)
def _trace(folder: str, prompt: str) -> dict:
    from workbench.methods.routing import trace_prompt

    loaded = _routed_model(folder)
    return trace_prompt(loaded.model, loaded.tokenizer, prompt)


def _pools() -> list[str]:
    from workbench.pool import pool_names

    return pool_names()


def view_routing(cat: catalog.Catalog) -> None:
    st.header("Routing")
    if cat.traces:
        labels = [f"{t.get('recipe', '?')}: {t.get('prompt', '')[:60]!r} ({cat.rel(t['_path'])})" for t in cat.traces]
        i = st.selectbox("saved trace", range(len(labels)), format_func=lambda j: labels[j], key="rt-saved")
        st.altair_chart(charts.usage_chart(cat.traces[i]), width="stretch")
        st.altair_chart(charts.token_chart(cat.traces[i]), width="stretch")
    from workbench.pool import Pool
    from workbench.serving.engine import routed_artifacts

    found = []
    for p in _pools():
        try:
            found += [(f"{p}: {n}", str(f)) for n, f in routed_artifacts(Pool.open(p))]
        except WorkbenchError:
            continue
    if not found and not cat.traces:
        st.info("No routed model yet. Build one (`workbench demo` builds PHATGOOSE, Arrow and avg-act over the demo "
                "pool, or the Run view), then trace prompts here.")
        return
    if not found:
        st.info("No routed model is built in this cache: saved traces only.")
        return
    st.subheader("Trace a prompt")
    j = st.selectbox("routed model", range(len(found)), format_func=lambda k: found[k][0], key="rt-model")
    prompt = st.text_input("prompt", value="What is 12 + 30?", key="rt-prompt")
    if st.button("trace", key="rt-go") and prompt:
        st.session_state["rt-last"] = (found[j][0], found[j][1], prompt)
    if st.session_state.get("rt-last"):
        label, folder, text = st.session_state["rt-last"]
        st.caption(f"trace of {label} on {text!r} (traces are cached per model and prompt)")
        try:
            tr = _trace(folder, text)
        except Exception as e:  # noqa: BLE001 - a model that fails to load or run is one line, not a crash
            st.error(f"trace failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return
        st.altair_chart(charts.usage_chart(tr), width="stretch")
        st.altair_chart(charts.token_chart(tr), width="stretch")


@st.cache_resource(show_spinner="loading the pool into the serving engine", max_entries=2)
def _engine(pool_root: str, manifest_mtime: int):
    """The pool's serving engine (its LoRA experts, saved mixes and routed compositions), kept while the pool's
    manifest is unchanged."""
    from workbench.pool import Pool
    from workbench.serving.engine import MultiLoraModel

    return MultiLoraModel.from_pool(Pool.open(pool_root), log=lambda m: None)


def view_playground(cat: catalog.Catalog) -> None:
    st.header("Playground")
    pools = _pools()
    if not pools:
        st.info("No pool under adapters/ (or $WORKBENCH_POOLS).")
        return
    pool = st.selectbox("pool", pools, index=pools.index("demo") if "demo" in pools else 0, key="pg-pool")
    from workbench.pool import Pool

    try:
        root = Pool.open(pool).root.resolve()
        engine = _engine(str(root), (root / "pool.json").stat().st_mtime_ns)
    except WorkbenchError as e:
        st.error(str(e))
        return
    names = engine.model_names()
    models = st.multiselect("models (one batch, each row its own adapter, mix or router)", names,
                            default=names[: min(3, len(names))], key="pg-models")
    mix = st.text_input("and a mix (optional)", placeholder="mix:addition=0.5,sorting=0.5", key="pg-mix")
    prompt = st.text_area("prompt", value="What is 12 + 30?", key="pg-prompt")
    c1, c2 = st.columns(2)
    max_tokens = c1.number_input("max new tokens", 1, 256, 32, key="pg-max")
    chat = c2.checkbox("chat template", value=True, key="pg-chat")
    if st.button("run", key="pg-run"):
        want = [*models, *([mix.strip()] if mix.strip() else [])]
        if not want or not prompt.strip():
            st.warning("Pick at least one model and type a prompt.")
            return
        t0 = time.perf_counter()
        try:
            answers = engine.answer(prompt, want, max_new_tokens=int(max_tokens), chat=chat)
        except WorkbenchError as e:
            st.error(str(e))
            return
        st.session_state["pg-answers"] = (pool, answers, time.perf_counter() - t0)
    if st.session_state.get("pg-answers") and st.session_state["pg-answers"][0] == pool:
        _, answers, dt = st.session_state["pg-answers"]
        cols = st.columns(min(len(answers), 4))
        for i, (m, text) in enumerate(answers.items()):
            with cols[i % len(cols)], st.container(border=True):
                st.markdown(f"**{m}**")
                st.text(text or "(empty answer)")
        st.caption(f"{len(answers)} models in one batch: {dt:.1f} s")


def _recipes() -> list[Path]:
    return sorted((ROOT / "merges").glob("*.yaml"))


def _param_inputs(method: str) -> dict:
    from workbench.methods.base import param_fields

    values = {}
    for f in param_fields(method):
        label, key, d = f["name"], f"run-p-{method}-{f['name']}", f["default"]
        if f["type"] == "choice":
            v = st.selectbox(label, f["choices"], index=f["choices"].index(d) if d in f["choices"] else 0, key=key,
                             help=f["description"])
        elif f["type"] == "boolean" and not f["nullable"]:
            v = st.checkbox(label, value=bool(d), key=key, help=f["description"])
        elif f["type"] in ("number", "integer") and d is not None:
            v = st.number_input(label, value=d if f["type"] == "number" else int(d),
                                step=0.05 if f["type"] == "number" else 1, key=key, help=f["description"],
                                format="%.4g" if f["type"] == "number" else "%d")
        else:
            raw = st.text_input(label, value="", placeholder=f"default: {d!r}", key=key, help=f["description"])
            if not raw.strip():
                continue
            import yaml

            try:
                v = yaml.safe_load(raw)
            except yaml.YAMLError:
                v = raw
        if v != d:
            values[label] = v
    return values


def view_run(cat: catalog.Catalog) -> None:
    from workbench import jobs

    st.header("Run")
    tab1, tab2 = st.tabs(["a recipe", "build one"])
    doc = None
    with tab1:
        files = _recipes()
        if files:
            f = st.selectbox("recipe", files, format_func=lambda p: p.name, key="run-recipe")
            st.code(f.read_text(), language="yaml")
            rlimit = st.number_input("examples per task for a single recipe (0: all; comparisons keep theirs)",
                                     0, 10_000, 20, key="run-recipe-limit")
            if st.button("launch", key="run-go-recipe"):
                doc = ("file", f)
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
                names = [e.name for e in Pool.open(pool).experts if e.kind in METHODS.get(method).expert_kinds
                         and e.name != "multitask"]
            except WorkbenchError as e:
                st.error(str(e))
                names = []
            experts = st.multiselect("experts", names, default=[n for n in names if not n.startswith("full-")][:6],
                                     key="run-experts")
            params = _param_inputs(method)
            limit = st.number_input("examples per task (0: all)", 0, 10_000, 20, key="run-limit")
            if st.button("launch", key="run-go-build"):
                try:
                    doc = ("doc", jobs.comparison_document(pool, method, params, experts=experts,
                                                           limit=int(limit) or None))
                except WorkbenchError as e:
                    st.error(str(e))
    if doc is not None:
        try:
            src = doc[1] if doc[0] == "doc" else jobs.recipe_comparison(doc[1], limit=int(rlimit) or None)
            run = jobs.start_background(src, results_dir=Path(st.session_state.get("results_dir") or "results").expanduser(),
                                        folder=Path(doc[1]).resolve().parent if doc[0] != "doc" else None)
            st.success(f"started {run.name}")
        except WorkbenchError as e:
            st.error(str(e).splitlines()[0])
    _show_runs()


@st.fragment(run_every=2)
def _show_runs() -> None:
    from workbench import jobs

    runs = jobs.background_runs()
    if not runs:
        return
    st.subheader("runs in this app")
    for r in runs:
        d = r.as_dict()
        if d["status"] == "failed":
            st.error(f"{d['name']}: {d['error']}")
            if d.get("traceback"):
                with st.expander(f"{d['name']} traceback"):
                    st.code(d["traceback"], language=None)
        elif d["status"] == "done":
            st.success(f"{d['name']}: done in {d['elapsed_s']:.0f} s; its leaderboard is in the Leaderboard view "
                       f"(comparison: {d['name']})")
        else:
            frac = d["done"] / d["total"] if d["total"] else 0.0
            st.progress(frac, text=f"{d['name']}: {d['done']}/{d['total']} cells · {d['current']} · "
                                   f"{d['elapsed_s']:.0f} s")
        if d["log"]:
            with st.expander(f"{d['name']} log"):
                st.code("\n".join(d["log"][-20:]), language=None)


def view_benchmarks(cat: catalog.Catalog) -> None:
    st.header("Benchmarks")
    if not cat.benches:
        st.info("No benchmark records yet: `workbench bench kernels|merge|routing|serve` writes them under results/bench/.")
        return
    for rec in sorted(cat.benches, key=lambda r: str(r.get("benchmark", ""))):
        ratios = catalog.bench_ratios(rec)
        st.subheader(f"{rec.get('benchmark')} ({cat.rel(rec['_path'])})")
        st.caption(f"machine: {catalog.machine_line(rec)}" + (f" · target: {rec['target']}" if rec.get("target") else ""))
        if ratios:
            st.altair_chart(charts.bench_chart(ratios, f"{rec.get('benchmark')}: ratios against peers"),
                            width="stretch")
        else:
            st.caption("no ratios in this record")


PAGES = {"Leaderboard": view_leaderboard, "Per-task charts": view_charts, "Pairwise": view_pairwise,
         "Sweeps": view_sweeps, "Routing": view_routing, "Playground": view_playground, "Run": view_run,
         "Benchmarks": view_benchmarks}


def main() -> None:
    st.set_page_config(page_title="Expert Workbench", layout="wide")
    st.sidebar.title("Expert Workbench")
    root = results_dir()
    view = st.sidebar.radio("view", VIEWS, key="view")
    t0 = time.perf_counter()
    try:
        cat = catalog.scan(root)
    except WorkbenchError as e:
        st.error(str(e))
        return
    st.sidebar.caption(f"{cat.files} JSON files, {len(cat.runs)} runs, {len(cat.comparisons)} comparisons "
                       f"({1000 * (time.perf_counter() - t0):.0f} ms)")
    if cat.warnings:
        with st.sidebar.expander(f"{len(cat.warnings)} files skipped"):
            for path, problem in cat.warnings:
                st.warning(f"{path}: {problem}")
    PAGES[view](cat)


main()
