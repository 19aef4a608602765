"""Comparison recipes: one pool, a list of rows (base, experts, any registered method, or an existing recipe),
a task list and eval settings -> a plan of cells, validated before any work.

A comparison file (e.g. `merges/demo.yaml`):

    name: demo
    pool: demo
    tasks: [held_in, held_out]      # suite names and groups, lm-eval tasks and groups, tasks of include_path
    include_path: [my_tasks]        # folders of lm-eval task YAMLs, relative to this file's folder (optional)
    eval: {limit: 20, batch_size: 32, split: test}
    seeds: [0]
    reference: multitask           # the row every other row is paired against
    experts: [addition, sorting]   # of method entries that name none (default: the whole pool)
    entries:
      - base
      - experts                    # every expert of the pool except multitask ones, one row each
      - multitask                  # any expert by name
      - {name: ta, method: task_arithmetic, parameters: {lambda: 0.3}}   # experts: the top-level list
      - {recipe: ties-lora.yaml}   # an existing recipe (its validation sweep runs unless sweep: false)

A `recipe:` entry names a file in the comparison's folder or in the project's `merges/` folder (symlinks
resolved; a path that leads anywhere else is refused).

Every check runs in `parse_comparison`: schema, unknown method, expert, task or parameter, experts of a kind
the method does not take, duplicate row names, an unknown reference. Rows whose experts are in the manifest
but not on disk (full fine-tunes are not shipped with the repository) are planned as skipped, with one line
saying how to get them. The cells and their execution live in `workbench.jobs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Discriminator, Field, Tag

from .errors import RecipeError, WorkbenchError
from .io import sha256_json
from .methods import METHODS
from .methods.base import MAX_BATCH, MAX_LIMIT, MAX_SEED, OutputSpec
from .pool import Pool
from .recipes import Experts, ResolvedRecipe, _clip, _load_yaml, parse_recipe, validate_document
from .tasks.lmeval import TaskRef, suite_config_hash, task_key_inputs

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@=+-]*\z"
Ref = Annotated[str, Field(max_length=1024)]
MERGES_DIR = Path(__file__).resolve().parent.parent / "merges"  # the project's recipes
MAX_SEEDS = 100  # seeds of a comparison: each one more row per seeded method
MAX_INCLUDE = 16  # include folders of a comparison (one is usual)


class MethodEntry(Schema):
    """A row built by a method (`method`) or by an existing recipe file (`recipe`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str | None = Field(None, max_length=120, pattern=NAME, description="row name (default: method or recipe name)")
    method: str | None = Field(None, max_length=64, description="a registered method")
    recipe: Ref | None = Field(None, description="a recipe file, relative to the comparison's folder (in that folder "
                                                 "or the project's merges/)")
    experts: Experts | None = Field(None, description="expert names (left out: the recipe's, else the pool's; "
                                                      "[] is refused)")
    parameters: dict[str, Any] = Field(default_factory=dict)
    output: OutputSpec | None = None
    sweep: bool = Field(True, description="run the recipe's validation sweep (recipe entries)")
    tasks: list[Annotated[str, Field(max_length=64)]] | None = Field(
        None, description="tasks of this row (default: the comparison's; e.g. only the merged experts' tasks)")


class CompareEval(Schema):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    limit: int | None = Field(None, gt=0, le=MAX_LIMIT,
                              description=f"examples per task (None: the whole split; at most {MAX_LIMIT:,})")
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description=f"examples per forward (1..{MAX_BATCH})")
    split: Literal["test", "validation"] = "test"
    apply_chat_template: bool = Field(False, description="prompts rendered by the tokenizer's chat template (for "
                                                         "experts trained on a chat column)")


def _entry_kind(value: Any) -> str:
    return "MethodEntry" if isinstance(value, (dict, MethodEntry)) else "str"


# a mapping is a MethodEntry (its errors are MethodEntry's, not "should be a valid string"), anything else a name
Entry = Annotated[Annotated[Annotated[str, Field(max_length=120)], Tag("str")]
                  | Annotated[MethodEntry, Tag("MethodEntry")], Discriminator(_entry_kind)]


