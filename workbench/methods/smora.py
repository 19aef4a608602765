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
from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..artifacts import register_artifact
from ..errors import RecipeError, WorkbenchError
from ..modules.routed_lora import RoutedGroup, get_module, wrap_model
from ..modules.routers import ROUTERS, BaseRouter, load_router
from ..tasks.suite import DEFAULT_SEED
from ..train.trainer import LLAMA_TARGETS
from .base import BuildContext, Method, MethodParams, register_method


# How inference dispatches each token's k ranks: "op" (the R ranks as rank-1 adapters of the multi-LoRA op) or
# "gather" (`SmoraRouter.delta`: the k rows of A and B gathered per token). A serving choice, not saved with an
# artifact: the faster on this project's CPU in `workbench bench routing` (results/bench/routing-cpu.json:
# the op 1.30x base forward and 1.72x decode, the gather path 3.11x and 2.28x, R = 64, k = 8).
DISPATCH = "op"


@ROUTERS.register("smora")
class SmoraRouter(BaseRouter):
    """Per module: the rank-R adapter (A [R, d_in], B [d_out, R]), the router (W [R, d_in], c [R]) and the
    balancing bias [R] (not trained by gradient)."""

    name = "smora"
    kind = "smora"

    def __init__(self, rank: int, dims: dict[str, list[int]], *, k: int = 8, alpha: float = 16.0,
                 balance_rate: float = 1e-3, dispatch: str | None = None):
        super().__init__([f"rank{i}" for i in range(rank)])
        if not 1 <= k <= rank:
            raise WorkbenchError(f"SMoRA top-k {k} must be between 1 and the rank R = {rank}")
        self.rank, self.k, self.alpha, self.balance_rate = rank, k, float(alpha), float(balance_rate)
        self.dims = {m: [int(d[0]), int(d[1])] for m, d in dims.items()}
        self.keys = {m: m.replace(".", "__") for m in dims}
        p = nn.Parameter
        self.A = nn.ParameterDict({self.keys[m]: p(torch.zeros(rank, di)) for m, (di, do) in self.dims.items()})
        self.B = nn.ParameterDict({self.keys[m]: p(torch.zeros(do, rank)) for m, (di, do) in self.dims.items()})
        self.W = nn.ParameterDict({self.keys[m]: p(torch.zeros(rank, di)) for m, (di, do) in self.dims.items()})
        self.c = nn.ParameterDict({self.keys[m]: p(torch.zeros(rank)) for m in self.dims})
        self.bias = nn.ParameterDict({self.keys[m]: p(torch.zeros(rank), requires_grad=False) for m in self.dims})
        dispatch = dispatch or DISPATCH
        if dispatch not in ("op", "gather"):
            raise WorkbenchError(f"SMoRA dispatch must be 'op' or 'gather' (got {dispatch!r})")
        self.dispatch = dispatch  # op: the multi-LoRA op over R rank-1 adapters; gather: `delta` (benchmarked)
        self.counts: dict[str, torch.Tensor] | None = None  # training: selections per rank in this step
        self.token_mask: torch.Tensor | None = None  # training: [B*S] real tokens (counts skip padding)

    def init_weights(self, seed: int) -> None:
        """PEFT's LoRA init (A Kaiming-uniform with a = sqrt(5), B = 0) and nn.Linear's for the router."""
        g = torch.Generator().manual_seed(seed)
        for key in self.keys.values():
            for t in (self.A[key], self.W[key]):
                bound = 1 / math.sqrt(t.shape[1])  # kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                with torch.no_grad():
                    t.copy_(torch.rand(t.shape, generator=g) * 2 * bound - bound)
            with torch.no_grad():
                bound = 1 / math.sqrt(self.W[key].shape[1])
                self.c[key].copy_(torch.rand(self.rank, generator=g) * 2 * bound - bound)

    @property
    def scale(self) -> float:
        return self.alpha / self.k

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "dims": self.dims, "k": self.k, "alpha": self.alpha,
                "balance_rate": self.balance_rate}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SmoraRouter:
        router = cls(config["rank"], config["dims"], k=config["k"], alpha=config["alpha"],
                     balance_rate=config.get("balance_rate", 1e-3))  # dispatch: DISPATCH, a serving choice
        router.load_state_dict(tensors)
        return router.eval()

    def handles(self, module: str) -> bool:
        return module in self.keys

    def _key(self, module: str) -> str:
        key = self.keys.get(module)
        if key is None:
            raise WorkbenchError(f"SMoRA adapter has no module {module!r}")
        return key

    def scores(self, module: str, x: torch.Tensor) -> torch.Tensor:
        key = self._key(module)
        return torch.sigmoid(nn.functional.linear(x, self.W[key].to(x.dtype), self.c[key].to(x.dtype)))

    def route(self, module: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if module not in self.keys:  # a module the adapter does not target (in a server holding other adapters)
            return (torch.full((x.shape[0], 1), -1, dtype=torch.long, device=x.device),
                    torch.zeros(x.shape[0], 1, device=x.device))
        s = self.scores(module, x)
        sel = (s + self.bias[self._key(module)].to(s.dtype)).topk(self.k, dim=-1).indices  # the bias only selects
        g = s.gather(1, sel)
        g = g / g.sum(-1, keepdim=True) * self.k
        if self.counts is not None:
            rows = sel if self.token_mask is None else sel[self.token_mask.reshape(-1).bool()]
            c = torch.bincount(rows.reshape(-1), minlength=self.rank).float()
            self.counts[module] = self.counts.get(module, torch.zeros_like(c)) + c.cpu()
        return sel, g

    def weights(self, module: str, x: torch.Tensor) -> torch.Tensor:
        sel, g = self.route(module, x)
        return torch.zeros(x.shape[0], self.rank, dtype=g.dtype, device=g.device).scatter(1, sel, g)

    def delta(self, module: str, x: torch.Tensor,
              routed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The gather path: per token only its k ranks, (alpha/k) sum_j g_j B[:, j] (A[j] . x), from gathered rows
        (`routed`: this call's (ranks, gates) when the caller already routed x)."""
        sel, g = routed if routed is not None else self.route(module, x)
        key = self._key(module)
        a, bt = self.A[key], self.B[key].T  # [R, d_in], [R, d_out]
        h = torch.einsum("tki,ti->tk", a[sel].to(x.dtype), x) * g.to(x.dtype) * self.scale  # [T, k]
        return torch.einsum("tk,tko->to", h, bt[sel].to(x.dtype))

    def own_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The R ranks as R rank-1 experts (A [R, 1, d_in], B [R, d_out, 1], scale alpha/k), trainable."""
        key = self._key(module)
        a, b = self.A[key], self.B[key]
        return a[:, None, :], b.T[:, :, None], torch.full((self.rank,), self.scale, device=a.device)

    def update_bias(self) -> None:
        """bias_j += u * sign(mean count - count_j) per module, from the counts recorded since the last call."""
        for module, c in (self.counts or {}).items():
            b = self.bias[self._key(module)]
            b.data += self.balance_rate * torch.sign(c.mean() - c).to(b.device)
        if self.counts is not None:
            self.counts = {}

    def lora_factors(self, module: str) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """Rank j as a rank-1 adapter (A[j:j+1], B[:, j:j+1], alpha/k): what the multi-LoRA op dispatches."""
        key = self._key(module)
        a, b = self.A[key].detach(), self.B[key].detach()
        return [(a[j: j + 1], b[:, j: j + 1], self.scale) for j in range(self.rank)]


class SmoraParams(MethodParams):
    rank: int = Field(64, gt=0, description="total rank R: each rank is an expert")
    k: int = Field(8, gt=0, description="ranks per token (top-k): the activated rank")
    alpha: float = Field(16.0, gt=0, description="scale alpha / k on the k active ranks")
    balance_rate: float = Field(1e-3, ge=0, description="loss-free balancing step u of the selection bias")
    targets: list[str] = Field(default_factory=lambda: list(LLAMA_TARGETS), description="target module names")
    steps: int = Field(240, gt=0, description="optimizer steps (the demo pool's multitask LoRA: 240)")
    batch_size: int = Field(32, gt=0)
    lr: float = Field(2e-3, gt=0)
    warmup: int = Field(10, ge=0)
    seed: int = 0
    max_length: int = Field(128, gt=8)
    data_seed: int = DEFAULT_SEED
    checkpoint_every: int = Field(40, gt=0, description="steps between training checkpoints (resume after a kill)")


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
            raise RecipeError("SMoRA trains on the experts' tasks: name at least one expert")
        for e in experts:
            if not e.tasks():
                raise RecipeError(f"expert {e.name!r} has no training data for SMoRA (its manifest entry names no "
                                  "task: add a tag task=<suite task>)")
        shapes = experts[0].pool.base.tensors.shapes
        hit = [t for t in shapes if t.endswith(".weight") and t.split(".")[-2] in params.targets and len(shapes[t]) == 2]
        if not hit:
            raise RecipeError(f"SMoRA targets {params.targets} match no linear module of the base")

    def key_inputs(self, experts, params) -> dict[str, Any]:
        from ..tasks.suite import data_hash

        return {"data": {t: data_hash(t, params.data_seed) for t in smora_tasks(experts)}}

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        from ..train.trainer import Checkpoint, task_examples, train_loop
        from .routing import checkpoint_path, usage_stats

        p: SmoraParams = ctx.params
        tasks = smora_tasks(ctx.experts)
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

        from ..io import sha256_json

        key = sha256_json({"version": self.version, "params": p.model_dump(mode="json", exclude={"checkpoint_every"}),
                           "tasks": tasks, "base": ctx.pool.manifest.base.fingerprint,
                           "data": self.key_inputs(ctx.experts, p)})[:16]
        folder = ctx.out_dir.parent / "smora-train" / key
        with routing.use(groups=[RoutedGroup(router, None)], dense=True):
            res = train_loop(model, tok, task_examples(tasks, p.data_seed), p, params,
                             f"smora R={p.rank} k={p.k} on {len(tasks)} tasks", ctx.device, loss_fn=loss_fn,
                             after_step=after_step,
                             checkpoint=Checkpoint(checkpoint_path(folder), router, p.checkpoint_every, extra=kept))
        router.eval()
        loaded, lctx = smora_model(base, router, ctx.device)
        usage = usage_stats(loaded, tok, tasks, n=10)
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


def smora_tasks(experts) -> list[str]:
    return list(dict.fromkeys(t for e in experts for t in e.tasks()))


def smora_model(base, router: SmoraRouter, device: str | None = None):
    """The base with the SMoRA adapter on the routed-LoRA layer (R rank-1 adapters, routed per token)."""
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
    from .routing import artifact_pool

    router = load_router(Path(path), device)
    pool = artifact_pool(Path(path), meta, problem_of=lambda p: smora_problem(p, meta))
    model, _ = smora_model(pool.base, router, device)
    return LoadedModel(model, pool.base.tokenizer(), meta.get("name", Path(path).name),
                       {"kind": "smora", "method": "smora", "router": router.config() | {"dims": None}})
