"""Scopes: how a target sparsity is shared between layers (docs/methods.md §2).

Each scope turns per-layer group scores into per-layer group keep-masks.
Pruning is monotone: a group pruned earlier stays pruned and counts towards the
new target. Target counts are in *weights*, so a layer pruned by filters reaches
the sparsity nearest the target that whole filters allow.

**No layer is ever emptied** (all scopes): at least ``min_keep`` groups (default
1) survive in every layer — its highest-scored ones. When that guard binds, the
realised sparsity is the closest to the target the guard allows.

| name                  | rule |
|-----------------------|------|
| ``local``             | every layer to the same sparsity ``S`` |
| ``global``            | one threshold over all layers' scores; each layer ends at its own sparsity, the total at ``S`` |
| ``layerwise-constant``| every layer ends at the same ``S``, but each pruning event raises only one layer, in model order, round-robin (Zhu & Gupta 2017's "one layer at a time"); the last event of the schedule raises every layer to its sparsity |
| ``row``               | every *output row* of every layer to the same sparsity ``S``: groups are ranked within their row (Wanda's per-output comparison, Sun et al. 2023); for granularities whose groups lie in one row (weight, kernel, N:M) |

Under ``row`` each row prunes ``round(S · k)`` of its ``k`` groups (dead ones first); the
no-empty-layer guard still protects the layer's ``min_keep`` best groups, wherever they are.

``local``, ``row`` and ``layerwise-constant`` decide each layer alone (``Scope.independent``):
:meth:`Scope.select_layer` takes one layer, so the Pruner scores and selects one layer at a time
and never holds more than one layer's scores. ``global`` needs every layer's group scores; it
finds its cut by bisection on the scores' values (counting, never sorting or concatenating them),
so it holds nothing per group beyond the scores and alive flags it is given.

**Solvers** (criteria that prune each layer as a whole: ``lobs``, ``obs-exact``, ``obs-fast``)
ask the scope for an :class:`Allocation` instead (:meth:`Scope.allocate`): each layer's sparsity
at this event, the layers the event raises and those the no-empty-layer guard held. ``local`` gives
every layer the target, ``layerwise-constant`` raises one layer per event (:meth:`Scope.raises`),
``global`` ranks the solver's per-weight saliencies (given as :class:`LayerGroups`) at one
threshold; ``row`` cannot serve a whole-layer solver (``supports_solvers`` is False). The guard's
bookkeeping (which layers it held) is the scope's too: :meth:`Scope.held`, :meth:`Scope.held_layer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prunelab._validation import STR, Types, validate_params
from prunelab.registry import Registry

SCOPES: Registry[type[Scope]] = Registry("scope")


@dataclass
class LayerGroups:
    """One layer's groups at a pruning event."""

    scores: torch.Tensor  # (G,) group scores, higher = more important
    alive: torch.Tensor  # (G,) bool, False for groups already pruned
    group_size: int  # weights per group
    rows: torch.Tensor | None = None  # each group's output row, for scope 'row': G entries in any
    # shape (a stride-0 view, not a copy; flattened when used)

    @property
    def n_groups(self) -> int:
        return self.scores.numel()


@dataclass
class Event:
    """Where a pruning event stands in its schedule."""

    index: int = 0  # 0-based event number
    final: bool = True  # last event of the schedule


def _order(layer: LayerGroups, min_keep: int) -> tuple[torch.Tensor, int, int]:
    """Scores ready for ranking, with the number of dead and protected groups.

    Dead groups score -inf (they rank first and count towards the target); the
    ``min_keep`` best alive groups score +inf and are never selected.
    """
    s, alive = _with_dead(layer)
    protected = _protected(s, alive, min_keep)
    if protected is not None:
        s[protected] = float("inf")
    return s, int((~alive).sum()), 0 if protected is None else len(protected)


