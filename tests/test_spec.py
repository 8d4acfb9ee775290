"""Study specs: validation with every error at once, overrides, grids, stable run ids."""

import copy

import pytest
import yaml

from prunelab.runs import SpecError
from prunelab.study import build_study, load_spec

BASE = {
    "name": "t",
    "datasets": ["digits"],
    "models": [{"name": "mlp", "hidden": [16]}],
    "methods": [
        {"label": "mag", "criterion": "magnitude"},
        {"label": "agp", "criterion": "magnitude", "schedule": {"name": "agp", "n_prunes": 3, "every_epochs": 1}},
    ],
    "sparsities": [0.5, 0.9],
    "seeds": 2,
    "training": {"epochs": 1, "finetune_epochs": 4, "batch_size": 64},
}


def spec(**changes):
    s = copy.deepcopy(BASE)
    s.update(changes)
    return s


def test_expansion_is_the_full_grid_with_stable_ids():
    study = build_study(spec())
    assert len(study.runs) == 1 * 1 * 2 * 2 * 2
    labels = {(r.method, r.sparsity, r.seed) for r in study.runs}
    assert len(labels) == 8
    again = build_study(spec())
    assert [r.id for r in again.runs] == [r.id for r in study.runs]
    assert len({r.id for r in study.runs}) == 8
    agp = next(r for r in study.runs if r.method == "agp")
    # every_epochs resolved into steps of the fine-tuning phase: 1437 / 64 → 23 steps per epoch
    assert agp.config["method"]["schedule"] == {"name": "agp", "n_prunes": 3, "every": 23, "sparsity": agp.sparsity}


def test_labels_do_not_change_run_ids_but_settings_do():
    renamed = spec(methods=[dict(BASE["methods"][0], label="other"), BASE["methods"][1]])
    ids = {r.id for r in build_study(spec()).runs}
    assert {r.id for r in build_study(renamed).runs} == ids
    changed = spec(training={**BASE["training"], "lr": 0.01})
    assert not ids & {r.id for r in build_study(changed).runs}


def test_grid_values_expand_into_labelled_runs():
    s = spec(
        methods=[{"label": "l1", "regularizer": {"name": "l1", "strength": {"grid": [1e-5, 1e-4]}}}],
        sparsities=[0.9],
        seeds=1,
    )
    study = build_study(s)
    assert sorted(r.method for r in study.runs) == ["l1[strength=0.0001]", "l1[strength=1e-05]"]
    assert sorted(r.config["method"]["regularizer"]["strength"] for r in study.runs) == [1e-5, 1e-4]


def test_every_error_is_reported_with_its_path():
    bad = spec(
        datasets=["digits", "mnsit"],
        models=[{"name": "mlp", "hiden": [16]}],
        methods=[
            {"label": "a", "criterion": "magnitde"},
            {"label": "b", "granularity": "kernel"},
            {"label": "c", "schedule": {"name": "agp", "n_prunes": 50, "every_epochs": 1}},
            {"label": "d", "colour": "red"},
        ],
        sparsities=[0.5, 1.2],
        seeds=0,
        training={"epochs": -1, "optimiser": "sgd"},
        extra=1,
    )
    with pytest.raises(SpecError) as info:
        build_study(bad, source="bad.yaml")
    errors = info.value.errors
    text = "\n".join(errors)
    expected = [
        "extra: unknown key; valid top-level keys:",
        "sparsities[1]: the 'sparsity' parameter must be a float in [0, 1). Got 1.2",
        "seeds: a count of seeds must be >= 1; got 0",
        "datasets[1].name: unknown dataset 'mnsit' (did you mean 'mnist'?)",
        "training.optimiser: unknown key (did you mean 'optimizer'?)",
    ]
    for fragment in expected:
        assert fragment in text, f"missing {fragment!r} in:\n{text}"
    assert str(info.value).startswith(f"spec 'bad.yaml' has {len(errors)} errors:")


