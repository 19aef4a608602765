"""Learned mixtures on the routed-LoRA layer: MoLE (gates over frozen LoRA experts) and SMoRA (ranks as experts)."""

import json
import math

import pytest
import torch

from workbench.modules.routed_lora import RoutedGroup, routed_modules, wrap_experts, wrap_model
from conftest import suite_data


@pytest.fixture()
def two(pool, tiny_dir):
    pool.add(tiny_dir / "lora_a", "a", tags={"task": "addition"}, data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "b", tags={"task": "sorting"}, data=suite_data("sorting"))
    return pool


def _ids(n=2, s=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 60, (n, s), generator=g)


def _mole_router(model, names, seed=0, **kw):
    from workbench.methods.mole import MoleRouter

    mods = routed_modules(model)
    router = MoleRouter(names, {m: lin.base.out_features for m, lin in mods.items()}, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial gates: every term of the logits matters
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return router


def _recipe(method, **params):
    return {"name": f"{method}-test", "method": method, "pool": "demo", "parameters": params}


# ---------------------------------------------------------------- MoLE


@pytest.mark.parametrize("keep", [0, 1])
def test_mole_one_hot_gates_equal_that_experts_peft_output(two, keep):
    """Gates masked to one expert (the others' logits -inf: weight exactly 0, the kept one exactly 1): that
    expert's PEFT logits (1e-5), on the sparse (serving) and dense (training) paths, and in generate."""
    names = ["a", "b"]
    model = two.base.load().eval()
    ctx = wrap_experts(model, [two.expert(n) for n in names])
    router = _mole_router(model, names, active=[names[keep]])
    ids = _ids(seed=3)
    peft = two.peft_model([names[keep]])
    with torch.no_grad():
        want = peft(input_ids=ids).logits
        with ctx.use(groups=[RoutedGroup(router, None)]):
            sparse = model(input_ids=ids).logits
        with ctx.use(groups=[RoutedGroup(router, None)], dense=True):
            dense = model(input_ids=ids).logits
        torch.testing.assert_close(sparse, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(dense, want, atol=1e-5, rtol=0)
        ctx.groups = [RoutedGroup(router, None)]
        ours = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        theirs = peft.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    assert (want - two.base.load()(input_ids=ids).logits).abs().max() > 1e-3  # the expert does something


def test_mole_weights_by_hand_and_masked_subset_renormalises(two):
    """w = softmax((LN(concat_i E_i(x)) . e + b) / tau), E_i(x) = s_i B_i A_i x from the PEFT files; a masked
    subset gives the full weights renormalised over the subset."""
    from workbench.methods.mole import MoleRouter

    names = ["a", "b"]
    model = two.base.load().eval()
    wrap_experts(model, [two.expert(n) for n in names])
    router = _mole_router(model, names, seed=4)
    module = "model.layers.0.self_attn.q_proj"  # both tiny experts adapt q_proj
    x = torch.randn(5, routed_modules(model)[module].base.in_features, generator=torch.Generator().manual_seed(0))
    outs = []
    for n in names:
        a, b, s = two.expert(n).lora_factors(f"{module}.weight")
        outs.append(s * x @ a.T @ b.T)
    outs = torch.stack(outs, 1)  # [T, E, d_out]
    flat = outs.reshape(5, -1)
    z = (flat - flat.mean(-1, keepdim=True)) / torch.sqrt(flat.var(-1, unbiased=False, keepdim=True) + 1e-5)
    key = router.keys[module]
    logits = (z @ router.e[key] + router.b[key]) / router.log_tau[key].exp()
    with torch.no_grad():
        got = router.mix(module, x, outs)
        torch.testing.assert_close(got, torch.softmax(logits, -1), atol=1e-5, rtol=1e-5)
        three = MoleRouter(["a", "b", "c"], {module: outs.shape[-1]})
        with torch.no_grad():
            for p in three.parameters():
                p.copy_(torch.randn(p.shape))
        outs3 = torch.cat([outs, torch.randn(5, 1, outs.shape[-1])], 1)
        full = three.mix(module, x, outs3)
        three.set_active(["a", "c"])
        sub = three.mix(module, x, outs3)
    assert torch.all(sub[:, 1] == 0)
    keep = full[:, [0, 2]]
    torch.testing.assert_close(sub[:, [0, 2]], keep / keep.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_mole_never_weights_an_expert_where_it_adapts_nothing(two):
    """The tiny experts adapt different modules (a: q, v, down; b: q, o, up). Where only a adapts (v_proj) its
    weight is 1 and b's 0, whatever the gates say; where both adapt (q_proj) both get softmax weight; the router
    saves and reloads that; a build over them is keyed apart from one made before the fix, and every weight it
    records in a module sums to 1 over the experts that adapt it."""
    from workbench.methods import METHODS
    from workbench.methods.mole import absent_experts
    from workbench.modules.routers import MoleRouter

    names = ["a", "b"]
    model = two.base.load().eval()
    wrap_experts(model, [two.expert(n) for n in names])
    experts = [two.expert(n) for n in names]
    absent = absent_experts(experts, list(routed_modules(model)))
    assert absent["model.layers.0.self_attn.v_proj"] == ["b"] and absent["model.layers.0.mlp.up_proj"] == ["a"]
    assert absent["model.layers.0.self_attn.q_proj"] == []
    router = _mole_router(model, names, seed=5, absent=absent)
    d = {m: lin.base.out_features for m, lin in routed_modules(model).items()}
    g = torch.Generator().manual_seed(1)
    for module, alone in (("model.layers.0.self_attn.v_proj", 0), ("model.layers.0.mlp.up_proj", 1)):
        outs = torch.randn(4, 2, d[module], generator=g)
        w = router.mix(module, None, outs)
        assert torch.equal(w[:, alone], torch.ones(4)) and torch.equal(w[:, 1 - alone], torch.zeros(4))
    q = "model.layers.0.self_attn.q_proj"
    w = router.mix(q, None, torch.randn(4, 2, d[q], generator=g))
    assert bool((w > 0).all())
    again = MoleRouter.from_saved(router.config(), router.tensors())
    assert again.absent == router.absent
    router.set_active(["b"])  # no active expert adapts v_proj: the base alone there
    assert torch.equal(router.mix("model.layers.0.self_attn.v_proj", None, torch.randn(3, 2, d["model.layers.0.self_attn.v_proj"])),
                       torch.zeros(3, 2))
    mole = METHODS.get("mole")()
    params = mole.Params.model_validate({})
    assert mole.key_inputs(experts, params).get("absent_masked") is True
    same = [two.expert("a"), two.expert("a")]
    assert "absent_masked" not in mole.key_inputs(same, params)  # a uniform pool keeps its key


def test_mole_gradient_reaches_only_the_gates(two):
    names = ["a", "b"]
    model = two.base.load()
    for p in model.parameters():
        p.requires_grad_(False)
    ctx = wrap_experts(model, [two.expert(n) for n in names])
    router = _mole_router(model, names, seed=5)
    ids = _ids(seed=6)
    with ctx.use(groups=[RoutedGroup(router, None)], dense=True):
        model(input_ids=ids, labels=ids).loss.backward()
    for name, p in router.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # e, b and tau of every module learn
    assert all(p.grad is None for p in model.parameters())  # base frozen (routed layers' base linears included)
    for lin in routed_modules(model).values():  # the experts' factors are plain tensors outside autograd
        assert not any(t.requires_grad for t in [*lin.weights.a, *lin.weights.b])


def test_balance_loss_by_hand():
    from workbench.methods.mole import balance_loss

    w1 = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    w2 = torch.tensor([[0.6, 0.4], [0.3, 0.7], [1.0, 0.0]])
    mask = torch.tensor([1, 1, 0])  # the third token is padding
    q = (torch.tensor([0.9, 0.1]) + torch.tensor([0.5, 0.5]) + torch.tensor([0.6, 0.4]) + torch.tensor([0.3, 0.7])) / 4
    assert float(balance_loss([w1, w2], mask)) == pytest.approx(float(-(q.log().sum())), rel=1e-6)
    uniform = torch.full((4, 2), 0.5)
    assert float(balance_loss([uniform])) == pytest.approx(2 * math.log(2), rel=1e-6)  # its minimum: N log N


def test_mole_build_masked_subset_reuses_gates_and_loads(two, monkeypatch):
    """Built through a recipe: gates train once (loss curve and usage in artifact.json); `use` builds a masked
    artifact from the cached gates without training; both load for lm-eval and generate with = without cache."""
    from workbench.artifacts import load_artifact, read_artifact_meta
    from workbench.methods import mole
    from workbench.recipes import build, parse_recipe

    art = build(parse_recipe(_recipe("mole", steps=4, examples=6, batch_size=2)), log=lambda *a: None)
    meta = read_artifact_meta(art)
    assert meta["gates"] == "trained" and len(meta["loss_curve"]) == 4
    assert set(meta["usage"]) >= {"weight_share", "weight_entropy", "max_weight_share"}
    assert sum(meta["usage"]["weight_share"]) == pytest.approx(1.0, abs=1e-3)
    calls = []
    monkeypatch.setattr(mole.Mole, "_train", lambda self, *a, **k: calls.append(1) or [])
    sub = build(parse_recipe(_recipe("mole", steps=4, examples=6, batch_size=2, use=["b"])), log=lambda *a: None)
    assert not calls and read_artifact_meta(sub)["gates"] == "cache"
    loaded, alone = load_artifact(sub), two.peft_model(["b"])
    ids = _ids(1, 6, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, alone(input_ids=ids).logits, atol=1e-5, rtol=0)
        full = load_artifact(art).model
        a = full.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        b = full.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_mole_training_loss_is_task_plus_half_the_balance_loss(two):
    """At step 0 the gates are uniform (e = 0, b = 0), so L_bal = E log E: the first recorded loss with balance
    0.5 exceeds the one with balance 0 (same batch, same init) by 0.5 * 2 log 2."""
    from workbench.artifacts import read_artifact_meta
    from workbench.recipes import build, parse_recipe

    curves = {}
    for w in (0.5, 0.0):
        art = build(parse_recipe(_recipe("mole", steps=1, examples=4, batch_size=2, balance=w)), log=lambda *a: None)
        curves[w] = read_artifact_meta(art)["loss_curve"]
    assert curves[0.5][0] - curves[0.0][0] == pytest.approx(0.5 * 2 * math.log(2), abs=2e-5)


def test_mole_gates_follow_the_expert_order(two):
    """Gates trained for [a, b] are not reused for [b, a] (row i of the gate is expert i): new gates train."""
    from workbench.artifacts import read_artifact_meta
    from workbench.recipes import build, parse_recipe

    kw = dict(steps=2, examples=4, batch_size=2)
    first = build(parse_recipe({**_recipe("mole", **kw), "experts": ["a", "b"]}), log=lambda *a: None)
    again = build(parse_recipe({**_recipe("mole", **kw), "name": "mole-again", "experts": ["a", "b"], "parameters":
                                {**kw, "use": ["a", "b"]}}), log=lambda *a: None)
    swapped = build(parse_recipe({**_recipe("mole", **kw), "experts": ["b", "a"]}), log=lambda *a: None)
    assert read_artifact_meta(first)["gates"] == "trained" and read_artifact_meta(again)["gates"] == "cache"
    assert read_artifact_meta(swapped)["gates"] == "trained"


def test_mole_bad_input_one_line_nothing_written(two, tiny_dir, pools):
    from conftest import snapshot

    from workbench.errors import RecipeError
    from workbench.pool import Pool
    from workbench.recipes import build, parse_recipe

    art = build(parse_recipe(_recipe("mole", steps=2, examples=4, batch_size=2)), log=lambda *a: None)
    two.add(tiny_dir / "lora_a", "c", tags={"task": "unit_conversion"}, data=suite_data("unit_conversion"))
    before = snapshot(pools)
    cases = [
        ({"use": ["zzz"]}, "MoLE 'use' names \\['zzz'\\]: the gates are trained on \\['a', 'b', 'c'\\]"),
        ({"gates_from": str(art)}, "was trained on experts \\['a', 'b'\\], not on \\['a', 'b', 'c'\\]"),
    ]
    for params, msg in cases:
        with pytest.raises(RecipeError, match=msg) as err:
            parse_recipe({**_recipe("mole", **params), "experts": ["a", "b", "c"]})
        assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="has gates reading 'outputs', not 'none'") as err:
        parse_recipe({**_recipe("mole", gates_from=str(art), gate_input="none"), "experts": ["a", "b"]})
    assert "\n" not in str(err.value)
    full_only = Pool.create("fullpool", base=str(tiny_dir / "base"))
    full_only.add(tiny_dir / "full_c", "c", tags={"task": "addition"}, data=suite_data("addition"))
    full_only.add(tiny_dir / "full_c", "d", tags={"task": "sorting"}, data=suite_data("sorting"))
    with pytest.raises(RecipeError, match="pool 'fullpool' has no LoRA experts: MoLE gates LoRA experts") as err:
        parse_recipe({**_recipe("mole"), "pool": "fullpool"})
    assert "\n" not in str(err.value)
    assert {k: v for k, v in snapshot(pools).items() if not k.startswith("fullpool")} == before


# ---------------------------------------------------------------- SMoRA


def _smora(model, rank=6, k=3, seed=0, **kw):
    from workbench.methods.smora import SmoraRouter

    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1]
            in ("q_proj", "v_proj", "down_proj")}
    router = SmoraRouter(rank, {n: [m.in_features, m.out_features] for n, m in mods.items()}, k=k, **kw)
    router.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key in router.keys.values():  # B != 0 (PEFT's init is 0): the adapter must matter
            router.B[key].copy_(torch.randn(router.B[key].shape, generator=g) * 0.2)
    return router


