"""Removing units from a chain model: masked, with mean replacement, then physically.

**Masked removal** (:func:`mask_units`, in place): the unit's incoming weights and bias,
and its BatchNorm scale and shift, become 0, so its activation is exactly 0 — the
activation functions allowed have f(0) = 0.

**Mean replacement** (Evci et al.; docs/methods.md §5): the unit's output is replaced by its
mean activation ā instead of 0, and the constant is folded into the next parametrised
layer's bias, ``b_next ← b_next + W_next[:, u] · ā_u``. On its way to that layer the
constant passes through max/avg-pooling (unchanged), BatchNorm in eval mode (its
affine map), activations (applied), dropout (identity) and flatten (repeated at every
position of the channel). For a Conv2d consumer the kernel is summed over its taps — exact
where the kernel sees no zero padding; at padded borders the folded bias stands for the
constant there too.

**Thinning** (:func:`thin_chain`, a new model): the pruned units' rows/filters, their
BatchNorm entries and the matching inputs of the consumer are removed, so the model is
genuinely smaller; its outputs equal the masked model's (with or without mean
replacement, which lives in the consumer's bias).
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn

from prunelab.units.structure import NORMS, POOLS, Chain, Leaf, UnitLayer


def _channel_count(shape: tuple) -> int:
    return shape[0] if shape else 0


def _consumer(unit: UnitLayer) -> Leaf:
    """The layer that reads ``unit``'s units (:func:`~prunelab.units.structure.analyze` gives every
    unit layer one)."""
    assert unit.consumer is not None
    return unit.consumer


def _parametrised(leaf: Leaf) -> nn.Linear | nn.Conv2d:
    """A consumer's module: a Linear or Conv2d (that is what ends a unit layer's between-ops)."""
    return cast("nn.Linear | nn.Conv2d", leaf.module)


@torch.no_grad()
def _propagate(constant: torch.Tensor, units: torch.Tensor, between: list[Leaf]):
    """Carry the pruned channels' constant through the between-ops; return the constants
    at the consumer's input (per pruned channel) and the positions per channel there."""
    c = constant.clone()
    positions = 1
    for leaf in between:
        module = leaf.module
        if isinstance(module, NORMS):
            assert module.running_mean is not None and module.running_var is not None  # eval-mode statistics
            mean, var = module.running_mean[units].double(), module.running_var[units].double()
            c = (c - mean) / torch.sqrt(var + module.eps)
            if module.affine:
                c = c * module.weight[units].double() + module.bias[units].double()
        elif isinstance(module, nn.Flatten):
            positions = int(torch.tensor(leaf.in_shape[1:]).prod()) if len(leaf.in_shape) > 1 else 1
        elif isinstance(module, POOLS) or isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)):
            pass
        else:  # an element-wise activation
            c = module(c)
    return c, positions


@torch.no_grad()
def fold_mean(unit: UnitLayer, units: torch.Tensor, mean: torch.Tensor) -> None:
    """Add the pruned units' mean replacement to the consumer's bias (in place)."""
    consumer = _parametrised(_consumer(unit))
    if consumer.bias is None:
        raise ValueError(
            f"mean replacement folds into the bias of {_consumer(unit).name!r}, which has none; "
            f"prune without mean replacement, or give that layer a bias."
        )
    c, positions = _propagate(mean[units].double(), units, unit.between)
    W = consumer.weight.double()
    if isinstance(consumer, nn.Conv2d):
        contribution = W[:, units].sum(dim=(2, 3)) @ c
    elif positions > 1:  # Linear after flatten: channel k = columns k·P … (k+1)·P−1
        blocks = W.reshape(W.shape[0], -1, positions)[:, units, :].sum(dim=2)
        contribution = blocks @ c
    else:
        contribution = W[:, units] @ c
    consumer.bias += contribution.to(consumer.bias.dtype)


@torch.no_grad()
def zero_units(unit: UnitLayer, units: torch.Tensor) -> None:
    """Make the units' activations exactly 0 (and keep them 0 up to the consumer)."""
    module = unit.module
    module.weight[units] = 0.0
    if module.bias is not None:
        module.bias[units] = 0.0
    for leaf in [*unit.channel_ops, *unit.between]:
        norm = leaf.module
        if isinstance(norm, NORMS) and _channel_count(leaf.out_shape) == unit.n_units:
            if norm.affine:
                norm.weight[units] = 0.0
                norm.bias[units] = 0.0
            else:  # (0 − μ)/σ must be 0
                assert norm.running_mean is not None  # without affine parameters, the statistics are zeroed
                norm.running_mean[units] = 0.0


@torch.no_grad()
def mask_units(chain: Chain, plan: dict[str, torch.Tensor], means: dict[str, torch.Tensor] | None = None) -> None:
    """Masked removal of ``plan`` (unit layer name → unit indices), in place; with ``means``
    (unit layer name → ā per unit) the removed units are replaced by their means. All folds
    use the weights before any zeroing, then every pruned unit is zeroed."""
    units = {u.name: u for u in chain.units}
    if means is not None:
        for name, idx in plan.items():
            if len(idx):
                fold_mean(units[name], idx, means[name])
    for name, idx in plan.items():
        if len(idx):
            zero_units(units[name], idx)


