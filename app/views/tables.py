"""Leaderboard and Pairwise: the tables of a comparison or of a pool's runs."""

from __future__ import annotations

import streamlit as st

from views.common import cell_count, facts_columns, remember, source_view, url_index, url_list, view_url
from workbench import catalog
from workbench.errors import WorkbenchError
from workbench.eval.leaderboard import short

GROUPS = {"all": "all", "held-in": "held_in", "held-out": "held_out", "other": "other"}  # the app's name -> board's


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
    from workbench.eval.stats import holm, verdict

    df = pd.DataFrame(recs)
    if len(df):  # one family: every task of the pair; the verdict by the adjusted p
        df.insert(df.columns.get_loc("p_value") + 1, "p Holm", holm(list(df.p_value)))
        df["verdict (Holm)"] = [verdict(p, d, higher_is_better=bool(r.get("higher_is_better", True)))
                                for p, d, r in zip(df["p Holm"], [r["diff"] for r in rows], rows)]
    return df


# ----------------------------------------------------------------------------- views


def disagreement_columns(a: str, b: str, row: dict) -> dict[str, str]:
    """The disagreements table's column names for the task of `row` (a pairwise row): the answers, and each side's
    per-example value named by what it is: "ok" (1 right, 0 wrong) for an accuracy-like metric, the per-document
    log-likelihood for a perplexity-like one (the perplexity aggregates them over the corpus), else the metric."""
    kind = row.get("kind") or ("accuracy" if row.get("test") == "mcnemar" else
                               "corpus" if row.get("test") in ("sign_flip_corpus", "paired_bootstrap_corpus") else "continuous")
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


def leaderboard_table(board: dict, group: str = "all", rank: dict | None = None):
    """The leaderboard frame of `board` as the app shows it for `group` (all, held-in, held-out, other: every task
    outside the suite's held-in and held-out ones): only that group's columns (`leaderboard.group_columns`: its mean,
    se and paired test, its tasks; never another group's or the test pooled over all tasks; none that no row shown
    has a value in), only the rows that scored
    a task of the group (all rows for "all"), in the order of `leaderboard.rank_shared` (over the tasks every row
    shares, in the ranking metric's direction), short task names, p values as numbers (formatted to 3
    significant digits, so that a click sorts them by value); and the column configuration that
    labels each task's value column with its metric's direction (↑ higher is better, ↓ lower) and formats percent
    columns to 0.1 and other metrics to 4 significant digits."""
    import pandas as pd

    from workbench.eval.leaderboard import group_columns, leaderboard_frame, rank_shared, task_columns, task_info

    g = GROUPS[group]
    rank = rank or rank_shared(board, g)
    df = leaderboard_frame(board)
    if not len(df):  # no row (every method filtered out): an empty table with the frame's first columns
        return pd.DataFrame(columns=["model", "method"]), {}
    order = [n for n in rank["order"] if g == "all" or n not in rank["unranked"]]
    df = df.set_index("model").loc[order].reset_index()
    df = df[group_columns(board, g, list(df.columns), df)]  # this group's columns that have a value
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
                config[names[c]] = st.column_config.NumberColumn(
                    format="%.1f" if i["kind"] == "accuracy" else "%.3g",
                    help=f"standard error ({'%' if i['kind'] == 'accuracy' else i['metric']}); empty: "
                         "no per-example values to estimate it from")
    df = df.rename(columns=names)
    for c in df.columns:
        if c in ("p (paired)", "p Holm") or c.endswith((" p", " p Holm")):
            # numbers, so that a click sorts them by value (as text 1.11e-46 sorted after 0.000307); NaN shows empty
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
            config[c] = st.column_config.NumberColumn(format="%.3g", help=(
                "Holm-adjusted over the rows tested against the reference (one family per column)" if c.endswith("Holm")
                else "paired test against the reference; empty: no test (the reference itself, or no shared example)"))
        elif c not in config and df[c].dtype.kind == "f":
            config[c] = st.column_config.NumberColumn(format="%.1f")
    return df, config


