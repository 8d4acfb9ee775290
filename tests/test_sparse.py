"""Sparse inference: SparseLinear, sparsify/densify, zero-unit thinning and `summary --latency`.

Timings are never asserted here (they belong to benchmarks/sparse.py); the tests check what the
layers compute, what gets replaced, and that bad input is refused with a message naming it.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import prunelab
from prunelab import units
from prunelab.cli import main
from prunelab.metrics import count_flops, summary
from prunelab.sparse import MANY_ROWS, SparseLinear, compare_latency, densify, inference_latency, sparsify


def sparse_linear_layer(
    n_in: int, n_out: int, sparsity: float, *, bias: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Linear:
    """An nn.Linear with exactly round(sparsity · n_in · n_out) zero weights at random places."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        flat = layer.weight.view(-1)
        flat.copy_(torch.randn(flat.numel(), generator=generator, dtype=dtype))
        flat[torch.randperm(flat.numel(), generator=generator)[: round(sparsity * flat.numel())]] = 0
        if bias:
            layer.bias.copy_(torch.randn(n_out, generator=generator, dtype=dtype))
    return layer


def small_model(sparsities=(0.95, 0.5, 1.0), seed: int = 0) -> nn.Sequential:
    """20 → 30 → 10 → 3 with the given weight sparsity per Linear."""
    sizes = [(20, 30), (30, 10), (10, 3)]
    layers = []
    for index, ((n_in, n_out), sparsity) in enumerate(zip(sizes, sparsities)):
        layers.append(sparse_linear_layer(n_in, n_out, sparsity, seed=seed + index))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers[:-1])


# --- SparseLinear -------------------------------------------------------------------------------

# 1 row (addmv), a few rows (addmm), MANY_ROWS or more (embedding_bag), and leading dimensions
INPUT_LEADS = [(), (1,), (5,), (MANY_ROWS,), (MANY_ROWS + 7,), (2, 3), (4, 10), (1, 1, 1)]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", INPUT_LEADS)
def test_sparse_linear_equals_dense_linear(sparsity, bias, lead):
    dense = sparse_linear_layer(24, 13, sparsity, bias=bias)
    sparse = SparseLinear.from_linear(dense)
    x = torch.randn(*lead, 24, generator=torch.Generator().manual_seed(1))
    expected, got = dense(x), sparse(x)
    assert got.shape == expected.shape == (*lead, 13)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead", [(), (3,), (MANY_ROWS,)])
def test_float64_is_exact_to_double_precision(lead):
    dense = sparse_linear_layer(30, 7, 0.9, dtype=torch.float64)
    x = torch.randn(*lead, 30, dtype=torch.float64)
    torch.testing.assert_close(SparseLinear.from_linear(dense)(x), dense(x), rtol=1e-12, atol=1e-12)


def test_weight_is_a_csr_tensor_with_int32_indices_and_only_the_nonzeros():
    dense = sparse_linear_layer(40, 10, 0.75)
    sparse = SparseLinear.from_linear(dense)
    assert sparse.weight.layout == torch.sparse_csr
    assert sparse.weight.shape == (10, 40)
    assert sparse.crow_indices.dtype == sparse.col_indices.dtype == torch.int32
    assert sparse.nnz == int((dense.weight != 0).sum()) == 100
    assert sparse.sparsity == pytest.approx(0.75)
    assert torch.equal(sparse.dense_weight(), dense.weight)


def test_tensors_are_buffers_not_parameters():
    sparse = SparseLinear.from_linear(sparse_linear_layer(8, 4, 0.5))
    assert list(sparse.parameters()) == []
    assert set(dict(sparse.named_buffers())) == {"crow_indices", "col_indices", "values", "bias"}
    assert set(sparse.state_dict()) == {"crow_indices", "col_indices", "values", "bias"}


def test_from_linear_copies_and_does_not_alias_the_linear():
    dense = sparse_linear_layer(8, 4, 0.5)
    sparse = SparseLinear.from_linear(dense)
    x = torch.randn(3, 8)
    before = sparse(x)
    with torch.no_grad():
        dense.weight.mul_(2)
        dense.bias.add_(1)
    assert torch.equal(sparse(x), before)


