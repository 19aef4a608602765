"""BAM (Branch-Attend-Mix): a decoder whose attention AND feed-forward blocks are mixtures of experts.

Per layer, with E experts (one per upcycled dense model), H query heads, KV key/value heads, head size D:

- Mixture of Attention, soft routing: every token goes to every attention expert,
  attn(x) = sum_e w_e(x) O_e A_e(x), w = softmax(router(x)) (router: [E, d], no bias, per layer).
  All experts run as ONE attention call: the experts' query heads are stacked (E*H heads); K/V are either
  per expert (`shared_kv=False`: E*KV cached heads, expert e's query heads read its own KV heads) or one
  set shared by all experts (`shared_kv=True`: KV cached heads, the dense model's KV cache size). Expert
  e's output is weighted by w_e before the stacked O projection (O is linear: sum_e w_e O_e a_e).
- FFN: transformers' own Mixtral sparse MoE block (top-k router, experts stored as fused gate_up/down).
- `parallel_attention`: attention and FFN read the same layer input,
  h' = h + attn(ln1(h)) + ffn(ln2(h)), instead of the sequential h1 = h + attn(ln1(h)), h' = h1 + ffn(ln2(h1)).

`BamConfig` extends `MixtralConfig` (model_type "bam") and is registered with AutoConfig /
AutoModelForCausalLM on import, so `AutoModelForCausalLM.from_pretrained(folder)` works after
`import workbench.modules.bam_model` (the artifact loader imports it). The KV cache is transformers'
`DynamicCache` (its layers take whatever head count the first update brings). `output_router_logits=True`
returns the FFN routers' logits and the Switch/Mixtral load-balancing loss (`aux_loss`), as Mixtral does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, MixtralConfig
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.mixtral.modeling_mixtral import (
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
    MixtralSparseMoeBlock,
    MixtralTopKRouter,
    apply_rotary_pos_emb,
    eager_attention_forward,
    load_balancing_loss_func,
)
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs


@strict
class BamConfig(MixtralConfig):
    """Mixtral's config (num_local_experts = E experts in both the attention and the FFN mixtures) plus BAM's
    two switches."""

    model_type = "bam"
    shared_kv: bool = False  # one K/V projection for all attention experts (per-expert Q and O)
    parallel_attention: bool = False  # attention and FFN from the same layer input


class BamAttention(nn.Module):
    """E attention experts, soft-routed: every token gets all of them, weighted by softmax(router(x))."""

    def __init__(self, config: BamConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        e, h, kv = config.num_local_experts, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // h
        self.num_experts, self.num_heads, self.num_kv = e, h, kv
        self.shared_kv = bool(config.shared_kv)
        self.kv_sets = 1 if self.shared_kv else e  # K/V projections (and cached KV head sets)
        # query head i of the stacked call reads KV head i // groups (repeat_kv / sdpa's GQA rule)
        self.num_key_value_groups = (e * h) // kv if self.shared_kv else h // kv
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        d = config.hidden_size
        self.router = nn.Linear(d, e, bias=False)
        self.q_proj = nn.Linear(d, e * h * self.head_dim, bias=False)  # rows: expert-major, as each expert's q_proj
        self.k_proj = nn.Linear(d, self.kv_sets * kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_sets * kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(e * h * self.head_dim, d, bias=False)  # columns: expert-major

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache: Cache | None = None, **kwargs):
        b, s, _ = hidden_states.shape
        e, h, kv, dh = self.num_experts, self.num_heads, self.num_kv, self.head_dim
        w = torch.softmax(self.router(hidden_states).float(), dim=-1).to(hidden_states.dtype)  # [B, S, E]
        q = self.q_proj(hidden_states).view(b, s, e, h, dh)
        if self.shared_kv:
            # order query heads (kv head j, expert e, r) so that i // (E*H/KV) == j: every expert's group j reads j
            q = q.view(b, s, e, kv, h // kv, dh).transpose(2, 3)
        q = q.reshape(b, s, e * h, dh).transpose(1, 2)  # [B, E*H, S, D]
        k = self.k_proj(hidden_states).view(b, s, -1, dh).transpose(1, 2)  # [B, kv_sets*KV, S, D]
        v = self.v_proj(hidden_states).view(b, s, -1, dh).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        out, attn_weights = attention_interface(self, q, k, v, attention_mask,
                                                dropout=0.0 if not self.training else self.attention_dropout,
                                                scaling=self.scaling, **kwargs)  # out: [B, S, E*H, D]
        if self.shared_kv:  # back to expert-major (the output and the recorded attention weights)
            out = out.reshape(b, s, kv, e, h // kv, dh).transpose(2, 3)
            if attn_weights is not None:
                attn_weights = attn_weights.unflatten(1, (kv, e, h // kv)).transpose(1, 2).flatten(1, 3)
        out = out.reshape(b, s, e, h * dh) * w[..., None]  # expert e's heads weighted by w_e
        return self.o_proj(out.reshape(b, s, e * h * dh)), attn_weights


class BamDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BamConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.parallel = bool(config.parallel_attention)
        self.self_attn = BamAttention(config, layer_idx)
        self.mlp = MixtralSparseMoeBlock(config)
        self.input_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, position_ids=None,
                cache: Cache | None = None, **kwargs) -> torch.Tensor:
        residual = hidden_states
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                 position_embeddings=position_embeddings, attention_mask=attention_mask,
                                 position_ids=position_ids, cache=cache, **kwargs)
        if self.parallel:
            return residual + attn + self.mlp(self.post_attention_layernorm(residual))
        hidden_states = residual + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BamPreTrainedModel(PreTrainedModel):
    config_class = BamConfig
    config: BamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BamDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(MixtralTopKRouter, index=0),
        "hidden_states": BamDecoderLayer,
        "attentions": OutputRecorder(BamAttention, index=1),
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MixtralSparseMoeBlock):
            init.normal_(module.experts.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.experts.down_proj, mean=0.0, std=std)
            init.normal_(module.gate.weight, mean=0.0, std=std)


class BamModel(BamPreTrainedModel):
    def __init__(self, config: BamConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([BamDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MixtralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids, cache=cache,
                                  use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class BamForCausalLM(BamPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BamConfig):
        super().__init__(config)
        self.model = BamModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_router_logits: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> MoeCausalLMOutputWithPast:
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else self.config.output_router_logits)
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_router_logits=output_router_logits, **kwargs)
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing_loss_func(outputs.router_logits, self.num_experts, self.num_experts_per_tok,
                                                attention_mask)
            if labels is not None:
                loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits, cache=outputs.cache,
                                         hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                         router_logits=outputs.router_logits)


AutoConfig.register("bam", BamConfig, exist_ok=True)
AutoModel.register(BamConfig, BamModel, exist_ok=True)
AutoModelForCausalLM.register(BamConfig, BamForCausalLM, exist_ok=True)

__all__ = ["BamAttention", "BamConfig", "BamForCausalLM", "BamModel"]
