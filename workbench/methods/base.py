"""The one interface every combination method implements.

A method is a class with a pydantic `Params` model, registered by name in `METHODS` by the module that defines it
(any module of `workbench.methods`: METHODS imports them all on its first lookup).
`build(ctx)` writes an artifact folder (with `artifact.json`) that `workbench.artifacts`
loads back as a model for evaluation and serving. The CLI, recipes and app only use
`METHODS.get(name)`: no method is special-cased outside its own module.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field
from pydantic_core import PydanticCustomError

from ..errors import RecipeError
from ..io import atomic_write_json
from ..pool import Expert, Pool
from ..registry import Registry

# Bounds of the numeric parameters (schemas of methods, training, recipes, comparisons): every number is finite
# (no .inf, no .nan) and bounded above where a huge value is a hang (steps, examples: index lists, loops) or a
# no-op in disguise (warm-up longer than training, a limit larger than any split).
MAX_STEPS = 100_000  # optimizer steps (and warm-up, checkpoint intervals)
# Every CPU build runs on this many torch threads, whatever OMP_NUM_THREADS says: reductions (SVDs, matmuls) split
# by the thread count, so one key gives one artifact, byte for byte, on a machine (a key names this number).
BUILD_THREADS = 2
MAX_BATCH = 4096  # examples per step / per forward
MAX_ACCUMULATION = 1024  # batches accumulated per optimizer step
MAX_EXAMPLES = 1_000_000  # examples per expert
MAX_LIMIT = 100_000  # examples per task evaluated
MAX_RANK = 4096  # LoRA / SVD ranks
MAX_K = 1024  # experts per token (also <= the number of experts, checked by the methods)
MAX_LENGTH = 32_768  # tokens per example
MAX_SEED = 2**32 - 1  # seeds: 0..2**32-1
MAX_TEMPERATURE = 1e4  # softmax temperatures: (0, 1e4]
MAX_SCALE = 1e3  # |lambda|, weights, loss coefficients
MAX_LR = 1.0  # learning rates: (0, 1]


def check_warmup(params: Schema, *, steps_field: str = "steps", zero_steps_ok: bool = False) -> None:
    """Cross-field check (a model validator's): a warm-up as long as the training never reaches the learning rate (at
    10**12 it trains nothing). An explicitly given `warmup` must be below `steps`; a default one longer than a short
    training is clamped to `steps - 1` while validating (`steps: 3` with MoLE's default warm-up of 8 warms up 2 steps,
    then decays), so the validated parameters (and the key) say what the training does."""
    steps, warmup = getattr(params, steps_field), params.warmup
    if zero_steps_ok and steps == 0:
        return
    if "warmup" not in params.model_fields_set:
        if steps > 0 and warmup >= steps:
            object.__setattr__(params, "warmup", steps - 1)  # still validating: the model is not frozen to anyone yet
        return
    if warmup >= steps:
        raise PydanticCustomError("wb_warmup", "warmup {warmup} is not below steps {steps} (the learning rate would "
                                               "never reach its peak): give a shorter warm-up",
                                  {"warmup": warmup, "steps": steps})


class MethodParams(Schema):
    """Base of every method's parameters: strict (typos fail), immutable once validated, finite numbers only."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class OutputSpec(Schema):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    kind: Literal["model", "lora"] = Field("model", description="a merged full model folder, or a re-factored LoRA")
    rank: int | None = Field(None, gt=0, le=MAX_RANK,
                             description=f"LoRA rank of the truncated SVD (output kind lora; 1..{MAX_RANK})")


@dataclass
class BuildContext:
    pool: Pool
    experts: list[Expert]
    params: Any  # the method's validated Params
    output: OutputSpec
    out_dir: Path  # the artifact folder to write (a staging folder, renamed when done)
    recipe: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    log: Any = print


def cache_key_extras(ctx: BuildContext) -> dict[str, Any]:
    """What a method's own training cache (PHATGOOSE and MoLE gates, SMoRA's and the upcycled MoEs' checkpoints)
    must key beside its settings, as artifact keys do (`BuildPlan.key_body`): the base's tokenizer files when they
    are its own and the device kind when it is not the CPU (gates trained on a GPU are other bytes); empty for a CPU
    build over a GGUF base, so such caches keep their keys (the demo pool's shipped gates)."""
    from ..recipes import device_kind

    out: dict[str, Any] = {}
    if tokenizer := ctx.pool.base.tokenizer_sha256:
        out["base_tokenizer"] = tokenizer
    if (kind := device_kind(ctx.device)) != "cpu":
        out["device"] = kind
    return out


