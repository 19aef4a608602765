"""SMoRA ("Each Rank Could be an Expert", Zhao et al. 2025): one multi-task LoRA whose ranks are experts.

One adapter of total rank R (64) on the target modules; per module and token a router
s = sigmoid(W_r x + c) over the R ranks picks the top-k (8) ranks of s + bias (the bias only
selects), their gates are s at those ranks normalised to sum to k, and the output is
W0 x + (alpha / k) * sum_{j in top-k} g_j B[:, j] (A[j] . x). Loss-free balancing: after each
optimizer step, bias_j += u * sign(mean count - count_j) per module (counts: selections of rank j
over the step's real tokens). With k = R and equal gates it is a plain rank-R LoRA (scale alpha/R).

Trained on the union of the experts' tasks (the held-in tasks) with the trainer that trains every
pool expert (same batches, schedule and steps as the pool's multitask LoRA: the paper's comparison
at equal activated rank). Training runs on the routed-LoRA layer's dense path with the router's own
factors; inference puts the R ranks on the layer as R rank-1 adapters and dispatches each token's k
ranks through the multi-LoRA op (sparse). Artifact type `smora`: loaded for lm-eval and served.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from ..artifacts import register_artifact
from ..errors import RecipeError, WorkbenchError
from ..train.trainer import LLAMA_TARGETS
from .base import (
    MAX_BATCH,
    MAX_LENGTH,
    MAX_LR,
    MAX_RANK,
    MAX_SEED,
    MAX_STEPS,
    MAX_TEMPERATURE,
    BuildContext,
    Method,
    MethodParams,
    check_warmup,
    register_method,
)

if TYPE_CHECKING:
    import torch

    from ..modules.routers import SmoraRouter


class SmoraParams(MethodParams):
    rank: int = Field(64, gt=0, le=MAX_RANK, description=f"total rank R: each rank is an expert (1..{MAX_RANK})")
    k: int = Field(8, gt=0, le=MAX_RANK, description="ranks per token (top-k): the activated rank (at most R)")
    alpha: float = Field(16.0, gt=0, le=MAX_TEMPERATURE, description="scale alpha / k on the k active ranks, (0, 1e4]")
    balance_rate: float = Field(1e-3, ge=0, le=1.0,
                                description="loss-free balancing step u of the selection bias, [0, 1]")
    targets: list[str] = Field(default_factory=lambda: list(LLAMA_TARGETS), description="target module names")
    steps: int = Field(240, gt=0, le=MAX_STEPS,
                       description=f"optimizer steps (the demo pool's multitask LoRA: 240; at most {MAX_STEPS:,})")
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description=f"examples per step (1..{MAX_BATCH})")
    lr: float = Field(2e-3, gt=0, le=MAX_LR, description="AdamW learning rate, (0, 1]")
    warmup: int = Field(10, ge=0, le=MAX_STEPS, description="linear warm-up steps (an explicit one: below steps)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the init and batch order (0..2**32-1)")
    max_length: int = Field(128, gt=8, le=MAX_LENGTH, description=f"examples longer than this are truncated "
                                                                  f"(9..{MAX_LENGTH})")
    checkpoint_every: int = Field(40, gt=0, le=MAX_STEPS,
                                  description="steps between training checkpoints (resume after a kill)")

    @model_validator(mode="after")
    def _warmup_below_steps(self):
        check_warmup(self)
        return self


@register_method
class Smora(Method):
    name = "smora"
    Params = SmoraParams
    expert_kinds = frozenset({"lora", "full"})  # the experts give their tasks' data, not weights
    outputs = frozenset({"model"})
    version = 1
    report = ("loss_curve", "final_loss", "train_wall_s", "resumed_at", "parameter_counts", "usage",
              "usage_during_training")
    description = "SMoRA: one rank-R multi-task LoRA whose ranks are experts, top-k ranks per token (sparse)"

    def validate(self, experts, params, output) -> None:
        super().validate(experts, params, output)
        if params.k > params.rank:
            raise RecipeError(f"SMoRA top-k {params.k} is larger than the rank R = {params.rank}")
        if not experts:
            raise RecipeError("SMoRA trains on the experts' data: name at least one expert")
        from .routing import check_experts_data

        check_experts_data(experts, self.name)
        shapes = experts[0].pool.base.tensors.shapes
        hit = [t for t in shapes if t.endswith(".weight") and t.split(".")[-2] in params.targets and len(shapes[t]) == 2]
        if not hit:
            raise RecipeError(f"SMoRA targets {params.targets} match no linear module of the base")

    def key_inputs(self, experts, params) -> dict[str, Any]:
        return {"data": [r.identity for r, _ in smora_data(experts)]}

    def train_dir(self, ctx: BuildContext) -> Path:
        """The training's checkpoint folder beside the artifacts, keyed by what decides the trained router."""
        from ..io import sha256_json
        from .base import cache_key_extras

        p: SmoraParams = ctx.params
        key = sha256_json({"version": self.version, "params": p.model_dump(mode="json", exclude={"checkpoint_every"}),
                           "tasks": [rec.name for rec, _ in smora_data(ctx.experts)],
                           "base": ctx.pool.manifest.base.fingerprint, "base_weights": ctx.pool.base.weights_sha256,
                           "data": self.key_inputs(ctx.experts, p), **cache_key_extras(ctx)})[:16]
        return ctx.out_dir.parent / "smora-train" / key

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        from ..modules.routed_lora import RoutedGroup, wrap_model
        from ..modules.routers import SmoraRouter
        from ..train.trainer import Checkpoint, train_loop
        from .routing import checkpoint_path, usage_stats

        p: SmoraParams = ctx.params
        data = smora_data(ctx.experts)
        tasks = [rec.name for rec, _ in data]
        base = ctx.pool.base
        shapes = base.tensors.shapes
        targets = sorted(t for t in shapes if t.endswith(".weight") and t.split(".")[-2] in p.targets
                         and len(shapes[t]) == 2)
        dims = {t[: -len(".weight")]: [shapes[t][1], shapes[t][0]] for t in targets}
        router = SmoraRouter(p.rank, dims, k=p.k, alpha=p.alpha, balance_rate=p.balance_rate)
        router.init_weights(p.seed)
        router.to(ctx.device)
        model = base.load(device=ctx.device)
        for prm in model.parameters():
            prm.requires_grad_(False)
        routing = wrap_model(model, targets, lambda t: router.lora_factors(t[: -len(".weight")]), p.rank)
        tok = base.tokenizer()
        params = [q for q in router.parameters() if q.requires_grad]
        kept: dict[str, Any] = {"usage_steps": []}  # saved with the checkpoints (a resumed run keeps the early steps)

        def loss_fn(m, batch):
            router.counts, router.token_mask = {}, batch["attention_mask"]
            return m(**batch).loss

        def after_step(step, batch):
            counts = router.counts or {}
            if counts and (step % 10 == 0 or step == p.steps - 1):
                kept["usage_steps"].append({"step": step, **_count_stats(counts, p.rank)})
            router.update_bias()
            router.counts, router.token_mask = None, None

        from ..io import file_lock, lock_for

        folder = self.train_dir(ctx)
        # one process trains into a checkpoint folder at a time, and holds it until the trained router is saved in
        # the artifact: a build waiting on it never resumes from a checkpoint deleted under it
        with file_lock(lock_for(folder)):
            with routing.use(groups=[RoutedGroup(router, None)], dense=True):
                res = train_loop(model, tok, smora_rows(data, tok), p, params,
                                 f"smora R={p.rank} k={p.k} on {len(tasks)} tasks", ctx.device, loss_fn=loss_fn,
                                 after_step=after_step,
                                 checkpoint=Checkpoint(checkpoint_path(folder), router, p.checkpoint_every, extra=kept))
            router.eval()
            loaded, lctx = smora_model(base, router, ctx.device)
            usage = usage_stats(loaded, tok, {rec.name: smora_rows([(rec, e)], tok, split="validation")
                                              or smora_rows([(rec, e)], tok)[:10] for rec, e in data}, n=10)
            router.cpu()
            router.save(ctx.out_dir)
            checkpoint_path(folder).unlink(missing_ok=True)
        d_in_out = sum(di + do for di, do in dims.values())
        return {"type": "smora", "router": "smora", "router_kind": "smora", "rank": p.rank, "k": p.k,
                "tasks": tasks, "pool_root": str(ctx.pool.root.resolve()),
                "pool_fingerprint": ctx.pool.manifest.base.fingerprint,
                "loss_curve": res.loss_curve, "train_wall_s": round(res.wall_s, 1), "resumed_at": res.extra["resumed_at"],
                "final_loss": round(sum(res.loss_curve[-10:]) / len(res.loss_curve[-10:]), 5),
                "parameter_counts": {"adapter": p.rank * d_in_out, "router": sum(p.rank * (di + 1) for di, _ in dims.values()),
                           "activated_adapter_per_token": p.k * d_in_out},
                "usage": usage, "usage_during_training": kept["usage_steps"]}


