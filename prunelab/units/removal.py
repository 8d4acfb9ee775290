"""Unit removal: find a model's unit layers or unit groups (:class:`Units`), score their units,
remove the lowest (masked, optionally with mean replacement) and thin the model physically.

These are the functions :mod:`prunelab.units` exports (``units.remove_units``, ``units.thin``, ...;
the package docstring describes the methods); the layer-by-layer machinery is in
:mod:`~prunelab.units.structure`, :mod:`~prunelab.units.scoring` and :mod:`~prunelab.units.surgery`,
the unit groups in :mod:`~prunelab.units.groups` and the modules that find them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from numbers import Integral
from typing import cast

import torch
from torch import nn

from prunelab._model_checks import check_batch_fits, check_materialised, floating_dtype
from prunelab._validation import (
    BATCH_SIZE,
    DATA,
    MAPPING,
    MAX_UNITS,
    MODEL,
    SEED,
    SHAPE,
    SPARSITY,
    STR,
    Interval,
    Options,
    Types,
    check_choice,
    check_finite,
    check_type,
    validate_params,
)
from prunelab.inputs import Batch, iter_batches, make_loss
from prunelab.units import groups as unit_groups
from prunelab.units import surgery
from prunelab.units.groups import UnitGroup
from prunelab.units.scoring import SCORERS, UNIT_SCORERS, collect, needs_data, select
from prunelab.units.structure import Chain, Leaf, analyze, select_layers, unsupported_activation

METHODS = tuple([*SCORERS, *(f"bp_{s}" for s in SCORERS)])

#: Modules that make a model a transformer or sequence model: its unit groups are MLP neurons
#: and attention heads (:mod:`prunelab.units.attention`), not Torch-Pruning's channel groups.
SEQUENCE_MODULES = (nn.Embedding, nn.LayerNorm, nn.MultiheadAttention, nn.RNNBase)


def parse_method(method: str, where: str = "remove_units") -> tuple[str, bool]:
    """``"bp_abs_mrs"`` → ``("abs_mrs", True)``."""
    method = check_choice("method", method, METHODS, where=where)
    return (method[3:], True) if method.startswith("bp_") else (method, False)


def _single_float_input(batch: Batch | None) -> bool:
    return batch is not None and len(batch.args) == 1 and not batch.kwargs and batch.args[0].is_floating_point()


@dataclass
class Units:
    """A model's unit layers: a chain analysis (plain chains of Linear/Conv2d), or its unit
    groups (:class:`~prunelab.units.groups.UnitGroup`) with the groups refused and why."""

    model: nn.Module
    input_shape: tuple | None
    chain: Chain | None
    groups: list = field(default_factory=list)
    refused: dict = field(default_factory=dict)  # group name → reason it cannot be removed
    example_batch: Batch | None = None

    @classmethod
    def of(cls, model: nn.Module, input_shape=None, example_inputs=None) -> Units:
        """The units of ``model``, traced on ``example_inputs`` (a tensor, tuple or dict the model
        takes) or a zero input of ``input_shape``."""
        check_type("model", model, nn.Module, where="unit pruning")
        check_materialised(model, "unit pruning")
        if next(iter(model.parameters()), None) is None:
            raise ValueError(
                f"the 'model' parameter of unit pruning ({type(model).__name__}) has no parameters, "
                f"so no units to remove."
            )
        if input_shape is None and example_inputs is None:
            input_shape = (
                getattr(model, "config", {}).get("input_shape")
                if isinstance(getattr(model, "config", None), dict)
                else None
            )
            if input_shape is None:
                raise ValueError(
                    "unit pruning needs the model's inputs: pass input_shape=(C, H, W) or (D,), "
                    "example_inputs=..., or data= so they can be read from the calibration data."
                )
        from prunelab.inputs import example_batch

        batch = example_batch(
            model,
            tuple(input_shape) if input_shape is not None else None,
            example_inputs,
            where="unit pruning",
            device=next(iter(model.parameters()), torch.empty(0)).device,
            dtype=floating_dtype(model),
        )
        _dry_run(model, batch, input_shape)
        bad = unsupported_activation(model)
        if bad:
            raise ValueError(
                f"unit pruning needs activations with f(0) = 0, so that a removed unit outputs 0; {bad} does not."
            )
        shape = tuple(batch.args[0].shape[1:]) if _single_float_input(batch) else None
        chain = analyze(model, shape) if shape is not None and not _is_sequence(model) else None
        units = cls(model, shape, chain, example_batch=batch)
        if chain is None:
            units.groups, units.refused = _find_groups(model, batch)
        return units

    @property
    def layers(self):
        """The unit layers (chains) or unit groups: objects with ``name``, ``module``, ``n_units``, ``kind``."""
        return self.chain.units if self.chain is not None else self.groups

    def example(self) -> torch.Tensor:
        assert self.example_batch is not None  # Units.of traced the model on it
        return self.example_batch.inputs

    def choose(self, layers, where: str) -> list:
        """The chosen unit layers or groups; a refused group named raises its reason. Layers of no
        units (a zero-size ``nn.Linear(8, 0)``) are left out of ``"all"`` and refused when named."""
        chosen = self._choose(layers, where)
        empty = [u.name for u in chosen if u.n_units == 0]
        if empty and layers != "all":
            raise ValueError(
                f"the 'layers' parameter of {where} chooses {empty[0]!r}, which has no units (a "
                f"zero-size layer); leave it out."
            )
        chosen = [u for u in chosen if u.n_units > 0]
        if not chosen:
            raise ValueError(
                f"the 'model' parameter of {where} has no units to remove: every unit layer is "
                f"empty ({', '.join(empty)})."
            )
        return chosen

    def _choose(self, layers, where: str) -> list:
        if self.chain is not None:
            return select_layers(self.chain.units, layers, where=where)
        for name in [layers] if isinstance(layers, str) else list(layers):
            if name in self.refused:
                raise ValueError(
                    f"the 'layers' parameter of {where} names {name!r}, whose units cannot be removed: "
                    f"{self.refused[name]}."
                )
        # "all" leaves out whole key/value heads: they are an alternative to the query heads, named on purpose
        pool = [g for g in self.groups if g.kind != "kv_heads"] if layers == "all" else self.groups
        chosen = select_layers(pool, layers, where=where)
        owners = [g.owner for g in chosen if g.owner is not None]
        if len(owners) != len({id(o) for o in owners}):
            raise ValueError(
                f"the 'layers' parameter of {where} chooses both the query heads and the key/value heads "
                f"of one attention layer; choose one of the two."
            )
        return chosen


def _dry_run(model: nn.Module, batch: Batch, input_shape) -> None:
    """Run the example once, so that inputs the model cannot take fail with one clear error."""
    from prunelab.inputs import forward_batches

    try:
        forward_batches(model, [batch], where="unit pruning")
    except (RuntimeError, TypeError, IndexError, ValueError) as error:
        given = (
            f"a zero float tensor of input_shape {tuple(input_shape)}"
            if input_shape is not None
            else "the example inputs"
        )
        raise ValueError(
            f"unit pruning could not run the model on {given}: {type(error).__name__}: {error}. Pass "
            f"example_inputs= (or data=) in the form the model takes, e.g. token ids or a dict "
            f"of keyword inputs."
        ) from None


def _is_sequence(model: nn.Module) -> bool:
    return any(isinstance(m, SEQUENCE_MODULES) or type(m).__name__.endswith("RMSNorm") for m in model.modules())


def _find_groups(model: nn.Module, batch: Batch) -> tuple[list, dict]:
    from prunelab.units import attention, graph, recurrent

    if _is_sequence(model):
        found, refused = attention.find(model)
        found += recurrent.find(model, batch)
        for name, module in model.named_modules():
            if isinstance(module, nn.RNNBase):
                refused[name] = (
                    f"its hidden units feed back into every time step of {type(module).__name__}; "
                    f"recurrent units are not removed"
                )
        if any(isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm") for m in model.modules()):
            refused["hidden size"] = (
                "the hidden size (embeddings, the residual stream and its LayerNorm/RMSNorm) is not removed: a norm "
                "over all hidden channels changes for the others when some go, so no thinned model equals the "
                "masked one"
            )
    else:
        found, refused = graph.find(model, batch)
    if not found:
        reasons = "; ".join(f"{k}: {v}" for k, v in refused.items()) or "no Linear/Conv layer feeds another"
        raise ValueError(f"unit pruning found no unit layers in this {type(model).__name__} ({reasons}).")
    return found, refused


@dataclass
class UnitPruning:
    """What :func:`remove_units` did: the units removed per layer (or group), and how."""

    method: str
    plan: dict[str, torch.Tensor]  # layer or group name → removed unit indices
    mean_replacement: bool
    scores: dict[str, torch.Tensor]
    stats: dict | None
    units: Units

    @property
    def refused(self) -> dict[str, str]:
        """Groups of the model that unit removal leaves alone, with the reason."""
        return dict(self.units.refused)

    @property
    def removed(self) -> int:
        return sum(len(v) for v in self.plan.values())


def _batches(data, batch_size: int) -> list[Batch]:
    """The calibration batches of ``data`` (none without data), checked as the Pruner checks its
    own: not empty, inputs and targets of equal length, no NaN/inf."""
    return [] if data is None else list(iter_batches(data, batch_size, where="unit pruning"))


def _units(model, units, input_shape, example_inputs, batches) -> Units:
    """The given ``units``, or the model's, found on the inputs given or on the first calibration
    batch; calibration batches that the model cannot take are refused here, before any scoring."""
    if units is None:
        if input_shape is None and example_inputs is None and batches:
            example_inputs = batches[0].slice(0, 2).inputs
        units = Units.of(model, input_shape, example_inputs)
    if batches:
        check_batch_fits(model, batches[0], "the calibration batches ('data') of unit pruning")
    return units


def _collect(model, units: Units, chosen, batches, loss) -> dict:
    if units.chain is not None:
        return collect(model, chosen, batches, loss)
    return unit_groups.collect_groups(model, chosen, batches, loss)


def _declared(**extra) -> dict:
    """What the unit functions declare alike, plus ``extra``."""
    return {
        "model": [MODEL],
        "data": [DATA, None],
        "input_shape": [SHAPE, None],
        "batch_size": [BATCH_SIZE],
        "units": [Types(Units), None],
        "loss_fn": ["callable", None],
        "output_key": [STR, None],
        **extra,
    }


@validate_params(_declared())
def collect_stats(
    model: nn.Module,
    data,
    *,
    layers="all",
    input_shape=None,
    example_inputs=None,
    batch_size: int = 256,
    units: Units | None = None,
    loss_fn=None,
    output_key=None,
) -> dict:
    """Activation statistics of the chosen unit layers (:class:`UnitStats`) or groups
    (:class:`~prunelab.units.groups.GroupStats`)."""
    batches = _batches(data, batch_size)
    units = _units(model, units, input_shape, example_inputs, batches)
    chosen = units.choose(layers, "collect_stats")
    return _collect(model, units, chosen, batches, make_loss(loss_fn, output_key, where="collect_stats"))


@validate_params(_declared(scorer=[Options(SCORERS)], seed=[SEED], stats=[MAPPING, None]))
def score_units(
    model: nn.Module,
    scorer: str,
    data=None,
    *,
    layers="all",
    input_shape=None,
    example_inputs=None,
    seed: int = 0,
    batch_size: int = 256,
    stats: dict | None = None,
    units: Units | None = None,
    loss_fn=None,
    output_key: str | None = None,
) -> dict[str, torch.Tensor]:
    """Scores of the units of the chosen layers or groups (lowest is removed first). A group's
    unit is scored once, from all of its members (see :mod:`prunelab.units.groups`)."""
    batches = _batches(data, batch_size)
    units = _units(model, units, input_shape, example_inputs, batches)
    chosen = units.choose(layers, "score_units")
    if needs_data(scorer) and stats is None:
        if not batches:
            raise ValueError(f"the {scorer!r} scorer needs calibration data: pass data=(x, y).")
        stats = _collect(model, units, chosen, batches, make_loss(loss_fn, output_key, where="score_units"))
    generator = torch.Generator().manual_seed(int(seed))
    if units.chain is not None:
        function = UNIT_SCORERS.get(scorer)
        scores = {u.name: function(u, stats[u.name] if stats else None, generator) for u in chosen}
    else:
        scores = {
            g.name: unit_groups.group_scores(scorer, g, stats[g.name] if stats else None, generator) for g in chosen
        }
    for name, score in scores.items():  # NaN/inf weights or activations: no ranking is meaningful
        check_finite(
            f"the {scorer!r} scores of the units of {name!r}",
            score,
            hint="; check the model's weights and the calibration data",
        )
    return scores


@validate_params(
    _declared(
        method=[Options(METHODS)],
        fraction=[SPARSITY, None],
        count=[Interval(Integral, 0, MAX_UNITS), None],
        seed=[SEED],
        stats=[MAPPING, None],
    )
)
def remove_units(
    model: nn.Module,
    method: str = "bp_abs_mrs",
    data=None,
    *,
    fraction: float | None = None,
    count: int | None = None,
    layers="all",
    input_shape=None,
    example_inputs=None,
    seed: int = 0,
    batch_size: int = 256,
    stats: dict | None = None,
    units: Units | None = None,
    loss_fn=None,
    output_key: str | None = None,
) -> UnitPruning:
    """Score the units of the chosen layers with ``method``'s scorer and remove the lowest
    ``fraction`` (or ``count``) of each layer or group, in place (masked: the model keeps its
    shapes; call :func:`thin` for the smaller model). With a ``bp_`` method the removed units are
    replaced by their mean activation over ``data``, folded into the next layer's bias."""
    scorer, mean_replacement = parse_method(method)
    if (fraction is None) == (count is None):
        raise ValueError("remove_units takes exactly one of fraction= (in [0, 1)) or count= (units per layer).")
    fraction = None if fraction is None else float(fraction)
    count = None if count is None else int(count)
    batches = _batches(data, batch_size)
    units = _units(model, units, input_shape, example_inputs, batches)
    chosen = units.choose(layers, "remove_units")
    names = {m: n for n, m in model.named_modules()}
    if mean_replacement and units.chain is None:
        unit_groups.check_foldable(chosen, names)
    loss = make_loss(loss_fn, output_key, where="remove_units")
    if (needs_data(scorer) or mean_replacement) and stats is None:
        if not batches:
            raise ValueError(f"method {method!r} needs calibration data: pass data=(x, y).")
        if units.chain is not None or needs_data(scorer):
            stats = _collect(model, units, chosen, batches, loss)
    scores = score_units(model, scorer, None, layers=[u.name for u in chosen], seed=seed, stats=stats, units=units)
    if units.chain is not None:
        plan = {name: select(s, fraction=fraction, count=count) for name, s in scores.items()}
        assert stats is not None or not mean_replacement  # collected above for mean replacement
        means = {name: stats[name].mean for name in plan} if stats is not None and mean_replacement else None
        surgery.mask_units(units.chain, plan, means)
        return UnitPruning(method, plan, mean_replacement, scores, stats, units)
    plan = {g.name: unit_groups.select_group(g, scores[g.name], select, fraction, count) for g in chosen}
    means = None
    if mean_replacement:
        means = {k: v.means for k, v in stats.items()} if stats else unit_groups.point_means(model, chosen, batches)
    _mask_groups(chosen, plan, means, names)
    return UnitPruning(method, plan, mean_replacement, scores, stats, units)


