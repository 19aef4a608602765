"""The readers of cells and boards beyond the leaderboard itself take each task's primary metric in its direction:
the catalog's loose-run source and pairwise view (workbench/catalog.py), the per-task charts
(workbench/eval/charts.py) and the merge-count curve (workbench/jobs.py::merge_count_curve)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from workbench.eval.leaderboard import build_leaderboard

from conftest import MIXED_LLS as LLS  # noqa: E402  per-document log-likelihoods
from conftest import MIXED_WORDS as WORDS  # noqa: E402


def _ppl(lls: list[float], words: list[float]) -> float:
    return math.exp(-sum(lls) / sum(words))


# ----------------------------------------------------------------------------- loose lm-eval runs


CONFIGS = {"addition": ([{"metric": "exact_match", "aggregation": "mean"}], {"exact_match": True}),
           "python_code": ([{"metric": "word_perplexity", "aggregation": "weighted_perplexity"},
                            {"metric": "bits_per_byte", "aggregation": "bits_per_byte"}],
                           {"word_perplexity": False, "bits_per_byte": False}),
           "my_qa": ([{"metric": "f1", "aggregation": "mean"}, {"metric": "exact_match", "aggregation": "mean"}],
                     {"f1": True, "exact_match": True}),
           "my_cls": ([{"metric": "acc", "aggregation": "mean"}], {"acc": True})}


def _run(folder: Path, run_id: str, model: str, shift: float, em: list[int], f1: list[float], acc: float) -> None:
    """A loose lm-eval run as run_eval writes it: manifest, lm-eval's results JSON and per-sample rows (my_cls has
    none: its score only)."""
    from workbench.eval.record import write_samples

    lls = [x + shift for x in LLS]
    scores = {"addition": {"exact_match": sum(em) / len(em)},
              "python_code": {"word_perplexity": _ppl(lls, WORDS), "bits_per_byte": 0.9},
              "my_qa": {"f1": sum(f1) / len(f1), "exact_match": 0.0}, "my_cls": {"acc": acc}}
    folder.mkdir(parents=True, exist_ok=True)
    res = {"results": {f"wb_{t}" if t == "addition" else t: {f"{m},none": v for m, v in s.items()}
                       for t, s in scores.items()},
           "configs": {f"wb_{t}" if t == "addition" else t: {"metric_list": ml} for t, (ml, _) in CONFIGS.items()},
           "higher_is_better": {f"wb_{t}" if t == "addition" else t: h for t, (_, h) in CONFIGS.items()}}
    (folder / f"results_{run_id}.json").write_text(json.dumps(res))
    (folder / f"run_{run_id}.json").write_text(json.dumps({
        "run_id": run_id, "model": model, "model_name": f"demo__{model}", "pool": "demo", "method": "base",
        "model_info": {}, "tasks": list(scores), "limit": None, "split": "test", "scores": scores,
        "results_file": f"lm-eval/{folder.name}/results_{run_id}.json"}))
    blank = {"question": "q", "target": "t", "response": "r"}
    rows = [{"task": "addition", "doc_id": i, **blank, "metrics": {"exact_match": float(v)}} for i, v in enumerate(em)]
    rows += [{"task": "python_code", "doc_id": i, **blank, "response": None,
              "metrics": {"word_perplexity": [ll, w], "bits_per_byte": [ll, 8 * w]}}
             for i, (ll, w) in enumerate(zip(lls, WORDS))]
    rows += [{"task": "my_qa", "doc_id": i, **blank, "metrics": {"f1": v, "exact_match": float(v == 1.0)}}
             for i, v in enumerate(f1)]
    write_samples(folder / f"samples_{run_id}.jsonl.gz", rows)


@pytest.fixture()
def loose_runs(tmp_path) -> Path:
    root = tmp_path / "results"
    lm = root / "lm-eval"
    _run(lm / "demo__base", "2026-01-01T00-00-00", "base", 0.0, [1, 0, 0, 0], [0.5, 0.25, 0.0, 0.5], 0.4)
    _run(lm / "demo__multitask", "2026-01-01T00-00-01", "multitask", 4.0, [1, 1, 0, 1], [1.0, 0.5, 0.25, 0.75], 0.8)
    return root


def test_runs_source_makes_cells_of_each_tasks_primary_metric(loose_runs):
    from workbench.catalog import runs_source, scan
    from workbench.eval.metrics import view

    cat = scan(loose_runs)
    assert not cat.warnings, cat.warnings
    src = runs_source(cat, "demo")
    # the suite's tasks first, then the user's own tasks (the source used to drop those)
    assert src.tasks == ["addition", "python_code", "my_cls", "my_qa"]
    cell = src.cells[("multitask", "python_code")]
    # the perplexity task: its per-document (log-likelihood, words), lower is better; not a bare mean
    assert (cell["metric"], cell["higher_is_better"], cell["aggregate"]) == ("word_perplexity", False, "perplexity")
    assert cell["values"] == [x + 4.0 for x in LLS] and cell["weights"] == WORDS
    assert view(cell).value == pytest.approx(_ppl(cell["values"], WORDS))
    qa = src.cells[("multitask", "my_qa")]  # the metric_list's first metric (f1), not exact_match
    assert (qa["metric"], qa["aggregate"], qa["values"]) == ("f1", "mean", [1.0, 0.5, 0.25, 0.75])
    cls = src.cells[("multitask", "my_cls")]  # no samples: lm-eval's score alone
    assert (cls["metric"], cls["score"], cls["values"]) == ("acc", 0.8, [])
    assert src.cells[("base", "addition")]["values"] == [1.0, 0.0, 0.0, 0.0]

    board = src.board("base")
    assert src.reference == "multitask" and board["reference"] == "base"
    kinds = {t: i["kind"] for t, i in board["task_metrics"].items()}
    assert kinds == {"addition": "accuracy", "python_code": "corpus", "my_qa": "continuous", "my_cls": "accuracy"}
    row = next(r for r in board["rows"] if r["name"] == "multitask")
    ppl = row["tasks"]["python_code"]
    assert ppl["mean"] == pytest.approx(_ppl([x + 4.0 for x in LLS], WORDS)) and ppl["stderr"] > 0
    assert ppl["paired"]["test"] == "sign_flip_corpus" and ppl["paired"]["gain"] > 0  # lower perplexity
    assert row["tasks"]["my_qa"]["paired"]["test"] == "paired_bootstrap"
    assert row["tasks"]["addition"]["paired"]["test"] == "mcnemar"


def test_pairwise_pairs_each_task_with_its_metrics_test(loose_runs):
    from workbench.catalog import runs_source, scan

    src = runs_source(scan(loose_runs), "demo")
    got = {r["task"]: r for r in src.pairwise("multitask", "base")}
    assert set(got) == {"addition", "python_code", "my_qa"}  # my_cls: no per-example values, no test
    ppl = got["python_code"]
    assert (ppl["kind"], ppl["metric"], ppl["higher_is_better"]) == ("corpus", "word_perplexity", False)
    assert ppl["test"] == "sign_flip_corpus"
    # A and B are the corpus perplexities (never mean log-likelihoods), the gain + when A's is lower
    assert ppl["a"] == pytest.approx(_ppl([x + 4.0 for x in LLS], WORDS)) and ppl["b"] == pytest.approx(_ppl(LLS, WORDS))
    assert ppl["diff"] < 0 and ppl["gain"] == pytest.approx(-ppl["diff"])
    assert (got["addition"]["kind"], got["addition"]["test"]) == ("accuracy", "mcnemar")
    assert got["addition"]["a_only"] == 2 and got["addition"]["b_only"] == 0
    assert (got["my_qa"]["kind"], got["my_qa"]["test"]) == ("continuous", "paired_bootstrap")
    assert got["my_qa"]["diff"] == pytest.approx(0.3125)


def test_pairwise_of_a_comparisons_perplexity_cells_is_over_documents():
    from workbench.catalog import Source

    def cell(shift: float) -> dict:
        return {"metric": "word_perplexity", "higher_is_better": False, "aggregate": "perplexity",
                "doc_ids": [0, 1, 2, 3], "values": [x + shift for x in LLS], "weights": WORDS, "n": 4}

    rows = [{"name": n, "method": "m"} for n in ("a", "b")]
    src = Source("comparison", "c", rows, {("a", "python_code"): cell(4.0), ("b", "python_code"): cell(0.0)},
                 ["python_code"], "b")
    (r,) = src.pairwise("a", "b")
    assert r["kind"] == "corpus" and r["test"] == "sign_flip_corpus"
    assert r["a"] == pytest.approx(_ppl([x + 4.0 for x in LLS], WORDS)) and r["gain"] > 0


# ----------------------------------------------------------------------------- charts


def _board() -> dict:
    """Rows base and merged on an exact-match task, an `acc` task, a perplexity corpus and a corpus-BLEU task."""
    from conftest import mixed_metric_cells

    tasks, rows, cells = mixed_metric_cells((1, 1, 1, 0))
    return build_leaderboard(rows, cells, tasks, "base")


def test_task_charts_draw_every_accuracy_like_metric_and_name_the_others():
    from workbench.eval import charts

    board = _board()
    df = charts.task_frame(board)
    assert set(df.task) == {"addition", "my_cls"}  # acc counts as accuracy-like, not exact_match only
    got = df.set_index(["model", "task"])
    assert got.loc[("merged", "my_cls"), "score"] == pytest.approx(75.0)
    assert got.loc[("merged", "my_cls"), "metric"] == "acc"
    assert df.attrs["left_out"] == {"python_code": "word_perplexity ↓", "my_bleu": "bleu ↑"}
    diff = charts.diff_frame(board, "base").set_index(["model", "task"])
    assert set(diff.index.get_level_values("task")) == {"addition", "my_cls"}
    assert diff.loc[("merged", "my_cls"), "diff"] == pytest.approx(25.0)
    assert diff.loc[("merged", "addition"), "gain"] == pytest.approx(50.0)
    note = charts.left_out_note(board)
    assert "py ppl (word_perplexity ↓)" in note and "my_bleu (bleu ↑)" in note
    for chart in (charts.task_bars(board), charts.diff_heatmap(board, "base")):
        spec = chart.to_dict()
        assert note in spec["title"]["subtitle"]
        shown = {d["task"] for d in next(iter(spec["datasets"].values()))}
        assert shown == {"addition", "my_cls"}


def test_diff_heatmap_reads_a_lower_is_better_accuracy_metric_as_a_gain():
    from workbench.eval import charts

    rows = [{"name": n, "method": "m", "expert_task": None} for n in ("base", "merged")]
    cells = {(n, "errs"): {"metric": "error", "higher_is_better": False, "aggregate": "mean",
                           "doc_ids": [0, 1], "values": v, "n": 2}
             for n, v in (("base", [1.0, 1.0]), ("merged", [0.0, 1.0]))}
    board = build_leaderboard(rows, cells, ["errs"], "base")
    d = charts.diff_frame(board, "base").set_index("model")
    assert d.loc["merged", "diff"] == pytest.approx(-50.0) and d.loc["merged", "gain"] == pytest.approx(50.0)


def test_charts_of_a_board_written_before_task_metrics():
    """An older leaderboard.json (no task_metrics, entries without kind): exact match drawn, perplexity left out."""
    from workbench.eval import charts

    board = {"tasks": ["addition", "python_code"], "reference": "base", "rows": [
        {"name": "base", "method": "base", "tasks": {
            "addition": {"mean": 0.5, "stderr": 0.1, "n": 10, "metric": "exact_match"},
            "python_code": {"mean": 230.0, "stderr": float("nan"), "n": 10, "metric": "word_perplexity"}}}]}
    df = charts.task_frame(board)
    assert list(df.task) == ["addition"] and df.score[0] == pytest.approx(50.0)
    assert df.attrs["left_out"] == {"python_code": "word_perplexity ↓"}


# ----------------------------------------------------------------------------- merge-count curve


def test_merge_count_curve_averages_accuracy_like_tasks_only(tmp_path, monkeypatch):
    from workbench import jobs

    def row(name: str, n: int) -> SimpleNamespace:
        return SimpleNamespace(name=name, kind="artifact", method="ties", tasks=["addition", "python_code"],
                               recipe=SimpleNamespace(experts=["e"] * n))

    cells = {}
    for name, em, shift in (("two", [1, 1, 0, 1], 0.0), ("three", [1, 0, 0, 0], -3.0)):
        cells[(name, "addition")] = {"metric": "exact_match", "higher_is_better": True, "aggregate": "mean",
                                     "doc_ids": [0, 1, 2, 3], "values": [float(v) for v in em], "n": 4}
        cells[(name, "python_code")] = {"metric": "word_perplexity", "higher_is_better": False,
                                        "aggregate": "perplexity", "doc_ids": [0, 1, 2, 3],
                                        "values": [x + shift for x in LLS], "weights": WORDS, "n": 4}
    plan = SimpleNamespace(out=tmp_path, comparison=SimpleNamespace(
        active_rows=[row("two", 2), row("three", 3), SimpleNamespace(name="base", kind="model", tasks=[])],
        spec=SimpleNamespace(name="mc", eval=SimpleNamespace(model_dump=lambda mode: {"limit": 4})),
        pool=SimpleNamespace(name="demo")))
    monkeypatch.setattr(jobs, "collect_cells", lambda p: cells)
    curve = jobs.merge_count_curve(plan)
    points = {p["row"]: p for p in curve["points"]}
    # the mean over exact match only: a perplexity's log-likelihoods are never averaged in
    assert points["two"]["mean"] == pytest.approx(0.75) and points["three"]["mean"] == pytest.approx(0.25)
    assert points["two"]["tasks"] == ["addition"] and points["two"]["per_task"] == {"addition": 0.75}
    assert points["two"]["stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert curve["left_out"] == {"python_code": "word_perplexity"} and "python_code" in curve["note"]
    assert json.loads((tmp_path / "curve.json").read_text())["points"] == curve["points"]


def test_curve_chart_says_accuracy_like_and_shows_the_curves_note():
    from workbench.eval.charts import curve_chart

    curve = {"name": "mc", "pool": "demo", "points": [
        {"row": "two", "method": "ties", "experts": 2, "tasks": ["addition"], "mean": 0.75, "stderr": 0.25}],
        "left_out": {"python_code": "word_perplexity"},
        "note": "mean over the accuracy-like tasks only; left out (not accuracy-like): python_code (word_perplexity)"}
    spec = curve_chart(curve).to_dict()
    text = json.dumps(spec, ensure_ascii=False)
    assert "exact match" not in text and "accuracy-like % (their tasks)" in text
    assert spec["title"]["subtitle"] == [curve["note"]] and spec["title"]["text"] == "mc: pool demo"
    assert curve_chart({k: v for k, v in curve.items() if k not in ("note", "left_out")}).to_dict()["title"] == \
        "mc: pool demo"  # no note: the title alone


# ----------------------------------------------------------------------------- the loose-run table (API and CLI)


def _expert_run(root: Path) -> None:
    """A third loose run: an expert-lora tagged with my_cls (the only accuracy-like task with its own expert)."""
    folder = root / "lm-eval" / "demo__cls"
    _run(folder, "2026-01-01T00-00-02", "cls", 2.0, [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], 0.9)
    path = folder / "run_2026-01-01T00-00-02.json"
    run = json.loads(path.read_text())
    path.write_text(json.dumps(run | {"method": "expert-lora", "model_info": {"tags": {"task": "my_cls"}}}))


def test_results_table_names_each_metric_with_its_direction(loose_runs, tmp_path):
    import workbench as wb

    _expert_run(loose_runs)
    md, html = tmp_path / "t.md", tmp_path / "t.html"
    df = wb.results_table("demo", loose_runs, markdown=md, plot=html)
    assert "exact match" not in (wb.results_table.__doc__ or "")
    legend = " ".join(df.attrs["legend"])
    assert "py ppl: word_perplexity ↓ lower is better" in legend and "my_qa: f1 ↑ higher is better" in legend
    assert "acc, exact_match (accuracy-like)" in legend and "Normalized leaves out addition" in legend
    text = md.read_text()
    header = text.splitlines()[0]
    assert "add ↑" in header and "py ppl word_perplexity ↓" in header and "my_qa f1 ↑" in header
    base = next(line for line in text.splitlines() if line.startswith("| base"))
    assert "0.3125" in base and "73.7" in base  # f1 to 4 significant digits (not 0.3), the perplexity as it is
    assert "py ppl: word_perplexity ↓" in text  # the legend under the table
    page = html.read_text()
    assert "exact match" not in page and "accuracy-like tasks, %" in page


def test_results_runs_cli_shows_each_metric_and_the_normalized_note(loose_runs, run_cli):
    _expert_run(loose_runs)
    code, out, err = run_cli("results", "runs", "--results-dir", str(loose_runs))
    assert code == 0, err
    text = " ".join(out.split())
    assert "exact match" not in text and "% for accuracy-like metrics, other metrics as they are" in text
    for head in ("add ↑", "py ppl ↓", "my_qa ↑", "my_cls ↑"):
        assert head in text, head
    assert "0.3125" in text  # base's f1, not rounded to 0.3 as a percentage would be
    assert "py ppl: word_perplexity ↓ lower is better" in text
    assert "Normalized leaves out addition: no expert is tagged with the task" in text


def test_results_table_cli_prints_each_metric_in_its_direction_and_the_legend(run_cli, tmp_path):
    board = _board() | {"name": "mixed", "pool": "demo"}
    (tmp_path / "compare" / "mixed").mkdir(parents=True)
    (tmp_path / "compare" / "mixed" / "leaderboard.json").write_text(json.dumps(board))
    code, out, err = run_cli("results", "table", "--results-dir", str(tmp_path))
    assert code == 0, err
    text = " ".join(out.split())
    assert "exact match" not in text and "other metrics as they are (↑ higher / ↓ lower is better)" in text
    for head in ("add ↑", "my_cls ↑", "py ppl ↓", "my_bleu ↑", "other %"):
        assert head in text, head
    assert "py ppl ↓: word_perplexity, lower is better" in text  # the legend, below the table
    assert "no norm: no row is tagged" in text  # the board's normalized note
