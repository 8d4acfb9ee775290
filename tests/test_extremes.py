"""Extreme inputs: sparsity at and near 1 (the no-empty-layer rule, for every scope and solver)
and NaN/inf in data, weights and scores (refused with a count, before anything changes)."""

from __future__ import annotations

import warnings

import pytest
import torch

import prunelab
from prunelab.data import Dataset
from prunelab.pruning import Pruner, SparsityShortfall, prune


def mlp(seed=0):
    return prunelab.build_model("mlp", hidden=[8, 4], input_shape=(1, 6, 6), n_classes=3, seed=seed)


def conv(seed=0):
    return prunelab.build_model(
        "conv-pool-linear", kernel=3, channels=2, input_shape=(1, 12, 12), n_classes=3, seed=seed
    )


def batch(model, n=32, seed=0):
    shape = tuple(model.config["input_shape"])
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)


def nonzero(pruner):
    return {t.name: int(torch.count_nonzero(t.weight)) for t in pruner.targets}


def group_count(weight, granularity):
    return {"weight": weight.numel(), "filter": weight.shape[0], "channel": weight.shape[1]}[granularity]


# ---------------------------------------------------------------------------------- layer collapse
@pytest.mark.parametrize("build", [mlp, conv])
@pytest.mark.parametrize("scope", ["local", "global", "layerwise-constant"])
@pytest.mark.parametrize("sparsity", [0.999, 0.9999])
def test_extreme_sparsity_leaves_min_keep_weights_in_every_layer_and_reports_the_shortfall(build, scope, sparsity):
    model = build()
    with pytest.warns(
        SparsityShortfall,
        match=rf"pruning to sparsity {sparsity:g} reached 0\.9\d+: the "
        r"no-empty-layer guard keeps min_keep=1",
    ) as caught:
        pruner = prune(model, sparsity, scope=scope)
    assert set(nonzero(pruner).values()) == {1}  # one weight left in every layer
    record = pruner.history[-1]
    assert record.held == tuple(t.name for t in pruner.targets) and record.sparsity < sparsity
    assert all(name in str(caught[0].message) for name in record.held)
    x, _ = batch(model)
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("granularity", ["filter", "channel"])
def test_structured_extreme_sparsity_keeps_min_keep_groups(granularity):
    model = conv()
    with pytest.warns(SparsityShortfall):
        pruner = prune(model, 0.999, granularity=granularity, scope="global", min_keep=2)
    for t in pruner.targets:
        alive = pruner.mask(t.name)
        dims = tuple(d for d in range(alive.dim()) if d != (0 if granularity == "filter" else 1))
        assert int(alive.any(dim=dims).sum()) == min(2, group_count(t.weight, granularity))


def test_sparsity_one_is_refused_before_any_change():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (
        lambda: prune(model, 1.0),
        lambda: Pruner(model, 1.0, scope="global"),
        lambda: prune(model, {"fc1": 1.0, "fc2": 0.5, "fc3": 0.5}),
    ):
        with pytest.raises(ValueError, match=r"must be a float in \[0, 1\)\. Got 1\.0 instead"):
            call()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_schedule_to_extreme_sparsity_is_held_at_every_late_event():
    model = mlp()
    pruner = Pruner(model, 0.9999, schedule="agp", schedule_args={"n_prunes": 4})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.update()
        while not pruner.done:
            pruner.step()
    assert set(nonzero(pruner).values()) == {1}
    assert pruner.history[-1].held and not pruner.history[0].held
    assert sum(issubclass(w.category, SparsityShortfall) for w in caught) == sum(bool(r.held) for r in pruner.history)


def test_global_taking_the_difference_from_other_layers_is_no_shortfall():
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    with torch.no_grad():
        model[0].weight.mul_(1e-6)  # every weight of layer 0 ranks below layer 2's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner = prune(model, 0.75, scope="global")
    assert pruner.history[-1].held == () and pruner.sparsity() == pytest.approx(round(0.75 * 72) / 72)
    assert int(torch.count_nonzero(model[0].weight)) == 1


@pytest.mark.parametrize(
    "criterion",
    ["lobs", "obs-exact", "obs-fast", {"name": "lobs", "epsilon": 1e6}, {"name": "obs-exact", "epsilon": 1e6}],
)
@pytest.mark.parametrize("min_keep", [1, 3])
def test_layerwise_obs_solvers_never_empty_a_layer(criterion, min_keep):
    """They used to ignore min_keep: at 99.9 % (or a huge ε) every layer lost every weight."""
    model = mlp()
    with pytest.warns(SparsityShortfall):
        pruner = prune(model, 0.999, criterion=criterion, min_keep=min_keep, data=batch(model))
    assert set(nonzero(pruner).values()) == {min_keep}
    assert pruner.history[-1].held == tuple(t.name for t in pruner.targets)
    assert pruner.criterion.last_held == pruner.history[-1].held


def test_obs_exact_by_channels_keeps_min_keep_channels():
    model = mlp()
    with pytest.warns(SparsityShortfall):
        pruner = prune(model, 0.999, criterion="obs-exact", granularity="channel", min_keep=2, data=batch(model))
    for t in pruner.targets:
        assert int(pruner.mask(t.name).any(dim=0).sum()) == 2


