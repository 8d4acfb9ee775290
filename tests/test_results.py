"""Tables and figures of a study, from a small fake study database whose numbers are chosen by hand."""

from __future__ import annotations

import csv
import io
import math
import re

import numpy as np
import pytest

from prunelab.experiments.store import PlannedRun, Store

MODEL = "mlp[hidden=100]"
DATASETS = ("mnist", "mnist_rot")
METHODS = ("magl1", "magl2")
LEVELS = (0.5, 0.9)
# Mean accuracy per (dataset, method, level); seeds 0, 1, 2 add -0.01, 0, +0.01, so std = 0.01 exactly.
MEAN = {
    ("mnist", "magl1", 0.5): 0.97,
    ("mnist", "magl1", 0.9): 0.95,
    ("mnist", "magl2", 0.5): 0.96,
    ("mnist", "magl2", 0.9): 0.93,
    ("mnist_rot", "magl1", 0.5): 0.80,
    ("mnist_rot", "magl1", 0.9): 0.75,
    ("mnist_rot", "magl2", 0.5): 0.79,
}  # (mnist_rot, magl2, 0.9) is never run: an empty cell
PARAMS = 10_000


def build_study(path, runs, *, spec=None):
    """A study database with the given runs: dicts of labels plus optional ``status`` (done,
    failed, running, pending), ``metrics``, ``curve``, ``error``, ``seconds``."""
    planned = [
        PlannedRun(
            id=f"run{i:03d}",
            config=r.get("config", {"i": i}),
            dataset=r["dataset"],
            model=r.get("model", MODEL),
            method=r["method"],
            sparsity=r["sparsity"],
            seed=r["seed"],
        )
        for i, r in enumerate(runs)
    ]
    with Store(path) as store:
        store.set_meta("spec", spec if spec is not None else {"name": "fake study"})
        store.sync(planned)
        for plan, run in zip(planned, runs):
            status = run.get("status", "done")
            if status == "pending":
                continue
            store.mark_running(plan.id, "worker-1")
            if status == "running":
                continue
            store.finish(
                plan.id,
                {
                    "status": status,
                    "metrics": run.get("metrics"),
                    "curve": run.get("curve"),
                    "error": run.get("error"),
                    "seconds": run.get("seconds", 0.25),
                    "versions": {"torch": "2.13.0", "prunelab": "0.3.0"},
                },
            )
    return path


def fake_metrics(dataset, method, level, seed):
    accuracy = MEAN[(dataset, method, level)] + 0.01 * (seed - 1)
    rng = np.random.default_rng(seed)
    return {
        "accuracy": accuracy,
        "loss": 1.0 - accuracy,
        "accuracy_dense": 0.98,
        "accuracy_pruned": None,
        "sparsity": level,
        "params": PARAMS,
        "nonzero_params": round(PARAMS * (1 - level)),
        "compression": 1 / (1 - level),
        "speedup": "inf" if level > 0.95 else 1 / (1 - level),
        "layer_sparsity": {"0": level},
        "weight_histogram": {
            "edges": list(np.linspace(-0.5, 0.5, 81)),
            "counts": [int(c) for c in rng.integers(0, 100, 80)],
        },
        "some_future_key": [1, 2, 3],
    }


def fake_curve(n_dense=3, n_prune=3):
    return [
        {
            "phase": "dense" if e < n_dense else "prune",
            "epoch": e,
            "step": 10 * e,
            "loss": 1 / (e + 1),
            "train_accuracy": 0.5 + e / 20,
            "val_accuracy": 0.45 + e / 20,
        }
        for e in range(n_dense + n_prune)
    ]


def standard_runs():
    return [
        {
            "dataset": d,
            "method": m,
            "sparsity": s,
            "seed": seed,
            "metrics": fake_metrics(d, m, s, seed),
            "curve": fake_curve(),
        }
        for d in DATASETS
        for m in METHODS
        for s in LEVELS
        for seed in range(3)
        if (d, m, s) in MEAN
    ]


STUDY_A_TABLES = {"tables": [{"rows": "sparsity", "columns": "dataset", "split_by": ["method", "model"]}]}


@pytest.fixture
def study(tmp_path):
    spec = {"name": "fake study", "description": "two methods, two datasets", "outputs": STUDY_A_TABLES}
    return build_study(tmp_path / "s.db", standard_runs(), spec=spec)


def records(path):
    with Store(path) as store:
        return store.records(status="done")


