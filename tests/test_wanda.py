"""Wanda (|W_ij| · ‖X_j‖₂) and the per-output-row scope: scores against hand computations on a
tiny Linear and a tiny grouped, strided, padded conv; every batch form; every scope; the row
scope against a brute-force per-row ranking; clear errors."""

import pytest
import torch
from helpers import Conv1D  # Hugging Face's layout: weight (in, out)
from torch import nn
from torch.nn import functional as F

from prunelab.pruning import Pruner, prune
from prunelab.pruning.scopes import Event, LayerGroups, Row


def _wanda_scores(model, data, **kw):
    pruner = Pruner(model, 0.5, criterion="wanda", calibration=data, **kw)
    pruner.calibrate()
    return pruner, pruner.criterion.scores(pruner.targets)


def test_linear_scores_are_the_weight_times_the_input_column_norms():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    x = torch.randn(2, 7, 5)  # every token of every sequence is a column
    batches = [x[0], x[1]]
    _, (scores,) = _wanda_scores(layer, batches)
    norms = torch.zeros(5, dtype=torch.float64)
    for batch in batches:
        for row in batch:
            for j in range(5):
                norms[j] += float(row[j]) ** 2
    expected = layer.weight.detach().abs().double() * norms.sqrt()[None, :]
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-7)


def test_grouped_conv_scores_use_each_groups_own_patches():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    x = torch.randn(3, 4, 5, 5)
    _, (scores,) = _wanda_scores(conv, [x])
    padded = F.pad(x, (1, 1, 1, 1))
    sums = torch.zeros(4, 3, 3, dtype=torch.float64)  # input channel, kernel row, kernel column
    for n in range(3):
        for oi in range(3):
            for oj in range(3):
                for c in range(4):
                    for a in range(3):
                        for b in range(3):
                            sums[c, a, b] += float(padded[n, c, 2 * oi + a, 2 * oj + b]) ** 2
    expected = torch.empty(6, 2, 3, 3, dtype=torch.float64)
    for o in range(6):
        group = o // 3  # filters 0-2 read channels 0-1, 3-5 read 2-3
        expected[o] = conv.weight.detach()[o].abs().double() * sums[2 * group : 2 * group + 2].sqrt()
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-7)


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x, scale=None):
        h = torch.relu(self.fc1(x))
        return self.fc2(h if scale is None else h * scale)


def test_every_batch_form_gives_the_same_scores():
    torch.manual_seed(2)
    model = _TwoLayers()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    forms = {
        "tensors": [x[:4], x[4:]],
        "pairs": [(x[:4], y[:4]), (x[4:], y[4:])],
        "dicts": [{"x": x[:4]}, {"x": x[4:]}],
        "sliceable pair": (x, y),
        "data loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4),
    }
    reference = None
    for name, data in forms.items():
        _, scores = _wanda_scores(model, data, calibration_batch_size=4)
        if reference is None:
            reference = scores
        for a, b in zip(scores, reference):
            torch.testing.assert_close(a, b, msg=f"{name} differs")


def test_prune_zeroes_the_lowest_scores_of_every_row_by_default():
    torch.manual_seed(3)
    model = _TwoLayers()
    x = torch.randn(16, 6) * torch.tensor([5.0, 0.1, 1.0, 1.0, 3.0, 0.01])  # uneven input norms
    _, scores = _wanda_scores(_clone(model), [x])
    pruner = prune(model, 0.5, criterion="wanda", data=[x])
    assert pruner.scope.name == "row"
    for target, score in zip(pruner.targets, scores):
        keep = target.weight.detach() != 0
        k = score.shape[1]
        expected = torch.zeros_like(keep)
        expected.scatter_(1, torch.argsort(score, dim=1, descending=True)[:, : k - round(0.5 * k)], True)
        assert torch.equal(keep, expected), target.name
        assert torch.equal(pruner.mask(target.name), keep)


