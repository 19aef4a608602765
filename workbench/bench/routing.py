"""`workbench bench routing`: the cost of per-token routing beside its peers, measured in one run.

SmolLM2-135M, E = 6 random LoRA experts (r = 8, all 7 projections; the cost does not depend on
trained values), a batched forward of 32 sequences x 64 tokens and greedy decoding (KV cache) of
32 prompts. Candidates, each timed interleaved with the others (fastest of `reps`):
- base: the model alone;
- lora: one plain LoRA (our routed layer, one fixed adapter for every sequence);
- peft_mixed: PEFT's mixed batch (`adapter_names=`, one of the 6 adapters per sequence);
- routed top-k: PHATGOOSE's router (standardised scores / sqrt(d), softmax, top-2) over the 6,
  sparse dispatch through the multi-LoRA op;
- routed top-k sparse: the same with the op's grouped backend forced (only each token's k experts
  computed); the default `cpu` backend picks, by cost, one masked matmul over all active experts
  when their ranks add up to little (6 x 8 here);
- dense: every token through all 6 experts with softmax weights (the routed layer's dense path:
  what a router without sparse dispatch costs);
- mole: MoLE's gate over the same 6 experts (every expert's output computed, normalised, projected
  to the gate logits; all experts active);
- smora_op / smora_op_grouped / smora_gather: SMoRA, R = 64 rank experts of which k = 8 per token, on
  a second copy of the model (its own adapter): through the multi-LoRA op as 64 rank-1 adapters (the
  `cpu` backend's choice, and the grouped backend forced), and through the gather path (each token's
  k rows of A and B gathered); smora_dense: all 64 ranks computed and masked (the training path).
Routing prototypes and gates are random: with trained ones only the choice of experts changes, not the cost.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..base import BaseModel
from ..eval.harness import git_state, machine_info, results_root
from ..io import atomic_write_json
from ..modules.routed_lora import RoutedGroup, routed_modules, wrap_model
from ..modules.routers import FixedRouter, PrototypeRouter
from .kernels import TARGETS, _time


class _SoftmaxAll:
    """Dense weights softmax(scores) over all experts from a prototype router (the dense peer)."""

    def __init__(self, router: PrototypeRouter):
        self.router = router

    def weights(self, module: str, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.router.scores(module, x), dim=-1).to(x.dtype)


def run(base_spec: str = "smollm2-135m", experts: int = 6, rank: int = 8, k: int = 2, seqs: int = 32,
        tokens: int = 64, new_tokens: int = 16, reps: int = 3, out_file=None, log=print, smora_rank: int = 64,
        smora_k: int = 8) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from ..methods.mole import MoleRouter
    from ..methods.smora import SmoraRouter

    bm = BaseModel(base_spec)
    tok = bm.tokenizer()
    g = torch.Generator().manual_seed(0)
    margin = min(100, len(tok) // 10)
    ids = torch.randint(margin, len(tok) - margin, (seqs, tokens), generator=g)
    prompts = ids[:, :24]
    names = [f"e{i}" for i in range(experts)]
    torch.manual_seed(rank)
    peft = get_peft_model(bm.load(), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                init_lora_weights=False), adapter_name=names[0])
    for n in names[1:]:
        peft.add_adapter(n, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
    peft.eval()
    factors: dict[str, list] = {}
    for mod_name, mod in peft.named_modules():
        if hasattr(mod, "lora_A") and names[0] in mod.lora_A:
            key = mod_name.replace("base_model.model.", "") + ".weight"
            factors[key] = [(mod.lora_A[n].weight.detach(), mod.lora_B[n].weight.detach(), mod.scaling[n]) for n in names]
    base = bm.load().eval()
    model = bm.load().eval()
    ctx = wrap_model(model, sorted(factors), lambda t: factors[t], experts)
    mods = routed_modules(model)
    protos = {m: torch.randn(experts, lin.base.in_features, generator=g) for m, lin in mods.items()}
    router = PrototypeRouter(names, protos, k=k, kind="phatgoose")
    mole = MoleRouter(names, {m: lin.base.out_features for m, lin in mods.items()})
    with torch.no_grad():
        for p in mole.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    groups = {"lora": ([RoutedGroup(FixedRouter(names, [1.0] + [0.0] * (experts - 1), k=1), None)], False),
              f"routed_top{k}": ([RoutedGroup(router, None)], False),
              "dense": ([RoutedGroup(_SoftmaxAll(router), None)], True),
              "mole": ([RoutedGroup(mole, None)], False)}
    # SMoRA: its own adapter (R rank-1 experts) on a second copy of the model
    smora_model = bm.load().eval()
    dims = {t[: -len(".weight")]: [mods[t[: -len(".weight")]].base.in_features, mods[t[: -len(".weight")]].base.out_features]
            for t in factors}
    smora = SmoraRouter(smora_rank, dims, k=smora_k)
    smora.init_weights(0)
    with torch.no_grad():
        for key in smora.keys.values():
            smora.B[key].copy_(torch.randn(smora.B[key].shape, generator=g) * 0.01)
    smora_ctx = wrap_model(smora_model, sorted(factors), lambda t: smora.lora_factors(t[: -len(".weight")]), smora_rank)
    per_seq = [names[i % experts] for i in range(seqs)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def ours(name, fn, backend=None):
        grp, dense = groups[name]

        def call():
            ctx.backend = backend  # None: the device's default (on CPU `cpu`, which picks a path by cost)
            with ctx.use(groups=grp, dense=dense):
                return fn(model)
        return call

    def smora_call(fn, dispatch, backend=None, dense=False):
        def call():
            smora.dispatch, smora_ctx.backend = dispatch, backend
            with smora_ctx.use(groups=[RoutedGroup(smora, None)], dense=dense):
                return fn(smora_model)
        return call

    def fwd(m, **kw):
        return m(input_ids=ids, **kw)

    def dec(m, **kw):
        return m.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, **kw)

    rec: dict[str, Any] = {}
    with torch.inference_mode():
        for phase, fn in (("forward", fwd), ("decode", dec)):
            fns = {"base_s": lambda fn=fn: fn(base),
                   "peft_mixed_s": lambda fn=fn: fn(peft, adapter_names=per_seq),
                   **{f"{n}_s": ours(n, fn) for n in groups},
                   # the sparse path forced: only each token's k experts computed (gather, 2 matmuls, scatter)
                   f"routed_top{k}_sparse_s": ours(f"routed_top{k}", fn, "cpu_grouped"),
                   "smora_op_s": smora_call(fn, "op"), "smora_op_grouped_s": smora_call(fn, "op", "cpu_grouped"),
                   "smora_gather_s": smora_call(fn, "gather"), "smora_dense_s": smora_call(fn, "op", dense=True)}
            log(f"routing bench: {phase} ({len(fns)} candidates x {reps} interleaved rounds)")
            samples = _time(fns, reps)
            best = {key[:-2]: min(v) for key, v in samples.items()}
            unit = seqs * (tokens if phase == "forward" else new_tokens)
            rec[phase] = {"seconds": {n: round(s, 4) for n, s in best.items()},
                          "samples_s": {key[:-2]: [round(t, 4) for t in v] for key, v in samples.items()},
                          "tokens_per_s": {n: round(unit / s, 1) for n, s in best.items()},
                          "x_base": {n: round(s / best["base"], 3) for n, s in best.items()},
                          f"routed_top{k}_x_lora": round(best[f"routed_top{k}"] / best["lora"], 3),
                          f"routed_top{k}_x_peft_mixed": round(best[f"routed_top{k}"] / best["peft_mixed"], 3),
                          f"routed_top{k}_x_dense": round(best[f"routed_top{k}"] / best["dense"], 3),
                          "smora_sparse_fastest": min(("smora_op", "smora_op_grouped", "smora_gather"), key=best.get)}
            log(f"  {phase}: " + ", ".join(f"{n} {v}x" for n, v in rec[phase]["x_base"].items()))
    record = {"benchmark": "routing", "base": base_spec, "experts": experts, "rank": rank, "k": k,
              "smora": {"rank": smora_rank, "k": smora_k},
              "shape": {"sequences": seqs, "tokens": tokens, "prompt_tokens": prompts.shape[1], "new_tokens": new_tokens},
              **rec, "target": f"routed_top{k} forward <= 1.3x base", "machine": machine_info("cpu"), "git": git_state(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(out_file or results_root() / "bench" / "routing-cpu.json", record)
    return record
