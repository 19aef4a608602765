"""Evaluation: any model the workbench builds, through lm-eval, into results/."""

from .harness import LoadedModel, evaluate, load_model_spec, run_eval
from .record import migrate, read_samples, scrub
from .results import collect_scores, paired_samples, results_table

__all__ = ["LoadedModel", "collect_scores", "evaluate", "load_model_spec", "migrate", "paired_samples",
           "read_samples", "results_table", "run_eval", "scrub"]
