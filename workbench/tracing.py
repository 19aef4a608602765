"""Routing traces and router accuracy of a routed recipe (PHATGOOSE, Arrow, avg-act, MoLE, ...): the library behind
`workbench route trace|traces|accuracy`. Each builds the recipe's artifact if needed, loads it, records what the
router did and writes JSON (and a chart) under the results folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .errors import WorkbenchError
from .io import atomic_write_json

Log = Callable[[str], None]
MAX_PROMPT_CHARS = 1 << 20  # a prompt file of more than 1 MiB is a mistake: refused before it is tokenised


def save_chart(chart, path: Path) -> None:
    """An altair chart to `path` (format from its suffix), atomically: a temp sibling renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    chart.save(str(tmp))
    tmp.replace(path)


def expert_tasks(resolved) -> dict[str, str]:
    """Routed expert -> the task it was trained on (tag task=...), multitask experts left out; refused in one line
    when no expert names its task."""
    tasks = {e.name: (e.entry.tags or {}).get("task") for e in resolved.experts}
    tasks = {e: t for e, t in tasks.items() if t and t != "multitask"}
    if not tasks:
        raise WorkbenchError(f"{resolved.source}: no routed expert names its task (tag task=...)")
    return tasks


def check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise WorkbenchError("empty prompt: give the text to trace (or --prompt-file FILE, - for standard input)")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise WorkbenchError(f"prompt of {len(prompt):,} characters: at most {MAX_PROMPT_CHARS:,}")
    return prompt


def read_prompt(source: str | Path, stdin=None, limit: int = MAX_PROMPT_CHARS) -> str:
    """A prompt from a file, or from standard input for `-` (`stdin`: a stream, default sys.stdin's bytes): at most
    `limit` bytes are read, whatever the source says of its size (a device like /dev/zero, a pipe, a FIFO report none),
    and a longer one is refused in one line. Raises WorkbenchError: too long, unreadable, not UTF-8."""
    import sys

    name = "standard input" if str(source) == "-" else f"--prompt-file {source}"
    try:
        if str(source) == "-":
            stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", sys.stdin)  # text when replaced
            data = stream.read(limit + 1)
            if isinstance(data, str):
                data = data.encode("utf-8")[: limit + 1]
        else:
            with open(source, "rb") as f:
                data = f.read(limit + 1)
    except OSError as e:
        raise WorkbenchError(f"{name}: cannot read it ({e.strerror or type(e).__name__})") from None
    if len(data) > limit:
        raise WorkbenchError(f"{name}: over {limit:,} bytes (a prompt is at most {limit >> 20} MiB): not read further")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WorkbenchError(f"{name}: not UTF-8 text (invalid byte at offset {e.start})") from None


def _load(recipe, device: str, log: Log):
    from .artifacts import load_artifact
    from .recipes import build, parse_recipe

    resolved = parse_recipe(recipe) if not hasattr(recipe, "recipe") else recipe
    return resolved, load_artifact(build(resolved, device=device, log=log), device=device)


def route_trace(recipe: str | Path | dict, prompt: str | None = None, *, prompt_file: str | Path | None = None,
                out: Path | None = None, device: str = "cpu", log: Log = print) -> dict[str, Any]:
    """Which experts each token of `prompt` chose at each layer, with what weight. The prompt is checked (not
    empty, at most the model's context) before the model runs; with `out` the trace is written there as JSON.
    `prompt_file` (instead of `prompt`; `-` for standard input) is read by `read_prompt`: at most 1 MiB."""
    from .methods.routing import trace_prompt

    from .recipes import parse_recipe

    if prompt_file is not None:
        if prompt is not None:
            raise WorkbenchError("give the prompt or a prompt file, not both")
        prompt = read_prompt(prompt_file)
    check_prompt(prompt)
    resolved = parse_recipe(recipe) if not hasattr(recipe, "recipe") else recipe
    base = resolved.pool.base  # checked before any build: the base's tokenizer and context
    n_tokens = len(base.tokenizer()(prompt)["input_ids"])
    context = int(base.config.get("max_position_embeddings") or 0)
    if context and n_tokens > context:
        raise WorkbenchError(f"prompt of {n_tokens:,} tokens is longer than the model's context ({context:,} tokens)")
    resolved, loaded = _load(resolved, device, log)
    tr = {"recipe": resolved.recipe.name, "pool": resolved.pool.name,
          **trace_prompt(loaded.model, loaded.tokenizer, prompt)}
    if out is not None:
        atomic_write_json(Path(out), tr)
    return tr


