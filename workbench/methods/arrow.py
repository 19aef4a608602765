"""Arrow (Ostapenko et al. 2024): training-free per-token routing over LoRA experts.

Prototype of expert e at a module: the top right singular vector p_e of its delta s_e B_e A_e
(unit norm, in input space; its sign does not matter). Per token: scores |h . p_e| (h the
module input, not normalised), top-k, softmax of the k scores / temperature (mttl's
ArrowSelector, PEFT's ArrowLoraLinearLayer). Differences from PEFT's `create_arrow_model`:
exact SVD instead of 15 power iterations (equal within their convergence), sparse top-k
dispatch instead of computing every expert, experts may differ in rank and target modules,
and no GenKnowSub (PEFT's `use_gks`, off by default there too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from ..progress import progress_bar
from .base import MAX_K, MAX_TEMPERATURE, BuildContext, MethodParams, register_method
from .routing import RoutedMethod

if TYPE_CHECKING:
    import torch


class ArrowParams(MethodParams):
    k: int = Field(2, gt=0, le=MAX_K, description="experts per token (top-k; at most the number of experts)")
    temperature: float = Field(1.0, gt=0, le=MAX_TEMPERATURE,
                               description="softmax temperature over the top-k scores, (0, 1e4]")


def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """v_1 of B A (A [r, d_in], B [d_out, r]) from an r x r problem: A^T = Q R, B A = (B R^T) Q^T."""
    import torch

    q, r = torch.linalg.qr(a.double().T)  # q [d_in, r]
    _, _, vh = torch.linalg.svd(b.double() @ r.T, full_matrices=False)
    return (q @ vh[0]).float()


@register_method
class Arrow(RoutedMethod):
    name = "arrow"
    Params = ArrowParams
    version = 1
    description = "Arrow: per-token routing by |h . top singular vector of each expert's B A| (training-free)"

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        import torch

        from ..modules.routers import PrototypeRouter

        p: ArrowParams = ctx.params
        experts = ctx.experts
        names = [set(e.delta_names()) for e in experts]
        targets = sorted(set().union(*names))
        shapes = ctx.pool.base.tensors.shapes
        protos = {}
        with progress_bar(f"arrow prototypes ({len(experts)} experts)", total=len(targets)) as bar:
            for t in targets:
                rows = []
                for e, ns in zip(experts, names):
                    if t in ns:
                        a, b, _ = e.lora_factors(t)
                        rows.append(top_right_singular_vector(a, b))
                    else:  # this expert does not adapt the module: never routed to there
                        rows.append(torch.zeros(shapes[t][1]))
                protos[t[: -len(".weight")]] = torch.stack(rows)
                bar.update(1)
        router = PrototypeRouter([e.name for e in experts], protos, k=p.k, temperature=p.temperature,
                                 standardize=False, absolute=True, scale="one", kind="arrow")
        return self.save(ctx, router, {"k": p.k, "temperature": p.temperature})
