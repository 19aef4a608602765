"""OpenAI-compatible HTTP server over MultiLoraModel (FastAPI + uvicorn).

GET /v1/models, /v1/models/{id}, POST /v1/completions and /v1/chat/completions (plain and SSE streaming),
GET /health and /metrics (Prometheus text). `model` picks "base", an expert, a saved LoRA composition, a
routed composition (its tokens routed over the pool's experts by its router), "mix:a=0.5,b=0.5", or a
full-model artifact built over the pool (a merged model, an upcycled MoE: its own engine and scheduler, loaded
on first request).

Every request is validated before it joins a batch (strict types, bounded numbers, a non-empty prompt that fits
the context, finite mix weights) and answers a 4xx otherwise; a body over `max_body_mb` is refused (413) before it
is parsed. Tokenisation runs off the event loop on the server's own threads, big prompts on their own (so a few
multi-MB prompts never hold up the small ones). Requests are
decoded by continuous batching (`scheduler.Scheduler`): each joins the running batch at the next step and leaves
it when done, each with its own adapter, mix or router and its own sampling state; a client that disconnects
(streaming or not) is dropped at the next step. Errors use OpenAI's shape
{"error": {"message", "type", "param", "code"}} on every path (unknown routes and unreadable bodies too);
every 500 is logged with its traceback (a full model that cannot load: its traceback once, when the load fails,
then each 503 in one line).

Admin operations (only with `allow_runtime_lora`, the CLI's --allow-runtime-lora; else 403): POST
/v1/load_lora_adapter {"lora_name", "lora_path"} serves a PEFT LoRA folder (validated as `workbench pool add`
validates an expert) or a saved composition's artifact folder from then on (`lora_path` absolute or relative to the
server's working directory); POST /v1/unload_lora_adapter {"lora_name"} stops serving an adapter or composition: new
requests for it get a 404, requests already accepted (handed to the scheduler) finish with it.
Both answer vLLM's plain-text "Success: ..." or a one-line error in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import WorkbenchError
from ..tasks.suite import ADD_SPECIAL_TOKENS
from .engine import FullModel, ModelExists, MultiLoraModel, UnknownModel, saved_full_models
from .metrics import Metrics
from .protocol import (
    STREAM_CHUNKS,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ErrorResponse,
    LoadLoraAdapterRequest,
    Message,
    ModelCard,
    ModelList,
    UnloadLoraAdapterRequest,
    _Common,
    sse_schema,
)
from .scheduler import Delta, Done, Failed, Job, SamplingParams, Scheduler, TokenLogprob

try:  # chat templates are jinja2 (installed with torch)
    from jinja2.exceptions import TemplateError, TemplateSyntaxError
except ImportError:  # pragma: no cover - no jinja2, no chat template to fail
    class TemplateError(Exception):
        pass

    class TemplateSyntaxError(TemplateError):
        pass

log = logging.getLogger("workbench.serving")

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for completions (chat: the room left in the context)
BIG_PROMPT_CHARS = 100_000  # prompts (a request's characters) over this are tokenised on their own threads

__all__ = ["APIError", "ChatRequest", "CompletionRequest", "Message", "build_app", "create_app", "serve",
           "start_in_thread"]


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


BAD = {400: _error("invalid request: a parameter out of bounds or of the wrong type, malformed JSON, a prompt "
                   "that does not fit the context, an invalid mix")}
GEN = {**BAD, 404: _error("unknown model"), 413: _error("a request body over the server's limit (max_body_mb)"),
       500: _error("this request's generation failed (logged)"),
       503: _error("a full-model artifact that cannot be loaded")}


def _sse_and_json(model, chunk) -> dict:
    return {200: {"model": model, "content": {"text/event-stream": {"schema": sse_schema(chunk)}},
                  "description": "the completion (JSON), or server-sent events with `stream: true`"}}


def create_app(engine: MultiLoraModel, *, full_models: Sequence[FullModel] = (), max_batch: int = 32,
               window_s: float = 0.01, context_length: int | None = None, admission: str = "continuous",
               max_prefill_tokens: int = 8192, max_body_mb: float = 4.0, tokenize_threads: int = 4,
               allow_runtime_lora: bool = False) -> FastAPI:
    """The server's app over `engine` (and `full_models`, each its own engine and scheduler once requested).
    `max_batch`: rows decoded together; `window_s`: how long an idle scheduler waits for requests to prefill
    together; `admission`: continuous (join at any step) or static (join an empty batch only);
    `max_prefill_tokens`: left-padded prompt tokens per prefill (a longer single prompt is prefilled alone);
    `context_length`: overrides the model's; `max_body_mb`: larger request bodies get a 413 before they are read;
    `tokenize_threads`: threads tokenising prompts of up to BIG_PROMPT_CHARS characters (bigger ones: 2 threads of
    their own); `allow_runtime_lora`: enable the admin endpoints POST /v1/load_lora_adapter and
    /v1/unload_lora_adapter (else they answer 403)."""
    app = FastAPI(title="Expert Workbench", version="0.1",
                  description="OpenAI-compatible completions over a pool's adapters, mixes and compositions.")
    metrics = Metrics()
    sched_kw = {"max_batch": max_batch, "window_s": window_s, "admission": admission,
                "max_prefill_tokens": max_prefill_tokens, "metrics": metrics}
    sched = Scheduler(engine, **sched_kw)
    full = {f.name: f for f in full_models}
    taken = set(engine.model_names()) & set(full)
    if taken:
        raise WorkbenchError(f"full-model artifacts {sorted(taken)} have the names of the engine's models")
    full_scheds: dict[str, Scheduler] = {}  # one per full model, made when it is first requested
    app.state.scheduler, app.state.full_schedulers, app.state.metrics = sched, full_scheds, metrics
    # tokenising: small prompts on their own threads, so big ones (seconds each) never hold them up
    small_pool = ThreadPoolExecutor(tokenize_threads, thread_name_prefix="workbench-tokenize")
    big_pool = ThreadPoolExecutor(2, thread_name_prefix="workbench-tokenize-big")
    app.state.tokenize_pools = (small_pool, big_pool)

    async def tokenise(fn: Callable[[], list], chars: int):
        pool = big_pool if chars > BIG_PROMPT_CHARS else small_pool
        return await asyncio.get_running_loop().run_in_executor(pool, fn)

    started = int(time.time())
    metrics.gauges["workbench_running_sequences"] = lambda: sum(len(s.running) for s in [sched, *full_scheds.values()])
    metrics.gauges["workbench_queued_sequences"] = lambda: sum(s.queued for s in [sched, *full_scheds.values()])
    if hasattr(engine, "counters"):  # the adapter cache (an engine without one, e.g. a test's stub: none)
        metrics.gauges["workbench_adapter_loads_total"] = lambda: engine.counters["loads"]
        metrics.gauges["workbench_adapter_evictions_total"] = lambda: engine.counters["evictions"]
        metrics.gauges["workbench_resident_adapters"] = lambda: len(engine.resident())
        metrics.gauges["workbench_registered_adapters"] = lambda: len(engine.ids)
        metrics.gauges["workbench_adapter_host_reads_total"] = lambda: engine.counters["host_reads"]
        metrics.gauges["workbench_adapter_staged_drops_total"] = lambda: engine.counters["staged_drops"]
        metrics.gauges["workbench_staged_adapters"] = lambda: len(engine._staged)
        metrics.gauges["workbench_runtime_adapter_loads_total"] = lambda: engine.counters["runtime_loads"]
        metrics.gauges["workbench_runtime_adapter_unloads_total"] = lambda: engine.counters["unloads"]

    def ctx_len_of(e: MultiLoraModel) -> int:
        return context_length or int(getattr(e.model.config, "max_position_embeddings", 2048))

    def err(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": type_,
                                                                   "param": param, "code": code}})

    # -- errors: OpenAI's shape everywhere
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return err(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        errors = e.errors()
        # a union's other branches report type mismatches: the error of the branch that fits says more
        first = next((x for x in errors if not str(x.get("type", "")).endswith("_type")), errors[0])
        if first.get("type") == "json_invalid":
            return err(400, f"malformed JSON body: {first.get('msg')}", code="invalid_json")
        loc = _short_loc(first["loc"])
        msg = str(first["msg"]).removeprefix("Value error, ")
        if first.get("type") == "missing" and not loc:
            return err(400, "a JSON object body is required", code="invalid_parameter")
        return err(400, f"{loc}: {msg}" if loc else msg, param=loc or None, code="invalid_parameter")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return err(404, f"unknown route {request.method} {request.url.path}", code="not_found")
        if e.status_code == 405:
            return err(405, f"method {request.method} not allowed on {request.url.path}", code="method_not_allowed")
        if e.status_code == 400:  # FastAPI could not read the body (invalid UTF-8, ...)
            return err(400, f"unreadable request body: {e.detail}; send UTF-8 JSON", code="invalid_json")
        return err(e.status_code, str(e.detail))

    # any other exception: a 500 logged once with its traceback (`_Internal`, inside Starlette's
    # ServerErrorMiddleware, which would log it a second time and re-raise it to uvicorn, which logs it again)
    app.add_middleware(_Internal)
    app.add_middleware(_BodyLimit, limit=int(max_body_mb * 2**20))
    app.add_middleware(_CountResponses, metrics=metrics)

    app.openapi = lambda: _openapi(app)

    # -- models and health
    def cards() -> list[dict]:
        listed = engine.models() + [{"id": f.name, "kind": f.kind} for f in full.values()]
        return [{**m, "object": "model", "created": started, "owned_by": "workbench"} for m in listed]

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return {"object": "list", "data": cards()}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: _error("unknown model"),
                                                                                400: _error("an invalid mix")})
    async def model(model_id: str):
        for card in cards():
            if card["id"] == model_id:
                return card
        resolve(model_id, engine)  # a mix that resolves is servable; else 404 / 400
        return {"id": model_id, "object": "model", "created": started, "owned_by": "workbench", "kind": "mix"}

    @app.get("/health")
    async def health():
        stats = dict(sched.stats)
        for s in full_scheds.values():
            for k, v in s.stats.items():
                stats[k] = max(stats[k], v) if k == "max_batch_seen" else stats[k] + v
        active = engine.active_sequences + sum(s.engine.active_sequences for s in full_scheds.values())
        return {"status": "ok", **stats, "active_sequences": active,
                "queued": sched.queued + sum(s.queued for s in full_scheds.values()),
                "full_models_loaded": sorted(full_scheds)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    # -- adapters at run time (admin operations, as vLLM's with VLLM_ALLOW_RUNTIME_LORA_UPDATING)
    admin_lock = asyncio.Lock()  # one load or unload at a time

    async def admin_only():
        if not allow_runtime_lora:
            raise APIError(403, "loading and unloading adapters at run time is disabled: start the server with "
                                "--allow-runtime-lora", type_="permission_error", code="runtime_lora_disabled")

    def json_error(description: str) -> dict:  # these routes answer text/plain when they succeed, JSON errors
        return {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                "description": description}

    ADMIN = {400: json_error("an invalid request: a name that is taken or malformed, a folder that is not an adapter "
                             "over this server's base, a load past the server's bounds, an unload of `base`"),
             403: json_error("runtime LoRA updates are disabled (start the server with --allow-runtime-lora)"),
             413: json_error("a request body over the server's limit (max_body_mb)")}

    def text_ok(description: str) -> dict:
        return {200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": description}}

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, dependencies=[Depends(admin_only)],
              responses={**ADMIN, **text_ok("the adapter is loaded and listed by /v1/models")})
    async def load_lora_adapter(req: LoadLoraAdapterRequest):
        """Load a PEFT LoRA adapter folder (or a saved composition's artifact folder) under `lora_name`, validated
        as `workbench pool add` validates an expert (same base, safetensors only, shapes, target modules).
        `lora_path` is a path on the server: absolute, or relative to the server's working directory (`~` is not
        expanded). Past the server's bounds (registered adapters, pinned composition parts) a load is a 400."""
        async with admin_lock:
            if req.lora_name in full:
                raise APIError(400, f"model {req.lora_name!r} is already served; unload it first or pick another "
                                    "name", param="lora_name", code="model_exists")
            try:
                await asyncio.to_thread(engine.load_adapter, req.lora_name, req.lora_path)
            except ModelExists as e:
                raise APIError(400, str(e), param="lora_name", code="model_exists") from None
            except WorkbenchError as e:
                raise APIError(400, _first_line(e), param="lora_path", code="invalid_adapter") from None
        log.info("loaded adapter %r from %s", req.lora_name, req.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, dependencies=[Depends(admin_only)],
              responses={**ADMIN, 404: json_error("no adapter of that name is served"),
                         **text_ok("the adapter is no longer listed; requests already accepted for it finish")})
    async def unload_lora_adapter(req: UnloadLoraAdapterRequest):
        """Stop serving adapter or saved composition `lora_name`: new requests for it get a 404; requests already
        accepted finish with it, then its slots and memory are freed. `base`, a full-model artifact, or an adapter a
        served routed composition routes over (unload that first) is a 400."""
        async with admin_lock:
            if req.lora_name in full:
                raise APIError(400, f"model {req.lora_name!r} is a full-model artifact: those are not unloaded at run "
                                    "time", param="lora_name", code="invalid_unload")
            try:
                await asyncio.to_thread(engine.unload_adapter, req.lora_name)
            except UnknownModel as e:
                raise APIError(404, str(e), param="lora_name", code="model_not_found") from None
            except WorkbenchError as e:
                raise APIError(400, _first_line(e), param="lora_name", code="invalid_unload") from None
        log.info("unloaded adapter %r", req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    # -- requests to jobs
    async def target(model: str) -> tuple[MultiLoraModel, Scheduler]:
        """The engine and scheduler that serve `model`: a full model's own (loaded off the event loop on its
        first request; a load failure answers that request only), else the pool's engine."""
        f = full.get(model)
        if f is None:
            return engine, sched
        if model not in full_scheds:
            try:
                e = await asyncio.to_thread(f.engine)
            except WorkbenchError as err_:  # the load's traceback was logged when it failed (FullModel.engine)
                log.error("503 for model %r: %s", model, err_)
                raise APIError(503, str(err_), type_="server_error", param="model", code="model_unavailable") from None
            if model not in full_scheds:  # checked again after the await: concurrent first requests make one
                full_scheds[model] = Scheduler(e, **sched_kw)
        s = full_scheds[model]
        return s.engine, s

    def resolve(model: str, eng: MultiLoraModel):
        if model in full:
            return ()
        try:
            return eng.resolve(model)
        except UnknownModel as e:
            raise APIError(404, f"{e}; see GET /v1/models", param="model", code="model_not_found") from None
        except WorkbenchError as e:
            raise APIError(400, str(e), param="model", code="invalid_model") from None

    def make_job(req: _Common, prompt_ids: list[int], eng: MultiLoraModel, assignment, max_tokens: int | None,
                 logprobs: int | None, *, arrived: float, default: int | None = None, echo: bool = False,
                 param: str = "prompt") -> Job:
        """A job of `prompt_ids`: `max_tokens` as sent, or None (unset): `default`, at most the room left in the
        context (all of it without a default)."""
        if not prompt_ids:
            raise APIError(400, "the prompt has no tokens", param=param, code="empty_prompt")
        ctx_len = ctx_len_of(eng)
        room = ctx_len - len(prompt_ids)
        if max_tokens is None:
            if room < 1:
                raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) leaves no room to generate in the "
                                    f"context length {ctx_len}", param=param, code="context_length_exceeded")
            max_tokens = room if default is None else min(default, room)
        elif max_tokens > room:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                f"context length {ctx_len}", param="max_tokens", code="context_length_exceeded")
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                stop=req.stops, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None,
                                ignore_eos=bool(req.ignore_eos))
        return Job(prompt_ids, assignment, params, asyncio.get_running_loop(), asyncio.Queue(), model=req.model,
                   arrived=arrived)

    async def finish(request: Request, jobs: list[Job]) -> None:
        """Wait for every job's end; a client that hangs up cancels them (they leave the batch at the next step)."""
        async def one(job: Job):
            while not isinstance(await job.out.get(), (Done, Failed)):
                pass

        waiting = asyncio.ensure_future(asyncio.gather(*(one(j) for j in jobs)))
        try:
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=0.25)
                if not waiting.done() and await request.is_disconnected():
                    raise APIError(499, "client disconnected", code="client_disconnected")
        finally:
            if not waiting.done():
                waiting.cancel()
                waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: not logged
                for j in jobs:
                    j.cancelled.set()
        failed = [j for j in jobs if j.error]
        if failed:
            raise APIError(500, f"generation failed: {failed[0].error}", type_="server_error", code="generation_failed")

    def submit(sch: Scheduler, jobs: list[Job]) -> None:
        """Hand `jobs` to their scheduler; a model unloaded since the request named it is a 404 (jobs already
        handed on are cancelled)."""
        for i, j in enumerate(jobs):
            try:
                sch.submit(j)
            except UnknownModel as e:
                for done in jobs[:i]:
                    done.cancelled.set()
                raise APIError(404, f"{e}; see GET /v1/models", param="model", code="model_not_found") from None

    def usage(jobs: list[Job]) -> dict[str, int]:
        p, c = sum(len(j.prompt_ids) for j in jobs), sum(len(j.tokens) for j in jobs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream(request: Request, job: Job, first, chunk, done_chunk, usage_chunk):
        """Server-sent events of one job: the `first()` chunks (made once its prefill ran: an echo's prompt
        logprobs are known), a chunk per Delta, the finish chunk, the usage chunk (when asked), then [DONE].
        The job is cancelled when the client goes (or the stream ends)."""
        started_ = False
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(job.out.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if not started_ and not isinstance(ev, Failed):
                    started_ = True
                    for c in first():
                        yield sse(c)
                if isinstance(ev, Delta):
                    yield sse(chunk(ev))
                elif isinstance(ev, Done):
                    yield sse(done_chunk(ev.finish_reason))
                    if usage_chunk is not None:
                        yield sse(usage_chunk())
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield sse({"error": {"message": f"generation failed: {ev.message}", "type": "server_error",
                                         "param": None, "code": "generation_failed"}})
                    return
        finally:
            job.cancelled.set()

    # -- completions
    @app.post("/v1/completions", responses={**GEN, **_sse_and_json(Completion, CompletionChunk)})
    async def completions(req: CompletionRequest, request: Request):
        arrived = time.monotonic()
        prompts = req.prompts
        eng, sch = await target(req.model)
        assignment = resolve(req.model, eng)
        if req.stream and len(prompts) != 1:
            raise APIError(400, "stream: streaming takes one prompt", param="stream")
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens: 0 generates nothing; with echo = true it scores the prompt",
                           param="max_tokens", code="invalid_parameter")
        tok = eng.tokenizer
        vocab = len(tok)
        for p in prompts:
            bad = [t for t in p if t >= vocab] if isinstance(p, list) else []
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is not in the model's vocabulary (ids 0 to "
                                    f"{vocab - 1})", param="prompt", code="invalid_token_id")
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(await tokenise(
            lambda: [list(tok(p, add_special_tokens=ADD_SPECIAL_TOKENS)["input_ids"]) for p in texts],
            sum(map(len, texts))) if texts else [])
        ids_of = [list(p) if isinstance(p, list) else next(encoded) for p in prompts]
        jobs = [make_job(req, ids, eng, assignment, req.max_tokens, req.logprobs, arrived=arrived,
                         default=COMPLETION_DEFAULT_TOKENS, echo=req.echo) for ids in ids_of]
        # the echoed prompt: as sent, or its token ids decoded
        echoed = [(p if isinstance(p, str) else tok.decode(p)) if req.echo else "" for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
        extra = {"usage": None} if req.include_usage else {}
        submit(sch, jobs)
        if req.stream:
            job, prompt = jobs[0], echoed[0]

            def lp_block(lps: Sequence[TokenLogprob], base: int):
                return None if req.logprobs is None else _completion_logprobs(lps, base)

            def choice(text, finish, lps):
                return {**head, "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": lps}],
                        **extra}

            def first():
                return [choice(prompt, None, lp_block(job.prompt_logprobs, 0))] if req.echo else []

            return StreamingResponse(
                stream(request, job, first, lambda ev: choice(ev.text, None, lp_block(ev.logprobs, len(prompt))),
                       lambda reason: choice("", reason, None),
                       (lambda: {**head, "choices": [], "usage": usage([job])}) if req.include_usage else None),
                media_type="text/event-stream")
        await finish(request, jobs)
        choices = []
        for i, (j, p) in enumerate(zip(jobs, echoed)):
            lps = None
            if req.logprobs is not None:
                lps = _completion_logprobs(j.prompt_logprobs if req.echo else [], 0)
                for k, v in _completion_logprobs(j.logprobs, len(p)).items():
                    lps[k] += v
            choices.append({"index": i, "text": p + j.text, "finish_reason": j.finish_reason, "logprobs": lps})
        return {**head, "choices": choices, "usage": usage(jobs)}

    # -- chat
    @app.post("/v1/chat/completions", responses={**GEN, **_sse_and_json(ChatCompletion, ChatCompletionChunk)})
    async def chat(req: ChatRequest, request: Request):
        arrived = time.monotonic()
        eng, sch = await target(req.model)
        assignment = resolve(req.model, eng)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
        try:
            ids = await tokenise(lambda: eng.chat_ids(messages), sum(len(m["content"]) for m in messages))
        except TemplateSyntaxError:  # the template itself is broken: the server's fault (a 500, logged)
            raise
        except TemplateError as e:  # the template refuses these messages ("System role not supported", ...)
            raise APIError(400, f"messages: the model's chat template refused them: {_first_line(e)}",
                           param="messages", code="invalid_messages") from None
        top = (req.top_logprobs or 0) if req.logprobs else None
        job = make_job(req, ids, eng, assignment, req.limit, top, arrived=arrived, param="messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
        extra = {"usage": None} if req.include_usage else {}
        submit(sch, [job])

        def lp(lps):
            return {"content": [_chat_logprob(t) for t in lps]} if req.logprobs else None

        if req.stream:
            def choice(delta, finish, lps=None):
                return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish}],
                        **extra}

            return StreamingResponse(
                stream(request, job, lambda: [choice({"role": "assistant", "content": ""}, None)],
                       lambda ev: choice({"content": ev.text}, None, lp(ev.logprobs)),
                       lambda reason: choice({}, reason),
                       (lambda: {**head, "choices": [], "usage": usage([job])}) if req.include_usage else None),
                media_type="text/event-stream")
        await finish(request, [job])
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                             "logprobs": lp(job.logprobs), "finish_reason": job.finish_reason}],
                "usage": usage([job])}

    return app


