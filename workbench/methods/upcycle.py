"""Upcycling N dense experts of one base into one Mixture-of-Experts model, then training it briefly.

Shared by `btx`, `bam` and `mergekit_moe` (one small module each):

- dense experts: a pool's full fine-tunes, or LoRA experts materialised into the base (W0 + s·B·A, only with
  `materialize: true`); read tensor by tensor (`Sources`), never E whole models in memory;
- routers: random (normal, `router_std`), uniform (zero: every expert the same score), or from data: row e of a
  layer's router = the mean, over dense expert e's own training tokens (padding excluded), of the hidden state
  that router reads in that layer (the block's input after its norm), computed with dense expert e itself;
- MoE training (part of `build`, cached with the artifact by its key): ALL parameters train, routers, FFN and
  attention experts and the averaged shared layers (full MoE training as in BTX and BAM), AdamW (routers at
  `router_lr`, the rest at `lr`), linear warm-up then linear decay, on the mixture of the experts' training data;
  loss = task loss (answer tokens) + aux_loss_coef * Switch/Mixtral load-balancing loss of the FFN routers.
  A checkpoint (safetensors: weights and AdamW moments; JSON: step, curves) is written every `checkpoint_every`
  steps beside the artifacts (`upcycle-checkpoints/<method>-<key>/`); a rerun after a kill continues from the
  last one and ends with the same weights as an uninterrupted run (the batch order is a function of the seed);
- stats in artifact.json: parameters (total, active per token), FLOPs per token, KV-cache bytes per token.

The artifact (type `moe`) is a Hugging Face model folder: MixtralForCausalLM (loads with plain transformers)
or BamForCausalLM (`workbench.modules.bam_model`, registered with the Auto classes on import).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from ..artifacts import register_artifact
from ..errors import RecipeError, WorkbenchError
from ..faults import fault_point
from ..io import atomic_write_json, sha256_json, staging_dir
from ..progress import progress_bar
from .base import (
    MAX_BATCH,
    MAX_EXAMPLES,
    MAX_K,
    MAX_LENGTH,
    MAX_LR,
    MAX_SCALE,
    MAX_SEED,
    MAX_STEPS,
    BuildContext,
    Method,
    MethodParams,
    cache_key_extras,
    check_warmup,
    no_grad,
)

if TYPE_CHECKING:
    import torch

UPCYCLABLE = ("LlamaForCausalLM",)  # dense architectures whose layers map onto Mixtral's (and BAM's)
ROUTER_SUFFIXES = ("mlp.gate.weight", "self_attn.router.weight")  # FFN (top-k) and attention (soft) routers


class MoeTrainParams(MethodParams):
    """What every upcycling method takes: the experts, top-k, and the MoE training."""

    materialize: bool = Field(False, description="fold each LoRA expert into the base (W0 + s*B*A) as a dense expert; "
                                                 "without it LoRA experts are refused")
    top_k: int = Field(2, gt=0, le=MAX_K, description="FFN experts per token (top-k of the router; at most the "
                                                       "number of experts)")
    steps: int = Field(60, ge=0, le=MAX_STEPS, description=f"MoE training steps (0: the upcycled model untrained; "
                                                            f"at most {MAX_STEPS:,})")
    batch_size: int = Field(8, gt=0, le=MAX_BATCH, description=f"examples per training step (1..{MAX_BATCH})")
    lr: float = Field(2e-5, gt=0, le=MAX_LR, description="AdamW learning rate of the experts and shared layers, (0, 1]")
    router_lr: float = Field(1e-3, gt=0, le=MAX_LR,
                             description="AdamW learning rate of the routers (new, so faster), (0, 1]")
    warmup: int = Field(5, ge=0, le=MAX_STEPS,
                        description="linear warm-up steps, then linear decay to 0 (an explicit one: below steps)")
    aux_loss_coef: float = Field(0.01, ge=0, le=MAX_SCALE,
                                 description=f"weight of the load-balancing loss (Switch: 0.01), [0, {MAX_SCALE:g}]")
    examples: int = Field(400, gt=0, le=MAX_EXAMPLES,
                          description=f"training examples per expert (its own tasks' train split; at most "
                                      f"{MAX_EXAMPLES:,})")
    max_length: int = Field(128, gt=8, le=MAX_LENGTH,
                            description=f"examples longer than this are truncated (9..{MAX_LENGTH})")
    checkpoint_every: int = Field(20, gt=0, le=MAX_STEPS, description="steps between resumable checkpoints")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the router init, batch order and data sample "
                                                        "(0..2**32-1)")

    @model_validator(mode="after")
    def _warmup_below_steps(self):
        check_warmup(self, zero_steps_ok=True)
        return self


class UpcycleParams(MoeTrainParams):
    router_init: Literal["random", "data", "uniform"] = Field(
        "random", description="routers: random normal, per-expert mean hidden states (data), or zero (uniform)")
    router_std: float = Field(0.02, gt=0, le=10.0, description="std of the random router init, (0, 10]")
    router_init_examples: int = Field(32, gt=0, le=MAX_EXAMPLES,
                                      description="examples per expert for the data init of the routers")


# ----------------------------------------------------------------------------- dense experts


class Sources:
    """The tensors of the upcycled model's inputs, one at a time: dense expert e's weight W_e(name) (its own
    tensor, or W0 + delta for a LoRA expert; W0 where an expert does not change the tensor) and their mean."""

    def __init__(self, base, experts):
        self.base, self.experts = base, experts
        self._names = [set(e.delta_names()) for e in experts]

    def weight(self, i: int, name: str) -> torch.Tensor:
        w0 = self.base.tensors.get(name).float()
        return w0 + self.experts[i].delta(name) if name in self._names[i] else w0

    def stack(self, name: str) -> torch.Tensor:
        import torch

        return torch.stack([self.weight(i, name) for i in range(len(self.experts))])

    def mean(self, name: str) -> torch.Tensor:
        return self.stack(name).mean(0)


def fill_parameters(model: torch.nn.Module, source: Callable[[str], torch.Tensor], desc: str) -> None:
    """Every parameter of `model` set from `source(name)` (shapes checked)."""
    import torch

    params = list(model.named_parameters())
    with torch.no_grad(), progress_bar(desc, total=len(params)) as bar:
        for name, p in params:
            t = source(name)
            if tuple(t.shape) != tuple(p.shape):
                raise WorkbenchError(f"upcycle: {name} would get shape {list(t.shape)}, the model has {list(p.shape)}")
            p.copy_(t.to(p.dtype))
            bar.update(1)


def moe_config_kwargs(base_cfg: dict[str, Any], n_experts: int, top_k: int, aux_loss_coef: float) -> dict[str, Any]:
    """MixtralConfig fields of the MoE upcycled from a Llama base's config.json (dims, rope, norms, ids, tying)."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
            "initializer_range", "tie_word_embeddings", "rope_parameters", "pad_token_id", "bos_token_id",
            "eos_token_id", "attention_dropout")
    kw = {k: base_cfg[k] for k in keys if base_cfg.get(k) is not None}
    if "rope_parameters" not in kw and base_cfg.get("rope_theta") is not None:  # configs saved by transformers 4
        scaling = base_cfg.get("rope_scaling") or {}
        kw["rope_parameters"] = {**scaling, "rope_type": scaling.get("rope_type", scaling.get("type", "default")),
                                 "rope_theta": base_cfg["rope_theta"]}
        kw["rope_parameters"].pop("type", None)
    return {**kw, "num_local_experts": n_experts, "num_experts_per_tok": top_k, "sliding_window": None,
            "router_aux_loss_coef": aux_loss_coef, "router_jitter_noise": 0.0}


