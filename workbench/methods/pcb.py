"""PCB-Merging (Parameter Competition Balancing, NeurIPS 2024).

On the stack D [n experts, P entries] of task vectors:
  1. clamp |D| per row between its q and 1-q order statistics (sign kept),
  2. intra = exp(n * minmax_row(|D|_clamped)^2),
  3. inter = tanh(D * sum_j D_j)  (the raw, unclamped D, as the reference code does),
  4. b = intra * inter; keep each row's top `ratio` fraction: scale = minmax_row(max(b, t_row)),
     t_row the (1 - ratio) order statistic, so dropped entries get 0 and kept ones (0, 1],
  5. merged = sum_i D_clamped_i * scale_i / max(sum_i scale_i, 1e-12);  W = W0 + lambda * merged.

Order statistics are taken at the reference's sorted indices (int(P*q), int(P*(1-q)-1),
int(P*(1-ratio))) by an in-place partial partition, which selects the same values as its full
sort without sorting or copying. Only the
column sum in step 3 couples the experts, so they stream one row at a time (`pcb_merge_rows`):
memory is about 5 x P floats for any number of experts, not n x P.

scope=model (default, the reference): one row per expert over every adapted tensor, so the
quantiles are global (about 2.7 GB for full SmolLM2-135M experts).
scope=tensor: the same steps per tensor, streaming; quantiles become per-tensor, so the
result differs from the reference (documented; use it when n x P does not fit in memory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..progress import progress_bar
from .base import MAX_SCALE, BuildContext, Method, MethodParams, register_method
from .merge_io import write_merged_model, write_refactored_lora

if TYPE_CHECKING:
    import torch


class PCBParams(MethodParams):
    ratio: float = Field(0.1, gt=0, le=1, description="fraction of entries each expert keeps (drop ratio 1 - r), "
                                                      "(0, 1]")
    clamp_q: float = Field(1e-4, ge=0, lt=0.5, description="outlier quantile clamped on both sides, [0, 0.5)")
    lambda_: float = Field(1.0, alias="lambda", ge=-MAX_SCALE, le=MAX_SCALE,
                           description=f"scale of the merged task vector, |lambda| <= {MAX_SCALE:g}")
    scope: Literal["model", "tensor"] = Field("model", description="model: reference semantics; tensor: streaming")


def _kth_inplace(x: torch.Tensor, indices: list[int]) -> list[float]:
    """Values at sorted positions `indices` (0-based) of a 1-D tensor, found by partitioning the
    tensor in place (numpy's introselect): no copy and no index tensor (kthvalue makes both)."""
    arr = x.numpy()
    idx = [min(max(i, 0), arr.size - 1) for i in indices]
    arr.partition(sorted(set(idx)))
    return [float(arr[i]) for i in idx]


def pcb_merge_rows(row: Callable[[int], torch.Tensor], n: int, ratio: float = 0.1, clamp_q: float = 1e-4,
                   chunk: int = 1 << 22) -> torch.Tensor:
    """PCB over n task vectors given one at a time: `row(i)` returns expert i's flat fp32 task
    vector as a fresh tensor (it is modified). Returns the merged task vector (lambda not applied).

    Every step of PCB is per expert except the column sum that inter-balancing needs, so the
    experts stream: pass 1 sums the columns and takes each row's clamp quantiles; pass 2 builds
    one row's balancing scores for its drop threshold, then adds the row's share, recomputing
    the scores chunk by chunk. Peak memory is five vectors of length P (column sum, numerator,
    denominator, one row and its scores), whatever n is; each row is read three times.
    """
    import torch

    colsum: torch.Tensor | None = None
    bounds = []
    for i in range(n):
        d = row(i)
        p = d.numel()
        colsum = d.clone() if colsum is None else colsum.add_(d)
        bounds.append(tuple(_kth_inplace(d.abs_(), [int(p * clamp_q), int(p * (1 - clamp_q) - 1)])))
        del d
    assert colsum is not None
    p = colsum.numel()
    num, den = torch.zeros(p), torch.zeros(p)

    def scores(d: torch.Tensor, sl: slice, lo: float, hi: float, span: float) -> torch.Tensor:
        intra = d[sl].abs().clamp_(min=lo, max=hi).sub_(lo).div_(span).pow_(2).mul_(n).exp_()
        return torch.tanh(d[sl] * colsum[sl]).mul_(intra)  # inter (raw d) x intra (clamped |d|)

    for i, (lo, hi) in enumerate(bounds):
        span = hi - lo if hi > lo else 1.0
        d = row(i)
        b = torch.empty(p)
        for c in range(0, p, chunk):
            b[c:c + chunk] = scores(d, slice(c, c + chunk), lo, hi, span)
        del d
        top = b.max().item()
        t = _kth_inplace(b, [int(p * (1 - ratio))])[0]
        del b
        denom = top - t if top > t else 1.0
        d = row(i)
        for c in range(0, p, chunk):
            sl = slice(c, c + chunk)
            scale = scores(d, sl, lo, hi, span).clamp_(min=t).sub_(t).div_(denom)  # 0: dropped, (0, 1]: kept
            num[sl] += d[sl].abs().clamp_(min=lo, max=hi).mul_(torch.sign(d[sl])).mul_(scale)  # sign(0) = 0
            den[sl] += scale
        del d
    return num.div_(den.clamp_(min=1e-12))


def pcb_merge(d: torch.Tensor, ratio: float = 0.1, clamp_q: float = 1e-4, chunk: int = 1 << 22) -> torch.Tensor:
    """PCB on a stack of task vectors d [n, P] (fp32); returns the merged task vector [P]."""
    return pcb_merge_rows(lambda i: d[i].clone(), d.shape[0], ratio, clamp_q, chunk)


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
        import torch

        params: PCBParams = ctx.params
        names, shapes, name_sets = self._deltas(ctx)
        experts = ctx.experts

        def delta(i: int, name: str) -> torch.Tensor:
            e = experts[i]
            return e.delta(name).flatten() if name in name_sets[i] else torch.zeros(torch.Size(shapes[name]).numel())

        if params.scope == "tensor":
            with progress_bar(f"pcb per tensor ({len(experts)} experts)", total=len(names)) as bar:
                for name in names:
                    merged = pcb_merge_rows(lambda i, nm=name: delta(i, nm), len(experts), params.ratio, params.clamp_q)
                    yield name, merged.mul_(params.lambda_).view(shapes[name])
                    bar.update(1)
            return
        sizes = [torch.Size(shapes[n]).numel() for n in names]

        with progress_bar(f"pcb whole model: task vector reads ({len(experts)} experts)", total=3 * len(experts)) as bar:
            def whole(i: int) -> torch.Tensor:  # expert i's task vector over every adapted tensor
                out = torch.empty(sum(sizes))
                for name, part in zip(names, torch.split(out, sizes)):
                    part.copy_(delta(i, name))
                bar.update(1)
                return out

            merged = pcb_merge_rows(whole, len(experts), params.ratio, params.clamp_q).mul_(params.lambda_)
        for name, chunk in zip(names, torch.split(merged, sizes)):
            yield name, chunk.view(shapes[name])

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        if ctx.output.kind == "lora":
            stats = write_refactored_lora(self.iter_merged(ctx), ctx.output.rank, ctx.out_dir, ctx.pool.manifest.base.spec)
            return {"type": "merged_lora", "engine": "workbench", **stats}
        stats = write_merged_model(ctx.pool.base, self.iter_merged(ctx), ctx.out_dir)
        return {"type": "merged_model", "engine": "workbench", **stats}
