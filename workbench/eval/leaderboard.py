"""A comparison's leaderboard from its cell records: scores with standard errors and a paired test per row.

Each cell holds one (row, task) result with its per-example values (exact match 0/1, in doc_id order). Per
task: the mean and its standard error (`stats.stderr`, as lm-eval computes it). Per group (held-in,
held-out): the mean of the task means, its standard error sqrt(sum se_t^2) / T. Per row: a paired test
against the reference row on every example both scored (McNemar on exact match, `stats.compare`), so a
1-point gap on 100 examples reads as the noise it is. Rows are ranked by held-in mean.
"""

from __future__ import annotations

import math
from typing import Any

from ..tasks.suite import TASKS
from . import stats


def _group(task: str) -> str:
    t = TASKS.get(task)
    return "held_in" if t is not None and t.kind == "held_in" else "held_out" if t is not None else "other"


def build_leaderboard(rows: list[dict[str, Any]], cells: dict[tuple[str, str], dict[str, Any]], tasks: list[str],
                      reference: str) -> dict[str, Any]:
    """`rows`: [{name, method}] in plan order; `cells`: (row, task) -> cell record. Returns a JSON-able table."""
    ref_cells = {t: cells.get((reference, t)) for t in tasks}
    out_rows = []
    for row in rows:
        per_task, groups = {}, {"held_in": [], "held_out": []}
        paired_a, paired_b = [], []
        for t in tasks:
            c = cells.get((row["name"], t))
            if c is None:
                continue
            values = c["values"]
            # a cell may carry only its mean (a run without per-sample outputs): no error bar, no paired test
            mean = sum(values) / len(values) if values else float(c.get("mean", float("nan")))
            se = stats.stderr(values)
            if c["metric"] != "exact_match":
                # a perplexity is the corpus aggregate (lm-eval's score), not the mean of per-document values
                agg = c.get("score", c.get("mean"))
                mean, se = (float(agg) if agg is not None else float("nan")), float("nan")
            per_task[t] = {"mean": mean, "stderr": se, "n": len(values), "metric": c["metric"]}
            if c["metric"] == "exact_match" and _group(t) in groups:
                groups[_group(t)].append((mean, se))
            ref = ref_cells.get(t)
            if ref is not None and c["metric"] == "exact_match" and row["name"] != reference:
                a, b = paired_values(c, ref)
                paired_a += a
                paired_b += b
        summary = {}
        for g, vals in groups.items():
            if vals:
                summary[g] = {"mean": sum(m for m, _ in vals) / len(vals),
                              "stderr": math.sqrt(sum(s * s for _, s in vals)) / len(vals),  # NaN propagates
                              "tasks": len(vals)}
        paired = None
        if paired_a:
            c = stats.compare(paired_a, paired_b)
            paired = {"reference": reference, "n": c["n"], "diff": c["diff"], "p_value": c["p_value"],
                      "test": c["test"], "row_only": c.get("a_only"), "reference_only": c.get("b_only")}
        out_rows.append({"name": row["name"], "method": row["method"], "expert_task": row.get("expert_task"),
                         "tasks": per_task, "summary": summary, "paired": paired})
    _normalize(rows, out_rows)
    out_rows.sort(key=lambda r: -r["summary"].get("held_in", {}).get("mean", -1.0))
    return {"tasks": tasks, "reference": reference, "rows": out_rows}


