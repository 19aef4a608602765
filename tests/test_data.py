"""Users' own training data: files read through `datasets`, experts that remember their data, methods that read it
from the manifest, and bad input in one line with nothing written."""

import json

import pytest
from conftest import one_line, snapshot, suite_data

from workbench.data import DataError, open_data, read_rows


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


QA = [{"q": f"What is {i} + 1?", "a": str(i + 1), "extra": i} for i in range(12)]


def test_files_of_every_format_read_with_their_own_fields(tmp_path):
    import datasets
    import pandas as pd

    j = _jsonl(tmp_path / "mine.jsonl", QA)
    rec, rows = open_data(str(j), prompt_field="q", answer_field="a")
    assert rows[3] == {"question": "What is 3 + 1?", "answer": "4"}
    assert (rec.name, rec.format, rec.prompt_field, rec.answer_field, rec.rows) == ("mine", "json", "q", "a", 12)
    assert rec.source == str(j.resolve()) and len(rec.sha256) == 64
    df = pd.DataFrame({"input": [r["q"] for r in QA], "output": [r["a"] for r in QA]})
    df.to_csv(tmp_path / "mine.csv", index=False)
    df.to_parquet(tmp_path / "mine.parquet")
    datasets.Dataset.from_pandas(df).save_to_disk(str(tmp_path / "saved"))
    for spec, fmt in (("mine.csv", "csv"), ("mine.parquet", "parquet"), ("saved", "disk")):
        rec2, rows2 = open_data(str(tmp_path / spec))  # fields found by their usual names
        assert (rec2.format, rec2.prompt_field, rec2.answer_field) == (fmt, "input", "output"), spec
        assert [(r["question"], r["answer"]) for r in rows2] == [(r["question"], r["answer"]) for r in rows]
    # a relative record inside the pool's folder
    rec3, _ = open_data(str(j), prompt_field="q", answer_field="a", pool_root=tmp_path)
    assert rec3.source == "mine.jsonl"
    assert read_rows(rec3, pool_root=tmp_path) == rows


def test_chat_column_rendered_by_the_chat_template(tmp_path, tiny_dir):
    from workbench.base import BaseModel

    tok = BaseModel(tiny_dir / "base").tokenizer()
    chats = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Double {i}"},
                           {"role": "assistant", "content": str(2 * i)}]} for i in range(5)]
    rec, rows = open_data(str(_jsonl(tmp_path / "chat.jsonl", chats)), tokenizer=tok)
    assert rec.messages_field == "messages" and rec.prompt_field is None
    assert rows[2] == {"question": "[system] Be brief.\n[user] Double 2\n[assistant] ", "answer": "4", "delimiter": ""}
    from workbench.train.trainer import encode_row

    ids, labels = encode_row(tok, rows[2], 128)
    answer = [t for t in labels if t != -100]
    # the loss on the answer only, with no " " delimiter added: the template's trailing space moves to the answer, as
    # lm-eval's HFLM cuts a context ending in whitespace
    assert tok.decode(answer) == " 4" + tok.eos_token


