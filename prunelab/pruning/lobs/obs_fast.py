"""``obs-fast``: the blocked OBS of SparseGPT (Frantar & Alistarh 2023).

One Cholesky factor of the inverse, ``H⁻¹ = Uᵀ U`` (U upper triangular), is shared by all
rows. Columns are processed left to right in blocks of ``block_size``. In each block the
mask is chosen across all its rows: the weights with the lowest ``w² / U_ii²`` go, up to
the layer's target fraction of the block. Then each column i of the block in turn has its
pruned entries zeroed, and the error ``(w_i − q_i) / U_ii`` is spread over the columns to
its right with row i of U: exactly, within the block, and in one matrix product for the
rest once the block is done. The cost is O(rows · d²) for the whole layer. Each step's
increase of E is ``(w_i − q_i)² / U_ii²``; their sum is the predicted error. The bias
column comes last, is never pruned, and takes its share of the compensation.

Layers wider than ``FLOAT64_UP_TO`` inputs run in float32 and get U from one Cholesky
factorisation of the reversed Hessian: with J the reversal permutation and
``J H J = L Lᵀ``, ``H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)`` and ``J L⁻¹ J`` is upper triangular, so
``U = J L⁻¹ J`` — one factorisation and one triangular inverse instead of a factorisation,
a full inverse and a second factorisation (about 3× fewer operations, and float32 halves
the time again). Narrower layers keep the float64 path, bit for bit.

With an N:M pattern (SparseGPT's semi-structured variant) the mask of each group of ``m``
consecutive inputs is chosen when the sweep reaches the group, from the weights as updated by
the columns before it: the ``m − n`` lowest ``w² / U_ii²`` of each row go. Blocks then hold
whole groups.
"""

from __future__ import annotations

import torch

from prunelab.pruning.lobs.common import Solution, inverse, nm_choice

FLOAT64_UP_TO = 1024


def upper_factor_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """U upper triangular with ``H⁻¹ = Uᵀ U``, from the Cholesky factor of the reversed H."""
    L = torch.linalg.cholesky(torch.flip(H, (0, 1)))
    return torch.flip(lower_inverse(L), (0, 1))               # a flip copies: rows are read one by one


def lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` of a lower-triangular L by halves, ``[[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹BA⁻¹, C⁻¹]]``:
    matrix products instead of a triangular solve with d right-hand sides. One output matrix
    is allocated; the halves are written into its blocks."""
    out = torch.zeros(L.shape, dtype=L.dtype, device=L.device)
    _lower_inverse_into(L, out)
    return out


def _lower_inverse_into(L: torch.Tensor, out: torch.Tensor) -> None:
    n = len(L)
    if n <= 256:
        out.copy_(torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False))
        return
    h = n // 2
    _lower_inverse_into(L[:h, :h], out[:h, :h])
    _lower_inverse_into(L[h:, h:], out[h:, h:])
    # −C⁻¹(B A⁻¹) as a triangular solve with C: half the operations of a product with C⁻¹
    out[h:, :h] = torch.linalg.solve_triangular(L[h:, h:], L[h:, :h] @ out[:h, :h], upper=False)
    out[h:, :h].neg_()


class _one_thread:
    """Run a block of small tensor operations on one thread (on a busy machine each parallel
    element-wise step can wait milliseconds for its second thread); the results are the same."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` lowest entries of ``score``, ties taken in flat (row-major) order —
    the first ``k`` of a stable argsort, from one k-th value selection instead of a sort."""
    flat = score.reshape(-1)
    if k <= 0 or k >= flat.numel():
        return torch.full(score.shape, k > 0, dtype=torch.bool)
    threshold = torch.kthvalue(flat, k).values
    mask = flat < threshold
    missing = k - int(mask.sum())
    if missing > 0:
        mask[torch.nonzero(flat == threshold).flatten()[:missing]] = True
    return mask.reshape(score.shape)


def solve(W: torch.Tensor, H: torch.Tensor, n_prune: int, prunable: torch.Tensor,
          alive: torch.Tensor, block_size: int = 128, nm: tuple[int, int] | None = None) -> Solution:
    rows, d = W.shape
    if nm is not None:
        block_size = max(nm[1], block_size - block_size % nm[1])   # whole groups in every block
        n_groups = int(prunable.sum()) // nm[1]                  # the prunable inputs come first
    dtype = W.dtype
    if d > FLOAT64_UP_TO:
        U = upper_factor_of_inverse(H.float())
        W = W.float()
    else:
        U = torch.linalg.cholesky(inverse(H), upper=True).contiguous()
    # work on Wᵀ: column i of W is the contiguous row i here, and each step's update of the
    # columns to its right is one rank-1 update of contiguous memory
    WT = W.t().clone(memory_format=torch.contiguous_format)     # never the caller's storage
    keepT = torch.ones(d, rows, dtype=torch.bool)
    fraction = int(n_prune) / max(1, rows * int(prunable.sum()))
    predicted = 0.0
    seen, taken = 0, 0          # prunable entries so far, pruned so far: round the running target
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        W1 = WT[i1:i2]                                            # a view: updated in place
        U1 = U[i1:i2, i1:i2]
        diag = torch.diagonal(U1)
        score = W1.t().pow(2) / diag.pow(2)[None, :]              # (rows, block), as W reads
        block_prunable = prunable[i1:i2].expand_as(score)
        score = torch.where(block_prunable, score, torch.full_like(score, float("inf")))
        score = torch.where(alive[:, i1:i2], score, torch.full_like(score, float("-inf")))
        seen += int(block_prunable.sum())
        n_block = max(round(fraction * seen) - taken, int((~alive[:, i1:i2]).sum()), 0)
        taken += n_block
        if nm is None:
            maskT = (lowest(score, n_block) & block_prunable).t().contiguous()
        else:
            maskT = torch.zeros(i2 - i1, rows, dtype=torch.bool)
        ErrT = maskT.to(WT.dtype)             # becomes (w − q) / U_ii row by row
        with _one_thread():         # thousands of small steps: no thread hand-offs
            for i in range(i2 - i1):
                if nm is not None and i % nm[1] == 0 and (i1 + i) // nm[1] < n_groups:
                    g = slice(i, i + nm[1])
                    group_score = (W1[g].pow(2) / diag[g, None].pow(2)).t()
                    maskT[g] = nm_choice(group_score, *nm, alive[:, i1 + i:i1 + i + nm[1]]).t()
                    ErrT[g] = maskT[g].to(WT.dtype)
                err = ErrT[i].mul_(W1[i]).div_(diag[i])
                if i + 1 < i2 - i1:
                    W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)
        predicted += float(ErrT.pow(2).sum())
        W1.masked_fill_(maskT, 0.0)
        if i2 < d:
            WT[i2:].addmm_(U[i1:i2, i2:].t(), ErrT, alpha=-1)
        keepT[i1:i2] = ~maskT
    return Solution(WT.t().to(dtype).contiguous(), keepT.t().contiguous(), predicted)
