"""``lobs``: Layer-wise Optimal Brain Surgeon as in Dong, Chen & Pan (NIPS 2017).

Compute ``H⁻¹`` once; rank every weight q of the layer once by its sensitivity
``L_q = w_q² / (2 [H⁻¹]_qq)``; prune in that order (lowest first), applying to its row the
compensation ``δw = −(w_q / [H⁻¹]_qq) · H⁻¹ e_q`` with the current ``w_q`` and keeping the
already-pruned entries at zero. ``H⁻¹`` is never updated after a removal: cheap and
approximate. The predicted error is the paper's: the sum of the removed weights'
``2 L_q`` (interactions ignored). Stopping rule: a target count, or the paper's tolerable
error — prune while ``√L_q ≤ ε``, but never more than ``limit`` entries (the no-empty-layer
guard; the cheapest ``limit`` go then). With an N:M pattern the ``m − n`` lowest-ranked entries
of every group of ``m`` consecutive inputs go instead (the count is the pattern's).

Rows are independent (the Hessian is block-diagonal over output rows), so the sequence
runs as rounds: in round t every row removes its t-th chosen weight — the same result as
the one-by-one order, vectorised over rows.
"""

from __future__ import annotations

from typing import cast

import torch

from prunelab.pruning.lobs.common import Solution, inverse, nm_choice


def solve(
    W: torch.Tensor,
    H: torch.Tensor,
    n_prune: int | None,
    prunable: torch.Tensor,
    alive: torch.Tensor,
    epsilon: float | None = None,
    limit: int | None = None,
    nm: tuple[int, int] | None = None,
) -> Solution:
    Hinv = inverse(H)
    d = torch.diagonal(Hinv)
    L = W.pow(2) / (2 * d)
    L[:, ~prunable] = float("inf")
    L[~alive] = float("-inf")  # pruned before: zero already, counted first
    held = False
    if nm is not None:
        k = int(prunable.sum())  # the prunable inputs come first (the bias last)
        chosen = torch.zeros_like(alive)
        chosen[:, :k] = nm_choice(L[:, :k], *nm, alive[:, :k])
        epsilon = n_prune = None
    elif epsilon is not None:
        chosen = (L <= epsilon**2) | ~alive
        if limit is not None and int(chosen.sum()) > limit:
            n_prune, epsilon, held = limit, None, True
    if epsilon is None and nm is None:
        order = torch.argsort(L.flatten(), stable=True)
        chosen = torch.zeros(L.numel(), dtype=torch.bool)
        # without epsilon (or past its limit) the caller gives n_prune
        chosen[order[: max(int(cast(int, n_prune)), int((~alive).sum()))]] = True
        chosen = chosen.reshape(L.shape) & prunable.expand_as(L)
        chosen |= ~alive
    predicted = float((2 * L[chosen & alive]).sum())

    W = W.clone()
    rank = torch.where(chosen, L, torch.full_like(L, float("inf")))
    per_row = torch.argsort(rank, dim=1, stable=True)  # each row's removals, cheapest first
    counts = chosen.sum(dim=1)
    removed = torch.zeros_like(chosen)
    for t in range(int(counts.max()) if len(counts) else 0):
        rows = torch.nonzero(counts > t).flatten()
        q = per_row[rows, t]
        coef = W[rows, q] / d[q]
        W[rows] -= coef[:, None] * Hinv[q]  # Hinv is symmetric: row q = column q
        removed[rows, q] = True
        W[removed] = 0.0
    return Solution(W, ~chosen, predicted, held)
