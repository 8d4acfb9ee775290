"""Unit groups: channels that are scored and removed together, in any model.

A :class:`UnitGroup` is a set of ``n_units`` units whose tensors are coupled: removing unit ``u``
removes, in every member tensor, the elements ``index[u]`` along one axis. Examples: the channels of
a residual stream (every conv that adds into it, their BatchNorms, every conv that reads it), a
depthwise conv's channels with the convs before and after it, the neurons of a transformer MLP
(``gate_proj`` and ``up_proj`` rows, ``down_proj`` columns), the heads of an attention layer (their
q/k/v rows and output-projection columns). The groups are found by :mod:`prunelab.units.graph`
(Torch-Pruning's dependency graph, for conv nets) and :mod:`prunelab.units.attention` (attention
heads and MLPs, recognised by their structure).

Each group is **scored as one**: its units are seen where they are consumed, as input features of
the group's *points* (the layers that read them), and a unit's per-example first-order loss change
is summed over all its features, positions and points before the absolute value and the mean over examples
are taken (``rs``, ``mrs`` and their ``abs_`` forms; ``norm`` sums ``‖w‖²/fan-in`` over the
producing rows; ``rand`` draws one number per unit). ``fraction=f`` then removes ``round(f·U)``
units of the group — for attention heads with grouped-query attention, the same number in each
key/value group.

Masked removal zeroes the group's ``zero`` tensors (producing rows and biases, BatchNorm scale and
shift, attention output columns), so every point reads 0 for a removed unit. Mean replacement folds
``W[:, f]·ā_f`` of every point into that layer's bias or, where it has none, into the running mean
of the BatchNorm right after it; anywhere else it is refused naming the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from prunelab._hooks import eval_mode
from prunelab.inputs import IGNORE_INDEX, Batch, Loss, loss_targets
from prunelab.pruning.targets import is_hf_conv1d as _is_conv1d


def is_hf_conv1d(module: nn.Module | None) -> bool:
    """A Hugging Face ``Conv1D``, also in the middle of surgery (its ``nf`` not yet fixed)."""
    return module is not None and _is_conv1d(module, check_sizes=False)


@dataclass
class Axis:
    """Elements ``index[u]`` of ``module.<name>`` along ``dim`` belong to unit ``u``."""

    module: nn.Module
    name: str
    dim: int
    index: torch.Tensor  # (n_units, k) long


@dataclass
class Point:
    """A layer that reads the group's units: feature ``index[u]`` of its first input's ``dim`` axis
    (examples along ``batch_dim``). ``absorb``: a module whose running mean can take the folded
    constant when the layer has no bias. ``weights``/``biases``: the parameter pairs a constant
    input folds through (a bidirectional RNN has two)."""

    module: nn.Module
    name: str
    dim: int
    index: torch.Tensor
    absorb: nn.Module | None = None
    batch_dim: int = 0
    weights: tuple = ("weight",)
    biases: tuple = ("bias",)

    def has_bias(self) -> bool:
        return all(getattr(self.module, b, None) is not None for b in self.biases)


@dataclass
class UnitGroup:
    """Coupled units, scored and removed together (see the module docstring)."""

    name: str
    kind: str  # "conv", "dense", "heads", "kv_heads"
    n_units: int
    zero: list[Axis]
    points: list[Point]
    rows: list[Axis]  # producing weights, for the ``norm`` scorer
    members: list[str] = field(default_factory=list)
    cuts: list[Axis] = field(default_factory=list)  # every tensor thinning cuts, once each
    blocks: torch.Tensor | None = None  # (n_units,) block id: remove evenly within blocks
    module: nn.Module | None = None  # the first producer (for callers that read .module)
    owner: nn.Module | None = None  # the attention module whose head counts change
    resize: Callable | None = None  # resize(owner, kept_units) after thinning

    @property
    def point(self) -> nn.Module:
        return self.points[0].module


# ------------------------------------------------------------------ statistics
def summed_loss(loss: Loss, output, batch: Batch) -> torch.Tensor:
    """The sum over examples of the per-example loss, so that ``g = ∂ℓ_n/∂a``: cross-entropy summed
    over examples (and tokens), or the user's loss times the batch size (a mean is assumed)."""
    if loss.user is None or loss.is_cross_entropy:
        logits, targets = loss_targets(loss.logits(output), batch, where=loss.where)
        return nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss(output, batch) * batch.size


