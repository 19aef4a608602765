"""Triton SGMV-style kernels for the multi-LoRA op (Punica / vLLM design, written anew).

shrink: per (segment = one active adapter's pairs, block of BLOCK_M pairs):
        h[p, :] = w_p * s_e * x[token_p] @ A_e^T        (fp32 buffer [P, R])
expand: per (segment, block of pairs, block of BLOCK_N outputs):
        y[token_p, n] += h[p, :] @ B_e^T[:, n]          (atomic add: a token may have k > 1 pairs)
Ranks are padded to a power of two >= 16 for tl.dot and masked by the adapter's true rank.
fp32 inputs use IEEE dots (no TF32), so results match the reference to 1e-5.
CI runs these under TRITON_INTERPRET=1 on CPU tensors; timings only mean something on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_lora import BACKENDS, AdapterWeights, LoraMeta


@triton.jit
def _segment_rows(tok_ptr, seg_e_ptr, seg_s_ptr, seg_n_ptr, seg, mblk, BLOCK_M: tl.constexpr):
    """This program's block of pairs in its segment: (adapter, pair rows, their tokens, mask, any left)."""
    n = tl.load(seg_n_ptr + seg)
    e = tl.load(seg_e_ptr + seg)
    start = tl.load(seg_s_ptr + seg)
    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < n
    rows = start + offs_m
    tok = tl.load(tok_ptr + rows, mask=mmask, other=0)
    return e, rows, tok, mmask, mblk * BLOCK_M < n


@triton.jit
def _shrink(x_ptr, a_ptr, scale_ptr, tok_ptr, pw_ptr, seg_e_ptr, seg_s_ptr, seg_n_ptr, h_ptr,
            d_in, R, stride_x, stride_ae, stride_ar,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    e, rows, tok, mmask, any_left = _segment_rows(tok_ptr, seg_e_ptr, seg_s_ptr, seg_n_ptr, tl.program_id(0),
                                                  tl.program_id(1), BLOCK_M)
    if not any_left:
        return
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < d_in
        xk = tl.load(x_ptr + tok[:, None] * stride_x + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        ak = tl.load(a_ptr + e * stride_ae + offs_r[:, None] * stride_ar + offs_k[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(xk, tl.trans(ak), input_precision="ieee")
        else:
            acc += tl.dot(xk, tl.trans(ak))
    w = tl.load(pw_ptr + rows, mask=mmask, other=0.0) * tl.load(scale_ptr + e)
    acc = acc * w[:, None]
    tl.store(h_ptr + rows[:, None] * BLOCK_R + offs_r[None, :], acc, mask=mmask[:, None] & rmask[None, :])


@triton.jit
def _expand(h_ptr, b_ptr, tok_ptr, seg_e_ptr, seg_s_ptr, seg_n_ptr, y_ptr,
            d_out, R, stride_y, stride_be, stride_bo,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    e, rows, tok, mmask, any_left = _segment_rows(tok_ptr, seg_e_ptr, seg_s_ptr, seg_n_ptr, tl.program_id(0),
                                                  tl.program_id(1), BLOCK_M)
    nblk = tl.program_id(2)
    if not any_left:
        return
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    offs_n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < d_out
    h = tl.load(h_ptr + rows[:, None] * BLOCK_R + offs_r[None, :], mask=mmask[:, None] & rmask[None, :], other=0.0)
    b = tl.load(b_ptr + e * stride_be + offs_n[None, :] * stride_bo + offs_r[:, None],
                mask=rmask[:, None] & nmask[None, :], other=0.0)
    if IEEE:
        out = tl.dot(h, b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(h.to(b.dtype), b)
    ptrs = y_ptr + tok[:, None] * stride_y + offs_n[None, :]
    tl.atomic_add(ptrs, out.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _segments(meta: LoraMeta, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per-batch segment table (cached on the metadata: computed once, used by every layer)."""
    cache = meta.__dict__.setdefault("_triton_segments", {})
    if device not in cache:
        act = meta.active
        cache[device] = (torch.tensor(act, dtype=torch.int32, device=device),
                         torch.tensor([meta.offsets[e] for e in act], dtype=torch.int32, device=device),
                         torch.tensor([meta.counts[e] for e in act], dtype=torch.int32, device=device),
                         max((meta.counts[e] for e in act), default=0),
                         meta.token_idx.to(device=device, dtype=torch.int32),
                         meta.pair_w.to(device=device, dtype=torch.float32))
    return cache[device]


@BACKENDS.register("triton")
def lora_triton(y: torch.Tensor, x: torch.Tensor, wts: AdapterWeights, meta: LoraMeta) -> None:
    if not meta.active:
        return
    a_pad, b_pad, _ = wts.padded
    seg_e, seg_s, seg_n, max_n, tok, pw = _segments(meta, x.device)
    r = a_pad.shape[1]
    block_r = max(16, triton.next_power_of_2(r))
    ieee = x.dtype == torch.float32
    block_m = 16 if max_n <= 16 else 32
    h = torch.empty(meta.token_idx.numel(), block_r, dtype=torch.float32, device=x.device)
    x_c, y_c = x.contiguous(), y
    assert y.is_contiguous(), "y must be contiguous"
    scale = wts.scale.to(device=x.device, dtype=torch.float32)
    grid = (len(meta.active), triton.cdiv(max_n, block_m))
    _shrink[grid](x_c, a_pad, scale, tok, pw, seg_e, seg_s, seg_n, h, x.shape[1], r, x_c.stride(0),
                  a_pad.stride(0), a_pad.stride(1), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=32, IEEE=ieee)
    block_n = 64
    grid = (len(meta.active), triton.cdiv(max_n, block_m), triton.cdiv(y.shape[1], block_n))
    _expand[grid](h, b_pad, tok, seg_e, seg_s, seg_n, y_c, y.shape[1], r, y_c.stride(0), b_pad.stride(0),
                  b_pad.stride(1), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=block_n, IEEE=ieee)
