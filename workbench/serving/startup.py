"""Compositions declared at start: `workbench serve --recipes ...` builds the named recipes' artifacts (when not
cached) before the engine loads, so the server serves them.

The recipes go through the library's own path: `recipes.parse_recipe` validates each, `recipes.build` builds it
once per key into the artifact cache (a cached artifact is reused), and the engine then serves exactly those
artifacts beside the pool's plain adapters (`api.build_app`: `MultiLoraModel.from_pool(declared=...)`; one that
cannot be served fails the start). `all` is every recipe of the recipes folder
over this pool whose artifact the adapter engine serves (routed or low-rank): decided from what the method
declares (`Method.artifact_types` where a method declares it; else an output of kind `lora`, or a method that
takes LoRA experts only, which composes them in adapter space), never by the method's name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import RecipeError, WorkbenchError, did_you_mean

LOW_RANK_TYPES = frozenset({"merged_lora", "routed_lora", "twin", "smora"})  # artifacts the adapter engine serves
MAX_RECIPES = 256  # recipes one server start builds at most


def recipes_folder() -> Path:
    """The project's recipes (merges/), where bare recipe names and `all` are looked up."""
    from ..comparison import MERGES_DIR

    return MERGES_DIR


def low_rank(resolved) -> bool:
    """Whether a resolved recipe's artifact is served by the adapter engine (routed or low-rank), from what its
    method declares."""
    declared = getattr(type(resolved.method), "artifact_types", None)
    if declared is not None:
        return bool(set(declared) & LOW_RANK_TYPES)
    return resolved.recipe.output.kind == "lora" or set(type(resolved.method).expert_kinds) == {"lora"}


def _same_pool(resolved, pool) -> bool:
    return resolved.pool.root.resolve() == pool.root.resolve()


def resolve_recipes(pool, specs: Sequence[str], *, folder: Path | None = None,
                    log: Callable[[str], Any] = print) -> list:
    """The recipes `specs` name, validated (`recipes.parse_recipe`), in order, without repeats: each spec a recipe
    file, a recipe name of `folder` (default merges/), `all` (every routed or low-rank recipe of `folder` over this
    pool whose experts' files are present; the others are logged and skipped), or several of these separated by
    commas. A spec that names no recipe, a recipe over another pool, or one that does not validate is a one-line
    RecipeError."""
    from ..recipes import parse_recipe

    folder = Path(folder) if folder is not None else recipes_folder()
    parts = [p.strip() for spec in specs for p in str(spec).split(",") if p.strip()]
    if len(parts) > MAX_RECIPES:
        raise RecipeError(f"--recipes names {len(parts)} recipes: at most {MAX_RECIPES}")
    out: dict[str, Any] = {}
    for part in parts:
        if part == "all":
            for path in sorted(folder.glob("*.yaml")):
                try:
                    r = parse_recipe(path, require_files=False)
                except WorkbenchError:  # a comparison, or a recipe of another project layout: not one to serve
                    continue
                if not _same_pool(r, pool) or not low_rank(r):
                    continue
                try:
                    r = parse_recipe(path)  # its experts' files must be here to build it
                except WorkbenchError as e:
                    log(f"--recipes all: {path.name} skipped: {e}")
                    continue
                out.setdefault(r.recipe.name, r)
            continue
        path = Path(part).expanduser()
        if not (path.suffix in (".yaml", ".yml") and path.is_file()):
            named = folder / f"{part}.yaml"
            if not named.is_file():
                shown = part if len(part) <= 60 else part[:57] + "..."
                names = [p.stem for p in folder.glob("*.yaml")]
                raise RecipeError(f"--recipes: unknown recipe {shown!r}: not a recipe file, nor a recipe of "
                                  f"{folder}{did_you_mean(part, names)} (or `all`)")
            path = named
        r = parse_recipe(path)
        if not _same_pool(r, pool):
            raise RecipeError(f"--recipes: recipe {r.recipe.name!r} ({path}) is over pool {r.pool.name!r}, this server "
                              f"serves pool {pool.name!r}")
        out.setdefault(r.recipe.name, r)
    return list(out.values())


def build_recipes(resolved: Sequence, *, device: str = "cpu", log: Callable[[str], Any] = print) -> list[Path]:
    """Build each resolved recipe's artifact unless it is cached (`recipes.build`), with progress; their folders."""
    from ..artifacts import ARTIFACT_FILE
    from ..recipes import build

    folders = []
    n = len(resolved)
    for k, r in enumerate(resolved, 1):
        cached = (r.artifact_dir / ARTIFACT_FILE).is_file()
        log(f"[{k}/{n}] {r.recipe.name} ({r.recipe.method}): {'cached' if cached else 'building'}")
        t0 = time.monotonic()
        folders.append(build(r, device=device, log=lambda m: log(f"    {m}")))
        if not cached:
            log(f"[{k}/{n}] {r.recipe.name}: built in {time.monotonic() - t0:.1f} s")
    return folders


__all__ = ["LOW_RANK_TYPES", "build_recipes", "low_rank", "recipes_folder", "resolve_recipes"]