def _smora_model(base, router):
    model = base.load().eval()
    ctx = wrap_model(model, [f"{m}.weight" for m in router.dims], lambda t: router.lora_factors(t[:-7]), router.rank)
    return model, ctx


def test_smora_k_equal_r_with_equal_gates_is_a_plain_rank_r_lora(two):
    """k = R, router weights 0 (every gate sigmoid(0), normalised to 1): a PEFT LoRA of rank R, alpha, the same A
    and B (1e-5), through the multi-LoRA op (R rank-1 adapters) and through the dense training path."""
    from peft import LoraConfig, get_peft_model

    rank, alpha = 6, 12.0
    model, ctx = _smora_model(two.base, r := _smora(two.base.load(), rank=rank, k=rank, alpha=alpha))
    with torch.no_grad():
        for key in r.keys.values():
            r.W[key].zero_()
            r.c[key].zero_()
    peft = get_peft_model(two.base.load(), LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj",
                                                                                                  "down_proj"]))
    with torch.no_grad():
        for m in r.dims:
            mod = peft.base_model.model.get_submodule(m)
            mod.lora_A["default"].weight.copy_(r.A[r.keys[m]])
            mod.lora_B["default"].weight.copy_(r.B[r.keys[m]])
    ids = _ids(seed=9)
    with torch.no_grad():
        want = peft(input_ids=ids).logits
        with ctx.use(groups=[RoutedGroup(r, None)]):
            sparse = model(input_ids=ids).logits
        with ctx.use(groups=[RoutedGroup(r, None)], dense=True):
            dense = model(input_ids=ids).logits
    torch.testing.assert_close(sparse, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(dense, want, atol=1e-5, rtol=0)
    assert (want - two.base.load()(input_ids=ids).logits).abs().max() > 1e-3


def test_smora_routes_top_k_by_score_plus_bias_and_sparse_equals_dense(two):
    """Selection by s + bias, gates s at the selected ranks normalised to sum to k (by hand); the layer's sparse
    dispatch equals its dense path and the by-hand sum over the k ranks."""
    router = _smora(two.base.load(), rank=6, k=2, seed=2)
    module = next(iter(router.dims))
    key = router.keys[module]
    with torch.no_grad():
        router.bias[key].copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0]))  # rank 5 always selected
    x = torch.randn(4, router.dims[module][0])
    s = torch.sigmoid(x @ router.W[key].T + router.c[key])
    idx, g = router.route(module, x)
    assert torch.all(idx[:, 0] == 5)
    second = torch.where(torch.arange(6) == 5, -1.0, s).argmax(-1)
    assert torch.equal(idx[:, 1], second)
    want_g = torch.stack([s[:, 5], s.gather(1, second[:, None])[:, 0]], 1)
    torch.testing.assert_close(g, want_g / want_g.sum(-1, keepdim=True) * 2, atol=1e-6, rtol=1e-6)
    model, ctx = _smora_model(two.base, router)
    ids = _ids(seed=10)
    with torch.no_grad():
        with ctx.use(groups=[RoutedGroup(router, None)]):
            sparse = model(input_ids=ids).logits
        with ctx.use(groups=[RoutedGroup(router, None)], dense=True):
            dense = model(input_ids=ids).logits
        router.dispatch = "gather"  # the dedicated gather path (benchmarked against the op)
        with ctx.use(groups=[RoutedGroup(router, None)]):
            gathered = model(input_ids=ids).logits
        router.dispatch = "op"
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(gathered, sparse, atol=1e-5, rtol=0)
    assert (sparse - two.base.load()(input_ids=ids).logits).abs().max() > 1e-3
    lin = routed_modules(model)[module]
    y_hand = torch.zeros(4, router.dims[module][1])
    for t in range(4):
        for j, gj in zip(idx[t].tolist(), g[t].tolist()):
            y_hand[t] += gj * (router.alpha / 2) * router.B[key][:, j] * float(router.A[key][j] @ x[t])  # alpha/k
    with torch.no_grad():
        torch.testing.assert_close(_layer(lin, ctx, router, x), lin.base(x) + y_hand, atol=1e-5, rtol=1e-5)


