"""`workbench bench serve`: the HTTP server under load, against its peers measured in the same run.

Two modes (`run(mode=...)`):

closed (`closed_loop`, the default): 64 concurrent /v1/completions requests (held-in test questions, greedy,
max_tokens 16) against a real uvicorn server on loopback: over 8 adapters, over one adapter only, and on the base.
With `check`, every output of the mixed round is compared with PEFT generating that request alone (batch 1) with
its adapter: the served text must be identical.

open (`open_loop`): open-loop load. Requests arrive as a Poisson process at each offered rate (requests/s) whatever
the server's progress (a slow server does not slow the arrivals down), each streamed (SSE), so that the client sees
every token arrive. The workload is seeded (`workload`): unit-rate exponential gaps scaled by 1/rate (the same
sequence at every rate, compressed in time), output lengths log-uniform in [min_tokens, max_tokens] (4..256: a
third of them short, <= 16), a model per request drawn over the served LoRA adapters (up to `n_adapters`),
`n_mixes` `mix:` pairs of them and one routed composition of each kind PHATGOOSE, Arrow, Twin, MoLE and SMoRA
that is built in the artifact cache (the kinds not built are recorded as skipped: the benchmark builds nothing),
and a counting prompt from a seeded start, which greedy decoding continues, so that outputs reach their length
(the server has no `ignore_eos`; it is sent where the server's schema lists it; the counts reported are the
server's `usage`). Arms, each over the same arrivals and lengths, in an order rotated every round, the rounds
repeated `reps` times (a noisy machine drifts: interleaving spreads it over every arm):
- continuous: the mixed requests, on today's server (continuous batching);
- static: the same requests on the same engine with `admission="static"` (a request joins an empty batch only:
  the batching before continuous batching);
- base: every request to the base model alone (continuous);
- adapters: each request to one of the `n_adapters` plain adapters in turn (continuous): the "8 adapters" of the
  throughput target.
The server runs in a process of its own (one engine, two apps on two loopback ports: continuous and static), so
that its threads do not delay the client's clock. Per request the client records the scheduled arrival, when it
sent the request, when each streamed chunk arrived (one token each; checked against `usage`) and the end
([DONE]). Time to first token (TTFT) and end-to-end latency count from the scheduled arrival; inter-token latency
(ITL) is the gap between successive chunks; throughput is the output tokens of a run over the time from the
arrivals' clock start to its last request's end. Per arm and rate (pooled over the rounds): throughput (tokens/s,
requests/s), p50/p95 TTFT of all and of short requests, p50/p95 ITL and end-to-end latency; ratios against the
peers with the targets (p95 TTFT of short requests <= 1/5 of static batching's; tokens/s over 8 adapters >= 0.9x
the base's). Written: results/bench/serve-open.json (summaries, no per-request data), every request's raw
timings in serve-open.raw.json.gz beside it, and a chart of p95 TTFT and throughput against offered load
(serve-open.svg).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import inspect
import json
import math
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import numpy as np
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import WorkbenchError, did_you_mean
from ..eval.harness import git_state, machine_info, results_root
from ..io import atomic_write_bytes, atomic_write_json
from ..pool import Pool
from ..serving.api import create_app, start_in_thread
from ..serving.engine import MultiLoraModel, peft_alone
from ..tasks.suite import load_split, task_names

ARMS = ("continuous", "static", "base", "adapters")
ARM_DOC = {"continuous": "the mixed requests (adapters, mixes, routed compositions), continuous batching",
           "static": "the same requests, static batching (admission='static': a request joins an empty batch only)",
           "base": "the same arrivals and lengths, every request to the base model (continuous batching)",
           "adapters": "the same arrivals and lengths, each request to one of the plain adapters in turn "
                       "(continuous batching)"}
ROUTED_KINDS = ("phatgoose", "arrow", "twin", "mole", "smora")  # one routed composition of each, where built
ADAPTER_KINDS = ("lora", "merged_lora")  # /v1/models kinds that are plain adapters
TARGETS = {"short_ttft_p95_continuous_x_static": "<= 0.2", "tokens_per_s_adapters_x_base": ">= 0.9"}
TARGET_TEXT = ("at the same offered load: p95 TTFT of short requests, continuous <= 1/5 of static batching's; "
               "tokens/s over the plain adapters >= 0.9x the base model's")
MAX_RUN_REQUESTS = 10_000  # requests of one (arm, rate) run
MAX_TOTAL_REQUESTS = 200_000  # requests of the whole benchmark
_READY = "WORKBENCH-BENCH-SERVE-READY "  # the server process's line with its URLs
_START_S = 0.05  # the arrivals' clock starts this long after the run's requests are scheduled


class OpenLoopSettings(Schema):
    """What `open_loop` measures; every number bounded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rates: tuple[Annotated[float, Field(ge=0.01, le=1000, allow_inf_nan=False)], ...] = Field(
        (0.5, 1.0, 2.0, 4.0), min_length=1, max_length=16, description="offered loads, requests/s (distinct)")
    duration_s: Annotated[float, Field(ge=0.1, le=3600, allow_inf_nan=False)] = Field(
        60.0, description="arrivals per run: rate x duration_s requests (unless `requests` is given)")
    requests: Annotated[int, Field(ge=1, le=MAX_RUN_REQUESTS)] | None = Field(
        None, description="requests per run at every rate (overrides duration_s)")
    reps: Annotated[int, Field(ge=1, le=20)] = Field(2, description="rounds over every (rate, arm)")
    min_tokens: Annotated[int, Field(ge=1, le=4096)] = Field(4, description="shortest output length asked")
    max_tokens: Annotated[int, Field(ge=1, le=4096)] = Field(256, description="longest output length asked")
    short_tokens: Annotated[int, Field(ge=1, le=4096)] = Field(16, description="a request asking at most this many "
                                                                               "tokens is short")
    arms: tuple[Literal[ARMS], ...] = Field(ARMS, min_length=1, max_length=len(ARMS),  # type: ignore[valid-type]
                                            description="the arms measured (distinct)")
    n_adapters: Annotated[int, Field(ge=1, le=64)] = Field(8, description="plain adapters in the mix (at most)")
    n_mixes: Annotated[int, Field(ge=0, le=16)] = Field(2, description="`mix:` pairs of adapters in the mix")
    max_batch: Annotated[int, Field(ge=1, le=4096)] = Field(32, description="the servers' rows decoded together")
    window_s: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = Field(
        0.01, description="how long an idle scheduler waits for more requests to prefill together")
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    request_timeout_s: Annotated[float, Field(ge=1, le=3600, allow_inf_nan=False)] = Field(
        600.0, description="a request not done by then counts as failed")
    device: str = Field("cpu", min_length=1, max_length=32)
    backend: str | None = Field(None, min_length=1, max_length=64)

    @field_validator("rates")
    @classmethod
    def _distinct_rates(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"rates repeat: {list(v)}")
        return tuple(sorted(v))

    @field_validator("arms")
    @classmethod
    def _distinct_arms(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"arms repeat: {list(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> OpenLoopSettings:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) is over max_tokens ({self.max_tokens})")
        big = [r for r in self.rates if self.run_requests(r) > MAX_RUN_REQUESTS]
        if big:
            raise ValueError(f"rate {big[0]:g} x duration_s {self.duration_s:g} is over {MAX_RUN_REQUESTS:,} requests "
                             "per run: give a shorter duration_s")
        total = self.reps * len(self.arms) * sum(self.run_requests(r) for r in self.rates)
        if total > MAX_TOTAL_REQUESTS:
            raise ValueError(f"{total:,} requests in all, over {MAX_TOTAL_REQUESTS:,}: fewer rates, reps or a "
                             "shorter duration_s")
        return self

    def run_requests(self, rate: float) -> int:
        """Requests of one run at `rate`: `requests`, else rate x duration_s (at least 1)."""
        return self.requests if self.requests is not None else max(1, round(rate * self.duration_s))


