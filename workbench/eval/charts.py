"""Altair charts of results (the app draws these; the CLI saves some of them): per-task bars with error bars,
differences against a reference row, sweeps (1-D: points with intervals, 2-D: heatmaps), routing traces (large ones
aggregated), benchmark ratios beside their absolute times, merge-count curves, cost and held-in/held-out scatters.

Every chart that colours series draws them from `palette(n)`: n distinct colours, never repeated within a chart.
Every axis of names shows each label (`labelOverlap` off) uncut (`labelLimit` from the longest label); tasks are
ordered held-in, held-out, other, in facets one per group.

The per-task bars and the difference heatmap are in points on a 0-100 scale: they draw the accuracy-like tasks only
(`leaderboard.task_info(board, t)["kind"] == "accuracy"`: 0/1 per example); tasks of other metrics (perplexities,
per-example f1, corpus BLEU) are named in the charts' subtitle (`left_out_note`) and shown in their own units and
direction by the leaderboard."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ..tokens import byte_of
from .leaderboard import GROUP_LABEL, GROUPS, _group, arrow, short, task_info

MAX_EXPERTS = 8  # a trace of more experts (SMoRA's 64 ranks) shows the top MAX_EXPERTS - 1 and "other"
PX_PER_CHAR = 7  # an axis label's width per character at the default 11 px font, to size labelLimit


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


# ----------------------------------------------------------------------------- shared pieces


def palette(n: int) -> list[str]:
    """`n` distinct colours (hex), never one twice: Tableau 10 up to 10 series, beyond that hues spaced by the golden
    angle over three lightness and two saturation levels."""
    import colorsys

    if n <= 0:
        return []
    tableau10 = ["#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d",
                 "#bab0ac"]
    if n <= len(tableau10):
        return tableau10[:n]
    out: list[str] = []
    i = 0
    while len(out) < n:
        h = (i * 0.618033988749895) % 1.0
        light = (0.45, 0.62, 0.32)[i % 3]
        sat = (0.75, 0.55)[(i // 3) % 2]
        r, g, b = colorsys.hls_to_rgb(h, light, sat)
        c = f"#{round(255 * r):02x}{round(255 * g):02x}{round(255 * b):02x}"
        if c not in out:
            out.append(c)
        i += 1
    return out


def series_color(field: str, domain: list[str], title: str | None = None, **legend: Any):
    """A nominal colour encoding whose scale maps each of `domain` to its own colour of `palette`."""
    import altair as alt

    domain = list(dict.fromkeys(domain))
    return alt.Color(f"{field}:N", title=title, scale=alt.Scale(domain=domain, range=palette(len(domain))),
                     legend=alt.Legend(labelLimit=label_limit(domain), **legend))


def label_limit(labels: Any, floor: int = 180) -> int:
    """An axis or legend labelLimit (px) wide enough for the longest of `labels` at the default font."""
    longest = max((len(str(x)) for x in labels), default=0)
    return max(floor, PX_PER_CHAR * longest + 12)


def names_axis(labels: Any, angle: int = 0, **kw: Any):
    """An axis of names that shows every label (no overlap culling) uncut."""
    import altair as alt

    return alt.Axis(labelAngle=angle, labelOverlap=False, labelLimit=label_limit(labels), **kw)


def task_group(task: str) -> str:
    """held-in, held-out (the built-in suite's) or other."""
    return GROUP_LABEL[_group(task)]


def ordered_tasks(tasks: list[str]) -> list[str]:
    """`tasks` grouped held-in, held-out, other; the given order within a group."""
    return [t for g in GROUPS for t in tasks if _group(t) == g]


def _facet_groups(chart, groups: list[str], direction: str = "column"):
    """`chart` faceted into one column (or, `direction="row"`, one row) per task group present (a visible split), each
    with its own tasks."""
    import altair as alt

    if len(groups) < 2:
        return chart
    header = alt.Header(labelFontWeight="bold", labelFontSize=12, **({"labelAngle": 0, "labelAlign": "left"}
                                                                     if direction == "row" else {}))
    field = (alt.Row if direction == "row" else alt.Column)("group:N", sort=groups, title=None, header=header)
    return chart.facet(**{direction: field}, spacing=14).resolve_scale(x="independent")


def wilson(k: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials, as fractions."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


# ----------------------------------------------------------------------------- per task


def task_frame(board: dict[str, Any], rows: list[str] | None = None) -> pd.DataFrame:
    """Long table of the accuracy-like cells (`task_info(board, t)["kind"] == "accuracy"`: exact_match, acc, acc_norm
    ...): model, method, task, group (held-in, held-out, other), metric, score %, se %, 95% interval, n. Other
    metrics are not percentages: they are left out (`left_out`), in `df.attrs["left_out"]` {task: metric and
    direction}."""
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
            recs.append({"model": r["name"], "method": r["method"], "task": t, "group": task_group(t),
                         "metric": c["metric"], "score": 100 * c["mean"], "se": 100 * se if not math.isnan(se) else None,
                         "lo": lo, "hi": hi, "n": c["n"]})
    df = pd.DataFrame(recs, columns=["model", "method", "task", "group", "metric", "score", "se", "lo", "hi", "n"])
    df.attrs["left_out"] = left_out(board)
    return df


def _groups_of(tasks: list[str]) -> list[str]:
    return list(dict.fromkeys(task_group(t) for t in tasks))


def task_bars(board: dict[str, Any], rows: list[str] | None = None):
    """Grouped bars: one group per accuracy-like task (held-in, then held-out, then other, one facet row each), one bar
    per model in its own colour, with black 95% error bars (±1.96 se) centred on their bars; every task label shown;
    the subtitle names the tasks of other metrics left out."""
    import altair as alt

    df = task_frame(board, rows)
    order = ordered_tasks([t for t in board["tasks"] if t in set(df.task)])
    models = [r["name"] for r in board["rows"] if r["name"] in set(df.model)]
    widest = max((sum(1 for t in order if task_group(t) == g) for g in _groups_of(order)), default=1)
    # px per bar (the width step is the offset's): ~72 per task, and a group's row at most ~640 px wide
    step = max(3, min(12, 72 // max(1, len(models)), 640 // max(1, widest * len(models))))
    x = alt.X("task:N", sort=order, title=None, axis=names_axis(order, -45))
    base = alt.Chart(df).encode(x=x, xOffset=alt.XOffset("model:N", sort=models))
    # an explicit width in px: a bar sized relative to its band (Streamlit's theme sets bar.discreteBandSize to
    # {band: 0.85}) is misplaced by Vega-Lite under an xOffset (shifted by a share of the task's band, not the
    # model's), and the whiskers then sit at the bars' left edges. A bar of a fixed width is centred in its offset
    # band, where a rule is drawn (at the band's centre with bandPosition 0.5).
    bars = base.mark_bar(width=max(2, step - 2)).encode(
        y=alt.Y("score:Q", scale=alt.Scale(domain=[0, 100]), title="accuracy-like metrics, % ↑"),
        color=series_color("model", models, orient="top", direction="horizontal", columns=4),
        tooltip=["model", "task", "group", "metric", alt.Tooltip("score:Q", format=".1f"),
                 alt.Tooltip("se:Q", format=".1f"), alt.Tooltip("lo:Q", title="95% low", format=".1f"),
                 alt.Tooltip("hi:Q", title="95% high", format=".1f"), "n"])
    err = base.mark_rule(color="black", strokeWidth=1.5).encode(
        x=alt.X("task:N", sort=order, title=None, axis=names_axis(order, -45), bandPosition=0.5),
        xOffset=alt.XOffset("model:N", sort=models, bandPosition=0.5), y="lo:Q", y2="hi:Q")
    chart = (bars + err).properties(width=alt.Step(step), height=300)
    groups = _groups_of(order)
    if len(groups) > 1:  # one row per group: 15 tasks x 6 rows side by side overflow a page's width
        return _facet_groups(chart, groups, "row").properties(title=_title("per task (95% intervals)", board))
    return chart.properties(title=_title("per task (95% intervals)", board))


def diff_frame(board: dict[str, Any], reference: str, rows: list[str] | None = None) -> pd.DataFrame:
    """model x accuracy-like task: `diff`, the row's task mean minus the reference row's, in points, and `gain`, the
    same signed so that + is better (= diff for the usual higher-is-better metrics); `group` the task's (held-in,
    held-out, other). `rows`: only these rows (None: all). Tasks of other metrics are left out
    (`df.attrs["left_out"]`), and so is a cell scored with another metric than its task's."""
    ref = next((r for r in board["rows"] if r["name"] == reference), None)
    recs = []
    cols = ["model", "task", "group", "diff", "gain"]
    if ref is None:
        df = pd.DataFrame(columns=cols)
        df.attrs["left_out"] = left_out(board)
        return df
    for r in board["rows"]:
        if rows is not None and r["name"] not in rows:
            continue
        for t, c in r["tasks"].items():
            rc = ref["tasks"].get(t)
            if not (_accuracy_cell(board, t, c) and _accuracy_cell(board, t, rc)):
                continue
            diff = 100 * (c["mean"] - rc["mean"])
            recs.append({"model": r["name"], "task": t, "group": task_group(t), "diff": diff,
                         "gain": diff if task_info(board, t)["higher_is_better"] else -diff})
    df = pd.DataFrame(recs, columns=cols)
    df.attrs["left_out"] = left_out(board)
    return df


def diff_heatmap(board: dict[str, Any], reference: str, rows: list[str] | None = None):
    """The `diff_frame` of `board` against `reference` (only `rows`, when given) as a heatmap in points, coloured and
    labelled by gain (+ = better; white text on the dark cells); tasks held-in, held-out, other, one facet each;
    every label shown uncut; the subtitle names the tasks of other metrics left out."""
    import altair as alt

    df = diff_frame(board, reference, rows)
    order = [r["name"] for r in board["rows"] if r["name"] in set(df.model)]
    lim = max(10.0, float(df["gain"].abs().max()) if len(df) else 10.0)
    tasks = ordered_tasks([t for t in board["tasks"] if t in set(df.task)])
    base = alt.Chart(df).encode(x=alt.X("task:N", sort=tasks, title=None, axis=names_axis(tasks, -45)),
                                y=alt.Y("model:N", sort=order, title=None, axis=names_axis(order)))
    heat = base.mark_rect().encode(
        color=alt.Color("gain:Q", scale=alt.Scale(scheme="redblue", domain=[-lim, lim]), title="pp (+ = better)"),
        tooltip=["model", "task", "group", alt.Tooltip("diff:Q", format="+.1f"), alt.Tooltip("gain:Q", format="+.1f")])
    # the redblue scheme is dark beyond about half its range: white text there, black on the light middle
    text = base.mark_text(fontSize=10).encode(
        text=alt.Text("gain:Q", format="+.0f"),
        color=alt.condition(f"abs(datum.gain) > {0.5 * lim:.6g}", alt.value("white"), alt.value("black")))
    chart = (heat + text).properties(width=alt.Step(30), height=alt.Step(20))
    title = _title(f"difference vs {reference} (points, + = better)", board)
    groups = _groups_of(tasks)
    if len(groups) > 1:
        return _facet_groups(chart, groups).properties(title=title)
    return chart.properties(title=title)


# ----------------------------------------------------------------------------- sweeps


def _point_label(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "default"


def sweep_params(rec: dict[str, Any]) -> list[str]:
    """The swept parameters, in the order the points name them."""
    out: dict[str, None] = {}
    for p in rec.get("points", []):
        if isinstance(p, dict) and isinstance(p.get("point"), dict):
            out.update(dict.fromkeys(p["point"]))
    return list(out)


def sweep_is_accuracy(rec: dict[str, Any]) -> bool:
    """A sweep scored on accuracy-like metrics only (its `scoring`; a record without one: the suite's exact match)."""
    from .metrics import ACCURACY_METRICS

    scoring = rec.get("scoring")
    if not isinstance(scoring, dict) or not scoring:
        return True
    return all(isinstance(s, dict) and s.get("metric") in ACCURACY_METRICS and s.get("higher_is_better", True)
               for s in scoring.values())


def sweep_frame(rec: dict[str, Any]) -> pd.DataFrame:
    """One row per evaluated point: its label, each parameter's value, score %, and for an accuracy-like sweep with
    a known example count (`limit` per task) the 95% Wilson interval `lo`-`hi` over its n = tasks x limit examples
    and `se` (the binomial standard error of the mean over tasks, sqrt(Σ p(1-p)/limit) / tasks), in points."""
    best = (rec.get("best") or {}).get("key")
    limit = rec.get("limit")
    acc = sweep_is_accuracy(rec)
    params = sweep_params(rec)
    recs = []
    for p in rec.get("points", []):
        if not (isinstance(p, dict) and _finite(p.get("score"))):
            continue
        point = p.get("point") or {}
        per = {t: float(v) for t, v in (p.get("per_task") or {}).items() if _finite(v)}
        r: dict[str, Any] = {"point": _point_label(point), "score": 100 * float(p["score"]),
                             "chosen": p.get("key") == best, "n": None, "se": None, "lo": None, "hi": None,
                             "interval": "n unknown: no interval"}
        for k in params:
            r[k] = str(point.get(k, "–"))
        if acc and _finite(limit) and limit > 0 and per:
            n = len(per) * limit
            r["n"] = n
            r["se"] = 100 * math.sqrt(sum(v * (1 - v) / limit for v in per.values())) / len(per)
            lo, hi = wilson(float(p["score"]) * n, n)
            r["lo"], r["hi"] = 100 * lo, 100 * hi
            r["interval"] = f"{r['lo']:.0f}–{r['hi']:.0f}"
        elif not acc:
            r["interval"] = "not accuracy-like: no interval"
        r.update({f"task {short(t)}": 100 * v for t, v in per.items()})
        recs.append(r)
    return pd.DataFrame(recs)


def _sorted_values(values: list[str]) -> list[str]:
    def key(v: str):
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)

    return sorted(dict.fromkeys(values), key=key)


def sweep_chart(rec: dict[str, Any]):
    """A recipe's validation score over its grid, the chosen point marked: a 2-parameter grid as a heatmap (score and
    95% interval in each cell, the chosen one outlined in red), one parameter as points with 95% error bars joined
    by a line, any other grid as points with error bars per grid point. Accuracy-like sweeps on 0-100%."""
    import altair as alt

    df = sweep_frame(rec)
    params = sweep_params(rec)
    acc = sweep_is_accuracy(rec)
    y_scale = alt.Scale(domain=[0, 100]) if acc else alt.Undefined
    y_title = "validation %" if acc else "validation score"
    tips = ["point", alt.Tooltip("score:Q", format=".1f"), alt.Tooltip("se:Q", format=".1f", title="se"),
            alt.Tooltip("interval:N", title="95% Wilson interval"), alt.Tooltip("n:Q", title="examples"), "chosen"]
    has_ci = "lo" in df and df["lo"].notna().any()
    title = (f"{rec.get('recipe')}: {rec.get('split', 'validation')} ({len(df)} points, chosen in red"
             + (", 95% intervals)" if has_ci else "; no intervals: example count unknown)"))
    if len(params) == 2 and len(df):
        px, py = params
        df["label"] = [f"{s:.0f}" + (f" [{lo:.0f}–{hi:.0f}]" if _finite(lo) else "")
                       for s, lo, hi in zip(df.score, df.lo, df.hi)]
        base = alt.Chart(df).encode(
            x=alt.X(f"{px}:O", sort=_sorted_values(list(df[px])), title=px, axis=names_axis(df[px])),
            y=alt.Y(f"{py}:O", sort=_sorted_values(list(df[py])), title=py, axis=names_axis(df[py])))
        heat = base.mark_rect().encode(
            color=alt.Color("score:Q", scale=alt.Scale(scheme="viridis", **({"domain": [0, 100]} if acc else {})),
                            title=y_title), tooltip=tips)
        text = base.mark_text(fontSize=11).encode(
            text="label:N", color=alt.condition("datum.score < 60", alt.value("white"), alt.value("black")))
        chosen = base.transform_filter("datum.chosen").mark_rect(fill=None, stroke="red", strokeWidth=3)
        return (heat + text + chosen).properties(title=title, width=alt.Step(110), height=alt.Step(44))
    if len(params) == 1:
        (px,) = params
        x = alt.X(f"{px}:O", sort=_sorted_values(list(df[px])) if len(df) else None, title=px,
                  axis=names_axis(df[px] if len(df) else []))
    else:
        x = alt.X("point:N", sort=list(df.point) if len(df) else None, title=None,
                  axis=names_axis(df.point if len(df) else [], -30))
    base = alt.Chart(df).encode(x=x, y=alt.Y("score:Q", scale=y_scale, title=y_title))
    line = base.mark_line(point=True).encode(tooltip=tips)
    layers = [line]
    if has_ci:
        layers.append(base.mark_errorbar(ticks=True, color="black").encode(
            y=alt.Y("lo:Q", scale=y_scale, title=y_title), y2="hi:Q"))
    layers.append(base.transform_filter("datum.chosen").mark_point(size=220, shape="diamond", filled=True, color="red"))
    return alt.layer(*layers).properties(title=title, height=320)


# ----------------------------------------------------------------------------- routing traces


_BYTES = byte_of()
_VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}


def token_text(token: str) -> str:
    """A tokenizer's symbol as text (byte-level BPE `Ġ` is a space, `Ċ` a newline; SentencePiece `▁` a space), its
    white space made visible (␣ ⏎ ⇥)."""
    if token and all(ch in _BYTES for ch in token):
        text = bytes(_BYTES[ch] for ch in token).decode("utf-8", errors="replace")
    else:
        text = token.replace("▁", " ")
    return "".join(_VISIBLE.get(ch, ch) for ch in text) or "∅"


def trace_tokens(trace: dict[str, Any]) -> list[str]:
    """The trace's tokens as text: the tokenizer's own decoding (`text`, one per token) when the trace has it, else
    `token_text` of each symbol; white space visible."""
    text = trace.get("text")
    if isinstance(text, list) and len(text) == len(trace["tokens"]) and all(isinstance(t, str) for t in text):
        return ["".join(_VISIBLE.get(ch, ch) for ch in t) or "∅" for t in text]
    return [token_text(str(t)) for t in trace["tokens"]]


def trace_columns(trace: dict[str, Any], top: int = MAX_EXPERTS) -> tuple[list[str], list[list[int]]]:
    """The experts a per-token chart shows: every one when there are at most `top`; else the `top` - 1 of highest
    mean usage over layers and "other (N, mean)", the mean of the rest (a sum of many would dwarf every expert's
    weight on one colour scale). Returns (labels, the expert indices each label averages)."""
    experts = list(trace["experts"])
    if len(experts) <= top:
        return experts, [[i] for i in range(len(experts))]
    n_layers = len(trace["usage"])
    mean = [sum(row[i] for row in trace["usage"]) / n_layers for i in range(len(experts))]
    keep = sorted(range(len(experts)), key=lambda i: -mean[i])[: top - 1]
    rest = [i for i in range(len(experts)) if i not in keep]
    return [experts[i] for i in keep] + [f"other ({len(rest)}, mean)"], [[i] for i in keep] + [rest]


def _mean(row: list[float], idx: list[int]) -> float:
    return sum(row[i] for i in idx) / len(idx)


def usage_frame(trace: dict[str, Any], top: int = MAX_EXPERTS) -> pd.DataFrame:
    """Mean weight over tokens per layer and expert (column `expert`, cell text `label`). A trace of at most `top`
    experts: one column each. A larger one (SMoRA's 64 ranks): per layer its own `top` - 1 heaviest experts, ranked
    (#1 the heaviest: the cell names it), and "rest": the mean of the others (its `experts` lists how many)."""
    experts = list(trace["experts"])
    recs = []
    if len(experts) <= top:
        for layer, row in zip(trace["layers"], trace["usage"]):
            recs += [{"layer": layer, "expert": e, "weight": w, "label": f"{w:.2f}", "experts": e}
                     for e, w in zip(experts, row)]
        return pd.DataFrame(recs)
    k = top - 1
    for layer, row in zip(trace["layers"], trace["usage"]):
        order = sorted(range(len(experts)), key=lambda i: -row[i])
        for r, i in enumerate(order[:k]):
            recs.append({"layer": layer, "expert": f"#{r + 1}", "weight": row[i], "label": f"{experts[i]} {row[i]:.2f}",
                         "experts": experts[i]})
        rest = order[k:]
        w = _mean(row, rest)
        recs.append({"layer": layer, "expert": "rest (mean)", "weight": w, "label": f"{w:.2f}",
                     "experts": f"{len(rest)} others"})
    return pd.DataFrame(recs)


def usage_chart(trace: dict[str, Any]):
    """Mean expert weight per layer (heatmap, layer x expert); a trace of more than `MAX_EXPERTS` experts shows each
    layer's heaviest experts ranked, named in their cells, and the mean of the rest."""
    import altair as alt

    df = usage_frame(trace)
    n = len(trace["experts"])
    cols = list(dict.fromkeys(df.expert))
    title: Any = "expert usage per layer (mean over tokens)"
    if n > MAX_EXPERTS:
        title = alt.TitleParams(title, subtitle=[(f"each layer's {MAX_EXPERTS - 1} heaviest of {n} experts, ranked "
                                                 f"(#1 the heaviest, named in its cell); rest: the others' mean")])
    width = max(40, 7 * max(len(str(x)) for x in df.label) + 10)
    dark = float(df.weight.max()) if len(df) else 1.0  # the blues are dark above about 60% of the scale
    base = alt.Chart(df).encode(x=alt.X("expert:N", sort=cols, title=None, axis=names_axis(cols, -30)),
                                y=alt.Y("layer:O", title="layer", axis=alt.Axis(labelOverlap=False)))
    return (base.mark_rect().encode(color=alt.Color("weight:Q", scale=alt.Scale(scheme="blues"), title="weight"),
                                    tooltip=["layer", "expert", "experts", alt.Tooltip("weight:Q", format=".3f")])
            + base.mark_text(fontSize=9).encode(
                text="label:N", color=alt.condition(f"datum.weight > {0.6 * dark:.6g}", alt.value("white"),
                                                    alt.value("black")))
            ).properties(title=title, width=alt.Step(width), height=alt.Step(14))


def token_frame(trace: dict[str, Any], top: int = MAX_EXPERTS) -> pd.DataFrame:
    """position x shown expert (`trace_columns`): the token as text (`trace_tokens`), the expert's weight averaged
    over layers (an "other" row: the mean of its experts')."""
    labels, groups = trace_columns(trace, top)
    toks = trace_tokens(trace)
    recs = []
    for i, (tok, per_layer) in enumerate(zip(toks, trace["choices"])):
        n = len(per_layer)
        for lab, g in zip(labels, groups):
            recs.append({"position": i, "token": f"{i}:{tok}", "expert": lab,
                         "weight": sum(_mean(layer, g) for layer in per_layer) / n})
    return pd.DataFrame(recs)


def token_chart(trace: dict[str, Any]):
    """Per token (decoded: `trace_tokens`), each expert's weight averaged over layers; every token and expert
    labelled."""
    import altair as alt

    labels, _ = trace_columns(trace)
    df = token_frame(trace)
    order = [f"{i}:{t}" for i, t in enumerate(trace_tokens(trace))]
    return alt.Chart(df).mark_rect().encode(
        x=alt.X("token:N", sort=order, title=None, axis=names_axis(order, -60)),
        y=alt.Y("expert:N", sort=labels, title=None, axis=names_axis(labels)),
        color=alt.Color("weight:Q", scale=alt.Scale(scheme="greens"), title="weight"),
        tooltip=["token", "expert", alt.Tooltip("weight:Q", format=".2f")],
    ).properties(title="expert weight per token (mean over layers)", width=alt.Step(22), height=alt.Step(20))


# ----------------------------------------------------------------------------- benchmarks

HIGHER_HINTS = ("speedup", "rps", "per_s", "throughput", "tokens_s")


def ratio_direction(name: str, target: Any = None) -> str:
    """"higher" or "lower" (is better) for a benchmark ratio: from its target (`<= x`: lower, `>= x`: higher), else
    its name (speedups and throughputs: higher; ratios of times and memory: lower)."""
    t = str(target or "").strip()
    if t.startswith("<"):
        return "lower"
    if t.startswith(">"):
        return "higher"
    return "higher" if any(h in name for h in HIGHER_HINTS) else "lower"


def bench_times(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every absolute time a benchmark record reports (seconds): leaves named `*_s` or `*_ms` (as seconds) and the
    numbers of a `seconds` table; lists of samples, budgets and targets are not times. Each: group (as
    `catalog.bench_ratios` names them), name, seconds."""
    out: list[dict[str, Any]] = []

    def label(row: Any, i: int) -> str:
        if isinstance(row, dict):
            ids = [f"{k}={v}" for k, v in row.items() if isinstance(v, (str, int)) and not isinstance(v, bool)
                   and len(str(v)) < 24][:3]
            if ids:
                return " ".join(ids)
        return str(i)

    def walk(x: Any, path: list[str], table: bool) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, [*path, str(k)], table or k == "seconds")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                if isinstance(v, dict):
                    walk(v, [*path, label(v, i)], table)
        elif _finite(x):
            leaf = path[-1] if path else ""
            if "sample" in leaf or "budget" in leaf or "target" in leaf:
                return
            if leaf.endswith("_ms"):
                name, secs = leaf[:-3], x / 1000
            elif leaf.endswith("_s") and not leaf.endswith("_per_s"):
                name, secs = leaf[:-2], float(x)
            elif table:
                name, secs = leaf, float(x)
            else:
                return
            parts = [p for p in path[:-1] if p != "rows"]
            out.append({"group": " ".join(parts) or rec.get("benchmark", ""), "name": name, "seconds": secs})

    walk({k: v for k, v in rec.items() if k not in ("targets", "machine", "git", "_path", "samples")}, [], False)
    return out


def _ratio_parts(group: str, ratio: str) -> tuple[list[str], str, str] | None:
    """(candidate time groups, numerator, denominator) a ratio names, e.g. peft_mixed_x_base -> peft_mixed, base."""
    import re

    if group.endswith("x_base"):
        g = group[: -len("x_base")].strip()
        return [f"{g} seconds".strip(), g], ratio, "base"
    m = re.match(r"(.+?)_(?:x|vs|over)_(.+)", ratio)
    if not m:
        return None
    return [group], m.group(1), m.group(2)


def ratio_times(ratios: list[dict[str, Any]], times: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`ratios` with `time_s` and `peer_s`: the absolute times the ratio divides, where the record has them."""
    by = {(t["group"], t["name"]): t["seconds"] for t in times}
    out = []
    for r in ratios:
        got = dict(r)
        got["time_s"] = got["peer_s"] = None
        parts = _ratio_parts(r["group"], r["ratio"])
        if parts:
            groups, a, b = parts
            for g in groups:
                if (g, a) in by:
                    got["time_s"] = by[(g, a)]
                if (g, b) in by:
                    got["peer_s"] = by[(g, b)]
        out.append(got)
    return out


def bench_chart(ratios: list[dict[str, Any]], title: str, times: list[dict[str, Any]] | None = None):
    """Ratios against the peer measured in the same run, grouped by the benchmark's rows (e.g. rank and adapters),
    each named with its direction (↓ lower is better: times, memory; ↑ higher: speedups, throughput) and, in its
    tooltip, the two absolute times it divides; the dashed rule marks 1.0 (the peer). `times` (`bench_times`): the
    record's absolute times drawn beside, in seconds (lower is better). Every series has its own colour."""
    import altair as alt

    recs = ratio_times(ratios, times or [])
    for r in recs:
        d = ratio_direction(r["ratio"], r.get("target"))
        r["direction"] = f"{d} is better"
        r["series"] = f"{r['ratio']} {'↓' if d == 'lower' else '↑'}"
    df = pd.DataFrame(recs)
    groups = list(dict.fromkeys(df.group))
    series = list(dict.fromkeys(df.series))
    row = alt.Row("group:N", sort=groups, title=None,
                  header=alt.Header(labelAngle=0, labelAlign="left", labelLimit=label_limit(groups)))
    base = alt.Chart().encode(y=alt.Y("series:N", sort=series, title=None, axis=names_axis(series)),
                              color=series_color("series", series))
    bars = base.mark_bar().encode(
        x=alt.X("value:Q", title="ratio to the peer (1 = the peer; ↓ lower / ↑ higher is better)"),
        tooltip=["group", "ratio", alt.Tooltip("value:Q", format=".3f"), "direction", "target",
                 alt.Tooltip("time_s:Q", title="time (s)", format=".4g"),
                 alt.Tooltip("peer_s:Q", title="peer's time (s)", format=".4g")])
    rule = alt.Chart().mark_rule(color="red", strokeDash=[4, 3]).encode(x=alt.datum(1.0))
    left = alt.layer(bars, rule, data=df).properties(height=alt.Step(12)).facet(row=row, spacing=6).resolve_scale(
        y="independent").properties(title=title)
    if not times:
        return left
    tf = pd.DataFrame(times)
    tgroups = list(dict.fromkeys(tf.group))
    names = list(dict.fromkeys(tf.name))
    right = alt.Chart(tf).mark_bar().encode(
        y=alt.Y("name:N", sort=names, title=None, axis=names_axis(names)),
        x=alt.X("seconds:Q", title="absolute time, s (↓ lower is better)"),
        color=series_color("name", names, title="time of"),
        tooltip=["group", "name", alt.Tooltip("seconds:Q", format=".4g")],
    ).properties(height=alt.Step(12)).facet(
        row=alt.Row("group:N", sort=tgroups, title=None,
                    header=alt.Header(labelAngle=0, labelAlign="left", labelLimit=label_limit(tgroups))),
        spacing=6).resolve_scale(y="independent").properties(title="absolute times (s, lower is better)")
    return alt.hconcat(left, right).resolve_scale(color="independent")


# ----------------------------------------------------------------------------- merge-count curves


def curve_chart(curve: dict[str, Any]):
    """Mean score over the merged experts' accuracy-like tasks vs their number, one line per method in its own
    colour, ±1.96 se band; the subtitle is the curve's `note` (the tasks of other metrics it leaves out), when it
    has one. (`leaderboard.curve_chart` with a palette that never repeats a colour.)"""
    import altair as alt

    df = pd.DataFrame([{"method": p["method"], "experts": p["experts"], "score": 100 * p["mean"],
                        "lo": 100 * max(0.0, p["mean"] - 1.96 * p["stderr"]) if _finite(p.get("stderr")) else None,
                        "hi": 100 * min(1.0, p["mean"] + 1.96 * p["stderr"]) if _finite(p.get("stderr")) else None}
                       for p in curve["points"]])
    methods = list(dict.fromkeys(df.method)) if len(df) else []
    y_title = "accuracy-like % (their tasks)"
    base = alt.Chart(df).encode(x=alt.X("experts:O", title="experts merged"), color=series_color("method", methods))
    line = base.mark_line(point=True).encode(y=alt.Y("score:Q", scale=alt.Scale(domain=[0, 100]), title=y_title),
                                             tooltip=["method", "experts", alt.Tooltip("score:Q", format=".1f")])
    band = base.mark_errorband(opacity=0.15).encode(y=alt.Y("lo:Q", title=y_title), y2="hi:Q")
    text = f"{curve['name']}: pool {curve['pool']}"
    note = curve.get("note")
    title = alt.TitleParams(text, subtitle=[note]) if isinstance(note, str) and note else text
    return (band + line).properties(title=title, width=320, height=320)


# ----------------------------------------------------------------------------- costs and generalization


def cost_frame(costs: list[dict[str, Any]]) -> pd.DataFrame:
    """Long table of `costs.row_costs`: one row per (model, cost, group) with both values present: cost, value,
    group (held-in / held-out), accuracy % and its 95% interval."""
    from .costs import COST_LABEL, COSTS

    recs = []
    for r in costs:
        for c in COSTS:
            if r.get(c) is None:
                continue
            for g in ("held_in", "held_out"):
                if r.get(g) is None:
                    continue
                se = r.get(f"{g}_se")
                lo, hi = (max(0.0, r[g] - 1.96 * se), min(100.0, r[g] + 1.96 * se)) if _finite(se) else (r[g], r[g])
                recs.append({"model": r["model"], "method": r["method"], "cost": COST_LABEL[c], "value": r[c],
                             "from": r[f"{c} from"], "group": GROUP_LABEL[g], "accuracy": r[g], "lo": lo, "hi": hi})
    return pd.DataFrame(recs, columns=["model", "method", "cost", "value", "from", "group", "accuracy", "lo", "hi"])


def cost_note(costs: list[dict[str, Any]]) -> list[str]:
    """One line per cost: how many rows have it, which lack it (and why), or that no row has it."""
    from .costs import COST_LABEL, COSTS

    lines = []
    for c in COSTS:
        lack = [r for r in costs if r.get(c) is None]
        if len(lack) == len(costs):
            lines.append(f"{COST_LABEL[c]}: no data for any row ({lack[0][f'{c} from'] if lack else 'no rows'})")
        elif lack:
            lines.append(f"{COST_LABEL[c]}: not recorded for " + ", ".join(
                f"{r['model']} ({r[f'{c} from']})" for r in lack))
    for g in ("held_in", "held_out"):
        lack = [r["model"] for r in costs if r.get(g) is None]
        if lack:
            lines.append(f"no {GROUP_LABEL[g]} mean: " + (", ".join(lack) if len(lack) < len(costs) else "any row"))
    return lines


def cost_chart(costs: list[dict[str, Any]], title: str = "cost vs quality"):
    """Held-in and held-out accuracy (95% intervals) against each recorded cost (build time, extra active
    parameters per token, evaluation time per example), one panel per cost with its own x scale; only rows with a
    value are drawn (`cost_note` names the others)."""
    import altair as alt

    df = cost_frame(costs)
    models = [r["model"] for r in costs]
    groups = [g for g in ("held-in", "held-out") if g in set(df.group)]
    base = alt.Chart().encode(x=alt.X("value:Q", title=None, scale=alt.Scale(zero=True)))
    pts = base.mark_point(filled=True, size=70).encode(
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 100]), title="accuracy-like %, group mean ↑"),
        color=series_color("model", models), shape=alt.Shape("group:N", sort=groups, title=None),
        tooltip=["model", "method", "group", alt.Tooltip("accuracy:Q", format=".1f"),
                 alt.Tooltip("value:Q", format=",.4g"), "from"])
    err = base.mark_rule(color="black", opacity=0.5).encode(y="lo:Q", y2="hi:Q")
    from .costs import COST_LABEL, COSTS

    chart = alt.layer(err, pts, data=df).properties(width=260, height=260)
    short_notes = []
    for c in COSTS:
        lack = sum(1 for r in costs if r.get(c) is None)
        if lack:
            short_notes.append(f"{COST_LABEL[c]}: " + ("no data for any row" if lack == len(costs) else
                                                       f"{lack} of {len(costs)} rows not recorded"))
    return chart.facet(column=alt.Column("cost:N", title=None, sort=[COST_LABEL[c] for c in COSTS],
                                         header=alt.Header(labelFontWeight="bold")),
                       ).resolve_scale(x="independent").properties(
        title=alt.TitleParams(title, subtitle=short_notes or alt.Undefined))


def generalization_chart(costs: list[dict[str, Any]], title: str = "held-in vs held-out"):
    """Each row's held-out mean against its held-in mean (%, 95% intervals both ways), labelled; rows without both
    are named in the subtitle."""
    import altair as alt

    df = pd.DataFrame([r for r in costs if r.get("held_in") is not None and r.get("held_out") is not None],
                      columns=[*costs[0].keys()] if costs else ["model", "held_in", "held_out"])
    for g in ("held_in", "held_out"):
        se = df.get(f"{g}_se")
        df[f"{g}_lo"] = [max(0.0, m - 1.96 * s) if _finite(s) else m for m, s in zip(df[g], se)] if se is not None \
            else df[g]
        df[f"{g}_hi"] = [min(100.0, m + 1.96 * s) if _finite(s) else m for m, s in zip(df[g], se)] if se is not None \
            else df[g]
    models = list(df.model)
    lack = [r["model"] for r in costs if r.get("held_in") is None or r.get("held_out") is None]
    x = alt.X("held_in:Q", scale=alt.Scale(domain=[0, 100]), title="held-in mean, % ↑")
    y = alt.Y("held_out:Q", scale=alt.Scale(domain=[0, 100]), title="held-out mean, % ↑")
    base = alt.Chart(df).encode(x=x, y=y)
    pts = base.mark_point(filled=True, size=80).encode(
        color=series_color("model", models), tooltip=["model", "method", alt.Tooltip("held_in:Q", format=".1f"),
                                                      alt.Tooltip("held_out:Q", format=".1f")])
    ex = base.mark_rule(opacity=0.4, color="black").encode(x="held_in_lo:Q", x2="held_in_hi:Q")
    ey = base.mark_rule(opacity=0.4, color="black").encode(y="held_out_lo:Q", y2="held_out_hi:Q")
    text = base.mark_text(align="left", dx=6, dy=-6, fontSize=10).encode(text="model:N")
    diag = alt.Chart(pd.DataFrame({"x": [0, 100], "y": [0, 100]})).mark_line(strokeDash=[4, 3], color="gray").encode(
        x="x:Q", y="y:Q")
    sub = [f"rows without both means: {', '.join(lack)}"] if lack else []
    return (diag + ex + ey + pts + text).properties(
        title=alt.TitleParams(title, subtitle=["dashed: held-out = held-in", *sub]), width=420, height=420)


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
        x=alt.X("step:Q"), y=alt.Y("loss:Q", title=y_title), color=series_color(series, list(curves), title=series),
        tooltip=[series, "step", alt.Tooltip("loss:Q", format=".3f")],
    ).properties(title=title, width=420, height=260)


__all__ = ["MAX_EXPERTS", "bench_chart", "bench_times", "cost_chart", "cost_frame", "cost_note", "curve_chart",
           "diff_frame", "diff_heatmap", "generalization_chart", "left_out", "left_out_note", "loss_curves_chart",
           "ordered_tasks", "palette", "ratio_direction", "ratio_times", "router_accuracy_chart", "series_color",
           "sweep_chart", "sweep_frame", "task_bars", "task_frame", "token_chart", "token_frame", "token_text",
           "trace_columns", "trace_tokens", "usage_chart", "usage_frame", "wilson"]
