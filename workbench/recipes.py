"""Recipes: YAML in merges/ -> (pool, experts, method, params, output, eval), validated up front.

Every check that can fail runs before any tensor is touched: the file's size and encoding,
YAML syntax (no aliases, bounded nesting), the schema, the method name, expert names and
files, one base across pools, the method's parameter types and ranges, and the method's own
cross-field checks. Each failure is one RecipeError line that echoes at most ~40 characters
of each input value. Duplicate keys are refused (YAML's "last one wins" would hide a typo), numbers must be
finite and within their field's bounds, and `experts: []` is refused (leave it out for the whole pool).
Builds check the experts' file hashes against the manifest first.
"""

from __future__ import annotations

import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, ConfigDict, Field, ValidationError
from pydantic import BaseModel as Schema
from pydantic_core import PydanticCustomError
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from .artifacts import ARTIFACT_FILE, artifact_ref, read_artifact_meta
from .errors import RecipeError, WorkbenchError
from .faults import fault_point
from .io import (
    artifacts_dir,
    atomic_write_json,
    clean_stale_staging,
    file_lock,
    lock_for,
    sha256_file_cached,
    sha256_json,
    staging_dir,
)
from .methods import METHODS, BuildContext, Method, MethodParams, OutputSpec
from .methods.base import MAX_BATCH, MAX_LIMIT, write_artifact_meta
from .pool import Expert, Pool

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; more is a mistake (or an attack)
MAX_DEPTH = 32  # nesting levels of a recipe (one needs about 5)
MAX_SWEEP_POINTS = 1024  # grid points of a sweep (each is a build and an evaluation)
Ref = Annotated[str, Field(max_length=1024)]  # a name or path: bounded, so errors that echo it stay short
ECHO = 40  # characters of an input value an error echoes at most
MAX_INCLUDE = 16  # include folders of a recipe's evaluation (one is usual)


def _some_experts(names: list[str]) -> list[str]:
    if not names:  # `experts: []` read as "no restriction" would silently build over the whole pool
        raise PydanticCustomError("wb_no_experts", "[] lists no expert (leave it out to use the whole pool)")
    return names


# expert names, or pool:expert; None (left out) means the whole pool, [] is refused
Experts = Annotated[list[Ref], AfterValidator(_some_experts)]


class EvalSpec(Schema):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    tasks: list[str] = Field(default_factory=lambda: ["held_in", "held_out"],
                             description="suite names and groups, lm-eval tasks and groups, tasks of include_path")
    include_path: list[Ref] = Field(
        default_factory=list, max_length=MAX_INCLUDE,
        description=f"folders of lm-eval task YAMLs (for `tasks` and the sweep's), relative to the recipe's folder "
                    f"(at most {MAX_INCLUDE})")
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description=f"examples per forward (1..{MAX_BATCH})")
    limit: int | None = Field(None, gt=0, le=MAX_LIMIT,
                              description=f"examples per task (None: the whole split; at most {MAX_LIMIT:,})")


