"""Parameter checks that answer bad input with one message template.

Every user mistake is reported before any work starts, as a ``ValueError`` or
``TypeError`` whose message names the parameter, the function it was given to,
the bad value and what would have been accepted, in the style of
scikit-learn::

    the 'sparsity' parameter of prune must be a float in [0, 1). Got 1.5 instead.

The public functions declare their parameters with :func:`validate_params` and constraint
objects (:class:`Interval`, :class:`Options`, :class:`Types`, ``None``, ``"callable"``,
:class:`Data`, :class:`Shape`, ...), checked before the body runs; the command line builds
its option types from the same objects (:func:`cli_type`). The upper bounds (``MAX_*``) are
documented in docs/limits.md.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from numbers import Integral, Real
from typing import Any, Literal, cast, overload


def _where(param: str, where: str | None) -> str:
    return f"the '{param}' parameter of {where}" if where else f"the '{param}' parameter"


def _bound(value: float | None, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, Integral) or float(value).is_integer() and abs(value) < 2**63:
        return str(int(value))  # 1048576, not 1.04858e+06
    return f"{value:g}"


def _interval(low: float | None, high: float | None, closed: str) -> str:
    left = "[" if closed in ("both", "left") else "("
    right = "]" if closed in ("both", "right") else ")"
    return f"{left}{_bound(low, '-inf')}, {_bound(high, 'inf')}{right}"


@overload
def check_number(
    param: str,
    value: Any,
    *,
    where: str | None = None,
    low: float | None = None,
    high: float | None = None,
    closed: str = "both",
    integer: Literal[False] = False,
) -> float: ...


@overload
def check_number(
    param: str,
    value: Any,
    *,
    where: str | None = None,
    low: float | None = None,
    high: float | None = None,
    closed: str = "both",
    integer: Literal[True],
) -> int: ...


@overload
def check_number(
    param: str,
    value: Any,
    *,
    where: str | None = None,
    low: float | None = None,
    high: float | None = None,
    closed: str = "both",
    integer: bool = False,
) -> float | int: ...


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
        raise TypeError(
            f"{_where(param, where)} must be {expected}. Got {value!r} of type {type(value).__name__} instead."
        )
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
        raise TypeError(
            f"{_where(param, where)} must be a str among: {listed}. "
            f"Got {value!r} of type {type(value).__name__} instead."
        )
    if value not in choices:
        raise ValueError(
            f"{_where(param, where)} must be one of: {listed}. Got {value!r} instead{suggest(value, choices)}."
        )
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
        except TypeError:  # a tensor type without weak references: scan it each time
            pass
        return tensor
    n_nan = int(torch.isnan(tensor).sum())
    n_bad = tensor.numel() - int(finite.sum())
    first = tuple(torch.nonzero(~finite)[0].tolist())
    raise ValueError(
        f"{what} has {n_bad} non-finite entr{'y' if n_bad == 1 else 'ies'} ({n_nan} NaN, "
        f"{n_bad - n_nan} inf) out of {tensor.numel()}, the first at index {first}{hint}."
    )


def check_type(
    param: str, value: Any, types: type | tuple[type, ...], *, where: str | None = None, expected: str | None = None
) -> Any:
    """Return ``value`` if it is an instance of ``types``."""
    if not isinstance(value, types):
        if expected is None:
            names = types if isinstance(types, tuple) else (types,)
            expected = " or ".join(t.__name__ for t in names)
        raise TypeError(
            f"{_where(param, where)} must be {expected}. Got {value!r} of type {type(value).__name__} instead."
        )
    return value


# --------------------------------------------------------------------------- declared constraints
#
# A public function declares what each parameter accepts once, with ``@validate_params``; the
# decorator checks the bound arguments before the body runs and answers with the template
# above. The declarations stay on the function (``__param_constraints__``) so the tests can
# generate an invalid value for every constraint of every public function, and the command line
# builds its option parsers from the same objects (:func:`cli_type`).

#: Upper bounds shared by the library and the command line (documented in docs/limits.md).
MAX_EPOCHS = 100_000
MAX_STEPS = 10**9  # training steps, schedule steps and step intervals
MAX_BATCH = 1 << 20  # batch sizes and calibration batch sizes
MAX_PRUNES = 100_000  # pruning events of a schedule
MAX_THREADS = 4096
MAX_WORKERS = 1024  # parallel study workers
MAX_SEED = 2**32 - 1
MAX_SAMPLES = 10_000_000  # calibration or training samples to take (as in study specs)
MAX_REPEATS = 1_000_000  # timed calls, warm-up calls, rounds, random probes
MAX_UNITS = 1 << 24  # neurons, channels, features, buckets, vocabulary entries
MAX_VOCAB = 1 << 20  # tokenizer vocabularies
MAX_SEQ_LEN = 1 << 20  # tokens per sequence
MAX_INPUT_ELEMENTS = 1 << 28  # elements of one dry-run input (input_shape, without the batch dimension)


class Constraint:
    """What one parameter accepts. ``description`` completes "must be ..."; ``kind_of(value)``
    says whether ``value`` has the right type (then a violation is a ValueError, else a
    TypeError); ``invalid_values()`` are values a test can give to see the check fire."""

    description = ""

    def is_satisfied_by(self, value: Any) -> bool:
        raise NotImplementedError

    def kind_of(self, value: Any) -> bool:
        return self.is_satisfied_by(value)

    def invalid_values(self) -> list:
        return []

    def __str__(self) -> str:
        return self.description

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


class Interval(Constraint):
    """A number of type ``kind`` (``Integral`` or ``Real``) in ``[low, high]``; ``closed`` is
    ``"both"``, ``"left"``, ``"right"`` or ``"neither"``. Booleans are not numbers here, and a
    float interval never holds NaN or ±inf."""

    def __init__(self, kind: type, low: float | None, high: float | None, *, closed: str = "both"):
        if kind not in (Integral, Real):
            raise TypeError(f"Interval kind must be numbers.Integral or numbers.Real, not {kind!r}")
        if closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"Interval closed must be both, left, right or neither, not {closed!r}")
        self.kind, self.low, self.high, self.closed = kind, low, high, closed
        article = "an int" if kind is Integral else "a float"
        self.description = f"{article} in {_interval(low, high, closed)}"

    def kind_of(self, value: Any) -> bool:
        return isinstance(value, self.kind) and not isinstance(value, bool)

    def is_satisfied_by(self, value: Any) -> bool:
        if not self.kind_of(value):
            return False
        if self.kind is Real and not math.isfinite(float(value)):
            return False
        low_ok = self.low is None or value > self.low or (value == self.low and self.closed in ("both", "left"))
        high_ok = self.high is None or value < self.high or (value == self.high and self.closed in ("both", "right"))
        return bool(low_ok and high_ok)

    def invalid_values(self) -> list:
        step = 1 if self.kind is Integral else 0.5
        out: list[Any] = []
        if self.low is not None:
            out.append(self.low if self.closed in ("right", "neither") else self.low - step)
        if self.high is not None:
            out.append(self.high if self.closed in ("left", "neither") else self.high + step)
        if self.kind is Real:
            out.append(float("nan"))
        out += ["1", True, 1.5] if self.kind is Integral else ["0.5", True]
        return out

    def parse(self, text: str) -> Any:
        """A command-line string as this interval's number (unchecked), or ValueError."""
        return int(text) if self.kind is Integral else float(text)


