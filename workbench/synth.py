"""Synthetic pools for benchmarks and scale tests: N valid PEFT LoRA adapters over a pool's base, in one go.

They are NOT experts: nothing was trained, they have learned nothing, and evaluating them measures noise. They
exist so that the cost of every pool operation, merge, router and server can be measured against the number of
adapters N (`workbench bench scale`) on adapters shaped like real ones.

Adapter i (named `<prefix>-<i:04d>`) is drawn from a generator seeded by (seed, i) alone, so a pool of 64 is the
first 64 adapters of a pool of 1,024:
- rank r from `ranks` (4/8/16 by default, mixed), lora_alpha = 2r;
- a template, round robin over the LoRA experts of the source pool (the pool itself when no source is given;
  synthetic adapters are never templates); with no template, random factors;
- target modules: the template's module types, each kept with probability 3/4 (at least one), plus one other
  type of the base's layers with probability 1/4; random adapters take a random non-empty set of types;
- factors: at a module the template adapts, the template's delta s·B·A as its top-r SVD factors (rank
  min(r, r_template); ranks beyond the template's start at zero), plus Gaussian noise of RMS `noise` times each
  factor's RMS, so the adapter's top singular directions stay near its template's (routers have something to
  find); elsewhere random factors whose delta has Frobenius norm RANDOM_DELTA times the base weight's.
Their manifest entries are tagged `synthetic=1` and `template=<name>`, carry the template's data records (so
data-routed methods can run over them) and a note saying what they are. The manifest is written once
(`Pool.add_many`), each adapter validated exactly as `Pool.add` validates it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PoolError
from .pool import MANIFEST, STAGING_DIR, AddItem, Expert, Pool, check_name, resolve_pool_path

if TYPE_CHECKING:
    import torch

MAX_ADAPTERS = 4096  # adapters per call: 4 x the largest pool the scale benchmark measures
MAX_RANK = 256
RANDOM_DELTA = 0.02  # ||s B A|| / ||W|| of a random (template-less) module: a small fine-tune's size
SYNTH_TAG = "synthetic"
_LAYER_LINEAR = re.compile(r"^(?P<module>.*\.layers\.\d+\..*\.(?P<kind>[A-Za-z0-9_]+))\.weight$")


def _seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"synth:{seed}:{index}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def is_synthetic(expert: Expert) -> bool:
    """Whether an expert was written by `synthesize` (tag synthetic=1)."""
    return (expert.entry.tags or {}).get(SYNTH_TAG) == "1"


def _layer_modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """Module type (leaf name, e.g. q_proj) -> the base's 2-D weights of that type inside its layers."""
    out: dict[str, list[str]] = {}
    for name, shape in sorted(shapes.items()):
        m = _LAYER_LINEAR.match(name)
        if m and len(shape) == 2:
            out.setdefault(m["kind"], []).append(name)
    return out


def _svd_factors(expert: Expert, tensor: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, d_in], B [d_out, r]) with B @ A = s·B_e·A_e, columns ordered by singular value (an r x r problem:
    A_e^T = Q R, s·B_e·A_e = (s·B_e R^T) Q^T = U S Vh Q^T)."""
    import torch

    a, b, scale = expert.lora_factors(tensor)
    q, r = torch.linalg.qr(a.double().T)  # q [d_in, r]
    u, s, vh = torch.linalg.svd(b.double() @ r.T * scale, full_matrices=False)
    root = s.sqrt()
    return (root[:, None] * (q @ vh.T).T).float(), (u * root).float()


def _portable(record, root: Path):
    """A template's data record as it reads from another pool: a relative file path made absolute."""
    src = record.source
    if src.startswith("suite:") or Path(src).is_absolute() or not (root / src).exists():
        return record
    return record.model_copy(update={"source": str((root / src).resolve())})


