"""Statistics over a study's runs: aggregation over seeds, Pareto fronts,
performance profiles and paired comparisons of two methods.

* :func:`aggregate` — mean and sample standard deviation over seeds of one
  metric, per (dataset, model, method, sparsity level).
* :func:`pareto_front` — the (parameters, accuracy) points no other point beats
  on both counts (Study A's "Pareto front of the conv baselines").
* :func:`performance_profile` — Dolan & Moré (2002) profiles in the threshold
  form of docs/methods.md §5 (Evci et al. 2019's comparison of pruning scorers).
* :func:`paired_comparison` — two methods on the same (dataset, model, level,
  seed): mean difference, t-interval, paired t-test and Wilcoxon signed-rank test.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from prunelab._validation import check_number, check_type
from prunelab.results.records import check_metric, label_values, metric_value
from prunelab.store import RunRecord

_GROUP_KEY = ("dataset", "model", "method", "sparsity")


@dataclass(frozen=True)
class Group:
    """One metric over the seeds of a (dataset, model, method, sparsity) cell.

    ``values`` are the finite-or-infinite values in seed order (runs whose value
    is missing or NaN are left out and counted in ``n_missing``); ``n = len(values)``;
    ``mean = Σx/n``; ``std`` is the sample standard deviation
    ``sqrt(Σ(x − mean)²/(n − 1))`` (Bessel's correction), ``None`` when ``n < 2``;
    ``mean`` is ``None`` when ``n = 0``. ``nonzero_params`` is the mean of the
    runs' ``nonzero_params`` metric (``None`` if no run has it).
    """

    dataset: str
    model: str
    method: str
    sparsity: float
    n: int
    mean: float | None
    std: float | None
    values: tuple[float, ...]
    seeds: tuple[int, ...]
    n_missing: int
    nonzero_params: float | None


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """``(mean, sample std)``; ``(None, None)`` for no values, std ``None`` for one."""
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    if any(math.isinf(v) for v in values):
        return mean, math.nan
    return mean, statistics.stdev(values)


def _done(records: Iterable[RunRecord], where: str) -> list[RunRecord]:
    records = list(check_type("records", records, (list, tuple), where=where, expected="a list of RunRecord"))
    for record in records:
        check_type("records", record, RunRecord, where=where, expected="a list of RunRecord")
    return [r for r in records if r.status == "done"]


def aggregate(records: Sequence[RunRecord], metric: str = "accuracy") -> list[Group]:
    """Group finished runs by (dataset, model, method, sparsity) and summarise ``metric`` over seeds.

    Groups come in label order: datasets, models and methods in first-appearance
    (spec) order, sparsity levels ascending. Runs that are not ``done`` are
    ignored. ``metric`` must be a numeric metric of at least one finished run.
    """
    done = _done(records, "aggregate")
    if not done:
        return []
    metric = check_metric(done, metric, where="aggregate")
    cells: dict[tuple, list[RunRecord]] = {}
    for record in done:
        cells.setdefault(tuple(getattr(record, k) for k in _GROUP_KEY), []).append(record)
    order = {k: {v: i for i, v in enumerate(label_values(done, k))} for k in _GROUP_KEY}
    groups = []
    for key in sorted(cells, key=lambda key: tuple(order[k][v] for k, v in zip(_GROUP_KEY, key))):
        runs = sorted(cells[key], key=lambda r: r.seed)
        kept = [(r.seed, metric_value(r, metric)) for r in runs]
        kept = [(seed, v) for seed, v in kept if not math.isnan(v)]
        values = tuple(v for _, v in kept)
        mean, std = mean_std(values)
        params = [metric_value(r, "nonzero_params") for r in runs]
        params = [p for p in params if not math.isnan(p)]
        dataset, model, method, sparsity = key
        groups.append(
            Group(
                dataset,
                model,
                method,
                sparsity,
                n=len(values),
                mean=mean,
                std=std,
                values=values,
                seeds=tuple(seed for seed, _ in kept),
                n_missing=len(runs) - len(values),
                nonzero_params=math.fsum(params) / len(params) if params else None,
            )
        )
    return groups


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated ``(params, accuracy)`` points, sorted by params.

    Point *j* dominates point *i* when ``params_j ≤ params_i`` and
    ``accuracy_j ≥ accuracy_i`` with at least one inequality strict (fewer
    parameters and higher accuracy are better). Identical points do not dominate
    each other, so duplicates on the front are all returned (in index order).
    Points with a NaN coordinate are never on the front. O(n log n): sort by
    params, then keep each params value's best accuracy if it beats every
    smaller model's.
    """
    coords = []
    for i, point in enumerate(points):
        if isinstance(point, (str, bytes)) or not isinstance(point, Sequence) or len(point) != 2:
            raise TypeError(
                f"the 'points' parameter of pareto_front must be a sequence of "
                f"(params, accuracy) pairs. Got {point!r} at index {i} instead."
            )
        p, a = (check_number("points", v, where="pareto_front") if not _is_nan(v) else math.nan for v in point)
        coords.append((p, a))
    candidates = sorted(
        (i for i, (p, a) in enumerate(coords) if not (math.isnan(p) or math.isnan(a))),
        key=lambda i: (coords[i][0], -coords[i][1], i),
    )
    front, best, k = [], -math.inf, 0
    while k < len(candidates):
        params = coords[candidates[k]][0]
        same = [i for i in candidates[k:] if coords[i][0] == params]
        top = coords[same[0]][1]
        if top > best:
            front += [i for i in same if coords[i][1] == top]
            best = top
        k += len(same)
    return front


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def performance_profile(penalties, taus) -> np.ndarray:
    """Performance profiles (Dolan & Moré 2002) in the threshold form of docs/methods.md §5.

    ``penalties[j, i] = d_ij`` is method *i*'s penalty on measurement *j*
    (lower is better). For each τ in ``taus`` (each in [0, 1]) and measurement *j*
    the threshold is ``t_j(τ) = τ·min_i d_ij + (1 − τ)·max_i d_ij``, and method *i*
    scores ``P_i(τ) = #{j : d_ij < t_j(τ)} / n_measurements``. Returns an array of
    shape ``(len(taus), n_methods)``.

    τ = 0 puts the threshold at the worst penalty (``P_i(0)`` = fraction of
    measurements where *i* is not among the worst), τ = 1 at the best, where the
    strict ``<`` gives ``P_i(1) = 0``; ``P_i`` never increases with τ.

    Ties: the comparison is the strict ``<`` of docs/methods.md §5 (Evci et al. 2019).
    A measurement on which all methods tie (``min = max = t_j``) therefore counts
    as a win for *no* method: it says nothing about their ranking, and since it
    lowers every curve by the same ``1/n_measurements``, comparisons between
    methods are unchanged. It stays in the denominator so that all curves share it.
    NaN penalties (failed measurements) never win; the min/max ignore them.
    """
    d = np.asarray(penalties, dtype=float)
    if d.ndim != 2 or d.shape[0] == 0 or d.shape[1] == 0:
        raise ValueError(
            f"the 'penalties' parameter of performance_profile must be a non-empty 2-D array "
            f"(n_measurements, n_methods). Got shape {d.shape} instead."
        )
    tau = np.asarray(
        [
            check_number("taus", t, where="performance_profile", low=0.0, high=1.0)
            for t in np.atleast_1d(np.asarray(taus, dtype=object))
        ],
        dtype=float,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: their threshold is NaN, no wins
        low, high = np.nanmin(d, axis=1), np.nanmax(d, axis=1)
    # The endpoints exactly, so that infinite penalties give inf thresholds, not 0·inf = NaN.
    with np.errstate(invalid="ignore"):
        mixed = tau[:, None] * low[None, :] + (1.0 - tau[:, None]) * high[None, :]
    t = np.where(tau[:, None] == 1.0, low[None, :], np.where(tau[:, None] == 0.0, high[None, :], mixed))
    with np.errstate(invalid="ignore"):
        wins = d[None, :, :] < t[:, :, None]  # (taus, measurements, methods)
    return wins.mean(axis=1)


def paired_comparison(records: Sequence[RunRecord], method_a: str, method_b: str, metric: str = "accuracy") -> dict:
    """Compare two methods on runs that share (dataset, model, sparsity, seed).

    With differences ``δ_k = a_k − b_k`` over the n pairs (pairs where either
    value is missing or NaN are dropped):

    * ``mean_difference = δ̄``, ``std`` = sample std ``s`` of δ (``None`` if n < 2);
    * ``ci95 = δ̄ ± t_{0.975, n−1}·s/√n`` (Student's t; ``None`` if n < 2);
    * ``t_pvalue``: two-sided paired t-test (``scipy.stats.ttest_rel``; ``None`` if n < 2
      or all differences are equal, where the statistic is undefined);
    * ``wilcoxon_pvalue``: two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``,
      zero differences dropped; ``None`` if n < 6 or all differences are zero — with
      fewer than 6 pairs no outcome reaches p < 0.05);
    * ``wins`` / ``losses`` / ``ties``: pairs with a > b, a < b, a = b.

    Also returned: ``method_a``, ``method_b``, ``metric``, ``n_pairs``, ``mean_a``, ``mean_b``.
    """
    from scipy import stats

    done = _done(records, "paired_comparison")
    methods = label_values(done, "method")
    if method_a == method_b:
        raise ValueError(f"paired_comparison needs two different methods. Got {method_a!r} twice.")
    for param, method in (("method_a", method_a), ("method_b", method_b)):
        if method not in methods:
            raise ValueError(
                f"the '{param}' parameter of paired_comparison must be one of the finished "
                f"runs' methods: {', '.join(map(str, methods)) or 'none'}. Got {method!r} instead."
            )
    metric = check_metric(done, metric, where="paired_comparison")
    by_key: dict[tuple, dict[str, float]] = {}
    for record in done:
        if record.method not in (method_a, method_b):
            continue
        key = (record.dataset, record.model, record.sparsity, record.seed)
        cell = by_key.setdefault(key, {})
        if record.method in cell:
            raise ValueError(
                f"paired_comparison: two finished runs of {record.method!r} share "
                f"(dataset, model, sparsity, seed) = {key}; pairing is ambiguous."
            )
        cell[record.method] = metric_value(record, metric)
    pairs = [
        (c[method_a], c[method_b])
        for c in by_key.values()
        if method_a in c and method_b in c and not (math.isnan(c[method_a]) or math.isnan(c[method_b]))
    ]
    if not pairs:
        raise ValueError(
            f"paired_comparison: no finished runs of {method_a!r} and {method_b!r} share a "
            f"(dataset, model, sparsity, seed) with a value of {metric!r}; "
            f"methods present: {', '.join(map(str, methods))}."
        )
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    delta = a - b
    n = len(delta)
    mean, std = mean_std([float(x) for x in delta])
    ci95 = t_p = wilcoxon_p = None
    if n >= 2:
        half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
        ci95 = (float(mean - half), float(mean + half))
        if np.ptp(delta) > 0:
            t_p = float(stats.ttest_rel(a, b).pvalue)
    if n >= 6 and np.any(delta != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns when it falls back to the normal approximation
            wilcoxon_p = float(stats.wilcoxon(a, b).pvalue)
    return {
        "method_a": method_a,
        "method_b": method_b,
        "metric": metric,
        "n_pairs": n,
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "mean_difference": mean,
        "std": std,
        "ci95": ci95,
        "t_pvalue": t_p,
        "wilcoxon_pvalue": wilcoxon_p,
        "wins": int((delta > 0).sum()),
        "losses": int((delta < 0).sum()),
        "ties": int((delta == 0).sum()),
    }
