"""Which tensors of a model are pruned.

By default every *Linear-like* weight is prunable: ``nn.Linear``; ``nn.Conv1d/2d/3d`` (grouped
and depthwise included); Hugging Face's ``Conv1D`` (GPT-2's projections, weight stored
``(in, out)``; recognised by its shape and ``nf`` attribute, without importing ``transformers``);
``nn.MultiheadAttention``'s packed ``in_proj_weight`` (its q, k, v blocks; ``out_proj`` is a
Linear) or its separate ``q/k/v_proj_weight``; and the input and hidden weights of
``nn.RNN/LSTM/GRU`` (``weight_ih_l*``, ``weight_hh_l*``). Biases and normalisation parameters are
not. An ``nn.Embedding``'s ``weight`` is prunable when named (``layers=["embed"]``), as in
Zhu & Gupta 2017's language models.

Tied parameters — one tensor reachable under several names, like GPT-2's ``lm_head.weight``
and ``transformer.wte.weight`` — are found, counted and pruned once. A Linear whose weight is
tied to an embedding (an output layer tied to the input embedding) is skipped by default, with
a :class:`TiedWeightSkipped` warning, and pruned only when named.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from prunelab._validation import MODEL, STR, suggest, validate_params

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DEFAULT_TYPES = (nn.Linear, *CONV_TYPES)
RNN_TYPES = (nn.RNNBase,)
MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


class TiedWeightSkipped(UserWarning):
    """A weight tied to an embedding (e.g. an ``lm_head``) was left out of the default targets."""


def is_hf_conv1d(module: nn.Module, *, check_sizes: bool = True) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``,
    recognised by its class name and ``nf`` attribute, without importing ``transformers``.
    ``check_sizes=False`` skips the check that ``nf`` matches the weight (for surgery that has cut
    the weight and is about to fix ``nf``)."""
    weight = getattr(module, "weight", None)
    if type(module).__name__ != "Conv1D" or not isinstance(weight, torch.Tensor) or not hasattr(module, "nf"):
        return False
    return not check_sizes or (weight.dim() == 2 and cast(int, module.nf) == weight.shape[1])


def layout_of(module: nn.Module, param_name: str) -> str:
    """How a weight maps to ``(outputs, inputs)``: ``"linear"`` (``(out, in)``), ``"conv"``
    (``(out, in/groups, *kernel)``), ``"transposed"`` (HF Conv1D, ``(in, out)``), ``"attention"``
    (MultiheadAttention's packed q/k/v rows, ``(3·d, d)``), ``"recurrent"`` (an RNN's gate rows,
    ``(gates·hidden, in)``), ``"embedding"`` (``(vocabulary, dim)``) or ``"other"``."""
    if param_name == "weight":
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, CONV_TYPES):
            return "conv"
        if is_hf_conv1d(module):
            return "transposed"
        if isinstance(module, nn.Embedding):
            return "embedding"
    if isinstance(module, nn.MultiheadAttention) and param_name in MHA_WEIGHTS:
        return "attention"
    if isinstance(module, RNN_TYPES) and param_name.startswith(("weight_ih_l", "weight_hh_l")):
        return "recurrent"
    return "other"


def _default_params(module: nn.Module) -> list[str]:
    """The parameter names of ``module`` that are prunable by default."""
    own = dict(module.named_parameters(recurse=False))
    if isinstance(module, DEFAULT_TYPES) or is_hf_conv1d(module):
        return ["weight"] if "weight" in own else []
    if isinstance(module, nn.MultiheadAttention):
        return [n for n in MHA_WEIGHTS if own.get(n) is not None]
    if isinstance(module, RNN_TYPES):
        return [n for n in own if n.startswith(("weight_ih_l", "weight_hh_l"))]
    return []


@dataclass(eq=False)
class Target:
    """One prunable weight tensor and the module that owns it."""

    name: str  # parameter name in the model, e.g. "fc1.weight"
    module_name: str  # e.g. "fc1"
    module: nn.Module
    param_name: str  # attribute on the module, e.g. "weight"

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def layout(self) -> str:
        """See :func:`layout_of`."""
        return layout_of(self.module, self.param_name)

    @property
    def out_axis(self) -> int:
        """The weight's output (unit) axis: 1 for HF Conv1D's ``(in, out)`` weights, else 0."""
        return 1 if self.layout == "transposed" else 0

    @property
    def bias(self) -> nn.Parameter | None:
        """The bias that goes with a filter/unit: a Linear/Conv/Conv1D ``bias``, a
        MultiheadAttention's ``in_proj_bias`` (for the packed weight), an RNN's ``bias_ih_l0``
        for ``weight_ih_l0``; None otherwise."""
        layout = self.layout
        if layout in ("linear", "conv", "transposed"):
            return cast("nn.Parameter | None", self.module.bias)
        if layout == "attention" and self.param_name == "in_proj_weight":
            return cast("nn.Parameter | None", self.module.in_proj_bias)
        if layout == "recurrent":
            return getattr(self.module, "bias" + self.param_name[len("weight") :], None)
        return None

    @property
    def is_conv(self) -> bool:
        return self.layout == "conv"

    @property
    def is_structured(self) -> bool:
        """Weights with units (output rows/filters) and input channels: every Linear-like layout."""
        return self.layout in ("linear", "conv", "transposed", "attention", "recurrent")

    def matrix(self) -> torch.Tensor:
        """The weight (detached) as ``(outputs, inputs)``: HF Conv1D transposed, a conv kernel
        flattened per output like ``unfold``'s columns; other layouts as ``(rows, -1)``."""
        w = self.weight.detach()
        if self.layout == "transposed":
            return w.t()
        return w.reshape(w.shape[0], -1)

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    def __repr__(self) -> str:
        return f"Target({self.name}, {self.kind}, shape={tuple(self.weight.shape)})"