# ------------------------------------------------------------------------------------ tables
def test_one_table_per_split_combination_rows_levels_columns_datasets(study):
    from prunelab.experiments.tables import build_tables

    tables = build_tables(records(study), STUDY_A_TABLES)
    assert [t.title for t in tables] == [
        f"accuracy (%), mean ± std over seeds — method = {m}, model = {MODEL}" for m in METHODS
    ]
    for table in tables:
        assert table.row_label == "sparsity"
        assert table.column_labels == list(DATASETS)
        assert [key for key, _ in table.rows] == list(LEVELS)
        assert all(len(cells) == len(DATASETS) for _, cells in table.rows)


def test_cells_show_mean_and_sample_std_and_missing_cells_are_empty(study):
    from prunelab.experiments.tables import build_tables

    magl1, magl2 = build_tables(records(study), STUDY_A_TABLES)
    cells = {(key, column): cell for key, row in magl2.rows for column, cell in zip(magl2.column_labels, row)}
    assert cells[(0.5, "mnist")].text == "96.00 ± 1.00"
    assert cells[(0.9, "mnist")].text == "93.00 ± 1.00"
    assert cells[(0.9, "mnist_rot")] is None
    assert cells[(0.5, "mnist")].mean == pytest.approx(0.96)
    assert cells[(0.5, "mnist")].std == pytest.approx(0.01)
    markdown = magl2.to_markdown()
    assert "| 90 % | 93.00 ± 1.00 |  |" in markdown


def test_markdown_has_a_header_a_separator_and_one_line_per_level(study):
    from prunelab.experiments.tables import build_tables

    table = build_tables(records(study), STUDY_A_TABLES)[0]
    lines = table.to_markdown().splitlines()
    assert lines[0] == "| sparsity | mnist | mnist_rot |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2:] == ["| 50 % | 97.00 ± 1.00 | 80.00 ± 1.00 |", "| 90 % | 95.00 ± 1.00 | 75.00 ± 1.00 |"]
    assert table.to_markdown(heading=True) == f"### {table.title}\n\n{table.to_markdown()}"


def test_single_seed_prints_a_dash_for_std_and_flags_short_cells(tmp_path):
    from prunelab.experiments.tables import build_tables

    runs = [
        r
        for r in standard_runs()
        if not (r["dataset"] == "mnist" and r["method"] == "magl1" and r["sparsity"] == 0.9 and r["seed"] > 0)
    ]
    path = build_study(tmp_path / "s.db", runs)
    table = build_tables(records(path), STUDY_A_TABLES)[0]
    cell = table.rows[1][1][0]
    assert (cell.n, cell.std) == (1, None)
    assert cell.text == "94.00 ± – (n=1)"


def test_csv_parses_back_to_the_aggregated_numbers(study):
    from prunelab.experiments.tables import build_tables

    table = build_tables(records(study), STUDY_A_TABLES)[1]  # magl2: has an empty cell
    rows = list(csv.reader(io.StringIO(table.to_csv())))
    assert rows[0] == [
        "sparsity",
        "mnist mean",
        "mnist std",
        "mnist n",
        "mnist_rot mean",
        "mnist_rot std",
        "mnist_rot n",
    ]
    parsed = {float(r[0]): r[1:] for r in rows[1:]}
    assert set(parsed) == set(LEVELS)
    for level in LEVELS:
        for k, dataset in enumerate(DATASETS):
            mean, std, n = parsed[level][3 * k : 3 * k + 3]
            if (dataset, "magl2", level) not in MEAN:
                assert (mean, std, n) == ("", "", "")
                continue
            values = [MEAN[(dataset, "magl2", level)] + 0.01 * (s - 1) for s in range(3)]
            assert float(mean) == pytest.approx(np.mean(values), abs=1e-15)
            assert float(std) == pytest.approx(np.std(values, ddof=1), abs=1e-15)
            assert int(n) == 3


def test_latex_uses_booktabs_and_escapes(study):
    from prunelab.experiments.tables import build_tables, latex_escape

    tex = build_tables(records(study), STUDY_A_TABLES)[0].to_latex()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lrr}"):
        assert rule in tex
    assert r"mnist\_rot" in tex and "mnist_rot" not in tex.replace(r"mnist\_rot", "")
    assert r"50 \% & 97.00 $\pm$ 1.00 & 80.00 $\pm$ 1.00 \\" in tex
    assert "—" not in tex and "seeds --- method = magl1" in tex
    assert latex_escape("a_b 5% & $x$ #1 {y} ~ ^ \\ –") == (
        r"a\_b 5\% \& \$x\$ \#1 \{y\} \textasciitilde{} \textasciicircum{} \textbackslash{} --"
    )


def test_default_table_is_levels_by_methods_per_dataset_and_model(study):
    from prunelab.experiments.tables import build_tables

    tables = build_tables(records(study), None)
    assert len(tables) == len(DATASETS)
    assert all(t.column_labels == list(METHODS) for t in tables)
    assert tables[0].title.endswith(f"dataset = mnist, model = {MODEL}")


