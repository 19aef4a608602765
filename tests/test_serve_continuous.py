"""Continuous batching on a real uvicorn over loopback: bad requests refused before they join a batch, a failing
sequence ending alone, short requests never held behind long ones, per-request seeds, stop strings in streams,
cancelled requests leaving their slot, 64 requests joining and leaving mid-batch."""

import asyncio
import json
import logging
import threading
import time

import httpx
import pytest

from workbench.serving.api import create_app, start_in_thread
from workbench.serving.engine import MultiLoraModel
from workbench.tasks.suite import ADD_SPECIAL_TOKENS


@pytest.fixture()
def engine(pool, tiny_dir):
    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    return MultiLoraModel.from_pool(pool, include_artifacts=False)


@pytest.fixture()
def serve(engine):
    """serve(**create_app options) -> (url, app); every server started is stopped after the test."""
    started = []

    def start(**kw):
        app = create_app(engine, **{"max_batch": 64, "window_s": 0.05, **kw})
        url, server, thread = start_in_thread(app)
        assert server.started
        started.append((server, thread))
        return url, app

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(timeout=10)


def alone(engine, model: str, prompt: str, max_tokens: int) -> str:
    """Greedy text of one request decoded alone (a batch of one, the engine's static `generate`)."""
    ids = engine.tokenizer(prompt, add_special_tokens=ADD_SPECIAL_TOKENS)["input_ids"]
    out = engine.generate([ids], [engine.resolve(model)], max_tokens)[0]
    return engine.tokenizer.decode(out, skip_special_tokens=True)


def slow_down(monkeypatch, engine, seconds: float) -> None:
    """Every forward takes `seconds` longer: decoding spans long enough to see who waits for whom."""
    forward = engine.forward
    monkeypatch.setattr(engine, "forward", lambda *a, **k: (time.sleep(seconds), forward(*a, **k))[1])


def idle(engine, sched, timeout: float = 10) -> bool:
    """Wait until no row decodes (the scheduler drops finished rows just after their last event)."""
    deadline = time.monotonic() + timeout
    while (engine.active_sequences or sched.running) and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.active_sequences == 0 and not sched.running


def post_all(url: str, bodies: list[dict], path: str = "/v1/completions") -> list[httpx.Response]:
    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[c.post(f"{url}{path}", json=b) for b in bodies])

    return asyncio.run(main())


def text_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


# what each made a 500 (or junk) before: now a 400 naming the parameter, before the request joins any batch
BAD = [({"prompt": ""}, "prompt"), ({"prompt": ["Add: 1+1", ""]}, "prompt.1"), ({"seed": 2**63}, "seed"),
       ({"seed": -(2**63) - 1}, "seed"), ({"model": "mix:a=1e308,b=-1e308"}, "model"), ({"model": "mix:a=nan"}, "model"),
       ({"model": "mix:a=inf"}, "model"), ({"model": "mix:a=0.5,b=-inf"}, "model"), ({"model": "mix:a=1000"}, "model"),
       ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"), ({"presence_penalty": 2.5}, "presence_penalty"),
       ({"frequency_penalty": -3}, "frequency_penalty"), ({"stop": ["1", "2", "3", "4", "5"]}, "stop"),
       ({"stop": ""}, "stop"), ({"max_tokens": "16"}, "max_tokens"), ({"stream": 0}, "stream"), ({"n": 2}, "n"),
       ({"logprobs": 6}, "logprobs"), ({"logit_bias": {"5": 10}}, None), ({"max_tokens": 10**6}, "max_tokens"),
       ({"prompt": "x", "stream": True, "seed": 2**64}, "seed")]


