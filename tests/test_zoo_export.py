"""Save/load, ONNX export and sparsify over the zoo: every cell checked against the model's outputs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from zoo import BY_NAME, zoo_params

from prunelab import export
from prunelab.inputs import as_batch, logits_of
from prunelab.sparse import SparseLinear, sparsify

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
    b = as_batch(z.batches(1, seed=3, batch=3)[0], where="test")  # the example has batch 2
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


# --------------------------------------------------------------------------- thinned models load back


def _tp_thin(z, picks):
    """The zoo model thinned by Torch-Pruning's DependencyGraph directly (not prunelab.units)."""
    tp = pytest.importorskip("torch_pruning")
    model = z.build()
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=z.example, verbose=False, output_transform=lambda out: logits_of(out)
    )
    for pick in picks(model, tp):
        graph.get_pruning_group(*pick).prune()
    return model


THIN_CASES = {
    "resnet18": lambda m, tp: [
        (m.conv1, tp.prune_conv_out_channels, [0, 3]),
        (m.layer1[0].conv1, tp.prune_conv_out_channels, [1, 2, 5]),
        (m.layer3[1].conv1, tp.prune_conv_out_channels, [0, 7]),
    ],
    "mobilenetv2": lambda m, tp: [(m.blocks[1].block[0], tp.prune_conv_out_channels, [0, 5, 9])],
    "transformer": lambda m, tp: [
        (m.embed, tp.prune_embedding_out_channels, [0, 4, 9, 12]),
        (m.encoder.layers[0].linear1, tp.prune_linear_out_channels, [1, 5]),
    ],
    "hf-bert": lambda m, tp: [(m.bert.encoder.layer[0].intermediate.dense, tp.prune_linear_out_channels, [0, 4, 9])],
    "hf-llama": lambda m, tp: [(m.model.layers[0].mlp.gate_proj, tp.prune_linear_out_channels, [0, 4, 9])],
}


@pytest.mark.parametrize("z", zoo_params(list(THIN_CASES)))
def test_a_model_thinned_by_torch_pruning_loads_back_into_a_fresh_model(z, tmp_path):
    thinned = _tp_thin(z, THIN_CASES[z.name])
    export.save(thinned, tmp_path / "thin.plm")
    fresh = z.build(seed=5)
    assert sum(p.numel() for p in fresh.parameters()) > sum(p.numel() for p in thinned.parameters())
    loaded = export.load(tmp_path / "thin.plm", model=fresh)
    assert loaded is fresh
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in thinned.state_dict().items()}
    assert torch.equal(_outputs(loaded, z), _outputs(thinned, z))


def test_thinned_size_attributes_are_updated():
    z = BY_NAME["transformer"]
    thinned = _tp_thin(z, THIN_CASES["transformer"])
    fresh = z.build(seed=5)
    export.reshape_to(fresh, {k: v.shape for k, v in thinned.state_dict().items()})
    attention = fresh.encoder.layers[0].self_attn
    assert (attention.embed_dim, attention.num_heads, attention.head_dim) == (12, 4, 3)
    assert fresh.embed.embedding_dim == 12 and fresh.encoder.layers[0].norm1.normalized_shape == (12,)
    assert (fresh.encoder.layers[0].linear1.in_features, fresh.encoder.layers[0].linear1.out_features) == (12, 30)


@pytest.mark.parametrize("z", zoo_params(["hf-gpt2"]))
def test_a_gpt2_with_thinned_conv1d_mlps_loads_back(z, tmp_path):
    model = z.build()
    keep = torch.tensor([i for i in range(32) if i % 3])
    with torch.no_grad():
        for block in model.transformer.h:
            fc, proj = block.mlp.c_fc, block.mlp.c_proj  # HF Conv1D: weight (in, out)
            fc.weight = nn.Parameter(fc.weight[:, keep].clone())
            fc.bias = nn.Parameter(fc.bias[keep].clone())
            fc.nf = len(keep)
            proj.weight = nn.Parameter(proj.weight[keep].clone())
    export.save(model, tmp_path / "gpt2.plm")
    loaded = export.load(tmp_path / "gpt2.plm", model=z.build(seed=5))
    assert loaded.transformer.h[1].mlp.c_fc.nf == len(keep)
    assert torch.equal(_outputs(loaded, z), _outputs(model, z))