@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_to_linear_round_trip_is_exact(sparsity, bias):
    dense = sparse_linear_layer(17, 9, sparsity, bias=bias)
    back = SparseLinear.from_linear(dense).to_linear()
    assert type(back) is nn.Linear
    assert (back.in_features, back.out_features) == (17, 9)
    assert torch.equal(back.weight, dense.weight)
    if bias:
        assert torch.equal(back.bias, dense.bias)
    else:
        assert back.bias is None


@pytest.mark.parametrize("threads", [1, 2])
def test_forward_under_inference_mode_and_thread_counts(threads):
    dense = sparse_linear_layer(50, 20, 0.9)
    sparse = SparseLinear.from_linear(dense)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for rows in (1, 4, MANY_ROWS * 2):
            x = torch.randn(rows, 50)
            with torch.inference_mode():
                got = sparse(x)
            with torch.no_grad():
                torch.testing.assert_close(sparse(x), got)
                torch.testing.assert_close(got, dense(x), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(previous)


def test_deepcopy_pickle_and_state_dict_round_trip():
    dense = sparse_linear_layer(30, 12, 0.8)
    sparse = SparseLinear.from_linear(dense)
    x = torch.randn(5, 30)
    expected = sparse(x)  # builds and caches the CSR tensor first
    assert torch.equal(copy.deepcopy(sparse)(x), expected)
    assert torch.equal(pickle.loads(pickle.dumps(sparse))(x), expected)
    buffer = io.BytesIO()
    torch.save(sparse.state_dict(), buffer)
    buffer.seek(0)
    # a layer with another number of non-zeros takes the saved arrays
    other = SparseLinear.from_linear(sparse_linear_layer(30, 12, 0.2, seed=5))
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.nnz == sparse.nnz
    assert torch.equal(other(x), expected)


def test_load_state_dict_refuses_inconsistent_arrays():
    sparse = SparseLinear.from_linear(sparse_linear_layer(6, 4, 0.5))
    state = sparse.state_dict()
    state["col_indices"] = state["col_indices"].clone().fill_(99)  # columns out of range
    with pytest.raises(ValueError, match="inconsistent CSR arrays"):
        sparse.load_state_dict(state)


def test_dtype_conversion_rebuilds_the_csr_tensor():
    dense = sparse_linear_layer(10, 6, 0.5)
    sparse = SparseLinear.from_linear(dense)
    sparse(torch.randn(2, 10))
    doubled = sparse.double()
    x = torch.randn(3, 10, dtype=torch.float64)
    assert doubled.weight.dtype == torch.float64
    torch.testing.assert_close(doubled(x), dense.double()(x))


def test_from_linear_refuses_other_layers_and_unsupported_dtypes():
    with pytest.raises(TypeError, match="'linear' parameter of SparseLinear.from_linear must be Linear"):
        SparseLinear.from_linear(nn.Conv2d(1, 2, 3))
    with pytest.raises(TypeError, match="float32 or float64 .* got torch.float16"):
        SparseLinear.from_linear(nn.Linear(4, 2).half())


def test_constructor_checks_its_arguments():
    crow, col, values = torch.tensor([0, 1, 1]), torch.tensor([2]), torch.tensor([1.0])
    layer = SparseLinear(3, 2, crow, col, values, torch.zeros(2))
    torch.testing.assert_close(layer(torch.tensor([0.0, 0.0, 5.0])), torch.tensor([5.0, 0.0]))
    with pytest.raises(ValueError, match="'in_features' parameter of SparseLinear must be an int in"):
        SparseLinear(0, 2, crow, col, values)
    with pytest.raises(ValueError, match=r"'bias' parameter of SparseLinear must have shape \(2,\)"):
        SparseLinear(3, 2, crow, col, values, torch.zeros(3))
    with pytest.raises(ValueError, match="inconsistent CSR arrays"):
        SparseLinear(3, 2, torch.tensor([0, 1, 2]), col, values)


# --- sparsify / densify -------------------------------------------------------------------------


def test_sparsify_replaces_exactly_the_layers_at_min_sparsity_and_keeps_outputs():
    model = small_model((0.95, 0.5, 1.0))
    original = copy.deepcopy(model)
    sparse, report = sparsify(model, (20,), min_sparsity=0.9, only_if_faster=False)
    assert [type(m).__name__ for m in sparse] == ["SparseLinear", "ReLU", "Linear", "ReLU", "SparseLinear"]
    assert report.replaced == ["0", "4"]
    assert [(d.name, d.replaced) for d in report.layers] == [("0", True), ("2", False), ("4", True)]
    assert [d.sparsity for d in report.layers] == pytest.approx([0.95, 0.5, 1.0], abs=1e-3)
    assert all(d.dense_ms is None and d.sparse_ms is None for d in report.layers)
    assert "< min_sparsity 90 %" in report.layers[1].reason
    x = torch.randn(16, 20)
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-5)
    # the given model is untouched
    assert [type(m) for m in model] == [type(m) for m in original]
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name
    assert "2 of 3 Linear layer(s) replaced" in str(report)
    assert report.to_dict()["layers"][0]["name"] == "0"


