"""Merging: adapter-space merges equal mergekit's merges of the materialised models; recipes."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from workbench.errors import RecipeError
from workbench.recipes import build, parse_recipe


def _materialise(pool, name, out):
    """Base + LoRA merged by PEFT and saved: what mergekit's model+lora path feeds its merge."""
    pm = pool.peft_model([name])
    pm.merge_and_unload().save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture()
def lora_pool(pool, tiny_dir, tmp_path):
    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    for n in ("a", "b"):
        pool.add(_materialise(pool, n, tmp_path / f"mat_{n}"), f"full_{n}")
    return pool


def _build(pool, method, experts, output=None, **params):
    recipe = {"name": f"t-{method}", "pool": str(pool.root), "method": method, "experts": experts,
              "parameters": params, "output": output or {"kind": "model"}}
    return build(parse_recipe(recipe), log=lambda *a: None)


def _max_diff(d1, d2):
    a, b = load_file(d1 / "model.safetensors"), load_file(d2 / "model.safetensors")
    assert set(a) <= set(b) | {"lm_head.weight"}
    return max((a[k] - b[k]).abs().max().item() for k in a if k in b)


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"weight": 0.7, "lambda": 1.3}),
    ("ties", {"density": 0.3, "weight": 1.0}),
    ("ties", {"density": 0.5, "weight": 0.6, "lambda": 0.9, "per_expert": {"a": {"density": 0.2}}}),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.05}),
])
def test_adapter_space_equals_mergekit(lora_pool, method, params):
    ours = _build(lora_pool, method, ["a", "b"], **params)
    per = {f"full_{k}": v for k, v in params.pop("per_expert", {}).items()}
    theirs = _build(lora_pool, method, ["full_a", "full_b"], per_expert=per, **params)
    meta_ours = yaml.safe_load((ours / "artifact.json").read_text())
    meta_theirs = yaml.safe_load((theirs / "artifact.json").read_text())
    assert meta_ours["engine"] == "workbench-adapter-space" and meta_theirs["engine"] == "mergekit"
    assert _max_diff(ours, theirs) <= 1e-6


def test_workbench_engine_on_full_experts_equals_mergekit(lora_pool):
    ours = _build(lora_pool, "ties", ["full_a", "full_b"], density=0.3, engine="workbench")
    theirs = _build(lora_pool, "ties", ["full_a", "full_b"], density=0.3)
    assert _max_diff(ours, theirs) <= 1e-6


@pytest.mark.parametrize("method,experts,params", [
    ("task_arithmetic", ["a", "b"], {"lambda": 1.3}),  # adapter space, one product of stacked factors
    ("ties", ["a", "b"], {"density": 0.5}),  # adapter space, mergekit's merge_group per tensor
    ("task_arithmetic", ["full_a", "full_b"], {"lambda": 1.3}),  # full experts, mergekit
    ("ties", ["full_a", "full_b"], {"density": 0.5, "engine": "workbench"}),  # full experts, streaming engine
])
def test_per_expert_weight_zero_leaves_the_expert_out(lora_pool, method, experts, params):
    zero = _build(lora_pool, method, experts, per_expert={experts[1]: {"weight": 0}}, **params)
    alone = _build(lora_pool, method, experts[:1], **params)
    assert _max_diff(zero, alone) <= 1e-6


def test_per_expert_zero_gamma_is_kept(lora_pool):
    zero = {"a": {"gamma": 0}, "b": {"gamma": 0}}
    per = _build(lora_pool, "breadcrumbs", ["a", "b"], density=0.5, gamma=0.2, per_expert=zero)
    assert _max_diff(per, _build(lora_pool, "breadcrumbs", ["a", "b"], density=0.5, gamma=0)) <= 1e-6


def test_dare_statistics_and_seed(lora_pool, tmp_path, monkeypatch):
    def build_in(cache: str, seed: int):  # a fresh artifact cache: a real build, never a reused artifact
        monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path / cache))
        return _build(lora_pool, "dare_linear", ["a"], density=0.25, seed=seed)

    d1 = build_in("c1", 3)
    base = lora_pool.base.tensors
    merged = load_file(d1 / "model.safetensors")
    name = lora_pool.expert("a").delta_names()[0]
    delta = lora_pool.expert("a").delta(name)
    got = merged[name] - base.get(name)
    kept = (got.abs() > 1e-7).float().mean().item()
    assert 0.18 < kept < 0.32  # Bernoulli(0.25) keep rate
    # survivors rescaled so that the L1 norm is preserved (mergekit's DARE rescale)
    assert got.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-3)
    d2 = build_in("c2", 3)  # built again from scratch with the same seed: the same bytes
    assert d2.parent != d1.parent and (d2 / "model.safetensors").read_bytes() == (d1 / "model.safetensors").read_bytes()
    other = load_file(build_in("c3", 4) / "model.safetensors")[name] - base.get(name)
    assert ((other.abs() > 1e-7) != (got.abs() > 1e-7)).float().mean().item() > 0.1  # another seed: another mask


