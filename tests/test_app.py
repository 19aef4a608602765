"""The Streamlit app (app/app.py) under streamlit.testing.v1.AppTest: every view on a results folder the workbench
made on the tiny model (conftest `app_world`), and on folders with a truncated JSON, a foreign JSON and nothing."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

from workbench.eval.leaderboard import short

APP = str(Path(__file__).resolve().parent.parent / "app" / "app.py")
VIEWS = ["Leaderboard", "Per-task charts", "Pairwise", "Examples", "Sweeps", "Routing", "Playground", "Run",
         "Benchmarks"]


@pytest.fixture()
def world(app_world, monkeypatch):
    from workbench import jobs

    for k, v in app_world.items():
        if k.startswith("WORKBENCH_"):
            monkeypatch.setenv(k, v)
    yield Path(app_world["root"])
    for r in jobs.background_runs():  # runs started by a test end with it
        if r.thread is not None:
            r.thread.join(120)
    jobs._RUNS.clear()


@pytest.fixture()
def own_results(world, tmp_path, monkeypatch):
    """A copy of the fixture's results for a test that writes (the app's runs land here)."""
    res = tmp_path / "results"
    shutil.copytree(world / "results", res)
    monkeypatch.setenv("WORKBENCH_RESULTS", str(res))
    return res


def open_view(view: str, results: Path | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    if results is not None:
        at.sidebar.text_input(key="results_dir").set_value(str(results)).run()
    at.sidebar.radio(key="view").set_value(view).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def charts(at: AppTest) -> list:
    return at.get("vega_lite_chart")


def load_pool(at: AppTest) -> AppTest:
    """The Playground loads its pool on a click (unless this process loaded it already)."""
    if any(b.key == "pg-load" for b in at.button):
        at.button(key="pg-load").click().run()
    assert not at.exception and any(m.key == "pg-models" for m in at.multiselect)
    return at


def test_leaderboard_matches_the_library(world):
    from workbench.eval.leaderboard import short

    at = open_view("Leaderboard")
    assert at.selectbox(key="lb-source").value == "comparison: small"
    df = at.dataframe[0].value
    assert set(df.model) == {"base", "addition", "sorting", "ta", "arrow"}
    shown = df.set_index("model")
    # every row and number equals leaderboard.json, which `workbench compare` wrote (not the catalog against itself)
    board = json.loads((world / "results" / "compare" / "small" / "leaderboard.json").read_text())
    assert set(shown.index) == {r["name"] for r in board["rows"]}
    for r in board["rows"]:
        hi = r["summary"]["held_in"]
        assert shown.loc[r["name"], "held_in %"] == pytest.approx(100 * hi["mean"]), r["name"]
        assert shown.loc[r["name"], "held_in se"] == pytest.approx(100 * hi["stderr"], nan_ok=True), r["name"]
        for t, c in r["tasks"].items():  # task columns show the task's short name
            assert shown.loc[r["name"], f"{short(t)} %"] == pytest.approx(100 * c["mean"]), (r["name"], t)
        if r["paired"]:
            assert shown.loc[r["name"], "diff vs ref (pp)"] == pytest.approx(100 * r["paired"]["diff"])
            # p is a number (shown with three significant digits), so that a click sorts it by value
            assert shown.loc[r["name"], "p (paired)"] == pytest.approx(r["paired"]["p_value"])
    assert shown.loc["base", "diff vs ref (pp)"] != shown.loc["base", "diff vs ref (pp)"]  # the reference: NaN
    # another reference re-pairs every row against it
    at.selectbox(key="lb-ref-comparison-small").set_value("ta").run()
    df2 = at.dataframe[0].value.set_index("model")
    assert df2.loc["ta", "diff vs ref (pp)"] != df2.loc["ta", "diff vs ref (pp)"]
    assert df2.loc["base", "diff vs ref (pp)"] == pytest.approx(-shown.loc["ta", "diff vs ref (pp)"])
    # filters: by method and by task group
    at.multiselect(key="lb-methods-comparison-small").set_value(["expert-lora"]).run()
    assert set(at.dataframe[0].value.model) == {"addition", "sorting"}
    assert at.get("download_button")
    at.selectbox(key="lb-group").set_value("held-out").run()  # the fixture has no held-out task: said, no table
    assert not at.dataframe and any("No row shown scored a held-out task" in i.value for i in at.info)


def test_leaderboard_shows_normalized_scores_and_the_comparison_record(world):
    at = open_view("Leaderboard")
    df = at.dataframe[0].value.set_index("model")
    board = json.loads((world / "results" / "compare" / "small" / "leaderboard.json").read_text())
    by = {r["name"]: r for r in board["rows"]}
    # normalized: the row's held-in mean over the experts' own-task mean (addition on addition, sorting on sorting)
    own = (by["addition"]["tasks"]["addition"]["mean"] + by["sorting"]["tasks"]["sorting"]["mean"]) / 2
    if own > 0:
        assert df.loc["ta", "normalized %"] == pytest.approx(100 * by["ta"]["summary"]["held_in"]["mean"] / own)
    else:  # no row has a normalized score: the column is left out
        assert "normalized %" not in df.columns or df.loc["ta", "normalized %"] != df.loc["ta", "normalized %"]
    # the caption is the leaderboard's own record (not plan.json's): its cell count
    assert any(f"cells {board['cells']}" in c.value for c in at.caption)
    assert not at.sidebar.expander  # every file of the fixture is read as what it is: nothing skipped


def _mixed_comparison(root: Path, docs: int = 4) -> dict:
    """A comparison folder with an exact-match task, a perplexity corpus and a user's BLEU task: cells as run_row
    writes them, plan.json with their keys, and the leaderboard the jobs would write. `docs` (4 to 7): examples per
    task; `merged` is 4 nats more likely than `base` on every document of the corpus."""
    import math

    from workbench.eval.leaderboard import build_leaderboard

    out = root / "compare" / "mixed"
    tasks = ["addition", "python_code", "my_bleu"]
    rows = [{"name": n, "method": "m", "expert_task": None} for n in ("base", "merged")]
    cells = {}
    ids = list(range(docs))
    for name, em, shift, bleu in (("base", [1, 0, 0, 0], 0.0, 20.0), ("merged", [1, 1, 0, 1], 4.0, 30.0)):
        em = em + [0] * (docs - 4)
        lls = [x + shift for x in [-40.0, -90.0, -25.0, -60.0, -35.0, -70.0, -50.0][:docs]]
        words = [10.0, 20.0, 5.0, 15.0, 8.0, 18.0, 12.0][:docs]
        cells[(name, "addition")] = {"metric": "exact_match", "higher_is_better": True, "aggregate": "mean",
                                     "score": sum(em) / docs, "n": docs, "doc_ids": ids,
                                     "values": [float(v) for v in em]}
        cells[(name, "python_code")] = {"metric": "word_perplexity", "higher_is_better": False, "aggregate": "perplexity",
                                        "score": math.exp(-sum(lls) / sum(words)), "n": docs, "doc_ids": ids,
                                        "values": lls, "weights": words}
        cells[(name, "my_bleu")] = {"metric": "bleu", "higher_is_better": True, "aggregate": "none", "score": bleu,
                                    "n": docs, "doc_ids": [], "values": [],
                                    "note": "bleu is aggregated over the corpus"}
    for (row, task), c in cells.items():
        c |= {"key": f"k-{row}-{task}", "row": row, "task": task}
        (out / "cells" / row).mkdir(parents=True, exist_ok=True)
        (out / "cells" / row / f"{task}.json").write_text(json.dumps(c))
    (out / "plan.json").write_text(json.dumps({
        "name": "mixed", "source": "mixed.yaml", "pool": "demo", "tasks": tasks, "reference": "base",
        "eval": {"limit": docs, "split": "test"}, "rows": rows, "skipped": {},
        "cells": {r["name"]: {t: f"k-{r['name']}-{t}" for t in tasks} for r in rows}}))
    board = build_leaderboard(rows, cells, tasks, "base") | {"name": "mixed", "pool": "demo", "skipped": {},
                                                             "eval": {"limit": docs, "split": "test"}, "cells": "6/6"}
    (out / "leaderboard.json").write_text(json.dumps(board))
    return board


def test_leaderboard_shows_each_metric_in_its_units_and_direction(world, tmp_path):
    board = _mixed_comparison(tmp_path / "results")
    at = open_view("Leaderboard", tmp_path / "results")
    assert at.selectbox(key="lb-source").value == "comparison: mixed"
    df = at.dataframe[0].value.set_index("model")
    by = {r["name"]: r for r in board["rows"]}
    ppl = by["merged"]["tasks"]["python_code"]
    # the perplexity as it is (never x100), its bootstrap se, and its gain over the reference (+ = lower perplexity)
    assert df.loc["merged", "py ppl word_perplexity"] == pytest.approx(ppl["mean"])
    assert df.loc["merged", "py ppl se"] == pytest.approx(ppl["stderr"]) and ppl["stderr"] > 0
    assert df.loc["merged", "py ppl Δ"] == pytest.approx(-ppl["paired"]["diff"]) and ppl["paired"]["diff"] < 0
    assert df.loc["merged", "add %"] == pytest.approx(75.0) and df.loc["merged", "my_bleu bleu"] == 30.0
    assert df.loc["merged", "py ppl p"] == pytest.approx(ppl["paired"]["p_value"])  # a number: sorts by value
    assert "my_bleu p" not in df.columns and "my_bleu se" not in df.columns  # no row has one: no empty column
    labels = {c["label"] for c in json.loads(at.dataframe[0].proto.columns).values() if c.get("label")}
    assert {"add % ↑", "py ppl word_perplexity ↓", "my_bleu bleu ↑", "py ppl Δ (+ better)"} <= labels
    caption = " ".join(c.value for c in at.caption)
    assert "py ppl ↓: word_perplexity, lower is better" in caption and "no se and no paired test" in caption
    at.selectbox(key="lb-group").set_value("other").run()
    cols = set(at.dataframe[0].value.columns)
    assert "py ppl word_perplexity" in cols and "add %" not in cols and "held_in %" not in cols

    at = open_view("Pairwise", tmp_path / "results")
    assert not at.exception
    pw = at.dataframe[0].value.set_index("task")
    assert pw.loc["addition", "unit"] == "%" and pw.loc["addition", "merged (A)"] == pytest.approx(75.0)
    assert pw.loc["python_code", "unit"] != "%" and abs(pw.loc["python_code", "A − B"]) < 100  # not x100


def test_charts_and_pairwise_of_other_metrics(world, tmp_path):
    """Per-task charts draw the accuracy-like tasks in points and name the others; Pairwise tests a perplexity over
    documents (its corpus perplexities, never mean log-likelihoods) in its direction."""
    board = _mixed_comparison(tmp_path / "results")
    at = open_view("Per-task charts", tmp_path / "results")
    assert at.selectbox(key="ch-source").value == "comparison: mixed"
    assert len(charts(at)) == 4  # bars, heatmap and the two scatters (on by default)
    for chart in charts(at)[:2]:
        spec = json.loads(chart.proto.spec)
        subtitle = " ".join(spec["title"]["subtitle"])
        assert "py ppl (word_perplexity ↓)" in subtitle and "my_bleu (bleu ↑)" in subtitle
    import pyarrow as pa

    bars = pa.ipc.open_stream(charts(at)[0].proto.datasets[0].data.data).read_all().to_pandas()
    assert set(bars.task) == {"addition"} and sorted(bars.score) == pytest.approx([25.0, 75.0])

    at = open_view("Pairwise", tmp_path / "results")
    pw = at.dataframe[0].value.set_index("task")
    assert set(pw.index) == {"addition", "python_code"}  # my_bleu: the score only, no paired test
    ppl = next(r for r in board["rows"] if r["name"] == "merged")["tasks"]["python_code"]
    assert pw.loc["python_code", "test"] == "sign_flip_corpus" and pw.loc["python_code", "unit"] == "word_perplexity"
    assert pw.loc["python_code", "merged (A)"] == pytest.approx(ppl["mean"])
    assert pw.loc["python_code", "verdict"] != "B better"  # lower perplexity is never read as worse
    assert pw.loc["addition", "test"] == "mcnemar"


def test_pairwise_reads_a_lower_perplexity_as_a_better(tmp_path):
    """Pairwise's verdicts in a lower-is-better metric's direction: over 7 documents, every one 4 nats more likely
    under `merged` (a lower perplexity), the exact sign-flip test gives p = 2/128 (p Holm 2/64 over the pair's two
    tasks), below 0.05 both: A (merged) better, never B. (Over 4 documents the exact test cannot go below p = 0.125:
    every verdict there is noise, whichever way the direction is read.)"""
    board = _mixed_comparison(tmp_path / "results", docs=7)
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"results": str(tmp_path / "results"), "view": "Pairwise", "A": "merged", "B": "base"})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    pw = at.dataframe[0].value.set_index("task")
    ppl = next(r for r in board["rows"] if r["name"] == "merged")["tasks"]["python_code"]
    assert pw.loc["python_code", "test"] == "sign_flip_corpus" and pw.loc["python_code", "n"] == 7
    assert pw.loc["python_code", "merged (A)"] == pytest.approx(ppl["mean"]) and pw.loc["python_code", "A − B"] < 0
    assert pw.loc["python_code", "p_value"] == pytest.approx(2 / 128)
    assert pw.loc["python_code", "p Holm"] == pytest.approx(2 / 64)
    assert pw.loc["python_code", "verdict"] == "A better"
    assert pw.loc["python_code", "verdict (Holm)"] == "A better"


def test_disagreements_name_values_by_kind_and_curves_show_their_note(world, tmp_path):
    """Pairwise on loose runs: the disagreements of a perplexity task are per-document log-likelihoods (never "ok"
    flags), of an exact-match task ok flags; the Sweeps view's curve caption carries the curve's note."""
    from test_metric_readers import _run

    root = tmp_path / "results"
    _run(root / "lm-eval" / "demo__base", "2026-01-01T00-00-00", "base", 0.0, [1, 0, 0, 0], [0.5, 0.25, 0.0, 0.5],
         0.4)
    _run(root / "lm-eval" / "demo__multitask", "2026-01-01T00-00-01", "multitask", 4.0, [1, 1, 0, 1],
         [1.0, 0.5, 0.25, 0.75], 0.8)
    note = "mean over the accuracy-like tasks only; left out (not accuracy-like): python_code (word_perplexity)"
    (root / "compare" / "mc").mkdir(parents=True)
    (root / "compare" / "mc" / "curve.json").write_text(json.dumps({
        "name": "mc", "pool": "demo", "eval": {"limit": 4}, "left_out": {"python_code": "word_perplexity"},
        "note": note, "points": [{"row": "two", "method": "ties", "experts": 2, "tasks": ["addition"],
                                  "mean": 0.75, "stderr": 0.25, "per_task": {"addition": 0.75}}]}))

    at = open_view("Pairwise", root)
    at.selectbox(key="pw-source").set_value("runs: demo").run()
    at.selectbox(key="pw-a-runs-demo").set_value("multitask").run()
    at.selectbox(key="pw-b-runs-demo").set_value("base").run()
    at.selectbox(key="pw-task-demo").set_value("python_code").run()
    assert not at.exception, [e.value for e in at.exception]
    diffs = at.dataframe[1].value
    assert {"multitask log-likelihood", "base log-likelihood"} <= set(diffs.columns)
    assert not any(c.endswith((" ok", " answer")) for c in diffs.columns)  # no answers to a document
    assert sorted(diffs["base log-likelihood"]) == sorted(-40.0 + x for x in (0.0, -50.0, 15.0, -20.0))
    assert any("log-likelihood under each row" in c.value for c in at.caption)
    at.selectbox(key="pw-task-demo").set_value("addition").run()
    diffs = at.dataframe[1].value
    assert {"multitask ok", "base ok", "multitask answer"} <= set(diffs.columns) and len(diffs) == 2
    at.selectbox(key="pw-task-demo").set_value("my_qa").run()
    assert {"multitask f1", "base f1"} <= set(at.dataframe[1].value.columns)

    at = open_view("Sweeps", root)
    caption = " ".join(c.value for c in at.caption)
    assert "exact match" not in caption and "accuracy-like tasks" in caption
    assert "Mean over the accuracy-like tasks only; left out (not accuracy-like): python_code" in caption
    spec = json.loads(charts(at)[0].proto.spec)
    assert spec["title"]["subtitle"] == [note]


def test_runs_source_says_which_run_a_row_shows_and_lets_the_user_pick(world):
    at = open_view("Leaderboard")
    at.selectbox(key="lb-source").set_value("runs: demo").run()
    df = at.dataframe[0].value.set_index("model")
    # `addition` has runs at limits 4 (the comparison's: one run per task), 3 and 2 (each on both tasks, newer); all
    # cover both tasks, so the most complete setting is shown (the most examples: limit 4), and the row says so
    assert "limit 4" in df.loc["addition", "shows"] and "(1 of 3 settings)" in df.loc["addition", "shows"]
    assert {"add %", "sort %"} <= set(df.columns)
    # the comparison's two one-task runs together make the row, with the numbers of the comparison's cells
    from workbench.catalog import comparison_source, scan

    cells = comparison_source(scan(world / "results"), "small").cells
    for t in ("addition", "sorting"):
        v = cells[("addition", t)]["values"]
        assert df.loc["addition", f"{short(t)} %"] == pytest.approx(100 * sum(v) / len(v))
    pick = at.selectbox(key="pick-demo-demo__addition")
    label = next(o for o in pick.options if "limit 3" in o).rsplit(" (", 1)[0]
    pick.set_value(label).run()
    df2 = at.dataframe[0].value.set_index("model")
    assert "limit 3" in df2.loc["addition", "shows"]
    assert not at.exception


def test_charts_pairwise_sweeps_routing_benchmarks_views(world):
    at = open_view("Per-task charts")
    assert len(charts(at)) == 4  # grouped bars with error bars, the difference heatmap, cost and held-in/out scatters
    spec = json.loads(charts(at)[0].proto.spec)
    assert "xOffset" in json.dumps(spec) and "rule" in json.dumps(spec)  # grouped, with error bars
    at.selectbox(key="ch-ref-comparison-small").set_value("ta").run()
    heat = charts(at)[1].proto
    board = json.loads((world / "results" / "compare" / "small" / "leaderboard.json").read_text())
    means = {(r["name"], t): c["mean"] for r in board["rows"] for t, c in r["tasks"].items()}
    import pyarrow as pa  # the chart's data travel as an Arrow table

    cells = pa.ipc.open_stream(heat.datasets[0].data.data).read_all().to_pandas()
    assert len(cells) == len(means)
    for r in cells.itertuples():  # every cell: the row's task mean minus the chosen reference's, in points
        assert r.diff == pytest.approx(100 * (means[(r.model, r.task)] - means[("ta", r.task)]))

    at = open_view("Pairwise")
    at.selectbox(key="pw-a-comparison-small").set_value("ta").run()
    at.selectbox(key="pw-b-comparison-small").set_value("base").run()
    pw = at.dataframe[0].value
    assert set(pw.task) == {"addition", "sorting"} and {"p_value", "verdict"} <= set(pw.columns)
    from workbench.catalog import comparison_source, scan

    src = comparison_source(scan(world / "results"), "small")
    lib = {r["task"]: r for r in src.pairwise("ta", "base")}
    for r in pw.itertuples():
        assert r.p_value == pytest.approx(lib[r.task]["p_value"])
    n_diff = len(src.disagreements("ta", "base", at.selectbox(key="pw-task-small").value))
    assert (len(at.dataframe) == 2 and len(at.dataframe[1].value) == n_diff) or (n_diff == 0 and at.info)

    at = open_view("Sweeps")
    assert len(charts(at)) == 2  # the merge-count curve of the comparison, and the sweep
    curve = json.loads((world / "results" / "compare" / "small" / "curve.json").read_text())
    assert {p["row"] for p in curve["points"]} == {"ta", "arrow"}
    assert any("chosen {'lambda'" in c.value for c in at.caption)
    assert "datum.chosen" in charts(at)[1].proto.spec  # the chosen point drawn apart

    at = open_view("Routing")
    assert len(charts(at)) == 2  # the saved trace: usage per layer, weight per token
    assert not [w for w in at.selectbox if w.key == "rt-model"]  # opening loads nothing: live tracing on request
    at.toggle(key="rt-live").set_value(True).run()
    assert at.selectbox(key="rt-model").options  # the built Arrow composition can be traced live
    at.text_input(key="rt-prompt").set_value("7+8=").run()
    at.button(key="rt-go").click().run()
    assert not at.exception and len(charts(at)) == 4

    at = open_view("Benchmarks")
    assert len(charts(at)) == 1
    assert any("machine: cpu" in c.value for c in at.caption)


def test_playground_answers_match_the_engine(world):
    from workbench.pool import Pool

    at = open_view("Playground")
    load_pool(at)
    at.multiselect(key="pg-models").set_value(["base", "addition"]).run()
    at.text_input(key="pg-mix").set_value("mix:addition=0.5,sorting=0.5").run()
    at.text_area(key="pg-prompt").set_value("12+30=").run()
    at.number_input(key="pg-max").set_value(6).run()
    at.checkbox(key="pg-chat").uncheck().run()
    at.button(key="pg-run").click().run()
    assert not at.exception and not at.error
    deadline = time.time() + 120  # the answers stream in while the page polls: rerun until they have ended
    while not any("models in one batch" in c.value for c in at.caption):
        assert time.time() < deadline
        time.sleep(0.2)
        at.run()
    texts = [t.value for t in at.text]
    # the reference is not the serving engine: PEFT's own greedy generate for the base and the adapter, and for the
    # mix the base with 0.5 * each expert's exact task vector merged into its weights (plain transformers), read as
    # the evaluation reads an answer (the Playground's default format): up to the first newline, stripped
    import torch
    from peft import PeftModel

    from workbench.tasks.suite import ADD_SPECIAL_TOKENS

    pool = Pool.open("demo")
    tok = pool.base.tokenizer()
    ids = tok("12+30=", return_tensors="pt", add_special_tokens=ADD_SPECIAL_TOKENS).input_ids

    def greedy(model):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()

    mixed = pool.base.load().eval()
    params = dict(mixed.named_parameters())
    with torch.no_grad():
        for name in ("addition", "sorting"):
            e = pool.expert(name)
            for t in e.delta_names():
                params[t] += 0.5 * e.delta(t)
    want = [greedy(pool.base.load().eval()),
            greedy(PeftModel.from_pretrained(pool.base.load(), str(pool.expert("addition").path)).eval()),
            greedy(mixed)]
    assert len(set(want)) == 3  # the three models answer differently: a wrong one cannot pass for another
    assert texts == [w or "(empty answer)" for w in want]
    # an unknown model in the mix: one line, no exception
    at.text_input(key="pg-mix").set_value("mix:ghost=1").run()
    at.button(key="pg-run").click().run()
    assert not at.exception and "unknown model 'ghost'" in at.error[0].value


def test_run_view_launches_in_the_background_and_the_result_reaches_the_leaderboard(own_results):
    at = open_view("Run")
    at.selectbox(key="run-method").set_value("task_arithmetic").run()
    at.multiselect(key="run-experts").set_value(["addition", "sorting"]).run()
    at.number_input(key="run-p-task_arithmetic-lambda").set_value(0.7).run()
    at.number_input(key="run-limit").set_value(2).run()
    at.button(key="run-go-build").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    from workbench import jobs

    run = next(r for r in jobs.background_runs() if r.name == "demo-task_arithmetic")
    run.thread.join(180)
    assert run.status == "done", run.error
    at = open_view("Leaderboard")
    assert "comparison: demo-task_arithmetic" in at.selectbox(key="lb-source").options
    doc = json.loads((own_results / "compare" / "demo-task_arithmetic" / "builds" / "task-arithmetic.json").read_text())
    assert doc["params"]["lambda"] == pytest.approx(0.7)


def test_run_view_shows_a_failed_run_as_one_line(own_results, monkeypatch):
    from workbench import jobs

    def boom(*a, **k):
        raise RuntimeError("disk full\nmore detail")

    monkeypatch.setattr(jobs, "run_comparison", boom)
    run = jobs.start_background(jobs.comparison_document("demo", "ties", {}, experts=["addition", "sorting"], limit=2,
                                                         name="will-fail"))
    run.thread.join(30)
    at = open_view("Run")
    assert any(e.value == "will-fail: RuntimeError: disk full" for e in at.error)
    # a bad parameter is refused before any work, with the parameter named
    at.selectbox(key="run-method").set_value("ties").run()
    at.text_input(key="run-p-ties-per_expert").set_value("{ghost: {weight: 1}}").run()
    at.button(key="run-go-build").click().run()
    assert not at.exception and any("ghost" in e.value for e in at.error), [e.value for e in at.error]


@pytest.fixture()
def broken(world, tmp_path):
    """The fixture's results plus a truncated run manifest, a foreign JSON and a run manifest missing its scores."""
    res = tmp_path / "results"
    shutil.copytree(world / "results", res)
    run = next(res.rglob("run_*.json"))
    (run.parent / "run_truncated.json").write_text(run.read_text()[:40])
    (res / "foreign.json").write_text(json.dumps({"hello": "world"}))
    partial = json.loads(run.read_text())
    del partial["scores"]
    (run.parent / "run_partial.json").write_text(json.dumps(partial))
    (res / "empty.json").write_text("")
    for f in (res / "lm-eval").rglob("samples_*.jsonl.gz"):  # runs without per-sample outputs keep their means
        f.unlink()
    (res / "traces" / "odd.json").write_text(json.dumps({"tokens": ["a"], "experts": ["x"], "usage": [], "choices": []}))
    sweep = json.loads(next((res / "sweeps").glob("*.json")).read_text())
    del sweep["best"]
    (res / "sweeps" / "running.json").write_text(json.dumps(sweep))
    return res