def check_settings(**settings: Any) -> OpenLoopSettings:
    """The validated settings; a WorkbenchError naming the first bad one (one line)."""
    try:
        return OpenLoopSettings(**settings)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        raise WorkbenchError(f"bench serve: {loc + ': ' if loc else ''}{msg}") from None


def count_prompt(start: int) -> str:
    """Ten numbers counting up from `start`: greedy decoding goes on counting for hundreds of tokens with the base,
    every demo adapter, their mixes and the routed compositions but SMoRA (which stops within a few tokens: its
    requests end early, the same in every arm; `ended_early_by_model` in the record)."""
    return ", ".join(str(start + k) for k in range(10)) + ","


def workload(n: int, models: Sequence[str], min_tokens: int, max_tokens: int, seed: int) -> list[dict[str, Any]]:
    """The first `n` requests of the seeded workload, each {i, gap, model, max_tokens, prompt}: `gap` the i-th draw
    of np.random.default_rng([seed, 0]).standard_exponential (a unit-rate Poisson process: at rate r the arrivals
    are cumsum(gap) / r); `max_tokens` log-uniform in [min_tokens, max_tokens] from default_rng([seed, 1]); the
    model drawn uniformly over `models` from default_rng([seed, 2]); the prompt's start from default_rng([seed, 3]).
    One generator per field: the first n requests are the same whatever n."""
    gaps = np.random.default_rng([seed, 0]).standard_exponential(n)
    u = np.random.default_rng([seed, 1]).uniform(math.log(min_tokens), math.log(max_tokens + 1), n)
    lengths = np.clip(np.floor(np.exp(u)).astype(int), min_tokens, max_tokens)
    which = np.random.default_rng([seed, 2]).integers(0, len(models), n)
    starts = np.random.default_rng([seed, 3]).integers(1, 1000, n)
    return [{"i": i, "gap": float(gaps[i]), "model": models[int(which[i])], "max_tokens": int(lengths[i]),
             "prompt": count_prompt(int(starts[i]))} for i in range(n)]


