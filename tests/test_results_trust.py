"""Results users can trust (issue 'Results users can trust'), the results-folder side: the app shows the leaderboard
the jobs wrote and nothing else (one reader of comparison cells, checked against plan.json's keys), a huge or
deeply nested JSON file is a warning and not an exception, and errors are not lost (a chart error reaches
leaderboard.json, a failed background run keeps its traceback)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app" / "app.py")
VIEWS = ["Leaderboard", "Per-task charts", "Pairwise", "Examples", "Sweeps", "Routing", "Playground", "Run", "Benchmarks"]

# the comparison conftest's `app_world` ran (its keys are the ones in compare/small/plan.json)
SMALL = {"name": "small", "pool": "demo", "tasks": ["addition", "sorting"], "eval": {"limit": 4, "batch_size": 8},
         "reference": "base",
         "entries": ["base", "addition", "sorting",
                     {"name": "ta", "method": "task_arithmetic", "experts": ["addition", "sorting"],
                      "parameters": {"lambda": 0.5}},
                     {"name": "arrow", "method": "arrow", "experts": ["addition", "sorting"], "parameters": {"k": 1}}]}


@pytest.fixture()
def res(app_world, monkeypatch, tmp_path):
    """A copy of conftest's results folder, with the env pointing at it."""
    from workbench import jobs

    for k, v in app_world.items():
        if k.startswith("WORKBENCH_"):
            monkeypatch.setenv(k, v)
    out = tmp_path / "results"
    shutil.copytree(Path(app_world["root"]) / "results", out)
    monkeypatch.setenv("WORKBENCH_RESULTS", str(out))
    yield out
    for r in jobs.background_runs():
        if r.thread is not None:
            r.thread.join(60)
    jobs._RUNS.clear()


def open_view(view: str, results: Path) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.sidebar.text_input(key="results_dir").set_value(str(results)).run()
    at.sidebar.radio(key="view").set_value(view).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def sidebar_warnings(at: AppTest) -> list[str]:
    return [w.value for e in at.sidebar.expander for w in e.warning]


