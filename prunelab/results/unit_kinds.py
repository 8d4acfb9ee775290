"""Study B's figures and tables: unit pruning with mean replacement (docs/methods.md §5).

Two run tasks feed them. A ``unit-penalty`` run (one per dataset × model × seed)
trains a model and, every N steps, prunes copies of it with each method; its
``metrics["probes"]`` lists one entry per (step, method, layers, fraction or
count, finetune_steps) with the *pruning penalty* ``d = loss_after − loss_before``
on a fixed calibration subset, ``metrics["selections"]`` lists the units each
scorer chose and ``metrics["units_total"]`` the units of each layer. A
``unit-iterative`` run (one per method and seed) removes 1 % of the units per
step with fine-tuning between; ``metrics["iterative"]`` lists ``{removed, step,
loss, accuracy}``.

The 12 methods are the 6 scorers ``rand``, ``norm``, ``rs``, ``abs_rs``, ``mrs``,
``abs_mrs``, each without or with mean replacement (the ``bp_`` prefix). Every
figure draws a scorer in the same colour, solid with mean replacement, dashed
without. A *setting* is a probe's (layers, amount, finetune_steps), where the
amount is a fraction of the layers' units or a count of units (``count: 1`` =
"one unit"); a *measurement* is one (run, step, setting): the 12 methods'
penalties on the same model copy.

Figure kinds (registered in :data:`~prunelab.results.figures.FIGURES`):
``penalty_curves``, ``mean_replacement_scatter``, ``performance_profile``,
``units_selected``, ``iterative_pruning``. Table kinds (registered in
:data:`~prunelab.results.tables.TABLE_KINDS`): ``penalties`` and
``iterative``. Each function's docstring states what it shows and how; the
declaration keys are listed in ``docs/unit-results.md``.

Probe filters, shared by the probe figures and the ``penalties`` table (each
a value or a list; values must be among those probed): ``methods``,
``layers``, ``fraction``, ``count``, ``finetune_steps``, ``dataset``, ``model``.
``fraction`` and ``count`` together keep the probes of either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prunelab._validation import check_choice, check_number
from prunelab.results.analysis import mean_std, performance_profile
from prunelab.results.figures import DPI, FIGURE_KEYS, PANEL_SIZE, figure_kind, figure_name, panel_grid
from prunelab.results.records import (
    NoDataError,
    check_keys,
    format_level,
    is_percent_metric,
    number,
    raise_problems,
    slug,
)
from prunelab.results.tables import Cell, Table, digits_and_title, table_kind
from prunelab.store import RunRecord
from prunelab.units.scoring import SCORERS  # the six scorers; each also with mean replacement (bp_)

MR_PREFIX = "bp_"  # "bias propagation": the method with mean replacement
METHODS = tuple(m for s in SCORERS for m in (s, MR_PREFIX + s))
LAYER_ORDER = ("all", "first_conv", "middle_conv", "last_conv", "first_dense")
SETTINGS = ("layers", "amount", "finetune_steps")
MAX_PANELS = 24  # panels drawn per figure; the rest are named in the suptitle
CONFIDENCE = 0.95
DEFAULT_TAUS = 101
DEFAULT_REMOVED = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DECADES_FOR_LOG = 2  # log: auto turns a log axis on when |values| span this many decades
TOLERANCE = 1e-6  # fractions of units removed closer than this are the same level
PROBE_FILTERS = ("methods", "layers", "fraction", "count", "finetune_steps", "dataset", "model")
PROFILE_SPLITS = SETTINGS
PENALTY_COLUMNS = ("amount", "layers", "finetune_steps", "step", "dataset", "model")
ITERATIVE_METRICS = ("loss", "accuracy")
_SCORER_COLORS = {
    "rand": "tab:gray",
    "norm": "tab:blue",
    "rs": "tab:orange",
    "abs_rs": "tab:green",
    "mrs": "tab:red",
    "abs_mrs": "tab:purple",
}
_OTHER_COLORS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan")


# ----------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Probe:
    """One method's pruning penalty at one measurement (run, step, setting)."""

    run: str
    dataset: str
    model: str
    seed: int
    step: int
    method: str
    scorer: str
    mean_replacement: bool
    layers: str
    amount: tuple[str, float]  # ("count", k) or ("fraction", f); counts sort first
    finetune_steps: int
    penalty: float  # NaN when the measurement failed
    preact_error: float = math.nan  # the next layer's pre-activation error (local), NaN if not recorded
    preact_error_net: float = math.nan  # the same in the pruned network

    @property
    def measurement(self) -> tuple:
        return (self.run, self.step, self.layers, self.amount, self.finetune_steps)


@dataclass(frozen=True)
class Pair:
    """A scorer's penalties without (``x``) and with (``y``) mean replacement at one measurement."""

    dataset: str
    model: str
    scorer: str
    layers: str
    amount: tuple[str, float]
    finetune_steps: int
    x: float
    y: float
    x_error: float = math.nan  # pre-activation error without (x) and with (y) mean replacement
    y_error: float = math.nan
    x_error_net: float = math.nan
    y_error_net: float = math.nan


@dataclass(frozen=True)
class Selected:
    """The fraction of a layer's units that a scorer selected at least once up to ``step``."""

    run: str
    dataset: str
    model: str
    scorer: str
    layer: str
    step: int
    fraction: float
    units_total: int


@dataclass(frozen=True)
class Removal:
    """One record of an iterative-pruning run: loss and accuracy with ``removed`` of the units gone."""

    run: str
    dataset: str
    model: str
    method: str
    removed: float
    loss: float
    accuracy: float


def _where_run(record: RunRecord) -> str:
    return f"run {record.id} ({record.dataset}, {record.model}, seed {record.seed})"


def _entries(record: RunRecord, key: str) -> list:
    value = (record.metrics or {}).get(key)
    return value if isinstance(value, list) else []


def _require(entry: Any, keys: Sequence[str], where: str) -> dict:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a mapping. Got {entry!r} instead.")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(map(repr, missing))}; it has: {', '.join(map(str, entry))}.")
    return entry


def _float(value: Any) -> float:
    """A stored number as a float (NaN for null, a missing value or a non-number)."""
    converted = number(value)
    return math.nan if converted is None else converted


def run_probes(record: RunRecord) -> list[Probe]:
    """The probes of a ``unit-penalty`` run (``[]`` if it has none); malformed entries are errors."""
    probes = []
    for k, entry in enumerate(_entries(record, "probes")):
        where = f"{_where_run(record)}: probes[{k}]"
        entry = _require(entry, ("step", "method", "layers", "finetune_steps"), where)
        method = str(entry["method"])
        plain = method[len(MR_PREFIX) :] if method.startswith(MR_PREFIX) else method
        if "penalty" in entry:
            penalty = _float(entry["penalty"])
        else:
            penalty = _float(entry.get("loss_after")) - _float(entry.get("loss_before"))
        probes.append(
            Probe(
                record.id,
                record.dataset,
                record.model,
                record.seed,
                int(entry["step"]),
                method,
                str(entry.get("scorer") or plain),
                bool(entry.get("mean_replacement", method.startswith(MR_PREFIX))),
                str(entry["layers"]),
                _amount(entry, where),
                int(entry["finetune_steps"]),
                penalty,
                _float(entry.get("preact_error")),
                _float(entry.get("preact_error_net")),
            )
        )
    return probes


