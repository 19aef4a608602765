"""A task's primary metric and direction from lm-eval's output, sample rows into cell fields, and the cell record's
new fields checked at the edge (workbench/eval/metrics.py, workbench/cells.py)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from workbench.cells import ANY_KEY, cell_problem
from workbench.eval.metrics import (
    LM_EVAL_METRICS,
    MetricSpec,
    cell_fields,
    default_higher_is_better,
    describe,
    primary_metric,
    task_metrics,
    view,
)

ROOT = Path(__file__).resolve().parent.parent
UPCYCLE = ROOT / "results" / "compare" / "upcycle"


def test_the_metric_table_is_lm_evals_registry():
    import lm_eval.api.metrics  # noqa: F401 - registers the metrics
    from lm_eval.api.registry import (
        AGGREGATION_REGISTRY,
        HIGHER_IS_BETTER_REGISTRY,
        METRIC_AGGREGATION_REGISTRY,
        METRIC_REGISTRY,
    )

    name_of = {id(f): n for n, f in AGGREGATION_REGISTRY.items()}
    registry = {m: (HIGHER_IS_BETTER_REGISTRY[m], name_of[id(METRIC_AGGREGATION_REGISTRY[m])]) for m in METRIC_REGISTRY}
    assert LM_EVAL_METRICS == registry


def test_direction_from_the_name_for_metrics_lm_eval_does_not_know():
    assert default_higher_is_better("exact_match") and default_higher_is_better("my_score")
    assert not default_higher_is_better("word_perplexity") and not default_higher_is_better("token_perplexity")
    assert not default_higher_is_better("bits_per_byte") and not default_higher_is_better("ter")


def _results(**tasks) -> dict:
    """An lm-eval results JSON: task -> (metric_list entries, higher_is_better, results)."""
    return {"configs": {t: {"metric_list": ml} for t, (ml, _, _) in tasks.items()},
            "higher_is_better": {t: h for t, (_, h, _) in tasks.items()},
            "results": {t: r for t, (_, _, r) in tasks.items()}}


def test_primary_metric_is_the_first_of_the_metric_list_with_lm_evals_direction():
    res = _results(
        wb_addition=([{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
                     {"exact_match": True}, {"exact_match,strip": 0.5, "exact_match_stderr,strip": 0.1}),
        my_qa=([{"metric": "f1", "aggregation": "mean"}, {"metric": "em", "aggregation": "mean"}],
               {"f1": True, "em": True}, {"f1,none": 0.4, "em,none": 0.3}),
        # the task says lower is better for a metric whose name says nothing
        my_loss=([{"metric": "loss", "aggregation": "mean", "higher_is_better": False}], {}, {"loss,none": 2.0}),
        wb_python_code_val=([{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
                            {"word_perplexity": False, "bits_per_byte": False}, {}))
    got = task_metrics(res)
    assert set(got) == {"addition", "my_qa", "my_loss", "python_code"}  # the suite's wb_ / _val affixes dropped
    assert primary_metric("addition", res) == MetricSpec("exact_match", True, "mean")
    assert primary_metric("my_qa", res) == MetricSpec("f1", True, "mean")  # its YAML says mean: per-example f1
    assert [s.name for s in got["my_qa"]] == ["f1", "em"]
    assert primary_metric("my_loss", res) == MetricSpec("loss", False, "mean")
    assert primary_metric("python_code", res) == MetricSpec("word_perplexity", False, "weighted_perplexity")
    # the first of the list that the samples carry; without results, the samples' first metric, then the scores'
    assert primary_metric("my_qa", res, ["em"]).name == "em"
    assert primary_metric("t", None, ["bleu", "chrf"]) == MetricSpec("bleu", True, "bleu")
    assert primary_metric("t", None, None, {"word_perplexity": 3.0}) == \
        MetricSpec("word_perplexity", False, "weighted_perplexity")
    assert primary_metric("t") is None
    for junk in (None, [], "x", {"configs": [1], "higher_is_better": {"t": 3}, "results": {"t": "N/A"}}):
        assert task_metrics(junk) == {}  # never raises


def test_primary_metric_of_a_real_lm_eval_run():
    cell = json.loads((UPCYCLE / "cells" / "bam" / "python_code.json").read_text())
    run = json.loads((UPCYCLE / cell["run"]).read_text())
    res = json.loads((UPCYCLE / run["results_file"]).read_text())
    assert primary_metric("python_code", res) == MetricSpec("word_perplexity", False, "weighted_perplexity")


def _rows(metric: str, values: list) -> list[dict]:
    return [{"task": "t", "doc_id": i, "metrics": {metric: v}} for i, v in enumerate(values)]


def test_cell_fields_of_each_kind_of_metric():
    em = cell_fields(_rows("exact_match", [1.0, 0.0, 1.0]), MetricSpec("exact_match", True, "mean"), 2 / 3)
    assert em == {"metric": "exact_match", "higher_is_better": True, "aggregate": "mean", "score": 2 / 3, "n": 3,
                  "doc_ids": [0, 1, 2], "values": [1.0, 0.0, 1.0]}
    f1 = cell_fields(_rows("f1", [0.5, 0.25, 1]), MetricSpec("f1", True, "mean"), 0.58)
    assert f1["aggregate"] == "mean" and f1["values"] == [0.5, 0.25, 1.0] and "weights" not in f1
    ppl = cell_fields(_rows("word_perplexity", [[-100.0, 20], [-50.0, 5]]),
                      MetricSpec("word_perplexity", False, "weighted_perplexity"), math.exp(150 / 25))
    assert ppl["aggregate"] == "perplexity" and not ppl["higher_is_better"]
    assert ppl["values"] == [-100.0, -50.0] and ppl["weights"] == [20.0, 5.0]
    bpb = cell_fields(_rows("bits_per_byte", [[-100.0, 200]]), MetricSpec("bits_per_byte", False, "bits_per_byte"))
    assert bpb["aggregate"] == "bits_per_byte" and bpb["weights"] == [200.0]
    # lm-eval's plain `perplexity`: one log-likelihood per example, exp(-mean): weights of 1
    plain = cell_fields(_rows("perplexity", [-2.0, -4.0]), MetricSpec("perplexity", False, "perplexity"), math.exp(3))
    assert plain["aggregate"] == "perplexity" and plain["weights"] == [1.0, 1.0]
    assert view(plain).value == pytest.approx(math.exp(3))
    # corpus BLEU: (reference, prediction) per sample: no per-example numbers, the score only, and why
    bleu = cell_fields(_rows("bleu", [["a cat", "a cat"], ["the dog", "a dog"]]), MetricSpec("bleu", True, "bleu"), 42.0)
    assert bleu["aggregate"] == "none" and bleu["values"] == [] and bleu["doc_ids"] == [] and bleu["n"] == 2
    assert bleu["score"] == 42.0 and "aggregated over the corpus" in bleu["note"]
    # corpus f1 of lm-eval: (gold, pred) integer pairs, which must not pass for (log-likelihood, weight)
    f1c = cell_fields(_rows("f1", [[1, 0], [0, 0]]), MetricSpec("f1", True, "f1"), 0.0)
    assert f1c["aggregate"] == "none" and f1c["values"] == [] and "weights" not in f1c
    # a metric lm-eval did not name an aggregation for: numbers are a mean, anything else has no per-example values
    assert cell_fields(_rows("mine", [2, 3]), MetricSpec("mine", True))["aggregate"] == "mean"
    assert cell_fields(_rows("mine", ["x", "y"]), MetricSpec("mine", True))["aggregate"] == "none"
    # values that are not finite numbers of the expected shape: dropped, the cell says why
    bad = cell_fields(_rows("word_perplexity", [[-1.0, 3], [float("nan"), 2]]),
                      MetricSpec("word_perplexity", False, "weighted_perplexity"), 1.5)
    assert bad["values"] == [] and bad["weights"] == [] and "not finite" in bad["note"] and bad["n"] == 2
    assert cell_fields([], MetricSpec("exact_match", True, "mean"), 0.5)["values"] == []
    assert cell_fields(_rows("exact_match", [1.0]), MetricSpec("exact_match", True, "mean"), "N/A")["score"] is None


def test_cell_fields_reproduce_lm_evals_score_on_a_real_run():
    """The committed upcycle run of bam on python_code: the per-document (log-likelihood, words / bytes) pairs give
    lm-eval's word_perplexity, byte_perplexity and bits_per_byte exactly."""
    cell = json.loads((UPCYCLE / "cells" / "bam" / "python_code.json").read_text())
    run = json.loads((UPCYCLE / cell["run"]).read_text())
    res = json.loads((UPCYCLE / run["results_file"]).read_text())
    samples_file = (UPCYCLE / cell["run"]).with_name(f"samples_{run['run_id']}.jsonl.gz")
    rows = sorted((json.loads(line) for line in gzip.decompress(samples_file.read_bytes()).splitlines()),
                  key=lambda s: s["doc_id"])
    specs = {s.name: s for s in task_metrics(res)["python_code"]}
    for metric, score in run["scores"]["python_code"].items():
        fields = cell_fields(rows, specs[metric], score)
        v = view(fields)
        assert v.value == pytest.approx(score, rel=1e-9), metric
        assert not v.higher_is_better and v.per_example and 0 < v.stderr < score
    words = cell_fields(rows, specs["word_perplexity"], run["scores"]["python_code"]["word_perplexity"])
    assert words["values"] == cell["values"]  # the log-likelihoods the older cell recorded, now with their weights
    assert len(words["weights"]) == cell["n"] and all(w > 0 for w in words["weights"])


