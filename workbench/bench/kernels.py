"""`workbench bench kernels`: multi-LoRA forward cost relative to the base model's forward.

SmolLM2-135M, r = 8 and 16 on all 7 projections, 32 sequences x 64 tokens, U distinct adapters
(sequences assigned round-robin). Measured in the same run, interleaved, each on its own model copy:
the base forward; PEFT's mixed batch (`adapter_names=`); PEFT one forward per adapter
(`set_adapter` + that adapter's sequences); ours (MultiLoraModel) with each CPU backend.
Random adapters (B non-zero) stand in for trained ones: the cost does not depend on values.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import torch

from ..base import BaseModel
from ..eval.harness import RESULTS_DIR, git_state, machine_info
from ..io import atomic_write_json
from ..serve.engine import Adapter, MultiLoraModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _time(fns: dict[str, Any], reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, interleaved (one call of each per round, after a warm-up
    round) so that drift of the machine's speed hits every candidate alike."""
    for fn in fns.values():
        fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


@torch.inference_mode()
def _row(base, peft, engines: dict[str, MultiLoraModel], ids: torch.Tensor, names: list[str], reps: int) -> dict[str, Any]:
    """One (rank, U) row: seconds per forward of each candidate and their ratios to the base forward."""
    check_peft = peft(input_ids=ids[:2], adapter_names=names[:2]).logits
    row: dict[str, Any] = {}

    def per_adapter_loop():
        for a in sorted(set(names)):
            peft.set_adapter(a)
            peft(input_ids=ids[[j for j, n in enumerate(names) if n == a]])

    fns = {"base_s": lambda: base(input_ids=ids),
           "peft_mixed_s": lambda: peft(input_ids=ids, adapter_names=names),
           "peft_loop_s": per_adapter_loop}
    for b, eng in engines.items():
        assign = [eng.resolve(n) for n in names]
        got = eng.forward(ids[:2], assignments=assign[:2]).logits
        row[f"max_abs_diff_vs_peft_{b}"] = float((got - check_peft).abs().max())
        fns[f"ours_{b}_s"] = functools.partial(eng.forward, ids, assignments=assign)
    row |= _time(fns, reps)
    for k in [k for k in row if k.endswith("_s") and k != "base_s"]:
        row[k.replace("_s", "_x_base")] = round(row[k] / row["base_s"], 3)
    return row


def run(base_spec: str = "smollm2-135m", ranks=(8, 16), us=(1, 4, 16, 32), seqs: int = 32, tokens: int = 64,
        reps: int = 3, backends=("cpu", "grouped_mm"), dtype=torch.float32, device: str = "cpu",
        out_file=None, log=print) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    bm = BaseModel(base_spec)
    tok = bm.tokenizer()
    g = torch.Generator().manual_seed(0)
    margin = min(100, len(tok) // 10)  # keep clear of special tokens at either end
    ids = torch.randint(margin, len(tok) - margin, (seqs, tokens), generator=g).to(device)
    base = bm.load(dtype=dtype, device=device)
    rows = []
    for r in ranks:
        n_adapters = max(us)
        torch.manual_seed(r)
        peft = get_peft_model(bm.load(dtype=dtype, device=device),
                              LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False),
                              adapter_name="a0")
        for i in range(1, n_adapters):
            peft.add_adapter(f"a{i}", LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False))
        peft.eval()
        # the same adapters for our engine
        adapters = []
        for i in range(n_adapters):
            factors = {}
            for name, mod in peft.named_modules():
                if hasattr(mod, "lora_A") and f"a{i}" in mod.lora_A:
                    key = name.replace("base_model.model.", "") + ".weight"
                    factors[key] = (mod.lora_A[f"a{i}"].weight.detach(), mod.lora_B[f"a{i}"].weight.detach(),
                                    mod.scaling[f"a{i}"])
            adapters.append(Adapter(f"a{i}", "lora", factors))
        engines = {b: MultiLoraModel(bm.load(dtype=dtype), tok, adapters, backend=b, device=device, dtype=dtype)
                   for b in backends}
        for u in us:
            row = _row(base, peft, engines, ids, [f"a{i % u}" for i in range(seqs)], reps) | {"rank": r, "U": u}
            rows.append(row)
            log(f"r={r} U={u}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k.endswith("x_base")))
        del peft, engines  # free this rank's models before the next
    record = {"benchmark": "kernels", "base": base_spec, "shape": {"sequences": seqs, "tokens": tokens},
              "dtype": str(dtype).replace("torch.", ""), "device": device, "rows": rows,
              "target": "ours <= 1.10x base at U=32", "machine": machine_info(device), "git": git_state(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(out_file or RESULTS_DIR / "bench" / f"kernels-{device}-{record['dtype']}.json", record)
    return record
