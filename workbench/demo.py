"""The embedded default: SmolLM2-135M-Instruct + a demo pool of skill experts it lacks.

`build_demo_pool` trains what is missing and skips what is built, so an interrupted build
is resumed by running it again (each expert lands in the pool atomically). Retraining an expert
whose files are missing (a fresh clone) keeps its manifest entry: pool.json is not rewritten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .data import open_data, suite_spec
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


# The LoRA experts are trained gently (learning rate 2.5e-4 for 200 steps, not 2e-3 for 120): each still
# learns its task, with a task vector (||sum scale B A||) about 4x smaller, so that merging two or more of
# them does not collapse into the louder one (see results/checks/demo-pool.json).
EXPERT_LORA = LoraConfigModel(lr=2.5e-4, steps=200)
# word_count reached 83% on its test split after 200 gentle steps (the bar is 85%): it gets 320.
EXPERT_LORA_STEPS = {"word_count": 320}


def demo_plan() -> list[ExpertPlan]:
    held_in = tuple(task_names("held_in"))
    plan = [ExpertPlan(t, (t,), EXPERT_LORA.model_copy(update={"steps": EXPERT_LORA_STEPS.get(t, EXPERT_LORA.steps)}))
            for t in held_in]
    # The multitask reference (trained jointly, never merged): same rank, 2/3 of the examples per task one
    # expert saw before the gentler schedule (CPU budget).
    plan.append(ExpertPlan("multitask", held_in, LoraConfigModel(steps=120 * len(held_in) // 3, batch_size=32)))
    # SMoRA's capacity control (merges/routing.yaml): the multitask LoRA at rank 64 (SMoRA's total rank), same data,
    # steps, batch and learning rate, the same alpha / r = 2. Not shipped (38 MB): `workbench demo --full` trains it.
    plan.append(ExpertPlan("multitask-r64", held_in,
                           LoraConfigModel(steps=120 * len(held_in) // 3, batch_size=32, r=64, alpha=128)))
    plan += [ExpertPlan(f"full-{t}", (t,), FullConfig(steps=80, lr=1e-4)) for t in FULL_TASKS]
    return plan


# The first demo pool's schedule, kept to show what it did to merging (merges/merge-count-old.yaml): each expert
# learns its task, with a task vector about 4x larger than the gentle schedule's.
OLD_EXPERT_LORA = LoraConfigModel(lr=2e-3, steps=120)


def old_plan() -> list[ExpertPlan]:
    return [ExpertPlan(t, (t,), OLD_EXPERT_LORA) for t in task_names("held_in")]


def ship_half(pool: Pool, names: list[str] | None = None, dtype: str = "float16", *, limit: int | None = None,
              tolerance: float = 0.02, log=print) -> dict:
    """Store the pool's LoRA experts in half precision (what the repository ships: half the bytes; every loader
    upcasts to fp32) where each task the expert learned scores within `tolerance` of the fp32 weights on the test
    split; an expert that drifts further stays fp32. Returns the check (scores per expert, task and dtype)."""
    import tempfile

    import torch
    from safetensors.torch import load_file, save_file

    from .eval.harness import LoadedModel, evaluate, scores_of
    from .io import sha256_file

    report = {"dtype": dtype, "split": "test", "limit": limit, "tolerance_points": 100 * tolerance, "experts": {}}
    for e in pool.experts:
        if e.kind != "lora" or (names and e.name not in names):
            continue
        f = e.path / "adapter_model.safetensors"
        tensors = load_file(str(f))
        if all(t.dtype == getattr(torch, dtype) for t in tensors.values() if t.is_floating_point()):
            if sha256_file(f) != e.entry.files.get(f.name):  # a run stopped between the swap and the manifest
                with pool._locked():
                    pool._put(e.entry.model_copy(update={"files": {**e.entry.files, f.name: sha256_file(f)}}))
            log(f"{e.name}: already {dtype}")
            continue
        tasks = e.tasks()
        staging = pool.root / ".staging"  # beside the pool: the swap below is a rename on one filesystem
        staging.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="wb-half-", dir=staging) as tmp:
            half = Path(tmp) / e.name
            half.mkdir()
            for g in e.entry.files:
                if g != f.name:
                    (half / g).write_bytes((e.path / g).read_bytes())
            cast = {k: (v.to(getattr(torch, dtype)) if v.dtype == torch.float32 else v).contiguous()
                    for k, v in tensors.items()}
            if not all(bool(torch.isfinite(v).all()) for v in cast.values() if v.is_floating_point()):
                log(f"{e.name}: {dtype} overflows: kept as it is")
                continue
            save_file(cast, str(half / f.name), metadata={"format": "pt"})
            scores = {}
            for label, folder in (("float32", e.path), (dtype, half)):
                from peft import PeftModel

                model = PeftModel.from_pretrained(pool.base.load(), str(folder), is_trainable=False).eval()
                loaded = LoadedModel(model, pool.base.tokenizer(), e.name, {"kind": "lora"})
                res = scores_of(evaluate(loaded, tasks, limit=limit, batch_size=32, log_samples=False))
                scores[label] = {t: float(res[t]["exact_match"]) for t in tasks}
            worst = max((abs(scores["float32"][t] - scores[dtype][t]) for t in tasks), default=0.0)
            ok = round(100 * worst, 6) <= round(100 * tolerance, 6)  # exactly `tolerance` passes
            report["experts"][e.name] = {"tasks": tasks, "scores": scores, "max_abs_diff_points": round(100 * worst, 2),
                                         "shipped": dtype if ok else "float32",
                                         "bytes_float32": f.stat().st_size, f"bytes_{dtype}": (half / f.name).stat().st_size}
            log(f"{e.name}: fp32 {scores['float32']} vs {dtype} {scores[dtype]} -> ship {dtype if ok else 'float32'}")
            if ok:
                tmpf = f.with_name(f".{f.name}.tmp")
                (half / f.name).replace(tmpf)
                tmpf.replace(f)
                with pool._locked():
                    pool._put(e.entry.model_copy(update={"files": {**e.entry.files, f.name: sha256_file(f)}}))
    return report


def ship_parts(comparison: Path = DEMO_COMPARISON, log=print) -> list[str]:
    """Copy the small trained parts the quick demo's methods need (PHATGOOSE gates, trained per expert) from the
    cache into `<pool>/parts/`, where builds find them: the shipped demo then trains none of them."""
    import shutil

    from .comparison import parse_comparison
    from .io import staging_dir
    from .methods.base import BuildContext

    c = parse_comparison(comparison)
    copied, wanted = [], set()
    parts = c.pool.root / "parts" / "phatgoose-gates"
    for row in c.active_rows:
        if row.kind != "artifact" or row.method != "phatgoose":
            continue
        r = row.recipe
        ctx = BuildContext(pool=c.pool, experts=r.experts, params=r.params, output=r.recipe.output,
                           out_dir=r.artifact_dir)
        for e in r.experts:
            src = r.method._gate_dir(ctx, e)
            dst = parts / src.name
            wanted.add(src.name)
            if dst.is_dir():
                continue
            if not src.is_dir():
                log(f"not shipped: no trained gate for {e.name} at {src.name} (build the {row.name!r} row first)")
                continue
            with staging_dir(dst) as tmp:
                for f in ("gates.safetensors", "curve.json"):
                    shutil.copy2(src / f, tmp / f)
            copied.append(dst.name)
            log(f"shipped {dst}")
    if wanted and parts.is_dir():  # gates of experts since retrained: no build will look for them again
        for old in sorted(p for p in parts.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if old.name not in wanted:
                shutil.rmtree(old)
                log(f"removed stale gate {old}")
    return copied


# The demo pool's experts whose weights the repository ships (fp16 LoRA files): the rest record how to build them
# (`rebuild` in pool.json: `workbench demo --full`).
SHIPPED = ("addition", "sorting", "unit_conversion", "word_count", "repeat_word", "reverse_words", "multitask")


def missing_shipped(pool_spec: str = DEMO_POOL) -> list[str]:
    """The demo pool's LoRA experts (shipped in the repository) whose files are not on disk."""
    pool = Pool.open(pool_spec)
    return [e.name for e in pool.experts if e.name in SHIPPED and not e.files_present()]


