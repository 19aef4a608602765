"""Training experts and evaluating them with lm-eval, on the tiny model; the results record."""

import gzip
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import snapshot, suite_data

from workbench.eval import results_table, run_eval
from workbench.eval.harness import load_model_spec
from workbench.eval.results import results_chart
from workbench.train import FullConfig, LoraConfigModel, train_expert
from workbench.train.trainer import encode


def _sources(*tasks):
    """(record, rows) of suite tasks, as `--task` reads them."""
    from workbench.data import open_data, suite_spec

    return [open_data(suite_spec(t)) for t in tasks]


@pytest.fixture()
def trained_pool(pool):
    # word_count: a skill the tiny model learns enough of in 40 steps to score above zero
    cfg = LoraConfigModel(steps=40, batch_size=8, r=4, alpha=8, lr=3e-2, warmup=2)
    train_expert(pool, "count", _sources("word_count"), cfg)
    return pool


def test_encode_masks_prompt(pool):
    tok = pool.base.tokenizer()
    ids, labels = encode(tok, "Add: 1+2\nAnswer:", "3", 128)
    n_q = len("Add: 1+2\nAnswer:")  # char-level tokenizer
    assert labels[:n_q] == [-100] * n_q
    assert tok.decode(ids[n_q:-1]) == " 3" and labels[-1] == tok.eos_token_id


