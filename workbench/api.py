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
import os
from collections.abc import Callable, Iterable, Sequence
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


def training_data(pool: Pool | str, tasks: str | Iterable[str] | None = None, data: str | Iterable[str] | None = None,
                  *, prompt_field: str | None = None, answer_field: str | None = None,
                  messages_field: str | None = None, text_field: str | None = None,
                  data_seed: int | None = None) -> list[tuple[Any, list[dict[str, Any]]]]:
    """(record, rows) per dataset: suite `tasks` (names or groups: `suite:<task>` data) and `data` specs (files,
    save_to_disk folders, hub ids; see `workbench.data`), read and checked before any model loads."""
    from .data import open_data, suite_spec
    from .eval.harness import resolve_tasks

    p = _pool(pool)
    specs = [suite_spec(t, data_seed) for t in resolve_tasks([tasks] if isinstance(tasks, str) else list(tasks or []))]
    specs += [data] if isinstance(data, str) else list(data or [])
    if not specs:
        raise WorkbenchError("no training data: give --data FILE (repeat it for a multitask expert) or --task NAME")
    tok = None
    if messages_field or any(not s.startswith("suite:") for s in specs):
        tok = p.base.tokenizer()  # a chat column is rendered by the base's chat template
    out = []
    for spec in specs:
        fields = {} if spec.startswith("suite:") else {"prompt_field": prompt_field, "answer_field": answer_field,
                                                       "messages_field": messages_field, "text_field": text_field}
        out.append(open_data(spec, tokenizer=tok, pool_root=p.root, **fields))
    names = [rec.name for rec, _ in out]
    if len(set(names)) < len(names):  # en/train.jsonl and fr/train.jsonl: named by their folders too
        out = [(rec.model_copy(update={"name": f"{Path(spec).parent.name}-{rec.name}"}) if names.count(rec.name) > 1
                and not spec.startswith("suite:") else rec, rows) for spec, (rec, rows) in zip(specs, out)]
    ids = [rec.identity for rec, _ in out]
    if len(set(ids)) < len(ids):
        raise WorkbenchError("a dataset is given twice (same content and fields): give each dataset once")
    names = [rec.name for rec, _ in out]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise WorkbenchError(f"two datasets are both named {dup!r}: rename one of the files")
    return out


