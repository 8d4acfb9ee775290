"""Study B's figures and tables (prunelab.results.unit_kinds), from fake study databases whose
penalties, selections and iterative curves are chosen by hand."""

from __future__ import annotations

import csv
import io
import math
import re
import statistics

import numpy as np
import pytest
from test_results import build_study

from prunelab.store import RunRecord, Store

MODEL = "small_conv"
SCORERS = ("rand", "norm", "rs", "abs_rs", "mrs", "abs_mrs")
METHODS = tuple(m for s in SCORERS for m in (s, f"bp_{s}"))
# Base penalty per method: mean replacement (bp_) lowers it for every scorer but norm.
BASE = {
    "rand": 1.0,
    "bp_rand": 0.9,
    "norm": 0.8,
    "bp_norm": 0.85,
    "rs": 0.6,
    "bp_rs": 0.3,
    "abs_rs": 0.7,
    "bp_abs_rs": 0.4,
    "mrs": 0.65,
    "bp_mrs": 0.2,
    "abs_mrs": 0.75,
    "bp_abs_mrs": 0.1,
}
STEPS = (0, 250, 500)
# (layers, fraction, count, finetune_steps) → factor on the base penalty.
SETTINGS = {
    ("all", 0.1, None, 0): 1.0,
    ("all", None, 1, 0): 0.5,
    ("first_conv", 0.1, None, 0): 2.0,
    ("first_conv", None, 1, 0): 0.25,
    ("all", 0.1, None, 100): 0.1,
}
T_975_2 = 4.302652729911275  # Student's t quantile 0.975 with 2 degrees of freedom
SEED_OFFSET = 0.001  # seeds 0, 1, 2 add -0.001, 0, +0.001: sample std 0.001 exactly


def penalty(method, step, seed, factor):
    """factor · base · (1 + step/250) + 0.001·(seed − 1): the mean over 3 seeds drops the offset."""
    return factor * BASE[method] * (1 + step / 250) + SEED_OFFSET * (seed - 1)


def probe(step, method, layers, fraction, count, finetune_steps, value):
    return {
        "step": step,
        "method": method,
        "scorer": method.removeprefix("bp_"),
        "mean_replacement": method.startswith("bp_"),
        "layers": layers,
        "fraction": fraction,
        "count": count,
        "finetune_steps": finetune_steps,
        "loss_before": 0.5,
        "loss_after": None if value is None else 0.5 + value,
        "penalty": value,
    }


# Units each scorer selects in layer conv1 (8 units) at steps 0, 250, 500, per seed.
SELECTIONS = {0: [[0, 1], [1, 2], [0, 1]], 1: [[0, 1], [0, 1], [4, 5, 6]], 2: [[7], [6], [5]]}
EVER_NORM_CONV1 = [5 / 24, 7 / 24, 11 / 24]  # mean over seeds of |∪ units| / 8: (2+2+1), (3+2+2), (3+5+3)


def selections(seed):
    out = []
    for k, step in enumerate(STEPS):
        out.append({"step": step, "scorer": "norm", "layer": "conv1", "units": SELECTIONS[seed][k]})
        out.append({"step": step, "scorer": "rand", "layer": "conv1", "units": [[0, 1, 2, 3], [4, 5, 6, 7], []][k]})
        out.append({"step": step, "scorer": "norm", "layer": "fc1", "units": [0]})
    return out


def probe_runs():
    runs = []
    for seed in range(3):
        probes = [
            probe(step, m, layers, fraction, count, ft, penalty(m, step, seed, factor))
            for (layers, fraction, count, ft), factor in SETTINGS.items()
            for step in STEPS
            for m in METHODS
        ]
        runs.append(
            {
                "dataset": "mnist",
                "model": MODEL,
                "method": "probe",
                "sparsity": 0.0,
                "seed": seed,
                "metrics": {
                    "accuracy": 0.9,
                    "loss": 0.3,
                    "probes": probes,
                    "selections": selections(seed),
                    "units_total": {"conv1": 8, "fc1": 4},
                },
            }
        )
    # A second dataset with one seed: its curves have no confidence band.
    probes = [probe(step, m, "all", 0.1, None, 0, penalty(m, step, 1, 1.0)) for step in STEPS for m in METHODS]
    runs.append(
        {
            "dataset": "fashion",
            "model": MODEL,
            "method": "probe",
            "sparsity": 0.0,
            "seed": 0,
            "metrics": {"accuracy": 0.8, "probes": probes},
        }
    )
    return runs


# Iterative pruning: loss = a + b·r + 0.02·seed, accuracy = 0.9 − c·r − 0.01·seed, r = k·0.01 up to 30 %.
ITERATIVE = {"rand": (0.3, 2.0, 1.0), "bp_mrs": (0.25, 1.0, 0.5)}