class SweepSpec(Schema):
    """A grid over method parameters, each point scored on the validation split (never test)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    parameters: dict[Annotated[str, Field(max_length=64)], list[Any]] = Field(
        description=f"parameter name -> values; the grid is their product (at most {MAX_SWEEP_POINTS} points)")
    tasks: list[str] = Field(default_factory=lambda: ["held_in"], description="tasks scored (validation split)")
    limit: int | None = Field(50, gt=0, le=MAX_LIMIT,
                              description=f"validation examples per task (at most {MAX_LIMIT:,})")
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description=f"examples per forward (1..{MAX_BATCH})")


class Recipe(Schema):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@=+-]*\z",
                      description="artifact and results name (letters, digits, _ . - @ = +; it names files)")
    method: str = Field(max_length=64)
    pool: Ref = "demo"
    experts: Experts | None = Field(None, description="expert names, or pool:expert; left out: all of the pool "
                                                      "([] is refused)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    output: OutputSpec = Field(default_factory=OutputSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    sweep: SweepSpec | None = Field(None, description="select parameters on the validation split")
    description: str = ""


@dataclass
class ResolvedRecipe:
    recipe: Recipe
    source: str
    pool: Pool
    experts: list[Expert]
    method: Method
    params: MethodParams
    folder: Path = Path(".")  # the recipe file's folder: eval.include_path is relative to it
    device: str = "cpu"  # what builds it: a device other than the CPU is in the key (`build` sets it)

    @property
    def include_path(self) -> list[Path]:
        """The eval section's include folders, relative to the recipe's folder."""
        return [p if (p := Path(ref).expanduser()).is_absolute() else self.folder / p
                for ref in self.recipe.eval.include_path]

    @cached_property
    def inputs(self) -> dict[str, Any]:
        """Hashes of the data the method's build reads beyond the experts' files (`Method.key_inputs`)."""
        return self.method.key_inputs(self.experts, self.params)

    @cached_property
    def key_body(self) -> dict[str, Any]:
        """Everything that determines the artifact, as hashed into `key`: the method and output, the experts' file
        hashes, the base's weights, the validated parameters (a default spelled out or left out is one key), the
        method's version, the data its build reads and the threads a CPU build runs on; the base's tokenizer files when
        they are its own (`BaseModel.tokenizer_sha256`: a GGUF base's tokenizer is in its weights' file) and the device
        kind when it is not the CPU (a GPU's kernels give other bytes), each left out otherwise so that CPU keys of
        GGUF bases stay as committed results hold them."""
        from .methods.base import BUILD_THREADS

        # The name is not part of the key: a sweep's best point reuses that point's artifact.
        body = self.recipe.model_dump(mode="json", exclude={"eval", "description", "sweep", "name", "parameters"})
        body["experts"] = [(e.pool.manifest.base.fingerprint, e.name, e.entry.files) for e in self.experts]
        body["base_weights"] = self.pool.base.weights_sha256
        body["params"] = self.params.model_dump(mode="json", by_alias=True)
        body["method_version"] = self.method.version
        body["inputs"] = self.inputs
        body["build_threads"] = BUILD_THREADS
        if tokenizer := self.pool.base.tokenizer_sha256:
            body["base_tokenizer"] = tokenizer
        if (kind := device_kind(self.device)) != "cpu":
            body["device"] = kind
        return body

    @property
    def key(self) -> str:
        """Hash of `key_body`: everything that determines the artifact."""
        return sha256_json(self.key_body)[:12]

    @property
    def artifact_dir(self) -> Path:
        return artifacts_dir() / f"{self.recipe.method}-{self.key}"


def device_kind(device: str) -> str:
    """`cuda:1` -> `cuda`: what a key records of a device (its kind; which card of a kind gives the same bytes)."""
    return str(device or "cpu").split(":")[0]


def _clip(text: str, limit: int = ECHO) -> str:
    """`text` cut to `limit` characters: errors never echo unbounded input."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _BoolForNumber(ValueError):
    """A true/false where a number belongs (pydantic's lax mode reads `lambda: true` as 1.0)."""


def _numeric(annotation: Any) -> bool:
    """Whether a field's type takes numbers and nothing else (int, float, their Optional/Annotated forms)."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _numeric(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(_numeric(a) for a in args)
    return annotation in (int, float)


def _refuse_bools(schema: type, values: Any) -> None:
    """Refuse true/false given for a numeric parameter (a list of numbers' items too): strict numbers."""
    import typing

    if not isinstance(values, dict):
        return
    fields = {**{f.alias: f for f in schema.model_fields.values() if f.alias}, **schema.model_fields}
    for name, value in values.items():
        field = fields.get(name) if isinstance(name, str) else None
        if field is None:
            continue
        ann = field.annotation
        items = [value] if not isinstance(value, list) else value
        if isinstance(value, list):
            args = [a for a in typing.get_args(ann) if a is not type(None)] if typing.get_origin(ann) else []
            lists = [a for a in args if typing.get_origin(a) is list] or ([ann] if typing.get_origin(ann) is list else [])
            ann = typing.get_args(lists[0])[0] if lists and typing.get_args(lists[0]) else None
        if ann is not None and _numeric(ann) and any(isinstance(v, bool) for v in items):
            raise _BoolForNumber(f"{_clip(name)}: a number is needed, got {_clip(repr(value))} (true/false is not a "
                                 "number)")


def _first_error(e: ValidationError, prefix: str) -> str:
    err = e.errors()[0]
    loc = ".".join(_clip(str(x)) for x in err["loc"])
    # the workbench's own errors (wb_*) say what they need; pydantic's get the offending value, clipped
    got = f" (got {_clip(repr(err['input']))})" if ("input" in err and not isinstance(err["input"], dict)
                                                    and not err["type"].startswith("wb_")) else ""
    head = f"{prefix}{loc}: " if loc else f"{prefix.rstrip('.').rstrip()}: "
    return f"{head}{_clip(err['msg'], 200)}{got}"


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader without aliases (an alias bomb expands exponentially; recipes need none) and with bounded
    nesting (composing recurses per level)."""

    depth = 0

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            raise ComposerError(None, None, "aliases (*name) are not allowed in recipes", mark)
        if self.depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        """A mapping whose keys are unique: YAML's "the last one wins" would silently drop the first value."""
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag == "tag:yaml.org,2002:merge":
                    # `<<: {...}` would let a key appear twice unnoticed (the mapping's own value silently wins)
                    raise ConstructorError(None, None, "merge keys (<<) are not allowed (write each key once)",
                                           key_node.start_mark)
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: the constructor below says so
                    continue
                if duplicate:
                    raise ConstructorError(None, None, f"duplicate key {_clip(repr(key))} (each key once)",
                                           key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(path: Path, what: str = "recipe") -> Any:
    """A recipe file's YAML (or a comparison's: `what` names it in errors), refusing what a recipe never is: over 1 MiB,
    not UTF-8, aliases, merge keys, duplicate keys, deep nesting."""
    if not path.is_file():
        raise RecipeError(f"no {what} at {path}")
    with open(path, "rb") as f:
        raw = f.read(MAX_RECIPE_BYTES + 1)  # never more, whatever the file's size
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{what} {path} is over {MAX_RECIPE_BYTES >> 20} MiB ({path.stat().st_size:,} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{what} {path} is not UTF-8 text (invalid byte at offset {e.start})") from None
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark and problem else ""
        raise RecipeError(f"{what} {path} is not valid YAML: {_clip(problem or str(e).splitlines()[0], 80)}{where}") \
            from None


def _depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of dicts and lists, counted up to `limit + 1` at most."""
    if limit < 0 or not isinstance(obj, (dict, list)):
        return 0
    items = obj.values() if isinstance(obj, dict) else obj
    return 1 + max((_depth(x, limit - 1) for x in items), default=0)


def _check_files_present(source: str, experts: list[Expert]) -> None:
    """Existence only (cheap): a deleted or moved expert folder fails here, before any work."""
    for e in experts:
        missing = [e.path / f for f in e.missing_files()] or ([] if e.path.is_dir() else [e.path])
        if missing:
            raise RecipeError(f"recipe {source}: expert {e.name!r} is missing {missing[0]} (moved or deleted? "
                              f"`workbench pool verify {e.pool.name}` lists what is missing)")


def check_expert_files(experts: list[Expert]) -> None:
    """Each expert's files hash as the manifest says (a linked folder may have changed since `pool add`)."""
    for e in experts:
        for f, digest in e.entry.files.items():
            p = e.path / f
            if not p.is_file():
                raise RecipeError(f"expert {e.name!r} is missing {p}; run `workbench pool verify {e.pool.name}`")
            if sha256_file_cached(p) != digest:
                raise RecipeError(f"expert {e.name!r}: {p} changed since it was added (sha256 mismatch); check with "
                                  f"`workbench pool verify {e.pool.name}`, then remove and re-add the expert")


def validate_document(data: Any, schema, what: str, source: str):
    """A recipe or comparison mapping through its schema: one RecipeError line for the first problem, and a hint
    when the file is the other kind of document."""
    if not isinstance(data, dict):
        raise RecipeError(f"{what} {source}: expected a mapping at the top level")
    if what == "recipe" and "entries" in data and "method" not in data:
        raise RecipeError(f"{source} is a comparison, not a merge recipe: run it with `workbench compare {source}`")
    if what == "comparison" and "entries" not in data and "method" in data:
        raise RecipeError(f"{source} is a merge recipe, not a comparison: run it with `workbench merge {source}`")
    if _depth(data) > MAX_DEPTH:
        raise RecipeError(f"{what} {source}: nested more than {MAX_DEPTH} levels deep")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_first_error(e, f"{what} {source}: ")) from None


def parse_recipe(data: dict[str, Any] | str | Path, source: str | None = None, *,
                 require_files: bool = True, folder: Path | None = None) -> ResolvedRecipe:
    """A recipe (file or mapping) validated and resolved; `require_files=False` accepts experts whose files are
    absent (a comparison plans, and skips, what it cannot build). `folder` (default: the recipe file's, else the
    working folder) is where relative `eval.include_path` folders are."""
    if isinstance(data, (str, Path)) and Path(data).suffix in (".yaml", ".yml"):
        source = source or str(data)
        folder = folder or Path(data).parent
        data = _load_yaml(Path(data))
    source = source or "<recipe>"
    recipe = validate_document(data, Recipe, "recipe", source)
    method_cls = METHODS.get(recipe.method)
    pool = Pool.open(recipe.pool)
    experts: list[Expert] = []
    for ref in recipe.experts or pool.names():
        pool_name, _, name = ref.rpartition(":")
        p = Pool.open(pool_name) if pool_name else pool
        if p.manifest.base.fingerprint != pool.manifest.base.fingerprint:
            raise RecipeError(f"recipe {source}: mixed bases: {ref!r} is over {p.manifest.base.spec} "
                              f"({p.manifest.base.fingerprint}), pool {pool.name!r} over {pool.manifest.base.spec}")
        try:
            experts.append(p.expert(name))
        except WorkbenchError as e:
            raise RecipeError(f"recipe {source}: {e}") from None
    if len({(e.pool.root, e.name) for e in experts}) != len(experts):
        raise RecipeError(f"recipe {source}: an expert is listed twice")
    if require_files:
        _check_files_present(source, experts)
    try:
        _refuse_bools(method_cls.Params, recipe.parameters)
        params = method_cls.Params.model_validate(recipe.parameters)
    except ValidationError as e:
        raise RecipeError(_first_error(e, f"recipe {source}: parameters.")) from None
    except _BoolForNumber as e:
        raise RecipeError(f"recipe {source}: parameters.{e}") from None
    method = method_cls()
    try:
        method.validate(experts, params, recipe.output)
    except RecipeError as e:
        raise RecipeError(f"recipe {source}: {e}") from None
    resolved = ResolvedRecipe(recipe, source, pool, experts, method, params, Path(folder or "."))
    for i, path in enumerate(resolved.include_path):
        if not path.is_dir():
            raise RecipeError(f"recipe {source}: eval.include_path.{i}: {_clip(recipe.eval.include_path[i])} is not a "
                              "folder (relative paths are read from the recipe's folder)")
    if recipe.sweep:
        from .tasks import lmeval

        lmeval.resolve(recipe.sweep.tasks, resolved.include_path, "validation")
        for point in sweep_points(recipe.sweep):  # every grid point is validated before any work
            variant(resolved, point)
    return resolved


def sweep_points(sweep: SweepSpec) -> list[dict[str, Any]]:
    import itertools
    import math

    keys = list(sweep.parameters)
    for k in keys:
        if not sweep.parameters[k]:
            raise RecipeError(f"sweep.parameters.{_clip(k)} is empty")
    n = math.prod(len(sweep.parameters[k]) for k in keys)  # counted before any point is made
    if n > MAX_SWEEP_POINTS:
        raise RecipeError(f"sweep: the grid has {n:,} points (at most {MAX_SWEEP_POINTS}): sweep fewer values")
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep.parameters[k] for k in keys))]


