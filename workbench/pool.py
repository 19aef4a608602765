"""Expert pools: a folder with a `pool.json` manifest and the experts' files.

    adapters/<pool>/pool.json            manifest (written atomically)
    adapters/<pool>/experts/<name>/      a copied expert (PEFT LoRA folder or HF model folder)

Experts are validated against the pool's base on `add` (architecture, tensor shapes, LoRA
targets and ranks, finite values, safetensors only, no links out of the folder, distance to the
base or the adapter's named base) and read lazily afterwards: `Expert.delta(name)`
gives one tensor's task vector (exact `scale·B·A` for LoRA, `W_expert − W_base` for full).
`add_many` adds several experts, each validated as `add` validates it, with one manifest write.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_serializer

from .base import BaseModel, fingerprint
from .data import DataRecord
from .errors import ExpertValidationError, ManifestError, PoolError, did_you_mean
from .faults import fault_point
from .io import atomic_write_json, file_lock, lock_for, sha256_file, sha256_file_cached
from .tensors import SafetensorsDir, TensorFile, model_weight_files, refuse_pickles, relative_distance

if TYPE_CHECKING:  # torch is imported by the first tensor read: `pool list` and `pool show` never need it
    import torch

MANIFEST = "pool.json"
EXPERTS_DIR = "experts"
STAGING_DIR = ".staging"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # used with fullmatch: `$` would allow a final "\n"
# Files worth keeping from an expert folder (never pickles, never checkpoints).
_KEEP_SUFFIXES = {".json", ".safetensors", ".txt", ".md", ".model", ".jinja"}
# A full expert farther than this from the base (||W_e − W_0|| / ||W_0|| over all shared tensors) is refused
# unless allowed. Two independent models of one architecture sit near sqrt(2) ≈ 1.41 (equal norms, uncorrelated
# weights; 1.35 for the tiny test models, whose norm layers agree), while experts of the base measure about 0.1
# (tiny full expert: noise 0.02 on weights of std 0.2), 0.25 (a random rank-2 LoRA merged in) and far less for the
# demo's full fine-tunes (lr 1e-4, 80 steps): 0.5 leaves a wide margin on both sides.
MAX_BASE_DISTANCE = 0.5
# PEFT saves LoRA weights as `base_model.model.<module>.lora_A.weight` (adapter name stripped).
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def _read_manifest(path: Path) -> PoolManifest:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix it by hand") from None
    try:
        return PoolManifest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ManifestError(f"{path} is not a valid pool manifest: {loc}: {err['msg']}") from None


def check_name(name: str, what: str = "expert name") -> str:
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise PoolError(
            f"invalid {what} {name!r}: use letters, digits, '_', '-', '.' (no '/', no '..', at most 64 chars)"
        )
    return name


POOLS_ENV = "WORKBENCH_POOLS"
POOLS_DIR = "adapters"
# The project's own pools folder, for a source (editable) install: <repository>/adapters next to <repository>/workbench.
PROJECT_POOLS = Path(__file__).resolve().parent.parent / POOLS_DIR


def pools_dir() -> Path:
    """Where pools are found by name, and `pool create NAME` creates them:

    1. `$WORKBENCH_POOLS`, when set;
    2. `./adapters`, when the current folder has one;
    3. the project's `adapters/` folder (a source install: the repository holding the `workbench` package), so
       `Pool.open("demo")` works from any folder;
    4. else `./adapters` (created by the first `pool create`).
    """
    env = os.environ.get(POOLS_ENV)
    if env:
        return Path(env).expanduser()
    local = Path(POOLS_DIR)
    if local.is_dir() or not PROJECT_POOLS.is_dir():
        return local
    return PROJECT_POOLS


def pool_names() -> list[str]:
    """The pools under the pools folder (`pools_dir()`): folders holding a manifest."""
    root = pools_dir()
    return sorted(p.parent.name for p in root.glob(f"*/{MANIFEST}")) if root.is_dir() else []


def resolve_pool_path(spec: str | os.PathLike) -> Path:
    """A pool given by path, or by name in the pools folder (`pools_dir()`: $WORKBENCH_POOLS, ./adapters or the
    project's adapters/)."""
    path = Path(spec).expanduser()
    if os.sep in str(spec) or str(spec).startswith((".", "~")) or (path / MANIFEST).is_file():
        return path
    # a bare name is a pool of the pools folder, even where the current folder has a subfolder of that name
    return pools_dir() / str(spec)


def _where_pools_are() -> str:
    """How the pools folder was chosen, for errors: the folder searched and how to choose another."""
    root = pools_dir()
    if os.environ.get(POOLS_ENV):
        return f"pools folder {root} (from ${POOLS_ENV})"
    return f"pools folder {root.resolve()} (set ${POOLS_ENV} to use another)"


# ----------------------------------------------------------------------------- manifest


class BaseRef(Schema):
    model_config = ConfigDict(extra="forbid")
    spec: str = Field(description="alias, folder or hub id the pool's experts were trained on")
    fingerprint: str = Field(description="hash of the config fields and tensor shapes")
    architecture: str


class LoraInfo(Schema):
    model_config = ConfigDict(extra="forbid")
    r: int
    alpha: float
    use_rslora: bool = False
    target_modules: list[str]
    modules: int = Field(description="number of adapted linear modules")


class ExpertEntry(Schema):
    model_config = ConfigDict(extra="forbid")
    name: str
    kind: Literal["lora", "full"]
    path: str = Field(description="relative to the pool folder when copied, absolute when linked")
    linked: bool = False
    tags: dict[str, str] = Field(default_factory=dict, description="e.g. task=addition, domain=math")
    training: dict[str, Any] = Field(default_factory=dict, description="training metadata")
    notes: str = ""
    lora: LoraInfo | None = None
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")
    added_at: str = ""
    base_distance: float | None = Field(None, description="full experts: ||W_e − W_0|| / ||W_0||, measured on add")
    data: list[DataRecord] = Field(default_factory=list, max_length=1000,
                                   description="the datasets the expert learned (spec, fields, content hash, rows)")
    rebuild: str = Field("", max_length=200, description="the command that builds this expert's files when they are "
                                                         "not shipped (e.g. `workbench demo --full`)")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return check_name(v)

    @model_serializer(mode="wrap")
    def _drop_unmeasured(self, handler):
        # Entries written before `base_distance` existed (or LoRA ones) keep their bytes on a rewrite.
        data = handler(self)
        for key in ("base_distance", "rebuild"):
            if not data.get(key):
                data.pop(key, None)
        return data


class PoolManifest(Schema):
    model_config = ConfigDict(extra="forbid")
    format: Literal[1] = 1
    name: str
    base: BaseRef
    experts: list[ExpertEntry] = Field(default_factory=list)
    created_at: str = ""

    @field_validator("experts")
    @classmethod
    def _unique(cls, v: list[ExpertEntry]) -> list[ExpertEntry]:
        seen: set[str] = set()
        for e in v:
            if e.name in seen:
                raise ValueError(f"duplicate expert name {e.name!r}")
            seen.add(e.name)
        return v


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ----------------------------------------------------------------------------- validation


def detect_kind(folder: Path) -> Literal["lora", "full"]:
    if (folder / "adapter_config.json").is_file():
        return "lora"
    if (folder / "config.json").is_file():
        return "full"
    raise ExpertValidationError(
        f"{folder} is neither a PEFT adapter folder (adapter_config.json) nor a model folder (config.json)"
    )


def _holds_manifest_files(folder: Path, name: str, manifest: Any) -> bool:
    """Whether `folder` holds the files, with their sha256, that the manifest records for the copied expert `name`."""
    entry = next((e for e in (manifest.experts if manifest is not None else []) if e.name == name), None)
    if entry is None or entry.linked or not entry.files:
        return False
    try:
        return all(sha256_file(folder / f) == h for f, h in entry.files.items())
    except OSError:
        return False


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file of a candidate expert; ExpertValidationError (one line) when missing, unreadable, not
    UTF-8, not JSON, or not an object."""
    from .cells import load_json

    if not path.is_file():
        raise ExpertValidationError(f"{what}: missing {path}")
    try:
        data = load_json(path)  # bounded: size and depth (a deeply nested file is one line, not a RecursionError)
    except ValueError as e:
        raise ExpertValidationError(f"{what}: {path} is {e}" if str(e).startswith("not ")
                                    else f"{what}: {path}: {e}") from None
    except OSError as e:
        raise ExpertValidationError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ExpertValidationError(f"{what}: {path} holds a JSON {type(data).__name__}, not an object")
    return data


def _config_rank(value: Any, what: str, field: str) -> int:
    """A LoRA rank from adapter_config.json: a positive integer (an integral float is taken as one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or not 1 <= value <= 2**20:
        raise ExpertValidationError(f"{what}: adapter_config.json {field} is {value!r}, not a positive integer rank")
    return int(value)


def _config_alpha(value: Any, what: str, field: str) -> float:
    """A LoRA alpha from adapter_config.json: a finite number (a numeric string is read as before)."""
    try:
        alpha = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        alpha = math.nan
    if not math.isfinite(alpha) or abs(alpha) > 1e6:
        raise ExpertValidationError(f"{what}: adapter_config.json {field} is {value!r}, not a finite number "
                                    "of at most 1e6")
    return alpha


def _config_patterns(cfg: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    """rank_pattern / alpha_pattern: an object of module-name patterns (regular expressions, as PEFT reads them)."""
    patterns = cfg.get(key) or {}
    if not isinstance(patterns, dict):
        raise ExpertValidationError(f"{what}: adapter_config.json {key} is a {type(patterns).__name__}, not an object")
    for k in patterns:
        try:
            re.compile(k)
        except re.error as e:
            raise ExpertValidationError(f"{what}: adapter_config.json {key} key {k[:60]!r} is not a valid pattern "
                                        f"({e})") from None
    return patterns


def refuse_outside_links(folder: Path, what: str) -> None:
    """Refuse a symbolic link in `folder` that resolves outside it (its bytes would be copied or hashed)."""
    folder = Path(folder).resolve()
    # The Hugging Face cache lays a revision out as links: <repo>/snapshots/<rev>/<file> -> ../../blobs/<hash>
    blobs = folder.parent.parent / "blobs" if folder.parent.name == "snapshots" else None
    for p in sorted(folder.iterdir()):
        target = p.resolve()
        if p.is_symlink() and not target.is_relative_to(folder) and not (blobs and target.parent == blobs):
            raise ExpertValidationError(
                f"{what}: {p.name} is a symbolic link to {p.resolve()}, outside the folder; copy the file in instead"
            )


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name's suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraLayout:
    """How one PEFT LoRA folder maps onto base tensors: module -> (A key, B key, scale)."""

    def __init__(self, folder: Path, base_shapes: dict[str, tuple[int, ...]], what: str):
        self.folder = Path(folder)
        cfg = _read_json(self.folder / "adapter_config.json", what)
        if str(cfg.get("peft_type", "")).upper() != "LORA":
            raise ExpertValidationError(f"{what}: peft_type is {cfg.get('peft_type')!r}, only LORA adapters are supported")
        if cfg.get("use_dora"):
            raise ExpertValidationError(f"{what}: DoRA adapters are not supported (their delta is not scale·B·A)")
        refuse_pickles(self.folder, what)
        if not (self.folder / "adapter_model.safetensors").is_file():
            raise ExpertValidationError(f"{what}: missing {self.folder / 'adapter_model.safetensors'}")
        self.r = _config_rank(cfg.get("r", 8), what, "r")
        self.alpha = _config_alpha(cfg.get("lora_alpha", 8), what, "lora_alpha")  # PEFT's default, whatever r is
        self.use_rslora = bool(cfg.get("use_rslora", False))
        targets = cfg.get("target_modules") or []
        if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise ExpertValidationError(f"{what}: adapter_config.json target_modules is {str(targets)[:80]}, not a "
                                        "module name or a list of them")
        self.target_modules = [targets] if isinstance(targets, str) else sorted(targets)
        rank_pattern = _config_patterns(cfg, "rank_pattern", what)
        alpha_pattern = _config_patterns(cfg, "alpha_pattern", what)
        self.weights = SafetensorsDir(self.folder, ["adapter_model.safetensors"])

        pairs: dict[str, dict[str, str]] = {}
        for key in self.weights.keys():
            m = _LORA_KEY.match(key)
            if not m:
                raise ExpertValidationError(
                    f"{what}: unsupported tensor {key!r} (only lora_A/lora_B of linear layers are supported)"
                )
            pairs.setdefault(m["module"], {})[m["ab"]] = key
        if not pairs:
            raise ExpertValidationError(f"{what}: adapter_model.safetensors holds no LoRA tensors")

        base_modules = {k[: -len(".weight")] for k in base_shapes if k.endswith(".weight")}
        if isinstance(targets, list):
            # PEFT's own rule: a target names a module in full or a suffix after a dot ("all-linear" is saved
            # as the full names it matched, "q_proj" matches every "...self_attn.q_proj").
            missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in base_modules)]
            if missing:
                raise ExpertValidationError(
                    f"{what}: LoRA target modules {missing} do not exist in the base model"
                )
        self.modules: dict[str, tuple[str, str, float]] = {}
        wshapes = self.weights.shapes
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise ExpertValidationError(f"{what}: module {module!r} has lora_{''.join(ab)} but not both A and B")
            if module not in base_modules:
                raise ExpertValidationError(f"{what}: LoRA targets module {module!r}, which does not exist in the base model")
            out_f, in_f = base_shapes[module + ".weight"]
            (ra, ina), (outb, rb) = wshapes[ab["A"]], wshapes[ab["B"]]
            if ina != in_f or outb != out_f or ra != rb:
                raise ExpertValidationError(
                    f"{what}: shape mismatch at {module!r}: A {list(wshapes[ab['A']])}, B {list(wshapes[ab['B']])} "
                    f"vs base weight {[out_f, in_f]} (adapter trained on another base?)"
                )
            r = _config_rank(_pattern_value(rank_pattern, module, self.r), what, f"rank_pattern (for {module!r})")
            if ra != r:  # PEFT would build rank-r layers and fail to load these tensors (size mismatch)
                raise ExpertValidationError(
                    f"{what}: module {module!r} has rank-{ra} LoRA tensors but adapter_config.json gives it r={r}"
                    f"{' (rank_pattern)' if r != self.r else ''}"
                )
            alpha = _config_alpha(_pattern_value(alpha_pattern, module, self.alpha), what,
                                  f"alpha_pattern (for {module!r})")
            scale = alpha / (r ** 0.5) if self.use_rslora else alpha / r
            self.modules[sys.intern(module + ".weight")] = (sys.intern(ab["A"]), sys.intern(ab["B"]), scale)
        # checked through safetensors' own reader above; kept as a compact reader (no open handle, no per-tensor
        # dicts: a pool's every adapter can be open at once, as in a merge over a thousand of them)
        compact = TensorFile(self.folder / "adapter_model.safetensors")
        if sorted(compact.keys()) != sorted(self.weights.keys()) or any(
                compact.shape(k) != tuple(wshapes[k]) or compact.dtype(k) != self.weights.dtypes[k] for k in wshapes):
            raise ExpertValidationError(f"{what}: adapter_model.safetensors's header reads differently from its "
                                        "tensors (corrupt?)")
        self.weights = compact

    def delta(self, tensor: str) -> torch.Tensor:
        a_key, b_key, scale = self.modules[tensor]
        a = self.weights.get(a_key).float()
        b = self.weights.get(b_key).float()
        return (b @ a).mul_(scale)

    def info(self) -> LoraInfo:
        return LoraInfo(r=self.r, alpha=self.alpha, use_rslora=self.use_rslora,
                        target_modules=self.target_modules, modules=len(self.modules))


def validate_full(folder: Path, base: BaseModel, what: str) -> SafetensorsDir:
    folder = Path(folder)
    cfg = _read_json(folder / "config.json", what)
    refuse_pickles(folder, what)
    files = model_weight_files(folder)
    if not files:
        raise ExpertValidationError(f"{what}: no .safetensors weights in {folder}")
    tensors = SafetensorsDir(folder, files)
    arch = (cfg.get("architectures") or [cfg.get("model_type")])[0]
    if arch != base.architecture:
        raise ExpertValidationError(f"{what}: architecture {arch} differs from the base's {base.architecture}")
    bshapes, eshapes = base.tensors.shapes, tensors.shapes
    optional = {"lm_head.weight"}  # tied embeddings may or may not be saved
    missing = sorted(set(bshapes) - set(eshapes) - optional)
    extra = sorted(set(eshapes) - set(bshapes) - optional)
    if missing or extra:
        names = (missing or extra)[:3]
        raise ExpertValidationError(
            f"{what}: tensors differ from the base ({'missing' if missing else 'unexpected'}: {names}; another base?)"
        )
    for k in set(bshapes) & set(eshapes):
        if bshapes[k] != eshapes[k]:
            raise ExpertValidationError(
                f"{what}: shape mismatch at {k!r}: {list(eshapes[k])} vs base {list(bshapes[k])} (trained on another base?)"
            )
    if fingerprint(cfg, eshapes) != base.fingerprint:
        raise ExpertValidationError(f"{what}: config differs from the base's (fingerprint mismatch)")
    return tensors


# ----------------------------------------------------------------------------- pool


@dataclass(frozen=True)
class AddItem:
    """One expert of `Pool.add_many`: the arguments `Pool.add` takes for it (no `replace`)."""

    source: str | os.PathLike
    name: str
    kind: str | None = None
    link: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    allow_distant: bool = False
    data: list[DataRecord] = field(default_factory=list)


@dataclass(frozen=True)
class _Checked:
    """A validated source folder: what `add` measured on it before copying."""

    source: Path
    kind: str
    lora: LoraInfo | None
    distance: float | None
    files: list[str]

    def entry(self, name: str, path: str, linked: bool, hashes: dict[str, str], *, tags: dict[str, str] | None,
              training: dict[str, Any] | None, notes: str, data: list[DataRecord] | None) -> ExpertEntry:
        return ExpertEntry(name=name, kind=self.kind, path=path, linked=linked, tags=tags or {},
                           training=training or {}, notes=notes, lora=self.lora, files=hashes, added_at=_now(),
                           base_distance=self.distance, data=list(data or []))


class Expert:
    """One expert of a pool; its tensors are read lazily, one at a time."""

    def __init__(self, pool: Pool, entry: ExpertEntry):
        self.pool = pool
        self.entry = entry

    name = property(lambda self: self.entry.name, doc="The expert's name in its pool.")
    kind = property(lambda self: self.entry.kind, doc="'lora' (a PEFT adapter) or 'full' (a model folder).")

    def __repr__(self) -> str:
        return f"Expert({self.name!r}, kind={self.kind!r})"

    @property
    def path(self) -> Path:
        """The expert's folder (copied into the pool, or linked in place)."""
        p = Path(self.entry.path)
        return p if p.is_absolute() else self.pool.root / p

    @cached_property
    def _lora(self) -> LoraLayout:
        return LoraLayout(self.path, self.pool.base.tensors.shapes, f"expert {self.name!r}")

    @cached_property
    def _full(self) -> SafetensorsDir:
        return SafetensorsDir(self.path, model_weight_files(self.path))

    def data(self) -> list[DataRecord]:
        """The datasets this expert learned, as its manifest entry records them (`pool data` / `--data` set them)."""
        return list(self.entry.data)

    def tasks(self) -> list[str]:
        """The names of the datasets this expert learned (a suite task's name for the demo's experts)."""
        return [r.name for r in self.entry.data]

    def require_data(self, method: str) -> list[DataRecord]:
        """The expert's data records; refuses in one line when it has none, naming the flag that fixes it."""
        if not self.entry.data:
            # an expert trained on suite tasks before data was recorded names them in its training record
            legacy = [t for t in self.entry.training.get("tasks") or [] if isinstance(t, str) and t != "multitask"]
            spec = " ".join(f"--data suite:{t}" for t in legacy) if legacy else "--data FILE"
            raise PoolError(f"{method}: expert {self.name!r} of pool {self.pool.name!r} has no recorded training data "
                            f"(the method learns from it): attach it with `workbench pool data {self.pool.name} "
                            f"{self.name} {spec}`" + ("" if legacy else " (or `pool add ... --data FILE`)"))
        return list(self.entry.data)

    def check_data(self, method: str) -> None:
        """Refuse (one line) when the expert has no data, or its data changed since it was recorded."""
        from .data import DataError, check_unchanged

        for rec in self.require_data(method):
            try:
                check_unchanged(rec, self.pool.root, f"expert {self.name!r}")
            except DataError as e:
                raise PoolError(f"{method}: {e}") from None

    def rows(self, tokenizer: Any = None, *, split: str = "train", method: str = "") -> list[dict[str, Any]]:
        """The rows of every dataset this expert learned ({"question", "answer"}), in record order; `split`
        another split of the same sources (validation: [] where a source has none)."""
        from .data import read_rows

        out: list[dict[str, Any]] = []
        for rec in self.require_data(method or "reading data"):
            out += read_rows(rec, tokenizer, split=split, pool_root=self.pool.root, who=f"expert {self.name!r}")
        return out

    def rows_by_source(self, tokenizer: Any = None, *, split: str = "train") -> list[list[dict[str, Any]]]:
        """Each recorded dataset's rows, one list per record."""
        from .data import read_rows

        return [read_rows(rec, tokenizer, split=split, pool_root=self.pool.root, who=f"expert {self.name!r}")
                for rec in self.require_data("reading data")]

    def missing_files(self) -> list[str]:
        """Files the manifest lists that are not on disk (a clone has the manifest, not the weights)."""
        return [f for f in self.entry.files if not (self.path / f).is_file()]

    def files_present(self) -> bool:
        """Whether every file the manifest lists is on disk."""
        return not self.missing_files()

    def not_built(self) -> bool:
        """Whether none of its files are on disk and its entry names the command that builds them (e.g. the demo's
        full fine-tunes, whose weights are not shipped): a state, not a problem."""
        return bool(self.entry.rebuild) and len(self.missing_files()) == len(self.entry.files)

    def status(self) -> str:
        """'ok', 'not built (`<command>`)', or 'missing files: a, b' (for `pool list`, `pool show`, `pool verify`)."""
        if self.not_built():
            return f"not built (`{self.entry.rebuild}`)"
        missing = self.missing_files()
        return f"missing files: {', '.join(missing)}" if missing else "ok"

    def delta_names(self) -> list[str]:
        """Base tensor names this expert changes."""
        if self.kind == "lora":
            return list(self._lora.modules)
        base = self.pool.base.tensors
        return [k for k in self._full.keys() if k in base]

    def delta(self, tensor: str) -> torch.Tensor:
        """Task vector of one base tensor, fp32: `scale·B·A` (LoRA) or `W_expert − W_base` (full)."""
        if self.kind == "lora":
            return self._lora.delta(tensor)
        return self._full.get(tensor).float() - self.pool.base.tensors.get(tensor).float()

    def iter_deltas(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(tensor name, task vector) for every tensor the expert changes, one at a time."""
        for name in self.delta_names():
            yield name, self.delta(name)

    def lora_factors(self, tensor: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [r, d_in], B [d_out, r], scale) of one LoRA module, for adapter-space methods and kernels."""
        if self.kind != "lora":
            raise PoolError(f"expert {self.name!r} is a full model, not a LoRA")
        a_key, b_key, scale = self._lora.modules[tensor]
        return self._lora.weights.get(a_key).float(), self._lora.weights.get(b_key).float(), scale


class Pool:
    """A pool folder with its validated manifest."""

    def __init__(self, root: Path, manifest: PoolManifest):
        self.root = Path(root)
        self.manifest = manifest

    # -- opening and creating
    @classmethod
    def create(cls, spec: str | os.PathLike, base: str = "smollm2-135m") -> Pool:
        """A new, empty pool over `base` (an alias, a local HF folder or a hub id): by name in the pools folder
        (`pools_dir()`), or at a path. Refused when a pool is already there."""
        root = resolve_pool_path(spec)
        check_name(root.name, "pool name")
        if (root / MANIFEST).exists():
            raise PoolError(f"pool {root} already exists")
        bm = BaseModel(base)
        manifest = PoolManifest(
            name=root.name, created_at=_now(),
            base=BaseRef(spec=base, fingerprint=bm.fingerprint, architecture=bm.architecture),
        )
        root.mkdir(parents=True, exist_ok=True)
        pool = cls(root, manifest)
        pool.__dict__["base"] = bm
        pool._save()
        return pool

    @classmethod
    def open(cls, spec: str | os.PathLike) -> Pool:
        """An existing pool, by name in the pools folder (`$WORKBENCH_POOLS`, else `./adapters`, else the project's
        `adapters/`) or by path; its manifest is validated."""
        root = resolve_pool_path(spec)
        path = root / MANIFEST
        if not path.is_file():
            known = pool_names()
            where = f"; {_where_pools_are()} has {', '.join(known) or 'no pools'}" if root.parent == pools_dir() else ""
            raise PoolError(f"no pool at {root} (missing {MANIFEST}){did_you_mean(root.name, known)}{where}")
        pool = cls(root, _read_manifest(path))
        if (root / STAGING_DIR).is_dir() and any((root / STAGING_DIR).glob(".old-*")):
            with pool._locked():  # a replace killed between its two renames: finish or undo it
                pass
        return pool

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The pool's lock for a read-modify-write of its manifest and expert folders (one process at a time; the
        lock file lives in the cache, not in the pool). Inside, `self.manifest` is the manifest on disk: another
        process or Pool object may have changed it since this one was opened."""
        with file_lock(lock_for(self.root / MANIFEST)):
            self._recover_replaced()
            self.manifest = _read_manifest(self.root / MANIFEST)
            yield

    def _recover_replaced(self) -> None:
        """Leftovers of a replace that was killed (lock held). Killed between 'old folder aside' and 'new folder in':
        the old folder goes back. Killed after the new folder came in but before the manifest named its files: the
        manifest still names the old folder's, so the new one goes and the old one comes back (the replace is
        undone, never half done). Otherwise the replace completed: the old folder is deleted."""
        staging = self.root / STAGING_DIR
        olds = sorted(staging.glob(".old-*")) if staging.is_dir() else []
        manifest = _read_manifest(self.root / MANIFEST) if olds else None
        for old in olds:
            name = old.name[len(".old-"):].rsplit("-", 2)[0]
            final = self.root / EXPERTS_DIR / name
            if not final.exists():
                os.replace(old, final)
            elif _holds_manifest_files(old, name, manifest) and not _holds_manifest_files(final, name, manifest):
                shutil.rmtree(final)
                os.replace(old, final)
            else:
                shutil.rmtree(old, ignore_errors=True)
        for tmp in sorted(staging.glob(".add-*")) if staging.is_dir() else []:  # copies of killed adds (none is
            shutil.rmtree(tmp, ignore_errors=True)                                # live: every add holds this lock)

    @classmethod
    def open_or_create(cls, spec: str | os.PathLike, base: str = "smollm2-135m") -> Pool:
        """`open` the pool when it exists, else `create` it over `base`."""
        root = resolve_pool_path(spec)
        return cls.open(root) if (root / MANIFEST).exists() else cls.create(root, base)

    def _save(self) -> None:
        atomic_write_json(self.root / MANIFEST, self.manifest.model_dump(mode="json"))

    @cached_property
    def base(self) -> BaseModel:
        """The pool's base model (resolved into the cache on first use)."""
        bm = BaseModel(self.manifest.base.spec)
        if bm.fingerprint != self.manifest.base.fingerprint:
            raise PoolError(
                f"pool {self.name!r}: base {self.manifest.base.spec!r} now has fingerprint {bm.fingerprint}, "
                f"the manifest says {self.manifest.base.fingerprint} (base model changed?)"
            )
        return bm

    @property
    def name(self) -> str:
        """The pool's name (its folder's)."""
        return self.manifest.name

    # -- experts
    def _index(self) -> dict[str, ExpertEntry]:
        """name -> entry, rebuilt when the manifest's expert list is another list (every write assigns a new one):
        lookups by name cost O(1), not a scan of the manifest (a pool of 1,024 experts looked up 1,024 times)."""
        experts = self.manifest.experts
        cached = self.__dict__.get("_index_cache")
        if cached is None or cached[0] is not experts or len(cached[1]) != len(experts):
            cached = (experts, {e.name: e for e in experts})
            self.__dict__["_index_cache"] = cached
        return cached[1]

    @property
    def experts(self) -> list[Expert]:
        """Every expert, in manifest order."""
        return [Expert(self, e) for e in self.manifest.experts]

    def names(self, kind: str | None = None) -> list[str]:
        """Expert names in manifest order, of one kind (`lora` or `full`) when given."""
        return [e.name for e in self.manifest.experts if kind is None or e.kind == kind]

    def expert(self, name: str) -> Expert:
        """One expert by name (a one-line PoolError with 'did you mean' otherwise)."""
        entry = self._index().get(name) if isinstance(name, str) else None
        if entry is not None:
            return Expert(self, entry)
        shown = name if len(name) <= 40 else name[:37] + "..."  # errors never echo unbounded input
        raise PoolError(f"pool {self.name!r} has no expert {shown!r}{did_you_mean(name, self.names())}")

    def __contains__(self, name: str) -> bool:
        return name in self._index()

    def validate_source(self, source: Path, kind: str | None = None) -> tuple[str, LoraInfo | None]:
        """Check a candidate expert folder against the pool's base; return (kind, lora info)."""
        source = Path(source)
        what = f"expert source {source}"
        if not source.is_dir():
            raise ExpertValidationError(f"{what} is not a folder")
        refuse_outside_links(source, what)
        kind = kind or detect_kind(source)
        if kind == "lora":
            layout = LoraLayout(source, self.base.tensors.shapes, what)
            layout.weights.check_finite(what)
            return kind, layout.info()
        tensors = validate_full(source, self.base, what)
        tensors.check_finite(what)
        return kind, None

    def _check_base_identity(self, source: Path, kind: str, what: str, allow_distant: bool = False) -> float | None:
        """Refuse an expert of another base that shapes cannot tell apart; return a full expert's distance.

        Full: `||W_e − W_0|| / ||W_0||` over all shared tensors (streamed), at most MAX_BASE_DISTANCE.
        LoRA: `base_model_name_or_path` must name the pool's base, where it names anything comparable.
        """
        override = "add it anyway with allow_distant=True (CLI: --allow-distant-base)"
        if kind == "full":
            distance = relative_distance(SafetensorsDir(source, model_weight_files(source)), self.base.tensors)
            if distance > MAX_BASE_DISTANCE and not allow_distant:
                raise ExpertValidationError(
                    f"{what}: relative delta norm to the pool's base is {distance:.3f} (> {MAX_BASE_DISTANCE}; "
                    f"fine-tuned from another base?); {override}"
                )
            return round(distance, 6)
        named = _read_json(source / "adapter_config.json", what).get("base_model_name_or_path") or ""
        if not allow_distant and not self.base.is_named_by(str(named)):
            raise ExpertValidationError(
                f"{what}: trained on base {named!r}, the pool's base is {self.manifest.base.spec!r}; {override}"
            )
        return None

    def add(self, source: str | os.PathLike, name: str, *, kind: str | None = None, link: bool = False,
            tags: dict[str, str] | None = None, training: dict[str, Any] | None = None, notes: str = "",
            replace: bool = False, allow_distant: bool = False, data: list[DataRecord] | None = None) -> Expert:
        """Validate `source` and add it; copy by default, reference in place with `link`. `data`: the datasets it
        learned (`workbench.data.open_data`), for the methods that learn from the experts' data.

        Order keeps the pool consistent: validate -> copy into `.staging/` -> rename into
        `experts/<name>` -> write the manifest atomically. A crash before the last step
        leaves no manifest entry pointing at half-copied files.
        """
        check_name(name)
        if name in self and not replace:
            raise PoolError(f"pool {self.name!r} already has an expert named {name!r}")
        with self._locked():
            return self._add_locked(source, name, kind=kind, link=link, tags=tags, training=training, notes=notes,
                                    replace=replace, allow_distant=allow_distant, data=data)

    def _add_locked(self, source: str | os.PathLike, name: str, *, kind: str | None, link: bool,
                    tags: dict[str, str] | None, training: dict[str, Any] | None, notes: str, replace: bool,
                    allow_distant: bool, data: list[DataRecord] | None = None) -> Expert:
        if name in self and not replace:  # checked again on the manifest as it is now
            raise PoolError(f"pool {self.name!r} already has an expert named {name!r}")
        checked = self._checked(source, kind, allow_distant)
        old = None
        if link:
            rel, hashes = str(checked.source), {f: sha256_file(checked.source / f) for f in checked.files}
        else:
            tmp = None
            try:
                tmp, hashes = self._stage(checked, name, move=False)
                old = self._place(tmp, name)
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
            rel = f"{EXPERTS_DIR}/{name}"
        entry = checked.entry(name, rel, link, hashes, tags=tags, training=training, notes=notes, data=data)
        if old is not None:
            fault_point("pool_replace_in")  # the new folder in, the manifest not yet written: undone by the next open
        self._put(entry)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return Expert(self, entry)

    def _checked(self, source: str | os.PathLike, kind: str | None, allow_distant: bool) -> _Checked:
        """Everything `add` checks of a source folder, before any byte is copied."""
        source = Path(source).expanduser().resolve()
        kind, lora = self.validate_source(source, kind)
        distance = self._check_base_identity(source, kind, f"expert source {source}", allow_distant)
        files = sorted(p.name for p in source.iterdir() if p.is_file() and p.suffix in _KEEP_SUFFIXES)
        return _Checked(source, kind, lora, distance, files)

    def _stage(self, checked: _Checked, name: str, *, move: bool) -> tuple[Path, dict[str, str]]:
        """The source's kept files copied (or moved) into a fresh folder of `.staging/`, and their sha256."""
        staging = self.root / STAGING_DIR
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / f".add-{name}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        try:
            for f in checked.files:
                if move:
                    os.replace(checked.source / f, tmp / f)
                else:
                    shutil.copy2(checked.source / f, tmp / f)
            return tmp, {f: sha256_file(tmp / f) for f in checked.files}
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _place(self, tmp: Path, name: str) -> Path | None:
        """Rename a staged folder to `experts/<name>`; returns where the folder it replaced went (deleted by the
        caller once the manifest is written), or None."""
        final = self.root / EXPERTS_DIR / name
        final.parent.mkdir(parents=True, exist_ok=True)
        # the expert being replaced (or an orphan of a crashed add): renamed aside, the new folder renamed in,
        # then the old one deleted once the manifest is written; a kill between the two renames leaves the
        # old folder in .staging/, put back by the next open
        old = self.root / STAGING_DIR / f".old-{name}-{os.getpid()}-{time.monotonic_ns()}" if final.exists() else None
        if old is not None:
            os.replace(final, old)
            fault_point("pool_replace")
        os.replace(tmp, final)
        return old

    def add_many(self, items: Sequence[AddItem], *, move: bool = False) -> list[Expert]:
        """Add several experts in one go: each source validated exactly as `add` validates it, all of them before
        the first is copied (a bad one adds nothing), and the manifest written once, under the pool's lock.

        `items`: one `AddItem` per expert (new names only: replacing goes through `add`). `move`: the sources'
        kept files are moved into the pool instead of copied (same filesystem; the source folders are consumed,
        also when the add fails). A failure after copying begins removes what this call put in the pool.
        """
        items = list(items)
        if not items:
            raise PoolError("add_many: no experts given")
        for it in items:
            check_name(it.name)
        names = [it.name for it in items]
        dup = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
        if dup:
            raise PoolError(f"add_many: the name {dup[0]!r} is given twice")
        with self._locked():
            return self._add_many_locked(items, move=move)

    def _add_many_locked(self, items: list[AddItem], *, move: bool) -> list[Expert]:
        taken = [it.name for it in items if it.name in self]
        if taken:
            raise PoolError(f"pool {self.name!r} already has an expert named {taken[0]!r}")
        checked = [self._checked(it.source, it.kind, it.allow_distant) for it in items]
        staged: list[Path] = []
        placed: list[tuple[Path, Path | None]] = []  # (experts/<name>, where an orphan folder there went)
        entries = []
        try:
            for it, c in zip(items, checked):
                if it.link:
                    rel, hashes = str(c.source), {f: sha256_file(c.source / f) for f in c.files}
                else:
                    tmp, hashes = self._stage(c, it.name, move=move)
                    staged.append(tmp)
                    rel = f"{EXPERTS_DIR}/{it.name}"
                entries.append(c.entry(it.name, rel, it.link, hashes, tags=it.tags, training=it.training,
                                       notes=it.notes, data=it.data))
            for it, tmp in zip([it for it in items if not it.link], staged):
                placed.append((self.root / EXPERTS_DIR / it.name, self._place(tmp, it.name)))
            self.manifest.experts = [*self.manifest.experts, *entries]
            self._save()
        except BaseException:
            for final, old in reversed(placed):  # nothing of this call stays in the pool
                shutil.rmtree(final, ignore_errors=True)
                if old is not None:
                    os.replace(old, final)
            raise
        finally:
            for tmp in staged:
                shutil.rmtree(tmp, ignore_errors=True)
        for _, old in placed:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return [Expert(self, e) for e in entries]

    def _put(self, entry: ExpertEntry) -> None:
        """Write `entry` into the manifest: in its place when the name exists (a replace), else last. Called with
        the pool's lock held."""
        names = self.names()
        experts = list(self.manifest.experts)
        if entry.name in names:
            experts[names.index(entry.name)] = entry
        else:
            experts.append(entry)
        self.manifest.experts = experts
        self._save()

    def set_data(self, name: str, records: list[DataRecord]) -> Expert:
        """Record the datasets expert `name` learned (replacing what was recorded): the artifact keys of the methods
        that read them change with them."""
        self.expert(name)  # unknown: one line, before the lock
        with self._locked():
            entry = self.expert(name).entry.model_copy(update={"data": list(records)})
            self._put(entry)
        return Expert(self, entry)

    def keep_metadata(self, old: ExpertEntry) -> Expert:
        """After rebuilding `old.name`'s files, put back `old`'s entry (added_at, training, tags, notes).

        Only what was measured on the files (hashes, LoRA info, base distance) is updated, and only when
        the bytes differ: a rebuild to identical files leaves `pool.json` byte for byte as it was.
        """
        with self._locked():
            new = self.expert(old.name).entry
            if new.files != old.files:
                old = old.model_copy(update={"files": new.files, "lora": new.lora, "base_distance": new.base_distance})
            if new.data and new.data != old.data:  # what it was trained on now, recorded
                old = old.model_copy(update={"data": new.data})
            self._put(old)
        return Expert(self, old)

    def train(self, name: str, tasks: str | list[str] | None = None, *, data: str | list[str] | None = None,
              kind: str = "lora", device: str = "cpu", replace: bool = False, tags: dict[str, str] | None = None,
              **config: Any) -> Expert:
        """Train a LoRA (`kind="lora"`) or full (`kind="full"`) expert on `data` (files, save_to_disk folders, hub
        ids: `workbench.data`; field options `prompt_field`, `answer_field`, `messages_field`, `text_field`) and/or
        suite `tasks`, and add it to this pool with its data recorded. `config`: training options (`r`, `alpha`,
        `targets`, `steps`, `lr`, `batch_size`, `seed`, ...), validated before any model loads."""
        from .api import train_expert

        return train_expert(self, name, tasks, data=data, kind=kind, device=device, replace=replace, tags=tags,
                            **config)

    def remove(self, name: str) -> None:
        """Remove an expert from the manifest and delete its copied files (linked folders are left alone)."""
        self.expert(name)  # unknown: one line, before the lock
        with self._locked():
            expert = self.expert(name)
            self.manifest.experts = [e for e in self.manifest.experts if e.name != name]
            self._save()  # the manifest first: a crash below leaves an orphan folder, not a dangling entry
            if not expert.entry.linked and expert.path.exists():
                shutil.rmtree(expert.path)

    def verify(self, *, hashes: bool = True, deep: bool = False) -> list[str]:
        """Problems found (empty when the pool is sound): files, hashes, shapes, LoRA targets, finite values, recorded
        data that changed. An expert that is not built (`Expert.not_built`: no file on disk, its entry names the
        command that builds it) is not a problem.

        `hashes`: each file's sha256 against the manifest, through the on-disk digest cache
        (`io.sha256_file_cached`: an unchanged file is not read again; a changed one always is). Files whose digests
        match are the bytes that passed every check on add, so their values are not scanned again for NaN/Inf
        unless `deep`; without `hashes` they always are. Structure (config, tensor names, shapes, ranks) is
        re-checked for every expert: it reads headers only."""
        problems: list[str] = []
        try:
            base = self.base
        except Exception as e:  # noqa: BLE001 - report, don't stop
            return [str(e)]
        from .data import DataError, check_unchanged

        for expert in self.experts:
            e = expert.entry
            if expert.not_built():
                continue
            for rec in e.data:
                try:
                    check_unchanged(rec, self.root, e.name)
                except DataError as err:
                    problems.append(str(err))
            file_problems = []
            for f, digest in e.files.items():
                p = expert.path / f
                if not p.is_file():
                    file_problems.append(f"{e.name}: missing file {p}")
                elif hashes and sha256_file_cached(p) != digest:
                    file_problems.append(f"{e.name}: {f} changed since it was added (sha256 mismatch)")
            problems += file_problems
            if file_problems:
                continue
            try:
                self._revalidate(expert.path, e.kind, finite=deep or not hashes)
            except ExpertValidationError as err:
                problems.append(f"{e.name}: {err}")
        known = {Path(e.path).name for e in self.manifest.experts if not e.linked}
        exp_dir = self.root / EXPERTS_DIR
        if exp_dir.is_dir():
            problems += [f"orphan folder {p} (not in the manifest)" for p in exp_dir.iterdir() if p.name not in known]
        del base
        return problems

    def _revalidate(self, folder: Path, kind: str, *, finite: bool) -> None:
        """`validate_source`'s checks of an expert in the pool, the scan of every value for NaN/Inf only when
        `finite`."""
        if finite:
            self.validate_source(folder, kind)
            return
        what = f"expert source {folder}"
        if not folder.is_dir():
            raise ExpertValidationError(f"{what} is not a folder")
        refuse_outside_links(folder, what)
        if kind == "lora":
            LoraLayout(folder, self.base.tensors.shapes, what)
        else:
            validate_full(folder, self.base, what)

    # -- loading
    def peft_model(self, names: list[str] | None = None, model: Any = None, dtype: Any = None) -> Any:
        """The base with the pool's LoRA experts loaded as named PEFT adapters (first one active)."""
        from peft import PeftModel

        if not names:  # every LoRA expert that is on disk (an unbuilt one, e.g. a clone's multitask-r64, left out)
            names = [n for n in self.names("lora") if not self.expert(n).not_built()]
            if not names:
                raise PoolError(f"pool {self.name!r} has no LoRA expert on disk" + (
                    " (its LoRA experts are not built)" if self.names("lora") else ""))
        experts = [self.expert(n) for n in names]
        if not experts or any(e.kind != "lora" for e in experts):
            raise PoolError(f"peft_model needs LoRA experts; got {str(names)[:120]}")
        if unbuilt := [e for e in experts if e.not_built()]:
            raise PoolError(f"expert {unbuilt[0].name!r} {unbuilt[0].status()}")
        model = model if model is not None else self.base.load(dtype=dtype)
        pm = PeftModel.from_pretrained(model, str(experts[0].path), adapter_name=experts[0].name, is_trainable=False)
        for e in experts[1:]:
            pm.load_adapter(str(e.path), adapter_name=e.name, is_trainable=False)
        pm.eval()
        return pm