def iterative_runs():
    runs = []
    for method, (a, b, c) in ITERATIVE.items():
        for seed in range(2):
            curve = [
                {
                    "removed": k * 0.01,
                    "step": 100 * k,
                    "loss": a + b * k * 0.01 + 0.02 * seed,
                    "accuracy": 0.9 - c * k * 0.01 - 0.01 * seed,
                }
                for k in range(31)
            ]
            runs.append(
                {
                    "dataset": "mnist",
                    "model": MODEL,
                    "method": method,
                    "sparsity": 0.0,
                    "seed": seed,
                    "metrics": {"accuracy": curve[-1]["accuracy"], "iterative": curve},
                }
            )
    return runs


@pytest.fixture(scope="module")
def probe_study(tmp_path_factory):
    return build_study(tmp_path_factory.mktemp("b") / "probes.db", probe_runs())


@pytest.fixture(scope="module")
def iterative_study(tmp_path_factory):
    return build_study(tmp_path_factory.mktemp("b") / "iterative.db", iterative_runs())


def records(path):
    with Store(path) as store:
        return store.records(status="done")


def figure(path_or_records, declaration):
    from prunelab.results.figures import FIGURES

    runs = records(path_or_records) if not isinstance(path_or_records, list) else path_or_records
    [(name, fig)] = FIGURES.get(declaration["kind"])(runs, declaration, {})
    assert name == declaration.get("name", declaration["kind"])
    return fig


