"""`workbench bench merge`: our merges against mergekit on the demo pool, in one run.

1. TIES (density 0.2) of 4 full SmolLM2 experts: `mergekit-yaml` vs our streaming TIES and
   PCB (per-tensor scope); wall time and peak anonymous memory, each in its own process.
2. Task arithmetic of the 6 LoRA experts: our exact adapter-space merge vs mergekit's
   `base+lora` path (materialise every LoRA into a full model, then merge); both write a full
   model. Each side runs `lora_repeats` times, alternating; the fastest run of each counts.
Every measured command is a fresh process (imports included), wall time and peak RssAnon.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ..eval.harness import git_state, machine_info, results_root
from ..io import atomic_write_json
from ..pool import Pool
from .procmem import measure

FULL = ["full-addition", "full-sorting", "full-unit_conversion", "full-reverse_words"]
LORA = ["addition", "sorting", "unit_conversion", "word_count", "repeat_word", "reverse_words"]


def _mergekit_yaml(config: dict[str, Any], out: Path, tmp: Path, name: str, *args: str) -> dict[str, float]:
    cfg_path = tmp / f"{name}.yml"
    cfg_path.write_text(yaml.safe_dump(config))
    exe = Path(sys.executable).with_name("mergekit-yaml")
    return measure([str(exe), str(cfg_path), str(out), *args], log_path=tmp / f"{name}.log")


def _ours(recipe: dict[str, Any], tmp: Path, name: str) -> dict[str, float]:
    """Our merge in a fresh process with an empty artifact cache (so it really builds)."""
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(recipe))
    code = ("import json,sys; from workbench.recipes import parse_recipe, build; "
            "build(parse_recipe(json.load(open(sys.argv[1]))), log=lambda *a: None)")
    return measure([sys.executable, "-c", code, str(path)],
                   env={"WORKBENCH_CACHE_ARTIFACTS": str(tmp / f"cache-{name}")}, log_path=tmp / f"{name}.log")


def run(pool_name: str = "demo", density: float = 0.2, lora_repeats: int = 3, out_file: Path | None = None,
        log=print) -> dict[str, Any]:
    pool = Pool.open(pool_name)
    base = str(pool.base.path)
    missing = [n for n in FULL + LORA if n not in pool]
    if missing:
        from ..errors import WorkbenchError

        raise WorkbenchError(f"pool {pool_name!r} lacks {missing}: run workbench pool build-demo first")
    root = str(pool.root.resolve())
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="wb-bench-merge-") as t:
        tmp = Path(t)
        full_models = [{"model": str(pool.expert(n).path), "parameters": {"weight": 1.0, "density": density}} for n in FULL]
        ties_cfg = {"merge_method": "ties", "base_model": base, "dtype": "float32",
                    "parameters": {"normalize": True, "lambda": 1.0, "int8_mask": False}, "models": full_models}
        log("1/5 mergekit-yaml TIES of 4 full experts ...")
        rows["mergekit_ties_full"] = _mergekit_yaml(ties_cfg, tmp / "mk_ties", tmp, "mk_ties")
        log(f"    {rows['mergekit_ties_full']}")
        log("2/5 workbench streaming TIES of 4 full experts ...")
        rows["workbench_ties_full"] = _ours({"name": "bench-ties", "pool": root, "method": "ties", "experts": FULL,
                                              "parameters": {"density": density, "engine": "workbench"}}, tmp, "wb_ties")
        log(f"    {rows['workbench_ties_full']}")
        log("3/5 workbench PCB (per-tensor scope) of 4 full experts ...")
        rows["workbench_pcb_tensor_full"] = _ours({"name": "bench-pcb", "pool": root, "method": "pcb", "experts": FULL,
                                                    "parameters": {"scope": "tensor", "ratio": density}}, tmp, "wb_pcb")
        log(f"    {rows['workbench_pcb_tensor_full']}")
        lora_models = [{"model": f"{base}+{pool.expert(n).path}", "parameters": {"weight": 1.0}} for n in LORA]
        ta_cfg = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
                  "parameters": {"lambda": 0.5}, "models": lora_models}
        ta_recipe = {"name": "bench-ta", "pool": root, "method": "task_arithmetic", "experts": LORA,
                     "parameters": {"lambda": 0.5}}
        mk_runs, wb_runs = [], []
        for k in range(lora_repeats):  # short runs: repeated, alternating, best of each reported
            log(f"4/5 mergekit-yaml task arithmetic of 6 LoRAs via base+lora ({k + 1}/{lora_repeats}) ...")
            mk_runs.append(_mergekit_yaml(ta_cfg, tmp / f"mk_ta_lora{k}", tmp, f"mk_ta_lora{k}",
                                          "--lora-merge-cache", str(tmp / f"mk_lora_cache{k}")))
            log(f"    {mk_runs[-1]}")
            log(f"5/5 workbench adapter-space task arithmetic of 6 LoRAs ({k + 1}/{lora_repeats}) ...")
            wb_runs.append(_ours(ta_recipe, tmp, f"wb_ta_lora{k}"))
            log(f"    {wb_runs[-1]}")
        for key, runs in (("mergekit_ta_lora", mk_runs), ("workbench_ta_lora", wb_runs)):
            rows[key] = min(runs, key=lambda r: r["wall_s"]) | {"runs": runs}
    mk, mkl = rows["mergekit_ties_full"], rows["mergekit_ta_lora"]
    ratios = {
        "ties_full_wall_vs_mergekit": rows["workbench_ties_full"]["wall_s"] / mk["wall_s"],
        "ties_full_anon_vs_mergekit": rows["workbench_ties_full"]["peak_rss_anon_mb"] / mk["peak_rss_anon_mb"],
        "pcb_tensor_full_wall_vs_mergekit_ties": rows["workbench_pcb_tensor_full"]["wall_s"] / mk["wall_s"],
        "pcb_tensor_full_anon_vs_mergekit_ties": rows["workbench_pcb_tensor_full"]["peak_rss_anon_mb"] / mk["peak_rss_anon_mb"],
        "lora_ta_speedup_vs_mergekit_base_plus_lora": mkl["wall_s"] / rows["workbench_ta_lora"]["wall_s"],
    }
    record = {"benchmark": "merge", "pool": pool_name, "density": density, "lora_repeats": lora_repeats, "rows": rows,
              "ratios": {k: round(v, 3) for k, v in ratios.items()},
              "targets": {"ties_full_wall_vs_mergekit": "<= 0.5", "ties_full_anon_vs_mergekit": "<= 0.5",
                          "pcb_tensor_full_wall_vs_mergekit_ties": "<= 0.5", "pcb_tensor_full_anon_vs_mergekit_ties": "<= 0.5",
                          "lora_ta_speedup_vs_mergekit_base_plus_lora": ">= 10"},
              "machine": machine_info("cpu"), "git": git_state(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(out_file or results_root() / "bench" / "merge.json", record)
    return record
