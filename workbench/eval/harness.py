"""lm-eval on model objects: HFLM around whatever module a spec resolves to, offline.

Each run writes, under `results/lm-eval/<model>/` (see `record`): lm-eval's results JSON
`results_<run_id>.json`, the per-example outputs `samples_<run_id>.jsonl.gz` and a workbench run
manifest `run_<run_id>.json` (spec, pool, method and parameters, settings, git commit, timings,
machine), all without the machine's absolute paths. A rerun with the same settings replaces the
older run once it is fully written; runs with other settings stay beside it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WorkbenchError
from ..io import atomic_write_json, file_lock, lock_for
from ..pool import Pool
from ..tasks import lmeval
from ..tasks.suite import ADD_SPECIAL_TOKENS, DEFAULT_SEED
from . import record

PathList = str | Path | list[str | Path] | tuple | None  # include folders: one or a list

# The results folder is a parameter of every writer; this is only the default, read when called (never fixed at
# import): RESULTS_DIR when a caller sets it, else $WORKBENCH_RESULTS, else results/.
RESULTS_DIR: Path | None = None


def results_root() -> Path:
    return Path(RESULTS_DIR) if RESULTS_DIR is not None else Path(os.environ.get("WORKBENCH_RESULTS", "results"))


def set_offline() -> None:
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[k] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class LoadedModel:
    model: Any  # an nn.Module with .config, .device, .generate and logits from __call__
    tokenizer: Any
    name: str
    info: dict[str, Any] = field(default_factory=dict)


def load_model_spec(spec: str, pool: Pool | None = None, device: str | None = None) -> LoadedModel:
    """Resolve SPEC: `base`, an expert of `pool`, or a folder (HF model, PEFT adapter, artifact)."""
    from peft import PeftModel

    path = Path(spec)
    if spec == "base":
        if pool is None:
            raise WorkbenchError("model 'base' needs --pool (or use a base model folder)")
        return LoadedModel(pool.base.load(device=device), pool.base.tokenizer(), "base",
                           {"kind": "base", "base": pool.manifest.base.spec, "method": "base"})
    if pool is not None and spec in pool:
        e = pool.expert(spec)
        tok = pool.base.tokenizer()
        if e.kind == "lora":
            model = PeftModel.from_pretrained(pool.base.load(device=device), str(e.path), is_trainable=False).eval()
        else:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(e.path, dtype=torch.float32).eval()
            model = model.to(device) if device else model
        method = "multitask" if e.entry.tags.get("task") == "multitask" else f"expert-{e.kind}"
        return LoadedModel(model, tok, spec, {"kind": e.kind, "expert": spec, "method": method,
                                              "tags": e.entry.tags})
    if path.is_dir() and (path / "artifact.json").is_file():
        from ..artifacts import load_artifact

        return load_artifact(path, device=device)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        if pool is None:
            raise WorkbenchError(f"{spec} is a LoRA adapter: give --pool for its base model")
        model = PeftModel.from_pretrained(pool.base.load(device=device), str(path), is_trainable=False).eval()
        return LoadedModel(model, pool.base.tokenizer(), path.name, {"kind": "lora", "path": str(path)})
    if path.is_dir() and (path / "config.json").is_file():
        from ..base import BaseModel

        bm = BaseModel(path)
        return LoadedModel(bm.load(device=device), bm.tokenizer(), path.name, {"kind": "full", "path": str(path)})
    known = ", ".join(["base", *(pool.names() if pool else [])])
    raise WorkbenchError(f"unknown model {spec!r}: not one of [{known}] nor a model, adapter or artifact folder")


def resolve_tasks(tasks: list[str], include_path: PathList = None, split: str = "test") -> list[str]:
    """Task names -> the names of the tasks they stand for (see `tasks.lmeval.resolve`): suite names and groups
    (`held_in`, `held_out`, `skills`, `domains`, `all`), tasks of the `include_path` folders' YAMLs, lm-eval's own
    tasks, groups and tags (a group: its leaf tasks). Unknown names, task YAMLs lm-eval rejects and registry tasks
    whose data is not cached fail here, in one line."""
    return [r.name for r in lmeval.resolve(tasks, include_path, split)]


def make_lm(loaded: LoadedModel, batch_size: int):
    """lm-eval's HFLM around a loaded model, encoding prompts as training does (ADD_SPECIAL_TOKENS)."""
    from lm_eval.models.huggingface import HFLM

    max_len = min(1024, int(getattr(loaded.model.config, "max_position_embeddings", 1024) or 1024))
    return HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, max_length=max_len,
                add_bos_token=ADD_SPECIAL_TOKENS)


_ENV_INFO: dict[str, Any] = {}


