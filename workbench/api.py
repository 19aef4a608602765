"""The public Python API: what the `workbench` command does, as functions a script or notebook calls.

    import workbench as wb
    pool = wb.Pool.open("demo")
    art = wb.build(pool, "ties", experts=["addition", "sorting"], density=0.5)
    res = wb.evaluate(art, ["addition", "sorting"], limit=20)
    board = wb.compare("merges/demo.yaml")
    board.to_pandas(); board.paired("ties", "multitask")

Every error a user can cause raises a `WorkbenchError` (one line). Long calls report progress: `log` (default
`print`) gets one line per step, and `compare` draws a progress bar on stderr (`progress=False` turns it off, a
callable gets the `Progress` state instead). Nothing here imports torch until a model is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RecipeError, WorkbenchError

if TYPE_CHECKING:
    import pandas as pd

    from .jobs import Progress
    from .pool import Expert, Pool
    from .recipes import ResolvedRecipe

Log = Callable[[str], None]
PathLike = str | Path


def _log(log: Log | None) -> Log:
    return print if log is None else log


def _pool(pool: Pool | str | Path) -> Pool:
    from .pool import Pool

    return pool if isinstance(pool, Pool) else Pool.open(pool)


def _pool_ref(p: Pool) -> str:
    """How a recipe names the pool: by name when the pools folder resolves that name to it (artifact keys then do not
    depend on where this machine keeps it), else by its path."""
    from .pool import resolve_pool_path

    return p.name if resolve_pool_path(p.name).resolve() == p.root.resolve() else str(p.root)


def _expert_list(experts: str | Iterable[str] | None) -> list[str] | None:
    return None if experts is None else [experts] if isinstance(experts, str) else list(experts)


def _check_limit(limit: object, error: type[WorkbenchError]) -> None:
    """Examples per task: the schemas' bound (`MAX_LIMIT`), one line otherwise."""
    from .methods.base import MAX_LIMIT

    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise error(f"limit = {limit!r}: examples per task must be an integer in 1..{MAX_LIMIT}")


def _results(results_dir: PathLike | None) -> Path:
    from .eval.harness import results_root

    return Path(results_dir) if results_dir is not None else results_root()


# ----------------------------------------------------------------------------- pools, methods, base models


def list_pools() -> list[str]:
    """Names of the pools in the pools folder (`adapters/`, or `$WORKBENCH_POOLS`)."""
    from .pool import pool_names

    return pool_names()


def list_methods() -> list[dict[str, Any]]:
    """Every registered combination method: name, expert kinds it takes, outputs, description and its parameters
    (name -> {type, default, description})."""
    from .methods import METHODS

    out = []
    for name in METHODS:
        m = METHODS.get(name)
        params = {}
        for pname, f in m.Params.model_fields.items():
            params[f.alias or pname] = {"default": None if f.is_required() else f.get_default(call_default_factory=True),
                                        "description": f.description or ""}
        out.append({"name": name, "experts": sorted(m.expert_kinds), "outputs": sorted(m.outputs),
                    "description": m.description, "parameters": params})
    return out


def base_info(spec: str = "smollm2-135m", *, reply_to: str | None = None) -> dict[str, Any]:
    """Architecture, size and fingerprint of a base model (fetched into the cache first); with `reply_to`, also its
    greedy chat reply to that prompt (loads the model)."""
    from .base import BaseModel, chat_reply

    bm = BaseModel(spec)
    info = bm.info()
    if reply_to is not None:
        info["prompt"], info["reply"] = reply_to, chat_reply(bm.load(), bm.tokenizer(), reply_to)
    return info


