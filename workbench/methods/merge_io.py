"""Writing merge results: a full model folder, or a LoRA re-factored by truncated SVD."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifacts import register_artifact
from ..base import BaseModel

if TYPE_CHECKING:
    import torch


_COPY_FROM_BASE = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def write_merged_model(base: BaseModel, deltas: Iterable[tuple[str, torch.Tensor]], out_dir: Path,
                       absolute: bool = False) -> dict[str, Any]:
    """W = W0 + delta for the given tensors (or W itself with `absolute`), W0 elsewhere.

    Streams: each tensor goes to its place in a pre-laid-out safetensors shard as soon as it is merged.
    """
    from .streaming import ShardWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    t = base.tensors
    writer = ShardWriter(out_dir, [(name, t.dtypes[name], t.shapes[name]) for name in t.keys()])  # noqa: SIM118 - not a dict
    done = set()
    for name, delta in deltas:
        if name not in t:
            raise ValueError(f"delta for tensor {name!r}, which is missing from the base")
        w = t.get(name)
        writer.add(name, delta.to(w.dtype) if absolute else (w.float() + delta).to(w.dtype))
        done.add(name)
    for name in t.keys():  # noqa: SIM118 - not a dict
        if name not in done:
            writer.add(name, t.get(name))
    writer.close()
    for f in _COPY_FROM_BASE:
        if (base.path / f).is_file():
            shutil.copy2(base.path / f, out_dir / f)
    return {"tensors": len(base.tensors.keys())}


def svd_factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """delta [out, in] ~= B @ A with B [out, k], A [k, in]; returns (A, B, relative Frobenius error)."""
    import torch

    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = u[:, :k] * root  # [out, k]
    a = root[:, None] * vh[:k]  # [k, in]
    total = s.pow(2).sum()
    err = (s[k:].pow(2).sum() / total).sqrt().item() if total > 0 else 0.0
    return a.contiguous(), b.contiguous(), err


def write_refactored_lora(deltas: Iterable[tuple[str, torch.Tensor]], rank: int, out_dir: Path,
                          base_spec: str) -> dict[str, Any]:
    """A PEFT LoRA folder (r = lora_alpha = rank, so scale 1) approximating each delta; reports the error."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, errors, sq_err, sq_tot, targets = {}, {}, 0.0, 0.0, set()
    for name, delta in deltas:
        module = name[: -len(".weight")]
        a, b, err = svd_factor(delta, rank)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        errors[name] = err
        norm2 = delta.float().pow(2).sum().item()
        sq_err += err * err * norm2
        sq_tot += norm2
        targets.add(module.rsplit(".", 1)[-1])
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
           "target_modules": sorted(targets), "bias": "none", "base_model_name_or_path": base_spec,
           "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
           "inference_mode": True}
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    vals = list(errors.values())
    return {"rank": rank, "reconstruction_error": {
        "global_relative_frobenius": (sq_err / sq_tot) ** 0.5 if sq_tot else 0.0,
        "mean_relative_frobenius": sum(vals) / max(1, len(vals)), "max_relative_frobenius": max(vals, default=0.0)}}


@register_artifact("merged_model")
def load_merged_model(path: Path, meta: dict[str, Any], device: str | None = None):
    from ..eval.harness import LoadedModel

    bm = BaseModel(path)
    return LoadedModel(bm.load(device=device), bm.tokenizer(), meta.get("name", path.name),
                       {"kind": "merged_model", "method": meta.get("method"), "artifact": str(path)})


@register_artifact("merged_lora")
def load_merged_lora(path: Path, meta: dict[str, Any], device: str | None = None):
    from peft import PeftModel

    from ..eval.harness import LoadedModel

    bm = BaseModel(meta["base"])
    model = PeftModel.from_pretrained(bm.load(device=device), str(path), is_trainable=False).eval()
    return LoadedModel(model, bm.tokenizer(), meta.get("name", path.name),
                       {"kind": "merged_lora", "method": meta.get("method"), "artifact": str(path)})
