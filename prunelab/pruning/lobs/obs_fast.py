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

Layers wider than ``FLOAT64_UP_TO`` inputs run in float32 and never form U. With J the
reversal permutation, one Cholesky factorisation ``J H J = L Lᵀ`` gives ``H = A Aᵀ`` with
``A = J L J`` upper triangular, so ``U = A⁻¹``. The sweep then runs left-looking: before block b
its columns receive every earlier block's compensation at once. With ``G`` the total change of
the columns already done (original minus final), ``G = E U`` and ``G A = E`` give the earlier
blocks' share for block b as ``−E_{<b} U_{<b,b} = (G_{<b} A_{<b,b}) U_bb``, where ``U_bb = A_bb⁻¹`` is the inverse
of one small diagonal block. That is one factorisation (d³/3) and the same rows·d² of products as
the right-looking sweep, without the triangular inverse (another d³/3) or a full-size U; float32
halves the time again. Narrower layers keep the float64 path with U, bit for bit.

With an N:M pattern (SparseGPT's semi-structured variant) the mask of each group of ``m``
consecutive inputs is chosen when the sweep reaches the group, from the weights as updated by
the columns before it: the ``m − n`` lowest ``w² / U_ii²`` of each row go. Blocks then hold
whole groups.
"""

from __future__ import annotations

import numpy as np
import torch

from prunelab.pruning.lobs.common import Solution, inverse, nm_choice

FLOAT64_UP_TO = 1024


def reversed_cholesky(H: torch.Tensor) -> torch.Tensor:
    """L lower triangular with ``J H J = L Lᵀ`` (J reverses the order), in float32. Then
    ``H = A Aᵀ`` with ``A = J L J`` upper triangular, and ``H⁻¹ = Uᵀ U`` with ``U = A⁻¹``.
    A float64 H on the CPU is reversed and cast in one pass."""
    if H.device.type == "cpu" and H.dtype == torch.float64 and not H.requires_grad:
        reversed32 = torch.from_numpy(np.ascontiguousarray(H.numpy()[::-1, ::-1], dtype=np.float32))
    else:
        reversed32 = torch.flip(H.float(), (0, 1))
    return torch.linalg.cholesky(reversed32)


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


def solve(
    W: torch.Tensor,
    H: torch.Tensor,
    n_prune: int,
    prunable: torch.Tensor,
    alive: torch.Tensor,
    block_size: int = 128,
    nm: tuple[int, int] | None = None,
) -> Solution:
    rows, d = W.shape
    if nm is not None:
        block_size = max(nm[1], block_size - block_size % nm[1])  # whole groups in every block
        n_groups = int(prunable.sum()) // nm[1]  # the prunable inputs come first
    dtype = W.dtype
    wide = d > FLOAT64_UP_TO
    if wide:
        L = reversed_cholesky(H)  # A = J L J, H = A Aᵀ, U = A⁻¹: neither A nor U is formed
        W = W.float()
    else:
        U = torch.linalg.cholesky(inverse(H), upper=True).contiguous()
    # work on Wᵀ: column i of W is the contiguous row i here, and each step's update of the
    # columns to its right is one rank-1 update of contiguous memory
    WT = W.t().clone(memory_format=torch.contiguous_format)  # never the caller's storage
    if wide:
        GR = torch.empty_like(WT)  # the done columns' total change, rows in reversed order
    keepT = torch.ones(d, rows, dtype=torch.bool)
    fraction = int(n_prune) / max(1, rows * int(prunable.sum()))
    predicted = 0.0
    seen, taken = 0, 0  # prunable entries so far, pruned so far: round the running target
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        W1 = WT[i1:i2]  # a view: updated in place
        if wide:  # in L's coordinates, block b is rows/columns j1:j2
            j1, j2 = d - i2, d - i1
            eye = torch.eye(j2 - j1, dtype=L.dtype)
            U1 = torch.flip(torch.linalg.solve_triangular(L[j1:j2, j1:j2], eye, upper=False), (0, 1))
            original = W1.clone()
            if i1:  # the earlier blocks' compensation, (G_<b A_<b,b) U_bb
                W1.addmm_(U1.t(), torch.flip(L[j2:, j1:j2].t() @ GR[j2:], (0,)))
        else:
            U1 = U[i1:i2, i1:i2]
        diag = torch.diagonal(U1)
        score = W1.t().pow(2) / diag.pow(2)[None, :]  # (rows, block), as W reads
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
        ErrT = maskT.to(WT.dtype)  # becomes (w − q) / U_ii row by row
        with _one_thread():  # thousands of small steps: no thread hand-offs
            for i in range(i2 - i1):
                if nm is not None and i % nm[1] == 0 and (i1 + i) // nm[1] < n_groups:
                    g = slice(i, i + nm[1])
                    group_score = (W1[g].pow(2) / diag[g, None].pow(2)).t()
                    maskT[g] = nm_choice(group_score, *nm, alive[:, i1 + i : i1 + i + nm[1]]).t()
                    ErrT[g] = maskT[g].to(WT.dtype)
                err = ErrT[i].mul_(W1[i]).div_(diag[i])
                if i + 1 < i2 - i1:
                    W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1)
        predicted += float(ErrT.pow(2).sum())
        W1.masked_fill_(maskT, 0.0)
        if wide:
            GR[j1:j2] = torch.flip(original - W1, (0,))
        elif i2 < d:
            WT[i2:].addmm_(U[i1:i2, i2:].t(), ErrT, alpha=-1)
        keepT[i1:i2] = ~maskT
    return Solution(WT.t().to(dtype).contiguous(), keepT.t().contiguous(), predicted)
