"""The 'hashed' study task, labelled model grids (small-dense baselines), and the methods/models
filters of tables and figures."""

import pytest

from prunelab.experiments import SpecError, Store, build_study, run_study
from prunelab.experiments._records import select_labels
from prunelab.experiments.figures import build_figures
from prunelab.experiments.tables import build_tables


def spec(**changes):
    s = {
        "name": "h",
        "datasets": ["digits"],
        "models": [
            {"name": "mlp", "hidden": [32], "label": "h32"},
            {
                "name": "conv-pool-linear",
                "label": "conv",
                "kernel": {"grid": [3, 5]},
                "channels": 4,
                "sparsities": [0.0],
            },
        ],
        "methods": [
            {"label": "magnitude", "models": ["h32"]},
            {"label": "HashedNet", "task": "hashed", "models": ["h32"]},
            {"label": "conv", "models": ["conv"], "training": {"finetune_epochs": 0}},
        ],
        "sparsities": [0.0, 0.75],
        "seeds": 1,
        "training": {"epochs": 2, "finetune_epochs": 2, "lr": 0.1},
    }
    s.update(changes)
    return s


def test_hashed_runs_store_buckets_at_the_level_and_baselines_run_as_a_labelled_grid(tmp_path):
    study = build_study(spec())
    labels = sorted({(r.model, r.method) for r in study.runs})
    assert labels == [
        ("conv[kernel=3]", "conv"),
        ("conv[kernel=5]", "conv"),
        ("h32", "HashedNet"),
        ("h32", "magnitude"),
    ]
    result = run_study(study, tmp_path / "s.db", progress=False)
    assert result.counts["done"] == 6 and result.counts["failed"] == 0
    with Store(tmp_path / "s.db") as store:
        records = store.records()
    hashed = {r.sparsity: r.metrics for r in records if r.method == "HashedNet"}
    # 64-32-10 on digits: 2048 + 320 virtual weights, biases 32 + 10
    dense = hashed[0.0]
    assert dense["params"] == dense["nonzero_params"] == dense["stored_params"] == 2048 + 32 + 320 + 10
    assert dense["sparsity"] == 0.0
    quarter = hashed[0.75]
    buckets = round(0.25 * 2048) + round(0.25 * 320)
    assert quarter["stored_params"] == buckets + 42 and quarter["params"] == 2410
    assert quarter["sparsity"] == pytest.approx(1 - buckets / 2368)
    assert quarter["compression"] == pytest.approx(2410 / quarter["nonzero_params"])
    assert quarter["flops"] == quarter["flops_dense"] == dense["flops_dense"]  # hashing saves no FLOPs
    assert quarter["accuracy"] > 0.5  # it learned
    # the pruned model at 75 % keeps about as many weights as the hashed one stores
    pruned = next(r.metrics for r in records if r.method == "magnitude" and r.sparsity == 0.75)
    assert abs(pruned["nonzero_params"] - quarter["nonzero_params"]) < 20
    # tables and figures select by base label: 'conv' is both conv[kernel=...] models
    tables = build_tables(
        records, {"tables": [{"rows": "model", "columns": "dataset", "split_by": ["method"], "models": ["conv"]}]}
    )
    assert [key for key, _ in tables[0].rows] == ["conv[kernel=3]", "conv[kernel=5]"]
    figures = build_figures(
        records, {}, {"kind": "accuracy_vs_params", "pareto_of": {"method": "conv"}, "models": ["h32", "conv"]}
    )
    assert len(figures) == 1


def test_hashed_task_errors_are_named_before_any_work():
    bad = spec(
        models=[{"name": "mlp", "hidden": [32], "hashed": 0.5}],
        methods=[{"label": "HashedNet", "task": "hashed", "epochs": 3}],
    )
    with pytest.raises(SpecError) as err:
        build_study(bad)
    text = str(err.value)
    assert "models[0].hashed: the hashed task sets each model's compression" in text
    assert "methods[0].epochs: unknown key" in text


def test_select_labels_filters_by_label_or_base_label_and_names_unknown_ones():
    class R:
        def __init__(self, method, model):
            self.method, self.model = method, model

    records = [R("a", "conv[k=3]"), R("a", "conv[k=5]"), R("b", "h32")]
    assert select_labels(records, {"models": ["conv"]}, where="t") == records[:2]
    assert select_labels(records, {"models": ["conv[k=5]"], "methods": ["a"]}, where="t") == [records[1]]
    assert select_labels(records, {}, where="t") == records
    with pytest.raises(ValueError, match="'models' parameter of t must be one of: conv, conv\\[k=3\\]"):
        select_labels(records, {"models": ["cnv"]}, where="t")


def test_thin_true_measures_the_physically_thinned_model(tmp_path):
    s = spec(
        models=[{"name": "conv-pool-linear", "channels": 8, "kernel": 3}],
        methods=[{"label": "filters", "granularity": "filter", "layers": ["conv1"], "thin": True}],
        sparsities=[0.5],
    )
    run_study(build_study(s), tmp_path / "s.db", progress=False)
    with Store(tmp_path / "s.db") as store:
        (record,) = store.records()
    m = record.metrics
    assert m["units_removed"] == 4  # half of conv1's 8 filters
    # digits 8x8 -> conv 3x3 6x6 -> pool 3x3: 8 filters 80 + linear 72*10+10, thinned to 4 filters
    assert m["params"] == 80 + 730 and m["params_thinned"] == 40 + 370
    assert m["accuracy_thinned"] == pytest.approx(m["accuracy"], abs=0.02)
    assert m["measured_speedup"] > 0
    with pytest.raises(SpecError, match="methods\\[0\\].thin: must be true or false; got 'yes'"):
        build_study(spec(methods=[{"label": "m", "thin": "yes"}]))
