"""Wanda and N:M on every zoo model: zeros exactly where the masks say, every output row of every
scored layer pruned by the same exact fraction (Wanda's row scope), layers Wanda cannot see left
dense, every N:M run at most N, finite outputs."""

import warnings

import pytest
import torch
from zoo import zoo_params

from prunelab.inputs import as_batch, logits_of
from prunelab.pruning import prune
from prunelab.pruning.granularity import NMGranularity, nm_view
from prunelab.pruning.lobs import LayerSkipped
from prunelab.pruning.targets import TiedWeightSkipped, resolve_targets


def _finite_output(z, model):
    with torch.no_grad():
        out = logits_of(as_batch(z.batches(1, seed=3)[0], where="test").call(model))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("z", zoo_params())
def test_wanda_at_half_prunes_every_row_by_half_on_every_zoo_model(z):
    model = z.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TiedWeightSkipped)
        warnings.simplefilter("ignore", LayerSkipped)
        pruner = prune(model, 0.5, criterion="wanda", data=z.batches(2, batch=2))
    assert pruner.scope.name == "row"
    skipped = pruner.criterion.skipped
    assert len(skipped) < len(pruner.targets)
    for target in pruner.targets:
        weight, keep = target.weight.detach(), pruner.mask(target.name)
        assert torch.equal(weight != 0, keep), target.name
        if target.name in skipped:
            assert bool(keep.all()), f"{target.name} was skipped but pruned"
            continue
        pruned = (~keep).movedim(target.out_axis, 0).reshape(weight.shape[target.out_axis], -1)
        k = pruned.shape[1]
        assert torch.all(pruned.sum(dim=1) == round(0.5 * k)), f"{target.name}: rows pruned unevenly"
    _finite_output(z, model)


def _nm_layers(model, m):
    """The default targets whose inputs come in runs of m (the others are refused by name)."""
    granularity = NMGranularity(1, m)
    chosen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TiedWeightSkipped)
        for target in resolve_targets(model):
            try:
                granularity.check(target)
            except ValueError:
                continue
            chosen.append(target.name)
    return chosen


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
@pytest.mark.parametrize("z", zoo_params())
def test_2_4_on_every_zoo_model(z, criterion):
    model = z.build()
    layers = _nm_layers(model, 4)
    if criterion == "wanda":
        from prunelab.pruning.lobs import hessian

        parents = hessian.attention_parents(model)
        layers = [t.name for t in resolve_targets(model, layers) if hessian.unsupported(t, parents) is None]
    assert layers, "no layer takes 2:4"
    pruner = prune(model, None, criterion=criterion, granularity="2:4", layers=layers, data=z.batches(1, batch=2))
    for target in pruner.targets:
        runs = nm_view(target.weight.detach(), target.layout).reshape(-1, 4)
        assert torch.all((runs != 0).sum(dim=1) <= 2), target.name
        assert torch.equal(pruner.mask(target.name), target.weight.detach() != 0)
    _finite_output(z, model)


@pytest.mark.parametrize("criterion", ["gradient", "random", "obd"])
@pytest.mark.parametrize("z", zoo_params(["hf-gpt2", "transformer"]))
def test_4_8_with_the_other_criteria_on_attention_models(z, criterion):
    model = z.build()
    pruner = prune(
        model, 0.5, criterion=criterion, granularity="4:8", layers=_nm_layers(model, 8), data=z.batches(1, batch=2)
    )
    for target in pruner.targets:
        runs = nm_view(target.weight.detach(), target.layout).reshape(-1, 8)
        assert torch.all((runs != 0).sum(dim=1) <= 4), target.name
    _finite_output(z, model)