def _count_stats(counts: dict[str, torch.Tensor], rank: int) -> dict[str, float]:
    total = sum(counts.values())
    share = total / total.sum().clamp(min=1)
    nz = share[share > 0]
    per_mod = [float((c / c.sum().clamp(min=1)).max()) for c in counts.values()]
    return {"entropy": round(float(-(nz * nz.log()).sum()) / math.log(rank), 4), "max_share": round(float(share.max()), 4),
            "module_max_share_mean": round(sum(per_mod) / len(per_mod), 4)}


def smora_data(experts) -> list[tuple[Any, Any]]:
    """(record, expert) for every dataset the experts learned, each once (by content and fields), in expert order."""
    seen: dict[str, tuple[Any, Any]] = {}
    for e in experts:
        for rec in e.data():
            seen.setdefault(rec.identity, (rec, e))
    return list(seen.values())


def smora_rows(data: list[tuple[Any, Any]], tokenizer, split: str = "train") -> list[dict[str, Any]]:
    """The rows of `smora_data`'s datasets (its expert's pool folder resolves a relative source)."""
    from ..data import read_rows

    return [r for rec, e in data for r in read_rows(rec, tokenizer, split=split, pool_root=e.pool.root,
                                                   who=f"expert {e.name!r}")]


def smora_model(base, router: SmoraRouter, device: str | None = None):
    """The base with the SMoRA adapter on the routed-LoRA layer (R rank-1 adapters, routed per token)."""
    from ..modules.routed_lora import RoutedGroup, wrap_model

    model = base.load(device=device).eval()
    missing = [m for m in router.dims if not _has_module(model, m)]
    if missing:
        raise WorkbenchError(f"SMoRA adapter modules {missing[:2]} are not in base {base.spec!r}")
    routing = wrap_model(model, [f"{m}.weight" for m in router.dims],
                         lambda t: router.lora_factors(t[: -len(".weight")]), router.rank)
    routing.groups = [RoutedGroup(router.to(device or "cpu"), None)]
    model.routing = routing
    return model, routing