def test_refactored_lora_output(lora_pool):
    full = _build(lora_pool, "task_arithmetic", ["a", "b"])
    exact = _build(lora_pool, "task_arithmetic", ["a", "b"], output={"kind": "lora", "rank": 6})  # r_a + r_b = 6
    low = _build(lora_pool, "task_arithmetic", ["a", "b"], output={"kind": "lora", "rank": 1})
    err_exact = yaml.safe_load((exact / "artifact.json").read_text())["reconstruction_error"]
    err_low = yaml.safe_load((low / "artifact.json").read_text())["reconstruction_error"]
    assert err_exact["max_relative_frobenius"] < 1e-5  # TA of LoRAs is exactly rank sum(r)
    assert err_low["global_relative_frobenius"] > 0.05
    from workbench.artifacts import load_artifact

    lora_model = load_artifact(exact).model
    full_model = load_artifact(full).model
    x = torch.randint(5, 90, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(lora_model(input_ids=x).logits, full_model(input_ids=x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe,message", [
    ({"method": "tie"}, r"unknown method 'tie' \(did you mean 'ties'\?\)"),
    ({"experts": ["a", "nobody"]}, r"has no expert 'nobody'"),
    ({"parameters": {"density": 1.5}}, r"parameters\.density: Input should be less than or equal to 1 \(got 1\.5\)"),
    ({"parameters": {"density": 0}}, r"parameters\.density: Input should be greater than 0"),
    ({"parameters": {"weight": "heavy"}}, r"parameters\.weight: Input should be a valid number"),
    ({"parameters": {"desnity": 0.2}}, r"parameters\.desnity: Extra inputs are not permitted"),
    ({"output": {"kind": "lora"}}, r"output kind 'lora' needs a rank"),
    ({"parameters": {"per_expert": {"zz": {"weight": 1}}}}, r"per_expert names experts not in the merge"),
    # a LoRA cannot be re-factored from full experts (1-D norm weights, whole-model merges ignore the rank)
    ({"experts": ["full_a", "full_b"], "output": {"kind": "lora", "rank": 4}},
     r"method 'ties' cannot output a LoRA from full experts \['full_a', 'full_b'\]: use output kind 'model'"),
    ({"method": "task_arithmetic", "experts": ["a", "full_b"], "output": {"kind": "lora", "rank": 4}},
     r"method 'task_arithmetic' cannot output a LoRA from full experts \['full_b'\]"),
    ({"method": "pcb", "experts": ["full_a", "full_b"], "output": {"kind": "lora", "rank": 4}, "parameters": {}},
     r"method 'pcb' cannot output a LoRA from full experts"),
])
def test_bad_recipes_fail_before_work(lora_pool, recipe, message, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "empty-cache"))
    data = {"name": "bad", "pool": str(lora_pool.root), "method": "ties", "experts": ["a", "b"], **recipe}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)
    assert not (tmp_path / "empty-cache").exists()


def test_mixed_bases(lora_pool, tmp_path, tiny_dir, monkeypatch):
    from workbench.pool import Pool
    from workbench.testing import make_tiny_base, make_tiny_lora

    make_tiny_base(tmp_path / "b2", hidden_size=32, intermediate_size=64)
    make_tiny_lora(tmp_path / "b2", tmp_path / "l2")
    other = Pool.create(tmp_path / "other", base=str(tmp_path / "b2"))
    other.add(tmp_path / "l2", "x")
    with pytest.raises(RecipeError, match=r"mixed bases: '.*other:x' is over"):
        parse_recipe({"name": "m", "pool": str(lora_pool.root), "method": "ties", "experts": ["a", f"{other.root}:x"]})


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethod: [ties\n")
    with pytest.raises(RecipeError, match=r"is not valid YAML"):
        parse_recipe(bad)
    with pytest.raises(RecipeError, match=r"no recipe at"):
        parse_recipe(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- PCB


def _pcb_reference(flat, ratio, q):
    """The reference steps written out plainly, with full sorts (independent of pcb_merge)."""
    def minmax(x):  # a constant row (an expert that leaves a tensor alone) maps to 0, as in pcb_merge
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))

    def clamp_sorted(x, min_ratio, max_ratio):
        d = x.shape[1]
        s = torch.sort(x, dim=1).values
        return torch.clamp(x, s[:, int(d * min_ratio)].unsqueeze(1), s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1))

    n = flat.shape[0]
    abs_c = clamp_sorted(flat.abs(), q, q)
    clamped = torch.sign(flat) * abs_c
    intra = torch.exp(n * minmax(abs_c) ** 2)
    inter = torch.tanh(flat * flat.sum(dim=0))
    scale = minmax(clamp_sorted(intra * inter, 1 - ratio, 0))
    return (clamped * scale).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)


