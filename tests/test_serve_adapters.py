"""Adapters loaded and unloaded at run time, an LRU cap on the adapters in kernel slots, and compositions declared at
start (`--recipes`), on a real uvicorn over loopback with real PEFT adapters."""

import asyncio
import json
import logging
import shutil
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch
import yaml
from conftest import one_line, quiet

from workbench.errors import RecipeError, WorkbenchError
from workbench.serving.api import build_app, create_app, start_in_thread
from workbench.serving.engine import MultiLoraModel, peft_alone
from workbench.testing import make_tiny_base, make_tiny_lora


def slow_down(monkeypatch, engine, seconds: float) -> None:
    """Every forward takes `seconds` longer: decoding spans long enough to see who waits for whom."""
    forward = engine.forward
    monkeypatch.setattr(engine, "forward", lambda *a, **k: (time.sleep(seconds), forward(*a, **k))[1])

PROMPTS = ["Add: 12+30\nAnswer:", "Sort: 3 1 2\nAnswer:", "abc", "Count: a b c\nAnswer:"]
# six adapters of different ranks over different modules (the slots' tables must follow each swap)
SIX = [(21, 4, 8, ("q_proj", "v_proj")), (22, 2, 4, ("o_proj", "up_proj")), (23, 4, 8, ("q_proj", "k_proj", "down_proj")),
       (24, 8, 16, ("v_proj", "gate_proj")), (25, 2, 2, ("q_proj", "o_proj")), (26, 4, 4, ("up_proj", "down_proj"))]


