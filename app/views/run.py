"""Run: launch a recipe or a one-method comparison in the background and follow it."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from views.common import ROOT, _pools
from workbench import catalog
from workbench.errors import WorkbenchError


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
