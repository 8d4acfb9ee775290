"""Unit pruning: scorer formulas by hand, mean replacement, thinning == masking."""

import copy

import pytest
import torch
from torch import nn

import prunelab
from prunelab import units
from prunelab.units import surgery
from prunelab.units.scoring import collect


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def data(n=7, d=4, classes=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_scorer_formulas_against_hand_computation():
    model = tiny_mlp()
    x, y = data()
    # by hand: a = relu(W1 x + b1); g_n = ∂ℓ_n/∂a_n, one example at a time
    a_rows, g_rows = [], []
    for n in range(len(x)):
        a = torch.relu(model[1](x[n : n + 1])).detach().requires_grad_(True)
        loss = nn.functional.cross_entropy(model[3](a), y[n : n + 1], reduction="sum")
        (g,) = torch.autograd.grad(loss, a)
        a_rows.append(a.detach()[0].double())
        g_rows.append(g[0].double())
    A, G = torch.stack(a_rows), torch.stack(g_rows)
    abar = A.mean(dim=0)
    expected = {
        "rs": (-A * G).mean(dim=0),
        "abs_rs": (A * G).abs().mean(dim=0),
        "mrs": ((abar - A) * G).mean(dim=0),
        "abs_mrs": ((abar - A) * G).abs().mean(dim=0),
        "norm": model[1].weight.detach().double().pow(2).sum(dim=1) / 4,
    }
    for scorer, value in expected.items():
        got = units.score_units(model, scorer, (x, y), batch_size=3)["1"]
        assert torch.allclose(got, value, atol=1e-12), scorer
    r1 = units.score_units(model, "rand", (x, y), seed=5)["1"]
    assert torch.equal(r1, units.score_units(model, "rand", (x, y), seed=5)["1"])
    assert not torch.equal(r1, units.score_units(model, "rand", (x, y), seed=6)["1"])


def test_mean_replacement_has_zero_penalty_for_a_constant_unit():
    model = tiny_mlp()
    with torch.no_grad():
        model[1].weight[1] = 0.0  # unit 1 ignores its input: a_1 = relu(b_1) for every example
        model[1].bias[1] = 0.7
    x, y = data(n=40)
    before = prunelab.evaluate(model, (x, y))["loss"]
    for method, zero in (("bp_norm", True), ("norm", False)):
        m = copy.deepcopy(model)
        result = units.remove_units(m, method, (x, y), count=1)
        assert result.plan["1"].tolist() == [1]  # its incoming weights have norm 0
        penalty = prunelab.evaluate(m, (x, y))["loss"] - before
        if zero:
            assert penalty == pytest.approx(0.0, abs=1e-7)
        else:
            assert abs(penalty) > 1e-3


def test_mean_replacement_through_pooling_and_flatten_of_a_constant_conv_channel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 4))
    with torch.no_grad():
        net[0].weight[2] = 0.0
        net[0].bias[2] = 0.5  # channel 2 is the constant 0.5 at every position
    x, y = torch.randn(30, 1, 8, 8), torch.randint(0, 4, (30,))
    before = prunelab.evaluate(net, (x, y))["loss"]
    result = units.remove_units(net, "bp_norm", (x, y), count=1)
    assert result.plan["0"].tolist() == [2]
    assert prunelab.evaluate(net, (x, y))["loss"] == pytest.approx(before, abs=1e-6)


def residual_net():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0 = nn.Conv2d(1, 8, 3, padding=1)
            self.b0 = nn.BatchNorm2d(8)
            self.c1 = nn.Conv2d(8, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1)
            self.fc1 = nn.Linear(8 * 4 * 4, 16)
            self.fc2 = nn.Linear(16, 5)

        def forward(self, x):
            x = torch.relu(self.b0(self.c0(x)))
            y = self.c2(torch.relu(self.c1(x)))
            x = torch.relu(x + y)
            x = torch.flatten(nn.functional.max_pool2d(x, 2), 1)
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    net = Residual()
    with torch.no_grad():
        net.b0.running_mean.uniform_(-0.5, 0.5)
        net.b0.running_var.uniform_(0.5, 2.0)
    return net.eval(), (1, 8, 8)


def registry(name, **kw):
    def build():
        model = prunelab.build_model(
            name, input_shape=(1, 16, 16) if name == "lenet5" else (1, 12, 12), n_classes=5, seed=0, **kw
        )
        return model.eval(), tuple(model.config["input_shape"])

    return build


MODELS = {
    "mlp": registry("mlp", hidden=[20, 12]),
    "lenet5": registry("lenet5"),
    "small_conv": registry("small_conv"),
    "vgg11_bn": registry("vgg11", width=0.125),
    "residual": residual_net,
}


