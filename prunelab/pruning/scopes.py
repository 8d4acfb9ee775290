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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab._validation import STR, Types, validate_params
from prunelab.registry import Registry

SCOPES: Registry[type["Scope"]] = Registry("scope")


@dataclass
class LayerGroups:
    """One layer's groups at a pruning event."""

    scores: torch.Tensor   # (G,) group scores, higher = more important
    alive: torch.Tensor    # (G,) bool, False for groups already pruned
    group_size: int        # weights per group
    rows: torch.Tensor | None = None   # each group's output row, for scope 'row': G entries in any
                                       # shape (a stride-0 view, not a copy; flattened when used)

    @property
    def n_groups(self) -> int:
        return self.scores.numel()


@dataclass
class Event:
    """Where a pruning event stands in its schedule."""

    index: int = 0          # 0-based event number
    final: bool = True      # last event of the schedule


def _order(layer: LayerGroups, min_keep: int) -> tuple[torch.Tensor, int, int]:
    """Scores ready for ranking, with the number of dead and protected groups.

    Dead groups score -inf (they rank first and count towards the target); the
    ``min_keep`` best alive groups score +inf and are never selected.
    """
    s = layer.scores.detach().double().flatten().cpu().clone()
    alive = layer.alive.flatten().cpu()
    s[~alive] = float("-inf")
    n_protected = min(min_keep, int(alive.sum()))
    if n_protected:
        s[torch.topk(s, n_protected).indices] = float("inf")
    return s, int((~alive).sum()), n_protected


def _prune_lowest(layer: LayerGroups, n_prune: int, min_keep: int) -> torch.Tensor:
    """Keep-mask pruning the ``n_prune`` lowest groups (dead ones first), never the protected."""
    s, n_dead, n_protected = _order(layer, min_keep)
    n_prune = max(n_dead, min(n_prune, layer.n_groups - n_protected))
    keep = torch.ones(layer.n_groups, dtype=torch.bool)
    keep[torch.argsort(s, stable=True)[:n_prune]] = False
    return keep.to(layer.alive.device)


def _per_layer(sparsity: "float | list[float]", layers: list) -> list[float]:
    return list(sparsity) if isinstance(sparsity, list) else [sparsity] * len(layers)


class Scope:
    name = ""
    needs_rows = False      # select() reads LayerGroups.rows

    def select(self, layers: list[LayerGroups], sparsity: "float | list[float]", event: Event,
               min_keep: int = 1) -> list[torch.Tensor]:
        """Return one bool keep-mask of shape (G,) per layer. ``sparsity`` is one target, or
        one per layer (scopes that share the target between layers refuse a list)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@SCOPES.register("local", "layerwise")
class Local(Scope):
    name = "local"

    def select(self, layers, sparsity, event, min_keep=1):
        targets = _per_layer(sparsity, layers)
        return [_prune_lowest(layer, round(s * layer.n_groups), min_keep) for layer, s in zip(layers, targets)]


@SCOPES.register("global")
class Global(Scope):
    """One ranking of all groups of all layers; the lowest go until ``S`` of all
    prunable weights are pruned (the prefix whose weight count is closest)."""

    name = "global"

    def select(self, layers, sparsity, event, min_keep=1):
        if isinstance(sparsity, list):
            raise ValueError("scope 'global' takes one sparsity for all layers, not per-layer targets.")
        ranked = [_order(layer, min_keep) for layer in layers]
        scores = torch.cat([s for s, _, _ in ranked])
        n_dead = sum(d for _, d, _ in ranked)
        n_selectable = len(scores) - sum(p for _, _, p in ranked)
        sizes = torch.cat([torch.full((layer.n_groups,), float(layer.group_size), dtype=torch.float64)
                           for layer in layers])
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


@SCOPES.register("layerwise-constant", "layerwise_constant")
class LayerwiseConstant(Scope):
    name = "layerwise-constant"

    def select(self, layers, sparsity, event, min_keep=1):
        chosen = range(len(layers)) if event.final else [event.index % len(layers)]
        targets = _per_layer(sparsity, layers)
        out = []
        for i, layer in enumerate(layers):
            if i in chosen:
                out.append(_prune_lowest(layer, round(targets[i] * layer.n_groups), min_keep))
            else:
                out.append(layer.alive.clone())
        return out


@SCOPES.register("row", "per-row", "per-output")
class Row(Scope):
    """Every output row to ``S``: the ranking is within each row (all rows of a layer hold the
    same number of groups, as every granularity with :meth:`group_rows` gives)."""

    name = "row"
    needs_rows = True

    def select(self, layers, sparsity, event, min_keep=1):
        return [_prune_lowest_per_row(layer, s, min_keep) for layer, s in zip(layers, _per_layer(sparsity, layers))]


def _prune_lowest_per_row(layer: LayerGroups, sparsity: float, min_keep: int) -> torch.Tensor:
    if layer.rows is None:
        raise ValueError("scope 'row' needs each group's output row (LayerGroups.rows); granularities "
                         "whose groups span rows (filter, channel) cannot be compared within a row.")
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
    kept = torch.arange(per_row)[None, :] >= n_prune[:, None]          # in lowest-first order
    keep = torch.ones(layer.n_groups, dtype=torch.bool)
    keep[order] = torch.empty_like(kept).scatter_(1, lowest_first, kept).flatten()
    return keep.to(layer.alive.device)


@validate_params({"spec": [Types(str, Scope)], "where": [STR]})
def make_scope(spec: "str | Scope", *, where: str = "Pruner") -> Scope:
    return SCOPES.build(spec, param="scope", where=where, instance_of=Scope)
