"""Comparison jobs: recipes validated before any work, leaderboards with standard errors and paired tests,
runs that survive SIGKILL at any point, and the Ray executor giving the local executor's numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import snapshot, suite_data

from workbench.comparison import parse_comparison
from workbench.errors import RecipeError, WorkbenchError
from workbench.eval.leaderboard import build_leaderboard, leaderboard_markdown
from workbench.eval.record import read_samples
from workbench.io import file_lock, staging_dir
from workbench.jobs import collect_cells, describe, make_plan, run_comparison

ROOT = Path(__file__).resolve().parent.parent


def quiet(*a):
    return None


@pytest.fixture()
def cmp_pool(pool, tiny_dir, tmp_path, monkeypatch):
    """The tiny pool with two LoRA experts (tagged with their tasks) and one full expert; results in tmp."""
    pool.add(tiny_dir / "lora_a", "addition", tags={"task": "addition"}, data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "sorting", tags={"task": "sorting"}, data=suite_data("sorting"))
    pool.add(tiny_dir / "full_c", "full_c", tags={"task": "word_count"}, data=suite_data("word_count"))
    monkeypatch.setenv("WORKBENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path / "artifacts"))
    return pool


def write(tmp_path: Path, body: dict, name: str = "cmp.yaml") -> Path:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(body))
    return f


SMALL = {"name": "small", "pool": "demo", "tasks": ["addition", "sorting"], "eval": {"limit": 2, "batch_size": 8},
         "reference": "base",
         "entries": ["base", "addition", {"name": "ta", "method": "task_arithmetic", "experts": ["addition", "sorting"],
                                          "parameters": {"lambda": 0.5}}]}


# ----------------------------------------------------------------------------- bad recipes: one line, no work


@pytest.mark.parametrize("change, message", [
    ({"entries": ["base", {"method": "no_such_method"}]}, r"entries\.1: unknown method 'no_such_method'"),
    ({"entries": ["base", "nobody"]}, r"entries\.1: unknown entry 'nobody': not `base`, `experts`, nor an expert"),
    ({"entries": [{"method": "ties", "experts": ["addition", "ghost"]}]}, r"entries\.0 \(ties\): pool 'demo' has no expert 'ghost'$"),
    ({"tasks": ["addition", "no_such_task"]}, r"tasks: .*no_such_task"),
    ({"entries": [{"method": "ties", "parameters": {"densty": 0.5}}]}, r"parameters\.densty: Extra inputs"),
    ({"entries": [{"method": "ties", "parameters": {"density": 7}}]}, r"parameters\.density: .*less than or equal"),
    ({"entries": [{"method": "arrow", "experts": ["addition", "full_c"]}]}, r"entries\.0 \(arrow\): method 'arrow' takes lora experts, got \['full', 'lora'\]$"),
    ({"entries": ["base", "addition", {"name": "addition", "method": "ties"}]}, r"duplicate row name 'addition'"),
    ({"entries": ["experts", "addition"]}, r"duplicate row name 'addition'"),
    ({"reference": "nope"}, r"reference 'nope' is not a row"),
    ({"eval": {"limit": 0}}, r"eval\.limit: Input should be greater than 0"),
    ({"entries": [{"method": "ties", "recipe": "x.yaml"}]}, r"exactly one of `method` or `recipe`"),
    ({"bogus": 1}, r"bogus: Extra inputs are not permitted"),
    ({"entries": [{"recipe": "nomethod.yaml"}]}, r"entries\.0: recipe nomethod\.yaml names no method$"),
    ({"entries": [{"recipe": "badmethod.yaml"}]}, r"entries\.0: unknown method 'no_such'"),
    ({"entries": [{"recipe": "otherpool.yaml"}]}, r"entries\.0: recipe otherpool\.yaml is over pool 'other', the "
                                                  r"comparison over 'demo'$"),
    ({"entries": [{"recipe": "missing.yaml"}]}, r"no recipe at .*missing\.yaml$"),
])
def test_bad_comparison_fails_before_any_work(cmp_pool, tmp_path, change, message):
    write(tmp_path, {"name": "r", "pool": "demo", "parameters": {}}, "nomethod.yaml")
    write(tmp_path, {"name": "r", "pool": "demo", "method": "no_such"}, "badmethod.yaml")
    write(tmp_path, {"name": "r", "pool": "other", "method": "ties"}, "otherpool.yaml")
    f = write(tmp_path, {**SMALL, **change})
    before = snapshot(tmp_path)
    with pytest.raises(RecipeError, match=message) as e:
        parse_comparison(f)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert snapshot(tmp_path) == before  # nothing built, evaluated or written


def test_merge_recipe_and_comparison_are_told_apart(cmp_pool, tmp_path, run_cli):
    f = write(tmp_path, SMALL)
    code, _, err = run_cli("merge", str(f))
    assert code == 2 and "is a comparison, not a merge recipe: run it with `workbench compare" in err
    r = write(tmp_path, {"name": "t", "method": "ties", "pool": "demo"}, "merge.yaml")
    code, _, err = run_cli("compare", str(r))
    assert code == 2 and "is a merge recipe, not a comparison" in err


def test_unknown_executor_fails_before_any_write(cmp_pool, tmp_path):
    from workbench.errors import WorkbenchError

    c = parse_comparison(write(tmp_path, SMALL))
    with pytest.raises(WorkbenchError, match=r"^unknown executor 'slurm': local or ray$"):
        run_comparison(c, results_dir=tmp_path / "r", executor="slurm", log=quiet)
    assert not (tmp_path / "r").exists()


def test_a_skipped_reference_row_falls_back_and_says_so(cmp_pool, tmp_path):
    import shutil

    shutil.rmtree(cmp_pool.expert("sorting").path)
    said = []
    c = parse_comparison(write(tmp_path, {**SMALL, "reference": "sorting", "entries": ["base", "experts"]}), log=said.append)
    assert c.reference == "base" and said == ["reference row sorting is skipped: paired tests use base instead"]


def test_rows_with_absent_files_are_skipped_with_one_line(cmp_pool, tmp_path):
    import shutil

    shutil.rmtree(cmp_pool.expert("full_c").path)  # a fresh clone: full fine-tunes are not shipped
    c = parse_comparison(write(tmp_path, {**SMALL, "entries": ["base", "experts",
                                                                {"name": "tf", "method": "ties", "experts": ["full_c"]}]}))
    skipped = {r.name: r.skip for r in c.rows if r.skip}
    assert set(skipped) == {"full_c", "tf"}
    assert all("full expert full_c is not on disk; `workbench demo --full` trains it" in s for s in skipped.values())
    assert [r.name for r in c.active_rows] == ["base", "addition", "sorting"]
    lines = describe(make_plan(c))
    assert any(line.strip().startswith("skip  tf:") for line in lines)


def test_seeds_expand_seeded_methods_only(cmp_pool, tmp_path):
    body = {**SMALL, "seeds": [0, 1], "entries": ["base", "addition", {"name": "dare", "method": "dare_linear",
                                                             "parameters": {"density": 0.5}},
                                                  {"name": "ta", "method": "task_arithmetic"}]}
    c = parse_comparison(write(tmp_path, body))
    names = [r.name for r in c.rows]
    assert names == ["base", "addition", "dare@seed0", "dare@seed1", "ta@seed0", "ta@seed1"]  # the TA family takes a seed
    seeds = [r.recipe.params.seed for r in c.rows if r.name.startswith("dare")]
    assert seeds == [0, 1]
    body["entries"][2]["parameters"]["seed"] = 7  # a seed given by the entry is kept: one row
    assert [r.name for r in parse_comparison(write(tmp_path, body)).rows][:3] == ["base", "addition", "dare"]


# ----------------------------------------------------------------------------- uncertainty, by hand


def test_leaderboard_stderr_and_paired_test_by_hand():
    ids = list(range(10))
    ref = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]  # 40 %
    row = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]  # 80 %: right on 4 examples ref got wrong, never the reverse
    other = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]  # 40 %: 1 discordant pair each way
    cells = {(n, "addition"): {"metric": "exact_match", "doc_ids": ids, "values": [float(v) for v in vals]}
             for n, vals in [("ref", ref), ("row", row), ("other", other)]}
    board = build_leaderboard([{"name": n, "method": "m"} for n in ("ref", "row", "other")], cells, ["addition"], "ref")
    by = {r["name"]: r for r in board["rows"]}
    # standard error as lm-eval: sqrt(p (1 - p) / (n - 1))
    assert by["row"]["tasks"]["addition"]["stderr"] == pytest.approx(math.sqrt(0.8 * 0.2 / 9))
    assert by["ref"]["tasks"]["addition"]["stderr"] == pytest.approx(math.sqrt(0.4 * 0.6 / 9))
    # McNemar exact: b = 4, c = 0 -> p = 2 * P[Bin(4, 1/2) <= 0] = 2 / 16
    assert by["row"]["paired"]["p_value"] == pytest.approx(0.125)
    assert (by["row"]["paired"]["row_only"], by["row"]["paired"]["reference_only"]) == (4, 0)
    assert by["row"]["paired"]["diff"] == pytest.approx(0.4)
    # b = 1, c = 1 -> p = min(1, 2 * P[Bin(2, 1/2) <= 1]) = 1
    assert by["other"]["paired"]["p_value"] == pytest.approx(1.0)
    assert by["ref"]["paired"] is None
    assert [r["name"] for r in board["rows"]] == ["row", "ref", "other"]  # ranked by held-in mean
    md = leaderboard_markdown(board)
    # held-in tested apart, p Holm-adjusted over the two rows tested (0.125 and 1.0): 0.25
    assert "| row | m | 80.0 ± 13.3 | – | – | +40.0 | 0.25 (ns) | 80.0 ± 13.3 |" in md


def test_group_stderr_combines_tasks():
    cells = {("a", "addition"): {"metric": "exact_match", "doc_ids": [0, 1, 2, 3], "values": [1.0, 1.0, 0.0, 0.0]},
             ("a", "sorting"): {"metric": "exact_match", "doc_ids": [0, 1, 2, 3], "values": [1.0, 0.0, 0.0, 0.0]}}
    board = build_leaderboard([{"name": "a", "method": "m"}], cells, ["addition", "sorting"], "a")
    s = board["rows"][0]["summary"]["held_in"]
    se1, se2 = math.sqrt(0.5 * 0.5 / 3), math.sqrt(0.25 * 0.75 / 3)
    assert s["mean"] == pytest.approx(0.375)
    assert s["stderr"] == pytest.approx(math.sqrt(se1 ** 2 + se2 ** 2) / 2)


def test_normalized_score_by_hand():
    def cell(*v):
        return {"metric": "exact_match", "doc_ids": list(range(len(v))), "values": [float(x) for x in v]}

    # experts on their own tasks: addition 3/4, sorting 1/2 -> denominator (0.75 + 0.5) / 2 = 0.625
    cells = {("add", "addition"): cell(1, 1, 1, 0), ("add", "sorting"): cell(0, 0, 0, 0),
             ("sort", "addition"): cell(0, 0, 0, 0), ("sort", "sorting"): cell(1, 0, 1, 0),
             ("merge", "addition"): cell(1, 0, 0, 0), ("merge", "sorting"): cell(1, 1, 1, 1),
             ("half", "addition"): cell(1, 1, 0, 0)}
    rows = [{"name": "add", "method": "expert-lora", "expert_task": "addition"},
            {"name": "sort", "method": "expert-lora", "expert_task": "sorting"},
            {"name": "merge", "method": "ties"}, {"name": "half", "method": "ties"}]
    by = {r["name"]: r for r in build_leaderboard(rows, cells, ["addition", "sorting"], "merge")["rows"]}
    assert by["merge"]["summary"]["normalized"]["mean"] == pytest.approx((0.25 + 1.0) / 2 / 0.625)
    assert by["add"]["summary"]["normalized"]["mean"] == pytest.approx((0.75 + 0.0) / 2 / 0.625)
    # a row scored on addition only is normalized by the addition expert alone
    assert by["half"]["summary"]["normalized"]["mean"] == pytest.approx(0.5 / 0.75)
    # a task without its own expert is left out of norm, and the board says so (it was the whole row's norm)
    rows2 = [r for r in rows if r["name"] != "sort"]
    board2 = build_leaderboard(rows2, cells, ["addition", "sorting"], "merge")
    by2 = {r["name"]: r for r in board2["rows"]}
    assert by2["merge"]["summary"]["normalized"] == {"mean": pytest.approx(0.25 / 0.75), "tasks": 1, "over": ["addition"]}
    assert by2["half"]["summary"]["normalized"]["mean"] == pytest.approx(0.5 / 0.75)
    assert "left out: sorting (no row is tagged as its own expert)" in board2["normalized_note"]
    assert "left out: sorting" in leaderboard_markdown(board2)
    assert "normalized_note" not in build_leaderboard(rows, cells, ["addition", "sorting"], "merge")


def test_normalized_score_takes_any_tasks_own_expert_but_only_accuracy_like_ones():
    def cell(metric, *v, **kw):
        return {"metric": metric, "doc_ids": list(range(len(v))), "values": [float(x) for x in v]} | kw

    # `mine` is no suite task (a user's own data), with its own expert; `loss` is a continuous metric with one too
    cells = {("e1", "mine"): cell("acc", 1, 1, 0, 0), ("e1", "loss"): cell("loss", 2.0, 3.0),
             ("e2", "loss"): cell("loss", 1.5, 2.5), ("m", "mine"): cell("acc", 1, 0, 0, 0),
             ("m", "loss"): cell("loss", 1.0, 1.0)}
    rows = [{"name": "e1", "method": "expert-lora", "expert_task": "mine"},
            {"name": "e2", "method": "expert-lora", "expert_task": "loss"}, {"name": "m", "method": "ties"}]
    board = build_leaderboard(rows, cells, ["mine", "loss"], "m")
    by = {r["name"]: r for r in board["rows"]}
    assert by["m"]["summary"]["normalized"] == {"mean": pytest.approx(0.25 / 0.5), "tasks": 1, "over": ["mine"]}
    assert "not normalized: loss (not an accuracy-like, higher-is-better metric)" in board["normalized_note"]


def test_pairs_by_doc_id_over_the_examples_both_scored():
    ref = {"metric": "exact_match", "doc_ids": [0, 1, 2, 3, 4], "values": [1.0, 0.0, 0.0, 1.0, 0.0]}
    row = {"metric": "exact_match", "doc_ids": [4, 3, 2, 9], "values": [1.0, 1.0, 1.0, 1.0]}  # other order, doc 9 extra
    board = build_leaderboard([{"name": "ref", "method": "m"}, {"name": "row", "method": "m"}],
                              {("ref", "addition"): ref, ("row", "addition"): row}, ["addition"], "ref")
    p = next(r for r in board["rows"] if r["name"] == "row")["paired"]
    # docs 4, 3, 2: row right on all, ref right on 3 only -> b = 2, c = 0, p = 2 * 1/4
    assert (p["n"], p["row_only"], p["reference_only"]) == (3, 2, 0) and p["p_value"] == pytest.approx(0.5)
    assert p["diff"] == pytest.approx(2 / 3)


def test_a_single_example_task_makes_the_group_stderr_unknown():
    cells = {("a", "addition"): {"metric": "exact_match", "doc_ids": [0], "values": [1.0]},
             ("a", "sorting"): {"metric": "exact_match", "doc_ids": [0, 1], "values": [1.0, 0.0]}}
    board = build_leaderboard([{"name": "a", "method": "m"}], cells, ["addition", "sorting"], "a")
    assert math.isnan(board["rows"][0]["summary"]["held_in"]["stderr"])  # never silently 0
    assert "75.0 |" in leaderboard_markdown(board)  # shown without a ± it does not have


def _cell(metric, values, doc_ids=None, **kw):
    return {"metric": metric, "doc_ids": list(range(len(values))) if doc_ids is None else doc_ids,
            "values": [float(v) for v in values]} | kw


def _ppl(lls, words):
    """A word-perplexity cell as run_row writes it: per-document log-likelihoods and word counts."""
    return _cell("word_perplexity", lls, higher_is_better=False, aggregate="perplexity", weights=[float(w) for w in words],
                 score=math.exp(-sum(lls) / sum(words)))


MIXED_TASKS = ["addition", "python_code", "my_f1", "my_bleu"]


def _mixed_board():
    """Rows scored on a suite task (exact match), a perplexity corpus, a user's task with a continuous per-example
    metric and one with corpus BLEU (no per-example values)."""
    ref_ll, ref_w = [-40.0, -90.0, -25.0, -60.0, -75.0, -33.0], [10, 20, 5, 15, 18, 8]
    cells = {}
    for name, em, shift, f1, bleu in (("ref", [1, 0, 0, 1, 0, 0], 0.0, [0.2, 0.4, 0.1, 0.3, 0.5, 0.2], 20.0),
                                      ("good", [1, 1, 1, 1, 0, 1], 6.0, [0.6, 0.7, 0.5, 0.9, 0.8, 0.6], 35.0),
                                      ("bad", [0, 0, 0, 1, 0, 0], -9.0, [0.1, 0.1, 0.0, 0.2, 0.3, 0.1], 5.0)):
        cells[(name, "addition")] = _cell("exact_match", em, higher_is_better=True, aggregate="mean")
        cells[(name, "python_code")] = _ppl([x + shift for x in ref_ll], ref_w)
        cells[(name, "my_f1")] = _cell("f1", f1, higher_is_better=True, aggregate="mean")
        cells[(name, "my_bleu")] = _cell("bleu", [], [], higher_is_better=True, aggregate="none", score=bleu, n=6,
                                         note="bleu is aggregated over the corpus by lm-eval (bleu): its per-sample "
                                              "values are not per-example scores")
    rows = [{"name": n, "method": "m"} for n in ("ref", "bad", "good")]
    return build_leaderboard(rows, cells, MIXED_TASKS, "ref"), cells


def test_each_task_is_scored_in_its_own_metric_scale_and_direction():
    from workbench.eval import stats

    board, cells = _mixed_board()
    by = {r["name"]: r for r in board["rows"]}
    kinds = {t: i["kind"] for t, i in board["task_metrics"].items()}
    assert kinds == {"addition": "accuracy", "python_code": "corpus", "my_f1": "continuous", "my_bleu": "none"}
    assert board["task_metrics"]["python_code"]["higher_is_better"] is False
    # the perplexity is the corpus aggregate exp(-Σll/Σw) with a bootstrap se over documents, never a mean of values
    good = cells[("good", "python_code")]
    ppl = by["good"]["tasks"]["python_code"]
    assert ppl["mean"] == pytest.approx(good["score"])
    assert ppl["stderr"] == pytest.approx(stats.corpus_stderr(good["values"], good["weights"], "perplexity")) and ppl["stderr"] > 0
    # its paired test is over documents, and its gain is signed so that + is better: a lower perplexity
    p = ppl["paired"]
    assert p["test"] == "sign_flip_corpus" and p["diff"] < 0 and p["gain"] == pytest.approx(-p["diff"])
    assert p["diff"] == pytest.approx(good["score"] - cells[("ref", "python_code")]["score"]) and p["p_value"] < 0.05  # exact sign-flip over the documents
    # a continuous per-example metric: its own se and the paired bootstrap over examples
    f1 = by["good"]["tasks"]["my_f1"]
    assert f1["stderr"] == pytest.approx(stats.stderr(cells[("good", "my_f1")]["values"]))
    assert f1["paired"]["test"] == "paired_bootstrap" and f1["paired"]["gain"] > 0
    # exact match: McNemar, as before
    assert by["good"]["tasks"]["addition"]["paired"]["test"] == "mcnemar"
    # corpus BLEU: the score, no se, no paired test, and why
    bleu = by["good"]["tasks"]["my_bleu"]
    assert bleu["mean"] == 35.0 and math.isnan(bleu["stderr"]) and bleu["paired"] is None and bleu["n"] == 6
    assert "aggregated over the corpus" in board["task_metrics"]["my_bleu"]["note"]
    # group means and the pooled test never take the perplexity, the f1 or the BLEU in
    assert by["good"]["summary"]["held_in"] == {"mean": pytest.approx(5 / 6), "stderr": pytest.approx(
        stats.stderr([1, 1, 1, 1, 0, 1])), "tasks": 1, "paired": by["good"]["paired"]}
    assert set(by["good"]["summary"]) == {"held_in"} and by["good"]["paired"]["tasks"] == ["addition"]
    assert by["good"]["paired"]["n"] == 6 and by["good"]["paired"]["test"] == "mcnemar"
    assert [r["name"] for r in board["rows"]] == ["good", "ref", "bad"]
    assert board["ranked_by"]["key"] == "held_in"


def test_markdown_and_csv_show_directions_and_units():
    from workbench.eval.leaderboard import leaderboard_frame

    board, _ = _mixed_board()
    md = leaderboard_markdown(board, "mixed")
    head = next(line for line in md.splitlines() if line.startswith("| model"))
    assert "| add ↑ |" in head and "| py ppl ↓ |" in head and "| my_f1 ↑ | my_bleu ↑ |" in head
    assert "held-in Δ (pp)" in head and "held-in p (Holm)" in head
    good = next(line for line in md.splitlines() if line.startswith("| good |")).split(" | ")
    ppl = next(r for r in board["rows"] if r["name"] == "good")["tasks"]["python_code"]
    assert good[-3] == f"{ppl['mean']:.4g} ± {ppl['stderr']:.2g}"  # a perplexity, not ×100, not a %
    assert good[-2].startswith("0.6833 ± ") and good[-1].rstrip(" |") == "35"
    text = md.split("\n\n")[-1]
    assert "py ppl ↓: word_perplexity, lower is better" in text and "never as a %" in text
    assert "my_bleu ↑: bleu" in text and "no se and no paired test" in text and "aggregated over the corpus" in text
    assert "only over accuracy-like, higher-is-better tasks" in text and "+ = better" in text
    df = leaderboard_frame(board).set_index("model")
    assert df.loc["good", "python_code word_perplexity"] == pytest.approx(ppl["mean"])
    assert df.loc["good", "python_code Δ"] == pytest.approx(ppl["paired"]["gain"]) and ppl["paired"]["gain"] > 0
    assert df.loc["good", "addition %"] == pytest.approx(100 * 5 / 6)
    assert df.loc["good", "addition Δ"] == pytest.approx(100 * 3 / 6)  # points
    assert math.isnan(df.loc["good", "my_bleu se"]) and math.isnan(df.loc["good", "my_bleu p"])
    csv = leaderboard_frame(board, arrows=True).columns
    assert {"addition % ↑", "python_code word_perplexity ↓", "python_code Δ (+ = better)", "my_f1 f1 ↑"} <= set(csv)


def test_ranking_follows_what_the_board_has():
    # no held-in task: by the mean over the accuracy-like tasks (a suite held-out task and a user's task), ignoring
    # a lower-is-better 0/1 metric and a perplexity
    cells = {}
    for name, sub, mine, err, lls in (("a", [1, 0, 0, 0], [1, 0], [1, 1], [-50.0, -60.0]),
                                      ("b", [1, 1, 0, 0], [1, 1], [0, 0], [-90.0, -95.0]),
                                      ("c", [1, 1, 1, 0], [0, 0], [0, 0], [-10.0, -12.0])):
        cells[(name, "subtraction")] = _cell("exact_match", sub)
        cells[(name, "mine")] = _cell("acc", mine)
        cells[(name, "my_err")] = _cell("error", err, higher_is_better=False, aggregate="mean")
        cells[(name, "python_code")] = _ppl(lls, [10, 10])
    rows = [{"name": n, "method": "m"} for n in ("a", "b", "c")]
    board = build_leaderboard(rows, cells, ["subtraction", "mine", "my_err", "python_code"], "a")
    by = {r["name"]: r for r in board["rows"]}
    assert board["ranked_by"]["key"] == "accuracy"
    assert [r["name"] for r in board["rows"]] == ["b", "a", "c"]  # (0.5+1)/2, (0.25+0.5)/2, (0.75+0)/2
    assert by["b"]["summary"]["held_out"]["mean"] == 0.5 and by["b"]["summary"]["other"]["mean"] == 1.0
    assert by["a"]["summary"]["other"]["tasks"] == 1  # `my_err` (lower is better) is never averaged in
    assert set(by["b"]["summary"]["held_out"]["paired"]["tasks"]) == {"subtraction"}
    assert by["b"]["paired"]["tasks"] == ["subtraction", "mine"]
    assert "other %" in leaderboard_markdown(board)
    # only perplexities: by the first task, lower first
    ppl_only = build_leaderboard(rows, {k: v for k, v in cells.items() if k[1] == "python_code"}, ["python_code"], "a")
    assert [r["name"] for r in ppl_only["rows"]] == ["c", "a", "b"]
    assert ppl_only["ranked_by"] == {"key": "task:python_code", "higher_is_better": False,
                                     "label": "python_code (word_perplexity, lower is better)"}
    assert all(r["summary"] == {} and r["paired"] is None for r in ppl_only["rows"])
    from workbench.eval.leaderboard import leaderboard_chart

    spec = leaderboard_chart(ppl_only).to_dict()  # no accuracy-like task: the ranking task, in its units
    drawn = {d["model"]: d["score"] for d in next(iter(spec["datasets"].values()))}
    assert drawn == {r["name"]: pytest.approx(r["tasks"]["python_code"]["mean"]) for r in ppl_only["rows"]}
    assert spec["layer"][0]["encoding"]["x"]["title"] == "py ppl: word_perplexity ↓"
    # the 95% whiskers: black, never painted by the bars' colour encoding, offset with their bar
    rule = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "rule")
    assert rule["mark"]["color"] == "black" and "color" not in rule["encoding"] and "yOffset" in rule["encoding"]


def test_older_cells_and_unreadable_ones_never_break_the_board():
    # a word-perplexity cell written before weights and directions were recorded: the score, lower is better,
    # no se and no paired test, and why
    old = {("a", "python_code"): {"metric": "word_perplexity", "score": 120.0, "n": 2, "doc_ids": [0, 1],
                                  "values": [-10.0, -20.0]},
           ("b", "python_code"): {"metric": "word_perplexity", "score": 80.0, "n": 2, "doc_ids": [0, 1],
                                  "values": [-9.0, -19.0]},
           ("b", "addition"): {"metric": "exact_match", "doc_ids": [0], "values": "not a list of numbers"}}
    board = build_leaderboard([{"name": "a", "method": "m"}, {"name": "b", "method": "m"}], old,
                              ["addition", "python_code"], "a")
    by = {r["name"]: r for r in board["rows"]}
    assert [r["name"] for r in board["rows"]] == ["b", "a"]
    assert by["b"]["tasks"]["python_code"]["mean"] == 80.0 and by["b"]["tasks"]["python_code"]["paired"] is None
    assert math.isnan(by["b"]["tasks"]["python_code"]["stderr"])
    assert "no per-document weights" in board["task_metrics"]["python_code"]["note"]
    assert board["unreadable"] == ["b/addition: unreadable cell (ValueError): skipped"]
    assert "addition" not in by["b"]["tasks"]
    md = leaderboard_markdown(board)
    assert "| b | m | – | – | – | – | 80 |" in md and "no per-document weights" in md


def test_cells_record_the_primary_metric_its_direction_and_weights(cmp_pool, tmp_path):
    """run_row end to end on the tiny model: an exact-match task and a perplexity corpus (loglikelihood_rolling)."""
    from workbench.eval import stats

    body = {**SMALL, "name": "ppl", "tasks": ["addition", "python_code"], "entries": ["base", "addition"]}
    results = tmp_path / "results"
    board = run_comparison(parse_comparison(write(tmp_path, body)), results_dir=results, log=quiet)
    out = results / "compare" / "ppl"
    em = json.loads((out / "cells" / "base" / "addition.json").read_text())
    assert (em["metric"], em["higher_is_better"], em["aggregate"]) == ("exact_match", True, "mean")
    assert "weights" not in em and len(em["values"]) == em["n"] == 2
    ppl = json.loads((out / "cells" / "addition" / "python_code.json").read_text())
    assert (ppl["metric"], ppl["higher_is_better"], ppl["aggregate"]) == ("word_perplexity", False, "perplexity")
    assert len(ppl["weights"]) == len(ppl["values"]) == ppl["n"] == 2 and all(w > 0 for w in ppl["weights"])
    # lm-eval's own aggregate, and the cell's log-likelihoods and word counts give it back
    manifest = json.loads((out / ppl["run"]).read_text())
    lm = json.loads((out / manifest["results_file"]).read_text())
    assert ppl["score"] == lm["results"]["wb_python_code"]["word_perplexity,none"]
    assert stats.corpus_aggregate(ppl["values"], ppl["weights"], "perplexity") == pytest.approx(ppl["score"])
    by = {r["name"]: r for r in board["rows"]}
    assert board["task_metrics"]["python_code"] == {"metric": "word_perplexity", "higher_is_better": False,
                                                    "aggregate": "perplexity", "kind": "corpus"}
    row = by["addition"]["tasks"]["python_code"]
    assert row["mean"] == pytest.approx(ppl["score"]) and row["stderr"] > 0
    assert row["paired"]["test"] == "sign_flip_corpus" and row["paired"]["n"] == 2
    assert by["addition"]["paired"]["tasks"] == ["addition"]  # the perplexity is never pooled with exact match
    md = (out / "leaderboard.md").read_text()
    assert "py ppl ↓" in md and f"{row['mean']:.4g} ± " in md
    assert "python_code word_perplexity ↓" in (out / "leaderboard.csv").read_text().splitlines()[0]


# ----------------------------------------------------------------------------- resumable, SIGKILL-safe


def _run_cli_subprocess(recipe: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench.cli", "compare", str(recipe)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _board(results: Path, name: str) -> dict:
    board = json.loads((results / "compare" / name / "leaderboard.json").read_text())
    return {k: board[k] for k in ("rows", "tasks", "reference", "complete", "cells", "skipped")}


def test_sigkill_at_any_point_then_rerun_gives_the_uninterrupted_leaderboard(cmp_pool, tmp_path):
    f = write(tmp_path, SMALL)
    clean = tmp_path / "clean"
    run_comparison(parse_comparison(f), results_dir=clean, log=quiet)
    expected = _board(clean, "small")
    assert expected["complete"] and expected["cells"] == "6/6"

    killed = tmp_path / "killed"
    env = {**os.environ, "WORKBENCH_RESULTS": str(killed), "WORKBENCH_CACHE_ARTIFACTS": str(tmp_path / "art2")}
    cell_dir = killed / "compare" / "small" / "cells"
    # killed during the artifact build, after lm-eval wrote a cell's outputs, inside the 6th atomic write (a run
    # manifest or cell record: temp file written, not renamed), and between the leaderboard's files
    for site in ("build", "eval:2", "write:6", "leaderboard"):
        before = {p: p.stat().st_mtime_ns for p in cell_dir.rglob("*.json")} if cell_dir.exists() else {}
        r = _run_cli_subprocess(f, {**env, "WORKBENCH_FAULT": site})
        assert r.returncode == -9, (site, r.returncode, r.stderr[-2000:])
        name, _, n = site.partition(":")
        assert f"WORKBENCH_FAULT: killed at {name} #{n or 1}" in r.stderr  # it died where the test meant
        after = {p: p.stat().st_mtime_ns for p in cell_dir.rglob("*.json")} if cell_dir.exists() else {}
        assert all(after.get(p) == t for p, t in before.items()), f"{site}: a finished cell was redone"
    r = _run_cli_subprocess(f, env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _board(killed, "small") == expected
    out = killed / "compare" / "small"
    assert sorted(p.relative_to(out / "cells").as_posix() for p in (out / "cells").rglob("*.json")) == \
        sorted(f"{row}/{t}.json" for row in ("base", "addition", "ta") for t in ("addition", "sorting"))
    # one run per (row, task) in the lm-eval record: a cell redone after a kill replaced its earlier run
    for row in ("base", "addition", "ta"):
        runs = [json.loads(p.read_text()) for p in (out / "lm-eval" / f"demo__{row}").glob("run_*.json")]
        assert sorted(t for m in runs for t in m["tasks"]) == ["addition", "sorting"], row
    leftovers = [p for p in out.rglob("*") if (p.name.startswith(".") and not p.name.endswith(".lock"))  # writers'
                 or ".tmp" in p.name or "partial" in p.name]  # locks stay, by design (io.lock_for)
    assert not leftovers, leftovers
    for folder in (out / "lm-eval").iterdir():  # every lm-eval output belongs to a run whose manifest landed
        runs = {p.name[4:-5] for p in folder.glob("run_*.json")}
        data = {p.name.split("_", 1)[1].split(".json")[0] for p in folder.glob("results_*.json")}
        assert data == runs, folder
    md = (out / "leaderboard.md").read_text()
    assert md.count("\n| ta |") == 1 and md.count("\n| base |") == 1
    # the build killed while staged left a .staging folder in the artifact cache: the rerun's build removed it
    assert [p.name for p in (tmp_path / "art2").iterdir() if not p.name.endswith(".lock")] == \
        [p.name for p in (tmp_path / "artifacts").iterdir() if not p.name.endswith(".lock")]


def test_rerun_skips_finished_cells_and_dry_run_shows_them(cmp_pool, tmp_path, run_cli):
    f = write(tmp_path, {**SMALL, "entries": ["base"], "tasks": ["addition"]})
    results = tmp_path / "results"
    board = run_comparison(parse_comparison(f), results_dir=results, log=quiet)
    cell = results / "compare" / "small" / "cells" / "base" / "addition.json"
    t0 = cell.stat().st_mtime_ns
    before = snapshot(results)
    code, out, _ = run_cli("compare", str(f), "--dry-run")
    assert code == 0 and "1 cells (1 done, 0 to run)" in out
    assert snapshot(results) == before  # a dry run writes nothing
    seen = []
    again = run_comparison(parse_comparison(f), results_dir=results, log=quiet,
                           progress=lambda st: seen.append((st.done, st.total)))
    assert cell.stat().st_mtime_ns == t0 and again["rows"] == board["rows"]
    assert seen == [(0, 1), (1, 1)]  # the start, then the finished cell counted once, nothing run
    # another limit is another experiment: the cell is redone
    f2 = write(tmp_path, {**SMALL, "entries": ["base"], "tasks": ["addition"], "eval": {"limit": 3}})
    third = run_comparison(parse_comparison(f2), results_dir=results, log=quiet)
    assert third["rows"][0]["tasks"]["addition"]["n"] == 3


# ----------------------------------------------------------------------------- concurrency and seeds


def test_staging_never_deletes_a_folder_another_process_finished(tmp_path):
    final = tmp_path / "artifact"
    with staging_dir(final) as tmp:
        (tmp / "a.txt").write_text("mine")
        final.mkdir()  # another worker's build landed meanwhile
        (final / "a.txt").write_text("theirs")
    assert (final / "a.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # our staging folder is gone
    with staging_dir(final, replace=True) as tmp:  # --force: the new folder replaces the old one
        (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_file_lock_excludes_another_process(tmp_path):
    lock = tmp_path / "x.lock"
    code = ("import sys, fcntl; f = open(sys.argv[1], 'a+'); "
            "fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)")
    with file_lock(lock):
        held = subprocess.run([sys.executable, "-c", code, str(lock)], capture_output=True, text=True)
    free = subprocess.run([sys.executable, "-c", code, str(lock)], capture_output=True, text=True)
    assert held.returncode != 0 and "BlockingIOError" in held.stderr and free.returncode == 0


def test_builds_use_local_seeds(cmp_pool, tmp_path, monkeypatch):
    from workbench.recipes import build, parse_recipe

    monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path / "a1"))
    body = {"name": "d", "method": "dare_linear", "pool": "demo", "experts": ["addition", "sorting"],
            "parameters": {"density": 0.5, "seed": 3}, "output": {"kind": "lora", "rank": 4}}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build(parse_recipe(body), log=quiet)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    torch.manual_seed(999)  # another global state: the same artifact
    monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path / "a2"))
    b = build(parse_recipe(body), log=quiet)
    fa, fb = snapshot(a), snapshot(b)
    assert {k: v for k, v in fa.items() if k.endswith(".safetensors")} == \
        {k: v for k, v in fb.items() if k.endswith(".safetensors")}


# ----------------------------------------------------------------------------- Ray


def test_ray_executor_gives_the_local_numbers(cmp_pool, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    body = {**SMALL, "entries": [*SMALL["entries"], {"name": "arrow", "method": "arrow", "experts": ["addition", "sorting"],
                                                      "parameters": {"k": 1}}]}
    f = write(tmp_path, body)
    local, ray_dir = tmp_path / "local", tmp_path / "ray"
    a = run_comparison(parse_comparison(f), results_dir=local, log=quiet)
    monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path / "ray-artifacts"))  # Ray builds its own
    seen = []
    b = run_comparison(parse_comparison(f), results_dir=ray_dir, executor="ray", log=quiet,
                       progress=lambda st: seen.append((st.done, st.total)))
    assert seen[-1] == (10, 10) and all(d <= t for d, t in seen)  # 2 builds + 8 cells, each counted once
    assert sorted(p.name for p in (tmp_path / "ray-artifacts").iterdir() if not p.name.endswith(".lock")) == \
        sorted(p.name for p in (tmp_path / "artifacts").iterdir() if not p.name.endswith(".lock"))
    assert a["complete"] and b["complete"]
    assert _board(local, "small") == _board(ray_dir, "small")
    c = parse_comparison(f)
    cells_a, cells_b = collect_cells(make_plan(c, local)), collect_cells(make_plan(c, ray_dir))
    assert cells_a.keys() == cells_b.keys() and len(cells_a) == 8
    for k in cells_a:  # the same examples, the same generated text
        ra = [s["response"] for s in read_samples(local / "compare" / "small" / cells_a[k]["run"])]
        rb = [s["response"] for s in read_samples(ray_dir / "compare" / "small" / cells_b[k]["run"])]
        assert ra == rb and cells_a[k]["values"] == cells_b[k]["values"]


def test_a_single_recipe_runs_as_a_comparison_against_the_base(cmp_pool, tmp_path):
    from workbench.jobs import recipe_comparison

    r = write(tmp_path, {"name": "t", "method": "ties", "pool": "demo", "experts": ["addition", "sorting"],
                         "eval": {"tasks": ["addition"]}}, "one.yaml")
    doc = recipe_comparison(r, limit=3)
    c = parse_comparison(doc, "<app>", folder=tmp_path)  # recipes are read from the comparison's folder or merges/
    assert [row.name for row in c.active_rows] == ["base", "one"] and c.tasks == ["addition"]
    assert c.spec.eval.limit == 3 and c.reference == "base"
    comp = write(tmp_path, SMALL, "cmp.yaml")
    assert recipe_comparison(comp) == comp  # a comparison stays itself
    bad = tmp_path / "bad.yaml"
    bad.write_text("just: words\n")
    with pytest.raises(WorkbenchError, match=r"^bad\.yaml: neither a comparison \(entries\) nor a recipe"):
        recipe_comparison(bad)


def test_dry_run_says_why_each_cell_is_to_run(cmp_pool, tmp_path):
    """A cell invalidated by an eval change (batch size 2 -> 4) said only "0/1 done": --dry-run names the key input
    that differs from the recorded cell (its `key_inputs`; a cell written before they were recorded: what its lm-eval
    run manifest says), and says "never run" for a cell with no record."""
    doc = {"name": "why", "pool": "demo", "tasks": ["addition"], "eval": {"limit": 2, "batch_size": 2},
           "entries": ["base"]}
    results = tmp_path / "results"
    run_comparison(parse_comparison(doc), results_dir=results, log=quiet)
    cell = results / "compare" / "why" / "cells" / "base" / "addition.json"
    rec = json.loads(cell.read_text())
    assert set(rec["key_inputs"]) >= {"model", "task", "data", "config", "lm_eval", "device", "eval"}
    lines = describe(make_plan(parse_comparison(doc), results))
    assert "    base: 1/1 done" in lines
    doc["eval"]["batch_size"] = 4
    lines = describe(make_plan(parse_comparison(doc), results))
    assert "    base: 0/1 done; to run: addition (changed: eval.batch_size)" in lines, lines
    cell.write_text(json.dumps({k: v for k, v in rec.items() if k != "key_inputs"}))  # an older cell
    lines = describe(make_plan(parse_comparison(doc), results))
    assert "    base: 0/1 done; to run: addition (changed: eval.batch_size)" in lines, lines
    doc["eval"]["batch_size"], doc["tasks"] = 2, ["addition", "sorting"]
    lines = describe(make_plan(parse_comparison(doc), results))
    assert "    base: 1/2 done; to run: sorting (never run)" in lines, lines
