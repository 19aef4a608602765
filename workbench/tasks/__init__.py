"""Task suite: held-in skill tasks, held-out generalisation tasks and domain text sets."""

from .suite import DOMAINS, TASKS, Task, check_answer, generate_suite, load_split, suite_dir, task_names

__all__ = ["DOMAINS", "TASKS", "Task", "check_answer", "generate_suite", "load_split", "suite_dir", "task_names"]