def view_leaderboard(cat: catalog.Catalog) -> None:
    from workbench.eval.leaderboard import coverage, legend, rank_shared

    got = source_view(cat, "Leaderboard", "lb")
    if got is None:
        return
    src, names = got
    c1, c2, c3 = st.columns(3)
    ref_default = names.index(src.reference) if src.reference in names else 0
    ref = c1.selectbox("reference row (paired test)", names, index=url_index("ref", names, ref_default),
                       key=f"lb-ref-{src.kind}-{src.name}")
    methods = sorted({r["method"] for r in src.rows})
    linked = url_list("methods")
    chosen = c2.multiselect("methods", methods, default=methods if linked is None else [m for m in linked if m in methods],
                            key=f"lb-methods-{src.kind}-{src.name}")
    groups = list(GROUPS)
    group = c3.selectbox("task group", groups, index=url_index("group", groups), key="lb-group",
                         help="other: tasks outside the built-in suite's held-in and held-out ones (perplexity "
                              "corpora, your own tasks)")
    # the methods only when some are left out: a link with every method keeps every method, new ones included
    remember(ref=ref, group=group, methods=None if set(chosen) == set(methods) else ",".join(chosen))
    if not chosen:
        st.info("No method selected: pick at least one in `methods` to show its rows.")
        return
    board = src.board(ref)
    shown = {**board, "rows": [r for r in board["rows"] if r["method"] in chosen]}
    rank = rank_shared(shown, GROUPS[group])
    df, config = leaderboard_table(shown, group, rank)
    if not len(df):
        from workbench.eval.leaderboard import group_tasks

        label = group.replace("_", "-")
        tasks = group_tasks(shown, GROUPS[group])
        st.info(f"No row shown scored a {label} task" + (f" ({', '.join(short(t) for t in tasks)})." if tasks else
                f": this source has no {label} task (its tasks: {', '.join(short(t) for t in shown['tasks'])}).")
                + " Pick another task group.")
        return
    cover = coverage(shown, GROUPS[group])
    facts = facts_columns(src, list(df.model))
    at = 2
    for col, values in (("shows", [src.shown.get(n, "") for n in df.model]),
                        ("tasks", [f"{cover[n]['tasks']}/{cover[n]['of']}" for n in df.model]),
                        ("examples", [cover[n]["examples"] for n in df.model]), ("flags", facts["flags"])):
        df.insert(at, col, values)
        at += 1
    config["tasks"] = st.column_config.TextColumn(help="tasks of this group the row scored, of the group's")
    config["examples"] = st.column_config.NumberColumn(help="examples behind the row's numbers in this group")
    config["flags"] = st.column_config.TextColumn(help="dirty tree: a run behind the row was made from uncommitted "
                                                       "code: the commit alone does not say what ran")
    if rank["subset"]:
        col = f"shared {len(rank['shared'])} tasks {'%' if rank['percent'] else 'mean'}"
        df.insert(at, col, [rank["score"].get(n, float("nan")) for n in df.model])
        config[col] = st.column_config.NumberColumn(
            f"{col} {'↑' if rank['higher_is_better'] else '↓'}", format="%.1f" if rank["percent"] else "%.4g",
            help=f"the rank: the mean over {', '.join(rank['shared'])}, the tasks every row shown scored")
    df["pairwise"] = [view_url("Pairwise", source=catalog.source_label(src), A=n, B=ref) if n != ref else None
                      for n in df.model]
    config["pairwise"] = st.column_config.LinkColumn(
        "pairwise", display_text="vs reference →", help="this row against the reference, task by task, in Pairwise")
    st.dataframe(df, hide_index=True, width="stretch", height="content", column_config=config)  # every row
    if rank["partial"]:
        what = "task" if group == "all" else f"{group} task"
        st.warning(f"These rows share no {what}: ranked by {rank['label']}.")
    left = [n for n in rank["unranked"] if GROUPS[group] != "all"]
    lines = [x for x in legend(shown) if not x.startswith("Ranked by")]
    st.caption(" ".join(lines) + f" Ranked by {rank['label']}." + (
        f" Not shown (no task of this group): {', '.join(left)}." if left else "") + " Click a column to sort.")
    csv = df.drop(columns=["pairwise"]).rename(
        columns={c: cfg.get("label") or c for c, cfg in config.items() if isinstance(cfg, dict)})
    st.download_button("download CSV", csv.to_csv(index=False).encode(), file_name=f"leaderboard-{src.name}.csv",
                       mime="text/csv", key="lb-csv")


def pooled_line(pooled: dict, a: str, b: str) -> str:
    """The pooled paired test as one sentence: A − B in points with its interval, McNemar's p, the tasks pooled."""
    lvl = round(100 * pooled["level"])
    left = (f"; left out (not accuracy-like, cannot be pooled): {', '.join(short(t) for t in pooled['left_out'])}"
            if pooled["left_out"] else "")
    return (f"**Pooled over {pooled['n']} examples of {len(pooled['tasks'])} accuracy-like tasks both scored:** "
            f"{a} − {b} = {100 * pooled['diff']:+.1f} pp ({lvl}% CI {100 * pooled['ci_low']:+.1f} to "
            f"{100 * pooled['ci_high']:+.1f}, bootstrap over examples), "
            f"{'exact McNemar' if pooled['test'] == 'mcnemar' else 'paired bootstrap'} p = {pooled['p_value']:.3g}"
            + (f" ({pooled['a_only']} examples only A got right, {pooled['b_only']} only B)" if "a_only" in pooled
               else "") + f"{left}.")


def _reading(p: dict | None) -> str:
    return "no shared accuracy-like example" if p is None else (
        f"{100 * p['diff']:+.1f} pp, p = {p['p_value']:.2g}, {p['n']} examples of {len(p['tasks'])} tasks")


