"""Expert Workbench: pools of LoRA and full fine-tuned experts, combined, evaluated, served.

The public API (every name below; `help(workbench.NAME)` for each):

- pools: `Pool` (`create`, `open`, `add`, `train`, `remove`, `verify`, `expert`, `peft_model`), `Expert`,
  `add_experts` (folders or hub ids in one go), `attach_data` (what an expert learned), `train_expert`,
  `list_pools`, `build_demo_pool`; base models: `BaseModel`, `base_info`, `DEFAULT_BASE`
- combining: `list_methods`, `plan` -> `BuildPlan`, `build` -> `Artifact`, `load` -> (model, tokenizer)
- evaluating: `evaluate` -> `Results`, `eval_matrix`, `eval_determinism`, `results_table`
- comparing: `compare` -> `Leaderboard` (`to_pandas`, `paired`, `summary`, `markdown`), `describe_comparison`,
  `leaderboards`, `merge_count_curve`, `run_demo`
- routing: `route_trace`, `route_traces`, `route_accuracy`
- serving and benchmarks: `serve`, `benchmark`
- errors: `WorkbenchError` (every error a user can cause; one line)

Names are imported on first use: `import workbench` does not pay for torch."""

from .errors import WorkbenchError

__version__ = "0.1.0"

_LAZY = {
    "DEFAULT_BASE": "base", "BaseModel": "base", "Expert": "pool", "Pool": "pool",
    **{name: "api" for name in (
        "Artifact", "BENCHMARKS", "BuildPlan", "Leaderboard", "ProgressBar", "Results", "add_experts", "attach_data",
        "base_info", "benchmark",
        "build", "build_demo_pool", "compare", "describe_comparison", "eval_determinism", "eval_matrix", "evaluate",
        "leaderboards", "list_methods", "list_pools", "load", "merge_count_curve", "plan", "results_table", "run_demo",
        "serve", "synthesize_pool", "train_expert", "training_data")},
    **{name: "tracing" for name in ("route_accuracy", "route_trace", "route_traces")},
}
__all__ = sorted([*_LAZY, "WorkbenchError"])


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
