"""Twin-Merging (NeurIPS 2024): shared knowledge merged, exclusive knowledge routed per input.

1. shared: task arithmetic of the experts, delta_s = shared_lambda * sum_t delta_t;
2. exclusive: e_t = delta_t - delta_s per matrix (the difference from the merged model, not
   from the base), truncated to `rank` by SVD. For LoRA experts e_t = [s_t B_t, -B_s][A_t; A_s]
   is low rank, so its exact SVD comes from two QRs and an m x m SVD (m = r_t + sum r);
3. router: an MLP (2 hidden layers, dropout) from the mean-pooled last hidden state of the
   shared model to the expert id, trained with cross-entropy on the experts' training data;
4. inference: w = softmax(router(x)); W(x) = W0 + delta_s + sum_t w_t e_t, per sample inside a
   batch (MixtureLinear), with routing computed from the prompt once per forward/generate.
Exclusive parts cover the decoder's 2-D weights; other tensors (norms, embeddings) get the
shared delta only.
"""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from ..artifacts import register_artifact
from ..errors import RecipeError
from ..modules.mixture import MixtureContext, MixtureLinear, get_module, set_module
from ..progress import progress_bar
from ..tasks.suite import ADD_SPECIAL_TOKENS, data_hash, load_split
from .base import BuildContext, Method, MethodParams, register_method


class TwinParams(MethodParams):
    shared_lambda: float = Field(0.3, description="task-arithmetic scale of the shared expert (reference: 0.3)")
    rank: int = Field(8, gt=0, description="SVD rank kept of each exclusive part")
    router_hidden: int = Field(256, gt=0, description="width of the router's 2 hidden layers")
    router_dropout: float = Field(0.5, ge=0, lt=1)
    router_epochs: int = Field(40, gt=0)
    router_lr: float = Field(1e-3, gt=0)
    router_examples: int = Field(400, gt=0, description="training examples per expert for the router")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the routing weights")
    seed: int = 0
    batch_size: int = Field(32, gt=0, description="batch size for router features")


# ----------------------------------------------------------------------------- factors