def test_rows_by_method_splits_by_level(study):
    from prunelab.experiments.tables import build_tables

    tables = build_tables(records(study), {"tables": [{"rows": "method", "columns": "dataset"}]})
    assert len(tables) == len(LEVELS)  # one per level (model has one value)
    assert [k for k, _ in tables[0].rows] == list(METHODS)
    assert "sparsity = 50 %" in tables[0].title


def test_non_accuracy_metric_is_not_a_percentage_and_digits_apply(study):
    from prunelab.experiments.tables import build_tables

    table = build_tables(records(study), {"metric": "loss", "tables": [{"columns": "dataset", "digits": 3}]})[0]
    assert table.title.startswith("loss, mean")
    assert table.rows[0][1][0].text == "0.030 ± 0.010"  # loss = 1 - accuracy
    compression = build_tables(records(study), {"tables": [{"metric": "compression", "columns": "dataset"}]})[0]
    assert compression.rows[1][1][0].text == "10.00 ± 0.00"  # 4 significant digits of the mean, std alike


def test_write_tables_writes_each_format(study, tmp_path):
    from prunelab.experiments.tables import write_tables

    paths = write_tables(study, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert "tables.md" in names
    assert len([n for n in names if n.endswith(".csv")]) == 2 == len([n for n in names if n.endswith(".tex")])
    assert all(p.stat().st_size > 0 for p in paths)
    markdown = (tmp_path / "out" / "tables.md").read_text()
    assert markdown.startswith("# fake study") and markdown.count("### ") == 2
    assert [p.suffix for p in write_tables(study, tmp_path / "md", formats=["md"])] == [".md"]


def test_write_tables_default_folder_is_next_to_the_db(study):
    from prunelab.experiments.tables import write_tables

    paths = write_tables(study, formats=("csv",))
    assert all(p.parent == study.parent / "s_tables" for p in paths)


def test_command_line_choices_replace_the_declarations(study, tmp_path):
    from prunelab.experiments.tables import write_tables

    paths = write_tables(study, tmp_path, formats=["csv"], columns="method", rows="dataset", metric="loss")
    assert len(paths) == 2  # one per level
    rows = list(csv.reader(paths[0].open()))
    assert rows[0][0] == "dataset" and rows[0][1] == "magl1 mean"
    assert [r[0] for r in rows[1:]] == list(DATASETS)
    assert float(rows[1][1]) == pytest.approx(0.03)


def test_a_label_that_varies_must_be_laid_out(study):
    from prunelab.experiments.tables import build_tables

    with pytest.raises(ValueError, match=r"label 'method' takes 2 values \(magl1, magl2\).*add it to split_by"):
        build_tables(records(study), {"tables": [{"rows": "sparsity", "columns": "dataset", "split_by": []}]})


def test_levels_as_columns(study):
    from prunelab.experiments.tables import build_tables

    layout = {"rows": "method", "columns": "sparsity", "split_by": ["model", "dataset"]}
    table = build_tables(records(study), {"tables": [layout]})[0]
    assert table.column_labels == ["50 %", "90 %"]
    assert [k for k, _ in table.rows] == list(METHODS)
    assert table.rows[0][1][1].text == "95.00 ± 1.00"


def _family_runs():
    """Study D's shape: dense models of several widths at level 0, the widest pruned by AGP."""
    runs = [
        {
            "dataset": "mnist",
            "model": f"dense-{w}",
            "method": "dense",
            "sparsity": 0.0,
            "seed": s,
            "metrics": {"accuracy": 0.9 + w / 10_000, "nonzero_params": 800 * w},
        }
        for w in (25, 50, 100)
        for s in range(2)
    ]
    runs += [
        {
            "dataset": "mnist",
            "model": "sparse-100",
            "method": "agp",
            "sparsity": level,
            "seed": s,
            "metrics": {"accuracy": 0.95 - level / 10, "nonzero_params": 80_000 * (1 - level)},
        }
        for level in (0.5, 0.9)
        for s in range(2)
    ]
    return runs


def test_default_split_leaves_out_a_label_fixed_by_rows_and_columns(tmp_path):
    from prunelab.experiments.tables import build_tables

    # Study C's shape: each model pruned to its own level; rows = model.
    runs = [
        {
            "dataset": "mnist",
            "model": model,
            "method": method,
            "sparsity": level,
            "seed": s,
            "metrics": {"accuracy": 0.9},
        }
        for model, level in (("lenet-300-100", 0.93), ("lenet5", 0.9))
        for method in ("rand", "mag")
        for s in range(2)
    ]
    [table] = build_tables(
        records(build_study(tmp_path / "c.db", runs)), {"tables": [{"rows": "model", "columns": "method"}]}
    )
    assert [k for k, _ in table.rows] == ["lenet-300-100", "lenet5"]
    assert table.title.endswith("— dataset = mnist")


def test_cells_never_pool_a_family_of_models(tmp_path):
    from prunelab.experiments.tables import build_tables

    done = records(build_study(tmp_path / "d.db", _family_runs()))
    with pytest.raises(
        ValueError,
        match=r"outputs.tables\[0\]: the label 'model' takes 4 values \(dense-25, "
        r"dense-50, dense-100, sparse-100\) within one cell of rows 'sparsity' × "
        r"columns 'method' × split_by \['dataset'\]; .* add it to split_by",
    ):
        build_tables(done, {"tables": [{"rows": "sparsity", "columns": "method", "split_by": ["dataset"]}]})
    tables = build_tables(done, {"tables": [{"rows": "sparsity", "columns": "method"}]})
    assert [t.title.split("model = ")[1] for t in tables] == ["dense-25", "dense-50", "dense-100", "sparse-100"]


# --------------------------------------------------------------------------------- bad input
def test_missing_database_is_an_error_and_is_not_created(tmp_path):
    from prunelab.experiments.figures import write_figures
    from prunelab.experiments.report import write_report
    from prunelab.experiments.tables import write_tables

    missing = tmp_path / "nope" / "study.db"
    for write in (write_tables, write_figures, write_report):
        with pytest.raises(ValueError, match=r"no study database at .*study\.db.*run `prunelab run SPEC` first"):
            write(missing)
    assert not missing.exists() and not missing.parent.exists()


def test_a_file_that_is_not_a_database_is_an_error(tmp_path):
    from prunelab.experiments.tables import write_tables

    junk = tmp_path / "junk.db"
    junk.write_text("not sqlite " * 100)
    with pytest.raises(ValueError, match="is not a prunelab study database"):
        write_tables(junk, tmp_path)


def test_no_finished_runs_says_how_many_are_pending_and_failed(tmp_path):
    from prunelab.experiments.figures import write_figures
    from prunelab.experiments.tables import write_tables

    runs = [
        {"dataset": "mnist", "method": "magl1", "sparsity": 0.5, "seed": s, "status": st, "error": "boom"}
        for s, st in enumerate(["pending", "pending", "failed", "running"])
    ]
    path = build_study(tmp_path / "s.db", runs)
    for write, command in ((write_tables, "table"), (write_figures, "plot")):
        with pytest.raises(
            ValueError,
            match=rf"prunelab {command}: .* no finished runs yet \(1 failed, "
            r"1 running, 2 pending\)",
        ):
            write(path, tmp_path / "out")


def test_unknown_columns_rows_and_format_name_the_valid_ones(study, tmp_path):
    from prunelab.experiments.tables import write_tables

    with pytest.raises(
        ValueError,
        match=re.escape(
            "the 'columns' parameter of table must be one of: dataset, method, model, sparsity. Got 'x' instead."
        ),
    ):
        write_tables(study, tmp_path, columns="x")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "the 'rows' parameter of table must be one of: dataset, method, model, sparsity. Got 'seeds' instead."
        ),
    ):
        write_tables(study, tmp_path, rows="seeds")
    with pytest.raises(
        ValueError, match=re.escape("the 'format' parameter of table must be one of: csv, md, tex. Got 'xlsx' instead.")
    ):
        write_tables(study, tmp_path, formats=["xlsx"])
    with pytest.raises(ValueError, match="'rows' and 'columns' parameters of table must differ"):
        write_tables(study, tmp_path, rows="method", columns="method")


