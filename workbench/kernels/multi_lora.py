"""Y += sum_j w[t, j] * s[e] * (X[t] @ A[e].T) @ B[e].T  with e = idx[t, j] (idx < 0: no adapter).

One op covers one adapter per request (k = 1, w = 1), routed top-k mixtures (PHATGOOSE,
Arrow, MoLE) and Twin-Merging's per-sample mixtures. Adapters may have different ranks.

`make_meta` computes, once per batch, what every layer's call shares (vLLM's habit): the
(token, pair) list sorted by adapter, per-adapter counts and offsets, the active adapters,
and whether each adapter's tokens form one contiguous block (then no gather/scatter).

Backends (registered by name; `default_backend(device)` picks one):
- reference: a plain loop over tokens and pairs, obviously correct;
- cpu_grouped: one shrink and one expand matmul per active adapter, exact ranks (no
  padding), slices instead of gathers for contiguous blocks;
- cpu_dense: every token against all active adapters in two matmuls, masked per token;
- cpu_bmm: one adapter per sequence as two batched matmuls, ranks padded where they differ;
- cpu (the CPU default): picks among those three by cost (see lora_cpu);
- grouped_mm: torch.nn.functional.grouped_mm over the active adapters (ranks padded); unavailable
  on a torch without it (`backend_unavailable`, `check_backend`);
- triton: SGMV-style shrink and expand kernels (workbench.kernels.triton_lora), CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..errors import WorkbenchError
from ..registry import Registry


@dataclass
class AdapterWeights:
    """One linear layer's adapters: A_e [r_e, d_in], B_e [d_out, r_e], scale s_e."""

    a: list[torch.Tensor]
    b: list[torch.Tensor]
    scale: torch.Tensor  # [E]

    def __post_init__(self):
        if not (len(self.a) == len(self.b) == self.scale.numel()):
            raise ValueError("a, b and scale must have one entry per adapter")

    @property
    def num_adapters(self) -> int:
        return len(self.a)

    @cached_property
    def ranks(self) -> list[int]:  # read on every layer call: computed once
        return [a.shape[0] for a in self.a]

    @cached_property
    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A [E, R, d_in], B [E, d_out, R], ranks [E]) zero-padded to R = max rank rounded up to 8
        (grouped_mm needs 16-byte strides; triton masks the padding)."""
        r = -(-max(max(self.ranks, default=1), 1) // 8) * 8
        a0, b0 = self.a[0], self.b[0]
        a_pad = a0.new_zeros(len(self.a), r, a0.shape[1])
        b_pad = b0.new_zeros(len(self.b), b0.shape[0], r)
        for i, (a, b) in enumerate(zip(self.a, self.b)):
            a_pad[i, : a.shape[0]] = a
            b_pad[i, :, : b.shape[1]] = b
        return a_pad, b_pad, torch.tensor(self.ranks, dtype=torch.int32, device=a0.device)

    @cached_property
    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A [E, r, d_in], B [E, d_out, r]) when every adapter has the same rank r, else None."""
        if len(set(self.ranks)) != 1:
            return None
        return torch.stack(self.a), torch.stack(self.b)

    def set_slot(self, e: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Put another adapter's factors in slot `e` (a server's adapter cache swapping adapters in and out),
        updating the derived tables for that slot alone: `ranks`, and `stacked` / `padded` in place where the new
        rank fits them (else they are dropped, rebuilt on their next use); the dense path's cached
        concatenations that hold slot `e` are dropped. The caller holds off every forward while it runs."""
        self.a[e], self.b[e] = a, b
        self.scale[e] = float(scale)
        d, r = self.__dict__, a.shape[0]
        if "ranks" in d:
            d["ranks"][e] = r
        if "stacked" in d:
            st = d["stacked"]
            if st is not None and st[0].shape[1] == r and len(set(d.get("ranks", self.ranks))) == 1:
                st[0][e].copy_(a)
                st[1][e].copy_(b)
            else:
                del d["stacked"]
        if "padded" in d:
            a_pad, b_pad, ranks = d["padded"]
            if r <= a_pad.shape[1]:
                a_pad[e].zero_()
                a_pad[e, :r] = a
                b_pad[e].zero_()
                b_pad[e, :, :r] = b
                ranks[e] = r
            else:
                del d["padded"]
        for key in [k for k in d.get("_dense", {}) if e in k]:
            del d["_dense"][key]

    def add_slot(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> int:
        """Append a slot holding (a, b, scale); returns its index. The derived tables are rebuilt on next use."""
        self.a.append(a)
        self.b.append(b)
        self.scale = torch.cat([self.scale, self.scale.new_tensor([float(scale)])])
        for name in ("ranks", "stacked", "padded", "_dense"):
            self.__dict__.pop(name, None)
        return len(self.a) - 1


@dataclass
class LoraMeta:
    """Per-batch routing metadata, shared by every layer of one forward.

    The pair list sorted by adapter (token_idx, pair_w, pair_adapter, offsets, contiguous blocks) is
    built on first use: the dense path never needs it, and routed layers build one meta per call."""

    idx: torch.Tensor  # [T, k] adapter ids (-1: none)
    w: torch.Tensor  # [T, k] weights
    num_adapters: int
    valid: torch.Tensor  # [T * k] pairs that count (adapter >= 0, weight != 0), row-major
    counts: list[int]  # [E]
    active: list[int]  # adapters with at least one pair
    block: int | None = None  # tokens come in blocks of this many (one sequence each) sharing their pairs

    @property
    def num_tokens(self) -> int:
        return self.idx.shape[0]

    @cached_property
    def offsets(self) -> list[int]:  # [E + 1]
        return [0, *torch.tensor(self.counts, dtype=torch.long).cumsum(0).tolist()]

    @cached_property
    def _sorted(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, k = self.idx.shape
        tokens = torch.arange(t, device=self.idx.device).repeat_interleave(k)[self.valid]
        flat_e, flat_w = self.idx.reshape(-1)[self.valid], self.w.reshape(-1).float()[self.valid]
        order = torch.argsort(flat_e, stable=True)
        return tokens[order], flat_w[order], flat_e[order]

    @property
    def token_idx(self) -> torch.Tensor:  # [P] token of each (token, pair), sorted by adapter
        return self._sorted[0]

    @property
    def pair_w(self) -> torch.Tensor:  # [P] the pair's weight
        return self._sorted[1]

    @property
    def pair_adapter(self) -> torch.Tensor:  # [P] the pair's adapter (sorted)
        return self._sorted[2]

    @cached_property
    def contiguous(self) -> dict[int, tuple[int, int]]:
        """e -> token range [s, e) where adapter e's tokens form one block (step exactly 1: no gap, no token
        twice); the steps != 1 inside each adapter's segment are counted with one cumulative sum."""
        out: dict[int, tuple[int, int]] = {}
        if not self.active:
            return out
        token_idx, offsets, counts = self.token_idx, self.offsets, self.counts
        breaks = torch.zeros(token_idx.numel(), dtype=torch.long, device=token_idx.device)
        breaks[1:] = (token_idx[1:] - token_idx[:-1] != 1).long().cumsum(0)
        starts = torch.tensor([offsets[e] for e in self.active], device=token_idx.device)
        ends = torch.tensor([offsets[e] + counts[e] - 1 for e in self.active], device=token_idx.device)
        inside = (breaks[ends] - breaks[starts]).tolist()
        first = token_idx[starts].tolist()
        for e, b, f in zip(self.active, inside, first):
            if b == 0:
                out[e] = (f, f + counts[e])
        return out


