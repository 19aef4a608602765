"""What every view shares: the results folder, the source picker, the view header, and the URL that reproduces the
current view.

The URL: the query parameters in `URL_KEYS` are read when a session starts (`url_index`, `url_value`, `url_list`: a
widget's first value) and written at the end of every run (`remember`, `write_url`), so a copied address opens the
same view with the same selection. Per view:

- every view: `view`, `results`; a view with a source picker: `source`;
- Leaderboard: `ref` (reference row), `group` (task group), `methods` (comma list; absent: every method);
- Per-task charts: `rows` (comma list, empty: none), `ref` (difference against), `costs` (on/off: the scatters);
- Pairwise: `A`, `B`, `task` (the disagreements' task);
- Examples: `task`, `A`, `B`, `filter`, `q` (search), `doc` (the example opened in full);
- Routing: `trace` (the saved trace's file), `live` (on: trace a prompt live), `model` (the routed model), `tprompt`;
- Playground: `pool`, `models`, `prompt` (`PLAYGROUND_KEYS`, kept only while it is open).

Links between views (`view_url`) are such addresses.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from urllib.parse import urlencode

import streamlit as st

from workbench import catalog

ROOT = Path(__file__).resolve().parents[2]

URL_KEYS = ("view", "results", "source", "ref", "group", "methods", "rows", "costs", "A", "B", "task", "filter", "q",
            "doc", "trace", "live", "model", "tprompt")
PLAYGROUND_KEYS = ("pool", "models", "prompt")  # what a link to the Playground carries (the Playground reads them)


# ----------------------------------------------------------------------------- the URL


def url_start() -> dict[str, str]:
    """The query parameters the session started with (read once: later runs keep them, whatever the URL says now)."""
    if "_url0" not in st.session_state:
        st.session_state["_url0"] = {k: st.query_params.get(k) for k in st.query_params}
    return st.session_state["_url0"]


def url_value(name: str, default: str | None = None) -> str | None:
    v = url_start().get(name)
    return v if isinstance(v, str) and v else default


def url_list(name: str) -> list[str] | None:
    """The start URL's comma list `name` (`rows=a,b`; present but empty: []), None when the URL does not carry it."""
    v = url_start().get(name)
    if not isinstance(v, str):
        return None
    return [x for x in (p.strip() for p in v.split(",")) if x]


def url_flag(name: str, default: bool = False) -> bool:
    """The start URL's on/off `name` (`costs=on`), else `default`."""
    v = url_value(name)
    return default if v not in ("on", "off") else v == "on"


def url_index(name: str, options: list, default: int = 0) -> int:
    """The index of the start URL's `name` in `options` (a widget's first value), else `default`."""
    v = url_value(name)
    strs = [str(o) for o in options]
    return strs.index(v) if v is not None and v in strs else default


def remember(**params) -> None:
    """The current selection of the view (written to the URL at the end of the run by `write_url`)."""
    st.session_state.setdefault("_url_now", {}).update({k: v for k, v in params.items() if v is not None})


def write_url(view: str, root: Path) -> None:
    """The URL's query parameters: this run's view, results folder and `remember`ed selection; other views' keys
    dropped; the Playground's own keys kept only while it is open."""
    want = {"view": view, "results": str(root), **{k: str(v) for k, v in st.session_state.get("_url_now", {}).items()}}
    for k in [*URL_KEYS, *(PLAYGROUND_KEYS if view != "Playground" else ())]:
        if k in st.query_params and k not in want:
            del st.query_params[k]
    for k, v in want.items():
        if st.query_params.get(k) != v:
            st.query_params[k] = v
    st.session_state["_url_now"] = {}


def view_url(view: str, **params) -> str:
    """A link (relative: this app) that opens `view` with the given selection and the current results folder."""
    q = {"view": view, "results": str(st.session_state.get("results_dir") or "")}
    q |= {k: str(v) for k, v in params.items() if v is not None}
    return "?" + urlencode(q)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--results", default=None)
    a, _ = p.parse_known_args(sys.argv[1:])
    return a


def results_dir() -> Path:
    default = url_value("results") or _args().results or os.environ.get("WORKBENCH_RESULTS") or "results"
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
        if Path(cat.root).exists():  # a missing folder is said once, by the app: not called empty here
            st.info(f"No results in `{cat.root}` yet: run `workbench demo` or `workbench compare RECIPE`, "
                    "or start one in the Run view.")
        return None
    last = st.session_state.get("_source")  # the source picked in another view of this session
    choice = st.selectbox("source", options, index=url_index("source", options, options.index(last) if last in options
                                                             else 0), key=f"{key}-source",
                          help="a comparison run by `workbench compare`, or every lm-eval run of a pool")
    st.session_state["_source"] = choice
    remember(source=choice)
    kind, _, name = choice.partition(": ")
    if kind == "comparison":
        src = catalog.comparison_source(cat, name)
        ev = cat.comparisons[name].get("eval") or {}
        st.caption(f"comparison `{name}` · pool {cat.comparisons[name].get('pool')} · {ev.get('split', 'test')} split · "
                   f"{'limit ' + str(ev['limit']) if ev.get('limit') else 'all examples'} per task · "
                   f"{cell_count(src)}")
        if cat.comparisons[name].get("rebuilt"):
            st.warning(f"`{name}`: {cat.comparisons[name]['rebuilt']}.")
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


def cell_count(src: catalog.Source) -> str:
    """A comparison's cells as read now (the counts the tables show), and what its leaderboard.json said when that
    differs (a cell truncated or replaced since)."""
    text = f"cells {len(src.cells)}/{src.planned if src.planned is not None else '?'} read"
    if src.skipped:
        text += f", {len(src.skipped)} skipped (listed in the sidebar)"
    if src.recorded and src.recorded != f"{len(src.cells)}/{src.planned}":
        text += f"; leaderboard.json says {src.recorded}"
    return text


def facts_columns(src: catalog.Source, names: list[str]) -> dict[str, list]:
    """Per row: tasks scored (k/T), examples, and flags (a row made from a tree with uncommitted changes)."""
    facts = {n: src.facts(n) for n in names}
    return {"tasks": [f"{len(facts[n]['tasks'])}/{len(src.tasks)}" for n in names],
            "examples": [facts[n]["examples"] for n in names],
            "flags": [("dirty tree: " + ", ".join(c for c in facts[n]["commits"] if c.endswith("+dirty")))
                      if facts[n]["dirty"] else "" for n in names]}


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
