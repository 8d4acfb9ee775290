"""Schedules: when to prune and to what sparsity (docs/methods.md §3).

A schedule lists pruning *events* ``(step, sparsity)``. Steps count completed
training steps as the Pruner sees them (one ``pruner.step()`` call per optimiser
step); an event at step 0 takes effect on the first call. Between events the
masks are fixed; after the last event training goes on with fixed masks.

| name             | event k (k = 1..n)                  | sparsity                           |
|------------------|-------------------------------------|------------------------------------|
| ``one-shot``     | ``at``                              | ``S``                              |
| ``iterative``    | ``start + (k−1)·every``             | ``S · (k/n)^(1/c)`` (root schedule) |
| ``agp``          | ``start + j·every``, j = 0..n       | ``s_f + (s_i − s_f)(1 − j/n)³``    |
| ``fixed-fraction``| ``start + (k−1)·every``            | ``1 − (1 − p)^k`` or ``k·p``       |
| any callable     | ``start + j·every``                 | ``fn(step)``                       |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import cast

from prunelab._validation import (
    EVERY,
    N_PRUNES,
    SPARSITY,
    STEP,
    Interval,
    Options,
    Types,
    check_sparsity,
    validate_params,
)
from prunelab.registry import Registry

SCHEDULES: Registry[type[Schedule]] = Registry("schedule")


class Schedule:
    """Base class: a finite, ordered list of ``(step, sparsity)`` events."""

    name = ""
    one_shot = False  # prunes once, to its final sparsity (a solver's N:M pattern needs this)

    def events(self) -> list[tuple[int, float]]:
        raise NotImplementedError

    def target(self, step: int) -> float | None:
        """The sparsity to prune to at ``step``, or None if ``step`` is no event."""
        for event_step, sparsity in self.events():
            if event_step == step:
                return sparsity
        return None

    def sparsity_at(self, step: int) -> float:
        """The target in force after ``step`` training steps (0 before the first event)."""
        current = 0.0
        for event_step, sparsity in self.events():
            if event_step > step:
                break
            current = sparsity
        return current

    @property
    def last_step(self) -> int | None:
        events = self.events()
        return events[-1][0] if events else None

    @property
    def final_sparsity(self) -> float:
        events = self.events()
        return events[-1][1] if events else 0.0

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


#: The step options every schedule with several events declares.
_STEPS = {"start": [STEP], "every": [EVERY]}


@SCHEDULES.register("one-shot", "oneshot", "one_shot")
class OneShot(Schedule):
    """Prune to ``sparsity`` once, at step ``at`` (0 = on the first ``step()`` call)."""

    name = "one-shot"
    one_shot = True

    @validate_params({"sparsity": [SPARSITY], "at": [STEP]}, where="one-shot schedule")
    def __init__(self, sparsity: float, at: int = 0):
        self.sparsity = float(sparsity)
        self.at = int(at)

    def events(self) -> list[tuple[int, float]]:
        return [(self.at, self.sparsity)]


@SCHEDULES.register("iterative", "root")
class Iterative(Schedule):
    """The comparative study's root schedule: prune ``n_prunes`` times, event k to
    ``S · (k/n)^(1/c)`` (Baktash et al. 2019). ``exponent`` c ≥ 1; c > 1 prunes much
    early and less later. Train ``start`` steps before the first prune, ``every``
    steps between prunes, and as long as wanted after the last.
    """

    name = "iterative"

    @validate_params(
        {"sparsity": [SPARSITY], "n_prunes": [N_PRUNES], "exponent": [Interval(Real, 1, 1000)], **_STEPS},
        where="iterative schedule",
    )
    def __init__(self, sparsity: float, n_prunes: int = 5, exponent: float = 1.0, start: int = 0, every: int = 1):
        self.sparsity = float(sparsity)
        self.n_prunes = int(n_prunes)
        self.exponent = float(exponent)
        self.start, self.every = int(start), int(every)

    def events(self) -> list[tuple[int, float]]:
        k, c = self.n_prunes, self.exponent
        return [(self.start + (i - 1) * self.every, self.sparsity * (i / k) ** (1.0 / c)) for i in range(1, k + 1)]


@SCHEDULES.register("agp", "gradual")
class AGP(Schedule):
    """Automated gradual pruning (Zhu & Gupta 2017), cubic:
    ``s_t = s_f + (s_i − s_f) · (1 − (t − t0)/(n·Δt))³`` at ``t = t0 + j·Δt``,
    ``j = 0..n``; masks are updated at exactly these steps and constant after.
    Here ``sparsity`` is ``s_f``, ``start`` is ``t0`` and ``every`` is ``Δt``.
    """

    name = "agp"

    @validate_params(
        {"sparsity": [SPARSITY], "n_prunes": [N_PRUNES], "initial_sparsity": [SPARSITY], **_STEPS}, where="agp schedule"
    )
    def __init__(
        self, sparsity: float, n_prunes: int = 10, every: int = 1, start: int = 0, initial_sparsity: float = 0.0
    ):
        self.sparsity = float(sparsity)
        self.initial_sparsity = float(initial_sparsity)
        if self.initial_sparsity > self.sparsity:
            raise ValueError(
                f"the 'initial_sparsity' parameter of agp schedule must be <= "
                f"sparsity={self.sparsity:g}. Got {initial_sparsity!r} instead."
            )
        self.n_prunes = int(n_prunes)
        self.start, self.every = int(start), int(every)

    def events(self) -> list[tuple[int, float]]:
        s_f, s_i, n = self.sparsity, self.initial_sparsity, self.n_prunes
        return [(self.start + j * self.every, s_f + (s_i - s_f) * (1.0 - j / n) ** 3) for j in range(n + 1)]


@SCHEDULES.register("fixed-fraction", "fixed_fraction")
class FixedFraction(Schedule):
    """Prune a fixed fraction ``p`` per event: of the remaining weights
    (``of="remaining"``: ``s_k = 1 − (1 − p)^k``) or of the layer (``of="layer"``:
    ``s_k = k·p``). Give ``n_prunes``, a ``sparsity`` to stop at (the last event is
    capped there), or both. The unit-pruning study prunes 1 % per event with 100
    fine-tuning steps between.
    """

    name = "fixed-fraction"

    @validate_params(
        {
            "fraction": [Interval(Real, 0, 1, closed="neither")],
            "n_prunes": [N_PRUNES, None],
            "sparsity": [SPARSITY, None],
            "of": [Options({"remaining", "layer"})],
            **_STEPS,
        },
        where="fixed-fraction schedule",
    )
    def __init__(
        self,
        fraction: float,
        n_prunes: int | None = None,
        sparsity: float | None = None,
        of: str = "remaining",
        start: int = 0,
        every: int = 1,
    ):
        where = "fixed-fraction schedule"
        self.fraction = float(fraction)
        self.of = of
        if n_prunes is None and sparsity is None:
            raise ValueError(f"{where} needs 'n_prunes', 'sparsity' or both; got neither.")
        self.sparsity = None if sparsity is None else float(sparsity)
        if n_prunes is None:
            assert self.sparsity is not None  # checked above: not both None
            n_prunes = self._events_to_reach(self.sparsity)
            if n_prunes > cast(float, N_PRUNES.high):  # a tiny fraction to a high sparsity: too many events
                raise ValueError(
                    f"{where}: fraction={self.fraction:g} needs {n_prunes} events to reach "
                    f"sparsity={self.sparsity:g}, more than {N_PRUNES.high}; raise the fraction."
                )
        self.n_prunes = int(n_prunes)
        if self.of == "layer" and self.sparsity is None and self.n_prunes * self.fraction >= 1:
            raise ValueError(
                f"{where}: n_prunes × fraction = {self.n_prunes * self.fraction:g} would "
                f"remove every weight; it must be < 1 (or give a 'sparsity' cap)."
            )
        self.start, self.every = int(start), int(every)

    def _raw(self, k: int) -> float:
        if self.of == "remaining":
            return 1.0 - (1.0 - self.fraction) ** k
        return k * self.fraction

    def _events_to_reach(self, sparsity: float) -> int:
        if self.of == "remaining":
            return max(1, math.ceil(math.log1p(-sparsity) / math.log1p(-self.fraction) - 1e-12))
        return max(1, math.ceil(sparsity / self.fraction - 1e-12))

    def events(self) -> list[tuple[int, float]]:
        cap = 1.0 if self.sparsity is None else self.sparsity
        return [(self.start + (k - 1) * self.every, min(self._raw(k), cap)) for k in range(1, self.n_prunes + 1)]


@SCHEDULES.register("function")
class FunctionSchedule(Schedule):
    """Any callable ``step -> sparsity``, evaluated at ``start + j·every`` for
    ``j = 0..n_prunes−1``. Each value is checked to be a sparsity in [0, 1)."""

    name = "function"

    @validate_params({"fn": ["callable"], "n_prunes": [N_PRUNES], **_STEPS}, where="function schedule")
    def __init__(self, fn: Callable[[int], float], n_prunes: int = 1, every: int = 1, start: int = 0):
        self.fn = fn
        self.n_prunes = int(n_prunes)
        self.start, self.every = int(start), int(every)

    def events(self) -> list[tuple[int, float]]:
        out = []
        for j in range(self.n_prunes):
            step = self.start + j * self.every
            out.append((step, check_sparsity(f"fn({step})", self.fn(step), where="function schedule")))
        return out


@validate_params({"spec": [Types(str, dict, Schedule), "callable"], "sparsity": [SPARSITY, None], "where": [str]})
def make_schedule(
    spec: str | dict | Schedule | Callable[[int], float],
    sparsity: float | None = None,
    *,
    where: str = "Pruner",
    **options,
) -> Schedule:
    """Build a schedule from a name plus options, a ``{"name": ..., ...}`` dict, a
    callable ``step -> sparsity`` (evaluated once, at step 0, unless wrapped in
    :class:`FunctionSchedule` with more events) or a ready :class:`Schedule`."""
    if isinstance(spec, Schedule):
        return spec
    if callable(spec) and not isinstance(spec, (str, dict)):
        if sparsity is not None:
            raise ValueError(
                f"a callable schedule gives its own sparsity at each step; leave out "
                f"'sparsity' (got {sparsity!r}) or use a named schedule."
            )
        return FunctionSchedule(spec, **options)
    if sparsity is not None:
        options.setdefault("sparsity", sparsity)
    return SCHEDULES.build(spec, param="schedule", where=where, instance_of=Schedule, **options)
