"""Altair charts of results (the app draws these; the CLI saves some of them): per-task bars with error bars,
differences against a reference row, sweep curves, routing traces and benchmark ratios."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .leaderboard import short


def _ci(mean: float, se: float, scale: float = 100.0) -> tuple[float, float]:
    if math.isnan(se):
        return scale * mean, scale * mean
    return scale * max(0.0, mean - 1.96 * se), scale * min(1.0, mean + 1.96 * se)


def task_frame(board: dict[str, Any], rows: list[str] | None = None) -> pd.DataFrame:
    """Long table of exact-match cells: model, method, task, score %, se %, 95% interval."""
    recs = []
    for r in board["rows"]:
        if rows is not None and r["name"] not in rows:
            continue
        for t, c in r["tasks"].items():
            if c["metric"] != "exact_match" or math.isnan(c["mean"]):
                continue
            lo, hi = _ci(c["mean"], c["stderr"])
            recs.append({"model": r["name"], "method": r["method"], "task": t, "score": 100 * c["mean"],
                         "se": 100 * c["stderr"] if not math.isnan(c["stderr"]) else None, "lo": lo, "hi": hi,
                         "n": c["n"]})
    return pd.DataFrame(recs, columns=["model", "method", "task", "score", "se", "lo", "hi", "n"])


def task_bars(board: dict[str, Any], rows: list[str] | None = None):
    """Grouped bars: one group per task, one bar per model, with 95% error bars (±1.96 se)."""
    import altair as alt

    df = task_frame(board, rows)
    order = [t for t in board["tasks"] if t in set(df.task)]
    base = alt.Chart(df).encode(x=alt.X("task:N", sort=order, title=None, axis=alt.Axis(labelAngle=-30)),
                                xOffset=alt.XOffset("model:N"), color=alt.Color("model:N", title=None))
    bars = base.mark_bar().encode(
        y=alt.Y("score:Q", scale=alt.Scale(domain=[0, 100]), title="exact match %"),
        tooltip=["model", "task", alt.Tooltip("score:Q", format=".1f"), alt.Tooltip("se:Q", format=".1f"), "n"])
    err = base.mark_rule(color="black").encode(y="lo:Q", y2="hi:Q")
    return (bars + err).properties(title="per task (95% intervals)", height=300)


def diff_frame(board: dict[str, Any], reference: str) -> pd.DataFrame:
    """model x task difference in points against the reference row's task means."""
    ref = next((r for r in board["rows"] if r["name"] == reference), None)
    recs = []
    if ref is None:
        return pd.DataFrame(columns=["model", "task", "diff"])
    for r in board["rows"]:
        for t, c in r["tasks"].items():
            rc = ref["tasks"].get(t)
            if rc is None or c["metric"] != "exact_match" or math.isnan(c["mean"]) or math.isnan(rc["mean"]):
                continue
            recs.append({"model": r["name"], "task": t, "diff": 100 * (c["mean"] - rc["mean"])})
    return pd.DataFrame(recs, columns=["model", "task", "diff"])


def diff_heatmap(board: dict[str, Any], reference: str):
    import altair as alt

    df = diff_frame(board, reference)
    order = [r["name"] for r in board["rows"]]
    lim = max(10.0, float(df["diff"].abs().max()) if len(df) else 10.0)
    base = alt.Chart(df).encode(x=alt.X("task:N", sort=list(board["tasks"]), title=None, axis=alt.Axis(labelAngle=-30)),
                                y=alt.Y("model:N", sort=order, title=None))
    heat = base.mark_rect().encode(
        color=alt.Color("diff:Q", scale=alt.Scale(scheme="redblue", domain=[-lim, lim]), title="pp"),
        tooltip=["model", "task", alt.Tooltip("diff:Q", format="+.1f")])
    text = base.mark_text(fontSize=10).encode(text=alt.Text("diff:Q", format="+.0f"))
    return (heat + text).properties(title=f"difference vs {reference} (points)", height=alt.Step(20))


