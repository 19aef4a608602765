"""Expert Workbench: pools of LoRA and full fine-tuned experts, combined, evaluated, served."""

from .base import DEFAULT_BASE, BaseModel
from .errors import WorkbenchError
from .pool import Expert, Pool

__all__ = ["DEFAULT_BASE", "BaseModel", "Expert", "Pool", "WorkbenchError"]
__version__ = "0.1.0"