@pytest.mark.parametrize(("make", "kwargs", "message"), [
    (lambda d: _jsonl(d / "x.jsonl", QA), {"prompt_field": "question", "answer_field": "a"},
     r"data .*x\.jsonl has no prompt field 'question'; its columns: q, a, extra"),
    (lambda d: _jsonl(d / "x.jsonl", QA), {"prompt_field": "qq", "answer_field": "a"}, r"did you mean 'q'\?"),
    (lambda d: _jsonl(d / "x.jsonl", QA), {}, r"has no prompt field \(looked for prompt, question, .*name one with "
                                              r"--prompt-field"),
    (lambda d: (d / "x.jsonl").write_text("") and None or d / "x.jsonl", {}, r"x\.jsonl is empty \(0 rows\)"),
    (lambda d: (d / "x.csv").write_text("prompt,answer\n") and None or d / "x.csv", {}, r"is empty \(0 rows\)"),
    (lambda d: _jsonl(d / "x.jsonl", [{"messages": "hello"}]), {}, r"row 0: column 'messages' is not a list of at "
                                                                   r"least two \{role, content\} messages \(got str\)"),
    (lambda d: _jsonl(d / "x.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "user", "content": "again"}]}]), {},
     r"the last message of column 'messages' is 'user', not 'assistant'"),
    (lambda d: d / "absent.jsonl", {}, r"data file .*absent\.jsonl does not exist"),
    (lambda d: (d / "x.txt").write_text("hi") and None or d / "x.txt", {}, r"unknown format '\.txt'"),
    (lambda d: (d / "x.jsonl").write_text("{not json\n") and None or d / "x.jsonl", {}, r"cannot read it as json"),
    (lambda d: "someorg/somedata", {}, r"is a hub id that is not in the local datasets cache, and this machine is offline"),
])
def test_bad_data_is_one_line(tmp_path, tiny_dir, monkeypatch, make, kwargs, message):
    from workbench.base import BaseModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = make(tmp_path)
    with pytest.raises(DataError, match=message) as e:
        open_data(str(spec), tokenizer=BaseModel(tiny_dir / "base").tokenizer(), **kwargs)
    one_line(e)


def test_trained_expert_records_its_data_and_methods_read_it(pool, tiny_dir, tmp_path, monkeypatch, arts):
    """Train two experts from the user's files (fields named by the user); their manifest entries record spec,
    fields, hash and size; PHATGOOSE's gates learn from exactly those rows; a changed file is refused in one line
    with nothing written; recording the new data changes the artifact key."""
    import workbench
    from workbench.methods import phatgoose
    from workbench.recipes import build, parse_recipe

    a = _jsonl(tmp_path / "plus.jsonl", [{"ask": f"{i}+1=", "say": str(i + 1)} for i in range(20)])
    b = _jsonl(tmp_path / "rev.jsonl", [{"ask": f"rev {w}", "say": w[::-1]} for w in ("abc", "hello", "tiny", "data")])
    for name, f in (("plus", a), ("rev", b)):
        e = workbench.train_expert(pool, name, data=str(f), prompt_field="ask", answer_field="say", steps=2,
                                   batch_size=2, warmup=0, r=2)
        assert [r.name for r in e.data()] == [name] and e.entry.tags == {"task": name}
    entry = json.loads((pool.root / "pool.json").read_text())["experts"][0]
    assert entry["data"][0]["prompt_field"] == "ask" and entry["data"][0]["rows"] == 20
    seen = []
    real = phatgoose.expert_examples

    def spy(expert, tok, n, seed, max_length):
        out = real(expert, tok, n, seed, max_length)
        seen.append((expert.name, len(out)))
        return out

    monkeypatch.setattr(phatgoose, "expert_examples", spy)
    recipe = {"name": "pg", "pool": str(pool.root), "method": "phatgoose", "experts": ["plus", "rev"],
              "parameters": {"steps": 2, "examples": 8, "k": 1}}
    first = parse_recipe(recipe)
    build(first, log=lambda *x: None)
    assert seen == [("plus", 8), ("rev", 4)]  # each expert's own rows (rev has 4)
    # the file changes under the recorded expert: refused, one line, nothing written
    b.write_text(b.read_text() + json.dumps({"ask": "rev new", "say": "wen"}) + "\n")
    before = snapshot(arts), snapshot(pool.root)
    with pytest.raises(workbench.WorkbenchError, match=r"expert 'rev''s data .*rev\.jsonl changed since it was "
                                                       r"recorded .*`workbench pool data`") as e:
        build(parse_recipe(recipe), log=lambda *x: None)
    one_line(e, 400)
    assert (snapshot(arts), snapshot(pool.root)) == before
    workbench.attach_data(pool, "rev", str(b), prompt_field="ask", answer_field="say")
    second = parse_recipe(recipe)
    assert second.key != first.key  # the stale artifact is not reused
    seen.clear()
    build(second, log=lambda *x: None)
    assert ("rev", 5) in seen


def test_method_over_an_expert_without_data_names_the_fix(pool, tiny_dir):
    from workbench.errors import RecipeError
    from workbench.recipes import parse_recipe

    pool.add(tiny_dir / "lora_a", "a", data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "imported")
    for method in ("phatgoose", "twin", "mole", "smora", "avg_act"):
        with pytest.raises(RecipeError, match=rf"{method}: expert 'imported' of pool 'demo' has no recorded training "
                                              r"data .*`workbench pool data demo imported --data FILE`") as e:
            parse_recipe({"name": "r", "pool": str(pool.root), "method": method, "experts": ["a", "imported"]})
        one_line(e, 400)
    # merges that read weights only do not need data
    parse_recipe({"name": "r", "pool": str(pool.root), "method": "ties", "experts": ["a", "imported"]})


def test_pool_add_in_one_go_with_data(run_cli, pools, tiny_dir, tmp_path):
    run_cli("pool", "create", "mine", "--base", str(tiny_dir / "base"))
    d = tmp_path / "adapters-in"
    import shutil

    for n in ("lora_a", "lora_b", "full_c"):
        shutil.copytree(tiny_dir / n, d / n)
    code, out, err = run_cli("pool", "add", "mine", str(d / "lora_a"), str(d / "lora_b"), str(d / "full_c"))
    assert code == 0, err
    from workbench import Pool

    assert Pool.open("mine").names() == ["lora_a", "lora_b", "full_c"]
    f = _jsonl(tmp_path / "d.jsonl", QA)
    code, out, err = run_cli("pool", "add", "mine", str(tiny_dir / "lora_a"), "--name", "imp", "--data", str(f),
                             "--prompt-field", "q", "--answer-field", "a")
    assert code == 0, err
    assert "data:" in out and Pool.open("mine").expert("imp").data()[0].rows == 12
    code, out, err = run_cli("pool", "data", "mine", "imp")
    assert code == 0 and "'q' -> 'a', 12 rows" in out
    # bad input adds nothing: a clash among many, --data over several folders, a missing field
    before = snapshot(pools)
    for args, message in [
        (("pool", "add", "mine", str(d / "lora_a"), str(tiny_dir / "lora_b")), "already has an expert named 'lora_a'"),
        (("pool", "add", "mine", str(tiny_dir / "lora_a"), str(d / "lora_a")), "two folders are both named 'lora_a'"),
        (("pool", "add", "mine", str(tiny_dir / "lora_a"), "--name", "x", "--data", str(f)), "has no prompt field"),
        (("pool", "add", "mine", str(tiny_dir / "lora_a"), str(tiny_dir / "lora_b"), "--data", str(f)),
         "--data records one expert's data; 2 folders were given"),
        (("pool", "data", "mine", "imp", "--data", str(tmp_path / "nope.jsonl")), "does not exist"),
        (("train", "lora", "--pool", "mine"), "no training data: give --data FILE"),
    ]:
        code, out, err = run_cli(*args)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, err)
    assert snapshot(pools) == before


