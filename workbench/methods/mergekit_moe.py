"""mergekit-moe as the peer of BTX: mergekit's own MoE builder, then the same MoE training.

The dense experts (full fine-tunes, or LoRA experts materialised into the base) are written to temp folders;
mergekit's Mixtral builder (`mergekit.scripts.moe.build`, what the `mergekit-moe` CLI runs) takes each
expert's FFN as an MoE expert, the rest from its `base_model` (here the experts' average, as BTX; or the pool's
base), and sets the routers with `gate_mode: hidden`: per layer, expert e's row is the normalised hidden state
of the last token of its positive prompts (questions from expert e's training data), computed with the base
model. Then the MoE trains as BTX's does (`steps: 0` keeps mergekit's model untrained), so both can be
evaluated before and after the same training.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..errors import RecipeError, WorkbenchError
from ..faults import fault_point
from .base import BuildContext, register_method
from .merge_io import write_merged_model
from .upcycle import MoeTrainParams, Sources, UpcycleMethod

if TYPE_CHECKING:
    import torch


class MergekitMoeParams(MoeTrainParams):
    prompts: int = Field(16, gt=0, le=10_000,
                         description="positive prompts per expert (questions of its training data; at most 10,000)")
    base_model: Literal["average", "pool_base"] = Field(
        "average", description="mergekit's base_model (attention, norms, embeddings, gate hidden states): the "
                               "experts' average, or the pool's base")


def positive_prompts(expert, n: int, seed: int, tokenizer=None) -> list[str]:
    """Up to n prompts of the expert's own training data (shuffled by `seed`): mergekit's positive prompts."""
    from ..data import prompt_text
    from .routing import expert_rows

    return [prompt_text(r) for r in expert_rows(expert, n, seed, tokenizer)]


@register_method
class MergekitMoe(UpcycleMethod):
    name = "mergekit_moe"
    Params = MergekitMoeParams
    version = 1
    description = "mergekit-moe (Mixtral, gate_mode hidden, prompts from the experts' data), then BTX's MoE training"

    def validate(self, experts, params, output) -> None:
        super().validate(experts, params, output)
        seen: dict[tuple[str, ...], str] = {}
        for e in experts:
            key = tuple(sorted(r.identity for r in e.data()))
            if key in seen:
                raise RecipeError(f"mergekit_moe: experts {seen[key]!r} and {e.name!r} learned the same data "
                                  f"{[r.name for r in e.data()]}, so the same positive prompts: mergekit's hidden gates "
                                  "could not tell them apart")
            seen[key] = e.name

    def make_model(self, ctx: BuildContext, src: Sources, tok) -> tuple[torch.nn.Module, dict[str, Any]]:
        import torch
        from mergekit.merge import MergeOptions
        from mergekit.moe.config import MoEMergeConfig
        from mergekit.scripts.moe import build as mergekit_moe_build
        from transformers import MixtralForCausalLM

        p: MergekitMoeParams = ctx.params
        base = src.base
        # inside the build's own staging folder: a killed build's leftovers go with it (`recipes.build` removes a dead
        # build's `.staging-*` folders), never a folder of its own beside the artifacts
        with tempfile.TemporaryDirectory(prefix="wb-mergekit-moe-", dir=ctx.out_dir) as tmp:
            tmp = Path(tmp)
            folders = []
            for i, e in enumerate(ctx.experts):
                ctx.log(f"mergekit_moe: materialising expert {e.name}")
                folder = tmp / f"expert-{i}"
                write_merged_model(base, ((n, src.weight(i, n)) for n in base.tensors.keys()), folder, absolute=True)
                folders.append(folder)
            if p.base_model == "average":
                base_dir = tmp / "average"
                write_merged_model(base, ((n, src.mean(n)) for n in base.tensors.keys()), base_dir, absolute=True)
            else:
                base_dir = base.path
            fault_point("mergekit_moe")  # the kill tests: experts materialised, mergekit not yet run
            config = MoEMergeConfig.model_validate({
                "base_model": str(base_dir), "gate_mode": "hidden", "dtype": "float32",
                "experts_per_token": p.top_k, "architecture": "Mixtral",
                "experts": [{"source_model": str(f), "positive_prompts": positive_prompts(e, p.prompts, p.seed, tok)}
                            for f, e in zip(folders, ctx.experts)]})
            out = tmp / "moe"
            ctx.log("mergekit_moe: running mergekit's MoE builder (gate_mode hidden)")
            try:
                mergekit_moe_build(config, str(out), MergeOptions(device="cpu", copy_tokenizer=True, quiet=True),
                                   device="cpu")
            except SystemExit:  # mergekit reports a bad config by logging it and exiting
                raise WorkbenchError("mergekit_moe: mergekit refused the MoE config (see its log above)") from None
            model = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        model.config.router_aux_loss_coef = p.aux_loss_coef
        return model, {"router_init": "mergekit gate_mode hidden", "prompts_per_expert": p.prompts,
                       "base_model": p.base_model, "averaged": "attention, embeddings, norms"
                       if p.base_model == "average" else "none (taken from the pool's base)"}
