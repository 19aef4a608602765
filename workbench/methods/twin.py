"""Twin-Merging (NeurIPS 2024): shared knowledge merged, exclusive knowledge routed per input.

1. shared: task arithmetic of the experts, delta_s = shared_lambda * sum_t delta_t;
2. exclusive: e_t = delta_t - delta_s per matrix (the difference from the merged model, not
   from the base), truncated to `rank` by SVD. For LoRA experts e_t = [s_t B_t, -B_s][A_t; A_s]
   is low rank, so its exact SVD comes from two QRs and an m x m SVD (m = r_t + sum r);
3. router: an MLP (2 hidden layers, dropout) from the mean-pooled last hidden state of the
   shared model to the expert id, trained with cross-entropy on the experts' training data;
4. inference on the one routed-LoRA layer: W0 + delta_s is folded into the base weights, the
   e_t are the layer's adapters, and the `twin` router gives every token all experts with
   w = softmax(router(features) / temperature), so W(x) = W0 + delta_s + sum_t w_t e_t.
Exclusive parts cover the decoder's 2-D weights; other tensors (norms, embeddings) get the
shared delta only.

Routing features, a deliberate deviation from the reference (which builds one model per input
and pools over the whole input): token t's features are the mean of the shared model's last
hidden states over the REAL tokens 0..t of its sequence (a causal prefix mean; positions with
attention_mask == 0 are left out; without a mask every position counts, which is exact for
right padding since later padding never enters a prefix). So padding never changes a real
token's logits, with or without a mask, left or right, and in lm-eval's loglikelihood call
(right padding, no mask) a token is routed from the text before it only. At the last prompt
token the prefix mean is the reference's mean over the prompt, so a generation's first token
is routed as in the reference; later tokens add what was generated. The features come from a
pre-pass of the same model with no pairs (the shared model), run by a hook before each forward;
under `generate` with the KV cache the pre-pass keeps its own cache and a running (sum, count)
per sequence, tied to the main cache object (a forward without a cache, or with an empty one,
starts afresh). Beam search (which reorders the cache) is not supported.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from ..artifacts import register_artifact
from ..data import prompt_text
from ..errors import RecipeError, WorkbenchError
from ..progress import progress_bar
from ..tasks.suite import ADD_SPECIAL_TOKENS
from .base import (
    MAX_BATCH,
    MAX_EXAMPLES,
    MAX_LR,
    MAX_RANK,
    MAX_SCALE,
    MAX_SEED,
    MAX_TEMPERATURE,
    BuildContext,
    Method,
    MethodParams,
    no_grad,
    register_method,
)
from .routing import context_tokens

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..modules.routed_lora import RoutingContext
    from ..modules.routers import TwinRouter


class TwinParams(MethodParams):
    shared_lambda: float = Field(0.3, ge=-MAX_SCALE, le=MAX_SCALE, description="task-arithmetic scale of the shared "
                                 f"expert (reference: 0.3), |x| <= {MAX_SCALE:g}")
    rank: int = Field(8, gt=0, le=MAX_RANK, description=f"SVD rank kept of each exclusive part (1..{MAX_RANK})")
    router_hidden: int = Field(256, gt=0, le=16_384, description="width of the router's 2 hidden layers (1..16384)")
    router_dropout: float = Field(0.5, ge=0, lt=1, description="dropout of the router, [0, 1)")
    router_epochs: int = Field(40, gt=0, le=10_000, description="router training epochs (1..10000)")
    router_lr: float = Field(1e-3, gt=0, le=MAX_LR, description="Adam learning rate of the router, (0, 1]")
    router_examples: int = Field(400, gt=0, le=MAX_EXAMPLES, description="training examples per expert for the "
                                                                         f"router (at most {MAX_EXAMPLES:,})")
    temperature: float = Field(1.0, gt=0, le=MAX_TEMPERATURE,
                               description="softmax temperature of the routing weights, (0, 1e4]")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the router init and batch order (0..2**32-1)")
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description=f"batch size for router features (1..{MAX_BATCH})")


# ----------------------------------------------------------------------------- factors


def lowrank_svd(p: torch.Tensor, q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of p @ q (p [out, m], q [m, in]) without forming it; returns (A [k, in], B [out, k])."""
    import torch

    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q.T)
    u, s, vh = torch.linalg.svd(rp @ rq.T)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return (root[:, None] * (qq @ vh[:k].T).T).contiguous(), ((qp @ u[:, :k]) * root).contiguous()