def _amount(entry: dict, where: str) -> tuple[str, float]:
    fraction, count = entry.get("fraction"), entry.get("count")
    if (fraction is None) == (count is None):
        raise ValueError(
            f"{where} must set exactly one of 'fraction' and 'count'. "
            f"Got fraction={fraction!r}, count={count!r} instead."
        )
    if fraction is not None:
        return "fraction", round(float(fraction), 12)
    return "count", int(entry["count"])


def run_selected(record: RunRecord) -> list[Selected]:
    """Per (scorer, layer, probe step): the fraction of the layer's units selected at that step or before,
    ``|∪_{s ≤ step} units_s| / units_total[layer]``."""
    entries = _entries(record, "selections")
    if not entries:
        return []
    totals = (record.metrics or {}).get("units_total")
    if not isinstance(totals, dict):
        raise ValueError(f"{_where_run(record)} has 'selections' but no 'units_total' mapping {{layer: n_units}}.")
    series: dict[tuple[str, str], list[tuple[int, list]]] = {}
    for k, entry in enumerate(entries):
        where = f"{_where_run(record)}: selections[{k}]"
        entry = _require(entry, ("step", "scorer", "layer", "units"), where)
        if not isinstance(entry["units"], list):
            raise ValueError(f"{where}: 'units' must be a list of unit indices. Got {entry['units']!r} instead.")
        series.setdefault((str(entry["scorer"]), str(entry["layer"])), []).append((int(entry["step"]), entry["units"]))
    out = []
    for (scorer, layer), items in series.items():
        total = totals.get(layer)
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(
                f"{_where_run(record)}: units_total[{layer!r}] must be a positive int. Got {total!r} instead."
            )
        seen: set[int] = set()
        by_step: dict[int, float] = {}
        for step, units in sorted(items, key=lambda item: item[0]):
            seen.update(int(u) for u in units)
            by_step[step] = len(seen) / total
        out += [
            Selected(record.id, record.dataset, record.model, scorer, layer, step, fraction, total)
            for step, fraction in by_step.items()
        ]
    return out


def run_removals(record: RunRecord) -> list[Removal]:
    """The records of a ``unit-iterative`` run, by fraction of units removed."""
    out = []
    for k, entry in enumerate(_entries(record, "iterative")):
        entry = _require(entry, ("removed",), f"{_where_run(record)}: iterative[{k}]")
        out.append(
            Removal(
                record.id,
                record.dataset,
                record.model,
                record.method,
                float(entry["removed"]),
                _float(entry.get("loss")),
                _float(entry.get("accuracy")),
            )
        )
    return sorted(out, key=lambda r: r.removed)


def _gather(records: Iterable[RunRecord], read: Callable[[RunRecord], list], where: str, needs: str) -> list:
    items = [item for r in records if r.status == "done" for item in read(r)]
    if not items:
        raise NoDataError(f"{where}: no finished run has {needs}.")
    return items


_PROBES_NEEDED = "unit-pruning probes (the metric 'probes' of the unit-penalty task)"


# ----------------------------------------------------------------------------------- filters
def _as_list(declaration: dict, key: str, where: str, item: str) -> list | None:
    value = declaration.get(key)
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values:
        raise TypeError(
            f"the '{key}' parameter of {where} must be {item} or a non-empty list of them. Got {value!r} instead."
        )
    return values


def _names(declaration: dict, key: str, present: Sequence[str] | None, where: str) -> list[str] | None:
    """A str filter (or a list of them), each among ``present`` (not checked when ``present`` is None)."""
    values = _as_list(declaration, key, where, "a str")
    if values is None:
        return None
    out = []
    for value in values:
        if not isinstance(value, str):
            listed = f" among: {', '.join(present)}" if present is not None else ""
            raise TypeError(
                f"the '{key}' parameter of {where} must be a str or a list of str{listed}. "
                f"Got {value!r} of type {type(value).__name__} instead."
            )
        out.append(value if present is None else check_choice(key, value, present, where=where))
    return out


def _levels(
    declaration: dict,
    key: str,
    present: Sequence[float] | None,
    where: str,
    *,
    integer: bool,
    low: float,
    high: float | None,
    closed: str = "both",
) -> list | None:
    """A numeric filter (or a list of them), each equal to one of ``present`` (unchecked when None)."""
    values = _as_list(declaration, key, where, "an int" if integer else "a float")
    if values is None:
        return None
    out = []
    for value in values:
        value = check_number(key, value, where=where, low=low, high=high, integer=integer, closed=closed)
        if present is not None:
            match = next((p for p in present if math.isclose(p, value, rel_tol=1e-9, abs_tol=1e-12)), None)
            if match is None:
                shown = ", ".join(f"{p:g}" for p in present) or "none"
                raise ValueError(
                    f"the '{key}' parameter of {where} must be among the values probed: {shown}. Got {value!r} instead."
                )
            value = match
        out.append(value)
    return out


_NUMERIC_FILTERS: dict[str, dict[str, Any]] = {
    "fraction": dict(integer=False, low=0.0, high=1.0, closed="right"),
    "count": dict(integer=True, low=1, high=None),
    "finetune_steps": dict(integer=True, low=0, high=None),
}


def _filter_probes(probes: list[Probe], declaration: dict, where: str, *, method_key: str = "methods") -> list[Probe]:
    """The probes the declaration's filters keep (each filter's values must be among those probed)."""
    attribute = {"methods": "method", "scorers": "scorer", "layers": "layers", "dataset": "dataset", "model": "model"}
    for key in (method_key, "layers", "dataset", "model"):
        present = _order(attribute[key], [getattr(p, attribute[key]) for p in probes])
        wanted = _names(declaration, key, [str(v) for v in present], where)
        if wanted is not None:
            probes = [p for p in probes if getattr(p, attribute[key]) in wanted]
    amounts = set()
    for key in ("fraction", "count"):
        present = sorted({p.amount[1] for p in probes if p.amount[0] == key})
        amounts |= {(key, v) for v in _levels(declaration, key, present, where, **_NUMERIC_FILTERS[key]) or []}
    if amounts:
        probes = [p for p in probes if p.amount in amounts]
    present = sorted({p.finetune_steps for p in probes})
    steps = _levels(declaration, "finetune_steps", present, where, **_NUMERIC_FILTERS["finetune_steps"])
    if steps is not None:
        probes = [p for p in probes if p.finetune_steps in steps]
    if not probes:
        raise NoDataError(f"{where}: no probe matches the declaration's filters.")
    return probes