@pytest.mark.parametrize("method", ["abs_mrs", "bp_abs_mrs", "bp_rand"])
@pytest.mark.parametrize("name", list(MODELS))
def test_thinned_model_equals_the_masked_model(name, method):
    model, shape = MODELS[name]()
    if name == "vgg11_bn":  # give the BatchNorm layers non-trivial statistics
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(24, *shape)
    y = torch.randint(0, 5, (24,))
    result = units.remove_units(model, method, (x, y), fraction=0.3)
    assert result.removed > 0
    thinned = units.thin(model, result)
    assert torch.allclose(thinned(x), model(x), atol=1e-5)
    n_params = sum(p.numel() for p in thinned.parameters())
    assert n_params < sum(p.numel() for p in model.parameters())
    assert units.thinned_parameters(model, result) == n_params
    assert prunelab.summary(thinned, shape).total.params == n_params


def test_mean_replacement_lowers_the_penalty_on_a_trained_model():
    ds = prunelab.load_dataset("digits")
    model = prunelab.build_model("mlp", dataset=ds, hidden=[48], seed=0)
    prunelab.fit(model, ds, epochs=15, lr=0.05, progress=False)
    x, y = ds.x_train[:500], ds.y_train[:500]
    chain = units.Units.of(model).chain
    stats = collect(model, chain.units, [(x, y)])
    before = prunelab.evaluate(model, (x, y))["loss"]
    g = torch.Generator().manual_seed(0)
    wins, trials = 0, 40
    for _ in range(trials):
        subset = torch.sort(torch.randperm(48, generator=g)[:12]).values
        penalties = []
        for means in (None, {"fc1": stats["fc1"].mean}):
            m = copy.deepcopy(model)
            surgery.mask_units(units.Units.of(m).chain, {"fc1": subset}, means)
            penalties.append(prunelab.evaluate(m, (x, y))["loss"] - before)
        wins += penalties[1] < penalties[0]
    assert wins >= 0.8 * trials


def test_layer_sets_of_small_conv():
    model = prunelab.build_model("small_conv", seed=0)
    layers = units.Units.of(model).layers
    from prunelab.units.structure import select_layers

    pick = lambda s: [u.name for u in select_layers(layers, s)]
    assert pick("all") == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert (pick("first_conv"), pick("middle_conv"), pick("last_conv"), pick("first_dense")) == (
        ["conv1"],
        ["conv2"],
        ["conv3"],
        ["fc1"],
    )


def test_bad_input():
    model = tiny_mlp()
    x, y = data()
    with pytest.raises(ValueError, match="'method' parameter of remove_units must be one of: abs_mrs"):
        units.remove_units(model, "magnitude", (x, y), fraction=0.5)
    with pytest.raises(ValueError, match="exactly one of fraction="):
        units.remove_units(model, "norm", (x, y), fraction=0.5, count=1)
    with pytest.raises(ValueError, match="is 'first_conv', but the model has no such layer"):
        units.remove_units(model, "norm", (x, y), fraction=0.5, layers="first_conv")
    with pytest.raises(ValueError, match="'layers' parameter of remove_units names 'fc9'"):
        units.remove_units(model, "norm", (x, y), fraction=0.5, layers=["fc9"])
    with pytest.raises(ValueError, match="needs calibration data"):
        units.remove_units(model, "bp_norm", None, fraction=0.5, input_shape=(4,))
    with pytest.raises(ValueError, match="empty calibration set"):
        units.remove_units(model, "rs", (x[:0], y[:0]), fraction=0.5)
    sigmoid = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"activations with f\(0\) = 0.*Sigmoid"):
        units.remove_units(sigmoid, "norm", (x, y), fraction=0.5)
    a_layer_is_never_emptied = units.remove_units(copy.deepcopy(model), "norm", (x, y), fraction=0.99)
    assert len(a_layer_is_never_emptied.plan["1"]) == 2


@pytest.mark.parametrize(
    "name, shape, options",
    [
        ("mlp", (1, 28, 28), {"hidden": [40, 30]}),
        ("lenet5", (1, 28, 28), {}),  # its convolutions have no padding: exact too
        ("vgg11", (3, 32, 32), {"width": 0.25}),  # padded convolutions: exact except at borders
    ],
)
def test_thin_dead_units_keeps_the_outputs_of_units_with_a_bias_but_no_inputs(name, shape, options):
    model = prunelab.build_model(name, input_shape=shape, n_classes=10, seed=0, **options)
    found = units.Units.of(model, shape)
    with torch.no_grad():
        for layer in found.layers:  # dead units with positive biases: constant outputs
            layer.module.weight[: layer.n_units // 3] = 0
            if layer.module.bias is not None:
                layer.module.bias[: layer.n_units // 3] = 0.5
        if name == "vgg11":  # give the BatchNorms real statistics
            model.train()
            model(torch.randn(16, *shape))
    model.eval()
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(3))
    small, plan = units.thin_dead_units(model, shape)
    assert set(plan) == {layer.name for layer in found.layers}
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        reference, got = model(x), small.eval()(x)
        dropped = units.thin(model, plan, input_shape=shape).eval()(x)
    error, lost = (got - reference).abs().max(), (dropped - reference).abs().max()
    assert lost > 0.05  # plain thinning loses the constants
    if name == "vgg11":
        assert error < 0.05 * lost
    else:
        assert torch.allclose(got, reference, atol=1e-5, rtol=1e-5)
