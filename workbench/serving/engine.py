"""Batched generation where each sequence names an adapter, a weighted mix, or a routed composition.

`MultiLoraModel` wraps a Hugging Face causal LM's target linears with the one routed-LoRA layer
(`workbench.modules.routed_lora`) and loads a pool's adapters once. Each forward hands the layers
one `RoutingContext`: a `LoraMeta` of fixed pairs (plain adapters, weighted mixes), built once per
batch shape and reused by every layer and every decode step, plus one `RoutedGroup` per routed
composition in the batch (its sequences' token rows, routed per token and per layer by its saved
router). A router callback `router(module_name, x) -> (idx [T, k], w [T, k])` instead routes
every token of the batch (PHATGOOSE/Arrow-style compositions built by hand).

Twin-Merging artifacts over LoRA experts are served the same way: their shared part (task
arithmetic of the experts: a LoRA of rank sum r) and their SVD-compressed exclusive parts are
internal adapters of the engine, and every token of a Twin sequence gets the pairs
(shared, 1) + (exclusive_t, w_t) with w from Twin's router on the prefix mean of the shared
model's last hidden states: a pre-pass over that sequence's rows with the shared pair only,
keeping its own KV cache across decode steps (the artifact's `load_artifact` model computes
the same with the shared delta folded into the base weights).

`generate` decodes one static batch. For continuous batching (`workbench.serving.scheduler`), `prefill`
starts new rows, `decode` advances every row of a `BatchState` by one token, and `select` / `concat` let rows
leave and join between steps (left padding; Twin pre-pass states follow their rows).
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import WorkbenchError, did_you_mean
from ..kernels import LoraMeta, check_backend, default_backend, make_meta
from ..modules.routed_lora import RoutedGroup, RoutedLoraLinear, wrap_model
from ..pool import LoraLayout
from ..tasks.suite import ADD_SPECIAL_TOKENS

log = logging.getLogger("workbench.serving")

Router = Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
MAX_MIX_WEIGHT = 100.0  # |w| of one adapter in a mix: larger weights overflow float32 activations into inf/nan


class UnknownModel(WorkbenchError):
    """A request names a model this engine does not serve."""


@dataclass(frozen=True)
class Routed:
    """A sequence whose tokens are routed by the routed composition `name`."""

    name: str


Assignment = tuple[tuple[int, float], ...] | Routed  # ((adapter id, weight), ...) for one sequence; () = base


class _PairsRouter:
    """Pairs computed before the forward (Twin: per token, the same at every module)."""

    def __init__(self, idx: torch.Tensor, w: torch.Tensor):
        self.idx, self.w = idx, w

    def route(self, module: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] != self.idx.shape[0]:
            raise WorkbenchError(f"twin pairs for {self.idx.shape[0]} tokens, the module sees {x.shape[0]}")
        return self.idx, self.w


class _CallbackRouter:
    """A router callback as the routed layer's router (pairs over the engine's adapter ids)."""

    def __init__(self, fn: Router):
        self.fn = fn

    def route(self, module: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(module, x)


@dataclass
class Adapter:
    name: str
    kind: str  # lora | merged_lora
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(repr=False)  # tensor -> (A, B, scale)
    source: str | None = None  # the PEFT adapter folder it was read from


@dataclass
class RoutedComposition:
    """A saved router over LoRA adapters of the engine (a `routed_lora` artifact)."""

    name: str
    router: Any = field(repr=False)  # workbench.modules.routers.BaseRouter; router.experts name engine adapters
    kind: str  # the router's kind: arrow, phatgoose, ...
    source: str | None = None  # the artifact folder
    adapters: list[Adapter] = field(default_factory=list, repr=False)  # its own experts (SMoRA's ranks), else
    # the router's experts are engine adapters by name


@dataclass
class TwinComposition:
    """A Twin-Merging artifact over LoRA experts of the engine: its router and its parts as LoRA factors."""

    name: str
    router: Any = field(repr=False)  # workbench.modules.routers.TwinRouter
    shared: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(repr=False)  # tensor -> (A, B, 1)
    exclusive: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = field(repr=False)  # per expert
    source: str | None = None  # the artifact folder


class MultiLoraModel:
    """A base model with every adapter of a pool (and saved LoRA and routed compositions) loaded once."""

    def __init__(self, base_model, tokenizer, adapters: list[Adapter], *, routed: Sequence[RoutedComposition] = (),
                 twins: Sequence[TwinComposition] = (), backend: str | None = None, device: str = "cpu",
                 dtype=torch.float32):
        self.model = base_model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.adapters = list(adapters)
        self.ids = {a.name: i for i, a in enumerate(self.adapters)}  # what requests may name
        self.routed = {c.name: c for c in routed}
        self.device, self.dtype = torch.device(device), dtype
        self.twins = {c.name: c for c in twins}
        from ..methods.twin import cache_kwarg

        self._cache_kw = cache_kwarg(self.model.base_model)  # the Twin pre-pass's decoder call
        self._lm_cache_kw = cache_kwarg(self.model)  # the model's own (`cache` in newer transformers)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._twin_ids: dict[str, torch.Tensor] = {}  # twin -> adapter ids [shared, exclusive_1..E]
        for c in twins:
            c.router.to(self.device)
            if c.name in self.ids or c.name in self.routed:
                raise WorkbenchError(f"twin composition {c.name!r}: the name is taken")
            first = len(self.adapters)
            self.adapters.append(Adapter(f"{c.name}#shared", "twin_part", c.shared, c.source))
            self.adapters += [Adapter(f"{c.name}#{e}", "twin_part", f, c.source)
                              for e, f in zip(c.router.experts, c.exclusive)]
            self._twin_ids[c.name] = torch.arange(first, len(self.adapters), device=self.device)
        self._experts = {}  # routed composition -> [E_router] adapter ids of its router's experts
        for c in routed:
            if c.adapters:  # its own experts (SMoRA's rank-1 adapters), appended like Twin's parts
                if len(c.adapters) != len(c.router.experts):
                    raise WorkbenchError(f"routed composition {c.name!r}: {len(c.adapters)} adapters for "
                                         f"{len(c.router.experts)} router experts")
                first = len(self.adapters)
                self.adapters += c.adapters
                self._experts[c.name] = torch.arange(first, len(self.adapters), device=self.device)
                continue
            missing = [e for e in c.router.experts if e not in self.ids]
            if missing:
                raise WorkbenchError(f"routed composition {c.name!r} routes over {missing}, which are not loaded")
            self._experts[c.name] = torch.tensor([self.ids[e] for e in c.router.experts], device=self.device)
        self.lock = threading.Lock()  # one forward at a time (the context is per model)
        self.active_sequences = 0  # sequences still decoding in running `generate` calls
        self._active_lock = threading.Lock()
        targets = sorted({t for a in self.adapters for t in a.factors})
        self.ctx = wrap_model(self.model, targets, lambda t: [a.factors.get(t) for a in self.adapters],
                              len(self.adapters),
                              backend=check_backend(backend) if backend else default_backend(device))
        self._layout_cache: dict[tuple, tuple[LoraMeta | None, list[RoutedGroup]]] = {}

    @classmethod
    def from_pool(cls, pool, experts: list[str] | None = None, *, include_artifacts: bool = True,
                  backend: str | None = None, device: str = "cpu", dtype=torch.float32,
                  log: Callable[[str], Any] = print) -> MultiLoraModel:
        """The pool's LoRA experts (all, or `experts`), and with `include_artifacts` the saved LoRA compositions
        and routed compositions built over this pool (a routed one whose experts are not loaded is skipped: `log`)."""
        names = experts if experts is not None else pool.names("lora")
        adapters = []
        for n in names:
            e = pool.expert(n)
            adapters.append(Adapter(n, "lora", {t: e.lora_factors(t) for t in e.delta_names()}, str(e.path)))
        routed: list[RoutedComposition] = []
        twins: list[TwinComposition] = []
        if include_artifacts:
            taken = {a.name for a in adapters}
            adapters += saved_lora_compositions(pool, taken=taken, log=log)
            routed = saved_routed_compositions(pool, set(names), taken=taken, device=device, log=log)
            twins = saved_twin_compositions(pool, set(names), taken=taken, log=log)
            routed += saved_smora_compositions(pool, taken=taken, device=device, log=log)
        return cls(pool.base.load(), pool.base.tokenizer(), adapters, routed=routed, twins=twins, backend=backend,
                   device=device, dtype=dtype)

    # -- specs
    def model_names(self) -> list[str]:
        return ["base", *self.ids, *self.routed, *self.twins]

    def models(self) -> list[dict[str, str]]:
        """What /v1/models lists: id and kind (and a routed composition's router kind) of every servable model."""
        return ([{"id": "base", "kind": "base"}] + [{"id": n, "kind": self.adapters[i].kind} for n, i in self.ids.items()]
                + [{"id": c.name, "kind": "routed_lora", "router": c.kind} for c in self.routed.values()]
                + [{"id": c.name, "kind": "routed_lora", "router": "twin"} for c in self.twins.values()])

    def resolve(self, spec: str | dict[str, float]) -> Assignment:
        """'base', an adapter name, a routed composition's name, 'mix:a=0.5,b=0.5', or {name: weight}; each mix
        weight finite with |w| <= MAX_MIX_WEIGHT (a WorkbenchError names the bad one)."""
        if isinstance(spec, dict):
            items = list(spec.items())
        elif spec == "base":
            return ()
        elif spec in self.routed or spec in self.twins:
            return Routed(spec)
        elif spec.startswith("mix:"):
            items = []
            for part in spec[4:].split(","):
                name, _, w = part.partition("=")
                try:
                    items.append((name.strip(), float(w) if w else 1.0))
                except ValueError:
                    raise WorkbenchError(f"invalid mix weight in {spec!r}") from None
        else:
            items = [(spec, 1.0)]
        out = []
        for name, w in items:
            if not isinstance(w, (int, float)) or not math.isfinite(w) or abs(w) > MAX_MIX_WEIGHT:
                raise WorkbenchError(f"mix weight of {name!r} is {w!r}: each weight must be a finite number in "
                                     f"[-{MAX_MIX_WEIGHT:g}, {MAX_MIX_WEIGHT:g}]")
            if not name:
                raise WorkbenchError(f"a mix names no adapter in {spec!r}: write 'mix:a=0.5,b=0.5'")
            if name in self.routed or name in self.twins:
                raise WorkbenchError(f"routed composition {name!r} cannot be part of a mix: request it alone")
            if name not in self.ids:
                raise UnknownModel(f"unknown model {name!r}{did_you_mean(name, self.model_names())}")
            out.append((self.ids[name], float(w)))
        return tuple(out)

    def _layout(self, assignments: Sequence[Assignment], seq_len: int) -> tuple[LoraMeta | None, list[RoutedGroup]]:
        """(fixed pairs of every token [B*S], one routed group per routed composition) of a [B, S] batch, computed
        once per batch shape: a prefill and its decode steps ([B, 1]) each get their own token rows."""
        key = (tuple(assignments), seq_len)
        if key not in self._layout_cache:
            if len(self._layout_cache) > 64:
                self._layout_cache.clear()
            fixed = [() if isinstance(a, Routed) else a for a in assignments]  # routed sequences: no fixed pairs
            k = max((len(a) for a in fixed), default=0)
            meta = None
            if k:
                idx = torch.full((len(fixed), k), -1, dtype=torch.long)
                w = torch.zeros((len(fixed), k))
                for b, a in enumerate(fixed):
                    for j, (e, wt) in enumerate(a):
                        idx[b, j], w[b, j] = e, wt
                # every token of sequence b carries its sequence's pairs ([B, S] flattened row-major)
                idx = idx.repeat_interleave(seq_len, dim=0).to(self.device)
                w = w.repeat_interleave(seq_len, dim=0).to(self.device)
                meta = make_meta(idx, w, len(self.adapters), block=seq_len)
            groups = []
            for name in dict.fromkeys(a.name for a in assignments if isinstance(a, Routed) and a.name in self.routed):
                seqs = torch.tensor([b for b, a in enumerate(assignments) if a == Routed(name)])
                rows = (seqs[:, None] * seq_len + torch.arange(seq_len)).reshape(-1).to(self.device)  # [n * S]
                groups.append(RoutedGroup(self.routed[name].router, rows, self._experts[name]))
            self._layout_cache[key] = (meta, groups)
        return self._layout_cache[key]

    # -- forward and generation
    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, assignments: Sequence[Assignment] | None = None,
                router: Router | None = None, twin_states: dict[str, Any] | None = None, **kw):
        """One forward of a batch, each sequence with its assignment. `twin_states` carries the Twin pre-passes'
        KV caches and prefix sums across the decode steps of one `generate` (a fresh dict per batch)."""
        with self.lock:
            if router is not None:
                meta, groups = None, [RoutedGroup(_CallbackRouter(router), None)]
            else:
                assignments = assignments or [()] * input_ids.shape[0]
                meta, groups = self._layout(assignments, input_ids.shape[1])
                unknown = [a.name for a in assignments if isinstance(a, Routed) and a.name not in self.routed
                           and a.name not in self.twins]
                if unknown:
                    raise UnknownModel(f"unknown routed composition {unknown[0]!r}")
                if any(isinstance(a, Routed) and a.name in self.twins for a in assignments):
                    groups = groups + self._twin_groups(input_ids, attention_mask, kw.get("position_ids"),
                                                        kw.get("past_key_values"), assignments, twin_states)
            if "past_key_values" in kw and self._lm_cache_kw != "past_key_values":
                kw[self._lm_cache_kw] = kw.pop("past_key_values")
            with self.ctx.use(meta=meta, groups=groups):
                return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)

    def _twin_groups(self, input_ids, attention_mask, position_ids, cache, assignments, states) -> list[RoutedGroup]:
        """Per Twin composition in the batch: the pre-pass of its sequences through the shared model (its own KV
        cache in `states`), their tokens' routing weights, and the group giving each token its pairs."""
        from ..methods.twin import _Prefix, prefix_means

        if states is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise WorkbenchError("twin compositions decode with a KV cache inside `generate` only")
            states = {}
        s = input_ids.shape[1]
        groups = []
        for name in dict.fromkeys(a.name for a in assignments if isinstance(a, Routed) and a.name in self.twins):
            seqs = torch.tensor([i for i, a in enumerate(assignments) if a == Routed(name)], device=self.device)
            if name not in states:
                from transformers import DynamicCache

                states[name] = _Prefix(DynamicCache(config=self.model.config) if cache is not None else None)
            state = states[name]
            ids = self._twin_ids[name]
            n = len(seqs)
            sub_ids = input_ids.index_select(0, seqs)
            sub_mask = attention_mask.index_select(0, seqs) if attention_mask is not None else None
            sub_pos = position_ids.index_select(0, seqs) if position_ids is not None else None
            shared = make_meta(ids[:1].expand(n * s), None, len(self.adapters), block=s)
            with self.ctx.use(meta=shared):  # the shared model: base + the shared part
                h = self.model.base_model(input_ids=sub_ids, attention_mask=sub_mask, position_ids=sub_pos,
                                          use_cache=state.cache is not None,
                                          **{self._cache_kw: state.cache}).last_hidden_state.float()
            w = self.twins[name].router.token_weights(prefix_means(h, sub_ids, sub_mask, state)).reshape(n * s, -1)
            pair_w = torch.cat([torch.ones(n * s, 1, device=w.device), w], 1)
            rows = (seqs[:, None] * s + torch.arange(s, device=self.device)).reshape(-1)
            groups.append(RoutedGroup(_PairsRouter(ids.expand(n * s, -1), pair_w), rows, None))
        return groups

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], assignments: Sequence[Assignment], max_new_tokens: Sequence[int] | int,
                 *, temperature: Sequence[float] | float = 0.0, stop_ids: set[int] | None = None,
                 router: Router | None = None, on_token: Callable[[int, int], bool] | None = None,
                 seed: int = 0) -> list[list[int]]:
        """Left-padded batched decoding with a KV cache; greedy where temperature is 0.

        on_token(i, token) is called for every new token of sequence i; returning False stops
        that sequence (e.g. a stop string or a client gone). Returns the new tokens per sequence.
        """
        from transformers import DynamicCache

        b = len(prompts)
        max_new = [max_new_tokens] * b if isinstance(max_new_tokens, int) else list(max_new_tokens)
        temps = [temperature] * b if isinstance(temperature, (int, float)) else list(temperature)
        stop_ids = stop_ids if stop_ids is not None else {self.tokenizer.eos_token_id}
        ids, mask, pos = self._left_padded(prompts)
        cache = DynamicCache(config=self.model.config)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out: list[list[int]] = [[] for _ in range(b)]
        done = [m <= 0 for m in max_new]
        live = self._count_active(done.count(False))
        step_ids = ids
        twin_states: dict[str, Any] = {}  # Twin pre-passes' own caches and prefix sums, for this batch only
        try:
            while not all(done):
                logits = self.forward(step_ids, attention_mask=mask, assignments=assignments, router=router,
                                      twin_states=twin_states, position_ids=pos, past_key_values=cache,
                                      use_cache=True).logits[:, -1].float()
                nxt = logits.argmax(-1)
                for i, t in enumerate(temps):
                    if t > 0 and not done[i]:
                        nxt[i] = torch.multinomial(torch.softmax(logits[i] / t, -1), 1, generator=gen)[0]
                toks = nxt.tolist()
                for i, tok in enumerate(toks):
                    if done[i]:
                        continue
                    if tok in stop_ids:
                        done[i] = True
                        continue
                    out[i].append(tok)
                    if on_token is not None and on_token(i, tok) is False:
                        done[i] = True
                    if len(out[i]) >= max_new[i]:
                        done[i] = True
                live += self._count_active(done.count(False) - live)  # a finished sequence leaves the count
                step_ids = nxt[:, None]
                mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=mask.device)], dim=1)
                pos = pos[:, -1:] + 1
        finally:
            self._count_active(-live)
        return out

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids [B, S] left-padded with the pad token, their attention mask and position ids (0 at each
        prompt's first real token), on the engine's device."""
        b, s = len(prompts), max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((b, s), pad, dtype=torch.long)
        mask = torch.zeros((b, s), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, s - len(p):] = torch.tensor(p)
            mask[i, s - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    # -- continuous batching: new sequences are prefilled, then join the running rows between decode steps
    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], assignments: Sequence[Assignment], *,
                all_logits: bool = False) -> tuple[torch.Tensor, BatchState]:
        """The prompts' forward (left-padded among themselves), each with its assignment: the logits [B, V] of each
        prompt's last token (with `all_logits`, [B, S, V] of every position, left-padded) and the rows' BatchState,
        ready to `concat` with running rows and to `decode`."""
        from transformers import DynamicCache

        if not prompts or any(len(p) == 0 for p in prompts):
            raise WorkbenchError("prefill needs at least one prompt, each of at least one token")
        ids, mask, pos = self._left_padded(prompts)
        state = BatchState(list(assignments), mask, DynamicCache(config=self.model.config), {})
        keep = {} if all_logits or not self._logits_to_keep else {"logits_to_keep": 1}
        logits = self.forward(ids, attention_mask=mask, assignments=state.assignments, twin_states=state.twins,
                              position_ids=pos, past_key_values=state.cache, use_cache=True, **keep).logits
        for c in state.caches():
            _check_layers(c)
        return (logits.float() if all_logits else logits[:, -1].float()), state

    @torch.no_grad()
    def decode(self, state: BatchState, tokens: Sequence[int]) -> torch.Tensor:
        """One decode step of every row of `state`, row i fed `tokens[i]`: logits [B, V]; the state grows by one
        column. After an error the state is as it was (caches cropped back, Twin sums restored)."""
        if len(tokens) != len(state):
            raise WorkbenchError(f"decode: {len(tokens)} tokens for {len(state)} rows")
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]  # [B, 1]
        pos = state.mask.sum(-1, keepdim=True)  # [B, 1]: each row's real tokens so far, the new token's position
        mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
        sums = {n: (t.total, t.count) for n, t in state.twins.items()}
        try:
            logits = self.forward(ids, attention_mask=mask, assignments=state.assignments, twin_states=state.twins,
                                  position_ids=pos, past_key_values=state.cache, use_cache=True).logits[:, -1].float()
        except BaseException:
            width = state.mask.shape[1]
            for c in state.caches():
                for layer in c.layers:
                    if layer.is_initialized and layer.keys.shape[-2] > width:
                        layer.keys, layer.values = layer.keys[..., :width, :], layer.values[..., :width, :]
            for n, (total, count) in sums.items():
                state.twins[n].total, state.twins[n].count = total, count
            raise
        state.mask = mask
        return logits

    @staticmethod
    def select(state: BatchState, rows: Sequence[int]) -> BatchState:
        """A new BatchState of `state`'s rows `rows` (in that order; rows may leave or be reordered), without the
        leading columns that are padding in every row left. `state` itself is unchanged."""
        idx = torch.tensor(list(rows), dtype=torch.long, device=state.mask.device)
        mask = state.mask.index_select(0, idx)
        width = int(mask.sum(-1).max()) if len(rows) else 0  # real tokens are right-aligned: keep the last `width`
        cut = state.mask.shape[1] - width
        assignments = [state.assignments[r] for r in rows]
        twins = {}
        for name, t in state.twins.items():
            mine = [i for i, a in enumerate(state.assignments) if a == Routed(name)]  # its cache's rows, in order
            where = {r: k for k, r in enumerate(mine)}
            sub = [where[r] for r in rows if r in where]
            if sub:
                sidx = torch.tensor(sub, dtype=torch.long, device=state.mask.device)
                twins[name] = type(t)(_select_cache(t.cache, sidx, cut), t.total.index_select(0, sidx),
                                      t.count.index_select(0, sidx))
        return BatchState(assignments, mask[:, cut:], _select_cache(state.cache, idx, cut), twins)

    @staticmethod
    def concat(states: Sequence[BatchState]) -> BatchState:
        """One BatchState of the rows of `states` in order, each left-padded to the widest (padding is masked)."""
        states = [st for st in states if len(st)]
        if len(states) == 1:
            return states[0]
        if not states:
            raise WorkbenchError("concat needs at least one row")
        width = max(st.mask.shape[1] for st in states)
        pads = [width - st.mask.shape[1] for st in states]
        mask = torch.cat([torch.nn.functional.pad(st.mask, (p, 0)) for st, p in zip(states, pads)], 0)
        twins = {}
        for name in dict.fromkeys(n for st in states for n in st.twins):
            have = [(st.twins[name], p) for st, p in zip(states, pads) if name in st.twins]
            first = have[0][0]
            twins[name] = type(first)(_concat_caches([t.cache for t, _ in have], [p for _, p in have]),
                                      torch.cat([t.total for t, _ in have]), torch.cat([t.count for t, _ in have]))
        return BatchState([a for st in states for a in st.assignments], mask,
                          _concat_caches([st.cache for st in states], pads), twins)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat (the tokenizer's chat template, else `role: content` lines), ready to generate."""
        tok = self.tokenizer
        if tok.chat_template:
            return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"])
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return list(tok(text, add_special_tokens=ADD_SPECIAL_TOKENS)["input_ids"])

    def answer(self, prompt: str, models: Sequence[str], *, max_new_tokens: int = 48, chat: bool = True) -> dict[str, str]:
        """One prompt through several models in one batch (each row its own adapter, mix or router): greedy
        answers by model. An unknown model raises before any decoding."""
        assignments = [self.resolve(m) for m in models]
        ids = (self.chat_ids([{"role": "user", "content": prompt}]) if chat
               else list(self.tokenizer(prompt, add_special_tokens=ADD_SPECIAL_TOKENS)["input_ids"]))
        out = self.generate([ids] * len(models), assignments, max_new_tokens)
        return {m: self.tokenizer.decode(o, skip_special_tokens=True) for m, o in zip(models, out)}

    def _count_active(self, delta: int) -> int:
        """Add `delta` to `active_sequences` (generate calls may run on several threads); returns delta."""
        with self._active_lock:
            self.active_sequences += delta
        return delta


@dataclass
class BatchState:
    """The running rows of a continuous batch between decode steps. Row i decodes with `assignments[i]`; `mask`
    [B, L] marks its real KV-cache columns (real tokens right-aligned, left padding 0); `cache` holds the L columns
    of every layer; `twins` each Twin composition's pre-pass state (its own cache and prefix sums) over that
    composition's rows, in row order."""

    assignments: list[Assignment]
    mask: torch.Tensor = field(repr=False)
    cache: Any = field(repr=False)
    twins: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.assignments)

    def caches(self) -> list[Any]:
        return [self.cache] + [t.cache for t in self.twins.values() if t.cache is not None]


