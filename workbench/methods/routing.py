"""Routed compositions of a pool's LoRA experts: the `routed_lora` artifact type.

An artifact holds a saved router (`router.json` + `router.safetensors`) and names the pool's
experts it routes over (with their file hashes). Loading wraps the pool's base with every
expert on the routed-LoRA layer and routes each token of every forward (prefill, each decode
step with the KV cache, lm-eval) through the router: the loaded model is a plain HF causal LM.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from ..artifacts import register_artifact
from ..errors import RecipeError, WorkbenchError
from ..tasks.suite import ADD_SPECIAL_TOKENS
from .base import MAX_BATCH, MAX_EXAMPLES, MAX_K, MAX_LENGTH, MAX_SEED, Method, MethodParams

if TYPE_CHECKING:
    from ..modules.routers import BaseRouter


class DataRoutedParams(MethodParams):
    """What every router learned from the experts' own data takes (defaults overridden per method)."""

    k: int = Field(2, gt=0, le=MAX_K, description=f"experts per token (top-k), at most {MAX_K}")
    examples: int = Field(64, gt=0, le=MAX_EXAMPLES, description=f"examples per expert (its own data only), "
                                                                   f"at most {MAX_EXAMPLES}")
    batch_size: int = Field(16, gt=0, le=MAX_BATCH, description=f"examples per step, at most {MAX_BATCH}")
    max_length: int = Field(128, gt=8, le=MAX_LENGTH, description=f"tokens per example, at most {MAX_LENGTH}")
    seed: int = Field(0, ge=0, le=MAX_SEED, description=f"seed, 0..{MAX_SEED}")


class RoutedMethod(Method):
    """Routing over the pool's LoRA experts (one artifact type, one loader)."""

    expert_kinds = frozenset({"lora"})
    outputs = frozenset({"model"})

    def validate(self, experts, params, output) -> None:
        super().validate(experts, params, output)
        if len(experts) < 2:
            raise RecipeError(f"method {self.name!r} routes between experts: give at least 2 (got {len(experts)})")
        k = getattr(params, "k", 1)
        if k > len(experts):
            raise RecipeError(f"top-k {k} is larger than the number of experts ({len(experts)})")

    def save(self, ctx, router: BaseRouter, extra: dict[str, Any]) -> dict[str, Any]:
        router.save(ctx.out_dir)
        return {"type": "routed_lora", "router": router.name, "router_kind": getattr(router, "kind", router.name),
                "pool_root": str(ctx.pool.root.resolve()), **extra}  # build() adds expert_files, pool_fingerprint


class DataRoutedMethod(RoutedMethod):
    """A routed method whose build reads each expert's own training data (PHATGOOSE's gates, average
    activations): every expert must have its data recorded, unchanged, and the recorded hashes are part of the
    artifact key."""

    def validate(self, experts, params, output) -> None:
        super().validate(experts, params, output)
        check_experts_data(experts, self.name)

    def key_inputs(self, experts, params) -> dict[str, Any]:
        return {"data": data_key(experts)}


def check_experts_data(experts, method: str) -> None:
    """Every expert has recorded training data, unchanged since it was recorded (one line otherwise)."""
    from ..errors import PoolError

    for e in experts:
        try:
            e.check_data(method)
        except PoolError as err:
            raise RecipeError(str(err)) from None


def data_key(experts) -> dict[str, list[str]]:
    """What an artifact key sees of the experts' data: each expert's records (content hash, split, fields: the
    rows read), in record order."""
    return {e.name: [r.identity for r in e.data()] for e in experts}


def context_tokens(model, cap: int = 1024) -> int:
    """How many tokens of a text the routers look at: the model's context, at most `cap` (a long text or chat row
    is cut, as training cuts it at max_length)."""
    return min(cap, int(getattr(model.config, "max_position_embeddings", cap) or cap))