def build_demo_pool(pool_spec: str = DEMO_POOL, base: str = "smollm2-135m", device: str = "cpu",
                    only: list[str] | None = None, force: bool = False, log=print,
                    plans: list[ExpertPlan] | None = None, changed: bool = False) -> Pool:
    """Train the experts of `plans` (default `demo_plan()`) that are missing (`force`: every one, the shipped ones
    included)."""
    pool = Pool.open_or_create(pool_spec, base=base)
    t0 = time.perf_counter()
    for plan in plans if plans is not None else demo_plan():
        if only and plan.name not in only:
            continue
        if plan.name in pool and pool.expert(plan.name).files_present() and not force:
            recorded = pool.expert(plan.name).entry.training.get("config")
            differs = recorded is not None and recorded != plan.config.model_dump(mode="json")
            if not (differs and changed):
                log(f"skip {plan.name}: already in pool {pool.name}" + (
                    " (trained with another config than the plan's: `workbench demo --full` retrains it)"
                    if differs else ""))
                continue
        # The manifest is committed, the weights are not: train them again, keeping the tracked entry
        # (added_at, training record) so that a rebuild does not rewrite pool.json.
        old = pool.expert(plan.name).entry if plan.name in pool else None
        want = plan.config.model_dump(mode="json")
        same = old is not None and old.training.get("config", want) == want  # no recorded config: nothing to compare
        if old:
            why = ("its training config changed" if not same else "--full retrains it"
                   if pool.expert(plan.name).files_present() else "its files are missing")
            log(f"rebuilding {plan.name}: {why}")
        train_expert(pool, plan.name, [open_data(suite_spec(t, plan.config.data_seed)) for t in plan.tasks], plan.config,
                     device=device, replace=old is not None)
        if same:
            pool.keep_metadata(old)
    log(f"demo pool {pool.name}: {len(pool.names())} experts ({time.perf_counter() - t0:.0f}s this run)")
    return pool
