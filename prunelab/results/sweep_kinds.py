"""Sweep figures: a study's metrics across methods, models and levels (the default figures).

Registered with :data:`~prunelab.results.figures.FIGURES` by :mod:`prunelab.results` (the one place
every family of kinds is registered); each kind is a function
``(records, declaration, spec) -> [(name, matplotlib.figure.Figure), ...]``. The kinds:

``accuracy_vs_params``
    One panel per value of ``split_by`` (default ``[dataset]``); x = the mean
    number of non-zero parameters (log scale), y = the metric's mean over seeds
    (default ``outputs.metric``, else accuracy), error bars = its sample std; one
    line per method (and per model when a panel holds several; a method whose
    models each have one level, like a width family of dense nets, is one line
    through its models). ``pareto_of:
    {method: LABEL}`` draws that method's points (e.g. a family of small dense
    conv nets) as grey reference points with their Pareto front
    (:func:`~prunelab.results.analysis.pareto_front`) as a step line. ``models:`` keeps
    the listed model labels (a label also selects its grid variants: ``conv`` is every
    ``conv[...]``). With more than 10 lines (a design-space grid) the panels share one legend
    below them, and lines past the 10th colour are dashed, then dotted.
    ``ylim: [low, high]`` zooms the y axis (percent for accuracy).
``accuracy_vs_sparsity``
    The same against the target sparsity level (``xscale: linear`` or ``logit``).
``weight_histogram``
    Overlaid histograms of the non-zero prunable weights (metric
    ``weight_histogram``) of one run per method; filters ``methods``,
    ``sparsity`` (default: the highest level), ``dataset``, ``model``, ``seed``
    (default: the lowest); one panel per remaining (dataset, model);
    ``density: true`` (default) normalises each to unit area.
``tradeoff``
    One metric against another (``x``, e.g. ``measured_speedup``; ``xscale: log``), one
    point per (method, model, level) at the means over seeds with both stds as error bars,
    one marker per level; ``color_by: granularity`` colours a design grid's points by that
    choice of their method label. Filters ``methods``, ``models``; ``split_by`` panels.
``curves``
    Training curves of one run per method (same filters): loss, and train
    (solid) / validation (dashed) accuracy, against the epoch counted over the
    whole run; a dotted line marks the first pruning epoch.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from prunelab._validation import check_choice, check_number
from prunelab.results.analysis import Group, aggregate, pareto_front
from prunelab.results.figures import figure_kind, figure_name, panel_grid
from prunelab.results.records import (
    LABELS,
    NoDataError,
    check_metric,
    format_level,
    is_percent_metric,
    label_values,
    metric_keys,
    metric_value,
    select_labels,
)
from prunelab.store import RunRecord

_SELECTION_KEYS = ("methods", "sparsity", "dataset", "model", "seed")


#: Matplotlib's ten tableau colours, in order: one per method (or per ``color_by`` value).
PALETTE = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "tab:gray",
)


def _colors(done: list[RunRecord]) -> dict[str, Any]:
    """One colour per method, the same in every panel and figure."""
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(label_values(done, "method"))}


def _metric(declaration: dict, spec: dict, done: list[RunRecord], where: str) -> str:
    outputs = spec.get("outputs") or {}
    metric = declaration.get("metric") or outputs.get("metric") or "accuracy"
    return check_metric(done, metric, where=where)


def _methods(declaration: dict, done: list[RunRecord], where: str) -> list[str] | None:
    methods = declaration.get("methods")
    if methods is None:
        return None
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list):
        raise TypeError(f"the 'methods' parameter of {where} must be a list of method labels. Got {methods!r} instead.")
    present = [str(m) for m in label_values(done, "method")]
    return [check_choice("methods", m, present, where=where) for m in methods]


def _split_by(declaration: dict, where: str) -> list[str]:
    split = declaration.get("split_by", ["dataset"])
    if isinstance(split, str):
        split = [split]
    if not isinstance(split, list):
        raise TypeError(
            f"the 'split_by' parameter of {where} must be a list of labels among: "
            f"{', '.join(sorted(LABELS))}. Got {split!r} instead."
        )
    return [check_choice("split_by", key, LABELS, where=where) for key in split]


def _panel_title(keys: Sequence[str], values: Sequence[Any]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in zip(keys, values))


# -------------------------------------------------------------------------- metric vs x lines
def _lines(records: list[RunRecord], declaration: dict, spec: dict, *, kind: str, x: str) -> list:
    where = f"figure {kind}"
    done = select_labels(
        [r for r in records if r.status == "done"], declaration, where=where, keys=("models",), known=records
    )
    metric = _metric(declaration, spec, done, where)
    split_by = _split_by(declaration, where)
    methods = _methods(declaration, done, where)
    reference = _pareto_method(declaration, done, where)
    xscale = check_choice("xscale", declaration.get("xscale", "linear"), ("linear", "logit"), where=where)
    groups = [g for g in aggregate(done, metric) if g.mean is not None]
    if x == "nonzero_params":
        groups = [g for g in groups if g.nonzero_params is not None]
        if not groups:
            raise NoDataError(
                f"{where} needs the metric 'nonzero_params', and no finished run with a value of {metric!r} has it."
            )
    if not groups:
        raise NoDataError(f"{where}: no finished run has a value of {metric!r}.")
    scale = 100.0 if is_percent_metric(metric, [metric_value(r, metric) for r in done]) else 1.0
    colors = _colors(done)
    panels = [
        combo
        for combo in itertools.product(*(label_values(done, k) for k in split_by))
        if any(_matches(g, split_by, combo) for g in groups)
    ]
    figure, axes = panel_grid(len(panels))
    for ax, combo in zip(axes, panels):
        subset = [g for g in groups if _matches(g, split_by, combo)]
        ref = [g for g in subset if g.method == reference]
        shown = [g for g in subset if g.method != reference and (methods is None or g.method in methods)]
        _draw_lines(ax, shown, split_by, x, scale, colors)
        if ref and reference is not None:
            _draw_front(ax, ref, x, scale, reference)
        if x == "nonzero_params":
            _count_axis(ax)
        else:
            _sparsity_axis(ax, xscale)
        ax.set_ylabel(metric + (" (%)" if scale == 100.0 else ""))
        ax.set_title(_panel_title(split_by, combo), fontsize="medium")
        ax.grid(True, alpha=0.3)
        _set_ylim(ax, declaration, where)
    _legends(figure, axes)
    _suptitle(figure, declaration)
    return [(figure_name(declaration, kind), figure)]


MAX_PANEL_LEGEND = 10


def _legends(figure, axes) -> None:
    """A legend in each panel; with more than MAX_PANEL_LEGEND entries (a design-space grid), one
    shared legend below the panels instead, in two columns, the figure made taller to hold it."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(text, handle)
    if len(entries) <= MAX_PANEL_LEGEND:
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        return
    width, height = figure.get_size_inches()
    figure.set_size_inches(max(width, 9.0), height + 0.2 * math.ceil(len(entries) / 2) + 0.3)
    figure.legend(list(entries.values()), list(entries), loc="outside lower center", ncol=2, fontsize="x-small")


