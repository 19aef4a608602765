"""Routers: registered, saveable policies from a module's input to per-token (idx, w) pairs.

- `prototype`: one per-token router with pluggable prototypes (STYLE: families are
  configurations). Per module a matrix P [E, d_in] of expert prototypes; scores s = f(x) f(P)^T
  (f: standardise or identity) times `scale`, optionally |s|; top-k; softmax over the k scores
  / temperature. PHATGOOSE (standardised, scale 1/sqrt(d), gate vectors as prototypes), Arrow
  (|x . p|, top right singular vectors of B A), average-activation prototypes.
  Softmax over all E then top-k then renormalise equals a softmax over the top-k scores.
  An all-zero prototype row marks an expert that does not adapt that module: it is never chosen
  (score -inf), so experts with different target modules and ranks mix. Over COMPACT_MIN_EXPERTS or
  more experts, a module is scored against the rows of the experts that adapt it only, and modules that read
  one input (a layer's q/k/v projections, gate/up) are scored in one matmul against their stacked matrices.
- `gate`: PHATGOOSE's training-time gate, sigmoid(x . v) per expert and module (dense, differentiable).
- `fixed`: the same weights for every token (a mix); top-k of them.
- `mole`, `smora`, `twin`: the trained routers of those methods (`workbench.methods.mole`, `.smora`, `.twin`),
  defined here so that the method modules import no torch (listing the methods stays fast).
Saved as `router.json` (name + config) + `router.safetensors` (tensors), loaded through ROUTERS.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import WorkbenchError
from ..io import atomic_write_json
from ..registry import Registry

ROUTERS: Registry[type[BaseRouter]] = Registry("router", WorkbenchError)
_EPS = 1e-5  # layer-norm epsilon of the standardisation (torch's LayerNorm default)
# From this many experts on, a prototype router scores each module against the experts that adapt it only (pools of
# hundreds of adapters with varied target modules: half the rows or fewer). Every router the demo builds has fewer.
COMPACT_MIN_EXPERTS = 32
# Sibling projections that read the same input in the architectures the workbench adapts (llama/mistral/qwen
# attention and MLP, Mixtral's experts): with COMPACT_MIN_EXPERTS or more experts, one matmul scores them all.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def sibling_groups(modules) -> dict[str, tuple[str, ...]]:
    """module -> the modules of its layer that read its input (itself included), for modules with siblings."""
    by: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for m in sorted(modules):
        parent, _, leaf = m.rpartition(".")
        for names in SIBLINGS:
            if leaf in names:
                by.setdefault((parent, names), []).append(m)
    return {m: tuple(g) for g in by.values() if len(g) > 1 for m in g}


class BaseRouter(nn.Module):
    name: ClassVar[str]

    def __init__(self, experts: list[str]):
        super().__init__()
        self.experts = list(experts)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def config(self) -> dict[str, Any]:
        return {"experts": self.experts}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def route(self, module: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def weights(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """Dense weights [T, E]: the sparse pairs scattered (routers that train override this)."""
        return dense_weights(*self.route(module, x), self.num_experts)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}, str(folder / "router.safetensors"))
        atomic_write_json(folder / "router.json", {"router": self.name, "config": self.config()})


def load_router(folder: Path, device: str | torch.device | None = None) -> BaseRouter:
    folder = Path(folder)
    from ..cells import load_json

    try:
        spec = load_json(folder / "router.json")  # bounded: size and depth; not UTF-8 or JSON is a ValueError
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"cannot read router {folder / 'router.json'}: {e}") from None
    if not isinstance(spec, dict):
        raise WorkbenchError(f"cannot read router {folder / 'router.json'}: not a JSON object")
    try:
        tensors = load_file(str(folder / "router.safetensors"), device=str(device or "cpu"))
        return ROUTERS.get(spec["router"]).from_saved(spec["config"], tensors)
    except WorkbenchError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign router file: one line, not a traceback
        raise WorkbenchError(f"cannot load router {folder}: {type(e).__name__}: {str(e)[:120]}") from None


def dense_weights(idx: torch.Tensor, w: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs (idx [T, k], -1 for none; w [T, k]) as dense weights [T, num_experts]."""
    out = torch.zeros(idx.shape[0], num_experts, dtype=w.dtype, device=w.device)
    return out.scatter_add_(1, idx.clamp(min=0), torch.where(idx >= 0, w, torch.zeros_like(w)))


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Layer norm without affine parameters over the last dim (mean 0, std 1)."""
    return nn.functional.layer_norm(x, x.shape[-1:], eps=_EPS)


def input_key(x: torch.Tensor) -> tuple:
    """Identifies a module input while the tensor is held: its memory, shape, strides, dtype, device."""
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)


@ROUTERS.register("prototype")
class PrototypeRouter(BaseRouter):
    name = "prototype"

    def __init__(self, experts: list[str], prototypes: dict[str, torch.Tensor], *, k: int = 2,
                 temperature: float = 1.0, standardize: bool = True, absolute: bool = False,
                 scale: str = "inv_sqrt_d", kind: str = "phatgoose"):
        super().__init__(experts)
        if not 1 <= k <= len(experts):
            raise WorkbenchError(f"top-k {k} must be between 1 and the number of experts ({len(experts)})")
        if temperature <= 0:
            raise WorkbenchError(f"router temperature must be > 0 (got {temperature})")
        if scale not in ("inv_sqrt_d", "one"):
            raise WorkbenchError(f"router scale must be 'inv_sqrt_d' or 'one' (got {scale!r})")
        for m, p in prototypes.items():
            if p.dim() != 2 or p.shape[0] != len(experts):
                raise WorkbenchError(f"prototypes of {m} have shape {list(p.shape)}, expected [{len(experts)}, d_in]")
        self.k, self.temperature, self.standardize, self.absolute = k, float(temperature), standardize, absolute
        self.scale, self.kind = scale, kind
        self.modules_ = sorted(prototypes)
        self._proto = {m: p.float() for m, p in prototypes.items()}
        self._absent = {m: (p == 0).all(dim=1) for m, p in self._proto.items()}
        # Over many experts, a module's scores are computed for the experts that adapt it only (`_present`: their
        # rows, in order); the absent ones' -inf is implied. Below COMPACT_MIN_EXPERTS every row is scored, as
        # routers always did (a narrower matmul may round differently in the last bit).
        self._present = {m: (~a).nonzero().flatten() for m, a in self._absent.items()
                         if len(experts) >= COMPACT_MIN_EXPERTS and bool(a.any()) and not bool(a.all())}
        # prototypes are fixed: the matrix each module scores against (standardised, compacted) is made once
        self._ready = {}
        for m, p in self._proto.items():
            rows = p.index_select(0, self._present[m]) if m in self._present else p
            self._ready[m] = standardise(rows) if standardize else rows
        # one scoring matmul per distinct module input: siblings' matrices stacked (same d_in), split after
        self._siblings = {}
        if len(experts) >= COMPACT_MIN_EXPERTS:
            self._siblings = {m: g for m, g in sibling_groups(self._ready).items()
                              if len({self._ready[n].shape[1] for n in g}) == 1}
        self._stacked = {g: torch.cat([self._ready[n] for n in g]) for g in set(self._siblings.values())}
        for g, stacked in self._stacked.items():  # one copy: the members' matrices are views of the stack
            for n, view in zip(g, stacked.split([self._ready[n].shape[0] for n in g])):
                self._ready[n] = view
        self._score_cache = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k, "temperature": self.temperature, "standardize": self.standardize,
                "absolute": self.absolute, "scale": self.scale, "kind": self.kind}

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._proto)

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PrototypeRouter:
        cfg = dict(config)
        return cls(cfg.pop("experts"), tensors, **cfg)

    def with_k(self, k: int) -> PrototypeRouter:
        return PrototypeRouter(self.experts, self._proto, k=k, temperature=self.temperature, standardize=self.standardize,
                               absolute=self.absolute, scale=self.scale, kind=self.kind)

    def _scored(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """Scores [T, E_m] against the module's scoring matrix: every expert, or those in `_present[module]`."""
        p = self._ready.get(module)
        if p is None:
            raise WorkbenchError(f"router has no prototypes for module {module!r}")
        group = self._siblings.get(module)
        if group is not None:  # scored with its siblings in one matmul, when they read this very input
            key = (input_key(x), group)
            cached = self._score_cache
            if cached is None or cached[0] != key:
                s = self._score(self._stacked[group], x)
                cached = (key, dict(zip(group, s.split([self._ready[n].shape[0] for n in group], dim=1))), x)
                self._score_cache = cached  # holds x: its memory is not reused while the key is remembered
            return cached[1][module]
        return self._score(p, x)

    def _score(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self._standardised(x) if self.standardize else x.float()
        s = h @ p.to(x.device).T  # one matmul: [T, d_in] x [d_in, rows of p]
        if self.scale == "inv_sqrt_d":
            s = s / x.shape[-1] ** 0.5
        return s.abs() if self.absolute else s

    def scores(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """[T, E] routing scores of one module's inputs x [T, d_in] (-inf for experts that do not adapt it)."""
        s = self._scored(module, x)
        present = self._present.get(module)
        if present is not None:
            full = s.new_full((s.shape[0], self.num_experts), float("-inf"))
            full[:, present.to(s.device)] = s
            return full
        absent = self._absent[module]
        return s.masked_fill(absent.to(s.device), float("-inf")) if bool(absent.any()) else s

    def _standardised(self, x: torch.Tensor) -> torch.Tensor:
        """LN(x), reused when the next module reads the same input (q/k/v, and gate/up, share one: one
        layer norm instead of three). The cache holds x itself, so its memory cannot be handed to another
        tensor while the key (address, shape, strides) is remembered; module inputs are never written in place."""
        key = input_key(x)
        cached = getattr(self, "_ln_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, standardise(x.float()), x)
            self._ln_cache = cached
        return cached[1]

    def route(self, module: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        absent = self._absent.get(module)
        if absent is None or bool(absent.all()):  # none of this router's experts adapts the module: base alone
            empty = torch.full((x.shape[0], 1), -1, dtype=torch.long, device=x.device)
            return empty, torch.zeros(x.shape[0], 1, device=x.device)
        present = self._present.get(module)
        if present is not None:  # scored over the experts that adapt the module; fewer than k: padded (-1, 0)
            top = self._scored(module, x).topk(min(self.k, present.numel()), dim=-1)
            w = torch.softmax(top.values / self.temperature, dim=-1)
            idx = present.to(x.device)[top.indices]
            pad = self.k - idx.shape[1]
            if pad:
                idx = torch.cat([idx, idx.new_full((idx.shape[0], pad), -1)], 1)
                w = torch.cat([w, w.new_zeros((w.shape[0], pad))], 1)
            return idx, w
        top = self.scores(module, x).topk(self.k, dim=-1)
        w = torch.softmax(top.values / self.temperature, dim=-1)  # absent experts (-inf) get weight 0
        return torch.where(torch.isfinite(top.values), top.indices, -1), w


@ROUTERS.register("gate")
class GateRouter(BaseRouter):
    """PHATGOOSE's post-hoc gate of ONE expert: w = sigmoid(x . v_module), trained with everything else frozen."""

    name = "gate"

    def __init__(self, experts: list[str], dims: dict[str, int], init: dict[str, torch.Tensor] | None = None):
        super().__init__(experts)
        if len(experts) != 1:
            raise WorkbenchError("a gate router belongs to exactly one expert")
        self.keys = {m: m.replace(".", "__") for m in dims}
        self.v = nn.ParameterDict({self.keys[m]: nn.Parameter(torch.zeros(d) if init is None else init[m].float().clone())
                                   for m, d in dims.items()})

    def gate(self, module: str) -> torch.Tensor:
        return self.v[self.keys[module]]

    def weights(self, module: str, x: torch.Tensor) -> torch.Tensor:
        if module not in self.keys:  # a module this expert does not adapt
            return x.new_zeros(x.shape[0], 1)
        return torch.sigmoid(x @ self.gate(module).to(x.dtype))[:, None]  # [T, 1]

    def route(self, module: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights(module, x)
        return torch.zeros_like(w, dtype=torch.long), w

    def tensors(self) -> dict[str, torch.Tensor]:
        return {m: self.gate(m).detach() for m in self.keys}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> GateRouter:
        return cls(config["experts"], {m: t.numel() for m, t in tensors.items()}, init=tensors)


@ROUTERS.register("fixed")
class FixedRouter(BaseRouter):
    """The same weights for every token and module (a weighted mix), kept to the top-k largest."""

    name = "fixed"

    def __init__(self, experts: list[str], weights: list[float], k: int | None = None):
        super().__init__(experts)
        if len(weights) != len(experts):
            raise WorkbenchError(f"{len(weights)} weights for {len(experts)} experts")
        self.w = torch.tensor(weights, dtype=torch.float32)
        self.k = k or len(experts)
        top = self.w.abs().topk(self.k)
        self._idx, self._w = top.indices, self.w[top.indices]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "weights": self.w.tolist(), "k": self.k}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FixedRouter:
        return cls(config["experts"], config["weights"], config.get("k"))

    def route(self, module: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = x.shape[0]
        return self._idx.to(x.device).expand(t, -1), self._w.to(x.device).expand(t, -1)


# ----------------------------------------------------------------------------- trained routers of the methods
# (here, not in their method modules: an nn.Module needs torch at import, and listing the methods must not)


@ROUTERS.register("mole")
class MoleRouter(BaseRouter):
    """Per module: e [E * d_out, E] (output projection), b [E], log tau; softmax(logits / tau) over the active experts
    that adapt the module (`absent`: per module the experts that do not, never weighted there)."""

    name = "mole"
    kind = "mole"
    reads_outputs = True

    def __init__(self, experts: list[str], dims: dict[str, int], *, gate_input: str = "outputs",
                 temperature: float = 1.0, active: list[str] | None = None,
                 absent: dict[str, list[str]] | None = None):
        super().__init__(experts)
        if gate_input not in ("outputs", "none"):
            raise WorkbenchError(f"MoLE gate_input must be 'outputs' or 'none' (got {gate_input!r})")
        if temperature <= 0:
            raise WorkbenchError(f"MoLE temperature must be > 0 (got {temperature})")
        n = len(experts)
        self.dims, self.gate_input = dict(dims), gate_input
        self.keys = {m: m.replace(".", "__") for m in dims}
        if gate_input == "outputs":
            self.e = nn.ParameterDict({self.keys[m]: nn.Parameter(torch.zeros(n * d, n)) for m, d in dims.items()})
        self.b = nn.ParameterDict({self.keys[m]: nn.Parameter(torch.zeros(n)) for m in dims})
        self.log_tau = nn.ParameterDict({self.keys[m]: nn.Parameter(torch.tensor(math.log(temperature)))
                                         for m in dims})
        # per module, the experts that do not adapt it (their output there is 0): never weighted there
        self.absent = {m: sorted(set(a)) for m, a in (absent or {}).items() if a}
        unknown = sorted({x for a in self.absent.values() for x in a} - set(experts)) + sorted(set(self.absent) - set(dims))
        if unknown:
            raise WorkbenchError(f"MoLE absent experts/modules not in the router: {unknown[:4]}")
        self._absent_mask = {m: torch.tensor([e in a for e in experts], dtype=torch.bool) for m, a in self.absent.items()}
        self.set_active(active)
        self.record: list[torch.Tensor] | None = None  # training: each call's weights (for the balance loss)

    def set_active(self, active: list[str] | None) -> None:
        if active is not None:
            unknown = [a for a in active if a not in self.experts]
            if unknown:
                raise WorkbenchError(f"MoLE gates were trained on {self.experts}, not on {unknown}")
            if not active:
                raise WorkbenchError("MoLE needs at least one active expert")
        self.active = list(active) if active is not None else None
        self.mask = (None if active is None
                     else torch.tensor([e in active for e in self.experts], dtype=torch.bool))

    def config(self) -> dict[str, Any]:
        out = {**super().config(), "dims": self.dims, "gate_input": self.gate_input, "active": self.active}
        if self.absent:  # only where some expert lacks a module: routers over uniform pools stay as they were
            out["absent"] = self.absent
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> MoleRouter:
        router = cls(config["experts"], config["dims"], gate_input=config.get("gate_input", "outputs"),
                     active=config.get("active"), absent=config.get("absent"))
        router.load_state_dict(tensors)
        return router.eval()

    def handles(self, module: str) -> bool:
        return module in self.keys

    def logits(self, module: str, outs: torch.Tensor) -> torch.Tensor:
        """[T, E] gate logits of one module from the experts' outputs outs [T, E, d_out]."""
        key = self.keys.get(module)
        if key is None:
            raise WorkbenchError(f"MoLE router has no gate for module {module!r}")
        logits = self.b[key].to(outs.dtype).expand(outs.shape[0], -1)
        if self.gate_input == "outputs":
            z = standardise(outs.reshape(outs.shape[0], -1).float()).to(outs.dtype)  # Norm(E_1(x) + ... + E_N(x))
            logits = logits + z @ self.e[key].to(outs.dtype)
        return logits / self.log_tau[key].exp().to(outs.dtype)

    def mix(self, module: str, x: torch.Tensor, outs: torch.Tensor) -> torch.Tensor:
        logits = self.logits(module, outs)
        off = None if self.mask is None else ~self.mask
        if module in self._absent_mask:
            off = self._absent_mask[module] if off is None else off | self._absent_mask[module]
        if off is not None:
            if bool(off.all()):  # no active expert adapts this module: the base alone
                w = logits.new_zeros(logits.shape)
                if self.record is not None:
                    self.record.append(w)
                return w
            logits = logits.masked_fill(off.to(logits.device), float("-inf"))
        w = torch.softmax(logits, dim=-1)
        if self.record is not None:
            self.record.append(w)
        return w

    def weights(self, module: str, x: torch.Tensor) -> torch.Tensor:
        raise WorkbenchError("MoLE's gate reads the experts' outputs: run it on the routed layer, not from inputs alone")

    route = weights


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


@ROUTERS.register("twin")
class TwinRouter(BaseRouter):
    """Twin's MLP (2 hidden layers, dropout) from routing features to expert logits. Every token gets all E
    experts with w = softmax(logits / temperature). The weights come from the token's prefix, not from a
    module's input: `TwinRouting` sets them (`current`, [T, E]) before each forward of the model."""

    name = "twin"

    def __init__(self, experts: list[str], d_in: int, hidden: int, dropout: float = 0.5, temperature: float = 1.0):
        super().__init__(experts)
        if temperature <= 0:
            raise WorkbenchError(f"router temperature must be > 0 (got {temperature})")
        self.d_in, self.hidden, self.dropout, self.temperature = d_in, hidden, dropout, float(temperature)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, len(experts)))
        self.current: torch.Tensor | None = None  # [T, E]: the weights of the forward in progress

    def config(self) -> dict[str, Any]:
        return {**super().config(), "d_in": self.d_in, "hidden": self.hidden, "dropout": self.dropout,
                "temperature": self.temperature}

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())  # net.* (the artifact's router.safetensors)

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> TwinRouter:
        cfg = dict(config)
        router = cls(cfg.pop("experts"), **cfg)
        router.load_state_dict(tensors)
        return router.eval()

    def token_weights(self, features: torch.Tensor) -> torch.Tensor:
        """[..., d_in] routing features -> [..., E] expert weights."""
        return torch.softmax(self.net(features.float()) / self.temperature, dim=-1)

    def weights(self, module: str, x: torch.Tensor) -> torch.Tensor:
        w = self.current
        if w is None or w.shape[0] != x.shape[0]:
            raise WorkbenchError("the twin router routes its model's own forwards only (the model's hook sets "
                                 "each forward's weights)")
        return w

    def route(self, module: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights(module, x)
        return torch.arange(w.shape[1], device=w.device).expand_as(w), w


__all__ = ["COMPACT_MIN_EXPERTS", "DISPATCH", "ROUTERS", "BaseRouter", "FixedRouter", "GateRouter", "MoleRouter", "PrototypeRouter",
           "SmoraRouter", "TwinRouter", "dense_weights", "load_router", "standardise"]
