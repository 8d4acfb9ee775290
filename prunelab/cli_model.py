"""The user's own model on the command line: ``--model package.module:factory`` and ``--example-input``.

``--model package.module:factory`` imports ``package.module`` (from the current directory or
``PYTHONPATH``) and calls ``factory(**model_args)`` (``--model-arg key=value``, YAML values); the
result must be an ``nn.Module``. A name without a colon is a registry model, as before.

``--example-input SPEC`` describes the inputs of one call, from which every dry run, summary,
latency measurement, unit trace (``units``, ``export --thin``) and ONNX export is made. Grammar
(no spaces)::

    SPEC  := ITEM ("," ITEM)*
    ITEM  := [NAME "="] KIND ":" SHAPE [":" LOW "-" HIGH]
    KIND  := float | int | ones | zeros
    SHAPE := N ("x" N)*              # the full shape, batch dimension first

* ``float:1x3x32x32``: standard-normal floats (seeded), the model's float dtype;
* ``int:1x16:0-50257``: random integers in ``[LOW, HIGH)`` (token ids; default ``0-2``), int64;
* ``ones:1x16`` / ``zeros:1x16``: int64 ones or zeros (an attention mask);
* ``input_ids=int:1x16:0-1000,attention_mask=ones:1x16``: named items are keyword arguments
  (``model(input_ids=..., attention_mask=...)``); unnamed ones are positional, in order. Items
  are all named or all unnamed.

The whole example may hold at most :data:`MAX_ELEMENTS` elements; sizes are checked before
anything is allocated. Every mistake is one ``ValueError`` line naming the bad value and the
valid forms (the CLI exits with status 2).
"""

from __future__ import annotations

import importlib
import math
import re
import sys

import torch
from torch import nn

#: Upper bound on the elements of one --example-input (all items together), checked before allocation.
MAX_ELEMENTS = 2**26
KINDS = ("float", "int", "ones", "zeros")
FORMS = ("float:1x3x32x32", "int:1x16:0-50257", "input_ids=int:1x16:0-1000,attention_mask=ones:1x16")
_ITEM = re.compile(
    r"^(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)=)?(?P<kind>[a-z]+):(?P<shape>[0-9x]+)"
    r"(?::(?P<low>-?[0-9]+)-(?P<high>-?[0-9]+))?$"
)


def is_user_model(name: str | None) -> bool:
    """``package.module:factory`` (a colon) rather than a registry name."""
    return isinstance(name, str) and ":" in name


def _bad(value: str, why: str) -> ValueError:
    return ValueError(f"--example-input {value!r}: {why}; valid forms: {', '.join(FORMS)} (kinds: {', '.join(KINDS)}).")


def parse_example_input(spec: str) -> list[tuple[str | None, str, tuple[int, ...], tuple[int, int] | None]]:
    """The items of ``spec`` as ``(name or None, kind, shape, (low, high) or None)``, checked."""
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(str(spec), "empty")
    items: list[tuple[str | None, str, tuple[int, ...], tuple[int, int] | None]] = []
    total, names = 0, set()
    for part in spec.split(","):
        match = _ITEM.match(part.strip())
        if not match:
            raise _bad(part, "not of the form [NAME=]KIND:SHAPE[:LOW-HIGH]")
        name, kind = match["name"], match["kind"]
        if kind not in KINDS:
            raise _bad(part, f"unknown kind {kind!r}")
        dims = match["shape"].split("x")
        if not all(d.isdigit() and int(d) > 0 and len(d) <= 9 for d in dims):
            raise _bad(part, f"the shape {match['shape']!r} must be positive integers joined by 'x'")
        shape = tuple(int(d) for d in dims)
        total += math.prod(shape)
        if total > MAX_ELEMENTS:
            raise _bad(part, f"more than {MAX_ELEMENTS:,} elements in all")
        bounds = None
        if match["low"] is not None:
            if kind != "int":
                raise _bad(part, "a LOW-HIGH range is for kind int only")
            bounds = (int(match["low"]), int(match["high"]))
            if bounds[0] >= bounds[1]:
                raise _bad(part, f"the range {bounds[0]}-{bounds[1]} is empty (HIGH is exclusive)")
        elif kind == "int":
            bounds = (0, 2)
        if items and (name is None) != (items[0][0] is None):
            raise _bad(part, "items must be all named (keyword inputs) or all unnamed (positional inputs)")
        if name is not None:
            if name in names:
                raise _bad(part, f"the name {name!r} is given twice")
            names.add(name)
        items.append((name, kind, shape, bounds))
    return items


def make_example(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """The example inputs of ``spec``: a tensor, a tuple of positional tensors, or a dict of
    keyword tensors."""
    items = parse_example_input(spec)
    generator = torch.Generator().manual_seed(seed)
    args, kwargs = [], {}
    for name, kind, shape, bounds in items:
        if kind == "float":
            tensor = torch.randn(shape, generator=generator).to(dtype)
        elif kind == "int":
            assert bounds is not None  # parse_example_input gives every int item a range
            tensor = torch.randint(bounds[0], bounds[1], shape, generator=generator)
        else:
            tensor = (torch.ones if kind == "ones" else torch.zeros)(shape, dtype=torch.long)
        if name is None:
            args.append(tensor)
        else:
            kwargs[name] = tensor
    if kwargs:
        return kwargs
    return args[0] if len(args) == 1 else tuple(args)


def single_input_shape(example) -> tuple[int, ...] | None:
    """``input_shape`` (without the batch dimension) when the example is one float tensor, else None:
    such an example is run as a zero input of its shape, as for registry models."""
    if torch.is_tensor(example) and example.is_floating_point() and example.dim() >= 1:
        return tuple(example.shape[1:])
    return None


def build_user_model(spec: str, model_args: dict) -> nn.Module:
    """Import ``package.module`` and call ``factory(**model_args)``; one clear error otherwise."""
    module_name, _, attr = spec.partition(":")
    form = "--model package.module:factory (the module importable from the current directory or PYTHONPATH)"
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"--model {spec!r} is not of the form {form}.")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # the current directory, as `python -m` would
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"--model {spec!r}: no module named {err.name!r}; give {form}.") from None
    except Exception as err:
        raise ValueError(f"--model {spec!r}: importing {module_name!r} raised {type(err).__name__}: {err}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ValueError(
                f"--model {spec!r}: module {module_name!r} has no attribute {attr!r}; "
                f"its callables: {', '.join(public[:20]) or 'none'}."
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {attr!r} is a {type(factory).__name__}, not a callable factory.")
    try:
        model = factory(**model_args)
    except Exception as err:
        raise ValueError(
            f"--model {spec!r}: {attr}({', '.join(f'{k}={v!r}' for k, v in model_args.items())}) "
            f"raised {type(err).__name__}: {err}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec!r}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module.")
    return model.eval()