def test_bad_requests_get_400_while_requests_in_flight_complete_exactly(serve, engine, monkeypatch):
    good = [{"model": m, "prompt": f"Add: {i}+{2 * i}\nAnswer:", "max_tokens": 8}
            for i, m in enumerate(["a", "b", "base", "mix:a=0.3,b=0.7"] * 2)]
    want = [alone(engine, b["model"], b["prompt"], 8) for b in good]
    url, app = serve()
    slow_down(monkeypatch, engine, 0.01)  # the good requests are decoding while the bad ones arrive
    base = {"model": "a", "prompt": "Sort: 3 1 2\nAnswer:", "max_tokens": 8}
    bodies = good[:4] + [{**base, **b} for b, _ in BAD] + good[4:]
    rs = post_all(url, bodies)
    assert [text_of(r) for r in rs[:4] + rs[-4:]] == want
    for (body, param), r in zip(BAD, rs[4:-4]):
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and "\n" not in error["message"], error
        assert error["param"] == param, (body, error)
    assert app.state.scheduler.stats["failed"] == 0 and app.state.scheduler.stats["sequences"] == 8
    # a tiny temperature is a valid one: it decodes greedily (dividing by 1e-308 used to give nan)
    for t in (1e-308, 1e-6):
        r = httpx.post(f"{url}/v1/completions", json={**base, "temperature": t}, timeout=60)
        assert text_of(r) == alone(engine, "a", base["prompt"], 8)


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_failing_sequence_ends_alone_with_its_traceback_logged(serve, engine, monkeypatch, caplog, when):
    """A forward that fails inside the model (after the first layers wrote their KV cache) whenever adapter b's row is
    in the batch: b's request gets a 500, the others their exact text; the batch decoded each row alone to find it."""
    models = ["a", "b", "base", "mix:a=0.5,b=0.5", "a"]
    prompts = [f"Sort: {i} 1 2\nAnswer:" for i in range(len(models))]
    want = [alone(engine, m, p, 6) for m, p in zip(models, prompts)]
    url, app = serve()
    poisoned, armed = engine.resolve("b"), threading.Event()
    forward = engine.forward

    def arming(input_ids, *a, assignments=None, **k):
        phase = "prefill" if input_ids.shape[1] > 1 else "decode"
        if phase == when and poisoned in (assignments or ()):
            armed.set()
        try:
            return forward(input_ids, *a, assignments=assignments, **k)
        finally:
            armed.clear()

    def boom(*_):
        if armed.is_set():
            raise RuntimeError("boom in adapter b's row")

    monkeypatch.setattr(engine, "forward", arming)
    hook = engine.model.model.layers[-1].register_forward_pre_hook(boom)
    try:
        with caplog.at_level(logging.ERROR, logger="workbench.serving"):
            rs = post_all(url, [{"model": m, "prompt": p, "max_tokens": 6} for m, p in zip(models, prompts)])
    finally:
        hook.remove()
    for m, r, w in zip(models, rs, want):
        if m == "b":
            assert r.status_code == 500, r.text
            assert r.json()["error"]["type"] == "server_error" and "boom in adapter b's row" in r.json()["error"]["message"]
        else:
            assert text_of(r) == w, m
    logged = [r for r in caplog.records if r.name == "workbench.serving" and "boom" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # one error, with its traceback
    assert app.state.scheduler.stats["failed"] == 1 and idle(engine, app.state.scheduler)


def test_non_finite_logits_end_that_sequence_only(serve, engine, monkeypatch):
    url, _ = serve()
    want = alone(engine, "a", "Add: 2+2\nAnswer:", 5)
    poisoned = engine.resolve("b")
    forward = engine.forward

    def nan_for_b(*a, assignments=None, **k):
        out = forward(*a, assignments=assignments, **k)
        for i, asg in enumerate(assignments or ()):
            if asg == poisoned:
                out.logits[i] = float("nan")
        return out

    monkeypatch.setattr(engine, "forward", nan_for_b)
    rs = post_all(url, [{"model": m, "prompt": "Add: 2+2\nAnswer:", "max_tokens": 5} for m in ("a", "b", "a")])
    assert [r.status_code for r in rs] == [200, 500, 200]
    assert "non-finite logits" in rs[1].json()["error"]["message"]
    assert text_of(rs[0]) == text_of(rs[2]) == want


@pytest.mark.parametrize("admission", ["continuous"])
def test_short_request_finishes_while_a_long_stream_runs(serve, engine, monkeypatch, admission):
    want = alone(engine, "b", "Add: 1+2\nAnswer:", 4)
    url, app = serve(admission=admission)
    slow_down(monkeypatch, engine, 0.02)  # 200 steps: at least 4 s
    streaming, finish = threading.Event(), []

    def long_stream():
        body = {"model": "a", "prompt": "x", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    streaming.set()
                    finish.append(json.loads(line[6:])["choices"][0]["finish_reason"])

    t = threading.Thread(target=long_stream)
    t.start()
    assert streaming.wait(60)
    r = httpx.post(f"{url}/v1/completions", json={"model": "b", "prompt": "Add: 1+2\nAnswer:", "max_tokens": 4},
                   timeout=120)
    long_still_running = t.is_alive()
    t.join(120)
    assert text_of(r) == want
    assert long_still_running, "the short request waited for the long stream"
    assert finish[-1] == "length"  # and the long stream went on to its 200 tokens
    assert app.state.scheduler.stats["joined_running"] == 1


def test_seeded_sampling_is_the_same_alone_and_batched(serve, engine):
    url, app = serve()
    body = {"model": "a", "prompt": "Sort: 3 1 2\nAnswer:", "max_tokens": 12, "temperature": 1.0, "top_p": 0.95,
            "seed": 7}
    first = text_of(httpx.post(f"{url}/v1/completions", json=body, timeout=60))
    assert text_of(httpx.post(f"{url}/v1/completions", json=body, timeout=60)) == first
    neighbours = [{**body, "seed": 8}, {**body, "model": "b", "seed": 7}, {**body, "temperature": 0.0, "seed": None},
                  {**body, "prompt": "Add: 12+30\nAnswer:", "seed": 9, "max_tokens": 3}, {**body, "seed": None}]
    rs = post_all(url, [neighbours[0], neighbours[1], body, *neighbours[2:], body])
    assert app.state.scheduler.stats["max_batch_seen"] >= 4  # sampled together
    assert text_of(rs[2]) == text_of(rs[-1]) == first
    assert text_of(rs[0]) != first  # another seed, another text: the seed is this request's own
    assert text_of(rs[3]) == alone(engine, "a", body["prompt"], 12)  # a greedy neighbour is not perturbed


def _stream_text(url: str, path: str, body: dict) -> tuple[list[str], str | None]:
    pieces, finish = [], None
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                piece = choice["text"] if "text" in choice else choice["delta"].get("content", "")
                pieces.append(piece)
                finish = choice["finish_reason"] or finish
    return pieces, finish


def test_streaming_equals_non_streaming_with_stop_strings(serve, engine):
    """A stop string that spans two tokens: streaming never sends its first characters, and its text equals the
    non-streaming text (everything before the stop)."""
    url, _ = serve()
    prompt = "Sort: 3 1 2\nAnswer:"
    ids = engine.tokenizer(prompt, add_special_tokens=ADD_SPECIAL_TOKENS)["input_ids"]
    tokens = engine.generate([ids], [engine.resolve("a")], 24)[0]
    full = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    stop = None
    for k in range(3, len(tokens)):  # 2 characters on each side of the boundary between tokens k-1 and k
        b = len(engine.tokenizer.decode(tokens[:k], skip_special_tokens=True))
        candidate = full[b - 2:b + 2]
        if len(candidate) == 4 and full.find(candidate) == b - 2:
            stop = candidate
            break
    assert stop is not None, full
    want = full[: full.find(stop)]
    for path, body in [("/v1/completions", {"prompt": prompt}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]})]:
        body = {**body, "model": "a", "max_tokens": 24, "stop": ["never-there", stop]}
        plain = httpx.post(f"{url}{path}", json=body, timeout=60)
        pieces, finish = _stream_text(url, path, body)
        assert "".join(pieces) == text_of(plain), path
        assert plain.json()["choices"][0]["finish_reason"] == finish
        if path == "/v1/completions":
            assert text_of(plain) == want and finish == "stop"
            assert not any(stop[:2] in p for p in pieces)