def test_not_built_experts_are_a_state_a_broken_one_a_problem(run_cli, pools, tiny_dir):
    from workbench import Pool

    run_cli("pool", "create", "p", "--base", str(tiny_dir / "base"))
    p = Pool.open("p")
    p.add(tiny_dir / "lora_a", "shipped")
    p.add(tiny_dir / "full_c", "unshipped")
    with p._locked():
        p._put(p.expert("unshipped").entry.model_copy(update={"rebuild": "workbench demo --full"}))
    import shutil

    shutil.rmtree(p.expert("unshipped").path)
    code, out, err = run_cli("pool", "verify", "p")
    assert code == 0, err
    assert "unshipped: not built (`workbench demo --full`)" in out and "1 experts verified, 1 not built" in out
    code, out, _ = run_cli("pool", "list")
    assert "│ 1         │ -" in out  # not built: 1, missing files: none
    # the user's own expert losing a file is a problem
    (p.expert("shipped").path / "adapter_model.safetensors").unlink()
    code, out, err = run_cli("pool", "verify", "p")
    assert code == 1 and "shipped: missing file" in err


def test_records_move_with_the_project_and_fields_are_part_of_the_identity(tmp_path, tiny_dir, monkeypatch):
    """Data beside the pools folder is recorded relative to the pool (the project moves as one); the same file
    read with other fields is other data (another identity: artifact keys change); two files of one name get
    their folders' names; CSV cells stay text as written."""
    import shutil

    import workbench
    from workbench.pool import Pool

    proj = tmp_path / "proj"
    (proj / "data" / "en").mkdir(parents=True)
    (proj / "data" / "fr").mkdir()
    monkeypatch.setenv("WORKBENCH_POOLS", str(proj / "adapters"))
    pool = Pool.create("p", base=str(tiny_dir / "base"))
    par = [{"en": f"one {i}", "fr": f"un {i}"} for i in range(6)]
    _jsonl(proj / "data" / "en" / "train.jsonl", par)
    _jsonl(proj / "data" / "fr" / "train.jsonl", [{"en": r["fr"], "fr": r["en"]} for r in par])
    (proj / "data" / "nums.csv").write_text("prompt,answer\nq,042\nr,True\ns,NA\n")
    recs = workbench.training_data(pool, None, [str(proj / "data" / "en" / "train.jsonl"),
                                                str(proj / "data" / "fr" / "train.jsonl")],
                                   prompt_field="en", answer_field="fr")
    assert [r.name for r, _ in recs] == ["en-train", "fr-train"]
    assert recs[0][0].source == "../../data/en/train.jsonl"
    (rec, rows), = workbench.training_data(pool, None, str(proj / "data" / "nums.csv"))
    assert [r["answer"] for r in rows] == ["042", "True", "NA"]
    pool.add(tiny_dir / "lora_a", "a", data=[recs[0][0]])
    reverse, = workbench.training_data(pool, None, str(proj / "data" / "en" / "train.jsonl"), prompt_field="fr",
                                       answer_field="en")
    assert reverse[0].sha256 == recs[0][0].sha256 and reverse[0].identity != recs[0][0].identity
    # the whole project moved: the record still reads
    shutil.move(str(proj), str(tmp_path / "moved"))
    monkeypatch.setenv("WORKBENCH_POOLS", str(tmp_path / "moved" / "adapters"))
    moved = Pool.open("p")
    assert moved.verify() == [] and moved.expert("a").rows()[0] == {"question": "one 0", "answer": "un 0"}


