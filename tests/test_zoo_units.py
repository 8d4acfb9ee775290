"""Unit removal and thinning on every zoo model: groups scored and removed as one, masked outputs
changed, thinned outputs equal to the masked model's, refusals clear."""

import copy

import pytest
import torch
from torch import nn
from zoo import BY_NAME, zoo_params

from prunelab import units
from prunelab.inputs import as_batch, logits_of

APPLIES = ["resnet18", "mobilenetv2", "transformer", "lstm-lm", "gru-lm", "hf-gpt2", "hf-bert", "hf-vit", "hf-llama"]
METHODS = ["rand", "norm", "abs_rs", "abs_mrs", "bp_rand", "bp_norm", "bp_abs_rs", "bp_abs_mrs"]
_BUILT = {}


def built(z):
    """One model and its calibration data per zoo entry (HF models take seconds to import)."""
    if z.name not in _BUILT:
        _BUILT[z.name] = (z.build(), z.batches(2, batch=4))
    return _BUILT[z.name]


def outputs(model, batch):
    with torch.no_grad():
        return logits_of(batch.call(model))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("z", zoo_params(APPLIES))
def test_remove_then_thin_equals_the_masked_model(z, method):
    model, data = built(z)
    work = copy.deepcopy(model)
    batch = as_batch(data[0], where="test")
    if method.startswith("bp_") and z.name == "hf-llama":  # o_proj/down_proj have no bias
        with pytest.raises(ValueError, match="model.layers.0.self_attn.o_proj.*no bias"):
            units.remove_units(work, method, data, fraction=0.5)
        assert all(torch.equal(a, b) for a, b in zip(work.state_dict().values(), model.state_dict().values()))
        return
    result = units.remove_units(work, method, data, fraction=0.5)
    for group in result.units.groups:
        if group.name in result.plan:
            assert len(result.plan[group.name]) == round(0.5 * group.n_units)
    masked = outputs(work, batch)
    assert (masked - outputs(model, batch)).abs().max() > 1e-6  # removal did something
    small = units.thin(work, result)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(outputs(small, batch), masked, atol=1e-5, rtol=1e-5)


def stream_of(result, member):
    return next(g for g in result.units.groups if member in g.members)


def test_resnet18_residual_stream_loses_half_its_channels():
    model, data = built(BY_NAME["resnet18"])
    work = copy.deepcopy(model)
    result = units.remove_units(work, "abs_mrs", data, fraction=0.5)
    stream = stream_of(result, "layer1.1.conv2")  # stem, layer1's conv2s and their BatchNorms
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv1", "layer2.0.shortcut.0"} <= set(stream.members)
    assert len(result.plan[stream.name]) == 4  # 8 channels → 4, not the union of 3 picks
    small = units.thin(work, result)
    assert small.conv1.out_channels == 4 and small.layer1[1].conv2.out_channels == 4
    assert small.layer1[0].conv1.in_channels == 4 and small.layer2[0].shortcut[0].in_channels == 4
    dense = sum(p.numel() for p in model.parameters())
    assert 0.2 < sum(p.numel() for p in small.parameters()) / dense < 0.35  # half the width: about a quarter


def test_group_score_is_the_sum_of_its_members():
    model, data = built(BY_NAME["resnet18"])
    found = units.Units.of(model, example_inputs=data[0][0][:2])
    stream = next(g for g in found.groups if "layer1.1.conv2" in g.members)
    got = units.score_units(model, "norm", layers=[stream.name], units=found)[stream.name]
    expected = sum(
        m.weight.detach().double().flatten(1).pow(2).sum(1) / m.weight[0].numel()
        for m in (model.conv1, model.layer1[0].conv2, model.layer1[1].conv2)
    )
    torch.testing.assert_close(got, expected)
    rs = units.score_units(model, "rs", data, layers=[stream.name], units=found)[stream.name]
    assert rs.shape == (8,) and torch.isfinite(rs).all()


def test_depthwise_group_couples_the_convs_around_it():
    model, data = built(BY_NAME["mobilenetv2"])
    found = units.Units.of(model, example_inputs=data[0][0][:2])
    group = next(g for g in found.groups if "blocks.1.block.3" in g.members)  # a depthwise conv
    assert {"blocks.1.block.0", "blocks.1.block.3", "blocks.1.block.6"} <= set(group.members)
    work = copy.deepcopy(model)
    result = units.remove_units(
        work, "norm", data, count=5, layers=[group.name], units=units.Units.of(work, example_inputs=data[0][0][:2])
    )
    small = units.thin(work, result)
    dw = small.blocks[1].block[3]
    assert dw.groups == dw.in_channels == dw.out_channels == 24 - 5


