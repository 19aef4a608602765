"""Training experts and evaluating them with lm-eval, on the tiny model."""

import json

import pytest
import torch

from workbench.eval import results_table, run_eval
from workbench.eval.harness import load_model_spec
from workbench.eval.results import results_chart
from workbench.train import FullConfig, LoraConfigModel, train_expert
from workbench.train.trainer import encode


@pytest.fixture()
def trained_pool(pool):
    cfg = LoraConfigModel(steps=40, batch_size=8, r=4, alpha=8, lr=3e-2, warmup=2)
    train_expert(pool, "add", ["addition"], cfg)
    return pool


def test_encode_masks_prompt(pool):
    tok = pool.base.tokenizer()
    ids, labels = encode(tok, "Add: 1+2\nAnswer:", "3", 128)
    n_q = len("Add: 1+2\nAnswer:")  # char-level tokenizer
    assert labels[:n_q] == [-100] * n_q
    assert tok.decode(ids[n_q:-1]) == " 3" and labels[-1] == tok.eos_token_id


def test_lora_training_lands_in_pool(trained_pool):
    e = trained_pool.expert("add")
    meta = e.entry.training
    assert e.kind == "lora" and e.entry.tags == {"task": "addition"}
    assert len(meta["loss_curve"]) == 40 and meta["steps"] == 40
    first, last = sum(meta["loss_curve"][:5]) / 5, sum(meta["loss_curve"][-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert meta["data_sha256"]["addition"] and meta["wall_s"] > 0 and meta["tokens"] > 0
    assert e.entry.lora.r == 4 and e.entry.lora.modules == 2 * 7
    assert trained_pool.verify() == []


def test_full_training_changes_weights(pool):
    e = train_expert(pool, "full-sort", ["sorting"], FullConfig(steps=3, batch_size=4, lr=1e-3, warmup=1))
    assert e.kind == "full"
    deltas = [e.delta(n).abs().max().item() for n in e.delta_names()]
    assert len(deltas) > 10 and max(deltas) > 1e-4


def test_training_is_deterministic(pool):
    cfg = LoraConfigModel(steps=3, batch_size=4, r=2, warmup=1)
    a = train_expert(pool, "a", ["sorting"], cfg)
    b = train_expert(pool, "b", ["sorting"], cfg)
    assert a.entry.training["loss_curve"] == b.entry.training["loss_curve"]
    name = a.delta_names()[0]
    torch.testing.assert_close(a.delta(name), b.delta(name), rtol=0, atol=0)


def _responses(manifest, results_root):
    folder = (results_root / manifest["results_file"]).parent
    out = {}
    for f in sorted(folder.glob(f"samples_*_{manifest['run_id']}.jsonl")):
        for line in f.read_text().splitlines():
            s = json.loads(line)
            out[(f.name.split("_2")[0], s["doc_id"])] = s["filtered_resps"]
    return out


def test_lm_eval_run_layout_determinism_and_batch_size(trained_pool, tmp_path):
    out = tmp_path / "results" / "lm-eval"
    tasks = ["addition", "sorting", "english_docs"]
    m1 = run_eval("add", tasks, pool=trained_pool, limit=6, batch_size=1, out_dir=out)
    m2 = run_eval("add", tasks, pool=trained_pool, limit=6, batch_size=1, out_dir=out)
    m3 = run_eval("add", tasks, pool=trained_pool, limit=6, batch_size=16, out_dir=out)
    assert m1["run_id"] != m2["run_id"]  # never overwrite an earlier run
    folder = out / "demo__add"
    assert len(list(folder.glob("results_*.json"))) == 3 and len(list(folder.glob("run_*.json"))) == 3
    res = json.loads(next(folder.glob("results_*.json")).read_text())
    assert {"results", "configs", "versions", "n-samples"} <= set(res)  # lm-eval's own JSON format
    assert res["n-samples"]["wb_addition"]["effective"] == 6
    assert set(m1["scores"]) == set(tasks) and "exact_match" in m1["scores"]["addition"]
    assert "word_perplexity" in m1["scores"]["english_docs"]
    assert m1["scores"] == m2["scores"]
    for task in ("addition", "sorting"):
        assert m1["scores"][task] == m3["scores"][task]
    assert m1["scores"]["english_docs"]["word_perplexity"] == pytest.approx(
        m3["scores"]["english_docs"]["word_perplexity"], rel=1e-4)
    r1, r3 = _responses(m1, out.parent), _responses(m3, out.parent)
    assert r1 and r1.keys() == r3.keys()
    assert all(r1[k] == r3[k] for k in r1 if "english" not in k[0])  # identical generations at bs 1 and 16
    assert m1["git"].keys() == {"commit", "dirty"} and m1["machine"]["cpus"] and m1["timings"]["eval_s"] > 0
    assert m1["method"] == "expert-lora" and m1["pool"] == "demo"


def test_results_table(trained_pool, tmp_path, run_cli):
    out = tmp_path / "lm-eval"
    run_eval("base", ["addition", "subtraction"], pool=trained_pool, out_dir=out, batch_size=16,
             log_samples=False, loaded=_limited(load_model_spec("base", trained_pool)))
    run_eval("add", ["addition", "subtraction"], pool=trained_pool, out_dir=out, batch_size=16, log_samples=False,
             limit=8)
    df = results_table(out, full_only=False)
    assert list(df.model) == ["base", "add"]  # base first, then experts, whatever the names sort to
    assert {"addition", "subtraction", "held_in_avg", "held_out_avg"} <= set(df.columns)
    svg = tmp_path / "table.svg"
    results_chart(df).save(str(svg))
    text = svg.read_text()
    assert text.startswith("<svg") and ">add<" in text and ">subtraction<" in text
    md, png = tmp_path / "t.md", tmp_path / "t.png"
    code, out_text, _ = run_cli("results", "table", "--results-dir", str(out), "--markdown", str(md), "--plot", str(png))
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| model") and lines[2].startswith("| base") and "nan" not in md.read_text()


def _limited(loaded):
    return loaded


def test_unknown_model_spec(trained_pool):
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match=r"unknown model 'ad'"):
        load_model_spec("ad", trained_pool)
