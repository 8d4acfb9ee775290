"""Structured OBS: remove whole input columns — an input unit of a Linear layer, an
input channel (its kh·kw block of columns) of a Conv2d — with the block OBS update.

Removing a group G of columns from every row, with optimal compensation of the rest
(Hassibi & Stork 1993; Kuznedelev et al. 2023 for groups), costs

    ΔE = Σ_rows w_Gᵀ ([H⁻¹]_GG)⁻¹ w_G

and moves the weights by ``δW = −W[:, G] ([H⁻¹]_GG)⁻¹ H⁻¹[G, :]``. The inverse is then
down-dated, ``H⁻¹ ← H⁻¹ − H⁻¹[:, G] ([H⁻¹]_GG)⁻¹ H⁻¹[G, :]``, and the greedy picks the next
cheapest group. All rows share the mask, so one inverse serves the whole layer.
"""

from __future__ import annotations

import torch

from prunelab.pruning.lobs.common import Solution, inverse


def solve(
    W: torch.Tensor, H: torch.Tensor, n_groups: int, group_size: int, n_inputs: int, alive_groups: torch.Tensor
) -> Solution:
    """Remove ``n_groups`` of the ``n_inputs`` groups (columns ``g·group_size … +group_size``;
    columns past ``n_inputs·group_size``, e.g. the bias, are never removed)."""
    rows, d = W.shape
    W = W.clone()
    inv = inverse(H)
    groups = torch.arange(n_inputs * group_size).reshape(n_inputs, group_size)
    gone = ~alive_groups.clone()
    for g in torch.nonzero(gone).flatten().tolist():  # pruned before: fix them at zero first
        W, inv, _ = _remove(W, inv, groups[g])
    predicted = 0.0
    for _ in range(max(0, int(n_groups) - int(gone.sum()))):
        left = torch.nonzero(~gone).flatten()  # removed groups' blocks are zero now
        g = int(left[torch.argmin(_costs(W, inv, groups[left]))])
        W, inv, delta = _remove(W, inv, groups[g])
        predicted += delta
        gone[g] = True
    keep = torch.ones(rows, d, dtype=torch.bool)
    keep[:, groups[gone].flatten()] = False
    return Solution(W, keep, predicted)


def _costs(W: torch.Tensor, inv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """ΔE of removing each group, batched: Σ_rows w_Gᵀ (H⁻¹_GG)⁻¹ w_G."""
    blocks = inv[groups[:, :, None], groups[:, None, :]]  # (G, g, g)
    wg = W[:, groups].permute(1, 0, 2)  # (G, rows, g)
    solved = torch.linalg.solve(blocks, wg.transpose(1, 2))  # (G, g, rows)
    return (wg.transpose(1, 2) * solved).sum(dim=(1, 2))


def _remove(W, inv, cols):
    block = inv[cols[:, None], cols[None, :]]
    coef = torch.linalg.solve(block, W[:, cols].T).T  # W_G (H⁻¹_GG)⁻¹
    delta = float((W[:, cols] * coef).sum())
    W = W - coef @ inv[cols, :]
    W[:, cols] = 0.0
    inv = inv - inv[:, cols] @ torch.linalg.solve(block, inv[cols, :])
    return W, inv, delta
