"""Wanda: pruning by weights and activations (Sun et al. 2023; docs/methods.md §1).

For a layer ``z = W x`` the score of weight ``W_ij`` is

    S_ij = |W_ij| · ‖X_j‖₂,       ‖X_j‖₂ = sqrt(Σ_k x_{k,j}²)

over every input column ``x_k`` the calibration data sends through the layer: every token of a
sequence, every sliding-window patch of a convolution. A weight matters as much as its size
times the size of the input it multiplies. Only the diagonal of ``XᵀX`` is needed, so the
statistics are one vector per layer (per row block), never a ``d × d`` matrix.

The input columns are those of the layer-wise Hessians (:mod:`prunelab.pruning.lobs.hessian`:
``columns`` and its hook sites), so Wanda sees the same target kinds: Linear, HF ``Conv1D``,
Conv (grouped and depthwise: one norm vector per group), MultiheadAttention's ``in_proj`` (q, k,
v blocks from their own inputs) and ``out_proj`` (the recomputed attention context), RNN
``weight_ih_l0`` and a one-layer RNN's ``weight_hh_l0``. Default targets of other kinds are
left dense (listed in ``criterion.skipped``, with a :class:`LayerSkipped` warning); named ones
are refused.

The paper compares scores within each output row: ``row`` is this criterion's default scope
(:class:`prunelab.pruning.scopes.Row`); every other scope, schedule and granularity works too.
The statistics come from the model as it is at the prune, in one pass over the calibration
batches (the paper's block-by-block variant, with pruned outputs feeding the next block, is not
this one).

    prune(model, 0.5, criterion="wanda", data=batches)            # 50 % of every row
    prune(model, None, criterion="wanda", granularity="2:4", data=batches)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunelab._hooks import eval_mode
from prunelab.inputs import forward_batches
from prunelab.pruning.criteria import CRITERIA, Criterion
from prunelab.pruning.lobs import hessian
from prunelab.pruning.targets import Target


class InputNorms(hessian.InputHooks):
    """Forward hooks summing ``Σ x_j²`` over a set of targets' input columns (float64), one
    vector per row block: ``(groups, d)``."""

    def __init__(self, targets: Sequence[Target], parents: dict):
        self.targets, self.parents = list(targets), parents
        self.sums: dict[str, torch.Tensor] = {}
        self.columns: dict[str, int] = {}
        self._handles = []

    def _hook_for(self, target: Target, site: nn.Module):
        def hook(module, args, kwargs, output):
            cols, _ = hessian.columns(target, self.parents, site, args, kwargs, output)
            parts = list(cols)               # (groups, n, d) tensor or a list of (n_g, d)
            squares = torch.stack([torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).double().pow(2)
                                   for x in parts])
            name = target.name
            self.sums[name] = squares if name not in self.sums else self.sums[name] + squares
            self.columns[name] = self.columns.get(name, 0) + len(parts[0])
        return hook

    def norms(self) -> dict[str, torch.Tensor]:
        """``{target: ‖X_j‖₂ as (groups, d)}``."""
        missing = [t.name for t in self.targets if t.name not in self.sums]
        if missing:
            raise ValueError(f"wanda: the calibration forward never reached {', '.join(missing)}.")
        return {name: s.sqrt() for name, s in self.sums.items()}


def input_norms(model: nn.Module, targets: Sequence[Target], batches) -> dict[str, torch.Tensor]:
    """Run ``batches`` through ``model`` (eval mode, no grad) and return each target's input
    column norms ``‖X_j‖₂`` as ``(groups, d)`` (d in the order of ``target.matrix()``'s columns;
    one row per row block with its own inputs: conv groups, MultiheadAttention's q/k/v)."""
    parents = hessian.attention_parents(model)
    for target in targets:
        hessian.check_target(target, "wanda", parents)
    recorder = InputNorms(targets, parents)
    with torch.no_grad(), eval_mode(model), hessian.calibration_mode(model), recorder:
        forward_batches(model, batches)
    return recorder.norms()


def wanda_scores(target: Target, norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖₂`` shaped like the weight, from the ``(groups, d)`` norms."""
    W = target.matrix().float().abs()
    groups = norms.shape[0]
    if W.shape[0] % groups or W.shape[1] != norms.shape[1]:
        raise ValueError(f"wanda: the inputs of {target.name!r} ({tuple(norms.shape)}) do not fit its "
                         f"weight matrix {tuple(W.shape)}; was the model changed since calibration?")
    blocks = W.reshape(groups, W.shape[0] // groups, -1) * norms.float().to(W.device)[:, None, :]
    scores = blocks.reshape(W.shape)
    return scores.t() if target.layout == "transposed" else scores.reshape(target.weight.shape)


@CRITERIA.register("wanda")
class Wanda(Criterion):
    """``|W_ij| · ‖X_j‖₂`` from calibration inputs (Sun et al. 2023), ranked within each output
    row by default (scope ``row``)."""

    name = "wanda"
    needs_data = True
    default_scope = "row"

    def __init__(self):
        self._norms: dict[str, torch.Tensor] | None = None
        self.skipped: dict[str, str] = {}      # default targets left dense: {name: reason}

    def validate(self, pruner) -> None:
        self.skipped = hessian.skip_unsupported(pruner, "wanda", verb="score")

    def calibrate(self, model, targets, batches, loss_fn) -> None:
        """Collect ``‖X_j‖₂`` of every target's inputs over ``batches`` (any form
        :mod:`prunelab.inputs` reads; the loss is not used)."""
        batches, _ = self._calibration(batches, loss_fn)
        chosen = [t for t in targets if t.name not in self.skipped]
        self._norms = input_norms(model, chosen, batches)

    def scores(self, targets: Sequence[Target]) -> list[torch.Tensor]:
        return list(self.iter_scores(targets))

    def iter_scores(self, targets: Sequence[Target]):
        if self._norms is None:
            raise ValueError("the wanda criterion has no input norms to score with: pass calibration data "
                             "(prune(..., data=batches), Pruner(..., calibration=batches) or pruner.calibrate(data)).")
        missing = [t.name for t in targets if t.name not in self._norms]
        if missing:
            raise ValueError(f"wanda: calibrated without {', '.join(missing)}; calibrate on the same layers.")
        for t in targets:
            yield wanda_scores(t, self._norms[t.name])

    def reset(self) -> None:
        self._norms = None

    @property
    def norms(self) -> dict[str, torch.Tensor] | None:
        """The last calibration's ``{target: ‖X_j‖₂ (groups, d)}``."""
        return self._norms