def _check_layers(cache) -> None:
    """Rows join and leave by slicing and padding each layer's keys/values: plain full-attention layers only."""
    from transformers.cache_utils import DynamicLayer

    odd = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if odd:
        raise WorkbenchError(f"continuous batching needs full-attention KV cache layers, this model has {sorted(odd)}")


def _select_cache(cache, idx: torch.Tensor, cut: int):
    """A new cache of `cache`'s batch rows `idx` without its first `cut` columns."""
    from transformers import DynamicCache

    out = DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, idx)[..., cut:, :],
                                        layer.values.index_select(0, idx)[..., cut:, :]) for layer in cache.layers])
    return out


def _concat_caches(caches: Sequence[Any], pads: Sequence[int]):
    """One cache of the rows of `caches`, each left-padded with `pads` zero columns (masked out by the caller)."""
    from transformers import DynamicCache

    def padded(t: torch.Tensor, p: int) -> torch.Tensor:  # [B, H, L, D] -> [B, H, p + L, D]
        return torch.nn.functional.pad(t, (0, 0, p, 0)) if p else t

    layers = zip(*(c.layers for c in caches))
    return DynamicCache(ddp_cache_data=[(torch.cat([padded(layer.keys, p) for layer, p in zip(ls, pads)]),
                                         torch.cat([padded(layer.values, p) for layer, p in zip(ls, pads)]))
                                        for ls in layers])