def check_base_config(cfg: dict[str, Any], method: str) -> None:
    """Llama features Mixtral's layers cannot hold: refused with one line before any work."""
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise RecipeError(f"{method}: the experts' {flag} is set; Mixtral-style layers have no biases")
    if cfg.get("sliding_window"):
        raise RecipeError(f"{method}: sliding-window attention is not supported")


def cached_base_config(spec: str) -> dict[str, Any] | None:
    """The config.json of a base that is already on disk (None when it would have to be fetched first)."""
    from ..base import BaseModel
    from ..errors import BaseModelError

    try:
        return BaseModel(spec, fetch=False).config
    except BaseModelError:
        return None


def router_init_tensor(kind: str, n: int, d: int, std: float, gen: torch.Generator,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
    import torch

    if kind == "uniform":
        return torch.zeros(n, d)
    if kind == "data":
        return rows.clone()
    return torch.randn(n, d, generator=gen) * std


@no_grad
def data_router_rows(base, experts, tokenizer, n_examples: int, seed: int, max_length: int, batch_size: int,
                     device: str = "cpu", parallel: bool = False) -> dict[str, torch.Tensor]:
    """Per layer and expert, the mean over that expert's training tokens (padding excluded) of the input of its
    attention block (input_layernorm(h)) and of its FFN (post_attention_layernorm(h + attn); with `parallel`
    attention the FFN reads the layer input, post_attention_layernorm(h)), computed with the dense expert itself:
    {"attn": [L, E, d], "ffn": [L, E, d]}."""
    import torch

    from ..train.trainer import collate
    from .routing import expert_examples

    model = base.load(device=device)
    params = dict(model.named_parameters())
    layers = model.model.layers
    n_layers, d = len(layers), model.config.hidden_size
    sums = {"attn": torch.zeros(n_layers, len(experts), d, dtype=torch.float64),
            "ffn": torch.zeros(n_layers, len(experts), d, dtype=torch.float64)}
    state: dict[str, Any] = {}

    def grab(kind: str, layer: int, transform=None):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            x = transform(x) if transform is not None else x
            m = state["mask"]  # [B, S] 1 for real tokens
            sums[kind][layer, state["expert"]] += (x.double() * m[..., None]).sum((0, 1)).cpu()
        return hook

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.register_forward_pre_hook(grab("attn", i), with_kwargs=True))
        if parallel:  # the MoE's FFN will read ln2(layer input), not the dense model's ln2(h + attn)
            hooks.append(layer.register_forward_pre_hook(grab("ffn", i, layer.post_attention_layernorm),
                                                         with_kwargs=True))
        else:
            hooks.append(layer.mlp.register_forward_pre_hook(grab("ffn", i), with_kwargs=True))
    src = Sources(base, experts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    counts = torch.zeros(len(experts), dtype=torch.float64)
    try:
        with progress_bar("router init from data", total=len(experts)) as bar:
            for i, e in enumerate(experts):
                changed = [n for n in e.delta_names() if n in params]
                for n in changed:
                    params[n].copy_(src.weight(i, n).to(params[n].dtype))
                data = expert_examples(e, tokenizer, n_examples, seed, max_length)
                state["expert"] = i
                for j in range(0, len(data), batch_size):
                    batch = collate(data[j:j + batch_size], pad)
                    mask = batch["attention_mask"].to(device)
                    state["mask"] = mask.to(torch.float32)
                    model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
                    counts[i] += float(mask.sum())
                for n in changed:  # back to the base for the next expert
                    params[n].copy_(base.tensors.get(n).to(params[n].dtype))
                bar.update(1)
    finally:
        for h in hooks:
            h.remove()
    return {k: (v / counts.clamp(min=1)[None, :, None]).float() for k, v in sums.items()}


def ffn_source(src: Sources, name: str, layer: int) -> torch.Tensor | None:
    """Mixtral's fused FFN experts of `layer` from the dense experts' MLPs, or None for another tensor."""
    import torch

    pre = f"model.layers.{layer}.mlp."
    if name == pre + "experts.gate_up_proj":  # [E, 2F, d]: gate (w1) then up (w3)
        return torch.cat([src.stack(pre + "gate_proj.weight"), src.stack(pre + "up_proj.weight")], dim=1)
    if name == pre + "experts.down_proj":  # [E, d, F] (w2)
        return src.stack(pre + "down_proj.weight")
    return None


def router_rows(ctx: BuildContext, src: Sources, tok) -> dict[str, torch.Tensor] | None:
    p = ctx.params
    if p.router_init != "data":
        return None
    return data_router_rows(src.base, src.experts, tok, p.router_init_examples, p.seed, p.max_length,
                            p.batch_size, ctx.device, parallel=getattr(p, "parallel_attention", False))


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def fill_moe(ctx: BuildContext, src: Sources, tok, model: torch.nn.Module, routers: dict[str, str],
             expert_source: Callable[[str, int], torch.Tensor | None], desc: str) -> None:
    """Every parameter of an untrained MoE from the dense experts: a router (name ending in a key of `routers`,
    whose value names the rows of `data_router_rows` it reads) by `router_init`, a layer's expert tensors by
    `expert_source(name, layer)` (None: not an expert tensor), the rest the experts' average."""
    import torch

    p = ctx.params
    rows = router_rows(ctx, src, tok)
    gen = torch.Generator().manual_seed(p.seed)
    n, d = len(ctx.experts), model.config.hidden_size

    def source(name: str) -> torch.Tensor:
        m = _LAYER.match(name)
        if m:
            layer = int(m.group(1))
            for suffix, kind in routers.items():
                if name.endswith(suffix):
                    return router_init_tensor(p.router_init, n, d, p.router_std, gen, rows[kind][layer] if rows else None)
            t = expert_source(name, layer)
            if t is not None:
                return t
        return src.mean(name)

    fill_parameters(model, source, desc)


# ----------------------------------------------------------------------------- stats


def moe_stats(cfg: dict[str, Any], total_params: int, *, attention_experts: int = 1, shared_kv: bool = False,
              contexts: tuple[int, ...] = (128, 2048)) -> dict[str, Any]:
    """Parameters, FLOPs and KV-cache bytes per token of a (Mixtral or BAM) config.

    active = total - the FFN experts a token does not use ((E - k) * 3*d*F per layer);
    FLOPs/token(T) = 2 * N_matmul + 4 * L * Hq * D * T, N_matmul = the weights a token multiplies (attention
    projections of every attention expert, routers, k FFN experts, lm_head; not the embedding lookup), Hq the
    query heads attended (E*H for BAM's attention experts), T the context length (QK^T and AV: 2*Hq*D*T each);
    KV bytes/token = 2 (K and V) * L * KV heads cached * D * bytes per element."""
    L, d, F, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    D = cfg.get("head_dim") or d // H
    E, k = cfg.get("num_local_experts", 1), cfg.get("num_experts_per_tok", 1)
    A = attention_experts
    kv_sets = 1 if (A == 1 or shared_kv) else A
    attn = A * 2 * d * H * D + kv_sets * 2 * d * KV * D + (A * d if A > 1 else 0)
    ffn = k * 3 * d * F + (E * d if E > 1 else 0)
    matmul = L * (attn + ffn) + V * d
    per_ctx = 4 * L * A * H * D
    kv_heads = kv_sets * KV
    return {
        "total_parameters": int(total_params),
        "active_parameters_per_token": int(total_params - L * (E - k) * 3 * d * F),
        "flops_per_token": {
            "formula": "2*matmul_params + 4*layers*query_heads*head_dim*context",
            "matmul_params": int(matmul), "attention_flops_per_context_token": int(per_ctx),
            "at_context": {str(t): int(2 * matmul + per_ctx * t) for t in contexts}},
        "kv_cache_bytes_per_token": {"float32": 2 * L * kv_heads * D * 4, "bfloat16": 2 * L * kv_heads * D * 2,
                                     "kv_heads_per_layer": kv_heads},
    }


def dense_stats(base) -> dict[str, Any]:
    cfg = base.config
    return moe_stats({**cfg, "num_local_experts": 1, "num_experts_per_tok": 1}, base.num_parameters())


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights once


# ----------------------------------------------------------------------------- training


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], n_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss over the FFN routers of all layers: E * sum_i f_i * P_i, f_i the share of the
    tokens that have expert i among their top-k (so sum_i f_i = k: the loss is k when perfectly balanced), P_i the
    mean router probability of expert i (real tokens only, all layers pooled). transformers' own function (what
    MixtralForCausalLM adds to its loss)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(tuple(router_logits), n_experts, top_k, attention_mask)


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """The examples of every step, one step at a time (never steps * batch_size indices at once): seeded shuffled
    epochs, a function of (n, seed) only (so a resumed run sees the same batches)."""
    rng, order = random.Random(seed), []
    for _ in range(steps):
        batch = []
        for _ in range(batch_size):
            if not order:
                order = list(range(n))
                rng.shuffle(order)
            batch.append(order.pop())
        yield batch


