"""`workbench` command line. User errors print one line and exit with code 2."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import WorkbenchError
from .io import atomic_write_json, atomic_write_text

app = typer.Typer(help="Expert Workbench: pools of experts, combined, evaluated and served.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
base_app = typer.Typer(help="Base models: fetch into the cache, show info.", no_args_is_help=True)
pool_app = typer.Typer(help="Expert pools under adapters/: create, add, list, show, remove, verify.",
                       no_args_is_help=True)
train_app = typer.Typer(help="Train experts into a pool: lora, full, multitask.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate models with lm-eval (offline) into results/.", invoke_without_command=True)
results_app = typer.Typer(help="Read results/: tables.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks against peers measured in the same run (figures in results/bench/).",
                        no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(pool_app, name="pool")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.add_typer(results_app, name="results")
route_app = typer.Typer(help="Routed compositions (PHATGOOSE, Arrow, ...): per-token routing traces.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(route_app, name="route")

console = Console()
err_console = Console(stderr=True)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def _parse_tags(tags: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in tags or []:
        if "=" not in t:
            raise WorkbenchError(f"invalid --tag {t!r}: expected key=value, e.g. task=addition")
        k, v = t.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# ----------------------------------------------------------------------------- base


@base_app.command("fetch")
def base_fetch(spec: Annotated[str, typer.Argument(help="alias, local folder or hub id")] = "smollm2-135m"):
    """Resolve a base model into the cache (the default is dequantised from its GGUF once)."""
    from .base import BaseModel

    with console.status(f"fetching {spec} ..."):
        bm = BaseModel(spec)
    console.print(f"[green]ok[/] {spec} -> {bm.path}")


@base_app.command("info")
def base_info(
    spec: Annotated[str, typer.Argument(help="alias, local folder or hub id")] = "smollm2-135m",
    prompt: Annotated[str, typer.Option(help="chat prompt for a greedy sample reply")] = "What is the capital of France?",
    reply: Annotated[bool, typer.Option(help="load the model and show a greedy reply")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
):
    """Architecture, size and fingerprint of a base model, and a greedy chat reply."""
    from .base import BaseModel, chat_reply

    bm = BaseModel(spec)
    info = bm.info()
    if reply:
        model, tok = bm.load(), bm.tokenizer()
        info["prompt"], info["reply"] = prompt, chat_reply(model, tok, prompt)
    if as_json:
        console.print_json(json.dumps(info))
        return
    table = Table(title=f"base model {spec}", show_header=False)
    for k, v in info.items():
        table.add_row(k, _fmt_params(v) if k == "parameters" else str(v))
    console.print(table)


# ----------------------------------------------------------------------------- pool


@pool_app.command("create")
def pool_create(
    pool: Annotated[str, typer.Argument(help="pool name (under adapters/) or path")],
    base: Annotated[str, typer.Option(help="base model alias, folder or hub id")] = "smollm2-135m",
):
    """Create an empty pool over a base model."""
    from .pool import Pool

    p = Pool.create(pool, base=base)
    console.print(f"[green]created[/] pool {p.name} at {p.root} (base {base}, {p.manifest.base.fingerprint})")


@pool_app.command("add")
def pool_add(
    pool: Annotated[str, typer.Argument(help="pool name or path")],
    source: Annotated[Path, typer.Argument(help="PEFT adapter folder or full model folder")],
    name: Annotated[Optional[str], typer.Option(help="expert name (default: the folder's name)")] = None,
    kind: Annotated[Optional[str], typer.Option(help="lora | full (default: detected)")] = None,
    link: Annotated[bool, typer.Option("--link", help="reference the folder in place instead of copying")] = False,
    tag: Annotated[Optional[list[str]], typer.Option(help="key=value, repeatable (task=..., domain=...)")] = None,
    notes: Annotated[str, typer.Option(help="free-form notes")] = "",
    allow_distant_base: Annotated[bool, typer.Option(
        "--allow-distant-base", help="add an expert that looks trained on another base (distance, adapter's base)"
    )] = False,
):
    """Validate an expert against the pool's base and add it."""
    from .pool import Pool

    if kind not in (None, "lora", "full"):
        raise WorkbenchError(f"invalid --kind {kind!r}: use lora or full")
    p = Pool.open(pool)
    with console.status(f"validating and adding {source} ..."):
        e = p.add(source, name or source.resolve().name, kind=kind, link=link, tags=_parse_tags(tag), notes=notes,
                  allow_distant=allow_distant_base)
    console.print(f"[green]added[/] {e.kind} expert {e.name} to pool {p.name}")


