"""`workbench` command line: a thin shell over the public Python API (`import workbench`). It parses options, calls
one API function and prints its result; it holds no library logic. User errors print one line and exit with code 2."""

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

from . import WorkbenchError


def _plain_types() -> None:
    """typer >= 0.16 prints a `<bool>`/`<str>`/`<path>` tag beside every option in --help: show click's classic
    metavars instead (INTEGER, TEXT, PATH...) and nothing for flags."""
    from typer import core

    names = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "file": "FILE", "dir": "DIRECTORY"}

    def display(self, ctx):
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return None
        if self.metavar is not None:
            return self.metavar
        label = self.display_type(ctx).strip("<>")
        many = label.startswith("list[")
        label = label[5:-1] if many else label
        if label == "bool":
            return None
        return names.get(label, label.upper()) + ("..." if many else "")

    for cls in (core.TyperOption, core.TyperArgument):
        if hasattr(cls, "display_type_rich"):
            cls.display_type_rich = display


_plain_types()

app = typer.Typer(help="Expert Workbench: pools of experts, combined, evaluated and served.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
base_app = typer.Typer(help="Base models: fetch into the cache, show info.", no_args_is_help=True)
pool_app = typer.Typer(help="Expert pools under adapters/: create, add, list, show, remove, verify.",
                       no_args_is_help=True)
train_app = typer.Typer(help="Train experts into a pool: lora, full, multitask.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate models with lm-eval (offline) into results/.", invoke_without_command=True)
results_app = typer.Typer(help="Read results/: comparisons' leaderboards, loose runs, curves.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks against peers measured in the same run (figures in results/bench/).",
                        no_args_is_help=True)
route_app = typer.Typer(help="Routed compositions (PHATGOOSE, Arrow, ...): per-token routing traces.",
                        no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(pool_app, name="pool")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.add_typer(results_app, name="results")
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


def _split_list(values: list[str] | None) -> list[str]:
    return [x for v in values or [] for x in v.split(",") if x]


def _frame_table(df, title: str = "") -> Table:
    table = Table(*[str(c) for c in df.columns], title=title)
    for row in df.itertuples(index=False):
        table.add_row(*["–" if isinstance(v, float) and math.isnan(v) else f"{v:.1f}" if isinstance(v, float)
                        else str(v) for v in row])
    return table


# ----------------------------------------------------------------------------- base


@base_app.command("fetch")
def base_fetch(spec: Annotated[str, typer.Argument(help="alias, local folder or hub id")] = "smollm2-135m"):
    """Resolve a base model into the cache (the default is dequantised from its GGUF once)."""
    from . import BaseModel

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
    from . import base_info as info_of

    info = info_of(spec, reply_to=prompt if reply else None)
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
    from . import Pool

    p = Pool.create(pool, base=base)
    console.print(f"[green]created[/] pool {p.name} at {p.root} (base {base}, {p.manifest.base.fingerprint})")


_DataOpt = Annotated[Optional[list[str]], typer.Option(
    "--data", help="training data: a JSONL/CSV/Parquet file, a save_to_disk folder or a hub id (repeatable)")]
_PromptField = Annotated[Optional[str], typer.Option(help="the data's prompt column (default: prompt, question, ...)")]
_AnswerField = Annotated[Optional[str], typer.Option(help="the data's answer column (default: answer, completion, ...)")]
_MessagesField = Annotated[Optional[str], typer.Option(
    help="a chat column (a list of {role, content}; the last is the answer), rendered by the base's chat template")]
_TextField = Annotated[Optional[str], typer.Option(help="a plain-text column (the loss on all of it)")]


@pool_app.command("add")
def pool_add(
    pool: Annotated[str, typer.Argument(help="pool name or path")],
    sources: Annotated[list[str], typer.Argument(help="PEFT adapter or model folders (or hub ids), one or more")],
    name: Annotated[Optional[str], typer.Option(help="expert name, for one folder (default: the folder's name)")] = None,
    kind: Annotated[Optional[str], typer.Option(help="lora | full (default: detected)")] = None,
    link: Annotated[bool, typer.Option("--link", help="reference the folder in place instead of copying")] = False,
    tag: Annotated[Optional[list[str]], typer.Option(help="key=value, repeatable (task=..., domain=...)")] = None,
    notes: Annotated[str, typer.Option(help="free-form notes")] = "",
    allow_distant_base: Annotated[bool, typer.Option(
        "--allow-distant-base", help="add an expert that looks trained on another base (distance, adapter's base)"
    )] = False,
    data: _DataOpt = None, prompt_field: _PromptField = None, answer_field: _AnswerField = None,
    messages_field: _MessagesField = None, text_field: _TextField = None,
):
    """Validate experts against the pool's base and add them (each named by its folder); --data records what one
    imported expert learned, for the methods that learn from the experts' data."""
    from . import add_experts

    if kind not in (None, "lora", "full"):
        raise WorkbenchError(f"invalid --kind {kind!r}: use lora or full")
    with console.status(f"validating and adding {len(sources)} expert{'s' if len(sources) > 1 else ''} ..."):
        added = add_experts(pool, sources, name=name, kind=kind, link=link, tags=_parse_tags(tag), notes=notes,
                            allow_distant=allow_distant_base, data=data, prompt_field=prompt_field,
                            answer_field=answer_field, messages_field=messages_field, text_field=text_field)
    for e in added:
        learned = f", data: {'; '.join(r.describe() for r in e.data())}" if e.data() else ""
        console.print(f"[green]added[/] {e.kind} expert {e.name} to pool {e.pool.name}{learned}", highlight=False,
                      soft_wrap=True)


@pool_app.command("data")
def pool_data(
    pool: Annotated[str, typer.Argument(help="pool name or path")],
    expert: Annotated[str, typer.Argument(help="the expert whose training data to record")],
    data: _DataOpt = None, prompt_field: _PromptField = None, answer_field: _AnswerField = None,
    messages_field: _MessagesField = None, text_field: _TextField = None,
):
    """Show the data an expert learned, or record it with --data (an imported adapter's data; data that changed):
    the artifact keys of the methods that read it change with it."""
    from . import Pool, attach_data

    if data:
        e = attach_data(pool, expert, data, prompt_field=prompt_field, answer_field=answer_field,
                        messages_field=messages_field, text_field=text_field)
        console.print(f"[green]recorded[/] {len(e.data())} dataset(s) for {e.name}", highlight=False)
    else:
        e = Pool.open(pool).expert(expert)
    if not e.data():
        console.print(f"expert {e.name}: no recorded training data (`workbench pool data {e.pool.name} {e.name} "
                      "--data FILE` records it)", highlight=False)
    for r in e.data():
        console.print(f"{r.name}: {r.describe()}", highlight=False, soft_wrap=True)


@pool_app.command("list")
def pool_list(pool: Annotated[Optional[str], typer.Argument(help="a pool: list its experts")] = None):
    """List the pools under adapters/, or the experts of one pool."""
    from . import Pool, list_pools

    if pool is None:
        table = Table("pool", "base", "experts", "lora", "full", "not built", "missing files")
        for name in list_pools():
            p = Pool.open(name)
            unbuilt = sum(e.not_built() for e in p.experts)  # files a known command builds, not shipped
            missing = sum(not e.files_present() and not e.not_built() for e in p.experts)  # a problem
            table.add_row(p.name, p.manifest.base.spec, str(len(p.names())), str(len(p.names("lora"))),
                          str(len(p.names("full"))), str(unbuilt) if unbuilt else "-", str(missing) if missing else "-")
        console.print(table)
        return
    p = Pool.open(pool)
    table = Table("expert", "kind", "rank", "tags", "data", "linked", "status",
                  title=f"pool {p.name} (base {p.manifest.base.spec})")
    for x in p.experts:
        e = x.entry
        table.add_row(e.name, e.kind, str(e.lora.r) if e.lora else "-",
                      ", ".join(f"{k}={v}" for k, v in e.tags.items()), ", ".join(x.tasks()) or "-",
                      "yes" if e.linked else "", x.status())
    console.print(table)


def _training_summary(training: dict | None) -> str:
    if not isinstance(training, dict) or not training:
        return "-"
    parts = []
    if training.get("steps") is not None:
        parts.append(f"{training['steps']} steps")
    lr = (training.get("config") or {}).get("lr")
    if lr is not None:
        parts.append(f"lr {lr:g}")
    if isinstance(training.get("final_loss"), (int, float)):
        parts.append(f"final loss {training['final_loss']:.3f}")
    return ", ".join(p for p in parts if p)


@pool_app.command("show")
def pool_show(
    pool: Annotated[str, typer.Argument(help="pool name or path")],
    expert: Annotated[Optional[str], typer.Argument(help="one expert: show its entry")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the whole manifest (or entry) as JSON, loss curves included")] = False,
):
    """A pool's base and experts (kind, rank, tags, training, status), or one expert's entry as JSON (loss curve
    summarised); --json prints everything."""
    from . import Pool

    p = Pool.open(pool)
    if expert:
        e = p.expert(expert)
        data = {**e.entry.model_dump(mode="json"), "status": e.status()}
        curve = (data.get("training") or {}).get("loss_curve") if isinstance(data.get("training"), dict) else None
        if curve and not as_json:
            data["training"]["loss_curve"] = f"{len(curve)} points, {curve[0]:.3f} -> {curve[-1]:.3f}"
        console.print_json(json.dumps(data))
        return
    if as_json:
        data = p.manifest.model_dump(mode="json")
        data["experts"] = [{**d, "status": e.status()} for d, e in zip(data["experts"], p.experts)]
        console.print_json(json.dumps(data))
        return
    b = p.manifest.base
    console.print(f"pool [bold]{p.name}[/] at {p.root}\nbase {b.spec} ({b.fingerprint}); {len(p.experts)} experts",
                  highlight=False)
    table = Table("expert", "kind", "rank", "tags", "training", "status")
    for x in p.experts:
        e = x.entry
        table.add_row(e.name, e.kind, str(e.lora.r) if e.lora else "-", ", ".join(f"{k}={v}" for k, v in e.tags.items()),
                      _training_summary(e.training), x.status())
    Console(width=max(console.width, 140)).print(table)
    console.print(f"one expert in full: workbench pool show {p.name} EXPERT; everything: --json", highlight=False)


@pool_app.command("remove")
def pool_remove(pool: Annotated[str, typer.Argument()], expert: Annotated[str, typer.Argument()]):
    """Remove an expert (and its copied files) from a pool."""
    from . import Pool

    p = Pool.open(pool)
    p.remove(expert)
    console.print(f"[green]removed[/] {expert} from pool {p.name}")


@pool_app.command("verify")
def pool_verify(
    pool: Annotated[str, typer.Argument()],
    hashes: Annotated[bool, typer.Option(help="check the files' sha256 too")] = True,
):
    """Re-validate every expert: files, hashes, shapes, LoRA targets, finite values."""
    from . import Pool

    p = Pool.open(pool)
    with console.status(f"verifying {len(p.names())} experts ..."):
        problems = p.verify(hashes=hashes)
    unbuilt = [e for e in p.experts if e.not_built()]
    for e in unbuilt:
        console.print(f"{e.name}: {e.status()}", highlight=False)
    if problems:
        for line in problems:
            err_console.print(f"[red]problem[/] {line}")
        raise typer.Exit(1)
    built = len(p.names()) - len(unbuilt)
    console.print(f"[green]ok[/] pool {p.name}: {built} experts verified"
                  + (f", {len(unbuilt)} not built" if unbuilt else ""), highlight=False)


@pool_app.command("synth")
def pool_synth(
    pool: Annotated[str, typer.Argument(help="pool name or path (created when missing)")],
    n: Annotated[int, typer.Option("--n", help="adapters to write (1..4096)")],
    source: Annotated[Optional[str], typer.Option("--from", help="pool whose LoRA experts are perturbed "
                                                               "(default: the pool's own; none: random factors)")] = None,
    base: Annotated[Optional[str], typer.Option(help="base of a new pool (default: the source pool's)")] = None,
    seed: Annotated[int, typer.Option(help="seed: adapter i depends on (seed, i) only")] = 0,
    noise: Annotated[float, typer.Option(help="relative size of the perturbation")] = 0.1,
    rank: Annotated[Optional[list[int]], typer.Option(help="ranks drawn from (repeatable; default 4, 8, 16)")] = None,
    prefix: Annotated[str, typer.Option(help="names are <prefix>-NNNN")] = "synth",
):
    """A benchmark tool, not experts: write N synthetic PEFT LoRA adapters (perturbed copies of real experts, ranks
    and target modules mixed) into a pool, with one manifest write."""
    from . import synthesize_pool

    made = synthesize_pool(pool, n, source=source, base=base, seed=seed, ranks=tuple(rank or (4, 8, 16)), noise=noise,
                           prefix=prefix, log=console.print)
    console.print(f"[green]ok[/] {len(made)} synthetic adapters in pool {pool}", highlight=False)


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
    from . import build_demo_pool

    build_demo_pool(pool, base=base, device=device, only=only, old=old, log=console.print)


# ----------------------------------------------------------------------------- train


def _train(kind: str, pool: str, tasks: list[str], name: Optional[str], device: str, replace: bool, *,
           data: list[str] | None = None, fields: dict | None = None, tag: list[str] | None = None, **cfg):
    from pathlib import PurePath

    from . import Pool

    if "targets" in cfg and cfg["targets"] is not None:
        cfg["targets"] = _split_list(cfg["targets"])
    data = list(data or [])
    if name is None:
        labels = tasks + [PurePath(d).stem if not d.startswith("suite:") else d[6:] for d in data]
        name = labels[0] if len(labels) == 1 else "multitask"
    p = Pool.open(pool)
    e = p.train(name, tasks, data=data, kind=kind, device=device, replace=replace, tags=_parse_tags(tag) or None,
                **(fields or {}), **cfg)
    m = e.entry.training
    console.print(f"[green]trained[/] {e.kind} expert {e.name}: {m['steps']} steps, final loss {m['final_loss']:.4f}, "
                  f"{m['wall_s']:.0f}s, {m['tokens_per_s']:.0f} tokens/s; data: "
                  f"{'; '.join(r.describe() for r in e.data())}", highlight=False, soft_wrap=True)


def _one_task(task: str | None, data: list[str] | None) -> list[str]:
    if task is None:
        if not data:
            raise WorkbenchError("no training data: give --data FILE (your own data) or --task NAME (a suite task)")
        return []
    if "," in task or task in ("held_in", "held_out", "skills", "domains", "all"):
        raise WorkbenchError(f"--task {task!r}: one task; for several, `workbench train multitask --tasks ...`")
    return [task]


def _fields(prompt_field, answer_field, messages_field, text_field) -> dict:
    return {"prompt_field": prompt_field, "answer_field": answer_field, "messages_field": messages_field,
            "text_field": text_field}


_Pool = Annotated[str, typer.Option(help="pool name or path")]
_Dev = Annotated[str, typer.Option(help="cpu or cuda")]
_Tag = Annotated[Optional[list[str]], typer.Option(help="key=value, repeatable (task=<eval task> pairs the expert "
                                                        "with its task in leaderboards)")]


@train_app.command("lora")
def train_lora(
    pool: _Pool, task: Annotated[Optional[str], typer.Option(help="a suite task to train on")] = None,
    data: _DataOpt = None, prompt_field: _PromptField = None, answer_field: _AnswerField = None,
    messages_field: _MessagesField = None, text_field: _TextField = None,
    name: Annotated[Optional[str], typer.Option(help="expert name (default: the task, or the data file's stem)")] = None,
    r: Optional[int] = None, alpha: Optional[float] = None,
    targets: Annotated[Optional[list[str]], typer.Option(help="target modules, comma-separated")] = None,
    steps: Optional[int] = None, lr: Optional[float] = None,
    batch_size: Optional[int] = None, seed: Optional[int] = None, device: _Dev = "cpu", tag: _Tag = None,
    replace: Annotated[bool, typer.Option(help="replace an expert of that name")] = False,
):
    """Train a PEFT LoRA expert on your data (--data) or a suite task (--task), loss on answer tokens only."""
    tasks = _one_task(task, data)
    _train("lora", pool, tasks, name, device, replace, data=data, tag=tag,
           fields=_fields(prompt_field, answer_field, messages_field, text_field), r=r, alpha=alpha, targets=targets,
           steps=steps, lr=lr, batch_size=batch_size, seed=seed)


@train_app.command("full")
def train_full(
    pool: _Pool, task: Annotated[Optional[str], typer.Option(help="a suite task to train on")] = None,
    data: _DataOpt = None, prompt_field: _PromptField = None, answer_field: _AnswerField = None,
    messages_field: _MessagesField = None, text_field: _TextField = None,
    name: Annotated[Optional[str], typer.Option(help="expert name (default: full-<task or data stem>)")] = None,
    steps: Optional[int] = None, lr: Optional[float] = None, batch_size: Optional[int] = None,
    seed: Optional[int] = None, device: _Dev = "cpu", tag: _Tag = None, replace: bool = False,
):
    """Full fine-tune expert (every weight) on your data (--data) or a suite task (--task), saved as a model folder."""
    from pathlib import PurePath

    tasks = _one_task(task, data)
    label = tasks[0] if tasks else PurePath(data[0]).stem if data and len(data) == 1 else None
    _train("full", pool, tasks, name or (f"full-{label}" if label else None), device, replace, data=data, tag=tag,
           fields=_fields(prompt_field, answer_field, messages_field, text_field), steps=steps, lr=lr,
           batch_size=batch_size, seed=seed)


@train_app.command("multitask")
def train_multitask(
    pool: _Pool,
    tasks: Annotated[Optional[str], typer.Option(help="comma-separated suite tasks, or held_in (the default "
                                                      "without --data)")] = None,
    data: _DataOpt = None, prompt_field: _PromptField = None, answer_field: _AnswerField = None,
    messages_field: _MessagesField = None, text_field: _TextField = None,
    name: str = "multitask", r: Optional[int] = None, alpha: Optional[float] = None,
    steps: Optional[int] = None, lr: Optional[float] = None, batch_size: Optional[int] = None,
    seed: Optional[int] = None, device: _Dev = "cpu", tag: _Tag = None, replace: bool = False,
):
    """One LoRA on the union of datasets (--data repeated) and/or suite tasks: the reference every combination is
    compared with."""
    task_list = _split_list([tasks]) if tasks else ([] if data else ["held_in"])
    _train("lora", pool, task_list, name, device, replace, data=data, tag=tag,
           fields=_fields(prompt_field, answer_field, messages_field, text_field), r=r, alpha=alpha,
           steps=steps, lr=lr, batch_size=batch_size, seed=seed)


# ----------------------------------------------------------------------------- eval and results

_Tasks = Annotated[str, typer.Option(help="comma-separated tasks (suite names or groups held_in, held_out, skills, "
                                          "domains, all; lm-eval task and group names; your --include-path tasks)")]


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
    out: Annotated[Optional[Path], typer.Option(help="lm-eval output folder (default results/lm-eval)")] = None,
    include_path: Annotated[Optional[list[Path]], typer.Option(
        "--include-path", help="a folder of your lm-eval task YAMLs (repeatable)")] = None,
    apply_chat_template: Annotated[bool, typer.Option(
        "--apply-chat-template", help="render prompts with the tokenizer's chat template (chat-trained experts)")] = False,
):
    """Evaluate one model: `workbench eval --model SPEC --pool P --tasks ...` (suite names, lm-eval's task and
    group names, or your tasks with --include-path)."""
    if ctx.invoked_subcommand is not None:
        return
    if model is None:
        raise WorkbenchError("give --model (base, an expert name, or a folder); see workbench eval --help")
    from . import evaluate

    res = evaluate(model, _split_list([tasks]), pool=pool, limit=limit, batch_size=batch_size, device=device,
                   lm_eval_dir=out, include_path=include_path, apply_chat_template=apply_chat_template)
    _print_manifest(res.manifest)


@eval_app.command("matrix")
def eval_matrix(
    pool: _Pool = "demo", tasks: _Tasks = "all", batch_size: int = 16, device: _Dev = "cpu",
    models: Annotated[Optional[str], typer.Option(help="comma-separated (default: base + every expert)")] = None,
    force: Annotated[bool, typer.Option(help="re-run models that already have full results")] = False,
):
    """Every expert (and the base) on every task; models with complete results are skipped."""
    from . import eval_matrix as run_matrix

    for res in run_matrix(pool, _split_list([tasks]), models=_split_list([models]) if models else None,
                          batch_size=batch_size, device=device, force=force, log=console.print):
        _print_manifest(res.manifest)
    results_runs(pool=pool)


@eval_app.command("determinism")
def eval_determinism(
    pool: _Pool = "demo", model: str = "addition", tasks: _Tasks = "addition,sorting,word_count",
    limit: int = 50, device: _Dev = "cpu",
):
    """Same model evaluated twice (batch 16) and at batch 1: scores and generations must agree."""
    from . import eval_determinism as check

    rec = check(pool, model, _split_list([tasks]), limit=limit, device=device, log=console.print)
    console.print(f"repeat identical: {rec['repeat_identical']}; batch 1 vs 16 scores equal: "
                  f"{rec['batch1_vs_16_scores_equal']}; differing generations: "
                  f"{rec['batch1_vs_16_generation_differences']}")
    if not (rec["repeat_identical"] and rec["batch1_vs_16_scores_equal"]):
        raise typer.Exit(1)


def _print_board(board) -> None:
    """A Leaderboard as a terminal table: the groups it has, the normalized score, the paired test, each task under
    its metric's direction; below it the legend (each metric, its direction and units; what norm leaves out)."""
    ref = board.reference
    title = (f"{board.name}: accuracy-like tasks in %, other metrics as they are (↑ higher / ↓ lower is better); "
             f"Δ, p: paired vs {ref} over the accuracy-like tasks (ns: p >= 0.05)")
    Console(width=max(console.width, 200)).print(_frame_table(board.summary(), title))
    try:
        legend = board.legend()
    except (KeyError, TypeError, ValueError):  # a board too old or odd to describe: the table alone
        legend = []
    for line in legend:
        console.print(f"  {line}", style="dim", highlight=False, soft_wrap=True)
    if board.folder is not None:
        console.print(f"leaderboard: {board.folder / 'leaderboard.md'} (+ .csv, .json, .svg)", highlight=False)


@results_app.command("table")
def results_show(
    pool: Annotated[Optional[str], typer.Option(help="only comparisons over this pool")] = None,
    results_dir: Annotated[Optional[Path], typer.Option(help="results folder")] = None,
    comparison: Annotated[Optional[str], typer.Option(help="only this comparison (its name)")] = None,
):
    """The leaderboard of every comparison run under results/compare/ (`workbench compare`, `workbench demo`).
    Loose lm-eval runs (`workbench eval`, `merge --eval`): `workbench results runs`."""
    from . import leaderboards

    boards = [b for b in leaderboards(pool, results_dir) if comparison is None or b.name == comparison]
    if not boards:
        console.print("no comparisons yet" + (f" over pool {pool}" if pool else "") +
                      ": run `workbench compare merges/demo.yaml` (or `workbench demo`); loose runs: "
                      "`workbench results runs`", highlight=False)
        return
    for b in boards:
        _print_board(b)
        console.print(f"  {b.board.get('cells', '?')} cells recorded", highlight=False)


@results_app.command("runs")
def results_runs(
    pool: Annotated[Optional[str], typer.Option(help="only runs of this pool")] = None,
    results_dir: Annotated[Optional[Path], typer.Option(help="results folder")] = None,
    csv: Annotated[Optional[Path], typer.Option(help="also write the table as CSV")] = None,
    markdown: Annotated[Optional[Path], typer.Option(help="also write the table as Markdown")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="also draw it as a heatmap (.svg, .png or .html)")] = None,
):
    """Method x task table of the loose lm-eval runs under results/lm-eval, the latest run of each model: each
    task's primary metric in its direction (↑/↓), accuracy-like ones in %, others (perplexities ...) as they are."""
    from . import results_table

    df = results_table(pool, results_dir, csv=csv, markdown=markdown, plot=plot)
    if df.empty:
        console.print("no runs yet")
        return
    short, info = df.attrs.get("short", {}), df.attrs.get("metrics", {})
    view = df.drop(columns=["method"]).astype(object)
    for c in view.columns[1:]:  # % to 0.1; other metrics to 4 significant digits (an f1 of 0.31 stays 0.31)
        pct = (info.get(c) or {"percent": True})["percent"]
        view[c] = ["–" if not isinstance(v, (int, float)) or math.isnan(v) else f"{v:.1f}" if pct else f"{v:.4g}"
                   for v in df[c]]

    def header(c) -> str:
        name, i = short.get(str(c), str(c)), info.get(c)
        return name if not i else f"{name} {'↑' if i['higher_is_better'] else '↓'}"

    Console(width=max(console.width, 160)).print(_frame_table(view.rename(columns=header), (
        "loose runs: % for accuracy-like metrics, other metrics as they are (↑ higher / ↓ lower is better; * "
        "held-out)")))
    for line in df.attrs.get("legend") or []:
        console.print(f"  {line}", style="dim", highlight=False, soft_wrap=True)
    for path in (csv, markdown, plot):
        if path is not None:
            console.print(f"written: {path}", highlight=False)


@results_app.command("curve")
def results_curve(
    recipe: Annotated[Path, typer.Argument(help="the comparison, e.g. merges/merge-count.yaml (run it first)")],
    results: Annotated[Optional[Path], typer.Option(help="results folder")] = None,
):
    """Score vs number of merged experts from a comparison's cells (curve.json + curve.svg beside its leaderboard)."""
    from . import merge_count_curve

    curve = merge_count_curve(recipe, results_dir=results)
    table = Table("method", "experts", "mean %", "se", title=f"{curve['name']}: mean over the merged experts' tasks")
    for p in curve["points"]:
        table.add_row(p["method"], str(p["experts"]), f"{100 * p['mean']:.1f}", f"{100 * p['stderr']:.1f}")
    console.print(table)
    console.print(f"curve: {Path(curve['folder']) / 'curve.svg'}")


@app.command("merge")
def merge(
    recipes: Annotated[list[Path], typer.Argument(help="recipe YAML files, e.g. merges/ties-lora.yaml")],
    eval_: Annotated[bool, typer.Option("--eval", help="evaluate the artifact with the recipe's eval settings")] = False,
    force: Annotated[bool, typer.Option(help="rebuild even if the artifact exists")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and show the plan, build nothing")] = False,
    limit: Annotated[Optional[int], typer.Option(help="examples per task for the sweep and --eval (a cheap first try)")] = None,
    no_sweep: Annotated[bool, typer.Option("--no-sweep", help="skip the recipe's validation sweep: build its own "
                                                              "parameters")] = False,
    device: _Dev = "cpu",
):
    """Build a recipe's artifact (merged model or LoRA, Twin, ...) and optionally evaluate it."""
    from . import build, evaluate, plan

    plans = [plan(r, sweep=not no_sweep, limit=limit) for r in recipes]  # every recipe validated once, before any work
    if dry_run:
        for bp in plans:
            console.print_json(json.dumps(bp.describe()))
        return
    for i, (path, bp) in enumerate(zip(recipes, plans), 1):
        console.rule(f"[{i}/{len(recipes)}] {path}")
        art = build(bp, force=force, device=device, log=console.print)
        console.print(f"[green]artifact[/] {art.path}")
        if art.selection:
            console.print(f"selected on validation: {art.selection['best']} "
                          f"(score {art.selection['validation_score']:.4f})")
        if eval_:
            spec = bp.eval
            _print_manifest(evaluate(art, spec["tasks"], limit=spec["limit"], batch_size=spec["batch_size"],
                                     device=device).manifest)


def _prompt_text(prompt: Optional[str], prompt_file: Optional[Path]) -> Optional[str]:
    if (prompt is None) == (prompt_file is None):
        raise WorkbenchError("give the prompt as an argument or with --prompt-file FILE (- for standard input), "
                             "not both")
    return prompt


@route_app.command("trace")
def route_trace(
    recipe: Annotated[Path, typer.Argument(help="a routed recipe, e.g. merges/phatgoose-lora.yaml (built if needed)")],
    prompt: Annotated[Optional[str], typer.Argument(help="the prompt to trace (one line; several: --prompt-file)")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="read the prompt from this file (- for standard input)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="write the trace JSON here (e.g. results/traces/x.json)")] = None,
    device: _Dev = "cpu",
):
    """Which experts each token chose at each layer, with what weight (per-layer usage + per-token choices)."""
    from . import route_trace as trace

    # a --prompt-file (or - for standard input) is read by route_trace, at most 1 MiB, before anything is built
    tr = trace(recipe, _prompt_text(prompt, prompt_file), prompt_file=prompt_file, out=out, device=device,
               log=console.print)
    table = Table("layer", *tr["experts"], title=f"{tr['recipe']}: mean expert weight per layer over {len(tr['tokens'])} tokens")
    for layer, usage in zip(tr["layers"], tr["usage"]):
        top = max(usage)
        table.add_row(str(layer), *(f"[bold]{u:.2f}[/]" if u == top else f"{u:.2f}" for u in usage))
    console.print(table)
    if out is not None:
        console.print(f"trace: {out}")


@route_app.command("traces")
def route_traces(
    recipe: Annotated[Path, typer.Argument(help="a routed recipe, e.g. merges/phatgoose-lora.yaml (built if needed)")],
    out: Annotated[Optional[Path], typer.Option(help="folder for the traces (default results/traces)")] = None,
    split: Annotated[str, typer.Option(help="split the prompts come from")] = "test",
    device: _Dev = "cpu",
):
    """One prompt per routed expert's task: in how many layers does that task's expert get the most weight?"""
    from . import route_traces as traces

    rec = traces(recipe, out=out, split=split, device=device, log=console.print)
    table = Table("task", "expert", "layers where it tops", "mean weight", title=f"{rec['recipe']}: one prompt per task")
    for t, r in rec["tasks"].items():
        table.add_row(t, r["expert"], f"{r['top_layers']}/{r['layers']}", f"{r['mean_weight']:.2f}")
    console.print(table)
    console.print(f"traces: {rec['traces_dir']}; summary: {rec['summary_file']}")


@route_app.command("accuracy")
def route_accuracy(
    recipe: Annotated[Path, typer.Argument(help="a routed recipe, e.g. merges/phatgoose-lora.yaml (built if needed)")],
    n: Annotated[int, typer.Option(min=1, max=10_000, help="examples per task")] = 20,
    split: Annotated[str, typer.Option(help="split the examples come from")] = "validation",
    out: Annotated[Optional[Path], typer.Option(help="folder for the JSON and plots (default results/checks)")] = None,
    device: _Dev = "cpu",
):
    """Router accuracy per layer: how often each task's tokens go to its own expert (top-1 and within top-k);
    with PHATGOOSE also the gates' training-loss curves. JSON + SVG under results/checks/."""
    from . import route_accuracy as accuracy

    rec = accuracy(recipe, n=n, split=split, out=out, device=device, log=console.print)
    table = Table("task", "expert", "top-1 = own (mean over layers)", "own in top-k", "layers > 50 %",
                  title=f"{rec['recipe']}: router accuracy, {split}, {n} examples per task")
    for t, r in rec["tasks"].items():
        table.add_row(t, r["expert"], f"{r['mean_top1']:.2f}",
                      "–" if r["mean_in_topk"] is None else f"{r['mean_in_topk']:.2f}",
                      f"{sum(1 for x in r['top1'] if x > 0.5)}/{len(r['top1'])}")
    console.print(table)
    console.print("written: " + ", ".join(rec["files"]), highlight=False)


@app.command("methods")
def methods_list():
    """List the registered combination methods."""
    from . import list_methods

    table = Table("method", "experts", "outputs", "description")
    for m in list_methods():
        table.add_row(m["name"], "/".join(m["experts"]), "/".join(m["outputs"]), m["description"])
    console.print(table)


@app.command("serve")
def serve_cmd(
    pool: _Pool = "demo", host: str = "127.0.0.1", port: int = 8000,
    backend: Annotated[Optional[str], typer.Option(help="kernel backend (default: by device)")] = None,
    device: _Dev = "cpu", max_batch: int = 32,
    max_body_mb: Annotated[float, typer.Option(help="request bodies over this many MB get a 413")] = 4.0,
    allow_runtime_lora: Annotated[bool, typer.Option(
        "--allow-runtime-lora", help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (admin "
                                     "operations; vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING)")] = False,
    max_loaded_adapters: Annotated[Optional[int], typer.Option(
        min=1, max=4096, help="adapters kept in kernel slots at once; the others wait on the CPU and are swapped in "
                              "as requests need them, least recently used out (default: all)")] = None,
    max_registered_adapters: Annotated[Optional[int], typer.Option(
        min=1, max=4096, help="adapters registered at once, loaded at start or run time (default 1024)")] = None,
    max_composition_parts: Annotated[Optional[int], typer.Option(
        min=1, help="kernel slots pinned by saved compositions' parts, all together (default 1024)")] = None,
    max_host_adapters: Annotated[Optional[int], typer.Option(
        min=0, max=65536, help="with --max-loaded-adapters: adapters kept in host memory beyond the slots (read "
                               "from disk ahead of their requests, least recently used dropped; default: all once "
                               "read)")] = None,
    recipes: Annotated[Optional[list[str]], typer.Option(
        help="recipes to build at start when not cached, then serve: recipe files or names of merges/, comma "
             "separated or repeated; `all`: every routed or low-rank recipe of the pool")] = None,
):
    """OpenAI-compatible server: /v1/models, /v1/completions, /v1/chat/completions (streaming too)."""
    from . import serve

    serve(pool, host=host, port=port, backend=backend, device=device, max_batch=max_batch, max_body_mb=max_body_mb,
          allow_runtime_lora=allow_runtime_lora, max_loaded_adapters=max_loaded_adapters, recipes=recipes or (),
          max_registered_adapters=max_registered_adapters, max_composition_parts=max_composition_parts,
          max_host_adapters=max_host_adapters)


# ----------------------------------------------------------------------------- benchmarks


@bench_app.command("merge")
def bench_merge(
    pool: _Pool = "demo", density: float = 0.2,
    lora_repeats: Annotated[int, typer.Option(help="runs of each side of the (short) LoRA comparison")] = 3,
    out: Annotated[Optional[Path], typer.Option(help="JSON output (default results/bench/merge.json)")] = None,
):
    """TIES/PCB of 4 full experts vs mergekit-yaml; LoRA-space merge vs mergekit's base+lora path."""
    from . import benchmark

    rec = benchmark("merge", pool_name=pool, density=density, lora_repeats=lora_repeats, out_file=out,
                    log=console.print)
    table = Table("measure", "ratio", "target", title="bench merge (ours / mergekit, same run)")
    for k, v in rec["ratios"].items():
        table.add_row(k, f"{v:.3f}", rec["targets"][k])
    console.print(table)


@bench_app.command("kernels")
def bench_kernels(
    base: str = "smollm2-135m", reps: int = 3, device: _Dev = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    backends: Annotated[str, typer.Option(help="comma-separated kernel backends (default: cpu and grouped_mm "
                                                "where this torch has it)")] = "",
):
    """Multi-LoRA forward / base forward, vs PEFT mixed batch and per-adapter loop (same run)."""
    from . import benchmark

    rec = benchmark("kernels", base_spec=base, reps=reps, device=device, dtype=dtype,
                    backends=_split_list([backends]) or None, log=console.print)
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
    from . import benchmark

    rec = benchmark("routing", base_spec=base, experts=experts, rank=rank, k=k, reps=reps, new_tokens=new_tokens,
                    log=console.print, smora_rank=smora_rank, smora_k=smora_k)
    table = Table("phase", *rec["forward"]["x_base"], title=f"time / base ({experts} experts, r {rank}, top-{k}; CPU)")
    for phase in ("forward", "decode"):
        table.add_row(phase, *[f"{v:.3f}" for v in rec[phase]["x_base"].values()])
    console.print(table)


@bench_app.command("scale")
def bench_scale(
    source: Annotated[Optional[str], typer.Option(help="pool whose experts the synthetic adapters perturb")] = "demo",
    base: Annotated[Optional[str], typer.Option(help="base (default: the source pool's)")] = None,
    n: Annotated[Optional[list[int]], typer.Option("--n", help="pool sizes (repeatable; default 8, 64, 256, 1024)")] = None,
    quick: Annotated[bool, typer.Option(help="N = 4, 8, 16, one round: checks that it runs")] = False,
    reps: Annotated[Optional[int], typer.Option(help="rounds per timing")] = None,
    seqs: Annotated[Optional[int], typer.Option(help="sequences in the routed forward")] = None,
    tokens: Annotated[Optional[int], typer.Option(help="tokens per sequence in the routed forward")] = None,
    rank: Annotated[int, typer.Option(help="rank of the merged LoRA")] = 16,
    density: Annotated[float, typer.Option(help="TIES density")] = 0.2,
    seed: int = 0,
    zipf_requests: Annotated[Optional[int], typer.Option(help="requests of the Zipf serving workload (default 192)")]
    = None,
    zipf_rate: Annotated[float, typer.Option(help="their Poisson arrival rate, requests/s")] = 6.0,
    zipf_tokens: Annotated[Optional[int], typer.Option(help="output tokens of each (default 16)")] = None,
    workdir: Annotated[Optional[Path], typer.Option(help="scratch folder (default: the system's temp)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="JSON record (default results/bench/scale-cpu.json)")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="log-log chart (default: beside the JSON, .svg)")] = None,
    op: Annotated[Optional[list[str]], typer.Option("--op", help="measure only this operation (repeatable; needs "
                                                                "--out)")] = None,
):
    """Cost against the number of experts N: pool add, verify, a TIES merge of N LoRAs, Arrow build, routed forward
    top-2 over N vs the base, server start, Zipf serving with 64 adapters resident vs all; time and peak memory per
    N, fitted exponents, a log-log plot."""
    from . import benchmark

    rec = benchmark("scale", base_spec=base, source=source, ns=n, quick=quick, reps=reps, seqs=seqs, tokens=tokens,
                    rank=rank, density=density, seed=seed, zipf_requests=zipf_requests, zipf_rate=zipf_rate,
                    zipf_tokens=zipf_tokens, workdir=workdir, out_file=out, plot=plot, only=op, log=console.print)
    fits = rec.get("exponents") or {}
    cols = sorted({k for e in fits.values() for k in (e or {})})
    table = Table("operation", *[f"exponent of {c}" for c in cols], title="bench scale: cost ~ N^exponent")
    for op, e in fits.items():
        table.add_row(op, *["–" if (e or {}).get(c) is None else f"{e[c]:.2f}" for c in cols])
    console.print(table)


@bench_app.command("kernels-profile")
def bench_kernels_profile(base: str = "smollm2-135m", rank: int = 8, adapters: int = 32):
    """Per-projection cost of the LoRA pieces (gather, shrink, expand) beside the base GEMM, CPU."""
    from . import benchmark

    rec = benchmark("kernels-profile", base_spec=base, rank=rank, n_adapters=adapters, log=lambda *a: None)
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
    runs: Annotated[int, typer.Option(help="run manifests in the timed folder (copies of results/ comparisons)")] = 1200,
    reps: int = 3,
    src: Annotated[Optional[Path], typer.Option(help="results folder to copy from")] = None,
    out: Annotated[Optional[Path], typer.Option(help="JSON output (default results/bench/app-open.json)")] = None,
):
    """Time the app opening every view on a results folder of 1,200 runs: first open in a fresh process (nothing
    parsed) and reopen (cached), against the catalog scan alone."""
    from . import benchmark

    rec = benchmark("app", src=src, runs=runs, reps=reps, out_file=out, log=console.print)
    for view, v in rec["views"].items():
        console.print(f"{view}: first open {v['first_open_s']:.2f}s, reopen {v['reopen_s']:.2f}s "
                      f"({'within' if v['within_budget'] else 'OVER'} {rec['budget_s']}s)", highlight=False)
    console.print(f"{rec['runs']} runs; catalog scan alone {rec['catalog_scan_s']:.3f}s", highlight=False)


@bench_app.command("serve")
def bench_serve(
    pool: _Pool = "demo",
    requests: Annotated[Optional[int], typer.Option(help="closed loop: concurrent requests (default 64); open loop: "
                                                         "requests per run at every rate (default: rate x --duration)")] = None,
    adapters: Annotated[int, typer.Option(help="plain adapters in the mix (at most)")] = 8,
    max_tokens: Annotated[Optional[int], typer.Option(help="closed loop: tokens per request (default 16); open loop: "
                                                           "the longest output asked (default 256)")] = None,
    check: Annotated[bool, typer.Option(help="closed loop: compare the mixed round with PEFT generating each request "
                                             "alone")] = True,
    open_loop: Annotated[bool, typer.Option("--open-loop", help="Poisson arrivals at several offered rates, streamed: "
                                                                "continuous vs static batching vs the base, same run "
                                                                "(results/bench/serve-open.json, .svg)")] = False,
    rates: Annotated[Optional[str], typer.Option(help="open loop: offered loads in requests/s, comma-separated "
                                                      "(default 0.5,1,2,4)")] = None,
    duration: Annotated[float, typer.Option(help="open loop: seconds of arrivals per run (rate x duration "
                                                 "requests)")] = 60.0,
    reps: Annotated[int, typer.Option(help="open loop: rounds over every rate and arm")] = 2,
    min_tokens: Annotated[int, typer.Option(help="open loop: the shortest output asked")] = 4,
    short_tokens: Annotated[int, typer.Option(help="open loop: requests asking at most this many tokens are "
                                                   "short")] = 16,
    mixes: Annotated[int, typer.Option(help="open loop: mix: pairs of adapters in the mix")] = 2,
    arms: Annotated[Optional[str], typer.Option(help="open loop: comma-separated, of continuous, static, base, "
                                                     "adapters (default: all)")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="rows decoded together (default: closed 64, "
                                                          "open 32)")] = None,
    seed: Annotated[int, typer.Option(help="open loop: the workload's seed (arrivals, lengths, models)")] = 0,
    timeout: Annotated[float, typer.Option(help="open loop: a request not done in this many seconds fails")] = 600.0,
    device: _Dev = "cpu",
    backend: Annotated[Optional[str], typer.Option(help="open loop: kernel backend (default: by device)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="JSON record (default results/bench/serve.json, open loop: "
                                                     "serve-open.json)")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="open loop: the chart (default: beside the JSON, .svg)")] = None,
    raw: Annotated[bool, typer.Option(help="open loop: every request's timings beside the record "
                                           "(NAME.raw.json.gz)")] = True,
):
    """Closed loop (default): requests/s and p50/p95 latency of 64 concurrent requests over 8 adapters vs 1 adapter vs
    base, outputs checked against PEFT. --open-loop: Poisson arrivals at several rates, streamed; throughput, p50/p95
    TTFT and inter-token latency of continuous vs static batching vs the base, with a plot against offered load."""
    from . import benchmark

    if not open_loop:
        rec = benchmark("serve", pool_name=pool, n_requests=64 if requests is None else requests, n_adapters=adapters,
                        max_tokens=16 if max_tokens is None else max_tokens, check=check, out_file=out,
                        log=console.print, **({} if max_batch is None else {"max_batch": max_batch}))
        if (rec["exact_vs_peft_alone"] or {}).get("differing"):
            raise typer.Exit(1)
        return
    lists = {"rates": _split_list([rates] if rates else None), "arms": _split_list([arms] if arms else None)}
    benchmark("serve", mode="open", pool_name=pool, duration_s=duration, requests=requests, reps=reps,
              min_tokens=min_tokens, max_tokens=256 if max_tokens is None else max_tokens, short_tokens=short_tokens,
              n_adapters=adapters, n_mixes=mixes, max_batch=32 if max_batch is None else max_batch, seed=seed,
              request_timeout_s=timeout, device=device, backend=backend, out_file=out, plot=plot, raw=raw,
              log=console.print, **{k: v for k, v in lists.items() if v})


# ----------------------------------------------------------------------------- compare and demo


def _run_compare(recipe, *, executor: str, address: str | None, cpus: float, gpus: float, device: str,
                 results: Path | None):
    from . import ProgressBar, compare

    with ProgressBar(f"compare {Path(str(recipe)).stem}") as bar:
        board = compare(recipe, results_dir=results, executor=executor, device=device, address=address, cpus=cpus,
                        gpus=gpus, log=bar.log, progress=bar)
    _print_board(board)
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
    if dry_run:
        from . import describe_comparison

        for line in describe_comparison(recipe, results_dir=results, device=device, log=console.print):
            console.print(line, highlight=False)
        return
    _run_compare(recipe, executor=executor, address=address, cpus=cpus, gpus=gpus, device=device, results=results)


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
    from . import ProgressBar, run_demo

    with ProgressBar("workbench demo") as bar:
        board = run_demo(full=full, retrain=retrain, executor=executor, device=device, progress=bar, log=bar.log)
    _print_board(board)
    total = board.progress.total if board.progress else 0
    if total and board.reused == total:
        console.print(f"All {total} cells (builds and evaluations) were already recorded in {board.folder}/ (they "
                      "ship with the repository): this leaderboard was re-derived from them, nothing was rebuilt or "
                      f"evaluated. To recompute it, delete {board.folder}/ and run `workbench demo` again "
                      "(about 15 min on a 2-core CPU).", highlight=False)
    elif board.reused:
        console.print(f"{board.reused} of {total} cells were already recorded in {board.folder}/ and were reused; "
                      f"delete that folder to recompute them all.", highlight=False)
    if Path("app/app.py").is_file():
        console.print("open the app: .venv/bin/streamlit run app/app.py", highlight=False)


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