def _matches(group: Group, keys: Sequence[str], values: Sequence[Any]) -> bool:
    return all(getattr(group, k) == v for k, v in zip(keys, values))


def _pareto_method(declaration: dict, done: list[RunRecord], where: str) -> str | None:
    pareto = declaration.get("pareto_of")
    if pareto is None:
        return None
    if not isinstance(pareto, dict) or set(pareto) != {"method"}:
        raise ValueError(
            f"the 'pareto_of' parameter of {where} must be a mapping {{method: LABEL}}. Got {pareto!r} instead."
        )
    present = [str(m) for m in label_values(done, "method")]
    return check_choice("pareto_of", pareto["method"], present, where=where)


def _draw_lines(ax, groups: list[Group], split_by: Sequence[str], x: str, scale: float, colors: dict[str, Any]) -> None:
    """One errorbar line per (method, model, dataset) not fixed by the panel; labels name what varies.

    A method whose several models each have a single level in the panel (a width family of dense
    models) is drawn as one line through its models instead of one point per model.
    """
    keys = [k for k in ("method", "model", "dataset") if k not in split_by]
    family = _families(groups, keys)

    def line_of(group: Group) -> tuple:
        return tuple(getattr(group, k) if not (k == "model" and group.method in family) else None for k in keys)

    lines = list(dict.fromkeys(line_of(g) for g in groups))
    varying = [i for i, k in enumerate(keys) if k == "method" or len({key[i] for key in lines}) > 1]
    models = list(dict.fromkeys(g.model for g in groups))
    markers = ("o", "s", "^", "D", "v", "P", "X")
    for line_key in lines:
        line = sorted((g for g in groups if line_of(g) == line_key), key=lambda g: _x(g, x))
        first = line[0]
        label = " · ".join(str(line_key[i]) for i in varying if line_key[i] is not None)
        ax.errorbar(
            [_x(g, x) for g in line],
            [_mean(g) * scale for g in line],
            yerr=[(g.std or 0.0) * scale for g in line],
            label=label,
            capsize=3,
            color=colors.get(first.method),
            marker=markers[models.index(first.model) % len(markers)],
            markersize=4,
            linewidth=1.2,
            linestyle=_line_style(colors, first.method),
        )