def test_a_legacy_expert_is_told_its_suite_spec(pool, tiny_dir):
    from workbench.errors import RecipeError
    from workbench.recipes import parse_recipe

    pool.add(tiny_dir / "lora_a", "a", data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "old", training={"tasks": ["sorting"]})  # trained before data was recorded
    with pytest.raises(RecipeError, match=r"`workbench pool data demo old --data suite:sorting`"):
        parse_recipe({"name": "r", "pool": str(pool.root), "method": "twin", "experts": ["a", "old"]})


def test_chat_trained_experts_are_evaluated_through_the_chat_template(pool, tmp_path, tiny_dir):
    """`apply_chat_template` renders each prompt with the tokenizer's template (as a chat column trains); off, the
    prompt is the task's text and a comparison's cell keys are those of before the option existed."""
    from workbench.comparison import parse_comparison
    from workbench.eval.harness import run_eval
    from workbench.eval.record import read_samples

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _jsonl(tasks / "dbl.jsonl", [{"q": f"Double {i}", "a": str(2 * i)} for i in range(4)])
    (tasks / "dbl.yaml").write_text(
        f"task: dbl\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {tasks / 'dbl.jsonl'}}}}}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs: {until: ['\\n'], do_sample: false, max_gen_toks: 3}\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n")
    prompts = {}
    for chat in (False, True):
        m = run_eval("base", ["dbl"], pool=pool, include_path=[tasks], results_dir=tmp_path / f"r{chat}",
                     apply_chat_template=chat, batch_size=4)
        folder = tmp_path / f"r{chat}" / m["results_file"].split("/")[-2]
        prompts[chat] = read_samples(folder / f"run_{m['run_id']}.json")[0]["question"]
        assert m.get("apply_chat_template", False) is chat
    assert prompts[False] == "Double 0" and prompts[True] == "[user] Double 0\n[assistant] "
    doc = {"name": "c", "pool": str(pool.root), "tasks": ["dbl"], "include_path": [str(tasks)],
           "entries": ["base"], "eval": {"limit": 2}}
    off = parse_comparison(doc).settings()
    assert off == {"eval": {"limit": 2, "batch_size": 32, "split": "test"}}  # as before the option existed
    on = parse_comparison({**doc, "eval": {"limit": 2, "apply_chat_template": True}}).settings()
    assert on["eval"]["apply_chat_template"] is True


def test_peft_model_of_the_whole_pool_leaves_an_unbuilt_lora_out_and_a_named_one_is_one_line(pools, tiny_dir):
    """A fresh clone's demo pool lists a LoRA whose weights are not shipped (multitask-r64): `peft_model()` loads
    the LoRAs that are on disk; naming the unbuilt one says how to build it."""
    import shutil

    from workbench import Pool
    from workbench.errors import PoolError

    p = Pool.create("p", base=str(tiny_dir / "base"))
    p.add(tiny_dir / "lora_a", "a")
    p.add(tiny_dir / "lora_b", "unshipped")
    with p._locked():
        p._put(p.expert("unshipped").entry.model_copy(update={"rebuild": "workbench demo --full"}))
    shutil.rmtree(p.expert("unshipped").path)
    p = Pool.open("p")
    pm = p.peft_model()
    assert set(pm.peft_config) == {"a"}
    with pytest.raises(PoolError, match=r"expert 'unshipped' not built \(`workbench demo --full`\)") as e:
        p.peft_model(["a", "unshipped"])
    one_line(e)
    p.remove("a")
    with pytest.raises(PoolError, match=r"pool 'p' has no LoRA expert on disk \(its LoRA experts are not built\)"):
        Pool.open("p").peft_model()