def test_unknown_metric_lists_the_numeric_metric_keys_present(study, tmp_path):
    from prunelab.experiments.tables import build_tables, write_tables

    expected = (
        "must be one of: accuracy, accuracy_dense, accuracy_pruned, compression, loss, "
        "nonzero_params, params, sparsity, speedup. Got 'acc' instead."
    )
    with pytest.raises(ValueError, match=re.escape(f"the 'metric' parameter of table {expected}")):
        write_tables(study, tmp_path, metric="acc")
    with pytest.raises(ValueError, match=re.escape(f"the 'metric' parameter of outputs.tables[0] {expected}")):
        build_tables(records(study), {"tables": [{"metric": "acc"}]})


def test_every_bad_declaration_is_reported_at_once(study):
    from prunelab.experiments.tables import build_tables

    bad = {"tables": [{"rows": "levels"}, {"colums": "dataset"}, {"percent": "yes"}]}
    with pytest.raises(ValueError) as info:
        build_tables(records(study), bad)
    message = str(info.value)
    assert message.startswith("3 problems:")
    assert "the 'rows' parameter of outputs.tables[0] must be one of" in message
    assert "outputs.tables[1] has an unknown key 'colums'" in message
    assert "the 'percent' parameter of outputs.tables[2] must be true or false" in message