def _cache_env_info() -> None:
    """lm-eval collects the machine's environment (torch's collect_env: several subprocesses, 1-2 s here) and the
    git hash on every call; a comparison makes hundreds of calls in one process, where neither changes: collect
    them once per process, then copy them into each result."""
    import lm_eval.evaluator as ev
    from lm_eval.loggers import utils as lu

    if getattr(ev.add_env_info, "_workbench_cached", False):
        return

    def add_env_info(storage: dict[str, Any]) -> None:
        if not _ENV_INFO:
            lu.add_env_info(_ENV_INFO)
        storage.update(_ENV_INFO)

    git = lu.get_git_commit_hash()
    add_env_info._workbench_cached = True
    ev.add_env_info = add_env_info
    ev.get_git_commit_hash = lambda: git


def evaluate(loaded: LoadedModel, tasks: list[str | lmeval.TaskRef], *, limit: int | None = None,
             batch_size: int = 16, split_seed: int = DEFAULT_SEED, log_samples: bool = True, split: str = "test",
             include_path: PathList = None, apply_chat_template: bool = False) -> dict[str, Any]:
    """Run lm-eval on a loaded model; returns lm-eval's results dict (with `samples`).

    `tasks`: names (resolved with `include_path`, see `resolve_tasks`) or TaskRefs. split="validation" scores the
    validation split (for selecting hyperparameters).
    """
    import lm_eval

    if split not in ("test", "validation"):
        raise WorkbenchError(f"unknown evaluation split {split!r}; use test or validation")
    set_offline()
    refs = lmeval.resolve(tasks, include_path, split)
    _cache_env_info()
    tm = lmeval.task_manager(refs, split_seed)
    # Rolling perplexity materialises [batch, window, vocab] logits: run it at a small batch size.
    rolling = [r.output_type == "loglikelihood_rolling" for r in refs]
    groups = [([r for r, x in zip(refs, rolling) if not x], batch_size),
              ([r for r, x in zip(refs, rolling) if x], min(batch_size, 4))]
    merged: dict[str, Any] | None = None
    for group, bs in groups:
        if not group:
            continue
        # suite tasks by name (as lm-eval always ran them); others built here, so that what lm-eval rejects, or data
        # missing offline, is one line naming the task
        specs = [r.lm_task(split) if r.source == "suite" else lmeval.load_task(tm, r, split) for r in group]
        lm = make_lm(loaded, bs)
        res = lm_eval.simple_evaluate(
            model=lm, tasks=specs, limit=limit, task_manager=tm, log_samples=log_samples,
            bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
            verbosity="ERROR", **({"apply_chat_template": True} if apply_chat_template else {}),
        )
        if res is None:
            raise WorkbenchError("lm-eval returned no results")
        if merged is None:
            merged = res
        else:  # one results dict in lm-eval's format: merge the per-task sections
            for key, value in res.items():
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key].update(value)
    return merged


def filters_of(res: dict[str, Any]) -> dict[str, str]:
    """{task: the one lm-eval filter it is scored by} (`metrics.primary_filter`: the first of its filter_list as
    lm-eval reports it, else of its results keys; "none" for a task without a filter_list)."""
    from . import metrics

    out = {}
    for name in res["results"]:
        task = record.suite_task(name)
        if (flt := metrics.primary_filter(task, res)) is not None:
            out[task] = flt
    return out