def expert_rows(expert, n: int, seed: int, tokenizer=None) -> list[dict[str, Any]]:
    """Up to n of the expert's own training rows (all its datasets, shuffled by `seed`)."""
    import random

    rows = expert.rows(tokenizer)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def expert_examples(expert, tokenizer, n: int, seed: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Up to n of the expert's own training examples (all its datasets, shuffled by `seed`), encoded as training
    does."""
    from ..train.trainer import encode_row

    return [encode_row(tokenizer, r, max_length) for r in expert_rows(expert, n, seed, tokenizer)]


def held_rows(expert, tokenizer, n: int) -> list[dict[str, Any]]:
    """Up to n rows of the expert's data to look at a trained router with: its sources' validation split where
    they have one, else the first rows of its training data."""
    return (expert.rows(tokenizer, split="validation") or expert.rows(tokenizer))[:n]


def checkpoint_path(folder: Path) -> Path:
    """Where a trained router's checkpoint lives while `folder` (its cache entry) is not written yet."""
    return folder.parent / f"{folder.name}.checkpoint.safetensors"


def traced_examples(model, tokenizer, ctx, task: str | list[dict[str, Any]], split: str, n: int):
    """One routing trace per example (question + answer, teacher-forced) of the first `n` of a suite task's split,
    or of the given rows."""
    import torch

    from ..modules.routed_lora import Trace
    from ..tasks.suite import load_split

    device = next(model.parameters()).device
    rows = load_split(task, split) if isinstance(task, str) else task
    for row in rows[:n]:
        ids = tokenizer(row["question"] + row.get("delimiter", " ") + row["answer"], return_tensors="pt",
                        add_special_tokens=ADD_SPECIAL_TOKENS, truncation=True,
                        max_length=context_tokens(model))["input_ids"].to(device)
        trace = Trace()
        with torch.no_grad(), ctx.use(groups=ctx.groups, trace=trace):
            model(input_ids=ids)
        yield trace


def usage_stats(model, tokenizer, tasks: list[str] | dict[str, str] | dict[str, list[dict[str, Any]]], *,
                split: str = "validation", n: int = 10) -> dict[str, Any]:
    """How a routed model spreads its tokens over its experts (or ranks), on `n` teacher-forced examples of each
    task's `split`: per expert the share of the total weight and of the selections (pairs with w > 0), the
    entropy of each share normalised by log E (1 = uniform), the largest share, the mean over modules of each
    module's largest selection share, and per task the weight shares, their entropy and (where a task is labelled
    by an expert's name) that expert's share, plus each token's own mixture: its entropy averaged over the task's
    tokens and module calls (a pooled share near uniform can be one-hot tokens sent anywhere) and the share of
    calls whose top-1 expert is the task's own. `tasks`: task names, expert -> task, or expert -> rows."""
    import math

    import torch

    from ..modules.routers import dense_weights

    ctx = getattr(model, "routing", None)
    if ctx is None or not ctx.groups:
        raise WorkbenchError("this model has no router: usage exists for routed compositions only")
    experts = list(ctx.groups[0].router.experts)
    n_exp = len(experts)
    # label -> a suite task name, or the rows themselves ({label: rows}: an expert's own data)
    if isinstance(tasks, dict) and all(isinstance(v, list) for v in tasks.values()):
        sources: dict[str, Any] = dict(tasks)
    else:
        names = list(tasks.values()) if isinstance(tasks, dict) else list(tasks)
        sources = {t: t for t in dict.fromkeys(names)}
    weight, chosen = torch.zeros(n_exp), torch.zeros(n_exp)
    per_module: dict[str, torch.Tensor] = {}
    per_task, token_entropy, top1 = {}, {}, {}
    log_e = math.log(n_exp) if n_exp > 1 else 1.0
    for task, source in sources.items():
        tw, tw_top1 = torch.zeros(n_exp), torch.zeros(n_exp)
        h_sum, h_n = 0.0, 0
        for trace in traced_examples(model, tokenizer, ctx, source, split, n):
            for module, calls in trace.modules.items():
                idx, w = calls[-1]
                dense = dense_weights(idx, w.float(), n_exp)
                sel = dense_weights(idx, (w > 0).float(), n_exp).sum(0)
                tw += dense.sum(0)
                chosen += sel
                per_module[module] = per_module.get(module, torch.zeros(n_exp)) + sel
                # each token's own mixture: its entropy (a one-hot gate per token gives 0 however the tokens spread)
                # and its top-1 expert (tied experts share the token); a token no expert weights (a module none
                # adapts: the base alone) has no mixture and is left out
                live = dense[dense.sum(-1) > 0]
                share = live / live.sum(-1, keepdim=True)
                h_sum += float(-(share * share.clamp(min=1e-12).log()).sum(-1).sum()) / log_e
                h_n += share.shape[0]
                top = (share == share.max(-1, keepdim=True).values).float()
                tw_top1 += (top / top.sum(-1, keepdim=True)).sum(0)
        weight += tw
        per_task[task] = [round(float(x), 4) for x in tw / tw.sum().clamp(min=1e-12)]
        token_entropy[task] = (round(h_sum / h_n, 4) if n_exp > 1 else 1.0) if h_n else None  # None: no token mixed
        top1[task] = [round(float(x), 4) for x in tw_top1 / tw_top1.sum()] if h_n else [None] * n_exp

    def entropy(share: torch.Tensor) -> float:
        nz = share[share > 0]
        return round(float(-(nz * nz.log()).sum()) / math.log(n_exp), 4) if n_exp > 1 else 1.0

    ws, cs = weight / weight.sum().clamp(min=1e-12), chosen / chosen.sum().clamp(min=1e-12)
    mod_max = [float((c / c.sum().clamp(min=1e-12)).max()) for c in per_module.values()]
    return {"split": split, "n": n, "experts": experts, "weight_share": [round(float(x), 4) for x in ws],
            "select_share": [round(float(x), 4) for x in cs], "weight_entropy": entropy(ws),
            "select_entropy": entropy(cs), "max_weight_share": round(float(ws.max()), 4),
            "max_select_share": round(float(cs.max()), 4),
            "module_max_select_share_mean": round(sum(mod_max) / len(mod_max), 4) if mod_max else None,
            "per_task_weight_share": per_task,
            # pooled entropy near 1 says nothing about routing (a balance loss drives it there by design): per task
            "per_task_weight_entropy": {t: entropy(torch.tensor(share)) for t, share in per_task.items()},
            # label -> the weight share of the expert of the same name (tasks given as {expert: rows})
            "own_weight_share": {t: share[experts.index(t)] for t, share in per_task.items() if t in experts},
            # per token, then averaged: a pooled share near uniform may be one-hot tokens sent anywhere
            "per_task_token_entropy": token_entropy,
            "own_top1_share": {t: share[experts.index(t)] for t, share in top1.items() if t in experts}}


def routed_problem(pool, meta: dict[str, Any], router: BaseRouter | None = None) -> str | None:
    """Why a routed_lora artifact cannot run over `pool` as it is now, or None: another base, an expert
    gone or changed since the router was built, a router over other experts."""
    names = list(meta.get("experts") or [])
    if pool.manifest.base.fingerprint != meta.get("pool_fingerprint"):
        return f"pool {pool.name!r} now has another base than the router was built for"
    gone = [n for n in names if n not in pool]
    if gone or not names:
        return f"its experts {gone or names} are not in pool {pool.name!r}"
    changed = [n for n in names if pool.expert(n).entry.files != (meta.get("expert_files") or {}).get(n)]
    if changed:
        return f"its experts {changed} changed since the router was built; rebuild it"
    if router is not None and router.experts != names:
        return f"its router routes over {router.experts}, not {names}"
    return None


def artifact_pool(path: Path, meta: dict[str, Any], router: BaseRouter | None = None, problem_of=None):
    """The pool a routed artifact runs over here. The artifact cache is shared by every checkout: the pool it
    was built over (`pool_root`) may be another clone's or a removed worktree's, so the recipe's pool as found
    from here is the second candidate; the first that holds the same base and unchanged experts wins
    (`problem_of(pool)`: why the artifact cannot run over a pool, or None; default `routed_problem`)."""
    from ..pool import Pool

    if problem_of is None:
        def problem_of(pool):
            return routed_problem(pool, meta, router)

    problems = []
    for spec in dict.fromkeys([meta.get("pool_root"), (meta.get("recipe") or {}).get("pool")]):
        if not spec:
            continue
        try:
            pool = Pool.open(spec)
        except (WorkbenchError, OSError) as e:
            problems.append(str(e))
            continue
        problem = problem_of(pool)
        if problem is None:
            return pool
        problems.append(problem)
    # the last candidate is the recipe's pool as found from here: its problem is the one to act on
    raise WorkbenchError(f"artifact {path}: {problems[-1] if problems else 'it names no pool'}")


def open_routed(path: Path, meta: dict[str, Any], device: str | None = None, router: BaseRouter | None = None):
    """(model with the router installed, tokenizer, router, routing context) of a routed_lora artifact."""
    from ..modules.routed_lora import RoutedGroup, wrap_experts
    from ..modules.routers import load_router

    router = router or load_router(path, device)
    pool = artifact_pool(path, meta, router)
    experts = [pool.expert(n) for n in meta["experts"]]
    model = pool.base.load(device=device).eval()
    ctx = wrap_experts(model, experts)
    ctx.groups = [RoutedGroup(router, None)]  # every forward routes, also inside generate and lm-eval
    model.routing = ctx
    return model, pool.base.tokenizer(), router, ctx


@register_artifact("routed_lora")
def load_routed(path: Path, meta: dict[str, Any], device: str | None = None):
    from ..eval.harness import LoadedModel

    model, tok, router, _ = open_routed(Path(path), meta, device)
    return LoadedModel(model, tok, meta.get("name", Path(path).name),
                       {"kind": "routed_lora", "method": meta.get("method"), "router": router.config()})


def trace_prompt(model, tokenizer, prompt: str, experts: list[str] | None = None) -> dict[str, Any]:
    """Which experts each token of `prompt` chose at each layer, with what weight.

    `model` is a loaded routed model (its `routing` context holds the router). Returns JSON-ready
    `{prompt, tokens, experts, layers, usage [L][E], choices [T][L][E], modules}`: a layer's weights
    are the mean over its routed modules of each token's expert weights; usage is their mean over tokens.
    """
    import re

    import torch

    from ..modules.routed_lora import Trace
    from ..modules.routers import dense_weights

    ctx = getattr(model, "routing", None)
    if ctx is None or not ctx.groups:
        raise WorkbenchError("this model has no router: traces exist for routed compositions only")
    from ..tracing import check_prompt

    check_prompt(prompt)  # not empty, not over the character cap (every caller: the CLI, the API, the app)
    experts = experts or list(ctx.groups[0].router.experts)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=ADD_SPECIAL_TOKENS)["input_ids"]
    context = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 0)
    if context and ids.shape[1] > context:  # one forward over the whole prompt: never past the model's context
        raise WorkbenchError(f"prompt of {ids.shape[1]:,} tokens is longer than the model's context ({context:,} tokens)")
    ids = ids.to(next(model.parameters()).device)
    trace = Trace()
    with torch.no_grad(), ctx.use(groups=ctx.groups, trace=trace):
        model(input_ids=ids)
    n_exp = len(experts)
    per_layer: dict[int, list[torch.Tensor]] = {}
    for module, calls in trace.modules.items():
        idx, w = calls[-1]
        dense = dense_weights(idx, w.float(), n_exp)
        m = re.search(r"\.layers\.(\d+)\.", module)
        per_layer.setdefault(int(m.group(1)) if m else -1, []).append(dense)
    layers = sorted(per_layer)
    weights = torch.stack([torch.stack(per_layer[i]).mean(0) for i in layers], dim=1)  # [T, L, E]
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    # each token's own text (a byte-level BPE symbol such as "Ġthe" decodes to " the"): what charts show
    return {"prompt": prompt, "tokens": tokens, "text": [tokenizer.convert_tokens_to_string([s]) for s in tokens],
            "experts": experts,
            "layers": layers, "usage": weights.mean(0).round(decimals=4).tolist(),
            "choices": weights.round(decimals=4).tolist(), "modules": len(trace.modules)}


