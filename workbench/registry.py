"""One registry type for methods, artifact loaders and kernel backends, with 'did you mean'."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import WorkbenchError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects. `load`, when given, imports the modules that register (once, on the first lookup), so
    importing the registry costs nothing and a new entry needs no edit outside the module that registers it."""

    def __init__(self, kind: str, error: type[WorkbenchError] = WorkbenchError,
                 load: Callable[[], object] | None = None):
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = {}
        self._load = load
        self._loaded = load is None
        self._loading = False
        self._lock = threading.RLock()  # re-entrant: a module being loaded may look names up (it sees the partial set)

    def _all(self) -> dict[str, T]:
        if not self._loaded:
            with self._lock:  # another thread's first lookup waits for the whole set
                if not self._loaded and not self._loading:
                    self._loading = True
                    try:
                        self._load()
                        self._loaded = True
                    finally:
                        self._loading = False
        return self._items

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        items = self._all()
        try:
            return items[name]
        except KeyError:
            raise self.error(
                f"unknown {self.kind} {name!r}{did_you_mean(name, items)}; known: {', '.join(sorted(items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._all())

    def __contains__(self, name: str) -> bool:
        return name in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._all()))
