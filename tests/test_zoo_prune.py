"""Score-based criteria (magnitude, random, gradient, OBD) on every zoo model, every scope and every
granularity that applies, with the result checked: exact zeros where the masks say, masks made of
whole groups (and the bias entries of pruned units zeroed), the realised sparsity, finite outputs,
tied weights pruned once."""

import warnings

import pytest
import torch
from zoo import zoo_params

from prunelab.inputs import as_batch, logits_of
from prunelab.pruning import prune
from prunelab.pruning.granularity import make_granularity
from prunelab.pruning.targets import TiedWeightSkipped

CRITERIA = ("magnitude", "random", "gradient", "obd")
SPARSITY = 0.5


def _prune(z, criterion, granularity, scope, layers=None):
    model = z.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TiedWeightSkipped)
        pruner = prune(
            model,
            SPARSITY,
            criterion=criterion,
            granularity=granularity,
            scope=scope,
            layers=layers,
            data=z.batches(1, batch=2),
        )
    return model, pruner


def _check(z, model, pruner, granularity_name, scope):
    granularity = make_granularity(granularity_name)
    max_group, total, groups = 0, 0, {}
    for target in pruner.targets:
        weight, keep = target.weight.detach(), pruner.mask(target.name)
        assert torch.equal(weight != 0, keep), f"{target.name}: zeros differ from the mask"
        group_keep = granularity.group_scores(keep.float(), "sum", target)
        size = granularity.group_size(weight, target)
        assert torch.all((group_keep == 0) | (group_keep == size)), f"{target.name}: a group partly pruned"
        if granularity.prunes_bias and target.bias is not None:
            assert torch.all(target.bias.detach()[(group_keep == 0).flatten()] == 0)
        max_group, total = max(max_group, size), total + weight.numel()
        groups[target.name] = group_keep.numel()
    if scope == "local":
        for name, s in pruner.layer_sparsity().items():
            assert abs(s - SPARSITY) <= 0.5 / groups[name] + 1e-9, f"{name} at {s}"
    else:
        assert abs(pruner.sparsity() - SPARSITY) <= max_group / total + 1e-9
    with torch.no_grad():
        out = logits_of(as_batch(z.batches(1, seed=3)[0], where="test").call(model))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("granularity", ["weight", "filter", "channel"])
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("z", zoo_params())
def test_every_criterion_granularity_and_scope_on_every_zoo_model(z, criterion, granularity, scope):
    model, pruner = _prune(z, criterion, granularity, scope)
    _check(z, model, pruner, granularity, scope)


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("z", zoo_params(["resnet18", "mobilenetv2"]))
def test_kernel_granularity_on_the_convolutions(z, criterion, scope):
    convs = [name for name, m in z.build().named_modules() if isinstance(m, torch.nn.Conv2d)]
    model, pruner = _prune(z, criterion, "kernel", scope, layers=convs)
    assert len(pruner.targets) == len(convs)
    _check(z, model, pruner, "kernel", scope)


@pytest.mark.parametrize("z", zoo_params(["hf-gpt2"]))
def test_gpt2_lm_head_is_skipped_by_default_and_pruned_once_with_the_embedding_when_named(z):
    model = z.build()
    embedding = model.transformer.wte.weight.detach().clone()
    with pytest.warns(TiedWeightSkipped, match="lm_head.weight is tied to an embedding"):
        pruner = prune(model, SPARSITY, criterion="obd", data=z.batches(1, batch=2))
    assert "lm_head.weight" not in [t.name for t in pruner.targets]
    assert torch.equal(model.transformer.wte.weight, embedding)
    assert all(abs(s - SPARSITY) < 1e-3 for s in pruner.layer_sparsity().values())  # every Conv1D pruned

    for criterion in CRITERIA:
        model = z.build()
        pruner = prune(model, SPARSITY, criterion=criterion, layers=["lm_head"], data=z.batches(1, batch=2))
        assert [t.weight for t in pruner.targets] == [model.transformer.wte.weight]  # one tensor, once
        assert model.lm_head.weight is model.transformer.wte.weight
        assert abs(pruner.sparsity() - SPARSITY) < 1e-3
        assert float((model.lm_head.weight == 0).float().mean()) == pytest.approx(SPARSITY, abs=1e-3)
    for granularity in ("filter", "channel"):
        with pytest.raises(
            ValueError,
            match=f"granularity '{granularity}' does not apply to "
            f"'lm_head.weight': it is tied to the Embedding 'transformer.wte'",
        ):
            prune(z.build(), SPARSITY, granularity=granularity, layers=["lm_head"])


@pytest.mark.parametrize("z", zoo_params(["hf-gpt2"]))
def test_gpt2_conv1d_filters_are_columns_with_their_bias_entries(z):
    model = z.build()
    conv = model.transformer.h[0].attn.c_attn  # weight (16, 48): in, out
    with torch.no_grad():
        conv.bias.uniform_(0.5, 1.0)  # GPT-2 starts with zero biases
    prune(model, SPARSITY, granularity="filter", layers=["transformer.h.0.attn.c_attn"])
    dead = (conv.weight == 0).all(dim=0)
    assert int(dead.sum()) == 24 and torch.all((conv.weight != 0)[:, ~dead])
    assert torch.all(conv.bias[dead] == 0) and torch.all(conv.bias[~dead] != 0)


def test_channel_of_a_depthwise_conv_is_its_filter_and_of_a_grouped_conv_spans_its_group():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=2), torch.nn.Conv2d(8, 8, 3, groups=8))
    pruner = prune(model, SPARSITY, granularity="channel")
    grouped, depthwise = model[0].weight, model[1].weight  # (8, 2, 3, 3), (8, 1, 3, 3)
    per_channel = grouped.detach().reshape(2, 4, 2, 9).abs().sum(dim=(1, 3)).flatten()  # input channel j
    assert int((per_channel == 0).sum()) == 2  # 2 of 4 input channels, whole
    assert torch.equal((depthwise.detach().flatten(1) == 0).all(1), (depthwise.detach().flatten(1) == 0).any(1))
    assert pruner.layer_sparsity()["1.weight"] == SPARSITY


@pytest.mark.parametrize("z", zoo_params())
def test_obd_mc_mode_on_every_zoo_model(z):
    model = z.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TiedWeightSkipped)
        pruner = prune(
            model,
            SPARSITY,
            criterion={"name": "obd", "mode": "mc", "samples": 2},
            scope="global",
            data=z.batches(1, batch=2),
        )
    _check(z, model, pruner, "weight", "global")
