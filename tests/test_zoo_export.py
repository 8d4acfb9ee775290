"""Save/load, ONNX export and sparsify over the zoo: every cell checked against the model's outputs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from prunelab import export
from prunelab.inputs import as_batch, logits_of
from prunelab.sparse import SparseLinear, sparsify
from zoo import BY_NAME, zoo_params

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
HAS_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None


def _sparse_copy(z, fraction=0.9):
    """The zoo model with ``fraction`` of every Linear-like weight zeroed (a pruned model)."""
    model = z.build()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight[torch.rand(module.weight.shape, generator=g) < fraction] = 0
    return model


def _outputs(model, z, seed=3, batch=3):
    b = as_batch(z.batches(1, seed=seed, batch=batch)[0], where="test")
    with torch.inference_mode():
        return logits_of(b.call(model.eval()))


@pytest.mark.parametrize("z", zoo_params())
def test_save_load_round_trip_gives_identical_outputs(z, tmp_path):
    model = _sparse_copy(z)
    export.save(model, tmp_path / "m.plm")
    loaded = export.load(tmp_path / "m.plm", model=z.build(seed=7))
    assert torch.equal(_outputs(loaded, z), _outputs(model, z))


@pytest.mark.skipif(not HAS_ORT, reason="onnx/onnxruntime not installed")
@pytest.mark.parametrize("z", zoo_params())
def test_onnx_export_matches_the_model_at_another_batch_size(z, tmp_path):
    import onnxruntime
    model = _sparse_copy(z)
    path = export.export_onnx(model, tmp_path / "m.onnx", example_inputs=z.example, exporter="torchscript")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    b = as_batch(z.batches(1, seed=3, batch=3)[0], where="test")          # the example has batch 2
    names = [i.name for i in session.get_inputs()]
    feed = dict(zip(names, (t.numpy() for t in b.tensors())))
    if b.kwargs:
        assert set(names) <= set(b.kwargs)
        feed = {k: b.kwargs[k].numpy() for k in names}
    got = torch.from_numpy(session.run(None, feed)[0])
    torch.testing.assert_close(got, _outputs(model, z), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not (HAS_ORT and HAS_ONNXSCRIPT), reason="onnxscript not installed")
@pytest.mark.parametrize("z", zoo_params(["hf-gpt2"]))
def test_dynamo_exporter_writes_gpt2_with_a_dynamic_batch(z, tmp_path):
    import onnxruntime
    model = z.build()
    path = export.export_onnx(model, tmp_path / "m.onnx", example_inputs=z.example, exporter="dynamo")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    b = as_batch(z.batches(1, seed=3, batch=3)[0], where="test")
    got = session.run(None, {i.name: b.kwargs[i.name].numpy() for i in session.get_inputs()})[0]
    torch.testing.assert_close(torch.from_numpy(got), _outputs(model, z), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("z", zoo_params())
def test_sparsify_keeps_the_outputs(z):
    model = _sparse_copy(z)
    sparse, report = sparsify(model, example_inputs=z.example, min_sparsity=0.8, only_if_faster=False)
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert [d.name for d in report.layers] == plain
    assert report.replaced, "at least one Linear is 90 % sparse"
    for name in report.replaced:
        assert isinstance(sparse.get_submodule(name), SparseLinear)
    torch.testing.assert_close(_outputs(sparse, z), _outputs(model, z), atol=1e-5, rtol=1e-5)


def test_sparsify_leaves_transformer_layers_dense_and_says_why():
    z = BY_NAME["transformer"]
    model = _sparse_copy(z, 0.95)
    sparse, report = sparsify(model, example_inputs=z.example, only_if_faster=False)
    kept = {d.name: d.reason for d in report.layers if not d.replaced}
    assert set(kept) == {f"encoder.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)}
    assert all("TransformerEncoderLayer reads the weight directly" in r for r in kept.values())
    assert report.replaced == ["head"]
    torch.testing.assert_close(_outputs(sparse, z), _outputs(model, z), atol=1e-6, rtol=1e-6)


def test_a_parent_reading_a_replaced_weight_is_caught():
    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x @ self.fc.weight.to_dense().t() if self.fc.weight.is_sparse_csr else x @ self.fc.weight.t() + 1

    model = ReadsWeight()
    with torch.no_grad():
        model.fc.weight.zero_()
    with pytest.raises(ValueError, match="fc as SparseLinear the output differs"):
        sparsify(model, (4,), min_sparsity=0.5, only_if_faster=False)


@pytest.mark.skipif(not HAS_ORT, reason="onnx/onnxruntime not installed")
def test_export_onnx_refuses_bad_arguments(tmp_path):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="exactly one of 'input_shape'"):
        export.export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="unknown exporter 'dynamic'"):
        export.export_onnx(model, tmp_path / "m.onnx", (3,), exporter="dynamic")
    with pytest.raises(ValueError, match="could not be exported"):
        export.export_onnx(model, tmp_path / "m.onnx", (5,), exporter="torchscript")
    assert not (tmp_path / "m.onnx").exists()