def _built_over(meta: dict[str, Any], pool, pool_key: str) -> bool:
    """Whether an artifact was built over this pool: at this path, or (the cache is shared by checkouts) over
    this pool in another checkout: a pool of the same name and base whose experts it was built from have the
    same files as this pool's. Another pool that happens to hold the same experts does not list it."""
    if meta.get(pool_key) == str(pool.root.resolve()):
        return True
    files = meta.get("expert_files")
    if not files or Path(str(meta.get(pool_key) or "")).name != pool.root.resolve().name \
            or meta.get("pool_fingerprint") != pool.manifest.base.fingerprint:
        return False
    return all(e in pool and pool.expert(e).entry.files == f for e, f in files.items())


def _pool_artifacts(pool, type_: str, pool_key: str, taken: set[str]) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """(served name, folder, meta) of each `type_` artifact built over this pool (here or in another checkout:
    `_built_over`), in name order: a recipe's artifact by its latest recipe name; where several carry one name
    (a recipe rebuilt with other parameters, here or in another checkout) the one built here, then the newest;
    bare sweep points ("name@point") and taken names stay out."""
    import json

    from ..io import artifacts_dir

    root = artifacts_dir()
    if not root.is_dir():
        return
    here = str(pool.root.resolve())
    found: dict[str, tuple[tuple[bool, float], Path, dict[str, Any]]] = {}
    for meta_path in sorted(root.glob("*/artifact.json")):
        try:
            meta = json.loads(meta_path.read_text())
            mtime = meta_path.stat().st_mtime
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(meta, dict) or meta.get("type") != type_ or not _built_over(meta, pool, pool_key):
            continue
        built = (meta.get(pool_key) == here, mtime)
        names = [n for n in (meta.get("names") or [meta.get("name", meta_path.parent.name)]) if "@" not in n]
        if names and names[-1] not in taken and (names[-1] not in found or built > found[names[-1]][0]):
            found[names[-1]] = (built, meta_path.parent, meta)
    for name in sorted(found):
        yield name, found[name][1], found[name][2]


