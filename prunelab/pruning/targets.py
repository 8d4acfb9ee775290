"""Which tensors of a model are pruned.

By default the weights of Linear and Conv layers are prunable; biases and
normalisation parameters are not (METHODS.md §2). Any other weight tensor — an
LSTM's ``weight_ih_l0``, an Embedding's ``weight`` — can be named explicitly,
for unstructured pruning of recurrent nets and embeddings as in Zhu & Gupta 2017.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunelab._validation import suggest

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DEFAULT_TYPES = (nn.Linear, *CONV_TYPES)


@dataclass(eq=False)
class Target:
    """One prunable weight tensor and the module that owns it."""

    name: str                 # parameter name in the model, e.g. "fc1.weight"
    module_name: str          # e.g. "fc1"
    module: nn.Module
    param_name: str           # attribute on the module, e.g. "weight"

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def bias(self) -> nn.Parameter | None:
        """The bias that goes with a filter/unit (only for Linear and Conv weights)."""
        if self.param_name == "weight" and isinstance(self.module, DEFAULT_TYPES):
            return self.module.bias
        return None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, CONV_TYPES) and self.param_name == "weight"

    @property
    def is_structured(self) -> bool:
        """Linear/Conv weights have units/filters and input channels."""
        return self.param_name == "weight" and isinstance(self.module, DEFAULT_TYPES)

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    def __repr__(self) -> str:
        return f"Target({self.name}, {self.kind}, shape={tuple(self.weight.shape)})"


def _valid_names(model: nn.Module) -> tuple[list[str], list[str]]:
    modules = [name for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))]
    params = [name for name, p in model.named_parameters() if p.dim() >= 1]
    return modules, params


def resolve_targets(model: nn.Module, layers: Iterable[str] | None = None, *,
                    where: str = "Pruner") -> list[Target]:
    """Return the prunable tensors of ``model`` in model order.

    ``layers=None`` selects the weight of every Linear/Conv layer. Otherwise each
    entry is a module name (its ``weight``, or for a module without one, e.g. an
    LSTM, every parameter whose name starts with ``weight``) or a parameter name
    such as ``"lstm.weight_hh_l0"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"the 'model' parameter of {where} must be a torch.nn.Module. "
                        f"Got {type(model).__name__} instead.")
    modules = dict(model.named_modules())
    if layers is None:
        found = [Target(f"{name}.weight" if name else "weight", name, m, "weight")
                 for name, m in modules.items() if isinstance(m, DEFAULT_TYPES)]
        if not found:
            raise ValueError(f"{where}: the model has no Linear or Conv layer to prune; "
                             f"name the tensors to prune with layers=[...].")
        return found
    module_names, param_names = _valid_names(model)
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Iterable) or isinstance(layers, (bytes, dict)):
        raise TypeError(f"the 'layers' parameter of {where} must be None or a list of module or parameter "
                        f"names. Got {layers!r} of type {type(layers).__name__} instead.")
    layers = list(layers)
    if not layers:
        raise ValueError(f"the 'layers' parameter of {where} is an empty list; name at least one of the "
                         f"modules {', '.join(module_names)}, or pass None for every Linear/Conv weight.")
    found: dict[str, Target] = {}
    params = dict(model.named_parameters())
    for entry in layers:
        if not isinstance(entry, str):
            raise TypeError(f"the 'layers' parameter of {where} must be a list of module or "
                            f"parameter names. Got {entry!r} of type {type(entry).__name__}.")
        if entry in modules and entry:
            module = modules[entry]
            own = dict(module.named_parameters(recurse=False))
            names = ["weight"] if "weight" in own else [n for n in own if n.startswith("weight")]
            if not names:
                raise ValueError(f"the 'layers' parameter of {where}: module {entry!r} "
                                 f"({type(module).__name__}) has no weight tensor of its own; "
                                 f"valid modules: {', '.join(module_names)}.")
            for pname in names:
                full = f"{entry}.{pname}"
                found.setdefault(full, Target(full, entry, module, pname))
        elif entry in params:
            module_name, _, pname = entry.rpartition(".")
            module = modules[module_name]
            if params[entry].dim() < 1:
                raise ValueError(f"the 'layers' parameter of {where}: {entry!r} is a scalar.")
            found.setdefault(entry, Target(entry, module_name, module, pname))
        else:

            raise ValueError(
                f"the 'layers' parameter of {where} names {entry!r}, which is not in the model"
                f"{suggest(entry, module_names + param_names)}. Valid module names: "
                f"{', '.join(module_names)}; valid parameter names: {', '.join(param_names)}.")
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return sorted(found.values(), key=lambda t: order[t.name])


def weights(targets: Iterable[Target]) -> list[torch.Tensor]:
    return [t.weight for t in targets]