def _named_trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_checkpoint(folder: Path, model, opt, step: int, record: dict[str, Any]) -> None:
    """Weights and AdamW state (safetensors) and the record (JSON) of `step`, written atomically; older ones go."""
    import torch
    from safetensors.torch import save_file

    final = folder / f"step-{step:06d}"
    with staging_dir(final, replace=True) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in _named_trainable(model)}, str(tmp / "model.safetensors"))
        sd = opt.state_dict()
        tensors = {f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous().reshape(-1)
                   for i, st in sd["state"].items() for k, v in st.items()}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
        atomic_write_json(tmp / "state.json", {"step": step, "param_groups": groups, **record})
    atomic_write_json(folder / "latest.json", {"step": step, "folder": final.name})
    for old in folder.glob("step-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, model, opt) -> tuple[int, dict[str, Any]] | None:
    """(step, record) of the last checkpoint in `folder`, loaded into model and optimizer; None when there is none."""
    import torch
    from safetensors.torch import load_file

    latest = folder / "latest.json"
    if not latest.is_file():
        return None
    ck = folder / json.loads(latest.read_text())["folder"]
    state = json.loads((ck / "state.json").read_text())
    weights = load_file(str(ck / "model.safetensors"))
    with torch.no_grad():
        for n, p in _named_trainable(model):
            p.copy_(weights[n].to(p.device, p.dtype))
    flat = load_file(str(ck / "optimizer.safetensors"))
    per: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        i, _, k = key.partition(".")
        per.setdefault(int(i), {})[k] = v
    params = [p for g in opt.param_groups for p in g["params"]]  # the optimizer's numbering (its groups' order)
    opt_state = {i: {k: (v.reshape(()) if k == "step" else v.reshape(params[i].shape)).to(params[i].device)
                     for k, v in st.items()} for i, st in per.items()}
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return int(state["step"]), state


def train_moe(model, data: list[tuple[list[int], list[int]]], pad_id: int, p: MoeTrainParams, ckpt_dir: Path,
              desc: str, device: str = "cpu", log=print) -> dict[str, Any]:
    """Train every parameter of `model` (routers, experts, shared layers) for p.steps on `data`; resumable from
    the checkpoints in `ckpt_dir`. Returns the training record (curves, timing)."""
    import torch

    from ..train.trainer import check_finite, collate

    model.to(device)
    model.config.router_aux_loss_coef = p.aux_loss_coef
    named = _named_trainable(model)
    routers = [q for n, q in named if n.endswith(ROUTER_SUFFIXES)]
    others = [q for n, q in named if not n.endswith(ROUTER_SUFFIXES)]
    opt = torch.optim.AdamW([{"params": others, "lr": p.lr}, {"params": routers, "lr": p.router_lr}],
                            weight_decay=0.0)
    base_lrs = [p.lr, p.router_lr]

    def factor(step: int) -> float:  # linear warm-up, then linear decay to 0 (as the expert trainer)
        if step < p.warmup:
            return (step + 1) / p.warmup
        return max(0.0, (p.steps - step) / max(1, p.steps - p.warmup))

    record: dict[str, Any] = {"loss": [], "task_loss": [], "aux_loss": [], "wall_s": 0.0}
    start, resumed = 0, None
    loaded = load_checkpoint(ckpt_dir, model, opt)
    if loaded is not None:
        start, st = loaded
        record = {k: st[k] for k in record}
        resumed = start
        log(f"{desc}: resumed from the checkpoint at step {start} ({ckpt_dir})")
    order = itertools.islice(batch_order(len(data), p.steps, p.batch_size, p.seed), start, None)
    n_experts, top_k = model.config.num_local_experts, model.config.num_experts_per_tok
    model.train()
    t0 = time.perf_counter()
    wall0 = record["wall_s"]
    try:
        with progress_bar(desc, total=p.steps) as bar:
            bar.update(start)
            for step in range(start, p.steps):
                for g, lr in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr * factor(step)
                batch = {k: v.to(device) for k, v in collate([data[i] for i in next(order)], pad_id).items()}
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_router_logits=True)
                task = model.loss_function(out.logits, batch["labels"], model.config.vocab_size)
                aux = load_balancing_loss(out.router_logits, n_experts, top_k, batch["attention_mask"])
                loss = task + p.aux_loss_coef * aux
                loss.backward()
                torch.nn.utils.clip_grad_norm_([q for _, q in named], 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                record["loss"].append(round(float(loss.detach()), 5))
                record["task_loss"].append(round(float(task.detach()), 5))
                record["aux_loss"].append(round(float(aux.detach()), 5))
                bar.update(1, loss=record["loss"][-1], aux=record["aux_loss"][-1])
                if not math.isfinite(record["loss"][-1]):
                    raise WorkbenchError(f"{desc}: loss became {record['loss'][-1]} at step {step} (lower lr)")
                done = step + 1
                if done % p.checkpoint_every == 0 and done < p.steps:
                    check_finite(named, desc, f"after step {step}")  # a checkpoint is never a broken model
                    record["wall_s"] = round(wall0 + time.perf_counter() - t0, 3)
                    save_checkpoint(ckpt_dir, model, opt, done, record)
                    fault_point("upcycle_checkpoint")
        # the loss above is that of the weights before each update: the last update is checked here
        check_finite(named, desc, f"after the last step ({p.steps - 1})")
    finally:
        model.eval()
    ran = p.steps - start
    wall = time.perf_counter() - t0
    record["wall_s"] = round(wall0 + wall, 3)
    return {"steps": p.steps, "resumed_from": resumed, "trained": "all parameters (routers, experts, shared layers)",
            "loss_curve": record["loss"], "task_loss_curve": record["task_loss"], "aux_loss_curve": record["aux_loss"],
            "final_loss": (sum(record["loss"][-10:]) / len(record["loss"][-10:])) if record["loss"] else None,
            "wall_s": record["wall_s"], "s_per_step": round(wall / ran, 3) if ran else None,
            "examples": len(data), "device": device}


# ----------------------------------------------------------------------------- the method family


class UpcycleMethod(Method):
    """Validation, data, checkpoints, training and saving shared by the upcycling methods; a subclass makes the
    untrained MoE model (`make_model`)."""

    expert_kinds = frozenset({"lora", "full"})
    outputs = frozenset({"model"})
    Params: ClassVar[type[MethodParams]] = UpcycleParams
    report = ("loss_curve", "training", "stats", "dense_reference", "construction")

    def validate(self, experts, params, output) -> None:
        super().validate(experts, params, output)
        if len(experts) < 2:
            raise RecipeError(f"{self.name} upcycles several dense experts into one MoE: give at least 2 "
                              f"(got {len(experts)})")
        if params.top_k > len(experts):
            raise RecipeError(f"{self.name}: top_k {params.top_k} is larger than the number of experts ({len(experts)})")
        lora = [e.name for e in experts if e.kind == "lora"]
        if lora and not params.materialize:
            raise RecipeError(f"{self.name} needs full (dense) experts; {lora} are LoRA adapters: set "
                              "`materialize: true` to fold each into the base as a dense expert")
        # one pool's experts share its base (experts of another base are refused as "mixed bases"; a full expert's
        # architecture and tensor shapes were checked against the base when it was added): the base decides
        base = experts[0].pool.manifest.base
        if base.architecture not in UPCYCLABLE:
            raise RecipeError(f"{self.name}: experts of architecture {base.architecture} cannot be upcycled "
                              f"(supported: {', '.join(UPCYCLABLE)})")
        config = cached_base_config(base.spec)
        if config is not None:  # else checked when building (validation never downloads or converts a base)
            check_base_config(config, self.name)
        from .routing import check_experts_data

        check_experts_data(experts, self.name)  # the MoE trains on the experts' data

    def key_inputs(self, experts, params) -> dict[str, Any]:
        from .routing import data_key

        return {"data": data_key(experts)}

    def checkpoint_dir(self, ctx: BuildContext) -> Path:
        """Beside the artifacts, keyed by what decides the artifact: method, version, params, output, experts, base,
        data (two artifacts never share a checkpoint folder; builds that would are serialised by `build`'s lock)."""
        key = sha256_json({"method": self.name, "version": self.version,
                           "params": ctx.params.model_dump(mode="json"), "output": ctx.output.model_dump(mode="json"),
                           "experts": [(e.name, e.entry.files) for e in ctx.experts],
                           "base": ctx.pool.manifest.base.fingerprint, "base_weights": ctx.pool.base.weights_sha256,
                           "inputs": self.key_inputs(ctx.experts, ctx.params), **cache_key_extras(ctx)})[:16]
        return ctx.out_dir.parent / "upcycle-checkpoints" / f"{self.name}-{key}"

    def make_model(self, ctx: BuildContext, src: Sources, tok) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The untrained MoE (fp32, CPU) and what to record about its construction."""
        raise NotImplementedError

    def skeleton(self, config_dict: dict[str, Any]) -> torch.nn.Module:
        """An empty model of a checkpoint's config (its weights all come from the checkpoint)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..modules import bam_model  # noqa: F401  (registers the BAM classes)

        cfg = AutoConfig.for_model(**config_dict)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)

    def stats(self, model) -> dict[str, Any]:
        return moe_stats(model.config.to_dict(), count_parameters(model))

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        p = ctx.params
        base = ctx.pool.base
        check_base_config(base.config, self.name)
        tok = base.tokenizer()
        ckpt = self.checkpoint_dir(ctx)
        # one build at a time trains into a checkpoint folder (two spellings of one recipe have two artifact keys and
        # one folder): the second waits, then resumes or starts anew; nobody deletes checkpoints another is using
        from ..io import file_lock, lock_for

        with file_lock(lock_for(ckpt)):  # the lock file lives in the cache's locks/, not beside the checkpoints
            return self._build_locked(ctx, p, base, tok, ckpt)

    def _build_locked(self, ctx: BuildContext, p, base, tok, ckpt: Path) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if p.steps > 0 and (ckpt / "latest.json").is_file() and (ckpt / "config.json").is_file():
            model = self.skeleton(json.loads((ckpt / "config.json").read_text()))  # weights: from the checkpoint
            info = json.loads((ckpt / "construction.json").read_text())
        else:
            model, info = self.make_model(ctx, Sources(base, ctx.experts), tok)
            if p.steps > 0:
                ckpt.mkdir(parents=True, exist_ok=True)
                atomic_write_json(ckpt / "config.json", model.config.to_dict())
                atomic_write_json(ckpt / "construction.json", info)
        training = None
        if p.steps > 0:
            from .routing import expert_examples

            data = [x for e in ctx.experts for x in expert_examples(e, tok, p.examples, p.seed, p.max_length)]
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            training = train_moe(model, data, pad, p, ckpt, f"{self.name}: MoE training", ctx.device, ctx.log)
        model = model.to("cpu").eval()
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(ctx.out_dir, safe_serialization=True)
        tok.save_pretrained(ctx.out_dir)
        if ckpt.exists():  # trained to the end: the checkpoints are spent
            shutil.rmtree(ckpt, ignore_errors=True)
        return {"type": "moe", "architecture": type(model).__name__, "num_experts": len(ctx.experts),
                "top_k": p.top_k, "materialized": p.materialize, "construction": info,
                "experts_tasks": [e.tasks() for e in ctx.experts], "stats": self.stats(model),
                "dense_reference": dense_stats(base), "training": training,
                "loss_curve": training["task_loss_curve"] if training else None}


@register_artifact("moe")
def load_moe(path: Path, meta: dict[str, Any], device: str | None = None):
    """An upcycled MoE folder: a plain HF causal LM (Mixtral, or BAM once `workbench.modules.bam_model` is imported)."""
    from ..base import BaseModel
    from ..eval.harness import LoadedModel
    from ..modules import bam_model  # noqa: F401  (registers the BAM classes)

    bm = BaseModel(path)
    return LoadedModel(bm.load(device=device), bm.tokenizer(), meta.get("name", Path(path).name),
                       {"kind": "moe", "method": meta.get("method"), "artifact": str(path),
                        "architecture": meta.get("architecture")})


__all__ = ["MoeTrainParams", "Sources", "UpcycleMethod", "UpcycleParams", "data_router_rows", "load_balancing_loss",
           "moe_stats", "train_moe"]
