"""Unit pruning: score neurons and filters, remove them (optionally replacing them by their
mean output), and thin the model physically. Evci et al., ICLR 2019 submission;
METHODS.md §5–6.

    from prunelab import units
    result = units.remove_units(model, "bp_abs_mrs", data=(x_cal, y_cal), fraction=0.1)
    small = units.thin(model, result)            # a genuinely smaller model, same outputs

The 12 methods are the scorers ``rand``, ``norm``, ``rs``, ``abs_rs``, ``mrs``,
``abs_mrs``, each without or with mean replacement (the ``bp_`` prefix, for bias
propagation). ``layers`` picks the unit layers: ``"all"``, ``"first_conv"``,
``"middle_conv"``, ``"last_conv"``, ``"first_dense"``, one name or a list. Every
chosen layer loses ``fraction`` of its units (or ``count`` units); a layer is never
emptied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prunelab._validation import check_choice, check_finite, check_number, check_type
from prunelab.inputs import iter_batches
from prunelab.units import graph, surgery
from prunelab.units.scoring import SCORERS, UNIT_SCORERS, UnitStats, collect, needs_data, select
from prunelab.units.structure import (LAYER_SETS, Chain, UnitLayer, analyze, select_layers,
                                      unsupported_activation)

METHODS = tuple([*SCORERS, *(f"bp_{s}" for s in SCORERS)])

__all__ = ["LAYER_SETS", "METHODS", "SCORERS", "UnitPruning", "UnitStats", "Units", "collect_stats",
           "parse_method", "remove_units", "score_units", "thin", "thin_dead_units", "zero_units"]


def parse_method(method: str, where: str = "remove_units") -> tuple[str, bool]:
    """``"bp_abs_mrs"`` → ``("abs_mrs", True)``."""
    method = check_choice("method", method, METHODS, where=where)
    return (method[3:], True) if method.startswith("bp_") else (method, False)


@dataclass
class Units:
    """A model's unit layers: a chain analysis, or the layers of a graph model."""

    model: nn.Module
    input_shape: tuple
    chain: Chain | None
    graph_layers: list = field(default_factory=list)   # (name, module) when not a chain

    @classmethod
    def of(cls, model: nn.Module, input_shape=None) -> "Units":
        check_type("model", model, nn.Module, where="unit pruning")
        if input_shape is None:
            input_shape = getattr(model, "config", {}).get("input_shape")
            if input_shape is None:
                raise ValueError("unit pruning needs the model's input_shape (C, H, W) or (D,): pass "
                                 "input_shape=..., or data= so it can be read from the inputs.")
        input_shape = tuple(input_shape)
        bad = unsupported_activation(model)
        if bad:
            raise ValueError(f"unit pruning needs activations with f(0) = 0, so that a removed unit "
                             f"outputs 0; {bad} does not.")
        chain = analyze(model, input_shape)
        layers = []
        if chain is None:
            params = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            layers = params[:-1]
        return cls(model, input_shape, chain, layers)

    @property
    def layers(self):
        """The unit layers as objects with ``name``, ``module``, ``n_units``, ``kind``, ``point``."""
        if self.chain is not None:
            return self.chain.units
        # a graph model's unit layer: no per-channel ops are followed, so its point is its own output
        return [UnitLayer(n, m) for n, m in self.graph_layers]

    def example(self) -> torch.Tensor:
        return torch.zeros(1, *self.input_shape, device=next(self.model.parameters()).device)


@dataclass
class UnitPruning:
    """What :func:`remove_units` did: the units removed per layer, and how."""

    method: str
    plan: dict[str, torch.Tensor]            # layer name → removed unit indices
    mean_replacement: bool
    scores: dict[str, torch.Tensor]
    stats: dict[str, UnitStats] | None
    units: Units

    @property
    def removed(self) -> int:
        return sum(len(v) for v in self.plan.values())


def _batches(data, batch_size: int) -> list:
    """The calibration batches of ``data`` (none without data), checked as the Pruner checks its
    own: not empty, inputs and targets of equal length, no NaN/inf."""
    return [] if data is None else [(b.inputs, b.targets)
                                    for b in iter_batches(data, batch_size, where="unit pruning")]


