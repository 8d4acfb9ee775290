"""The model registry and :func:`build_model`.

Every architecture is a *factory* registered in :data:`MODELS` under a name,
the way timm registers its models::

    @MODELS.register("my-net", "my_net")
    def my_net(input_shape, n_classes, *, width=16):
        ...
        return module

A factory receives the resolved ``input_shape`` (a tuple of ints, ``(C, H, W)``
or ``(D,)``) and ``n_classes`` positionally; its keyword arguments are the
model's *options*. :func:`build_model` checks the options against the
factory's signature, seeds parameter initialisation on request and records
the construction arguments on the model as ``model.config``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from numbers import Integral, Real
from typing import Any

import torch
from torch import nn

from prunelab._validation import MAX_UNITS, SEED, STR, Interval, check_number, suggest, validate_params
from prunelab.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

DEFAULT_INPUT_SHAPE = (1, 28, 28)
DEFAULT_N_CLASSES = 10

_WHERE = "build_model"


def model_names() -> list[str]:
    """Registered model names (aliases excluded), sorted."""
    return MODELS.names()


def _named(name: Any) -> str:
    """Messages about a model's arguments name the model (``mlp``), or build_model for an unknown name."""
    try:
        return MODELS.canonical(name)
    except (ValueError, TypeError, KeyError):
        return _WHERE


@validate_params({"name": [STR]}, where="model_options")
def model_options(name: str) -> dict[str, Any]:
    """The options of model ``name`` with their default values."""
    factory = MODELS.get(name, param="name", where=_WHERE)
    return {p.name: p.default for p in _option_parameters(factory)}


@validate_params(
    {"name": [STR], "n_classes": [Interval(Integral, 1, MAX_UNITS), None], "seed": [SEED, None]}, where=_named
)
def build_model(
    name: str,
    *,
    input_shape: Any = None,
    n_classes: Any = None,
    dataset: Any = None,
    seed: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name`` for inputs of ``input_shape``.

    ``input_shape`` is ``(C, H, W)``; MLPs also accept a flat ``(D,)``.
    ``input_shape`` and ``n_classes`` default to those of ``dataset`` (any
    object with ``.input_shape`` and ``.n_classes``), then to ``(1, 28, 28)``
    and 10; explicit arguments win over the dataset. ``seed`` (an int, or
    ``None`` for the global RNG) makes parameter initialisation deterministic
    without disturbing the global RNG state. The remaining keyword arguments
    are the model's options (see :func:`model_options`). Every model also takes ``hashed=c``
    (a compression factor in (0, 1]): its Linear and Conv2d layers then become HashedNets
    layers keeping the fraction ``c`` of their weights as shared buckets
    (:mod:`prunelab.models.hashed`).

    The returned model carries ``model.config``, a JSON-serialisable dict
    ``{"name", "input_shape", "n_classes", <every option>, "seed"}`` such that
    ``build_model(**model.config)`` rebuilds it (with identical weights when
    ``seed`` was given).
    """
    canonical = MODELS.canonical(name, param="name", where=_WHERE)
    factory = MODELS.get(canonical)
    hashed = kwargs.pop("hashed", None)
    if hashed is not None:
        hashed = check_number("hashed", hashed, where=canonical, low=0.0, high=1.0, closed="right")
    options = _resolve_options(canonical, factory, kwargs)
    shape, classes = _resolve_data(canonical, input_shape, n_classes, dataset)
    if seed is not None:
        seed = int(seed)

    _check_size(canonical, factory, shape, classes, options)

    def make() -> nn.Module:
        model = factory(shape, classes, **options)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"the factory of model {canonical} must return an nn.Module. Got {type(model).__name__} instead."
            )
        if hashed is not None:
            from prunelab.models.hashed import hash_layers

            hash_layers(model, hashed, seed=seed or 0)
        return model

    if seed is None:
        model = make()
    else:
        # Only the CPU generator is forked: models are built on the CPU.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make()

    # nn.Module takes any attribute; torch's stubs type a module's attributes as Tensor | Module
    model.config = {  # type: ignore[assignment]
        "name": canonical,
        "input_shape": list(shape),
        "n_classes": classes,
        **{key: _plain(value) for key, value in options.items()},
        **({"hashed": hashed} if hashed is not None else {}),
        "seed": seed,
    }
    return model


def _option_parameters(factory: Callable[..., Any]) -> list[inspect.Parameter]:
    """The factory's parameters after ``input_shape`` and ``n_classes``."""
    params = list(inspect.signature(factory).parameters.values())[2:]
    return [p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


#: The most parameters a registry model may have (4 GiB of float32): checked on the meta device,
#: before any memory is allocated, so that ``hidden=[1000000000]`` is an error, not an allocation.
MAX_MODEL_PARAMETERS = 1 << 30


def _check_size(name: str, factory: Callable[..., Any], shape, classes: int, options: dict) -> None:
    """Refuse options that describe a model of more than :data:`MAX_MODEL_PARAMETERS` parameters,
    counted on a copy built on the meta device (no memory, no random numbers drawn)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            meta = factory(shape, classes, **options)
    except Exception:  # the real build below reports the options' own error
        return
    n = sum(p.numel() for p in meta.parameters()) if isinstance(meta, nn.Module) else 0
    if n > MAX_MODEL_PARAMETERS:
        given = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise ValueError(
            f"the options of model {name} ({given}) describe {n:,} parameters, more than the "
            f"{MAX_MODEL_PARAMETERS:,} a model may have (4 GiB of float32)."
        )


def _resolve_options(name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every option of the factory: its defaults updated by ``kwargs``."""
    params = _option_parameters(factory)
    valid = [p.name for p in params]
    open_ended = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    if not open_ended:
        for key in kwargs:
            if key not in valid:
                accepted = f"{name} accepts: {', '.join(valid)}" if valid else f"{name} accepts no options"
                raise TypeError(
                    f"unknown option {key!r} for model {name}{suggest(key, valid)}; {accepted} "
                    f"(and input_shape, n_classes, dataset, seed, which every model accepts)."
                )
    options = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    options.update(kwargs)
    return options


def _resolve_data(name: str, input_shape: Any, n_classes: Any, dataset: Any) -> tuple[tuple[int, ...], int]:
    if input_shape is None:
        input_shape = _from_dataset(dataset, "input_shape", DEFAULT_INPUT_SHAPE)
    if n_classes is None:
        n_classes = _from_dataset(dataset, "n_classes", DEFAULT_N_CLASSES)
    shape = _check_input_shape(input_shape, name)
    classes = check_number("n_classes", n_classes, where=name, low=1, high=MAX_UNITS, integer=True)
    return shape, classes


def _from_dataset(dataset: Any, attribute: str, default: Any) -> Any:
    if dataset is None:
        return default
    if not hasattr(dataset, attribute):
        raise TypeError(
            f"the 'dataset' parameter of {_WHERE} must have .input_shape and .n_classes "
            f"attributes. Got {type(dataset).__name__} without .{attribute} instead."
        )
    return getattr(dataset, attribute)


def _check_input_shape(value: Any, name: str) -> tuple[int, ...]:
    expected = "a (C, H, W) tuple of positive ints (or (D,) for an MLP)"
    prefix = f"the 'input_shape' parameter of {name} must be {expected}."
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, Integral) and not isinstance(v, bool) for v in value
    ):
        raise TypeError(f"{prefix} Got {value!r} of type {type(value).__name__} instead.")
    shape = tuple(int(v) for v in value)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(f"{prefix} Got {shape} instead.")
    return shape


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of an option value (tuples become lists)."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
