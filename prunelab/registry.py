"""Name → factory registries.

Criteria, granularities, scopes, schedules, regularisers, models and datasets
are all built from strings, so that Python code, the CLI and a YAML study use
the same names. A registry answers an unknown name with the list of valid ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, cast

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
            raise TypeError(
                f"{prefix} must be a {self.kind} name, one of: {listed}. "
                f"Got {name!r} of type {type(name).__name__} instead."
            )
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        hint = suggest(name, [*self._entries, *self._aliases])
        raise ValueError(f"unknown {self.kind} {name!r}{hint}; {prefix} must be one of: {listed}.")

    def get(self, name: Any, *, param: str | None = None, where: str | None = None) -> T:
        return self._entries[self.canonical(name, param=param, where=where)]

    def build(
        self,
        spec: Any,
        *,
        param: str | None = None,
        where: str | None = None,
        defaults: dict[str, Any] | None = None,
        instance_of: type | None = None,
        **options: Any,
    ) -> Any:
        """Instantiate an entry from a name or a ``{"name": ..., **options}`` dict.

        Objects that are not names or dicts are returned unchanged (an instance
        the caller already built) — if they are instances of ``instance_of``, when given;
        anything else is a TypeError listing what is accepted. ``defaults`` are passed
        only to factories that accept them (e.g. a ``seed``); ``options`` must all be accepted.
        """
        if isinstance(spec, dict):
            if "name" not in spec:
                raise ValueError(
                    f"a {self.kind} given as a dict needs a 'name' key, one of: "
                    f"{', '.join(self.names())}. Got {spec!r}."
                )
            options = {**{k: v for k, v in spec.items() if k != "name"}, **options}
            spec = spec["name"]
        elif not isinstance(spec, str):
            if instance_of is not None and not isinstance(spec, instance_of):
                prefix = (
                    f"the '{param or self.kind}' parameter of {where}"
                    if where
                    else f"the '{param or self.kind}' parameter"
                )
                raise TypeError(
                    f"{prefix} must be a {self.kind} name (one of: {', '.join(self.names())}), "
                    f"a {{'name': ..., **options}} dict or a {instance_of.__name__}. "
                    f"Got {spec!r} of type {type(spec).__name__} instead."
                )
            return spec
        name = self.canonical(spec, param=param, where=where)
        factory = self._entries[name]
        accepted = _accepted_options(factory)
        unknown = sorted(set(options) - accepted) if accepted is not None else []
        if unknown:
            raise TypeError(
                f"{self.kind} {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(sorted(accepted or ())) or 'none'}."
            )
        for key, value in (defaults or {}).items():
            if key not in options and (accepted is None or key in accepted):
                options[key] = value
        missing = [key for key in _required_options(factory) if key not in options]
        if missing:
            raise ValueError(
                f"{self.kind} {name!r} needs option(s) {', '.join(map(repr, missing))}; "
                f"valid options: {', '.join(sorted(accepted or []))}."
            )
        # build is for registries of factories (a registry of other objects uses get)
        return cast("Callable[..., Any]", factory)(**options)

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


def _required_options(factory: Any) -> list[str]:
    """Keyword names a factory requires (no default)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in signature.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _accepted_options(factory: Any) -> set[str] | None:
    """Keyword names a factory accepts, or None if it takes ``**kwargs``."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    names = set()
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    return names