def collect_stats(model: nn.Module, data, *, layers="all", input_shape=None, batch_size: int = 256,
                  units: Units | None = None) -> dict[str, UnitStats]:
    """Activation statistics (ā, per-example mean gradients) of the chosen unit layers."""
    batches = _batches(data, batch_size)
    if input_shape is None and batches:
        input_shape = tuple(batches[0][0].shape[1:])
    units = units or Units.of(model, input_shape)
    chosen = select_layers(units.layers, layers)
    return collect(model, chosen, batches)


def score_units(model: nn.Module, scorer: str, data=None, *, layers="all", input_shape=None, seed: int = 0,
                batch_size: int = 256, stats: dict[str, UnitStats] | None = None,
                units: Units | None = None) -> dict[str, torch.Tensor]:
    """Scores of the units of the chosen layers (lowest is removed first)."""
    scorer = check_choice("scorer", scorer, SCORERS, where="score_units")
    batches = _batches(data, batch_size)
    if input_shape is None and batches:
        input_shape = tuple(batches[0][0].shape[1:])
    units = units or Units.of(model, input_shape)
    chosen = select_layers(units.layers, layers, where="score_units")
    if needs_data(scorer) and stats is None:
        if not batches:
            raise ValueError(f"the {scorer!r} scorer needs calibration data: pass data=(x, y).")
        stats = collect(model, chosen, batches)
    generator = torch.Generator().manual_seed(check_number("seed", seed, where="score_units", low=0, integer=True))
    function = UNIT_SCORERS.get(scorer)
    scores = {u.name: function(u, stats[u.name] if stats else None, generator) for u in chosen}
    for name, score in scores.items():       # NaN/inf weights or activations: no ranking is meaningful
        check_finite(f"the {scorer!r} scores of the units of {name!r}", score,
                     hint="; check the model's weights and the calibration data")
    return scores


def remove_units(model: nn.Module, method: str = "bp_abs_mrs", data=None, *, fraction: float | None = None,
                 count: int | None = None, layers="all", input_shape=None, seed: int = 0,
                 batch_size: int = 256, stats: dict[str, UnitStats] | None = None,
                 units: Units | None = None) -> UnitPruning:
    """Score the units of the chosen layers with ``method``'s scorer and remove the lowest
    ``fraction`` (or ``count``) of each layer, in place (masked: the model keeps its shapes;
    call :func:`thin` for the smaller model). With a ``bp_`` method the removed units are
    replaced by their mean activation over ``data``, folded into the next layer's bias."""
    scorer, mean_replacement = parse_method(method)
    if (fraction is None) == (count is None):
        raise ValueError("remove_units takes exactly one of fraction= (in [0, 1)) or count= (units per layer).")
    if fraction is not None:
        fraction = check_number("fraction", fraction, where="remove_units", low=0.0, high=1.0, closed="left")
    else:
        count = check_number("count", count, where="remove_units", low=0, integer=True)
    batches = _batches(data, batch_size)
    if input_shape is None and batches:
        input_shape = tuple(batches[0][0].shape[1:])
    units = units or Units.of(model, input_shape)
    chosen = select_layers(units.layers, layers, where="remove_units")
    if (needs_data(scorer) or mean_replacement) and stats is None:
        if not batches:
            raise ValueError(f"method {method!r} needs calibration data: pass data=(x, y).")
        if units.chain is not None:
            stats = collect(model, chosen, batches)
    scores = score_units(model, scorer, None, layers=[u.name for u in chosen], seed=seed, stats=stats,
                         units=units) if (stats is not None or not needs_data(scorer)) else \
        score_units(model, scorer, batches, layers=[u.name for u in chosen], seed=seed, units=units)
    plan = {name: select(s, fraction=fraction, count=count) for name, s in scores.items()}
    if units.chain is not None:
        means = {name: stats[name].mean for name in plan} if mean_replacement else None
        surgery.mask_units(units.chain, plan, means)
    else:
        input_means = graph.consumer_input_means(model, batches) if mean_replacement else None
        graph.mask_units(model, units.example(), plan, input_means)
    return UnitPruning(method, plan, mean_replacement, scores, stats, units)