@pool_app.command("list")
def pool_list(pool: Annotated[Optional[str], typer.Argument(help="a pool: list its experts")] = None):
    """List the pools under adapters/, or the experts of one pool."""
    from .pool import MANIFEST, Pool, pools_dir

    if pool is None:
        table = Table("pool", "base", "experts", "lora", "full", "missing files")  # experts whose files are gone
        for m in sorted(pools_dir().glob(f"*/{MANIFEST}")):
            p = Pool.open(m.parent)
            missing = sum(not e.files_present() for e in p.experts)
            table.add_row(p.name, p.manifest.base.spec, str(len(p.names())), str(len(p.names("lora"))),
                          str(len(p.names("full"))), str(missing) if missing else "-")
        console.print(table)
        return
    p = Pool.open(pool)
    table = Table("expert", "kind", "rank", "tags", "linked", "status",
                  title=f"pool {p.name} (base {p.manifest.base.spec})")
    for x in p.experts:
        e = x.entry
        table.add_row(e.name, e.kind, str(e.lora.r) if e.lora else "-",
                      ", ".join(f"{k}={v}" for k, v in e.tags.items()), "yes" if e.linked else "",
                      "ok" if x.files_present() else "missing files")
    console.print(table)


@pool_app.command("show")
def pool_show(
    pool: Annotated[str, typer.Argument(help="pool name or path")],
    expert: Annotated[Optional[str], typer.Argument(help="one expert: show its entry")] = None,
):
    """Show a pool's manifest, or one expert's entry (tags, training metadata, files), with each expert's status."""
    from .pool import Pool

    p = Pool.open(pool)
    if expert:
        e = p.expert(expert)
        data = {**e.entry.model_dump(mode="json"), "status": e.status()}
    else:
        data = p.manifest.model_dump(mode="json")
        data["experts"] = [{**d, "status": e.status()} for d, e in zip(data["experts"], p.experts)]
    if isinstance(data.get("training"), dict) and "loss_curve" in data["training"]:
        curve = data["training"]["loss_curve"]
        data["training"]["loss_curve"] = f"{len(curve)} points, {curve[0]:.3f} -> {curve[-1]:.3f}" if curve else []
    console.print_json(json.dumps(data))


@pool_app.command("remove")
def pool_remove(pool: Annotated[str, typer.Argument()], expert: Annotated[str, typer.Argument()]):
    """Remove an expert (and its copied files) from a pool."""
    from .pool import Pool

    p = Pool.open(pool)
    p.remove(expert)
    console.print(f"[green]removed[/] {expert} from pool {p.name}")


@pool_app.command("verify")
def pool_verify(
    pool: Annotated[str, typer.Argument()],
    hashes: Annotated[bool, typer.Option(help="check the files' sha256 too")] = True,
):
    """Re-validate every expert: files, hashes, shapes, LoRA targets, finite values."""
    from .pool import Pool

    p = Pool.open(pool)
    with console.status(f"verifying {len(p.names())} experts ..."):
        problems = p.verify(hashes=hashes)
    if problems:
        for line in problems:
            err_console.print(f"[red]problem[/] {line}")
        raise typer.Exit(1)
    console.print(f"[green]ok[/] pool {p.name}: {len(p.names())} experts verified")


@pool_app.command("build-demo")
def pool_build_demo(
    pool: Annotated[str, typer.Option(help="pool name or path")] = "demo",
    base: Annotated[str, typer.Option(help="base model")] = "smollm2-135m",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    only: Annotated[Optional[list[str]], typer.Option(help="build only these experts (repeatable)")] = None,
    old: Annotated[bool, typer.Option("--old", help="the first demo pool's LoRA experts instead (lr 2e-3, 120 steps: "
                                                    "large task vectors), into pool demo-old by default")] = False,
):
    """Train the demo pool (one LoRA per held-in task, multitask LoRA, full fine-tunes); skips what exists."""
    from .demo import build_demo_pool, old_plan

    if old:
        build_demo_pool("demo-old" if pool == "demo" else pool, base=base, device=device, only=only,
                        log=console.print, plans=old_plan())
        return
    build_demo_pool(pool, base=base, device=device, only=only, log=console.print)


# ----------------------------------------------------------------------------- train


def _split_list(values: list[str] | None) -> list[str]:
    return [x for v in values or [] for x in v.split(",") if x]


def _train(kind: str, pool: str, tasks: list[str], name: Optional[str], device: str, replace: bool, **cfg):
    from .pool import Pool
    from .tasks.suite import get_task
    from .train import FullConfig, LoraConfigModel, train_expert

    for t in tasks:
        get_task(t)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    if "targets" in cfg:
        cfg["targets"] = _split_list(cfg["targets"])
    try:
        config = LoraConfigModel(**cfg) if kind == "lora" else FullConfig(**cfg)
    except Exception as e:  # pydantic: name the field
        raise WorkbenchError(f"invalid training option: {str(e).splitlines()[1:3]}") from None
    p = Pool.open(pool)
    e = train_expert(p, name or (tasks[0] if len(tasks) == 1 else "multitask"), tasks, config, device=device,
                     replace=replace)
    m = e.entry.training
    console.print(f"[green]trained[/] {e.kind} expert {e.name}: {m['steps']} steps, final loss {m['final_loss']:.4f}, "
                  f"{m['wall_s']:.0f}s, {m['tokens_per_s']:.0f} tokens/s")


_Pool = Annotated[str, typer.Option(help="pool name or path")]
_Dev = Annotated[str, typer.Option(help="cpu or cuda")]


