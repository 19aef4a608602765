"""Average-activation routing (the PHATGOOSE paper's baseline; mttl's `avg_act` selector).

Prototype of expert e at a module: the mean of that module's input over the tokens of e's own
training examples, run with e applied (no training). Routing as PHATGOOSE's router: LN(h).LN(p)/sqrt(d),
softmax, top-k, renormalised (the PHATGOOSE repository routes its averaged hiddens the same way).
mttl's selector differs: its prototypes average each example's last token (`pool="last"`), are
L2-normalised, and score unnormalised inputs at temperature sqrt(d) over every expert: other prototypes
and another softmax sharpness (docs/fidelity.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from ..progress import progress_bar
from .base import MAX_BATCH, MAX_EXAMPLES, MAX_K, MAX_LENGTH, MAX_SEED, BuildContext, no_grad, register_method
from .routing import DataRoutedMethod, DataRoutedParams, expert_examples

if TYPE_CHECKING:
    import torch


class AvgActParams(DataRoutedParams):
    examples: int = Field(64, gt=0, le=MAX_EXAMPLES, description="training examples per expert averaged into its "
                                                                  f"prototypes (at most {MAX_EXAMPLES:,})")
    k: int = Field(2, gt=0, le=MAX_K, description="experts per token (top-k; at most the number of experts)")
    batch_size: int = Field(16, gt=0, le=MAX_BATCH, description=f"examples per forward (1..{MAX_BATCH})")
    max_length: int = Field(128, gt=8, le=MAX_LENGTH, description=f"examples longer than this are truncated "
                                                                  f"(9..{MAX_LENGTH})")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the data sample (0..2**32-1)")


@register_method
class AvgAct(DataRoutedMethod):
    name = "avg_act"
    Params = AvgActParams
    version = 1
    description = "average-activation prototypes (mean module input on each expert's data), PHATGOOSE's router"

    @no_grad
    def build(self, ctx: BuildContext) -> dict[str, Any]:
        import torch

        from ..modules.routed_lora import RoutedGroup, routed_modules, wrap_experts
        from ..modules.routers import FixedRouter, PrototypeRouter
        from ..train.trainer import collate

        p: AvgActParams = ctx.params
        experts = ctx.experts
        base = ctx.pool.base
        model = base.load(device=ctx.device).eval()
        routing = wrap_experts(model, experts)
        mods = routed_modules(model)
        tok = base.tokenizer()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        names = [e.name for e in experts]
        sums = {m: torch.zeros(len(experts), lin.base.in_features) for m, lin in mods.items()}
        counts = torch.zeros(len(experts))
        mask_now: dict[str, torch.Tensor] = {}

        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[module.name][current] += (x * mask_now["m"][:, None]).sum(0).cpu()

        handles = [lin.register_forward_pre_hook(hook) for lin in mods.values()]
        try:
            with progress_bar(f"avg_act prototypes ({len(experts)} experts)", total=len(experts)) as bar:
                for current, e in enumerate(experts):
                    data = expert_examples(e, tok, p.examples, p.seed, p.max_length)
                    forced = FixedRouter(names, [1.0 if i == current else 0.0 for i in range(len(experts))], k=1)
                    with routing.use(groups=[RoutedGroup(forced, None)]):
                        for i in range(0, len(data), p.batch_size):
                            batch = collate(data[i:i + p.batch_size], pad)
                            mask_now["m"] = batch["attention_mask"].reshape(-1).float().to(ctx.device)
                            model(input_ids=batch["input_ids"].to(ctx.device),
                                  attention_mask=batch["attention_mask"].to(ctx.device))
                            counts[current] += mask_now["m"].sum().cpu()
                    bar.update(1)
        finally:
            for h in handles:
                h.remove()
        own = [{t[: -len(".weight")] for t in e.delta_names()} for e in experts]
        protos = {m: torch.stack([s[i] / counts[i] if m in own[i] else torch.zeros(s.shape[1]) for i in range(len(experts))])
                  for m, s in sums.items()}
        router = PrototypeRouter(names, protos, k=p.k, standardize=True, scale="inv_sqrt_d", kind="avg_act")
        return self.save(ctx, router, {"k": p.k, "tokens_averaged": {n: int(c) for n, c in zip(names, counts)}})