def _new_linear(old: nn.Linear, rows, cols) -> nn.Linear:
    rows = rows if rows is not None else torch.arange(old.out_features)
    cols = cols if cols is not None else torch.arange(old.in_features)
    new = nn.Linear(len(cols), len(rows), bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    new.weight.copy_(old.weight[rows][:, cols])
    if old.bias is not None:
        new.bias.copy_(old.bias[rows])
    return new


def _new_conv(old: nn.Conv2d, rows, cols) -> nn.Conv2d:
    rows = rows if rows is not None else torch.arange(old.out_channels)
    cols = cols if cols is not None else torch.arange(old.in_channels)
    new = nn.Conv2d(  # a Conv2d's sizes are pairs (torch types them as tuples of any length)
        len(cols),
        len(rows),
        cast("tuple[int, int]", old.kernel_size),
        stride=cast("tuple[int, int]", old.stride),
        padding=cast("str | tuple[int, int]", old.padding),
        dilation=cast("tuple[int, int]", old.dilation),
        groups=1,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    new.weight.copy_(old.weight[rows][:, cols])
    if old.bias is not None:
        assert new.bias is not None  # made with bias=True
        new.bias.copy_(old.bias[rows])
    return new


def _new_norm(old, keep):
    new = type(old)(
        len(keep),
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        device=old.running_mean.device,
    )
    if old.affine:
        new.weight.copy_(old.weight[keep])
        new.bias.copy_(old.bias[keep])
    new.running_mean.copy_(old.running_mean[keep])
    new.running_var.copy_(old.running_var[keep])
    new.num_batches_tracked.copy_(old.num_batches_tracked)
    return new


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the submodule ``name``, in that submodule's train/eval mode
    (a new BatchNorm is in training mode and would use batch statistics)."""
    module.train(model.get_submodule(name).training)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def thin_chain(model: nn.Module, chain: Chain, plan: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with the units of ``plan`` physically removed."""
    thinned = copy.deepcopy(model)
    keep_of = {}
    for unit in chain.units:
        idx = plan.get(unit.name)
        if idx is not None and len(idx):
            mask = torch.ones(unit.n_units, dtype=torch.bool)
            mask[idx] = False
            keep_of[unit.name] = torch.nonzero(mask).flatten()
    keep: torch.Tensor | None = None  # kept channels (or features) of the tensor flowing now
    for leaf in chain.leaves:
        module = leaf.module
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            rows = keep_of.get(leaf.name)
            new = _new_linear(module, rows, keep) if isinstance(module, nn.Linear) else _new_conv(module, rows, keep)
            _set(thinned, leaf.name, new)
            keep = rows
        elif isinstance(module, NORMS) and keep is not None:
            _set(thinned, leaf.name, _new_norm(module, keep))
        elif isinstance(module, nn.Flatten) and keep is not None:
            positions = int(torch.tensor(leaf.in_shape[1:]).prod()) if len(leaf.in_shape) > 1 else 1
            keep = (keep[:, None] * positions + torch.arange(positions)[None, :]).flatten()
    return thinned


def thinned_parameters(model: nn.Module, chain: Chain, plan: dict[str, torch.Tensor]) -> int:
    """Parameters the thinned model will have, counted without building it."""
    removed = 0
    for unit in chain.units:
        idx = plan.get(unit.name)
        k = 0 if idx is None else len(idx)
        if not k:
            continue
        module = unit.module
        per_row = module.weight[0].numel() + (1 if module.bias is not None else 0)
        removed += k * per_row
        for leaf in [*unit.channel_ops, *unit.between]:
            if isinstance(leaf.module, NORMS) and leaf.module.affine:
                removed += 2 * k
        consumer = _parametrised(_consumer(unit))
        flatten = next((m for m in unit.between if isinstance(m.module, nn.Flatten)), None)
        positions = int(torch.tensor(flatten.in_shape[1:]).prod()) if flatten and len(flatten.in_shape) > 1 else 1
        per_input = consumer.weight.shape[0] * (consumer.weight[0, 0].numel() if consumer.weight.dim() > 2 else 1)
        removed += k * positions * per_input
    # rows of a consumer that is itself thinned were counted with their full width: give back the overlap
    for unit in chain.units:
        idx_self, prev = plan.get(unit.name), None
        for other in chain.units:
            if _consumer(other).name == unit.name:
                prev = other
        if prev is None or idx_self is None or not len(idx_self) or plan.get(prev.name) is None:
            continue
        k_self, k_prev = len(idx_self), len(plan[prev.name])
        flatten = next((m for m in prev.between if isinstance(m.module, nn.Flatten)), None)
        positions = int(torch.tensor(flatten.in_shape[1:]).prod()) if flatten and len(flatten.in_shape) > 1 else 1
        taps = unit.module.weight[0, 0].numel() if unit.module.weight.dim() > 2 else 1
        removed -= k_self * k_prev * positions * taps
    return sum(p.numel() for p in model.parameters()) - removed