@pytest.mark.parametrize(
    "min_sparsity,expected", [(0.0, ["0", "2", "4"]), (0.5, ["0", "2", "4"]), (0.96, ["4"]), (1.0, ["4"])]
)
def test_min_sparsity_is_inclusive(min_sparsity, expected):
    _, report = sparsify(small_model((0.95, 0.5, 1.0)), (20,), min_sparsity=min_sparsity, only_if_faster=False)
    assert report.replaced == expected


def test_only_if_faster_times_each_candidate_and_follows_the_measurement():
    model = small_model((0.95, 0.5, 0.92))
    sparse, report = sparsify(model, (20,), min_sparsity=0.9, batch_size=3, threads=1, rounds=1, repeats=3, warmup=0)
    candidates = [d for d in report.layers if d.sparsity >= 0.9]
    assert [d.name for d in candidates] == ["0", "4"]
    for decision in candidates:
        assert decision.dense_ms > 0 and decision.sparse_ms > 0
        assert decision.replaced == (decision.sparse_ms < decision.dense_ms)
        assert decision.speedup == pytest.approx(decision.dense_ms / decision.sparse_ms)
        assert isinstance(sparse.get_submodule(decision.name), SparseLinear) == decision.replaced
    assert report.layers[1].dense_ms is None
    assert (report.batch_size, report.threads) == (3, 1)
    x = torch.randn(4, 20)
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-5)


def test_sparsify_times_a_layer_on_its_own_input_shape():
    # a Linear applied to every position of a sequence: it is timed on (positions, features) inputs
    model = nn.Sequential(sparse_linear_layer(8, 6, 0.95), nn.ReLU(), sparse_linear_layer(6, 2, 0.95, seed=1))
    sparse, report = sparsify(model, (5, 8), min_sparsity=0.9, threads=1, rounds=1, repeats=2, warmup=0)
    assert all(d.dense_ms is not None for d in report.layers)
    assert "not called" not in report.layers[0].reason
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_linear_model_itself_becomes_a_sparse_linear():
    dense = sparse_linear_layer(12, 4, 0.95)
    sparse, report = sparsify(dense, (12,), only_if_faster=False)
    assert isinstance(sparse, SparseLinear) and report.replaced == [""]
    assert type(densify(sparse)) is nn.Linear


