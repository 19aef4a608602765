"""The task-arithmetic family: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, della.

Full-model experts are merged by mergekit itself (`run_merge`). LoRA experts are merged
exactly in adapter space: per base tensor, the experts' products `scale·B·A` are combined
by mergekit's own `merge_group` (base = 0, so the deltas go in untouched), tensor by tensor.
Plain task arithmetic of LoRAs is linear, so there the sum is one product of the stacked
factors, [λw_1 s_1 B_1, ...] @ [A_1; ...], equal to mergekit's sum up to fp32 rounding.
Parameter names are mergekit's: weight, density, normalize, rescale, lambda, int8_mask,
gamma (breadcrumbs), epsilon (della), and per-expert overrides like mergekit's per-model
`parameters`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field

from ..errors import RecipeError
from ..progress import progress_bar
from .base import MAX_SCALE, MAX_SEED, BuildContext, Method, MethodParams, register_method
from .merge_io import write_merged_model, write_refactored_lora
from .streaming import release_free_memory, tensor_seed

if TYPE_CHECKING:
    import torch


class ExpertParams(Schema):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    weight: float | None = Field(None, ge=-MAX_SCALE, le=MAX_SCALE,
                                 description=f"this expert's weight, |w| <= {MAX_SCALE:g}")
    density: float | None = Field(None, gt=0, le=1, description="fraction of entries kept, (0, 1]")
    gamma: float | None = Field(None, ge=0, lt=1,
                                description="breadcrumbs: fraction of largest entries removed, [0, 1)")
    epsilon: float | None = Field(None, ge=0, lt=1, description="della: spread of keep probabilities, [0, 1)")


class TAParams(MethodParams):
    weight: float = Field(1.0, ge=-MAX_SCALE, le=MAX_SCALE,
                          description=f"weight of every expert (mergekit `weight`), |w| <= {MAX_SCALE:g}")
    density: float = Field(1.0, gt=0, le=1, description="fraction of each task vector kept (TIES/DARE/...), (0, 1]")
    normalize: bool | None = Field(None, description="divide by the sum of weights (default: the method's)")
    rescale: bool | None = Field(None, description="rescale kept entries to the original L1 norm (default: method's)")
    lambda_: float = Field(1.0, alias="lambda", ge=-MAX_SCALE, le=MAX_SCALE,
                           description=f"scale of the merged task vector, |lambda| <= {MAX_SCALE:g}")
    int8_mask: bool = Field(False, description="mergekit's int8 consensus mask")
    gamma: float = Field(0.01, ge=0, lt=1, description="breadcrumbs: fraction of largest entries removed, [0, 1)")
    epsilon: float = Field(0.15, ge=0, lt=1, description="della: spread of keep probabilities, [0, 1)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the random drops (DARE, DELLA; 0..2**32-1)")
    engine: Literal["auto", "mergekit", "workbench"] = Field(
        "auto", description="auto: mergekit for full-model experts, workbench's streaming merge for LoRA")
    per_expert: dict[str, ExpertParams] = Field(default_factory=dict, description="per-expert overrides")


STREAMING = {"task_arithmetic", "ties", "dare_ties", "dare_linear"}  # our streaming engine for full experts
# LoRA experts in adapter space: up to this many, a tensor's task vectors are stacked and merged by mergekit's own
# `merge_group` (the bytes every artifact so far was built with); beyond, one expert's task vector at a time
# (`stream_merge_tensor`: the same arithmetic, memory independent of the number of experts). Task arithmetic's
# stacked-factor product takes this many experts' factors per product.
STREAM_MIN_EXPERTS = 16


def _mk_method(name: str):
    from mergekit.merge_methods import registry

    return registry.get(name)


class TaskArithmeticFamily(Method):
    """One configurable family (mergekit's generalized task arithmetic); see the module doc."""

    Params = TAParams
    version = 2  # 2: random drops seeded per (seed, tensor) in adapter space (were one global seed)

    # Where a form starts density: the schema's default, 1.0, keeps every entry (TIES without its trim step). TIES
    # keeps the top 20% of each task vector (Yadav et al., 2023); random and outlier drops start at half (a middle
    # value to sweep from).
    FORM_DENSITY: ClassVar[dict[str, float]] = {"ties": 0.2}
    FORM_DENSITY_OTHERS: ClassVar[float] = 0.5

    @classmethod
    def form_fields(cls, fields: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The shared schema narrowed by what this mergekit method reads: density and rescale only where it
        sparsifies, gamma for breadcrumbs, epsilon for DELLA, int8_mask with a sign consensus, seed with random
        drops; normalize/rescale shown at the method's own defaults."""
        from mergekit.sparsify import SparsificationMethod

        m = _mk_method(cls.name)
        spec = {p.name for p in m.spec.parameters}
        sparse = m.sparsification_method is not None
        drops = m.sparsification_method in (SparsificationMethod.random, SparsificationMethod.della_magprune)
        ignored = {"density": not sparse, "rescale": not sparse, "gamma": "gamma" not in spec,
                   "epsilon": "epsilon" not in spec, "int8_mask": m.consensus_method is None, "seed": not drops}
        own = {"normalize": m.default_normalize, "rescale": m.default_rescale}
        out = []
        for f in fields:
            if ignored.get(f["name"]):
                continue
            if f["name"] in own:
                f = f | {"type": "boolean", "nullable": False, "default": own[f["name"]], "implied": own[f["name"]]}
            elif f["name"] == "density":
                f = f | {"default": cls.FORM_DENSITY.get(cls.name, cls.FORM_DENSITY_OTHERS)}
            out.append(f)
        return out

    def validate(self, experts, params: TAParams, output) -> None:
        super().validate(experts, params, output)
        unknown = set(params.per_expert) - {e.name for e in experts}
        if unknown:
            raise RecipeError(f"per_expert names experts not in the merge: {str(sorted(unknown))[:120]}")
        if params.engine == "mergekit" and ({e.kind for e in experts} != {"full"} or output.kind != "model"):
            raise RecipeError("engine 'mergekit' takes full-model experts and outputs a model")

    def _expert_values(self, experts, params: TAParams, key: str):
        """Each expert's value of `key`: its per_expert override when set (0 included), else the global one."""
        default = getattr(params, key)
        values = [getattr(params.per_expert.get(e.name, ExpertParams()), key) for e in experts]
        return [default if v is None else v for v in values]

    def _shared(self, params: TAParams) -> dict[str, Any]:
        m = _mk_method(self.name)
        return {"normalize": m.default_normalize if params.normalize is None else params.normalize,
                "rescale": m.default_rescale if params.rescale is None else params.rescale,
                "lambda": params.lambda_, "int8_mask": params.int8_mask}

    def merge_tensor(self, deltas: list[torch.Tensor], experts, params: TAParams) -> torch.Tensor:
        """mergekit's own arithmetic on one tensor's task vectors (base = 0)."""
        import torch
        from mergekit.merge_methods.base import TensorGroup

        m = _mk_method(self.name)
        group = TensorGroup.from_tensors([torch.zeros_like(deltas[0]), *deltas], base_index=0)
        ids = [e.id for e in group.non_base]
        kw = self._shared(params)
        for key in ("weight", "density", "gamma", "epsilon"):
            if key in {p.name for p in m.spec.parameters}:
                kw[key] = dict(zip(ids, self._expert_values(experts, params, key)))
        return m.merge_group(group, **kw)

    def stream_merge_tensor(self, delta, experts, params: TAParams, seed: int, shape) -> torch.Tensor:
        """`merge_tensor` over task vectors read one at a time: `delta(i)` returns expert i's (a fresh fp32 tensor of
        `shape`, modified here), or None where the expert does not change the tensor. mergekit's `merge_group`
        arithmetic (base = 0), with the sums over experts accumulated expert by expert instead of by a reduction
        over the stack: pass 1 sums the weighted, sparsified task vectors (the sign election needs them all), pass
        2 recomputes each and adds its agreeing part. Memory: about five tensors of one task vector's size, whatever
        the number of experts. Equal to `merge_tensor` up to the order of fp32 additions, except:
        - magnitude pruning (TIES) keeps |d| >= the k-th largest |d| (`kthvalue`, found once per expert in pass 1;
          no sort), which differs from mergekit's argsort only where |d| ties exactly at that value;
        - random drops (DARE, DELLA) replay exactly: both passes reseed torch's generator with `seed` and draw in
          expert order as `merge_group` draws (absent experts' zeros included); with deterministic sparsification an
          absent expert is skipped (its zeros add nothing)."""
        import torch
        from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

        m = _mk_method(self.name)
        shared = self._shared(params)
        accepted = {p.name for p in m.spec.parameters}
        per = {key: self._expert_values(experts, params, key)
               for key in ("weight", "density", "gamma", "epsilon") if key in accepted}
        weights = [torch.tensor(w, dtype=torch.float32) for w in per["weight"]]
        n = len(experts)
        method = m.sparsification_method
        random = method in (SparsificationMethod.random, SparsificationMethod.della_magprune)
        thresholds: dict[int, float] = {}  # magnitude: expert -> the k-th largest |d|, found in pass 1

        def magnitude(i: int, d: torch.Tensor) -> torch.Tensor:  # mergekit's `magnitude`, by threshold
            density = per["density"][i]
            if density >= 1:
                return d
            if i not in thresholds:
                mag = d.abs().flatten()
                k = max(1, int(density * mag.numel()))
                thresholds[i] = torch.kthvalue(mag, mag.numel() - k + 1).values.item()
            masked = d * (d.abs() >= thresholds[i])
            if shared["rescale"]:  # mergekit's l1 rescale, the same expressions
                before, after = d.abs().sum(), masked.abs().sum()
                if before >= 1e-7 and after >= 1e-7:
                    masked = masked * (before / after)
            return masked

        def task_vectors():  # (i, w_i * sparsified task vector i), the same values on every call
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for i in range(n):
                    d = delta(i)
                    if d is None:
                        if not random:
                            continue
                        d = torch.zeros(shape)  # its drops are drawn all the same: later experts' draws follow
                    if method == SparsificationMethod.magnitude:
                        d = magnitude(i, d)
                    elif method:
                        d = sparsify(d, density=per["density"][i], method=method,
                                     rescale_norm=RescaleNorm.l1 if shared["rescale"] else None,
                                     **{k: per[k][i] for k in ("gamma", "epsilon") if k in per})
                    yield i, d.mul_(weights[i])

        mixed = torch.zeros(shape)
        if m.consensus_method:
            mask_dtype = torch.int8 if shared["int8_mask"] else torch.float32
            vote = torch.zeros(shape)
            for _, d in task_vectors():
                vote.add_(d if m.consensus_method.value == "sum" else d.sign())  # count: exact integers in fp32
            majority = (vote >= 0).to(mask_dtype) * 2 - 1
            del vote
            divisor = torch.zeros(shape)
            for i, d in task_vectors():
                mask = d.sign().to(mask_dtype) == majority
                mixed.add_(d * mask)
                divisor.add_(weights[i] * mask)
            divisor[divisor == 0] = 1
        else:
            for _, d in task_vectors():
                mixed.add_(d)
            divisor = torch.stack(weights).sum(dim=0).reshape([1] * mixed.dim())
            divisor[divisor.abs() < 1e-8] = 1
        if shared["normalize"]:
            mixed /= divisor
        if shared["lambda"] != 1:
            mixed *= shared["lambda"]
        return torch.zeros_like(mixed).add_(mixed)  # mergekit returns base + mixed: -0.0 becomes 0.0 there too

    def iter_merged_deltas(self, ctx: BuildContext):
        import torch

        experts, params = ctx.experts, ctx.params
        name_sets = [set(e.delta_names()) for e in experts]
        names = sorted(set().union(*name_sets))
        shapes = ctx.pool.base.tensors.shapes
        linear = self.name == "task_arithmetic" and not self._shared(params)["normalize"] \
            and all(e.kind == "lora" for e in experts)
        weights = self._expert_values(experts, params, "weight")
        stream = len(experts) > STREAM_MIN_EXPERTS
        with progress_bar(f"{self.name} ({len(experts)} experts)", total=len(names)) as bar:
            for name in names:
                if linear:
                    # sum_i lambda w_i s_i B_i A_i as products of the stacked factors (STREAM_MIN_EXPERTS experts
                    # per product): the same sum as mergekit's (equal up to fp32 rounding), without forming each delta
                    fac = [(e, w) for e, ns, w in zip(experts, name_sets, weights) if name in ns]
                    out = None
                    for start in range(0, len(fac), STREAM_MIN_EXPERTS):
                        part = [(e.lora_factors(name), w) for e, w in fac[start:start + STREAM_MIN_EXPERTS]]
                        b = torch.cat([f[1] * (f[2] * w * params.lambda_) for f, w in part], dim=1)
                        prod = b @ torch.cat([f[0] for f, _ in part])
                        out = prod if out is None else out.add_(prod)
                        del part, b
                    yield name, out
                elif stream:
                    def delta(i: int, nm: str = name) -> torch.Tensor | None:
                        return experts[i].delta(nm) if nm in name_sets[i] else None

                    merged = self.stream_merge_tensor(delta, experts, params, tensor_seed(params.seed, name, 0),
                                                      shapes[name])
                    release_free_memory()  # memory flat in the number of experts streamed
                    yield name, merged
                else:
                    deltas = [e.delta(name) if name in ns else torch.zeros(shapes[name])
                              for e, ns in zip(experts, name_sets)]
                    # mergekit's random drops draw from torch's global generator: seed it per tensor inside a
                    # fork that restores it afterwards, so the drops depend on (seed, tensor) only and the
                    # caller's random state is untouched
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(tensor_seed(params.seed, name, 0))
                        merged = self.merge_tensor(deltas, experts, params)
                    yield name, merged
                bar.update(1)

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        all_full = {e.kind for e in ctx.experts} == {"full"}
        if ctx.params.engine == "mergekit" or (ctx.params.engine == "auto" and all_full):
            return self._build_mergekit(ctx)
        if all_full and self.name in STREAMING:
            stats = write_merged_model(ctx.pool.base, self.iter_streamed(ctx), ctx.out_dir, absolute=True)
            return {"type": "merged_model", "engine": "workbench-streaming", **stats}
        if ctx.output.kind == "lora":
            stats = write_refactored_lora(self.iter_merged_deltas(ctx), ctx.output.rank, ctx.out_dir,
                                          ctx.pool.manifest.base.spec)
            return {"type": "merged_lora", "engine": "workbench-adapter-space", **stats}
        stats = write_merged_model(ctx.pool.base, self.iter_merged_deltas(ctx), ctx.out_dir)
        return {"type": "merged_model", "engine": "workbench-adapter-space", **stats}

    def iter_streamed(self, ctx: BuildContext):
        """Full experts, our streaming engine (see methods/streaming.py); yields merged weights."""
        from .streaming import merge_full_tensor

        params: TAParams = ctx.params
        m = _mk_method(self.name)
        shared = self._shared(params)
        sparsify = m.sparsification_method.value if m.sparsification_method else None
        base = ctx.pool.base
        names = [n for n in base.tensors.keys() if all(n in e._full for e in ctx.experts)]  # noqa: SIM118 - not a dict
        with progress_bar(f"{self.name} streaming ({len(ctx.experts)} full experts)", total=len(names)) as bar:
            for name in names:
                merged = merge_full_tensor(
                    name, base, ctx.experts, consensus=m.consensus_method is not None, sparsify=sparsify,
                    densities=self._expert_values(ctx.experts, params, "density"),
                    weights=self._expert_values(ctx.experts, params, "weight"), normalize=shared["normalize"],
                    rescale=shared["rescale"], lam=shared["lambda"], seed=params.seed)
                yield name, merged.add_(base.tensors.get(name).float())
                bar.update(1)

    def mergekit_config(self, ctx: BuildContext) -> dict[str, Any]:
        params: TAParams = ctx.params
        m = _mk_method(self.name)
        accepted = {p.name for p in m.spec.parameters}
        models = []
        for e, w, d, g, eps in zip(ctx.experts, *(self._expert_values(ctx.experts, params, k)
                                                   for k in ("weight", "density", "gamma", "epsilon"))):
            p = {"weight": w, "density": d, "gamma": g, "epsilon": eps}
            models.append({"model": str(e.path), "parameters": {k: v for k, v in p.items() if k in accepted}})
        return {"merge_method": self.name, "base_model": str(ctx.pool.base.path), "dtype": "float32",
                "parameters": self._shared(params), "models": models}

    def _build_mergekit(self, ctx: BuildContext) -> dict[str, Any]:
        import torch
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        cfg = self.mergekit_config(ctx)
        with torch.random.fork_rng(devices=[]):  # mergekit seeds the global generator: restore it afterwards
            run_merge(MergeConfiguration.model_validate(cfg), str(ctx.out_dir),
                      options=MergeOptions(copy_tokenizer=True, random_seed=ctx.params.seed, lazy_unpickle=False,
                                           write_model_card=False, quiet=True, device=ctx.device))
        return {"type": "merged_model", "engine": "mergekit", "mergekit_config": cfg}


for _name, _desc in [
    ("task_arithmetic", "W0 + lambda * sum_t w_t d_t"),
    ("ties", "trim to density, elect signs, disjoint mean (TIES)"),
    ("dare_ties", "random drop + rescale, then TIES sign consensus (DARE)"),
    ("dare_linear", "random drop + rescale, then a weighted sum (DARE)"),
    ("breadcrumbs", "drop the smallest and the largest (gamma) entries (Model Breadcrumbs)"),
    ("breadcrumbs_ties", "breadcrumbs with TIES sign consensus"),
    ("della", "magnitude-ranked random drop (DELLA) with TIES consensus"),
    ("della_linear", "magnitude-ranked random drop (DELLA), weighted sum"),
]:
    register_method(type(f"TA_{_name}", (TaskArithmeticFamily,), {"name": _name, "description": _desc}))