def _clone(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("scope", ["local", "global", "layerwise-constant", "row"])
def test_wanda_works_with_every_scope(scope):
    torch.manual_seed(4)
    model = _TwoLayers()
    x = torch.randn(16, 6)
    pruner = prune(model, 0.5, criterion="wanda", scope=scope, data=[x])
    assert pruner.scope.name == scope
    assert abs(pruner.sparsity() - 0.5) < 0.05
    if scope in ("local", "row", "layerwise-constant"):
        assert all(abs(s - 0.5) < 1e-9 for s in pruner.layer_sparsity().values())


@pytest.mark.parametrize("granularity,scope", [("filter", "local"), ("channel", "local"), ("weight", "row")])
def test_wanda_with_structured_granularities_falls_back_to_local(granularity, scope):
    torch.manual_seed(5)
    model = _TwoLayers()
    pruner = prune(model, 0.5, criterion="wanda", granularity=granularity, data=[torch.randn(8, 6)])
    assert pruner.scope.name == scope


def test_wanda_on_an_agp_schedule_during_training_recalibrates_before_each_prune():
    torch.manual_seed(6)
    model = _TwoLayers()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = Pruner(
        model,
        0.75,
        criterion="wanda",
        schedule="agp",
        schedule_args={"n_prunes": 3, "every": 2},
        calibration=(x, y),
        optimizer=opt,
    )
    pruner.update()
    for _ in range(8):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
    assert pruner.done
    levels = [r.sparsity for r in pruner.history]
    assert levels == sorted(levels) and len(levels) == 4  # 0 at step 0, then 3 prunes
    for target in pruner.targets:  # every row lost round(0.75 k) of its k weights
        k = target.weight.shape[1]
        assert torch.all((target.weight.detach() == 0).sum(dim=1) == round(0.75 * k))


def test_the_row_scope_matches_a_brute_force_per_row_ranking():
    g = torch.Generator().manual_seed(7)
    rows, k = 5, 9
    scores = torch.rand(rows, k, generator=g)
    alive = torch.rand(rows, k, generator=g) > 0.2
    layer = LayerGroups(scores.flatten(), alive.flatten(), 1, torch.arange(rows).repeat_interleave(k))
    keep = Row().select([layer], 0.4, Event(), min_keep=1)[0].reshape(rows, k)
    for r in range(rows):
        n_prune = max(int((~alive[r]).sum()), round(0.4 * k))
        order = sorted(range(k), key=lambda j: (bool(alive[r, j]), float(scores[r, j])))
        expected = torch.ones(k, dtype=torch.bool)
        expected[order[:n_prune]] = False
        assert torch.equal(keep[r], expected), r


def test_the_row_scope_with_magnitude_on_hf_conv1d_style_weights_follows_the_output_rows():
    torch.manual_seed(8)
    layer = Conv1D(3, 8)
    x = torch.randn(10, 8)
    prune(layer, 0.5, criterion="wanda", data=[x])
    assert torch.all((layer.weight.detach() == 0).sum(dim=0) == 4)  # each output column lost 4 of 8
    norms = x.pow(2).sum(0).sqrt()
    scores = layer.weight.detach().abs() * norms[:, None]
    kept = layer.weight.detach() != 0
    for o in range(3):
        assert scores[kept[:, o], o].min() >= scores[~kept[:, o], o].max()


def test_errors_are_clear():
    model = _TwoLayers()
    with pytest.raises(ValueError, match="needs calibration data"):
        prune(model, 0.5, criterion="wanda")
    with pytest.raises(ValueError, match="scope 'row' compares groups within an output row"):
        prune(model, 0.5, criterion="wanda", scope="row", granularity="filter", data=[torch.randn(4, 6)])
    embed = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="wanda cannot score '0.weight'.*lookup table"):
        prune(embed, 0.5, criterion="wanda", layers=["0"], data=[torch.randint(0, 10, (4, 3))])
    pruner = Pruner(_TwoLayers(), 0.5, criterion="wanda")
    with pytest.raises(ValueError, match="no input norms"):
        pruner.criterion.scores(pruner.targets)


