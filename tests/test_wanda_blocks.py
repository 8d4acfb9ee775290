"""Wanda with bounded memory: the Pruner scores and selects one layer at a time (only one
layer's scores alive) under the scopes that decide each layer alone; the global scope's cut by
bisection equals the cut of a stable sort; and Wanda block by block (the paper's variant) equals
a hand-written block loop on a tiny LLaMA and a tiny nn.TransformerEncoder, with its options
(inputs on disk, float32 compute for a bfloat16 model, progress bar, per-layer report)."""

import copy
import tempfile
import warnings
import weakref

import pytest
import torch
from torch import nn
from zoo import BY_NAME, HAS_TRANSFORMERS

import prunelab
from prunelab.pruning import Pruner
from prunelab.pruning.criteria import Magnitude
from prunelab.pruning.scopes import LayerGroups, _global_by_sorting, _global_by_threshold
from prunelab.pruning.wanda import input_norms, wanda_scores

needs_hf = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")


# ------------------------------------------------------------------ one layer at a time
class _Watched(Magnitude):
    """Magnitude that records, whenever a layer's scores are asked for, how many of the scores
    it gave before are still alive somewhere."""

    name = "magnitude"

    def __init__(self):
        self.given, self.alive_when_asked = [], []

    def iter_scores(self, targets):
        for t in targets:
            self.alive_when_asked.append(sum(ref() is not None for ref in self.given))
            score = t.weight.detach().abs() + 0.0  # a tensor of its own, not a view of the weight
            self.given.append(weakref.ref(score))
            yield score
            del score


@pytest.mark.parametrize("scope", ["local", "row", "layerwise-constant"])
@pytest.mark.parametrize("granularity", ["weight", "2:4"])
def test_only_one_layers_scores_are_alive_under_scopes_that_decide_each_layer_alone(scope, granularity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    criterion = _Watched()
    sparsity = None if granularity == "2:4" else 0.5
    pruner = Pruner(model, sparsity, criterion=criterion, scope=scope, granularity=granularity)
    pruner.update()
    assert criterion.alive_when_asked == [0, 0, 0]
    assert pruner.sparsity() == pytest.approx(0.5)


def test_a_non_finite_score_in_a_later_layer_leaves_every_layer_unpruned():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))

    class NaNLast(Magnitude):
        def iter_scores(self, targets):
            for i, t in enumerate(targets):
                yield t.weight.detach().abs() * (float("nan") if i == len(targets) - 1 else 1.0)

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="scores of '2.weight' has .* non-finite"):
        prunelab.prune(model, 0.5, criterion=NaNLast(), scope="row")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# ------------------------------------------------------------------ global by bisection
def _random_layers(g, dtype, n_layers=4):
    layers = []
    for _ in range(n_layers):
        n = int(torch.randint(1, 40, (1,), generator=g))
        scores = torch.randint(0, 6, (n,), generator=g).to(dtype) / 4  # many ties
        scores[torch.rand(n, generator=g) < 0.1] = float("inf")  # N:M-protected groups
        alive = torch.rand(n, generator=g) > 0.3
        layers.append(LayerGroups(scores, alive, 1))
    return layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_global_cut_by_bisection_equals_the_cut_of_a_stable_sort(dtype):
    g = torch.Generator().manual_seed(2)
    for trial in range(200):
        layers = _random_layers(g, dtype)
        sparsity = float(torch.rand(1, generator=g)) * 0.999
        min_keep = int(torch.randint(0, 4, (1,), generator=g))
        fast = _global_by_threshold(layers, sparsity, min_keep, 1)
        slow = _global_by_sorting(layers, sparsity, min_keep)
        for a, b in zip(fast, slow):
            assert torch.equal(a, b), (trial, sparsity, min_keep)


def test_the_global_cut_treats_minus_zero_as_zero():
    layers = [LayerGroups(torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0]), torch.ones(5, dtype=torch.bool), 1)]
    for sparsity in (0.2, 0.4, 0.6):
        assert torch.equal(_global_by_threshold(layers, sparsity, 1, 1)[0], _global_by_sorting(layers, sparsity, 1)[0])


