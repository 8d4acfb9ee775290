"""``obs-exact``: greedy Optimal Brain Surgeon with exact inverse down-dates
(Optimal Brain Compression, Frantar & Alistarh 2022).

For each output row, repeat: remove the weight with the least error increase
``ΔE = w_q² / [H⁻¹]_qq`` (given the removals so far), compensate the row with
``δw = −(w_q / [H⁻¹]_qq) H⁻¹ e_q``, and take q out of the inverse:
``H⁻¹ ← H⁻¹ − H⁻¹ e_q e_qᵀ H⁻¹ / [H⁻¹]_qq``. Entries pruned before go first, at no cost.

The layer's target is shared between rows as OBC does: every row's greedy runs to the
end, recording its removal order and increments. Each row's increments are made monotone
(running maximum), so taking the k cheapest removals of the layer takes a prefix of every
row. A row's final weights are then the exact least-squares optimum for its mask,
``w'_K = w_K + H_KK⁻¹ H_KP w_P`` — what the greedy reaches at that step — and the
predicted error, the sum of the increments taken, is exact for the Hessian used.

Rows run in parallel batches, one inverse each. Every few steps the inverses are compacted
to the coordinates still in play, so a row costs about d³/3 operations. Layers wider than
256 inputs run the trace in float32 (its order and increments may then differ from float64
in the last digits); the final weights are always solved in float64.

With an N:M pattern an entry may go only while its group of ``m`` consecutive inputs keeps
more than ``n`` (entries pruned before always go); each row's greedy stops when every group
is down to ``n`` (:func:`trace_nm`: no compaction, rows that are done wait).
"""

from __future__ import annotations

from typing import cast

import torch

from prunelab.pruning.lobs.common import Solution, inverse

