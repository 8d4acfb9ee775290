"""Scopes (local, global with the no-empty-layer guard, layerwise-constant) and granularities."""

import pytest
import torch
from torch import nn

from prunelab.pruning import Pruner, SparsityShortfall, prune


def two_layers(scale_a=1.0, scale_b=1.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    with torch.no_grad():
        model[0].weight.mul_(scale_a)
        model[2].weight.mul_(scale_b)
    return model


def test_local_prunes_smallest_magnitudes_in_each_layer():
    model = two_layers()
    original = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    prune(model, 0.5, scope="local")
    for before, after in zip(original, [model[0].weight, model[2].weight]):
        k = round(0.5 * before.numel())
        threshold = before.abs().flatten().sort().values[k - 1]
        assert int((after == 0).sum()) == k
        assert torch.all(after[before.abs() <= threshold] == 0)
        assert torch.all(after[before.abs() > threshold] != 0)


def test_global_threshold_is_one_cut_over_all_layers():
    model = two_layers(scale_a=1.0, scale_b=3.0)
    all_w = torch.cat([model[0].weight.detach().abs().flatten(), model[2].weight.detach().abs().flatten()])
    k = round(0.6 * all_w.numel())
    threshold = all_w.sort().values[k - 1]
    w0, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    pruner = prune(model, 0.6, scope="global")
    assert pruner.sparsity() == pytest.approx(k / all_w.numel())
    for before, after in [(w0, model[0].weight), (w2, model[2].weight)]:
        assert torch.equal(after == 0, before.abs() <= threshold)
    sparsities = pruner.layer_sparsity()
    assert sparsities["0.weight"] > sparsities["2.weight"]  # small-weight layer pruned harder


def test_global_never_empties_a_layer():
    model = two_layers(scale_a=1e-6, scale_b=1.0)  # every weight of layer 0 is below layer 2's
    pruner = prune(model, 0.75, scope="global")
    assert int(torch.count_nonzero(model[0].weight)) == 1  # min_keep = 1 survives
    assert pruner.sparsity() == pytest.approx(round(0.75 * 72) / 72)
    pruner = prune(two_layers(1e-6, 1.0), 0.75, scope="global", min_keep=5)
    assert int(torch.count_nonzero(pruner.model[0].weight)) == 5


def test_local_guard_at_extreme_sparsity():
    model = nn.Linear(10, 1)
    with pytest.warns(SparsityShortfall, match="reached 0.9: the no-empty-layer guard"):
        pruner = prune(model, 0.99)
    assert int(torch.count_nonzero(model.weight)) == 1 and pruner.history[-1].held == ("weight",)


def test_layerwise_constant_raises_one_layer_per_event_then_all():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 10))
    pruner = Pruner(
        model, 0.8, scope="layerwise-constant", schedule="iterative", schedule_args={"n_prunes": 3, "every": 1}
    )
    targets = [s for _, s in pruner.schedule.events()]
    pruner.update()  # event 0 → layer 0 only
    sp = list(pruner.layer_sparsity().values())
    assert sp == pytest.approx([round(targets[0] * 100) / 100, 0.0, 0.0])
    pruner.step()  # event 1 → layer 1 only
    sp = list(pruner.layer_sparsity().values())
    assert sp[1] == pytest.approx(round(targets[1] * 100) / 100) and sp[2] == 0.0
    assert sp[0] == pytest.approx(round(targets[0] * 100) / 100)
    pruner.step()  # final event → every layer to S
    assert list(pruner.layer_sparsity().values()) == pytest.approx([0.8, 0.8, 0.8])


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))


def test_filter_granularity_removes_whole_filters_and_their_bias():
    model = conv_net()
    norms = model[0].weight.detach().flatten(1).norm(dim=1)
    prune(model, 0.5, granularity="filter")
    w, b = model[0].weight, model[0].bias
    dead = (w.flatten(1) == 0).all(dim=1)
    assert int(dead.sum()) == 4
    assert torch.all(w.flatten(1)[~dead] != 0)
    assert torch.all(b[dead] == 0) and torch.all(b[~dead] != 0)
    assert set(torch.argsort(norms)[:4].tolist()) == set(torch.nonzero(dead).flatten().tolist())


