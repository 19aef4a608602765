"""The one routed-LoRA layer: every low-rank composition (plain adapters, mixes, Twin, routing,
learned mixtures) runs through it, over the one multi-LoRA op.

`RoutedLoraLinear` wraps a target linear and holds its experts' A/B factors once
(`AdapterWeights`). On each forward it asks the model-wide `RoutingContext` for the per-token
`(idx [T, k], w [T, k])` pairs of this module and adds the LoRA mixture with `apply_lora`:
only each token's own k experts are computed (sparse dispatch). A context can mix, in one
batch, sequences with fixed pairs (one adapter, a weighted mix) and sequences routed by a
router (each router sees its own sequences' tokens only).

Routers (`workbench.modules.routers`) turn one module's input into pairs. For training a
router (PHATGOOSE gates, MoLE, SMoRA) the context's `dense` mode asks the router for dense
differentiable weights [T, E] and computes the mixture with plain tensor ops instead; a router
that trains its own factors (SMoRA's rank experts) hands them to the dense path (`own_factors`).

A router whose gate reads the experts' outputs (MoLE: softmax over Norm(E_1(x) + ... + E_N(x))
projections) sets `reads_outputs`: the layer computes every expert's output for that router's
tokens, asks it for the weights (`mix(module, x, outs)`) and adds the weighted sum. That gate
needs every expert's full output, so there is nothing sparse to dispatch: it is one dense
contraction, in serving batches beside the sparse pairs of the other sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..kernels import AdapterWeights, LoraMeta, apply_lora, default_backend, make_meta
from .routers import input_key

Pairs = tuple[torch.Tensor, torch.Tensor]  # idx [T, k] long (-1: none), w [T, k] float


class TokenRouter(Protocol):
    """What the routed layer asks of a router."""

    def route(self, module: str, x: torch.Tensor) -> Pairs:  # x [T, d_in] -> sparse top-k pairs
        ...

    def weights(self, module: str, x: torch.Tensor) -> torch.Tensor:  # x [T, d_in] -> dense w [T, E], differentiable
        ...


def own_dispatch(router: Any) -> bool:
    """A router that computes its tokens' low-rank delta itself (`delta(module, x)` and `handles(module)`:
    SMoRA's gather path)."""
    return getattr(router, "dispatch", None) == "gather"


def reads_outputs(router: Any) -> bool:
    """A router whose gate reads the experts' outputs: it has `mix(module, x, outs)` and `handles(module)`."""
    return bool(getattr(router, "reads_outputs", False))


@dataclass
class RoutedGroup:
    """Tokens (rows of the flattened [B*S, d] input) routed by one router; `experts` maps the
    router's expert i to the layer's adapter id."""

    router: Any
    rows: torch.Tensor | None  # [n] token rows, None: every token
    experts: torch.Tensor | None = None  # [E_router] adapter ids, None: identity


@dataclass
class Trace:
    """Per-layer routing decisions recorded during a forward (for `route trace` and the app)."""

    modules: dict[str, list[Pairs]] = field(default_factory=dict)

    def record(self, module: str, idx: torch.Tensor, w: torch.Tensor) -> None:
        self.modules.setdefault(module, []).append((idx.detach().cpu(), w.detach().float().cpu()))