# ------------------------------------------------------------------ block by block
def _prune(model, batches, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prunelab.prune(model, 0.5, criterion="wanda", data=batches, batch_size=4, **options)


def _prune_rows_by_hand(target, norms, sparsity=0.5):
    """Zero the lowest ``round(S·k)`` of every output row of ``|W| · ‖X‖`` (the row scope)."""
    scores = wanda_scores(target, norms)
    weight = target.weight.detach()
    k = scores.shape[1]
    lowest = torch.argsort(scores, dim=1, stable=True)[:, : round(sparsity * k)]
    weight.scatter_(1, lowest, 0.0)


def _by_hand(model, batches, stack):
    """The paper's loop, written out: for block i, the norms of its layers from the model as it
    is (blocks before i pruned, block i dense), then block i pruned; then the layers outside
    the stack, from the model with every block pruned."""
    pruner = Pruner(model, 0.5, criterion="wanda")  # only for its targets
    targets = [t for t in pruner.targets if t.name not in pruner.criterion.skipped]
    blocks = model.get_submodule(stack)
    runs = [[t for t in targets if t.name.startswith(f"{stack}.{i}.")] for i in range(len(blocks))]
    runs.append([t for t in targets if not t.name.startswith(f"{stack}.")])
    for run in runs:
        if run:
            norms = input_norms(model, run, batches)
            for target in run:
                _prune_rows_by_hand(target, norms[target.name])


def _same_weights(a, b):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def llama():
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed")
    return BY_NAME["hf-llama"]


@needs_hf
@pytest.mark.parametrize("offload", [None, "disk"])
def test_block_by_block_wanda_on_llama_equals_the_loop_by_hand(llama, offload, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    batches = llama.batches(3)
    model, reference, one_pass = llama.build(), llama.build(), llama.build()
    pruner = _prune(model, batches, blocks="model.layers", offload=offload)
    _by_hand(reference, batches, "model.layers")
    _same_weights(model, reference)
    assert pruner.scope.name == "row" and pruner.sparsity() == pytest.approx(0.5)
    assert not list(tmp_path.glob("prunelab-blocks-*"))  # the spill directory is gone
    _prune(one_pass, batches)  # the statistics of the dense model:
    assert not torch.equal(
        one_pass.model.layers[1].mlp.down_proj.weight,  # block 1 differs
        model.model.layers[1].mlp.down_proj.weight,
    )
    assert torch.equal(
        one_pass.model.layers[0].self_attn.q_proj.weight,  # block 0 does not
        model.model.layers[0].self_attn.q_proj.weight,
    )


def test_block_by_block_wanda_on_a_transformer_encoder_equals_the_loop_by_hand():
    zoo = BY_NAME["transformer"]
    batches = zoo.batches(2)
    model, reference = zoo.build(), zoo.build()
    pruner = _prune(model, batches, blocks="encoder.layers")
    _by_hand(reference, batches, "encoder.layers")
    _same_weights(model, reference)
    for target in pruner.targets:  # MultiheadAttention's packed q/k/v included: every row at half
        if target.name not in pruner.criterion.skipped:
            pruned = (target.weight.detach() == 0).movedim(target.out_axis, 0)
            rows = pruned.reshape(pruned.shape[0], -1)
            assert torch.all(rows.sum(dim=1) == round(0.5 * rows.shape[1])), target.name
    assert pruner.criterion.last_held == ()


def test_the_report_gives_seconds_peak_memory_and_block_totals():
    zoo = BY_NAME["transformer"]
    pruner = _prune(zoo.build(), zoo.batches(2), blocks="encoder.layers")
    report = pruner.history[-1].report
    assert report is pruner.criterion.last_report
    assert {r.block for r in report} == {"encoder.layers.0", "encoder.layers.1", None}  # None: the head
    assert [b["block"] for b in report.blocks()] == ["encoder.layers.0", "encoder.layers.1"]
    assert all(r.seconds >= r.select_seconds >= 0 and r.n == 2 * 4 * 8 for r in report if r.block is not None)
    firsts = {}
    for r in report:
        firsts.setdefault(r.block, r)
    assert all(r.norm_seconds > 0 for r in firsts.values())  # the block's pass, paid by its first layer
    assert all(r.live_bytes > 0 for r in report if r.block is not None)
    assert all(r.sparsity == pytest.approx(0.5) for r in report)
    if report.peak_memory is not None:
        assert all(0 < r.peak_memory <= report.peak_memory for r in report)
        assert "block encoder.layers.1" in str(report) and "whole prune: peak" in str(report)


def test_the_progress_bar_counts_blocks_when_asked(capsys):
    zoo = BY_NAME["transformer"]
    _prune(zoo.build(), zoo.batches(1), blocks="encoder.layers", progress=True)
    shown = capsys.readouterr().err
    assert "wanda" in shown and "block" in shown
    _prune(zoo.build(), zoo.batches(1), blocks="encoder.layers", progress=False)
    assert capsys.readouterr().err == ""


def test_block_by_block_with_2_4_and_local_scope():
    zoo = BY_NAME["transformer"]
    model = zoo.build()
    layers = [n for n, p in model.named_parameters() if n.startswith("encoder") and p.dim() == 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = prunelab.prune(
            model,
            None,
            criterion="wanda",
            granularity="2:4",
            data=zoo.batches(1),
            blocks="encoder.layers",
            layers=layers,
        )
        local = prunelab.prune(
            zoo.build(),
            0.5,
            criterion="wanda",
            scope="local",
            data=zoo.batches(1),
            blocks="encoder.layers",
            layers=layers,
        )
    for target in pruner.targets:
        runs = target.weight.detach().reshape(-1, 4)
        assert torch.all((runs != 0).sum(dim=1) == 2), target.name
    assert all(s == pytest.approx(0.5) for s in local.layer_sparsity().values())


def test_block_by_block_errors_are_clear():
    zoo = BY_NAME["transformer"]
    model, data = zoo.build(), zoo.batches(1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="scope 'global' ranks every layer's scores at once; block by block"):
        prunelab.prune(model, 0.5, criterion="wanda", scope="global", data=data, blocks="encoder.layers")
    with pytest.raises(ValueError, match="'blocks' parameter of wanda criterion names 'encoder.layer',"):
        prunelab.prune(model, 0.5, criterion="wanda", data=data, blocks="encoder.layer")
    with pytest.raises(ValueError, match="apply block by block: name the stack of blocks too"):
        prunelab.prune(model, 0.5, criterion="wanda", data=data, offload="disk")
    with pytest.raises(ValueError, match=r"'offload' parameter of prune must be one of: disk, memory\. Got 'tape'"):
        prunelab.prune(model, 0.5, criterion="wanda", data=data, blocks="encoder.layers", offload="tape")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