@pytest.mark.parametrize("n,p,ratio,q", [(2, 1000, 0.1, 1e-4), (4, 5003, 0.2, 0.01), (6, 777, 0.05, 0.0)])
def test_pcb_equals_reference_steps(n, p, ratio, q):
    from workbench.methods.pcb import pcb_merge

    g = torch.Generator().manual_seed(n * p)
    flat = torch.randn(n, p, generator=g) * torch.rand(n, 1, generator=g)
    torch.testing.assert_close(pcb_merge(flat.clone(), ratio, q), _pcb_reference(flat, ratio, q), rtol=1e-5, atol=1e-7)


def test_pcb_scopes(lora_pool):
    from workbench.artifacts import load_artifact

    whole = _build(lora_pool, "pcb", ["a", "b"], ratio=0.2, **{"lambda": 1.1})
    per = _build(lora_pool, "pcb", ["a", "b"], ratio=0.2, scope="tensor", **{"lambda": 1.1})
    experts = [lora_pool.expert("a"), lora_pool.expert("b")]
    names = sorted(set(experts[0].delta_names()) | set(experts[1].delta_names()))
    shapes = lora_pool.base.tensors.shapes
    flat = torch.stack([torch.cat([(e.delta(n) if n in e.delta_names() else torch.zeros(shapes[n])).flatten()
                                   for n in names]) for e in experts])
    want = _pcb_reference(flat, 0.2, 1e-4) * 1.1
    got_model = load_file(whole / "model.safetensors")
    base = lora_pool.base.tensors
    got = torch.cat([(got_model[n] - base.get(n)).flatten() for n in names])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    got_per = load_file(per / "model.safetensors")
    for n in names:  # scope tensor: the reference steps applied to each tensor alone
        want_n = _pcb_reference(torch.stack([e.delta(n) if n in e.delta_names() else torch.zeros(shapes[n])
                                             for e in experts]).flatten(1), 0.2, 1e-4) * 1.1
        torch.testing.assert_close((got_per[n] - base.get(n)).flatten(), want_n, rtol=1e-4, atol=1e-6)
    assert _max_diff(whole, per) > 1e-6  # per-tensor quantiles differ from the whole-model ones
    assert load_artifact(per).model is not None


def test_sweep_selects_on_validation(lora_pool, tmp_path, monkeypatch):
    import json
    import os

    from workbench.eval import harness
    from workbench.methods import METHODS
    from workbench.recipes import run_recipe

    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path / "elsewhere")  # results_dir wins over the global
    monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path / "artifacts"))
    # Validation scores read the merged weights: lambda = <W - W0, d> / <d, d>, d the plain sum of deltas.
    # The middle point scores best, so neither grid order nor a tie can pick it.
    scores = {0.5: 0.2, 1.0: 0.9, 1.5: 0.4}
    name = "model.layers.0.self_attn.q_proj.weight"
    d = lora_pool.expert("a").delta(name) + lora_pool.expert("b").delta(name)
    w0 = lora_pool.base.tensors.get(name).float()
    seen_splits = []
    real = harness.evaluate

    def fake(loaded, tasks, **k):
        seen_splits.append(k.get("split", "test"))
        if k.get("split") != "validation":
            return real(loaded, tasks, **k)
        lam = round(((loaded.model.state_dict()[name].float() - w0) * d).sum().item() / d.pow(2).sum().item(), 3)
        return {"results": {f"wb_{getattr(t, 'name', t)}_val": {"exact_match,none": scores[lam]} for t in tasks}}

    monkeypatch.setattr(harness, "evaluate", fake)
    recipe = {"name": "sw", "pool": str(lora_pool.root), "method": "task_arithmetic", "experts": ["a", "b"],
              "sweep": {"parameters": {"lambda": [0.5, 1.0, 1.5]}, "tasks": ["addition"], "limit": 2, "batch_size": 4},
              "eval": {"tasks": ["addition"], "limit": 2}}
    results = tmp_path / "results"
    out = run_recipe(recipe, evaluate=True, results_dir=results, log=lambda *a: None)
    assert seen_splits == ["validation"] * 3 + ["test"]
    record_file = results / "sweeps" / "demo__sw.json"
    record = json.loads(record_file.read_text())
    assert [p["point"] for p in record["points"]] == [{"lambda": 0.5}, {"lambda": 1.0}, {"lambda": 1.5}]
    assert [p["score"] for p in record["points"]] == [0.2, 0.9, 0.4]
    assert record["best"]["point"] == out["selection"]["best"] == {"lambda": 1.0}
    assert out["selection"]["validation_score"] == 0.9 and out["selection"]["file"] == "sweeps/demo__sw.json"
    assert out["artifact"] == record["best"]["artifact"] == f"artifacts/{Path(out['artifact_dir']).name}"
    assert out["eval"]["selected_on_validation"]["best"] == {"lambda": 1.0}
    assert out["eval"]["model_name"] == "demo__sw" and out["eval"]["params"]["lambda"] == 1.0
    assert out["eval"]["recipe"]["pool"] == "demo" and out["eval"]["model"] == out["artifact"]
    # records under results/ name no path of this machine; nothing went to the global RESULTS_DIR
    run_manifest = next(results.glob("lm-eval/*/run_*.json"))
    for f in (record_file, run_manifest):
        assert str(tmp_path) not in f.read_text() and os.environ["WORKBENCH_CACHE"] not in f.read_text(), f
    assert not (tmp_path / "elsewhere").exists()
    # scores are reused while the keys hold; a new method version invalidates them
    seen_splits.clear()
    run_recipe(recipe, results_dir=results, log=lambda *a: None)
    assert seen_splits == []
    cls = METHODS.get("task_arithmetic")
    monkeypatch.setattr(cls, "version", cls.version + 1)
    run_recipe(recipe, results_dir=results, log=lambda *a: None)
    assert seen_splits == ["validation"] * 3
    assert not {p["key"] for p in json.loads(record_file.read_text())["points"]} & {p["key"] for p in record["points"]}