def test_smora_op_dispatch_hands_the_op_only_each_tokens_k_ranks(two, monkeypatch):
    """Sparse dispatch: the multi-LoRA op receives k (rank, gate) pairs per token, k of R = 6 (not all R masked)."""
    from workbench.modules import routed_lora

    router = _smora(two.base.load(), rank=6, k=2, seed=4)
    model, ctx = _smora_model(two.base, router)
    seen = []
    real = routed_lora.apply_lora

    def spy(y, x, weights, meta, backend):
        seen.append((x.shape[0], meta.idx.shape, sum(meta.counts)))
        return real(y, x, weights, meta, backend)

    monkeypatch.setattr(routed_lora, "apply_lora", spy)
    with torch.no_grad(), ctx.use(groups=[RoutedGroup(router, None)]):
        model(input_ids=_ids(2, 5, seed=5))
    assert len(seen) == len(router.dims)  # one op call per adapted module
    assert all(shape == (t, 2) and pairs == t * 2 for t, shape, pairs in seen)


def test_smora_counts_only_real_tokens():
    """The balancing counts (what the bias update reads) are the k selections of the real tokens only."""
    from workbench.methods.smora import SmoraRouter

    r = SmoraRouter(8, {"m": [16, 4]}, k=3)
    r.init_weights(0)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])  # 6 real tokens of 10
    r.counts, r.token_mask = {}, mask
    sel, _ = r.route("m", x)
    real = sel[mask.reshape(-1).bool()]
    assert r.counts["m"].sum() == 6 * 3
    assert torch.equal(r.counts["m"], torch.bincount(real.reshape(-1), minlength=8).float())


