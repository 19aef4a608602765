"""OpenAI-compatible server on loopback: concurrency, exactness vs PEFT alone, bad requests."""

import asyncio
import json

import httpx
import pytest
import torch

from workbench.serve.api import create_app, start_in_thread
from workbench.serve.engine import MultiLoraModel, peft_alone, top_k_router


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


def test_models_endpoint(served):
    url, *_ = served
    data = httpx.get(f"{url}/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["base", "a", "b"]


def test_64_concurrent_mixed_requests_match_peft_alone(served):
    url, pool, engine, app = served
    names = ["a", "b", "base"]
    prompts = [f"Add: {i}+{2 * i}\nAnswer:" if i % 2 else f"Sort: {i % 7} {i % 5} 9\nAnswer:" for i in range(64)]

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            reqs = [c.post(f"{url}/v1/completions", json={"model": names[i % 3], "prompt": p, "max_tokens": 6})
                    for i, p in enumerate(prompts)]
            return await asyncio.gather(*reqs)

    responses = asyncio.run(main())
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


def test_client_disconnect_mid_stream(served):
    url, _, _, app = served
    with httpx.stream("POST", f"{url}/v1/completions",
                      json={"model": "a", "prompt": "x", "max_tokens": 200, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token, then hang up
    ok = httpx.post(f"{url}/v1/completions", json={"model": "b", "prompt": "y", "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3


def test_router_callback_mixture(pool, tiny_dir):
    """Per-token top-k routing through the same op: a router that always picks `a` equals adapter a."""
    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    eng = MultiLoraModel.from_pool(pool)
    x = torch.randint(5, 90, (2, 7))
    always_a = top_k_router(lambda name, h: torch.tensor([10.0, -10.0]).expand(h.shape[0], 2), k=1)
    routed = eng.forward(x, router=always_a).logits
    direct = eng.forward(x, assignments=[eng.resolve("a")] * 2).logits
    torch.testing.assert_close(routed, direct)
    mixed = eng.forward(x, router=top_k_router(lambda n, h: torch.zeros(h.shape[0], 2), k=2)).logits
    half = eng.forward(x, assignments=[eng.resolve("mix:a=0.5,b=0.5")] * 2).logits
    torch.testing.assert_close(mixed, half)


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