def test_older_cells_read_with_the_direction_their_metric_implies():
    old_ppl = {"metric": "word_perplexity", "score": 237.8, "n": 2, "doc_ids": [0, 1], "values": [-1.0, -2.0]}
    v = view(old_ppl)
    assert not v.higher_is_better and v.aggregate == "perplexity" and v.weights is None
    assert v.value == 237.8 and math.isnan(v.stderr) and "no per-document weights" in v.note  # not exp(1.5)
    old_em = {"metric": "exact_match", "doc_ids": [0, 1], "values": [1.0, 0.0]}
    assert view(old_em).higher_is_better and view(old_em).aggregate == "mean" and view(old_em).value == 0.5
    means_only = {"metric": "exact_match", "doc_ids": [], "values": [], "mean": 0.25}
    assert view(means_only).value == 0.25 and math.isnan(view(means_only).stderr)
    assert describe(old_em) == "50.0% exact_match ↑" and describe(old_ppl) == "word_perplexity 237.8 ↓"


# ----------------------------------------------------------------------------- the cell record, checked at the edge


def _cell(**kw) -> dict:
    return {"key": "k", "row": "r", "task": "t", "metric": "word_perplexity", "higher_is_better": False,
            "aggregate": "perplexity", "score": 9.0, "n": 2, "doc_ids": [0, 1], "values": [-10.0, -12.0],
            "weights": [5.0, 6.0]} | kw