def _mask_groups(chosen: list[UnitGroup], plan: dict, means: dict | None, names: dict) -> None:
    """Masked removal of the groups' planned units, with mean replacement when ``means`` are given:
    every fold reads the weights before any zeroing."""
    if means is not None:
        for group in chosen:
            if len(plan[group.name]):
                unit_groups.fold_means(group, plan[group.name], means[group.name], names)
    for group in chosen:
        if len(plan[group.name]):
            unit_groups.zero(group, plan[group.name])


@validate_params({"model": [MODEL], "pruning": [Types(UnitPruning, dict)], "input_shape": [SHAPE, None]})
def thin(
    model: nn.Module, pruning: UnitPruning | dict[str, torch.Tensor], *, input_shape=None, example_inputs=None
) -> nn.Module:
    """A physically smaller copy of ``model`` without the units of ``pruning`` (a
    :class:`UnitPruning` or a ``{layer or group: indices}`` plan). Its outputs equal the masked
    model's; mean replacement lives in the next layers' biases and is kept."""
    if isinstance(pruning, UnitPruning):
        plan, units = pruning.plan, pruning.units
    else:
        plan, units = pruning, Units.of(model, input_shape, example_inputs)
    plan = {k: torch.as_tensor(v, dtype=torch.long) for k, v in plan.items()}
    _check_plan(plan, units)
    if units.chain is not None:
        return surgery.thin_chain(model, units.chain, plan)
    plan = {k: v.cpu() for k, v in plan.items()}
    by_name = {g.name: g for g in units.groups}
    unknown = [k for k in plan if k not in by_name]
    if unknown:
        raise ValueError(
            f"the plan names {unknown[0]!r}, which is not a unit group of the model; groups: {', '.join(by_name)}."
        )
    if units.model is not model:  # the groups refer to another model's modules: find them again
        units = Units.of(model, example_inputs=units.example())
        by_name = {g.name: g for g in units.groups}
    thinned, groups = copy.deepcopy((model, [by_name[k] for k in plan]))
    unit_groups.thin_groups(thinned, groups, plan)
    if isinstance(pruning, UnitPruning) and _still_masked([by_name[k] for k in plan], plan):
        assert units.example_batch is not None  # Units.of traced the model on it
        _check_thinned(model, thinned, units.example_batch, list(plan))
    return thinned