def _layer(lin, ctx, router, x):
    with torch.no_grad(), ctx.use(groups=[RoutedGroup(router, None)]):
        return lin(x)


def test_smora_bias_update_moves_usage_toward_uniform():
    """A skewed toy router (ranks 0-1 score high for every token): with the loss-free update the selection
    counts flatten (entropy up, max share down); with u = 0 they stay skewed."""
    from workbench.methods.smora import SmoraRouter

    def run(rate):
        r = SmoraRouter(8, {"m": [16, 4]}, k=2, balance_rate=rate)
        with torch.no_grad():
            r.c["m"].copy_(torch.tensor([3.0, 2.5, 0, 0, 0, 0, 0, -1.0]))
            r.W["m"].copy_(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) * 0.1)
        g = torch.Generator().manual_seed(1)
        shares = []
        for step in range(300):
            r.counts = {}
            r.route("m", torch.randn(64, 16, generator=g))
            c = r.counts["m"]
            shares.append(c / c.sum())
            r.update_bias()
        first, last = torch.stack(shares[:10]).mean(0), torch.stack(shares[-50:]).mean(0)
        ent = lambda s: float(-(s[s > 0] * s[s > 0].log()).sum() / math.log(8))  # noqa: E731
        return ent(first), ent(last), float(first.max()), float(last.max())

    e0, e1, m0, m1 = run(1e-2)
    assert e0 < 0.4 and e1 > 0.9 and m1 < m0 / 2  # ranks 0-1 took ~all selections; afterwards ~uniform
    f0, f1, n0, n1 = run(0.0)
    assert f1 == pytest.approx(f0, abs=0.05) and n1 == pytest.approx(n0, abs=0.05)


