"""Combination methods, one small module each, registered by name in METHODS.

METHODS imports every module of this package on its first lookup (`methods.base.import_methods`): adding a method is
adding a module. Method modules import torch inside functions, so listing the methods stays fast.
"""

from .base import METHODS, BuildContext, Method, MethodParams, OutputSpec

__all__ = ["METHODS", "BuildContext", "Method", "MethodParams", "OutputSpec"]
