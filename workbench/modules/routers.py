"""Routers: registered, saveable policies from a module's input to per-token (idx, w) pairs.

- `prototype`: one per-token router with pluggable prototypes (STYLE: families are
  configurations). Per module a matrix P [E, d_in] of expert prototypes; scores s = f(x) f(P)^T
  (f: standardise or identity) times `scale`, optionally |s|; top-k; softmax over the k scores
  / temperature. PHATGOOSE (standardised, scale 1/sqrt(d), gate vectors as prototypes), Arrow
  (|x . p|, top right singular vectors of B A), average-activation prototypes.
  Softmax over all E then top-k then renormalise equals a softmax over the top-k scores.
  An all-zero prototype row marks an expert that does not adapt that module: it is never chosen
  (score -inf), so experts with different target modules and ranks mix.
- `gate`: PHATGOOSE's training-time gate, sigmoid(x . v) per expert and module (dense, differentiable).
- `fixed`: the same weights for every token (a mix); top-k of them.
Saved as `router.json` (name + config) + `router.safetensors` (tensors), loaded through ROUTERS.
"""

from __future__ import annotations

import json
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
    try:
        spec = json.loads((folder / "router.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WorkbenchError(f"cannot read router {folder / 'router.json'}: {e}") from None
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
        # prototypes are fixed: their standardised form is computed once
        self._ready = {m: (standardise(p) if standardize else p) for m, p in self._proto.items()}
        self._absent = {m: (p == 0).all(dim=1) for m, p in self._proto.items()}

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

    def scores(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """[T, E] routing scores of one module's inputs x [T, d_in]."""
        p = self._ready.get(module)
        if p is None:
            raise WorkbenchError(f"router has no prototypes for module {module!r}")
        p = p.to(x.device)
        h = self._standardised(x) if self.standardize else x.float()
        s = h @ p.T
        if self.scale == "inv_sqrt_d":
            s = s / x.shape[-1] ** 0.5
        s = s.abs() if self.absolute else s
        absent = self._absent[module]
        return s.masked_fill(absent.to(s.device), float("-inf")) if bool(absent.any()) else s

    def _standardised(self, x: torch.Tensor) -> torch.Tensor:
        """LN(x), reused when the next module reads the same input (q/k/v, and gate/up, share one: one
        layer norm instead of three). The cache holds x itself, so its memory cannot be handed to another
        tensor while the key (address, shape, strides) is remembered; module inputs are never written in place."""
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)
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


__all__ = ["ROUTERS", "BaseRouter", "FixedRouter", "GateRouter", "PrototypeRouter", "dense_weights", "load_router",
           "standardise"]
