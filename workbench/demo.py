"""The embedded default: SmolLM2-135M-Instruct + a demo pool of skill experts it lacks.

`build_demo_pool` trains what is missing and skips what is built, so an interrupted build
is resumed by running it again (each expert lands in the pool atomically). Retraining an expert
whose files are missing (a fresh clone) keeps its manifest entry: pool.json is not rewritten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .pool import Pool
from .tasks.suite import task_names
from .train import FullConfig, LoraConfigModel, train_expert

DEMO_POOL = "demo"
_ROOT = Path(__file__).resolve().parent.parent
# The quick main job (shipped LoRA experts, a --limit that fits minutes) and the full one (everything rebuilt,
# whole test splits, every recipe with its validation sweep): the provenance of the committed tables.
DEMO_COMPARISON = _ROOT / "merges" / "demo.yaml"
DEMO_FULL_COMPARISON = _ROOT / "merges" / "demo-full.yaml"
# Full fine-tunes for full-model merging (TIES/DARE/PCB through mergekit) and upcycling.
FULL_TASKS = ["addition", "sorting", "unit_conversion", "reverse_words"]


@dataclass(frozen=True)
class ExpertPlan:
    name: str
    tasks: tuple[str, ...]
    config: LoraConfigModel | FullConfig


def demo_plan() -> list[ExpertPlan]:
    held_in = tuple(task_names("held_in"))
    plan = [ExpertPlan(t, (t,), LoraConfigModel()) for t in held_in]
    # The multitask reference: same rank, the same examples per task as one expert sees.
    # The multitask reference: same rank, 2/3 of the examples per task one expert sees (CPU budget).
    plan.append(ExpertPlan("multitask", held_in, LoraConfigModel(steps=120 * len(held_in) // 3, batch_size=32)))
    plan += [ExpertPlan(f"full-{t}", (t,), FullConfig(steps=80, lr=1e-4)) for t in FULL_TASKS]
    return plan


def missing_shipped(pool_spec: str = DEMO_POOL) -> list[str]:
    """The demo pool's LoRA experts (shipped in the repository) whose files are not on disk."""
    pool = Pool.open(pool_spec)
    return [e.name for e in pool.experts if e.kind == "lora" and not e.files_present()]


def build_demo_pool(pool_spec: str = DEMO_POOL, base: str = "smollm2-135m", device: str = "cpu",
                    only: list[str] | None = None, log=print) -> Pool:
    pool = Pool.open_or_create(pool_spec, base=base)
    t0 = time.perf_counter()
    for plan in demo_plan():
        if only and plan.name not in only:
            continue
        if plan.name in pool and pool.expert(plan.name).files_present():
            log(f"skip {plan.name}: already in pool {pool.name}")
            continue
        # The manifest is committed, the weights are not: train them again, keeping the tracked entry
        # (added_at, training record) so that a rebuild does not rewrite pool.json.
        old = pool.expert(plan.name).entry if plan.name in pool else None
        if old:
            log(f"rebuilding {plan.name}: its files are missing")
        train_expert(pool, plan.name, list(plan.tasks), plan.config, device=device, replace=old is not None)
        if old:
            pool.keep_metadata(old)
    log(f"demo pool {pool.name}: {len(pool.names())} experts ({time.perf_counter() - t0:.0f}s this run)")
    return pool