class ComparisonSpec(Schema):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str = Field(max_length=120, pattern=NAME, description="names the results folder")
    pool: Ref = "demo"
    description: str = ""
    entries: list[Entry] = Field(min_length=1)
    experts: Experts | None = Field(None, description="experts of `method` entries that name none "
                                                      "(left out: every expert of the pool; [] is refused)")
    tasks: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=lambda: ["held_in", "held_out"])
    include_path: list[Ref] = Field(
        default_factory=list, max_length=MAX_INCLUDE,
        description=f"folders of lm-eval task YAMLs whose tasks `tasks` may name, relative to the comparison's folder "
                    f"(at most {MAX_INCLUDE})")
    eval: CompareEval = Field(default_factory=CompareEval)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(
        default_factory=lambda: [0], min_length=1, max_length=MAX_SEEDS,
        description=f"seeds of seeded methods (each 0..2**32-1; at most {MAX_SEEDS})")
    reference: str | None = Field(None, description="row for the paired tests (default: multitask, else the first)")


@dataclass
class Row:
    """One leaderboard row: `base`, an expert of the pool, or an artifact built from `recipe`."""

    name: str
    kind: Literal["base", "expert", "artifact"]
    method: str
    expert: str | None = None
    recipe: ResolvedRecipe | None = None
    sweep: bool = False
    skip: str | None = None  # why the row is not run (its experts' files are absent)
    info: dict[str, Any] = field(default_factory=dict)
    base_fp: str = ""
    tasks: list[str] = field(default_factory=list)  # the tasks this row is evaluated on

    def identity(self) -> dict[str, Any]:
        """What determines this row's model before any build (sweep rows: the recipe and its grid)."""
        if self.kind == "base":
            return {"base": self.base_fp}
        if self.kind == "expert":
            return {"expert": self.expert, "files": self.info["files"], "base": self.base_fp}
        body = {"key": self.recipe.key}
        if self.sweep and self.recipe.recipe.sweep:
            body["sweep"] = self.recipe.recipe.sweep.model_dump(mode="json")
        return body


@dataclass
class Comparison:
    spec: ComparisonSpec
    source: str
    folder: Path  # the comparison file's folder: recipe paths are relative to it
    pool: Pool
    rows: list[Row]
    tasks: list[str]
    reference: str

    @property
    def active_rows(self) -> list[Row]:
        return [r for r in self.rows if r.skip is None]

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise WorkbenchError(f"comparison {self.spec.name!r} has no row {name!r}")

    def settings(self) -> dict[str, Any]:
        """What every cell's result depends on besides its row and task."""
        settings = self.spec.eval.model_dump(mode="json")
        if not settings["apply_chat_template"]:  # off: the keys of comparisons made before the option existed
            settings.pop("apply_chat_template")
        return {"eval": settings}

    recipe_bodies: dict[str, Any] = field(default_factory=dict)  # recipe files as read when parsing
    task_refs: dict[str, TaskRef] = field(default_factory=dict)  # task name -> what lm-eval evaluates (tasks.lmeval)

    @property
    def include_path(self) -> list[Path]:
        """The spec's include folders, relative to the comparison's folder."""
        return include_folders(self.spec, self.folder)

    def task_ref(self, name: str) -> TaskRef:
        """The task `name` as this comparison resolved it (include folders, group configuration)."""
        if name not in self.task_refs:
            raise WorkbenchError(f"comparison {self.spec.name!r} has no task {name!r}")
        return self.task_refs[name]

    def to_payload(self) -> dict[str, Any]:
        """What a worker process needs to rebuild this comparison (Ray tasks): the spec, where it came from, and
        the recipe files' contents as the driver read them (an edit meanwhile changes nothing)."""
        return {"spec": self.spec.model_dump(mode="json"), "source": self.source, "folder": str(self.folder.resolve()),
                "recipe_bodies": self.recipe_bodies}


