"""The one routed-LoRA layer and its routers, on tiny models against PEFT."""

import json

import pytest
import torch

from workbench.modules.routed_lora import RoutedGroup, Trace, routed_modules, wrap_experts
from workbench.modules.routers import FixedRouter, GateRouter, PrototypeRouter, load_router
from conftest import suite_data


@pytest.fixture()
def two(pool, tiny_dir):
    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    return pool


def _ids(n=2, s=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 60, (n, s), generator=g)


def _peft_logits(pool, name, ids, mask=None):
    pm = pool.peft_model([name])
    with torch.no_grad():
        return pm(input_ids=ids, attention_mask=mask).logits


def _routed(pool, names):
    model = pool.base.load().eval()
    ctx = wrap_experts(model, [pool.expert(n) for n in names])
    return model, ctx


@pytest.mark.parametrize("forced", [0, 1])
def test_forced_router_equals_peft(two, forced):
    model, ctx = _routed(two, ["a", "b"])
    ids = _ids()
    w = [0.0, 0.0]
    w[forced] = 1.0
    with torch.no_grad(), ctx.use(groups=[RoutedGroup(FixedRouter(["a", "b"], w, k=1), None)]):
        got = model(input_ids=ids).logits
    want = _peft_logits(two, ["a", "b"][forced], ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_fixed_mix_is_weighted_sum_and_dense_equals_sparse(two):
    model, ctx = _routed(two, ["a", "b"])
    ids = _ids()
    router = FixedRouter(["a", "b"], [0.3, 0.7])
    with torch.no_grad():
        with ctx.use(groups=[RoutedGroup(router, None)]):
            sparse = model(input_ids=ids).logits
        with ctx.use(groups=[RoutedGroup(router, None)], dense=True):
            dense = model(input_ids=ids).logits
        base = model(input_ids=ids).logits  # no pairs: the base model
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)
    assert (sparse - base).abs().max() > 1e-3  # the experts really contribute
    torch.testing.assert_close(base, two.base.load()(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_prototype_router_topk_softmax_and_padding(two):
    """Per-token routing: a sequence's logits do not depend on its batch or padding."""
    model, ctx = _routed(two, ["a", "b"])
    mods = routed_modules(model)
    g = torch.Generator().manual_seed(3)
    protos = {m: torch.randn(2, lin.base.in_features, generator=g) for m, lin in mods.items()}
    router = PrototypeRouter(["a", "b"], protos, k=1)
    x = torch.randn(5, next(iter(mods.values())).base.in_features, generator=g)
    idx, w = router.route(next(iter(mods)), x)
    assert idx.shape == (5, 1) and torch.all(w == 1)
    full = PrototypeRouter(["a", "b"], protos, k=2)
    m0 = next(iter(mods))
    s = full.scores(m0, x)
    i2, w2 = full.route(m0, x)
    torch.testing.assert_close(w2, torch.softmax(s, -1).gather(1, i2))
    ids = _ids(1, 6, seed=4)
    longer = torch.cat([_ids(1, 9, seed=5)], 0)
    with torch.no_grad(), ctx.use(groups=[RoutedGroup(full, None)]):
        alone = model(input_ids=ids).logits
        right = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
        batch = model(input_ids=torch.cat([right, longer], 0)).logits  # right-padded, no mask
    torch.testing.assert_close(batch[0, :6], alone[0], atol=1e-5, rtol=0)


def test_gate_gradient_reaches_only_gate(two):
    model, ctx = _routed(two, ["a", "b"])
    for p in model.parameters():
        p.requires_grad_(False)
    mods = routed_modules(model)
    gate = GateRouter(["a"], {m: lin.base.in_features for m, lin in mods.items()})
    with ctx.use(groups=[RoutedGroup(gate, None, experts=torch.tensor([0]))], dense=True):
        loss = model(input_ids=_ids()).logits.square().mean()
    loss.backward()
    grads = [p.grad for p in gate.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters())


def test_router_save_load_and_trace(two, tmp_path):
    model, ctx = _routed(two, ["a", "b"])
    mods = routed_modules(model)
    protos = {m: torch.randn(2, lin.base.in_features) for m, lin in mods.items()}
    r = PrototypeRouter(["a", "b"], protos, k=1, absolute=True, standardize=False, scale="one", temperature=0.5)
    r.save(tmp_path / "r")
    r2 = load_router(tmp_path / "r")
    for m, lin in mods.items():
        x = torch.randn(4, lin.base.in_features)
        for u, v in zip(r.route(m, x), r2.route(m, x)):
            torch.testing.assert_close(u, v)
    trace = Trace()
    with torch.no_grad(), ctx.use(groups=[RoutedGroup(r2, None)], trace=trace):
        model(input_ids=_ids(1, 5))
    assert set(trace.modules) == set(mods) and all(v[0][0].shape == (5, 1) for v in trace.modules.values())


def _tagged_pool(pool, tiny_dir):
    pool.add(tiny_dir / "lora_a", "a", tags={"task": "addition"}, data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "b", tags={"task": "sorting"}, data=suite_data("sorting"))
    return pool


def _recipe(method, **params):
    return {"name": f"{method}-test", "method": method, "pool": "demo", "parameters": params}


def test_arrow_prototypes_are_top_singular_vectors(pool, tiny_dir):
    from workbench.methods.arrow import top_right_singular_vector

    e = _tagged_pool(pool, tiny_dir).expert("a")
    t = e.delta_names()[0]
    a, b, s = e.lora_factors(t)
    v = top_right_singular_vector(a, b)
    want = torch.linalg.svd(s * b @ a).Vh[0]
    assert abs(float(v @ want)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("method,params", [("arrow", {"k": 1}), ("phatgoose", {"k": 1, "steps": 3, "examples": 16})])
def test_routed_methods_build_load_and_generate(pool, tiny_dir, method, params):
    """Built through a recipe, loaded as an artifact: forward, generate with and without the KV cache agree."""
    from workbench.artifacts import load_artifact
    from workbench.recipes import build, parse_recipe

    _tagged_pool(pool, tiny_dir)
    art = build(parse_recipe(_recipe(method, **params)), log=lambda *a: None)
    loaded = load_artifact(art)
    ids = _ids(1, 6)
    with torch.no_grad():
        a = loaded.model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        b = loaded.model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)
    # k = 1: each token's output is exactly one expert's PEFT output at every module, so the whole
    # model is some per-token mix; with a router forced to one expert it is that expert (tested above)
    assert loaded.info["kind"] == "routed_lora"


def test_routed_bad_input(pool, tiny_dir):
    from workbench.errors import RecipeError
    from workbench.recipes import parse_recipe

    _tagged_pool(pool, tiny_dir)
    with pytest.raises(RecipeError, match="top-k 3 is larger than the number of experts"):
        parse_recipe(_recipe("arrow", k=3))
    pool.add(tiny_dir / "lora_a", "untagged")
    with pytest.raises(RecipeError, match="expert 'untagged' of pool 'demo' has no recorded training data"):
        parse_recipe({**_recipe("phatgoose"), "experts": ["a", "untagged"]})


def test_arrow_equals_peft_create_arrow_model(pool, tiny_dir, tmp_path, monkeypatch):
    """Same rank and targets (PEFT's requirement): our sparse Arrow equals PEFT's dense Arrow model.
    PEFT finds prototypes by 15 power iterations, we by exact SVD: on these random adapters
    (sigma_1 / sigma_2 ~ 1.1) 15 iterations reach cos 0.999 only, which flips top-k choices, so
    PEFT runs here with 2000 iterations (its own code, converged)."""
    from peft import ArrowConfig, create_arrow_model
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    power = ArrowLoraLinearLayer.top_right_singular_vec_from_BA
    monkeypatch.setattr(ArrowLoraLinearLayer, "top_right_singular_vec_from_BA",
                        lambda self, a, b, iters=15, eps=1e-8: power(self, a, b, iters=2000, eps=eps))

    from workbench.artifacts import load_artifact
    from workbench.recipes import build, parse_recipe
    from workbench.testing import make_tiny_lora

    paths = [make_tiny_lora(tiny_dir / "base", tmp_path / f"e{i}", seed=10 + i, r=4, alpha=8,
                            target_modules=("q_proj", "v_proj", "up_proj")) for i in range(3)]
    for i, p in enumerate(paths):
        pool.add(p, f"e{i}")
    art = build(parse_recipe(_recipe("arrow", k=2, temperature=1.0)), log=lambda *a: None)
    ours = load_artifact(art).model
    peft = create_arrow_model(pool.base.load().eval(), [str(p) for p in paths],
                              ArrowConfig(top_k=2, router_temperature=1.0, rng_seed=0)).eval()
    ids = _ids(3, 9, seed=7)
    with torch.no_grad():
        got, want = ours(input_ids=ids).logits, peft(input_ids=ids).logits
        base = pool.base.load()(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_trace_prompt_reports_forced_expert(two):
    """A router forced to expert b: every layer's usage is all b, each token's choice b."""
    from workbench.methods.routing import trace_prompt

    model, ctx = _routed(two, ["a", "b"])
    ctx.groups = [RoutedGroup(FixedRouter(["a", "b"], [0.0, 1.0], k=1), None)]
    model.routing = ctx
    tr = trace_prompt(model, two.base.tokenizer(), "12+30=")
    assert tr["experts"] == ["a", "b"] and len(tr["tokens"]) == 6
    assert tr["layers"] == [0, 1] and all(u == [0.0, 1.0] for u in tr["usage"])
    assert all(layer == [0.0, 1.0] for tok in tr["choices"] for layer in tok)
    ctx.groups = [RoutedGroup(FixedRouter(["a", "b"], [0.25, 0.75]), None)]
    tr = trace_prompt(model, two.base.tokenizer(), "12+30=")
    assert tr["usage"][0] == pytest.approx([0.25, 0.75])


def test_trace_prompt_refuses_empty_and_over_context_prompts_before_the_forward(two, monkeypatch):
    """The app calls `trace_prompt` directly: an empty prompt, or one longer than the model's context, is one line
    and the model never runs (the CLI checks the same before building)."""
    from workbench.errors import WorkbenchError
    from workbench.methods.routing import trace_prompt

    model, ctx = _routed(two, ["a", "b"])
    ctx.groups = [RoutedGroup(FixedRouter(["a", "b"], [0.0, 1.0], k=1), None)]
    model.routing = ctx
    tok = two.base.tokenizer()
    context = model.config.max_position_embeddings
    runs = []
    model.register_forward_pre_hook(lambda m, a: runs.append(1))
    for prompt, message in (("", "empty prompt"), ("  \n", "empty prompt"),
                            ("1 " * (context + 5), f"longer than the model's context \\({context:,} tokens\\)")):
        with pytest.raises(WorkbenchError, match=message):
            trace_prompt(model, tok, prompt)
    assert runs == []
    assert len(trace_prompt(model, tok, "1 " * 4)["tokens"]) <= context and runs == [1]


def test_phatgoose_gates_train_once_per_expert(pool, tiny_dir, monkeypatch):
    """A sweep over k reuses each expert's gate; the gate's loss falls on its own data."""
    from workbench.modules import routers  # phatgoose imports GateRouter from here when it builds
    from workbench.recipes import build, parse_recipe

    _tagged_pool(pool, tiny_dir)
    calls = []
    real = routers.GateRouter
    # a gate to train starts at zero (no init); the openness check rebuilds trained gates (init given)
    monkeypatch.setattr(routers, "GateRouter",
                        lambda *a, **k: (k.get("init") is None and calls.append(a[0])) or real(*a, **k))
    params = {"steps": 30, "examples": 32, "lr": 0.05, "accumulation": 1}
    a = build(parse_recipe(_recipe("phatgoose", k=1, **params)), log=lambda *x: None)
    b = build(parse_recipe(_recipe("phatgoose", k=2, **params)), log=lambda *x: None)
    assert a != b and calls == [["a"], ["b"]]
    meta = json.loads((b / "artifact.json").read_text())
    for name, loss in meta["gate_loss"].items():
        assert loss["mean_last_10"] < loss["first"], (name, loss)
    # each gate's openness on its own expert's tokens and on the other's, recorded in the artifact
    for name, o in meta["gate_openness"].items():
        other = "b" if name == "a" else "a"
        assert set(o["by_source"]) == {"a", "b"} and o["own"] == o["by_source"][name]
        assert o["other"] == o["by_source"][other] and 0 < o["own"] < 1 and 0 < o["other"] < 1


def test_phatgoose_accumulates_batches_per_step(pool, tiny_dir, monkeypatch):
    """accumulation = 3: three forwards (and backwards) of batch_size examples per optimizer step, the step's loss
    their mean; the effective batch is batch_size x accumulation."""
    import torch

    from workbench.recipes import build, parse_recipe

    _tagged_pool(pool, tiny_dir)
    sizes, steps = [], []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    from workbench.train import trainer

    real_collate = trainer.collate
    monkeypatch.setattr(trainer, "collate", lambda rows, pad: sizes.append(len(rows)) or real_collate(rows, pad))
    build(parse_recipe(_recipe("phatgoose", k=1, steps=4, examples=32, batch_size=5, accumulation=3)),
          log=lambda *x: None)
    assert len(steps) == 2 * 4  # two gates, four optimizer steps each
    assert sizes == [5] * (2 * 4 * 3)  # three batches of five per step


def test_route_trace_cli(pool, tiny_dir, tmp_path, run_cli):
    import yaml

    _tagged_pool(pool, tiny_dir)
    recipe = tmp_path / "arrow.yaml"
    recipe.write_text(yaml.safe_dump(_recipe("arrow", k=1)))
    code, _out, err = run_cli("route", "trace", str(recipe), "12+30=", "--out", str(tmp_path / "t.json"))
    assert code == 0, err
    tr = json.loads((tmp_path / "t.json").read_text())
    assert tr["recipe"] == "arrow-test" and tr["experts"] == ["a", "b"] and len(tr["choices"]) == 6
    assert all(abs(sum(u) - 1) < 1e-3 for u in tr["usage"])  # k = 1: one expert per token, weight 1
    code, _out, err = run_cli("route", "trace", str(tmp_path / "nope.yaml"), "x")
    assert code == 2 and "no recipe at" in err


def _forced_prototypes(router, keep: int):
    """The router's prototypes with every other expert's rows zeroed: zero rows are absent experts, so every
    token goes to `keep` alone, whatever it scores."""
    from workbench.modules.routers import PrototypeRouter

    protos = {m: torch.where(torch.arange(p.shape[0])[:, None] == keep, p, torch.zeros_like(p))
              for m, p in router.tensors().items()}
    cfg = router.config()
    return PrototypeRouter(cfg.pop("experts"), protos, **cfg)


@pytest.mark.parametrize("method,params", [("arrow", {"k": 2}), ("phatgoose", {"k": 2, "steps": 3, "examples": 16})])
def test_routed_artifact_forced_to_one_expert_equals_peft(pool, tiny_dir, tmp_path, method, params):
    """PHATGOOSE and Arrow artifacts with the router forced to expert i: that expert's PEFT output in forward
    (1e-5) and in generate (same tokens). The tiny experts adapt different modules: where the forced expert
    has no LoRA the router picks nobody (the base), exactly like PEFT."""
    from workbench.artifacts import load_artifact, read_artifact_meta
    from workbench.methods.routing import open_routed
    from workbench.modules.routers import load_router
    from workbench.recipes import build, parse_recipe

    _tagged_pool(pool, tiny_dir)
    art = build(parse_recipe(_recipe(method, **params)), log=lambda *a: None)
    ids = _ids(2, 7, seed=11)
    for i, name in enumerate(["a", "b"]):
        model, _tok, _, _ = open_routed(art, read_artifact_meta(art), router=_forced_prototypes(load_router(art), i))
        peft = pool.peft_model([name])
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5, rtol=0)
            ours = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
            want = peft.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(ours, want)
    assert load_artifact(art).model is not None


@pytest.mark.parametrize("method,params", [("arrow", {"k": 2}), ("phatgoose", {"k": 2, "steps": 3, "examples": 16})])
def test_routed_artifact_padding_invariance(pool, tiny_dir, method, params):
    """A sequence's logits alone == right-padded in a batch without a mask (lm-eval's loglikelihood call)
    == left-padded with its mask and positions."""
    from workbench.artifacts import load_artifact
    from workbench.recipes import build, parse_recipe

    _tagged_pool(pool, tiny_dir)
    model = load_artifact(build(parse_recipe(_recipe(method, **params)), log=lambda *a: None)).model
    seq, other = _ids(1, 5, seed=12), _ids(1, 9, seed=13)
    with torch.no_grad():
        alone = model(input_ids=seq).logits[0]
        right = model(input_ids=torch.cat([torch.cat([seq, torch.zeros(1, 4, dtype=torch.long)], 1), other])).logits[0, :5]
        left_ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), seq], 1), other])
        mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)]).long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        left = model(input_ids=left_ids, attention_mask=mask, position_ids=pos).logits[0, 4:]
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)


