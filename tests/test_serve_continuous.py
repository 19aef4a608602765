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
import torch
from conftest import stream_pieces

from workbench.errors import WorkbenchError
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


@pytest.mark.parametrize("admission", ["continuous", "static"])
def test_short_request_finishes_while_a_long_stream_runs(serve, engine, monkeypatch, admission):
    """Continuous: a short request sent while a long stream decodes joins its batch and finishes first. Static (the
    old batching, kept for comparisons): it waits for the long stream to end."""
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
    assert finish[-1] == "length"  # and the long stream went on to its 200 tokens
    if admission == "continuous":
        assert long_still_running, "the short request waited for the long stream"
        assert app.state.scheduler.stats["joined_running"] == 1
    else:
        assert not long_still_running, "static admission let the short request join a running batch"
        assert app.state.scheduler.stats["joined_running"] == 0 and app.state.scheduler.stats["batches"] == 2


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
        pieces, finish = stream_pieces(url, path, body)
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


def test_penalties_and_stop_strings_in_one_batch_equal_each_request_alone(serve, engine, monkeypatch):
    """Requests with different penalties, stop strings and lengths (one sampled with its seed) decoding together,
    rows leaving while others go on: each text and finish reason equals that request sent alone."""
    url, app = serve()
    sched = app.state.scheduler
    prompts = ["Sort: 3 1 2\nAnswer:", "Add: 12+34\nAnswer:", "Sort: 9 8 7\nAnswer:", "Add: 5+5\nAnswer:"]
    bodies = [{"model": "a", "prompt": prompts[0], "max_tokens": 14, "frequency_penalty": 2.0, "presence_penalty": 1.0},
              {"model": "b", "prompt": prompts[1], "max_tokens": 20, "presence_penalty": -1.5},
              {"model": "a", "prompt": prompts[2], "max_tokens": 12, "frequency_penalty": 1.2},
              {"model": "mix:a=0.3,b=0.7", "prompt": prompts[3], "max_tokens": 3},
              {"model": "base", "prompt": prompts[0], "max_tokens": 16, "frequency_penalty": 0.7},
              {"model": "b", "prompt": prompts[2], "max_tokens": 9, "frequency_penalty": -1.0, "temperature": 0.8,
               "seed": 3},
              {"model": "a", "prompt": prompts[1], "max_tokens": 18, "presence_penalty": 2.0},
              {"model": "b", "prompt": prompts[3], "max_tokens": 7}]

    def one(body):
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]

    for i in (0, 1, 2):  # the penalties change these texts
        assert one(bodies[i]) != one({**bodies[i], "frequency_penalty": 0.0, "presence_penalty": 0.0}), i
    # stop strings: two characters from the middle of some requests' own texts (so they stop there)
    for i in (2, 4, 6, 7):
        text = one(bodies[i])[0]
        assert len(text) >= 6, text
        bodies[i]["stop"] = ["never-there", text[len(text) // 2:len(text) // 2 + 2]]
    alone_ = [one(b) for b in bodies]
    assert [f for _, f in alone_].count("stop") >= 4
    slow_down(monkeypatch, engine, 0.01)
    before = dict(sched.stats)
    together = [(r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]) for r in post_all(url, bodies)]
    assert together == alone_
    assert sched.stats["max_batch_seen"] >= len(bodies) and sched.stats["left_running"] > before["left_running"]
    assert idle(engine, sched)


def _draws(logits: torch.Tensor, n: int, **params) -> torch.Tensor:
    """Token frequencies of `n` draws by the scheduler's own choice of the next token (one seeded generator)."""
    from workbench.serving.scheduler import SamplingParams, choose_token

    p = SamplingParams(max_tokens=1, **params)
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([choose_token(logits, p, None, g) for _ in range(n)])
    return torch.bincount(draws, minlength=logits.numel()).double() / n


def test_temperature_samples_softmax_of_logits_over_t():
    """Seeded draws at T = 0.5 and T = 2 from fixed logits: token frequencies match softmax(logits / T) computed by
    hand (within 4 standard errors), so the lower temperature is the sharper."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 6000
    entropy = {}
    for t in (0.5, 2.0):
        freq = _draws(logits, n, temperature=t)
        want = torch.exp(logits.double() / t) / torch.exp(logits.double() / t).sum()
        assert (freq - want).abs().max() < 4 * (0.25 / n) ** 0.5, (t, freq, want)
        entropy[t] = float(-(freq * freq.clamp_min(1e-12).log()).sum())
    assert entropy[0.5] < entropy[2.0] - 0.3


@pytest.mark.parametrize("top_p, nucleus", [(0.3, 1), (0.6, 2), (0.8, 3), (0.9, 4), (1.0, 5)])
def test_top_p_keeps_the_smallest_nucleus_reaching_its_mass(top_p, nucleus):
    """Probabilities 1/2, 1/4, 1/8, 1/16, 1/16: the nucleus is the most likely tokens up to the first whose cumulated
    mass reaches top_p (0.6: the first two; a `cumsum < top_p` rule keeps one); inside it, draws follow the
    renormalised probabilities."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625], dtype=torch.float64)
    n = 4000
    freq = _draws(probs.log().float(), n, temperature=1.0, top_p=top_p)
    assert set(torch.nonzero(freq).flatten().tolist()) == set(range(nucleus)), freq
    want = torch.zeros(5, dtype=torch.float64)
    want[:nucleus] = probs[:nucleus] / probs[:nucleus].sum()
    assert (freq - want).abs().max() < 4 * (0.25 / n) ** 0.5, (freq, want)


RAISING_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                    "{{ raise_exception('System role not supported') }}{% endif %}"
                    "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


def test_a_chat_template_that_refuses_the_messages_is_a_400(serve, engine):
    """A chat template raising (here: no system role, as some models' do) answers a 400 with its message, not a 500;
    the same messages without the system one are served."""
    engine.tokenizer.chat_template = RAISING_TEMPLATE
    url, _ = serve()
    user = {"role": "user", "content": "Add: 1+2"}
    for role in ("system", "developer"):
        r = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "a", "max_tokens": 3, "messages": [{"role": role, "content": "Be brief."}, user]}, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "System role not supported" in error["message"] and error["param"] == "messages", error
        assert error["type"] == "invalid_request_error"
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "a", "max_tokens": 3, "messages": [user]}, timeout=60)
    assert r.status_code == 200, r.text


