"""Bad models and data given to the public API end in one ValueError/TypeError naming what is
wrong and what would work, raised before any work starts — never a raw torch error (issue 18);
cases that can simply work (fp16 unit removal, frozen models scored by gradients) work."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import prunelab
from prunelab import export, units

SHAPES = r"\(4, 5\) float32"
FIRST_LAYER = r"its first layer '0' \(Linear\) takes float32 inputs whose last dimension is 8"


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def data(n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def wrong_shape():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g))] * 2


def meta_mlp() -> nn.Sequential:
    with torch.device("meta"):
        return mlp()


def frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unchanged(model: nn.Module, reference: nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


# ----------------------------------------------------------------------------- calibration batches


@pytest.mark.parametrize("criterion", ["obs-fast", "lobs", "obs-exact", "gradient", "obd", "wanda"])
def test_calibration_batches_of_the_wrong_shape_are_refused_before_pruning(criterion):
    model, reference = mlp(), mlp()
    message = (
        rf"the calibration batches of Pruner \(the 'data' of prune\) \({SHAPES}\) do not fit the model: "
        rf"RuntimeError: mat1 and mat2 shapes cannot be multiplied.*{FIRST_LAYER}"
    )
    with pytest.raises(ValueError, match=message) as caught:
        prunelab.prune(model, 0.5, criterion=criterion, data=wrong_shape())
    assert isinstance(caught.value.__cause__, RuntimeError)  # the torch error is kept as the cause
    assert unchanged(model, reference)


def test_integer_inputs_to_a_float_model_are_refused_naming_the_dtypes():
    x, y = data()
    with pytest.raises(
        ValueError,
        match=r"\(32, 8\) int64\) do not fit the model: RuntimeError: mat1 and mat2 "
        r"must have the same dtype.*takes float32 inputs",
    ):
        prunelab.prune(mlp(), 0.5, criterion="obs-fast", data=[(x.long(), y)])


def test_float_inputs_to_a_double_model_are_refused_naming_the_model_dtype():
    with pytest.raises(ValueError, match=r"\(32, 8\) float32\) do not fit the model.*takes float64 inputs"):
        prunelab.prune(mlp().double(), 0.5, criterion="wanda", data=[data()])


def test_pruner_calibrate_checks_new_batches():
    pruner = prunelab.Pruner(mlp(), 0.5, criterion="obd")
    with pytest.raises(ValueError, match=rf"the batches of the 'data' parameter of Pruner.calibrate \({SHAPES}\)"):
        pruner.calibrate(wrong_shape())


@pytest.mark.parametrize("call", ["remove_units", "score_units", "collect_stats"])
def test_unit_pruning_calibration_batches_of_the_wrong_shape_are_refused(call):
    model, reference = mlp(), mlp()
    kwargs = {
        "remove_units": dict(method="bp_abs_mrs", fraction=0.5),
        "score_units": dict(scorer="abs_mrs"),
        "collect_stats": {},
    }[call]
    with pytest.raises(
        ValueError,
        match=rf"the calibration batches \('data'\) of unit pruning \({SHAPES}\) do not "
        rf"fit the model.*{FIRST_LAYER}",
    ):
        getattr(units, call)(model, data=wrong_shape(), input_shape=(8,), **kwargs)
    assert unchanged(model, reference)


# ----------------------------------------------------------------------------- labels


def test_float_labels_for_the_gradient_criterion_are_refused_at_construction():
    x, y = data()
    with pytest.raises(
        ValueError,
        match=r"the calibration batches of Pruner \(the 'data' of prune\) do not fit the "
        r"model's output: .*classification targets must be integer class indices; "
        r"got dtype torch.float32. Pass loss_fn=",
    ):
        prunelab.Pruner(mlp(), 0.5, criterion="gradient", calibration=[(x, y.float())])


def test_labels_out_of_range_for_the_gradient_criterion_are_refused_at_construction():
    x, y = data()
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 3\)"):
        prunelab.Pruner(mlp(), 0.5, criterion="gradient", calibration=[(x, y + 5)])


@pytest.mark.parametrize("call", ["fit", "evaluate"])
def test_float_labels_for_fit_and_evaluate_are_refused(call):
    x, y = data()
    model, reference = mlp(), mlp()
    kwargs = {"epochs": 1} if call == "fit" else {}
    with pytest.raises(
        ValueError,
        match=rf"the 'data' parameter of {call} does not fit the model's output: its "
        r"labels must be an int64 tensor \(class indices\)",
    ):
        getattr(prunelab, call)(model, (x, y.float()), **kwargs)
    assert unchanged(model, reference)


def test_obd_ignores_the_labels_so_float_labels_prune_as_int_labels_do():
    """OBD's Gauss-Newton diagonal depends on the outputs only: the labels' dtype changes nothing."""
    x, y = data()
    a, b = mlp(), mlp()
    prunelab.prune(a, 0.5, criterion="obd", data=[(x, y)])
    prunelab.prune(b, 0.5, criterion="obd", data=[(x, y.float())])
    assert unchanged(a, b) and (a[0].weight == 0).sum() == 24


# ----------------------------------------------------------------------------- empty layers


def test_a_zero_size_layer_is_left_out_of_the_default_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(0, 4), nn.ReLU(), nn.Linear(4, 6), nn.Linear(6, 3))
    pruner = prunelab.Pruner(model, 0.5)
    assert [t.name for t in pruner.targets] == ["2.weight", "3.weight"]
    pruner.update()
    assert int((model[2].weight == 0).sum()) == 12 and int((model[3].weight == 0).sum()) == 9


def test_a_named_zero_size_layer_is_refused():
    model = nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 3))
    with pytest.raises(
        ValueError,
        match=r"the 'layers' parameter of Pruner names '0', whose weight has shape "
        r"\(4, 0\) \(no entries\): there is nothing to prune",
    ):
        prunelab.prune(model, 0.5, layers=["0"])


def test_a_model_whose_every_layer_is_empty_is_refused():
    model = nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 3))
    with pytest.raises(
        ValueError,
        match=r"the 'model' parameter of Pruner has no weight to prune: every prunable "
        r"layer is empty \(0.weight \(0, 8\), 1.weight \(3, 0\)\)",
    ):
        prunelab.prune(model, 0.5, scope="global")


def test_obs_fast_prunes_the_layers_around_a_zero_size_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(0, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    prunelab.prune(model, 0.5, criterion="obs-fast", data=[(torch.randn(16, 0), torch.randint(0, 3, (16,)))])
    assert int((model[2].weight == 0).sum()) == 6


# ----------------------------------------------------------------------------- meta-device models

META = (
    r"the 'model' parameter of {} has tensors on the meta device \('0.weight' and 3 more\): they have shapes "
    r"but no values. Materialise the model first, e.g. model.to_empty\(device='cpu'\)"
)


@pytest.mark.parametrize(
    "call, where",
    [
        (lambda m: prunelab.prune(m, 0.5), "Pruner"),
        (lambda m: prunelab.fit(m, data(), epochs=1), "fit"),
        (lambda m: prunelab.evaluate(m, data()), "evaluate"),
        (lambda m: prunelab.summary(m, input_shape=(8,)), "summary"),
        (lambda m: prunelab.measure_latency(m, input_shape=(8,)), "measure_latency"),
        (lambda m: units.remove_units(m, "abs_mrs", [data()], fraction=0.5, input_shape=(8,)), "unit pruning"),
        (lambda m: units.zero_units(m, (8,)), "unit pruning"),
        (lambda m: export.save(m, "/nonexistent/never-written.plm"), "save"),
        (lambda m: export.export_onnx(m, "/nonexistent/never-written.onnx", (8,)), "export_onnx"),
        (lambda m: __import__("prunelab.sparse").sparse.sparsify(m, (8,)), "sparsify"),
    ],
    ids=[
        "prune",
        "fit",
        "evaluate",
        "summary",
        "measure_latency",
        "remove_units",
        "zero_units",
        "save",
        "export_onnx",
        "sparsify",
    ],
)
def test_a_meta_device_model_is_refused(call, where):
    with pytest.raises(ValueError, match=META.format(where)):
        call(meta_mlp())


# ----------------------------------------------------------------------------- frozen models


def test_fit_refuses_a_model_with_every_parameter_frozen():
    model = frozen(mlp())
    with pytest.raises(
        ValueError,
        match=r"the 'model' parameter of fit has no parameter with requires_grad=True "
        r"\(all 4 are frozen\), so there is nothing to train; unfreeze",
    ):
        prunelab.fit(model, data(), epochs=1)


def test_fit_trains_a_partly_frozen_model():
    model = mlp()
    model[0].requires_grad_(False)
    before = model[0].weight.clone()
    prunelab.fit(model, data(), epochs=1, lr=0.1)
    assert torch.equal(model[0].weight, before) and model[2].weight.requires_grad


@pytest.mark.parametrize("criterion", ["gradient", "obd"])
def test_gradient_criteria_score_a_frozen_model_as_an_unfrozen_one(criterion):
    """dL/dw exists for a frozen weight: the same masks, and the weights stay frozen."""
    a, b = mlp(), frozen(mlp())
    prunelab.prune(a, 0.5, criterion=criterion, data=[data()])
    prunelab.prune(b, 0.5, criterion=criterion, data=[data()])
    assert unchanged(a, b)
    assert not any(p.requires_grad for p in b.parameters())


def test_backprop_unit_scorers_score_a_frozen_model_as_an_unfrozen_one():
    a, b = mlp(), frozen(mlp())
    sa = units.score_units(a, "abs_mrs", [data()], input_shape=(8,))
    sb = units.score_units(b, "abs_mrs", [data()], input_shape=(8,))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ra = units.remove_units(a, "bp_abs_mrs", [data()], fraction=0.5, input_shape=(8,))
    rb = units.remove_units(b, "bp_abs_mrs", [data()], fraction=0.5, input_shape=(8,))
    assert all(torch.equal(ra.plan[k], rb.plan[k]) for k in ra.plan) and unchanged(a, b)


def test_backprop_unit_scorers_on_a_frozen_transformer_block():
    """The unit-group path (attention heads and MLP channels) on a frozen encoder layer."""
    torch.manual_seed(0)
    a = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    b = frozen(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 5, 8)
    batch = [(x, torch.randn(4, 5, 8))]
    loss = nn.functional.mse_loss
    sa = units.score_units(a, "abs_mrs", batch, example_inputs=x, loss_fn=loss)
    sb = units.score_units(b, "abs_mrs", batch, example_inputs=x, loss_fn=loss)
    assert sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- fp16 unit removal


@pytest.mark.parametrize("method", ["bp_abs_mrs", "abs_mrs", "norm"])
def test_fp16_unit_removal_and_thinning_work(method):
    """A half-precision model's units are scored, removed (with mean replacement for bp_) and
    thinned in half precision; the thinned model's outputs equal the masked model's."""
    model = mlp().half()
    x, y = data()
    result = units.remove_units(model, method, [(x.half(), y)], fraction=0.5, input_shape=(8,))
    assert [len(v) for v in result.plan.values()] == [3]
    assert int((model[0].weight[result.plan["0"]] == 0).sum()) == 3 * 8
    thinned = units.thin(model, result)
    assert thinned[0].out_features == 3 and thinned[0].weight.dtype == torch.float16
    with torch.no_grad():
        assert torch.allclose(thinned(x.half()), model(x.half()), atol=1e-2)


def test_fp16_dead_units_are_thinned():
    model = mlp().half()
    with torch.no_grad():
        model[0].weight[:2] = 0
        model[0].bias[:2] = 0
    thinned, plan = units.thin_dead_units(model, (8,))
    assert plan["0"].tolist() == [0, 1] and thinned[0].out_features == 4
    x = data()[0].half()
    with torch.no_grad():
        assert torch.allclose(thinned(x), model(x), atol=1e-3)


# ----------------------------------------------------------------------------- already clear


def test_nan_calibration_inputs_are_refused_naming_the_batch():
    x, y = data()
    with pytest.raises(
        ValueError,
        match=r"the calibration inputs of batch 0 \('data'\) of Pruner has 256 non-finite "
        r"entries \(256 NaN, 0 inf\)",
    ):
        prunelab.prune(mlp(), 0.5, criterion="obs-fast", data=[(x * float("nan"), y)])


def test_summary_on_inputs_of_the_wrong_shape_names_the_input_shape():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"summary could not run Sequential on an input of shape \(1, 5\)"):
            prunelab.summary(mlp(), input_shape=(5,))


# ----------------------------------------------------------------------------- meta-device data, no parameters


@pytest.mark.parametrize(
    "call, what",
    [
        (lambda x, y: prunelab.fit(mlp(), (x, y), epochs=1), r"the inputs of the 'data' parameter of fit"),
        (lambda x, y: prunelab.evaluate(mlp(), (x, y)), r"the inputs of the 'data' parameter of evaluate"),
        (
            lambda x, y: prunelab.prune(mlp(), 0.5, criterion="obs-fast", data=[(x, y)]),
            r"the calibration inputs of batch 0 \('data'\) of Pruner",
        ),
        (
            lambda x, y: units.remove_units(mlp(), "bp_abs_mrs", [(x, y)], fraction=0.5, input_shape=(8,)),
            r"the calibration inputs of batch 0 \('data'\) of unit pruning",
        ),
    ],
    ids=["fit", "evaluate", "prune", "remove_units"],
)
def test_meta_device_data_is_refused(call, what):
    x = torch.empty(32, 8, device="meta")
    with pytest.raises(
        ValueError, match=what + r" is a tensor on the meta device \(a shape \(32, 8\) without values\)"
    ):
        call(x, data()[1])


def test_fit_refuses_a_model_without_parameters():
    with pytest.raises(
        ValueError,
        match=r"the 'model' parameter of fit has no parameters, so there is nothing to "
        r"train",
    ):
        prunelab.fit(nn.Sequential(nn.ReLU()), data(), epochs=1)


def test_unit_pruning_refuses_a_model_without_parameters():
    with pytest.raises(ValueError, match=r"the 'model' parameter of unit pruning \(Sequential\) has no parameters"):
        units.remove_units(nn.Sequential(nn.ReLU()), "norm", fraction=0.5, input_shape=(8,))


# ----------------------------------------------------------------------------- zero-size layers elsewhere


def with_empty_layer(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 0), nn.ReLU(), nn.Linear(0, 6), nn.ReLU(), nn.Linear(6, 3))


def test_unit_removal_leaves_a_zero_size_layer_alone_and_thins_the_others():
    model = with_empty_layer()
    x, y = data(16)
    result = units.remove_units(model, "bp_abs_mrs", [(x, y)], fraction=0.5, input_shape=(8,))
    assert list(result.plan) == ["2"] and len(result.plan["2"]) == 3
    thinned = units.thin(model, result)
    with torch.no_grad():
        assert thinned[2].out_features == 3 and torch.allclose(thinned(x), model(x), atol=1e-6)


def test_unit_removal_refuses_a_named_zero_size_layer_and_a_model_of_only_empty_ones():
    with pytest.raises(ValueError, match=r"the 'layers' parameter of remove_units chooses '0', which has no units"):
        units.remove_units(with_empty_layer(), "norm", fraction=0.5, input_shape=(8,), layers=["0"])
    empty = nn.Sequential(nn.Linear(8, 0), nn.ReLU(), nn.Linear(0, 3))
    with pytest.raises(
        ValueError,
        match=r"the 'model' parameter of remove_units has no units to remove: every unit "
        r"layer is empty \(0\)",
    ):
        units.remove_units(empty, "norm", fraction=0.5, input_shape=(8,))


def test_an_int8_file_of_a_model_with_a_zero_size_layer_round_trips(tmp_path):
    model = with_empty_layer()
    export.save(model, tmp_path / "m.plm", values="int8")
    loaded = prunelab.load(tmp_path / "m.plm", model=with_empty_layer(seed=1))
    x = data(4)[0]
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=0.05)


def test_sparsify_skips_a_zero_size_layer():
    from prunelab.sparse import SparseLinear, sparsify

    model = with_empty_layer()
    prunelab.prune(model, 0.9)
    fast, decisions = sparsify(model, (8,), min_sparsity=0.5, only_if_faster=False)
    assert not isinstance(fast[0], SparseLinear) and isinstance(fast[4], SparseLinear)


# ----------------------------------------------------------------------------- plans and losses


@pytest.mark.parametrize(
    "indices, message",
    [
        ([7], r"removes units \[7\] of '0', which has units 0 to 5"),
        ([-1], r"removes units \[-1\] of '0', which has units 0 to 5"),
        ([1, 1], r"removes 2 units of '0' \(of 6\), some twice"),
        ([0, 1, 2, 3, 4, 5], r"removes 6 units of '0' \(of 6\), all of them; thin keeps at least one unit"),
    ],
)
def test_thin_refuses_a_plan_outside_the_layer(indices, message):
    with pytest.raises(ValueError, match=message):
        units.thin(mlp(), {"0": torch.tensor(indices)}, input_shape=(8,))


def test_thin_refuses_a_plan_naming_no_unit_layer():
    with pytest.raises(
        ValueError,
        match=r"the plan names 'fc9', which is not a unit layer or group of the model; "
        r"choose among: 0",
    ):
        units.thin(mlp(), {"fc9": [0]}, input_shape=(8,))


def test_a_loss_fn_that_is_not_scalar_is_refused_when_the_gradient_pruner_is_built():
    x, y = data()
    with pytest.raises(
        ValueError,
        match=r"do not fit the model's output: loss_fn must return a scalar tensor; it "
        r"returned Tensor\(1, 3\)",
    ):
        prunelab.prune(mlp(), 0.5, criterion="gradient", data=[(x, y)], loss_fn=lambda output, targets: output)