def task_traces(model, tokenizer, expert_tasks: dict[str, str], *, split: str = "test", index: int = 0) -> dict[str, Any]:
    """One prompt per task (example `index` of its `split`), traced: for each, in how many layers the expert trained
    on that task gets the largest mean weight. `expert_tasks`: routed expert -> its task. Returns {tasks: {task:
    {expert, prompt, top_layers, layers, share, top_per_layer, trace}}, summary}."""
    from ..tasks.suite import load_split

    out = {}
    for expert, task in expert_tasks.items():
        prompt = load_split(task, split)[index]["question"]
        tr = trace_prompt(model, tokenizer, prompt)
        if expert not in tr["experts"]:
            raise WorkbenchError(f"expert {expert!r} is not routed by this model ({', '.join(tr['experts'])})")
        e = tr["experts"].index(expert)
        top = [tr["experts"][max(range(len(u)), key=u.__getitem__)] for u in tr["usage"]]
        hits = sum(1 for t in top if t == expert)
        out[task] = {"expert": expert, "prompt": prompt, "top_layers": hits, "layers": len(top),
                     "share": hits / len(top), "mean_weight": sum(u[e] for u in tr["usage"]) / len(top),
                     "top_per_layer": top, "trace": tr}
    held = [v["share"] for v in out.values()]
    return {"split": split, "index": index, "tasks": out,
            "summary": {"tasks_where_matching_expert_tops_most_layers": sum(1 for v in held if v > 0.5),
                        "tasks": len(held), "mean_share": sum(held) / len(held) if held else float("nan")}}


