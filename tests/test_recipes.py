"""Recipes: hostile files fail in one short line; the artifact key covers the method's version and the
data it reads; experts' files are checked (existence when parsing, hashes before building)."""

import json
import shutil

import pytest
import yaml
from conftest import one_line, quiet, snapshot

from workbench.errors import RecipeError
from workbench.recipes import MAX_RECIPE_BYTES, build, parse_recipe


# ----------------------------------------------------------------------------- hostile recipe files


def test_alias_bomb_is_refused_unexpanded(tmp_path):
    # name: a list of 10^6 strings through 6 levels of aliases (never expanded: the first alias stops it)
    levels = ["  l0: &l0 [" + ", ".join(['"lol"'] * 10) + "]"]
    levels += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 7)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("method: ties\nparameters:\n" + "\n".join(levels) + "\nname: *l6\n")
    with pytest.raises(RecipeError, match=r"bomb\.yaml is not valid YAML: aliases \(\*name\) are not allowed in "
                                          r"recipes \(line 4, column \d+\)$") as e:
        parse_recipe(bomb)
    one_line(e)


def test_binary_file(tmp_path):
    f = tmp_path / "binary.yaml"
    f.write_bytes(b"name: x\n" + bytes(range(256)) * 64)
    with pytest.raises(RecipeError, match=r"binary\.yaml is not UTF-8 text \(invalid byte at offset 136\)$") as e:
        parse_recipe(f)
    one_line(e)