def make_meta(idx: torch.Tensor, w: torch.Tensor | None, num_adapters: int, block: int | None = None) -> LoraMeta:
    """idx [T] or [T, k] adapter ids (-1 for none), w same shape (default 1). `block`: the caller
    promises that tokens come in blocks of that many (sequences) with the same pairs in a block."""
    if idx.dim() == 1:
        idx = idx[:, None]
    w = torch.ones(idx.shape, dtype=torch.float32, device=idx.device) if w is None else (w[:, None] if w.dim() == 1 else w)
    if idx.shape != w.shape:
        raise ValueError(f"idx {tuple(idx.shape)} and w {tuple(w.shape)} differ")
    if idx.numel() and int(idx.max()) >= num_adapters:
        raise ValueError(f"adapter id {int(idx.max())} out of range ({num_adapters} adapters)")
    t = idx.shape[0]
    if block is not None and (block <= 0 or t % block):
        raise ValueError(f"block {block} does not divide {t} tokens")
    flat_e = idx.reshape(-1)
    valid = (flat_e >= 0) & (w.reshape(-1) != 0)
    per_adapter = torch.bincount(flat_e[valid], minlength=num_adapters)
    counts = per_adapter.tolist()
    active = per_adapter.nonzero().flatten().tolist()  # no Python loop over all E: routing over 1,024 adapters
    return LoraMeta(idx, w, num_adapters, valid, counts, active, block)