def _plan(res: Path, **eval_):
    from workbench.comparison import parse_comparison
    from workbench.jobs import make_plan

    doc = json.loads(json.dumps(SMALL))
    doc["eval"].update(eval_)
    return make_plan(parse_comparison(doc, "small.yaml"), res)


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (isinstance(a, (int, float)) and isinstance(b, (int, float))
                and ((math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ----------------------------------------------------------------------------- defect 3: one reader of cells


def _tamper(res: Path) -> dict[str, str]:
    """A stale cell (the key of another limit), a ghost row folder, an unplanned task and a cell whose run path
    leaves the comparison folder; then the leaderboard rewritten by the jobs. Returns path -> expected reason."""
    from workbench.comparison import cell_key
    from workbench.jobs import write_leaderboard

    out = res / "compare" / "small"
    cells = out / "cells"
    real = json.loads((cells / "sorting" / "addition.json").read_text())
    other = _plan(res, limit=2)  # the same comparison at another limit: another key for the same cell
    stale_key = cell_key(other.comparison, other.comparison.row("sorting").identity(), "addition", "cpu")
    assert stale_key != real["key"]
    (cells / "sorting" / "addition.json").write_text(json.dumps(
        real | {"key": stale_key, "n": 2, "doc_ids": [0, 1], "values": [1.0, 1.0], "score": 1.0}))
    (cells / "ghost").mkdir()
    (cells / "ghost" / "addition.json").write_text(json.dumps(real | {"row": "ghost", "values": [1.0] * real["n"]}))
    base_add = json.loads((cells / "base" / "addition.json").read_text())
    (cells / "base" / "word_count.json").write_text(json.dumps(base_add | {"task": "word_count"}))
    base_sort = json.loads((cells / "base" / "sorting.json").read_text())
    outside = res / "elsewhere" / "run_x.json"
    outside.parent.mkdir()
    shutil.copy(out / base_sort["run"], outside)
    (cells / "base" / "sorting.json").write_text(json.dumps(base_sort | {"run": "../../elsewhere/run_x.json"}))
    write_leaderboard(_plan(res))  # the jobs' leaderboard of what is on disk now
    return {"compare/small/cells/sorting/addition.json": "stale",
            "compare/small/cells/ghost/addition.json": "row 'ghost' is not in the plan",
            "compare/small/cells/base/word_count.json": "not planned",
            "compare/small/cells/base/sorting.json": "escapes the comparison folder"}


def test_app_leaderboard_is_leaderboard_json_despite_stale_ghost_and_escaping_cells(res):
    from workbench.catalog import comparison_source, scan
    from workbench.eval.leaderboard import leaderboard_frame
    from workbench.jobs import cell_done, collect_cells

    plan_json = json.loads((res / "compare" / "small" / "plan.json").read_text())
    assert {r: set(t) for r, t in plan_json["cells"].items()} == \
        {r: {"addition", "sorting"} for r in ("base", "addition", "sorting", "ta", "arrow")}
    assert all(isinstance(k, str) for t in plan_json["cells"].values() for k in t.values())  # built rows: known

    expected = _tamper(res)
    board = json.loads((res / "compare" / "small" / "leaderboard.json").read_text())
    plan = _plan(res)
    # the jobs count none of them: the leaderboard lacks the stale and the escaping cell
    assert board["cells"] == "8/10" and set(collect_cells(plan)) == \
        {(r, t) for r in ("base", "addition", "sorting", "ta", "arrow") for t in ("addition", "sorting")} - \
        {("sorting", "addition"), ("base", "sorting")}
    assert cell_done(plan, plan.comparison.row("base"), "sorting") is None

    cat = scan(res)
    src = comparison_source(cat, "small")
    mine = {r["name"]: r for r in src.board(board["reference"])["rows"]}
    assert set(mine) == {r["name"] for r in board["rows"]}
    for row in board["rows"]:  # the same rows, tasks, means, errors, summaries and paired tests
        assert _same(mine[row["name"]], row), (row["name"], mine[row["name"]]["tasks"], row["tasks"])
    assert set(src.cells) == set(collect_cells(plan))
    assert ("base", "sorting") not in src.runs
    warned = dict(cat.warnings)  # and the files that do not count are listed
    for path, why in expected.items():
        assert why in warned.get(path, ""), (path, warned.get(path))

    at = open_view("Leaderboard", res)
    df = at.dataframe[0].value.set_index("model")
    lib = leaderboard_frame(board).set_index("model")
    assert set(df.index) == set(lib.index)
    for col in ("held_in %", "held_in se", "add %", "sort %", "diff vs ref (pp)"):
        src_col = col if col in lib.columns else {"add %": "addition %", "sort %": "sorting %"}[col]
        for m in lib.index:
            assert _same(float(df.loc[m, col]), float(lib.loc[m, src_col])), (m, col)
    assert math.isnan(df.loc["sorting", "add %"]) and math.isnan(df.loc["base", "sort %"])
    shown = sidebar_warnings(at)
    for path in expected:
        assert any(w.startswith(f"{path}: cell not counted") for w in shown), (path, shown)


def test_an_older_plan_json_checks_place_and_plan_and_says_keys_were_not_checked(res):
    from workbench.catalog import comparison_source, scan

    out = res / "compare" / "small"
    plan = json.loads((out / "plan.json").read_text())
    del plan["cells"], plan["device"]  # as the committed results/compare/*/plan.json: no keys recorded
    (out / "plan.json").write_text(json.dumps(plan))
    cells = out / "cells"
    base_sort = json.loads((cells / "base" / "sorting.json").read_text())
    (cells / "addition" / "sorting.json").write_text(json.dumps(base_sort))  # base's cell in addition's place
    (cells / "ghost").mkdir()
    (cells / "ghost" / "addition.json").write_text(json.dumps(base_sort | {"row": "ghost", "task": "addition"}))
    cat = scan(res)
    warned = dict(cat.warnings)
    assert warned["compare/small"] == "cells not key-checked (plan.json from an older version)"
    assert "lies at addition/sorting.json" in warned["compare/small/cells/addition/sorting.json"]
    assert "not in the plan" in warned["compare/small/cells/ghost/addition.json"]
    src = comparison_source(cat, "small")
    assert ("addition", "sorting") not in src.cells and ("ghost", "addition") not in src.cells
    assert len(src.cells) == 9
    at = open_view("Leaderboard", res)
    assert "compare/small: cells not key-checked (plan.json from an older version)" in sidebar_warnings(at)


def test_committed_comparisons_still_display(res):
    """The committed results/compare/*/ give their leaderboards' cells, key-checked against plan.json (rewritten with
    keys by rerunning each comparison, every cell reused); merge-count-old (its pool's experts are not shipped, so it
    cannot be planned again) keeps its older plan.json and says its cells are not key-checked."""
    from workbench.catalog import comparison_source, scan

    root = Path(__file__).resolve().parent.parent / "results"
    cat = scan(root)
    assert cat.comparisons
    for name, board in cat.comparisons.items():
        src = comparison_source(cat, name)
        shown = {r["name"]: r for r in src.board(board["reference"])["rows"]}
        for row in board["rows"]:
            assert {t: c["n"] for t, c in shown[row["name"]]["tasks"].items()} == \
                {t: c["n"] for t, c in row["tasks"].items()}, (name, row["name"])
        unchecked = (cat.rel(board["_dir"]), "cells not key-checked (plan.json from an older version)")
        assert (unchecked in cat.warnings) == (name == "merge-count-old"), name


# ----------------------------------------------------------------------------- defect 4: bounded JSON


def test_huge_and_deeply_nested_json_are_warnings_and_every_view_renders(res):
    from workbench import cells
    from workbench.catalog import scan
    from workbench.jobs import _read

    before = scan(res)
    (res / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (res / "bench" / "huge.json").write_text('{"benchmark": "huge", "pad": "' + "x" * 50_000_000 + '"}')
    cat = scan(res)  # no RecursionError, no 50 MB read
    warned = dict(cat.warnings)
    assert "nested too deeply" in warned["deep.json"]
    assert "too large" in warned["bench/huge.json"]
    for what in ("runs", "sweeps", "benches", "traces", "curves", "checks"):  # every other record still loads
        assert len(getattr(cat, what)) == len(getattr(before, what)), what
    assert set(cat.comparisons) == set(before.comparisons)
    assert {n: set(c.cells) for n, c in cat.cells.items()} == {n: set(c.cells) for n, c in before.cells.items()}
    # the jobs' reader is bounded as well
    assert _read(res / "deep.json") is None and _read(res / "bench" / "huge.json") is None
    with pytest.raises(ValueError, match="nested too deeply"):
        cells.load_json(res / "deep.json")

    for view in VIEWS:
        at = open_view(view, res)
        shown = sidebar_warnings(at)
        assert any(w.startswith("deep.json: nested too deeply") for w in shown), view
        assert any(w.startswith("bench/huge.json: too large") for w in shown), view
    assert at.get("vega_lite_chart")  # Benchmarks: the routing benchmark still drawn


def test_a_deeply_nested_cell_is_not_done_and_the_leaderboard_skips_it(res):
    from workbench.catalog import scan
    from workbench.jobs import cell_done, collect_cells

    cell = res / "compare" / "small" / "cells" / "ta" / "sorting.json"
    cell.write_text("[" * 100_000 + "]" * 100_000)
    plan = _plan(res)
    assert cell_done(plan, plan.comparison.row("ta"), "sorting") is None  # not a RecursionError
    assert ("ta", "sorting") not in collect_cells(plan)
    cat = scan(res)
    assert "nested too deeply" in dict(cat.warnings)["compare/small/cells/ta/sorting.json"]
    assert ("ta", "sorting") not in cat.cells["small"].cells


# ----------------------------------------------------------------------------- defect 9: errors kept


def test_a_chart_error_is_saved_in_leaderboard_json(res, monkeypatch):
    from workbench.eval import leaderboard
    from workbench.jobs import write_leaderboard

    def no_renderer(*a, **k):
        raise RuntimeError("no renderer\nsecond line")

    monkeypatch.setattr(leaderboard, "leaderboard_chart", no_renderer)
    board = write_leaderboard(_plan(res))
    assert board["plot_error"] == "RuntimeError: no renderer"
    saved = json.loads((res / "compare" / "small" / "leaderboard.json").read_text())
    assert saved["plot_error"] == "RuntimeError: no renderer"
    assert _same(saved, json.loads(json.dumps(board)))


def test_a_failed_background_run_keeps_its_traceback(res, monkeypatch):
    from workbench import jobs

    def deep_inside():
        raise RuntimeError("disk full\nmore detail")

    def boom(*a, **k):
        deep_inside()

    monkeypatch.setattr(jobs, "run_comparison", boom)
    run = jobs.start_background(jobs.comparison_document("demo", "ties", {}, experts=["addition", "sorting"], limit=2,
                                                         name="will-fail"))
    run.thread.join(30)
    assert run.status == "failed" and run.error == "RuntimeError: disk full"  # the one line stays the summary
    assert run.traceback.startswith("Traceback") and "deep_inside" in run.traceback
    assert "more detail" in run.traceback and run.as_dict()["traceback"] == run.traceback
    at = open_view("Run", res)
    assert any(e.value == "will-fail: RuntimeError: disk full" for e in at.error)
    exp = next(e for e in at.expander if e.label == "will-fail traceback")
    assert any("deep_inside" in c.value and "more detail" in c.value for c in exp.code)


# ----------------------------------------------------------------------------- issue 26's review: malformed records


def test_a_malformed_leaderboard_json_is_rebuilt_from_plan_and_cells_in_every_view(res):
    """leaderboard.json with a row that is not an object and `tasks` a string: a sidebar warning, the comparison
    rebuilt from plan.json and its cells (the same cells as before), and every view renders (the Pairwise view
    raised on it)."""
    from workbench.catalog import comparison_source, scan

    out = res / "compare" / "small"
    before = comparison_source(scan(res), "small")
    board = json.loads((out / "leaderboard.json").read_text())
    (out / "leaderboard.json").write_text(json.dumps(board | {"rows": [{"name": "base"}, "junk"], "tasks": "addition"}))
    cat = scan(res)
    warned = dict(cat.warnings)
    assert warned["compare/small/leaderboard.json"].startswith("malformed leaderboard: rows[0] ('base') has no method")
    assert "rebuilt from plan.json" in warned["compare/small"]
    src = comparison_source(cat, "small")  # no KeyError: 'method'
    assert [r["name"] for r in src.rows] == [r["name"] for r in before.rows] and src.tasks == before.tasks
    assert set(src.cells) == set(before.cells)
    (out / "leaderboard.json").write_text(json.dumps(board | {"tasks": "addition"}))  # rows fine, tasks a string
    assert "tasks is not a list" in dict(scan(res).warnings)["compare/small/leaderboard.json"]
    for view in VIEWS:
        at = open_view(view, res)
        shown = sidebar_warnings(at)
        assert any(w.startswith("compare/small/leaderboard.json: malformed leaderboard") for w in shown), view
    at = open_view("Pairwise", res)
    assert not at.exception


def test_a_fifo_named_json_is_skipped_with_a_warning_not_read(res):
    """A FIFO (or any file that is not a regular file) named *.json under the results folder: the scan does not
    block on it (opening a FIFO to read waits for a writer), it lists it as a warning and reads everything else."""
    import os
    import threading

    from workbench.catalog import scan

    before = scan(res)
    os.mkfifo(res / "compare" / "small" / "cells" / "base" / "pipe.json")
    os.mkfifo(res / "stuck.json")
    got = {}
    worker = threading.Thread(target=lambda: got.update(cat=scan(res)), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # unblock the reader, so that the test session ends
        for fifo in (res / "stuck.json", res / "compare" / "small" / "cells" / "base" / "pipe.json"):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader on this one (yet)
                pass
        pytest.fail("catalog.scan blocked on a FIFO named *.json")
    warned = dict(got["cat"].warnings)
    assert warned["stuck.json"] == "not a regular file (a FIFO): not read"
    assert "not a regular file" in warned["compare/small/cells/base/pipe.json"]
    assert {n: set(c.cells) for n, c in got["cat"].cells.items()} == {n: set(c.cells) for n, c in before.cells.items()}
    assert len(got["cat"].runs) == len(before.runs)


def test_catalog_rereads_a_file_rewritten_with_its_old_mtime_and_size(tmp_path):
    """The catalog's parse cache sees a rewrite that keeps the size and puts the old mtime back (its ctime moves)."""
    import os
    import time

    from workbench.catalog import _parse

    f = tmp_path / "x.json"
    f.write_text('{"score": 0.1}')
    st = f.stat()
    assert _parse(f) == {"score": 0.1}
    time.sleep(0.02)
    f.write_text('{"score": 0.9}')  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old mtime back
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert _parse(f) == {"score": 0.9}