def test_smora_build_resumes_after_a_kill_and_equals_an_uninterrupted_run(two, monkeypatch, tmp_path):
    """Training is checkpointed every 2 steps; a build that dies at step 3 resumes from step 2 and ends with the
    same adapter, router and bias as an uninterrupted build (in another cache). The artifact loads for lm-eval
    (forward = its sparse dispatch; generate with = without cache) and records loss, usage and params."""
    from workbench.artifacts import load_artifact, read_artifact_meta
    from workbench.methods import smora
    from workbench.modules.routers import load_router
    from workbench.recipes import build, parse_recipe

    params = dict(rank=8, k=2, steps=5, batch_size=2, checkpoint_every=2, targets=["q_proj", "down_proj"])
    real = smora.SmoraRouter.update_bias
    calls = []

    def dying(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        real(self)

    monkeypatch.setattr(smora.SmoraRouter, "update_bias", dying)
    with pytest.raises(KeyboardInterrupt):
        build(parse_recipe(_recipe("smora", **params)), log=lambda *a: None)
    monkeypatch.setattr(smora.SmoraRouter, "update_bias", real)
    art = build(parse_recipe(_recipe("smora", **params)), log=lambda *a: None)
    meta = read_artifact_meta(art)
    assert meta["resumed_at"] == 2 and len(meta["loss_curve"]) == 5
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "other-cache"))
    ref = build(parse_recipe(_recipe("smora", **params)), log=lambda *a: None)
    assert read_artifact_meta(ref)["resumed_at"] == 0
    assert meta["loss_curve"] == read_artifact_meta(ref)["loss_curve"]
    # usage recorded before the kill (step 0) survives the resume
    assert [u["step"] for u in meta["usage_during_training"]] == [0, 4]
    assert meta["usage_during_training"] == read_artifact_meta(ref)["usage_during_training"]
    got, want = load_router(art).tensors(), load_router(ref).tensors()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert any(v.abs().sum() > 0 for k, v in got.items() if k.startswith("bias."))  # the balancing bias moved
    assert meta["usage"]["experts"][:2] == ["rank0", "rank1"] and 0 < meta["usage"]["select_entropy"] <= 1
    loaded = load_artifact(art)
    ids = _ids(1, 6, seed=12)
    with torch.no_grad():
        a = loaded.model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        b = loaded.model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_smora_bad_input(two):
    from workbench.errors import RecipeError
    from workbench.recipes import parse_recipe

    with pytest.raises(RecipeError, match="SMoRA top-k 9 is larger than the rank R = 8") as err:
        parse_recipe(_recipe("smora", rank=8, k=9))
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="match no linear module"):
        parse_recipe(_recipe("smora", targets=["nope_proj"]))