def _per_example(a: torch.Tensor, dim: int, total: bool = False, batch_dim: int = 0) -> torch.Tensor:
    """(N, F): the mean (or with ``total`` the sum) over every axis but the batch axis and the
    feature axis ``dim`` (positions, tokens)."""
    features = a.shape[dim]
    a = a.movedim(dim, -1).movedim(batch_dim, 0)  # batch_dim ≥ 0, before the feature axis
    a = a.reshape(a.shape[0], -1, features)
    return a.sum(dim=1) if total else a.mean(dim=1)


@dataclass
class GroupStats:
    """Per example and unit: ``removal`` = Σ_f Σ_p(−a·g), ``replacement`` = Σ_f Σ_p((ā − a)·g),
    summed over the unit's features and positions at every point (the first-order loss change
    of the example); ``means``: ā per point (the mean over examples and positions)."""

    removal: torch.Tensor
    replacement: torch.Tensor
    means: list[torch.Tensor]

    @property
    def mean(self) -> torch.Tensor:
        return self.means[0]


def collect_groups(model: nn.Module, groups: list[UnitGroup], batches: list[Batch], loss: Loss) -> dict:
    """:class:`GroupStats` of every group, from one forward/backward pass per batch (eval mode,
    weights and ``.grad`` untouched)."""
    modules = {p.module for g in groups for p in g.points}
    captured: dict[nn.Module, torch.Tensor] = {}
    sums: dict[nn.Module, torch.Tensor | None] = {m: None for m in modules}
    G: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in modules}
    AG: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in modules}
    count = {m: 0 for m in modules}

    def hook(module, inputs):
        if module in captured:
            raise ValueError(
                f"unit scoring reads the input of {names[module]!r}, which runs more than once "
                f"per forward; a layer called several times is not supported."
            )
        # an alias of the input, read by this layer only: the gradient at it is the gradient
        # through this layer, not through every other use of the same tensor (a residual add)
        alias = inputs[0].view_as(inputs[0])
        if not alias.requires_grad and alias.is_floating_point():  # a frozen model: dℓ/da exists all the same
            alias = inputs[0].detach().requires_grad_(True)
        captured[module] = alias
        return (alias, *inputs[1:])

    names = {m: n for n, m in model.named_modules()}
    dims = {p.module: (p.dim, p.batch_dim) for g in groups for p in g.points}
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        with eval_mode(model):
            for batch in batches:
                captured.clear()
                with torch.enable_grad():
                    loss_value = summed_loss(loss, batch.call(model), batch)
                    order = list(captured)
                    grads = torch.autograd.grad(loss_value, [captured[m] for m in order], allow_unused=True)
                for m, g in zip(order, grads):
                    a = captured[m].detach()
                    g = torch.zeros_like(a) if g is None else g.detach()
                    dim, batch_dim = dims[m]
                    G[m].append(_per_example(g, dim, True, batch_dim).double().cpu())  # plans index CPU maps
                    AG[m].append(_per_example(a * g, dim, True, batch_dim).double().cpu())
                    s = _per_example(a, dim, False, batch_dim).double().sum(dim=0).cpu()
                    previous = sums[m]
                    sums[m] = s if previous is None else previous + s
                    count[m] += a.shape[batch_dim]
    finally:
        for h in handles:
            h.remove()
    if not batches:
        raise ValueError("unit scoring needs calibration data: got an empty set of batches.")
    missing = [names[m] for m in modules if not count[m]]
    if missing:
        raise ValueError(f"unit scoring: the calibration forward never reached {missing[0]!r}.")
    out = {}
    for group in groups:
        removal: torch.Tensor | int = 0
        replacement: torch.Tensor | int = 0
        means = []
        for p in group.points:
            total = sums[p.module]
            assert total is not None  # every point was reached (count > 0, checked above)
            mean = total / count[p.module]
            Gm, AGm = torch.cat(G[p.module]), torch.cat(AG[p.module])
            removal = removal - AGm[:, p.index].sum(dim=2)
            replacement = replacement + (mean * Gm - AGm)[:, p.index].sum(dim=2)
            means.append(mean)
        # a group has at least one point, so these are tensors
        out[group.name] = GroupStats(cast(torch.Tensor, removal), cast(torch.Tensor, replacement), means)
    return out


