"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class WorkbenchError(Exception):
    """Base class for every error caused by user input (bad names, files, configs)."""


class BaseModelError(WorkbenchError):
    """A base model spec could not be resolved or loaded."""


class PoolError(WorkbenchError):
    """A pool or one of its experts is invalid or cannot be changed as asked."""


class ManifestError(PoolError):
    """A pool manifest cannot be read (invalid JSON or schema)."""


class ExpertValidationError(PoolError):
    """An expert's files do not fit the pool (shapes, targets, formats, values)."""


class TaskError(WorkbenchError):
    """A task name or task data is invalid."""


class RecipeError(WorkbenchError):
    """A recipe or method parameters are invalid."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