def _point_label(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "default"


def sweep_frame(rec: dict[str, Any]) -> pd.DataFrame:
    best = (rec.get("best") or {}).get("key")
    return pd.DataFrame([{"point": _point_label(p.get("point") or {}), "score": 100 * float(p["score"]),
                          "chosen": p.get("key") == best, **{f"task {short(t)}": 100 * v
                                                             for t, v in (p.get("per_task") or {}).items()}}
                         for p in rec.get("points", []) if isinstance(p, dict) and "score" in p])


def sweep_chart(rec: dict[str, Any]):
    """A recipe's validation score over its grid, the chosen point marked."""
    import altair as alt

    df = sweep_frame(rec)
    order = list(df.point)
    base = alt.Chart(df).encode(x=alt.X("point:N", sort=order, title=None, axis=alt.Axis(labelAngle=0, labelLimit=160)),
                                y=alt.Y("score:Q", title="validation %"))
    line = base.mark_line(point=True)
    chosen = base.transform_filter("datum.chosen").mark_point(size=220, shape="diamond", filled=True, color="red")
    return (line + chosen).properties(title=f"{rec.get('recipe')}: {rec.get('split', 'validation')} "
                                            f"({len(df)} points, chosen in red)", height=320)


def usage_chart(trace: dict[str, Any]):
    """Mean expert weight per layer (heatmap, layer x expert)."""
    import altair as alt

    df = pd.DataFrame([{"layer": layer, "expert": e, "weight": w} for layer, row in zip(trace["layers"], trace["usage"])
                       for e, w in zip(trace["experts"], row)])
    base = alt.Chart(df).encode(x=alt.X("expert:N", sort=list(trace["experts"]), title=None),
                                y=alt.Y("layer:O", title="layer"))
    return (base.mark_rect().encode(color=alt.Color("weight:Q", scale=alt.Scale(scheme="blues"), title="weight"),
                                    tooltip=["layer", "expert", alt.Tooltip("weight:Q", format=".2f")])
            + base.mark_text(fontSize=9).encode(text=alt.Text("weight:Q", format=".2f"))
            ).properties(title="expert usage per layer (mean over tokens)", height=alt.Step(14))


def token_chart(trace: dict[str, Any]):
    """Per token: its top expert (mean over layers) and that expert's weight."""
    import altair as alt

    recs = []
    for i, (tok, per_layer) in enumerate(zip(trace["tokens"], trace["choices"])):
        n = len(per_layer)
        mean = [sum(layer[e] for layer in per_layer) / n for e in range(len(trace["experts"]))]
        for e, w in zip(trace["experts"], mean):
            recs.append({"position": i, "token": f"{i}:{tok}", "expert": e, "weight": w})
    df = pd.DataFrame(recs)
    return alt.Chart(df).mark_rect().encode(
        x=alt.X("token:N", sort=[f"{i}:{t}" for i, t in enumerate(trace["tokens"])], title=None,
                axis=alt.Axis(labelAngle=-60)),
        y=alt.Y("expert:N", sort=list(trace["experts"]), title=None),
        color=alt.Color("weight:Q", scale=alt.Scale(scheme="greens"), title="weight"),
        tooltip=["token", "expert", alt.Tooltip("weight:Q", format=".2f")],
    ).properties(title="expert weight per token (mean over layers)", height=alt.Step(18))


def bench_chart(ratios: list[dict[str, Any]], title: str):
    """Ratios against the peer measured in the same run, grouped by the benchmark's rows (e.g. rank and adapters);
    the dashed rule marks 1.0 (the peer)."""
    import altair as alt

    df = pd.DataFrame(ratios)
    groups = list(dict.fromkeys(df.group))
    base = alt.Chart(df).encode(
        y=alt.Y("group:N", sort=groups, title=None, axis=alt.Axis(labelLimit=320)),
        yOffset=alt.YOffset("ratio:N"), color=alt.Color("ratio:N", title=None, legend=alt.Legend(labelLimit=360)))
    bars = base.mark_bar().encode(x=alt.X("value:Q", title="ratio (1 = the peer)"),
                                  tooltip=["group", "ratio", alt.Tooltip("value:Q", format=".3f"), "target"])
    rule = alt.Chart(pd.DataFrame({"x": [1.0]})).mark_rule(color="red", strokeDash=[4, 3]).encode(x="x:Q")
    return (bars + rule).properties(title=title, height=alt.Step(10))




def router_accuracy_chart(rec: dict[str, Any], title: str):
    """Per task and layer, the share of tokens routed (top-1) to the task's own expert (heatmap, layer x task)."""
    import altair as alt

    df = pd.DataFrame([{"task": t, "layer": layer, "top1": a} for t, v in rec["tasks"].items()
                       for layer, a in zip(v.get("layers", rec["layers"]), v["top1"])])
    base = alt.Chart(df).encode(x=alt.X("layer:O", title="layer"), y=alt.Y("task:N", sort=list(rec["tasks"]), title=None))
    return base.mark_rect().encode(
        color=alt.Color("top1:Q", scale=alt.Scale(scheme="blues", domain=[0, 1]), title="top-1 = own expert"),
        tooltip=["task", "layer", alt.Tooltip("top1:Q", format=".2f")],
    ).properties(title=title, width=alt.Step(16), height=alt.Step(22))


def loss_curves_chart(curves: dict[str, list[float]], title: str, series: str = "expert",
                      y_title: str = "LM loss (gate only trains)"):
    """Training loss per step, one line per series (PHATGOOSE's gates per expert; a comparison's rows)."""
    import altair as alt

    df = pd.DataFrame([{series: e, "step": i + 1, "loss": x} for e, c in curves.items() for i, x in enumerate(c)])
    return alt.Chart(df).mark_line().encode(
        x=alt.X("step:Q"), y=alt.Y("loss:Q", title=y_title), color=alt.Color(f"{series}:N"),
        tooltip=[series, "step", alt.Tooltip("loss:Q", format=".3f")],
    ).properties(title=title, width=420, height=260)


__all__ = ["bench_chart", "diff_frame", "diff_heatmap", "loss_curves_chart", "router_accuracy_chart", "sweep_chart",
           "sweep_frame", "task_bars", "task_frame", "token_chart", "usage_chart"]