# ---------------------------------------------------------------- serving, traces


def test_served_batch_mixes_mole_smora_and_plain_adapters(two, monkeypatch):
    """The server's engine lists the MoLE and SMoRA artifacts; one batch holding MoLE, SMoRA, a plain adapter and
    the base decodes each sequence as it decodes alone, and as its artifact's own model generates."""
    from workbench.artifacts import load_artifact
    from workbench.recipes import build, parse_recipe
    from workbench.serving.engine import MultiLoraModel, Routed

    m_art = build(parse_recipe({**_recipe("mole", steps=2, examples=4, batch_size=2), "name": "mix-mole"}),
                  log=lambda *a: None)
    s_art = build(parse_recipe({**_recipe("smora", rank=8, k=2, steps=2, batch_size=2), "name": "mix-smora"}),
                  log=lambda *a: None)
    engine = MultiLoraModel.from_pool(two, log=lambda *a: None)
    kinds = {m["id"]: m.get("router") for m in engine.models()}
    assert kinds["mix-mole"] == "mole" and kinds["mix-smora"] == "smora"
    prompts = [_ids(1, 5, seed=20 + i)[0].tolist() for i in range(4)]
    specs = [Routed("mix-mole"), Routed("mix-smora"), engine.resolve("a"), ()]
    together = engine.generate(prompts, specs, max_new_tokens=5)
    for p, spec, out in zip(prompts, specs, together):
        assert engine.generate([p], [spec], max_new_tokens=5)[0] == out
    for p, art, out in [(prompts[0], m_art, together[0]), (prompts[1], s_art, together[1])]:
        model = load_artifact(art).model
        with torch.no_grad():
            want = model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False,
                                  pad_token_id=0)[0, len(p):].tolist()
        eos = model.generation_config.eos_token_id
        if want and want[-1] == eos:  # HF returns the end-of-sequence token, the engine stops before it
            want = want[:-1]
        assert out == want