def _check_plan(plan: dict[str, torch.Tensor], units: Units) -> None:
    """Every planned unit exists, once, and no layer loses all its units (thin never empties one)."""
    sizes = {u.name: u.n_units for u in units.layers}
    for name, idx in plan.items():
        if name not in sizes:
            raise ValueError(
                f"the plan names {name!r}, which is not a unit layer or group of the model; "
                f"choose among: {', '.join(sizes)}."
            )
        n = sizes[name]
        outside = idx[(idx < 0) | (idx >= n)] if idx.dim() == 1 else idx.flatten()
        if idx.dim() != 1 or len(outside):
            raise ValueError(
                f"the plan given to thin removes units {idx.tolist()} of {name!r}, which has units 0 to "
                f"{n - 1}; give a list of unit indices in that range."
            )
        if len(torch.unique(idx)) != len(idx) or len(idx) >= n:
            raise ValueError(
                f"the plan given to thin removes {len(idx)} units of {name!r} (of {n}), "
                f"{'some twice' if len(torch.unique(idx)) != len(idx) else 'all of them'}; thin "
                f"keeps at least one unit in every layer."
            )


def _still_masked(groups: list[UnitGroup], plan: dict) -> bool:
    """Whether every tensor that masked removal zeroed is still 0 (no training since)."""
    for group in groups:
        units = plan[group.name]
        for axis in group.zero:
            tensor = getattr(axis.module, axis.name)
            if (
                tensor is not None
                and len(units)
                and bool(tensor.detach().index_select(axis.dim, axis.index[units].flatten().to(tensor.device)).any())
            ):
                return False
    return True


