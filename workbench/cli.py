"""`workbench` command line. User errors print one line and exit with code 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import WorkbenchError

app = typer.Typer(help="Expert Workbench: pools of experts, combined, evaluated and served.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
base_app = typer.Typer(help="Base models: fetch into the cache, show info.", no_args_is_help=True)
pool_app = typer.Typer(help="Expert pools under adapters/: create, add, list, show, remove, verify.",
                       no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(pool_app, name="pool")

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
):
    """Validate an expert against the pool's base and add it."""
    from .pool import Pool

    if kind not in (None, "lora", "full"):
        raise WorkbenchError(f"invalid --kind {kind!r}: use lora or full")
    p = Pool.open(pool)
    with console.status(f"validating and adding {source} ..."):
        e = p.add(source, name or source.resolve().name, kind=kind, link=link, tags=_parse_tags(tag), notes=notes)
    console.print(f"[green]added[/] {e.kind} expert {e.name} to pool {p.name}")


@pool_app.command("list")
def pool_list(pool: Annotated[Optional[str], typer.Argument(help="a pool: list its experts")] = None):
    """List the pools under adapters/, or the experts of one pool."""
    from .pool import MANIFEST, Pool, pools_dir

    if pool is None:
        table = Table("pool", "base", "experts", "lora", "full")
        for m in sorted(pools_dir().glob(f"*/{MANIFEST}")):
            p = Pool.open(m.parent)
            table.add_row(p.name, p.manifest.base.spec, str(len(p.names())), str(len(p.names("lora"))),
                          str(len(p.names("full"))))
        console.print(table)
        return
    p = Pool.open(pool)
    table = Table("expert", "kind", "rank", "tags", "linked", title=f"pool {p.name} (base {p.manifest.base.spec})")
    for e in p.manifest.experts:
        table.add_row(e.name, e.kind, str(e.lora.r) if e.lora else "-",
                      ", ".join(f"{k}={v}" for k, v in e.tags.items()), "yes" if e.linked else "")
    console.print(table)


@pool_app.command("show")
def pool_show(
    pool: Annotated[str, typer.Argument(help="pool name or path")],
    expert: Annotated[Optional[str], typer.Argument(help="one expert: show its entry")] = None,
):
    """Show a pool's manifest, or one expert's entry (tags, training metadata, files)."""
    from .pool import Pool

    p = Pool.open(pool)
    data = p.expert(expert).entry.model_dump(mode="json") if expert else p.manifest.model_dump(mode="json")
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