def test_method_errors_are_found_per_method():
    bad = spec(
        methods=[
            {"label": "a", "criterion": "magnitde"},
            {"label": "b", "granularity": "kernel"},
            {"label": "c", "schedule": {"name": "agp", "n_prunes": 50, "every_epochs": 1}},
            {"label": "d", "colour": "red"},
        ],
        models=[{"name": "mlp", "hiden": [16]}, {"name": "mlp", "hidden": [16]}],
    )
    with pytest.raises(SpecError) as info:
        build_study(bad)
    text = "\n".join(info.value.errors)
    assert "models[0]: unknown option 'hiden' for model mlp (did you mean 'hidden'?)" in text
    assert "methods[0]: unknown criterion 'magnitde' (did you mean 'magnitude'?)" in text
    assert "methods[1]: granularity 'kernel' applies only to Conv layers" in text
    assert "methods[2].schedule: its last prune is at step 1150, after the 92 fine-tuning steps" in text
    assert "methods[3].colour: unknown key; valid keys: label, criterion" in text


def test_overrides_and_quick(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec(quick={"seeds": 1, "training.epochs": 0, "sparsities": [0.9]})))
    assert len(load_spec(path).runs) == 8
    quick = load_spec(path, quick=True)
    assert len(quick.runs) == 2 and quick.spec["training"]["epochs"] == 0
    over = load_spec(path, overrides=["training.lr=0.2", "methods.0.criterion=random"])
    assert over.runs[0].config["training"]["lr"] == 0.2
    assert over.runs[0].config["method"]["criterion"] == "random"
    with pytest.raises(SpecError, match=r"--set methods\.7\.lr: methods\.7 is not an index of a 2-item list"):
        load_spec(path, overrides=["methods.7.lr=1"])
    with pytest.raises(SpecError, match="expected PATH=VALUE"):
        load_spec(path, overrides=["training.lr"])


def test_missing_required_and_bad_files(tmp_path):
    with pytest.raises(SpecError) as info:
        build_study({"name": "x"})
    text = "\n".join(info.value.errors)
    for key in ("datasets", "models", "methods", "sparsities"):
        assert f"{key}: missing (required)" in text
    with pytest.raises(SpecError, match="no spec file at"):
        load_spec(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_missing_dataset_files_are_a_spec_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNELAB_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        SpecError, match=r"datasets\[0\]: dataset 'fashion-mnist' cannot be loaded: missing fashion-mnist/train-images"
    ):
        build_study(spec(datasets=["fashion-mnist"]))


def test_identical_methods_are_rejected():
    dup = spec(methods=[{"label": "a"}, {"label": "b"}])
    with pytest.raises(SpecError, match=r"methods\[1\]: resolves to the same runs as"):
        build_study(dup)


def test_model_sparsities_and_method_filters():
    s = spec(
        models=[
            {"name": "mlp", "hidden": [16], "label": "big"},
            {"name": "mlp", "hidden": [4], "label": "small", "sparsities": [0.0]},
        ],
        methods=[{"label": "mag"}, {"label": "rand", "criterion": "random", "models": ["big"]}],
        seeds=1,
    )
    study = build_study(s)
    cells = sorted((r.model, r.method, r.sparsity) for r in study.runs)
    assert cells == [
        ("big", "mag", 0.5),
        ("big", "mag", 0.9),
        ("big", "rand", 0.5),
        ("big", "rand", 0.9),
        ("small", "mag", 0.0),
    ]
    with pytest.raises(SpecError, match=r"methods\[1\]\.models\[0\]: no model 'huge' in the spec"):
        build_study(spec(methods=[{"label": "a"}, {"label": "b", "criterion": "random", "models": ["huge"]}]))
    with pytest.raises(SpecError, match=r"models\[0\]\.sparsities\[0\]: the 'sparsity' parameter"):
        build_study(spec(models=[{"name": "mlp", "hidden": [4], "sparsities": [2.0]}]))