# ------------------------------------------------------------------ scores and selection
def group_scores(scorer: str, group: UnitGroup, stats: GroupStats | None, generator: torch.Generator):
    """Scores of a group's units (lowest removed first)."""
    if scorer == "rand":
        return torch.rand(group.n_units, generator=generator, dtype=torch.float64)
    if scorer == "norm":
        total = torch.zeros(group.n_units, dtype=torch.float64)
        for axis in group.rows:
            w = getattr(axis.module, axis.name).detach().double().movedim(axis.dim, 0)
            rows = w[axis.index.flatten()].reshape(group.n_units, -1)
            fan_in = w[0].numel()
            total += (rows.pow(2).sum(dim=1) / fan_in).cpu()
        return total
    assert stats is not None  # the other scorers are given the group's statistics
    value = {
        "rs": stats.removal.mean(dim=0),
        "abs_rs": stats.removal.abs().mean(dim=0),
        "mrs": stats.replacement.mean(dim=0),
        "abs_mrs": stats.replacement.abs().mean(dim=0),
    }
    return value[scorer]


def select_group(group: UnitGroup, scores: torch.Tensor, select, fraction, count) -> torch.Tensor:
    """Lowest-scored units of the group; evenly within ``group.blocks`` when it has blocks."""
    if group.blocks is None:
        return select(scores, fraction=fraction, count=count)
    picked = []
    for block in torch.unique(group.blocks):
        members = torch.nonzero(group.blocks == block).flatten()
        picked.append(members[select(scores[members], fraction=fraction, count=count)])
    return torch.sort(torch.cat(picked)).values


# ------------------------------------------------------------------ masking and folding
def _elements(axis, units: torch.Tensor) -> torch.Tensor:
    return axis.index[units].flatten()


@torch.no_grad()
def fold_means(group: UnitGroup, units: torch.Tensor, means: list[torch.Tensor], names: dict) -> None:
    """Mean replacement: every point's input features of ``units`` become their means (one per
    point), folded into its bias (or the running mean of the BatchNorm after it)."""
    for point, mean in zip(group.points, means):
        features = _elements(point, units)
        m = point.module
        for weight, bias in zip(point.weights, point.biases):
            if getattr(m, weight, None) is None:
                continue
            W = getattr(m, weight).detach().double()
            mean_f = mean[features].to(W.device)
            if is_hf_conv1d(m):
                contribution = W[features].T @ mean_f
            elif W.dim() > 2:
                contribution = W[:, features].flatten(2).sum(dim=2) @ mean_f
            else:
                contribution = W[:, features] @ mean_f
            if point.has_bias():
                getattr(m, bias).add_(contribution.to(getattr(m, bias).dtype))
            elif point.absorb is not None:
                point.absorb.running_mean -= contribution.to(point.absorb.running_mean.dtype)
            else:
                raise ValueError(
                    f"mean replacement folds the removed units' mean into the layer that reads them, "
                    f"{names[m]!r}, but it has no bias and no BatchNorm right after it to absorb the "
                    f"constant; prune without mean replacement (a method without 'bp_')."
                )


