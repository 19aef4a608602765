"""Playground: one prompt through several adapters, mixes and routed compositions, streamed.

The prompt is rendered as the evaluation renders a question (`tasks.suite`: the text itself, no special tokens;
the answer follows after " " and ends at a newline, read with surrounding whitespace stripped), so an expert
answers here as it does in its evaluation; the chat template is a toggle. The models decode together through the
serving engine's continuous-batching scheduler (the server's own path): each answer streams in as its tokens come,
with its time to first token and its total time, while the session stays free (a fragment polls); "cancel" ends
every sequence still decoding. Opening the view loads nothing: the pool loads into the engine on "load pool" (once
per app process), or at once on a link `?view=Playground&models=a,b&prompt=...`, which preselects models and prompt."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import streamlit as st

from views.common import _fmt, _pools, pick_source, results_dir, source_view  # noqa: F401
from workbench import catalog
from workbench.errors import WorkbenchError

try:  # the session's start URL (views.common reads it once per session)
    from views.common import url_value
except ImportError:  # pragma: no cover - an older views.common
    def url_value(name: str, default: str | None = None) -> str | None:
        v = st.query_params.get(name)
        return v if isinstance(v, str) and v else default

DEFAULT_PROMPT = "Add: 12+34\nAnswer:"  # a question as the suite's addition task asks it
_LOADED: set[tuple[str, int]] = set()  # (pool root, manifest mtime) whose engine this process has loaded
MAX_NEW_TOKENS = 1024
POLL_S = 0.25  # how often a running generation is redrawn


@st.cache_resource(show_spinner="loading the pool into the serving engine", max_entries=2)
def _engine(pool_root: str, manifest_mtime: int):
    """The pool's serving engine (its LoRA experts, saved mixes and routed compositions), kept while the pool's
    manifest is unchanged."""
    from workbench.pool import Pool
    from workbench.serving.engine import MultiLoraModel

    return MultiLoraModel.from_pool(Pool.open(pool_root), log=lambda m: None)


@st.cache_resource(max_entries=2)
def _scheduler(pool_root: str, manifest_mtime: int):
    """The engine's continuous-batching scheduler (its own decoding thread), shared by every session."""
    from workbench.serving.scheduler import Scheduler

    return Scheduler(_engine(pool_root, manifest_mtime), max_batch=32)


@st.cache_resource
def _event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop on a thread of its own: the scheduler hands each sequence's events to one."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True, name="playground-events").start()
    return loop


@dataclass
class Answer:
    model: str
    text: str = ""
    tokens: int = 0
    state: str = "queued"  # queued | running | done | cancelled | failed
    finish: str | None = None  # stop | length
    ttft_s: float | None = None  # time to first token, from the submission
    total_s: float | None = None
    error: str | None = None


@dataclass
class Generation:
    """One prompt through several models: each model's answer so far, written by the event loop's thread."""

    pool: str
    prompt: str
    chat: bool
    max_tokens: int
    answers: list[Answer]
    started: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    jobs: list = field(default_factory=list)
    future: object = None

    @property
    def finished(self) -> bool:
        return all(a.state in ("done", "cancelled", "failed") for a in self.answers)

    def shown(self, a: Answer) -> str:
        """The answer as the evaluation reads it (whitespace around it stripped), or the chat reply as it is."""
        return a.text if self.chat else a.text.strip()

    def stop(self) -> None:
        self.cancel.set()
        for job in self.jobs:
            job.cancelled.set()


def start_generation(engine, scheduler, loop, pool: str, models: list[str], prompt: str, *, chat: bool,
                     max_tokens: int) -> Generation:
    """Submit one sequence per model to the scheduler (an unknown model raises before any is submitted) and drain
    their events on `loop`; returns at once."""
    from workbench.serving.scheduler import SamplingParams
    from workbench.tasks.suite import encode_text

    assignments = [engine.resolve(m) for m in models]
    ids = engine.chat_ids([{"role": "user", "content": prompt}]) if chat else encode_text(engine.tokenizer, prompt)
    if not ids:
        raise WorkbenchError("the prompt is empty once tokenized")
    # the evaluation's generation: greedy, until the first newline (lm-eval's `until: ["\n"]`); a chat: to EOS
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=() if chat else ("\n",))
    gen = Generation(pool, prompt, chat, max_tokens, [Answer(m) for m in models])
    gen.future = asyncio.run_coroutine_threadsafe(_pump(gen, scheduler, ids, assignments, params), loop)
    return gen