@pytest.mark.parametrize("change, why", [
    ({"weights": [5.0]}, "weights are not one non-negative number per value"),
    ({"weights": [5.0, -1.0]}, "weights are not one non-negative number per value"),
    ({"weights": [5.0, "6"]}, "weights are not one non-negative number per value"),
    ({"weights": "5,6"}, "weights are not one non-negative number per value"),
    ({"aggregate": "mean"}, "weights are for perplexity-like aggregates"),
    ({"aggregate": "median"}, "aggregate 'median' is not one of"),
    ({"higher_is_better": "no"}, "higher_is_better is not true or false"),
    ({"score": "N/A"}, "score is not a number"),
    ({"n": -1}, "n is not a count"),
    ({"n": True}, "n is not a count"),
    ({"values": [-10.0, float("nan")]}, "values are not one finite number per doc id"),
    ({"values": [-10.0, float("inf")]}, "values are not one finite number per doc id"),
    ({"weights": [5.0, float("inf")]}, "weights are not one non-negative number per value"),
    ({"note": 3}, "note is not text"),
])
def test_malformed_new_fields_do_not_count(tmp_path, change, why):
    assert cell_problem(_cell(), "r", "t", ANY_KEY, tmp_path) is None
    problem = cell_problem(_cell(**change), "r", "t", ANY_KEY, tmp_path)
    assert problem and why in problem, problem


def test_a_perplexity_cell_needs_its_weights_and_older_cells_still_count(tmp_path):
    rec = _cell()
    del rec["weights"]
    assert "need their weights" in cell_problem(rec, "r", "t", ANY_KEY, tmp_path)
    # a perplexity-like cell without per-document values (no samples kept) needs none
    assert cell_problem(rec | {"values": [], "doc_ids": []}, "r", "t", ANY_KEY, tmp_path) is None
    old = {"key": "k", "row": "r", "task": "t", "metric": "word_perplexity", "score": 9.0, "n": 2, "doc_ids": [0, 1],
           "values": [-10.0, -12.0], "run": "lm-eval/x/run_1.json", "eval_s": 1.0}
    assert cell_problem(old, "r", "t", ANY_KEY, tmp_path) is None  # no aggregate recorded: read as before
    bleu = {"key": "k", "row": "r", "task": "t", "metric": "bleu", "higher_is_better": True, "aggregate": "none",
            "score": 31.0, "n": 5, "doc_ids": [], "values": [], "note": "why"}
    assert cell_problem(bleu, "r", "t", ANY_KEY, tmp_path) is None


