"""N:M patterns inside the three OBS solvers (issue 17): every group keeps at most N, entries pruned
before stay pruned, the bias column is never pruned, and obs-exact's prediction is its measured error."""

import itertools, torch, pytest
from prunelab.pruning.lobs import lobs, obs_exact, obs_fast
from prunelab.pruning.lobs.common import nm_choice

def problem(seed=0, rows=6, d=16, n=64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    H = X.T @ X / n + 1e-3 * torch.eye(d, dtype=torch.float64)
    W = torch.randn(rows, d, generator=g, dtype=torch.float64)
    return X, H, W

def err(Wn, W, H):
    D = Wn - W
    return float(torch.einsum("ri,ij,rj->", D, H, D))

@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("solver", ["lobs", "obs-exact", "obs-fast"])
def test_pattern(solver, nm):
    X, H, W = problem()
    prunable = torch.ones(16, dtype=torch.bool); alive = torch.ones_like(W, dtype=torch.bool)
    alive[0, :3] = False
    fn = {"lobs": lobs.solve, "obs-exact": obs_exact.solve, "obs-fast": lambda *a, **k: obs_fast.solve(*a, block_size=8, **k)}[solver]
    s = fn(W, H, 0, prunable, alive, nm=nm)
    n, m = nm
    kept = s.keep.reshape(6, -1, m).sum(dim=2)
    assert (kept <= n).all()
    assert (kept[1:] == n).all()             # rows with nothing pruned before keep exactly n
    assert not s.keep[0, :3].any()
    assert (s.W[~s.keep] == 0).all()

def test_exact_nm_beats_or_matches_magnitude_choice():
    X, H, W = problem(1)
    prunable = torch.ones(16, dtype=torch.bool); alive = torch.ones_like(W, dtype=torch.bool)
    s = obs_exact.solve(W, H, 0, prunable, alive, nm=(2, 4))
    mag = ~nm_choice(W.abs(), 2, 4, alive)
    best_mag = torch.stack([obs_exact.optimal_row(W[r], H, mag[r]) for r in range(6)])
    assert err(s.W, W, H) <= err(best_mag, W, H) + 1e-12
    # predicted equals the measured error of the exact optimum for the mask
    assert s.predicted == pytest.approx(err(s.W, W, H), rel=1e-6)

def test_exact_nm_one_group_is_exhaustive():
    # one row, one group of 4, 2:4 - the greedy's two-step path vs all 6 masks: greedy is not always optimal,
    # but its prediction must equal the measured error of its mask
    X, H, W = problem(2, rows=1, d=4)
    prunable = torch.ones(4, dtype=torch.bool); alive = torch.ones_like(W, dtype=torch.bool)
    s = obs_exact.solve(W, H, 0, prunable, alive, nm=(2, 4))
    best = min(err(obs_exact.optimal_row(W[0], H, torch.tensor([i not in c for i in range(4)]))[None], W, H)
               for c in itertools.combinations(range(4), 2))
    assert s.predicted == pytest.approx(err(s.W, W, H), rel=1e-6)
    assert err(s.W, W, H) >= best - 1e-12

def test_bias_column_never_pruned_with_nm():
    X, H, W = problem(3, d=9)
    prunable = torch.ones(9, dtype=torch.bool); prunable[8] = False
    alive = torch.ones_like(W, dtype=torch.bool)
    for fn in (lobs.solve, obs_exact.solve, lambda *a, **k: obs_fast.solve(*a, block_size=4, **k)):
        s = fn(W, H, 0, prunable, alive, nm=(2, 4))
        assert s.keep[:, 8].all()
        assert (s.keep[:, :8].reshape(6, 2, 4).sum(dim=2) == 2).all()