@train_app.command("lora")
def train_lora(
    pool: _Pool, task: Annotated[str, typer.Option(help="task to train on")],
    name: Annotated[Optional[str], typer.Option(help="expert name (default: the task)")] = None,
    r: Optional[int] = None, alpha: Optional[float] = None,
    targets: Annotated[Optional[list[str]], typer.Option(help="target modules, comma-separated")] = None,
    steps: Optional[int] = None, lr: Optional[float] = None,
    batch_size: Optional[int] = None, seed: Optional[int] = None, device: _Dev = "cpu",
    replace: Annotated[bool, typer.Option(help="replace an expert of that name")] = False,
):
    """Train a PEFT LoRA expert on one task (loss on answer tokens only) into the pool."""
    _train("lora", pool, [task], name, device, replace, r=r, alpha=alpha, targets=targets, steps=steps, lr=lr,
           batch_size=batch_size, seed=seed)


@train_app.command("full")
def train_full(
    pool: _Pool, task: Annotated[str, typer.Option(help="task to train on")],
    name: Annotated[Optional[str], typer.Option(help="expert name (default: full-<task>)")] = None,
    steps: Optional[int] = None, lr: Optional[float] = None, batch_size: Optional[int] = None,
    seed: Optional[int] = None, device: _Dev = "cpu", replace: bool = False,
):
    """Full fine-tune expert (every weight) on one task, saved into the pool as a model folder."""
    _train("full", pool, [task], name or f"full-{task}", device, replace, steps=steps, lr=lr,
           batch_size=batch_size, seed=seed)


@train_app.command("multitask")
def train_multitask(
    pool: _Pool,
    tasks: Annotated[str, typer.Option(help="comma-separated tasks, or held_in")] = "held_in",
    name: str = "multitask", r: Optional[int] = None, alpha: Optional[float] = None,
    steps: Optional[int] = None, lr: Optional[float] = None, batch_size: Optional[int] = None,
    seed: Optional[int] = None, device: _Dev = "cpu", replace: bool = False,
):
    """One LoRA on the union of tasks: the reference every combination is compared with."""
    from .eval.harness import resolve_tasks

    _train("lora", pool, resolve_tasks(_split_list([tasks])), name, device, replace, r=r, alpha=alpha,
           steps=steps, lr=lr, batch_size=batch_size, seed=seed)


# ----------------------------------------------------------------------------- eval and results

_Tasks = Annotated[str, typer.Option(help="comma-separated tasks, or held_in, held_out, skills, domains, all")]


def _print_manifest(m: dict) -> None:
    table = Table("task", "metric", "value", title=f"{m['model_name']} ({m['timings']['eval_s']:.0f}s)")
    for task, metrics in m["scores"].items():
        for k, v in metrics.items():
            table.add_row(task, k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)


@eval_app.callback()
def eval_model(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option(help="base, an expert of --pool, or a model/adapter/artifact folder")] = None,
    pool: Annotated[Optional[str], typer.Option(help="pool name or path")] = None,
    tasks: _Tasks = "all", limit: Annotated[Optional[int], typer.Option(help="examples per task")] = None,
    batch_size: int = 16, device: _Dev = "cpu",
    out: Annotated[Optional[Path], typer.Option(help="lm-eval output folder")] = None,
):
    """Evaluate one model: `workbench eval --model SPEC --pool P --tasks ...`."""
    if ctx.invoked_subcommand is not None:
        return
    if model is None:
        raise WorkbenchError("give --model (base, an expert name, or a folder); see workbench eval --help")
    from .eval import run_eval
    from .pool import Pool

    p = Pool.open(pool) if pool else None
    m = run_eval(model, _split_list([tasks]), pool=p, limit=limit, batch_size=batch_size, device=device, out_dir=out)
    _print_manifest(m)


@eval_app.command("matrix")
def eval_matrix(
    pool: _Pool = "demo", tasks: _Tasks = "all", batch_size: int = 16, device: _Dev = "cpu",
    models: Annotated[Optional[str], typer.Option(help="comma-separated (default: base + every expert)")] = None,
    force: Annotated[bool, typer.Option(help="re-run models that already have full results")] = False,
):
    """Every expert (and the base) on every task; models with complete results are skipped."""
    from .jobs import eval_matrix as run_matrix

    for m in run_matrix(pool, _split_list([tasks]), models=_split_list([models]) if models else None,
                        batch_size=batch_size, device=device, force=force, log=console.print):
        _print_manifest(m)
    results_show(pool=pool)