def test_every_committed_cell_still_counts():
    cells = sorted((ROOT / "results" / "compare").glob("*/cells/*/*.json"))
    assert cells
    for p in cells:
        assert cell_problem(json.loads(p.read_text()), p.parent.name, p.stem, ANY_KEY, p.parents[2]) is None, p


# ----------------------------------------------------------------------------- loose runs: the results table


def _run(folder: Path, run_id: str, model: str, scores: dict, configs: dict, tags: dict | None = None,
         samples: list | None = None) -> None:
    """A run as run_eval writes it: manifest, lm-eval results JSON (metric lists, directions) and samples."""
    from workbench.eval.record import write_samples

    folder.mkdir(parents=True, exist_ok=True)
    res = {"results": {t: {f"{m},none": v for m, v in s.items()} for t, s in scores.items()},
           "configs": {t: {"metric_list": ml} for t, (ml, _) in configs.items()},
           "higher_is_better": {t: h for t, (_, h) in configs.items()}}
    (folder / f"results_{run_id}.json").write_text(json.dumps(res))
    manifest = {"run_id": run_id, "model": model, "model_name": f"demo__{model}", "pool": "demo",
                "method": "expert-lora" if tags else "base", "model_info": {"tags": tags or {}},
                "tasks": list(scores), "limit": None, "split": "test", "scores": scores,
                "results_file": f"lm-eval/{folder.name}/results_{run_id}.json"}
    (folder / f"run_{run_id}.json").write_text(json.dumps(manifest))
    if samples is not None:
        write_samples(folder / f"samples_{run_id}.jsonl.gz", samples)


