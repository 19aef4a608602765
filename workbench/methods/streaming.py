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
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


CHUNK_ELEMS = 1 << 22  # 4M fp32 entries (16 MB) per expert per chunk


@cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim`). A streaming merge frees and allocates
    tensors of a few MB per expert and tensor; glibc serves them from its heap after the first frees (its mmap
    threshold grows), and the freed holes stay in the process: its memory then grows with the number of experts
    it has streamed. Called once per merged tensor."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@cache
def _dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype code -> torch dtype (a function: this module imports no torch until it writes)."""
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}


@cache
def _codes() -> dict[torch.dtype, str]:
    return {v: k for k, v in _dtypes().items()}


class ShardWriter:
    """Writes safetensors shards whose layout is fixed up front, each tensor straight to its place.

    Every tensor's name, dtype and shape are known before merging starts (they are the base's),
    so each shard's header is written first and a tensor goes to disk the moment it is merged,
    in any order: nothing is buffered (a buffering writer holds up to a shard of output in
    memory). Shards hold at most `shard_bytes` (a bigger tensor gets a shard of its own), with
    an HF index when there are several. `close()` checks that every tensor was written.
    """

    def __init__(self, out_dir: Path, layout: list[tuple[str, str, tuple[int, ...]]], shard_bytes: int = 1 << 30):
        import torch

        self.out_dir = Path(out_dir)
        self.slots: dict[str, tuple[int, int, int, str, tuple[int, ...]]] = {}  # name -> shard, offset, nbytes, ...
        shards: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in layout:
            nbytes = torch.Size(shape).numel() * _dtypes()[dtype].itemsize
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape), nbytes))
            size += nbytes
        self.files, self.names = [], []
        for i, shard in enumerate(shards):
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            offsets, offset = {}, 0
            for name, dtype, shape, nbytes in shard:
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offsets[name] = offset
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
            start = 8 + len(raw)
            f = open(self.out_dir / f"shard-{i:05d}.tmp", "wb")  # noqa: SIM115 - closed in close()
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(start + offset)
            for name, dtype, shape, nbytes in shard:
                self.slots[name] = (i, start + offsets[name], nbytes, dtype, shape)
            self.files.append(f)
            self.names.append(list(offsets))
        self.pending = set(self.slots)
        self.total = sum(v[2] for v in self.slots.values())

    def add(self, name: str, t: torch.Tensor) -> None:
        import torch

        if name not in self.slots:
            raise ValueError(f"tensor {name!r} is not in the output layout")
        i, offset, _, dtype, shape = self.slots[name]
        if tuple(t.shape) != shape or _codes().get(t.dtype) != dtype:
            raise ValueError(f"tensor {name!r}: got {tuple(t.shape)} {t.dtype}, layout says {shape} {dtype}")
        f = self.files[i]
        f.seek(offset)
        f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
        self.pending.discard(name)

    def close(self) -> None:
        for f in self.files:
            f.close()
        if self.pending:
            raise ValueError(f"{len(self.pending)} tensors never written, e.g. {sorted(self.pending)[:3]}")
        n = len(self.files)
        if n == 1:
            (self.out_dir / "shard-00000.tmp").rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.names):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / f"shard-{i:05d}.tmp").rename(self.out_dir / final)
            weight_map.update({k: final for k in names})
        (self.out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))


def _row_chunks(shape: tuple[int, ...]):
    import torch

    rows = shape[0] if shape else 1
    per_row = max(1, (torch.Size(shape).numel() // rows) if shape else 1)
    step = max(1, CHUNK_ELEMS // per_row)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def tensor_seed(seed: int, name: str, i: int) -> int:
    """A 63-bit seed of (seed, tensor name, expert index): random draws independent of order and of process."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}:{i}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def merge_full_tensor(name: str, base, experts, *, consensus: bool, sparsify: str | None, densities, weights,
                      normalize: bool, rescale: bool, lam: float, seed: int) -> torch.Tensor:
    """One tensor of a task-arithmetic-family merge of full experts, streamed over row chunks."""
    import torch

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
            g = torch.Generator().manual_seed(tensor_seed(seed, name, i))
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
    gens = [torch.Generator().manual_seed(tensor_seed(seed, name, i)) for i in range(len(readers))]
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