@eval_app.command("determinism")
def eval_determinism(
    pool: _Pool = "demo", model: str = "addition", tasks: _Tasks = "addition,sorting,word_count",
    limit: int = 50, device: _Dev = "cpu",
):
    """Same model evaluated twice (batch 16) and at batch 1: scores and generations must agree."""
    from .eval.harness import evaluate, load_model_spec, resolve_tasks, results_root, scores_of
    from .io import atomic_write_json
    from .pool import Pool

    p = Pool.open(pool)
    task_list = resolve_tasks(_split_list([tasks]))
    loaded = load_model_spec(model, p, device)
    runs = {}
    for label, bs in [("bs16_a", 16), ("bs16_b", 16), ("bs1", 1)]:
        res = evaluate(loaded, task_list, limit=limit, batch_size=bs)
        gens = {t: [s["filtered_resps"][0] for s in sorted(res["samples"][t], key=lambda s: s["doc_id"])]
                for t in res["samples"]}
        runs[label] = {"scores": scores_of(res), "generations": gens}
        console.print(f"{label}: {runs[label]['scores']}")
    same = runs["bs16_a"] == runs["bs16_b"]
    bs_agree = runs["bs16_a"]["scores"] == runs["bs1"]["scores"]
    gen_diff = sum(a != b for t in runs["bs1"]["generations"]
                   for a, b in zip(runs["bs16_a"]["generations"][t], runs["bs1"]["generations"][t]))
    record = {"pool": pool, "model": model, "tasks": task_list, "limit": limit, "repeat_identical": same,
              "batch1_vs_16_scores_equal": bs_agree, "batch1_vs_16_generation_differences": gen_diff,
              "scores": {k: v["scores"] for k, v in runs.items()}}
    atomic_write_json(results_root() / "checks" / f"eval-determinism-{pool}-{model}.json", record)
    console.print(f"repeat identical: {same}; batch 1 vs 16 scores equal: {bs_agree}; differing generations: {gen_diff}")
    if not (same and bs_agree):
        raise typer.Exit(1)


@results_app.command("table")
def results_show(
    pool: Annotated[Optional[str], typer.Option(help="only runs of this pool")] = None,
    results_dir: Annotated[Optional[Path], typer.Option(help="results folder")] = None,
    csv: Annotated[Optional[Path], typer.Option(help="also write the table as CSV")] = None,
    markdown: Annotated[Optional[Path], typer.Option(help="also write the table as Markdown")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="also draw it as a heatmap (.svg, .png or .html)")] = None,
):
    """Method x task table from results/ (exact match %; domain columns: word perplexity)."""
    from .eval.harness import results_root
    from .eval.results import results_table

    root = results_dir or results_root()
    df = results_table(root / "lm-eval" if (root / "lm-eval").is_dir() else root, pool)
    if df.empty:
        console.print("no results yet")
        return
    from .eval.results import SHORT as short

    table = Table(*[short.get(str(c), str(c)) for c in df.columns if c != "method"],
                  title="exact match % (* held-out; ppl: word perplexity; norm: held-in avg / experts' own avg)")
    for row in df.drop(columns=["method"]).itertuples(index=False):
        table.add_row(*["–" if isinstance(v, float) and math.isnan(v) else f"{v:.1f}" if isinstance(v, float) else str(v) for v in row])
    Console(width=max(console.width, 160)).print(table)
    if csv:
        atomic_write_text(csv, df.to_csv(index=False))
    if markdown:
        md = df.rename(columns=short).drop(columns=["method"])
        md = md.astype(object).where(md.notna(), None)  # tabulate's missingval replaces None, not NaN
        atomic_write_text(markdown, md.to_markdown(index=False, floatfmt=".1f", missingval="–") + "\n")
    if plot:
        from .eval.results import results_chart

        plot.parent.mkdir(parents=True, exist_ok=True)
        tmp = plot.with_name(f".{plot.stem}.partial{plot.suffix}")
        results_chart(df, f"{pool or 'all pools'}: exact match % (test split)").save(str(tmp))
        tmp.replace(plot)
        console.print(f"plot: {plot}")


@results_app.command("curve")
def results_curve(
    recipe: Annotated[Path, typer.Argument(help="the comparison, e.g. merges/merge-count.yaml (run it first)")],
    results: Annotated[Optional[Path], typer.Option(help="results folder")] = None,
):
    """Score vs number of merged experts from a comparison's cells (curve.json + curve.svg beside its leaderboard)."""
    from .compare import parse_comparison
    from .jobs import make_plan, merge_count_curve

    plan = make_plan(parse_comparison(recipe), results)
    curve = merge_count_curve(plan)
    if not curve["points"]:
        raise WorkbenchError(f"no finished rows in {plan.out}: run `workbench compare {recipe}` first")
    table = Table("method", "experts", "mean %", "se", title=f"{curve['name']}: mean over the merged experts' tasks")
    for p in curve["points"]:
        table.add_row(p["method"], str(p["experts"]), f"{100 * p['mean']:.1f}", f"{100 * p['stderr']:.1f}")
    console.print(table)
    console.print(f"curve: {plan.out / 'curve.svg'}")


