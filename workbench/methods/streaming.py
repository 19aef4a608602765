"""Streaming task-arithmetic merges of full models: our own engine, for speed and memory.

mergekit's TIES keeps every expert's tensor, argsorts it, and holds output shards in
memory. Here, per tensor: one expert delta at a time gives its magnitude threshold by
`kthvalue` (O(n), no sort); the sign election and disjoint mean then run over row chunks;
merged tensors leave through a sharded writer. The result equals mergekit's except where
|delta| ties exactly at an expert's threshold (argsort then picks by position).
Random drops (DARE) use a generator seeded per (seed, tensor, expert), so they are
deterministic but not the same draws as mergekit's global RNG.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CHUNK_ELEMS = 1 << 22  # 4M fp32 entries (16 MB) per expert per chunk


class ShardWriter:
    """Writes tensors into safetensors shards of at most `shard_bytes`, with an HF index."""

    def __init__(self, out_dir: Path, shard_bytes: int = 256 << 20):
        self.out_dir, self.shard_bytes = Path(out_dir), shard_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.buf and self.size + nbytes > self.shard_bytes:
            self.flush()
        self.buf[name] = t.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.buf:
            return
        save_file(self.buf, str(self.out_dir / f"shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.buf))
        self.buf, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.shards)
        if n == 1:
            (self.out_dir / "shard-00000.tmp").rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / f"shard-{i:05d}.tmp").rename(self.out_dir / final)
            weight_map.update({k: final for k in names})
        (self.out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))


def _row_chunks(shape: tuple[int, ...]):
    rows = shape[0] if shape else 1
    per_row = max(1, (torch.Size(shape).numel() // rows) if shape else 1)
    step = max(1, CHUNK_ELEMS // per_row)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _seed(seed: int, name: str, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}:{i}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def merge_full_tensor(name: str, base, experts, *, consensus: bool, sparsify: str | None, densities, weights,
                      normalize: bool, rescale: bool, lam: float, seed: int) -> torch.Tensor:
    """One tensor of a task-arithmetic-family merge of full experts, streamed over row chunks."""
    w0 = base.tensors.get(name)
    shape = tuple(w0.shape)
    readers = [e._full for e in experts]
    thresholds: list[float | None] = []
    scales: list[float] = []
    for i, (r, dens) in enumerate(zip(readers, densities)):
        thr, scale = None, 1.0
        if sparsify == "magnitude" and dens < 1:
            mag = (r.get(name).float() - w0.float()).abs_().flatten()
            k = max(1, int(dens * mag.numel()))
            thr = torch.kthvalue(mag, mag.numel() - k + 1).values.item()
            if rescale:
                before, after = mag.sum().item(), mag[mag >= thr].sum().item()
                scale = before / after if before >= 1e-7 and after >= 1e-7 else 1.0
            del mag
        elif sparsify == "random" and dens < 1 and rescale:
            g = torch.Generator().manual_seed(_seed(seed, name, i))
            before = after = 0.0
            for rows in _row_chunks(shape):
                d = r.get_slice(name, rows).float() - w0[rows].float()
                keep = torch.bernoulli(torch.full_like(d, dens), generator=g)
                before += d.abs().sum().item()
                after += (d * keep).abs().sum().item()
            scale = before / after if before >= 1e-7 and after >= 1e-7 else 1.0
        thresholds.append(thr)
        scales.append(scale)

    out = torch.empty(shape, dtype=torch.float32)
    gens = [torch.Generator().manual_seed(_seed(seed, name, i)) for i in range(len(readers))]
    wts = torch.tensor(weights, dtype=torch.float32)
    for rows in _row_chunks(shape):
        base_rows = w0[rows].float()
        ds = []
        for i, (r, thr, scale, dens) in enumerate(zip(readers, thresholds, scales, densities)):
            d = r.get_slice(name, rows).float() - base_rows
            if thr is not None:
                d = d * (d.abs() >= thr)
            elif sparsify == "random" and dens < 1:
                d = d * torch.bernoulli(torch.full_like(d, dens), generator=gens[i])
            if scale != 1.0:
                d = d * scale
            ds.append(d * weights[i])
        stack = torch.stack(ds)
        del ds
        w = wts.view(-1, *([1] * (stack.dim() - 1)))
        if consensus:
            sign = stack.sign()
            mask = sign == ((stack.sum(0) >= 0).float() * 2 - 1)
            mixed = (stack * mask).sum(0)
            divisor = (w * mask).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed = stack.sum(0)
            divisor = w.sum(0).expand_as(mixed).clone()
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed /= divisor
        if lam != 1:
            mixed *= lam
        out[rows] = mixed
    return out
