"""What a criterion that prunes layers as a whole (a solver) is given, instead of the Pruner.

At a pruning event the Pruner hands such a criterion (``updates_weights``: ``lobs``,
``obs-exact``, ``obs-fast``, block-by-block ``wanda``) one :class:`SolveRequest`: the model and
its targets, what is still alive, each layer's sparsity, the event, and the scope that shares
the target between layers (:meth:`Scope.allocate`) — never the Pruner itself. A solver turns
each layer it prunes into a :class:`LayerProblem` (:meth:`SolveRequest.problem`) and answers
with a :class:`LayerSolution`; it never asks which scope, schedule or granularity is in use by
name. A criterion that scores layers one block at a time (Wanda's) selects and stores through
:meth:`SolveRequest.select` and :meth:`SolveRequest.store`, the Pruner's own per-layer steps.
When a Pruner is built, every criterion checks itself against the :class:`PruneSetting` (the model,
its targets, the granularity, scope and schedule in use) in :meth:`Criterion.validate`, again
without the Pruner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.pruning.granularity import Granularity
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.schedules import Schedule
from prunelab.pruning.scopes import Event, Scope
from prunelab.pruning.targets import Target


@dataclass(frozen=True)
class PruneSetting:
    """What a criterion checks itself against when a Pruner is built (:meth:`Criterion.validate`):
    the model and the targets to prune, whether the user named them (``layers=``: a solver then
    refuses a layer it cannot serve instead of leaving it dense), and the granularity, scope and
    schedule in use."""

    model: nn.Module
    targets: list[Target]
    granularity: Granularity
    scope: Scope
    schedule: Schedule
    layers_named: bool


@dataclass
class LayerProblem:
    """One layer to prune as a whole at one event."""

    target: Target
    alive: torch.Tensor  # bool, shaped like target.matrix(): False for weights already pruned
    sparsity: float  # the fraction of the layer's weights pruned after this event
    min_keep: int  # groups (weights, or inputs when structured) that always survive
    nm: tuple[int, int] | None = None  # an N:M pattern to choose (its sparsity, not ``sparsity``), or None
    structured: bool = False  # prune whole inputs (granularity 'channel'), not single weights


@dataclass
class LayerSolution:
    """A solver's answer to a :class:`LayerProblem` (the new weights are written in place)."""

    keep: torch.Tensor  # bool keep-mask in the weight's own shape
    report: object = None  # the solver's per-layer report (e.g. an L-OBS LayerReport)
    held: bool = False  # the no-empty-layer guard stopped the layer short of its target


@dataclass
class SolveRequest:
    """One pruning event, as a solver criterion sees it. ``sparsities`` holds one target per entry
    of ``targets``; ``scope`` decides which layers the event raises and, for a scope that shares
    the target between layers, each layer's sparsity (:meth:`Scope.allocate`)."""

    model: nn.Module
    targets: list[Target]
    sparsities: list[float]
    event: Event
    scope: Scope
    min_keep: int
    masks: MaskSet
    nm: tuple[int, int] | None = None  # the granularity's N:M pattern, if any
    structured: bool = False  # granularity 'channel': whole inputs
    select: Callable | None = None  # (target, score, sparsity, event, index, n_layers) -> (group keep, held)
    store: Callable | None = None  # (target, group keep) -> None: sets the layer's mask

    def keep(self, target: Target) -> torch.Tensor:
        """The target's current keep-mask, in the weight's shape (all True before any prune)."""
        mask = self.masks.get(target.weight)
        return torch.ones_like(target.weight, dtype=torch.bool) if mask is None else mask.bool()

    def alive(self, target: Target, W: torch.Tensor) -> torch.Tensor:
        """The target's current keep-mask shaped like ``W = target.matrix()``, ``(out, d)``."""
        mask = self.masks.get(target.weight)
        if mask is None:
            return torch.ones_like(W, dtype=torch.bool)
        mask = mask.bool()
        return mask.t() if target.layout == "transposed" else mask.reshape(W.shape[0], -1)

    def problem(self, target: Target, sparsity: float, W: torch.Tensor) -> LayerProblem:
        """The layer problem of ``target`` at ``sparsity``, its weights seen as ``W = target.matrix()``."""
        return LayerProblem(target, self.alive(target, W), sparsity, self.min_keep, self.nm, self.structured)