def scores_of(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results (task names without the wb_ / _val affixes), of each task's one
    filter (`filters_of`: a task with several filters, e.g. strict-match and flexible-extract, is never scored by a
    mix of them nor by whichever lm-eval reported last); the run manifest records that filter beside (`filters`)."""
    from . import metrics

    flts = filters_of(res)
    return {record.suite_task(name): metrics.filter_scores(entry, flts.get(record.suite_task(name)))
            for name, entry in res["results"].items()}


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], check=False, capture_output=True, text=True, timeout=10)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    # dirty: tracked files changed outside results/ (a job's own outputs there, e.g. a comparison's plan.json
    # rewritten at its start, say nothing about the code that made them)
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)results"))}


def machine_info(device: str | None) -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "device": device or "cpu", "threads": torch.get_num_threads()}
    if device and device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_eval(spec: str, tasks: list[str | lmeval.TaskRef], *, pool: Pool | None = None, limit: int | None = None,
             batch_size: int = 16, device: str | None = None, results_dir: Path | None = None,
             loaded: LoadedModel | None = None, extra: dict[str, Any] | None = None,
             log_samples: bool = True, split: str = "test", out_dir: Path | None = None,
             include_path: PathList = None, apply_chat_template: bool = False) -> dict[str, Any]:
    """Evaluate SPEC on TASKS and save lm-eval results, samples and a run manifest; returns the manifest.
    `apply_chat_template`: prompts rendered by the tokenizer's chat template (lm-eval's option), as experts trained
    on a chat column saw them.

    `tasks`: names (resolved with `include_path`, see `resolve_tasks`) or TaskRefs (a comparison's). Every task is
    resolved and checked before the model is loaded; nothing is written for a task that fails.
    `results_dir` is the lm-eval folder (default results_root() / "lm-eval"; `out_dir` is its older name).
    """
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import sanitize_model_name

    if results_dir is not None and out_dir is not None and Path(results_dir) != Path(out_dir):
        raise WorkbenchError(f"run_eval: results_dir {results_dir} and out_dir {out_dir} disagree; give one")
    set_offline()
    refs = lmeval.resolve(tasks, include_path, split)
    tasks = [r.name for r in refs]
    keys = {r.name: lmeval.task_key_inputs(r) for r in refs}  # the data as evaluated: hashed before, not after
    out_dir = Path(results_dir or out_dir or results_root() / "lm-eval")
    t0 = time.perf_counter()
    loaded = loaded or load_model_spec(spec, pool, device)
    t_load = time.perf_counter() - t0
    tracker = EvaluationTracker()
    t1 = time.perf_counter()
    if apply_chat_template and not getattr(loaded.tokenizer, "chat_template", None):
        raise WorkbenchError(f"--apply-chat-template: the tokenizer of {loaded.name} has no chat template")
    res = evaluate(loaded, refs, limit=limit, batch_size=batch_size, log_samples=log_samples, split=split,
                   apply_chat_template=apply_chat_template)
    t_eval = time.perf_counter() - t1
    run_name = loaded.name if pool is None else f"{pool.name}__{loaded.name}"
    gct = tracker.general_config_tracker
    gct.model_name, gct.model_name_sanitized = run_name, sanitize_model_name(run_name)
    gct.model_source = "workbench"
    samples = res.pop("samples", None)
    with tempfile.TemporaryDirectory(prefix="wb-lm-eval-") as tmp:  # lm-eval writes here; we scrub and move
        tracker.output_path = tmp
        tracker.save_results_aggregated(results=res, samples=samples)
        written = Path(tmp) / gct.model_name_sanitized / f"results_{tracker.date_id}.json"
        if not written.is_file():  # lm-eval logs a failed write and carries on
            raise WorkbenchError(f"lm-eval did not write its results for {run_name}")
        lm_json = json.loads(written.read_text(encoding="utf-8"))
    run_id, roots = tracker.date_id, record.default_roots()
    include = sorted({p for r in refs for p in r.include_path})
    if include:  # the include folders by a portable name, like the cache's
        roots = dict(sorted({**{p: lmeval.INCLUDE for p in include}, **roots}.items(), key=lambda kv: -len(kv[0])))
    folder = out_dir / gct.model_name_sanitized
    with file_lock(lock_for(folder)):  # this model's record: written and pruned by one process at a time
        atomic_write_json(folder / f"results_{run_id}.json", record.scrub(lm_json, roots))
        if samples and log_samples:
            record.write_samples(folder / f"samples_{run_id}.jsonl.gz",  # data, kept verbatim: never scrubbed
                                 [record.compact_sample(record.suite_task(t), s) for t, rows in samples.items() for s in rows])
        manifest = record.scrub({
            "run_id": run_id, "model": spec, "model_name": run_name,
            "pool": pool.name if pool else None, "base": pool.manifest.base.spec if pool else None,
            "method": loaded.info.get("method", loaded.info.get("kind")), "model_info": loaded.info,
            "params": (extra or {}).get("params", {}), "tasks": tasks, "limit": limit, "split": split,
            "batch_size": batch_size, "data_sha256": {t: k["data"] for t, k in keys.items()},
            **({"apply_chat_template": True} if apply_chat_template else {}),
            "scores": scores_of(res), "filters": filters_of(res),  # each task's scores are of its one filter
            # tasks from outside the suite: where each came from (suite-only manifests are unchanged)
            **({"task_sources": {r.name: {"source": r.source, "lm_eval": r.lm_name, "group": r.group,
                                          "config": keys[r.name]["config"]} for r in refs if r.source != "suite"}}
               if any(r.source != "suite" for r in refs) else {}),
            "samples_logged": bool(samples and log_samples),
            "results_file": (folder / f"results_{run_id}.json").relative_to(out_dir.parent).as_posix(),
            "git": git_state(), "timings": {"load_s": round(t_load, 2), "eval_s": round(t_eval, 2)},
            "machine": machine_info(device), **{k: v for k, v in (extra or {}).items() if k != "params"},
        }, roots)
        atomic_write_json(folder / f"run_{run_id}.json", manifest)
        record.replace_older_runs(folder, manifest)
    return manifest
