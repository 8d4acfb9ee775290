"""What a run does: the task registry, and the error collector used while validating.

A *task* turns a spec's (dataset, model, method, training) entries into resolved
run configs and executes one config. ``prune`` (train, prune, fine-tune, measure)
is the default; later capabilities register their own tasks by name.
"""

from __future__ import annotations

from typing import Any

from prunelab._validation import check_number, suggest
from prunelab.registry import Registry

TASKS: Registry[type[Task]] = Registry("task")


class SpecError(ValueError):
    """A spec with one or more errors; ``errors`` lists them as ``"path: message"``."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = list(errors)
        count = f"{len(self.errors)} error{'s' if len(self.errors) != 1 else ''}"
        super().__init__(f"spec {source!r} has {count}:\n" + "\n".join(f"  {e}" for e in self.errors))


class Checker:
    """Collects ``path: message`` errors instead of raising at the first one.

    ``errors`` lists each error once; ``reported`` counts every report, repeats included. A step
    tells whether it failed by comparing ``reported`` before and after: a second method of a study
    that meets the same bad dataset or model entry repeats an error already listed, and must still
    see that it failed."""

    def __init__(self):
        self.errors: list[str] = []
        self.reported = 0

    def error(self, path: str, message: str) -> None:
        self.reported += 1
        entry = f"{path}: {message}"
        if entry not in self.errors:
            self.errors.append(entry)

    def attempt(self, path: str, fn, *args, **kwargs) -> Any:
        """Call ``fn``; a ValueError/TypeError (a user mistake) becomes an error at ``path``."""
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, FileNotFoundError) as err:
            self.error(path, str(err).replace("\n", "\n    "))
            return None

    def number(self, path: str, value: Any, *, param: str | None = None, **bounds) -> Any:
        return self.attempt(path, check_number, param or path.rsplit(".", 1)[-1], value, **bounds)

    def keys(self, path: str, mapping: dict, valid: tuple[str, ...]) -> None:
        for key in mapping:
            if key not in valid:
                self.error(
                    f"{path}.{key}" if path else str(key),
                    f"unknown key{suggest(str(key), valid)}; valid keys: {', '.join(valid)}",
                )


class Task:
    """Base class of run kinds."""

    name = ""
    #: The numeric metrics a run of this task may record (tables and ``outputs.metric`` are
    #: checked against them before a study runs); None: not declared, checked after the runs.
    metrics: tuple[str, ...] | None = None

    def default_label(self, method: dict) -> str:
        return self.name

    def prepare(
        self,
        *,
        dataset: tuple[str, dict],
        model: tuple[str, dict],
        method: tuple[str, dict],
        training: dict,
        checker: Checker,
        sparsities: list[float],
    ) -> Any:
        """Validate one (dataset, model, method, training) combination deeply (build what
        must be built to know it works); return what :meth:`resolve` needs, or None."""
        raise NotImplementedError

    def resolve(self, prepared: Any, *, sparsity: float | dict, seed: int) -> dict:
        """The fully resolved, JSON-serialisable config of one run."""
        raise NotImplementedError

    def level(self, prepared: Any, sparsity: float | dict) -> float:
        """The run's sparsity as one number, for tables (per-layer targets: their overall)."""
        if isinstance(sparsity, dict):
            raise TypeError(f"the {self.name!r} task takes plain sparsity levels, not a per-layer mapping")
        return float(sparsity)

    def run(self, config: dict, context: dict) -> dict:
        """Execute one run; return ``{"metrics": {...}, "curve": [...]}``. Exceptions are
        recorded as a failed run by the caller."""
        raise NotImplementedError
