"""Unit scores (Evci et al., ICLR 2019 submission; docs/methods.md §5). Lowest is removed first.

With ``a`` a unit's activation (the output of its last per-channel op) and
``g = ∂ℓ_n/∂a`` (the per-example loss), collected by hooks on a calibration subset,
``mean_p`` the mean over spatial positions (1 for a neuron) and ``E_n`` the mean over
examples:

| tag       | score                                   |
|-----------|-----------------------------------------|
| `rand`    | uniform random (seeded)                  |
| `norm`    | ``‖w_in‖² / fan-in`` of the unit's incoming weights |
| `rs`      | ``E_n[ mean_p(−a·g) ]``  — first-order loss change of removing it |
| `abs_rs`  | ``E_n[ |mean_p(−a·g)| ]`` |
| `mrs`     | ``E_n[ mean_p((ā − a)·g) ]`` — of replacing it by its mean ā |
| `abs_mrs` | ``E_n[ |mean_p((ā − a)·g)| ]`` |

One pass collects, per unit, the mean ā = E_n mean_p a and, per example,
``G_n = mean_p g`` and ``AG_n = mean_p(a·g)``; then ``mean_p((ā − a)·g) = ā·G_n − AG_n``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from prunelab._hooks import eval_mode
from prunelab.registry import Registry
from prunelab.units.structure import UnitLayer

UNIT_SCORERS: Registry = Registry("unit scorer")
SCORERS = ("rand", "norm", "rs", "abs_rs", "mrs", "abs_mrs")


@dataclass
class UnitStats:
    """Calibration statistics of one unit layer."""

    mean: torch.Tensor  # (C,) ā
    G: torch.Tensor  # (N, C) per-example mean_p g
    AG: torch.Tensor  # (N, C) per-example mean_p (a·g)

    @property
    def n(self) -> int:
        return self.G.shape[0]


def collect(model: nn.Module, units: list[UnitLayer], batches: Iterable, loss=None) -> dict[str, UnitStats]:
    """Activations and their gradients at each unit layer's activation point, over ``batches``
    (:class:`~prunelab.inputs.Batch` es or anything ``as_batch`` reads, e.g. ``(x, y)`` pairs;
    model in eval mode; weights and ``.grad`` untouched). ``loss``: a ``prunelab.inputs.Loss``, a
    ``loss_fn(output, targets)`` or None for the shape-inferred cross-entropy; ``g`` is the
    gradient of the sum of the per-example losses."""
    from prunelab.inputs import as_batch, make_loss
    from prunelab.units.groups import summed_loss

    loss = make_loss(loss, where="unit scoring")
    sums: dict[str, torch.Tensor | None] = {u.name: None for u in units}
    G: dict[str, list] = {u.name: [] for u in units}
    AG: dict[str, list] = {u.name: [] for u in units}
    count = {u.name: 0 for u in units}
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name):
        def hook(module, inputs, output):
            captured[name] = output
            if output.requires_grad:
                output.retain_grad()
            else:  # a frozen model: dℓ/da exists all the same
                output.requires_grad_(True)

        return hook

    for unit in units:
        handles.append(unit.point.register_forward_hook(hook_for(unit.name)))
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    n_batches = 0
    try:
        with eval_mode(model):  # every module's own train/eval flag comes back
            for i, raw in enumerate(batches):
                batch = as_batch(raw, where="unit scoring", index=i)
                n_batches += 1
                captured.clear()
                with torch.enable_grad():
                    total = summed_loss(loss, batch.call(model), batch)  # per-example loss: g = ∂ℓ_n/∂a
                    tensors = [captured[u.name] for u in units]
                    grads = torch.autograd.grad(total, tensors)
                for unit, a, g in zip(units, tensors, grads):
                    a, g = a.detach(), g.detach()
                    dims = tuple(range(2, a.dim()))
                    a_p = a.mean(dim=dims) if dims else a  # (N, C) mean over positions
                    G[unit.name].append((g.mean(dim=dims) if dims else g).double())
                    AG[unit.name].append(((a * g).mean(dim=dims) if dims else a * g).double())
                    s = a_p.double().sum(dim=0)
                    previous = sums[unit.name]
                    sums[unit.name] = s if previous is None else previous + s
                    count[unit.name] += a.shape[0]
    finally:
        for h in handles:
            h.remove()
        for p, saved_grad in zip(params, saved):
            p.grad = saved_grad
    if n_batches == 0:
        raise ValueError("unit scoring needs calibration data: got an empty set of batches.")
    # every batch set every sum (there was at least one)
    return {
        u.name: UnitStats(cast(torch.Tensor, sums[u.name]) / count[u.name], torch.cat(G[u.name]), torch.cat(AG[u.name]))
        for u in units
    }


@UNIT_SCORERS.register("rand")
def rand(unit: UnitLayer, stats: UnitStats | None, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(unit.n_units, generator=generator, dtype=torch.float64)


@UNIT_SCORERS.register("norm")
def norm(unit: UnitLayer, stats, generator) -> torch.Tensor:
    w = unit.module.weight.detach().double().reshape(unit.n_units, -1)
    return w.pow(2).sum(dim=1) / w.shape[1]


@UNIT_SCORERS.register("rs")
def rs(unit, stats: UnitStats, generator) -> torch.Tensor:
    return (-stats.AG).mean(dim=0)


@UNIT_SCORERS.register("abs_rs")
def abs_rs(unit, stats: UnitStats, generator) -> torch.Tensor:
    return stats.AG.abs().mean(dim=0)


@UNIT_SCORERS.register("mrs")
def mrs(unit, stats: UnitStats, generator) -> torch.Tensor:
    return (stats.mean * stats.G - stats.AG).mean(dim=0)


@UNIT_SCORERS.register("abs_mrs")
def abs_mrs(unit, stats: UnitStats, generator) -> torch.Tensor:
    return (stats.mean * stats.G - stats.AG).abs().mean(dim=0)


def needs_data(scorer: str) -> bool:
    return scorer in ("rs", "abs_rs", "mrs", "abs_mrs")


def select(
    scores: torch.Tensor, *, fraction: float | None = None, count: int | None = None, keep_at_least: int = 1
) -> torch.Tensor:
    """Indices of the lowest-scored units: ``round(fraction·C)`` or ``count`` of them, always
    leaving ``keep_at_least`` (a layer is never emptied). Ties go to the lower index."""
    C = scores.numel()
    k = round(fraction * C) if fraction is not None else int(cast(int, count))  # callers give one of the two
    k = max(0, min(k, C - keep_at_least))
    return torch.sort(torch.argsort(scores, stable=True)[:k]).values
