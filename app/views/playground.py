"""Playground: one prompt through several adapters, mixes and routed compositions in one batch."""

from __future__ import annotations

import time

import streamlit as st

from views.common import _fmt, _pools, pick_source, results_dir, source_view  # noqa: F401
from workbench import catalog
from workbench.errors import WorkbenchError


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