def _with_dead(layer: LayerGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores as a float64 copy on the CPU with dead groups at -inf, and the alive flags."""
    s = layer.scores.detach().flatten().to(device="cpu", dtype=torch.float64, copy=True)
    alive = layer.alive.flatten().cpu()
    s[~alive] = float("-inf")
    return s, alive


def _protected(s: torch.Tensor, alive: torch.Tensor, min_keep: int) -> torch.Tensor | None:
    """The ``min_keep`` best alive groups (indices), None for none."""
    n_protected = min(min_keep, int(alive.sum()))
    return torch.topk(s, n_protected).indices if n_protected else None


def _prune_lowest(layer: LayerGroups, n_prune: int, min_keep: int) -> torch.Tensor:
    """Keep-mask pruning the ``n_prune`` lowest groups (dead ones first), never the protected."""
    s, n_dead, n_protected = _order(layer, min_keep)
    n_prune = max(n_dead, min(n_prune, layer.n_groups - n_protected))
    keep = torch.ones(layer.n_groups, dtype=torch.bool)
    keep[torch.argsort(s, stable=True)[:n_prune]] = False
    return keep.to(layer.alive.device)


@dataclass
class Allocation:
    """How a scope shares one event's target between layers, for a criterion that solves each
    layer as a whole (:meth:`Scope.allocate`)."""

    sparsities: list[float]  # each layer's sparsity to reach at this event
    raised: list[bool]  # the layers this event prunes; the others stay as they are
    held: tuple[int, ...] = ()  # layers (indices) the no-empty-layer guard held above the target


def _per_layer(sparsity: float | list[float], layers: Sequence) -> list[float]:
    return list(sparsity) if isinstance(sparsity, list) else [sparsity] * len(layers)


class Scope:
    name = ""
    needs_rows = False  # select() reads LayerGroups.rows
    independent = False  # decides each layer alone: select_layer() works; allocate() needs no scores
    supports_solvers = True  # allocate() can share a target between whole-layer solves

    def raises(self, event: Event, index: int, n_layers: int) -> bool:
        """Whether this event prunes layer ``index`` of ``n_layers`` (all but ``layerwise-constant``: every layer)."""
        return True

    def allocate(
        self, layers: list[LayerGroups] | int, sparsity: float | list[float], event: Event, min_keep: int = 1
    ) -> Allocation:
        """Each layer's sparsity at this event, the layers it raises and those the guard held, for a
        criterion that solves each layer whole. ``layers``: the layers' per-weight saliencies (scopes
        that share the target between layers rank them), or for scopes that decide each layer alone
        (``independent``) just their number. A scope that decides each layer alone leaves the guard
        to the layer's solve (``held`` empty)."""
        if not self.independent:
            raise NotImplementedError
        n = layers if isinstance(layers, int) else len(layers)
        return Allocation(_per_layer(sparsity, range(n)), [self.raises(event, i, n) for i in range(n)])

    def held(
        self,
        layers: list[LayerGroups],
        sparsity: float | list[float],
        event: Event,
        keeps: list[torch.Tensor],
        min_keep: int = 1,
    ) -> tuple[int, ...]:
        """The layers (indices) that the ``min_keep`` guard kept from going as low as the scope
        asked in the selection ``keeps``, when that leaves fewer weights pruned in all than without
        the guard (``global`` may instead take the difference from other layers: no shortfall
        then). Only layers left at their floor can be held, so the unguarded selection is made
        only when there is one."""
        floors = [min(min_keep, int(layer.alive.sum())) for layer in layers]
        at_floor = [i for i, (keep, floor) in enumerate(zip(keeps, floors)) if int(keep.sum()) <= floor]
        if not at_floor:
            return ()
        unguarded = self.select(layers, sparsity, event, 0)

        def pruned(selection):
            return sum((layer.n_groups - int(keep.sum())) * layer.group_size for layer, keep in zip(layers, selection))

        if pruned(keeps) >= pruned(unguarded):
            return ()
        return tuple(i for i in at_floor if int(unguarded[i].sum()) < int(keeps[i].sum()))

    def held_layer(
        self,
        layer: LayerGroups,
        keep: torch.Tensor,
        sparsity: float,
        event: Event,
        min_keep: int,
        index: int,
        n_layers: int,
    ) -> bool:
        """Whether the guard held layer ``index`` in ``keep`` (its :meth:`select_layer`): it is at its
        floor and would lose more without the guard (:meth:`held` for one layer of a scope with
        ``independent`` set)."""
        if int(keep.sum()) > min(min_keep, int(layer.alive.sum())):
            return False
        unguarded = self.select_layer(layer, sparsity, event, 0, index, n_layers)
        return int(unguarded.sum()) < int(keep.sum())

    def select(
        self, layers: list[LayerGroups], sparsity: float | list[float], event: Event, min_keep: int = 1
    ) -> list[torch.Tensor]:
        """Return one bool keep-mask of shape (G,) per layer. ``sparsity`` is one target, or
        one per layer (scopes that share the target between layers refuse a list)."""
        if not self.independent:
            raise NotImplementedError
        targets = _per_layer(sparsity, layers)
        return [
            self.select_layer(layer, s, event, min_keep, i, len(layers))
            for i, (layer, s) in enumerate(zip(layers, targets))
        ]

    def select_layer(
        self, layer: LayerGroups, sparsity: float, event: Event, min_keep: int, index: int, n_layers: int
    ) -> torch.Tensor:
        """The keep-mask of layer ``index`` of ``n_layers``, decided from that layer alone (scopes
        with ``independent`` set); equal to ``select(...)[index]``."""
        raise NotImplementedError(f"scope {self.name!r} shares the target between layers; use select()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@SCOPES.register("local", "layerwise")
class Local(Scope):
    name = "local"
    independent = True

    def select_layer(self, layer, sparsity, event, min_keep, index, n_layers):
        return _prune_lowest(layer, round(sparsity * layer.n_groups), min_keep)


@SCOPES.register("global")
class Global(Scope):
    """One ranking of all groups of all layers; the lowest go until ``S`` of all
    prunable weights are pruned (the prefix whose weight count is closest). Ties rank in
    layer order, then group order."""

    name = "global"

    def select(self, layers, sparsity, event, min_keep=1):
        if isinstance(sparsity, list):
            raise ValueError("scope 'global' takes one sparsity for all layers, not per-layer targets.")
        if not layers:
            return []
        sizes = {layer.group_size for layer in layers}
        if len(sizes) == 1 and all(layer.scores.dtype in _KEYS for layer in layers):
            return _global_by_threshold(layers, sparsity, min_keep, sizes.pop())
        return _global_by_sorting(layers, sparsity, min_keep)

    def allocate(self, layers, sparsity, event, min_keep=1):
        """One threshold over every layer's saliencies (one score per weight): each layer's
        sparsity is the fraction of its weights below it; the guard's held layers with it."""
        if isinstance(layers, int):
            raise ValueError(
                "scope 'global' ranks every layer's saliencies at one threshold: allocate() "
                "takes the layers' LayerGroups, not their number."
            )
        keeps = self.select(layers, sparsity, event, min_keep)
        held = self.held(layers, sparsity, event, keeps, min_keep)
        return Allocation([1.0 - int(k.sum()) / k.numel() for k in keeps], [True] * len(layers), held)


def _global_by_sorting(layers, sparsity, min_keep):
    """Groups of different sizes (filters of layers with different input sizes): the prefix of
    the sorted groups whose weight count is closest to the target. Structured groups are few."""
    ranked = [_order(layer, min_keep) for layer in layers]
    scores = torch.cat([s for s, _, _ in ranked])
    n_dead = sum(d for _, d, _ in ranked)
    n_selectable = len(scores) - sum(p for _, _, p in ranked)
    sizes = torch.cat([torch.full((layer.n_groups,), float(layer.group_size), dtype=torch.float64) for layer in layers])
    owner = torch.cat([torch.full((layer.n_groups,), i) for i, layer in enumerate(layers)])
    order = torch.argsort(scores, stable=True)
    # pruned[m] = weights removed when the m lowest groups go; pick m nearest the target
    pruned_weights = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(sizes[order], 0)])
    n_target = round(sparsity * float(sizes.sum()))
    m = int(torch.argmin((pruned_weights - n_target).abs()))
    m = max(n_dead, min(m, n_selectable))
    keep = torch.ones(len(scores), dtype=torch.bool)
    keep[order[:m]] = False
    return [keep[owner == i].to(layer.alive.device) for i, layer in enumerate(layers)]