def dense_svd(d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return (root[:, None] * vh[:k]).contiguous(), (u[:, :k] * root).contiguous()


def _interleaved(splits: list[list[dict]], n: int) -> list[dict]:
    """Up to n rows taking one of each task's rows in turn, so a multi-task expert's examples cover all its tasks."""
    return [r for group in zip_longest(*splits) for r in group if r is not None][:n]


# ----------------------------------------------------------------------------- router


@dataclass
class _Prefix:
    """A batch's running routing state across decode steps: the pre-pass's KV cache, per-sequence sums."""

    cache: Any  # the shared model's own KV cache, or None
    total: torch.Tensor | None = None  # [B, d] sum of the real tokens' last hidden states so far
    count: torch.Tensor | None = None  # [B, 1] number of real tokens so far


def prefix_means(h: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 state: _Prefix | None = None) -> torch.Tensor:
    """[B, S, d] per token the mean of `h` (the shared model's last hidden states of this step) over the real
    tokens of its prefix, continuing `state`'s sums (earlier steps) and updating them in place."""
    import torch

    s = input_ids.shape[1]
    real = (attention_mask[:, -s:] if attention_mask is not None else torch.ones_like(input_ids)).bool()[..., None]
    total = torch.where(real, h, 0.0).cumsum(1)  # where, not *: padding rows may hold anything
    count = real.float().cumsum(1)
    if state is not None:
        if state.total is not None:
            total, count = total + state.total[:, None], count + state.count[:, None]
        state.total, state.count = total[:, -1], count[:, -1]
    return total / count.clamp(min=1)


def cache_kwarg(decoder: nn.Module) -> str:
    """The keyword a decoder's forward takes its KV cache by: `cache` in newer transformers, else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class TwinRouting:
    """Routes every forward of `model` (a plain call, `generate` with or without the KV cache, lm-eval):
    a hook runs the shared model (no pairs) as a pre-pass, turns its last hidden states into per-token
    prefix means and sets the router's weights for the forward."""

    def __init__(self, model: nn.Module, ctx: RoutingContext, router: TwinRouter):
        from ..modules.routed_lora import RoutedGroup

        self.model, self.ctx, self.router = model, ctx, router
        self.decoder = model.base_model
        self._cache_kw = cache_kwarg(self.decoder)
        self._positional = list(inspect.signature(model.forward).parameters)
        self._states: weakref.WeakKeyDictionary[Any, _Prefix] = weakref.WeakKeyDictionary()  # main cache -> state
        self._pending: _Prefix | None = None
        ctx.groups = [RoutedGroup(router, None)]
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        model.register_forward_hook(self._after, always_call=True)

    @no_grad
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, state: _Prefix | None = None) -> torch.Tensor:
        """[B, S, d] routing features: per token the mean of the shared model's last hidden states over the real
        tokens of its prefix. `state` carries earlier steps (KV cache, sums) and is updated in place."""
        cache = state.cache if state is not None else None
        with self.ctx.use():  # no pairs: the shared model
            h = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=cache is not None, **{self._cache_kw: cache}).last_hidden_state.float()
        return prefix_means(h, input_ids, attention_mask, state)

    def weights(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S, E] each token's expert weights (what a forward on these inputs routes with)."""
        return self.router.token_weights(self.features(input_ids, attention_mask, position_ids))

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kw = {**dict(zip(self._positional, args)), **kwargs}
        ids = kw.get("input_ids")
        if ids is None:
            raise WorkbenchError("twin routes from input_ids: calls with inputs_embeds are not supported")
        cache = kw.get("cache", kw.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:  # a new batch of sequences
            from transformers import DynamicCache

            use_cache = kw.get("use_cache")
            keep = cache is not None or (use_cache if use_cache is not None else self.model.config.use_cache)
            state = _Prefix(DynamicCache(config=self.model.config) if keep else None)
        else:
            state = self._states.get(cache)
            if state is None or state.cache.get_seq_length() != cache.get_seq_length():
                raise WorkbenchError("twin: this KV cache was not filled by this model's own forwards (or was cropped "
                                     "since); start from an empty cache")
        w = self.router.token_weights(self.features(ids, kw.get("attention_mask"), kw.get("position_ids"), state))
        self.router.current = w.reshape(-1, w.shape[-1])
        self._pending = state

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.router.current = None
        state, self._pending = self._pending, None
        cache = next((output[k] for k in ("cache", "past_key_values") if k in output), None) if isinstance(output, dict) else None
        if state is not None and state.cache is not None and cache is not None:
            self._states[cache] = state  # lives as long as the main cache: decode steps continue it


@no_grad
def pooled_features(model, tokenizer, texts: list[str], batch_size: int = 32, desc: str = "router features") -> torch.Tensor:
    """[N, d] routing features of whole texts: the shared model's last hidden states averaged over the tokens."""
    import torch

    out = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        with progress_bar(desc, total=len(texts)) as bar:
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                                max_length=context_tokens(model), add_special_tokens=ADD_SPECIAL_TOKENS)
                ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
                f = model.twin.features(ids, mask)  # prefix means: the last real token's is the whole text's
                last = (mask.sum(1) - 1).clamp(min=0)
                out.append(f[torch.arange(len(ids), device=f.device), last].cpu())
                bar.update(len(ids))
    finally:
        tokenizer.padding_side = side
    return torch.cat(out)