def test_outputs_problems_checks_a_spec_without_runs():
    from prunelab.experiments.report import outputs_problems

    assert (
        outputs_problems(None)
        == []
        == outputs_problems({"tables": [{"columns": "dataset"}], "figures": [{"kind": "curves", "seed": 0}]})
    )
    problems = outputs_problems(
        {
            "table": [],
            "tables": [{"columns": "x"}],
            "figures": [{"kind": "scatter"}, {"kind": "curves", "colour": "red"}],
        }
    )
    assert len(problems) == 4
    assert "unknown figure kind 'scatter'" in problems[2]
    from prunelab.experiments.figures import FIGURES

    assert ", ".join(FIGURES.names()) in problems[2]  # every registered kind is offered


# ----------------------------------------------------------------------------------- figures
def _figures(path, declaration):
    from prunelab.experiments.figures import FIGURES

    with Store(path) as store:
        spec = store.meta("spec")
    return FIGURES.get(declaration["kind"])(records(path), declaration, spec)


def _panels(figure):
    return [ax for ax in figure.axes if ax.get_visible()]


def test_accuracy_vs_params_has_log_x_one_panel_per_dataset_and_one_line_per_method(study):
    from matplotlib.container import ErrorbarContainer

    [(name, figure)] = _figures(study, {"kind": "accuracy_vs_params"})
    assert name == "accuracy_vs_params"
    axes = _panels(figure)
    assert [ax.get_title() for ax in axes] == [f"dataset = {d}" for d in DATASETS]
    for ax in axes:
        assert ax.get_xscale() == "log"
        lines = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert [c.get_label() for c in lines] == list(METHODS)
    data_line = axes[0].containers[0].lines[0]  # magl1 on mnist, sorted by params
    assert list(data_line.get_xdata()) == [1000, 5000]
    assert list(data_line.get_ydata()) == pytest.approx([95.0, 97.0])


def test_pareto_reference_method_is_drawn_as_a_front_not_a_line(tmp_path):
    from matplotlib.container import ErrorbarContainer

    runs = standard_runs()
    # Three "conv" baselines (different models), one of them dominated.
    for k, (params, acc) in enumerate([(800, 0.90), (3000, 0.94), (4000, 0.92)]):
        runs.append(
            {
                "dataset": "mnist",
                "model": f"conv{k}",
                "method": "conv",
                "sparsity": 0.0,
                "seed": 0,
                "metrics": {"accuracy": acc, "nonzero_params": params},
            }
        )
    path = build_study(tmp_path / "s.db", runs)
    [(_, figure)] = _figures(path, {"kind": "accuracy_vs_params", "pareto_of": {"method": "conv"}})
    mnist = _panels(figure)[0]
    assert [c.get_label() for c in mnist.containers if isinstance(c, ErrorbarContainer)] == list(METHODS)
    front = [line for line in mnist.get_lines() if line.get_label() == "conv Pareto front"]
    assert len(front) == 1
    assert list(front[0].get_xdata()) == [800, 3000]
    assert list(front[0].get_ydata()) == pytest.approx([90.0, 94.0])


def test_a_family_of_single_level_models_is_one_line_and_other_models_get_their_own(tmp_path):
    from matplotlib.container import ErrorbarContainer

    runs = _family_runs() + [
        {**r, "model": "sparse-50", "metrics": {"accuracy": 0.8, "nonzero_params": 100}}
        for r in _family_runs()
        if r["method"] == "agp"
    ]
    [(_, figure)] = _figures(build_study(tmp_path / "d.db", runs), {"kind": "accuracy_vs_params"})
    [ax] = _panels(figure)
    lines = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in lines] == ["dense", "agp · sparse-100", "agp · sparse-50"]
    assert list(lines[0].lines[0].get_xdata()) == [20_000, 40_000, 80_000]


def test_accuracy_vs_params_ylim_zooms_every_panel_and_is_checked(study):
    [(_, figure)] = _figures(study, {"kind": "accuracy_vs_params", "ylim": [90, 98]})
    assert [ax.get_ylim() for ax in _panels(figure)] == [(90, 98)] * len(DATASETS)
    with pytest.raises(
        TypeError,
        match=r"'ylim' parameter of figure accuracy_vs_params must be \[low, high\] "
        r"with low < high.*Got \[98, 90\]",
    ):
        _figures(study, {"kind": "accuracy_vs_params", "ylim": [98, 90]})