def train_expert(pool: Pool | str, name: str, tasks: str | Iterable[str], *, kind: str = "lora",
                 device: str = "cpu", replace: bool = False, tags: dict[str, str] | None = None,
                 **config: Any) -> Expert:
    """Train a LoRA (`kind="lora"`) or full fine-tune (`kind="full"`) expert on `tasks` and add it to the pool.
    `config`: the training options (`r`, `alpha`, `targets`, `steps`, `lr`, `batch_size`, `seed`, ...), checked
    before any model loads. Also `Pool.train`."""
    from pydantic import ValidationError

    from .eval.harness import resolve_tasks
    from .train import FullConfig, LoraConfigModel
    from .train import train_expert as _train

    if kind not in ("lora", "full"):
        raise WorkbenchError(f"invalid kind {kind!r}: lora or full")
    task_list = resolve_tasks([tasks] if isinstance(tasks, str) else list(tasks))
    cfg = {k: v for k, v in config.items() if v is not None}
    try:
        model = LoraConfigModel(**cfg) if kind == "lora" else FullConfig(**cfg)
    except ValidationError as e:
        err = e.errors()[0]
        raise WorkbenchError(f"invalid training option {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return _train(_pool(pool), name, task_list, model, device=device, replace=replace, tags=tags)


# ----------------------------------------------------------------------------- building


@dataclass
class BuildPlan:
    """A recipe validated and resolved against its pool: nothing built yet. `build(plan)` builds it."""

    resolved: ResolvedRecipe
    run_sweep: bool = True

    @property
    def name(self) -> str:
        """The recipe's name (names its artifact's records and results)."""
        return self.resolved.recipe.name

    @property
    def method(self) -> str:
        """The registered method it builds with."""
        return self.resolved.recipe.method

    @property
    def artifact_dir(self) -> Path:
        """Where the artifact is (or will be) in the cache: `<method>-<key>`."""
        return self.resolved.artifact_dir

    @property
    def eval(self) -> dict[str, Any]:
        """The recipe's evaluation settings: tasks, batch_size, limit."""
        return self.resolved.recipe.eval.model_dump(mode="json")

    def describe(self) -> dict[str, Any]:
        """The plan as JSON-able data: recipe, method, pool, experts, output, parameters, artifact folder, sweep."""
        from .recipes import sweep_points

        r = self.resolved
        sweep = r.recipe.sweep if self.run_sweep else None
        return {"recipe": r.recipe.name, "method": r.recipe.method, "pool": r.pool.name,
                "experts": [e.name for e in r.experts], "output": r.recipe.output.model_dump(),
                "params": r.params.model_dump(mode="json", by_alias=True), "artifact": str(r.artifact_dir),
                "eval": r.recipe.eval.model_dump(mode="json"), "sweep": sweep_points(sweep) if sweep else None}


@dataclass
class Artifact:
    """A built combination (merged model or LoRA, Twin, routed composition, MoE...) in the artifact cache."""

    path: Path
    name: str
    method: str
    key: str
    pool: str
    pool_root: Path | None = None  # the pool it was built over here (the cache is shared: meta names the first)
    selection: dict[str, Any] | None = None  # the sweep's chosen point and its validation score
    recipe: dict[str, Any] | None = None  # the recipe it was built from, as results record it (pools by name)

    @property
    def meta(self) -> dict[str, Any]:
        """The artifact's record (artifact.json): method, parameters, experts, build time, reports."""
        from .artifacts import read_artifact_meta

        return read_artifact_meta(self.path)

    def load(self, device: str | None = None) -> tuple[Any, Any]:
        """(model, tokenizer) for plain transformers/PEFT use; see `load`."""
        return load(self, device=device)


def plan(pool_or_recipe: Pool | PathLike | dict | None = None, method: str | None = None, *,
         experts: Iterable[str] | None = None, output: str | dict | None = None, name: str | None = None,
         sweep: bool = True, limit: int | None = None, **params: Any) -> BuildPlan:
    """Validate a build without running it: either a recipe (a YAML path or a mapping, as in `merges/`) or a
    method over a pool: `plan(pool, "ties", experts=[...], density=0.5, output="lora")`. `limit` caps the
    validation sweep's and the evaluation's examples per task; `sweep=False` drops the recipe's sweep (its own
    parameters are built). Raises a one-line `RecipeError` on any problem."""
    from .pool import Pool
    from .recipes import _load_yaml, parse_recipe

    if method is not None and str(method).endswith((".yaml", ".yml")):  # build(pool, "merges/x.yaml")
        pool_or_recipe, method, override_pool = method, None, pool_or_recipe
    else:
        override_pool = None
    if method is None:
        if pool_or_recipe is None or isinstance(pool_or_recipe, Pool):
            raise RecipeError("give a method name (build(pool, 'ties', ...)) or a recipe (a YAML path or a mapping)")
        if isinstance(pool_or_recipe, dict):
            doc, source = dict(pool_or_recipe), "<recipe>"
        else:
            path = Path(pool_or_recipe)
            if path.suffix not in (".yaml", ".yml"):
                raise RecipeError(f"{path}: a recipe is a .yaml file (or give a method: build(pool, 'ties'))")
            doc, source = _load_yaml(path), str(path)
            if not isinstance(doc, dict):
                raise RecipeError(f"recipe {source}: expected a mapping at the top level")
        if override_pool is not None:
            doc["pool"] = _pool_ref(override_pool) if isinstance(override_pool, Pool) else str(override_pool)
        if params or experts is not None or output is not None or name is not None:
            raise RecipeError("with a recipe, change its parameters in the recipe (only sweep= and limit= apply)")
    else:
        if pool_or_recipe is None:
            raise RecipeError(f"method {method!r} needs a pool: build(pool, {method!r}, ...)")
        p = pool_or_recipe if isinstance(pool_or_recipe, Pool) else Pool.open(pool_or_recipe)
        out = {"kind": output} if isinstance(output, str) else dict(output or {})
        doc = {"name": name or f"{p.name}-{method.replace('_', '-')}", "method": method, "pool": _pool_ref(p),
               "parameters": params, "output": out or {"kind": "model"}}
        if experts is not None:
            doc["experts"] = _expert_list(experts)
        source = f"<{method}>"
    if limit is not None:
        _check_limit(limit, RecipeError)
        doc["eval"] = {**(doc.get("eval") or {}), "limit": limit}
        if isinstance(doc.get("sweep"), dict) and sweep:
            doc["sweep"] = {**doc["sweep"], "limit": limit}
            # another limit is another experiment: its sweep record goes beside the recipe's own, never over it
            # (the name is not part of the artifact key: builds are still shared)
            if isinstance(doc.get("name"), str):
                doc["name"] = f"{doc['name']}@limit{limit}"
    if not sweep:
        doc.pop("sweep", None)
    return BuildPlan(parse_recipe(doc, source), run_sweep=sweep)


def build(pool_or_recipe: Pool | PathLike | dict | BuildPlan | None = None, method: str | None = None, *,
          experts: Iterable[str] | None = None, output: str | dict | None = None, name: str | None = None,
          sweep: bool = True, limit: int | None = None, force: bool = False, device: str = "cpu",
          results_dir: PathLike | None = None, log: Log | None = None, **params: Any) -> Artifact:
    """Build a combination and return its `Artifact` (cached by a hash of its inputs: an unchanged build is reused).

    `build(pool, "ties", experts=["a", "b"], density=0.5, output="lora")`, `build("merges/ties-lora.yaml")` or
    `build(plan(...))`. A recipe's validation sweep runs first (scores under `results_dir`/sweeps) unless
    `sweep=False`."""
    from .recipes import _recorded_recipe, run_sweep
    from .recipes import build as _build

    log = _log(log)
    if isinstance(pool_or_recipe, BuildPlan) and (method is not None or params or experts is not None
                                                  or output is not None or name is not None or limit is not None
                                                  or not sweep):
        raise RecipeError("build(plan) takes the plan as it is: give method, experts, parameters, sweep and limit "
                          "to plan(...)")
    bp = pool_or_recipe if isinstance(pool_or_recipe, BuildPlan) else plan(
        pool_or_recipe, method, experts=experts, output=output, name=name, sweep=sweep, limit=limit, **params)
    resolved, selection = bp.resolved, None
    if bp.run_sweep and resolved.recipe.sweep:
        resolved, selection = run_sweep(resolved, device=device, force=force, results_dir=_results(results_dir),
                                        log=log)
    path = _build(resolved, force=force, device=device, log=log)
    return Artifact(path=path, name=resolved.recipe.name, method=resolved.recipe.method, key=resolved.key,
                    pool=resolved.pool.name, pool_root=resolved.pool.root, selection=selection, recipe=_recorded_recipe(resolved))


def load(model: Artifact | PathLike, *, pool: Pool | str | None = None, device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for plain transformers/PEFT use: an `Artifact` or artifact folder, `"base"` or an
    expert's name (with `pool`), a PEFT adapter folder (with `pool`) or a model folder."""
    from .eval.harness import load_model_spec

    if isinstance(model, Artifact):
        from .artifacts import load_artifact

        loaded = load_artifact(model.path, device=device)
    else:
        if pool is None and str(model) == "base":
            raise WorkbenchError("load('base') needs pool=... (the pool's base), or give a base model folder")
        loaded = load_model_spec(str(model), _pool(pool) if pool is not None else None, device)
    return loaded.model, loaded.tokenizer


# ----------------------------------------------------------------------------- evaluating


@dataclass
class Results:
    """One lm-eval run: its scores per task and metric, and the run manifest written under results/."""

    manifest: dict[str, Any]

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        """task -> metric -> value (lm-eval's aggregate)."""
        return self.manifest["scores"]

    @property
    def model(self) -> str:
        """The model's name in the results (`<pool>__<model>`)."""
        return self.manifest["model_name"]

    def to_pandas(self) -> pd.DataFrame:
        """One row per (task, metric): model, task, metric, value."""
        import pandas as pd

        return pd.DataFrame([{"model": self.model, "task": t, "metric": k, "value": v}
                             for t, ms in self.scores.items() for k, v in ms.items()])

    def __repr__(self) -> str:
        return f"Results({self.model}: {self.scores})"


def evaluate(model: Artifact | PathLike, tasks: str | Iterable[str] = ("held_in",), *, pool: Pool | str | None = None,
             limit: int | None = None, batch_size: int = 16, split: str = "test", device: str = "cpu",
             results_dir: PathLike | None = None, lm_eval_dir: PathLike | None = None) -> Results:
    """Evaluate a model with lm-eval on `tasks` (task names or groups: held_in, held_out, domains, all); results,
    per-example samples and a run manifest land in `results_dir`/lm-eval/. `model`: an `Artifact`, `"base"` or an
    expert's name (with `pool`), or a model, adapter or artifact folder. `lm_eval_dir` puts lm-eval's outputs in
    another folder than `results_dir`/lm-eval."""
    from .eval import run_eval
    from .methods.base import MAX_BATCH

    if limit is not None:
        _check_limit(limit, WorkbenchError)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= MAX_BATCH:
        raise WorkbenchError(f"batch_size = {batch_size!r}: an integer in 1..{MAX_BATCH}")
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    out = Path(lm_eval_dir) if lm_eval_dir is not None else _results(results_dir) / "lm-eval"
    if isinstance(model, Artifact):
        from .artifacts import artifact_ref, load_artifact

        # the pool it was built over here (the artifact's record names the pool of its first build, which may be in
        # another checkout, or gone), opened before any model loads
        meta = model.meta  # artifact.json, read once
        p = _pool(pool if pool is not None else model.pool_root or meta["pool"])
        loaded = load_artifact(model.path, device=device)
        loaded.name = model.name
        loaded.info.update(method=model.method, artifact=artifact_ref(model.path))
        m = run_eval(artifact_ref(model.path), task_list, pool=p, limit=limit, batch_size=batch_size, split=split,
                     device=device, results_dir=out, loaded=loaded,
                     extra={"params": meta.get("params", {}), "artifact_key": model.key,
                            "selected_on_validation": model.selection,
                            **({"recipe": model.recipe} if model.recipe else {})})
    else:
        m = run_eval(str(model), task_list, pool=_pool(pool) if pool is not None else None, limit=limit,
                     batch_size=batch_size, split=split, device=device, results_dir=out)
    return Results(m)


def eval_matrix(pool: Pool | str, tasks: str | Iterable[str] = ("all",), *, models: Iterable[str] | None = None,
                batch_size: int = 16, device: str = "cpu", force: bool = False, log: Log | None = None) -> list[Results]:
    """The base and every expert (or `models`) on every task; models with complete results are skipped."""
    from .jobs import eval_matrix as _matrix

    p = _pool(pool)
    return [Results(m) for m in _matrix(str(p.root), [tasks] if isinstance(tasks, str) else list(tasks),
                                        models=list(models) if models else None, batch_size=batch_size,
                                        device=device, force=force, log=_log(log))]


def eval_determinism(pool: Pool | str, model: str = "addition", tasks: str | Iterable[str] = (
        "addition", "sorting", "word_count"), *, limit: int = 50, device: str = "cpu",
        log: Log | None = None) -> dict[str, Any]:
    """One model evaluated twice at batch 16 and once at batch 1: scores and generations must agree. Returns (and
    writes under results/checks/) the record."""
    from .eval.determinism import eval_determinism as _det

    return _det(str(_pool(pool).root), model, [tasks] if isinstance(tasks, str) else list(tasks), limit=limit,
                device=device, log=_log(log))


def results_table(pool: str | None = None, results_dir: PathLike | None = None, *, csv: PathLike | None = None,
                  markdown: PathLike | None = None, plot: PathLike | None = None) -> pd.DataFrame:
    """Every loose lm-eval run (`workbench eval`, `merge --eval`) under results/lm-eval as a method x task table
    (exact match %; domain columns: word perplexity), the latest run per model. Written also as CSV, Markdown or a
    heatmap (.svg/.png/.html) where asked. Comparisons have their own leaderboards: `leaderboards`."""
    from .eval.results import SHORT
    from .eval.results import results_table as _table
    from .io import atomic_write_text

    root = _results(results_dir)
    df = _table(root / "lm-eval" if (root / "lm-eval").is_dir() else root, pool)
    df.attrs["short"] = dict(SHORT)
    if df.empty:
        return df
    if csv:
        atomic_write_text(Path(csv), df.to_csv(index=False))
    if markdown:
        md = df.rename(columns=SHORT).drop(columns=["method"])
        md = md.astype(object).where(md.notna(), None)  # tabulate's missingval replaces None, not NaN
        atomic_write_text(Path(markdown), md.to_markdown(index=False, floatfmt=".1f", missingval="–") + "\n")
    if plot:
        from .eval.results import results_chart
        from .tracing import save_chart

        save_chart(results_chart(df, f"{pool or 'all pools'}: exact match % (test split)"), Path(plot))
    return df


# ----------------------------------------------------------------------------- comparing


class Leaderboard:
    """A comparison's leaderboard: every row on the same examples, per-task scores with standard errors, group
    means, and a paired test of each row against the reference (`paired` tests any two rows)."""

    def __init__(self, board: dict[str, Any], cells: dict[tuple[str, str], dict[str, Any]] | None = None,
                 folder: Path | None = None, progress: Progress | None = None):
        self.board = board
        self.cells = cells or {}
        self.folder = folder
        self.progress = progress

    name = property(lambda self: self.board["name"], doc="The comparison's name.")
    reference = property(lambda self: self.board["reference"], doc="The row every other row is paired against.")
    tasks = property(lambda self: list(self.board["tasks"]), doc="The comparison's tasks, in order.")
    rows = property(lambda self: [r["name"] for r in self.board["rows"]], doc="Row names, best held-in first.")
    complete = property(lambda self: bool(self.board.get("complete", True)), doc="Every planned cell is recorded.")

    @property
    def reused(self) -> int:
        """Cells (builds and evaluations) already recorded when this run started: reused, not recomputed."""
        return self.progress.reused if self.progress else 0

    @classmethod
    def read(cls, recipe: PathLike | dict, results_dir: PathLike | None = None) -> Leaderboard:
        """The leaderboard of a comparison recipe from its recorded cells whose keys match the plan: nothing is run or
        written. Rows without cells are listed without scores."""
        from .comparison import parse_comparison
        from .jobs import collect_cells, leaderboard_of, make_plan

        p = make_plan(parse_comparison(recipe, log=lambda *a: None), _results(results_dir))
        cells = collect_cells(p)
        return cls(leaderboard_of(p, cells), cells, p.out)

    def to_pandas(self) -> pd.DataFrame:
        """One row per model: held-in/held-out means and se (%), normalized %, the paired test against the
        reference, then each task's score and se."""
        from .eval.leaderboard import leaderboard_frame

        return leaderboard_frame(self.board)

    def summary(self) -> pd.DataFrame:
        """The short view the CLI prints: model, method, the groups present, normalized %, Δ and p vs the reference
        (ns: p >= 0.05), and each task's score; strings ready to show."""
        import pandas as pd

        from .eval.leaderboard import short

        groups = [g for g in ("held_in", "held_out") if any(g in r["summary"] for r in self.board["rows"])]
        has_norm = any("normalized" in r["summary"] for r in self.board["rows"])
        out = []
        for r in self.board["rows"]:
            rec = {"model": r["name"], "method": r["method"]}
            for g in groups:
                d = r["summary"].get(g)
                rec[f"{g.replace('_', '-')} %"] = "–" if not d else (
                    f"{100 * d['mean']:.1f} ± {100 * d['stderr']:.1f}" if not math.isnan(d["stderr"])
                    else f"{100 * d['mean']:.1f}")
            if has_norm:
                n = r["summary"].get("normalized")
                rec["norm %"] = f"{100 * n['mean']:.0f}" if n else "–"
            p = r["paired"]
            rec[f"Δ vs {self.reference}"] = f"{100 * p['diff']:+.1f}" if p else (
                "ref" if r["name"] == self.reference else "–")
            rec["p"] = (f"{p['p_value']:.2g}" + ("" if p["p_value"] < 0.05 else " ns")) if p else "–"
            for t in self.tasks:
                c = r["tasks"].get(t)
                rec[short(t)] = "–" if c is None else (f"{100 * c['mean']:.0f}" if c["metric"] == "exact_match"
                                                       else f"{c['mean']:.4g}")
            out.append(rec)
        return pd.DataFrame(out)

    def markdown(self) -> str:
        """The leaderboard as Markdown (what leaderboard.md holds)."""
        from .eval.leaderboard import leaderboard_markdown

        return leaderboard_markdown(self.board, self.name)

    def paired(self, a: str, b: str, tasks: Iterable[str] | None = None) -> dict[str, Any]:
        """Paired test of row `a` against row `b` over every example both scored (exact-match tasks; `tasks`
        narrows them): n, diff (a − b, fraction), p_value, test, and the examples only a or only b got right."""
        from .eval import stats

        for r in (a, b):
            if r not in self.rows:
                from .errors import did_you_mean

                raise WorkbenchError(f"no row {r!r} in {self.name}{did_you_mean(r, self.rows)}")
        if a == b:
            raise WorkbenchError(f"paired test of {a!r} against itself: pick two rows")
        if not self.cells:  # a board read from leaderboard.json alone: its own tests against the reference only
            row = next(r for r in self.board["rows"] if r["name"] == a)
            if b == self.reference and row.get("paired") and tasks is None:
                p = row["paired"]
                return {"a": a, "b": b, "n": p["n"], "diff": p["diff"], "p_value": p["p_value"], "test": p["test"],
                        "a_only": p.get("row_only"), "b_only": p.get("reference_only")}
            raise WorkbenchError(f"{self.name}: this leaderboard was read without its cells; "
                                 "Leaderboard.read(recipe) has them for any pair")
        from .eval.leaderboard import paired_values

        xs, ys = [], []
        for t in tasks or self.tasks:
            ca, cb = self.cells.get((a, t)), self.cells.get((b, t))
            if not ca or not cb or ca["metric"] != "exact_match" or cb["metric"] != "exact_match":
                continue
            x, y = paired_values(ca, cb)
            xs += x
            ys += y
        if not xs:
            raise WorkbenchError(f"rows {a!r} and {b!r} share no scored example")
        res = stats.compare(xs, ys)
        return {"a": a, "b": b, "n": res["n"], "diff": res["diff"], "p_value": res["p_value"], "test": res["test"],
                "a_only": res.get("a_only"), "b_only": res.get("b_only")}

    def __repr__(self) -> str:
        return f"Leaderboard({self.name}: {len(self.rows)} rows x {len(self.tasks)} tasks, reference {self.reference})"


def leaderboards(pool: str | None = None, results_dir: PathLike | None = None) -> list[Leaderboard]:
    """The leaderboards of the comparisons run under `results_dir`/compare/ (of `pool` only, when given), by name.
    A leaderboard file that cannot be read is skipped (see `Leaderboard.read` to rebuild one from its cells)."""
    import json

    out = []
    folder = _results(results_dir) / "compare"
    for f in sorted(folder.glob("*/leaderboard.json")) if folder.is_dir() else []:
        try:
            if f.stat().st_size > 64 << 20:
                continue
            board = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(board, dict) or not isinstance(board.get("rows"), list) or "name" not in board:
            continue
        if pool is None or board.get("pool") == pool:
            out.append(Leaderboard(board, None, f.parent))
    return out


def describe_comparison(recipe: PathLike | dict, *, results_dir: PathLike | None = None, device: str = "cpu",
                        log: Log | None = None) -> list[str]:
    """The plan of a comparison as lines (what `compare --dry-run` prints): each build and cell, done or to run.
    Warnings found while validating (a skipped reference row, ...) go to `log`."""
    from .comparison import parse_comparison
    from .jobs import describe, make_plan

    return describe(make_plan(parse_comparison(recipe, log=_log(log)), _results(results_dir), device))


def compare(recipe: PathLike | dict, *, results_dir: PathLike | None = None, executor: str = "local",
            device: str = "cpu", address: str | None = None, cpus: float = 1, gpus: float = 0,
            progress: bool | Callable[[Progress], None] = True, log: Log | None = None) -> Leaderboard:
    """Run a comparison (a YAML path or a mapping, as in `merges/demo.yaml`): build each artifact once, evaluate
    every (row, task) cell not recorded yet, and write the leaderboard (md, csv, json, svg) under
    `results_dir`/compare/<name>/. Resumable: a rerun skips finished cells. `progress=True` draws a bar weighted by
    each cell's expected time, with an ETA."""
    from .comparison import parse_comparison
    from .jobs import collect_cells, make_plan, run_comparison

    from contextlib import nullcontext

    log = _log(log)
    comparison = parse_comparison(recipe, log=log)  # every check before any work
    p = make_plan(comparison, _results(results_dir), device)
    bar = ProgressBar(f"compare {comparison.spec.name}") if progress and not callable(progress) else None
    show = progress if callable(progress) else bar
    last: list[Progress] = []

    def on_progress(state: Progress) -> None:
        last[:] = [state]
        if show:
            show(state)

    with bar or nullcontext():
        board = run_comparison(comparison, results_dir=p.results_dir, executor=executor, device=device,
                               address=address, cpus=cpus, gpus=gpus, log=bar.log if bar and log is print else log,
                               progress=on_progress)
    return Leaderboard(board, collect_cells(p), p.out, last[0] if last else None)


class ProgressBar:
    """A rich progress bar on stderr for a comparison's `Progress`: weighted by expected seconds, with the cells
    done, the ETA, the cell running and each finished cell's score above the bar."""

    def __init__(self, description: str):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                             TextColumn("{task.fields[cells]}"), TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
                             TextColumn("{task.fields[current]}"), console=Console(stderr=True), refresh_per_second=2)
        self._description = description
        self._printed = 0
        self._task = None

    def __enter__(self) -> ProgressBar:
        self._bar.__enter__()
        self._task = self._bar.add_task(self._description, total=None, cells="", eta="", current="")
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def log(self, msg: Any) -> None:
        """Print a line above the bar."""
        self._bar.console.print(str(msg), highlight=False)

    def __call__(self, state: Progress) -> None:
        for event in state.events[self._printed:]:
            self._bar.console.print(f"  {event}", highlight=False)
        self._printed = len(state.events)
        eta = state.eta_s
        eta_text = f"ETA {_duration(eta)}" if eta is not None else (
            f"~{_duration(state.cost_total)} expected" if state.cost_total else "")
        # nothing to compute (every cell recorded): a full bar, not an empty one
        total, done = (state.cost_total, state.cost_done) if state.cost_total > 0 else (1.0, 1.0)
        self._bar.update(self._task, total=total, completed=done,
                         cells=f"{state.done}/{state.total} cells" + (f" ({state.reused} recorded)" if state.reused
                                                                       else ""),
                         eta=eta_text, current=state.current if state.done < state.total else "")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def merge_count_curve(recipe: PathLike | dict, *, results_dir: PathLike | None = None) -> dict[str, Any]:
    """Score against the number of merged experts from a comparison's cells (writes curve.json and curve.svg beside
    its leaderboard). Run the comparison first."""
    from .comparison import parse_comparison
    from .jobs import make_plan
    from .jobs import merge_count_curve as _curve

    p = make_plan(parse_comparison(recipe, log=lambda *a: None), _results(results_dir))
    curve = _curve(p)
    if not curve["points"]:
        raise WorkbenchError(f"no finished rows in {p.out}: run the comparison first")
    return curve | {"folder": str(p.out)}


# ----------------------------------------------------------------------------- the demo, serving, benchmarks


def run_demo(*, full: bool = False, retrain: bool = False, executor: str = "local", device: str = "cpu",
             progress: bool | Callable[[Progress], None] = True, log: Log | None = None) -> Leaderboard:
    """The main job on the embedded default: SmolLM2-135M and the shipped demo pool through `merges/demo.yaml`.
    `full=True` trains what the pool lacks (`retrain=True`: every expert) and runs `merges/demo-full.yaml`."""
    from .base import BaseModel
    from .demo import DEMO_COMPARISON, DEMO_FULL_COMPARISON, build_demo_pool, missing_shipped, ship_half, ship_parts
    from .io import atomic_write_json

    log = _log(log)
    bm = BaseModel("smollm2-135m")
    log(f"base: {bm.info()['title']}")
    if full:
        pool = build_demo_pool(device=device, force=retrain, changed=True, log=log)
        atomic_write_json(_results(None) / "checks" / "demo-pool-half.json", ship_half(pool, log=log))
    elif missing := missing_shipped():
        raise WorkbenchError(f"the shipped demo experts are missing ({', '.join(missing)}): restore adapters/demo from "
                             "git, or run `workbench demo --full` to train them")
    board = compare(DEMO_FULL_COMPARISON if full else DEMO_COMPARISON, executor=executor, device=device,
                    progress=progress, log=log)
    if full:
        ship_parts(DEMO_COMPARISON, log=log)
    return board


def build_demo_pool(pool: str = "demo", *, base: str = "smollm2-135m", device: str = "cpu",
                    only: Iterable[str] | None = None, old: bool = False, log: Log | None = None) -> Pool:
    """Train the demo pool (one LoRA per held-in task, the multitask LoRA, the full fine-tunes); skips what exists.
    `old=True`: the first demo pool's LoRA experts (lr 2e-3, 120 steps) into `demo-old`."""
    from .demo import build_demo_pool as _build_pool
    from .demo import old_plan

    if old:
        return _build_pool("demo-old" if pool == "demo" else pool, base=base, device=device,
                           only=list(only) if only else None, log=_log(log), plans=old_plan())
    return _build_pool(pool, base=base, device=device, only=list(only) if only else None, log=_log(log))


def serve(pool: Pool | str = "demo", *, host: str = "127.0.0.1", port: int = 8000, backend: str | None = None,
          device: str = "cpu", max_batch: int = 32) -> None:
    """Serve the pool over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions):
    every adapter, mix and built composition of the pool, batched together. Blocks until stopped."""
    from .serving.api import serve as _serve

    if not isinstance(port, int) or not 0 < port < 65536:
        raise WorkbenchError(f"port = {port!r}: an integer in 1..65535")
    if not isinstance(max_batch, int) or not 1 <= max_batch <= 1024:
        raise WorkbenchError(f"max_batch = {max_batch!r}: an integer in 1..1024")
    _serve(str(_pool(pool).root), host=host, port=port, backend=backend, device=device, max_batch=max_batch)


BENCHMARKS = ("merge", "kernels", "kernels-profile", "routing", "serve", "app")


def benchmark(name: str, *, log: Log | None = None, **options: Any) -> dict[str, Any]:
    """Run one benchmark (`merge`, `kernels`, `kernels-profile`, `routing`, `serve`, `app`): each measures the
    workbench against its peer in the same run and writes its figures under results/bench/. `options` are the
    benchmark's own (see `workbench bench NAME --help`)."""
    import importlib

    from .errors import did_you_mean

    if name not in BENCHMARKS:
        raise WorkbenchError(f"unknown benchmark {name!r}{did_you_mean(name, BENCHMARKS)}; known: {', '.join(BENCHMARKS)}")
    log = _log(log)
    if name == "kernels":
        import torch

        from .kernels.multi_lora import backend_unavailable, check_backend

        backends = options.pop("backends", None) or [b for b in ("cpu", "grouped_mm") if backend_unavailable(b) is None]
        for b in backends:
            check_backend(b)  # one line naming the problem before any model is loaded
        dtype = options.pop("dtype", "float32")
        if dtype not in ("float32", "bfloat16"):
            raise WorkbenchError(f"invalid dtype {dtype!r}: float32 or bfloat16")
        return importlib.import_module(".bench.kernels", __package__).run(
            dtype=getattr(torch, dtype), backends=tuple(backends), log=log, **options)
    if name == "kernels-profile":
        return importlib.import_module(".bench.kernels", __package__).profile(log=log, **options)
    return importlib.import_module(f".bench.{name}", __package__).run(log=log, **options)


__all__ = ["Artifact", "BENCHMARKS", "BuildPlan", "Leaderboard", "ProgressBar", "Results", "base_info", "benchmark",
           "build", "build_demo_pool", "compare", "describe_comparison", "eval_determinism", "eval_matrix", "evaluate",
           "leaderboards", "list_methods", "list_pools", "load", "merge_count_curve", "plan", "results_table", "run_demo", "serve",
           "train_expert"]