def _check_thinned(masked: nn.Module, thinned: nn.Module, batch: Batch, names: list[str]) -> None:
    """The thinned model must give the masked model's outputs on the example: a forward that reads
    a size prunelab does not update (a head count kept elsewhere) is caught here, not later."""
    from prunelab.inputs import forward_batches, logits_of

    expected = forward_batches(masked, [batch], where="thin")
    try:
        got = forward_batches(thinned, [batch], where="thin")
        expected, got = logits_of(expected), logits_of(got)
        difference = float((expected - got).abs().max()) if expected.shape == got.shape else float("inf")
    except (RuntimeError, ValueError, TypeError) as error:
        difference, detail = float("inf"), f" ({type(error).__name__}: {error})"
    else:
        detail = ""
    if not difference <= 1e-4 * (1.0 + float(expected.abs().max())):
        raise ValueError(
            f"thinning {', '.join(names)} does not keep the masked model's outputs (largest difference "
            f"{difference:.3g}){detail}: the model's forward reads a size that unit removal does not "
            f"update (e.g. a head count of its own). The masked model is unchanged; use it as it is."
        )


@validate_params({"model": [MODEL], "input_shape": [SHAPE, None]})
def zero_units(model: nn.Module, input_shape=None, example_inputs=None) -> dict[str, torch.Tensor]:
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
    units = Units.of(model, input_shape, example_inputs)
    plan = {}
    for layer in units.layers:
        dead = _dead(layer)
        if 0 < len(dead) < layer.n_units:
            plan[layer.name] = dead
    return plan


