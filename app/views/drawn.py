"""Per-task charts, Sweeps, Routing and Benchmarks: the views that draw."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from views.common import (  # noqa: F401
    _fmt,
    _pools,
    pick_source,
    remember,
    results_dir,
    source_view,
    url_flag,
    url_index,
    url_list,
    url_value,
)
from workbench import catalog
from workbench.errors import WorkbenchError
from workbench.eval import charts


def view_charts(cat: catalog.Catalog) -> None:
    got = source_view(cat, "Per-task charts", "ch")
    if got is None:
        return
    src, names = got
    linked = url_list("rows")
    rows = st.multiselect("rows", names, default=names[: min(6, len(names))] if linked is None else
                          [n for n in linked if n in names], key=f"ch-rows-{src.kind}-{src.name}")
    ref_default = src.reference if src.reference in names else names[0]
    ref = st.selectbox("difference against", names, index=url_index("ref", names, names.index(ref_default)),
                       key=f"ch-ref-{src.kind}-{src.name}", help="base, multitask, the best expert or any method")
    costs = src.kind == "comparison" and st.toggle(
        "cost vs quality and held-in vs held-out", value=url_flag("costs", True), key=f"ch-cost-{src.name}",
        help="build time, extra active parameters and evaluation time per example against the held-in and held-out "
             "means")
    remember(rows=",".join(rows), ref=ref, costs=("on" if costs else "off") if src.kind == "comparison" else None)
    if not rows:
        st.info("No rows selected: pick rows above to draw the per-task bars, the difference heatmap and the scatters.")
        return
    board = src.board()
    st.altair_chart(charts.task_bars(board, rows), width="content")
    st.altair_chart(charts.diff_heatmap(board, ref, rows), width="content")
    if costs:
        _costs(cat, src, board, rows)


def _costs(cat: catalog.Catalog, src: catalog.Source, board: dict, rows: list[str]) -> None:
    from workbench.eval.costs import row_costs

    comp = cat.comparisons[src.name]
    costs = [c for c in row_costs(board | {"pool": comp.get("pool")}, comp.get("_dir"), src.cells)
             if not rows or c["model"] in rows]
    if not costs:
        st.info("No rows selected.")
        return
    st.altair_chart(charts.cost_chart(costs, f"{src.name}: cost vs quality"), width="content")
    notes = charts.cost_note(costs)
    st.caption("Costs as recorded: build time from the artifact manifests (cache), build records and the pool's "
               "training records; extra active parameters per token from artifact manifests and LoRA tensors; "
               "evaluation time per example from the cells' eval_s (lm-eval wall time, not a serving latency)."
               + ("".join(f" {n}." for n in notes) if notes else " Every row has every cost."))
    st.altair_chart(charts.generalization_chart(costs, f"{src.name}: held-in vs held-out"), width="content")


def view_sweeps(cat: catalog.Catalog) -> None:
    st.header("Sweeps")
    if cat.curves:
        st.subheader("Merge-count curves")
        cols = st.columns(min(len(cat.curves), 2))
        for i, curve in enumerate(sorted(cat.curves, key=lambda c: str(c.get("name")))):
            with cols[i % len(cols)]:
                st.altair_chart(charts.curve_chart(curve), width="stretch")
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
    tr = trace_prompt(loaded.model, loaded.tokenizer, prompt)
    # the tokenizer's own text of each token (byte-level BPE symbols such as Ġ, Ċ are bytes, not text)
    tr["text"] = [loaded.tokenizer.convert_tokens_to_string([t]) for t in tr["tokens"]]
    return tr


def _routed_models() -> list[tuple[str, str]]:
    """(pool: name, folder) of every routed composition built over the pools (imports the serving engine: torch)."""
    from workbench.pool import Pool
    from workbench.serving.engine import routed_artifacts

    found = []
    for p in _pools():
        try:
            found += [(f"{p}: {n}", str(f)) for n, f in routed_artifacts(Pool.open(p))]
        except WorkbenchError:
            continue
    return found


def view_routing(cat: catalog.Catalog) -> None:
    st.header("Routing")
    if cat.traces:
        paths = [cat.rel(t["_path"]) for t in cat.traces]
        labels = [f"{t.get('recipe', '?')}: {t.get('prompt', '')[:60]!r} ({p})" for t, p in zip(cat.traces, paths)]
        i = st.selectbox("saved trace", range(len(labels)), format_func=lambda j: labels[j], key="rt-saved",
                         index=url_index("trace", paths))
        remember(trace=paths[i])
        st.altair_chart(charts.usage_chart(cat.traces[i]), width="content")
        st.altair_chart(charts.token_chart(cat.traces[i]), width="content")
    else:
        st.info("No saved trace in this results folder (`traces/*.json`): trace a prompt live below.")
    # live tracing imports the serving engine (torch) and loads a model: only when asked, so the view opens fast
    live = st.toggle("trace a prompt live", value=url_flag("live"), key="rt-live",
                     help="lists the routed models built over your pools and traces a prompt through one (the model "
                          "loads on the first trace)")
    remember(live="on" if live else None)
    if not live:
        return
    found = _routed_models()
    if not found:
        st.info("No routed model yet. Build one (`workbench demo` builds PHATGOOSE, Arrow and avg-act over the demo "
                "pool, or the Run view), then trace prompts here.")
        return
    st.subheader("Trace a prompt")
    j = st.selectbox("routed model", range(len(found)), format_func=lambda k: found[k][0], key="rt-model",
                     index=url_index("model", [f[0] for f in found]))
    prompt = st.text_input("prompt", value=url_value("tprompt", "What is 12 + 30?"), key="rt-prompt")
    remember(model=found[j][0], tprompt=prompt or None)
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
        st.altair_chart(charts.usage_chart(tr), width="content")
        st.altair_chart(charts.token_chart(tr), width="content")


def view_benchmarks(cat: catalog.Catalog) -> None:
    st.header("Benchmarks")
    if not cat.benches:
        st.info("No benchmark records yet: `workbench bench kernels|merge|routing|serve` writes them under results/bench/.")
        return
    for rec in sorted(cat.benches, key=lambda r: str(r.get("benchmark", ""))):
        ratios = catalog.bench_ratios(rec)
        st.subheader(f"{rec.get('benchmark')} ({cat.rel(rec['_path'])})")
        st.caption(f"machine: {catalog.machine_line(rec)}" + (f" · target: {rec['target']}" if rec.get("target") else ""))
        times = charts.bench_times(rec)
        if ratios:
            st.altair_chart(charts.bench_chart(ratios, f"{rec.get('benchmark')}: ratios against peers", times),
                            width="content")
            st.caption("Each ratio is named with its direction: ↓ lower is better (times, memory), ↑ higher is "
                       "better (speedups, throughput); its tooltip gives the two absolute times it divides where the "
                       "record has them. Absolute times (s) beside: lower is better.")
        else:
            st.caption("no ratios in this record")