def _filter_problems(declaration: dict, where: str, keys: Sequence[str]) -> list[str]:
    """Type and range problems of the filters in ``keys``, found without the runs."""
    problems = []
    for key in keys:
        try:
            if key in _NUMERIC_FILTERS:
                _levels(declaration, key, None, where, **_NUMERIC_FILTERS[key])
            else:
                _names(declaration, key, None, where)
        except (ValueError, TypeError) as err:
            problems.append(str(err))
    return problems


def _select_probes(records: Iterable[RunRecord], declaration: dict, where: str, **options) -> list[Probe]:
    return _filter_probes(_gather(records, run_probes, where, _PROBES_NEEDED), declaration, where, **options)


# ----------------------------------------------------------------------- order and formatting
def _order(key: str, values: Iterable) -> list:
    """Distinct values in display order: methods and layers in the study's order, then the others as
    they appear; amounts counts first then fractions, ascending; numbers ascending; names as they appear."""
    distinct = list(dict.fromkeys(values))
    if key in ("method", "scorer", "layers"):
        known = {"method": METHODS, "scorer": SCORERS, "layers": LAYER_ORDER}[key]
        return [v for v in known if v in distinct] + [v for v in distinct if v not in known]
    if key in ("amount", "finetune_steps", "step"):
        return sorted(distinct)
    return distinct


def _grouped(items: Sequence, keys: Sequence[str]) -> dict[tuple, list]:
    """``items`` grouped by the values of their attributes ``keys``, groups in display order."""
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault(tuple(getattr(item, k) for k in keys), []).append(item)
    ranks = [{v: r for r, v in enumerate(_order(k, (g[i] for g in groups)))} for i, k in enumerate(keys)]
    return {g: groups[g] for g in sorted(groups, key=lambda g: tuple(rank[v] for rank, v in zip(ranks, g)))}


def format_amount(amount: tuple[str, float]) -> str:
    """``("fraction", 0.1)`` → ``10 %``; ``("count", 1)`` → ``1 unit``."""
    kind, value = amount
    if kind == "fraction":
        return format_level(value)
    return f"{value:g} unit" + ("" if value == 1 else "s")


def _value_text(key: str, value: Any) -> str:
    return format_amount(value) if key == "amount" else str(value)


def _setting_text(layers: str, amount: tuple[str, float], finetune_steps: int) -> str:
    tuning = f"{finetune_steps} fine-tuning steps" if finetune_steps else "no fine-tuning"
    return f"layers {layers}, {format_amount(amount)}, {tuning}"


def _panel_title(keys: Sequence[str], values: Sequence[Any]) -> str:
    """``dataset, model`` on the first line, the probe setting (if any) on the second."""
    named = dict(zip(keys, values))
    first = ", ".join(str(named[k]) for k in ("dataset", "model") if k in named)
    rest = []
    if "layers" in named:
        rest.append(f"layers {named['layers']}")
    if "amount" in named:
        rest.append(format_amount(named["amount"]))
    if "finetune_steps" in named:
        rest.append(f"{named['finetune_steps']} fine-tuning steps" if named["finetune_steps"] else "no fine-tuning")
    if "layer" in named:
        rest.append(str(named["layer"]))
    return first + ("\n" + ", ".join(rest) if rest else "")


def method_style(method: str) -> dict:
    """Colour by scorer; solid with mean replacement (``bp_``), dashed without."""
    with_mr = method.startswith(MR_PREFIX)
    scorer = method[len(MR_PREFIX) :] if with_mr else method
    color = _SCORER_COLORS.get(scorer) or _OTHER_COLORS[sum(map(ord, scorer)) % len(_OTHER_COLORS)]
    return {"color": color, "linestyle": "-" if with_mr else "--"}


def _scorer_color(scorer: str) -> str:
    return method_style(scorer)["color"]


# ------------------------------------------------------------------------------ axis scales
def _log_option(declaration: dict, where: str) -> bool | None:
    """``log``: true, false or ``auto`` (the default; None here)."""
    value = declaration.get("log", "auto")
    if value == "auto":
        return None
    if not isinstance(value, bool):
        raise TypeError(f"the 'log' parameter of {where} must be true, false or 'auto'. Got {value!r} instead.")
    return value


def axis_scale(values: Iterable[float], log: bool | None) -> tuple[str, dict]:
    """The scale of an axis showing ``values``: ``linear``; ``log`` when all are positive; else ``symlog``
    with ``linthresh`` = the 10th percentile of the non-zero ``|values|`` rounded down to a power of 10
    (so the ticks at ±linthresh are decades and their labels do not collide with 0's). ``log=None`` (auto) chooses a
    log scale only when the non-zero ``|values|`` span at least :data:`DECADES_FOR_LOG` decades."""
    import numpy as np

    finite = [v for v in values if math.isfinite(v)]
    magnitudes = [abs(v) for v in finite if v != 0]
    if log is False or not magnitudes:
        return "linear", {}
    if log is None and max(magnitudes) < 10**DECADES_FOR_LOG * min(magnitudes):
        return "linear", {}
    if all(v > 0 for v in finite):
        return "log", {}
    return "symlog", {"linthresh": 10.0 ** math.floor(math.log10(float(np.quantile(magnitudes, 0.1))))}


def _t_interval(values: Sequence[float]) -> tuple[float | None, float | None]:
    """``(mean, half-width)`` of the 95 % confidence interval of the mean, ``t_{0.975, n−1}·s/√n``
    (Student's t, sample std s); half-width None when n < 2."""
    from scipy import stats

    mean, std = mean_std(values)
    if std is None:
        return mean, None
    return mean, float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * std / math.sqrt(len(values)))


def _cap(figure, declaration: dict, shown: int, total: int, narrow: str) -> None:
    """The declaration's title, and a note when only the first :data:`MAX_PANELS` panels are drawn."""
    parts = [str(declaration["title"])] if declaration.get("title") is not None else []
    if shown < total:
        parts.append(f"first {shown} of {total} panels; narrow with {narrow}")
    if parts:
        figure.suptitle(" — ".join(parts))


def _unit_kind(name: str, keys: Sequence[str]):
    """``figures.figure_kind`` without its common ``metric`` key (these kinds plot fixed quantities)."""

    def register(function):
        registered = figure_kind(name, keys)(function)
        FIGURE_KEYS[name] = tuple(k for k in FIGURE_KEYS[name] if k != "metric")
        return registered

    return register


