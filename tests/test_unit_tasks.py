"""Study B's tasks end to end on the embedded digits data: pruning probes during training
(unit-penalty) and iterative unit pruning (unit-iterative)."""

import copy

import pytest
import torch

from prunelab.runs.prepare import dense_model, load_prepared_dataset
from prunelab.store import Store
from prunelab.study import build_study, run_study
from prunelab.study.spec import SpecError
from prunelab.units import METHODS

MODEL = {"name": "mlp", "hidden": [24, 12]}
TRAINING = {"epochs": 1, "batch_size": 64, "lr": 0.05}  # digits: 1437 images → 23 steps


def spec(*methods, seeds=1):
    return {
        "name": "b",
        "datasets": ["digits"],
        "models": [MODEL],
        "methods": list(methods),
        "sparsities": [0.0],
        "seeds": seeds,
        "training": TRAINING,
    }


PROBES = {
    "label": "probes",
    "task": "unit-penalty",
    "every": 10,
    "calibration": 200,
    "sets": [
        {"layers": ["all", "first_dense"], "fractions": [0.25], "counts": [1]},
        {"layers": ["all"], "fractions": [0.5], "finetune_steps": [0, 5]},
    ],
    "track": {"layers": "all", "fraction": 0.25},
}


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("probes") / "study.db"
    study = build_study(spec(PROBES))
    result = run_study(study, path, progress=False)
    assert result.counts["done"] == 1, result
    with Store(path) as store:
        (record,) = store.records()
    return study, record


def test_every_probe_prunes_with_every_method_each_setting(probe_run):
    _, record = probe_run
    probes = record.metrics["probes"]
    steps = sorted({p["step"] for p in probes})
    assert steps == [10, 20]  # 23 steps, a probe every 10
    # per step: 12 methods × (2 layer sets × 2 amounts + 1 set × 1 fraction × 2 fine-tuning budgets)
    assert len(probes) == 2 * 12 * (2 * 2 + 2)
    assert {p["method"] for p in probes} == set(METHODS)
    for p in probes:
        assert p["penalty"] == pytest.approx(p["loss_after"] - p["loss_before"])
        assert p["mean_replacement"] == p["method"].startswith("bp_")
    first_dense = [p for p in probes if p["layers"] == "first_dense" and p["count"] == 1]
    assert len(first_dense) == 2 * 12
    # before is the same for every method of one probe step
    for step in steps:
        assert len({p["loss_before"] for p in probes if p["step"] == step}) == 1


def test_fine_tuning_after_pruning_lowers_a_large_penalty(probe_run):
    _, record = probe_run
    probes = record.metrics["probes"]
    pairs = 0
    lower = 0
    for p in probes:
        if p["finetune_steps"] == 5:
            (untuned,) = [
                q
                for q in probes
                if q["finetune_steps"] == 0
                and q["fraction"] == 0.5
                and q["layers"] == "all"
                and q["step"] == p["step"]
                and q["method"] == p["method"]
            ]
            pairs += 1
            lower += p["penalty"] < untuned["penalty"]
    assert pairs == 24
    assert lower >= 0.75 * pairs


def test_selections_are_the_tracked_fraction_of_each_layer(probe_run):
    _, record = probe_run
    assert record.metrics["units_total"] == {"fc1": 24, "fc2": 12}
    selections = record.metrics["selections"]
    assert {s["scorer"] for s in selections} == {"rand", "norm", "rs", "abs_rs", "mrs", "abs_mrs"}
    for s in selections:
        n = record.metrics["units_total"][s["layer"]]
        assert len(s["units"]) == round(0.25 * n) and len(set(s["units"])) == len(s["units"])
        assert all(0 <= u < n for u in s["units"])


def test_probes_leave_the_training_as_it_would_be_without_them(probe_run):
    study, record = probe_run
    config = copy.deepcopy(study.runs[0].config)
    ds = load_prepared_dataset(config["dataset"])
    plain, *_ = dense_model(config, ds, None)
    x = ds.x_test[:50]
    with torch.no_grad():
        expected = plain.eval()(x)
    from prunelab.runs.units import PenaltyProbe, _calibration

    probe = PenaltyProbe(ds, _calibration(ds, 200, 0), config["method"]["probe"], 0)
    watched, *_ = dense_model(config, ds, None, callbacks=[probe])
    with torch.no_grad():
        assert torch.equal(watched.eval()(x), expected)
    assert len(probe.records) == len(record.metrics["probes"])