class Method:
    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    expert_kinds: ClassVar[frozenset[str]] = frozenset({"lora", "full"})
    outputs: ClassVar[frozenset[str]] = frozenset({"model", "lora"})
    lora_from_full: ClassVar[bool] = False  # can output a LoRA from full experts (none can yet: 1-D norms, no rank)
    description: ClassVar[str] = ""
    version: ClassVar[int] = 1  # part of the artifact key: bump when the method's output changes
    # artifact.json fields a comparison copies into its build records under results/ (training curves, usage,
    # model statistics); a `loss_curve` among them is drawn in the comparison's training.svg
    report: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def form_fields(cls, fields: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The parameter fields (`param_fields`, each with `implied`: the value used when left out) a form shows for
        this method: those it reads, starting where a user would start. Default: every field as declared."""
        return fields

    def key_inputs(self, experts: list[Expert], params: MethodParams) -> dict[str, Any]:
        """Hashes of the data `build` reads beyond the experts' files (e.g. task data); part of the artifact key."""
        return {}

    def validate(self, experts: list[Expert], params: MethodParams, output: OutputSpec) -> None:
        """Cross-field checks before any work starts; raise RecipeError."""
        kinds = {e.kind for e in experts}
        if not kinds <= self.expert_kinds:
            raise RecipeError(f"method {self.name!r} takes {'/'.join(sorted(self.expert_kinds))} experts, got {sorted(kinds)}")
        if output.kind not in self.outputs:
            raise RecipeError(f"method {self.name!r} cannot output {output.kind!r} (only {sorted(self.outputs)})")
        if output.kind == "lora" and output.rank is None:
            raise RecipeError("output kind 'lora' needs a rank (output: {kind: lora, rank: 16})")
        full = [e.name for e in experts if e.kind == "full"]
        if output.kind == "lora" and full and not self.lora_from_full:
            raise RecipeError(f"method {self.name!r} cannot output a LoRA from full experts {full}: "
                              "use output kind 'model'")
        if len(experts) < 1:
            raise RecipeError(f"method {self.name!r} needs at least one expert")

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        """Write the artifact's files into ctx.out_dir; return its `artifact.json` fields."""
        raise NotImplementedError


def import_methods() -> None:
    """Import every module of `workbench.methods`: each registers its methods (and artifact types) on import.

    METHODS runs this on its first lookup, so a new method is one new module and nothing else. Method modules import
    torch and the model libraries inside the functions that use them: listing the methods (`workbench methods`)
    imports every module and must stay fast (tests/test_startup.py checks it).
    """
    import importlib
    import pkgutil

    package = __name__.rpartition(".")[0]
    for mod in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{mod.name}")


METHODS: Registry[type[Method]] = Registry("method", RecipeError, load=import_methods)


def register_method(cls: type[Method]) -> type[Method]:
    METHODS.add(cls.name, cls)
    return cls


def no_grad(fn):
    """`@torch.no_grad()` that imports torch when the function runs, not when its module is imported."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def write_artifact_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    atomic_write_json(out_dir / "artifact.json", {**meta, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def param_fields(method: str) -> list[dict[str, Any]]:
    """A method's parameters as form fields (name, type, default, choices, description), from its Params schema:
    what the app renders as inputs. type: number | integer | boolean | choice | json (anything else)."""
    schema = METHODS.get(method).Params.model_json_schema(by_alias=True)
    out = []
    for name, prop in (schema.get("properties") or {}).items():
        kinds = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
        nullable = len(kinds) < len(prop.get("anyOf", [prop]))
        k = kinds[0] if len(kinds) == 1 else {}
        if "enum" in k:
            typ, choices = "choice", list(k["enum"])
        elif k.get("type") in ("number", "integer", "boolean"):
            typ, choices = k["type"], None
        else:
            typ, choices = "json", None
        out.append({"name": name, "type": typ, "default": prop.get("default"), "choices": choices,
                    "nullable": nullable, "description": prop.get("description", ""),
                    "minimum": k.get("minimum", k.get("exclusiveMinimum")), "maximum": k.get("maximum")})
    return out