def test_gqa_query_heads_go_evenly_and_kv_heads_whole():
    model, data = built(BY_NAME["hf-llama"])
    batch = as_batch(data[0], where="test")
    attn = "model.layers.0.self_attn"
    for layers, heads, kv in (([f"{attn}:heads"], 2, 2), ([f"{attn}:kv_heads"], 2, 1)):
        work = copy.deepcopy(model)
        result = units.remove_units(work, "abs_mrs", data, fraction=0.5, layers=layers)
        if layers[0].endswith(":heads"):
            removed = result.plan[layers[0]]
            assert sorted((removed // 2).tolist()) == [0, 1]  # one query head per key/value group
        small = units.thin(work, result)
        a = small.model.layers[0].self_attn
        assert a.q_proj.out_features == heads * a.head_dim and a.k_proj.out_features == kv * a.head_dim
        assert a.num_key_value_groups == heads // kv
        torch.testing.assert_close(outputs(small, batch), outputs(work, batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="both the query heads and the key/value heads"):
        units.remove_units(
            copy.deepcopy(model), "rand", data, fraction=0.5, layers=[f"{attn}:heads", f"{attn}:kv_heads"]
        )


@pytest.mark.parametrize("z", zoo_params(["hf-gpt2", "hf-bert", "hf-vit"]))
def test_thinned_attention_has_fewer_heads(z):
    model, data = built(z)
    work = copy.deepcopy(model)
    result = units.remove_units(work, "abs_rs", data, fraction=0.5)
    small = units.thin(work, result)
    heads = [g for g in result.units.groups if g.kind == "heads"]
    assert heads
    for group in heads:
        owner = small.get_submodule(group.name.split(":")[0])
        n = next(getattr(owner, a) for a in ("num_heads", "num_attention_heads") if hasattr(owner, a))
        assert n == 2


def test_refusals_name_the_reason():
    model, data = built(BY_NAME["transformer"])
    with pytest.raises(ValueError, match="encoder.layers.0.self_attn:heads.*num_heads × head_dim == embed_dim"):
        units.remove_units(
            copy.deepcopy(model), "rand", data, fraction=0.5, layers=["encoder.layers.0.self_attn:heads"]
        )
    with pytest.raises(ValueError, match="hidden size.*norm over all hidden channels"):
        units.remove_units(copy.deepcopy(model), "rand", data, fraction=0.5, layers=["hidden size"])
    lm, lm_data = built(BY_NAME["lstm-lm"])
    with pytest.raises(ValueError, match="'rnn'.*recurrent units are not removed"):
        units.remove_units(copy.deepcopy(lm), "rand", lm_data, fraction=0.5, layers=["rnn"])

    class Tagger(nn.Module):  # an RNN on float features: no unit layer at all
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(6, 8, batch_first=True)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    x = torch.randn(4, 5, 6)
    with pytest.raises(ValueError, match="found no unit layers in this Tagger.*recurrent units are not removed"):
        units.remove_units(Tagger(), "rand", (x, torch.zeros(4, dtype=torch.long)), fraction=0.5)


@pytest.mark.parametrize("z", zoo_params(["lstm-lm", "gru-lm"]))
def test_embedding_into_a_recurrent_layer_is_one_group(z):
    model, data = built(z)
    work = copy.deepcopy(model)
    result = units.remove_units(work, "bp_abs_mrs", data, fraction=0.5)
    assert list(result.plan) == ["embed"] and result.units.groups[0].members == ["embed", "rnn"]
    small = units.thin(work, result)
    assert small.embed.embedding_dim == small.rnn.input_size == 8 and small.rnn.weight_ih_l0.shape[1] == 8
    batch = as_batch(data[0], where="test")
    torch.testing.assert_close(outputs(small, batch), outputs(work, batch), atol=1e-5, rtol=1e-5)


def test_mean_replacement_without_bias_folds_into_the_next_batchnorm():
    model, data = built(BY_NAME["resnet18"])
    work = copy.deepcopy(model)
    before = work.layer1[0].bn1.running_mean.clone()
    result = units.remove_units(work, "bp_rand", data, fraction=0.5)
    assert result.mean_replacement
    assert not torch.equal(work.layer1[0].bn1.running_mean, before)  # conv1 has no bias: its BN absorbs
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 12 * 12, 2),
    )
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(ValueError, match="bias of '2', which has none"):
        units.remove_units(net, "bp_rand", (x, torch.zeros(4, dtype=torch.long)), fraction=0.5)


def _finite_difference(model, batch, scale_tensors, eps=1e-6):
    """d(summed loss)/dε when the given (tensor, index) entries are multiplied by (1 − ε)."""
    from prunelab.inputs import make_loss
    from prunelab.units.groups import summed_loss

    loss = make_loss(None, where="test")
    values = []
    for e in (eps, -eps):
        work = copy.deepcopy(model)
        with torch.no_grad():
            for get, idx in scale_tensors:
                get(work)[idx] *= 1 - e
            values.append(float(summed_loss(loss, batch.call(work), batch)))
    return (values[0] - values[1]) / (2 * eps)


def test_rs_of_a_residual_stream_is_the_derivative_of_scaling_it_everywhere():
    # scaling a stream channel's BatchNorm scale and shift in every block that adds into it scales
    # the channel by (1 − ε) at every layer that reads it (ReLU is positively homogeneous), so
    # N · rs = d loss_sum / dε: the group score sums its members' first-order terms
    model, data = built(BY_NAME["resnet18"])
    model = copy.deepcopy(model).double()
    x, y = data[0]
    batch = as_batch((x.double(), y), where="test")
    found = units.Units.of(model, example_inputs=x[:2].double())
    stream = next(g for g in found.groups if "layer1.1.conv2" in g.members)
    rs = units.score_units(model, "rs", [batch], layers=[stream.name], units=found)[stream.name]
    norms = ("bn1", "layer1.0.bn2", "layer1.1.bn2")
    for channel in (0, 5):
        entries = [
            (lambda m, n=n, p=p: getattr(m.get_submodule(n), p), channel) for n in norms for p in ("weight", "bias")
        ]
        expected = _finite_difference(model, batch, entries)
        assert len(x) * rs[channel].item() == pytest.approx(expected, rel=1e-4, abs=1e-8)


def test_rs_of_a_head_is_the_derivative_of_scaling_its_values():
    model, data = built(BY_NAME["hf-bert"])
    model = copy.deepcopy(model).double()
    batch = as_batch(data[0], where="test")
    attn = "bert.encoder.layer.1.attention.self"
    found = units.Units.of(model, example_inputs=batch.inputs)
    rs = units.score_units(model, "rs", [batch], layers=[f"{attn}:heads"], units=found)[f"{attn}:heads"]
    for head in (0, 3):
        rows = slice(head * 4, head * 4 + 4)
        entries = [(lambda m, p=p: getattr(m.get_submodule(f"{attn}.value"), p), rows) for p in ("weight", "bias")]
        expected = _finite_difference(model, batch, entries)
        assert batch.size * rs[head].item() == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_thin_dead_units_of_a_gpt2_mlp_keeps_the_outputs():
    # units with no incoming weight still output gelu(bias): thin_dead_units folds that constant
    # into c_proj's bias (exact: a Linear-like layer, no padding) and removes them
    model, data = built(BY_NAME["hf-gpt2"])
    work = copy.deepcopy(model)
    with torch.no_grad():
        work.transformer.h[0].mlp.c_fc.weight[:, [1, 4, 9]] = 0.0  # Conv1D: weight (in, out)
        work.transformer.h[0].mlp.c_fc.bias[[1, 4, 9]] = 0.5
    batch = as_batch(data[0], where="test")
    dead = units.zero_units(work, example_inputs=batch.inputs)
    assert {k: v.tolist() for k, v in dead.items()} == {"transformer.h.0.mlp": [1, 4, 9]}
    small, plan = units.thin_dead_units(work, example_inputs=batch.inputs)
    assert list(plan) == ["transformer.h.0.mlp"]
    assert small.transformer.h[0].mlp.c_fc.nf == 32 - 3 and small.transformer.h[0].mlp.c_proj.weight.shape[0] == 29
    torch.testing.assert_close(outputs(small, batch), outputs(work, batch), atol=1e-5, rtol=1e-5)


def test_embedding_into_a_sequence_first_bidirectional_lstm():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 6)
            self.rnn = nn.LSTM(6, 5, bidirectional=True)  # (T, N, D) inputs
            self.out = nn.Linear(10, 3)

        def forward(self, tokens):  # tokens (N, T)
            return self.out(self.rnn(self.embed(tokens.T))[0][-1])

    torch.manual_seed(0)
    model = Tagger().eval()
    tokens, y = torch.randint(0, 20, (7, 4)), torch.randint(0, 3, (7,))
    scores = units.score_units(model, "abs_mrs", (tokens, y))["embed"]
    assert scores.shape == (6,) and (scores > 0).all()
    result = units.remove_units(model, "bp_abs_mrs", (tokens, y), count=2)
    small = units.thin(model, result)
    assert small.rnn.weight_ih_l0_reverse.shape == (20, 4) and small.rnn.input_size == 4
    torch.testing.assert_close(small(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def test_inputs_the_model_cannot_take_give_one_clear_error():
    model, _ = built(BY_NAME["transformer"])
    with pytest.raises(
        ValueError,
        match=r"could not run the model on a zero float tensor of input_shape \(8,\).*"
        r"example_inputs=",
    ):
        units.score_units(model, "norm", input_shape=(8,))


def test_groups_through_unsupported_modules_are_left_out_with_the_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.GroupNorm(2, 8)
            self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # grouped, not depthwise
            self.c = nn.Conv2d(8, 6, 1)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            x = self.b(torch.relu(self.norm(self.a(x))))
            return self.fc(torch.relu(self.c(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 2, (4,))
    result = units.remove_units(net, "abs_rs", (x, y), fraction=0.5)
    assert list(result.plan) == ["c"]
    assert "GroupNorm" in result.refused["a"] and "grouped convolution (groups=2)" in result.refused["b"]
    with pytest.raises(ValueError, match="names 'b', whose units cannot be removed: 'b' is a grouped convolution"):
        units.remove_units(net, "rand", (x, y), fraction=0.5, layers=["b"])
    torch.testing.assert_close(units.thin(net, result)(x), net(x), atol=1e-5, rtol=1e-5)


def test_mean_replacing_constant_mlp_units_is_free():
    # a GPT-2 MLP unit with no incoming weight outputs gelu(bias) at every token: its abs_mrs
    # score is 0, it is picked first, and replacing it by its mean changes no output
    model, data = built(BY_NAME["hf-gpt2"])
    work = copy.deepcopy(model)
    with torch.no_grad():
        work.transformer.h[1].mlp.c_fc.weight[:, [2, 5]] = 0.0
        work.transformer.h[1].mlp.c_fc.bias[[2, 5]] = 0.3
    batch = as_batch(data[0], where="test")
    before = outputs(work, batch)
    group = "transformer.h.1.mlp"
    scores = units.score_units(work, "abs_mrs", data, layers=[group])[group]
    assert scores[[2, 5]].max() < 1e-8 and scores[[2, 5]].max() < scores.sort().values[2]  # 0 up to float32
    result = units.remove_units(work, "bp_abs_mrs", data, count=2, layers=[group])
    assert result.plan[group].tolist() == [2, 5]
    torch.testing.assert_close(outputs(work, batch), before, atol=1e-6, rtol=1e-6)
    no_mean = copy.deepcopy(model)
    with torch.no_grad():
        no_mean.transformer.h[1].mlp.c_fc.weight[:, [2, 5]] = 0.0
        no_mean.transformer.h[1].mlp.c_fc.bias[[2, 5]] = 0.3
    units.remove_units(no_mean, "abs_mrs", data, count=2, layers=[group])
    assert (outputs(no_mean, batch) - before).abs().max() > 1e-5  # without the mean it changes


def test_thin_refuses_an_attention_whose_forward_reads_its_own_head_count():
    class Attention(nn.Module):  # looks like LLaMA's, but splits heads with a count of its own
        def __init__(self, d=8, heads=4):
            super().__init__()
            self.head_dim, self.split = d // heads, heads
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

        def forward(self, x):
            n, t, _ = x.shape
            q, k, v = (p(x).view(n, t, self.split, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
            return self.o_proj(out.transpose(1, 2).reshape(n, t, -1))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.attn, self.head = nn.Embedding(10, 8), Attention(), nn.Linear(8, 3)

        def forward(self, tokens):
            return self.head(self.attn(self.embed(tokens)).mean(dim=1))

    torch.manual_seed(0)
    net = Net().eval()
    tokens, y = torch.randint(0, 10, (4, 5)), torch.randint(0, 3, (4,))
    result = units.remove_units(net, "rand", (tokens, y), fraction=0.5, layers=["attn:heads"])
    with pytest.raises(ValueError, match="thinning attn:heads does not keep the masked model's outputs"):
        units.thin(net, result)
