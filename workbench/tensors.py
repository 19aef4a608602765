"""Lazy, pickle-free access to the tensors of a model or adapter folder."""

from __future__ import annotations

import json
import sys
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
        _check_finite(((name, self.get(name)) for name in self.index), what)

    def byte_size(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self.files)


# safetensors dtype code -> (torch dtype name, bytes per element)
_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
           "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
           "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}
_CODES = tuple(_DTYPES)
MAX_HEADER = 100_000_000  # safetensors' own limit on a header, in bytes
MAX_DIMS = 8
# tensor names -> position, shared by every file with the same names (a pool's experts mostly have one layout)
_SHARED_INDEX: dict[tuple[str, ...], dict[str, int]] = {}


def _shared_index(keys: tuple[str, ...]) -> dict[str, int]:
    index = _SHARED_INDEX.get(keys)
    if index is None:
        if len(_SHARED_INDEX) >= 256:  # bounded: past 256 distinct layouts a file keeps its own
            return {sys.intern(k): i for i, k in enumerate(keys)}
        index = _SHARED_INDEX[keys] = {sys.intern(k): i for i, k in enumerate(keys)}
    return index


class TensorFile:
    """The tensors of one `.safetensors` file kept as a few small arrays (each tensor's byte span, dtype and
    shape: about 90 bytes a tensor, the names shared between files that have the same ones), read one tensor at
    a time with a plain positioned read: no open handle, memory map or per-tensor Python object stays between
    reads. For the many-adapter paths (a pool's every LoRA expert open at once in a merge over 1,024 of them),
    where `safe_open`'s handle and `SafetensorsDir`'s dicts cost about 0.2 MB an adapter. The header is checked
    as safetensors checks it (known dtypes, spans that match their shapes, lie inside the file and do not overlap);
    the file is the one that was checked on every read (same inode, size and mtime), else a one-line error: the
    old reader's memory map went on reading a replaced file's old bytes, positions into a new one would not."""

    def __init__(self, path: Path):
        import numpy as np

        self.path = Path(path)
        where = f"cannot read {self.path} (truncated or corrupt?)"
        try:
            st = self.path.stat()
            size = st.st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if not 0 < n <= min(size - 8, MAX_HEADER):
                    raise ExpertValidationError(f"{where}: header length {n} for a file of {size} bytes")
                header = json.loads(f.read(n))
        except OSError as e:
            raise ExpertValidationError(f"{where}: {e}") from None
        except (ValueError, RecursionError) as e:
            raise ExpertValidationError(f"{where}: its header is not JSON ({str(e)[:80]})") from None
        if not isinstance(header, dict):
            raise ExpertValidationError(f"{where}: its header is not a JSON object")
        keys = tuple(sorted(k for k in header if k != "__metadata__"))
        start = 8 + n
        spans = np.zeros((len(keys), 2), dtype=np.int64)
        ndims = np.zeros(len(keys), dtype=np.uint8)
        dims: list[int] = []
        codes = np.zeros(len(keys), dtype=np.uint8)
        for i, key in enumerate(keys):
            info = header[key]
            ok = isinstance(info, dict) and info.get("dtype") in _DTYPES
            shape, offs = (info.get("shape"), info.get("data_offsets")) if ok else (None, None)
            ok = ok and isinstance(shape, list) and len(shape) <= MAX_DIMS and all(
                type(d) is int and d >= 0 for d in shape) and isinstance(offs, list) and len(offs) == 2 and all(
                type(o) is int for o in offs)
            if ok:
                numel = 1
                for d in shape:
                    numel *= d
                b, e = offs
                ok = 0 <= b <= e and e - b == numel * _DTYPES[info["dtype"]][1] and start + e <= size
            if not ok:
                dtype = info.get("dtype") if isinstance(info, dict) else None
                why = (f"dtype {str(dtype)[:20]!r} is not supported" if isinstance(dtype, str) and dtype not in _DTYPES
                       else "an invalid entry in the header")
                raise ExpertValidationError(f"{where}: tensor {key[:80]!r}: {why}")
            spans[i] = (start + offs[0], start + offs[1])
            dims += shape
            ndims[i], codes[i] = len(shape), _CODES.index(info["dtype"])
        filled = spans[spans[:, 1] > spans[:, 0]]  # empty tensors take no bytes: they overlap nothing
        filled = filled[np.argsort(filled[:, 0], kind="stable")]
        if len(filled) > 1 and bool((filled[1:, 0] < filled[:-1, 1]).any()):
            raise ExpertValidationError(f"{where}: two tensors' bytes overlap in the header")
        try:
            self._dims = np.array(dims, dtype=np.int64)  # shapes as one flat array, tensor i's from _first[i]
        except OverflowError:
            raise ExpertValidationError(f"{where}: a tensor's shape is too large") from None
        self._first = np.concatenate(([0], np.cumsum(ndims)[:-1])).astype(np.int32)
        self._index = _shared_index(keys)
        self._spans, self._ndims, self._codes = spans, ndims, codes
        self._stamp = _stamp(st)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def keys(self) -> list[str]:
        return list(self._index)

    def shape(self, name: str) -> tuple[int, ...]:
        i = self._index[name]
        first = int(self._first[i])
        return tuple(int(d) for d in self._dims[first:first + int(self._ndims[i])])

    def dtype(self, name: str) -> str:
        """The tensor's safetensors dtype code (F32, BF16, ...)."""
        return _CODES[self._codes[self._index[name]]]

    def _opened(self):
        """The file, checked to be the one whose header was read (a replaced or rewritten file: one line)."""
        import os

        try:
            f = open(self.path, "rb")  # noqa: SIM115 - returned to a with block
        except OSError as err:
            raise ExpertValidationError(f"cannot read {self.path}: {err}") from None
        if _stamp(os.fstat(f.fileno())) != self._stamp:
            f.close()
            raise ExpertValidationError(f"{self.path} changed since it was checked (replaced or rewritten): open "
                                        "it again")
        return f

    def _read(self, f, name: str) -> torch.Tensor:
        import torch

        i = self._index[name]
        b, e = (int(v) for v in self._spans[i])
        dtype = getattr(torch, _DTYPES[_CODES[self._codes[i]]][0])
        buf = bytearray(e - b)
        try:
            f.seek(b)
            got = f.readinto(buf)
        except OSError as err:
            raise ExpertValidationError(f"cannot read tensor {name!r} from {self.path}: {err}") from None
        if got != e - b:
            raise ExpertValidationError(f"cannot read tensor {name!r} from {self.path}: the file ends before the "
                                        "tensor (truncated since it was checked?)")
        flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return flat.view(self.shape(name))

    def get(self, name: str) -> torch.Tensor:
        """A fresh tensor (its own memory, writable) read from the file."""
        self._index[name]  # an unknown name: KeyError before the file is opened
        with self._opened() as f:
            return self._read(f, name)

    def check_finite(self, what: str) -> None:
        with self._opened() as f:
            _check_finite(((name, self._read(f, name)) for name in self._index), what)


def _stamp(st) -> tuple[int, int, int, int, int]:
    """A file's identity and version: the ctime too, as an in-place rewrite that restores the mtime still moves it."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _check_finite(tensors, what: str) -> None:
    """(name, tensor) pairs, read one at a time: the first floating tensor with a NaN or Inf is a one-line error."""
    import torch

    for name, t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ExpertValidationError(f"{what} has NaN or Inf values in tensor {name!r}")


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
