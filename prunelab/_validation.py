"""Parameter checks that answer bad input with one message template.

Every user mistake is reported before any work starts, as a ``ValueError`` or
``TypeError`` whose message names the parameter, the function it was given to,
the bad value and what would have been accepted, in the style of
scikit-learn::

    the 'sparsity' parameter of prune must be a float in [0, 1). Got 1.5 instead.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any


def _where(param: str, where: str | None) -> str:
    return f"the '{param}' parameter of {where}" if where else f"the '{param}' parameter"


def _interval(low: float | None, high: float | None, closed: str) -> str:
    left = "[" if closed in ("both", "left") else "("
    right = "]" if closed in ("both", "right") else ")"
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    return f"{left}{lo}, {hi}{right}"


def check_number(
    param: str,
    value: Any,
    *,
    where: str | None = None,
    low: float | None = None,
    high: float | None = None,
    closed: str = "both",
    integer: bool = False,
) -> float | int:
    """Return ``value`` if it is a real (or integer) number inside the interval.

    ``closed`` is one of ``"both"``, ``"left"``, ``"right"``, ``"neither"`` and
    says which ends of ``[low, high]`` are allowed.
    """
    kind = "an int" if integer else "a float"
    expected = f"{kind} in {_interval(low, high, closed)}"
    is_bool = isinstance(value, bool)
    if integer:
        ok_type = isinstance(value, Integral) and not is_bool
    else:
        ok_type = isinstance(value, Real) and not is_bool
    if not ok_type:
        raise TypeError(f"{_where(param, where)} must be {expected}. Got {value!r} "
                        f"of type {type(value).__name__} instead.")
    if not integer and not math.isfinite(float(value)):
        raise ValueError(f"{_where(param, where)} must be {expected}. Got {value!r} instead.")
    below = low is not None and (value < low or (value == low and closed in ("right", "neither")))
    above = high is not None and (value > high or (value == high and closed in ("left", "neither")))
    if below or above:
        raise ValueError(f"{_where(param, where)} must be {expected}. Got {value!r} instead.")
    return int(value) if integer else float(value)


def check_sparsity(param: str, value: Any, *, where: str | None = None) -> float:
    """A sparsity is a fraction of weights removed: a float in [0, 1)."""
    return check_number(param, value, where=where, low=0.0, high=1.0, closed="left")


def suggest(value: str, choices: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for a close match, else ""."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_choice(param: str, value: Any, choices: Iterable[str], *, where: str | None = None) -> str:
    """Return ``value`` if it is one of ``choices`` (strings)."""
    choices = sorted(choices)
    listed = ", ".join(choices)
    if not isinstance(value, str):
        raise TypeError(f"{_where(param, where)} must be a str among: {listed}. "
                        f"Got {value!r} of type {type(value).__name__} instead.")
    if value not in choices:
        raise ValueError(f"{_where(param, where)} must be one of: {listed}. "
                         f"Got {value!r} instead{suggest(value, choices)}.")
    return value


#: Tensors found finite, by id: (weak reference, version counter then). A tensor seen again
#: unchanged (the same object, no in-place write since) is not scanned again: fit and evaluate
#: are called many times on the same data, and a scan of MNIST's 47 M pixels takes ~0.1 s.
_FINITE: dict[int, tuple] = {}


def check_finite(what: str, tensor: Any, *, hint: str = "") -> Any:
    """Return ``tensor`` if it holds no NaN or ±inf; otherwise raise a ValueError that says
    ``what`` it is (e.g. ``"the 'x' parameter of fit"``), how many entries are bad and where
    the first one is. One ``isfinite`` pass, skipped for a tensor already found finite and not
    written in place since; the counting runs only on failure."""
    import weakref

    import torch

    if not torch.is_tensor(tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
        return tensor
    seen = _FINITE.get(id(tensor))
    if seen is not None and seen[0]() is tensor and seen[1] == tensor._version:
        return tensor
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        if len(_FINITE) >= 1024:
            _FINITE.clear()
        try:
            _FINITE[id(tensor)] = (weakref.ref(tensor), tensor._version)
        except TypeError:                # a tensor type without weak references: scan it each time
            pass
        return tensor
    n_nan = int(torch.isnan(tensor).sum())
    n_bad = tensor.numel() - int(finite.sum())
    first = tuple(torch.nonzero(~finite)[0].tolist())
    raise ValueError(f"{what} has {n_bad} non-finite entr{'y' if n_bad == 1 else 'ies'} ({n_nan} NaN, "
                     f"{n_bad - n_nan} inf) out of {tensor.numel()}, the first at index {first}{hint}.")


def check_type(param: str, value: Any, types: type | tuple[type, ...], *,
               where: str | None = None, expected: str | None = None) -> Any:
    """Return ``value`` if it is an instance of ``types``."""
    if not isinstance(value, types):
        if expected is None:
            names = types if isinstance(types, tuple) else (types,)
            expected = " or ".join(t.__name__ for t in names)
        raise TypeError(f"{_where(param, where)} must be {expected}. "
                        f"Got {value!r} of type {type(value).__name__} instead.")
    return value