def _split_by(declaration: dict, where: str) -> list[str]:
    split = declaration.get("split_by", [])
    if isinstance(split, str):
        split = [split]
    if not isinstance(split, list):
        raise TypeError(
            f"the 'split_by' parameter of {where} must be a list among: {', '.join(PROFILE_SPLITS)}. "
            f"Got {split!r} instead."
        )
    split = [check_choice("split_by", key, PROFILE_SPLITS, where=where) for key in split]
    if len(set(split)) != len(split):
        raise ValueError(f"the 'split_by' parameter of {where} names a key twice. Got {split!r} instead.")
    return [k for k in PROFILE_SPLITS if k in split]


# ----------------------------------------------------------------------------------- figures
_NARROW = "layers, fraction, count, finetune_steps, model, dataset"


BANDS = ("ci95", "std", "none")


def _band_option(declaration: dict, where: str) -> str:
    band = declaration.get("band", "ci95")
    if band not in BANDS:
        raise ValueError(f"the 'band' parameter of {where} must be one of: {', '.join(BANDS)}. Got {band!r} instead.")
    return band


@_unit_kind("penalty_curves", (*PROBE_FILTERS, "log", "band"))
def penalty_curves(records: list[RunRecord], declaration: dict, spec: dict) -> list:
    """Pruning penalty over training, one line per method (mean over seeds) with its 95 % confidence band.

    One panel per (dataset, model, layers, amount, finetune_steps) left by the filters, at most
    :data:`MAX_PANELS` (24; the suptitle says how many more there are). At each probe step the line is
    the mean ``d̄`` of the n seeds' penalties and the band ``d̄ ± t_{0.975, n−1}·s/√n`` (s = sample std);
    no band where n = 1. ``band: std`` draws ``d̄ ± s`` instead (with 2 or 3 seeds the t-band is
    12.7 or 4.3 standard errors wide), ``band: none`` no band. NaN penalties (failed measurements)
    are left out. ``log`` (true, false, auto): see :func:`axis_scale`.
    """
    where = "figure penalty_curves"
    probes = _select_probes(records, declaration, where)
    log = _log_option(declaration, where)
    band = _band_option(declaration, where)
    panels = _grouped(probes, ("dataset", "model", *SETTINGS))
    shown = list(panels.items())[:MAX_PANELS]
    figure, axes = panel_grid(len(shown))
    for ax, (key, members) in zip(axes, shown):
        drawn = []
        for method, series in _grouped(members, ("method",)).items():
            drawn += _draw_mean_curve(ax, method[0], series, band)
        scale, options = axis_scale(drawn, log)
        ax.set_yscale(scale, **options)
        ax.set_title(_panel_title(("dataset", "model", *SETTINGS), key), fontsize="medium")
        ax.set_xlabel("training step")
        ax.set_ylabel("pruning penalty (loss after − before)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small", ncol=2)
    _cap(figure, declaration, len(shown), len(panels), _NARROW)
    return [(figure_name(declaration, "penalty_curves"), figure)]


def _mean_of_some(mean: float | None) -> float:
    """The mean of a non-empty list of values (never None)."""
    assert mean is not None
    return mean


def _draw_mean_curve(ax, method: str, probes: list[Probe], band: str = "ci95") -> list[float]:
    """One method's mean penalty per step and its band; returns the values drawn (for the scale)."""
    by_step: dict[int, list[float]] = {}
    for p in probes:
        if not math.isnan(p.penalty):
            by_step.setdefault(p.step, []).append(p.penalty)
    steps = sorted(by_step)
    if not steps:
        return []
    spread = _t_interval if band == "ci95" else mean_std
    stats = [(_mean_of_some(m), None if band == "none" else h) for m, h in (spread(by_step[s]) for s in steps)]
    means = [m for m, _ in stats]
    style = method_style(method)
    ax.plot(steps, means, label=method, linewidth=1.3, **style)
    low = [m - h if h is not None else math.nan for m, h in stats]
    high = [m + h if h is not None else math.nan for m, h in stats]
    if any(h is not None for _, h in stats):
        ax.fill_between(steps, low, high, color=style["color"], alpha=0.12, linewidth=0)
    return means + [v for v in low + high if not math.isnan(v)]


def mean_replacement_pairs(probes: Iterable[Probe]) -> list[Pair]:
    """Each scorer's penalty without (x) and with (y) mean replacement on the same run, step and
    setting; pairs where either is missing or not finite are left out."""
    found: dict[tuple, dict[bool, Probe]] = {}
    for p in probes:
        found.setdefault((p.run, p.step, p.scorer, p.layers, p.amount, p.finetune_steps), {}).setdefault(
            p.mean_replacement, p
        )
    pairs = []
    for both in found.values():
        if False in both and True in both:
            plain, replaced = both[False], both[True]
            if math.isfinite(plain.penalty) and math.isfinite(replaced.penalty):
                pairs.append(
                    Pair(
                        plain.dataset,
                        plain.model,
                        plain.scorer,
                        plain.layers,
                        plain.amount,
                        plain.finetune_steps,
                        plain.penalty,
                        replaced.penalty,
                        plain.preact_error,
                        replaced.preact_error,
                        plain.preact_error_net,
                        replaced.preact_error_net,
                    )
                )
    return pairs


def _max_penalty(declaration: dict, where: str) -> float | None:
    """``max_penalty``: keep the pairs whose penalties are both ≤ it (the paper's view: 0.4)."""
    value = declaration.get("max_penalty")
    return None if value is None else float(check_number("max_penalty", value, where=where, low=None, high=None))


def _in_view(pairs: list[Pair], limit: float | None, where: str) -> list[Pair]:
    if limit is None:
        return pairs
    kept = [p for p in pairs if p.x <= limit and p.y <= limit]
    if not kept:
        raise NoDataError(f"{where}: no pair has both penalties ≤ max_penalty = {limit:g}.")
    return kept


