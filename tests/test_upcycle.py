"""Upcycling dense experts into MoEs (BTX, BAM, mergekit-moe), checked on tiny models against references built
without the upcycling code: the dense model itself, attention and FFN written out by hand, PEFT's merge, plain
transformers in another process, hand-computed losses and hidden-state means."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import snapshot, suite_data
from safetensors.torch import load_file

from workbench.errors import RecipeError
from workbench.testing import make_tiny_full

TASKS = ("addition", "sorting", "unit_conversion")


def quiet(*a):
    return None


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and len(msg) < 300, msg
    return msg


@pytest.fixture(scope="session")
def dense_dir(tiny_dir, tmp_path_factory):
    """Two more full experts of the tiny base, further from it than full_c (distinct experts matter here)."""
    d = tmp_path_factory.mktemp("dense")
    for seed in (4, 5):
        make_tiny_full(tiny_dir / "base", d / f"full_{seed}", seed=seed, noise=0.05)
    return d


@pytest.fixture()
def moe_pool(pool, tiny_dir, dense_dir, arts):
    """Three different full experts a, b, c (one task each) and three copies of full_c: same1, same2, same3."""
    folders = {"a": tiny_dir / "full_c", "b": dense_dir / "full_4", "c": dense_dir / "full_5"}
    for (name, src), task in zip(folders.items(), TASKS):
        pool.add(src, name, tags={"task": task}, data=suite_data(task), link=True)
    for i, task in enumerate(TASKS, 1):
        pool.add(tiny_dir / "full_c", f"same{i}", tags={"task": task}, data=suite_data(task), link=True)
    pool.folders = {**folders, **{f"same{i}": tiny_dir / "full_c" for i in (1, 2, 3)}}
    return pool


def _recipe(method, experts, pool="demo", **params):
    return {"name": f"{method}-test", "method": method, "pool": pool, "experts": list(experts), "parameters": params}


def _build(method, experts, **params):
    from workbench.artifacts import load_artifact, read_artifact_meta
    from workbench.recipes import build, parse_recipe

    art = build(parse_recipe(_recipe(method, experts, **params)), log=quiet)
    return art, read_artifact_meta(art), load_artifact(art)


def _dense(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _weights(folder) -> dict[str, torch.Tensor]:
    """A dense expert's tensors read straight from its safetensors file (not through the pool)."""
    return load_file(str(folder / "model.safetensors"))


def _batch():
    """Two sequences, the second left-padded by 3 (mask 0)."""
    ids = torch.randint(4, 99, (2, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def _capture(module, out: dict, key: str):
    """Forward hook: the module's input hidden states and its output (first element when a tuple)."""
    def hook(mod, args, kwargs, output):
        out[key] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                    output[0] if isinstance(output, tuple) else output)
    return module.register_forward_hook(hook, with_kwargs=True)


# ----------------------------------------------------------------------------- hand references


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding at positions 0..S-1 of x [B, H, S, D] (rotate-half pairing: i with i + D/2)."""
    s, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def hand_attention(x, wq, wk, wv, wo, n_heads: int, n_kv: int, theta: float, kv_of_head=None, probs=False):
    """Causal grouped-query attention with RoPE, written out: x [B, S, d] -> [B, S, d] (`probs`: the attention
    probabilities [B, H, S, S] instead). Query head h reads KV head h // (H / KV) (or `kv_of_head(h)`)."""
    b, s, _ = x.shape
    dh = wq.shape[0] // n_heads
    q = _rope((x @ wq.T).view(b, s, n_heads, dh).transpose(1, 2), theta)
    k = _rope((x @ wk.T).view(b, s, n_kv, dh).transpose(1, 2), theta)
    v = (x @ wv.T).view(b, s, n_kv, dh).transpose(1, 2)
    heads = torch.arange(n_heads)
    which = kv_of_head(heads) if kv_of_head else heads // (n_heads // n_kv)
    k, v = k[:, which], v[:, which]
    scores = (q @ k.transpose(-1, -2)) / dh ** 0.5
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    if probs:
        return scores.softmax(-1)
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1) @ wo.T


