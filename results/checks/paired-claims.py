"""Paired tests behind the docs' 'beats' claims, from the committed cells (nothing is run), Holm-corrected per family."""
import json, subprocess
import workbench as wb
from workbench.eval.harness import resolve_tasks

hi, ho = resolve_tasks(["held_in"]), resolve_tasks(["held_out"])
families = {
    # (row a, row b[, tasks]): held-in unless another task group is named
    "merges/upcycle.yaml": [("bam", "btx"), ("bam-shared-kv", "bam"), ("btx", "mergekit-moe"),
                            ("btx", "btx-untrained"), ("mergekit-moe", "mergekit-moe-untrained")],
    "merges/routing.yaml": [("mole-lora", "ta-lora"), ("mole-lora", "ties-lora"), ("mole-lora", "pcb-lora"),
                            ("mole-lora", "dare-lora"), ("smora-lora", "multitask"),
                            ("smora-lora", "multitask", "held_out")],
}
out = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(), "test": "exact McNemar on the examples both rows scored; Holm within each comparison",
       "families": {}}
for recipe, pairs in families.items():
    board = wb.Leaderboard.read(recipe)
    tests = [board.paired(a, b, tasks=ho if rest == ["held_out"] else hi) | {"tasks": rest[0] if rest else "held_in"}
             for a, b, *rest in pairs]
    order = sorted(range(len(tests)), key=lambda i: tests[i]["p_value"])
    m, running = len(tests), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * tests[i]["p_value"]))
        tests[i]["p_holm"] = running
    out["families"][recipe] = tests
print(json.dumps(out, indent=1))
