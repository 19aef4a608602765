"""Batched generation where each sequence names an adapter, a weighted mix, or a router.

`MultiLoraModel` puts the multi-LoRA op into a Hugging Face causal LM's target linears and
loads a pool's adapters once. Each forward reads one `LoraMeta` (token -> adapter pairs),
built once per batch shape from the sequences' assignments and reused by every layer and
every decode step. A router callback `router(module_name, x) -> (idx [T, k], w [T, k])`
instead gives per-token, per-layer top-k mixtures (PHATGOOSE/Arrow-style compositions).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import WorkbenchError, did_you_mean
from ..kernels import AdapterWeights, LoraMeta, apply_lora, check_backend, default_backend, make_meta
from ..modules.mixture import get_module, set_module
from ..pool import LoraLayout
from ..tasks.suite import ADD_SPECIAL_TOKENS

Assignment = tuple[tuple[int, float], ...]  # ((adapter id, weight), ...) for one sequence; () = base
Router = Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ServeContext:
    """What the wrapped layers read during one forward."""

    def __init__(self, backend: str):
        self.backend = backend
        self.meta: LoraMeta | None = None
        self.router: Router | None = None
        self.num_adapters = 0

    def meta_for(self, name: str, x2: torch.Tensor) -> LoraMeta | None:
        if self.router is not None:
            idx, w = self.router(name, x2)
            return make_meta(idx, w, self.num_adapters)
        return self.meta


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, weights: AdapterWeights, ctx: ServeContext, name: str):
        super().__init__()
        self.base, self.weights, self.ctx, self.name = base, weights, ctx, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        x2 = x.reshape(-1, x.shape[-1])
        meta = self.ctx.meta_for(self.name, x2)
        if meta is None or not meta.active:
            return y
        apply_lora(y.view(-1, y.shape[-1]), x2, self.weights, meta, self.ctx.backend)
        return y


@dataclass
class Adapter:
    name: str
    kind: str  # lora | merged_lora
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(repr=False)  # tensor -> (A, B, scale)
    source: str | None = None  # the PEFT adapter folder it was read from


class MultiLoraModel:
    """A base model with every adapter of a pool (and saved LoRA compositions) loaded once."""

    def __init__(self, base_model, tokenizer, adapters: list[Adapter], *, backend: str | None = None,
                 device: str = "cpu", dtype=torch.float32):
        self.ctx = ServeContext(check_backend(backend) if backend else default_backend(device))
        self.model = base_model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.ids = {a.name: i for i, a in enumerate(adapters)}
        self.ctx.num_adapters = len(adapters)
        self.device, self.dtype = torch.device(device), dtype
        self.lock = threading.Lock()  # one forward at a time (the context is per model)
        self.active_sequences = 0  # sequences still decoding in running `generate` calls
        self._active_lock = threading.Lock()
        targets = sorted({t for a in adapters for t in a.factors})
        for tensor in targets:
            module = tensor[: -len(".weight")]
            lin = get_module(self.model, module)
            d_out, d_in = lin.weight.shape
            a_list, b_list, scales = [], [], []
            for ad in adapters:  # an adapter that skips this module gets rank 0 (adds nothing)
                a, b, s = ad.factors.get(tensor, (torch.zeros(0, d_in), torch.zeros(d_out, 0), 0.0))
                a_list.append(a.to(device=device, dtype=dtype).contiguous())
                b_list.append(b.to(device=device, dtype=dtype).contiguous())
                scales.append(s)
            wts = AdapterWeights(a_list, b_list, torch.tensor(scales, dtype=torch.float32, device=device))
            set_module(self.model, module, MultiLoraLinear(lin, wts, self.ctx, module))
        self._meta_cache: dict[tuple, LoraMeta] = {}

    @classmethod
    def from_pool(cls, pool, experts: list[str] | None = None, *, include_artifacts: bool = True,
                  backend: str | None = None, device: str = "cpu", dtype=torch.float32) -> MultiLoraModel:
        names = experts if experts is not None else pool.names("lora")
        adapters = []
        for n in names:
            e = pool.expert(n)
            adapters.append(Adapter(n, "lora", {t: e.lora_factors(t) for t in e.delta_names()}, str(e.path)))
        if include_artifacts:
            adapters += saved_lora_compositions(pool, taken={a.name for a in adapters})
        return cls(pool.base.load(), pool.base.tokenizer(), adapters, backend=backend, device=device, dtype=dtype)

    # -- specs
    def model_names(self) -> list[str]:
        return ["base", *self.ids]

    def resolve(self, spec: str | dict[str, float]) -> Assignment:
        """'base', an adapter name, 'mix:a=0.5,b=0.5', or {name: weight}."""
        if isinstance(spec, dict):
            items = list(spec.items())
        elif spec == "base":
            return ()
        elif spec.startswith("mix:"):
            items = []
            for part in spec[4:].split(","):
                name, _, w = part.partition("=")
                try:
                    items.append((name.strip(), float(w) if w else 1.0))
                except ValueError:
                    raise WorkbenchError(f"invalid mix weight in {spec!r}") from None
        else:
            items = [(spec, 1.0)]
        out = []
        for name, w in items:
            if name not in self.ids:
                raise WorkbenchError(f"unknown model {name!r}{did_you_mean(name, self.ids)}")
            out.append((self.ids[name], float(w)))
        return tuple(out)

    def _meta(self, assignments: Sequence[Assignment], seq_len: int) -> LoraMeta | None:
        key = (tuple(assignments), seq_len)
        if key not in self._meta_cache:
            if len(self._meta_cache) > 64:
                self._meta_cache.clear()
            k = max((len(a) for a in assignments), default=0)
            if k == 0:
                self._meta_cache[key] = None
            else:
                idx = torch.full((len(assignments), k), -1, dtype=torch.long)
                w = torch.zeros((len(assignments), k))
                for b, a in enumerate(assignments):
                    for j, (e, wt) in enumerate(a):
                        idx[b, j], w[b, j] = e, wt
                # every token of sequence b carries its sequence's pairs ([B, S] flattened row-major)
                idx = idx.repeat_interleave(seq_len, dim=0).to(self.device)
                w = w.repeat_interleave(seq_len, dim=0).to(self.device)
                self._meta_cache[key] = make_meta(idx, w, len(self.adapters), block=seq_len)
        return self._meta_cache[key]

    # -- forward and generation
    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, assignments: Sequence[Assignment] | None = None,
                router: Router | None = None, **kw):
        with self.lock:
            self.ctx.router = router
            self.ctx.meta = None if router else self._meta(assignments or [()] * input_ids.shape[0], input_ids.shape[1])
            try:
                return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
            finally:
                self.ctx.meta, self.ctx.router = None, None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], assignments: Sequence[Assignment], max_new_tokens: Sequence[int] | int,
                 *, temperature: Sequence[float] | float = 0.0, stop_ids: set[int] | None = None,
                 router: Router | None = None, on_token: Callable[[int, int], bool] | None = None,
                 seed: int = 0) -> list[list[int]]:
        """Left-padded batched decoding with a KV cache; greedy where temperature is 0.

        on_token(i, token) is called for every new token of sequence i; returning False stops
        that sequence (e.g. a stop string or a client gone). Returns the new tokens per sequence.
        """
        from transformers import DynamicCache

        b = len(prompts)
        max_new = [max_new_tokens] * b if isinstance(max_new_tokens, int) else list(max_new_tokens)
        temps = [temperature] * b if isinstance(temperature, (int, float)) else list(temperature)
        stop_ids = stop_ids if stop_ids is not None else {self.tokenizer.eos_token_id}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        s = max(len(p) for p in prompts)
        ids = torch.full((b, s), pad, dtype=torch.long)
        mask = torch.zeros((b, s), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, s - len(p):] = torch.tensor(p)
            mask[i, s - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out: list[list[int]] = [[] for _ in range(b)]
        done = [m <= 0 for m in max_new]
        live = self._count_active(done.count(False))
        step_ids = ids
        try:
            while not all(done):
                logits = self.forward(step_ids, attention_mask=mask, assignments=assignments, router=router,
                                      position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1].float()
                nxt = logits.argmax(-1)
                for i, t in enumerate(temps):
                    if t > 0 and not done[i]:
                        nxt[i] = torch.multinomial(torch.softmax(logits[i] / t, -1), 1, generator=gen)[0]
                toks = nxt.tolist()
                for i, tok in enumerate(toks):
                    if done[i]:
                        continue
                    if tok in stop_ids:
                        done[i] = True
                        continue
                    out[i].append(tok)
                    if on_token is not None and on_token(i, tok) is False:
                        done[i] = True
                    if len(out[i]) >= max_new[i]:
                        done[i] = True
                live += self._count_active(done.count(False) - live)  # a finished sequence leaves the count
                step_ids = nxt[:, None]
                mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=mask.device)], dim=1)
                pos = pos[:, -1:] + 1
        finally:
            self._count_active(-live)
        return out

    def _count_active(self, delta: int) -> int:
        """Add `delta` to `active_sequences` (generate calls may run on several threads); returns delta."""
        with self._active_lock:
            self.active_sequences += delta
        return delta


def saved_lora_compositions(pool, taken: set[str]) -> list[Adapter]:
    """merged_lora artifacts built over this pool (re-factored merges), servable as adapters."""
    import json

    from ..io import cache_dir

    out = []
    root = cache_dir() / "artifacts"
    if not root.is_dir():
        return out
    for meta_path in sorted(root.glob("*/artifact.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("type") != "merged_lora" or meta.get("pool") != str(pool.root.resolve()):
            continue
        # a recipe's artifact, by its latest recipe name; bare sweep points ("name@point") stay out
        names = [n for n in (meta.get("names") or [meta.get("name", meta_path.parent.name)]) if "@" not in n]
        if not names or names[-1] in taken:
            continue
        name = names[-1]
        folder = meta_path.parent
        # the pool's own LoRA parser: rsLoRA, rank and alpha patterns scale exactly as PEFT does
        layout = LoraLayout(folder, pool.base.tensors.shapes, f"saved composition {name!r} ({folder})")
        factors = {t: (layout.weights.get(a).float(), layout.weights.get(b).float(), scale)
                   for t, (a, b, scale) in layout.modules.items()}
        out.append(Adapter(name, "merged_lora", factors, str(folder)))
        taken.add(name)
    return out


def top_k_router(weights_fn: Callable[[str, torch.Tensor], torch.Tensor], k: int) -> Router:
    """A router callback from per-token scores [T, E]: top-k, softmax-renormalised over the k."""

    def route(name: str, x: torch.Tensor):
        scores = weights_fn(name, x)
        top = scores.topk(k, dim=-1)
        return top.indices, torch.softmax(top.values, dim=-1)

    return route


@torch.no_grad()
def peft_alone(base, adapters: dict[str, str], requests: Sequence[tuple[str, str]], max_new_tokens: int) -> list[str]:
    """Greedy text of each (model, prompt) generated alone (batch 1) through PEFT: the reference
    the server must match. `model` is a key of `adapters` (name -> PEFT adapter folder) or "base"."""
    from peft import PeftModel

    tok = base.tokenizer()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    names = sorted({m for m, _ in requests if m != "base"}) or list(adapters)[:1]
    pm = PeftModel.from_pretrained(base.load(), adapters[names[0]], adapter_name=names[0], is_trainable=False)
    for n in names[1:]:
        pm.load_adapter(adapters[n], adapter_name=n, is_trainable=False)
    pm.eval()
    memo: dict[tuple[str, str], str] = {}
    for model, prompt in requests:
        if (model, prompt) in memo:
            continue
        enc = tok(prompt, return_tensors="pt", add_special_tokens=ADD_SPECIAL_TOKENS).to(pm.device)
        kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad}
        if model == "base":
            with pm.disable_adapter():
                out = pm.generate(**enc, **kw)
        else:
            pm.set_adapter(model)
            out = pm.generate(**enc, **kw)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        memo[(model, prompt)] = tok.decode(new, skip_special_tokens=True)
    return [memo[r] for r in requests]


__all__ = ["Adapter", "MultiLoraLinear", "MultiLoraModel", "Router", "peft_alone", "saved_lora_compositions",
           "top_k_router"]