def variant(resolved: ResolvedRecipe, point: dict[str, Any]) -> ResolvedRecipe:
    """The recipe with `point` merged into its parameters (re-validated)."""
    r = resolved.recipe
    suffix = "-".join(f"{k}{v}" for k, v in point.items())
    params_dict = {**r.parameters, **point}
    try:
        _refuse_bools(resolved.method.Params, params_dict)
        params = resolved.method.Params.model_validate(params_dict)
    except ValidationError as e:
        raise RecipeError(_first_error(e, f"recipe {resolved.source}: sweep point {_clip(repr(point))}: "
                                          "parameters.")) from None
    except _BoolForNumber as e:
        raise RecipeError(f"recipe {resolved.source}: sweep point {_clip(repr(point))}: parameters.{e}") from None
    resolved.method.validate(resolved.experts, params, r.output)
    recipe = r.model_copy(update={"parameters": params_dict, "name": f"{r.name}@{suffix}"})
    return ResolvedRecipe(recipe, resolved.source, resolved.pool, resolved.experts, resolved.method, params,
                          resolved.folder)


_THREADS_LOCK = threading.Lock()
_BUILDS = 0  # CPU builds running in this process (the app runs comparisons in threads)
_THREADS_BEFORE = 1


@contextmanager
def build_threads(device: str = "cpu"):
    """Torch on `BUILD_THREADS` threads for one CPU build (restored after): the artifact's bytes do not depend on
    the caller's OMP_NUM_THREADS."""
    import torch

    from .methods.base import BUILD_THREADS

    if not str(device).startswith("cpu"):
        yield
        return
    global _BUILDS, _THREADS_BEFORE
    with _THREADS_LOCK:  # the setting is process-wide: the first build sets it, the last one out restores it
        if _BUILDS == 0:
            _THREADS_BEFORE = torch.get_num_threads()
            torch.set_num_threads(BUILD_THREADS)
        _BUILDS += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _BUILDS -= 1
            if _BUILDS == 0:
                torch.set_num_threads(_THREADS_BEFORE)