async def _pump(gen: Generation, scheduler, ids: list[int], assignments, params) -> None:
    from workbench.serving.scheduler import Job

    loop = asyncio.get_running_loop()
    pairs = []
    for a, assignment in zip(gen.answers, assignments):
        job = Job(prompt_ids=list(ids), assignment=assignment, params=params, loop=loop, out=asyncio.Queue(),
                  model=a.model)
        try:
            scheduler.submit(job)
        except Exception as e:  # noqa: BLE001 - e.g. its adapter unloaded since it was resolved: this row fails
            a.state, a.error = "failed", str(e).splitlines()[0] if str(e) else type(e).__name__
            continue
        gen.jobs.append(job)
        pairs.append((job, a))
        if gen.cancel.is_set():
            job.cancelled.set()
    await asyncio.gather(*(_drain(gen, job, a) for job, a in pairs))


async def _drain(gen: Generation, job, a: Answer) -> None:
    from workbench.serving.scheduler import Delta, Done, Failed

    a.state = "running"
    while True:
        if gen.cancel.is_set():  # the scheduler drops a cancelled sequence without an event: end it here
            job.cancelled.set()
            a.state, a.total_s = "cancelled", time.monotonic() - gen.started
            return
        try:
            ev = await asyncio.wait_for(job.out.get(), 0.1)
        except TimeoutError:
            continue
        now = time.monotonic()
        if a.ttft_s is None and job.first_token is not None:
            a.ttft_s = job.first_token - job.submitted
        if isinstance(ev, Delta):
            if a.ttft_s is None:
                a.ttft_s = now - gen.started
            a.text += ev.text
            a.tokens = len(job.tokens)
        elif isinstance(ev, Done):
            a.tokens = len(job.tokens)
            a.state, a.finish, a.total_s = "done", ev.finish_reason, now - gen.started
            return
        elif isinstance(ev, Failed):
            a.state, a.error, a.total_s = "failed", ev.message, now - gen.started
            return


def _preselected(names: list[str]) -> tuple[list[str], list[str]]:
    """The link's `models` (comma list) that the pool serves, and those it does not."""
    want = [m.strip() for m in (url_value("models") or "").split(",") if m.strip()]
    return [m for m in want if m in names], [m for m in want if m not in names]