def test_lobs_keeps_the_weights_of_dead_inputs_that_the_target_does_not_remove():
    """Inputs that are zero on every calibration sample go first, at no cost; the solver used to
    zero all of their weights without masking them (sparsity above the target, even at 0)."""
    model = mlp()
    x, y = batch(model)
    x[:, :, 0, :] = 0.0  # the top row of pixels is dead: 6 inputs of fc1
    fc1 = model.fc1.weight.detach().clone()
    pruner = prune(model, {"fc1": 0.0, "fc2": 0.0, "fc3": 0.0}, criterion="lobs", data=(x, y))
    assert pruner.sparsity() == 0.0
    assert torch.equal(model.fc1.weight[:, :6], fc1[:, :6])
    pruner = prune(mlp(), {"fc1": 0.5, "fc2": 0.0, "fc3": 0.0}, criterion="lobs", data=(x, y))
    w = pruner.model.fc1.weight
    assert int((w == 0).sum()) == round(0.5 * w.numel()) and torch.all(w[:, :6] == 0)  # dead ones went first
    assert torch.equal(pruner.mask("fc1.weight"), w != 0)


# ----------------------------------------------------------------------------------- NaN and inf
def test_a_dataset_with_nan_inputs_is_refused_naming_the_split_and_the_count():
    x = torch.rand(10, 1, 2, 2)
    x[3, 0, 1, 1] = float("nan")
    x[4, 0, 0, 0] = float("-inf")
    y = torch.zeros(10, dtype=torch.long)
    with pytest.raises(
        ValueError,
        match=r"the 'x_test' parameter of Dataset has 2 non-finite entries "
        r"\(1 NaN, 1 inf\) out of 40, the first at index \(3, 0, 1, 1\)",
    ):
        Dataset("d", torch.rand(10, 1, 2, 2), y, x, y, 1, ["a"])


def test_pruning_a_model_with_a_nan_weight_is_refused_before_any_change():
    model = mlp()
    with torch.no_grad():
        model.fc2.weight[1, 2] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for scope in ("local", "global"):
        with pytest.raises(
            ValueError,
            match=r"the weight 'fc2.weight' of the model being pruned has 1 non-finite "
            r"entry \(1 NaN, 0 inf\) out of 32, the first at index \(1, 2\); "
            r"pruning cannot rank",
        ):
            prune(model, 0.5, scope=scope)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or k == "fc2.weight" for k in before)
    assert int(torch.count_nonzero(model.fc1.weight)) == model.fc1.weight.numel()


def test_nan_calibration_data_is_refused_when_the_pruner_is_built():
    model = mlp()
    x, y = batch(model)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"calibration inputs \('data'\) of Pruner has 1 non-finite entry"):
        Pruner(model, 0.5, criterion="gradient", calibration=(x, y))
    with pytest.raises(ValueError, match=r"calibration inputs of batch 1 \('data'\) of Pruner"):
        Pruner(model, 0.5, criterion="obd", calibration=[batch(model), (x, y)]).update()


def test_non_finite_scores_are_refused_naming_the_criterion_and_layer():
    model = mlp()
    with pytest.raises(ValueError, match=r"the 'gradient' scores of 'fc1.weight' has \d+ non-finite"):
        prune(model, 0.5, criterion="gradient", data=batch(model), loss_fn=lambda out, y: (out * float("inf")).sum())
    assert int(torch.count_nonzero(model.fc1.weight)) == model.fc1.weight.numel()


def test_summary_warns_about_non_finite_parameters_and_still_measures():
    model = mlp()
    with torch.no_grad():
        model.fc3.bias[0] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"non-finite \(NaN/inf\) entries in fc3.bias \(1\)"):
        result = prunelab.summary(model, (1, 6, 6))
    assert result.total.params == sum(p.numel() for p in model.parameters())


def test_a_tensor_found_finite_is_checked_again_after_an_in_place_write():
    from prunelab._validation import check_finite

    x = torch.randn(50, 4)
    view = x[10:20]
    assert check_finite("x", x) is x and check_finite("view", view) is view  # remembered as finite
    x[12, 1] = float("nan")  # bumps the version shared with the view
    with pytest.raises(ValueError, match="x has 1 non-finite entry"):
        check_finite("x", x)
    with pytest.raises(ValueError, match=r"view has 1 non-finite entry .* index \(2, 1\)"):
        check_finite("view", view)


def test_a_study_run_records_the_layers_the_guard_held(tmp_path):
    from prunelab.experiments import Store, build_study, run_study

    spec = {
        "name": "held",
        "datasets": ["digits"],
        "models": [{"name": "mlp", "hidden": [8]}],
        "methods": [{"label": "units", "granularity": "unit", "scope": "local", "layers": ["fc1"]}],
        "sparsities": [0.5, 0.99],
        "seeds": 1,
        "training": {"epochs": 1, "finetune_epochs": 1},
    }
    with warnings.catch_warnings():  # 0.99 of 8 units asks for all of them
        warnings.simplefilter("ignore", SparsityShortfall)
        run_study(build_study(spec), tmp_path / "s.db", progress=False)
    with Store(tmp_path / "s.db") as store:
        held = {r.sparsity: r.metrics["held_layers"] for r in store.records()}
    assert held == {0.5: [], 0.99: ["fc1.weight"]}  # named as in layer_sparsity


def test_unit_pruning_refuses_nan_data_and_nan_scores_before_changing_the_model():
    from prunelab.units import remove_units

    model = mlp()
    x, y = batch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = x.clone()
    bad[5, 0, 2, 3] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"calibration inputs \('data'\) of unit pruning has 1 non-finite entry "
        r"\(1 NaN, 0 inf\) out of 1152, the first at index \(5, 0, 2, 3\)",
    ):
        remove_units(model, "bp_abs_mrs", (bad, y), fraction=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.fc1.weight[2, 0] = float("inf")  # the norm of unit 2 of fc1 is inf
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"the 'norm' scores of the units of 'fc1' has 1 non-finite entry "
        r"\(0 NaN, 1 inf\) out of 8, the first at index \(2,\); check the model",
    ):
        remove_units(model, "norm", fraction=0.5, input_shape=(1, 6, 6))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
