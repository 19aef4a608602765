"""A second pool made entirely from a user's files, end to end on the tiny model, through the CLI as a user runs it:
three datasets with their own field names, three LoRA experts trained on them, one imported adapter given --data,
a folder of the user's lm-eval task YAMLs (generation scored by exact match, multiple choice by accuracy, rolling
perplexity), then `workbench compare` over base, experts, TIES, Twin, PHATGOOSE and MoLE: every metric in the
leaderboard with its direction, standard error and paired test, and the app's Leaderboard view showing it."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

TASKS = """\
task: shout
dataset_path: json
dataset_kwargs: {data_files: {test: DIR/shout_test.jsonl}}
test_split: test
output_type: generate_until
doc_to_text: "{{say}}"
doc_to_target: "{{yell}}"
generation_kwargs: {until: ["\\n"], do_sample: false, max_gen_toks: 6}
filter_list:
  - name: strip
    filter: [{function: remove_whitespace}, {function: take_first}]
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
---
task: parity
dataset_path: json
dataset_kwargs: {data_files: {test: DIR/parity_test.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{statement}}"
doc_to_choice: ["even", "odd"]
doc_to_target: label
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
---
task: notes
dataset_path: json
dataset_kwargs: {data_files: {test: DIR/notes_test.jsonl}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{body}}"
metric_list:
  - {metric: word_perplexity}
  - {metric: bits_per_byte}
"""


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_user_files(root: Path) -> dict[str, Path]:
    """What a user brings: data files with their own field names, test files and task YAMLs, no suite names."""
    rng = random.Random(3)
    data, tasks = root / "data", root / "tasks"
    data.mkdir(parents=True)
    tasks.mkdir()
    words = list(dict.fromkeys("".join(rng.choice("kalomineus") for _ in range(4)) for _ in range(400)))
    _jsonl(data / "shout.jsonl", [{"say": f"Shout: {w}\nLoud:", "yell": w.upper()} for w in words[:40]])
    _jsonl(tasks / "shout_test.jsonl", [{"say": f"Shout: {w}\nLoud:", "yell": w.upper()} for w in words[40:52]])
    nums = rng.sample(range(100, 1000), 60)
    with open(data / "parity.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["statement", "verdict"])
        w.writerows([f"Number: {n}\nEven or odd?", "even" if n % 2 == 0 else "odd"] for n in nums[:40])
    _jsonl(tasks / "parity_test.jsonl", [{"statement": f"Number: {n}\nEven or odd?", "label": n % 2} for n in nums[40:52]])
    note = lambda: f"{rng.choice(words).title()} moved the {rng.choice(words)} review to {rng.randint(8, 17)}:00."  # noqa: E731
    _jsonl(data / "notes.jsonl", [{"body": " ".join(note() for _ in range(2))} for _ in range(30)])
    _jsonl(tasks / "notes_test.jsonl", [{"body": " ".join(note() for _ in range(2))} for _ in range(8)])
    _jsonl(data / "initials.jsonl", [{"person": f"Initials of {a.title()} {b.title()}:", "letters": f"{a[0].upper()}."
                                      f"{b[0].upper()}."} for a, b in zip(words[:30], words[30:60])])
    for doc in TASKS.replace("DIR", str(tasks)).split("---\n"):
        name = doc.split("\n", 1)[0].split(": ")[1]
        (tasks / f"{name}.yaml").write_text(doc)
    return {"data": data, "tasks": tasks}


COMPARISON = """\
name: own-pool
pool: mine
tasks: [shout, parity, notes]
include_path: [tasks]
eval: {limit: 8, batch_size: 8}
reference: base
experts: [shout, parity, notes, initials]
entries:
  - base
  - experts
  - {name: ties, method: ties, parameters: {density: 0.5, lambda: 1.0}}
  - {name: twin, method: twin, parameters: {rank: 2, router_examples: 16, router_epochs: 2, batch_size: 8}}
  - {name: phatgoose, method: phatgoose, parameters: {k: 2, steps: 4, examples: 8, batch_size: 4}}
  - {name: mole, method: mole, parameters: {steps: 4, examples: 8, batch_size: 4, warmup: 1}}
"""


@pytest.fixture(scope="module")
def own_world(tmp_path_factory, tiny_dir, session_cache):
    """The whole walkthrough on the tiny model, through the CLI, in an empty folder (module-scoped: ~1 min)."""
    import os

    from typer.testing import CliRunner

    from workbench.cli import app

    root = tmp_path_factory.mktemp("own")
    files = make_user_files(root)
    env = {"WORKBENCH_POOLS": str(root / "adapters"), "WORKBENCH_RESULTS": str(root / "results"),
           "WORKBENCH_CACHE_ARTIFACTS": str(root / "artifacts")}
    runner = CliRunner()
    old_cwd = Path.cwd()
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    os.chdir(root)
    outputs = {}

    def cli(*args):
        res = runner.invoke(app, list(args), catch_exceptions=False)
        assert res.exit_code == 0, (args, res.output)
        outputs[args[:2]] = res.output
        return res.output

    try:
        base = str(tiny_dir / "base")
        train = ["--steps", "6", "--batch-size", "4", "--r", "2", "--lr", "0.01"]
        cli("pool", "create", "mine", "--base", base)
        cli("train", "lora", "--pool", "mine", "--data", "data/shout.jsonl", "--prompt-field", "say",
            "--answer-field", "yell", *train)
        cli("train", "lora", "--pool", "mine", "--data", "data/parity.csv", "--prompt-field", "statement",
            "--answer-field", "verdict", *train)
        cli("train", "lora", "--pool", "mine", "--data", "data/notes.jsonl", "--text-field", "body", *train)
        cli("pool", "add", "mine", str(tiny_dir / "lora_a"), "--name", "initials", "--data", "data/initials.jsonl",
            "--prompt-field", "person", "--answer-field", "letters")
        cli("pool", "verify", "mine")
        (root / "mine.yaml").write_text(COMPARISON)
        cli("compare", "mine.yaml")
    finally:
        os.chdir(old_cwd)
        mp.undo()
    return {"root": root, "env": env, "files": files, "outputs": outputs}


def test_experts_remember_the_users_data(own_world):
    manifest = json.loads((own_world["root"] / "adapters" / "mine" / "pool.json").read_text())
    by = {e["name"]: e for e in manifest["experts"]}
    assert list(by) == ["shout", "parity", "notes", "initials"]
    shout = by["shout"]["data"][0]
    assert (shout["format"], shout["prompt_field"], shout["answer_field"], shout["rows"]) == ("json", "say", "yell", 40)
    assert by["parity"]["data"][0]["format"] == "csv" and by["notes"]["data"][0]["text_field"] == "body"
    assert by["initials"]["data"][0]["prompt_field"] == "person" and by["shout"]["tags"] == {"task": "shout"}
    assert all(len(e["data"][0]["sha256"]) == 64 for e in by.values())
    assert "suite" not in json.dumps(manifest)


def test_leaderboard_has_every_metric_with_direction_se_and_paired_test(own_world):
    out = own_world["root"] / "results" / "compare" / "own-pool"
    board = json.loads((out / "leaderboard.json").read_text())
    names = {r["name"] for r in board["rows"]}
    assert names == {"base", "shout", "parity", "notes", "initials", "ties", "twin", "phatgoose", "mole"}
    tm = board["task_metrics"]
    assert (tm["shout"]["metric"], tm["shout"]["higher_is_better"], tm["shout"]["kind"]) == ("exact_match", True, "accuracy")
    assert (tm["parity"]["metric"], tm["parity"]["higher_is_better"], tm["parity"]["kind"]) == ("acc", True, "accuracy")
    assert (tm["notes"]["metric"], tm["notes"]["higher_is_better"], tm["notes"]["kind"]) == ("word_perplexity", False,
                                                                                            "corpus")
    for r in board["rows"]:
        for t in ("shout", "parity", "notes"):
            c = r["tasks"][t]
            assert c["n"] == 8 and c["stderr"] == c["stderr"], (r["name"], t)  # a number, not NaN
            if r["name"] != "base":
                p = c["paired"]
                assert p["n"] == 8 and 0 <= p["p_value"] <= 1, (r["name"], t, p)
                assert p["test"] == ("mcnemar" if t != "notes" else "sign_flip_corpus")
    ppl = {r["name"]: r["tasks"]["notes"]["mean"] for r in board["rows"]}
    assert all(v > 1 for v in ppl.values())  # a perplexity, not a percentage or a log-likelihood
    md = (out / "leaderboard.md").read_text()
    assert "↑" in md and "↓" in md and "lower is better" in md
    for f in ("leaderboard.csv", "leaderboard.svg", "plan.json"):
        assert (out / f).is_file()


def test_the_app_shows_the_users_leaderboard(own_world):
    from streamlit.testing.v1 import AppTest

    app = str(Path(__file__).resolve().parent.parent / "app" / "app.py")
    at = AppTest.from_file(app, default_timeout=120)
    at.run()
    at.sidebar.text_input(key="results_dir").set_value(str(own_world["root"] / "results")).run()
    at.sidebar.radio(key="view").set_value("Leaderboard").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="lb-source").value == "comparison: own-pool"
    df = at.dataframe[0].value.set_index("model")
    board = json.loads((own_world["root"] / "results" / "compare" / "own-pool" / "leaderboard.json").read_text())
    mole = next(r for r in board["rows"] if r["name"] == "mole")
    assert set(df.index) == {r["name"] for r in board["rows"]}
    cols = " ".join(df.columns)
    assert "shout" in cols and "parity" in cols and "notes" in cols
    ppl_col = next(c for c in df.columns if c.startswith("notes") and "perplexity" in c)
    assert df.loc["mole", ppl_col] == pytest.approx(mole["tasks"]["notes"]["mean"])
    labels = {c.get("label") for c in json.loads(at.dataframe[0].proto.columns).values()}
    assert any(lbl and lbl.startswith("notes") and lbl.endswith("↓") for lbl in labels)
    assert any(lbl and lbl.startswith("parity") and lbl.endswith("↑") for lbl in labels)
