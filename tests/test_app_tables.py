"""The app's tables tell the truth (issue 28): Leaderboard and Pairwise on results folders built here (cells, plan.json,
leaderboard.json and lm-eval runs with per-sample outputs, as the workbench writes them), the per-example browser
(Examples), links between views and a URL that reproduces the view; each under streamlit's AppTest."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app" / "app.py")
HELD_IN = ["addition", "sorting", "unit_conversion", "word_count", "repeat_word", "reverse_words"]


# ----------------------------------------------------------------------------- results folders


def write_run(folder: Path, run_id: str, row: str, task_values: dict[str, list[float]], *, limit: int | None,
              commit: str = "a" * 40, dirty: bool = False, answers: dict[str, list[str]] | None = None,
              doc_ids: dict[str, list[int]] | None = None) -> Path:
    """An lm-eval run as run_eval writes it (manifest with git and settings, per-sample outputs): exact match per
    example, prompts `q<task>-<i>`, targets `t<i>`, answers `answers[task]` (else `a<row>-<i>`), doc ids
    `doc_ids[task]` (else 0, 1, ...). Returns the manifest."""
    from workbench.eval.record import write_samples

    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / f"run_{run_id}.json"
    manifest.write_text(json.dumps({
        "run_id": run_id, "model": row, "model_name": f"demo__{row}", "pool": "demo", "method": "m",
        "model_info": {}, "tasks": list(task_values), "limit": limit, "split": "test",
        "scores": {t: {"exact_match": sum(v) / len(v)} for t, v in task_values.items()},
        "filters": {t: "none" for t in task_values}, "git": {"commit": commit, "dirty": dirty}}))
    rows = [{"task": t, "doc_id": (doc_ids or {}).get(t, range(len(v)))[i], "filter": "none",
             "question": f"q{t}-{i}", "target": f"t{i}", "response": (answers or {}).get(t, [f"a{row}-{i}"] * len(v))[i],
             "metrics": {"exact_match": float(x)}}
            for t, v in task_values.items() for i, x in enumerate(v)]
    write_samples(folder / f"samples_{run_id}.jsonl.gz", rows)
    return manifest


def write_comparison(root: Path, name: str, table: dict[str, dict[str, list[float]]], reference: str, *,
                     limit: int = 4, dirty: set[str] = frozenset(), ppl: dict[str, float] | None = None,
                     answers: dict[str, dict[str, list[str]]] | None = None,
                     methods: dict[str, str] | None = None,
                     doc_ids: dict[str, dict[str, list[int]]] | None = None) -> dict:
    """A comparison as `workbench compare` leaves it: per (row, task) a cell (exact match per example, its run inside
    the folder), plan.json with every planned cell's key, leaderboard.json from the library. `ppl`: row -> a shift of
    a perplexity task's per-document log-likelihoods (python_code, lower perplexity is better). `doc_ids`: row ->
    task -> the doc id of each value (else 0, 1, ...)."""
    from workbench.eval.leaderboard import build_leaderboard

    out = root / "compare" / name
    tasks = sorted({t for v in table.values() for t in v}, key=lambda t: (t not in HELD_IN, t))
    tasks += ["python_code"] if ppl else []
    rows = [{"name": r, "method": (methods or {}).get(r, "m"), "expert_task": None} for r in table]
    cells = {}
    for i, (row, per_task) in enumerate(table.items()):
        run = write_run(out / "lm-eval" / f"demo__{row}", f"2026-01-0{1 + i % 9}T00-00-0{i % 10}", row, per_task,
                        limit=limit, dirty=row in dirty, answers=(answers or {}).get(row),
                        doc_ids=(doc_ids or {}).get(row))
        for t, v in per_task.items():
            ids = list((doc_ids or {}).get(row, {}).get(t, range(len(v))))
            cells[(row, t)] = {"metric": "exact_match", "higher_is_better": True, "aggregate": "mean",
                               "score": sum(v) / len(v), "n": len(v), "doc_ids": ids,
                               "values": [float(x) for x in v], "run": run.relative_to(out).as_posix()}
        if ppl and row in ppl:
            lls = [-40.0 + ppl[row], -90.0 + ppl[row], -25.0 + ppl[row], -60.0 + ppl[row]]
            words = [10.0, 20.0, 5.0, 15.0]
            cells[(row, "python_code")] = {"metric": "word_perplexity", "higher_is_better": False,
                                           "aggregate": "perplexity", "score": math.exp(-sum(lls) / sum(words)),
                                           "n": 4, "doc_ids": [0, 1, 2, 3], "values": lls, "weights": words}
    for (row, task), c in cells.items():
        c |= {"key": f"k-{row}-{task}", "row": row, "task": task}
        (out / "cells" / row).mkdir(parents=True, exist_ok=True)
        (out / "cells" / row / f"{task}.json").write_text(json.dumps(c))
    plan = {"name": name, "source": f"{name}.yaml", "pool": "demo", "tasks": tasks, "reference": reference,
            "eval": {"limit": limit, "split": "test"}, "rows": rows, "skipped": {},
            "cells": {r: {t: f"k-{r}-{t}" for (rr, t) in cells if rr == r} for r in table}}
    (out / "plan.json").write_text(json.dumps(plan))
    board = build_leaderboard(rows, cells, tasks, reference) | {
        "name": name, "pool": "demo", "skipped": {}, "eval": plan["eval"], "cells": f"{len(cells)}/{len(cells)}"}
    (out / "leaderboard.json").write_text(json.dumps(board))
    return board


def open_app(results: Path, view: str | None = None, **params) -> AppTest:
    """The app on `results`, opened as a URL with these query parameters would open it."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update({"results": str(results), **({"view": view} if view else {}), **params})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def open_url(url: str) -> AppTest:
    """The app as a link (`?view=...&results=...`) opens it: every parameter from the link, nothing else."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update(link_params(url))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    return " ".join(x.value for kind in ("caption", "markdown", "info", "warning") for x in at.get(kind))


def sidebar_warnings(at: AppTest) -> list[str]:
    return [w.value for e in at.sidebar.expander for w in e.warning]


def link_params(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlparse(url).query, keep_blank_values=True).items()}  # as Streamlit reads it


# ----------------------------------------------------------------------------- leaderboard


def test_rows_over_different_task_sets_rank_over_the_tasks_they_share(tmp_path):
    """`narrow` scored 2 tasks (75%), `wide` all 6 (mean 50%, but 100% on narrow's two): ranked over the 2 tasks
    every row shares, wide comes first; tasks and examples per row are shown; the numbers stay leaderboard.json's."""
    res = tmp_path / "results"
    full, quarter = [1, 1, 1, 1], [1, 0, 0, 0]
    board = write_comparison(res, "mc", {
        "base": {t: quarter for t in HELD_IN},
        "wide": {t: full if t in ("addition", "sorting") else quarter for t in HELD_IN},
        "narrow": {"addition": [1, 1, 1, 0], "sorting": [1, 1, 1, 0]}}, "base")
    by = {r["name"]: r for r in board["rows"]}
    assert by["narrow"]["summary"]["held_in"]["mean"] > by["wide"]["summary"]["held_in"]["mean"]  # the trap
    at = open_app(res, "Leaderboard")
    df = at.dataframe[0].value
    assert list(df.model) == ["wide", "narrow", "base"]
    shown = df.set_index("model")
    assert shown.loc["narrow", "tasks"] == "2/6" and shown.loc["wide", "tasks"] == "6/6"
    assert shown.loc["narrow", "examples"] == 8 and shown.loc["wide", "examples"] == 24
    assert shown.loc["wide", "shared 2 tasks %"] == pytest.approx(100.0)
    assert shown.loc["narrow", "shared 2 tasks %"] == pytest.approx(75.0)
    for name, r in by.items():  # the row's own numbers are leaderboard.json's
        assert shown.loc[name, "held_in %"] == pytest.approx(100 * r["summary"]["held_in"]["mean"])
    assert "the mean over the 2 held-in accuracy-like tasks every row scored (add, sort)" in texts(at)


def test_each_group_shows_its_own_columns_test_and_order(tmp_path):
    """held-out: no held-in columns, no test pooled over all tasks; other (a perplexity): no % columns, no exact-match
    p-values, ranked lowest perplexity first; rows without a task of the group are left out and named."""
    res = tmp_path / "results"
    write_comparison(res, "g", {
        "base": {"addition": [0, 0, 1, 0], "subtraction": [0, 0, 0, 1]},
        "good": {"addition": [1, 1, 1, 0], "subtraction": [1, 1, 0, 1]},
        "held-in-only": {"addition": [1, 1, 1, 1]}}, "base", ppl={"base": 0.0, "good": 8.0})
    at = open_app(res, "Leaderboard", group="held-out")
    cols = set(at.dataframe[0].value.columns)
    assert {"held_out %", "held_out se", "held_out Δ (pp)", "held_out p", "sub* %"} <= cols
    assert not cols & {"held_in %", "held_in se", "held_in Δ (pp)", "diff vs ref (pp)", "p (paired)", "normalized %",
                       "add %", "py ppl word_perplexity"}
    assert list(at.dataframe[0].value.model) == ["good", "base"]
    assert "Not shown (no task of this group): held-in-only" in texts(at)

    at.selectbox(key="lb-group").set_value("other").run()
    df = at.dataframe[0].value
    assert not [c for c in df.columns if c.endswith("%") or c in ("p (paired)", "p Holm", "paired n")]
    assert {"py ppl word_perplexity", "py ppl se", "py ppl p"} <= set(df.columns)
    assert list(df.model) == ["good", "base"]  # lower perplexity first
    ppl = df.set_index("model")["py ppl word_perplexity"]
    assert ppl["good"] < ppl["base"]
    assert "py ppl (word_perplexity, lower is better)" in texts(at)


def test_default_setting_is_the_most_complete_and_a_pair_that_reads_differently_says_why(tmp_path):
    """Two settings of one model: the newest is partial (one task, limit 2), the older complete: the older one is
    shown. And a pair whose loose runs (3 tasks at limit 2) read differently from its comparison (2 tasks at limit 4)
    says why, in Pairwise."""
    from workbench import catalog

    res = tmp_path / "results"
    lm = res / "lm-eval"
    write_run(lm / "demo__m", "2026-01-01T00-00-00", "m", {"addition": [1, 0, 1, 0], "sorting": [1, 1, 0, 0]},
              limit=4, commit="c" * 40)
    write_run(lm / "demo__m", "2026-02-01T00-00-00", "m", {"addition": [1, 1]}, limit=2, commit="d" * 40)
    settings = catalog.model_settings(catalog.scan(res), "demo")["demo__m"]
    assert next(iter(settings)).startswith("ddddddd")  # newest first
    assert catalog.default_setting(settings).startswith("ccccccc · test · limit 4")
    at = open_app(res, "Leaderboard", source="runs: demo")
    assert "limit 4" in at.dataframe[0].value.set_index("model").loc["m", "shows"]

    write_comparison(res, "cmp", {"a": {"addition": [1, 1, 1, 1], "sorting": [1, 1, 1, 1]},
                                  "b": {"addition": [0, 0, 0, 0], "sorting": [0, 0, 0, 0]}}, "b")
    for row, v in (("a", [0, 0]), ("b", [1, 1])):  # newer loose runs of both rows, on 3 tasks at limit 2
        write_run(lm / f"demo__{row}", "2026-03-01T00-00-00", row, {t: v for t in ("addition", "sorting", "word_count")},
                  limit=2, commit="e" * 40)
    at = open_app(res, "Pairwise", source="runs: demo", A="a", B="b")
    info = " ".join(i.value for i in at.info)
    assert "`comparison: cmp` reads this pair differently: +100.0 pp" in info and "-100.0 pp" in info
    assert "a: tasks (3 vs 2), examples (6 vs 8), limit (2 vs 4), commit (eeeeeee vs aaaaaaa)" in info


def test_rows_from_a_dirty_tree_are_flagged(tmp_path):
    res = tmp_path / "results"
    write_comparison(res, "d", {"base": {"addition": [0, 1, 0, 0]}, "hot": {"addition": [1, 1, 0, 1]}}, "base",
                     dirty={"hot"})
    at = open_app(res, "Leaderboard")
    flags = at.dataframe[0].value.set_index("model")["flags"]
    assert flags["hot"] == "dirty tree: aaaaaaa+dirty" and flags["base"] == ""
    at = open_app(res, "Pairwise", A="hot", B="base")
    assert any("`hot` was evaluated from a tree with uncommitted changes" in w.value for w in at.warning)


# ----------------------------------------------------------------------------- damaged comparisons


def test_a_corrupt_leaderboard_json_is_rebuilt_from_its_cells_and_plan(tmp_path):
    from workbench import catalog

    res = tmp_path / "results"
    board = write_comparison(res, "cc", {"base": {"addition": [0, 1, 0, 0], "sorting": [0, 0, 0, 1]},
                                         "x": {"addition": [1, 1, 0, 1], "sorting": [1, 1, 1, 1]}}, "base")
    lb = res / "compare" / "cc" / "leaderboard.json"
    lb.write_text(lb.read_text()[:100])
    cat = catalog.scan(res)
    assert "cc" in cat.comparisons and cat.comparisons["cc"]["cells"] == "4/4"
    at = open_app(res, "Leaderboard")
    assert at.selectbox(key="lb-source").value == "comparison: cc"
    shown = at.dataframe[0].value.set_index("model")
    for r in board["rows"]:
        assert shown.loc[r["name"], "held_in %"] == pytest.approx(100 * r["summary"]["held_in"]["mean"])
    assert any("leaderboard.json unreadable (not valid JSON" in w.value and "rebuilt from plan.json" in w.value
               for w in at.warning)
    assert any(w.startswith("compare/cc/leaderboard.json: not valid JSON") for w in sidebar_warnings(at))


def test_a_truncated_cell_is_listed_and_the_counts_match_what_is_shown(tmp_path):
    res = tmp_path / "results"
    write_comparison(res, "tc", {r: {"addition": [1, 0, 1, 0], "sorting": [0, 1, 1, 0], "word_count": [1, 1, 0, 0]}
                                 for r in ("base", "x", "y")}, "base")
    cell = res / "compare" / "tc" / "cells" / "x" / "sorting.json"
    cell.write_text(cell.read_text()[:50])
    at = open_app(res, "Pairwise", A="x", B="base")
    assert set(at.dataframe[0].value.task) == {"addition", "word_count"}
    caption = texts(at)
    assert "cells 8/9 read, 1 skipped" in caption and "leaderboard.json says 9/9" in caption
    assert "2 of 3 tasks, 8 paired examples" in caption and "not shown: sort (no cell of x)" in caption
    listed = [w.value for e in at.main.expander for w in e.warning]  # in the view, beside the table
    assert listed == [w for w in listed if w.startswith("compare/tc/cells/x/sorting.json: not valid JSON")] != []


def test_pairwise_with_a_equal_to_b_is_a_warning_not_a_crash(tmp_path):
    res = tmp_path / "results"
    write_comparison(res, "ab", {"base": {"addition": [0, 1, 0, 0]}, "x": {"addition": [1, 1, 0, 1]}}, "base")
    at = open_app(res, "Pairwise", A="x", B="x")
    assert at.selectbox(key="pw-a-comparison-ab").value == at.selectbox(key="pw-b-comparison-ab").value == "x"
    assert any("A and B are both `x`" in w.value for w in at.warning)


def test_a_mistyped_results_folder_says_it_does_not_exist(tmp_path):
    (tmp_path / "empty").mkdir()
    at = open_app(tmp_path / "typo", "Leaderboard")
    assert any("does not exist" in w.value and "typo" in w.value for w in at.warning)
    at = open_app(tmp_path / "empty", "Leaderboard")  # an empty folder is not called missing
    assert not any("does not exist" in w.value for w in at.warning) and at.info


# ----------------------------------------------------------------------------- pairwise statistics


def test_pairwise_pools_every_shared_example_with_an_interval_and_holm_per_task(tmp_path):
    from workbench.catalog import comparison_source, scan
    from workbench.eval import stats

    res = tmp_path / "results"
    a = {"addition": [1, 1, 1, 1, 0, 1], "sorting": [1, 1, 1, 0, 1, 1], "word_count": [1, 0, 1, 1, 1, 1]}
    b = {"addition": [0, 0, 1, 0, 0, 1], "sorting": [0, 1, 0, 0, 1, 0], "word_count": [0, 0, 1, 1, 0, 0]}
    write_comparison(res, "pp", {"b": b, "a": a}, "b", ppl={"a": 4.0, "b": 0.0})
    at = open_app(res, "Pairwise", A="a", B="b")
    want = stats.pooled_test([x for v in a.values() for x in v], [x for v in b.values() for x in v])
    line = next(m.value for m in at.markdown if m.value.startswith("**Pooled"))
    assert f"a − b = {100 * want['diff']:+.1f} pp (95% CI {100 * want['ci_low']:+.1f} to " \
           f"{100 * want['ci_high']:+.1f}" in line
    assert f"exact McNemar p = {want['p_value']:.3g}" in line and "18 examples of 3 accuracy-like tasks" in line
    assert "left out (not accuracy-like, cannot be pooled): py ppl" in line
    assert want["ci_low"] < want["diff"] < want["ci_high"]
    pw = at.dataframe[0].value
    assert list(pw["p Holm"]) == pytest.approx(stats.holm(list(pw.p_value)))
    src = comparison_source(scan(res), "pp")
    assert src.pooled("a", "b")["p_value"] == pytest.approx(want["p_value"])


def test_pooled_test_and_interval_are_bounded_and_deterministic():
    from workbench.eval import stats

    a, b = [1, 1, 0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 1, 0, 0, 1]
    got = stats.pooled_test(a, b)
    assert got == stats.pooled_test(a, b) and got["test"] == "mcnemar" and got["diff"] == pytest.approx(3 / 8)
    assert got["ci_low"] <= got["diff"] <= got["ci_high"] and got["ci_high"] <= 1.0
    assert math.isnan(stats.paired_ci([], [])[0])
    with pytest.raises(ValueError, match="level must be a fraction"):
        stats.paired_ci(a, b, level=1.5)
    with pytest.raises(ValueError, match="iters must be an integer"):
        stats.paired_ci(a, b, iters=10**9)


# ----------------------------------------------------------------------------- examples, links and the URL


def _browsable(res: Path) -> None:
    write_comparison(res, "ex", {
        "base": {"addition": [0, 1, 0, 0], "sorting": [0, 0, 1, 0]},
        "x": {"addition": [1, 1, 0, 1], "sorting": [1, 0, 1, 0]},
        "y": {"addition": [1, 0, 0, 0], "sorting": [1, 1, 1, 1]}}, "base",
        answers={"x": {"addition": ["42", "7", "nine", "13"]}})


def test_examples_browser_filters_searches_and_opens_the_playground(tmp_path):
    res = tmp_path / "results"
    _browsable(res)
    at = open_app(res, "Examples", A="x", B="base", task="addition", filter="a-only")
    df = at.dataframe[0].value
    assert list(df.doc_id) == [0, 3]  # x right, base wrong
    assert {"question", "target", "x answer", "x (A) ok", "base (B) ok", "y answer", "y ok"} <= set(df.columns)
    assert list(df["x answer"]) == ["42", "13"] and list(df["question"]) == ["qaddition-0", "qaddition-3"]
    assert "2 of 4 examples of addition" in texts(at)
    at.selectbox(key="ex-filter").set_value("b-only").run()  # base right, x wrong: none
    assert not at.dataframe and any("No example matches" in i.value for i in at.info)
    at.selectbox(key="ex-filter").set_value("all").run()
    at.text_input(key="ex-q").set_value("NINE").run()  # searched in answers too, case-insensitive
    assert list(at.dataframe[0].value.doc_id) == [2]
    full = " ".join(t.value for t in at.text)
    assert "qaddition-2" in full and "nine" in full and "t2" in full
    link = next(m.value for m in at.markdown if "Playground" in m.value)
    params = link_params(link[link.index("(") + 1:-1])
    assert params == {"view": "Playground", "results": str(res), "pool": "demo", "models": "x,base",
                      "prompt": "qaddition-2"}
    assert at.query_params["view"] == "Examples" and at.query_params["q"] == "NINE"


def test_links_lead_from_the_leaderboard_to_pairwise_to_examples(tmp_path):
    res = tmp_path / "results"
    _browsable(res)
    at = open_app(res, "Leaderboard")
    links = at.dataframe[0].value.set_index("model")["pairwise"]
    assert links.isna()["base"]  # the reference has no pair
    at = open_url(links["y"])  # not the first row: the link, not a default, picks it
    assert at.sidebar.radio(key="view").value == "Pairwise"
    assert (at.selectbox(key="pw-a-comparison-ex").value, at.selectbox(key="pw-b-comparison-ex").value) == ("y", "base")
    to_examples = at.dataframe[0].value.set_index("task").loc["sorting", "examples"]
    at = open_url(to_examples)
    assert at.sidebar.radio(key="view").value == "Examples"
    assert at.selectbox(key="ex-task-comparison-ex").value == "sorting"
    assert (at.selectbox(key="ex-a-comparison-ex").value, at.selectbox(key="ex-b-comparison-ex").value) == ("y", "base")
    assert list(at.dataframe[0].value.doc_id) == [0, 1, 3]  # where y and base differ on sorting


def test_the_url_reproduces_the_view(tmp_path):
    res = tmp_path / "results"
    _browsable(res)
    at = open_app(res, "Leaderboard")
    at.selectbox(key="lb-ref-comparison-ex").set_value("y").run()
    at.selectbox(key="lb-group").set_value("held-in").run()
    url = dict(at.query_params)
    assert url == {"view": "Leaderboard", "results": str(res), "source": "comparison: ex", "ref": "y",
                   "group": "held-in"}
    again = open_url("?" + urlencode(url))
    assert again.selectbox(key="lb-ref-comparison-ex").value == "y"
    assert again.selectbox(key="lb-group").value == "held-in"
    assert again.dataframe[0].value.equals(at.dataframe[0].value)
    at.sidebar.radio(key="view").set_value("Pairwise").run()  # a view's keys leave with it
    assert "ref" not in at.query_params and "group" not in at.query_params and (at.query_params["A"], at.query_params["B"]) == ("x", "base")
    at.selectbox(key="pw-task-ex").set_value("sorting").run()
    assert at.query_params["task"] == "sorting"


# ----------------------------------------------------------------------------- issue 26, with the new view


@pytest.fixture()
def tampered(app_world, monkeypatch, tmp_path):
    for k, v in app_world.items():
        if k.startswith("WORKBENCH_"):
            monkeypatch.setenv(k, v)
    res = tmp_path / "results"
    shutil.copytree(Path(app_world["root"]) / "results", res)
    monkeypatch.setenv("WORKBENCH_RESULTS", str(res))
    return res


def test_stale_ghost_deep_and_huge_files_every_view_renders_and_agrees_with_leaderboard_json(tampered):
    """Issue 26's acceptance, held with this issue's views: a stale cell, a ghost row, a 100,000-deep JSON and a 50 MB
    JSON: the app's leaderboard is leaderboard.json's, every view (Examples too) renders, the sidebar lists the
    skipped files."""
    from test_results_trust import _tamper

    from workbench.eval.leaderboard import leaderboard_frame

    res = tampered
    expected = _tamper(res)
    (res / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (res / "bench" / "huge.json").write_text('{"benchmark": "huge", "pad": "' + "x" * 50_000_000 + '"}')
    board = json.loads((res / "compare" / "small" / "leaderboard.json").read_text())
    from test_app import VIEWS

    for view in VIEWS:
        at = open_app(res, view)
        shown = sidebar_warnings(at)
        assert any(w.startswith("deep.json: nested too deeply") for w in shown), view
        assert any(w.startswith("bench/huge.json: too large") for w in shown), view
        for path in expected:
            assert any(w.startswith(f"{path}: cell not counted") for w in shown), (view, path)
        if view == "Leaderboard":
            df = at.dataframe[0].value.set_index("model")
            lib = leaderboard_frame(board).set_index("model")
            for m in lib.index:
                assert df.loc[m, "held_in %"] == pytest.approx(lib.loc[m, "held_in %"], nan_ok=True)
                assert df.loc[m, "sort %"] == pytest.approx(lib.loc[m, "sorting %"], nan_ok=True)
        if view == "Examples":
            assert at.dataframe and "examples of addition" in texts(at)


# ----------------------------------------------------------------------------- the review of issue 28 (second round)


def test_examples_with_a_equal_to_b_is_a_warning_not_a_crash(tmp_path):
    """A = B by URL, and a task only one row scored (A and B can only be that row): no duplicate columns."""
    res = tmp_path / "results"
    write_comparison(res, "ab", {"base": {"addition": [0, 1, 0, 0], "sorting": [1, 1, 0, 0]},
                                 "x": {"addition": [1, 1, 0, 1]}}, "base")
    at = open_app(res, "Examples", A="base", B="base", task="addition")
    df = at.dataframe[0].value
    assert len(set(df.columns)) == len(df.columns) and "base (A = B) ok" in df.columns and "x ok" in df.columns
    assert any("A and B are both `base`" in w.value for w in at.warning)
    assert at.selectbox(key="ex-filter").options == ["all examples", "every row wrong", "every row right"]
    at = open_app(res, "Examples", task="sorting")  # only base scored sorting
    assert not at.exception and "only `base` scored sort" in " ".join(w.value for w in at.warning)
    assert list(at.dataframe[0].value.doc_id) == [0, 1, 2, 3]


def test_leaderboard_with_every_method_deselected_is_an_empty_state(tmp_path):
    res = tmp_path / "results"
    write_comparison(res, "m0", {"base": {"addition": [0, 1, 0, 0]}, "x": {"addition": [1, 1, 0, 1]}}, "base")
    at = open_app(res, "Leaderboard")
    at.multiselect(key="lb-methods-comparison-m0").set_value([]).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.dataframe and any("No method selected" in i.value for i in at.info)
    assert at.query_params["methods"] == ""
    again = open_url("?" + urlencode(dict(at.query_params)))  # the empty selection travels in the URL too
    assert again.multiselect(key="lb-methods-comparison-m0").value == [] and not again.dataframe

    import sys

    sys.path.insert(0, str(Path(APP).parent))
    from views.tables import leaderboard_table

    from workbench.catalog import comparison_source, scan

    board = comparison_source(scan(res), "m0").board()
    df, _ = leaderboard_table({**board, "rows": []})
    assert list(df.columns[:2]) == ["model", "method"] and len(df) == 0


def test_examples_of_a_perplexity_task_filter_by_log_likelihood_higher_is_better(tmp_path):
    """Per-document log-likelihoods are higher-is-better though the perplexity is lower-is-better: `a` (every
    document 4 nats more likely, a lower perplexity) is better than `b` on every document."""
    res = tmp_path / "results"
    write_comparison(res, "pp", {"a": {"addition": [1, 0, 1, 0]}, "b": {"addition": [0, 0, 1, 0]}}, "b",
                     ppl={"a": 4.0, "b": 0.0})
    at = open_app(res, "Examples", task="python_code", A="a", B="b", filter="a-only")
    assert list(at.dataframe[0].value.doc_id) == [0, 1, 2, 3]
    caption = texts(at)
    assert "the document's log-likelihood (higher is better; the task's word_perplexity aggregates them over the " \
           "corpus, lower is better)" in caption
    at.selectbox(key="ex-filter").set_value("b-only").run()
    assert not at.dataframe and any("No example matches" in i.value for i in at.info)


def test_a_perplexity_only_comparison_shows_no_accuracy_columns_and_empty_groups_say_so(tmp_path):
    res = tmp_path / "results"
    write_comparison(res, "po", {"base": {}, "good": {}}, "base", ppl={"base": 0.0, "good": 8.0})
    at = open_app(res, "Leaderboard")
    cols = set(at.dataframe[0].value.columns)
    assert {"py ppl word_perplexity", "py ppl se", "py ppl p"} <= cols
    empty = {"held_in %", "held_out %", "held_in se", "normalized %", "diff vs ref (pp)", "p (paired)", "p Holm",
             "paired n", "held_in Δ (pp)", "held_in p", "held_out p Holm"}
    assert not cols & empty, cols & empty
    for group in ("held-in", "held-out"):
        at.selectbox(key="lb-group").set_value(group).run()
        assert not at.dataframe and any(f"No row shown scored a {group} task" in i.value for i in at.info), group


def test_the_heatmap_with_no_row_selected_is_an_empty_state(tmp_path):
    res = tmp_path / "results"
    _browsable(res)
    at = open_app(res, "Per-task charts", rows="")
    assert at.multiselect(key="ch-rows-comparison-ex").value == []
    assert not at.get("vega_lite_chart") and any("No rows selected" in i.value for i in at.info)


def test_wording_no_shared_task_missing_folder_and_no_disagreement(tmp_path):
    res = tmp_path / "results"
    write_comparison(res, "w", {"base": {"addition": [0, 1, 0, 0]}, "x": {"sorting": [1, 1, 0, 1]},
                                "same": {"addition": [0, 1, 0, 0]}}, "base")
    at = open_app(res, "Leaderboard")
    warned = " ".join(w.value for w in at.warning)
    assert "These rows share no task: ranked by" in warned and "no all task" not in warned
    at = open_app(res, "Pairwise", A="same", B="base", task="addition")
    info = " ".join(i.value for i in at.info)
    assert "No disagreement: A and B score each of the 4 paired examples of add alike (A − B = 0)" in info
    assert "per-sample outputs" not in info
    for view in ("Leaderboard", "Sweeps", "Routing", "Benchmarks", "Run"):  # a typo: said once, never "no results yet"
        at = open_app(tmp_path / "typo", view)
        said = [x.value for kind in ("info", "warning") for x in at.get(kind)]
        assert len(said) == 1 and "does not exist" in said[0], (view, said)


def test_every_views_selection_round_trips_through_the_url(tmp_path):
    """Leaderboard's methods, Per-task charts' rows, reference and scatters, Examples' opened example: set by hand,
    read back from the URL into a fresh session, the same widgets and the same tables."""
    res = tmp_path / "results"
    write_comparison(res, "u", {"base": {"addition": [0, 1, 0, 0], "sorting": [0, 0, 1, 0]},
                                "x": {"addition": [1, 1, 0, 1], "sorting": [1, 0, 1, 0]},
                                "y": {"addition": [1, 0, 0, 0], "sorting": [1, 1, 1, 1]}}, "base",
                     methods={"base": "base", "x": "ties", "y": "dare"})

    def again(at):
        return open_url("?" + urlencode(dict(at.query_params)))

    at = open_app(res, "Leaderboard")
    assert "methods" not in at.query_params  # every method: no list in the URL
    at.multiselect(key="lb-methods-comparison-u").set_value(["base", "dare"]).run()
    assert at.query_params["methods"] == "base,dare"
    two = again(at)
    assert two.multiselect(key="lb-methods-comparison-u").value == ["base", "dare"]
    assert list(two.dataframe[0].value.model) == list(at.dataframe[0].value.model) and set(
        at.dataframe[0].value.model) == {"base", "y"}

    at = open_app(res, "Per-task charts")
    at.multiselect(key="ch-rows-comparison-u").set_value(["y", "x"]).run()
    at.selectbox(key="ch-ref-comparison-u").set_value("y").run()
    at.toggle(key="ch-cost-u").set_value(False).run()
    assert (at.query_params["rows"], at.query_params["ref"], at.query_params["costs"]) == ("y,x", "y", "off")
    two = again(at)
    assert two.multiselect(key="ch-rows-comparison-u").value == ["y", "x"]
    assert two.selectbox(key="ch-ref-comparison-u").value == "y" and two.toggle(key="ch-cost-u").value is False
    assert [c.proto.spec for c in two.get("vega_lite_chart")] == [c.proto.spec for c in at.get("vega_lite_chart")]

    at = open_app(res, "Examples", task="sorting", A="y", B="x", filter="differ")
    key = "ex-doc-comparison-u-sorting"
    at.selectbox(key=key).set_value(3).run()
    assert at.query_params["doc"] == "3" and at.query_params["filter"] == "differ"
    two = again(at)
    assert two.selectbox(key=key).value == 3
    assert [t.value for t in two.text] == [t.value for t in at.text]  # the same example opened in full


# ----------------------------------------------------------------------------- the review of issue 28 (third round)


def test_leaderboard_p_values_are_numbers_that_sort_by_value(tmp_path):
    """Every p column (`p (paired)`, `p Holm`, `<group> p`, `<task> p`, their Holm) is a float column formatted to 3
    significant digits, never text (as text, a click sorted 1.11e-46 after 0.000307); the reference's is NaN (empty)."""
    import pandas as pd

    res = tmp_path / "results"
    write_comparison(res, "pn", {
        "base": {"addition": [0, 0, 0, 0, 0, 0, 1, 0], "sorting": [0, 0, 0, 1, 0, 0, 0, 0]},
        "x": {"addition": [1, 1, 1, 1, 1, 1, 1, 1], "sorting": [1, 1, 1, 1, 1, 1, 1, 0]},
        "y": {"addition": [1, 0, 0, 0, 0, 0, 1, 0], "sorting": [0, 1, 0, 1, 0, 0, 0, 0]}}, "base", limit=8,
        ppl={"base": 0.0, "x": 4.0, "y": 1.0})
    for group in ("all", "held-in", "other"):
        at = open_app(res, "Leaderboard", group=group)
        df = at.dataframe[0].value
        ps = [c for c in df.columns if c in ("p (paired)", "p Holm") or c.endswith((" p", " p Holm"))]
        assert ps, (group, list(df.columns))
        for c in ps:
            assert pd.api.types.is_float_dtype(df[c]), (group, c, df[c].dtype)
            assert math.isnan(df.set_index("model").loc["base", c]), (group, c)  # the reference: empty
        formats = {k: (v.get("type_config") or {}).get("format") for k, v in json.loads(at.dataframe[0].proto.columns).items()}
        assert all(formats.get(c) == "%.3g" for c in ps), (group, formats)
    at = open_app(res, "Leaderboard")
    df = at.dataframe[0].value.set_index("model")
    assert df.loc["x", "p (paired)"] < df.loc["y", "p (paired)"]  # x: 14 vs 0 discordant, y: 2 vs 0
    assert list(df["p (paired)"].sort_values().index[:2]) == ["x", "y"]  # by value, the reference (NaN) last


def test_all_view_ranked_by_held_in_tasks_says_so_and_names_them(tmp_path):
    """"all" shows every task but the board is ranked by the held-in ones: the caption says "held-in" and names the
    tasks, never "the mean over the N accuracy-like tasks of the group" (that read as every task of the view)."""
    res = tmp_path / "results"
    write_comparison(res, "hi", {
        "base": {"addition": [0, 1, 0, 0], "sorting": [0, 0, 1, 0], "subtraction": [1, 1, 1, 1]},
        "x": {"addition": [1, 1, 0, 0], "sorting": [0, 0, 1, 1], "subtraction": [0, 0, 0, 0]}}, "base")
    at = open_app(res, "Leaderboard")
    caption = texts(at)
    assert "Ranked by the mean over the 2 held-in accuracy-like tasks (add, sort)." in caption
    assert "of the group" not in caption
    assert list(at.dataframe[0].value.model) == ["x", "base"]  # held-in 50 vs 25 (over every task: 33 vs 50)
    at.selectbox(key="lb-group").set_value("held-out").run()  # a group's own view keeps its wording
    assert "Ranked by the mean over the 1 accuracy-like tasks of the group." in texts(at)


def test_pooled_pairs_by_doc_id_when_the_rows_example_sets_differ(tmp_path):
    """A scored addition docs 0-5, B docs 7, 6, 5, 4, 3, 2 (another limit, reversed order); both sorting docs 0-2.
    By doc id they share 4 + 3 = 7 examples: on docs 2-5 of addition A is right and B wrong, sorting alike: n = 7,
    A − B = 4/7, McNemar 4 vs 0: p = 0.125 (by position they would pair 6 + 3 = 9 examples, 4 vs 2)."""
    from workbench.catalog import comparison_source, scan

    res = tmp_path / "results"
    write_comparison(res, "ids", {"a": {"addition": [0, 0, 1, 1, 1, 1], "sorting": [1, 0, 1]},
                                  "b": {"addition": [1, 1, 0, 0, 0, 0], "sorting": [1, 0, 1]}}, "b", limit=6,
                     doc_ids={"a": {"addition": [0, 1, 2, 3, 4, 5]}, "b": {"addition": [7, 6, 5, 4, 3, 2]}})
    got = comparison_source(scan(res), "ids").pooled("a", "b")
    assert got["n"] == 7 and got["tasks"] == ["addition", "sorting"]
    assert got["diff"] == pytest.approx(4 / 7) and (got["a_only"], got["b_only"]) == (4, 0)
    assert got["p_value"] == pytest.approx(0.125)
    at = open_app(res, "Pairwise", A="a", B="b")
    line = next(m.value for m in at.markdown if m.value.startswith("**Pooled"))
    assert "Pooled over 7 examples of 2 accuracy-like tasks" in line and f"a − b = {100 * 4 / 7:+.1f} pp" in line
    assert "exact McNemar p = 0.125 (4 examples only A got right, 0 only B)" in line
    pw = at.dataframe[0].value.set_index("task")
    assert pw.loc["addition", "n"] == 4 and pw.loc["addition", "A − B"] == pytest.approx(100.0)
