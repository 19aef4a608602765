"""What each row of a comparison cost, from what the workbench recorded: build time, extra active parameters per
token and evaluation time per example. Nothing is estimated: a row whose records lack a number gets None and the
reason (`why`), so a chart can say which rows it leaves out.

- build time (s): the artifact manifest's `build_s` (the cache, `io.artifacts_dir()`: the time of the build that
  made it), else the comparison's build record's (`builds/<row>.json`; 0 there means the cached artifact was
  reused, not free); an expert of the pool: its training `wall_s` in the pool manifest; the base: 0, nothing built.
  A swept row's time is its chosen point's build alone, not the sweep's.
- extra active parameters per token, beyond the base model's: the artifact manifest's `parameter_counts` (SMoRA:
  the activated adapter ranks plus the router); a LoRA (a pool expert, a merged LoRA artifact): its adapter's
  tensors, counted from the safetensors header; a merged full model: 0 (merged into the base's weights); the base:
  0. Other types (routed LoRAs, MoEs) do not record the number.
- evaluation time per example (s): the row's cells' `eval_s` summed over its tasks, divided by their examples:
  lm-eval's wall time at the comparison's batch size (generation included), not a serving latency.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

COSTS = ("build_s", "active_params", "eval_s_per_example")
COST_LABEL = {"build_s": "build time (s)", "active_params": "extra active parameters per token",
              "eval_s_per_example": "evaluation time per example (s)"}
MAX_HEADER = 16 << 20  # a safetensors header over 16 MiB is not an adapter's


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _json(path: Path) -> dict[str, Any] | None:
    from ..cells import read_record

    return read_record(path)  # bounded in size and depth; None when absent, unreadable or not an object


def safetensors_params(path: Path) -> int | None:
    """The number of parameters in a safetensors file, from its header alone (None: absent or not safetensors)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    total = 0
    for k, v in header.items():
        if k == "__metadata__" or not isinstance(v, dict) or not isinstance(v.get("shape"), list):
            continue
        total += math.prod(int(s) for s in v["shape"])
    return total


def _artifact(rec: dict[str, Any] | None) -> tuple[Path | None, dict[str, Any] | None]:
    from ..io import artifacts_dir

    if not rec or not isinstance(rec.get("artifact"), str):
        return None, None
    folder = artifacts_dir() / Path(rec["artifact"]).name
    return folder, _json(folder / "artifact.json")


def _pool_experts(pool: str | None) -> tuple[Path | None, dict[str, dict[str, Any]]]:
    if not pool:
        return None, {}
    try:
        from ..pool import resolve_pool_path

        root = resolve_pool_path(pool)
    except Exception:  # noqa: BLE001 - a pool that is gone: its experts' costs are unknown, never an error
        return None, {}
    d = _json(root / "pool.json") or {}
    return root, {e["name"]: e for e in d.get("experts") or [] if isinstance(e, dict) and isinstance(e.get("name"), str)}


def row_costs(board: dict[str, Any], folder: str | Path | None, cells: dict[tuple[str, str], dict[str, Any]]
              ) -> list[dict[str, Any]]:
    """One record per row of `board` (a leaderboard; `folder`: its comparison's folder, for builds/; `cells`: (row,
    task) -> cell): model, method, held_in / held_out mean and se (%), and per cost in `COSTS` its value (None:
    not recorded) and `<cost> from` (where it came from, or why it is missing)."""
    root, experts = _pool_experts(board.get("pool"))
    out = []
    for r in board["rows"]:
        name, method = r["name"], r.get("method")
        rec: dict[str, Any] = {"model": name, "method": method}
        for g in ("held_in", "held_out"):
            s = (r.get("summary") or {}).get(g) or {}
            rec[g] = 100 * s["mean"] if _finite(s.get("mean")) else None
            rec[f"{g}_se"] = 100 * s["stderr"] if _finite(s.get("stderr")) else None
        build = _json(Path(folder) / "builds" / f"{name}.json") if folder else None
        art_dir, art = _artifact(build)
        expert = experts.get(name) if method in ("expert-lora", "expert-full", "multitask") or build is None else None
        # build time
        if method == "base":
            rec["build_s"], rec["build_s from"] = 0.0, "the base: nothing built"
        elif art and _finite(art.get("build_s")) and art["build_s"] > 0:
            rec["build_s"], rec["build_s from"] = float(art["build_s"]), "artifact manifest"
        elif build and _finite(build.get("build_s")) and build["build_s"] > 0:
            rec["build_s"], rec["build_s from"] = float(build["build_s"]), "build record"
        elif expert and _finite((expert.get("training") or {}).get("wall_s")):
            rec["build_s"], rec["build_s from"] = float(expert["training"]["wall_s"]), "pool manifest (training)"
        else:
            rec["build_s"] = None
            rec["build_s from"] = ("not recorded: trained elsewhere" if expert else
                                   "not recorded: the artifact manifest is not in this cache" if build else
                                   "not recorded: no build record")
        # extra active parameters per token
        counts = (art or {}).get("parameter_counts") or {}
        if method == "base":
            rec["active_params"], rec["active_params from"] = 0.0, "the base: nothing added"
        elif _finite(counts.get("activated_adapter_per_token")):
            rec["active_params"] = float(counts["activated_adapter_per_token"]) + float(counts.get("router") or 0)
            rec["active_params from"] = "artifact manifest (activated adapter + router)"
        elif art is not None and art.get("type") == "merged_model":
            rec["active_params"], rec["active_params from"] = 0.0, "merged into the base's weights"
        elif art_dir is not None and art is not None and (n := safetensors_params(art_dir / "adapter_model.safetensors")):
            rec["active_params"], rec["active_params from"] = float(n), "the merged LoRA's tensors"
        elif expert and root is not None and expert.get("kind") == "lora" and (
                n := safetensors_params(root / str(expert.get("path", "")) / "adapter_model.safetensors")):
            rec["active_params"], rec["active_params from"] = float(n), "the expert's LoRA tensors"
        else:
            rec["active_params"] = None
            rec["active_params from"] = (f"not recorded for a {art.get('type')} artifact" if art else
                                         "not recorded: the artifact manifest is not in this cache" if build else
                                         "not recorded")
        # evaluation time per example
        secs = [(c["eval_s"], c.get("n")) for (row, _), c in cells.items()
                if row == name and _finite(c.get("eval_s")) and _finite(c.get("n")) and c["n"] > 0]
        if secs:
            rec["eval_s_per_example"] = sum(s for s, _ in secs) / sum(n for _, n in secs)
            rec["eval_s_per_example from"] = f"cells' eval_s ({len(secs)} tasks)"
        else:
            rec["eval_s_per_example"], rec["eval_s_per_example from"] = None, "not recorded: no cell has eval_s"
        out.append(rec)
    return out


def missing(costs: list[dict[str, Any]], cost: str) -> list[str]:
    """The rows without a value of `cost`."""
    return [r["model"] for r in costs if r.get(cost) is None]


__all__ = ["COSTS", "COST_LABEL", "missing", "row_costs", "safetensors_params"]
