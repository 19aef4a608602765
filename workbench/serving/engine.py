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
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import WorkbenchError, did_you_mean
from ..kernels import LoraMeta, check_backend, default_backend, make_meta
from ..modules.routed_lora import RoutedGroup, RoutedLoraLinear, routed_modules, wrap_model
from ..pool import LoraLayout
from ..tasks.suite import ADD_SPECIAL_TOKENS

log = logging.getLogger("workbench.serving")

Router = Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
MAX_LOADED_ADAPTERS = 4096  # --max-loaded-adapters: kernel slots for servable adapters
MAX_REGISTERED_ADAPTERS = 4096  # servable adapters registered at once (loaded at start or at run time)
DEFAULT_REGISTERED_ADAPTERS = 1024  # the default bound on them (--max-registered-adapters)
MAX_COMPOSITION_PARTS = 65536  # pinned composition parts (Twin's, SMoRA's) in kernel slots at once
DEFAULT_COMPOSITION_PARTS = 1024  # the default bound on them (a SMoRA composition pins 64)
MAX_HOST_ADAPTERS = 65536  # paged adapters staged in host memory at once (--max-host-adapters)
MAX_MIX_WEIGHT = 100.0  # |w| of one adapter in a mix: larger weights overflow float32 activations into inf/nan


def _int_in(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


class AdapterUnavailable(WorkbenchError):
    """A paged adapter's files could not be read when a request needed it (that request fails; a later one retries)."""


class UnknownModel(WorkbenchError):
    """A request names a model this engine does not serve."""


class ModelExists(WorkbenchError):
    """A model of that name is already served."""


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
    files: dict[str, str] | None = None  # file -> sha256 of the folder's kept files (a pool entry's `files`): what
    # a routed composition's `expert_files` must match for it to route over this adapter
    loader: Callable[[], dict[str, tuple[torch.Tensor, torch.Tensor, float]]] | None = field(default=None, repr=False)
    # a paged adapter (a pool served under a slot cap): reads its factors from disk; `factors` is empty while it is
    # neither in a kernel slot nor staged in host memory


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
    """A base model with every adapter of a pool (and saved LoRA and routed compositions) loaded once.

    Adapters live in a registry (ids stable for the engine's life); the routed layers hold kernel *slots*.
    Composition parts (Twin's shared and exclusive parts, SMoRA's ranks) are pinned: always in a slot. The
    servable adapters (pool experts, saved LoRA compositions, adapters loaded at run time) are resident in a slot
    while `max_loaded_adapters` allows (None: all of them); beyond it their factors stay on the CPU and a request
    that needs one loads it into a slot at admission (`acquire`), evicting the least recently used adapter that no
    admitted sequence uses. A slot's factors are rewritten in place, layer by layer (`AdapterWeights.set_slot`);
    a batch's rows carry their pairs as adapter ids (`RowPairs`: built once when rows are prefilled, sliced when rows
    leave, concatenated when rows join), mapped to slots in one gather when the rows or the slot table change
    (`_layout`, cached in the rows' `BatchState` across decode steps)."""

    def __init__(self, base_model, tokenizer, adapters: list[Adapter], *, routed: Sequence[RoutedComposition] = (),
                 twins: Sequence[TwinComposition] = (), backend: str | None = None, device: str = "cpu",
                 dtype=torch.float32, max_loaded_adapters: int | None = None, pool: Any = None,
                 log: Callable[[str], Any] = print, max_registered_adapters: int = DEFAULT_REGISTERED_ADAPTERS,
                 max_composition_parts: int = DEFAULT_COMPOSITION_PARTS, max_host_adapters: int | None = None):
        if max_host_adapters is not None and not _int_in(max_host_adapters, 0, MAX_HOST_ADAPTERS):
            raise WorkbenchError(f"max_host_adapters = {max_host_adapters!r}: an integer in 0..{MAX_HOST_ADAPTERS} "
                                 "(or None: paged adapters stay in host memory once read)")
        if max_loaded_adapters is not None and not _int_in(max_loaded_adapters, 1, MAX_LOADED_ADAPTERS):
            raise WorkbenchError(f"max_loaded_adapters = {max_loaded_adapters!r}: an integer in "
                                 f"1..{MAX_LOADED_ADAPTERS} (or None: every adapter stays loaded)")
        if not _int_in(max_registered_adapters, 1, MAX_REGISTERED_ADAPTERS):
            raise WorkbenchError(f"max_registered_adapters = {max_registered_adapters!r}: an integer in "
                                 f"1..{MAX_REGISTERED_ADAPTERS}")
        if not _int_in(max_composition_parts, 0, MAX_COMPOSITION_PARTS):
            raise WorkbenchError(f"max_composition_parts = {max_composition_parts!r}: an integer in "
                                 f"0..{MAX_COMPOSITION_PARTS}")
        if len(adapters) > max_registered_adapters:
            raise WorkbenchError(f"{len(adapters)} adapters to serve, at most {max_registered_adapters} "
                                 "(max_registered_adapters)")
        self.max_registered, self.max_parts = max_registered_adapters, max_composition_parts
        self.model = base_model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.pool = pool  # what adapters loaded at run time are validated against (None: no run-time loads)
        self.max_loaded = max_loaded_adapters
        self.device, self.dtype = torch.device(device), dtype
        self.adapters: list[Adapter] = []  # the registry: an adapter's id is its index, for the engine's life
        self.ids: dict[str, int] = {}  # what requests may name
        self.routed: dict[str, RoutedComposition] = {}
        self.twins: dict[str, TwinComposition] = {}
        self.pinned: set[int] = set()  # composition parts: always in a slot
        self._parts: dict[str, list[int]] = {}  # composition -> the ids of its own (pinned) parts
        self.retired_compositions: set[str] = set()  # unloaded compositions still held by accepted requests
        self.composition_holds: Counter[str] = Counter()  # accepted requests for each composition
        self._twin_ids: dict[str, torch.Tensor] = {}  # twin -> adapter ids [shared, exclusive_1..E]
        self._experts: dict[str, torch.Tensor] = {}  # routed composition -> [E_router] adapter ids of its experts
        from ..methods.twin import cache_kwarg

        self._cache_kw = cache_kwarg(self.model.base_model)  # the Twin pre-pass's decoder call
        self._lm_cache_kw = cache_kwarg(self.model)  # the model's own (`cache` in newer transformers)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        for a in adapters:
            self._register_adapter(a)
        for c in twins:
            problem = self._parts_problem(c.name, 1 + len(c.exclusive))
            if problem:
                log(f"twin composition {c.name!r} not served: {problem}")
                continue
            self._register_twin(c)
        for c in routed:
            problem = (self._parts_problem(c.name, len(c.adapters)) if c.adapters
                       else self._cap_problem(c.name, [int(i) for i in self._routed_ids(c)]))
            if problem:
                log(f"routed composition {c.name!r} not served: {problem}")
                continue
            self._register_routed(c)
        self.lock = threading.Lock()  # one forward (or slot change) at a time (the context is per model)
        self._slots_lock = threading.RLock()  # the registry's counters (holds, uses, LRU order)
        self.active_sequences = 0  # sequences still decoding in running `generate` calls
        self._active_lock = threading.Lock()
        # paged adapters (a `loader`): read from disk by a prefetch thread when a request for them is queued, kept
        # in host memory (staged) up to `max_host` of them beyond those in slots, least recently used dropped
        self.max_host = max_host_adapters
        self._staged: OrderedDict[int, None] = OrderedDict()  # paged adapters read, not in a slot: LRU order
        self._reading: set[int] = set()  # paged adapters being read by the prefetch thread
        self._read_errors: dict[int, str] = {}  # a failed read, told to the next request that needs it
        self._prefetch_q: queue.Queue[int] = queue.Queue()
        self._prefetcher: threading.Thread | None = None
        # slots: every pinned part, then servable adapters in registry order while the cap allows (paged ones
        # among them read now; the rest of a paged pool is read when requested: a large pool starts at once)
        resident, dynamic, start_reads = [], 0, 0
        for i in range(len(self.adapters)):
            if i in self.pinned or self.max_loaded is None or dynamic < self.max_loaded:
                a = self.adapters[i]
                if a.loader is not None and not a.factors:
                    a.factors = a.loader()
                    start_reads += 1
                resident.append(i)
                dynamic += i not in self.pinned
        self.slot_owner: list[int | None] = list(resident)  # slot -> adapter id (None: free)
        self.slot_of: dict[int, int] = {i: s for s, i in enumerate(resident)}  # resident adapter id -> slot
        self._slot_table = torch.full((max(len(self.adapters), 1),), -1, dtype=torch.long)  # id -> slot (-1: none)
        for i, s_ in self.slot_of.items():
            self._slot_table[i] = s_
        self._slot_table_dev = self._slot_table.to(self.device)
        self._lru: OrderedDict[int, None] = OrderedDict((i, None) for i in resident if i not in self.pinned)
        self.in_use: Counter[int] = Counter()  # admitted sequences using each adapter (never evicted while > 0)
        self.holds: Counter[int] = Counter()  # requests accepted for each adapter (kept after an unload while > 0)
        self.retired: set[int] = set()  # unloaded adapters still held or in use
        # loads: servable adapters written into a slot (those resident from the start included)
        # host_reads: paged adapters read from disk; staged_drops: read ones dropped from host memory (the cap)
        self.counters = {"loads": len(self._lru), "evictions": 0, "runtime_loads": 0, "unloads": 0,
                         "host_reads": start_reads, "staged_drops": 0}
        targets = sorted({t for a in self.adapters for t in a.factors})
        self.ctx = wrap_model(self.model, targets, lambda t: [self.adapters[i].factors.get(t) for i in resident],
                              len(resident), backend=check_backend(backend) if backend else default_backend(device))
        self._layers = {name + ".weight": m for name, m in routed_modules(self.model).items()}
        self._slot_epoch = 0  # bumped when the slot table or the routed compositions change: cached layouts expire
        self._direct_layouts: dict[tuple, tuple[RowPairs, dict]] = {}  # forward() called without a batch's pairs

    # -- the registry
    def _register_adapter(self, a: Adapter, pinned: bool = False) -> int:
        if not pinned and (a.name in self.ids or a.name in self.routed or a.name in self.twins or a.name == "base"):
            raise WorkbenchError(f"model {a.name!r}: the name is taken")
        i = len(self.adapters)
        self.adapters.append(a)
        if hasattr(self, "_slot_table"):
            self._set_table(i, -1)
        if pinned:
            self.pinned.add(i)
        else:
            self.ids[a.name] = i
        return i

    def _register_twin(self, c: TwinComposition) -> None:
        c.router.to(self.device)
        if c.name in self.ids or c.name in self.routed or c.name in self.twins or c.name == "base":
            raise WorkbenchError(f"twin composition {c.name!r}: the name is taken")
        ids = [self._register_adapter(Adapter(f"{c.name}#shared", "twin_part", c.shared, c.source), pinned=True)]
        ids += [self._register_adapter(Adapter(f"{c.name}#{e}", "twin_part", f, c.source), pinned=True)
                for e, f in zip(c.router.experts, c.exclusive)]
        self._twin_ids[c.name] = torch.tensor(ids, device=self.device)
        self._parts[c.name] = ids
        self.twins[c.name] = c

    def _routed_ids(self, c: RoutedComposition) -> torch.Tensor:
        missing = [e for e in c.router.experts if e not in self.ids]
        if missing:
            raise WorkbenchError(f"routed composition {c.name!r} routes over {missing}, which are not loaded")
        return torch.tensor([self.ids[e] for e in c.router.experts], device=self.device)

    def _register_routed(self, c: RoutedComposition) -> None:
        if c.name in self.ids or c.name in self.routed or c.name in self.twins or c.name == "base":
            raise WorkbenchError(f"routed composition {c.name!r}: the name is taken")
        if c.adapters:  # its own experts (SMoRA's rank-1 adapters), pinned like Twin's parts
            if len(c.adapters) != len(c.router.experts):
                raise WorkbenchError(f"routed composition {c.name!r}: {len(c.adapters)} adapters for "
                                     f"{len(c.router.experts)} router experts")
            ids = [self._register_adapter(a, pinned=True) for a in c.adapters]
            self._experts[c.name] = torch.tensor(ids, device=self.device)
            self._parts[c.name] = ids
        else:
            self._experts[c.name] = self._routed_ids(c)
        self.routed[c.name] = c

    def _cap_problem(self, model: str, ids: Sequence[int]) -> str | None:
        """Why `model` (needing the adapters `ids` resident at once) cannot be served under the cap, or None."""
        need = {i for i in ids if i not in self.pinned}
        if self.max_loaded is not None and len(need) > self.max_loaded:
            return (f"{model!r} needs {len(need)} adapters loaded at once, this server keeps at most "
                    f"{self.max_loaded} (--max-loaded-adapters)")
        return None

    def _parts_problem(self, model: str, parts: int) -> str | None:
        """Why a composition of `parts` pinned parts cannot be added (the bound on pinned parts), or None."""
        if len(self.pinned) + parts > self.max_parts:
            return (f"{model!r} pins {parts} composition parts in kernel slots, {len(self.pinned)} are pinned and "
                    f"this server pins at most {self.max_parts} (max_composition_parts)")
        return None

    def needs(self, assignment: Assignment) -> set[int]:
        """The servable (evictable) adapter ids `assignment` needs in a slot while it decodes."""
        if isinstance(assignment, Routed):
            ids = self._experts.get(assignment.name)
            return {int(i) for i in ids.tolist() if int(i) not in self.pinned} if ids is not None else set()
        return {e for e, _ in assignment if e not in self.pinned}

    @property
    def num_slots(self) -> int:
        return len(self.slot_owner)

    def resident(self) -> list[str]:
        """Names of the servable adapters in a slot now."""
        with self._slots_lock:
            return [self.adapters[i].name for i in self.slot_of if i not in self.pinned]

    def _set_table(self, i: int, slot: int) -> None:
        if i >= self._slot_table.numel():
            grown = torch.full((max(2 * self._slot_table.numel(), i + 1),), -1, dtype=torch.long)
            grown[: self._slot_table.numel()] = self._slot_table
            self._slot_table = grown
        self._slot_table[i] = slot
        self._slot_table_dev = self._slot_table.to(self.device)
        self._slot_epoch += 1

    def _write_slot(self, slot: int | None, i: int) -> int:
        """Adapter `i`'s factors into `slot` (None: a new slot) in every routed layer (a module it does not adapt
        gets rank 0 there); returns the slot. Holds `self.lock` (no forward runs)."""
        a = self.adapters[i]
        missing = sorted(set(a.factors) - set(self._layers))
        if missing:
            self._wrap_more(missing)
        p = next(self.model.parameters())
        for t, layer in self._layers.items():
            f = a.factors.get(t)
            d_out, d_in = layer.base.weight.shape
            fa, fb, sc = f if f is not None else (torch.zeros(0, d_in), torch.zeros(d_out, 0), 0.0)
            fa = fa.to(device=p.device, dtype=p.dtype).contiguous()
            fb = fb.to(device=p.device, dtype=p.dtype).contiguous()
            if slot is None:
                layer.weights.add_slot(fa, fb, sc)
            else:
                layer.weights.set_slot(slot, fa, fb, sc)
        if slot is None:
            self.slot_owner.append(i)
            slot = len(self.slot_owner) - 1
            self.ctx.num_adapters = len(self.slot_owner)
        else:
            self.slot_owner[slot] = i
        self.slot_of[i] = slot
        self._set_table(i, slot)
        return slot

    def _wrap_more(self, targets: list[str]) -> None:
        """Wrap base linears no adapter adapted so far (an adapter loaded at run time targets them): every
        current slot holds rank 0 there."""
        from ..kernels import AdapterWeights
        from ..modules.routed_lora import get_module, set_module

        p = next(self.model.parameters())
        for tensor in targets:
            module = tensor[: -len(".weight")]
            lin = get_module(self.model, module)
            d_out, d_in = lin.weight.shape
            n = self.num_slots
            wts = AdapterWeights([p.new_zeros(0, d_in) for _ in range(n)], [p.new_zeros(d_out, 0) for _ in range(n)],
                                 torch.zeros(n, dtype=torch.float32, device=p.device))
            layer = RoutedLoraLinear(lin, wts, self.ctx, module)
            set_module(self.model, module, layer)
            self._layers[tensor] = layer

    def _free_slot(self, i: int, release: bool = False) -> None:
        """Take adapter `i` out of its slot; with `release` the slot's factors become rank 0 in every layer (the
        slot no longer references the adapter's tensors: an unloaded adapter's memory is freed at once, not when
        the slot is reused). Holds `self.lock`."""
        slot = self.slot_of.pop(i)
        self.slot_owner[slot] = None
        self._lru.pop(i, None)
        self._set_table(i, -1)
        if self.adapters[i].loader is not None and not release:
            self._stage(i)
        if release:
            p = next(self.model.parameters())
            for layer in self._layers.values():
                d_out, d_in = layer.base.weight.shape
                layer.weights.set_slot(slot, p.new_zeros(0, d_in), p.new_zeros(d_out, 0), 0.0)

    def _make_resident(self, i: int, keep: set[int], read: bool = False) -> bool:
        """Put adapter `i` in a slot: a free one, a new one (under the cap), or the least recently used idle
        adapter's (not in `keep`). False when every slot is busy. Holds `self.lock` and `_slots_lock`."""
        if i in self.slot_of:
            return True
        if not self._readable(i, read):
            return False
        self._staged.pop(i, None)  # going into a slot: not staged (a victim staged below does not count it)
        dynamic = sum(1 for j in self.slot_of if j not in self.pinned)
        free = [s for s, o in enumerate(self.slot_owner) if o is None]
        if self.max_loaded is None or dynamic < self.max_loaded:
            slot = free[0] if free else None
        else:
            victim = next((j for j in self._lru if self.in_use[j] == 0 and j not in keep), None)
            if victim is None:
                if self.adapters[i].loader is not None:
                    self._stage(i)  # read but not placed: staged again (tracked by the host cap)
                return False
            slot = self.slot_of[victim]
            self._free_slot(victim)
            self.counters["evictions"] += 1
            log.info("adapter %r evicted from slot %d for %r", self.adapters[victim].name, slot, self.adapters[i].name)
        self._write_slot(slot, i)
        self.counters["loads"] += 1
        self._lru[i] = None
        return True

    def acquire(self, assignment: Assignment, load: bool = True, read: bool = False) -> bool:
        """Make every adapter `assignment` needs resident and mark it in use (never evicted until `release`);
        False (nothing marked) when the slots are all used by running sequences: try again later. Without `load`,
        False unless they are all resident already (nothing is loaded or evicted). A paged adapter not in host memory:
        False while the prefetch thread reads it (the caller tries again), or with `read` it is read here, now."""
        need = self.needs(assignment)
        if not need:
            return True
        with self.lock, self._slots_lock:
            if not load and any(i not in self.slot_of for i in need):
                return False
            if not all(self._readable(i, read) for i in need if i not in self.slot_of):
                return False  # a paged adapter is being read: the request waits for it (never fails for it)
            for i in sorted(need, key=lambda j: j in self.slot_of, reverse=True):  # resident ones first: kept
                if not self._make_resident(i, need, read):
                    return False
            for i in need:
                self.in_use[i] += 1
                self._lru.move_to_end(i)
        return True

    def release(self, assignment: Assignment) -> None:
        """Undo one `acquire`: its adapters become evictable once no sequence uses them (least recently used
        first); an unloaded one leaves its slot."""
        need = self.needs(assignment)
        if not need:
            return
        with self.lock, self._slots_lock:
            for i in need:
                self.in_use[i] -= 1
                if self.in_use[i] <= 0:
                    del self.in_use[i]
                    self._finalize(i)

    def _served(self, i: int) -> bool:
        """Whether servable adapter `i` is still served (not unloaded since a request resolved it)."""
        return self.ids.get(self.adapters[i].name) == i

    def hold(self, assignment: Assignment) -> None:
        """Accept a request: keep `assignment`'s adapters (their factors) and composition until `unhold`, even if
        they are unloaded meanwhile (a request accepted before an unload finishes with its adapter). UnknownModel
        when one was unloaded since the request resolved it (it is not accepted: nothing is held)."""
        need = self.needs(assignment)
        with self._slots_lock:
            gone = [self.adapters[i].name for i in need if not self._served(i)]
            if isinstance(assignment, Routed) and (assignment.name in self.retired_compositions or
                                                   (assignment.name not in self.routed
                                                    and assignment.name not in self.twins)):
                gone.insert(0, assignment.name)
            if gone:
                raise UnknownModel(f"model {gone[0]!r} was unloaded")
            for i in need:
                self.holds[i] += 1
            if isinstance(assignment, Routed):
                self.composition_holds[assignment.name] += 1

    def unhold(self, assignment: Assignment) -> None:
        need = self.needs(assignment)
        if not need and not isinstance(assignment, Routed):
            return
        with self.lock, self._slots_lock:
            for i in need:
                self.holds[i] -= 1
                if self.holds[i] <= 0:
                    del self.holds[i]
                    self._finalize(i)
            if isinstance(assignment, Routed):
                name = assignment.name
                self.composition_holds[name] -= 1
                if self.composition_holds[name] <= 0:
                    del self.composition_holds[name]
                    self._finalize_composition(name)
            self._trim_staged()

    # -- paged adapters: read ahead of their requests, staged in host memory
    def prefetch(self, assignment: Assignment) -> None:
        """Start reading the paged adapters `assignment` needs that are neither in a slot nor in host memory (the
        scheduler calls it when a request is queued: its adapter is read while it waits, not when it is admitted)."""
        need = self.needs(assignment)
        with self._slots_lock:
            todo = [i for i in need if self.adapters[i].loader is not None and not self.adapters[i].factors
                    and i not in self._reading and i not in self.slot_of]
            for i in todo:
                self._start_read(i)

    def _start_read(self, i: int) -> None:
        """Queue paged adapter `i` for the prefetch thread (started on first use). Holds `_slots_lock`."""
        self._reading.add(i)
        self._prefetch_q.put(i)
        if self._prefetcher is None:
            self._prefetcher = threading.Thread(target=self._prefetch_loop, daemon=True,
                                                name="workbench-adapter-prefetch")
            self._prefetcher.start()

    def _prefetch_loop(self) -> None:
        while True:
            i = self._prefetch_q.get()
            a = self.adapters[i]
            factors, error = None, None
            try:
                factors = self._read(i)
            except AdapterUnavailable as e:  # a broken file fails the requests for this adapter, no other
                log.exception("paged adapter %r could not be read", a.name)
                error = str(e)
            with self._slots_lock:
                self._reading.discard(i)
                if error is not None:
                    self._read_errors[i] = error
                elif factors is not None and a.loader is not None and not a.factors:
                    a.factors = factors
                    self.counters["host_reads"] += 1
                    self._stage(i)

    def _readable(self, i: int, read: bool = False) -> bool:
        """Whether adapter `i`'s factors are in memory (a paged one not read yet: its read is started, or with
        `read` done here; a failed read raises AdapterUnavailable, once: the next request reads it again)."""
        a = self.adapters[i]
        if a.loader is None or a.factors:
            return True
        error = self._read_errors.pop(i, None)
        if error is not None:
            raise AdapterUnavailable(error)
        if read:
            a.factors = self._read(i)
            self.counters["host_reads"] += 1
            return True
        if i not in self._reading:
            self._start_read(i)
        return False

    def _read(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None:
        """Paged adapter `i`'s factors from disk (None once it is unloaded); AdapterUnavailable (one line) when its
        files cannot be read."""
        loader = self.adapters[i].loader
        if loader is None:
            return None
        try:
            return loader()
        except Exception as e:  # noqa: BLE001 - told as one line
            raise AdapterUnavailable(f"adapter {self.adapters[i].name!r} could not be read from its pool: "
                                     f"{type(e).__name__}: {_first_line(e)}") from e

    def _stage(self, i: int) -> None:
        """Keep paged adapter `i` (read, not in a slot) in host memory, most recently used (`_trim_staged`)."""
        if i in self.slot_of:
            return
        self._staged[i] = None
        self._staged.move_to_end(i)
        self._trim_staged()

    def _trim_staged(self) -> None:
        """Drop the least recently used staged adapters beyond `max_host` (their factors; read again from disk when
        next needed), never one an accepted request still needs (those stay over the cap until they are served:
        host memory is bounded by the cap plus the adapters of the requests in the queue). Holds `_slots_lock`."""
        if self.max_host is None or len(self._staged) <= self.max_host:
            return
        over = len(self._staged) - self.max_host
        for j in list(self._staged):
            if over <= 0:
                break
            if self.holds[j] or j in self.slot_of:
                continue
            del self._staged[j]
            self.adapters[j].factors = {}
            self.counters["staged_drops"] += 1
            over -= 1

    def _finalize(self, i: int) -> None:
        """An unloaded adapter nobody holds or uses any more leaves its slot (released) and drops its factors."""
        if i in self.retired and not self.in_use[i] and not self.holds[i]:
            self.in_use.pop(i, None)
            self.holds.pop(i, None)
            if i in self.slot_of:
                self._free_slot(i, release=True)
            self.adapters[i].factors = {}
            self.adapters[i].loader = None
            self._staged.pop(i, None)
            self.retired.discard(i)

    def _finalize_composition(self, name: str) -> None:
        """An unloaded composition no accepted request holds any more: its router goes, its own parts leave their
        slots (released) and drop their factors."""
        if name not in self.retired_compositions or self.composition_holds[name]:
            return
        self.composition_holds.pop(name, None)
        self.retired_compositions.discard(name)
        self.routed.pop(name, None)
        self.twins.pop(name, None)
        self._experts.pop(name, None)
        self._twin_ids.pop(name, None)
        for i in self._parts.pop(name, []):
            if i in self.slot_of:
                self._free_slot(i, release=True)
            self.pinned.discard(i)
            self.adapters[i].factors = {}
        self._slot_epoch += 1

    def _slots(self, ids: torch.Tensor) -> torch.Tensor:
        slots = self._slot_table_dev[ids]
        if bool((slots < 0).any()):
            missing = [self.adapters[int(i)].name for i, s_ in zip(ids.tolist(), slots.tolist()) if s_ < 0]
            raise WorkbenchError(f"adapters {missing} are not loaded in a slot: requests load them at admission")
        return slots

    # -- adapters loaded and unloaded at run time
    def load_adapter(self, name: str, path: str | Path) -> dict[str, str]:
        """Serve the adapter in `path` under `name` from now on: a PEFT LoRA folder, validated exactly as
        `Pool.add` validates an expert (its folder, safetensors only, shapes and target modules against the base,
        finite weights, the base it names), or a saved composition's artifact folder (merged_lora, routed_lora,
        twin, smora) built over this base, checked as the server checks those it finds at start (a routed one only
        over the very adapters its router was built over: their files' digests). `path` is absolute or relative to
        the server's working directory (`~` is not expanded). Returns its /v1/models card. ModelExists for a taken
        name, WorkbenchError (one line) for a folder it refuses or a bound it would pass (max_registered_adapters,
        max_composition_parts); nothing changes then."""
        from ..artifacts import ARTIFACT_FILE, read_artifact_meta
        from ..io import sha256_file
        from ..pool import check_name, detect_kind

        if self.pool is None:
            raise WorkbenchError("this engine was not made from a pool: there is no base to validate adapters against")
        check_name(name, "model name")
        self._check_free(name)
        shown = str(path) if len(str(path)) <= 200 else str(path)[:197] + "..."
        if str(path).startswith("~"):
            raise WorkbenchError(f"lora_path {shown}: `~` is not expanded by the server; give an absolute path, or "
                                 "one relative to the server's working directory")
        folder = Path(path)
        if not folder.is_dir():
            raise WorkbenchError(f"lora_path {shown} is not a folder")
        folder = folder.resolve()
        what = f"adapter {shown}"
        register: Callable[[], Any]
        try:
            if (folder / ARTIFACT_FILE).is_file():
                register = self._artifact_registration(name, folder, read_artifact_meta(folder), what)
            else:
                try:
                    if detect_kind(folder) != "lora":
                        raise WorkbenchError(f"{what} is a full model folder (config.json), not a LoRA adapter: add "
                                             "it to the pool, or build a composition of it")
                    checked = self.pool._checked(folder, "lora", allow_distant=False)  # `workbench pool add`'s checks
                    layout = LoraLayout(folder, self.pool.base.tensors.shapes, what)
                    factors = {t: (layout.weights.get(a).float(), layout.weights.get(b).float(), scale)
                               for t, (a, b, scale) in layout.modules.items()}
                    files = {f: sha256_file(checked.source / f) for f in checked.files}
                except WorkbenchError as e:
                    msg = str(e).replace(f"expert source {folder}", what)
                    raise WorkbenchError(msg.replace("; add it anyway with allow_distant=True (CLI: "
                                                     "--allow-distant-base)", "")) from None
                adapter = Adapter(name, "lora", factors, str(folder), files)
                register = lambda: self._register_dynamic(adapter)
        except WorkbenchError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, OSError, RuntimeError) as e:
            # a malformed folder that one of the libraries reading it rejects in its own way: the caller's 400
            log.debug("%s refused", what, exc_info=e)
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise WorkbenchError(f"{what} is malformed: {type(e).__name__}: {first}") from None
        with self.lock, self._slots_lock:
            self._check_free(name)
            register()
            self.counters["runtime_loads"] += 1
        return next(m for m in self.models() if m["id"] == name)

    def _check_free(self, name: str) -> None:
        if name in self.retired_compositions:
            raise ModelExists(f"model {name!r} was unloaded and still finishes the requests accepted for it: "
                              "retry once they are done, or pick another name")
        if name == "base" or name in self.ids or name in self.routed or name in self.twins:
            raise ModelExists(f"model {name!r} is already served: unload it first, or pick another name")

    def _check_registry_room(self) -> None:
        if len(self.ids) >= self.max_registered:
            raise WorkbenchError(f"this server serves {len(self.ids)} adapters, at most {self.max_registered} "
                                 "(max_registered_adapters): unload one first")

    def _register_dynamic(self, adapter: Adapter) -> None:
        """Register a servable adapter; into a slot now when the cap leaves room, else on its first request."""
        self._check_registry_room()
        i = self._register_adapter(adapter)
        dynamic = sum(1 for j in self.slot_of if j not in self.pinned)
        if self.max_loaded is None or dynamic < self.max_loaded:
            self._make_resident(i, set())

    def _artifact_registration(self, name: str, folder: Path, meta: dict[str, Any], what: str) -> Callable[[], Any]:
        """What registers the saved composition in `folder` (validated here, registered under the locks)."""
        problem = _meta_problem(meta)
        if problem:
            raise WorkbenchError(f"{what}: artifact.json {problem}")
        kind = meta.get("type")
        if meta.get("pool_fingerprint") not in (None, self.pool.manifest.base.fingerprint):
            raise WorkbenchError(f"{what} was built over another base ({meta.get('base')!r}), this server's is "
                                 f"{self.pool.manifest.base.spec!r}")
        loaded = set(self.ids)
        if kind == "merged_lora":
            if meta.get("pool_fingerprint") is None:
                raise WorkbenchError(f"{what} does not record the base it was built over: rebuild it")
            adapter, reason = lora_composition(self.pool, name, folder)
            if reason:
                raise WorkbenchError(f"{what}: {reason}")
            return lambda: self._register_dynamic(adapter)
        if kind == "routed_lora":
            comp, reason = routed_composition(self.pool, name, folder, meta, loaded, str(self.device))
            reason = (reason or self._binding_problem(meta)
                      or self._cap_problem(name, [self.ids[e] for e in comp.router.experts]))
            parts = 0
        elif kind == "smora":
            comp, reason = smora_composition(self.pool, name, folder, meta, str(self.device))
            parts = len(comp.adapters) if comp is not None else 0
        elif kind == "twin":
            comp, reason = twin_composition(self.pool, name, folder, meta, loaded)
            parts = 1 + len(comp.exclusive) if comp is not None else 0
        else:
            raise WorkbenchError(f"{what} is a {kind!r} artifact: only adapters and low-rank compositions (merged_lora, "
                                 "routed_lora, twin, smora) load at run time; full models are served when built "
                                 "before the server starts (--recipes)")
        if reason:
            raise WorkbenchError(f"{what}: {reason}")

        def register():
            problem = self._parts_problem(name, parts)
            if problem:
                raise WorkbenchError(problem)
            first = len(self.adapters)
            (self._register_twin if kind == "twin" else self._register_routed)(comp)
            for i in range(first, len(self.adapters)):  # its own parts: pinned, each in a slot of its own
                free = [s_ for s_, o in enumerate(self.slot_owner) if o is None]
                self._write_slot(free[0] if free else None, i)

        return register

    def _binding_problem(self, meta: dict[str, Any]) -> str | None:
        """Why a routed_lora artifact's experts are not the adapters this engine serves under their names (an
        adapter unloaded, then another loaded under its name), or None: each must have the files the router was
        built over (`expert_files`, as `Pool` records them)."""
        recorded = meta.get("expert_files")
        if recorded is None:
            return "it was built before artifacts recorded their experts' files; rebuild it (`workbench merge --force`)"
        other = [e for e in meta.get("experts") or [] if e in self.ids
                 and (self.adapters[self.ids[e]].files is None or self.adapters[self.ids[e]].files != recorded.get(e))]
        if other:
            return (f"the adapters served here as {other} are not the ones its router was built over (their files "
                    "differ); load those adapters under these names first")
        return None

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter or composition `name`: it leaves /v1/models and new requests for it are unknown at
        once; the requests already accepted for it finish with it, then its slots are released and its factors (a
        composition's router and own parts) dropped. UnknownModel when nothing of that name is served;
        WorkbenchError for `base`, or an adapter a served routed composition routes over (unload that first)."""
        with self.lock, self._slots_lock:
            if name == "base":
                raise WorkbenchError("'base' is the base model: it cannot be unloaded")
            if (name in self.routed or name in self.twins) and name not in self.retired_compositions:
                self.retired_compositions.add(name)
                self.counters["unloads"] += 1
                self._finalize_composition(name)
                return
            if name not in self.ids:
                raise UnknownModel(f"The lora adapter {name!r} cannot be found"
                                   f"{did_you_mean(name, [m for m in self.model_names() if m != 'base'])}")
            i = self.ids[name]
            users = sorted(c for c, ids in self._experts.items() if not self.routed[c].adapters
                           and c not in self.retired_compositions and i in ids.tolist())
            if users:
                raise WorkbenchError(f"adapter {name!r} is routed over by {users}: it stays loaded while they are "
                                     "served (unload them first)")
            del self.ids[name]
            self.retired.add(i)
            self.counters["unloads"] += 1
            self._finalize(i)

    @classmethod
    def from_pool(cls, pool, experts: list[str] | None = None, *, include_artifacts: bool = True,
                  backend: str | None = None, device: str = "cpu", dtype=torch.float32,
                  log: Callable[[str], Any] = print, max_loaded_adapters: int | None = None,
                  declared: Collection[Path] | None = None, paged: bool | None = None,
                  **bounds: int) -> MultiLoraModel:
        """The pool's LoRA experts (all, or `experts`), and with `include_artifacts` the saved LoRA compositions
        and routed compositions built over this pool (a routed one whose experts are not loaded is skipped: `log`).
        `declared`: only the artifacts in these folders (the compositions declared at start, `--recipes`), and one
        that cannot be served is a WorkbenchError, not a logged skip. `max_loaded_adapters`: at most this many
        servable adapters in kernel slots at once (the others wait on the CPU and are swapped in, least recently
        used out, as requests need them); None: all. `paged` (default: when `max_loaded_adapters` is set): the
        pool's adapters are not read at start; each is read from disk by a prefetch thread when a request for it is
        queued and kept in host memory while in a slot and, beyond the slots, up to `max_host_adapters` of them
        (least recently used dropped; None: all once read): a server over a pool larger than memory starts at once.
        `bounds`: max_registered_adapters, max_composition_parts, max_host_adapters."""
        if experts is None:  # every LoRA expert on disk; one the pool records as not built is skipped, said in `log`
            names = []
            for n in pool.names("lora"):
                if (e := pool.expert(n)).not_built():
                    log(f"not serving {n}: {e.status()}")
                else:
                    names.append(n)
        else:
            names = experts
        paged = max_loaded_adapters is not None if paged is None else paged
        adapters = []
        for n in names:
            e = pool.expert(n)
            files = dict(e.entry.files)
            if paged:
                adapters.append(Adapter(n, "lora", {}, str(e.path), files, loader=_adapter_reader(pool, e.path, n)))
            else:
                adapters.append(Adapter(n, "lora", {t: e.lora_factors(t) for t in e.delta_names()}, str(e.path),
                                        files))
        routed: list[RoutedComposition] = []
        twins: list[TwinComposition] = []
        skip = log
        if declared is not None:
            def skip(message: str):
                raise WorkbenchError(f"a declared composition cannot be served: {message}")

        if include_artifacts:
            taken = {a.name for a in adapters}
            only = {Path(f).resolve() for f in declared} if declared is not None else None
            adapters += saved_lora_compositions(pool, taken=taken, log=skip, only=only)
            routed = saved_routed_compositions(pool, set(names), taken=taken, device=device, log=skip, only=only)
            twins = saved_twin_compositions(pool, set(names), taken=taken, log=skip, only=only)
            routed += saved_smora_compositions(pool, taken=taken, device=device, log=skip, only=only)
        return cls(pool.base.load(), pool.base.tokenizer(), adapters, routed=routed, twins=twins, backend=backend,
                   device=device, dtype=dtype, max_loaded_adapters=max_loaded_adapters, pool=pool, log=skip, **bounds)

    # -- specs
    def model_names(self) -> list[str]:
        return ["base", *self.ids, *(n for n in [*self.routed, *self.twins] if n not in self.retired_compositions)]

    def models(self) -> list[dict[str, str]]:
        """What /v1/models lists: id and kind (and a routed composition's router kind) of every servable model."""
        gone = self.retired_compositions
        return ([{"id": "base", "kind": "base"}] + [{"id": n, "kind": self.adapters[i].kind} for n, i in self.ids.items()]
                + [{"id": c.name, "kind": "routed_lora", "router": c.kind} for c in self.routed.values()
                   if c.name not in gone]
                + [{"id": c.name, "kind": "routed_lora", "router": "twin"} for c in self.twins.values()
                   if c.name not in gone])

    def resolve(self, spec: str | dict[str, float]) -> Assignment:
        """'base', an adapter name, a routed composition's name, 'mix:a=0.5,b=0.5', or {name: weight}; each mix
        weight finite with |w| <= MAX_MIX_WEIGHT (a WorkbenchError names the bad one)."""
        if isinstance(spec, dict):
            items = list(spec.items())
        elif spec == "base":
            return ()
        elif (spec in self.routed or spec in self.twins) and spec not in self.retired_compositions:
            problem = self._cap_problem(spec, self.needs(Routed(spec)))
            if problem:
                raise WorkbenchError(problem)
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
            if (name in self.routed or name in self.twins) and name not in self.retired_compositions:
                raise WorkbenchError(f"routed composition {name!r} cannot be part of a mix: request it alone")
            if name not in self.ids:
                raise UnknownModel(f"unknown model {name!r}{did_you_mean(name, self.model_names())}")
            out.append((self.ids[name], float(w)))
        problem = self._cap_problem(spec if isinstance(spec, str) else "mix", [e for e, _ in out])
        if problem:
            raise WorkbenchError(problem)
        return tuple(out)

    def row_pairs(self, assignments: Sequence[Assignment]) -> RowPairs:
        """Each row's fixed pairs as adapter ids (a routed row and the base have none): built once per row, when it
        is prefilled (or per `generate` batch); `select` and `concat` carry them as rows leave and join."""
        fixed = [() if isinstance(a, Routed) else a for a in assignments]
        k = max((len(a) for a in fixed), default=0)
        idx = torch.full((len(fixed), k), -1, dtype=torch.long)
        w = torch.zeros((len(fixed), k))
        for b, a in enumerate(fixed):
            for j, (e, wt) in enumerate(a):
                idx[b, j], w[b, j] = e, wt
        return RowPairs(idx.to(self.device), w.to(self.device))

    def _layout(self, assignments: Sequence[Assignment], pairs: RowPairs, seq_len: int,
                cache: dict | None = None) -> tuple[LoraMeta | None, list[RoutedGroup]]:
        """(fixed pairs of every token [B*S] in slot ids, one routed group per routed composition) of a [B, S] batch
        whose rows carry `pairs`: the adapter ids mapped to slots in one gather. Kept in `cache` (the rows'
        BatchState's) while the rows and the slot table stay the same: a decode step reuses its previous step's."""
        key = (self._slot_epoch, seq_len, len(assignments))
        if cache is not None and key in cache:
            return cache[key]
        meta = None
        if pairs.idx.shape[1]:
            has = pairs.idx >= 0
            slots = torch.where(has, self._slot_table_dev[pairs.idx.clamp(min=0)], -1)  # the table covers every id
            if bool((has & (slots < 0)).any()):
                e = int(pairs.idx[has & (slots < 0)][0])
                raise WorkbenchError(f"adapter {self.adapters[e].name!r} is not loaded in a slot: requests load it "
                                     "at admission (`acquire`)")
            w = torch.where(has, pairs.w, torch.zeros_like(pairs.w))
            # every token of sequence b carries its sequence's pairs ([B, S] flattened row-major)
            meta = make_meta(slots.repeat_interleave(seq_len, dim=0), w.repeat_interleave(seq_len, dim=0),
                             self.num_slots, block=seq_len)
        groups = []
        for name in dict.fromkeys(a.name for a in assignments if isinstance(a, Routed) and a.name in self.routed):
            seqs = torch.tensor([b for b, a in enumerate(assignments) if a == Routed(name)])
            rows = None if len(seqs) == len(assignments) else (  # every row: the whole input, no gather
                (seqs[:, None] * seq_len + torch.arange(seq_len)).reshape(-1).to(self.device))  # [n * S]
            groups.append(RoutedGroup(self.routed[name].router, rows, self._slots(self._experts[name])))
        if cache is not None:
            for old in [k_ for k_ in cache if k_[0] != self._slot_epoch]:
                del cache[old]
            cache[key] = (meta, groups)
        return meta, groups

    # -- forward and generation
    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, assignments: Sequence[Assignment] | None = None,
                router: Router | None = None, twin_states: dict[str, Any] | None = None,
                pairs: RowPairs | None = None, layouts: dict | None = None, **kw):
        """One forward of a batch, each sequence with its assignment. `twin_states` carries the Twin pre-passes'
        KV caches and prefix sums across the decode steps of one `generate` (a fresh dict per batch); `pairs` the
        rows' adapter pairs (default: built from `assignments`) and `layouts` their cached slot layouts."""
        with self.lock:
            if router is not None:
                n = len(self.adapters)  # the callback routes over adapter ids: mapped to their slots
                table = self._slot_table_dev[:n]
                same = n == self.num_slots and bool((table == torch.arange(n, device=table.device)).all())
                meta, groups = None, [RoutedGroup(_CallbackRouter(router), None, None if same else table)]
            else:
                assignments = assignments or [()] * input_ids.shape[0]
                if pairs is None:  # a direct call: the rows' pairs and layouts kept per assignments (bounded)
                    direct = self._direct_layouts
                    key = tuple(assignments)
                    if key not in direct:
                        if len(direct) >= 64:
                            direct.clear()
                        direct[key] = (self.row_pairs(assignments), {})
                    pairs, layouts = direct[key]
                meta, groups = self._layout(assignments, pairs, input_ids.shape[1], layouts)
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
            ids = self._slots(self._twin_ids[name])
            n = len(seqs)
            sub_ids = input_ids.index_select(0, seqs)
            sub_mask = attention_mask.index_select(0, seqs) if attention_mask is not None else None
            sub_pos = position_ids.index_select(0, seqs) if position_ids is not None else None
            shared = make_meta(ids[:1].expand(n * s), None, self.num_slots, block=s)
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
        held = []
        for a in assignments:  # with a cap on loaded adapters: every row's adapters in a slot for the whole batch
            if not self.acquire(a, read=True):
                for h in held:
                    self.release(h)
                raise WorkbenchError("this batch needs more adapters loaded at once than max_loaded_adapters allows "
                                     "while other sequences use the slots: decode it in smaller batches")
            held.append(a)
        live = self._count_active(done.count(False))
        step_ids = ids
        twin_states: dict[str, Any] = {}  # Twin pre-passes' own caches and prefix sums, for this batch only
        pairs, layouts = (self.row_pairs(assignments), {}) if router is None else (None, None)
        try:
            while not all(done):
                logits = self.forward(step_ids, attention_mask=mask, assignments=assignments, router=router,
                                      twin_states=twin_states, pairs=pairs, layouts=layouts,
                                      position_ids=pos, past_key_values=cache,
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
            for h in held:
                self.release(h)
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
        state = BatchState(list(assignments), mask, DynamicCache(config=self.model.config), {},
                           self.row_pairs(assignments))
        keep = {} if all_logits or not self._logits_to_keep else {"logits_to_keep": 1}
        logits = self.forward(ids, attention_mask=mask, assignments=state.assignments, twin_states=state.twins,
                              pairs=state.pairs, layouts=state.layouts,
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
                                  pairs=state.row_pairs(self), layouts=state.layouts, position_ids=pos,
                                  past_key_values=state.cache, use_cache=True).logits[:, -1].float()
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
        pairs = state.pairs.take(idx) if state.pairs is not None else None
        return BatchState(assignments, mask[:, cut:], _select_cache(state.cache, idx, cut), twins, pairs)

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
        pairs = (RowPairs.cat([st.pairs for st in states]) if all(st.pairs is not None for st in states) else None)
        return BatchState([a for st in states for a in st.assignments], mask,
                          _concat_caches([st.cache for st in states], pads), twins, pairs)

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
    composition's rows, in row order; `pairs` each row's adapter pairs (sliced and concatenated with the rows, never
    rebuilt from `assignments`) and `layouts` their slot layout, computed once and reused by every decode step until
    the rows or the slot table change."""

    assignments: list[Assignment]
    mask: torch.Tensor = field(repr=False)
    cache: Any = field(repr=False)
    twins: dict[str, Any] = field(default_factory=dict, repr=False)
    pairs: RowPairs | None = field(default=None, repr=False)
    layouts: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.assignments)

    def row_pairs(self, engine: MultiLoraModel) -> RowPairs:
        if self.pairs is None:  # a state made by hand: its pairs built once, then carried
            self.pairs = engine.row_pairs(self.assignments)
        return self.pairs

    def caches(self) -> list[Any]:
        return [self.cache] + [t.cache for t in self.twins.values() if t.cache is not None]


@dataclass
class RowPairs:
    """The fixed LoRA pairs of a batch's rows: adapter ids `idx` [B, k] (-1: none; routed rows and the base have
    none) and their weights `w` [B, k]. Ids, not slots, so they stay true while adapters move between slots."""

    idx: torch.Tensor
    w: torch.Tensor

    def take(self, rows: torch.Tensor) -> RowPairs:
        """The pairs of `rows`, as wide as the widest of them needs (a mix that left takes its columns along:
        the kernel picks its path by the width)."""
        idx, w = self.idx.index_select(0, rows), self.w.index_select(0, rows)
        used = (idx >= 0).any(0).nonzero()
        k = int(used[-1]) + 1 if used.numel() else 0
        return RowPairs(idx[:, :k], w[:, :k]) if k < idx.shape[1] else RowPairs(idx, w)

    @staticmethod
    def cat(parts: Sequence[RowPairs]) -> RowPairs:
        k = max(p.idx.shape[1] for p in parts)  # each part is as wide as its rows need: so is the widest
        pad = torch.nn.functional.pad
        return RowPairs(torch.cat([pad(p.idx, (0, k - p.idx.shape[1]), value=-1) for p in parts]),
                        torch.cat([pad(p.w, (0, k - p.w.shape[1])) for p in parts]))


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


_META_FIELDS = {"type": str, "name": str, "router_kind": str, "pool_fingerprint": str, "pool": str, "pool_root": str,
                "base": str}


def _adapter_reader(pool, folder: Path, name: str) -> Callable[[], dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """What reads a paged pool adapter's factors (a fresh reader each time: no file stays open between reads)."""
    def read() -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        lay = LoraLayout(folder, pool.base.tensors.shapes, f"expert {name!r}")
        return {t: (lay.weights.get(a).float(), lay.weights.get(b).float(), scale)
                for t, (a, b, scale) in lay.modules.items()}
    return read


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def _meta_problem(meta: Any) -> str | None:
    """Why an artifact.json's content is malformed for the server (not an object, a field of the wrong type), or
    None."""
    if not isinstance(meta, dict):
        return f"is a JSON {type(meta).__name__}, not an object"
    for key, want in _META_FIELDS.items():
        if meta.get(key) is not None and not isinstance(meta[key], want):
            return f"field {key!r} is {type(meta[key]).__name__}, not a string"
    for key in ("experts", "names"):
        v = meta.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            return f"field {key!r} is not a list of names"
    files = meta.get("expert_files")
    if files is not None and not (isinstance(files, dict) and all(
            isinstance(v, dict) and all(isinstance(a, str) and isinstance(b, str) for a, b in v.items())
            for v in files.values())):
        return "field 'expert_files' is not an object of {file: sha256} per expert"
    recipe = meta.get("recipe")
    if recipe is not None and not isinstance(recipe, dict):
        return "field 'recipe' is not an object"
    return None


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


def _pool_artifacts(pool, type_: str, pool_key: str, taken: set[str],
                    only: Collection[Path] | None = None) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """(served name, folder, meta) of each `type_` artifact built over this pool (here or in another checkout:
    `_built_over`), in name order: a recipe's artifact by its latest recipe name; where several carry one name
    (a recipe rebuilt with other parameters, here or in another checkout) the one built here, then the newest;
    bare sweep points ("name@point") and taken names stay out; with `only`, the artifacts in those folders alone
    (malformed artifact.json files are skipped)."""
    from ..cells import read_record
    from ..io import artifacts_dir

    root = artifacts_dir()
    if not root.is_dir():
        return
    here = str(pool.root.resolve())
    found: dict[str, tuple[tuple[bool, float], Path, dict[str, Any]]] = {}
    for meta_path in sorted(root.glob("*/artifact.json")):
        meta = read_record(meta_path)  # bounded in size and depth; None: unreadable, too large or deep, not an object
        try:
            mtime = meta_path.stat().st_mtime
        except OSError:
            continue
        if meta is None:
            continue
        if only is not None and meta_path.parent.resolve() not in only:
            continue
        if _meta_problem(meta) or meta.get("type") != type_ or not _built_over(meta, pool, pool_key):
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


def lora_composition(pool, name: str, folder: Path) -> tuple[Adapter | None, str | None]:
    """(the merged_lora artifact in `folder` as an adapter, None), or (None, why it cannot be served)."""
    # the pool's own LoRA parser: rsLoRA, rank and alpha patterns scale exactly as PEFT does
    try:
        layout = LoraLayout(folder, pool.base.tensors.shapes, f"saved composition {name!r} ({folder})")
        factors = {t: (layout.weights.get(a).float(), layout.weights.get(b).float(), scale)
                   for t, (a, b, scale) in layout.modules.items()}
    except WorkbenchError as e:
        return None, str(e)
    return Adapter(name, "merged_lora", factors, str(folder)), None


def saved_lora_compositions(pool, taken: set[str], log: Callable[[str], Any] = print,
                            only: Collection[Path] | None = None) -> list[Adapter]:
    """merged_lora artifacts built over this pool (re-factored merges), servable as adapters; a folder that
    does not parse is skipped with its reason logged (one bad artifact never stops the server)."""
    out = []
    for name, folder, _ in _pool_artifacts(pool, "merged_lora", "pool", taken, only):
        adapter, reason = lora_composition(pool, name, folder)
        if reason:
            log(f"not served: {reason}")
            continue
        out.append(adapter)
        taken.add(name)
    return out


def routed_composition(pool, name: str, folder: Path, meta: dict[str, Any], loaded: set[str],
                       device: str = "cpu") -> tuple[RoutedComposition | None, str | None]:
    """(the routed_lora artifact in `folder`, None) when its experts are all among the `loaded` LoRA experts,
    unchanged since the router was built; else (None, why not)."""
    from ..methods.routing import routed_problem
    from ..modules.routers import load_router

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
        return None, reason
    return RoutedComposition(name, router, meta.get("router_kind", router.name), str(folder)), None


def saved_routed_compositions(pool, loaded: set[str], taken: set[str], device: str = "cpu",
                              log: Callable[[str], Any] = print,
                              only: Collection[Path] | None = None) -> list[RoutedComposition]:
    """routed_lora artifacts built over this pool whose experts are all among the `loaded` LoRA experts,
    unchanged since the router was built; any other is skipped with its reason logged."""
    out = []
    for name, folder, meta in _pool_artifacts(pool, "routed_lora", "pool_root", taken, only):
        comp, reason = routed_composition(pool, name, folder, meta, loaded, device)
        if reason:
            log(f"routed composition {name!r} ({folder}) not served: {reason}")
            continue
        out.append(comp)
        taken.add(name)
    return out


def smora_composition(pool, name: str, folder: Path, meta: dict[str, Any],
                      device: str = "cpu") -> tuple[RoutedComposition | None, str | None]:
    """(the SMoRA artifact in `folder`: a routed composition over its own rank-1 adapters, None), or (None, why
    it does not fit this pool's base)."""
    from ..methods.smora import smora_problem
    from ..modules.routers import load_router

    reason, router = smora_problem(pool, meta), None
    if not reason:
        try:
            router = load_router(folder, device)
        except (WorkbenchError, OSError) as e:
            reason = f"cannot load its router: {e}"
    parts: list[dict] = []
    if router is not None and not reason:
        per_module = {f"{m}.weight": router.lora_factors(m) for m in router.dims}
        parts = [{t: f[j] for t, f in per_module.items()} for j in range(router.rank)]
        reason = _factor_shape_problem(pool, parts[:1])
    if reason:
        return None, reason
    adapters = [Adapter(f"{name}#rank{j}", "smora_rank", part, str(folder)) for j, part in enumerate(parts)]
    return RoutedComposition(name, router, "smora", str(folder), adapters), None


def saved_smora_compositions(pool, taken: set[str], device: str = "cpu", log: Callable[[str], Any] = print,
                             only: Collection[Path] | None = None) -> list[RoutedComposition]:
    """SMoRA artifacts trained over this pool's base: each a routed composition over its own R rank-1 adapters
    (the multi-LoRA op dispatches each token's k ranks); one that does not fit is skipped with its reason logged."""
    out = []
    for name, folder, meta in _pool_artifacts(pool, "smora", "pool_root", taken, only):
        comp, reason = smora_composition(pool, name, folder, meta, device)
        if reason:
            log(f"SMoRA composition {name!r} ({folder}) not served: {reason}")
            continue
        out.append(comp)
        taken.add(name)
    return out


class FullModel:
    """A full-model artifact built over the pool (a merged model, an upcycled MoE): another network than the
    base, so it gets its own engine (no adapters), loaded on its first request and kept."""

    FULL_TYPES = ("merged_model", "moe")
    # after a failed load, requests answer 503 at once until the folder changes or this many seconds pass, then the
    # next request tries again: a broken folder is not reloaded per request, a transient failure (memory, a file still
    # being copied) does not last until a restart
    RETRY_AFTER_S = 30.0

    def __init__(self, name: str, kind: str, folder: Path, meta: dict[str, Any], *, backend: str | None = None,
                 device: str = "cpu", dtype=torch.float32, retry_after_s: float | None = None):
        self.name, self.kind, self.folder, self.meta = name, kind, folder, meta
        self.backend, self.device, self.dtype = backend, device, dtype
        self.retry_after_s = self.RETRY_AFTER_S if retry_after_s is None else float(retry_after_s)
        if not 0 <= self.retry_after_s <= 86400:  # NaN fails this too
            raise WorkbenchError(f"retry_after_s must be between 0 and 86400 seconds (got {retry_after_s})")
        self._engine: MultiLoraModel | None = None
        self._failed: str | None = None  # why the last load failed
        self._failed_at, self._failed_stamp = 0.0, ()  # when, and the folder's files then
        self._fails = 0  # failed loads in a row (the wait before the next doubles with each)
        self._lock = threading.Lock()

    def _stamp(self) -> tuple:
        """The folder's entries with their size, mtime and ctime (an error's name when it cannot be listed)."""
        try:
            return tuple(sorted((p.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                                for p in self.folder.iterdir() for st in (p.stat(),)))
        except OSError as e:
            return (type(e).__name__,)

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def engine(self) -> MultiLoraModel:
        """Its engine, loading the artifact the first time (one load even under concurrent first requests). After a
        failed load, requests answer at once (a WorkbenchError, the 503) without waiting on a retry under way."""
        if self._engine is not None:
            return self._engine
        if not self._lock.acquire(blocking=self._failed is None):  # a retry is loading: do not queue behind it
            raise WorkbenchError(self._failed or f"model {self.name!r} is loading")
        try:
            load = self._engine is None and self._failed is None
            if self._engine is None and not load:  # the last failure stands until a retry loads it
                changed = self._stamp() != self._failed_stamp
                if changed or time.monotonic() - self._failed_at >= self._wait():
                    log.info("model %r: loading it again (%s)", self.name,
                             "its folder changed" if changed else f"{self._wait():g} s after it failed")
                    load = True
            if load:
                from ..artifacts import load_artifact

                try:
                    lm = load_artifact(self.folder, device=self.device)
                    self._engine = MultiLoraModel(lm.model, lm.tokenizer, [], backend=self.backend,
                                                  device=self.device, dtype=self.dtype)
                    self._failed, self._fails = None, 0
                except Exception as e:  # a broken folder (any library's error) fails this model only (logged)
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    self._failed = f"model {self.name!r} ({self.kind}) could not be loaded: {type(e).__name__}: {first}"
                    self._failed_at, self._failed_stamp = time.monotonic(), self._stamp()
                    self._fails += 1
                    log.error("%s (%s); its requests answer 503 until its folder changes or %g s pass, then it is "
                              "loaded again", self._failed, self.folder, self._wait(), exc_info=e)
            if self._engine is None:
                raise WorkbenchError(self._failed)
            return self._engine
        finally:
            self._lock.release()

    def _wait(self) -> float:
        """Seconds before a failed load is tried again (the folder unchanged): `retry_after_s`, doubling with each
        failure in a row up to 10 minutes (or `retry_after_s` when that is longer), so a model that cannot fit is
        not reloaded every few seconds beside the models being served."""
        return min(self.retry_after_s * 2 ** max(self._fails - 1, 0), max(self.retry_after_s, 600.0))


def saved_full_models(pool, taken: set[str], *, backend: str | None = None, device: str = "cpu",
                      dtype=torch.float32, only: Collection[Path] | None = None) -> list[FullModel]:
    """The full-model artifacts (merged models, upcycled MoEs) built over this pool, by recipe name (with `only`:
    those in these folders alone); names already taken (experts, compositions) stay out. Nothing is loaded until a
    request names one."""
    out = []
    only = {Path(f).resolve() for f in only} if only is not None else None
    for kind in FullModel.FULL_TYPES:
        for name, folder, meta in _pool_artifacts(pool, kind, "pool", taken, only):
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


def twin_composition(pool, name: str, folder: Path, meta: dict[str, Any],
                     loaded: set[str]) -> tuple[TwinComposition | None, str | None]:
    """(the Twin artifact in `folder`, None) when built from LoRA experts all among the `loaded` ones, unchanged
    since the build; else (None, why not)."""
    from ..methods.routing import routed_problem
    from ..methods.twin import twin_factors
    from ..modules.routers import load_router

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
        return None, reason
    return TwinComposition(name, router, shared, exclusive, str(folder)), None


def saved_twin_compositions(pool, loaded: set[str], taken: set[str], log: Callable[[str], Any] = print,
                            only: Collection[Path] | None = None) -> list[TwinComposition]:
    """Twin artifacts built over this pool from LoRA experts that are all among the `loaded` ones, unchanged
    since the build; any other is skipped with its reason logged."""
    out = []
    for name, folder, meta in _pool_artifacts(pool, "twin", "pool", taken, only):
        comp, reason = twin_composition(pool, name, folder, meta, loaded)
        if reason:
            log(f"twin composition {name!r} ({folder}) not served: {reason}")
            continue
        out.append(comp)
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


__all__ = ["Adapter", "Assignment", "BatchState", "FullModel", "ModelExists", "MultiLoraModel", "Routed", "RoutedComposition", "RoutedLoraLinear", "Router",
           "TwinComposition", "UnknownModel", "peft_alone", "saved_full_models", "saved_lora_compositions", "saved_routed_compositions",
           "saved_smora_compositions", "saved_twin_compositions", "top_k_router"]