def test_deeper_rnn_layers_read_the_layer_below_and_are_all_pruned():
    torch.manual_seed(9)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 8, num_layers=2, batch_first=True)
            self.out = nn.Linear(8, 4)

        def forward(self, x):
            return self.out(self.rnn(x)[0])

    model = LM()
    x = torch.randn(3, 5, 4)
    pruner, scores = _wanda_scores(model, [x])
    by_name = dict(zip([t.name for t in pruner.targets], scores))
    # layer 1 reads layer 0's outputs, recomputed from a one-layer LSTM holding layer 0's weights
    first = nn.LSTM(4, 8, batch_first=True)
    with torch.no_grad():
        for name, p in first.named_parameters():
            p.copy_(getattr(model.rnn, name))
        below, _ = first(x)
        out, _ = model.rnn(x)
    expected_ih1 = model.rnn.weight_ih_l1.detach().abs() * below.reshape(-1, 8).pow(2).sum(0).sqrt()
    previous = torch.cat([torch.zeros(3, 1, 8), out[:, :-1]], dim=1)  # layer 1's h_{t-1}
    expected_hh1 = model.rnn.weight_hh_l1.detach().abs() * previous.reshape(-1, 8).pow(2).sum(0).sqrt()
    torch.testing.assert_close(by_name["rnn.weight_ih_l1"], expected_ih1)
    torch.testing.assert_close(by_name["rnn.weight_hh_l1"], expected_hh1)
    pruner = prune(model, 0.5, criterion="wanda", data=[x])
    assert pruner.criterion.skipped == {}
    for name, sparsity in pruner.layer_sparsity().items():
        assert abs(sparsity - 0.5) < 1e-9, name


def test_study_specs_give_wanda_its_row_scope_unless_told_otherwise():
    from prunelab.runs import SpecError
    from prunelab.study import build_study

    def scopes(*methods):
        spec = {
            "name": "t",
            "datasets": ["digits"],
            "models": [{"name": "mlp", "hidden": [16]}],
            "methods": list(methods),
            "sparsities": [0.5],
            "seeds": 1,
            "training": {"epochs": 1, "finetune_epochs": 0},
        }
        return {run.method: run.config["method"]["scope"] for run in build_study(spec).runs}

    assert scopes(
        {"label": "w", "criterion": "wanda"},
        {"label": "w24", "criterion": {"name": "wanda"}, "granularity": "2:4"},
        {"label": "wc", "criterion": "wanda", "granularity": "channel"},
        {"label": "wg", "criterion": "wanda", "scope": "global"},
        {"label": "m", "criterion": "magnitude"},  # other criteria keep local, so their run ids stay
    ) == {"w": "row", "w24": "row", "wc": "local", "wg": "global", "m": "local"}
    with pytest.raises(SpecError, match="no-such"):  # an unknown criterion is reported, not a crash
        scopes({"label": "x", "criterion": "no-such"})


def test_a_one_layer_rnn_hidden_weight_reads_the_previous_hidden_states():
    torch.manual_seed(10)
    rnn = nn.GRU(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    pruner, scores = _wanda_scores(rnn, [x])
    by_name = dict(zip([t.name for t in pruner.targets], scores))
    with torch.no_grad():
        out, _ = rnn(x)
    previous = torch.cat([torch.zeros(2, 1, 4), out[:, :-1]], dim=1)  # h_{t-1}, h_{-1} = 0
    expected_hh = rnn.weight_hh_l0.detach().abs() * previous.reshape(-1, 4).pow(2).sum(0).sqrt()
    expected_ih = rnn.weight_ih_l0.detach().abs() * x.reshape(-1, 3).pow(2).sum(0).sqrt()
    torch.testing.assert_close(by_name["weight_hh_l0"], expected_hh)
    torch.testing.assert_close(by_name["weight_ih_l0"], expected_ih)


def test_cross_attention_q_k_v_blocks_use_their_own_inputs_and_out_proj_the_context():
    torch.manual_seed(11)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, q, kv, v):
            return self.attn(q, kv, v, need_weights=False)[0]

    model = Cross().eval()
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4) * 3
    pruner, scores = _wanda_scores(model, [{"q": q, "kv": k, "v": v}])
    by_name = dict(zip([t.name for t in pruner.targets], scores))
    W = model.attn.in_proj_weight.detach().abs()
    norms = [t.reshape(-1, 4).pow(2).sum(0).sqrt() for t in (q, k, v)]
    expected = torch.cat([W[4 * i : 4 * (i + 1)] * norms[i] for i in range(3)])
    torch.testing.assert_close(by_name["attn.in_proj_weight"], expected)
    with torch.no_grad():  # out_proj reads the heads' context, before the projection
        from prunelab.pruning.lobs.hessian import attention_context

        context = attention_context(
            model.attn,
            {"query": q, "key": k, "value": v, "key_padding_mask": None, "attn_mask": None, "is_causal": False},
        )
    expected_out = model.attn.out_proj.weight.detach().abs() * context.reshape(-1, 4).pow(2).sum(0).sqrt()
    torch.testing.assert_close(by_name["attn.out_proj.weight"], expected_out)
