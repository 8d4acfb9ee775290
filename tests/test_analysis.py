"""Aggregation, Pareto fronts, performance profiles and paired comparisons, against hand
computations and brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from test_results import DATASETS, METHODS, MODEL, build_study, standard_runs

from prunelab.experiments.analysis import aggregate, paired_comparison, pareto_front, performance_profile
from prunelab.experiments.store import Store


def _records(path):
    with Store(path) as store:
        return store.records()


# --------------------------------------------------------------------------------- aggregate
def test_aggregate_means_and_sample_stds_by_hand(tmp_path):
    runs = [
        {"dataset": "d", "method": "m", "sparsity": 0.5, "seed": s, "metrics": {"accuracy": a}}
        for s, a in enumerate([0.90, 0.92, 0.97])
    ]
    runs += [{"dataset": "d", "method": "m", "sparsity": 0.2, "seed": 0, "metrics": {"accuracy": 0.99}}]
    [low, high] = aggregate(_records(build_study(tmp_path / "s.db", runs)))
    assert (low.sparsity, low.n, low.mean, low.std, low.values) == (0.2, 1, 0.99, None, (0.99,))
    assert high.sparsity == 0.5 and high.n == 3 and high.seeds == (0, 1, 2)
    assert high.mean == pytest.approx((0.90 + 0.92 + 0.97) / 3)
    mean = (0.90 + 0.92 + 0.97) / 3
    assert high.std == pytest.approx(math.sqrt(((0.90 - mean) ** 2 + (0.92 - mean) ** 2 + (0.97 - mean) ** 2) / 2))


def test_aggregate_orders_labels_by_spec_and_levels_ascending(tmp_path):
    path = build_study(tmp_path / "s.db", standard_runs()[::-1])  # spec order reversed
    groups = aggregate(_records(path))
    assert list(dict.fromkeys(g.dataset for g in groups)) == list(DATASETS[::-1])
    assert list(dict.fromkeys(g.method for g in groups)) == list(METHODS[::-1])
    assert [(g.method, g.sparsity) for g in groups if g.dataset == "mnist_rot"] == [
        ("magl2", 0.5),
        ("magl1", 0.5),
        ("magl1", 0.9),
    ]
    assert all(g.model == MODEL and g.n == 3 and g.std == pytest.approx(0.01) for g in groups)
    assert groups[0].nonzero_params == 5000 and groups[2].nonzero_params == 1000


def test_aggregate_skips_missing_and_nan_values_and_ignores_unfinished_runs(tmp_path):
    runs = [
        {"dataset": "d", "method": "m", "sparsity": 0.5, "seed": 0, "metrics": {"accuracy": 0.9, "x": None}},
        {"dataset": "d", "method": "m", "sparsity": 0.5, "seed": 1, "metrics": {"accuracy": 0.8, "x": 2.0}},
        {"dataset": "d", "method": "m", "sparsity": 0.5, "seed": 2, "metrics": {"accuracy": 0.7}},
        {"dataset": "d", "method": "m", "sparsity": 0.5, "seed": 3, "status": "failed", "error": "x"},
        {"dataset": "d", "method": "m", "sparsity": 0.5, "seed": 4, "status": "pending"},
    ]
    records = _records(build_study(tmp_path / "s.db", runs))
    [group] = aggregate(records, "x")
    assert (group.n, group.mean, group.std, group.n_missing, group.seeds) == (1, 2.0, None, 2, (1,))
    [accuracy] = aggregate(records)
    assert accuracy.n == 3 and accuracy.mean == pytest.approx(0.8) and accuracy.std == pytest.approx(0.1)


def test_aggregate_reads_infinities_back(tmp_path):
    runs = [
        {"dataset": "d", "method": "m", "sparsity": 0.5, "seed": s, "metrics": {"speedup": v}}
        for s, v in enumerate([float("inf"), 2.0])
    ]
    [group] = aggregate(_records(build_study(tmp_path / "s.db", runs)), "speedup")
    assert group.values == (math.inf, 2.0) and group.mean == math.inf and math.isnan(group.std)


def test_aggregate_rejects_unknown_and_non_numeric_metrics(tmp_path):
    records = _records(build_study(tmp_path / "s.db", standard_runs()))
    with pytest.raises(
        ValueError,
        match=r"the 'metric' parameter of aggregate must be one of: accuracy, .*"
        r"Got 'acuracy' instead \(did you mean 'accuracy'\?\)",
    ):
        aggregate(records, "acuracy")
    with pytest.raises(ValueError, match="Got 'layer_sparsity' instead"):
        aggregate(records, "layer_sparsity")
    with pytest.raises(TypeError, match="the 'records' parameter of aggregate must be a list of RunRecord"):
        aggregate("s.db")
    assert aggregate([]) == []


# ------------------------------------------------------------------------------ pareto_front
def _brute_force_front(points):
    def dominates(q, p):
        return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])

    return {i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)}


@pytest.mark.parametrize("seed", range(20))
def test_pareto_front_matches_brute_force_dominance(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    # Small integer grids make ties in params, in accuracy and exact duplicates likely.
    points = [(int(p), float(a)) for p, a in zip(rng.integers(0, 12, n), rng.integers(0, 8, n))]
    front = pareto_front(points)
    assert set(front) == _brute_force_front(points)
    assert len(front) == len(set(front))
    assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


def test_pareto_front_small_cases():
    assert pareto_front([]) == []
    assert pareto_front([(10, 0.9), (5, 0.8), (20, 0.95), (15, 0.85), (5, 0.7)]) == [1, 0, 2]
    assert pareto_front([(5, 0.8), (5, 0.8)]) == [0, 1]  # duplicates do not dominate
    assert pareto_front([(5, float("nan")), (6, 0.5)]) == [1]
    with pytest.raises(TypeError, match="sequence of \\(params, accuracy\\) pairs. Got \\(1, 2, 3\\) at index 0"):
        pareto_front([(1, 2, 3)])
    with pytest.raises(TypeError, match="the 'points' parameter of pareto_front must be a float"):
        pareto_front([(1, "x")])


# ----------------------------------------------------------------------- performance_profile
def test_performance_profile_by_hand_three_measurements_two_methods():
    # Row 0: method 0 strictly best; row 1: a tie (a win for nobody); row 2: method 1 best.
    penalties = [[1.0, 2.0], [3.0, 3.0], [5.0, 4.0]]
    profile = performance_profile(penalties, [0.0, 0.5, 1.0])
    assert profile.shape == (3, 2)
    np.testing.assert_array_equal(profile, [[1 / 3, 1 / 3], [1 / 3, 1 / 3], [0.0, 0.0]])


def test_performance_profile_by_hand_intermediate_thresholds():
    # Row 0: t(τ) = τ·0 + (1 − τ)·4 = 4 − 4τ: method 0 (0) wins for τ < 1, method 1 (1) for τ < 3/4,
    # method 2 (the max) never. Row 1 is a three-way tie.
    profile = performance_profile(np.array([[0.0, 1.0, 4.0], [2.0, 2.0, 2.0]]), [0.0, 0.5, 0.75, 0.8, 1.0])
    np.testing.assert_array_equal(profile, [[0.5, 0.5, 0], [0.5, 0.5, 0], [0.5, 0, 0], [0.5, 0, 0], [0, 0, 0]])


def test_performance_profile_is_non_increasing_in_tau_and_matches_a_loop():
    rng = np.random.default_rng(0)
    penalties = rng.normal(size=(40, 5)).round(1)  # rounding makes ties
    taus = np.linspace(0, 1, 21)
    profile = performance_profile(penalties, taus)
    assert np.all(np.diff(profile, axis=0) <= 0)
    for k, tau in enumerate(taus):
        for i in range(5):
            wins = sum(penalties[j, i] < tau * penalties[j].min() + (1 - tau) * penalties[j].max() for j in range(40))
            assert profile[k, i] == wins / 40


def test_performance_profile_nan_never_wins_and_infinities_are_handled():
    profile = performance_profile([[np.nan, 1.0], [1.0, 2.0]], [0.0, 1.0])
    np.testing.assert_array_equal(profile, [[0.5, 0.0], [0.0, 0.0]])
    profile = performance_profile([[1.0, np.inf]], [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(profile, [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])


def test_performance_profile_bad_input():
    with pytest.raises(
        ValueError,
        match=r"must be a non-empty 2-D array \(n_measurements, n_methods\). "
        r"Got shape \(3,\)",
    ):
        performance_profile([1.0, 2.0, 3.0], [0.5])
    with pytest.raises(
        ValueError,
        match=r"the 'taus' parameter of performance_profile must be a float in \[0, 1\]. "
        r"Got 1.5 instead",
    ):
        performance_profile([[1.0, 2.0]], [0.5, 1.5])


# ------------------------------------------------------------------------- paired_comparison
A = [0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96]
DIFF = [0.01, 0.02, -0.01, 0.03, 0.0, 0.02, 0.01]


def _paired_study(tmp_path, n=len(A)):
    runs = []
    for seed in range(n):
        for method, value in (("a", A[seed]), ("b", A[seed] - DIFF[seed]), ("c", 0.5)):
            runs.append(
                {"dataset": "d", "method": method, "sparsity": 0.9, "seed": seed, "metrics": {"accuracy": value}}
            )
    runs.append({"dataset": "other", "method": "lonely", "sparsity": 0.9, "seed": 0, "metrics": {"accuracy": 0.1}})
    return _records(build_study(tmp_path / f"p{n}.db", runs))


def test_paired_comparison_matches_scipy_on_a_hand_example(tmp_path):
    result = paired_comparison(_paired_study(tmp_path), "a", "b")
    a = np.array(A)
    b = a - np.array(DIFF)
    delta = a - b
    assert result["n_pairs"] == 7
    assert result["mean_difference"] == pytest.approx(0.08 / 7)
    assert result["std"] == pytest.approx(np.std(delta, ddof=1))
    assert (result["wins"], result["losses"], result["ties"]) == (5, 1, 1)
    reference = stats.ttest_rel(a, b)
    assert result["t_pvalue"] == pytest.approx(reference.pvalue)
    low, high = reference.confidence_interval(0.95)
    assert result["ci95"] == pytest.approx((low, high))
    assert result["wilcoxon_pvalue"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert result["mean_a"] == pytest.approx(a.mean()) and result["mean_b"] == pytest.approx(b.mean())


def test_paired_comparison_small_and_degenerate_samples(tmp_path):
    few = paired_comparison(_paired_study(tmp_path, n=5), "a", "b")
    assert few["n_pairs"] == 5 and few["wilcoxon_pvalue"] is None and few["t_pvalue"] is not None
    one = paired_comparison(_paired_study(tmp_path, n=1), "a", "b")
    assert (one["std"], one["ci95"], one["t_pvalue"], one["wilcoxon_pvalue"]) == (None, None, None, None)
    runs = [
        {"dataset": "d", "method": m, "sparsity": 0.5, "seed": s, "metrics": {"accuracy": 0.9}}
        for s in range(8)
        for m in ("x", "y")
    ]
    same = paired_comparison(_records(build_study(tmp_path / "same.db", runs)), "x", "y")
    assert same["ties"] == 8 and same["mean_difference"] == 0.0
    assert same["t_pvalue"] is None and same["wilcoxon_pvalue"] is None


def test_paired_comparison_errors_name_the_methods_present(tmp_path):
    records = _paired_study(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"no finished runs of 'a' and 'lonely' share a \(dataset, model, sparsity, "
        r"seed\).*methods present: a, b, c, lonely",
    ):
        paired_comparison(records, "a", "lonely")
    with pytest.raises(
        ValueError,
        match=r"the 'method_b' parameter of paired_comparison must be one of the "
        r"finished runs' methods: a, b, c, lonely. Got 'obd' instead",
    ):
        paired_comparison(records, "a", "obd")
    with pytest.raises(ValueError, match="two different methods. Got 'a' twice"):
        paired_comparison(records, "a", "a")