def _has_module(model, dotted: str) -> bool:
    from ..modules.routed_lora import get_module

    try:
        get_module(model, dotted)
        return True
    except AttributeError:
        return False


def smora_problem(pool, meta: dict[str, Any]) -> str | None:
    if pool.manifest.base.fingerprint != meta.get("pool_fingerprint"):
        return f"pool {pool.name!r} now has another base than the SMoRA adapter was trained on"
    return None


@register_artifact("smora")
def load_smora(path: Path, meta: dict[str, Any], device: str | None = None):
    from ..eval.harness import LoadedModel
    from ..modules.routers import load_router
    from .routing import artifact_pool

    router = load_router(Path(path), device)
    pool = artifact_pool(Path(path), meta, problem_of=lambda p: smora_problem(p, meta))
    model, _ = smora_model(pool.base, router, device)
    return LoadedModel(model, pool.base.tokenizer(), meta.get("name", Path(path).name),
                       {"kind": "smora", "method": "smora", "router": router.config() | {"dims": None}})


def __getattr__(name: str):
    """SmoraRouter, DISPATCH: defined in `workbench.modules.routers` (an nn.Module needs torch at import, this module
    must not), still importable from here."""
    if name in ("SmoraRouter", "DISPATCH"):
        from ..modules import routers

        return getattr(routers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