# ----------------------------------------------------------------------------- method


@register_method
class Twin(Method):
    name = "twin"
    Params = TwinParams
    outputs = frozenset({"model"})
    description = "shared task arithmetic + SVD-compressed exclusive parts routed from the prefix so far (Twin-Merging)"
    version = 1

    def validate(self, experts, params, output) -> None:
        super().validate(experts, params, output)
        if len(experts) < 2:
            raise RecipeError("twin needs at least 2 experts")
        from .routing import check_experts_data

        check_experts_data(experts, self.name)
        owner: dict[str, str] = {}  # dataset (content and fields) -> the expert the router sends its inputs to
        for e in experts:
            for rec in e.data():
                if rec.identity in owner and owner[rec.identity] != e.name:
                    raise RecipeError(f"twin: experts {owner[rec.identity]!r} and {e.name!r} were both trained on "
                                      f"{rec.source}; the router cannot tell them apart (keep one)")
                owner[rec.identity] = e.name

    def key_inputs(self, experts, params) -> dict[str, Any]:
        """The router reads each expert's data: other data (a re-recorded dataset) rebuilds the artifact."""
        from .routing import data_key

        return {"data": data_key(experts)}

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        import torch
        from safetensors.torch import save_file
        from torch import nn

        from ..modules.routers import TwinRouter
        from ..train.trainer import check_finite

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
        model = load_twin_model(ctx.out_dir, base, router=None)
        tok = base.tokenizer()
        tasks = [e.tasks() for e in experts]
        feats, labels, val_feats, val_labels = [], [], [], []
        for i, e in enumerate(experts):
            rows = _interleaved(e.rows_by_source(tok), p.router_examples)
            val = e.rows(tok, split="validation")  # [] where the expert's sources have no validation split
            feats.append(pooled_features(model, tok, [prompt_text(r) for r in rows], p.batch_size,
                                         f"router features {e.name}"))
            if val:
                val_feats.append(pooled_features(model, tok, [prompt_text(r) for r in val], p.batch_size,
                                                 f"router val {e.name}"))
            labels += [i] * len(rows)
            val_labels += [i] * len(val)
        x, y = torch.cat(feats), torch.tensor(labels)
        xv, yv = (torch.cat(val_feats), torch.tensor(val_labels)) if val_feats else (None, None)
        # initialisation and dropout draw from torch's global generator: seeded inside a fork that restores
        # it afterwards, so the router depends on p.seed only and the caller's random state is untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            router = TwinRouter([e.name for e in experts], x.shape[1], p.router_hidden, p.router_dropout, p.temperature)
            opt = torch.optim.Adam(router.parameters(), lr=p.router_lr)
            g = torch.Generator().manual_seed(p.seed)
            router.train()
            for _ in range(p.router_epochs):
                perm = torch.randperm(len(x), generator=g)
                for i in range(0, len(x), 64):
                    idx = perm[i:i + 64]
                    loss = nn.functional.cross_entropy(router.net(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            check_finite(list(router.named_parameters()), "twin router", f"after {p.router_epochs} epochs")
            router.eval()
            with torch.no_grad():
                acc_train = (router.net(x).argmax(-1) == y).float().mean().item()
                acc_val = (router.net(xv).argmax(-1) == yv).float().mean().item() if xv is not None else None
        router.save(ctx.out_dir)  # router.safetensors (+ router.json: loadable by `load_router` too)
        return {"type": "twin", "experts_tasks": tasks, "rank": p.rank, "shared_lambda": p.shared_lambda,
                "router": {"d_in": x.shape[1], "hidden": p.router_hidden, "dropout": p.router_dropout,
                           "train_accuracy": round(acc_train, 4),
                           "validation_accuracy": round(acc_val, 4) if acc_val is not None else None},
                "temperature": p.temperature}


def _trim(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the zero slots padded onto a stacked exclusive part (a [k, in], b [out, k]): its own rank."""
    used = ((a != 0).any(1) | (b != 0).any(0)).nonzero()
    r = int(used.max()) + 1 if used.numel() else 0
    return a[:r], b[:, :r]


def twin_factors(folder: Path) -> tuple[dict[str, tuple], list[dict[str, tuple]]]:
    """A LoRA-built Twin artifact's parts as LoRA factors (tensor -> (A, B, 1.0)): the shared part (rank sum r)
    and each expert's exclusive part (its own rank): what the serving engine loads as adapters."""
    from safetensors.torch import load_file

    try:
        shared = load_file(str(Path(folder) / "shared.safetensors"))
        excl = load_file(str(Path(folder) / "exclusive.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a corrupt file
        raise WorkbenchError(f"twin artifact {folder}: cannot read its parts: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if any(k.endswith(".delta") for k in shared):
        raise WorkbenchError(f"twin artifact {folder} was built from full fine-tunes (its shared part is dense): "
                             "it runs as a full model (`workbench eval`), not over the serving engine's base")
    names = sorted(k[: -len(".A")] for k in shared if k.endswith(".A"))
    targets = sorted(k[: -len(".A")] for k in excl if k.endswith(".A"))
    try:
        n = excl[f"{targets[0]}.A"].shape[0] if targets else 0
        exclusive = [{t: (*_trim(excl[f"{t}.A"][i], excl[f"{t}.B"][i]), 1.0) for t in targets} for i in range(n)]
        return {t: (shared[f"{t}.A"], shared[f"{t}.B"], 1.0) for t in names}, exclusive
    except (KeyError, IndexError) as e:
        raise WorkbenchError(f"twin artifact {folder}: incomplete parts (missing {e})") from None
    except (RuntimeError, ValueError) as e:  # factors whose shapes do not pair up
        raise WorkbenchError(f"twin artifact {folder}: malformed parts: {str(e).splitlines()[0]}") from None


def load_twin_model(folder: Path, base, router: TwinRouter | None, device: str | None = None) -> nn.Module:
    """The base with the shared delta folded in, the exclusive parts on the routed-LoRA layer and `router`
    routing every forward (`model.twin`, `model.routing`): a plain HF causal LM. Without a router (building
    one) only the shared model's features are of use."""
    import torch
    from safetensors.torch import load_file

    from ..modules.routed_lora import get_module, wrap_model
    from ..modules.routers import TwinRouter

    model = base.load(device=device)
    shared = load_file(str(folder / "shared.safetensors"))
    excl = load_file(str(folder / "exclusive.safetensors"))
    with torch.no_grad():
        for key in [k for k in shared if k.endswith((".A", ".delta"))]:
            name = key.rsplit(".", 1)[0]
            w = get_module(model, name[: -len(".weight")]).weight if name.endswith(".weight") else None
            param = w if w is not None else dict(model.named_parameters())[name]
            delta = shared[key] if key.endswith(".delta") else shared[f"{name}.B"] @ shared[f"{name}.A"]
            param.add_(delta.to(param.dtype).to(param.device))
    targets = sorted(k[: -len(".A")] for k in excl if k.endswith(".A"))
    n = excl[f"{targets[0]}.A"].shape[0]
    router = router if router is not None else TwinRouter([str(i) for i in range(n)], model.config.hidden_size, 1, 0.0)
    ctx = wrap_model(model, targets, lambda t: [(*_trim(excl[f"{t}.A"][i], excl[f"{t}.B"][i]), 1.0) for i in range(n)], n)
    model.routing = ctx
    model.twin = TwinRouting(model, ctx, router.to(model.device).eval())
    return model.eval()


@register_artifact("twin")
def load_twin(path: Path, meta: dict[str, Any], device: str | None = None):
    from safetensors.torch import load_file

    from ..base import BaseModel
    from ..eval.harness import LoadedModel
    from ..modules.routers import TwinRouter

    base = BaseModel(meta["base"])
    r = meta["router"]
    router = TwinRouter(list(meta["experts"]), r["d_in"], r["hidden"], r["dropout"], meta.get("temperature", 1.0))
    router.load_state_dict(load_file(str(Path(path) / "router.safetensors")))
    model = load_twin_model(Path(path), base, router, device)
    return LoadedModel(model, base.tokenizer(), meta.get("name", Path(path).name),
                       {"kind": "twin", "method": "twin", "artifact": str(path), "router": r})


def __getattr__(name: str):
    """TwinRouter: defined in `workbench.modules.routers` (an nn.Module needs torch at import, this module
    must not), still importable from here."""
    if name == "TwinRouter":
        from ..modules import routers

        return getattr(routers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