def _line_style(colors: dict[str, Any], method: str) -> str:
    """Solid for the first 10 methods, then dashed, then dotted: the palette has 10 colours."""
    index = list(colors).index(method) if method in colors else 0
    return ("-", "--", ":")[index // 10 % 3]


def _families(groups: list[Group], keys: Sequence[str]) -> set[str]:
    """Methods with several models in the panel, each model at a single level."""
    if "model" not in keys:
        return set()
    points: dict[str, dict[tuple, int]] = {}
    for g in groups:
        per_model = points.setdefault(g.method, {})
        at = (g.model, g.dataset if "dataset" in keys else None)
        per_model[at] = per_model.get(at, 0) + 1
    return {
        method
        for method, counts in points.items()
        if len({m for m, _ in counts}) > 1 and all(n == 1 for n in counts.values())
    }


def _x(group: Group, x: str) -> float:
    if x != "nonzero_params":
        return group.sparsity
    assert group.nonzero_params is not None  # _lines keeps only the groups that have it
    return group.nonzero_params


def _mean(group: Group) -> float:
    assert group.mean is not None  # _lines keeps only the groups with a mean
    return group.mean


def _draw_front(ax, groups: list[Group], x: str, scale: float, method: str) -> None:
    points = [(_x(g, x), _mean(g) * scale) for g in groups]
    ax.scatter(
        [p[0] for p in points],
        [p[1] for p in points],
        color="0.65",
        marker="s",
        s=14,
        label=f"{method} (all)",
        zorder=1,
    )
    front = [points[i] for i in pareto_front(points)]
    ax.plot(
        [p[0] for p in front],
        [p[1] for p in front],
        color="0.25",
        drawstyle="steps-post",
        linewidth=1.2,
        label=f"{method} Pareto front",
        zorder=1,
    )


def _count_axis(ax) -> None:
    """Log x with ticks at 1, 2, 5 × 10^k labelled compactly (200, 5k, 1.2M), no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_compact))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("non-zero parameters")


def _compact(value: float, _position=None) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _sparsity_axis(ax, xscale: str) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.set_xlabel("sparsity (fraction of weights removed)")
    if xscale == "logit":
        ax.set_xscale("logit")
    else:
        ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))


def _set_ylim(ax, declaration: dict, where: str) -> None:
    """``ylim: [low, high]``, in the plotted unit (percent for accuracy)."""
    ylim = declaration.get("ylim")
    if ylim is None:
        return
    if not (
        isinstance(ylim, list)
        and len(ylim) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ylim)
        and ylim[0] < ylim[1]
    ):
        raise TypeError(
            f"the 'ylim' parameter of {where} must be [low, high] with low < high, in the "
            f"plotted unit (percent for accuracy). Got {ylim!r}."
        )
    ax.set_ylim(*ylim)


def _suptitle(figure, declaration: dict) -> None:
    title = declaration.get("title")
    if title is not None:
        figure.suptitle(str(title))


# ----------------------------------------------------------------------- metric vs metric
@figure_kind("tradeoff", ("x", "xscale", "split_by", "methods", "models", "color_by"))
def tradeoff(records: list[RunRecord], declaration: dict, spec: dict) -> list:
    """The metric (y) against a second metric ``x`` (e.g. ``measured_speedup``): one point per
    (method, model, dataset, level) at the means over seeds, with both standard deviations as
    error bars; one marker shape per level. ``color_by`` colours the points by one choice of a
    grid method's label (``granularity`` colours ``design[granularity=filter,...]`` by
    ``filter``; a method whose label lacks the key takes the value from its config), else by
    method."""
    where = "figure tradeoff"
    done = select_labels(
        [r for r in records if r.status == "done"], declaration, where=where, keys=("methods", "models"), known=records
    )
    metric = _metric(declaration, spec, done, where)
    if "x" not in declaration:
        raise ValueError(
            f"{where} needs 'x', the metric of the horizontal axis; one of: {', '.join(metric_keys(done))}."
        )
    x_metric = check_choice("x", declaration["x"], metric_keys(done), where=where)
    xscale = check_choice("xscale", declaration.get("xscale", "linear"), ("linear", "log"), where=where)
    split_by = _split_by(declaration, where)
    color_by = declaration.get("color_by")
    if color_by is not None and (not isinstance(color_by, str) or not color_by):
        raise TypeError(
            f"the 'color_by' parameter of {where} must be the name of a method choice "
            f"(e.g. granularity). Got {color_by!r} instead."
        )
    values = {r.id: _choice(r, color_by) for r in done} if color_by else {r.id: r.method for r in done}
    if color_by and all(v is None for v in values.values()):
        raise ValueError(f"the 'color_by' parameter of {where}: no run's method label or config has {color_by!r}.")
    cells: dict[tuple, list[RunRecord]] = {}
    for r in done:
        cells.setdefault((r.dataset, r.model, r.method, r.sparsity), []).append(r)
    points = []
    for (dataset, model, method, sparsity), runs in cells.items():
        xs = [v for v in (metric_value(r, x_metric) for r in runs) if not math.isnan(v)]
        ys = [v for v in (metric_value(r, metric) for r in runs) if not math.isnan(v)]
        if xs and ys:
            points.append(
                {
                    "dataset": dataset,
                    "model": model,
                    "method": method,
                    "sparsity": sparsity,
                    "x": statistics.fmean(xs),
                    "y": statistics.fmean(ys),
                    "xerr": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                    "yerr": statistics.stdev(ys) if len(ys) > 1 else 0.0,
                    "color": str(values[runs[0].id]),
                }
            )
    if not points:
        raise NoDataError(f"{where}: no finished run has both {metric!r} and {x_metric!r}.")
    scale = 100.0 if is_percent_metric(metric, [p["y"] for p in points]) else 1.0
    x_scale = 100.0 if is_percent_metric(x_metric, [p["x"] for p in points]) else 1.0
    colors = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(dict.fromkeys(p["color"] for p in points))}
    levels = sorted({p["sparsity"] for p in points})
    markers = ("o", "s", "^", "D", "v", "P", "X", "*")
    panels = list(dict.fromkeys(tuple(p[k] for k in split_by) for p in points))
    figure, axes = panel_grid(len(panels))
    for ax, combo in zip(axes, panels):
        for p in (p for p in points if tuple(p[k] for k in split_by) == combo):
            ax.errorbar(
                p["x"] * x_scale,
                p["y"] * scale,
                xerr=p["xerr"] * x_scale,
                yerr=p["yerr"] * scale,
                color=colors[p["color"]],
                marker=markers[levels.index(p["sparsity"]) % len(markers)],
                markersize=5,
                linestyle="none",
                capsize=2,
                elinewidth=0.7,
                alpha=0.85,
            )
        if xscale == "log":
            ax.set_xscale("log")
        ax.set_xlabel(x_metric + (" (%)" if x_scale == 100.0 else ""))
        ax.set_ylabel(metric + (" (%)" if scale == 100.0 else ""))
        ax.set_title(_panel_title(split_by, combo), fontsize="medium")
        ax.grid(True, alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=c, marker="o", linestyle="none", label=f"{color_by or 'method'} = {v}")
        for v, c in colors.items()
    ]
    handles += [
        Line2D([], [], color="0.3", marker=markers[i % len(markers)], linestyle="none", label=format_level(level))
        for i, level in enumerate(levels)
    ]
    figure.legend(handles=handles, loc="outside right center", fontsize="small")
    _suptitle(figure, declaration)
    return [(figure_name(declaration, "tradeoff"), figure)]


def _choice(record: RunRecord, key: str) -> Any:
    """One design choice of a run: ``key=value`` in its method label's brackets, else the value
    in its method config (a schedule's name for a mapping), else None."""
    found = re.search(rf"[\[,]{re.escape(key)}=([^,\]]+)", record.method)
    if found:
        return found.group(1)
    value = (record.config or {}).get("method", {}).get(key)
    if isinstance(value, dict):
        value = value.get("name")
    return value


@figure_kind("accuracy_vs_params", ("split_by", "methods", "models", "pareto_of", "ylim"))
def accuracy_vs_params(records: list[RunRecord], declaration: dict, spec: dict) -> list:
    """Metric vs non-zero parameters (log x), one line per method, error bars = std over seeds."""
    return _lines(records, declaration, spec, kind="accuracy_vs_params", x="nonzero_params")


@figure_kind("accuracy_vs_sparsity", ("split_by", "methods", "models", "pareto_of", "xscale", "ylim"))
def accuracy_vs_sparsity(records: list[RunRecord], declaration: dict, spec: dict) -> list:
    """Metric vs target sparsity, one line per method, error bars = std over seeds."""
    return _lines(records, declaration, spec, kind="accuracy_vs_sparsity", x="sparsity")


# --------------------------------------------------------------------------- per-run figures
def _select(
    records: list[RunRecord], declaration: dict, where: str, has: Callable[[RunRecord], bool], needs: str
) -> dict[tuple[str, str], list[RunRecord]]:
    """One run per method for each (dataset, model), after the declaration's filters."""
    runs = [r for r in records if r.status == "done" and has(r)]
    if not runs:
        raise NoDataError(f"{where}: no finished run has {needs}.")
    methods = _methods(declaration, runs, where)
    if methods is not None:
        runs = [r for r in runs if r.method in methods]
    for key in ("dataset", "model"):
        if key in declaration:
            present = [str(v) for v in label_values(runs, key)]
            value = check_choice(key, declaration[key], present, where=where)
            runs = [r for r in runs if getattr(r, key) == value]
    levels = label_values(runs, "sparsity")
    if "sparsity" in declaration:
        level = check_number("sparsity", declaration["sparsity"], where=where, low=0.0, high=1.0)
        if not any(math.isclose(level, s, abs_tol=1e-9) for s in levels):
            raise ValueError(
                f"the 'sparsity' parameter of {where} must be a level with {needs}: "
                f"{', '.join(f'{s:g}' for s in levels)}. Got {level!r} instead."
            )
    else:
        level = levels[-1]
    runs = [r for r in runs if math.isclose(r.sparsity, level, abs_tol=1e-9)]
    seeds = label_values(runs, "seed")
    if "seed" in declaration:
        seed = check_number("seed", declaration["seed"], where=where, integer=True)
        if seed not in seeds:
            raise ValueError(
                f"the 'seed' parameter of {where} must be a seed with {needs} at sparsity "
                f"{level:g}: {', '.join(map(str, seeds))}. Got {seed!r} instead."
            )
    else:
        seed = seeds[0]
    panels: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        if run.seed == seed:
            chosen = panels.setdefault((run.dataset, run.model), [])
            if all(r.method != run.method for r in chosen):
                chosen.append(run)
    return panels


def _histogram(record: RunRecord) -> tuple[list[float], list[float]] | None:
    hist = (record.metrics or {}).get("weight_histogram")
    if not isinstance(hist, dict):
        return None
    edges, counts = hist.get("edges"), hist.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list) or len(edges) != len(counts) + 1 or not counts:
        return None
    return [float(e) for e in edges], [float(c) for c in counts]


