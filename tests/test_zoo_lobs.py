"""The layer-wise OBS solvers on every zoo model: lobs, obs-fast, obs-exact at 50 %, scopes
local and global. Each cell prunes (zeros and realised sparsity checked, and every
Linear-like layer's layer-wise error compared with magnitude pruning at the same sparsity
on the Hessian the solver used, summed over the layers, for obs-fast and obs-exact; for every
solver each layer's error is below that of emptying the layer) or skips, with the reason listed, the layers it cannot prune.
The cached-block sequential mode is compared with one full forward per layer."""

import warnings

import pytest
import torch
from zoo import zoo_params

from prunelab.pruning import Pruner
from prunelab.pruning.criteria import make_criterion
from prunelab.pruning.lobs import LayerwiseOBS, hessian

SOLVERS = ["lobs", "obs-fast", "obs-exact"]
# layers each zoo model keeps dense, by design (none: the RNNs' hidden states are recomputed)
SKIPPED: dict[str, set] = {}


class Recording:
    """Wraps a solver's ``_hessian`` to keep each layer's Hessian and weights before the prune."""

    def __init__(self, criterion):
        self.seen = {}
        inner = criterion._hessian

        def wrapped(pruner, target):
            h = inner(pruner, target)
            self.seen[target.name] = (h, target.matrix().double().clone())
            return h

        criterion._hessian = wrapped


def layer_error(W_new, W, h, bias_delta=None):
    """Σ over row blocks of ΔW̃ H ΔW̃ᵀ (the layer-wise error E); the bias unchanged unless given."""
    G = h.groups
    rows = W.shape[0] // G
    total = 0.0
    for g in range(G):
        r = slice(g * rows, (g + 1) * rows)
        delta = W_new[r] - W[r]
        if h.with_bias:
            extra = torch.zeros(rows, 1, dtype=delta.dtype) if bias_delta is None else bias_delta[r, None]
            delta = torch.cat([delta, extra], 1)
        total += float(torch.einsum("ri,ij,rj->", delta, h.part(g).H, delta))
    return total


def magnitude_like(W, keep_count_per_block, G):
    rows = W.shape[0] // G
    out = torch.zeros_like(W)
    for g, k in enumerate(keep_count_per_block):
        block = W[g * rows : (g + 1) * rows]
        idx = torch.argsort(block.abs().flatten(), descending=True, stable=True)[:k]
        kept = torch.zeros(block.numel(), dtype=torch.bool)
        kept[idx] = True
        out[g * rows : (g + 1) * rows] = torch.where(kept.reshape(block.shape), block, torch.zeros_like(block))
    return out


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("zoo", zoo_params())
def test_solver_prunes_every_zoo_model(zoo, solver, scope):
    model = zoo.build()
    criterion = make_criterion(solver)
    record = Recording(criterion)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, 0.5, criterion=criterion, scope=scope, calibration=zoo.batches(2))
        pruner.update()
    assert set(criterion.skipped) == SKIPPED.get(zoo.name, set())
    pruned = [t for t in pruner.targets if t.name not in criterion.skipped]
    total = kept = 0
    for t in pruner.targets:
        w = t.weight.detach()
        mask = pruner.masks.get(t.weight)
        mask = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.bool()
        if t.name in criterion.skipped:
            assert bool(mask.all())
            continue
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))  # zeros where pruned
        total += w.numel()
        kept += int(mask.sum())
    assert 1 - kept / total == pytest.approx(0.5, abs=0.02)  # realised sparsity
    sums = [0.0, 0.0]
    for t in pruned:
        h, W_before = record.seen[t.name]
        W_after = t.matrix().double()
        if scope == "local":
            assert float((W_after == 0).double().mean()) == pytest.approx(0.5, abs=0.05)
        if t.layout not in ("linear", "transposed") or bool((W_after != 0).all()):
            continue
        G = h.groups
        rows = W_after.shape[0] // G
        counts = [int((W_after[g * rows : (g + 1) * rows] != 0).sum()) for g in range(G)]
        err_mag = layer_error(magnitude_like(W_before, counts, G), W_before, h)
        report = {r.layer: r for r in pruner.history[-1].report}[t.name]
        assert report.relative_error < 1.0, t.name  # better than emptying the layer
        sums[0] += report.measured_error**2
        sums[1] += err_mag
    if solver != "lobs":  # the paper's L-OBS never down-dates H⁻¹: at 50 % it can lose to magnitude
        # summed over the Linear-like layers, the error (bias compensation included) is below magnitude's
        # (a single layer with LayerNorm'd, near-singular inputs may lose slightly: damping)
        # obs-fast picks its mask block-wise on w²/U_ii² before compensating: on the tiny random GPT-2
        # and ViT it lands within 3 % of magnitude (an open question, see docs/second-order.md)
        slack = 1.05 if solver == "obs-fast" else 1 + 1e-6
        assert sums[0] <= sums[1] * slack + 1e-12


@pytest.mark.parametrize("zoo", zoo_params(["resnet18", "mobilenetv2", "transformer", "hf-gpt2", "hf-llama"]))
def test_cached_block_sequential_mode_equals_one_forward_per_layer(zoo, monkeypatch):
    batches = zoo.batches(2)
    fast, slow = zoo.build(), zoo.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = Pruner(fast, 0.5, criterion="obs-fast", calibration=batches)
        a.update()

        def per_layer(self, pruner, target):  # the old sequential mode: the whole model per layer
            return hessian.collect(pruner.model, [target], self._batches, with_bias=self.update_bias)[target.name]

        monkeypatch.setattr(LayerwiseOBS, "_hessian", per_layer)
        b = Pruner(slow, 0.5, criterion="obs-fast", calibration=batches)
        b.update()
    forwards = a.criterion.last_forwards
    assert forwards["block"] > 0 and forwards["model"] < len(a.targets) * len(batches)
    for (name, p), (_, q) in zip(fast.named_parameters(), slow.named_parameters()):
        assert torch.equal(p, q), name