@pytest.mark.parametrize("view", VIEWS)
def test_malformed_partial_and_foreign_files_are_warnings(broken, view):
    at = open_view(view, broken)
    warned = {w.value.split(":")[0] for w in at.sidebar.expander[0].warning} if at.sidebar.expander else set()
    assert {"foreign.json", "empty.json"} <= warned and any("run_truncated" in w for w in warned)
    assert any("run_partial" in w for w in warned)
    texts = [w.value for w in at.sidebar.expander[0].warning]
    assert any("partial run manifest: missing scores" in t for t in texts)
    assert any("not valid JSON" in t for t in texts) and any("foreign JSON" in t for t in texts)
    assert any(t.startswith("traces/odd.json: trace:") for t in texts)
    if view == "Leaderboard":  # the good records still show
        assert set(at.dataframe[0].value.model) == {"base", "addition", "sorting", "ta", "arrow"}
        at.selectbox(key="lb-source").set_value("runs: demo").run()  # runs whose samples are gone: means only
        assert not at.exception and "addition" in set(at.dataframe[0].value.model)
    if view == "Sweeps":  # a sweep still running is drawn, with no chosen point
        assert len(charts(at)) == 3 and any("no point chosen yet" in c.value for c in at.caption)


def test_routing_without_any_routed_model_is_an_empty_state(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path / "no-artifacts"))
    (tmp_path / "empty").mkdir()
    at = open_view("Routing", tmp_path / "empty")
    assert not at.error and any("No saved trace" in i.value for i in at.info)
    at.toggle(key="rt-live").set_value(True).run()
    assert not at.error and any("No routed model yet" in i.value for i in at.info)