def test_densify_restores_the_exact_model():
    model = small_model((0.95, 0.5, 1.0))
    sparse, _ = sparsify(model, (20,), min_sparsity=0.9, only_if_faster=False)
    dense = densify(sparse)
    assert [type(m) for m in dense] == [type(m) for m in model]
    assert dense.state_dict().keys() == model.state_dict().keys()
    for (name, a), (_, b) in zip(dense.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    assert isinstance(sparse[0], SparseLinear)  # densify works on a copy
    assert all(p.requires_grad for p in dense.parameters())  # trainable again


def test_subclasses_of_linear_are_left_alone():
    # nn.MultiheadAttention reads the weight of its out_proj, a Linear subclass, directly
    model = nn.ModuleDict({"proj": nn.Linear(8, 8), "attention": nn.MultiheadAttention(8, 2)})
    with torch.no_grad():
        model["attention"].out_proj.weight.zero_()
    sparse, report = sparsify(model, (8,), min_sparsity=0.0, only_if_faster=False)
    assert report.replaced == ["proj"]
    assert type(sparse["attention"].out_proj) is type(model["attention"].out_proj)


def test_no_warning_escapes(recwarn):
    sparse = SparseLinear.from_linear(sparse_linear_layer(10, 5, 0.9))
    sparse(torch.randn(2, 10))
    copy.deepcopy(sparse).double()(torch.randn(10, dtype=torch.float64))
    assert [str(w.message) for w in recwarn] == []


def test_summary_and_flops_count_a_sparse_layer_as_the_linear_it_was():
    model = small_model((0.95, 0.5, 1.0))
    sparse, _ = sparsify(model, (20,), min_sparsity=0.9, only_if_faster=False)
    before, after = summary(model, (20,)), summary(sparse, (20,))
    for a, b in zip((*before.rows, before.total), (*after.rows, after.total)):
        assert {**a.__dict__, "type": ""} == {**b.__dict__, "type": ""}
    assert [row.type for row in after.rows] == ["SparseLinear", "Linear", "SparseLinear"]
    assert count_flops(sparse, (20,)) == count_flops(model, (20,))
    # a SparseLinear's weight can be named as prunable, like a Linear's
    assert summary(sparse, (20,), prunable=["0.weight"]).total.sparsity == pytest.approx(0.95, abs=1e-3)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"min_sparsity": 1.5}, ValueError, "'min_sparsity' parameter of sparsify must be a float in [0, 1]. Got 1.5"),
        ({"min_sparsity": -0.1}, ValueError, "'min_sparsity' parameter of sparsify must be a float in [0, 1]"),
        ({"min_sparsity": "0.9"}, TypeError, "'min_sparsity' parameter of sparsify must be a float"),
        ({"only_if_faster": 1}, TypeError, "'only_if_faster' parameter of sparsify must be a bool. Got 1"),
        ({"batch_size": 0}, ValueError, "'batch_size' parameter of sparsify must be an int in [1, 1048576]. Got 0"),
        ({"batch_size": 2.0}, TypeError, "'batch_size' parameter of sparsify must be an int"),
        ({"threads": 0}, ValueError, "'threads' parameter of sparsify must be an int in [1, 4096]. Got 0"),
        ({"rounds": 0}, ValueError, "'rounds' parameter of sparsify must be an int in [1, 1000000]"),
        ({"repeats": 0}, ValueError, "'repeats' parameter of sparsify must be an int in [1, 1000000]"),
        ({"warmup": -1}, ValueError, "'warmup' parameter of sparsify must be an int in [0, 1000000]"),
        ({"input_shape": (0,)}, ValueError, "'input_shape' parameter of sparsify must be a tuple of positive ints"),
        ({"input_shape": (21,)}, ValueError, "sparsify could not run Sequential on an input of shape (1, 21)"),
        ({"model": "mlp"}, TypeError, "'model' parameter of sparsify must be a torch.nn.Module. Got 'mlp'"),
    ],
)
def test_sparsify_refuses_bad_arguments_naming_them(kwargs, error, message):
    arguments = {"model": small_model(), "input_shape": (20,), **kwargs}
    with pytest.raises(error) as info:
        sparsify(arguments.pop("model"), arguments.pop("input_shape"), **arguments)
    assert message in str(info.value)


def test_sparsify_refuses_a_half_precision_candidate_before_timing():
    model = small_model((0.95, 0.5, 0.5)).half()
    with pytest.raises(TypeError, match="sparsify \\(layer '0'\\) needs float32 or float64"):
        sparsify(model, (20,), only_if_faster=False)