def test_cancelled_non_streaming_request_frees_its_slot(serve, engine, monkeypatch):
    """One row only: a client that gives up on a long non-streaming request is dropped from the batch within a
    few steps, and the next request gets the row."""
    url, app = serve(max_batch=1)
    stats = app.state.scheduler.stats
    slow_down(monkeypatch, engine, 0.02)  # 200 tokens: at least 4 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 200}, timeout=1.0)
    deadline = time.monotonic() + 10
    while (stats["cancelled"] < 1 or engine.active_sequences) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stats["cancelled"] == 1 and engine.active_sequences == 0
    assert stats["tokens"] < 150, stats  # it left long before its 200 tokens
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={"model": "b", "prompt": "y", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert time.monotonic() - t0 < 3  # it did not wait for the abandoned 200 tokens (4 s at least)


def test_64_requests_joining_and_leaving_mid_batch_equal_each_alone(serve, engine, monkeypatch):
    """Two waves of 32 requests over adapters, the base and a mix, 1 to 12 tokens each, the second sent while the
    first decodes: sequences join running rows and leave them mid-batch, and every text equals that request alone."""
    models = ["a", "b", "base", "mix:a=0.3,b=0.7"]
    bodies = [{"model": models[i % 4], "max_tokens": 1 + (i * 5) % 12,
               "prompt": f"Add: {i}+{3 * i}\nAnswer:" if i % 3 else f"Sort: {i % 7} {i % 5} 9 {i}\nAnswer:"}
              for i in range(64)]
    want = [alone(engine, b["model"], b["prompt"], b["max_tokens"]) for b in bodies]
    url, app = serve()
    sched = app.state.scheduler
    slow_down(monkeypatch, engine, 0.01)

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            first = [asyncio.ensure_future(c.post(f"{url}/v1/completions", json=b)) for b in bodies[:32]]
            while not sched.running:  # the first wave is decoding
                await asyncio.sleep(0.005)
            second = [asyncio.ensure_future(c.post(f"{url}/v1/completions", json=b)) for b in bodies[32:]]
            return await asyncio.gather(*first, *second)

    rs = asyncio.run(main())
    assert [text_of(r) for r in rs] == want
    assert sched.stats["joined_running"] > 0 and sched.stats["left_running"] > 0, sched.stats
    assert idle(engine, sched)


def test_a_scheduler_failure_answers_every_admitted_request_and_the_server_goes_on(serve, engine, monkeypatch):
    """A failure outside any one sequence (here: joining rows) fails the running and the joining requests with a
    500, none is left waiting forever, and the next request is served."""
    url, app = serve()
    sched = app.state.scheduler
    slow_down(monkeypatch, engine, 0.02)
    calls = []

    def concat_fails_once(states):
        calls.append(len(states))
        if len(calls) == 1:
            raise RuntimeError("joining failed")
        return MultiLoraModel.concat(states)

    monkeypatch.setattr(engine, "concat", concat_fails_once)

    async def main():
        async with httpx.AsyncClient(timeout=60) as c:
            first = asyncio.ensure_future(c.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x",
                                                                                "max_tokens": 100}))
            while not sched.running:
                await asyncio.sleep(0.005)
            second = await c.post(f"{url}/v1/completions", json={"model": "b", "prompt": "y", "max_tokens": 5})
            return await first, second

    first, second = asyncio.run(main())
    for r in (first, second):
        assert r.status_code == 500 and "scheduler failed" in r.json()["error"]["message"], r.text
    assert idle(engine, sched)
    assert text_of(httpx.post(f"{url}/v1/completions", json={"model": "b", "prompt": "y", "max_tokens": 5},
                              timeout=60)) == alone(engine, "b", "y", 5)
