"""The app's charts read (workbench/eval/charts.py, workbench/eval/costs.py), checked by value on their Vega-Lite
specs (`chart.to_dict()`): error bars, labels, task groups, palettes, decoded tokens, large traces, sweeps with
intervals, benchmark times and directions, cost and held-in/held-out scatters."""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

import pytest

from workbench.eval import charts
from workbench.eval.leaderboard import build_leaderboard
from workbench.tasks.suite import TASKS

HELD_IN = [t for t, s in TASKS.items() if s.kind == "held_in"]
HELD_OUT = [t for t, s in TASKS.items() if s.kind != "held_in"]


def _board(n_rows: int = 12, n_examples: int = 20, seed: int = 0) -> dict:
    """A leaderboard over the suite's held-in and held-out tasks (held-out listed first, to test the grouping),
    `n_rows` rows with long names, exact-match cells of random 0/1 values."""
    rng = random.Random(seed)
    tasks = HELD_OUT[:4] + HELD_IN
    names = ["base"] + [f"row-{i}-with-a-rather-long-descriptive-name" for i in range(1, n_rows)]
    rows = [{"name": n, "method": "m", "expert_task": None} for n in names]
    cells = {}
    for n in names:
        p = rng.random()
        for t in tasks:
            cells[(n, t)] = {"metric": "exact_match", "higher_is_better": True, "aggregate": "mean",
                             "doc_ids": list(range(n_examples)),
                             "values": [float(rng.random() < p) for _ in range(n_examples)], "n": n_examples}
    return build_leaderboard(rows, cells, tasks, "base")


def _inner(spec: dict) -> dict:
    """The chart inside a facet (or the chart itself)."""
    return spec.get("spec", spec)


def _layers(spec: dict) -> list[dict]:
    return _inner(spec)["layer"]


def _data(spec: dict) -> list[dict]:
    return next(iter(spec["datasets"].values()))


# ----------------------------------------------------------------------------- per-task bars and heatmap


# Streamlit's chart theme (its frontend's CustomTheme: `bar: {discreteBandSize: {band: 0.85}}`): bars sized relative
# to their band, which Vega-Lite misplaces under an xOffset; the rendered geometry is checked under it
STREAMLIT_BAR_THEME = {"bar": {"binSpacing": 2, "discreteBandSize": {"band": 0.85}},
                       "mark": {"tooltip": {"content": "encoding"}}}


def _rendered_bars_and_rules(spec: dict, config: dict | None = None) -> tuple[dict, dict]:
    """Render `spec` to SVG with vl-convert (the Vega the app's Streamlit uses, within a minor version) under
    `config`: {(task, model): bar centre x} and {(task, model): whisker x}, in each facet's coordinates."""
    import re

    vlc = pytest.importorskip("vl_convert")
    svg = vlc.vegalite_to_svg({**spec, "config": {**spec.get("config", {}), **(config or {})}}, vl_version="6.4")
    bars, rules = {}, {}
    for m in re.finditer(r'<(path|line) aria-label="([^"]*)"[^>]*aria-roledescription="(bar|rule mark)"[^>]*>', svg):
        label, tag = m.group(2), m.group(0)
        fields = dict(kv.split(": ", 1) for kv in label.split("; "))
        key = (fields["task"], fields["model"])
        if m.group(3) == "bar":
            x, w = re.search(r'd="M([-0-9.e]+),[-0-9.e]+h([-0-9.e]+)', tag).groups()
            bars[key] = float(x) + float(w) / 2
        else:
            rules[key] = float(re.search(r'transform="translate\(([-0-9.e]+),', tag).group(1))
    return bars, rules


def test_streamlit_theme_still_sizes_bars_relative_to_their_band():
    """The theme the geometry test below renders under is Streamlit's (if Streamlit changes it, update the test)."""
    import streamlit

    js = Path(streamlit.__file__).parent / "static" / "static" / "js"
    themes = [p for p in js.glob("CustomTheme*.js") if "discreteBandSize:{band:.85}" in p.read_text()]
    assert themes, "Streamlit's chart theme no longer sets bar.discreteBandSize {band: .85}: update STREAMLIT_BAR_THEME"