def hand_ffn(x, w):
    """A Llama MLP from its weights: down(silu(gate x) * up x)."""
    return (torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T


def _attn_weights(w, layer=0):
    pre = f"model.layers.{layer}.self_attn."
    return {k: w[f"{pre}{k}_proj.weight"] for k in "qkvo"}


def _ffn_weights(w, layer=0):
    pre = f"model.layers.{layer}.mlp."
    return {k: w[f"{pre}{k}_proj.weight"] for k in ("gate", "up", "down")}


def _theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


# ----------------------------------------------------------------------------- function


@pytest.mark.parametrize("method,params", [("btx", {}), ("bam", {}), ("bam", {"shared_kv": True})],
                         ids=["btx", "bam", "bam-shared_kv"])
def test_identical_experts_with_uniform_routers_are_the_dense_model(moe_pool, method, params):
    """Three copies of one dense expert, uniform routers, untrained: that dense model's logits (1e-4, fp32),
    with left padding."""
    _, meta, loaded = _build(method, ["same1", "same2", "same3"], steps=0, router_init="uniform", **params)
    assert meta["type"] == "moe" and meta["num_experts"] == 3 and meta["training"] is None
    dense, base = _dense(moe_pool.folders["same1"]), moe_pool.base.load()
    ids, mask = _batch()
    real = mask.bool()
    with torch.no_grad():
        got = loaded.model(input_ids=ids, attention_mask=mask).logits
        want = dense(input_ids=ids, attention_mask=mask).logits
        other = base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    assert (want - other)[real].abs().max() > 1e-2  # the expert is not the base: averaging it with the base fails
    for layer in loaded.model.model.layers:
        assert not layer.mlp.gate.weight.any()  # uniform: zero logits


def _moe_ffn_by_hand(x, router, experts, layer, k):
    """The MoE FFN of `layer`: sum over the top-k of softmax(router x), renormalised, of dense expert e's MLP on x."""
    probs = torch.softmax(x @ router.T, -1)
    top, idx = probs.topk(k, -1)
    top = top / top.sum(-1, keepdim=True)
    ffn = torch.stack([hand_ffn(x, _ffn_weights(e, layer)) for e in experts], -2)  # [B, S, E, d]
    picked = torch.gather(ffn, -2, idx[..., None].expand(-1, -1, -1, ffn.shape[-1]))
    return (picked * top[..., None]).sum(-2), idx


def _layer_io(model, ids) -> list[dict]:
    """Every layer's attention and FFN (input, output) in one forward."""
    seen = [{} for _ in model.model.layers]
    hooks = [h for i, layer in enumerate(model.model.layers)
             for h in (_capture(layer.self_attn, seen[i], "attn"), _capture(layer.mlp, seen[i], "ffn"))]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("shared_kv", [False, True])
def test_bam_layers_by_hand(moe_pool, shared_kv):
    """Different experts, random routers, every layer: the Mixture of Attention is sum_e softmax(router x)_e *
    attention_e(x), attention_e written out by hand with expert e's Q and O and its own K/V (or the experts' mean
    K/V with shared_kv), and so are the attention probabilities it records (eager); the FFN is BTX's top-k
    mixture of the dense experts' MLPs. The hand attention is first checked against a dense model's layers."""
    names = ["a", "b", "c"]
    _, _, loaded = _build("bam", names, steps=0, router_init="random", router_std=0.2, shared_kv=shared_kv, top_k=2)
    model = loaded.model
    cfg = model.config
    h, kv, theta = cfg.num_attention_heads, cfg.num_key_value_heads, _theta(cfg)
    ids = torch.randint(4, 99, (2, 8), generator=torch.Generator().manual_seed(3))
    w = [_weights(moe_pool.folders[n]) for n in names]

    for i, seen in enumerate(_layer_io(_dense(moe_pool.folders["b"]), ids)):
        x, y = seen["attn"]
        torch.testing.assert_close(hand_attention(x, *_attn_weights(w[1], i).values(), h, kv, theta), y,
                                   atol=1e-5, rtol=1e-4)
    picked, io = set(), _layer_io(model, ids)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        recorded = model(input_ids=ids, output_attentions=True).attentions  # [B, E*H, S, S] per layer
    for i, (layer, seen) in enumerate(zip(model.model.layers, io)):
        x, y = seen["attn"]
        gate = torch.softmax(x @ layer.self_attn.router.weight.T, -1)  # [B, S, E]
        assert gate.min() > 1e-4  # soft: every expert counts for every token (no top-k)
        aw = [_attn_weights(e, i) for e in w]
        k_mean, v_mean = (torch.stack([e[p] for e in aw]).mean(0) for p in "kv")

        def mix(x, gate, aw, k_mean, v_mean, kv_of_head=None):
            outs = [hand_attention(x, e["q"], k_mean if shared_kv else e["k"], v_mean if shared_kv else e["v"],
                                   e["o"], h, kv, theta, kv_of_head) for e in aw]
            return sum(gate[..., j, None] * o for j, o in enumerate(outs))

        want = mix(x, gate, aw, k_mean, v_mean)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)
        # the check sees head order: query head h reading KV head h % KV instead of h // (H/KV) is far off
        assert (mix(x, gate, aw, k_mean, v_mean, lambda heads: heads % kv) - want).abs().max() > 1e-3
        for j, e in enumerate(aw):  # the recorded attention probabilities: expert-major, expert j's heads j*H..
            p = hand_attention(x, e["q"], k_mean if shared_kv else e["k"], v_mean if shared_kv else e["v"], e["o"],
                               h, kv, theta, probs=True)
            torch.testing.assert_close(recorded[i][:, j * h:(j + 1) * h], p, atol=1e-5, rtol=1e-4)
        x, y = seen["ffn"]
        want, idx = _moe_ffn_by_hand(x, layer.mlp.gate.weight, w, i, 2)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)
        picked |= set(idx.reshape(-1).tolist())
    assert picked == {0, 1, 2}  # every expert is picked somewhere


def test_btx_layers_by_hand(moe_pool):
    """BTX with different experts, every layer: attention with the experts' mean weights; FFN = sum over the top-k
    of softmax(router x), renormalised, of dense expert e's MLP on x."""
    names = ["a", "b", "c"]
    _, meta, loaded = _build("btx", names, steps=0, router_init="random", router_std=0.5, top_k=2)
    model, cfg = loaded.model, loaded.model.config
    w = [_weights(moe_pool.folders[n]) for n in names]
    ids = torch.randint(4, 99, (2, 8), generator=torch.Generator().manual_seed(4))
    picked = set()
    for i, (layer, seen) in enumerate(zip(model.model.layers, _layer_io(model, ids))):
        mean = {k: torch.stack([_attn_weights(e, i)[k] for e in w]).mean(0) for k in "qkvo"}
        x, y = seen["attn"]
        torch.testing.assert_close(y, hand_attention(x, *mean.values(), cfg.num_attention_heads,
                                                     cfg.num_key_value_heads, _theta(cfg)), atol=1e-5, rtol=1e-4)
        x, y = seen["ffn"]
        want, idx = _moe_ffn_by_hand(x, layer.mlp.gate.weight, w, i, 2)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)
        picked |= set(idx.reshape(-1).tolist())
    assert picked == {0, 1, 2}  # every expert is picked somewhere
    assert meta["construction"]["averaged"].startswith("attention")