def build(resolved: ResolvedRecipe, *, force: bool = False, device: str = "cpu", log=print) -> Path:
    """Build the artifact once per key: a finished artifact is reused, an interrupted one rebuilt.

    The experts' files are checked against the manifest's hashes first: the key trusts them.
    """
    if device_kind(device) != device_kind(resolved.device):  # a GPU's bytes are another artifact (`key_body`)
        resolved = replace(resolved, device=device)
    check_expert_files(resolved.experts)
    out = resolved.artifact_dir
    for p in clean_stale_staging(out.parent):  # any key's, whose builder died (a live build holds its key's lock)
        log(f"removed {p.name} from {out.parent}: left by a build that was killed")
    # One builder per key at a time: a second process (a Ray worker, another compare) waits, then reuses.
    with file_lock(out.parent / f".{out.name}.lock"):
        if (out / "artifact.json").is_file() and not force:
            log(f"artifact {out} exists (same recipe and experts): reused")
            meta = read_artifact_meta(out)
            names = meta.get("names") or [meta.get("name")]
            if resolved.recipe.name not in names:  # e.g. a sweep's best point, now also the recipe's own artifact
                atomic_write_json(out / ARTIFACT_FILE, {**meta, "names": [*names, resolved.recipe.name]})
            return out
        for stale in out.parent.glob(f".staging-{out.name}-*"):  # a killed build's (we hold the key's lock)
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.perf_counter()
        r = resolved.recipe
        with staging_dir(out, replace=True) as tmp:
            ctx = BuildContext(pool=resolved.pool, experts=resolved.experts, params=resolved.params, output=r.output,
                               out_dir=tmp, recipe=r.model_dump(mode="json"), device=device, log=log)
            with build_threads(device):
                meta = resolved.method.build(ctx)
            write_artifact_meta(tmp, {
                **meta, "name": r.name, "names": [r.name], "method": r.method, "recipe": r.model_dump(mode="json"),
                "key": resolved.key, "key_body": resolved.key_body, "method_version": resolved.method.version,
                "key_inputs": resolved.inputs,
                "params": resolved.params.model_dump(mode="json", by_alias=True),
                "pool": str(resolved.pool.root.resolve()), "base": resolved.pool.manifest.base.spec,
                "experts": [e.name for e in resolved.experts], "build_s": round(time.perf_counter() - t0, 2),
                # what the artifact was built from, so a server can refuse it once an expert changed
                "expert_files": {e.name: e.entry.files for e in resolved.experts},
                "pool_fingerprint": resolved.pool.manifest.base.fingerprint,
            })
            fault_point("build")
    return out