class Options(Constraint):
    """One of a set of strings; a close miss gets a "did you mean" hint."""

    def __init__(self, options: Iterable[str]):
        self.options = frozenset(options)
        self.description = f"one of: {', '.join(sorted(self.options))}"

    def kind_of(self, value: Any) -> bool:
        return isinstance(value, str)

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.options

    def invalid_values(self) -> list:
        return ["no-such-option"]

    def hint(self, value: Any) -> str:
        return suggest(value, self.options) if isinstance(value, str) else ""

    def parse(self, text: str) -> str:
        return text


#: How a type is called in messages.
_TYPE_NAMES = {
    str: "a str",
    bool: "a bool",
    int: "an int",
    float: "a float",
    dict: "a dict",
    list: "a list",
    tuple: "a tuple",
    bytes: "bytes",
}


def _type_name(kind: type) -> str:
    if kind in _TYPE_NAMES:
        return _TYPE_NAMES[kind]
    module = kind.__module__
    for short in ("torch.nn", "torch.optim", "torch"):  # torch.nn.Module, not torch.nn.modules.module.Module
        if module.startswith(short + ".") or module == short:
            obj = __import__(short, fromlist=["_"])
            if getattr(obj, kind.__name__, None) is kind:
                return f"a {short}.{kind.__name__}"
    if module in ("collections.abc", "typing"):
        return {
            "Mapping": "a mapping (dict)",
            "Sequence": "a sequence",
            "Iterable": "an iterable",
            "Callable": "a callable",
        }.get(kind.__name__, f"a {kind.__name__}")
    if module == "os" and kind.__name__ == "PathLike":
        return "a path"
    if module.startswith("prunelab"):
        return f"a prunelab.{kind.__qualname__}"
    return f"a {kind.__qualname__}"