BATCH_BYTES = 20 * 2**20  # the per-row inverses of one batch (8 float32 rows of 785: fastest measured)
COMPACT_EVERY = 32
FLOAT64_UP_TO = 256  # wider layers run the greedy's trace in float32 (2x faster); the
# final weights are always the float64 least-squares optimum


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
    """Prune ``n_prune`` entries of the layer, or with ``epsilon`` every greedy step whose
    cost stays within the paper's tolerable error, ``√(ΔE/2) ≤ ε`` — but no more than
    ``limit`` (the no-empty-layer guard; the ``limit`` cheapest go then); or, with ``nm``,
    every group down to its pattern."""
    rows, d = W.shape
    Hinv = inverse(H)
    if nm is not None:
        return _solve_nm(W, H, Hinv, prunable, alive, nm)
    m = int(prunable.sum())
    order = torch.empty(rows, m, dtype=torch.long)
    increments = torch.empty(rows, m, dtype=W.dtype)
    precision = torch.float32 if d > FLOAT64_UP_TO else torch.float64
    batch = max(1, BATCH_BYTES // (d * d * torch.finfo(precision).bits // 8))
    for start in range(0, rows, batch):
        idx = slice(start, start + batch)
        o, inc = trace(W[idx].to(precision), Hinv.to(precision), prunable, alive[idx])
        order[idx], increments[idx] = o, inc.to(W.dtype)
    price = torch.cummax(increments, dim=1).values
    held = False
    if epsilon is not None:
        counts = (price <= 2 * epsilon**2).sum(dim=1)
        counts = torch.maximum(counts, (~alive).sum(dim=1))
        if limit is not None and int(counts.sum()) > limit:
            n_prune, epsilon, held = limit, None, True
    if epsilon is None:
        # without epsilon (or past its limit) the caller gives n_prune
        k = min(max(int(cast(int, n_prune)), int((~alive).sum())), rows * m)
        taken = torch.zeros(rows * m, dtype=torch.bool)
        taken[torch.argsort(price.flatten(), stable=True)[:k]] = True
        counts = taken.reshape(rows, m).sum(dim=1)
    W_out = torch.zeros_like(W)
    keep = torch.ones_like(alive)
    predicted = 0.0
    for r in range(rows):
        removed = order[r, : counts[r]]
        keep[r, removed] = False
        W_out[r] = optimal_row(W[r], H, keep[r])
        predicted += float(increments[r, : counts[r]].sum())
    return Solution(W_out, keep, predicted, held)


def _solve_nm(W, H, Hinv, prunable, alive, nm) -> Solution:
    rows, d = W.shape
    precision = torch.float32 if d > FLOAT64_UP_TO else torch.float64
    batch = max(1, BATCH_BYTES // (d * d * torch.finfo(precision).bits // 8))
    W_out, keep = torch.zeros_like(W), torch.ones_like(alive)
    predicted = 0.0
    for start in range(0, rows, batch):
        idx = slice(start, start + batch)
        removed, increments = trace_nm(W[idx].to(precision), Hinv.to(precision), prunable, alive[idx], *nm)
        keep[idx] = ~removed
        predicted += float(increments.sum())
    for r in range(rows):
        W_out[r] = optimal_row(W[r], H, keep[r])
    return Solution(W_out, keep, predicted)


def trace_nm(
    W: torch.Tensor, Hinv: torch.Tensor, prunable: torch.Tensor, alive: torch.Tensor, n: int, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy under an N:M pattern on each row of ``W`` (B, d), the prunable inputs first;
    returns the removed entries (B, d) and each row's error increments (B, steps)."""
    B, d = W.shape
    k = int(prunable.sum())
    group = torch.arange(d) // m
    group[k:] = k // m  # the bias: a group of its own, never pruned
    left = torch.zeros(B, k // m + 1, dtype=torch.long).index_add_(1, group, alive.long())
    dead = (~alive).reshape(B, -1)[:, :k].reshape(B, k // m, m).sum(dim=2)
    need = (torch.clamp(m - n - dead, min=0) + dead).sum(dim=1)  # removals per row
    w, inv = W.clone(), Hinv.expand(B, d, d).clone()
    offset = torch.where(prunable, 0.0, float("inf")).to(W.dtype).expand(B, d).clone()
    offset[~alive] = float("-inf")
    removed = torch.zeros(B, d, dtype=torch.bool)
    rows = torch.arange(B)
    steps = int(need.max()) if B else 0
    increments = torch.zeros(B, steps, dtype=W.dtype)
    for step in range(steps):
        active = step < need  # (B,)
        full = (left[:, group] <= n) & (offset == 0)  # alive, group at its pattern
        score = w * w / torch.diagonal(inv, dim1=1, dim2=2).clamp_min(1e-30) + offset
        score = torch.where(full | removed, torch.full_like(score, float("inf")), score)
        q = torch.argmin(score, dim=1)[:, None]
        column = inv[rows, :, q[:, 0]] * active[:, None]
        dqq = torch.where(active, inv[rows, q[:, 0], q[:, 0]], 1.0)[:, None]  # rows done: no update
        coef = w.gather(1, q) / dqq
        increments[:, step] = torch.where(active, (coef * coef * dqq)[:, 0], 0.0)
        w.addcmul_(coef, column, value=-1.0)
        w[rows[active], q[active, 0]] = 0.0
        removed[rows[active], q[active, 0]] = True
        counted = active & alive[rows, q[:, 0]]  # an entry pruned before never counted
        left[rows[counted], group[q[counted, 0]]] -= 1
        inv.baddbmm_(column[:, :, None], (column / dqq)[:, None, :], alpha=-1.0)
    return removed, increments


def optimal_row(w: torch.Tensor, H: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The row closest to ``w`` in the H-norm with the pruned entries at zero:
    ``w'_K = w_K + H_KK⁻¹ H_KP w_P``, ``w'_P = 0``."""
    K, P = torch.nonzero(keep).flatten(), torch.nonzero(~keep).flatten()
    out = torch.zeros_like(w)
    if len(K):
        out[K] = w[K] + torch.linalg.solve(H[K][:, K], H[K][:, P] @ w[P])
    return out


def trace(
    W: torch.Tensor, Hinv: torch.Tensor, prunable: torch.Tensor, alive: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the greedy on each row of ``W`` (B, d) until every prunable entry is gone;
    return each row's removal order (original columns) and error increments. Kept lean:
    this loop runs d times per batch of rows."""
    B, d = W.shape
    steps = int(prunable.sum())
    w = W.clone()
    inv = Hinv.expand(B, d, d).clone()
    cols = torch.arange(d).expand(B, d).clone()  # original column of each coordinate
    # 0 = may go, +inf = may not (bias) or gone, -inf = pruned before: goes first, at no cost
    offset = torch.where(prunable, 0.0, float("inf")).to(W.dtype).expand(B, d).clone()
    offset[~alive] = float("-inf")
    gone = torch.zeros(B, d, dtype=torch.bool)  # removed, not yet compacted away
    rows = torch.arange(B)
    order = torch.empty(B, steps, dtype=torch.long)
    increments = torch.empty(B, steps, dtype=W.dtype)
    for step in range(steps):
        score = w * w / torch.diagonal(inv, dim1=1, dim2=2).clamp_min(1e-30) + offset  # removed: 0/0 otherwise
        q = torch.argmin(score, dim=1)[:, None]
        column = inv[rows, :, q[:, 0]]  # (B, d_left)
        dqq = column.gather(1, q)
        coef = w.gather(1, q) / dqq
        increments[:, step] = (coef * coef * dqq)[:, 0]  # w_q² / [H⁻¹]_qq
        order[:, step] = cols.gather(1, q)[:, 0]
        w.addcmul_(coef, column, value=-1.0)
        w.scatter_(1, q, 0.0)
        offset.scatter_(1, q, float("inf"))
        gone.scatter_(1, q, True)
        inv.baddbmm_(column[:, :, None], (column / dqq)[:, None, :], alpha=-1.0)  # in place
        if (step + 1) % COMPACT_EVERY == 0 and step + 1 < steps:
            w, inv, cols, offset, gone = _compact(w, inv, cols, offset, gone)
    return order, increments


def _compact(w, inv, cols, offset, gone):
    """Drop the removed coordinates (every row has removed as many) from all state."""
    B = w.shape[0]
    keep = torch.nonzero(~gone)[:, 1].reshape(B, -1)  # (B, d_left), ascending per row
    take = lambda t: torch.gather(t, 1, keep)
    inv = torch.gather(inv, 1, keep[:, :, None].expand(-1, -1, inv.shape[2]))
    inv = torch.gather(inv, 2, keep[:, None, :].expand(-1, keep.shape[1], -1))
    return take(w), inv, take(cols), take(offset), torch.zeros_like(take(gone))
