"""A comparison's leaderboard from its cell records: each task's primary metric in its own direction and scale, with
standard errors, group means over accuracy-like tasks only, and paired tests against the reference row.

Each cell holds one (row, task) result: its metric, direction and aggregate (`metrics.view`; older cells: implied by
the metric's name) and its per-example values in doc_id order. A task is one of four kinds (`task_metrics` in the
board, decided once per task so every row treats it alike):

- accuracy: a mean metric that is 0/1 per example by its name (exact_match, acc, acc_norm ...; a name neither
  lm-eval nor the workbench knows: by its values, all 0 or 1; `metrics.accuracy_like`): shown in %, binomial
  standard error (`stats.stderr`, as lm-eval), exact McNemar paired test;
- continuous: any other mean metric (a per-example f1 ..., even when its values happen to be all 0 or 1): shown as
  it is, standard error of the mean, paired bootstrap over examples;
- corpus: perplexity-like aggregates of `loglikelihood_rolling` tasks (word/byte perplexity exp(-Σll/Σw), bits per
  byte -Σll/Σw/ln 2): shown as the aggregate, never in %, standard error by bootstrap over documents, a paired
  permutation (sign-flip) test over documents of the aggregate difference (`stats.paired_corpus_test`: exact up to
  16 documents, so 4 documents never give p below 0.125);
- none: lm-eval gives no per-example numbers (corpus BLEU ...): the score only, and the task's `note` says why.

Per group (held-in, held-out of the built-in suite; every other task: "other") the mean of the accuracy-like,
higher-is-better task means, its standard error sqrt(Σ se_t²) / T: metrics of other scales or directions are never
averaged in. Per row, against the reference, on every example both scored: a paired test per task (`tasks[t].paired`:
`diff` row − reference in the metric's units, `gain` the same signed so + is better, `p_value`), and McNemar pooled
over the accuracy-like tasks (`paired`) and per group (`summary[group].paired`). Rows are ranked by held-in mean
when any row has one, else by the mean over their accuracy-like tasks, else by the first task in its direction
(`ranked_by`). The normalized score divides a row's mean over the accuracy-like tasks that have their own expert
(a row tagged `expert_task`) by those experts' mean on them; `normalized_note` names the tasks left out.
"""

from __future__ import annotations

import math
from typing import Any

from ..tasks.suite import TASKS
from . import metrics, stats

GROUPS = ("held_in", "held_out", "other")
GROUP_LABEL = {"held_in": "held-in", "held_out": "held-out", "other": "other"}
KINDS = ("accuracy", "continuous", "corpus", "none")


def _group(task: str) -> str:
    t = TASKS.get(task)
    return ("held_in" if t.kind == "held_in" else "held_out") if t is not None else "other"


def _kind(views: list[metrics.CellView]) -> str:
    """A task's kind from its cells (same metric and aggregate): see the module's doc. Accuracy or continuous by the
    metric's name first (`metrics.accuracy_like`: a per-example f1 is continuous even when its values are all 0 or
    1), by the values only for a metric of a name neither lm-eval nor the workbench knows."""
    agg = views[0].aggregate
    if agg in metrics.CORPUS:
        return "corpus"
    if agg != "mean":
        return "none"
    values = [x for v in views for x in v.values]
    return "accuracy" if metrics.accuracy_like(views[0].metric, values) else "continuous"


def _views(cells: dict[tuple[str, str], dict[str, Any]], tasks: list[str]
           ) -> tuple[dict[tuple[str, str], metrics.CellView], list[str]]:
    """The cells as `metrics.CellView`s, and a line for each one that cannot be read (skipped, never raised)."""
    out, bad = {}, []
    wanted = set(tasks)
    for key, c in cells.items():
        if key[1] not in wanted:
            continue
        try:
            out[key] = metrics.view(c)
        except (TypeError, ValueError, AttributeError) as e:
            bad.append(f"{key[0]}/{key[1]}: unreadable cell ({type(e).__name__}): skipped")
    return out, bad