def _recorded_recipe(resolved: ResolvedRecipe) -> dict[str, Any]:
    """The recipe as results record it: pools by name, not by a path of this machine."""
    r = resolved.recipe.model_dump(mode="json")
    r["pool"] = resolved.pool.name
    if r["experts"] is not None:
        r["experts"] = [e.name if e.pool.root == resolved.pool.root else f"{e.pool.name}:{e.name}"
                        for e in resolved.experts]
    return r


def run_sweep(resolved: ResolvedRecipe, *, device: str = "cpu", force: bool = False, results_dir: Path | None = None,
              log=print) -> tuple[ResolvedRecipe, dict]:
    """Build and score every grid point on the validation split; return the best point's recipe.

    Scores are recorded in `<results_dir>/sweeps/` and reused while the point's artifact key, the tasks,
    the limit and the tasks' data are the same. A point's score is the mean of its tasks' primary metrics over the
    accuracy-like, higher-is-better ones (`sweep_scoring`; other tasks are recorded, not scored); a sweep none of
    whose tasks gives such a score is refused before anything is built or written.
    """
    from .comparison import task_config_hash, task_data_hash
    from .eval import harness
    from .tasks import lmeval
    from .tasks.suite import effective_limit

    check_expert_files(resolved.experts)  # cached scores trust the key, and the key trusts the files
    sweep = resolved.recipe.sweep
    refs = lmeval.resolve(sweep.tasks, resolved.include_path, "validation")
    tasks = [r.name for r in refs]
    scoring = sweep_scoring(resolved.recipe.name, refs)  # refused here, before anything is built or written
    data = {r.name: task_data_hash(r.name, r) for r in refs}
    record_path = Path(results_dir or harness.results_root()) / "sweeps" / f"{resolved.pool.name}__{resolved.recipe.name}.json"
    from importlib.metadata import version

    # keyed like a comparison's cells: the points' scores depend on the tasks' data and configuration (prompt,
    # generation settings, metric), lm-eval's version, the batch size and the device, besides the limit
    head = {"recipe": resolved.recipe.name, "pool": resolved.pool.name, "split": "validation", "tasks": tasks,
            "limit": effective_limit(sweep.limit, tasks, "validation"), "data_sha256": data, "config": {r.name: task_config_hash(r.name, r) for r in refs},
            "lm_eval": version("lm-eval"), "batch_size": sweep.batch_size, "device": device.split(":")[0],
            "scoring": scoring}
    with file_lock(lock_for(record_path)):  # one process at a time reads, extends and rewrites the record
        return _sweep_locked(resolved, record_path, head, refs, device=device, force=force, log=log)


