"""OpenAI-compatible server on loopback: concurrency, exactness vs PEFT alone, bad requests."""

import asyncio
import json
import time
import uuid
import zlib

import httpx
import pytest
import torch
from conftest import suite_data

from workbench.errors import WorkbenchError
from workbench.serving.api import create_app, start_in_thread
from workbench.serving.engine import MultiLoraModel, peft_alone, top_k_router


@pytest.fixture(scope="module", autouse=True)
def own_artifacts(tmp_path_factory):
    """This module's artifacts only: the engine lists every artifact in the cache built over its pool (also one
    built in another checkout over the same experts), so the listings asserted here must not see other modules'."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path_factory.mktemp("serve-artifacts")))
    yield
    mp.undo()


@pytest.fixture()
def served(pool, tiny_dir):
    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    engine = MultiLoraModel.from_pool(pool)
    app = create_app(engine, max_batch=64, window_s=0.05)
    url, server, thread = start_in_thread(app)
    assert server.started
    yield url, pool, engine, app
    server.should_exit = True
    thread.join(timeout=10)


def _post_concurrently(url: str, models: list[str], prompts: list[str], max_tokens: int) -> list:
    """Every (model, prompt) as its own /v1/completions request, all in flight at once."""
    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[c.post(f"{url}/v1/completions", json={
                "model": m, "prompt": p, "max_tokens": max_tokens}) for m, p in zip(models, prompts)])

    return asyncio.run(main())


def test_models_endpoint(served):
    url, *_ = served
    data = httpx.get(f"{url}/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["base", "a", "b"]


def test_64_concurrent_mixed_requests_match_peft_alone(served):
    url, pool, engine, app = served
    names = ["a", "b", "base"]
    prompts = [f"Add: {i}+{2 * i}\nAnswer:" if i % 2 else f"Sort: {i % 7} {i % 5} 9\nAnswer:" for i in range(64)]

    responses = _post_concurrently(url, [names[i % 3] for i in range(64)], prompts, 6)
    assert all(r.status_code == 200 for r in responses)
    assert app.state.scheduler.stats["max_batch_seen"] > 1  # requests were batched together
    folders = {a.name: a.source for a in engine.adapters}
    expected = peft_alone(pool.base, folders, [(names[i % 3], p) for i, p in enumerate(prompts)], 6)
    for i, (r, want) in enumerate(zip(responses, expected)):
        assert r.json()["choices"][0]["text"] == want, (names[i % 3], prompts[i])


def test_streaming_equals_non_streaming(served):
    url, *_ = served
    body = {"model": "b", "prompt": "Sort: 3 1 2\nAnswer:", "max_tokens": 10}
    full = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    pieces = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(pieces) == full
    chat = httpx.post(f"{url}/v1/chat/completions", json={"model": "mix:a=0.5,b=0.5", "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"


def test_bad_requests_get_4xx_and_server_lives(served):
    url, *_ = served
    r = httpx.post(f"{url}/v1/completions", content=b'{"model": "a", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 10**6})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x" * 300})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "a", "messages": []})
    assert r.status_code == 400
    ok = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200


def test_client_disconnect_mid_stream(served, monkeypatch):
    """A client that hangs up leaves its batch at the next token: the engine stops generating for it."""
    url, _, engine, app = served
    stats = app.state.scheduler.stats
    body = {"model": "a", "prompt": "x", "max_tokens": 200}
    full = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    assert full["usage"]["completion_tokens"] == 200  # left alone, this request decodes all 200 tokens
    forward = engine.forward  # 20 ms a step: 200 steps would take 4 s, a hang-up is seen within a few steps
    monkeypatch.setattr(engine, "forward", lambda *a, **k: (time.sleep(0.02), forward(*a, **k))[1])
    before = stats["tokens"]
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token, then hang up
    deadline = time.monotonic() + 10
    while (stats["cancelled"] < 1 or engine.active_sequences) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stats["cancelled"] == 1 and engine.active_sequences == 0
    generated = stats["tokens"] - before
    assert 1 <= generated < 50, generated  # dropped well before max_tokens
    time.sleep(0.2)
    assert stats["tokens"] - before == generated  # and nothing more is decoded for it
    ok = httpx.post(f"{url}/v1/completions", json={"model": "b", "prompt": "y", "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def _hand_reference(pool, names: list[str], router, x: torch.Tensor) -> torch.Tensor:
    """Logits of the plain base where every adapted linear adds, token by token and in fp32,
    sum_j w_tj * s_e * B_e A_e x_t for the router's (e, w) pairs of that layer."""
    model = pool.base.load().float().eval()
    experts = [pool.expert(n) for n in names]
    targets = sorted({t for e in experts for t in e.delta_names()})

    def hook_for(module: str):
        tensor = module + ".weight"
        factors = [e.lora_factors(tensor) if tensor in e.delta_names() else None for e in experts]

        def hook(_mod, inputs, y):
            x2 = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            idx, w = router(module, x2)
            extra = torch.zeros(x2.shape[0], y.shape[-1])
            for t in range(x2.shape[0]):
                for e, wt in zip(idx[t].tolist(), w[t].tolist()):
                    if e >= 0 and factors[e] is not None:
                        a, b, s = factors[e]
                        extra[t] += wt * s * (b @ (a @ x2[t]))
            return y + extra.view(y.shape)

        return hook

    for tensor in targets:
        model.get_submodule(tensor[: -len(".weight")]).register_forward_hook(hook_for(tensor[: -len(".weight")]))
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("k", [1, 2])
def test_router_callback_mixture(pool, tiny_dir, k):
    """Per-token, per-layer top-k routing through the same op, with a router that reads both the hidden
    state and the module name, equals a per-token reference computed by hand."""
    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    eng = MultiLoraModel.from_pool(pool, include_artifacts=False)
    proj: dict[str, torch.Tensor] = {}

    def scores(name: str, h: torch.Tensor) -> torch.Tensor:  # [T, 2]: a fixed random projection per module
        if name not in proj:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            proj[name] = torch.randn(h.shape[-1], 2, generator=g) / h.shape[-1] ** 0.5
        return h.float() @ proj[name]

    routed = top_k_router(scores, k)
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def recording(name, h):
        idx, w = routed(name, h)
        calls.append((name, idx, w))
        return idx, w

    x = torch.randint(5, 90, (2, 7))
    got = eng.forward(x, router=recording).logits
    want = _hand_reference(pool, ["a", "b"], routed, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the routes really vary with the token and with the module (else this would test a fixed mix)
    first = {name: idx[:, 0] for name, idx, _ in calls}
    assert len({tuple(v.tolist()) for v in first.values()}) > 1
    assert any(len(set(v.tolist())) > 1 for v in first.values())
    if k == 2:
        assert len({round(float(w[0, 0]), 4) for _, _, w in calls}) > 1


def test_grouped_mm_refused_at_start_without_it(pool, tiny_dir, monkeypatch):
    """Choosing a backend this torch cannot run fails at construction, with one line, not mid-request."""
    from workbench.errors import WorkbenchError

    pool.add(tiny_dir / "lora_a", "a")
    monkeypatch.delattr(torch.nn.functional, "grouped_mm", raising=False)
    with pytest.raises(WorkbenchError, match=r"kernel backend 'grouped_mm' needs torch.nn.functional.grouped_mm"):
        MultiLoraModel.from_pool(pool, backend="grouped_mm")
    with pytest.raises(WorkbenchError, match=r"unknown kernel backend 'grouped'"):
        MultiLoraModel.from_pool(pool, backend="grouped")


@pytest.mark.parametrize("extra", [{"use_rslora": True},
                                   {"alpha_pattern": {"v_proj": 3}, "rank_pattern": {"q_proj": 2}}],
                         ids=["rslora", "patterns"])
def test_saved_composition_scales_like_peft(pool, tiny_dir, extra):
    """A merged_lora artifact folder is read by the pool's LoRA parser: rsLoRA and rank/alpha patterns
    give PEFT's exact scale."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from workbench.io import artifacts_dir

    pool.add(tiny_dir / "lora_a", "a")
    folder = artifacts_dir() / f"task_arithmetic-{uuid.uuid4().hex[:12]}"
    torch.manual_seed(7)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False,
                     **extra)
    get_peft_model(pool.base.load(), cfg).save_pretrained(folder, safe_serialization=True)
    (folder / "artifact.json").write_text(json.dumps({"type": "merged_lora", "name": "combo", "names": ["combo"],
                                                      "pool": str(pool.root.resolve())}))
    eng = MultiLoraModel.from_pool(pool)
    assert eng.model_names() == ["base", "a", "combo"]
    x = torch.randint(5, 90, (2, 9))
    with torch.no_grad():
        want = PeftModel.from_pretrained(pool.base.load(), str(folder), is_trainable=False).eval()(input_ids=x).logits
    torch.testing.assert_close(eng.forward(x, assignments=[eng.resolve("combo")] * 2).logits, want,
                               rtol=1e-5, atol=1e-5)


def test_corrupt_saved_composition_is_skipped_not_fatal(pool, tiny_dir):
    """One merged_lora folder that does not parse is skipped with its reason; the server still starts."""
    from workbench.io import artifacts_dir

    pool.add(tiny_dir / "lora_a", "a")
    folder = artifacts_dir() / f"task_arithmetic-{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')  # no weights file
    (folder / "artifact.json").write_text(json.dumps({"type": "merged_lora", "name": "broken", "names": ["broken"],
                                                      "pool": str(pool.root.resolve())}))
    logged = []
    eng = MultiLoraModel.from_pool(pool, log=logged.append)
    assert "broken" not in eng.model_names() and "a" in eng.model_names()
    assert any("saved composition 'broken'" in line and "missing" in line for line in logged), logged


def test_saved_composition_served_by_recipe_name(pool, tiny_dir):
    """A re-factored merge is listed under its recipe's name, also when a sweep point built it first."""
    from workbench.artifacts import load_artifact
    from workbench.recipes import build, parse_recipe

    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    recipe = {"pool": str(pool.root), "method": "task_arithmetic", "experts": ["a", "b"],
              "parameters": {"lambda": 0.5}, "output": {"kind": "lora", "rank": 6}}
    first = build(parse_recipe({**recipe, "name": "combo@lambda0.5"}), log=lambda *a: None)
    assert MultiLoraModel.from_pool(pool).model_names() == ["base", "a", "b"]  # a bare sweep point is not served
    again = build(parse_recipe({**recipe, "name": "combo"}), log=lambda *a: None)
    assert again == first
    eng = MultiLoraModel.from_pool(pool)
    assert eng.model_names() == ["base", "a", "b", "combo"]
    x = torch.randint(5, 90, (2, 9))
    with torch.no_grad():
        want = load_artifact(first).model(input_ids=x).logits
    torch.testing.assert_close(eng.forward(x, assignments=[eng.resolve("combo")] * 2).logits, want,
                               rtol=1e-4, atol=1e-4)


# -- routed compositions (routed_lora artifacts) served beside plain adapters and mixes

# arrow routes over (b, a): its router's expert i is not the engine's adapter i
ROUTED = {"arrow-k1": ("arrow", ["b", "a"], {"k": 1}),
          "goose": ("phatgoose", ["a", "b"], {"k": 2, "steps": 3, "examples": 16}),
          # Twin: the shared part (rank 16) + exclusive parts at full rank, routed from the prefix by its MLP
          "twin-t": ("twin", ["a", "b"], {"rank": 24, "router_examples": 64, "router_epochs": 5,
                                           "temperature": 4.0}),
          # a second Twin (low rank, sharp weights): two Twin compositions in one batch keep separate states
          "twin-s": ("twin", ["a", "b"], {"rank": 2, "router_examples": 64, "router_epochs": 5,
                                           "temperature": 0.25})}


@pytest.fixture(scope="module")
def routed_pool(tmp_path_factory, tiny_dir):
    """A pool of two tagged LoRA experts with Arrow, PHATGOOSE and Twin artifacts built over it (once per module)."""
    from workbench.pool import Pool
    from workbench.recipes import build, parse_recipe

    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_POOLS", str(tmp_path_factory.mktemp("routed") / "adapters"))
    pool = Pool.create("routed", base=str(tiny_dir / "base"))
    pool.add(tiny_dir / "lora_a", "a", tags={"task": "addition"}, data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "b", tags={"task": "sorting"}, data=suite_data("sorting"))
    arts = {name: build(parse_recipe({"name": name, "method": method, "pool": "routed", "experts": experts,
                                      "parameters": params}), log=lambda *a: None)
            for name, (method, experts, params) in ROUTED.items()}
    yield pool, arts
    mp.undo()


@pytest.fixture()
def served_routed(routed_pool):
    pool, arts = routed_pool
    logs: list[str] = []
    engine = MultiLoraModel.from_pool(pool, log=logs.append)
    app = create_app(engine, max_batch=64, window_s=0.05)
    url, server, thread = start_in_thread(app)
    assert server.started
    yield url, pool, arts, engine, app, logs
    server.should_exit = True
    thread.join(timeout=10)


def _hf_alone(model, tok, prompt: str, max_new_tokens: int) -> str:
    """Greedy text of `prompt` generated alone (batch 1) by a loaded HF model, cut at EOS."""
    from workbench.tasks.suite import ADD_SPECIAL_TOKENS

    ids = tok(prompt, return_tensors="pt", add_special_tokens=ADD_SPECIAL_TOKENS)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    return tok.decode(new, skip_special_tokens=True)


def test_routed_compositions_listed_in_models(served_routed):
    url, _, _, engine, _, logs = served_routed
    data = httpx.get(f"{url}/v1/models").json()["data"]
    assert [(m["id"], m["kind"]) for m in data] == [("base", "base"), ("a", "lora"), ("b", "lora"),
                                                    ("arrow-k1", "routed_lora"), ("goose", "routed_lora"),
                                                    ("twin-s", "routed_lora"), ("twin-t", "routed_lora")]
    routers = {m["id"]: m.get("router") for m in data}
    assert routers["goose"] == "phatgoose" and routers["twin-t"] == "twin" and not logs
    assert engine.model_names() == ["base", "a", "b", "arrow-k1", "goose", "twin-s", "twin-t"]
    for internal in ("twin-t#shared", "twin-t#a"):  # Twin's parts are adapters of the engine, not models
        r = httpx.post(f"{url}/v1/completions", json={"model": internal, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 404, internal
    assert engine.routed["arrow-k1"].router.experts == ["b", "a"]  # mapped onto adapter ids [1, 0]
    r = httpx.post(f"{url}/v1/completions", json={"model": "mix:goose=0.5,a=0.5", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["message"] == ("routed composition 'goose' cannot be part of "
                                                                     "a mix: request it alone")
    r = httpx.post(f"{url}/v1/completions", json={"model": "gose", "prompt": "x"})
    assert r.status_code == 404 and "did you mean 'goose'?" in r.json()["error"]["message"]


def test_routed_compositions_in_one_forward_equal_each_alone(served_routed):
    """One prefill batch mixing an adapter, a mix and both routed compositions: each sequence's logits equal
    that sequence alone, and a routed sequence's equal its artifact loaded by load_artifact."""
    from workbench.artifacts import load_artifact

    _, _, arts, engine, _, _ = served_routed
    specs = ["goose", "twin-t", "a", "arrow-k1", "mix:a=0.3,b=0.7", "twin-t", "goose", "base"]
    x = torch.randint(5, 90, (len(specs), 7), generator=torch.Generator().manual_seed(3))
    got = engine.forward(x, assignments=[engine.resolve(s) for s in specs]).logits
    for i, s in enumerate(specs):
        alone = engine.forward(x[i:i + 1], assignments=[engine.resolve(s)]).logits
        torch.testing.assert_close(got[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        if s in arts:
            with torch.no_grad():
                want = load_artifact(arts[s]).model(input_ids=x[i:i + 1]).logits
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-5)
    base = engine.forward(x, assignments=[()] * len(specs)).logits
    for i, s in enumerate(specs[:-1]):  # every composition really adds to the base
        assert (got[i] - base[i]).abs().max() > 1e-3, s


def test_64_concurrent_requests_mixing_routed_compositions(served_routed):
    """Plain adapters, a weighted mix and three routed compositions (Arrow, PHATGOOSE, Twin), 64 concurrent
    requests in two waves, the second sent while the first decodes (sequences join running rows, Twin's pre-pass
    caches included, and leave them mid-batch):
    every output equals that request served alone; plain ones equal PEFT alone, routed ones their artifact's
    HF generate alone (greedy, KV cache: prefill rows [B*S] and decode rows [B] routed per step)."""
    from workbench.artifacts import load_artifact
    from workbench.tasks.suite import ADD_SPECIAL_TOKENS

    url, pool, arts, engine, app, _ = served_routed
    sched = app.state.scheduler
    names = ["a", "goose", "mix:a=0.3,b=0.7", "arrow-k1", "base", "b", "twin-t"]
    prompts = [f"Add: {i}+{2 * i}\nAnswer:" if i // 7 % 2 else f"Sort: {i % 7} {i % 5} 9\nAnswer:" for i in range(64)]
    batches: list[set] = []  # the assignments of every forward (prefills and decode steps)
    forward = engine.forward
    engine.forward = lambda *a, **k: (batches.append(set(k.get("assignments") or ())), time.sleep(0.01),
                                      forward(*a, **k))[2]

    async def waves():
        async with httpx.AsyncClient(timeout=120) as c:
            def post(i):
                return asyncio.ensure_future(c.post(f"{url}/v1/completions", json={
                    "model": names[i % 7], "prompt": prompts[i], "max_tokens": 6}))
            first = [post(i) for i in range(32)]
            while not sched.running:  # the first wave is decoding
                await asyncio.sleep(0.005)
            return await asyncio.gather(*first, *[post(i) for i in range(32, 64)])

    responses = asyncio.run(waves())
    assert all(r.status_code == 200 for r in responses)
    # one forward held plain adapters, the mix and every routed composition
    assert any({engine.resolve(n) for n in names if n != "base"} <= b for b in batches)
    assert sched.stats["joined_running"] > 0 and sched.stats["left_running"] > 0, sched.stats
    generate = engine.generate
    texts = [r.json()["choices"][0]["text"] for r in responses]
    tok = engine.tokenizer

    def served_alone(model: str, prompt: str) -> str:
        ids = tok(prompt, add_special_tokens=ADD_SPECIAL_TOKENS)["input_ids"]
        return tok.decode(generate([ids], [engine.resolve(model)], 6)[0], skip_special_tokens=True)

    for i, p in enumerate(prompts):
        assert texts[i] == served_alone(names[i % 7], p), (names[i % 7], p)
    plain = [i for i in range(64) if names[i % 7] in ("a", "b", "base")]
    folders = {a.name: a.source for a in engine.adapters}
    expected = peft_alone(pool.base, folders, [(names[i % 7], prompts[i]) for i in plain], 6)
    assert [texts[i] for i in plain] == expected
    for name, art in arts.items():
        if name not in names:  # twin-s: test_twin_in_a_left_padded_batch_decodes_like_its_own_model
            continue
        loaded = load_artifact(art)
        mine = [i for i in range(64) if names[i % 7] == name]
        want = {prompts[i]: _hf_alone(loaded.model, loaded.tokenizer, prompts[i], 6) for i in mine}
        assert [texts[i] for i in mine] == [want[prompts[i]] for i in mine], name
        assert any(want[p] != served_alone("base", p) for p in want), name  # the experts change the outputs


def test_unknown_routed_composition_is_unknown_not_the_base(served_routed):
    """A Routed assignment naming nothing this engine serves is refused, never served as the base model."""
    from workbench.serving.engine import Routed, UnknownModel

    engine = served_routed[3]
    with pytest.raises(UnknownModel, match="unknown routed composition 'nope'"):
        engine.generate([[5, 6, 7]], [Routed("nope")], 2)


def test_routed_composition_over_experts_not_loaded_is_skipped(routed_pool):
    """An engine over expert a only: every routed artifact (over a and b) is left out, each with its reason."""
    pool, arts = routed_pool
    logs: list[str] = []
    engine = MultiLoraModel.from_pool(pool, experts=["a"], log=logs.append)
    assert engine.model_names() == ["base", "a"]
    kinds = {n: "twin" if n.startswith("twin") else "routed" for n in arts}
    assert len(logs) == 4 and all(f"{kinds[n]} composition {n!r} ({arts[n]}) not served: its experts ['b'] are not "
                                  "LoRA experts loaded here" in logs for n in arts)


def test_a_deeply_nested_or_huge_artifact_json_is_skipped_not_a_crash(routed_pool):
    """The artifact scan behind `workbench serve`, the app's Routing view and Playground reads each artifact.json
    bounded (size and depth): a 100,000-deep file and a 40 MB one are skipped (no RecursionError, no 40 MB read),
    the other compositions still listed; reading one directly is a one-line error."""
    import shutil

    from workbench.artifacts import read_artifact_meta
    from workbench.io import artifacts_dir
    from workbench.serving.engine import routed_artifacts

    from workbench.modules.routers import load_router
    from workbench.pool import ExpertValidationError, LoraLayout

    pool, arts = routed_pool
    before = routed_artifacts(pool)
    assert {n for n, _ in before} >= {"goose", "arrow-k1"}
    meta = read_artifact_meta(arts["goose"])
    nested = "[" * 100_000 + "]" * 100_000
    deep, huge, router = (artifacts_dir() / f"{n}-x" for n in ("deep", "huge", "router"))
    try:
        for folder, text in ((deep, nested),  # the real artifact's metadata, padded past the size cap
                             (huge, json.dumps({**meta, "names": ["huge-x"], "pad": "x" * (40 << 20)})),
                             (router, json.dumps({**meta, "names": ["router-x"]}))):
            shutil.copytree(arts["goose"], folder)
            (folder / "artifact.json").write_text(text)
        (router / "router.json").write_text(nested)
        names = [n for n, _ in routed_artifacts(pool)]
        assert "huge-x" not in names and set(names) >= {n for n, _ in before}  # skipped (not a RecursionError)
        for folder, why in ((deep, "nested too deeply"), (huge, "too large to read")):
            with pytest.raises(WorkbenchError, match=why) as e:
                read_artifact_meta(folder)
            assert "\n" not in str(e.value)
        with pytest.raises(WorkbenchError, match="nested too deeply"):  # a router file: one line, not a crash
            load_router(router)
        engine = MultiLoraModel.from_pool(pool, log=lambda *a: None)  # serving starts over all of them
        assert "router-x" not in engine.model_names() and "goose" in engine.model_names()
        lora = router / "lora"
        lora.mkdir()
        (lora / "adapter_config.json").write_text(nested)
        with pytest.raises(ExpertValidationError, match="nested too deeply"):
            LoraLayout(lora, {}, "deep-x")
    finally:
        for folder in (deep, huge, router):
            shutil.rmtree(folder, ignore_errors=True)


def test_stale_or_dense_twin_is_not_served(routed_pool, tmp_path, monkeypatch):
    """A Twin artifact whose expert changed since the build, one from before artifacts recorded their experts'
    files, one built from full fine-tunes (dense shared part), one with a corrupt file: each skipped with its
    reason in one line, the rest served."""
    import json
    import shutil

    from workbench.artifacts import read_artifact_meta
    from workbench.methods.twin import twin_factors

    pool, arts = routed_pool
    folder = arts["twin-t"]
    meta = read_artifact_meta(folder)
    cases = {"changed": ({**meta, "expert_files": {**meta["expert_files"], "a": {"x": "0"}}},
                         "its experts ['a'] changed since the router was built; rebuild it"),
             "old": ({k: v for k, v in meta.items() if k != "expert_files"},
                     "built before artifacts recorded their experts' files")}
    original = (folder / "artifact.json").read_text()
    try:
        for case, (m, reason) in cases.items():
            (folder / "artifact.json").write_text(json.dumps(m))
            logs: list[str] = []
            engine = MultiLoraModel.from_pool(pool, log=logs.append)
            assert "twin-t" not in engine.model_names() and "goose" in engine.model_names(), case
            assert len(logs) == 1 and reason in logs[0], (case, logs)
    finally:
        (folder / "artifact.json").write_text(original)
    from safetensors.torch import load_file, save_file

    from workbench.io import artifacts_dir

    dense = artifacts_dir() / "twin-dense"
    shutil.copytree(folder, dense)
    try:
        shared = load_file(str(dense / "shared.safetensors"))
        name = next(k for k in shared if k.endswith(".A"))[: -len(".A")]
        save_file({f"{name}.delta": shared[f"{name}.B"] @ shared[f"{name}.A"]}, str(dense / "shared.safetensors"))
        (dense / "artifact.json").write_text(json.dumps({**meta, "names": ["twin-dense"], "name": "twin-dense"}))
        logs = []
        engine = MultiLoraModel.from_pool(pool, log=logs.append)
        assert "twin-dense" not in engine.model_names() and "twin-t" in engine.model_names()
        assert len(logs) == 1 and "built from full fine-tunes" in logs[0], logs
        (dense / "exclusive.safetensors").write_bytes(b"not a safetensors file")  # corrupt: one line, server lives
        save_file(shared, str(dense / "shared.safetensors"))
        logs = []
        assert "twin-t" in MultiLoraModel.from_pool(pool, log=logs.append).model_names()
        assert len(logs) == 1 and "cannot read its parts" in logs[0], logs
        # factors that do not fit the base (a shared A one column short): one line, the server lives
        save_file({**shared, f"{name}.A": shared[f"{name}.A"][:, :-1].contiguous()}, str(dense / "shared.safetensors"))
        shutil.copy(folder / "exclusive.safetensors", dense / "exclusive.safetensors")
        logs = []
        assert "twin-t" in MultiLoraModel.from_pool(pool, log=logs.append).model_names()
        assert len(logs) == 1 and f"its factors for {name!r} are" in logs[0], logs
        # exclusive A and B whose ranks do not pair up: one line, the server lives
        excl = load_file(str(folder / "exclusive.safetensors"))
        save_file(shared, str(dense / "shared.safetensors"))
        save_file({**excl, f"{name}.B": excl[f"{name}.B"][..., :-1].contiguous()}, str(dense / "exclusive.safetensors"))
        logs = []
        assert "twin-t" in MultiLoraModel.from_pool(pool, log=logs.append).model_names()
        assert len(logs) == 1 and "twin-dense" in logs[0] and "malformed parts" in logs[0] and "\n" not in logs[0], logs
    finally:
        shutil.rmtree(dense)
    with pytest.raises(WorkbenchError, match="cannot read its parts"):
        twin_factors(tmp_path)


def test_twin_in_a_left_padded_batch_decodes_like_its_own_model(served_routed):
    """Two Twin compositions, an adapter and Arrow in one left-padded batch of prompts of different lengths,
    12 greedy tokens through the KV cache: each Twin sequence's tokens equal the artifact's own HF model
    (shared delta folded into the base, TwinRouting) generating it alone; its routing weights are far from
    uniform on these prompts, and differ between the two Twins."""
    from workbench.artifacts import load_artifact
    from workbench.tasks.suite import ADD_SPECIAL_TOKENS

    _, pool, arts, engine, _, _ = served_routed
    tok = engine.tokenizer
    prompts = ["Sort: 3 1 2\nAnswer:", "Add: 12+30 and then some more words\nAnswer:", "x", "Add: 1+1\nAnswer:",
               "Sort: 9 8 7 6 5 4\nAnswer:", "Add: 40+2\nAnswer:"]
    models = ["twin-s", "twin-t", "twin-s", "a", "twin-t", "arrow-k1"]
    ids = [tok(p, add_special_tokens=ADD_SPECIAL_TOKENS)["input_ids"] for p in prompts]
    assert len({len(i) for i in ids}) > 2
    got = engine.generate(ids, [engine.resolve(m) for m in models], 12)
    own = {n: load_artifact(arts[n]) for n in ("twin-s", "twin-t", "arrow-k1")}
    for p, m, g in zip(prompts, models, got):  # the Twins and Arrow: each its artifact's own HF model alone
        if m in own:
            want = _hf_alone(own[m].model, own[m].tokenizer, p, 12)
            assert tok.decode(g, skip_special_tokens=True) == want, (m, p)
    # the plain adapter's row is untouched by the Twins' routing: PEFT alone
    folders = {a.name: a.source for a in engine.adapters}
    assert [tok.decode(got[3], skip_special_tokens=True)] == peft_alone(pool.base, folders, [("a", prompts[3])], 12)
    with torch.no_grad():
        x = torch.tensor([ids[1]])
        w = {n: own[n].model.twin.weights(x)[0, -1] for n in ("twin-s", "twin-t")}
    assert float(w["twin-s"].max() - w["twin-s"].min()) > 0.5  # sharp routing: not a uniform mix
    assert not torch.allclose(w["twin-s"], w["twin-t"], atol=1e-3)


def test_a_lora_expert_the_pool_records_as_not_built_is_skipped_and_said(pool, tiny_dir):
    """A fresh clone's demo pool lists experts whose weights are not shipped (`rebuild` in pool.json, no file on
    disk): the server serves the others and says which it skips, instead of failing to start; named explicitly,
    the missing one is an error."""
    import json
    import shutil

    from workbench.pool import Pool

    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    manifest = pool.root / "pool.json"
    data = json.loads(manifest.read_text())
    next(e for e in data["experts"] if e["name"] == "b")["rebuild"] = "workbench demo --full"
    manifest.write_text(json.dumps(data))
    shutil.rmtree(pool.root / "experts" / "b")
    reopened = Pool.open(pool.root)
    said = []
    engine = MultiLoraModel.from_pool(reopened, include_artifacts=False, log=said.append)
    assert list(engine.ids) == ["a"]
    assert said == ["not serving b: not built (`workbench demo --full`)"]
    with pytest.raises(WorkbenchError, match="missing"):
        MultiLoraModel.from_pool(reopened, ["a", "b"], include_artifacts=False)
