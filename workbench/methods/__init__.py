"""Combination methods, one small module each, registered by name in METHODS."""

from . import arrow, avg_act, merge_io, merge_ta, mole, pcb, phatgoose, smora, twin, upcycle  # noqa: F401  (registration)
from .base import METHODS, BuildContext, Method, MethodParams, OutputSpec

__all__ = ["METHODS", "BuildContext", "Method", "MethodParams", "OutputSpec"]
