"""What every view shares: the results folder, the source picker and the view header."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import streamlit as st

from workbench import catalog

ROOT = Path(__file__).resolve().parents[2]


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


def _pools() -> list[str]:
    from workbench.pool import pool_names

    return pool_names()