def routed_artifacts(pool) -> list[tuple[str, Path]]:
    """(name, folder) of the routed compositions built over this pool (load one with `artifacts.load_artifact`)."""
    return [(name, folder) for name, folder, _ in _pool_artifacts(pool, "routed_lora", "pool_root", set())]


def saved_lora_compositions(pool, taken: set[str], log: Callable[[str], Any] = print) -> list[Adapter]:
    """merged_lora artifacts built over this pool (re-factored merges), servable as adapters; a folder that
    does not parse is skipped with its reason logged (one bad artifact never stops the server)."""
    out = []
    for name, folder, _ in _pool_artifacts(pool, "merged_lora", "pool", taken):
        # the pool's own LoRA parser: rsLoRA, rank and alpha patterns scale exactly as PEFT does
        try:
            layout = LoraLayout(folder, pool.base.tensors.shapes, f"saved composition {name!r} ({folder})")
        except WorkbenchError as e:
            log(f"not served: {e}")
            continue
        factors = {t: (layout.weights.get(a).float(), layout.weights.get(b).float(), scale)
                   for t, (a, b, scale) in layout.modules.items()}
        out.append(Adapter(name, "merged_lora", factors, str(folder)))
        taken.add(name)
    return out


def saved_routed_compositions(pool, loaded: set[str], taken: set[str], device: str = "cpu",
                              log: Callable[[str], Any] = print) -> list[RoutedComposition]:
    """routed_lora artifacts built over this pool whose experts are all among the `loaded` LoRA experts,
    unchanged since the router was built; any other is skipped with its reason logged."""
    from ..methods.routing import routed_problem
    from ..modules.routers import load_router

    out = []
    for name, folder, meta in _pool_artifacts(pool, "routed_lora", "pool_root", taken):
        experts = list(meta.get("experts") or [])
        missing = [e for e in experts if e not in loaded]
        router = None
        if not experts or missing:
            reason = f"its experts {missing or experts} are not LoRA experts loaded here"
        else:
            reason = routed_problem(pool, meta)
            if not reason:
                try:
                    router = load_router(folder, device)
                except (WorkbenchError, OSError) as e:
                    reason = f"cannot load its router: {e}"
                else:
                    reason = routed_problem(pool, meta, router)
        if reason:
            log(f"routed composition {name!r} ({folder}) not served: {reason}")
            continue
        out.append(RoutedComposition(name, router, meta.get("router_kind", router.name), str(folder)))
        taken.add(name)
    return out


