"""The public Python API: documented and typed names, a CLI that calls nothing else, the docs' script run as a user
would, Leaderboard and progress semantics, and the newcomer's stumbles of the CLI."""

import ast
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import add_two_experts, suite_data

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- names


def test_every_public_name_is_documented_and_typed():
    import workbench

    assert len(workbench.__all__) >= 25
    for name in workbench.__all__:
        obj = getattr(workbench, name)
        if isinstance(obj, (str, tuple)):  # DEFAULT_BASE, BENCHMARKS
            continue
        assert inspect.getdoc(obj), f"{name} has no docstring"
        if inspect.isclass(obj):  # methods, class/static methods and properties of the class itself
            members = {n: m for n, m in vars(obj).items() if not n.startswith("_")}
            for n, m in members.items():
                if isinstance(m, property):
                    assert m.__doc__, f"{name}.{n} (property) has no docstring"
            fns = [m.__func__ if isinstance(m, (classmethod, staticmethod)) else m for m in members.values()]
            fns = [f for f in fns if inspect.isfunction(f)]
        else:
            fns = [obj]
        for fn in fns:
            sig = inspect.signature(fn)
            untyped = [p for p in sig.parameters.values() if p.name not in ("self", "cls")
                       and p.annotation is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
            assert not untyped, f"{name}.{fn.__name__}: parameters without type hints: {[p.name for p in untyped]}"
            assert inspect.getdoc(fn), f"{name}.{fn.__name__} has no docstring"
            if inspect.isfunction(obj):
                assert sig.return_annotation is not inspect.Signature.empty, f"{name}: no return type"


def test_help_lists_the_public_names():
    proc = subprocess.run([sys.executable, "-c", "import workbench; help(workbench)"], capture_output=True, text=True,
                          env={**os.environ, "PAGER": "cat", "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import workbench

    missing = [n for n in workbench.__all__ if not re.search(rf"\b{re.escape(n)}\b", proc.stdout)]
    assert not missing, f"help(workbench) does not list {missing}"


def private_names_used(source: str) -> list[str]:
    """Every `workbench.*` name a module imports that the public API does not export: imports from a submodule
    (`from .pool import Pool`, `import workbench.jobs`), or names that are not in `workbench.__all__`."""
    import workbench

    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "workbench"):
            module = "." * node.level + (node.module or "")
            if module not in (".", "workbench"):
                bad += [f"{module}.{a.name}" for a in node.names]
            else:
                bad += [a.name for a in node.names if a.name not in workbench.__all__]
        elif isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.startswith("workbench.")]
    return bad


def test_the_cli_calls_only_the_public_api():
    assert private_names_used("from .pool import Pool\nfrom . import _LAZY, build\nimport workbench.jobs") == [
        ".pool.Pool", "_LAZY", "workbench.jobs"]  # the check itself bites
    source = (ROOT / "workbench" / "cli.py").read_text()
    assert private_names_used(source) == []
    # thin: options and printing; the logic lives in the library (about 25 lines per command with its options)
    assert len(source.splitlines()) < 1100


# ----------------------------------------------------------------------------- the docs' script


def _script() -> str:
    text = (ROOT / "docs" / "python.md").read_text()
    section = text.split("## A worked script", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.integration
def test_docs_python_script_runs_as_a_user_would(tmp_path, session_cache):
    """The script of docs/python.md, verbatim, in a fresh folder outside the repository: no WORKBENCH_POOLS (the
    project's pools are found), results into that folder."""
    script = tmp_path / "script.py"
    script.write_text(_script())
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKBENCH_")}
    env |= {"WORKBENCH_CACHE": str(session_cache), "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # the leaderboard as a DataFrame: its header and one line per row
    header = next(line for line in out.splitlines() if line.split()[:2] == ["model", "method"])
    assert "held_in %" in header and "p (paired)" in header
    for row in ("base", "addition", "sorting", "ties", "ta"):
        assert re.search(rf"^\s*{row}\s", out, re.M), (row, out)
    assert "'test': 'mcnemar'" in out and "'kind': 'accuracy'" in out  # board.paired(...) printed, pooled
    assert "'task': 'sorting'" in out and "'gain':" in out  # and on one task
    assert (tmp_path / "results" / "compare" / "script-demo" / "leaderboard.json").is_file()
    assert (tmp_path / "results" / "lm-eval").is_dir()
    assert not (tmp_path / "adapters").exists()  # the project's pool was used, nothing created here


# ----------------------------------------------------------------------------- on the tiny model


def test_build_evaluate_load_and_compare(pool, tiny_dir, tmp_path, monkeypatch):
    import torch

    import workbench as wb

    add_two_experts(pool, tiny_dir)
    quiet = lambda *a: None  # noqa: E731
    art = wb.build(pool, "task_arithmetic", experts=["addition", "sorting"], output={"kind": "lora", "rank": 4},
                   log=quiet, **{"lambda": 0.5})
    assert isinstance(art, wb.Artifact) and art.path.is_dir() and art.method == "task_arithmetic"
    again = wb.build("demo", "task_arithmetic", experts=["addition", "sorting"], output={"kind": "lora", "rank": 4},
                     log=quiet, **{"lambda": 0.5})
    assert again.key == art.key  # a pool by object or by name: one key (the pool is recorded by its name)
    model, tok = wb.load(art)
    ids = tok("12+30=", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    res = wb.evaluate(art, ["addition"], limit=2, batch_size=2, results_dir=tmp_path / "results")
    assert set(res.scores) == {"addition"} and res.to_pandas().task.tolist()[0] == "addition"
    manifest = json.loads(next((tmp_path / "results" / "lm-eval").rglob("run_*.json")).read_text())
    assert manifest["artifact_key"] == art.key and manifest["recipe"]["pool"] == "demo"

    doc = {"name": "api", "pool": "demo", "tasks": ["addition", "sorting"], "eval": {"limit": 3, "batch_size": 4},
           "reference": "base", "entries": ["base", "addition", "sorting",
                                            {"name": "ta", "method": "task_arithmetic", "experts": ["addition", "sorting"],
                                             "parameters": {"lambda": 0.5}, "output": {"kind": "lora", "rank": 4}}]}
    states = []
    board = wb.compare(doc, results_dir=tmp_path / "results", progress=states.append, log=quiet)
    assert isinstance(board, wb.Leaderboard) and set(board.rows) == {"base", "addition", "sorting", "ta"}
    df = board.to_pandas()
    assert list(df.model) == board.rows and "held_in %" in df.columns
    saved = json.loads((tmp_path / "results" / "compare" / "api" / "leaderboard.json").read_text())
    assert saved["rows"] == board.board["rows"]
    # paired(a, b) equals the leaderboard's own test against the reference, and by hand from the cells
    p = board.paired("ta", "base")
    ref = next(r for r in board.board["rows"] if r["name"] == "ta")["paired"]
    assert (p["n"], p["diff"], p["p_value"]) == (ref["n"], ref["diff"], ref["p_value"])
    a = [v for t in ("addition", "sorting") for v in board.cells[("ta", t)]["values"]]
    b = [v for t in ("addition", "sorting") for v in board.cells[("base", t)]["values"]]
    assert p["n"] == 6 and p["diff"] == pytest.approx((sum(a) - sum(b)) / 6)
    with pytest.raises(wb.WorkbenchError, match="against itself"):
        board.paired("ta", "ta")
    with pytest.raises(wb.WorkbenchError, match="did you mean 'ta'"):
        board.paired("taa", "base")
    # progress: all 8 cells + 1 build done, weighted costs all spent, nothing reused the first time
    last = states[-1]
    assert (last.done, last.total, last.reused) == (9, 9, 0) and last.cost_done == pytest.approx(last.cost_total)
    # a rerun reuses everything and says so
    board2 = wb.compare(doc, results_dir=tmp_path / "results", progress=False, log=quiet)
    assert board2.reused == 9 and board2.board["rows"] == board.board["rows"]
    assert [b.name for b in wb.leaderboards("demo", tmp_path / "results")] == ["api"]


def test_api_errors_are_one_line_workbench_errors(pool, tiny_dir):
    import workbench as wb

    add_two_experts(pool, tiny_dir)
    cases = [
        (lambda: wb.build(pool, "tiez"), "did you mean 'ties'"),
        (lambda: wb.build(pool, "ties", experts=["addition", "nobody"]), "no expert 'nobody'"),
        (lambda: wb.build(pool, "ties", density=7), "density"),
        (lambda: wb.build(pool), "give a method name"),
        (lambda: wb.plan("merges/ties-lora.yaml", density=0.3), "change its parameters in the recipe"),
        (lambda: wb.plan(pool, "ties", limit=10**12), "limit"),
        (lambda: wb.evaluate("base", ["addition"], pool=pool, limit=0), "limit"),
        (lambda: wb.evaluate("base", ["additon"], pool=pool), "did you mean 'addition'"),
        (lambda: wb.benchmark("kernel"), "did you mean 'kernels'"),
        (lambda: pool.train("x", ["addition"], steps=-1), "steps"),
    ]
    for call, message in cases:
        with pytest.raises(wb.WorkbenchError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value), (message, str(info.value))


def test_progress_weights_builds_by_expected_cost_and_gives_an_eta(pool, tiny_dir, tmp_path):
    from workbench.comparison import parse_comparison
    from workbench.jobs import Progress, expected_costs, make_plan

    add_two_experts(pool, tiny_dir)
    doc = {"name": "w", "pool": "demo", "tasks": ["addition"], "eval": {"limit": 10}, "reference": "base",
           "entries": ["base", {"name": "ta", "method": "task_arithmetic"},
                       {"name": "goose", "method": "phatgoose", "parameters": {"steps": 4}}]}
    plan = make_plan(parse_comparison(doc), tmp_path)
    costs = expected_costs(plan)
    assert costs["build:goose"] > costs["build:ta"] > costs["eval:base:addition"]  # training > merging > one eval
    # an earlier run's recorded times win over the defaults
    (plan.out / "builds").mkdir(parents=True)
    (plan.out / "builds" / "ta.json").write_text(json.dumps({"key": "old", "build_s": 7.5}))
    assert expected_costs(plan)["build:ta"] == 7.5
    state = Progress(total=3, cost_total=100.0, cost_done=25.0)
    state.started -= 10  # 10 s for the first quarter of the expected work: 30 s left
    assert state.eta_s == pytest.approx(30, rel=0.05)
    assert Progress(total=1, cost_total=5).eta_s is None


# ----------------------------------------------------------------------------- newcomer stumbles (CLI)


def test_help_has_no_type_tags(run_cli):
    for args in [("merge",), ("route", "trace"), ("compare",), ("pool", "show"), ("train", "lora")]:
        code, out, _ = run_cli(*args, "--help")
        assert code == 0 and "Usage" in out
        assert not re.search(r"<(bool|str|int|float|path)>", out), (args, out)


def test_route_trace_help_names_recipes_that_exist(run_cli):
    for cmd in ("trace", "traces", "accuracy"):
        _code, out, _ = run_cli("route", cmd, "--help")
        named = re.findall(r"merges/[\w.-]+\.yaml", out)
        assert named and all((ROOT / n).is_file() for n in named), (cmd, named)


def test_pool_show_summarises_and_json_has_everything(run_cli, pools, tiny_dir, pool):
    training = {"method": "lora", "steps": 3, "loss_curve": [2.0, 1.5, 1.2], "final_loss": 1.2, "config": {"lr": 1e-3}}
    pool.add(tiny_dir / "lora_a", "addition", tags={"task": "addition"}, data=suite_data("addition"), training=training)
    code, out, err = run_cli("pool", "show", "demo")
    assert code == 0, err
    assert "addition" in out and "3 steps" in out and "final loss 1.200" in out and "loss_curve" not in out
    assert len(out.splitlines()) < 20
    code, out, _ = run_cli("pool", "show", "demo", "--json")
    assert json.loads(out)["experts"][0]["training"]["loss_curve"] == [2.0, 1.5, 1.2]
    code, out, _ = run_cli("pool", "show", "demo", "addition")
    assert json.loads(out)["training"]["loss_curve"] == "3 points, 2.000 -> 1.200"


def test_merge_limit_and_no_sweep(run_cli, pools, tiny_dir, pool, tmp_path):
    import yaml

    add_two_experts(pool, tiny_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "method": "task_arithmetic", "pool": "demo",
                                      "eval": {"tasks": ["addition"], "limit": 50},
                                      "sweep": {"parameters": {"lambda": [0.5, 1.0]}, "limit": 40}}))
    code, out, err = run_cli("merge", str(recipe), "--dry-run", "--limit", "3")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["eval"]["limit"] == 3 and len(plan["sweep"]) == 2
    code, out, err = run_cli("merge", str(recipe), "--dry-run", "--no-sweep")
    assert code == 0 and json.loads(out)["sweep"] is None and json.loads(out)["eval"]["limit"] == 50
    code, _out, err = run_cli("merge", str(recipe), "--dry-run", "--limit", "0")
    assert code == 2 and "limit" in err


def test_route_trace_prompt_file_and_bad_prompts(run_cli, pools, tiny_dir, pool, tmp_path, monkeypatch):
    import io

    import yaml

    add_two_experts(pool, tiny_dir)
    recipe = tmp_path / "arrow.yaml"
    recipe.write_text(yaml.safe_dump({"name": "arrow-t", "method": "arrow", "pool": "demo", "parameters": {"k": 1}}))
    (tmp_path / "p.txt").write_text("12+30=\n7+1=")
    code, _out, err = run_cli("route", "trace", str(recipe), "--prompt-file", str(tmp_path / "p.txt"),
                              "--out", str(tmp_path / "t.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "t.json").read_text())["prompt"] == "12+30=\n7+1="  # a real newline
    monkeypatch.setattr(sys, "stdin", io.StringIO("5+5=\n"))
    code, _out, err = run_cli("route", "trace", str(recipe), "--prompt-file", "-", "--out", str(tmp_path / "s.json"))
    assert code == 0 and json.loads((tmp_path / "s.json").read_text())["prompt"] == "5+5=\n"
    for args, message in [((str(recipe), ""), "empty prompt"), ((str(recipe), "  \n"), "empty prompt"),
                          ((str(recipe),), "give the prompt"),
                          ((str(recipe), "x", "--prompt-file", str(tmp_path / "p.txt")), "not both"),
                          ((str(recipe), "1+1= " * 400), "longer than the model's context")]:
        code, _out, err = run_cli("route", "trace", *args)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], (args[1:2], err)


def test_results_table_reads_the_comparisons(run_cli, pools, tiny_dir, pool, tmp_path):
    import workbench as wb

    add_two_experts(pool, tiny_dir)
    code, out, _ = run_cli("results", "table", "--results-dir", str(tmp_path / "r"))
    assert code == 0 and "no comparisons yet" in out
    wb.compare({"name": "tbl", "pool": "demo", "tasks": ["addition"], "eval": {"limit": 2, "batch_size": 2},
                "reference": "base", "entries": ["base", "addition"]},
               results_dir=tmp_path / "r", progress=False, log=lambda *a: None)
    code, out, err = run_cli("results", "table", "--results-dir", str(tmp_path / "r"), "--pool", "demo")
    assert code == 0, err
    assert "tbl" in out and "base" in out and "addition" in out
    header = next(line for line in out.splitlines() if "┃ model" in line)
    assert "held-in %" in header and "held-out" not in header  # no held-out task: no always-empty column
    assert "exact_match (accuracy-like, 0/1 per example)" in " ".join(out.split())  # the legend below the table


def test_demo_says_when_the_leaderboard_is_rederived(run_cli, monkeypatch, tmp_path):
    """`workbench demo` with every cell already recorded says so and how to recompute."""
    import workbench as wb
    from workbench.jobs import Progress

    board = wb.Leaderboard({"name": "demo", "reference": "base", "tasks": ["addition"],
                            "rows": [{"name": "base", "method": "base", "tasks": {}, "summary": {}, "paired": None}]},
                           folder=tmp_path / "compare" / "demo", progress=Progress(total=97, done=97, reused=97))
    monkeypatch.setattr(wb, "run_demo", lambda **kw: board)
    code, out, err = run_cli("demo")
    assert code == 0, err
    text = " ".join(out.split())
    assert "All 97 cells" in text and "re-derived" in text and "delete" in text
    board.progress.reused = 0
    code, out, _ = run_cli("demo")
    assert "re-derived" not in out


# ----------------------------------------------------------------------------- a board of several metrics

from conftest import MIXED_LLS as LLS, MIXED_WORDS as WORDS  # noqa: E402  per-document log-likelihoods and words


def _mixed_board():
    """A Leaderboard with its cells: exact match (addition), acc (my_cls, a user's task), a perplexity corpus
    (python_code: per-document log-likelihoods and words) and corpus BLEU (no per-example values); reference base."""
    import workbench as wb
    from workbench.eval.leaderboard import build_leaderboard

    from conftest import mixed_metric_cells

    tasks, rows, cells = mixed_metric_cells((1, 1, 1, 1))
    board = build_leaderboard(rows, cells, tasks, "base") | {"name": "mixed", "pool": "demo"}
    return wb.Leaderboard(board, cells)


def _ppl(shift: float) -> float:
    return math.exp(-sum(x + shift for x in LLS) / sum(WORDS))


def test_leaderboard_summary_shows_each_metric_in_its_units_and_direction():
    board = _mixed_board()
    df = board.summary().set_index("model")
    assert {"add ↑", "my_cls ↑", "py ppl ↓", "my_bleu ↑", "held-in %", "other %"} <= set(df.columns)
    assert df.loc["merged", "add ↑"] == "75" and df.loc["merged", "my_cls ↑"] == "100"  # acc in % too
    assert df.loc["merged", "py ppl ↓"] == f"{_ppl(4.0):.4g}" and df.loc["base", "my_bleu ↑"] == "20"
    assert df.loc["merged", "other %"].startswith("100.0")  # my_cls: the group of the user's accuracy-like tasks
    p = next(r for r in board.board["rows"] if r["name"] == "merged")["paired"]
    assert df.loc["merged", "Δ vs base"] == f"{100 * p['gain']:+.1f}" and df.loc["base", "Δ vs base"] == "ref"
    assert any("py ppl ↓: word_perplexity, lower is better" in line for line in board.legend())
    assert board.task_metrics()["python_code"]["kind"] == "corpus"


def test_leaderboard_paired_pools_accuracy_like_tasks_and_tests_one_task_by_its_metric():
    import workbench as wb
    from workbench.eval import stats

    board = _mixed_board()
    pooled = board.paired("merged", "base")
    # exact match and acc pooled (8 examples), never the perplexity's log-likelihoods
    assert pooled["tasks"] == ["addition", "my_cls"] and pooled["n"] == 8 and pooled["test"] == "mcnemar"
    assert (pooled["a_only"], pooled["b_only"]) == (4, 0) and pooled["diff"] == pytest.approx(0.5)
    assert pooled["p_value"] == pytest.approx(stats.mcnemar(4, 0)) and pooled["gain"] == pooled["diff"]
    own = next(r for r in board.board["rows"] if r["name"] == "merged")["paired"]
    assert (pooled["n"], pooled["p_value"]) == (own["n"], own["p_value"])  # the leaderboard's own pooled test
    assert board.paired("merged", "base", ["my_cls"])["n"] == 4
    ppl = board.paired("merged", "base", task="python_code")
    assert (ppl["a"], ppl["b"], ppl["task"], ppl["kind"], ppl["test"]) == (
        "merged", "base", "python_code", "corpus", "sign_flip_corpus")
    assert ppl["mean_a"] == pytest.approx(_ppl(4.0)) and ppl["mean_b"] == pytest.approx(_ppl(0.0))
    assert ppl["diff"] < 0 and ppl["gain"] == pytest.approx(-ppl["diff"]) and ppl["higher_is_better"] is False
    row = next(r for r in board.board["rows"] if r["name"] == "merged")["tasks"]["python_code"]["paired"]
    assert ppl["p_value"] == row["p_value"]  # the leaderboard's own test of the task
    acc = board.paired("merged", "base", task="my_cls")
    assert (acc["test"], acc["metric"], acc["a_only"]) == ("mcnemar", "acc", 2)
    for kw, message in [({"task": "my_bleu"}, "no per-example values"), ({"tasks": ["python_code"]}, "task=..."),
                        ({"task": "python_cod"}, "did you mean 'python_code'"),
                        ({"task": "addition", "tasks": ["addition"]}, "not both")]:
        with pytest.raises(wb.WorkbenchError, match=re.escape(message)):
            board.paired("merged", "base", **kw)
    # a board read from leaderboard.json alone answers its own tests against the reference, per task too
    read = wb.Leaderboard(board.board)
    got = read.paired("merged", "base", task="python_code")
    assert (got["test"], got["p_value"], got["kind"]) == ("sign_flip_corpus", ppl["p_value"], "corpus")
    assert read.paired("merged", "base")["tasks"] == ["addition", "my_cls"]


def test_review_fixes_pools_artifacts_and_boards(pool, pools, tiny_dir, tmp_path, monkeypatch, run_cli):
    """A pool opened by path stays that pool with a recipe file; an artifact evaluates over the pool it was built
    over here (its record names the first build's pool, which may be gone); Leaderboard.read writes nothing; a board
    read from leaderboard.json answers its own paired tests only; a bare pool name never means a same-named
    subfolder of the current folder."""
    import shutil

    import yaml

    import workbench as wb
    from conftest import snapshot

    quiet = lambda *a: None  # noqa: E731
    add_two_experts(pool, tiny_dir)
    other = wb.Pool.create(tmp_path / "elsewhere" / "demo", base=str(tiny_dir / "base"))
    other.add(tiny_dir / "lora_a", "x")
    other.add(tiny_dir / "lora_b", "y")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "method": "task_arithmetic", "pool": "demo"}))
    assert wb.plan(other, recipe).resolved.pool.root == other.root
    assert wb.plan(recipe).resolved.pool.root == pool.root
    assert wb.plan(pool, "task_arithmetic", experts="addition").describe()["experts"] == ["addition"]
    with pytest.raises(wb.WorkbenchError, match="takes the plan as it is"):
        wb.build(wb.plan(recipe), density=0.5)

    # the same pool in another checkout: built there first, then that checkout is gone
    monkeypatch.setenv("WORKBENCH_POOLS", str(tmp_path / "elsewhere"))
    first = wb.build("demo", "task_arithmetic", output={"kind": "lora", "rank": 2}, log=quiet)
    shutil.copytree(other.root, tmp_path / "moved" / "demo")
    shutil.rmtree(other.root)
    monkeypatch.setenv("WORKBENCH_POOLS", str(tmp_path / "moved"))
    again = wb.build("demo", "task_arithmetic", output={"kind": "lora", "rank": 2}, log=quiet)
    assert again.key == first.key and "elsewhere" in again.meta["pool"]  # reused: its record names the gone pool
    res = wb.evaluate(again, ["addition"], limit=1, batch_size=1, results_dir=tmp_path / "res")
    assert set(res.scores) == {"addition"}

    monkeypatch.setenv("WORKBENCH_POOLS", str(pools))
    doc = {"name": "rv", "pool": "demo", "tasks": ["addition"], "eval": {"limit": 2, "batch_size": 2},
           "reference": "base", "entries": ["base", "addition", "sorting"]}
    wb.compare(doc, results_dir=tmp_path / "res", progress=False, log=quiet)
    before = snapshot(tmp_path / "res")
    read = wb.Leaderboard.read(doc, results_dir=tmp_path / "res")
    assert snapshot(tmp_path / "res") == before  # a read writes nothing
    assert read.paired("addition", "sorting")["n"] == 2
    board = wb.leaderboards("demo", tmp_path / "res")[0]
    own = next(r for r in board.board["rows"] if r["name"] == "addition")["paired"]
    assert board.paired("addition", "base")["p_value"] == own["p_value"]
    with pytest.raises(wb.WorkbenchError, match="Leaderboard.read"):
        board.paired("addition", "sorting")

    (tmp_path / "cwd" / "demo").mkdir(parents=True)  # a folder named like the pool, without a manifest
    monkeypatch.chdir(tmp_path / "cwd")
    code, out, err = run_cli("pool", "list")
    assert code == 0 and "demo" in out, err
    assert wb.Pool.open("demo").root == pool.root


