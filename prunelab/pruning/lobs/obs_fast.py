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
"""

from __future__ import annotations

import torch

from prunelab.pruning.lobs.common import Solution, inverse

FLOAT64_UP_TO = 1024


def upper_factor_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """U upper triangular with ``H⁻¹ = Uᵀ U``, from the Cholesky factor of the reversed H."""
    L = torch.linalg.cholesky(torch.flip(H, (0, 1)))
    return torch.flip(lower_inverse(L), (0, 1))               # a flip copies: rows are read one by one


def lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` of a lower-triangular L by halves, ``[[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹BA⁻¹, C⁻¹]]``:
    matrix products instead of a triangular solve with d right-hand sides."""
    n = len(L)
    if n <= 256:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = n // 2
    A_inv, C_inv = lower_inverse(L[:h, :h]), lower_inverse(L[h:, h:])
    out = torch.zeros(L.shape, dtype=L.dtype, device=L.device)
    out[:h, :h], out[h:, h:] = A_inv, C_inv
    out[h:, :h] = -(C_inv @ (L[h:, :h] @ A_inv))
    return out


class _one_thread:
    """Run a block of small tensor operations on one thread (on a busy machine each parallel
    element-wise step can wait milliseconds for its second thread); the results are the same."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def solve(W: torch.Tensor, H: torch.Tensor, n_prune: int, prunable: torch.Tensor,
          alive: torch.Tensor, block_size: int = 128) -> Solution:
    rows, d = W.shape
    dtype = W.dtype
    if d > FLOAT64_UP_TO:
        U = upper_factor_of_inverse(H.float())
        W = W.float()
    else:
        U = torch.linalg.cholesky(inverse(H), upper=True).contiguous()
    W = W.clone()
    keep = torch.ones_like(alive)
    fraction = int(n_prune) / max(1, rows * int(prunable.sum()))
    predicted = 0.0
    seen, taken = 0, 0          # prunable entries so far, pruned so far: round the running target
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        score = W1.pow(2) / torch.diagonal(U1).pow(2)[None, :]
        block_prunable = prunable[i1:i2].expand_as(W1)
        score = torch.where(block_prunable, score, torch.full_like(score, float("inf")))
        score = torch.where(alive[:, i1:i2], score, torch.full_like(score, float("-inf")))
        seen += int(block_prunable.sum())
        n_block = max(round(fraction * seen) - taken, int((~alive[:, i1:i2]).sum()), 0)
        taken += n_block
        mask1 = torch.zeros(W1.numel(), dtype=torch.bool)
        mask1[torch.argsort(score.flatten(), stable=True)[:n_block]] = True
        mask1 = mask1.reshape(W1.shape) & block_prunable
        with _one_thread():         # thousands of small element-wise steps: no thread hand-offs
            for i in range(i2 - i1):
                w = W1[:, i]
                q = torch.where(mask1[:, i], torch.zeros_like(w), w)
                err = (w - q) / U1[i, i]
                predicted += float(err.pow(2).sum())
                W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
                W1[:, i] = q
                Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        keep[:, i1:i2] = ~mask1
    return Solution(W.to(dtype), keep, predicted)