class RoutingContext:
    """What every RoutedLoraLinear of one model reads during one forward."""

    def __init__(self, num_adapters: int, backend: str | None = None):
        self.num_adapters = num_adapters
        self.backend = backend
        self.meta: LoraMeta | None = None  # fixed pairs for every token (plain adapters, mixes)
        self.groups: list[RoutedGroup] = []  # routed tokens (their rows in `meta` carry no pairs)
        self.dense = False  # training: dense differentiable weights from the (single) group's router
        self.trace: Trace | None = None
        self.calls = 0  # layer calls since the context was set (tests check sharing)
        self._subsets: dict = {}  # (a module input, a group's rows) -> its rows of that input, while both are held

    @contextmanager
    def use(self, *, meta: LoraMeta | None = None, groups: Sequence[RoutedGroup] = (), dense: bool = False,
            trace: Trace | None = None) -> Iterator[RoutingContext]:
        prev = (self.meta, self.groups, self.dense, self.trace)
        self.meta, self.groups, self.dense, self.trace = meta, list(groups), dense, trace
        self._subsets = {}
        try:
            yield self
        finally:
            self.meta, self.groups, self.dense, self.trace = prev
            self._subsets = {}

    def rows_of(self, x2: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """A routed group's rows of a module's input [T, d_in]: one gather per distinct input, so the modules that
        read one input (q/k/v) hand their router the same tensor (its per-input caches then hit)."""
        if rows is None:
            return x2
        key = (input_key(x2), rows.data_ptr(), rows.numel())
        hit = self._subsets.get(key)
        if hit is None:
            if self._subsets and next(iter(self._subsets))[0] != key[0]:
                self._subsets = {}  # another input: the previous one's gathers are done with
            hit = self._subsets[key] = (x2.index_select(0, rows), x2, rows)  # holds x2 and rows: keys stay unique
        return hit[0]

    def pairs_meta(self, module: str, x2: torch.Tensor) -> LoraMeta | None:
        """The LoraMeta of this module's call: fixed pairs, with routed groups' pairs written in."""
        groups = [g for g in self.groups if not (reads_outputs(g.router) or own_dispatch(g.router))]  # those add
        # their own part (the layer's forward)
        if not groups:
            return self.meta
        t = x2.shape[0]
        parts: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
        for g in groups:
            xs = self.rows_of(x2, g.rows)
            with torch.no_grad():
                idx, w = g.router.route(module, xs)
            if g.experts is not None:
                idx = torch.where(idx >= 0, g.experts[idx.clamp(min=0)], idx)
            if self.trace is not None:
                self.trace.record(module, idx, w)
            parts.append((g.rows, idx, w))
        k = max([p[1].shape[1] for p in parts] + ([self.meta.idx.shape[1]] if self.meta is not None else []))
        if self.meta is not None:
            idx_all = torch.full((t, k), -1, dtype=torch.long, device=x2.device)
            w_all = torch.zeros((t, k), dtype=torch.float32, device=x2.device)
            idx_all[:, : self.meta.idx.shape[1]] = self.meta.idx
            w_all[:, : self.meta.w.shape[1]] = self.meta.w
        elif len(parts) == 1 and parts[0][0] is None:
            return make_meta(parts[0][1], parts[0][2].float(), self.num_adapters)
        else:
            idx_all = torch.full((t, k), -1, dtype=torch.long, device=x2.device)
            w_all = torch.zeros((t, k), dtype=torch.float32, device=x2.device)
        for rows, idx, w in parts:
            pad = k - idx.shape[1]
            if pad:
                idx = torch.cat([idx, idx.new_full((idx.shape[0], pad), -1)], 1)
                w = torch.cat([w, w.new_zeros((w.shape[0], pad))], 1)
            if rows is None:
                idx_all, w_all = idx, w.float()
            else:
                idx_all[rows], w_all[rows] = idx, w.float()
        return make_meta(idx_all, w_all, self.num_adapters)


class RoutedLoraLinear(nn.Module):
    """y = W0 x + sum over the token's pairs (e, w) of w * s_e * B_e A_e x."""

    def __init__(self, base: nn.Linear, weights: AdapterWeights, ctx: RoutingContext, name: str):
        super().__init__()
        self.base, self.weights, self.ctx, self.name = base, weights, ctx, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self.ctx
        ctx.calls += 1
        x2 = x.reshape(-1, x.shape[-1])
        if ctx.dense:
            return y + self._dense(x2).view(y.shape)
        meta = ctx.pairs_meta(self.name, x2)
        y2 = y.view(-1, y.shape[-1])
        if meta is not None and meta.active:
            apply_lora(y2, x2, self.weights, meta, ctx.backend or default_backend(x.device))
        for g in ctx.groups:
            if (reads_outputs(g.router) or own_dispatch(g.router)) and g.router.handles(self.name):
                xs = ctx.rows_of(x2, g.rows)
                with torch.no_grad():
                    if reads_outputs(g.router):
                        part = self._mix_outputs(g, xs)
                    else:  # the router's own dispatch (SMoRA's gather), routed here once so a trace sees it
                        routed = g.router.route(self.name, xs)
                        if ctx.trace is not None:
                            ctx.trace.record(self.name, *routed)
                        part = g.router.delta(self.name, xs, routed)
                if g.rows is None:
                    y2 += part.to(y2.dtype)
                else:
                    y2.index_add_(0, g.rows, part.to(y2.dtype))
        return y

    def _factors(self, group: RoutedGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A [E, R, d_in], B [E, d_out, R], scale [E]) of the group's experts: the router's own trainable
        factors when it has them (SMoRA), else the layer's adapters (zero-padded ranks add nothing)."""
        own = getattr(group.router, "own_factors", None)
        if own is not None:
            return own(self.name)
        a, b, _ = self.weights.padded
        if group.experts is not None:
            return a[group.experts], b[group.experts], self.weights.scale[group.experts]
        return a, b, self.weights.scale

    def _mix_outputs(self, group: RoutedGroup, x2: torch.Tensor) -> torch.Tensor:
        """sum_e w_e E_e(x) with w = router.mix(module, x, outs) read from every expert's output E_e(x) [T, E, d_out]."""
        a, b, scale = self._factors(group)
        e, r = a.shape[0], a.shape[1]
        h = (x2 @ a.reshape(e * r, -1).T.to(x2.dtype)).view(-1, e, r).transpose(0, 1)  # [E, T, R]
        outs = torch.bmm(h, b.permute(0, 2, 1).to(h.dtype)).transpose(0, 1) * scale.to(h.dtype)[None, :, None]
        w = group.router.mix(self.name, x2, outs)  # [T, E]
        if self.ctx.trace is not None:
            idx = torch.arange(w.shape[1], device=w.device).expand(w.shape[0], -1)
            if group.experts is not None:
                idx = group.experts[idx]
            self.ctx.trace.record(self.name, idx, w)
        return torch.einsum("te,teo->to", w.to(outs.dtype), outs)

    def _dense(self, x2: torch.Tensor) -> torch.Tensor:
        """sum_e w[:, e] * s_e * (x A_e^T) B_e^T with w from the router, differentiable in w (and x, and the
        router's own factors)."""
        if len(self.ctx.groups) != 1 or self.ctx.groups[0].rows is not None or self.ctx.meta is not None:
            raise ValueError("the dense (training) path takes exactly one routed group over every token, no fixed pairs")
        group = self.ctx.groups[0]
        if reads_outputs(group.router):
            if not group.router.handles(self.name):  # a module none of its experts adapts
                return x2.new_zeros(x2.shape[0], self.base.out_features)
            return self._mix_outputs(group, x2)
        w = group.router.weights(self.name, x2)  # [T, E]
        a, b, scale = self._factors(group)
        e, r = a.shape[0], a.shape[1]
        # two plain matmuls over the stacked ranks (an einsum here would broadcast x to [E, T, d_in] first)
        h = (x2 @ a.reshape(e * r, -1).T.to(x2.dtype)).view(-1, e, r)  # [T, E, R]
        h = h * (w * scale.to(w.dtype))[:, :, None].to(h.dtype)
        return h.reshape(-1, e * r) @ b.permute(0, 2, 1).reshape(e * r, -1).to(h.dtype)


def get_module(model: nn.Module, dotted: str) -> nn.Module:
    m = model
    for part in dotted.split("."):
        m = getattr(m, part)
    return m


def set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(get_module(model, parent) if parent else model, leaf, new)


FactorsFn = Callable[[str], "list[tuple[torch.Tensor, torch.Tensor, float] | None]"]


def wrap_model(model: nn.Module, targets: Sequence[str], factors: FactorsFn, num_adapters: int, *,
               backend: str | None = None) -> RoutingContext:
    """Replace each target linear (`<module>.weight` names) with a RoutedLoraLinear over its adapters.

    `factors(tensor)` returns one (A [r, d_in], B [d_out, r], scale) per adapter, or None where
    an adapter does not touch that module (rank 0 there: adds nothing). Returns the shared context.
    """
    ctx = RoutingContext(num_adapters, backend)
    p = next(model.parameters())
    for tensor in targets:
        module = tensor[: -len(".weight")]
        lin = get_module(model, module)
        d_out, d_in = lin.weight.shape
        a_list, b_list, scales = [], [], []
        for f in factors(tensor):
            a, b, s = f if f is not None else (torch.zeros(0, d_in), torch.zeros(d_out, 0), 0.0)
            a_list.append(a.to(device=p.device, dtype=p.dtype).contiguous())
            b_list.append(b.to(device=p.device, dtype=p.dtype).contiguous())
            scales.append(float(s))
        if len(a_list) != num_adapters:
            raise ValueError(f"{tensor}: {len(a_list)} adapters' factors, expected {num_adapters}")
        wts = AdapterWeights(a_list, b_list, torch.tensor(scales, dtype=torch.float32, device=p.device))
        set_module(model, module, RoutedLoraLinear(lin, wts, ctx, module))
    return ctx


def routed_modules(model: nn.Module) -> dict[str, RoutedLoraLinear]:
    return {m.name: m for m in model.modules() if isinstance(m, RoutedLoraLinear)}


__all__ = [
    "Pairs",
    "RoutedGroup",
    "RoutedLoraLinear",
    "RoutingContext",
    "Trace",
    "get_module",
    "own_dispatch",
    "reads_outputs",
    "routed_modules",
    "set_module",
    "wrap_experts",
    "wrap_model",
]


def wrap_experts(model: nn.Module, experts: Sequence[Any], *, backend: str | None = None) -> RoutingContext:
    """Wrap `model` (the pool's base) with the LoRA experts' factors: adapter i = experts[i]."""
    names = [set(e.delta_names()) for e in experts]
    targets = sorted(set().union(*names))
    return wrap_model(model, targets, lambda t: [e.lora_factors(t) if t in n else None for e, n in zip(experts, names)],
                      len(experts), backend=backend)