def test_accuracy_vs_sparsity_plots_levels(study):
    from matplotlib.container import ErrorbarContainer

    [(_, figure)] = _figures(study, {"kind": "accuracy_vs_sparsity", "metric": "loss", "split_by": ["method"]})
    axes = _panels(figure)
    assert [ax.get_title() for ax in axes] == [f"method = {m}" for m in METHODS]
    assert axes[0].get_xscale() == "linear" and axes[0].get_ylabel() == "loss"
    # One line per dataset within a method's panel.
    assert [c.get_label() for c in axes[0].containers if isinstance(c, ErrorbarContainer)] == list(DATASETS)
    [(_, logit)] = _figures(study, {"kind": "accuracy_vs_sparsity", "xscale": "logit"})
    assert _panels(logit)[0].get_xscale() == "logit"


def test_weight_histogram_overlays_one_run_per_method(study):
    from matplotlib.patches import StepPatch

    [(_, figure)] = _figures(study, {"kind": "weight_histogram", "dataset": "mnist", "seed": 1})
    [ax] = _panels(figure)
    steps = [p for p in ax.patches if isinstance(p, StepPatch)]
    assert [s.get_label() for s in steps] == list(METHODS)
    assert "sparsity 90 %" in ax.get_title() and "seed 1" in ax.get_title()
    values, edges, _ = steps[0].get_data()
    assert len(edges) == 81 and float(np.sum(values * np.diff(edges))) == pytest.approx(1.0)


def test_curves_show_loss_and_accuracy_per_method(study):
    [(_, figure)] = _figures(study, {"kind": "curves", "sparsity": 0.5, "methods": ["magl2"]})
    axes = _panels(figure)
    assert len(axes) == 4  # (loss, accuracy) × 2 datasets
    loss, accuracy = axes[0], axes[1]
    assert [line.get_label() for line in loss.get_lines() if not line.get_label().startswith("_")] == ["magl2"]
    assert {line.get_label() for line in accuracy.get_lines()} >= {"magl2 train", "magl2 val"}
    assert list(loss.get_lines()[0].get_xdata()) == [1, 2, 3, 4, 5, 6]


def _design_runs():
    """A design grid: methods ``design[granularity=G,scope=S]`` plus one method whose label lacks
    the granularity (it is in its config), two levels, two seeds."""
    runs = []
    for method, config in [
        ("design[granularity=weight,scope=local]", {}),
        ("design[granularity=filter,scope=local]", {}),
        ("design[granularity=filter,scope=global]", {}),
        ("design[scope=local]", {"method": {"granularity": "kernel"}}),
    ]:
        for level in (0.5, 0.9):
            for seed in range(2):
                speed = {"weight": 1.0, "filter": 4.0, "kernel": 2.0}[
                    config.get("method", {}).get("granularity") or method.split("granularity=")[1].split(",")[0]
                ] * (1 + level) + seed
                runs.append(
                    {
                        "dataset": "mnist",
                        "method": method,
                        "sparsity": level,
                        "seed": seed,
                        "config": {"i": len(runs), **config},
                        "metrics": {"accuracy": 0.9 - level / 10 + seed / 100, "measured_speedup": speed},
                    }
                )
    return runs


def test_tradeoff_plots_one_point_per_cell_coloured_by_a_label_choice(tmp_path):
    path = build_study(tmp_path / "e.db", _design_runs())
    [(name, figure)] = _figures(
        path, {"kind": "tradeoff", "x": "measured_speedup", "color_by": "granularity", "name": "acc_vs_speed"}
    )
    assert name == "acc_vs_speed"
    [ax] = _panels(figure)
    assert ax.get_xlabel() == "measured_speedup" and ax.get_ylabel() == "accuracy (%)"
    points = [
        (
            float(c.lines[0].get_xdata()[0]),
            float(c.lines[0].get_ydata()[0]),
            c.lines[0].get_color(),
            c.lines[0].get_marker(),
        )
        for c in ax.containers
    ]
    assert len(points) == 8  # 4 methods × 2 levels, seeds averaged
    # filter / local at 90 %: x = mean(4·1.9 + 0, 4·1.9 + 1), y = mean(81, 82) %
    assert (4 * 1.9 + 0.5, 81.5) in [(pytest.approx(x), pytest.approx(y)) for x, y, _, _ in points]
    by_colour = {}
    for x, _, colour, _ in points:
        by_colour.setdefault(colour, []).append(x)
    assert sorted(len(v) for v in by_colour.values()) == [2, 2, 4]  # kernel (from config), weight, filter ×2
    assert {m for _, _, _, m in points} == {"o", "s"}  # one marker per level
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["granularity = weight", "granularity = filter", "granularity = kernel", "50 %", "90 %"]