@pytest.mark.parametrize("n_rows", [3, 6, 12])
@pytest.mark.parametrize("theme", ["streamlit", "vega-lite default"])
def test_error_bars_are_black_and_centred_on_their_bars(n_rows, theme):
    """Read from the rendered chart, not the spec: each whisker's x is its own bar's centre (the reviewer saw them at
    the bars' left edges in Chromium under Streamlit's theme, with `bandPosition` 0.5 in the spec)."""
    board = _board(n_rows=n_rows)
    spec = charts.task_bars(board).to_dict()
    bars_layer, err = _layers(spec)
    assert bars_layer["mark"]["type"] == "bar" and err["mark"]["type"] == "rule"
    enc = {**_inner(spec).get("encoding", {}), **err["encoding"]}
    # the rule's colour is its mark's black: no colour field shared with the bars overrides it
    assert err["mark"]["color"] == "black" and "color" not in enc
    bars, rules = _rendered_bars_and_rules(spec, STREAMLIT_BAR_THEME if theme == "streamlit" else None)
    want = {(t, r["name"]) for r in board["rows"] for t in board["tasks"]}
    assert set(bars) == set(rules) == want
    off = {k: round(rules[k] - bars[k], 2) for k in bars if abs(rules[k] - bars[k]) > 0.5}
    assert not off, f"whiskers off their bars' centres (px): {dict(list(off.items())[:5])}"


def test_every_task_label_is_shown_uncut_and_tasks_are_grouped_held_in_first():
    board = _board()
    spec = charts.task_bars(board).to_dict()
    enc = {**_inner(spec).get("encoding", {}), **_layers(spec)[0]["encoding"]}
    axis = enc["x"]["axis"]
    assert axis["labelOverlap"] is False
    assert axis["labelLimit"] >= charts.PX_PER_CHAR * max(len(t) for t in board["tasks"])
    assert enc["x"]["sort"] == HELD_IN + HELD_OUT[:4]  # held-in first, though the board lists held-out first
    # a visible split: one facet per group, held-in then held-out, each with its own tasks
    # (one row each: 15 tasks side by side would overflow the page's width)
    assert spec["facet"]["row"]["field"] == "group" and spec["facet"]["row"]["sort"] == ["held-in", "held-out"]
    assert spec["resolve"]["scale"]["x"] == "independent"
    assert {(d["task"], d["group"]) for d in _data(spec)} == (
        {(t, "held-in") for t in HELD_IN} | {(t, "held-out") for t in HELD_OUT[:4]})


def test_heatmap_follows_the_rows_labels_every_row_and_writes_white_on_dark_cells():
    board = _board()
    rows = [r["name"] for r in board["rows"]][:3]
    spec = charts.diff_heatmap(board, "base", rows).to_dict()
    assert {d["model"] for d in _data(spec)} == set(rows)  # the selection, not every row
    heat, text = _layers(spec)
    enc = {**_inner(spec).get("encoding", {}), **heat["encoding"]}
    assert enc["y"]["axis"]["labelOverlap"] is False and enc["x"]["axis"]["labelOverlap"] is False
    assert enc["y"]["axis"]["labelLimit"] >= charts.PX_PER_CHAR * max(len(r) for r in rows)
    assert enc["x"]["sort"] == HELD_IN + HELD_OUT[:4] and spec["facet"]["column"]["field"] == "group"
    lim = heat["encoding"]["color"]["scale"]["domain"][1]
    color = text["encoding"]["color"]
    assert color["condition"]["value"] == "white" and color["value"] == "black"
    assert color["condition"]["test"] == f"abs(datum.gain) > {0.5 * lim:.6g}"


def test_per_token_chart_labels_every_expert_and_token():
    trace = _trace(6, 4, ["Add", ":", "Ġ", "1", "Ċ"])
    spec = charts.token_chart(trace).to_dict()
    enc = spec["encoding"]
    assert enc["y"]["axis"]["labelOverlap"] is False and enc["x"]["axis"]["labelOverlap"] is False
    assert enc["y"]["axis"]["labelLimit"] >= charts.PX_PER_CHAR * max(len(e) for e in trace["experts"])
    assert enc["y"]["sort"] == trace["experts"]
    assert spec["height"] == {"step": 20}  # 6 rows of 20 px: room for each label


# ----------------------------------------------------------------------------- traces


def _trace(n_experts: int, n_layers: int, tokens: list[str], seed: int = 0) -> dict:
    rng = random.Random(seed)
    choices = [[[rng.random() for _ in range(n_experts)] for _ in range(n_layers)] for _ in tokens]
    usage = [[sum(choices[t][layer][e] for t in range(len(tokens))) / len(tokens) for e in range(n_experts)]
             for layer in range(n_layers)]
    return {"tokens": tokens, "experts": [f"rank{i}" for i in range(n_experts)], "layers": list(range(n_layers)),
            "usage": usage, "choices": choices}