def train_expert(pool: Pool | str, name: str, tasks: str | Iterable[str] | None = None, *,
                 data: str | Iterable[str] | None = None, prompt_field: str | None = None,
                 answer_field: str | None = None, messages_field: str | None = None, text_field: str | None = None,
                 kind: str = "lora", device: str = "cpu", replace: bool = False, tags: dict[str, str] | None = None,
                 **config: Any) -> Expert:
    """Train a LoRA (`kind="lora"`) or full fine-tune (`kind="full"`) expert and add it to the pool, with its data
    recorded in the manifest. Data: `data` (a file, folder or hub id, or several: a multitask expert; fields by
    `prompt_field`/`answer_field`, a chat column `messages_field`, or a text column `text_field`) and/or suite
    `tasks`. `config`: the training options (`r`, `alpha`, `targets`, `steps`, `lr`, `batch_size`, `seed`, ...).
    Everything is checked before any model loads. Also `Pool.train`."""
    from pydantic import ValidationError

    from .train import FullConfig, LoraConfigModel
    from .train import train_expert as _train

    if kind not in ("lora", "full"):
        raise WorkbenchError(f"invalid kind {kind!r}: lora or full")
    cfg = {k: v for k, v in config.items() if v is not None}
    try:
        model = LoraConfigModel(**cfg) if kind == "lora" else FullConfig(**cfg)
    except ValidationError as e:
        err = e.errors()[0]
        raise WorkbenchError(f"invalid training option {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    p = _pool(pool)
    if name in p and not replace:
        raise WorkbenchError(f"pool {p.name!r} already has an expert named {name!r} (use --replace)")
    sources = training_data(p, tasks, data, prompt_field=prompt_field, answer_field=answer_field,
                            messages_field=messages_field, text_field=text_field, data_seed=model.data_seed)
    return _train(p, name, sources, model, device=device, replace=replace, tags=tags)


ADAPTER_FILES = ["*.json", "*.safetensors", "*.txt", "*.md", "*.model", "*.jinja"]  # never pickles


def _expert_source(spec: str | os.PathLike) -> Path:
    """A local folder, or a hub id (org/name) downloaded into the cache where a network exists (safetensors and
    configs only)."""
    path = Path(spec).expanduser()
    text = str(spec)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        if not path.is_dir():
            raise WorkbenchError(f"expert source {text} is not a folder (a PEFT adapter or a model folder), nor a hub id")
        return path
    if any(os.environ.get(k) == "1" for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        raise WorkbenchError(f"expert source {text!r} is a hub id, and this machine is offline (HF_HUB_OFFLINE): "
                             "download it where a network exists and give the folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=ADAPTER_FILES))
    except Exception as e:  # noqa: BLE001 - network and hub errors: one line
        raise WorkbenchError(f"expert source {text!r}: cannot download it from the hub: "
                             f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None


def add_experts(pool: Pool | str, sources: str | os.PathLike | Iterable[str | os.PathLike], *,
                name: str | None = None, kind: str | None = None, link: bool = False,
                tags: dict[str, str] | None = None, notes: str = "", allow_distant: bool = False,
                data: str | Iterable[str] | None = None, prompt_field: str | None = None,
                answer_field: str | None = None, messages_field: str | None = None,
                text_field: str | None = None) -> list[Expert]:
    """Import experts (PEFT adapter or model folders, or hub ids where a network exists) into a pool in one go, each
    named by its folder (or `name`, for one source). `data`: the datasets one imported expert learned (recorded for
    the methods that learn from the experts' data). Every source, name and dataset is checked before the first is
    added: a bad one adds nothing."""
    from .pool import check_name

    p = _pool(pool)
    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not items:
        raise WorkbenchError("no expert folders given")
    if name is not None and len(items) > 1:
        raise WorkbenchError(f"--name names one expert; {len(items)} folders were given (each is named by its folder)")
    if data is not None and len(items) > 1:
        raise WorkbenchError(f"--data records one expert's data; {len(items)} folders were given: add them one at a "
                             "time, or attach data afterwards with `workbench pool data`")
    folders = [_expert_source(s) for s in items]
    names = [name] if name is not None else [Path(str(s).rstrip("/")).name if Path(s).expanduser().exists()
                                             else str(s).split("/")[-1] for s in items]
    for n in names:
        check_name(n)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise WorkbenchError(f"two folders are both named {dup[0]!r}: add one of them with --name")
    taken = [n for n in names if n in p]
    if taken:
        raise WorkbenchError(f"pool {p.name!r} already has an expert named {taken[0]!r}")
    for f in folders if len(folders) > 1 else []:  # all checked before the first is added (one: `add` checks it)
        k, _ = p.validate_source(f.resolve(), kind)
        p._check_base_identity(f.resolve(), k, f"expert source {f}", allow_distant)
    records = None
    if data is not None:
        records = [rec for rec, _ in training_data(p, None, data, prompt_field=prompt_field, answer_field=answer_field,
                                                   messages_field=messages_field, text_field=text_field)]
    if len(folders) == 1:  # `add` checks it and says what it measured
        return [p.add(folders[0], names[0], kind=kind, link=link, tags=tags, notes=notes, allow_distant=allow_distant,
                      data=records)]
    from .pool import AddItem

    # several: validated as `add` validates each, the manifest written once (a bad one adds nothing)
    return p.add_many([AddItem(f, n, kind=kind, link=link, tags=dict(tags or {}), notes=notes,
                               allow_distant=allow_distant, data=list(records or [])) for f, n in zip(folders, names)])


def synthesize_pool(pool: Pool | str, n: int, *, source: Pool | str | None = None, base: str | None = None,
                    seed: int = 0, ranks: Iterable[int] = (4, 8, 16), noise: float = 0.1, prefix: str = "synth",
                    log: Log | None = None) -> list[Expert]:
    """A benchmark tool, not experts: write `n` synthetic PEFT LoRA adapters into `pool` (created over `base`, else
    over the source pool's base, when missing), each a small random perturbation of one of `source`'s LoRA experts
    (random factors without one), ranks drawn from `ranks`, with one manifest write (`workbench.synth`)."""
    from .synth import synthesize

    return synthesize(pool, n, source=source, base=base, seed=seed, ranks=tuple(ranks), noise=noise, prefix=prefix,
                      log=_log(log))


def attach_data(pool: Pool | str, expert: str, data: str | Iterable[str], *, prompt_field: str | None = None,
                answer_field: str | None = None, messages_field: str | None = None,
                text_field: str | None = None) -> Expert:
    """Record the datasets an expert learned (an imported adapter's data, or a dataset that has since changed):
    the methods that learn from the experts' data read it, and their artifact keys change with it."""
    p = _pool(pool)
    p.expert(expert)
    sources = training_data(p, None, data, prompt_field=prompt_field, answer_field=answer_field,
                            messages_field=messages_field, text_field=text_field)
    return p.set_data(expert, [rec for rec, _ in sources])


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
             results_dir: PathLike | None = None, lm_eval_dir: PathLike | None = None,
             include_path: PathLike | Iterable[PathLike] | None = None, apply_chat_template: bool = False) -> Results:
    """Evaluate a model with lm-eval on `tasks`: the built-in suite's names or groups (held_in, held_out, domains,
    all), lm-eval's own task and group names (data in the local `datasets` cache), or tasks of the user's YAMLs in
    `include_path` folders. Results, per-example samples and a run manifest land in `results_dir`/lm-eval/.
    `model`: an `Artifact`, `"base"` or an expert's name (with `pool`), or a model, adapter or artifact folder.
    `lm_eval_dir` puts lm-eval's outputs in another folder than `results_dir`/lm-eval. `apply_chat_template`: prompts
    rendered by the tokenizer's chat template (for experts trained on a chat column)."""
    from .eval import run_eval
    from .eval.harness import resolve_tasks
    from .methods.base import MAX_BATCH

    if limit is not None:
        _check_limit(limit, WorkbenchError)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= MAX_BATCH:
        raise WorkbenchError(f"batch_size = {batch_size!r}: an integer in 1..{MAX_BATCH}")
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    includes = None if include_path is None else [include_path] if isinstance(include_path, (str, os.PathLike)) \
        else list(include_path)
    resolve_tasks(task_list, includes)  # every name checked (one line) before a model loads
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
                     device=device, results_dir=out, loaded=loaded, include_path=includes,
                     apply_chat_template=apply_chat_template,
                     extra={"params": meta.get("params", {}), "artifact_key": model.key,
                            "selected_on_validation": model.selection,
                            **({"recipe": model.recipe} if model.recipe else {})})
    else:
        m = run_eval(str(model), task_list, pool=_pool(pool) if pool is not None else None, limit=limit,
                     batch_size=batch_size, split=split, device=device, results_dir=out, include_path=includes,
                     apply_chat_template=apply_chat_template)
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
    """Every loose lm-eval run (`workbench eval`, `merge --eval`) under results/lm-eval as a method x task table, the
    latest run per model. Each task column is its primary metric as lm-eval reports it, in its direction: accuracy-like
    metrics (exact_match, acc, acc_norm ...) in %, every other metric as it is (a word perplexity, lower is better; a
    per-example f1). held_in_avg / held_out_avg and normalized average the accuracy-like, higher-is-better tasks only.

    `df.attrs`: "metrics" (task -> metric, higher_is_better, percent), "normalized_note" (the tasks the normalized
    score leaves out, when any), "short" (column -> short name) and "legend" (one line per metric and its direction,
    the averages, the note). Written also as CSV (the numbers), Markdown (percent columns to 0.1, other metrics to 4
    significant digits, arrows in the task headers, the legend below) or a heatmap of the percent columns
    (.svg/.png/.html) where asked. Comparisons have their own leaderboards: `leaderboards`."""
    from .eval.results import SHORT
    from .eval.results import results_table as _table
    from .io import atomic_write_text

    root = _results(results_dir)
    df = _table(root / "lm-eval" if (root / "lm-eval").is_dir() else root, pool)
    df.attrs["short"] = dict(SHORT)
    if df.empty:
        return df
    info = df.attrs.get("metrics") or {}
    df.attrs["legend"] = _runs_legend(info, df.attrs.get("normalized_note"), list(df.columns), SHORT)
    if csv:
        atomic_write_text(Path(csv), df.to_csv(index=False))
    if markdown:
        cols = [c for c in df.columns if c != "method"]
        md = df[cols].astype(object)
        for c in cols[1:]:
            pct = (info.get(c) or {"percent": True})["percent"]  # the averages and normalized are % too
            md[c] = [None if not isinstance(v, (int, float)) or math.isnan(v) else f"{v:.1f}" if pct else f"{v:.4g}"
                     for v in df[c]]
        md = md.rename(columns=lambda c: _runs_header(str(c), info, SHORT))
        text = md.to_markdown(index=False, missingval="–", disable_numparse=True,
                              colalign=["left"] + ["right"] * (len(cols) - 1))
        atomic_write_text(Path(markdown), text + "\n\n" + " ".join(df.attrs["legend"]) + "\n")
    if plot:
        from .eval.results import results_chart
        from .tracing import save_chart

        save_chart(results_chart(df, f"{pool or 'all pools'}: accuracy-like tasks, % ↑ (test split)"), Path(plot))
    return df


def _runs_header(column: str, info: dict[str, dict[str, Any]], short: dict[str, str]) -> str:
    """A results table column's header: the short name, and for a task its metric's direction (and the metric, when
    it is not a percentage)."""
    name = short.get(column, column)
    i = info.get(column)
    if not i:
        return name
    arrow = "↑" if i["higher_is_better"] else "↓"
    return f"{name} {arrow}" if i["percent"] else f"{name} {i['metric']} {arrow}"


def _runs_legend(info: dict[str, dict[str, Any]], note: str | None, columns: list[str],
                 short: dict[str, str]) -> list[str]:
    """What the loose-run table's numbers are, one sentence each, under the tables' short column names."""
    pct = sorted({i["metric"] for i in info.values() if i["percent"]})
    lines = [f"{', '.join(pct)} (accuracy-like): % of the examples ↑."] if pct else []
    other = [f"{short.get(t, t)}: {i['metric']} {'↑ higher' if i['higher_is_better'] else '↓ lower'} is better"
             for t, i in info.items() if not i["percent"]]
    if other:
        lines.append("As they are, not in %: " + "; ".join(other) + ".")
    if any(c in columns for c in ("held_in_avg", "held_out_avg")):
        lines.append("in avg, out avg* (* held-out): means over the accuracy-like, higher-is-better tasks only.")
    if "normalized" in columns:
        lines.append("norm: a row's mean over the accuracy-like tasks with their own expert / those experts' own "
                     "mean, %.")
    if note:
        lines.append(f"{note[:1].upper()}{note[1:]}.")
    return lines


# ----------------------------------------------------------------------------- comparing


class Leaderboard:
    """A comparison's leaderboard: every row on the same examples, each task's primary metric in its own units and
    direction (`task_metrics` of the board: accuracy-like metrics in %, perplexities and other metrics as they are)
    with standard errors, group means over the accuracy-like tasks, and a paired test of each row against the
    reference (`paired` tests any two rows, pooled over the accuracy-like tasks or on one task of any metric)."""

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
        """One row per model: the group means and se (%, accuracy-like tasks), normalized %, the paired test against
        the reference pooled over the accuracy-like tasks (`diff vs ref (pp)`: points, + = better), then per task its
        value (`<task> %` for accuracy-like metrics, else `<task> <metric>`, as it is), se, Δ (+ = better) and p."""
        from .eval.leaderboard import leaderboard_frame

        return leaderboard_frame(self.board)

    def task_metrics(self) -> dict[str, dict[str, Any]]:
        """Per task: its metric, higher_is_better, aggregate and kind (accuracy | continuous | corpus | none; see
        `workbench.eval.leaderboard`), also for a board written before the board recorded them."""
        from .eval.leaderboard import task_info

        return {t: task_info(self.board, t) for t in self.tasks}

    def legend(self) -> list[str]:
        """What the numbers are, one sentence each: each metric and its direction, the group means, the normalized
        score and the tasks it leaves out, the paired test, the ranking."""
        from .eval.leaderboard import legend

        return legend(self.board)

    def summary(self) -> pd.DataFrame:
        """The short view the CLI prints, strings ready to show: model, method, the groups present (% ± se over their
        accuracy-like tasks), normalized %, Δ (points, + = better) and p of the paired test against the reference
        pooled over the accuracy-like tasks (ns: p >= 0.05), then each task's score under its short name and its
        metric's direction (↑ higher is better, ↓ lower): accuracy-like metrics in % (no decimals), every other
        metric as it is (4 significant digits; a perplexity is a perplexity), marked with its own metric when a row
        is scored otherwise than the task."""
        import pandas as pd

        from .eval.leaderboard import arrow, format_gain, short

        rows = self.board["rows"]
        groups = [g for g in ("held_in", "held_out", "other") if any(g in r["summary"] for r in rows)]
        has_norm = any("normalized" in r["summary"] for r in rows)
        info = self.task_metrics()
        out = []
        for r in rows:
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
            rec[f"Δ vs {self.reference}"] = format_gain(p.get("gain", p["diff"]), "accuracy") if p else (
                "ref" if r["name"] == self.reference else "–")
            rec["p"] = (f"{p['p_value']:.2g}" + ("" if p["p_value"] < 0.05 else " ns")) if p else "–"
            for t in self.tasks:
                i, c = info[t], r["tasks"].get(t)
                rec[f"{short(t)} {arrow(i['higher_is_better'])}"] = "–" if c is None else _summary_score(c, i)
            out.append(rec)
        return pd.DataFrame(out)

    def markdown(self) -> str:
        """The leaderboard as Markdown (what leaderboard.md holds)."""
        from .eval.leaderboard import leaderboard_markdown

        return leaderboard_markdown(self.board, self.name)

    def paired(self, a: str, b: str, tasks: Iterable[str] | None = None, *, task: str | None = None) -> dict[str, Any]:
        """Paired test of row `a` against row `b` on every example both scored.

        Without `task`: pooled over the accuracy-like, higher-is-better tasks (0/1 per example: exact_match, acc,
        acc_norm ...; `tasks` narrows them), the exact McNemar test: a, b, n, mean_a, mean_b, diff (a − b, a
        fraction: 0.05 = 5 points), gain (the same: + = a better), p_value, test, a_only / b_only (the examples only a,
        resp. only b got right), kind "accuracy" and the `tasks` pooled. Tasks of other metrics (perplexities,
        per-example f1 ...) are never pooled with them: test them one at a time.

        With `task=`: that task alone, by its metric (`leaderboard.pair_cells`): McNemar for accuracy-like metrics, a
        paired bootstrap over examples for other per-example metrics, a sign-flip test over documents for
        perplexity-like ones (their corpus aggregates; exact up to 16 documents). a, b, task, n, mean_a, mean_b (the metric on the shared examples: a perplexity for a
        perplexity task), diff (a − b in the metric's units), gain (+ = a better, whatever the direction), p_value,
        test, metric, higher_is_better, kind (and a_only / b_only for McNemar)."""
        for r in (a, b):
            if r not in self.rows:
                from .errors import did_you_mean

                raise WorkbenchError(f"no row {r!r} in {self.name}{did_you_mean(r, self.rows)}")
        if a == b:
            raise WorkbenchError(f"paired test of {a!r} against itself: pick two rows")
        if task is not None and tasks is not None:
            raise WorkbenchError("give tasks= (pooled over accuracy-like tasks) or task= (one task), not both")
        if task is not None and task not in self.tasks:
            from .errors import did_you_mean

            raise WorkbenchError(f"no task {task!r} in {self.name}{did_you_mean(task, self.tasks)}")
        info = self.task_metrics()
        if not self.cells:  # a board read from leaderboard.json alone: its own tests against the reference only
            return self._recorded_pair(a, b, tasks, task, info)
        if task is not None:
            return self._task_pair(a, b, task, info[task])
        return self._pooled_pair(a, b, list(tasks) if tasks is not None else self.tasks, info)

    def _recorded_pair(self, a: str, b: str, tasks: Iterable[str] | None, task: str | None,
                       info: dict[str, dict[str, Any]]) -> dict[str, Any]:
        row = next(r for r in self.board["rows"] if r["name"] == a)
        if b == self.reference and tasks is None:
            p = row.get("paired") if task is None else (row["tasks"].get(task) or {}).get("paired")
            if p:
                out = {"a": a, "b": b, "n": p["n"], "diff": p["diff"], "gain": p.get("gain", p["diff"]),
                       "p_value": p["p_value"], "test": p["test"], "a_only": p.get("row_only"),
                       "b_only": p.get("reference_only")}
                if task is None:
                    return out | {"kind": "accuracy"} | ({"tasks": list(p["tasks"])} if p.get("tasks") else {})
                i = info[task]
                return {"task": task, **out, "metric": i["metric"], "higher_is_better": i["higher_is_better"],
                        "kind": i["kind"]}
            if task is not None and info[task]["kind"] == "none":
                raise WorkbenchError(f"{task}: no paired test: lm-eval gives no per-example values for "
                                     f"{info[task]['metric']}, the score only")
        what = "any pair" if task is None else f"any pair on {task}"
        raise WorkbenchError(f"{self.name}: this leaderboard was read without its cells and records no such test; "
                             f"Leaderboard.read(recipe) has them for {what}")

    def _task_pair(self, a: str, b: str, task: str, info: dict[str, Any]) -> dict[str, Any]:
        from .eval.leaderboard import pair_cells

        ca, cb = self.cells.get((a, task)), self.cells.get((b, task))
        if not ca or not cb:
            raise WorkbenchError(f"{task}: {'row ' + repr(a) if not ca else 'row ' + repr(b)} has no recorded cell")
        try:
            got = pair_cells(ca, cb)
        except (TypeError, ValueError, AttributeError) as e:
            raise WorkbenchError(f"{task}: a cell of {a!r} or {b!r} cannot be read ({type(e).__name__})") from None
        if got is None:
            from .eval.metrics import view

            notes = [v.note for v in (view(ca), view(cb)) if v.note]
            why = (f"{ca.get('metric')} vs {cb.get('metric')}: different metrics"
                   if ca.get("metric") != cb.get("metric") else notes[0] if notes else
                   f"{info['metric']}: no per-example values on both sides, the score only")
            raise WorkbenchError(f"{task}: no paired test of {a!r} and {b!r}: {why}")
        if not got["n"]:
            raise WorkbenchError(f"rows {a!r} and {b!r} share no scored example of {task}")
        mean_a, mean_b = got.pop("a"), got.pop("b")
        return {"a": a, "b": b, "task": task, "n": got.pop("n"), "mean_a": mean_a, "mean_b": mean_b, **got}

    def _pooled_pair(self, a: str, b: str, tasks: list[str], info: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from .eval import stats
        from .eval.leaderboard import paired_values

        xs, ys, pooled, other = [], [], [], []
        for t in tasks:
            ca, cb = self.cells.get((a, t)), self.cells.get((b, t))
            if not ca or not cb:
                continue
            i = info.get(t) or {"kind": None}
            if not (i["kind"] == "accuracy" and i["higher_is_better"] and ca.get("metric") == i["metric"]
                    and cb.get("metric") == i["metric"]):
                other.append(t)
                continue
            x, y = paired_values(ca, cb)
            if x:
                xs += x
                ys += y
                pooled.append(t)
        if not xs:
            hint = (f"; their other tasks ({', '.join(other)}) are not accuracy-like: test one with task=..."
                    if other else "")
            raise WorkbenchError(f"rows {a!r} and {b!r} share no scored example of an accuracy-like task{hint}")
        res = stats.compare(xs, ys)
        return {"a": a, "b": b, "n": res["n"], "mean_a": res["mean_a"], "mean_b": res["mean_b"], "diff": res["diff"],
                "gain": res["diff"], "p_value": res["p_value"], "test": res["test"], "a_only": res.get("a_only"),
                "b_only": res.get("b_only"), "kind": "accuracy", "tasks": pooled}

    def __repr__(self) -> str:
        return f"Leaderboard({self.name}: {len(self.rows)} rows x {len(self.tasks)} tasks, reference {self.reference})"


def _summary_score(cell: dict[str, Any], info: dict[str, Any]) -> str:
    """A task's score in `Leaderboard.summary`: % for accuracy-like metrics, else as it is; a row scored with another
    metric than the task's says which."""
    mean = cell.get("mean")
    if not isinstance(mean, (int, float)) or isinstance(mean, bool) or math.isnan(mean):
        return "–"
    kind = cell.get("kind") or info["kind"]
    text = f"{100 * mean:.0f}" if kind == "accuracy" else f"{mean:.4g}"
    return text if cell.get("metric", info["metric"]) == info["metric"] else f"{text} ({cell['metric']})"


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
    from contextlib import nullcontext

    from .comparison import parse_comparison
    from .jobs import collect_cells, make_plan, run_comparison

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
    from .demo import (
        DEMO_COMPARISON,
        DEMO_FULL_COMPARISON,
        SHIPPED,
        build_demo_pool,
        missing_shipped,
        ship_half,
        ship_parts,
    )
    from .io import atomic_write_json

    log = _log(log)
    bm = BaseModel("smollm2-135m")
    log(f"base: {bm.info()['title']}")
    if full:
        pool = build_demo_pool(device=device, force=retrain, changed=True, log=log)
        atomic_write_json(_results(None) / "checks" / "demo-pool-half.json",
                          ship_half(pool, names=list(SHIPPED), log=log))
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
          device: str = "cpu", max_batch: int = 32, max_body_mb: float = 4.0, allow_runtime_lora: bool = False,
          max_loaded_adapters: int | None = None, recipes: Sequence[str] = (),
          max_registered_adapters: int | None = None, max_composition_parts: int | None = None) -> None:
    """Serve the pool over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions):
    every adapter, mix and built composition of the pool, batched together (continuous batching). Request bodies
    over `max_body_mb` MB get a 413. `recipes` (recipe files or names under merges/, or "all") are built first when
    not cached; `max_loaded_adapters` caps the adapters resident in kernel slots (least recently used evicted);
    `allow_runtime_lora` enables POST /v1/load_lora_adapter and /v1/unload_lora_adapter. Blocks until stopped.
    Every argument is checked by the server (one-line errors)."""
    from .serving.api import serve as _serve

    _serve(str(_pool(pool).root), host=host, port=port, backend=backend, device=device, max_batch=max_batch,
           max_body_mb=max_body_mb, allow_runtime_lora=allow_runtime_lora, max_loaded_adapters=max_loaded_adapters,
           recipes=tuple(recipes), max_registered_adapters=max_registered_adapters,
           max_composition_parts=max_composition_parts)


BENCHMARKS = ("merge", "kernels", "kernels-profile", "routing", "serve", "app", "scale")


def benchmark(name: str, *, log: Log | None = None, **options: Any) -> dict[str, Any]:
    """Run one benchmark (`merge`, `kernels`, `kernels-profile`, `routing`, `serve`, `app`, `scale`): each measures the
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


__all__ = [
    "BENCHMARKS",
    "Artifact",
    "BuildPlan",
    "Leaderboard",
    "ProgressBar",
    "Results",
    "add_experts",
    "attach_data",
    "base_info",
    "benchmark",
    "build",
    "build_demo_pool",
    "compare",
    "describe_comparison",
    "eval_determinism",
    "eval_matrix",
    "evaluate",
    "leaderboards",
    "list_methods",
    "list_pools",
    "load",
    "merge_count_curve",
    "plan",
    "results_table",
    "run_demo",
    "serve",
    "synthesize_pool",
    "train_expert",
    "training_data",
]
