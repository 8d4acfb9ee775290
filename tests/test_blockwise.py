"""Block-by-block calibration of the OBS solvers (sequential mode with a named stack of blocks):
the same weights as one full forward per layer, with the block inputs in memory or spilled to
disk, on a float32 and a bfloat16 LLaMA; bad stack names refused before any work; the report's
seconds, peak memory and per-block totals; the temporary directory removed, also on error."""

import tempfile
import warnings

import pytest
import torch
from zoo import BY_NAME, HAS_TRANSFORMERS

import prunelab
from prunelab.pruning import Pruner
from prunelab.pruning import blocks as blk
from prunelab.pruning.lobs import LayerwiseOBS, hessian

needs_hf = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")


def _per_layer(self, pruner, target):
    """The reference: each layer's Hessian from a whole-model forward of the model as it is now."""
    return hessian.collect(pruner.model, [target], self._batches, with_bias=self.update_bias)[target.name]


def _prune(model, batches, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prunelab.prune(model, 0.5, criterion="obs-fast", data=batches, batch_size=4, **options)


def _same_weights(a, b):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert p.dtype == q.dtype, name
        assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def llama():
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed")
    return BY_NAME["hf-llama"]


@needs_hf
@pytest.mark.parametrize("offload", [None, "disk"])
def test_named_llama_layers_give_the_weights_of_one_forward_per_layer(llama, offload, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    batches = llama.batches(3)
    fast, slow = llama.build(), llama.build()
    pruner = _prune(fast, batches, blocks="model.layers", offload=offload)
    monkeypatch.setattr(LayerwiseOBS, "_hessian", _per_layer)
    _prune(slow, batches)
    _same_weights(fast, slow)
    forwards = pruner.criterion.last_forwards
    assert forwards["cut short"] == len(batches)  # only the first block's inputs from the model
    assert forwards["block"] > 0
    assert not list(tmp_path.glob("prunelab-blocks-*"))  # the spill directory is gone


@needs_hf
def test_bfloat16_llama_is_pruned_with_float64_statistics(llama, monkeypatch):
    batches = llama.batches(2)
    model, reference = llama.build().to(torch.bfloat16), llama.build().to(torch.bfloat16)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {}
    inner = LayerwiseOBS._hessian

    def recording(self, pruner, target):
        h = inner(self, pruner, target)
        seen[target.name] = h.xtx.dtype
        return h

    monkeypatch.setattr(LayerwiseOBS, "_hessian", recording)
    pruner = _prune(model, batches, blocks="model.layers")
    assert set(seen.values()) == {torch.float64}
    for t in pruner.targets:
        w = t.weight.detach()
        assert w.dtype == torch.bfloat16
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.02), t.name
        assert not torch.equal(w, dense[t.name])  # compensated, not only masked
    assert all(0 < r.relative_error < 1 and r.n == 2 * 4 * 8 for r in pruner.history[-1].report)
    monkeypatch.setattr(LayerwiseOBS, "_hessian", _per_layer)
    _prune(reference, batches)
    _same_weights(model, reference)
    logits = model(input_ids=batches[0]["input_ids"]).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())


def test_a_partial_stack_in_a_resnet_gives_the_same_weights(monkeypatch):
    zoo = BY_NAME["resnet18"]
    batches = zoo.batches(2)
    fast, slow = zoo.build(), zoo.build()
    pruner = _prune(fast, batches, blocks="layer2", offload="disk")
    assert {r.block for r in pruner.history[-1].report} == {None, "layer2.0", "layer2.1"}
    monkeypatch.setattr(LayerwiseOBS, "_hessian", _per_layer)
    _prune(slow, batches)
    _same_weights(fast, slow)


def test_the_report_gives_seconds_peak_memory_and_block_totals():
    zoo = BY_NAME["transformer"]
    pruner = _prune(zoo.build(), zoo.batches(2), blocks="encoder.layers")
    report = pruner.history[-1].report
    inside = [r for r in report if r.block is not None]
    assert {r.block for r in inside} == {"encoder.layers.0", "encoder.layers.1"}
    assert all(r.seconds >= r.solve_seconds >= 0 for r in report)
    assert all(r.live_bytes > 0 for r in report)
    totals = report.blocks()
    assert [b["block"] for b in totals] == ["encoder.layers.0", "encoder.layers.1"]
    for b in totals:
        members = [r for r in inside if r.block == b["block"]]
        assert b["layers"] == len(members)
        assert b["seconds"] == pytest.approx(sum(r.seconds for r in members))
    if report.peak_memory is not None:  # Linux and macOS say; others may not
        assert all(0 < r.peak_memory <= report.peak_memory for r in report)
        assert "block encoder.layers.0" in str(report) and "peak" in str(report)


def test_the_cached_inputs_of_a_block_are_counted_in_its_live_bytes():
    zoo = BY_NAME["transformer"]
    batches = zoo.batches(2)
    report = _prune(zoo.build(), batches, blocks="encoder.layers").history[-1].report
    spilled = _prune(zoo.build(), batches, blocks="encoder.layers", offload="disk").history[-1].report
    d = 16
    for r, s in zip(report, spilled):
        if r.block is not None:  # one block's inputs: 2 batches of 4×8×d floats
            assert r.live_bytes - s.live_bytes >= 2 * 4 * 8 * d * 4
        else:
            assert r.live_bytes == s.live_bytes