@pytest.fixture(scope="module", autouse=True)
def own_artifacts(tmp_path_factory):
    """This module's artifacts only (the engine lists every artifact built over its pool)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_CACHE_ARTIFACTS", str(tmp_path_factory.mktemp("adapters-artifacts")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def six(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("six")
    return [make_tiny_lora(tiny_dir / "base", d / f"e{k}", seed=seed, r=r, alpha=alpha, target_modules=targets)
            for k, (seed, r, alpha, targets) in enumerate(SIX)]


@contextmanager
def running(app):
    url, server, thread = start_in_thread(app)
    assert server.started
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def post_all(url: str, pairs: list[tuple[str, str]], max_tokens: int) -> list[httpx.Response]:
    """Every (model, prompt) as its own /v1/completions request, all in flight at once."""
    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[c.post(f"{url}/v1/completions", json={
                "model": m, "prompt": p, "max_tokens": max_tokens}) for m, p in pairs])

    return asyncio.run(main())


def poster(url: str, out: dict[str, httpx.Response]):
    """post(model, n): a completion of "abc" for `model` (n tokens), its response kept in `out[model]`."""
    def post(model: str, n: int) -> None:
        out[model] = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "abc", "max_tokens": n},
                                timeout=60)
    return post


def ids(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]


def metric(url: str, name: str) -> float:
    lines = dict(line.rsplit(" ", 1) for line in httpx.get(f"{url}/metrics").text.splitlines()
                 if line and not line.startswith("#"))
    return float(lines[name])


def one_line_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "\n" not in err["message"] and len(err["message"]) < 400, err["message"]
    return err["message"]


def test_an_adapter_loaded_at_run_time_is_served_as_peft_serves_it(pool, tiny_dir):
    """lora_b targets modules lora_a does not (o_proj, up_proj): the engine wraps them when it is loaded."""
    pool.add(tiny_dir / "lora_a", "a")
    engine = MultiLoraModel.from_pool(pool)
    with running(create_app(engine, max_batch=16, window_s=0.02, allow_runtime_lora=True)) as url:
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(tiny_dir / "lora_b")},
                       timeout=60)
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'late' added successfully."
        models = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert models["late"]["kind"] == "lora" and list(models) == ["base", "a", "late"]
        pairs = [(m, p) for p in PROMPTS for m in ("late", "a", "base")]
        got = post_all(url, pairs, 8)
        assert all(x.status_code == 200 for x in got)
        want = peft_alone(pool.base, {"a": str(tiny_dir / "lora_a"), "late": str(tiny_dir / "lora_b")}, pairs, 8)
        assert [x.json()["choices"][0]["text"] for x in got] == want
        assert metric(url, "workbench_runtime_adapter_loads_total") == 1


def test_two_slots_for_six_adapters_each_output_exact_and_evictions_counted(pool, six):
    for k, folder in enumerate(six):
        pool.add(folder, f"e{k}")
    engine = MultiLoraModel.from_pool(pool, max_loaded_adapters=2)
    layer = next(iter(engine._layers.values()))
    assert len(layer.weights.a) == 2  # the kernel holds two adapters' factors, the other four wait on the CPU
    app = create_app(engine, max_batch=8, window_s=0.02)
    with running(app) as url:
        pairs = [(f"e{k % 6}", PROMPTS[k % 4]) for k in range(18)]
        got = post_all(url, pairs, 6)
        assert all(x.status_code == 200 for x in got), [x.text for x in got if x.status_code != 200]
        want = peft_alone(pool.base, {f"e{k}": str(f) for k, f in enumerate(six)}, pairs, 6)
        assert [x.json()["choices"][0]["text"] for x in got] == want
        assert ids(url) == ["base"] + [f"e{k}" for k in range(6)]  # all registered, two resident
        assert metric(url, "workbench_adapter_evictions_total") > 0
        assert metric(url, "workbench_adapter_loads_total") >= 6
        assert metric(url, "workbench_resident_adapters") == 2 and metric(url, "workbench_registered_adapters") == 6
        assert app.state.scheduler.stats["slot_waits"] > 0  # requests waited for a slot (each counted once), none failed
        assert len(layer.weights.a) == 2 and engine.in_use == {} and not engine.holds
        # a mix needs its adapters in slots at once: more than the cap is refused, not left waiting forever
        r = httpx.post(f"{url}/v1/completions", json={"model": "mix:e0=0.5,e1=0.3,e2=0.2", "prompt": "x"})
        assert "--max-loaded-adapters" in one_line_error(r, 400)
        r = httpx.post(f"{url}/v1/completions", json={"model": "mix:e4=0.5,e5=0.5", "prompt": "abc", "max_tokens": 4})
        assert r.status_code == 200


def test_unload_and_bad_loads_answer_one_line_errors_and_change_nothing(pool, tiny_dir, tmp_path):
    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    engine = MultiLoraModel.from_pool(pool)
    pickles = tmp_path / "pickles"  # PEFT's old format: adapter_model.bin (a pickle), never loaded
    pickles.mkdir()
    shutil.copy(tiny_dir / "lora_a" / "adapter_config.json", pickles)
    torch.save({"x": torch.zeros(1)}, pickles / "adapter_model.bin")
    other = make_tiny_base(tmp_path / "other-base", seed=9)  # same shapes, another base
    foreign = make_tiny_lora(other, tmp_path / "foreign", seed=3)
    with running(create_app(engine, max_batch=8, window_s=0.02, allow_runtime_lora=True)) as url:
        before = ids(url)
        load = f"{url}/v1/load_lora_adapter"
        assert "pickle" in one_line_error(httpx.post(load, json={"lora_name": "p", "lora_path": str(pickles)}), 400)
        assert "base" in one_line_error(httpx.post(load, json={"lora_name": "f", "lora_path": str(foreign)}), 400)
        assert "not a folder" in one_line_error(httpx.post(load, json={"lora_name": "m",
                                                                        "lora_path": str(tmp_path / "nowhere")}), 400)
        assert "already served" in one_line_error(httpx.post(load, json={"lora_name": "a",
                                                                          "lora_path": str(tiny_dir / "lora_b")}), 400)
        assert "invalid model name" in one_line_error(httpx.post(load, json={"lora_name": "mix:x",
                                                                              "lora_path": str(tiny_dir / "lora_b")}), 400)
        assert one_line_error(httpx.post(load, json={"lora_name": "x"}), 400)  # no lora_path
        assert ids(url) == before and engine.counters["runtime_loads"] == 0 and len(engine.adapters) == 2

        r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a"})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a' removed successfully."
        assert ids(url) == ["base", "b"]
        r = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2})
        assert r.json()["error"]["code"] == "model_not_found" and "unknown model 'a'" in one_line_error(r, 404)
        assert "cannot be found" in one_line_error(httpx.post(f"{url}/v1/unload_lora_adapter",
                                                              json={"lora_name": "a"}), 404)
        assert engine.adapters[0].factors == {} and 0 not in engine.slot_of  # its slot and memory are freed
        # the same name loads again (from another folder), and serves
        assert httpx.post(load, json={"lora_name": "a", "lora_path": str(tiny_dir / "lora_b")}).status_code == 200
        assert httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2}).status_code == 200
    # without --allow-runtime-lora both endpoints are refused (403), whatever the body
    with running(create_app(engine, max_batch=8)) as url:
        for path, body in (("load", {"lora_name": "c", "lora_path": str(tiny_dir / "lora_b")}),
                           ("unload", {"lora_name": "b"}), ("unload", {})):
            r = httpx.post(f"{url}/v1/{path}_lora_adapter", json=body)
            assert "--allow-runtime-lora" in one_line_error(r, 403)
        assert ids(url) == ["base", "b", "a"]
        openapi = httpx.get(f"{url}/openapi.json").json()
        schema = openapi["paths"]
        described = openapi["components"]["schemas"]["LoadLoraAdapterRequest"]["properties"]["lora_path"]["description"]
        assert "relative to the server's working directory" in described and "not expanded" in described
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            assert {"200", "400", "403"} <= set(schema[path]["post"]["responses"])
            assert "text/plain" in schema[path]["post"]["responses"]["200"]["content"]


def test_a_request_in_flight_finishes_with_the_adapter_it_was_accepted_for(pool, tiny_dir, monkeypatch):
    """Unloading an adapter that requests are using: they finish exactly; new requests for it get a 404."""
    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    engine = MultiLoraModel.from_pool(pool)
    prompt_ids = engine.tokenizer("abc", add_special_tokens=False)["input_ids"]
    alone = engine.tokenizer.decode(engine.generate([prompt_ids], [engine.resolve("b")], 40)[0],
                                    skip_special_tokens=True)
    forward = engine.forward  # 20 ms a step: the unload lands mid-stream
    monkeypatch.setattr(engine, "forward", lambda *a, **k: (time.sleep(0.02), forward(*a, **k))[1])
    with running(create_app(engine, max_batch=8, window_s=0.01, allow_runtime_lora=True)) as url:
        pieces, first = [], threading.Event()

        def stream():
            body = {"model": "b", "prompt": "abc", "max_tokens": 40, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        pieces.append(json.loads(line[6:])["choices"][0]["text"])
                        first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(30)
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={"model": "b", "prompt": "abc", "max_tokens": 2})
        one_line_error(r, 404)
        i = 1
        assert engine.adapters[i].factors  # still decoding with it
        t.join(60)
        assert "".join(pieces) == alone and len(alone) > 0
        deadline = time.monotonic() + 10
        while engine.adapters[i].factors and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.adapters[i].factors == {} and i not in engine.slot_of and not engine.retired


def _write(folder, name, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return folder / f"{name}.yaml"


def test_recipes_resolve_by_file_name_and_all(pool, tiny_dir, tmp_path):
    from workbench.serving.startup import resolve_recipes

    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    folder = tmp_path / "recipes"
    two = {"pool": "demo", "experts": ["a", "b"]}
    arrow = _write(folder, "arr", {"name": "arr", "method": "arrow", **two, "parameters": {"k": 1}})
    _write(folder, "talora", {"name": "talora", "method": "task_arithmetic", **two, "output": {"kind": "lora", "rank": 4}})
    _write(folder, "tamodel", {"name": "tamodel", "method": "task_arithmetic", **two})  # a full model: not in `all`
    _write(folder, "cmp", {"name": "cmp", "pool": "demo", "entries": ["base", "a"]})  # a comparison: not a recipe
    from workbench.pool import Pool

    other = Pool.create("other", base=str(tiny_dir / "base"))
    other.add(tiny_dir / "lora_a", "a")
    other.add(tiny_dir / "lora_b", "b")
    _write(folder, "elsewhere", {"name": "elsewhere", "method": "arrow", "pool": "other", "experts": ["a", "b"]})  # another pool's
    names = lambda rs: [r.recipe.name for r in rs]
    assert names(resolve_recipes(pool, ["all"], folder=folder)) == ["arr", "talora"]
    assert names(resolve_recipes(pool, ["tamodel,arr", str(arrow)], folder=folder)) == ["tamodel", "arr"]
    with pytest.raises(RecipeError) as e:
        resolve_recipes(pool, ["arrr"], folder=folder)
    msg = str(e.value)
    assert "unknown recipe 'arrr'" in msg and "did you mean 'arr'" in msg and "\n" not in msg
    with pytest.raises(RecipeError, match="is over pool 'other', this server serves pool 'demo'"):
        resolve_recipes(pool, ["elsewhere"], folder=folder)


def test_recipes_declared_at_start_are_built_then_served(pool, tiny_dir, tmp_path, arts):
    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    folder = tmp_path / "recipes"
    two = {"pool": "demo", "experts": ["a", "b"]}
    _write(folder, "arr", {"name": "arr", "method": "arrow", **two, "parameters": {"k": 1}})
    _write(folder, "talora", {"name": "talora", "method": "task_arithmetic", **two, "output": {"kind": "lora", "rank": 4}})
    plain = build_app("demo")  # before: the plain adapters only
    assert [m["id"] for m in plain.state.scheduler.engine.models()] == ["base", "a", "b"]
    lines: list[str] = []
    app = build_app("demo", recipes=["all"], recipes_folder=folder, log=lines.append)
    assert any("[1/2] arr (arrow): building" in x for x in lines) and any("talora: built in" in x for x in lines)
    assert len(list(arts.glob("*/artifact.json"))) == 2  # built into the (temporary) artifacts cache
    with running(app) as url:
        kinds = {m["id"]: m["kind"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert kinds == {"base": "base", "a": "lora", "b": "lora", "arr": "routed_lora", "talora": "merged_lora"}
        for model in ("arr", "talora"):
            r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "abc", "max_tokens": 3}, timeout=60)
            assert r.status_code == 200
    lines.clear()
    declared = build_app("demo", recipes=["arr"], recipes_folder=folder, log=lines.append)
    assert lines[1] == "[1/1] arr (arrow): cached"
    # --recipes declares the served set: the plain adapters and arr, not talora (cached too); without it, the cache
    assert declared.state.scheduler.engine.model_names() == ["base", "a", "b", "arr"]
    assert build_app("demo", log=quiet).state.scheduler.engine.model_names() == ["base", "a", "b", "talora", "arr"]
    # a declared composition that cannot be served (arr needs both adapters at once, one slot) fails the start
    with pytest.raises(WorkbenchError) as e:
        build_app("demo", recipes=["arr"], recipes_folder=folder, max_loaded_adapters=1, log=quiet)
    assert "'arr' needs 2 adapters loaded at once" in one_line(e)


def test_schemathesis_on_the_admin_endpoints_when_enabled(pool, tiny_dir):
    """Property-based requests to the two admin endpoints from /openapi.json, enabled: every answer documented
    (status, content type, body), no 5xx, invalid bodies refused."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )
    from schemathesis.generation import GenerationMode

    pool.add(tiny_dir / "lora_a", "a")
    engine = MultiLoraModel.from_pool(pool)
    with running(create_app(engine, max_batch=4, allow_runtime_lora=True)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        conformance = [not_a_server_error, status_code_conformance, content_type_conformance,
                       response_schema_conformance]
        ran = 0
        for result in schema.get_all_operations():
            op = result.ok()
            if "lora_adapter" not in op.path:
                continue
            for mode, checks, n in ((GenerationMode.POSITIVE, conformance, 15),
                                    (GenerationMode.NEGATIVE, [not_a_server_error, negative_data_rejection], 10)):
                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                def check(case):
                    case.call_and_validate(base_url=url, checks=checks, timeout=60)  # noqa: B023 (called at once)

                check()
                ran += 1
        assert ran == 4


def test_a_request_waiting_for_a_slot_finishes_with_an_adapter_unloaded_meanwhile(pool, tiny_dir, monkeypatch):
    """One slot: a request for b waits (a decodes in the slot) while b is unloaded; it was accepted, so it is held:
    it still decodes with b, exactly as alone."""
    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    engine = MultiLoraModel.from_pool(pool, max_loaded_adapters=1)
    prompt_ids = engine.tokenizer("abc", add_special_tokens=False)["input_ids"]
    alone = engine.tokenizer.decode(engine.generate([prompt_ids], [engine.resolve("b")], 6)[0], skip_special_tokens=True)
    forward = engine.forward
    monkeypatch.setattr(engine, "forward", lambda *a, **k: (time.sleep(0.02), forward(*a, **k))[1])
    app = create_app(engine, max_batch=8, window_s=0.01, allow_runtime_lora=True)
    with running(app) as url:
        out: dict[str, httpx.Response] = {}
        post = poster(url, out)

        long = threading.Thread(target=post, args=("a", 40))
        long.start()
        deadline = time.monotonic() + 30
        while not app.state.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = threading.Thread(target=post, args=("b", 6))
        waiting.start()
        while app.state.scheduler.stats["slot_waits"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.scheduler.stats["slot_waits"] == 1 and "b" not in out  # b waits for the slot
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 200
        long.join(60)
        waiting.join(60)
        assert out["a"].status_code == 200 and out["b"].status_code == 200
        assert out["b"].json()["choices"][0]["text"] == alone
        assert engine.adapters[1].factors == {} and not engine.holds and not engine.in_use


# -- issue 25's review: an unload racing a request, head-of-line blocking, rebinding, malformed folders, composition
#    unloads and bounds, declared recipes, freed memory, exact counters

def test_an_unload_while_the_request_is_tokenised_answers_404_never_base_text(pool, tiny_dir, monkeypatch):
    """The request resolved 'b', then 'b' is unloaded while its prompt is tokenised (deterministically: inside the
    tokenising step): it was not accepted yet, so it is a 404 (never the base model's text under b's name), and no
    empty adapter is left in a slot."""
    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    engine = MultiLoraModel.from_pool(pool)
    chat_ids = engine.chat_ids
    monkeypatch.setattr(engine, "chat_ids", lambda messages: (engine.unload_adapter("b"), chat_ids(messages))[1])
    with running(create_app(engine, max_batch=8, window_s=0.01, allow_runtime_lora=True)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "b", "max_tokens": 6,
                                                           "messages": [{"role": "user", "content": "abc"}]}, timeout=60)
        assert "'b' was unloaded" in one_line_error(r, 404) and r.json()["error"]["code"] == "model_not_found"
        assert engine.adapters[1].factors == {} and 1 not in engine.slot_of and not engine.retired
        assert not engine.holds and not engine.in_use and engine.resident() == ["a"]
        assert metric(url, "workbench_resident_adapters") == 1 and metric(url, "workbench_registered_adapters") == 1


def test_requests_for_resident_adapters_and_base_pass_one_waiting_for_a_slot(pool, six, monkeypatch):
    """Two slots, both decoding long requests (e0, e1): a request for e2 waits for a slot; short requests for the
    base and for resident e0 are admitted past it and finish while the long ones still run; a request queued
    behind it whose client gives up leaves the queue and its hold at once; the waiting one then gets the first
    slot that frees. Each output exact; slot waits, loads and evictions exactly as the order implies."""
    for k, folder in enumerate(six[:4]):
        pool.add(folder, f"e{k}")
    engine = MultiLoraModel.from_pool(pool, max_loaded_adapters=2)
    prompt = engine.tokenizer("abc", add_special_tokens=False)["input_ids"]
    want = {m: engine.tokenizer.decode(engine.generate([prompt], [engine.resolve(m)], 4)[0], skip_special_tokens=True)
            for m in ("base", "e0", "e2", "e1", "e0")}  # the last two: e0 and e1 back in the slots
    assert sorted(engine.resident()) == ["e0", "e1"]
    loads, evictions = engine.counters["loads"], engine.counters["evictions"]
    app = create_app(engine, max_batch=8, window_s=0.01)
    sched = app.state.scheduler
    with running(app) as url:
        slow_down(monkeypatch, engine, 0.03)  # 90 and 150 steps: several seconds
        out: dict[str, tuple[float, httpx.Response]] = {}

        def post(tag: str, model: str, n: int, timeout: float = 120):
            try:
                r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "abc", "max_tokens": n,
                                                              "ignore_eos": n > 4}, timeout=timeout)
            except httpx.TimeoutException:
                return
            out[tag] = (time.monotonic(), r)

        threads = [threading.Thread(target=post, args=(f"long-{m}", m, n)) for m, n in (("e0", 90), ("e1", 150))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(sched.running) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        threads.append(threading.Thread(target=post, args=("wait-e2", "e2", 4)))
        threads[-1].start()
        while sched.stats["slot_waits"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.stats["slot_waits"] == 1
        # behind it: a request for e3 (it needs a slot too) whose client gives up
        gone = threading.Thread(target=post, args=("gone-e3", "e3", 4, 0.5))
        gone.start()
        for tag, model in (("short-base", "base"), ("short-e0", "e0")):
            threads.append(threading.Thread(target=post, args=(tag, model, 4)))
            threads[-1].start()
        gone.join(30)
        e3 = engine.ids["e3"]
        while (engine.holds[e3] or "short-e0" not in out or "short-base" not in out) and time.monotonic() < deadline:
            time.sleep(0.01)
        still_long = [t for t in ("long-e0", "long-e1", "wait-e2") if t not in out]
        assert still_long == ["long-e0", "long-e1", "wait-e2"], still_long  # both short ones finished first
        assert engine.holds[e3] == 0 and all(j.assignment != engine.resolve("e3") for j in sched.waiting)
        for t in threads:
            t.join(120)
    assert [out[t][1].status_code for t in ("short-base", "short-e0", "wait-e2", "long-e0", "long-e1")] == [200] * 5
    assert {m: out[t][1].json()["choices"][0]["text"] for m, t in (("base", "short-base"), ("e0", "short-e0"),
                                                                  ("e2", "wait-e2"))} == {m: want[m] for m in
                                                                                          ("base", "e0", "e2")}
    assert out["long-e0"][0] < out["wait-e2"][0] < out["long-e1"][0]  # it took the first slot that freed (e0's)
    assert "gone-e3" not in out and sched.stats["cancelled"] == 1
    assert sched.stats["slot_waits"] == 2  # e2, and e3 behind it: each request counted once
    assert engine.counters["evictions"] == evictions + 1 and engine.counters["loads"] == loads + 1


def test_evictions_and_loads_are_counted_exactly_in_lru_order(pool, six):
    """Two slots, requests one at a time over e0 e1 e2 e0 e3: LRU evicts e0 (for e2), e1 (for e0), e2 (for e3).
    Loads count the adapters resident from the start too."""
    for k, folder in enumerate(six[:4]):
        pool.add(folder, f"e{k}")
    engine = MultiLoraModel.from_pool(pool, max_loaded_adapters=2)
    app = create_app(engine, max_batch=4, window_s=0.01)
    with running(app) as url:
        assert metric(url, "workbench_adapter_loads_total") == 2  # e0 and e1, in their slots from the start
        texts = []
        for m in ("e0", "e1", "e2", "e0", "e3"):
            r = httpx.post(f"{url}/v1/completions", json={"model": m, "prompt": "abc", "max_tokens": 4}, timeout=60)
            assert r.status_code == 200
            texts.append(r.json()["choices"][0]["text"])
        # each output its adapter's, e0 back in another slot included (stale pair metadata would give e2's text)
        assert texts == peft_alone(pool.base, {f"e{k}": str(f) for k, f in enumerate(six[:4])},
                                   [(m, "abc") for m in ("e0", "e1", "e2", "e0", "e3")], 4)
        assert metric(url, "workbench_adapter_evictions_total") == 3
        assert metric(url, "workbench_adapter_loads_total") == 5
        assert app.state.scheduler.stats["slot_waits"] == 0 and engine.resident() == ["e0", "e3"]


@pytest.fixture(scope="module")
def routed_pool(tmp_path_factory, tiny_dir):
    """A pool of two LoRA experts with an Arrow and a small Twin artifact built over it (not served at start)."""
    from conftest import suite_data

    from workbench.pool import Pool
    from workbench.recipes import build, parse_recipe

    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_POOLS", str(tmp_path_factory.mktemp("routed25") / "adapters"))
    pool = Pool.create("routed25", base=str(tiny_dir / "base"))
    pool.add(tiny_dir / "lora_a", "a", tags={"task": "addition"}, data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "b", tags={"task": "sorting"}, data=suite_data("sorting"))
    recipes = {"arr": ("arrow", {"k": 2}),
               "tw": ("twin", {"rank": 2, "router_examples": 32, "router_epochs": 2, "temperature": 1.0})}
    arts = {name: build(parse_recipe({"name": name, "method": method, "pool": "routed25", "experts": ["a", "b"],
                                      "parameters": params}), log=lambda *a: None)
            for name, (method, params) in recipes.items()}
    yield pool, arts
    mp.undo()


def test_a_routed_composition_loads_only_over_the_adapters_its_router_was_built_over(routed_pool, tiny_dir, tmp_path):
    """'b' unloaded, another adapter loaded as 'b': Arrow's router was built over the pool's b, so loading the Arrow
    artifact is refused (one line) rather than routing over the wrong adapter; with b's own files back, it loads."""
    pool, arts = routed_pool
    other = make_tiny_lora(tiny_dir / "base", tmp_path / "other", seed=11, r=2, alpha=4,
                           target_modules=("q_proj", "o_proj", "up_proj"))
    engine = MultiLoraModel.from_pool(pool, include_artifacts=False)
    with running(create_app(engine, max_batch=8, allow_runtime_lora=True)) as url:
        load, unload = f"{url}/v1/load_lora_adapter", f"{url}/v1/unload_lora_adapter"
        assert httpx.post(unload, json={"lora_name": "b"}).status_code == 200
        assert httpx.post(load, json={"lora_name": "b", "lora_path": str(other)}, timeout=60).status_code == 200
        r = httpx.post(load, json={"lora_name": "arr", "lora_path": str(arts["arr"])}, timeout=60)
        assert "not the ones its router was built over" in one_line_error(r, 400) and "arr" not in ids(url)
        assert httpx.post(unload, json={"lora_name": "b"}).status_code == 200
        assert httpx.post(load, json={"lora_name": "b", "lora_path": str(tiny_dir / "lora_b")},
                          timeout=60).status_code == 200
        assert httpx.post(load, json={"lora_name": "arr", "lora_path": str(arts["arr"])}, timeout=60).status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={"model": "arr", "prompt": "abc", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200


def test_saved_compositions_unload_at_run_time_within_a_bound_on_pinned_parts(routed_pool, monkeypatch):
    """Twin pins 3 parts (shared + 2 exclusive): with max_composition_parts=3 a second copy is a 400 until the first
    is unloaded. Unloading a composition finishes its stream in flight exactly, then frees its parts; an adapter it
    routes over is refused until it is unloaded; `base` cannot be unloaded."""
    pool, arts = routed_pool
    engine = MultiLoraModel.from_pool(pool, include_artifacts=False, max_composition_parts=3)
    with running(create_app(engine, max_batch=8, window_s=0.01, allow_runtime_lora=True)) as url:
        load, unload = f"{url}/v1/load_lora_adapter", f"{url}/v1/unload_lora_adapter"
        for name in ("arr", "tw"):
            assert httpx.post(load, json={"lora_name": name, "lora_path": str(arts[name])}, timeout=60).status_code == 200
        assert "max_composition_parts" in one_line_error(
            httpx.post(load, json={"lora_name": "tw2", "lora_path": str(arts["tw"])}, timeout=60), 400)
        prompt = engine.tokenizer("abc", add_special_tokens=False)["input_ids"]
        alone = engine.tokenizer.decode(engine.generate([prompt], [engine.resolve("tw")], 30)[0],
                                        skip_special_tokens=True)
        parts = list(engine._parts["tw"])
        slow_down(monkeypatch, engine, 0.02)
        pieces, first = [], threading.Event()

        def stream():
            body = {"model": "tw", "prompt": "abc", "max_tokens": 30, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        pieces.append(json.loads(line[6:])["choices"][0]["text"])
                        first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(30)
        assert httpx.post(unload, json={"lora_name": "tw"}).status_code == 200
        assert "tw" not in ids(url)
        r = httpx.post(f"{url}/v1/completions", json={"model": "tw", "prompt": "abc", "max_tokens": 2})
        assert r.json()["error"]["code"] == "model_not_found" and one_line_error(r, 404)
        assert "still finishes" in one_line_error(
            httpx.post(load, json={"lora_name": "tw", "lora_path": str(arts["tw"])}, timeout=60), 400)
        t.join(60)
        assert "".join(pieces) == alone and alone
        deadline = time.monotonic() + 10
        while "tw" in engine.twins and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "tw" not in engine.twins and not engine.pinned and not engine.composition_holds
        assert all(engine.adapters[i].factors == {} and i not in engine.slot_of for i in parts)
        assert httpx.post(load, json={"lora_name": "tw2", "lora_path": str(arts["tw"])}, timeout=60).status_code == 200
        assert "routed over by ['arr']" in one_line_error(httpx.post(unload, json={"lora_name": "b"}), 400)
        assert httpx.post(unload, json={"lora_name": "arr"}).status_code == 200
        assert httpx.post(unload, json={"lora_name": "b"}).status_code == 200
        assert "cannot be unloaded" in one_line_error(httpx.post(unload, json={"lora_name": "base"}), 400)
        assert ids(url) == ["base", "a", "tw2"]


def _lora_variant(src, dst, config=None, raw: bytes | None = None):
    shutil.copytree(src, dst)
    if raw is not None:
        (dst / "adapter_config.json").write_bytes(raw)
    else:
        cfg = json.loads((src / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def test_malformed_folders_are_one_line_400s_and_pool_add_errors(pool, tiny_dir, tmp_path, caplog):
    from workbench.errors import WorkbenchError

    pool.add(tiny_dir / "lora_a", "a")
    src = tiny_dir / "lora_b"
    bad_loras = [_lora_variant(src, tmp_path / "list", raw=b"[]"), _lora_variant(src, tmp_path / "null", raw=b"null"),
                 _lora_variant(src, tmp_path / "utf8", raw=b'{"peft_type": "LORA", "r": 2, "x": "\xff\xfe"}'),
                 _lora_variant(src, tmp_path / "alphastr", {"alpha_pattern": {"q_proj": "x"}}),
                 _lora_variant(src, tmp_path / "alphanan", {"lora_alpha": "nan"}),
                 _lora_variant(src, tmp_path / "r0", {"r": 0}),
                 _lora_variant(src, tmp_path / "regex", {"rank_pattern": {"(": 2}}),
                 _lora_variant(src, tmp_path / "targets", {"target_modules": 5})]
    bad_arts = []
    for name, raw in (("artlist", b"[]"), ("artutf8", b'{"type": "routed_lora", "name": "\xff"}'),
                      ("artexp", b'{"type": "routed_lora", "experts": 5, "pool_fingerprint": null}'),
                      ("artexp2", b'{"type": "routed_lora", "experts": {"a": 1}}'), ("arttype", b'{"type": ["x"]}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "artifact.json").write_bytes(raw)
        bad_arts.append(tmp_path / name)
    engine = MultiLoraModel.from_pool(pool)
    with running(create_app(engine, max_batch=4, allow_runtime_lora=True)) as url:
        for k, folder in enumerate(bad_loras + bad_arts):
            r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": f"x{k}", "lora_path": str(folder)},
                           timeout=60)
            one_line_error(r, 400)
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "h", "lora_path": "~/x"})
        assert "not expanded" in one_line_error(r, 400)
        assert ids(url) == ["base", "a"]
        # an internal error is a 500 logged once with its traceback (not again by Starlette and uvicorn)
        monkey = pytest.MonkeyPatch()
        monkey.setattr(engine, "load_adapter", lambda *a: 1 / 0)
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append
        loggers = [logging.getLogger(n) for n in ("uvicorn.error", "workbench.serving")]
        for lg in loggers:
            lg.addHandler(handler)
        try:
            r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "z", "lora_path": str(src)})
        finally:
            for lg in loggers:
                lg.removeHandler(handler)
            monkey.undo()
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert len([x for x in records if x.exc_info]) == 1, [x.getMessage() for x in records]
    for folder in bad_loras:  # `workbench pool add` refuses them the same way
        with pytest.raises(WorkbenchError) as e:
            pool.add(folder, "bad")
        assert "\n" not in str(e.value), str(e.value)
    assert pool.names() == ["a"]


def test_bounded_registry_and_an_unloaded_adapter_releases_its_memory(pool, tiny_dir, six):
    import gc
    import weakref

    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    engine = MultiLoraModel.from_pool(pool, max_registered_adapters=3)
    with running(create_app(engine, max_batch=4, allow_runtime_lora=True)) as url:
        load = f"{url}/v1/load_lora_adapter"
        assert httpx.post(load, json={"lora_name": "c", "lora_path": str(six[0])}, timeout=60).status_code == 200
        assert "max_registered_adapters" in one_line_error(
            httpx.post(load, json={"lora_name": "d", "lora_path": str(six[1])}, timeout=60), 400)
        i, slot = engine.ids["a"], engine.slot_of[engine.ids["a"]]
        tensor = next(iter(engine.adapters[i].factors))
        layer = engine._layers[tensor]
        refs = [weakref.ref(engine.adapters[i].factors[tensor][0]), weakref.ref(layer.weights.a[slot]),
                weakref.ref(layer.weights.b[slot])]
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 200
        gc.collect()
        assert [r() for r in refs] == [None, None, None]  # no slot still references its factors
        assert all(x.weights.a[slot].numel() == 0 and x.weights.b[slot].numel() == 0 for x in engine._layers.values())
        assert httpx.post(load, json={"lora_name": "d", "lora_path": str(six[1])}, timeout=60).status_code == 200
        assert ids(url) == ["base", "b", "c", "d"]


# -- issue 27: paged adapters (a pool larger than memory): read ahead of their requests, staged in host memory

# twelve adapters of ranks 2/4/8 over varied modules
TWELVE = [(40 + k, (2, 4, 8)[k % 3], 8, [("q_proj", "v_proj"), ("o_proj", "up_proj"), ("k_proj", "down_proj"),
                                         ("v_proj", "gate_proj")][k % 4]) for k in range(12)]


@pytest.fixture(scope="module")
def twelve(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("twelve")
    return [make_tiny_lora(tiny_dir / "base", d / f"p{k}", seed=seed, r=r, alpha=alpha, target_modules=targets)
            for k, (seed, r, alpha, targets) in enumerate(TWELVE)]


def test_three_slots_for_twelve_paged_adapters_48_requests_exact_each_file_read_once(pool, twelve):
    """The acceptance of issue 27: 3 resident slots, 12 adapters requested in random order by 48 concurrent
    requests: every output equals PEFT alone; only the 3 adapters of the first slots are read at start, each other
    is read from disk once (by the prefetch thread, while its requests queue); every load after the start evicts
    exactly one adapter (the slots stay full)."""
    import random

    for k, folder in enumerate(twelve):
        pool.add(folder, f"p{k}")
    engine = MultiLoraModel.from_pool(pool, max_loaded_adapters=3)
    assert engine.counters["host_reads"] == 3 and engine.counters["loads"] == 3
    assert [bool(engine.adapters[engine.ids[f"p{k}"]].factors) for k in range(12)] == [True] * 3 + [False] * 9
    app = create_app(engine, max_batch=8, window_s=0.02)
    rng = random.Random(27)
    pairs = [(f"p{k % 12}", PROMPTS[k % 4]) for k in range(48)]
    rng.shuffle(pairs)
    with running(app) as url:
        got = post_all(url, pairs, 5)
        assert all(x.status_code == 200 for x in got), [x.text for x in got if x.status_code != 200]
        want = peft_alone(pool.base, {f"p{k}": str(f) for k, f in enumerate(twelve)}, pairs, 5)
        assert [x.json()["choices"][0]["text"] for x in got] == want
        loads, evictions = metric(url, "workbench_adapter_loads_total"), metric(url, "workbench_adapter_evictions_total")
        assert loads >= 12 and evictions == loads - 3
        assert metric(url, "workbench_adapter_host_reads_total") == 12  # no host cap: each file read once
        assert metric(url, "workbench_adapter_staged_drops_total") == 0
        assert metric(url, "workbench_resident_adapters") == 3
        assert metric(url, "workbench_staged_adapters") == 9  # read and not in a slot: all kept (no --max-host-adapters)
        assert engine.in_use == {} and not engine.holds


def test_a_host_cap_drops_the_least_recently_used_read_adapters_and_rereads_them(pool, twelve):
    """One slot, at most one staged adapter: requests one at a time for p1 p0 p2 p1. p1 is read (p0, evicted, is
    staged); p0 comes from host memory (no read; p1 staged); p2 is read and p1, least recently used, dropped; p1 is
    read again. Every output exact."""
    for k, folder in enumerate(twelve[:3]):
        pool.add(folder, f"p{k}")
    engine = MultiLoraModel.from_pool(pool, max_loaded_adapters=1, max_host_adapters=1)
    app = create_app(engine, max_batch=4, window_s=0.01)
    order = ["p1", "p0", "p2", "p1"]
    with running(app) as url:
        texts = []
        for m in order:
            r = httpx.post(f"{url}/v1/completions", json={"model": m, "prompt": "abc", "max_tokens": 4}, timeout=60)
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
        assert texts == peft_alone(pool.base, {f"p{k}": str(f) for k, f in enumerate(twelve[:3])},
                                   [(m, "abc") for m in order], 4)
        assert metric(url, "workbench_adapter_host_reads_total") == 1 + 3  # p0 at start; p1, p2, p1 again
        assert metric(url, "workbench_adapter_staged_drops_total") == 2  # p1 (for p2), then p0 (for p1)
        assert metric(url, "workbench_staged_adapters") == 1 and engine.resident() == ["p1"]
        assert metric(url, "workbench_adapter_evictions_total") == 4


def test_an_unreadable_paged_adapter_fails_only_its_requests_and_is_read_again_once_fixed(pool, twelve, caplog):
    """p2's file is moved away after the start: its request is a one-line 500 (logged with the traceback); the
    requests beside it finish exactly; once the file is back, p2 is read and served (a failed read is not sticky)."""
    for k, folder in enumerate(twelve[:3]):
        pool.add(folder, f"p{k}")
    engine = MultiLoraModel.from_pool(pool, max_loaded_adapters=1)
    weights = pool.expert("p2").path / "adapter_model.safetensors"
    app = create_app(engine, max_batch=8, window_s=0.05)
    with running(app) as url, caplog.at_level(logging.ERROR):
        weights.rename(weights.with_suffix(".away"))
        pairs = [("p0", "abc"), ("p2", "abc"), ("p1", "Sort: 3 1 2\nAnswer:"), ("base", "abc")]
        got = post_all(url, pairs, 4)
        assert "could not be read" in one_line_error(got[1], 500)
        assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)
        ok = [0, 2, 3]
        assert all(got[i].status_code == 200 for i in ok)
        want = peft_alone(pool.base, {f"p{k}": str(f) for k, f in enumerate(twelve[:3])}, [pairs[i] for i in ok], 4)
        assert [got[i].json()["choices"][0]["text"] for i in ok] == want
        weights.with_suffix(".away").rename(weights)
        r = httpx.post(f"{url}/v1/completions", json={"model": "p2", "prompt": "abc", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == peft_alone(pool.base, {"p2": str(twelve[2])}, [("p2", "abc")], 4)[0]
        assert engine.in_use == {} and not engine.holds


def test_queued_requests_adapters_are_read_while_they_wait_and_kept_over_the_host_cap(pool, twelve, monkeypatch):
    """One slot, no staged adapter allowed beyond it (max_host_adapters=0): while a long p0 request decodes, requests
    for p1 and p2 queue; both files are read during that wait (prefetch at submit, not at admission: p2 is behind
    p1) and stay in host memory while their requests need them (the cap never drops an adapter a queued request
    needs, else it would be read forever); both then finish exactly, and nothing stays staged."""
    for k, folder in enumerate(twelve[:3]):
        pool.add(folder, f"p{k}")
    engine = MultiLoraModel.from_pool(pool, max_loaded_adapters=1, max_host_adapters=0)
    slow_down(monkeypatch, engine, 0.03)
    app = create_app(engine, max_batch=8, window_s=0.01)
    with running(app) as url:
        out: dict[str, httpx.Response] = {}
        post = poster(url, out)

        threads = [threading.Thread(target=post, args=("p0", 60))]
        threads[0].start()
        deadline = time.monotonic() + 30
        while not app.state.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        for m in ("p1", "p2"):
            threads.append(threading.Thread(target=post, args=(m, 4)))
            threads[-1].start()
        p1, p2 = (engine.adapters[engine.ids[m]] for m in ("p1", "p2"))
        while not (p1.factors and p2.factors) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert p1.factors and p2.factors and "p0" not in out  # read while p0 still decodes
        for t in threads:
            t.join(60)
        want = peft_alone(pool.base, {"p0": str(twelve[0])}, [("p0", "abc")], 60)
        assert out["p0"].json()["choices"][0]["text"] == want[0]
        short = peft_alone(pool.base, {f"p{k}": str(f) for k, f in enumerate(twelve[:3])},
                           [("p1", "abc"), ("p2", "abc")], 4)
        assert [out[m].json()["choices"][0]["text"] for m in ("p1", "p2")] == short
        assert engine.counters["host_reads"] == 3 and metric(url, "workbench_staged_adapters") == 0


def test_a_failure_loading_one_requests_adapter_fails_that_request_only(pool, six, monkeypatch):
    """Two slots: long requests on e0 and base decode; writing e2 into a slot raises (once, then always): only the
    e2 request fails, with a one-line 500; the long ones finish exactly; once the write works again e2 is served.
    The other requests' adapters stay evictable (no acquire counted twice)."""
    for k, folder in enumerate(six[:3]):
        pool.add(folder, f"e{k}")
    engine = MultiLoraModel.from_pool(pool, max_loaded_adapters=2)
    slow_down(monkeypatch, engine, 0.02)
    write = engine._write_slot
    broken = {"on": True}

    def flaky(slot, i):
        if broken["on"] and engine.adapters[i].name == "e2":
            raise RuntimeError("out of memory (planted)")
        return write(slot, i)

    monkeypatch.setattr(engine, "_write_slot", flaky)
    app = create_app(engine, max_batch=8, window_s=0.01)
    with running(app) as url:
        out: dict[str, httpx.Response] = {}
        post = poster(url, out)

        longs = [threading.Thread(target=post, args=(m, 30)) for m in ("e0", "base")]
        for t in longs:
            t.start()
        deadline = time.monotonic() + 30
        while len(app.state.scheduler.running) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        post("e2", 4)
        assert "could not be loaded" in one_line_error(out["e2"], 500)
        for t in longs:
            t.join(60)
        want = peft_alone(pool.base, {"e0": str(six[0])}, [("e0", "abc"), ("base", "abc")], 30)
        assert [out[m].json()["choices"][0]["text"] for m in ("e0", "base")] == want
        broken["on"] = False
        post("e2", 4)
        assert out["e2"].status_code == 200
        assert out["e2"].json()["choices"][0]["text"] == peft_alone(pool.base, {"e2": str(six[2])}, [("e2", "abc")], 4)[0]
        assert engine.in_use == {} and not engine.holds


def test_rows_carry_their_pairs_through_joins_and_leaves_and_decode_steps_reuse_their_layout(pool, six, monkeypatch):
    """The multi-LoRA metadata follows the running rows incrementally: each row's pairs are built once, when it is
    prefilled; leaving rows are sliced out and joining rows concatenated in (never rebuilt from the assignments);
    decode steps over the same rows reuse one slot layout. Every step's logits equal each row decoded alone."""
    import workbench.serving.engine as eng_mod

    for k, folder in enumerate(six):
        pool.add(folder, f"e{k}")
    engine = MultiLoraModel.from_pool(pool, max_loaded_adapters=4)
    built, metas = [], []
    row_pairs, make_meta = engine.row_pairs, eng_mod.make_meta
    monkeypatch.setattr(engine, "row_pairs", lambda a: (built.append(len(a)), row_pairs(a))[1])
    monkeypatch.setattr(eng_mod, "make_meta", lambda *a, **k: (metas.append(a[0].shape[0]), make_meta(*a, **k))[1])
    tok = engine.tokenizer
    specs = ["e0", "mix:e1=0.7,e2=-0.4", "base", "e3", "mix:e0=0.5,e1=0.5,e3=0.25", "e2"]
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS + PROMPTS[:2]]
    for s in specs:
        assert engine.acquire(engine.resolve(s))

    tokens_checked = []

    def check(state, rows, logits):
        """state's pairs are its rows' own; each row's logits equal that row prefilled alone with its history."""
        got = [{int(e): round(float(w), 6) for e, w in zip(i, ws) if e >= 0 and w != 0}
               for i, ws in zip(state.pairs.idx, state.pairs.w)]
        assert got == [{e: round(w, 6) for e, w in engine.resolve(specs[r])} for r in rows]
        # as wide as the rows need (a mix that left takes its columns along), padding exactly (-1, 0)
        assert state.pairs.idx.shape[1] == max(len(engine.resolve(specs[r])) for r in rows)
        pad = state.pairs.idx < 0
        assert (state.pairs.idx[pad] == -1).all() and (state.pairs.w[pad] == 0).all()
        tokens_checked.append(len(rows))
        for j, r in enumerate(rows):
            alone, _ = engine.prefill([prompts[r] + tokens[r]], [engine.resolve(specs[r])])
            torch.testing.assert_close(logits[j], alone[0], rtol=1e-4, atol=1e-4)

    def step(state, rows):  # -> layouts made by the decode step
        metas.clear()
        logits = engine.decode(state, [tokens[r][-1] for r in rows])
        made = len(metas)
        check(state, rows, logits)
        for j, r in enumerate(rows):
            tokens[r].append(int(logits[j].argmax()))
        return made

    first, s1 = engine.prefill(prompts[:3], [engine.resolve(s) for s in specs[:3]])
    second, s2 = engine.prefill(prompts[3:5], [engine.resolve(s) for s in specs[3:5]])
    tokens = {r: [int(t)] for r, t in enumerate(torch.cat([first, second]).argmax(-1))}
    state, rows = engine.concat([s1, s2]), list(range(5))
    for round_ in range(3):  # rows leave and join between steps: one layout per set of rows
        assert step(state, rows) == 1
        assert step(state, rows) == 0  # the same rows: the first step's layout again
        keep = [j for j in range(len(rows)) if (j + round_) % 3][::-1]  # a third leave, the rest reversed
        state, rows = engine.select(state, keep), [rows[j] for j in keep]
        if round_ == 0:  # row 5 joins
            logits, s3 = engine.prefill([prompts[5]], [engine.resolve(specs[5])])
            tokens[5] = [int(logits[0].argmax())]
            state, rows = engine.concat([state, s3]), rows + [5]
    state, rows = engine.select(state, [j for j, r in enumerate(rows) if r != 4]), [r for r in rows if r != 4]
    assert step(state, rows) == 1  # the three-adapter mix left: two columns fewer
    # rows' pairs built at their prefills only (check()'s own prefills of one row each aside): 3 + 2, then 1
    assert built[:2] == [3, 2] and set(built[2:]) == {1} and len(built) == 2 + 1 + sum(tokens_checked)


def test_a_cached_layout_expires_when_a_running_rows_adapter_moves_slot(pool, six):
    for k, folder in enumerate(six):
        pool.add(folder, f"e{k}")
    engine = MultiLoraModel.from_pool(pool, max_loaded_adapters=2)
    e0, e2, e3 = (engine.resolve(f"e{k}") for k in (0, 2, 3))
    ids = engine.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    assert engine.acquire(e0)
    logits, state = engine.prefill([ids], [e0])
    history = [int(logits[0].argmax())]
    history.append(int(engine.decode(state, history[-1:])[0].argmax()))  # the layout of e0's slot is cached
    slot = engine.slot_of[e0[0][0]]
    engine.release(e0)  # (outside the scheduler a caller may let the adapter of a running row move)
    assert engine.acquire(e2, read=True) and engine.acquire(e3, read=True)  # e0 evicted
    engine.release(e2)
    assert engine.acquire(e0, read=True)  # back, into e2's slot
    assert engine.slot_of[e0[0][0]] != slot
    got = engine.decode(state, history[-1:])[0]
    alone, _ = engine.prefill([ids + history], [e0])
    torch.testing.assert_close(got, alone[0], rtol=1e-4, atol=1e-4)