def test_a_large_trace_shows_each_layers_top_experts_and_the_rest_as_one_column():
    trace = _trace(64, 30, ["a", "b", "c"])
    df = charts.usage_frame(trace)
    top = charts.MAX_EXPERTS - 1
    assert list(dict.fromkeys(df.expert)) == [f"#{i}" for i in range(1, top + 1)] + ["rest (mean)"]
    for layer, row in zip(trace["layers"], trace["usage"]):
        got = df[df.layer == layer].set_index("expert")
        order = sorted(range(64), key=lambda i: -row[i])
        first = order[0]
        assert got.loc["#1", "weight"] == pytest.approx(row[first])
        assert got.loc["#1", "label"] == f"rank{first} {row[first]:.2f}"
        assert got.loc["rest (mean)", "weight"] == pytest.approx(sum(row[i] for i in order[top:]) / (64 - top))
    spec = charts.usage_chart(trace).to_dict()
    assert len({d["expert"] for d in _data(spec)}) == charts.MAX_EXPERTS  # not 64 columns of numbers
    tok = charts.token_frame(trace)
    assert tok.expert.nunique() == charts.MAX_EXPERTS and tok.expert.iloc[-1] == "other (57, mean)"
    small = _trace(6, 3, ["a"])
    assert set(charts.usage_frame(small).expert) == set(small["experts"])  # small traces: every expert