def arrivals(gaps: Sequence[float], rate: float) -> list[float]:
    """Arrival times (s from the run's start) of unit-rate `gaps` at `rate` requests/s."""
    return [float(t) for t in np.cumsum(np.asarray(gaps, dtype=float)) / rate]


def run_order(reps: int, rates: Sequence[float], arms: Sequence[str]) -> list[tuple[int, float, str]]:
    """(round, rate, arm) in the order measured: every arm at a rate one after the other (interleaved), the arms'
    order rotated at each rate and round (no arm always first, right after another rate's load)."""
    return [(rep, rate, arms[(k + rep + j) % len(arms)])
            for rep in range(reps) for j, rate in enumerate(rates) for k in range(len(arms))]


def _r6(x: float) -> float:
    return round(float(x), 6)


# ----------------------------------------------------------------------------- the server process


def _server_main() -> None:
    """The server process: reads its settings (a JSON line) on stdin, loads the pool's engine once, serves it on two
    loopback ports (continuous and static admission), prints one READY line with their URLs, and stops when its
    stdin closes."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else printed (the engine's notes) goes to the log, not to the parent
    cfg = json.loads(sys.stdin.readline())
    pool = Pool.open(cfg["pool"])
    engine = MultiLoraModel.from_pool(pool, backend=cfg["backend"], device=cfg["device"],
                                      log=lambda m: print(f"bench serve (server): {m}", file=sys.stderr))
    servers, urls = [], {}
    for admission in ("continuous", "static"):
        app = create_app(engine, max_batch=cfg["max_batch"], window_s=cfg["window_s"], admission=admission)
        url, server, thread = start_in_thread(app)
        if not server.started:
            raise RuntimeError(f"the {admission} server did not start")
        servers.append((server, thread))
        urls[admission] = url
    out.write(_READY + json.dumps({"urls": urls, "backend": engine.ctx.backend,
                                   "machine": machine_info(cfg["device"])}) + "\n")
    out.flush()
    sys.stdin.read()  # until the parent closes it (or exits)
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


class _ServerProcess:
    """The server process (`_server_main`) of one benchmark: started, waited for, stopped (`close`)."""

    def __init__(self, pool_root: Path, s: OpenLoopSettings, start_timeout_s: float = 600):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        code = "from workbench.bench.serve import _server_main; _server_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.proc.stdin.write(json.dumps({"pool": str(pool_root), "backend": s.backend, "device": s.device,
                                          "max_batch": s.max_batch, "window_s": s.window_s}) + "\n")
        self.proc.stdin.flush()
        lines: queue.Queue[str | None] = queue.Queue()

        def read():
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise WorkbenchError(f"bench serve: the server process did not start within {start_timeout_s:g} s")\
                    from None
            if line is None:
                code = self.proc.wait()
                raise WorkbenchError(f"bench serve: the server process exited (code {code}) before serving; see "
                                     "its error above")
            if line.startswith(_READY):
                info = json.loads(line[len(_READY):])
                self.urls, self.backend, self.machine = info["urls"], info["backend"], info["machine"]
                return

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


# ----------------------------------------------------------------------------- the client


async def _stream_one(c: httpx.AsyncClient, url: str, req: dict[str, Any], t0: float, timeout: float,
                      extra: dict[str, Any]) -> dict[str, Any]:
    """Send `req` at its arrival time (t0 + arrival_s) as a streamed completion; its timings (s from t0)."""
    while (wait := t0 + req["arrival_s"] - time.perf_counter()) > 0:  # (a timer may fire a hair early)
        await asyncio.sleep(wait)
    sent = time.perf_counter() - t0
    body = {"model": req["model"], "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    chunks: list[float] = []
    usage, finish, error, done = None, None, None, False
    try:
        async with asyncio.timeout(timeout):
            async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                else:
                    async for line in r.aiter_lines():
                        now = time.perf_counter() - t0
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            break
                        obj = json.loads(line[6:])
                        if "error" in obj:
                            error = f"stream error: {obj['error'].get('message')}"
                            break
                        usage = obj.get("usage") or usage
                        for ch in obj.get("choices") or ():
                            if ch.get("text"):
                                chunks.append(now)
                            finish = ch.get("finish_reason") or finish
                    if not done and error is None:
                        error = "the stream ended before [DONE]"
    except TimeoutError:
        error = f"not done within {timeout:g} s"
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {str(e)[:200]}"
    end = time.perf_counter() - t0
    return {**req, "sent_s": _r6(sent), "chunk_s": [_r6(x) for x in chunks], "end_s": _r6(end),
            "tokens": usage.get("completion_tokens") if usage else None,
            "prompt_tokens": usage.get("prompt_tokens") if usage else None, "finish_reason": finish, "error": error}


async def _fire_open(url: str, reqs: list[dict[str, Any]], timeout: float, extra: dict[str, Any],
                     on_done: Callable[[dict[str, Any]], Any]) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)  # open loop: no client-side queue
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as c:
        t0 = time.perf_counter() + _START_S

        async def one(req):
            out = await _stream_one(c, url, req, t0, timeout, extra)
            on_done(out)
            return out

        return list(await asyncio.gather(*(one(r) for r in reqs)))


def _health(url: str) -> dict[str, Any]:
    try:
        r = httpx.get(f"{url}/health", timeout=30)
        r.raise_for_status()
    except httpx.HTTPError as e:
        raise WorkbenchError(f"bench serve: the server at {url} does not answer /health ({type(e).__name__}); see "
                             "its error above") from None
    return r.json()


def _wait_idle(urls: Sequence[str], timeout_s: float = 300) -> None:
    """Until no sequence decodes or waits on any server (stragglers of a run never overlap the next run)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hs = [_health(u) for u in urls]
        if all(h.get("active_sequences", 0) == 0 and h.get("queued", 0) == 0 for h in hs):
            return
        time.sleep(0.05)
    raise WorkbenchError(f"bench serve: the server was still busy {timeout_s:g} s after a run")


