"""`workbench bench scale`'s serving operations (issue 27): a server over an N-adapter pool, started; and a Zipf(1.0)
workload over the N adapters served with 64 adapters resident in kernel slots (the rest paged: read from disk ahead
of their requests, staged in host memory) against the same requests with every adapter resident.

server_start: `build_app` over the pool with `--max-loaded-adapters 64` (paged: only the adapters of the first 64
slots are read) and a real uvicorn on loopback, until GET /health answers. server_start_all_resident: the same with
every adapter read and in a slot at start (no cap), its peer.

zipf_serving: one process, two servers on loopback over the same pool, each its own engine: `paged` (64 slots, at
most 64 more adapters staged in host memory) and `resident` (every adapter in a slot, read at start). The workload is
seeded: `requests` requests, Poisson arrivals at `rate` requests/s, each for adapter k (k = 1..N) with probability
proportional to 1/k (Zipf, exponent 1.0), a counting prompt, `max_tokens` output tokens (ignore_eos: every request
makes exactly that many), streamed (the client sees each token). The arms run in turn, `reps` rounds, the order
rotated every round; each round is the same requests. Per arm (pooled over rounds): output tokens/s over the span
from the first arrival to the last end, p50/p95 time to first token from the scheduled arrival, failed requests.
Ratios: paged / resident (throughput, target >= 0.8; p95 TTFT, target <= 2). Memory: the adapters' factors each
engine holds in host memory at the end of its runs (bytes of tensors: kernel slots and staged), exact, and the
paged server's reads, evictions and staged drops. The client runs in the servers' process (one GIL): absolute TTFTs
include its own scheduling; both arms pay it alike.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

RESIDENT_SLOTS = 64


def _ready(url: str, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"the server at {url} did not answer /health within {timeout_s:g} s")


def _start(pool: str, max_loaded: int | None, max_host: int | None = None):
    from ..serving.api import build_app, start_in_thread

    app = build_app(pool, max_loaded_adapters=max_loaded, max_host_adapters=max_host,
                    max_registered_adapters=4096, log=lambda *a: None)
    url, server, thread = start_in_thread(app)
    _ready(url)
    return app, url, server, thread


def _stop(server, thread) -> None:
    server.should_exit = True
    thread.join(timeout=20)


def server_start(spec: dict[str, Any]) -> dict[str, Any]:
    """The paged server over the N-adapter pool (64 slots) started until it answers, then stopped."""
    slots = min(RESIDENT_SLOTS, spec["n"])
    app, url, server, thread = _start(spec["pool"], slots)
    reads = app.state.scheduler.engine.counters["host_reads"]
    _stop(server, thread)
    return {"adapters_read_at_start": reads, "slots": slots}


def server_start_all_resident(spec: dict[str, Any]) -> dict[str, Any]:
    """The same server with every adapter read and in a kernel slot at start (the peer of `server_start`)."""
    app, url, server, thread = _start(spec["pool"], None)
    reads = len(app.state.scheduler.engine.resident())
    _stop(server, thread)
    return {"adapters_read_at_start": reads}


def zipf_models(n: int, requests: int, seed: int, names: list[str]) -> list[str]:
    """`requests` adapter names drawn with P(k) proportional to 1/k over the first `n` of `names` (seeded)."""
    p = 1.0 / np.arange(1, n + 1)
    which = np.random.default_rng([seed, 4]).choice(n, size=requests, p=p / p.sum())
    return [names[int(k)] for k in which]


def factor_bytes(engine) -> int:
    """Bytes of the adapter factors `engine` holds in host memory now (each tensor once)."""
    seen: set[int] = set()
    total = 0
    for a in engine.adapters:
        for fa, fb, _ in a.factors.values():
            for t in (fa, fb):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


def zipf_serving(spec: dict[str, Any]) -> dict[str, Any]:
    from .serve import _fire_open, _pct, arrivals, count_prompt, run_order, workload

    n = spec["n"]
    requests, rate, reps = spec.get("zipf_requests", 192), spec.get("zipf_rate", 6.0), spec.get("zipf_reps", 2)
    max_tokens = spec.get("zipf_tokens", 16)
    slots = min(RESIDENT_SLOTS, n)
    arms = {"paged": _start(spec["pool"], slots, slots), "resident": _start(spec["pool"], None)}
    engine = arms["paged"][0].state.scheduler.engine
    names = list(engine.ids)[:n]
    base = workload(requests, ["x"], max_tokens, max_tokens, spec.get("seed", 0))
    models = zipf_models(n, requests, spec.get("seed", 0), names)
    times = arrivals([r["gap"] for r in base], rate)
    reqs = [{"i": r["i"], "arrival_s": t, "model": m, "max_tokens": max_tokens, "prompt": count_prompt(7 + r["i"])}
            for r, t, m in zip(base, times, models)]
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    for _, _, arm in run_order(reps, [rate], list(arms)):  # the arms interleaved, their order rotated every round
        out = asyncio.run(_fire_open(arms[arm][1], reqs, 600.0, {"ignore_eos": True}, lambda q: None))
        runs[arm].append({"requests": out})
    summary = {}
    for arm, rs in runs.items():
        done = [q for r in rs for q in r["requests"] if q["error"] is None]
        failed = sum(1 for r in rs for q in r["requests"] if q["error"] is not None)
        ttft = [q["chunk_s"][0] - q["arrival_s"] for q in done if q["chunk_s"]]
        tps = [sum(q["tokens"] or 0 for q in r["requests"] if q["error"] is None)
               / max(1e-9, max(q["end_s"] for q in r["requests"]) - min(q["arrival_s"] for q in r["requests"]))
               for r in rs]
        summary[arm] = {"tokens_per_s": round(float(np.mean(tps)), 3), "tokens_per_s_rounds": [round(x, 3) for x in tps],
                        "p50_ttft_s": _pct(ttft, 50), "p95_ttft_s": _pct(ttft, 95), "failed": failed}
    counters = dict(engine.counters)
    mem = {arm: round(factor_bytes(a[0].state.scheduler.engine) / 2**20, 1) for arm, a in arms.items()}
    for _, _, server, thread in arms.values():
        _stop(server, thread)
    p, r = summary["paged"], summary["resident"]
    return {"requests": requests, "rate": rate, "reps": reps, "max_tokens": max_tokens, "slots": slots,
            "distinct_adapters": len(set(models)), "arms": summary, "adapter_memory_mb": mem,
            "paged_counters": {k: counters[k] for k in ("loads", "evictions", "host_reads", "staged_drops")},
            "throughput_ratio": round(p["tokens_per_s"] / r["tokens_per_s"], 3) if r["tokens_per_s"] else None,
            "p95_ttft_ratio": (round(p["p95_ttft_s"] / r["p95_ttft_s"], 3)
                               if p["p95_ttft_s"] and r["p95_ttft_s"] else None)}


__all__ = ["RESIDENT_SLOTS", "factor_bytes", "server_start", "server_start_all_resident", "zipf_models",
           "zipf_serving"]