def _bpe_tokenizer_with_bos(texts):
    """A Llama-like BPE (SentencePiece-style "▁" word starts, so " 104" alone is ["▁", "▁10", "4"] but
    "...Answer: 104" ends [..., "▁10", "4"]) whose default encoding prepends a BOS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_training_tokens_are_lm_evals_tokens_on_a_bpe_with_bos(monkeypatch):
    import lm_eval
    from transformers import LlamaForCausalLM

    from workbench.eval.harness import LoadedModel, evaluate
    from workbench.tasks import load_split
    from workbench.testing import tiny_llama_config

    rows = [r for t in ("addition", "sorting", "word_count") for r in load_split(t, "train")[:40]]
    tok = _bpe_tokenizer_with_bos([r["question"] + " " + r["answer"] for r in rows])
    assert tok(rows[0]["question"])["input_ids"][0] == tok.bos_token_id  # the tokenizer's default adds a BOS
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok)))
    seen = []  # the HFLM that evaluate() hands to lm-eval
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda model, **kw: seen.append(model) or {"results": {}})
    evaluate(LoadedModel(model, tok, "bpe"), ["addition"], limit=1, batch_size=1)
    lm = seen[0]
    boundary = 0
    for r in rows:
        ids, labels = encode(tok, r["question"], r["answer"], 128)
        n_q = labels.count(-100)
        ctx, cont = lm._encode_pair(r["question"], " " + r["answer"])  # how lm-eval scores question -> answer
        assert ids[:n_q] == ctx == lm.tok_encode(r["question"]), r
        assert lm.tok_batch_encode([r["question"]])[0][0].tolist() == ctx  # the generation context
        assert ids[n_q:] == cont + [tok.eos_token_id] and labels[n_q:] == ids[n_q:], r
        boundary += tok(" " + r["answer"], add_special_tokens=False)["input_ids"] != cont
    assert boundary == len(rows)  # every answer tokenizes differently alone than after its question


def test_lora_training_lands_in_pool(trained_pool):
    e = trained_pool.expert("count")
    meta = e.entry.training
    assert e.kind == "lora" and e.entry.tags == {"task": "word_count"}
    assert len(meta["loss_curve"]) == 40 and meta["steps"] == 40
    first, last = sum(meta["loss_curve"][:5]) / 5, sum(meta["loss_curve"][-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert e.data()[0].name == "word_count" and len(e.data()[0].sha256) == 64 and meta["wall_s"] > 0 and meta["tokens"] > 0
    assert e.entry.lora.r == 4 and e.entry.lora.modules == 2 * 7
    assert trained_pool.verify() == []
    # the adapter names its base by the pool's spec, never by this machine's cache path (pools may ship in git)
    spec = trained_pool.manifest.base.spec
    assert json.loads((e.path / "adapter_config.json").read_text())["base_model_name_or_path"] == spec


def _answer_loss(model, tok, rows):
    from workbench.train.trainer import collate

    batch = collate([encode(tok, r["question"], r["answer"], 128) for r in rows], tok.pad_token_id)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_full_training_moves_weights_by_the_schedule_and_lowers_the_task_loss(pool):
    from transformers import AutoModelForCausalLM

    from workbench.tasks import load_split

    e = train_expert(pool, "full-sort", _sources("sorting"), FullConfig(steps=3, batch_size=4, lr=1e-3, warmup=1))
    assert e.kind == "full"
    # Adam moves a weight by at most ~lr per step: lr(t) = 1e-3 x (1, 1, 1/2) (1 warm-up step, then linear decay)
    budget = 1e-3 * (1 + 1 + 0.5)
    deltas = {n: e.delta(n).abs() for n in e.delta_names()}
    assert len(deltas) > 10 and all(d.max().item() <= 1.01 * budget for d in deltas.values())
    moved = torch.cat([d[d > 0] for d in deltas.values()])
    assert moved.median().item() > 0.5 * budget  # nearly every weight took its full steps, not a nudge
    test = load_split("sorting", "test")[:32]  # examples it never trained on
    tok = pool.base.tokenizer()
    before = _answer_loss(pool.base.load(), tok, test)
    after = _answer_loss(AutoModelForCausalLM.from_pretrained(e.path, dtype=torch.float32).eval(), tok, test)
    assert after < 0.85 * before, (before, after)


def test_training_is_deterministic(pool):
    cfg = LoraConfigModel(steps=3, batch_size=4, r=2, warmup=1)
    a = train_expert(pool, "a", _sources("sorting"), cfg)
    b = train_expert(pool, "b", _sources("sorting"), cfg)
    assert a.entry.training["loss_curve"] == b.entry.training["loss_curve"]
    name = a.delta_names()[0]
    torch.testing.assert_close(a.delta(name), b.delta(name), rtol=0, atol=0)


def _run_files(folder, run_id):
    return sorted(p.name for p in folder.iterdir() if run_id in p.name)


def test_lm_eval_run_layout_reruns_determinism_and_batch_size(trained_pool, tmp_path):
    from workbench.eval import read_samples
    from workbench.eval.results import iter_runs

    out = tmp_path / "results" / "lm-eval"
    folder = out / "demo__count"
    tasks = ["word_count", "sorting", "english_docs"]
    m1 = run_eval("count", tasks, pool=trained_pool, limit=6, batch_size=1, results_dir=out)
    assert _run_files(folder, m1["run_id"]) == [f"results_{m1['run_id']}.json", f"run_{m1['run_id']}.json",
                                                f"samples_{m1['run_id']}.jsonl.gz"]
    assert not list(folder.glob("*.jsonl"))  # lm-eval's per-task samples files are not kept
    r1 = read_samples(folder / f"run_{m1['run_id']}.json")
    assert len(r1) == 3 * 6 and {r["task"] for r in r1} == set(tasks)
    row = next(r for r in r1 if r["task"] == "word_count" and r["doc_id"] == 0)
    assert row["question"].startswith("Count the words:") and row["target"].isdigit()
    assert set(row) == {"task", "doc_id", "question", "target", "response", "metrics", "filter", "run_id"}
    assert row["metrics"]["exact_match"] == float(row["response"] == row["target"])
    docs = next(r for r in r1 if r["task"] == "english_docs")
    assert set(docs["metrics"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}

    m2 = run_eval("count", tasks, pool=trained_pool, limit=6, batch_size=1, results_dir=out)  # a rerun
    m3 = run_eval("count", tasks, pool=trained_pool, limit=6, batch_size=16, results_dir=out)  # other settings
    assert m1["run_id"] < m2["run_id"] < m3["run_id"]
    assert _run_files(folder, m1["run_id"]) == []  # replaced by the rerun, every file of it
    assert sorted(p.name for p in folder.glob("run_*.json")) == [f"run_{m2['run_id']}.json", f"run_{m3['run_id']}.json"]
    assert len(list(folder.glob("results_*.json"))) == 2 and len(list(folder.glob("samples_*.jsonl.gz"))) == 2
    res = json.loads((out.parent / m2["results_file"]).read_text())
    assert {"results", "configs", "versions", "n-samples"} <= set(res)  # lm-eval's own JSON format
    assert res["n-samples"]["wb_word_count"]["effective"] == 6
    # lm-eval's own standard error, sqrt(p (1 - p) / (n - 1)), not "N/A"
    p_wc = res["results"]["wb_word_count"]["exact_match,strip"]
    assert res["results"]["wb_word_count"]["exact_match_stderr,strip"] == pytest.approx((p_wc * (1 - p_wc) / 5) ** 0.5)
    assert set(m1["scores"]) == set(tasks) and "exact_match" in m1["scores"]["word_count"]
    assert "word_perplexity" in m1["scores"]["english_docs"]
    assert m1["scores"] == m2["scores"] and m2["split"] == "test"
    for task in ("word_count", "sorting"):
        assert m1["scores"][task] == m3["scores"][task]
    assert m1["scores"]["english_docs"]["word_perplexity"] == pytest.approx(
        m3["scores"]["english_docs"]["word_perplexity"], rel=1e-4)
    r2, r3 = read_samples(folder / f"run_{m2['run_id']}.json"), read_samples(folder / f"run_{m3['run_id']}.json")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "run_id"} for r in rows]
    assert strip(r1) == strip(r2)  # a rerun repeats every output
    gen = lambda rows: {(r["task"], r["doc_id"]): r["response"] for r in rows if r["task"] != "english_docs"}
    assert gen(r1) and gen(r1) == gen(r3)  # identical generations at bs 1 and 16
    assert len(read_samples(folder)) == 2 * 3 * 6  # a folder reads every run in it
    assert read_samples(next(r for r in iter_runs(out) if r["run_id"] == m2["run_id"])) == r2  # or a manifest
    assert m1["git"].keys() == {"commit", "dirty"} and m1["machine"]["cpus"] and m1["timings"]["eval_s"] > 0
    assert m1["method"] == "expert-lora" and m1["pool"] == "demo"


def test_results_table(trained_pool, tiny_dir, tmp_path, run_cli):
    from workbench.eval.results import paired_samples

    out = tmp_path / "lm-eval"
    trained_pool.add(tiny_dir / "lora_a", "a", tags={"task": "addition"}, data=suite_data("addition"))  # a (random) addition expert
    tasks = ["word_count", "addition", "subtraction"]
    runs = {name: run_eval(name, tasks, pool=trained_pool, results_dir=out, batch_size=16, limit=limit)
            for name, limit in (("count", 16), ("base", None), ("a", 16))}
    em = {name: {t: 100 * m["scores"][t]["exact_match"] for t in tasks} for name, m in runs.items()}
    assert em["count"]["word_count"] > 0  # the averages below are not all zeros
    df = results_table(out, full_only=False)
    assert list(df.model) == ["base", "a", "count"]  # base first, then experts in task order
    assert {"word_count", "addition", "subtraction", "held_in_avg", "held_out_avg", "normalized"} <= set(df.columns)
    own = (em["a"]["addition"] + em["count"]["word_count"]) / 2  # each expert on its own task
    for row in df.itertuples():
        held_in = (em[row.model]["word_count"] + em[row.model]["addition"]) / 2
        assert row.held_in_avg == pytest.approx(held_in) and row.held_out_avg == pytest.approx(em[row.model]["subtraction"])
        assert row.normalized == pytest.approx(100 * held_in / own)
    assert list(results_table(out).model) == ["base"]  # full_only: runs made with --limit are left out
    pairs = paired_samples(out / "demo__base", out / "demo__count", "word_count")
    assert len(pairs) == 16 and list(pairs.doc_id) == list(range(16))
    assert pairs.value_b.mean() * 100 == pytest.approx(em["count"]["word_count"])
    assert (pairs.value_b == (pairs.response_b == pairs.target)).all()
    svg = tmp_path / "table.svg"
    results_chart(df).save(str(svg))
    text = svg.read_text()
    assert text.startswith("<svg") and ">count<" in text and ">subtraction<" in text
    md, png = tmp_path / "t.md", tmp_path / "t.png"
    code, _, _ = run_cli("results", "runs", "--results-dir", str(out), "--markdown", str(md), "--plot", str(png))
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| model") and lines[2].startswith("| base") and "nan" not in md.read_text()


def test_unknown_model_spec(trained_pool):
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match=r"unknown model 'cont'"):
        load_model_spec("cont", trained_pool)


# ----------------------------------------------------------------------------- the results record

_PATH = re.compile(r"(?<![\w.~$-])/[^\s\"',;)\]}]+")


def _machine_paths(root: Path) -> list[str]:
    """Absolute paths in any file under `root` (gzip read through) that start in a folder of this machine."""
    hits = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            text = gzip.decompress(p.read_bytes()).decode() if p.suffix == ".gz" else p.read_text()
            hits += [f"{p.name}: {m}" for m in _PATH.findall(text) if Path("/" + m.split("/")[1]).is_dir()]
    return hits


def test_scrub_rewrites_known_roots():
    from workbench.eval.record import scrub

    roots = {"/home/u/.cache/workbench": "$WORKBENCH_CACHE", "/home/u/proj": "", "/home/u": "~"}
    obj = {"data_files": {"test": "/home/u/.cache/workbench/tasks/x/test.jsonl"}, "pretty_env_info": "Linux /usr",
           "spec": ["/home/u/proj/adapters/demo", "/home/u/proj", "/home/u/models/m", "/home/user2/x"],
           "args": "pretrained=/home/u/models/m,dtype=float32", "text": "km/h to m/s; a/home/u", 3: None}
    clean = scrub(obj, roots)
    assert clean == {"data_files": {"test": "$WORKBENCH_CACHE/tasks/x/test.jsonl"},
                     "spec": ["adapters/demo", ".", "~/models/m", "/home/user2/x"],
                     "args": "pretrained=~/models/m,dtype=float32", "text": "km/h to m/s; a/home/u", 3: None}
    assert scrub(clean, roots) == clean


def test_results_record_names_no_machine_path(pool, tmp_path, monkeypatch):
    from workbench.eval import collect_scores, harness

    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path / "results")  # run_eval's default folder
    m = run_eval(str(pool.base.path), ["word_count", "subtraction"], pool=pool, limit=3, batch_size=4)
    folder = tmp_path / "results" / "lm-eval" / "demo__base"
    hits = _machine_paths(tmp_path / "results")
    assert not hits, hits[:5]
    assert (folder / f"run_{m['run_id']}.json").is_file() and (folder / f"samples_{m['run_id']}.jsonl.gz").is_file()
    res = json.loads((folder / f"results_{m['run_id']}.json").read_text())
    assert "pretty_env_info" not in res and m["machine"]["cpus"]
    assert res["configs"]["wb_word_count"]["dataset_kwargs"]["data_files"]["test"].startswith("$WORKBENCH_CACHE/")
    assert m["model"].endswith("/base") and not m["model"].startswith("/")
    # a validation-split run sits beside it (other settings) and stays out of the test-split table
    v = run_eval(str(pool.base.path), ["word_count", "subtraction"], pool=pool, limit=3, batch_size=4,
                 split="validation")
    assert v["split"] == "validation" and len(list(folder.glob("run_*.json"))) == 2
    scores = collect_scores(folder.parent, full_only=False)
    assert set(scores.run_id) == {m["run_id"]} and set(scores.model) == {"base"}  # a folder spec shows by name


def _legacy_run(loaded, tasks, out: Path, pool) -> tuple[str, dict]:
    """A run as run_eval wrote it before the compact record: lm-eval's own files, absolute paths."""
    from lm_eval.loggers import EvaluationTracker

    from workbench.eval.harness import evaluate, scores_of
    from workbench.eval.record import compact_sample, suite_task

    res = evaluate(loaded, tasks, limit=3, batch_size=4)
    samples = res.pop("samples")
    expected = [compact_sample(suite_task(t), s) for t, rows in samples.items() for s in rows]
    tracker = EvaluationTracker(output_path=str(out))
    gct = tracker.general_config_tracker
    gct.model_name = gct.model_name_sanitized = f"demo__{loaded.name}"
    tracker.save_results_aggregated(results=res, samples=samples)
    for task_name in res["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    folder = out / gct.model_name_sanitized
    manifest = {"run_id": tracker.date_id, "model": str(pool.base.path), "model_name": gct.model_name,
                "pool": "demo", "method": "base", "model_info": {"path": str(pool.base.path)}, "tasks": tasks,
                "limit": 3, "batch_size": 4, "scores": scores_of(res),
                "results_file": f"lm-eval/{folder.name}/results_{tracker.date_id}.json"}
    (folder / f"run_{tracker.date_id}.json").write_text(json.dumps(manifest, indent=2))
    return tracker.date_id, sorted(expected, key=lambda r: (r["task"], r["doc_id"]))


def test_migrate_compacts_and_scrubs_a_legacy_folder(pool, tmp_path):
    from workbench.eval import migrate, read_samples
    from workbench.eval.results import collect_scores

    out = tmp_path / "lm-eval"
    loaded = load_model_spec("base", pool)
    run_id, expected = _legacy_run(loaded, ["word_count", "english_docs"], out, pool)
    folder = out / "demo__base"
    (folder / "notes.txt").write_text("kept as it is\n")
    legacy = sorted(p.name for p in folder.glob("samples_*.jsonl"))
    assert len(legacy) == 2 and _machine_paths(out)  # lm-eval wrote absolute paths
    before = json.loads((folder / f"results_{run_id}.json").read_text())
    done = migrate(out)
    assert done == {"runs_compacted": 1, "jsonl_removed": 2, "json_scrubbed": 2}
    assert sorted(p.name for p in folder.iterdir()) == [
        "notes.txt", f"results_{run_id}.json", f"run_{run_id}.json", f"samples_{run_id}.jsonl.gz"]
    rows = read_samples(folder / f"run_{run_id}.json")
    assert [{k: v for k, v in r.items() if k != "run_id"} for r in rows] == expected  # == what run_eval writes
    assert not _machine_paths(out)
    after = json.loads((folder / f"results_{run_id}.json").read_text())
    assert "pretty_env_info" in before and "pretty_env_info" not in after
    assert after["results"] == before["results"] and after["n-samples"] == before["n-samples"]
    assert set(collect_scores(out, full_only=False).task) == {"word_count", "english_docs"}
    state = snapshot(out)
    assert migrate(out) == {"runs_compacted": 0, "jsonl_removed": 0, "json_scrubbed": 0} and snapshot(out) == state


def test_rerun_never_replaces_a_run_with_samples_or_other_data():
    """A run without per-example outputs, or on other task data, is another experiment: it replaces nothing."""
    from workbench.eval.record import run_settings

    base = {"model": "x", "model_name": "p__x", "tasks": ["a"], "limit": 6, "batch_size": 1, "params": {},
            "data_sha256": {"a": "h1"}}
    assert run_settings(base) == run_settings({**base, "samples_logged": True})  # manifests before the flag had samples
    assert run_settings(base) != run_settings({**base, "samples_logged": False})
    assert run_settings(base) != run_settings({**base, "data_sha256": {"a": "h2"}})
