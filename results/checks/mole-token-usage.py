"""Each token's own MoLE gate mixture on the demo experts' validation rows, for merges/mole-lora.yaml as committed
(lr 1e-4) and the same recipe at lr 5e-3 (the earlier default): per task the mean entropy of a token's gate (normalised
by log 6; 0 = one-hot), the own expert's top-1 share and weight share, and the pooled per-task entropy
(`workbench.methods.routing.usage_stats`, 10 rows a task). Reuses both builds from the artifact cache when they are
there (else trains them, about 8 min each on a 2-core CPU).
Usage: python results/checks/mole-token-usage.py > results/checks/mole-token-usage.json"""
import json
import subprocess
import sys
from pathlib import Path

import yaml

from workbench.artifacts import load_artifact
from workbench.methods.routing import held_rows, usage_stats
from workbench.pool import Pool
from workbench.recipes import build, parse_recipe

ROOT = Path(__file__).resolve().parents[2]
doc = yaml.safe_load((ROOT / "merges" / "mole-lora.yaml").read_text())
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
out = {"commit": commit, "recipe": "merges/mole-lora.yaml", "rows_per_task": 10, "split": "validation", "by_lr": {}}
for lr in (doc["parameters"]["lr"], 5e-3):
    recipe = {**doc, "parameters": {**doc["parameters"], "lr": lr}}
    art = build(parse_recipe(recipe), log=lambda *a: print(*a, file=sys.stderr))
    loaded = load_artifact(Path(art))
    pool = Pool.open(doc["pool"])
    rows = {e: held_rows(pool.expert(e), loaded.tokenizer, 10) for e in doc["experts"]}
    u = usage_stats(loaded.model, loaded.tokenizer, rows, n=10)
    out["by_lr"][f"{lr:g}"] = {"artifact_key": Path(art).name, **{k: u[k] for k in (
        "per_task_token_entropy", "own_top1_share", "own_weight_share", "per_task_weight_entropy")}}
print(json.dumps(out, indent=1))