Backend = "callable(y, x, weights, meta) -> None, adding the LoRA term into y in place"
BACKENDS: Registry = Registry("kernel backend")


@BACKENDS.register("reference")
def lora_reference(y: torch.Tensor, x: torch.Tensor, wts: AdapterWeights, meta: LoraMeta) -> None:
    idx, w = meta.idx.tolist(), meta.w.tolist()
    for t in range(x.shape[0]):
        for e, wt in zip(idx[t], w[t]):
            if e < 0 or wt == 0:
                continue
            h = x[t].float() @ wts.a[e].float().T
            y[t] += (wt * float(wts.scale[e]) * (h @ wts.b[e].float().T)).to(y.dtype)


def _bmm_blocks(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                u: tuple[int, torch.Tensor, torch.Tensor]) -> None:
    """One adapter per block of S tokens: gather each block's A/B, two batched matmuls, y += in place."""
    s_len, ad, w = u
    nb = ad.numel()
    coef = (w.to(x.dtype) * scale.to(x.dtype)[ad])[:, None, None]
    h = torch.bmm(x.view(nb, s_len, -1), a[ad].transpose(1, 2)).mul_(coef)  # [B, S, r]
    y.view(nb, s_len, -1).baddbmm_(h, b[ad].transpose(1, 2))


def _bmm_pays(meta: LoraMeta, u: tuple[int, torch.Tensor, torch.Tensor], wts: AdapterWeights) -> bool:
    """Batched matmuls gather one copy of A and B per sequence; the grouped path reads each active
    adapter once but gathers/scatters activations and pays per-adapter dispatch. Gathering wins
    when the copied weights are small beside the activations (prefill: blocks x r <= tokens) or
    when most sequences have their own adapter (few would share a group anyway)."""
    blocks = u[1].numel()
    return blocks * max(wts.ranks) <= meta.num_tokens or 4 * len(meta.active) > blocks


@BACKENDS.register("cpu_grouped")
def lora_cpu_grouped(y: torch.Tensor, x: torch.Tensor, wts: AdapterWeights, meta: LoraMeta) -> None:
    """One shrink and one expand matmul per active adapter, exact ranks, slices for contiguous blocks."""
    for e in meta.active:
        s, n = meta.offsets[e], meta.counts[e]
        pw = meta.pair_w[s:s + n].to(x.dtype) * wts.scale[e].to(x.dtype)
        block = meta.contiguous.get(e)
        if block is not None:
            xs = x[block[0]:block[1]]
            h = (xs @ wts.a[e].T).mul_(pw[:, None])
            y[block[0]:block[1]].addmm_(h, wts.b[e].T)
        else:
            rows = meta.token_idx[s:s + n]
            h = (x.index_select(0, rows) @ wts.a[e].T).mul_(pw[:, None])
            y.index_put_((rows,), h @ wts.b[e].T, accumulate=True)  # index_add_ measured ~5x slower here


DENSE_MAX_TOKEN_RANKS = 1 << 16  # tokens x sum of active ranks up to which `cpu` takes the dense path
# Routed mixtures (k > 1 pairs per token) have no batched-matmul path, and their grouped path gathers and
# scatters every token k times: below this many active ranks in all (6 experts at r = 8: 48), one dense
# shrink and expand over all of them is cheaper (measured: routed top-2 of 6, 2048 tokens, 576 -> 1536).
DENSE_MAX_ROUTED_RANKS = 64


