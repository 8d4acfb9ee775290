"""The next layer's pre-activation error (prunelab.units.preact) against a hand computation."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from prunelab.units import Units, preact, surgery


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2)).eval()
    x = torch.randn(20, 3)
    return model, x


def _errors(model, x, plan, means=None):
    layers = Units.of(model, (3,)).layers
    dense_in, dense_out = preact.capture(model, [u.consumer.name for u in layers], x, batch_size=7)
    pruned = copy.deepcopy(model)
    surgery.mask_units(Units.of(pruned, (3,)).chain, plan, means)
    return preact.preactivation_errors(layers, plan, dense_in, dense_out, pruned, x, batch_size=7)


def _rel(z, ref):
    return math.sqrt(float(((z - ref) ** 2).sum()) / float((ref**2).sum()))


@torch.no_grad()
def test_one_layer_removed_with_and_without_the_mean_by_hand():
    model, x = _tiny()
    W1, b1, W2, b2 = model[0].weight, model[0].bias, model[2].weight, model[2].bias
    a = torch.relu(x @ W1.T + b1)
    mean = a.mean(0)
    z = a @ W2.T + b2
    removed = torch.tensor([1, 3])
    a0 = a.clone()
    a0[:, removed] = 0
    z_zero = a0 @ W2.T + b2
    z_mean = z_zero + W2[:, removed] @ mean[removed]
    plan = {"0": removed}
    zero = _errors(model, x, plan)
    folded = _errors(model, x, plan, {"0": mean, "2": torch.zeros(2)})
    assert set(zero) == {"2"}
    assert math.isclose(zero["2"]["local"], _rel(z_zero, z), rel_tol=1e-5)
    assert math.isclose(folded["2"]["local"], _rel(z_mean, z), rel_tol=1e-5)
    assert zero["2"]["network"] == zero["2"]["local"]  # one layer pruned: upstream unchanged
    assert folded["2"]["local"] < zero["2"]["local"]  # for a linear consumer the mean fold is closer


@torch.no_grad()
def test_two_layers_removed_keep_the_consumers_own_units_and_compound_in_the_network():
    model, x = _tiny()
    W1, b1, W2, b2, W3, b3 = (p for m in (model[0], model[2], model[4]) for p in (m.weight, m.bias))
    a = torch.relu(x @ W1.T + b1)
    z2 = a @ W2.T + b2
    h = torch.relu(z2)
    z4 = h @ W3.T + b3
    plan = {"0": torch.tensor([1]), "2": torch.tensor([0])}
    means = {"0": a.mean(0), "2": h.mean(0)}
    got = _errors(model, x, plan, means)
    # consumer "2" (itself pruned: only its kept unit 1 counts), fed the dense input with unit 1 of "0" at 0
    a0 = a.clone()
    a0[:, 1] = 0
    z2_local = a0 @ W2.T + b2 + W2[:, [1]] @ means["0"][[1]]
    assert math.isclose(got["2"]["local"], _rel(z2_local[:, [1]], z2[:, [1]]), rel_tol=1e-5)
    # consumer "4": locally only h's unit 0 is replaced; in the network, h comes from the pruned "2"
    h0 = h.clone()
    h0[:, 0] = 0
    fold4 = W3[:, [0]] @ means["2"][[0]]
    assert math.isclose(got["4"]["local"], _rel(h0 @ W3.T + b3 + fold4, z4), rel_tol=1e-5)
    h_net = torch.relu(z2_local)
    h_net[:, 0] = 0
    assert math.isclose(got["4"]["network"], _rel(h_net @ W3.T + b3 + fold4, z4), rel_tol=1e-5)
    assert got["2"]["network"] == got["2"]["local"] or math.isclose(
        got["2"]["network"], got["2"]["local"], rel_tol=1e-6
    )


@torch.no_grad()
def test_a_conv_consumer_after_flatten_and_pooling():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.ReLU(),
        nn.Linear(5, 2),
    ).eval()
    x = torch.randn(6, 1, 8, 8)
    layers = Units.of(model, (1, 8, 8)).layers
    dense_in, dense_out = preact.capture(model, [u.consumer.name for u in layers], x)
    pruned = copy.deepcopy(model)
    plan = {"0": torch.tensor([2])}
    surgery.mask_units(Units.of(pruned, (1, 8, 8)).chain, plan)
    got = preact.preactivation_errors(layers, plan, dense_in, dense_out, pruned, x)
    feats = model[3](model[2](model[1](model[0](x))))
    feats0 = feats.clone()
    feats0[:, 32:48] = 0  # channel 2's 16 flattened positions
    assert math.isclose(got["4"]["local"], _rel(model[4](feats0), model[4](feats)), rel_tol=1e-5)