def test_btx_export_loads_with_plain_transformers(moe_pool, tmp_path):
    """A plain Mixtral folder: no custom code; another process that never imports workbench loads it with
    AutoModelForCausalLM. Built from three copies of one dense expert with uniform routers, its logits are that
    dense model's (1e-4); built from different experts, they are the ones of the model built in memory before it
    was saved (whose layers `test_btx_layers_by_hand` checks)."""
    from workbench.methods.base import BuildContext
    from workbench.methods.btx import BTX as Btx
    from workbench.methods.upcycle import Sources
    from workbench.recipes import parse_recipe

    same, _, _ = _build("btx", ["same1", "same2", "same3"], steps=0, router_init="uniform")
    art, meta, _ = _build("btx", ["a", "b", "c"], steps=0, router_std=0.5)
    for folder in (same, art):
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
        assert "auto_map" not in cfg and not list(folder.glob("*.py"))
    assert meta["architecture"] == "MixtralForCausalLM"
    ids, mask = _batch()
    script = ("import sys, torch\n"
              "from transformers import AutoModelForCausalLM\n"
              "d = torch.load(sys.argv[1])\n"
              "for i, folder in enumerate(sys.argv[2:]):\n"
              "    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()\n"
              "    with torch.no_grad():\n"
              "        torch.save(m(input_ids=d['ids'], attention_mask=d['mask']).logits, f'out{i}.pt')\n"
              "    print(type(m).__name__)\n"
              "print(sorted(k for k in sys.modules if k.split('.')[0] == 'workbench'))\n")
    torch.save({"ids": ids, "mask": mask}, tmp_path / "in.pt")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.pt"), str(same), str(art)],
                          check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["MixtralForCausalLM", "MixtralForCausalLM", "[]"]
    real = mask.bool()
    with torch.no_grad():
        dense = _dense(moe_pool.folders["same1"])(input_ids=ids, attention_mask=mask).logits
        r = parse_recipe(_recipe("btx", ["a", "b", "c"], steps=0, router_std=0.5))
        ctx = BuildContext(r.pool, r.experts, r.params, r.recipe.output, tmp_path / "unused", log=quiet)
        in_memory, _ = Btx().make_model(ctx, Sources(r.pool.base, r.experts), r.pool.base.tokenizer())
        built = in_memory.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(torch.load(tmp_path / "out0.pt")[real], dense[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.load(tmp_path / "out1.pt")[real], built[real], atol=1e-6, rtol=0)
    assert (built - dense)[real].abs().max() > 1e-2  # different experts: a different model


@pytest.mark.parametrize("params", [{}, {"shared_kv": True}, {"parallel_attention": True}],
                         ids=["full_kv", "shared_kv", "parallel"])
def test_bam_round_trip_and_cached_generation(moe_pool, tmp_path, params):
    """save_pretrained/from_pretrained keeps every tensor and the logits; greedy generate with the KV cache ==
    without, and each step's logits == a full forward's; the cache holds E*KV heads per layer (KV when shared)."""
    from transformers import AutoModelForCausalLM

    _, meta, loaded = _build("bam", ["a", "b", "c"], steps=0, router_std=0.5, **params)
    model = loaded.model
    assert type(model).__name__ == "BamForCausalLM" and meta["architecture"] == "BamForCausalLM"
    assert all(model.config.to_dict()[k] == v for k, v in params.items())
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids, mask = _batch()
    real = mask.bool()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits[real], logits[real], atol=0, rtol=0)
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True,
                                pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=False,
                               pad_token_id=0)
        full = model(input_ids=cached.sequences, attention_mask=torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1))
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache
    assert torch.equal(cached.sequences, plain)
    steps = torch.stack(cached.logits, 1)  # [B, 5, V]: the logits that chose each new token
    torch.testing.assert_close(steps, full.logits[:, 8:-1], atol=1e-5, rtol=0)
    kv = model.config.num_key_value_heads * (1 if params.get("shared_kv") else 3)
    assert cache.layers[0].keys.shape[1] == kv
    from workbench.serving.engine import MultiLoraModel  # the server's batched decoder, the MoE as its model

    engine = MultiLoraModel(model, loaded.tokenizer, [])
    got = engine.generate([ids[0].tolist(), ids[1, 3:].tolist()], [(), ()], 5, stop_ids=set())
    assert got == plain[:, 9:].tolist()


def test_parallel_attention_by_hand(moe_pool):
    """parallel_attention: a layer's output is h + attn(ln1(h)) + ffn(ln2(h)), both from the layer input."""
    _, _, loaded = _build("bam", ["a", "b", "c"], steps=0, router_std=0.5, parallel_attention=True)
    layer = loaded.model.model.layers[0]
    seen = {}
    hooks = [_capture(layer, seen, "layer"), _capture(layer.self_attn, seen, "attn")]
    ids = torch.randint(4, 99, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        loaded.model(input_ids=ids)
        for hk in hooks:
            hk.remove()
        h, out = seen["layer"]
        want = h + seen["attn"][1] + layer.mlp(layer.post_attention_layernorm(h))
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(seen["attn"][0], layer.input_layernorm(h), atol=0, rtol=0)


def test_load_balancing_loss_by_hand():
    """E * sum_i f_i P_i over all layers' real tokens: f_i = share of tokens with i among their top-k (so
    sum_i f_i = k), P_i = mean router probability of i."""
    from workbench.methods.upcycle import load_balancing_loss

    g = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(6, 4, generator=g) * 2 for _ in range(2))  # [B*S = 2*3, E = 4] each
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # 4 real tokens
    keep = mask.reshape(-1).bool()
    counts, probs, n = torch.zeros(4), torch.zeros(4), 0
    for logits in layers:
        for row in logits[keep]:
            p = row.softmax(-1)
            for i in p.topk(2).indices.tolist():
                counts[i] += 1
            probs += p
            n += 1
    want = 4 * float(((counts / n) * (probs / n)).sum())
    assert float(load_balancing_loss(layers, 4, 2, mask)) == pytest.approx(want, rel=1e-6)
    flat = torch.cat(layers)  # no mask: every row of every layer
    f = torch.nn.functional.one_hot(flat.softmax(-1).topk(2).indices, 4).sum((0, 1)) / flat.shape[0]
    assert float(load_balancing_loss(layers, 4, 2)) == pytest.approx(4 * float((f * flat.softmax(-1).mean(0)).sum()),
                                                                     rel=1e-6)
    uniform = (torch.zeros(5, 4),)
    assert float(load_balancing_loss(uniform, 4, 2)) == pytest.approx(2.0)  # balanced: k


@pytest.mark.parametrize("method,params", [("btx", {}), ("bam", {}), ("bam", {"parallel_attention": True})],
                         ids=["btx", "bam", "bam-parallel"])