def test_mole_trace_records_every_expert_weight(two):
    from workbench.methods.routing import trace_prompt

    names = ["a", "b"]
    model = two.base.load().eval()
    ctx = wrap_experts(model, [two.expert(n) for n in names])
    ctx.groups = [RoutedGroup(_mole_router(model, names, seed=7), None)]
    model.routing = ctx
    tok = two.base.tokenizer()
    tr = trace_prompt(model, tok, "Add: 12 + 30")
    assert tr["experts"] == names and tr["modules"] == len(routed_modules(model))
    # each token's text, decoded (no byte-level symbols such as "Ġ"), joins back into the prompt
    assert len(tr["text"]) == len(tr["tokens"]) and "".join(tr["text"]) == tok.decode(tok("Add: 12 + 30")["input_ids"])
    assert " 12" in tr["text"] or " " in "".join(tr["text"])
    for layer in tr["usage"]:
        assert sum(layer) == pytest.approx(1.0, abs=1e-4) and min(layer) > 0  # dense softmax over both experts
    json.dumps(tr)


def test_comparison_records_the_mixtures_training_and_draws_it(two, tmp_path, monkeypatch):
    """A comparison's build records (results/) carry what each method reports (MoLE's and SMoRA's loss curves
    and usage, as in artifact.json) and the loss curves are drawn in training.svg beside the leaderboard."""
    import yaml

    from workbench.artifacts import read_artifact_meta
    from workbench.comparison import parse_comparison
    from workbench.io import artifacts_dir
    from workbench.jobs import run_comparison

    monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path / "artifacts"))
    f = tmp_path / "cmp.yaml"
    f.write_text(yaml.safe_dump({
        "name": "mix", "pool": "demo", "tasks": ["addition"], "eval": {"limit": 2, "batch_size": 4},
        "reference": "base", "entries": ["base",
                                         {"method": "mole", "parameters": {"steps": 3, "examples": 4, "batch_size": 2}},
                                         {"method": "smora", "parameters": {"rank": 4, "k": 2, "steps": 2,
                                                                            "batch_size": 2}}]}))
    run_comparison(parse_comparison(f), results_dir=tmp_path / "results", log=lambda *a: None)
    out = tmp_path / "results" / "compare" / "mix"
    for row, steps in (("mole", 3), ("smora", 2)):
        rec = json.loads((out / "builds" / f"{row}.json").read_text())
        meta = read_artifact_meta(artifacts_dir() / rec["artifact"].split("/")[-1])
        assert rec["report"]["loss_curve"] == meta["loss_curve"] and len(meta["loss_curve"]) == steps
        assert rec["report"]["usage"] == meta["usage"]
    assert json.loads((out / "builds" / "smora.json").read_text())["report"]["parameter_counts"]["router"] > 0
    svg = (out / "training.svg").read_text()
    assert "mole" in svg and "smora" in svg
    # what is drawn, by value: the curves the chart is made of are the build records' loss curves, step by step
    from workbench.eval.charts import loss_curves_chart
    from workbench.jobs import make_plan, training_curves

    curves = training_curves(make_plan(parse_comparison(f), tmp_path / "results"))
    assert curves == {row: json.loads((out / "builds" / f"{row}.json").read_text())["report"]["loss_curve"]
                      for row in ("mole", "smora")}
    data = loss_curves_chart(curves, "t", series="row").data
    for row, curve in curves.items():
        drawn = data[data.row == row].sort_values("step")
        assert drawn.loss.tolist() == curve and drawn.step.tolist() == list(range(1, len(curve) + 1))