def test_outputs_section_is_validated_with_the_rest():
    with pytest.raises(SpecError) as info:
        build_study(
            spec(
                outputs={"tables": [{"rows": "sparsity", "columns": "methd"}], "figures": [{"kind": "bogus"}]},
                sparsities=[2.0],
            )
        )
    text = "\n".join(info.value.errors)
    assert "'columns' parameter of outputs.tables[0] must be one of: dataset, method, model, sparsity" in text
    assert "unknown figure kind 'bogus'" in text and "sparsities[0]" in text


def test_a_dataset_carries_its_own_training_values_under_the_methods():
    s = spec(
        datasets=["digits", {"name": "digits", "label": "slow", "training": {"lr": 0.01, "epochs": 2}}],
        methods=[BASE["methods"][0], dict(BASE["methods"][1], training={"lr": 0.2})],
        sparsities=[0.5],
        seeds=1,
    )
    runs = {(r.dataset, r.method): r.config["training"] for r in build_study(s).runs}
    assert runs[("digits", "mag")]["lr"] == 0.05 and runs[("digits", "mag")]["epochs"] == 1
    assert runs[("slow", "mag")]["lr"] == 0.01 and runs[("slow", "mag")]["epochs"] == 2
    assert runs[("slow", "agp")]["lr"] == 0.2 and runs[("slow", "agp")]["epochs"] == 2  # the method wins
    # a dataset without its own values keeps the ids it had before
    plain = {r.id for r in build_study(spec(sparsities=[0.5], seeds=1)).runs}
    assert {r.id for r in build_study(s).runs if (r.dataset, r.method) == ("digits", "mag")} <= plain


def test_a_datasets_training_values_are_checked_with_its_path():
    s = spec(
        datasets=[
            {"name": "digits", "training": {"lr": -1, "epoch": 2}},
            {"name": "digits", "training": 3, "label": "d2"},
        ]
    )
    with pytest.raises(SpecError) as err:
        build_study(s)
    text = str(err.value)
    assert "datasets[0].training.lr" in text and "datasets[0].training.epoch: unknown key" in text
    assert "did you mean 'epochs'" in text
    assert "datasets[1].training: must be a mapping; got 3" in text


@pytest.mark.parametrize(
    "changes, where",
    [
        ({"training": {**BASE["training"], "patience": 2}}, "  training.patience: stops on the validation loss"),
        (
            {"methods": [{"label": "mag", "training": {"patience": 2}}]},
            "  methods[0].training.patience: stops on the validation loss",
        ),
    ],
    ids=["study", "method"],
)
def test_patience_without_a_validation_split_names_where_it_was_set(changes, where):
    with pytest.raises(SpecError) as caught:
        build_study(spec(**changes))
    assert where in str(caught.value) and "give the dataset a 'validation' size" in str(caught.value)
    build_study(spec(datasets=[{"name": "digits", "validation": 200}], **changes))  # with one: accepted


@pytest.mark.parametrize(
    "method",
    [
        {"criterion": "magnitude"},
        {"task": "hashed"},
        {"task": "structured"},
        {"task": "unit-penalty"},
        {"task": "unit-iterative", "method": "mrs"},
    ],
    ids=lambda m: m.get("task", "prune"),
)
def test_a_model_without_a_name_is_one_error_for_every_method_of_every_task(method):
    # the error is listed once, so the second method must not mistake "no new error" for "ready"
    methods = [dict(method, label="a"), dict(method, label="b")]
    with pytest.raises(SpecError) as caught:
        build_study(spec(models=[{"hidden": [8]}], methods=methods))
    assert "models[0]: missing 'name'" in str(caught.value)


def test_a_model_error_met_again_by_a_second_method_stops_that_method_too():
    # models[0].hashed is reported once; the second hashed method must not go on to build the model
    hashed_model = [{"name": "mlp", "hidden": [8], "hashed": {"compression": 0.5}}]
    methods = [{"label": "a", "task": "hashed"}, {"label": "b", "task": "hashed"}]
    with pytest.raises(SpecError) as caught:
        build_study(spec(models=hashed_model, methods=methods))
    assert caught.value.errors == [
        "models[0].hashed: the hashed task sets each model's compression from the sparsity level "
        "(1 − sparsity); remove 'hashed' from the model"
    ]
