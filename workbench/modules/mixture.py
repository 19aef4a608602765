"""Per-sample mixtures of low-rank experts inside a model's linear layers.

`MixtureLinear` wraps a linear layer: y = W x + sum_t w[b, t] * B_t (A_t x), where the
per-sample weights w [batch, T] live in one `MixtureContext` shared by every wrapped
layer (computed once per forward, not per layer). No per-input model copies: a batch
whose inputs have different weights runs as one batched low-rank mixture.
"""

from __future__ import annotations

import torch
from torch import nn


class MixtureContext:
    """The per-batch routing weights read by every MixtureLinear of one model."""

    def __init__(self):
        self.weights: torch.Tensor | None = None  # [batch, T] or None (exclusive parts off)


class MixtureLinear(nn.Module):
    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, ctx: MixtureContext):
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", a.to(base.weight.dtype).contiguous(), persistent=False)  # [T, k, in]
        self.register_buffer("lora_b", b.to(base.weight.dtype).contiguous(), persistent=False)  # [T, out, k]
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self.ctx.weights
        if w is None:
            return y
        # x [b, s, in] -> h [b, s, T, k] -> weighted per sample -> [b, s, out]
        h = torch.einsum("bsi,tki->bstk", x, self.lora_a)
        h = h * w[:, None, :, None].to(h.dtype)
        return y + torch.einsum("bstk,tok->bso", h, self.lora_b)


def get_module(model: nn.Module, dotted: str) -> nn.Module:
    m = model
    for part in dotted.split("."):
        m = getattr(m, part)
    return m


def set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(get_module(model, parent) if parent else model, leaf, new)