@_unit_kind("mean_replacement_scatter", ("scorers", *PROBE_FILTERS[1:], "split_by", "log", "max_penalty"))
def mean_replacement_scatter(records: list[RunRecord], declaration: dict, spec: dict) -> list:
    """Penalty with mean replacement (y) against without it (x), one colour per scorer, with y = x.

    A point is one scorer at one measurement (run, step, layers, amount, finetune_steps); points under
    y = x are measurements where mean replacement lowered the penalty, and each panel's title gives
    their fraction ``#{y < x} / #points``. One panel per (dataset, model) and per value of the keys in
    ``split_by`` (layers, amount, finetune_steps; default none), at most :data:`MAX_PANELS`. Both axes
    share one scale (``log``: true, false or auto; see :func:`axis_scale`) and one range.
    ``max_penalty``: only the points with both penalties ≤ it (Evci et al.'s scatter plots stop at 0.4).
    """
    where = "figure mean_replacement_scatter"
    probes = _select_probes(records, declaration, where, method_key="scorers")
    split = _split_by(declaration, where)
    log = _log_option(declaration, where)
    limit = _max_penalty(declaration, where)
    pairs = mean_replacement_pairs(probes)
    if not pairs:
        raise NoDataError(
            f"{where}: no scorer was probed both without and with mean replacement "
            f"(its {MR_PREFIX} twin) at the same run, step and setting."
        )
    pairs = _in_view(pairs, limit, where)
    keys = ("dataset", "model", *split)
    panels = _grouped(pairs, keys)
    shown = list(panels.items())[:MAX_PANELS]
    figure, axes = panel_grid(len(shown))
    for ax, (key, members) in zip(axes, shown):
        for (scorer,), points in _grouped(members, ("scorer",)).items():
            ax.scatter(
                [p.x for p in points], [p.y for p in points], s=12, alpha=0.7, color=_scorer_color(scorer), label=scorer
            )
        _diagonal(ax, [v for p in members for v in (p.x, p.y)], log)
        under = sum(p.y < p.x for p in members) / len(members)
        ax.set_title(
            f"{_panel_title(keys, key)}\n{100 * under:.1f} % under y = x (n = {len(members)})", fontsize="medium"
        )
        ax.set_xlabel("penalty without mean replacement")
        ax.set_ylabel("penalty with mean replacement")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    _cap(figure, declaration, len(shown), len(panels), "split_by, " + _NARROW)
    return [(figure_name(declaration, "mean_replacement_scatter"), figure)]


def _diagonal(ax, values: list[float], log: bool | None) -> None:
    """The y = x line over the data's range, both axes on the same scale and limits."""
    scale, options = axis_scale(values, log)
    ax.set_xscale(scale, **options)
    ax.set_yscale(scale, **options)
    low, high = min(values), max(values)
    ax.plot([low, high], [low, high], color="black", linestyle=":", linewidth=1, label="y = x")
    ax.autoscale_view()
    limits = (min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1]))
    ax.set_xlim(*limits)
    ax.set_ylim(*limits)


def profile_matrix(probes: Sequence[Probe]) -> tuple[list[str], list[tuple], Any]:
    """``(methods, measurements, d)`` with ``d[j, i]`` method i's penalty at measurement j (NaN if absent)."""
    import numpy as np

    methods = _order("method", (p.method for p in probes))
    measurements = list(dict.fromkeys(p.measurement for p in probes))
    row = {m: j for j, m in enumerate(measurements)}
    column = {m: i for i, m in enumerate(methods)}
    d = np.full((len(measurements), len(methods)), np.nan)
    for p in probes:
        d[row[p.measurement], column[p.method]] = p.penalty
    return methods, measurements, d


def _area(taus, values) -> float:
    """Trapezoidal area under a profile over τ ∈ [0, 1]."""
    return float(sum((values[k] + values[k + 1]) / 2 * (taus[k + 1] - taus[k]) for k in range(len(taus) - 1)))


@_unit_kind("performance_profile", (*PROBE_FILTERS, "split_by", "taus"))
def performance_profile_figure(records: list[RunRecord], declaration: dict, spec: dict) -> list:
    """Performance profiles of the methods (Dolan & Moré 2002), legend ordered by area under the curve.

    Measurement j = (run, step, layers, amount, finetune_steps) with penalties d_ij over methods i;
    ``t_j(τ) = τ·min_i d_ij + (1 − τ)·max_i d_ij`` and ``P_i(τ) = #{j : d_ij < t_j(τ)} / #j``
    (:func:`~prunelab.results.analysis.performance_profile`; a method missing from a measurement
    never wins it) at ``taus`` evenly spaced τ in [0, 1] (default 101). The legend lists methods by
    decreasing trapezoidal area under P_i. One panel per (dataset, model) and per value of the keys in
    ``split_by`` (layers, amount, finetune_steps; default none), at most :data:`MAX_PANELS`.
    """
    import numpy as np

    where = "figure performance_profile"
    n_taus = int(
        check_number("taus", declaration.get("taus", DEFAULT_TAUS), where=where, low=2, high=100_001, integer=True)
    )
    probes = _select_probes(records, declaration, where)
    split = _split_by(declaration, where)
    keys = ("dataset", "model", *split)
    panels = _grouped(probes, keys)
    shown = list(panels.items())[:MAX_PANELS]
    taus = np.linspace(0.0, 1.0, n_taus)
    figure, axes = panel_grid(len(shown))
    for ax, (key, members) in zip(axes, shown):
        methods, measurements, d = profile_matrix(members)
        profile = performance_profile(d, taus)
        areas = [_area(taus, profile[:, i]) for i in range(len(methods))]
        for i in sorted(range(len(methods)), key=lambda i: (-areas[i], i)):
            ax.plot(
                taus, profile[:, i], label=f"{methods[i]} ({areas[i]:.3f})", linewidth=1.3, **method_style(methods[i])
            )
        ax.set_title(f"{_panel_title(keys, key)}\n{len(measurements)} measurements", fontsize="medium")
        ax.set_xlabel("τ  (t_j = τ·min_i d_ij + (1 − τ)·max_i d_ij)")
        ax.set_ylabel("P_i(τ): fraction of j with d_ij < t_j")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small", ncol=2, title="method (area)", title_fontsize="x-small")
    _cap(figure, declaration, len(shown), len(panels), "split_by, " + _NARROW)
    return [(figure_name(declaration, "performance_profile"), figure)]


@_unit_kind("units_selected", ("scorers", "layer", "dataset", "model"))
def units_selected(records: list[RunRecord], declaration: dict, spec: dict) -> list:
    """Fraction of a layer's units that each scorer has selected at least once, over training.

    For a run, scorer and layer with selections ``U_s`` at probe steps s:
    ``f(step) = |∪_{s ≤ step} U_s| / units_total[layer]``; the line is its mean over the runs (seeds)
    probed at that step. One panel per (dataset, model, layer), at most :data:`MAX_PANELS`.
    Filters: ``scorers``, ``layer``, ``dataset``, ``model`` (a value or a list).
    """
    from matplotlib.ticker import PercentFormatter

    where = "figure units_selected"
    found = _filtered(
        _gather(records, run_selected, where, "unit selections (the metrics 'selections' and 'units_total')"),
        declaration,
        where,
        (("scorers", "scorer"), ("layer", "layer"), ("dataset", "dataset"), ("model", "model")),
        "selection",
    )
    panels = _grouped(found, ("dataset", "model", "layer"))
    shown = list(panels.items())[:MAX_PANELS]
    figure, axes = panel_grid(len(shown))
    for ax, ((dataset, model, layer), members) in zip(axes, shown):
        for (scorer,), series in _grouped(members, ("scorer",)).items():
            by_step: dict[int, list[float]] = {}
            for s in series:
                by_step.setdefault(s.step, []).append(s.fraction)
            steps = sorted(by_step)
            runs = len({s.run for s in series})
            ax.plot(
                steps,
                [sum(by_step[s]) / len(by_step[s]) for s in steps],
                color=_scorer_color(scorer),
                marker="o",
                markersize=3,
                label=f"{scorer} (n={runs})",
            )
        ax.set_title(f"{dataset}, {model}\n{layer} ({members[0].units_total} units)", fontsize="medium")
        ax.set_xlabel("training step")
        ax.set_ylabel("units ever selected")
        ax.set_ylim(0.0, 1.02)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    _cap(figure, declaration, len(shown), len(panels), "layer, scorers, model, dataset")
    return [(figure_name(declaration, "units_selected"), figure)]