@figure_kind("weight_histogram", (*_SELECTION_KEYS, "density"))
def weight_histogram(records: list[RunRecord], declaration: dict, spec: dict) -> list:
    """Overlaid histograms of the non-zero prunable weights, one run per method."""
    where = "figure weight_histogram"
    density = declaration.get("density", True)
    if not isinstance(density, bool):
        raise TypeError(f"the 'density' parameter of {where} must be true or false. Got {density!r} instead.")
    panels = _select(records, declaration, where, lambda r: _histogram(r) is not None, "a 'weight_histogram' metric")
    colors = _colors([r for r in records if r.status == "done"])
    figure, axes = panel_grid(len(panels))
    for ax, ((dataset, model), runs) in zip(axes, panels.items()):
        for run in runs:
            histogram = _histogram(run)
            assert histogram is not None  # _select kept only the runs that have one
            edges, counts = histogram
            if density:
                total = sum(counts)
                counts = [
                    c / (total * (b - a)) if total and b > a else 0.0 for c, a, b in zip(counts, edges[:-1], edges[1:])
                ]
            ax.stairs(counts, edges, label=run.method, color=colors.get(run.method), linewidth=1.4)
        run = runs[0]
        ax.set_title(f"{dataset}, {model}, sparsity {format_level(run.sparsity)}, seed {run.seed}", fontsize="medium")
        ax.set_xlabel("weight value (non-zero prunable weights)")
        ax.set_ylabel("density" if density else "count")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    _suptitle(figure, declaration)
    return [(figure_name(declaration, "weight_histogram"), figure)]