def test_bad_sweep_point_fails_up_front(lora_pool):
    with pytest.raises(RecipeError, match=r"sweep point \{'density': 2\.0\}: parameters\.density"):
        parse_recipe({"name": "s", "pool": str(lora_pool.root), "method": "ties", "experts": ["a", "b"],
                      "sweep": {"parameters": {"density": [0.5, 2.0]}}})


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("task_arithmetic", {"lambda": 0.8}),
                                           ("ties", {"density": 0.5, "weight": 0.7, "normalize": False})])
def test_streaming_full_engine_equals_mergekit(lora_pool, method, params, monkeypatch):
    from workbench.methods import streaming

    monkeypatch.setattr(streaming, "CHUNK_ELEMS", 1000)  # many row chunks even on the tiny model
    ours = _build(lora_pool, method, ["full_a", "full_b"], engine="workbench", **params)
    assert yaml.safe_load((ours / "artifact.json").read_text())["engine"] == "workbench-streaming"
    theirs = _build(lora_pool, method, ["full_a", "full_b"], **params)
    assert _max_diff(ours, theirs) <= 1e-6


def test_streaming_dare_keeps_density(lora_pool, monkeypatch):
    from workbench.methods import streaming

    monkeypatch.setattr(streaming, "CHUNK_ELEMS", 1000)
    out = _build(lora_pool, "dare_linear", ["full_a"], density=0.3, engine="workbench", seed=5)
    merged = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    delta = lora_pool.expert("full_a").delta(name)
    got = merged[name] - lora_pool.base.tensors.get(name)
    nz = delta.abs() > 1e-6
    kept = ((got.abs() > 1e-9) & nz).float().sum() / nz.float().sum()
    assert 0.22 < kept.item() < 0.38
    assert got.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=2e-2)


def test_shard_writer(tmp_path):
    import json as _json

    from workbench.methods.streaming import ShardWriter
    from workbench.tensors import SafetensorsDir, model_weight_files

    tensors = {f"t{i}": torch.randn(10, 10) for i in range(5)}  # 400 bytes each -> 3 shards
    tensors["h"] = torch.randn(3, 5).to(torch.bfloat16)
    tensors["i"] = torch.arange(7)
    w = ShardWriter(tmp_path, [(k, {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[v.dtype],
                                tuple(v.shape)) for k, v in tensors.items()], shard_bytes=1000)
    with pytest.raises(ValueError, match="layout says"):
        w.add("t0", torch.randn(10, 9))
    for k in reversed(list(tensors)):  # any order
        w.add(k, tensors[k])
    w.close()
    index = _json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    reader = SafetensorsDir(tmp_path, model_weight_files(tmp_path))
    for k, v in tensors.items():
        torch.testing.assert_close(reader.get(k), v, rtol=0, atol=0)
    (tmp_path / "u").mkdir()
    unfinished = ShardWriter(tmp_path / "u", [("a", "F32", (2,)), ("b", "F32", (2,))])
    unfinished.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="never written"):
        unfinished.close()


def test_pcb_chunking_is_exact():
    from workbench.methods.pcb import pcb_merge

    flat = torch.randn(3, 1001, generator=torch.Generator().manual_seed(1))
    flat[1, 10:50] = 0  # an expert that leaves some entries untouched
    torch.testing.assert_close(pcb_merge(flat.clone(), 0.2, 0.01, chunk=7), _pcb_reference(flat, 0.2, 0.01),
                               rtol=1e-5, atol=1e-7)