def _short_loc(loc: Sequence) -> str:
    """A validation error's field path without FastAPI's "body" and pydantic's union branch tags."""
    parts = [str(x) for x in loc[1:]] if loc and loc[0] == "body" else [str(x) for x in loc]
    tags = ("list[", "dict[", "constrained-", "function-", "literal[", "nullable[")
    return ".".join(p for p in parts if not (p in ("str", "int", "float", "bool", "none") or p.startswith(tags)
                                             or p[:1].isupper()))


class _BodyLimit:
    """ASGI middleware refusing request bodies over `limit` bytes with a 413 in OpenAI's shape, before the app reads
    them: a declared Content-Length over it at once; a chunked body as soon as it passes it (smaller chunked bodies
    are buffered and handed on)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                return await self._refuse(receive, send, int(declared), drain=int(declared) <= 16 * self.limit)
            return await self.app(scope, receive, send)
        if b"chunked" not in headers.get(b"transfer-encoding", b""):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(receive, send, size, drain=False, more=message.get("more_body", False))
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, receive, send, size: int, drain: bool, more: bool = True) -> None:
        while drain and more:  # read (and drop) a body of bounded size, so the client sees the answer
            message = await receive()
            more = message["type"] == "http.request" and message.get("more_body", False)
        body = json.dumps({"error": {"message": f"request body of {size} bytes is over this server's limit of "
                                                f"{self.limit} bytes (max_body_mb)", "type": "invalid_request_error",
                                     "param": None, "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _Internal:
    """ASGI middleware answering an exception no handler took with a 500 in OpenAI's shape, logged once with its
    traceback (where the response had started, e.g. a stream, the connection just ends: logged once too)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = [False]

        async def send_(message):
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        try:
            await self.app(scope, receive, send_)
        except Exception as e:  # every 500, logged here once
            log.error("%s %s failed", scope.get("method"), scope.get("path"), exc_info=e)
            if started[0]:
                return
            body = json.dumps({"error": {"message": f"internal error: {type(e).__name__}", "type": "server_error",
                                         "param": None, "code": None}}).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