def _pair(a: metrics.CellView, b: metrics.CellView, kind: str) -> dict[str, Any] | None:
    """Paired test of a against b on the examples both scored (by doc_id): n, a, b (each on them), diff (a − b),
    gain (+ = a better), p_value, test, and for McNemar a_only / b_only. None without per-example values or shared
    examples."""
    if not (a.per_example and b.per_example) or kind == "none":
        return None
    where = {d: i for i, d in enumerate(b.doc_ids)}
    idx = [(i, where[d]) for i, d in enumerate(a.doc_ids) if d in where]
    if not idx:
        return None
    if kind == "corpus":
        c = stats.paired_corpus_test([a.values[i] for i, _ in idx], [a.weights[i] for i, _ in idx],
                                          [b.values[j] for _, j in idx], [b.weights[j] for _, j in idx], a.aggregate)
    elif kind == "continuous":  # the bootstrap, even when a continuous metric's values happen to be all 0 or 1
        xs, ys = [a.values[i] for i, _ in idx], [b.values[j] for _, j in idx]
        c = {"n": len(xs), "mean_a": sum(xs) / len(xs), "mean_b": sum(ys) / len(ys),
             "test": "paired_bootstrap", "p_value": stats.paired_bootstrap(xs, ys)}
        c["diff"] = c["mean_a"] - c["mean_b"]
    else:
        c = stats.compare([a.values[i] for i, _ in idx], [b.values[j] for _, j in idx])
    out = {"n": c["n"], "a": c["mean_a"], "b": c["mean_b"], "diff": c["diff"],
           "gain": c["diff"] if a.higher_is_better else -c["diff"], "p_value": c["p_value"], "test": c["test"]}
    if c["test"] == "mcnemar":
        out |= {"a_only": c["a_only"], "b_only": c["b_only"]}
    return out