def test_inconsistent_stored_shapes_are_refused_before_anything_changes(tmp_path):
    from prunelab.export import ModelFileError

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2), nn.LSTM(2, 3))
    small = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2), nn.LSTM(2, 3))
    small[0].bias = nn.Parameter(torch.zeros(6))  # a file whose sizes disagree
    with pytest.raises(ModelFileError, match=r"0 \(Linear\): bias \(6,\) does not match weight \(5, 4\)"):
        export.reshape_to(model, {"0.weight": (5, 4)})
    assert model[0].weight.shape == (6, 4)
    with pytest.raises(ModelFileError, match="LSTM cannot be resized"):
        export.reshape_to(model, {"3.weight_ih_l0": (8, 2)})
    export.save(small, tmp_path / "bad.plm")
    with pytest.raises(ModelFileError, match="do not fit the given model"):
        export.load(tmp_path / "bad.plm", model=model)
    assert model[0].weight.shape == (6, 4)


@pytest.mark.parametrize("z", zoo_params(["hf-gpt2"]))
def test_a_gpt2_with_a_head_removed_loads_back_with_its_head_count(z, tmp_path):
    model = z.build()  # 4 heads of width 4 in a width-16 stream
    keep = torch.tensor([i for i in range(16) if i // 4 != 1])  # drop head 1
    with torch.no_grad():
        for block in model.transformer.h:
            attention = block.attn
            columns = torch.cat([keep, keep + 16, keep + 32])  # its q, k and v columns
            attention.c_attn.weight = nn.Parameter(attention.c_attn.weight[:, columns].clone())
            attention.c_attn.bias = nn.Parameter(attention.c_attn.bias[columns].clone())
            attention.c_attn.nf = len(columns)
            attention.c_proj.weight = nn.Parameter(attention.c_proj.weight[keep].clone())
            attention.num_heads, attention.split_size = 3, 12
    export.save(model, tmp_path / "gpt2.plm")
    loaded = export.load(tmp_path / "gpt2.plm", model=z.build(seed=5))
    assert (loaded.transformer.h[0].attn.num_heads, loaded.transformer.h[0].attn.split_size) == (3, 12)
    assert torch.equal(_outputs(loaded, z), _outputs(model, z))


# --------------------------------------------------------------------------- models thinned by prunelab.units

UNIT_PLANS = {  # unit-group name → units removed: heads, MLP channels, a residual stream
    "hf-gpt2": {
        "transformer.h.0.attn:heads": [1],
        "transformer.h.1.attn:heads": [0, 3],
        "transformer.h.0.mlp": [0, 5, 9],
    },
    "hf-llama": {
        "model.layers.0.self_attn:heads": [1, 2],
        "model.layers.1.self_attn:kv_heads": [0],
        "model.layers.1.mlp": [3, 4],
    },
    "hf-bert": {"bert.encoder.layer.0.attention.self:heads": [2], "bert.encoder.layer.1:mlp": [1, 7]},
    "resnet18": {"layer2.0.conv2": [0, 3], "layer1.0.conv1": [1, 2, 5], "conv1": [4]},
}
HEAD_COUNTS = {  # attention module → (attribute, heads left) after the plan
    "hf-gpt2": {"transformer.h.0.attn": ("num_heads", 3), "transformer.h.1.attn": ("num_heads", 2)},
    "hf-llama": {
        "model.layers.0.self_attn": ("num_key_value_groups", 1),
        "model.layers.1.self_attn": ("num_key_value_groups", 2),
    },
    "hf-bert": {"bert.encoder.layer.0.attention.self": ("num_attention_heads", 3)},
    "resnet18": {},
}


@pytest.mark.parametrize("z", zoo_params(list(UNIT_PLANS)))
def test_a_model_thinned_by_prunelab_units_loads_back_into_a_fresh_model(z, tmp_path):
    from prunelab import units

    plan = {k: torch.tensor(v) for k, v in UNIT_PLANS[z.name].items()}
    thinned = units.thin(z.build(), plan, example_inputs=z.example)
    export.save(thinned, tmp_path / "thin.plm")
    fresh = z.build(seed=5)
    assert sum(p.numel() for p in fresh.parameters()) > sum(p.numel() for p in thinned.parameters())
    loaded = export.load(tmp_path / "thin.plm", model=fresh)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in thinned.state_dict().items()}
    assert export.size_attributes(loaded) == export.size_attributes(thinned)
    for name, (attr, value) in HEAD_COUNTS[z.name].items():
        assert getattr(loaded.get_submodule(name), attr) == value
    assert torch.equal(_outputs(loaded, z), _outputs(thinned, z))
