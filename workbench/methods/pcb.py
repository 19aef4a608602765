"""PCB-Merging (Parameter Competition Balancing, NeurIPS 2024).

On the stack D [n experts, P entries] of task vectors:
  1. clamp |D| per row between its q and 1-q order statistics (sign kept),
  2. intra = exp(n * minmax_row(|D|_clamped)^2),
  3. inter = tanh(D * sum_j D_j)  (the raw, unclamped D, as the reference code does),
  4. b = intra * inter; keep each row's top `ratio` fraction: scale = minmax_row(max(b, t_row)),
     t_row the (1 - ratio) order statistic, so dropped entries get 0 and kept ones (0, 1],
  5. merged = sum_i D_clamped_i * scale_i / max(sum_i scale_i, 1e-12);  W = W0 + lambda * merged.

Order statistics use `kthvalue` at the reference's sorted indices (int(P*q), int(P*(1-q)-1),
int(P*(1-ratio))), which selects the same values as its full sort without sorting.

scope=model (default, the reference): one row per expert over every adapted tensor, so the
quantiles are global; needs n x P floats in memory (a few GB for SmolLM2).
scope=tensor: the same steps per tensor, streaming; quantiles become per-tensor, so the
result differs from the reference (documented; use it when n x P does not fit in memory).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from ..progress import progress_bar
from .base import BuildContext, Method, MethodParams, register_method
from .merge_io import write_merged_model, write_refactored_lora


class PCBParams(MethodParams):
    ratio: float = Field(0.1, gt=0, le=1, description="fraction of entries each expert keeps (drop ratio 1 - r)")
    clamp_q: float = Field(1e-4, ge=0, lt=0.5, description="outlier quantile clamped on both sides")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    scope: Literal["model", "tensor"] = Field("model", description="model: reference semantics; tensor: streaming")


def _kth(x: torch.Tensor, index: int) -> torch.Tensor:
    """Row-wise value at sorted position `index` (0-based), as a column [n, 1]."""
    index = min(max(index, 0), x.shape[1] - 1)
    return torch.kthvalue(x, index + 1, dim=1, keepdim=True).values


def pcb_merge(d: torch.Tensor, ratio: float = 0.1, clamp_q: float = 1e-4, chunk: int = 1 << 22) -> torch.Tensor:
    """PCB on task vectors d [n, P] (fp32); returns the merged task vector [P] (lambda not applied).

    Works in place and in column chunks: peak memory is about three n x P tensors
    (d, its clamped magnitudes, the balancing scores), not one per step.
    """
    n, p = d.shape
    step = max(1, chunk // max(n, 1))
    absd = d.abs()
    lo = _kth(absd, int(p * clamp_q))
    hi = _kth(absd, int(p * (1 - clamp_q) - 1))
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))
    colsum = d.sum(dim=0)
    b = torch.empty_like(d)
    for c in range(0, p, step):
        sl = slice(c, c + step)
        a = absd[:, sl].clamp_(min=lo, max=hi)  # in place: |d| clamped per row
        intra = ((a - lo) / span).pow_(2).mul_(n).exp_()
        b[:, sl] = torch.tanh(d[:, sl] * colsum[sl]).mul_(intra)  # inter (raw d) x intra
    t = _kth(b, int(p * (1 - ratio)))
    top = b.max(dim=1, keepdim=True).values
    denom = torch.where(top > t, top - t, torch.ones_like(top))
    num = torch.zeros(p, dtype=d.dtype)
    den = torch.zeros(p, dtype=d.dtype)
    for c in range(0, p, step):
        sl = slice(c, c + step)
        scale = b[:, sl].clamp_(min=t).sub_(t).div_(denom)  # 0 where dropped, (0, 1] where kept
        clamped = absd[:, sl].mul_(torch.sign(d[:, sl]))  # sign(0) = 0, as in the reference
        num[sl] = (clamped * scale).sum(dim=0)
        den[sl] = scale.sum(dim=0)
    return num / den.clamp_(min=1e-12)


@register_method
class PCB(Method):
    name = "pcb"
    Params = PCBParams
    description = "parameter competition balancing: intra/inter balancing, drop, rescale (PCB-Merging)"

    def _deltas(self, ctx: BuildContext):
        name_sets = [set(e.delta_names()) for e in ctx.experts]
        names = sorted(set().union(*name_sets))
        shapes = ctx.pool.base.tensors.shapes
        return names, shapes, name_sets

    def iter_merged(self, ctx: BuildContext):
        params: PCBParams = ctx.params
        names, shapes, name_sets = self._deltas(ctx)

        def stack(name: str) -> torch.Tensor:
            return torch.stack([e.delta(name).flatten() if name in ns else torch.zeros(shapes[name]).flatten()
                                for e, ns in zip(ctx.experts, name_sets)])

        if params.scope == "tensor":
            with progress_bar(f"pcb per tensor ({len(ctx.experts)} experts)", total=len(names)) as bar:
                for name in names:
                    yield name, pcb_merge(stack(name), params.ratio, params.clamp_q).mul_(params.lambda_).view(shapes[name])
                    bar.update(1)
            return
        sizes = [torch.Size(shapes[n]).numel() for n in names]
        d = torch.empty(len(ctx.experts), sum(sizes))
        with progress_bar(f"pcb: loading task vectors ({len(ctx.experts)} experts)", total=len(names)) as bar:
            offset = 0
            for name, size in zip(names, sizes):
                d[:, offset:offset + size] = stack(name)
                offset += size
                bar.update(1)
        merged = pcb_merge(d, params.ratio, params.clamp_q).mul_(params.lambda_)
        del d
        for name, chunk in zip(names, torch.split(merged, sizes)):
            yield name, chunk.view(shapes[name])

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        if ctx.output.kind == "lora":
            stats = write_refactored_lora(self.iter_merged(ctx), ctx.output.rank, ctx.out_dir, ctx.pool.manifest.base.spec)
            return {"type": "merged_lora", "engine": "workbench", **stats}
        stats = write_merged_model(ctx.pool.base, self.iter_merged(ctx), ctx.out_dir)
        return {"type": "merged_model", "engine": "workbench", **stats}
