"""PHATGOOSE (Muqeeth et al., ICLR 2024): post-hoc gates, then per-token top-k routing.

1. Per expert and per module it adapts, a gate vector v (init 0): the module's LoRA output is
   multiplied by sigmoid(v . h) per token. Base and LoRA frozen; only v trains, on that expert's
   own training data, as the paper's code trains it (r-three/phatgoose `train_gate.sh`, `train.gin`):
   AdamW, lr 5e-3, weight decay 0, constant after a 6 % warm-up, gradient clipping 1.0, 100 steps.
   Its effective batch is 1,024 (32 x 32 accumulated); here 32 (8 x 4 accumulated: 3,200 examples
   per gate, ~5 min on a 2-core CPU), the one budget difference (docs/methods.md, fidelity table).
   (mttl's PhatgooseTransform trains at lr 1e-3, batch 4: gates that barely open or close.)
2. Routing: scores = LN(h) . LN(v_e) / sqrt(d) (layer norm without affine), softmax over the
   experts, top-k (k = 2), renormalised = softmax over the k scores; y = W0 h + sum w_e s_e B_e A_e h.
Gate training runs on the routed-LoRA layer's dense path (gradient to the gate only); routing
on its sparse path. Each gate's openness (mean sigmoid(v . h) on its own expert's validation
tokens and on the other experts') is recorded in the artifact (`gate_openness`): a gate that is as
open on other tasks' tokens as on its own cannot route.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from ..progress import progress_bar
from .base import MAX_ACCUMULATION, MAX_BATCH, MAX_EXAMPLES, MAX_K, MAX_LENGTH, MAX_LR, MAX_SEED, MAX_STEPS, BuildContext, register_method
from .routing import DataRoutedMethod, DataRoutedParams, expert_examples, held_rows, traced_examples

if TYPE_CHECKING:
    import torch

# held rows per expert on which each gate's openness is measured (own vs the other experts' tokens)
OPENNESS_EXAMPLES = 8


class PhatgooseParams(DataRoutedParams):
    steps: int = Field(100, gt=0, le=MAX_STEPS, description=f"gate training steps per expert (1..{MAX_STEPS:,})")
    lr: float = Field(5e-3, gt=0, le=MAX_LR, description="AdamW learning rate of the gates (the paper's code), (0, 1]")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="warm-up as a fraction of the steps, [0, 1)")
    accumulation: int = Field(4, gt=0, le=MAX_ACCUMULATION,
                              description=f"batches accumulated per step (effective batch = batch_size x this; "
                                          f"1..{MAX_ACCUMULATION})")
    examples: int = Field(400, gt=0, le=MAX_EXAMPLES,
                          description=f"training examples per expert (its own data only; at most {MAX_EXAMPLES:,})")
    k: int = Field(2, gt=0, le=MAX_K, description="experts per token (top-k; at most the number of experts)")
    batch_size: int = Field(8, gt=0, le=MAX_BATCH, description=f"examples per forward (1..{MAX_BATCH})")
    max_length: int = Field(128, gt=8, le=MAX_LENGTH, description=f"examples longer than this are truncated "
                                                                  f"(9..{MAX_LENGTH})")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the data sample (0..2**32-1)")


@register_method
class Phatgoose(DataRoutedMethod):
    name = "phatgoose"
    Params = PhatgooseParams
    version = 2
    report = ("k", "gate_openness")
    description = "PHATGOOSE: sigmoid gates trained post hoc per expert, then per-token top-k routing"

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        import torch

        from ..io import file_lock, lock_for
        from ..modules.routed_lora import routed_modules, wrap_experts
        from ..modules.routers import PrototypeRouter

        p: PhatgooseParams = ctx.params
        experts = ctx.experts
        base = ctx.pool.base
        model = base.load(device=ctx.device)
        for prm in model.parameters():
            prm.requires_grad_(False)
        routing = wrap_experts(model, experts)
        mods = routed_modules(model)
        tok = base.tokenizer()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gates, curves = {}, {}
        for i, e in enumerate(experts):
            # one process trains a gate: another that needs the same gate meanwhile waits, then reads it
            with file_lock(lock_for(self._gate_dir(ctx, e))):
                gates[e.name], curves[e.name] = self._gate(ctx, e, i, model, routing, mods, tok, pad)
        protos = {}
        for m, lin in mods.items():
            protos[m] = torch.stack([gates[e.name].get(m, torch.zeros(lin.base.in_features)) for e in experts])
        router = PrototypeRouter([e.name for e in experts], protos, k=p.k, standardize=True, scale="inv_sqrt_d",
                                 kind="phatgoose")
        summary = {n: {"first": c[0], "last": c[-1], "mean_last_10": round(sum(c[-10:]) / len(c[-10:]), 5)}
                   for n, c in curves.items()}
        openness = gate_openness(model, routing, tok, experts, gates, mods)
        for n, o in openness.items():
            ctx.log(f"phatgoose gate {n}: open {o['own']:.3f} on its own tokens, {o['other']:.3f} on the others'")
        return self.save(ctx, router, {"k": p.k, "gate_loss": summary, "gate_loss_curves": curves,
                                       "gate_openness": openness})

    def _gate(self, ctx: BuildContext, e, i: int, model, routing, mods, tok, pad):
        """Expert e's gate (the i-th expert) and its loss curve: cached or shipped, else trained and cached."""
        import torch

        from ..modules.routed_lora import RoutedGroup
        from ..modules.routers import GateRouter
        from ..train.trainer import check_finite, collate

        p: PhatgooseParams = ctx.params
        cached = self._cached_gates(ctx, e)
        if cached is not None:
            ctx.log(f"phatgoose gate {e.name}: cached")
            return cached
        ctx.log(f"phatgoose gate {e.name}: training ({p.steps} steps of {p.batch_size} x {p.accumulation}; "
                f"no cached or shipped gate {self._gate_dir(ctx, e).name})")
        own = {t[: -len(".weight")] for t in e.delta_names()}
        gate = GateRouter([e.name], {m: mods[m].base.in_features for m in sorted(own)}).to(ctx.device)
        data = expert_examples(e, tok, p.examples, p.seed, p.max_length)
        opt = torch.optim.AdamW(gate.parameters(), lr=p.lr, weight_decay=0.0)
        warm = max(1, int(p.warmup_ratio * p.steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, warm=warm: min(1.0, (s + 1) / warm))
        rng = random.Random(p.seed + i)
        group = [RoutedGroup(gate, None, experts=torch.tensor([i], device=ctx.device))]
        curve = []
        model.train()
        with progress_bar(f"phatgoose gate {e.name}", total=p.steps) as bar, routing.use(groups=group, dense=True):
            for _ in range(p.steps):
                opt.zero_grad()
                total = 0.0
                for _ in range(p.accumulation):  # mean loss over the accumulated batches
                    batch = collate(rng.sample(data, min(p.batch_size, len(data))), pad)
                    loss = model(**{k: v.to(ctx.device) for k, v in batch.items()}).loss / p.accumulation
                    loss.backward()
                    total += float(loss.detach())
                torch.nn.utils.clip_grad_norm_(gate.parameters(), 1.0)
                opt.step()
                sched.step()
                curve.append(round(total, 5))
                bar.update(1, loss=curve[-1])
        model.eval()
        # the loss is that of the gates before each update: the last update is checked here, before caching
        check_finite(list(gate.named_parameters()), f"phatgoose gate {e.name}",
                     f"after the last step ({p.steps - 1})")
        trained = {m: gate.gate(m).detach().cpu() for m in own}
        self._save_gates(ctx, e, trained, curve)
        return trained, curve

    # Gates depend on the expert, its data and the training settings, not on k (or the other experts):
    # cached beside the artifacts, so a sweep over k or another expert set trains each gate once.
    def _gate_dir(self, ctx: BuildContext, expert) -> Path:
        from ..io import sha256_json
        from .base import cache_key_extras
        from .routing import data_key

        p = ctx.params.model_dump(mode="json", exclude={"k"})
        key = sha256_json({"version": self.version, "params": p, "files": expert.entry.files,
                           "base": ctx.pool.manifest.base.fingerprint, "base_weights": ctx.pool.base.weights_sha256,
                           "data": data_key([expert]), **cache_key_extras(ctx)})[:16]
        return ctx.out_dir.parent / "phatgoose-gates" / f"{expert.name}-{key}"

    def _cached_gates(self, ctx: BuildContext, expert):
        """Gates trained before: in the cache, else shipped with the pool (`<pool>/parts/phatgoose-gates/`,
        e.g. the demo pool's, so that the quick demo trains none); the key names the same folder in both."""
        from safetensors.torch import load_file

        folder = self._gate_dir(ctx, expert)
        for f in (folder, ctx.pool.root / "parts" / "phatgoose-gates" / folder.name):
            if (f / "curve.json").is_file() and (f / "gates.safetensors").is_file():
                return load_file(str(f / "gates.safetensors")), json.loads((f / "curve.json").read_text())
        return None

    def _save_gates(self, ctx: BuildContext, expert, gates: dict[str, torch.Tensor], curve: list[float]) -> None:
        from safetensors.torch import save_file

        from ..io import staging_dir

        with staging_dir(self._gate_dir(ctx, expert)) as tmp:
            save_file({m: g.contiguous() for m, g in gates.items()}, str(tmp / "gates.safetensors"))
            (tmp / "curve.json").write_text(json.dumps(curve))


def gate_openness(model, routing, tokenizer, experts, gates: dict[str, dict[str, torch.Tensor]], mods,
                  n: int = OPENNESS_EXAMPLES) -> dict[str, dict[str, Any]]:
    """How open each expert's gate is (mean sigmoid(v . h) over the modules it adapts and the tokens) on `n`
    held rows of each expert's data (its validation split where it has one), with that gate alone active as in
    its training: {expert: {"own": x, "other": mean over the other experts' rows, "by_source": {expert: x}}}."""
    import torch

    from ..modules.routed_lora import RoutedGroup
    from ..modules.routers import GateRouter

    device = next(model.parameters()).device
    rows = {e.name: held_rows(e, tokenizer, n) for e in experts}
    out: dict[str, dict[str, Any]] = {}
    prev = routing.groups
    try:
        for i, e in enumerate(experts):
            g = gates[e.name]
            gate = GateRouter([e.name], {m: g[m].numel() for m in g}, init=g).to(device)
            routing.groups = [RoutedGroup(gate, None, experts=torch.tensor([i], device=device))]
            by_source = {}
            for src, src_rows in rows.items():
                total, count = 0.0, 0
                for trace in traced_examples(model, tokenizer, routing, src_rows, "validation", n):
                    for module, calls in trace.modules.items():
                        if module in g:
                            w = calls[-1][1]
                            total += float(w.float().sum())
                            count += w.numel()
                by_source[src] = round(total / count, 4) if count else None
            others = [v for s, v in by_source.items() if s != e.name and v is not None]
            out[e.name] = {"own": by_source[e.name], "other": round(sum(others) / len(others), 4) if others else None,
                           "by_source": by_source}
    finally:
        routing.groups = prev
    return out