def _removals(records: Iterable[RunRecord], declaration: dict, where: str) -> list[Removal]:
    found = _gather(
        records, run_removals, where, "an iterative-pruning curve (the metric 'iterative' of the unit-iterative task)"
    )
    return _filtered(
        found,
        declaration,
        where,
        (("methods", "method"), ("dataset", "dataset"), ("model", "model")),
        "iterative-pruning record",
    )


def _filtered(found: list, declaration: dict, where: str, filters: Sequence[tuple[str, str]], what: str) -> list:
    """``found`` kept to the values the declaration names under each filter key (``(key, attribute)``
    pairs; a value must be one present); NoDataError when nothing is left."""
    for key, attribute in filters:
        present = [str(v) for v in _order(attribute, (getattr(item, attribute) for item in found))]
        wanted = _names(declaration, key, present, where)
        if wanted is not None:
            found = [item for item in found if getattr(item, attribute) in wanted]
    if not found:
        raise NoDataError(f"{where}: no {what} matches the declaration's filters.")
    return found


def _two_row_grid(n_panels: int):
    """Panels of two stacked axes (top, bottom), three panels per row of pairs."""
    from matplotlib.figure import Figure

    cols = min(3, n_panels)
    pair_rows = math.ceil(n_panels / cols)
    figure = Figure(figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * 2 * pair_rows), dpi=DPI, layout="constrained")
    grid = figure.subplots(2 * pair_rows, cols, squeeze=False)
    pairs = [(grid[2 * (i // cols)][i % cols], grid[2 * (i // cols) + 1][i % cols]) for i in range(n_panels)]
    for i in range(n_panels, pair_rows * cols):
        grid[2 * (i // cols)][i % cols].set_visible(False)
        grid[2 * (i // cols) + 1][i % cols].set_visible(False)
    return figure, pairs


@_unit_kind("iterative_pruning", ("methods", "dataset", "model"))
def iterative_pruning(records: list[RunRecord], declaration: dict, spec: dict) -> list:
    """Loss (top) and accuracy (bottom) against the fraction of units removed by iterative pruning.

    One line per method: the mean over seeds at each fraction removed, with a band mean ± sample std
    (no band where one seed). One panel (a pair of axes) per (dataset, model), at most
    :data:`MAX_PANELS`. Filters: ``methods``, ``dataset``, ``model``.
    """
    from matplotlib.ticker import PercentFormatter

    where = "figure iterative_pruning"
    found = _removals(records, declaration, where)
    panels = _grouped(found, ("dataset", "model"))
    shown = list(panels.items())[:MAX_PANELS]
    percent = is_percent_metric("accuracy", [r.accuracy for r in found])
    figure, pairs = _two_row_grid(len(shown))
    for (loss_ax, accuracy_ax), ((dataset, model), members) in zip(pairs, shown):
        for (method,), series in _grouped(members, ("method",)).items():
            label = f"{method} (n={len({r.run for r in series})})"
            _draw_band(loss_ax, series, "loss", 1.0, method, label)
            _draw_band(accuracy_ax, series, "accuracy", 100.0 if percent else 1.0, method, label)
        for ax, ylabel in ((loss_ax, "loss"), (accuracy_ax, "accuracy" + (" (%)" if percent else ""))):
            ax.set_title(f"{dataset}, {model}", fontsize="medium")
            ax.set_xlabel("units removed")
            ax.set_ylabel(ylabel)
            ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="x-small")
    _cap(figure, declaration, len(shown), len(panels), "methods, model, dataset")
    return [(figure_name(declaration, "iterative_pruning"), figure)]


def _draw_band(ax, series: list[Removal], metric: str, scale: float, method: str, label: str) -> None:
    by_level: dict[float, list[float]] = {}
    for r in series:
        value = getattr(r, metric)
        if not math.isnan(value):
            by_level.setdefault(round(r.removed / TOLERANCE) * TOLERANCE, []).append(value * scale)
    levels = sorted(by_level)
    if not levels:
        return
    stats = [(_mean_of_some(m), s) for m, s in (mean_std(by_level[x]) for x in levels)]
    style = method_style(method)
    ax.plot(levels, [m for m, _ in stats], label=label, linewidth=1.3, **style)
    if any(s is not None for _, s in stats):
        ax.fill_between(
            levels,
            [m - s if s is not None else math.nan for m, s in stats],
            [m + s if s is not None else math.nan for m, s in stats],
            color=style["color"],
            alpha=0.12,
            linewidth=0,
        )


# ------------------------------------------------------------------------------------ tables
@dataclass(frozen=True)
class RateCell(Cell):
    """A share shown as a percentage with one decimal (``mean`` = the share, ``n`` = its denominator)."""

    @property
    def text(self) -> str:
        if self.mean is None:
            return "n/a"
        short = f" (n={self.n})" if self.n < self.full_n else ""
        return f"{100 * self.mean:.1f} %{short}"


PENALTY_TABLE_KEYS = ("kind", "columns", *PROBE_FILTERS, "win_rate", "digits", "title")
ITERATIVE_TABLE_KEYS = ("kind", "metric", "removed", "methods", "dataset", "model", "percent", "digits", "title")


def _options(declaration: dict, where: str) -> tuple[int | None, str | None]:
    """The shared ``digits`` and ``title`` options."""
    return digits_and_title(declaration, where)


def _flag(declaration: dict, key: str, default: bool | None, where: str) -> bool | None:
    value = declaration.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"the '{key}' parameter of {where} must be true or false. Got {value!r} instead.")
    return value


def _collect(problems: list[str], check: Callable[[], Any]) -> None:
    try:
        check()
    except (ValueError, TypeError) as err:
        problems.append(str(err))


def penalty_table_problems(declaration: dict, where: str) -> list[str]:
    """Problems of a ``penalties`` table declaration found without the runs."""
    problems = check_keys(declaration, PENALTY_TABLE_KEYS, where=where)
    _collect(
        problems, lambda: check_choice("columns", declaration.get("columns", "amount"), PENALTY_COLUMNS, where=where)
    )
    _collect(problems, lambda: _flag(declaration, "win_rate", True, where))
    _collect(problems, lambda: _options(declaration, where))
    return problems + _filter_problems(declaration, where, PROBE_FILTERS)


def probe_wins(probes: Iterable[Probe]) -> set[tuple]:
    """``(measurement, method)`` of each method with the lowest penalty of its measurement. Ties: every
    tied method wins; NaN penalties never win; a measurement of a single method is a win for none."""
    by_measurement: dict[tuple, list[Probe]] = {}
    for p in probes:
        if not math.isnan(p.penalty):
            by_measurement.setdefault(p.measurement, []).append(p)
    wins = set()
    for measurement, members in by_measurement.items():
        if len({p.method for p in members}) > 1:
            best = min(p.penalty for p in members)
            wins |= {(measurement, p.method) for p in members if p.penalty == best}
    return wins


@table_kind("penalties", penalty_table_problems)
def penalty_tables(done: list[RunRecord], declaration: dict, outputs: dict, where: str) -> list[Table]:
    """Pruning penalty per method (rows) and value of ``columns`` (default ``amount``).

    Cell = mean ± sample std of ``d = loss_after − loss_before`` over every measurement of the cell (all
    seeds and probe steps; NaN left out). One table per (dataset, model, layers, amount,
    finetune_steps) combination, less the ``columns`` key. With ``win_rate: true`` (default) each table
    is followed by one of the same layout whose cell is the share of the cell's measurements where the
    method has the lowest penalty of the methods shown (:func:`probe_wins`; the denominator counts the
    measurements with a penalty of that method).
    """
    raise_problems(penalty_table_problems(declaration, where))
    columns = declaration.get("columns", "amount")
    digits, title = _options(declaration, where)
    probes = _select_probes(done, declaration, where)
    wins = probe_wins(probes) if declaration.get("win_rate", True) else None
    split = [k for k in ("dataset", "model", *SETTINGS) if k != columns]
    tables = []
    for key, members in _grouped(probes, split).items():
        place = ", ".join(f"{k} = {_value_text(k, v)}" for k, v in zip(split, key))
        stem = [f"method-by-{columns}", *(_value_text(k, v) for k, v in zip(split, key))]
        heading = title or "pruning penalty (loss after − loss before)"
        penalty, rate = _penalty_cells(members, columns, digits, wins)
        labels = [_value_text(columns, v) for v in _order(columns, (getattr(p, columns) for p in members))]
        tables.append(
            Table(
                f"{heading}, mean ± std over seeds and probe steps — {place}",
                slug("_".join(["penalty", *stem])),
                "method",
                labels,
                penalty,
            )
        )
        if wins is not None:
            tables.append(
                Table(
                    f"lowest penalty of the methods shown, % of measurements (ties count for each) — {place}",
                    slug("_".join(["penalty-wins", *stem])),
                    "method",
                    labels,
                    rate,
                )
            )
    return tables


def _penalty_cells(probes: list[Probe], columns: str, digits: int | None, wins: set | None) -> tuple[list, list]:
    """Rows ``(method, [Cell per column])`` of penalties and of win rates."""
    column_values = _order(columns, (getattr(p, columns) for p in probes))
    cells = _grouped(probes, ("method", columns))
    values = {k: [p.penalty for p in v if not math.isnan(p.penalty)] for k, v in cells.items()}
    full_n = max((len(v) for v in values.values()), default=0)
    penalty_rows, rate_rows = [], []
    for method in _order("method", (p.method for p in probes)):
        row: list[Cell | None] = []
        rates: list[RateCell | None] = []
        for column in column_values:
            kept = values.get((method, column))
            if kept is None:
                row.append(None)
                rates.append(None)
                continue
            mean, std = mean_std(kept)
            row.append(Cell(mean, std, len(kept), digits=digits, full_n=full_n))
            won = sum(
                ((p.measurement, method) in (wins or ())) for p in cells[(method, column)] if not math.isnan(p.penalty)
            )
            rates.append(RateCell(won / len(kept) if kept else None, None, len(kept), full_n=full_n))
        penalty_rows.append((method, row))
        rate_rows.append((method, rates))
    return penalty_rows, rate_rows


def _iterative_metric(declaration: dict, outputs: dict, where: str) -> str:
    metric = declaration.get("metric")
    if metric is None:
        fallback = (outputs or {}).get("metric")
        metric = fallback if fallback in ITERATIVE_METRICS else "loss"
    return check_choice("metric", metric, ITERATIVE_METRICS, where=where)


def _removed_levels(declaration: dict, where: str) -> list[float] | None:
    values = _as_list(declaration, "removed", where, "a float")
    if values is None:
        return None
    return sorted({check_number("removed", v, where=where, low=0.0, high=1.0) for v in values})


def iterative_table_problems(declaration: dict, where: str) -> list[str]:
    """Problems of an ``iterative`` table declaration found without the runs."""
    problems = check_keys(declaration, ITERATIVE_TABLE_KEYS, where=where)
    _collect(problems, lambda: _iterative_metric(declaration, {}, where))
    _collect(problems, lambda: _removed_levels(declaration, where))
    _collect(problems, lambda: _flag(declaration, "percent", None, where))
    _collect(problems, lambda: _options(declaration, where))
    return problems + _filter_problems(declaration, where, ("methods", "dataset", "model"))


def value_at(removals: Sequence[Removal], level: float, metric: str) -> float | None:
    """A run's ``metric`` once ``level`` of its units are removed: the last record with
    ``removed ≤ level`` (within :data:`TOLERANCE`) that has the metric (a run may measure test
    accuracy every few steps only); None if the run stopped short of ``level`` or has no such record."""
    if not removals or removals[-1].removed < level - TOLERANCE:
        return None
    before = [r for r in removals if r.removed <= level + TOLERANCE and not math.isnan(getattr(r, metric))]
    return getattr(before[-1], metric) if before else None


@table_kind("iterative", iterative_table_problems)
def iterative_tables(done: list[RunRecord], declaration: dict, outputs: dict, where: str) -> list[Table]:
    """Loss or accuracy (``metric``) per method (rows) after iterative pruning removed a fraction of units.

    Columns: the fractions in ``removed`` (default 0, 5, 10, 20, 30, … 90 %, those the runs reached);
    the value of a run at fraction r is that of its last record with ``removed ≤ r`` that has the
    metric (:func:`value_at`). Cell = mean ± sample std over seeds. One table per (dataset, model). ``metric`` defaults to
    ``outputs.metric`` when that is loss or accuracy, else loss.
    """
    raise_problems(iterative_table_problems(declaration, where))
    metric = _iterative_metric(declaration, outputs, where)
    digits, title = _options(declaration, where)
    found = _removals(done, declaration, where)
    percent = _flag(declaration, "percent", None, where)
    if percent is None:
        percent = metric == "accuracy" and is_percent_metric(metric, [getattr(r, metric) for r in found])
    heading = (title or metric) + (" (%)" if percent else "")
    declared = _removed_levels(declaration, where)
    tables = []
    for (dataset, model), members in _grouped(found, ("dataset", "model")).items():
        runs = _grouped(members, ("run",))
        reached = max(r.removed for r in members)
        levels = declared or [x for x in DEFAULT_REMOVED if x <= reached + TOLERANCE]
        rows = _iterative_rows(runs, levels, metric, 100.0 if percent else 1.0, digits)
        tables.append(
            Table(
                f"{heading} during iterative unit pruning, by units removed, mean ± std over seeds "
                f"— dataset = {dataset}, model = {model}",
                slug(f"iterative_{metric}_method-by-removed_{dataset}_{model}"),
                "method",
                [format_level(x) for x in levels],
                rows,
            )
        )
    return tables


def _iterative_rows(
    runs: dict[tuple, list[Removal]], levels: list[float], metric: str, scale: float, digits: int | None
) -> list:
    by_method: dict[str, list[list[Removal]]] = {}
    for series in runs.values():
        by_method.setdefault(series[0].method, []).append(series)
    values = {
        (method, level): [v for v in (value_at(s, level, metric) for s in series) if v is not None]
        for method, series in by_method.items()
        for level in levels
    }
    full_n = max((len(v) for v in values.values()), default=0)
    rows = []
    for method in _order("method", by_method):
        cells = []
        for level in levels:
            kept = values[(method, level)]
            mean, std = mean_std(kept)
            cells.append(Cell(mean, std, len(kept), scale=scale, digits=digits, full_n=full_n) if kept else None)
        rows.append((method, cells))
    return rows


# --------------------------------------------------------------- mean replacement vs pre-activation
@dataclass(frozen=True)
class CountCell(Cell):
    """A count (``n``), printed as an integer."""

    @property
    def text(self) -> str:
        return str(self.n)


REPLACEMENT_ROWS = ("setting", "scorer")
REPLACEMENT_ERRORS = ("local", "network")
REPLACEMENT_TABLE_KEYS = (
    "kind",
    "scorers",
    *PROBE_FILTERS[1:],
    "rows",
    "error",
    "max_penalty",
    "digits",
    "title",
)
REPLACEMENT_COLUMNS = [
    "pairs",
    "penalty, removed",
    "penalty, mean",
    "mean lowers penalty",
    "pre-act. error, removed",
    "pre-act. error, mean",
    "mean lowers error",
]


def replacement_table_problems(declaration: dict, where: str) -> list[str]:
    """Problems of a ``mean_replacement`` table declaration found without the runs."""
    problems = check_keys(declaration, REPLACEMENT_TABLE_KEYS, where=where)
    _collect(problems, lambda: check_choice("rows", declaration.get("rows", "setting"), REPLACEMENT_ROWS, where=where))
    _collect(
        problems, lambda: check_choice("error", declaration.get("error", "local"), REPLACEMENT_ERRORS, where=where)
    )
    _collect(problems, lambda: _max_penalty(declaration, where))
    _collect(problems, lambda: _options(declaration, where))
    return problems + _filter_problems(declaration, where, ("scorers", *PROBE_FILTERS[1:]))


@table_kind("mean_replacement", replacement_table_problems)
def replacement_tables(done: list[RunRecord], declaration: dict, outputs: dict, where: str) -> list[Table]:
    """Each setting's penalty and next-layer pre-activation error, without and with mean replacement.

    A pair is one scorer at one measurement, pruned without (x) and with (y) mean replacement
    (:func:`mean_replacement_pairs`; the same units go both times). Rows: the settings (layers,
    amount; ``rows: setting``, pooling the scorers) or the scorers (``rows: scorer``, one table per
    setting). Columns: the number of pairs; the mean ± std penalty without and with; the share of
    pairs where the mean lowers the penalty (y < x); the mean ± std pre-activation error (``error:
    local``, the default, or ``network``; docs/unit-results.md) without and with; the share where
    the mean lowers it. One table per (dataset, model, finetune_steps). ``max_penalty`` keeps the
    pairs with both penalties ≤ it (the paper's view: 0.4). Pairs without a recorded error (a run
    without ``preact_error: true``) leave the error cells empty.
    """
    raise_problems(replacement_table_problems(declaration, where))
    digits, title = _options(declaration, where)
    by = declaration.get("rows", "setting")
    network = declaration.get("error", "local") == "network"
    limit = _max_penalty(declaration, where)
    probes = _select_probes(done, declaration, where, method_key="scorers")
    pairs = _in_view(mean_replacement_pairs(probes), limit, where)
    if not pairs:
        raise NoDataError(f"{where}: no scorer was probed both without and with mean replacement.")
    view = "" if limit is None else f", pairs with both penalties ≤ {limit:g}"
    heading = title or "mean replacement: penalty and next layer's pre-activation error"
    kind = "in the pruned network" if network else "local"
    split = ["dataset", "model", "finetune_steps"] + (["layers", "amount"] if by == "scorer" else [])
    tables = []
    for key, members in _grouped(pairs, split).items():
        place = ", ".join(f"{k} = {_value_text(k, v)}" for k, v in zip(split, key))
        row_keys = ("scorer",) if by == "scorer" else ("layers", "amount")
        groups = _grouped(members, row_keys)
        full_n = max(len(g) for g in groups.values())
        rows = []
        for row_key, group in groups.items():
            label = row_key[0] if by == "scorer" else f"{row_key[0]}, {format_amount(row_key[1])}"
            rows.append((label, _replacement_cells(group, network, digits, full_n)))
        tables.append(
            Table(
                f"{heading} ({kind} error), mean ± std over pairs{view} — {place}",
                slug(
                    "_".join(
                        ["mean-replacement", by, *(["network"] if network else [])]
                        + ([f"max-{limit:g}"] if limit is not None else [])
                        + [_value_text(k, v) for k, v in zip(split, key)]
                    )
                ),
                "scorer" if by == "scorer" else "setting",
                REPLACEMENT_COLUMNS,
                rows,
            )
        )
    return tables


def _replacement_cells(pairs: list[Pair], network: bool, digits: int | None, full_n: int) -> list:
    def stat(values: list[float]) -> Cell | None:
        if not values:
            return None
        mean, std = mean_std(values)
        return Cell(mean, std, len(values), digits=digits, full_n=full_n)

    errors = [(p.x_error_net, p.y_error_net) if network else (p.x_error, p.y_error) for p in pairs]
    errors = [(a, b) for a, b in errors if math.isfinite(a) and math.isfinite(b)]
    n = len(pairs)
    return [
        CountCell(float(n), None, n),
        stat([p.x for p in pairs]),
        stat([p.y for p in pairs]),
        RateCell(sum(p.y < p.x for p in pairs) / n, None, n, full_n=full_n),
        stat([a for a, _ in errors]),
        stat([b for _, b in errors]),
        RateCell(sum(b < a for a, b in errors) / len(errors), None, len(errors), full_n=full_n) if errors else None,
    ]
