"""Continuous batching: requests join the running batch at any decode step and leave it when done.

One worker thread per engine runs the loop: admit what arrived (up to `max_batch` rows, `max_prefill_tokens`
padded prompt tokens per prefill), prefill the newcomers (their first token), append their rows to the running
`BatchState`, then decode one token for every row. A sequence leaves its row as soon as it is finished, stopped
or cancelled, so a short request never waits for a long one. Each sequence samples with its own state
(`SamplingParams`: temperature, top_p, penalties, stop strings, max tokens, and a `torch.Generator` seeded by
its own seed), so its text does not depend on its batch neighbours. Text is detokenised incrementally
(`Detokenizer`: whole characters only, never a piece of a UTF-8 character), and logprobs carry each token's own
bytes (`TokenTexts`). A failure of one sequence (while sampling,
detokenising, or in a forward that fails for its row alone) ends that sequence with an error, logged with its
traceback; the others go on. With `admission="static"` new requests wait until the running batch is empty:
the batching this server had before, kept for `workbench bench serve` to compare.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..tokens import byte_of
from .engine import AdapterUnavailable, Assignment, BatchState, MultiLoraModel

log = logging.getLogger("workbench.serving")

GREEDY_BELOW = 1e-5  # a temperature under this decodes greedily (logits / 1e-308 overflow to inf, then nan)
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # stop strings per request, characters per stop string (OpenAI's 4)
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's chat bound; completions allow 5)
SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.Generator.manual_seed takes as a signed 64-bit seed


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence decodes; checked on construction (the HTTP schema checks the same bounds first)."""

    max_tokens: int
    temperature: float = 0.0  # 0 (or < GREEDY_BELOW): greedy
    top_p: float = 1.0  # nucleus: sample among the most likely tokens whose probabilities sum to top_p
    seed: int | None = None  # None: a random seed of its own
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated at least once
    frequency_penalty: float = 0.0  # times the count of each token generated so far, subtracted from its logit
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of them (not included)
    logprobs: int | None = None  # per generated token its logprob and this many top alternatives; None: none
    prompt_logprobs: bool = False  # the prompt's tokens' logprobs too (echo)
    ignore_eos: bool = False  # decode through the end-of-sequence token up to max_tokens (vLLM's; for benchmarks)

    def __post_init__(self):
        checks = [("max_tokens", isinstance(self.max_tokens, int) and 0 <= self.max_tokens <= 2**31 - 1,
                   "an integer >= 0 (0: nothing generated, the prompt's logprobs only)"),
                  ("temperature", _finite(self.temperature) and 0 <= self.temperature <= 2, "a number in [0, 2]"),
                  ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
                  ("seed", self.seed is None or (isinstance(self.seed, int) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
                   "a signed 64-bit integer"),
                  ("presence_penalty", _finite(self.presence_penalty) and abs(self.presence_penalty) <= 2, "a number in [-2, 2]"),
                  ("frequency_penalty", _finite(self.frequency_penalty) and abs(self.frequency_penalty) <= 2, "a number in [-2, 2]"),
                  ("stop", len(self.stop) <= MAX_STOPS and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
                   f"at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters"),
                  ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
                   f"an integer in [0, {MAX_TOP_LOGPROBS}]"),
                  ("ignore_eos", isinstance(self.ignore_eos, bool), "true or false")]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)!r}: {want}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def plain(self) -> bool:
        """Greedy with nothing to compute per row: the batch's argmax is its token."""
        return self.greedy and not self.presence_penalty and not self.frequency_penalty and self.logprobs is None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass(frozen=True)
class TopLogprob:
    """A token and its logprob: `token` is its own bytes as UTF-8 text, or OpenAI's "bytes:\\xNN..." where they
    are not valid UTF-8 alone (a piece of a character); `raw` its bytes (chat's `bytes`)."""

    id: int
    token: str
    raw: bytes
    logprob: float | None  # None: an echoed prompt's first token (nothing before it)