@app.command("merge")
def merge(
    recipes: Annotated[list[Path], typer.Argument(help="recipe YAML files, e.g. merges/ties-lora.yaml")],
    eval_: Annotated[bool, typer.Option("--eval", help="evaluate the artifact with the recipe's eval settings")] = False,
    force: Annotated[bool, typer.Option(help="rebuild even if the artifact exists")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and show the plan, build nothing")] = False,
    device: _Dev = "cpu",
):
    """Build a recipe's artifact (merged model or LoRA, Twin, ...) and optionally evaluate it."""
    from .recipes import parse_recipe, run_recipe, sweep_points

    resolved_all = [parse_recipe(r) for r in recipes]  # every recipe validated before any work
    if dry_run:
        for resolved in resolved_all:
            console.print_json(json.dumps({
                "recipe": resolved.recipe.name, "method": resolved.recipe.method, "pool": resolved.pool.name,
                "experts": [e.name for e in resolved.experts], "output": resolved.recipe.output.model_dump(),
                "params": resolved.params.model_dump(mode="json", by_alias=True), "artifact": str(resolved.artifact_dir),
                "sweep": sweep_points(resolved.recipe.sweep) if resolved.recipe.sweep else None,
            }))
        return
    for i, recipe in enumerate(recipes, 1):
        console.rule(f"[{i}/{len(recipes)}] {recipe}")
        out = run_recipe(recipe, evaluate=eval_, force=force, device=device, log=console.print)
        console.print(f"[green]artifact[/] {out['artifact_dir']}")
        if out.get("selection"):
            console.print(f"selected on validation: {out['selection']['best']} "
                          f"(score {out['selection']['validation_score']:.4f})")
        if "eval" in out:
            _print_manifest(out["eval"])


@route_app.command("trace")
def route_trace(
    recipe: Annotated[Path, typer.Argument(help="a routed recipe, e.g. merges/phatgoose.yaml (built if needed)")],
    prompt: Annotated[str, typer.Argument(help="the prompt to trace")],
    out: Annotated[Optional[Path], typer.Option(help="write the trace JSON here (e.g. results/traces/x.json)")] = None,
    device: _Dev = "cpu",
):
    """Which experts each token chose at each layer, with what weight (per-layer usage + per-token choices)."""
    from .artifacts import load_artifact
    from .methods.routing import trace_prompt
    from .recipes import build, parse_recipe

    resolved = parse_recipe(recipe)
    loaded = load_artifact(build(resolved, device=device, log=console.print), device=device)
    tr = {"recipe": resolved.recipe.name, "pool": resolved.pool.name,
          **trace_prompt(loaded.model, loaded.tokenizer, prompt)}
    table = Table("layer", *tr["experts"], title=f"{tr['recipe']}: mean expert weight per layer over {len(tr['tokens'])} tokens")
    for layer, usage in zip(tr["layers"], tr["usage"]):
        top = max(usage)
        table.add_row(str(layer), *(f"[bold]{u:.2f}[/]" if u == top else f"{u:.2f}" for u in usage))
    console.print(table)
    if out is not None:
        from .io import atomic_write_json

        atomic_write_json(out, tr)
        console.print(f"trace: {out}")


@route_app.command("traces")
def route_traces(
    recipe: Annotated[Path, typer.Argument(help="a routed recipe, e.g. merges/phatgoose-lora.yaml (built if needed)")],
    out: Annotated[Optional[Path], typer.Option(help="folder for the traces (default results/traces)")] = None,
    split: Annotated[str, typer.Option(help="split the prompts come from")] = "test",
    device: _Dev = "cpu",
):
    """One prompt per routed expert's task: in how many layers does that task's expert get the most weight?"""
    from .artifacts import load_artifact
    from .eval.harness import results_root
    from .io import atomic_write_json
    from .methods.routing import task_traces
    from .recipes import build, parse_recipe

    resolved = parse_recipe(recipe)
    loaded = load_artifact(build(resolved, device=device, log=console.print), device=device)
    tasks = {e.name: (e.entry.tags or {}).get("task") for e in resolved.experts}
    tasks = {e: t for e, t in tasks.items() if t and t != "multitask"}
    if not tasks:
        raise WorkbenchError(f"{recipe}: no routed expert names its task (tag task=...)")
    rec = task_traces(loaded.model, loaded.tokenizer, tasks, split=split)
    folder = out or results_root() / "traces"
    for task, r in rec["tasks"].items():
        atomic_write_json(folder / f"{resolved.recipe.name}-{task}.json",
                          {"recipe": resolved.recipe.name, "pool": resolved.pool.name, "task": task, **r["trace"]})
    summary = {"recipe": resolved.recipe.name, "pool": resolved.pool.name, "split": split,
               "tasks": {t: {k: v for k, v in r.items() if k != "trace"} for t, r in rec["tasks"].items()},
               "summary": rec["summary"]}
    atomic_write_json(folder.parent / "checks" / f"routing-traces-{resolved.recipe.name}.json", summary)
    table = Table("task", "expert", "layers where it tops", "mean weight", title=f"{resolved.recipe.name}: one prompt per task")
    for t, r in rec["tasks"].items():
        table.add_row(t, r["expert"], f"{r['top_layers']}/{r['layers']}", f"{r['mean_weight']:.2f}")
    console.print(table)
    console.print(f"traces: {folder}; summary: {folder.parent / 'checks'}")


def _save_chart(chart, path: Path) -> None:
    """An altair chart to `path` (format from its suffix), atomically: a temp sibling renamed over it."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    chart.save(str(tmp))
    tmp.replace(path)


@route_app.command("accuracy")
def route_accuracy(
    recipe: Annotated[Path, typer.Argument(help="a routed recipe, e.g. merges/phatgoose-lora.yaml (built if needed)")],
    n: Annotated[int, typer.Option(min=1, help="examples per task")] = 20,
    split: Annotated[str, typer.Option(help="split the examples come from")] = "validation",
    out: Annotated[Optional[Path], typer.Option(help="folder for the JSON and plots (default results/checks)")] = None,
    device: _Dev = "cpu",
):
    """Router accuracy per layer: how often each task's tokens go to its own expert (top-1 and within top-k);
    with PHATGOOSE also the gates' training-loss curves. JSON + SVG under results/checks/."""
    from .artifacts import load_artifact, read_artifact_meta
    from .eval.charts import loss_curves_chart, router_accuracy_chart
    from .eval.harness import results_root
    from .io import atomic_write_json
    from .methods.routing import check_one_expert_per_task, router_accuracy
    from .recipes import build, parse_recipe

    resolved = parse_recipe(recipe)
    tasks = {e.name: (e.entry.tags or {}).get("task") for e in resolved.experts}
    tasks = {e: t for e, t in tasks.items() if t and t != "multitask"}
    if not tasks:
        raise WorkbenchError(f"{recipe}: no routed expert names its task (tag task=...)")
    check_one_expert_per_task(tasks)  # before any build (PHATGOOSE trains gates)
    art = build(resolved, device=device, log=console.print)
    loaded = load_artifact(art, device=device)
    rec = router_accuracy(loaded.model, loaded.tokenizer, tasks, split=split, n=n)
    name = resolved.recipe.name
    folder = out or results_root() / "checks"
    atomic_write_json(folder / f"router-accuracy-{name}.json", {"recipe": name, "pool": resolved.pool.name,
                                                                "params": resolved.params.model_dump(mode="json", by_alias=True),
                                                                **rec})
    _save_chart(router_accuracy_chart(rec, f"{name}: share of each task's tokens routed (top-1) to its own expert, "
                                           f"{split}, {n} examples"), folder / f"router-accuracy-{name}.svg")
    table = Table("task", "expert", "top-1 = own (mean over layers)", "own in top-k", "layers > 50 %",
                  title=f"{name}: router accuracy, {split}, {n} examples per task")
    for t, r in rec["tasks"].items():
        table.add_row(t, r["expert"], f"{r['mean_top1']:.2f}", f"{r['mean_in_topk']:.2f}",
                      f"{sum(1 for x in r['top1'] if x > 0.5)}/{len(r['top1'])}")
    console.print(table)
    curves = read_artifact_meta(art).get("gate_loss_curves")
    if curves:
        atomic_write_json(folder / f"gate-loss-{name}.json", {"recipe": name, "curves": curves})
        _save_chart(loss_curves_chart(curves, f"{name}: gate training loss per expert (base and LoRA frozen)"),
                    folder / f"gate-loss-{name}.svg")
    console.print(f"written: {folder}/router-accuracy-{name}.json (+ .svg)" + (", gate-loss plot" if curves else ""))


@app.command("methods")
def methods_list():
    """List the registered combination methods."""
    from .methods import METHODS

    table = Table("method", "experts", "outputs", "description")
    for name in METHODS:
        m = METHODS.get(name)
        table.add_row(name, "/".join(sorted(m.expert_kinds)), "/".join(sorted(m.outputs)), m.description)
    console.print(table)


@bench_app.command("merge")
def bench_merge(
    pool: _Pool = "demo", density: float = 0.2,
    lora_repeats: Annotated[int, typer.Option(help="runs of each side of the (short) LoRA comparison")] = 3,
    out: Annotated[Optional[Path], typer.Option(help="JSON output (default results/bench/merge.json)")] = None,
):
    """TIES/PCB of 4 full experts vs mergekit-yaml; LoRA-space merge vs mergekit's base+lora path."""
    from .bench.merge import run

    rec = run(pool, density=density, lora_repeats=lora_repeats, out_file=out, log=console.print)
    table = Table("measure", "ratio", "target", title="bench merge (ours / mergekit, same run)")
    for k, v in rec["ratios"].items():
        table.add_row(k, f"{v:.3f}", rec["targets"][k])
    console.print(table)


@app.command("serve")
def serve_cmd(
    pool: _Pool = "demo", host: str = "127.0.0.1", port: int = 8000,
    backend: Annotated[Optional[str], typer.Option(help="kernel backend (default: by device)")] = None,
    device: _Dev = "cpu", max_batch: int = 32,
):
    """OpenAI-compatible server: /v1/models, /v1/completions, /v1/chat/completions (streaming too)."""
    from .serve.api import serve

    serve(pool, host=host, port=port, backend=backend, device=device, max_batch=max_batch)


@bench_app.command("kernels")
def bench_kernels(
    base: str = "smollm2-135m", reps: int = 3, device: _Dev = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    backends: Annotated[str, typer.Option(help="comma-separated kernel backends (default: cpu and grouped_mm "
                                                "where this torch has it)")] = "",
):
    """Multi-LoRA forward / base forward, vs PEFT mixed batch and per-adapter loop (same run)."""
    import torch

    from .bench.kernels import run
    from .kernels.multi_lora import backend_unavailable, check_backend

    chosen = _split_list([backends]) if backends else \
        [b for b in ("cpu", "grouped_mm") if backend_unavailable(b) is None]
    for b in chosen:
        check_backend(b)  # one line naming the problem before any model is loaded
    rec = run(base, reps=reps, device=device, dtype=getattr(torch, dtype), backends=tuple(chosen), log=console.print)
    cols = [k for k in rec["rows"][0] if k.endswith("_x_base")]
    table = Table("r", "U", *cols, title=f"forward time / base forward ({rec['device']}, {rec['dtype']})")
    for row in rec["rows"]:
        table.add_row(str(row["rank"]), str(row["U"]), *[f"{row[c]:.3f}" for c in cols])
    console.print(table)


@bench_app.command("routing")
def bench_routing(
    base: str = "smollm2-135m", experts: int = 6, rank: int = 8, k: int = 2, reps: int = 3,
    new_tokens: Annotated[int, typer.Option(help="greedy tokens per sequence in the decode timing")] = 16,
    smora_rank: Annotated[int, typer.Option(help="SMoRA's total rank R (rank experts)")] = 64,
    smora_k: Annotated[int, typer.Option(help="SMoRA's ranks per token")] = 8,
):
    """Per-token routing (PHATGOOSE's router, top-k of E experts), MoLE and SMoRA vs base, one LoRA, PEFT mixed,
    dense mixture."""
    from .bench.routing import run

    rec = run(base, experts=experts, rank=rank, k=k, reps=reps, new_tokens=new_tokens, log=console.print,
              smora_rank=smora_rank, smora_k=smora_k)
    table = Table("phase", *rec["forward"]["x_base"], title=f"time / base ({experts} experts, r {rank}, top-{k}; CPU)")
    for phase in ("forward", "decode"):
        table.add_row(phase, *[f"{v:.3f}" for v in rec[phase]["x_base"].values()])
    console.print(table)


@bench_app.command("kernels-profile")
def bench_kernels_profile(base: str = "smollm2-135m", rank: int = 8, adapters: int = 32):
    """Per-projection cost of the LoRA pieces (gather, shrink, expand) beside the base GEMM, CPU."""
    from .bench.kernels import profile

    rec = profile(base, rank=rank, n_adapters=adapters, log=lambda *a: None)
    table = Table("projection", "d_in x d_out", "base ms", "gather ms", "shrink ms", "expand ms", "shrink GB/s",
                  "expand GB/s", "lora/base", title=f"one layer, {rec['tokens']} tokens, r={rank}, {adapters} adapters")
    for r in rec["rows"]:
        table.add_row(r["projection"], f"{r['d_in']}x{r['d_out']}", f"{r['base_ms']:.2f}", f"{r['gather_ms']:.3f}",
                      f"{r['shrink_ms']:.3f}", f"{r['expand_ms']:.3f}", f"{r['shrink_gbps']}", f"{r['expand_gbps']}",
                      f"{r['lora_over_base']:.3f}")
    console.print(table)
    console.print(f"per forward ({rec['layers']} layers): projection GEMMs {rec['projection_gemms_ms_per_forward']} ms, "
                  f"LoRA ops {rec['lora_ops_ms_per_forward']} ms")


@bench_app.command("app")
def bench_app_open(
    runs: Annotated[int, typer.Option(help="run manifests in the timed folder (copies of results/ comparisons)")] = 200,
    reps: int = 3,
    src: Annotated[Optional[Path], typer.Option(help="results folder to copy from")] = None,
    out: Annotated[Optional[Path], typer.Option(help="JSON output (default results/bench/app-open.json)")] = None,
):
    """Time the app opening on a results folder of >= 200 runs: first open (nothing parsed) and reopen (cached)."""
    from .bench.app import run

    rec = run(src, runs=runs, reps=reps, out_file=out, log=console.print)
    console.print(f"{rec['runs']} runs: first open {rec['first_open_s']:.2f}s (budget {rec['budget_s']}s), "
                  f"reopen {rec['reopen_s']:.2f}s, catalog scan alone {rec['catalog_scan_s']:.3f}s")


@bench_app.command("serve")
def bench_serve(
    pool: _Pool = "demo", requests: int = 64, adapters: int = 8, max_tokens: int = 16,
    check: Annotated[bool, typer.Option(help="compare the mixed round with PEFT generating each request alone")] = True,
):
    """Requests/s and p50/p95 latency: 64 concurrent requests over 8 adapters vs 1 adapter vs base."""
    from .bench.serve import run

    rec = run(pool, n_requests=requests, n_adapters=adapters, max_tokens=max_tokens, check=check, log=console.print)
    table = Table("mix", "requests/s", "p50 s", "p95 s", "wall s", title="bench serve")
    for k, v in rec["rows"].items():
        table.add_row(k, f"{v['requests_per_s']:.2f}", f"{v['p50_s']:.2f}", f"{v['p95_s']:.2f}", f"{v['wall_s']:.1f}")
    console.print(table)
    if rec["exact_vs_peft_alone"] is not None:
        ex = rec["exact_vs_peft_alone"]
        console.print(f"served == PEFT alone: {ex['identical']}/{ex['requests']} requests")
        if ex["differing"]:
            raise typer.Exit(1)


def _print_board(board: dict) -> None:
    from .eval.leaderboard import short

    ref = board["reference"]
    table = Table("model", "method", "held-in %", "held-out %", f"Δ vs {ref}", "p",
                  *[short(t) for t in board["tasks"]],
                  title=f"{board['name']}: exact match % ± se (paired test vs {ref}; ns: p >= 0.05)")

    def pm(d):
        return "–" if not d else f"{100 * d['mean']:.1f}±{100 * d['stderr']:.0f}" if d["stderr"] == d["stderr"] \
            else f"{100 * d['mean']:.1f}"

    for r in board["rows"]:
        p = r["paired"]
        table.add_row(r["name"], r["method"], pm(r["summary"].get("held_in")), pm(r["summary"].get("held_out")),
                      f"{100 * p['diff']:+.1f}" if p else ("ref" if r["name"] == ref else "–"),
                      (f"{p['p_value']:.2g}" + ("" if p["p_value"] < 0.05 else " ns")) if p else "–",
                      *[f"{100 * r['tasks'][t]['mean']:.0f}" if t in r["tasks"] else "–" for t in board["tasks"]])
    Console(width=max(console.width, 200)).print(table)


def _compare(recipe: Path, *, dry_run: bool, executor: str, address: str | None, cpus: float, gpus: float,
             device: str, results: Path | None) -> dict | None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .compare import parse_comparison
    from .jobs import describe, make_plan, run_comparison

    comparison = parse_comparison(recipe, log=console.print)  # every check before any work
    plan = make_plan(comparison, results, device)
    if dry_run:
        for line in describe(plan):
            console.print(line, highlight=False)
        return None
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[current]}"), console=err_console, refresh_per_second=2)
    with bar:
        job = bar.add_task(f"compare {comparison.spec.name}", total=len(plan.builds) + len(plan.evals), current="")

        printed = [0]

        def progress(state):
            for event in state.events[printed[0]:]:
                bar.console.print(f"  {event}", highlight=False)
            printed[0] = len(state.events)
            bar.update(job, completed=state.done, current=state.current)

        board = run_comparison(comparison, results_dir=results, executor=executor, device=device, address=address,
                               cpus=cpus, gpus=gpus, log=console.print, progress=progress)
    _print_board(board)
    console.print(f"leaderboard: {plan.out / 'leaderboard.md'} (+ .csv, .json, .svg)")
    return board