class _CountResponses:
    """ASGI middleware counting responses by route and status (a pure ASGI one: it leaves disconnects and
    streaming alone)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.inc("workbench_http_responses_total", route=route, status=str(status[0]))


def _completion_logprobs(lps: Sequence[TokenLogprob], base: int) -> dict:
    """The completions API's logprobs block of `lps`, whose text starts `base` characters into the choice's text
    (the echoed prompt's length for generated tokens). An echoed prompt's first token has no logprob (null)."""
    return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [None if t.logprob is None else _top_dict(t) for t in lps],
            "text_offset": [base + t.offset for t in lps]}


def _top_dict(t: TokenLogprob) -> dict[str, float]:
    """OpenAI's completions `top_logprobs` entry: token text -> logprob of the `logprobs` most likely tokens and of
    the chosen one (n + 1 entries when it is not among them), most likely first. The chosen token is keyed by its
    text (as in `tokens`); a distinct token whose text is already a key (two tokens that decode alike) is kept under
    "token_id:N" rather than merged into it."""
    entries: dict[str, TokenLogprob] = {t.token: t}
    for a in t.top:
        if a.id != t.id:
            entries[a.token if a.token not in entries else f"token_id:{a.id}"] = a
    return {k: e.logprob for k, e in sorted(entries.items(), key=lambda kv: -kv[1].logprob)}


def _chat_logprob(t: TokenLogprob) -> dict:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.raw),
            "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.raw)} for a in t.top]}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without the 422 it documents by default (this server answers 400 in OpenAI's shape), with
    the stream chunks' schemas that the event-stream responses refer to."""
    from pydantic.json_schema import models_json_schema

    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema([(m, "serialization") for m in (*STREAM_CHUNKS, ErrorResponse)],
                                 ref_template="#/components/schemas/{model}")
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    for ops in schema["paths"].values():
        for op in ops.values():
            responses = op.get("responses", {})
            if responses.pop("422", None) is not None and "400" not in responses:
                responses["400"] = {"description": "invalid request",
                                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    app.openapi_schema = schema
    return schema


def start_in_thread(app: FastAPI, host: str = "127.0.0.1"):
    """Run `app` under uvicorn on a free loopback port in a daemon thread: (url, server, thread).
    Stop with `server.should_exit = True; thread.join()`. For tests and benchmarks."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return f"http://{host}:{port}", server, thread


def build_app(pool_spec: str, *, backend: str | None = None, device: str = "cpu", max_batch: int = 32,
              max_body_mb: float = 4.0, allow_runtime_lora: bool = False, max_loaded_adapters: int | None = None,
              recipes: Sequence[str] = (), recipes_folder=None, log: Callable[[str], Any] = print,
              max_registered_adapters: int | None = None, max_composition_parts: int | None = None,
              max_host_adapters: int | None = None, **app_kw: Any) -> FastAPI:
    """The server's app over pool `pool_spec`: the engine over the pool's adapters (`max_loaded_adapters` of them
    in kernel slots at once, None: all) and its compositions. With `recipes`, the compositions served are exactly
    those recipes' artifacts (built first when not cached; see `startup.resolve_recipes`), and one that cannot be
    served (over the cap, ...) fails the start with a one-line WorkbenchError; without, every composition and
    full-model artifact built over the pool (whatever the cache holds). Under `max_loaded_adapters` the pool's
    adapters are paged: none is read at start, each is read ahead of its queued requests and kept in host memory
    (`max_host_adapters` beyond the slots, least recently used dropped; None: all once read). `max_registered_adapters`,
    `max_composition_parts`: the engine's bounds (None: its defaults)."""
    from ..artifacts import ARTIFACT_FILE, read_artifact_meta
    from ..pool import Pool
    from .startup import build_recipes, resolve_recipes

    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or not 1 <= max_batch <= 1024:
        raise WorkbenchError(f"max_batch = {max_batch!r}: an integer in 1..1024")
    if isinstance(max_body_mb, bool) or not isinstance(max_body_mb, (int, float)) or not 0 < max_body_mb <= 1024:
        raise WorkbenchError(f"max_body_mb = {max_body_mb!r}: a number of megabytes in (0, 1024]")
    pool = Pool.open(pool_spec)
    declared = None
    if recipes:
        resolved = resolve_recipes(pool, recipes, folder=recipes_folder, log=log)
        log(f"compositions declared at start: {', '.join(r.recipe.name for r in resolved) or 'none'}")
        declared = {Path(f).resolve(): r.recipe.name
                    for f, r in zip(build_recipes(resolved, device=device, log=log), resolved)}
    bounds = {k: v for k, v in (("max_registered_adapters", max_registered_adapters),
                                ("max_composition_parts", max_composition_parts),
                                ("max_host_adapters", max_host_adapters)) if v is not None}
    engine = MultiLoraModel.from_pool(pool, backend=backend, device=device, max_loaded_adapters=max_loaded_adapters,
                                      log=log, declared=declared, **bounds)
    full = saved_full_models(pool, set(engine.model_names()), backend=backend, device=device, only=declared)
    if declared is not None:  # the served set is the declared one: each declared artifact must be served
        served = {Path(str(c.source)).resolve() for c in [*engine.routed.values(), *engine.twins.values()] if c.source}
        served |= {Path(engine.adapters[i].source).resolve() for i in engine.ids.values() if engine.adapters[i].source}
        served |= {Path(f.folder).resolve() for f in full}
        for folder, recipe in declared.items():
            if folder in served:
                continue
            try:
                kind = read_artifact_meta(folder).get("type") if (folder / ARTIFACT_FILE).is_file() else None
            except WorkbenchError:
                kind = None
            raise WorkbenchError(f"--recipes: recipe {recipe!r} built a {kind or 'unreadable'!s} artifact ({folder}) "
                                 "that this server does not serve (another name took it, or its type is not served)")
    if full:
        log(f"full-model artifacts (loaded on first request): {', '.join(f.name for f in full)}")
    return create_app(engine, full_models=full, max_batch=max_batch, max_body_mb=float(max_body_mb),
                      allow_runtime_lora=allow_runtime_lora, **app_kw)


def serve(pool_spec: str, host: str = "127.0.0.1", port: int = 8000, backend: str | None = None,
          device: str = "cpu", max_batch: int = 32, max_body_mb: float = 4.0, *, allow_runtime_lora: bool = False,
          max_loaded_adapters: int | None = None, recipes: Sequence[str] = (), **bounds: int | None) -> None:
    """Serve pool `pool_spec` (`build_app`) under uvicorn until stopped. `bounds`: max_registered_adapters,
    max_composition_parts, max_host_adapters (the engine's defaults when unset)."""
    import uvicorn

    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise WorkbenchError(f"port = {port!r}: an integer in 1..65535")
    app = build_app(pool_spec, backend=backend, device=device, max_batch=max_batch, max_body_mb=max_body_mb,
                    allow_runtime_lora=allow_runtime_lora, max_loaded_adapters=max_loaded_adapters, recipes=recipes,
                    **bounds)
    uvicorn.run(app, host=host, port=port, log_level="info")