def saved_smora_compositions(pool, taken: set[str], device: str = "cpu",
                             log: Callable[[str], Any] = print) -> list[RoutedComposition]:
    """SMoRA artifacts trained over this pool's base: each a routed composition over its own R rank-1 adapters
    (the multi-LoRA op dispatches each token's k ranks); one that does not fit is skipped with its reason logged."""
    from ..methods.smora import smora_problem
    from ..modules.routers import load_router

    out = []
    for name, folder, meta in _pool_artifacts(pool, "smora", "pool_root", taken):
        reason, router = smora_problem(pool, meta), None
        if not reason:
            try:
                router = load_router(folder, device)
            except (WorkbenchError, OSError) as e:
                reason = f"cannot load its router: {e}"
        if router is not None and not reason:
            per_module = {f"{m}.weight": router.lora_factors(m) for m in router.dims}
            parts = [{t: f[j] for t, f in per_module.items()} for j in range(router.rank)]
            reason = _factor_shape_problem(pool, parts[:1])
        if reason:
            log(f"SMoRA composition {name!r} ({folder}) not served: {reason}")
            continue
        adapters = [Adapter(f"{name}#rank{j}", "smora_rank", part, str(folder)) for j, part in enumerate(parts)]
        out.append(RoutedComposition(name, router, "smora", str(folder), adapters))
        taken.add(name)
    return out