def test_channel_granularity_removes_input_channels():
    model = conv_net()
    prune(model, 0.5, granularity="channel", layers=["2"])
    w = model[2].weight
    dead = (w.transpose(0, 1).flatten(1) == 0).all(dim=1)
    assert int(dead.sum()) == 4
    assert torch.all(w.transpose(0, 1).flatten(1)[~dead] != 0)
    assert torch.all(model[2].bias != 0)  # channel pruning leaves the bias


def test_kernel_granularity_zeroes_whole_kernels():
    model = conv_net()
    prune(model, 0.25, granularity="kernel")
    kernels = model[0].weight.flatten(2)
    dead = (kernels == 0).all(dim=2)
    assert int(dead.sum()) == 6  # 25 % of 8·3 kernels
    assert torch.all(kernels[~dead] != 0)


def test_unit_is_filter_for_linear_layers():
    model = two_layers()
    prune(model, 0.5, granularity="unit", layers=["0"])
    rows_dead = (model[0].weight == 0).all(dim=1)
    assert int(rows_dead.sum()) == 3


def test_group_scores_reduction_sum_vs_l2():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 0.0], [2.0, 2.0]]))  # L1: 3 < 4; L2: 3 > 2.83
    prune(layer, 0.5, granularity="unit", reduction="sum")
    assert layer.weight[0].eq(0).all()
    layer2 = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer2.weight.copy_(torch.tensor([[3.0, 0.0], [2.0, 2.0]]))
    prune(layer2, 0.5, granularity="unit", reduction="l2")
    assert layer2.weight[1].eq(0).all()


def test_named_lstm_and_embedding_weights_unstructured():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(50, 8)
            self.lstm = nn.LSTM(8, 16)
            self.head = nn.Linear(16, 3)

    net = Net()
    pruner = prune(net, 0.9, layers=["embedding", "lstm", "head"])
    names = [t.name for t in pruner.targets]
    assert names == ["embedding.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "head.weight"]
    assert all(s == pytest.approx(0.9, abs=1e-2) for s in pruner.layer_sparsity().values())
    assert torch.all(net.lstm.bias_ih_l0 != 0)
    with pytest.raises(ValueError, match="granularity 'filter' does not apply to 'embedding.weight'.*Embedding"):
        Pruner(Net(), 0.5, granularity="filter", layers=["embedding"])
    # an LSTM's gate rows are units: filter pruning removes whole rows and their input bias
    net = Net()
    prune(net, 0.5, granularity="filter", layers=["lstm.weight_ih_l0"])
    dead = net.lstm.weight_ih_l0.eq(0).all(dim=1)
    assert int(dead.sum()) == 32
    assert torch.all(net.lstm.bias_ih_l0[dead] == 0) and torch.all(net.lstm.bias_ih_l0[~dead] != 0)


def test_filter_granularity_on_attention_weights_prunes_rows_with_their_in_proj_bias_entries():
    torch.manual_seed(0)
    packed = nn.MultiheadAttention(4, 2)
    split = nn.MultiheadAttention(4, 2, kdim=3, vdim=5)  # separate q/k/v_proj_weight
    for mha in (packed, split):
        with torch.no_grad():
            mha.in_proj_bias.uniform_(0.5, 1.0)  # torch starts it at zero
        prune(
            mha, 0.5, granularity="filter", layers=[n for n, _ in mha.named_parameters() if n.endswith("proj_weight")]
        )
    rows = (packed.in_proj_weight == 0).all(1)  # (12,) q, k, v rows
    assert int(rows.sum()) == 6
    assert torch.equal(packed.in_proj_bias == 0, rows)
    dead = torch.cat([(getattr(split, f"{k}_proj_weight") == 0).all(1) for k in "qkv"])
    assert int(dead.sum()) == 6
    assert torch.equal(split.in_proj_bias == 0, dead)
    state = Pruner(split, 0.5, granularity="filter", layers=["q_proj_weight", "k_proj_weight", "v_proj_weight"])
    state.prune_to(0.5)
    fresh = nn.MultiheadAttention(4, 2, kdim=3, vdim=5)
    restored = Pruner(fresh, 0.5, granularity="filter", layers=["q_proj_weight", "k_proj_weight", "v_proj_weight"])
    restored.load_state_dict(state.state_dict())
    with torch.no_grad():
        fresh.in_proj_bias.fill_(1.0)
    restored.apply_masks()
    assert torch.equal(fresh.in_proj_bias == 0, split.in_proj_bias == 0)
