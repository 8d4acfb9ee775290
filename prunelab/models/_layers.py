"""Shape planning and layer helpers shared by the model families.

A convolutional trunk is first written as a list of :class:`Conv` and
:class:`Pool` steps. :func:`trace` follows the spatial size through them
analytically, so that an input too small for the net (or a kernel larger than
the map it slides over) is reported before any layer is allocated, and so that
the flatten size of the classifier is known without a dry run. The same steps
are then turned into ``nn.Conv2d`` / ``nn.ReLU`` / ``nn.MaxPool2d`` layers by
:func:`conv_layers`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Conv:
    """A square ``kernel``×``kernel`` convolution named ``layer``.

    ``param`` names the user option that set the kernel, if any, so that a
    kernel too large for its input is blamed on that option.
    """

    layer: str
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    param: str | None = None


@dataclass(frozen=True)
class Pool:
    """A ``size``×``size`` max-pool (stride ``size``) named ``layer``."""

    layer: str
    size: int
    param: str | None = None


Step = Conv | Pool


def image_shape(input_shape: tuple[int, ...], where: str) -> tuple[int, int, int]:
    """``input_shape`` as ``(C, H, W)``, or a ValueError for a flat shape."""
    if len(input_shape) != 3:
        raise ValueError(
            f"the 'input_shape' parameter of {where} must be (C, H, W) for a "
            f"convolutional model. Got {tuple(input_shape)} instead."
        )
    channels, height, width = input_shape
    return channels, height, width


def _out_size(size: int, step: Step) -> int:
    """Output length along one axis; 0 when the step does not fit."""
    if isinstance(step, Conv):
        padded = size + 2 * step.padding
        return 0 if step.kernel > padded else (padded - step.kernel) // step.stride + 1
    return size // step.size


def _min_size(steps: Sequence[Step], limit: int = 100_000) -> int | None:
    """The smallest input length for which every step has a non-empty output."""
    for size in range(1, limit):
        current = size
        for step in steps:
            current = _out_size(current, step)
            if current < 1:
                break
        else:
            return size
    return None


def trace(where: str, input_shape: tuple[int, ...], steps: Sequence[Step]) -> tuple[int, int, int]:
    """The ``(C, H, W)`` shape after ``steps``, or a ValueError naming the step that fails."""
    channels, height, width = image_shape(input_shape, where)
    for step in steps:
        out_h, out_w = _out_size(height, step), _out_size(width, step)
        if out_h < 1 or out_w < 1:
            _raise_too_small(where, tuple(input_shape), steps, step, height, width)
        height, width = out_h, out_w
        if isinstance(step, Conv):
            channels = step.out_channels
    return channels, height, width


def _raise_too_small(
    where: str, shape: tuple[int, ...], steps: Sequence[Step], step: Step, height: int, width: int
) -> None:
    if isinstance(step, Conv):
        size, kind, pad = step.kernel, "conv", step.padding
    else:
        size, kind, pad = step.size, "max-pool", 0
    seen = f"{step.layer} gets a {height}×{width} map" + (f" (padded by {pad})" if pad else "")
    if step.param is not None:
        raise ValueError(
            f"the '{step.param}' parameter of {where} must be at most "
            f"{min(height, width) + 2 * pad} for input_shape {shape}: {seen}. "
            f"Got {size} instead."
        )
    needed = _min_size(steps)
    hint = f"; {where} needs H and W of at least {needed}" if needed else ""
    raise ValueError(
        f"the 'input_shape' parameter of {where} is too small: {seen} and its "
        f"{size}×{size} {kind} would leave an empty output. Got {shape} instead{hint}."
    )


def conv_layers(steps: Sequence[Step], in_channels: int, *, relu: bool = True) -> OrderedDict[str, nn.Module]:
    """Layers for ``steps``: ``convK`` (+ ``convK_relu``) and ``convK_pool``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    for step in steps:
        if isinstance(step, Conv):
            layers[step.layer] = nn.Conv2d(
                channels, step.out_channels, step.kernel, stride=step.stride, padding=step.padding
            )
            if relu:
                layers[f"{step.layer}_relu"] = nn.ReLU()
            channels = step.out_channels
        else:
            layers[step.layer] = nn.MaxPool2d(step.size)
    return layers


def dense_layers(in_features: int, hidden: Sequence[int], n_classes: int) -> OrderedDict[str, nn.Module]:
    """``fc1`` → ``fc1_relu`` → … → ``fcK`` (logits, no activation)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    widths = [in_features, *hidden, n_classes]
    for index, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        layers[f"fc{index}"] = nn.Linear(n_in, n_out)
        if index < len(widths) - 1:
            layers[f"fc{index}_relu"] = nn.ReLU()
    return layers


def scaled_width(width: int, factor: float) -> int:
    """``width`` times a model's ``width`` multiplier, rounded (half to even), at least 1."""
    return max(1, round(width * factor))


def check_widths(param: str, value: Any, *, where: str) -> list[int]:
    """A list (or tuple) of layer widths, each an int ≥ 1."""
    expected = "a list of ints ≥ 1"
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, Integral) and not isinstance(v, bool) for v in value
    ):
        raise TypeError(
            f"the '{param}' parameter of {where} must be {expected}. "
            f"Got {value!r} of type {type(value).__name__} instead."
        )
    widths = [int(v) for v in value]
    if any(v < 1 for v in widths):
        raise ValueError(f"the '{param}' parameter of {where} must be {expected}. Got {widths} instead.")
    return widths
