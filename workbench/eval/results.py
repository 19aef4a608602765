"""Read results/: the latest score per (model, task) from workbench run manifests, and per-example outputs.

Each task's score is its primary metric, in its direction, as lm-eval reports them (`metrics.primary_metric` on the
run's lm-eval results JSON, beside its manifest); runs whose results JSON is gone fall back to the first metric the
manifest lists, its direction implied by its name.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import WorkbenchError
from ..tasks.suite import DOMAINS, TASKS
from . import metrics
from .record import read_samples


def iter_runs(results_dir: Path) -> list[dict[str, Any]]:
    runs = []
    from ..cells import read_record

    for p in sorted(Path(results_dir).rglob("run_*.json")):
        run = read_record(p)  # bounded in size and depth; a foreign or broken file never stops the table
        if run is not None:
            runs.append(run | {"_path": str(p)})
    return sorted(runs, key=lambda r: r.get("run_id", ""))


def run_results(run: dict[str, Any]) -> dict[str, Any] | None:
    """lm-eval's results JSON of a run read from disk: `results_<run_id>.json` beside its manifest (bounded read;
    None when absent or unreadable)."""
    from ..cells import read_record

    if not run.get("_path") or not run.get("run_id"):
        return None
    return read_record(Path(run["_path"]).with_name(f"results_{run['run_id']}.json"))


def run_metric(run: dict[str, Any], task: str, results: Any = None,
               sample_metrics: list[str] | None = None) -> metrics.MetricSpec | None:
    """A run's primary metric for `task` (`metrics.primary_metric`; `results`: its lm-eval results JSON when already
    read, else read from beside the manifest)."""
    scores = (run.get("scores") or {}).get(task)
    return metrics.primary_metric(task, results if results is not None else run_results(run), sample_metrics,
                                  scores if isinstance(scores, dict) else None)


def run_filter(run: dict[str, Any], task: str, results: Any = None,
               samples: list[dict[str, Any]] | None = None) -> str | None:
    """The one lm-eval filter a run's `task` is scored by: the manifest's `filters` (run_eval records it), else
    `metrics.primary_filter` of its lm-eval results JSON (`results` when already read) and sample rows."""
    recorded = run.get("filters")
    if isinstance(recorded, dict) and isinstance(recorded.get(task), str):
        return recorded[task]
    return metrics.primary_filter(task, results if results is not None else run_results(run),
                                  [s.get("filter") for s in samples or [] if isinstance(s, dict)])


def _accuracy_by_values(run: dict[str, Any], task: str, spec: metrics.MetricSpec, results: Any,
                        cache: dict[str, list[dict[str, Any]]]) -> bool | None:
    """`metrics.accuracy_like` of a metric of a name the workbench does not know, by the run's per-example values
    of it (its one filter); None without them (the leaderboard's rule: `leaderboard._kind`)."""
    if "_path" not in run:
        return None
    key = str(run["_path"])
    if key not in cache:
        try:
            cache[key] = read_samples(run)
        except (OSError, ValueError, KeyError, EOFError, zlib.error, RecursionError, MemoryError, WorkbenchError):
            cache[key] = []  # a missing or broken samples file: the score stays, without its values
    rows = [s for s in cache[key] if isinstance(s, dict) and s.get("task") == task]
    rows = metrics.filter_rows(rows, run_filter(run, task, results, rows))
    raw = [(s.get("metrics") or {}).get(spec.name) for s in rows]
    values = [metrics._scalar(v) for v in raw]
    if not values or any(v is None for v in values):
        return None
    return metrics.accuracy_like(spec.name, values)


def collect_scores(results_dir: Path, pool: str | None = None, full_only: bool = True) -> pd.DataFrame:
    """Long table: model, method, task, kind, metric, higher_is_better, value, run_id, accuracy (latest run wins).

    Each value is lm-eval's score of the task's primary metric and its one filter (`run_filter`). `accuracy`:
    whether the metric is accuracy-like (`metrics.accuracy_like`: by its name; a name neither lm-eval nor the
    workbench knows by the run's per-example values, None without them). `full_only` skips runs made with --limit
    (partial test splits); validation-split runs are never read.
    """
    samples_cache: dict[str, list[dict[str, Any]]] = {}
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for run in iter_runs(results_dir):
        if pool and run.get("pool") != pool:
            continue
        if (full_only and run.get("limit")) or run.get("split", "test") != "test":
            continue
        scores = run.get("scores")
        if not isinstance(scores, dict):
            continue
        results = run_results(run) or {}
        for task, values in scores.items():
            spec = run_metric(run, task, results) if isinstance(values, dict) else None
            if spec is None:
                continue
            # lm-eval's score of the task's one filter (a manifest written before `filters` may hold another's)
            values = {**values, **(metrics.task_scores(results, task, run_filter(run, task, results)) or {})}
            if not metrics._num(values.get(spec.name)):
                continue
            agg = metrics.AGGREGATE_OF.get(spec.aggregation, "none") if spec.aggregation else \
                metrics.default_aggregate(spec.name)
            if agg != "mean":
                accuracy: bool | None = False
            elif spec.name in metrics.ACCURACY_METRICS or spec.name in metrics.LM_EVAL_METRICS:
                accuracy = metrics.accuracy_like(spec.name)
            else:
                accuracy = _accuracy_by_values(run, task, spec, results, samples_cache)
            kind = TASKS[task].kind if task in TASKS else ("domain" if task in DOMAINS else "other")
            info = run.get("model_info") or {}
            latest[(run["model_name"], task)] = {
                # a folder spec (absolute, or as the record writes it: $WORKBENCH_CACHE/..., ~/..., relative) shows
                # as the run's name
                "model": run["model"] if "/" not in str(run["model"]) else run["model_name"].split("__")[-1],
                "model_name": run["model_name"], "method": run.get("method"),
                "expert_task": (info.get("tags") or {}).get("task") if run.get("method") == "expert-lora" else None,
                "task": task, "kind": kind, "metric": spec.name, "higher_is_better": spec.higher_is_better,
                "value": float(values[spec.name]), "run_id": run["run_id"],
                "accuracy": accuracy,
            }
    return pd.DataFrame(list(latest.values()), columns=["model", "model_name", "method", "expert_task", "task", "kind",
                                                         "metric", "higher_is_better", "value", "run_id", "accuracy"])


def results_table(results_dir: Path, pool: str | None = None, full_only: bool = True) -> pd.DataFrame:
    """Wide table: one row per model, one column per task (its primary metric), plus held-in / held-out averages.

    Accuracy-like metrics are in percent, by the leaderboard's rule (`metrics.accuracy_like`: by the metric's name,
    exact_match, acc, acc_norm ...; a per-example f1 never, whatever its values; a name neither lm-eval nor the
    workbench knows by its per-example values, all 0 or 1 in every run shown); every other metric as it is (a word
    perplexity is a perplexity). The averages and the normalized score (a row's mean over the accuracy-like tasks
    with their own expert / those experts' mean on them) only take accuracy-like, higher-is-better tasks.
    `table.attrs["metrics"]`: task -> {metric, higher_is_better, percent}; `attrs["normalized_note"]`: the tasks the
    normalized score leaves out, and why.
    """
    df = collect_scores(results_dir, pool, full_only)
    if df.empty:
        return df
    # one metric per column: the task's metric in its earliest run shown (a model scored otherwise is left out)
    task_metric = df.sort_values("run_id").groupby("task", sort=False).metric.first().to_dict()
    df = df[[task_metric[t] == m for t, m in zip(df.task, df.metric)]]
    # accuracy-like when every run shown that says so says yes (a metric known by name: all alike)
    known = {t: [bool(x) for x in xs if x is not None and pd.notna(x)] for t, xs in df.groupby("task").accuracy}
    percent = {t: bool(known.get(t)) and all(known[t]) for t in task_metric}
    hib = df.groupby("task").higher_is_better.first().to_dict()
    df = df.assign(value=[v * 100 if percent[t] else v for v, t in zip(df.value, df.task)])
    wide = df.pivot_table(index=["model", "method"], columns="task", values="value", aggfunc="last")
    order = [t for t in [*TASKS, *DOMAINS] if t in wide.columns]
    order += sorted(t for t in wide.columns if t not in order)
    wide = wide[order]
    accuracy = [t for t in order if percent[t] and hib[t]]  # the only columns averaged together
    held_in = [t for t in accuracy if t in TASKS and TASKS[t].kind == "held_in"]
    held_out = [t for t in accuracy if t in TASKS and TASKS[t].kind == "held_out"]
    if held_in:
        wide["held_in_avg"] = wide[held_in].mean(axis=1)
    # normalized score: mean over the accuracy-like tasks with their own expert (an expert tagged with the task,
    # scored on it) / those experts' own mean on them
    own = df[(df.expert_task.notna()) & (df.expert_task == df.task) & df.task.isin(accuracy)].groupby("task").value.max()
    with_expert = [t for t in accuracy if t in own.index]
    if with_expert and own[with_expert].mean() > 0:
        wide["normalized"] = 100 * wide[with_expert].mean(axis=1) / own[with_expert].mean()
    left = [t for t in accuracy if t not in own.index]
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

    table = wide.iloc[sorted(range(len(wide)), key=lambda i: key(wide.iloc[i]))].reset_index(drop=True)
    table.attrs["metrics"] = {t: {"metric": task_metric[t], "higher_is_better": bool(hib[t]), "percent": percent[t]}
                              for t in order}
    if left and "normalized" in table.columns:
        table.attrs["normalized_note"] = f"normalized leaves out {', '.join(left)}: no expert is tagged with the task"
    return table


# Column names of the tables (* held-out)
SHORT = {"addition": "add", "sorting": "sort", "unit_conversion": "unit", "word_count": "count",
         "repeat_word": "repeat", "reverse_words": "rev", "subtraction": "sub*", "addition_phrase": "addph*",
         "sort_descending": "sortd*", "sort_phrase": "sortph*", "unit_phrase": "unitph*",
         "count_phrase": "countph*", "repeat_phrase": "repph*", "reverse_phrase": "revph*", "convert_sum": "convsum*",
         "python_code": "py ppl", "english_docs": "en ppl", "held_in_avg": "in avg",
         "held_out_avg": "out avg*", "normalized": "norm"}

METHOD_ORDER = {"base": 0, "expert-lora": 1, "multitask": 2, "expert-full": 3}


def paired_samples(run_a: dict[str, Any] | Path, run_b: dict[str, Any] | Path, task: str,
                   metric: str | None = None) -> pd.DataFrame:
    """The examples of `task` both runs scored, side by side: doc_id, question, target, response_a/_b and
    value_a/_b (`metric`, default run_a's primary metric for the task: exact match, a per-example score, or a
    perplexity task's per-document log-likelihood; None for a metric without per-example numbers, e.g. corpus BLEU),
    of each run's one lm-eval filter (`run_filter`: one row per document), for pairwise diffs and paired tests."""
    def samples_of(run):
        return [s for s in read_samples(run) if s["task"] == task]

    def results_of(run) -> Any:
        if isinstance(run, dict):
            return run_results(run)
        p = Path(run)
        if p.is_file() and p.name.startswith("run_"):
            from ..cells import read_record

            return read_record(p.with_name(f"results_{p.stem[4:]}.json"))
        return None

    def value(v: Any) -> float | None:
        if isinstance(v, list) and len(v) == 2:  # [loglikelihood, weight]: the log-likelihood; [ref, pred]: none
            v = v[0]
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, str) else None

    def one_filter(run, rows):  # the task's one lm-eval filter: one row per document
        manifest = run if isinstance(run, dict) else (read_record_of(run) or {})
        return metrics.filter_rows(rows, run_filter(manifest, task, results_of(run) or {}, rows))

    def read_record_of(run) -> Any:
        p = Path(run)
        if p.is_file() and p.name.startswith("run_"):
            from ..cells import read_record

            return read_record(p)
        return None

    sa, sb = one_filter(run_a, samples_of(run_a)), one_filter(run_b, samples_of(run_b))
    if metric is None and sa:
        spec = metrics.primary_metric(task, results_of(run_a), list(sa[0].get("metrics") or {}))
        metric = spec.name if spec else None
    a = {s["doc_id"]: s | {"value": value((s.get("metrics") or {}).get(metric))} for s in sa}
    b = {s["doc_id"]: s | {"value": value((s.get("metrics") or {}).get(metric))} for s in sb}
    return pd.DataFrame([{"doc_id": d, "question": a[d]["question"], "target": a[d]["target"],
                          "response_a": a[d]["response"], "response_b": b[d]["response"],
                          "value_a": a[d]["value"], "value_b": b[d]["value"]} for d in sorted(a.keys() & b.keys())],
                        columns=["doc_id", "question", "target", "response_a", "response_b", "value_a", "value_b"])


def results_chart(table: pd.DataFrame, title: str = ""):
    """Heatmap of the results table's percent columns (accuracy-like tasks: held-in | held-out | averages), an altair
    chart; perplexities and other metrics are not on a 0-100 scale and are left out."""
    import altair as alt

    info = table.attrs.get("metrics") or {}
    cols = [c for c in table.columns if c not in ("model", "method") and c not in DOMAINS
            and (info.get(c) or {"percent": True})["percent"]]
    long = table.melt(id_vars=["model", "method"], value_vars=cols, var_name="column", value_name="score").dropna()
    group = {c: ("held-in" if c in TASKS and TASKS[c].kind == "held_in" else "held-out" if c in TASKS else
                 "summary" if c in ("held_in_avg", "held_out_avg", "normalized") else "other") for c in cols}
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
