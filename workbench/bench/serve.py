"""`workbench bench serve`: requests/s and latency of the HTTP server, same run, three mixes.

64 concurrent /v1/completions requests (held-in test questions, greedy, max_tokens 16) against
a real uvicorn server on loopback: over 8 adapters, over one adapter only, and on the base.
With `check`, every output of the mixed round is compared with PEFT generating that request
alone (batch 1) with its adapter: the served text must be identical.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx

from ..eval.harness import git_state, machine_info, results_root
from ..io import atomic_write_json
from ..pool import Pool
from ..serving.api import create_app, start_in_thread
from ..serving.engine import MultiLoraModel, peft_alone
from ..tasks.suite import load_split, task_names


async def _fire(url: str, models: list[str], prompts: list[str], max_tokens: int) -> tuple[float, list[float], list[str]]:
    async with httpx.AsyncClient(timeout=600) as c:
        async def one(m, p):
            t0 = time.perf_counter()
            r = await c.post(f"{url}/v1/completions", json={"model": m, "prompt": p, "max_tokens": max_tokens})
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()["choices"][0]["text"]

        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(m, p) for m, p in zip(models, prompts)))
        return time.perf_counter() - t0, [d[0] for d in done], [d[1] for d in done]


def run(pool_name: str = "demo", n_requests: int = 64, n_adapters: int = 8, max_tokens: int = 16,
        max_batch: int = 64, check: bool = True, out_file=None, log=print) -> dict[str, Any]:
    pool = Pool.open(pool_name)
    engine = MultiLoraModel.from_pool(pool)
    adapters = list(engine.ids)[:n_adapters]  # requestable adapters (not a Twin's internal parts)
    tasks = task_names("held_in")
    prompts = [load_split(tasks[i % len(tasks)], "test")[i // len(tasks)]["question"] for i in range(n_requests)]
    app = create_app(engine, max_batch=max_batch, window_s=0.05)
    url, server, thread = start_in_thread(app)
    rows, texts = {}, {}
    try:
        asyncio.run(_fire(url, ["base"] * 4, prompts[:4], 4))  # warm-up
        for label, models in [(f"{len(adapters)}_adapters", [adapters[i % len(adapters)] for i in range(n_requests)]),
                              ("1_adapter", [adapters[0]] * n_requests), ("base", ["base"] * n_requests)]:
            wall, lat, texts[label] = asyncio.run(_fire(url, models, prompts, max_tokens))
            lat.sort()
            rows[label] = {"requests": n_requests, "wall_s": round(wall, 2), "requests_per_s": round(n_requests / wall, 3),
                           "p50_s": round(statistics.median(lat), 3), "p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3)}
            log(f"{label}: {rows[label]}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    exact = None
    if check:
        mixed = [adapters[i % len(adapters)] for i in range(n_requests)]
        want = peft_alone(pool.base, {a.name: a.source for a in engine.adapters}, list(zip(mixed, prompts)), max_tokens)
        got = texts[f"{len(adapters)}_adapters"]
        diffs = [{"model": m, "prompt": p, "served": g, "peft": w}
                 for m, p, g, w in zip(mixed, prompts, got, want) if g != w]
        exact = {"requests": n_requests, "identical": n_requests - len(diffs), "differing": diffs}
        log(f"exactness vs PEFT alone: {exact['identical']}/{n_requests} identical")
    record = {"benchmark": "serve", "pool": pool_name, "adapters": adapters, "max_tokens": max_tokens,
              "max_batch": max_batch, "backend": engine.ctx.backend, "rows": rows, "exact_vs_peft_alone": exact,
              "ratios": {"multi_adapter_rps_vs_base": round(rows[f"{len(adapters)}_adapters"]["requests_per_s"] / rows["base"]["requests_per_s"], 3),
                         "one_adapter_rps_vs_base": round(rows["1_adapter"]["requests_per_s"] / rows["base"]["requests_per_s"], 3)},
              "machine": machine_info("cpu"), "git": git_state(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(out_file or results_root() / "bench" / "serve.json", record)
    return record