class FullModel:
    """A full-model artifact built over the pool (a merged model, an upcycled MoE): another network than the
    base, so it gets its own engine (no adapters), loaded on its first request and kept."""

    FULL_TYPES = ("merged_model", "moe")

    def __init__(self, name: str, kind: str, folder: Path, meta: dict[str, Any], *, backend: str | None = None,
                 device: str = "cpu", dtype=torch.float32):
        self.name, self.kind, self.folder, self.meta = name, kind, folder, meta
        self.backend, self.device, self.dtype = backend, device, dtype
        self._engine: MultiLoraModel | None = None
        self._failed: str | None = None  # why it could not be loaded (not retried: the folder is broken)
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def engine(self) -> MultiLoraModel:
        """Its engine, loading the artifact the first time (one load even under concurrent first requests)."""
        with self._lock:
            if self._engine is None and self._failed is None:
                from ..artifacts import load_artifact

                try:
                    lm = load_artifact(self.folder, device=self.device)
                    self._engine = MultiLoraModel(lm.model, lm.tokenizer, [], backend=self.backend,
                                                  device=self.device, dtype=self.dtype)
                except Exception as e:  # a broken folder (any library's error) fails this model only (logged)
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    self._failed = f"model {self.name!r} ({self.kind}) could not be loaded: {type(e).__name__}: {first}"
                    log.error("%s (%s); its requests answer 503 until the server restarts", self._failed,
                              self.folder, exc_info=e)
            if self._engine is None:
                raise WorkbenchError(self._failed)
            return self._engine