def sweep_scoring(recipe: str, refs: list) -> dict[str, dict[str, Any]]:
    """How a sweep scores a point, per task (lm-eval TaskRefs): its primary metric and direction as its config
    declares them (`metrics.config_metric`) and whether it is `scored`: only accuracy-like, higher-is-better metrics
    (exact_match, acc, acc_norm ...) are averaged into a point's score, never a perplexity, an f1 or a bleu of another
    scale or a lower-is-better metric. Raises RecipeError (one line) when no task is scored."""
    from .eval import metrics

    out: dict[str, dict[str, Any]] = {}
    for r in refs:
        spec = metrics.config_metric(r.config, r.output_type)
        out[r.name] = {"metric": spec.name if spec else None,
                       "higher_is_better": spec.higher_is_better if spec else None,
                       "scored": metrics.ranks_accuracy(spec)}
    if not any(t["scored"] for t in out.values()):
        arrow = {True: " ↑", False: " ↓", None: ""}
        got = ", ".join(f"{t} {i['metric'] or 'no metric'}{arrow[i['higher_is_better']]}" for t, i in out.items())
        raise RecipeError(f"recipe {recipe}: sweep.tasks give no score to rank points by ({got[:200]}): a sweep "
                          "averages accuracy-like, higher-is-better metrics (exact_match, acc, acc_norm ...); add such "
                          "a task")
    return out


