"""One registry helper for everything chosen by name: teachers, students, codecs.

    TEACHERS = Registry("teacher")            # the kind names the thing in messages
    @TEACHERS.register("dinov2_b")            # on a function returning the entry (built on demand)
    def _dinov2_b() -> TeacherSpec: ...
    TEACHERS.get("dinov2_b")                  # -> TeacherSpec; unknown: SakError listing the known names
    TEACHERS.add("fp16", Codec(...))          # or an entry that is already built

Registering a name twice is a programming error (ValueError at import), never a silent override.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sak.pipeline.base.errors import SakError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> factory of T. `kind` is the noun used in errors ("teacher", "student", "codec")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[[], T]] = {}

    def register(self, name: str) -> Callable[[Callable[[], T]], Callable[[], T]]:
        """Decorator: `@REGISTRY.register("name")` on a zero-argument function returning the entry."""

        def wrap(factory: Callable[[], T]) -> Callable[[], T]:
            self._put(name, factory)
            return factory

        return wrap

    def add(self, name: str, entry: T) -> T:
        """Register an already-built (immutable) entry under `name`; returns it."""
        self._put(name, lambda: entry)
        return entry

    def _put(self, name: str, factory: Callable[[], T]) -> None:
        if name in self._factories:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._factories[name] = factory

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        if name not in self._factories:
            raise SakError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}")
        return self._factories[name]()