def test_tradeoff_checks_its_keys(tmp_path):
    path = build_study(tmp_path / "e.db", _design_runs())
    with pytest.raises(ValueError, match="needs 'x'.*accuracy, measured_speedup"):
        _figures(path, {"kind": "tradeoff"})
    with pytest.raises(ValueError, match="'x' parameter of figure tradeoff must be one of"):
        _figures(path, {"kind": "tradeoff", "x": "latency"})
    with pytest.raises(ValueError, match="no run's method label or config has 'width'"):
        _figures(path, {"kind": "tradeoff", "x": "measured_speedup", "color_by": "width"})


def test_per_run_figure_filters_are_checked(study):
    with pytest.raises(
        ValueError,
        match=r"the 'sparsity' parameter of figure weight_histogram must be a level "
        r"with a 'weight_histogram' metric: 0.5, 0.9. Got 0.7 instead",
    ):
        _figures(study, {"kind": "weight_histogram", "sparsity": 0.7})
    with pytest.raises(ValueError, match=r"the 'methods' parameter of figure curves must be one of: magl1, magl2"):
        _figures(study, {"kind": "curves", "methods": ["obd"]})


def test_figure_without_its_data_is_a_no_data_error(tmp_path):
    from prunelab.experiments._records import NoDataError

    runs = [{"dataset": "mnist", "method": "magl1", "sparsity": 0.5, "seed": 0, "metrics": {"accuracy": 0.9}}]
    path = build_study(tmp_path / "s.db", runs)
    with pytest.raises(NoDataError, match="no finished run has a 'weight_histogram' metric"):
        _figures(path, {"kind": "weight_histogram"})
    with pytest.raises(NoDataError, match="needs the metric 'nonzero_params'"):
        _figures(path, {"kind": "accuracy_vs_params"})


def test_write_figures_writes_png_and_svg_of_the_declared_size(tmp_path):
    from PIL import Image

    from prunelab.experiments.figures import DPI, PANEL_SIZE, write_figures

    spec = {
        "outputs": {
            "figures": [
                {"kind": "accuracy_vs_params"},
                {"kind": "weight_histogram"},
                {"kind": "accuracy_vs_params", "metric": "loss"},
            ]
        }
    }
    path = build_study(tmp_path / "s.db", standard_runs(), spec=spec)
    paths = write_figures(path, tmp_path / "figs")
    assert [p.name for p in paths] == [
        "accuracy_vs_params.png",
        "accuracy_vs_params.svg",
        "weight_histogram.png",
        "weight_histogram.svg",
        "accuracy_vs_params-2.png",
        "accuracy_vs_params-2.svg",
    ]
    for p in paths:
        assert p.stat().st_size > 1000
    with Image.open(paths[0]) as image:
        image.load()
        assert image.size == (round(2 * PANEL_SIZE[0] * DPI), round(PANEL_SIZE[1] * DPI))  # two panels
    svg = paths[1].read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert [p.suffix for p in write_figures(path, tmp_path / "png", formats="png")] == [".png"] * 3


def test_figure_declarations_errors_name_the_kind_and_valid_ones(tmp_path):
    from prunelab.experiments.figures import FIGURES, write_figures

    kinds = re.escape(", ".join(FIGURES.names()))  # every registered kind is offered
    cases = [
        (
            {"kind": "scatter"},
            r"unknown figure kind 'scatter'; the 'kind' parameter of outputs.figures\[0\] "
            r"must be one of: " + kinds,
        ),
        ({"kind": "curves", "bins": 3}, r"outputs.figures\[0\] has an unknown key 'bins'; valid keys: "),
        (
            {"kind": "accuracy_vs_params", "metric": "acc"},
            r"outputs.figures\[0\] \(accuracy_vs_params\): "
            r"the 'metric' parameter of figure .* Got 'acc'",
        ),
        ({"kind": "accuracy_vs_params", "pareto_of": "conv"}, r"'pareto_of' parameter .* \{method: LABEL\}"),
    ]
    for declaration, message in cases:
        path = build_study(
            tmp_path / f"{len(message)}.db", standard_runs(), spec={"outputs": {"figures": [declaration]}}
        )
        with pytest.raises(ValueError, match=message):
            write_figures(path, tmp_path / "out")
    with pytest.raises(ValueError, match=r"the 'format' parameter of plot must be one of: png, svg. Got 'pdf'"):
        write_figures(path, tmp_path, formats=["pdf"])


def test_metrics_json_values_are_converted_back():
    from prunelab.experiments._records import number

    assert math.isnan(number(None))
    assert number("inf") == math.inf and number("-inf") == -math.inf
    assert number(3) == 3.0 and number(True) is None and number({"a": 1}) is None and number("x") is None


