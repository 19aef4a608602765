"""Expert Workbench app: which combination is best, where, and why; run experiments; try prompts.

    streamlit run app/app.py                       # reads results/ (or $WORKBENCH_RESULTS)
    streamlit run app/app.py -- --results other/   # another results folder

Every number and chart comes from the library (workbench.catalog, workbench.eval.charts, workbench.jobs,
the serving engine): the app only lays them out, so it and the CLI never disagree.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, Path(__file__).resolve().parent):  # the checkout without `pip install -e .`, and app/views
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from views.common import results_dir, url_index, write_url
from views.drawn import view_benchmarks, view_charts, view_routing, view_sweeps
from views.examples import view_examples
from views.playground import view_playground
from views.run import view_run
from views.tables import view_leaderboard, view_pairwise

from workbench import catalog
from workbench.errors import WorkbenchError

VIEWS = ["Leaderboard", "Per-task charts", "Pairwise", "Examples", "Sweeps", "Routing", "Playground", "Run",
         "Benchmarks"]


PAGES = {"Leaderboard": view_leaderboard, "Per-task charts": view_charts, "Pairwise": view_pairwise,
         "Examples": view_examples, "Sweeps": view_sweeps, "Routing": view_routing, "Playground": view_playground,
         "Run": view_run, "Benchmarks": view_benchmarks}
NO_RESULTS_NEEDED = ("Playground",)  # views that read the pools, not the results folder


def main() -> None:
    st.set_page_config(page_title="Expert Workbench", layout="wide")
    st.sidebar.title("Expert Workbench")
    root = results_dir()
    view = st.sidebar.radio("view", VIEWS, index=url_index("view", VIEWS), key="view")
    t0 = time.perf_counter()
    try:
        cat = catalog.scan(root)
    except WorkbenchError as e:
        st.error(str(e))
        return
    missing = not root.exists()
    if missing:  # a mistyped folder is not an empty one: said once, and no view adds "no results yet"
        st.warning(f"The results folder `{root}` does not exist: check the path in the sidebar (nothing was read)."
                   + ("" if view in NO_RESULTS_NEEDED else f" {view} reads it: nothing to show."))
    st.sidebar.caption(f"{cat.files} JSON files, {len(cat.runs)} runs, {len(cat.comparisons)} comparisons "
                       f"({1000 * (time.perf_counter() - t0):.0f} ms)")
    if cat.warnings:
        with st.sidebar.expander(f"{len(cat.warnings)} files skipped"):
            for path, problem in cat.warnings:
                st.warning(f"{path}: {problem}")
    if not missing or view in NO_RESULTS_NEEDED:
        PAGES[view](cat)
    write_url(view, root)


main()