def _fingerprint_base(pool: Pool) -> str:
    """The base as base and expert rows' keys see it: its config and shapes, its weights' bytes, and its tokenizer's
    files when they are its own (`BaseModel.tokenizer_sha256`; a GGUF base's keys are as before)."""
    tokenizer = pool.base.tokenizer_sha256
    return f"{pool.manifest.base.fingerprint}+{pool.base.weights_sha256}" + (f"+tok:{tokenizer}" if tokenizer else "")


def _is_multitask(expert) -> bool:
    return expert.entry.tags.get("task") == "multitask" or len(expert.tasks()) > 1


def _missing_reason(experts, pool: Pool) -> str | None:
    missing = [e.name for e in experts if not e.files_present()]
    if not missing:
        return None
    them = "them" if len(missing) > 1 else "it"
    how = (f"`workbench demo --full` trains {them}" if pool.name == "demo"
           else f"`workbench pool build-demo --old` trains {them}" if pool.name == "demo-old"
           else f"`workbench pool verify {pool.name}` lists what is missing")
    kinds = sorted({e.kind for e in experts if e.name in missing})
    return (f"the {'/'.join(kinds)} expert{'s' if len(missing) > 1 else ''} {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''} {'are' if len(missing) > 1 else 'is'} not on disk; {how}")


def parse_comparison(data: dict[str, Any] | str | Path, source: str | None = None, *,
                     folder: Path | None = None, recipe_bodies: dict[str, Any] | None = None,
                     log=None) -> Comparison:
    """Validate a comparison (file or mapping) and resolve its rows; raises one RecipeError line on any problem.
    `recipe_bodies` (path -> mapping) stands in for reading recipe files (a worker replays the driver's)."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        source = source or str(path)
        folder = folder or path.parent
        data = _load_yaml(path, "comparison")
    source = source or "<comparison>"
    folder = Path(folder or ".")
    spec = validate_document(data, ComparisonSpec, "comparison", source)
    from .tasks import lmeval

    include = include_folders(spec, folder, f"comparison {source}")
    split = spec.eval.split
    try:
        refs = lmeval.resolve(list(spec.tasks), include, split)
    except WorkbenchError as e:
        raise RecipeError(f"comparison {source}: tasks: {e}") from None
    task_refs = {r.name: r for r in refs}
    tasks = list(task_refs)
    pool = Pool.open(spec.pool)
    bodies: dict[str, Any] = dict(recipe_bodies or {})
    rows: list[Row] = []
    for i, entry in enumerate(spec.entries):
        where = f"comparison {source}: entries.{i}"
        row_tasks = tasks
        if isinstance(entry, MethodEntry) and entry.tasks is not None:
            try:
                row_tasks = [r.name for r in lmeval.resolve(list(entry.tasks), include, split)]
            except WorkbenchError as e:
                raise RecipeError(f"{where}: tasks: {e}") from None
            if extra := [t for t in row_tasks if t not in tasks]:
                raise RecipeError(f"{where}: tasks {extra} are not among the comparison's tasks")
        for r in _entry_rows(entry, spec, pool, folder, where, bodies):
            r.tasks = list(row_tasks)
            rows.append(r)
    seen: set[str] = set()
    for r in rows:
        if r.name in seen:
            raise RecipeError(f"comparison {source}: duplicate row name {r.name!r} (give the entry a `name:`)")
        seen.add(r.name)
    reference = spec.reference
    if reference is not None and reference not in seen:
        raise RecipeError(f"comparison {source}: reference {_clip(reference)!r} is not a row "
                          f"(rows: {_clip(', '.join(r.name for r in rows), 200)})")
    active = [r.name for r in rows if r.skip is None]
    if not active:
        raise RecipeError(f"comparison {source}: every row is skipped ({rows[0].name}: {rows[0].skip})")
    wanted = reference or ("multitask" if "multitask" in seen else active[0])
    if wanted not in active:  # e.g. multitask in a clone without its weights: pair against another row, say so
        reference = active[0]
        if log:
            log(f"reference row {wanted} is skipped: paired tests use {reference} instead")
    else:
        reference = wanted
    return Comparison(spec, source, folder, pool, rows, tasks, reference, recipe_bodies=bodies, task_refs=task_refs)


def include_folders(spec: ComparisonSpec, folder: Path, where: str | None = None) -> list[Path]:
    """`include_path` folders, relative to the comparison's folder; with `where`, each must be a folder."""
    out = []
    for i, ref in enumerate(spec.include_path):
        path = Path(ref).expanduser()
        path = path if path.is_absolute() else Path(folder) / path
        if where is not None and not path.is_dir():
            raise RecipeError(f"{where}: include_path.{i}: {_clip(ref)} is not a folder (relative paths are read "
                              "from the comparison's folder)")
        out.append(path)
    return out