def route_traces(recipe: str | Path | dict, *, out: Path | None = None, split: str = "test", device: str = "cpu",
                 log: Log = print) -> dict[str, Any]:
    """One prompt per routed expert's task: in how many layers does that task's expert get the most weight? Traces go
    to `out` (default <results>/traces/<recipe>-<task>.json), the summary to <results>/checks/."""
    from .eval.harness import results_root
    from .methods.routing import task_traces
    from .recipes import parse_recipe

    resolved = parse_recipe(recipe) if not hasattr(recipe, "recipe") else recipe
    tasks = expert_tasks(resolved)
    resolved, loaded = _load(resolved, device, log)
    rec = task_traces(loaded.model, loaded.tokenizer, tasks, split=split)
    folder = Path(out) if out is not None else results_root() / "traces"
    name = resolved.recipe.name
    for task, r in rec["tasks"].items():
        atomic_write_json(folder / f"{name}-{task}.json", {"recipe": name, "pool": resolved.pool.name, "task": task,
                                                           **r["trace"]})
    summary = {"recipe": name, "pool": resolved.pool.name, "split": split,
               "tasks": {t: {k: v for k, v in r.items() if k != "trace"} for t, r in rec["tasks"].items()},
               "summary": rec["summary"]}
    atomic_write_json(folder.parent / "checks" / f"routing-traces-{name}.json", summary)
    return summary | {"traces_dir": str(folder), "summary_file": str(folder.parent / "checks" /
                                                                      f"routing-traces-{name}.json")}


def route_accuracy(recipe: str | Path | dict, *, n: int = 20, split: str = "validation", out: Path | None = None, device: str = "cpu",
                   log: Log = print) -> dict[str, Any]:
    """Router accuracy per layer: how often each task's tokens go to its own expert (top-1 and within top-k), with
    the gates' training-loss curves where the method trains gates. JSON + SVG under `out` (default
    <results>/checks/)."""
    from .artifacts import read_artifact_meta
    from .eval.charts import loss_curves_chart, router_accuracy_chart
    from .eval.harness import results_root
    from .methods.routing import check_one_expert_per_task, router_accuracy
    from .recipes import build, parse_recipe

    if not isinstance(n, int) or not 1 <= n <= 10_000:
        raise WorkbenchError(f"n = {n!r}: examples per task must be an integer in 1..10000")
    resolved = parse_recipe(recipe) if not hasattr(recipe, "recipe") else recipe
    tasks = expert_tasks(resolved)
    check_one_expert_per_task(tasks)  # before any build (PHATGOOSE trains gates)
    from .artifacts import load_artifact

    art = build(resolved, device=device, log=log)
    loaded = load_artifact(art, device=device)
    rec = router_accuracy(loaded.model, loaded.tokenizer, tasks, split=split, n=n)
    name = resolved.recipe.name
    folder = Path(out) if out is not None else results_root() / "checks"
    atomic_write_json(folder / f"router-accuracy-{name}.json",
                      {"recipe": name, "pool": resolved.pool.name,
                       "params": resolved.params.model_dump(mode="json", by_alias=True), **rec})
    save_chart(router_accuracy_chart(rec, f"{name}: share of each task's tokens routed (top-1) to its own expert, "
                                          f"{split}, {n} examples"), folder / f"router-accuracy-{name}.svg")
    curves = read_artifact_meta(art).get("gate_loss_curves")
    files = [str(folder / f"router-accuracy-{name}.json"), str(folder / f"router-accuracy-{name}.svg")]
    if curves:
        atomic_write_json(folder / f"gate-loss-{name}.json", {"recipe": name, "curves": curves})
        save_chart(loss_curves_chart(curves, f"{name}: gate training loss per expert (base and LoRA frozen)"),
                   folder / f"gate-loss-{name}.svg")
        files += [str(folder / f"gate-loss-{name}.json"), str(folder / f"gate-loss-{name}.svg")]
    return rec | {"recipe": name, "files": files}


__all__ = ["check_prompt", "expert_tasks", "route_accuracy", "route_trace", "route_traces", "save_chart"]