@pytest.mark.parametrize("view", VIEWS)
def test_an_empty_or_missing_results_folder_shows_empty_states(world, tmp_path, view):
    (tmp_path / "empty").mkdir()
    at = open_view(view, tmp_path / "empty")
    assert not at.error
    if view in ("Leaderboard", "Per-task charts", "Pairwise", "Sweeps", "Benchmarks"):
        assert at.info, view
    at = open_view(view, tmp_path / "missing")  # a typo: said once, and no "no results yet" beside it
    assert not at.error
    assert any("does not exist" in w.value for w in at.warning), view
    if view != "Playground":
        assert not at.info, (view, [i.value for i in at.info])


def test_parsed_files_are_cached_by_mtime(world, tmp_path):
    from workbench import catalog

    res = tmp_path / "results"
    shutil.copytree(world / "results", res)
    catalog.scan(res)
    calls = []
    real = json.loads
    json.loads = lambda b: calls.append(1) or real(b)  # the parser behind catalog._parse (cells.load_json)
    try:
        catalog.scan(res)
        assert calls == []  # nothing changed: nothing parsed again
        run = next(res.rglob("run_*.json"))
        text = run.read_text()
        run.write_text(text)  # same bytes, same size: only the mtime changes
        st = run.stat()
        os.utime(run, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        catalog.scan(res)
        assert len(calls) == 1
    finally:
        json.loads = real


def test_bench_app_times_the_first_open_of_every_view_on_tiny_settings(world, tmp_path):
    """`workbench bench app` on a tiny folder: a fresh process per view and round, first open and reopen, the
    catalog-scan peer, per view whether it is within budget; bad settings are one line each."""
    from workbench.bench import app as bench
    from workbench.errors import WorkbenchError

    have = len(list((world / "results").rglob("run_*.json")))
    out = tmp_path / "app-open.json"
    rec = bench.run(src=world / "results", runs=have + 1, reps=1, reopen=1, out_file=out,
                    views=["Leaderboard", "Playground"], log=lambda *a: None)
    assert json.loads(out.read_text())["views"].keys() == {"Leaderboard", "Playground"} == rec["views"].keys()
    assert rec["runs"] > have  # a comparison was copied to reach the asked size
    for v, p in rec["views"].items():
        assert p["first_open_s"] > 0 and p["reopen_s"] > 0 and p["catalog_scan_s"] > 0, v
        assert p["within_budget"] == (p["first_open_s"] <= bench.BUDGET_S)
    assert rec["views"]["Leaderboard"]["elements"]["tables"] >= 1 and rec["leaderboard_rows"] == 5
    assert rec["first_open_s"] == rec["views"]["Leaderboard"]["first_open_s"]  # the CLI's line reads these
    assert [s["view"] for s in rec["samples"]["Playground"]] == ["Playground"]
    assert set(bench.VIEWS) == set(VIEWS)  # the benchmark opens every view of the app by default
    for kw, msg in [({"runs": 0}, "runs must be"), ({"reps": 10**6}, "reps must be"), ({"views": ["Nope"]}, "unknown view")]:
        with pytest.raises(WorkbenchError, match=msg):
            bench.run(src=world / "results", out_file=out, log=lambda *a: None, **kw)


def test_routing_selection_round_trips_through_the_url(world):
    at = open_view("Routing")
    at.toggle(key="rt-live").set_value(True).run()
    at.text_input(key="rt-prompt").set_value("3+4=").run()
    url = dict(at.query_params)
    assert (url["view"], url["live"], url["tprompt"], url["trace"]) == ("Routing", "on", "3+4=", "traces/arrow.json")
    assert url["model"] == at.selectbox(key="rt-model").options[at.selectbox(key="rt-model").index]
    again = AppTest.from_file(APP, default_timeout=120)
    again.query_params.update(url)
    again.run()
    assert not again.exception and again.toggle(key="rt-live").value is True
    assert again.text_input(key="rt-prompt").value == "3+4=" and again.selectbox(key="rt-model").index == \
        at.selectbox(key="rt-model").index