def view_playground(cat: catalog.Catalog) -> None:
    st.header("Playground")
    pools = _pools()
    if not pools:
        st.info("No pool under adapters/ (or $WORKBENCH_POOLS).")
        return
    first = url_value("pool")
    pool = st.selectbox("pool", pools, key="pg-pool",
                        index=pools.index(first) if first in pools else pools.index("demo") if "demo" in pools else 0)
    from workbench.pool import Pool

    try:
        root = Pool.open(pool).root.resolve()
        mtime = (root / "pool.json").stat().st_mtime_ns
    except (WorkbenchError, OSError) as e:
        st.error(str(e).splitlines()[0])
        return
    # loading the pool (the base model, every adapter) takes seconds: on a click, or on a link that names models;
    # once loaded it stays for every session of this app (`_engine` is a shared resource)
    if (str(root), mtime) not in _LOADED and not url_value("models"):
        st.caption(f"The Playground decodes through the serving engine: loading pool `{pool}` reads the base model and "
                   "every adapter, mix and routed composition of the pool (a few seconds, once for every session).")
        if not st.button(f"load pool {pool}", key="pg-load", type="primary"):
            return
    try:
        engine = _engine(str(root), mtime)
    except WorkbenchError as e:
        st.error(str(e))
        return
    _LOADED.add((str(root), mtime))
    names = engine.model_names()
    linked, unknown = _preselected(names)
    if unknown and "pg-models" not in st.session_state:
        st.warning(f"not served by pool {pool}: {', '.join(unknown)}")
    models = st.multiselect("models (one batch, each row its own adapter, mix or router)", names,
                            default=linked or names[: min(3, len(names))], key="pg-models")
    mix = st.text_input("and a mix (optional)", placeholder="mix:addition=0.5,sorting=0.5", key="pg-mix")
    prompt = st.text_area("prompt", value=url_value("prompt") or DEFAULT_PROMPT, key="pg-prompt")
    c1, c2 = st.columns(2)
    max_tokens = c1.number_input("max new tokens", 1, MAX_NEW_TOKENS, 32, key="pg-max")
    chat = c2.checkbox("chat template", value=False, key="pg-chat",
                       help="off: the evaluation's format (the prompt as it is, no special tokens; the answer ends at "
                            "a newline), as every expert was trained and is scored; on: the tokenizer's chat template")
    st.caption("format: " + ("the chat template (a user turn, then the assistant's reply to EOS)" if chat else
                             "the evaluation's (the question's text as the suite asks it, e.g. `Add: 12+34\\nAnswer:`; "
                             "the answer ends at a newline, shown stripped as it is scored)"))
    gen: Generation | None = st.session_state.get("pg-gen")
    b1, b2 = st.columns([1, 6])
    if b1.button("run", key="pg-run", type="primary"):
        want = list(dict.fromkeys([*models, *([mix.strip()] if mix.strip() else [])]))
        if not want or not prompt.strip():
            st.warning("Pick at least one model and type a prompt.")
            return
        if gen is not None and not gen.finished:
            gen.stop()
        try:
            gen = start_generation(engine, _scheduler(str(root), mtime), _event_loop(), pool, want, prompt,
                                   chat=chat, max_tokens=int(max_tokens))
        except (WorkbenchError, ValueError) as e:
            st.error(str(e).splitlines()[0])
            return
        st.session_state["pg-gen"] = gen
    if gen is None or gen.pool != pool:
        return
    if not gen.finished and b2.button("cancel", key="pg-cancel", help="stop every answer still being generated"):
        gen.stop()
    st.session_state["pg-live"] = not gen.finished
    st.fragment(_show_answers, run_every=POLL_S if not gen.finished else None)()


def _show_answers() -> None:
    gen: Generation | None = st.session_state.get("pg-gen")
    if gen is None:
        return
    if gen.finished and st.session_state.get("pg-live"):  # it ended since the page was drawn: redraw it, still
        st.session_state["pg-live"] = False
        st.rerun()
    cols = st.columns(min(len(gen.answers), 4))
    for i, a in enumerate(gen.answers):
        with cols[i % len(cols)], st.container(border=True):
            st.markdown(f"**{a.model}**")
            text = gen.shown(a)
            if a.state == "failed":
                st.error(f"{a.model}: {a.error}")
            else:
                st.text(text or ("(empty answer)" if a.state in ("done", "cancelled") else "…"))
            ttft = "–" if a.ttft_s is None else f"{1000 * a.ttft_s:.0f} ms"
            total = f"{a.total_s:.2f} s" if a.total_s is not None else f"{time.monotonic() - gen.started:.1f} s so far"
            end = {"done": f"ended: {a.finish}", "cancelled": "cancelled", "failed": "failed"}.get(a.state, a.state)
            st.caption(f"first token {ttft} · total {total} · {a.tokens} tokens · {end}")
    if gen.finished:
        spent = max((a.total_s or 0.0) for a in gen.answers)
        st.caption(f"{len(gen.answers)} models in one batch: {spent:.1f} s")
    else:
        st.caption(f"{sum(a.state == 'running' for a in gen.answers)} of {len(gen.answers)} models generating · "
                   f"{time.monotonic() - gen.started:.1f} s")