def test_cli_review_fixes(run_cli, pools, tiny_dir, pool, tmp_path):
    import yaml

    add_two_experts(pool, tiny_dir)
    code, _out, err = run_cli("train", "lora", "--pool", "demo", "--task", "held_in")
    assert code == 2 and "one task" in err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "method": "task_arithmetic", "pool": "demo",
                                      "sweep": {"parameters": {"lambda": [0.5, 1.0]}}}))
    code, out, err = run_cli("merge", str(recipe), "--dry-run", "--limit", "3")
    assert code == 0 and json.loads(out)["recipe"] == "r@limit3"  # its sweep record never overwrites r's own
    code, out, err = run_cli("merge", str(recipe), "--dry-run")
    assert json.loads(out)["recipe"] == "r"


def test_norm_column_and_no_empty_group_in_the_demo_table(run_cli):
    code, out, err = run_cli("results", "table", "--results-dir", str(ROOT / "results"), "--comparison", "demo")
    assert code == 0, err
    header = next(line for line in out.splitlines() if "┃ model" in line)
    assert "norm %" in header and "held-in %" in header and "held-out" not in header  # demo.yaml: held-in tasks


@pytest.mark.integration
def test_demo_as_shipped_says_it_rederived_the_leaderboard(run_cli, tmp_path, monkeypatch):
    """`workbench demo` on the committed cells (copied): nothing to compute, and it says so and how to recompute."""
    import shutil

    shutil.copytree(ROOT / "results" / "compare" / "demo", tmp_path / "compare" / "demo")
    monkeypatch.setenv("WORKBENCH_RESULTS", str(tmp_path))
    monkeypatch.delenv("WORKBENCH_POOLS", raising=False)
    code, out, err = run_cli("demo")
    assert code == 0, err
    text = " ".join(out.split())
    assert re.search(r"All \d+ cells \(builds and evaluations\) were already recorded", text), text
    assert "re-derived" in text and "To recompute it, delete" in text
    assert "twin" in text and "norm %" in text