def test_iterative_pruning_removes_a_step_per_round_and_shrinks_the_model(tmp_path):
    method = {
        "task": "unit-iterative",
        "method": {"grid": ["norm", "bp_mrs"]},
        "step_fraction": 0.1,
        "max_fraction": 0.3,
        "finetune_steps": 5,
        "calibration": 100,
        "test_every": 2,
        "training": {"epochs": 10},
    }
    study = build_study(spec(method))
    assert sorted(run.method for run in study.runs) == ["bp_mrs", "norm"]  # labels are the methods
    result = run_study(study, tmp_path / "study.db", progress=False)
    assert result.counts["done"] == 2
    with Store(tmp_path / "study.db") as store:
        records = store.records()
    dense_params = 64 * 24 + 24 + 24 * 12 + 12 + 12 * 10 + 10
    for record in records:
        curve = record.metrics["iterative"]
        # 10 % of 24 and of 12 units: 2 and 1 per round (rounded), so 3 of 36 units per round
        assert [c["step"] for c in curve] == [0, 1, 2, 3, 4]
        assert [round(c["removed"] * 36) for c in curve] == [0, 3, 6, 9, 12]
        assert [("accuracy" in c) for c in curve] == [True, False, True, False, True]
        assert record.metrics["params"] == (64 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10)
        assert record.metrics["params"] < dense_params
        assert curve[0]["accuracy"] > 0.85  # the trained model
        assert record.metrics["accuracy"] == curve[-1]["accuracy"] > 0.5


def test_bad_probe_and_iterative_settings_are_listed_together():
    bad_probe = {
        **PROBES,
        "methods": ["bp_norm", "bp_nrom"],
        "every": 0,
        "sets": [{"layers": ["middle_conv"], "fractions": [1.5]}],
    }
    bad_iterative = {"task": "unit-iterative", "method": "magnitude", "step_fraction": 0, "test_every": 0}
    with pytest.raises(SpecError) as err:
        build_study(spec(bad_probe, bad_iterative))
    text = str(err.value)
    for expected in (
        "methods[1]",
        "bp_nrom",
        "every",
        "middle_conv",
        "fractions[0]",
        "1.5",
        "methods[1].method",
        "magnitude",
        "step_fraction",
        "test_every",
    ):
        assert expected in text, (expected, text)


def test_start_and_preact_error_are_resolved_only_when_given_and_recorded(tmp_path):
    plain = build_study(spec(PROBES)).runs[0]
    assert "start" not in plain.config["method"]["probe"] and "preact_error" not in plain.config["method"]["probe"]
    assert build_study(spec({**PROBES, "preact_error": False})).runs[0].id == plain.id
    probes = {
        **PROBES,
        "start": 15,
        "preact_error": True,
        "sets": [{"layers": ["all", "first_dense"], "fractions": [0.5]}],
    }
    study = build_study(spec(probes))
    assert study.runs[0].id != plain.id
    result = run_study(study, tmp_path / "study.db", progress=False)
    assert result.counts["done"] == 1, result
    with Store(tmp_path / "study.db") as store:
        (record,) = store.records()
    found = record.metrics["probes"]
    assert {p["step"] for p in found} == {20}  # every 10 from step 15 on
    for p in found:
        layers = p["preact_layers"]
        assert set(layers) == ({"fc2", "fc3"} if p["layers"] == "all" else {"fc2"})
        assert p["preact_error"] == pytest.approx(sum(v[0] for v in layers.values()) / len(layers))
        assert p["preact_error_net"] == pytest.approx(sum(v[1] for v in layers.values()) / len(layers))
        if p["layers"] == "first_dense":
            assert layers["fc2"][0] == layers["fc2"][1]
    # the same units go with and without the mean: same penalty keys, and the probe is unchanged otherwise
    with_mr = {(p["scorer"], p["layers"]): p for p in found if p["mean_replacement"]}
    without = {(p["scorer"], p["layers"]): p for p in found if not p["mean_replacement"]}
    assert with_mr.keys() == without.keys()


def test_probe_penalties_do_not_depend_on_the_preact_error_option(probe_run):
    study, record = probe_run
    config = copy.deepcopy(study.runs[0].config)
    config["method"]["probe"]["preact_error"] = True
    ds = load_prepared_dataset(config["dataset"])
    from prunelab.runs.units import PenaltyProbe, _calibration

    probe = PenaltyProbe(ds, _calibration(ds, 200, 0), config["method"]["probe"], 0)
    dense_model(config, ds, None, callbacks=[probe])
    assert [p["penalty"] for p in probe.records] == [p["penalty"] for p in record.metrics["probes"]]
    assert all("preact_error" in p for p in probe.records)


def test_lr_drop_is_resolved_only_when_given_and_checked():
    plain = build_study(spec(PROBES)).runs[0]
    assert "lr_drop" not in plain.config["training"]
    dropped = build_study({**spec(PROBES), "training": {**TRAINING, "epochs": 2, "lr_drop": [1]}}).runs[0]
    assert dropped.config["training"]["lr_drop"] == [1] and dropped.config["training"]["lr_drop_factor"] == 0.1
    with pytest.raises(SpecError) as err:
        build_study({**spec(PROBES), "training": {**TRAINING, "lr_drop": [3], "lr_drop_factor": 2}})
    assert "lr_drop[0]" in str(err.value) and "lr_drop_factor" in str(err.value)