def test_router_init_from_data_is_the_mean_hidden_state(moe_pool, method, params):
    """router_init data: row e of each router = the mean over expert e's training tokens (padding excluded) of
    what that router reads, computed with dense expert e: ln1(h) for the attention router, ln2(h + attn(ln1 h))
    for the FFN router (ln2(h) with parallel attention); recomputed here one example at a time (no padding)."""
    from workbench.methods.routing import expert_examples

    names = ["a", "b", "c"]
    _, _, loaded = _build(method, names, steps=0, router_init="data", router_init_examples=4, batch_size=4, **params)
    tok = moe_pool.base.tokenizer()
    layers = loaded.model.model.layers
    lengths = []
    for e, name in enumerate(names):
        dense = _dense(moe_pool.folders[name])
        sums = {kind: [torch.zeros(dense.config.hidden_size, dtype=torch.float64) for _ in layers]
                for kind in ("attn", "ffn")}
        count = 0
        examples = expert_examples(moe_pool.expert(name), tok, 4, 0, 128)
        lengths.append({len(ids) for ids, _ in examples})
        for ids, _ in examples:
            seen = {}
            hooks = [_capture(d.post_attention_layernorm, seen, f"ffn{i}") for i, d in enumerate(dense.model.layers)]
            with torch.no_grad():
                out = dense(input_ids=torch.tensor([ids]), output_hidden_states=True)
            for hk in hooks:
                hk.remove()
            for i, d in enumerate(dense.model.layers):
                h = out.hidden_states[i][0]  # the input of layer i
                sums["attn"][i] += d.input_layernorm(h).double().sum(0)
                ffn_in = d.post_attention_layernorm(h) if params.get("parallel_attention") else seen[f"ffn{i}"][1][0]
                sums["ffn"][i] += ffn_in.double().sum(0)
            count += len(ids)
        for i, layer in enumerate(layers):
            torch.testing.assert_close(layer.mlp.gate.weight[e], (sums["ffn"][i] / count).float(), atol=1e-5, rtol=1e-4)
            if method == "bam":
                torch.testing.assert_close(layer.self_attn.router.weight[e], (sums["attn"][i] / count).float(),
                                           atol=1e-5, rtol=1e-4)
    assert any(len(n) > 1 for n in lengths)  # lengths differ within an expert: the builder's batches are padded


# ----------------------------------------------------------------------------- training


def test_training_lowers_the_loss_records_curves_and_evaluates(moe_pool, tmp_path):
    """A few steps of MoE training (all parameters) lower the task loss on the mixture's data; the curves are in
    artifact.json; the artifact runs through lm-eval (generation and perplexity) and the serving engine's
    batched decoder."""
    from workbench.eval.harness import run_eval
    from workbench.methods.routing import expert_examples
    from workbench.train.trainer import collate

    names = ["a", "b", "c"]
    common = {"examples": 6, "batch_size": 3, "lr": 3e-3, "router_lr": 3e-3, "warmup": 1, "max_length": 64, "seed": 1}
    _, _, untrained = _build("btx", names, steps=0, **common)
    art, meta, trained = _build("btx", names, steps=6, **common)
    t = meta["training"]
    assert t["steps"] == 6 and len(t["loss_curve"]) == len(t["task_loss_curve"]) == len(t["aux_loss_curve"]) == 6
    for loss, task, aux in zip(t["loss_curve"], t["task_loss_curve"], t["aux_loss_curve"]):
        assert aux > 0 and loss == pytest.approx(task + 0.01 * aux, abs=2e-5)  # aux_loss_coef's default
    # no checkpoint is left once the artifact is saved (the empty lock file beside each checkpoint folder stays:
    # unlinking a flock'ed file would let two builders lock two different files)
    ckpts = art.parent / "upcycle-checkpoints"
    assert not ckpts.exists() or not [p for p in ckpts.iterdir() if not p.name.endswith(".lock")]
    tok = moe_pool.base.tokenizer()
    data = [x for n in names for x in expert_examples(moe_pool.expert(n), tok, 6, 1, 64)]
    batch = collate(data, tok.pad_token_id)

    def task_loss(model):
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return float(model.loss_function(out.logits, batch["labels"], model.config.vocab_size))

    before, after = task_loss(untrained.model), task_loss(trained.model)
    assert after < before - 0.05
    m = run_eval(str(art), ["addition", "python_code"], pool=moe_pool, limit=2, batch_size=2,
                 results_dir=tmp_path / "lm")
    assert set(m["scores"]) == {"addition", "python_code"}
    assert "exact_match" in m["scores"]["addition"] and m["scores"]["python_code"]["word_perplexity"] > 0

    from workbench.serving.engine import MultiLoraModel

    engine = MultiLoraModel(trained.model, trained.tokenizer, [])
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in ("12+30=", "Sort: 3 1")]
    got = engine.generate(prompts, [(), ()], 4, stop_ids=set())
    for p, g in zip(prompts, got):
        want = trained.model.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert g == want[0, len(p):].tolist()