@dataclass(frozen=True)
class TokenLogprob(TopLogprob):
    """One token's logprob (the model's distribution, before temperature, top_p and penalties), its top
    alternatives (most likely first) and `offset`: the characters of its sequence's text before it (incremental
    detokenisation: the tokens of a character split over several all sit at that character's offset)."""

    top: tuple[TopLogprob, ...] = ()
    offset: int = 0


@dataclass(frozen=True)
class Delta:
    """New text of a sequence (never a partial stop string) and the logprobs of the tokens it consumed."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Done:
    finish_reason: str  # stop | length


@dataclass(frozen=True)
class Failed:
    message: str  # one line; the traceback is in the server's log


@dataclass(eq=False)
class Job:
    """One sequence: what the request asked, then its decoding state (owned by the scheduler thread)."""

    prompt_ids: list[int]
    assignment: Assignment
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # Delta ..., then Done or Failed
    model: str = ""  # the requested model's name (metrics, logs)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # decoding state
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # text sent to the client so far
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    pending: int | None = None  # last sampled token, not yet fed to the model
    error: str | None = None
    generator: torch.Generator | None = field(default=None, repr=False)
    counts: torch.Tensor | None = field(default=None, repr=False)  # [V] generated token counts (penalties)
    detok: Detokenizer | None = field(default=None, repr=False)
    decoded: str = ""  # the generated text so far (complete characters; `text` is what of it was sent)
    lp_sent: int = 0
    arrived: float | None = None  # when the request arrived (before tokenising; the TTFT's start)
    submitted: float = 0.0  # when it was handed to the scheduler (the queue time's start)
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    held: bool = False  # the engine keeps its adapters (`MultiLoraModel.hold`) until it is closed
    acquired: bool = False  # its adapters are in kernel slots, not evictable, until it is closed
    waited_for_slot: bool = False  # it could not be admitted at once: its adapters' slots were all in use
    passed: int = 0  # jobs admitted past it while it waited for a slot (bounded: `Scheduler._admit`)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Scheduler:
    """Continuous batching of `Job`s over one engine, on one worker thread."""

    def __init__(self, engine: MultiLoraModel, max_batch: int = 32, window_s: float = 0.01, *,
                 admission: str = "continuous", max_prefill_tokens: int = 8192, metrics: Any = None):
        if admission not in ("continuous", "static"):
            raise ValueError(f"admission = {admission!r}: continuous or static")
        if not (isinstance(max_batch, int) and 1 <= max_batch <= 4096):
            raise ValueError(f"max_batch = {max_batch!r}: an integer in 1..4096")
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self.admission, self.max_prefill_tokens, self.metrics = admission, max_prefill_tokens, metrics
        self.q: queue.Queue[Job] = queue.Queue()
        self.waiting: deque[Job] = deque()  # taken from `q`, not admitted yet (batch full, prefill budget spent)
        # batches: prefills; sequences: admitted; tokens: generated for clients; cancelled: left (client gone);
        # failed: sequences ended by an error; max_batch_seen: most rows decoded together; joined_running and
        # left_running: sequences that joined rows already decoding, that left while other rows went on decoding;
        # slot_waits: sequences that waited for an adapter slot (each counted once)
        self.stats = {"batches": 0, "sequences": 0, "max_batch_seen": 0, "tokens": 0, "cancelled": 0, "failed": 0,
                      "joined_running": 0, "left_running": 0, "slot_waits": 0}
        self.running: list[Job] = []
        self.admitted: list[Job] = []
        self.state: BatchState | None = None
        self.eos = engine.tokenizer.eos_token_id
        self.texts = TokenTexts(engine.tokenizer)
        # the engine's adapter cache (`MultiLoraModel`): an engine without one (a test's stub) skips these steps
        self._hold, self._acquire = getattr(engine, "hold", None), getattr(engine, "acquire", None)
        self._prefetch = getattr(engine, "prefetch", None)  # paged adapters: read while their requests queue
        threading.Thread(target=self._loop, daemon=True, name="workbench-scheduler").start()

    def submit(self, job: Job) -> None:
        """Queue `job`; UnknownModel when its adapter was unloaded since its request resolved it."""
        if self._hold is not None:
            self._hold(job.assignment)
            job.held = True
        if self._prefetch is not None:
            self._prefetch(job.assignment)
        job.submitted = time.monotonic()
        if job.arrived is None:
            job.arrived = job.submitted
        if job.params.seed is not None or not job.params.greedy:
            job.generator = torch.Generator().manual_seed(job.params.seed if job.params.seed is not None
                                                          else secrets.randbits(63))
        self.q.put(job)

    @property
    def queued(self) -> int:
        return self.q.qsize() + len(self.waiting)

    # -- the loop
    def _loop(self) -> None:
        while True:
            try:
                self._step()
            except Exception:  # a bug outside any one sequence: fail the running and admitted ones, go on
                hit = [j for j in dict.fromkeys(self.running + self.admitted) if not j.finished]
                log.exception("scheduler step failed; failing its %d sequences", len(hit))
                for job in hit:
                    self._fail(job, "the server's scheduler failed (see its log)", logged=True)
                self._set_rows([], None)

    def _step(self) -> None:
        self.admitted = self._admit()  # jobs being prefilled: neither waiting nor running until they join
        if self.admitted:
            self._prefill(self.admitted)
        self.admitted = []
        if self.running:
            self._decode()

    def _admit(self) -> list[Job]:
        """Jobs to prefill now: blocks while nothing runs (then waits `window_s` for more to come together)."""
        if self.admission == "static" and self.running:
            return []
        room = self.max_batch - len(self.running)
        if room <= 0:
            return []
        if not self.running and not self.waiting:
            self.waiting.append(self.q.get())
            deadline = time.monotonic() + self.window_s
            while len(self.waiting) < room:
                left = deadline - time.monotonic()
                try:
                    self.waiting.append(self.q.get(timeout=left) if left > 0 else self.q.get_nowait())
                except queue.Empty:
                    break
        while True:
            try:
                self.waiting.append(self.q.get_nowait())
            except queue.Empty:
                break
        jobs: list[Job] = []
        longest = 0
        blocked: Job | None = None  # the first job waiting for a slot: it takes the next one that frees
        keep: deque[Job] = deque()
        for job in self.waiting:
            if job.cancelled.is_set():  # anywhere in the line: it leaves it, its holds released
                self.stats["cancelled"] += 1
                self._close(job, None)
                continue
            if len(jobs) >= room:
                keep.append(job)
                continue
            longest_then = max(longest, len(job.prompt_ids))
            if jobs and longest_then * (len(jobs) + 1) > self.max_prefill_tokens:  # left-padded prefill size
                room = len(jobs)  # the prefill is full: the rest wait in order
                keep.append(job)
                continue
            try:
                ready = self._acquire is None or (self._pass(job, blocked) if blocked is not None
                                                  else self._acquire(job.assignment))
            except AdapterUnavailable as e:  # its paged adapter's files could not be read: this request fails
                self._fail(job, str(e), logged=True)  # the prefetch thread logged its traceback
                continue
            except Exception as e:  # noqa: BLE001 - loading its adapter into a slot failed: this request, no other
                self._fail(job, f"its adapter could not be loaded into a kernel slot: {_first_line(e)}", e)
                continue
            if not ready:
                # every slot it could use is used by running sequences (or is the first waiting job's next)
                if not job.waited_for_slot:
                    job.waited_for_slot = True
                    self.stats["slot_waits"] += 1
                blocked = blocked or job
                keep.append(job)
                continue
            job.acquired = self._acquire is not None
            jobs.append(job)
            longest = longest_then
        self.waiting = keep
        if not jobs and not self.running and self.waiting:
            time.sleep(0.002)  # slots held by another thread's `generate`: do not spin
        now = time.monotonic()
        for job in jobs:
            job.admitted = now
            if self.metrics is not None:
                self.metrics.admitted(job, now - job.submitted)
        return jobs

    def _pass(self, job: Job, blocked: Job) -> bool:
        """Admit `job` before `blocked` (an earlier job waiting for a slot), its adapters acquired, when it takes no
        slot (the base, a composition's pinned parts), or uses adapters already resident only and `blocked` has
        been passed fewer than `max_batch` times; never when it would load an adapter (the next slot that frees
        is `blocked`'s: slot loads keep their order). So base and resident-adapter requests do not wait behind a
        request for a slot, and the bound lets the resident adapters drain so that the waiting one gets its slot."""
        if not self.engine.needs(job.assignment):
            return self._acquire(job.assignment)
        if blocked.passed >= self.max_batch or not self._acquire(job.assignment, load=False):
            return False
        blocked.passed += 1
        return True

    def _prefill(self, jobs: list[Job]) -> None:
        """Prefill `jobs` (those asking for prompt logprobs each alone: every position's logits), sample their
        first tokens, and append the rows still decoding to the running batch."""
        plain = [j for j in jobs if not j.params.prompt_logprobs]
        groups = ([plain] if plain else []) + [[j] for j in jobs if j.params.prompt_logprobs]
        for group in groups:
            for part in self._prefill_isolated(group):
                self.stats["batches"] += 1
                self.stats["sequences"] += len(part[0])
                self._join(*part)

    def _prefill_isolated(self, jobs: list[Job]) -> list[tuple[list[Job], torch.Tensor, BatchState]]:
        """(jobs, logits, state) of the prefill of `jobs`; when the batch's forward fails, each job alone, and
        a job whose forward fails alone ends with that error."""
        all_logits = any(j.params.prompt_logprobs for j in jobs)
        try:
            logits, state = self.engine.prefill([j.prompt_ids for j in jobs], [j.assignment for j in jobs],
                                                all_logits=all_logits)
            return [(jobs, logits, state)]
        except Exception as e:  # noqa: BLE001 - find the sequence that fails
            if len(jobs) == 1:
                self._fail(jobs[0], f"prefill failed: {type(e).__name__}: {_first_line(e)}", exc=e)
                return []
        return [part for j in jobs for part in self._prefill_isolated([j])]

    def _join(self, jobs: list[Job], logits: torch.Tensor, state: BatchState) -> None:
        last = logits[:, -1] if logits.dim() == 3 else logits  # [B, V]
        if logits.dim() == 3:
            for i, job in enumerate(jobs):
                if job.params.prompt_logprobs:
                    self._guarded(job, self._prompt_logprobs, job, logits[i])
        for job in jobs:
            if job.params.max_tokens == 0 and not job.finished:  # scoring the prompt only (echo)
                self._finish(job, "length")
        self._advance(jobs, last)
        keep = [i for i, j in enumerate(jobs) if not j.finished and not j.cancelled.is_set()]
        for i, j in enumerate(jobs):
            if not j.finished and j.cancelled.is_set():
                self.stats["cancelled"] += 1
                self._close(j, None)
        if not keep:
            return
        state = state if len(keep) == len(jobs) else self.engine.select(state, keep)
        if self.running:
            self.stats["joined_running"] += len(keep)
        rows = self.running + [jobs[i] for i in keep]
        self._set_rows(rows, state if self.state is None else self.engine.concat([self.state, state]))

    def _decode(self) -> None:
        """One token for every running row; finished, failed and cancelled rows leave the batch."""
        gone = [i for i, j in enumerate(self.running) if j.cancelled.is_set()]
        if gone:
            self.stats["cancelled"] += len(gone)
            for i in gone:
                self._close(self.running[i], None)
            self._keep([i for i in range(len(self.running)) if i not in set(gone)])
            if not self.running:
                return
        jobs, state = self.running, self.state
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(jobs))
        if self.metrics is not None:
            self.metrics.batch(len(jobs))
        try:
            logits = self.engine.decode(state, [j.pending for j in jobs])
        except Exception:  # noqa: BLE001 - the step failed: decode each row alone to find the failing ones
            logits, state = self._decode_isolated(jobs, state)
            if state is None:
                self._set_rows([], None)
                return
            jobs = [j for j in jobs if not j.finished]
            self._set_rows(jobs, state)
        self._advance(jobs, logits)
        keep = [i for i, j in enumerate(jobs) if not j.finished]
        if len(keep) < len(jobs):
            self._keep(keep)

    def _decode_isolated(self, jobs: list[Job], state: BatchState) -> tuple[torch.Tensor | None, BatchState | None]:
        rows, parts = [], []
        for i, job in enumerate(jobs):
            one = self.engine.select(state, [i])
            try:
                rows.append(self.engine.decode(one, [job.pending]))
                parts.append(one)
            except Exception as e:  # noqa: BLE001 - this row fails alone: it ends, the others go on
                self._fail(job, f"decoding failed: {type(e).__name__}: {_first_line(e)}", exc=e)
        if not parts:
            return None, None
        return torch.cat(rows), self.engine.concat(parts)

    def _keep(self, keep: list[int]) -> None:
        rows = [self.running[i] for i in keep]
        if rows:
            self.stats["left_running"] += len(self.running) - len(rows)
        self._set_rows(rows, self.engine.select(self.state, keep) if rows else None)

    def _set_rows(self, rows: list[Job], state: BatchState | None) -> None:
        self.engine._count_active(len(rows) - len(self.running))
        self.running, self.state = rows, state

    # -- sampling, text, events (per sequence)
    def _advance(self, jobs: list[Job], logits: torch.Tensor) -> None:
        """Sample each job's next token from its row of `logits` [B, V] and send what it adds."""
        finite = torch.isfinite(logits).all(-1).tolist()
        argmax = logits.argmax(-1).tolist()
        for i, job in enumerate(jobs):
            if job.finished:
                continue
            if not finite[i]:
                self._fail(job, "the model produced non-finite logits for this request")
                continue
            self._guarded(job, self._next, job, logits[i], argmax[i])

    def _guarded(self, job: Job, fn: Callable, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - this sequence ends with the error, the batch goes on
            self._fail(job, f"{type(e).__name__}: {_first_line(e)}", exc=e)

    def _next(self, job: Job, row: torch.Tensor, argmax: int) -> None:
        p = job.params
        if p.plain:
            tok = argmax
        else:
            if (p.presence_penalty or p.frequency_penalty) and job.counts is None:
                job.counts = torch.zeros_like(row)
            tok = choose_token(row, p, job.counts, job.generator)
        now = time.monotonic()
        if job.first_token is None:
            job.first_token = now
            if self.metrics is not None:
                self.metrics.first_token(job, now - job.arrived)
        elif self.metrics is not None:
            self.metrics.inter_token(job, now - job.last_token)
        job.last_token = now
        if tok == self.eos and not p.ignore_eos:
            self._finish(job, "stop")
            return
        job.tokens.append(tok)
        self.stats["tokens"] += 1
        if self.metrics is not None:
            self.metrics.token(job)
        if job.counts is not None:
            job.counts[tok] += 1
        if job.detok is None:
            job.detok = Detokenizer(self.engine.tokenizer)
        offset = len(job.decoded)
        job.decoded += job.detok.add(tok)
        if p.logprobs is not None:
            job.logprobs.append(self._token_logprob(row, tok, p.logprobs, offset))
        job.pending = tok
        self._text(job)
        if not job.finished and len(job.tokens) >= p.max_tokens:
            self._finish(job, "length")

    def _text(self, job: Job) -> None:
        """Send the text the new token completes (`job.decoded` holds complete characters only: never a partial
        UTF-8 character) but not the start of a stop string; at a stop string, the text before it, and the sequence
        ends."""
        text = job.decoded
        stops = job.params.stop
        if stops:
            start = max(0, len(job.text) - max(len(s) for s in stops))
            cuts = [c for c in (text.find(s, start) for s in stops) if c >= 0]
            if cuts:
                cut = max(min(cuts), len(job.text))
                self._send(job, text[len(job.text):cut], final=True)
                self._finish(job, "stop", send_rest=False)
                return
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._send(job, text[len(job.text):len(text) - hold])

    def _send(self, job: Job, piece: str, final: bool = False) -> None:
        lps = tuple(job.logprobs[job.lp_sent:])
        if piece or (final and lps):
            job.text += piece
            job.lp_sent = len(job.logprobs)
            self._put(job, Delta(piece, lps))

    def _finish(self, job: Job, reason: str, send_rest: bool = True) -> None:
        if send_rest:  # the text held back (a possible stop string's start) and bytes of no complete character
            self._send(job, job.decoded[len(job.text):] + (job.detok.flush() if job.detok else ""), final=True)
        job.finish_reason = reason
        self._close(job, Done(reason))

    def _fail(self, job: Job, message: str, exc: BaseException | None = None, logged: bool = False) -> None:
        job.error = message
        self.stats["failed"] += 1
        if not logged:
            log.error("request for model %r failed: %s", job.model, message, exc_info=exc)
        self._close(job, Failed(message))

    def _close(self, job: Job, event: Done | Failed | None) -> None:
        if job.acquired:
            job.acquired = False
            self.engine.release(job.assignment)
        if job.held:
            job.held = False
            self.engine.unhold(job.assignment)
        if event is not None:
            self._put(job, event)
        if self.metrics is not None:
            self.metrics.finished(job, "cancelled" if event is None else
                                  "error" if isinstance(event, Failed) else event.finish_reason)

    @staticmethod
    def _put(job: Job, event) -> None:
        try:
            job.loop.call_soon_threadsafe(job.out.put_nowait, event)
        except RuntimeError:  # the client's event loop is closed: nobody listens
            job.cancelled.set()

    def _token_logprob(self, row: torch.Tensor, tok: int, top: int, offset: int) -> TokenLogprob:
        lp = torch.log_softmax(row.float(), -1)
        alts = ()
        if top:
            v, i = lp.topk(top)
            alts = tuple(TopLogprob(t, *self.texts[t], float(x)) for t, x in zip(i.tolist(), v.tolist()))
        return TokenLogprob(tok, *self.texts[tok], float(lp[tok]), alts, offset)

    def _prompt_logprobs(self, job: Job, logits: torch.Tensor) -> None:
        """Logprobs of the prompt's tokens from the prefill's logits [S, V] (left-padded): the first has none;
        offsets count the characters of the prompt's tokens decoded (special tokens included)."""
        ids, s = job.prompt_ids, logits.shape[0]
        first = s - len(ids)
        detok, offset = Detokenizer(self.engine.tokenizer, skip_special_tokens=False), 0
        out = [TokenLogprob(ids[0], *self.texts[ids[0]], None, (), 0)]
        offset += len(detok.add(ids[0]))
        for k in range(1, len(ids)):
            out.append(self._token_logprob(logits[first + k - 1], ids[k], job.params.logprobs or 0, offset))
            offset += len(detok.add(ids[k]))
        job.prompt_logprobs = out


def choose_token(row: torch.Tensor, p: SamplingParams, counts: torch.Tensor | None,
                 generator: torch.Generator | None) -> int:
    """The next token of a sequence from its logits `row` [V]: the penalties over its generated token `counts`, then
    greedy (temperature under GREEDY_BELOW) or a draw at `p.temperature` within the nucleus `p.top_p` from its own
    `generator`."""
    x = row
    if p.presence_penalty or p.frequency_penalty:
        x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(x.dtype)
    if p.greedy:
        return int(x.argmax())
    return _sample(x.cpu() / p.temperature, p.top_p, generator)


class Detokenizer:
    """Incremental detokenisation (as vLLM and TGI do it): `add(token)` gives the text the token completes, decoded
    over a window that starts one complete token back (so a tokenizer that drops a leading space or merges across
    tokens decodes as over the whole sequence). Only whole characters are given: while the window ends in an
    incomplete UTF-8 character (U+FFFD) the characters before it are given and the rest waits for its next bytes.
    `flush()` gives what is left (bytes of no complete character)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0  # the window's start; the end of its tokens whose text is complete
        self.given = 0  # characters of the window's text given so far

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip) if ids else ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        now = self._decode(self.ids[self.prefix:])
        complete = not now.endswith("\ufffd")
        stable = now if complete else now.rstrip("\ufffd")
        piece = stable[self.given:] if len(stable) > self.given else ""
        self.given += len(piece)
        if complete:  # the window moves on: its tokens so far become the next window's context
            self.prefix, self.read = self.read, len(self.ids)
            self.given = len(self._decode(self.ids[self.prefix:]))
        return piece

    def flush(self) -> str:
        now = self._decode(self.ids[self.prefix:])
        piece = now[self.given:]
        self.prefix = self.read = len(self.ids)
        self.given = 0
        return piece


_BYTE_OF = byte_of()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens


class TokenTexts:
    """Each token's own bytes (byte-level BPE: its vocabulary string through the byte decoder; SentencePiece:
    `▁` as a space, `<0xNN>` as that byte; added and special tokens: their content; other tokenizers: the token
    decoded alone) and its text for logprobs (the bytes as UTF-8, else OpenAI's "bytes:\\xNN..."); cached by id."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        try:  # the decoder's JSON: {"type": "ByteLevel", ...}, a Sequence of Replace("▁", " "), ByteFallback, ...
            state = json.dumps(json.loads(decoder.__getstate__()), ensure_ascii=False) if decoder is not None else ""
        except Exception:  # noqa: BLE001 - an unusual decoder: tokens decoded alone
            state = ""
        self.byte_level = '"ByteLevel"' in state
        self.metaspace = "\u2581" in state
        self.added = set(getattr(tokenizer, "added_tokens_decoder", {}) or ())
        self._cache: dict[int, tuple[str, bytes]] = {}

    def raw(self, token: int) -> bytes:
        piece = self.tok.convert_ids_to_tokens(token)
        if isinstance(piece, str) and token not in self.added:
            if self.byte_level and all(c in _BYTE_OF for c in piece):
                return bytes(_BYTE_OF[c] for c in piece)
            if (m := _BYTE_FALLBACK.fullmatch(piece)) is not None:
                return bytes([int(m.group(1), 16)])
            if self.metaspace:
                return piece.replace("\u2581", " ").encode()
        elif isinstance(piece, str):
            return piece.encode()
        return self.tok.decode([token]).encode()

    def __getitem__(self, token: int) -> tuple[str, bytes]:
        """(text, bytes) of `token`."""
        if token not in self._cache:
            raw = self.raw(token)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            if len(self._cache) > 1_000_000:
                self._cache.clear()
            self._cache[token] = (text, raw)
        return self._cache[token]


def _sample(x: torch.Tensor, top_p: float, generator: torch.Generator) -> int:
    """One token from logits `x` [V] (already divided by the temperature), nucleus-truncated to `top_p`."""
    probs = torch.softmax(x.float(), -1)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # a token stays while the mass before it is under top_p
        keep[0] = True  # the most likely always (a top_p below float32's smallest number compares as 0)
        sorted_p = torch.where(keep, sorted_p, 0.0)
        return int(order[torch.multinomial(sorted_p, 1, generator=generator)[0]])
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


__all__ = ["GREEDY_BELOW", "Delta", "Detokenizer", "Done", "Failed", "Job", "SamplingParams", "Scheduler",
           "TokenLogprob", "TokenTexts", "TopLogprob", "choose_token"]