def test_bodies_over_the_limit_get_a_413_before_they_are_read(serve):
    url, _ = serve(max_body_mb=1)
    big = {"model": "a", "prompt": "x" * (3 * 2**19)}  # 1.5 MB

    def chunked(data: bytes):
        for k in range(0, len(data), 65536):
            yield data[k:k + 65536]

    data = json.dumps(big).encode()
    for r in (httpx.post(f"{url}/v1/completions", json=big, timeout=60),
              httpx.post(f"{url}/v1/completions", content=chunked(data), timeout=60,
                         headers={"content-type": "application/json"})):
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "request_too_large" and set(error) == {"message", "type", "param", "code"}, error
    small = json.dumps({"model": "a", "prompt": "Add: 1+2", "max_tokens": 3}).encode()
    r = httpx.post(f"{url}/v1/completions", content=chunked(small), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    under = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x" * 2**19}, timeout=60)  # 0.5 MB
    assert under.status_code == 400 and under.json()["error"]["code"] == "context_length_exceeded"


def test_small_prompts_are_tokenised_while_big_ones_are(serve, engine, monkeypatch):
    """More big prompts than the default thread pool has threads, each tokenising for seconds: a small completion
    sent after them is tokenised and answered while they are all still in flight (big prompts have threads of
    their own; a shared pool would queue it behind them)."""
    import os

    calls: list[str] = []
    url, _ = serve()
    # the engine's tokenizer, seconds slower on a big text
    monkeypatch.setattr(engine, "tokenizer", _Slow(engine.tokenizer, 1.5, min_len=200_000, calls=calls))
    n_big = min(32, (os.cpu_count() or 1) + 4) + 2  # asyncio.to_thread's default pool, and more
    done: list[float] = []

    async def main():
        async with httpx.AsyncClient(timeout=300) as c:
            async def big():
                r = await c.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x" * 300_000})
                done.append(time.monotonic())
                return r

            bigs = [asyncio.ensure_future(big()) for _ in range(n_big)]
            while len(calls) < 1:
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            small = await c.post(f"{url}/v1/completions", json={"model": "b", "prompt": "Add: 1+2", "max_tokens": 3})
            small_at = time.monotonic()
            return small, small_at - t0, small_at, await asyncio.gather(*bigs)

    small, took, small_at, bigs = asyncio.run(main())
    assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 3
    assert all(r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded" for r in bigs)
    assert not any(t < small_at for t in done), (took, sorted(t - small_at for t in done))


def test_time_to_first_token_counts_from_arrival_tokenising_included(serve, engine, monkeypatch):
    """TTFT starts when the request arrives (before tokenising), the queue time when the scheduler gets it."""
    url, _ = serve()
    monkeypatch.setattr(engine, "tokenizer", _Slow(engine.tokenizer, 0.5))
    r = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "Add: 1+2", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    lines = dict(line.rsplit(" ", 1) for line in httpx.get(f"{url}/metrics").text.splitlines()
                 if line and not line.startswith("#"))
    assert float(lines['workbench_time_to_first_token_seconds_sum{model="a"}']) >= 0.5
    assert float(lines['workbench_queue_seconds_sum{model="a"}']) < 0.5


def test_a_full_model_that_cannot_load_is_a_503_logged_with_its_traceback(serve, engine, tmp_path, caplog):
    from workbench.serving.engine import FullModel

    url, _ = serve(full_models=[FullModel("broken", "merged_model", tmp_path / "missing", {})])
    with caplog.at_level(logging.ERROR, logger="workbench.serving"):
        rs = [httpx.post(f"{url}/v1/completions", json={"model": "broken", "prompt": "x", "max_tokens": 2}, timeout=60)
              for _ in range(2)]
    for r in rs:
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable", r.text
        assert "\n" not in r.json()["error"]["message"]
    loads = [rec for rec in caplog.records if "could not be loaded" in rec.getMessage() and rec.exc_info]
    assert len(loads) == 1  # the load failed once, logged with its traceback; each 503 is logged in one line
    assert sum("503 for model 'broken'" in rec.getMessage() for rec in caplog.records) == 2
    r = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_a_full_model_whose_load_failed_is_loaded_again_when_its_folder_changes_or_later(monkeypatch, tmp_path):
    """A failed first load (say a transient MemoryError) is not for good: requests answer at once without reloading
    while nothing changed, the next one after the folder changes or after `retry_after_s` loads it again."""
    from workbench import artifacts
    from workbench.serving import engine as eng

    calls, fail = [], {"on": True}

    def flaky(folder, device="cpu"):
        calls.append(folder)
        if fail["on"]:
            raise MemoryError("not now")
        return type("Loaded", (), {"model": "net", "tokenizer": "tok"})()

    monkeypatch.setattr(artifacts, "load_artifact", flaky)
    monkeypatch.setattr(eng, "MultiLoraModel", lambda model, tok, adapters, **kw: ("engine", model, tok))
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "artifact.json").write_text("{}")
    slow = eng.FullModel("m", "merged_model", folder, {}, retry_after_s=3600)
    for _ in range(3):
        with pytest.raises(WorkbenchError, match="could not be loaded: MemoryError: not now"):
            slow.engine()
    assert len(calls) == 1  # not reloaded per request while nothing changed
    (folder / "model.safetensors").write_bytes(b"more")  # the folder changed: the next request loads it again
    with pytest.raises(WorkbenchError, match="could not be loaded"):
        slow.engine()
    assert len(calls) == 2
    quick = eng.FullModel("q", "merged_model", folder, {}, retry_after_s=0.2)
    with pytest.raises(WorkbenchError, match="could not be loaded"):
        quick.engine()
    assert len(calls) == 3
    time.sleep(0.25)  # the same folder, but the wait has passed: loaded again, fails again
    with pytest.raises(WorkbenchError, match="could not be loaded"):
        quick.engine()
    assert len(calls) == 4
    time.sleep(0.25)  # the wait doubled (0.4 s) after a second failure in a row: not yet
    with pytest.raises(WorkbenchError, match="could not be loaded"):
        quick.engine()
    assert len(calls) == 4
    # a retry under way: other requests answer at once instead of queueing behind the load
    release, entered = threading.Event(), threading.Event()

    def slow_load(folder, device="cpu"):
        calls.append(folder)
        entered.set()
        release.wait(10)
        return type("Loaded", (), {"model": "net", "tokenizer": "tok"})()

    monkeypatch.setattr(artifacts, "load_artifact", slow_load)
    time.sleep(0.2)
    loader = threading.Thread(target=quick.engine)
    loader.start()
    assert entered.wait(10)
    t0 = time.monotonic()
    with pytest.raises(WorkbenchError, match="could not be loaded"):
        quick.engine()
    assert time.monotonic() - t0 < 1.0
    release.set()
    loader.join(10)
    assert quick.engine() == ("engine", "net", "tok") and quick.loaded and len(calls) == 5
    assert quick.engine() == ("engine", "net", "tok") and len(calls) == 5  # loaded once, kept
    for bad in (-1, float("nan"), float("inf"), 1e6):
        with pytest.raises(WorkbenchError, match="retry_after_s"):
            eng.FullModel("b", "merged_model", folder, {}, retry_after_s=bad)


class _Slow:
    """A tokenizer that sleeps `delay` seconds before tokenising a text of at least `min_len` characters (noting
    its first character in `calls`), and is otherwise the wrapped one."""

    def __init__(self, tok, delay: float, *, min_len: int = 0, calls: list | None = None):
        self.tok, self.delay, self.min_len, self.calls = tok, delay, min_len, calls

    def __call__(self, text, **kw):
        if len(text) >= self.min_len:
            if self.calls is not None:
                self.calls.append(text[:1])
            time.sleep(self.delay)
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __len__(self):
        return len(self.tok)


def test_ignore_eos_decodes_through_the_end_of_sequence_token_to_max_tokens(serve, engine, monkeypatch):
    """vLLM's `ignore_eos` (what the open-loop benchmark sends for exact output lengths): with every step's argmax the
    end-of-sequence token, a request stops at once without it and decodes max_tokens tokens with it."""
    url, _ = serve()
    forward = engine.forward
    eos = engine.tokenizer.eos_token_id

    def eos_first(*a, **k):
        out = forward(*a, **k)
        out.logits[..., eos] = out.logits.max() + 10.0
        return out

    monkeypatch.setattr(engine, "forward", eos_first)
    body = {"model": "a", "prompt": "Add: 2+2\nAnswer:", "max_tokens": 6}
    stop, through = post_all(url, [body, {**body, "ignore_eos": True}])
    assert stop.json()["usage"]["completion_tokens"] == 0 and stop.json()["choices"][0]["finish_reason"] == "stop"
    assert through.json()["usage"]["completion_tokens"] == 6 and through.json()["choices"][0]["finish_reason"] == "length"
    bad = httpx.post(f"{url}/v1/completions", json={**body, "ignore_eos": "maybe"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] in ("ignore_eos", None)