# float dtype -> the signed integer dtype of the same width: the ordered keys of the bisection
_KEYS = {torch.float32: torch.int32, torch.float64: torch.int64}


class _Ranked:
    """One layer's groups as the ranking sees them (:func:`_order`: dead ones at -inf, the
    ``min_keep`` best alive ones at +inf, the others at their score), counted against a threshold
    without holding that ranked copy; :meth:`ranked` builds it for one layer at a time."""

    def __init__(self, layer: LayerGroups, min_keep: int):
        self.scores, self.alive = layer.scores.detach().flatten(), layer.alive.flatten()
        self.n_dead = int((~self.alive).sum())
        s, alive = _with_dead(layer)
        self.protected = _protected(s, alive, min_keep)  # the very groups _order protects
        self.n_protected = 0 if self.protected is None else len(self.protected)
        if self.protected is not None:
            self.protected = self.protected.to(self.scores.device)

    def count(self, t: float, strict: bool) -> int:
        """How many ranked values are ``< t`` (strict) or ``<= t``."""
        compare = torch.lt if strict else torch.le
        n = int((compare(self.scores, t) & self.alive).sum())
        if self.protected is not None:  # alive, but ranked at +inf
            n -= int(compare(self.scores[self.protected], t).sum())
            if not strict and t == float("inf"):
                n += self.n_protected
        if not strict or t > float("-inf"):
            n += self.n_dead
        return n

    def ranked(self) -> torch.Tensor:
        r = self.scores.clone()
        r[~self.alive] = float("-inf")
        if self.protected is not None:
            r[self.protected] = float("inf")
        return r


