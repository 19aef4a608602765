"""Multi-adapter batched LoRA: one op, several backends, metadata computed once per batch."""

from .multi_lora import (
    BACKENDS,
    AdapterWeights,
    LoraMeta,
    apply_lora,
    available_backends,
    backend_unavailable,
    check_backend,
    default_backend,
    make_meta,
)

__all__ = ["BACKENDS", "AdapterWeights", "LoraMeta", "apply_lora", "available_backends", "backend_unavailable",
           "check_backend", "default_backend", "make_meta"]
