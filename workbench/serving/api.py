"""OpenAI-compatible HTTP server over MultiLoraModel (FastAPI + uvicorn).

GET /v1/models, POST /v1/completions and /v1/chat/completions (non-streaming and SSE
streaming). `model` picks "base", an expert, a saved LoRA composition, a routed composition
(its tokens routed over the pool's experts by its router), "mix:a=0.5,b=0.5", or a full-model artifact
built over the pool (a merged model, an upcycled MoE: its own engine and scheduler, loaded on first request).
Concurrent requests are batched: a scheduler thread collects what arrives within a short
window (up to max_batch) and decodes it as one batch, each sequence with its own adapter, mix or router.
A client that disconnects is dropped from its batch at the next token; others go on.
Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}} with 4xx codes.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field

from ..errors import WorkbenchError
from ..tasks.suite import ADD_SPECIAL_TOKENS
from .engine import FullModel, MultiLoraModel, UnknownModel, saved_full_models


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class _Common(Schema):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int = Field(16, ge=1, le=2**31 - 1, description="tokens to generate; with the prompt they must fit "
                                                                "the model's context (checked per request)")
    temperature: float = Field(0.0, ge=0, le=2)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="sampling seed, 0..2**63-1")
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")


class CompletionRequest(_Common):
    prompt: str | list[str]


class Message(Schema):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


@dataclass
class Job:
    prompt_ids: list[int]
    assignment: tuple
    max_tokens: int
    temperature: float
    stops: list[str]
    seed: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # str pieces, then None; or an Exception
    cancelled: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"


class Scheduler:
    """Collects concurrent jobs into batches and decodes them on one worker thread."""

    def __init__(self, engine: MultiLoraModel, max_batch: int = 32, window_s: float = 0.01):
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self.q: queue.Queue[Job] = queue.Queue()
        # tokens: generated for clients; cancelled: sequences dropped from their batch (client gone)
        self.stats = {"batches": 0, "sequences": 0, "max_batch_seen": 0, "tokens": 0, "cancelled": 0}
        threading.Thread(target=self._run, daemon=True, name="workbench-scheduler").start()

    def submit(self, job: Job) -> None:
        self.q.put(job)

    def _run(self) -> None:
        while True:
            jobs = [self.q.get()]
            deadline = time.monotonic() + self.window_s
            while len(jobs) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    jobs.append(self.q.get(timeout=max(left, 0)) if left > 0 else self.q.get_nowait())
                except queue.Empty:
                    break
            jobs = [j for j in jobs if not j.cancelled.is_set()]
            if jobs:
                self._decode(jobs)

    def _decode(self, jobs: list[Job]) -> None:
        self.stats["batches"] += 1
        self.stats["sequences"] += len(jobs)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(jobs))
        tok = self.engine.tokenizer

        def on_token(i: int, t: int) -> bool:
            job = jobs[i]
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                return False
            self.stats["tokens"] += 1
            job.tokens.append(t)
            text = tok.decode(job.tokens, skip_special_tokens=True)
            for s in job.stops:
                cut = text.find(s)
                if cut >= 0:
                    self._emit(job, text[len(job.text):cut])
                    job.text, job.finish_reason = text[:cut], "stop"
                    return False
            if not text.endswith("\ufffd"):  # hold back a partial multi-byte character
                self._emit(job, text[len(job.text):])
                job.text = text
            return True

        try:
            outs = self.engine.generate([j.prompt_ids for j in jobs], [j.assignment for j in jobs],
                                        [j.max_tokens for j in jobs], temperature=[j.temperature for j in jobs],
                                        on_token=on_token, seed=jobs[0].seed)
            for job, toks in zip(jobs, outs):
                if job.finish_reason != "stop":
                    job.finish_reason = "length" if len(toks) >= job.max_tokens else "stop"
                    text = tok.decode(job.tokens, skip_special_tokens=True)
                    self._emit(job, text[len(job.text):])
                    job.text = text
                job.loop.call_soon_threadsafe(job.out.put_nowait, None)
        except Exception as e:  # noqa: BLE001 - every waiting client gets the error, the server lives on
            for job in jobs:
                job.loop.call_soon_threadsafe(job.out.put_nowait, e)

    @staticmethod
    def _emit(job: Job, piece: str) -> None:
        if piece:
            job.loop.call_soon_threadsafe(job.out.put_nowait, piece)


def create_app(engine: MultiLoraModel, *, full_models: Sequence[FullModel] = (), max_batch: int = 32,
               window_s: float = 0.01, context_length: int | None = None) -> FastAPI:
    app = FastAPI(title="Expert Workbench", version="0.1")
    sched = Scheduler(engine, max_batch=max_batch, window_s=window_s)
    full = {f.name: f for f in full_models}
    taken = set(engine.model_names()) & set(full)
    if taken:
        raise WorkbenchError(f"full-model artifacts {sorted(taken)} have the names of the engine's models")
    full_scheds: dict[str, Scheduler] = {}  # one per full model, made when it is first requested
    app.state.scheduler, app.state.full_schedulers = sched, full_scheds

    def ctx_len_of(e: MultiLoraModel) -> int:
        return context_length or int(getattr(e.model.config, "max_position_embeddings", 2048))

    def err(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": type_,
                                                                   "param": param, "code": code}})

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return err(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return err(400, f"malformed JSON body: {first.get('msg')}", code="invalid_json")
        loc = ".".join(str(x) for x in first["loc"] if x != "body")
        return err(400, f"{loc}: {first['msg']}", param=loc or None, code="invalid_parameter")

    @app.get("/v1/models")
    async def models():
        listed = engine.models() + [{"id": f.name, "kind": f.kind} for f in full.values()]
        data = [{**m, "object": "model", "owned_by": "workbench"} for m in listed]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        stats = dict(sched.stats)
        for s in full_scheds.values():
            for k, v in s.stats.items():
                stats[k] = max(stats[k], v) if k == "max_batch_seen" else stats[k] + v
        active = engine.active_sequences + sum(s.engine.active_sequences for s in full_scheds.values())
        return {"status": "ok", **stats, "active_sequences": active, "full_models_loaded": sorted(full_scheds)}

    async def target(model: str) -> tuple[MultiLoraModel, Scheduler]:
        """The engine and scheduler that serve `model`: a full model's own (loaded off the event loop on its
        first request; a load failure answers that request only), else the pool's engine."""
        f = full.get(model) if isinstance(model, str) else None
        if f is None:
            return engine, sched
        if model not in full_scheds:
            try:
                e = await asyncio.to_thread(f.engine)
            except WorkbenchError as err_:
                raise APIError(503, str(err_), type_="server_error", param="model", code="model_unavailable") from None
            if model not in full_scheds:  # checked again after the await: concurrent first requests make one
                full_scheds[model] = Scheduler(e, max_batch=max_batch, window_s=window_s)
        s = full_scheds[model]
        return s.engine, s

    def make_job(req: _Common, prompt_ids: list[int], eng: MultiLoraModel) -> Job:
        try:
            assignment = () if req.model in full else eng.resolve(req.model)
        except UnknownModel as e:
            raise APIError(404, f"{e}; see GET /v1/models", param="model", code="model_not_found") from None
        except WorkbenchError as e:
            raise APIError(400, str(e), param="model", code="invalid_model") from None
        ctx_len = ctx_len_of(eng)
        if len(prompt_ids) + req.max_tokens > ctx_len:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the "
                                f"context length {ctx_len}", param="max_tokens", code="context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return Job(prompt_ids, assignment, req.max_tokens, req.temperature, stops, req.seed or 0,
                   asyncio.get_running_loop(), asyncio.Queue())

    async def collect(job: Job) -> str:
        while True:
            item = await job.out.get()
            if item is None:
                return job.text
            if isinstance(item, Exception):
                raise APIError(500, f"generation failed: {item}", type_="server_error")

    def usage(jobs: list[Job]) -> dict[str, int]:
        p, c = sum(len(j.prompt_ids) for j in jobs), sum(len(j.tokens) for j in jobs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def stream(request: Request, job: Job, chunk):
        try:
            while True:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return
                try:
                    item = await asyncio.wait_for(job.out.get(), timeout=0.5)
                except TimeoutError:
                    continue
                if item is None:
                    yield f"data: {json.dumps(chunk('', job.finish_reason))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if isinstance(item, Exception):
                    yield f"data: {json.dumps({'error': {'message': str(item), 'type': 'server_error'}})}\n\n"
                    return
                yield f"data: {json.dumps(chunk(item, None))}\n\n"
        finally:
            job.cancelled.set()  # the client is gone or done: drop it from its batch

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt: at least one prompt is required", param="prompt")
        eng, sch = await target(req.model)
        jobs = [make_job(req, eng.tokenizer(p, add_special_tokens=ADD_SPECIAL_TOKENS)["input_ids"], eng)
                for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            if len(jobs) != 1:
                raise APIError(400, "stream: streaming takes one prompt", param="stream")
            sch.submit(jobs[0])

            def chunk(text, finish):
                return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                        "choices": [{"index": 0, "text": text, "finish_reason": finish}]}

            return StreamingResponse(stream(request, jobs[0], chunk), media_type="text/event-stream")
        for j in jobs:
            sch.submit(j)
        texts = [await collect(j) for j in jobs]
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": i, "text": t, "finish_reason": j.finish_reason, "logprobs": None}
                            for i, (t, j) in enumerate(zip(texts, jobs))], "usage": usage(jobs)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        eng, sch = await target(req.model)
        job = make_job(req, eng.chat_ids([m.model_dump() for m in req.messages]), eng)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        sch.submit(job)
        if req.stream:
            def chunk(text, finish):
                delta = {"content": text} if text else {}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            return StreamingResponse(stream(request, job, chunk), media_type="text/event-stream")
        text = await collect(job)
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": job.finish_reason}], "usage": usage([job])}

    return app


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


def serve(pool_spec: str, host: str = "127.0.0.1", port: int = 8000, backend: str | None = None,
          device: str = "cpu", max_batch: int = 32) -> None:
    import uvicorn

    from ..pool import Pool

    pool = Pool.open(pool_spec)
    engine = MultiLoraModel.from_pool(pool, backend=backend, device=device)
    full = saved_full_models(pool, set(engine.model_names()), backend=backend, device=device)
    if full:
        print(f"full-model artifacts (loaded on first request): {', '.join(f.name for f in full)}")
    uvicorn.run(create_app(engine, full_models=full, max_batch=max_batch), host=host, port=port, log_level="info")


__all__ = ["APIError", "create_app", "serve", "start_in_thread"]