def test_phatgoose_scores_by_hand_absent_experts_and_unknown_modules():
    """E = 3, k = 2: weights = softmax over the top-2 of LN(h).LN(v)/sqrt(d), computed here independently;
    a zero prototype row is never chosen; a module the router has no prototypes for routes to nobody."""
    g = torch.Generator().manual_seed(21)
    d, t = 16, 10
    v = torch.randn(3, d, generator=g)
    x = torch.randn(t, d, generator=g) * 3 + 1
    r = PrototypeRouter(["a", "b", "c"], {"m": v}, k=2)
    idx, w = r.route("m", x)

    def ln(z):
        return (z - z.mean(-1, keepdim=True)) / (z.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()

    s = ln(x) @ ln(v).T / d ** 0.5
    p = torch.softmax(s, -1)
    top = p.topk(2, -1)
    torch.testing.assert_close(idx, top.indices)
    torch.testing.assert_close(w, top.values / top.values.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    v2 = v.clone()
    v2[1] = 0
    idx2, w2 = PrototypeRouter(["a", "b", "c"], {"m": v2}, k=2).route("m", x)
    assert not (idx2 == 1).any() and torch.allclose(w2.sum(-1), torch.ones(t))
    idx3, w3 = PrototypeRouter(["a", "b", "c"], {"m": v2}, k=1).route("elsewhere", x)
    assert (idx3 == -1).all() and (w3 == 0).all()


def test_gate_multiplies_lora_output_by_sigmoid(two):
    """PHATGOOSE's training gate: base + sigmoid(v.h) * s B A h per token; at init (v = 0) half the LoRA."""
    model, ctx = _routed(two, ["a", "b"])
    mods = routed_modules(model)
    gate = GateRouter(["a"], {m: lin.base.in_features for m, lin in mods.items()})
    ids = _ids()
    with torch.no_grad():
        with ctx.use(groups=[RoutedGroup(gate, None, experts=torch.tensor([0]))], dense=True):
            gated = model(input_ids=ids).logits
        with ctx.use(groups=[RoutedGroup(FixedRouter(["a", "b"], [0.5, 0.0], k=1), None)]):
            half = model(input_ids=ids).logits
    torch.testing.assert_close(gated, half, atol=1e-5, rtol=0)


def test_router_without_a_module_in_a_wider_model(pool, tiny_dir):
    """A routed group whose router knows only some wrapped modules (other adapters add more) routes the rest
    to nobody instead of failing the whole batch (serving mixes such groups with plain adapters)."""
    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    model, ctx = _routed(pool, ["a", "b"])
    mods = routed_modules(model)
    a_only = {t[: -len(".weight")] for t in pool.expert("a").delta_names()}
    protos = {m: torch.randn(1, mods[m].base.in_features) for m in a_only}
    router = PrototypeRouter(["a"], protos, k=1)
    with torch.no_grad(), ctx.use(groups=[RoutedGroup(router, None, experts=torch.tensor([0]))]):
        got = model(input_ids=_ids()).logits
    torch.testing.assert_close(got, _peft_logits(pool, "a", _ids()), atol=1e-5, rtol=0)


def test_corrupt_router_file_is_one_line(tmp_path):
    from workbench.errors import WorkbenchError

    r = FixedRouter(["a", "b"], [0.5, 0.5])
    r.save(tmp_path / "r")
    (tmp_path / "r" / "router.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WorkbenchError, match=r"cannot load router .*: \w+"):
        load_router(tmp_path / "r")
    (tmp_path / "r" / "router.json").write_text('{"router": "fixed", "config": {}}')
    with pytest.raises(WorkbenchError, match="cannot load router"):
        load_router(tmp_path / "r")


def test_avg_act_prototypes_are_mean_module_inputs_under_peft(pool, tiny_dir):
    """avg_act's prototype of expert a at a module = the mean input of that module over a's training tokens
    with a applied, computed here through PEFT's own model with a hook."""
    import random

    from workbench.artifacts import load_artifact
    from workbench.modules.routers import load_router
    from workbench.recipes import build, parse_recipe
    from workbench.tasks.suite import load_split
    from workbench.train.trainer import collate, encode

    _tagged_pool(pool, tiny_dir)
    art = build(parse_recipe(_recipe("avg_act", k=1, examples=8, batch_size=8)), log=lambda *a: None)
    protos = load_router(art).tensors()
    tok = pool.base.tokenizer()
    rows = load_split("addition", "train")
    random.Random(0).shuffle(rows)
    batch = collate([encode(tok, r["question"], r["answer"], 128) for r in rows[:8]], tok.pad_token_id)
    peft = pool.peft_model(["a"])
    module = "model.layers.1.self_attn.q_proj"
    seen = []
    target = dict(peft.named_modules())[f"base_model.model.{module}"]
    h = target.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    with torch.no_grad():
        peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h.remove()
    m = batch["attention_mask"].reshape(-1).float()
    want = (seen[0].reshape(-1, seen[0].shape[-1]) * m[:, None]).sum(0) / m.sum()
    torch.testing.assert_close(protos[module][0], want, atol=1e-5, rtol=1e-5)
    assert load_artifact(art).info["kind"] == "routed_lora"


def test_route_traces_cli_counts_layers_where_each_task_expert_tops(pool, tiny_dir, tmp_path, run_cli):
    import yaml

    from workbench.catalog import scan
    from workbench.tasks.suite import load_split

    _tagged_pool(pool, tiny_dir)
    recipe = tmp_path / "arrow.yaml"
    recipe.write_text(yaml.safe_dump(_recipe("arrow", k=1)))
    out = tmp_path / "results" / "traces"
    code, _out, err = run_cli("route", "traces", str(recipe), "--out", str(out))
    assert code == 0, err
    summary = json.loads((tmp_path / "results" / "checks" / "routing-traces-arrow-test.json").read_text())
    tags = {e.name: e.entry.tags["task"] for e in pool.experts if e.kind == "lora"}
    assert set(summary["tasks"]) == set(tags.values())
    for task, r in summary["tasks"].items():
        tr = json.loads((out / f"arrow-test-{task}.json").read_text())
        assert tr["prompt"] == load_split(task, "test")[0]["question"]
        top = [tr["experts"][max(range(len(u)), key=u.__getitem__)] for u in tr["usage"]]
        assert r["top_per_layer"] == top and r["top_layers"] == sum(t == r["expert"] for t in top)
        assert tags[r["expert"]] == task
    cat = scan(tmp_path / "results")  # the app reads them: traces and one check, no warnings
    assert len(cat.traces) == len(tags) and not cat.warnings and len(cat.checks) == 1


class _ParityRouter:
    """Token t goes to expert t % 2 (weight 1), or with `by_layer` every token of an even layer to a and of an
    odd layer to b: routers whose accuracy is known by counting."""

    experts = ["a", "b"]
    k = 1  # one expert per token (router accuracy's in-top-k needs the router's k)

    def __init__(self, by_layer: bool = False, prefix: int = 0):
        self.by_layer, self.prefix = by_layer, prefix

    def route(self, module, x):
        if self.prefix:  # a sequence's first `prefix` tokens to a, the rest to b
            return (torch.arange(x.shape[0]) >= self.prefix).long()[:, None], torch.ones(x.shape[0], 1)
        if self.by_layer:
            layer = int(module.split(".layers.")[1].split(".")[0])
            return torch.full((x.shape[0], 1), layer % 2), torch.ones(x.shape[0], 1)
        t = torch.arange(x.shape[0])
        return (t % 2)[:, None], torch.ones(x.shape[0], 1)


def test_router_accuracy_counts_tokens_per_layer(two):
    """Per layer, the share of a task's tokens (pooled over its examples) whose top-1 is its own expert: with the
    parity router, sum(ceil(T/2)) / sum(T) for a and sum(floor(T/2)) / sum(T) for b in every layer; routed by
    layer parity, 1 in a's layers and 0 in b's; with a fixed router to b, task of b is 1.0 everywhere, a's 0,
    and a is in the top-2 of every token."""
    import math

    from workbench.methods.routing import router_accuracy
    from workbench.tasks.suite import ADD_SPECIAL_TOKENS, load_split

    model, ctx = _routed(two, ["a", "b"])
    model.routing = ctx
    tok = two.base.tokenizer()
    tasks = {"a": "word_count", "b": "reverse_words"}  # texts of varying length
    layers = sorted({int(m.split(".layers.")[1].split(".")[0]) for m in routed_modules(model)})
    assert len(layers) > 1
    ctx.groups = [RoutedGroup(_ParityRouter(), None)]
    rec = router_accuracy(model, tok, tasks, n=3)
    assert rec["layers"] == layers
    for expert, task in tasks.items():
        lengths = [len(tok(r["question"] + " " + r["answer"], add_special_tokens=ADD_SPECIAL_TOKENS)["input_ids"])
                   for r in load_split(task, "validation")[:3]]
        assert len(set(lengths)) > 1  # pooled over tokens differs from a mean over examples
        want = round(sum(math.ceil(t / 2) if expert == "a" else t // 2 for t in lengths) / sum(lengths), 4)
        assert rec["tasks"][task]["top1"] == [want] * len(layers), (task, want)
        assert rec["tasks"][task]["mean_in_topk"] == want  # k = 1: in the top-k = top-1
    # the first 8 tokens to a: pooled over tokens 8n / sum(T), not the mean over examples of 8 / T
    ctx.groups = [RoutedGroup(_ParityRouter(prefix=8), None)]
    rec = router_accuracy(model, tok, tasks, n=3)
    for expert, task in tasks.items():
        lengths = [len(tok(r["question"] + " " + r["answer"], add_special_tokens=ADD_SPECIAL_TOKENS)["input_ids"])
                   for r in load_split(task, "validation")[:3]]
        own = [8 if expert == "a" else t - 8 for t in lengths]
        want, per_example = sum(own) / sum(lengths), sum(o / t for o, t in zip(own, lengths)) / len(lengths)
        assert abs(want - per_example) > 2e-3, (task, lengths)  # the two aggregations are told apart
        assert rec["tasks"][task]["top1"] == [round(want, 4)] * len(layers), (task, want, per_example)
    ctx.groups = [RoutedGroup(_ParityRouter(by_layer=True), None)]
    rec = router_accuracy(model, tok, tasks, n=2)
    assert rec["tasks"]["word_count"]["top1"] == [1.0 if i % 2 == 0 else 0.0 for i in layers]
    assert rec["tasks"]["reverse_words"]["top1"] == [0.0 if i % 2 == 0 else 1.0 for i in layers]
    ctx.groups = [RoutedGroup(FixedRouter(["a", "b"], [0.3, 0.7], k=2), None)]
    rec = router_accuracy(model, tok, tasks, n=2)
    assert set(rec["tasks"]["reverse_words"]["top1"]) == {1.0} and set(rec["tasks"]["word_count"]["top1"]) == {0.0}
    assert rec["tasks"]["word_count"]["mean_in_topk"] == 1.0 and rec["tasks"]["word_count"]["confusion"] == {"a": 0.0, "b": 1.0}
    with pytest.raises(Exception, match=r"experts \['c'\] are not routed"):
        router_accuracy(model, tok, {"c": "word_count"})
    with pytest.raises(Exception, match=r"experts \['a', 'b'\] share task 'word_count'"):
        router_accuracy(model, tok, {"a": "word_count", "b": "word_count"})


def test_route_accuracy_cli_writes_json_and_plots(pool, tiny_dir, tmp_path, run_cli):
    """`workbench route accuracy` on a PHATGOOSE recipe: per-task, per-layer figures in [0, 1] for every tagged
    expert's task, the gates' loss curves (one per expert, `steps` long), both plotted; the app reads the JSON."""
    import yaml

    from workbench.catalog import scan

    _tagged_pool(pool, tiny_dir)
    recipe = tmp_path / "goose.yaml"
    recipe.write_text(yaml.safe_dump(_recipe("phatgoose", k=1, steps=4, examples=16)))
    out = tmp_path / "results" / "checks"
    code, _out, err = run_cli("route", "accuracy", str(recipe), "--n", "2", "--out", str(out))
    assert code == 0, err
    rec = json.loads((out / "router-accuracy-phatgoose-test.json").read_text())
    tags = {e.name: e.entry.tags["task"] for e in pool.experts if e.kind == "lora"}
    assert {t: v["expert"] for t, v in rec["tasks"].items()} == {t: e for e, t in tags.items()}
    for v in rec["tasks"].values():
        assert len(v["top1"]) == len(rec["layers"]) and all(0 <= x <= 1 for x in v["top1"] + v["in_topk"])
        assert v["in_topk"] == v["top1"]  # k = 1
    from workbench.artifacts import load_artifact
    from workbench.methods.routing import router_accuracy
    from workbench.recipes import build, parse_recipe

    loaded = load_artifact(build(parse_recipe(_recipe("phatgoose", k=1, steps=4, examples=16)), log=lambda *a: None))
    direct = router_accuracy(loaded.model, loaded.tokenizer, {e: t for e, t in tags.items()}, n=2)
    assert rec["tasks"] == direct["tasks"] and rec["layers"] == direct["layers"]
    curves = json.loads((out / "gate-loss-phatgoose-test.json").read_text())["curves"]
    assert set(curves) == set(tags) and all(len(c) == 4 for c in curves.values())
    assert (out / "router-accuracy-phatgoose-test.svg").stat().st_size > 0
    assert (out / "gate-loss-phatgoose-test.svg").stat().st_size > 0
    assert not scan(tmp_path / "results").warnings


def test_routed_artifact_built_in_another_checkout_loads_here(pool, tiny_dir, tmp_path, monkeypatch):
    """The artifact cache is shared by checkouts: an Arrow artifact built over pool `demo` in one checkout is
    reused over the same pool in another (the first one deleted) and then loads over the new one."""
    import shutil

    from workbench.artifacts import load_artifact, read_artifact_meta
    from workbench.recipes import build, parse_recipe

    _tagged_pool(pool, tiny_dir)
    first = build(parse_recipe(_recipe("arrow", k=1)), log=lambda *a: None)
    ids = _ids(1, 6, seed=5)
    with torch.no_grad():
        want = load_artifact(first).model(input_ids=ids).logits
    moved = tmp_path / "other-checkout" / "adapters"
    shutil.copytree(pool.root.parent, moved)
    shutil.rmtree(pool.root)
    monkeypatch.setenv("WORKBENCH_POOLS", str(moved))
    again = build(parse_recipe(_recipe("arrow", k=1)), log=lambda *a: None)
    assert again == first and read_artifact_meta(again)["pool_root"] != str((moved / "demo").resolve())
    with torch.no_grad():
        torch.testing.assert_close(load_artifact(again).model(input_ids=ids).logits, want, atol=0, rtol=0)
    from workbench.pool import Pool
    from workbench.serving.engine import MultiLoraModel

    logs = []
    engine = MultiLoraModel.from_pool(Pool.open("demo"), log=logs.append)  # the server here finds it too
    assert "arrow-test" in engine.model_names() and not logs
    # another pool that holds the same experts is not this pool: it does not list the artifact
    elsewhere = Pool.create("elsewhere", base=str(tiny_dir / "base"))
    elsewhere.add(tiny_dir / "lora_a", "a", tags={"task": "addition"}, data=suite_data("addition"))
    elsewhere.add(tiny_dir / "lora_b", "b", tags={"task": "sorting"}, data=suite_data("sorting"))
    assert MultiLoraModel.from_pool(elsewhere).model_names() == ["base", "a", "b"]


def test_gates_for_another_pool_or_expert_set_are_refused_and_nothing_is_written(pool, tiny_dir, tmp_path):
    """PHATGOOSE gates built for experts that changed since, for another expert set, or for a pool over another
    base: one line naming the problem, and neither the artifact nor the pool changes."""
    from conftest import snapshot

    from workbench.artifacts import load_artifact, read_artifact_meta
    from workbench.errors import WorkbenchError
    from workbench.methods.routing import open_routed, routed_problem
    from workbench.pool import Pool
    from workbench.recipes import build, parse_recipe
    from workbench.testing import make_tiny_base

    _tagged_pool(pool, tiny_dir)
    art = build(parse_recipe(_recipe("phatgoose", k=1, steps=2, examples=8)), log=lambda *a: None)
    meta = read_artifact_meta(art)
    assert routed_problem(pool, meta) is None
    # another expert set: the router routes over (a, b), the artifact claims (b, a)
    with pytest.raises(WorkbenchError, match=r"routes over \['a', 'b'\], not \['b', 'a'\]"):
        open_routed(art, {**meta, "experts": ["b", "a"]})
    # a pool over another base (a wider MLP: weights of another shape)
    make_tiny_base(tmp_path / "base2", seed=7, intermediate_size=72)
    other = Pool.create("other", base=str(tmp_path / "base2"))
    assert "another base than the router was built for" in routed_problem(other, meta)
    # an expert replaced since the gates were trained (same name, other weights)
    pool.remove("a")
    pool.add(tiny_dir / "lora_b", "a", tags={"task": "addition"}, data=suite_data("addition"))
    before = snapshot(art), snapshot(pool.root)
    with pytest.raises(WorkbenchError, match=r"its experts \['a'\] changed since the router was built; rebuild it") as e:
        load_artifact(art)
    assert "\n" not in str(e.value)
    assert (snapshot(art), snapshot(pool.root)) == before


def test_usage_reports_per_task_entropy_and_the_own_experts_share(two):
    """usage_stats per task: the weight shares, their entropy normalised by log E, and (tasks labelled by experts)
    the own expert's share. A fixed 0.3/0.7 mix: each task's entropy is H(0.3, 0.7) / log 2 and a's own share 0.3,
    b's 0.7; a router that sends a's rows to a and b's to b: entropy 0 and own share 1."""
    import math

    from workbench.methods.routing import usage_stats

    model, ctx = _routed(two, ["a", "b"])
    model.routing = ctx
    tok = two.base.tokenizer()
    rows = {"a": [{"question": "Add: 1+2\nAnswer:", "answer": "3"}] * 2,
            "b": [{"question": "Sort: c a b\nAnswer:", "answer": "a b c"}] * 2}
    ctx.groups = [RoutedGroup(FixedRouter(["a", "b"], [0.3, 0.7], k=2), None)]
    u = usage_stats(model, tok, rows, n=2)
    h = -(0.3 * math.log(0.3) + 0.7 * math.log(0.7)) / math.log(2)
    assert u["per_task_weight_entropy"] == {"a": pytest.approx(h, abs=1e-4), "b": pytest.approx(h, abs=1e-4)}
    assert u["own_weight_share"] == {"a": pytest.approx(0.3, abs=1e-4), "b": pytest.approx(0.7, abs=1e-4)}
    # every token mixes 0.3 / 0.7: its own entropy is the same h; its top-1 is always b
    assert u["per_task_token_entropy"] == {"a": pytest.approx(h, abs=1e-4), "b": pytest.approx(h, abs=1e-4)}
    assert u["own_top1_share"] == {"a": 0.0, "b": 1.0}

    class OneHotAlternating:  # one expert per token, alternating: pooled shares uniform, each token's mixture one-hot
        experts, k = ["a", "b"], 1

        def route(self, module, x):
            return (torch.arange(x.shape[0]) % 2)[:, None], torch.ones(x.shape[0], 1)

    ctx.groups = [RoutedGroup(OneHotAlternating(), None)]
    u = usage_stats(model, tok, rows, n=2)
    for t in ("a", "b"):
        assert u["per_task_weight_entropy"][t] == pytest.approx(1.0, abs=0.05)  # looks uniform pooled ...
        assert u["per_task_token_entropy"][t] == 0.0  # ... but no token is mixed
        assert u["own_top1_share"][t] == pytest.approx(0.5, abs=0.1)

    class HalfBaseHalfTied:  # even tokens: no expert (the base alone, index -1); odd tokens: a and b tied at 0.5
        experts, k = ["a", "b"], 2

        def route(self, module, x):
            t = x.shape[0]
            odd = (torch.arange(t) % 2 == 1)[:, None]
            idx = torch.where(odd, torch.tensor([[0, 1]]), torch.tensor([[-1, -1]]))
            return idx, torch.where(odd, torch.full((t, 2), 0.5), torch.zeros(t, 2))

    ctx.groups = [RoutedGroup(HalfBaseHalfTied(), None)]
    u = usage_stats(model, tok, rows, n=2)
    for t in ("a", "b"):  # the base-only tokens are no one-hot gate, and a tie is no win for the first expert
        assert u["per_task_token_entropy"][t] == pytest.approx(1.0, abs=1e-4)
        assert u["own_top1_share"][t] == pytest.approx(0.5, abs=1e-4)

    class ByRow:  # the first sequence's rows are a's (its questions start with "Add")
        experts, k = ["a", "b"], 1

        def __init__(self):
            self.to = 0

        def route(self, module, x):
            return torch.full((x.shape[0], 1), self.to), torch.ones(x.shape[0], 1)

    router = ByRow()
    ctx.groups = [RoutedGroup(router, None)]
    shares = {}
    for name, to in (("a", 0), ("b", 1)):
        router.to = to
        shares[name] = usage_stats(model, tok, {name: rows[name]}, n=2)
    assert shares["a"]["per_task_weight_entropy"] == {"a": 0.0} and shares["a"]["own_weight_share"] == {"a": 1.0}
    assert shares["b"]["own_weight_share"] == {"b": 1.0}
    assert shares["a"]["own_top1_share"] == {"a": 1.0} and shares["b"]["per_task_token_entropy"] == {"b": 0.0}


def test_routed_output_by_hand_with_temperature_and_top2_on_a_module_only_some_experts_adapt(pool, tiny_dir):
    """Issue 26's review: the prototype router's "present" path (32+ experts, a module adapted by some of them only:
    scored over those) ignored no temperature test. Arrow with k = 2 and T = 0.25 over 32 synthesized adapters of
    varied target modules: a module's output equals W0 x + sum_j softmax(top2(|x . p|) / T)_j s_j B_j A_j x over the
    experts that adapt it, computed by hand from the artifact's prototypes and the experts' own LoRA files."""
    from safetensors.torch import load_file

    from workbench.artifacts import load_artifact
    from workbench.modules.routed_lora import RoutedLoraLinear
    from workbench.modules.routers import COMPACT_MIN_EXPERTS
    from workbench.pool import Pool
    from workbench.recipes import build, parse_recipe
    from workbench.synth import synthesize

    pool.add(tiny_dir / "lora_a", "addition", tags={"task": "addition"}, data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "sorting", tags={"task": "sorting"}, data=suite_data("sorting"))
    synthesize("many", COMPACT_MIN_EXPERTS, source="demo")
    many = Pool.open("many")
    temperature = 0.25
    art = build(parse_recipe({"name": "arrow-many", "method": "arrow", "pool": "many",
                              "parameters": {"k": 2, "temperature": temperature}}), log=lambda *a: None)
    router = load_router(art)
    protos_all = load_file(str(art / "router.safetensors"))
    # a module adapted by some experts only, and by at least 3 (so that top-2 chooses among them)
    name = next(m for m in sorted(router._present) if 3 <= len(router._present[m]) < COMPACT_MIN_EXPERTS)
    present = router._present[name]
    loaded = load_artifact(art)
    layer = next(m for n, m in loaded.model.named_modules() if n.endswith(name) and isinstance(m, RoutedLoraLinear))
    seen = {}
    hook = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    ids = loaded.tokenizer("12+30=7 and 5+5=10", return_tensors="pt").input_ids
    with torch.no_grad():
        loaded.model(input_ids=ids)
    hook.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).float()
    protos = protos_all[name][present]  # the adapting experts' rows, in the router's order
    top = (x @ protos.T).abs().topk(2, dim=-1)  # Arrow: |x . p|, no standardisation, no scaling
    w = torch.exp(top.values / temperature)
    w = w / w.sum(-1, keepdim=True)
    y = x @ layer.base.weight.float().T
    names = router.experts
    for slot in range(2):
        for j, e in enumerate(present.tolist()):
            a, b, s = many.expert(names[e]).lora_factors(f"{name}.weight")
            chosen = (top.indices[:, slot] == j).float()[:, None]
            y = y + chosen * w[:, slot:slot + 1] * s * (x @ a.T) @ b.T
    assert torch.allclose(seen["y"].reshape(y.shape).float(), y, atol=1e-5, rtol=1e-4)
    assert (w - torch.softmax(top.values, dim=-1)).abs().max() > 0.02  # T matters for these tokens
