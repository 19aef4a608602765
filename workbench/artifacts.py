"""Artifacts: what a combination method produces, saved as a folder with `artifact.json`.

`artifact.json` names the artifact type; each type registers a loader returning a
`LoadedModel` (an nn.Module + tokenizer) so evaluation and serving never special-case a
method. Types are registered by the modules that define them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import WorkbenchError, did_you_mean

ARTIFACT_FILE = "artifact.json"
LOADERS: dict[str, Callable[..., Any]] = {}


def register_artifact(type_name: str):
    def deco(fn):
        LOADERS[type_name] = fn
        return fn

    return deco


def artifact_ref(path: Path) -> str:
    """How records name an artifact: `artifacts/<folder>`, relative to the cache, never a path of this machine."""
    return f"artifacts/{Path(path).name}"


def read_artifact_meta(path: Path) -> dict[str, Any]:
    """An artifact's `artifact.json` (a JSON object); WorkbenchError (one line) when it is unreadable, not UTF-8,
    not JSON, or not an object."""
    from .cells import load_json

    f = Path(path) / ARTIFACT_FILE
    try:
        meta = load_json(f)  # bounded: size and depth (a 100,000-deep file is one line, not a RecursionError)
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"cannot read artifact {f}: {e}") from None
    if not isinstance(meta, dict):
        raise WorkbenchError(f"cannot read artifact {f}: a JSON {type(meta).__name__}, not an object")
    return meta


def load_artifact(path: Path, device: str | None = None):
    meta = read_artifact_meta(path)
    kind = meta.get("type", "?")
    if kind not in LOADERS:
        from .methods.base import import_methods

        import_methods()  # the method modules register the artifact types they write
    if kind not in LOADERS:
        raise WorkbenchError(f"artifact {path} has unknown type {kind!r}{did_you_mean(kind, LOADERS)}")
    return LOADERS[kind](Path(path), meta, device=device)