def _dead(layer) -> torch.Tensor:
    """Units of a unit layer (its weight rows) or group (all its producing rows) with no input."""
    if isinstance(layer, UnitGroup):
        alive = torch.zeros(layer.n_units, dtype=torch.bool)
        for axis in layer.rows:
            w = getattr(axis.module, axis.name).detach().movedim(axis.dim, 0)
            rows = w[axis.index.flatten()].reshape(layer.n_units, -1)
            alive |= (rows != 0).any(dim=1).cpu()
        return torch.nonzero(~alive).flatten()
    rows = layer.module.weight.detach().flatten(1)
    return torch.nonzero((rows == 0).all(dim=1)).flatten().cpu()


@validate_params({"model": [MODEL], "input_shape": [SHAPE, None]})
def thin_dead_units(
    model: nn.Module, input_shape=None, example_inputs=None
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
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

    plan = zero_units(model, input_shape, example_inputs)
    work = copy.deepcopy(model)
    if not plan:
        return work, plan
    units = Units.of(work, input_shape, example_inputs)
    example = units.example()
    if units.chain is not None:
        batches = [(example, torch.zeros(len(example), dtype=torch.long, device=example.device))]
        chosen = [u for u in units.chain.units if u.name in plan]
        # every unit layer of a chain has a consumer
        foldable = all(cast(Leaf, u.consumer).module.bias is not None for u in chosen)
        means = None
        if foldable:
            stats = collect(work, chosen, batches)
            means = {name: stats[name].mean for name in plan}
        surgery.mask_units(units.chain, plan, means)
        return thin(work, plan, input_shape=units.input_shape), plan
    assert units.example_batch is not None  # Units.of traced the model on it
    chosen_groups: list[UnitGroup] = [g for g in units.groups if g.name in plan]
    foldable = all(p.has_bias() or p.absorb is not None for g in chosen_groups for p in g.points)
    group_means = unit_groups.point_means(work, chosen_groups, [units.example_batch]) if foldable else None
    _mask_groups(chosen_groups, plan, group_means, {m: n for n, m in work.named_modules()})
    return thin(work, UnitPruning("dead", plan, foldable, {}, None, units)), plan


def thinned_parameters(model: nn.Module, pruning: UnitPruning) -> int:
    """Parameters the thinned model will have, counted without building it (chains)."""
    if pruning.units.chain is None:
        return sum(p.numel() for p in thin(model, pruning).parameters())
    return surgery.thinned_parameters(model, pruning.units.chain, pruning.plan)