def test_oversized_file_is_not_read(tmp_path):
    f = tmp_path / "big.yaml"
    line = "name: x\nmethod: ties\n" + "".join(f"k{i}: {i}\n" for i in range(MAX_RECIPE_BYTES // 8))
    f.write_text(line)  # valid YAML, just over 1 MiB
    with pytest.raises(RecipeError, match=r"big\.yaml is over 1 MiB \([\d,]+ bytes\)$") as e:
        parse_recipe(f)
    one_line(e)


def test_deep_nesting(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: x\nmethod: ties\nparameters: {weight: " + "[" * 500 + "]" * 500 + "}\n")
    with pytest.raises(RecipeError, match=r"deep\.yaml is not valid YAML: nested more than 32 levels deep "
                                          r"\(line 3, column \d+\)$") as e:
        parse_recipe(deep)
    one_line(e)
    nested: list = []
    for _ in range(500):
        nested = [nested]
    with pytest.raises(RecipeError, match=r"recipe <recipe>: nested more than 32 levels deep$") as e:
        parse_recipe({"name": "x", "method": "ties", "parameters": {"weight": nested}})
    one_line(e)


@pytest.mark.parametrize("data,message", [
    ({"name": ["x" * 100_000], "method": "ties"}, r"name: Input should be a valid string \(got \['xxx.*\.\.\.\)$"),
    ({"name": "x", "method": "m" * 100_000}, r"method: String should have at most 64 characters \(got 'mmm.*\.\.\.\)$"),
    ({"name": "x", "method": "ties", "k" * 100_000: 1}, r"recipe <recipe>: kkk+\.\.\.: Extra inputs are not permitted"),
    ({"name": "x", "method": "ties", "experts": ["e" * 100_000]}, r"experts\.0: String should have at most 1024"),
    ({"name": "x", "method": "ties", "sweep": {"parameters": {"density": [0.5, ["z"] * 100_000]}}},
     r"sweep point \{'density': \['z', .*\.\.\.: parameters\.density: Input should be a valid number"),
    ({"name": "x", "method": "ties", "parameters": {"per_expert": {"p" * 100_000: {"weight": 0}}}},
     r"per_expert names experts not in the merge: \['ppp"),
    ({"name": "../../../x\n", "method": "ties"}, r"name: String should match pattern"),
])
def test_errors_never_echo_unbounded_input(pool, tiny_dir, data, message):
    pool.add(tiny_dir / "lora_a", "a")
    with pytest.raises(RecipeError, match=message) as e:
        parse_recipe({"pool": str(pool.root), **data})
    one_line(e)


# ----------------------------------------------------------------------------- artifact keys


def test_key_covers_method_version_and_key_inputs(pool, tiny_dir, tmp_path, monkeypatch):
    from workbench.methods import METHODS

    monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path / "artifacts"))
    pool.add(tiny_dir / "lora_a", "a")
    recipe = {"name": "k", "pool": str(pool.root), "method": "task_arithmetic", "experts": ["a"]}

    def meta(folder):
        return json.loads((folder / "artifact.json").read_text())

    first = build(parse_recipe(recipe), log=quiet)
    assert build(parse_recipe(recipe), log=quiet) == first  # same key: reused
    cls = METHODS.get("task_arithmetic")
    assert meta(first)["method_version"] == cls.version and meta(first)["key_inputs"] == {}
    monkeypatch.setattr(cls, "version", cls.version + 1)  # a fixed method: its old artifacts are stale
    bumped = build(parse_recipe(recipe), log=quiet)
    assert bumped != first and meta(bumped)["method_version"] == cls.version
    seen = []
    for data in ("v4-aaaa", "v5-bbbb"):  # the data a build reads changed (e.g. a new task suite)
        monkeypatch.setattr(cls, "key_inputs", lambda self, experts, params, d=data: {"addition": d})
        seen.append(build(parse_recipe(recipe), log=quiet))
        assert meta(seen[-1])["key_inputs"] == {"addition": data}
    assert len({first, bumped, *seen}) == 4


# ----------------------------------------------------------------------------- experts' files


def test_linked_expert_changed_after_adding(pool, tiny_dir, tmp_path, monkeypatch, run_cli, capsys):
    from safetensors.torch import load_file, save_file

    from workbench import io

    monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path / "artifacts"))
    src = shutil.copytree(tiny_dir / "lora_a", tmp_path / "linked")
    pool.add(src, "a", link=True)
    pool.add(tiny_dir / "lora_b", "b")
    recipe = {"name": "l", "pool": str(pool.root), "method": "task_arithmetic", "experts": ["a", "b"]}
    hashed = []
    monkeypatch.setattr(io, "sha256_file", lambda path, *a, real=io.sha256_file: hashed.append(path) or real(path, *a))
    build(parse_recipe(recipe), log=quiet)
    n_files = len(pool.expert("a").entry.files) + len(pool.expert("b").entry.files)
    build(parse_recipe(recipe), force=True, log=quiet)
    assert len(hashed) == n_files  # each file hashed once per process, not once per build
    weights = src / "adapter_model.safetensors"
    save_file({k: v * 2 for k, v in load_file(weights).items()}, str(weights), metadata={"format": "pt"})
    before = snapshot(tmp_path / "artifacts")
    for force in (False, True):  # neither the old artifact nor a rebuild under the old key
        with pytest.raises(RecipeError, match=r"^expert 'a': .*linked/adapter_model\.safetensors changed since it "
                                              r"was added \(sha256 mismatch\); check with `workbench pool verify demo`"
                           ) as e:
            build(parse_recipe(recipe), force=force, log=quiet)
        one_line(e)
    f = tmp_path / "l.yaml"
    f.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()  # the first build's progress bars
    code, _, err = run_cli("merge", str(f))
    assert code == 2 and err.count("\n") == 1 and "changed since it was added" in err
    assert snapshot(tmp_path / "artifacts") == before


