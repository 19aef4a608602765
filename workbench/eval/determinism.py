"""Evaluation determinism: one model evaluated twice at batch 16 and once at batch 1, on the same examples. Scores and
generations must agree (padding and batching must not change a greedy answer)."""

from __future__ import annotations

from typing import Any


def eval_determinism(pool: str, model: str = "addition", tasks: list[str] | None = None, *, limit: int = 50,
                     device: str = "cpu", log=print) -> dict[str, Any]:
    """Returns (and writes to <results>/checks/eval-determinism-<pool>-<model>.json) the record: `repeat_identical`,
    `batch1_vs_16_scores_equal`, `batch1_vs_16_generation_differences` and each run's scores."""
    from ..io import atomic_write_json
    from ..pool import Pool
    from .harness import evaluate, load_model_spec, resolve_tasks, results_root, scores_of

    p = Pool.open(pool)
    task_list = resolve_tasks(tasks or ["addition", "sorting", "word_count"])
    loaded = load_model_spec(model, p, device)
    runs = {}
    for label, bs in [("bs16_a", 16), ("bs16_b", 16), ("bs1", 1)]:
        res = evaluate(loaded, task_list, limit=limit, batch_size=bs)
        gens = {t: [s["filtered_resps"][0] for s in sorted(res["samples"][t], key=lambda s: s["doc_id"])]
                for t in res["samples"]}
        runs[label] = {"scores": scores_of(res), "generations": gens}
        log(f"{label}: {runs[label]['scores']}")
    same = runs["bs16_a"] == runs["bs16_b"]
    bs_agree = runs["bs16_a"]["scores"] == runs["bs1"]["scores"]
    gen_diff = sum(a != b for t in runs["bs1"]["generations"]
                   for a, b in zip(runs["bs16_a"]["generations"][t], runs["bs1"]["generations"][t]))
    record = {"pool": p.name, "model": model, "tasks": task_list, "limit": limit, "repeat_identical": same,
              "batch1_vs_16_scores_equal": bs_agree, "batch1_vs_16_generation_differences": gen_diff,
              "scores": {k: v["scores"] for k, v in runs.items()}}
    atomic_write_json(results_root() / "checks" / f"eval-determinism-{p.name}-{model}.json", record)
    return record
