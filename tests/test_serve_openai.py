"""The OpenAI surface on a real uvicorn over loopback: the official `openai` SDK drives completions and chat
(plain, streaming, logprobs, echo, stop, seed, include_usage, models), errors in OpenAI's shape on every path,
penalties and top_p decode as specified, /metrics, and schemathesis against /openapi.json."""

import json
import threading
import time

import httpx
import openai
import pytest
import torch

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
    assert all(len(t) <= 3 for t in lp.top_logprobs[1:]) and all(v <= 0 for v in lp.token_logprobs[1:])

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
        assert {"200", "400", "404", "500"} <= set(responses), (path, responses)
        assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
        assert "text/event-stream" in responses["200"]["content"]
    assert "404" in schema["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["max_tokens"]["type"] == "integer" and props["stream"]["type"] == "boolean"


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
            if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool) \
                    and body["max_tokens"] > 8:
                body["max_tokens"] = 8  # bounded decoding time
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