@app.command("compare")
def compare(
    recipe: Annotated[Path, typer.Argument(help="a comparison recipe, e.g. merges/demo.yaml")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and show the plan (what is done), run nothing")] = False,
    executor: Annotated[str, typer.Option(help="local | ray")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: start Ray locally)")] = None,
    cpus: Annotated[float, typer.Option(help="CPUs each Ray task declares")] = 1,
    gpus: Annotated[float, typer.Option(help="GPUs each Ray task declares")] = 0,
    device: _Dev = "cpu",
    results: Annotated[Optional[Path], typer.Option(help="results folder (default results/ or $WORKBENCH_RESULTS)")] = None,
):
    """Run a comparison: build each artifact once, evaluate every (row, task) cell, write a leaderboard
    (Markdown, CSV, JSON, plot) with standard errors and paired tests. Resumable: a rerun skips finished cells."""
    _compare(recipe, dry_run=dry_run, executor=executor, address=address, cpus=cpus, gpus=gpus, device=device,
             results=results)


@app.command("demo")
def demo(
    full: Annotated[bool, typer.Option("--full", help="rebuild everything: train the pool (LoRA and full experts), "
                                                     "full test splits, every recipe with its sweep")] = False,
    retrain: Annotated[bool, typer.Option("--retrain", help="with --full: train every expert again, the shipped "
                                                            "ones included (default: only missing or changed ones)")] = False,
    executor: Annotated[str, typer.Option(help="local | ray")] = "local",
    device: _Dev = "cpu",
):
    """The main job on the embedded default: SmolLM2-135M + the shipped demo pool -> merges/demo.yaml leaderboard."""
    from .base import BaseModel
    from .demo import DEMO_COMPARISON, DEMO_FULL_COMPARISON, build_demo_pool, missing_shipped, ship_half, ship_parts
    from .eval.harness import results_root

    with console.status("fetching the base model ..."):
        bm = BaseModel("smollm2-135m")
    console.print(f"base: {bm.info()['title']}")
    if full:  # the pool (missing experts and any whose training config changed), half-precision check, gates;
        # --retrain trains every expert again, the shipped ones included. A rerun resumes where it stopped.
        pool = build_demo_pool(device=device, force=retrain, changed=True, log=console.print)
        atomic_write_json(results_root() / "checks" / "demo-pool-half.json", ship_half(pool, log=console.print))
    elif missing := missing_shipped():
        raise WorkbenchError(f"the shipped demo experts are missing ({', '.join(missing)}): restore adapters/demo from "
                             "git, or run `workbench demo --full` to train them")
    _compare(DEMO_FULL_COMPARISON if full else DEMO_COMPARISON, dry_run=False, executor=executor, address=None,
             cpus=1, gpus=0, device=device, results=None)
    if full:
        ship_parts(DEMO_COMPARISON, log=console.print)
    from .demo import _ROOT

    if (_ROOT / "app" / "app.py").is_file():
        console.print("open the app: .venv/bin/streamlit run app/app.py")


# ----------------------------------------------------------------------------- entry point


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def main() -> None:
    _quiet_libraries()
    try:
        app()
    except WorkbenchError as e:
        err_console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
