"""Name → factory registries.

Criteria, granularities, scopes, schedules, regularisers, models and datasets
are all built from strings, so that Python code, the CLI and a YAML study use
the same names. A registry answers an unknown name with the list of valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from prunelab._validation import suggest

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories of one kind (e.g. ``"criterion"``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` (and optional aliases)."""

        def decorate(obj: T) -> T:
            for key in (name, *aliases):
                if key in self._entries or key in self._aliases:
                    raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._entries[name] = obj
            for alias in aliases:
                self._aliases[alias] = name
            return obj

        return decorate

    def canonical(self, name: Any, *, param: str | None = None, where: str | None = None) -> str:
        """Resolve an alias to its registered name, or raise a clear error."""
        param = param or self.kind
        prefix = f"the '{param}' parameter of {where}" if where else f"the '{param}' parameter"
        listed = ", ".join(self.names())
        if not isinstance(name, str):
            raise TypeError(f"{prefix} must be a {self.kind} name, one of: {listed}. "
                            f"Got {name!r} of type {type(name).__name__} instead.")
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        hint = suggest(name, [*self._entries, *self._aliases])
        raise ValueError(f"unknown {self.kind} {name!r}{hint}; {prefix} must be one of: {listed}.")

    def get(self, name: Any, *, param: str | None = None, where: str | None = None) -> T:
        return self._entries[self.canonical(name, param=param, where=where)]

    def names(self) -> list[str]:
        """Registered names (aliases excluded), sorted."""
        return sorted(self._entries)

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