def saved_full_models(pool, taken: set[str], *, backend: str | None = None, device: str = "cpu",
                      dtype=torch.float32) -> list[FullModel]:
    """The full-model artifacts (merged models, upcycled MoEs) built over this pool, by recipe name; names
    already taken (experts, compositions) stay out. Nothing is loaded until a request names one."""
    out = []
    for kind in FullModel.FULL_TYPES:
        for name, folder, meta in _pool_artifacts(pool, kind, "pool", taken):
            out.append(FullModel(name, kind, folder, meta, backend=backend, device=device, dtype=dtype))
            taken.add(name)
    return sorted(out, key=lambda f: f.name)


def _factor_shape_problem(pool, parts: list[dict[str, tuple]]) -> str | None:
    """Why LoRA factors (module -> (A [r, in], B [out, r], scale)) do not fit the pool's base, or None."""
    shapes = pool.base.tensors.shapes
    for part in parts:
        for module, (a, b, _) in part.items():
            want = shapes.get(module) or shapes.get(f"{module}.weight")  # keys are tensor names ("....weight")
            if want is None:
                return f"its module {module!r} is not in the base"
            if (b.shape[0], a.shape[1]) != tuple(want) or a.shape[0] != b.shape[1]:
                return (f"its factors for {module!r} are {tuple(b.shape)} x {tuple(a.shape)}, "
                        f"not [{want[0]}, r] x [r, {want[1]}]")
    return None