def _valid_names(model: nn.Module) -> tuple[list[str], list[str]]:
    modules = [name for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))]
    params = [name for name, p in model.named_parameters() if p.dim() >= 1]
    return modules, params


@validate_params({"model": [MODEL], "where": [STR]})
def resolve_targets(model: nn.Module, layers: Iterable[str] | None = None, *, where: str = "Pruner") -> list[Target]:
    """Return the prunable tensors of ``model`` in model order.

    ``layers=None`` selects the weight of every Linear/Conv layer. Otherwise each
    entry is a module name (its ``weight``, or for a module without one, e.g. an
    LSTM, every parameter whose name starts with ``weight``) or a parameter name
    such as ``"lstm.weight_hh_l0"``.
    """
    modules = dict(model.named_modules())
    if layers is None:
        return _default_targets(model, modules, where)
    module_names, param_names = _valid_names(model)
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Iterable) or isinstance(layers, (bytes, dict)):
        raise TypeError(
            f"the 'layers' parameter of {where} must be None or a list of module or parameter "
            f"names. Got {layers!r} of type {type(layers).__name__} instead."
        )
    layers = list(layers)
    if not layers:
        raise ValueError(
            f"the 'layers' parameter of {where} is an empty list; name at least one of the "
            f"modules {', '.join(module_names)}, or pass None for every Linear/Conv weight."
        )
    found: dict[str, Target] = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for entry in layers:
        if not isinstance(entry, str):
            raise TypeError(
                f"the 'layers' parameter of {where} must be a list of module or "
                f"parameter names. Got {entry!r} of type {type(entry).__name__}."
            )
        if entry in modules and entry:
            module = modules[entry]
            own = dict(module.named_parameters(recurse=False))
            names = (
                ["weight"] if "weight" in own else _default_params(module) or [n for n in own if n.startswith("weight")]
            )
            if not names:
                raise ValueError(
                    f"the 'layers' parameter of {where}: module {entry!r} "
                    f"({type(module).__name__}) has no weight tensor of its own; "
                    f"valid modules: {', '.join(module_names)}."
                )
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
                f"{', '.join(module_names)}; valid parameter names: {', '.join(param_names)}."
            )
    order = {name: i for i, (name, _) in enumerate(model.named_parameters(remove_duplicate=False))}
    return _unique_tensors(sorted(found.values(), key=lambda t: order[t.name]))


def _unique_tensors(targets: list[Target]) -> list[Target]:
    """One target per tensor: a tied tensor named twice is pruned once, under its first name."""
    seen: set[int] = set()
    out = []
    for t in targets:
        if id(t.weight) not in seen:
            seen.add(id(t.weight))
            out.append(t)
    return out


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """``{first name: [every name]}`` for each parameter reachable under more than one name."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {group[0]: group for group in names.values() if len(group) > 1}


def _default_targets(model: nn.Module, modules: dict, where: str) -> list[Target]:
    embeddings = {id(m.weight) for m in modules.values() if isinstance(m, nn.Embedding)}
    found, skipped = [], []
    for name, module in modules.items():
        for pname in _default_params(module):
            full = f"{name}.{pname}" if name else pname
            target = Target(full, name, module, pname)
            if id(target.weight) in embeddings:
                skipped.append(full)
                continue
            found.append(target)
    if skipped:
        warnings.warn(
            TiedWeightSkipped(
                f"{where}: {', '.join(skipped)} {'is' if len(skipped) == 1 else 'are'} tied to an embedding and "
                f"left out of the default targets (pruning {'it' if len(skipped) == 1 else 'them'} would prune the "
                f"embedding too); name {'it' if len(skipped) == 1 else 'them'} in layers=[...] to prune."
            ),
            stacklevel=4,
        )
    found = _unique_tensors(found)
    if not found:
        raise ValueError(
            f"{where}: the model has no Linear-like layer to prune (Linear, Conv, HF Conv1D, "
            f"MultiheadAttention, RNN); name the tensors to prune with layers=[...]."
        )
    return found


def weights(targets: Iterable[Target]) -> list[torch.Tensor]:
    return [t.weight for t in targets]
