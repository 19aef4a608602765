"""Tasks beyond the suite: a folder of the user's lm-eval task YAMLs (include_path) and lm-eval's own registry,
resolved, evaluated on the tiny model, recorded, and keyed so that an edit of a user's data or YAML shows."""

import copy
import json
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from conftest import one_line, quiet

from workbench.errors import RecipeError, TaskError, WorkbenchError
from workbench.io import sha256_json

GEN = [{"question": f"Add: {a}+{b}\nAnswer:", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
CHOICE = [{"question": f"Is {a} even?", "choices": [" yes", " no"], "label": a % 2} for a in (1, 2, 3)]
TEXT = [{"text": t} for t in ("the cat sat on the mat", "a dog ran far away", "two birds sang at dawn")]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user_tasks(folder: Path) -> Path:
    """Three lm-eval task YAMLs over JSONL files (generate_until + exact_match, multiple_choice + acc,
    loglikelihood_rolling + word_perplexity) and a group of two of them."""
    folder.mkdir(parents=True, exist_ok=True)
    gen, choice, text = _jsonl(folder / "gen.jsonl", GEN), _jsonl(folder / "choice.jsonl", CHOICE), \
        _jsonl(folder / "text.jsonl", TEXT)
    common = {"dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0}}
    docs = {
        "my_gen": {"task": "my_gen", **common, "dataset_kwargs": {"data_files": {"test": str(gen)}},
                   "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                   "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 4},
                   "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
        "my_choice": {"task": "my_choice", **common,
                      "dataset_kwargs": {"data_files": {"test": str(choice), "validation": str(choice)}},
                      "validation_split": "validation", "output_type": "multiple_choice",
                      "doc_to_text": "{{question}}", "doc_to_choice": "choices", "doc_to_target": "label",
                      "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
        "my_text": {"task": "my_text", **common, "dataset_kwargs": {"data_files": {"test": str(text)}},
                    "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                    "metric_list": [{"metric": "word_perplexity"}]},
        "my_group": {"group": "my_group", "task": ["my_gen", "my_choice"]},
    }
    for name, doc in docs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


# ----------------------------------------------------------------------------- resolved, evaluated, recorded


def test_user_tasks_resolve_evaluate_and_compact(pool, tmp_path):
    from lm_eval.loggers import EvaluationTracker

    from workbench.eval.harness import evaluate, load_model_spec, run_eval
    from workbench.eval.record import compact_sample, read_samples, suite_task
    from workbench.tasks.lmeval import resolve

    tasks = user_tasks(tmp_path / "my tasks")
    refs = resolve(["my_gen", "my_choice", "my_text", "addition"], include_path=[tasks])
    assert [(r.name, r.source, r.output_type) for r in refs] == [
        ("my_gen", "include", "generate_until"), ("my_choice", "include", "multiple_choice"),
        ("my_text", "include", "loglikelihood_rolling"), ("addition", "suite", "generate_until")]
    group = resolve(["my_group"], include_path=str(tasks))
    assert [(r.name, r.group) for r in group] == [("my_gen", "my_group"), ("my_choice", "my_group")]
    assert suite_task("my_gen") == "my_gen" and suite_task("wb_addition_val") == "addition"

    out = tmp_path / "results" / "lm-eval"
    m = run_eval("base", ["my_gen", "my_choice", "my_text"], pool=pool, include_path=[tasks], limit=3,
                 batch_size=2, results_dir=out)
    assert m["tasks"] == ["my_gen", "my_choice", "my_text"] and set(m["data_sha256"]) == set(m["tasks"])
    assert set(m["scores"]["my_gen"]) == {"exact_match"} and set(m["scores"]["my_choice"]) == {"acc"}
    assert "word_perplexity" in m["scores"]["my_text"]
    assert m["task_sources"]["my_choice"]["source"] == "include"
    written = "".join(p.read_text() for p in out.rglob("*.json"))
    assert str(tasks) not in written and "$INCLUDE/gen.jsonl" in written  # the include folder by a portable name
    rows = {(r["task"], r["doc_id"]): r for r in read_samples(out / "demo__base" / f"run_{m['run_id']}.json")}
    assert len(rows) == 9
    gen, choice, text = rows[("my_gen", 0)], rows[("my_choice", 0)], rows[("my_text", 1)]
    assert gen["question"] == GEN[0]["question"] and gen["target"] == "3" and isinstance(gen["response"], str)
    assert choice["question"] == "Is 1 even?" and choice["target"] == "no" and choice["response"] in ("yes", "no")
    assert choice["metrics"]["acc"] in (0.0, 1.0)
    assert text["question"] == TEXT[1]["text"] and float(text["response"]) < 0
    assert text["metrics"]["word_perplexity"][1] == 5  # (log-likelihood, words)

    # real lm-eval samples of every output type: the row from memory is the row from lm-eval's samples file
    res = evaluate(load_model_spec("base", pool), ["my_gen", "my_choice", "my_text"], include_path=[tasks],
                   limit=2, batch_size=2)
    samples = res["samples"]
    from_memory = [compact_sample(t, s) for t, rs in copy.deepcopy(samples).items() for s in rs]
    tracker = EvaluationTracker(output_path=str(tmp_path / "lm"))
    tracker.date_id = "run"
    for t, rs in samples.items():
        tracker.save_results_samples(task_name=t, samples=rs)
    from_file = [compact_sample(t, json.loads(line)) for t in samples
                 for f in (tmp_path / "lm").rglob(f"samples_{t}_run.jsonl") for line in f.read_text().splitlines()]
    assert len(from_memory) == 6 and from_file == from_memory
    assert {r["response"] for r in from_memory if r["task"] == "my_choice"} <= {"yes", "no"}


# ----------------------------------------------------------------------------- a task with several filters


YES_NO = [{"question": f"Is {a} small?", "answer": "yes" if a < 3 else "no"} for a in range(4)]  # 3 yes, 1 no


def two_filter_task(folder: Path) -> Path:
    """A generate_until task with two filters whose answers do not depend on the model: `zeta` (first in its
    filter_list, last in the alphabet) maps every generation to "yes" (exact_match 3/4), `alpha` to "no" (1/4)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = _jsonl(folder / "yes_no.jsonl", YES_NO)
    doc = {"task": "two_filter", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
           "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
           "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 2},
           "filter_list": [{"name": name, "filter": [{"function": "map", "mapping_dict": {}, "default_value": answer},
                                                     {"function": "take_first"}]}
                           for name, answer in (("zeta", "yes"), ("alpha", "no"))],
           "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
           "metadata": {"version": 1.0}}
    (folder / "two_filter.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


def test_a_task_with_two_filters_is_scored_by_its_first_filter(pool, tmp_path):
    """lm-eval logs one sample per (document, filter) and one score per filter: the run records each row's filter
    and its first filter's scores; the loose-run source and a comparison's cell take that filter's rows alone, one
    value per document (never the 2n values of both filters, nor the score lm-eval reported last)."""
    from workbench.catalog import runs_source, scan
    from workbench.comparison import parse_comparison
    from workbench.eval.harness import evaluate, filters_of, load_model_spec, run_eval, scores_of
    from workbench.eval.record import read_samples
    from workbench.eval.results import collect_scores
    from workbench.jobs import run_comparison

    tasks = two_filter_task(tmp_path / "tasks")
    res = evaluate(load_model_spec("base", pool), ["two_filter"], include_path=[tasks], limit=4, batch_size=2)
    assert [f.get("name") for f in res["configs"]["two_filter"]["filter_list"]] == ["zeta", "alpha"]
    assert res["results"]["two_filter"]["exact_match,zeta"] == 0.75
    assert res["results"]["two_filter"]["exact_match,alpha"] == 0.25
    assert {s["filter"] for s in res["samples"]["two_filter"]} == {"zeta", "alpha"}
    assert scores_of(res) == {"two_filter": {"exact_match": 0.75}} and filters_of(res) == {"two_filter": "zeta"}

    out = tmp_path / "results" / "lm-eval"
    m = run_eval("base", ["two_filter"], pool=pool, include_path=[tasks], limit=4, batch_size=2, results_dir=out)
    assert m["scores"]["two_filter"] == {"exact_match": 0.75} and m["filters"] == {"two_filter": "zeta"}
    rows = read_samples(out / "demo__base" / f"run_{m['run_id']}.json")
    assert len(rows) == 8 and [(r["doc_id"], r["filter"]) for r in rows[:2]] == [(0, "zeta"), (0, "alpha")]
    assert {r["response"] for r in rows if r["filter"] == "zeta"} == {"yes"}

    src = runs_source(scan(tmp_path / "results"), "demo")
    cell = src.cells[("base", "two_filter")]
    assert cell["filter"] == "zeta" and cell["doc_ids"] == [0, 1, 2, 3] and cell["values"] == [1.0, 1.0, 1.0, 0.0]
    assert cell["score"] == 0.75 and cell["n"] == 4
    assert collect_scores(out, full_only=False).set_index("task").loc["two_filter", "value"] == 0.75

    c = parse_comparison({"name": "filters", "pool": "demo", "tasks": ["two_filter"], "include_path": ["tasks"],
                          "eval": {"limit": 4, "batch_size": 2}, "entries": ["base"]}, "filters.yaml", folder=tmp_path)
    run_comparison(c, results_dir=tmp_path / "cmp", log=quiet)
    rec = json.loads((tmp_path / "cmp" / "compare" / "filters" / "cells" / "base" / "two_filter.json").read_text())
    assert rec["filter"] == "zeta" and rec["score"] == 0.75 and rec["n"] == 4
    assert rec["doc_ids"] == [0, 1, 2, 3] and rec["values"] == [1.0, 1.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- lm-eval's registry, offline


def test_registry_names_resolve_without_data_and_fail_offline_in_one_line(monkeypatch, tmp_path):
    import datasets.config
    from huggingface_hub import constants

    from workbench.tasks import lmeval

    (ref,) = lmeval.resolve(["arc_easy"], validate=False)  # named, indexed, configured: no data read
    assert (ref.name, ref.source, ref.group) == ("arc_easy", "registry", None)
    assert ref.config["dataset_path"] == "allenai/ai2_arc" and ref.output_type == "multiple_choice"
    leaves = lmeval.resolve(["ai2_arc"], validate=False)  # a tag: its tasks, each one task
    assert {(r.name, r.group) for r in leaves} == {("arc_easy", "ai2_arc"), ("arc_challenge", "ai2_arc")}
    with pytest.raises(TaskError) as e:
        lmeval.resolve(["arc_eazy"])
    assert "unknown task 'arc_eazy' (did you mean 'arc_easy'?)" in one_line(e)
    with pytest.raises(TaskError) as e:
        lmeval.resolve(["additon"])
    assert "did you mean 'addition'" in one_line(e)

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # nothing cached
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TaskError) as e:
        lmeval.resolve(["arc_easy"])
    msg = one_line(e)
    assert "task 'arc_easy'" in msg and "allenai/ai2_arc" in msg and "offline" in msg
    with pytest.raises(TaskError) as e:  # lm-eval's own attempt to read it, offline: the same line
        lmeval.load_task(lmeval.task_manager([ref]), ref)
    assert one_line(e) == msg


# ----------------------------------------------------------------------------- YAMLs lm-eval rejects


@pytest.mark.parametrize("edit, message", [
    (lambda doc: "task: [my_gen\n", r"my_gen\.yaml: lm-eval cannot read it: .*"),
    (lambda doc: {**doc, "output_type": "generate"}, r"my_gen\.yaml\): lm-eval rejects it: Got invalid output_type 'generate'"),
    (lambda doc: {k: v for k, v in doc.items() if k != "doc_to_text"}, r"my_gen\.yaml\): lm-eval rejects it: .*doc_to_text"),
    (lambda doc: {**doc, "metric_list": [{"metric": "no_such_metric"}]}, r"lm-eval rejects it: no_such_metric not found"),
    (lambda doc: {**doc, "task": "wb_my_gen"}, r"names starting with wb_ are the built-in suite's"),
])
def test_a_task_yaml_lm_eval_rejects_is_one_line_and_nothing_is_written(pool, tmp_path, edit, message):
    from workbench.eval.harness import run_eval

    tasks = user_tasks(tmp_path / "tasks")
    f = tasks / "my_gen.yaml"
    new = edit(yaml.safe_load(f.read_text()))
    f.write_text(new if isinstance(new, str) else yaml.safe_dump(new))
    out = tmp_path / "results"
    with pytest.raises(WorkbenchError, match=message) as e:
        run_eval("base", ["my_gen" if "wb_" not in message else "wb_my_gen"], pool=pool, include_path=[tasks],
                 results_dir=out / "lm-eval")
    assert one_line(e) and not out.exists()


# ----------------------------------------------------------------------------- keys


def test_keys_see_user_data_and_yaml_and_keep_suite_keys(pool, tmp_path):
    from workbench.comparison import cell_key, parse_comparison, task_config_hash
    from workbench.tasks.lmeval import task_key_inputs
    from workbench.tasks.suite import DOMAINS, TASKS, _task_yaml, data_hash

    def old_config_hash(task):  # the formula committed keys were made with
        return sha256_json(_task_yaml(task, Path("/suite"), TASKS.get(task) if task not in DOMAINS else None))[:16]

    user_tasks(tmp_path / "tasks")
    f = tmp_path / "cmp.yaml"
    f.write_text(yaml.safe_dump({"name": "k", "pool": "demo", "tasks": ["addition", "python_code", "my_gen"],
                                 "include_path": ["tasks"], "eval": {"limit": 2}, "entries": ["base"]}))
    model = {"base": "fp"}

    def key(task):
        return cell_key(parse_comparison(f), model, task)

    c = parse_comparison(f)
    assert c.tasks == ["addition", "python_code", "my_gen"] and c.task_ref("my_gen").source == "include"
    for task in ("addition", "python_code"):  # suite keys: byte-identical to the old formula's
        old = sha256_json({"model": model, "task": task, "data": data_hash(task), "config": old_config_hash(task),
                           "lm_eval": version("lm-eval"), "device": "cpu", "eval": {k: v for k, v in c.spec.eval.model_dump(mode="json").items()
                                                   if k != "apply_chat_template"}})  # the eval dump as it was
        assert key(task) == old[:16] and task_config_hash(task) == old_config_hash(task)

    before = key("my_gen")
    assert key("my_gen") == before  # stable
    data = tmp_path / "tasks" / "gen.jsonl"
    original = data.read_text()
    _jsonl(data, [{**GEN[0], "answer": "4"}, *GEN[1:]])  # one answer edited
    edited = key("my_gen")
    assert edited != before
    data.write_text(original)
    assert key("my_gen") == before
    y = tmp_path / "tasks" / "my_gen.yaml"
    y.write_text(y.read_text().replace("max_gen_toks: 4", "max_gen_toks: 5"))
    assert key("my_gen") not in (before, edited)
    y.write_text(y.read_text().replace("max_gen_toks: 5", "max_gen_toks: 4"))

    # the same tasks in another folder (their YAMLs naming their data there): the same key, no machine path in it
    moved = tmp_path / "elsewhere"
    user_tasks(moved / "tasks")
    g = moved / "cmp.yaml"
    g.write_text(f.read_text())
    assert cell_key(parse_comparison(g), model, "my_gen") == before

    # run_eval's manifest: the data hash of the data evaluated
    from workbench.eval.harness import run_eval

    m = run_eval("base", [c.task_ref("my_gen"), "addition"], pool=pool, limit=1, batch_size=1,  # as a cell runs
                 results_dir=tmp_path / "res" / "lm-eval")
    assert m["data_sha256"]["addition"] == data_hash("addition")
    assert m["data_sha256"]["my_gen"] == task_key_inputs(c.task_ref("my_gen"))["data"]


def test_include_path_is_checked_and_bounded(pool, tmp_path):
    from workbench.comparison import MAX_INCLUDE, parse_comparison

    body = {"name": "k", "pool": "demo", "tasks": ["my_gen"], "entries": ["base"]}
    with pytest.raises(RecipeError) as e:
        parse_comparison({**body, "include_path": ["nowhere"]}, "k.yaml", folder=tmp_path)
    assert "include_path.0: nowhere is not a folder" in one_line(e)
    with pytest.raises(RecipeError, match="include_path: List should have at most"):
        parse_comparison({**body, "include_path": ["t"] * (MAX_INCLUDE + 1)}, "k.yaml", folder=tmp_path)
    with pytest.raises(RecipeError) as e:  # without the folder, the task is unknown: one line, did you mean
        parse_comparison({**body, "tasks": ["my_gen"]}, "k.yaml", folder=tmp_path)
    assert "unknown task 'my_gen'" in one_line(e)
    user_tasks(tmp_path / "tasks")
    with pytest.raises(RecipeError) as e:
        parse_comparison({**body, "tasks": ["my_gne"], "include_path": ["tasks"]}, "k.yaml", folder=tmp_path)
    assert "did you mean 'my_gen'" in one_line(e)


def test_recipe_eval_include_path_is_relative_to_the_recipe(pool, tiny_dir, tmp_path):
    from conftest import add_two_experts

    from workbench.recipes import parse_recipe

    add_two_experts(pool, tiny_dir)
    folder = tmp_path / "recipes"
    user_tasks(folder / "tasks")
    body = {"name": "ta", "pool": "demo", "method": "task_arithmetic", "parameters": {"lambda": 0.5},
            "eval": {"tasks": ["my_gen"], "include_path": ["tasks"]},
            "sweep": {"parameters": {"lambda": [0.5, 1.0]}, "tasks": ["my_choice"], "limit": 2}}
    (folder / "ta.yaml").write_text(yaml.safe_dump(body))
    resolved = parse_recipe(folder / "ta.yaml")
    assert resolved.include_path == [folder / "tasks"]
    elsewhere = {**body, "eval": {"tasks": ["my_gen"], "include_path": [str(folder / "tasks")]}}
    assert parse_recipe(elsewhere).key == resolved.key  # evaluation settings are not the artifact's
    (folder / "val.yaml").write_text(yaml.safe_dump({**body, "sweep": {**body["sweep"], "tasks": ["my_gen"]}}))
    with pytest.raises(TaskError) as e:  # the sweep scores the validation split: my_gen has none
        parse_recipe(folder / "val.yaml")
    assert "task 'my_gen' has no validation split" in one_line(e)
    (folder / "bad.yaml").write_text(yaml.safe_dump({**body, "eval": {"tasks": ["my_gen"], "include_path": ["gone"]}}))
    with pytest.raises(RecipeError) as e:
        parse_recipe(folder / "bad.yaml")
    assert "eval.include_path.0: gone is not a folder" in one_line(e)