def _legacy_scored_alike(refs: list, scoring: dict[str, dict[str, Any]]) -> bool:
    """Whether points recorded before `scoring` (scored by exact_match, else acc, of every task, of lm-eval's last
    filter) have the scores the current rule gives: every task scored by exact_match, or by acc without an
    exact_match, with at most one filter."""
    from .eval import metrics

    for r in refs:
        declared = [m.get("metric") for m in r.config.get("metric_list") or [] if isinstance(m, dict)] or \
            list(metrics.DEFAULT_METRICS.get(r.output_type, ()))
        metric = scoring[r.name]["metric"]
        if not scoring[r.name]["scored"] or len(metrics.filter_names(r.config.get("filter_list"))) > 1 or not (
                metric == "exact_match" or (metric == "acc" and "exact_match" not in declared)):
            return False
    return True


def _point_score(res: dict[str, Any], scoring: dict[str, dict[str, Any]]) -> tuple[float, dict, dict]:
    """(score, per_task, other) of one evaluated point: per_task {task: value} of the scored tasks (each task's primary
    metric of its one lm-eval filter, `harness.scores_of`), their mean the score (NaN when one has no finite value);
    other {task: {metric, higher_is_better, value}} of the tasks recorded but not scored."""
    import math
    import statistics

    from .eval import metrics
    from .eval.harness import scores_of

    scores = scores_of(res)
    per_task, other, missing = {}, {}, []
    for task, how in scoring.items():
        got = scores.get(task) or {}
        spec = metrics.primary_metric(task, res, None, got)
        value = got.get(spec.name) if spec else None
        value = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if how["scored"] and metrics.ranks_accuracy(spec):
            if value is None or not math.isfinite(value):
                missing.append(task)
            else:
                per_task[task] = value
        else:
            other[task] = {"metric": spec.name if spec else None,
                           "higher_is_better": spec.higher_is_better if spec else None,
                           "value": value if value is not None and math.isfinite(value) else None}
    score = statistics.fmean(per_task.values()) if per_task and not missing else float("nan")
    return score, per_task, other