def _recipe_path(ref: str, folder: Path, where: str) -> Path:
    """A `recipe:` entry's file, confined to the comparison's folder and the project's merges/ folder: symlinks are
    resolved first, so neither `..` nor a link nor an absolute path reads a file elsewhere on the machine."""
    path = Path(ref)
    path = path if path.is_absolute() else Path(folder) / path
    real = path.resolve()
    roots = [Path(folder).resolve(), MERGES_DIR]
    if not any(real == r or r in real.parents for r in roots):
        raise RecipeError(f"{where}: recipe {_clip(ref)} is outside the comparison's folder and the project's "
                          "merges/ folder (recipes are read from there only)")
    return path


def _entry_rows(entry, spec: ComparisonSpec, pool: Pool, folder: Path, where: str, bodies: dict[str, Any]) -> list[Row]:
    fp = _fingerprint_base(pool)
    if isinstance(entry, str):
        if entry == "base":
            return [Row("base", "base", "base", base_fp=fp)]
        if entry == "experts":
            experts = [e for e in pool.experts if not _is_multitask(e)]
            if not experts:
                raise RecipeError(f"{where}: pool {pool.name!r} has no single-task experts for `experts`")
        elif entry in pool:
            experts = [pool.expert(entry)]
        else:
            raise RecipeError(f"{where}: unknown entry {_clip(entry)!r}: not `base`, `experts`, nor an expert of pool "
                              f"{pool.name!r} ({_clip(', '.join(pool.names()), 160)})")
        out = []
        for e in experts:
            method = "multitask" if _is_multitask(e) else f"expert-{e.kind}"
            out.append(Row(e.name, "expert", method, expert=e.name, skip=_missing_reason([e], pool),
                           info={"files": e.entry.files, "task": (e.entry.tags or {}).get("task")}, base_fp=fp))
        return out
    if (entry.method is None) == (entry.recipe is None):
        raise RecipeError(f"{where}: give exactly one of `method` or `recipe`")
    if entry.method is not None:
        if entry.method not in METHODS:
            try:
                METHODS.get(entry.method)
            except WorkbenchError as e:
                raise RecipeError(f"{where}: {e}") from None
        body: dict[str, Any] = {"name": entry.name or entry.method, "method": entry.method, "pool": spec.pool,
                                "parameters": dict(entry.parameters)}
        experts = entry.experts if entry.experts is not None else spec.experts
        if experts is not None:
            body["experts"] = list(experts)
        if entry.output is not None:
            body["output"] = entry.output.model_dump(mode="json")
        sweep, recipe_folder = False, folder
    else:
        if entry.experts is not None or entry.parameters or entry.output is not None:
            raise RecipeError(f"{where}: a `recipe` entry takes its experts, parameters and output from the recipe")
        path = _recipe_path(entry.recipe, folder, where)
        recipe_folder = path.parent  # its eval.include_path is relative to it
        if entry.recipe not in bodies:
            bodies[entry.recipe] = _load_yaml(path)
        body = bodies[entry.recipe]
        if not isinstance(body, dict):
            raise RecipeError(f"{where}: recipe {_clip(entry.recipe)} is not a mapping")
        body = dict(body)
        if not isinstance(body.get("method"), str):
            raise RecipeError(f"{where}: recipe {_clip(entry.recipe)} names no method")
        if body.get("pool", "demo") != spec.pool:
            raise RecipeError(f"{where}: recipe {_clip(entry.recipe)} is over pool {_clip(str(body.get('pool', 'demo')))!r}, "
                              f"the comparison over {_clip(spec.pool)!r}")
        if entry.name:
            body["name"] = entry.name
        sweep = entry.sweep and body.get("sweep") is not None
    try:
        method_cls = METHODS.get(body["method"])
    except WorkbenchError as e:
        raise RecipeError(f"{where}: {e}") from None
    params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    seeded = "seed" in method_cls.Params.model_fields and "seed" not in params
    seeds = spec.seeds if seeded else [None]
    out = []
    for seed in seeds:
        b = dict(body)
        if seed is not None:
            b["parameters"] = {**b.get("parameters", {}), "seed": seed}
            if len(seeds) > 1:
                b["name"] = f"{body['name']}@seed{seed}"
        try:
            resolved = parse_recipe(b, source=f"{where} ({b['name']})", require_files=False, folder=recipe_folder)
        except RecipeError as e:
            raise RecipeError(str(e).replace("recipe ", "", 1)) from None
        out.append(Row(resolved.recipe.name, "artifact", resolved.recipe.method, recipe=resolved, sweep=sweep,
                       skip=_missing_reason(resolved.experts, pool), base_fp=fp))
    return out


