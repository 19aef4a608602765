"""Examples: every example of one task across every row of a source, side by side, filtered and searched; each one
opens in full, and in the Playground with the same prompt and models."""

from __future__ import annotations

import streamlit as st

from views.common import remember, source_view, url_index, url_value, view_url
from workbench import catalog
from workbench.errors import WorkbenchError
from workbench.eval.leaderboard import short, task_info

# the filter's URL value -> its label for 0/1 metrics and for others (read in the metric's direction)
FILTERS = {"all": ("all examples", "all examples"),
           "a-only": ("A right / B wrong", "A better than B"),
           "b-only": ("A wrong / B right", "B better than A"),
           "differ": ("A and B differ", "A and B differ"),
           "all-wrong": ("every row wrong", None),
           "all-right": ("every row right", None)}
MAX_ROWS_SHOWN = 2_000  # examples in the table at once (a task of lm-eval's has a few thousand at most)


def keep(rec: dict, how: str, a: str, b: str, names: list[str], higher_is_better: bool) -> bool:
    """Whether example `rec` (`Source.examples`) passes filter `how` (a key of FILTERS) for rows a and b."""
    va, vb = rec.get(a), rec.get(b)
    if how == "all":
        return True
    if how in ("all-wrong", "all-right"):
        vals = [rec[n] for n in names if rec.get(n) is not None]  # the rows that scored this example
        return bool(vals) and all(v == (1.0 if how == "all-right" else 0.0) for v in vals)
    if va is None or vb is None:
        return False
    if how == "differ":
        return va != vb
    better = va > vb if higher_is_better else va < vb
    worse = vb > va if higher_is_better else vb < va
    return better if how == "a-only" else worse


def value_higher_is_better(info: dict) -> bool:
    """The direction of the per-example values the browser compares (`task_info`): for a perplexity-like task they
    are per-document log-likelihoods, higher is better whatever the aggregate's direction (a lower perplexity comes
    from higher log-likelihoods); else the metric's own."""
    return True if info["kind"] == "corpus" else bool(info["higher_is_better"])


def value_name(info: dict) -> str:
    return "ok" if info["kind"] == "accuracy" else ("log-likelihood" if info["kind"] == "corpus" else info["metric"])


def value_caption(info: dict) -> str:
    """What the value per row is, and its direction."""
    if info["kind"] == "accuracy":
        return "value per row: ok (1 right, 0 wrong)"
    if info["kind"] == "corpus":
        return (f"value per row: the document's log-likelihood (higher is better; the task's {info['metric']} "
                f"aggregates them over the corpus, {'higher' if info['higher_is_better'] else 'lower'} is better)")
    return f"value per row: {info['metric']} ({'higher' if info['higher_is_better'] else 'lower'} is better)"


def matches(rec: dict, text: str) -> bool:
    """Case-insensitive search in the prompt, the target and every answer."""
    t = text.strip().lower()
    return not t or any(t in str(v).lower() for k, v in rec.items()
                        if k in ("question", "target") or k.endswith(" answer"))


def view_examples(cat: catalog.Catalog) -> None:
    got = source_view(cat, "Examples", "ex")
    if got is None:
        return
    src, names = got
    tasks = [t for t in src.tasks if any((n, t) in src.cells for n in names)]
    if not tasks:
        st.info("No task of this source has scored cells.")
        return
    c1, c2, c3 = st.columns(3)
    task = c1.selectbox("task", tasks, index=url_index("task", tasks), format_func=lambda t: f"{short(t)} ({t})",
                        key=f"ex-task-{src.kind}-{src.name}")
    have = [n for n in names if (n, task) in src.cells]  # the rows that scored the task
    a = c2.selectbox("A", have, index=url_index("A", have), key=f"ex-a-{src.kind}-{src.name}")
    b_default = have.index(src.reference) if src.reference in have and src.reference != a else (
        1 if len(have) > 1 and have[0] == a else 0)
    b = c3.selectbox("B", have, index=url_index("B", have, b_default), key=f"ex-b-{src.kind}-{src.name}")
    info = task_info(src.board(), task)
    accuracy = info["kind"] == "accuracy"
    same = a == b  # one row scored the task, or A = B picked: nothing to compare A with
    if same:
        st.warning(f"A and B are both `{a}`: the A/B filters compare nothing"
                   + (f" (only `{a}` scored {short(task)})." if len(have) == 1 else "; pick two different rows."))
    options = [k for k, labels in FILTERS.items() if labels[0 if accuracy else 1] is not None
               and not (same and k in ("a-only", "b-only", "differ"))]
    c4, c5 = st.columns([1, 2])
    how = c4.selectbox("show", options, index=url_index("filter", options),
                       format_func=lambda k: FILTERS[k][0 if accuracy else 1], key="ex-filter",
                       help="right / wrong: the example's 0/1 score; for other metrics, better or worse in the "
                            "metric's direction")
    text = c5.text_input("search prompt, target and answers", value=url_value("q", ""), key="ex-q")
    remember(task=task, A=a, B=b, filter=how, q=text or None)
    try:
        recs = src.examples(task, names)
    except WorkbenchError as e:
        st.warning(str(e))
        return
    if not recs:
        st.info(f"No per-example values for {task}: lm-eval gives none for {info['metric']} (score only).")
        return
    others = [n for n in have if n not in (a, b)]
    hib = value_higher_is_better(info)
    got_recs = [r for r in recs if keep(r, how, a, b, names, hib) and matches(r, text)]
    st.caption(f"{len(got_recs)} of {len(recs)} examples of {task} · {value_caption(info)}, from the cells the "
               "leaderboard counts; answers from the runs' per-sample outputs (empty: not kept)"
               + (f" · the first {MAX_ROWS_SHOWN} shown" if len(got_recs) > MAX_ROWS_SHOWN else ""))
    value = value_name(info)
    if not got_recs:
        st.info("No example matches this filter and search.")
        return
    import pandas as pd

    shown = list(dict.fromkeys((a, b, *others)))  # A = B: its columns once
    cols = ["doc_id", "question", "target"]
    for n in shown:
        cols += [f"{n} answer", n]
    df = pd.DataFrame(got_recs[:MAX_ROWS_SHOWN]).reindex(columns=cols)
    role = {a: " (A = B)"} if same else {a: " (A)", b: " (B)"}
    df = df.rename(columns={n: f"{n}{role.get(n, '')} {value}" for n in shown})
    st.dataframe(df, hide_index=True, width="stretch")
    ids = [r["doc_id"] for r in got_recs[:MAX_ROWS_SHOWN]]
    doc = st.selectbox("open one example in full", ids, index=url_index("doc", ids),
                       key=f"ex-doc-{src.kind}-{src.name}-{task}")
    remember(doc=doc)
    rec = next(r for r in got_recs if r["doc_id"] == doc)
    with st.container(border=True):
        st.markdown("**prompt**")
        st.text(str(rec.get("question") or "(not kept)"))
        st.markdown("**target**")
        st.text(str(rec.get("target") or "(not kept)"))
        for n in shown:
            if n in rec or f"{n} answer" in rec:
                st.markdown(f"**{n}** · {value} {rec.get(n)}")
                st.text(str(rec.get(f"{n} answer") if rec.get(f"{n} answer") is not None else "(no answer kept)"))
    if rec.get("question"):
        pool = cat.comparisons[src.name].get("pool") if src.kind == "comparison" else src.name
        st.markdown(f"[try this prompt with {a} and {b} in the Playground →]"
                    f"({view_url('Playground', pool=pool, models=f'{a},{b}', prompt=rec['question'])})")