def _sweep_locked(resolved: ResolvedRecipe, record_path: Path, head: dict, tasks: list, *, device: str,
                  force: bool, log) -> tuple[ResolvedRecipe, dict]:
    import math

    from .artifacts import load_artifact
    from .cells import read_record
    from .eval.harness import evaluate

    sweep = resolved.recipe.sweep
    scoring = head["scoring"]
    cached = {}
    if record_path.is_file() and not force:
        prior = read_record(record_path) or {}
        same_scoring = prior.get("scoring") == scoring or ("scoring" not in prior and
                                                           _legacy_scored_alike(tasks, scoring))
        if same_scoring and all(prior.get(k) == head[k] for k in ("tasks", "limit", "data_sha256", "config", "lm_eval",
                                                                  "batch_size", "device")):
            cached = {p["key"]: p for p in prior.get("points", [])
                      if isinstance(p, dict) and isinstance(p.get("score"), (int, float))
                      and math.isfinite(p["score"])}
    scored = [t for t, how in scoring.items() if how["scored"]]
    what = f"mean of {len(scored)} tasks' accuracy" if len(scored) > 1 else \
        f"{scored[0]} {scoring[scored[0]]['metric']}"
    points = []
    for i, point in enumerate(sweep_points(sweep), 1):
        v = variant(resolved, point)
        if v.key in cached:
            points.append(cached[v.key])
            log(f"sweep {i}: {point} -> {cached[v.key]['score']:.4f} (cached)")
            continue
        artifact = build(v, device=device, log=log)
        res = evaluate(load_artifact(artifact, device=device), tasks, limit=sweep.limit, batch_size=sweep.batch_size,
                       split="validation", log_samples=False)
        score, per_task, other = _point_score(res, scoring)
        points.append({"point": point, "key": v.key, "score": score, "per_task": per_task,
                       **({"other_tasks": other} if other else {}), "artifact": artifact_ref(artifact)})
        log(f"sweep {i}: {point} -> validation {what} {score:.4f}")
        atomic_write_json(record_path, {**head, "points": points})
    finite = [p for p in points if isinstance(p["score"], (int, float)) and math.isfinite(p["score"])]
    if not finite:
        raise RecipeError(f"recipe {resolved.recipe.name}: no sweep point got a score (the scored tasks "
                          f"{', '.join(scored)} reported no finite {what})")
    best = max(finite, key=lambda p: p["score"])  # first of equals wins (grid order); a NaN point never does
    atomic_write_json(record_path, {**head, "points": points, "best": best})
    chosen = variant(resolved, best["point"])
    chosen = ResolvedRecipe(chosen.recipe.model_copy(update={"name": resolved.recipe.name}), chosen.source,
                            chosen.pool, chosen.experts, chosen.method, chosen.params, chosen.folder)
    return chosen, {"file": f"sweeps/{record_path.name}", "best": best["point"], "validation_score": best["score"]}


def run_recipe(path: str | Path | dict, *, evaluate: bool = False, force: bool = False, device: str = "cpu",
               results_dir: Path | None = None, log=print) -> dict[str, Any]:
    """Parse, sweep (if asked), build and evaluate (if asked) one recipe; records go under `results_dir`
    (default: the harness's results_root()) and name the artifact relative to the cache (`artifacts/<folder>`)."""
    from .eval import harness

    results_dir = Path(results_dir or harness.results_root())
    resolved = parse_recipe(path)
    selection = None
    if resolved.recipe.sweep:
        resolved, selection = run_sweep(resolved, device=device, force=force, results_dir=results_dir, log=log)
    artifact = build(resolved, force=force, device=device, log=log)
    ref = artifact_ref(artifact)
    out: dict[str, Any] = {"artifact": ref, "artifact_dir": str(artifact), "selection": selection}
    if evaluate:
        from .artifacts import load_artifact
        from .eval import run_eval

        spec = resolved.recipe.eval
        loaded = load_artifact(artifact, device=device)
        loaded.name = resolved.recipe.name
        loaded.info.update(method=resolved.recipe.method, artifact=ref)
        out["eval"] = run_eval(ref, spec.tasks, pool=resolved.pool, limit=spec.limit, loaded=loaded,
                               include_path=resolved.include_path,
                               batch_size=spec.batch_size, device=device, out_dir=results_dir / "lm-eval",
                               extra={"params": resolved.params.model_dump(mode="json", by_alias=True),
                                      "recipe": _recorded_recipe(resolved), "artifact_key": resolved.key,
                                      "selected_on_validation": selection})
    return out


__all__ = ["Recipe", "ResolvedRecipe", "build", "check_expert_files", "parse_recipe", "run_recipe", "run_sweep"]