class Types(Constraint):
    """An instance of one of ``types`` (``bool`` is not an int here unless ``bool`` is listed)."""

    def __init__(self, *types: type, name: str | None = None):
        self.types = types
        self.description = name or " or ".join(_type_name(t) for t in types)

    def is_satisfied_by(self, value: Any) -> bool:
        if isinstance(value, bool) and bool not in self.types and not any(t is object for t in self.types):
            return False
        return isinstance(value, self.types)

    def invalid_values(self) -> list:
        return [_Wrong()]


class _Wrong:
    """A value of no type any parameter accepts (the generated tests' wrong type)."""

    def __repr__(self) -> str:
        return "<object of no accepted type>"


class NoneConstraint(Constraint):
    description = "None"

    def is_satisfied_by(self, value: Any) -> bool:
        return value is None


class Callables(Constraint):
    description = "a callable"

    def is_satisfied_by(self, value: Any) -> bool:
        return callable(value)

    def invalid_values(self) -> list:
        return [_Wrong()]


class Data(Constraint):
    """Tensors or batches: a tensor, an ``(x, y)`` pair, a dataset, a mapping of tensors, any
    iterable of batches (what :func:`prunelab.inputs.iter_batches` reads) or a function returning
    a fresh iterable. Strings, bytes and numbers are refused here; the content is checked where
    it is read."""

    description = "a tensor, an (x, y) pair, a dataset, an iterable of batches or a function returning one"

    def is_satisfied_by(self, value: Any) -> bool:
        if isinstance(value, (str, bytes, bool, Real)) or value is None:
            return False
        return (
            isinstance(value, Iterable) or callable(value) or hasattr(value, "x_train") or hasattr(value, "__getitem__")
        )

    def invalid_values(self) -> list:
        return [3, "data.pt"]


class Model(Constraint):
    """A ``torch.nn.Module`` (torch is imported only when a value is checked)."""

    description = "a torch.nn.Module"

    def __init__(self, name: str | None = None):
        if name:
            self.description = name

    def is_satisfied_by(self, value: Any) -> bool:
        from torch import nn

        return isinstance(value, nn.Module)

    def invalid_values(self) -> list:
        return ["model.pt"]


class Tensor(Constraint):
    description = "a torch.Tensor"

    def is_satisfied_by(self, value: Any) -> bool:
        import torch

        return torch.is_tensor(value)

    def invalid_values(self) -> list:
        return [[1.0, 2.0]]


class PathLike(Constraint):
    """A file or folder name: a ``str`` or an ``os.PathLike``, not empty, without NUL bytes."""

    description = "a path (str or os.PathLike)"

    def kind_of(self, value: Any) -> bool:
        import os

        return isinstance(value, (str, os.PathLike))

    def is_satisfied_by(self, value: Any) -> bool:
        import os

        if not self.kind_of(value):
            return False
        text = os.fspath(value)
        return isinstance(text, str) and text != "" and "\0" not in text

    def invalid_values(self) -> list:
        return [3, ""]


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