def test_results_table_takes_each_tasks_primary_metric(tmp_path):
    from workbench.eval.results import collect_scores, paired_samples, results_chart, results_table

    configs = {"addition": ([{"metric": "exact_match"}], {"exact_match": True}),
               "python_code": ([{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
                               {"word_perplexity": False, "bits_per_byte": False}),
               "my_qa": ([{"metric": "f1", "aggregation": "mean"}, {"metric": "exact_match"}],
                         {"f1": True, "exact_match": True}),
               "my_cls": ([{"metric": "acc"}], {"acc": True})}
    out = tmp_path / "lm-eval"

    def scores(add, ppl, f1, acc):
        return {"addition": {"exact_match": add}, "python_code": {"bits_per_byte": 0.8, "word_perplexity": ppl},
                "my_qa": {"exact_match": 0.1, "f1": f1}, "my_cls": {"acc": acc}}

    ppl_rows = [{"task": "python_code", "doc_id": i, "question": "", "target": "", "response": None,
                 "metrics": {"word_perplexity": [ll, 10], "bits_per_byte": [ll, 50]}} for i, ll in enumerate([-30.0, -40.0])]
    _run(out / "demo__base", "2026-01-01T00-00-00", "base", scores(0.5, 200.0, 0.3, 0.4), configs, samples=ppl_rows)
    _run(out / "demo__cls", "2026-01-01T00-00-01", "cls", scores(0.25, 150.0, 0.6, 0.8), configs, {"task": "my_cls"},
         samples=[r | {"metrics": {"word_perplexity": [r["metrics"]["word_perplexity"][0] + 5, 10]}} for r in ppl_rows])
    long = collect_scores(out, full_only=False)
    got = {(r.model, r.task): (r.metric, r.higher_is_better, r.value) for r in long.itertuples()}
    # the metric_list's first metric, not exact_match whenever a task reports one; its direction from lm-eval
    assert got[("base", "my_qa")] == ("f1", True, 0.3)
    assert got[("base", "python_code")] == ("word_perplexity", False, 200.0)
    assert got[("cls", "my_cls")] == ("acc", True, 0.8)
    table = results_table(out, full_only=False).set_index("model")
    assert table.loc["base", "python_code"] == 200.0 and table.loc["base", "my_qa"] == 0.3  # as they are
    assert table.loc["base", "addition"] == 50.0 and table.loc["cls", "my_cls"] == 80.0  # accuracy-like: %
    assert table.loc["base", "held_in_avg"] == 50.0  # the suite's held-in tasks only, never a perplexity
    # normalized: the accuracy-like tasks with their own expert (my_cls, a task of the user's), the rest left out
    assert table.loc["base", "normalized"] == pytest.approx(100 * 40 / 80)
    assert "leaves out addition" in table.attrs["normalized_note"]
    assert table.attrs["metrics"]["python_code"] == {"metric": "word_perplexity", "higher_is_better": False,
                                                     "percent": False}
    chart = results_chart(table.reset_index()).to_dict()
    shown = {d["column"] for d in next(iter(chart["datasets"].values()))}
    assert "my_cls" in shown and "python_code" not in shown and "my_qa" not in shown  # only % on the 0-100 scale
    pairs = paired_samples(out / "demo__base" / "run_2026-01-01T00-00-00.json",
                           out / "demo__cls" / "run_2026-01-01T00-00-01.json", "python_code")
    assert list(pairs.value_a) == [-30.0, -40.0] and list(pairs.value_b) == [-25.0, -35.0]


# ----------------------------------------------------------------------------- tasks with several lm-eval filters

TWO_FILTERS = [{"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                                                   {"function": "take_first"}]},
               {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                                        "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                                                       {"function": "take_first"}]}]
STRICT, FLEXIBLE = [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]  # per document, of each filter


def _lm_eval_samples(strict=STRICT, flexible=FLEXIBLE) -> list[dict]:
    """What lm-eval logs for a two-filter task (gsm8k-like): one sample per (document, filter), every filter of the
    task in turn, each with its `filter` key and its metrics."""
    out = []
    for flt, values in (("strict-match", strict), ("flexible-extract", flexible)):
        for i, v in enumerate(values):
            out.append({"doc_id": i, "doc": {"question": f"q{i}"}, "target": "42",
                        "arguments": {"gen_args_0": {"arg_0": f"Q: q{i}\nA:", "arg_1": {"until": ["\n"]}}},
                        "resps": [[f"... #### {i}"]], "filtered_resps": [f"{flt}:{i}"], "filter": flt,
                        "metrics": ["exact_match"], "exact_match": v})
    return out


def _two_filter_results(strict=STRICT, flexible=FLEXIBLE, configs: bool = True) -> dict:
    """lm-eval's results JSON of that task: one score per filter (`exact_match,<filter>`), in filter_list order."""
    entry = {"alias": "two"}
    for flt, values in (("strict-match", strict), ("flexible-extract", flexible)):
        entry |= {f"exact_match,{flt}": sum(values) / len(values), f"exact_match_stderr,{flt}": 0.1}
    res = {"results": {"two": entry}, "higher_is_better": {"two": {"exact_match": True}}}
    if configs:
        res["configs"] = {"two": {"metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                                   "higher_is_better": True}], "filter_list": TWO_FILTERS}}
    return res


def test_primary_filter_is_the_first_of_the_filter_list():
    from workbench.eval.harness import filters_of, scores_of
    from workbench.eval.metrics import filter_scores, primary_filter, task_filters, task_scores

    res = _two_filter_results()
    assert task_filters(res) == {"two": ["strict-match", "flexible-extract"]}
    assert primary_filter("two", res) == "strict-match"
    # scored by that filter alone: never a mix, never whichever lm-eval reported last
    assert scores_of(res) == {"two": {"exact_match": 0.25}} and filters_of(res) == {"two": "strict-match"}
    assert task_scores(res, "two") == {"exact_match": 0.25}
    assert task_scores(res, "two", "flexible-extract") == {"exact_match": 0.75}
    # the filter_list's order, not the alphabet's nor the results keys'
    flipped = _two_filter_results()
    flipped["configs"]["two"]["filter_list"] = TWO_FILTERS[::-1]
    assert primary_filter("two", flipped) == "flexible-extract" and scores_of(flipped)["two"] == {"exact_match": 0.75}
    # without configs: the first filter of the results keys
    bare = _two_filter_results(configs=False)
    assert primary_filter("two", bare) == "strict-match" and scores_of(bare)["two"] == {"exact_match": 0.25}
    # a task without a filter_list: lm-eval's "none"; the suite's single filter: its name
    assert primary_filter("t", {"results": {"wb_t": {"exact_match,strip": 0.5}}}) == "strip"
    assert filter_scores({"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "t"}, None) == {"acc": 0.5}
    # samples name their filters: the first of the filter_list they carry, else the first they carry
    assert primary_filter("two", res, ["flexible-extract"]) == "flexible-extract"
    assert primary_filter("two", None, ["flexible-extract", "strict-match"]) == "flexible-extract"
    assert primary_filter("two", None, [None]) is None


def test_a_two_filter_tasks_samples_give_one_value_per_document(tmp_path):
    """lm-eval's samples of a gsm8k-like task (strict-match first, flexible-extract): the record keeps each row's
    filter; the cell, the loose-run source, the paired samples and the results table take the first filter's rows and
    score, one per document (not 2n values of both, whose mean is neither score and whose se is too small)."""
    from workbench.catalog import runs_source, scan
    from workbench.eval.harness import scores_of
    from workbench.eval.leaderboard import build_leaderboard
    from workbench.eval.record import compact_sample, read_samples, write_samples
    from workbench.eval.results import collect_scores, paired_samples

    rows = [compact_sample("two", s) for s in _lm_eval_samples()]
    assert [r["filter"] for r in rows] == ["strict-match"] * 4 + ["flexible-extract"] * 4
    assert rows[0]["response"] == "strict-match:0" and rows[4]["response"] == "flexible-extract:0"
    spec = MetricSpec("exact_match", True, "mean")
    cell = cell_fields(sorted(rows, key=lambda r: r["doc_id"]), spec, 0.25, "strict-match")
    assert cell["filter"] == "strict-match" and cell["n"] == 4
    assert cell["doc_ids"] == [0, 1, 2, 3] and cell["values"] == STRICT and view(cell).value == 0.25
    assert view(cell).stderr == pytest.approx(0.25)  # sqrt(p(1-p)/(n-1)) over 4 documents, not 8
    # no filter named: the first the rows carry (a document's rows keep lm-eval's filter order)
    assert cell_fields(sorted(rows, key=lambda r: r["doc_id"]), spec)["values"] == STRICT
    # sample rows written before the filter was kept: the task had one filter, every row counts
    old = [{k: v for k, v in r.items() if k != "filter"} for r in rows[:4]]
    assert cell_fields(old, spec, 0.25, "strict-match")["values"] == STRICT
    assert "filter" not in cell_fields(old, spec, 0.25)
    assert describe(cell) == "25.0% exact_match (strict-match) ↑"

    lm = tmp_path / "results" / "lm-eval"
    for model, run_id, strict in (("base", "2026-01-01T00-00-00", STRICT), ("tuned", "2026-01-01T00-00-01",
                                                                            [1.0, 1.0, 0.0, 1.0])):
        folder = lm / f"demo__{model}"
        folder.mkdir(parents=True)
        res = _two_filter_results(strict)
        (folder / f"results_{run_id}.json").write_text(json.dumps(res))
        manifest = {"run_id": run_id, "model": model, "model_name": f"demo__{model}", "pool": "demo",
                    "method": "base", "model_info": {}, "tasks": ["two"], "limit": None, "split": "test",
                    "results_file": f"lm-eval/{folder.name}/results_{run_id}.json"}
        if model == "base":  # written before the fix: the score lm-eval reported last (flexible-extract), no filters
            manifest["scores"] = {"two": {"exact_match": 0.75}}
        else:
            manifest |= {"scores": scores_of(res), "filters": {"two": "strict-match"}}
        (folder / f"run_{run_id}.json").write_text(json.dumps(manifest))
        write_samples(folder / f"samples_{run_id}.jsonl.gz",
                      [compact_sample("two", s) for s in _lm_eval_samples(strict)])
    back = read_samples(lm / "demo__base" / "run_2026-01-01T00-00-00.json")
    assert [(r["doc_id"], r["filter"]) for r in back[:2]] == [(0, "strict-match"), (0, "flexible-extract")]

    src = runs_source(scan(tmp_path / "results"), "demo")
    base, tuned = src.cells[("base", "two")], src.cells[("tuned", "two")]
    assert base["filter"] == tuned["filter"] == "strict-match"
    assert base["values"] == STRICT and base["score"] == 0.25  # the first filter's score, not the manifest's last
    assert tuned["values"] == [1.0, 1.0, 0.0, 1.0] and tuned["doc_ids"] == [0, 1, 2, 3]
    (pair,) = src.pairwise("tuned", "base")
    assert pair["n"] == 4 and pair["test"] == "mcnemar" and pair["diff"] == 0.5  # one pair per document
    board = build_leaderboard(src.rows, src.cells, src.tasks, "base")
    tuned_row = next(r for r in board["rows"] if r["name"] == "tuned")
    assert tuned_row["paired"]["n"] == 4 and tuned_row["tasks"]["two"]["n"] == 4
    pairs = paired_samples(lm / "demo__base" / "run_2026-01-01T00-00-00.json",
                           lm / "demo__tuned" / "run_2026-01-01T00-00-01.json", "two")
    assert list(pairs.doc_id) == [0, 1, 2, 3] and list(pairs.value_a) == STRICT
    assert list(pairs.response_a) == [f"strict-match:{i}" for i in range(4)]
    long = collect_scores(lm, full_only=False).set_index("model")
    assert long.loc["base", "value"] == 0.25 and long.loc["tuned", "value"] == 0.75


# ----------------------------------------------------------------------------- a task's kind: by its metric's name


def test_a_tasks_kind_is_decided_by_its_metrics_name_before_its_values():
    """A per-example f1 whose values happen to be all 0 or 1 is continuous: as it is (not %), out of the group means
    and the pooled McNemar test, tested by the paired bootstrap; a metric of a name nobody knows is judged by its
    values; exact_match is accuracy."""
    from workbench.eval.leaderboard import build_leaderboard, pair_cells

    def cell(metric, values):
        return {"metric": metric, "higher_is_better": True, "aggregate": "mean", "doc_ids": list(range(len(values))),
                "values": values, "score": sum(values) / len(values)}

    ref_v, row_v = [0.0, 1.0, 0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    tasks = {"qa": "f1", "hits": "my_hit", "em": "exact_match", "graded": "my_grade"}
    cells = {}
    for t, m in tasks.items():
        a, b = (ref_v, row_v) if m != "my_grade" else ([0.5, 0.25, 0.0, 0.5, 1, 0], [1, 0.5, 0.25, 0.5, 1, 1])
        cells[("ref", t)], cells[("row", t)] = cell(m, a), cell(m, b)
    rows = [{"name": "ref", "method": "base"}, {"name": "row", "method": "x"}]
    board = build_leaderboard(rows, cells, list(tasks), "ref")
    kinds = {t: i["kind"] for t, i in board["task_metrics"].items()}
    assert kinds == {"qa": "continuous", "hits": "accuracy", "em": "accuracy", "graded": "continuous"}
    row = next(r for r in board["rows"] if r["name"] == "row")
    assert row["summary"]["other"]["tasks"] == 2  # exact_match and my_hit: never the f1
    assert row["paired"]["tasks"] == ["hits", "em"] and row["paired"]["n"] == 12
    assert row["tasks"]["qa"]["paired"]["test"] == "paired_bootstrap"
    assert row["tasks"]["em"]["paired"]["test"] == "mcnemar"
    assert pair_cells(cells[("row", "qa")], cells[("ref", "qa")])["kind"] == "continuous"
    assert describe(cells[("row", "qa")]) == "f1 0.8333 ↑" and describe(cells[("row", "em")]).startswith("83.3% ")
    assert describe(cells[("row", "hits")]).startswith("83.3% my_hit")


def test_results_table_shows_a_metric_in_percent_by_the_leaderboards_rule(tmp_path):
    from workbench.eval.results import results_table

    configs = {"my_qa": ([{"metric": "f1", "aggregation": "mean"}], {"f1": True}),
               "my_hits": ([{"metric": "my_hit", "aggregation": "mean"}], {"my_hit": True}),
               "my_graded": ([{"metric": "my_grade", "aggregation": "mean"}], {"my_grade": True})}
    out = tmp_path / "lm-eval"

    def rows(task, metric, values):
        return [{"task": task, "doc_id": i, "question": "", "target": "", "response": "", "metrics": {metric: v}}
                for i, v in enumerate(values)]

    samples = rows("my_qa", "f1", [1.0, 0.0]) + rows("my_hits", "my_hit", [1.0, 0.0]) + \
        rows("my_graded", "my_grade", [0.5, 0.5])
    _run(out / "demo__base", "2026-01-01T00-00-00", "base",
         {"my_qa": {"f1": 0.5}, "my_hits": {"my_hit": 0.5}, "my_graded": {"my_grade": 0.5}}, configs, samples=samples)
    table = results_table(out, full_only=False).set_index("model")
    percent = {t: i["percent"] for t, i in table.attrs["metrics"].items()}
    assert percent == {"my_qa": False, "my_hits": True, "my_graded": False}
    assert table.loc["base", "my_qa"] == 0.5 and table.loc["base", "my_hits"] == 50.0


# ----------------------------------------------------------------------------- Holm, per group


def test_holm_adjusts_as_the_textbook_does():
    """Holm's step-down: the i-th smallest of m times (m - i), running maximum, capped at 1, order kept; NaN out of
    the family."""
    from itertools import permutations

    from workbench.eval.stats import holm

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    got = holm([float("nan"), 0.02, 0.04])
    assert got[0] != got[0] and got[1:] == pytest.approx([0.04, 0.04])
    ps = [0.001, 0.2, 0.011, 0.03]
    for order in permutations(range(4)):  # the adjustment follows each p, whatever its place
        assert holm([ps[i] for i in order]) == pytest.approx([holm(ps)[i] for i in order])


def test_leaderboard_reports_each_group_apart_with_holm_adjusted_p():
    """Held-in and held-out are tested apart (a held-out gain does not hide in a held-in tie); every p column carries
    its Holm adjustment over the rows, and the Markdown's verdict follows the adjusted p: a raw p of 0.03 among three
    rows is (ns)."""
    from workbench.eval.leaderboard import build_leaderboard, leaderboard_frame, leaderboard_markdown
    from workbench.eval.stats import holm

    def cell(values):
        return {"metric": "exact_match", "higher_is_better": True, "aggregate": "mean",
                "doc_ids": list(range(len(values))), "values": values, "score": sum(values) / len(values)}

    n = 40
    ref = [0.0] * n
    cells = {}
    for t in ("addition", "sort_phrase"):  # a held-in task, a held-out task
        cells[("ref", t)] = cell(ref)
    # row "in": better on the held-in task only; "out": on the held-out task only; "tie": a few examples apart
    cells[("in", "addition")] = cell([1.0] * 12 + [0.0] * (n - 12))
    cells[("in", "sort_phrase")] = cell(ref)
    cells[("out", "addition")] = cell(ref)
    cells[("out", "sort_phrase")] = cell([1.0] * 12 + [0.0] * (n - 12))
    cells[("tie", "addition")] = cell([1.0] * 5 + [0.0] * (n - 5))  # McNemar 5 vs 0: p = 0.0625 raw
    cells[("tie", "sort_phrase")] = cell(ref)
    rows = [{"name": x, "method": x} for x in ("ref", "in", "out", "tie")]
    board = build_leaderboard(rows, cells, ["addition", "sort_phrase"], "ref")
    by = {r["name"]: r for r in board["rows"]}
    assert by["in"]["summary"]["held_in"]["paired"]["diff"] == pytest.approx(12 / n)
    assert by["in"]["summary"]["held_out"]["paired"]["diff"] == 0
    assert by["out"]["summary"]["held_out"]["paired"]["diff"] == pytest.approx(12 / n)
    fam = [by[x]["summary"]["held_in"]["paired"] for x in ("in", "out", "tie")]
    assert [f["p_holm"] for f in fam] == pytest.approx(holm([f["p_value"] for f in fam]))
    assert by["tie"]["tasks"]["addition"]["paired"]["p_holm"] > by["tie"]["tasks"]["addition"]["paired"]["p_value"]
    df = leaderboard_frame(board).set_index("model")
    assert df.loc["out", "held_out Δ (pp)"] == pytest.approx(30.0) and df.loc["out", "held_in Δ (pp)"] == 0
    assert df.loc["in", "held_in p Holm"] == pytest.approx(by["in"]["summary"]["held_in"]["paired"]["p_holm"])
    assert df.loc["tie", "addition p Holm"] == pytest.approx(by["tie"]["tasks"]["addition"]["paired"]["p_holm"])
    md = leaderboard_markdown(board)
    head = md.splitlines()[0]
    assert "held-in Δ (pp)" in head and "held-out p (Holm)" in head
    line = next(x for x in md.splitlines() if x.startswith("| out |"))
    assert "+30.0" in line and "+0.0" in line
    # a raw p just under 0.05 over three rows: not a claim once adjusted
    cells[("tie", "addition")] = cell([1.0] * 6 + [0.0] * (n - 6))  # raw McNemar 6 vs 0: p = 0.03125
    board = build_leaderboard(rows, cells, ["addition", "sort_phrase"], "ref")
    t = next(r for r in board["rows"] if r["name"] == "tie")["summary"]["held_in"]["paired"]
    assert t["p_value"] < 0.05 <= t["p_holm"]
    line = next(x for x in leaderboard_markdown(board).splitlines() if x.startswith("| tie |"))
    assert "(ns)" in line.split("|")[7]
