"""Recipes: YAML in merges/ -> (pool, experts, method, params, output, eval), validated up front.

Every check that can fail runs before any tensor is touched: YAML syntax, the schema,
the method name, expert names, one base across pools, the method's parameter types and
ranges, and the method's own cross-field checks. Each failure is one RecipeError line.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, ValidationError

from .artifacts import ARTIFACT_FILE, read_artifact_meta
from .errors import RecipeError, WorkbenchError
from .io import atomic_write_json, cache_dir, sha256_json, staging_dir
from .methods import METHODS, BuildContext, Method, MethodParams, OutputSpec
from .methods.base import write_artifact_meta
from .pool import Expert, Pool


class EvalSpec(Schema):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tasks: list[str] = Field(default_factory=lambda: ["held_in", "held_out"])
    batch_size: int = Field(32, gt=0)
    limit: int | None = Field(None, gt=0)


class SweepSpec(Schema):
    """A grid over method parameters, each point scored on the validation split (never test)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    parameters: dict[str, list[Any]] = Field(description="parameter name -> values; the grid is their product")
    tasks: list[str] = Field(default_factory=lambda: ["held_in"], description="tasks scored (validation split)")
    limit: int | None = Field(50, gt=0, description="validation examples per task")
    batch_size: int = Field(32, gt=0)


class Recipe(Schema):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="artifact and results name")
    method: str
    pool: str = "demo"
    experts: list[str] | None = Field(None, description="expert names, or pool:expert; default all of the pool")
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

    @property
    def key(self) -> str:
        """Hash of everything that determines the artifact (recipe fields + experts' file hashes)."""
        # The name is not part of the key: a sweep's best point reuses that point's artifact.
        body = self.recipe.model_dump(mode="json", exclude={"eval", "description", "sweep", "name"})
        body["experts"] = [(e.pool.manifest.base.fingerprint, e.name, e.entry.files) for e in self.experts]
        body["params"] = self.params.model_dump(mode="json", by_alias=True)
        return sha256_json(body)[:12]

    @property
    def artifact_dir(self) -> Path:
        root = os.environ.get("WORKBENCH_CACHE_ARTIFACTS")
        return (Path(root) if root else cache_dir() / "artifacts") / f"{self.recipe.method}-{self.key}"


def _first_error(e: ValidationError, prefix: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    return f"{prefix}{loc}: {err['msg']}{got}"


def parse_recipe(data: dict[str, Any] | str | Path, source: str | None = None) -> ResolvedRecipe:
    if isinstance(data, (str, Path)) and Path(data).suffix in (".yaml", ".yml"):
        path = Path(data)
        source = source or str(path)
        if not path.is_file():
            raise RecipeError(f"no recipe at {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise RecipeError(f"recipe {path} is not valid YAML: {first}") from None
    source = source or "<recipe>"
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {source}: expected a mapping at the top level")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_first_error(e, f"recipe {source}: ")) from None
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
    try:
        params = method_cls.Params.model_validate(recipe.parameters)
    except ValidationError as e:
        raise RecipeError(_first_error(e, f"recipe {source}: parameters.")) from None
    method = method_cls()
    try:
        method.validate(experts, params, recipe.output)
    except RecipeError as e:
        raise RecipeError(f"recipe {source}: {e}") from None
    resolved = ResolvedRecipe(recipe, source, pool, experts, method, params)
    if recipe.sweep:
        from .eval.harness import resolve_tasks

        resolve_tasks(recipe.sweep.tasks)
        for point in sweep_points(recipe.sweep):  # every grid point is validated before any work
            variant(resolved, point)
    return resolved


def sweep_points(sweep: SweepSpec) -> list[dict[str, Any]]:
    import itertools

    keys = list(sweep.parameters)
    for k in keys:
        if not sweep.parameters[k]:
            raise RecipeError(f"sweep.parameters.{k} is empty")
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep.parameters[k] for k in keys))]


def variant(resolved: ResolvedRecipe, point: dict[str, Any]) -> ResolvedRecipe:
    """The recipe with `point` merged into its parameters (re-validated)."""
    r = resolved.recipe
    suffix = "-".join(f"{k}{v}" for k, v in point.items())
    params_dict = {**r.parameters, **point}
    try:
        params = resolved.method.Params.model_validate(params_dict)
    except ValidationError as e:
        raise RecipeError(_first_error(e, f"recipe {resolved.source}: sweep point {point}: parameters.")) from None
    resolved.method.validate(resolved.experts, params, r.output)
    recipe = r.model_copy(update={"parameters": params_dict, "name": f"{r.name}@{suffix}"})
    return ResolvedRecipe(recipe, resolved.source, resolved.pool, resolved.experts, resolved.method, params)


