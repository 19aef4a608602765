"""Evaluation: any model the workbench builds, through lm-eval, into results/."""

from .harness import LoadedModel, evaluate, load_model_spec, run_eval
from .results import collect_scores, results_table

__all__ = ["LoadedModel", "collect_scores", "evaluate", "load_model_spec", "results_table", "run_eval"]