def _key(value: float, dtype: torch.dtype) -> int:
    """An integer that orders like the float ``value`` of ``dtype`` (-0.0 just below +0.0)."""
    bits = int(torch.tensor([value], dtype=dtype).view(_KEYS[dtype]))
    return bits if bits >= 0 else -(bits & torch.iinfo(_KEYS[dtype]).max) - 1


def _value(key: int, dtype: torch.dtype) -> float:
    """The inverse of :func:`_key`."""
    bits = key if key >= 0 else (-(key + 1)) | torch.iinfo(_KEYS[dtype]).min
    return float(torch.tensor([bits], dtype=_KEYS[dtype]).view(dtype))


def _global_by_threshold(layers, sparsity, min_keep, group_size):
    """Groups of one size (single weights, N:M): the ``m`` lowest of the ranking are pruned,
    ``m`` being the count nearest the target, found from a threshold ``v`` (the m-th lowest
    ranked value, by bisection on the values' ordered bit patterns: one counting pass per bit)
    and the first ties at ``v`` in layer and group order — what a stable sort would give."""
    ranked = [_Ranked(layer, min_keep) for layer in layers]
    n_groups = sum(layer.n_groups for layer in layers)
    n_target = round(sparsity * float(n_groups * group_size))
    m = min(n_target // group_size, n_groups)  # the count whose weights are nearest n_target, the lower on ties
    if m < n_groups and abs((m + 1) * group_size - n_target) < abs(m * group_size - n_target):
        m += 1
    n_dead = sum(r.n_dead for r in ranked)
    m = max(n_dead, min(m, n_groups - sum(r.n_protected for r in ranked)))
    if m == 0:
        return [torch.ones_like(layer.alive.flatten()) for layer in layers]
    dtype = torch.float64 if any(layer.scores.dtype == torch.float64 for layer in layers) else torch.float32
    low, high = _key(float("-inf"), dtype), _key(float("inf"), dtype)
    while low < high:  # the lowest value with at least m ranked values <= it
        middle = (low + high) // 2
        if sum(r.count(_value(middle, dtype), strict=False) for r in ranked) >= m:
            high = middle
        else:
            low = middle + 1
    v = _value(low, dtype)
    ties_left = m - sum(r.count(v, strict=True) for r in ranked)
    keeps = []
    for r in ranked:
        values = r.ranked()
        pruned = values < v
        ties = values == v
        del values
        n_ties = int(ties.sum())
        if ties_left >= n_ties:
            pruned |= ties
        elif ties_left > 0:
            pruned[torch.nonzero(ties).flatten()[:ties_left]] = True
        ties_left = max(0, ties_left - n_ties)
        keeps.append(~pruned)
    return keeps


@SCOPES.register("layerwise-constant", "layerwise_constant")
class LayerwiseConstant(Scope):
    name = "layerwise-constant"
    independent = True

    def raises(self, event, index, n_layers):
        """One layer per event, in model order, round-robin; every layer at the schedule's last."""
        return event.final or index == event.index % n_layers

    def select_layer(self, layer, sparsity, event, min_keep, index, n_layers):
        if self.raises(event, index, n_layers):
            return _prune_lowest(layer, round(sparsity * layer.n_groups), min_keep)
        return layer.alive.clone()


@SCOPES.register("row", "per-row", "per-output")
class Row(Scope):
    """Every output row to ``S``: the ranking is within each row (all rows of a layer hold the
    same number of groups, as every granularity with :meth:`group_rows` gives)."""

    name = "row"
    needs_rows = True
    independent = True
    supports_solvers = False  # a solver prunes a layer as a whole, not row by row

    def select_layer(self, layer, sparsity, event, min_keep, index, n_layers):
        return _prune_lowest_per_row(layer, sparsity, min_keep)


def _prune_lowest_per_row(layer: LayerGroups, sparsity: float, min_keep: int) -> torch.Tensor:
    if layer.rows is None:
        raise ValueError(
            "scope 'row' needs each group's output row (LayerGroups.rows); granularities "
            "whose groups span rows (filter, channel) cannot be compared within a row."
        )
    s, _, _ = _order(layer, min_keep)
    order = torch.argsort(layer.rows.flatten().cpu(), stable=True)
    n_rows = int(layer.rows.max()) + 1 if layer.n_groups else 0
    if n_rows == 0:
        return layer.alive.clone()
    per_row = layer.n_groups // n_rows
    ranked = s[order].reshape(n_rows, per_row)
    n_dead = (ranked == float("-inf")).sum(dim=1)
    n_protected = (ranked == float("inf")).sum(dim=1)
    n_prune = torch.clamp(torch.clamp(n_dead, min=round(sparsity * per_row)), max=per_row - n_protected)
    n_prune = torch.maximum(n_prune, n_dead)
    lowest_first = torch.argsort(ranked, dim=1, stable=True)
    kept = torch.arange(per_row)[None, :] >= n_prune[:, None]  # in lowest-first order
    keep = torch.ones(layer.n_groups, dtype=torch.bool)
    keep[order] = torch.empty_like(kept).scatter_(1, lowest_first, kept).flatten()
    return keep.to(layer.alive.device)


@validate_params({"spec": [Types(str, Scope)], "where": [STR]})
def make_scope(spec: str | Scope, *, where: str = "Pruner") -> Scope:
    return SCOPES.build(spec, param="scope", where=where, instance_of=Scope)