def _dense_factors(wts: AdapterWeights, active: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_cat [R, d_in], s*B_cat [d_out, R]) over the active adapters, R = sum of their ranks; cached
    per active set (a decode loop reuses one set for every step)."""
    cache = wts.__dict__.setdefault("_dense", {})
    key = tuple(active)
    if key not in cache:
        if len(cache) >= 8:
            cache.clear()
        cache[key] = (torch.cat([wts.a[e] for e in active]),
                      torch.cat([wts.b[e] * wts.scale[e].to(wts.b[e].dtype) for e in active], dim=1))
    return cache[key]


def _dense_mask(meta: LoraMeta, ranks: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """M [T, R]: token t's total weight on adapter e, repeated over e's r_e columns (cached per meta);
    scattered straight from (idx, w), no sorted pair list needed."""
    cache = meta.__dict__.setdefault("_mask", {})
    key = (ranks, dtype)
    if key not in cache:
        dev = meta.idx.device
        w = torch.where(meta.valid.view(meta.idx.shape), meta.w.float(), torch.zeros((), device=dev))
        per = torch.zeros(meta.num_tokens, meta.num_adapters, dtype=torch.float32, device=dev)
        per.scatter_add_(1, meta.idx.clamp(min=0), w)
        if len(meta.active) != meta.num_adapters:
            per = per[:, torch.tensor(meta.active, device=dev)]
        cache[key] = per.repeat_interleave(torch.tensor(ranks, device=dev), dim=1).to(dtype)
    return cache[key]


@BACKENDS.register("cpu_dense")
def lora_cpu_dense(y: torch.Tensor, x: torch.Tensor, wts: AdapterWeights, meta: LoraMeta) -> None:
    """Every token against every active adapter in two matmuls, masked to its own pairs:
    y += ((x @ A_cat.T) * M) @ (s B_cat).T. Exact ranks, any k; FLOPs grow with T x R, so `cpu`
    takes it where that product is small (decode steps, few adapters)."""
    if not meta.active:
        return
    a_cat, b_cat = _dense_factors(wts, meta.active)
    mask = _dense_mask(meta, tuple(wts.ranks[e] for e in meta.active), x.dtype)
    y.addmm_((x @ a_cat.T).mul_(mask), b_cat.T)


@BACKENDS.register("cpu")
def lora_cpu(y: torch.Tensor, x: torch.Tensor, wts: AdapterWeights, meta: LoraMeta) -> None:
    """Picks by cost: dense while tokens x active ranks is small; batched matmuls for one adapter
    per sequence with equal ranks (when `_bmm_pays`); else grouped by adapter."""
    if not meta.active:
        return
    ranks = sum(wts.ranks[e] for e in meta.active)
    if meta.num_tokens * ranks <= DENSE_MAX_TOKEN_RANKS or (meta.idx.shape[1] > 1 and ranks <= DENSE_MAX_ROUTED_RANKS):
        return lora_cpu_dense(y, x, wts, meta)
    u = uniform_blocks(meta)
    if u is not None and wts.stacked is not None and _bmm_pays(meta, u, wts):
        return _bmm_blocks(y, x, *wts.stacked, wts.scale, u)  # equal ranks: no padding
    return lora_cpu_grouped(y, x, wts, meta)


def uniform_blocks(meta: LoraMeta) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """(S, adapter per block [B], weight per block [B]) when tokens form B equal blocks of S tokens,
    each with exactly one pair and one weight (one adapter per sequence: the common serving case).
    Blocks are the caller's (`meta.block`), else found from adapters whose tokens are contiguous."""
    cache = meta.__dict__.setdefault("_uniform", {})
    if "v" not in cache:
        cache["v"] = None
        t = meta.num_tokens
        if meta.idx.shape[1] == 1 and t and len(meta.token_idx) == t:
            s_len = meta.block
            if s_len is None and len(meta.contiguous) == len(meta.active):
                lengths = {b - a for a, b in meta.contiguous.values()}
                s_len = lengths.pop() if len(lengths) == 1 else None
            if s_len is not None:
                e_blk, w_blk = meta.idx[:, 0].view(-1, s_len), meta.w[:, 0].view(-1, s_len)
                if bool((e_blk == e_blk[:, :1]).all()) and bool((w_blk == w_blk[:, :1]).all()):
                    cache["v"] = (s_len, e_blk[:, 0].clone(), w_blk[:, 0].clone())
    return cache["v"]