@pytest.mark.parametrize("dispatch", ["op", "gather"])
def test_smora_trace_records_each_tokens_k_ranks(two, dispatch):
    """`route trace` over a SMoRA artifact: per token and layer, k of the R ranks carry weight and the weights
    sum to k (gates normalised to sum to k), through either dispatch."""
    from workbench.artifacts import load_artifact
    from workbench.methods.routing import trace_prompt
    from workbench.recipes import build, parse_recipe

    art = build(parse_recipe(_recipe("smora", rank=8, k=3, steps=1, batch_size=2, targets=["q_proj", "down_proj"])),
                log=lambda *a: None)
    loaded = load_artifact(art)
    loaded.model.routing.groups[0].router.dispatch = dispatch
    tr = trace_prompt(loaded.model, loaded.tokenizer, "Add: 1+2\nAnswer:")
    assert tr["experts"] == [f"rank{j}" for j in range(8)] and tr["modules"] == 2 * len(tr["layers"])
    w = torch.tensor(tr["choices"])  # [T, L, R], mean over a layer's 2 modules
    torch.testing.assert_close(w.sum(-1), torch.full(w.shape[:2], 3.0), atol=1e-3, rtol=0)
    assert ((w > 0).sum(-1) >= 3).all() and ((w > 0).sum(-1) <= 6).all()