def thin(model: nn.Module, pruning: "UnitPruning | dict[str, torch.Tensor]", *, input_shape=None) -> nn.Module:
    """A physically smaller copy of ``model`` without the units of ``pruning`` (a
    :class:`UnitPruning` or a ``{layer: indices}`` plan). Its outputs equal the masked
    model's; mean replacement lives in the next layers' biases and is kept."""
    if isinstance(pruning, UnitPruning):
        plan, units = pruning.plan, pruning.units
    else:
        plan, units = pruning, Units.of(model, input_shape)
    plan = {k: torch.as_tensor(v, dtype=torch.long) for k, v in plan.items()}
    if units.chain is not None:
        return surgery.thin_chain(model, units.chain, plan)
    return graph.thin(model, units.example(), plan)


def zero_units(model: nn.Module, input_shape=None) -> dict[str, torch.Tensor]:
    """The units whose incoming weights are all exactly zero, as a plan for :func:`thin`:
    ``{layer name: unit indices}`` over the unit layers of :class:`Units` (a layer's rows of
    ``weight``: a neuron's inputs, or a filter's ``in × kh × kw`` taps).

        small = units.thin(model, units.zero_units(model, (1, 28, 28)), input_shape=(1, 28, 28))

    Layers with no such unit are left out, and so are layers where every unit is one (:func:`thin`
    never empties a layer). The plan can drop more than zeros: such a unit still outputs
    ``act(bias)`` (after a BatchNorm, its shift), a constant that the thinned model no longer adds
    to the next layer. Its outputs equal the model's exactly when those constants are 0, e.g.
    when the biases of the dead units are 0 too; :func:`thin_dead_units` keeps them.
    """
    units = Units.of(model, input_shape)
    plan = {}
    for layer in units.layers:
        rows = layer.module.weight.detach().flatten(1)
        dead = torch.nonzero((rows == 0).all(dim=1)).flatten().cpu()
        if 0 < len(dead) < len(rows):
            plan[layer.name] = dead
    return plan


def thin_dead_units(model: nn.Module, input_shape=None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A physically smaller copy of ``model`` without its dead units (:func:`zero_units`), with
    the same outputs, and the plan it removed.

    A dead unit has no input but still outputs a constant, ``act(bias)`` (after a BatchNorm, its
    shift). That constant is folded into the next layer's bias before the unit is removed: mean
    replacement (:func:`remove_units` with a ``bp_`` method) over one input is exact for a
    constant, except where the next layer is a convolution with zero padding, whose border
    positions saw zeros, not the constant (on VGG-11 with a third of every layer's units dead,
    the largest output error was 0.007 against 0.41 when the constants are dropped). If the next
    layer has no bias, the constant cannot be kept and is dropped, as
    ``thin(model, zero_units(model))`` does. ``model`` is not modified.
    """
    import copy

    plan = zero_units(model, input_shape)
    work = copy.deepcopy(model)
    if not plan:
        return work, plan
    units = Units.of(work, input_shape)
    example = units.example()
    batches = [(example, torch.zeros(len(example), dtype=torch.long, device=example.device))]
    if units.chain is not None:
        chosen = [u for u in units.chain.units if u.name in plan]
        foldable = all(u.consumer.module.bias is not None for u in chosen)
        means = None
        if foldable:
            stats = collect(work, chosen, batches)
            means = {name: stats[name].mean for name in plan}
        surgery.mask_units(units.chain, plan, means)
    else:
        foldable = all(m.bias is not None for m in work.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        input_means = graph.consumer_input_means(work, batches) if foldable else None
        graph.mask_units(work, example, plan, input_means)
    return thin(work, plan, input_shape=units.input_shape), plan


def thinned_parameters(model: nn.Module, pruning: UnitPruning) -> int:
    """Parameters the thinned model will have, counted without building it (chains)."""
    if pruning.units.chain is None:
        return sum(p.numel() for p in thin(model, pruning).parameters())
    return surgery.thinned_parameters(model, pruning.units.chain, pruning.plan)