def check_foldable(groups: list[UnitGroup], names: dict) -> None:
    """Refuse mean replacement before any work where a point cannot absorb the constant."""
    for group in groups:
        for point in group.points:
            if not point.has_bias() and point.absorb is None:
                raise ValueError(
                    f"mean replacement of the units of {group.name!r} folds their mean into the "
                    f"layer that reads them, {names[point.module]!r}, but it has no bias and no "
                    f"BatchNorm right after it to absorb the constant; prune without mean "
                    f"replacement (a method without 'bp_')."
                )


@torch.no_grad()
def zero(group: UnitGroup, units: torch.Tensor) -> None:
    """Masked removal: the units' tensors become 0, so every point reads 0 for them."""
    for axis in group.zero:
        tensor = getattr(axis.module, axis.name)
        if tensor is None:
            continue
        idx = _elements(axis, units)
        tensor.index_fill_(axis.dim, idx.to(tensor.device), 0.0)


@torch.no_grad()
def cut(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Keep only the ``keep`` elements of ``module.<name>`` along ``dim`` (a parameter stays a
    parameter)."""
    tensor = getattr(module, name)
    if tensor is None:
        return
    new = tensor.detach().index_select(dim, keep.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
    else:
        setattr(module, name, new)


def kept(axis_index: torch.Tensor, units: torch.Tensor, size: int) -> torch.Tensor:
    """Indices along an axis of ``size`` that survive removing ``units``."""
    mask = torch.ones(size, dtype=torch.bool)
    mask[axis_index[units].flatten()] = False
    return torch.nonzero(mask).flatten()


def point_means(model: nn.Module, groups: list[UnitGroup], batches: list[Batch]) -> dict[str, list]:
    """ā of every point's input features over ``batches`` (forward only, eval mode)."""
    from prunelab.inputs import forward_batches

    modules = {p.module: (p.dim, p.batch_dim) for g in groups for p in g.points}
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def hook(module, inputs):
        a = _per_example(inputs[0].detach(), modules[module][0], False, modules[module][1]).double()
        sums[module] = sums.get(module, 0) + a.sum(dim=0)
        counts[module] = counts.get(module, 0) + a.shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        forward_batches(model, batches, where="unit pruning")
    finally:
        for h in handles:
            h.remove()
    return {g.name: [sums[p.module] / counts[p.module] for p in g.points] for g in groups}


@torch.no_grad()
def thin_groups(model: nn.Module, groups: list[UnitGroup], plan: dict[str, torch.Tensor]) -> None:
    """Cut the removed units out of every tensor of their groups, in place (``model`` and
    ``groups`` must refer to the same modules), and update the modules' sizes."""
    touched = set()
    for group in groups:
        units = plan.get(group.name)
        if units is None or not len(units):
            continue
        for axis in group.cuts:
            tensor = getattr(axis.module, axis.name)
            if tensor is None:
                continue
            cut(axis.module, axis.name, axis.dim, kept(axis.index, units, tensor.shape[axis.dim]))
            touched.add(axis.module)
        if group.resize is not None:
            group.resize(group.owner, kept(torch.arange(group.n_units).view(-1, 1), units, group.n_units))
    for module in touched:
        _fix_sizes(module)


def _fix_sizes(module: nn.Module) -> None:
    """Make a module's size attributes match its cut tensors."""
    if isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif is_hf_conv1d(module):
        nx, nf = cast(torch.Tensor, module.weight).shape
        # torch types Module.__setattr__ for tensors and modules only; plain attributes are allowed
        module.nx, module.nf = nx, nf  # type: ignore[assignment]
    elif isinstance(module, nn.modules.conv._ConvNd):
        out = module.weight.shape[0]
        if module.groups > 1 and module.groups == module.out_channels == module.in_channels:  # depthwise
            module.groups = module.in_channels = module.out_channels = out
        else:
            module.out_channels, module.in_channels = out, module.weight.shape[1] * module.groups
    elif isinstance(module, nn.RNNBase):
        module.input_size = cast(torch.Tensor, module.weight_ih_l0).shape[1]
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = (module.running_mean if module.running_mean is not None else module.weight).shape[0]