def test_deleted_expert_folder_fails_when_parsing(pool, tiny_dir, tmp_path, run_cli):
    pool.add(tiny_dir / "full_c", "c")
    shutil.rmtree(pool.expert("c").path)
    recipe = {"name": "gone", "pool": str(pool.root), "method": "ties", "experts": ["c"]}
    with pytest.raises(RecipeError, match=r"^recipe <recipe>: expert 'c' is missing \S+/experts/c/\S+ \(moved or "
                                          r"deleted\? `workbench pool verify demo` lists what is missing\)$") as e:
        parse_recipe(recipe)
    one_line(e)
    f = tmp_path / "gone.yaml"
    f.write_text(yaml.safe_dump(recipe))
    code, out, err = run_cli("merge", str(f), "--dry-run")
    assert code == 2 and out == "" and err.count("\n") == 1 and "expert 'c' is missing" in err


# ----------------------------------------------------------------------------- sweep scores


def _sweep_world(pool, tiny_dir, tmp_path, monkeypatch, sweep_tasks, results_of):
    """A recipe sweeping lambda over 0.5, 1.0, 1.5 on `sweep_tasks` with an include task `my_err` (acc, lower is
    better); builds are stubbed (each point's artifact a folder named by its key) and `harness.evaluate` answers
    `results_of(point index)` (lm-eval's results dict). Returns (run the sweep, the calls made, the record file)."""
    from workbench import artifacts, recipes
    from workbench.eval import harness

    recipe = {"name": "sw", "pool": str(pool.root), "method": "task_arithmetic", "experts": ["a"],
               "eval": {"tasks": ["addition"], "include_path": [str(tmp_path / "tasks")]},
               "sweep": {"parameters": {"lambda": [0.5, 1.0, 1.5]}, "tasks": sweep_tasks, "limit": 2}}
    pool.add(tiny_dir / "lora_a", "a")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "err.jsonl").write_text("".join(json.dumps({"q": f"{i}?", "choices": ["a", "b"],
                                                                      "label": 0}) + "\n" for i in range(3)))
    (tmp_path / "tasks" / "my_err.yaml").write_text(yaml.safe_dump({
        "task": "my_err", "dataset_path": "json", "output_type": "multiple_choice", "test_split": "test",
        "validation_split": "validation", "dataset_kwargs": {"data_files": {
            "test": str(tmp_path / "tasks" / "err.jsonl"), "validation": str(tmp_path / "tasks" / "err.jsonl")}},
        "doc_to_text": "{{q}}", "doc_to_choice": "choices", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": False}],
        "metadata": {"version": 1.0}}))
    calls = []

    def fake_build(v, **k):
        calls.append(("build", v.params.model_dump(mode="json", by_alias=True)["lambda"]))
        folder = tmp_path / "artifacts" / v.key
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def fake_evaluate(loaded, tasks, **k):
        calls.append(("evaluate", [getattr(t, "name", t) for t in tasks]))
        return results_of(sum(1 for c in calls if c[0] == "evaluate") - 1)

    monkeypatch.setattr(recipes, "build", fake_build)
    monkeypatch.setattr(artifacts, "load_artifact", lambda path, device=None: None)
    monkeypatch.setattr(harness, "evaluate", fake_evaluate)
    record = tmp_path / "results" / "sweeps" / "demo__sw.json"

    def run():
        return recipes.run_sweep(parse_recipe(recipe), results_dir=tmp_path / "results", log=quiet)

    return run, calls, record