def saved_twin_compositions(pool, loaded: set[str], taken: set[str],
                            log: Callable[[str], Any] = print) -> list[TwinComposition]:
    """Twin artifacts built over this pool from LoRA experts that are all among the `loaded` ones, unchanged
    since the build; any other is skipped with its reason logged."""
    from ..methods.routing import routed_problem
    from ..methods.twin import twin_factors
    from ..modules.routers import load_router

    out = []
    for name, folder, meta in _pool_artifacts(pool, "twin", "pool", taken):
        experts = list(meta.get("experts") or [])
        missing = [e for e in experts if e not in loaded]
        if not experts or missing:
            reason = f"its experts {missing or experts} are not LoRA experts loaded here"
        elif meta.get("expert_files") is None:
            reason = "built before artifacts recorded their experts' files; rebuild it (`workbench merge --force`)"
        elif not (reason := routed_problem(pool, meta)):  # another base, or experts changed since the build
            try:
                router = load_router(folder)
                shared, exclusive = twin_factors(folder)
            except (WorkbenchError, OSError) as e:
                reason = str(e)
            else:
                reason = (routed_problem(pool, meta, router)
                          or (f"its exclusive parts are {len(exclusive)}, not one per expert {experts}"
                              if len(exclusive) != len(experts) else None)
                          or _factor_shape_problem(pool, [shared, *exclusive]))
        if reason:
            log(f"twin composition {name!r} ({folder}) not served: {reason}")
            continue
        out.append(TwinComposition(name, router, shared, exclusive, str(folder)))
        taken.add(name)
    return out


def top_k_router(weights_fn: Callable[[str, torch.Tensor], torch.Tensor], k: int) -> Router:
    """A router callback from per-token scores [T, E]: top-k, softmax-renormalised over the k."""

    def route(name: str, x: torch.Tensor):
        scores = weights_fn(name, x)
        top = scores.topk(k, dim=-1)
        return top.indices, torch.softmax(top.values, dim=-1)

    return route


@torch.no_grad()
def peft_alone(base, adapters: dict[str, str], requests: Sequence[tuple[str, str]], max_new_tokens: int) -> list[str]:
    """Greedy text of each (model, prompt) generated alone (batch 1) through PEFT: the reference
    the server must match. `model` is a key of `adapters` (name -> PEFT adapter folder) or "base"."""
    from peft import PeftModel

    tok = base.tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    names = sorted({m for m, _ in requests if m != "base"}) or list(adapters)[:1]
    pm = PeftModel.from_pretrained(base.load(), adapters[names[0]], adapter_name=names[0], is_trainable=False)
    for n in names[1:]:
        pm.load_adapter(adapters[n], adapter_name=n, is_trainable=False)
    pm.eval()
    memo: dict[tuple[str, str], str] = {}
    for model, prompt in requests:
        if (model, prompt) in memo:
            continue
        enc = tok(prompt, return_tensors="pt", add_special_tokens=ADD_SPECIAL_TOKENS).to(pm.device)
        kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad}
        if model == "base":
            with pm.disable_adapter():
                out = pm.generate(**enc, **kw)
        else:
            pm.set_adapter(model)
            out = pm.generate(**enc, **kw)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        memo[(model, prompt)] = tok.decode(new, skip_special_tokens=True)
    return [memo[r] for r in requests]


__all__ = ["Adapter", "Assignment", "BatchState", "FullModel", "MultiLoraModel", "Routed", "RoutedComposition", "RoutedLoraLinear", "Router",
           "TwinComposition", "UnknownModel", "peft_alone", "saved_full_models", "saved_lora_compositions", "saved_routed_compositions",
           "saved_smora_compositions", "saved_twin_compositions", "top_k_router"]