def check_one_expert_per_task(expert_tasks: dict[str, str]) -> None:
    """Router accuracy is per task: two experts of one task would overwrite each other's figures."""
    tasks = list(expert_tasks.values())
    shared = sorted({t for t in tasks if tasks.count(t) > 1})
    if shared:
        raise WorkbenchError(f"experts {sorted(e for e, t in expert_tasks.items() if t == shared[0])} share task "
                             f"{shared[0]!r}: the figure is per task, one expert each")


def router_accuracy(model, tokenizer, expert_tasks: dict[str, str], *, split: str = "validation",
                    n: int = 20) -> dict[str, Any]:
    """How often each layer routes a task's tokens to the expert trained on that task.

    For `n` examples of each task's `split` (question + answer, teacher-forced: the tokens generation routes),
    per layer: the share of the task's tokens (pooled over its examples and the layer's routed modules) whose
    top-1 expert is the task's expert (`top1`) and whose top-k includes it (`in_topk`: among the router's k largest
    weights, and weighted; None for a router without a top-k, such as MoLE's dense gates, which weigh every expert
    for every token). `expert_tasks`:
    expert -> task (one expert per task). Returns {split, n, experts, layers, tasks: {task: {expert, top1 [L],
    in_topk [L], mean_top1, mean_in_topk, confusion {expert: share of top-1 choices}}}, summary}."""
    import re

    import torch

    from ..modules.routers import dense_weights
    from ..tasks.suite import TASKS

    ctx = getattr(model, "routing", None)
    if ctx is None or not ctx.groups:
        raise WorkbenchError("this model has no router: router accuracy exists for routed compositions only")
    experts = list(ctx.groups[0].router.experts)
    k = getattr(ctx.groups[0].router, "k", None)  # None: a dense mixture (every expert weighted): no top-k
    missing = [e for e in expert_tasks if e not in experts]
    if missing:
        raise WorkbenchError(f"experts {missing} are not routed by this model ({', '.join(experts)})")
    check_one_expert_per_task(expert_tasks)
    not_tasks = [t for t in expert_tasks.values() if t not in TASKS]
    if not_tasks:
        raise WorkbenchError(f"{not_tasks[0]!r} is not a suite task with questions and answers")
    out = {}
    all_layers: set[int] = set()
    for expert, task in expert_tasks.items():
        e = experts.index(expert)
        hits: dict[int, list[float]] = {}  # layer -> [top-1 hits, in-top-k hits, tokens]
        confusion = torch.zeros(len(experts))
        for trace in traced_examples(model, tokenizer, ctx, task, split, n):
            for module, calls in trace.modules.items():
                idx, w = calls[-1]
                dense = dense_weights(idx, w.float(), len(experts))
                chosen = torch.where(dense.sum(-1) > 0, dense.argmax(-1), -1)  # -1: no expert (the base)
                m = re.search(r"\.layers\.(\d+)\.", module)
                h = hits.setdefault(int(m.group(1)) if m else -1, [0.0, 0.0, 0.0])
                h[0] += float((chosen == e).sum())
                if k is not None:
                    top = dense.topk(min(int(k), len(experts)), dim=-1)
                    h[1] += float(((top.indices == e) & (top.values > 0)).any(-1).sum())
                h[2] += chosen.numel()
                confusion += torch.bincount(chosen[chosen >= 0], minlength=len(experts)).float()
        if not hits:
            raise WorkbenchError(f"task {task!r}: no routed token in {split} (an empty split?)")
        layers = sorted(hits)
        all_layers.update(layers)
        t1 = [hits[i][0] / hits[i][2] for i in layers]
        tk = [hits[i][1] / hits[i][2] for i in layers] if k is not None else None
        out[task] = {"expert": expert, "layers": layers, "top1": [round(x, 4) for x in t1],
                     "in_topk": [round(x, 4) for x in tk] if tk is not None else None,
                     "mean_top1": round(sum(t1) / len(t1), 4),
                     "mean_in_topk": round(sum(tk) / len(tk), 4) if tk is not None else None,
                     "confusion": {x: round(float(c), 4) for x, c in zip(experts, confusion / confusion.sum().clamp(min=1))}}
    means = [v["mean_top1"] for v in out.values()]
    return {"split": split, "n": n, "experts": experts, "k": k, "layers": sorted(all_layers), "tasks": out,
            "summary": {"mean_top1": round(sum(means) / len(means), 4) if means else None,
                        "mean_in_topk": round(sum(v["mean_in_topk"] for v in out.values()) / len(out), 4)
                        if out and k is not None else None}}


__all__ = ["DataRoutedMethod", "RoutedMethod", "artifact_pool", "check_experts_data", "check_one_expert_per_task",
           "checkpoint_path", "data_key", "expert_examples", "expert_rows", "held_rows", "load_routed", "open_routed", "routed_problem", "router_accuracy",
           "task_traces", "trace_prompt", "usage_stats"]