def lowrank_svd(p: torch.Tensor, q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of p @ q (p [out, m], q [m, in]) without forming it; returns (A [k, in], B [out, k])."""
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q.T)
    u, s, vh = torch.linalg.svd(rp @ rq.T)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return (root[:, None] * (qq @ vh[:k].T).T).contiguous(), ((qp @ u[:, :k]) * root).contiguous()


def dense_svd(d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return (root[:, None] * vh[:k]).contiguous(), (u[:, :k] * root).contiguous()


def _expert_tasks(expert) -> list[str]:
    """The tasks whose training data the router learns to send to `expert` (training.tasks, else tags.task)."""
    tasks = expert.entry.training.get("tasks") or ([expert.entry.tags["task"]] if "task" in expert.entry.tags else [])
    return [t for t in tasks if t != "multitask"]


def _interleaved(splits: list[list[dict]], n: int) -> list[dict]:
    """Up to n rows taking one of each task's rows in turn, so a multi-task expert's examples cover all its tasks."""
    return [r for group in zip_longest(*splits) for r in group if r is not None][:n]


# ----------------------------------------------------------------------------- router


class Router(nn.Module):
    def __init__(self, d_in: int, n_out: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@torch.no_grad()
def pooled_features(model, tokenizer, texts: list[str], batch_size: int = 32, desc: str = "router features") -> torch.Tensor:
    """Mean-pooled last hidden states [N, d] over the non-padding tokens."""
    out = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        with progress_bar(desc, total=len(texts)) as bar:
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=ADD_SPECIAL_TOKENS)
                enc = {k: v.to(model.device) for k, v in enc.items()}
                h = model(**enc, output_hidden_states=True).hidden_states[-1]
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu())
                bar.update(len(texts[i:i + batch_size]))
    finally:
        tokenizer.padding_side = side
    return torch.cat(out)


# ----------------------------------------------------------------------------- the model


class TwinModel(nn.Module):
    """Base + shared delta (folded into the weights) + per-sample routed exclusive parts."""

    def __init__(self, model: nn.Module, router: Router, ctx: MixtureContext, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.router = router.eval()
        self.ctx = ctx
        self.temperature = temperature
        self.forced_weights: torch.Tensor | None = None  # [T] or [batch, T]: bypass the router (tests, oracles)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self):
        return self.model.device

    @property
    def generation_config(self):
        return self.model.generation_config

    def tie_weights(self, *a, **k):
        return None

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        b = input_ids.shape[0]
        if self.forced_weights is not None:
            w = self.forced_weights
            return (w.expand(b, -1) if w.dim() == 1 else w).to(self.device)
        self.ctx.weights = None  # features come from the shared model alone
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        feats = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return torch.softmax(self.router(feats.float()) / self.temperature, dim=-1)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        self.ctx.weights = self.route(input_ids, attention_mask)
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self.ctx.weights = None

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        self.ctx.weights = self.route(input_ids, attention_mask)
        try:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self.ctx.weights = None


# ----------------------------------------------------------------------------- method


@register_method
class Twin(Method):
    name = "twin"
    Params = TwinParams
    outputs = frozenset({"model"})
    description = "shared task arithmetic + SVD-compressed exclusive parts routed per input (Twin-Merging)"
    version = 1

    def validate(self, experts, params, output) -> None:
        super().validate(experts, params, output)
        if len(experts) < 2:
            raise RecipeError("twin needs at least 2 experts")
        owner: dict[str, str] = {}  # task -> the expert the router learns to send its inputs to
        for e in experts:
            tasks = _expert_tasks(e)
            if not tasks:
                raise RecipeError(f"twin: expert {e.name!r} has no training task (tags.task or training.tasks) for the router")
            for t in tasks:
                if t in owner and owner[t] != e.name:
                    raise RecipeError(f"twin: experts {owner[t]!r} and {e.name!r} were both trained on task {t!r}; "
                                      "the router cannot tell them apart (keep one)")
                owner[t] = e.name

    def key_inputs(self, experts, params) -> dict[str, Any]:
        """The router reads each expert's task data: a new suite version (new data) rebuilds the artifact."""
        return {"task_data": {t: data_hash(t) for t in sorted({t for e in experts for t in _expert_tasks(e)})}}

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        p: TwinParams = ctx.params
        experts = ctx.experts
        base = ctx.pool.base
        shapes = base.tensors.shapes
        name_sets = [set(e.delta_names()) for e in experts]
        names = sorted(set().union(*name_sets))
        all_lora = all(e.kind == "lora" for e in experts)
        shared_t, excl_t = {}, {}
        with progress_bar(f"twin: shared + exclusive (rank {p.rank})", total=len(names)) as bar:
            for name in names:
                matrix = len(shapes[name]) == 2 and ".layers." in name
                if all_lora:
                    fac = [e.lora_factors(name) if name in ns else None for e, ns in zip(experts, name_sets)]
                    a_s = torch.cat([f[0] for f in fac if f is not None])
                    b_s = torch.cat([f[1] * (p.shared_lambda * f[2]) for f in fac if f is not None], dim=1)
                    shared_t[f"{name}.A"], shared_t[f"{name}.B"] = a_s, b_s
                    a_list, b_list = [], []
                    for f in fac:
                        if f is None:  # this expert does not touch the tensor: e_t = -delta_s
                            a, b = lowrank_svd(-b_s, a_s, p.rank)
                        else:
                            a, b = lowrank_svd(torch.cat([f[1] * f[2], -b_s], dim=1), torch.cat([f[0], a_s]), p.rank)
                        a_list.append(a)
                        b_list.append(b)
                else:
                    deltas = [e.delta(name) if name in ns else torch.zeros(shapes[name]) for e, ns in zip(experts, name_sets)]
                    ds = sum(deltas) * p.shared_lambda
                    shared_t[f"{name}.delta"] = ds
                    if not matrix:
                        bar.update(1)
                        continue
                    a_list, b_list = zip(*(dense_svd(d - ds, p.rank) for d in deltas))
                k = max(a.shape[0] for a in a_list)  # pad to one k for the stacked buffers
                excl_t[f"{name}.A"] = torch.stack([nn.functional.pad(a, (0, 0, 0, k - a.shape[0])) for a in a_list])
                excl_t[f"{name}.B"] = torch.stack([nn.functional.pad(b, (0, k - b.shape[1])) for b in b_list])
                bar.update(1)
        save_file(shared_t, str(ctx.out_dir / "shared.safetensors"))
        save_file(excl_t, str(ctx.out_dir / "exclusive.safetensors"))

        # router on the shared model's features
        model = load_twin_model(ctx.out_dir, base, router=None, n_experts=len(experts)).model
        tok = base.tokenizer()
        tasks = [_expert_tasks(e) for e in experts]
        feats, labels, val_feats, val_labels = [], [], [], []
        for i, ts in enumerate(tasks):
            rows = _interleaved([load_split(t, "train") for t in ts], p.router_examples)
            val = [r for t in ts for r in load_split(t, "validation")]
            feats.append(pooled_features(model, tok, [r["question"] for r in rows], p.batch_size, f"router features {experts[i].name}"))
            val_feats.append(pooled_features(model, tok, [r["question"] for r in val], p.batch_size, f"router val {experts[i].name}"))
            labels += [i] * len(rows)
            val_labels += [i] * len(val)
        x, y = torch.cat(feats), torch.tensor(labels)
        xv, yv = torch.cat(val_feats), torch.tensor(val_labels)
        torch.manual_seed(p.seed)
        router = Router(x.shape[1], len(experts), p.router_hidden, p.router_dropout)
        opt = torch.optim.Adam(router.parameters(), lr=p.router_lr)
        g = torch.Generator().manual_seed(p.seed)
        router.train()
        for _ in range(p.router_epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 64):
                idx = perm[i:i + 64]
                loss = nn.functional.cross_entropy(router(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        router.eval()
        with torch.no_grad():
            acc_train = (router(x).argmax(-1) == y).float().mean().item()
            acc_val = (router(xv).argmax(-1) == yv).float().mean().item()
        save_file(router.state_dict(), str(ctx.out_dir / "router.safetensors"))
        return {"type": "twin", "experts_tasks": tasks, "rank": p.rank, "shared_lambda": p.shared_lambda,
                "router": {"d_in": x.shape[1], "hidden": p.router_hidden, "dropout": p.router_dropout,
                           "train_accuracy": round(acc_train, 4), "validation_accuracy": round(acc_val, 4)},
                "temperature": p.temperature}


def load_twin_model(folder: Path, base, router: Router | None, n_experts: int, temperature: float = 1.0,
                    device: str | None = None) -> TwinModel:
    model = base.load(device=device)
    shared = load_file(str(folder / "shared.safetensors"))
    excl = load_file(str(folder / "exclusive.safetensors"))
    ctx = MixtureContext()
    with torch.no_grad():
        for key in [k for k in shared if k.endswith((".A", ".delta"))]:
            name = key.rsplit(".", 1)[0]
            w = get_module(model, name[: -len(".weight")]).weight if name.endswith(".weight") else None
            param = w if w is not None else dict(model.named_parameters())[name]
            delta = shared[key] if key.endswith(".delta") else shared[f"{name}.B"] @ shared[f"{name}.A"]
            param.add_(delta.to(param.dtype).to(param.device))
        for key in [k for k in excl if k.endswith(".A")]:
            name = key[: -len(".A")]
            module = name[: -len(".weight")]
            lin = get_module(model, module)
            set_module(model, module, MixtureLinear(lin, excl[key].to(lin.weight.device), excl[f"{name}.B"].to(lin.weight.device), ctx))
    if router is None:
        router = Router(model.config.hidden_size, n_experts, 1, 0.0)  # placeholder until trained
    return TwinModel(model.eval(), router.to(model.device), ctx, temperature)


@register_artifact("twin")
def load_twin(path: Path, meta: dict[str, Any], device: str | None = None):
    from ..base import BaseModel
    from ..eval.harness import LoadedModel

    base = BaseModel(meta["base"])
    r = meta["router"]
    router = Router(r["d_in"], len(meta["experts"]), r["hidden"], r["dropout"])
    router.load_state_dict(load_file(str(Path(path) / "router.safetensors")))
    model = load_twin_model(Path(path), base, router, len(meta["experts"]), meta.get("temperature", 1.0), device)
    return LoadedModel(model, base.tokenizer(), meta.get("name", Path(path).name),
                       {"kind": "twin", "method": "twin", "artifact": str(path), "router": r})