def test_densify_and_compare_latency_check_their_arguments():
    with pytest.raises(TypeError, match="'model' parameter of densify must be a torch.nn.Module"):
        densify([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="'models' parameter of compare_latency must name at least one"):
        compare_latency({}, (3,))
    with pytest.raises(TypeError, match=r"'models\['a'\]' parameter of compare_latency must be a torch.nn.Module"):
        compare_latency({"a": 3}, (3,))


# --- zero-unit thinning ---------------------------------------------------------------------------


def dead_unit_model() -> nn.Module:
    """mlp 64 → 12 → 6 → 10 with units 1, 4, 7 of fc1 and unit 5 of fc2 receiving only zeros."""
    model = prunelab.build_model("mlp", input_shape=(1, 8, 8), n_classes=10, hidden=[12, 6], seed=0)
    with torch.no_grad():
        model.fc1.weight[[1, 4, 7]] = 0
        model.fc1.weight[0, :10] = 0  # a partly zero unit stays
        model.fc2.weight[5] = 0
        model.fc3.weight[2] = 0  # the output layer has no removable units
    return model


def test_zero_units_finds_exactly_the_units_with_all_zero_incoming_weights():
    plan = units.zero_units(dead_unit_model(), (1, 8, 8))
    assert {name: idx.tolist() for name, idx in plan.items()} == {"fc1": [1, 4, 7], "fc2": [5]}


def test_zero_units_leaves_out_layers_with_none_or_only_dead_units():
    model = dead_unit_model()
    with torch.no_grad():
        model.fc2.weight.zero_()
    assert list(units.zero_units(model, (1, 8, 8))) == ["fc1"]
    assert (
        units.zero_units(prunelab.build_model("mlp", input_shape=(1, 8, 8), n_classes=10, hidden=[12, 6]), (1, 8, 8))
        == {}
    )


def test_thinning_the_zero_units_keeps_the_outputs_when_their_biases_are_zero():
    model = dead_unit_model()
    with torch.no_grad():
        model.fc1.bias[[1, 4, 7]] = 0
        model.fc2.bias[5] = 0
    small = units.thin(model, units.zero_units(model, (1, 8, 8)), input_shape=(1, 8, 8))
    assert (small.fc1.out_features, small.fc2.out_features) == (9, 5)
    x = torch.randn(7, 1, 8, 8)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_inference_latency_measures_the_three_variants():
    model = dead_unit_model()
    with torch.no_grad():
        model.fc1.weight.mul_(torch.rand(model.fc1.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.93)
    result = inference_latency(
        model, (1, 8, 8), min_sparsity=0.9, batch_sizes=(1, 4), threads=1, rounds=1, repeats=2, warmup=0
    )
    assert set(result.median_ms) == {"dense", "sparse", "thinned"}
    assert all(set(ms) == {1, 4} for ms in result.median_ms.values())
    assert result.sparse_report.replaced == ["fc1"]
    assert result.thinned_units["fc2"] == (6, 5)
    assert result.max_abs_diff["sparse"] < 1e-5
    text = str(result)
    assert "SparseLinear for fc1" in text and "fc2 6->5" in text
    assert all(isinstance(m, nn.Module) for m in model.modules())  # still the plain model
    assert isinstance(model.fc1, nn.Linear)


# --- the command line -------------------------------------------------------------------------------


def test_summary_latency_prints_dense_sparse_and_thinned_rows(tmp_path, capsys):
    model = dead_unit_model()
    with torch.no_grad():
        model.fc1.weight.mul_(torch.rand(model.fc1.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.95)
    weights = tmp_path / "pruned.pt"
    torch.save(model.state_dict(), weights)
    code = main(
        [
            "summary",
            "--model",
            "mlp",
            "--dataset",
            "digits",
            "--model-arg",
            "hidden=[12,6]",
            "--weights",
            str(weights),
            "--latency",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.index("total") < out.index("latency:")  # after the summary table
    lines = out.splitlines()
    for label in ("dense (zeros kept)", "sparse (CSR Linear)", "thinned (dead units)"):
        row = next(line for line in lines if line.strip().startswith(label))
        assert row.count(" ms ") == 2 and row.count("x") >= 2  # batch 1 and 64, with ratios
    assert "1 thread(s)" in out
    assert "SparseLinear for fc1" in out and "kept dense: fc2" in out
    assert "fc1 12->" in out and "fc2 6->5" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--latency", "--min-sparsity", "1.5"],
            "'--min-sparsity' parameter of prunelab summary must be a float in [0, 1]. Got 1.5",
        ),
        (
            ["--latency", "--threads", "0"],
            "'--threads' parameter of prunelab summary must be an int in [1, 4096]. Got 0",
        ),
    ],
)
def test_summary_latency_refuses_bad_options(argv, message, capsys):
    assert main(["summary", "--model", "mlp", "--dataset", "digits", *argv]) == 2
    assert message in capsys.readouterr().err


def test_inference_latency_explains_a_model_it_cannot_thin():
    model = nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 2))  # sigmoid(0) ≠ 0
    result = inference_latency(model, (6,), batch_sizes=1, threads=1, rounds=1, repeats=1, warmup=0)
    assert set(result.median_ms) == {"dense", "sparse"}
    assert "not thinned" in result.thinned_note and "Sigmoid" in result.thinned_note
    assert "thinned (dead units)" not in str(result)
    assert result.to_dict()["thinned_units"] == {}