def _byte_bpe_tokenizer():
    """A real byte-level BPE tokenizer (GPT-2's alphabet, as SmolLM2's), trained here on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["Add: 12+34\nAnswer: 46", "Convert 3 km → m\tcafé", "sort these words"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_tokens_are_decoded_from_byte_level_symbols():
    tokenizer = _byte_bpe_tokenizer()
    tokens = tokenizer.tokenize("Add: 12+34\nAnswer: café →")
    assert any("Ġ" in t for t in tokens) and any("Ċ" in t for t in tokens)
    for t in tokens:
        text = tokenizer.convert_tokens_to_string([t])
        if "\ufffd" not in text:  # a token holding part of a UTF-8 character has no text of its own
            assert charts.token_text(t) == text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")
    assert charts.token_text("Ġ") == "␣" and charts.token_text("Ċ") == "⏎" and charts.token_text("ĠAnswer") == "␣Answer"
    assert charts.token_text("▁hello") == "␣hello"  # SentencePiece's space
    trace = _trace(3, 2, ["Add", "Ġ", "Ċ"])
    spec = charts.token_chart(trace).to_dict()
    assert spec["encoding"]["x"]["sort"] == ["0:Add", "1:␣", "2:⏎"]
    assert {d["token"] for d in _data(spec)} == {"0:Add", "1:␣", "2:⏎"}
    # a trace carrying the tokenizer's own text (the app adds it to live traces) is drawn with it
    assert charts.trace_tokens(trace | {"text": ["Add", " ", "\n"]}) == ["Add", "␣", "⏎"]


# ----------------------------------------------------------------------------- sweeps


def _sweep(points: list[tuple[dict, float]], limit: int | None = 10, tasks: int = 2) -> dict:
    pts = [{"point": p, "key": str(i), "score": s, "per_task": {f"t{j}": s for j in range(tasks)}}
           for i, (p, s) in enumerate(points)]
    best = max(pts, key=lambda p: p["score"])
    return {"recipe": "r", "split": "validation", "limit": limit, "points": pts, "best": best,
            "scoring": {f"t{j}": {"metric": "exact_match", "higher_is_better": True} for j in range(tasks)}}


def test_wilson_interval():
    lo, hi = charts.wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = charts.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)


def test_a_two_parameter_sweep_is_a_heatmap_with_intervals():
    rec = _sweep([({"density": d, "lambda": lam}, 0.1 + 0.1 * i) for i, (d, lam) in
                  enumerate([(0.2, 0.7), (0.2, 1.0), (0.5, 0.7), (0.5, 1.0)])])
    spec = charts.sweep_chart(rec).to_dict()
    heat, _text, chosen = spec["layer"]
    enc = {**spec.get("encoding", {}), **heat["encoding"]}
    assert heat["mark"]["type"] == "rect" and (enc["x"]["field"], enc["y"]["field"]) == ("density", "lambda")
    assert enc["x"]["sort"] == ["0.2", "0.5"] and enc["y"]["sort"] == ["0.7", "1.0"]
    assert enc["color"]["scale"]["domain"] == [0, 100]
    rows = {(d["density"], d["lambda"]): d for d in _data(spec)}
    last = rows[("0.5", "1.0")]  # 0.4 over 2 tasks x 10 examples: 8 of 20
    lo, hi = charts.wilson(8, 20)
    assert (last["lo"], last["hi"]) == (pytest.approx(100 * lo), pytest.approx(100 * hi))
    assert last["label"] == f"40 [{100 * lo:.0f}–{100 * hi:.0f}]" and last["n"] == 20
    assert last["se"] == pytest.approx(100 * math.sqrt(2 * 0.4 * 0.6 / 10) / 2)
    assert chosen["transform"] == [{"filter": "datum.chosen"}] and chosen["mark"]["stroke"] == "red"


def test_a_one_parameter_sweep_has_error_bars_on_a_0_to_100_axis():
    rec = _sweep([({"k": k}, s) for k, s in ((1, 0.48), (2, 0.30), (3, 0.25))], limit=25, tasks=6)
    spec = charts.sweep_chart(rec).to_dict()
    marks = [(layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"]) for layer in spec["layer"]]
    assert "errorbar" in marks
    err = spec["layer"][marks.index("errorbar")]["encoding"]
    assert (err["y"]["field"], err["y2"]["field"]) == ("lo", "hi")
    line = {**spec.get("encoding", {}), **spec["layer"][marks.index("line")]["encoding"]}
    assert line["y"]["scale"]["domain"] == [0, 100] and err["y"]["scale"]["domain"] == [0, 100]
    assert line["x"]["field"] == "k" and line["x"]["sort"] == ["1", "2", "3"]
    # no example count: no interval, and the title says why
    nolimit = charts.sweep_chart(_sweep([({"k": 1}, 0.5), ({"k": 2}, 0.4)], limit=None)).to_dict()
    assert "errorbar" not in json.dumps(nolimit) and "example count unknown" in nolimit["title"]


# ----------------------------------------------------------------------------- palettes


def test_the_palette_never_repeats_a_colour_within_a_chart():
    for n in (1, 6, 10, 11, 19, 40, 64):
        got = charts.palette(n)
        assert len(got) == n == len(set(got))
    spec = charts.task_bars(_board(n_rows=19)).to_dict()
    scale = _layers(spec)[0]["encoding"]["color"]["scale"]
    assert len(scale["domain"]) == 19 and len(set(scale["range"])) == 19
    curve = {"name": "mc", "pool": "demo", "points": [
        {"method": f"m{i}", "experts": e, "mean": 0.5, "stderr": 0.1} for i in range(12) for e in (2, 3)]}
    cspec = charts.curve_chart(curve).to_dict()
    scale = {**cspec.get("encoding", {}), **cspec["layer"][1]["encoding"]}["color"]["scale"]
    assert len(set(scale["range"])) == len(scale["domain"]) == 12
    ratios = [{"name": f"g.r{i}", "group": "g", "ratio": f"r{i}_x_base", "value": 1.0, "target": None}
              for i in range(14)]
    spec = charts.bench_chart(ratios, "t").to_dict()
    scale = {**spec["spec"].get("encoding", {}), **spec["spec"]["layer"][0]["encoding"]}["color"]["scale"]
    assert len(set(scale["range"])) == len(scale["domain"]) == 14


# ----------------------------------------------------------------------------- benchmarks


ROUTING = {"benchmark": "routing", "forward": {"seconds": {"base": 2.0, "routed_top2": 3.0},
                                               "samples_s": {"base": [2.0, 2.1]},
                                               "x_base": {"base": 1.0, "routed_top2": 1.5}},
           "rows": [{"rank": 8, "U": 4, "base_s": 0.5, "ours_s": 0.6, "ours_x_base": 1.2, "base_samples_s": [0.5]}],
           "serve": {"multi_adapter_rps_vs_base": 0.8, "p50_ms": 250.0},
           "targets": {"ties_wall_vs_mergekit": "<= 0.5"}, "ties_wall_vs_mergekit": 0.3}


def test_benchmark_times_beside_ratios_with_their_direction():
    from workbench.catalog import bench_ratios

    times = {(t["group"], t["name"]): t["seconds"] for t in charts.bench_times(ROUTING)}
    assert times == {("forward seconds", "base"): 2.0, ("forward seconds", "routed_top2"): 3.0,
                     ("rank=8 U=4", "base"): 0.5, ("rank=8 U=4", "ours"): 0.6, ("serve", "p50"): 0.25}
    ratios = {r["ratio"]: r for r in charts.ratio_times(bench_ratios(ROUTING), charts.bench_times(ROUTING))}
    assert (ratios["routed_top2"]["time_s"], ratios["routed_top2"]["peer_s"]) == (3.0, 2.0)
    assert (ratios["ours_x_base"]["time_s"], ratios["ours_x_base"]["peer_s"]) == (0.6, 0.5)
    assert charts.ratio_direction("ours_x_base") == "lower"
    assert charts.ratio_direction("multi_adapter_rps_vs_base") == "higher"
    assert charts.ratio_direction("lora_ta_speedup_vs_mergekit") == "higher"
    assert charts.ratio_direction("x", "<= 0.5") == "lower" and charts.ratio_direction("x", ">= 10") == "higher"
    spec = charts.bench_chart(bench_ratios(ROUTING), "routing", charts.bench_times(ROUTING)).to_dict()
    left, right = spec["hconcat"]
    series = {d["series"]: d for d in _data(spec) if "series" in d}
    assert series["ours_x_base ↓"]["direction"] == "lower is better"
    assert series["multi_adapter_rps_vs_base ↑"]["direction"] == "higher is better"
    assert "absolute times" in right["title"] and "lower is better" in right["title"]
    tips = {t.get("field") for t in left["spec"]["layer"][0]["encoding"]["tooltip"]}
    assert {"time_s", "peer_s", "direction"} <= tips


# ----------------------------------------------------------------------------- costs


def _safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    header = {k: {"dtype": "F32", "shape": s, "data_offsets": [0, 0]} for k, s in shapes.items()}
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


@pytest.fixture()
def cost_world(tmp_path, monkeypatch):
    """A comparison folder with build records, an artifact cache and a pool, as the workbench writes them."""
    monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("WORKBENCH_POOLS", str(tmp_path / "pools"))
    comp = tmp_path / "compare" / "c"
    arts = tmp_path / "artifacts"

    def write(p: Path, d: dict) -> None:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(d))

    write(comp / "builds" / "smora.json", {"key": "k", "row": "smora", "method": "smora",
                                           "artifact": "artifacts/smora-1", "build_s": 0.0})
    write(arts / "smora-1" / "artifact.json", {"type": "smora", "build_s": 120.5, "parameter_counts": {
        "adapter": 1000, "router": 30, "activated_adapter_per_token": 200}})
    write(comp / "builds" / "ta.json", {"key": "k", "row": "ta", "method": "task_arithmetic",
                                        "artifact": "artifacts/ta-1", "build_s": 0.0})
    write(arts / "ta-1" / "artifact.json", {"type": "merged_model", "build_s": 2.5})
    write(comp / "builds" / "arrow.json", {"key": "k", "row": "arrow", "method": "arrow",
                                           "artifact": "artifacts/arrow-gone", "build_s": 3.0})
    write(tmp_path / "pools" / "p" / "pool.json", {"experts": [
        {"name": "addition", "kind": "lora", "path": "experts/addition", "training": {"wall_s": 600.0}}]})
    _safetensors(tmp_path / "pools" / "p" / "experts" / "addition" / "adapter_model.safetensors",
                 {"a.lora_A.weight": [8, 64], "a.lora_B.weight": [64, 8]})
    names = ["base", "addition", "ta", "smora", "arrow"]
    rows = [{"name": n, "method": m, "expert_task": None} for n, m in
            zip(names, ["base", "expert-lora", "task_arithmetic", "smora", "arrow"])]
    cells = {}
    for i, n in enumerate(names):
        for t in (HELD_IN[0], HELD_OUT[0]):
            cells[(n, t)] = {"metric": "exact_match", "higher_is_better": True, "aggregate": "mean",
                             "doc_ids": list(range(10)), "values": [float(j < 2 * i) for j in range(10)], "n": 10,
                             **({"eval_s": 2.0 + i} if n != "arrow" else {})}
    board = build_leaderboard(rows, cells, [HELD_IN[0], HELD_OUT[0]], "base") | {"pool": "p"}
    return board, comp, cells


def test_costs_come_from_the_records_and_missing_ones_are_named(cost_world):
    from workbench.eval.costs import missing, row_costs

    board, comp, cells = cost_world
    got = {r["model"]: r for r in row_costs(board, comp, cells)}
    assert got["smora"]["build_s"] == 120.5 and got["smora"]["build_s from"] == "artifact manifest"  # not the 0.0
    assert got["smora"]["active_params"] == 230  # activated ranks + router
    assert got["ta"]["build_s"] == 2.5 and got["ta"]["active_params"] == 0
    assert got["addition"]["build_s"] == 600.0 and got["addition"]["active_params"] == 2 * 8 * 64
    assert got["arrow"]["build_s"] == 3.0  # the build record, its artifact not in this cache
    assert got["arrow"]["active_params"] is None and got["arrow"]["eval_s_per_example"] is None
    assert got["smora"]["eval_s_per_example"] == pytest.approx(2 * 5.0 / 20)
    assert got["base"]["build_s"] == 0.0
    assert got["smora"]["held_in"] == pytest.approx(60.0) and got["smora"]["held_out"] == pytest.approx(60.0)
    costs = list(got.values())
    assert missing(costs, "active_params") == ["arrow"]
    note = " ".join(charts.cost_note(costs))
    assert "extra active parameters per token: not recorded for arrow" in note
    assert "evaluation time per example (s): not recorded for arrow" in note


def test_cost_and_generalization_scatters_draw_the_recorded_values(cost_world):
    from workbench.eval.costs import row_costs

    board, comp, cells = cost_world
    costs = row_costs(board, comp, cells)
    spec = charts.cost_chart(costs).to_dict()
    data = _data(spec)
    assert spec["facet"]["column"]["field"] == "cost" and spec["resolve"]["scale"]["x"] == "independent"
    drawn = {(d["model"], d["cost"], d["group"]): d["value"] for d in data}
    assert drawn[("smora", "build time (s)", "held-in")] == 120.5
    assert ("arrow", "extra active parameters per token", "held-out") not in drawn  # missing, not invented
    assert any("1 of 5 rows not recorded" in s for s in spec["title"]["subtitle"])
    # a cost no row has: the chart says so
    none = [r | {"eval_s_per_example": None, "eval_s_per_example from": "not recorded: no cell has eval_s"}
            for r in costs]
    sub = charts.cost_chart(none).to_dict()["title"]["subtitle"]
    assert "evaluation time per example (s): no data for any row" in sub
    assert any("no data for any row" in n for n in charts.cost_note(none))
    gen = charts.generalization_chart(costs).to_dict()
    pts = {d["model"]: d for rows in gen["datasets"].values() for d in rows if "held_in" in d}
    assert pts["smora"]["held_in"] == pytest.approx(60.0) and pts["smora"]["held_out"] == pytest.approx(60.0)
    assert set(pts) == {"base", "addition", "ta", "smora", "arrow"}


# ----------------------------------------------------------------------------- in the app


def test_the_app_heatmap_follows_the_rows_and_the_scatters_show_by_default(app_world, monkeypatch):
    pytest.importorskip("streamlit")
    import pyarrow as pa
    from streamlit.testing.v1 import AppTest

    for k, v in app_world.items():
        if k.startswith("WORKBENCH_"):
            monkeypatch.setenv(k, v)
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app" / "app.py"), default_timeout=120)
    at.run()
    at.sidebar.radio(key="view").set_value("Per-task charts").run()
    at.multiselect(key="ch-rows-comparison-small").set_value(["base", "ta"]).run()
    assert not at.exception, [e.value for e in at.exception]
    got = at.get("vega_lite_chart")
    assert at.toggle(key="ch-cost-small").value is True  # the scatters are on by default
    assert len(got) == 4  # bars, heatmap, cost vs quality, held-in vs held-out
    heat = pa.ipc.open_stream(got[1].proto.datasets[0].data.data).read_all().to_pandas()
    assert set(heat.model) == {"base", "ta"}  # the selected rows, not every row
    at.toggle(key="ch-cost-small").set_value(False).run()
    assert not at.exception and len(at.get("vega_lite_chart")) == 2
    at.toggle(key="ch-cost-small").set_value(True).run()
    got = at.get("vega_lite_chart")
    assert len(got) == 4
    cost = json.loads(got[2].proto.spec)
    assert cost["facet"]["column"]["field"] == "cost"
    assert any("Costs as recorded" in c.value for c in at.caption)