def test_another_sqlite_file_is_reported_and_left_unchanged(tmp_path):
    import sqlite3

    from prunelab.experiments.tables import write_tables

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    before = other.read_bytes()
    with pytest.raises(ValueError, match="is not a prunelab study database \\(it has no 'runs' and 'meta' tables\\)"):
        write_tables(other, tmp_path)
    assert other.read_bytes() == before


def test_retraining_figure_bands_over_seeds_and_the_dense_line(tmp_path):
    from prunelab.experiments._records import NoDataError
    from prunelab.experiments.figures import FIGURES

    runs = []
    for model in ("a", "b"):
        for method, start in (("exact", 0.97), ("magnitude", 0.90)):
            for seed in range(3):
                curve = [[step, start + 0.001 * step / 10 + 0.01 * (seed - 1)] for step in (0, 100, 200)]
                runs.append(
                    {
                        "dataset": "mnist",
                        "model": model,
                        "method": method,
                        "sparsity": 0.9,
                        "seed": seed,
                        "metrics": {"accuracy": 0.98, "accuracy_dense": 0.985, "retrain_curve": curve},
                    }
                )
    path = build_study(tmp_path / "s.db", runs)
    ((name, figure),) = FIGURES.get("retraining")(records(path), {"kind": "retraining", "ylim": [85, 100]}, {})
    axes = [ax for ax in figure.axes if ax.get_visible()]
    assert name == "retraining" and [ax.get_title() for ax in axes] == ["mnist, a", "mnist, b"]
    ax = axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"exact (n=3)", "magnitude (n=3)", "dense"}
    assert list(lines["exact (n=3)"].get_ydata()) == pytest.approx([97.0, 98.0, 99.0])  # mean over seeds, in %
    assert lines["dense"].get_ydata()[0] == pytest.approx(98.5)
    assert len(ax.collections) == 2 and ax.get_ylim() == (85, 100)  # one ±std band per method
    only = FIGURES.get("retraining")(records(path), {"kind": "retraining", "methods": ["exact"]}, {})
    assert {l.get_label() for l in only[0][1].axes[0].get_lines()} == {"exact (n=3)", "dense"}
    plain = build_study(tmp_path / "p.db", standard_runs())
    with pytest.raises(NoDataError, match="set training.retrain_tolerance"):
        FIGURES.get("retraining")(records(plain), {"kind": "retraining"}, {})


def test_a_design_grid_of_many_methods_gets_one_shared_legend_and_distinct_line_styles(tmp_path):
    from prunelab.experiments.figures import build_figures

    runs = [
        {
            "dataset": "mnist",
            "method": f"design[{k}]",
            "sparsity": s,
            "seed": 0,
            "metrics": {"accuracy": 0.9 - 0.01 * k - s / 10, "nonzero_params": round(PARAMS * (1 - s))},
        }
        for k in range(12)
        for s in (0.5, 0.9)
    ]
    path = build_study(tmp_path / "s.db", runs)
    ((_, figure),) = build_figures(records(path), {}, {"kind": "accuracy_vs_params"})
    (ax,) = [a for a in figure.axes if a.get_visible()]
    assert ax.get_legend() is None and len(figure.legends) == 1
    assert len(figure.legends[0].get_texts()) == 12
    styles = [bars.lines[0].get_linestyle() for bars in ax.containers if bars.get_label().startswith("design")]
    assert styles.count("-") == 10 and styles.count("--") == 2


def test_a_filter_naming_labels_without_finished_runs_skips_its_table_but_a_typo_is_an_error(tmp_path):
    from prunelab.experiments.tables import build_tables

    runs = [
        {
            "dataset": "mnist",
            "method": "magl1",
            "model": "h100",
            "sparsity": 0.5,
            "seed": 0,
            "metrics": {"accuracy": 0.9},
        },
        {
            "dataset": "mnist",
            "method": "conv",
            "model": "conv[kernel=5]",
            "sparsity": 0.0,
            "seed": 0,
            "status": "pending",
        },
    ]
    with Store(build_study(tmp_path / "s.db", runs)) as store:
        everything = store.records()
    outputs = {
        "tables": [
            {"rows": "sparsity", "columns": "dataset", "models": ["h100"]},
            {"rows": "model", "columns": "dataset", "models": ["conv"]},
        ]
    }
    (table,) = build_tables(everything, outputs)  # the conv table waits for its runs
    assert table.rows[0][1][0].mean == pytest.approx(0.9)
    with pytest.raises(ValueError, match="'models' parameter of outputs.tables\\[0\\] must be one of: conv"):
        build_tables(everything, {"tables": [{"rows": "model", "columns": "dataset", "models": ["cnv"]}]})
