"""Expert Workbench: pools of LoRA and full fine-tuned experts, combined, evaluated, served.

Names are imported on first use: `import workbench.catalog` (the app's results reader) does not pay for torch."""

from .errors import WorkbenchError

__all__ = ["DEFAULT_BASE", "BaseModel", "Expert", "Pool", "WorkbenchError"]
__version__ = "0.1.0"

_LAZY = {"DEFAULT_BASE": "base", "BaseModel": "base", "Expert": "pool", "Pool": "pool"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