@BACKENDS.register("cpu_bmm")
def lora_cpu_bmm(y: torch.Tensor, x: torch.Tensor, wts: AdapterWeights, meta: LoraMeta) -> None:
    """Uniform blocks (see uniform_blocks) as two batched matmuls, ranks padded (to a multiple of 8)
    when they differ; otherwise `cpu_grouped`."""
    u = uniform_blocks(meta)
    if u is None:
        return lora_cpu_grouped(y, x, wts, meta)
    a, b = wts.stacked or wts.padded[:2]
    _bmm_blocks(y, x, a, b, wts.scale, u)


def backend_unavailable(name: str) -> str | None:
    """Why backend `name` cannot run on this install, or None when it can (torch.nn.functional.grouped_mm
    appeared after torch 2.6, the oldest torch the project takes)."""
    if name == "grouped_mm" and not hasattr(torch.nn.functional, "grouped_mm"):
        return f"needs torch.nn.functional.grouped_mm, which torch {torch.__version__} lacks"
    return None


def available_backends() -> list[str]:
    """Registered backends that can run here (triton registers itself when it imports)."""
    return [n for n in BACKENDS.names() if backend_unavailable(n) is None]


def check_backend(name: str) -> str:
    """`name` when it is a known backend that runs here; else a WorkbenchError naming the choices."""
    if name == "triton":
        try:
            from . import triton_lora  # noqa: F401  (registers the backend)
        except ImportError:
            raise WorkbenchError("kernel backend 'triton' needs the triton package (pip install triton)") from None
    BACKENDS.get(name)
    why = backend_unavailable(name)
    if why:
        raise WorkbenchError(f"kernel backend {name!r} {why}; use one of: {', '.join(available_backends())}")
    return name


@BACKENDS.register("grouped_mm")
def lora_grouped_mm(y: torch.Tensor, x: torch.Tensor, wts: AdapterWeights, meta: LoraMeta) -> None:
    if not hasattr(torch.nn.functional, "grouped_mm"):
        check_backend("grouped_mm")  # a clear error on an older torch
    if not meta.active:
        return
    a_pad, b_pad, _ = wts.padded
    act = torch.tensor(meta.active, device=x.device)
    ends = torch.tensor([meta.offsets[e + 1] for e in meta.active], dtype=torch.int32, device=x.device)
    xs = x.index_select(0, meta.token_idx)  # [P, d_in], grouped by adapter
    h = torch.nn.functional.grouped_mm(xs, a_pad[act].transpose(1, 2), offs=ends)  # [P, R]
    h = h * (meta.pair_w.to(h.dtype) * wts.scale.to(h.dtype)[meta.pair_adapter])[:, None]
    out = torch.nn.functional.grouped_mm(h, b_pad[act].transpose(1, 2), offs=ends)  # [P, d_out]
    y.index_add_(0, meta.token_idx, out.to(y.dtype))


def default_backend(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            from . import triton_lora  # noqa: F401

            return "triton"
        except ImportError:
            return "grouped_mm" if backend_unavailable("grouped_mm") is None else "cpu"
    return "cpu"


def apply_lora(y: torch.Tensor, x: torch.Tensor, wts: AdapterWeights, meta: LoraMeta, backend: str | None = None) -> torch.Tensor:
    """y [T, d_out] += the LoRA mixture of x [T, d_in]; returns y."""
    name = backend or default_backend(x.device)
    if name == "triton":
        from . import triton_lora  # noqa: F401  (registers the backend)
    BACKENDS.get(name)(y, x, wts, meta)
    return y
