"""A small, deterministic causal-LM trainer with the loss on answer tokens only.

Examples are `question` + " " + `answer` + EOS, tokenized exactly as lm-eval's HFLM sees them at
evaluation time (`tasks.suite.encode_pair`: the special-token setting every prompt shares, the answer
cut from the whole text's tokens), so what is trained is what is evaluated. Batches are padded on the
right; prompt and padding labels are -100.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, model_validator

from ..errors import WorkbenchError
from ..methods.base import (
    MAX_BATCH,
    MAX_LENGTH,
    MAX_LR,
    MAX_RANK,
    MAX_SEED,
    MAX_STEPS,
    MAX_TEMPERATURE,
    check_warmup,
)
from ..data import DataRecord
from ..pool import Expert, Pool
from ..progress import progress_bar
from ..tasks.suite import DEFAULT_SEED, encode_pair

if TYPE_CHECKING:
    import torch

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Common(Schema):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    steps: int = Field(120, gt=0, le=MAX_STEPS, description=f"optimizer steps (1..{MAX_STEPS:,})")
    batch_size: int = Field(16, gt=0, le=MAX_BATCH, description=f"examples per step (1..{MAX_BATCH})")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed for initialisation and batch order (0..2**32-1)")
    warmup: int = Field(10, ge=0, le=MAX_STEPS,
                        description="linear warm-up steps, then linear decay to 0 (an explicit one: below steps)")
    max_length: int = Field(128, gt=8, le=MAX_LENGTH, description=f"examples longer than this are truncated "
                                                                  f"(9..{MAX_LENGTH})")
    data_seed: int = Field(DEFAULT_SEED, ge=0, le=MAX_SEED, description="task suite seed (0..2**32-1)")

    @model_validator(mode="after")
    def _warmup_below_steps(self):
        check_warmup(self)
        return self


class LoraConfigModel(_Common):
    kind: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, le=MAX_RANK, description=f"LoRA rank (1..{MAX_RANK})")
    alpha: float = Field(16, gt=0, le=MAX_TEMPERATURE, description="LoRA alpha (scale = alpha / r), (0, 1e4]")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout, [0, 1)")
    targets: list[str] = Field(default_factory=lambda: list(LLAMA_TARGETS), description="target module names")
    lr: float = Field(2e-3, gt=0, le=MAX_LR, description="AdamW learning rate, (0, 1]")


class FullConfig(_Common):
    kind: Literal["full"] = "full"
    lr: float = Field(5e-5, gt=0, le=MAX_LR, description="AdamW learning rate, (0, 1]")
    steps: int = Field(60, gt=0, le=MAX_STEPS, description=f"optimizer steps (1..{MAX_STEPS:,})")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW weight decay, [0, 1]")


@dataclass
class TrainResult:
    loss_curve: list[float]
    wall_s: float
    tokens: int
    examples: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.wall_s, 1e-9)


def encode(tokenizer, question: str, answer: str, max_length: int, delimiter: str = " ") -> tuple[list[int], list[int]]:
    """(ids, labels) of one example: the answer after `delimiter` (" ": lm-eval's target delimiter; "" after a
    chat template's generation prompt or for plain text), then EOS; labels -100 on the prompt."""
    q, a = encode_pair(tokenizer, question, delimiter + answer)
    a = a + [tokenizer.eos_token_id]
    ids = (q + a)[:max_length]
    labels = ([-100] * len(q) + a)[:max_length]
    return ids, labels


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    import torch

    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def encode_row(tokenizer, row: dict[str, Any], max_length: int) -> tuple[list[int], list[int]]:
    """A data row ({"question", "answer"[, "delimiter"]}, see `workbench.data`) encoded for training."""
    return encode(tokenizer, row["question"], row["answer"], max_length, row.get("delimiter", " "))


def check_finite(named, desc: str, when: str) -> None:
    """Refuse trained weights that are not finite (inf or NaN: an update that diverged), in one line, before they
    are saved or cached. `named`: (name, tensor) pairs, or tensors."""
    import torch

    bad, total = [], 0
    for i, item in enumerate(named):
        name, t = item if isinstance(item, tuple) else (f"parameter {i}", item)
        total += 1
        if not bool(torch.isfinite(t.detach()).all()):
            bad.append(name)
    if bad:
        raise WorkbenchError(f"{desc}: {len(bad)} of {total} trained parameters are not finite (inf or NaN) {when}, "
                             f"e.g. {bad[0]}: lower the learning rate; nothing was saved")


def train_loop(model, tokenizer, rows: list[dict[str, Any]], cfg: _Common, params, desc: str,
               device: str = "cpu", *, loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] | None = None,
               after_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
               checkpoint: Checkpoint | None = None) -> TrainResult:
    """AdamW with warm-up and linear decay; loss on answer tokens; progress bar with the loss.

    `loss_fn(model, batch)` replaces `model(**batch).loss` (an auxiliary loss added: MoLE's balance);
    `after_step(step, batch)` runs after each optimizer step (SMoRA's bias update); `checkpoint` saves the
    trained state every `checkpoint.every` steps and a rerun resumes from the last one (same batches, same
    result as an uninterrupted run)."""
    import torch

    encoded = [encode_row(tokenizer, r, cfg.max_length) for r in rows]
    rng = random.Random(cfg.seed)
    order: list[int] = []
    params = list(params)
    names = {id(q): n for n, q in model.named_parameters()}
    named = [(names.get(id(q), f"parameter {i}"), q) for i, q in enumerate(params)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=getattr(cfg, "weight_decay", 0.0))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    curve, tokens, t0, start, wall0 = [], 0, time.perf_counter(), 0, 0.0
    if checkpoint is not None:
        state = checkpoint.load(opt, params)
        if state is not None:
            start, curve, tokens, order = state["step"], state["curve"], state["tokens"], state["order"]
            wall0 = float(state.get("wall_s", 0.0))  # training time before the kill
            rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
            for g in opt.param_groups:  # the schedule at the resumed step
                g["lr"] = cfg.lr * lr_at(start)
            sched.last_epoch = start
    with progress_bar(desc, total=cfg.steps) as bar:
        bar.update(start)
        for step in range(start, cfg.steps):
            batch_idx = []
            for _ in range(cfg.batch_size):  # epochs of shuffled examples, in a seeded order
                if not order:
                    order = list(range(len(encoded)))
                    rng.shuffle(order)
                batch_idx.append(order.pop())
            batch = collate([encoded[i] for i in batch_idx], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            curve.append(round(loss.item(), 5))
            tokens += int(batch["attention_mask"].sum())
            if after_step is not None:
                after_step(step, batch)
            bar.update(1, loss=curve[-1])
            if not math.isfinite(curve[-1]):
                raise WorkbenchError(f"{desc}: loss became {curve[-1]} at step {step} (lower the learning rate)")
            if checkpoint is not None and (step + 1) % checkpoint.every == 0 and step + 1 < cfg.steps:
                check_finite(named, desc, f"after step {step}")  # a checkpoint is never a broken model
                rs = rng.getstate()
                checkpoint.save(opt, params, {"step": step + 1, "curve": curve, "tokens": tokens, "order": order,
                                              "rng": [rs[0], list(rs[1]), rs[2]],
                                              "wall_s": wall0 + time.perf_counter() - t0})
    # the loss above is that of the weights before each update: the last update is checked here
    check_finite(named, desc, f"after the last step ({cfg.steps - 1})")
    model.eval()
    return TrainResult(curve, wall0 + time.perf_counter() - t0, tokens, len(rows), {"resumed_at": start})


class Checkpoint:
    """Training state in one safetensors file (atomic rename): a module's state dict (what trains, with its
    buffers), AdamW's moments, and the loop's position (step, loss curve, batch order, data RNG) as metadata.
    `module`'s trainable parameters must be the loop's `params`, in the same order. `extra`: a JSON-able dict
    the caller fills while training (e.g. usage records per step), saved with the state and refilled on resume."""

    def __init__(self, path: Path, module: torch.nn.Module, every: int = 50, extra: dict[str, Any] | None = None):
        self.path, self.module, self.every = Path(path), module, max(1, int(every))
        self.extra = extra if extra is not None else {}

    def save(self, opt: torch.optim.Optimizer, params: list[torch.Tensor], state: dict[str, Any]) -> None:
        import json
        import os

        import torch
        from safetensors.torch import save_file

        tensors = {f"module.{k}": v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        for i, p in enumerate(params):
            st = opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    tensors[f"opt.{i}.{k}"] = st[k].detach().cpu().contiguous()
            if "step" in st:
                tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"state": json.dumps({**state, "extra": self.extra})})
        os.replace(tmp, self.path)

    def load(self, opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict[str, Any] | None:
        import json

        import torch
        from safetensors import safe_open

        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), "pt") as f:
                state = json.loads(f.metadata()["state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: start over, say so
            print(f"checkpoint {self.path} unreadable ({type(e).__name__}): training from the start")
            return None
        device = params[0].device if params else torch.device("cpu")
        self.module.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")})
        self.extra.clear()
        self.extra.update(state.get("extra") or {})
        for i, p in enumerate(params):
            if f"opt.{i}.exp_avg" in tensors:
                opt.state[p] = {"step": tensors[f"opt.{i}.step"].reshape(()).to(device),
                                "exp_avg": tensors[f"opt.{i}.exp_avg"].to(device),
                                "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(device)}
        return state


def _stable_peft_files(folder: Path, base_spec: str) -> None:
    """Make PEFT's files the same for the same training: target_modules sorted (PEFT writes a set, in any order)
    and the model card's base named by the pool's spec, not by the folder it was loaded from on this machine.
    (File hashes key artifacts and shipped gates: equal weights must give equal hashes.)"""
    import json
    import re

    cfg = folder / "adapter_config.json"
    if cfg.is_file():
        d = json.loads(cfg.read_text())
        if isinstance(d.get("target_modules"), list):
            d["target_modules"] = sorted(d["target_modules"])
        cfg.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    card = folder / "README.md"
    if card.is_file():
        text = re.sub(r"(?m)^base_model: .*$", f"base_model: {base_spec}", card.read_text())
        card.write_text(re.sub(r"(?m)^- base_model:adapter:.*$", f"- base_model:adapter:{base_spec}", text))


def train_expert(pool: Pool, name: str, data: list[tuple[DataRecord, list[dict[str, Any]]]],
                 cfg: LoraConfigModel | FullConfig, *, device: str = "cpu", tags: dict[str, str] | None = None,
                 replace: bool = False) -> Expert:
    """Train a LoRA or full expert on `data` ((record, rows) per dataset, `workbench.data.open_data`; several:
    a multitask expert) and add it to `pool` with the records in its manifest entry."""
    import torch

    if not data:
        raise WorkbenchError(f"expert {name!r}: no training data (give --data or --task)")
    tasks = [rec.name for rec, _ in data]
    if name in pool and not replace:
        raise WorkbenchError(f"pool {pool.name!r} already has an expert named {name!r} (use --replace)")
    # LoRA's initialisation (and dropout) draw from torch's global generator: seeded inside a fork that
    # restores it afterwards (the caller's random state is untouched)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        base = pool.base
        tok = base.tokenizer()
        model = base.load(device=device)
        rows = [r for _, part in data for r in part]
        if isinstance(cfg, LoraConfigModel):
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                              task_type="CAUSAL_LM")
            model = get_peft_model(model, lcfg)
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            params = list(model.parameters())
        result = train_loop(model, tok, rows, cfg, params, f"train {cfg.kind} {name}", device)
    meta = {
        "method": cfg.kind, "tasks": tasks, "config": cfg.model_dump(mode="json"), "steps": cfg.steps,
        "loss_curve": result.loss_curve, "final_loss": sum(result.loss_curve[-10:]) / min(10, len(result.loss_curve)),
        "wall_s": round(result.wall_s, 2), "tokens": result.tokens, "tokens_per_s": round(result.tokens_per_s, 1),
        "examples": result.examples, "device": device, "torch": torch.__version__,
    }
    default_tags = {"task": tasks[0]} if len(tasks) == 1 else {"task": "multitask"}
    with tempfile.TemporaryDirectory(prefix=f"wb-train-{name}-") as tmp:
        out = Path(tmp) / name
        model = model.to("cpu")
        if isinstance(cfg, LoraConfigModel):
            # name the base by the pool's spec, not by this machine's cache path (the files may ship in git)
            for c in model.peft_config.values():
                c.base_model_name_or_path = pool.manifest.base.spec
            model.save_pretrained(out, safe_serialization=True)
            _stable_peft_files(Path(out), pool.manifest.base.spec)
        else:
            model.save_pretrained(out, safe_serialization=True)
            tok.save_pretrained(out)
        return pool.add(out, name, kind=cfg.kind, tags={**default_tags, **(tags or {})}, training=meta,
                        replace=replace, data=[rec for rec, _ in data])