def view_pairwise(cat: catalog.Catalog) -> None:
    got = source_view(cat, "Pairwise", "pw", least=2)
    if got is None:
        return
    src, names = got
    c1, c2 = st.columns(2)
    a = c1.selectbox("A", names, index=url_index("A", names), key=f"pw-a-{src.kind}-{src.name}")
    b_default = names.index(src.reference) if src.reference in names and src.reference != a else (
        1 if names[0] == a else 0)
    b = c2.selectbox("B", names, index=url_index("B", names, b_default), key=f"pw-b-{src.kind}-{src.name}")
    remember(A=a, B=b)
    if a == b:
        st.warning(f"A and B are both `{a}`: pick two different rows to compare.")
        return
    st.caption(f"A shows {src.shown.get(a, '?')}; B shows {src.shown.get(b, '?')}")
    for n in (a, b):
        f = src.facts(n)
        if f["dirty"]:
            st.warning(f"`{n}` was evaluated from a tree with uncommitted changes "
                       f"({', '.join(c for c in f['commits'] if c.endswith('+dirty'))}).")
    mine = [(p, why) for p, why in src.skipped if any(f"/cells/{n}/" in f"/{p}" for n in (a, b))]
    if mine:
        with st.expander(f"{len(mine)} cells of A or B skipped (not counted, not shown)", expanded=True):
            for p, why in mine:
                st.warning(f"{p}: {why}")
    rows = src.pairwise(a, b)
    if not rows:
        st.info(f"{a} and {b} share no scored examples.")
        return
    shown = {r["task"] for r in rows}
    missing = [t for t in src.tasks if t not in shown]
    n_examples = sum(r["n"] for r in rows)
    head = f"{len(rows)} of {len(src.tasks)} tasks, {n_examples} paired examples"
    if src.kind == "comparison":
        head += f" · {cell_count(src)}"
    if missing:
        why = {t: ("no cell of " + " or ".join(n for n in (a, b) if (n, t) not in src.cells)
                   if (a, t) not in src.cells or (b, t) not in src.cells else
                   "no per-example values or different metrics") for t in missing}
        head += " · not shown: " + "; ".join(f"{short(t)} ({w})" for t, w in why.items())
    st.caption(head)
    pooled = src.pooled(a, b)
    if pooled is not None:
        st.markdown(pooled_line(pooled, a, b))
    for o in catalog.other_readings(cat, src, a, b):
        st.info(f"`{o['source']}` reads this pair differently: {_reading(o['there'])} there, "
                f"{_reading(o['here'])} here. Why: {'; '.join(o['why'])}.")
    df = pairwise_frame(rows, a, b)
    df["examples"] = [view_url("Examples", source=catalog.source_label(src), A=a, B=b, task=t, filter="differ")
                      for t in df.task]
    st.dataframe(df, hide_index=True, width="stretch", height="content",
                 column_config={"A − B": st.column_config.NumberColumn(
                     "A − B", format="%+.4g", help="in the task's unit: points for accuracy-like metrics"),
                     "p Holm": st.column_config.NumberColumn(
                         format="%.3g", help="Holm-adjusted over this pair's tasks (one family)"),
                     "examples": st.column_config.LinkColumn(
                         "examples", display_text="examples →", help="this task's examples, A and B side by side")})
    tasks = [r["task"] for r in rows]
    task = st.selectbox("examples where they disagree, task", tasks, index=url_index("task", tasks),
                        key=f"pw-task-{src.name}")
    remember(task=task)
    try:
        diffs = src.disagreements(a, b, task)
    except WorkbenchError as e:
        st.warning(str(e))
        return
    row = next(r for r in rows if r["task"] == task)
    if not diffs:
        lost = [n for n in (a, b) if (n, task) not in src.runs]
        if lost:
            st.info(f"No per-sample outputs were kept for {' or '.join(f'`{n}`' for n in lost)} on {short(task)}: "
                    "the disagreements cannot be listed (the values above come from the cells).")
        else:
            st.info(f"No disagreement: A and B score each of the {row['n']} paired examples of {short(task)} "
                    "alike (A − B = 0).")
        return
    st.dataframe(disagreements_frame(diffs, a, b, row), hide_index=True, width="stretch")
    st.markdown(f"[all examples of {short(task)}, every row →]"
                f"({view_url('Examples', source=catalog.source_label(src), A=a, B=b, task=task, filter='differ')})")
    if row.get("kind") == "corpus":
        st.caption(f"{task}: each document's log-likelihood under each row (higher is better); {row['metric']} "
                   "aggregates them over the corpus (exp(−Σ log-likelihood / Σ weight) for a perplexity).")
    elif row.get("kind") not in (None, "accuracy"):
        st.caption(f"{task}: each example's {row['metric']} "
                   f"({'higher' if row.get('higher_is_better', True) else 'lower'} is better).")
