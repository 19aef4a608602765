"""Evaluation: any model the workbench builds, through lm-eval, into results/.

Names are imported on first use (the harness pulls in lm-eval and torch; readers of results need neither)."""

__all__ = ["LoadedModel", "collect_scores", "evaluate", "load_model_spec", "migrate", "paired_samples",
           "read_samples", "results_table", "run_eval", "scrub"]

_LAZY = {"LoadedModel": "harness", "evaluate": "harness", "load_model_spec": "harness", "run_eval": "harness",
         "migrate": "record", "read_samples": "record", "scrub": "record",
         "collect_scores": "results", "paired_samples": "results", "results_table": "results"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
