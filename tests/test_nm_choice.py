"""N:M inside the OBS solvers prunes the m − n entries of each group whose removal costs least
(regression: the choice was inverted, so obs-fast and lobs with 2:4 pruned the most costly ones)."""

import torch

from prunelab.pruning.granularity import nm_keep
from prunelab.pruning.lobs import lobs, obs_fast
from prunelab.pruning.lobs.common import nm_choice


def problem(seed=0, rows=8, d=32, n=256):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    H = X.T @ X / n + 1e-3 * torch.eye(d, dtype=torch.float64)
    return H, torch.randn(rows, d, generator=g, dtype=torch.float64)


def err(Wn, W, H):
    D = Wn - W
    return float(torch.einsum("ri,ij,rj->", D, H, D))


def test_nm_choice_prunes_the_lowest_scores_of_each_group_and_every_dead_entry():
    score = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 5.0, 7.0, 6.0]])
    alive = torch.ones_like(score, dtype=torch.bool)
    assert nm_choice(score, 2, 4, alive).tolist() == [[True, False, True, False, False, True, False, True]]
    alive[0, 1] = False  # dead: pruned, and the group keeps its best alive one more
    assert nm_choice(score, 2, 4, alive).tolist() == [[True, True, False, False, False, True, False, True]]


def test_obs_fast_nm_beats_magnitude_nm_without_compensation():
    H, W = problem()
    prunable = torch.ones(W.shape[1], dtype=torch.bool)
    alive = torch.ones_like(W, dtype=torch.bool)
    magnitude = W * nm_keep(W.abs(), 2, 4)  # the 2 largest of every 4, not compensated
    for block_size in (4, 8, 32):
        s = obs_fast.solve(W, H, 0, prunable, alive, block_size=block_size, nm=(2, 4))
        assert err(s.W, W, H) < err(magnitude, W, H)


def test_lobs_nm_prunes_the_cheapest_entries_of_each_group():
    H, W = problem(1)
    prunable = torch.ones(W.shape[1], dtype=torch.bool)
    alive = torch.ones_like(W, dtype=torch.bool)
    s = lobs.solve(W, H, 0, prunable, alive, nm=(2, 4))
    L = (W.pow(2) / (2 * torch.diagonal(torch.linalg.inv(H)))).reshape(W.shape[0], -1, 4)
    pruned = (~s.keep).reshape(L.shape)
    assert (pruned.sum(-1) == 2).all()
    worst_pruned = L.masked_fill(~pruned, float("-inf")).amax(-1)
    best_kept = L.masked_fill(pruned, float("inf")).amin(-1)
    assert (worst_pruned <= best_kept).all()
