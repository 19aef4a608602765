"""MoLE (Wu et al., ICLR 2024): a learned gate over the pool's frozen LoRA experts.

Per adapted module, a gate reads the experts' own outputs on the token (the paper's
E_Omega(x) = Norm(E_1(x) + ... + E_N(x)), + = concatenation) and projects them to one logit
per expert: logits = LN(concat_i E_i(x)) . e + b, weights = softmax(logits / tau) with a learnable
temperature tau (per module); output = W0 x + sum_i w_i E_i(x). Only e, b and tau train (the base
and every LoRA stay frozen), on a small mixed set of the experts' training data (50 examples per
expert), with the gate-balancing loss L_bal = -sum_i log q_i (q_i: mean weight of expert i over
the gated modules and the batch's tokens) weighted 0.5 (the paper's alpha). The paper trains its NLP
gates 800 iterations of 12 at lr 1e-5 (no code for it is published; the released DreamBooth code
trains only the projection, at lr 1e-5, temperature fixed); on this CPU the gates get 100 steps of 8
at lr 1e-4 (linear decay after 8 warm-up steps): lr x steps 1e-2, the paper's 8e-3 in kind. The gate
reads n x d_out standardised inputs, so one Adam step of lr moves a logit by up to ~0.8 n d_out lr
(14 to 37 at lr 5e-3, the earlier default, for d_out 576 to 1,536: the gates saturated one-hot per
token, each token's expert unrelated to its task). The per-task gate entropy, each token's own entropy and the own expert's
weight and top-1 shares are recorded (`usage`); `balance: 0` is the control.
The paper gates once per layer (its "block"); here every adapted module has its own gate. `gate_input: none` drops the output
projection (a per-module parameter gate, softmax(b / tau)). Inference uses every expert or a
masked subset (`use`: the other experts' logits set to -inf, so the kept weights renormalise),
without retraining: trained gates are cached by expert set and training settings.

Runs on the routed-LoRA layer (`reads_outputs` routers): training on its dense path, inference and
serving through the same layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from ..errors import RecipeError, WorkbenchError
from .base import (
    MAX_BATCH,
    MAX_EXAMPLES,
    MAX_K,
    MAX_LENGTH,
    MAX_LR,
    MAX_SCALE,
    MAX_SEED,
    MAX_STEPS,
    MAX_TEMPERATURE,
    BuildContext,
    cache_key_extras,
    check_warmup,
    register_method,
)
from .routing import DataRoutedMethod, DataRoutedParams, checkpoint_path, expert_rows, held_rows, usage_stats

if TYPE_CHECKING:
    import torch

    from ..modules.routers import MoleRouter


def balance_loss(weights: list[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """-sum_i log q_i, q_i the mean weight of expert i over every gated call and (real) token."""
    import torch

    if not weights:
        raise WorkbenchError("no gate ran: nothing to balance")
    if mask is not None:
        m = mask.reshape(-1).to(weights[0].dtype)
        q = torch.stack([(w * m[:, None]).sum(0) / m.sum().clamp(min=1) for w in weights]).mean(0)
    else:
        q = torch.cat(weights).mean(0)
    return -torch.log(q.clamp(min=1e-12)).sum()


class MoleParams(DataRoutedParams):
    examples: int = Field(50, gt=0, le=MAX_EXAMPLES, description="training examples per expert in the mixed "
                                                                  f"gate-training set (at most {MAX_EXAMPLES:,})")
    steps: int = Field(100, gt=0, le=MAX_STEPS, description=f"gate training steps (1..{MAX_STEPS:,})")
    batch_size: int = Field(8, gt=0, le=MAX_BATCH, description=f"examples per step (1..{MAX_BATCH})")
    lr: float = Field(1e-4, gt=0, le=MAX_LR, description="AdamW learning rate of the gates, (0, 1]")
    warmup: int = Field(8, ge=0, le=MAX_STEPS, description="linear warm-up steps (an explicit one: below steps)")
    balance: float = Field(0.5, ge=0, le=MAX_SCALE,
                           description=f"weight of the gate-balancing loss L_bal, [0, {MAX_SCALE:g}]")
    temperature: float = Field(1.0, gt=0, le=MAX_TEMPERATURE,
                               description="initial softmax temperature (learned), (0, 1e4]")
    max_length: int = Field(128, gt=8, le=MAX_LENGTH, description=f"examples longer than this are truncated "
                                                                  f"(9..{MAX_LENGTH})")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the data sample and batch order (0..2**32-1)")
    gate_input: Literal["outputs", "none"] = Field("outputs", description="gate reads the experts' outputs, or none")
    use: list[str] | None = Field(None, description="experts active at inference (a masked subset), default all")
    gates_from: str | None = Field(None, description="an earlier MoLE artifact folder whose trained gates to reuse")
    checkpoint_every: int = Field(20, gt=0, le=MAX_STEPS,
                                  description="steps between training checkpoints (resume after a kill)")
    k: int = Field(1, gt=0, le=MAX_K, description="unused by MoLE (every expert is active): kept at 1")

    @model_validator(mode="after")
    def _warmup_below_steps(self):
        check_warmup(self)
        return self


@register_method
class Mole(DataRoutedMethod):
    name = "mole"
    Params = MoleParams
    version = 1
    report = ("loss_curve", "loss_first_last", "usage", "temperature", "gates", "k")
    description = "MoLE: a learned per-module gate over the frozen LoRA experts' outputs (softmax with learned tau)"

    def validate(self, experts, params, output) -> None:
        if experts and not experts[0].pool.names("lora"):
            pool = experts[0].pool
            raise RecipeError(f"pool {pool.name!r} has no LoRA experts: MoLE gates LoRA experts "
                              f"(add some with `workbench pool add {pool.name} <adapter folder> <name>`)")
        super().validate(experts, params, output)
        names = [e.name for e in experts]
        if params.use is not None:
            unknown = [u for u in params.use if u not in names]
            if unknown or not params.use:
                raise RecipeError(f"MoLE 'use' names {unknown or 'no expert'}: the gates are trained on {names}")
        if params.gates_from is not None:
            folder = Path(params.gates_from)
            from ..artifacts import read_artifact_meta

            try:
                meta = read_artifact_meta(folder)  # bounded in size and depth
            except WorkbenchError as e:
                raise RecipeError(f"gates_from {folder}: not a built artifact ({str(e)[-80:]})") from None
            if meta.get("method") != "mole":
                raise RecipeError(f"gates_from {folder}: a {meta.get('method')!r} artifact, not a MoLE one")
            if not (folder / "router.safetensors").is_file():
                raise RecipeError(f"gates_from {folder}: no router.safetensors (its gates): build that artifact again")
            if list(meta.get("experts") or []) != names:
                raise RecipeError(f"gates_from {folder} was trained on experts {meta.get('experts')}, "
                                  f"not on {names}: train new gates (drop gates_from) or use the same experts")
            if meta.get("pool_fingerprint") != experts[0].pool.manifest.base.fingerprint:
                raise RecipeError(f"gates_from {folder} was trained over another base")
            trained_input = (meta.get("params") or {}).get("gate_input", "outputs")
            if trained_input != params.gate_input:
                raise RecipeError(f"gates_from {folder} has gates reading {trained_input!r}, not "
                                  f"{params.gate_input!r}: set gate_input: {trained_input} or train new gates")

    def key_inputs(self, experts, params) -> dict[str, Any]:
        out = super().key_inputs(experts, params)
        if any(absent_experts(experts).values()):
            # gates over experts of different target modules never weight an expert where it adapts nothing (a
            # fix: such builds made before it weighted zero outputs); uniform pools keep their keys
            out["absent_masked"] = True
        if params.gates_from is not None:
            from ..io import sha256_file_cached

            # the gates' content, not their file's mtime: the same gates copied elsewhere keep the key, other gates
            # with the same mtime do not
            out["gates_from"] = sha256_file_cached(Path(params.gates_from) / "router.safetensors")
        return out

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        from safetensors.torch import load_file

        from ..io import file_lock, lock_for
        from ..modules.routed_lora import RoutedGroup, routed_modules, wrap_experts
        from ..modules.routers import MoleRouter, load_router

        p: MoleParams = ctx.params
        experts = ctx.experts
        names = [e.name for e in experts]
        model = ctx.pool.base.load(device=ctx.device)
        for prm in model.parameters():
            prm.requires_grad_(False)
        routing = wrap_experts(model, experts)
        mods = routed_modules(model)
        router = MoleRouter(names, {m: lin.base.out_features for m, lin in mods.items()}, gate_input=p.gate_input,
                            temperature=p.temperature, absent=absent_experts(experts, list(mods))).to(ctx.device)
        tok = ctx.pool.base.tokenizer()
        folder = self._gate_dir(ctx)
        if p.gates_from is not None:
            trained = load_router(Path(p.gates_from), ctx.device)
            router.load_state_dict(trained.state_dict())
            from ..artifacts import read_artifact_meta

            curve, source = read_artifact_meta(Path(p.gates_from)).get("loss_curve") or [], str(p.gates_from)
        else:
            # one process trains these gates: another that needs them meanwhile waits, then reads them
            with file_lock(lock_for(folder)):
                if (folder / "gates.safetensors").is_file():
                    router.load_state_dict(load_file(str(folder / "gates.safetensors"), device=ctx.device))
                    curve, source = json.loads((folder / "curve.json").read_text()), "cache"
                    ctx.log("mole gates: cached")
                else:
                    curve = self._train(ctx, model, routing, router, tok, folder)
                    source = "trained"
        router.set_active(p.use)
        router.eval()
        routing.groups = [RoutedGroup(router, None)]
        model.routing = routing
        usage = usage_stats(model, tok, {e.name: held_rows(e, tok, 10) for e in experts}, n=10)
        ctx.log("mole gates: own expert's weight share per task " + ", ".join(
            f"{t} {v:.2f}" for t, v in usage["own_weight_share"].items()) + "; per-task entropy " + ", ".join(
            f"{t} {v:.2f}" for t, v in usage["per_task_weight_entropy"].items()) + "; per-token entropy " + ", ".join(
            f"{t} {v:.2f}" for t, v in usage["per_task_token_entropy"].items()))
        router.cpu()
        taus = {m: round(float(router.log_tau[k].detach().exp()), 4) for m, k in router.keys.items()}
        return self.save(ctx, router, {"k": len(p.use or names), "gates": source, "loss_curve": curve,
                                       "loss_first_last": [curve[0], round(sum(curve[-10:]) / len(curve[-10:]), 5)]
                                       if curve else None, "usage": usage,
                                       "temperature": {"mean": round(sum(taus.values()) / len(taus), 4),
                                                       "min": min(taus.values()), "max": max(taus.values())}})

    def _train(self, ctx, model, routing, router: MoleRouter, tok, folder: Path) -> list[float]:
        import random

        from safetensors.torch import save_file

        from ..modules.routed_lora import RoutedGroup
        from ..train.trainer import Checkpoint, train_loop

        p: MoleParams = ctx.params
        rows = [r for i, e in enumerate(ctx.experts) for r in expert_rows(e, p.examples, p.seed + i, tok)]
        random.Random(p.seed).shuffle(rows)
        group = [RoutedGroup(router, None)]
        params = [q for q in router.parameters() if q.requires_grad]

        def loss_fn(m, batch):
            router.record = []
            try:
                task = m(**batch).loss
                bal = balance_loss(router.record, batch["attention_mask"])
            finally:
                router.record = None
            return task + p.balance * bal

        with routing.use(groups=group, dense=True):
            res = train_loop(model, tok, rows, p, params, f"mole gates ({len(ctx.experts)} experts)", ctx.device,
                             loss_fn=loss_fn, checkpoint=Checkpoint(checkpoint_path(folder), router, p.checkpoint_every))
        from ..io import staging_dir

        with staging_dir(folder) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()},
                      str(tmp / "gates.safetensors"))
            (tmp / "curve.json").write_text(json.dumps(res.loss_curve))
        checkpoint_path(folder).unlink(missing_ok=True)
        return res.loss_curve

    def _gate_dir(self, ctx: BuildContext) -> Path:
        """Trained gates depend on the experts, their data and the training settings, not on `use`: cached beside
        the artifacts, so a masked subset reuses them."""
        from ..io import sha256_json
        from .routing import data_key

        p = ctx.params.model_dump(mode="json", exclude={"use", "gates_from", "k", "checkpoint_every"})
        # the experts in order (the gates' rows and the gate input's blocks follow it), each with its files
        body = {"version": self.version, "params": p, "experts": [(e.name, e.entry.files) for e in ctx.experts],
                "base": ctx.pool.manifest.base.fingerprint, "base_weights": ctx.pool.base.weights_sha256,
                "data": data_key(ctx.experts)}
        if any(absent_experts(ctx.experts).values()):
            body["absent_masked"] = True  # see key_inputs
        body.update(cache_key_extras(ctx))
        key = sha256_json(body)[:16]
        return ctx.out_dir.parent / "mole-gates" / key


def absent_experts(experts, modules: list[str] | None = None) -> dict[str, list[str]]:
    """Per module some expert adapts (or each of `modules`), the experts that do not adapt it."""
    own = {e.name: {t[: -len(".weight")] for t in e.delta_names()} for e in experts}
    mods = modules if modules is not None else sorted(set().union(*own.values()))
    return {m: [n for n, o in own.items() if m not in o] for m in mods}


def __getattr__(name: str):
    """MoleRouter: defined in `workbench.modules.routers` (an nn.Module needs torch at import, this module
    must not), still importable from here."""
    if name == "MoleRouter":
        from ..modules import routers

        return getattr(routers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
