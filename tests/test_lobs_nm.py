"""N:M patterns inside the three OBS solvers (issue 17): every group keeps at most N, entries pruned
before stay pruned, the bias column is never pruned, and obs-exact's prediction is its measured error."""

import itertools

import pytest
import torch

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
    prunable = torch.ones(16, dtype=torch.bool)
    alive = torch.ones_like(W, dtype=torch.bool)
    alive[0, :3] = False
    fn = {
        "lobs": lobs.solve,
        "obs-exact": obs_exact.solve,
        "obs-fast": lambda *a, **k: obs_fast.solve(*a, block_size=8, **k),
    }[solver]
    s = fn(W, H, 0, prunable, alive, nm=nm)
    n, m = nm
    kept = s.keep.reshape(6, -1, m).sum(dim=2)
    assert (kept <= n).all()
    assert (kept[1:] == n).all()  # rows with nothing pruned before keep exactly n
    assert not s.keep[0, :3].any()
    assert (s.W[~s.keep] == 0).all()


def test_exact_nm_beats_or_matches_magnitude_choice():
    X, H, W = problem(1)
    prunable = torch.ones(16, dtype=torch.bool)
    alive = torch.ones_like(W, dtype=torch.bool)
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
    prunable = torch.ones(4, dtype=torch.bool)
    alive = torch.ones_like(W, dtype=torch.bool)
    s = obs_exact.solve(W, H, 0, prunable, alive, nm=(2, 4))
    best = min(
        err(obs_exact.optimal_row(W[0], H, torch.tensor([i not in c for i in range(4)]))[None], W, H)
        for c in itertools.combinations(range(4), 2)
    )
    assert s.predicted == pytest.approx(err(s.W, W, H), rel=1e-6)
    assert err(s.W, W, H) >= best - 1e-12


def test_bias_column_never_pruned_with_nm():
    X, H, W = problem(3, d=9)
    prunable = torch.ones(9, dtype=torch.bool)
    prunable[8] = False
    alive = torch.ones_like(W, dtype=torch.bool)
    for fn in (lobs.solve, obs_exact.solve, lambda *a, **k: obs_fast.solve(*a, block_size=4, **k)):
        s = fn(W, H, 0, prunable, alive, nm=(2, 4))
        assert s.keep[:, 8].all()
        assert (s.keep[:, :8].reshape(6, 2, 4).sum(dim=2) == 2).all()


# --------------------------------------------------------------- through the Pruner, on the zoo
import warnings  # noqa: E402

from zoo import zoo_params  # noqa: E402

from prunelab.pruning import Pruner, prune  # noqa: E402
from prunelab.pruning.granularity import PatternSkipped, nm_view  # noqa: E402


def _runs_hold(pruner, n, m):
    for t in pruner.targets:
        if t.name in pruner.criterion.skipped:
            continue
        runs = (
            (nm_view(t.weight.detach(), t.layout) != 0)
            .reshape(t.weight.shape[0] if t.layout != "transposed" else t.weight.shape[1], -1, m)
            .sum(-1)
        )
        assert (runs <= n).all(), t.name
        assert (runs == n).float().mean() > 0.9, t.name  # dense weights: nearly every run is full


@pytest.mark.parametrize("zoo", zoo_params())
def test_obs_fast_two_four_on_every_zoo_model(zoo):
    model = zoo.build(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternSkipped)
        pruner = prune(model, None, criterion="obs-fast", granularity="2:4", data=zoo.batches(2, 0, 4))
    _runs_hold(pruner, 2, 4)
    assert pruner.sparsity() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("criterion", ["lobs", "obs-exact"])
@pytest.mark.parametrize("zoo", zoo_params(["resnet18", "hf-llama"]))
def test_other_solvers_four_eight_through_the_pruner(zoo, criterion):
    model = zoo.build(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternSkipped)
        pruner = prune(model, 0.5, criterion=criterion, granularity="4:8", data=zoo.batches(2, 0, 4))
    _runs_hold(pruner, 4, 8)


def test_default_layers_that_cannot_hold_the_pattern_are_left_dense_named_ones_refused():
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(PatternSkipped, match=r"leaves 1 layer.*0\.weight"):
        pruner = prune(model, None, criterion="obs-fast", granularity="2:4", data=[(x,)])
    assert list(pruner.pattern_skipped) == ["0.weight"]
    assert (model[0].weight != 0).all()
    _runs_hold(pruner, 2, 4)
    with pytest.raises(ValueError, match="'0.weight'.*3 input channels"):
        Pruner(model, None, criterion="obs-fast", granularity="2:4", layers=["0", "2"])


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"criterion": {"name": "lobs", "epsilon": 0.1}}, "leave out the tolerable error"),
        (
            {"criterion": "obs-fast", "schedule": "agp", "schedule_args": {"n_prunes": 3, "every": 1}},
            "use schedule 'one-shot'",
        ),
        ({"criterion": "obs-fast", "scope": "row"}, "scope 'row'"),
    ],
)
def test_solver_pattern_refusals(kwargs, pattern):
    from torch import nn

    with pytest.raises(ValueError, match=pattern):
        Pruner(nn.Sequential(nn.Linear(8, 4)), None, granularity="2:4", calibration=[(torch.randn(4, 8),)], **kwargs)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_obs_fast_left_looking_float32_path_matches_the_float64_sweep(monkeypatch, nm):
    # layers wider than FLOAT64_UP_TO never form U: each block gets the earlier blocks' compensation
    # from the Cholesky factor of the reversed H; same masks and weights as the float64 U sweep
    X, H, W = problem(4, rows=5, d=40, n=400)
    prunable = torch.ones(40, dtype=torch.bool)
    prunable[39] = False
    alive = torch.ones_like(W, dtype=torch.bool)
    alive[1, 5:9] = False
    exact = obs_fast.solve(W, H, 90, prunable, alive, block_size=8, nm=nm)
    monkeypatch.setattr(obs_fast, "FLOAT64_UP_TO", 16)
    wide = obs_fast.solve(W, H, 90, prunable, alive, block_size=8, nm=nm)
    assert torch.equal(wide.keep, exact.keep)
    torch.testing.assert_close(wide.W, exact.W, rtol=1e-4, atol=1e-4)
    assert wide.predicted == pytest.approx(exact.predicted, rel=1e-4)
    assert not wide.keep[1, 5:9].any() and wide.keep[:, 39].all()