def build(resolved: ResolvedRecipe, *, force: bool = False, device: str = "cpu", log=print) -> Path:
    """Build the artifact once per key: a finished artifact is reused, an interrupted one rebuilt."""
    out = resolved.artifact_dir
    if (out / "artifact.json").is_file() and not force:
        log(f"artifact {out} exists (same recipe and experts): reused")
        meta = read_artifact_meta(out)
        names = meta.get("names") or [meta.get("name")]
        if resolved.recipe.name not in names:  # e.g. a sweep's best point, now also the recipe's own artifact
            atomic_write_json(out / ARTIFACT_FILE, {**meta, "names": [*names, resolved.recipe.name]})
        return out
    t0 = time.perf_counter()
    r = resolved.recipe
    with staging_dir(out) as tmp:
        ctx = BuildContext(pool=resolved.pool, experts=resolved.experts, params=resolved.params, output=r.output,
                           out_dir=tmp, recipe=r.model_dump(mode="json"), device=device, log=log)
        meta = resolved.method.build(ctx)
        write_artifact_meta(tmp, {
            **meta, "name": r.name, "names": [r.name], "method": r.method, "recipe": r.model_dump(mode="json"), "key": resolved.key,
            "params": resolved.params.model_dump(mode="json", by_alias=True), "pool": str(resolved.pool.root.resolve()),
            "base": resolved.pool.manifest.base.spec, "experts": [e.name for e in resolved.experts],
            "build_s": round(time.perf_counter() - t0, 2),
        })
    return out


def run_sweep(resolved: ResolvedRecipe, *, device: str = "cpu", force: bool = False, log=print) -> tuple[ResolvedRecipe, dict]:
    """Build and score every grid point on the validation split; return the best point's recipe."""
    import statistics

    from .artifacts import load_artifact
    from .eval.harness import RESULTS_DIR, evaluate, resolve_tasks, scores_of
    from .io import atomic_write_json

    sweep = resolved.recipe.sweep
    tasks = resolve_tasks(sweep.tasks)
    record_path = RESULTS_DIR / "sweeps" / f"{resolved.pool.name}__{resolved.recipe.name}.json"
    cached = {}
    if record_path.is_file() and not force:
        import json

        prior = json.loads(record_path.read_text())
        cached = {p["key"]: p for p in prior.get("points", []) if prior.get("tasks") == tasks
                  and prior.get("limit") == sweep.limit}
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
        per_task = {t: m.get("exact_match", float("nan")) for t, m in scores_of(res).items()}
        score = statistics.fmean(per_task.values())
        points.append({"point": point, "key": v.key, "score": score, "per_task": per_task, "artifact": str(artifact)})
        log(f"sweep {i}: {point} -> validation exact match {score:.4f}")
        atomic_write_json(record_path, {"recipe": resolved.recipe.name, "split": "validation", "tasks": tasks,
                                        "limit": sweep.limit, "points": points})
    best = max(points, key=lambda p: p["score"])  # first of equals wins (grid order)
    record = {"recipe": resolved.recipe.name, "split": "validation", "tasks": tasks, "limit": sweep.limit,
              "points": points, "best": best}
    atomic_write_json(record_path, record)
    chosen = variant(resolved, best["point"])
    chosen = ResolvedRecipe(chosen.recipe.model_copy(update={"name": resolved.recipe.name}), chosen.source,
                            chosen.pool, chosen.experts, chosen.method, chosen.params)
    return chosen, {"file": str(record_path), "best": best["point"], "validation_score": best["score"]}


def run_recipe(path: str | Path | dict, *, evaluate: bool = False, force: bool = False, device: str = "cpu",
               log=print) -> dict[str, Any]:
    resolved = parse_recipe(path)
    selection = None
    if resolved.recipe.sweep:
        resolved, selection = run_sweep(resolved, device=device, force=force, log=log)
    artifact = build(resolved, force=force, device=device, log=log)
    out: dict[str, Any] = {"artifact": str(artifact), "selection": selection}
    if evaluate:
        from .artifacts import load_artifact
        from .eval import run_eval

        spec = resolved.recipe.eval
        loaded = load_artifact(artifact, device=device)
        loaded.name = resolved.recipe.name
        loaded.info["method"] = resolved.recipe.method
        out["eval"] = run_eval(str(artifact), spec.tasks, pool=resolved.pool, limit=spec.limit, loaded=loaded,
                               batch_size=spec.batch_size, device=device,
                               extra={"params": resolved.params.model_dump(mode="json", by_alias=True),
                                      "recipe": resolved.recipe.model_dump(mode="json"), "artifact_key": resolved.key,
                                      "selected_on_validation": selection})
    return out


__all__ = ["Recipe", "ResolvedRecipe", "build", "parse_recipe", "run_recipe"]