def _curve(record: RunRecord) -> list[dict]:
    curve = record.curve if isinstance(record.curve, list) else []
    return [entry for entry in curve if isinstance(entry, dict)]


def _series(curve: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for i, entry in enumerate(curve, start=1):
        if key in entry and entry[key] is not None:
            value = entry[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                xs.append(i)
                ys.append(float(value))
    return xs, ys


@figure_kind("curves", _SELECTION_KEYS)
def curves(records: list[RunRecord], declaration: dict, spec: dict) -> list:
    """Loss and accuracy per epoch of one run per method, a row of two axes per (dataset, model)."""
    where = "figure curves"
    panels = _select(records, declaration, where, lambda r: bool(_curve(r)), "a training curve")
    colors = _colors([r for r in records if r.status == "done"])
    figure, axes = panel_grid(len(panels), per_panel=2)
    for row, ((dataset, model), runs) in enumerate(panels.items()):
        loss_ax, acc_ax = axes[2 * row], axes[2 * row + 1]
        for run in runs:
            curve, color = _curve(run), colors.get(run.method)
            loss_ax.plot(*_series(curve, "loss"), color=color, label=run.method)
            acc_ax.plot(*_percent(_series(curve, "train_accuracy")), color=color, label=f"{run.method} train")
            xs, ys = _series(curve, "val_accuracy")
            if xs:
                acc_ax.plot(*_percent((xs, ys)), color=color, linestyle="--", label=f"{run.method} val")
            first_prune = next((i for i, e in enumerate(curve, start=1) if e.get("phase") == "prune"), None)
            if first_prune is not None:
                for ax in (loss_ax, acc_ax):
                    ax.axvline(first_prune - 0.5, color=color, linestyle=":", linewidth=1)
        title = f"{dataset}, {model}, sparsity {format_level(runs[0].sparsity)}, seed {runs[0].seed}"
        for ax, ylabel in ((loss_ax, "training loss"), (acc_ax, "accuracy (%)")):
            ax.set_title(title, fontsize="medium")
            ax.set_xlabel("epoch (dense training, then pruning)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    _suptitle(figure, declaration)
    return [(figure_name(declaration, "curves"), figure)]


@figure_kind("retraining", ("methods", "ylim"))
def retraining(records: list[RunRecord], declaration: dict, spec: dict) -> list:
    """Test accuracy during fine-tuning (each run's ``retrain_curve``, recorded when the spec
    sets ``training.retrain_tolerance``), mean ± std over seeds per method, one panel per
    (dataset, model), with the dense models' mean accuracy as a dashed line. Step 0 is right
    after the (first) prune."""
    where = "figure retraining"
    done = [r for r in records if r.status == "done" and (r.metrics or {}).get("retrain_curve")]
    if not done:
        raise NoDataError(
            f"{where}: no finished run has a retraining curve; set training.retrain_tolerance "
            f"in the spec to record one."
        )
    methods = _methods(declaration, done, where)
    if methods is not None:
        done = [r for r in done if r.method in methods]
    colors = _colors(done)
    panels: dict[tuple, list[RunRecord]] = {}
    for run in done:
        panels.setdefault((run.dataset, run.model), []).append(run)
    figure, axes = panel_grid(len(panels))
    for ax, ((dataset, model), runs) in zip(axes, panels.items()):
        by_method: dict[str, list] = {}
        for run in runs:
            by_method.setdefault(run.method, []).append(dict((run.metrics or {})["retrain_curve"]))
        for method, curves_ in by_method.items():
            steps = sorted(set.intersection(*(set(c) for c in curves_)))
            values = [[100.0 * c[step] for c in curves_] for step in steps]
            mean = [sum(v) / len(v) for v in values]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            color = colors.get(method)
            ax.plot(steps, mean, color=color, label=f"{method} (n={len(curves_)})")
            ax.fill_between(
                steps,
                [m - d for m, d in zip(mean, std)],
                [m + d for m, d in zip(mean, std)],
                color=color,
                alpha=0.15,
                linewidth=0,
            )
        dense = [
            100.0 * m["accuracy_dense"] for m in (r.metrics or {} for r in runs) if m.get("accuracy_dense") is not None
        ]
        if dense:
            ax.axhline(sum(dense) / len(dense), color="black", linestyle="--", linewidth=1, label="dense")
        _set_ylim(ax, declaration, where)
        ax.set_title(f"{dataset}, {model}", fontsize="medium")
        ax.set_xlabel("fine-tuning step (0 = right after pruning)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    _suptitle(figure, declaration)
    return [(figure_name(declaration, "retraining"), figure)]


def _percent(series: tuple[list[int], list[float]]) -> tuple[list[int], list[float]]:
    xs, ys = series
    return xs, [100.0 * y for y in ys]