def test_forward_refuses_inputs_of_the_wrong_width_and_handles_empty_batches():
    sparse = SparseLinear.from_linear(sparse_linear_layer(24, 5, 0.5))
    with pytest.raises(ValueError, match=r"takes inputs of shape \(\.\.\., 24\). Got shape \(2, 12\)"):
        sparse(torch.randn(2, 12))  # 24 numbers, but not one row of 24
    with pytest.raises(ValueError, match="Got shape ()"):
        sparse(torch.tensor(1.0))
    assert sparse(torch.randn(0, 24)).shape == (0, 5)


# --------------------------------------------------------------------------- example inputs


class _KeywordModel(nn.Module):
    """Token ids and a mask as keyword inputs, a dict output: the form of a Hugging Face model."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 40)
        self.fc = nn.Linear(40, 30)
        self.head = nn.Linear(30, 11)

    def forward(self, input_ids, attention_mask):
        h = torch.relu(self.fc(self.embed(input_ids))) * attention_mask[..., None]
        return {"logits": self.head(h)}


def test_sparsify_and_inference_latency_take_keyword_example_inputs():
    torch.manual_seed(0)
    model = _KeywordModel().eval()
    with torch.no_grad():
        model.fc.weight[torch.rand_like(model.fc.weight) < 0.95] = 0
    example = {"input_ids": torch.randint(0, 11, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    sparse, report = sparsify(model, example_inputs=example, only_if_faster=False)
    assert report.replaced == ["fc"] and isinstance(sparse.fc, SparseLinear)
    torch.testing.assert_close(sparse(**example)["logits"], model(**example)["logits"], atol=1e-6, rtol=1e-6)
    timed, timed_report = sparsify(model, example_inputs=example, min_sparsity=0.5, rounds=1, repeats=1, warmup=0)
    assert {d.name for d in timed_report.layers if d.dense_ms is not None} == {"fc"}
    result = inference_latency(model, example_inputs=example, batch_sizes=(1, 3), rounds=1, repeats=1, warmup=0)
    assert set(result.median_ms) == {"dense", "sparse"} and set(result.median_ms["sparse"]) == {1, 3}
    assert result.max_abs_diff["sparse"] <= 1e-5  # the mask multiplies the hidden units: no unit layers
    assert "not thinned: unit pruning found no unit layers in this _KeywordModel" in result.thinned_note
    with pytest.raises(ValueError, match="exactly one of 'input_shape'"):
        sparsify(model, (5,), example_inputs=example)


class _TokenMLP(nn.Module):
    """Token ids and a mask, with an MLP (``fc1``/``fc2``) whose hidden units ``prunelab.units`` finds."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 40)
        self.fc1 = nn.Linear(40, 30)
        self.fc2 = nn.Linear(30, 11)

    def forward(self, input_ids, attention_mask):
        return {"logits": self.fc2(torch.relu(self.fc1(self.embed(input_ids)))) * attention_mask[..., None]}


def test_inference_latency_thins_the_dead_units_of_a_model_with_keyword_inputs():
    torch.manual_seed(0)
    model = _TokenMLP().eval()
    with torch.no_grad():
        model.fc1.weight[torch.rand_like(model.fc1.weight) < 0.95] = 0
    dead = int((model.fc1.weight == 0).all(dim=1).sum())
    example = {"input_ids": torch.randint(0, 11, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    result = inference_latency(model, example_inputs=example, batch_sizes=(1,), rounds=1, repeats=1, warmup=0)
    assert dead > 0 and result.thinned_units == {":mlp": (30, 30 - dead)}
    assert set(result.median_ms) == {"dense", "sparse", "thinned"}
    assert result.max_abs_diff["thinned"] <= 1e-5  # the dead units' relu(bias) folded into fc2's bias
