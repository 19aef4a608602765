"""Leaderboard and Pairwise: the tables of a comparison or of a pool's runs."""

from __future__ import annotations

import math

import streamlit as st

from views.common import _fmt, _pools, pick_source, results_dir, source_view  # noqa: F401
from workbench import catalog
from workbench.errors import WorkbenchError
from workbench.eval.leaderboard import short


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
