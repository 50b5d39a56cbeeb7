"""One registry helper for everything chosen by name: teachers, students, codecs.

    TEACHERS = Registry("teacher")            # the kind names the thing in messages
    @TEACHERS.register("dinov2_b")            # on a function returning the entry (built on demand)
    def _dinov2_b() -> TeacherSpec: ...
    TEACHERS.get("dinov2_b")                  # -> TeacherSpec; unknown: SakError listing the known names
    TEACHERS.add("fp16", Codec(...))          # or an entry that is already built
    CODECS.add_family("pca<k>", pca_codec)    # names built from a pattern: pca_codec("pca64") -> Codec,
                                              # None for a name that is not of the family

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
        self._families: dict[str, Callable[[str], T | None]] = {}  # label -> builder (None: not its name)

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

    def add_family(self, label: str, builder: Callable[[str], T | None]) -> None:
        """Names made from a pattern (`label`, e.g. "pca<k>", is how errors list them): builder(name) -> the
        entry, None for a name that is not of this family (a SakError for one that is, but is malformed)."""
        if label in self._families:
            raise ValueError(f"{self.kind} family {label!r} registered twice")
        self._families[label] = builder

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
        if name in self._factories:
            return self._factories[name]()
        for builder in self._families.values():
            entry = builder(name)
            if entry is not None:
                return entry
        known = ", ".join([*self.names(), *self._families])
        raise SakError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}")
