import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# Without a GPU, Triton kernels run in its interpreter on CPU tensors (must be set before import).
if not _cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from workbench.testing import make_tiny_base, make_tiny_full, make_tiny_lora


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """One cache (base models, task suite) per test session; $WORKBENCH_TEST_CACHE reuses one."""
    path = os.environ.get("WORKBENCH_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_CACHE", path)
    yield Path(path)
    mp.undo()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny base, two LoRA experts and one full expert, built once per session."""
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_base(d / "base", seed=0)
    make_tiny_lora(d / "base", d / "lora_a", seed=1, r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    make_tiny_lora(d / "base", d / "lora_b", seed=2, r=2, alpha=4, target_modules=("q_proj", "o_proj", "up_proj"))
    make_tiny_full(d / "base", d / "full_c", seed=3)
    return d


@pytest.fixture()
def pools(tmp_path, monkeypatch) -> Path:
    """An isolated adapters/ folder and cache for one test."""
    monkeypatch.setenv("WORKBENCH_POOLS", str(tmp_path / "adapters"))
    return tmp_path / "adapters"


@pytest.fixture()
def pool(pools, tiny_dir):
    from workbench.pool import Pool

    return Pool.create("demo", base=str(tiny_dir / "base"))


def quiet(*a):
    """A `log` that prints nothing."""
    return None


def one_line(excinfo, longest: int = 300) -> str:
    """The message of a raised error, checked to be one short line."""
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < longest, f"{len(msg)} chars: {msg[:300]}"
    return msg


@pytest.fixture()
def arts(tmp_path, monkeypatch):
    """An isolated artifacts folder for one test."""
    monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path / "artifacts"))
    return tmp_path / "artifacts"


MIXED_LLS = [-40.0, -90.0, -25.0, -60.0]  # per-document log-likelihoods of a perplexity corpus
MIXED_WORDS = [10.0, 20.0, 5.0, 15.0]  # and their words


def mixed_metric_cells(merged_acc=(1, 1, 1, 1)):
    """(tasks, rows, cells) of rows base and merged on an exact-match task, an `acc` task (merged's values given), a
    perplexity corpus (merged 4 nats better a document) and a corpus-BLEU task (no per-example values)."""
    tasks = ["addition", "my_cls", "python_code", "my_bleu"]
    rows = [{"name": n, "method": "m", "expert_task": None} for n in ("base", "merged")]
    cells = {}
    for name, em, acc, shift, bleu in (("base", [1, 0, 0, 0], [1, 0, 1, 0], 0.0, 20.0),
                                       ("merged", [1, 1, 0, 1], list(merged_acc), 4.0, 30.0)):
        cells[(name, "addition")] = {"metric": "exact_match", "higher_is_better": True, "aggregate": "mean",
                                     "doc_ids": [0, 1, 2, 3], "values": [float(v) for v in em], "n": 4}
        cells[(name, "my_cls")] = {"metric": "acc", "higher_is_better": True, "aggregate": "mean",
                                   "doc_ids": [0, 1, 2, 3], "values": [float(v) for v in acc], "n": 4}
        cells[(name, "python_code")] = {"metric": "word_perplexity", "higher_is_better": False,
                                        "aggregate": "perplexity", "doc_ids": [0, 1, 2, 3],
                                        "values": [x + shift for x in MIXED_LLS], "weights": MIXED_WORDS, "n": 4}
        cells[(name, "my_bleu")] = {"metric": "bleu", "higher_is_better": True, "aggregate": "none", "score": bleu,
                                    "doc_ids": [], "values": [], "n": 4}
    return tasks, rows, cells


def suite_data(*tasks: str):
    """The data records of suite tasks (what `--task NAME` trains on), for experts added in tests."""
    from workbench.data import suite_record

    return [_suite_records.setdefault(t, suite_record(t)) for t in tasks]


_suite_records: dict = {}


def add_two_experts(pool, tiny_dir):
    """The tiny LoRA experts as `addition` and `sorting` (tagged with their tasks)."""
    pool.add(tiny_dir / "lora_a", "addition", tags={"task": "addition"}, data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "sorting", tags={"task": "sorting"}, data=suite_data("sorting"))
    return pool


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: 'nothing on disk changed' means equal snapshots."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def run_cli(monkeypatch, capsys):
    """Run `workbench ARGS` in-process through main(); returns (exit code, stdout, stderr)."""
    from workbench import cli

    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["workbench", *args])
        code = 0
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def app_world(tmp_path_factory, tiny_dir, session_cache):
    """A results folder the workbench itself made on the tiny model, for the app's tests: a comparison (base, two
    LoRA experts, task arithmetic, Arrow) with real lm-eval outputs, two more runs of one expert at other
    settings, a validation sweep, a routing benchmark and a routing trace. Returns the env that points at it."""
    from workbench.io import atomic_write_json

    root = tmp_path_factory.mktemp("appworld")
    env = {"WORKBENCH_POOLS": str(root / "adapters"), "WORKBENCH_RESULTS": str(root / "results"),
           "WORKBENCH_CACHE_ARTIFACTS": str(root / "artifacts")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        from workbench.comparison import parse_comparison
        from workbench.eval.harness import run_eval
        from workbench.jobs import run_comparison
        from workbench.pool import Pool
        from workbench.recipes import build, parse_recipe, run_recipe

        pool = Pool.create("demo", base=str(tiny_dir / "base"))
        pool.add(tiny_dir / "lora_a", "addition", tags={"task": "addition"}, data=suite_data("addition"))
        pool.add(tiny_dir / "lora_b", "sorting", tags={"task": "sorting"}, data=suite_data("sorting"))
        results = root / "results"
        quiet = lambda *a: None  # noqa: E731
        comparison = {"name": "small", "pool": "demo", "tasks": ["addition", "sorting"],
                      "eval": {"limit": 4, "batch_size": 8}, "reference": "base",
                      "entries": ["base", "addition", "sorting",
                                  {"name": "ta", "method": "task_arithmetic", "experts": ["addition", "sorting"],
                                   "parameters": {"lambda": 0.5}},
                                  {"name": "arrow", "method": "arrow", "experts": ["addition", "sorting"],
                                   "parameters": {"k": 1}}]}
        run_comparison(parse_comparison(comparison, "small.yaml"), results_dir=results, log=quiet)
        from workbench.jobs import make_plan, merge_count_curve

        merge_count_curve(make_plan(parse_comparison(comparison, "small.yaml"), results))
        for limit in (2, 3):  # one model, runs at two settings: the app must say which one a row shows
            run_eval("addition", ["addition", "sorting"], pool=pool, limit=limit, batch_size=8,
                     results_dir=results / "lm-eval")
        run_recipe({"name": "sw", "pool": "demo", "method": "task_arithmetic", "experts": ["addition", "sorting"],
                    "sweep": {"parameters": {"lambda": [0.5, 1.0]}, "tasks": ["addition"], "limit": 2,
                              "batch_size": 8}}, results_dir=results, log=quiet)
        from workbench.bench import routing

        routing.run(str(tiny_dir / "base"), experts=2, rank=2, k=1, seqs=2, tokens=8, new_tokens=2, reps=1,
                    out_file=results / "bench" / "routing-tiny.json", log=quiet)
        from workbench.artifacts import load_artifact
        from workbench.methods.routing import trace_prompt

        arrow = parse_recipe({"name": "arrow", "pool": "demo", "method": "arrow", "experts": ["addition", "sorting"],
                              "parameters": {"k": 1}})
        loaded = load_artifact(build(arrow, log=quiet))
        atomic_write_json(results / "traces" / "arrow.json",
                          {"recipe": "arrow", "pool": "demo", **trace_prompt(loaded.model, loaded.tokenizer, "12+30=")})
    return env | {"root": str(root)}


def stream_pieces(url: str, path: str, body: dict) -> tuple[list[str], str | None]:
    """POST `body` with `stream: true` to a served `path`: each SSE chunk's text (completions' `text`, chat's
    `delta.content`) and the last finish_reason sent."""
    import httpx

    pieces, finish = [], None
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["text"] if "text" in choice else choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    return pieces, finish
