"""Lazy, pickle-free access to the tensors of a model or adapter folder."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open  # torch is imported by the first tensor read, not here

from .errors import ExpertValidationError
from .io import PICKLE_SUFFIXES

if TYPE_CHECKING:
    import torch


def pickle_files(folder: Path) -> list[str]:
    """Names of files in `folder` (top level) whose format would unpickle on load."""
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)


def refuse_pickles(folder: Path, what: str) -> None:
    if found := pickle_files(folder):
        raise ExpertValidationError(
            f"{what} {folder} holds pickle-format weights ({', '.join(found)}); they are never "
            "loaded (unpickling runs code): convert them to .safetensors first"
        )


class SafetensorsDir:
    """Every tensor of the `.safetensors` files in one folder, read one tensor at a time.

    Only headers are read up front; `get(name)` reads one tensor through safetensors'
    memory map. Truncated or corrupt files raise `ExpertValidationError` naming the file.
    """

    def __init__(self, folder: Path, files: list[str] | None = None):
        self.folder = Path(folder)
        if files is None:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise ExpertValidationError(f"no .safetensors weights in {self.folder}")
        self.files = files
        self._handles: dict[str, object] = {}

    def _open(self, fname: str):
        if fname not in self._handles:
            path = self.folder / fname
            if not path.is_file():
                raise ExpertValidationError(f"missing weights file {path}")
            try:
                self._handles[fname] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise ExpertValidationError(f"cannot read {path} (truncated or corrupt?): {e}") from None
        return self._handles[fname]

    @cached_property
    def index(self) -> dict[str, str]:
        """tensor name -> file name"""
        out: dict[str, str] = {}
        for fname in self.files:
            for key in self._open(fname).keys():
                out[key] = fname
        return out

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(self._open(f).get_slice(k).get_shape()) for k, f in self.index.items()}

    @cached_property
    def dtypes(self) -> dict[str, str]:
        """tensor name -> safetensors dtype code (F32, BF16, ...)"""
        return {k: self._open(f).get_slice(k).get_dtype() for k, f in self.index.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def keys(self) -> list[str]:
        return list(self.index)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._open(self.index[name]).get_tensor(name)
        except SafetensorError as e:
            raise ExpertValidationError(f"cannot read tensor {name!r} from {self.folder}: {e}") from None

    def get_slice(self, name: str, rows: slice) -> torch.Tensor:
        """Rows of one tensor, read without loading the rest of it."""
        sl = self._open(self.index[name]).get_slice(name)
        return sl[rows] if len(sl.get_shape()) else sl[:]

    def check_finite(self, what: str) -> None:
        import torch

        for name in self.index:
            t = self.get(name)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ExpertValidationError(f"{what} has NaN or Inf values in tensor {name!r}")

    def byte_size(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self.files)


def model_weight_files(folder: Path) -> list[str]:
    """The safetensors files of an HF model folder (single file or sharded index)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ExpertValidationError(f"invalid {index}: {e}") from None
        files = sorted(set(weight_map.values()))
        bad = [f for f in files if not isinstance(f, str) or Path(f).name != f or not f.endswith(".safetensors")]
        if bad:  # a shard outside the folder would be read but never copied or hashed
            raise ExpertValidationError(f"invalid {index}: weight_map names {str(bad[0])[:80]!r}, not a .safetensors "
                                        "file of this folder")
        return files
    return sorted(p.name for p in folder.glob("*.safetensors"))


def relative_distance(tensors: SafetensorsDir, reference: SafetensorsDir) -> float:
    """`||T − R|| / ||R||` over every floating tensor both hold (one Frobenius norm), read one tensor at a time."""
    import torch

    num = den = 0.0
    for name in sorted(set(tensors.index) & set(reference.index)):
        t, r = tensors.get(name), reference.get(name)
        if not (t.is_floating_point() and r.is_floating_point()):
            continue
        r = r.float()
        num += (t.float() - r).square().sum(dtype=torch.float64).item()
        den += r.square().sum(dtype=torch.float64).item()
    return (num / den) ** 0.5 if den else 0.0
