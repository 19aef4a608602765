"""BAM (Branch-Attend-Mix, 2024): FFN experts as in BTX plus each dense expert's attention as an attention expert.

Per layer: the dense experts' FFNs become a top-k MoE (Mixtral's block, as BTX), and their attention blocks a
Mixture of Attention with soft routing (every token to every attention expert, weighted by a per-layer router
softmax). `shared_kv`: one K/V projection (the experts' average) for all attention experts, per-expert Q and O:
the dense model's KV cache size instead of E times it. `parallel_attention`: attention and FFN from the same
layer input (the dense experts were sequential, so this changes the function until trained). Embeddings, norms
and lm_head are averaged; then the MoE trains briefly (all parameters, task + load-balancing loss).
Saved as `BamForCausalLM` (`workbench.modules.bam_model`; `from_pretrained` works after `import workbench`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from .base import BuildContext, register_method
from .upcycle import (
    Sources,
    UpcycleMethod,
    UpcycleParams,
    count_parameters,
    ffn_source,
    fill_moe,
    moe_config_kwargs,
    moe_stats,
)

if TYPE_CHECKING:
    import torch


class BamParams(UpcycleParams):
    shared_kv: bool = Field(False, description="one K/V (averaged) for all attention experts: per-expert Q and O, "
                                               "the dense model's KV cache")
    parallel_attention: bool = Field(False, description="attention and FFN computed from the same layer input")


def attention_source(src: Sources, name: str, layer: int, shared_kv: bool) -> torch.Tensor | None:
    """BAM's stacked attention experts of `layer` from the dense experts' attention, or None for another tensor."""
    import torch

    pre = f"model.layers.{layer}.self_attn."
    if name in (pre + "q_proj.weight",):  # [E*H*D, d]: expert-major rows
        return torch.cat(list(src.stack(name)), dim=0)
    if name in (pre + "k_proj.weight", pre + "v_proj.weight"):
        return src.mean(name) if shared_kv else torch.cat(list(src.stack(name)), dim=0)
    if name == pre + "o_proj.weight":  # [d, E*H*D]: expert-major columns
        return torch.cat(list(src.stack(name)), dim=1)
    return None


@register_method
class BAM(UpcycleMethod):
    name = "bam"
    Params = BamParams
    version = 1
    description = "BAM: FFN experts (top-k) and soft-routed attention experts (optionally shared K/V), then MoE training"

    def make_model(self, ctx: BuildContext, src: Sources, tok) -> tuple[torch.nn.Module, dict[str, Any]]:
        from ..modules.bam_model import BamConfig, BamForCausalLM

        p: BamParams = ctx.params
        e = len(ctx.experts)
        cfg = BamConfig(**moe_config_kwargs(src.base.config, e, p.top_k, p.aux_loss_coef),
                        shared_kv=p.shared_kv, parallel_attention=p.parallel_attention)
        cfg.architectures = ["BamForCausalLM"]
        model = BamForCausalLM(cfg).float()

        def experts(name: str, layer: int) -> torch.Tensor | None:
            t = ffn_source(src, name, layer)
            return t if t is not None else attention_source(src, name, layer, p.shared_kv)

        # embeddings, norms, lm_head: the experts' average
        fill_moe(ctx, src, tok, model, {"mlp.gate.weight": "ffn", "self_attn.router.weight": "attn"}, experts,
                 "bam: upcycle")
        return model.eval(), {"router_init": p.router_init, "shared_kv": p.shared_kv,
                              "parallel_attention": p.parallel_attention, "averaged": "embeddings, norms"
                              + (", K/V projections" if p.shared_kv else "")}

    def stats(self, model) -> dict[str, Any]:
        c = model.config
        return moe_stats(c.to_dict(), count_parameters(model), attention_experts=c.num_local_experts,
                         shared_kv=c.shared_kv)