def test_a_sweep_scores_each_task_by_its_metric_and_direction(pool, tiny_dir, tmp_path, monkeypatch):
    """addition (exact_match ↑) alongside python_code (word_perplexity ↓) and my_err (acc ↓): the point's score is
    addition's accuracy alone (the perplexity and the lower-is-better accuracy are recorded, not averaged in), so
    the best point is the one addition scores best, never a NaN first point nor the worst point of my_err."""
    addition, ppl, err = [0.2, 0.6, 0.4], [12.0, 30.0, 9.0], [0.0, 0.9, 0.1]

    def results_of(i):
        return {"results": {"wb_addition_val": {"alias": "addition", "exact_match,strip": addition[i],
                                                "exact_match_stderr,strip": 0.1},
                            "wb_python_code_val": {"word_perplexity,none": ppl[i], "bits_per_byte,none": 1.2},
                            "my_err": {"acc,none": err[i], "acc_stderr,none": 0.1}},
                "configs": {"my_err": {"metric_list": [{"metric": "acc", "aggregation": "mean",
                                                        "higher_is_better": False}]}},
                "higher_is_better": {"wb_addition_val": {"exact_match": True},
                                     "wb_python_code_val": {"word_perplexity": False, "bits_per_byte": False},
                                     "my_err": {"acc": False}}}

    run, calls, record_file = _sweep_world(pool, tiny_dir, tmp_path, monkeypatch,
                                           ["addition", "python_code", "my_err"], results_of)
    chosen, selection = run()
    assert selection["best"] == {"lambda": 1.0} and selection["validation_score"] == 0.6
    assert chosen.params.model_dump(mode="json", by_alias=True)["lambda"] == 1.0
    record = json.loads(record_file.read_text())
    assert "NaN" not in record_file.read_text()
    assert [p["score"] for p in record["points"]] == addition
    assert record["points"][1]["per_task"] == {"addition": 0.6}
    assert record["points"][1]["other_tasks"] == {
        "python_code": {"metric": "word_perplexity", "higher_is_better": False, "value": 30.0},
        "my_err": {"metric": "acc", "higher_is_better": False, "value": 0.9}}
    assert record["scoring"] == {
        "addition": {"metric": "exact_match", "higher_is_better": True, "scored": True},
        "python_code": {"metric": "word_perplexity", "higher_is_better": False, "scored": False},
        "my_err": {"metric": "acc", "higher_is_better": False, "scored": False}}
    calls.clear()
    assert run()[1]["best"] == {"lambda": 1.0} and calls == []  # reused while the keys and the scoring hold
    # a record written before the scoring was recorded averaged every task: its points are not reused
    record_file.write_text(json.dumps({k: v for k, v in record.items() if k != "scoring"}))
    run()
    assert [c[0] for c in calls] == ["build", "evaluate"] * 3


def test_a_sweep_scored_by_a_tasks_first_filter(pool, tiny_dir, tmp_path, monkeypatch):
    """A two-filter task: each point is scored by its first filter, not by whichever lm-eval reported last."""
    strict, flexible = [0.1, 0.3, 0.2], [0.9, 0.1, 0.5]

    def results_of(i):
        return {"results": {"wb_addition_val": {"exact_match,strict-match": strict[i],
                                                "exact_match,flexible-extract": flexible[i]}},
                "configs": {"wb_addition_val": {"filter_list": [{"name": "strict-match"},
                                                                {"name": "flexible-extract"}]}}}

    run, calls, record_file = _sweep_world(pool, tiny_dir, tmp_path, monkeypatch, ["addition"], results_of)
    assert run()[1]["best"] == {"lambda": 1.0}
    record = json.loads(record_file.read_text())
    assert [p["score"] for p in record["points"]] == strict
    # a record of the suite's tasks written before the scoring was recorded scored them alike: reused
    calls.clear()
    record_file.write_text(json.dumps({k: v for k, v in record.items() if k != "scoring"}))
    assert run()[1]["best"] == {"lambda": 1.0} and calls == []


def test_a_sweep_without_a_usable_score_is_refused_before_anything_is_written(pool, tiny_dir, tmp_path, monkeypatch):
    run, calls, _ = _sweep_world(pool, tiny_dir, tmp_path, monkeypatch, ["python_code", "my_err"], lambda i: {})
    with pytest.raises(RecipeError) as e:
        run()
    msg = one_line(e)
    assert "recipe sw: sweep.tasks give no score to rank points by (python_code word_perplexity ↓, my_err acc ↓)" \
        in msg and "accuracy-like, higher-is-better" in msg
    assert calls == [] and not (tmp_path / "results").exists() and not (tmp_path / "artifacts").exists()
