"""Adapters loaded and unloaded at run time, an LRU cap on the adapters in kernel slots, and compositions declared at
start (`--recipes`), on a real uvicorn over loopback with real PEFT adapters."""

import asyncio
import json
import shutil
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch
import yaml

from workbench.errors import RecipeError
from workbench.serving.api import build_app, create_app, start_in_thread
from workbench.serving.engine import MultiLoraModel, peft_alone
from workbench.testing import make_tiny_base, make_tiny_lora

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
        assert app.state.scheduler.stats["slot_waits"] > 0  # requests waited for a slot, none failed
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
        schema = httpx.get(f"{url}/openapi.json").json()["paths"]
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
    build_app("demo", recipes=["arr"], recipes_folder=folder, log=lines.append)
    assert lines[1] == "[1/1] arr (arrow): cached"


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

        def post(model: str, n: int):
            out[model] = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "abc", "max_tokens": n},
                                    timeout=60)

        long = threading.Thread(target=post, args=("a", 40))
        long.start()
        deadline = time.monotonic() + 30
        while not app.state.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = threading.Thread(target=post, args=("b", 6))
        waiting.start()
        while app.state.scheduler.stats["slot_waits"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.scheduler.stats["slot_waits"] > 0 and "b" not in out  # b waits for the slot
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 200
        long.join(60)
        waiting.join(60)
        assert out["a"].status_code == 200 and out["b"].status_code == 200
        assert out["b"].json()["choices"][0]["text"] == alone
        assert engine.adapters[1].factors == {} and not engine.holds and not engine.in_use