def pair_cells(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """Two cells of one task (rows a and b): the paired test fitting their metric (McNemar, paired bootstrap over
    examples, or a permutation test over documents for perplexity-like metrics) with metric, higher_is_better and kind; None when their
    metrics differ or either lacks per-example values."""
    va, vb = metrics.view(a), metrics.view(b)
    if (va.metric, va.aggregate) != (vb.metric, vb.aggregate):
        return None
    kind = _kind([va, vb])
    got = _pair(va, vb, kind)
    return None if got is None else got | {"metric": va.metric, "higher_is_better": va.higher_is_better, "kind": kind}


def _pooled(a: list[float], b: list[float], reference: str, tasks: list[str]) -> dict[str, Any]:
    c = stats.compare(a, b)
    return {"reference": reference, "n": c["n"], "diff": c["diff"], "gain": c["diff"], "p_value": c["p_value"],
            "test": c["test"], "row_only": c.get("a_only"), "reference_only": c.get("b_only"), "tasks": tasks}


def build_leaderboard(rows: list[dict[str, Any]], cells: dict[tuple[str, str], dict[str, Any]], tasks: list[str],
                      reference: str) -> dict[str, Any]:
    """`rows`: [{name, method, expert_task?}] in plan order; `cells`: (row, task) -> cell record. Returns a JSON-able
    table (see the module's doc)."""
    views, unreadable = _views(cells, tasks)
    info: dict[str, dict[str, Any]] = {}
    for t in tasks:
        order = [reference] + [r["name"] for r in rows if r["name"] != reference]
        first = next((views[(n, t)] for n in order if (n, t) in views), None)
        if first is None:
            continue
        same = [v for (_, task), v in views.items() if task == t and (v.metric, v.aggregate) ==
                (first.metric, first.aggregate)]
        info[t] = {"metric": first.metric, "higher_is_better": first.higher_is_better,
                   "aggregate": first.aggregate, "kind": _kind(same)}
        if info[t]["kind"] == "none":
            info[t]["note"] = first.note or f"{first.metric}: lm-eval gives no per-example values for it"
        elif info[t]["kind"] == "corpus" and not any(v.per_example for v in same):
            info[t]["note"] = first.note
    out_rows = []
    for row in rows:
        name = row["name"]
        per_task: dict[str, Any] = {}
        groups: dict[str, list[tuple[float, float]]] = {g: [] for g in GROUPS}
        pooled: dict[str, tuple[list[float], list[float], list[str]]] = {g: ([], [], []) for g in ("all", *GROUPS)}
        for t in tasks:
            v = views.get((name, t))
            if v is None:
                continue
            ti = info[t]
            same = (v.metric, v.aggregate) == (ti["metric"], ti["aggregate"])
            kind = ti["kind"] if same else _kind([v])
            entry: dict[str, Any] = {"mean": v.value, "stderr": v.stderr, "n": v.n, "metric": v.metric,
                                     "higher_is_better": v.higher_is_better, "aggregate": v.aggregate, "kind": kind,
                                     "paired": None}
            note = v.note if not same or v.note != ti.get("note") else None
            if not same:
                note = (f"{v.metric}, not the task's {ti['metric']}: no paired test, not in group means"
                        + (f"; {note}" if note else ""))
            if note:
                entry["note"] = note
            ref = views.get((reference, t))
            if name != reference and same and ref is not None and (ref.metric, ref.aggregate) == (v.metric, v.aggregate):
                got = _pair(v, ref, kind)
                if got is not None:
                    entry["paired"] = {k: got[k] for k in ("n", "diff", "gain", "p_value", "test")}
                    if "a_only" in got:
                        entry["paired"] |= {"row_only": got["a_only"], "reference_only": got["b_only"]}
            accuracy = same and kind == "accuracy" and v.higher_is_better
            if accuracy:
                groups[_group(t)].append((entry["mean"], entry["stderr"]))
                if entry["paired"] is not None:
                    by_doc = dict(zip(ref.doc_ids, ref.values))
                    for g in ("all", _group(t)):
                        xs, ys, ts = pooled[g]
                        for d, x in zip(v.doc_ids, v.values):
                            if d in by_doc:
                                xs.append(x)
                                ys.append(by_doc[d])
                        ts.append(t)
            per_task[t] = entry
        summary: dict[str, Any] = {}
        for g, vals in groups.items():
            if vals:
                summary[g] = {"mean": sum(m for m, _ in vals) / len(vals),
                              "stderr": math.sqrt(sum(s * s for _, s in vals)) / len(vals),  # NaN propagates
                              "tasks": len(vals)}
                xs, ys, ts = pooled[g]
                summary[g]["paired"] = _pooled(xs, ys, reference, ts) if xs else None
        xs, ys, ts = pooled["all"]
        out_rows.append({"name": name, "method": row["method"], "expert_task": row.get("expert_task"),
                         "tasks": per_task, "summary": summary,
                         "paired": _pooled(xs, ys, reference, ts) if xs else None})
    _holm(out_rows, tasks)
    board: dict[str, Any] = {"tasks": tasks, "reference": reference, "rows": out_rows, "task_metrics": info}
    note = _normalize(rows, out_rows, info)
    if note:
        board["normalized_note"] = note
    board["ranked_by"] = _rank(out_rows, info, tasks)
    if unreadable:
        board["unreadable"] = unreadable
    return board


def _holm(out_rows: list[dict[str, Any]], tasks: list[str]) -> None:
    """`p_holm` beside every paired test's p-value: Holm-adjusted over the rows tested against the reference, one
    family per column a reader scans down (the pooled test, each group's, each task's)."""
    families: list[list[dict[str, Any]]] = [[r["paired"] for r in out_rows if r.get("paired")]]
    for g in GROUPS:
        families.append([r["summary"][g]["paired"] for r in out_rows
                         if (r["summary"].get(g) or {}).get("paired")])
    for t in tasks:
        families.append([r["tasks"][t]["paired"] for r in out_rows if (r["tasks"].get(t) or {}).get("paired")])
    for fam in families:
        for test, adj in zip(fam, stats.holm([_nan(x["p_value"]) for x in fam])):
            test["p_holm"] = adj


def _accuracy_tasks(info: dict[str, dict[str, Any]]) -> list[str]:
    """The tasks whose metric is accuracy-like (0/1) and higher-is-better: the only ones averaged together."""
    return [t for t, i in info.items() if i["kind"] == "accuracy" and i["higher_is_better"]]


def _rank(out_rows: list[dict[str, Any]], info: dict[str, dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """Sort the rows in place (rows without the key last, plan order among ties) and say by what."""
    def finite(x: Any) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    acc = _accuracy_tasks(info)

    def acc_mean(r: dict[str, Any]) -> float | None:
        ms = [r["tasks"][t]["mean"] for t in acc if t in r["tasks"] and r["tasks"][t]["metric"] == info[t]["metric"]]
        ms = [m for m in ms if finite(m)]
        return sum(ms) / len(ms) if ms else None

    if any(finite(r["summary"].get("held_in", {}).get("mean")) for r in out_rows):
        key, by = (lambda r: r["summary"].get("held_in", {}).get("mean")), {
            "key": "held_in", "higher_is_better": True, "label": "held-in mean (accuracy-like tasks)"}
    elif any(acc_mean(r) is not None for r in out_rows):
        key, by = acc_mean, {"key": "accuracy", "higher_is_better": True,
                             "label": "mean over the accuracy-like tasks"}
    else:
        t = next((t for t in tasks if t in info and any(finite((r["tasks"].get(t) or {}).get("mean"))
                                                        for r in out_rows)), None)
        if t is None:
            return {"key": None, "higher_is_better": True, "label": "plan order (no scores)"}
        hib = info[t]["higher_is_better"]
        key = (lambda r: (r["tasks"].get(t) or {}).get("mean")
               if (r["tasks"].get(t) or {}).get("metric") == info[t]["metric"] else None)
        by = {"key": f"task:{t}", "higher_is_better": hib,
              "label": f"{t} ({info[t]['metric']}, {'higher' if hib else 'lower'} is better)"}
    sign = -1.0 if by["higher_is_better"] else 1.0
    out_rows.sort(key=lambda r: (0, sign * key(r)) if finite(key(r)) else (1, 0.0))
    return by


def paired_values(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Two cells of one task on the examples both scored: (a's values, b's values), in a's order."""
    by_doc = dict(zip(b["doc_ids"], b["values"]))
    pairs = [(v, by_doc[d]) for d, v in zip(a["doc_ids"], a["values"]) if d in by_doc]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _normalize(rows: list[dict[str, Any]], out_rows: list[dict[str, Any]], info: dict[str, dict[str, Any]]
               ) -> str | None:
    """summary["normalized"]: a row's mean over the accuracy-like, higher-is-better tasks that have their own expert
    (a row tagged `expert_task` with that task, scored on it; the best when several) / those experts' mean on the
    same tasks (1.0: as good as keeping every expert). Returns the note on the tasks left out (None: none)."""
    acc = _accuracy_tasks(info)
    by_name = {r["name"]: r for r in out_rows}
    own: dict[str, float] = {}
    for r in rows:
        t = r.get("expert_task")
        entry = (by_name.get(r["name"]) or {}).get("tasks", {}).get(t) if t else None
        if t in acc and entry and entry["metric"] == info[t]["metric"] and math.isfinite(entry["mean"]):
            own[t] = max(own.get(t, 0.0), entry["mean"])
    for r in out_rows:
        ts = [t for t in acc if t in own and t in r["tasks"] and r["tasks"][t]["metric"] == info[t]["metric"]]
        if ts:
            denom = sum(own[t] for t in ts) / len(ts)
            if denom > 0:
                r["summary"]["normalized"] = {"mean": sum(r["tasks"][t]["mean"] for t in ts) / len(ts) / denom,
                                              "tasks": len(ts), "over": ts}
    left = [t for t in acc if t not in own]
    other = [t for t in info if t not in acc]
    if not left and not other:
        return None
    bits = [f"norm over {', '.join(t for t in acc if t in own)}" if own else
            "no norm: no row is tagged (expert_task) as the own expert of an accuracy-like task"]
    if left and own:
        bits.append(f"left out: {', '.join(left)} (no row is tagged as its own expert)")
    if other:
        bits.append(f"not normalized: {', '.join(other)} (not an accuracy-like, higher-is-better metric)")
    return "; ".join(bits)


# ----------------------------------------------------------------------------- views of a board


def group_tasks(board: dict[str, Any], group: str = "all") -> list[str]:
    """The board's tasks of `group` (all, or one of GROUPS: held_in, held_out, other), in the board's order."""
    if group == "all":
        return list(board["tasks"])
    if group not in GROUPS:
        raise ValueError(f"unknown task group {group!r}: all, {', '.join(GROUPS)}")
    return [t for t in board["tasks"] if _group(t) == group]


def _scored(entry: Any, info: dict[str, Any]) -> bool:
    """A row's task entry that has a finite score in the task's metric."""
    return (isinstance(entry, dict) and entry.get("metric") == info["metric"]
            and isinstance(entry.get("mean"), (int, float)) and math.isfinite(entry["mean"]))


def coverage(board: dict[str, Any], group: str = "all") -> dict[str, dict[str, int]]:
    """Per row: how many of the group's tasks it scored (`tasks`, of `of`) and on how many examples in all
    (`examples`: the sum of its cells' n), so a mean over 2 tasks is never read as one over 6."""
    tasks = group_tasks(board, group)
    infos = {t: task_info(board, t) for t in tasks}
    out = {}
    for r in board["rows"]:
        got = [r["tasks"][t] for t in tasks if _scored(r["tasks"].get(t), infos[t])]
        out[r["name"]] = {"tasks": len(got), "of": len(tasks),
                          "examples": sum(int(e.get("n") or 0) for e in got)}
    return out


def rank_shared(board: dict[str, Any], group: str = "all") -> dict[str, Any]:
    """How the rows of `group` rank, over the tasks they share only: the ranking tasks are the group's accuracy-like,
    higher-is-better tasks (for "all": those the board is ranked by, `ranked_by`), else its first scored task in its
    direction; `shared` the ranking tasks every ranked row scored (for "all" ranked by held-in tasks, `label` says
    so and names them: the view shows every task). A row's `score` is its mean over `shared` (in % for
    accuracy-like tasks), so a row scored on 2 easy tasks is not ranked above one scored on 6. When no task is shared
    by all (`partial`), each row's own mean over its ranking tasks ranks it, and `partial` says the column mixes task
    sets. Rows with none of the ranking tasks come last (`unranked`). Returns order, score, shared, tasks, partial,
    subset (some row scored more ranking tasks than the shared ones), unranked, higher_is_better, percent and label."""
    infos = {t: task_info(board, t) for t in board["tasks"]}
    key = None
    if group == "all":
        key = (board.get("ranked_by") or {}).get("key")
        if key == "held_in":
            pool = group_tasks(board, "held_in")
        elif isinstance(key, str) and key.startswith("task:"):
            pool = [key[5:]] if key[5:] in infos else []
        else:
            pool = list(board["tasks"])
    else:
        pool = group_tasks(board, group)
    tasks = [t for t in pool if infos[t]["kind"] == "accuracy" and infos[t]["higher_is_better"]]
    if not tasks:  # no accuracy-like task: the first one anyone scored, in its own direction
        tasks = next(([t] for t in pool if infos[t]["kind"] != "none"
                      and any(_scored(r["tasks"].get(t), infos[t]) for r in board["rows"])), [])
    hib = infos[tasks[0]]["higher_is_better"] if tasks else True
    percent = bool(tasks) and infos[tasks[0]]["kind"] == "accuracy"
    has = {r["name"]: [t for t in tasks if _scored(r["tasks"].get(t), infos[t])] for r in board["rows"]}
    ranked = [r["name"] for r in board["rows"] if has[r["name"]]]
    shared = [t for t in tasks if ranked and all(t in has[n] for n in ranked)]
    partial = bool(ranked) and not shared
    subset = bool(shared) and any(len(has[n]) > len(shared) for n in ranked)  # ranked on fewer tasks than some have
    score: dict[str, float] = {}
    for r in board["rows"]:
        use = shared if shared else has[r["name"]]
        if r["name"] in ranked and use:
            score[r["name"]] = (100 if percent else 1) * sum(r["tasks"][t]["mean"] for t in use) / len(use)
    sign = -1.0 if hib else 1.0
    order = sorted(ranked, key=lambda n: sign * score[n]) + [r["name"] for r in board["rows"] if not has[r["name"]]]
    held_in = group == "all" and key == "held_in"  # "all" shows every task but ranks by the held-in ones only
    what = (f"{'held-in ' if held_in else ''}accuracy-like tasks" if percent else
            f"{short(tasks[0])} ({infos[tasks[0]]['metric']}, {'higher' if hib else 'lower'} is better)" if tasks
            else "no scored task")
    if not tasks:
        label = "plan order (no scored task in this group)"
    elif partial:
        label = (f"each row's own mean over its {what}: no task is scored by every row, so rows over different task "
                 "sets share one column (see `tasks`)")
    elif subset:
        label = (f"the mean over the {len(shared)} {what} every row scored ({', '.join(short(t) for t in shared)}); "
                 "a row's own group mean covers the tasks in its `tasks` column")
    else:
        label = (f"the mean over the {len(shared)} {what} ({', '.join(short(t) for t in shared)})" if held_in else
                 f"the mean over the {len(shared)} {what} of the group") if percent else what
    return {"order": order, "score": score, "shared": shared, "tasks": tasks, "partial": partial, "subset": subset,
            "unranked": [n for n in order if n not in ranked], "higher_is_better": hib, "percent": percent,
            "label": label}


def group_columns(board: dict[str, Any], group: str, columns: list[str], frame: Any = None) -> list[str]:
    """The columns of `leaderboard_frame(board)` (`columns`) that belong to the view of `group`: for "all" every one;
    for a group its own mean, se and paired test, its tasks' columns, and the normalized score for held-in only (it
    divides by the experts' own, held-in, tasks); never another group's columns nor the test pooled over all tasks.
    With the `frame` itself, a column no row has a value in (all NaN: a perplexity-only comparison's held-in %,
    normalized % and pooled test) is left out too, and so is `paired n` without a pooled test."""
    if group == "all":
        keep = set(columns)
    else:
        keep = {"model", "method", f"{group} %", f"{group} se", f"{group} Δ (pp)", f"{group} p", f"{group} p Holm"}
        if group == "held_in":
            keep.add("normalized %")
        for t in group_tasks(board, group):
            keep |= set(task_columns(board, t).values())
    out = [c for c in columns if c in keep]
    if frame is None or not len(frame):
        return out

    def empty(c: str) -> bool:
        col = frame[c]
        return col.dtype.kind == "f" and bool(col.isna().all())

    out = [c for c in out if c in ("model", "method") or not empty(c)]
    if "paired n" in out and "p (paired)" not in out:
        out.remove("paired n")
    return out


def task_info(board: dict[str, Any], task: str) -> dict[str, Any]:
    """A task's metric, direction, aggregate and kind: the board's `task_metrics`, or for a board written before
    them, what its first row's entry and the metric's name imply."""
    got = (board.get("task_metrics") or {}).get(task)
    if isinstance(got, dict) and got.get("kind") in KINDS:
        return got
    entry = next((r["tasks"][task] for r in board.get("rows", []) if task in (r.get("tasks") or {})), None)
    metric = str((entry or {}).get("metric") or "exact_match")
    agg = (entry or {}).get("aggregate") or metrics.default_aggregate(metric)
    kind = (entry or {}).get("kind") or ("corpus" if agg in metrics.CORPUS else "none" if agg == "none" else
                                         "accuracy" if metric in metrics.ACCURACY_METRICS else "continuous")
    hib = (entry or {}).get("higher_is_better")
    return {"metric": metric, "aggregate": agg, "kind": kind,
            "higher_is_better": hib if isinstance(hib, bool) else metrics.default_higher_is_better(metric)}


def arrow(higher_is_better: bool) -> str:
    return "↑" if higher_is_better else "↓"


def task_columns(board: dict[str, Any], task: str, arrows: bool = False) -> dict[str, str]:
    """The frame's column names of a task: value (`<task> %` for accuracy-like metrics, else `<task> <metric>`),
    se, Δ (the row's gain over the reference: + = better, in points for accuracy-like metrics) and p. `arrows`: the
    names with the metric's direction (↑ higher is better, ↓ lower), as leaderboard.csv writes them."""
    i = task_info(board, task)
    value = f"{task} %" if i["kind"] == "accuracy" else f"{task} {i['metric']}"
    if arrows:
        return {"value": f"{value} {arrow(i['higher_is_better'])}", "se": f"{task} se",
                "delta": f"{task} Δ (+ = better)", "p": f"{task} p", "p_holm": f"{task} p Holm"}
    return {"value": value, "se": f"{task} se", "delta": f"{task} Δ", "p": f"{task} p", "p_holm": f"{task} p Holm"}


def _groups_present(board: dict[str, Any]) -> list[str]:
    return ["held_in", "held_out"] + (["other"] if any("other" in r["summary"] for r in board["rows"]) else [])


def _nan(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else float("nan")


def leaderboard_frame(board: dict[str, Any], arrows: bool = False):
    """The leaderboard as a DataFrame of numbers, one row per model: group means and se (%), normalized %, the pooled
    paired test (diff in points, + = better, p and p Holm), the paired test per group (`<group> Δ (pp)`, `<group> p`,
    `<group> p Holm`), then per task its value (% for accuracy-like metrics, else as it is), se, Δ (+ = better), p
    and p Holm (`task_columns`). Holm: over the rows tested against the reference, per column. `arrows`: direction arrows in the task columns' names (the CSV)."""
    import pandas as pd

    recs = []
    for r in board["rows"]:
        rec: dict[str, Any] = {"model": r["name"], "method": r["method"]}
        for g in _groups_present(board):
            s = r["summary"].get(g)
            rec[f"{g} %"] = 100 * s["mean"] if s else float("nan")
            rec[f"{g} se"] = 100 * s["stderr"] if s else float("nan")
        n = r["summary"].get("normalized")
        rec["normalized %"] = 100 * n["mean"] if n else float("nan")
        p = r["paired"]
        rec["diff vs ref (pp, + = better)" if arrows else "diff vs ref (pp)"] = 100 * p["diff"] if p else float("nan")
        rec["p (paired)"] = p["p_value"] if p else float("nan")
        rec["p Holm"] = _nan(p.get("p_holm")) if p else float("nan")
        rec["paired n"] = p["n"] if p else 0
        for g in _groups_present(board):  # the paired test per group: held-in and held-out apart
            gp = (r["summary"].get(g) or {}).get("paired")
            rec[f"{g} Δ (pp)"] = 100 * gp["diff"] if gp else float("nan")
            rec[f"{g} p"] = gp["p_value"] if gp else float("nan")
            rec[f"{g} p Holm"] = _nan(gp.get("p_holm")) if gp else float("nan")
        for t in board["tasks"]:
            i, cols = task_info(board, t), task_columns(board, t, arrows)
            c = r["tasks"].get(t)
            scale = 100 if i["kind"] == "accuracy" else 1  # perplexities and other metrics are not percentages
            tp = (c or {}).get("paired") or {}
            gain = tp.get("gain", tp.get("diff") if i["higher_is_better"] else None)
            rec[cols["value"]] = scale * _nan(c["mean"]) if c else float("nan")
            rec[cols["se"]] = scale * _nan(c["stderr"]) if c else float("nan")
            rec[cols["delta"]] = scale * _nan(gain)
            rec[cols["p"]] = _nan(tp.get("p_value"))
            rec[cols["p_holm"]] = _nan(tp.get("p_holm"))
        recs.append(rec)
    return pd.DataFrame(recs)


def _pm(mean: float, se: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.1f} ± {100 * se:.1f}" if not math.isnan(se) else f"{100 * mean:.1f}"


def format_score(mean: Any, se: Any, kind: str) -> str:
    """A task's score as the tables print it: accuracy-like in % ± se, other metrics as they are (4 significant
    digits) ± se, '–' when unknown."""
    mean, se = _nan(mean), _nan(se)
    if kind == "accuracy":
        return _pm(mean, se)
    if math.isnan(mean):
        return "–"
    return f"{mean:.4g}" + (f" ± {se:.2g}" if not math.isnan(se) else "")


def format_gain(gain: Any, kind: str) -> str:
    """A paired gain over the reference, + = better: points for accuracy-like metrics, else the metric's units."""
    g = _nan(gain)
    if math.isnan(g):
        return "–"
    return f"{100 * g:+.1f}" if kind == "accuracy" else f"{g:+.3g}"


def short(task: str) -> str:
    from .results import SHORT

    return SHORT.get(task, task)


_AGG_TEXT = {"perplexity": "the corpus perplexity exp(−Σ log-likelihood / Σ weight)",
             "bits_per_byte": "bits per byte −Σ log-likelihood / Σ bytes / ln 2 over the corpus"}


def legend(board: dict[str, Any]) -> list[str]:
    """What the table's numbers are, one sentence each: metrics and directions, groups, norm, Δ and p, ranking."""
    ref = board["reference"]
    infos = {t: task_info(board, t) for t in board["tasks"] if any(t in r["tasks"] for r in board["rows"])}
    acc = [t for t, i in infos.items() if i["kind"] == "accuracy"]
    lines = []
    if acc:
        metric_names = sorted({infos[t]["metric"] for t in acc})
        lines.append(f"{', '.join(metric_names)} (accuracy-like, 0/1 per example): % ± standard error over the task's "
                     "examples; paired tests: exact McNemar.")
    for t, i in infos.items():
        if i["kind"] == "accuracy":
            continue
        a = arrow(i["higher_is_better"])
        what = (f"{_AGG_TEXT[i['aggregate']]} shown as it is, never as a % (lower is better for perplexities); ± "
                "bootstrap se over documents; paired test: permutation (A and B swapped per document, exact up to 16 "
                "documents) of the aggregate difference"
                if i["kind"] == "corpus" else
                "mean over examples as it is ± its se; paired test: bootstrap over examples"
                if i["kind"] == "continuous" else
                f"lm-eval's score only, no se and no paired test ({i.get('note') or 'no per-example values'})")
        if i["kind"] == "corpus" and i.get("note"):
            what += f" ({i['note']})"
        lines.append(f"{short(t)} {a}: {i['metric']}, {'higher' if i['higher_is_better'] else 'lower'} is better; "
                     f"{what}.")
    lines.append("Group means (held-in, held-out, other) only over accuracy-like, higher-is-better tasks ± "
                 "sqrt(Σ se²)/T: metrics of other scales or directions are never averaged in.")
    lines.append("norm: the row's mean over the accuracy-like tasks with their own expert / those experts' mean on the "
                 "same tasks (each on its own task)." + (f" {board['normalized_note']}." if board.get(
                     "normalized_note") else ""))
    lines.append(f"Δ and p per group: paired against `{ref}` on every example both scored, pooled over the group's "
                 "accuracy-like tasks, in points, + = better than the reference (exact McNemar), p Holm-adjusted over "
                 "the rows tested against the reference ((ns): p ≥ 0.05, a difference the examples cannot tell from "
                 "noise once every row's test is counted); the test pooled over all tasks, raw p, and per task Δ "
                 "(+ = better), p and p Holm in leaderboard.json and .csv.")
    by = board.get("ranked_by") or {}
    if by.get("label"):
        lines.append(f"Ranked by {by['label']}.")
    for u in board.get("unreadable") or []:
        lines.append(f"Skipped: {u}.")
    return lines


def _p_text(test: dict[str, Any]) -> str:
    """The Holm-adjusted p (the raw one where a board predates it), `(ns)` at 0.05 and above."""
    p = _nan(test.get("p_holm", test.get("p_value")))
    return "–" if math.isnan(p) else f"{p:.3g}" + ("" if p < 0.05 else " (ns)")


def leaderboard_markdown(board: dict[str, Any], title: str = "") -> str:
    """Markdown: model, group means ± se, norm, per group the paired test against the reference (Δ in points, p
    Holm-adjusted over the rows), then each task (its direction in the header), and the legend."""
    ref = board["reference"]
    groups = _groups_present(board)
    infos = {t: task_info(board, t) for t in board["tasks"]}
    tested = [g for g in groups if any((r["summary"].get(g) or {}).get("paired") for r in board["rows"])]
    head = ["model", "method", *[f"{GROUP_LABEL[g]} %" for g in groups], "norm %",
            *[x for g in tested for x in (f"{GROUP_LABEL[g]} Δ (pp)", f"{GROUP_LABEL[g]} p (Holm)")],
            *[f"{short(t)} {arrow(infos[t]['higher_is_better'])}" for t in board["tasks"]]]
    lines = [f"### {title}" if title else "", "", "| " + " | ".join(head) + " |",
             "|" + "|".join([":--", ":--"] + ["--:"] * (len(head) - 2)) + "|"]
    for r in board["rows"]:
        s = r["summary"]
        cells = [r["name"], r["method"],
                 *[_pm(s[g]["mean"], s[g]["stderr"]) if g in s else "–" for g in groups],
                 f"{100 * s['normalized']['mean']:.0f}" if "normalized" in s else "–"]
        for g in tested:
            gp = (s.get(g) or {}).get("paired")
            cells += [format_gain(gp.get("gain", gp["diff"]), "accuracy") if gp else ("ref" if r["name"] == ref else "–"),
                      _p_text(gp) if gp else "–"]
        for t in board["tasks"]:
            c = r["tasks"].get(t)
            cells.append("–" if c is None else format_score(c["mean"], c["stderr"], infos[t]["kind"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", " ".join(legend(board))]
    return "\n".join(lines).lstrip() + "\n"


def leaderboard_chart(board: dict[str, Any], title: str = ""):
    """Group means (accuracy-like tasks) with ±1.96 se bars per model (altair); a board without accuracy-like tasks
    draws the task it is ranked by, in its own units and direction."""
    import altair as alt
    import pandas as pd

    recs = []
    for r in board["rows"]:
        for g in _groups_present(board):
            s = r["summary"].get(g)
            if s:
                se = 0.0 if math.isnan(s["stderr"]) else s["stderr"]
                recs.append({"model": r["name"], "group": GROUP_LABEL[g], "score": 100 * s["mean"],
                             "lo": 100 * max(0.0, s["mean"] - 1.96 * se), "hi": 100 * min(1.0, s["mean"] + 1.96 * se)})
    order = [r["name"] for r in board["rows"]]
    x_title, domain = "accuracy-like tasks, %", [0, 100]
    if not recs:
        by = (board.get("ranked_by") or {}).get("key") or ""
        t = by[5:] if by.startswith("task:") else next(iter(board["tasks"]), None)
        i = task_info(board, t) if t else {"metric": "?", "higher_is_better": True, "kind": "none"}
        scale = 100 if i["kind"] == "accuracy" else 1
        for r in board["rows"]:
            c = r["tasks"].get(t) if t else None
            if c and not math.isnan(_nan(c["mean"])):
                se = 0.0 if math.isnan(_nan(c["stderr"])) else c["stderr"]
                recs.append({"model": r["name"], "group": short(t), "score": scale * c["mean"],
                             "lo": scale * (c["mean"] - 1.96 * se), "hi": scale * (c["mean"] + 1.96 * se)})
        x_title = f"{short(t) if t else ''}: {i['metric']} {arrow(i['higher_is_better'])}"
        domain = None
    df = pd.DataFrame(recs, columns=["model", "group", "score", "lo", "hi"])
    base = alt.Chart(df).encode(y=alt.Y("model:N", sort=order, title=None), yOffset=alt.YOffset("group:N"))
    x = alt.X("score:Q", scale=alt.Scale(domain=domain) if domain else alt.Scale(zero=False), title=x_title)
    # the colour on the bars only: a shared colour encoding would paint the whiskers in each bar's colour
    bars = base.mark_bar().encode(x=x, color=alt.Color("group:N", title=None),
                                  tooltip=["model", "group", alt.Tooltip("score:Q", format=".4g")])
    err = base.mark_rule(color="black").encode(x="lo:Q", x2="hi:Q")
    return (bars + err).properties(title=title or "leaderboard (95% intervals)", width=360, height=alt.Step(9))


__all__ = ["GROUPS", "KINDS", "arrow", "build_leaderboard", "coverage", "format_gain", "format_score",
           "group_columns", "group_tasks", "leaderboard_chart", "leaderboard_frame", "leaderboard_markdown", "legend",
           "pair_cells", "paired_values", "rank_shared", "task_columns", "task_info"]
