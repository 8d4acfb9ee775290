"""Where the units of a model are, and what follows them.

A *unit* is an output channel of a Linear or Conv2d layer (a neuron or a filter) that
is not the model's last parametrised layer. For a model whose leaf modules run as a
plain chain (each one consumes the previous one's output — every model of the
registry), :func:`analyze` finds for each unit layer:

* its **channel ops**: the per-channel element-wise modules right after it (BatchNorm,
  activations, dropout); the unit's *activation* is the output of the last of them;
* its **between ops**: what follows up to the next Linear/Conv2d (pooling, flatten,
  dropout, and per-channel ops after pooling);
* its **consumer**: that next Linear/Conv2d.

Models that are not chains (branches, residual additions, concatenation) are handled
by Torch-Pruning's dependency graph instead (:mod:`prunelab.units.graph`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeVar, cast

import torch
from torch import nn

from prunelab._hooks import forward_eval, leaf_modules

PARAMETRISED = (nn.Linear, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# element-wise activations with f(0) = 0, so a removed unit (output 0) stays 0
ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Hardtanh,
    nn.Mish,
    nn.Hardswish,
    nn.SELU,
    nn.CELU,
)
PASSTHROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
CHANNEL_OPS = (*NORMS, *ACTIVATIONS, *PASSTHROUGH)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
BETWEEN_OPS = (*CHANNEL_OPS, *POOLS, nn.Flatten)


@dataclass
class Leaf:
    name: str
    module: nn.Module
    in_shape: tuple  # without the batch dimension
    out_shape: tuple


@dataclass
class UnitLayer:
    """One layer whose output channels are units."""

    name: str
    module: nn.Linear | nn.Conv2d
    channel_ops: list[Leaf] = field(default_factory=list)  # per-channel, before the activation point
    between: list[Leaf] = field(default_factory=list)  # activation point → consumer
    consumer: Leaf | None = None

    @property
    def n_units(self) -> int:
        return self.module.out_features if isinstance(self.module, nn.Linear) else self.module.out_channels

    @property
    def kind(self) -> str:
        return "dense" if isinstance(self.module, nn.Linear) else "conv"

    @property
    def point(self) -> nn.Module:
        """The module whose output is the units' activation."""
        return self.channel_ops[-1].module if self.channel_ops else self.module


@dataclass
class Chain:
    leaves: list[Leaf]
    units: list[UnitLayer]

    def unit(self, name: str) -> UnitLayer:
        for unit in self.units:
            if unit.name == name:
                return unit
        raise ValueError(f"no unit layer {name!r}; unit layers: {', '.join(u.name for u in self.units)}.")


def trace(model: nn.Module, input_shape) -> tuple[list[Leaf], bool]:
    """Leaf modules in execution order with their shapes, and whether they form a chain."""
    leaves: list[Leaf] = []
    links: list[tuple[int, int]] = []  # (id of input tensor, id of output tensor) per call
    names = {m: n for n, m in model.named_modules()}

    def hook(module, inputs, output):
        x = inputs[0] if inputs else None
        leaves.append(
            Leaf(
                names[module],
                module,
                tuple(x.shape[1:]) if torch.is_tensor(x) else (),
                tuple(output.shape[1:]) if torch.is_tensor(output) else (),
            )
        )
        links.append((id(x), id(output)))

    handles = [module.register_forward_hook(hook) for module in leaf_modules(model)]
    first = next(model.parameters())
    x = torch.zeros(1, *input_shape, device=first.device, dtype=first.dtype)
    out = forward_eval(model, [x], handles)
    calls = [leaf.module for leaf in leaves]
    chain = (
        len(set(map(id, calls))) == len(calls)
        and all(links[i][0] == links[i - 1][1] for i in range(1, len(links)))
        and bool(links)
        and links[0][0] == id(x)
        and links[-1][1] == id(out)
    )
    return leaves, chain


def analyze(model: nn.Module, input_shape) -> Chain | None:
    """The units of a chain model, or None when the model is not a chain of supported modules."""
    leaves, chain = trace(model, input_shape)
    if not chain or not all(isinstance(leaf.module, (*PARAMETRISED, *BETWEEN_OPS)) for leaf in leaves):
        return None
    layers = [i for i, leaf in enumerate(leaves) if isinstance(leaf.module, PARAMETRISED)]
    units = []
    for here, nxt in zip(layers, layers[1:]):
        unit = UnitLayer(leaves[here].name, cast("nn.Linear | nn.Conv2d", leaves[here].module))
        i = here + 1
        while i < nxt and isinstance(leaves[i].module, CHANNEL_OPS):
            unit.channel_ops.append(leaves[i])
            i += 1
        unit.between = leaves[i:nxt]
        unit.consumer = leaves[nxt]
        units.append(unit)
    return Chain(leaves, units)


def unsupported_activation(model: nn.Module) -> str | None:
    """Name of an element-wise module with f(0) ≠ 0 (a removed unit would not output 0)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Sigmoid, nn.Softplus, nn.LogSigmoid)):
            return f"{name} ({type(module).__name__})"
    return None


LAYER_SETS = ("all", "first_conv", "middle_conv", "last_conv", "first_dense")


class _Named(Protocol):
    """What :func:`select_layers` reads: a unit layer or a unit group."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...


_U = TypeVar("_U", bound=_Named)


def select_layers(units: list[_U], layers, where: str = "unit pruning") -> list[_U]:
    """Resolve ``"all"``, ``"first_conv"``, ``"middle_conv"``, ``"last_conv"``, ``"first_dense"``,
    one layer name, or a list of names, to unit layers."""
    convs = [u for u in units if u.kind == "conv"]
    dense = [u for u in units if u.kind == "dense"]
    named = {
        "all": units,
        "first_conv": convs[:1],
        "middle_conv": convs[len(convs) // 2 : len(convs) // 2 + 1],
        "last_conv": convs[-1:],
        "first_dense": dense[:1],
    }
    if isinstance(layers, str) and layers in named:
        chosen = named[layers]
        if not chosen:
            raise ValueError(
                f"the 'layers' parameter of {where} is {layers!r}, but the model has no such "
                f"layer (conv unit layers: {[u.name for u in convs]}, dense: {[u.name for u in dense]})."
            )
        return chosen
    wanted = [layers] if isinstance(layers, str) else list(layers)
    by_name = {u.name: u for u in units}
    out = []
    for name in wanted:
        if name not in by_name:
            raise ValueError(
                f"the 'layers' parameter of {where} names {name!r}, which is not a unit layer; "
                f"choose among: {', '.join(LAYER_SETS)}, or the layer names "
                f"{', '.join(by_name)}."
            )
        out.append(by_name[name])
    return out