class Shape(Constraint):
    """One input's shape without the batch dimension: an int or a tuple/list/Size of positive
    ints, at most :data:`MAX_INPUT_ELEMENTS` elements in all. Any other value is a ValueError."""

    description = (
        f"a tuple of positive ints (one input, without the batch dimension) of at most {MAX_INPUT_ELEMENTS} elements"
    )

    def kind_of(self, value: Any) -> bool:
        return True

    def is_satisfied_by(self, value: Any) -> bool:
        dims = (value,) if _is_int(value) else value
        if not isinstance(dims, (tuple, list)) and type(dims).__name__ != "Size":
            return False
        if not dims or not all(_is_int(d) and d > 0 for d in dims):
            return False
        return math.prod(int(d) for d in dims) <= MAX_INPUT_ELEMENTS

    def invalid_values(self) -> list:
        return [(0,), (4, -1), "4", (4.0,), (1 << 15, 1 << 14)]


class Sizes(Constraint):
    """A positive int or a non-empty tuple/list of them, each at most ``high``."""

    def __init__(self, high: int):
        self.high = high
        self.description = f"an int in [1, {high}] or a non-empty sequence of them"

    def kind_of(self, value: Any) -> bool:
        return _is_int(value) or isinstance(value, (tuple, list))

    def is_satisfied_by(self, value: Any) -> bool:
        items = (value,) if _is_int(value) else value
        return (
            isinstance(items, (tuple, list))
            and len(items) > 0
            and all(_is_int(b) and 1 <= b <= self.high for b in items)
        )

    def invalid_values(self) -> list:
        return [(), (1, 0), (self.high + 1,), (1.5,), (True,), "64"]


def make_constraint(spec: Any) -> Constraint:
    """A constraint from its short form: a Constraint, ``None``, a type, ``"callable"`` or ``"boolean"``."""
    if isinstance(spec, Constraint):
        return spec
    if spec is None:
        return NoneConstraint()
    if isinstance(spec, type):
        return Types(spec)
    if spec == "callable":
        return Callables()
    if spec == "boolean":
        return Types(bool)
    raise TypeError(f"unknown parameter constraint {spec!r}")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def check_param(param: str, value: Any, constraints: Iterable, *, where: str | None = None) -> Any:
    """Return ``value`` if one of ``constraints`` accepts it; otherwise raise in the template,
    a ValueError when the value has an accepted type (then only those constraints are named),
    else a TypeError naming them all."""
    constraints = [make_constraint(c) for c in constraints]
    if any(c.is_satisfied_by(value) for c in constraints):
        return value
    near = [c for c in constraints if c.kind_of(value)]
    if near:
        hint = next((c.hint(value) for c in near if isinstance(c, Options)), "")
        raise ValueError(
            f"{_where(param, where)} must be {_join([str(c) for c in near])}. Got {value!r} instead{hint}."
        )
    raise TypeError(
        f"{_where(param, where)} must be {_join([str(c) for c in constraints])}. "
        f"Got {value!r} of type {type(value).__name__} instead."
    )


def validate_params(constraints: Mapping[str, list[Any]], *, where: str | Callable[[Any], str] | None = None):
    """Declare what each parameter of a function (or of a class's ``__init__``) accepts, and
    check the arguments against it before the body runs::

        @validate_params({"sparsity": [Interval(Real, 0, 1, closed="left")], "seed": [SEED]})
        def prune(model, sparsity, *, seed=0): ...

    Each value is a list of constraints (see :func:`make_constraint`), any one of which may
    accept the argument. ``where`` names the function in messages (default: its name, the
    class's name for ``__init__``; a callable ``where(self)`` names a constructor shared by
    subclasses, e.g. ``lambda self: f"{self.name} criterion"``). The declarations are kept on the function as
    ``__param_constraints__`` (and ``__param_where__``)."""
    resolved = {name: [make_constraint(c) for c in cs] for name, cs in constraints.items()}

    def decorate(fn):
        signature = inspect.signature(fn)
        unknown = sorted(set(resolved) - set(signature.parameters))
        if unknown:
            raise TypeError(f"validate_params: {fn.__qualname__} has no parameter(s) {', '.join(unknown)}")
        name = where or (fn.__qualname__.split(".")[-2] if fn.__name__ == "__init__" else fn.__name__)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return fn(*args, **kwargs)  # a wrong call: Python's own message
            bound.apply_defaults()
            here = name(next(iter(bound.arguments.values()))) if callable(name) else name
            for param, cs in resolved.items():
                check_param(param, bound.arguments[param], cs, where=here)
            return fn(*args, **kwargs)

        checked.__param_constraints__ = resolved
        checked.__param_where__ = name
        return checked

    return decorate