@pytest.mark.parametrize("shared_kv", [False, True], ids=["full_kv", "shared_kv"])
def test_bam_evaluates_with_lm_eval(moe_pool, tmp_path, shared_kv):
    """A BAM artifact (custom architecture, registered with transformers' Auto classes) runs through lm-eval:
    generation (exact match, every answer logged) and perplexity."""
    import gzip

    from workbench.eval.harness import run_eval

    art, _, loaded = _build("bam", ["a", "b", "c"], steps=0, router_std=0.5, shared_kv=shared_kv)
    m = run_eval(str(art), ["addition", "python_code"], pool=moe_pool, limit=2, batch_size=2,
                 results_dir=tmp_path / "lm")
    assert m["model_info"]["architecture"] == "BamForCausalLM" and m["method"] == "bam"
    assert 0 <= m["scores"]["addition"]["exact_match"] <= 1 and m["scores"]["python_code"]["word_perplexity"] > 1
    samples = (tmp_path / m["results_file"]).parent / f"samples_{m['run_id']}.jsonl.gz"
    with gzip.open(samples, "rt") as fh:
        rows = [json.loads(line) for line in fh]
    assert [r["task"] for r in rows] == ["addition", "addition", "python_code", "python_code"]
    for r in (r for r in rows if r["task"] == "addition"):  # the answers lm-eval scored: the model's greedy ones
        ids = loaded.tokenizer(r["question"], return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = loaded.model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
        text = loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert r["response"] == text.split("\n")[0].strip() != ""


@pytest.mark.parametrize("method,params", [("btx", {}), ("bam", {}), ("bam", {"shared_kv": True})],
                         ids=["btx", "bam", "bam-shared_kv"])
def test_shared_tensors_are_the_experts_average(moe_pool, method, params):
    """Three different experts: embeddings, norms and lm_head (and BTX's attention, shared-K/V BAM's K/V) of the
    untrained MoE are the mean of the experts' own tensors (read from their files)."""
    art, _, _ = _build(method, ["a", "b", "c"], steps=0, **params)
    moe = load_file(str(art / "model.safetensors"))
    experts = [_weights(moe_pool.folders[n]) for n in ("a", "b", "c")]
    names = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
             "model.layers.1.post_attention_layernorm.weight"]
    if method == "btx":
        names += [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"]
    elif params.get("shared_kv"):
        names += ["model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    for n in names:
        assert not torch.equal(experts[0][n], experts[1][n]), n  # the experts differ here
        torch.testing.assert_close(moe[n], torch.stack([e[n] for e in experts]).mean(0), atol=1e-6, rtol=0)
    if "lm_head.weight" in moe:
        torch.testing.assert_close(moe["lm_head.weight"], moe["model.embed_tokens.weight"])


def test_training_optimises_every_parameter_at_its_rate(moe_pool, monkeypatch, capsys):
    """The MoE trainer's AdamW holds every parameter once: the routers (FFN and attention) at router_lr, all the
    rest at lr, under linear warm-up then linear decay; the aux loss sees the padding mask and every layer's FFN
    router; the steps show on a progress bar with the losses."""
    from workbench.methods import upcycle

    seen = {}
    real_opt, real_lb = torch.optim.AdamW, upcycle.load_balancing_loss

    class Spy(real_opt):
        def step(self, *a, **k):
            seen.setdefault("lrs", []).append([g["lr"] for g in self.param_groups])
            seen["groups"] = [list(g["params"]) for g in self.param_groups]
            return super().step(*a, **k)

    def lb(logits, n, k, mask=None):
        seen["mask"], seen["lb"] = mask, (len(logits), n, k)
        return real_lb(logits, n, k, mask)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    monkeypatch.setattr(upcycle, "load_balancing_loss", lb)
    _, _, loaded = _build("bam", ["a", "b", "c"], steps=4, warmup=2, lr=1e-4, router_lr=1e-2, examples=4,
                          batch_size=2, max_length=48)
    others, routers = seen["groups"]
    assert len(others) + len(routers) == len(list(loaded.model.parameters()))
    n_layers = loaded.model.config.num_hidden_layers
    assert len(routers) == 2 * n_layers  # mlp.gate and self_attn.router of every layer
    assert [round(a / 1e-4, 6) for a, _ in seen["lrs"]] == [0.5, 1.0, 1.0, 0.5]  # (s+1)/2, then (4-s)/2
    assert [round(b / 1e-2, 6) for _, b in seen["lrs"]] == [0.5, 1.0, 1.0, 0.5]
    assert seen["mask"] is not None and seen["mask"].shape[0] == 2
    assert seen["lb"] == (n_layers, 3, 2)  # every layer's FFN router logits, E experts, top_k (the default)
    bar = [line for line in capsys.readouterr().err.splitlines() if "bam: MoE training" in line]
    assert bar and "4/4" in bar[-1] and "loss=" in bar[-1] and "aux=" in bar[-1], bar


@pytest.mark.parametrize("method,params", [("btx", {}), ("bam", {"shared_kv": True})], ids=["btx", "bam-shared_kv"])
def test_training_resumes_after_a_kill_with_the_same_weights(moe_pool, tmp_path, session_cache, monkeypatch, method,
                                                             params):
    """Killed right after its first checkpoint (WORKBENCH_FAULT=upcycle_checkpoint), the rerun resumes at that
    step and ends with exactly the weights and curves of an uninterrupted run; the checkpoints are then gone."""
    from workbench.artifacts import read_artifact_meta
    from workbench.recipes import build, parse_recipe

    recipe = _recipe(method, ["a", "b", "c"], pool=str(moe_pool.root), steps=4, checkpoint_every=2, examples=4,
                     batch_size=2, lr=1e-3, warmup=1, max_length=48, **params)
    whole = build(parse_recipe(recipe), log=quiet)  # the test's artifacts folder
    killed = tmp_path / "killed-artifacts"
    env = {**os.environ, "WORKBENCH_CACHE_ARTIFACTS": str(killed), "WORKBENCH_FAULT": "upcycle_checkpoint",
           "WORKBENCH_CACHE": str(session_cache), "OMP_NUM_THREADS": "1"}
    script = ("import json, sys\nfrom workbench.recipes import build, parse_recipe\n"
              "build(parse_recipe(json.loads(sys.argv[1])), log=lambda *a: None)\n")
    r = subprocess.run([sys.executable, "-c", script, json.dumps(recipe)], check=False, capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == -9 and "WORKBENCH_FAULT: killed at upcycle_checkpoint #1" in r.stderr, r.stderr[-2000:]
    latest = list(killed.glob(f"upcycle-checkpoints/{method}-*/latest.json"))
    assert len(latest) == 1 and json.loads(latest[0].read_text())["step"] == 2
    assert not list(killed.glob("*/artifact.json"))
    monkeypatch.setenv("WORKBENCH_CACHE_ARTIFACTS", str(killed))
    logs = []
    resumed = build(parse_recipe(recipe), log=logs.append)
    assert any("resumed from the checkpoint at step 2" in line for line in logs)
    a, b = read_artifact_meta(whole)["training"], read_artifact_meta(resumed)["training"]
    assert a["resumed_from"] is None and b["resumed_from"] == 2
    assert a["loss_curve"] == b["loss_curve"] and a["aux_loss_curve"] == b["aux_loss_curve"]
    wa, wb = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not latest[0].parent.exists()


# ----------------------------------------------------------------------------- inputs


def test_materialized_lora_experts_are_the_peft_merges(pool, tiny_dir, arts):
    """materialize: true folds each LoRA into the base: MoE FFN expert e == PEFT's merge_and_unload of LoRA e,
    attention == the mean of the merged models' attention."""
    from peft import PeftModel

    pool.add(tiny_dir / "lora_a", "la", tags={"task": "addition"}, data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "lb", tags={"task": "sorting"}, data=suite_data("sorting"))
    _, meta, loaded = _build("btx", ["la", "lb"], steps=0, materialize=True)
    assert meta["materialized"] is True
    merged = [PeftModel.from_pretrained(pool.base.load(), str(tiny_dir / n)).merge_and_unload().state_dict()
              for n in ("lora_a", "lora_b")]
    sd = loaded.model.state_dict()
    for layer in range(2):
        pre = f"model.layers.{layer}."
        for e, w in enumerate(merged):
            gate_up = torch.cat([w[pre + "mlp.gate_proj.weight"], w[pre + "mlp.up_proj.weight"]])
            torch.testing.assert_close(sd[pre + "mlp.experts.gate_up_proj"][e], gate_up, atol=1e-6, rtol=0)
            torch.testing.assert_close(sd[pre + "mlp.experts.down_proj"][e], w[pre + "mlp.down_proj.weight"],
                                       atol=1e-6, rtol=0)
        for p in "qkvo":
            name = f"{pre}self_attn.{p}_proj.weight"
            torch.testing.assert_close(sd[name], (merged[0][name] + merged[1][name]) / 2, atol=1e-6, rtol=0)
    ffn = "model.layers.0.mlp.down_proj.weight"
    assert (merged[0][ffn] - merged[1][ffn]).abs().max() > 1e-3  # lora_a adapts down_proj: the experts differ


def test_validation_opens_no_expert_file(moe_pool, tiny_dir):
    """A comparison plans rows whose experts' files are absent (`require_files=False`, e.g. the demo pool's full
    fine-tunes on a fresh clone): validating an upcycling recipe reads the manifest, never an expert's files."""
    import shutil

    from workbench.recipes import parse_recipe

    moe_pool.add(tiny_dir / "full_c", "gone", tags={"task": "sorting"}, data=suite_data("sorting"))
    shutil.rmtree(moe_pool.expert("gone").path)
    for method in ("btx", "bam", "mergekit_moe"):
        parse_recipe(_recipe(method, ["a", "gone"]), require_files=False)
    with pytest.raises(RecipeError, match=r"expert 'gone' is missing"):
        parse_recipe(_recipe("btx", ["a", "gone"]))


def _tiny_mistral(folder):
    from transformers import MistralConfig, MistralForCausalLM

    from workbench.testing import tiny_llama_config, tiny_tokenizer

    kw = {k: v for k, v in tiny_llama_config().to_dict().items()
          if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")}
    cfg = MistralConfig(**kw)
    cfg.architectures = ["MistralForCausalLM"]
    torch.manual_seed(0)
    MistralForCausalLM(cfg).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_bad_input_one_line_nothing_written(moe_pool, tiny_dir, tmp_path, pools, arts, run_cli, capsys):
    import yaml

    from workbench.pool import Pool
    from workbench.recipes import parse_recipe
    from workbench.testing import make_tiny_base

    moe_pool.add(tiny_dir / "lora_a", "la", tags={"task": "addition"}, data=suite_data("addition"))
    moe_pool.add(tiny_dir / "lora_b", "lb", tags={"task": "sorting"}, data=suite_data("sorting"))
    moe_pool.add(tiny_dir / "full_c", "untagged")
    wide = Pool.create("wide", base=str(make_tiny_base(tmp_path / "wide-base", intermediate_size=96)))
    wide.add(make_tiny_full(tmp_path / "wide-base", tmp_path / "wide-full", seed=6), "w", tags={"task": "sorting"}, data=suite_data("sorting"))
    mistral = Pool.create("mistral", base=str(_tiny_mistral(tmp_path / "mistral-base")))
    for i, task in enumerate(TASKS[:2]):
        mistral.add(make_tiny_full(tmp_path / "mistral-base", tmp_path / f"mistral-{i}", seed=i), f"m{i}",
                    tags={"task": task}, data=suite_data(task))
    before = {"pools": snapshot(pools), "artifacts": snapshot(arts)}
    cases = [
        ("btx", ["a"], {}, "demo", r"btx upcycles several dense experts into one MoE: give at least 2 \(got 1\)"),
        ("bam", ["a", "b"], {"top_k": 3}, "demo", r"bam: top_k 3 is larger than the number of experts \(2\)"),
        ("btx", ["a", "la", "lb"], {}, "demo", (r"btx needs full \(dense\) experts; \['la', 'lb'\] are LoRA "
                                                r"adapters: set `materialize: true`")),
        ("bam", ["a", "wide:w"], {}, "demo", r"mixed bases: 'wide:w' is over"),
        ("btx", ["m0", "m1"], {}, "mistral", (r"btx: experts of architecture MistralForCausalLM cannot be upcycled "
                                              r"\(supported: LlamaForCausalLM\)")),
        ("btx", ["a", "untagged"], {}, "demo", r"btx: expert 'untagged' of pool '[^']+' has no recorded training data"),
        ("mergekit_moe", ["a", "same1"], {}, "demo", r"mergekit_moe: experts 'a' and 'same1' learned the same data \['addition'\]"),
        ("bam", ["a", "b"], {"router_init": "learned"}, "demo", r"parameters\.router_init: Input should be"),
    ]
    f = tmp_path / "bad.yaml"
    for method, experts, params, pool_name, msg in cases:
        with pytest.raises(RecipeError, match=msg) as err:
            parse_recipe(_recipe(method, experts, pool=pool_name, **params))
        one_line(err)
        f.write_text(yaml.safe_dump(_recipe(method, experts, pool=pool_name, **params)))
        capsys.readouterr()  # the tiny models' save progress bars
        code, out, err = run_cli("merge", str(f))  # `workbench merge`: exit 2, the same one line, nothing built
        assert code == 2 and out == "" and err.count("\n") == 1 and re.search(msg, err), (msg, err)
    assert {"pools": snapshot(pools), "artifacts": snapshot(arts)} == before


def test_biased_attention_is_refused_in_one_line(pools, tmp_path, arts, monkeypatch):
    from workbench.methods import upcycle
    from workbench.pool import Pool
    from workbench.recipes import build, parse_recipe
    from workbench.testing import make_tiny_base

    base = make_tiny_base(tmp_path / "biased", attention_bias=True)
    p = Pool.create("biased", base=str(base))
    for i, task in enumerate(TASKS[:2]):
        p.add(make_tiny_full(base, tmp_path / f"biased-{i}", seed=i), f"x{i}", tags={"task": task}, data=suite_data(task))
    before = snapshot(arts)
    with pytest.raises(RecipeError, match=r"bam: the experts' attention_bias is set; Mixtral-style layers have no "
                                          r"biases") as err:
        parse_recipe(_recipe("bam", ["x0", "x1"], pool="biased"))  # refused when validated: the base is on disk
    one_line(err)
    # a base not yet on disk is checked when the build has it
    monkeypatch.setattr(upcycle, "cached_base_config", lambda spec: None)
    recipe = parse_recipe(_recipe("bam", ["x0", "x1"], pool="biased"))
    with pytest.raises(RecipeError, match=r"bam: the experts' attention_bias is set") as err:
        build(recipe, log=quiet)
    one_line(err)
    assert {k: v for k, v in snapshot(arts).items() if not k.endswith(".lock")} == before  # the build's lock only


# ----------------------------------------------------------------------------- mergekit-moe


def test_mergekit_moe_builds_on_tiny_full_experts(moe_pool):
    """mergekit's own MoE builder (gate_mode hidden, prompts from each expert's data): FFN expert e == dense
    expert e's MLP, attention == the experts' mean (base_model: average), a router row per expert."""
    names = ["a", "b", "c"]
    _, meta, loaded = _build("mergekit_moe", names, steps=0, prompts=3)
    assert meta["architecture"] == "MixtralForCausalLM" and meta["construction"]["router_init"].startswith("mergekit")
    sd = loaded.model.state_dict()
    w = [_weights(moe_pool.folders[n]) for n in names]
    for e, we in enumerate(w):
        f = _ffn_weights(we, 1)
        torch.testing.assert_close(sd["model.layers.1.mlp.experts.gate_up_proj"][e], torch.cat([f["gate"], f["up"]]),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(sd["model.layers.1.mlp.experts.down_proj"][e], f["down"], atol=1e-6, rtol=0)
    q = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(sd[q], torch.stack([we[q] for we in w]).mean(0), atol=1e-6, rtol=0)
    gate = sd["model.layers.1.mlp.gate.weight"]
    assert gate.shape == (3, loaded.model.config.hidden_size) and torch.linalg.matrix_rank(gate) == 3

    # the gates, recomputed as mergekit's gate_mode hidden defines them (bf16, as mergekit loads the model): with
    # the experts' average model, bos + each positive prompt (questions of the expert's train split, never its test
    # split), left-padded with bos; row e of layer l = the normalised mean over the prompts of the last token's
    # hidden state entering layer l. The same recipe with the pool's base instead of the average is far off.
    from workbench.methods.mergekit_moe import positive_prompts
    from workbench.tasks.suite import load_split

    avg = _dense(moe_pool.folders["a"])
    missing, _ = avg.load_state_dict({k: torch.stack([we[k] for we in w]).mean(0) for k in w[0]}, strict=False)
    assert set(missing) <= {"lm_head.weight"}
    tok = moe_pool.base.tokenizer()
    tok.padding_side, tok.pad_token_id = "left", tok.bos_token_id

    batches = []
    for name in names:
        expert = moe_pool.expert(name)
        prompts = positive_prompts(expert, 3, 0)
        (task,) = expert.tasks()
        assert len(prompts) == 3 and set(prompts) <= {r["question"] for r in load_split(task, "train")}
        assert not set(prompts) & {r["question"] for r in load_split(task, "test")}
        batches.append(tok([tok.bos_token + p for p in prompts], return_tensors="pt", padding=True,
                           add_special_tokens=False))

    def gates(model):
        rows = []
        for batch in batches:
            with torch.no_grad():
                hidden = torch.stack(model(**batch, output_hidden_states=True).hidden_states[:-1])[:, :, -1].mean(1)
            rows.append(hidden.float() / hidden.float().norm(dim=-1, keepdim=True))
        return torch.stack(rows, 1)  # [L, E, d]

    want, other = gates(avg.to(torch.bfloat16)), gates(moe_pool.base.load().to(torch.bfloat16))
    got = torch.stack([sd[f"model.layers.{i}.mlp.gate.weight"] for i in range(len(want))])
    torch.testing.assert_close(got, want, atol=1e-2, rtol=0)  # 3.6e-3 seen: bf16 of two fp32 averages
    assert (got - other).abs().max() > 0.1  # 0.25 seen


# ----------------------------------------------------------------------------- stats


@pytest.mark.parametrize("method,params,kv_sets", [("btx", {}, 1), ("bam", {}, 3), ("bam", {"shared_kv": True}, 1)],
                         ids=["btx", "bam", "bam-shared_kv"])
def test_stats_count_parameters_and_measure_the_kv_cache(moe_pool, method, params, kv_sets):
    """total_parameters == the tensors saved (tied lm_head once); active = total - (E-k) FFN experts per layer;
    KV-cache bytes per token == what a forward's cache holds: the dense model's with shared K/V (and BTX), E times
    it with BAM's per-expert K/V."""
    art, meta, loaded = _build(method, ["a", "b", "c"], steps=0, top_k=2, **params)
    stats, dense = meta["stats"], meta["dense_reference"]
    saved = sum(t.numel() for t in load_file(str(art / "model.safetensors")).values())
    assert stats["total_parameters"] == saved == sum(p.numel() for p in loaded.model.parameters())
    assert dense["total_parameters"] == sum(t.numel() for t in _weights(moe_pool.folders["a"]).values())
    c = loaded.model.config
    ffn_expert = 3 * c.hidden_size * c.intermediate_size
    assert stats["active_parameters_per_token"] == saved - c.num_hidden_layers * (3 - 2) * ffn_expert
    ids = torch.randint(4, 99, (2, 5))
    with torch.no_grad():
        cache = loaded.model(input_ids=ids, use_cache=True).cache
    held = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4 / ids.numel()
    assert stats["kv_cache_bytes_per_token"]["float32"] == held
    assert held == kv_sets * dense["kv_cache_bytes_per_token"]["float32"]


@pytest.mark.parametrize("method,params", [("btx", {}), ("bam", {}), ("bam", {"shared_kv": True})],
                         ids=["btx", "bam", "bam-shared_kv"])
def test_stats_flops_and_active_parameters_are_measured(moe_pool, method, params):
    """FLOPs per token as torch's FlopCounterMode counts them for one token decoded after T cached tokens (eager
    attention and experts), at two T: 2 * matmul_params + attention_flops_per_context_token * (T + 1 keys).
    Active parameters = those one token's backward reaches: the expert slices with a nonzero gradient, every other
    tensor whole (the embedding too, as the stats define it)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, meta, loaded = _build(method, ["a", "b", "c"], steps=0, top_k=2, router_std=0.5, **params)
    model, flops = loaded.model, meta["stats"]["flops_per_token"]
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")  # a loop of matmuls FlopCounterMode sees (not torch._grouped_mm)
    counted = []
    for t in (5, 17):
        ids = torch.randint(4, 99, (1, t + 1), generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            cache = model(input_ids=ids[:, :t], use_cache=True).cache
            counter = FlopCounterMode(display=False)
            with counter:
                model(input_ids=ids[:, t:], cache=cache, use_cache=True)
        counted.append(counter.get_total_flops())
        assert counted[-1] == 2 * flops["matmul_params"] + flops["attention_flops_per_context_token"] * (t + 1), t
    assert counted[1] > counted[0]  # the attention term grows with the context

    model.train()
    model.zero_grad()
    out = model(input_ids=torch.tensor([[7]]))
    out.logits.square().sum().backward()
    active = 0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if ".experts." in name:  # [E, ...]: the experts this token was routed to
            active += sum(p[e].numel() for e in range(p.shape[0]) if p.grad[e].any())
        else:
            active += p.numel()
    assert active == meta["stats"]["active_parameters_per_token"]


def test_moe_artifacts_are_served_beside_the_pool(moe_pool, tmp_path):
    """`workbench serve`'s app: an upcycled MoE built over the pool is listed and answered by its own engine
    (loaded on its first request) through the real HTTP server (uvicorn, httpx), equal to HF greedy
    generation of the artifact, while the pool's own models keep answering; a broken MoE answers 503 for its
    own requests only."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from workbench.pool import Pool
    from workbench.serving.api import create_app, start_in_thread
    from workbench.serving.engine import MultiLoraModel, saved_full_models

    _, _, btx = _build("btx", ["a", "b", "c"], steps=0, router_std=0.5)
    bam_art, _, bam = _build("bam", ["a", "b"], steps=0, router_std=0.5, top_k=1, shared_kv=True)
    pool = Pool.open("demo")
    engine = MultiLoraModel.from_pool(pool, log=quiet)
    full = saved_full_models(pool, set(engine.model_names()))
    assert [(f.name, f.kind, f.loaded) for f in full] == [("bam-test", "moe", False), ("btx-test", "moe", False)]
    url, server, thread = start_in_thread(create_app(engine, full_models=full))
    prompt = "Add: 12+34\nAnswer:"
    try:
        def complete(base, model, max_tokens=6):
            return httpx.post(f"{base}/v1/completions", timeout=120, json={
                "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})

        listed = {m["id"]: m["kind"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert listed["btx-test"] == listed["bam-test"] == "moe" and listed["base"] == "base"
        ids = btx.tokenizer(prompt, return_tensors="pt")
        texts = {}
        for name, loaded in (("btx-test", btx), ("bam-test", bam)):
            ref = loaded.model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
            texts[name] = loaded.tokenizer.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            assert complete(url, name).json()["choices"][0]["text"] == texts[name]
        assert texts["btx-test"] != texts["bam-test"]  # two networks, each answered by its own engine
        base_ref = engine.generate([ids["input_ids"][0].tolist()], [()], 6)[0]
        assert complete(url, "base").json()["choices"][0]["text"] == engine.tokenizer.decode(base_ref,
                                                                                              skip_special_tokens=True)
        # an MoE whose weights file is torn: its own requests fail in one line (each time), the others go on;
        # two first requests for another MoE at once load it once and make one batcher
        w = bam_art / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        fresh = saved_full_models(pool, set(engine.model_names()))
        app2 = create_app(engine, full_models=fresh)
        url2, server2, thread2 = start_in_thread(app2)
        try:
            for _ in range(2):
                bad = complete(url2, "bam-test", 2)
                assert bad.status_code == 503, bad.text
                msg = bad.json()["error"]["message"]
                assert "bam-test" in msg and "could not be loaded" in msg and "\n" not in msg
            schedulers = lambda: sum(t.name == "workbench-scheduler" for t in threading.enumerate())
            before = schedulers()
            with ThreadPoolExecutor(2) as ex:
                both = list(ex.map(lambda _: complete(url2, "btx-test").json()["choices"][0]["text"], range(2)))
            assert both == [texts["btx-test"]] * 2
            assert schedulers() == before + 1 and list(app2.state.full_schedulers) == ["btx-test"]
            assert httpx.get(f"{url2}/health").json()["full_models_loaded"] == ["btx-test"]
        finally:
            server2.should_exit = True
            thread2.join()
    finally:
        server.should_exit = True
        thread.join()