def panels(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def labelled(ax):
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def bands(ax):
    from matplotlib.collections import PolyCollection

    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def memory_run(metrics, *, seed=0, dataset="mnist", method="probe", run_id=None):
    return RunRecord(
        id=run_id or f"r{seed}{dataset}{method}",
        position=0,
        config={},
        dataset=dataset,
        model=MODEL,
        method=method,
        sparsity=0.0,
        seed=seed,
        status="done",
        in_spec=True,
        attempts=1,
        metrics=metrics,
        curve=None,
        error=None,
        worker=None,
        started_at=None,
        finished_at=None,
        seconds=None,
        versions=None,
    )


# ------------------------------------------------------------------------------ registration
KINDS = ("penalty_curves", "mean_replacement_scatter", "performance_profile", "units_selected", "iterative_pruning")


@pytest.mark.parametrize("module", ["prunelab.results.figures", "prunelab.results.tables"])
def test_importing_figures_or_tables_alone_registers_every_study_b_kind_without_side_effects(module):
    import subprocess
    import sys

    code = (
        f"import sys, {module}\n"
        "from prunelab.results.figures import FIGURES\n"
        "from prunelab.results.tables import TABLE_KINDS\n"
        "print(','.join(FIGURES.names())); print(','.join(TABLE_KINDS.names()))\n"
        "print('matplotlib' in sys.modules, 'scipy.stats' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(KINDS) <= set(out[0].split(","))
    assert out[1] == "iterative,mean_replacement,penalties"
    assert out[2:] == ["False", "False"]  # matplotlib and scipy are imported lazily


def test_study_b_figure_kinds_do_not_take_a_metric():
    from prunelab.results.figures import FIGURE_KEYS

    assert all("metric" not in FIGURE_KEYS[k] and "title" in FIGURE_KEYS[k] for k in KINDS)


# -------------------------------------------------------------------------- penalty curves
def test_penalty_curves_one_panel_per_setting_and_one_mean_line_per_method(probe_study):
    fig = figure(probe_study, {"kind": "penalty_curves"})
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == [
        f"mnist, {MODEL}\nlayers all, 1 unit, no fine-tuning",
        f"mnist, {MODEL}\nlayers all, 10 %, no fine-tuning",
        f"mnist, {MODEL}\nlayers all, 10 %, 100 fine-tuning steps",
        f"mnist, {MODEL}\nlayers first_conv, 1 unit, no fine-tuning",
        f"mnist, {MODEL}\nlayers first_conv, 10 %, no fine-tuning",
        f"fashion, {MODEL}\nlayers all, 10 %, no fine-tuning",
    ]
    ax = axes[1]  # all, 10 %, factor 1
    lines = labelled(ax)
    assert list(lines) == list(METHODS)
    for method in METHODS:
        assert list(lines[method].get_xdata()) == list(STEPS)
        assert list(lines[method].get_ydata()) == pytest.approx([BASE[method] * k for k in (1, 2, 3)])
    assert lines["rs"].get_color() == lines["bp_rs"].get_color()
    assert (lines["rs"].get_linestyle(), lines["bp_rs"].get_linestyle()) == ("--", "-")
    assert ax.get_yscale() == "linear"  # 0.099 .. 3.001: under two decades


def test_penalty_curves_band_is_the_95_percent_t_interval_and_absent_for_one_seed(probe_study):
    axes = panels(figure(probe_study, {"kind": "penalty_curves", "methods": ["rs"]}))
    assert all(list(labelled(ax)) == ["rs"] for ax in axes)
    [band] = bands(axes[1])
    half = T_975_2 * SEED_OFFSET / math.sqrt(3)
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.max() == pytest.approx(3 * 0.6 + half) and ys.min() == pytest.approx(0.6 - half)
    assert bands(axes[-1]) == []  # fashion: one seed, no band


def test_penalty_curves_band_std_or_none(probe_study):
    axes = panels(figure(probe_study, {"kind": "penalty_curves", "methods": ["rs"], "band": "std"}))
    [band] = bands(axes[1])
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.max() == pytest.approx(3 * 0.6 + SEED_OFFSET) and ys.min() == pytest.approx(0.6 - SEED_OFFSET)
    axes = panels(figure(probe_study, {"kind": "penalty_curves", "methods": ["rs"], "band": "none"}))
    assert all(bands(ax) == [] for ax in axes)
    with pytest.raises(ValueError, match="'band' parameter of figure penalty_curves must be one of: ci95, std"):
        figure(probe_study, {"kind": "penalty_curves", "band": "sem"})


def test_penalty_curves_filters_and_log_axis(probe_study):
    axes = panels(
        figure(
            probe_study,
            {
                "kind": "penalty_curves",
                "layers": "first_conv",
                "count": 1,
                "fraction": [0.1],
                "dataset": "mnist",
                "log": True,
            },
        )
    )
    assert len(axes) == 2 and all("first_conv" in ax.get_title() for ax in axes)
    assert all(ax.get_yscale() == "log" for ax in axes)
    [ax] = panels(figure(probe_study, {"kind": "penalty_curves", "finetune_steps": 100}))
    assert "100 fine-tuning steps" in ax.get_title()


def test_penalty_curves_cap_the_panels_and_say_so():
    from prunelab.results.unit_kinds import MAX_PANELS

    fractions = [round(0.01 * (k + 1), 2) for k in range(MAX_PANELS + 6)]
    probes = [
        probe(step, m, "all", f, None, 0, 0.1 + f) for f in fractions for step in (0, 250) for m in ("rs", "bp_rs")
    ]
    fig = figure([memory_run({"probes": probes})], {"kind": "penalty_curves", "title": "many"})
    assert len(panels(fig)) == MAX_PANELS
    assert fig.get_suptitle().startswith(f"many — first {MAX_PANELS} of {MAX_PANELS + 6} panels; narrow with layers")


def test_bad_filters_name_the_values_probed(probe_study):
    cases = [
        (
            {"methods": ["obd"]},
            ValueError,
            r"the 'methods' parameter of figure penalty_curves must be one of: "
            r"abs_mrs, abs_rs, bp_abs_mrs",
        ),
        (
            {"fraction": 0.3},
            ValueError,
            r"the 'fraction' parameter of figure penalty_curves must be among the "
            r"values probed: 0.1. Got 0.3 instead",
        ),
        ({"fraction": 1.5}, ValueError, r"must be a float in \(0, 1\]"),
        ({"count": 2}, ValueError, r"values probed: 1. Got 2 instead"),
        ({"finetune_steps": "100"}, TypeError, r"'finetune_steps' parameter .* must be an int"),
        (
            {"layers": ["all", 3]},
            TypeError,
            r"'layers' parameter .* must be a str or a list of str among: all, "
            r"first_conv",
        ),
        ({"log": "yes"}, TypeError, r"the 'log' parameter of figure penalty_curves must be true, false or 'auto'"),
        ({"methods": []}, TypeError, r"must be a str or a non-empty list"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            figure(probe_study, {"kind": "penalty_curves", **options})


# ------------------------------------------------------------------ mean-replacement scatter
def test_scatter_pairs_each_scorer_with_its_mean_replacement_twin(probe_study):
    [ax] = panels(figure(probe_study, {"kind": "mean_replacement_scatter", "dataset": "mnist"}))
    n = len(SCORERS) * 3 * len(STEPS) * len(SETTINGS)  # scorers × seeds × steps × settings
    assert ax.get_title() == f"mnist, {MODEL}\n83.3 % under y = x (n = {n})"  # 5 of 6 scorers gain
    points = {c.get_label(): c.get_offsets() for c in ax.collections if c.get_label() in SCORERS}
    assert list(points) == list(SCORERS)
    rs = np.asarray(points["rs"])
    assert len(rs) == n // len(SCORERS)
    expected = [-0.3 * f * (1 + s / 250) for _ in range(3) for f in SETTINGS.values() for s in STEPS]
    assert sorted(rs[:, 1] - rs[:, 0]) == pytest.approx(sorted(expected))  # bp_rs − rs, seed offsets cancel
    assert (np.asarray(points["norm"])[:, 1] > np.asarray(points["norm"])[:, 0]).all()
    diagonal = labelled(ax)["y = x"]
    assert list(diagonal.get_xdata()) == list(diagonal.get_ydata())
    # 0.009 .. 6.001, all positive: spans more than two decades, so auto chooses log-log.
    assert ax.get_xscale() == ax.get_yscale() == "log" and ax.get_xlim() == ax.get_ylim()


def test_scatter_split_by_and_linear_axes(probe_study):
    axes = panels(
        figure(
            probe_study,
            {"kind": "mean_replacement_scatter", "split_by": ["layers"], "scorers": ["rs", "norm"], "log": False},
        )
    )
    assert [ax.get_title().split("\n")[:2] for ax in axes] == [
        [f"mnist, {MODEL}", "layers all"],
        [f"mnist, {MODEL}", "layers first_conv"],
        [f"fashion, {MODEL}", "layers all"],
    ]
    assert axes[0].get_title().endswith(f"50.0 % under y = x (n = {2 * 3 * 3 * 3})")
    assert all(ax.get_xscale() == "linear" for ax in axes)
    with pytest.raises(ValueError, match=r"the 'split_by' parameter .* must be one of: amount, finetune_steps, layers"):
        figure(probe_study, {"kind": "mean_replacement_scatter", "split_by": ["seed"]})


def test_axis_scale_is_symlog_for_signed_values_spanning_decades():
    from prunelab.results.unit_kinds import axis_scale

    assert axis_scale([0.5, 2.0], None) == ("linear", {})
    assert axis_scale([0.01, 2.0], None) == ("log", {})
    assert axis_scale([0.01, 2.0], False) == ("linear", {})
    assert axis_scale([0.5, 2.0], True) == ("log", {})
    scale, options = axis_scale([-0.01, 0.02, 5.0, 0.0], None)
    # the 10th percentile of |values| ≠ 0 is 0.012, rounded down to a decade
    assert np.quantile([0.01, 0.02, 5.0], 0.1) == pytest.approx(0.012)
    assert scale == "symlog" and options["linthresh"] == pytest.approx(0.01)


# ---------------------------------------------------------------------- performance profiles
# Two measurements (steps 0 and 250) of three methods:
#   step 0:   rs 1, bp_rs 0, norm 2  → t(τ) = 2 − 2τ
#   step 250: rs 1, bp_rs 3, norm 2  → t(τ) = 3 − 2τ
PROFILE = {0: {"rs": 1.0, "bp_rs": 0.0, "norm": 2.0}, 250: {"rs": 1.0, "bp_rs": 3.0, "norm": 2.0}}
# At τ = 0, .25, .5, .75, 1 (by hand from d < t):
EXPECTED_PROFILE = {"rs": [1, 1, 0.5, 0.5, 0], "bp_rs": [0.5, 0.5, 0.5, 0.5, 0], "norm": [0.5, 0.5, 0, 0, 0]}


def profile_run():
    probes = [probe(step, m, "all", 0.5, None, 0, v) for step, values in PROFILE.items() for m, v in values.items()]
    return memory_run({"probes": probes})


def test_performance_profile_by_hand_with_legend_by_area():
    [ax] = panels(figure([profile_run()], {"kind": "performance_profile", "taus": 5}))
    lines = labelled(ax)
    # Trapezoidal areas over τ with step 0.25: rs 0.625, bp_rs 0.4375, norm 0.1875.
    assert list(lines) == ["rs (0.625)", "bp_rs (0.438)", "norm (0.188)"]
    for label, line in lines.items():
        assert list(line.get_xdata()) == [0, 0.25, 0.5, 0.75, 1]
        assert list(line.get_ydata()) == EXPECTED_PROFILE[label.split()[0]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)
    assert ax.get_title() == f"mnist, {MODEL}\n2 measurements"


def test_performance_profile_measurements_span_runs_steps_and_settings(probe_study):
    axes = panels(figure(probe_study, {"kind": "performance_profile"}))
    assert [ax.get_title() for ax in axes] == [
        f"mnist, {MODEL}\n{3 * len(STEPS) * len(SETTINGS)} measurements",
        f"fashion, {MODEL}\n{len(STEPS)} measurements",
    ]
    lines = labelled(axes[0])
    assert len(lines) == 12 and len(lines[next(iter(lines))].get_xdata()) == 101
    # The seed offsets are common to all methods, so the ranking is the base ranking everywhere:
    # P_i(0) = 1 for every method but the worst (rand) and P_i(τ) < 1 further on.
    assert next(iter(lines)).startswith("bp_abs_mrs")
    assert lines[[k for k in lines if k.startswith("rand ")][0]].get_ydata()[0] == 0
    split = panels(
        figure(probe_study, {"kind": "performance_profile", "split_by": "finetune_steps", "dataset": "mnist"})
    )
    assert len(split) == 2 and split[1].get_title().endswith(f"100 fine-tuning steps\n{3 * len(STEPS)} measurements")
    with pytest.raises(ValueError, match=r"the 'taus' parameter of figure performance_profile must be an int in \[2"):
        figure(probe_study, {"kind": "performance_profile", "taus": 1})


# ------------------------------------------------------------------------- units selected
def test_units_selected_is_the_mean_ever_selected_fraction(probe_study):
    axes = panels(figure(probe_study, {"kind": "units_selected"}))
    assert [ax.get_title() for ax in axes] == [f"mnist, {MODEL}\nconv1 (8 units)", f"mnist, {MODEL}\nfc1 (4 units)"]
    lines = labelled(axes[0])
    assert list(lines) == ["rand (n=3)", "norm (n=3)"]
    assert list(lines["norm (n=3)"].get_ydata()) == pytest.approx(EVER_NORM_CONV1)
    assert list(lines["rand (n=3)"].get_ydata()) == pytest.approx([0.5, 1.0, 1.0])
    assert list(labelled(axes[1])["norm (n=3)"].get_ydata()) == pytest.approx([0.25] * 3)
    [only] = panels(figure(probe_study, {"kind": "units_selected", "layer": "conv1", "scorers": "norm"}))
    assert list(labelled(only)) == ["norm (n=3)"]


# ------------------------------------------------------------------------ iterative pruning
def test_iterative_figure_shows_loss_and_accuracy_mean_and_std_bands(iterative_study):
    loss, accuracy = panels(figure(iterative_study, {"kind": "iterative_pruning"}))
    assert loss.get_ylabel() == "loss" and accuracy.get_ylabel() == "accuracy (%)"
    assert list(labelled(loss)) == ["rand (n=2)", "bp_mrs (n=2)"]
    line = labelled(loss)["rand (n=2)"]
    assert len(line.get_xdata()) == 31
    assert line.get_ydata()[10] == pytest.approx(0.3 + 2.0 * 0.1 + 0.01)  # mean of the two seeds
    assert labelled(accuracy)["bp_mrs (n=2)"].get_ydata()[20] == pytest.approx(100 * (0.9 - 0.5 * 0.2 - 0.005))
    assert len(bands(loss)) == len(bands(accuracy)) == 2
    ys = bands(loss)[0].get_paths()[0].vertices[:, 1]
    assert ys.max() == pytest.approx(0.3 + 2.0 * 0.3 + 0.01 + 0.02 / math.sqrt(2))  # mean + sample std
    only = panels(figure(iterative_study, {"kind": "iterative_pruning", "methods": "rand"}))[0]
    assert list(labelled(only)) == ["rand (n=2)"]


# ------------------------------------------------------------------------------- no data
def test_each_kind_without_its_data_is_a_no_data_error(tmp_path):
    from prunelab.results.records import NoDataError
    from prunelab.results.tables import build_tables

    plain = records(
        build_study(
            tmp_path / "p.db",
            [{"dataset": "mnist", "method": "m", "sparsity": 0.5, "seed": 0, "metrics": {"accuracy": 0.9}}],
        )
    )
    for kind, message in (
        ("penalty_curves", "no finished run has unit-pruning probes"),
        ("mean_replacement_scatter", "no finished run has unit-pruning probes"),
        ("performance_profile", "no finished run has unit-pruning probes"),
        ("units_selected", "no finished run has unit selections"),
        ("iterative_pruning", "no finished run has an iterative-pruning curve"),
    ):
        with pytest.raises(NoDataError, match=f"figure {kind}: {message}"):
            figure(plain, {"kind": kind})
    for kind, message in (("penalties", "unit-pruning probes"), ("iterative", "an iterative-pruning curve")):
        with pytest.raises(NoDataError, match=rf"outputs.tables\[0\]: no finished run has {message}"):
            build_tables(plain, {"tables": [{"kind": kind}]})
    # Probes without a mean-replacement twin: no pair to draw.
    lonely = memory_run({"probes": [probe(0, m, "all", 0.1, None, 0, 1.0) for m in ("rs", "norm")]})
    with pytest.raises(NoDataError, match="no scorer was probed both without and with mean replacement"):
        figure([lonely], {"kind": "mean_replacement_scatter"})


def test_malformed_probes_are_reported_with_their_run():
    bad = memory_run(
        {
            "probes": [
                {
                    "step": 0,
                    "method": "rs",
                    "layers": "all",
                    "finetune_steps": 0,
                    "fraction": 0.1,
                    "count": 1,
                    "penalty": 1.0,
                }
            ]
        },
        run_id="abc",
    )
    with pytest.raises(
        ValueError,
        match=r"run abc \(mnist, small_conv, seed 0\): probes\[0\] must set exactly one "
        r"of 'fraction' and 'count'",
    ):
        figure([bad], {"kind": "penalty_curves"})
    missing = memory_run({"probes": [{"step": 0, "method": "rs"}]}, run_id="abc")
    with pytest.raises(ValueError, match=r"probes\[0\] lacks 'layers', 'finetune_steps'"):
        figure([missing], {"kind": "penalty_curves"})


# ---------------------------------------------------------------------------------- tables
def test_penalty_table_cells_are_mean_and_std_over_seeds_and_steps(probe_study):
    from prunelab.results.tables import build_tables

    tables = build_tables(records(probe_study), {"tables": [{"kind": "penalties"}]})
    assert [t.title for t in tables[::2]] == [
        f"pruning penalty (loss after − loss before), mean ± std over seeds and probe steps — dataset = {d}, "
        f"model = {MODEL}, layers = {layers}, finetune_steps = {ft}"
        for d, layers, ft in (
            ("mnist", "all", 0),
            ("mnist", "all", 100),
            ("mnist", "first_conv", 0),
            ("fashion", "all", 0),
        )
    ]
    table = tables[0]
    assert table.row_label == "method" and table.column_labels == ["1 unit", "10 %"]
    assert [key for key, _ in table.rows] == list(METHODS)
    cells = dict(table.rows)
    for method in METHODS:
        for column, factor in enumerate((0.5, 1.0)):
            values = [penalty(method, step, seed, factor) for seed in range(3) for step in STEPS]
            cell = cells[method][column]
            assert cell.n == 9
            assert cell.mean == pytest.approx(statistics.fmean(values))
            assert cell.std == pytest.approx(statistics.stdev(values))
    std = statistics.stdev(penalty("rs", step, seed, 1.0) for seed in range(3) for step in STEPS)
    assert cells["rs"][1].text == f"1.200 ± {std:.3f}"  # 4 significant digits of the mean
    assert tables[-2].column_labels == ["10 %"] and dict(tables[-2].rows)["rs"][0].n == 3


def test_win_rate_table_is_the_share_of_lowest_penalties(probe_study):
    from prunelab.results.tables import build_tables

    tables = build_tables(
        records(probe_study),
        {
            "tables": [
                {"kind": "penalties", "columns": "finetune_steps", "layers": "all", "fraction": 0.1, "dataset": "mnist"}
            ]
        },
    )
    penalties, wins = tables
    assert penalties.column_labels == wins.column_labels == ["0", "100"]
    assert wins.title.startswith("lowest penalty of the methods shown, % of measurements")
    rates = dict(wins.rows)
    assert rates["bp_abs_mrs"][0].text == "100.0 %" and rates["bp_abs_mrs"][0].mean == 1.0
    assert all(rates[m][k].text == "0.0 %" for m in METHODS[:-1] for k in range(2))
    rows = list(csv.reader(io.StringIO(wins.to_csv())))
    assert rows[0] == ["method", "0 mean", "0 std", "0 n", "100 mean", "100 std", "100 n"]
    assert rows[-1] == ["bp_abs_mrs", "1.0", "", "9", "1.0", "", "9"]
    no_wins = build_tables(records(probe_study), {"tables": [{"kind": "penalties", "win_rate": False}]})
    assert len(no_wins) == 4


def test_win_rate_ties_count_for_each_method_and_nan_never_wins():
    from prunelab.results.tables import build_tables

    values = {0: {"rs": 1.0, "norm": 1.0, "bp_rs": 2.0}, 250: {"rs": 3.0, "norm": None, "bp_rs": 2.0}}
    probes = [probe(step, m, "all", 0.5, None, 0, v) for step, vs in values.items() for m, v in vs.items()]
    penalties, wins = build_tables(
        [memory_run({"probes": probes})], {"tables": [{"kind": "penalties", "columns": "step"}]}
    )
    assert wins.column_labels == ["0", "250"]
    rates = {m: [c.text if c else None for c in row] for m, row in wins.rows}
    assert rates == {"norm": ["100.0 %", "n/a"], "rs": ["100.0 %", "0.0 %"], "bp_rs": ["0.0 %", "100.0 %"]}
    assert dict(penalties.rows)["norm"][1].text == "n/a"


def test_profile_measurements_match_the_win_rate_table():
    from prunelab.results.tables import build_tables

    penalties, wins = build_tables(
        [profile_run()], {"tables": [{"kind": "penalties", "digits": 2, "title": "penalty"}]}
    )
    assert penalties.title.startswith("penalty, mean ± std")
    assert {m: row[0].text for m, row in penalties.rows} == {
        "rs": "1.00 ± 0.00",
        "bp_rs": "1.50 ± 2.12",
        "norm": "2.00 ± 0.00",
    }
    assert {m: row[0].text for m, row in wins.rows} == {"rs": "50.0 %", "bp_rs": "50.0 %", "norm": "0.0 %"}


def test_iterative_table_columns_are_the_removed_fractions_reached(iterative_study):
    from prunelab.results.tables import build_tables

    [table] = build_tables(records(iterative_study), {"tables": [{"kind": "iterative"}]})
    assert table.title == (
        f"loss during iterative unit pruning, by units removed, mean ± std over seeds "
        f"— dataset = mnist, model = {MODEL}"
    )
    assert table.column_labels == ["0 %", "5 %", "10 %", "20 %", "30 %"]
    cells = dict(table.rows)
    assert list(cells) == ["rand", "bp_mrs"]  # the study's method order
    assert cells["rand"][2].mean == pytest.approx(0.3 + 2.0 * 0.1 + 0.01)
    assert cells["rand"][2].std == pytest.approx(0.02 / math.sqrt(2))
    assert cells["rand"][2].text == "0.5100 ± 0.0141"
    [accuracy] = build_tables(
        records(iterative_study),
        {"tables": [{"kind": "iterative", "metric": "accuracy", "removed": [0.045, 0.2, 0.5]}]},
    )
    assert accuracy.title.startswith("accuracy (%) during") and accuracy.column_labels == ["4.5 %", "20 %", "50 %"]
    cells = dict(accuracy.rows)
    assert cells["rand"][0].mean == pytest.approx(0.9 - 0.04 - 0.005)  # the last record at ≤ 4.5 %: 4 %
    assert cells["rand"][1].text == "69.50 ± 0.71"
    assert cells["rand"][2] is None  # never reached 50 %
    [fallback] = build_tables(records(iterative_study), {"metric": "accuracy", "tables": [{"kind": "iterative"}]})
    assert fallback.title.startswith("accuracy (%)")


def test_iterative_value_at_skips_records_without_the_metric():
    from prunelab.results.unit_kinds import Removal, value_at

    # test accuracy measured every other round only: at 3 % the last measured value is at 2 %
    removals = [
        Removal("r", "mnist", MODEL, "rand", k / 100, 1.0 - k / 100, 0.9 - k / 100 if k % 2 == 0 else math.nan)
        for k in range(5)
    ]
    assert value_at(removals, 0.03, "accuracy") == pytest.approx(0.88)
    assert value_at(removals, 0.03, "loss") == pytest.approx(0.97)
    assert value_at(removals, 0.05, "accuracy") is None  # never reached 5 %


def test_kind_tables_sit_beside_plain_ones_and_problems_are_listed_together(probe_study):
    from prunelab.results.tables import build_tables

    tables = build_tables(
        records(probe_study),
        {"tables": [{"rows": "sparsity", "columns": "dataset"}, {"kind": "penalties", "dataset": "fashion"}]},
    )
    assert tables[0].column_labels == ["mnist", "fashion"] and tables[1].title.endswith(
        f"dataset = fashion, model = {MODEL}, layers = all, finetune_steps = 0"
    )
    bad = {
        "tables": [
            {"kind": "penalties", "colums": "layers"},
            {"rows": "levels"},
            {"kind": "iterative", "metric": "acc", "removed": [2]},
            {"kind": "penalty"},
        ]
    }
    with pytest.raises(ValueError) as info:
        build_tables(records(probe_study), bad)
    message = str(info.value)
    assert message.startswith("5 problems:")
    assert "outputs.tables[0] has an unknown key 'colums'" in message
    assert "the 'rows' parameter of outputs.tables[1] must be one of" in message
    assert "the 'metric' parameter of outputs.tables[2] must be one of: accuracy, loss. Got 'acc'" in message
    assert "the 'removed' parameter of outputs.tables[2] must be a float in [0, 1]" in message
    assert "unknown table kind 'penalty' (did you mean 'penalties'?)" in message


def test_outputs_problems_accepts_study_b_declarations_and_rejects_bad_keys():
    from prunelab.results.report import outputs_problems

    good = {
        "tables": [
            {
                "kind": "penalties",
                "columns": "layers",
                "fraction": [0.1, 0.5],
                "count": 1,
                "finetune_steps": 0,
                "win_rate": False,
                "digits": 3,
            },
            {"kind": "iterative", "metric": "accuracy", "removed": [0.05, 0.1], "methods": ["rs"]},
            {"rows": "method", "columns": "dataset"},
        ],
        "figures": [
            {"kind": "penalty_curves", "layers": "all", "log": True},
            {"kind": "mean_replacement_scatter", "scorers": ["rs"], "split_by": ["layers"]},
            {"kind": "performance_profile", "taus": 51},
            {"kind": "units_selected", "layer": "conv1"},
            {"kind": "iterative_pruning", "methods": ["rs", "bp_rs"]},
        ],
    }
    assert outputs_problems(good) == []
    problems = outputs_problems(
        {
            "tables": [
                {"kind": "penalties", "columns": "seed", "fraction": 0},
                {"kind": "iterative", "split_by": ["model"]},
                {"kind": "scatter"},
            ],
            "figures": [{"kind": "penalty_curves", "metric": "loss"}, {"kind": "units_selected", "methods": ["rs"]}],
        }
    )
    assert len(problems) == 6
    assert problems[0].startswith(
        "the 'columns' parameter of outputs.tables[0] must be one of: amount, dataset, "
        "finetune_steps, layers, model, step. Got 'seed'"
    )
    assert "the 'fraction' parameter of outputs.tables[0] must be a float in (0, 1]" in problems[1]
    assert problems[2].startswith("outputs.tables[1] has an unknown key 'split_by'")
    assert problems[3].startswith(
        "unknown table kind 'scatter'; the 'kind' parameter of outputs.tables[2] must be one of: iterative, mean_replacement, penalties"
    )
    assert problems[4].startswith("outputs.figures[0] has an unknown key 'metric'")
    assert problems[5].startswith("outputs.figures[1] has an unknown key 'methods'")


# ------------------------------------------------------------------------ report and files
STUDY_B_OUTPUTS = {
    "tables": [
        {"kind": "penalties", "layers": "all", "finetune_steps": 0},
        {"kind": "iterative", "metric": "accuracy"},
    ],
    "figures": [
        {"kind": "penalty_curves", "layers": "all"},
        {"kind": "mean_replacement_scatter"},
        {"kind": "performance_profile", "name": "profiles"},
        {"kind": "units_selected"},
        {"kind": "iterative_pruning"},
    ],
}


@pytest.fixture(scope="module")
def study_b(tmp_path_factory):
    spec = {"name": "study-b", "outputs": STUDY_B_OUTPUTS}
    return build_study(tmp_path_factory.mktemp("b") / "b.db", probe_runs() + iterative_runs(), spec=spec)


def test_report_embeds_every_study_b_figure_and_table(study_b):
    from prunelab.results.report import write_report
    from prunelab.results.tables import build_tables

    text = write_report(study_b).read_text()
    for name in ("penalty_curves", "mean_replacement_scatter", "profiles", "units_selected", "iterative_pruning"):
        assert f'<figure id="figure-{name}"><img src="data:image/png;base64,' in text
    assert "Pruning penalty over training, one line per method" in text  # the kind's caption
    tables = build_tables(records(study_b), STUDY_B_OUTPUTS)
    assert len(tables) == 2 * 2 + 1  # (penalty, wins) × (mnist, fashion) + iterative
    assert text.count('<table class="results">') == len(tables)
    for table in tables:
        assert table.to_html() in text
    assert '<p class="note error">' not in text


def test_write_tables_and_figures_include_study_b(study_b, tmp_path):
    from prunelab.results.figures import write_figures
    from prunelab.results.tables import write_tables

    paths = write_tables(study_b, tmp_path / "tables")
    names = [p.name for p in paths]
    assert "tables.md" in names
    assert "penalty-method-by-amount-mnist-small-conv-all-0.csv" in names
    assert "penalty-wins-method-by-amount-fashion-small-conv-all-0.tex" in names
    assert "iterative-accuracy-method-by-removed-mnist-small-conv.tex" in names
    markdown = (tmp_path / "tables" / "tables.md").read_text()
    assert "### lowest penalty of the methods shown" in markdown and "| bp_abs_mrs | 100.0 % | 100.0 % |" in markdown
    figures = write_figures(study_b, tmp_path / "figures", formats="png")
    assert [p.name for p in figures] == [
        "penalty_curves.png",
        "mean_replacement_scatter.png",
        "profiles.png",
        "units_selected.png",
        "iterative_pruning.png",
    ]
    tex = (tmp_path / "tables" / "iterative-accuracy-method-by-removed-mnist-small-conv.tex").read_text()
    assert re.search(r"rand & 89.50 \$\\pm\$ 0.71 & ", tex)


def test_mean_replacement_table_puts_the_pre_activation_error_next_to_the_penalty():
    from prunelab.results.tables import build_tables

    def with_error(step, method, layers, value, local, net):
        return {**probe(step, method, layers, 0.5, None, 0, value), "preact_error": local, "preact_error_net": net}

    # rs: the mean raises the penalty (0.2 → 0.3, 0.6 → 0.5 at step 1) but always lowers the error;
    # norm: penalties 1.0/0.9 beyond the 0.4 view
    run = memory_run(
        {
            "probes": [
                with_error(0, "rs", "all", 0.2, 0.5, 0.6),
                with_error(0, "bp_rs", "all", 0.3, 0.3, 0.7),
                with_error(1, "rs", "all", 0.6, 0.4, 0.4),
                with_error(1, "bp_rs", "all", 0.5, 0.2, 0.5),
                with_error(0, "norm", "all", 1.0, 0.1, 0.1),
                with_error(0, "bp_norm", "all", 0.9, 0.2, 0.2),
                probe(0, "rs", "first_conv", 0.5, None, 0, 0.1),  # no error recorded: empty error cells
                probe(0, "bp_rs", "first_conv", 0.5, None, 0, 0.2),
            ]
        }
    )
    [table] = build_tables([run], {"tables": [{"kind": "mean_replacement"}]})
    assert table.row_label == "setting" and [k for k, _ in table.rows] == ["all, 50 %", "first_conv, 50 %"]
    cells = dict(table.rows)["all, 50 %"]
    assert cells[0].text == "3"
    assert cells[1].mean == pytest.approx((0.2 + 0.6 + 1.0) / 3) and cells[2].mean == pytest.approx(1.7 / 3)
    assert cells[3].mean == pytest.approx(2 / 3)  # rs at step 1 and norm
    assert cells[4].mean == pytest.approx(1.0 / 3) and cells[5].mean == pytest.approx(0.7 / 3)
    assert cells[6].mean == pytest.approx(2 / 3)
    assert dict(table.rows)["first_conv, 50 %"][4:6] == [None, None]
    [view] = build_tables(
        [run],
        {
            "tables": [
                {"kind": "mean_replacement", "max_penalty": 0.4, "error": "network", "rows": "scorer", "layers": "all"}
            ]
        },
    )
    assert "≤ 0.4" in view.title and "network" in view.title
    assert [k for k, _ in view.rows] == ["rs"]  # only step 0's rs pair lies in the view (all, 50 %)
    rs = dict(view.rows)["rs"]
    assert rs[0].n == 1 and rs[4].mean == pytest.approx(0.6) and rs[5].mean == pytest.approx(0.7)
    [ax] = panels(figure([run], {"kind": "mean_replacement_scatter", "max_penalty": 0.4}))
    assert ax.get_title().endswith("(n = 2)")  # step 0's rs pairs of both layer sets
    from prunelab.results.tables import table_problems

    assert any("rows" in p for p in table_problems({"kind": "mean_replacement", "rows": "x"}, "t"))