def paired_values(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Two cells of one task on the examples both scored: (a's values, b's values), in a's order."""
    by_doc = dict(zip(b["doc_ids"], b["values"]))
    pairs = [(v, by_doc[d]) for d, v in zip(a["doc_ids"], a["values"]) if d in by_doc]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _normalize(rows: list[dict[str, Any]], out_rows: list[dict[str, Any]]) -> None:
    """summary["normalized"]: a row's held-in mean over its tasks / the experts' mean on those same tasks, each
    single-task expert scored on its own task (1.0: as good as keeping every expert). Only where every held-in
    task of the row has its expert among the rows."""
    own = {}
    by_name = {r["name"]: r for r in out_rows}
    for r in rows:
        t = r.get("expert_task")
        if t and r["name"] in by_name and t in by_name[r["name"]]["tasks"] and _group(t) == "held_in":
            own[t] = max(own.get(t, 0.0), by_name[r["name"]]["tasks"][t]["mean"])
    for r in out_rows:
        ts = [t for t, c in r["tasks"].items() if c["metric"] == "exact_match" and _group(t) == "held_in"]
        if ts and all(t in own for t in ts):
            denom = sum(own[t] for t in ts) / len(ts)
            if denom > 0:
                r["summary"]["normalized"] = {"mean": sum(r["tasks"][t]["mean"] for t in ts) / len(ts) / denom,
                                              "tasks": len(ts)}


def _pm(mean: float, se: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.1f} ± {100 * se:.1f}" if not math.isnan(se) else f"{100 * mean:.1f}"


def short(task: str) -> str:
    from .results import SHORT

    return SHORT.get(task, task)


def leaderboard_frame(board: dict[str, Any]):
    """The leaderboard as a DataFrame of strings (Markdown, terminal) and numbers (CSV): one row per model."""
    import pandas as pd

    recs = []
    for r in board["rows"]:
        rec: dict[str, Any] = {"model": r["name"], "method": r["method"]}
        for g in ("held_in", "held_out"):
            s = r["summary"].get(g)
            rec[f"{g} %"] = 100 * s["mean"] if s else float("nan")
            rec[f"{g} se"] = 100 * s["stderr"] if s else float("nan")
        n = r["summary"].get("normalized")
        rec["normalized %"] = 100 * n["mean"] if n else float("nan")
        p = r["paired"]
        rec["diff vs ref (pp)"] = 100 * p["diff"] if p else float("nan")
        rec["p (paired)"] = p["p_value"] if p else float("nan")
        rec["paired n"] = p["n"] if p else 0
        for t in board["tasks"]:
            c = r["tasks"].get(t)
            scale = 100 if c is None or c["metric"] == "exact_match" else 1  # perplexities are not percentages
            rec[f"{t} %"] = scale * c["mean"] if c else float("nan")
            rec[f"{t} se"] = scale * c["stderr"] if c else float("nan")
        recs.append(rec)
    return pd.DataFrame(recs)


def leaderboard_markdown(board: dict[str, Any], title: str = "") -> str:
    """Markdown: model, held-in and held-out mean ± se, the paired test against the reference, then each task."""
    ref = board["reference"]
    head = ["model", "method", "held-in %", "held-out %", "norm %", f"Δ vs {ref} (pp)", "p", *[short(t) for t in board["tasks"]]]
    lines = [f"### {title}" if title else "", "", "| " + " | ".join(head) + " |",
             "|" + "|".join([":--", ":--"] + ["--:"] * (len(head) - 2)) + "|"]
    for r in board["rows"]:
        s, p = r["summary"], r["paired"]
        cells = [r["name"], r["method"],
                 _pm(s["held_in"]["mean"], s["held_in"]["stderr"]) if "held_in" in s else "–",
                 _pm(s["held_out"]["mean"], s["held_out"]["stderr"]) if "held_out" in s else "–",
                 f"{100 * s['normalized']['mean']:.0f}" if "normalized" in s else "–",
                 f"{100 * p['diff']:+.1f}" if p else ("ref" if r["name"] == ref else "–"),
                 (f"{p['p_value']:.3g}" + ("" if p["p_value"] < 0.05 else " (ns)")) if p else "–"]
        for t in board["tasks"]:
            c = r["tasks"].get(t)
            if c is None:
                cells.append("–")
            elif c["metric"] == "exact_match":
                cells.append(_pm(c["mean"], c["stderr"]))
            else:  # a perplexity (or another continuous metric) as it is, never as a percentage
                cells.append("–" if math.isnan(c["mean"]) else f"{c['mean']:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    metrics = sorted({c["metric"] for r in board["rows"] for c in r["tasks"].values() if c["metric"] != "exact_match"})
    lines += ["", f"Exact match % ± standard error over each task's examples; group means ± sqrt(Σ se²)/T. "
              + (f"Other metrics as they are ({', '.join(metrics)}: lower is better for perplexities). " if metrics
                 else "") +
              "norm: held-in mean / the single-task experts' mean on the same tasks (each on its own task). "
              f"Δ and p: paired against `{ref}` on every example both scored (exact McNemar on exact match; "
              "(ns): p ≥ 0.05, a difference the examples cannot tell from noise)."]
    return "\n".join(lines).lstrip() + "\n"


def leaderboard_chart(board: dict[str, Any], title: str = ""):
    """Held-in and held-out means with ±1.96 se bars per model (altair)."""
    import altair as alt
    import pandas as pd

    recs = []
    for r in board["rows"]:
        for g, label in (("held_in", "held-in"), ("held_out", "held-out")):
            s = r["summary"].get(g)
            if s:
                se = 0.0 if math.isnan(s["stderr"]) else s["stderr"]
                recs.append({"model": r["name"], "group": label, "score": 100 * s["mean"],
                             "lo": 100 * max(0.0, s["mean"] - 1.96 * se), "hi": 100 * min(1.0, s["mean"] + 1.96 * se)})
    df = pd.DataFrame(recs)
    order = [r["name"] for r in board["rows"]]
    base = alt.Chart(df).encode(y=alt.Y("model:N", sort=order, title=None),
                                yOffset=alt.YOffset("group:N"), color=alt.Color("group:N", title=None))
    bars = base.mark_bar().encode(x=alt.X("score:Q", scale=alt.Scale(domain=[0, 100]), title="exact match %"),
                                  tooltip=["model", "group", alt.Tooltip("score:Q", format=".1f")])
    err = base.mark_rule(color="black").encode(x="lo:Q", x2="hi:Q")
    return (bars + err).properties(title=title or "leaderboard (95% intervals)", width=360, height=alt.Step(9))


def curve_chart(curve: dict[str, Any]):
    """Mean score over the merged experts' tasks vs their number, one line per method, ±1.96 se band."""
    import altair as alt
    import pandas as pd

    df = pd.DataFrame([{"method": p["method"], "experts": p["experts"], "score": 100 * p["mean"],
                        "lo": 100 * max(0.0, p["mean"] - 1.96 * p["stderr"]),
                        "hi": 100 * min(1.0, p["mean"] + 1.96 * p["stderr"])} for p in curve["points"]])
    base = alt.Chart(df).encode(x=alt.X("experts:O", title="experts merged"), color=alt.Color("method:N", title=None))
    line = base.mark_line(point=True).encode(y=alt.Y("score:Q", scale=alt.Scale(domain=[0, 100]),
                                                     title="exact match % (their tasks)"))
    band = base.mark_errorband(opacity=0.15).encode(y=alt.Y("lo:Q", title="exact match % (their tasks)"), y2="hi:Q")
    return (band + line).properties(title=f"{curve['name']}: pool {curve['pool']}", width=320, height=320)


__all__ = ["curve_chart", "build_leaderboard", "leaderboard_chart", "leaderboard_frame", "leaderboard_markdown"]