def _stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """What the scheduler did during a run: its counters' changes (/health)."""
    return {k: v - before.get(k, 0) for k, v in after.items()
            if isinstance(v, int) and not isinstance(v, bool) and k not in ("max_batch_seen", "active_sequences",
                                                                           "queued")}


# ----------------------------------------------------------------------------- summaries


def _pct(xs: Sequence[float], q: float) -> float | None:
    return _r6(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else None


def request_tokens(q: dict[str, Any]) -> int:
    """A request's output tokens: the server's usage, else (a failed request) the chunks it streamed."""
    return q["tokens"] if q["tokens"] is not None else len(q["chunk_s"])


def run_duration(run: dict[str, Any]) -> float:
    """Seconds from the arrivals' clock start to the run's last request's end."""
    return max(q["end_s"] for q in run["requests"])


def summarize(runs: Sequence[dict[str, Any]], short_tokens: int) -> dict[str, Any]:
    """One (arm, rate)'s figures over its runs (the rounds): throughput per run (mean over runs), latencies pooled
    over every request that completed."""
    reqs = [q for run in runs for q in run["requests"]]
    ok = [q for q in reqs if q["error"] is None]
    first = [q for q in ok if q["chunk_s"]]
    ttft = [q["chunk_s"][0] - q["arrival_s"] for q in first]
    short = [q["chunk_s"][0] - q["arrival_s"] for q in first if q["max_tokens"] <= short_tokens]
    itl = [b - a for q in ok for a, b in zip(q["chunk_s"], q["chunk_s"][1:])]
    e2e = [q["end_s"] - q["arrival_s"] for q in ok]
    late = [q["sent_s"] - q["arrival_s"] for q in reqs]
    early: dict[str, int] = {}
    for q in ok:
        if q["tokens"] is not None and q["tokens"] < q["max_tokens"]:
            early[q["model"]] = early.get(q["model"], 0) + 1
    tps = [sum(request_tokens(q) for q in run["requests"]) / run_duration(run) for run in runs]
    rps = [sum(q["error"] is None for q in run["requests"]) / run_duration(run) for run in runs]
    return {"requests": len(reqs), "errors": len(reqs) - len(ok), "short_requests": sum(
                q["max_tokens"] <= short_tokens for q in reqs),
            "output_tokens": sum(request_tokens(q) for q in reqs),
            "reached_max_tokens": round(sum(q["tokens"] == q["max_tokens"] for q in ok) / len(ok), 4) if ok else None,
            "ended_early_by_model": dict(sorted(early.items())), "no_token_requests": len(ok) - len(first),
            "tokens_per_s": _r6(statistics.fmean(tps)), "tokens_per_s_runs": [_r6(x) for x in tps],
            "requests_per_s": _r6(statistics.fmean(rps)), "requests_per_s_runs": [_r6(x) for x in rps],
            "ttft_p50_s": _pct(ttft, 50), "ttft_p95_s": _pct(ttft, 95),
            "short_ttft_p50_s": _pct(short, 50), "short_ttft_p95_s": _pct(short, 95),
            "itl_p50_s": _pct(itl, 50), "itl_p95_s": _pct(itl, 95),
            "e2e_p50_s": _pct(e2e, 50), "e2e_p95_s": _pct(e2e, 95),
            "send_lateness_p95_s": _pct(late, 95), "send_lateness_max_s": _r6(max(late)) if late else None}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def rate_key(rate: float) -> str:
    return f"{rate:g} req/s"


def ratios_at(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The ratios against the peers at one rate ({arm: figures}); those whose arms did not run are left out."""
    def get(arm, key):
        return summary.get(arm, {}).get(key)

    out = {"short_ttft_p95_continuous_x_static": _ratio(get("continuous", "short_ttft_p95_s"),
                                                        get("static", "short_ttft_p95_s")),
           "ttft_p95_continuous_x_static": _ratio(get("continuous", "ttft_p95_s"), get("static", "ttft_p95_s")),
           "itl_p50_continuous_x_static": _ratio(get("continuous", "itl_p50_s"), get("static", "itl_p50_s")),
           "tokens_per_s_continuous_x_static": _ratio(get("continuous", "tokens_per_s"), get("static", "tokens_per_s")),
           "tokens_per_s_adapters_x_base": _ratio(get("adapters", "tokens_per_s"), get("base", "tokens_per_s")),
           "tokens_per_s_continuous_x_base": _ratio(get("continuous", "tokens_per_s"), get("base", "tokens_per_s"))}
    return {k: v for k, v in out.items() if v is not None}


def _meets(value: float, target: str) -> bool:
    op, bound = target.split()
    return value <= float(bound) if op == "<=" else value >= float(bound)


def open_loop_chart(record: dict[str, Any]):
    """p95 TTFT (short requests, all requests) and throughput against offered load, one colour per arm."""
    import altair as alt
    import pandas as pd

    rows = [{"arm": arm, "rate": float(rate.split()[0]), **fig}
            for arm, by_rate in record["summary"].items() for rate, fig in by_rate.items()]
    df = pd.DataFrame(rows)[["arm", "rate", "short_ttft_p95_s", "ttft_p95_s", "tokens_per_s"]]
    arms = list(record["summary"])
    x = alt.X("rate:Q", scale=alt.Scale(type="log"), title="offered load (requests/s)")
    color = alt.Color("arm:N", sort=arms, title="arm")
    base = alt.Chart(df).mark_line(point=True).encode(x=x, color=color, tooltip=list(df.columns))

    def panel(field: str, title: str, unit: str, log: bool):
        return base.encode(y=alt.Y(f"{field}:Q", title=unit, scale=alt.Scale(type="log" if log else "linear"))
                           ).properties(width=260, height=240, title=title)

    cfg = record["config"]
    return alt.hconcat(panel("short_ttft_p95_s", f"p95 TTFT, short requests (<= {cfg['short_tokens']} tokens)",
                             "seconds (log)", True),
                       panel("ttft_p95_s", "p95 TTFT, all requests", "seconds (log)", True),
                       panel("tokens_per_s", "throughput", "output tokens/s", False)).properties(
        title=f"bench serve, open loop: pool {record['pool']}, Poisson arrivals, outputs of {cfg['min_tokens']}-"
              f"{cfg['max_tokens']} tokens, rounds: {cfg['reps']}")


def _write_gz_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, gzip.compress(json.dumps(obj).encode(), mtime=0))


def read_raw(path: str | os.PathLike) -> dict[str, Any]:
    """The raw per-request data an open-loop run wrote (serve-open.raw.json.gz)."""
    return json.loads(gzip.decompress(Path(path).read_bytes()))


# ----------------------------------------------------------------------------- the open loop


def request_mix(listed: Sequence[dict[str, Any]], n_adapters: int, n_mixes: int) -> dict[str, Any]:
    """The request mix from what a server lists (/v1/models' data): its first `n_adapters` plain adapters,
    `n_mixes` mixes of successive pairs of them, and one routed composition of each kind in ROUTED_KINDS (the
    first by name) where one is listed; the kinds not listed are `skipped`. `mix`: every model requests draw on."""
    adapters = [m["id"] for m in listed if m.get("kind") in ADAPTER_KINDS][:n_adapters]
    if not adapters:
        raise WorkbenchError("bench serve: the pool serves no LoRA adapter; add experts first")
    mixes = [f"mix:{a}=0.5,{b}=0.5" for a, b in zip(adapters[0::2], adapters[1::2])][:n_mixes]
    routed = [{"id": m["id"], "router": m.get("router")} for m in listed if m.get("kind") == "routed_lora"]
    used = {}
    for kind in ROUTED_KINDS:
        names = sorted(m["id"] for m in routed if m["router"] == kind)
        if names:
            used[kind] = names[0]
    return {"adapters": adapters, "mixes": mixes,
            "routed": {"used": used, "skipped": {k: "not built over this pool in the artifact cache"
                                                 for k in ROUTED_KINDS if k not in used},
                       "available": routed},
            "mix": adapters + mixes + list(used.values())}


def _served_models(url: str, n_adapters: int, n_mixes: int) -> dict[str, Any]:
    return request_mix(httpx.get(f"{url}/v1/models", timeout=30).json()["data"], n_adapters, n_mixes)


def _ignore_eos_supported(url: str) -> bool:
    """Whether the server's completion schema lists `ignore_eos` (it ignores unknown fields otherwise)."""
    schema = httpx.get(f"{url}/openapi.json", timeout=30).json()
    return "ignore_eos" in schema.get("components", {}).get("schemas", {}).get("CompletionRequest", {}).get(
        "properties", {})


def open_loop(pool_name: str = "demo", *, out_file: str | os.PathLike | None = None,
              plot: str | os.PathLike | None = None, raw: bool = True, log: Callable[..., Any] = print,
              progress: bool = True, **settings: Any) -> dict[str, Any]:
    """The open-loop benchmark (see the module doc) of pool `pool_name`; `settings` are `OpenLoopSettings`' fields
    (rates, duration_s or requests, reps, min_tokens, max_tokens, short_tokens, arms, n_adapters, n_mixes,
    max_batch, window_s, seed, request_timeout_s, device, backend). Writes the record to `out_file` (default
    results/bench/serve-open.json), the raw per-request data beside it (`raw`; NAME.raw.json.gz) and the chart
    (`plot`, default beside it: .svg); returns the record."""
    s = check_settings(**settings)
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", s.device):
        raise WorkbenchError(f"bench serve: device {s.device!r}: cpu, cuda, cuda:N or mps")
    if s.backend is not None:
        from ..kernels.multi_lora import check_backend

        check_backend(s.backend)
    pool = Pool.open(pool_name)
    out = Path(out_file) if out_file else results_root() / "bench" / "serve-open.json"
    if out.suffix != ".json":
        raise WorkbenchError(f"bench serve: out_file {out.name!r} must end in .json")
    plot_path = Path(plot) if plot else out.with_suffix(".svg")
    raw_path = out.with_name(out.stem + ".raw.json.gz")
    n_max = max(s.run_requests(r) for r in s.rates)
    total = s.reps * len(s.arms) * sum(s.run_requests(r) for r in s.rates)
    log(f"bench serve (open loop): {len(s.rates)} rates x {len(s.arms)} arms x {s.reps} rounds, {total:,} requests; "
        "starting the server process")
    server = _ServerProcess(pool.root, s)
    runs: list[dict[str, Any]] = []
    try:
        urls = server.urls
        log(f"server ready ({server.backend} backend): continuous {urls['continuous']}, static {urls['static']}")
        models = _served_models(urls["continuous"], s.n_adapters, s.n_mixes)
        log(f"mix: {len(models['adapters'])} adapters, {len(models['mixes'])} mixes, routed "
            f"{sorted(models['routed']['used'].values()) or 'none'} (not built: "
            f"{', '.join(models['routed']['skipped']) or 'none'})")
        eos = _ignore_eos_supported(urls["continuous"])
        extra = {"ignore_eos": True} if eos else {}
        work = workload(n_max, models["mix"], s.min_tokens, s.max_tokens, s.seed)
        per_arm = {"continuous": [w["model"] for w in work], "static": [w["model"] for w in work],
                   "base": ["base"] * n_max,
                   "adapters": [models["adapters"][i % len(models["adapters"])] for i in range(n_max)]}
        # warm-up: every model once on both servers (first-use costs: layouts, routers)
        for url in (urls["continuous"], urls["static"]):
            warm = [{"i": i, "model": m, "max_tokens": 2, "prompt": count_prompt(1), "arrival_s": 0.0}
                    for i, m in enumerate(["base", *models["mix"]])]
            asyncio.run(_fire_open(url, warm, s.request_timeout_s, extra, lambda q: None))
        _wait_idle(list(urls.values()))
        log("warmed up (every model once on both servers); measuring")
        order = run_order(s.reps, s.rates, s.arms)
        bar_cm = _bar(progress, "bench serve (open loop)", total)
        with bar_cm as bar:
            for rep, rate, arm in order:
                n = s.run_requests(rate)
                times = arrivals([w["gap"] for w in work[:n]], rate)
                reqs = [{"i": w["i"], "model": per_arm[arm][w["i"]], "max_tokens": w["max_tokens"],
                         "prompt": w["prompt"], "arrival_s": _r6(t)} for w, t in zip(work[:n], times)]
                url = urls["static" if arm == "static" else "continuous"]
                before = _health(url)

                def done(q, arm=arm, rate=rate, rep=rep):
                    if bar is not None:
                        bar.update(1, arm=arm, rate=rate, round=rep + 1)

                results = asyncio.run(_fire_open(url, reqs, s.request_timeout_s, extra, done))
                _wait_idle(list(urls.values()))
                run = {"rep": rep, "rate": rate, "arm": arm, "server": "static" if arm == "static" else "continuous",
                       "requests": results}
                run["duration_s"] = _r6(run_duration(run))
                run["stats"] = _stats_delta(before, _health(url))
                runs.append(run)
                fig = summarize([run], s.short_tokens)
                log(f"round {rep + 1}/{s.reps} {rate_key(rate)} {arm}: {fig['tokens_per_s']:.1f} tokens/s, p95 TTFT "
                    f"{fig['ttft_p95_s']} s (short {fig['short_ttft_p95_s']} s), p50 ITL {fig['itl_p50_s']} s, "
                    f"{fig['errors']} errors")
    finally:
        server.close()
    record = _record(pool_name, s, models, eos, runs, server, raw_path if raw else None, plot_path, out)
    if raw:
        _write_gz_json(raw_path, {"benchmark": "serve-open", "config": record["config"], "models": models["mix"],
                                  "runs": runs})
    atomic_write_json(out, record)
    from ..tracing import save_chart

    save_chart(open_loop_chart(record), plot_path)
    return record


def _bar(progress: bool, desc: str, total: int):
    if not progress:
        return contextlib.nullcontext()
    from ..progress import progress_bar

    return progress_bar(desc, total)


def _relative(path: Path, to: Path) -> str:
    """`path` relative to the record's folder (no machine's absolute paths in a record)."""
    try:
        return path.resolve().relative_to(to.resolve().parent).as_posix()
    except ValueError:
        return path.name


def _record(pool_name: str, s: OpenLoopSettings, models: dict[str, Any], eos: bool, runs: list[dict[str, Any]],
            server: _ServerProcess, raw_path: Path | None, plot_path: Path, out: Path) -> dict[str, Any]:
    summary: dict[str, dict[str, Any]] = {}
    for arm in s.arms:
        summary[arm] = {}
        for rate in s.rates:
            mine = [r for r in runs if r["arm"] == arm and r["rate"] == rate]
            fig = summarize(mine, s.short_tokens)
            mean_len = statistics.fmean(q["max_tokens"] for q in mine[0]["requests"])
            summary[arm][rate_key(rate)] = {"offered_requests_per_s": rate,
                                            "offered_tokens_per_s": _r6(rate * mean_len), **fig}
    ratios = {rate_key(r): ratios_at({arm: summary[arm][rate_key(r)] for arm in s.arms}) for r in s.rates}
    met = {}
    for name, target in TARGETS.items():
        per_rate = {k: _meets(v[name], target) for k, v in ratios.items() if name in v}
        met[name] = {"target": target, "per_rate": per_rate,
                     "met_at_every_rate": all(per_rate.values()) if per_rate else None}
    chunks_short = sum(1 for r in runs for q in r["requests"]
                       if q["error"] is None and q["tokens"] is not None and len(q["chunk_s"]) != q["tokens"])
    return {"benchmark": "serve-open", "mode": "open", "pool": pool_name,
            "config": s.model_dump(mode="json"), "arms": {a: ARM_DOC[a] for a in s.arms},
            "models": {k: models[k] for k in ("adapters", "mixes", "routed")},
            "workload": {"prompt": "{start}, {start + 1}, ..., {start + 9}, (start from default_rng([seed, 3]))",
                         "arrivals": "Poisson: unit-rate exponential gaps from numpy default_rng([seed, 0]), / rate",
                         "lengths": "max_tokens log-uniform in [min_tokens, max_tokens], default_rng([seed, 1])",
                         "requests_per_run": {rate_key(r): s.run_requests(r) for r in s.rates}},
            "ignore_eos": {"sent": eos, "note": "the server's schema lists ignore_eos" if eos else
                           "the server has no ignore_eos: counting prompts make outputs reach max_tokens (all but "
                           "SMoRA's: see reached_max_tokens, ended_early_by_model); the counts are the server's usage"},
            "measures": {"ttft": "first streamed chunk - scheduled arrival (client clock)",
                         "itl": "gap between successive streamed chunks (one token each)",
                         "e2e": "[DONE] - scheduled arrival", "short": f"max_tokens <= {s.short_tokens}",
                         "throughput": "output tokens (usage) / (last end - the arrivals' clock start), mean over "
                                       "rounds; below saturation it follows the offered load in every arm, so its "
                                       "ratios tell at the rates that saturate the server"},
            "order": [[r["rep"], r["rate"], r["arm"]] for r in runs],
            "runs": [{"rep": r["rep"], "rate": r["rate"], "arm": r["arm"], "duration_s": r["duration_s"],
                      "stats": r["stats"]} for r in runs],
            "summary": summary, "ratios": ratios, "targets": TARGETS, "target": TARGET_TEXT, "targets_met": met,
            "streamed_chunks_short_of_tokens": chunks_short,
            "raw": _relative(raw_path, out) if raw_path else None, "plot": _relative(plot_path, out),
            "backend": server.backend, "machine": server.machine, "git": git_state(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# ----------------------------------------------------------------------------- the closed loop


def run(mode: str = "closed", log: Callable[..., Any] = print, **options: Any) -> dict[str, Any]:
    """`workbench bench serve`: `mode` closed (`closed_loop`: 64 concurrent requests, and the PEFT check) or open
    (`open_loop`: Poisson arrivals at several rates, continuous vs static batching vs the base)."""
    fns = {"closed": closed_loop, "open": open_loop}
    if mode not in fns:
        raise WorkbenchError(f"bench serve: mode {mode!r}: closed or open")
    fn = fns[mode]
    params = inspect.signature(fn).parameters
    known = set(params) | (set(OpenLoopSettings.model_fields) if mode == "open" else set())
    unknown = sorted(set(options) - known)
    if unknown:
        choices = sorted(known - {"log", "settings"})
        raise WorkbenchError(f"bench serve ({mode}): unknown option {unknown[0]!r}"
                             f"{did_you_mean(unknown[0], choices)}; known: {', '.join(choices)}")
    rec = fn(log=log, **options)
    if mode == "open":
        print_open_loop(rec, log, options.get("out_file"))
    else:
        print_closed_loop(rec, log)
    return rec


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


def closed_loop(pool_name: str = "demo", n_requests: int = 64, n_adapters: int = 8, max_tokens: int = 16,
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


def print_open_loop(rec: dict[str, Any], log: Callable[..., Any] = print, out=None) -> None:
    """The open-loop record as the CLI prints it: a table per offered load and arm, then each target per rate."""
    from rich.table import Table

    def num(v):
        return "–" if v is None else f"{v:.3f}"

    table = Table("offered", "arm", "tokens/s", "requests/s", "p95 TTFT s", "p95 TTFT short s", "p50 ITL s",
                  "p95 ITL s", "p95 e2e s", "errors", title="bench serve, open loop (pooled over rounds)")
    for key in rec["ratios"]:
        for arm, by_rate in rec["summary"].items():
            f = by_rate[key]
            table.add_row(key, arm, f"{f['tokens_per_s']:.1f}", f"{f['requests_per_s']:.2f}", num(f["ttft_p95_s"]),
                          num(f["short_ttft_p95_s"]), num(f["itl_p50_s"]), num(f["itl_p95_s"]), num(f["e2e_p95_s"]),
                          str(f["errors"]))
    log(table)
    for name, met in rec["targets_met"].items():
        got = ", ".join(f"{k} {rec['ratios'][k][name]:.3f} ({'met' if ok else 'NOT met'})"
                        for k, ok in met["per_rate"].items())
        log(f"{name} (target {met['target']}): {got or 'not measured (its arms did not run)'}")
    log(f"record: {out or 'results/bench/serve-open.json'}; chart: {rec['plot']}; raw per request: "
                  f"{rec['raw']}")


def print_closed_loop(rec: dict[str, Any], log: Callable[..., Any] = print) -> bool:
    """The closed-loop record as the CLI prints it; False when a served output differed from PEFT alone."""
    from rich.table import Table

    table = Table("mix", "requests/s", "p50 s", "p95 s", "wall s", title="bench serve")
    for k, v in rec["rows"].items():
        table.add_row(k, f"{v['requests_per_s']:.2f}", f"{v['p50_s']:.2f}", f"{v['p95_s']:.2f}", f"{v['wall_s']:.1f}")
    log(table)
    if rec["exact_vs_peft_alone"] is not None:
        ex = rec["exact_vs_peft_alone"]
        log(f"served == PEFT alone: {ex['identical']}/{ex['requests']} requests")
        if ex["differing"]:
            return False
    return True