def _check_params(n: int, ranks: tuple[int, ...], noise: float, seed: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_ADAPTERS:
        raise PoolError(f"synthesize: n must be an integer from 1 to {MAX_ADAPTERS:,} (got {n!r})")
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_RANK for r in ranks):
        raise PoolError(f"synthesize: ranks must be integers from 1 to {MAX_RANK} (got {list(ranks)!r:.60})")
    if not (isinstance(noise, (int, float)) and 0 <= noise <= 1):
        raise PoolError(f"synthesize: noise must be between 0 and 1 (got {noise!r:.40})")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise PoolError(f"synthesize: seed must be an integer from 0 to 2**32-1 (got {seed!r:.40})")


def _draw(pool: Pool, tpl: Expert | None, seed: int, ranks: tuple[int, ...], noise: float,
          by_kind: dict[str, list[str]], svd: dict, base_norm: dict) -> tuple[int, list[str], dict[str, torch.Tensor]]:
    """One adapter: (rank, target module types, PEFT tensors), drawn from a generator seeded with `seed` (see the
    module doc). `svd` and `base_norm` are caches shared by the adapters of one call."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = pool.base.tensors.shapes
    kinds = sorted(by_kind)

    def pick(k: int) -> int:
        return int(torch.randint(k, (1,), generator=g))

    def coin(p: float) -> bool:
        return float(torch.rand((), generator=g)) < p

    r = ranks[pick(len(ranks))]
    own = {t: t.rsplit(".", 2)[-2] for t in tpl.delta_names()} if tpl is not None else {}  # tensor -> type
    tkinds = sorted(set(own.values()) & set(kinds))
    if tkinds:
        chosen = [k for k in tkinds if coin(0.75)] or [tkinds[pick(len(tkinds))]]
        others = [k for k in kinds if k not in chosen]
        if others and coin(0.25):
            chosen.append(others[pick(len(others))])
    else:
        chosen = [k for k in kinds if coin(0.5)] or [kinds[pick(len(kinds))]]
    tensors: dict[str, torch.Tensor] = {}
    scale = 2.0  # lora_alpha = 2r
    for tensor in sorted(t for k in chosen for t in by_kind[k]):
        d_out, d_in = shapes[tensor]
        if tensor in own:  # the template's top-r SVD factors, perturbed
            key = (tpl.name, tensor)
            if key not in svd:
                svd[key] = _svd_factors(tpl, tensor)
            ta, tb = svd[key]
            a, b = torch.zeros(r, d_in), torch.zeros(d_out, r)
            k = min(r, ta.shape[0])
            a[:k], b[:, :k] = ta[:k], tb[:, :k] / scale
            rms_a = float(ta.pow(2).mean().sqrt()) or 1.0 / d_in ** 0.5
            rms_b = float(tb.pow(2).mean().sqrt()) / scale or 1e-3
            a += torch.randn(r, d_in, generator=g) * (noise * rms_a)
            b += torch.randn(d_out, r, generator=g) * (noise * rms_b)
        else:  # random factors: ||s B A|| about RANDOM_DELTA ||W||
            if tensor not in base_norm:
                base_norm[tensor] = float(pool.base.tensors.get(tensor).float().norm())
            a = torch.randn(r, d_in, generator=g) / d_in ** 0.5
            b = torch.randn(d_out, r, generator=g) * (RANDOM_DELTA * base_norm[tensor] / (d_out * r) ** 0.5 / scale)
        module = tensor[: -len(".weight")]
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    return r, chosen, tensors


def synthesize(pool: str | os.PathLike | Pool, n: int, *, source: str | os.PathLike | Pool | None = None,
               base: str | None = None, seed: int = 0, ranks: tuple[int, ...] = (4, 8, 16), noise: float = 0.1,
               prefix: str = "synth", log=None) -> list[Expert]:
    """Write `n` synthetic LoRA adapters into `pool` (created over `base`, else over the source pool's base, when it
    does not exist) and add them with one manifest write; returns them. Templates: the LoRA experts of `source`
    (a pool name or path) when given, else the pool's own non-synthetic LoRA experts; none: random factors. Names
    continue after the pool's existing `<prefix>-NNNN` adapters. See the module doc for what is drawn."""
    from safetensors.torch import save_file

    from .progress import progress_bar

    ranks = tuple(ranks)
    _check_params(n, ranks, noise, seed)
    check_name(prefix, "prefix")
    if len(prefix) > 40:  # names are <prefix>-NNNN, at most 64 characters
        raise PoolError(f"synthesize: prefix of {len(prefix)} characters: at most 40")
    src = source if isinstance(source, Pool) or source is None else Pool.open(source)
    if isinstance(pool, Pool):
        target = pool
    elif (resolve_pool_path(pool) / MANIFEST).is_file():
        target = Pool.open(pool)
    else:
        spec = base or (src.manifest.base.spec if src is not None else None)
        if spec is None:
            raise PoolError(f"pool {str(pool)!r} does not exist: give the base to create it over (--base), or a "
                            "source pool (--from)")
        target = Pool.create(pool, spec)
    if base is not None and target.manifest.base.spec != base and not target.base.is_named_by(base):
        raise PoolError(f"pool {target.name!r} is over base {target.manifest.base.spec!r}, not {base!r}")
    if src is not None and src.manifest.base.fingerprint != target.manifest.base.fingerprint:
        raise PoolError(f"source pool {src.name!r} is over another base ({src.manifest.base.spec}) than pool "
                        f"{target.name!r} ({target.manifest.base.spec})")
    templates = [e for e in (src or target).experts
                 if e.kind == "lora" and not is_synthetic(e) and e.files_present()]
    by_kind = _layer_modules(target.base.tensors.shapes)
    if not by_kind:
        raise PoolError(f"base {target.manifest.base.spec!r} has no linear layers under '.layers.N.' to adapt")
    base_norm: dict[str, float] = {}
    svd: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)")
    with target._locked():
        taken = [int(m.group(1)) for x in target.names() if (m := pattern.fullmatch(x))]
        start = max(taken) + 1 if taken else 0
        scratch = target.root / STAGING_DIR / f".add-synth-{os.getpid()}-{time.monotonic_ns()}"  # a killed run's
        scratch.mkdir(parents=True)  # copy is removed by the pool's next locked write, like a killed add's
        try:
            items = []
            with progress_bar(f"synthesizing {n} LoRA adapters", total=n) as bar:
                for i in range(start, start + n):
                    tpl = templates[i % len(templates)] if templates else None
                    r, chosen, tensors = _draw(target, tpl, _seed(seed, i), ranks, noise, by_kind, svd, base_norm)
                    name = f"{prefix}-{i:04d}"
                    folder = scratch / name
                    folder.mkdir()
                    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
                    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                           "lora_dropout": 0.0, "target_modules": sorted(chosen), "bias": "none",
                           "base_model_name_or_path": target.manifest.base.spec, "fan_in_fan_out": False,
                           "use_rslora": False, "use_dora": False, "init_lora_weights": True,
                           "inference_mode": True}
                    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
                    what = tpl.name if tpl is not None else "random factors"
                    tags = {SYNTH_TAG: "1", "template": tpl.name if tpl is not None else "random"}
                    if tpl is not None and (tpl.entry.tags or {}).get("task"):
                        tags["template_task"] = tpl.entry.tags["task"]
                    items.append(AddItem(
                        folder, name, kind="lora", tags=tags,
                        training={"synthetic": {"template": what, "seed": seed, "index": i, "noise": noise}},
                        notes=f"synthetic benchmark adapter ({what} perturbed): not a trained expert",
                        data=[_portable(rec, tpl.pool.root) for rec in tpl.entry.data] if tpl is not None else []))
                    bar.update(1)
            if log:
                log(f"validating and adding {n} adapters to pool {target.name} (one manifest write)")
            return target._add_many_locked(items, move=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


__all__ = ["MAX_ADAPTERS", "SYNTH_TAG", "is_synthetic", "synthesize"]
