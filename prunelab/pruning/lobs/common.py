"""What every layer-wise OBS solver takes and returns.

A solver gets one layer's weight matrix ``W`` (rows = output units; columns = the
layer's inputs, with the bias as a last, never-pruned column when it takes part), the
damped Hessian ``H`` of the layer-wise error (the same for every row), which entries
may be pruned, and which are already pruned (they stay at zero). It returns the new
``W`` with the pruned entries exactly zero and the others compensated, the keep-mask,
and its predicted increase of the layer-wise error ``E = (1/n)‖Ẑ − Z‖²``.

Removing weight q of a row with the optimal compensation of the others costs
``ΔE = w_q² / [H⁻¹]_qq`` (= 2·L_q in Hassibi & Stork's notation) and moves the row by
``δw = −(w_q / [H⁻¹]_qq) · H⁻¹ e_q``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.pruning.granularity import nm_keep


@dataclass
class Solution:
    W: torch.Tensor  # (rows, d), float64, pruned entries exactly 0
    keep: torch.Tensor  # (rows, d) bool; True for the non-prunable (bias) column too
    predicted: float  # predicted increase of E = (1/n)‖Ẑ − Z‖²
    held: bool = False  # the tolerable error asked for more than ``limit`` removals


def inverse(H: torch.Tensor) -> torch.Tensor:
    """H⁻¹ of a symmetric positive-definite (damped) Hessian, via Cholesky."""
    return torch.cholesky_inverse(torch.linalg.cholesky(H))


def row_counts(total: int, rows: int, already: torch.Tensor) -> torch.Tensor:
    """Split a layer's prune count evenly over rows (the first ``total % rows`` rows get one
    more); a row never prunes fewer entries than it has already pruned."""
    counts = torch.full((rows,), total // rows, dtype=torch.long)
    counts[: total % rows] += 1
    return torch.maximum(counts, already)


def nm_choice(score: torch.Tensor, n: int, m: int, alive: torch.Tensor) -> torch.Tensor:
    """Entries to prune so that every group of ``m`` consecutive columns keeps at most ``n``
    per row: the ``m − n`` lowest scores of each group, and every entry already pruned (a row
    whose group lost more before keeps fewer). ``score`` is ``(rows, k·m)``; lower goes first."""
    return ~nm_keep(score, n, m, alive)  # keep the n highest: prune the m − n lowest
