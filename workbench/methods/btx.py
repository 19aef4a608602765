"""BTX (Branch-Train-MiX, 2024): each dense expert's FFN becomes one expert of a top-k MoE layer.

The N dense experts (full fine-tunes, or LoRA experts materialised into the base) share one base: per layer,
expert e's gate/up/down projections become MoE expert e (Mixtral's w1/w3/w2), a router (random, uniform or from
the experts' data; see `upcycle`) picks the top-k per token, and everything else (attention, embeddings, norms,
lm_head) is the experts' average. Then the MoE trains briefly on the mixture of the experts' data (all
parameters, task loss + load-balancing loss). Saved as a standard MixtralForCausalLM folder: plain
`AutoModelForCausalLM.from_pretrained` loads it, no custom code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import BuildContext, register_method
from .upcycle import (
    Sources,
    UpcycleMethod,
    UpcycleParams,
    ffn_source,
    fill_moe,
    moe_config_kwargs,
)

if TYPE_CHECKING:
    import torch


@register_method
class BTX(UpcycleMethod):
    name = "btx"
    Params = UpcycleParams
    version = 1
    description = "BTX: the experts' FFNs as top-k MoE experts, attention and the rest averaged, then MoE training"

    def make_model(self, ctx: BuildContext, src: Sources, tok) -> tuple[torch.nn.Module, dict[str, Any]]:
        from transformers import MixtralConfig, MixtralForCausalLM

        p: UpcycleParams = ctx.params
        cfg = MixtralConfig(**moe_config_kwargs(src.base.config, len(ctx.experts), p.top_k, p.aux_loss_coef))
        cfg.architectures = ["MixtralForCausalLM"]
        model = MixtralForCausalLM(cfg).float()
        # attention, norms, embeddings, lm_head: the experts' average
        fill_moe(ctx, src, tok, model, {"mlp.gate.weight": "ffn"},
                 lambda name, layer: ffn_source(src, name, layer), "btx: upcycle")
        return model.eval(), {"router_init": p.router_init, "averaged": "attention, embeddings, norms"}
