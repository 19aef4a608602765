"""Read results/: the latest score per (model, task) from workbench run manifests, and per-example outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..tasks.suite import DOMAINS, TASKS
from .record import read_samples

PRIMARY = {"exact_match": "exact_match", "word_perplexity": "word_perplexity"}


def iter_runs(results_dir: Path) -> list[dict[str, Any]]:
    runs = []
    from ..cells import read_record

    for p in sorted(Path(results_dir).rglob("run_*.json")):
        run = read_record(p)  # bounded in size and depth; a foreign or broken file never stops the table
        if run is not None:
            runs.append(run | {"_path": str(p)})
    return sorted(runs, key=lambda r: r.get("run_id", ""))


def collect_scores(results_dir: Path, pool: str | None = None, full_only: bool = True) -> pd.DataFrame:
    """Long table: model, method, task, kind, metric, value, run_id (latest run wins).

    `full_only` skips runs made with --limit (partial test splits); validation-split runs are never read.
    """
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for run in iter_runs(results_dir):
        if pool and run.get("pool") != pool:
            continue
        if (full_only and run.get("limit")) or run.get("split", "test") != "test":
            continue
        for task, metrics in run.get("scores", {}).items():
            metric = "exact_match" if "exact_match" in metrics else "word_perplexity"
            if metric not in metrics:
                continue
            kind = TASKS[task].kind if task in TASKS else ("domain" if task in DOMAINS else "?")
            info = run.get("model_info") or {}
            latest[(run["model_name"], task)] = {
                # a folder spec (absolute, or as the record writes it: $WORKBENCH_CACHE/..., ~/..., relative) shows
                # as the run's name
                "model": run["model"] if "/" not in str(run["model"]) else run["model_name"].split("__")[-1],
                "model_name": run["model_name"], "method": run.get("method"),
                "expert_task": (info.get("tags") or {}).get("task") if run.get("method") == "expert-lora" else None,
                "task": task, "kind": kind, "metric": metric, "value": metrics[metric], "run_id": run["run_id"],
            }
    return pd.DataFrame(list(latest.values()), columns=["model", "model_name", "method", "expert_task", "task", "kind",
                                                         "metric", "value", "run_id"])


def results_table(results_dir: Path, pool: str | None = None, full_only: bool = True) -> pd.DataFrame:
    """Wide table: one row per model, one column per task, plus held-in / held-out averages.

    Exact match is in percent; domain columns are word perplexity.
    """
    df = collect_scores(results_dir, pool, full_only)
    if df.empty:
        return df
    df = df.assign(value=[v * 100 if m == "exact_match" else v for v, m in zip(df.value, df.metric)])
    wide = df.pivot_table(index=["model", "method"], columns="task", values="value", aggfunc="last")
    order = [t for t in [*TASKS, *DOMAINS] if t in wide.columns]
    wide = wide[order]
    held_in = [t for t in order if t in TASKS and TASKS[t].kind == "held_in"]
    held_out = [t for t in order if t in TASKS and TASKS[t].kind == "held_out"]
    if held_in:
        wide["held_in_avg"] = wide[held_in].mean(axis=1)
        # normalized score: held-in average / the experts' own average (each LoRA expert on its own task)
        own = df[(df.expert_task.notna()) & (df.expert_task == df.task)]
        own = own[own.task.isin(held_in)].groupby("task").value.max()
        if len(own) == len(held_in) and own.mean() > 0:
            wide["normalized"] = 100 * wide["held_in_avg"] / own.mean()
    if held_out:
        wide["held_out_avg"] = wide[held_out].mean(axis=1)
    wide = wide.reset_index()
    # rows: base, LoRA experts (in task order), multitask, full experts, then combinations by method
    task_rank = {t: i for i, t in enumerate(TASKS)}
    first = df.groupby("model_name").run_id.min()
    names = dict(zip(df.model, df.model_name))
    own = dict(zip(df.model, df.expert_task))

    def key(row):
        group = METHOD_ORDER.get(row.method, len(METHOD_ORDER))
        return (group, task_rank.get(own.get(row.model) or "", 99), first.get(names.get(row.model), ""), row.model)

    return wide.iloc[sorted(range(len(wide)), key=lambda i: key(wide.iloc[i]))].reset_index(drop=True)


# Column names of the tables (* held-out)
SHORT = {"addition": "add", "sorting": "sort", "unit_conversion": "unit", "word_count": "count",
         "repeat_word": "repeat", "reverse_words": "rev", "subtraction": "sub*", "addition_phrase": "addph*",
         "sort_descending": "sortd*", "sort_phrase": "sortph*", "unit_phrase": "unitph*",
         "count_phrase": "countph*", "repeat_phrase": "repph*", "reverse_phrase": "revph*", "convert_sum": "convsum*",
         "python_code": "py ppl", "english_docs": "en ppl", "held_in_avg": "in avg",
         "held_out_avg": "out avg*", "normalized": "norm"}

METHOD_ORDER = {"base": 0, "expert-lora": 1, "multitask": 2, "expert-full": 3}


def paired_samples(run_a: dict[str, Any] | Path, run_b: dict[str, Any] | Path, task: str) -> pd.DataFrame:
    """The examples of `task` both runs scored, side by side: doc_id, question, target, response_a/_b and
    value_a/_b (exact match, or a perplexity task's log-likelihood), for pairwise diffs and paired tests."""
    def rows(run):
        out = {}
        for s in read_samples(run):
            if s["task"] == task:
                v = s["metrics"].get("exact_match", s["metrics"].get("word_perplexity"))
                out[s["doc_id"]] = s | {"value": v[0] if isinstance(v, list) else v}
        return out

    a, b = rows(run_a), rows(run_b)
    return pd.DataFrame([{"doc_id": d, "question": a[d]["question"], "target": a[d]["target"],
                          "response_a": a[d]["response"], "response_b": b[d]["response"],
                          "value_a": a[d]["value"], "value_b": b[d]["value"]} for d in sorted(a.keys() & b.keys())],
                        columns=["doc_id", "question", "target", "response_a", "response_b", "value_a", "value_b"])


def results_chart(table: pd.DataFrame, title: str = ""):
    """Heatmap of the results table (exact match %, held-in | held-out | averages), an altair chart."""
    import altair as alt

    cols = [c for c in table.columns if c not in ("model", "method") and (c not in DOMAINS)]
    long = table.melt(id_vars=["model", "method"], value_vars=cols, var_name="column", value_name="score").dropna()
    group = {c: ("held-in" if c in TASKS and TASKS[c].kind == "held_in" else
                 "held-out" if c in TASKS else "summary") for c in cols}
    long["group"] = long.column.map(group)
    base = alt.Chart(long).encode(
        x=alt.X("column:N", sort=cols, title=None, axis=alt.Axis(labelAngle=-40)),
        y=alt.Y("model:N", sort=list(table.model), title=None))
    heat = base.mark_rect().encode(
        color=alt.Color("score:Q", scale=alt.Scale(domain=[0, 100], scheme="viridis"), title="%"),
        tooltip=["model", "method", "column", alt.Tooltip("score:Q", format=".1f")])
    text = base.mark_text(fontSize=10).encode(
        text=alt.Text("score:Q", format=".0f"),
        color=alt.condition("datum.score > 60", alt.value("black"), alt.value("white")))
    return (heat + text).properties(title=title or "exact match % by model and task", width=alt.Step(38),
                                    height=alt.Step(20))
