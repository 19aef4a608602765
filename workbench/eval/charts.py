"""Altair charts of results (the app draws these; the CLI saves some of them): per-task bars with error bars,
differences against a reference row, sweep curves, routing traces and benchmark ratios.

The per-task bars and the difference heatmap are in points on a 0-100 scale: they draw the accuracy-like tasks only
(`leaderboard.task_info(board, t)["kind"] == "accuracy"`: 0/1 per example); tasks of other metrics (perplexities,
per-example f1, corpus BLEU) are named in the charts' subtitle (`left_out_note`) and shown in their own units and
direction by the leaderboard."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .leaderboard import arrow, short, task_info


def _ci(mean: float, se: float, scale: float = 100.0) -> tuple[float, float]:
    if math.isnan(se):
        return scale * mean, scale * mean
    return scale * max(0.0, mean - 1.96 * se), scale * min(1.0, mean + 1.96 * se)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _accuracy_cell(board: dict[str, Any], task: str, cell: dict[str, Any] | None) -> bool:
    """A task the charts draw in points: its kind on the board is accuracy (0/1 per example, `task_info`) and the cell
    is scored with the task's metric (a row scored otherwise is not on the same scale)."""
    i = task_info(board, task)
    return (i["kind"] == "accuracy" and cell is not None and cell.get("metric") == i["metric"]
            and _finite(cell.get("mean")))


def left_out(board: dict[str, Any]) -> dict[str, str]:
    """The tasks the per-task charts leave out, each with its metric: perplexities, per-example f1s, corpus BLEU and
    any other metric that is not accuracy-like (0/1 per example) is not on the charts' 0-100 point scale; the
    leaderboard shows them in their own units and direction."""
    out = {}
    for t in board["tasks"]:
        if not any(t in (r.get("tasks") or {}) for r in board["rows"]):
            continue
        i = task_info(board, t)
        if i["kind"] != "accuracy":
            out[t] = f"{i['metric']} {arrow(i['higher_is_better'])}"
    return out


def left_out_note(board: dict[str, Any]) -> str | None:
    """One line naming the tasks `left_out` leaves out (None: none)."""
    got = left_out(board)
    if not got:
        return None
    return ("not drawn (not accuracy-like, not in points; see the leaderboard): "
            + ", ".join(f"{short(t)} ({m})" for t, m in got.items()))


def _title(text: str, board: dict[str, Any]):
    import altair as alt

    note = left_out_note(board)
    return alt.TitleParams(text, subtitle=[note]) if note else text


def task_frame(board: dict[str, Any], rows: list[str] | None = None) -> pd.DataFrame:
    """Long table of the accuracy-like cells (`task_info(board, t)["kind"] == "accuracy"`: exact_match, acc, acc_norm
    ...): model, method, task, metric, score %, se %, 95% interval, n. Other metrics are not percentages: they are
    left out (`left_out`), in `df.attrs["left_out"]` {task: metric and direction}."""
    recs = []
    for r in board["rows"]:
        if rows is not None and r["name"] not in rows:
            continue
        for t, c in r["tasks"].items():
            if not _accuracy_cell(board, t, c):
                continue
            se = c.get("stderr")
            se = float(se) if _finite(se) else float("nan")
            lo, hi = _ci(c["mean"], se)
            recs.append({"model": r["name"], "method": r["method"], "task": t, "metric": c["metric"],
                         "score": 100 * c["mean"], "se": 100 * se if not math.isnan(se) else None, "lo": lo, "hi": hi,
                         "n": c["n"]})
    df = pd.DataFrame(recs, columns=["model", "method", "task", "metric", "score", "se", "lo", "hi", "n"])
    df.attrs["left_out"] = left_out(board)
    return df


def task_bars(board: dict[str, Any], rows: list[str] | None = None):
    """Grouped bars: one group per accuracy-like task, one bar per model, with 95% error bars (±1.96 se); the
    subtitle names the tasks of other metrics left out."""
    import altair as alt

    df = task_frame(board, rows)
    order = [t for t in board["tasks"] if t in set(df.task)]
    base = alt.Chart(df).encode(x=alt.X("task:N", sort=order, title=None, axis=alt.Axis(labelAngle=-30)),
                                xOffset=alt.XOffset("model:N"), color=alt.Color("model:N", title=None))
    bars = base.mark_bar().encode(
        y=alt.Y("score:Q", scale=alt.Scale(domain=[0, 100]), title="accuracy-like metrics, % ↑"),
        tooltip=["model", "task", "metric", alt.Tooltip("score:Q", format=".1f"), alt.Tooltip("se:Q", format=".1f"),
                 "n"])
    err = base.mark_rule(color="black").encode(y="lo:Q", y2="hi:Q")
    return (bars + err).properties(title=_title("per task (95% intervals)", board), height=300)


def diff_frame(board: dict[str, Any], reference: str) -> pd.DataFrame:
    """model x accuracy-like task: `diff`, the row's task mean minus the reference row's, in points, and `gain`, the
    same signed so that + is better (= diff for the usual higher-is-better metrics). Tasks of other metrics are left
    out (`df.attrs["left_out"]`), and so is a cell scored with another metric than its task's."""
    ref = next((r for r in board["rows"] if r["name"] == reference), None)
    recs = []
    if ref is None:
        df = pd.DataFrame(columns=["model", "task", "diff", "gain"])
        df.attrs["left_out"] = left_out(board)
        return df
    for r in board["rows"]:
        for t, c in r["tasks"].items():
            rc = ref["tasks"].get(t)
            if not (_accuracy_cell(board, t, c) and _accuracy_cell(board, t, rc)):
                continue
            diff = 100 * (c["mean"] - rc["mean"])
            recs.append({"model": r["name"], "task": t, "diff": diff,
                         "gain": diff if task_info(board, t)["higher_is_better"] else -diff})
    df = pd.DataFrame(recs, columns=["model", "task", "diff", "gain"])
    df.attrs["left_out"] = left_out(board)
    return df


def diff_heatmap(board: dict[str, Any], reference: str):
    """The `diff_frame` of `board` against `reference` as a heatmap in points, coloured and labelled by gain (+ =
    better); the subtitle names the tasks of other metrics left out."""
    import altair as alt

    df = diff_frame(board, reference)
    order = [r["name"] for r in board["rows"]]
    lim = max(10.0, float(df["gain"].abs().max()) if len(df) else 10.0)
    tasks = [t for t in board["tasks"] if t in set(df.task)]
    base = alt.Chart(df).encode(x=alt.X("task:N", sort=tasks, title=None, axis=alt.Axis(labelAngle=-30)),
                                y=alt.Y("model:N", sort=order, title=None))
    heat = base.mark_rect().encode(
        color=alt.Color("gain:Q", scale=alt.Scale(scheme="redblue", domain=[-lim, lim]), title="pp (+ = better)"),
        tooltip=["model", "task", alt.Tooltip("diff:Q", format="+.1f"), alt.Tooltip("gain:Q", format="+.1f")])
    text = base.mark_text(fontSize=10).encode(text=alt.Text("gain:Q", format="+.0f"))
    return (heat + text).properties(title=_title(f"difference vs {reference} (points, + = better)", board),
                                    height=alt.Step(20))


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


__all__ = ["bench_chart", "diff_frame", "diff_heatmap", "left_out", "left_out_note", "loss_curves_chart",
           "router_accuracy_chart", "sweep_chart", "sweep_frame", "task_bars", "task_frame", "token_chart", "usage_chart"]
