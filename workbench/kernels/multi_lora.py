"""Y += sum_j w[t, j] * s[e] * (X[t] @ A[e].T) @ B[e].T  with e = idx[t, j] (idx < 0: no adapter).

One op covers one adapter per request (k = 1, w = 1), routed top-k mixtures (PHATGOOSE,
Arrow, MoLE) and Twin-Merging's per-sample mixtures. Adapters may have different ranks.

`make_meta` computes, once per batch, what every layer's call shares (vLLM's habit): the
(token, pair) list sorted by adapter, per-adapter counts and offsets, the active adapters,
and whether each adapter's tokens form one contiguous block (then no gather/scatter).

Backends (registered by name; `default_backend(device)` picks one):
- reference: a plain loop over tokens and pairs, obviously correct;
- cpu: grouped by adapter (one shrink and one expand matmul per active adapter), exact
  ranks (no padding), slices instead of gathers for contiguous blocks;
- grouped_mm: torch.nn.functional.grouped_mm over the active adapters (ranks padded);
- triton: SGMV-style shrink and expand kernels (workbench.kernels.triton_lora), CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

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

    @property
    def ranks(self) -> list[int]:
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


@dataclass
class LoraMeta:
    """Per-batch routing metadata, shared by every layer of one forward."""

    idx: torch.Tensor  # [T, k] adapter ids (-1: none)
    w: torch.Tensor  # [T, k] weights
    num_adapters: int
    token_idx: torch.Tensor  # [P] token of each (token, pair), sorted by adapter
    pair_w: torch.Tensor  # [P] the pair's weight
    pair_adapter: torch.Tensor  # [P] the pair's adapter (sorted)
    counts: list[int]  # [E]
    offsets: list[int]  # [E + 1]
    active: list[int]  # adapters with at least one pair
    contiguous: dict[int, tuple[int, int]] = field(default_factory=dict)  # e -> token range [s, e) if one block

    @property
    def num_tokens(self) -> int:
        return self.idx.shape[0]


def make_meta(idx: torch.Tensor, w: torch.Tensor | None, num_adapters: int) -> LoraMeta:
    """idx [T] or [T, k] adapter ids (-1 for none), w same shape (default 1)."""
    if idx.dim() == 1:
        idx = idx[:, None]
    w = torch.ones(idx.shape, dtype=torch.float32, device=idx.device) if w is None else (w[:, None] if w.dim() == 1 else w)
    if idx.shape != w.shape:
        raise ValueError(f"idx {tuple(idx.shape)} and w {tuple(w.shape)} differ")
    if idx.numel() and int(idx.max()) >= num_adapters:
        raise ValueError(f"adapter id {int(idx.max())} out of range ({num_adapters} adapters)")
    t, k = idx.shape
    flat_e = idx.reshape(-1)
    flat_w = w.reshape(-1).float()
    valid = (flat_e >= 0) & (flat_w != 0)
    tokens = torch.arange(t, device=idx.device).repeat_interleave(k)[valid]
    flat_e, flat_w = flat_e[valid], flat_w[valid]
    order = torch.argsort(flat_e, stable=True)
    token_idx, pair_adapter, pair_w = tokens[order], flat_e[order], flat_w[order]
    counts = torch.bincount(pair_adapter, minlength=num_adapters).tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    active = [e for e, c in enumerate(counts) if c]
    contiguous = {}
    if active:
        # a block is contiguous when its tokens step by exactly 1 (no gaps, no token twice)
        step_one = (token_idx[1:] - token_idx[:-1] == 1).tolist()
        tok_list = token_idx.tolist()
        for e in active:
            s, n = offsets[e], counts[e]
            if all(step_one[s:s + n - 1]):
                contiguous[e] = (tok_list[s], tok_list[s] + n)
    return LoraMeta(idx, w, num_adapters, token_idx, pair_w, pair_adapter, counts, offsets, active, contiguous)


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


@BACKENDS.register("cpu")
def lora_cpu(y: torch.Tensor, x: torch.Tensor, wts: AdapterWeights, meta: LoraMeta) -> None:
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
            y.index_add_(0, rows, h @ wts.b[e].T)


def uniform_blocks(meta: LoraMeta) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """(S, adapter per block [B], weight per block [B]) when tokens form B equal blocks of S tokens,
    each with exactly one pair and one weight (one adapter per sequence: the common serving case)."""
    cache = meta.__dict__.setdefault("_uniform", {})
    if "v" not in cache:
        cache["v"] = None
        t = meta.num_tokens
        if meta.idx.shape[1] == 1 and t and len(meta.token_idx) == t and len(meta.contiguous) == len(meta.active):
            first = meta.idx[:, 0]
            ranges = sorted(meta.contiguous.values())
            lengths = {b - a for a, b in ranges}
            if len(lengths) == 1:
                s_len = lengths.pop()
                w_col = meta.w[:, 0]
                if bool((w_col.view(-1, s_len) == w_col.view(-1, s_len)[:, :1]).all()):
                    cache["v"] = (s_len, first.view(-1, s_len)[:, 0].clone(), w_col.view(-1, s_len)[:, 0].clone())
    return cache["v"]


@BACKENDS.register("cpu_bmm")
def lora_cpu_bmm(y: torch.Tensor, x: torch.Tensor, wts: AdapterWeights, meta: LoraMeta) -> None:
    """Uniform blocks (see uniform_blocks): gather each block's A/B and run two batched matmuls.
    Falls back to the grouped `cpu` backend otherwise. Ranks are padded (to 8) here."""
    u = uniform_blocks(meta)
    if u is None:
        return lora_cpu(y, x, wts, meta)
    s_len, ad, w = u
    a_pad, b_pad, _ = wts.padded
    nb = ad.numel()
    coef = (w.to(x.dtype) * wts.scale.to(x.dtype)[ad])[:, None, None]
    h = torch.bmm(x.view(nb, s_len, -1), a_pad[ad].transpose(1, 2)).mul_(coef)  # [B, S, R]
    y.view(nb, s_len, -1).baddbmm_(h, b_pad[ad].transpose(1, 2))
@BACKENDS.register("grouped_mm")
def lora_grouped_mm(y: torch.Tensor, x: torch.Tensor, wts: AdapterWeights, meta: LoraMeta) -> None:
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
            return "grouped_mm" if hasattr(torch.nn.functional, "grouped_mm") else "cpu"
    return "cpu"


def apply_lora(y: torch.Tensor, x: torch.Tensor, wts: AdapterWeights, meta: LoraMeta, backend: str | None = None) -> torch.Tensor:
    """y [T, d_out] += the LoRA mixture of x [T, d_in]; returns y."""
    name = backend or default_backend(x.device)
    if name == "triton":
        from . import triton_lora  # noqa: F401  (registers the backend)
    BACKENDS.get(name)(y, x, wts, meta)
    return y