@pytest.mark.parametrize(
    "blocks, error, words",
    [
        ("encoder.layer", ValueError, ["'encoder.layer'", "not a submodule", "encoder.layers"]),
        ("encoder.layers.0", ValueError, ["TransformerEncoderLayer", "not an nn.ModuleList", "encoder.layers"]),
        (3, TypeError, ["'blocks'", "dotted module path"]),
    ],
)
def test_a_bad_stack_is_refused_before_any_work(blocks, error, words):
    zoo = BY_NAME["transformer"]
    model = zoo.build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(error) as info:
        _prune(model, zoo.batches(1), blocks=blocks)
    for word in words:
        assert word in str(info.value)
    _same_weights(model, _Params(before))


class _Params(torch.nn.Module):
    def __init__(self, tensors):
        super().__init__()
        self._tensors = tensors

    def named_parameters(self, *args, **kwargs):
        return iter(self._tensors.items())


def test_a_stack_outside_the_model_and_bad_options_are_refused():
    zoo = BY_NAME["transformer"]
    model, other = zoo.build(), zoo.build()
    with pytest.raises(ValueError, match="not part of the model"):
        _prune(model, zoo.batches(1), blocks=other.encoder.layers)
    with pytest.raises(ValueError, match="'offload'.*one of: disk, memory"):
        _prune(model, zoo.batches(1), offload="ssd")
    with pytest.raises(ValueError, match="mode 'sequential'"):
        Pruner(model, 0.5, criterion={"name": "obs-fast", "mode": "parallel", "blocks": "encoder.layers"})
    with pytest.raises(TypeError, match="unknown option"):
        prunelab.prune(model, 0.5, criterion="magnitude", blocks="encoder.layers")


def test_the_spill_directory_is_removed_after_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    zoo = BY_NAME["transformer"]

    def fail(self, *args):
        assert list(tmp_path.glob("prunelab-blocks-*/*/*.pt"))  # spilled while it ran
        raise RuntimeError("solver failed")

    monkeypatch.setattr(LayerwiseOBS, "solve_layer", fail)
    with pytest.raises(RuntimeError, match="solver failed"):
        _prune(zoo.build(), zoo.batches(2), blocks="encoder.layers", offload="disk")
    assert not list(tmp_path.glob("prunelab-blocks-*"))


def test_the_progress_bar_counts_blocks_when_asked(capsys):
    zoo = BY_NAME["transformer"]
    _prune(zoo.build(), zoo.batches(1), blocks="encoder.layers", progress=True)
    shown = capsys.readouterr().err
    assert "obs-fast" in shown and "block" in shown
    _prune(zoo.build(), zoo.batches(1), blocks="encoder.layers", progress=False)
    assert capsys.readouterr().err == ""


def test_an_input_cache_on_disk_round_trips_and_advances_in_place():
    class Scaled(torch.nn.Linear):
        def forward(self, x, scale=1.0):
            return super().forward(x) * scale

    block = Scaled(4, 4)
    entries = [((torch.randn(2, 4),), {"scale": 2.0}) for _ in range(3)]
    with blk.Spill() as spill:
        cache = spill.new()
        for e in entries:
            cache.append(e)
        assert len(cache) == 3 and cache.nbytes() == 0
        assert all(torch.equal(a[0][0], b[0][0]) and a[1] == b[1] for a, b in zip(cache, entries))
        blk.advance(block, cache, ("arg", 0))
        with torch.no_grad():
            assert all(torch.equal(c[0][0], block(e[0][0], 2.0)) and c[1] == e[1] for c, e in zip(cache, entries))
        path = spill.path
    assert not path.exists()


def test_a_spilled_view_writes_only_its_own_elements():
    whole = torch.randn(1000, 64)
    with blk.Spill() as spill:
        cache = spill.new()
        cache.append(((whole[:2],), {}))
        assert (spill.path / "1" / "0.pt").stat().st_size < 64 * 1000 * 4 / 10
        assert torch.equal(cache[0][0][0], whole[:2])


@pytest.mark.parametrize("criterion", ["obs-fast", "wanda"])
def test_a_bfloat16_model_computed_in_float32_equals_the_float32_run_rounded(criterion):
    """compute_dtype: the served block runs in float32 on float32 inputs; the result is the
    float32 pipeline's on the same (bfloat16-valued) weights, rounded to bfloat16 at the end."""
    zoo = BY_NAME["transformer"]
    batches = zoo.batches(2)
    model = zoo.build().to(torch.bfloat16)
    reference = zoo.build().to(torch.bfloat16).float()
    layers = [name for name, p in model.named_parameters() if name.startswith("encoder") and p.dim() == 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prunelab.prune(
            model,
            0.5,
            criterion={"name": criterion, "compute_dtype": "float32"},
            data=batches,
            blocks="encoder.layers",
            layers=layers,
        )
        prunelab.prune(reference, 0.5, criterion=criterion, data=batches, blocks="encoder.layers", layers=layers)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, q.to(torch.bfloat16)), name
    assert float((model.encoder.layers[1].linear2.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="'compute_dtype'.*one of: float32, float64"):
        Pruner(model, 0.5, criterion={"name": criterion, "compute_dtype": "bfloat8", "blocks": "encoder.layers"})