def param_constraints(obj: Any) -> tuple[str, dict[str, list[Constraint]]] | None:
    """``(where, {parameter: constraints})`` declared on a function or class constructor, or None.
    ``where`` is the name in messages; a function's may be a callable of its first argument."""
    # a class's constructor, read from the class object (mypy sees an instance's __init__)
    fn = obj.__init__ if isinstance(obj, type) else obj  # type: ignore[misc]
    declared = getattr(fn, "__param_constraints__", None)
    if declared is None:
        return None
    where = fn.__param_where__
    return (where(obj) if callable(where) and isinstance(obj, type) else where), declared


def cli_type(flag: str, command: str, *constraints: Any):
    """An argparse ``type=`` function for an option whose values satisfy ``constraints``: the
    option declares its range once; a bad value is refused while the command line is parsed, in
    the template (``the '--batch-size' parameter of prunelab prune must be ...``)."""
    import argparse

    resolved = [make_constraint(c) for c in constraints]

    def parse(text: str):
        for c in resolved:
            if isinstance(c, (Options, Interval)):
                try:
                    value = c.parse(text)
                except ValueError:
                    continue
                if c.is_satisfied_by(value):
                    return value
        parsed = _cli_value(text, resolved)
        try:
            check_param(flag, parsed, resolved, where=command)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return parsed

    parse.__name__ = flag.lstrip("-").replace("-", "_")
    # attributes of the parser function, read by the tests (getattr(action.type, "constraints"))
    parse.constraints = resolved  # type: ignore[attr-defined]
    parse.flag = flag  # type: ignore[attr-defined]
    return parse


def _cli_value(text: str, constraints: list[Constraint]) -> Any:
    """The most specific reading of a command-line string for the error message: an int, a
    float, else the string itself."""
    for convert in (int, float):
        try:
            value = convert(text)
        except ValueError:
            continue
        if convert is float or any(isinstance(c, Interval) and c.kind is Integral for c in constraints):
            return value
    return text


# The shared declarations, so a limit is stated once.
SPARSITY = Interval(Real, 0, 1, closed="left")
FRACTION = Interval(Real, 0, 1, closed="both")
SEED = Interval(Integral, 0, MAX_SEED)
EPOCHS = Interval(Integral, 0, MAX_EPOCHS)
BATCH_SIZE = Interval(Integral, 1, MAX_BATCH)
N_PRUNES = Interval(Integral, 1, MAX_PRUNES)
STEP = Interval(Integral, 0, MAX_STEPS)
EVERY = Interval(Integral, 1, MAX_STEPS)
THREADS = Interval(Integral, 1, MAX_THREADS)
N_UNITS = Interval(Integral, 1, MAX_UNITS)
BOOL = Types(bool)
STR = Types(str)
MAPPING = Types(Mapping)
MODEL = Model()
TENSOR = Tensor()
PATH = PathLike()
DATA = Data()
SHAPE = Shape()


def check_input_shape(input_shape: object, where: str) -> tuple[int, ...]:
    """One input's shape without the batch dimension: a sequence of positive ints (or one int)."""
    check_param("input_shape", input_shape, [SHAPE], where=where)
    if isinstance(input_shape, Integral):
        return (int(input_shape),)
    return tuple(int(d) for d in cast("Iterable[Any]", input_shape))  # a Shape: a sequence of ints
