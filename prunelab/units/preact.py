"""The next layer's pre-activation error of a unit removal (docs/methods.md §5.8).

For a removal plan (unit layer → removed units) of a chain model, each pruned unit layer ℓ has
one *consumer* c (the next Linear/Conv2d, :mod:`~prunelab.units.structure`). Its *pre-activation*
``z`` is c's output (before c's own BatchNorm and activation), over every calibration image,
position and the output channels ``K`` of c that the plan keeps (all of them unless c is itself
pruned: its removed channels are 0 by construction and would count the same with and without
mean replacement). With ``z_dense`` measured on the unpruned model:

* **local** error: c is fed the unpruned model's input with only ℓ's removed channels changed
  (0, as masked removal makes them), through the pruned copy of c (so with mean replacement its
  bias holds the folded mean)::

      e_local = ‖c_pruned(x_dense with ℓ's units zeroed)[K] − z_dense[K]‖_F / ‖z_dense[K]‖_F

* **network** error: c's output in the whole pruned model (upstream layers pruned too) against
  ``z_dense``, same norm. When the plan prunes one layer only, upstream is unchanged and the
  network error is the local one (not computed twice).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prunelab.units.structure import UnitLayer


@torch.no_grad()
def capture(
    model: nn.Module, names: list[str], x: torch.Tensor, *, inputs: bool = True, batch_size: int = 250
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The inputs (if ``inputs``) and outputs of the submodules ``names`` on ``x`` (model as it is:
    study B's copies are in eval mode), concatenated over batches."""
    got_in: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    got_out: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name):
        def keep(module, args, output):
            if inputs:
                got_in[name].append(args[0].detach().contiguous())
            got_out[name].append(output.detach().contiguous())

        return keep

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for k in range(0, len(x), batch_size):
            model(x[k : k + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    cat = lambda parts: {n: torch.cat(v) for n, v in parts.items() if v}
    return cat(got_in), cat(got_out)


def zeroed_input(x: torch.Tensor, unit: UnitLayer, idx: torch.Tensor) -> torch.Tensor:
    """A copy of a consumer's input ``x`` with the channels of ``unit``'s units ``idx`` set to 0
    (for a Linear after flatten, the channel's P = features / units columns)."""
    x = x.clone()
    if x.dim() == 2 and x.shape[1] != unit.n_units:
        x.view(len(x), unit.n_units, -1)[:, idx, :] = 0.0
    else:
        x[:, idx] = 0.0
    return x


def relative_error(z: torch.Tensor, reference: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """``‖z − reference‖_F / ‖reference‖_F`` over the channels (dim 1) ``keep`` (all when None), in
    float64; NaN when the reference is 0."""
    if keep is not None:
        z, reference = z[:, keep], reference[:, keep]
    norm = float(torch.sum(reference * reference, dtype=torch.float64))
    if norm == 0.0:
        return math.nan
    diff = z - reference
    return math.sqrt(float(torch.sum(diff * diff, dtype=torch.float64)) / norm)


@torch.no_grad()
def preactivation_errors(
    units: list[UnitLayer],
    plan: dict[str, torch.Tensor],
    dense_inputs: dict[str, torch.Tensor],
    dense_outputs: dict[str, torch.Tensor],
    pruned: nn.Module,
    x: torch.Tensor,
    batch_size: int = 250,
) -> dict[str, dict[str, float]]:
    """``{consumer name: {"local": e, "network": e}}`` for the consumer of every unit layer the plan
    prunes (module docstring). ``units`` are the unpruned model's unit layers (names are module
    names, the same in ``pruned``); ``dense_inputs``/``dense_outputs`` are the consumers' inputs and
    outputs on ``x`` in the unpruned model (:func:`capture`); ``pruned`` is the masked copy (with or
    without mean replacement)."""
    by_name = {u.name: u for u in units}
    producers = {}
    for name, idx in plan.items():
        if len(idx):
            leaf = by_name[name].consumer
            assert leaf is not None  # every unit layer of a chain has one
            producers[leaf.name] = name
    if not producers:
        return {}
    network = None
    if len(producers) > 1:
        _, network = capture(pruned, list(producers), x, inputs=False, batch_size=batch_size)
    errors = {}
    for consumer, producer in producers.items():
        removed = plan.get(consumer)
        keep = None
        if consumer in by_name and removed is not None and len(removed):
            mask = torch.ones(by_name[consumer].n_units, dtype=torch.bool)
            mask[removed] = False
            keep = torch.nonzero(mask).flatten()
        module = pruned.get_submodule(consumer)
        z = module(zeroed_input(dense_inputs[consumer], by_name[producer], plan[producer]))
        local = relative_error(z, dense_outputs[consumer], keep)
        net = relative_error(network[consumer], dense_outputs[consumer], keep) if network is not None else local
        errors[consumer] = {"local": local, "network": net}
    return errors