def task_config_hash(task: str, ref: TaskRef | None = None) -> str:
    """The task's lm-eval configuration (prompt, generation settings, filters, metric), without this machine's paths.

    Suite tasks (and a name without its TaskRef): the hash of the suite's YAML, as committed keys hold it; others
    `tasks.lmeval.task_key_inputs`' (lm-eval's resolved configuration and the code it names)."""
    if ref is not None and ref.source != "suite":
        return task_key_inputs(ref)["config"]
    return suite_config_hash(task)


def task_data_hash(task: str, ref: TaskRef | None = None) -> str:
    """The task's data: the suite's data hash (as committed keys hold it), else the sha256 of the local files the
    task reads and the Hub dataset it names (`tasks.lmeval.task_key_inputs`)."""
    if ref is not None and ref.source != "suite":
        return task_key_inputs(ref)["data"]
    from .tasks.suite import data_hash

    return data_hash(task)


def cell_key_body(comparison: Comparison, model_key: dict[str, Any], task: str, device: str = "cpu") -> dict[str, Any]:
    """What `cell_key` hashes, spelled out: `model` (the row's model), `task`, `data` and `config` (the task's data and
    lm-eval configuration), `lm_eval` (its version), `device` (its kind) and `eval` (limit, batch size, split, chat
    template...). A cell records it as `key_inputs`, so `compare --dry-run` can name what changed."""
    from importlib.metadata import version

    from .tasks.suite import effective_limit

    ref = comparison.task_refs.get(task)
    settings = comparison.settings()
    settings["eval"]["limit"] = effective_limit(settings["eval"]["limit"], [task], comparison.spec.eval.split)
    return {"model": model_key, "task": task, "data": task_data_hash(task, ref), "config": task_config_hash(task, ref),
            "lm_eval": version("lm-eval"), "device": device.split(":")[0], **settings}


def cell_key(comparison: Comparison, model_key: dict[str, Any], task: str, device: str = "cpu") -> str:
    """The key of one (row, task) result: the hash of `cell_key_body` (the row's model, the task's data and
    configuration, the eval settings, lm-eval's version and the device). Suite tasks' keys are what they always were
    (committed results hold them); another task's data and configuration are `tasks.lmeval.task_key_inputs`': an edit
    of its YAML or data files changes the key."""
    return sha256_json(cell_key_body(comparison, model_key, task, device))[:16]


def comparison_dir(results_dir: Path, name: str) -> Path:
    return Path(results_dir) / "compare" / name


def default_results_dir() -> Path:
    """`$WORKBENCH_RESULTS`, else `results` (read when called, not at import)."""
    from .eval.harness import results_root

    return results_root()


__all__ = ["Comparison", "ComparisonSpec", "Row", "cell_key", "cell_key_body", "comparison_dir", "default_results_dir",
           "include_folders", "parse_comparison", "task_config_hash", "task_data_hash"]
